"""Compile every Triton kernel of ``peft_kernels.ops`` for an H100 (sm_90) without a GPU and report
ptxas's resource usage: registers per thread, spill bytes, shared memory, compile OK/FAILED.

    python benchmarks/sm90_compile_report.py                 # full table (every autotune config)
    python benchmarks/sm90_compile_report.py --quick         # one bf16 case per kernel (the test)
    python benchmarks/sm90_compile_report.py --markdown t.md --json t.json

Why: the CPU interpreter (the test suite's Triton backend) never runs the NVIDIA compiler, so a
kernel can pass every test and still fail to lower for sm_90, or spill its accumulators to local
memory. ``triton.compile`` of an ``ASTSource`` with ``GPUTarget("cuda", 90, 128)`` runs the whole
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) on the CPU; ptxas's ``-v`` log (which triton
prints when ``knobs.nvidia.dump_ptxas_log`` is set) gives registers and spills, the compiled
metadata gives the shared memory. Nothing here runs a kernel, so nothing here measures speed.

Coverage is checked, not assumed: every ``@triton.jit`` function defined in the ops modules is found
by walking the modules (autotune wrappers unwrapped). A function launched somewhere (``name[grid]``
in its module's source, or ``name`` handed first to a launcher helper) must have an entry in ``CASES``; every other one must be called (through
the AST call graph) by a kernel that has one. Anything else, or a stale ``CASES`` key, is an error.

Signatures come from the kernels themselves: ``fn.params`` gives the names and which are
``tl.constexpr``; the project's argument-group comments (``# pointers`` ...) say which are pointers.
Non-constexpr arguments are specialised the way a real launch specialises them (triton's own
``native_specialize_impl``): pointers as 16-byte aligned tensors of the case's dtype (fp32 where the
case lists the buffer as fp32), contiguous-axis strides as the constant 1, other integers as a
multiple of 16 (LLM shapes: T = 8192, d = 4096), the seed as an int64, float scalars as fp32, host-side
tensor descriptors (the ``# tensor descriptors`` group) as 4096 x 4096 row-major TensorDescriptors over a
MockTensor whose block shapes the case's ``pre_hook`` (the autotune config's own) sets. The
constexpr values come from the launchers' own helpers and the autotuners' ``.configs`` wherever the
ops modules expose them (and this script runs without ``TRITON_INTERPRET``, so those helpers return
their GPU choices); block sizes that are inline literals in a launcher are repeated in ``CASES``.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import io
import json
import os
import re
import sys
import time
import traceback
import types
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Optional

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # under the interpreter @triton.jit returns interpreter objects that cannot be compiled, and
    # triton reads the variable when the ops modules are decorated: start again without it
    if __name__ != "__main__":
        raise ImportError("sm90_compile_report must be imported in a process without TRITON_INTERPRET")
    os.environ.pop("TRITON_INTERPRET")
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, MockTensor  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402

from peft_kernels.ops import _casts, _dropout, lily, lora, monarch, sparse  # noqa: E402

MODULES = (lora, monarch, lily, sparse, _dropout, _casts)
TARGET = GPUTarget("cuda", 90, 32)  # H100: compute capability 9.0, warp size 32
# sm_90's largest shared-memory allocation per block (227 KiB, opt-in): a kernel above it compiles
# but fails to launch (triton raises OutOfResources; the autotuner then just skips the config)
H100_SMEM_LIMIT = 232448
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# representative values for the non-constexpr scalars (see the module docstring)
INT_VALUE = 4096
SEED_VALUE = 2**40 + 12345
FLOAT_SCALARS = ("scale", "keep_scale", "scaling", "inv_t")
SEEDS = ("seed",)
# a device stand-in for launcher helpers that only ask "is this tensor on CUDA?" (lily)
_CUDA = types.SimpleNamespace(type="cuda")


def _on_cuda(dtype: torch.dtype):
    return types.SimpleNamespace(dtype=dtype, device=_CUDA)


@dataclasses.dataclass
class Case:
    dtype: str  # data dtype of the pointers not listed as fp32
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    fp32: tuple = ()  # pointer arguments that are fp32 buffers whatever the data dtype
    unit: tuple = ()  # stride arguments that are 1 at the real launch (contiguous axis)
    note: str = ""  # what the case stands for (which launch / autotune config)
    # sets the tensor descriptors' block shapes from the constexprs (an autotune config's pre_hook,
    # called as the autotuner calls it: with a dict of the arguments); None: no descriptor arguments
    pre_hook: Optional[Callable] = None


def _at_configs(kernel) -> list:
    """The autotuner's configs (the GPU list: this process runs without TRITON_INTERPRET)."""
    assert isinstance(kernel, Autotuner), kernel
    return list(kernel.configs)


