"""static/wasm/qz.wasm (through converter/wasm_codec.py) against the reference converter/lzw.py (versions 1 and 2)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from converter import codec, lzw
from converter.errors import CodecError

wasmtime = pytest.importorskip("wasmtime")
from converter import wasm_codec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
VECTORS = json.loads((GOLDEN / "index.json").read_text())["vectors"]


def result(decode, chunk: bytes) -> tuple[str, bytes | None]:
    """("ok", output) or (error name, None)."""
    try:
        return "ok", decode(chunk)
    except CodecError as e:
        return e.name, None


# ---------------------------------------------------------------------------------------------------------------
# The committed module
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("ziglang") is None, reason="the ziglang wheel is not installed")
def test_committed_wasm_is_reproducible(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import build_wasm
    finally:
        sys.path.remove(str(ROOT / "tools"))
    rebuilt = build_wasm.build_wasm(tmp_path / "qz.wasm")
    committed = wasm_codec.WASM_PATH.read_bytes()
    assert rebuilt.read_bytes() == committed, "static/wasm/qz.wasm is stale: run python tools/build_wasm.py"


def test_exports():
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(wasm_codec.WASM_PATH))
    names = {e.name for e in module.exports}
    assert {"memory", "qz_alloc", "qz_reset_heap", "qz_decoded_size", "qz_decode", "qz_encode_bound",
            "qz_encode"} <= names
    assert not list(module.imports)  # freestanding: the page needs no import object


def test_facade_backend(monkeypatch):
    monkeypatch.delenv(codec.ENV_VAR, raising=False)
    assert codec.available_backend() == "wasm"
    monkeypatch.setenv(codec.ENV_VAR, "python")
    assert codec.available_backend() == "python"
    chunk = codec.encode_chunk(b"\x01\x02" * 50, 3, lzw.LAYOUT_U2)
    assert codec.decode_chunk(chunk) == lzw.decode_chunk(chunk)
    monkeypatch.setenv(codec.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="valid choices"):
        codec.available_backend()


# ---------------------------------------------------------------------------------------------------------------
# Golden vectors: both decoders, identical results
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_golden_wasm_matches_reference(vector):
    chunk = (GOLDEN / vector["file"]).read_bytes()
    got = result(wasm_codec.decode_chunk, chunk)
    assert got == result(lzw.decode_chunk, chunk)
    assert got[0] == vector["expect"]
    if vector["expect"] == "ok":
        assert len(got[1]) == vector["length"] and hashlib.sha256(got[1]).hexdigest() == vector["sha256"]


def test_decode_into():
    chunk = (GOLDEN / "u4_a16_odd.qz").read_bytes()
    expected = lzw.decode_chunk(chunk)
    out = bytearray(len(expected) + 5)
    assert wasm_codec.decode_into(chunk, out) == len(expected)
    assert bytes(out[:len(expected)]) == expected and bytes(out[len(expected):]) == bytes(5)
    arr = np.zeros(len(expected), dtype=np.uint8)
    wasm_codec.decode_into(chunk, arr)
    assert arr.tobytes() == expected
    with pytest.raises(CodecError) as e:
        wasm_codec.decode_into(chunk, bytearray(len(expected) - 1))
    assert e.value.name == "OUT_TOO_SMALL"


def test_encode_bound_matches_wasm():
    qz = wasm_codec.load()
    v2 = wasm_codec.ENC_V2
    for n in (0, 1, 7, 1000, 262_144, 0x3FFF_FFFF, 0xFFFF_FFFF):
        for layout in (0, 1, 2, 7):
            for flags in (0, wasm_codec.ENC_RESET, wasm_codec.ENC_FORCE_LZW, wasm_codec.ENC_FORCE_PACKED, v2,
                          v2 | wasm_codec.ENC_FORCE_LZW, v2 | wasm_codec.ENC_PRIMED | wasm_codec.ENC_FORCE_LZW):
                with wasm_codec._lock:
                    got = qz.call(qz.encode_bound, n, layout, flags) & 0xFFFF_FFFF
                assert wasm_codec.encode_bound(n, layout, flags) == got, (n, layout, flags)


def test_huge_declared_output_is_refused():
    """n_symbols near 2^32: qz.c cannot return such a size in an i32 and answers OUT_TOO_SMALL up front."""
    chunk = lzw.ChunkHeader(1, lzw.METHOD_LZW, 256, lzw.LAYOUT_U8, 0, 16, 1, 0xFFFF_FFFF).to_bytes() + b"\x01"
    assert result(wasm_codec.decode_chunk, chunk)[0] == "OUT_TOO_SMALL"
    assert result(lzw.decode_chunk, chunk)[0] == "TRUNCATED"  # the reference has no such limit
    primed = (GOLDEN / "v2_u4_int4_odd.qz").read_bytes()
    huge = primed[:12] + (0xFFFF_FFFF).to_bytes(4, "little") + primed[16:]
    assert result(wasm_codec.decode_chunk, huge)[0] == "OUT_TOO_SMALL"


# ---------------------------------------------------------------------------------------------------------------
# Encoder: byte-identical to the reference
# ---------------------------------------------------------------------------------------------------------------


# (version, dictionary) choices of the encoder
CODERS = [dict(), dict(version=1), dict(dictionary=lzw.DICT_PRIMED), dict(dictionary=lzw.DICT_ADAPTIVE)]


def encode_cases():
    """Every alphabet/layout pairing and size with every code-width setting; the method and the coder vary
    (the version-2 default, forced methods and dictionaries, version 1), each seen with every pairing."""
    rng = random.Random(11)
    cases = []
    methods = [(None, {}), (lzw.METHOD_LZW, {}), (lzw.METHOD_PACKED, {})] + \
        [(m, c) for m in (None, lzw.METHOD_LZW) for c in CODERS[1:]]
    for alphabet, layout, bias in [(256, 0, 0), (3, 0, 1), (16, 0, 8), (16, 1, 0), (3, 1, 0), (4, 2, 0), (3, 2, 0),
                                   (2, 2, 0), (5, 0, 0), (255, 0, 3), (6, 1, 0)]:
        for n in (0, 1, 2, 5, 7, 100, 3001):
            sigma = alphabet / rng.choice([3, 8, 30, 100])
            mid = alphabet // 2
            symbols = bytes(min(alphabet - 1, max(0, mid + round(rng.gauss(0, sigma)))) for _ in range(n))
            for mcb, reset in ((16, True), (9, True), (9, False), (12, True), (10, True)):
                for method, coder in rng.sample(methods, 3):
                    cases.append(((symbols, alphabet, layout, bias, mcb, reset, method), coder))
    return cases


def test_wasm_encode_equals_reference():
    for args, coder in encode_cases():
        ref = lzw.encode_chunk(*args, **coder)
        assert wasm_codec.encode_chunk(*args, **coder) == ref, (args[1:], coder)
        assert wasm_codec.decode_chunk(ref) == lzw.decode_chunk(ref)


def test_wasm_encode_long_streams():
    """Many dictionary resets / a long frozen dictionary, and the packed fallback decision near the tie."""
    rng = np.random.default_rng(5)
    for alphabet, layout, sigma in [(16, lzw.LAYOUT_U4, 2.2), (256, lzw.LAYOUT_U8, 20.0), (3, lzw.LAYOUT_U2, 0.6),
                                    (4, lzw.LAYOUT_U2, 0.7)]:
        q = np.clip(np.rint(rng.normal(0, sigma, 200_000)) + alphabet // 2, 0, alphabet - 1).astype(np.uint8)
        for mcb, reset, version in ((16, True, 1), (16, False, 1), (10, True, 1), (16, True, 2), (10, False, 2)):
            ref = lzw.encode_chunk(q, alphabet, layout, max_code_bits=mcb, reset_when_full=reset, version=version)
            assert wasm_codec.encode_chunk(q, alphabet, layout, max_code_bits=mcb, reset_when_full=reset,
                                           version=version) == ref
            assert wasm_codec.decode_chunk(ref) == lzw.pack_symbols(q.tobytes(), layout)


def test_primed_tree_cache_gives_the_same_results():
    """qz.c keeps the last primed tree for the next chunk: chunks that share it, chunks that do not, adaptive chunks
    (which overwrite the entry table) and damaged chunks, in any order, decode exactly as the reference."""
    rng = np.random.default_rng(9)
    q = np.clip(np.rint(rng.normal(0, 2.0, 60_000)) + 8, 0, 15).astype(np.uint8)
    parts = [q[i:i + 20_000] for i in range(0, q.size, 20_000)]
    chunks = [lzw.encode_chunk(p, 16, lzw.LAYOUT_U4, dictionary=lzw.DICT_PRIMED) for p in parts]
    same_model = chunks[0][:lzw.parse_header(chunks[0]).header_size] + chunks[1][lzw.parse_header(chunks[1]).header_size:]
    chunks += [lzw.encode_chunk(parts[0], 16, lzw.LAYOUT_U4, method=lzw.METHOD_LZW, dictionary=lzw.DICT_ADAPTIVE),
               same_model, chunks[0][:-5], chunks[0] + b"\0"]
    chunks += [(GOLDEN / f"{name}.qz").read_bytes() for name in ("v2_width14_k2", "v2_u4_k1", "v2_tree_too_big")]
    order = random.Random(3)
    for _ in range(3):
        for chunk in order.sample(chunks, len(chunks)) * 2:
            assert result(wasm_codec.decode_chunk, chunk) == result(lzw.decode_chunk, chunk)


def test_wasm_encode_errors_match_reference():
    bad = [((b"\x00\x03", 3, 2), {}), ((b"\x00\x01", 1, 0), {}), ((b"\x00", 17, 1), {}), ((b"\x00", 4, 1), {"bias": 2}),
           ((b"\x00", 4, 0), {"max_code_bits": 8}), ((b"\x00", 4, 0), {"max_code_bits": 17}),
           ((b"\x00", 4, 7), {}), ((b"\x00", 4, 0), {"bias": 300}), ((b"\x00", 4, 0), {"version": 4}),
           ((b"\x00", 4, 0), {"dictionary": 5}), ((b"\x00", 4, 0), {"version": 1, "dictionary": lzw.DICT_PRIMED}),
           ((b"\x00\x04", 4, 2), {"dictionary": lzw.DICT_PRIMED}),
           ((b"\x00", 4, 0), {"dictionary": lzw.DICT_PRIMED, "max_code_bits": 8})]
    for args, kw in bad:
        with pytest.raises(CodecError) as ref:
            lzw.encode_chunk(*args, **kw)
        with pytest.raises(CodecError) as got:
            wasm_codec.encode_chunk(*args, **kw)
        assert got.value.code == ref.value.code, (args, kw)


# ---------------------------------------------------------------------------------------------------------------
# Mutation fuzz: both decoders agree on every damaged chunk
# ---------------------------------------------------------------------------------------------------------------


def mutate(rng: random.Random, chunk: bytes) -> bytes:
    data = bytearray(chunk)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        op = rng.randrange(6)
        if op == 0 and data:  # flip one bit (header or payload)
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and len(data) > 16:  # set a payload byte
            data[rng.randrange(16, len(data))] = rng.randrange(256)
        elif op == 2 and data:  # truncate
            del data[rng.randrange(len(data)):]
        elif op == 3:  # append
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
        elif op == 4 and len(data) > 16:  # delete a payload byte (shifts every later code)
            del data[rng.randrange(16, len(data))]
        elif op == 5 and len(data) >= 16:  # small change of n_symbols
            n = max(0, int.from_bytes(data[12:16], "little") + rng.randrange(-40, 41))
            data[12:16] = n.to_bytes(4, "little")
    return bytes(data)


def test_mutation_fuzz_decoders_agree():
    seeds = [v for v in VECTORS if v["expect"] == "ok" and (GOLDEN / v["file"]).stat().st_size < 4000]
    chunks = [(GOLDEN / v["file"]).read_bytes() for v in seeds]
    rng = random.Random(2024)
    outcomes = {}
    for i in range(900):
        chunk = mutate(rng, chunks[i % len(chunks)])
        if len(chunk) >= 16 and int.from_bytes(chunk[12:16], "little") > 1 << 20:
            continue  # keep allocations small (a flipped top bit of n_symbols)
        ref = result(lzw.decode_chunk, chunk)
        got = result(wasm_codec.decode_chunk, chunk)
        assert got == ref, (i, chunk.hex())
        outcomes[ref[0]] = outcomes.get(ref[0], 0) + 1
    # the mutations reach most error paths, not only the header check
    assert {"ok", "BAD_HEADER", "TRUNCATED", "BAD_CODE", "TRAILING"} <= set(outcomes), outcomes
