"""Every mutant of a valid bundle is refused with a BundleError naming the file — zero crashes, zero hangs,
zero loads that pass (smoke size here; `python tools/mutate.py --n 20000` is the long run)."""
import shutil
import time
import zlib

import pytest

from converter.bundle import load
from converter.errors import BundleError
from mutants import mutants

N = 1200


def try_load(folder):
    b = load(folder)
    for _ in b.decode_initializers():
        pass


@pytest.fixture(scope="module")
def files_bundles(tmp_path_factory, tiny_hf):
    """int8 with its graphs, tokenizer and tables files compressed (real bundles do that from 64 KiB up): as zlib
    streams (format version 3's default) and as QZ chunks (version 2's way, still read)."""
    from converter.bundle import BuildOptions, write_bundle
    from converter.loaders import open_checkpoint
    out = {}
    for codec, suffix in (("deflate", ".zlib"), ("qz", ".qz")):
        out[codec] = tmp_path_factory.mktemp("files") / f"int8-{codec}"
        write_bundle(open_checkpoint(tiny_hf[0]), out[codec], BuildOptions(
            scheme="int8", chunk_symbols=4096, compress_files_from=0, file_codec=codec))
        assert {f"model.onnx{suffix}", f"tokenizer.json{suffix}", f"tables.json{suffix}"} <= \
            {p.name for p in out[codec].iterdir()}
    return out


@pytest.mark.parametrize("scheme,n", [("int4-g32", N // 2), ("int8", N // 2), ("int8-qz-files", N // 4),
                                      ("int8-zlib-files", N // 4)])
def test_every_mutant_is_refused(tmp_path, tiny_bundles, files_bundles, scheme, n):
    src = {"int8-qz-files": files_bundles["qz"], "int8-zlib-files": files_bundles["deflate"]}.get(scheme) or \
        tiny_bundles(scheme)
    accepted, crashed, slow = [], [], []
    work = tmp_path / "m"
    files = [p.name for p in src.iterdir()]
    for label, change in mutants(src, n, seed=zlib.crc32(scheme.encode())):
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(src, work)
        for name, data in change.items():
            if data is None:
                (work / name).unlink()
            else:
                (work / name).write_bytes(data)
        t0 = time.perf_counter()
        try:
            try_load(work)
            accepted.append(label)
        except BundleError as e:
            if not any(f in str(e) for f in (*files, *change)):      # a mutant may write tables.json
                crashed.append(f"{label}: error does not name a file: {e}")
        except Exception as e:  # noqa: BLE001 — exactly what this test hunts
            crashed.append(f"{label}: {type(e).__name__}: {e}")
        if time.perf_counter() - t0 > 5:
            slow.append(label)
    assert not crashed, crashed[:10]
    assert not accepted, accepted[:10]
    assert not slow, slow[:10]


def test_cli_exit_code_2_on_a_broken_bundle(tmp_path, tiny_bundles):
    import subprocess
    import sys
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles("int8"), dst)
    (dst / "weights-000.qzb").write_bytes(b"QZ" * 10)
    r = subprocess.run([sys.executable, "-m", "converter", "run", str(dst), "--prompt", "hi"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "weights-000.qzb" in r.stderr and "Traceback" not in r.stderr, r.stderr
