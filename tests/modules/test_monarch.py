"""MonarchLinear: the module protocol, MoRe's init, merge/unmerge, parameter count."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from helpers import assert_close_to_reference, grads
from peft_kernels.modules.monarch import MonarchLinear
from peft_kernels.reference.monarch import monarch, monarch_delta_weight, monarch_dims


def _module(n=123, m=77, nblocks=4, blk_r=4, dropout=0.0, bias=True, dtype=torch.float64, impl=None,
            random_w2=True):
    lin = nn.Linear(n, m, bias=bias, dtype=dtype)
    mod = MonarchLinear.from_linear(lin, nblocks=nblocks, blk_r=blk_r, dropout=dropout, impl=impl)
    if random_w2:  # the zero init would hide every W2-dependent path
        with torch.no_grad():
            mod.W2.normal_(0.0, 0.3)
    return mod


def test_from_linear_protocol():
    lin = nn.Linear(123, 77)
    mod = MonarchLinear.from_linear(lin, nblocks=8, blk_r=3, dropout=0.1)
    p, s = monarch_dims(123, 77, 8)
    assert MonarchLinear.family == "monarch"
    assert mod.base_layer is lin and mod.in_features == 123 and mod.out_features == 77
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    assert mod.W1.shape == (8, 3, p) and mod.W2.shape == (8, s, 3)
    adapter = {k for k, _ in mod.named_parameters() if not k.startswith("base_layer.")}
    assert adapter == {"W1", "W2"}
    assert all(v.requires_grad for k, v in mod.named_parameters() if k in adapter)
    assert not any(k for k, _ in mod.named_buffers() if not k.startswith("base_layer."))


def test_more_init_and_identity_at_start():
    """W1: per-block Kaiming-uniform(a=sqrt(5)) -> U(-1/sqrt(p), 1/sqrt(p)); W2 = 0 so the adapted
    layer starts equal to the frozen one."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    mod = MonarchLinear.from_linear(lin, nblocks=4, blk_r=8)
    p = mod.W1.shape[2]
    bound = 1.0 / math.sqrt(p)
    assert mod.W1.abs().max() <= bound
    for k in range(4):  # each block filled on its own, spanning its range (not constant, not zeros)
        blk = mod.W1[k]
        assert blk.max() > 0.8 * bound and blk.min() < -0.8 * bound
        assert abs(blk.std().item() - bound / math.sqrt(3)) < 0.15 * bound
    assert not torch.equal(mod.W1[0], mod.W1[1])
    assert torch.count_nonzero(mod.W2) == 0
    x = torch.randn(5, 256)
    torch.testing.assert_close(mod(x), x @ lin.weight.t() + lin.bias, rtol=0, atol=0)


def test_parameter_count():
    """N*r*(p + s) exactly, about r*(n + m) (the padding adds at most ~r*(2N + N*m/n))."""
    for n, m, N, r in [(4096, 4096, 4, 4), (4096, 11008, 4, 8), (123, 77, 8, 3), (11008, 4096, 4, 32)]:
        mod = MonarchLinear.from_linear(nn.Linear(n, m, device="meta"), nblocks=N, blk_r=r)
        p, s = monarch_dims(n, m, N)
        count = mod.num_adapter_parameters()
        assert count == N * r * (p + s) == mod.W1.numel() + mod.W2.numel()
        assert r * (n + m) <= count <= r * (n + m + 2 * N + N * m / n)
        assert f"adapter_params={count}" in repr(mod)
    # the dense equivalent holds n*m entries; the adapter ~r(n+m) for rank up to N*r
    mod = MonarchLinear.from_linear(nn.Linear(4096, 4096, device="meta"))
    assert mod.num_adapter_parameters() == 4 * (4096 + 4096)


def test_forward_matches_reference_and_delta_weight():
    """eval forward == reference == x @ (W0 + delta)^T + b, with delta the dense delta."""
    mod = _module().eval()
    x = torch.randn(2, 9, 123, dtype=torch.float64)
    w0, b = mod.base_layer.weight, mod.base_layer.bias
    y = mod(x)
    torch.testing.assert_close(y, monarch(x, w0, mod.W1, mod.W2, b))
    delta = monarch_delta_weight(mod.W1.detach(), mod.W2.detach(), 123, 77)
    torch.testing.assert_close(mod.delta_weight().double(), delta, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, x @ (w0 + delta).t() + b)


