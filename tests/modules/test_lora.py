"""LoRALinear: the module protocol, PEFT parity on identical weights, merge, train/eval."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from helpers import assert_close_to_reference
from peft_kernels import reference as R
from peft_kernels.modules.lora import LoRALinear

D_IN, D_OUT = 123, 77


class Tiny(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.proj = nn.Linear(D_IN, D_OUT, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _randomise_B(m: LoRALinear):
    with torch.no_grad():
        m.lora_B.weight.normal_()  # B starts at zero; make the adapter matter


def test_init_keys_and_freezing():
    lin = nn.Linear(D_IN, D_OUT)
    m = LoRALinear.from_linear(lin, r=6, alpha=12.0)
    assert m.base_layer is lin and m.family == "lora"
    assert set(m.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"}
    assert m.lora_A.weight.shape == (6, D_IN) and m.lora_B.weight.shape == (D_OUT, 6)
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    assert m.lora_A.weight.requires_grad and m.lora_B.weight.requires_grad
    assert (m.lora_B.weight == 0).all()
    bound = 1 / math.sqrt(D_IN)  # kaiming_uniform(a=sqrt(5)) bound
    assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.std() > bound / 3
    assert m.scaling == 2.0 and (m.r, m.alpha, m.dropout, m.use_rslora) == (6, 12.0, 0.0, False)
    assert LoRALinear.from_linear(nn.Linear(4, 4), r=4, alpha=8.0, use_rslora=True).scaling == 4.0
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(m(x), lin(x))  # a fresh adapter changes nothing
    assert "r=6" in repr(m)
    with pytest.raises(ValueError, match="r"):
        LoRALinear.from_linear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear.from_linear(nn.Linear(4, 4), dropout=1.5)
    with pytest.raises(TypeError, match="linear"):
        LoRALinear.from_linear(nn.Conv1d(4, 4, 1))


def test_adapter_config_rebuilds_same_shapes():
    m = LoRALinear.from_linear(nn.Linear(D_IN, D_OUT), r=3, alpha=5.0, dropout=0.1, use_rslora=True)
    cfg = json.loads(json.dumps(m.adapter_config()))
    m2 = LoRALinear.from_linear(nn.Linear(D_IN, D_OUT), **cfg)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in m2.state_dict().items()}
    assert m2.scaling == m.scaling and m2.dropout == m.dropout


@pytest.mark.parametrize("use_rslora,bias", [(False, True), (True, False)])
def test_equals_hf_peft_lora_layer(interpret, use_rslora, bias):
    """Same weights -> same output and same adapter gradients as PEFT's LoRA layer (dropout 0)."""
    peft = pytest.importorskip("peft")
    r, alpha = 5, 7.0
    model = Tiny(bias)
    ours = LoRALinear.from_linear(copy.deepcopy(model.proj), r=r, alpha=alpha, use_rslora=use_rslora, impl="triton")
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, use_rslora=use_rslora)
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight)
    # PEFT's adapter keys map 1:1 onto ours
    peft_sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    mapped = {k.replace("base_model.model.proj.", "").replace(".default", ""): v for k, v in peft_sd.items()}
    assert set(mapped) == {"lora_A.weight", "lora_B.weight"}
    ours.load_state_dict(mapped, strict=False)
    assert ours.scaling == pytest.approx(layer.scaling["default"])

    ours, pm = ours.to(interpret), pm.to(interpret)
    x = torch.randn(3, 13, D_IN, device=interpret)
    go = torch.randn(3, 13, D_OUT, device=interpret)
    want = pm(x)
    got = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gw = torch.autograd.grad(want, [layer.lora_A["default"].weight, layer.lora_B["default"].weight], go)
    gg = torch.autograd.grad(got, [ours.lora_A.weight, ours.lora_B.weight], go)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_merge_unmerge_round_trip(interpret):
    lin = nn.Linear(D_IN, D_OUT).to(interpret)
    w0 = lin.weight.detach().clone()
    m = LoRALinear.from_linear(lin, r=4, alpha=8.0, impl="triton")
    _randomise_B(m)
    x = torch.randn(2, 19, D_IN, device=interpret)
    with torch.no_grad():
        y = m(x)
        m.merge()
        assert m.merged
        y_merged = m(x)
        torch.testing.assert_close(y_merged, m.base_layer(x))
        exact = R.lora(x.double(), w0.double(), m.lora_A.weight.double(), m.lora_B.weight.double(),
                       lin.bias.double(), m.scaling)
        assert_close_to_reference("merged", y_merged, y, exact)
        with pytest.warns(UserWarning, match="already merged"):
            m.merge()  # no-op
        torch.testing.assert_close(m(x), y_merged)
        plain = m.to_linear()
        assert type(plain) is nn.Linear
        torch.testing.assert_close(plain(x), y_merged)
        m.unmerge()
        assert not m.merged
        torch.testing.assert_close(m.base_layer.weight, w0, rtol=0, atol=1e-6)
        torch.testing.assert_close(m(x), y)
        with pytest.warns(UserWarning, match="not merged"):
            m.unmerge()
        torch.testing.assert_close(m.to_linear()(x), y_merged, rtol=1e-5, atol=1e-5)  # unmerged -> merged copy


