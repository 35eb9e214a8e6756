"""ternary: q in {-1, 0, +1} times one f16 scale s per output channel or group, s chosen for the least squared error.

For a given set of nonzero codes S the best scale is mean(|w| over S), and the error is sum(w^2) - (sum_S |w|)^2/|S|;
the best S holds the k largest |w| for some k. So each row (or group) is sorted by |w| once and k is the argmax of
(prefix sum)^2 / k: the exact least-squares ternary quantizer, no iteration. The scale is then rounded to f16 and every
weight takes its nearest code in {-s, 0, s} (the error reported is the error of what ships).

BitNet b1.58's absmean (s = mean|w| over the whole row, threshold s/2) is what this scheme was before. On SmolLM2 it
made a third of the codes zero (order-0 entropy 1.584 bits, i.e. log2 3), with relative RMS error 0.52-0.61; the
least-squares scale makes about half of them zero (entropy 1.35-1.53 bits) at relative RMS error 0.44-0.53, so it is
both smaller after LZW and closer to the float weights. (Post-training ternary is garbage either way: the KL of
both is in docs/quality.md.)

Symbols are q + 1 in {0, 1, 2} (alphabet 3); decoding with bias 1 yields int8 -1/0/+1 bytes directly.
"""
from __future__ import annotations

import numpy as np

from . import Quantized, Scheme, errors, f16_scale, grouped, register

_BLOCK_ROWS = 2048  # rows sorted at once: bounds the temporary copies for a large embedding


def least_squares_scale(wg: np.ndarray) -> np.ndarray:
    """(rows, n_groups, group) -> (rows, n_groups) float32: the scale of the least-squares ternary fit of each group."""
    out = np.empty(wg.shape[:2], np.float32)
    k = np.arange(1, wg.shape[2] + 1, dtype=np.float64)
    for r in range(0, wg.shape[0], _BLOCK_ROWS):
        a = -np.sort(-np.abs(wg[r:r + _BLOCK_ROWS]), axis=2)          # |w| descending
        c = np.cumsum(a, axis=2, dtype=np.float64)
        best = np.argmax(c * c / k, axis=2)                            # k - 1 of the best nonzero set
        out[r:r + _BLOCK_ROWS] = np.take_along_axis(c, best[..., None], axis=2)[..., 0] / (best + 1)
    return out


def make(group: int):
    name = "ternary" if group == 0 else f"ternary-g{group}"

    def quantize(w: np.ndarray) -> Quantized:
        wg = grouped(w, group, name)
        s = f16_scale(least_squares_scale(wg))
        q = np.clip(np.rint(wg / s.astype(np.float32)[..., None]), -1, 1).astype(np.int8)
        out = Quantized(name, w.shape, symbols=(q + 1).astype(np.uint8).reshape(w.shape), scales=s, group=group)
        mx, rms = errors(w, dequantize(out))
        return Quantized(name, w.shape, out.symbols, s, group=group, max_error=mx, rms_error=rms)

    def dequantize(q: Quantized) -> np.ndarray:
        rows, cols = q.shape
        codes = (q.symbols.astype(np.float32) - 1.0).reshape(rows, q.scales.shape[1], -1)
        return (codes * q.scales.astype(np.float32)[..., None]).reshape(rows, cols)

    return register(Scheme(name, alphabet=3, bits=2, group=group, quantize=quantize, dequantize=dequantize,
                           description=f"ternary least-squares, {'per channel' if group == 0 else f'groups of {group}'}"))


make(0)
make(64)