def _cfg(c) -> tuple[dict, int, int]:
    return dict(c.kwargs), c.num_warps, c.num_stages


# =============================================================================================
# CASE TABLE: one generator per launched kernel. The FIRST case of each generator is the quick
# (test) case: bf16, the first autotune config, dropout on where the kernel has a dropout flag.
# =============================================================================================


def _every_config(case, cfgs, fwd, dx):
    """A GEMM kernel's cases over its autotune configs: the quick case first (bf16 dX, first config),
    then bf16 and fp32 forward and dX on every config."""
    yield case("bf16", dx, cfgs[0])
    for dt in ("bf16", "fp32"):
        for mode in (fwd, dx):
            for i, c in enumerate(cfgs):
                if (dt, mode, i) != ("bf16", dx, 0):
                    yield case(dt, mode, c)


def _lora_gemm():
    cfgs = _at_configs(lora._lora_gemm_kernel)
    # (HAS_GEMM, HAS_C, HAS_BIAS, HAS_DROPOUT, R, unit strides, which launch); `left` (xa or g) is fp32.
    # Forward reads W0^T and B^T as transposed views, dX reads W0 and A row-major (see LoRAFunction).
    fwd_unit = ("stride_xk", "stride_wk", "stride_lr", "stride_rr", "stride_on")
    dx_unit = ("stride_xk", "stride_wn", "stride_lr", "stride_rn", "stride_on")
    fwd = (True, False, True, False, 16, fwd_unit, "forward x@W0^T + s xa B^T + b")
    dx = (True, False, False, True, 16, dx_unit, "backward dX = dY W0 + mask*g A")
    add_fwd = (False, True, False, False, 16, ("stride_cn", "stride_lr", "stride_rr", "stride_on"),
               "cuBLAS-base forward, add-only")
    add_dx = (False, True, False, True, 16, ("stride_cn", "stride_lr", "stride_rn", "stride_on"),
              "cuBLAS-base dX, add-only")
    wide = (True, False, False, True, 256, dx_unit, "dX at r=256 (R_BLOCK 64)")
    out_drop = (True, False, True, True, 128, fwd_unit, "Monarch forward: output dropout, R=128")

    def case(dt, mode, c):
        g, hc, b, d, r, unit, note = mode
        kw, w, s = _cfg(c)
        cx = dict(HAS_GEMM=g, HAS_C=hc, HAS_BIAS=b, HAS_DROPOUT=d, R_BLOCK=lora._r_block(r),
                  DOT_PRECISION=lora._dot_precision(DTYPES[dt]), **kw)
        return Case(dt, cx, w, s, fp32=("left_ptr",), unit=unit, note=note)

    yield from _every_config(case, cfgs, fwd, dx)
    add_cfg = lora._add_only_config()  # the add-only mode's one fixed tile (never autotuned)
    add_cfg = triton.Config({k: v for k, v in add_cfg.items() if k.isupper()}, num_warps=add_cfg["num_warps"],
                            num_stages=add_cfg["num_stages"])
    for mode in (add_fwd, add_dx):
        yield case("bf16", mode, add_cfg)
    for mode in (wide, out_drop):
        yield case("bf16", mode, cfgs[0])
    yield case("fp16", fwd, cfgs[0])
    yield case("fp16", dx, cfgs[0])


def _lora_gemm_tma():
    """The TMA base GEMM (forward and dX only: it has no add-only mode). Its descriptors' block
    shapes come from the configs' own pre_hook (``lora._set_tma_blocks``), as at a launch."""
    cfgs = _at_configs(lora._lora_gemm_tma_kernel)
    # (W_NK, HAS_BIAS, HAS_DROPOUT, R, unit strides, which launch); `left` (xa or g) is fp32
    fwd = (True, True, False, 16, ("stride_lr", "stride_rr", "stride_on"), "forward x@W0^T + s xa B^T + b, TMA")
    dx = (False, False, True, 16, ("stride_lr", "stride_rn", "stride_on"), "backward dX = dY W0 + mask*g A, TMA")
    wide = (False, False, True, 256, dx[4], "dX at r=256 (R_BLOCK 64), TMA")
    out_drop = (True, True, True, 128, fwd[4], "Monarch forward: output dropout, R=128, TMA")

    def case(dt, mode, c):
        w_nk, b, d, r, unit, note = mode
        kw, w, s = _cfg(c)
        # fp32 takes the TMA base only with TF32 dots (lora.tma_eligible), whatever this process's setting
        cx = dict(W_NK=w_nk, HAS_C=False, HAS_BIAS=b, HAS_DROPOUT=d, R_BLOCK=lora._r_block(r),
                  DOT_PRECISION="tf32" if dt == "fp32" else lora._dot_precision(DTYPES[dt]), **kw)
        return Case(dt, cx, w, s, fp32=("left_ptr",), unit=unit, note=note, pre_hook=c.pre_hook)

    yield from _every_config(case, cfgs, fwd, dx)
    for mode in (wide, out_drop):
        yield case("bf16", mode, cfgs[0])
    yield case("fp16", fwd, cfgs[0])
    yield case("fp16", dx, cfgs[0])


