"""Fused LoRA: ``y = x @ W0^T (+ b) + s * dropout(x) @ A^T @ B^T`` with a frozen W0.

Layout of the work (T tokens, d_in -> d_out, rank r):

forward
  1. ``_lora_rows_kernel``: ``xa = dropout(x) @ A^T`` in fp32, ``(T, r)``. The dropout mask is
     the shared spec of ``reference._philox`` (one Philox-4x32-10 per 8 elements of the
     ``(T, d_in)`` input, ``_dropout.dropout_keep_tile``) generated in-kernel and never stored.
  2. ``_lora_gemm_kernel``: the base GEMM ``x @ W0^T`` whose accumulator also receives
     ``(s * xa) @ B^T`` and the bias in the epilogue: the output is written once.
backward
  3. ``_lora_rows_kernel`` again: one pass over dY gives ``g = dY @ B`` ``(T, r)`` and
     ``dB = s * dY^T @ xa`` (accumulated across token blocks with fp32 atomics, s on each partial).
  4. ``_lora_bwd_da_kernel``: ``dA = s * k * g^T @ (mask * x)``, mask regenerated. dA and dB
     share one fp32 buffer (``lora_bwd`` op): one memset, one cast to the parameters' dtype.
  5. ``_lora_gemm_kernel`` again: ``dX = dY @ W0 + mask * (s * k) * (g @ A)``, the LoRA term
     (with the regenerated mask, same offsets as forward) folded into the epilogue.
(``k = keep_scale(p)``: ``1 / (1 - p)`` for the rate quantised to 16 bits, see ``reference._philox``.)
Saved for backward: x, A, B, W0 (references), xa ``(T, r)`` fp32 and the seed; nothing of
size ``T x d_out``.

Determinism: the forward and dX are bit-reproducible run to run (fixed tile order, no atomics).
By default dA and dB are NOT on a GPU: their token-split partial sums meet in fp32
``tl.atomic_add``, whose order varies, so they can differ in the last bits between identical runs
(the interpreter runs programs in order and hides this). Under
``torch.use_deterministic_algorithms(True)`` (``deterministic()``) each token split stores its
own partial and they are summed in a fixed order (a ``(splits, r, K)`` fp32 buffer, splits ~
4 waves of programs), and dB comes from the dA kernel run on ``(xa, dY)`` instead of the atomics
in the g pass: bit-reproducible, for one more pass over dY (~+0.03x at (4096,4096), predicted).
``base="auto"`` then resolves to ``triton`` without timing (a timing decision can differ between
processes, and the bases differ in the last bits). Monarch's fused path and Lily's fused path use
the same kernels and follow the same switch.
Autotuning is harmless to them: the autotuned GEMMs write a fresh output once; the autotuned
r-sized kernels (rows, dA) zero their atomic targets before every benchmark run
(``reset_to_zero``); the add-only mode, which adds into an output in place, runs with one fixed
tile and is never autotuned (the autotuner's benchmark runs would each add the LoRA term again).
Every autotuned kernel benchmarks on its first call per key, so a CUDA graph must be captured after
a warm-up call (as torch.compile's cudagraph trees do), not on a cold process.

Base product (``base=`` argument, else ``PEFT_KERNELS_BASE``, else ``DEFAULT_BASE`` = ``auto``):
``triton`` runs the base GEMMs in Triton with the LoRA terms fused into their epilogues (output
written once); ``tma`` is the same GEMM with x and W0 tiles loaded through Hopper TMA tensor
descriptors (``tma_eligible``: sm_90+, 16-byte-aligned rows; else it falls back to ``triton``);
``cublas`` runs them with ``torch.mm``/``torch.addmm`` and adds the LoRA terms in place with the
same kernel in add-only mode (one extra read+write of the output); ``auto`` decides inside the
``lora_gemm`` op, per GEMM (forward and dX separately) and per shape key (device, dtypes, token
bucket, N, K, padded rank, flags, layouts, TMA eligibility): the first call on a CUDA device times
every eligible base on its own operands and keeps the fastest (``base_decisions()`` lists the
decisions and the times). All give the same result up to fp32 summation order and, on the cuBLAS
path, one more rounding of the base product (to the output dtype, before the LoRA term is added),
so the decision changes speed, not the math; pin ``PEFT_KERNELS_BASE`` for bit-reproducibility
across processes (and across DDP ranks, which may decide differently). Cost of a decision: each
new key autotunes the Triton GEMMs (8 configs each) and times every base (2 warm-up + 5 x 3 timed
calls each), ~1-2 s on the first call of a
new token bucket or layer shape; power-of-two token buckets keep that to a handful of keys per
layer shape, but a new bucket (an eval batch) pays it mid-run, and benchmarks need warm-up steps.
During CUDA-graph capture nothing can be timed: a key without a decision takes ``cublas``.
``tma`` (Hopper and newer) is ``triton`` with the x and W0 tiles loaded through host-side TMA tensor
descriptors (``_lora_gemm_tma_kernel``, same epilogue ``_lora_epilogue``): it needs x and W0 stored
row-major with 16-byte aligned rows and data pointers, fp16/bf16, or fp32 with TF32 dots
(``tma_eligible``); elsewhere ``base="tma"`` runs as ``triton``, and ``auto`` times it only where it
is eligible. Compiled for sm_90 (ptxas -v, bf16 forward) it uses 8-20% fewer registers than the
pointer kernel at equal tiles, same spills and shared memory; its speed is UNMEASURED. Which base wins per
shape on an H100 is UNMEASURED (no GPU in the sessions that wrote this).

The same kernels serve Monarch (``ops/monarch.py``, dense expansions of its block factors) with
dropout on the adapter output instead of its input (``LoRAFunction(..., output_dropout=True)``).

Dropout scaling is applied to the fp32 accumulators (``xa``, ``dA``) or folded into ``g``
instead of to ``x``: ``k * ((mask * x) @ A^T)`` is the same product with one rounding less.

Not yet measured, seen only by compiling for sm_90 without a GPU (``triton.compile`` of an
``ASTSource`` with ``GPUTarget("cuda", 90, 32)``): without dropout the GEMM uses wgmma and spills
no more than a plain tutorial GEMM of the same tile. The dropout mask is computed three times over
``T x d_in`` (down-projection, dX epilogue, dA); with the old spec (one Philox-4x32-10, ~100 integer
ops, per element) that was predicted to break the "+0.03x for dropout" target and spilled heavily
in the dX epilogue on 128x256 / 128x128 tiles. The current spec runs one Philox per 8 elements
(~15 integer ops per element in all, ~7x fewer). Compiled for sm_90 (ptxas -v, bf16), the dX
epilogue's spill stores fell from 1612 to 44 bytes at 128x128x64 (8 warps) and from 10272 to 2564 at
128x256x64; ``ops/_dropout.py`` has the details. Time on an H100 is UNMEASURED.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch

from .. import dispatch
from .._checks import check_choice, check_same_device, check_tensor
from ..reference.lora import check_lora_args, lora as lora_reference
from ..reference._philox import drop_threshold, keep_scale
from ._autograd import first_order_only
from ._casts import to_rne
from ._dropout import dropout_keep_tile, host_seed
from ._triton import CAPTURE_WARMUP_MSG, HAS_TRITON, TUNE_CACHE, capturing, cdiv, custom_op, launch_tuned, \
    next_pow2, sm_count, sm_major, tl, triton, tuning_bench

BASE_ENV = "PEFT_KERNELS_BASE"
# who runs the frozen product; tma: the Triton GEMM with TMA tile loads (Hopper+, aligned operands,
# else it runs as "triton")
BASES = ("triton", "cublas", "tma")
BASE_MODES = BASES + ("auto",)  # auto: the eligible bases timed once per shape on the GPU, the fastest kept
AUTO_BASES_ENV = "PEFT_KERNELS_AUTO_BASES"  # comma list: the bases ``auto`` may pick from (default: all)
TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TMA_ALIGN = 16  # bytes: TMA needs 16-byte aligned base addresses and row strides
DEFAULT_BASE = "auto"
MAX_RANK = 256  # the r-padded tiles live in registers; 256 is the largest the issue asks for
MIN_DOT = 16  # tl.dot needs every dimension >= 16
# triton 3.6's interpreter stores bf16 as raw uint16 and its tl.dot multiplies those integers, and it
# casts fp32 -> bf16 by truncation: under the interpreter (only) dot operands are upcast to fp32 and
# casts round on the bits (``_casts.to_rne``). Compiled kernels never see this.
_INTERPRETER = tl.constexpr(dispatch.interpreter_enabled()) if HAS_TRITON else False

# ----------------------------------------------------------------------------------------- configs


def _gemm_configs():
    """Autotune candidates for the base GEMM. Under the interpreter one small config: autotuning
    there runs every config on the CPU, which is slow and measures nothing useful."""
    if dispatch.interpreter_enabled():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 64, 64, 4, 3),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


def _set_tma_blocks(nargs: dict) -> None:
    """Autotune pre_hook of the TMA GEMM: a host-side TensorDescriptor carries its block shape,
    which must be the tile the config loads, so each config (each autotune benchmark run and the
    final launch) sets it on the launcher's descriptors before the kernel is specialised on it."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk] if nargs["W_NK"] else [bk, bn]


