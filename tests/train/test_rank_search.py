"""Rank search: reproducible with a seed, respects the budget, clear errors; heterogeneous ranks save/load."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_kernels.train.rank_search import adapt_with_ranks, adapter_param_count, search_ranks
from peft_kernels.train.trainer import TrainConfig

MODULES = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]


class Block(nn.Module):
    def __init__(self, d=9, h=14):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(9, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 9, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    return [(x[i], y[i]) for i in range(n)]


def collate(rows):
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def _unfreeze_head(model):
    for p in model.head.parameters():
        p.requires_grad_(True)


def _search(**kw):
    args = dict(build_model=Tiny, modules=MODULES, train_data=_data(32, 0), eval_data=_data(16, 1),
                collate_fn=collate, method="lora", choices=(1, 2, 4), n_trials=6, seed=5,
                probe_config=TrainConfig(max_steps=4, batch_size=8, lr=1e-2), prepare=_unfreeze_head)
    args.update(kw)
    return search_ranks(**args)


def test_search_is_reproducible_and_within_budget():
    budget = 4 * adapter_param_count((14, 9), "lora", 2)  # an average of r=2 per module
    a = _search(budget=budget)
    b = _search(budget=budget)
    key = lambda t: (t["group_ranks"], t["params"], t.get("value"), t["state"])  # noqa: E731
    assert [key(t) for t in a.trials] == [key(t) for t in b.trials]
    assert a.ranks == b.ranks and a.value == b.value
    assert len(a.trials) == 6
    assert a.params <= budget
    assert set(a.ranks) == set(MODULES) and set(a.group_ranks) == {"blocks.0", "blocks.1"}
    # the per-layer grouping: both modules of a block share the rank
    assert a.ranks["blocks.0.up"] == a.ranks["blocks.0.down"]
    completed = [t for t in a.trials if t["state"] == "complete"]
    assert a.value == min(t["value"] for t in completed)
    assert "Rank search" in a.table()


def test_budget_below_one_rank_per_layer_raises():
    one = sum(adapter_param_count((14, 9) if m.endswith("up") else (9, 14), "lora", 1) for m in MODULES)
    with pytest.raises(ValueError, match="below one rank per layer"):
        _search(budget=one - 1)


@pytest.mark.parametrize("kw,match", [
    (dict(modules=["blocks.0.nope"]), "unknown module name"),
    (dict(n_trials=0), "n_trials"),
    (dict(choices=(0, 2)), "choices"),
    (dict(group_by="block"), "group_by"),
    (dict(timeout=-1), "timeout"),
])
def test_bad_search_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _search(**kw)


def test_adapt_with_ranks_heterogeneous_save_load(tmp_path):
    from peft_kernels.adapters import load_adapted

    torch.manual_seed(0)
    model = Tiny()
    ranks = {"blocks.0.up": 3, "blocks.0.down": 1, "blocks.1.up": 3, "blocks.1.down": 5}
    adapted = adapt_with_ranks(model, "lora", ranks)
    mods = adapted.adapted_modules()
    assert {n: m.r for n, m in mods.items()} == ranks
    assert all(p.requires_grad for m in mods.values() for k, p in m.named_parameters() if "base_layer" not in k)
    assert not any(p.requires_grad for m in mods.values() for p in m.base_layer.parameters())
    with torch.no_grad():
        for m in mods.values():
            m.lora_B.weight.normal_()
    x = torch.randn(4, 9)
    y = adapted(x)
    adapted.save(tmp_path / "ad")
    fresh = Tiny()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                           if "lora_" not in k})
    loaded = load_adapted(fresh, tmp_path / "ad")
    assert {n: m.r for n, m in loaded.adapted_modules().items()} == ranks
    assert torch.allclose(loaded(x), y)


def test_search_on_gpt2_conv1d():
    """GPT-2's Conv1D (weight (in, out), x @ W + b): shapes read transposed, adapted like a Linear."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class ConvTiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.ModuleList(nn.ModuleDict({"c_fc": Conv1D(14, 9), "c_proj": Conv1D(9, 14)})
                                   for _ in range(2))
            self.head = nn.Linear(9, 2)

        def forward(self, x):
            for b in self.h:
                x = x + b["c_proj"](torch.tanh(b["c_fc"](x)))
            return self.head(x)

    modules = ["h.0.c_fc", "h.0.c_proj", "h.1.c_fc", "h.1.c_proj"]
    res = _search(build_model=ConvTiny, modules=modules, n_trials=2,
                  probe_config=TrainConfig(max_steps=1, batch_size=8, lr=1e-2))
    assert set(res.ranks) == set(modules)
    # LoRA on (d_in, d_out) = (9, 14) or (14, 9): r * (9 + 14) parameters either way
    assert res.params == sum(r * (9 + 14) for r in res.ranks.values())
    torch.manual_seed(0)
    model = ConvTiny()
    x = torch.randn(3, 9)
    before = model(x)
    adapted = adapt_with_ranks(model, "lora", {"h.0.c_fc": 2, "h.1.c_proj": 3})
    assert {n: m.r for n, m in adapted.adapted_modules().items()} == {"h.0.c_fc": 2, "h.1.c_proj": 3}
    assert torch.allclose(adapted(x), before)  # B = 0 at init: the same function


def test_adapt_with_ranks_adapts_exactly_the_named_modules():
    """Names are matched exactly: "0" must not also pick up "2.0" (a dotted-suffix match)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 4)))
    adapted = adapt_with_ranks(model, "lora", {"0": 2})
    assert list(adapted.adapted_modules()) == ["0"]


def test_adapt_with_ranks_keeps_fp32_adapters_on_a_bf16_model():
    """Modules rebuilt at another rank keep adapt()'s adapter dtype (fp32 on a bf16 base, HF PEFT's
    default), like the modules built at the common rank."""
    torch.manual_seed(0)
    adapted = adapt_with_ranks(Tiny().to(torch.bfloat16), "lora",
                               {"blocks.0.up": 3, "blocks.0.down": 1, "blocks.1.up": 3})
    for n, m in adapted.adapted_modules().items():
        assert m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.float32, n
        assert m.base_layer.weight.dtype == torch.bfloat16
