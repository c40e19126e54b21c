"""``MonarchLinear``: a frozen ``nn.Linear`` plus a MoRe (Monarch) adapter.

The adapter is two block-diagonal factors with a permutation between them (GUIDE.md "Monarch
(MoRe) exactly"): ``W1 (N, r, ceil(n/N))`` and ``W2 (N, s, r)``, about ``r * (n + m)``
parameters for a maximum rank of ``N * r``. Initialisation follows MoRe: each block of ``W1``
Kaiming-uniform (``a = sqrt(5)``, fan-in = the block's input size), ``W2`` zero, so the adapted
layer starts equal to the frozen one. The kernels live in ``peft_kernels.ops.monarch``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .._checks import check_dropout, check_positive_int, check_tensor
from ..ops.monarch import monarch_linear
from ..reference.monarch import monarch_delta_weight, monarch_dims
from .lora import _AdapterLinear


class MonarchLinear(_AdapterLinear):
    """``y = base_layer(x) + dropout(monarch(x; W1, W2))``.

    Build it with ``MonarchLinear.from_linear(linear, nblocks=4, blk_r=4, dropout=0.0)``; the
    given ``linear`` becomes ``self.base_layer`` and is frozen. The adapter's parameters are
    ``W1`` and ``W2`` (everything not under ``base_layer.``)."""

    family = "monarch"

    def __init__(self, base_layer: nn.Linear, nblocks: int = 4, blk_r: int = 4, dropout: float = 0.0,
                 impl: Optional[str] = None):
        # validate everything before touching the caller's linear (the base class freezes it)
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        check_tensor("base_layer.weight", base_layer.weight, ndim=2)
        check_positive_int("nblocks", nblocks)
        check_positive_int("blk_r", blk_r)
        check_dropout("dropout", dropout)
        # raises ValueError when nblocks > in_features
        p, s = monarch_dims(base_layer.in_features, base_layer.out_features, nblocks)
        super().__init__(base_layer, dropout, impl)
        self.nblocks = nblocks
        self.blk_r = blk_r
        w = base_layer.weight
        self.W1 = nn.Parameter(torch.empty(nblocks, blk_r, p, device=w.device, dtype=w.dtype))
        self.W2 = nn.Parameter(torch.empty(nblocks, s, blk_r, device=w.device, dtype=w.dtype))
        self.reset_adapter_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, nblocks: int = 4, blk_r: int = 4, dropout: float = 0.0,
                    impl: Optional[str] = None) -> "MonarchLinear":
        return cls(linear, nblocks=nblocks, blk_r=blk_r, dropout=dropout, impl=impl)

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """MoRe's init: Kaiming-uniform (a = sqrt(5)) on each block of W1, zeros for W2."""
        for k in range(self.nblocks):
            nn.init.kaiming_uniform_(self.W1[k], a=math.sqrt(5))
        nn.init.zeros_(self.W2)

    # --- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged or self._adapters_disabled:
            return self.base_layer(x)
        p = self.dropout if self.training else 0.0
        # drawn from torch's default CPU generator so torch.manual_seed reproduces it and
        # torch.utils.checkpoint's RNG-state replay regenerates the same mask; kept a one-element
        # tensor (read only inside the custom ops) so torch.compile does not graph-break on it
        seed = torch.randint(0, 2**62, (1,)) if p > 0.0 else 0
        return monarch_linear(x, self.base_layer.weight, self.W1, self.W2, self.base_layer.bias,
                              dropout_p=p, seed=seed, impl=self.impl)

    # --- merge ---------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` change in fp32 (adapter applied to I)."""
        return monarch_delta_weight(self.W1.detach().float(), self.W2.detach().float(),
                                    self.in_features, self.out_features)

    # merged / merge(keep_original=...) / unmerge / to_linear: _AdapterLinear's, on delta_weight()

    # --- bookkeeping ---------------------------------------------------------------------------

    def adapter_config(self) -> dict:
        return {"nblocks": self.nblocks, "blk_r": self.blk_r, "dropout": self.dropout}

    def num_adapter_parameters(self) -> int:
        """``N*r*(p + s)``, about ``r * (in_features + out_features)``."""
        return self.W1.numel() + self.W2.numel()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"blk_r={self.blk_r}, dropout={self.dropout}, adapter_params={self.num_adapter_parameters()}, "
                f"merged={self._merged}")


__all__ = ["MonarchLinear"]
