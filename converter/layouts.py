"""How each scheme's quantized tensor becomes ONNX initializers (bytes + dtype + shape) and which op consumes it.

This is the one table that ties a scheme to its runtime layout. Two op families carry quantized linear layers:

  "dqmm"   com.microsoft DynamicQuantizeMatMul: B int8 (in, out) = transposed codes, per-output-channel scale.
           Used by per-channel int8 and ternary (codes -1/0/+1 as int8).
  "nbits"  com.microsoft MatMulNBits: B uint8 (out, n_blocks, block_bytes) = codes of each row, packed low bits
           first, per-block scales (out * n_blocks) and packed integer zero points. Used by the group schemes;
           GGUF Q4_1 (q4_1) stores f16 block minimums (".mins") instead (onnx_export.offset_linear); int4-mG
           stores ".row_scales" (f16, one per row) and ".mults" (packed like the zero points) instead of ".scales",
           which loaders multiply into MatMulNBits' per-block scales (block_scales, below).

and the float schemes use plain MatMul ("f32": B float32 (in, out); "f16": float16 + Cast).

Each initializer that carries codes is a *symbol stream* (alphabet, layout, bias of docs/lzw-format.md), so the
LZW decoder writes the initializer's bytes directly. Scales/zero points/norms are byte streams (alphabet 256).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lzw import LAYOUT_U2, LAYOUT_U4, LAYOUT_U8
from .quant import Quantized, get_scheme


@dataclass(frozen=True)
class Initializer:
    name: str                 # ONNX initializer name
    dtype: str                # numpy dtype name of the runtime tensor: float32, float16, int8, uint8
    shape: tuple[int, ...]    # runtime shape
    symbols: np.ndarray       # 1-D uint8 symbol stream in runtime order (< alphabet)
    alphabet: int             # 256 for byte streams
    layout: int               # LAYOUT_U8 / U4 / U2
    bias: int = 0             # LAYOUT_U8: byte = (symbol - bias) mod 256

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def byte_stream(name: str, a: np.ndarray) -> Initializer:
    """A float/int array stored as its little-endian bytes (alphabet 256)."""
    a = np.ascontiguousarray(a)
    return Initializer(name, a.dtype.name, tuple(a.shape), a.view(np.uint8).reshape(-1), 256, LAYOUT_U8)


def family(scheme: str) -> str:
    """Op family of a scheme: "f32", "f16", "dqmm" or "nbits"."""
    s = get_scheme(scheme)
    if s.name in ("f32", "f16"):
        return s.name
    return "dqmm" if s.group == 0 else "nbits"


def _pack_zeros(z: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits zero points: (rows, n_blocks) uint8 -> (rows, ceil(n_blocks * bits / 8)), low bits first."""
    per = 8 // bits
    rows, nb = z.shape
    pad = (-nb) % per
    zz = np.concatenate([z, np.zeros((rows, pad), np.uint8)], axis=1).reshape(rows, -1, per).astype(np.uint8)
    out = np.zeros(zz.shape[:2], np.uint8)
    for j in range(per):
        out |= (zz[:, :, j] << (bits * j)).astype(np.uint8)
    return out


