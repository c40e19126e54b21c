"""Picks the implementation of each family per call: ``triton``, ``cuda``, ``cpp`` or ``torch``.

- ``torch``: the pure-torch reference; always runs (the CPU path).
- ``triton``: the fused Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  (the interpreter, used by CI; only when forced, since it is slow).
- ``cuda`` / ``cpp``: the native extension ``peft_kernels._C`` on CUDA / CPU tensors.

``PEFT_KERNELS_IMPL`` forces a choice, either for every family (``PEFT_KERNELS_IMPL=torch``) or per
family (``PEFT_KERNELS_IMPL=sparse:cpp,lora:triton``); an explicit ``impl=`` argument wins over
both. When the forced implementation cannot run, the error lists every reason.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from . import _ext

IMPLS = ("torch", "triton", "cuda", "cpp")
ENV = "PEFT_KERNELS_IMPL"

# family -> ordered {impl: extra check(device, dtype) -> reason or None}; order = preference
_REGISTRY: dict[str, dict[str, Optional[Callable]]] = {}
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def register(family: str, impl: str, check: Optional[Callable] = None) -> None:
    """Declare that ``family`` has ``impl``; ``check(device, dtype)`` returns a reason it cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _REGISTRY.setdefault(family, {})[impl] = check


# os.environ's own bytes mapping (POSIX): the launchers ask several times per call, and a lookup
# there is ~20x cheaper than os.environ.get; os.environ and monkeypatch.setenv update it in place.
_ENV_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def interpreter_enabled() -> bool:
    if isinstance(_ENV_BYTES, dict):
        return _ENV_BYTES.get(b"TRITON_INTERPRET", b"0") == b"1"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    if dtype not in _TRITON_DTYPES:
        return f"triton kernels take fp32/fp16/bf16, got {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return f"tensors on {device} need CUDA (or TRITON_INTERPRET=1 for CPU tensors)"


def _native_reason(device: torch.device, dtype: torch.dtype, want: str) -> Optional[str]:
    mod = _ext.native()
    if mod is None:
        return _ext.native_error()
    if dtype not in _TRITON_DTYPES:
        return f"native kernels take fp32/fp16/bf16, got {dtype}"
    if want == "cuda":
        if device.type != "cuda":
            return f"the cuda implementation needs CUDA tensors, got {device}"
        if not _ext.native_has_cuda():
            return "peft_kernels._C was built without CUDA (no CUDA torch or CUDA_HOME at build time)"
        return None
    if device.type != "cpu":
        return f"the cpp implementation needs CPU tensors, got {device}"
    return None


def unavailable_reason(family: str, impl: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``impl`` cannot run ``family`` on this device/dtype, or ``None`` when it can."""
    impls = _REGISTRY.get(family, {})
    if impl not in impls:
        return f"{family} has no {impl} implementation (has: {', '.join(impls) or 'none'})"
    if impl == "triton":
        reason = _triton_reason(device, dtype)
    elif impl in ("cuda", "cpp"):
        reason = _native_reason(device, dtype, impl)
    else:
        reason = None
    check = impls[impl]
    if reason is None and check is not None:
        reason = check(device, dtype)
    return reason


def forced_impl(family: str) -> Optional[str]:
    """The implementation ``PEFT_KERNELS_IMPL`` forces for ``family``, if any."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    if ":" not in raw:
        forced = raw
    else:
        forced = None
        for item in raw.split(","):
            fam, _, impl = item.partition(":")
            if fam.strip() == family:
                forced = impl.strip()
    if forced is not None and forced not in IMPLS:
        raise ValueError(f"{ENV} must name one of {IMPLS} (optionally per family), got {raw!r}")
    return forced


def is_forced(family: str, impl: Optional[str]) -> bool:
    """Whether the call's implementation was forced (``impl=`` or ``PEFT_KERNELS_IMPL``), so that a
    family must neither fall back nor second-guess it by measurement."""
    return impl is not None or forced_impl(family) is not None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer's kernels run in: the autocast dtype where autocast is on for ``x``'s
    device (as F.linear would), else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def in_dtype(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``y`` in the call's ``compute_dtype``: a torch fallback's output (the references return x's
    dtype) then has the dtype the fused path and F.linear give under autocast, whichever
    implementation a layer got; a no-op otherwise."""
    return y if y.dtype == dtype else y.to(dtype)


def choose(family: str, device: torch.device, dtype: torch.dtype, impl: Optional[str] = None) -> str:
    """Pick the implementation for one call. ``impl`` (or the env override) forces one."""
    if family not in _REGISTRY:
        raise ValueError(f"unknown family {family!r}; known: {sorted(_REGISTRY)}")
    device = torch.device(device)
    forced = impl or forced_impl(family)
    if forced is not None:
        if forced not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {forced!r}")
        reason = unavailable_reason(family, forced, device, dtype)
        if reason is not None:
            others = "; ".join(f"{i}: {unavailable_reason(family, i, device, dtype) or 'available'}"
                               for i in _REGISTRY[family])
            raise RuntimeError(f"{family}: forced implementation {forced!r} cannot run: {reason}. "
                               f"Implementations on {device}/{dtype}: {others}")
        return forced
    for cand in _REGISTRY[family]:
        if cand == "triton" and device.type == "cpu":
            continue  # the interpreter is for testing; never picked unless forced
        if unavailable_reason(family, cand, device, dtype) is None:
            return cand
    return "torch"


def explain(device="cpu", dtype=torch.float32) -> str:
    """A table of every family and implementation with availability or the reason it is missing."""
    device = torch.device(device)
    lines = [f"device={device} dtype={dtype}"]
    for fam, impls in _REGISTRY.items():
        lines.append(f"{fam}: default -> {choose(fam, device, dtype) if not forced_impl(fam) else forced_impl(fam)}")
        for i in impls:
            lines.append(f"  {i:7s} {unavailable_reason(fam, i, device, dtype) or 'available'}")
    return "\n".join(lines)
