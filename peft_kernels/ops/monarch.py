"""Monarch (MoRe, arXiv 2408.17383) adapter: both block-diagonal stages and both permutations fused.

Math (GUIDE.md "Monarch (MoRe) exactly"; the oracle is ``peft_kernels.reference.monarch``):
``W0 (m, n)``, ``N = nblocks``, ``r = blk_r``, ``p = ceil(n/N)``, ``s = ceil(p*m/n)``, ``R = N*r``,
``W1 (N, r, p)``, ``W2 (N, s, r)``::

    Y1flat[t, k*r + j]  = sum_q W1[k, j, q] * x[t, k*p + q]        stage 1 (x zero-padded to N*p)
    out[t, c*N + l]     = sum_i W2[l, c, i] * Y1flat[t, i*N + l]   permutation + stage 2 + output perm.
    y                   = x @ W0^T + b + dropout(out[:, :m])

Design. Both stages are written as products with *gathered* dense tiles, so the permutations cost
nothing: stage 1 is ``x @ B1^T`` with ``B1[f, col] = W1[f//r, f%r, col - (f//r)*p]`` where
``col // p == f // r`` (else 0), stage 2 is ``Y1flat @ B2^T`` with
``B2[col, f] = W2[col%N, col//N, f//N]`` where ``f % N == col % N`` (else 0). The kernel builds
the tiles of B1/B2 on the fly with masked loads from the compact factors (no padded copy of x,
W1 or W2 ever exists), and keeps the ``(BLOCK_T, R)`` intermediate in registers between the
two stages. The padded width ``RB = max(16, next_pow2(R))`` makes every ``tl.dot`` at least
16 wide, so blk_r = 1..15 work with masked zero columns; the user's rank is never changed.
Dense gathered tiles waste a factor ~N of adapter FLOPs (``(n + m) * RB`` MACs per token instead
of ``(n + m) * r``), which is < 1% of the frozen GEMM at the default N = r = 4, d = 4096, and buys
tensor-core ``tl.dot`` for every rank.

When ``R`` is too wide to keep on chip (``> MAX_R_CHUNK``, e.g. N = r = 64), the launcher splits
the ``R`` intermediate into chunks and launches once per chunk; the adapter is linear in
``Y1flat``, so the chunks' contributions simply add (dropout's mask is elementwise, so it
distributes over the sum too). Each chunk reads only the x columns of the blocks it covers.

The frozen product ``x @ W0^T (+ b)`` is cuBLAS (``torch.addmm``); the kernel then adds the
adapter into that output in place: one read of x, one read-modify-write of y, plus a
``(T, R)`` fp32 write of ``Y1flat`` saved for backward (tiny: R = 16 floats per token at the
default). Fusing into a Triton GEMM epilogue would save the y round trip (~2 passes over a T x m
tensor) but would have to beat cuBLAS on the frozen GEMM itself; that is left for measurement.
The grid is (token tiles, output-column splits): when there are too few token tiles to fill the
GPU (small T), each split recomputes stage 1 for its tile (x re-read, from L2) and handles a
slice of the output columns; at T = 8192 the launcher picks few or no splits.

Backward, two kernels per chunk, grid (token tiles, column splits) each:
1. over the output columns: ``G = dY * mask * keep_scale(p)`` with the mask regenerated from the seed
   (never stored); partial ``dY1 = G @ B2`` per column split (fp32, summed by torch when split)
   and the partial ``dW2`` tile ``Y1^T G`` stored at the pattern positions;
2. over the chunk's input columns: ``dX += dY1 @ B1`` (``dX`` starts as the cuBLAS ``dY @ W0``)
   and the partial ``dW1`` tile ``x^T dY1`` at the pattern positions.
Passes over big tensors: one read of dY, one of x, one read-modify-write of dX.
The weight gradients are reduced deterministically: every token tile writes its own fp32 partial
(no atomics; each (token tile, entry) has exactly one writer) and ``torch.sum`` over tiles
finishes the reduction. The partial buffers hold ``cdiv(T, 64) * R * (p + s)`` fp32 values
(~16 MB at T = 8192, r = 4, n = m = 4096).

Two paths. (1) ``N * blk_r <= FUSED_GEMM_MAX_R`` (the MoRe defaults and every configuration the
issue benchmarks): the factors are expanded to the dense, permutation-folded ``B1 (R, n)`` and
``B2 (m, R)`` (``_monarch_expand_kernel``, one launch, equal to the torch form ``dense_factors``;
``R * (n + m)`` elements, tiny next to a ``T x d`` activation) and the layer runs on the LoRA family's kernels (``ops.lora``,
``LoRAFunction(..., output_dropout=True)``): a down-projection pass over x gives ``Y1flat``
``(T, R)`` fp32, and the frozen GEMM carries ``D(Y1flat @ B2^T)`` in its epilogue, so the output is
written once (or, where cuBLAS wins the base product, ``base=auto`` measures and picks it, the
adapter being added in place). Backward: one pass over dY for ``dY1 = D(dY) @ B2`` and ``dB2``,
the ``dY1 @ B1`` term in the epilogue of the ``dX`` GEMM, ``dB1`` from ``dY1`` and x; the
gradients of W1/W2 are ``dB1``/``dB2`` read back at the pattern positions (the autograd of the
expansion). This saves the two passes over y (and two over dX) that the in-place design below
pays. Same FLOP waste (a factor ~N) as the gathered tiles below. Its weight gradients are summed
across token blocks with fp32 atomics (``ops.lora``): not bit-reproducible run to run on a GPU,
unlike the dedicated path, unless ``torch.use_deterministic_algorithms(True)`` (then fixed-order
partial sums); with fp32 factors and half-precision x its dW1/dW2 come from dB1/dB2
rounded to x's dtype (the dedicated path accumulates them in fp32): both within the GUIDE
tolerance, not bit-equal. (2) Wider intermediates: the dedicated kernels below, chunked, whose
reductions are deterministic.

Dropout mask: the shared spec of ``reference._philox`` over the ``(T, m)`` adapter output (one
``tl.randint4x`` per 8 output columns, ``_dropout.dropout_keep_tile``): every output-column tile
starts at a multiple of BLOCK_M (a power of two >= 16), so it covers whole 8-column counters.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .. import dispatch
from ..reference.monarch import check_monarch_args
from ..reference.monarch import monarch as monarch_reference
from ..reference._philox import drop_threshold, keep_scale
from ._autograd import first_order_only
from ._casts import to_rne
from ._dropout import dropout_keep_tile, host_seed
from ._triton import HAS_TRITON, TUNE_CACHE, cdiv, custom_op, launch_tuned, next_pow2, sm_count, tl, triton, \
    tuning_bench

# ------------------------------------------------------------------------------------------------
# constants
# ------------------------------------------------------------------------------------------------

# Widest padded intermediate kept in registers per launch. 128 covers N=4 with blk_r up to 32 and
# N=8 with blk_r up to 16 in one launch; a (64 x 128) fp32 accumulator is 64 registers per thread
# at 4 warps. Wider R (e.g. N = r = 64 -> 4096) is processed in chunks of this width.
MAX_R_CHUNK = 128
# Widest intermediate R = N * blk_r that runs on the shared fused-GEMM path (see the module
# docstring, "Two paths"); wider ones use the dedicated kernels below, in chunks.
FUSED_GEMM_MAX_R = 128
# tl.dot needs every dimension >= 16.
_MIN_DOT = 16
# Backward token tile: fixed (not autotuned) because it sizes the weight-gradient partial buffers.
_BWD_BLOCK_T_GPU = 64
_BWD_BLOCK_T_INTERP = 16
# Column splits are added until the grid has about this many programs per SM (small T only).
_PROGRAMS_PER_SM = 2
# Column granularity for the backward split count (fixed before the autotuned BLOCK_M/BLOCK_K are
# known, because it sizes the dY1 partial buffer); the interpreter's tile is 32 wide.
_BWD_SPLIT_COLS_GPU = 128
_BWD_SPLIT_COLS_INTERP = 32
# Stand-in SM count under the interpreter: small, so that the tests' tiny shapes exercise splits.
_INTERP_SMS = 4


def _fwd_configs():
    if dispatch.interpreter_enabled():
        # one small config: the interpreter runs numpy per block, and autotuning would multiply it
        return [triton.Config({"BLOCK_T": 16, "BLOCK_K": 32, "BLOCK_M": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_T": bt, "BLOCK_K": bk, "BLOCK_M": bm}, num_warps=w, num_stages=st)
        for bt, bk, bm, w, st in [
            (64, 64, 64, 4, 3),
            (64, 128, 128, 4, 3),
            (128, 64, 64, 8, 3),
            (128, 64, 128, 8, 3),
            (32, 64, 128, 4, 4),
        ]
    ]


def _bwd_dy1_configs():
    if dispatch.interpreter_enabled():
        return [triton.Config({"BLOCK_M": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st)
            for bm, w, st in [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3)]]


def _bwd_dx_configs():
    if dispatch.interpreter_enabled():
        return [triton.Config({"BLOCK_K": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bk, w, st in [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3)]]


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------

# INTERP_BF16 is set only under the Triton 3.6 interpreter with bf16 data, to work around two of
# its bugs (the compiled GPU code never takes these branches): its dot multiplies bf16's raw
# uint16 storage (wrong by ~1e10), and its fp32 -> bf16 cast truncates where the GPU rounds to
# nearest even (which would double every bf16 rounding error and hide real accuracy problems).


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. Under INTERP_BF16 the (already bf16-rounded)
    operands are widened to fp32 first: exact, and the same products a bf16 tensor core forms."""
    if INTERP_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _split_range(lo, hi, BLOCK: tl.constexpr):
    """This program's slice ``[start, stop)`` of ``[lo, hi)`` when axis 1 of the grid splits it
    into whole BLOCK-wide tiles (trailing splits may get an empty slice)."""
    per = tl.cdiv(tl.cdiv(hi - lo, BLOCK), tl.num_programs(1)) * BLOCK
    start = lo + tl.program_id(1) * per
    return start, tl.minimum(hi, start + per)


