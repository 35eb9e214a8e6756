"""Calibrated quantization: GPTQ-style error compensation, per-group clip search and mixed precision, in numpy.

The model is run layer by layer on a calibration text (default: the tail of Python's `pydoc_data.topics`, which the
perplexity task of `converter eval` reads from the start; with SmolLM2's tokenizer the calibration text starts at
character 405,141 = token 98,250, so the two are disjoint for `eval --tasks ppl --limit` up to 190 chunks of 512):

    hidden X (n_tok, H) ─► RMSNorm ─► h ──► q/k/v (H_qkv = hᵀh) ─► attention ─► ctx ──► o (H_o = ctxᵀctx) ─► + X
    X ─► RMSNorm ─► h2 ──► gate/up (H_mlp = h2ᵀh2) ─► silu(g)·u = a ──► down (H_down = aᵀa) ─► + X
    ... after the last layer: X ─► final norm ─► lm_head (H_head)

Each linear is quantized as soon as its input Hessian is known, and the layer's *quantized* outputs are what the
next linear sees, so later layers compensate the errors of earlier ones. Only one decoder layer's float weights
are alive at a time (plus the embedding while it is read or quantized); quantized tensors are spilled to a
temporary folder and handed back to the bundle writer one by one.

The grid is always the scheme's own: group scales/zero points come from `scheme.quantize` applied to the group's
(clip-scaled) weights, codes are rounded on that grid, and the result is a `Quantized` that `scheme.dequantize`
reads like any other. Methods:

    rtn         round to nearest (the plain build), only useful with `mixed`
    clip        per-group clip factor α (scale of α·w) minimising Σ diag(H)·(w - ŵ)² over the group
    gptq        GPTQ (Frantar et al. 2022): columns in order, the rounding error of each column spread over the
                not-yet-quantized columns through the inverse Hessian; group parameters chosen when a group starts
    gptq+clip   both: the clip search runs on the error-updated weights when a group starts

`mixed` (a budget in nominal bits per weight over the decoder's linear layers): a first pass measures, per tensor,
the relative output error ‖ΔW·X‖² / ‖W·X‖² under the base scheme and under `mixed_high`; tensors are promoted to
`mixed_high` greedily by error removed per extra bit until the budget is spent; the second pass quantizes.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .config import LlamaConfig, rope_inv_freq
from .errors import QuantError
from .fisher import BETA, FISHER_KINDS, LEVELS_PER_OCTAVE, relative_steps, unsmoothed_row_fisher
from .quant import Quantized, Scheme, entropy, errors, get_scheme
from .smooth import row_relative

METHODS = ("rtn", "clip", "gptq", "gptq+clip")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EMBED_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
SOURCE_TEXTS = ("pydoc", "generated")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CalibrationOptions:
    method: str = "gptq"                 # one of METHODS
    sequences: int = 16                  # calibration windows ...
    seq_len: int = 256                   # ... of this many tokens each (16 × 256 = 4,096 tokens)
    damp: float = 0.1                    # GPTQ dampening: H += damp · mean(diag H) · I. GPTQ's usual 0.01 overfits
                                         # 4k tokens of Python docs: on held-out English the layer errors of
                                         # SmolLM2 layer 2 were 0.1: q 12 %, o 14 %, down 16 % lower than at 0.01
    block: int = 128                     # GPTQ lazy-update block (columns); a multiple of the group size
    act_order: bool = False              # GPTQ's columns by decreasing diag(H) (per-row grids only: quantize_gptq)
    fisher_rows: bool = False            # int8-eB: rows of q/k/v/up_proj get steps from their Fisher information
                                         # (fisher.py), measured on the calibration windows
    clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
    embedding: str = "rtn"               # "rtn" or "calibrated": quantize the (tied) embedding / lm_head with
                                         # the method too (Hessian of the final normed hidden states)
    mixed: float | None = None           # budget, nominal bits/weight over the decoder linears (None: off)
    mixed_high: str = "int8-g32"         # the scheme sensitive tensors are promoted to
    source_text: str = "pydoc"           # "pydoc" (below) or "generated": windows sampled from the float model
                                         # itself (selftext.py; bundle.write_bundle samples them)
    corpus_chars: int | None = None      # calibration text = the last this-many characters of the corpus;
                                         # None: max(60,000, 6 per token wanted) — the perplexity windows come
                                         # from the start of the same corpus (465k characters), far from these

    def check(self, scheme: str) -> None:
        if self.method not in METHODS:
            raise QuantError(f"unknown calibration method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.embedding not in ("rtn", "calibrated"):
            raise QuantError(f"calibration embedding must be rtn or calibrated, got {self.embedding!r}")
        if self.fisher_rows and get_scheme(scheme).target_bits is None:
            raise QuantError(f"--fisher-rows sets the per-row steps of an entropy-coded scheme (int8-eB), and {scheme} "
                             "has none: choose int8-eB linear layers or drop it")
        if embedding_only(scheme):
            if self.embedding != "calibrated" or self.mixed is not None:
                raise QuantError(f"with {scheme} linear layers (llama.cpp's blocks, kept as the GGUF stores them) only "
                                 "the embedding can be calibrated: add --calib-embedding, without --mixed")
            return self._check_numbers()
        if self.act_order and get_scheme(scheme).group:
            raise QuantError(f"--act-order reorders GPTQ's columns, and {scheme} chooses its grid per group of "
                             f"{get_scheme(scheme).group} columns in their order: use it with a per-row scheme "
                             "(int8, int8-eB) or drop it")
        for s in (scheme, self.mixed_high) if self.mixed is not None else (scheme,):
            if self.mixed is not None and get_scheme(s).target_bits is not None:
                raise QuantError(f"--mixed budgets nominal bits per weight, which {s} does not have (its size is "
                                 "set by its entropy target): choose the target instead")
            if get_scheme(s).alphabet == 0:
                raise QuantError(f"scheme {s} is a float scheme: there is nothing to calibrate")
            if not s.startswith(("int", "ternary")):      # the GGUF block schemes keep their own arithmetic
                raise QuantError(f"calibration supports the int*/ternary* schemes, not {s}")
        self._check_numbers()

    def _check_numbers(self) -> None:
        if self.source_text not in SOURCE_TEXTS:
            raise QuantError(f"calibration text must be one of {', '.join(SOURCE_TEXTS)}, got {self.source_text!r}")
        if self.sequences < 1 or self.seq_len < 2:
            raise QuantError("calibration needs at least one sequence of two tokens")
        if not 0 < self.damp < 1:
            raise QuantError(f"damp must lie in (0, 1), got {self.damp}")

    def text_chars(self) -> int:
        """Characters at the corpus's end the calibration windows are cut from."""
        return self.corpus_chars or max(60_000, 6 * self.sequences * self.seq_len)

    def record(self, scheme: str) -> dict:
        """What the manifest keeps (deterministic: no timings, no paths)."""
        d = {k: v for k, v in asdict(self).items() if k != "clip_grid"}
        d["clip_grid"] = list(self.clip_grid)
        d["corpus_chars"] = self.text_chars()
        d.pop("mixed"), d.pop("mixed_high")          # recorded as calibration.mixed when used
        d.pop("fisher_rows")                          # recorded as calibration.fisher_rows when used
        return d


