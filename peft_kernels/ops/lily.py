"""Router-weighted projector mixing (Lily; FLoE's MoE-LoRA experts) as fused Triton kernels.

Math (GUIDE.md "Lily exactly", spec in ``peft_kernels/reference/lily.py``), for 2-D ``x`` ``(T, d_in)``:
``h = x @ LP^T`` ``(T, r)``; logits from ``h`` (Lily, router ``(E, r)``) or ``x`` (MoE-LoRA, router
``(E, d_in)``); ``p = softmax(logits)`` in fp32 ``(T, E)``; HP ``(E, d_out, r)``.

- ``routing="token"``: ``delta = s * Z @ HPcat^T`` with ``Z[t, e*r + j] = p[t, e] * h[t, j]`` and
  ``HPcat[o, e*r + j] = HP[e, o, j]``: one low-rank product with ``K = E*r``; the ``(T, E, d_out)``
  per-expert outputs never exist.
- ``routing="batch"`` (HF PEFT's ``lily``): ``w = mean_t p`` ``(E,)``, ``HPbar = sum_e w_e HP_e``,
  ``delta = s * h @ HPbar^T``. The token-mean is a reduction fused into the LP pass (each row
  block writes its partial sum of ``p``; a ``(blocks, E)`` sum follows: deterministic, no atomics).

Both are a LoRA-shaped product ``left (T, K) @ right (K, d_out)`` (left = Z or h, right = HPcat^T or
HPbar^T), so the GEMM-sized work runs on the LoRA family's fused-GEMM primitives, imported from
``ops/lora.py`` (private names, shared on purpose: one fused GEMM to tune, not two):
``_lora_gemm`` (base GEMM with a low-rank term in its epilogue; ``base`` = ``triton`` / ``cublas`` /
``auto``, the latter timed once per shape on the GPU) and ``_lora_bwd_gb`` (``dY @ B`` and
``dY^T @ xa`` in one pass over dY).

Forward passes:
  1. ``_lily_proj_kernel`` reads x once: h, logits (router on h or x), fp32 softmax, partial sums of p.
  2. ``_lora_gemm(x, W0^T, left, right, bias, s)``: ``y = x @ W0^T + s * left @ right + b``. With the
     Triton base the mixture sits in the GEMM's epilogue and y is written once; with cuBLAS the
     mixture is added in place (one more read + write of y); ``auto`` keeps the faster. Token
     routing materialises ``Z`` (T x E*r fp32, 2 MB at T=8192, E*r=64; one small torch op) and
     ``HPcat`` (d_out x E*r, one copy of HP's size); batch routing uses h and ``HPbar`` as they are.
Backward passes:
  3. ``_lora_bwd_gb(dY, B, xa)``, ONE pass over dY: ``g = dY @ B`` ``(T, K)`` and ``dY^T @ xa``
     ``(d_out, K)`` (token: B = HPcat, xa = Z rebuilt from the saved h, p, which is cheaper than
     keeping Z alive between forward and backward; batch: B = HPbar, xa = h). Then
     ``dHP = s * dHPcat`` back in HP's layout (token), or ``dHPbar = s * dY^T h``,
     ``dHP_e = w_e dHPbar``, ``dw_e = <HP_e, dHPbar>`` (batch).
  4. ``_lily_route_bwd_kernel``, per row, writing ``[dh | dlogits]`` into one ``(T, r + E)`` buffer:
     token ``dp[t,e] = s sum_j g[t,e*r+j] h[t,j]``, ``dh[t,j] = s sum_e p[t,e] g[t,e*r+j]``; batch
     ``dh = s g``, ``dp[t,e] = dw_e / T`` (the mean couples every token); then
     ``dlogits = p * (dp - sum_e p dp)`` and, router on h, ``dh += dlogits @ router``.
  5. ``_lily_gradw_kernel``, one pass over x: ``dLP = dh^T x`` (and, router on x, ``drouter =
     dlogits^T x`` in fp32); ``drouter = dlogits^T h`` (tiny) for the router on h.
  6. ``_lora_gemm`` again: ``dx = dY @ W0 + [dh | dlogits] @ [LP; router]`` (router on h: ``dh @ LP``,
     dh already holding the router term), the low-rank term in the epilogue.
Passes over T x d tensors: forward reads x twice (1, 2) and writes y once (Triton base); backward
reads dY twice (3, 6), x once (5) and writes dx once.

Wide shapes (``K = E*r > FUSED_MAX_K`` = ``lora.MAX_RANK`` = 256 for token routing, ``r > 256`` for
batch): ``_lora_bwd_gb`` holds a ``(block, K)`` fp32 tile in registers and Z would be T x K fp32 in
memory, so these keep the Lily-specific kernels: the forward runs the base on cuBLAS and
``_lily_mix_kernel`` adds ``s * Z @ HPcat^T`` in place with Z built tile by tile in registers and
HPcat gathered from HP (batch routing at any r still uses step 2, whose epilogue loops over K); the
backward's step 3 becomes ``_lily_dz_kernel`` (``dY @ HPcat``) and ``_lily_dhp_kernel``
(``dY^T @ Z``, Z rebuilt in registers, split over T with deterministic partial sums): two passes
over dY. Steps 4-6 are shared.

Determinism: as in ``ops/lora.py``, ``_lora_bwd_gb`` sums ``dY^T @ xa`` across token blocks with fp32
atomics, so on a GPU ``dHP`` can differ in the last bits between identical runs, unless
``torch.use_deterministic_algorithms(True)`` (then fixed-order partial sums; the wide path's dhp and
every other gradient here are deterministic either way).

h, p, Z and every intermediate stay in fp32; GEMM operands are cast to the input dtype (tensor
cores) with fp32 accumulation. For fp32 inputs the Lily kernels use IEEE fp32 dots (no TF32) and
the LoRA primitives follow ``torch.get_float32_matmul_precision()`` (IEEE at the default "highest"),
as accurate as torch's fp32 matmul. Triton 3.6's interpreter (CPU runs, CI) truncates fp32 -> bf16
casts where a GPU rounds to nearest even, so every cast in the Lily kernels and in the LoRA
primitives rounds on the bits there (``_casts.to_rne``): CPU runs compute what the GPU does. Timings on an H100: UNMEASURED (no GPU
in the session that wrote this); which base ``auto`` picks per Lily shape is the first thing to measure.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .. import dispatch
from .._checks import check_tensor
from ..reference.lily import check_lily_args, lily as reference_lily
from ._autograd import first_order_only
from ._casts import to_rne
from ._triton import cdiv, custom_op, next_pow2, sm_count, triton, tl
# the shared fused-GEMM primitives of the LoRA family (private to ops/, reused here on purpose)
from .lora import _ZERO_SEED, MAX_RANK, _lora_bwd_gb, _lora_gemm, base_mode, deterministic

# Widest mixing K (E*r token, r batch) that runs on the LoRA primitives: _lora_bwd_gb keeps a
# (BLOCK, K) fp32 tile in registers (lora.MAX_RANK), and token routing materialises Z (T, K) fp32.
# Wider shapes take the Lily kernels that build Z in registers (_lily_mix/_dz/_dhp).
FUSED_MAX_K = MAX_RANK
# Largest r the Lily kernels take: the projection kernel's (BLOCK, r) tiles need more than sm_90's
# 227 KiB of shared memory from r = 1024 (ptxas, no GPU); wider ranks run on the reference.
MAX_R = 512
# Largest R_PAD * E_PAD whose router-on-h backward term stays inside ``_lily_route_bwd_kernel``.
ROUTE_BWD_MAX_RE = 512

# Interpreter runs (CI, CPU) use one small config: fewer programs keep it fast while 32-wide
# tiles on T=37-ish / d=53-ish shapes still exercise every mask and multi-block path.
_INTERPRET_BLOCK = 32
_INTERPRET_SPLIT = 2


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# How _dot multiplies (a constexpr, chosen per launch by _dot_mode):
_DOT_NATIVE = 0   # fp16/bf16 on GPU: tensor cores, fp32 accumulation
_DOT_IEEE = 1     # fp32: IEEE, so the kernel matches torch's fp32 matmul (TF32 would not)
_DOT_UPCAST = 2   # bf16 under the interpreter: triton 3.6's interpreter returns garbage (~1e10) for
                  # bf16 tl.dot, so operands go to fp32 first (exact for bf16; same fp32 accumulation),
                  # and its fp32 -> bf16 casts truncate, so to_rne rounds on the bits (ops/_casts.py)


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr):
    if DOT == 1:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _z_tile(h_ptr, p_ptr, rows, row_ok, c_ok, e, j, R, E, TOKEN: tl.constexpr):
    """``Z[rows, c]`` for columns ``c = e*R + j`` in fp32: ``p[t,e] * h[t,j]`` (token) or ``h[t,c]``."""
    m = row_ok[:, None] & c_ok[None, :]
    r64 = rows[:, None].to(tl.int64)
    z = tl.load(h_ptr + r64 * R + j[None, :], mask=m, other=0.0)
    if TOKEN:
        z = z * tl.load(p_ptr + r64 * E + e[None, :], mask=m, other=0.0)
    return z


@triton.jit
def _lily_proj_kernel(
    # pointers
    x_ptr, lp_ptr, router_ptr, h_ptr, p_ptr, psum_ptr,
    # sizes
    T, D_IN, R, E,
    # meta-parameters
    ROUTER_X: tl.constexpr, DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
):
    """One row block: ``h = x @ LP^T``, logits, fp32 softmax, and this block's sum of ``p``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    r64 = rows.to(tl.int64)
    rj = tl.arange(0, R_PAD)
    ee = tl.arange(0, E_PAD)
    kk = tl.arange(0, BLOCK_K)

    h = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    logits = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        cols = k0 + kk
        col_ok = cols < D_IN
        xt = tl.load(x_ptr + r64[:, None] * D_IN + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        # LP^T tile (BLOCK_K, R_PAD), rounded to the input dtype like the reference's lp.to(x.dtype)
        lpt = to_rne(tl.load(lp_ptr + rj[None, :] * D_IN + cols[:, None],
                            mask=(rj[None, :] < R) & col_ok[:, None], other=0.0), xt.dtype, DOT == 2)
        h = _dot(xt, lpt, h, DOT)
        if ROUTER_X:
            # the router reads x: logits in fp32 (x exactly representable), as the spec demands
            rt = tl.load(router_ptr + ee[None, :] * D_IN + cols[:, None],
                         mask=(ee[None, :] < E) & col_ok[:, None], other=0.0).to(tl.float32)
            logits = tl.dot(xt.to(tl.float32), rt, logits, input_precision="ieee")
    if not ROUTER_X:
        rt = tl.load(router_ptr + ee[None, :] * R + rj[:, None],
                     mask=(ee[None, :] < E) & (rj[:, None] < R), other=0.0).to(tl.float32)
        logits = tl.dot(h, rt, logits, input_precision="ieee")

    # fp32 softmax over the E real experts; padded experts get exactly zero probability
    logits = tl.where((ee < E)[None, :], logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    ex = tl.exp(logits - mx[:, None])
    p = ex / tl.sum(ex, axis=1)[:, None]

    tl.store(h_ptr + r64[:, None] * R + rj[None, :], h, mask=row_ok[:, None] & (rj[None, :] < R))
    tl.store(p_ptr + r64[:, None] * E + ee[None, :], p, mask=row_ok[:, None] & (ee[None, :] < E))
    # batch routing's token-mean, fused: this block's partial sum (rows past T excluded)
    psum = tl.sum(tl.where(row_ok[:, None], p, 0.0), axis=0)
    tl.store(psum_ptr + pid * E + ee, psum, mask=ee < E)


@triton.jit
def _lily_mix_kernel(
    # pointers
    y_ptr, h_ptr, p_ptr, hp_ptr,
    # sizes
    T, D_OUT, R, E, KZ,
    # scalars
    scaling,
    # meta-parameters
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``y[tile] += s * Z @ HPcat^T`` with K = E*r, Z built in registers (token routing, E*r too wide
    for the fused-GEMM path)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < T
    out_ok = outs < D_OUT
    cc = tl.arange(0, BLOCK_C)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, KZ, BLOCK_C):
        c = c0 + cc
        c_ok = c < KZ
        e = c // R
        j = c % R
        z = _z_tile(h_ptr, p_ptr, rows, row_ok, c_ok, e, j, R, E, True)
        # HPcat^T tile (BLOCK_C, BLOCK_N) gathered from HP (E, d_out, r): no repacked copy of HP
        hpt = tl.load(hp_ptr + e[:, None].to(tl.int64) * D_OUT * R + outs[None, :] * R + j[:, None],
                      mask=c_ok[:, None] & out_ok[None, :], other=0.0)
        acc = _dot(to_rne(z, y_ptr.dtype.element_ty, DOT == 2), to_rne(hpt, y_ptr.dtype.element_ty, DOT == 2),
                   acc, DOT)

    # epilogue: add onto the cuBLAS base output in place
    yp = y_ptr + rows[:, None].to(tl.int64) * D_OUT + outs[None, :]
    m = row_ok[:, None] & out_ok[None, :]
    y = tl.load(yp, mask=m, other=0.0).to(tl.float32) + scaling * acc
    tl.store(yp, to_rne(y, y_ptr.dtype.element_ty, DOT == 2), mask=m)


@triton.jit
def _lily_dz_kernel(
    # pointers
    dy_ptr, hp_ptr, dz_ptr,
    # sizes
    T, D_OUT, R, KZ,
    # meta-parameters
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``dY @ HPcat`` ``(T, KZ)`` in fp32, unscaled (KZ = E*r, or r against HPbar for batch)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    r64 = rows.to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < KZ
    e = c // R
    j = c % R
    oo = tl.arange(0, BLOCK_O)

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for o0 in range(0, D_OUT, BLOCK_O):
        o = o0 + oo
        o_ok = o < D_OUT
        dy = tl.load(dy_ptr + r64[:, None] * D_OUT + o[None, :], mask=row_ok[:, None] & o_ok[None, :], other=0.0)
        hpc = to_rne(tl.load(hp_ptr + e[None, :].to(tl.int64) * D_OUT * R + o[:, None] * R + j[None, :],
                            mask=o_ok[:, None] & c_ok[None, :], other=0.0), dy.dtype, DOT == 2)
        acc = _dot(dy, hpc, acc, DOT)
    tl.store(dz_ptr + r64[:, None] * KZ + c[None, :], acc, mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _lily_dhp_kernel(
    # pointers
    dy_ptr, h_ptr, p_ptr, part_ptr,
    # sizes
    T, D_OUT, R, E, KZ, T_CHUNK,
    # meta-parameters
    TOKEN: tl.constexpr, DOT: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Partial ``dY^T @ Z`` (unscaled) over one chunk of T, written in HP's (E, d_out, r) layout."""
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < D_OUT
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < KZ
    e = c // R
    j = c % R
    tt = tl.arange(0, BLOCK_T)

    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    t_start = pid_s * T_CHUNK
    for t0 in range(t_start, t_start + T_CHUNK, BLOCK_T):
        rows = t0 + tt
        row_ok = rows < T
        dyt = tl.load(dy_ptr + rows[None, :].to(tl.int64) * D_OUT + o[:, None],
                      mask=row_ok[None, :] & o_ok[:, None], other=0.0)
        z = _z_tile(h_ptr, p_ptr, rows, row_ok, c_ok, e, j, R, E, TOKEN)
        acc = _dot(dyt, to_rne(z, dyt.dtype, DOT == 2), acc, DOT)
    base = pid_s.to(tl.int64) * D_OUT * KZ
    tl.store(part_ptr + base + e[None, :].to(tl.int64) * D_OUT * R + o[:, None] * R + j[None, :],
             acc, mask=o_ok[:, None] & c_ok[None, :])


@triton.jit
def _lily_route_bwd_kernel(
    # pointers
    dz_ptr, h_ptr, p_ptr, router_ptr, dw_ptr, dh_ptr, dlog_ptr,
    # sizes
    T, R, E,
    # strides: dh and dlog are the two column blocks of one (T, R + E) buffer, the left operand of dX
    stride_d,
    # scalars
    scaling, inv_t,
    # meta-parameters
    TOKEN: tl.constexpr, ROUTER_H: tl.constexpr,
    BLOCK_T: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
):
    """Per row: dp and dh from the unscaled ``dY @ HPcat`` (token) or ``dY @ HPbar`` and dw (batch),
    times s; softmax backward; router-on-h term."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    r64 = rows.to(tl.int64)
    rj = tl.arange(0, R_PAD)
    ee = tl.arange(0, E_PAD)
    hm = row_ok[:, None] & (rj[None, :] < R)
    em = row_ok[:, None] & (ee[None, :] < E)

    p = tl.load(p_ptr + r64[:, None] * E + ee[None, :], mask=em, other=0.0)
    if TOKEN:
        h = tl.load(h_ptr + r64[:, None] * R + rj[None, :], mask=hm, other=0.0)
        dh = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
        dp = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
        for e in range(E):
            dze = tl.load(dz_ptr + r64[:, None] * (E * R) + e * R + rj[None, :], mask=hm, other=0.0)
            pe = tl.load(p_ptr + r64 * E + e, mask=row_ok, other=0.0)
            dh += pe[:, None] * dze
            dp = tl.where((ee == e)[None, :], tl.sum(dze * h, axis=1)[:, None], dp)
        # s applied once here instead of to each (T, E*r) element of dZ
        dh = dh * scaling
        dp = dp * scaling
    else:
        # batch: dz holds dY @ HPbar; every token sees the same dp = dw / T (dw already scaled)
        dh = tl.load(dz_ptr + r64[:, None] * R + rj[None, :], mask=hm, other=0.0) * scaling
        dwv = tl.load(dw_ptr + ee, mask=ee < E, other=0.0) * inv_t
        dp = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32) + dwv[None, :]
    dlog = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    if ROUTER_H:
        rt = tl.load(router_ptr + ee[:, None] * R + rj[None, :],
                     mask=(ee[:, None] < E) & (rj[None, :] < R), other=0.0).to(tl.float32)
        dh = tl.dot(dlog, rt, dh, input_precision="ieee")
    tl.store(dh_ptr + r64[:, None] * stride_d + rj[None, :], dh, mask=hm)
    tl.store(dlog_ptr + r64[:, None] * stride_d + ee[None, :], dlog, mask=em)


@triton.jit
def _lily_gradw_kernel(
    # pointers
    x_ptr, dh_ptr, dlog_ptr, dlp_part_ptr, dr_part_ptr,
    # sizes
    T, D_IN, R, E, T_CHUNK,
    # strides: row stride of dh and dlog (column blocks of one (T, R + E) buffer)
    stride_d,
    # meta-parameters
    ROUTER_X: tl.constexpr, DOT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
):
    """Partial ``dLP = dh^T x`` (and ``drouter = dlogits^T x`` in fp32 when the router reads x) over one
    chunk of T: one read of x for both."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < D_IN
    rj = tl.arange(0, R_PAD)
    ee = tl.arange(0, E_PAD)
    tt = tl.arange(0, BLOCK_T)

    acc_lp = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    acc_r = tl.zeros((E_PAD, BLOCK_K), dtype=tl.float32)
    t_start = pid_s * T_CHUNK
    for t0 in range(t_start, t_start + T_CHUNK, BLOCK_T):
        rows = t0 + tt
        row_ok = rows < T
        r64 = rows.to(tl.int64)
        xt = tl.load(x_ptr + r64[:, None] * D_IN + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        dht = tl.load(dh_ptr + r64[None, :] * stride_d + rj[:, None], mask=row_ok[None, :] & (rj[:, None] < R),
                      other=0.0)
        acc_lp = _dot(to_rne(dht, xt.dtype, DOT == 2), xt, acc_lp, DOT)
        if ROUTER_X:
            dlt = tl.load(dlog_ptr + r64[None, :] * stride_d + ee[:, None],
                          mask=row_ok[None, :] & (ee[:, None] < E), other=0.0)
            acc_r = tl.dot(dlt, xt.to(tl.float32), acc_r, input_precision="ieee")
    base = pid_s.to(tl.int64) * D_IN
    tl.store(dlp_part_ptr + base * R + rj[:, None] * D_IN + cols[None, :], acc_lp,
             mask=(rj[:, None] < R) & col_ok[None, :])
    if ROUTER_X:
        tl.store(dr_part_ptr + base * E + ee[:, None] * D_IN + cols[None, :], acc_r,
                 mask=(ee[:, None] < E) & col_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launchers (inputs already validated by lily_linear; these allocate and launch)
# ----------------------------------------------------------------------------------------------
def _pad16(n: int) -> int:
    # tl.dot needs every dimension >= 16; masks keep the padding out of the result
    return max(16, next_pow2(n))


def _device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device and its current stream: make that the
    tensors' device, or a process driving several GPUs launches on the wrong one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _dot_mode(t: torch.Tensor) -> int:
    if t.dtype == torch.float32:
        return _DOT_IEEE
    if t.dtype == torch.bfloat16 and _interpreting(t):
        return _DOT_UPCAST
    return _DOT_NATIVE


def _split(t: torch.Tensor, n_rows: int, block_t: int, grid_other: int) -> tuple[int, int]:
    """How many chunks of T the weight-gradient reductions use, and the chunk length.

    Chunks fill the GPU (~2 programs per SM) when the output tiles alone are too few; each chunk
    writes its own partial, summed afterwards (deterministic, unlike atomics).
    """
    n_blocks = max(1, cdiv(n_rows, block_t))
    if _interpreting(t):
        split = min(_INTERPRET_SPLIT, n_blocks)
    else:
        sms = sm_count(t.device)
        split = max(1, min(n_blocks, (2 * sms) // max(1, grid_other)))
    chunk = cdiv(n_blocks, split) * block_t
    return cdiv(n_rows, chunk) if n_rows else 1, chunk


def _rank_tile(r_pad: int) -> int:
    """GPU tile edge (tokens and columns) for kernels that hold a ``(tile, R_PAD)`` fp32 accumulator
    and an LP tile: 64, halved for r above 64 to stay within registers at r up to 256."""
    return 64 if r_pad <= 64 else 32


def _launch_proj(x2, lp, router, router_h: bool):
    T, d_in = x2.shape
    r, E = lp.shape[0], router.shape[0]
    R_PAD, E_PAD = _pad16(r), _pad16(E)
    if _interpreting(x2):
        BLOCK_T = BLOCK_K = _INTERPRET_BLOCK
    else:
        BLOCK_T = BLOCK_K = _rank_tile(R_PAD)
    n_blocks = cdiv(T, BLOCK_T)
    h = torch.empty(T, r, device=x2.device, dtype=torch.float32)
    p = torch.empty(T, E, device=x2.device, dtype=torch.float32)
    psum = torch.zeros(max(n_blocks, 1), E, device=x2.device, dtype=torch.float32)
    if T:
        with _device_guard(x2.device):
            _lily_proj_kernel[(n_blocks,)](
                x2, lp, router, h, p, psum,
                T, d_in, r, E,
                ROUTER_X=not router_h, DOT=_dot_mode(x2),
                BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, R_PAD=R_PAD, E_PAD=E_PAD,
            )
    return h, p, psum


def _mix_blocks(t: torch.Tensor, kz: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_C, num_warps); untuned first guesses for the GPU (no H100 measured yet)."""
    if _interpreting(t):
        return _INTERPRET_BLOCK, _INTERPRET_BLOCK, 16, 4
    # a 128x128 fp32 accumulator needs 8 warps to stay in registers
    return 128, 128, min(64, _pad16(kz)), 8


def _launch_mix(y, h, p, hp, scaling: float):
    """In place: ``y += s * Z @ HPcat^T`` (token routing, wide path: Z built in registers)."""
    T, d_out = y.shape
    r = h.shape[1]
    E = p.shape[1]
    kz = E * r
    BM, BN, BC, warps = _mix_blocks(y, kz)
    if T:
        with _device_guard(y.device):
            _lily_mix_kernel[(cdiv(T, BM), cdiv(d_out, BN))](
                y, h, p, hp,
                T, d_out, r, E, kz,
                float(scaling),
                DOT=_dot_mode(y), BLOCK_M=BM, BLOCK_N=BN, BLOCK_C=BC, num_warps=warps,
            )


def _launch_dz(dy, hp_like, r: int, kz: int):
    """``dY @ HPcat`` ``(T, kz)`` fp32, unscaled; ``hp_like`` is HP (token) or HPbar ``(1, d_out, r)``."""
    T, d_out = dy.shape
    dz = torch.empty(T, kz, device=dy.device, dtype=torch.float32)
    if _interpreting(dy):
        BM = BO = _INTERPRET_BLOCK
        BC = 16
    else:
        BM, BO, BC = 64, 64, min(128, _pad16(kz))
    if T:
        with _device_guard(dy.device):
            _lily_dz_kernel[(cdiv(T, BM), cdiv(kz, BC))](
                dy, hp_like, dz,
                T, d_out, r, kz,
                DOT=_dot_mode(dy), BLOCK_M=BM, BLOCK_O=BO, BLOCK_C=BC,
            )
    return dz


def _launch_dhp(dy, h, p, n_exp: int, token: bool):
    """``dY^T @ Z`` in HP's layout ``(n_exp, d_out, r)``, fp32, unscaled."""
    T, d_out = dy.shape
    r = h.shape[1]
    E = p.shape[1]
    kz = n_exp * r
    if _interpreting(dy):
        BO = BT = _INTERPRET_BLOCK
        BC = 16
    else:
        BO, BT, BC = 64, 64, min(64, _pad16(kz))
    grid_oc = cdiv(d_out, BO) * cdiv(kz, BC)
    split, chunk = _split(dy, T, BT, grid_oc)
    part = torch.zeros(split, n_exp, d_out, r, device=dy.device, dtype=torch.float32)
    if T:
        with _device_guard(dy.device):
            _lily_dhp_kernel[(cdiv(d_out, BO), cdiv(kz, BC), split)](
                dy, h, p, part,
                T, d_out, r, E, kz, chunk,
                TOKEN=token, DOT=_dot_mode(dy), BLOCK_O=BO, BLOCK_C=BC, BLOCK_T=BT,
            )
    return part.sum(dim=0)


def _launch_route_bwd(dz, h, p, router, dw, scaling: float, token: bool, router_h: bool):
    """``dg = [dh | dlogits]`` ``(T, r + E)`` fp32 in one buffer: ``dg`` is the left operand of the
    dX GEMM as it stands (router on x), ``dg[:, :r]`` a strided view of it (router on h)."""
    T, r = h.shape
    E = p.shape[1]
    R_PAD, E_PAD = _pad16(r), _pad16(E)
    BT = _INTERPRET_BLOCK if _interpreting(h) else _rank_tile(R_PAD)
    dg = torch.empty(T, r + E, device=h.device, dtype=torch.float32)
    # the router-on-h term dh += dlogits @ router in the kernel is an fp32 dot whose (BT, E_PAD) x
    # (E_PAD, R_PAD) operands spill on sm_90 from R_PAD * E_PAD = 1024 (ptxas: 104 B at r = 64, E = 4,
    # ~18-31 KB at r = 256, E = 64); there it is one small fp32 GEMM after the kernel instead
    in_kernel = router_h and R_PAD * E_PAD <= ROUTE_BWD_MAX_RE
    if T:
        with _device_guard(h.device):
            _lily_route_bwd_kernel[(cdiv(T, BT),)](
                dz, h, p, router, dw, dg, dg[:, r:],
                T, r, E,
                dg.stride(0),
                float(scaling), 1.0 / T,
                TOKEN=token, ROUTER_H=in_kernel, BLOCK_T=BT, R_PAD=R_PAD, E_PAD=E_PAD,
            )
        if router_h and not in_kernel:
            dg[:, :r].addmm_(dg[:, r:], router.float())
    return dg


def _launch_gradw(x2, dg, r: int, router_h: bool):
    """``dLP = dh^T x`` ``(r, d_in)`` and, router on x, ``drouter = dlogits^T x`` ``(E, d_in)``; fp32.
    ``dg`` is route_bwd's ``[dh | dlogits]`` buffer."""
    T, d_in = x2.shape
    E = dg.shape[1] - r
    R_PAD, E_PAD = _pad16(r), _pad16(E)
    if _interpreting(x2):
        BK = BT = _INTERPRET_BLOCK
    else:
        BK = BT = _rank_tile(R_PAD)
    split, chunk = _split(x2, T, BT, cdiv(d_in, BK))
    dlp = torch.zeros(split, r, d_in, device=x2.device, dtype=torch.float32)
    dr = torch.zeros(split if not router_h else 1, E, d_in if not router_h else 1, device=x2.device,
                     dtype=torch.float32)
    if T:
        with _device_guard(x2.device):
            _lily_gradw_kernel[(cdiv(d_in, BK), split)](
                x2, dg, dg[:, r:], dlp, dr,
                T, d_in, r, E, chunk,
                dg.stride(0),
                ROUTER_X=not router_h, DOT=_dot_mode(x2),
                BLOCK_K=BK, BLOCK_T=BT, R_PAD=R_PAD, E_PAD=E_PAD,
            )
    return dlp.sum(dim=0), (dr.sum(dim=0) if not router_h else None)


# ----------------------------------------------------------------------------------------------
# the small dense pieces the fused-GEMM primitives take (all tiny: T x E*r or E x d_out x r)
# ----------------------------------------------------------------------------------------------
def _fused_path(token: bool, r: int, E: int) -> bool:
    """Whether the mixing GEMM's K (E*r token, r batch) fits the shared primitives (see the module
    docstring); wider shapes take the Lily-specific kernels."""
    return (E * r if token else r) <= FUSED_MAX_K


def _z(h, p):
    """``Z[t, e*r + j] = p[t, e] * h[t, j]`` ``(T, E*r)`` fp32, materialised (T x E*r fp32: 2 MB at
    T=8192, E*r=64)."""
    return (p[:, :, None] * h[:, None, :]).reshape(h.shape[0], p.shape[1] * h.shape[1])


def _hp_cat(hp, dtype):
    """``HPcat[o, e*r + j] = HP[e, o, j]`` ``(d_out, E*r)`` in ``dtype`` (one copy: not a strided view of HP)."""
    E, d_out, r = hp.shape
    out = torch.empty(d_out, E, r, device=hp.device, dtype=dtype)
    out.copy_(hp.permute(1, 0, 2))
    return out.view(d_out, E * r)


def _hp_bar(w, hp):
    """``HPbar = sum_e w_e HP_e`` ``(d_out, r)`` fp32."""
    E, d_out, r = hp.shape
    return torch.mv(hp.float().reshape(E, d_out * r).t(), w).view(d_out, r)  # (einsum costs ~4x the host time)


# ----------------------------------------------------------------------------------------------
# torch.library ops: Dynamo sees one opaque op per direction instead of graph-breaking on Triton
# ----------------------------------------------------------------------------------------------
@custom_op("peft_kernels::lily_fwd", mutates_args=())
def _lily_fwd_op(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lp: torch.Tensor,
                 router: torch.Tensor, hp: torch.Tensor, scaling: float, token: bool,
                 router_h: bool, base: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(y, h, p, w)``: output, fp32 ``h`` ``(T, r)``, fp32 ``p`` ``(T, E)``, fp32 ``w = mean_t p``.
    ``base``: ``triton`` / ``cublas`` / ``auto``, who runs the frozen product (``lora._lora_gemm``)."""
    # the Lily kernels index these as dense row-major arrays (no strides): no-ops for LilyFunction's
    # inputs, but a compiled graph or a direct caller may hand the op strided views
    x2, lp, router, hp = x2.contiguous(), lp.contiguous(), router.contiguous(), hp.contiguous()
    T = x2.shape[0]
    E, d_out, r = hp.shape
    h, p, psum = _launch_proj(x2, lp, router, router_h)
    w = psum.sum(dim=0) / max(T, 1)
    weight = weight.to(x2.dtype)
    bias = None if bias is None else bias.to(x2.dtype)
    if token and not _fused_path(token, r, E):
        # wide: Z would be T x E*r fp32 in memory; cuBLAS base, then the mixture added in place
        y = torch.nn.functional.linear(x2, weight, bias)
        _launch_mix(y, h, p, hp, scaling)
        return y, h, p, w
    if token:
        left, right = _z(h, p), _hp_cat(hp, x2.dtype).t()       # (T, E*r) fp32, (E*r, d_out) view
    else:
        left, right = h, _hp_bar(w, hp).to(x2.dtype).t()         # (T, r) fp32, (r, d_out) view
    # x @ W0^T + s * left @ right + b, W0^T a free transposed view; base as decided by _lora_gemm
    y = _lora_gemm(x2, weight.t(), None, left, right, bias, float(scaling), 0.0, _ZERO_SEED, x2.dtype, base)
    return y, h, p, w


@_lily_fwd_op.register_fake
def _(x2, weight, bias, lp, router, hp, scaling, token, router_h, base):
    T = x2.shape[0]
    f32 = dict(device=x2.device, dtype=torch.float32)
    return (x2.new_empty(T, weight.shape[0]), torch.empty(T, lp.shape[0], **f32),
            torch.empty(T, hp.shape[0], **f32), torch.empty(hp.shape[0], **f32))


@custom_op("peft_kernels::lily_bwd", mutates_args=())
def _lily_bwd_op(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, lp: torch.Tensor, router: torch.Tensor,
                 hp: torch.Tensor, h: torch.Tensor, p: torch.Tensor, w: torch.Tensor, scaling: float, token: bool,
                 router_h: bool, need_dx: bool,
                 base: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dlp, drouter, dhp)``: dx in x's dtype (empty when ``need_dx`` is False), the rest fp32."""
    # dense row-major layouts, as in _lily_fwd_op (no-ops for LilyFunction's tensors)
    dy, x2, lp, router, hp = dy.contiguous(), x2.contiguous(), lp.contiguous(), router.contiguous(), hp.contiguous()
    h, p, w = h.contiguous(), p.contiguous(), w.contiguous()
    E, d_out, r = hp.shape
    fused = _fused_path(token, r, E)
    s = float(scaling)
    # g = dY @ HPcat (token) or dY @ HPbar (batch), and dY^T @ Z (or dY^T @ h): unscaled, fp32
    if token:
        if fused:
            # one pass over dY for both (Z rebuilt from h, p: cheaper than keeping it from forward)
            g, dhc = _lora_bwd_gb(dy, _hp_cat(hp, dy.dtype), _z(h, p), 0.0, _ZERO_SEED, deterministic())
            dhp = torch.empty(E, d_out, r, device=dy.device, dtype=torch.float32)
            torch.mul(dhc.view(d_out, E, r).permute(1, 0, 2), s, out=dhp)      # back to HP's layout
        else:
            g = _launch_dz(dy, hp, r, E * r)
            dhp = _launch_dhp(dy, h, p, E, token=True).mul_(s)
        dw = w  # unused by the token path; any fp32 pointer will do
    else:
        hp32 = hp.float()
        hp_bar = _hp_bar(w, hp32)
        if fused:
            g, dhb = _lora_bwd_gb(dy, hp_bar.to(dy.dtype), h, 0.0, _ZERO_SEED, deterministic())
        else:
            g = _launch_dz(dy, hp_bar.contiguous().unsqueeze(0), r, r)
            dhb = _launch_dhp(dy, h, p, 1, token=False)[0]
        dhp_bar = dhb.mul_(s)                                                # s * dY^T @ h, (d_out, r)
        dhp = w[:, None, None] * dhp_bar                                     # dHP_e = w_e dHPbar
        dw = torch.mv(hp32.reshape(E, d_out * r), dhp_bar.reshape(-1))     # dL/dw_e
    dg = _launch_route_bwd(g, h, p, router, dw, s, token, router_h)          # [dh | dlogits], (T, r + E)
    dlp, drouter = _launch_gradw(x2, dg, r, router_h)
    if router_h:
        drouter = dg[:, r:].t() @ h                                          # (E, r), tiny, fp32
    if need_dx:
        # dx = dY @ W0 + [dh, dlogits] @ [LP; router] in one fused GEMM (router on h: dh already holds
        # the router term, so the epilogue is dh @ LP)
        if router_h:
            left, right = dg[:, :r], lp.to(dy.dtype)
        else:
            left, right = dg, torch.cat([lp.to(dy.dtype), router.to(dy.dtype)], dim=0)
        dx = _lora_gemm(dy, weight.to(dy.dtype), None, left, right, None, 1.0, 0.0, _ZERO_SEED, dy.dtype, base)
    else:
        dx = dy.new_empty(0)
    return dx, dlp, drouter, dhp


@_lily_bwd_op.register_fake
def _(dy, x2, weight, lp, router, hp, h, p, w, scaling, token, router_h, need_dx, base):
    f32 = dict(device=x2.device, dtype=torch.float32)
    dx = dy.new_empty(x2.shape) if need_dx else dy.new_empty(0)  # the real dx is in dy's dtype
    return (dx, torch.empty(lp.shape, **f32), torch.empty(router.shape, **f32), torch.empty(hp.shape, **f32))


# ----------------------------------------------------------------------------------------------
# autograd.Function and public entry point
# ----------------------------------------------------------------------------------------------
class LilyFunction(torch.autograd.Function):
    """Fused Lily / MoE-LoRA linear on 2-D ``x`` ``(T, d_in)``; saves only x, h ``(T, r)``, p ``(T, E)`` and w.

    ``lp``/``router``/``hp`` may be in another float dtype than x (fp32 adapter weights on a bf16
    model, the default): the kernels read copies in x's dtype, made here, and the gradients come
    back in the parameters' own dtypes straight from the fp32 results (no bf16 rounding on the way,
    no cast nodes in autograd's graph)."""

    @staticmethod
    def forward(ctx, x2, weight, lp, router, hp, bias, scaling, routing, router_input, base):
        token = routing == "token"
        router_h = router_input == "h"
        x2 = x2.contiguous()
        ctx.param_dtypes = (lp.dtype, router.dtype, hp.dtype)
        lp_c, router_c, hp_c = (t.to(x2.dtype).contiguous() for t in (lp, router, hp))
        y, h, p, w = _lily_fwd_op(x2, weight, bias, lp_c, router_c, hp_c, float(scaling),
                                                     token, router_h, base)
        ctx.save_for_backward(x2, weight, lp_c, router_c, hp_c, h, p, w)
        ctx.cfg = (float(scaling), token, router_h, None if bias is None else bias.dtype, base)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x2, weight, lp, router, hp, h, p, w = ctx.saved_tensors
        scaling, token, router_h, bias_dtype, base = ctx.cfg
        dy = dy.contiguous()
        need = ctx.needs_input_grad
        dx, dlp, drouter, dhp = _lily_bwd_op(dy, x2, weight, lp, router, hp, h, p, w, scaling,
                                                                token, router_h, bool(need[0]), base)
        dweight = (dy.t() @ x2).to(weight.dtype) if need[1] else None
        dbias = dy.sum(dim=0).to(bias_dtype) if (bias_dtype is not None and need[5]) else None
        lp_dtype, router_dtype, hp_dtype = ctx.param_dtypes
        return (dx if need[0] else None, dweight, dlp.to(lp_dtype) if need[2] else None,
                drouter.to(router_dtype) if need[3] else None, dhp.to(hp_dtype) if need[4] else None,
                dbias, None, None, None, None)


dispatch.register("lily", "triton")
dispatch.register("lily", "torch")


def lily_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lp: torch.Tensor,
    router: torch.Tensor,
    hp: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    routing: str = "token",
    router_input: str = "h",
    impl: Optional[str] = None,
    *,
    base: Optional[str] = None,
) -> torch.Tensor:
    """``x @ W0^T + b`` plus the Lily / MoE-LoRA mixture; equals ``reference.lily`` exactly.

    ``lp`` ``(r, d_in)``, ``router`` ``(E, r)`` (``router_input="h"``) or ``(E, d_in)`` (``"x"``), ``hp``
    ``(E, d_out, r)``. ``routing`` is ``"token"`` (per-token mixture) or ``"batch"`` (PEFT's
    token-mean of the router softmax). Gradients reach x, lp, router, hp and bias (and weight if it
    requires grad). ``impl`` forces ``"triton"`` or ``"torch"``; default: dispatch. ``base``
    (``"triton"`` / ``"cublas"`` / ``"auto"``; default ``PEFT_KERNELS_BASE`` or ``auto``) picks who runs
    the frozen GEMMs on the Triton path (``lora.base_mode``).
    """
    check_lily_args(x, weight, lp, router, hp, bias, routing, router_input)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float, got {type(scaling).__name__}")
    dtype = dispatch.compute_dtype(x)
    chosen = dispatch.choose("lily", x.device, dtype, impl)
    params = {"weight": weight, "lp": lp, "router": router, "hp": hp, "bias": bias}
    forced = dispatch.is_forced("lily", impl)
    if chosen == "triton" and lp.shape[0] > MAX_R:
        if forced:
            raise ValueError(f"lp has rank {lp.shape[0]}; the Lily kernels take r <= {MAX_R}")
        chosen = "torch"  # picked by default only: fall back rather than fail at launch
    if chosen == "triton" and not forced and any(t is not None and t.dtype == torch.float64 for t in params.values()):
        chosen = "torch"  # fp64 parameters: only the reference computes in fp64
    if chosen == "torch":
        y = reference_lily(x, weight, lp, router, hp, bias, scaling=scaling, routing=routing,
                           router_input=router_input)
        return dispatch.in_dtype(y, dtype)
    for name, t in params.items():
        if t is not None:
            check_tensor(name, t, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    mode = base_mode(base)
    # Under autocast the kernels run in the autocast dtype (as F.linear would) with autocast off
    # inside. x, W0 and the bias are cast here (differentiable casts); the adapter parameters go in
    # as they are: LilyFunction reads them in x's dtype and returns their gradients in their own.
    with torch.autocast(x.device.type, enabled=False):
        x, weight, bias = (t if t is None or t.dtype == dtype else t.to(dtype) for t in (x, weight, bias))
        x2 = x.reshape(-1, x.shape[-1])
        y = LilyFunction.apply(x2, weight, lp, router, hp, bias, float(scaling), routing, router_input, mode)
    return y.reshape(*x.shape[:-1], weight.shape[0])


__all__ = ["lily_linear", "LilyFunction"]