def _tma_configs():
    """The pointer GEMM's candidates, each with the pre_hook that sizes the descriptors' blocks."""
    if not HAS_TRITON:  # the stand-in decorators ignore the configs
        return []
    return [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_tma_blocks)
            for c in _gemm_configs()]


# The r-sized kernels (rows: down-projection and g/dB; dA) are memory-bound passes over a T x d
# tensor with (BLOCK_T, r_pad) fp32 accumulators in registers. Their tiles are autotuned (the GPU list
# below, pruned per rank so the accumulators fit: ``_prune_small``); under the interpreter one small
# tile. The first entry that fits is what the session-1 guesses were (unmeasured: no GPU then).
_ROWS_TILES = ((64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 8, 3), (32, 128, 4, 3), (16, 128, 4, 3))  # BLOCK_M, BLOCK_N
_DA_TILES = ((64, 4, 3), (64, 8, 3), (32, 8, 3), (128, 8, 3), (32, 4, 4))  # BLOCK_M (BLOCK_K = _DA_BLOCK_K)
_DA_BLOCK_K = 64  # fixed: it sets the split count (and the deterministic partial buffer) on the host
SMALL_REGS = 64  # per-thread register budget (of sm_90's 255) for a tile's fp32 accumulators and input tile


def _small_configs(tiles, names):
    if dispatch.interpreter_enabled():
        return [triton.Config(dict(zip(names, (32,) * len(names))), num_warps=4, num_stages=1)]
    return [triton.Config(dict(zip(names, t[:-2])), num_warps=t[-2], num_stages=t[-1]) for t in tiles]


def _prune_small(configs, named_args, **kwargs):
    """Autotune pruning of the r-sized kernels: keep the tiles whose fp32 accumulators (rows kernel:
    ``acc`` and, with dW, ``xa`` (BLOCK_M x r_pad each) and ``dw`` (BLOCK_N x r_pad); dA: ``acc``
    (r_pad x BLOCK_K) and the ``g^T`` tile (r_pad x BLOCK_M)) plus the input tile fit ``SMALL_REGS``
    registers per thread at this r_pad (sm_90 ptxas: the tiles above it spill in fp32); the
    smallest if none does."""
    r_pad = kwargs["R_PAD"]

    def regs(c):
        bm = c.kwargs["BLOCK_M"]
        if "BLOCK_N" in c.kwargs:  # rows kernel
            bn = c.kwargs["BLOCK_N"]
            acc = (2 * bm + bn) * r_pad if kwargs.get("HAS_DW", True) else bm * r_pad
        else:  # dA
            bn = kwargs.get("BLOCK_K", _DA_BLOCK_K)
            acc = (bm + bn) * r_pad
        return (acc + bm * bn) / (32 * c.num_warps)

    fit = [c for c in configs if regs(c) <= SMALL_REGS]
    return fit or [min(configs, key=regs)]


def _small_blocks(r_pad: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_K, num_warps): the first tile ``_prune_small`` keeps at ``r_pad`` (what the
    autotuner's list starts from; the SM90 compile report's quick case)."""
    cfg = _prune_small(_small_configs(_ROWS_TILES, ("BLOCK_M", "BLOCK_N")), {}, R_PAD=r_pad)[0]
    return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps


def _r_block(r: int) -> int:
    """Rank chunk of the GEMM epilogue. Small under the interpreter so tests cover several chunks."""
    return min(_r_pad(r), 16 if dispatch.interpreter_enabled() else 64)


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (see ``_INTERPRETER``)."""
    if _INTERPRETER:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M row tiles per column sweep, so
    consecutive programs reuse the same W0 tiles from L2 (both GEMM kernels)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_size, (pid % group) // group_size