@triton.jit
def _w1_tile(kf, jf, f_ok, cols, col_ok, r, p):
    """Offsets into W1 and mask of the gathered ``B1^T`` tile ``(len(cols), RB)``:
    ``B1^T[col, f] = W1[f//r, f%r, col - (f//r)*p]`` when the column lies in block ``f//r``."""
    q = cols[:, None] - (kf * p)[None, :]
    offs = (kf * (r * p) + jf * p)[None, :] + q
    ok = col_ok[:, None] & f_ok[None, :] & (q >= 0) & (q < p)
    return offs, ok


@triton.jit
def _w2_tile(i_f, l_f, f_ok, cols, col_ok, N, s, r):
    """Offsets into W2 and mask of the gathered ``B2^T`` tile ``(RB, len(cols))``:
    ``B2^T[f, col] = W2[col%N, col//N, f//N]`` when ``f % N == col % N`` (both permutations)."""
    l = cols % N
    c = cols // N
    offs = (l * (s * r) + c * r)[None, :] + i_f[:, None]
    ok = f_ok[:, None] & col_ok[None, :] & (l_f[:, None] == l[None, :])
    return offs, ok


@triton.jit
def _keep_scale(x, rows, col0, ncols, seed, threshold, scale, BLOCK_COLS: tl.constexpr):
    """Inverted dropout of the tile ``rows`` x ``[col0, col0 + BLOCK_COLS)`` of a ``(T, ncols)``
    tensor with the shared counter-based mask (``reference._philox``; col0 is a multiple of
    BLOCK_COLS, hence of 8, as the mask helper needs)."""
    keep = dropout_keep_tile(seed, rows, col0, ncols, threshold, BLOCK_COLS)
    return tl.where(keep, x * scale, 0.0)


