"""AdaLoRA rank allocation: the schedule and masks against the formulas and HF PEFT's RankAllocator."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from peft_kernels.train.adalora import AdaLoRAConfig, RankAllocator, orthogonal_regularization

AdaLoRALinear = pytest.importorskip("peft_kernels.modules.adalora").AdaLoRALinear
peft_adalora = pytest.importorskip("peft.tuners.adalora.layer")

SHAPES = [(5, 23, 17), (7, 11, 29), (3, 13, 13)]  # (r, d_in, d_out): unequal ranks and widths


class _PeftTriplet(nn.Module):
    """What PEFT's RankAllocator reads: ``<name>.lora_{A,E,B}.default`` parameters (E is (r, 1))."""

    def __init__(self, r, d_in, d_out):
        super().__init__()
        self.lora_A = nn.ParameterDict({"default": nn.Parameter(torch.zeros(r, d_in))})
        self.lora_E = nn.ParameterDict({"default": nn.Parameter(torch.zeros(r, 1))})
        self.lora_B = nn.ParameterDict({"default": nn.Parameter(torch.zeros(d_out, r))})


def _ours():
    return nn.ModuleDict({f"m{i}": AdaLoRALinear.from_linear(nn.Linear(din, dout), r=r)
                          for i, (r, din, dout) in enumerate(SHAPES)})


def _peft():
    return nn.ModuleDict({f"m{i}": _PeftTriplet(r, din, dout) for i, (r, din, dout) in enumerate(SHAPES)})


def _peft_config(cfg: AdaLoRAConfig):
    return types.SimpleNamespace(beta1=cfg.beta1, beta2=cfg.beta2, target_r=cfg.target_r, tinit=cfg.tinit,
                                 tfinal=cfg.tfinal, total_step=cfg.total_step, deltaT=cfg.deltaT)


def _peft_update_and_allocate(alloc, model, cfg, step):
    """PEFT's AdaLoraModel.update_and_allocate, driving its RankAllocator."""
    if step < cfg.total_step - cfg.tfinal:
        _, pattern = alloc.update_and_allocate(model, step)
        if pattern:
            cfg.rank_pattern = pattern
        return pattern is not None
    if step == cfg.total_step - cfg.tfinal:
        _, pattern = alloc.update_and_allocate(model, step, force_mask=True)
        cfg.rank_pattern = pattern
        alloc.reset_ipt()
        return True
    alloc.mask_using_rank_pattern(model, cfg.rank_pattern)
    return True


def _cubic_budget(step, init, target, tinit, tfinal, total):
    """The paper's schedule written out: flat, cubic decay, flat."""
    if step <= tinit:
        return init
    if step > total - tfinal:
        return target
    return int((init - target) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3 + target)


def test_budget_schedule_matches_formula_and_peft():
    cfg = AdaLoRAConfig(init_r=5, target_r=2, tinit=3, tfinal=4, deltaT=2, total_step=20)
    ours = RankAllocator(_ours(), cfg)
    pcfg = _peft_config(cfg)
    theirs = peft_adalora.RankAllocator(_peft(), pcfg, "default")
    init = sum(r for r, _, _ in SHAPES)
    assert ours.init_bgt == theirs.init_bgt == init
    assert ours.target_bgt == theirs.target_bgt == 2 * len(SHAPES)
    seen = set()
    for step in range(0, 26):
        b, m = ours.budget_schedule(step)
        assert (b, m) == theirs.budget_schedule(step), step
        assert b == _cubic_budget(step, init, 6, 3, 4, 20), step
        seen.add(b)
    assert len(seen) > 4  # the run really decays through intermediate budgets


@pytest.mark.parametrize("tinit,tfinal,deltaT", [(2, 3, 1), (0, 0, 3)])
def test_masks_match_peft_rank_allocator(tinit, tfinal, deltaT):
    cfg = AdaLoRAConfig(init_r=7, target_r=3, tinit=tinit, tfinal=tfinal, deltaT=deltaT, total_step=14)
    ours_model, peft_model = _ours(), _peft()
    ours = RankAllocator(ours_model, cfg)
    pcfg = _peft_config(cfg)
    theirs = peft_adalora.RankAllocator(peft_model, pcfg, "default")
    g = torch.Generator().manual_seed(1)
    compared = 0
    last_pattern = None
    for step in range(1, cfg.total_step + 4):
        # the same parameters and gradients to both (fresh each step: E nonzero everywhere)
        for name in ours_model:
            o, p = ours_model[name], peft_model[name]
            for f in ("lora_A", "lora_E", "lora_B"):
                shape = getattr(o, f).shape
                val = torch.randn(shape, generator=g)
                grad = torch.randn(shape, generator=g)
                pp = getattr(p, f)["default"]
                with torch.no_grad():
                    getattr(o, f).copy_(val)
                    pp.copy_(val.view(pp.shape))
                getattr(o, f).grad = grad.clone()
                pp.grad = grad.view(pp.shape).clone()
        masked = _peft_update_and_allocate(theirs, peft_model, pcfg, step)
        budget, _ = ours.step(step)
        if masked:
            last_pattern = {n: (peft_model[n].lora_E["default"].view(-1) != 0).float() for n in peft_model}
        if last_pattern is not None:
            for n in ours_model:
                assert torch.equal(ours_model[n].rank_mask, last_pattern[n]), (step, n)
            compared += 1
            assert sum(ours.current_ranks().values()) == sum(int(m.sum()) for m in last_pattern.values())
    assert compared >= cfg.total_step - max(tinit, 1)
    assert sum(ours.current_ranks().values()) == ours.target_bgt  # final budget reached and kept
    assert ours.final_mask is not None


def test_mask_keeps_top_triplets_by_formula():
    model = _ours()
    cfg = AdaLoRAConfig(init_r=7, target_r=2, total_step=10)
    alloc = RankAllocator(model, cfg)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        _random_grads(model, g)
        alloc.update_ipt()
    # the triplet score written out from the stored EMAs
    s = {}
    for n, m in model.items():
        sc = {f: alloc.exp_avg_ipt[f"{n}.{f}"] * alloc.exp_avg_unc[f"{n}.{f}"] for f in ("lora_A", "lora_E", "lora_B")}
        s[n] = torch.stack([sc["lora_E"][i] + sc["lora_A"][i, :].mean() + sc["lora_B"][:, i].mean()
                            for i in range(m.lora_A.shape[0])])
    budget = 8
    alloc.mask_to_budget(budget)
    flat = sorted(((float(v), n, i) for n in s for i, v in enumerate(s[n])), reverse=True)
    keep = {(n, i) for _, n, i in flat[:budget]}
    for n, m in model.items():
        want = torch.tensor([1.0 if (n, i) in keep else 0.0 for i in range(m.lora_A.shape[0])])
        assert torch.equal(m.rank_mask, want), n
    assert alloc.current_ranks() == {n: int(sum((n, i) in keep for i in range(len(s[n])))) for n in s}


def test_ties_prune_exactly_to_budget():
    """All-zero scores (no gradient yet): PEFT's `<= kthvalue` would prune everything; we keep `budget`."""
    model = _ours()
    alloc = RankAllocator(model, AdaLoRAConfig(init_r=7, target_r=2, total_step=10))
    alloc.mask_to_budget(9)
    assert sum(alloc.current_ranks().values()) == 9
    assert alloc.current_ranks() == {"m0": 5, "m1": 4, "m2": 0}  # stable order: earliest names kept


@pytest.mark.parametrize("kwargs,match", [
    (dict(tinit=10, tfinal=0, total_step=10), "no budgeting phase"),
    (dict(tinit=4, tfinal=6, total_step=10), "no budgeting phase"),
    (dict(total_step=None), "total_step"),
    (dict(total_step=10, target_r=13), "target_r"),
    (dict(total_step=10, beta1=1.0), "beta1"),
    (dict(total_step=10, deltaT=0), "deltaT"),
    (dict(total_step=10, orth_reg_weight=-1.0), "orth_reg_weight"),
])
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoRAConfig(**kwargs).validate()


def test_allocator_needs_adalora_modules():
    with pytest.raises(ValueError, match="no AdaLoRA modules"):
        RankAllocator(nn.Linear(3, 3), AdaLoRAConfig(total_step=10))


def _ours_random_factors(seed: int):
    """``_ours()`` with random A and B (far from orthogonal, so the regulariser is not ~0)."""
    model = _ours()
    g = torch.Generator().manual_seed(seed)
    for m in model.values():
        with torch.no_grad():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    return model


def test_orthogonal_regularization_formula():
    model = _ours_random_factors(5)
    got = orthogonal_regularization(model, 0.5)
    terms = []
    for m in model.values():
        a, b = m.lora_A.double(), m.lora_B.double()
        r = a.shape[0]
        terms.append(((a @ a.T - torch.eye(r, dtype=torch.float64)) ** 2).sum().sqrt())
        terms.append(((b.T @ b - torch.eye(r, dtype=torch.float64)) ** 2).sum().sqrt())
    want = 0.5 * sum(terms) / len(terms)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    got.backward()  # differentiable: it is added to the training loss
    assert all(m.lora_A.grad is not None and m.lora_B.grad is not None for m in model.values())


def test_orthogonal_regularization_is_fp32_under_autocast():
    """The trainer adds the regulariser inside its bf16 autocast region; the Gram matmuls must not
    follow it into bf16 (||A A^T - I|| is a small difference of O(1) entries)."""
    model = _ours_random_factors(6)
    plain = orthogonal_regularization(model, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = orthogonal_regularization(model, 0.5)
    assert under.dtype == torch.float32
    assert torch.equal(under, plain)


def _random_grads(model, g):
    for m in model.values():
        for f in ("lora_A", "lora_E", "lora_B"):
            p = getattr(m, f)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))
            p.grad = torch.randn(p.shape, generator=g)


def test_non_finite_gradients_change_nothing():
    """An overflowed fp16 step (inf/nan gradients) must not reach the EMAs: E starts at zero and
    |0 * inf| = nan, which would stay in the EMAs for good and leave pruning to the tie order."""
    model = _ours()
    alloc = RankAllocator(model, AdaLoRAConfig(init_r=7, target_r=2, tinit=0, tfinal=2, total_step=10))
    g = torch.Generator().manual_seed(4)
    for step in (1, 2):
        _random_grads(model, g)
        alloc.step(step)
    ema = {k: v.clone() for k, v in alloc.exp_avg_ipt.items()}
    unc = {k: v.clone() for k, v in alloc.exp_avg_unc.items()}
    masks = {n: m.rank_mask.clone() for n, m in model.items()}
    budget = alloc.last_budget

    _random_grads(model, g)
    assert alloc.step(3, grads_valid=False) == (budget, None)  # the trainer saw GradScaler skip the step
    _random_grads(model, g)
    with torch.no_grad():
        model["m1"].lora_E.zero_()
    model["m1"].lora_E.grad[0] = float("inf")
    assert not alloc.grads_finite()
    assert alloc.step(3) == (budget, None)  # step 3 would mask: it is skipped as a whole
    assert all(torch.equal(alloc.exp_avg_ipt[k], v) for k, v in ema.items())
    assert all(torch.equal(alloc.exp_avg_unc[k], v) for k, v in unc.items())
    assert all(torch.equal(m.rank_mask, masks[n]) for n, m in model.items())

    _random_grads(model, g)  # the next good step carries on with the schedule
    assert alloc.grads_finite()
    b4, m4 = alloc.step(4)
    assert m4 is not None and b4 == alloc.budget_schedule(4)[0] < budget
    assert all(torch.isfinite(v).all() for v in alloc.exp_avg_ipt.values())


def test_state_dict_roundtrip_and_zero_rank_save_load(tmp_path):
    from peft_kernels.adapters import adapt

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(9, 11), nn.ReLU(), nn.Linear(11, 6))
    adapted = adapt(net, method="adalora", target_modules=["0", "2"], r=4)
    mods = adapted.adapted_modules()
    for m in mods.values():
        with torch.no_grad():
            m.lora_E.normal_()
            m.lora_B.normal_()
    cfg = AdaLoRAConfig(init_r=4, target_r=2, total_step=6)
    alloc = RankAllocator(adapted.model, cfg)
    # module "0" unimportant, module "2" important: the budget (4) all goes to "2"
    for n, m in alloc.modules.items():
        for f in ("lora_A", "lora_E", "lora_B"):
            p = getattr(m, f)
            p.grad = torch.full_like(p, 0.0 if n == "0" else 1.0)
    alloc.update_ipt()
    alloc.update_ipt()  # Ubar needs two updates to become nonzero
    alloc.mask_to_budget(4)
    assert alloc.current_ranks() == {"0": 0, "2": 4}
    assert "0 / 4" in alloc.report()

    x = torch.randn(5, 9)
    y = adapted(x)
    adapted.save(tmp_path / "ada")
    torch.manual_seed(1)
    net2 = nn.Sequential(nn.Linear(9, 11), nn.ReLU(), nn.Linear(11, 6))
    net2.load_state_dict({k: v for k, v in net.state_dict().items() if "base_layer" not in k
                          and "lora" not in k and "rank_mask" not in k}, strict=False)
    with torch.no_grad():
        net2[0].weight.copy_(mods["0"].base_layer.weight)
        net2[0].bias.copy_(mods["0"].base_layer.bias)
        net2[2].weight.copy_(mods["2"].base_layer.weight)
        net2[2].bias.copy_(mods["2"].base_layer.bias)
    from peft_kernels.adapters import load_adapted
    loaded = load_adapted(net2, tmp_path / "ada")
    lm = loaded.adapted_modules()
    assert torch.equal(lm["0"].rank_mask, torch.zeros(4))
    assert torch.allclose(loaded(x), y)

    # allocator state round trip (what a training checkpoint stores)
    alloc2 = RankAllocator(loaded.model, cfg)
    alloc2.load_state_dict(alloc.state_dict())
    assert alloc2.current_ranks() == alloc.current_ranks()
    for k in alloc.exp_avg_ipt:
        assert torch.equal(alloc2.exp_avg_ipt[k], alloc.exp_avg_ipt[k])


def test_resume_past_budgeting_phase_keeps_loaded_masks():
    """An HF checkpoint restores the rank_mask buffers but not the allocator's EMAs: keep the masks."""
    model = _ours()
    cfg = AdaLoRAConfig(init_r=7, target_r=2, tinit=1, tfinal=3, total_step=10)
    loaded = {"m0": torch.tensor([0., 1, 0, 0, 1]), "m1": torch.tensor([1., 0, 0, 1, 0, 0, 1]),
              "m2": torch.tensor([0., 1, 0])}
    for n, m in model.items():
        m.set_rank_mask(loaded[n])
    alloc = RankAllocator(model, cfg)
    alloc.step(9)
    for n, m in model.items():
        assert torch.equal(m.rank_mask, loaded[n]), n
    assert torch.equal(alloc.final_mask["m1"], loaded["m1"])
