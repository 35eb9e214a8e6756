"""Quantization schemes, one small module each, registered by name.

Every scheme is a pair of pure functions over a 2-D float32 weight `w` of shape (rows=out, cols=in):

    q = quantize(w)          -> Quantized(symbols, scales, zeros, ...)   symbols: uint8 (rows, cols), < alphabet
    w_hat = dequantize(q)    -> float32 (rows, cols)

Scales are stored as float16 (the quantizer rounds them to f16 *before* computing codes, so the reported error is
the error of what ships). Groups run along the input dimension (cols): a group is `group` consecutive weights of
one output row. `group=0` means one group per row (per output channel).

Names: "f32", "f16", "int8" (per channel), "int8-g32", "int4-g32|g64|g128", "int4-m32|m64" (group steps that are
integer multiples of a row step), "int2-g32|g64", "ternary",
"ternary-g64", llama.cpp's GGUF block formats "q8_0", "q4_0", "q4_1" (ggml.py), and "int8-eB" (entropy.py: int8
codes whose step is chosen for an order-0 entropy of B bits, e.g. int8-e4; made on first use). The registry maps
each name to a `Scheme`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import QuantError


@dataclass(frozen=True)
class Quantized:
    scheme: str
    shape: tuple[int, int]             # (rows, cols) of the original weight
    symbols: np.ndarray                # uint8 (rows, cols): the code of each weight as a symbol < alphabet
    scales: np.ndarray | None          # float16 (rows, n_groups)
    zeros: np.ndarray | None = None    # uint8 (rows, n_groups) integer zero points (asymmetric schemes)
    group: int = 0                     # weights per group along cols (0 = whole row)
    max_error: float = 0.0             # max |w - w_hat|
    rms_error: float = 0.0             # sqrt(mean((w - w_hat)^2))
    extra: dict = field(default_factory=dict)
    mins: np.ndarray | None = None     # float16 (rows, n_groups) additive offsets: GGUF Q4_1's w = d*q + m
    mults: np.ndarray | None = None    # uint8 (rows, n_groups) 1..8: int4-mG's group step = row scale * mult


@dataclass(frozen=True)
class Scheme:
    name: str
    alphabet: int                      # symbol alphabet size for the LZW coder (0 = not a symbol stream)
    bits: int                          # bits of one code in its runtime layout
    group: int                         # 0 = per output channel
    quantize: Callable[[np.ndarray], Quantized]
    dequantize: Callable[[Quantized], np.ndarray]
    symmetric: bool = True
    description: str = ""
    row_local: bool = True             # quantize(w[a:b]) == quantize(w)[a:b], so big weights may go in row blocks
    target_bits: float | None = None   # int8-eB: the order-0 entropy its steps are chosen for
    roundtrip: Callable[[np.ndarray], np.ndarray] | None = None   # dequantize(quantize(w)), faster, where defined


SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    if scheme.name in SCHEMES:
        raise ValueError(f"scheme {scheme.name} registered twice")
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        pass
    from . import entropy
    bits = entropy.parse(name)
    if bits is None:
        raise QuantError(f"unknown scheme {name!r}; choose one of: {', '.join(SCHEMES)}, "
                         "int8-eB (B = target bits per weight, e.g. int8-e4)") from None
    return register(entropy.make(name, bits))


# ---- helpers shared by the schemes ------------------------------------------------------------------------

def grouped(w: np.ndarray, group: int, name: str) -> np.ndarray:
    """(rows, cols) -> (rows, n_groups, group). Refuses shapes that do not split into whole groups."""
    if w.ndim != 2:
        raise QuantError(f"{name}: expects a 2-D weight, got shape {list(w.shape)}")
    rows, cols = w.shape
    g = cols if group == 0 else group
    if cols % g:
        raise QuantError(f"{name}: {cols} columns do not split into groups of {g}")
    if not np.isfinite(w).all():
        raise QuantError(f"{name}: weight holds NaN or Inf")
    return w.reshape(rows, cols // g, g)


def f16_scale(s: np.ndarray) -> np.ndarray:
    """Round scales to float16 as stored; a zero or sub-f16 scale becomes the smallest normal f16."""
    s16 = s.astype(np.float16)
    tiny = np.float16(6.104e-05)
    return np.where((s16 == 0) | ~np.isfinite(s16), tiny, s16).astype(np.float16)


def errors(w: np.ndarray, w_hat: np.ndarray, block_rows: int = 1024) -> tuple[float, float]:
    """(max |w - w_hat|, RMS error), computed in row blocks so a 49k-row embedding needs no float64 copy."""
    if w.size == 0:
        return 0.0, 0.0
    w2, h2 = w.reshape(w.shape[0], -1), w_hat.reshape(w.shape[0], -1)
    mx, sq = 0.0, 0.0
    for r in range(0, w2.shape[0], block_rows):
        d = w2[r:r + block_rows].astype(np.float64) - h2[r:r + block_rows]
        mx = max(mx, float(np.abs(d).max()))
        sq += float(np.einsum("ij,ij->", d, d))
    return mx, float(np.sqrt(sq / w.size))


from . import floats, int8, int4, int2, ternary, ggml  # noqa: E402,F401  (registers the schemes)


def quantize_rows(scheme: Scheme, w: np.ndarray, block_rows: int = 2048) -> Quantized:
    """Quantize a large weight block of rows by block: every scheme is row-independent, and this bounds the
    temporaries (a 49k × 576 embedding would otherwise need several full-size float copies at once)."""
    if w.ndim != 2 or w.shape[0] <= block_rows or not scheme.row_local:
        return scheme.quantize(w)
    parts = [scheme.quantize(w[r:r + block_rows]) for r in range(0, w.shape[0], block_rows)]
    first = parts[0]
    cat = lambda xs: None if xs[0] is None else np.concatenate(xs, axis=0)  # noqa: E731
    sq = sum(p.rms_error ** 2 * p.symbols.shape[0] for p in parts)
    return Quantized(first.scheme, tuple(w.shape), cat([p.symbols for p in parts]), cat([p.scales for p in parts]),
                     cat([p.zeros for p in parts]), group=first.group, max_error=max(p.max_error for p in parts),
                     rms_error=float(np.sqrt(sq / w.shape[0])), extra=first.extra, mins=cat([p.mins for p in parts]),
                     mults=cat([p.mults for p in parts]))
