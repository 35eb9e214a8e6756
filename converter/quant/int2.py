"""int2: asymmetric 4-level codes with an integer zero point per group (same math as int4, 2 bits)."""
from __future__ import annotations

from . import Scheme, register
from .int4 import asymmetric, dequantize_asymmetric


def make(group: int):
    name = f"int2-g{group}"
    return register(Scheme(name, alphabet=4, bits=2, group=group, symmetric=False,
                           quantize=lambda w: asymmetric(w, group, 4, name), dequantize=dequantize_asymmetric,
                           description=f"asymmetric int2, groups of {group}, integer zero point"))


for _g in (32, 64):
    make(_g)
