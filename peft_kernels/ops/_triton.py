"""Triton import and host-side launch helpers shared by the ops modules.

Triton is a dependency on Linux only. Where it is missing the ops modules still import (the
kernels are decorated by a stand-in that keeps the Python function) and dispatch reports
"triton is not installed", so the torch and native paths keep working.

Also here, because every ops module launches through them: host-side ``cdiv``/``next_pow2``,
``custom_op``/``EagerOp`` (torch.library ops whose eager calls skip the dispatcher), the autotune
timer, the opt-in parallel precompile and ``launch_tuned``.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

    class _Lang:
        constexpr = object

    class _Triton:
        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_a, **_kw):
            return lambda f: f

        @staticmethod
        def heuristics(*_a, **_kw):
            return lambda f: f

        class Config:  # noqa: D106
            def __init__(self, *a, **kw):
                pass

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << (max(int(n), 1) - 1).bit_length()

    triton = _Triton()
    tl = _Lang()

# --------------------------------------------------------------------------------- host-side ints
# triton.cdiv / triton.next_power_of_2 are triton "constexpr functions" in 3.6: ~3-4 us of
# Python each when called on the host, and a layer's launchers call them ~15 times per step.


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv`` on the host, without its wrapper)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for ``n <= 0``, as ``triton.next_power_of_2``)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


# --------------------------------------------------------------------------------- device facts
# Asked by the launchers on every call (grid splits, the TMA eligibility check); the driver query
# behind each costs microseconds, so each CUDA device's answer is kept.


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``."""
    return _properties(_index(device)).multi_processor_count


