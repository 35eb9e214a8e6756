"""Readable reference of the QZ chunk format (docs/lzw-format.md, version 1).

This module is the executable form of the specification: it favours clarity over speed. The fast path is
static/wasm/qz.c (used through converter/codec.py); both must give identical bytes and identical error codes,
which tests/golden/ pins. Decoding is pure Python (no numpy), so this file also runs under Pyodide.

A chunk is a 16-byte header followed by a payload:

    [magic "QZ"] [version] [method] [alphabet u16] [layout] [bias] [max_code_bits] [flags] [reserved u16] [n u32]
    [payload: packed output bytes (method 0) or an LSB-first stream of LZW codes (method 1)]

LZW in one paragraph: codes 0..A-1 are the single symbols, code A is CLEAR, new strings get A+1, A+2, ... up to
2**max_code_bits - 1. The k-th code after a reset (k = 0, 1, ...) is `bit_length(min(A + k, 2**mcb - 1))` bits
wide; a CLEAR is read with the current width, and must not be the first code after a reset (BAD_CODE). With
reset-when-full the encoder emits CLEAR as soon as its dictionary is full; with freeze-when-full it keeps the
dictionary. The decoder does not look at that flag: it simply adds no entry once full and obeys any CLEAR.
There is no end code: decoding stops after n_symbols symbols; the payload must then end in the current byte with
its unread bits zero (TRAILING otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass

from converter.errors import CodecError

# ---------------------------------------------------------------------------------------------------------------
# Constants of the format
# ---------------------------------------------------------------------------------------------------------------

MAGIC = b"QZ"
VERSION = 1
HEADER_SIZE = 16

METHOD_PACKED = 0
METHOD_LZW = 1

LAYOUT_U8 = 0  # one byte per symbol: (s - bias) mod 256
LAYOUT_U4 = 1  # two symbols per byte, low nibble first
LAYOUT_U2 = 2  # four symbols per byte, lowest crumb first

# layout -> (symbols per byte, largest alphabet it can hold)
LAYOUTS = {
    LAYOUT_U8: (1, 256),
    LAYOUT_U4: (2, 16),
    LAYOUT_U2: (4, 4),
}
LAYOUT_NAMES = {LAYOUT_U8: "u8", LAYOUT_U4: "u4", LAYOUT_U2: "u2"}

MIN_ALPHABET = 2
MAX_ALPHABET = 256
MIN_CODE_BITS = 9
MAX_CODE_BITS = 16
FLAG_RESET_WHEN_FULL = 0x01
MAX_SYMBOLS = 0xFFFF_FFFF  # n_symbols is a u32

# Error codes, shared with static/wasm/qz.c and the JS decoder.
OK = 0
BAD_HEADER = 1
TRUNCATED = 2
BAD_CODE = 3
OVERRUN = 4
TRAILING = 5
OUT_TOO_SMALL = 6
BAD_SYMBOL = 7
ERROR_NAMES = {
    OK: "OK",
    BAD_HEADER: "BAD_HEADER",
    TRUNCATED: "TRUNCATED",
    BAD_CODE: "BAD_CODE",
    OVERRUN: "OVERRUN",
    TRAILING: "TRAILING",
    OUT_TOO_SMALL: "OUT_TOO_SMALL",
    BAD_SYMBOL: "BAD_SYMBOL",
}
ERROR_CODES = {name: code for code, name in ERROR_NAMES.items()}


def layout_nbytes(layout: int, n_symbols: int) -> int:
    """Bytes of output for n_symbols symbols in `layout` (the last byte is zero-padded)."""
    if layout not in LAYOUTS:
        raise CodecError(BAD_HEADER, f"layout {layout} is not one of {sorted(LAYOUTS)}")
    per_byte, _ = LAYOUTS[layout]
    return (n_symbols + per_byte - 1) // per_byte


def code_width(alphabet: int, k: int, max_code_bits: int) -> int:
    """Width in bits of the k-th code after a reset: it holds A + k, the newest code that can be valid then."""
    return min(alphabet + k, (1 << max_code_bits) - 1).bit_length()


# ---------------------------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkHeader:
    """The 16-byte chunk header, validated."""

    version: int  # always 1
    method: int  # METHOD_PACKED or METHOD_LZW
    alphabet: int  # A: symbols are 0..A-1, 2 <= A <= 256
    layout: int  # LAYOUT_U8 / LAYOUT_U4 / LAYOUT_U2: the bytes the decoder writes
    bias: int  # LAYOUT_U8 only: output byte = (symbol - bias) mod 256
    max_code_bits: int  # LZW: 9..16; packed: 0
    flags: int  # LZW: bit 0 = reset-when-full; packed: 0
    n_symbols: int  # symbols in the chunk (may be 0)

    @property
    def reset_when_full(self) -> bool:
        return bool(self.flags & FLAG_RESET_WHEN_FULL)

    @property
    def output_nbytes(self) -> int:
        return layout_nbytes(self.layout, self.n_symbols)

    def to_bytes(self) -> bytes:
        return (MAGIC + bytes([self.version, self.method]) + self.alphabet.to_bytes(2, "little")
                + bytes([self.layout, self.bias, self.max_code_bits, self.flags, 0, 0])
                + self.n_symbols.to_bytes(4, "little"))


def _header_problem(h: ChunkHeader) -> str | None:
    """The first rule of the spec that `h` breaks, or None. Shared by the decoder and the encoder."""
    if h.version != VERSION:
        return f"version {h.version}, expected {VERSION}"
    if h.method not in (METHOD_PACKED, METHOD_LZW):
        return f"method {h.method} is not 0 (packed) or 1 (LZW)"
    if not MIN_ALPHABET <= h.alphabet <= MAX_ALPHABET:
        return f"alphabet {h.alphabet} outside {MIN_ALPHABET}..{MAX_ALPHABET}"
    if h.layout not in LAYOUTS:
        return f"layout {h.layout} is not one of {sorted(LAYOUTS)}"
    if h.alphabet > LAYOUTS[h.layout][1]:
        return f"alphabet {h.alphabet} does not fit layout {LAYOUT_NAMES[h.layout]} (max {LAYOUTS[h.layout][1]})"
    if not 0 <= h.bias <= 255 or (h.layout != LAYOUT_U8 and h.bias != 0):
        return f"bias {h.bias} (only layout u8 may have a bias, 0..255)"
    if not 0 <= h.n_symbols <= MAX_SYMBOLS:
        return f"n_symbols {h.n_symbols} does not fit a u32"
    if h.method == METHOD_PACKED:
        if h.max_code_bits != 0 or h.flags != 0:
            return f"packed chunk with max_code_bits {h.max_code_bits} / flags {h.flags} (both must be 0)"
        return None
    if not MIN_CODE_BITS <= h.max_code_bits <= MAX_CODE_BITS or (1 << h.max_code_bits) <= h.alphabet + 1:
        return f"max_code_bits {h.max_code_bits} outside {MIN_CODE_BITS}..{MAX_CODE_BITS}"
    if h.flags & ~FLAG_RESET_WHEN_FULL:
        return f"flags 0x{h.flags:02x} has bits other than bit 0"
    return None


def parse_header(chunk: bytes) -> ChunkHeader:
    """Read and validate the 16-byte header; raise CodecError(BAD_HEADER) naming the broken field."""
    if len(chunk) < HEADER_SIZE:
        raise CodecError(BAD_HEADER, f"chunk has {len(chunk)} bytes, shorter than the {HEADER_SIZE}-byte header")
    raw = bytes(chunk[:HEADER_SIZE])
    if raw[0:2] != MAGIC:
        raise CodecError(BAD_HEADER, f"magic {raw[0:2]!r} at offset 0, expected {MAGIC!r}")
    if raw[10:12] != b"\0\0":
        raise CodecError(BAD_HEADER, f"reserved bytes at offset 10 are {raw[10:12].hex()}, expected 0000")
    header = ChunkHeader(
        version=raw[2],
        method=raw[3],
        alphabet=int.from_bytes(raw[4:6], "little"),
        layout=raw[6],
        bias=raw[7],
        max_code_bits=raw[8],
        flags=raw[9],
        n_symbols=int.from_bytes(raw[12:16], "little"),
    )
    problem = _header_problem(header)
    if problem:
        raise CodecError(BAD_HEADER, problem)
    return header


# ---------------------------------------------------------------------------------------------------------------
# Output layouts: symbols <-> the bytes the runtime consumes
# ---------------------------------------------------------------------------------------------------------------


def pack_symbols(symbols: bytes, layout: int, bias: int = 0) -> bytes:
    """Symbols (one per byte) -> layout bytes. u4: s0 | s1 << 4; u2: s0 | s1 << 2 | s2 << 4 | s3 << 6."""
    symbols = bytes(symbols)
    if layout == LAYOUT_U8:
        if bias == 0:
            return symbols
        return symbols.translate(bytes((s - bias) & 0xFF for s in range(256)))
    per_byte, _ = LAYOUTS[layout]
    padded = symbols + b"\0" * (-len(symbols) % per_byte)  # missing trailing nibbles/crumbs are 0
    if layout == LAYOUT_U4:
        return bytes(s0 | s1 << 4 for s0, s1 in zip(padded[0::2], padded[1::2]))
    return bytes(s0 | s1 << 2 | s2 << 4 | s3 << 6
                 for s0, s1, s2, s3 in zip(padded[0::4], padded[1::4], padded[2::4], padded[3::4]))


def unpack_symbols(data: bytes, layout: int, bias: int, n_symbols: int) -> bytes:
    """Layout bytes -> the first n_symbols symbols (inverse of pack_symbols)."""
    if layout == LAYOUT_U8:
        if bias == 0:
            return bytes(data[:n_symbols])
        return bytes(data[:n_symbols]).translate(bytes((b + bias) & 0xFF for b in range(256)))
    per_byte, _ = LAYOUTS[layout]
    bits = 8 // per_byte
    mask = (1 << bits) - 1
    return bytes((data[i // per_byte] >> (bits * (i % per_byte))) & mask for i in range(n_symbols))


# ---------------------------------------------------------------------------------------------------------------
# Method 0: packed
# ---------------------------------------------------------------------------------------------------------------


def _decode_packed(h: ChunkHeader, payload: bytes) -> bytes:
    """Checks, in this order: payload length, zero padding bits of the last byte, every symbol < A."""
    expected = h.output_nbytes
    if len(payload) != expected:
        raise CodecError(TRAILING, f"packed payload has {len(payload)} bytes, layout needs {expected}")
    per_byte, _ = LAYOUTS[h.layout]
    used = h.n_symbols % per_byte  # symbols in a partial last byte (0: the last byte is full)
    if used and payload[-1] >> (used * (8 // per_byte)):
        raise CodecError(TRAILING, f"nonzero padding bits in packed byte {HEADER_SIZE + expected - 1}")
    symbols = unpack_symbols(payload, h.layout, h.bias, h.n_symbols)
    if symbols and max(symbols) >= h.alphabet:
        i = next(i for i, s in enumerate(symbols) if s >= h.alphabet)
        raise CodecError(BAD_SYMBOL, f"packed symbol {i} is {symbols[i]}, alphabet is {h.alphabet}")
    return bytes(payload)


# ---------------------------------------------------------------------------------------------------------------
# Method 1: LZW — bit stream
# ---------------------------------------------------------------------------------------------------------------


class _BitWriter:
    """Codes LSB-first: bit j of the stream is bit (j mod 8) of byte j div 8."""

    def __init__(self):
        self.out = bytearray()
        self.acc = 0  # pending bits, the oldest in bit 0
        self.nbits = 0

    def write(self, code: int, width: int) -> None:
        self.acc |= code << self.nbits
        self.nbits += width
        while self.nbits >= 8:
            self.out.append(self.acc & 0xFF)
            self.acc >>= 8
            self.nbits -= 8

    def finish(self) -> bytes:
        if self.nbits:
            self.out.append(self.acc)  # the unused high bits of the last byte are 0
        return bytes(self.out)


class _BitReader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0  # bytes moved into acc
        self.acc = 0
        self.nbits = 0
        self.bits_read = 0

    def read(self, width: int) -> int:
        while self.nbits < width:
            if self.pos >= len(self.data):
                raise CodecError(TRUNCATED, f"payload ends at bit {self.bits_read + self.nbits} inside a code")
            self.acc |= self.data[self.pos] << self.nbits
            self.pos += 1
            self.nbits += 8
        code = self.acc & ((1 << width) - 1)
        self.acc >>= width
        self.nbits -= width
        self.bits_read += width
        return code

    def check_end(self) -> None:
        """The payload must end in the byte of the last bit read, and that byte's unread bits must be 0."""
        used = (self.bits_read + 7) // 8
        if len(self.data) != used:
            raise CodecError(TRAILING, f"{len(self.data) - used} bytes after the last code (payload offset {used})")
        if self.acc:
            raise CodecError(TRAILING, f"nonzero padding bits after the last code (payload offset {used - 1})")