def _small_cfgs(kernel, r_pad: int, **launch) -> list:
    """The autotune configs the kernel's pruning keeps at ``r_pad`` (first = the quick case's)."""
    return lora._prune_small(_at_configs(kernel), {}, R_PAD=r_pad, **launch)


def _lora_rows():
    """``_lora_rows_kernel``'s two jobs: the backward g/dB pass (HAS_DW; dropout on dY is the
    output-side dropout of Monarch's fused-GEMM path) and the forward down-projection (no dW; dropout
    on x), at the rank pads that change the pruned autotune list: every kept config in bf16 with
    dropout on, the first kept config otherwise."""
    fp32 = ("xa_ptr", "out_ptr", "dw_ptr")
    gb_unit = ("stride_in", "stride_wr", "stride_xar", "stride_or", "stride_dwr")  # dY, B, xa, g, dB
    down_unit = ("stride_in", "stride_wn", "stride_or")  # x, A^T view, xa
    for dt, r_pads in (("bf16", (16, 64, 256)), ("fp32", (16, 64, 256)), ("fp16", (16,))):
        for r_pad in r_pads:
            for has_dw, unit, note in ((True, gb_unit, "g/dB pass"), (False, down_unit, "down-projection")):
                cfgs = _small_cfgs(lora._lora_rows_kernel, r_pad, HAS_DW=has_dw)
                for drop in (True, False):
                    # the down-projection scales its output by keep_scale exactly when dropout is on
                    scale = drop and not has_dw
                    for c in cfgs if (dt == "bf16" and drop) else cfgs[:1]:
                        kw, w, st = _cfg(c)
                        yield Case(dt, dict(HAS_DW=has_dw, HAS_DROPOUT=drop, SCALE_OUT=scale, R_PAD=r_pad,
                                            DOT_PRECISION=lora._dot_precision(DTYPES[dt]), **kw),
                                   w, st, fp32=fp32, unit=unit, note=note)
    # deterministic mode: g only (dB from the dA kernel), dY row-major
    kw, w, st = _cfg(_small_cfgs(lora._lora_rows_kernel, 16, HAS_DW=False)[0])
    yield Case("bf16", dict(HAS_DW=False, HAS_DROPOUT=False, SCALE_OUT=False, R_PAD=16, DOT_PRECISION="tf32", **kw),
               w, st, fp32=fp32, unit=gb_unit, note="deterministic: g only")


def _lora_da():
    unit = ("stride_gr", "stride_xk", "stride_dak")
    bk = lora._DA_BLOCK_K
    for dt, r_pads in (("bf16", (16, 64, 256)), ("fp32", (16, 64, 256)), ("fp16", (16,))):
        for r_pad in r_pads:
            cfgs = _small_cfgs(lora._lora_bwd_da_kernel, r_pad, BLOCK_K=bk)
            for drop in (True, False):
                for c in cfgs if (dt == "bf16" and drop) else cfgs[:1]:
                    kw, w, st = _cfg(c)
                    yield Case(dt, dict(DETERMINISTIC=False, HAS_DROPOUT=drop, R_PAD=r_pad,
                                        DOT_PRECISION=lora._dot_precision(DTYPES[dt]), BLOCK_K=bk, **kw),
                               w, st, fp32=("g_ptr", "da_ptr"), unit=unit)
    # deterministic mode: per-split partials instead of atomics (dA, and dB with g = xa, x = dY)
    kw, w, st = _cfg(_small_cfgs(lora._lora_bwd_da_kernel, 16, BLOCK_K=bk)[0])
    yield Case("bf16", dict(DETERMINISTIC=True, HAS_DROPOUT=True, R_PAD=16, DOT_PRECISION="tf32", BLOCK_K=bk, **kw),
               w, st, fp32=("g_ptr", "da_ptr"), unit=unit, note="deterministic partials")