def test_merge_unmerge_round_trip():
    mod = _module(dtype=torch.float32, dropout=0.2).eval()
    x = torch.randn(13, 123)
    w_before = mod.base_layer.weight.detach().clone()
    y_adapted = mod(x)
    mod.merge()
    assert mod.merged
    torch.testing.assert_close(mod(x), mod.base_layer(x), rtol=0, atol=0)
    torch.testing.assert_close(mod(x), y_adapted, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        mod.merge()
    torch.testing.assert_close(mod(x), y_adapted, rtol=1e-5, atol=1e-5)  # merging twice is a no-op
    mod.unmerge()
    assert not mod.merged
    torch.testing.assert_close(mod.base_layer.weight, w_before, rtol=0, atol=1e-6)
    torch.testing.assert_close(mod(x), y_adapted, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="not merged"):
        mod.unmerge()


def test_merge_bf16_base_computes_in_fp32():
    mod = _module(dtype=torch.bfloat16, n=64, m=40, nblocks=2, blk_r=4)
    w = mod.base_layer.weight.detach().clone()
    mod.merge()
    want = (w.float() + mod.delta_weight()).to(torch.bfloat16)
    assert torch.equal(mod.base_layer.weight, want)


def test_to_linear_and_adapter_config():
    mod = _module(dtype=torch.float32, nblocks=8, blk_r=2, dropout=0.1).eval()
    x = torch.randn(7, 123)
    w_before = mod.base_layer.weight.detach().clone()
    lin = mod.to_linear()
    assert type(lin) is nn.Linear and lin is not mod.base_layer
    torch.testing.assert_close(lin(x), mod(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(mod.base_layer.weight, w_before) and not mod.merged
    mod.merge()
    torch.testing.assert_close(mod.to_linear().weight, mod.base_layer.weight, rtol=0, atol=0)

    cfg = json.loads(json.dumps(mod.adapter_config()))
    again = MonarchLinear.from_linear(nn.Linear(123, 77), **cfg)
    shapes = lambda mm: {k: v.shape for k, v in mm.named_parameters() if not k.startswith("base_layer.")}  # noqa: E731
    assert shapes(again) == shapes(mod)
    assert again.dropout == 0.1
    assert "nblocks=8" in repr(mod) and "blk_r=2" in repr(mod)


def test_dropout_seed_reproducible_and_eval_is_deterministic():
    mod = _module(dropout=0.5).train()
    x = torch.randn(11, 123, dtype=torch.float64)
    torch.manual_seed(3)
    y1 = mod(x)
    torch.manual_seed(3)
    y2 = mod(x)
    y3 = mod(x)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    torch.testing.assert_close(y1, monarch(x, mod.base_layer.weight, mod.W1, mod.W2, mod.base_layer.bias, 0.5, seed))
    mod.eval()
    torch.testing.assert_close(mod(x), monarch(x, mod.base_layer.weight, mod.W1, mod.W2, mod.base_layer.bias))


def test_module_triton_train_step(interpret):
    """The module on the Triton path, training mode with dropout: output and adapter grads match
    the reference run with the seed the module draws."""
    mod = _module(dtype=torch.float32, dropout=0.25, impl="triton").to(interpret).train()
    x = torch.randn(3, 7, 123, device=interpret)
    dy = torch.randn(3, 7, 77, device=interpret)
    torch.manual_seed(11)
    y = mod(x)
    gW1, gW2 = grads(y, [mod.W1, mod.W2], dy)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    ref = {}
    for dt in (torch.float32, torch.float64):
        W1 = mod.W1.detach().to(dt).requires_grad_()
        W2 = mod.W2.detach().to(dt).requires_grad_()
        yr = monarch(x.to(dt), mod.base_layer.weight.to(dt), W1, W2, mod.base_layer.bias.to(dt), 0.25, seed)
        ref[dt] = (yr, *grads(yr, [W1, W2], dy.to(dt)))
    for i, name in enumerate(("y", "dW1", "dW2")):
        got = (y, gW1, gW2)[i]
        assert_close_to_reference(name, got, ref[torch.float32][i], ref[torch.float64][i])
    assert mod.base_layer.weight.grad is None


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(nblocks=0), ValueError, "nblocks"),
    (dict(blk_r=0), ValueError, "blk_r"),
    (dict(blk_r=2.0), TypeError, "blk_r"),
    (dict(nblocks=124), ValueError, "nblocks"),
    (dict(dropout=1.0), ValueError, "dropout"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MonarchLinear.from_linear(nn.Linear(123, 77), **kwargs)
    with pytest.raises(TypeError, match="nn.Linear"):
        MonarchLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_warning_free_forward():
    mod = _module(dtype=torch.float32).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod(torch.randn(4, 123)).sum().backward()
    assert mod.W1.grad is not None and mod.W2.grad is not None
