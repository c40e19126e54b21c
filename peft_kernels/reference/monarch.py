"""Monarch (MoRe, arXiv 2408.17383) adapter in plain torch.

W0 is ``(m, n)`` (out, in). ``N = nblocks``, ``r = blk_r``, ``p = ceil(n / N)`` (x is zero-padded
to ``N*p``), ``s = ceil(p*m / n)``. Factors ``W1 (N, r, p)``, ``W2 (N, s, r)``:

1. ``Y1[t,k,:] = W1[k] @ X[t,k,:]``                      -> ``(T, N, r)``, flat index ``k*r + j``
2. ``Z[t,l,i] = Y1flat[t, i*N + l]``                      -> ``(T, N, r)``
3. ``Y2[t,l,:] = W2[l] @ Z[t,l,:]``                       -> ``(T, N, s)``
4. ``out[t, c*N + l] = Y2[t,l,c]``, truncated to m columns
5. ``y = x @ W0^T (+ b) + dropout(out)`` (dropout mask over the flattened ``(T, m)`` output)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .._checks import (check_bias, check_dropout, check_input, check_positive_int, check_same_device,
                       check_seed, check_tensor)
from ._common import base_linear, compute_dtype, flatten_tokens
from ._philox import apply_dropout


def monarch_dims(in_features: int, out_features: int, nblocks: int) -> tuple[int, int]:
    """``(p, s)``: input block size and output block size."""
    check_positive_int("in_features", in_features)
    check_positive_int("out_features", out_features)
    check_positive_int("nblocks", nblocks)
    if nblocks > in_features:
        raise ValueError(f"nblocks must be <= in_features ({in_features}), got {nblocks}")
    p = math.ceil(in_features / nblocks)
    s = math.ceil(p * out_features / in_features)
    return p, s


def check_monarch_factors(W1, W2, in_features: int, out_features: int) -> tuple[int, int, int, int]:
    """Validate factor shapes; returns ``(N, r, p, s)``."""
    check_tensor("W1", W1, ndim=3)
    N, r, p_got = W1.shape
    if N < 1 or r < 1:
        raise ValueError(f"W1 must be (nblocks>=1, blk_r>=1, p), got {tuple(W1.shape)}")
    p, s = monarch_dims(in_features, out_features, N)
    check_tensor("W1", W1, shape=(N, r, p))
    check_tensor("W2", W2, shape=(N, s, r))
    return N, r, p, s


def check_monarch_args(x, weight, W1, W2, bias, dropout_p, seed) -> None:
    """Validate every argument of a Monarch linear (shared by the reference and the kernels)."""
    check_tensor("weight", weight, ndim=2)
    m, n = weight.shape
    check_input(x, n)
    check_monarch_factors(W1, W2, n, m)
    check_bias(bias, m)
    check_same_device(x=x, weight=weight, W1=W1, W2=W2, bias=bias)
    check_dropout("dropout_p", dropout_p)
    check_seed(seed)


def monarch_adapter(x2: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, out_features: int) -> torch.Tensor:
    """The Monarch product alone on a 2-D ``(T, n)`` input, in the input's dtype -> ``(T, m)``."""
    T, n = x2.shape
    N, r, p = W1.shape
    s = W2.shape[1]
    X = F.pad(x2, (0, N * p - n)).view(T, N, p)
    Y1 = torch.einsum("tkq,kjq->tkj", X, W1)               # (T, N, r)
    Z = Y1.reshape(T, r, N).transpose(1, 2)                # Z[t,l,i] = Y1flat[t, i*N + l]
    Y2 = torch.einsum("tli,lci->tlc", Z, W2)               # (T, N, s)
    return Y2.transpose(1, 2).reshape(T, s * N)[:, :out_features]


def monarch(
    x: torch.Tensor,
    weight: torch.Tensor,
    W1: torch.Tensor,
    W2: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference MoRe linear; returns ``(..., m)`` in ``x.dtype``."""
    check_monarch_args(x, weight, W1, W2, bias, dropout_p, seed)
    m = weight.shape[0]
    dt = compute_dtype(x, upcast)
    x2 = flatten_tokens(x).to(dt)
    out = monarch_adapter(x2, W1.to(dt), W2.to(dt), m)
    y = base_linear(x2, weight, bias, dt) + apply_dropout(out, dropout_p, seed)
    return y.to(x.dtype).reshape(*x.shape[:-1], m)


def monarch_delta_weight(W1: torch.Tensor, W2: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Dense ``(m, n)`` change: the adapter applied to the identity (no dropout)."""
    check_monarch_factors(W1, W2, in_features, out_features)
    eye = torch.eye(in_features, dtype=W1.dtype, device=W1.device)
    return monarch_adapter(eye, W1, W2, out_features).t().contiguous()
