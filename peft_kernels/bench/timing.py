"""Timers and memory probes shared by the layer benchmark and the training-speed comparison.

GPU: ``triton.testing.do_bench(fn, return_mode="median")`` (CUDA events, L2 flushed between
calls, gradients reset outside the timed region), peak memory via
``torch.cuda.max_memory_allocated`` after a reset. CPU: the median of
``time.perf_counter`` repetitions after one warm-up call (at least ``reps``, more for fast calls); no allocator statistics exist there, so
peak memory is ``None``. ``saved_bytes`` works on any device: it counts what autograd keeps for
the backward pass, the number the fused designs are meant to shrink.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Iterable, Optional

import torch

CPU_BUDGET_S = 0.05
CPU_MAX_REPS = 50


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process instead of returning it to the OS.

    The CUDA caching allocator does this on the GPU; without it a CPU step that frees and
    re-allocates ~1 MB tensors pays fresh page faults each time (seen here: a 256x688 linear's
    fwd+bwd alternated between 2 ms and 6 ms; with this, 2.3 ms). Returns whether it applied.
    """
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # 32 MiB is glibc's largest mmap threshold on 64-bit (larger values are refused)
        ok_mmap = libc.mallopt(m_mmap_threshold, 32 << 20)
        ok_trim = libc.mallopt(m_trim_threshold, 1 << 30)
        return bool(ok_mmap) and bool(ok_trim)
    except (OSError, AttributeError):  # not glibc (macOS, musl): timings just include page faults
        return False


def _reset_grads(tensors: Optional[Iterable[torch.Tensor]]) -> None:
    for t in tensors or ():
        t.grad = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None, reps: int = 5,
            stat: str = "median", clock: str = "wall") -> float:
    """Median (or, CPU only, ``stat="min"``) milliseconds of ``fn()``.

    Gradients of ``grad_to_none`` are cleared before each call, outside the timed region.
    CPU only: ``clock="wall"`` is ``time.perf_counter``; ``clock="thread"`` is the calling
    thread's CPU time (``time.thread_time``), which a busy shared machine cannot inflate by
    descheduling us, but which only counts work on this thread (use it single-threaded). ``min``
    is the other remedy for a shared machine, where the scheduler adds whole time slices (~4 ms)
    to a random share of the calls and moves even the median.
    """
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    grad_to_none = list(grad_to_none or ())
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, grad_to_none=grad_to_none or None, return_mode="median"))
    now = CLOCKS[clock]
    _reset_grads(grad_to_none)
    t0 = now()
    fn()  # warm-up: first-call allocations and lazy initialisation stay out of the numbers
    first = now() - t0
    # at least `reps` samples; more for fast calls (up to ~CPU_BUDGET_S of them, at most
    # CPU_MAX_REPS) so that a few preempted calls on a shared machine do not move the median
    n = max(1, reps, min(CPU_MAX_REPS, int(CPU_BUDGET_S / max(first, 1e-6))))
    times = []
    for _ in range(n):
        _reset_grads(grad_to_none)
        t0 = now()
        fn()
        times.append((now() - t0) * 1e3)
    return float(min(times) if stat == "min" else statistics.median(times))


def peak_memory_bytes(fn: Callable[[], object], device: torch.device, grad_to_none=None) -> Optional[int]:
    """Bytes allocated at the peak of one ``fn()`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    _reset_grads(grad_to_none)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    _reset_grads(grad_to_none)
    return int(peak)


def saved_bytes(forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of distinct storages autograd saves for backward during ``forward()``.

    Storages of ``exclude`` (the input and the weights, resident anyway) are not counted, so the
    figure is the activation memory a training step holds per layer. A view saved from a larger
    tensor counts that tensor's whole storage, since that is what stays alive.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in skip:
                seen[ptr] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    del y
    return int(sum(seen.values()))