# ---------------------------------------------------------------------------------------------------------------
# Calibration text
# ---------------------------------------------------------------------------------------------------------------

def embedding_only(scheme: str) -> bool:
    """Linear schemes whose layers are not calibrated, only the embedding: llama.cpp's block formats (q4_0, q4_1,
    q8_0), which `--scheme source` passes through bit for bit from a GGUF. Their weights are rounded the scheme's
    own way; the layer pass runs on those rounded weights to get the final hidden states the lm_head sees."""
    return get_scheme(scheme).name in ("q4_0", "q4_1", "q8_0")


def calibration_ids(tokenizer_json: dict, opts: CalibrationOptions) -> tuple[np.ndarray, dict]:
    """(ids (sequences, seq_len) int64, description). Windows are cut from the *end* of the corpus token stream."""
    from .evaluate.data import DEFAULT_CORPUS_NAME, default_corpus_text
    from .runtime.tokenizer import Tokenizer

    text = default_corpus_text()
    need = opts.sequences * opts.seq_len
    start = max(0, len(text) - opts.text_chars())
    cut = text.find("\n\n", start)                       # begin at a paragraph boundary
    start = cut + 2 if 0 <= cut < len(text) - 2 else start
    ids = Tokenizer.from_json_dict(tokenizer_json).encode(text[start:], add_special_tokens=False)
    if len(ids) < need:
        raise QuantError(f"calibration text has {len(ids)} tokens, {need} needed "
                         f"({opts.sequences} × {opts.seq_len}); lower --calib-tokens")
    arr = np.asarray(ids[len(ids) - need:], np.int64).reshape(opts.sequences, opts.seq_len)
    return arr, {"corpus": DEFAULT_CORPUS_NAME, "char_offset": start, "chars": len(text) - start,
                 "tokens": need}


