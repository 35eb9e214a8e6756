"""q8_0, q4_0, q4_1: llama.cpp's GGUF block formats as schemes, and their blocks read and written bit for bit.

Every block holds 32 consecutive weights of one row (along the input dimension), little-endian:

    Q8_0  (32, 2 + 32)        [d f16][q int8 × 32]          w = d * q
    Q4_0  (32, 2 + 16)        [d f16][qs u8 × 16]           w = d * (q - 8),   q in 0..15
    Q4_1  (32, 2 + 2 + 16)    [d f16][m f16][qs u8 × 16]    w = d * q + m,     q in 0..15
    qs byte j holds weight j in its low nibble and weight j + 16 in its high nibble.

Two ways in:
  * `quantize(w)` from floats, with the arithmetic of llama.cpp's reference quantizer (the `gguf` package's
    numpy port gives the same bytes; tests/test_passthrough.py checks it bit for bit);
  * `from_blocks(raw, type)` from a GGUF tensor's bytes: the passthrough. The source's codes and scales are kept
    as they are, so a bundle of a Q4_1 GGUF adds no error at all on top of it.

As a Quantized: symbols are the codes q (q8_0: the int8 bytes, like int8-g32), scales d (f16), and
  q4_0: zeros = 8 (MatMulNBits' integer zero point)      q4_1: mins = m (f16 additive offset, no integer zero point)
"""
from __future__ import annotations

import numpy as np

from ..errors import QuantError
from . import Quantized, Scheme, errors, grouped, register

BLOCK = 32
BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16}
SCHEME_OF_TYPE = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}     # GGUF tensor type -> scheme name
TYPE_OF_SCHEME = {v: k for k, v in SCHEME_OF_TYPE.items()}


# ---------------------------------------------------------------------------------------------------------------
# Quantizers (floats -> codes), llama.cpp's reference arithmetic in float32
# ---------------------------------------------------------------------------------------------------------------

def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d is 0 (an all-zero block quantizes to codes that decode to 0)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _quantize_q8_0(wg: np.ndarray):
    """wg (rows, nb, 32) -> (q int8, d f16): d = max|w| / 127, q = w / d rounded half away from zero."""
    d = (np.abs(wg).max(axis=2, keepdims=True) / np.float32(127)).astype(np.float32)
    x = wg * _inverse(d)
    q = (np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))).astype(np.int8)
    return q, d[..., 0].astype(np.float16)


def _quantize_q4_0(wg: np.ndarray):
    """d = (the weight of largest magnitude, with its sign) / -8, q = trunc(w / d + 8.5) clipped to 0..15."""
    idx = np.abs(wg).argmax(axis=2)[..., None]                       # first occurrence, as llama.cpp's loop
    d = (np.take_along_axis(wg, idx, axis=2) / np.float32(-8)).astype(np.float32)
    q = np.clip(np.trunc(wg * _inverse(d) + np.float32(8.5)), 0, 15).astype(np.uint8)
    return q, d[..., 0].astype(np.float16)


def _quantize_q4_1(wg: np.ndarray):
    """d = (max - min) / 15, m = min, q = trunc((w - min) / d + 0.5) clipped to 0..15."""
    lo = wg.min(axis=2, keepdims=True)
    d = ((wg.max(axis=2, keepdims=True) - lo) / np.float32(15)).astype(np.float32)
    q = np.clip(np.trunc((wg - lo) * _inverse(d) + np.float32(0.5)), 0, 15).astype(np.uint8)
    return q, d[..., 0].astype(np.float16), lo[..., 0].astype(np.float16)


def _make_quantize(name: str):
    def quantize(w: np.ndarray) -> Quantized:
        wg = grouped(np.asarray(w, np.float32), BLOCK, name)         # (rows, nb, 32)
        rows, cols = w.shape
        zeros = mins = None
        if name == "q8_0":
            q, d = _quantize_q8_0(wg)
            symbols = q.view(np.uint8).reshape(rows, cols)
        elif name == "q4_0":
            q, d = _quantize_q4_0(wg)
            symbols, zeros = q.reshape(rows, cols), np.full(d.shape, 8, np.uint8)
        else:
            q, d, mins = _quantize_q4_1(wg)
            symbols = q.reshape(rows, cols)
        out = Quantized(name, (rows, cols), symbols, d, zeros, group=BLOCK, mins=mins)
        return _with_errors(out, w)
    return quantize


def _with_errors(q: Quantized, w: np.ndarray) -> Quantized:
    mx, rms = errors(w, dequantize(q))
    return Quantized(q.scheme, q.shape, q.symbols, q.scales, q.zeros, group=q.group, max_error=mx, rms_error=rms,
                     mins=q.mins)


