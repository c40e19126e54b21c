"""The layer benchmark: every family, shape and configuration against the frozen base linear.

For each (family, shape) the frozen base ``x @ W^T`` (gradient to the input only) is timed first;
then each variant's forward, backward and forward+backward are timed in the same process, the base
is timed again after them, and every time is divided by the mean of the base's timings (the base
row shows that mean and, as ``base spread %``, how far its timings lay apart: the drift over the
run, the noise floor of every ratio beside it). Rows run later (the deferred torch.compile rows)
are bracketed by base timings of their own. Backward is timed on a retained graph
(``backward(retain_graph=True)``); where a variant cannot retain its graph the figure is
``fwd+bwd - fwd`` and the row says so.

Rows that cannot mean anything here (GPU-only competitors off CUDA, LoRA's base-pinned rows where
the fused path is not Triton) are kept with a ``skipped: <why>`` status, so the table and the
files say what was not measured. After the run, the LoRA GEMM's ``base="auto"`` decisions taken
in this process (``ops.lora.base_decisions()``, both times measured) are kept in
``BenchResult.base_decisions``.
"""
from __future__ import annotations

import gc
import importlib
import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import cases as C
from .meta import stamp
from .timing import keep_freed_memory, peak_memory_bytes, saved_bytes, time_ms

MiB = 1024 * 1024


@dataclass
class BenchResult:
    meta: dict
    settings: dict
    rows: list = field(default_factory=list)
    base_decisions: list = field(default_factory=list)  # see collect_base_decisions
    sparse_decisions: list = field(default_factory=list)  # see collect_sparse_decisions
    interrupted: bool = False  # stopped early (Ctrl-C / SIGINT, e.g. a time limit): rows are partial


def kernel_impl(family: str, device: torch.device, dtype: torch.dtype, impl: Optional[str]) -> tuple:
    """``(impl, None)`` the fused path will use here, or ``(None, reason)`` when it cannot run."""
    from peft_kernels import dispatch

    try:
        importlib.import_module(C.FAMILY_SPECS[family].op_module)
    except Exception as e:  # noqa: BLE001 - a missing or broken op module is reported in the table
        return None, f"{C.FAMILY_SPECS[family].op_module} not importable ({type(e).__name__}: {e})"
    try:
        return dispatch.choose(family, device, dtype, impl), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def skip_reason(var: C.Variant, device: torch.device, impl: Optional[str], impl_reason: Optional[str]) -> Optional[str]:
    """Why ``var`` is not run here (``None``: it runs). ``impl``/``impl_reason`` = ``kernel_impl``."""
    if var.gpu_only and device.type != "cuda":
        return f"GPU only ({var.why})" if var.why else "GPU only"
    if var.needs_impl is not None and impl != var.needs_impl:
        what = f" ({var.why})" if var.why else ""
        if impl is None:
            return f"{var.needs_impl} path only{what}, which cannot run here: {impl_reason}"
        hint = (f" (under TRITON_INTERPRET=1, --impl {var.needs_impl} runs it on the CPU, slowly)"
                if device.type == "cpu" and var.needs_impl == "triton" else "")
        return f"{var.needs_impl} path only{what}; the fused path here is {impl}{hint}"
    return None


def fused_builder(var: C.Variant, impl: str):
    """``var.build`` with the fused path's ``impl`` (and the pinned ``base``, if any) bound."""
    kw = {"impl": impl} if var.base is None else {"impl": impl, "base": var.base}
    return lambda setup, cfg: var.build(setup, cfg, **kw)


def default_base(family: str, impl: Optional[str]) -> Optional[str]:
    """What the base GEMM of the default LoRA row is: ``auto`` unless ``PEFT_KERNELS_BASE`` pins it
    (``None`` off the Triton path, where there is no base GEMM to choose)."""
    if family != "lora" or impl != "triton":
        return None
    try:
        from peft_kernels.ops.lora import BASE_ENV, base_mode

        mode = base_mode()
    except Exception as e:  # noqa: BLE001 - a bad PEFT_KERNELS_BASE shows up in the row's error too
        return f"invalid ({_error_text(e)})"
    return mode if mode == "auto" else f"{mode} ({BASE_ENV})"


# The base_decisions columns, in table order; the op's own fields first, then two derived here.
DECISION_COLUMNS = ("gemm", "device", "dtype", "out_dtype", "tokens_bucket", "N", "K", "r_pad", "dropout",
                    "bias", "c", "w_transposed", "choice", "triton_ms", "cublas_ms", "tma_ms", "triton_over_cublas")


