"""Readable reference of the QZ chunk format (docs/lzw-format.md, versions 1, 2 and 3).

This module is the executable form of the specification: it favours clarity over speed. The fast path is
static/wasm/qz.c (used through converter/codec.py); both must give identical bytes and identical error codes,
which tests/golden/ pins. Decoding is pure Python (no numpy), so this file also runs under Pyodide.

A chunk is a 16-byte header, for a primed chunk a model block, then a payload:

    [magic "QZ"] [version] [method] [alphabet u16] [layout] [bias] [max_code_bits] [flags] [dictionary] [0] [n u32]
    [model block: primed dictionary only]
    [payload: packed output bytes (method 0) or dictionary codes (method 1)]

Method 1 codes index a dictionary of symbol strings (the LZW family). Header byte 10 (version 2; reserved in
version 1) says which dictionary:

  adaptive (0), the v1 LZW: codes 0..A-1 are the single symbols, code A is CLEAR, new strings get A+1, A+2, ...
  up to 2**max_code_bits - 1. The k-th code after a reset is `bit_length(min(A + k, 2**mcb - 1))` bits wide; a
  CLEAR is read with the current width and must not be the first code after a reset (BAD_CODE). The decoder
  adds no entry once full and obeys any CLEAR; there is no end code; the payload ends in the current byte with
  its unread bits zero (TRAILING otherwise).

  primed (1): the dictionary is fixed before the first code: the leaves of a Tunstall tree that both sides build
  from the model block (symbols ranked by frequency, the top ranks grouped in classes of 2**k, one small integer
  cost per class). Every code is max_code_bits wide. The low k bits of each symbol's rank are stored raw in a
  section before the codes, so the tree only has to parse the class stream. Version 3: the tree's last class may
  be an escape for all the rarer classes, whose true index follows the codes as escape_bits raw bits each.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from converter.errors import CodecError

# ---------------------------------------------------------------------------------------------------------------
# Constants of the format
# ---------------------------------------------------------------------------------------------------------------

MAGIC = b"QZ"
VERSION = 3  # what encode_chunk may write unless told otherwise (a version-3 chunk only when it uses an escape)
VERSIONS = (1, 2, 3)  # what the decoders accept
HEADER_SIZE = 16  # the fixed header; a primed chunk follows it with its model block (ChunkHeader.header_size)

METHOD_PACKED = 0
METHOD_LZW = 1  # dictionary codes (the LZW family); header byte 10 says which dictionary
METHOD_NAMES = {METHOD_PACKED: "packed", METHOD_LZW: "lzw"}

DICT_ADAPTIVE = 0  # the v1 LZW dictionary, grown while decoding (the only one in version 1)
DICT_PRIMED = 1  # a Tunstall tree built from the chunk's model block (version 2)
DICTIONARY_NAMES = {DICT_ADAPTIVE: "adaptive", DICT_PRIMED: "primed"}

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

# Primed dictionary (docs/lzw-format.md, "Primed dictionary")
MODEL_FIXED_SIZE = 8  # split_bits, reserved, classes u16, threshold u16, extra u16; then perm[A], costs[M]
MAX_SPLIT_BITS = 7
COST_UNITS_PER_BIT = 16  # class costs are -log2(probability) in 1/16 bit
MIN_COST, MAX_COST = 1, 255
MAX_PHRASE = 64  # longest dictionary string: a node of depth 63 may be expanded, one of depth 64 is a leaf
MAX_THRESHOLD = 0xFFFF
MAX_ESCAPE_BITS = 8  # version 3: raw bits of an escaped class
# Encoder policy (not format rules): the widths and splits it tries
PRIMED_CODE_BITS = 12  # widest primed code the encoder uses ...
PRIMED_WIDTH_TRIES = 3  # ... and how many narrower widths it also tries
PRIMED_MAX_CLASSES = 64  # split_bits candidates keep at most this many classes
ESCAPE_CLASS_TRIES = (2, 3, 4, 6, 8)  # version 3: tree classes (the escape included) the encoder tries

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
    """Adaptive LZW: width of the k-th code after a reset; it holds A + k, the newest code that can be valid."""
    return min(alphabet + k, (1 << max_code_bits) - 1).bit_length()


# ---------------------------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrimedModel:
    """The model block of a primed chunk: everything the decoder needs to build the dictionary.

    Symbols are ranked by decreasing frequency (perm[rank] = symbol). Rank r belongs to class r >> split_bits;
    the tree parses classes 0..classes-1 and the low split_bits of each rank are stored raw.
    """

    split_bits: int  # k, 0..7: raw low bits of each rank (A must be a multiple of 2**k)
    classes: int  # M, 2 <= M <= A >> k: classes the tree knows (higher classes never occur)
    threshold: int  # T: a node is expanded when its cost is <= T ...
    extra: int  # E: ... or when its cost is T + 1 and fewer than E such nodes were expanded before it
    perm: bytes  # A bytes, a permutation of 0..A-1: perm[rank] = symbol
    costs: bytes  # M bytes, 1..255: cost of class c in 1/16 bit (about -16 * log2 of its probability)
    escape_bits: int = 0  # version 3, model byte 1 (0 in version 2): class M-1 is an escape, see _escapes

    @property
    def nbytes(self) -> int:
        return MODEL_FIXED_SIZE + len(self.perm) + len(self.costs)

    def to_bytes(self) -> bytes:
        return (bytes([self.split_bits, self.escape_bits]) + self.classes.to_bytes(2, "little")
                + self.threshold.to_bytes(2, "little") + self.extra.to_bytes(2, "little") + self.perm + self.costs)


@dataclass(frozen=True)
class ChunkHeader:
    """The 16-byte chunk header (plus, for a primed chunk, its model block), validated."""

    version: int  # 1, 2 or 3
    method: int  # METHOD_PACKED or METHOD_LZW
    alphabet: int  # A: symbols are 0..A-1, 2 <= A <= 256
    layout: int  # LAYOUT_U8 / LAYOUT_U4 / LAYOUT_U2: the bytes the decoder writes
    bias: int  # LAYOUT_U8 only: output byte = (symbol - bias) mod 256
    max_code_bits: int  # adaptive: 9..16 (widest code); primed: 9..16 (every code); packed: 0
    flags: int  # adaptive: bit 0 = reset-when-full; primed and packed: 0
    n_symbols: int  # symbols in the chunk (may be 0)
    dictionary: int = DICT_ADAPTIVE  # method 1 of version 2 / 3: DICT_ADAPTIVE or DICT_PRIMED; otherwise 0
    model: PrimedModel | None = None  # DICT_PRIMED only

    @property
    def reset_when_full(self) -> bool:
        return bool(self.flags & FLAG_RESET_WHEN_FULL)

    @property
    def primed(self) -> bool:
        return self.method == METHOD_LZW and self.dictionary == DICT_PRIMED

    @property
    def output_nbytes(self) -> int:
        return layout_nbytes(self.layout, self.n_symbols)

    @property
    def header_size(self) -> int:
        """Bytes before the payload: 16, plus the model block of a primed chunk."""
        return HEADER_SIZE + (self.model.nbytes if self.model is not None else 0)

    def to_bytes(self) -> bytes:
        """The header bytes, model block included."""
        return (MAGIC + bytes([self.version, self.method]) + self.alphabet.to_bytes(2, "little")
                + bytes([self.layout, self.bias, self.max_code_bits, self.flags, self.dictionary, 0])
                + self.n_symbols.to_bytes(4, "little") + (self.model.to_bytes() if self.model is not None else b""))


def _header_problem(h: ChunkHeader) -> str | None:
    """The first rule of the spec that `h` breaks, or None. Shared by the decoder and the encoder."""
    return _fixed_problem(h) or _method_problem(h)


def _fixed_problem(h: ChunkHeader) -> str | None:
    """The rules every chunk follows: version, method, alphabet, layout, bias, n_symbols."""
    if h.version not in VERSIONS:
        return f"version {h.version}, expected one of {VERSIONS}"
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
    return None


def _method_problem(h: ChunkHeader) -> str | None:
    """The rules of the method and dictionary: max_code_bits, flags, dictionary, the model block."""
    if h.method == METHOD_PACKED:
        if h.max_code_bits != 0 or h.flags != 0 or h.dictionary != 0:
            return (f"packed chunk with max_code_bits {h.max_code_bits} / flags {h.flags} / dictionary "
                    f"{h.dictionary} (all must be 0)")
        return None
    if h.dictionary == DICT_ADAPTIVE:
        if not MIN_CODE_BITS <= h.max_code_bits <= MAX_CODE_BITS or (1 << h.max_code_bits) <= h.alphabet + 1:
            return f"max_code_bits {h.max_code_bits} outside {MIN_CODE_BITS}..{MAX_CODE_BITS}"
        if h.flags & ~FLAG_RESET_WHEN_FULL:
            return f"flags 0x{h.flags:02x} has bits other than bit 0"
        return None
    if h.dictionary != DICT_PRIMED or h.version < 2:
        return f"dictionary {h.dictionary} is not 0 (adaptive) or, in version 2, 1 (primed)"
    if not MIN_CODE_BITS <= h.max_code_bits <= MAX_CODE_BITS:
        return f"primed code width {h.max_code_bits} outside {MIN_CODE_BITS}..{MAX_CODE_BITS}"
    if h.flags != 0:
        return f"primed chunk with flags 0x{h.flags:02x} (must be 0)"
    return _model_problem(h.model, h.alphabet, h.version)


def _model_problem(m: PrimedModel | None, alphabet: int, version: int = 2) -> str | None:
    """The static rules of a model block (the tree-size rules are checked while the tree is built)."""
    if m is None:
        return "primed chunk without a model block"
    if not 0 <= m.split_bits <= MAX_SPLIT_BITS or alphabet % (1 << m.split_bits):
        return f"split_bits {m.split_bits}: must be 0..{MAX_SPLIT_BITS} with 2**split_bits dividing {alphabet}"
    if not 2 <= m.classes <= alphabet >> m.split_bits or len(m.costs) != m.classes:
        return f"classes {m.classes} outside 2..{alphabet >> m.split_bits} (alphabet {alphabet} >> {m.split_bits})"
    if not 0 <= m.threshold <= MAX_THRESHOLD or not 0 <= m.extra <= 0xFFFF:
        return f"threshold {m.threshold} / extra {m.extra} do not fit a u16"
    if len(m.perm) != alphabet or sorted(m.perm) != list(range(alphabet)):
        return f"the rank table is not a permutation of 0..{alphabet - 1}"
    if any(not MIN_COST <= c <= MAX_COST for c in m.costs):
        return f"class costs must be {MIN_COST}..{MAX_COST}, got {list(m.costs)}"
    if m.escape_bits and (version < 3 or m.escape_bits > MAX_ESCAPE_BITS):
        return (f"escape_bits {m.escape_bits}: 0 in version {version}" if version < 3
                else f"escape_bits {m.escape_bits} above {MAX_ESCAPE_BITS}")
    return None


def parse_header(chunk: bytes) -> ChunkHeader:
    """Read and validate the header (and a primed chunk's model block); raise CodecError(BAD_HEADER) naming the
    broken field. The dictionary itself is built (and its size rules checked) only when decoding."""
    if len(chunk) < HEADER_SIZE:
        raise CodecError(BAD_HEADER, f"chunk has {len(chunk)} bytes, shorter than the {HEADER_SIZE}-byte header")
    raw = bytes(chunk[:HEADER_SIZE])
    if raw[0:2] != MAGIC:
        raise CodecError(BAD_HEADER, f"magic {raw[0:2]!r} at offset 0, expected {MAGIC!r}")
    version = raw[2]
    if version not in VERSIONS:
        raise CodecError(BAD_HEADER, f"version {version} at offset 2, expected one of {VERSIONS}")
    reserved = raw[10:12] if version == 1 else raw[11:12]  # versions 2, 3 use byte 10 for the dictionary
    if any(reserved):
        raise CodecError(BAD_HEADER, f"reserved bytes at offset {12 - len(reserved)} are {reserved.hex()}, "
                                     f"expected zeros")
    header = ChunkHeader(
        version=version,
        method=raw[3],
        alphabet=int.from_bytes(raw[4:6], "little"),
        layout=raw[6],
        bias=raw[7],
        max_code_bits=raw[8],
        flags=raw[9],
        n_symbols=int.from_bytes(raw[12:16], "little"),
        dictionary=raw[10] if version >= 2 else DICT_ADAPTIVE,
    )
    if header.primed:
        header = _with_model(header, chunk)
    problem = _header_problem(header)
    if problem:
        raise CodecError(BAD_HEADER, problem)
    return header


def _with_model(header: ChunkHeader, chunk: bytes) -> ChunkHeader:
    """Read the model block of a primed chunk (after checking the fixed fields it depends on)."""
    fixed = _fixed_problem(header)
    if fixed:  # a bad alphabet: report it before trusting it to size the model block
        raise CodecError(BAD_HEADER, fixed)
    a = header.alphabet
    end = HEADER_SIZE + MODEL_FIXED_SIZE
    if len(chunk) < end:
        raise CodecError(BAD_HEADER, f"chunk has {len(chunk)} bytes, ends inside the model block at offset 16")
    raw = bytes(chunk[HEADER_SIZE:end])
    if raw[1] != 0 and header.version < 3:
        raise CodecError(BAD_HEADER, f"model reserved byte at offset 17 is {raw[1]}, expected 0 in version "
                                     f"{header.version}")
    classes = int.from_bytes(raw[2:4], "little")
    if len(chunk) < end + a + classes:
        raise CodecError(BAD_HEADER, f"chunk has {len(chunk)} bytes, model block needs {end + a + classes}")
    model = PrimedModel(split_bits=raw[0], classes=classes, threshold=int.from_bytes(raw[4:6], "little"),
                        extra=int.from_bytes(raw[6:8], "little"), perm=bytes(chunk[end:end + a]),
                        costs=bytes(chunk[end + a:end + a + classes]), escape_bits=raw[1])
    return dataclasses.replace(header, model=model)


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
# Method 1, primed dictionary: the Tunstall tree
# ---------------------------------------------------------------------------------------------------------------
#
# The tree parses class strings. The root is expanded; a node is expanded (gets one child per class 0..M-1, in
# that order) when its depth is below MAX_PHRASE and its cost (the sum of its classes' costs) is <= T, or is T + 1
# while fewer than E nodes of cost T + 1 have been expanded before it in depth-first preorder. Every node that is
# not expanded is a leaf; the leaves, numbered in preorder, are the codes. Each class string has exactly one leaf
# that is a prefix of it (or that it is a prefix of, at the end of the chunk), so parsing is greedy and unique.
#
#     root ─┬─ 0 ─┬─ 00 ─┬─ 000 ─┬─ 0000      M = 3 classes, costs (8, 25, 25), T = 24, E = 0:
#           │     │      │       ├─ 0001      expanded: root, "0", "00", "000" (costs 0, 8, 16, 24)
#           │     │      │       └─ 0002      leaves = codes 0..8, in preorder:
#           │     │      ├─ 001               "0000" "0001" "0002" "001" "002" "01" "02" "1" "2"
#           │     │      └─ 002               (with E = 1, "1", the first node of cost 25, is expanded too)
#           │     ├─ 01
#           │     └─ 02
#           ├─ 1
#           └─ 2


def _primed_tree(costs: bytes | list[int], threshold: int, extra: int, width: int) -> tuple[list[bytes], list[int]]:
    """Build the tree; return (leaves, table).

    leaves[code] = the leaf's class string. table[node * M + c] = the child of internal node `node` (preorder
    number, root 0) for class c: an internal node number (>= 0) or ~code of a leaf (< 0).
    Raises CodecError(BAD_HEADER) if the tree has more than 2**width leaves or fewer than `extra` nodes of cost
    T + 1 could be expanded.
    """
    m = len(costs)
    limit = 1 << width
    leaves: list[bytes] = []
    table: list[int] = []
    expanded_extra = 0

    def expand(cost: int, path: bytes) -> int:
        nonlocal expanded_extra
        node = len(table) // m
        table.extend([0] * m)
        for c in range(m):
            child = cost + costs[c]
            if len(path) + 1 < MAX_PHRASE and (child <= threshold or (child == threshold + 1
                                                                      and expanded_extra < extra)):
                expanded_extra += child == threshold + 1
                table[node * m + c] = expand(child, path + bytes([c]))
            else:
                if len(leaves) == limit:
                    raise CodecError(BAD_HEADER, f"the primed dictionary has more than 2**{width} leaves "
                                                 f"(threshold {threshold}, extra {extra})")
                table[node * m + c] = ~len(leaves)
                leaves.append(path + bytes([c]))
        return node

    expand(0, b"")
    if expanded_extra != extra:
        raise CodecError(BAD_HEADER, f"extra {extra}, but only {expanded_extra} nodes of cost threshold + 1 exist")
    return leaves, table


def _tree_size(costs: list[int], threshold: int, limit: int) -> tuple[int, int] | None:
    """(leaves, nodes of cost T + 1 that could be expanded) of the tree with extra = 0; None past `limit` leaves."""
    leaves = eligible = 0
    stack = [(0, 0)]  # (cost, depth) of expanded nodes
    while stack:
        cost, depth = stack.pop()
        for c in costs:
            child = cost + c
            if depth + 1 < MAX_PHRASE and child <= threshold:
                stack.append((child, depth + 1))
                continue
            leaves += 1
            eligible += depth + 1 < MAX_PHRASE and child == threshold + 1
            if leaves > limit:
                return None
    return leaves, eligible


def _choose_threshold(costs: list[int], width: int) -> tuple[int, int]:
    """The encoder's (T, E): the largest T whose tree (E = 0) has at most 2**width leaves, then the largest E.

    Fast path: while no string of cost <= T + 1 is MAX_PHRASE long, the number of strings of cost <= b is
    N(b) = 1 + sum_c N(b - cost_c), and a tree that expands them all has 1 + (M - 1) * N(T) leaves.
    Otherwise the depth cap matters and the trees are counted one by one (binary search on T).
    """
    m, limit = len(costs), 1 << width
    n_at: list[int] = []  # n_at[b] = N(b)
    b = 0
    while True:
        nb = 1 + sum(n_at[b - c] for c in costs if c <= b)
        if 1 + (m - 1) * nb > limit or b > MAX_THRESHOLD:
            break
        n_at.append(nb)
        b += 1
    t = b - 1
    if MAX_PHRASE * min(costs) > t + 1:  # every string of cost <= T + 1 is shorter than MAX_PHRASE
        leaves, eligible = 1 + (m - 1) * n_at[t], nb - n_at[t]
    else:
        if _tree_size(costs, MAX_THRESHOLD, limit) is not None:
            t = MAX_THRESHOLD
        else:
            lo, hi = t, MAX_THRESHOLD  # lo fits (the cap only removes leaves), hi does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if _tree_size(costs, mid, limit) is not None else (lo, mid)
            t = lo
        leaves, eligible = _tree_size(costs, t, limit)
    return t, min(eligible, (limit - leaves) // (m - 1))


# ---------------------------------------------------------------------------------------------------------------
# Method 1, primed dictionary: model, encoder, decoder
# ---------------------------------------------------------------------------------------------------------------


def log2_q16(x: int) -> int:
    """floor(log2(x) * 2**16) for 1 <= x < 2**33, up to the last bit, in integers only (qz.c does the same steps).

    x = 2**e * m with m in [1, 2): each squaring of m doubles its log; when m*m passes 2, one more bit is 1.
    """
    e = x.bit_length() - 1
    m = x << (31 - e) if e <= 31 else x >> (e - 31)  # m / 2**31 in [1, 2)
    frac = 0
    for _ in range(16):
        m = (m * m) >> 31
        frac <<= 1
        if m >= 1 << 32:
            m >>= 1
            frac |= 1
    return e << 16 | frac


def class_cost(count: int, total: int) -> int:
    """round(16 * log2(total / count)) clamped to 1..255; 255 for a class that never occurs."""
    if count == 0:
        return MAX_COST
    return min(MAX_COST, max(MIN_COST, (log2_q16(total) - log2_q16(count) + (1 << 11)) >> 12))


def _rank_symbols(data: bytes, alphabet: int) -> tuple[list[int], bytes]:
    """(counts, perm): perm lists the symbols by decreasing count, ties by symbol value."""
    counts = [data.count(s) for s in range(alphabet)]
    perm = bytes(sorted(range(alphabet), key=lambda s: (-counts[s], s)))
    return counts, perm


def class_counts_of(counts: list[int], perm: bytes, split_bits: int) -> list[int]:
    """Symbol counts summed per class (classes in rank order, so their counts never increase)."""
    group = 1 << split_bits
    return [sum(counts[s] for s in perm[j * group:(j + 1) * group]) for j in range(len(perm) >> split_bits)]


def fit_model(counts: list[int], perm: bytes, split_bits: int, width: int, tree_classes: int = 0) -> PrimedModel:
    """The model the encoder writes for these counts: class costs from the class counts, then T and E.
    tree_classes > 0 (version 3): the tree knows that many classes, the last one the escape standing for all the
    used classes from it on (escape_bits wide enough to number them)."""
    cc = class_counts_of(counts, perm, split_bits)
    used = max(2, sum(1 for c in cc if c))  # classes are in decreasing count order: zeros come last
    total = sum(counts)
    escape_bits = 0
    if tree_classes:
        escape_bits = max(1, (used - tree_classes).bit_length())  # escaped values 0 .. used - tree_classes
        cc = cc[:tree_classes - 1] + [sum(cc[tree_classes - 1:])]
        used = tree_classes
    costs = [class_cost(c, total) for c in cc[:used]]
    threshold, extra = _choose_threshold(costs, width)
    return PrimedModel(split_bits, used, threshold, extra, perm, bytes(costs), escape_bits)


def escape_candidates(counts: list[int], perm: bytes, alphabet: int) -> list[tuple[int, int]]:
    """(split_bits, tree classes) the version-3 encoder tries: every split with at least 2 classes (no
    PRIMED_MAX_CLASSES cap: the tree sees only the few classes before the escape), each ESCAPE_CLASS_TRIES
    count that leaves at least two used classes behind the escape."""
    out = []
    for k in range(MAX_SPLIT_BITS + 1):
        if alphabet % (1 << k) or alphabet >> k < 2:
            continue
        used = sum(1 for c in class_counts_of(counts, perm, k) if c)
        out += [(k, m) for m in ESCAPE_CLASS_TRIES if m < used]
    return out


def _primed_parse(classes: bytes, table: list[int], m: int) -> list[int]:
    """Greedy parse of a class string into leaf codes. A phrase cut short by the end of the chunk is sent as the
    first leaf below its node (always following class 0); the decoder drops what passes n_symbols."""
    codes = []
    node = 0
    for c in classes:
        ref = table[node * m + c]
        if ref < 0:
            codes.append(~ref)
            node = 0
        else:
            node = ref
    if node:
        while node >= 0:
            node = table[node * m]
        codes.append(~node)
    return codes


def _write_fields(values, width: int) -> bytes:
    writer = _BitWriter()
    for v in values:
        writer.write(v, width)
    return writer.finish()


def _primed_candidate(data: bytes, ranks: bytes, counts: list[int], perm: bytes, split_bits: int,
                      width: int, tree_classes: int = 0) -> tuple[int, PrimedModel, list[int]]:
    """(chunk size, model, codes) of one (split_bits, width[, tree classes]) choice."""
    model = fit_model(counts, perm, split_bits, width, tree_classes)
    _, table = _primed_tree(model.costs, model.threshold, model.extra, width)
    top = model.classes - 1
    classes = ranks.translate(bytes(min((r >> split_bits) & 0xFF, top) if model.escape_bits else (r >> split_bits)
                                    & 0xFF for r in range(256)))
    codes = _primed_parse(classes, table, model.classes)
    n = len(data)
    escaped = classes.count(top) if model.escape_bits else 0
    size = (HEADER_SIZE + model.nbytes + (n * split_bits + 7) // 8 + (len(codes) * width + 7) // 8
            + (escaped * model.escape_bits + 7) // 8)
    return size, model, codes


def primed_split_candidates(alphabet: int) -> list[int]:
    """split_bits the encoder tries: 2**k divides A and 2 <= A >> k <= PRIMED_MAX_CLASSES (or just 0)."""
    ks = [k for k in range(MAX_SPLIT_BITS + 1)
          if alphabet % (1 << k) == 0 and 2 <= alphabet >> k <= PRIMED_MAX_CLASSES]
    return ks or [0]


def _primed_encode(data: bytes, alphabet: int, max_code_bits: int,
                   escapes: bool = False) -> tuple[int, PrimedModel, bytes]:
    """Choose (split_bits, width) by the smallest chunk and encode: (width, model, payload).

    Candidates, in this order (the first of equal sizes wins): every split_bits of primed_split_candidates at
    width W = min(max_code_bits, PRIMED_CODE_BITS); then, with the best split_bits, widths W-1 down to
    W-PRIMED_WIDTH_TRIES (not below MIN_CODE_BITS). With `escapes`, the same search over the escape_candidates
    pairs (then the best pair at the narrower widths) runs apart, and its chunk of S bytes replaces the first one
    only if S + S // 64 is smaller (an escape chunk decodes 1.3-1.5x slower: it must pay for that).
    """
    counts, perm = _rank_symbols(data, alphabet)
    rank_of = bytearray(256)
    for r, s in enumerate(perm):
        rank_of[s] = r
    ranks = data.translate(bytes(rank_of))
    top = min(max_code_bits, PRIMED_CODE_BITS)
    narrower = range(top - 1, max(MIN_CODE_BITS, top - PRIMED_WIDTH_TRIES) - 1, -1)

    def search(candidates):
        best = None
        for k, m in candidates:
            cand = _primed_candidate(data, ranks, counts, perm, k, top, m) + (top,)
            if best is None or cand[0] < best[0]:
                best = cand
        if best is not None:
            k, m = best[1].split_bits, best[1].classes if best[1].escape_bits else 0
            for width in narrower:
                cand = _primed_candidate(data, ranks, counts, perm, k, width, m) + (width,)
                if cand[0] < best[0]:
                    best = cand
        return best

    best = search([(k, 0) for k in primed_split_candidates(alphabet)])
    if escapes:  # a separate search, taken only when >= 1/64 smaller (escapes cost decode time): never larger
        esc = search(escape_candidates(counts, perm, alphabet))
        if esc is not None and esc[0] + (esc[0] >> 6) < best[0]:
            best = esc
    _, model, codes, width = best
    k = model.split_bits
    mask = (1 << k) - 1
    low = _write_fields((r & mask for r in ranks), k) if k else b""
    escaped = b""
    if model.escape_bits:
        top_class = model.classes - 1
        escaped = _write_fields(((r >> k) - top_class for r in ranks if r >> k >= top_class), model.escape_bits)
    return width, model, low + _write_fields(codes, width) + escaped


def _escapes(classes: bytearray, model: PrimedModel, alphabet: int, section: bytes, offset: int) -> bytearray:
    """Version 3: each class M-1 (the escape), in order, becomes M-1 + the next escape_bits of `section` (the
    payload from `offset` on), which must hold exactly those bits; an escaped class must be < A >> k."""
    top, e, limit = model.classes - 1, model.escape_bits, alphabet >> model.split_bits
    reader = _BitReader(section)
    for i, c in enumerate(classes):
        if c == top:
            try:
                true = top + reader.read(e)
            except CodecError:
                raise CodecError(TRUNCATED, f"the escape section (payload offset {offset}) ends before the escape "
                                            f"of symbol {i}") from None
            if true >= limit:
                raise CodecError(BAD_CODE, f"escaped class {true} of symbol {i} is not below {limit} "
                                           f"(alphabet {alphabet} >> {model.split_bits})")
            classes[i] = true
    used = (reader.bits_read + 7) // 8
    if len(section) != used:
        raise CodecError(TRAILING, f"{len(section) - used} bytes after the escape section (payload offset "
                                   f"{offset + used})")
    if reader.acc:
        raise CodecError(TRAILING, f"nonzero padding bits after the escape section (payload offset "
                                   f"{offset + used - 1})")
    return classes


def _primed_decode(h: ChunkHeader, payload: bytes) -> bytes:
    """Decode a primed chunk's payload (after the model block) to symbols, one per byte."""
    model, n, width = h.model, h.n_symbols, h.max_code_bits
    leaves, _ = _primed_tree(model.costs, model.threshold, model.extra, width)
    k = model.split_bits
    low_bits = n * k
    low_len = (low_bits + 7) // 8
    if len(payload) < low_len:
        raise CodecError(TRUNCATED, f"payload has {len(payload)} bytes, the raw rank bits need {low_len}")
    if low_bits % 8 and payload[low_len - 1] >> (low_bits % 8):
        raise CodecError(TRAILING, f"nonzero padding bits after the raw rank bits (payload offset {low_len - 1})")
    reader = _BitReader(payload[low_len:])
    out = bytearray()
    while len(out) < n:
        code = reader.read(width)
        if code >= len(leaves):
            raise CodecError(BAD_CODE, f"code {code} is not in the primed dictionary ({len(leaves)} leaves), "
                                       f"symbol {len(out)}")
        out += leaves[code]
    del out[n:]  # the last phrase may have been cut short by the end of the chunk
    if model.escape_bits:
        codes_end = low_len + reader.pos  # the code section ends in the byte of its last bit
        if reader.acc:
            raise CodecError(TRAILING, f"nonzero padding bits after the last code (payload offset {codes_end - 1})")
        out = _escapes(out, model, h.alphabet, payload[codes_end:], codes_end)
    else:
        reader.check_end()
    if k:
        low = _BitReader(payload[:low_len])
        out = bytearray((c << k) | low.read(k) for c in out)
    return bytes(out).translate(model.perm + bytes(256 - len(model.perm)))


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
                         reset_when_full: bool, method: int, version: int = VERSION,
                         dictionary: int | None = DICT_ADAPTIVE) -> ChunkHeader:
    """The header encode_chunk writes for these parameters (a primed chunk's model block is a placeholder);
    raises CodecError(BAD_HEADER) for bad parameters. dictionary None checks both dictionaries' rules."""
    if method not in (METHOD_PACKED, METHOD_LZW):
        raise CodecError(BAD_HEADER, f"method {method} is not one of None, METHOD_PACKED, METHOD_LZW")
    if version not in VERSIONS:
        raise CodecError(BAD_HEADER, f"version {version} is not one of {VERSIONS}")
    if dictionary is None:
        encode_params_header(n_symbols, alphabet, layout, bias, max_code_bits, reset_when_full, method, version,
                             DICT_ADAPTIVE)
        dictionary = DICT_PRIMED if version >= 2 else DICT_ADAPTIVE
    if method == METHOD_PACKED:
        dictionary = DICT_ADAPTIVE  # the byte is 0
    primed = method == METHOD_LZW and dictionary == DICT_PRIMED
    model = None
    if primed and MIN_ALPHABET <= alphabet <= MAX_ALPHABET:  # a placeholder that passes the model rules
        model = PrimedModel(0, 2, 0, 0, bytes(range(alphabet)), bytes([MIN_COST, MIN_COST]))
    lzw = method == METHOD_LZW
    header = ChunkHeader(version=version, method=method, alphabet=alphabet, layout=layout, bias=bias,
                         max_code_bits=max_code_bits if lzw else 0,
                         flags=(FLAG_RESET_WHEN_FULL if reset_when_full else 0) if lzw and not primed else 0,
                         n_symbols=n_symbols, dictionary=dictionary, model=model)
    problem = _header_problem(header)
    if problem:
        raise CodecError(BAD_HEADER, problem)
    return header