@triton.jit
def _lora_epilogue(
    # the GEMM's fp32 accumulator (BLOCK_M, BLOCK_N) and where its tile sits
    acc, offs_m, offs_n, n0,
    # pointers
    c_ptr, left_ptr, right_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, R,
    # strides
    stride_cm, stride_cn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    # LoRA term: scale folded into `left` before the low-precision cast; dropout over (M, N)
    scale, seed, threshold,
    # meta-parameters
    HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out = acc [+ c] + scale * mask * (left @ right) [+ bias]`` for one output tile, stored once
    in the output dtype. Shared by the pointer GEMM (``_lora_gemm_kernel``, also its add-only mode)
    and the TMA GEMM (``_lora_gemm_tma_kernel``): one copy of the epilogue, so both bases compute the
    same LoRA term bit for bit (only the base product's summation order may differ)."""
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    if HAS_C:
        c = tl.load(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc += c.to(tl.float32)

    # LoRA epilogue, over the rank in R_BLOCK chunks (>= 16 for tl.dot, <= 64 so that an r = 256
    # adapter does not blow the register/shared budget of a 128x256 tile); masked loads pad r
    if HAS_DROPOUT:
        lora = tl.zeros(acc.shape, dtype=tl.float32)
    else:
        lora = acc  # no mask to apply: accumulate straight into the GEMM's accumulator
    for r0 in range(0, R, R_BLOCK):
        offs_r = r0 + tl.arange(0, R_BLOCK)
        r_ok = offs_r < R
        left = tl.load(left_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                       mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        right = tl.load(right_ptr + offs_r[:, None] * stride_rr + cols[None, :] * stride_rn,
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        left = to_rne(left.to(tl.float32) * scale, right.dtype, _INTERPRETER)
        lora = _mma(left, right, lora, DOT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep_tile(seed, offs_m, n0, N, threshold, BLOCK_N)
        acc += tl.where(keep, lora, tl.zeros_like(lora))
    else:
        acc = lora

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             to_rne(acc, out_ptr.dtype.element_ty, _INTERPRETER), mask=m_ok[:, None] & n_ok[None, :])


# key: the W layout (stride_wk is 1 for the forward's W0^T view, d_in for dX's row-major W0) and
# every flag that changes the code; the add-only mode is never autotuned (``_launch_add_only``)
@triton.autotune(configs=_gemm_configs(),
                 key=["M_BUCKET", "N", "K", "R_BLOCK", "stride_wk", "HAS_GEMM", "HAS_BIAS", "HAS_DROPOUT",
                      "DOT_PRECISION"], do_bench=tuning_bench,
                 cache_results=TUNE_CACHE)
@triton.jit
def _lora_gemm_kernel(
    # pointers
    x_ptr, w_ptr, c_ptr, left_ptr, right_ptr, bias_ptr, out_ptr,
    # sizes: out (M, N) = x (M, K) @ w (K, N) [+ c] + scale * mask * (left (M, R) @ right (R, N)) [+ bias]
    M, N, K, R, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_wk, stride_wn, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    # LoRA epilogue: scale folded into `left` before the low-precision cast; dropout over (M, N)
    scale, seed, threshold,
    # meta-parameters
    HAS_GEMM: tl.constexpr, HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    R_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One kernel for three jobs: the forward (x @ W0^T + s xa B^T + b), the dX backward
    (dY @ W0 + mask * s * keep_scale * g A) and, with HAS_GEMM=False / HAS_C=True, the add-only LoRA pass
    of the cuBLAS-base path. Output written once, in the output dtype."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if HAS_GEMM:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            # int64: in the dX pass W0 is read row-major (stride_wk = d_in), and a W0 with more than
            # 2**31 elements (a 128k-vocab x 16k head) would overflow int32 offsets
            w = tl.load(w_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(x, w, acc, DOT_PRECISION)
    _lora_epilogue(acc, offs_m, offs_n, pid_n * BLOCK_N,
                   c_ptr, left_ptr, right_ptr, bias_ptr, out_ptr,
                   M, N, R,
                   stride_cm, stride_cn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
                   scale, seed, threshold,
                   HAS_C, HAS_BIAS, HAS_DROPOUT, R_BLOCK, DOT_PRECISION, BLOCK_N)


# key: as _lora_gemm_kernel's, with W_NK (the W layout) in place of stride_wk; the descriptors'
# block shapes are set per config by ``_set_tma_blocks`` (the configs' pre_hook)
@triton.autotune(configs=_tma_configs(),
                 key=["M_BUCKET", "N", "K", "R_BLOCK", "X_BYTES", "W_NK", "HAS_C", "HAS_BIAS", "HAS_DROPOUT",
                      "DOT_PRECISION"], do_bench=tuning_bench,
                 cache_results=TUNE_CACHE)
@triton.jit
def _lora_gemm_tma_kernel(
    # tensor descriptors: x (M, K), W0 as stored (W_NK: (N, K), the forward; else (K, N), the dX pass)
    x_desc, w_desc,
    # pointers
    c_ptr, left_ptr, right_ptr, bias_ptr, out_ptr,
    # X_BYTES (x's element size) only keys the autotuner: descriptors carry no dtype of their own.
    # sizes: out (M, N) = x (M, K) @ W [+ c] + scale * mask * (left (M, R) @ right (R, N)) [+ bias]
    M, N, K, R, M_BUCKET, X_BYTES,
    # strides
    stride_cm, stride_cn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    # LoRA epilogue: scale folded into `left` before the low-precision cast; dropout over (M, N)
    scale, seed, threshold,
    # meta-parameters
    W_NK: tl.constexpr, HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    R_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``_lora_gemm_kernel``'s forward / dX job with the x and W0 tiles brought in by the Hopper TMA
    engine (host-side tensor descriptors): no address arithmetic or bounds masks in the K loop,
    out-of-range rows/columns/K arrive as zeros, and the loads are asynchronous copies that Triton
    pipelines over ``num_stages`` buffers. Tiles: x [BLOCK_M, BLOCK_K]; W0 [BLOCK_N, BLOCK_K] (W_NK, fed
    to the dot transposed) or [BLOCK_K, BLOCK_N]. Same epilogue (``_lora_epilogue``)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([m0, k0])
        if W_NK:
            w = w_desc.load([n0, k0]).T  # W0 rows are output features: the K-major B operand
        else:
            w = w_desc.load([k0, n0])
        acc = _mma(x, w, acc, DOT_PRECISION)
    _lora_epilogue(acc, m0 + tl.arange(0, BLOCK_M), n0 + tl.arange(0, BLOCK_N), n0,
                   c_ptr, left_ptr, right_ptr, bias_ptr, out_ptr,
                   M, N, R,
                   stride_cm, stride_cn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
                   scale, seed, threshold,
                   HAS_C, HAS_BIAS, HAS_DROPOUT, R_BLOCK, DOT_PRECISION, BLOCK_N)


# reset_to_zero: dW gathers fp32 atomics, so every autotune benchmark run starts from zero (the
# launcher passes `out` as dw_ptr when there is no dW: pure stores, zeroing it is harmless)
@triton.autotune(configs=_small_configs(_ROWS_TILES, ("BLOCK_M", "BLOCK_N")),
                 key=["M_BUCKET", "N", "R_PAD", "HAS_DW", "HAS_DROPOUT", "SCALE_OUT", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_small}, reset_to_zero=["dw_ptr"], do_bench=tuning_bench,
                 cache_results=TUNE_CACHE)
@triton.jit
def _lora_rows_kernel(
    # pointers
    in_ptr, w_ptr, xa_ptr, out_ptr, dw_ptr,
    # sizes (M_BUCKET: the autotune key for M)
    M, N, R, M_BUCKET,
    # strides
    stride_im, stride_in, stride_wn, stride_wr, stride_xam, stride_xar,
    stride_om, stride_or, stride_dwn, stride_dwr,
    # dropout over the (M, N) input, the scale of the stored output and of the dW partials
    seed, threshold, out_scale, dw_scale,
    # meta-parameters
    HAS_DW: tl.constexpr, HAS_DROPOUT: tl.constexpr, SCALE_OUT: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One pass over an (M, N) input per block of BLOCK_M rows: out[M, R] (fp32) =
    out_scale * (mask * in) @ W (the product by out_scale only under SCALE_OUT, so a unit scale costs
    no registers) with W (N, R) read through its strides, kept in registers and
    stored once; with HAS_DW also dW += dw_scale * (mask * in)^T @ xa (fp32 atomics across row
    blocks; the scale rides on each partial, so the sum needs no separate scaling launch).

    Two jobs: the forward down-projection (in = x, W = A^T, the input dropout, out_scale =
    keep_scale: out = xa) and the backward g/dB pass (in = dY, W = B, HAS_DW, dropout only for an
    output-side dropout as Monarch's; out = g unscaled, dW = dB with dw_scale = s * keep_scale)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)  # padded rank: columns >= R load as zeros and are never stored
    m_ok = offs_m < M
    r_ok = offs_r < R
    rows = offs_m.to(tl.int64)
    if HAS_DW:
        xa = tl.load(xa_ptr + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        xa = to_rne(xa, in_ptr.dtype.element_ty, _INTERPRETER)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        a = tl.load(in_ptr + rows[:, None] * stride_im + offs_n[None, :] * stride_in,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep_tile(seed, offs_m, n0, N, threshold, BLOCK_N)
            a = tl.where(keep, a, tl.zeros_like(a))
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_r[None, :] * stride_wr,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _mma(a, w, acc, DOT_PRECISION)
        if HAS_DW:
            dw = _mma(tl.trans(a), xa, tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32), DOT_PRECISION) * dw_scale
            # relaxed: a plain reduction, nothing is ordered against it (the default acq_rel fences)
            tl.atomic_add(dw_ptr + offs_n[:, None] * stride_dwn + offs_r[None, :] * stride_dwr, dw,
                          mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
    if SCALE_OUT:
        acc = acc * out_scale
    tl.store(out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or, acc,
             mask=m_ok[:, None] & r_ok[None, :])


# reset_to_zero: the atomic dA target starts from zero on every autotune benchmark run
@triton.autotune(configs=_small_configs(_DA_TILES, ("BLOCK_M",)),
                 key=["M_BUCKET", "K", "R_PAD", "HAS_DROPOUT", "DETERMINISTIC", "DOT_PRECISION", "BLOCK_K"],
                 prune_configs_by={"early_config_prune": _prune_small}, reset_to_zero=["da_ptr"], do_bench=tuning_bench,
                 cache_results=TUNE_CACHE)
@triton.jit
def _lora_bwd_da_kernel(
    # pointers
    g_ptr, x_ptr, da_ptr,
    # sizes (M_BUCKET: the autotune key for M)
    M, K, R, rows_per_split, M_BUCKET,
    # strides (stride_das: between the per-split partials, DETERMINISTIC only)
    stride_gm, stride_gr, stride_xm, stride_xk, stride_das, stride_dar, stride_dak,
    # dropout and scaling (s * keep_scale(p))
    scale, seed, threshold,
    # meta-parameters
    DETERMINISTIC: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA[R, K] += scale * g^T @ (mask * x) over one split of the tokens. Grid (K blocks, splits):
    d_in / BLOCK_K programs alone would leave most SMs idle, so tokens are split and the
    partial sums meet in fp32 atomics, or (DETERMINISTIC) each split stores its own partial
    ``da[split]`` for a fixed-order sum afterwards."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    k_ok = offs_k < K
    r_ok = offs_r < R
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        rows = offs_m.to(tl.int64)
        # int64 columns too: RoSA passes x as a transposed view (stride_xk = T), and d_in * T can
        # pass 2**31
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep_tile(seed, offs_m, pid_k * BLOCK_K, K, threshold, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
        g_t = tl.load(g_ptr + offs_r[:, None] * stride_gr + rows[None, :] * stride_gm,
                      mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        acc = _mma(to_rne(g_t, x.dtype, _INTERPRETER), x, acc, DOT_PRECISION)
    acc = acc * scale
    if DETERMINISTIC:
        tl.store(da_ptr + pid_s * stride_das + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak, acc,
                 mask=r_ok[:, None] & k_ok[None, :])
    else:
        tl.atomic_add(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak, acc,
                      mask=r_ok[:, None] & k_ok[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------- launchers


def _m_bucket(m: int) -> int:
    """Autotune key for the token count: the next power of two, so varying sequence lengths reuse
    one tuning result instead of re-benchmarking every config for each new T."""
    return next_pow2(max(m, 1))


def _r_pad(r: int) -> int:
    return max(MIN_DOT, next_pow2(r))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's matmul precision (``highest`` -> exact fp32 "ieee", else TF32) so the
    kernel matches what a torch fp32 matmul would do; half types ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _dropout_args(p: float, seed: torch.Tensor, device: torch.device) -> tuple[bool, int, int, float]:
    """(HAS_DROPOUT, seed, integer threshold, keep scale ~ 1 / (1 - p)) of the shared mask spec
    (``reference._philox``) for launches on ``device``. Runs inside the custom ops only: the seed
    arrives as a one-element CPU tensor and is read here, where Dynamo does not trace."""
    if p == 0.0:
        return False, 0, 0, 1.0
    return True, host_seed(seed, device), drop_threshold(p), keep_scale(p)


def _seed_tensor(seed) -> torch.Tensor:
    """The seed as the one-element int64 tensor the custom ops take (an int is wrapped; a tensor
    from a module is passed through without being read, so no graph break)."""
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(torch.int64)
    if seed == 0:
        return _ZERO_SEED  # the no-dropout default: one shared tensor (never written), no allocation per call
    return torch.tensor([seed], dtype=torch.int64)


# the seed tensor of every call with seed 0 (Lily's primitives too): read only where there is dropout
# (as 0), never written. Made outside inference mode: a first import under torch.inference_mode()
# would otherwise make it an inference tensor, which no later training step could save for backward.
with torch.inference_mode(False):
    _ZERO_SEED = torch.zeros(1, dtype=torch.int64)


def _num_sms(device: torch.device) -> int:
    return sm_count(device) if device.type == "cuda" else 2


class _DeviceGuard:
    """Launch on the tensors' GPU, not the current one (multi-GPU processes)."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _tuned_launch(kernel, grid, args: tuple, kwargs: dict) -> None:
    """An autotuned kernel's launch (``_triton.launch_tuned``: parallel precompile on a new key,
    opt-in; the tuned config launched without the autotuner's per-call overhead)."""
    launch_tuned(kernel, grid, args, kwargs)


def _launch_rows(inp, w, xa, out, dw, dropout_p, seed, out_scale, dw_scale=1.0):
    """``_lora_rows_kernel``: ``out = out_scale * (mask * inp) @ w`` (fp32, ``w`` ``(N, r)`` read
    through its strides) and, when ``dw`` is given, ``dw += dw_scale * (mask * inp)^T @ xa``
    (atomics)."""
    M, N = inp.shape
    r = w.shape[1]
    if M == 0:
        return
    has_drop, seed, thr, _ = _dropout_args(dropout_p, seed, inp.device)
    has_dw = dw is not None
    r_pad = _r_pad(r)
    xa_args = (xa, xa.stride(0), xa.stride(1)) if has_dw else (out, 0, 0)  # never read without dw
    dw_args = (dw, dw.stride(0), dw.stride(1)) if has_dw else (out, 0, 0)
    with _DeviceGuard(inp.device):
        _tuned_launch(
            _lora_rows_kernel, lambda meta: (cdiv(M, meta["BLOCK_M"]),),
            (inp, w, xa_args[0], out, dw_args[0],
             M, N, r, _m_bucket(M),
             inp.stride(0), inp.stride(1), w.stride(0), w.stride(1), xa_args[1], xa_args[2],
             out.stride(0), out.stride(1), dw_args[1], dw_args[2],
             seed, thr, out_scale, dw_scale),
            dict(HAS_DW=has_dw, HAS_DROPOUT=has_drop, SCALE_OUT=out_scale != 1.0, R_PAD=r_pad,
                 DOT_PRECISION=_dot_precision(inp.dtype)),
        )


@custom_op("peft_kernels::lora_down", mutates_args=())
def _lora_down(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """xa = dropout(x) @ A^T in fp32, (T, r)."""
    T, K = x.shape
    r = lora_A.shape[0]
    xa = torch.empty((T, r), device=x.device, dtype=torch.float32)
    if T == 0:
        return xa
    _launch_rows(x, lora_A.t(), None, xa, None, dropout_p, seed, keep_scale(dropout_p))
    return xa


@_lora_down.register_fake
def _(x, lora_A, dropout_p, seed):
    return x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)


def _launch_gemm(x, w, c, left, right, bias, scale, dropout_p, seed, out):
    """The fused GEMM kernel into ``out`` (which may be ``c`` itself: each program reads its
    ``c`` tile before writing the same ``out`` tile, so the add-only pass can run in place)."""
    M, N = out.shape
    K = x.shape[1] if x is not None else 0
    R = left.shape[1]
    if M == 0 or N == 0:
        return out
    has_drop, seed, thr, _ = _dropout_args(dropout_p, seed, out.device)
    if bias is not None:
        bias = bias.contiguous()  # read as bias_ptr + col (no stride argument); a no-op normally
    has_gemm = x is not None
    dummy = left  # never read: the matching HAS_* flag is False
    xs = (x.stride(0), x.stride(1)) if has_gemm else (0, 0)
    ws = (w.stride(0), w.stride(1)) if has_gemm else (0, 0)
    cs = (c.stride(0), c.stride(1)) if c is not None else (0, 0)

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    with _DeviceGuard(left.device):
        _tuned_launch(
            _lora_gemm_kernel, grid,
            (x if has_gemm else dummy, w if has_gemm else dummy, c if c is not None else dummy,
             left, right, bias if bias is not None else dummy, out,
             M, N, K, R, _m_bucket(M),
             *xs, *ws, *cs,
             left.stride(0), left.stride(1), right.stride(0), right.stride(1), out.stride(0), out.stride(1),
             scale, seed, thr),
            dict(HAS_GEMM=has_gemm, HAS_C=c is not None, HAS_BIAS=bias is not None, HAS_DROPOUT=has_drop,
                 R_BLOCK=_r_block(R), DOT_PRECISION=_dot_precision(right.dtype)),
        )
    return out


def _tma_layout(w: torch.Tensor) -> Optional[bool]:
    """How ``w`` (K, N) is stored, for a descriptor: True = a transposed view of a row-major (N, K)
    matrix (the forward's W0^T), False = row-major (K, N) itself (dX's W0), None = neither.
    The (N, K) reading is tried first: it is the forward's, and a tensor with a size-1 dim
    satisfies both."""
    if w.stride(0) == 1 and (w.shape[1] == 1 or w.stride(1) == w.shape[0]):
        return True
    if w.stride(1) == 1 and (w.shape[0] == 1 or w.stride(0) == w.shape[1]):
        return False
    return None


def tma_eligible(x: Optional[torch.Tensor], w: Optional[torch.Tensor], out_dtype: torch.dtype) -> bool:
    """Whether ``base="tma"`` can run ``x @ w``: a Hopper-or-newer GPU (or the interpreter, which
    emulates descriptor loads); x and w of one dtype in fp16/bf16/fp32 (fp32 only with TF32 dots:
    ``torch.set_float32_matmul_precision("high")``), x row-major and w a
    transposed or plain row-major matrix (``_tma_layout``), both with 16-byte aligned data pointers
    and row strides (TMA's rule, checked by TensorDescriptor too), no empty dimension."""
    if x is None or w is None or x.dtype != w.dtype or x.dtype not in TMA_DTYPES or out_dtype not in TMA_DTYPES:
        return False
    if x.device.type == "cuda":
        if sm_major(x.device) < 9:
            return False
    elif not dispatch.interpreter_enabled():
        return False
    if x.dtype == torch.float32 and _dot_precision(x.dtype) != "tf32":
        # exact fp32 ("highest", torch's default) has no tensor-core path: the dot runs on FMA units,
        # and compiled for sm_90 its TMA variant spilled 8-48 KB per thread reading the transposed
        # W0 tiles (ptxas -v; the pointer kernel spills < 1 KB there)
        return False
    if min(x.shape) == 0 or min(w.shape) == 0 or _tma_layout(w) is None:
        return False
    item = x.element_size()
    row = lambda t: max(t.stride(0), t.stride(1))  # the leading stride of a row-major or transposed matrix
    return (x.stride(1) == 1 and x.stride(0) == x.shape[1]
            and all(t.data_ptr() % TMA_ALIGN == 0 and row(t) * item % TMA_ALIGN == 0 for t in (x, w)))


def _launch_gemm_tma(x, w, c, left, right, bias, scale, dropout_p, seed, out):
    """The TMA GEMM kernel into a fresh ``out`` (``tma_eligible`` holds). The descriptors are
    made here with a placeholder block shape; the autotuner's pre_hook (``_set_tma_blocks``) sets
    the real one per config, before each run."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, N = out.shape
    K = x.shape[1]
    R = left.shape[1]
    if M == 0 or N == 0:
        return out
    has_drop, seed, thr, _ = _dropout_args(dropout_p, seed, out.device)
    if bias is not None:
        bias = bias.contiguous()
    w_nk = _tma_layout(w)
    dummy = left  # never read: the matching HAS_* flag is False
    cs = (c.stride(0), c.stride(1)) if c is not None else (0, 0)
    x_desc = TensorDescriptor.from_tensor(x, [MIN_DOT, MIN_DOT])
    # W0 as stored: (N, K) row-major for the forward's W0^T view, (K, N) row-major for dX
    w_desc = TensorDescriptor.from_tensor(w.t() if w_nk else w, [MIN_DOT, MIN_DOT])

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    with _DeviceGuard(left.device):
        _tuned_launch(
            _lora_gemm_tma_kernel, grid,
            (x_desc, w_desc,
             c if c is not None else dummy, left, right, bias if bias is not None else dummy, out,
             M, N, K, R, _m_bucket(M), x.element_size(),
             *cs, left.stride(0), left.stride(1), right.stride(0), right.stride(1), out.stride(0), out.stride(1),
             scale, seed, thr),
            dict(W_NK=w_nk, HAS_C=c is not None, HAS_BIAS=bias is not None, HAS_DROPOUT=has_drop,
                 R_BLOCK=_r_block(R), DOT_PRECISION=_dot_precision(right.dtype)),
        )
    return out


# The add-only pass (cuBLAS base) adds into its output in place, so it must not be autotuned: the
# autotuner benchmarks every config on the live arguments and each run would add the LoRA term
# again. It is memory-bound; one fixed tile (interpreter: the interpreter's tile).
def _add_only_config() -> dict:
    if dispatch.interpreter_enabled():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)


def _launch_add_only(c, left, right, scale, dropout_p, seed):
    """``c += scale * mask * (left @ right)`` in place, with the fixed add-only tile."""
    M, N = c.shape
    R = left.shape[1]
    if M == 0 or N == 0:
        return c
    has_drop, seed, thr, _ = _dropout_args(dropout_p, seed, c.device)
    cfg = _add_only_config()
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    with _DeviceGuard(left.device):
        _lora_gemm_kernel.fn[grid](
            left, left, c, left, right, left, c,
            M, N, 0, R, _m_bucket(M),
            0, 0, 0, 0, c.stride(0), c.stride(1),
            left.stride(0), left.stride(1), right.stride(0), right.stride(1), c.stride(0), c.stride(1),
            scale, seed, thr,
            HAS_GEMM=False, HAS_C=True, HAS_BIAS=False, HAS_DROPOUT=has_drop,
            R_BLOCK=_r_block(R), DOT_PRECISION=_dot_precision(right.dtype), **cfg,
        )
    return c


def _gemm_with_base(x, w, c, left, right, bias, scale, dropout_p, seed, out_dtype, base):
    """One resolved base (``triton``, ``cublas`` or ``tma``) of ``_lora_gemm``; ``tma`` where
    ``tma_eligible`` does not hold runs as ``triton`` (same epilogue, pointer loads)."""
    M, N = left.shape[0], right.shape[1]
    if x is not None and base == "cublas":
        # frozen product on cuBLAS in the operands' dtype (autocast off: it would silently change the
        # precision inside the op), bias folded into it; the LoRA term is then added in place
        with torch.autocast(x.device.type, enabled=False):
            y0 = torch.mm(x, w) if bias is None else torch.addmm(bias.to(x.dtype), x, w)
        if c is not None:
            y0 += c
        if y0.dtype != out_dtype:
            y0 = y0.to(out_dtype)
        return _launch_add_only(y0, left, right, scale, dropout_p, seed)
    if x is None:  # add-only on a caller's c: on a copy, the caller's tensor stays as it was
        return _launch_add_only(c.to(out_dtype, copy=True), left, right, scale, dropout_p, seed)
    out = torch.empty((M, N), device=left.device, dtype=out_dtype)
    if base == "tma" and tma_eligible(x, w, out_dtype):
        return _launch_gemm_tma(x, w, c, left, right, bias, scale, dropout_p, seed, out)
    return _launch_gemm(x, w, c, left, right, bias, scale, dropout_p, seed, out)


# Base chosen by measurement (``base="auto"``), per key; ``base_decisions()`` exposes it.
_AUTO_CHOICE: dict = {}
_AUTO_TIMES: dict = {}
_AUTO_ERRORS: dict = {}  # key -> {base: error} for bases that raised on their first call (left out)
AUTO_ROUNDS = 5  # timing rounds, the two bases interleaved in each
AUTO_CALLS = 3  # back-to-back calls per timed sample (launch latency amortised, as in training)


def _auto_key(x, w, c, left, right, bias, dropout_p, out_dtype) -> tuple:
    """What a base decision is valid for: device, dtypes, dot precision, token bucket (as the
    autotuner keys), GEMM sizes, the padded rank (the epilogue's cost), and the flags and operand
    layouts that change the kernel, and whether the TMA base can run (alignment: which bases compete)."""
    M, K = x.shape
    return (str(x.device), x.dtype, out_dtype, _dot_precision(right.dtype), _m_bucket(M), right.shape[1], K,
            _r_pad(left.shape[1]), dropout_p > 0, bias is not None, c is not None, w.stride(0) == 1,
            right.stride(0) == 1, tma_eligible(x, w, out_dtype))


def _time_ms(fns: dict) -> dict:
    """Per-call time (ms) of each callable: two warm-up calls each (the first compiles and
    autotunes the Triton kernel), then ``AUTO_ROUNDS`` rounds that time ``AUTO_CALLS``
    back-to-back calls of every callable in turn (interleaved, so clock drift hits both alike);
    the median per callable."""
    for fn in fns.values():
        fn()
        fn()
    samples = {name: [] for name in fns}
    for _ in range(AUTO_ROUNDS):
        for name, fn in fns.items():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(AUTO_CALLS):
                fn()
            stop.record()
            stop.synchronize()
            samples[name].append(start.elapsed_time(stop) / AUTO_CALLS)
    return {name: sorted(t)[len(t) // 2] for name, t in samples.items()}


def _auto_base(x, w, c, left, right, bias, scale, dropout_p, seed, out_dtype, timer=None) -> str:
    """``triton``, ``cublas`` or ``tma`` for this call: the cached decision for its key, else the
    eligible bases (``tma`` only where ``tma_eligible`` holds) timed on the call's own operands (same
    output either way, up to the base product's summation order and one more rounding of it on the
    cuBLAS path) and the fastest kept. ``timer`` maps ``{base: callable}`` to ``{base: ms}``.
    Off a CUDA device (the interpreter) nothing is measured: ``triton`` (the path the tests must
    cover). While a CUDA graph is being captured nothing can be timed: an error asks for an
    uncaptured warm-up step unless a decision exists. ``PEFT_KERNELS_AUTO_BASES`` narrows the
    candidates; a candidate that raises on its first call is left out (its error, no time)."""
    key = _auto_key(x, w, c, left, right, bias, dropout_p, out_dtype)
    hit = _AUTO_CHOICE.get(key)
    if hit is not None:
        return hit
    if deterministic():
        # a timing decision can differ between processes, and the bases differ in the last bits:
        # bit-reproducibility across runs needs one fixed base (like cudnn.benchmark off)
        return "triton" if "triton" in auto_bases() else "cublas"
    if timer is None:
        if x.device.type != "cuda":
            return "triton"
        if capturing(x.device):  # the operands' GPU's stream, not the current device's
            # nothing can be timed, and a base that never ran in this process would load its
            # kernel inside the capture, which CUDA forbids
            raise RuntimeError(CAPTURE_WARMUP_MSG)
        timer = _time_ms
    bases = [b for b in auto_bases() if b != "tma" or tma_eligible(x, w, out_dtype)]
    fns = {b: (lambda b=b: _gemm_with_base(x, w, c, left, right, bias, scale, dropout_p, seed, out_dtype, b))
           for b in bases}
    errors = {}
    with _DeviceGuard(x.device):  # events and launches on the operands' GPU, not the current one
        for b in bases:
            # the first call compiles and autotunes; a base that raises there (a path that cannot
            # run on this device or build) leaves the race instead of failing every default call
            try:
                fns[b]()
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - reported in base_decisions() and warned about
                if len(fns) == 1:
                    raise
                errors[b] = f"{type(e).__name__}: {e}"
                del fns[b]
                warnings.warn(f"peft_kernels: base={b!r} failed on its first call and is left out of base='auto' "
                              f"for this shape ({errors[b]})", RuntimeWarning, stacklevel=2)
        times = timer(fns)
    choice = min(fns, key=lambda b: times[b])  # a failed base has no time, only its error
    _AUTO_CHOICE[key] = choice
    _AUTO_TIMES[key] = times
    if errors:
        _AUTO_ERRORS[key] = errors
    return choice


_AUTO_BASES_SEEN: dict = {}  # raw env value -> its checked tuple (base_mode asks on every call)


def auto_bases() -> tuple:
    """The bases ``base="auto"`` may pick from: ``PEFT_KERNELS_AUTO_BASES`` (a comma list), else all."""
    raw = os.environ.get(AUTO_BASES_ENV, "").strip()
    if not raw:
        return BASES
    seen = _AUTO_BASES_SEEN.get(raw)
    if seen is not None:
        return seen
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    for n in names:
        check_choice(AUTO_BASES_ENV, n, BASES)
    if "triton" not in names and "cublas" not in names:
        # tma is not eligible everywhere (alignment, pre-Hopper): one of the others must remain
        raise ValueError(f"{AUTO_BASES_ENV} must include 'triton' or 'cublas' (tma cannot run every shape), "
                         f"got {raw!r}")
    _AUTO_BASES_SEEN[raw] = names
    return names


def base_decisions() -> list[dict]:
    """Every ``base="auto"`` decision taken in this process, with each timed base's time (ms)."""
    names = ("device", "dtype", "out_dtype", "dot_precision", "tokens_bucket", "N", "K", "r_pad", "dropout", "bias",
             "c", "w_transposed", "right_transposed", "tma_eligible")
    return [dict(zip(names, key), choice=_AUTO_CHOICE[key], **{f"{b}_ms": t for b, t in times.items()},
                 **{f"{b}_error": e for b, e in _AUTO_ERRORS.get(key, {}).items()})
            for key, times in _AUTO_TIMES.items()]


@custom_op("peft_kernels::lora_gemm", mutates_args=())
def _lora_gemm(x: Optional[torch.Tensor], w: Optional[torch.Tensor], c: Optional[torch.Tensor],
               left: torch.Tensor, right: torch.Tensor, bias: Optional[torch.Tensor],
               scale: float, dropout_p: float, seed: torch.Tensor, out_dtype: torch.dtype,
               base: str) -> torch.Tensor:
    """out (M, N) = [x @ w] [+ c] + scale * dropout_mask(M, N) * (left @ right) [+ bias].

    ``w`` and ``right`` are read through their strides, so transposed views (W0^T, B^T) cost
    nothing. ``x``/``w`` absent = add-only mode on top of ``c``. ``base`` says who computes
    ``x @ w``: ``triton`` (this kernel, LoRA term in its epilogue, output written once), ``tma``
    (the same with TMA tile loads, where ``tma_eligible``; else ``triton``),
    ``cublas`` (``torch.mm``/``addmm``, then this kernel adds the LoRA term in place: one more
    read and write of the output) or ``auto`` (``_auto_base``: measured once per shape)."""
    if x is not None and base == "auto":
        base = _auto_base(x, w, c, left, right, bias, scale, dropout_p, seed, out_dtype)
    return _gemm_with_base(x, w, c, left, right, bias, scale, dropout_p, seed, out_dtype, base)


@_lora_gemm.register_fake
def _(x, w, c, left, right, bias, scale, dropout_p, seed, out_dtype, base):
    return left.new_empty((left.shape[0], right.shape[1]), dtype=out_dtype)


def deterministic() -> bool:
    """Whether the weight-gradient reductions must be run-to-run reproducible:
    ``torch.use_deterministic_algorithms(True)`` asks for it (then no fp32 atomics: per-split
    partials summed in a fixed order, at the price of one more pass over dY for dB)."""
    return torch.are_deterministic_algorithms_enabled()


def _launch_da(g, x, total_scale, dropout_p, seed, deterministic_sum, out=None):
    """``total_scale * g^T @ (mask * x)`` fp32 ``(r, K)``, tokens split over programs; into
    ``out`` (an fp32 ``(r, K)`` view, possibly strided) when given, else into a new tensor. The
    atomic path adds into ``out`` (zero it first); the deterministic one overwrites it."""
    M, K = x.shape
    r = g.shape[1]
    if out is None:
        out = torch.zeros((r, K), device=x.device, dtype=torch.float32)
    if M == 0 or K == 0 or r == 0:
        return out
    has_drop, seed, thr, _ = _dropout_args(dropout_p, seed, x.device)
    r_pad = _r_pad(r)
    block_k = 32 if dispatch.interpreter_enabled() else _DA_BLOCK_K
    # splits are fixed here, before the autotuner picks BLOCK_M: whole multiples of the largest
    # candidate BLOCK_M (a split's last block is masked anyway), enough programs for ~4 waves
    gran = 32 if dispatch.interpreter_enabled() else max(t[0] for t in _DA_TILES)
    k_blocks = cdiv(K, block_k)
    m_blocks = cdiv(M, gran)
    splits = max(1, min(m_blocks, cdiv(4 * _num_sms(x.device), k_blocks)))
    rows_per_split = cdiv(m_blocks, splits) * gran
    splits = cdiv(M, rows_per_split)
    target = torch.empty((splits, r, K), device=x.device, dtype=torch.float32) if deterministic_sum else out
    strides = target.stride() if deterministic_sum else (0, *out.stride())
    with _DeviceGuard(x.device):
        _tuned_launch(
            _lora_bwd_da_kernel, (k_blocks, splits),
            (g, x, target,
             M, K, r, rows_per_split, _m_bucket(M),
             g.stride(0), g.stride(1), x.stride(0), x.stride(1), *strides,
             total_scale, seed, thr),
            dict(DETERMINISTIC=deterministic_sum, HAS_DROPOUT=has_drop, R_PAD=r_pad,
                 DOT_PRECISION=_dot_precision(x.dtype), BLOCK_K=block_k),
        )
    if deterministic_sum:
        torch.sum(target, 0, out=out)
    return out


@custom_op("peft_kernels::lora_bwd_gb", mutates_args=())
def _lora_bwd_gb(dy: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor,
                 dropout_p: float, seed: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(g = dY' @ B fp32 (T, r), dY'^T @ xa fp32 (d_out, r), unscaled) in one pass over dY, where
    dY' = dY, or mask(T, d_out) * dY for an output-side dropout (``dropout_p > 0``; the keep scale
    is the caller's). ``deterministic``: dB without atomics, from a second pass over dY (the dA
    kernel with ``g = xa``, ``x = dY``: the same product, transposed, split-partials summed in a fixed
    order)."""
    M, N = dy.shape
    r = lora_B.shape[1]
    g = torch.empty((M, r), device=dy.device, dtype=torch.float32)
    if M == 0:
        return g, torch.zeros((N, r), device=dy.device, dtype=torch.float32)
    if deterministic:
        _launch_rows(dy, lora_B, None, g, None, dropout_p, seed, 1.0)
        return g, _launch_da(xa, dy, 1.0, dropout_p, seed, True).t().contiguous()
    db = torch.zeros((N, r), device=dy.device, dtype=torch.float32)
    _launch_rows(dy, lora_B, xa, g, db, dropout_p, seed, 1.0)
    return g, db


@_lora_bwd_gb.register_fake
def _(dy, lora_B, xa, dropout_p, seed, deterministic=False):
    r = lora_B.shape[1]
    return (dy.new_empty((dy.shape[0], r), dtype=torch.float32),
            dy.new_empty((dy.shape[1], r), dtype=torch.float32))


@custom_op("peft_kernels::lora_bwd", mutates_args=())
def _lora_bwd(dy: torch.Tensor, x: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scale_b: float,
              scale_a: float, p_in: float, p_out: float, seed: torch.Tensor, need_b: bool, need_a: bool,
              deterministic: bool = False, scale_g: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter half of the LoRA backward, before dX: ``(g, grads)`` with ``g = scale_g * dY' @ B``
    fp32 ``(T, r)`` (dY' = dY, or ``mask_out * dY`` for an output-side dropout ``p_out``) and
    ``grads`` ONE flat fp32 buffer holding, in order, ``dB = scale_b * dY'^T @ xa`` ``(d_out, r)``
    (``need_b``) and ``dA = scale_a * keep_scale(p_in) * g^T @ (mask_in * x)`` ``(r, d_in)``
    (``need_a``); ``adapter_grads`` splits it. One buffer: one memset for both atomic targets and,
    in the caller, one cast to the parameters' dtype. Kernels: the rows kernel (g, and dB through
    atomics with the scale on each partial) and the dA kernel. ``deterministic``: no atomics; dB
    from the dA kernel run on ``(xa, dY)`` (one more pass over dY), partials summed in a fixed
    order."""
    M, N = dy.shape
    r = lora_B.shape[1]
    K = x.shape[1]
    n_b, n_a = (N * r if need_b else 0), (r * K if need_a else 0)
    ws = (torch.empty if deterministic else torch.zeros)((n_b + n_a,), device=dy.device, dtype=torch.float32)
    db = ws[:n_b].view(N, r) if need_b else None
    da = ws[n_b:].view(r, K) if need_a else None
    g = torch.empty((M, r), device=dy.device, dtype=torch.float32)
    if M == 0:
        ws.zero_()
        return g, ws
    if deterministic:
        _launch_rows(dy, lora_B, None, g, None, p_out, seed, scale_g)
        if need_b:
            _launch_da(xa, dy, scale_b, p_out, seed, True, out=db.t())
    else:
        _launch_rows(dy, lora_B, xa if need_b else None, g, db if need_b else None, p_out, seed, scale_g, scale_b)
    if need_a:
        _launch_da(g, x, scale_a * keep_scale(p_in), p_in, seed, deterministic, out=da)
    return g, ws


@_lora_bwd.register_fake
def _(dy, x, lora_B, xa, scale_b, scale_a, p_in, p_out, seed, need_b, need_a, deterministic=False, scale_g=1.0):
    r = lora_B.shape[1]
    n = (dy.shape[1] * r if need_b else 0) + (r * x.shape[1] if need_a else 0)
    return dy.new_empty((dy.shape[0], r), dtype=torch.float32), dy.new_empty((n,), dtype=torch.float32)


def adapter_grads(grads: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, need_a: bool,
                  need_b: bool, dtypes: Optional[tuple] = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dA, dB)`` in the parameters' dtypes (``dtypes``, default those of ``lora_A``/``lora_B``)
    from ``_lora_bwd``'s flat fp32 buffer, with one cast for both where they share a dtype (none
    for fp32 parameters): the two gradients are then views of one storage (autograd accepts them
    as ``.grad`` as they are: dense, with the parameters' strides)."""
    (d_out, r), d_in = lora_B.shape, lora_A.shape[1]
    n_b = d_out * r if need_b else 0
    a_dtype, b_dtype = dtypes or (lora_A.dtype, lora_B.dtype)
    if a_dtype == b_dtype:
        grads = grads.to(a_dtype)
        ga = gb = grads
    else:
        ga, gb = grads.to(a_dtype), grads.to(b_dtype)
    db = gb[:n_b].view(d_out, r) if need_b else None
    da = ga[n_b:].view(r, d_in) if need_a else None
    return da, db


# ----------------------------------------------------------------------------------------- autograd


def base_mode(base: Optional[str] = None) -> str:
    """The base-GEMM path: the argument, else ``PEFT_KERNELS_BASE``, else ``DEFAULT_BASE``."""
    chosen = base or os.environ.get(BASE_ENV, "").strip() or DEFAULT_BASE
    chosen = check_choice("base" if base else BASE_ENV, chosen, BASE_MODES)
    if chosen == "auto":
        auto_bases()  # a bad PEFT_KERNELS_AUTO_BASES fails here, before any launch
    return chosen


class LoRAFunction(torch.autograd.Function):
    """Fused low-rank linear ``y = x W0^T (+ b) + s * D(x A^T B^T)`` over 2-D ``(T, d_in)`` input;
    ``weight`` (W0) is frozen: its gradient is only computed (by one cuBLAS GEMM, outside the
    fused path) when it requires grad.

    ``output_dropout=False`` (LoRA): ``D`` drops elements of ``x`` before ``A``.
    ``output_dropout=True`` (Monarch's placement, which reuses these kernels through dense
    expansions of its factors): ``D`` drops elements of the ``(T, d_out)`` adapter output. Same
    mask spec either way, over the tensor it applies to.

    ``xa`` given (a shared-input group's member, no dropout): the down-projection ``x A^T`` was
    computed for the whole group by ``LoRAGroupDownFunction``, which also owns dA; ``lora_A``
    (detached) only serves the dX epilogue, and the gradient returned for ``xa`` is
    ``s * dY B``.

    ``lora_A``/``lora_B`` may be in another float dtype than x (fp32 adapter weights on a bf16
    model, the default): the kernels read copies in x's dtype (tiny, made here), and dA/dB come
    back in the parameters' own dtypes straight from the fp32 reduction buffer: no rounding of
    fp32 gradients through bf16 and no cast kernels in autograd's graph."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, base, output_dropout=False,
                xa=None):
        x = x.contiguous()
        ctx.adapter_dtypes = (lora_A.dtype, lora_B.dtype)
        lora_A = lora_A.to(x.dtype).contiguous()
        lora_B = lora_B.to(x.dtype)
        p_in, p_out = (0.0, dropout_p) if output_dropout else (dropout_p, 0.0)
        ctx.grouped = xa is not None
        if xa is None:
            xa = _lora_down(x, lora_A, p_in, seed)
        elif dropout_p != 0.0:
            raise ValueError("a precomputed xa (shared-input group) takes dropout_p = 0")
        s_out = scaling * keep_scale(p_out)  # keep_scale(0) == 1
        # B^T is an (r, d_out) view read through strides
        y = _lora_gemm(x, weight.t(), None, xa, lora_B.t(), bias, s_out, p_out, seed, x.dtype, base)
        # the seed is a tensor: saved like one, so compiled autograd carries it to backward
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
        ctx.scaling, ctx.p_in, ctx.p_out, ctx.base = scaling, p_in, p_out, base
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
        s, p_in, p_out = ctx.scaling, ctx.p_in, ctx.p_out
        # every mask's keep scale rides on the LoRA scale (1.0 when there is no dropout)
        s = s * keep_scale(p_out)
        dy = dy.contiguous()
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dx = dw = da = db = dbias = dxa = None
        if ctx.grouped:  # g = s * dY B is xa's gradient; dA is the group's (one pass over x for all)
            need_xa = ctx.needs_input_grad[10]
            g, grads = _lora_bwd(dy, x, lora_B, xa, s, s, 0.0, 0.0, seed, need_b, False, deterministic(), s)
            _, db = adapter_grads(grads, lora_A, lora_B, False, need_b, ctx.adapter_dtypes)
            if need_x:
                dx = _lora_gemm(dy, weight, None, g, lora_A, None, 1.0, 0.0, seed, dy.dtype, ctx.base)
            dxa = g if need_xa else None
        else:
            g, grads = _lora_bwd(dy, x, lora_B, xa, s, s, p_in, p_out, seed, need_b, need_a, deterministic())
            da, db = adapter_grads(grads, lora_A, lora_B, need_a, need_b, ctx.adapter_dtypes)
            if need_x:
                dx = _lora_gemm(dy, weight, None, g, lora_A, None, s * keep_scale(p_in), p_in, seed, dy.dtype,
                                ctx.base)
        if need_w:
            dw = torch.mm(dy.t(), x).to(weight.dtype)
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, dw, da, db, dbias, None, None, None, None, None, dxa


class LoRAGroupDownFunction(torch.autograd.Function):
    """The down-projections of LoRA layers that read one input (q/k/v, gate/up): ``xa_i = x A_i^T``
    (fp32 ``(T, r_i)``) for every member in ONE pass over x, and in backward every ``dA_i =
    dxa_i^T x`` in one pass over x (the members' ``LoRAFunction``s, given ``xa_i``, return
    ``dxa_i = s_i dY_i B_i``). No gradient for x here: each member's dX GEMM already adds its
    ``s_i g_i A_i`` term in its epilogue. No dropout (each member would need its own mask of x).

    forward(x2 (T, d_in), A_1, ..., A_n) -> (xa_1, ..., xa_n), column views of one (T, sum r_i)
    buffer."""

    @staticmethod
    def forward(ctx, x2, *lora_As):
        x2 = x2.contiguous()
        ranks = [a.shape[0] for a in lora_As]
        a_cat = torch.cat([a.to(x2.dtype) for a in lora_As], dim=0)
        xa = _lora_down(x2, a_cat, 0.0, _ZERO_SEED)
        ctx.set_materialize_grads(False)  # an unused member's xa gets None (its A no gradient), not zeros
        ctx.save_for_backward(x2)
        ctx.ranks, ctx.dtypes = ranks, [a.dtype for a in lora_As]
        return tuple(xa.split(ranks, dim=1))

    @staticmethod
    @first_order_only
    def backward(ctx, *dxas):
        (x2,) = ctx.saved_tensors
        need = [d is not None and ctx.needs_input_grad[1 + i] for i, d in enumerate(dxas)]
        if not any(need):
            return (None, *[None] * len(dxas))
        T, ranks = x2.shape[0], ctx.ranks
        g = torch.cat([d if d is not None else x2.new_zeros((T, r), dtype=torch.float32)
                       for d, r in zip(dxas, ranks)], dim=1)
        det = deterministic() and T > 0  # T = 0: nothing is written, so the zeros must be there
        da = (torch.empty if det else torch.zeros)((sum(ranks), x2.shape[1]), device=x2.device, dtype=torch.float32)
        _launch_da(g, x2, 1.0, 0.0, _ZERO_SEED, det, out=da)
        cast = {dt: da.to(dt) for dt in set(ctx.dtypes)}  # one cast for members sharing a dtype
        out, off = [], 0
        for r, dt, want in zip(ranks, ctx.dtypes, need):
            out.append(cast[dt][off:off + r] if want else None)
            off += r
        return (None, *out)


# ----------------------------------------------------------------------------------------- public


dispatch.register("lora", "triton")
dispatch.register("lora", "torch")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
    impl: Optional[str] = None,
    *,
    base: Optional[str] = None,
    xa: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x @ W0^T (+ b) + scaling * dropout(x) @ A^T @ B^T`` over any leading dims of ``x``.

    ``xa``: this layer's ``x @ A^T`` from ``lora_group_down`` (layers sharing one input; no
    dropout), used on the Triton path instead of a pass over x (the group then owns dA). The torch
    path ignores it (and computes the same function, with dA itself).

    ``impl`` picks ``triton`` / ``torch`` (default: dispatch). ``base`` (``triton``/``cublas``/``tma``/
    ``auto``, default ``PEFT_KERNELS_BASE`` or ``auto``) picks who runs the base GEMM on the Triton
    path (see the module docstring). Under autocast the Triton path runs in the autocast dtype: x, W0
    and the bias are cast first (differentiable casts), the adapter weights are read in that dtype
    by ``LoRAFunction``, which returns their gradients in their own (fp32 weights: fp32 gradients,
    no cast nodes). ``seed`` is an int or a
    one-element integer tensor; a tensor is never read here (only inside the custom ops, or by
    tensor ops on the torch path), so ``torch.compile`` traces dropout without a graph break."""
    check_lora_args(x, weight, lora_A, lora_B, bias, dropout_p, seed, scaling)
    dropout_p = float(dropout_p)
    scaling = float(scaling)
    d_out, d_in = weight.shape
    dtype = dispatch.compute_dtype(x)
    chosen = dispatch.choose("lora", x.device, dtype, impl)
    if chosen == "triton" and lora_A.shape[0] > MAX_RANK:
        if dispatch.is_forced("lora", impl):
            raise ValueError(f"lora_A has rank {lora_A.shape[0]}; the fused kernels take r <= {MAX_RANK}")
        chosen = "torch"  # picked by default only: fall back rather than fail
    mode = base_mode(base)  # a bad choice fails whichever path runs
    if chosen == "torch":
        # the autocast dtype under autocast, as the fused path and F.linear give (the reference
        # returns x's dtype); otherwise a no-op
        return dispatch.in_dtype(lora_reference(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed), dtype)
    seed = _seed_tensor(seed)
    if xa is not None:
        if dropout_p != 0.0:
            raise ValueError(f"xa (a shared-input group's down-projection) needs dropout_p = 0, got {dropout_p}")
        check_tensor("xa", xa, shape=(x.numel() // max(d_in, 1), lora_A.shape[0]), dtypes=(torch.float32,))
    with torch.autocast(x.device.type, enabled=False):
        # x, W0 and the bias in the compute dtype (differentiable casts); lora_A/lora_B as they are:
        # LoRAFunction reads them in x's dtype and returns their gradients in their own
        x2, w, b = (t if t is None or t.dtype == dtype else t.to(dtype) for t in (x, weight, bias))
        x2 = x2.reshape(-1, d_in)
        a = lora_A if xa is None else lora_A.detach()  # grouped: dA comes from the group's pass
        y = LoRAFunction.apply(x2, w, a, lora_B, b, scaling, dropout_p, seed, mode, False, xa)
    return y.reshape(*x.shape[:-1], d_out)


def lora_group_down(x: torch.Tensor, lora_As: Sequence[torch.Tensor], impl: Optional[str] = None
                    ) -> Optional[list[torch.Tensor]]:
    """``[x @ A_i^T]`` (fp32 ``(T, r_i)``, T = every leading dim of x) for LoRA layers that read the
    same ``x``, in one pass over x (``LoRAGroupDownFunction``; dA for all of them in one pass in
    backward); pass each to its layer's ``lora_linear(..., xa=)``. None where the fused path would
    not run (dispatch picks torch, the members' ranks summing above ``MAX_RANK``): the layers then
    run on their own.

    Only for that use: the outputs carry gradients to the A's but NOT to x (each layer's fused
    dX adds its ``s g A`` term itself), so any other use of them loses x's gradient."""
    check_tensor("x", x, min_ndim=1)
    d_in = x.shape[-1]
    if not lora_As:
        raise ValueError("lora_As must hold at least one lora_A")
    for i, a in enumerate(lora_As):
        check_tensor(f"lora_As[{i}]", a, shape=(None, d_in))
        check_same_device(x=x, **{f"lora_As[{i}]": a})
    return _group_down(x, lora_As, impl)


def _group_down(x: torch.Tensor, lora_As: Sequence[torch.Tensor], impl: Optional[str]) -> Optional[list]:
    """``lora_group_down`` after its argument checks (a ``SharedInputGroup`` calls it directly: its
    members' A's are checked module parameters)."""
    d_in = x.shape[-1]
    dtype = dispatch.compute_dtype(x)
    # the group's kernels run at the summed rank: above MAX_RANK (q/k/v at r = 128: 384, padded to
    # 512) their tiles would not fit the register budget the single-layer kernels are sized for, so
    # the members run alone (one pass over x each) instead
    if (dispatch.choose("lora", x.device, dtype, impl) != "triton"
            or sum(a.shape[0] for a in lora_As) > MAX_RANK):
        return None
    with torch.autocast(x.device.type, enabled=False):
        x2 = (x if x.dtype == dtype else x.to(dtype)).reshape(-1, d_in)
        return list(LoRAGroupDownFunction.apply(x2, *lora_As))
