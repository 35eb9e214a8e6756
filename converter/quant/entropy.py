"""int8-eB: entropy-constrained int8 — codes whose order-0 entropy is B bits per weight.

The runtime layout is exactly int8-g32's (one code per byte, a float16 step per group of 32), so every graph and
both loaders run it as they run int8-g32 — with float activations (MatMulNBits), not the per-tensor 8-bit
activations of the per-channel int8 ops, which alone cost SmolLM2 ~0.01 nats of KL. All groups of a row share
one step (the repeats cost almost nothing once LZW-coded). What changes is how the step is chosen: not from the
range (max|w| / 127, which spends 8 bits on every weight) but for a target *rate*. A uniform quantizer followed by
an entropy coder is close to the best a scalar quantizer can do at a given rate, and it needs no group scales at
all: the codes of a coarse step are small integers that the LZW coder stores in about their entropy.

One step `c` serves the whole tensor (the MSE-optimal choice when every row matters equally), found by bisection
so that the codes' order-0 entropy is B. When the rows do not matter equally — the rows of an embedding /
lm_head are tokens, and a frequent token's row moves far more probability than a rare one's — each row gets

    step_r = c · (importance_r + ε)^-ALPHA,      importance summing to 1 over the rows, ε = EPSILON_FRACTION / rows

(ALPHA = 1/2 is the rate-distortion optimum when importance is the row's exact weight in the loss; 0.4, measured
on SmolLM2, hedges against an importance estimated from a few thousand tokens). No step is finer than the row's
own int8 step max|w_r| / 127, so codes always fit in int8.

Importance of a vocabulary row (token_importance): a Zipf prior over token ids — byte-level BPE numbers its
merges in the order it learned them, so a low id is a frequent token — with special tokens at the top, averaged
with the mean probability the model gives each token on calibration text when there is one (calibrate.py).
"""
from __future__ import annotations

import re

import numpy as np

from ..errors import QuantError
from . import SCHEMES, Quantized, Scheme, f16_scale, grouped

ALPHA = 0.4
EPSILON_FRACTION = 0.5          # ε = half the importance of a row if all were equal
ZIPF_OFFSET = 100               # prior of token id t: 1 / (t + ZIPF_OFFSET)
MIN_BITS, MAX_BITS = 1.0, 7.0
SAMPLE_ROWS = 8192              # the bisection measures entropy on at most this many evenly spaced rows
BLOCK_ROWS = 4096
GROUP = 32                      # the runtime layout's group (int8-g32)

NAME = re.compile(r"int8-e(\d+(?:\.\d{1,2})?)$")


def parse(name: str) -> float | None:
    """Target bits of an "int8-eB" name; None if the name is not of that form; QuantError if B is out of range."""
    m = NAME.match(name)
    if not m:
        return None
    bits = float(m.group(1))
    if not MIN_BITS <= bits <= MAX_BITS:
        raise QuantError(f"{name}: the target entropy must lie in [{MIN_BITS:g}, {MAX_BITS:g}] bits per weight")
    return bits


def entropy_bits(codes: np.ndarray) -> float:
    """Order-0 entropy (bits per code) of int8 codes."""
    counts = np.bincount(codes.reshape(-1).view(np.uint8), minlength=256).astype(np.float64)
    p = counts[counts > 0] / codes.size
    return float(-(p * np.log2(p)).sum())


def _round(w: np.ndarray, steps: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(w / steps.astype(np.float32)[:, None]), -127, 127).astype(np.int8)


def relative_steps(rows: int, importance: np.ndarray | None) -> np.ndarray:
    """(rows,) float64: step_r / c."""
    if importance is None:
        return np.ones(rows)
    imp = np.asarray(importance, np.float64)
    if imp.shape != (rows,) or not np.isfinite(imp).all() or (imp < 0).any() or imp.sum() <= 0:
        raise QuantError(f"row importance must be {rows} finite non-negative numbers with a positive sum")
    return (imp / imp.sum() + EPSILON_FRACTION / rows) ** -ALPHA


