"""Counter-based dropout masks shared by every implementation: this docstring is the spec.

Dropout applies to a 2-D tensor of shape ``(rows, cols)`` (the flattened ``(T, d)`` tensor of the
family: LoRA's input, Monarch's adapter output). With ``G = ceil(cols / 8)`` counters per row,
element ``(row, col)`` uses the Philox counter

    ``c = row * G + (col >> 3)``

Philox-4x32-10 with key ``(seed & 0xFFFFFFFF, seed >> 32)`` and counter words
``(c & 0xFFFFFFFF, c >> 32, 0, 0)`` yields four 32-bit words ``w0..w3``, exactly what
``tl.randint4x(seed, c)`` returns in Triton for an int64 ``c``. Element ``j = col & 7`` of its
group of 8 takes the 16-bit half

    ``u = (w[j >> 1] >> (16 * (j & 1))) & 0xFFFF``     (j = 0: low half of w0, 1: high half of w0, ...)

and is kept iff ``u >= threshold``, with ``threshold = drop_threshold(p)``:

* ``p == 0``: 0, no dropout at all (no Philox is run);
* ``p > 0``: ``floor(p * 65536 + 0.5)`` clamped to ``[1, 65535]``. The lower clamp makes every
  ``p > 0`` drop something (a tiny p would round to 0 and keep everything); the upper clamp keeps
  something for ``p`` close to 1 (``p * 65536`` rounding to 65536 would drop everything and make
  the scale infinite).

The effective drop rate is ``threshold / 65536``: within ``2**-17`` (< 7.7e-6) of ``p`` for
``2**-17 <= p <= 1 - 2**-17``, within ``2**-16`` beyond that (clamped). Kept values are scaled by
``keep_scale(p) = 65536 / (65536 - threshold) = 1 / (1 - threshold / 65536)``, so the mask is
unbiased (``E[dropout(x)] = x``) for the quantised rate.

Why this layout: one Philox call (~100 integer ops) serves 8 elements instead of one. A kernel
whose column tile starts at a multiple of 8 and is a multiple of 8 wide covers whole counters, so
it runs ``randint4x`` once on a ``(BLOCK_ROWS, BLOCK_COLS / 8)`` counter tile and expands the 16
halves to the ``(BLOCK_ROWS, BLOCK_COLS)`` tile; rows are padded to a multiple of 8 in counter
space, so a tile that crosses a row end needs nothing special. Because the torch reference
computes the same bits, a kernel's mask is regenerated in backward (never stored) and checked
bit for bit on the CPU.

On CPU, ``keep_mask`` uses the native extension's ``peft_kernels::philox_keep_mask`` (C++, the
same bits, ~100x faster than the int64 tensor ops below) when ``peft_kernels._C`` is built;
``keep_mask_torch`` is the pure-torch statement of the spec that it is tested against.

The seed may be a Python int or a one-element integer tensor (what the modules draw with
``torch.randint(0, 2**62, (1,))``). A tensor seed is used with tensor ops only, never
``.item()``, so ``torch.compile`` traces dropout without a graph break.
"""
from __future__ import annotations

import functools

import torch

from .. import _ext

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10
GROUP = 8  # elements per Philox call: 4 words x 2 halves of 16 bits
_HALF_RANGE = 1 << 16


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


def _seed_words(seed, device) -> tuple:
    """Key words ``(seed_lo, seed_hi)``: Python ints for an int seed, 0-dim int64 tensors on
    ``device`` for a tensor seed (no ``.item()``: traceable without a graph break)."""
    if isinstance(seed, torch.Tensor):
        s = seed.reshape(()).to(device=device, dtype=torch.int64)
        return s & _MASK32, (s >> 32) & _MASK32
    seed = int(seed)
    return seed & _MASK32, (seed >> 32) & _MASK32


def philox4x32(seed, counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four Philox-4x32-10 output words (int64 in [0, 2**32)) for each int64 counter, as
    ``tl.randint4x(seed, counters)``; ``seed`` is an int or a one-element integer tensor."""
    counters = counters.to(torch.int64)
    k0, k1 = _seed_words(seed, counters.device)
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_uint32(seed, offsets: torch.Tensor) -> torch.Tensor:
    """First Philox-4x32-10 output word for each int64 offset, as ``tl.randint(seed, offsets)``."""
    return philox4x32(seed, offsets)[0]


def drop_threshold(p: float) -> int:
    """Integer threshold on the 16-bit random half: kept iff ``half >= threshold`` (see the spec)."""
    if p == 0.0:
        return 0
    return min(max(int(p * _HALF_RANGE + 0.5), 1), _HALF_RANGE - 1)


def keep_scale(p: float) -> float:
    """Scale of the kept values, ``1 / (1 - threshold / 65536)``: unbiased for the quantised rate."""
    return _HALF_RANGE / (_HALF_RANGE - drop_threshold(p))


def keep_mask_torch(seed, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """Boolean keep-mask of shape ``(rows, cols)`` for dropout probability ``p``, in plain torch
    (the spec above, statement by statement)."""
    threshold = drop_threshold(p)
    if threshold == 0:
        return torch.ones((rows, cols), dtype=torch.bool, device=device)
    groups = -(-cols // GROUP)
    counters = torch.arange(rows * groups, dtype=torch.int64, device=device)
    # element j = 2k + h of a group is half h of word k: compare each half, then lay them out in j order
    keep = [half >= threshold for word in philox4x32(seed, counters) for half in (word & 0xFFFF, word >> 16)]
    return torch.stack(keep, dim=-1).view(rows, groups * GROUP)[:, :cols]


@functools.lru_cache(maxsize=None)
def native_keep_mask_available() -> bool:
    """Whether ``peft_kernels::philox_keep_mask`` is built (checked once, in eager mode); registers
    its fake implementation so shape propagation through it works."""
    if _ext.native() is None or not hasattr(torch.ops.peft_kernels, "philox_keep_mask"):
        return False

    @torch.library.register_fake("peft_kernels::philox_keep_mask")
    def _(seed, rows, cols, threshold):
        return torch.empty((rows, cols), dtype=torch.bool)

    return True


def keep_mask(seed, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """Boolean keep-mask of shape ``(rows, cols)`` for dropout probability ``p`` (the spec above);
    the native C++ mask on CPU when it is built, ``keep_mask_torch`` otherwise (always while
    ``torch.compile`` traces: same bits, and plain tensor ops the compiler can fuse)."""
    threshold = drop_threshold(p)
    on_cpu = device is None or torch.device(device).type == "cpu"
    if threshold == 0 or not on_cpu or torch.compiler.is_compiling() or not native_keep_mask_available():
        return keep_mask_torch(seed, p, rows, cols, device)
    seed_t = seed.reshape(1).to(torch.int64) if isinstance(seed, torch.Tensor) else torch.tensor([int(seed)])
    return torch.ops.peft_kernels.philox_keep_mask(seed_t.cpu(), rows, cols, threshold)


def apply_dropout(x2d: torch.Tensor, p: float, seed) -> torch.Tensor:
    """Inverted dropout of a 2-D tensor with the shared counter-based mask."""
    if p == 0.0:
        return x2d
    mask = keep_mask(seed, p, x2d.shape[0], x2d.shape[1], device=x2d.device)
    return x2d * mask.to(x2d.dtype) * keep_scale(p)
