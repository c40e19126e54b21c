"""FLoE Fisher scores vs a direct computation; deterministic selection; clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_kernels.train.fisher import FisherReport, calibrate, empirical_fisher, floe_adapt, layer_of


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Tiny(nn.Module):
    """A 4-block residual MLP classifier: names ``blocks.<i>.up/down`` like a transformer's."""

    def __init__(self, d=13, h=19, n=4, classes=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _batches(n=5, bs=7, d=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, d, generator=g), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("method,options", [("lora", dict(r=3)), ("moelora", dict(r=2, num_experts=3))])
def test_fisher_equals_direct_computation(method, options):
    from peft_kernels.adapters import adapt

    torch.manual_seed(0)
    model = Tiny()
    adapted = adapt(model, method=method, target_modules=["up", "down"], **options)
    mods = adapted.adapted_modules()
    # make every adapter parameter receive gradient (B starts at zero)
    with torch.no_grad():
        for m in mods.values():
            for n, p in m.named_parameters():
                if not n.startswith("base_layer."):
                    p.normal_(0, 0.3)
    batches = _batches()
    rep_mod = empirical_fisher(model, mods, batches, granularity="module")
    rep_lay = empirical_fisher(model, mods, batches, granularity="layer")

    # direct: per *sample*, the gradient of its cross-entropy w.r.t. each module's adapter params;
    # F = mean over samples of the squared gradient (the diagonal empirical Fisher)
    sq = {n: 0.0 for n in mods}
    cnt = {n: sum(p.numel() for k, p in m.named_parameters() if not k.startswith("base_layer.")) for n, m in mods.items()}
    n_samples = 0
    for xb, yb in batches:
        for x, y in zip(xb, yb):
            loss = nn.functional.cross_entropy(model(x[None]), y[None])
            for n, m in mods.items():
                ps = [p for k, p in m.named_parameters() if not k.startswith("base_layer.")]
                gs = torch.autograd.grad(loss, ps, retain_graph=True)
                sq[n] += sum(float((g.double() ** 2).sum()) for g in gs)
            n_samples += 1
    assert rep_mod.num_samples == n_samples and rep_mod.num_batches == len(batches)
    for n in mods:
        assert rep_mod.scores[n] == pytest.approx(sq[n] / (n_samples * cnt[n]), rel=1e-9)
        assert rep_mod.num_params[n] == cnt[n]
    for i in range(4):
        names = [f"blocks.{i}.up", f"blocks.{i}.down"]
        want = sum(sq[n] for n in names) / (n_samples * sum(cnt[n] for n in names))
        assert rep_lay.scores[f"blocks.{i}"] == pytest.approx(want, rel=1e-9)
    assert list(rep_lay.scores) == [f"blocks.{i}" for i in range(4)]
    assert all(rep_lay.scores[k] > 0 for k in rep_lay.scores)


def test_calibrate_is_reproducible_and_leaves_model_untouched():
    torch.manual_seed(0)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reps = [calibrate(model, _batches(), ["up", "down"], method="moelora", num_batches=4, r=2, num_experts=2,
                      seed=3) for _ in range(2)]
    assert reps[0].scores == reps[1].scores
    assert reps[0].num_batches == 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(isinstance(m, (nn.Linear, nn.ModuleList, Block, Tiny, nn.Module)) for m in model.modules())
    assert not any(hasattr(m, "base_layer") for m in model.modules())  # the copy was adapted, not the model
    lora = calibrate(model, _batches(), ["up", "down"], method="lora", num_batches=2, r=2, warmup_steps=1)
    assert len(lora) == 4 and lora.num_batches == 2


def test_select_deterministic_ties_and_table():
    rep = FisherReport({"l.0": 1.0, "l.1": 3.0, "l.2": 3.0, "l.3": 0.5, "l.4": 2.0, "l.5": 3.0, "l.6": 0.1, "l.7": 1.0},
                       {f"l.{i}": 10 for i in range(8)}, {f"l.{i}": [f"l.{i}.q"] for i in range(8)}, 4)
    assert rep.select(fraction=0.25) == ["l.1", "l.2"]  # ceil(0.25*8)=2; tie 3.0 x3 -> model order
    assert rep.select(k=3) == ["l.1", "l.2", "l.5"]
    assert rep.select(k=4) == ["l.1", "l.2", "l.4", "l.5"]  # returned in model order
    assert rep.select(fraction=1.0) == [f"l.{i}" for i in range(8)]
    assert rep.select(fraction=0.1) == ["l.1"]  # at least one
    assert rep.select(k=1, among=["l.0", "l.7"]) == ["l.0"]
    assert [n for n, _ in rep.ranked()][:3] == ["l.1", "l.2", "l.5"]
    table = rep.table(rep.select(k=2))
    assert "l.1" in table and table.count("*") == 2 and "rank" in table


@pytest.mark.parametrize("kwargs,match", [
    (dict(fraction=0.0), r"fraction must be in \(0, 1\]"),
    (dict(fraction=1.5), r"fraction must be in \(0, 1\]"),
    (dict(fraction=-0.2), r"fraction must be in \(0, 1\]"),
    (dict(k=0), r"k must be an int in \[1, 3\]"),
    (dict(k=4), r"k must be an int in \[1, 3\]"),
    (dict(), "exactly one"),
    (dict(fraction=0.5, k=1), "exactly one"),
    (dict(k=1, among=["l.9"]), "unknown layer name"),
])
def test_select_bad_arguments(kwargs, match):
    rep = FisherReport({"l.0": 1.0, "l.1": 2.0, "l.2": 3.0}, {f"l.{i}": 1 for i in range(3)},
                       {f"l.{i}": [] for i in range(3)}, 1)
    with pytest.raises(ValueError, match=match):
        rep.select(**kwargs)


def test_floe_places_experts_on_selected_layers_only():
    torch.manual_seed(0)
    model = Tiny()
    rep = calibrate(model, _batches(), ["up", "down"], method="moelora", num_batches=3, r=2, num_experts=2)
    chosen = rep.select(fraction=0.5)
    assert len(chosen) == 2
    adapted = floe_adapt(model, chosen, ["up", "down"], r=2, num_experts=2)
    names = sorted(adapted.adapted_modules())
    assert names == sorted(f"{c}.{t}" for c in chosen for t in ("up", "down"))
    assert {layer_of(n) for n in names} == set(chosen)
    with pytest.raises(ValueError, match="unknown layer name"):
        floe_adapt(Tiny(), ["blocks.9"], ["up"])


def test_layer_of():
    assert layer_of("bert.encoder.layer.3.attention.self.query") == "bert.encoder.layer.3"
    assert layer_of("model.layers.12.mlp.up_proj") == "model.layers.12"
    assert layer_of("head") == "head"


def test_floe_module_granularity():
    torch.manual_seed(0)
    model = Tiny()
    rep = calibrate(model, _batches(), ["up", "down"], method="lora", num_batches=2, granularity="module", r=2)
    assert len(rep) == 8
    chosen = rep.select(k=3)
    adapted = floe_adapt(model, chosen, ["up", "down"], method="lora", r=2)
    assert sorted(adapted.adapted_modules()) == sorted(chosen)


def _adapted_tiny(seed=0):
    from peft_kernels.adapters import adapt

    torch.manual_seed(seed)
    model = Tiny()
    adapted = adapt(model, method="lora", target_modules=["up", "down"], r=3)
    with torch.no_grad():  # every adapter parameter gets gradient (B starts at zero)
        for m in adapted.adapted_modules().values():
            m.lora_B.weight.normal_(0, 0.3)
    return model, adapted.adapted_modules()


def test_fisher_does_not_depend_on_batch_size():
    """The same 12 samples as 12 batches of 1, 4 of 3 and 1 of 12 give the same per-sample Fisher,
    bit for bit: each sample's gradient is computed alone, and the squares are summed in the same
    (sample) order whatever the batching."""
    model, mods = _adapted_tiny()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 13, generator=g), torch.randint(0, 3, (12,), generator=g)
    reps = {bs: empirical_fisher(model, mods, [(x[i:i + bs], y[i:i + bs]) for i in range(0, 12, bs)])
            for bs in (1, 3, 12)}
    assert reps[1].scores == reps[3].scores == reps[12].scores
    assert [r.num_samples for r in reps.values()] == [12, 12, 12]
    assert [r.num_batches for r in reps.values()] == [12, 4, 1]