def _merge_family(name: str):
    # imported here: the merge protocol under test lives in _AdapterLinear, shared by all of them
    from peft_kernels.modules.adalora import AdaLoRALinear
    from peft_kernels.modules.monarch import MonarchLinear
    from peft_kernels.modules.sparse import SparseLinear

    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    make = {"lora": lambda: LoRALinear.from_linear(lin, r=2, impl="torch"),
            "adalora": lambda: AdaLoRALinear.from_linear(lin, r=3, impl="torch"),
            "sparse": lambda: SparseLinear.from_linear(lin, density=0.2, lora_r=2, impl="torch"),
            "monarch": lambda: MonarchLinear.from_linear(lin, nblocks=2, blk_r=2)}[name]
    m = make()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_()
    return m


@pytest.mark.parametrize("family", ["lora", "adalora", "sparse", "monarch"])
def test_load_state_dict_respects_the_merge_state(family):
    """A state dict records (in its metadata) whether its base weight holds the adapter's change.
    Merged -> merged and unmerged -> unmerged load exactly; across they would count the change
    twice or never (and unmerge() would drift the base weight), so they are refused before any
    copy. Without metadata, adapter tensors arriving alone into a merged module are refused."""
    m = _merge_family(family)
    w0 = m.base_layer.weight.detach().clone()
    x = torch.randn(5, m.in_features)
    unmerged_sd = m.state_dict()  # a state dict holds its tensors: clone them, keep the metadata
    for k, v in unmerged_sd.items():
        unmerged_sd[k] = v.clone()
    y = m(x)
    m.merge()
    merged_sd = m.state_dict()
    twin = _merge_family(family)
    with torch.no_grad():  # another adapter: the load must replace it, base weight included
        for p in twin.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    twin.merge()
    twin.load_state_dict(merged_sd)  # merged -> merged: exact, and unmerges to the same weight
    torch.testing.assert_close(twin(x), y, rtol=1e-5, atol=1e-5)
    twin.unmerge()
    torch.testing.assert_close(twin.base_layer.weight, w0, rtol=0, atol=1e-5)
    fresh = _merge_family(family)  # unmerged
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"saved from a merged .*into this unmerged one.* twice.*call merge\(\)"):
        fresh.load_state_dict(merged_sd)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(RuntimeError, match=r"saved from an unmerged .*into this merged one.*call unmerge\(\)"):
        m.load_state_dict(unmerged_sd)
    other = {k: torch.randn_like(v) if v.is_floating_point() else v.clone()
             for k, v in unmerged_sd.items() if not k.startswith("base_layer.")}  # plain dict: no metadata
    with pytest.raises(RuntimeError, match=r"merged .*unmerge\(\) first"):
        m.load_state_dict(other, strict=False)
    m.unmerge()
    torch.testing.assert_close(m.base_layer.weight, w0, rtol=0, atol=1e-5)
    m.load_state_dict(other, strict=False)  # unmerged: loads
    assert all(torch.equal(v, other[k]) for k, v in m.state_dict().items() if k in other)


