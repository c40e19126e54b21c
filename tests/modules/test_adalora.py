"""AdaLoRALinear: the SVD-form adapter on the LoRA kernel, rank masks (down to rank 0), merge."""
from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from torch import nn

from helpers import assert_close_to_reference
from peft_kernels import reference as R
from peft_kernels.modules.adalora import AdaLoRALinear

D_IN, D_OUT = 123, 77


def _module(r=6, alpha=9.0, impl="triton", device="cpu", bias=True):
    m = AdaLoRALinear.from_linear(nn.Linear(D_IN, D_OUT, bias=bias), r=r, alpha=alpha, impl=impl).to(device)
    with torch.no_grad():
        m.lora_E.normal_()  # E starts at zero; make the adapter matter
    return m


def test_init_keys_and_config():
    m = AdaLoRALinear.from_linear(nn.Linear(D_IN, D_OUT), r=12, alpha=8.0)
    assert m.family == "adalora"
    assert set(m.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_A", "lora_E", "lora_B", "rank_mask"}
    assert m.lora_A.shape == (12, D_IN) and m.lora_E.shape == (12,) and m.lora_B.shape == (D_OUT, 12)
    assert (m.lora_E == 0).all() and (m.rank_mask == 1).all() and m.ranknum == 12
    assert 0.015 < m.lora_A.std().item() < 0.025 and 0.015 < m.lora_B.std().item() < 0.025
    assert m.scaling == 8.0 / 12
    assert not m.base_layer.weight.requires_grad
    cfg = json.loads(json.dumps(m.adapter_config()))
    m2 = AdaLoRALinear.from_linear(nn.Linear(D_IN, D_OUT), **cfg)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in m2.state_dict().items()}
    with pytest.raises(ValueError, match="mask"):
        m.set_rank_mask(torch.ones(5))


def test_forward_and_grads_match_reference(interpret):
    m = _module(device=interpret)
    mask = torch.tensor([1, 0, 1, 1, 0, 1.0])
    m.set_rank_mask(mask)
    assert m.ranknum == 4
    x = torch.randn(3, 13, D_IN, device=interpret)
    go = torch.randn(3, 13, D_OUT, device=interpret)
    y = m(x)
    g = torch.autograd.grad(y, [m.lora_A, m.lora_E, m.lora_B], go)

    def ref(dtype):
        ps = [m.lora_A.detach().to(dtype).requires_grad_(), m.lora_E.detach().to(dtype).requires_grad_(),
              m.lora_B.detach().to(dtype).requires_grad_()]
        out = R.adalora(x.cpu().to(dtype), m.base_layer.weight.cpu().to(dtype), ps[0].cpu(), ps[1].cpu(), ps[2].cpu(),
                        m.base_layer.bias.cpu().to(dtype), m.scaling, rank_mask=mask)
        return out, torch.autograd.grad(out, ps, go.cpu().to(dtype))

    y_exact, g_exact = ref(torch.float64)
    y_same, g_same = ref(torch.float32)
    assert_close_to_reference("y", y.cpu(), y_same, y_exact)
    for name, got, same, exact in zip(["dA", "dE", "dB"], g, g_same, g_exact):
        assert_close_to_reference(name, got.cpu(), same, exact)
    assert (g[1].cpu()[mask == 0] == 0).all()  # masked triplets get no E gradient


def test_equals_hf_peft_adalora_layer():
    """Same weights -> same output as PEFT's AdaLoRA layer (PEFT scales by alpha/(r + 1e-5))."""
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(D_IN, D_OUT)

        def forward(self, x):
            return self.proj(x)

    model = Tiny().double()
    ours = AdaLoRALinear.from_linear(copy.deepcopy(model.proj), r=6, alpha=9.0, impl="torch")
    cfg = peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=9, target_modules=["proj"], total_step=100)
    layer = peft.get_peft_model(model, cfg).base_model.model.proj
    with torch.no_grad():
        layer.lora_E["default"].normal_()
        ours.lora_A.copy_(layer.lora_A["default"])
        ours.lora_E.copy_(layer.lora_E["default"][:, 0])
        ours.lora_B.copy_(layer.lora_B["default"])
        x = torch.randn(37, D_IN, dtype=torch.float64)
        torch.testing.assert_close(ours(x), layer(x), rtol=1e-5, atol=1e-5)


def test_rank_zero_forward_save_load_merge(interpret):
    m = _module(device=interpret)
    m.set_rank_mask(torch.zeros(6, dtype=torch.bool))
    assert m.ranknum == 0
    x = torch.randn(37, D_IN, device=interpret)
    y = m(x)
    torch.testing.assert_close(y, m.base_layer(x))
    gA, gE, gB = torch.autograd.grad(y.sum(), [m.lora_A, m.lora_E, m.lora_B])
    assert (gA == 0).all() and (gE == 0).all() and (gB == 0).all()

    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = AdaLoRALinear.from_linear(nn.Linear(D_IN, D_OUT), r=6, alpha=9.0, impl="triton").to(interpret)
    m2.load_state_dict(torch.load(buf))
    assert m2.ranknum == 0
    torch.testing.assert_close(m2(x), y)
    w = m2.base_layer.weight.detach().clone()
    m2.merge()
    torch.testing.assert_close(m2.base_layer.weight, w)
    m2.unmerge()


def test_merge_round_trip_and_mask_change_while_merged(interpret):
    m = _module(device=interpret)
    w0 = m.base_layer.weight.detach().clone()
    m.set_rank_mask(torch.tensor([1, 1, 0, 1, 1, 1]))
    x = torch.randn(2, 19, D_IN, device=interpret)
    with torch.no_grad():
        y = m(x)
        m.merge()
        y_merged = m(x)
        torch.testing.assert_close(y_merged, m.base_layer(x))
        exact = R.adalora(x.double(), w0.double(), m.lora_A.double(), m.lora_E.double(), m.lora_B.double(),
                          m.base_layer.bias.double(), m.scaling, rank_mask=m.rank_mask)
        assert_close_to_reference("merged", y_merged, y, exact)
        torch.testing.assert_close(m.to_linear()(x), y_merged)
        # pruning a rank while merged keeps the merged weight consistent with the new mask
        m.set_rank_mask(torch.tensor([1, 1, 0, 0, 1, 1]))
        assert m.merged
        y_pruned_merged = m(x)
        m.unmerge()
        torch.testing.assert_close(m.base_layer.weight, w0, rtol=0, atol=1e-6)
        torch.testing.assert_close(m(x), y_pruned_merged, rtol=1e-5, atol=1e-5)


def test_mask_change_while_merged_keeps_the_original():
    """A kept original survives the internal unmerge/merge of a rank-mask change (bf16: the
    weight would otherwise not round-trip exactly)."""
    m = AdaLoRALinear.from_linear(nn.Linear(D_IN, D_OUT, dtype=torch.bfloat16), r=6, alpha=9.0)
    with torch.no_grad():
        m.lora_E.normal_()
    w0 = m.base_layer.weight.detach().clone()
    m.merge(keep_original=True)
    m.set_rank_mask(torch.tensor([1, 0, 1, 0, 1, 1]))  # unmerges and merges again internally
    assert m.merged and m.keeps_original
    m.unmerge()
    assert torch.equal(m.base_layer.weight, w0)