def sm_major(device: torch.device) -> int:
    """Compute capability major of a CUDA ``device`` (9: Hopper)."""
    return _properties(_index(device)).major


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph (never off CUDA). Asked on
    that device, not the current one: a process driving several GPUs may capture on another."""
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


# --------------------------------------------------------------------------------- custom ops
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _traced() -> bool:
    """True while torch.compile / AOTAutograd / make_fx / a functorch transform / torch.jit.trace
    is tracing (or any TorchDispatchMode is active): the registered op, with its fake, must be
    called."""
    return bool(torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._functorch.peek_interpreter_stack() is not None
                or torch._C._get_tracing_state() is not None)


class EagerOp:
    """A ``torch.library.custom_op`` whose plain eager calls run its Python body directly.

    The registered op (``.op``; also ``torch.ops.peft_kernels.<name>``) is what torch.compile,
    AOTAutograd, fake tensors, ``torch.jit.trace`` and ``opcheck`` see. In eager mode its
    dispatcher round trip (autograd fallthrough, redispatch, dynamo-disable wrapper) costs ~40-50 us
    of CPU per call on a 2-core machine, for bodies that only check, allocate and launch: ~45% of a
    LoRA layer's host-side cost per training step.

    The body runs directly only when nothing could tell the difference: no tracing, every tensor
    argument a plain ``torch.Tensor``/``Parameter`` (a subclass such as DTensor or a quantised
    weight gets the op, and its own dispatch), and no argument that autograd would need to see
    (grad mode on and an argument requiring grad: e.g. a backward run with ``create_graph=True``,
    where the registered op raises "no autograd formula" instead of silently dropping the
    second-order terms). Mutated arguments get their version counter bumped, as the op would."""

    def __init__(self, name: str, fn, mutates_args):
        import inspect

        self.op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        self._fn = fn
        names = list(inspect.signature(fn).parameters)
        self._mutated = tuple((names.index(a), a) for a in mutates_args) if not isinstance(mutates_args, str) else ()
        functools.update_wrapper(self, fn)

    @property
    def default(self):
        """The registered overload, ``torch.ops.<ns>.<name>.default`` (as on an op packet)."""
        return self.op._opoverload

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def _direct(self, args, kwargs) -> bool:
        if _traced():
            return False
        vals = (*args, *kwargs.values()) if kwargs else args
        if torch.is_grad_enabled():  # not inside autograd.Function forward/backward: look closer
            return not any(isinstance(a, torch.Tensor) and (a.requires_grad or type(a) not in _PLAIN) for a in vals)
        for a in vals:
            t = type(a)
            if t is not torch.Tensor and t is not torch.nn.Parameter and isinstance(a, torch.Tensor):
                return False
        return True

    def __call__(self, *args, **kwargs):
        if not self._direct(args, kwargs):
            return self.op(*args, **kwargs)
        out = self._fn(*args, **kwargs)
        for i, name in self._mutated:
            torch.autograd.graph.increment_version(args[i] if i < len(args) else kwargs[name])
        return out


def custom_op(name: str, *, mutates_args):
    """Decorator: ``torch.library.custom_op(name, mutates_args=...)`` wrapped in ``EagerOp``."""
    return lambda fn: EagerOp(name, fn, mutates_args)


# --------------------------------------------------------------------------------- autotune timer
# triton's autotuner times each config with do_bench's defaults (25 ms warm-up + 100 ms of reps,
# L2 flushed between reps) on every new key: with ~8 configs and dozens of keys per benchmark run
# that is minutes. 10 + 40 ms still gives >= 100 reps of a 0.35 ms GEMM (the (4096,4096) forward)
# and thousands of a small kernel's, enough to rank configs that differ by a few percent.
TUNE_WARMUP_MS = 10
TUNE_REP_MS = 40
# Tuning results on disk (triton's ``cache_results``, in its cache dir, ~/.triton/cache): a key
# tuned once, by any earlier process with the same triton, GPU architecture, kernel source, configs
# and key, is not benchmarked again. A training run otherwise re-times every config of every
# kernel at each of its shapes on every start (~1-2 s per key), and the GPU session's later steps
# re-tune what its earlier ones did. PEFT_KERNELS_TUNE_CACHE=0 (read at import) re-tunes each
# process; deleting the cache dir forgets the stored choices. Configs with a pre_hook (the TMA
# GEMM's descriptors) are always timed: triton cannot store them.
TUNE_CACHE_ENV = "PEFT_KERNELS_TUNE_CACHE"
TUNE_CACHE = os.environ.get(TUNE_CACHE_ENV, "1") != "0"


def tuning_bench(kernel_call, quantiles):
    """The ``do_bench`` of every autotuned kernel here (shorter than triton's default)."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


# --------------------------------------------------------------------------------- precompile
# Every new autotune key compiles each candidate config, one after another, inside the autotuner's
# benchmark loop (~1-2 s each for the fused GEMM: ~100+ compiles in `peft-kernels bench`). Triton's
# compiler releases the GIL (two threads compiled four sm_90 GEMM configs in half the time of one
# thread on a 2-core machine), and ``triton.AsyncCompileMode`` lets a warm-up submit every config's
# compile to a thread pool, so the autotuner then only times them. Opt in with
# PEFT_KERNELS_PRECOMPILE=1 (default off until it has run on a GPU); best effort: any failure
# leaves compiling to the autotuner.
PRECOMPILE_ENV = "PEFT_KERNELS_PRECOMPILE"
_PRECOMPILED: set = set()
_POOL = None


def _autotune_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """The key triton's Autotuner.run caches a launch's choice under (triton 3.6): the ``key``
    arguments' values, then the dtype of every argument that has one (positional, then keyword).
    Computed from cached argument positions: it runs before every autotuned launch."""
    pos = getattr(kernel, "_pk_key_pos", None)
    if pos is None:  # triton skips a key name that is not an argument; so does this
        pos = (kernel.arg_names, [kernel.arg_names.index(k) for k in kernel.keys if k in kernel.arg_names])
        kernel._pk_key_pos = pos
    names, key_pos = pos
    n = len(args)
    key = [args[i] if i < n else kwargs[names[i]] for i in key_pos if i < n or names[i] in kwargs]
    key += [str(a.dtype) for a in args if hasattr(a, "dtype")]
    if kwargs:
        key += [str(v.dtype) for k, v in kwargs.items() if hasattr(v, "dtype") and k in names]
    return tuple(key)


def precompile_configs(kernel, args: tuple, kwargs: dict, key: Optional[tuple] = None) -> bool:
    """Before an autotuned ``kernel``'s first launch for a new key, compile every (pruned) config
    in parallel threads; True when it did. Call it with the exact arguments of the launch, inside
    the launch's device guard (``key``: their ``_autotune_key``, where the caller has it). No-op
    unless PEFT_KERNELS_PRECOMPILE=1, under the interpreter, and for keys the autotuner has seen."""
    global _POOL
    if not HAS_TRITON or os.environ.get(PRECOMPILE_ENV, "0") != "1" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        if len(kernel.configs) < 2:
            return False
        key = _autotune_key(kernel, args, kwargs) if key is None else key
        if key in kernel.cache or (id(kernel), key) in _PRECOMPILED:
            return False
        _PRECOMPILED.add((id(kernel), key))
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="pk-compile")
        named = dict(zip(kernel.arg_names, args))
        kernel.nargs = named  # what Autotuner.warmup sets for its pruning
        try:
            configs = kernel.prune_configs(kwargs)
        finally:
            kernel.nargs = None
        # ignore_errors: a config that fails to compile is the autotuner's to skip, as without this
        with triton.AsyncCompileMode(_POOL, ignore_errors=True):
            for cfg in configs:
                if cfg.pre_hook is not None:
                    # e.g. the TMA GEMM's descriptor block shapes: the specialisation (and so the
                    # compile key) is taken from the arguments right here, before the next config
                    cfg.pre_hook({**named, **kwargs, **cfg.all_kwargs()})
                kernel.fn.warmup(*args, grid=(1,), **kwargs, **cfg.all_kwargs())
        return True
    except Exception:  # noqa: BLE001 - an optimisation only: the autotuner compiles what is missing
        return False


