"""Sparse-masked adapter (RoSA-style): gather SpMM + SDDMM over a fixed CSR mask.

``y = x @ W0^T (+ b) + x @ (M⊙S)^T`` with S stored as ``crow`` ``(d_out+1,)``, ``col`` ``(nnz,)``,
``val`` ``(nnz,)`` (see ``peft_kernels.reference.sparse``). Three kernels cover training:

- SpMM (forward):   ``y[t, r] = sum_{k in row r} val[k] * x[t, col[k]]``
- SpMM (backward):  ``dx = dy @ (M⊙S)`` is the same SpMM on the *transposed* CSR. The transposed
  copy (``crow_t``, ``row_t``, ``perm``) is built once per mask (``csr_transpose``; SparseLinear caches
  it) and ``val[perm]`` is an nnz-sized gather per step. We use it rather than a scatter with atomics
  because it is deterministic, has no write contention on popular columns, and reuses one kernel.
- SDDMM (backward): ``dval[k] = sum_t dy[t, row(k)] * x[t, col[k]]`` for the nnz entries only.

``sparse_linear`` (``SparseLinearFunction``) adds the adapter *in place*: the SpMM kernels have an
accumulate mode (``sparse_spmm_add_``: ``y += x @ (M⊙S)^T``, fp32 sum rounded once) that runs on
the frozen product's output in forward and on ``dY @ W0`` in backward, so no adapter-sized output
is written and no separate sum pass runs (``base + adapter`` costs a write of the adapter output
plus a read of both and a write of the sum: 4 passes over ``T x d_out`` forward where the in-place
add costs 2, and the same over ``T x d_in`` for dX; true of the CUDA and Triton kernels, while the
C++ CPU op builds its fp32 ``(N, T)`` result and adds it). ``rosa_linear`` (RoSA: the sparse delta
beside a LoRA) does the same inside the LoRA family's fused kernels; ``sparse_adapter`` (the adapter
alone) keeps the out-of-place ops.

No step ever allocates a dense ``(d_out, d_in)`` tensor. Accumulation is fp32; ``val`` is upcast to
fp32 (an nnz-sized copy) before every kernel, outputs are cast back to ``x.dtype`` / ``val.dtype``.

Implementations (dispatch family ``"sparse"``, preference order): ``cuda`` and ``cpp`` (the native
extension ``peft_kernels._C``, ``csrc/sparse/``), ``triton`` (below), ``torch`` (the reference).
All native/Triton kernels read token-minor copies ``x^T`` ``(d_in, T)`` and ``dy^T`` ``(d_out, T)``: a
nonzero then gathers one contiguous length-T line (coalesced on GPU, unit-stride SIMD on CPU). The
autograd Function transposes x once in forward and saves ``x^T`` (same size as saving x) so the
backward does not transpose it again.

Measured on CPU only (2 shared cores, fp32, (d_in, d_out) = (1024, 1024), T=2048, fwd+bwd, noisy):
frozen base 451 ms; cpp at 1% density 492 ms, torch reference 1344 ms; at 5%: base 392 ms, cpp
739 ms, torch reference 6444 ms (the reference materialises a (T, nnz) product).

Not yet measured on a GPU (none in the session that wrote this). First things to measure on an H100
(bf16, T=8192, (4096,4096), 1% density): the cost of the two ``.t().contiguous()`` passes (x in
forward, dy in backward; ~20 us each) against the kernels themselves; the Triton SpMM's lockstep
row blocks (idle lanes when row lengths differ; RoSA orders rows by nnz for this) vs the CUDA
kernel's one-row-per-warp loop; the SDDMM's re-reads of
``dy^T``/``x^T`` lines from L2 (nnz*T elements each) - a token-tiled SDDMM that stages a row's dy^T
tile in shared memory is the obvious next step; and fusing the adapter add into the base GEMM output.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .. import _ext, dispatch
from .._checks import check_bias, check_input, check_same_device, check_tensor
from ..reference._common import flatten_tokens
from ..reference.sparse import check_csr
from ..reference.sparse import sparse as _reference_sparse
from ..reference.sparse import sparse_adapter as _reference_sparse_adapter
from ._autograd import first_order_only
from ._casts import to_rne
from ._triton import HAS_TRITON, capturing, cdiv, custom_op, tl, triton

# bf16 casts round to nearest under the interpreter as on a GPU (see ``_casts``)
_INTERPRETER = tl.constexpr(dispatch.interpreter_enabled()) if HAS_TRITON else False

# ---------------------------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------------------------
# SpMM: one program per (BLOCK_R-row block, BLOCK_T-token tile); 16 bf16 rows = one 32-byte
# sector per token on the output store.
SPMM_BLOCK_T = 64
SPMM_BLOCK_R = 16
# SDDMM: one program per BLOCK_NNZ nonzeros, reducing over tokens BLOCK_T at a time.
SDDMM_BLOCK_NNZ = 32
SDDMM_BLOCK_T = 64


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _spmm_kernel(
    # pointers
    xt_ptr,  # (K, T) token-minor input
    crow_ptr,  # (N + 1,)
    col_ptr,  # (nnz,)
    val_ptr,  # (nnz,) fp32
    steps_ptr,  # (cdiv(N, BLOCK_R),) longest row of each row block
    y_ptr,  # (T, N) output
    # sizes
    T,
    N,
    # strides
    stride_xt_k,
    stride_y_t,
    # meta-parameters
    ACCUMULATE: tl.constexpr,  # add into y (in place) instead of overwriting it
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # A program owns a (BLOCK_T tokens x BLOCK_R rows) output tile and walks the rows' nonzeros
    # in lockstep: step j gathers the j-th column of every row (BLOCK_T contiguous tokens of x^T
    # each). Owning BLOCK_R adjacent rows makes the output store contiguous along rows; shorter
    # rows idle (masked) once exhausted. Row blocks vary fastest in the 1-D grid, so programs
    # running together share a token tile of x^T in L2. 1-D because CUDA caps grid axes 1 and 2
    # at 65535: a (row blocks, token tiles) grid would fail past T = 65535 * BLOCK_T tokens.
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_R)
    pid_r = pid % n_row_blocks
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < N
    offs_t = (pid // n_row_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    start = tl.load(crow_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
    end = tl.load(crow_ptr + offs_r + 1, mask=mask_r, other=0).to(tl.int64)
    n_steps = tl.load(steps_ptr + pid_r)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for j in range(0, n_steps):
        k = start + j
        mask_k = k < end
        cols = tl.load(col_ptr + k, mask=mask_k, other=0).to(tl.int64)
        vals = tl.load(val_ptr + k, mask=mask_k, other=0.0)
        xg = tl.load(xt_ptr + cols[None, :] * stride_xt_k + offs_t[:, None],
                     mask=mask_t[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += xg * vals[None, :]
    y_ptrs = y_ptr + offs_t[:, None].to(tl.int64) * stride_y_t + offs_r[None, :]
    y_mask = mask_t[:, None] & mask_r[None, :]
    if ACCUMULATE:  # one rounding of the fp32 sum, as the native kernels do
        acc += tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, to_rne(acc, y_ptr.dtype.element_ty, _INTERPRETER), mask=y_mask)


@triton.jit
def _sddmm_kernel(
    # pointers
    dyt_ptr,  # (N, T) token-minor output gradient
    xt_ptr,  # (K, T) token-minor input
    rows_ptr,  # (nnz,) COO row of every nonzero
    col_ptr,  # (nnz,)
    out_ptr,  # (nnz,) fp32
    # sizes
    nnz,
    T,
    # strides
    stride_dyt_n,
    stride_xt_k,
    # meta-parameters
    BLOCK_NNZ: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
    mask_k = offs_k < nnz
    rows = tl.load(rows_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    cols = tl.load(col_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_NNZ,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        m = mask_k[:, None] & (offs_t < T)[None, :]
        a = tl.load(dyt_ptr + rows[:, None] * stride_dyt_n + offs_t[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(xt_ptr + cols[:, None] * stride_xt_k + offs_t[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + offs_k, acc, mask=mask_k)


# ---------------------------------------------------------------------------------------------
# launchers (wrapped as torch.library custom ops so torch.compile does not graph-break)
# ---------------------------------------------------------------------------------------------
def _device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device and its current stream: make that the
    tensors' device, or a process driving several GPUs launches on the wrong one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _coo_rows(crow: torch.Tensor, nnz: int) -> torch.Tensor:
    """Row of every nonzero; ``output_size`` avoids a device sync."""
    n_rows = crow.shape[0] - 1
    return torch.repeat_interleave(torch.arange(n_rows, device=crow.device), crow.to(torch.int64).diff(),
                                   output_size=nnz)


def _launch_spmm(y: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                 accumulate: bool) -> None:
    """The Triton SpMM into ``y`` ``(T, N)`` (row stride free, unit column stride), overwriting
    it or adding to it."""
    T, out_features = y.shape
    if T == 0 or out_features == 0:
        return
    xt = x.t().contiguous()  # (K, T); free when x is already a transposed view
    crow, col = crow.contiguous(), col.contiguous()  # indexed densely by the kernel (no-ops normally)
    n_blocks = cdiv(out_features, SPMM_BLOCK_R)
    # per row block, the longest row: the kernel's loop count (no host sync)
    counts = crow.to(torch.int64).diff()
    counts = torch.nn.functional.pad(counts, (0, n_blocks * SPMM_BLOCK_R - out_features))
    steps = counts.view(n_blocks, SPMM_BLOCK_R).amax(dim=1).to(torch.int32)
    grid = (n_blocks * cdiv(T, SPMM_BLOCK_T),)  # row blocks fastest (see the kernel)
    with _device_guard(x.device):
        _spmm_kernel[grid](
            xt, crow, col, val.contiguous(), steps, y,
            T, out_features,
            xt.stride(0), y.stride(0),
            ACCUMULATE=accumulate, BLOCK_T=SPMM_BLOCK_T, BLOCK_R=SPMM_BLOCK_R,
        )


def _check_raw(**tensors) -> None:
    """The raw Triton ops (reachable through ``torch.ops`` without the public wrappers' checks): one
    device for every operand, before a kernel reads a host pointer as a device one."""
    check_same_device(**tensors)


@custom_op("peft_kernels::sparse_spmm_triton", mutates_args=())
def _spmm_triton(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                 out_features: int) -> torch.Tensor:
    _check_raw(x=x, crow=crow, col=col, val=val)
    y = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    _launch_spmm(y, x, crow, col, val, accumulate=False)
    return y


@_spmm_triton.register_fake
def _(x, crow, col, val, out_features):
    return x.new_empty((x.shape[0], out_features))


@custom_op("peft_kernels::sparse_spmm_add_triton", mutates_args=("y",))
def _spmm_add_triton(y: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                     val: torch.Tensor) -> None:
    """``y += x @ (M⊙S)^T`` in place (``y`` ``(T, N)`` with a unit column stride, x's dtype; the
    native ops take the same, contiguous ``y`` on CUDA)."""
    if y.dim() != 2 or x.dim() != 2 or y.shape[0] != x.shape[0] or y.shape[1] != crow.shape[0] - 1:
        raise ValueError(f"y must be (T, N) = ({x.shape[0]}, {crow.shape[0] - 1}) for x {tuple(x.shape)}, "
                         f"got {tuple(y.shape)}")
    if y.dtype != x.dtype:
        raise ValueError(f"y and x must share one dtype, got {y.dtype} and {x.dtype}")
    if y.stride(1) != 1:
        raise ValueError(f"y must have a unit column stride, got strides {tuple(y.stride())}")
    _check_raw(y=y, x=x, crow=crow, col=col, val=val)
    _launch_spmm(y, x, crow, col, val, accumulate=True)


@_spmm_add_triton.register_fake
def _(y, x, crow, col, val):
    return None


@custom_op("peft_kernels::sparse_sddmm_triton", mutates_args=())
def _sddmm_triton(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    _check_raw(dy=dy, x=x, crow=crow, col=col)
    nnz = col.shape[0]
    T = x.shape[0]
    out = torch.zeros(nnz, dtype=torch.float32, device=x.device)
    if nnz == 0 or T == 0:
        return out
    dyt = dy.t().contiguous()
    xt = x.t().contiguous()
    col = col.contiguous()  # indexed densely by the kernel (a no-op normally)
    rows = _coo_rows(crow, nnz)
    grid = (cdiv(nnz, SDDMM_BLOCK_NNZ),)
    with _device_guard(x.device):
        _sddmm_kernel[grid](
            dyt, xt, rows, col, out,
            nnz, T,
            dyt.stride(0), xt.stride(0),
            BLOCK_NNZ=SDDMM_BLOCK_NNZ, BLOCK_T=SDDMM_BLOCK_T,
        )
    return out


@_sddmm_triton.register_fake
def _(dy, x, crow, col):
    return x.new_empty((col.shape[0],), dtype=torch.float32)


_NATIVE_OPS = ("sparse_spmm", "sparse_sddmm", "sparse_spmm_add_")


def _native_ops_loaded() -> bool:
    """All of this module's native ops are registered (an extension built from older sources may
    lack the newest: then the native implementations are unavailable, never an import error)."""
    return _ext.native() is not None and all(hasattr(torch.ops.peft_kernels, op) for op in _NATIVE_OPS)


# The native schemas live in csrc/registration.cpp; their fake (meta) kernels live here.
if _native_ops_loaded():
    @torch.library.register_fake("peft_kernels::sparse_spmm")
    def _(x, crow, col, val, out_features):
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("peft_kernels::sparse_sddmm")
    def _(dy, x, crow, col):
        return x.new_empty((col.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("peft_kernels::sparse_spmm_add_")
    def _(y, x, crow, col, val):
        return None


def _kernels(impl: str):
    """(spmm, sddmm) callables of one implementation."""
    if impl == "triton":
        return _spmm_triton, _sddmm_triton
    return torch.ops.peft_kernels.sparse_spmm, torch.ops.peft_kernels.sparse_sddmm


def _spmm_add(impl: str):
    """The in-place ``y += x @ (M⊙S)^T`` of one implementation."""
    if impl == "triton":
        return _spmm_add_triton
    return torch.ops.peft_kernels.sparse_spmm_add_


# Native CUDA or Triton: measured (issue 5, "dispatch prefers the fastest measured"). Dispatch's
# static order puts ``cuda`` first; where the Triton ops can run too and neither was forced, the
# first call per key times both on its own operands (the forward's in-place SpMM and the SDDMM,
# interleaved, ``lora._time_ms``) and keeps the faster. Off a GPU nothing is measured.
_IMPL_CHOICE: dict = {}
_IMPL_TIMES: dict = {}


def _impl_key(x2, val, crow, d_out: int, nnz: int) -> tuple:
    from .lora import _m_bucket

    return (str(x2.device), x2.dtype, _m_bucket(x2.shape[0]), x2.shape[1], d_out, _m_bucket(nnz), crow.dtype)


def measured_impl(which: str, forced: bool, x2, crow, col, val, d_out: int, timer=None) -> str:
    """``which`` (dispatch's choice), or, when it is ``cuda``, not forced and the Triton ops can run
    here, whichever of ``cuda`` / ``triton`` measured faster for this key (``timer`` maps
    ``{impl: callable}`` to ``{impl: ms}``; default: CUDA events, on CUDA tensors only)."""
    from .lora import deterministic

    if forced or which != "cuda" or col.shape[0] == 0 or x2.shape[0] == 0:
        return which
    if deterministic():  # as LoRA's base choice: a timing decision may differ between processes
        return which
    if dispatch.unavailable_reason("sparse", "triton", x2.device, x2.dtype) is not None:
        return which
    if crow.dtype != col.dtype:
        crow, col = crow.to(torch.int64), col.to(torch.int64)
    key = _impl_key(x2, val, crow, d_out, col.shape[0])
    hit = _IMPL_CHOICE.get(key)
    if hit is not None:
        return hit
    if torch.compiler.is_compiling():  # nothing can be timed while tracing: the static order
        return which
    if timer is None:
        if x2.device.type != "cuda" or capturing(x2.device):
            return which
        from .lora import _time_ms as timer
    xt = x2.detach().t().contiguous()
    val32 = val.detach().float()
    y = torch.zeros((x2.shape[0], d_out), device=x2.device, dtype=x2.dtype)
    # constant data (no RNG draw: the user's CUDA random stream must not depend on a cache hit)
    dyt = torch.full((d_out, x2.shape[0]), 0.5, device=x2.device, dtype=x2.dtype)

    def both(impl):
        spmm_add, sddmm = _spmm_add(impl), _kernels(impl)[1]
        return lambda: (spmm_add(y, xt.t(), crow, col, val32), sddmm(dyt.t(), xt.t(), crow, col))

    with torch.no_grad(), _device_guard(x2.device):
        times = timer({impl: both(impl) for impl in ("cuda", "triton")})
    choice = min(times, key=times.get)
    _IMPL_CHOICE[key], _IMPL_TIMES[key] = choice, times
    return choice


def impl_decisions() -> list[dict]:
    """Every measured cuda/triton decision of this process, with both times (ms, SpMM + SDDMM)."""
    names = ("device", "dtype", "tokens_bucket", "d_in", "d_out", "nnz_bucket", "index_dtype")
    return [dict(zip(names, key), choice=_IMPL_CHOICE[key], **{f"{i}_ms": t for i, t in times.items()})
            for key, times in _IMPL_TIMES.items()]


def _native_check(device, dtype) -> Optional[str]:
    if not _native_ops_loaded():
        return f"peft_kernels._C lacks some of the sparse ops {_NATIVE_OPS} (rebuild the extension)"
    return None


dispatch.register("sparse", "cuda", _native_check)
dispatch.register("sparse", "cpp", _native_check)
dispatch.register("sparse", "triton")
dispatch.register("sparse", "torch")


# ---------------------------------------------------------------------------------------------
# mask helpers
# ---------------------------------------------------------------------------------------------
def csr_transpose(crow: torch.Tensor, col: torch.Tensor, in_features: int):
    """CSR of ``(M⊙S)^T``: ``(crow_t (d_in+1,), row_t (nnz,), perm (nnz,))`` with ``val_t = val[perm]``.

    Built once per mask (a stable sort of the nnz column indices; no dense tensor). Index dtypes
    follow ``col``; ``perm`` is int64.
    """
    nnz = col.shape[0]
    col64 = col.to(torch.int64)
    # the mask's values were validated where it was built or loaded (``check_csr``): a crow that
    # does not sum to nnz would make this write out of bounds (output_size keeps it sync-free and
    # traceable by torch.compile)
    rows = _coo_rows(crow, nnz)
    # stable: within a column the rows stay increasing, so the transposed CSR is sorted too
    sorted_col, perm = torch.sort(col64, stable=True)
    # column c's entries start at the first sorted index >= c (no bincount: no device sync)
    crow_t = torch.searchsorted(sorted_col, torch.arange(in_features + 1, device=col.device))
    return crow_t.to(col.dtype), rows[perm].to(col.dtype), perm


def _check_csr_t(csr_t, nnz: int, in_features: int, device) -> None:
    if not (isinstance(csr_t, (tuple, list)) and len(csr_t) == 3):
        raise TypeError("csr_t must be the (crow_t, row_t, perm) triple returned by csr_transpose")
    crow_t, row_t, perm = csr_t
    check_tensor("csr_t[0] (crow_t)", crow_t, shape=(in_features + 1,), dtypes=(torch.int32, torch.int64))
    check_tensor("csr_t[1] (row_t)", row_t, shape=(nnz,), dtypes=(torch.int32, torch.int64))
    check_tensor("csr_t[2] (perm)", perm, shape=(nnz,), dtypes=(torch.int64,))
    for name, t in (("crow_t", crow_t), ("row_t", row_t), ("perm", perm)):
        if t.device != device:
            raise ValueError(f"csr_t {name} must be on {device} (the device of x), got {t.device}")


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------
class SparseAdapterFunction(torch.autograd.Function):
    """``x2 @ (M⊙S)^T`` on a 2-D input with a native or Triton implementation.

    forward(x2 (T, d_in), val (nnz,), crow, col, crow_t, row_t, perm, out_features, impl)
    """

    @staticmethod
    def forward(ctx, x2, val, crow, col, crow_t, row_t, perm, out_features, impl):
        spmm, _ = _kernels(impl)
        # One token-minor copy of x serves the forward gather and the backward SDDMM.
        xt = x2.t().contiguous()
        y = spmm(xt.t(), crow, col, val.float(), out_features)
        ctx.impl = impl
        ctx.in_features = x2.shape[1]
        ctx.val_dtype = val.dtype
        ctx.save_for_backward(xt if ctx.needs_input_grad[1] else None, val, crow, col, crow_t, row_t, perm)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        xt, val, crow, col, crow_t, row_t, perm = ctx.saved_tensors
        spmm, sddmm = _kernels(ctx.impl)
        dyt = dy.t().contiguous()  # shared by both kernels
        dx = dval = None
        if ctx.needs_input_grad[0]:
            dx = spmm(dyt.t(), crow_t, row_t, val.float()[perm], ctx.in_features)
        if ctx.needs_input_grad[1]:
            dval = sddmm(dyt.t(), xt.t(), crow, col).to(ctx.val_dtype)
        return dx, dval, None, None, None, None, None, None, None


class SparseLinearFunction(torch.autograd.Function):
    """``x2 @ W0^T (+ b) + x2 @ (M⊙S)^T`` with the adapter added *in place* onto the frozen
    product (forward) and onto ``dY @ W0`` (backward): no separate adapter output and no sum pass,
    which saves two passes over a ``T x d_out`` tensor forward and two over ``T x d_in`` backward
    against ``base + adapter`` (an adapter output written, then read twice and a sum written).

    forward(x2, weight, bias, val, crow, col, crow_t, row_t, perm, impl)
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, val, crow, col, crow_t, row_t, perm, impl):
        _, d_in = x2.shape
        xt = x2.t().contiguous()  # one token-minor copy serves the forward gather and the SDDMM
        w = weight.to(x2.dtype)
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(x2.dtype), x2, w.t())
        _spmm_add(impl)(y, xt.t(), crow, col, val.float())
        ctx.impl = impl
        ctx.val_dtype, ctx.weight_dtype = val.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        need_xt = ctx.needs_input_grad[3] or ctx.needs_input_grad[1]
        ctx.save_for_backward(xt if need_xt else None, w, val, crow, col, crow_t, row_t, perm)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        xt, w, val, crow, col, crow_t, row_t, perm = ctx.saved_tensors
        need_x, need_w, need_b, need_val = ctx.needs_input_grad[:4]
        _, sddmm = _kernels(ctx.impl)
        dx = dw = db = dval = None
        # one token-minor copy of dY serves the dX gather and the SDDMM (the kernels take x^T
        # layouts; passing dyt.t() makes their own transposes free)
        dyt = dy.t().contiguous()
        if need_x:
            dx = torch.mm(dyt.t(), w)
            _spmm_add(ctx.impl)(dx, dyt.t(), crow_t, row_t, val.float()[perm])
        if need_val:
            dval = sddmm(dyt.t(), xt.t(), crow, col).to(ctx.val_dtype)
        if need_w:
            dw = torch.mm(dyt, xt.t()).to(ctx.weight_dtype)
        if need_b:
            db = dyt.sum(1, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, db, dval, None, None, None, None, None, None


class RoSAFunction(torch.autograd.Function):
    """RoSA's ``x2 @ W0^T (+ b) + s * dropout(x2) @ A^T @ B^T + x2 @ (M⊙S)^T`` in one Function.

    The LoRA part runs on the LoRA family's fused kernels (``ops.lora``: down-projection, the base
    GEMM with the LoRA term in its epilogue, one pass over dY for g/dB, the dX GEMM with the
    ``g @ A`` term in its epilogue, dA) and the sparse part is added *in place* into the same
    output / dX (``sparse_spmm_add_``), so the composition ``lora + sparse`` costs no adapter-sized
    output and no sum pass. Only the token-minor ``x^T`` is saved (the LoRA kernels read it
    through strides), not x as well.

    forward(x2, weight, bias, lora_A, lora_B, val, crow, col, crow_t, row_t, perm, scaling,
    dropout_p, seed, base, impl)
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, lora_A, lora_B, val, crow, col, crow_t, row_t, perm, scaling, dropout_p,
                seed, base, impl):
        from .lora import _lora_down, _lora_gemm

        xt = x2.t().contiguous()
        xa = _lora_down(x2, lora_A, dropout_p, seed)
        y = _lora_gemm(x2, weight.t(), None, xa, lora_B.t(), bias, scaling, 0.0, seed, x2.dtype, base)
        _spmm_add(impl)(y, xt.t(), crow, col, val.float())
        ctx.save_for_backward(xt, weight, lora_A, lora_B, xa, seed, val, crow, col, crow_t, row_t, perm)
        ctx.scaling, ctx.dropout_p, ctx.base, ctx.impl = scaling, dropout_p, base, impl
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        from ..reference._philox import keep_scale
        from .lora import _lora_bwd, _lora_gemm, adapter_grads, deterministic

        xt, weight, lora_A, lora_B, xa, seed, val, crow, col, crow_t, row_t, perm = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        need_x, need_w, need_b, need_a, need_lb, need_val = ctx.needs_input_grad[:6]
        dx = dw = db = da = dlb = dval = None
        dy = dy.contiguous()
        dyt = dy.t().contiguous()  # token-minor dY: the dX gather and the SDDMM
        g, grads = _lora_bwd(dy, xt.t(), lora_B, xa, s, s, p, 0.0, seed, need_lb, need_a, deterministic())
        da, dlb = adapter_grads(grads, lora_A, lora_B, need_a, need_lb)
        if need_x:
            dx = _lora_gemm(dy, weight, None, g, lora_A, None, s * keep_scale(p), p, seed, dy.dtype, ctx.base)
            _spmm_add(ctx.impl)(dx, dyt.t(), crow_t, row_t, val.float()[perm])
        if need_val:
            _, sddmm = _kernels(ctx.impl)
            dval = sddmm(dyt.t(), xt.t(), crow, col).to(val.dtype)
        if need_w:
            dw = torch.mm(dyt, xt.t()).to(weight.dtype)
        if need_b and ctx.has_bias:
            db = dyt.sum(1, dtype=torch.float32).to(dy.dtype)
        return dx, dw, db, da, dlb, dval, *([None] * 10)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _check_adapter_args(x, crow, col, val, out_features: int):
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 0:
        raise ValueError(f"out_features must be a non-negative int, got {out_features!r}")
    check_tensor("x", x, min_ndim=1)
    d_in = x.shape[-1]
    check_csr(crow, col, val, (out_features, d_in), check_values=False)
    check_same_device(x=x, crow=crow, col=col, val=val)
    return d_in


def _kernel_csr(crow, col, d_in: int, csr_t):
    """(crow, col, crow_t, row_t, perm) in the kernels' index dtypes (one per CSR), the transpose
    built when not cached."""
    if crow.dtype != col.dtype:  # the kernels take one index dtype
        crow, col = crow.to(torch.int64), col.to(torch.int64)
    if csr_t is None:
        csr_t = csr_transpose(crow, col, d_in)
    crow_t, row_t, perm = csr_t
    if row_t.dtype != crow_t.dtype:
        crow_t, row_t = crow_t.to(torch.int64), row_t.to(torch.int64)
    return crow, col, crow_t, row_t, perm


def _adapter(x2, crow, col, val, out_features, which, csr_t):
    d_in = x2.shape[1]
    if csr_t is not None:
        _check_csr_t(csr_t, col.shape[0], d_in, x2.device)
    if which == "torch":
        return _reference_sparse_adapter(x2, crow, col, val, out_features)
    crow, col, crow_t, row_t, perm = _kernel_csr(crow, col, d_in, csr_t)
    return SparseAdapterFunction.apply(x2, val, crow, col, crow_t, row_t, perm, out_features, which)


def sparse_adapter(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, out_features: int,
                   impl: Optional[str] = None, csr_t=None) -> torch.Tensor:
    """The adapter part alone: ``x @ (M⊙S)^T``, ``(..., out_features)`` in ``x.dtype``.

    Differentiable w.r.t. ``x`` and ``val``. ``csr_t`` is the cached ``csr_transpose(crow, col,
    d_in)`` (built per call when omitted). The mask's index *values* are validated once when it is
    built (``check_csr``); per call only shapes/dtypes/devices are checked (no device sync).
    """
    _check_adapter_args(x, crow, col, val, out_features)
    which = dispatch.choose("sparse", x.device, x.dtype, impl)
    x2 = flatten_tokens(x)
    which = measured_impl(which, dispatch.is_forced("sparse", impl), x2, crow, col, val, out_features)
    y = _adapter(x2, crow, col, val, out_features, which, csr_t)
    return y.reshape(*x.shape[:-1], out_features)


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, impl: Optional[str] = None, csr_t=None) -> torch.Tensor:
    """``x @ W0^T (+ b) + x @ (M⊙S)^T`` = ``peft_kernels.reference.sparse``; ``(..., d_out)`` in ``x.dtype``."""
    check_tensor("weight", weight, ndim=2)
    d_out, d_in = weight.shape
    check_input(x, d_in)
    check_csr(crow, col, val, (d_out, d_in), check_values=False)
    check_bias(bias, d_out)
    check_same_device(x=x, weight=weight, crow=crow, col=col, val=val, bias=bias)
    if csr_t is not None:
        _check_csr_t(csr_t, col.shape[0], d_in, x.device)
    dtype = dispatch.compute_dtype(x)
    which = dispatch.choose("sparse", x.device, dtype, impl)
    if which == "torch":
        return dispatch.in_dtype(_reference_sparse(x, weight, crow, col, val, bias, check_values=False), dtype)
    crow, col, crow_t, row_t, perm = _kernel_csr(crow, col, d_in, csr_t)
    # Under autocast: the base GEMM and the adapter run in the autocast dtype (as F.linear would),
    # autocast off inside so the in-place add sees one dtype; differentiable casts keep fp32 grads.
    with torch.autocast(x.device.type, enabled=False):
        x2 = flatten_tokens(x).to(dtype)
        bias = None if bias is None else bias.to(dtype)
        which = measured_impl(which, dispatch.is_forced("sparse", impl), x2, crow, col, val, d_out)
        y = SparseLinearFunction.apply(x2, weight, bias, val, crow, col, crow_t, row_t, perm, which)
    return y.reshape(*x.shape[:-1], d_out)


def rosa_linear(x: torch.Tensor, weight: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                lora_A: torch.Tensor, lora_B: torch.Tensor, bias: Optional[torch.Tensor] = None,
                scaling: float = 1.0, dropout_p: float = 0.0, seed: int | torch.Tensor = 0,
                impl: Optional[str] = None, csr_t=None, *, lora_impl: Optional[str] = None,
                base: Optional[str] = None) -> torch.Tensor:
    """RoSA (``W0 + M⊙S + s * B A``): ``lora_linear(x, ...) + sparse_adapter(x, ...)``, fused.

    ``impl`` picks the sparse implementation and ``lora_impl`` the LoRA one (each family's
    dispatch by default); the LoRA dropout applies to the LoRA branch only, as in the composition.
    When the LoRA part runs on its Triton kernels (r <= 256) and the sparse part on a native or
    Triton kernel, ``RoSAFunction`` runs both in one pass structure (sparse added in place);
    otherwise the two reference-equal functions are composed."""
    from .lora import MAX_RANK, _seed_tensor, base_mode, lora_linear
    from ..reference.lora import check_lora_args

    check_lora_args(x, weight, lora_A, lora_B, bias, dropout_p, seed, scaling)
    d_out, d_in = weight.shape
    check_csr(crow, col, val, (d_out, d_in), check_values=False)
    check_same_device(x=x, crow=crow, col=col, val=val)
    if csr_t is not None:
        _check_csr_t(csr_t, col.shape[0], d_in, x.device)
    dtype = dispatch.compute_dtype(x)
    which = dispatch.choose("sparse", x.device, dtype, impl)
    lora_which = dispatch.choose("lora", x.device, dtype, lora_impl)
    fused = which != "torch" and lora_which == "triton" and lora_A.shape[0] <= MAX_RANK
    if not fused:
        y = lora_linear(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, impl=lora_which, base=base)
        return dispatch.in_dtype(y + sparse_adapter(x, crow, col, val, d_out, impl=which, csr_t=csr_t), dtype)
    crow, col, crow_t, row_t, perm = _kernel_csr(crow, col, d_in, csr_t)
    # In one dtype, the autocast one under autocast (as F.linear would), else x's (as lora_linear
    # does): differentiable casts, so fp32 adapter weights get fp32 gradients; autocast is off inside
    # so no op changes precision on its own (the sparse values keep theirs: the kernels accumulate in fp32).
    with torch.autocast(x.device.type, enabled=False):
        x2, weight, bias, lora_A, lora_B = (t if t is None or t.dtype == dtype else t.to(dtype)
                                            for t in (flatten_tokens(x), weight, bias, lora_A, lora_B))
        which = measured_impl(which, dispatch.is_forced("sparse", impl), x2, crow, col, val, d_out)
        y = RoSAFunction.apply(x2.contiguous(), weight, bias, lora_A.contiguous(), lora_B, val, crow, col, crow_t,
                               row_t, perm, float(scaling), float(dropout_p), _seed_tensor(seed), base_mode(base),
                               which)
    return y.reshape(*x.shape[:-1], d_out)


__all__ = ["impl_decisions", "measured_impl", "RoSAFunction", "SparseAdapterFunction", "SparseLinearFunction", "rosa_linear", "csr_transpose", "sparse_adapter", "sparse_linear"]
