"""int4: asymmetric with an integer zero point, groups along the input dimension.

w ≈ s * (q - z), q in [0, 15], z in [0, 15] per group, s = (max - min) / 15 (f16). The integer zero point is the
layout onnxruntime's MatMulNBits consumes (packed nibbles for q and z).
"""
from __future__ import annotations

import numpy as np

from . import Quantized, Scheme, errors, f16_scale, grouped, register


def _grid(wg: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scales f16, zero points, codes) of grouped weights (rows, n_groups, g): min/max onto `levels` steps."""
    lo = np.minimum(wg.min(axis=2), 0.0)                               # keep 0 representable
    hi = np.maximum(wg.max(axis=2), 0.0)
    s = f16_scale((hi - lo) / (levels - 1))                            # (rows, n_groups)
    s32 = s.astype(np.float32)
    z = np.clip(np.rint(-lo / s32), 0, levels - 1).astype(np.uint8)
    q = np.clip(np.rint(wg / s32[..., None]) + z[..., None], 0, levels - 1).astype(np.uint8)
    return s, z, q


def roundtrip(w: np.ndarray, group: int, levels: int, name: str) -> np.ndarray:
    """dequantize(asymmetric(w)) without building the Quantized record or measuring its error (what smoothing's
    search calls a few times per weight)."""
    wg = grouped(w, group, name)
    s, z, q = _grid(wg, levels)
    return ((q.astype(np.float32) - z[..., None]) * s.astype(np.float32)[..., None]).reshape(w.shape)


def asymmetric(w: np.ndarray, group: int, levels: int, name: str) -> Quantized:
    """Shared by int4 and int2: min/max range per group mapped onto `levels` integer steps."""
    wg = grouped(w, group, name)                                       # (rows, n_groups, g)
    s, z, q = _grid(wg, levels)
    out = Quantized(name, w.shape, symbols=q.reshape(w.shape), scales=s, zeros=z, group=group)
    mx, rms = errors(w, dequantize_asymmetric(out))
    return Quantized(name, w.shape, out.symbols, s, z, group=group, max_error=mx, rms_error=rms)


def dequantize_asymmetric(q: Quantized) -> np.ndarray:
    rows, cols = q.shape
    n_groups = q.scales.shape[1]
    codes = q.symbols.astype(np.float32).reshape(rows, n_groups, -1)
    return ((codes - q.zeros[..., None]) * q.scales.astype(np.float32)[..., None]).reshape(rows, cols)


def make(group: int):
    name = f"int4-g{group}"
    return register(Scheme(name, alphabet=16, bits=4, group=group, symmetric=False,
                           quantize=lambda w: asymmetric(w, group, 16, name), dequantize=dequantize_asymmetric,
                           roundtrip=lambda w: roundtrip(w, group, 16, name),
                           description=f"asymmetric int4, groups of {group}, integer zero point"))


for _g in (32, 64, 128):
    make(_g)
