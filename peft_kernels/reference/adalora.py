"""AdaLoRA's SVD-form adapter in plain torch (HF PEFT semantics).

``y = x @ W0^T (+ b) + s * dropout(x) @ (diag(E * mask) A)^T @ B^T`` with A ``(r, d_in)``,
E ``(r,)`` (zero-init), B ``(d_out, r)``. ``s = alpha / init_r`` stays fixed while ranks are
pruned; pruned triplets have ``mask == 0`` (HF PEFT zeroes E in place; a separate mask keeps
the learned value recoverable and is what the allocator here writes). HF PEFT divides by
``init_r + 1e-5`` instead of ``init_r``; callers wanting bit-level parity pass that scaling.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor
from .lora import check_lora_args, lora


def _effective_A(lora_A: torch.Tensor, lora_E: torch.Tensor, rank_mask: Optional[torch.Tensor]) -> torch.Tensor:
    r = lora_A.shape[0] if isinstance(lora_A, torch.Tensor) and lora_A.dim() == 2 else None
    check_tensor("lora_E", lora_E, shape=(r,))
    e = lora_E
    if rank_mask is not None:
        check_tensor("rank_mask", rank_mask, shape=(r,), dtypes=None)
        e = e * rank_mask.to(e.dtype)
    return lora_A * e.to(lora_A.dtype)[:, None]


def adalora(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    rank_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference AdaLoRA linear. It is LoRA with ``A' = diag(E * mask) A``."""
    check_lora_args(x, weight, lora_A, lora_B, bias, dropout_p, seed, scaling)
    a_eff = _effective_A(lora_A, lora_E, rank_mask)
    return lora(x, weight, a_eff, lora_B, bias, scaling, dropout_p, seed, upcast)


def adalora_delta_weight(lora_A, lora_E, lora_B, scaling: float, rank_mask=None) -> torch.Tensor:
    """Dense ``(d_out, d_in)`` change ``s * B diag(E * mask) A``."""
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, shape=(None, lora_A.shape[0]))
    return scaling * (lora_B @ _effective_A(lora_A, lora_E, rank_mask))
