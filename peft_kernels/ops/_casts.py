"""One cast helper for every Triton kernel: ``x.to(dtype)`` as a GPU rounds it, also under the
interpreter.

Triton 3.6's interpreter (what CPU runs and CI use) stores bf16 as raw 16-bit integers and casts
fp32 -> bf16 by truncation (round toward zero), where a GPU rounds to nearest even. Truncation
errors all point the same way, so they add up over a reduction instead of cancelling (seen: Lily's
``dY^T h`` over T tokens, then the batch-routing router gradient, up to 4x as far from fp64 as the
same computation rounded to nearest), and every bf16 output carries twice the rounding error the GPU
would give, which loosens what the interpreter tests can catch. ``to_rne`` rounds the fp32 bits to
nearest even first when ``FIX`` (a constexpr the launchers set only for bf16 under the interpreter),
after which the interpreter's truncating cast is exact; on a GPU ``FIX`` is False and this is a
plain cast (a constexpr branch: no cost). fp16 casts are rounded correctly by the interpreter
(numpy) and are left alone.
"""
from __future__ import annotations

from ._triton import tl, triton


@triton.jit
def to_rne(x, dtype: tl.constexpr, FIX: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even (ties to even; inf stays inf) under ``FIX``."""
    if FIX:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