def test_fisher_splits_dict_batches_into_samples():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Tiny()

        def forward(self, x, labels):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    from peft_kernels.adapters import adapt

    torch.manual_seed(0)
    model = DictModel()
    mods = adapt(model, method="lora", target_modules=["up", "down"], r=2).adapted_modules()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 13, generator=g), torch.randint(0, 3, (6,), generator=g)
    whole = empirical_fisher(model, mods, [{"x": x, "labels": y}])
    single = empirical_fisher(model, mods, [{"x": x[i:i + 1], "labels": y[i:i + 1]} for i in range(6)])
    assert whole.scores == single.scores and whole.num_samples == 6
    # a tokenizer's BatchEncoding is a Mapping (a UserDict), not a dict
    transformers = pytest.importorskip("transformers")
    encoded = empirical_fisher(model, mods, [transformers.BatchEncoding({"x": x, "labels": y})])
    assert encoded.scores == whole.scores
    with pytest.raises(ValueError, match="leading sizes"):
        empirical_fisher(model, mods, [{"x": x, "labels": y[:3]}])


def test_fisher_restores_requires_grad_and_grads():
    model, mods = _adapted_tiny()
    frozen = mods["blocks.0.up"].lora_A.weight
    frozen.requires_grad_(False)  # e.g. a caller that trains only B
    kept = mods["blocks.1.up"].lora_B.weight
    sentinel = torch.full_like(kept, 7.0)
    kept.grad = sentinel.clone()
    rep = empirical_fisher(model, mods, _batches(n=2, bs=3))
    assert rep.scores["blocks.0"] > 0  # the frozen factor was still scored
    assert not frozen.requires_grad and frozen.grad is None
    assert kept.requires_grad and torch.equal(kept.grad, sentinel)


