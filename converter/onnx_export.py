"""The decoder graph: Llama with KV cache, as ONNX, with every weight an external initializer.

Interface (onnxruntime-genai's convention):
    inputs   input_ids            int64   [batch, seq]
             attention_mask       int64   [batch, past + seq]      1 = attend, 0 = padding
             position_ids         int64   [batch, seq]
             past_key_values.{i}.key / .value   float32 [batch, kv_heads, past, head_dim]
    outputs  logits               float32 [batch, seq, vocab]
             present.{i}.key / .value           float32 [batch, kv_heads, past + seq, head_dim]

The float16 variant (export_model(..., float16=True), for WebGPU adapters with `shader-f16`) has the same
initializers and interface except that the KV cache is float16; activations are float16, while RoPE tables and
RMSNorm are computed in float32 (positions beyond 2048 and squared activations do not fit float16) and logits
are returned as float32.

The wasm variant (export_model(..., group_gemm=True), model.wasm.onnx) runs the group schemes' linears as batched
integer GEMMs (group_gemm_linear) instead of MatMulNBits, which onnxruntime-web's wasm EP runs ~10x slower; it reads
their codes transposed (NAME.q.kn, layouts.transposed_codes) and everything else as model.onnx does, except the
KV cache (append_kv=True, attention_append): past_key_values.* go in position-major, [batch, past, kv_heads,
head_dim], and present.* hold only the new positions, [batch, seq, kv_heads, head_dim], which the caller appends
(the page's KvAppendCache, OrtDecoder here), so onnxruntime-web's heap never holds the cache twice. Bundles built
before session 23 have a wasm graph of the Concat form; the page and OrtDecoder tell the two apart by the past's
declared shape.

Quantized weights stay quantized in the session: per-channel int8/ternary run through MatMulInteger with
activations quantized per token (int8_linear), group schemes through com.microsoft MatMulNBits (layouts in layouts.py). Node names are
hierarchical and deterministic: /model/layers.{i}/attn/q_proj/MatMul.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .config import LlamaConfig, rope_inv_freq
from .layouts import KN_SUFFIX, PIECES_SUFFIX, family, nbits_of

OPSET = 21
MS_DOMAIN = "com.microsoft"
NEG_INF = -1e9  # finite mask value: a fully masked (padding) row softmaxes to uniform instead of NaN
NEG_INF_F16 = -3e4  # the same in float16 (max 65504), with room for the scores it is added to

_ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8,
                "uint8": TensorProto.UINT8}


def kv_names(i: int) -> tuple[str, str, str, str]:
    """(past key, past value, present key, present value) names of layer i — the only place they are spelled."""
    return (f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value")


class GraphBuilder:
    """Collects nodes and constants; names every node and value from a hierarchical prefix."""

    def __init__(self, weights: dict[str, tuple[str, tuple[int, ...]]], tensor_schemes: dict[str, str] | None = None,
                 float16: bool = False, group_gemm: bool = False, kv_float16: bool | None = None,
                 append_kv: bool = False):
        self.weights = weights            # initializer name -> (dtype, shape), all external
        # group schemes as batched integer GEMMs instead of MatMulNBits (the wasm graph, group_gemm_linear)
        self.group_gemm = group_gemm
        self.tensor_schemes = tensor_schemes or {}   # HF tensor -> scheme, where it differs (mixed precision)
        # activation float type: float32, or float16 for the shader-f16 variant
        self.ft = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT
        self.np_ft = np.float16 if float16 else np.float32
        # the KV cache's element type: the activation type, except in the wasm graph, which stores it in float16
        # and attends in float32 (onnxruntime-web's WASM EP copies the whole cache into its heap and back out at
        # every step: half the bytes. SmolLM2 int4-g32 in the page at 801 positions: 345 -> 281 MiB, decode at 769
        # positions 15.7 -> 17.6 tok/s, KL against f32 0.3582 -> 0.3569; README). kv_float16=False: the int8
        # bundles' wasm graph, which must give model.onnx's logits (docs/page-bench.md, session 18 and 20)
        self.kv_t = TensorProto.FLOAT16 if (group_gemm if kv_float16 is None else kv_float16) else self.ft
        # append_kv: the cache goes in position-major ([B, past, kv, hd]) and only the new positions come out
        # ([B, S, kv, hd]); the caller appends them (attention_append). The wasm graph's form: see KV_APPEND.
        self.append_kv = append_kv
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[onnx.TensorProto] = []
        self._const_cache: dict[tuple, str] = {}
        # activation -> (uint8 codes, per-row scale) of int8_linear: q/k/v and gate/up read the same input, so it
        # is quantized once for all of them (7 -> 4 quantizations per layer, the same numbers)
        self.quantized_x: dict[str, tuple[str, str]] = {}
        # the [B,rows,1] uint8 zero points of the row quantizations: one tensor for the layers' [B,S,·] activations,
        # one for the lm_head's [B,K,·] input (K = num_logits_to_keep)
        self.row_zero_points: dict[str | tuple[str, int], str] = {}
        # the wasm graph's q4_1 block sums [B,S,K/b] of an activation, shared like quantized_x
        self.block_sums: dict[tuple[str, int], str] = {}

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [f"{name}/output_{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, name, 1, domain, **attrs)[0]

    def const(self, value, dtype=None) -> str:
        """A constant initializer; float constants default to the activation type."""
        arr = np.asarray(value, dtype=self.np_ft if dtype is None else dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_cache:
            name = f"/const/{len(self._const_cache)}"
            self.consts.append(numpy_helper.from_array(arr, name))
            self._const_cache[key] = name
        return self._const_cache[key]

    def weight(self, name: str) -> str:
        if name not in self.weights:
            raise KeyError(f"graph needs initializer {name}, which the bundle does not provide")
        return name


# ---------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------

def to_f32(g: GraphBuilder, name: str, prefix: str) -> str:
    """A float initializer (scales, f16/f32 weights, norms) in the activation type: cast once where the types
    differ; onnxruntime folds the Cast at session creation."""
    stored = TensorProto.FLOAT16 if g.weights[name][0] == "float16" else TensorProto.FLOAT
    return name if stored == g.ft else g.op1("Cast", [name], f"{prefix}/Cast", to=g.ft)


def cast(g: GraphBuilder, x: str, to: int, name: str) -> str:
    return g.op1("Cast", [x], name, to=to)


# x ──► Mul(x, x) ─► ReduceMean(-1) ─► Add(eps) ─► Sqrt ─► Reciprocal ─► Mul(x, ·) ─► Mul(weight) ──► y
# (in float32 always: the float16 graph casts x up first and the normalized x back down)
def rms_norm(g: GraphBuilder, x: str, weight: str, eps: float, prefix: str) -> str:
    half = g.ft == TensorProto.FLOAT16
    x = cast(g, x, TensorProto.FLOAT, f"{prefix}/CastUp") if half else x
    sq = g.op1("Mul", [x, x], f"{prefix}/Pow")
    mean = g.op1("ReduceMean", [sq, g.const([-1], np.int64)], f"{prefix}/ReduceMean", keepdims=1)
    std = g.op1("Sqrt", [g.op1("Add", [mean, g.const(eps, np.float32)], f"{prefix}/AddEps")], f"{prefix}/Sqrt")
    normed = g.op1("Mul", [x, g.op1("Reciprocal", [std], f"{prefix}/Reciprocal")], f"{prefix}/Normalize")
    normed = cast(g, normed, TensorProto.FLOAT16, f"{prefix}/CastDown") if half else normed
    return g.op1("Mul", [normed, to_f32(g, g.weight(weight), f"{prefix}/weight")], f"{prefix}/MulWeight")


# x ─┐
#     + ─► SkipSimplifiedLayerNormalization(weight, eps) ─► y = RMSNorm(x + sub)
# sub ┘                                                ─► x + sub (the residual stream, 4th output)
def skip_rms_norm(g: GraphBuilder, x: str, sub: str, weight: str, eps: float, prefix: str) -> tuple[str, str]:
    """(RMSNorm(x + sub) · weight, x + sub) in one com.microsoft node: the residual Add and the 7 nodes of rms_norm.
    float32 graph only (the float16 graph keeps rms_norm, which squares in float32 whatever the kernel does)."""
    out, total = f"{prefix}/output_0", f"{prefix}/output_3"
    g.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, sub, g.weight(weight)],
                                    [out, "", "", total], name=prefix, domain=MS_DOMAIN, epsilon=float(eps)))
    return out, total


def linear(g: GraphBuilder, x: str, hf_name: str, scheme: str, n_in: int, n_out: int, prefix: str) -> str:
    """y = x @ W^T for the HF weight `hf_name` (out=n_out, in=n_in), in its scheme's op family."""
    scheme = g.tensor_schemes.get(hf_name, scheme)
    fam = family(scheme)
    if fam in ("f32", "f16"):
        w = to_f32(g, g.weight(hf_name), f"{prefix}/weight")
        return g.op1("MatMul", [x, w], f"{prefix}/MatMul")
    if fam == "dqmm" and hf_name + ".q" + PIECES_SUFFIX in g.weights:     # the wasm graph's vocabulary pieces
        return pieces_linear(g, x, g.weight(hf_name + ".q" + PIECES_SUFFIX),
                             to_f32(g, g.weight(hf_name + ".scales"), f"{prefix}/scales"), n_in, n_out, prefix)
    if fam == "dqmm":
        return int8_linear(g, x, g.weight(hf_name + ".q"), to_f32(g, g.weight(hf_name + ".scales"), f"{prefix}/scales"),
                           n_in, prefix)
    bits, block = nbits_of(scheme)
    if g.group_gemm:   # the wasm graph reads the codes transposed (NAME.q.kn, layouts.transposed_codes)
        return group_gemm_linear(g, x, hf_name, bits, block, n_in, n_out, prefix)
    q = g.weight(hf_name + ".q")
    scales = to_f32(g, g.weight(hf_name + ".scales"), f"{prefix}/scales")   # int4-mG: made by the loaders
    if bits == 8:
        return nbits8_linear(g, x, q, scales, n_in, n_out, block, prefix)
    if hf_name + ".mins" in g.weights:
        return offset_linear(g, x, q, scales, to_f32(g, g.weight(hf_name + ".mins"), f"{prefix}/mins"), n_in, n_out,
                             block, prefix)
    zeros = [g.weight(hf_name + ".zeros")] if hf_name + ".zeros" in g.weights else []
    return matmul_nbits(g, [x, q, scales] + zeros, n_in, n_out, bits, block, f"{prefix}/MatMulNBits")