def _monarch_rb(N, r, n=4096):
    return monarch._chunks(N, r, triton.cdiv(n, N), n)[0]


def _monarch_cases(kernel, flag: str, fp32: tuple, **fixed):
    """Cases for one Monarch kernel: its first autotune config in bf16 with ``flag`` on first (the
    quick subset), then bf16 and fp32 over every config with ``flag`` on and off at the default
    chunk width (N = r = 4), every config at the widest chunk (N = r = 64), and fp16 once."""
    def gen():
        cfgs = _at_configs(kernel)
        rb_default, rb_max = _monarch_rb(4, 4), _monarch_rb(64, 64)

        def case(dt, c, on, rb):
            kw, w, s = _cfg(c)
            return Case(dt, dict(fixed, RB=rb, **{flag: on}, **monarch._dot_args(DTYPES[dt]), **kw), w, s,
                        fp32=fp32)

        yield case("bf16", cfgs[0], True, rb_default)
        for dt in ("bf16", "fp32"):
            for c in cfgs:
                for on in (True, False):
                    if (dt, c, on) != ("bf16", cfgs[0], True):
                        yield case(dt, c, on, rb_default)
            for c in cfgs:
                yield case(dt, c, True, rb_max)
        yield case("fp16", cfgs[0], True, rb_default)

    return gen


_monarch_fwd = _monarch_cases(monarch._monarch_fwd_kernel, "HAS_DROPOUT", ("Y1",))
_monarch_dy1 = _monarch_cases(monarch._monarch_bwd_dy1_kernel, "HAS_DROPOUT", ("Y1", "DY1P", "P2"),
                              BLOCK_T=monarch._BWD_BLOCK_T_GPU)
_monarch_dx = _monarch_cases(monarch._monarch_bwd_dx_kernel, "NEED_DX", ("DY1", "P1"),
                             BLOCK_T=monarch._BWD_BLOCK_T_GPU)


# lily: rank-dependent tiles come from the module's _rank_tile, the rest are the launchers' literals; E = 8, r = 16
# (r = 256 for the wide variants). R_PAD/E_PAD/BLOCK_C use the module's own _pad16.
_LILY_E, _LILY_R = 8, 16


def _lily_dtypes():
    return (("bf16", _LILY_R), ("fp32", _LILY_R), ("bf16", 256), ("fp16", _LILY_R))


def _lily_proj():
    for dt, r in _lily_dtypes():
        rp, ep = lily._pad16(r), lily._pad16(_LILY_E)
        bt = bk = lily._rank_tile(rp)  # _launch_proj
        for router_x in (True, False):
            yield Case(dt, dict(ROUTER_X=router_x, DOT=lily._dot_mode(_on_cuda(DTYPES[dt])), BLOCK_T=bt, BLOCK_K=bk,
                                R_PAD=rp, E_PAD=ep), 4, 3, fp32=("h_ptr", "p_ptr", "psum_ptr"),
                       note=f"r={r} E={_LILY_E}")


def _lily_mix():
    # token routing only; launched only for E*r > lily.FUSED_MAX_K (BLOCK_C saturates at 64 well below that)
    for dt, r in _lily_dtypes():
        kz = _LILY_E * r
        bm, bn, bc, w = lily._mix_blocks(_on_cuda(DTYPES[dt]), kz)
        yield Case(dt, dict(DOT=lily._dot_mode(_on_cuda(DTYPES[dt])), BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc), w, 3,
                   fp32=("h_ptr", "p_ptr"), note=f"r={r} E={_LILY_E}")


def _lily_dz():
    for dt, r in _lily_dtypes():
        for token in (True, False):
            kz = _LILY_E * r if token else r
            yield Case(dt, dict(DOT=lily._dot_mode(_on_cuda(DTYPES[dt])), BLOCK_M=64, BLOCK_O=64,
                                BLOCK_C=min(128, lily._pad16(kz))), 4, 3, fp32=("dz_ptr",),  # _launch_dz
                       note=f"r={r} {'token' if token else 'batch'}")


def _lily_dhp():
    for dt, r in _lily_dtypes():
        for token in (True, False):
            kz = (_LILY_E if token else 1) * r
            yield Case(dt, dict(TOKEN=token, DOT=lily._dot_mode(_on_cuda(DTYPES[dt])), BLOCK_O=64,
                                BLOCK_C=min(64, lily._pad16(kz)), BLOCK_T=64), 4, 3,  # _launch_dhp
                       fp32=("h_ptr", "p_ptr", "part_ptr"), note=f"r={r}")


