"""Sparse-masked adapter (RoSA-style) in plain torch.

S holds ``nnz`` values at a fixed mask M in row-compressed form: ``crow`` ``(d_out+1,)``,
``col`` ``(nnz,)`` (sorted and duplicate-free within each row), ``val`` ``(nnz,)``.
``y = x @ W0^T (+ b) + x @ (M ⊙ S)^T``. Gradients: ``dx += dy @ (M⊙S)``, and ``dval`` only at
the mask positions (autograd through the gather below computes exactly that SDDMM).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_bias, check_input, check_same_device, check_tensor
from ._common import base_linear, compute_dtype, flatten_tokens

INDEX_DTYPES = (torch.int32, torch.int64)


def check_csr(crow, col, val, shape: tuple[int, int], check_values: bool = True) -> int:
    """Validate a CSR mask for a ``(d_out, d_in)`` weight; returns nnz.

    ``check_values`` also reads the index tensors (a device sync on GPU): done once when a
    mask is built, not on every step.
    """
    d_out, d_in = shape
    check_tensor("crow", crow, shape=(d_out + 1,), dtypes=INDEX_DTYPES)
    check_tensor("col", col, ndim=1, dtypes=INDEX_DTYPES)
    nnz = col.shape[0]
    check_tensor("val", val, shape=(nnz,))
    check_same_device(crow=crow, col=col, val=val)
    if check_values:
        c = crow.to(torch.int64)
        if int(c[0]) != 0 or int(c[-1]) != nnz:
            raise ValueError(f"crow must start at 0 and end at nnz={nnz}, got {int(c[0])}..{int(c[-1])}")
        counts = c.diff()
        if bool((counts < 0).any()):
            raise ValueError("crow must be non-decreasing")
        if nnz:
            cl = col.to(torch.int64)
            if bool((cl < 0).any()) or bool((cl >= d_in).any()):
                raise ValueError(f"col indices must be in [0, {d_in}), got min {int(cl.min())} max {int(cl.max())}")
            rows = torch.repeat_interleave(torch.arange(d_out, device=col.device), counts)
            same_row = rows[1:] == rows[:-1]
            if bool((same_row & (cl[1:] <= cl[:-1])).any()):
                raise ValueError("col indices must be strictly increasing within each row (sorted, no duplicates)")
    return nnz


def csr_rows(crow: torch.Tensor) -> torch.Tensor:
    """Row index of every nnz (COO rows)."""
    d_out = crow.shape[0] - 1
    return torch.repeat_interleave(torch.arange(d_out, device=crow.device), crow.to(torch.int64).diff(),
                                   output_size=None)


def sparse_adapter(x2: torch.Tensor, crow, col, val, out_features: int) -> torch.Tensor:
    """``x2 @ (M⊙S)^T`` on a 2-D input, via gather + index_add; ``(T, d_out)``."""
    rows = csr_rows(crow)
    contrib = x2[:, col.to(torch.int64)] * val.to(x2.dtype)
    out = torch.zeros(x2.shape[0], out_features, dtype=x2.dtype, device=x2.device)
    return out.index_add(1, rows, contrib)


def sparse(
    x: torch.Tensor,
    weight: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    val: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    upcast: bool = False,
    check_values: bool = True,
) -> torch.Tensor:
    """Reference sparse-adapter linear; returns ``(..., d_out)`` in ``x.dtype``."""
    check_tensor("weight", weight, ndim=2)
    d_out, d_in = weight.shape
    check_input(x, d_in)
    check_csr(crow, col, val, (d_out, d_in), check_values=check_values)
    check_bias(bias, d_out)
    check_same_device(x=x, weight=weight, val=val, bias=bias)
    dt = compute_dtype(x, upcast)
    x2 = flatten_tokens(x).to(dt)
    y = base_linear(x2, weight, bias, dt) + sparse_adapter(x2, crow, col, val.to(dt), d_out)
    return y.to(x.dtype).reshape(*x.shape[:-1], d_out)


def sparse_delta_weight(crow, col, val, shape: tuple[int, int]) -> torch.Tensor:
    """Dense ``(d_out, d_in)`` ``M ⊙ S`` (for merge and tests only; training never builds it)."""
    check_csr(crow, col, val, shape)
    dense = torch.zeros(shape, dtype=val.dtype, device=val.device)
    dense[csr_rows(crow), col.to(torch.int64)] = val
    return dense