def row_steps(w: np.ndarray, bits: float, importance: np.ndarray | None = None,
              relative: np.ndarray | None = None) -> np.ndarray:
    """float16 (rows,) steps whose codes have an order-0 entropy of about `bits` (bisection on the scale).
    `relative` (rows,): step_r / c given directly, instead of from `importance` — a smoothed weight whose rows were
    divided by d_r takes 1 / d_r, so that every row keeps the precision it had before (see bundle.row_relative)."""
    rows = w.shape[0]
    if relative is not None:
        rel = np.asarray(relative, np.float64)
        if rel.shape != (rows,) or not np.isfinite(rel).all() or (rel <= 0).any():
            raise QuantError(f"relative row steps must be {rows} finite positive numbers")
    else:
        rel = relative_steps(rows, importance)
    floor = np.concatenate([np.abs(w[r:r + BLOCK_ROWS]).max(axis=1) for r in range(0, rows, BLOCK_ROWS)])
    floor = floor.astype(np.float64) / 127.0
    pick = np.linspace(0, rows - 1, min(rows, SAMPLE_ROWS)).astype(np.int64)
    ws, rs, fs = np.asarray(w[pick], np.float32), rel[pick], floor[pick]

    def steps(c, r, f):
        return f16_scale(np.maximum(c * r, f))

    rms = float(np.sqrt(np.mean(np.square(ws, dtype=np.float64)))) or 1.0
    lo, hi = np.log(rms * 1e-4 / rs.max()), np.log(rms * 1e3 / rs.min())
    for _ in range(40):
        mid = (lo + hi) / 2
        if entropy_bits(_round(ws, steps(np.exp(mid), rs, fs))) > bits:
            lo = mid
        else:
            hi = mid
    return steps(np.exp(hi), rel, floor)


def quantize_with_steps(name: str, w: np.ndarray, steps: np.ndarray) -> Quantized:
    """Round to nearest on the given per-row steps (float16 (rows,)), in row blocks (no full-size float copy:
    a Llama-3 embedding is 1 GB as float32)."""
    codes = np.empty(w.shape, np.int8)
    mx, sq = 0.0, 0.0
    for r in range(0, w.shape[0], BLOCK_ROWS):
        blk = np.asarray(w[r:r + BLOCK_ROWS], np.float32)
        c = codes[r:r + BLOCK_ROWS] = _round(blk, steps[r:r + BLOCK_ROWS])
        d = blk - c.astype(np.float32) * steps[r:r + BLOCK_ROWS].astype(np.float32)[:, None]
        mx, sq = max(mx, float(np.abs(d).max(initial=0.0))), sq + float(np.einsum("ij,ij->", d, d, dtype=np.float64))
    return _quantized(name, w.shape, codes.view(np.uint8), steps, mx, float(np.sqrt(sq / max(1, w.size))))


def _quantized(name, shape, symbols, steps, max_error, rms_error) -> Quantized:
    scales = np.repeat(steps.reshape(-1, 1).astype(np.float16), shape[1] // GROUP, axis=1)
    return Quantized(name, tuple(shape), symbols, scales, group=GROUP, max_error=max_error, rms_error=rms_error,
                     extra={"entropy_bits": round(entropy_bits(symbols.view(np.int8)), 4)})


def token_importance(vocab: int, special_ids=(), probabilities: np.ndarray | None = None) -> np.ndarray:
    """(vocab,) importance of each vocabulary row, summing to 1 (see the module docstring)."""
    prior = 1.0 / (np.arange(vocab, dtype=np.float64) + ZIPF_OFFSET)
    special = [i for i in special_ids if 0 <= i < vocab]
    if special:
        prior[special] = prior.max()
    prior /= prior.sum()
    if probabilities is None:
        return prior
    p = np.asarray(probabilities, np.float64)
    if p.shape != (vocab,) or p.sum() <= 0:
        raise QuantError(f"token probabilities must be {vocab} numbers with a positive sum")
    return (prior + p / p.sum()) / 2


def special_token_ids(tokenizer_json: dict) -> list[int]:
    """Ids of the special tokens of a parsed tokenizer.json ("added_tokens" marked special): chat markers and
    end-of-turn tokens, which the prior puts at the top whatever their id."""
    return [int(t["id"]) for t in tokenizer_json.get("added_tokens", []) if t.get("special")]


def make(name: str, bits: float) -> Scheme:
    def quantize(w: np.ndarray, importance: np.ndarray | None = None, relative: np.ndarray | None = None) -> Quantized:
        grouped(w, GROUP, name)                                       # 2-D, whole groups, finite
        return quantize_with_steps(name, w, row_steps(w, bits, importance, relative))

    layout = SCHEMES[f"int8-g{GROUP}"]                                 # codes and scales exactly as int8-g32
    return Scheme(name, alphabet=256, bits=8, group=GROUP, quantize=quantize, dequantize=layout.dequantize,
                  description=f"int8 codes, per-row steps for an order-0 entropy of {bits:g} bits per weight",
                  row_local=False, target_bits=bits)
