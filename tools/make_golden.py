"""Write the QZ golden vectors (versions 1, 2 and 3): tests/golden/*.qz and tests/golden/index.json.

    python tools/make_golden.py                # rewrite tests/golden/
    python tools/make_golden.py --out /tmp/g   # elsewhere (the tests check the committed files are what this makes)

Every implementation (converter/lzw.py, static/wasm/qz.c through wasmtime, the JS decoder) must decode each file
to the expected result. index.json:

    {"format": "QZ chunk v1, v2 and v3 (docs/lzw-format.md)",
     "vectors": [{"name": ..., "file": "<name>.qz", "what": "<one line>",
                  "expect": "ok", "length": <output bytes>, "sha256": "<hex of the output bytes>"}
                 or {..., "expect": "<error name, e.g. BAD_CODE>", "code": <error code>}]}

The inputs come from a tiny fixed PRNG (splitmix64) so the files never change with a Python or numpy version.
Valid chunks come from the reference encoder (or, for a primed chunk with a chosen split or width, from its model
and tree functions); invalid ones are valid chunks with one defect, or code streams written by hand below. The
version-1 vectors are the ones version 1 shipped with, byte for byte, except bad_version, which says version 4
since version 3 exists. Each expectation is checked against the
reference decoder before anything is written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from converter import lzw  # noqa: E402
from converter.errors import CodecError  # noqa: E402

DEFAULT_OUT = ROOT / "tests" / "golden"
MAX_TOTAL_BYTES = 200_000

# ---------------------------------------------------------------------------------------------------------------
# Deterministic inputs
# ---------------------------------------------------------------------------------------------------------------


class SplitMix64:
    """A fixed, tiny PRNG: the golden inputs must not depend on library versions."""

    def __init__(self, seed: int):
        self.state = seed & 0xFFFF_FFFF_FFFF_FFFF

    def next64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFF_FFFF_FFFF_FFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFF_FFFF_FFFF_FFFF
        return z ^ (z >> 31)

    def uniform(self) -> float:
        return (self.next64() >> 11) / float(1 << 53)  # [0, 1)

    def below(self, n: int) -> int:
        return self.next64() % n

    def gauss(self) -> float:
        u1, u2 = self.uniform(), self.uniform()
        return math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)


def uniform_symbols(seed: int, n: int, alphabet: int) -> bytes:
    rng = SplitMix64(seed)
    return bytes(rng.below(alphabet) for _ in range(n))


def gauss_symbols(seed: int, n: int, alphabet: int, sigma: float) -> bytes:
    """Weight-like: round(N(0, sigma)) clipped to the alphabet, centred at alphabet // 2."""
    rng = SplitMix64(seed)
    mid = alphabet // 2
    return bytes(min(alphabet - 1, max(0, mid + round(sigma * rng.gauss()))) for _ in range(n))


def int8_symbols(seed: int, n: int, sigma: float) -> bytes:
    """int8 weights as A=256 symbols: the two's complement byte of round(N(0, sigma)) clipped to -127..127."""
    rng = SplitMix64(seed)
    return bytes(max(-127, min(127, round(sigma * rng.gauss()))) & 0xFF for _ in range(n))


def ternary_symbols(seed: int, n: int, p_zero: float) -> bytes:
    """Ternary weights as symbols 0/1/2 (= -1/0/+1 with bias 1)."""
    rng = SplitMix64(seed)
    out = bytearray()
    for _ in range(n):
        u = rng.uniform()
        out.append(1 if u < p_zero else (0 if u < (1 + p_zero) / 2 else 2))
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------------
# Hand-made chunks
# ---------------------------------------------------------------------------------------------------------------


def header(method: int, alphabet: int, layout: int, n: int, bias: int = 0, mcb: int = 16, flags: int = 1,
           version: int = 1, magic: bytes = b"QZ", reserved: int = 0) -> bytes:
    """A raw header, any field allowed (for the invalid vectors). Packed chunks get mcb = flags = 0.
    `reserved` is bytes 10-11 (version 2: byte 10 is the dictionary)."""
    if method == lzw.METHOD_PACKED:
        mcb, flags = 0, 0
    return (magic + bytes([version, method]) + alphabet.to_bytes(2, "little") + bytes([layout, bias, mcb, flags])
            + reserved.to_bytes(2, "little") + n.to_bytes(4, "little"))


def primed_chunk(symbols: bytes, alphabet: int, layout: int, bias: int = 0, split_bits: int = 0, width: int = 12,
                 model: lzw.PrimedModel | None = None, codes: list[int] | None = None) -> bytes:
    """A version-2 primed chunk with a chosen split and width (the encoder would choose its own), or with a
    given model and code list (for hand-made defects)."""
    if model is None:
        counts, perm = lzw._rank_symbols(symbols, alphabet)
        model = lzw.fit_model(counts, perm, split_bits, width)
    rank_of = bytearray(256)
    for r, s in enumerate(model.perm):
        rank_of[s] = r
    ranks = symbols.translate(bytes(rank_of))
    k = model.split_bits
    if codes is None:
        _, table = lzw._primed_tree(model.costs, model.threshold, model.extra, width)
        codes = lzw._primed_parse(ranks.translate(bytes((r >> k) & 0xFF for r in range(256))), table, model.classes)
    low = lzw._write_fields((r & ((1 << k) - 1) for r in ranks), k) if k else b""
    h = lzw.ChunkHeader(2, lzw.METHOD_LZW, alphabet, layout, bias, width, 0, len(symbols), lzw.DICT_PRIMED, model)
    return h.to_bytes() + low + lzw._write_fields(codes, width)