def matmul_nbits(g: GraphBuilder, inputs: list[str], n_in: int, n_out: int, bits: int, block: int, name: str) -> str:
    return g.op1("MatMulNBits", inputs, name, domain=MS_DOMAIN, K=n_in, N=n_out, bits=bits, block_size=block,
                 accuracy_level=0)


def constant_zero_points(g: GraphBuilder, n_out: int, n_blocks: int, value: int, prefix: str) -> str:
    """Packed 4-bit zero points, all `value`: onnxruntime folds it at session creation, so its fast kernels see a
    constant uint8 input (with float zero points, or none, MatMulNBits takes a path 20-40× slower here)."""
    shape = g.const([n_out * ((n_blocks + 1) // 2)], np.int64)
    fill = helper.make_tensor("value", TensorProto.UINT8, [1], [value | (value << 4)])
    return g.op1("ConstantOfShape", [shape], f"{prefix}/ZeroPoints{value}", value=fill)


# x [B,S,K] ─► MatMulNBits(q, d, zero points 0) ─────────────────────────────────────────┐
#  └► Reshape [B,S,K/32,32] ─► ReduceSum(-1) ─► MatMul(m^T [K/32, N]) ──────────────── Add ─► y      (w = d*q + m)
def offset_linear(g: GraphBuilder, x: str, q: str, d: str, m: str, n_in: int, n_out: int, block: int,
                  prefix: str) -> str:
    """GGUF Q4_1 blocks, w = d*q + m (f16 d and m per block): x @ w^T = MatMulNBits(q, d, zero point 0) + the
    block sums of x times m. Exact for every block, d = 0 included; both halves run on fast kernels."""
    nb = n_in // block
    scaled = matmul_nbits(g, [x, q, d, constant_zero_points(g, n_out, nb, 0, prefix)], n_in, n_out, 4, block,
                          f"{prefix}/MatMulNBits")
    sums = g.op1("ReduceSum", [g.op1("Reshape", [x, g.const([0, 0, nb, block], np.int64)], f"{prefix}/Blocks"),
                               g.const([-1], np.int64)], f"{prefix}/BlockSums", keepdims=0)       # [B,S,K/32]
    m_t = g.op1("Transpose", [g.op1("Reshape", [m, g.const([n_out, nb], np.int64)], f"{prefix}/MinsTable")],
                f"{prefix}/MinsT", perm=[1, 0])                                                # [K/32, N]
    return g.op1("Add", [scaled, g.op1("MatMul", [sums, m_t], f"{prefix}/Offsets")], f"{prefix}/Add")


# codes u8 [N,K/32,32] = q + 128 ─► BitShift(>> 4) = hi ─► pairs ─► MatMulNBits(x, ·, 16·d, zero points 8) ──┐
#                                └► BitwiseAnd(15) = lo ─► pairs ─► MatMulNBits(x, ·, d, zero points 0) ─── Add ─► y
def nbits8_linear(g: GraphBuilder, x: str, codes: str, d: str, n_in: int, n_out: int, block: int,
                  prefix: str) -> str:
    """8-bit groups (int8-g32, GGUF Q8_0) as two 4-bit halves: d*(q) = 16d*(hi - 8) + d*lo with q + 128 = 16*hi + lo.
    Exact; onnxruntime's 8-bit MatMulNBits (accuracy level 0) is ~20× slower than two 4-bit ones (the lm_head:
    390 vs 19 ms per token here). The split is computed from the stored codes when the session is created."""
    nb = n_in // block
    four = g.const(4, np.uint8)

    def pack(nibbles: str, tag: str) -> str:                      # [N,nb,32] -> [N,nb,16], element 2j low
        pairs = g.op1("Reshape", [nibbles, g.const([n_out, nb, block // 2, 2], np.int64)], f"{prefix}/{tag}/Pairs")
        even, odd = g.op("Split", [pairs], f"{prefix}/{tag}/Split", n_out=2, axis=-1, num_outputs=2)
        high = g.op1("BitShift", [odd, four], f"{prefix}/{tag}/ShiftOdd", direction="LEFT")
        packed = g.op1("BitwiseOr", [even, high], f"{prefix}/{tag}/Pack")
        return g.op1("Squeeze", [packed, g.const([-1], np.int64)], f"{prefix}/{tag}/Squeeze")

    hi = pack(g.op1("BitShift", [codes, four], f"{prefix}/high/Shift", direction="RIGHT"), "high")
    lo = pack(g.op1("BitwiseAnd", [codes, g.const(15, np.uint8)], f"{prefix}/low/Mask"), "low")
    d16 = g.op1("Mul", [d, g.const(16.0)], f"{prefix}/high/Scale")
    y_hi = matmul_nbits(g, [x, hi, d16, constant_zero_points(g, n_out, nb, 8, f"{prefix}/high")], n_in, n_out, 4,
                        block, f"{prefix}/high/MatMulNBits")
    y_lo = matmul_nbits(g, [x, lo, d, constant_zero_points(g, n_out, nb, 0, f"{prefix}/low")], n_in, n_out, 4,
                        block, f"{prefix}/low/MatMulNBits")
    return g.op1("Add", [y_hi, y_lo], f"{prefix}/Add")


# x [B,S,K] ─► Reshape [B,S,K/b,b] ─► Transpose [K/b,B,S,b] ─► Abs ─► ReduceMax(-1) ─► Max(tiny) ─► /127 = s
#                                                        └► QuantizeLinear(s, zero point 128, block b) ─► u8
def quantize_blocks(g: GraphBuilder, x: str, nb: int, block: int, p: str) -> tuple[str, str]:
    """(uint8 codes [nb,B,S,b] with zero point 128, float32 scale per block [nb,B,S,1]) of the activation
    x [B,S,K]: quantize_rows with a scale per group of `block` values instead of per row."""
    f32, i64 = np.float32, (lambda v: g.const(v, np.int64))
    xb = g.op1("Transpose", [g.op1("Reshape", [x, i64([0, 0, nb, block])], f"{p}/Blocks")], f"{p}/Transpose",
               perm=[2, 0, 1, 3])                                                                # [nb,B,S,b]
    amax = g.op1("ReduceMax", [g.op1("Abs", [xb], f"{p}/Abs"), i64([-1])], f"{p}/ReduceMax", keepdims=1)
    sx = g.op1("Div", [g.op1("Max", [amax, g.const(1e-12, f32)], f"{p}/Floor"), g.const(127.0, f32)], f"{p}/Scale")
    # the [nb,B,S,1] zero points (128) of every quantization with nb blocks over the same rows, made once
    rows = "lm_head" if p.startswith("/lm_head") else "layers"
    if (rows, nb) not in g.row_zero_points:
        shape = g.op1("Concat", [i64([nb]), g.op1("Shape", [x], f"/quantize/{rows}/blocks{nb}/Shape", end=-1),
                                 i64([1])], f"/quantize/{rows}/blocks{nb}/ZeroPointShape", axis=0)
        g.row_zero_points[(rows, nb)] = g.op1("ConstantOfShape", [shape], f"/quantize/{rows}/blocks{nb}/ZeroPoints",
                                              value=numpy_helper.from_array(np.array([128], np.uint8)))
    zp = g.row_zero_points[(rows, nb)]
    return g.op1("QuantizeLinear", [xb, sx, zp], f"{p}/QuantizeLinear", axis=-1, block_size=block), sx


def _unpack_u8(g: GraphBuilder, packed: str, bits: int, prefix: str) -> str:
    """uint8 [..., nbytes] of `bits`-bit codes packed low first -> uint8 [..., nbytes, 8/bits] (integer ops)."""
    if bits == 8:
        return g.op1("Unsqueeze", [packed, g.const([-1], np.int64)], f"{prefix}/Unsqueeze")
    per, mask = 8 // bits, g.const((1 << bits) - 1, np.uint8)
    parts = []
    for j in range(per):
        v = packed if j == 0 else g.op1("BitShift", [packed, g.const(bits * j, np.uint8)], f"{prefix}/Shift{j}",
                                        direction="RIGHT")
        v = g.op1("BitwiseAnd", [v, mask], f"{prefix}/Mask{j}") if j + 1 < per else v
        parts.append(g.op1("Unsqueeze", [v, g.const([-1], np.int64)], f"{prefix}/Unsqueeze{j}"))
    return g.op1("Concat", parts, f"{prefix}/Concat", axis=-1)


# weights: codes u8 W [K/b,1,b,N] one per byte (NAME.q.kn: the (K,N) transposed codes, made by the loader)
#   scales f32 and zero points u8 [K/b,1,1,N] (NAME.scales.kn, NAME.zeros.kn: layouts.group_table, made by the
#   loader; where the bundle offers no tables: scales [N·K/b] ─► Cast ─► [N,K/b,1,1] ─► Transpose, zero points
#   unpacked likewise, which onnxruntime folds at session creation) — or the scheme's constant zero point
# per call (3 nodes per linear plus the quantization, shared by the linears that read the same x):
#   x [B,S,K] ─► quantize_blocks ─► u8 [K/b,B,S,b], scale s_x [K/b,B,S,1]   (one scale per group of a row)
#   ─► MatMulIntegerToFloat(·, W, 1, scales, 128, zero points) ─► [K/b,B,S,N] ─► × s_x ─► ReduceSum(0) ─► [B,S,N]
#   (q4_1: + the block sums of x times the minimums, as offset_linear)
def group_gemm_linear(g: GraphBuilder, x: str, hf_name: str, bits: int, block: int, n_in: int, n_out: int,
                      prefix: str) -> str:
    """Group-quantized weights as one batched integer GEMM per linear: group j's K-slice of x times group j's
    codes, scaled by the group's weight scales and the slice's activation scale, summed over the groups.

    The same weights as MatMulNBits. The activations are quantized to 8 bits per group of the row (the group of
    the weights: an outlier spoils only its own 32 values; per whole row, SmolLM2 int4-g32 drifted 3x further from
    the MatMulNBits graph). onnxruntime-web's wasm MatMulNBits runs ~10x slower than its integer GEMM (README), so
    the wasm graph (model.wasm.onnx) takes this path; natively MatMulNBits is faster, so model.onnx keeps it.

    int4-mG weights are exactly int8 codes (q - z)·m with one scale per row (NAME.q.kn, [K,N]:
    layouts.multiplied_codes), so they take int8_linear instead: one GEMM over the whole row, activations quantized
    per token. SmolLM2 int4-m32 in the page: decode 22.4 against 20.1 tok/s with the group GEMM, KL 0.163 against
    0.159 (README)."""
    nb, i64 = n_in // block, (lambda v: g.const(v, np.int64))
    p = f"{prefix}/weights"
    if hf_name + ".row_scales" in g.weights and hf_name + ".q" + KN_SUFFIX + PIECES_SUFFIX in g.weights:
        return pieces_linear(g, x, g.weight(hf_name + ".q" + KN_SUFFIX + PIECES_SUFFIX),      # ... in pieces
                             to_f32(g, g.weight(hf_name + ".row_scales"), f"{prefix}/scales"), n_in, n_out, prefix)
    if hf_name + ".row_scales" in g.weights:          # int4-mG: int8 codes (q - z)·m [K,N], a scale per row
        return int8_linear(g, x, g.weight(hf_name + ".q" + KN_SUFFIX),
                           to_f32(g, g.weight(hf_name + ".row_scales"), f"{prefix}/scales"), n_in, prefix)
    w = g.weight(hf_name + ".q" + KN_SUFFIX)                                                  # [nb,1,b,N]
    key = (x, block)                                  # q/k/v and gate/up share their input's quantization
    def per_group(t: str, tag: str) -> str:                                                   # [N·nb] -> [nb,1,1,N]
        table = g.op1("Reshape", [t, i64([n_out, nb, 1, 1])], f"{p}/{tag}/Table")
        return g.op1("Transpose", [table], f"{p}/{tag}/Transpose", perm=[1, 2, 3, 0])

    tables = hf_name + ".scales" + KN_SUFFIX in g.weights     # the loader makes them (layouts.group_table)
    s = g.weight(hf_name + ".scales" + KN_SUFFIX) if tables else \
        per_group(to_f32(g, g.weight(hf_name + ".scales"), f"{prefix}/scales"), "scales")
    mins = hf_name + ".mins" in g.weights
    if bits == 8:
        zp = g.const(128, np.uint8)                                                           # codes are q + 128
    elif tables and hf_name + ".zeros" + KN_SUFFIX in g.weights:
        zp = g.weight(hf_name + ".zeros" + KN_SUFFIX)
    elif hf_name + ".zeros" in g.weights:
        z = g.op1("Reshape", [_unpack_u8(g, g.weight(hf_name + ".zeros"), bits, f"{p}/zeros/unpack"),
                              i64([n_out, -1])], f"{p}/zeros/Flatten")                        # [N, padded nb]
        z = g.op1("Slice", [z, i64([0]), i64([nb]), i64([1])], f"{p}/zeros/Slice")
        zp = per_group(z, "zeros")
    else:
        zp = g.const(0 if mins else 1 << (bits - 1), np.uint8)                                # MatMulNBits' default
    if key not in g.quantized_x:
        g.quantized_x[key] = quantize_blocks(g, x, nb, block, f"{prefix}/quantize_x")
    a, sx = g.quantized_x[key]
    y = g.op1("MatMulIntegerToFloat", [a, w, g.const(1.0, np.float32), s, g.const(128, np.uint8), zp],
              f"{prefix}/MatMulIntegerToFloat", domain=MS_DOMAIN)                             # [nb,B,S,N]
    y = g.op1("ReduceSum", [g.op1("Mul", [y, sx], f"{prefix}/MulXScale"), i64([0])], f"{prefix}/ReduceSum",
              keepdims=0)                                                                     # [B,S,N]
    if mins:
        m = to_f32(g, g.weight(hf_name + ".mins"), f"{prefix}/mins")
        if key not in g.block_sums:                   # likewise shared by the linears reading x
            g.block_sums[key] = g.op1("ReduceSum", [g.op1("Reshape", [x, i64([0, 0, nb, block])], f"{prefix}/Blocks"),
                                                    i64([-1])], f"{prefix}/BlockSums", keepdims=0)   # [B,S,nb]
        sums = g.block_sums[key]
        m_t = g.op1("Transpose", [g.op1("Reshape", [m, i64([n_out, nb])], f"{prefix}/MinsTable")],
                    f"{prefix}/MinsT", perm=[1, 0])                                           # [nb,N]
        y = g.op1("Add", [y, g.op1("MatMul", [sums, m_t], f"{prefix}/Offsets")], f"{prefix}/Add")
    return y


# x [..,K] ─► Abs ─► ReduceMax(-1) ─► Max(tiny) ─► /127 = s [..,1]      (one scale per row: per token)
# x ─► QuantizeLinear(s, zero point 128, one block per row) ─► MatMulIntegerToFloat(·, W int8 [K,N], 1, w_scale[N]) ─► × s
# (the first linear reading x builds the quantize_x nodes; later linears on the same x reuse them; 5 + 2 nodes where
# Div/Round/Add/Cast and MatMulInteger/Cast/Mul/Mul took 8 + 4: onnxruntime-web's session creation grows faster
# than linearly with the node count)
def int8_linear(g: GraphBuilder, x: str, w_q: str, w_scale: str, n_in: int, prefix: str) -> str:
    """int8 weights with activations quantized per row (token). onnxruntime's DynamicQuantizeMatMul uses one scale
    for the whole call, so in a prefill the first token's activation outliers set the scale of every row (KL vs f32
    0.60 on SmolLM2) and a row's result depends on its neighbours; per-row scales keep rows independent (decode ==
    prefill) and use the same u8×s8 integer kernels, which have WebAssembly SIMD paths."""
    if g.ft != TensorProto.FLOAT:
        # float16 graph: quantize and rescale in float32 (the int32 accumulator reaches ~16129 * K, far past
        # float16's 65504, and the activation scale can fall below its smallest normal number)
        w_scale = cast(g, w_scale, TensorProto.FLOAT, f"{prefix}/scales/CastUp")  # float16 scales, exactly
    if x not in g.quantized_x:
        g.quantized_x[x] = quantize_rows(g, x, n_in, f"{prefix}/quantize_x")
    xq, sx = g.quantized_x[x]
    f32 = np.float32
    # com.microsoft MatMulIntegerToFloat: the u8×s8 integer GEMM of MatMulInteger with the output scaled by
    # a_scale·b_scale[n] in its epilogue (a_scale must be a scalar there, so the per-row scale is one Mul after)
    y = g.op1("MatMulIntegerToFloat", [xq, w_q, g.const(1.0, f32), w_scale, g.const(128, np.uint8)],
              f"{prefix}/MatMulIntegerToFloat", domain=MS_DOMAIN)
    y = g.op1("Mul", [y, sx], f"{prefix}/MulXScale")
    return y if g.ft == TensorProto.FLOAT else cast(g, y, g.ft, f"{prefix}/CastDown")


# x ─► QuantizeLinear (per row) ─► Reshape [1, B·S, K] ─► MatMulIntegerToFloat(·, pieces [P,K,n], 1,
#   scales [P,1,n]) ─► [P, B·S, n] ─► Transpose [B·S, P, n] ─► Reshape [B, S, N] ─► × s_x
def pieces_linear(g: GraphBuilder, x: str, table: str, scales: str, n_in: int, n_out: int, prefix: str) -> str:
    """int8_linear on an int8 (K, N) weight read as (P, K, n) pieces of its columns (layouts.column_pieces): one
    batched integer GEMM of P pieces, up to 2× faster than one GEMM of N columns on onnxruntime-web's wasm kernels.
    The same products and roundings as int8_linear (integer sums, × the column scale, × the row scale), so the
    same logits. `scales`: the float32 column scales [N]."""
    if g.ft != TensorProto.FLOAT:
        raise ValueError("weights in pieces are a float32 wasm-graph form")
    n_pieces, _, width = g.weights[table][1]
    if x not in g.quantized_x:
        g.quantized_x[x] = quantize_rows(g, x, n_in, f"{prefix}/quantize_x")
    xq, sx = g.quantized_x[x]
    if (xq, "rows") not in g.quantized_x:               # shared by the linears that read the same activation
        g.quantized_x[(xq, "rows")] = (
            g.op1("Reshape", [xq, g.const([1, -1, n_in], np.int64)], f"{prefix}/Rows"),                   # [1,B·S,K]
            g.op1("Slice", [g.op1("Shape", [x], f"{prefix}/Shape"), g.const([0], np.int64), g.const([-1], np.int64)],
                  f"{prefix}/Lead"))                                                                    # [B, S]
    a, lead = g.quantized_x[(xq, "rows")]
    s = g.op1("Reshape", [scales, g.const([n_pieces, 1, width], np.int64)], f"{prefix}/PieceScales")   # folded
    y = g.op1("MatMulIntegerToFloat", [a, table, g.const(1.0, np.float32), s, g.const(128, np.uint8)],
              f"{prefix}/MatMulIntegerToFloat", domain=MS_DOMAIN)                                      # [P,B·S,n]
    y = g.op1("Transpose", [y], f"{prefix}/Transpose", perm=[1, 0, 2])                                # [B·S,P,n]
    shape = g.op1("Concat", [lead, g.const([n_out], np.int64)], f"{prefix}/OutShape", axis=0)
    y = g.op1("Reshape", [y, shape], f"{prefix}/Reshape")                                               # [B,S,N]
    return g.op1("Mul", [y, sx], f"{prefix}/MulXScale")


def quantize_rows(g: GraphBuilder, x: str, n_in: int, p: str) -> tuple[str, str]:
    """(uint8 codes with zero point 128, float32 scale per row) of the activation x, in float32 in both graphs."""
    if g.ft != TensorProto.FLOAT:
        x = cast(g, x, TensorProto.FLOAT, f"{p}/CastUp")
    f32 = np.float32
    amax = g.op1("ReduceMax", [g.op1("Abs", [x], f"{p}/Abs"), g.const([-1], np.int64)], f"{p}/ReduceMax", keepdims=1)
    sx = g.op1("Div", [g.op1("Max", [amax, g.const(1e-12, f32)], f"{p}/Floor"), g.const(127.0, f32)], f"{p}/Scale")
    # blocked QuantizeLinear (opset 21), one block = one row: round(x / s) + 128, rounding half to even like Round;
    # |x / s| <= 127, so nothing saturates. Its zero point must have the scale's shape: one [B,S,1] tensor of 128s
    # serves every quantization in the layers, another the lm_head's (its rows are the kept positions).
    rows = "lm_head" if p.startswith("/lm_head") else "layers"
    if rows not in g.row_zero_points:
        shape = g.op1("Concat", [g.op1("Shape", [x], f"/quantize/{rows}/Shape", end=-1), g.const([1], np.int64)],
                      f"/quantize/{rows}/ZeroPointShape", axis=0)
        g.row_zero_points[rows] = g.op1("ConstantOfShape", [shape], f"/quantize/{rows}/ZeroPoints",
                                        value=numpy_helper.from_array(np.array([128], np.uint8)))
    q = g.op1("QuantizeLinear", [x, sx, g.row_zero_points[rows]], f"{p}/QuantizeLinear", axis=-1,
              block_size=n_in)
    return q, sx


def _unpack_codes(g: GraphBuilder, packed: str, bits: int, prefix: str) -> str:
    """uint8 [..., nbytes] of `bits`-bit codes packed low first -> float32 [..., nbytes * 8/bits] (float ops only,
    so every execution provider runs it)."""
    x = g.op1("Cast", [packed], f"{prefix}/CastPacked", to=g.ft)
    if bits == 8:
        return x
    per, base = 8 // bits, float(1 << bits)
    parts = []
    for j in range(per):
        # code j = floor(x / base^j) mod base
        shifted = g.op1("Floor", [g.op1("Div", [x, g.const(base ** j)], f"{prefix}/Shift{j}")], f"{prefix}/Floor{j}")
        code = g.op1("Mod", [shifted, g.const(base)], f"{prefix}/Mod{j}", fmod=1)
        parts.append(g.op1("Unsqueeze", [code, g.const([-1], np.int64)], f"{prefix}/Unsqueeze{j}"))
    stacked = g.op1("Concat", parts, f"{prefix}/Concat", axis=-1)               # [..., nbytes, per]
    shape = g.op1("Shape", [x], f"{prefix}/Shape")
    lead = g.op1("Slice", [shape, g.const([0], np.int64), g.const([-1], np.int64)], f"{prefix}/Lead")
    new_shape = g.op1("Concat", [lead, g.const([-1], np.int64)], f"{prefix}/NewShape", axis=0)
    return g.op1("Reshape", [stacked, new_shape], f"{prefix}/Reshape")


# ids [B,S] ──► Gather rows of the quantized table ──► dequantize only those rows ──► [B,S,H]
def embedding(g: GraphBuilder, ids: str, cfg: LlamaConfig, scheme: str, prefix: str) -> str:
    name = "model.embed_tokens.weight"
    H, V = cfg.hidden_size, cfg.vocab_size
    fam = family(scheme)
    if fam in ("f32", "f16"):                                     # table stored (H, V): gather columns
        cols = g.op1("Gather", [g.weight(name), ids], f"{prefix}/Gather", axis=1)            # [H,B,S]
        rows = g.op1("Transpose", [cols], f"{prefix}/Transpose", perm=[1, 2, 0])           # [B,S,H]
        stored = TensorProto.FLOAT16 if fam == "f16" else TensorProto.FLOAT
        return cast(g, rows, g.ft, f"{prefix}/Cast") if stored != g.ft else rows
    multiple = g.group_gemm and name + ".row_scales" in g.weights      # int4-mG in the wasm graph: the lm_head's
    if fam == "dqmm" and name + ".q" + PIECES_SUFFIX in g.weights:   # the wasm graph: (P, H, n) pieces
        table = g.weight(name + ".q" + PIECES_SUFFIX)
        n_pieces, _, width = g.weights[table][1]
        i64 = np.int64
        piece = g.op1("Unsqueeze", [g.op1("Div", [ids, g.const(width, i64)], f"{prefix}/Piece"), g.const([2, 3], i64)],
                      f"{prefix}/UnsqueezePiece")                                           # [B,S,1,1]
        col = g.op1("Unsqueeze", [g.op1("Mod", [ids, g.const(width, i64)], f"{prefix}/Column"), g.const([2, 3], i64)],
                    f"{prefix}/UnsqueezeColumn")
        shape = g.op1("Concat", [g.op1("Shape", [ids], f"{prefix}/Shape"), g.const([H, 1], i64)],
                      f"{prefix}/IndexShape", axis=0)                                       # [B,S,H,1]
        index = g.op1("Concat", [g.op1("Expand", [piece, shape], f"{prefix}/ExpandPiece"),
                                 g.op1("Expand", [g.const(np.arange(H).reshape(H, 1), i64), shape],
                                       f"{prefix}/ExpandRow"),
                                 g.op1("Expand", [col, shape], f"{prefix}/ExpandColumn")],
                      f"{prefix}/Index", axis=-1)                                           # [B,S,H,3]
        rows = g.op1("Cast", [g.op1("GatherND", [table, index], f"{prefix}/GatherND")], f"{prefix}/Cast", to=g.ft)
        scale = g.op1("Gather", [to_f32(g, g.weight(name + ".scales"), f"{prefix}/scales"), ids],
                      f"{prefix}/GatherScale", axis=0)
        scale = g.op1("Unsqueeze", [scale, g.const([-1], i64)], f"{prefix}/UnsqueezeScale")
        return g.op1("Mul", [rows, scale], f"{prefix}/Dequantize")
    if fam == "dqmm" or multiple:                                 # int8 (H, V) codes + a scale per token
        table = g.weight(name + (".q" + KN_SUFFIX if multiple else ".q"))
        cols = g.op1("Gather", [table, ids], f"{prefix}/Gather", axis=1)                    # [H,B,S] int8
        rows = g.op1("Transpose", [cols], f"{prefix}/Transpose", perm=[1, 2, 0])
        rows = g.op1("Cast", [rows], f"{prefix}/Cast", to=g.ft)
        scales = g.weight(name + (".row_scales" if multiple else ".scales"))
        scale = g.op1("Gather", [to_f32(g, scales, f"{prefix}/scales"), ids], f"{prefix}/GatherScale", axis=0)  # [B,S]
        scale = g.op1("Unsqueeze", [scale, g.const([-1], np.int64)], f"{prefix}/UnsqueezeScale")
        return g.op1("Mul", [rows, scale], f"{prefix}/Dequantize")
    bits, block = nbits_of(scheme)
    nb = H // block
    q = g.op1("Gather", [g.weight(name + ".q"), ids], f"{prefix}/Gather", axis=0)           # [B,S,nb,bytes]
    codes = _unpack_codes(g, q, bits, f"{prefix}/codes")                                    # [B,S,nb,block]
    scales = g.op1("Reshape", [to_f32(g, g.weight(name + ".scales"), f"{prefix}/scales"),
                               g.const([V, nb], np.int64)], f"{prefix}/ScalesTable")
    scale = g.op1("Gather", [scales, ids], f"{prefix}/GatherScale", axis=0)                 # [B,S,nb]
    if name + ".mins" in g.weights:                               # q4_1: w = d*q + m
        mins = g.op1("Reshape", [to_f32(g, g.weight(name + ".mins"), f"{prefix}/mins"), g.const([V, nb], np.int64)],
                     f"{prefix}/MinsTable")
        m = g.op1("Unsqueeze", [g.op1("Gather", [mins, ids], f"{prefix}/GatherMins", axis=0), g.const([-1], np.int64)],
                  f"{prefix}/UnsqueezeMins")                                                # [B,S,nb,1]
        d = g.op1("Unsqueeze", [scale, g.const([-1], np.int64)], f"{prefix}/UnsqueezeScale")
        w = g.op1("Add", [g.op1("Mul", [d, codes], f"{prefix}/MulScale"), m], f"{prefix}/Dequantize")
        return g.op1("Reshape", [w, g.const([0, 0, H], np.int64)], f"{prefix}/Reshape")
    if name + ".zeros" in g.weights:
        nz = g.weights[name + ".zeros"][1][0] // V
        ztab = g.op1("Reshape", [g.weight(name + ".zeros"), g.const([V, nz], np.int64)], f"{prefix}/ZerosTable")
        z = _unpack_codes(g, g.op1("Gather", [ztab, ids], f"{prefix}/GatherZeros", axis=0), bits, f"{prefix}/zeros")
        z = g.op1("Slice", [z, g.const([0], np.int64), g.const([nb], np.int64), g.const([-1], np.int64)],
                  f"{prefix}/ZerosSlice")                                                   # [B,S,nb]
        z = g.op1("Unsqueeze", [z, g.const([-1], np.int64)], f"{prefix}/UnsqueezeZero")     # [B,S,nb,1]
    else:
        z = g.const(128.0)                                                                  # 8-bit: zero point 128
    centered = g.op1("Sub", [codes, z], f"{prefix}/SubZero")
    scale = g.op1("Unsqueeze", [scale, g.const([-1], np.int64)], f"{prefix}/UnsqueezeScale")
    w = g.op1("Mul", [centered, scale], f"{prefix}/Dequantize")
    return g.op1("Reshape", [w, g.const([0, 0, H], np.int64)], f"{prefix}/Reshape")


# position_ids [B,S] ─► Cast ─► ⊗ inv_freq [hd/2] ─► Concat(f, f) ─► Cos, Sin ─► Unsqueeze(1) ─► [B,1,S,hd]
# (angles in float32 in both graphs; the float16 graph casts only cos and sin)
def rope_tables(g: GraphBuilder, position_ids: str, cfg: LlamaConfig) -> tuple[str, str]:
    p = "/model/rotary_emb"
    if g.ft == TensorProto.FLOAT:
        # float32 graph: the caches of com.microsoft RotaryEmbedding, [0 .. max(position_ids)] x hd/2:
        # position_ids ─► ReduceMax + 1 ─► Range ─► Cast ─► ⊗ inv_freq ─► Cos, Sin
        top = g.op1("Add", [g.op1("ReduceMax", [position_ids], f"{p}/MaxPosition", keepdims=0), g.const(1, np.int64)],
                    f"{p}/Positions")
        pos = g.op1("Cast", [g.op1("Range", [g.const(0, np.int64), top, g.const(1, np.int64)], f"{p}/Range")],
                    f"{p}/Cast", to=TensorProto.FLOAT)
        pos = g.op1("Unsqueeze", [pos, g.const([-1], np.int64)], f"{p}/Unsqueeze")             # [P,1]
        freqs = g.op1("Mul", [pos, g.const(rope_inv_freq(cfg), np.float32)], f"{p}/Freqs")      # [P,hd/2]
        return g.op1("Cos", [freqs], f"{p}/Cos"), g.op1("Sin", [freqs], f"{p}/Sin")
    pos = g.op1("Unsqueeze", [g.op1("Cast", [position_ids], f"{p}/Cast", to=TensorProto.FLOAT),
                              g.const([-1], np.int64)], f"{p}/Unsqueeze")                   # [B,S,1]
    freqs = g.op1("Mul", [pos, g.const(rope_inv_freq(cfg), np.float32)], f"{p}/Freqs")      # [B,S,hd/2]
    emb = g.op1("Concat", [freqs, freqs], f"{p}/Concat", axis=-1)                           # [B,S,hd]
    one = g.const([1], np.int64)
    cos, sin = g.op1("Cos", [emb], f"{p}/Cos"), g.op1("Sin", [emb], f"{p}/Sin")
    if g.ft != TensorProto.FLOAT:
        cos, sin = cast(g, cos, g.ft, f"{p}/CastCos"), cast(g, sin, g.ft, f"{p}/CastSin")
    cos = g.op1("Unsqueeze", [cos, one], f"{p}/UnsqueezeCos")                               # [B,1,S,hd]
    sin = g.op1("Unsqueeze", [sin, one], f"{p}/UnsqueezeSin")
    return cos, sin


# x [B,h,S,hd] ─► x*cos + rotate_half(x)*sin,  rotate_half(x) = Concat(-x[..., hd/2:], x[..., :hd/2])
# (float32 graph: one com.microsoft RotaryEmbedding node, rotate-half layout, cos/sin rows picked by position_ids)
def apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, half: int, prefix: str) -> str:
    if g.ft == TensorProto.FLOAT:
        return g.op1("RotaryEmbedding", [x, "position_ids", cos, sin], f"{prefix}/RotaryEmbedding", domain=MS_DOMAIN,
                     interleaved=0)
    x1, x2 = g.op("Split", [x, g.const([half, half], np.int64)], f"{prefix}/Split", n_out=2, axis=-1)
    rot = g.op1("Concat", [g.op1("Neg", [x2], f"{prefix}/Neg"), x1], f"{prefix}/RotateHalf", axis=-1)
    return g.op1("Add", [g.op1("Mul", [x, cos], f"{prefix}/MulCos"), g.op1("Mul", [rot, sin], f"{prefix}/MulSin")],
                 f"{prefix}/Add")


# attention_mask [B,T] and S ─► additive bias [B,1,1,S,T]: 0 where key t is visible to query s
# (t <= past + s and mask[b,t] = 1), NEG_INF elsewhere
def attention_bias(g: GraphBuilder, input_ids: str, attention_mask: str) -> str:
    p = "/model/attn_mask"
    i64 = lambda v: g.const(v, np.int64)  # noqa: E731
    T = g.op1("Gather", [g.op1("Shape", [attention_mask], f"{p}/ShapeT"), i64(1)], f"{p}/T", axis=0)
    S = g.op1("Gather", [g.op1("Shape", [input_ids], f"{p}/ShapeS"), i64(1)], f"{p}/S", axis=0)
    past = g.op1("Sub", [T, S], f"{p}/Past")
    t = g.op1("Range", [i64(0), T, i64(1)], f"{p}/RangeT")                                 # [T]
    s = g.op1("Add", [g.op1("Range", [i64(0), S, i64(1)], f"{p}/RangeS"), past], f"{p}/QueryPos")
    s = g.op1("Unsqueeze", [s, i64([-1])], f"{p}/UnsqueezeS")                               # [S,1]
    causal = g.op1("LessOrEqual", [t, s], f"{p}/Causal")                                    # [S,T]
    pad = g.op1("Cast", [attention_mask], f"{p}/CastMask", to=TensorProto.BOOL)             # [B,T]
    pad = g.op1("Unsqueeze", [pad, i64([1, 2, 3])], f"{p}/UnsqueezeMask")                   # [B,1,1,1,T]
    visible = g.op1("And", [causal, pad], f"{p}/Visible")                                   # [B,1,1,S,T]
    neg = NEG_INF_F16 if g.ft == TensorProto.FLOAT16 else NEG_INF
    return g.op1("Where", [visible, g.const(0.0), g.const(neg)], f"{p}/Bias")


#  x ─► q_proj ─► [B,S,nh,hd] ─► Transpose ─► RoPE ─────────────────────────┐
#  x ─► k_proj ─► [B,S,kv,hd] ─► Transpose ─► RoPE ─► Concat(past_k) ─► present_k
#  x ─► v_proj ─► [B,S,kv,hd] ─► Transpose ──────────► Concat(past_v) ─► present_v
#  (the wasm graph keeps the cache in float16: Cast before the Concat, Cast back to float32 after it)
#  q as [B,kv,g,S,hd] · k^T [B,kv,1,hd,T] / sqrt(hd) + bias ─► Softmax ─► · v [B,kv,1,T,hd]
#  ─► [B,nh,S,hd] ─► Transpose ─► [B,S,nh*hd] ─► o_proj
def attention(g: GraphBuilder, x: str, i: int, cfg: LlamaConfig, scheme: str, cos: str, sin: str, bias: str) -> str:
    p = f"/model/layers.{i}/attn"
    w = f"model.layers.{i}.self_attn."
    H, hd, nh, kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    i64 = lambda v: g.const(v, np.int64)  # noqa: E731
    past_k, past_v, present_k, present_v = kv_names(i)

    def heads(t: str, n: int, name: str) -> str:                                              # [B,S,n*hd] -> [B,n,S,hd]
        r = g.op1("Reshape", [t, i64([0, 0, n, hd])], f"{p}/{name}/Reshape")
        return g.op1("Transpose", [r], f"{p}/{name}/Transpose", perm=[0, 2, 1, 3])

    q = heads(linear(g, x, w + "q_proj.weight", scheme, H, nh * hd, f"{p}/q_proj"), nh, "q")
    k = heads(linear(g, x, w + "k_proj.weight", scheme, H, kv * hd, f"{p}/k_proj"), kv, "k")
    v = heads(linear(g, x, w + "v_proj.weight", scheme, H, kv * hd, f"{p}/v_proj"), kv, "v")
    q = apply_rope(g, q, cos, sin, hd // 2, f"{p}/q_rotary")
    k = apply_rope(g, k, cos, sin, hd // 2, f"{p}/k_rotary")
    if g.append_kv:
        ctx = attention_append(g, q, k, v, i, cfg, bias)
        return linear(g, ctx, w + "o_proj.weight", scheme, nh * hd, H, f"{p}/o_proj")
    if g.kv_t != g.ft:
        k = cast(g, k, g.kv_t, f"{p}/k_cache/CastIn")
        v = cast(g, v, g.kv_t, f"{p}/v_cache/CastIn")
    g.nodes.append(helper.make_node("Concat", [past_k, k], [present_k], name=f"{p}/k_cache/Concat", axis=2))
    g.nodes.append(helper.make_node("Concat", [past_v, v], [present_v], name=f"{p}/v_cache/Concat", axis=2))
    if g.kv_t != g.ft:
        present_k = cast(g, present_k, g.ft, f"{p}/k_cache/CastOut")
        present_v = cast(g, present_v, g.ft, f"{p}/v_cache/CastOut")
    q5 = g.op1("Reshape", [q, i64([0, kv, nh // kv, -1, hd])], f"{p}/q/GroupReshape")          # [B,kv,g,S,hd]
    q5 = g.op1("Mul", [q5, g.const(1.0 / math.sqrt(hd))], f"{p}/q/Scale")
    kT = g.op1("Unsqueeze", [g.op1("Transpose", [present_k], f"{p}/k/TransposeT", perm=[0, 1, 3, 2]), i64([2])],
               f"{p}/k/Unsqueeze")                                                            # [B,kv,1,hd,T]
    scores = g.op1("Add", [g.op1("MatMul", [q5, kT], f"{p}/QK/MatMul"), bias], f"{p}/QK/AddBias")
    probs = g.op1("Softmax", [scores], f"{p}/Softmax", axis=-1)                               # [B,kv,g,S,T]
    v5 = g.op1("Unsqueeze", [present_v, i64([2])], f"{p}/v/Unsqueeze")                        # [B,kv,1,T,hd]
    ctx = g.op1("MatMul", [probs, v5], f"{p}/PV/MatMul")                                      # [B,kv,g,S,hd]
    ctx = g.op1("Reshape", [ctx, i64([0, nh, -1, hd])], f"{p}/ctx/Reshape")                   # [B,nh,S,hd]
    ctx = g.op1("Transpose", [ctx], f"{p}/ctx/Transpose", perm=[0, 2, 1, 3])                  # [B,S,nh,hd]
    ctx = g.op1("Reshape", [ctx, i64([0, 0, nh * hd])], f"{p}/ctx/Merge")
    return linear(g, ctx, w + "o_proj.weight", scheme, nh * hd, H, f"{p}/o_proj")


# KV_APPEND (the wasm graph). onnxruntime-web's WASM EP copies every input into its heap for a run and every output
# back out, so with the Concat form a step holds the whole cache twice in the heap (past in, present out) and copies
# all of it out again. Here the past goes in position-major, [B, past, kv, hd], so that the page can keep it in one
# growing buffer and feed a prefix of it without copying, and only the new positions come out, in the same layout:
#  k, v [B,kv,S,hd] ─► Transpose ─► [B,S,kv,hd] (float16: Cast) ─► present (the new positions only)
#  scores = q · [past_k | k]^T as two MatMuls, Concat on the key axis (nh·S·T floats, not the cache) + bias ─► Softmax
#  ─► probs split at `past` ─► probs_past · past_v + probs_new · v
# The values are those of the Concat graph up to float rounding (the sum over positions is split in two).
def attention_append(g: GraphBuilder, q: str, k: str, v: str, i: int, cfg: LlamaConfig, bias: str) -> str:
    p = f"/model/layers.{i}/attn"
    hd, nh, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    i64 = lambda v_: g.const(v_, np.int64)  # noqa: E731
    past_k, past_v, present_k, present_v = kv_names(i)
    for name, t, out in (("k", k, present_k), ("v", v, present_v)):       # [B,kv,S,hd] -> [B,S,kv,hd]
        t = g.op1("Transpose", [t], f"{p}/{name}_new/Transpose", perm=[0, 2, 1, 3])
        if g.kv_t != g.ft:
            g.nodes.append(helper.make_node("Cast", [t], [out], name=f"{p}/{name}_cache/CastIn", to=g.kv_t))
        else:
            g.nodes.append(helper.make_node("Identity", [t], [out], name=f"{p}/{name}_cache/Identity"))
    if g.kv_t != g.ft:     # attend to the new positions as the next step reads them back: rounded to float16
        k = g.op1("Transpose", [cast(g, present_k, g.ft, f"{p}/k_new/CastOut")], f"{p}/k_new/Heads", perm=[0, 2, 1, 3])
        v = g.op1("Transpose", [cast(g, present_v, g.ft, f"{p}/v_new/CastOut")], f"{p}/v_new/Heads", perm=[0, 2, 1, 3])
        past_k = cast(g, past_k, g.ft, f"{p}/k_cache/CastOut")
        past_v = cast(g, past_v, g.ft, f"{p}/v_cache/CastOut")
    q5 = g.op1("Reshape", [q, i64([0, kv, nh // kv, -1, hd])], f"{p}/q/GroupReshape")          # [B,kv,g,S,hd]
    q5 = g.op1("Mul", [q5, g.const(1.0 / math.sqrt(hd))], f"{p}/q/Scale")
    kT_past = g.op1("Unsqueeze", [g.op1("Transpose", [past_k], f"{p}/k_past/TransposeT", perm=[0, 2, 3, 1]),
                                  i64([2])], f"{p}/k_past/Unsqueeze")                          # [B,kv,1,hd,P]
    kT_new = g.op1("Unsqueeze", [g.op1("Transpose", [k], f"{p}/k/TransposeT", perm=[0, 1, 3, 2]), i64([2])],
                   f"{p}/k/Unsqueeze")                                                         # [B,kv,1,hd,S]
    scores = g.op1("Concat", [g.op1("MatMul", [q5, kT_past], f"{p}/QK_past/MatMul"),
                              g.op1("MatMul", [q5, kT_new], f"{p}/QK/MatMul")], f"{p}/QK/Concat", axis=-1)
    probs = g.op1("Softmax", [g.op1("Add", [scores, bias], f"{p}/QK/AddBias")], f"{p}/Softmax", axis=-1)
    past = g.op1("Shape", [past_k], f"{p}/k_past/Length", start=1, end=2)                      # [1]: P
    probs_past = g.op1("Slice", [probs, i64([0]), past, i64([-1])], f"{p}/probs_past/Slice")    # [B,kv,g,S,P]
    probs_new = g.op1("Slice", [probs, past, i64([np.iinfo(np.int64).max]), i64([-1])], f"{p}/probs_new/Slice")
    v_past = g.op1("Unsqueeze", [g.op1("Transpose", [past_v], f"{p}/v_past/Transpose", perm=[0, 2, 1, 3]), i64([2])],
                   f"{p}/v_past/Unsqueeze")                                                    # [B,kv,1,P,hd]
    v_new = g.op1("Unsqueeze", [v, i64([2])], f"{p}/v/Unsqueeze")                             # [B,kv,1,S,hd]
    ctx = g.op1("Add", [g.op1("MatMul", [probs_past, v_past], f"{p}/PV_past/MatMul"),
                        g.op1("MatMul", [probs_new, v_new], f"{p}/PV/MatMul")], f"{p}/PV/Add")   # [B,kv,g,S,hd]
    ctx = g.op1("Reshape", [ctx, i64([0, nh, -1, hd])], f"{p}/ctx/Reshape")                   # [B,nh,S,hd]
    ctx = g.op1("Transpose", [ctx], f"{p}/ctx/Transpose", perm=[0, 2, 1, 3])                  # [B,S,nh,hd]
    return g.op1("Reshape", [ctx, i64([0, 0, nh * hd])], f"{p}/ctx/Merge")


# x ─► gate_proj ─► SiLU ─┐
#                         ⊗ ─► down_proj
# x ─► up_proj ───────────┘
def mlp(g: GraphBuilder, x: str, i: int, cfg: LlamaConfig, scheme: str) -> str:
    p, w = f"/model/layers.{i}/mlp", f"model.layers.{i}.mlp."
    H, I = cfg.hidden_size, cfg.intermediate_size
    gate = linear(g, x, w + "gate_proj.weight", scheme, H, I, f"{p}/gate_proj")
    up = linear(g, x, w + "up_proj.weight", scheme, H, I, f"{p}/up_proj")
    silu = g.op1("Mul", [gate, g.op1("Sigmoid", [gate], f"{p}/act/Sigmoid")], f"{p}/act/Mul")
    return linear(g, g.op1("Mul", [silu, up], f"{p}/Mul"), w + "down_proj.weight", scheme, I, H, f"{p}/down_proj")


LOGITS_TO_KEEP = "num_logits_to_keep"   # int64 scalar input: 0 = logits of every position, n = of the last n


# x [B,S,H] ─► Slice(axis 1, from −num_logits_to_keep) ─► [B,K,H]   (K = S when num_logits_to_keep is 0)
def keep_last_positions(g: GraphBuilder, x: str) -> str:
    """Only the rows whose logits are wanted go through the lm_head: generation needs the last position, and the
    lm_head (vocab × hidden) is a fifth of a prefill's multiply-adds for SmolLM2. A required input (onnxruntime-web
    refuses feeds for an initializer that doubles as an input, so it cannot have a default): callers feed 0 for
    every position (evaluation), 1 for generation."""
    p = "/lm_head/keep"
    start = g.op1("Reshape", [g.op1("Neg", [LOGITS_TO_KEEP], f"{p}/Neg"), g.const([1], np.int64)], f"{p}/Start")
    return g.op1("Slice", [x, start, g.const([np.iinfo(np.int64).max], np.int64), g.const([1], np.int64)], f"{p}/Slice")


def export_model(cfg: LlamaConfig, weights: dict[str, tuple[str, tuple[int, ...]]], scheme: str,
                 embed_scheme: str, tensor_schemes: dict[str, str] | None = None,
                 float16: bool = False, group_gemm: bool = False, kv_float16: bool | None = None,
                 append_kv: bool = False) -> onnx.ModelProto:
    g = GraphBuilder(weights, tensor_schemes, float16, group_gemm, kv_float16, append_kv)
    B, S, T, P = "batch", "seq", "total_seq", "past_seq"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, S]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, T]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, S]),
              helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [B, "logits_seq", cfg.vocab_size])]
    if append_kv:          # position-major, and the present holds the new positions only (attention_append)
        kvshape = lambda n: [B, n, cfg.num_key_value_heads, cfg.head_dim]  # noqa: E731
    else:
        kvshape = lambda n: [B, cfg.num_key_value_heads, n, cfg.head_dim]  # noqa: E731
    for i in range(cfg.num_hidden_layers):
        pk, pv, ck, cv = kv_names(i)
        inputs += [helper.make_tensor_value_info(pk, g.kv_t, kvshape(P)),
                   helper.make_tensor_value_info(pv, g.kv_t, kvshape(P))]
        outputs += [helper.make_tensor_value_info(ck, g.kv_t, kvshape(S if append_kv else T)),
                    helper.make_tensor_value_info(cv, g.kv_t, kvshape(S if append_kv else T))]

    x = embedding(g, "input_ids", cfg, embed_scheme, "/model/embed_tokens")
    cos, sin = rope_tables(g, "position_ids", cfg)
    bias = attention_bias(g, "input_ids", "attention_mask")
    eps, n_layers = cfg.rms_norm_eps, cfg.num_hidden_layers
    if g.ft == TensorProto.FLOAT:
        # each residual Add fused with the RMSNorm that reads its sum: 8 nodes -> 1, 420 fewer for 30 layers
        h = rms_norm(g, x, "model.layers.0.input_layernorm.weight", eps, "/model/layers.0/input_layernorm")
        for i in range(n_layers):
            p = f"/model/layers.{i}"
            h, x = skip_rms_norm(g, x, attention(g, h, i, cfg, scheme, cos, sin, bias),
                                 f"model.layers.{i}.post_attention_layernorm.weight", eps, f"{p}/post_attention_layernorm")
            nxt = ("model.norm.weight", "/model/norm") if i + 1 == n_layers else \
                (f"model.layers.{i + 1}.input_layernorm.weight", f"/model/layers.{i + 1}/input_layernorm")
            h, x = skip_rms_norm(g, x, mlp(g, h, i, cfg, scheme), nxt[0], eps, nxt[1])
        x = h
    else:
        for i in range(n_layers):
            p = f"/model/layers.{i}"
            h = rms_norm(g, x, f"model.layers.{i}.input_layernorm.weight", eps, f"{p}/input_layernorm")
            x = g.op1("Add", [x, attention(g, h, i, cfg, scheme, cos, sin, bias)], f"{p}/attn/Residual")
            h = rms_norm(g, x, f"model.layers.{i}.post_attention_layernorm.weight", eps, f"{p}/post_attention_layernorm")
            x = g.op1("Add", [x, mlp(g, h, i, cfg, scheme)], f"{p}/mlp/Residual")
        x = rms_norm(g, x, "model.norm.weight", eps, "/model/norm")
    x = keep_last_positions(g, x)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    logits = linear(g, x, head, embed_scheme, cfg.hidden_size, cfg.vocab_size, "/lm_head")
    if g.ft == TensorProto.FLOAT:
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/lm_head/Identity"))
    else:
        g.nodes.append(helper.make_node("Cast", [logits], ["logits"], name="/lm_head/Cast", to=TensorProto.FLOAT))

    initializers = list(g.consts)
    for name, (dtype, shape) in weights.items():
        t = TensorProto(name=name, data_type=_ONNX_DTYPES[dtype], dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", name), ("offset", "0"), ("length", str(int(np.prod(shape)) * np.dtype(dtype).itemsize))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        initializers.append(t)
    graph = helper.make_graph(g.nodes, "tiny_qmoe_llama", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="tiny-qmoe", ir_version=10)
    return model


def export_graph(cfg: LlamaConfig, weights, scheme: str, embed_scheme: str,
                 tensor_schemes: dict[str, str] | None = None, float16: bool = False, group_gemm: bool = False) -> bytes:
    """Serialized graph; checked with onnx.checker (external data is not read)."""
    model = export_model(cfg, weights, scheme, embed_scheme, tensor_schemes, float16, group_gemm)
    check_graph(model)
    return model.SerializeToString()


def check_graph(model: onnx.ModelProto) -> None:
    """onnx.checker on the graph with its external initializers turned into typed graph inputs.

    The checker insists on opening external data files, which a bundle does not have (its weights are LZW blobs),
    so it checks a copy where each external weight is an input of the same dtype and shape instead.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    external = [t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    for t in external:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        m.graph.initializer.remove(t)
    onnx.checker.check_model(m, full_check=True)
