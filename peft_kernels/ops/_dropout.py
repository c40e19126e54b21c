"""The shared dropout mask (``reference._philox``, whose docstring is the spec) as a Triton helper.

One ``tl.randint4x`` per 8 columns: a ``(BLOCK_ROWS, BLOCK_COLS)`` tile whose first column is a
multiple of 8 and whose width is a multiple of 8 (every caller's column tile is a power of two
>= 16 starting at a multiple of its width) covers ``BLOCK_COLS / 8`` whole counters per row. The
four words of each counter are split into 16-bit halves and spread over the 8 columns with
``tl.interleave``: the last interleave is the fastest-varying index, so the words are interleaved
first as ``(w0, w2)`` / ``(w1, w3)`` and the halves last, which puts column ``8 g + 2 k + h`` on
half ``h`` of word ``k`` of counter ``g``.

Seen only by compiling for sm_90 without a GPU (``triton.compile`` of an ``ASTSource``, ptxas -v),
never timed: against one ``tl.randint`` per element, Philox work drops 7x (``mul.hi`` count 1089 ->
153 in the 128x128 LoRA dX epilogue), PTX instructions roughly halve (6.9k -> 3.4k there, 3.1k ->
1.3k in the down-projection) and the dX epilogue's spills fall (128x128x64, 8 warps: 1612 -> 44
bytes of spill stores). The price is layout conversions after the joins that go through shared
memory (more ``st.shared``/``bar.sync`` per tile). A broadcast + ``tl.where`` expansion needs no
extra shared memory but made the compiler repeat each Philox over several threads (only 1.8x
fewer ``mul.hi``) and spilled more in the dX epilogue, so ``tl.interleave`` it is. Time both on an
H100 before tuning further.
"""
from __future__ import annotations

import torch

from ._triton import capturing, tl, triton

DROPOUT_CAPTURE_MSG = ("peft_kernels: adapter dropout cannot run inside a CUDA graph capture: its seed is read on the "
                       "host when the kernels are launched, so every replay of the graph would apply the captured "
                       "mask again (torch's own dropout draws a new one). Use dropout=0 (or eval mode) for captured "
                       "steps (torch.compile mode='reduce-overhead', torch.cuda.graph), or train uncaptured.")


def host_seed(seed: torch.Tensor, device: torch.device) -> int:
    """The dropout seed as the int the kernels take, for launches on ``device``. Refuses a CUDA
    graph capture on that device's stream first (``DROPOUT_CAPTURE_MSG``: a baked seed would
    silently repeat one mask at every replay) instead of capturing something wrong. A seed tensor
    on a GPU is read with a sync; the modules draw theirs on the CPU."""
    if capturing(device):
        raise RuntimeError(DROPOUT_CAPTURE_MSG)
    return int(seed.item())


@triton.jit
def dropout_keep_tile(seed, rows, col0, ncols, threshold, BLOCK_COLS: tl.constexpr):
    """Boolean keep-mask of ``rows`` x columns ``[col0, col0 + BLOCK_COLS)`` of a ``(*, ncols)``
    tensor, bit-identical to ``reference._philox.keep_mask``. ``col0`` must be a multiple of 8
    and ``BLOCK_COLS`` a multiple of 8 (asserted at compile time); columns >= ncols get
    don't-care values that the caller masks. Rows need no bound check: ``row * G`` is the
    counter base of every row, whether it exists or not."""
    tl.static_assert(BLOCK_COLS % 8 == 0, "dropout column tiles must be a multiple of 8 wide")
    GROUPS: tl.constexpr = BLOCK_COLS // 8
    per_row = (ncols + 7) // 8
    counter = (rows.to(tl.int64)[:, None] * per_row
               + (col0 // 8 + tl.arange(0, GROUPS)).to(tl.int64)[None, :])
    w0, w1, w2, w3 = tl.randint4x(seed, counter)  # 4 x (BLOCK_ROWS, GROUPS) uint32
    # 16-bit halves of each word, (BLOCK_ROWS, 4 * GROUPS) in word order k within a group
    lo = tl.interleave(tl.interleave(w0 & 0xFFFF, w2 & 0xFFFF), tl.interleave(w1 & 0xFFFF, w3 & 0xFFFF))
    hi = tl.interleave(tl.interleave(w0 >> 16, w2 >> 16), tl.interleave(w1 >> 16, w3 >> 16))
    half = tl.interleave(lo, hi)  # (BLOCK_ROWS, BLOCK_COLS): column 8 g + 2 k + h
    return half.to(tl.int32) >= threshold