# ---------------------------------------------------------------------------------------------------------------
# The scheme's grid: parameters from scheme.quantize, codes rounded on them, values from scheme.dequantize
# ---------------------------------------------------------------------------------------------------------------

def _kind(scheme: Scheme) -> str:
    if scheme.alphabet == 256:
        return "int8"
    if scheme.alphabet == 3:
        return "ternary"
    return "asym"


def group_params(scheme: Scheme, w: np.ndarray, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (rows,) f16 and zero point (rows,) uint8 | None the scheme itself picks for the columns `w` (rows, g)
    holding one group, with its range scaled by `alpha` (α < 1 clips the extremes)."""
    q = _quantize_as_one_group(scheme, np.ascontiguousarray(w * np.float32(alpha), np.float32))
    return q.scales[:, 0], None if q.zeros is None else q.zeros[:, 0]


def _quantize_as_one_group(scheme: Scheme, w: np.ndarray) -> Quantized:
    """scheme.quantize on a block whose width is exactly one group (or a whole row for per-channel schemes)."""
    if scheme.group not in (0, w.shape[1]):
        raise QuantError(f"{scheme.name}: a group block must be {scheme.group} columns wide, got {w.shape[1]}")
    return scheme.quantize(w)


def round_on_grid(scheme: Scheme, w: np.ndarray, s: np.ndarray, z: np.ndarray | None) -> np.ndarray:
    """Codes (symbols, uint8) of the values `w` (rows, k) on the grid of scale s (rows,) and zero z (rows,):
    the same rounding each scheme's quantize uses."""
    s32 = s.astype(np.float32)[:, None]
    kind = _kind(scheme)
    if kind == "int8":
        return np.clip(np.rint(w / s32), -127, 127).astype(np.int8).view(np.uint8)
    if kind == "ternary":
        return (np.clip(np.rint(w / s32), -1, 1) + 1).astype(np.uint8)
    return np.clip(np.rint(w / s32) + z[:, None], 0, scheme.alphabet - 1).astype(np.uint8)


def _multiple(scheme: Scheme) -> bool:
    """int4-mG: a group's step is its row's float16 scale times an integer multiplier (quant/int4.py), chosen per
    group here as the scheme chooses it, on the row scales of the weight as it comes in."""
    return scheme.name.startswith("int4-m")


def values_on_grid(scheme: Scheme, codes: np.ndarray, s: np.ndarray, z: np.ndarray | None) -> np.ndarray:
    """scheme.dequantize of codes (rows, k) sharing one scale/zero per row."""
    if _multiple(scheme):                          # s = row scale × multiplier, float32
        return (codes.astype(np.float32) - z.astype(np.float32)[:, None]) * s.astype(np.float32)[:, None]
    rows, k = codes.shape
    q = Quantized(scheme.name, (rows, k), codes, s.reshape(rows, 1),
                  None if z is None else z.reshape(rows, 1), group=k)
    return scheme.dequantize(q)


def best_clip(scheme: Scheme, w: np.ndarray, weight: np.ndarray, grid: tuple[float, ...]):
    """Per row, the α of `grid` whose grid minimises Σ weight·(w - ŵ)² over the group `w` (rows, g)."""
    best_err = best_s = best_z = None
    for a in grid:
        s, z = group_params(scheme, w, a)
        err = ((w - values_on_grid(scheme, round_on_grid(scheme, w, s, z), s, z)) ** 2 * weight).sum(axis=1)
        if best_err is None:
            best_err, best_s, best_z = err, s.copy(), None if z is None else z.copy()
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        if z is not None:
            best_z = np.where(better, z, best_z)
    return best_s, best_z


# ---------------------------------------------------------------------------------------------------------------
# Quantizers of one weight given its input Hessian
# ---------------------------------------------------------------------------------------------------------------

def _assemble(scheme: Scheme, w: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros,
              mults: np.ndarray | None = None) -> Quantized:
    q = Quantized(scheme.name, tuple(w.shape), codes, scales, zeros, group=scheme.group, mults=mults)
    mx, rms = errors(w, scheme.dequantize(q))
    return Quantized(scheme.name, tuple(w.shape), codes, scales, zeros, group=scheme.group,
                     max_error=mx, rms_error=rms, mults=mults)


def quantize_rtn(scheme: Scheme, w: np.ndarray, h_diag: np.ndarray | None = None,
                 clip_grid: tuple[float, ...] | None = None) -> Quantized:
    """Round to nearest on the scheme's grid, optionally with the per-group clip search (weighted by diag H).
    int8-eB: its own steps (the rate sets them, so there is no clip to search)."""
    if scheme.target_bits is not None:
        return scheme.quantize(w)
    rows, cols = w.shape
    g = scheme.group or cols
    if _multiple(scheme):           # its own search, the clip variant weighing each column by its input energy
        from .quant.int4 import _multiple_grid
        weight = None if not clip_grid or h_diag is None else h_diag.astype(np.float32).reshape(cols // g, g)
        r, m, z, q = _multiple_grid(w.reshape(rows, cols // g, g), weight)
        return _assemble(scheme, w, q.reshape(rows, cols), r, z, m)
    codes = np.empty((rows, cols), np.uint8)
    scales = np.empty((rows, cols // g), np.float16)
    zeros = np.empty((rows, cols // g), np.uint8) if not scheme.symmetric else None
    for j in range(cols // g):
        blk = w[:, j * g:(j + 1) * g]
        if clip_grid:
            wt = np.ones(g, np.float32) if h_diag is None else h_diag[j * g:(j + 1) * g].astype(np.float32)
            s, z = best_clip(scheme, blk, wt[None, :], clip_grid)
        else:
            s, z = group_params(scheme, blk)
        codes[:, j * g:(j + 1) * g] = round_on_grid(scheme, blk, s, z)
        scales[:, j] = s
        if zeros is not None:
            zeros[:, j] = z
    return _assemble(scheme, w, codes, scales, zeros)


def inverse_hessian_factor(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), dead-column mask), H dampened, float64."""
    h = np.array(h, np.float64, copy=True)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    hinv = np.linalg.inv(h)
    hinv = (hinv + hinv.T) / 2
    return np.linalg.cholesky(hinv).T, dead


def quantize_gptq(scheme: Scheme, w: np.ndarray, h: np.ndarray, damp: float = 0.1, block: int = 128,
                  clip_grid: tuple[float, ...] | None = None, row_block: int = 4096,
                  steps: np.ndarray | None = None, act_order: bool = False) -> Quantized:
    """GPTQ on the scheme's grid. Rows are independent given H, so large weights go in row blocks (bounded
    temporaries for a 49k-row lm_head). Columns run in order; a group's scale/zero point is chosen from the
    error-updated weights when the group starts (with the clip search if `clip_grid`). `steps` (rows,): every
    group's scale fixed in advance, one per row (int8-eB, whose steps come from the rate target).

    `act_order`: the columns run by decreasing diag(H) instead (GPTQ's "act-order": the inputs with the largest
    activations are rounded first, while every other column can still absorb their error). Only where the grid
    does not depend on the column order — a row's steps fixed in advance or one grid per row; group schemes
    ignore it."""
    if act_order and (steps is not None or not scheme.group):
        perm = np.argsort(-np.diag(h), kind="stable")
        q = quantize_gptq(scheme, w[:, perm], h[np.ix_(perm, perm)], damp, block, clip_grid, row_block, steps)
        return _assemble(scheme, w, q.symbols[:, np.argsort(perm)], q.scales, q.zeros, q.mults)
    rows, cols = w.shape
    g = scheme.group or cols
    if scheme.group and block % g:
        block = max(g, block // g * g)
    u, dead = inverse_hessian_factor(h, damp)
    u32 = u.astype(np.float32)
    h_diag = np.diag(h).astype(np.float32)
    codes = np.empty((rows, cols), np.uint8)
    multiple = _multiple(scheme)
    scales = np.empty((rows, 1 if multiple else cols // g), np.float16)
    zeros = np.empty((rows, cols // g), np.uint8) if not scheme.symmetric else None
    mults = np.empty((rows, cols // g), np.uint8) if multiple else None
    if multiple:
        from .quant.int4 import choose_multipliers, row_scales
    for r0 in range(0, rows, row_block):
        r1 = min(rows, r0 + row_block)
        W = np.array(w[r0:r1], np.float32, copy=True)                   # (r, cols), updated in place
        W[:, dead] = 0.0
        s = z = None
        if multiple:                    # int4-mG: row scales from the weights as they come, multipliers per group
            scales[r0:r1] = row_scales(W.reshape(r1 - r0, cols // g, g))
        if steps is not None:                                            # fixed in advance, for every group
            s, z = steps[r0:r1], None
            scales[r0:r1] = s[:, None]
        elif not scheme.group:                                           # per channel: one grid from the start
            s, z = (best_clip(scheme, W, h_diag[None, :], clip_grid) if clip_grid else group_params(scheme, W))
            scales[r0:r1, 0] = s
            if zeros is not None:
                zeros[r0:r1, 0] = z
        for i1 in range(0, cols, block):
            i2 = min(cols, i1 + block)
            W1 = W[:, i1:i2]                                             # view: updates land in W
            E1 = np.empty_like(W1)
            U1 = u32[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if scheme.group and col % g == 0 and steps is None and multiple:
                    blk = W1[:, i:i + g]
                    m, z = choose_multipliers(blk[:, None, :], scales[r0:r1],
                                              h_diag[col:col + g] if clip_grid else None)
                    s, z = scales[r0:r1, 0].astype(np.float32) * m[:, 0], z[:, 0].astype(np.uint8)
                    mults[r0:r1, col // g] = m[:, 0]
                    zeros[r0:r1, col // g] = z
                elif scheme.group and col % g == 0 and steps is None:   # a group starts: its grid, from the
                    blk = W1[:, i:i + g]                                # error-updated weights
                    s, z = (best_clip(scheme, blk, h_diag[None, col:col + g], clip_grid) if clip_grid
                            else group_params(scheme, blk))
                    scales[r0:r1, col // g] = s
                    if zeros is not None:
                        zeros[r0:r1, col // g] = z
                c = round_on_grid(scheme, W1[:, i:i + 1], s, z)
                codes[r0:r1, col] = c[:, 0]
                err = (W1[:, i] - values_on_grid(scheme, c, s, z)[:, 0]) / U1[i, i]
                W1[:, i + 1:] -= np.outer(err, U1[i, i + 1:])
                E1[:, i] = err
            W[:, i2:] -= E1 @ u32[i1:i2, i2:]
    return _assemble(scheme, w, codes, scales, zeros, mults)


def quantize_with(method: str, scheme: Scheme, w: np.ndarray, h: np.ndarray | None,
                  opts: CalibrationOptions, importance: np.ndarray | None = None,
                  relative: np.ndarray | None = None) -> Quantized:
    """`importance`: of each row, for int8-eB (see quant/entropy.py), or `relative`: its relative row steps given
    directly; the other schemes weigh rows equally."""
    if scheme.target_bits is not None:
        steps = entropy.row_steps(w, scheme.target_bits, importance, relative)
        if method.startswith("gptq") and h is not None:
            return quantize_gptq(scheme, w, h, opts.damp, opts.block, steps=steps, act_order=opts.act_order)
        return entropy.quantize_with_steps(scheme.name, w, steps)
    clip = opts.clip_grid if method in ("clip", "gptq+clip") else None
    if method.startswith("gptq") and h is not None:
        return quantize_gptq(scheme, w, h, opts.damp, opts.block, clip, act_order=opts.act_order)
    return quantize_rtn(scheme, w, None if h is None else np.diag(h), clip)


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """‖(W - Ŵ)X‖² / ‖W X‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with H = XᵀX (float64)."""
    d = (w - w_hat).astype(np.float64)
    w64 = w.astype(np.float64)
    num = float(np.einsum("ij,ij->", d @ h, d))
    den = float(np.einsum("ij,ij->", w64 @ h, w64))
    return num / den if den > 0 else 0.0


def nominal_bits(scheme: Scheme, cols: int) -> float:
    """Bits per weight before entropy coding: code + f16 scale (+ zero point) per group; int4-mG: code + 4-bit
    multiplier and zero point per group + f16 scale per row."""
    g = scheme.group or cols
    if _multiple(scheme):
        return scheme.bits + 8.0 / g + 16.0 / cols
    return scheme.bits + 16.0 / g + (scheme.bits / g if not scheme.symmetric else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# The layer-by-layer forward
# ---------------------------------------------------------------------------------------------------------------

def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * w).astype(np.float32)


def _attention(cfg: LlamaConfig, q: np.ndarray, k: np.ndarray, v: np.ndarray, n: int, s: int) -> np.ndarray:
    """q (n·s, nh·hd), k/v (n·s, kv·hd) -> context (n·s, nh·hd); causal, RoPE rotate-half, GQA."""
    hd, nh, kvh = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    inv = np.asarray(rope_inv_freq(cfg), np.float32)
    emb = np.outer(np.arange(s, dtype=np.float32), inv)
    emb = np.concatenate([emb, emb], axis=-1)                                  # (s, hd)
    cos, sin = np.cos(emb), np.sin(emb)

    def rope(x):                                                               # (n, h, s, hd)
        half = hd // 2
        return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin

    q = rope(q.reshape(n, s, nh, hd).transpose(0, 2, 1, 3))
    k = rope(k.reshape(n, s, kvh, hd).transpose(0, 2, 1, 3))
    v = v.reshape(n, s, kvh, hd).transpose(0, 2, 1, 3)
    rep = nh // kvh
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    mask = np.triu(np.full((s, s), -np.inf, np.float32), 1)
    att = q @ k.transpose(0, 1, 3, 2) * np.float32(1.0 / math.sqrt(hd)) + mask  # (n, nh, s, s)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    return (att @ v).transpose(0, 2, 1, 3).reshape(n * s, nh * hd).astype(np.float32)


def _hessian(x: np.ndarray) -> np.ndarray:
    """XᵀX / n_tokens in float64 (the scale does not change GPTQ, it keeps numbers readable)."""
    x64 = x.astype(np.float64)
    return x64.T @ x64 / x.shape[0]


class _Spill:
    """Quantized tensors parked on disk until the bundle writer asks for them."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="tiny-qmoe-calib-"))
        self.names: dict[str, str] = {}

    def put(self, name: str, q: Quantized):
        f = self.dir / f"{len(self.names):04d}.npz"
        arrays = {"symbols": q.symbols, "scales": q.scales}
        for part in ("zeros", "mults"):                  # the optional arrays of a Quantized (mins: GGUF only)
            if getattr(q, part) is not None:
                arrays[part] = getattr(q, part)
        np.savez(f, **arrays)
        meta = {"scheme": q.scheme, "shape": list(q.shape), "group": q.group, "max_error": q.max_error,
                "rms_error": q.rms_error}
        (f.with_suffix(".json")).write_text(json.dumps(meta))
        self.names[name] = f.stem

    def get(self, name: str) -> Quantized:
        f = self.dir / f"{self.names[name]}.npz"
        meta = json.loads(f.with_suffix(".json").read_text())
        with np.load(f) as a:
            return Quantized(meta["scheme"], tuple(meta["shape"]), a["symbols"], a["scales"],
                             a["zeros"] if "zeros" in a else None, group=meta["group"],
                             max_error=meta["max_error"], rms_error=meta["rms_error"],
                             mults=a["mults"] if "mults" in a else None)

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Calibrated:
    """The result: per-tensor Quantized (on disk), per-tensor scheme, and the manifest record."""
    spill: _Spill
    schemes: dict[str, str]
    record: dict
    output_errors: dict[str, float]            # relative output error of each calibrated tensor

    def __contains__(self, name: str) -> bool:
        return name in self.spill.names

    def get(self, name: str) -> Quantized:
        return self.spill.get(name)

    def close(self):
        self.spill.close()


def _layer_pass(checkpoint, cfg: LlamaConfig, ids: np.ndarray, quantize: Callable[[str, np.ndarray, np.ndarray],
                np.ndarray], progress: Progress | None, label: str) -> np.ndarray:
    """Run the model layer by layer on `ids` (n, s); `quantize(name, w, H)` returns the weight the forward should
    continue with (the dequantized quantized weight). Returns the final normed hidden states (n·s, H)."""
    n, s = ids.shape
    emb = checkpoint.load("model.embed_tokens.weight")
    x = emb[ids.reshape(-1)].astype(np.float32)                                 # (n·s, H)
    del emb
    L = cfg.num_hidden_layers
    for i in range(L):
        if progress:
            progress(f"{label}: layer {i}", i, L + 1)
        p = f"model.layers.{i}."
        load = lambda name: checkpoint.load(p + name + ".weight")  # noqa: E731
        h = _rms_norm(x, load("input_layernorm"), cfg.rms_norm_eps)
        hq = _hessian(h)
        q, k, v = (h @ quantize(p + name + ".weight", load(name), hq).T
                   for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
        ctx = _attention(cfg, q, k, v, n, s)
        del q, k, v, h
        x = x + ctx @ quantize(p + "self_attn.o_proj.weight", load("self_attn.o_proj"), _hessian(ctx)).T
        h2 = _rms_norm(x, load("post_attention_layernorm"), cfg.rms_norm_eps)
        hm = _hessian(h2)
        gate = h2 @ quantize(p + "mlp.gate_proj.weight", load("mlp.gate_proj"), hm).T
        up = h2 @ quantize(p + "mlp.up_proj.weight", load("mlp.up_proj"), hm).T
        a = (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32)
        del gate, up, h2
        x = x + a @ quantize(p + "mlp.down_proj.weight", load("mlp.down_proj"), _hessian(a)).T
        x = x.astype(np.float32)
    return _rms_norm(x, checkpoint.load("model.norm.weight"), cfg.rms_norm_eps)


def mean_token_probabilities(hidden: np.ndarray, head: np.ndarray, block: int = 256) -> np.ndarray:
    """(vocab,) float64: the model's next-token distribution averaged over the calibration positions (the final
    normed hidden states `hidden` (positions, H) through the lm_head `head` (vocab, H)), in position blocks."""
    total = np.zeros(head.shape[0], np.float64)
    for i in range(0, hidden.shape[0], block):
        z = hidden[i:i + block] @ head.T
        z = np.exp(z - z.max(axis=1, keepdims=True))
        total += (z / z.sum(axis=1, keepdims=True)).sum(axis=0, dtype=np.float64)
    return total / max(1, hidden.shape[0])


def _choose_mixed(sens: dict[str, tuple[float, float, int, float, float]], budget: float) -> list[str]:
    """Greedy: promote the tensors that remove the most relative output error per extra bit until the average
    nominal bits/weight reaches `budget`. sens: name -> (err_low, err_high, params, bits_low, bits_high)."""
    total = sum(p for _, _, p, _, _ in sens.values())
    spent = sum(p * bl for _, _, p, bl, _ in sens.values())
    order = sorted(sens, key=lambda n: -(sens[n][0] - sens[n][1]) / (sens[n][2] * (sens[n][4] - sens[n][3])))
    chosen = []
    for name in order:
        el, eh, p, bl, bh = sens[name]
        if el <= eh:
            continue
        if (spent + p * (bh - bl)) / total > budget:
            continue
        spent += p * (bh - bl)
        chosen.append(name)
    return sorted(chosen, key=list(sens).index)


def calibrate(checkpoint, scheme: str, embed_scheme: str, opts: CalibrationOptions,
              progress: Progress | None = None, windows: tuple[np.ndarray, dict] | None = None) -> Calibrated:
    """Quantize every 2-D tensor of `checkpoint` with calibration; returns them spilled to disk. `windows`: the
    calibration text as (ids (sequences, seq_len), description), e.g. sampled by selftext.generated_ids; default
    the pydoc windows (calibration_ids)."""
    opts.check(scheme)
    cfg: LlamaConfig = checkpoint.config
    tok = json.loads(checkpoint.tokenizer_files()["tokenizer.json"])
    if windows is None and opts.source_text != "pydoc":
        raise QuantError(f"calibration text {opts.source_text!r}: pass its windows (bundle.write_bundle samples them)")
    ids, text_info = windows if windows is not None else calibration_ids(tok, opts)
    base, high = get_scheme(scheme), get_scheme(opts.mixed_high)
    record = {"method": opts.method, **opts.record(scheme), "text": text_info}
    schemes: dict[str, str] = {}

    promoted: list[str] = []
    if opts.mixed is not None:
        sens: dict[str, tuple] = {}

        def measure(name, w, h):
            ql = quantize_rtn(base, w)
            qh = quantize_rtn(high, w)
            wl = base.dequantize(ql)
            sens[name] = (output_error(w, wl, h), output_error(w, high.dequantize(qh), h), w.size,
                          nominal_bits(base, w.shape[1]), nominal_bits(high, w.shape[1]))
            return wl

        _layer_pass(checkpoint, cfg, ids, measure, progress, "sensitivity")
        promoted = _choose_mixed(sens, opts.mixed)
        total = sum(v[2] for v in sens.values())
        bits = sum(v[2] * (v[4] if n in promoted else v[3]) for n, v in sens.items()) / total
        record["mixed"] = {"budget_bits": opts.mixed, "high": opts.mixed_high, "nominal_bits": round(bits, 4),
                           "promoted": promoted}

    factors: dict[str, np.ndarray] = {}
    if opts.fisher_rows:
        factors = {n: relative_steps(f) for n, f in unsmoothed_row_fisher(checkpoint, ids, progress).items()}
        record["fisher_rows"] = {"kinds": list(FISHER_KINDS), "beta": BETA, "levels_per_octave": LEVELS_PER_OCTAVE,
                                 "matrices": len(factors), "positions": int(np.asarray(ids).size)}

    spill = _Spill()
    errs: dict[str, float] = {}
    try:
        def quantize(name, w, h):
            if embedding_only(scheme):            # the bundle writer rounds (or passes through) these itself
                return base.dequantize(base.quantize(w))
            sch = high if name in promoted else base
            relative = row_relative(checkpoint, name)
            if name in factors:
                relative = factors[name] if relative is None else relative * factors[name]
            q = quantize_with(opts.method, sch, w, h, opts, relative=relative)
            spill.put(name, q)
            schemes[name] = sch.name
            w_hat = sch.dequantize(q)
            errs[name] = output_error(w, w_hat, h)
            return w_hat

        final = _layer_pass(checkpoint, cfg, ids, quantize, progress, "calibrate")
        if opts.embedding == "calibrated":
            head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            es = get_scheme(embed_scheme)
            if es.alphabet and es.name.startswith(("int", "ternary")):   # else: the plain path quantizes it
                if progress:
                    progress("calibrate: lm_head", cfg.num_hidden_layers, cfg.num_hidden_layers + 1)
                w = checkpoint.load(head)
                h = _hessian(final)
                importance = None
                if es.target_bits is not None:           # rows are tokens: weigh them by how often they are said
                    probs = mean_token_probabilities(final, w)
                    importance = entropy.token_importance(w.shape[0], entropy.special_token_ids(tok), probs)
                    record["token_importance"] = "zipf prior by id + mean probability on the calibration text"
                q = quantize_with(opts.method, es, w, h, opts, importance)
                spill.put(head, q)
                schemes[head] = es.name
                errs[head] = output_error(w, es.dequantize(q), h)
                del w
        linear = [e for n, e in errs.items() if n not in EMBED_NAMES]
        if linear:
            record["mean_output_error"] = round(float(np.mean(linear)), 6)
            record["max_output_error"] = round(float(np.max(linear)), 6)
        if opts.embedding == "calibrated" and errs.keys() & set(EMBED_NAMES):
            record["embedding_output_error"] = round(float(next(errs[n] for n in EMBED_NAMES if n in errs)), 6)
        return Calibrated(spill, schemes, record, errs)
    except BaseException:
        spill.close()
        raise

