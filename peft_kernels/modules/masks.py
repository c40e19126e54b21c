"""Mask selection for sparse adapters (RoSA's recipe by default).

- ``accumulate_scores``: per ``nn.Linear``, the diagonal empirical Fisher (running mean of the squared
  dense weight gradient ``dO^T X`` over ``n_samples`` calibration batches, RoSA's default) or the mean
  absolute gradient. Only one dense gradient per layer exists at a time: autograd computes each target
  weight's gradient as backward reaches that layer, a post-accumulate hook folds it into the score and
  drops it at once, and no other parameter gets a gradient.
- ``select_mask``: top-k of the scores at a given density, over the whole matrix (global) or per row,
  or uniformly at random (baseline). Ties break by flat index (stable sort), so the result is
  deterministic; ``random`` draws from a private generator seeded with ``seed``.

Masks are returned as sorted, duplicate-free CSR ``(crow, col)`` (int64), ready for ``SparseLinear``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .._checks import check_choice, check_density, check_positive_int, check_tensor

METHODS = ("fisher", "grad", "random")


def mask_nnz(weight_shape: Sequence[int], density: float, per_row: bool = False) -> int:
    """Number of nonzeros ``select_mask`` keeps: ``round(density * numel)`` (at least 1), or that per row."""
    d_out, d_in = weight_shape
    if per_row:
        return d_out * max(1, min(d_in, round(density * d_in)))
    return max(1, min(d_out * d_in, round(density * d_out * d_in)))


def dense_to_csr(mask: torch.Tensor):
    """A dense bool ``(d_out, d_in)`` mask -> ``(crow, col)`` int64 (row-major order, so sorted)."""
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    counts = mask.sum(dim=1)
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    crow[1:] = torch.cumsum(counts, 0)
    col = mask.nonzero()[:, 1].contiguous()
    return crow, col


def _flat_to_csr(flat_idx: torch.Tensor, d_out: int, d_in: int):
    flat_idx = torch.sort(flat_idx).values
    rows, col = flat_idx // d_in, flat_idx % d_in
    crow = torch.zeros(d_out + 1, dtype=torch.int64, device=flat_idx.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=d_out), 0)
    return crow, col.contiguous()


def select_mask(weight_shape: Sequence[int], scores: Optional[torch.Tensor] = None, density: float = 0.01,
                per_row: bool = False, method: str = "fisher", seed: int = 0):
    """Top-k mask of a ``(d_out, d_in)`` weight; returns CSR ``(crow, col)`` int64.

    ``method="fisher"``/``"grad"`` ranks ``scores`` (from ``accumulate_scores``; any non-negative
    importance works); ``"random"`` ranks uniform noise from a generator seeded with ``seed``.
    ``per_row`` keeps ``round(density * d_in)`` (at least 1) per row; otherwise ``round(density *
    d_out * d_in)`` (at least 1) over the whole matrix. Ties go to the lower flat index.
    """
    if len(weight_shape) != 2 or any(isinstance(s, bool) or not isinstance(s, int) for s in weight_shape):
        raise ValueError(f"weight_shape must be (d_out, d_in) ints, got {tuple(weight_shape)!r}")
    d_out, d_in = weight_shape
    check_positive_int("weight_shape[0] (d_out)", d_out)
    check_positive_int("weight_shape[1] (d_in)", d_in)
    density = check_density("density", density)
    check_choice("method", method, METHODS)
    if method == "random":
        g = torch.Generator().manual_seed(int(seed))
        scores = torch.rand(d_out, d_in, generator=g)
    else:
        if scores is None:
            raise ValueError(f"method={method!r} needs scores (see accumulate_scores); use method='random' without")
        check_tensor("scores", scores, shape=(d_out, d_in))
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("scores must be finite")
    scores = scores.detach().float()
    if per_row:
        k = max(1, min(d_in, round(density * d_in)))
        top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        col = torch.sort(top, dim=1).values.reshape(-1).contiguous()
        crow = torch.arange(d_out + 1, dtype=torch.int64, device=scores.device) * k
        return crow, col
    k = mask_nnz((d_out, d_in), density, per_row=False)
    top = torch.sort(scores.reshape(-1), descending=True, stable=True).indices[:k]
    return _flat_to_csr(top, d_out, d_in)


def _target_linears(model: nn.Module, targets: Optional[Iterable[str]]):
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets is not None:
        targets = list(targets)
        names = {n for n, _ in named}
        missing = [t for t in targets if t not in names]
        if missing:
            raise ValueError(f"targets not found among the model's nn.Linear modules: {missing}")
        named = [(n, m) for n, m in named if n in targets]
    if not named:
        raise ValueError("accumulate_scores found no nn.Linear to score")
    return named


def accumulate_scores(model_or_layer: nn.Module, batches: Iterable, loss_fn: Callable, method: str = "fisher",
                      n_samples: int = 32, targets: Optional[Iterable[str]] = None) -> dict:
    """Per-``nn.Linear`` importance of every weight entry, for ``select_mask``.

    ``loss_fn(model_or_layer, batch) -> scalar loss`` runs one calibration step. Over the first
    ``n_samples`` batches, for each target linear (every ``nn.Linear`` in the model, or the names in
    ``targets``), with ``G = dL/dW = dO^T X`` of that batch:

    - ``"fisher"``: ``mean(G ** 2)`` (diagonal empirical Fisher, RoSA's default; one sample per batch,
      so pass batches of one sequence for the per-sample estimate),
    - ``"grad"``: ``mean(|G|)``.

    Score the plain model, before its layers are wrapped by adapters (adapter kernels treat the base
    weight as frozen; a target that no gradient reaches gets a warning and zero scores).

    Returns ``{module name: (d_out, d_in) fp32 scores}`` (name ``""`` for a bare layer). Parameters'
    ``requires_grad`` and existing ``.grad`` are restored afterwards.
    """
    check_choice("method", method, ("fisher", "grad"))
    check_positive_int("n_samples", n_samples)
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> scalar loss")
    named = _target_linears(model_or_layer, targets)
    params = list(model_or_layer.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    # One score (and one hook) per distinct weight: linears sharing a weight (tied layers) share
    # its gradient, which the first of two hooks would already have dropped.
    names_of: dict = {}
    for n, m in named:
        names_of.setdefault(id(m.weight), (m.weight, []))[1].append(n)
    scores = {key: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for key, (w, _) in names_of.items()}
    hits = {key: 0 for key in names_of}
    handles = []

    def make_hook(key):
        def hook(w):
            g = w.grad.detach().float()
            scores[key].add_(g.square() if method == "fisher" else g.abs())
            hits[key] += 1
            w.grad = None  # drop the dense gradient right away: one alive at a time
        return hook

    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for key, (w, _) in names_of.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(make_hook(key)))
        seen = 0
        for batch in batches:
            loss = loss_fn(model_or_layer, batch)
            check_tensor("loss", loss, ndim=0)
            loss.backward()
            seen += 1
            if seen == n_samples:  # stop here: asking the iterator again would consume a batch unused
                break
        if seen == 0:
            raise ValueError("batches yielded nothing to calibrate on")
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in zip(params, saved_flags, saved_grads):
            p.requires_grad_(flag)
            p.grad = grad
    silent = [n for key, c in hits.items() if c == 0 for n in names_of[key][1]]
    if silent:
        # e.g. layers the loss does not reach, or already wrapped by an adapter whose kernel treats
        # the base weight as frozen: score the plain model before wrapping its layers.
        warnings.warn(f"accumulate_scores: no weight gradient reached {silent}; their scores are zero",
                      stacklevel=2)
    out = {}
    for key, (_, names) in names_of.items():
        s = scores[key].div_(seen)
        for i, n in enumerate(names):
            out[n] = s if i == 0 else s.clone()  # each name its own tensor, as for unshared weights
    return {n: out[n] for n, _ in named}


__all__ = ["METHODS", "accumulate_scores", "dense_to_csr", "mask_nnz", "select_mask"]