def collect_base_decisions() -> list:
    """The ``base="auto"`` decisions of the LoRA GEMM taken in this process (LoRA and Monarch's
    fused path share it), JSON/CSV-ready: dtypes as text, plus ``gemm`` (``fwd`` = ``x @ W0^T``,
    read through W0's transpose; ``dX`` = ``dY @ W0``: told apart by ``w_transposed``, as
    ``LoRAFunction`` calls the op) and ``triton_over_cublas`` (> 1: cuBLAS was faster). Empty when
    the op module was never imported (nothing can have been decided) or took no decision."""
    mod = sys.modules.get("peft_kernels.ops.lora")
    if mod is None or not hasattr(mod, "base_decisions"):
        return []
    out = []
    for d in mod.base_decisions():
        row = {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in d.items()}
        tri, cub = row.get("triton_ms"), row.get("cublas_ms")
        row["gemm"] = "fwd" if row.get("w_transposed") else "dX"
        row["triton_over_cublas"] = tri / cub if tri is not None and cub else None
        out.append({**{k: row.get(k) for k in DECISION_COLUMNS}, **row})
    return out


SPARSE_DECISION_COLUMNS = ("device", "dtype", "tokens_bucket", "d_in", "d_out", "nnz_bucket", "index_dtype", "choice",
                           "cuda_ms", "triton_ms")


def collect_sparse_decisions() -> list:
    """The sparse family's measured native-CUDA-vs-Triton choices (``ops.sparse.impl_decisions``)
    taken in this process, JSON/CSV-ready; empty off a GPU or when nothing was decided."""
    mod = sys.modules.get("peft_kernels.ops.sparse")
    if mod is None or not hasattr(mod, "impl_decisions"):
        return []
    return [{k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in d.items()}
            for d in mod.impl_decisions()]


def measure(fwd, params: Sequence[torch.Tensor], setup: C.Setup, reps: int, stat: str = "median",
            clock: str = "wall") -> dict:
    """fwd / bwd / fwd+bwd milliseconds, peak memory of one step, bytes saved for backward."""
    device, x, dy = setup.device, setup.x, setup.dy
    grads = [x, *params]

    def step():
        fwd().backward(dy)

    fwd_ms = time_ms(fwd, device, grads, reps, stat, clock)
    fb_ms = time_ms(step, device, grads, reps, stat, clock)
    bwd_note = "retained graph"
    y = fwd()
    try:
        bwd_ms = time_ms(lambda: y.backward(dy, retain_graph=True), device, grads, reps, stat, clock)
    except RuntimeError:
        bwd_ms, bwd_note = max(fb_ms - fwd_ms, 0.0), "fwd+bwd minus fwd"
    del y
    peak = peak_memory_bytes(step, device, grads)
    try:
        saved = saved_bytes(fwd, exclude=[x, setup.weight, *params])
    except Exception:  # noqa: BLE001 - a variant that refuses saved-tensor hooks still has its timings
        saved = None
    for t in grads:
        t.grad = None
    return {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwdbwd_ms": fb_ms, "bwd_method": bwd_note,
            "peak_mib": None if peak is None else peak / MiB, "saved_mib": None if saved is None else saved / MiB}


def _all_cases(families, shapes, sweep: bool):
    """(family, shape, config, variant) in table order, ``(fam, shape, None, None)`` = the frozen
    base first per (family, shape); shape-major, so every family's first shape (GUIDE's
    (4096, 4096), where every issue has a target) comes before any family's second. Variants that
    do not apply to a config are left out; skipped ones stay (the table says why)."""
    for shape in shapes:
        for fam in families:
            spec = C.FAMILY_SPECS[fam]
            yield fam, shape, None, None
            for cfg in spec.configs(sweep):
                for var in spec.variants:
                    if var.applies(cfg):
                        yield fam, shape, cfg, var


def _jobs(families, shapes, sweep: bool, device: torch.device):
    """What to run, in order: ``_all_cases`` with the deferred variants (torch.compile: a compile
    per shape, ~10-40 s each) moved after all the others, so a run cut short by a time limit keeps
    every kernel row; the base of their (family, shape) is timed again around them. Each job is
    ``(position in _all_cases, family, shape, config, variant)``: the rows are put back in that
    order afterwards."""
    cases = list(enumerate(_all_cases(families, shapes, sweep)))
    late = [c for c in cases if c[1][3] is not None and c[1][3].deferred]
    return [(i, *c) for i, c in cases if c[3] is None or not c[3].deferred] + [(i, *c) for i, c in late]


