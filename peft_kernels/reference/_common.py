"""Helpers shared by the pure-torch references."""
from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor, upcast: bool) -> torch.dtype:
    """fp32 when ``upcast`` and the input is a half type, else the input's own dtype."""
    if upcast and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(..., d)`` -> ``(T, d)``."""
    return x.reshape(-1, x.shape[-1])


def base_linear(x2: torch.Tensor, weight: torch.Tensor, bias, dtype: torch.dtype) -> torch.Tensor:
    y = x2.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        y = y + bias.to(dtype)
    return y
