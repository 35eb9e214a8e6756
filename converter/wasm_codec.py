"""The QZ codec through static/wasm/qz.wasm (the same module the page runs), via wasmtime.

Same functions and semantics as converter/lzw.py, byte for byte; the ABI is documented at the top of
static/wasm/qz.c. The module is compiled once per process; calls are serialized with a lock (one wasm instance,
one heap). Every call resets the heap, copies the input in, runs, and copies the result out.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path

from converter import lzw
from converter.errors import CodecError

WASM_PATH = Path(__file__).resolve().parent.parent / "static/wasm/qz.wasm"

NO_MEMORY = 64  # qz.c: scratch allocation failed (about this machine, not the chunk)
ENC_RESET = 0x1
ENC_FORCE_LZW = 0x100
ENC_FORCE_PACKED = 0x200

_lock = threading.Lock()
_instance: "_QZ | None" = None


class _QZ:
    """One instantiated qz.wasm: its store, memory and exported functions."""

    def __init__(self, path: Path):
        import wasmtime  # the only module of this package that imports wasmtime

        config = wasmtime.Config()
        config.wasm_simd = True
        config.wasm_bulk_memory = True
        engine = wasmtime.Engine(config)
        self.store = wasmtime.Store(engine)
        module = wasmtime.Module.from_file(engine, str(path))
        instance = wasmtime.Instance(self.store, module, [])
        exports = instance.exports(self.store)
        self.memory = exports["memory"]
        self.reset_heap = exports["qz_reset_heap"]
        self._alloc = exports["qz_alloc"]
        self.decoded_size = exports["qz_decoded_size"]
        self.decode = exports["qz_decode"]
        self.encode_bound = exports["qz_encode_bound"]
        self.encode = exports["qz_encode"]

    def alloc(self, n: int) -> int:
        ptr = self._alloc(self.store, n)
        if ptr == 0:
            raise MemoryError(f"qz.wasm could not grow its memory by {n} bytes")
        return ptr

    def write(self, ptr: int, data) -> None:
        """Copy a bytes-like object into wasm memory at ptr (ctypes: no intermediate copies)."""
        view = memoryview(data).cast("B")
        if len(view) == 0:
            return
        base = ctypes.addressof(self.memory.data_ptr(self.store).contents)
        src = (ctypes.c_char * len(view)).from_buffer_copy(view) if view.readonly else \
            (ctypes.c_char * len(view)).from_buffer(view)
        ctypes.memmove(base + ptr, src, len(view))

    def read_into(self, ptr: int, n: int, out: memoryview) -> None:
        if n == 0:
            return
        base = ctypes.addressof(self.memory.data_ptr(self.store).contents)
        ctypes.memmove((ctypes.c_char * n).from_buffer(out), base + ptr, n)

    def read(self, ptr: int, n: int) -> bytes:
        return ctypes.string_at(ctypes.addressof(self.memory.data_ptr(self.store).contents) + ptr, n)

    def call(self, fn, *args) -> int:
        """Call an export; u32 arguments above 2^31 are passed as the i32 with the same bits."""
        return fn(self.store, *(a - (1 << 32) if a >= 1 << 31 else a for a in args))


def load() -> _QZ:
    """Compile and instantiate qz.wasm once (raises ImportError/OSError/wasmtime errors if unavailable)."""
    global _instance
    with _lock:
        if _instance is None:
            _instance = _QZ(WASM_PATH)
        return _instance


def _raise(result: int, what: str) -> None:
    code = -result
    if code == NO_MEMORY:
        raise MemoryError(f"qz.wasm: no memory for the {what} scratch")
    raise CodecError(code, f"{what} failed in qz.wasm")


def _decode_to(qz: _QZ, chunk, out: memoryview | None) -> bytes | int:
    qz.call(qz.reset_heap)
    data = memoryview(chunk).cast("B")
    in_ptr = qz.alloc(len(data))
    qz.write(in_ptr, data)
    size = qz.call(qz.decoded_size, in_ptr, len(data))
    if size < 0:
        _raise(size, "decode")
    if out is not None and len(out) < size:
        raise CodecError(lzw.OUT_TOO_SMALL, f"output buffer has {len(out)} bytes, chunk needs {size}")
    out_ptr = qz.alloc(size)
    written = qz.call(qz.decode, in_ptr, len(data), out_ptr, size)
    if written < 0:
        _raise(written, "decode")
    if out is None:
        return qz.read(out_ptr, written)
    qz.read_into(out_ptr, written, out)
    return written


def decode_chunk(chunk) -> bytes:
    """Decode one chunk to its output-layout bytes; raise CodecError with the spec's error code."""
    qz = load()
    with _lock:
        return _decode_to(qz, chunk, None)


def decode_into(chunk, out) -> int:
    """Decode into a writable buffer of at least the chunk's output size; return the bytes written."""
    view = memoryview(out).cast("B")
    if view.readonly:
        raise TypeError("decode_into needs a writable buffer")
    qz = load()
    with _lock:
        return _decode_to(qz, chunk, view)


def encode_chunk(symbols, alphabet: int, layout: int, bias: int = 0, max_code_bits: int = 16,
                 reset_when_full: bool = True, method: int | None = None) -> bytes:
    """Same as converter.lzw.encode_chunk (same bytes, same errors), computed in qz.wasm."""
    data = lzw.as_symbol_bytes(symbols)
    if method not in (None, lzw.METHOD_LZW, lzw.METHOD_PACKED):
        raise CodecError(lzw.BAD_HEADER, f"method {method} is not one of None, METHOD_PACKED, METHOD_LZW")
    if not (0 <= alphabet <= 0xFFFF and 0 <= layout <= 0xFF and 0 <= bias <= 0xFF and 0 <= max_code_bits <= 0xFF
            and len(data) <= lzw.MAX_SYMBOLS):
        # out of the ranges the u32 ABI can carry faithfully: let the reference produce its error
        return lzw.encode_chunk(data, alphabet, layout, bias, max_code_bits, reset_when_full, method)
    flags = (ENC_RESET if reset_when_full else 0) | {None: 0, lzw.METHOD_LZW: ENC_FORCE_LZW,
                                                     lzw.METHOD_PACKED: ENC_FORCE_PACKED}[method]
    qz = load()
    with _lock:
        qz.call(qz.reset_heap)
        sym_ptr = qz.alloc(len(data))
        qz.write(sym_ptr, data)
        cap = qz.call(qz.encode_bound, len(data), layout, flags) & 0xFFFFFFFF
        out_ptr = qz.alloc(cap)
        written = qz.call(qz.encode, sym_ptr, len(data), alphabet, layout, bias, max_code_bits, flags, out_ptr, cap)
        if written < 0:
            _raise(written, "encode")
        return qz.read(out_ptr, written)
