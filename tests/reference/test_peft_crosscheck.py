"""The references equal HF PEFT's layers on identical weights (awkward shapes)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_kernels import reference as R

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self, d_in, d_out, bias=True):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_reference_equals_peft(use_rslora, bias):
    torch.manual_seed(1)
    d_in, d_out, r, alpha = 123, 77, 5, 7.0
    model = Tiny(d_in, d_out, bias).double()
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, use_rslora=use_rslora)
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight)  # PEFT inits B to zero; make the adapter matter
    x = torch.randn(3, 37, d_in, dtype=torch.float64)
    want = pm(x)
    got = R.lora(x, layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                 layer.base_layer.bias, scaling=R.lora_scaling(r, alpha, use_rslora))
    assert layer.scaling["default"] == pytest.approx(R.lora_scaling(r, alpha, use_rslora))
    torch.testing.assert_close(got, want)


def test_lily_batch_reference_equals_peft():
    torch.manual_seed(2)
    d_in, d_out, r, E, scaling = 45, 29, 6, 3, 1.7
    model = Tiny(d_in, d_out).double()
    cfg = peft.LilyConfig(r=r, scaling=scaling, stride_A=1, num_B=E, target_modules=["proj"], init_weights=False)
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model.proj
    x = torch.randn(2, 19, d_in, dtype=torch.float64)
    want = pm(x)
    lp = layer.lily_A["default"].weight                         # (r, d_in)
    router = layer.lily_router["default"].weight                # (E, r)
    # PEFT stores the E high-dim projectors as one Linear(d_out, E*r): weight (E*r, d_out) -> (E, r, d_out)
    hp = layer.lily_B["default"].weight.reshape(E, r, d_out).transpose(1, 2)  # (E, d_out, r)
    got = R.lily(x, layer.base_layer.weight, lp, router, hp, layer.base_layer.bias, scaling=scaling,
                 routing="batch", router_input="h")
    torch.testing.assert_close(got, want)