def _lily_route():
    for dt, r in _lily_dtypes():
        rp, ep = lily._pad16(r), lily._pad16(_LILY_E)
        for token, router_h in ((True, True), (True, False), (False, True)):
            # _launch_route_bwd: the router-on-h term stays in the kernel only up to ROUTE_BWD_MAX_RE
            in_kernel = router_h and rp * ep <= lily.ROUTE_BWD_MAX_RE
            yield Case(dt, dict(TOKEN=token, ROUTER_H=in_kernel, BLOCK_T=lily._rank_tile(rp),
                                R_PAD=rp, E_PAD=ep), 4, 3,
                       fp32=("dz_ptr", "h_ptr", "p_ptr", "dw_ptr", "dh_ptr", "dlog_ptr"),
                       note=f"r={r}" + (", router term after the kernel" if router_h and not in_kernel else ""))
            if dt != "bf16":
                break  # only the router is in the data dtype (cast up in-kernel): one case per other dtype


def _lily_gradw():
    for dt, r in _lily_dtypes():
        rp, ep = lily._pad16(r), lily._pad16(_LILY_E)
        bk = bt = lily._rank_tile(rp)  # _launch_gradw
        for router_x in (True, False):
            yield Case(dt, dict(ROUTER_X=router_x, DOT=lily._dot_mode(_on_cuda(DTYPES[dt])), BLOCK_K=bk, BLOCK_T=bt,
                                R_PAD=rp, E_PAD=ep), 4, 3, fp32=("dh_ptr", "dlog_ptr", "dlp_part_ptr", "dr_part_ptr"),
                       note=f"r={r}")


def _monarch_expand():
    # fused-GEMM path: the factors' expansions in the layer dtype, from factors in it or in fp32
    for dt, fp32, note in (("bf16", (), "bf16 factors"), ("bf16", ("w1_ptr", "w2_ptr"), "fp32 factors"),
                           ("fp32", (), "fp32")):
        yield Case(dt, dict(BLOCK=monarch.EXPAND_BLOCK, FIX=False), 4, 3, fp32=fp32, note=note)


def _monarch_expand_bwd():
    for dt, fp32, note in (("bf16", (), "bf16 factors"), ("bf16", ("dw1_ptr", "dw2_ptr"), "fp32 factors"),
                           ("fp32", (), "fp32")):
        yield Case(dt, dict(BLOCK=monarch.EXPAND_BLOCK, FIX=False), 4, 3, fp32=fp32, note=note)


def _sparse_spmm():
    # ACCUMULATE: sparse_linear's in-place add onto the frozen product (first: the training path)
    for dt, acc in (("bf16", True), ("bf16", False), ("fp32", True), ("fp16", True)):
        yield Case(dt, dict(ACCUMULATE=acc, BLOCK_T=sparse.SPMM_BLOCK_T, BLOCK_R=sparse.SPMM_BLOCK_R), 4, 3,
                   fp32=("val_ptr",), note="crow/col/steps int32")


def _sparse_sddmm():
    for dt in ("bf16", "fp32", "fp16"):
        yield Case(dt, dict(BLOCK_NNZ=sparse.SDDMM_BLOCK_NNZ, BLOCK_T=sparse.SDDMM_BLOCK_T), 4, 3,
                   fp32=("out_ptr",), note="rows/col int32")


# int32 index buffers (CSR) are named here; everything else in the pointer group is data or fp32
INT32_PTRS = ("crow_ptr", "col_ptr", "steps_ptr", "rows_ptr")

CASES: dict[str, Callable[[], Iterator[Case]]] = {
    "lora._lora_gemm_kernel": _lora_gemm,
    "lora._lora_gemm_tma_kernel": _lora_gemm_tma,
    "lora._lora_rows_kernel": _lora_rows,
    "lora._lora_bwd_da_kernel": _lora_da,
    "monarch._monarch_fwd_kernel": _monarch_fwd,
    "monarch._monarch_bwd_dy1_kernel": _monarch_dy1,
    "monarch._monarch_bwd_dx_kernel": _monarch_dx,
    "monarch._monarch_expand_kernel": _monarch_expand,
    "monarch._monarch_expand_bwd_kernel": _monarch_expand_bwd,
    "lily._lily_proj_kernel": _lily_proj,
    "lily._lily_mix_kernel": _lily_mix,
    "lily._lily_dz_kernel": _lily_dz,
    "lily._lily_dhp_kernel": _lily_dhp,
    "lily._lily_route_bwd_kernel": _lily_route,
    "lily._lily_gradw_kernel": _lily_gradw,
    "sparse._spmm_kernel": _sparse_spmm,
    "sparse._sddmm_kernel": _sparse_sddmm,
}
# =============================================================================================


