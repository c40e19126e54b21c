"""LilyLinear / MoELoRALinear / build_lily: PEFT equality, shared-HP gradients, stride sharing, merge refusal."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import assert_close_to_reference, leaf
from peft_kernels import reference as R
from peft_kernels.modules.lily import LilyLinear, MergeNotSupportedError, MoELoRALinear, build_lily

D_IN, D_OUT = 45, 29


class Blocks(nn.Module):
    """Two blocks with a same-shape ``proj`` each (one Lily group) plus a differently-named ``out``."""

    def __init__(self, n=2, d=D_IN):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(d, d)}) for _ in range(n))
        self.out = nn.Linear(d, D_OUT)

    def forward(self, x):
        for blk in self.layers:
            x = torch.tanh(blk["proj"](x))
        return self.out(x)


def _swap_in(model: nn.Module, new: dict) -> nn.Module:
    for name, mod in new.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.ModuleDict):
            parent[child] = mod
        else:
            setattr(parent, child, mod)
    return model


def _linears(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_lily_batch_equals_peft_with_shared_projectors(interpret):
    """HF PEFT's lily (stride_A=2, num_B=3) and build_lily(routing="batch") on the same weights agree."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    r, E, scaling = 5, 3, 1.7
    model = Blocks(n=2)
    ours = copy.deepcopy(model)
    cfg = peft.LilyConfig(r=r, scaling=scaling, stride_A=2, num_B=E, target_modules=["proj"], init_weights=False)
    pm = peft.get_peft_model(model, cfg)
    x = torch.randn(2, 11, D_IN)
    want = pm(x)

    targets = {n: m for n, m in _linears(ours).items() if n.endswith("proj")}
    built = build_lily(targets, r=r, num_experts=E, stride=2, scaling=scaling, routing="batch", impl="triton")
    _swap_in(ours, built)
    assert built["layers.0.proj"].lp is built["layers.1.proj"].lp
    assert built["layers.0.proj"].hp is built["layers.1.proj"].hp
    with torch.no_grad():
        for i in range(2):
            layer = pm.base_model.model.layers[i]["proj"]
            mine = built[f"layers.{i}.proj"]
            mine.router.copy_(layer.lily_router["default"].weight)
            # PEFT: lily_B = Linear(d_out, E*r), weight (E*r, d_out) -> (E, r, d_out) -> ours (E, d_out, r)
            mine.hp.copy_(layer.lily_B["default"].weight.reshape(E, r, D_IN).transpose(1, 2))
            mine.lp.copy_(layer.lily_A["default"].weight)
    got = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_shared_hp_gradient_accumulates_over_layers(interpret):
    """One hp Parameter serves both layers; its gradient is the sum of the per-layer gradients."""
    torch.manual_seed(4)
    r, E, scaling = 4, 3, 1.3
    model = Blocks(n=2)
    built = build_lily({n: m for n, m in _linears(model).items() if n.endswith("proj")}, r=r, num_experts=E,
                       scaling=scaling, routing="token", impl="triton")
    _swap_in(model, built)
    l0, l1 = built["layers.0.proj"], built["layers.1.proj"]
    assert l0.hp is l1.hp and l0.lp is not l1.lp
    with torch.no_grad():
        l0.hp.normal_()  # the zero init would hide the router/LP paths
    n_hp = sum(1 for p in model.parameters() if p is l0.hp)
    assert n_hp == 1, "model.parameters() must list the shared hp once"

    x = torch.randn(3, 7, D_IN)
    g = torch.randn(3, 7, D_OUT)
    (model(x) * g).sum().backward()

    # same network through the fp64 reference with a separate hp leaf per layer
    hp_a, hp_b = leaf(l0.hp, torch.float64), leaf(l1.hp, torch.float64)
    h = x.double()
    for lay, hp in ((l0, hp_a), (l1, hp_b)):
        b = lay.base_layer
        h = torch.tanh(R.lily(h, b.weight.double(), lay.lp.double(), lay.router.double(), hp, b.bias.double(),
                              scaling=scaling, routing="token"))
    out = model.out(h.float()).double()  # the plain head in fp32 as in the model
    (out * g.double()).sum().backward()
    want = hp_a.grad + hp_b.grad
    assert hp_a.grad.abs().max() > 0 and hp_b.grad.abs().max() > 0
    torch.testing.assert_close(l0.hp.grad.double(), want, rtol=1e-4, atol=1e-5)
    assert l0.base_layer.weight.grad is None, "the base layer must stay frozen"


