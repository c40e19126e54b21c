"""Argument checks shared by references, launchers and modules.

Every public entry point validates its inputs here *before* any kernel launch, so bad input
raises a ``ValueError``/``TypeError`` that names the argument and what was expected.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = FLOAT_DTYPES,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank/shape/dtype; ``None`` in ``shape`` is a wildcard."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        want = tuple(shape)
        got = tuple(t.shape)
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            pretty = "(" + ", ".join("*" if w is None else str(w) for w in want) + ")"
            raise ValueError(f"{name} must have shape {pretty}, got {got}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_same_device(**tensors) -> torch.device:
    """All non-None tensors must live on one device; returns it."""
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devs.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")
    return next(iter(devs.values()))


def check_same_dtype(**tensors) -> torch.dtype:
    dts = {k: v.dtype for k, v in tensors.items() if v is not None}
    if len(set(dts.values())) > 1:
        listing = ", ".join(f"{k}={str(d).replace('torch.', '')}" for k, d in dts.items())
        raise TypeError(f"tensors must share one dtype, got {listing}")
    return next(iter(dts.values()))


def check_positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v}")
    return v


def check_scaling(name: str, v) -> float:
    """A finite real number. Not a tensor: the fused kernels take the scale as a host float, so a
    tensor (a learnable scale in particular) would be read once and cut off from autograd."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return float(v)


def check_dropout(name: str, p) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def check_density(name: str, d) -> float:
    if not isinstance(d, (int, float)) or isinstance(d, bool):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(d).__name__}")
    if not 0.0 < float(d) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {d}")
    return float(d)


def check_choice(name: str, v, choices: Sequence[str]) -> str:
    if v not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {v!r}")
    return v


def check_input(x: torch.Tensor, in_features: int, name: str = "x") -> torch.Tensor:
    check_tensor(name, x, min_ndim=1)
    if x.shape[-1] != in_features:
        raise ValueError(f"{name} must have last dim {in_features} (in_features), got shape {tuple(x.shape)}")
    return x


def check_bias(bias, out_features: int) -> None:
    if bias is not None:
        check_tensor("bias", bias, shape=(out_features,))


def check_seed(seed):
    """A dropout seed: an int in [0, 2**63), or a one-element integer tensor (returned as is).

    A tensor is checked by dtype and size only, never read (no ``.item()``): the modules pass the
    seed they draw as a tensor so that ``torch.compile`` does not graph-break on it, and its value
    is read only inside the custom ops (or used with tensor ops on the torch path)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype == torch.bool or seed.dtype.is_floating_point or seed.dtype.is_complex:
            raise TypeError(f"seed must be an integer tensor, got dtype {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"seed must hold exactly one element, got shape {tuple(seed.shape)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a one-element integer tensor, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed
