"""Drop-in Lily and MoE-LoRA layers, and a model-level builder for Lily's shared HP pools.

- ``LilyLinear`` (family ``"lily"``): per layer ``lp`` ``(r, d_in)`` and ``router`` ``(E, r)``; the E
  high-dim projectors ``hp`` ``(E, d_out, r)`` are normally ONE ``nn.Parameter`` shared by every
  layer of a group (``build_lily``), so the pool is trained from all of them and saved once
  (the same Parameter object is registered on each module; savers that dedupe shared tensors,
  e.g. ``safetensors.torch.save_model``, store it once).
- ``MoELoRALinear`` (family ``"moelora"``): FLoE's HydraLoRA-style low-rank experts: one shared
  ``lora_A`` ``(r, d_in)``, a router on the input ``(E, d_in)`` and E ``lora_B`` experts
  ``(E, d_out, r)`` per layer; ``scaling = alpha / r``, per-token routing.

Merging (the one exception to the module protocol): neither family has an input-independent
dense change. With ``routing="token"`` each token mixes the HPs with its own router weights, so
no single matrix exists; with ``routing="batch"`` the mixture weights are the token-mean of the
router softmax over the *current batch*, so a merged matrix would be right for one batch only.
``merge()`` and ``to_linear()`` therefore raise ``MergeNotSupportedError`` (HF PEFT's ``lily``
refuses to merge for the same reason); ``merged`` is always False and ``unmerge()`` is a no-op
with a warning. ``reference.lily_delta_weight`` gives the batch-specific dense change if wanted.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from .._checks import check_choice, check_positive_int, check_tensor
from ..ops.lily import lily_linear
from ..reference.lily import ROUTINGS
from .lora import _AdapterSwitch, _BaseLayerAttrs

__all__ = ["LilyLinear", "MoELoRALinear", "build_lily", "MergeNotSupportedError"]


class MergeNotSupportedError(RuntimeError):
    """Raised by ``merge()`` / ``to_linear()`` of router-mixing layers (see the module docstring)."""


def _why_no_merge(family: str, routing: str) -> str:
    if routing == "token":
        why = ("routing='token' mixes the projectors with per-token router weights, so no single "
               "dense matrix reproduces the layer")
    else:
        why = ("routing='batch' mixes the projectors with the token-mean of the router softmax over "
               "the current batch, so a dense matrix would be right for one batch only")
    return (f"{family} layers cannot be merged into the base weight: {why}. Keep the adapter "
            f"unmerged (HF PEFT's lily refuses to merge too), or use "
            f"peft_kernels.reference.lily_delta_weight(x, ...) for the change on a given batch.")


def _check_linear(linear) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    return linear


def _kaiming(shape, like: torch.Tensor) -> nn.Parameter:
    # nn.Linear's default init (what PEFT uses for lily_A / lily_router): fan_in = shape[-1]
    t = torch.empty(shape, device=like.device, dtype=like.dtype)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return nn.Parameter(t)


class _RouterMixBase(_BaseLayerAttrs, _AdapterSwitch, nn.Module):
    """Shared plumbing: frozen base layer, merge refusal, protocol properties, the on/off switch."""

    family = ""
    routing = "token"

    def _init_base(self, linear: nn.Linear, impl: Optional[str]) -> None:
        self.base_layer = linear
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.impl = impl

    @property
    def merged(self) -> bool:
        return False

    def merge(self, keep_original: bool = False) -> None:
        """Always raises ``MergeNotSupportedError``: no input-independent dense change exists
        (``keep_original`` is accepted only so every family has the same ``merge`` signature)."""
        raise MergeNotSupportedError(_why_no_merge(self.family, self.routing))

    def unmerge(self) -> None:
        """No-op with a warning (the layer can never be merged)."""
        warnings.warn(f"{self.family} layer is not merged (it cannot be); unmerge() does nothing", stacklevel=2)

    def to_linear(self) -> nn.Linear:
        """Always raises ``MergeNotSupportedError``, like ``merge()``."""
        raise MergeNotSupportedError(_why_no_merge(self.family, self.routing))


class LilyLinear(_RouterMixBase):
    """Lily layer: ``y = x W0^T + b + scaling * mix(x)`` with router on ``h = x @ lp^T``.

    ``lp`` and ``hp`` may be given as existing ``nn.Parameter``s to share them with other layers
    (``build_lily`` does this); otherwise fresh ones are made: ``lp`` and ``router`` Kaiming-uniform
    (a=sqrt(5), like PEFT), ``hp`` zero so the adapter starts as no change.
    """

    family = "lily"

    def __init__(self, linear: nn.Linear, r: int = 16, num_experts: int = 4, scaling: float = 1.0,
                 routing: str = "batch", lp: Optional[nn.Parameter] = None, hp: Optional[nn.Parameter] = None,
                 impl: Optional[str] = None):
        super().__init__()
        _check_linear(linear)
        check_positive_int("r", r)
        check_positive_int("num_experts", num_experts)
        check_choice("routing", routing, ROUTINGS)
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
            raise TypeError(f"scaling must be a float, got {type(scaling).__name__}")
        self._init_base(linear, impl)
        self.r, self.num_experts, self.scaling, self.routing = r, num_experts, float(scaling), routing
        w = linear.weight
        if lp is None:
            lp = _kaiming((r, self.in_features), w)
        else:
            self._check_shared("lp", lp, (r, self.in_features), w)
        if hp is None:
            hp = nn.Parameter(torch.zeros(num_experts, self.out_features, r, device=w.device, dtype=w.dtype))
        else:
            self._check_shared("hp", hp, (num_experts, self.out_features, r), w)
        self.lp = lp
        self.router = _kaiming((num_experts, r), w)
        self.hp = hp

    @staticmethod
    def _check_shared(name, t, shape, w) -> None:
        if not isinstance(t, nn.Parameter):
            raise TypeError(f"{name} must be an nn.Parameter (to be shared), got {type(t).__name__}")
        check_tensor(name, t, shape=shape)
        if t.device != w.device:
            raise ValueError(f"{name} must be on the base layer's device {w.device}, got {t.device}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 16, num_experts: int = 4, scaling: float = 1.0,
                    routing: str = "batch", lp: Optional[nn.Parameter] = None, hp: Optional[nn.Parameter] = None,
                    impl: Optional[str] = None) -> "LilyLinear":
        return cls(linear, r=r, num_experts=num_experts, scaling=scaling, routing=routing, lp=lp, hp=hp, impl=impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        if self._adapters_disabled:
            return b(x)
        return lily_linear(x, b.weight, self.lp, self.router, self.hp, b.bias, scaling=self.scaling,
                           routing=self.routing, router_input="h", impl=self.impl)

    def adapter_config(self) -> dict:
        return {"r": self.r, "num_experts": self.num_experts, "scaling": self.scaling, "routing": self.routing}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"num_experts={self.num_experts}, scaling={self.scaling}, routing={self.routing!r}")


class MoELoRALinear(_RouterMixBase):
    """FLoE's low-rank experts: ``y = x W0^T + b + (alpha/r) sum_e g_e(x) B_e A x``, ``g = softmax(x R^T)``.

    Parameters: ``lora_A`` ``(r, d_in)`` (Kaiming-uniform), ``router`` ``(E, d_in)`` (Kaiming-uniform),
    ``lora_B`` ``(E, d_out, r)`` (zero). Per-token routing, router on the input.
    """

    family = "moelora"
    routing = "token"

    def __init__(self, linear: nn.Linear, r: int = 8, num_experts: int = 4, alpha: float = 16.0,
                 impl: Optional[str] = None):
        super().__init__()
        _check_linear(linear)
        check_positive_int("r", r)
        check_positive_int("num_experts", num_experts)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
        self._init_base(linear, impl)
        self.r, self.num_experts, self.alpha = r, num_experts, float(alpha)
        self.scaling = self.alpha / r
        w = linear.weight
        self.lora_A = _kaiming((r, self.in_features), w)
        self.router = _kaiming((num_experts, self.in_features), w)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, r, device=w.device, dtype=w.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, num_experts: int = 4, alpha: float = 16.0,
                    impl: Optional[str] = None) -> "MoELoRALinear":
        return cls(linear, r=r, num_experts=num_experts, alpha=alpha, impl=impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        if self._adapters_disabled:
            return b(x)
        return lily_linear(x, b.weight, self.lora_A, self.router, self.lora_B, b.bias, scaling=self.scaling,
                           routing="token", router_input="x", impl=self.impl)

    def adapter_config(self) -> dict:
        return {"r": self.r, "num_experts": self.num_experts, "alpha": self.alpha}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"num_experts={self.num_experts}, alpha={self.alpha}")


def build_lily(named_linears: dict, r: int = 16, num_experts: int = 4, stride: int = 1, scaling: float = 1.0,
               routing: str = "batch", impl: Optional[str] = None) -> dict:
    """Wrap every linear of a model in ``LilyLinear`` with Lily's cross-layer sharing (like PEFT's).

    ``named_linears`` maps dotted module names (``"layers.0.mlp.up_proj"``) to ``nn.Linear``s, in
    model order. Layers are grouped by (target name = last name component, weight shape); within a
    group, in the given order, all layers share ONE ``hp`` Parameter ``(E, d_out, r)`` and every
    ``stride`` consecutive layers share one ``lp`` Parameter (PEFT's ``stride_A``); each layer has
    its own router. Returns ``{name: LilyLinear}`` in the input order; the caller swaps them in.
    """
    if not isinstance(named_linears, dict):
        raise TypeError(f"named_linears must be a dict of name -> nn.Linear, got {type(named_linears).__name__}")
    check_positive_int("stride", stride)
    check_positive_int("r", r)
    check_positive_int("num_experts", num_experts)
    groups: dict = {}
    for name, lin in named_linears.items():
        if not isinstance(name, str):
            raise TypeError(f"named_linears keys must be str module names, got {type(name).__name__}")
        _check_linear(lin)
        groups.setdefault((name.split(".")[-1], tuple(lin.weight.shape)), []).append(name)
    out = {}
    for (_, (d_out, d_in)), names in groups.items():
        w0 = named_linears[names[0]].weight
        hp = nn.Parameter(torch.zeros(num_experts, d_out, r, device=w0.device, dtype=w0.dtype))
        lp = None
        for i, name in enumerate(names):
            if i % stride == 0:
                lp = _kaiming((r, d_in), w0)
            out[name] = LilyLinear.from_linear(named_linears[name], r=r, num_experts=num_experts, scaling=scaling,
                                               routing=routing, lp=lp, hp=hp, impl=impl)
    return {name: out[name] for name in named_linears}
