"""``first_order_only``: the backward decorator of every fused autograd.Function.

The fused backwards are hand-written kernels with no graph of their own, so they are first-order
only. torch's ``once_differentiable`` guards that only when an incoming gradient requires grad:
with ``create_graph=True`` and a plain ``grad_output`` (the gradient-penalty idiom,
``grad(D(x).sum(), x, create_graph=True)``) it returns gradients with no ``grad_fn``, and a later
backward through them silently gives the parameters zero second-order terms. Here that case raises.
"""
from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable


def first_order_only(backward):
    """``once_differentiable``, plus a clear error where it would silently drop second-order terms."""
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        # grad mode is on inside a backward only under create_graph=True
        if torch.is_grad_enabled() and not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads):
            owner = type(ctx).__name__.removesuffix("Backward")
            raise RuntimeError(
                f"peft_kernels: {owner}'s fused backward is first-order only, and create_graph=True asks for "
                "a differentiable gradient (double backward, gradient penalties); run these layers with "
                "impl='torch' for that")
        return inner(ctx, *grads)

    return wrapper