# ---------------------------------------------------------------------------------------------------------------
# Method 1: LZW — encoder and decoder
# ---------------------------------------------------------------------------------------------------------------


def _lzw_encode(symbols: bytes, alphabet: int, max_code_bits: int, reset_when_full: bool) -> bytes:
    """Greedy longest match. The dictionary maps (code of P, next symbol c) -> code of P+c."""
    clear = alphabet
    first_free = alphabet + 1  # codes 0..A-1 are symbols, A is CLEAR
    full = 1 << max_code_bits  # next == full: the dictionary is full
    writer = _BitWriter()
    dictionary: dict[int, int] = {}  # key = code(P) << 8 | c
    next_code = first_free
    k = 0  # codes written since the start or the last CLEAR
    prefix = -1  # code of P; -1 while P is empty
    for c in symbols:
        if prefix < 0:
            prefix = c
            continue
        extended = dictionary.get(prefix << 8 | c)
        if extended is not None:
            prefix = extended
            continue
        writer.write(prefix, code_width(alphabet, k, max_code_bits))
        k += 1
        if next_code < full:
            dictionary[prefix << 8 | c] = next_code
            next_code += 1
        prefix = c
        if next_code == full and reset_when_full:
            writer.write(clear, code_width(alphabet, k, max_code_bits))
            dictionary.clear()
            next_code = first_free
            k = 0
    if prefix >= 0:
        writer.write(prefix, code_width(alphabet, k, max_code_bits))
    return writer.finish()


