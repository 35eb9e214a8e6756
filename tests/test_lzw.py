"""The pure-Python reference of the QZ chunk format (converter/lzw.py, versions 1 and 2) against docs/lzw-format.md."""
from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from converter import lzw
from converter.errors import CodecError

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"

# (alphabet, layout, bias) pairs the runtime uses: int8, ternary as int8, int4, ternary/int2 in crumbs
KINDS = [(256, lzw.LAYOUT_U8, 0), (3, lzw.LAYOUT_U8, 1), (16, lzw.LAYOUT_U4, 0), (3, lzw.LAYOUT_U4, 0),
         (4, lzw.LAYOUT_U2, 0), (3, lzw.LAYOUT_U2, 0), (2, lzw.LAYOUT_U2, 0)]


def skewed(rng: random.Random, n: int, alphabet: int, sigma: float) -> bytes:
    mid = alphabet // 2
    return bytes(min(alphabet - 1, max(0, mid + round(rng.gauss(0, sigma)))) for _ in range(n))


def expected_output(symbols: bytes, layout: int, bias: int) -> bytes:
    """The output layout written out independently of lzw.pack_symbols."""
    if layout == lzw.LAYOUT_U8:
        return bytes((s - bias) % 256 for s in symbols)
    per = 2 if layout == lzw.LAYOUT_U4 else 4
    out = bytearray((len(symbols) + per - 1) // per)
    for i, s in enumerate(symbols):
        out[i // per] |= s << ((8 // per) * (i % per))
    return bytes(out)


def roundtrip(symbols: bytes, alphabet: int, layout: int, bias: int = 0, **kw) -> bytes:
    chunk = lzw.encode_chunk(symbols, alphabet, layout, bias, **kw)
    assert lzw.decode_chunk(chunk) == expected_output(symbols, layout, bias)
    out = bytearray(lzw.layout_nbytes(layout, len(symbols)) + 3)
    assert lzw.decode_into(chunk, out) == lzw.layout_nbytes(layout, len(symbols))
    return chunk


# ---------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------


# (version, dictionary) choices of the encoder
CODERS = [dict(), dict(version=1), dict(dictionary=lzw.DICT_PRIMED), dict(dictionary=lzw.DICT_ADAPTIVE)]


@pytest.mark.parametrize("alphabet,layout,bias", KINDS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 33, 1000, 4097])
def test_roundtrip_uniform_and_skewed(alphabet, layout, bias, n):
    rng = random.Random(n * 1000 + alphabet)
    roundtrip(bytes(rng.randrange(alphabet) for _ in range(n)), alphabet, layout, bias)
    for coder in CODERS:
        roundtrip(skewed(rng, n, alphabet, alphabet / 8), alphabet, layout, bias, **coder)
        roundtrip(skewed(rng, n, alphabet, alphabet / 8), alphabet, layout, bias, method=lzw.METHOD_LZW, **coder)
    roundtrip(skewed(rng, n, alphabet, alphabet / 8), alphabet, layout, bias, method=lzw.METHOD_PACKED)


@pytest.mark.parametrize("max_code_bits", [9, 10, 12, 16])
@pytest.mark.parametrize("reset_when_full", [True, False])
@pytest.mark.parametrize("version", [1, 2])
def test_roundtrip_dictionary_full(max_code_bits, reset_when_full, version):
    rng = random.Random(max_code_bits)
    for alphabet, layout, bias in [(256, lzw.LAYOUT_U8, 0), (16, lzw.LAYOUT_U4, 0), (3, lzw.LAYOUT_U2, 0)]:
        symbols = skewed(rng, 30_000, alphabet, alphabet / 5)
        chunk = roundtrip(symbols, alphabet, layout, bias, max_code_bits=max_code_bits,
                          reset_when_full=reset_when_full, method=lzw.METHOD_LZW, version=version,
                          dictionary=lzw.DICT_ADAPTIVE)
        h = lzw.parse_header(chunk)
        assert h.max_code_bits == max_code_bits and h.reset_when_full == reset_when_full
        assert h.version == version and h.dictionary == lzw.DICT_ADAPTIVE


def test_reset_emits_clear_codes():
    """With max_code_bits 9 and A=256 the dictionary fills every 255 codes; the stream must hold CLEARs."""
    rng = random.Random(7)
    symbols = bytes(rng.randrange(256) for _ in range(3000))
    reset = lzw.encode_chunk(symbols, 256, lzw.LAYOUT_U8, max_code_bits=9, method=lzw.METHOD_LZW, version=1)
    frozen = lzw.encode_chunk(symbols, 256, lzw.LAYOUT_U8, max_code_bits=9, reset_when_full=False,
                              method=lzw.METHOD_LZW, version=1)
    # every code is 9 bits wide here (bit_length(256) = 9 = max_code_bits): count the CLEARs directly
    codes = _codes_9bit(reset[16:])
    assert codes.count(256) >= 10
    assert 256 not in _codes_9bit(frozen[16:])
    assert lzw.decode_chunk(reset) == lzw.decode_chunk(frozen) == symbols


def _codes_9bit(payload: bytes) -> list[int]:
    value = int.from_bytes(payload, "little")
    return [(value >> (9 * i)) & 0x1FF for i in range(len(payload) * 8 // 9)]


def test_kwkwk_run():
    for n in (1, 2, 3, 6, 100, 5000):
        chunk = roundtrip(b"\x02" * n, 3, lzw.LAYOUT_U2, version=1)
        assert chunk[3] == lzw.METHOD_LZW
        roundtrip(b"\x02" * n, 3, lzw.LAYOUT_U2, dictionary=lzw.DICT_PRIMED)
    # a run of n symbols needs about sqrt(2n) adaptive codes; version 2 picks the adaptive dictionary for it
    for version in (1, 2):
        chunk = lzw.encode_chunk(bytes(100_000), 2, lzw.LAYOUT_U8, version=version)
        assert len(chunk) < 16 + 500 * 2 and lzw.parse_header(chunk).dictionary == lzw.DICT_ADAPTIVE


def test_empty_and_single():
    for alphabet, layout, bias in KINDS:
        empty = roundtrip(b"", alphabet, layout, bias)
        assert len(empty) == lzw.HEADER_SIZE and empty[3] == lzw.METHOD_LZW  # 0 <= 0: a tie stays LZW
        roundtrip(bytes([alphabet - 1]), alphabet, layout, bias)


def test_incompressible_falls_back_to_packed():
    rng = random.Random(3)
    for alphabet, layout, bias in [(256, lzw.LAYOUT_U8, 0), (16, lzw.LAYOUT_U4, 0), (4, lzw.LAYOUT_U2, 0)]:
        symbols = bytes(rng.randrange(alphabet) for _ in range(5001))
        chunk = roundtrip(symbols, alphabet, layout, bias)
        assert chunk[3] == lzw.METHOD_PACKED
        assert chunk[8] == 0 and chunk[9] == 0  # packed: max_code_bits and flags are 0
        assert len(chunk) == 16 + lzw.layout_nbytes(layout, len(symbols))
        forced = lzw.encode_chunk(symbols, alphabet, layout, bias, method=lzw.METHOD_LZW)
        assert len(forced) > len(chunk)


def test_numpy_input_is_accepted():
    symbols = np.array([0, 1, 2, 1, 1, 1, 0, 2], dtype=np.uint8)
    assert lzw.encode_chunk(symbols, 3, lzw.LAYOUT_U2) == lzw.encode_chunk(symbols.tobytes(), 3, lzw.LAYOUT_U2)
    with pytest.raises(TypeError):
        lzw.encode_chunk(symbols.astype(np.int32), 3, lzw.LAYOUT_U2)


def test_decode_does_not_import_numpy():
    """The decoder must run under Pyodide without numpy: check in a fresh interpreter."""
    import subprocess

    code = ("import sys, hashlib; sys.modules['numpy'] = None\n"
            "from converter import lzw\n"
            "c = bytes.fromhex('515a0101030000010901000003000000') + bytes([1 | 4 << 2])\n"
            "print(lzw.decode_chunk(c).hex())\n"
            "print(hashlib.sha256(lzw.decode_chunk(open('tests/golden/v2_u4_int4_odd.qz', 'rb').read())).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    first, second = out.stdout.split()
    assert first == "000000"  # codes 1, 4 = "11" (KwKwK): three symbols 1, bias 1 -> bytes 0
    assert second == next(v["sha256"] for v in golden_vectors() if v["name"] == "v2_u4_int4_odd")


# ---------------------------------------------------------------------------------------------------------------
# Format details
# ---------------------------------------------------------------------------------------------------------------


def test_header_bytes():
    chunk = lzw.encode_chunk(b"\x01\x02\x01\x02", 3, lzw.LAYOUT_U8, bias=1, max_code_bits=12, method=lzw.METHOD_LZW,
                             version=1)
    assert chunk[:16] == bytes([ord("Q"), ord("Z"), 1, 1, 3, 0, 0, 1, 12, 1, 0, 0, 4, 0, 0, 0])
    h = lzw.parse_header(chunk)
    assert h == lzw.ChunkHeader(version=1, method=1, alphabet=3, layout=0, bias=1, max_code_bits=12, flags=1,
                                n_symbols=4)
    assert h.to_bytes() == chunk[:16] and h.output_nbytes == 4 and h.header_size == 16
    with pytest.raises(Exception):
        h.n_symbols = 5  # frozen
    # version 2, adaptive: the same, with the version byte 2 and dictionary byte 10 = 0
    v2 = lzw.encode_chunk(b"\x01\x02\x01\x02", 3, lzw.LAYOUT_U8, bias=1, max_code_bits=12, method=lzw.METHOD_LZW,
                          dictionary=lzw.DICT_ADAPTIVE)
    assert v2[:16] == bytes([ord("Q"), ord("Z"), 2, 1, 3, 0, 0, 1, 12, 1, 0, 0, 4, 0, 0, 0]) and v2[16:] == chunk[16:]


def test_primed_header_and_model_block():
    symbols = bytes([0, 1, 1, 2, 1, 1, 0, 1] * 50)  # counts: 1 -> 250, 0 -> 100, 2 -> 50
    chunk = lzw.encode_chunk(symbols, 3, lzw.LAYOUT_U8, bias=1, method=lzw.METHOD_LZW, dictionary=lzw.DICT_PRIMED,
                             version=2)
    h = lzw.parse_header(chunk)
    m = h.model
    assert (h.version, h.method, h.dictionary, h.flags) == (2, lzw.METHOD_LZW, lzw.DICT_PRIMED, 0)
    assert chunk[10] == lzw.DICT_PRIMED and chunk[11] == 0 and 9 <= h.max_code_bits <= lzw.PRIMED_CODE_BITS
    assert m.split_bits == 0 and m.classes == 3 and m.perm == bytes([1, 0, 2])
    assert list(m.costs) == [lzw.class_cost(c, 400) for c in (250, 100, 50)] == [11, 32, 48]
    assert chunk[16:24] == bytes([0, 0, 3, 0]) + m.threshold.to_bytes(2, "little") + m.extra.to_bytes(2, "little")
    assert chunk[24:27] == m.perm and chunk[27:30] == m.costs and h.header_size == 30
    assert h.to_bytes() == chunk[:30]
    assert lzw.decode_chunk(chunk) == bytes((s - 1) % 256 for s in symbols)


def test_log2_and_costs():
    assert [lzw.log2_q16(x) for x in (1, 2, 4, 1 << 32)] == [0, 1 << 16, 2 << 16, 32 << 16]
    for x in (3, 5, 7, 1000, 262_143, 0xFFFF_FFFF, (1 << 33) - 1):
        assert abs(lzw.log2_q16(x) - math.log2(x) * 65536) < 2, x
    assert lzw.class_cost(1, 2) == 16 and lzw.class_cost(1, 3) == 25  # round(16 * 1.585)
    assert lzw.class_cost(5, 5) == 1  # clamped: probability 1 still costs 1/16 bit
    assert lzw.class_cost(0, 5) == 255 and lzw.class_cost(1, 1 << 20) == 255  # 20 bits: clamped


def test_primed_tree_example():
    """The example drawn in converter/lzw.py and docs/lzw-format.md: M = 3, costs (8, 25, 25), T = 24."""
    leaves, table = lzw._primed_tree([8, 25, 25], 24, 0, 9)
    assert leaves == [b"\0\0\0\0", b"\0\0\0\1", b"\0\0\0\2", b"\0\0\1", b"\0\0\2", b"\0\1", b"\0\2",
                      b"\1", b"\2"]
    assert table[:3] == [1, ~7, ~8]  # root: class 0 -> node 1, classes 1 and 2 -> leaves 7 and 8
    # E = 1: of the nodes of cost T + 1 = 25 ("1" and "2"), the first in preorder is expanded too
    leaves, _ = lzw._primed_tree([8, 25, 25], 24, 1, 9)
    assert leaves[7:] == [b"\1\0", b"\1\1", b"\1\2", b"\2"]
    assert len(lzw._primed_tree([8, 25, 25], 24, 2, 9)[0]) == 13
    with pytest.raises(CodecError, match="extra 3"):
        lzw._primed_tree([8, 25, 25], 24, 3, 9)
    with pytest.raises(CodecError, match="more than 2\\*\\*9 leaves"):
        lzw._primed_tree([1, 1], 200, 0, 9)


def _leaves(costs, t, e, width):
    try:
        return len(lzw._primed_tree(costs, t, e, width)[0])
    except CodecError:
        return None


@pytest.mark.parametrize("seed", range(12))
def test_choose_threshold_is_the_largest(seed):
    """T is the largest threshold whose tree fits 2**width leaves; E the largest count of extra expansions."""
    rng = random.Random(seed)
    m = rng.choice([2, 3, 4, 8, 16])
    costs = sorted(rng.randrange(1 if seed % 3 == 0 else 4, 120) for _ in range(m))  # seed % 3 == 0: the cap binds
    width = rng.choice([9, 10, 12])
    t, e = lzw._choose_threshold(costs, width)
    assert _leaves(costs, t, e, width) is not None
    assert _leaves(costs, t, e + 1, width) is None  # too many leaves, or not that many nodes of cost T + 1
    if t < lzw.MAX_THRESHOLD:
        assert _leaves(costs, t + 1, 0, width) is None


def test_primed_split_candidates():
    assert lzw.primed_split_candidates(256) == [2, 3, 4, 5, 6, 7]
    assert lzw.primed_split_candidates(16) == [0, 1, 2, 3]
    assert lzw.primed_split_candidates(4) == [0, 1]
    assert lzw.primed_split_candidates(3) == [0] and lzw.primed_split_candidates(255) == [0]


def test_primed_last_phrase_is_cut():
    """The tree parse of "0000 0" ends inside a phrase: the code of the first leaf below it is sent, and the decoder
    drops what passes n_symbols."""
    symbols = bytes([0] * 7)
    model = lzw.PrimedModel(0, 2, 20, 0, bytes([0, 1]), bytes([5, 40]))  # "0000" is a leaf (cost 20 <= T: depth 4)
    leaves, table = lzw._primed_tree(model.costs, model.threshold, model.extra, 9)
    codes = lzw._primed_parse(symbols, table, 2)
    assert [leaves[c] for c in codes][-1] == b"\0\0\0\0\0"  # 5 symbols sent, 3 of them used
    chunk = lzw.ChunkHeader(2, 1, 2, lzw.LAYOUT_U8, 0, 9, 0, 7, lzw.DICT_PRIMED, model).to_bytes() \
        + lzw._write_fields(codes, 9)
    assert lzw.decode_chunk(chunk) == symbols


def test_version_2_is_never_larger_than_version_1_or_packed():
    rng = random.Random(4)
    for alphabet, layout, bias in KINDS:
        for sigma in (0.2, 1.0, alphabet / 8, alphabet):
            symbols = skewed(rng, 3000, alphabet, sigma)
            v2 = lzw.encode_chunk(symbols, alphabet, layout, bias)
            v1 = lzw.encode_chunk(symbols, alphabet, layout, bias, version=1)
            assert len(v2) <= len(v1) <= lzw.HEADER_SIZE + lzw.layout_nbytes(layout, len(symbols))


def test_code_widths_and_bit_order():
    """A=3: code k is bit_length(min(3 + k, 2^mcb - 1)) wide: 2, 3, 3, 3, 3, 4, ... ; LSB first."""
    assert [lzw.code_width(3, k, 9) for k in range(7)] == [2, 3, 3, 3, 3, 4, 4]
    assert lzw.code_width(256, 0, 9) == 9 and lzw.code_width(256, 10_000, 9) == 9
    assert lzw.code_width(16, 70_000, 16) == 16
    # symbols 1 2 1 2 1: codes 1 (2 bits), 2 (3 bits), 4 = "12" (3 bits), 1 (3 bits)
    chunk = lzw.encode_chunk(b"\x01\x02\x01\x02\x01", 3, lzw.LAYOUT_U8, method=lzw.METHOD_LZW, version=1)
    bits = 1 | 2 << 2 | 4 << 5 | 1 << 8
    assert chunk[16:] == bits.to_bytes(2, "little")


def test_layout_packing():
    assert lzw.pack_symbols(b"\x01\x02\x03", lzw.LAYOUT_U4) == bytes([0x21, 0x03])
    assert lzw.pack_symbols(b"\x01\x02\x03\x00\x01", lzw.LAYOUT_U2) == bytes([0b00_11_10_01, 0x01])
    assert lzw.pack_symbols(b"\x00\x01\x02", lzw.LAYOUT_U8, bias=1) == bytes([0xFF, 0x00, 0x01])
    assert [lzw.layout_nbytes(layout, 5) for layout in (0, 1, 2)] == [5, 3, 2]


@pytest.mark.parametrize("kwargs", [
    dict(alphabet=1, layout=0), dict(alphabet=257, layout=0), dict(alphabet=17, layout=1), dict(alphabet=5, layout=2),
    dict(alphabet=4, layout=3), dict(alphabet=4, layout=1, bias=1), dict(alphabet=4, layout=0, bias=256),
    dict(alphabet=4, layout=0, max_code_bits=8), dict(alphabet=4, layout=0, max_code_bits=17),
    dict(alphabet=4, layout=0, method=2), dict(alphabet=4, layout=0, version=4),
    dict(alphabet=4, layout=0, dictionary=2), dict(alphabet=4, layout=0, version=1, dictionary=lzw.DICT_PRIMED),
    dict(alphabet=4, layout=0, dictionary=lzw.DICT_PRIMED, max_code_bits=17),
])
def test_encode_rejects_bad_parameters(kwargs):
    with pytest.raises(CodecError) as e:
        lzw.encode_chunk(b"\x00\x01", **kwargs)
    assert e.value.code == lzw.BAD_HEADER and e.value.name == "BAD_HEADER"


def test_encode_rejects_bad_symbols_and_forced_packed_ignores_code_bits():
    with pytest.raises(CodecError) as e:
        lzw.encode_chunk(b"\x00\x03", 3, lzw.LAYOUT_U2)
    assert e.value.name == "BAD_SYMBOL"
    chunk = lzw.encode_chunk(b"\x00\x02", 3, lzw.LAYOUT_U2, max_code_bits=99, method=lzw.METHOD_PACKED)
    assert chunk[3] == lzw.METHOD_PACKED and lzw.decode_chunk(chunk) == bytes([0x08])


def test_decode_into_checks_size():
    chunk = lzw.encode_chunk(b"\x01" * 9, 4, lzw.LAYOUT_U2)
    with pytest.raises(CodecError) as e:
        lzw.decode_into(chunk, bytearray(2))
    assert e.value.name == "OUT_TOO_SMALL"
    assert lzw.decode_into(chunk, bytearray(3)) == 3
    # a primed chunk whose tree breaks the rules: OUT_TOO_SMALL comes first (the tree is built while decoding)
    bad_tree = (GOLDEN / "v2_tree_too_big.qz").read_bytes()
    size = lzw.parse_header(bad_tree).output_nbytes
    with pytest.raises(CodecError) as e:
        lzw.decode_into(bad_tree, bytearray(size - 1))
    assert e.value.name == "OUT_TOO_SMALL"
    with pytest.raises(CodecError) as e:
        lzw.decode_into(bad_tree, bytearray(size))
    assert e.value.name == "BAD_HEADER"


def test_error_names_agree_with_errors_module():
    assert lzw.ERROR_NAMES[0] == "OK"
    for code, name in lzw.ERROR_NAMES.items():
        if code:
            assert CodecError(code).name == name
            assert CodecError.NAMES[code] == name


# ---------------------------------------------------------------------------------------------------------------
# Golden vectors (reference side; test_wasm_codec.py runs them through qz.wasm too)
# ---------------------------------------------------------------------------------------------------------------


def golden_vectors() -> list[dict]:
    return json.loads((GOLDEN / "index.json").read_text())["vectors"]


@pytest.mark.parametrize("vector", golden_vectors(), ids=lambda v: v["name"])
def test_golden_reference(vector):
    chunk = (GOLDEN / vector["file"]).read_bytes()
    if vector["expect"] == "ok":
        out = lzw.decode_chunk(chunk)
        assert len(out) == vector["length"] and hashlib.sha256(out).hexdigest() == vector["sha256"]
    else:
        with pytest.raises(CodecError) as e:
            lzw.decode_chunk(chunk)
        assert e.value.name == vector["expect"] and e.value.code == vector["code"]


def test_golden_files_are_what_make_golden_writes(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_golden
    finally:
        sys.path.remove(str(ROOT / "tools"))
    make_golden.write_golden(tmp_path)
    committed = sorted(p.name for p in GOLDEN.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == committed
    for name in committed:
        assert (tmp_path / name).read_bytes() == (GOLDEN / name).read_bytes(), name
    assert sum((GOLDEN / n).stat().st_size for n in committed) < 200_000


def test_version_3_escape_only_when_it_saves_a_64th():
    """Peaked int8-like codes (int8-eB): version 3 sends the rare classes through an escape and is >= 1/64 smaller;
    flat int4-like codes gain less than that and stay byte for byte what version 2 writes."""
    rng = np.random.default_rng(7)
    peaked = (np.clip(np.rint(rng.standard_normal(60_000) * 3.0), -127, 127).astype(np.int8).view(np.uint8)).tobytes()
    v3, v2 = lzw.encode_chunk(peaked, 256, lzw.LAYOUT_U8), lzw.encode_chunk(peaked, 256, lzw.LAYOUT_U8, version=2)
    h = lzw.parse_header(v3)
    assert h.version == 3 and h.model.escape_bits > 0 and len(v3) + len(v3) // 64 < len(v2)
    assert lzw.decode_chunk(v3) == lzw.decode_chunk(v2) == peaked
    flat = bytes(rng.integers(0, 16, 20_000, dtype=np.uint8))
    assert lzw.encode_chunk(flat, 16, lzw.LAYOUT_U4) == lzw.encode_chunk(flat, 16, lzw.LAYOUT_U4, version=2)
