"""``SparseLinear``: a frozen ``nn.Linear`` plus a sparse-masked delta (RoSA-style), optionally with a
LoRA beside it (RoSA's ``W0 + S + s * B A``).

State: buffers ``crow`` ``(d_out+1,)`` / ``col`` ``(nnz,)`` (int64, the fixed mask, saved with the
adapter) and the parameter ``values`` ``(nnz,)`` (zero-init, the base weight's dtype); with
``lora_r > 0`` also ``lora_A`` / ``lora_B`` ``nn.Linear`` submodules initialised as in PEFT (A
Kaiming-uniform, B zeros). A fresh module therefore computes exactly ``base_layer(x)``.

The mask comes from ``mask=`` (a ``(crow, col)`` pair or a dense bool ``(d_out, d_in)`` tensor) or is
selected by ``peft_kernels.modules.masks.select_mask`` (``method="random"`` with ``seed``, or
``"fisher"``/``"grad"`` with ``scores=`` from ``accumulate_scores``). Its index values are validated
once here; the transposed CSR the backward needs is built once per mask and kept in non-persistent
buffers (``crow_t``/``row_t``/``perm``), rebuilt by ``set_mask``, ``load_state_dict`` and the checkpoint
loader's ``_adapter_state_loaded`` hook.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import dispatch
from .._checks import check_density, check_tensor
from ..ops.sparse import csr_transpose, rosa_linear, sparse_linear
from ..reference.lora import lora_delta_weight
from ..reference.sparse import check_csr, sparse_delta_weight
from .lora import _AdapterLinear
from .masks import METHODS, dense_to_csr, select_mask


def _mask_to_csr(mask, shape: tuple[int, int]):
    """``mask`` as a validated int64 CSR pair."""
    if isinstance(mask, torch.Tensor):
        check_tensor("mask", mask, shape=shape, dtypes=(torch.bool,))
        crow, col = dense_to_csr(mask)
    elif isinstance(mask, (tuple, list)) and len(mask) == 2:
        crow, col = mask
        check_tensor("mask[0] (crow)", crow, dtypes=(torch.int32, torch.int64))
        check_tensor("mask[1] (col)", col, dtypes=(torch.int32, torch.int64))
    else:
        raise TypeError("mask must be a (crow, col) pair or a dense bool (d_out, d_in) tensor, "
                        f"got {type(mask).__name__}")
    check_csr(crow, col, torch.empty(col.shape[0] if col.dim() == 1 else 0, device=col.device), shape)
    return crow.to(torch.int64), col.to(torch.int64)


def _refresh_after_load(module: "SparseLinear", _incompatible_keys) -> None:
    # validate the loaded mask before anything indexes with it (a corrupt crow/col would make the
    # transpose and the kernels read and write out of bounds), then rebuild the transpose; a
    # module-level function (not a lambda) keeps the module picklable
    module._adapter_state_loaded()


class SparseLinear(_AdapterLinear):
    """``y = base_layer(x) + x @ (M⊙S)^T [+ s * dropout(x) @ A^T @ B^T]``."""

    family = "sparse"

    def __init__(self, base_layer: nn.Linear, density: float = 0.01, mask=None, lora_r: int = 0,
                 lora_alpha: Optional[float] = None, lora_dropout: float = 0.0, method: str = "random",
                 seed: int = 0, impl: Optional[str] = None, scores: Optional[torch.Tensor] = None,
                 per_row: bool = False):
        # Validate everything before touching the caller's linear (super() freezes it).
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(base_layer).__name__}")
        if isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 0:
            raise ValueError(f"lora_r must be a non-negative int, got {lora_r!r}")
        if lora_alpha is not None and (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float))):
            raise TypeError(f"lora_alpha must be a number or None, got {type(lora_alpha).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        shape = (base_layer.out_features, base_layer.in_features)
        if mask is None:
            crow, col = select_mask(shape, scores, density=density, per_row=per_row, method=method, seed=seed)
        else:
            crow, col = _mask_to_csr(mask, shape)
        nnz = int(col.shape[0])
        if nnz == 0:
            raise ValueError("mask must select at least one weight entry")

        super().__init__(base_layer, lora_dropout, impl)
        w = base_layer.weight
        self.method = method
        self.seed = int(seed)
        self.per_row = bool(per_row)
        self.density = nnz / (shape[0] * shape[1])  # the mask's actual density
        self.register_buffer("crow", crow.to(w.device))
        self.register_buffer("col", col.to(w.device))
        self.values = nn.Parameter(torch.zeros(nnz, dtype=w.dtype, device=w.device))
        self.lora_r = lora_r
        self.lora_alpha = float(lora_alpha) if lora_alpha is not None else float(lora_r)
        self.scaling = self.lora_alpha / lora_r if lora_r > 0 else 0.0
        if lora_r > 0:
            # PEFT's LoRA init: A Kaiming-uniform (a = sqrt(5)), B zeros
            self.lora_A = nn.Linear(self.in_features, lora_r, bias=False, device=w.device, dtype=w.dtype)
            self.lora_B = nn.Linear(lora_r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self._register_transpose()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @classmethod
    def from_linear(cls, linear: nn.Linear, density: float = 0.01, mask=None, lora_r: int = 0,
                    lora_alpha: Optional[float] = None, lora_dropout: float = 0.0, method: str = "random",
                    seed: int = 0, impl: Optional[str] = None, scores: Optional[torch.Tensor] = None,
                    per_row: bool = False) -> "SparseLinear":
        if mask is None:
            check_density("density", density)
        return cls(linear, density=density, mask=mask, lora_r=lora_r, lora_alpha=lora_alpha,
                   lora_dropout=lora_dropout, method=method, seed=seed, impl=impl, scores=scores, per_row=per_row)

    # -- mask bookkeeping
    @property
    def nnz(self) -> int:
        return int(self.col.shape[0])

    def _register_transpose(self) -> None:
        # Non-persistent buffers: they follow .to(device) but stay out of the state dict (the
        # mask is crow/col; the transpose is derived from it).
        crow_t, row_t, perm = csr_transpose(self.crow, self.col, self.in_features)
        self.register_buffer("crow_t", crow_t, persistent=False)
        self.register_buffer("row_t", row_t, persistent=False)
        self.register_buffer("perm", perm, persistent=False)

    def _refresh_transpose(self) -> None:
        crow_t, row_t, perm = csr_transpose(self.crow, self.col, self.in_features)
        self.crow_t, self.row_t, self.perm = crow_t, row_t, perm

    def csr_t(self):
        """The transposed CSR ``(crow_t, row_t, perm)`` of the backward SpMM, built once per mask.

        It is rebuilt by ``set_mask``, ``load_state_dict`` and the checkpoint loader's
        ``_adapter_state_loaded``; write new masks through those, not into ``crow``/``col`` in place.
        """
        return self.crow_t, self.row_t, self.perm

    @torch.no_grad()
    def set_mask(self, mask) -> None:
        """Replace the mask (same nnz, so ``values`` keeps its shape; values are kept as they are).
        A merged module is unmerged with the old mask and re-merged with the new one (as AdaLoRA's
        ``set_rank_mask`` does), so the merged weight stays right."""
        crow, col = _mask_to_csr(mask, (self.out_features, self.in_features))
        if col.shape != self.col.shape:
            raise ValueError(f"set_mask needs the same nnz={self.nnz}, got {col.shape[0]}")
        with self._unmerged():
            self.crow.copy_(crow)
            self.col.copy_(col)
            self._refresh_transpose()

    def _check_incoming_state(self, state_dict, prefix: str, local_metadata=None) -> None:
        """Check the incoming mask before torch copies anything: torch skips a tensor whose shape
        differs but still copies the others, so a checkpoint with another nnz would land its crow
        (same size) beside the old col/values and leave a mask that no longer fits together."""
        super()._check_incoming_state(state_dict, prefix, local_metadata)
        d_out = self.out_features
        want = {"crow": (d_out + 1,), "col": (self.nnz,), "values": (self.nnz,)}
        got = {k: state_dict[prefix + k] for k in want if isinstance(state_dict.get(prefix + k), torch.Tensor)}
        for k, t in got.items():
            if tuple(t.shape) == want[k]:
                continue
            if k == "crow":
                raise ValueError(f"{prefix}crow must have shape ({d_out + 1},) for out_features={d_out}, "
                                 f"got {tuple(t.shape)}")
            raise ValueError(
                f"{prefix}{k} has shape {tuple(t.shape)}, but this SparseLinear's mask has nnz={self.nnz} "
                f"(expected shape ({self.nnz},)): a checkpoint with another mask size needs a module built "
                f"with it (e.g. mask=(crow, col) from the checkpoint); the module was left unchanged")
        if "crow" in got or "col" in got:
            # validate the mask this load would leave (the loaded parts beside the kept ones) on the
            # CPU, in the buffers' dtype, so a corrupt mask is refused with the module unchanged
            crow = got.get("crow", self.crow).detach().to("cpu", torch.int64)
            col = got.get("col", self.col).detach().to("cpu", torch.int64)
            check_csr(crow, col, torch.empty(col.shape[0]), (d_out, self.in_features))

    def _adapter_state_loaded(self) -> None:
        """Called after a checkpoint was copied into the buffers: validate the new mask, rebuild the transpose."""
        check_csr(self.crow, self.col, self.values, (self.out_features, self.in_features))
        self._refresh_transpose()

    # -- math
    def delta_weight(self) -> torch.Tensor:
        """Dense fp32 ``M⊙S (+ s * B A)`` (merge time only; training never builds it)."""
        delta = sparse_delta_weight(self.crow, self.col, self.values.detach().float(),
                                    (self.out_features, self.in_features))
        if self.lora_r > 0:
            delta = delta + lora_delta_weight(self.lora_A.weight.float(), self.lora_B.weight.float(), self.scaling)
        return delta

    def _lora_impl(self, x: torch.Tensor) -> Optional[str]:
        # ``impl`` names the sparse implementation; pass it on to the LoRA kernel only where the
        # LoRA family has it (e.g. "cpp" is sparse-only), else let LoRA's dispatch choose.
        if self.impl is None or dispatch.unavailable_reason("lora", self.impl, x.device, x.dtype) is not None:
            return None
        return self.impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged or self._adapters_disabled:
            return self.base_layer(x)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if self.lora_r == 0:
            return sparse_linear(x, weight, self.crow, self.col, self.values, bias, impl=self.impl,
                                 csr_t=self.csr_t())
        p, seed = self._dropout_and_seed()
        return rosa_linear(x, weight, self.crow, self.col, self.values, self.lora_A.weight, self.lora_B.weight,
                           bias, self.scaling, p, seed, impl=self.impl, csr_t=self.csr_t(),
                           lora_impl=self._lora_impl(x))

    def adapter_config(self) -> dict:
        """Options that rebuild a module with the same parameter shapes. The mask itself travels in
        the ``crow``/``col`` buffers; ``density`` is the mask's exact density, so a global top-k of
        that density has the same nnz, and ``method="random"`` needs no scores to rebuild it."""
        return {"density": self.density, "per_row": False, "method": "random", "seed": self.seed,
                "lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.dropout}

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
             f"density={self.density:.4g}, method={self.method}, per_row={self.per_row}, seed={self.seed}")
        if self.lora_r > 0:
            s += f", lora_r={self.lora_r}, lora_alpha={self.lora_alpha}, lora_dropout={self.dropout}"
        return s + f", merged={self._merged}, impl={self.impl}"


__all__ = ["SparseLinear"]