def _lzw_decode(h: ChunkHeader, payload: bytes) -> bytes:
    """Decode to symbols (one per byte). Entries are kept as the strings themselves (bytes)."""
    alphabet, n = h.alphabet, h.n_symbols
    clear = alphabet
    full = 1 << h.max_code_bits
    singles = [bytes([s]) for s in range(alphabet)] + [b""]  # index A (CLEAR) is never looked up
    reader = _BitReader(payload)
    out = bytearray()
    table = list(singles)  # table[code] = its string; len(table) is the next entry code
    k = 0
    prev = b""  # the previous code's string
    while len(out) < n:
        width = code_width(alphabet, k, h.max_code_bits)
        code = reader.read(width)
        if k == 0:
            if code >= alphabet:  # includes CLEAR: the first code after a reset is a single symbol
                raise CodecError(BAD_CODE, f"code {code} right after a reset (alphabet {alphabet}), "
                                           f"payload bit {reader.bits_read - width}")
            string = table[code]
        elif code == clear:
            table = list(singles)
            k = 0
            prev = b""
            continue
        elif code < len(table):
            string = table[code]
            if len(table) < full:
                table.append(prev + string[:1])
        elif code == len(table) and len(table) < full:  # KwKwK: the code being defined right now
            string = prev + prev[:1]
            table.append(string)
        else:
            raise CodecError(BAD_CODE, f"code {code} is not in the dictionary (next entry {len(table)}), "
                                       f"code {k} after a reset, symbol {len(out)}")
        if len(out) + len(string) > n:
            raise CodecError(OVERRUN, f"code {code} writes {len(string)} symbols at symbol {len(out)}, "
                                      f"past n_symbols {n}")
        out += string
        prev = string
        k += 1
    reader.check_end()
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def as_symbol_bytes(symbols) -> bytes:
    """bytes / bytearray / memoryview / 1-D uint8 array (anything with a 1-byte buffer) -> bytes."""
    view = memoryview(symbols)
    if view.itemsize != 1 or view.ndim != 1:
        raise TypeError(f"symbols must be a 1-D buffer of bytes (uint8), got format {view.format!r}, "
                        f"ndim {view.ndim}")
    return view.tobytes()