class _NotOnDisk(Exception):
    pass


def _not_on_disk():  # the "benchmark" handed to triton's lookup: a miss ends it before it stores anything
    raise _NotOnDisk


def tuned_on_disk(kernel, args: tuple, kwargs: dict, key: tuple):
    """The config an earlier process stored for ``key`` in triton's disk tune cache (``TUNE_CACHE``),
    now also in ``kernel.cache``; None when there is none (or the kernel does not store its
    results: the interpreter, PEFT_KERNELS_TUNE_CACHE=0, configs with a pre_hook). Triton's own
    lookup (``Autotuner.check_disk_cache``), asked with a benchmark that aborts on a miss, so a
    stored key needs neither a precompile nor a tuning run (nor a copy of an in-place output)."""
    if not getattr(kernel, "cache_results", False):
        return None
    kernel.nargs = dict(zip(kernel.arg_names, args))  # what the config pruning reads
    try:
        configs = kernel.prune_configs(kwargs)
        if kernel.check_disk_cache(key, configs, _not_on_disk):
            return kernel.cache.get(key)
    except Exception:  # noqa: BLE001 - a miss (_NotOnDisk) or a failed lookup: the autotuner tunes as usual
        pass
    finally:
        kernel.nargs = None
    return None


CAPTURE_WARMUP_MSG = ("peft_kernels: a kernel met a new shape while a CUDA graph was being captured; it must be "
                      "tuned (timed) and loaded first: run the same step once, uncaptured, before capturing "
                      "(e.g. torch.compile mode='reduce-overhead' warm-up steps)")


def _refuse_capture(args: tuple) -> None:
    """A new autotune key benchmarks every config (synchronising the device), and even a choice
    stored on disk would load its kernel module for the first time, both of which a CUDA graph
    capture cannot contain: say so instead of failing inside triton."""
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if dev is not None and capturing(dev):
        raise RuntimeError(CAPTURE_WARMUP_MSG)


def launch_tuned(kernel, grid, args: tuple, kwargs: dict, inplace: tuple = ()) -> None:
    """Launch an autotuned ``kernel`` (its configs compiled in parallel first on a new key, opt-in).

    On a key the autotuner has already tuned, the chosen config is launched on the JIT function
    directly, as ``Autotuner.run`` itself would: that wrapper rebuilds dicts of every argument on
    each call (its argument filter is a list-membership test per argument), 7-11 us per launch on a
    2-core CPU through triton's real launch path (``benchmarks/host_launch_path.py``: a fake sm_90
    driver whose launcher is a no-op; 40-45 us per launch in all before, 33-34 after). New keys,
    configs with a ``pre_hook`` (the TMA descriptors) and single-config kernels go through the
    autotuner as before.

    A key missing here but stored on disk by an earlier process (``tuned_on_disk``) is launched
    directly too: no precompile, no tuning run. Under CUDA graph capture a key new to this process
    is refused either way (its kernel module would load inside the capture).

    ``inplace``: positions of the arguments the kernel read-modify-writes (adds into). On a new key
    the autotuner's timed runs then go to copies of them, and the tuned config runs once on the
    real ones. (triton's ``restore_value`` would clone them and copy them back around every timed
    run, inside the timing: at a (8192, 11008) output that copy, not the kernel, ranks the configs.)"""
    configs = getattr(kernel, "configs", None)
    if configs is not None and len(configs) > 1:  # one config: nothing to tune or precompile
        key = _autotune_key(kernel, args, kwargs)
        cfg = kernel.cache.get(key)
        if cfg is None:
            _refuse_capture(args)
            cfg = tuned_on_disk(kernel, args, kwargs, key)
        if cfg is None:
            precompile_configs(kernel, args, kwargs, key)
            if inplace:
                kernel[grid](*(a.clone() if i in inplace else a for i, a in enumerate(args)), **kwargs)
                cfg = kernel.cache.get(key)
        if cfg is not None and cfg.pre_hook is None:
            kernel.fn[grid](*args, **kwargs, **cfg.all_kwargs())
            return
    kernel[grid](*args, **kwargs)


__all__ = ["triton", "tl", "HAS_TRITON", "launch_tuned", "precompile_configs", "PRECOMPILE_ENV", "tuning_bench",
           "TUNE_CACHE", "CAPTURE_WARMUP_MSG", "cdiv", "next_pow2", "sm_count", "sm_major", "capturing", "custom_op",
           "EagerOp"]