class _Blk(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.v = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.v(torch.tanh(self.q(x))))


class EncDec(nn.Module):
    """T5/BART-like names: ``encoder.layers.<i>`` and ``decoder.layers.<i>`` share block indices."""

    def __init__(self, d=8, n=3):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_Blk(d) for _ in range(n))
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(_Blk(d) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in [*self.encoder.layers, *self.decoder.layers]:
            x = b(x)
        return self.head(x)


def test_floe_adapt_matches_layers_by_name_not_index():
    torch.manual_seed(0)
    adapted = floe_adapt(EncDec(), ["encoder.layers.1"], ["q", "v"], method="lora", r=2)
    assert sorted(adapted.adapted_modules()) == ["encoder.layers.1.q", "encoder.layers.1.v"]


def test_floe_adapt_layer_without_index():
    torch.manual_seed(0)
    model = EncDec()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    rep = calibrate(model, batches, ["q", "v", "head"], method="lora", num_batches=2, r=2)
    assert "head" in rep.scores  # a module outside any numbered block is its own group
    adapted = floe_adapt(model, ["decoder.layers.0", "head"], ["q", "v", "head"], method="lora", r=2)
    assert sorted(adapted.adapted_modules()) == ["decoder.layers.0.q", "decoder.layers.0.v", "head"]
    with pytest.raises(ValueError, match="hold none of the target modules"):
        floe_adapt(EncDec(), ["encoder.layers.0"], ["head"], method="lora", r=2)


def test_floe_on_gpt2_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class GPT2Block(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.c_attn = Conv1D(3 * d, d)  # GPT-2's fused qkv: weight (in, out)
            self.c_proj = Conv1D(d, 3 * d)

        def forward(self, x):
            return x + self.c_proj(torch.tanh(self.c_attn(x)))

    class GPT2ish(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.ModuleList(GPT2Block() for _ in range(3))
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            for b in self.h:
                x = b(x)
            return self.head(x)

    torch.manual_seed(0)
    model = GPT2ish()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    rep = calibrate(model, batches, ["c_attn"], method="lora", num_batches=2, r=2)
    assert list(rep.scores) == ["h.0", "h.1", "h.2"]
    chosen = rep.select(k=1)
    x = torch.randn(2, 8)
    before = model(x)
    adapted = floe_adapt(model, chosen, ["c_attn"], method="lora", r=2)
    assert list(adapted.adapted_modules()) == [f"{chosen[0]}.c_attn"]
    assert torch.allclose(adapted(x), before)  # B = 0: the adapted model still computes the same
    # module granularity: the selected names are Conv1D modules themselves
    torch.manual_seed(0)
    model = GPT2ish()
    rep = calibrate(model, batches, ["c_attn", "c_proj"], method="lora", num_batches=2, r=2, granularity="module")
    chosen = rep.select(k=2)
    adapted = floe_adapt(model, chosen, ["c_attn", "c_proj"], method="lora", r=2)
    assert list(adapted.adapted_modules()) == chosen
