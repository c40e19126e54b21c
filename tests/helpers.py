"""The assertion helper implementing GUIDE.md's tolerance rule (flash-attention's).

The kernel and a same-dtype torch run are both compared with an fp32/fp64 reference; the
kernel's max error must be at most ``factor`` x the torch error plus ``atol``. On failure it
prints where (index) and by how much.
"""
from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def assert_close_to_reference(name: str, got: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor,
                              factor: float = 2.0, atol: float | None = None) -> None:
    """``|got - exact|.max() <= factor * |same_dtype - exact|.max() + atol``."""
    assert got is not None, f"{name}: got None (missing gradient?)"
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(exact.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in output ({int(torch.isnan(got).sum())} elements)"
    if atol is None:
        atol = ATOL.get(got.dtype, 1e-5)
    ref = exact.double()
    err = (got.double() - ref).abs()
    base_err = (same_dtype.double() - ref).abs().max().item()
    max_err = err.max().item() if err.numel() else 0.0
    bound = factor * base_err + atol * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    if max_err > bound:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name}: max error {max_err:.3e} at index {idx} (got {got[idx].item():.6g}, "
            f"reference {exact[idx].item():.6g}) exceeds bound {bound:.3e} "
            f"= {factor} x same-dtype torch error {base_err:.3e} + atol {atol:.1e} (scaled by max |ref|)")


def grads(outputs: torch.Tensor, inputs, grad_out: torch.Tensor):
    """Gradients of ``(outputs * grad_out).sum()`` w.r.t. each input (None for those without grad)."""
    req = [t for t in inputs if t is not None and t.requires_grad]
    gs = torch.autograd.grad(outputs, req, grad_out, allow_unused=True)
    it = iter(gs)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


def leaf(t: torch.Tensor, dtype=None, requires_grad=True) -> torch.Tensor:
    """A fresh leaf copy of ``t`` (optionally cast)."""
    out = t.detach().to(dtype or t.dtype).clone()
    return out.requires_grad_(requires_grad)


def run_torchrun(cmd: list, env: dict, own_code: str, timeout: int = 240):
    """Run a ``torch.distributed.run`` command; returns the finished process when it succeeded.

    One retry, for a worker killed by a signal (gloo's background threads can abort a process at
    interpreter shutdown, "terminate called without an active exception": seen on the 2-core CI
    box in both torchrun tests); a second failure, or a Python exception raised in a file matching
    ``own_code`` (the worker's or the package's code), fails with every log."""
    import re
    import subprocess

    logs = []
    for _ in range(2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            return proc
        logs.append(f"torchrun failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        if re.search(rf'({own_code})\.py", line', proc.stderr):
            break  # a Python exception in our code: no retry
    raise AssertionError("\n\n".join(logs))
