"""LoRA in plain torch: the spec, the CPU path and the test oracle.

``y = x @ W0^T (+ b) + s * dropout(x) @ A^T @ B^T`` with A ``(r, d_in)``, B ``(d_out, r)``.
``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA). Dropout uses the shared counter-based
mask of ``_philox`` over the flattened ``(T, d_in)`` input, so every implementation drops the
same elements for the same seed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._checks import (check_bias, check_dropout, check_input, check_positive_int, check_same_device, check_scaling,
                       check_seed, check_tensor)
from ._common import base_linear, compute_dtype, flatten_tokens
from ._philox import apply_dropout


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    check_positive_int("r", r)
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_lora_args(x, weight, lora_A, lora_B, bias, dropout_p, seed, scaling=1.0):
    check_tensor("weight", weight, ndim=2)
    d_out, d_in = weight.shape
    if d_in == 0:  # (d_out == 0 is a valid, empty layer; no input features leave x's token count undefined)
        raise ValueError(f"weight must have at least one input feature, got shape {(d_out, d_in)}")
    check_input(x, d_in)
    check_tensor("lora_A", lora_A, ndim=2)
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError(f"lora_A must have rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    check_tensor("lora_A", lora_A, shape=(r, d_in))
    check_tensor("lora_B", lora_B, shape=(d_out, r))
    check_bias(bias, d_out)
    check_same_device(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias)
    check_dropout("dropout_p", dropout_p)
    check_seed(seed)
    check_scaling("scaling", scaling)


def lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: int = 0,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference LoRA linear; returns ``(..., d_out)`` in ``x.dtype``."""
    check_lora_args(x, weight, lora_A, lora_B, bias, dropout_p, seed, scaling)
    dt = compute_dtype(x, upcast)
    x2 = flatten_tokens(x)
    y = base_linear(x2, weight, bias, dt)
    xd = apply_dropout(x2.to(dt), dropout_p, seed)
    y = y + scaling * ((xd @ lora_A.to(dt).t()) @ lora_B.to(dt).t())
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def lora_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Dense ``(d_out, d_in)`` change: ``s * B @ A``."""
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, shape=(None, lora_A.shape[0]))
    return scaling * (lora_B @ lora_A)
