"""int4: asymmetric with an integer zero point, groups along the input dimension.

int4-gG: w ≈ s * (q - z), q in [0, 15], z in [0, 15] per group, s = (max - min) / 15 (f16). The integer zero point
is the layout onnxruntime's MatMulNBits consumes (packed nibbles for q and z).

int4-mG: the same codes and zero points, but a group's step is an integer multiple of its row's: s = r * m, r one
float16 per row, m in 1..8 per group (4 bits, packed as the zero points are). A group costs 8 bits of metadata
instead of 20, and (q - z) * m is an integer in [-120, 120]: the weights are exactly int8 codes with one scale per
row. Each group takes the m (of the four around its own min/max step) whose grid reproduces its weights best.
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


# ---- int4-mG: group steps that are integer multiples of the row's step ------------------------------------------
MULT_MAX = 8        # |q - z| <= 15, so (q - z) * m stays within int8


def row_scales(wg: np.ndarray) -> np.ndarray:
    """float16 (rows, 1): the step of each row's widest group over MULT_MAX, rounded up to float16, so that the
    widest group's min/max grid is exactly MULT_MAX row steps."""
    lo = np.minimum(wg.min(axis=2), 0.0)
    hi = np.maximum(wg.max(axis=2), 0.0)
    widest = ((hi - lo) / 15).max(axis=1, keepdims=True)
    r = f16_scale(widest / MULT_MAX)
    short = r.astype(np.float32) * MULT_MAX < widest                   # rounded down: the widest group would clip
    return np.where(short, np.nextafter(r, np.float16(np.inf)), r).astype(np.float16)


def choose_multipliers(wg: np.ndarray, r: np.ndarray,
                       weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(multipliers float32 (rows, n_groups), zero points float32) of grouped weights wg (rows, n_groups, g) on row
    scales r (rows, 1): per group, of the four multipliers around its own min/max step, the one whose grid (with its
    own zero point) reproduces the group with the least squared error, weighted per column by `weight` ((g,) or
    (n_groups, g): calibrate.py, the inputs' energy)."""
    lo = np.minimum(wg.min(axis=2), 0.0)
    hi = np.maximum(wg.max(axis=2), 0.0)
    r32 = r.astype(np.float32)
    x = (hi - lo) / 15 / r32
    # Each candidate's squared error in units of the row's step (the same unit for every group of a row), computed
    # in place on one scratch array: the search is most of a build's time (smoothing runs it several times a weight)
    u = wg / r32[..., None]
    lo_u = lo / r32
    t = np.empty_like(u)
    best_err, best_m = None, None
    for cand in (np.floor(x) - 1, np.floor(x), np.ceil(x), np.ceil(x) + 1):
        m = np.clip(cand, 1, MULT_MAX).astype(np.float32)
        z = np.clip(np.rint(-lo_u / m), 0, 15)[..., None]
        np.divide(u, m[..., None], out=t)
        np.rint(t, out=t)
        t += z
        np.clip(t, 0, 15, out=t)
        t -= z
        t *= m[..., None]
        t -= u
        np.square(t, out=t)
        if weight is not None:
            t *= weight
        err = t.sum(axis=2)
        if best_err is None:
            best_err, best_m = err, m
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_m = np.where(better, m, best_m)
    return best_m, np.clip(np.rint(-lo / (r32 * best_m)), 0, 15)


def _multiple_grid(wg: np.ndarray, weight: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(row scales f16 (rows, 1), multipliers uint8 (rows, n_groups), zero points, codes) of grouped weights;
    `weight`: as choose_multipliers."""
    r = row_scales(wg)
    m, z = choose_multipliers(wg, r, weight)
    step = r.astype(np.float32) * m
    q = np.clip(np.rint(wg / step[..., None]) + z[..., None], 0, 15)
    return r, m.astype(np.uint8), z.astype(np.uint8), q.astype(np.uint8)


def _multiple_values(r: np.ndarray, m: np.ndarray, z: np.ndarray, q: np.ndarray) -> np.ndarray:
    step = r.astype(np.float32) * m.astype(np.float32)                 # (rows, n_groups)
    return (q.astype(np.float32) - z[..., None]) * step[..., None]


def multiple(w: np.ndarray, group: int, name: str) -> Quantized:
    wg = grouped(w, group, name)
    r, m, z, q = _multiple_grid(wg)
    out = Quantized(name, w.shape, q.reshape(w.shape), r, z, group=group, mults=m)
    mx, rms = errors(w, dequantize_multiple(out))
    return Quantized(name, w.shape, out.symbols, r, z, group=group, max_error=mx, rms_error=rms, mults=m)


def roundtrip_multiple(w: np.ndarray, group: int, name: str) -> np.ndarray:
    """dequantize(multiple(w)) without the Quantized record or its error (what smoothing's search calls)."""
    return _multiple_values(*_multiple_grid(grouped(w, group, name))).reshape(w.shape)


def dequantize_multiple(q: Quantized) -> np.ndarray:
    rows, cols = q.shape
    codes = q.symbols.reshape(rows, q.mults.shape[1], -1)
    return _multiple_values(q.scales, q.mults, q.zeros, codes).reshape(rows, cols)


def make_multiple(group: int):
    name = f"int4-m{group}"
    return register(Scheme(name, alphabet=16, bits=4, group=group, symmetric=False,
                           quantize=lambda w: multiple(w, group, name), dequantize=dequantize_multiple,
                           roundtrip=lambda w: roundtrip_multiple(w, group, name),
                           description=f"asymmetric int4, groups of {group}, each group's step an integer multiple "
                                       f"(1-{MULT_MAX}) of its row's: exactly int8 codes with a row scale"))


for _g in (32, 64):
    make_multiple(_g)