def _row(fam, shape, tokens, dtype, cfg_label, variant, impl=None, **extra) -> dict:
    return {"family": fam, "shape": f"{shape[0]}x{shape[1]}", "d_in": shape[0], "d_out": shape[1],
            "tokens": tokens, "dtype": str(dtype).replace("torch.", ""), "config": cfg_label,
            "variant": variant, "impl": impl, "base": None, "fwd_ms": None, "bwd_ms": None, "fwdbwd_ms": None,
            "fwd_ratio": None, "bwd_ratio": None, "fwdbwd_ratio": None, "peak_mib": None,
            "saved_mib": None, "target": None, "meets_target": None, "base_spread_pct": None,
            "ratio_ref_fwdbwd_ms": None, "status": "ok", **extra}


def _error_text(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:200]


def run_bench(families: Iterable[str] = C.FAMILIES, shapes: Optional[Sequence[tuple]] = None,
              tokens: Optional[int] = None, dtype: Optional[torch.dtype] = None, device=None,
              sweep: bool = False, impl: Optional[str] = None, reps: int = 5,
              progress: bool = True, threads: Optional[int] = None, stat: str = "median",
              clock: str = "wall") -> BenchResult:
    """Run the layer benchmark; device-dependent defaults (GPU: GUIDE's shapes, T=8192, bf16).

    On the CPU torch runs single-threaded unless ``threads`` says otherwise: the CPU run measures
    relative costs, and one thread is immune to the barrier stalls that make multi-threaded
    timings on a shared machine swing by 10-100x (seen while writing this: median of 5 moved
    from 0.2 ms to 30 ms for the same 256x256 linear with 2 threads on a loaded 2-core box).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if clock == "thread" and (threads or 1) > 1:
        raise ValueError("clock='thread' counts only the calling thread's CPU time; use it with threads=1")
    saved_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or 1)
        keep_freed_memory()
    try:
        return _run(families, shapes, tokens, dtype, device, sweep, impl, reps, progress, stat, clock)
    finally:
        torch.set_num_threads(saved_threads)


def _run(families, shapes, tokens, dtype, device, sweep, impl, reps, progress, stat, clock) -> BenchResult:
    on_gpu = device.type == "cuda"
    families = list(families)
    shapes = [tuple(s) for s in (shapes or (C.GPU_SHAPES if on_gpu else C.CPU_SHAPES))]
    tokens = tokens or (C.GPU_TOKENS if on_gpu else C.CPU_TOKENS)
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    settings = {"families": families, "shapes": [f"{a}x{b}" for a, b in shapes], "tokens": tokens,
                "dtype": str(dtype).replace("torch.", ""), "device": str(device), "sweep": sweep,
                "impl": impl or "dispatch default",
                "timer": ("triton.testing.do_bench median" if on_gpu else
                          f"{'time.perf_counter' if clock == 'wall' else 'thread CPU time'} {stat} of >= {reps} calls, {torch.get_num_threads()} torch thread(s)"),
                "ratio": "variant time / frozen base time (x @ W^T, grad to input only), same process",
                "base_decisions": "ops.lora base='auto' decisions taken in this process, both bases timed (ms)"}
    result = BenchResult(meta=stamp(device), settings=settings)

    impls = {fam: kernel_impl(fam, device, dtype, impl) for fam in families}
    jobs = _jobs(families, shapes, sweep, device)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="peft-kernels bench", unit="case", disable=not progress,
               mininterval=0.5, dynamic_ncols=True)
    setup, current = None, None
    base_rows = {}  # (family, shape) -> its base row (measured in the first visit)
    # this visit of a (family, shape) (a run of consecutive jobs): the base's timings (before and
    # after the variants), its base row when timed in this visit, and the rows awaiting ratios
    visit = {"samples": [], "base_row": None, "pending": []}
    positions = []  # each row's job position in table order (rows come in run order)
    done = 0

    def emit(row):
        positions.append(pos)
        result.rows.append(row)

    def time_base():
        w = setup.weight
        visit["samples"].append(measure(lambda: F.linear(setup.x, w), [], setup, reps, stat, clock))

    def close_visit(again: bool):
        """Time the base once more (``again``: not after an interrupt), then give the visit's rows
        their ratios against the mean of its base timings."""
        samples, pending = visit["samples"], visit["pending"]
        if again and samples and setup is not None and pending:
            try:
                time_base()
            except Exception:  # noqa: BLE001 - the first timing still serves
                pass
        if samples:
            mean = {k: sum(m[k] for m in samples) / len(samples) for k in ("fwd_ms", "bwd_ms", "fwdbwd_ms")}
            if visit["base_row"] is not None:
                visit["base_row"].update(mean)
                if len(samples) > 1:
                    fb = [m["fwdbwd_ms"] for m in samples]
                    visit["base_row"]["base_spread_pct"] = 100.0 * (max(fb) - min(fb)) / mean["fwdbwd_ms"]
            for row, tgt in pending:
                # ratio_ref: the base mean this row was divided by (a deferred row's own visit's)
                row.update(fwd_ratio=row["fwd_ms"] / mean["fwd_ms"], bwd_ratio=row["bwd_ms"] / mean["bwd_ms"],
                           fwdbwd_ratio=row["fwdbwd_ms"] / mean["fwdbwd_ms"], ratio_ref_fwdbwd_ms=mean["fwdbwd_ms"])
                if tgt is not None:
                    row.update(target=tgt, meets_target=bool(row["fwdbwd_ratio"] <= tgt))
        visit.update(samples=[], base_row=None, pending=[])

    try:
        for done, (pos, fam, shape, cfg, var) in enumerate(jobs):
            spec = C.FAMILY_SPECS[fam]
            if current != (fam, shape):  # new (family, shape): fresh tensors, base timed first
                close_visit(again=True)
                setup = None
                gc.collect()
                if on_gpu:
                    torch.cuda.empty_cache()
                setup = C.make_setup(shape[0], shape[1], tokens, dtype, device)
                current = (fam, shape)
                if var is not None and current in base_rows and base_rows[current]["status"] == "ok":
                    try:  # a deferred row's (family, shape): its own base timing before it
                        time_base()
                    except Exception:  # noqa: BLE001 - then its rows get no ratios
                        pass
            if var is None:
                bar.set_postfix_str(f"{fam} {shape[0]}x{shape[1]} base", refresh=False)
                row = _row(fam, shape, tokens, dtype, "-", "frozen base", impl="torch")
                try:
                    time_base()
                    row.update(visit["samples"][-1], fwd_ratio=1.0, bwd_ratio=1.0, fwdbwd_ratio=1.0)
                    visit["base_row"] = row
                except Exception as e:  # noqa: BLE001
                    row["status"] = f"error: {_error_text(e)}"
                base_rows[current] = row
                emit(row)
                bar.update(1)
                continue
            label = spec.label(cfg)
            bar.set_postfix_str(f"{fam} {shape[0]}x{shape[1]} {label} {var.name}", refresh=False)
            name, row_impl, row_base = var.name, None, None
            builder = var.build
            skip = skip_reason(var, device, *impls[fam])
            if skip is not None:
                emit(_row(fam, shape, tokens, dtype, label, name, status=f"skipped: {skip}"))
                bar.update(1)
                continue
            if var.fused:
                row_impl, reason = impls[fam]
                if var.pin_impl is not None and row_impl is not None:
                    from peft_kernels import dispatch

                    reason = dispatch.unavailable_reason(fam, var.pin_impl, device, dtype)
                    row_impl = None if reason is not None else var.pin_impl
                unforced = var.unforced and impl is None and var.pin_impl is None
                if var.name == C.KERNEL:
                    name = f"{C.KERNEL}[{row_impl}]" if row_impl else C.KERNEL
                    if unforced and row_impl == "cuda" and fam == "sparse":
                        name = f"{C.KERNEL}[cuda|triton, measured]"  # sparse_impl_decisions says which
                row_base = var.base or default_base(fam, row_impl)
                if row_impl is None:
                    emit(_row(fam, shape, tokens, dtype, label, name, status=f"n/a: {reason}"))
                    bar.update(1)
                    continue
                builder = fused_builder(var, None if unforced else row_impl)
            elif var.name == C.REFERENCE and impls[fam][0] == "torch":
                # the fused path already runs the reference here; one row is enough
                bar.update(1)
                continue
            row = _row(fam, shape, tokens, dtype, label, name, impl=row_impl or "torch", base=row_base)
            try:
                fwd, params = builder(setup, cfg)
                m = measure(fwd, params, setup, reps, stat, clock)
                row.update(m)
                # ratios (and the target verdict) once the base has been timed again after the variants
                tgt = C.target_for(fam, cfg, shape, tokens, dtype, device) if var.name == C.KERNEL else None
                visit["pending"].append((row, tgt))
                del fwd, params
            except ImportError as e:
                row["status"] = f"n/a: {_error_text(e)}"
            except Exception as e:  # noqa: BLE001 - one failing competitor must not sink the table
                row["status"] = f"error: {_error_text(e)}"
                if on_gpu:
                    torch.cuda.empty_cache()
            emit(row)
            bar.update(1)
        done = len(jobs)
        close_visit(again=True)
    except KeyboardInterrupt:  # a time limit's SIGINT: keep (and let the caller write) what was measured
        result.interrupted = True
        close_visit(again=False)
    finally:
        bar.close()
    result.rows = [row for _, row in sorted(zip(positions, result.rows), key=lambda t: t[0])]  # stable
    result.settings["cases"] = f"{done} of {len(jobs)}" + (" (interrupted)" if result.interrupted else "")
    result.base_decisions = collect_base_decisions()
    result.sparse_decisions = collect_sparse_decisions()
    return result
