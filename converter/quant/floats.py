"""f32 / f16: no quantization; the baseline every quantized scheme is measured against."""
from __future__ import annotations

import numpy as np

from . import Quantized, Scheme, errors, register


def _quantize_f32(w: np.ndarray) -> Quantized:
    return Quantized("f32", w.shape, symbols=np.ascontiguousarray(w, np.float32), scales=None)


def _quantize_f16(w: np.ndarray) -> Quantized:
    h = w.astype(np.float16)
    mx, rms = errors(w, h.astype(np.float32))
    return Quantized("f16", w.shape, symbols=h, scales=None, max_error=mx, rms_error=rms)


def _dequantize(q: Quantized) -> np.ndarray:
    return q.symbols.astype(np.float32)


register(Scheme("f32", alphabet=0, bits=32, group=0, quantize=_quantize_f32, dequantize=_dequantize,
                description="float32, unquantized baseline"))
register(Scheme("f16", alphabet=0, bits=16, group=0, quantize=_quantize_f16, dequantize=_dequantize,
                description="float16 storage"))
