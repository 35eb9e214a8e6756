"""The QZ decoder as the page runs it — static/js/qz.js (DecoderPool) → qz-worker.js → static/wasm/qz.wasm in
Chromium — against the golden vectors of tests/golden/ and the Python reference converter/lzw.py.

Chunks go into the page as base64 strings (page.evaluate arguments are JSON); all decoding of one test happens in
a single evaluate, so the page is loaded once per test.
"""
from __future__ import annotations

import base64
import hashlib
import json
import random
from pathlib import Path

import pytest

from converter import lzw
from converter.errors import CodecError

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
VECTORS = json.loads((GOLDEN / "index.json").read_text())["vectors"]

# Decode a list of [name, base64 chunk] with a DecoderPool of `size` workers. Every result is either
# {ok: true, b64, sha256, length} or {ok: false, codeName, code, message, isDecodeError}. `wantBytes` returns the
# output bytes as base64 as well (the random test compares bytes; the golden test compares hashes).
DECODE_IN_PAGE = """
async ([chunks, size, wantBytes]) => {
  const { DecoderPool, DecodeError } = await import('/static/js/qz.js');
  const fromB64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0)).buffer;
  const toB64 = (u8) => {
    let s = '';
    for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode(...u8.subarray(i, i + 0x8000));
    return btoa(s);
  };
  const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, '0')).join('');
  const pool = new DecoderPool(size);
  await pool.start();
  try {
    const results = await Promise.all(chunks.map(async ([name, b64]) => {
      try {
        const out = await pool.decode(fromB64(b64), name);
        return { name, ok: true, length: out.length, sha256: hex(await crypto.subtle.digest('SHA-256', out)),
                 b64: wantBytes ? toB64(out) : null };
      } catch (e) {
        return { name, ok: false, codeName: e.codeName ?? null, code: e.code ?? null, message: String(e),
                 isDecodeError: e instanceof DecodeError };
      }
    }));
    return { workers: pool.workers.length, results };
  } finally {
    pool.terminate();
  }
}
"""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def reference(chunk: bytes) -> tuple[str, bytes | None]:
    """("ok", output) or (error name, None) from the Python reference."""
    try:
        return "ok", lzw.decode_chunk(chunk)
    except CodecError as e:
        return e.name, None


def decode_in_page(page, server, chunks: list[tuple[str, bytes]], size: int, want_bytes: bool) -> dict:
    page.goto(server + "/")
    got = page.evaluate(DECODE_IN_PAGE, [[[name, b64(c)] for name, c in chunks], size, want_bytes])
    assert got["workers"] == size
    assert [r["name"] for r in got["results"]] == [name for name, _ in chunks]
    return got


# ---------------------------------------------------------------------------------------------------------------
# Golden vectors
# ---------------------------------------------------------------------------------------------------------------


def test_golden_vectors_in_chromium(page, server):
    chunks = [(v["name"], (GOLDEN / v["file"]).read_bytes()) for v in VECTORS]
    got = decode_in_page(page, server, chunks, size=2, want_bytes=False)["results"]
    assert len(got) == len(VECTORS) > 0
    assert {v["expect"] for v in VECTORS} > {"ok"}, "the golden set should hold invalid chunks too"
    failures = []
    for v, (_, chunk), r in zip(VECTORS, chunks, got):
        ref_name, ref_out = reference(chunk)
        assert ref_name == v["expect"], f"{v['name']}: index.json and converter.lzw disagree"
        if v["expect"] == "ok":
            want = dict(ok=True, length=v["length"], sha256=v["sha256"])
            assert hashlib.sha256(ref_out).hexdigest() == v["sha256"]
            have = dict(ok=r["ok"], length=r.get("length"), sha256=r.get("sha256"))
        else:
            want = dict(ok=False, codeName=v["expect"], code=v["code"], isDecodeError=True, where=True)
            have = dict(ok=r["ok"], codeName=r.get("codeName"), code=r.get("code"),
                        isDecodeError=r.get("isDecodeError"), where=v["name"] in (r.get("message") or ""))
        if have != want:
            failures.append(f"{v['name']} ({v['what']}): page {have}, expected {want}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------
# Random chunks through a 2-worker pool
# ---------------------------------------------------------------------------------------------------------------

# (alphabet, layout, bias): int8; ternary as int8, nibbles, crumbs; int4 as nibbles and as int8 bytes
KINDS = [(256, lzw.LAYOUT_U8, 0), (3, lzw.LAYOUT_U8, 1), (3, lzw.LAYOUT_U4, 0), (3, lzw.LAYOUT_U2, 0),
         (16, lzw.LAYOUT_U4, 0), (16, lzw.LAYOUT_U8, 8)]


def skewed_symbols(rng: random.Random, n: int, alphabet: int) -> bytes:
    """Weight-like symbols: a rounded Gaussian around the middle of the alphabet, clipped to it. A narrow sigma
    gives long LZW strings, a wide one makes LZW lose to packing (the chunk is then stored packed)."""
    mid = alphabet // 2
    sigma = rng.choice([0.3, 1.0, 3.0, alphabet / 4])
    return bytes(min(alphabet - 1, max(0, mid + round(rng.gauss(0, sigma)))) for _ in range(n))


def random_chunks(seed: int, count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    chunks = []
    for i in range(count):
        alphabet, layout, bias = rng.choice(KINDS)
        n = rng.choice([0, 1, 2, 3, rng.randrange(4, 64), rng.randrange(64, 4000), rng.randrange(4000, 12000)])
        mcb = rng.choice([9, 10, 12, 16])            # small dictionaries fill up: resets and frozen dictionaries
        reset = rng.random() < 0.7
        chunk = lzw.encode_chunk(skewed_symbols(rng, n, alphabet), alphabet, layout, bias, mcb, reset)
        chunks.append((f"random-{i} (A={alphabet} layout={layout} bias={bias} n={n} mcb={mcb} reset={reset})",
                       chunk))
    return chunks


def test_pool_of_two_decodes_random_chunks_like_the_reference(page, server):
    seed = 20240607
    chunks = random_chunks(seed, 200)
    methods = {c[3] for _, c in chunks}
    assert methods == {lzw.METHOD_PACKED, lzw.METHOD_LZW}, "the random set should hold both methods"
    got = decode_in_page(page, server, chunks, size=2, want_bytes=True)["results"]
    failures = []
    for (name, chunk), r in zip(chunks, got):
        want = lzw.decode_chunk(chunk)
        if not r["ok"]:
            failures.append(f"{name}: page rejected it: {r['message']}")
        elif base64.b64decode(r["b64"]) != want:
            failures.append(f"{name}: page gave {r['length']} bytes (sha256 {r['sha256'][:16]}), reference "
                            f"{len(want)} bytes (sha256 {hashlib.sha256(want).hexdigest()[:16]})")
    assert not failures, f"seed {seed}:\n" + "\n".join(failures)
