"""Contracts every family's public op keeps, whichever implementation runs.

- The fused backwards are first-order only: ``create_graph=True`` (gradient penalties, double
  backward) raises a clear error instead of returning gradients with no graph (which silently
  gives the parameters zero second-order terms).
- Under autocast the output has the autocast dtype (as ``F.linear`` gives) on the fused path and
  on the torch fallback alike, so a layer's dtype does not depend on which implementation it got.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from peft_kernels import reference as R
from peft_kernels.modules.masks import dense_to_csr
from peft_kernels.ops.lily import lily_linear
from peft_kernels.ops.lora import lora_linear
from peft_kernels.ops.monarch import monarch_linear
from peft_kernels.ops.sparse import rosa_linear, sparse_linear

D_IN, D_OUT, T = 24, 20, 7


def _call(family: str, x: torch.Tensor, impl: str) -> torch.Tensor:
    """``family``'s op on x with fixed random parameters (A/W1/lp/values trainable)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return (torch.randn(*shape, generator=g) * 0.3).to(x.device).requires_grad_(grad)

    W = rand(D_OUT, D_IN, grad=False)
    if family == "lora":
        return lora_linear(x, W, rand(3, D_IN), rand(D_OUT, 3), scaling=2.0, impl=impl)
    if family == "monarch":
        p, s = R.monarch_dims(D_IN, D_OUT, 4)
        return monarch_linear(x, W, rand(4, 2, p), rand(4, s, 2), impl=impl)
    if family == "lily":
        return lily_linear(x, W, rand(3, D_IN), rand(2, 3), rand(2, D_OUT, 3), routing="token", impl=impl)
    crow, col = dense_to_csr(torch.rand(D_OUT, D_IN, generator=g) < 0.3)
    crow, col, val = crow.to(x.device), col.to(x.device), rand(col.numel())
    if family == "sparse":
        return sparse_linear(x, W, crow, col, val, impl=impl)
    return rosa_linear(x, W, crow, col, val, rand(2, D_IN), rand(D_OUT, 2), impl=impl, lora_impl=impl)


FAMILIES = ["lora", "monarch", "lily", "sparse", "rosa"]


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_backward_refuses_create_graph(interpret, family):
    x = torch.randn(T, D_IN, device=interpret, requires_grad=True)
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(_call(family, x, "triton").sum(), x, create_graph=True)
    # the plain first-order backward is unaffected
    (gx,) = torch.autograd.grad(_call(family, x, "triton").sum(), x)
    (want,) = torch.autograd.grad(_call(family, x, "torch").sum(), x)
    torch.testing.assert_close(gx, want, rtol=1e-4, atol=1e-4)


def test_torch_path_keeps_second_order_terms():
    """What the error message recommends: the torch path differentiates twice, A included."""
    x = torch.randn(T, D_IN, requires_grad=True)
    y = _call("lora", x, "torch")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert gx.requires_grad
    gx.square().sum().backward()


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_autocast_output_dtype_does_not_depend_on_the_implementation(interpret, family, impl):
    x = torch.randn(2, T, D_IN, device=interpret)
    with torch.autocast(interpret.type, dtype=torch.bfloat16):
        y = _call(family, x, impl)
    assert y.dtype == torch.bfloat16, f"{family} on {impl} gave {y.dtype} under bf16 autocast"
    assert y.shape == (2, T, D_OUT)


def test_rank_fallback_keeps_the_autocast_dtype(interpret):
    """A rank above the fused kernels' limit falls back to torch by default: same dtype as F.linear."""
    from peft_kernels.ops.lora import MAX_RANK

    r = MAX_RANK + 1
    x = torch.randn(3, D_IN, device=interpret)
    W, A, B = (torch.randn(*s, device=interpret) for s in [(D_OUT, D_IN), (r, D_IN), (D_OUT, r)])
    with torch.autocast(interpret.type, dtype=torch.bfloat16):
        assert lora_linear(x, W, A, B).dtype == torch.bfloat16


def test_lora_scaling_and_empty_features_are_checked():
    x, W, A, B = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    for bad in ("2", True, torch.tensor(2.0, requires_grad=True), None):
        with pytest.raises(TypeError, match="scaling must be a real number"):
            lora_linear(x, W, A, B, scaling=bad)
    with pytest.raises(ValueError, match="scaling must be finite"):
        lora_linear(x, W, A, B, scaling=float("nan"))
    with pytest.raises(ValueError, match="weight must have at least one input feature"):
        lora_linear(torch.randn(3, 0), torch.randn(5, 0), torch.randn(2, 0), B)


def test_lily_batch_routing_with_no_tokens_gives_zero_not_nan():
    """The token-mean of the router softmax over no tokens mixes nothing (the fused path's
    ``sum / max(T, 1)``): the torch path must not put 0/0 into hp's gradient."""
    x = torch.randn(0, D_IN, requires_grad=True)
    W = torch.randn(D_OUT, D_IN)
    lp, router, hp = torch.randn(3, D_IN, requires_grad=True), torch.randn(2, 3), torch.randn(2, D_OUT, 3,
                                                                                              requires_grad=True)
    y = lily_linear(x, W, lp, router, hp, routing="batch", impl="torch")
    y.sum().backward()
    assert y.shape == (0, D_OUT)
    assert torch.equal(hp.grad, torch.zeros_like(hp))


def test_first_import_under_inference_mode_still_trains():
    """Module-level tensors made at import (the shared zero seed) must not be inference tensors,
    or every later training step with seed 0 fails to save it for backward."""
    code = ("import torch\n"
            "with torch.inference_mode():\n"
            "    from peft_kernels.ops.lora import lora_linear\n"
            "x = torch.randn(3, 4, requires_grad=True)\n"
            "A = torch.randn(2, 4, requires_grad=True)\n"
            "lora_linear(x, torch.randn(5, 4), A, torch.randn(5, 2), impl='torch').sum().backward()\n"
            "import os\n"
            "if os.environ.get('TRITON_INTERPRET') == '1':\n"
            "    lora_linear(x, torch.randn(5, 4), A, torch.randn(5, 2), impl='triton').sum().backward()\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