def linear_initializers(prefix: str, q: Quantized) -> list[Initializer]:
    """Initializers of one linear weight (HF shape (out, in)) in the layout of its op family.

    prefix: the HF tensor name, e.g. "model.layers.0.self_attn.q_proj.weight".
    """
    fam = family(q.scheme)
    rows, cols = q.shape
    if fam == "f32":
        return [byte_stream(prefix, np.ascontiguousarray(q.symbols.T, np.float32))]          # (in, out)
    if fam == "f16":
        return [byte_stream(prefix, np.ascontiguousarray(q.symbols.T, np.float16))]          # (in, out)
    scheme = get_scheme(q.scheme)
    if fam == "dqmm":
        codes = np.ascontiguousarray(q.symbols.T).reshape(-1)                                # (in, out) symbols
        bias = 1 if scheme.alphabet == 3 else 0                                              # ternary: q + 1
        return [Initializer(prefix + ".q", "int8", (cols, rows), codes, scheme.alphabet, LAYOUT_U8, bias),
                byte_stream(prefix + ".scales", q.scales.reshape(rows))]                     # f16 (out,)
    # nbits: rows of codes, groups of `group` along the row, `bits` per code packed low first
    bits, group = scheme.bits, scheme.group
    n_blocks = cols // group
    if scheme.alphabet == 256:
        codes = (q.symbols.view(np.int8).astype(np.int16) + 128).astype(np.uint8)           # MatMulNBits 8-bit: zp 128
        layout, zeros = LAYOUT_U8, None
    else:
        codes = q.symbols
        layout = LAYOUT_U4 if bits == 4 else LAYOUT_U2
        zeros = q.zeros if q.zeros is not None else np.full((rows, n_blocks), 1, np.uint8)  # ternary-g: zp 1
        if q.mins is not None:
            zeros = None                                            # q4_1: float offsets instead (".mins")
    out = [Initializer(prefix + ".q", "uint8", (rows, n_blocks, group * bits // 8), codes.reshape(-1),
                       256 if scheme.alphabet == 256 else scheme.alphabet, layout)]
    if q.mults is not None:             # int4-mG: one f16 scale per row, a multiplier per group packed as zeros are
        out += [byte_stream(prefix + ".row_scales", q.scales.reshape(rows)),
                byte_stream(prefix + ".mults", _pack_zeros(q.mults, bits).reshape(-1))]
    else:
        out.append(byte_stream(prefix + ".scales", q.scales.reshape(rows * n_blocks)))       # f16 (out*n_blocks,)
    if zeros is not None:
        out.append(byte_stream(prefix + ".zeros", _pack_zeros(zeros, bits).reshape(-1)))
    if q.mins is not None:
        out.append(byte_stream(prefix + ".mins", q.mins.astype(np.float16).reshape(rows * n_blocks)))  # f16
    return out


def nbits_of(scheme: str) -> tuple[int, int]:
    s = get_scheme(scheme)
    return s.bits, s.group


# ---- the wasm graph's transposed codes (onnx_export.group_gemm_linear) --------------------------------------------
# The group-GEMM graph multiplies [K/b, 1, b, N] one-code-per-byte weights (b = the group size): the codes of the
# (K, N) transposed matrix, in that shape so that no Reshape copies them at session creation. Loaders derive them
# from a group scheme's packed codes (rows = N, n_blocks, block_bytes) as NAME.kn while placing the decoded chunks,
# so onnxruntime never holds the packed copy and spends no session time unpacking it.
KN_SUFFIX = ".kn"
LAYOUT_BITS = {LAYOUT_U8: 8, LAYOUT_U4: 4, LAYOUT_U2: 2}


def kn_shape(shape: list[int] | tuple[int, ...], layout: int) -> tuple[int, int, int, int]:
    """(n_blocks, 1, block, N) — the (K, N) transposed codes, K = n_blocks * block — of a packed
    (N, n_blocks, block_bytes) codes initializer."""
    rows, n_blocks, block_bytes = shape
    return n_blocks, 1, block_bytes * 8 // LAYOUT_BITS[layout], rows


# ---- the wasm graph's per-group tables ------------------------------------------------------------------------------
# The group-GEMM graph scales group j of output n by table[j, 0, 0, n]: float32 scales and one-per-byte zero points
# in (n_blocks, 1, 1, N). Built in the graph from the stored float16 scales and packed zero points (Cast, Reshape,
# Transpose; unpacking), onnxruntime folded them at session creation — and the folding's intermediate copies raised
# onnxruntime-web's wasm heap, which never shrinks, from 172 to 207 MiB for SmolLM2 int4-g32 (README). So loaders
# derive them, as NAME.kn for NAME = the scales or zeros initializer (manifest graph_wasm.group_tables), from the
# decoded initializer and its codes' (N, n_blocks, block_bytes) shape.


def group_table_shape(codes_shape) -> tuple[int, int, int, int]:
    """(n_blocks, 1, 1, N) of the per-group tables of a (N, n_blocks, block_bytes) codes initializer."""
    rows, n_blocks, _ = codes_shape
    return n_blocks, 1, 1, rows


def group_table_codes(name: str) -> str:
    """The codes initializer whose groups a scales / zeros initializer describes (NAME.scales -> NAME.q)."""
    return name.rsplit(".", 1)[0] + ".q"


def group_table(values: np.ndarray, codes_shape, codes_layout: int) -> np.ndarray:
    """float16 scales [N * n_blocks] -> float32 (n_blocks, 1, 1, N); packed zero points (each row's n_blocks codes
    low bits first in whole bytes, the codes' bit width) -> uint8 (n_blocks, 1, 1, N), one per byte."""
    nb, _, _, n = group_table_shape(codes_shape)
    if values.dtype == np.float16:
        table = values.reshape(n, nb).astype(np.float32)
    else:
        bits = LAYOUT_BITS[codes_layout]
        flat = values.reshape(n, -1)
        table = np.stack([(flat >> (bits * j)) & ((1 << bits) - 1) for j in range(8 // bits)], axis=-1)
        table = table.reshape(n, -1)[:, :nb].astype(np.uint8)
    return np.ascontiguousarray(table.T).reshape(nb, 1, 1, n)


# ---- the wasm graph's int8 tables in pieces ------------------------------------------------------------------------
# onnxruntime-web's wasm integer GEMM slows down on large matrices: SmolLM2's [576 × 49,152] lm_head (an int8
# embedding's codes, stored (H, V)) ran at half the speed per multiply-add of the layers' matmuls, 8.4 ms a token in
# Node at 1 thread, and 4.2 ms as one batched GEMM over 64 pieces of 768 columns; a Llama-3.2-1B-shaped chain of int8
# matmuls 2.3× faster in pieces of 128 (docs/page-bench.md, session 20). So the wasm graph reads such (K, N) tables
# as NAME.pieces, (P, K, n) with P·n = N (manifest graph_wasm.pieces: NAME -> n): each matmul is one
# MatMulIntegerToFloat with a batch of P, and the embedding's Gather a GatherND at (v // n, k, v % n). Loaders put the
# decoded table in that order (the page's decoders as they place the bytes: kn.js), so it is held once.
PIECES_SUFFIX = ".pieces"
PIECE_MAX = 768           # measured: 384–768 columns a piece are equally fast, 1,536 slower, 49,152 (one) 2× slower
LAYER_PIECE_MAX = 128     # the layers' int8 codes: 1B shapes 2.3× faster in pieces of 128, 2.2× of 256, 1.6× of 512
LAYER_PIECE_MIN_WEIGHTS = 1 << 22   # ... for matrices of 4M weights and more (Llama-3.2-1B's q, o and MLP): SmolLM2's
                                    # (≤ 0.9M) gained 3 % a step in the page and cost 7.5 MiB and 0.6 s of session
PIECE_MIN = 32
VOCAB_CODES = ("model.embed_tokens.weight.q", "lm_head.weight.q")


def piece_width(columns: int, most: int = PIECE_MAX) -> int | None:
    """n for a table of `columns` columns: its largest divisor not above `most` nor columns / 2 (so there are at
    least two pieces); None when that falls below PIECE_MIN (the graph then reads the plain table)."""
    for n in range(min(most, columns // 2), PIECE_MIN - 1, -1):
        if columns % n == 0:
            return n
    return None


def pieces_shape(shape, width: int) -> tuple[int, int, int]:
    """(P, H, n) of the pieces of an (H, V) table cut every `width` columns."""
    h, v = shape
    return v // width, h, width


def column_pieces(table: np.ndarray, width: int) -> np.ndarray:
    """(H, V) -> (P, H, n): piece p holds columns p·n .. p·n + n − 1 of every row."""
    p, h, n = pieces_shape(table.shape, width)
    return np.ascontiguousarray(table.reshape(h, p, n).transpose(1, 0, 2))


def kn_tables(graph: dict) -> dict[str, bool]:
    """NAME -> whether the graph reads NAME itself too, for every initializer a graph's manifest entry says it reads
    as NAME.kn: the codes of its "transposed" table and the scales / zero points of its "group_tables"."""
    return {**graph.get("transposed", {}), **graph.get("group_tables", {})}


def kn_initializer(name: str, values: np.ndarray, entries: dict[str, dict]) -> np.ndarray:
    """NAME.kn from initializer NAME's decoded values (entries: the manifest's initializers by name): the transposed
    codes of a codes initializer (NAME.q), the per-group table of its scales or zero points."""
    if name.endswith(".q"):
        return transposed_codes(values, entries[name]["layout"])
    codes = entries[group_table_codes(name)]
    return group_table(values, codes["shape"], codes["layout"])


def transposed_codes(packed: np.ndarray, layout: int) -> np.ndarray:
    """(N, n_blocks, block_bytes) packed codes (low bits first) -> uint8 (K, N) one code per byte, in the shape
    kn_shape gives."""
    bits = LAYOUT_BITS[layout]
    nb, _, block, n = kn_shape(packed.shape, layout)
    k = nb * block
    flat = packed.reshape(n, -1)
    if bits == 8:
        codes = flat
    else:
        mask = (1 << bits) - 1
        codes = np.stack([(flat >> (bits * j)) & mask for j in range(8 // bits)], axis=-1).reshape(n, k)
    return np.ascontiguousarray(codes.T, dtype=np.uint8).reshape(nb, 1, block, n)


# ---- int4-mG in the wasm graph: 8-bit codes ----------------------------------------------------------------------
# An int4-mG weight is exactly (q - z)·m times its row's scale, with (q - z)·m in [-120, 120] (quant/int4.py). The
# wasm graph multiplies those codes as int8 in a (K, N) matrix (manifest graph_wasm.multiplied: NAME.q -> whether the
# graph reads NAME.q too), with one scale per row: one integer GEMM per linear, as the int8 schemes run
# (onnx_export.int8_linear), and an int4-mG embedding gathers its rows from the same table. Loaders place the codes
# transposed as they are decoded, then fold in the zero points and multipliers once those are decoded too. (Stored
# as uint8 + 128 with zero point 128 instead, the page held the SmolLM2 table of a tied int4-m32 embedding twice:
# 188 against 171 MiB.)


def multiplied_parts(codes_name: str) -> tuple[str, str]:
    """The zero points and multipliers initializers of an int4-mG codes initializer (NAME.q)."""
    base = codes_name[:-len(".q")]
    return base + ".zeros", base + ".mults"


def multiplied_shape(shape: list[int] | tuple[int, ...], layout: int) -> tuple[int, int]:
    """(K, N) of the 8-bit codes of a packed (N, n_blocks, block_bytes) int4-mG codes initializer."""
    nb, _, block, n = kn_shape(shape, layout)
    return nb * block, n


def multiplied_codes(packed: np.ndarray, zeros: np.ndarray, mults: np.ndarray, layout: int) -> np.ndarray:
    """(N, n_blocks, block_bytes) packed int4-mG codes, their packed zero points and multipliers -> int8 (K, N)
    = (q - z)·m, weight [n][k] at [k][n]."""
    kn = transposed_codes(packed, layout)
    z = group_table(zeros, packed.shape, layout)
    m = group_table(mults, packed.shape, layout)
    out = np.subtract(kn, z, dtype=np.int16)
    out *= m
    return out.astype(np.int8).reshape(multiplied_shape(packed.shape, layout))


# ---- int4-mG in model.onnx and the float16 graph: block scales ---------------------------------------------------
# MatMulNBits takes a scale per block: for int4-mG that is its row's scale times the group's multiplier. Loaders make
# it as NAME.scales (float32, exact; the float16 graph casts it as it casts every scale) from NAME.row_scales and
# NAME.mults (manifest graph.block_scales and graph_fp16.block_scales: the weights NAME), which the graph then does
# not read. Built in the graph instead, onnxruntime folded the unpacking at session creation and kept the
# temporaries: SmolLM2 int4-m32's session held 22 MiB more (README).


def block_scale_parts(weight: str) -> tuple[str, str, str]:
    """(NAME.scales, NAME.row_scales, NAME.mults) of an int4-mG weight NAME."""
    return weight + ".scales", weight + ".row_scales", weight + ".mults"


def block_scales(row_scales: np.ndarray, mults: np.ndarray, codes_shape, codes_layout: int) -> np.ndarray:
    """float16 row scales [N] and packed multipliers -> MatMulNBits' float32 scales [N * n_blocks] (row scale ×
    multiplier, exact)."""
    m = group_table(mults, codes_shape, codes_layout).reshape(-1, codes_shape[0]).T             # (N, n_blocks)
    return (m.astype(np.float32) * row_scales.astype(np.float32)[:, None]).reshape(-1)