def test_train_eval_dropout_switch(interpret):
    m = LoRALinear.from_linear(nn.Linear(D_IN, D_OUT), r=4, alpha=8.0, dropout=0.5, impl="triton").to(interpret)
    _randomise_B(m)
    x = torch.randn(37, D_IN, device=interpret)
    with torch.no_grad():
        m.eval()
        y_eval = m(x)
        want = R.lora(x, m.base_layer.weight, m.lora_A.weight, m.lora_B.weight, m.base_layer.bias, m.scaling)
        torch.testing.assert_close(y_eval, want)
        m.train()
        torch.manual_seed(5)
        y1 = m(x)
        torch.manual_seed(5)
        y1b = m(x)
        y2 = m(x)
    torch.testing.assert_close(y1, y1b)  # the seed comes from torch's generator
    assert not torch.allclose(y1, y2)
    assert not torch.allclose(y1, y_eval)
    # the training-mode output is the reference's with the seed the module drew
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    want = R.lora(x, m.base_layer.weight, m.lora_A.weight, m.lora_B.weight, m.base_layer.bias, m.scaling, 0.5, seed)
    torch.testing.assert_close(y1, want)


def test_trains_only_adapter(interpret):
    m = LoRALinear.from_linear(nn.Linear(D_IN, D_OUT), r=2, impl="triton").to(interpret)
    x = torch.randn(37, D_IN, device=interpret)
    m(x).square().mean().backward()
    assert m.base_layer.weight.grad is None and m.base_layer.bias.grad is None
    assert m.lora_B.weight.grad is not None and m.lora_B.weight.grad.abs().sum() > 0
    assert m.lora_A.weight.grad is not None and (m.lora_A.weight.grad == 0).all()  # B is still zero
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of ``x`` in its own dtype (normal numbers)."""
    _, exp = torch.frexp(x.float().abs().clamp_min(torch.finfo(x.dtype).tiny))
    return torch.finfo(x.dtype).eps * torch.pow(2.0, (exp - 1).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_keep_original_restores_half_precision_exactly(dtype):
    """Without a kept original each merge/unmerge cycle may move a bf16/fp16 weight by up to one
    ulp of the merged value (the documented bound); with keep_original=True unmerge is bit-exact."""
    m = LoRALinear.from_linear(nn.Linear(D_IN, D_OUT, dtype=dtype), r=4, alpha=8.0)
    _randomise_B(m)
    w0 = m.base_layer.weight.detach().clone()

    m.merge()
    merged = m.base_layer.weight.detach().clone()
    m.unmerge()
    drift = (m.base_layer.weight.float() - w0.float()).abs()
    assert drift.max() > 0, "the test needs a delta that does not round-trip in this dtype"
    assert (drift <= _ulp(merged)).all()

    with torch.no_grad():
        m.base_layer.weight.copy_(w0)
    for _ in range(3):
        m.merge(keep_original=True)
        assert m.keeps_original
        assert "_original_weight" not in m.state_dict()  # a runtime copy, never saved
        torch.testing.assert_close(m.base_layer.weight, merged, rtol=0, atol=0)
        m.unmerge()
        assert not m.keeps_original and m._original_weight is None  # the copy is released
        assert torch.equal(m.base_layer.weight, w0)
    with pytest.raises(TypeError, match="keep_original must be a bool"):
        m.merge(keep_original="yes")
    assert not m.merged


def test_to_linear_keeps_the_base_layer_frozen():
    m = LoRALinear.from_linear(nn.Linear(D_IN, D_OUT), r=4)
    for merged in (False, True):
        if merged:
            m.merge()
        lin = m.to_linear()
        assert not lin.weight.requires_grad and not lin.bias.requires_grad