def test_build_lily_groups_and_stride():
    """Groups by (last name component, shape); lp shared by `stride` consecutive layers; order kept."""
    m = nn.ModuleDict({
        "a": nn.ModuleDict({"q": nn.Linear(8, 8), "v": nn.Linear(8, 8)}),
        "b": nn.ModuleDict({"q": nn.Linear(8, 8), "v": nn.Linear(8, 6)}),
        "c": nn.ModuleDict({"q": nn.Linear(8, 8)}),
    })
    named = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    out = build_lily(named, r=3, num_experts=2, stride=2)
    assert list(out) == list(named)
    assert out["a.q"].hp is out["b.q"].hp is out["c.q"].hp
    assert out["a.q"].lp is out["b.q"].lp and out["c.q"].lp is not out["a.q"].lp
    assert out["a.v"].hp is not out["b.v"].hp                    # same name, different shape: two groups
    assert out["a.v"].hp is not out["a.q"].hp                    # different name: two groups
    assert len({id(l.router) for l in out.values()}) == len(out)  # routers stay per layer
    assert out["b.v"].hp.shape == (2, 6, 3) and torch.count_nonzero(out["b.v"].hp) == 0
    assert all(o.routing == "batch" and o.family == "lily" for o in out.values())


def test_lily_linear_protocol_and_merge_refusal():
    lin = nn.Linear(D_IN, D_OUT)
    mod = LilyLinear.from_linear(lin, r=4, num_experts=3, scaling=2.0)
    assert mod.base_layer is lin and not lin.weight.requires_grad and not lin.bias.requires_grad
    assert (mod.in_features, mod.out_features) == (D_IN, D_OUT)
    assert mod.lp.shape == (4, D_IN) and mod.router.shape == (3, 4) and mod.hp.shape == (3, D_OUT, 4)
    x = torch.randn(2, 5, D_IN)
    torch.testing.assert_close(mod(x), lin(x))  # hp starts at zero: the adapter starts as no change
    own = {n for n, _ in mod.named_parameters() if not n.startswith("base_layer.")}
    assert own == {"lp", "router", "hp"}
    rebuilt = LilyLinear.from_linear(nn.Linear(D_IN, D_OUT), **mod.adapter_config())
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in mod.named_parameters()}
    assert "routing='batch'" in repr(mod)

    before = lin.weight.detach().clone()
    with pytest.raises(MergeNotSupportedError, match="batch"):
        mod.merge()
    with pytest.raises(MergeNotSupportedError, match="merged"):
        mod.to_linear()
    tok = LilyLinear.from_linear(nn.Linear(D_IN, D_OUT), routing="token")
    with pytest.raises(MergeNotSupportedError, match="per-token"):
        tok.merge()
    assert not mod.merged and torch.equal(lin.weight, before)
    with pytest.warns(UserWarning):
        mod.unmerge()


def test_lily_linear_bad_arguments():
    lin = nn.Linear(D_IN, D_OUT)
    with pytest.raises(TypeError, match="linear"):
        LilyLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="r"):
        LilyLinear.from_linear(lin, r=0)
    with pytest.raises(ValueError, match="routing"):
        LilyLinear.from_linear(lin, routing="layer")
    with pytest.raises(ValueError, match="lp"):
        LilyLinear.from_linear(lin, r=4, lp=nn.Parameter(torch.randn(4, D_IN + 1)))
    with pytest.raises(TypeError, match="hp"):
        LilyLinear.from_linear(lin, r=4, num_experts=2, hp=torch.zeros(2, D_OUT, 4))
    with pytest.raises(ValueError, match="stride"):
        build_lily({"a.q": lin}, stride=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moelora_matches_reference(interpret, dtype):
    """Router on x, per-token routing, scaling alpha/r; gradients to lora_A, router, lora_B and x."""
    torch.manual_seed(5)
    r, E, alpha = 4, 3, 8.0
    lin = nn.Linear(D_IN, D_OUT).to(dtype)
    mod = MoELoRALinear.from_linear(lin, r=r, num_experts=E, alpha=alpha, impl="triton")
    assert mod.family == "moelora" and mod.scaling == alpha / r
    assert mod.lora_A.shape == (r, D_IN) and mod.router.shape == (E, D_IN) and mod.lora_B.shape == (E, D_OUT, r)
    assert torch.count_nonzero(mod.lora_B) == 0
    with torch.no_grad():
        mod.lora_B.normal_()
    x = torch.randn(2, 9, D_IN, dtype=torch.float64)
    dy = torch.randn(2, 9, D_OUT, dtype=torch.float64)
    params = [mod.lora_A, mod.router, mod.lora_B]

    def ref(dt):
        ins = [leaf(x, dt)] + [leaf(p, dt) for p in params]
        out = R.lily(ins[0], lin.weight.to(dt), ins[1], ins[2], ins[3], lin.bias.to(dt), scaling=alpha / r,
                     routing="token", router_input="x")
        return [out, *torch.autograd.grad(out, ins, dy.to(dt))]

    xi = leaf(x, dtype)
    out = mod(xi)
    got = [out, *torch.autograd.grad(out, [xi, *params], dy.to(dtype))]
    for name, g, s, e in zip(["out", "dx", "dA", "drouter", "dB"], got, ref(dtype), ref(torch.float64)):
        assert_close_to_reference(name, g, s, e)
    rebuilt = MoELoRALinear.from_linear(nn.Linear(D_IN, D_OUT), **mod.adapter_config())
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in mod.parameters()]
    with pytest.raises(MergeNotSupportedError, match="per-token"):
        mod.merge()
