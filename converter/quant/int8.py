"""int8: symmetric, q = round(w / s) in [-127, 127], s = max|w| / 127 per output channel or per group.

Symbols are the two's-complement bytes of q (alphabet 256), so the decoded bytes *are* the int8 weights.
"""
from __future__ import annotations

import numpy as np

from . import Quantized, Scheme, errors, f16_scale, grouped, register


def make(group: int):
    name = "int8" if group == 0 else f"int8-g{group}"

    def quantize(w: np.ndarray) -> Quantized:
        wg = grouped(w, group, name)                                   # (rows, n_groups, g)
        s = f16_scale(np.abs(wg).max(axis=2) / 127.0)                  # (rows, n_groups) f16
        q = np.clip(np.rint(wg / s.astype(np.float32)[..., None]), -127, 127).astype(np.int8)
        out = Quantized(name, w.shape, symbols=q.reshape(w.shape).view(np.uint8), scales=s, group=group)
        mx, rms = errors(w, dequantize(out))
        return Quantized(name, w.shape, out.symbols, s, group=group, max_error=mx, rms_error=rms)

    def dequantize(q: Quantized) -> np.ndarray:
        rows, cols = q.shape
        codes = q.symbols.view(np.int8).astype(np.float32).reshape(rows, q.scales.shape[1], -1)
        return (codes * q.scales.astype(np.float32)[..., None]).reshape(rows, cols)

    return register(Scheme(name, alphabet=256, bits=8, group=group, quantize=quantize, dequantize=dequantize,
                           description=f"symmetric int8, {'per channel' if group == 0 else f'groups of {group}'}"))


make(0)
make(32)
