"""The QZ codec façade: every caller encodes and decodes chunks through here.

Backends (same bytes, same errors — tests/golden/ pins both):
    "wasm"    static/wasm/qz.wasm through wasmtime (converter/wasm_codec.py): fast, and the code the page runs
    "python"  converter/lzw.py, the readable reference (pure Python, also runs under Pyodide)

The backend is "wasm" when wasmtime imports and the module loads, else "python". The environment variable
TINYQMOE_CODEC=python|wasm forces one (auto, or unset, chooses).
"""
from __future__ import annotations

import functools
import os

from converter import lzw

BACKENDS = ("wasm", "python")
ENV_VAR = "TINYQMOE_CODEC"


@functools.lru_cache(maxsize=None)
def _wasm_loads() -> bool:
    try:
        from converter import wasm_codec

        wasm_codec.load()
    except Exception:  # no wasmtime, no .wasm, or an engine that cannot run it: fall back to the reference
        return False
    return True


def available_backend() -> str:
    """"wasm" or "python", honouring TINYQMOE_CODEC."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in (*BACKENDS, "auto"):
        raise ValueError(f"{ENV_VAR}={choice!r}: valid choices are {', '.join((*BACKENDS, 'auto'))}")
    if choice == "python":
        return "python"
    if choice == "wasm":
        if not _wasm_loads():
            raise RuntimeError(f"{ENV_VAR}=wasm but static/wasm/qz.wasm cannot be loaded (is wasmtime installed?)")
        return "wasm"
    return "wasm" if _wasm_loads() else "python"


def _backend():
    if available_backend() == "wasm":
        from converter import wasm_codec

        return wasm_codec
    return lzw


def encode_chunk(symbols, alphabet: int, layout: int, bias: int = 0, max_code_bits: int = 16,
                 reset_when_full: bool = True, method: int | None = None, *, version: int = lzw.VERSION,
                 dictionary: int | None = None) -> bytes:
    """See converter.lzw.encode_chunk."""
    return _backend().encode_chunk(symbols, alphabet, layout, bias, max_code_bits, reset_when_full, method,
                                   version=version, dictionary=dictionary)


def decode_chunk(chunk) -> bytes:
    """See converter.lzw.decode_chunk."""
    return _backend().decode_chunk(chunk)


def decode_into(chunk, out) -> int:
    """See converter.lzw.decode_into."""
    return _backend().decode_into(chunk, out)


parse_header = lzw.parse_header
layout_nbytes = lzw.layout_nbytes
