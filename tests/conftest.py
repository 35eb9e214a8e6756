import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """A tiny Llama-3.2-shaped HF folder (bf16, tied, llama3 rope scaling) and its stored float32 weights."""
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    weights = tiny.write_hf(folder, tied=True, dtype="bf16")
    return folder, weights


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory, tiny_hf):
    """Bundles of the tiny model per scheme, built lazily and cached for the session. Without the int4 schemes'
    default activation smoothing, so that tests can compare them against the checkpoint's own weights quantized;
    tests/test_smooth.py checks the smoothed default against its own reference."""
    from converter.bundle import BuildOptions, write_bundle
    from converter.loaders import open_checkpoint

    root = tmp_path_factory.mktemp("bundles")
    cache = {}

    def get(scheme: str, embed_scheme: str | None = None):
        key = (scheme, embed_scheme)
        if key not in cache:
            out = root / f"{scheme}-{embed_scheme or 'default'}"
            write_bundle(open_checkpoint(tiny_hf[0]), out,
                         BuildOptions(scheme=scheme, embed_scheme=embed_scheme, chunk_symbols=4096, smooth="off"))
            cache[key] = out
        return cache[key]

    return get
