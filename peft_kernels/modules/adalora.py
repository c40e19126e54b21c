"""``AdaLoRALinear``: AdaLoRA's SVD-form adapter ``s * B diag(E * mask) A`` on the LoRA kernels.

The kernel sees plain LoRA with ``A_eff = A * (E * mask)[:, None]``: that ``(r, d_in)`` product is
tiny next to the ``T x d`` work and autograd carries E's gradient through it, so AdaLoRA needs
no kernel of its own. Parameters follow HF PEFT (``lora_A`` ``(r, d_in)``, ``lora_E`` ``(r,)``
where PEFT stores ``(r, 1)``, ``lora_B`` ``(d_out, r)``; A and B normal(0, 0.02), E zeros);
``scaling = alpha / init_r`` stays fixed while ranks are pruned (PEFT divides by
``init_r + 1e-5``). Pruning writes the ``rank_mask`` buffer (``set_rank_mask``) instead of
zeroing E, so a masked triplet keeps its learned value; the allocator lives in
``peft_kernels.train.adalora``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import check_positive_int, check_tensor
from ..ops.lora import lora_linear
from ..reference.adalora import adalora_delta_weight
from .lora import _AdapterLinear


class AdaLoRALinear(_AdapterLinear):
    """``y = base_layer(x) + (alpha / r) * dropout(x) @ (diag(E * mask) A)^T @ B^T``; ``r`` is
    the initial rank (init_r); ``ranknum`` is the number of unmasked triplets."""

    family = "adalora"

    def __init__(self, base_layer: nn.Linear, r: int = 12, alpha: float = 8.0, dropout: float = 0.0,
                 impl: Optional[str] = None):
        super().__init__(base_layer, dropout, impl)
        self.r = check_positive_int("r", r)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_E = nn.Parameter(torch.empty(self.r, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, device=w.device, dtype=w.dtype))
        self.register_buffer("rank_mask", torch.ones(self.r, device=w.device, dtype=torch.float32))
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 12, alpha: float = 8.0, dropout: float = 0.0,
                    impl: Optional[str] = None) -> "AdaLoRALinear":
        return cls(linear, r=r, alpha=alpha, dropout=dropout, impl=impl)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's init: E zeros (the adapter starts as no change), A and B normal(0, 0.02)."""
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.rank_mask.fill_(1.0)

    # -- rank mask
    @property
    def ranknum(self) -> int:
        """Current active rank (unmasked triplets)."""
        return int((self.rank_mask != 0).sum().item())

    @torch.no_grad()
    def set_rank_mask(self, mask: torch.Tensor) -> None:
        """Keep triplet i iff ``mask[i]`` is nonzero/True; shape ``(r,)``. A merged module is
        unmerged with the old mask and re-merged with the new one, so the weight stays right."""
        check_tensor("mask", mask, shape=(self.r,), dtypes=None)
        with self._unmerged():
            self.rank_mask.copy_((mask.to(self.rank_mask.device) != 0).to(self.rank_mask.dtype))

    def effective_A(self) -> torch.Tensor:
        """``A * (E * mask)[:, None]``, the ``(r, d_in)`` operand the LoRA kernel sees."""
        e = self.lora_E * self.rank_mask.to(self.lora_E.dtype)
        return self.lora_A * e[:, None]

    def delta_weight(self) -> torch.Tensor:
        return adalora_delta_weight(self.lora_A.float(), self.lora_E.float(), self.lora_B.float(), self.scaling,
                                    rank_mask=self.rank_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged or self._adapters_disabled:
            return self.base_layer(x)
        p, seed = self._dropout_and_seed()
        return lora_linear(x, self.base_layer.weight, self.effective_A(), self.lora_B, self.base_layer.bias,
                           self.scaling, p, seed, impl=self.impl)

    def adapter_config(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"ranknum={self.ranknum}, alpha={self.alpha}, scaling={self.scaling:.4g}, "
                f"dropout={self.dropout}, merged={self._merged}, impl={self.impl}")