def dequantize(q: Quantized) -> np.ndarray:
    """The same float32 arithmetic as llama.cpp's / gguf's dequantizer (d * q [+ m]), so a passthrough bundle's
    weights equal the GGUF's dequantized floats bit for bit."""
    rows, cols = q.shape
    nb = cols // BLOCK
    d = q.scales.astype(np.float32)[..., None]                       # (rows, nb, 1)
    if q.scheme == "q8_0":
        return (d * q.symbols.view(np.int8).reshape(rows, nb, BLOCK).astype(np.float32)).reshape(rows, cols)
    codes = q.symbols.reshape(rows, nb, BLOCK)
    if q.scheme == "q4_0":
        return (d * (codes.astype(np.int8) - np.int8(8)).astype(np.float32)).reshape(rows, cols)
    return (d * codes.astype(np.float32) + q.mins.astype(np.float32)[..., None]).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------------------------
# GGUF blocks <-> Quantized (the passthrough)
# ---------------------------------------------------------------------------------------------------------------

def from_blocks(raw: np.ndarray, ggml_type: str, shape: tuple[int, int], where: str = "tensor") -> Quantized:
    """GGUF tensor bytes (rows, row_bytes) uint8 -> the matching scheme's Quantized, codes and scales unchanged.

    One exception, which changes no weight: a Q4_1 block with d = 0 decodes to m everywhere whatever its codes
    say; its codes are set to 0 (llama.cpp writes 0 there anyway), so the graph can run it as (q - zp) * 1."""
    if ggml_type not in BLOCK_BYTES:
        raise QuantError(f"{where}: GGUF type {ggml_type} has no passthrough (supported: {', '.join(BLOCK_BYTES)})")
    rows, cols = shape
    per = BLOCK_BYTES[ggml_type]
    if cols % BLOCK or raw.dtype != np.uint8 or raw.size != rows * (cols // BLOCK) * per:
        raise QuantError(f"{where}: {raw.size} bytes of {ggml_type} do not hold a {rows} × {cols} tensor "
                         f"({per} bytes per block of {BLOCK})")
    nb = cols // BLOCK
    b = np.ascontiguousarray(raw).reshape(rows, nb, per)
    d = b[..., 0:2].copy().view(np.float16)[..., 0]                  # (rows, nb)
    if not np.isfinite(d).all():
        raise QuantError(f"{where}: a {ggml_type} block scale is NaN or Inf")
    name = SCHEME_OF_TYPE[ggml_type]
    if ggml_type == "Q8_0":
        return Quantized(name, shape, b[..., 2:].reshape(rows, cols).copy(), d, group=BLOCK)
    qs = b[..., -16:]                                                # (rows, nb, 16)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2)             # weight j low nibble, j + 16 high nibble
    if ggml_type == "Q4_0":
        return Quantized(name, shape, codes.reshape(rows, cols), d, np.full(d.shape, 8, np.uint8), group=BLOCK)
    m = b[..., 2:4].copy().view(np.float16)[..., 0]
    if not np.isfinite(m).all():
        raise QuantError(f"{where}: a Q4_1 block minimum is NaN or Inf")
    codes = np.where((d == 0)[..., None], np.uint8(0), codes)
    return Quantized(name, shape, codes.reshape(rows, cols), d, group=BLOCK, mins=m)


def to_blocks(q: Quantized) -> np.ndarray:
    """Quantized (q8_0 / q4_0 / q4_1) -> GGUF block bytes (rows, row_bytes) uint8: the inverse of from_blocks."""
    ggml_type = TYPE_OF_SCHEME.get(q.scheme)
    if ggml_type is None:
        raise QuantError(f"scheme {q.scheme} is not a GGUF block format")
    rows, cols = q.shape
    nb = cols // BLOCK
    parts = [q.scales.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)]
    if ggml_type == "Q8_0":
        parts.append(q.symbols.reshape(rows, nb, BLOCK))
    else:
        if ggml_type == "Q4_1":
            parts.append(q.mins.astype(np.float16).reshape(rows, nb, 1).view(np.uint8))
        codes = q.symbols.reshape(rows, nb, 2, BLOCK // 2)
        parts.append((codes[:, :, 0] | (codes[:, :, 1] << 4)).astype(np.uint8))
    return np.concatenate(parts, axis=2).reshape(rows, nb * BLOCK_BYTES[ggml_type])


for _name, _bits, _alphabet, _sym, _what in (
        ("q8_0", 8, 256, True, "GGUF Q8_0: symmetric int8, groups of 32, f16 scale (llama.cpp rounding)"),
        ("q4_0", 4, 16, False, "GGUF Q4_0: 4-bit, groups of 32, f16 scale, zero point 8"),
        ("q4_1", 4, 16, False, "GGUF Q4_1: 4-bit, groups of 32, f16 scale + f16 minimum (w = d*q + m)")):
    register(Scheme(_name, alphabet=_alphabet, bits=_bits, group=BLOCK, quantize=_make_quantize(_name),
                    dequantize=dequantize, symmetric=_sym, description=_what))