class CoverageError(RuntimeError):
    pass


def fingerprint() -> str:
    """sha256 (12 hex) of the ops modules' sources: which kernel code a table was made from."""
    import hashlib
    h = hashlib.sha256()
    for mod in MODULES:
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()[:12]


def _short(module) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def _unwrap(obj) -> Optional[JITFunction]:
    """The JITFunction under autotune/heuristics wrappers, else None."""
    seen = 0
    while obj is not None and not isinstance(obj, JITFunction) and seen < 8:
        obj = getattr(obj, "fn", None)
        seen += 1
    return obj if isinstance(obj, JITFunction) else None


def discover() -> dict[str, tuple[object, JITFunction, bool]]:
    """{"module.name": (launch object, JITFunction, launched?)} for every @triton.jit function
    *defined* in the ops modules (imported helpers are counted once, where they are defined)."""
    found = {}
    for mod in MODULES:
        src = inspect.getsource(mod)
        for name, obj in vars(mod).items():
            jit = _unwrap(obj)
            if jit is None or jit.fn.__module__ != mod.__name__:
                continue
            # launched as name[grid](...), or handed to a launcher as its first argument (lora's
            # _tuned_launch(kernel, grid, ...), monarch's _launch_pair(kernel, ...))
            launched = re.search(rf"\b{re.escape(name)}\[|\(\s*{re.escape(name)}\s*,", src) is not None
            found[f"{_short(mod)}.{name}"] = (obj, jit, launched)
    return found