def code_stream(codes: list[int], alphabet: int, mcb: int = 16, pad: int = 0) -> bytes:
    """LSB-first codes with the spec's widths; k restarts after each CLEAR. `pad` fills the unused top bits."""
    acc, nbits, k = 0, 0, 0
    for code in codes:
        width = lzw.code_width(alphabet, k, mcb)
        acc |= code << nbits
        nbits += width
        k = 0 if code == alphabet and k > 0 else k + 1
    if nbits % 8:
        acc |= (pad & ((1 << (8 - nbits % 8)) - 1)) << nbits
        nbits += 8 - nbits % 8
    return acc.to_bytes(nbits // 8, "little")


def with_byte(chunk: bytes, offset: int, value: int) -> bytes:
    out = bytearray(chunk)
    out[offset] = value
    return bytes(out)


def with_n(chunk: bytes, n: int) -> bytes:
    return chunk[:12] + n.to_bytes(4, "little") + chunk[16:]


# ---------------------------------------------------------------------------------------------------------------
# The vectors
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vector:
    name: str
    what: str
    chunk: bytes
    expect: str  # "ok" or an error name
    method: int | None = None  # for "ok" vectors made by the encoder: the method the chunk must have


def encode(symbols: bytes, alphabet: int, layout: int, **kw) -> bytes:
    """Version 1 (the vectors version 1 shipped with)."""
    return lzw.encode_chunk(symbols, alphabet, layout, version=1, **kw)


def encode2(symbols: bytes, alphabet: int, layout: int, **kw) -> bytes:
    return lzw.encode_chunk(symbols, alphabet, layout, version=2, **kw)


def valid_vectors() -> list[Vector]:
    U8, U4, U2 = lzw.LAYOUT_U8, lzw.LAYOUT_U4, lzw.LAYOUT_U2
    LZW, PACKED = lzw.METHOD_LZW, lzw.METHOD_PACKED
    v = []
    s = int8_symbols(1, 3000, sigma=4.0)
    v.append(Vector("u8_int8_lzw", "int8 weights (sigma 4), A=256, u8 bias 0, auto picks LZW", encode(s, 256, U8), "ok", LZW))
    s = int8_symbols(2, 2000, sigma=30.0)
    v.append(Vector("u8_int8_forced_lzw", "wide int8 (sigma 30), LZW forced although larger than packed",
                    encode(s, 256, U8, method=LZW), "ok", LZW))
    s = ternary_symbols(3, 5000, p_zero=0.5)
    v.append(Vector("u8_ternary_bias1", "ternary -1/0/+1 as A=3, u8 bias 1 (bytes ff/00/01)",
                    encode(s, 3, U8, bias=1), "ok", LZW))
    s = gauss_symbols(4, 1500, 16, sigma=2.0)
    v.append(Vector("u8_a16_bias8", "int4 values as int8 bytes: A=16, u8 bias 8", encode(s, 16, U8, bias=8), "ok", LZW))
    s = gauss_symbols(5, 4001, 16, sigma=2.0)
    v.append(Vector("u4_a16_odd", "int4 weights, A=16, u4, odd n (last high nibble 0)", encode(s, 16, U4), "ok", LZW))
    s = ternary_symbols(6, 3001, p_zero=0.6)
    v.append(Vector("u4_a3_odd", "ternary in nibbles, A=3, u4, odd n", encode(s, 3, U4), "ok", LZW))
    s = gauss_symbols(7, 4003, 4, sigma=0.5)
    v.append(Vector("u2_a4_n3mod4", "int2 weights, A=4, u2, n % 4 == 3", encode(s, 4, U2), "ok", LZW))
    s = ternary_symbols(8, 4001, p_zero=0.5)
    v.append(Vector("u2_a3_n1mod4", "ternary in crumbs, A=3, u2, n % 4 == 1", encode(s, 3, U2), "ok", LZW))
    s = ternary_symbols(9, 4002, p_zero=0.3)
    v.append(Vector("u2_a2_n2mod4", "binary, A=2, u2, n % 4 == 2", encode(bytes(x & 1 for x in s), 2, U2), "ok"))
    v.append(Vector("empty_lzw", "n = 0, LZW (empty payload)", encode(b"", 16, U4), "ok", LZW))
    v.append(Vector("empty_packed", "n = 0, packed (empty payload)", encode(b"", 256, U8, method=PACKED), "ok", PACKED))
    v.append(Vector("single_u8", "one symbol, A=256, u8, LZW forced (9 bits)", encode(b"\xc8", 256, U8, method=LZW), "ok", LZW))
    v.append(Vector("single_u4", "one symbol, A=16, u4 (5 bits: ties with packed, a tie stays LZW)", encode(b"\x0b", 16, U4), "ok", LZW))
    v.append(Vector("single_u2_packed", "one symbol, A=4, u2, packed", encode(b"\x03", 4, U2, method=PACKED), "ok", PACKED))
    s = uniform_symbols(10, 3000, 256)
    v.append(Vector("reset_mcb9_a256", "A=256, max_code_bits 9: 255 entries per dictionary, about 11 CLEARs",
                    encode(s, 256, U8, max_code_bits=9, method=LZW), "ok", LZW))
    s = gauss_symbols(11, 6000, 16, sigma=3.0)
    v.append(Vector("reset_mcb9_a16", "A=16, u4, max_code_bits 9, reset-when-full: several CLEARs",
                    encode(s, 16, U4, max_code_bits=9, method=LZW), "ok", LZW))
    v.append(Vector("freeze_mcb9_a16", "same symbols, freeze-when-full: dictionary frozen at 512 codes",
                    encode(s, 16, U4, max_code_bits=9, reset_when_full=False, method=LZW), "ok", LZW))
    frozen = encode(s, 16, U4, max_code_bits=9, reset_when_full=False, method=LZW)
    v.append(Vector("freeze_stream_reset_flag", "a freeze-mode stream with the reset flag set: the decoder ignores "
                    "the flag (no CLEAR came, so it keeps the full dictionary)", with_byte(frozen, 9, 1), "ok"))
    s = gauss_symbols(12, 20000, 16, sigma=1.5)
    v.append(Vector("u4_mcb12_long", "A=16, u4, max_code_bits 12, 20000 symbols", encode(s, 16, U4, max_code_bits=12),
                    "ok", LZW))
    v.append(Vector("kwkwk_run_a2", "a run of one symbol: every code after the first is the KwKwK case",
                    encode(bytes(1000), 2, U2), "ok", LZW))
    v.append(Vector("kwkwk_run_a256", "a run of 0x41, A=256, u8", encode(b"A" * 777, 256, U8), "ok", LZW))
    v.append(Vector("kwkwk_abab", "ababab...: KwKwK with two-symbol strings", encode(b"\x01\x02" * 300 + b"\x01", 3, U8),
                    "ok", LZW))
    s = ternary_symbols(13, 20000, p_zero=0.97)
    v.append(Vector("ternary_sparse_long", "mostly-zero ternary, A=3, u2, 20000 symbols (long strings)",
                    encode(s, 3, U2), "ok", LZW))
    s = uniform_symbols(14, 2000, 256)
    v.append(Vector("packed_fallback_u8", "uniform random bytes: LZW is larger, so auto stores packed",
                    encode(s, 256, U8), "ok", PACKED))
    s = uniform_symbols(15, 1001, 16)
    v.append(Vector("packed_fallback_u4_odd", "uniform int4, odd n: stored packed", encode(s, 16, U4), "ok", PACKED))
    s = uniform_symbols(16, 1003, 3)
    v.append(Vector("packed_u8_bias1", "ternary packed with bias 1 (bytes ff/00/01)",
                    encode(s, 3, U8, bias=1, method=PACKED), "ok", PACKED))
    # CLEAR in the middle of a stream, before the dictionary is full, is legal (an encoder may reset early).
    a = 4
    codes = [1, 2, a + 1, a, 3, 3, a + 1, 0]  # 1 2 (1 2) CLEAR 3 3 (3 3) 0
    v.append(Vector("clear_mid_stream", "hand-made: a CLEAR before the dictionary is full",
                    header(lzw.METHOD_LZW, a, U2, 9) + code_stream(codes, a), "ok"))
    return v


def invalid_vectors() -> list[Vector]:
    U8, U4, U2 = lzw.LAYOUT_U8, lzw.LAYOUT_U4, lzw.LAYOUT_U2
    LZW, PACKED = lzw.METHOD_LZW, lzw.METHOD_PACKED
    good = encode(gauss_symbols(20, 600, 16, sigma=2.0), 16, U4)  # an LZW chunk
    assert good[3] == LZW
    packed = encode(uniform_symbols(21, 101, 16), 16, U4, method=PACKED)  # odd n: a padding nibble
    v = [
        Vector("bad_magic", "magic 'QX'", with_byte(good, 1, ord("X")), "BAD_HEADER"),
        Vector("bad_version", "version 4 (1, 2 and 3 exist)", with_byte(good, 2, 4), "BAD_HEADER"),
        Vector("bad_method", "method 2", with_byte(good, 3, 2), "BAD_HEADER"),
        Vector("truncated_header", "10 bytes: shorter than the header", good[:10], "BAD_HEADER"),
        Vector("empty_input", "0 bytes", b"", "BAD_HEADER"),
        Vector("reserved_nonzero", "reserved byte 11 = 1", with_byte(good, 11, 1), "BAD_HEADER"),
        Vector("flags_extra_bit", "LZW flags 0x03 (bit 1 is reserved)", with_byte(good, 9, 3), "BAD_HEADER"),
        Vector("packed_with_flags", "packed chunk with flags 1", with_byte(packed, 9, 1), "BAD_HEADER"),
        Vector("packed_with_mcb", "packed chunk with max_code_bits 16", with_byte(packed, 8, 16), "BAD_HEADER"),
        Vector("mcb_8", "max_code_bits 8", with_byte(good, 8, 8), "BAD_HEADER"),
        Vector("mcb_17", "max_code_bits 17", with_byte(good, 8, 17), "BAD_HEADER"),
        Vector("mcb_0_lzw", "LZW with max_code_bits 0", with_byte(good, 8, 0), "BAD_HEADER"),
        Vector("alphabet_1", "alphabet 1", with_byte(good, 4, 1), "BAD_HEADER"),
        Vector("alphabet_257", "alphabet 257, layout u8", header(LZW, 257, U8, 0), "BAD_HEADER"),
        Vector("alphabet_0x0110", "alphabet 272 (high byte set)", header(LZW, 0x110, U8, 0), "BAD_HEADER"),
        Vector("u4_alphabet_17", "layout u4 with alphabet 17", with_byte(good, 4, 17), "BAD_HEADER"),
        Vector("u2_alphabet_5", "layout u2 with alphabet 5", header(LZW, 5, U2, 0), "BAD_HEADER"),
        Vector("layout_3", "layout 3", with_byte(good, 6, 3), "BAD_HEADER"),
        Vector("bias_on_u4", "bias 1 with layout u4", with_byte(good, 7, 1), "BAD_HEADER"),
    ]
    # Payload errors of LZW.
    v.append(Vector("truncated_payload", "LZW payload missing its last 3 bytes", good[:-3], "TRUNCATED"))
    v.append(Vector("truncated_empty_payload", "n = 5 and no payload", header(LZW, 16, U4, 5), "TRUNCATED"))
    v.append(Vector("bad_code_first", "first code is A+1 (only single symbols are valid after a reset)",
                    header(LZW, 16, U4, 4) + code_stream([17, 0, 0], 16), "BAD_CODE"))
    v.append(Vector("clear_first", "first code is CLEAR (not allowed right after a reset)",
                    header(LZW, 16, U4, 2) + code_stream([16, 1, 1], 16), "BAD_CODE"))
    v.append(Vector("clear_after_clear", "CLEAR, then CLEAR again as the first code of the new dictionary",
                    header(LZW, 4, U2, 3) + code_stream([1, 4, 4, 2, 2], 4), "BAD_CODE"))
    v.append(Vector("bad_code_ahead", "code A+2 at k=1, when only A+1 (KwKwK) can be valid",
                    header(LZW, 16, U4, 8) + code_stream([3, 18, 0, 0], 16), "BAD_CODE"))
    run = encode(b"\x07" * 6, 16, U8)  # codes 7, 17 (77), 18 (777): 1 + 2 + 3 symbols
    v.append(Vector("overrun", "the last string (3 symbols) would pass n_symbols = 5", with_n(run, 5), "OVERRUN"))
    v.append(Vector("trailing_byte", "one zero byte after the last code", good + b"\0", "TRAILING"))
    # (make_index checks this really hits unused bits: a used bit would give another result)
    v.append(Vector("trailing_bits", "nonzero unused bits in the last byte",
                    good[:-1] + bytes([good[-1] | 0x80]), "TRAILING"))
    v.append(Vector("lzw_n0_with_payload", "n = 0 but a payload byte", header(LZW, 16, U4, 0) + b"\0", "TRAILING"))
    # Packed payload errors: length, padding, symbols (checked in that order).
    v.append(Vector("packed_too_long", "packed payload one byte long", packed + b"\0", "TRAILING"))
    v.append(Vector("packed_too_short", "packed payload one byte short", packed[:-1], "TRAILING"))
    v.append(Vector("packed_padding_u4", "odd n, the unused high nibble is 1",
                    packed[:-1] + bytes([packed[-1] | 0x10]), "TRAILING"))
    p2 = encode(uniform_symbols(22, 6, 4), 4, U2, method=PACKED)
    v.append(Vector("packed_padding_u2", "n % 4 == 2, an unused crumb is nonzero",
                    p2[:-1] + bytes([p2[-1] | 0x40]), "TRAILING"))
    p3 = encode(uniform_symbols(23, 11, 3), 3, U4, method=PACKED)  # 6 bytes, the last has a padding nibble
    v.append(Vector("packed_bad_symbol_u4", "A=3 in nibbles, one nibble is 3", with_byte(p3, 18, 0x13), "BAD_SYMBOL"))
    p4 = encode(uniform_symbols(24, 10, 3), 3, U8, bias=1, method=PACKED)
    v.append(Vector("packed_bad_symbol_u8_bias", "A=3, bias 1: byte 0x02 is symbol 3", with_byte(p4, 20, 2),
                    "BAD_SYMBOL"))
    v.append(Vector("packed_padding_and_bad_symbol", "bad symbol and nonzero padding: padding is checked first",
                    with_byte(p3, 16 + 5, 0x33), "TRAILING"))
    return v


def _primed(chunk: bytes) -> lzw.ChunkHeader:
    """The header of a chunk that must be a version-2 primed chunk (a vector-building invariant)."""
    h = lzw.parse_header(chunk)
    if not (h.version == 2 and h.primed):
        raise AssertionError(f"expected a primed chunk, got version {h.version} method {h.method} / {h.dictionary}")
    return h


def _last_phrase_cut(chunk: bytes) -> bool:
    """True if the last code of a primed chunk decodes past n_symbols (its tail is dropped)."""
    h = _primed(chunk)
    leaves, _ = lzw._primed_tree(h.model.costs, h.model.threshold, h.model.extra, h.max_code_bits)
    payload = chunk[h.header_size + (h.n_symbols * h.model.split_bits + 7) // 8:]
    reader, total = lzw._BitReader(payload), 0
    while total < h.n_symbols:
        total += len(leaves[reader.read(h.max_code_bits)])
    return total > h.n_symbols


def valid_vectors_v2() -> list[Vector]:
    U8, U4, U2 = lzw.LAYOUT_U8, lzw.LAYOUT_U4, lzw.LAYOUT_U2
    LZW, PACKED = lzw.METHOD_LZW, lzw.METHOD_PACKED
    v = []

    def add(name, what, chunk, method=LZW, split_bits=None, width=None):
        if method == LZW:
            h = _primed(chunk)
            if split_bits is not None and h.model.split_bits != split_bits:
                raise AssertionError(f"{name}: split_bits {h.model.split_bits}, wanted {split_bits}")
            if width is not None and h.max_code_bits != width:
                raise AssertionError(f"{name}: width {h.max_code_bits}, wanted {width}")
        v.append(Vector(name, what, chunk, "ok", method))

    s = int8_symbols(31, 3000, sigma=20.0)
    add("v2_u8_int8", "int8 weights (sigma 20), A=256: primed, the encoder splits off raw rank bits",
        encode2(s, 256, U8))
    s = ternary_symbols(32, 5003, p_zero=0.4)
    add("v2_u8_ternary_bias1", "ternary as int8 bytes (A=3, bias 1): no split, the tree decodes straight to "
        "output bytes", encode2(s, 3, U8, bias=1), split_bits=0)
    s = gauss_symbols(33, 4001, 16, sigma=2.5)
    add("v2_u4_int4_odd", "int4 weights, A=16, u4, odd n: split rank bits, 16-lane combine + tail",
        encode2(s, 16, U4))
    s = gauss_symbols(34, 4003, 4, sigma=0.8)
    add("v2_u2_int2", "int2 weights, A=4, u2, n % 4 == 3", encode2(s, 4, U2))
    s = ternary_symbols(35, 4001, p_zero=0.5)
    add("v2_u2_ternary", "ternary in crumbs, A=3, u2, n % 4 == 1", encode2(s, 3, U2), split_bits=0)
    s = gauss_symbols(36, 3000, 16, sigma=2.0)
    add("v2_u8_a16_bias8", "int4 values as int8 bytes: A=16, u8, bias 8", encode2(s, 16, U8, bias=8))
    s = ternary_symbols(37, 3001, p_zero=0.6)
    add("v2_u4_a3_odd", "ternary in nibbles, A=3, u4, odd n", encode2(s, 3, U4))
    s = ternary_symbols(38, 4002, p_zero=0.2)
    add("v2_u2_binary", "binary, A=2, u2, n % 4 == 2", encode2(bytes(x & 1 for x in s), 2, U2))
    primed = dict(method=LZW, dictionary=lzw.DICT_PRIMED)
    add("v2_single", "one symbol, A=16, u4, primed forced", encode2(b"\x05", 16, U4, **primed))
    add("v2_empty_primed", "n = 0, primed forced: model block, no payload", encode2(b"", 256, U8, **primed))
    add("v2_run_depth_cap", "one symbol 5000 times (A=16), primed forced: a class of cost 1, strings capped at 64",
        encode2(bytes([9]) * 5000, 16, U4, **primed))
    s = ternary_symbols(39, 20000, p_zero=0.97)
    add("v2_sparse_ternary", "mostly-zero ternary (20000 symbols, u2), primed forced: long phrases",
        encode2(s, 3, U2, dictionary=lzw.DICT_PRIMED))
    run = encode2(bytes([9]) * 5000, 16, U4)
    if lzw.parse_header(run).dictionary != lzw.DICT_ADAPTIVE:
        raise AssertionError("a run should be smaller with the adaptive dictionary")
    v.append(Vector("v2_auto_adaptive_run", "one symbol 5000 times, auto: the adaptive dictionary is smaller than "
                    "the primed one (phrases of at most 64)", run, "ok", LZW))
    s = gauss_symbols(40, 3000, 16, sigma=1.2)
    add("v2_width9", "max_code_bits 9: 9-bit codes", encode2(s, 16, U4, max_code_bits=9), width=9)
    s = int8_symbols(41, 2500, sigma=6.0)
    add("v2_u8_k0_a256", "A=256 without a split (k = 0, up to 256 classes), made from the model functions",
        primed_chunk(s, 256, U8, split_bits=0, width=12), split_bits=0, width=12)
    s = int8_symbols(42, 2500, sigma=25.0)
    add("v2_u8_k7", "A=256, k = 7: two classes of 128 ranks, 7 raw bits per symbol",
        primed_chunk(s, 256, U8, split_bits=7, width=10), split_bits=7, width=10)
    for seed, k, a, sigma in ((48, 4, 256, 12.0), (49, 5, 256, 18.0), (51, 6, 256, 20.0), (52, 5, 64, 9.0)):
        s = int8_symbols(seed, 2003, sigma=sigma) if a == 256 else gauss_symbols(seed, 2003, a, sigma=sigma)
        add(f"v2_u8_a{a}_k{k}", f"A={a}, k = {k}, 2003 symbols: the wasm build's two-pass combine (16 at a time) "
            "and the scalar tail", primed_chunk(s, a, U8, split_bits=k, width=11), split_bits=k, width=11)
    s = gauss_symbols(43, 3001, 16, sigma=2.0)
    add("v2_u4_k1", "A=16, k = 1 (8 classes), u4", primed_chunk(s, 16, U4, split_bits=1, width=11),
        split_bits=1, width=11)
    add("v2_u4_k3", "A=16, k = 3 (2 classes), u4", primed_chunk(s, 16, U4, split_bits=3, width=12),
        split_bits=3, width=12)
    s = gauss_symbols(44, 6000, 16, sigma=2.0)
    add("v2_width14_k2", "a 14-bit tree (wider than the encoder writes: the decoder's scratch arena), k = 2",
        primed_chunk(s, 16, U4, split_bits=2, width=14), split_bits=2, width=14)
    s = ternary_symbols(45, 3000, p_zero=0.5)
    add("v2_width16_u8", "a 16-bit tree (65536 leaves), ternary as bytes", primed_chunk(s, 3, U8, bias=1, width=16),
        width=16)
    s = uniform_symbols(46, 2000, 256)
    add("v2_packed_fallback", "uniform random bytes: the primed chunk is larger, so auto stores packed "
        "(version 2 header)", encode2(s, 256, U8), method=PACKED)
    s = gauss_symbols(47, 3000, 16, sigma=2.0)
    v.append(Vector("v2_adaptive_lzw", "version 2 with the adaptive (v1 LZW) dictionary, dictionary byte 0",
                    encode2(s, 16, U4, method=LZW, dictionary=lzw.DICT_ADAPTIVE), "ok", LZW))
    cut = [x for x in v if x.method == LZW and lzw.parse_header(x.chunk).primed and _last_phrase_cut(x.chunk)]
    if not cut:
        raise AssertionError("no primed vector ends with a phrase cut short by n_symbols")
    return v


def invalid_vectors_v2() -> list[Vector]:
    U4, U8 = lzw.LAYOUT_U4, lzw.LAYOUT_U8
    LZW = lzw.METHOD_LZW
    s = gauss_symbols(50, 600, 16, sigma=2.0)
    good = primed_chunk(s, 16, U4, split_bits=2, width=10)  # model block at 16..16+8+16+M
    h = _primed(good)
    m = h.model
    model_at = lzw.HEADER_SIZE
    perm_at, costs_at = model_at + lzw.MODEL_FIXED_SIZE, model_at + lzw.MODEL_FIXED_SIZE + 16
    low_len = (h.n_symbols * m.split_bits + 7) // 8
    v = [
        Vector("v2_bad_dictionary", "dictionary byte 2", with_byte(good, 10, 2), "BAD_HEADER"),
        Vector("v2_reserved_11", "version 2, reserved byte 11 = 1", with_byte(good, 11, 1), "BAD_HEADER"),
        Vector("v1_dictionary_byte", "version 1 with byte 10 = 1 (reserved in version 1)",
               with_byte(encode(s, 16, U4), 10, 1), "BAD_HEADER"),
        Vector("v2_version_4", "version 4", with_byte(good, 2, 4), "BAD_HEADER"),
        Vector("v2_primed_flags", "primed chunk with flags 1", with_byte(good, 9, 1), "BAD_HEADER"),
        Vector("v2_primed_width_8", "primed code width 8", with_byte(good, 8, 8), "BAD_HEADER"),
        Vector("v2_primed_width_17", "primed code width 17", with_byte(good, 8, 17), "BAD_HEADER"),
        Vector("v2_packed_dictionary", "packed chunk with dictionary 1",
               with_byte(encode2(s, 16, U4, method=lzw.METHOD_PACKED), 10, 1), "BAD_HEADER"),
        Vector("v2_model_cut", "chunk ends inside the model's fixed part", good[:model_at + 5], "BAD_HEADER"),
        Vector("v2_model_cut_costs", "chunk ends inside the class costs", good[:costs_at + 1], "BAD_HEADER"),
        Vector("v2_model_reserved", "model reserved byte (offset 17) = 1", with_byte(good, 17, 1), "BAD_HEADER"),
        Vector("v2_split_8", "split_bits 8", with_byte(good, 16, 8), "BAD_HEADER"),
        Vector("v2_split_not_dividing", "A=3 with split_bits 1 (2 does not divide 3)",
               with_byte(primed_chunk(ternary_symbols(51, 300, 0.5), 3, U8, bias=1, width=9), 16, 1), "BAD_HEADER"),
        Vector("v2_classes_1", "classes 1", with_byte(good, 18, 1), "BAD_HEADER"),
        Vector("v2_classes_too_many", "classes 5 with A=16, k=2 (at most 4)", with_byte(good, 18, 5), "BAD_HEADER"),
        Vector("v2_perm_duplicate", "rank table lists a symbol twice", with_byte(good, perm_at + 1, good[perm_at]),
               "BAD_HEADER"),
        Vector("v2_perm_out_of_range", "rank table holds symbol 16 (A=16)", with_byte(good, perm_at + 3, 16),
               "BAD_HEADER"),
        Vector("v2_cost_zero", "a class cost of 0", with_byte(good, costs_at, 0), "BAD_HEADER"),
    ]
    big_t = good[:20] + (m.threshold + 40).to_bytes(2, "little") + good[22:]
    v.append(Vector("v2_tree_too_big", "threshold raised: the tree has more than 2**10 leaves (found while "
                    "building it)", big_t, "BAD_HEADER"))
    extra_at = model_at + 6
    big_e = good[:extra_at] + (m.extra + 200).to_bytes(2, "little") + good[extra_at + 2:]
    v.append(Vector("v2_extra_too_big", "extra larger than the number of cost T+1 nodes", big_e, "BAD_HEADER"))
    # a model whose tree has fewer leaves than 2**width (three classes: leaves are odd), then the top code
    t = ternary_symbols(52, 400, p_zero=0.5)
    counts, perm = lzw._rank_symbols(t, 3)
    m3 = lzw.fit_model(counts, perm, 0, 9)
    leaves, _ = lzw._primed_tree(m3.costs, m3.threshold, m3.extra, 9)
    if len(leaves) >= 1 << 9:
        raise AssertionError("v2_bad_code needs a tree with unused codes")
    v.append(Vector("v2_bad_code", f"code 511 with {len(leaves)} leaves", primed_chunk(
        t[:3], 3, U8, bias=1, width=9, model=m3, codes=[511]), "BAD_CODE"))
    v.append(Vector("v2_low_truncated", "payload shorter than the raw rank bits", good[:h.header_size + low_len - 1],
                    "TRUNCATED"))
    odd = primed_chunk(s[:599], 16, U4, split_bits=3, width=10)  # 599 * 3 bits: 3 padding bits in the raw section
    ho = _primed(odd)
    last_low = ho.header_size + (599 * 3 + 7) // 8 - 1
    v.append(Vector("v2_low_padding", "nonzero padding bits after the raw rank bits",
                    with_byte(odd, last_low, odd[last_low] | 0x80), "TRAILING"))
    v.append(Vector("v2_codes_truncated", "code section missing its last 2 bytes", good[:-2], "TRUNCATED"))
    v.append(Vector("v2_trailing_byte", "one zero byte after the last code", good + b"\0", "TRAILING"))
    v.append(Vector("v2_trailing_bits", "nonzero unused bits after the last code",
                    good[:-1] + bytes([good[-1] | 0x80]), "TRAILING"))
    v.append(Vector("v2_n0_with_payload", "primed, n = 0, one payload byte",
                    encode2(b"", 16, U4, method=LZW, dictionary=lzw.DICT_PRIMED) + b"\0", "TRAILING"))
    return v


# ---------------------------------------------------------------------------------------------------------------
# Version 3: the escape class
# ---------------------------------------------------------------------------------------------------------------


def _escaped(chunk: bytes) -> tuple[lzw.ChunkHeader, int]:
    """(header, payload offset of the escape section) of a chunk that must be a version-3 escape chunk."""
    h = lzw.parse_header(chunk)
    if not (h.version == 3 and h.primed and h.model.escape_bits):
        raise AssertionError(f"expected a version-3 escape chunk, got version {h.version}")
    leaves, _ = lzw._primed_tree(h.model.costs, h.model.threshold, h.model.extra, h.max_code_bits)
    low_len = (h.n_symbols * h.model.split_bits + 7) // 8
    reader, total = lzw._BitReader(chunk[h.header_size + low_len:]), 0
    while total < h.n_symbols:
        total += len(leaves[reader.read(h.max_code_bits)])
    return h, low_len + reader.pos


def encode3(symbols: bytes, alphabet: int, layout: int, **kw) -> bytes:
    return lzw.encode_chunk(symbols, alphabet, layout, version=3, **kw)


def valid_vectors_v3() -> list[Vector]:
    U8, U4 = lzw.LAYOUT_U8, lzw.LAYOUT_U4
    v = []
    for name, what, chunk in (
            ("v3_escape_int8", "int8-like codes, sigma 2, A=256", encode3(int8_symbols(60, 20000, 2.0), 256, U8)),
            ("v3_escape_u4", "A=16 in nibbles, sigma 1.5", encode3(gauss_symbols(60, 2001, 16, sigma=1.5), 16, U4)),
            ("v3_escape_a10", "A=10, sigma 1.5", encode3(gauss_symbols(73, 1500, 10, sigma=1.5), 10, U8)),
            # one-bit escapes (the two signs of ternary codes share the escape; the decoders' group path)
            ("v3_escape_ternary", "ternary as int8, 70% zeros, n = 3001",
             encode3(ternary_symbols(81, 3001, p_zero=0.7), 3, U8, bias=1)),
            ("v3_escape_ternary_u2", "ternary in crumbs, 80% zeros, n = 2003",
             encode3(ternary_symbols(82, 2003, p_zero=0.8), 3, lzw.LAYOUT_U2))):
        h, _ = _escaped(chunk)
        v.append(Vector(name, f"{what}: k={h.model.split_bits}, M={h.model.classes}, "
                              f"escape_bits={h.model.escape_bits}", chunk, "ok"))
    splits = {lzw.parse_header(x.chunk).model.split_bits for x in v}
    if not (0 in splits and any(k > 0 for k in splits)):
        raise AssertionError(f"the v3 vectors should cover split_bits 0 and > 0, got {sorted(splits)}")
    v2 = encode2(gauss_symbols(50, 600, 16, sigma=2.0), 16, U4, method=lzw.METHOD_LZW, dictionary=lzw.DICT_PRIMED)
    v.append(Vector("v3_without_escape", "a version-2 primed chunk relabelled version 3 (escape_bits 0)",
                    with_byte(v2, 2, 3), "ok"))
    return v


def invalid_vectors_v3() -> list[Vector]:
    U4 = lzw.LAYOUT_U4
    good = encode3(gauss_symbols(60, 2001, 16, sigma=0.8), 16, U4)  # k = 0, M = 4, escape_bits 2
    h, esc = _escaped(good)
    at = h.header_size + esc  # first byte of the escape section
    limit = 16 >> h.model.split_bits
    if (len(good) - at) * 8 == _escape_count(good, h) * h.model.escape_bits:
        raise AssertionError("v3_escape_padding needs padding bits in the escape section")
    # escape_bits raised to 8 and the first escape all ones: class M - 1 + 255 >= A >> k, found at the first escape
    wide = with_byte(with_byte(good, 17, 8), at, 0xFF)
    return [
        Vector("v3_escape_bits_9", "escape_bits 9 (at most 8)", with_byte(good, 17, 9), "BAD_HEADER"),
        Vector("v3_escape_truncated", "escape section missing its last byte", good[:-1], "TRUNCATED"),
        Vector("v3_escape_trailing_byte", "one zero byte after the escape section", good + b"\0", "TRAILING"),
        Vector("v3_escape_padding", "nonzero padding bits after the escape section",
               good[:-1] + bytes([good[-1] | 0x80]), "TRAILING"),
        Vector("v3_escaped_class_too_big", f"escape_bits 8, first escape 255: class {h.model.classes - 1 + 255} "
                                           f">= A >> k = {limit}", wide, "BAD_CODE"),
        Vector("v3_codes_padding", "nonzero padding bits after the last code, before the escape section",
               _codes_padding_defect(good), "TRAILING"),
        *_one_bit_defects(),
    ]


def _one_bit_defects() -> list[Vector]:
    """The same defects on a chunk with one-bit escapes (escape_bits 1), which the decoders resolve eight classes at
    a time: its errors must still be the reference's."""
    good = encode3(ternary_symbols(82, 1603, p_zero=0.6), 3, lzw.LAYOUT_U8, bias=1)
    h, esc = _escaped(good)
    if h.model.escape_bits != 1:
        raise AssertionError(f"expected one-bit escapes, got {h.model.escape_bits}")
    if (len(good) - h.header_size - esc) * 8 == _escape_count(good, h):
        raise AssertionError("v3_one_bit_padding needs padding bits in the escape section")
    return [
        Vector("v3_one_bit_truncated", "one-bit escapes, escape section missing its last byte", good[:-1],
               "TRUNCATED"),
        Vector("v3_one_bit_half", "one-bit escapes, escape section cut to half", good[:h.header_size + esc
               + (len(good) - h.header_size - esc) // 2], "TRUNCATED"),
        Vector("v3_one_bit_trailing_byte", "one-bit escapes, one zero byte after the escape section", good + b"\0",
               "TRAILING"),
        Vector("v3_one_bit_padding", "one-bit escapes, nonzero padding bits after the escape section",
               good[:-1] + bytes([good[-1] | 0x80]), "TRAILING"),
    ]


def _escape_count(chunk: bytes, h: lzw.ChunkHeader) -> int:
    """Escapes in a version-3 chunk: symbols whose rank class is the escape's or above."""
    rank = {s: r for r, s in enumerate(h.model.perm)}
    out = lzw.decode_chunk(chunk)
    syms = lzw.unpack_symbols(out, h.layout, h.bias, h.n_symbols)
    return sum(1 for x in syms if rank[x] >> h.model.split_bits >= h.model.classes - 1)


def _codes_padding_defect(chunk: bytes) -> bytes:
    """Set an unused bit of the code section's last byte (the chunk must have one)."""
    h, esc = _escaped(chunk)
    low_len = (h.n_symbols * h.model.split_bits + 7) // 8
    leaves, _ = lzw._primed_tree(h.model.costs, h.model.threshold, h.model.extra, h.max_code_bits)
    reader, total = lzw._BitReader(chunk[h.header_size + low_len:]), 0
    while total < h.n_symbols:
        total += len(leaves[reader.read(h.max_code_bits)])
    if reader.bits_read % 8 == 0:
        raise AssertionError("v3_codes_padding needs padding bits after the last code")
    at = h.header_size + esc - 1
    return with_byte(chunk, at, chunk[at] | 0x80)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def reference_result(chunk: bytes) -> tuple[str, bytes | None]:
    try:
        return "ok", lzw.decode_chunk(chunk)
    except CodecError as e:
        return e.name, None


def make_index(vectors: list[Vector]) -> dict:
    entries = []
    names = set()
    for vec in vectors:
        if vec.name in names:
            raise ValueError(f"duplicate vector name {vec.name}")
        names.add(vec.name)
        got, output = reference_result(vec.chunk)
        if got != vec.expect:
            raise AssertionError(f"{vec.name}: the reference decoder gives {got}, the vector expects {vec.expect}")
        if vec.method is not None and vec.chunk[3] != vec.method:
            raise AssertionError(f"{vec.name}: chunk has method {vec.chunk[3]}, expected {vec.method}")
        entry = {"name": vec.name, "file": f"{vec.name}.qz", "what": vec.what, "expect": vec.expect}
        if output is not None:
            entry.update(length=len(output), sha256=hashlib.sha256(output).hexdigest())
        else:
            entry["code"] = lzw.ERROR_CODES[vec.expect]
        entries.append(entry)
    return {"format": "QZ chunk v1, v2 and v3 (docs/lzw-format.md)", "vectors": entries}


def write_golden(out_dir: Path) -> dict:
    vectors = (valid_vectors() + invalid_vectors() + valid_vectors_v2() + invalid_vectors_v2() + valid_vectors_v3()
               + invalid_vectors_v3())
    index = make_index(vectors)
    total = sum(len(v.chunk) for v in vectors)
    if total > MAX_TOTAL_BYTES:
        raise ValueError(f"golden vectors total {total} bytes, over the {MAX_TOTAL_BYTES} budget")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.qz"):
        stale.unlink()
    for vec in vectors:
        (out_dir / f"{vec.name}.qz").write_bytes(vec.chunk)
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def configure_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default tests/golden)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = configure_parser().parse_args(argv)
    index = write_golden(args.out)
    n_ok = sum(e["expect"] == "ok" for e in index["vectors"])
    total = sum((args.out / e["file"]).stat().st_size for e in index["vectors"])
    print(f"wrote {len(index['vectors'])} vectors ({n_ok} ok, {len(index['vectors']) - n_ok} invalid), "
          f"{total} bytes, to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