def encode_params_header(n_symbols: int, alphabet: int, layout: int, bias: int, max_code_bits: int,
                         reset_when_full: bool, method: int) -> ChunkHeader:
    """The header encode_chunk will write; raises CodecError(BAD_HEADER) for bad parameters."""
    if method not in (METHOD_PACKED, METHOD_LZW):
        raise CodecError(BAD_HEADER, f"method {method} is not one of None, METHOD_PACKED, METHOD_LZW")
    lzw = method == METHOD_LZW
    header = ChunkHeader(version=VERSION, method=method, alphabet=alphabet, layout=layout, bias=bias,
                         max_code_bits=max_code_bits if lzw else 0,
                         flags=(FLAG_RESET_WHEN_FULL if reset_when_full else 0) if lzw else 0,
                         n_symbols=n_symbols)
    problem = _header_problem(header)
    if problem:
        raise CodecError(BAD_HEADER, problem)
    return header


def encode_chunk(symbols, alphabet: int, layout: int, bias: int = 0, max_code_bits: int = 16,
                 reset_when_full: bool = True, method: int | None = None) -> bytes:
    """Encode one chunk. method None: LZW unless its payload is larger than the packed one (a tie stays LZW).

    Bad parameters raise CodecError(BAD_HEADER); a symbol >= alphabet raises CodecError(BAD_SYMBOL).
    max_code_bits and reset_when_full are ignored when the chunk is stored packed.
    """
    data = as_symbol_bytes(symbols)
    want = METHOD_LZW if method is None else method
    header = encode_params_header(len(data), alphabet, layout, bias, max_code_bits, reset_when_full, want)
    if data and max(data) >= alphabet:
        i = next(i for i, s in enumerate(data) if s >= alphabet)
        raise CodecError(BAD_SYMBOL, f"symbol {i} is {data[i]}, alphabet is {alphabet}")
    packed = pack_symbols(data, layout, bias)
    if want == METHOD_LZW:
        payload = _lzw_encode(data, alphabet, max_code_bits, reset_when_full)
        if method is None and len(payload) > len(packed):
            header = encode_params_header(len(data), alphabet, layout, bias, 0, False, METHOD_PACKED)
            payload = packed
    else:
        payload = packed
    return header.to_bytes() + payload


def decode_chunk(chunk: bytes) -> bytes:
    """Decode one chunk to its output-layout bytes; raise CodecError with the spec's error code."""
    header = parse_header(chunk)
    payload = bytes(chunk[HEADER_SIZE:])
    if header.method == METHOD_PACKED:
        return _decode_packed(header, payload)
    return pack_symbols(_lzw_decode(header, payload), header.layout, header.bias)


def decode_into(chunk: bytes, out) -> int:
    """Decode into a writable buffer (at least output_nbytes long); return the bytes written."""
    header = parse_header(chunk)
    view = memoryview(out).cast("B")
    if len(view) < header.output_nbytes:
        raise CodecError(OUT_TOO_SMALL, f"output buffer has {len(view)} bytes, chunk needs {header.output_nbytes}")
    data = decode_chunk(chunk)
    view[:len(data)] = data
    return len(data)
