"""ternary: q in {-1, 0, +1}, s = mean|w| (BitNet b1.58's absmean) per output channel or group.

Symbols are q + 1 in {0, 1, 2} (alphabet 3); decoding with bias 1 yields int8 -1/0/+1 bytes directly.
"""
from __future__ import annotations

import numpy as np

from . import Quantized, Scheme, errors, f16_scale, grouped, register


def make(group: int):
    name = "ternary" if group == 0 else f"ternary-g{group}"

    def quantize(w: np.ndarray) -> Quantized:
        wg = grouped(w, group, name)
        s = f16_scale(np.abs(wg).mean(axis=2))
        q = np.clip(np.rint(wg / s.astype(np.float32)[..., None]), -1, 1).astype(np.int8)
        out = Quantized(name, w.shape, symbols=(q + 1).astype(np.uint8).reshape(w.shape), scales=s, group=group)
        mx, rms = errors(w, dequantize(out))
        return Quantized(name, w.shape, out.symbols, s, group=group, max_error=mx, rms_error=rms)

    def dequantize(q: Quantized) -> np.ndarray:
        rows, cols = q.shape
        codes = (q.symbols.astype(np.float32) - 1.0).reshape(rows, q.scales.shape[1], -1)
        return (codes * q.scales.astype(np.float32)[..., None]).reshape(rows, cols)

    return register(Scheme(name, alphabet=3, bits=2, group=group, quantize=quantize, dequantize=dequantize,
                           description=f"ternary absmean, {'per channel' if group == 0 else f'groups of {group}'}"))


make(0)
make(64)
