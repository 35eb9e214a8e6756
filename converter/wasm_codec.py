"""The QZ codec through static/wasm/qz.wasm (the same module the page runs), via wasmtime.

Same functions and semantics as converter/lzw.py, byte for byte; the ABI is documented at the top of
static/wasm/qz.c. The module is compiled once per process; calls are serialized with a lock (one wasm instance,
one heap). A call copies its input into an arena in wasm memory, makes one wasm call, and copies the result out.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path

from converter import lzw
from converter.errors import CodecError

WASM_PATH = Path(__file__).resolve().parent.parent / "static/wasm/qz.wasm"

NO_MEMORY = 64  # qz.c: scratch allocation failed (about this machine, not the chunk)
ENC_RESET = 0x1  # qz_encode flags (see the ABI at the top of qz.c)
ENC_FORCE_LZW = 0x100
ENC_FORCE_PACKED = 0x200
ENC_V2 = 0x400
ENC_ADAPTIVE = 0x800
ENC_PRIMED = 0x1000
ENC_V3 = 0x2000  # with ENC_V2: the primed dictionary may use an escape class (a version-3 chunk)
MODEL_MAX_SIZE = lzw.MODEL_FIXED_SIZE + 256 + 256  # the largest primed model block

_lock = threading.Lock()
_instance: "_QZ | None" = None


class _QZ:
    """One instantiated qz.wasm: its store, memory and exported functions, plus an arena for call arguments.

    Each wasmtime call from Python costs tens of microseconds, so a decode or encode is one call: the arena (one
    qz_alloc'd block, regrown only when a bigger chunk comes) holds the input then the output, and qz.c takes its
    own decode scratch from the heap above it.
    """

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
        self.arena = 0  # wasm address of the arena
        self.arena_size = 0

    def alloc(self, n: int) -> int:
        ptr = self.call(self._alloc, n)
        if ptr == 0:
            raise MemoryError(f"qz.wasm could not grow its memory by {n} bytes")
        return ptr

    def ensure_arena(self, n: int) -> int:
        """An arena of at least n bytes; returns its address. Growing it forgets the old one (reset_heap)."""
        if n > self.arena_size:
            size = max(n, self.arena_size * 3 // 2, 1 << 20)
            self.call(self.reset_heap)
            self.arena, self.arena_size = 0, 0
            self.arena = self.alloc(size)
            self.arena_size = size
        return self.arena

    def base(self) -> int:
        """Host address of wasm memory (re-read after every call: memory.grow may move it)."""
        return ctypes.addressof(self.memory.data_ptr(self.store).contents)

    def write(self, ptr: int, data) -> None:
        """Copy a bytes-like object into wasm memory at ptr."""
        view = memoryview(data).cast("B")
        if len(view) == 0:
            return
        src = (ctypes.c_char * len(view)).from_buffer_copy(view) if view.readonly else \
            (ctypes.c_char * len(view)).from_buffer(view)
        ctypes.memmove(self.base() + ptr, src, len(view))

    def read_into(self, ptr: int, n: int, out: memoryview) -> None:
        if n:
            ctypes.memmove((ctypes.c_char * n).from_buffer(out), self.base() + ptr, n)

    def read(self, ptr: int, n: int) -> bytes:
        return ctypes.string_at(self.base() + ptr, n)

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


def _declared_output(data: memoryview) -> int:
    """Output bytes the header asks for, read without validating it (qz_decode does); 0 if unreadable, and 0
    above 2^31 - 1 (qz_decode then answers OUT_TOO_SMALL, or BAD_HEADER for a bad header)."""
    if len(data) < lzw.HEADER_SIZE or data[6] not in lzw.LAYOUTS:
        return 0
    size = lzw.layout_nbytes(data[6], int.from_bytes(data[12:16], "little"))
    return size if size <= 0x7FFF_FFFF else 0


def _decode_to(qz: _QZ, chunk, out: memoryview | None) -> bytes | int:
    data = memoryview(chunk).cast("B")
    size = _declared_output(data)
    cap = size if out is None else min(size, len(out))  # a short `out` gets OUT_TOO_SMALL from qz_decode
    in_len = (len(data) + 15) & ~15
    arena = qz.ensure_arena(in_len + cap)
    qz.write(arena, data)
    written = qz.call(qz.decode, arena, len(data), arena + in_len, cap)
    if written < 0:
        _raise(written, "decode")
    if out is None:
        return qz.read(arena + in_len, written)
    qz.read_into(arena + in_len, written, out)
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


def encode_bound(n: int, layout: int, flags: int) -> int:
    """The out_cap qz_encode needs (mirrors qz_encode_bound in qz.c, without a call into wasm)."""
    packed = lzw.layout_nbytes(layout if layout in lzw.LAYOUTS else lzw.LAYOUT_U8, n)
    return min(lzw.HEADER_SIZE + (4 * n + 8 + MODEL_MAX_SIZE if flags & ENC_FORCE_LZW else packed), 0xFFFF_FFFF)


def encode_chunk(symbols, alphabet: int, layout: int, bias: int = 0, max_code_bits: int = 16,
                 reset_when_full: bool = True, method: int | None = None, *, version: int = lzw.VERSION,
                 dictionary: int | None = None) -> bytes:
    """Same as converter.lzw.encode_chunk (same bytes, same errors), computed in qz.wasm."""
    data = lzw.as_symbol_bytes(symbols)
    if method not in (None, lzw.METHOD_LZW, lzw.METHOD_PACKED):
        raise CodecError(lzw.BAD_HEADER, f"method {method} is not one of None, METHOD_PACKED, METHOD_LZW")
    if not (0 <= alphabet <= 0xFFFF and 0 <= layout <= 0xFF and 0 <= bias <= 0xFF and 0 <= max_code_bits <= 0xFF
            and len(data) <= lzw.MAX_SYMBOLS and version in lzw.VERSIONS
            and dictionary in (None, lzw.DICT_ADAPTIVE, lzw.DICT_PRIMED)
            and not (version == 1 and dictionary == lzw.DICT_PRIMED)):
        # out of what the u32 ABI can carry faithfully: let the reference produce its error
        return lzw.encode_chunk(data, alphabet, layout, bias, max_code_bits, reset_when_full, method,
                                version=version, dictionary=dictionary)
    flags = (ENC_RESET if reset_when_full else 0) | {None: 0, lzw.METHOD_LZW: ENC_FORCE_LZW,
                                                     lzw.METHOD_PACKED: ENC_FORCE_PACKED}[method]
    if version >= 2:
        flags |= ENC_V2 | {None: 0, lzw.DICT_ADAPTIVE: ENC_ADAPTIVE, lzw.DICT_PRIMED: ENC_PRIMED}[dictionary]
    if version >= 3:
        flags |= ENC_V3
    qz = load()
    with _lock:
        sym_len = (len(data) + 15) & ~15
        cap = encode_bound(len(data), layout, flags)
        arena = qz.ensure_arena(sym_len + cap)
        qz.write(arena, data)
        written = qz.call(qz.encode, arena, len(data), alphabet, layout, bias, max_code_bits, flags,
                          arena + sym_len, cap)
        if written < 0:
            _raise(written, "encode")
        return qz.read(arena + sym_len, written)
