"""The Triton dropout mask (``ops._dropout.dropout_keep_tile``) equals the reference mask bit for bit.

The kernels (LoRA down-projection / dX / dA, Monarch forward / backward) are checked end to end
against the references in their own tests; this pins the mask helper itself on awkward shapes:
column counts that are not multiples of 8 (and smaller than 8), tiles that run past the end of a
row, two tile widths, big seeds (both key words non-zero) and rates at both clamps.
"""
from __future__ import annotations

import pytest
import torch

from peft_kernels.ops._dropout import dropout_keep_tile
from peft_kernels.ops._triton import HAS_TRITON, tl, triton
from peft_kernels.reference._philox import drop_threshold, keep_mask

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@triton.jit
def _mask_kernel(out_ptr, seed, n_rows, n_cols, threshold, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    keep = dropout_keep_tile(seed, rows, col0, n_cols, threshold, BLOCK_C)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@pytest.mark.parametrize("rows,cols", [(5, 77), (3, 123), (7, 8), (9, 1), (6, 9), (17, 16)])
def test_triton_mask_equals_reference(interpret, rows, cols):
    for seed, p in ((0, 0.5), (5, 0.05), (2**40 + 17, 0.3), (2**62 - 1, 0.9), (123, 1e-12), (77, 1 - 1e-12)):
        want = keep_mask(seed, p, rows, cols)
        for block_c in (16, 32):
            out = torch.full((rows, cols), -1, dtype=torch.int8, device=interpret)
            grid = (triton.cdiv(rows, 4), triton.cdiv(cols, block_c))
            _mask_kernel[grid](out, seed, rows, cols, drop_threshold(p), BLOCK_R=4, BLOCK_C=block_c)
            assert (out >= 0).all(), "an element was not written"
            assert torch.equal(out.cpu().bool(), want), (seed, p, block_c)
