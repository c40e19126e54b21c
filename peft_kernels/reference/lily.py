"""Router-weighted projector mixing in plain torch: Lily and FLoE's low-rank experts.

``h = x @ LP^T`` ``(T, r)``; router logits from ``h`` (Lily, router ``(E, r)``) or from ``x``
(MoE-LoRA, router ``(E, d_in)``); ``p = softmax(logits)`` in fp32, ``(T, E)``.

- ``routing="batch"`` (HF PEFT's ``lily``): ``w = mean_t p``; ``delta = s * h @ (sum_e w_e HP_e)^T``.
- ``routing="token"``: ``delta[t] = s * sum_e p[t,e] HP_e @ h[t]`` = ``Z @ HPcat^T`` with
  ``Z[t, e*r + j] = p[t,e] h[t,j]`` and ``HPcat[o, e*r + j] = HP[e, o, j]``.

HP is ``(E, d_out, r)``. For MoE-LoRA, LP is the shared A, HP the B experts, ``s = alpha/r``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_bias, check_choice, check_input, check_same_device, check_tensor
from ._common import base_linear, compute_dtype, flatten_tokens

ROUTINGS = ("token", "batch")
ROUTER_INPUTS = ("h", "x")


def check_lily_args(x, weight, lp, router, hp, bias, routing, router_input) -> tuple[int, int]:
    """Validate; returns ``(r, E)``."""
    check_choice("routing", routing, ROUTINGS)
    check_choice("router_input", router_input, ROUTER_INPUTS)
    check_tensor("weight", weight, ndim=2)
    d_out, d_in = weight.shape
    check_input(x, d_in)
    check_tensor("lp", lp, ndim=2)
    r = lp.shape[0]
    if r < 1:
        raise ValueError(f"lp must have r >= 1 rows, got shape {tuple(lp.shape)}")
    check_tensor("lp", lp, shape=(r, d_in))
    check_tensor("hp", hp, ndim=3)
    E = hp.shape[0]
    if E < 1:
        raise ValueError(f"hp must hold E >= 1 projectors, got shape {tuple(hp.shape)}")
    check_tensor("hp", hp, shape=(E, d_out, r))
    check_tensor("router", router, shape=(E, r if router_input == "h" else d_in))
    check_bias(bias, d_out)
    check_same_device(x=x, weight=weight, lp=lp, router=router, hp=hp, bias=bias)
    return r, E


def router_probs(x2, h, router, router_input: str) -> torch.Tensor:
    """Softmax over experts in at least fp32 (fp64 stays fp64), ``(T, E)``."""
    src = h if router_input == "h" else x2
    dt = torch.promote_types(src.dtype, torch.float32)
    return torch.softmax(src.to(dt) @ router.to(dt).t(), dim=-1)


def lily_adapter(x2, lp, router, hp, scaling: float, routing: str, router_input: str) -> torch.Tensor:
    """The adapter output alone for a 2-D input, ``(T, d_out)`` in ``x2.dtype``."""
    h = x2 @ lp.t()
    p = router_probs(x2, h, router, router_input)
    E, d_out, r = hp.shape
    if routing == "batch":
        # token-mean as sum / max(T, 1): no tokens mix nothing (a 0/0 mean would put NaN into hp's gradient)
        w = (p.sum(dim=0) / max(p.shape[0], 1)).to(x2.dtype)
        hp_bar = torch.einsum("e,eor->or", w, hp)
        return scaling * (h @ hp_bar.t())
    z = (p.to(x2.dtype)[:, :, None] * h[:, None, :]).reshape(-1, E * r)
    hp_cat = hp.permute(1, 0, 2).reshape(d_out, E * r)
    return scaling * (z @ hp_cat.t())


def lily(
    x: torch.Tensor,
    weight: torch.Tensor,
    lp: torch.Tensor,
    router: torch.Tensor,
    hp: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    routing: str = "token",
    router_input: str = "h",
    upcast: bool = False,
) -> torch.Tensor:
    """Reference Lily / MoE-LoRA linear; returns ``(..., d_out)`` in ``x.dtype``."""
    check_lily_args(x, weight, lp, router, hp, bias, routing, router_input)
    dt = compute_dtype(x, upcast)
    x2 = flatten_tokens(x).to(dt)
    delta = lily_adapter(x2, lp.to(dt), router, hp.to(dt), scaling, routing, router_input)
    y = base_linear(x2, weight, bias, dt) + delta
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def lily_delta_weight(x, lp, router, hp, scaling: float, router_input: str = "h") -> torch.Tensor:
    """Dense ``(d_out, d_in)`` change for ``routing="batch"`` on the batch ``x``.

    The mixture weights are the token-mean of the router softmax over ``x``, so the dense change
    depends on the batch; with ``routing="token"`` no input-independent dense change exists
    (neither implementation can merge it).
    """
    x2 = flatten_tokens(x)
    h = x2 @ lp.t()
    p = router_probs(x2, h, router, router_input)
    w = (p.sum(dim=0) / max(p.shape[0], 1)).to(hp.dtype)  # no tokens: no change (not 0/0)
    return scaling * (torch.einsum("e,eor->or", w, hp) @ lp)