# Y is added into in place: a new key is tuned on a copy of it (launch_tuned's ``inplace``), so the
# autotuner's benchmark runs leave no sums behind (only the final launch's add remains)
@triton.autotune(configs=_fwd_configs(), key=["T_BUCKET", "n", "m", "R", "HAS_DROPOUT"], do_bench=tuning_bench,
                 cache_results=TUNE_CACHE)
@triton.jit
def _monarch_fwd_kernel(
    # pointers
    X,  # (T, n) input, contiguous
    W1,  # (N, r, p) first factor
    W2,  # (N, s, r) second factor
    Y,  # (T, m) holds x @ W0^T + b; the adapter output is added in place
    Y1,  # (T, R) fp32: Y1flat saved for backward
    # sizes (T_BUCKET: the autotune key for T)
    T, n, m, N, r, p, s, R, T_BUCKET,
    # this launch's chunk of the intermediate: f in [F0, F0 + RB), reading x columns [col_lo, col_hi)
    F0, col_lo, col_hi,
    # dropout
    seed, threshold, scale,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, RB: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    dtype = X.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)  # T * m can exceed 2**31

    # intermediate index f = k*r + j (stage-1 view) = i*N + l (stage-2 view)
    f = F0 + tl.arange(0, RB)
    f_ok = f < R
    kf = f // r
    jf = f - kf * r
    i_f = f // N
    l_f = f - i_f * N

    # stage 1: Y1flat = x @ B1^T; zero outside each block, which is also the zero padding of x to
    # N*p (columns >= n are masked, never materialised)
    acc = tl.zeros((BLOCK_T, RB), dtype=tl.float32)
    for k0 in range(col_lo, col_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < col_hi
        xt = tl.load(X + rows64[:, None] * n + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w_offs, w_ok = _w1_tile(kf, jf, f_ok, cols, col_ok, r, p)
        w = tl.load(W1 + w_offs, mask=w_ok, other=0.0)
        acc = _dot(xt, to_rne(w, dtype, INTERP_BF16), acc, DOT_PREC, INTERP_BF16)
    # every column split computed the same Y1 tile; the first one saves it
    y1_ok = row_ok[:, None] & f_ok[None, :] & (tl.program_id(1) == 0)
    tl.store(Y1 + rows64[:, None] * R + f[None, :], acc, mask=y1_ok)

    # stage 2 with both permutations, then dropout and the in-place add, on this split's columns
    y1 = to_rne(acc, dtype, INTERP_BF16)
    m_lo, m_hi = _split_range(0, m, BLOCK_M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < m_hi
        w_offs, w_ok = _w2_tile(i_f, l_f, f_ok, cols, col_ok, N, s, r)
        w = tl.load(W2 + w_offs, mask=w_ok, other=0.0)
        out = _dot(y1, to_rne(w, dtype, INTERP_BF16), tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32), DOT_PREC,
                   INTERP_BF16)
        offs = rows64[:, None] * m + cols[None, :]
        msk = row_ok[:, None] & col_ok[None, :]
        if HAS_DROPOUT:
            out = _keep_scale(out, rows, m0, m, seed, threshold, scale, BLOCK_M)
        y = tl.load(Y + offs, mask=msk, other=0.0)
        tl.store(Y + offs, to_rne(y.to(tl.float32) + out, dtype, INTERP_BF16), mask=msk)


# plain stores only (DY1P, P2: one writer per entry), so the benchmark runs need no restore
@triton.autotune(configs=_bwd_dy1_configs(), key=["T_BUCKET", "n", "m", "R", "HAS_DROPOUT"], do_bench=tuning_bench,
                 cache_results=TUNE_CACHE)
@triton.jit
def _monarch_bwd_dy1_kernel(
    # pointers
    DY,  # (T, m) upstream gradient, contiguous
    W2,  # (N, s, r)
    Y1,  # (T, R) fp32 saved Y1flat
    DY1P,  # (splits, T, R) fp32: this column split's partial dY1flat
    P2,  # (token tiles, N*s*r) fp32: per-tile partial dW2
    # sizes (T_BUCKET: the autotune key for T)
    T, m, n, N, r, s, R, T_BUCKET,
    # this launch's chunk of the intermediate
    F0,
    # dropout
    seed, threshold, scale,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, RB: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    dtype = DY.dtype.element_ty
    pid_t = tl.program_id(0)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)

    f = F0 + tl.arange(0, RB)
    f_ok = f < R
    i_f = f // N
    l_f = f - i_f * N
    y1_ok = row_ok[:, None] & f_ok[None, :]
    y1 = tl.load(Y1 + rows64[:, None] * R + f[None, :], mask=y1_ok, other=0.0)
    y1 = to_rne(y1, dtype, INTERP_BF16)

    # each (l, c, i) of W2 is hit by exactly one (col, f) pair, so the partial is written with plain
    # stores; the token tile owns row pid_t of P2 and the column split owns the columns
    p2 = P2 + pid_t.to(tl.int64) * (N * s * r)
    dy1 = tl.zeros((BLOCK_T, RB), dtype=tl.float32)
    m_lo, m_hi = _split_range(0, m, BLOCK_M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < m_hi
        offs = rows64[:, None] * m + cols[None, :]
        g = tl.load(DY + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            g = _keep_scale(g.to(tl.float32), rows, m0, m, seed, threshold, scale, BLOCK_M)  # the forward's mask
        g = to_rne(g, dtype, INTERP_BF16)
        w_offs, w_ok = _w2_tile(i_f, l_f, f_ok, cols, col_ok, N, s, r)
        w = to_rne(tl.load(W2 + w_offs, mask=w_ok, other=0.0), dtype, INTERP_BF16)
        dy1 = _dot(g, tl.trans(w), dy1, DOT_PREC, INTERP_BF16)
        dw2 = _dot(tl.trans(y1), g, tl.zeros((RB, BLOCK_M), dtype=tl.float32), DOT_PREC, INTERP_BF16)
        tl.store(p2 + w_offs, dw2, mask=w_ok)
    split_base = tl.program_id(1).to(tl.int64) * T * R
    tl.store(DY1P + split_base + rows64[:, None] * R + f[None, :], dy1, mask=y1_ok)


# DX is read-modify-written (P1 is plain stores): a new key is tuned on a copy of it (launch_tuned)
@triton.autotune(configs=_bwd_dx_configs(), key=["T_BUCKET", "n", "m", "R", "NEED_DX"], do_bench=tuning_bench,
                 cache_results=TUNE_CACHE)
@triton.jit
def _monarch_bwd_dx_kernel(
    # pointers
    X,  # (T, n) forward input
    W1,  # (N, r, p)
    DY1,  # (T, R) fp32 dY1flat
    DX,  # (T, n) holds dY @ W0; the adapter's dX is added in place (unused unless NEED_DX)
    P1,  # (token tiles, N*r*p) fp32: per-tile partial dW1
    # sizes (T_BUCKET: the autotune key for T)
    T, m, n, N, r, p, R, T_BUCKET,
    # this launch's chunk of the intermediate and the x columns its blocks cover
    F0, col_lo, col_hi,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, RB: tl.constexpr,
    NEED_DX: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    dtype = X.dtype.element_ty
    pid_t = tl.program_id(0)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)

    f = F0 + tl.arange(0, RB)
    f_ok = f < R
    kf = f // r
    jf = f - kf * r
    dy1 = tl.load(DY1 + rows64[:, None] * R + f[None, :], mask=row_ok[:, None] & f_ok[None, :], other=0.0)
    dy1 = to_rne(dy1, dtype, INTERP_BF16)

    p1 = P1 + pid_t.to(tl.int64) * (N * r * p)
    k_lo, k_hi = _split_range(col_lo, col_hi, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_hi
        w_offs, w_ok = _w1_tile(kf, jf, f_ok, cols, col_ok, r, p)
        x_offs = rows64[:, None] * n + cols[None, :]
        x_msk = row_ok[:, None] & col_ok[None, :]
        xt = tl.load(X + x_offs, mask=x_msk, other=0.0)
        dw1 = _dot(tl.trans(xt), dy1, tl.zeros((BLOCK_K, RB), dtype=tl.float32), DOT_PREC, INTERP_BF16)
        tl.store(p1 + w_offs, dw1, mask=w_ok)
        if NEED_DX:
            w = to_rne(tl.load(W1 + w_offs, mask=w_ok, other=0.0), dtype, INTERP_BF16)
            dx = _dot(dy1, tl.trans(w), tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32), DOT_PREC, INTERP_BF16)
            old = tl.load(DX + x_offs, mask=x_msk, other=0.0)
            tl.store(DX + x_offs, to_rne(old.to(tl.float32) + dx, dtype, INTERP_BF16), mask=x_msk)


# ------------------------------------------------------------------------------------------------
# launchers (inputs already validated by monarch_linear)
# ------------------------------------------------------------------------------------------------


def _chunks(N: int, r: int, p: int, n: int):
    """``(RB, [(F0, col_lo, col_hi), ...])``: the padded chunk width and, per launch, the first
    intermediate index and the x columns its blocks cover."""
    R = N * r
    RB = max(_MIN_DOT, next_pow2(R))
    RB = min(RB, max(_MIN_DOT, next_pow2(MAX_R_CHUNK)))
    out = []
    for F0 in range(0, R, RB):
        f_last = min(F0 + RB, R) - 1
        out.append((F0, (F0 // r) * p, min(n, (f_last // r + 1) * p)))
    return RB, out


def _device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device and its current stream: make that the
    tensors' device, or a process driving several GPUs launches on the wrong one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _PROGRAMS_PER_SM * _INTERP_SMS
    return _PROGRAMS_PER_SM * sm_count(device)


def _num_splits(token_tiles: int, ncols: int, block: int, device: torch.device) -> int:
    """Column splits so that token tiles x splits roughly fills the GPU (1 when T is large)."""
    want = cdiv(_target_programs(device), max(token_tiles, 1))
    return max(1, min(want, cdiv(ncols, block)))


def _dropout_args(dropout_p: float):
    if dropout_p > 0.0:
        return drop_threshold(dropout_p), keep_scale(dropout_p)
    return 0, 1.0


def _t_bucket(T: int) -> int:
    """Autotune key for the token count: the next power of two. Without it, a tuning at a small T
    (a test, a warm-up) would hold for every later T, and with the disk tune cache for later
    processes too."""
    return next_pow2(max(T, 1))


def _dot_args(dtype: torch.dtype) -> dict:
    """``DOT_PREC``: fp32 inputs get full-precision products, as torch's fp32 matmul (TF32 off by
    default) does. ``INTERP_BF16``: see ``_dot``/``_to`` (interpreter + bf16 only)."""
    interp_bf16 = dtype == torch.bfloat16 and dispatch.interpreter_enabled()
    prec = "ieee" if dtype == torch.float32 or interp_bf16 else "tf32"
    return {"DOT_PREC": prec, "INTERP_BF16": interp_bf16}


@custom_op("peft_kernels::monarch_fwd", mutates_args=())
def _monarch_fwd(x2: torch.Tensor, weight: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
                 bias: Optional[torch.Tensor], dropout_p: float,
                 seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, Y1flat)``: ``y = x2 @ W0^T + b + dropout(monarch(x2))`` and the fp32 intermediate.
    ``seed`` is a one-element int tensor, read here (Dynamo does not trace custom-op bodies)."""
    x2 = x2.contiguous()
    W1 = W1.contiguous()
    W2 = W2.contiguous()
    T, n = x2.shape
    m = weight.shape[0]
    N, r, p = W1.shape
    s = W2.shape[1]
    R = N * r
    dt = x2.dtype
    w0 = weight.to(dt)
    y = torch.addmm(bias.to(dt), x2, w0.t()) if bias is not None else torch.mm(x2, w0.t())
    y1 = torch.empty((T, R), device=x2.device, dtype=torch.float32)
    if T == 0:
        return y, y1
    threshold, scale = _dropout_args(dropout_p)
    seed = host_seed(seed, x2.device) if dropout_p > 0.0 else 0
    RB, chunks = _chunks(N, r, p, n)

    def grid(meta):
        tiles = cdiv(T, meta["BLOCK_T"])
        return (tiles, _num_splits(tiles, m, meta["BLOCK_M"], x2.device))

    with _device_guard(x2.device):
        for F0, col_lo, col_hi in chunks:
            launch_tuned(_monarch_fwd_kernel, grid,
                         (x2, W1, W2, y, y1, T, n, m, N, r, p, s, R, _t_bucket(T), F0, col_lo, col_hi,
                          seed, threshold, scale),
                         dict(RB=RB, HAS_DROPOUT=dropout_p > 0.0, **_dot_args(dt)), inplace=(3,))
    return y, y1


@_monarch_fwd.register_fake
def _(x2, weight, W1, W2, bias, dropout_p, seed):
    T = x2.shape[0]
    R = W1.shape[0] * W1.shape[1]
    return x2.new_empty((T, weight.shape[0])), x2.new_empty((T, R), dtype=torch.float32)


@custom_op("peft_kernels::monarch_bwd", mutates_args=())
def _monarch_bwd(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
                 y1: torch.Tensor, dropout_p: float, seed: torch.Tensor,
                 need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dW1, dW2)``; ``dx`` is an empty ``(0,)`` tensor when ``need_dx`` is False."""
    x2 = x2.contiguous()
    W1c = W1.contiguous()
    W2c = W2.contiguous()
    T, n = x2.shape
    m = weight.shape[0]
    N, r, p = W1.shape
    s = W2.shape[1]
    R = N * r
    dt = x2.dtype
    dy2 = dy2.to(dt).contiguous()
    y1 = y1.contiguous()  # indexed as a dense (T, R) array
    dx = torch.mm(dy2, weight.to(dt)) if need_dx else x2.new_empty((0,))
    interp = dispatch.interpreter_enabled()
    block_t = _BWD_BLOCK_T_INTERP if interp else _BWD_BLOCK_T_GPU
    split_cols = _BWD_SPLIT_COLS_INTERP if interp else _BWD_SPLIT_COLS_GPU
    tiles = cdiv(T, block_t)
    # zeros: every partial entry has one writer, but the padded positions (x columns >= n, output
    # columns >= m) have none and must read as zero gradient
    p1 = torch.zeros((tiles, N * r * p), device=x2.device, dtype=torch.float32)
    p2 = torch.zeros((tiles, N * s * r), device=x2.device, dtype=torch.float32)
    if T > 0:
        threshold, scale = _dropout_args(dropout_p)
        seed = host_seed(seed, x2.device) if dropout_p > 0.0 else 0
        RB, chunks = _chunks(N, r, p, n)
        # split the output columns only when the whole intermediate is one chunk, so the (splits,
        # T, R) partial-dY1 buffer stays small
        m_splits = _num_splits(tiles, m, split_cols, x2.device) if len(chunks) == 1 else 1
        n_splits = _num_splits(tiles, n, split_cols, x2.device)
        dy1p = torch.empty((m_splits, T, R), device=x2.device, dtype=torch.float32)
        with _device_guard(x2.device):
            for F0, _, _ in chunks:
                launch_tuned(_monarch_bwd_dy1_kernel, (tiles, m_splits),
                             (dy2, W2c, y1, dy1p, p2, T, m, n, N, r, s, R, _t_bucket(T), F0, seed, threshold, scale),
                             dict(BLOCK_T=block_t, RB=RB, HAS_DROPOUT=dropout_p > 0.0, **_dot_args(dt)))
            dy1 = dy1p[0] if m_splits == 1 else dy1p.sum(0)  # deterministic sum of the column splits
            for F0, col_lo, col_hi in chunks:
                # without dX, DX is the empty placeholder: never the caller's x (a tuning copy-back
                # into a saved input would bump its version under another node's saved tensors)
                launch_tuned(_monarch_bwd_dx_kernel, (tiles, n_splits),
                             (x2, W1c, dy1, dx, p1, T, m, n, N, r, p, R, _t_bucket(T), F0, col_lo, col_hi),
                             dict(BLOCK_T=block_t, RB=RB, NEED_DX=need_dx, **_dot_args(dt)),
                             inplace=(3,) if need_dx else ())
    # deterministic second stage of the reduction over token tiles
    dW1 = p1.sum(0).view(N, r, p).to(W1.dtype)
    dW2 = p2.sum(0).view(N, s, r).to(W2.dtype)
    return dx, dW1, dW2


@_monarch_bwd.register_fake
def _(dy2, x2, weight, W1, W2, y1, dropout_p, seed, need_dx):
    dx = x2.new_empty(x2.shape) if need_dx else x2.new_empty((0,))
    # new_empty, not empty_like: the real op returns contiguous gradients even for strided W1/W2
    return dx, W1.new_empty(W1.shape), W2.new_empty(W2.shape)


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------


class MonarchFunction(torch.autograd.Function):
    """``y = x @ W0^T + b + dropout(monarch(x; W1, W2))`` with the fused Triton kernels.

    Gradients flow to ``x``, ``W1``, ``W2``, ``bias`` (and ``weight`` if it requires grad, via
    ``dY^T x``, for completeness; adapters keep it frozen)."""

    @staticmethod
    def forward(ctx, x, weight, W1, W2, bias, dropout_p, seed):
        m, n = weight.shape
        x2 = x.reshape(-1, n)
        y, y1 = _monarch_fwd(x2, weight, W1, W2, bias, float(dropout_p), seed)
        # the seed is a tensor: saved like one, so compiled autograd carries it to backward
        ctx.save_for_backward(x2, weight, W1, W2, y1, seed)
        ctx.dropout_p = float(dropout_p)
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], m)

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x2, weight, W1, W2, y1, seed = ctx.saved_tensors
        m = weight.shape[0]
        dy2 = dy.reshape(-1, m)
        need_dx = ctx.needs_input_grad[0]
        dx, dW1, dW2 = _monarch_bwd(dy2, x2, weight, W1, W2, y1, ctx.dropout_p, seed,
                                                          need_dx)
        grad_x = dx.view(ctx.x_shape) if need_dx else None
        grad_w = (dy2.float().t() @ x2.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = dy2.float().sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[4] else None
        return (grad_x, grad_w, dW1 if ctx.needs_input_grad[2] else None, dW2 if ctx.needs_input_grad[3] else None,
                grad_b, None, None)


def dense_factors(W1: torch.Tensor, W2: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Monarch factors as dense matrices with both permutations folded in (differentiable):
    ``B1 (N*r, n)`` with ``B1[k*r + j, k*p + q] = W1[k, j, q]`` and ``B2 (m, N*r)`` with
    ``B2[c*N + l, i*N + l] = W2[l, c, i]``, zero elsewhere, so that the adapter output is
    ``x @ B1^T @ B2^T``. One broadcast product with an identity each (exact: times 0 or 1); the
    padding columns of ``B1`` (``>= n``, they would multiply x's zero padding) and the output
    rows ``>= m`` are cut off."""
    N, r, p = W1.shape
    s = W2.shape[1]
    eye = torch.eye(N, device=W1.device, dtype=W1.dtype)
    B1 = (W1[:, :, None, :] * eye[:, None, :, None]).reshape(N * r, N * p)[:, :n]
    B2 = (W2.permute(1, 0, 2)[:, :, :, None] * eye.to(W2.dtype)[None, :, None, :]).reshape(s * N, r * N)[:m]
    return B1, B2


# One launch builds both expansions (forward) and one gathers both factor gradients back
# (backward): the broadcast-product form of ``dense_factors`` costs ~3 small launches forward and
# ~6 in its autograd (products with the identity, their broadcast sums, the slice's zero-padded
# copy), a few us each on a GPU, which at (4096, 4096) is ~2% of the frozen layer.
EXPAND_BLOCK = 1024


@triton.jit
def _monarch_expand_kernel(
    # pointers: compact factors (contiguous) and expansions (contiguous, the output dtype)
    w1_ptr, w2_ptr, b1_ptr, b2_ptr,
    # sizes: W1 (N, r, p), W2 (N, s, r); B1 (N*r, n), B2 (m, N*r); B1 programs come first
    N, r, p, s, n, m, b1_programs,
    # meta-parameters (FIX: round casts to nearest even under the interpreter, ``_casts.to_rne``)
    BLOCK: tl.constexpr, FIX: tl.constexpr,
):
    """``B1[k*r + j, k*p + q] = W1[k, j, q]`` and ``B2[c*N + l, i*N + l] = W2[l, c, i]``, zero
    elsewhere (``dense_factors``), every element of both written once: programs below
    ``b1_programs`` cover B1, the rest B2."""
    pid = tl.program_id(0)
    R = N * r
    if pid < b1_programs:
        e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = e < R * n
        row = e // n
        col = e % n
        k = row // r
        on = ok & (col // p == k)
        v = tl.load(w1_ptr + (k * r + row % r) * p + col % p, mask=on, other=0.0)
        tl.store(b1_ptr + e, to_rne(v, b1_ptr.dtype.element_ty, FIX), mask=ok)
    else:
        e = (pid - b1_programs).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = e < m * R
        row = e // R
        col = e % R
        l = row % N
        on = ok & (col % N == l)
        v = tl.load(w2_ptr + (l * s + row // N) * r + col // N, mask=on, other=0.0)
        tl.store(b2_ptr + e, to_rne(v, b2_ptr.dtype.element_ty, FIX), mask=ok)


@triton.jit
def _monarch_expand_bwd_kernel(
    # pointers: expansion gradients (contiguous) and factor gradients (contiguous, their dtype)
    db1_ptr, db2_ptr, dw1_ptr, dw2_ptr,
    # sizes as in _monarch_expand_kernel; dW1 programs come first
    N, r, p, s, n, m, w1_programs,
    # meta-parameters (FIX: round casts to nearest even under the interpreter, ``_casts.to_rne``)
    BLOCK: tl.constexpr, FIX: tl.constexpr,
):
    """The expansion's adjoint, a gather: ``dW1[k, j, q] = dB1[k*r + j, k*p + q]`` (0 for the
    padding columns ``k*p + q >= n``) and ``dW2[l, c, i] = dB2[c*N + l, i*N + l]`` (0 for the
    padding rows ``c*N + l >= m``)."""
    pid = tl.program_id(0)
    R = N * r
    if pid < w1_programs:
        e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = e < N * r * p
        k = e // (r * p)
        j = (e // p) % r
        col = k * p + e % p
        g = tl.load(db1_ptr + (k * r + j) * n + col, mask=ok & (col < n), other=0.0)
        tl.store(dw1_ptr + e, to_rne(g, dw1_ptr.dtype.element_ty, FIX), mask=ok)
    else:
        e = (pid - w1_programs).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = e < N * s * r
        l = e // (s * r)
        row = ((e // r) % s) * N + l
        g = tl.load(db2_ptr + row * R + (e % r) * N + l, mask=ok & (row < m), other=0.0)
        tl.store(dw2_ptr + e, to_rne(g, dw2_ptr.dtype.element_ty, FIX), mask=ok)


@custom_op("peft_kernels::monarch_expand", mutates_args=())
def _monarch_expand(W1: torch.Tensor, W2: torch.Tensor, n: int, m: int,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``dense_factors(W1, W2, n, m)`` cast to ``out_dtype``, in one launch."""
    R = W1.shape[0] * W1.shape[1]
    B1 = torch.empty((R, n), device=W1.device, dtype=out_dtype)
    B2 = torch.empty((m, R), device=W1.device, dtype=out_dtype)
    _launch_pair(_monarch_expand_kernel, W1, W2, B1, B2, W1, W2, n, m)
    return B1, B2


def _launch_pair(kernel, a, b, out_a, out_b, W1, W2, n: int, m: int) -> None:
    """One launch of an expansion kernel over both outputs: ``out_a``'s programs first, then ``out_b``'s."""
    N, r, p = W1.shape
    s = W2.shape[1]
    if out_a.numel() + out_b.numel() == 0:
        return
    p1 = cdiv(out_a.numel(), EXPAND_BLOCK)
    with _device_guard(W1.device):
        kernel[(p1 + cdiv(out_b.numel(), EXPAND_BLOCK),)](
            a.contiguous(), b.contiguous(), out_a, out_b, N, r, p, s, n, m, p1, BLOCK=EXPAND_BLOCK,
            FIX=dispatch.interpreter_enabled())


@_monarch_expand.register_fake
def _(W1, W2, n, m, out_dtype):
    R = W1.shape[0] * W1.shape[1]
    return W1.new_empty((R, n), dtype=out_dtype), W1.new_empty((m, R), dtype=out_dtype)


@custom_op("peft_kernels::monarch_expand_bwd", mutates_args=())
def _monarch_expand_bwd(dB1: torch.Tensor, dB2: torch.Tensor, W1: torch.Tensor,
                        W2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW1, dW2) in the factors' dtypes, gathered from the expansions' gradients in one launch."""
    dW1 = torch.empty_like(W1, memory_format=torch.contiguous_format)
    dW2 = torch.empty_like(W2, memory_format=torch.contiguous_format)
    _launch_pair(_monarch_expand_bwd_kernel, dB1, dB2, dW1, dW2, W1, W2, dB1.shape[1], dB2.shape[0])
    return dW1, dW2


@_monarch_expand_bwd.register_fake
def _(dB1, dB2, W1, W2):
    return W1.new_empty(W1.shape), W2.new_empty(W2.shape)  # contiguous, as the real op returns


class _ExpandFunction(torch.autograd.Function):
    """Differentiable ``_monarch_expand``: the Triton form of ``dense_factors`` (+ cast)."""

    @staticmethod
    def forward(ctx, W1, W2, n, m, out_dtype):
        ctx.save_for_backward(W1, W2)  # shapes and dtypes only; no values are read in backward
        ctx.n, ctx.m, ctx.out_dtype = n, m, out_dtype
        return _monarch_expand(W1, W2, n, m, out_dtype)

    @staticmethod
    @first_order_only
    def backward(ctx, dB1, dB2):
        W1, W2 = ctx.saved_tensors
        n, m, dtype = ctx.n, ctx.m, ctx.out_dtype
        R = W1.shape[0] * W1.shape[1]
        # a factor whose expansion got no gradient (not needed downstream) gathers zeros
        dB1 = dB1 if dB1 is not None else W1.new_zeros((R, n), dtype=dtype)
        dB2 = dB2 if dB2 is not None else W1.new_zeros((m, R), dtype=dtype)
        dW1, dW2 = _monarch_expand_bwd(dB1, dB2, W1, W2)
        need1, need2 = ctx.needs_input_grad[:2]
        return (dW1 if need1 else None), (dW2 if need2 else None), None, None, None


def _fused_gemm_path(x, weight, W1, W2, bias, dropout_p, seed, base):
    """Monarch on the LoRA family's fused-GEMM kernels: ``x @ W0^T + b + D(x B1^T B2^T)``, the
    base GEMM and the stage-2 product in one kernel (or cuBLAS + in-place add, ``base``)."""
    from .lora import LoRAFunction, base_mode

    m, n = weight.shape
    dtype = x.dtype
    B1, B2 = _ExpandFunction.apply(W1, W2, n, m, dtype)
    # a Function's outputs all require grad when any input does: a frozen factor's expansion must
    # not, or LoRAFunction would compute its (unused) gradient pass
    B1 = B1 if W1.requires_grad else B1.detach()
    B2 = B2 if W2.requires_grad else B2.detach()
    cast = [t if t is None or t.dtype == dtype else t.to(dtype) for t in (weight, bias)]
    y = LoRAFunction.apply(x.reshape(-1, n), cast[0], B1, B2, cast[1], 1.0, dropout_p, seed,
                           base_mode(base), True)
    return y.reshape(*x.shape[:-1], m)


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------

if HAS_TRITON:
    dispatch.register("monarch", "triton")
dispatch.register("monarch", "torch")


def monarch_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    W1: torch.Tensor,
    W2: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
    impl: Optional[str] = None,
    *,
    base: Optional[str] = None,
) -> torch.Tensor:
    """MoRe linear ``x @ W0^T + b + dropout(monarch(x))`` -> ``(..., m)`` in ``x.dtype``.

    ``weight`` ``(m, n)`` is the frozen base, ``W1`` ``(N, r, ceil(n/N))``, ``W2`` ``(N, s, r)``
    (see ``reference.monarch.monarch_dims``). ``impl`` forces ``"triton"`` or ``"torch"``;
    by default ``dispatch.choose`` picks (Triton on CUDA, the reference elsewhere). ``seed`` is an
    int or a one-element integer tensor (what the module draws); a tensor is never read here, only
    inside the custom ops or by tensor ops on the torch path, so ``torch.compile`` does not
    graph-break on dropout. On the Triton path, ``N * blk_r <= FUSED_GEMM_MAX_R`` runs on the
    fused-GEMM kernels, where ``base`` (``triton``/``cublas``/``auto``, default
    ``PEFT_KERNELS_BASE`` or ``auto``) picks who computes the frozen product (``ops.lora``);
    wider intermediates run on the dedicated kernels."""
    # validate everything before any launch (the reference's own checks)
    check_monarch_args(x, weight, W1, W2, bias, dropout_p, seed)
    if base is not None:
        from .lora import base_mode

        base_mode(base)  # a bad choice fails here, whichever path runs
    dropout_p = float(dropout_p)
    dtype = dispatch.compute_dtype(x)
    which = dispatch.choose("monarch", x.device, dtype, impl)
    if which == "torch":
        return dispatch.in_dtype(monarch_reference(x, weight, W1, W2, bias, dropout_p, seed), dtype)
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(1).to(torch.int64)
    else:
        seed = torch.tensor([seed], dtype=torch.int64)
    # Under autocast the kernels run in the autocast dtype (as F.linear would), with autocast off
    # inside so that no op of either path changes precision on its own; the casts are
    # differentiable, so fp32 inputs and factors get fp32 gradients.
    with torch.autocast(x.device.type, enabled=False):
        if dtype != x.dtype:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if W1.shape[0] * W1.shape[1] <= FUSED_GEMM_MAX_R:
            return _fused_gemm_path(x, weight, W1, W2, bias, dropout_p, seed, base)
        return MonarchFunction.apply(x, weight, W1, W2, bias, dropout_p, seed)


__all__ = ["monarch_linear", "MonarchFunction", "dense_factors", "MAX_R_CHUNK", "FUSED_GEMM_MAX_R"]