def encode_chunk(symbols, alphabet: int, layout: int, bias: int = 0, max_code_bits: int = 16,
                 reset_when_full: bool = True, method: int | None = None, *, version: int = VERSION,
                 dictionary: int | None = None) -> bytes:
    """Encode one chunk.

    method: None = dictionary codes unless that chunk is larger than the packed one (a tie stays dictionary
    codes); METHOD_LZW / METHOD_PACKED force one.
    version 2, dictionary: None = the smaller of the primed and the adaptive chunk (primed on a tie);
    DICT_PRIMED / DICT_ADAPTIVE force one. version 3 (the default): the same, and the primed dictionary may use
    an escape class; only such a chunk says version 3 (any other is written exactly as version 2 writes it).
    version 1: the adaptive dictionary, exactly as version 1 wrote.
    max_code_bits: adaptive: the widest code (9..16); primed: an upper bound (9..16) on the code width, which
    the encoder keeps at most PRIMED_CODE_BITS. reset_when_full: adaptive only.
    Bad parameters raise CodecError(BAD_HEADER); a symbol >= alphabet raises CodecError(BAD_SYMBOL).
    """
    data = as_symbol_bytes(symbols)
    want = METHOD_LZW if method is None else method
    if version == 1 and dictionary is None:
        dictionary = DICT_ADAPTIVE
    encode_params_header(len(data), alphabet, layout, bias, max_code_bits, reset_when_full, want, version,
                         dictionary)
    if data and max(data) >= alphabet:
        i = next(i for i, s in enumerate(data) if s >= alphabet)
        raise CodecError(BAD_SYMBOL, f"symbol {i} is {data[i]}, alphabet is {alphabet}")
    written = min(version, 2)  # what a chunk without an escape says
    packed_header = encode_params_header(len(data), alphabet, layout, bias, 0, False, METHOD_PACKED, written)
    packed = packed_header.to_bytes() + pack_symbols(data, layout, bias)
    if want == METHOD_PACKED:
        return packed
    chunk = None
    if dictionary in (None, DICT_PRIMED):
        width, model, payload = _primed_encode(data, alphabet, max_code_bits, escapes=version >= 3)
        chunk = ChunkHeader(3 if model.escape_bits else written, METHOD_LZW, alphabet, layout, bias, width, 0,
                            len(data), DICT_PRIMED, model).to_bytes() + payload
    if dictionary in (None, DICT_ADAPTIVE):
        adaptive = encode_params_header(len(data), alphabet, layout, bias, max_code_bits, reset_when_full,
                                        METHOD_LZW, written, DICT_ADAPTIVE).to_bytes() \
            + _lzw_encode(data, alphabet, max_code_bits, reset_when_full)
        if chunk is None or len(adaptive) < len(chunk):
            chunk = adaptive
    if method is None and len(chunk) > len(packed):
        return packed
    return chunk


def decode_chunk(chunk: bytes) -> bytes:
    """Decode one chunk to its output-layout bytes; raise CodecError with the spec's error code."""
    header = parse_header(chunk)
    payload = bytes(chunk[header.header_size:])
    if header.method == METHOD_PACKED:
        return _decode_packed(header, payload)
    symbols = _primed_decode(header, payload) if header.primed else _lzw_decode(header, payload)
    return pack_symbols(symbols, header.layout, header.bias)


def decode_into(chunk: bytes, out) -> int:
    """Decode into a writable buffer (at least output_nbytes long); return the bytes written."""
    header = parse_header(chunk)
    view = memoryview(out).cast("B")
    if len(view) < header.output_nbytes:
        raise CodecError(OUT_TOO_SMALL, f"output buffer has {len(view)} bytes, chunk needs {header.output_nbytes}")
    data = decode_chunk(chunk)
    view[:len(data)] = data
    return len(data)
