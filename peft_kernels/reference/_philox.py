"""Counter-based dropout masks shared by every implementation.

The mask of element ``i`` (its linear index in the flattened ``(T, d)`` tensor that
dropout applies to) is a pure function of ``(seed, i)``: Philox-4x32-10 with key
``(seed_lo, seed_hi)`` and counter ``(i_lo, i_hi, 0, 0)``, first output word, exactly what
``tl.randint(seed, i)`` returns in Triton. An element is kept when
``(word >> 1) >= floor(p * 2**31)``. Because the torch reference computes the same bits,
a kernel's mask can be regenerated in backward (never stored) and checked on the CPU.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10


def _mulhilo(a: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``a * c`` for a 32-bit constant ``a`` and 32-bit ``c`` held
    in int64, without overflowing int64 (split c into 16-bit halves)."""
    c_hi = c >> 16
    c_lo = c & 0xFFFF
    p_hi = a * c_hi  # < 2**48
    p_lo = a * c_lo  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi & _MASK32, lo


def philox_uint32(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """First Philox-4x32-10 output word (as int64 in [0, 2**32)) for each int64 offset."""
    offsets = offsets.to(torch.int64)
    seed = int(seed)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def drop_threshold(p: float) -> int:
    """Integer threshold on the 31-bit random word: kept iff ``word >> 1 >= threshold``."""
    return int(p * 2**31)


def keep_mask(seed: int, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """Boolean keep-mask of shape ``(rows, cols)`` for dropout probability ``p``."""
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=device)
    word = philox_uint32(seed, offsets) >> 1
    return (word >= drop_threshold(p)).view(rows, cols)


def apply_dropout(x2d: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout of a 2-D tensor with the shared counter-based mask."""
    if p == 0.0:
        return x2d
    mask = keep_mask(seed, p, x2d.shape[0], x2d.shape[1], device=x2d.device)
    return x2d * mask.to(x2d.dtype) * (1.0 / (1.0 - p))