def _callees(jit: JITFunction) -> set:
    """JITFunctions called by name in ``jit``'s body (resolved in its module's globals)."""
    out = set()
    for node in ast.walk(ast.parse(jit.src if hasattr(jit, "src") else inspect.getsource(jit.fn))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            callee = _unwrap(jit.fn.__globals__.get(node.func.id))
            if callee is not None and callee is not jit:
                out.add(callee)
    return out


def check_coverage(found) -> dict[str, list[str]]:
    """Raise CoverageError unless every kernel has cases and every helper is reached from one.
    Returns {helper: [covering kernels]}."""
    problems = []
    stale = sorted(set(CASES) - set(found))
    if stale:
        problems.append(f"CASES names kernels that do not exist (renamed/removed?): {stale}")
    kernels = {k for k, (_, _, launched) in found.items() if launched}
    missing = sorted(kernels - set(CASES))
    if missing:
        problems.append(f"kernels launched in the ops modules with no entry in CASES: {missing}")
    by_jit = {id(j): k for k, (_, j, _) in found.items()}
    reached: dict[str, list[str]] = {}
    for k in sorted(kernels & set(CASES)):
        stack, seen = [found[k][1]], set()
        while stack:
            j = stack.pop()
            for c in _callees(j):
                if id(c) in seen:
                    continue
                seen.add(id(c))
                stack.append(c)
                if id(c) in by_jit:
                    reached.setdefault(by_jit[id(c)], []).append(k)
    helpers = {k for k, (_, _, launched) in found.items() if not launched}
    orphans = sorted(helpers - set(reached) - set(CASES))
    if orphans:
        problems.append(f"@triton.jit functions neither launched nor called by a covered kernel: {orphans}")
    if problems:
        raise CoverageError("sm_90 compile coverage is incomplete:\n  " + "\n  ".join(problems))
    return {h: reached[h] for h in sorted(helpers & set(reached))}


def _groups(jit: JITFunction) -> dict[str, str]:
    """Argument name -> its group comment (``# pointers`` ...) from the kernel's signature."""
    src = jit.src if hasattr(jit, "src") else inspect.getsource(jit.fn)
    header = src[src.index("def "):]
    header = header[header.index("(") + 1:header.index("):")]
    group, out = "", {}
    for line in header.splitlines():
        s = line.strip()
        if s.startswith("#"):
            group = s.lstrip("# ").lower()
            continue
        code = s.split("#", 1)[0]
        for tok in code.split(","):
            tok = tok.split(":")[0].strip()
            if tok:
                out[tok] = group
    return out


def build(jit: JITFunction, case: Case):
    """(signature, constexprs, attrs) as a launch with representative H100-sized arguments makes them."""
    groups = _groups(jit)
    signature, constexprs, attrs = {}, {}, {}
    declared = {p.name for p in jit.params if p.is_constexpr}
    extra = set(case.constexprs) - declared
    if extra:
        raise KeyError(f"case sets constexprs the kernel does not declare: {sorted(extra)}")
    descs = {}  # tensor-descriptor arguments: (INT_VALUE, INT_VALUE) row-major matrices of the data dtype
    for p in jit.params:
        if not p.is_constexpr and groups.get(p.name, "").startswith("tensor desc"):
            descs[p.name] = TensorDescriptor(MockTensor(DTYPES[case.dtype]), [INT_VALUE, INT_VALUE], [INT_VALUE, 1],
                                             [16, 16])
    if descs:
        if case.pre_hook is None:
            raise KeyError(f"descriptor arguments {sorted(descs)} need a case pre_hook to set their block shapes")
        case.pre_hook({**descs, **case.constexprs})
    for i, p in enumerate(jit.params):
        name = p.name
        if p.is_constexpr:
            if name not in case.constexprs:
                raise KeyError(f"constexpr {name} has no value in the case")
            signature[name] = "constexpr"
            constexprs[name] = case.constexprs[name]
            continue
        if name in descs:
            value = descs[name]  # specialises as tensordesc<dtype[block shape]>, as at a launch
        elif groups.get(name, "").startswith("pointer"):
            dt = torch.int32 if name in INT32_PTRS else torch.float32 if name in case.fp32 else DTYPES[case.dtype]
            value = MockTensor(dt)  # data_ptr() = 0: 16-byte aligned, like every torch allocation
        elif name in FLOAT_SCALARS:
            value = 0.5
        elif name in SEEDS:
            value = SEED_VALUE
        elif name in case.unit:
            value = 1
        elif name.startswith("stride") or groups.get(name, "").startswith(("size", "stride", "this launch", "dropout",
                                                                           "lora epilogue", "scalars")):
            value = INT_VALUE
        else:
            raise KeyError(f"argument {name} (group {groups.get(name)!r}) has no representative value")
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":  # an integer 1: triton folds it into the kernel, as at a real launch
            signature[name] = "constexpr"
            constexprs[name] = spec
            continue
        signature[name] = ty
        if isinstance(spec, str):
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    unknown_unit = set(case.unit) - {p.name for p in jit.params}
    if unknown_unit:
        raise KeyError(f"case names unit strides the kernel does not have: {sorted(unknown_unit)}")
    return signature, constexprs, attrs


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_case(key: str, idx: int, case: Case) -> dict:
    """Compile one case; returns a result row (never raises: failures are rows too)."""
    from triton import knobs

    jit = discover()[key][1]
    cx_json = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in case.constexprs.items()}
    row = dict(kernel=key, idx=idx, dtype=case.dtype, warps=case.num_warps, stages=case.num_stages, constexprs=cx_json,
               note=case.note, ok=False, regs=None, stack=None, spill_st=None, spill_ld=None, smem=None, error="",
               seconds=None)
    t0 = time.perf_counter()
    try:
        signature, constexprs, attrs = build(jit, case)
        knobs.compilation.always_compile = True  # ptxas must run (and log) even when cached
        knobs.nvidia.dump_ptxas_log = True
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            k = triton.compile(triton.compiler.ASTSource(fn=jit, signature=signature, constexprs=constexprs,
                                                         attrs=attrs),
                               target=TARGET, options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
        log = buf.getvalue()
        regs, spill = _REGS.search(log), _SPILL.search(log)
        row.update(ok=True, regs=int(regs.group(1)) if regs else None, smem=int(k.metadata.shared))
        if spill:
            row.update(stack=int(spill.group(1)), spill_st=int(spill.group(2)), spill_ld=int(spill.group(3)))
    except Exception as e:  # report it: the point of the tool
        msg, cause = f"{type(e).__name__}: {e}", e.__cause__ or e.__context__
        while cause is not None:  # a CompilationError's str is the source excerpt; the reason is its cause
            msg += f"\ncaused by {type(cause).__name__}: {cause}"
            cause = cause.__cause__ or cause.__context__
        row["error"] = msg if len(msg) < 4000 else msg[:2000] + " ... " + msg[-1500:]
        if os.environ.get("SM90_TRACEBACK"):
            traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def all_cases(quick: bool) -> list[tuple[str, int, Case]]:
    out = []
    found = discover()
    for key, gen in CASES.items():
        cases = list(gen())
        if not cases:
            raise CoverageError(f"{key}: the case generator yields nothing")
        first = cases[0]
        jit = found[key][1]
        flags = [p.name for p in jit.params if p.is_constexpr and p.name == "HAS_DROPOUT"]
        if first.dtype != "bf16" or (flags and first.constexprs.get("HAS_DROPOUT") is not True):
            raise CoverageError(f"{key}: the first (quick) case must be bf16 with dropout on")
        out += [(key, i, c) for i, c in enumerate(cases[:1] if quick else cases)]
    return out


def _cfg_text(row) -> str:
    cx = row["constexprs"]
    drop = {"HAS_DROPOUT": "drop", "NEED_DX": "need_dx"}
    parts = []
    for k, v in cx.items():
        if k in ("DOT_PRECISION", "DOT_PREC", "INTERP_BF16", "DOT"):
            continue
        if isinstance(v, bool):
            if v:
                parts.append(drop.get(k, k.removeprefix("HAS_").lower()))
        else:
            parts.append(f"{k}={v}")
    parts.append(f"w{row['warps']}s{row['stages']}")
    return " ".join(parts)


def to_markdown(rows) -> str:
    lines = ["| kernel | dtype | config | regs | spill st/ld (B) | stack (B) | smem (B) | compile |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["ok"]:
            spill = f"{r['spill_st']}/{r['spill_ld']}" if r["spill_st"] is not None else "?"
            status = "OK" if r["smem"] <= H100_SMEM_LIMIT else "OK, smem > 227 KiB: cannot launch"
        else:
            # triton's CompilationError puts the source excerpt first and the cause last
            lines = [ln.strip() for ln in r["error"].splitlines() if ln.strip()]
            cause = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
            spill, status = "-", "FAILED: " + cause[:200].replace("|", "/")
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['kernel']} | {r['dtype']} | {_cfg_text(r)}{note} | {r['regs'] if r['ok'] else '-'} "
                     f"| {spill} | {r['stack'] if r['ok'] else '-'} | {r['smem'] if r['ok'] else '-'} | {status} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one bf16 case per kernel (first config, dropout on)")
    ap.add_argument("--kernel", action="append", default=[], help="only kernels whose name contains this")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--json", help="write the rows (and coverage) here as JSON")
    args = ap.parse_args(argv)

    found = discover()
    helpers = check_coverage(found)  # raises loudly on an uncovered kernel
    todo = all_cases(args.quick)
    if args.kernel:
        todo = [t for t in todo if any(s in t[0] for s in args.kernel)]
    print(f"triton {triton.__version__}, target {TARGET}, ops sources {fingerprint()}, {len(todo)} compiles, "
          f"{args.jobs} jobs", flush=True)
    for h, ks in helpers.items():
        print(f"helper {h}: compiled inside {', '.join(sorted(set(ks)))}")
    t0 = time.perf_counter()
    rows = []
    if args.jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            futs = [ex.submit(compile_case, *t) for t in todo]
            for f in futs:
                rows.append(f.result())
                r = rows[-1]
                print(f"{r['kernel']:36s} {r['dtype']:5s} {_cfg_text(r):60s} "
                      f"{'OK' if r['ok'] else 'FAILED'} regs={r['regs']} spill={r['spill_st']}/{r['spill_ld']} "
                      f"smem={r['smem']} {r['seconds']}s", flush=True)
    else:
        for t in todo:
            rows.append(compile_case(*t))
            r = rows[-1]
            print(f"{r['kernel']:36s} {r['dtype']:5s} {_cfg_text(r):60s} "
                  f"{'OK' if r['ok'] else 'FAILED'} regs={r['regs']} spill={r['spill_st']}/{r['spill_ld']} "
                  f"smem={r['smem']} {r['seconds']}s", flush=True)
    wall = time.perf_counter() - t0
    table = to_markdown(rows)
    print()
    print(table)
    failed = [r for r in rows if not r["ok"]]
    spilled = [r for r in rows if r["ok"] and (r["spill_st"] or 0) > 0]
    big = [r for r in rows if r["ok"] and r["smem"] > H100_SMEM_LIMIT]
    print(f"\n{len(rows)} compiles in {wall:.0f} s: {len(failed)} FAILED, {len(spilled)} spill, "
          f"{len(big)} need more than 227 KiB of shared memory")
    for r in failed:
        print(f"FAILED {r['kernel']} {r['dtype']} {_cfg_text(r)}:\n  {r['error']}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, ops_sha=fingerprint(), kernels=sorted(CASES), helpers=helpers,
                           rows=rows,
                           discovered=sorted(found), launched=sorted(k for k, v in found.items() if v[2]),
                           wall_s=round(wall, 1)), f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CoverageError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)
