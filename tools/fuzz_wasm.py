"""Fuzz the WASM build of the QZ decoder under atheris (coverage of the Python side, the wasm module as the target).

    python tools/fuzz_wasm.py -max_total_time=600 -max_len=65536 [corpus_dir]   (default: a scratch copy of tests/golden)

Every input is decoded by qz.wasm (through wasmtime) AND by the pure-Python reference; the two must agree on the
output bytes or on the error code. Anything else — a trap in the wasm, another exception, a disagreement — is a
finding (atheris stops and writes the input to crash-*). Corpus seeds: tests/golden/*.qz.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import atheris  # noqa: E402

with atheris.instrument_imports():
    from converter import lzw, wasm_codec
    from converter.errors import CodecError

MAX_OUT = 1 << 22   # skip chunks whose header claims more than 4 MiB of output: the reference is slow there


def outcome(fn, data):
    try:
        return ("ok", fn(data))
    except CodecError as e:
        return ("error", e.code)


def test_one(data: bytes) -> None:
    try:
        h = lzw.parse_header(data)
        if lzw.layout_nbytes(h.layout, h.n_symbols) > MAX_OUT:
            return
    except CodecError:
        pass
    a = outcome(wasm_codec.decode_chunk, data)
    b = outcome(lzw.decode_chunk, data)
    if a != b:
        raise AssertionError(f"wasm {a[0]} {a[1] if a[0] == 'error' else len(a[1])} != "
                             f"reference {b[0]} {b[1] if b[0] == 'error' else len(b[1])}")


def main():
    args = sys.argv
    if not any(not a.startswith("-") for a in args[1:]):
        # libFuzzer writes new inputs into the first corpus folder: seed a scratch copy, never tests/golden
        import shutil
        import tempfile
        corpus = Path(tempfile.mkdtemp(prefix="qz-atheris-"))
        for f in (ROOT / "tests" / "golden").glob("*.qz"):
            shutil.copy(f, corpus)
        print(f"corpus: {corpus}", file=sys.stderr)
        args = args + [str(corpus)]
    atheris.Setup(args, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
