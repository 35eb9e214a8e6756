"""Build static/wasm/qz.c: the committed WebAssembly module, or a native shared library for benchmarks.

    python tools/build_wasm.py                     # -> static/wasm/qz.wasm (commit it)
    python tools/build_wasm.py --out /tmp/qz.wasm  # somewhere else (the reproducibility test does this)
    python tools/build_wasm.py --native /tmp/libqz.so

The wasm build must be byte-reproducible: the test rebuilds it and compares with the committed file. Hence no
debug info, no paths in the output, and the compiler is the pinned `ziglang` wheel (zig cc = clang + wasm-ld).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "static" / "wasm" / "qz.c"
WASM = ROOT / "static" / "wasm" / "qz.wasm"

WASM_FLAGS = [
    "--target=wasm32-freestanding",
    "-O3",
    "-msimd128",        # 128-bit loads/stores for the string copier; every current browser has it
    "-mbulk-memory",    # memcpy/memset become memory.copy/memory.fill (no libc to call)
    "-nostdlib",
    "-fvisibility=hidden",  # export exactly the QZ_API functions
    "-Wall", "-Wextra", "-Werror",
    "-Wl,--no-entry",
    "-Wl,--export-dynamic",
    "-Wl,--strip-all",  # no name section: smaller, and nothing that depends on the build machine
]
NATIVE_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror"]


def build_wasm(out: Path = WASM) -> Path:
    """Compile qz.c to `out` with zig cc (the ziglang wheel). Returns out."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile from the source's directory with a relative name, so no absolute path can reach the output.
    # A private zig cache keeps concurrent builds (tests, the lead's build) from racing on one cache directory.
    with tempfile.TemporaryDirectory(prefix="qz-zig-") as cache:
        env = dict(os.environ, ZIG_LOCAL_CACHE_DIR=cache, ZIG_GLOBAL_CACHE_DIR=cache)
        cmd = [sys.executable, "-m", "ziglang", "cc", *WASM_FLAGS, SOURCE.name, "-o", str(out.resolve())]
        _run(cmd, cwd=SOURCE.parent, env=env)
    out.chmod(0o644)  # the linker marks it executable; it is data to the page (and to git)
    return out


def build_native(out: Path, compiler: str = "gcc") -> Path:
    """Compile qz.c to a native shared library (for bench/codec.py via ctypes). Returns out."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([compiler, *NATIVE_FLAGS, str(SOURCE), "-o", str(out)], cwd=ROOT, env=None)
    return out


def _run(cmd: list[str], cwd: Path, env: dict | None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def configure_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WASM, help=f"wasm output (default {WASM.relative_to(ROOT)})")
    parser.add_argument("--native", type=Path, help="build a native shared library here instead")
    parser.add_argument("--cc", default="gcc", help="native compiler (default gcc)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = configure_parser().parse_args(argv)
    if args.native:
        path = build_native(args.native, args.cc)
    else:
        path = build_wasm(args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
