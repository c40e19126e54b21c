"""Shared-input LoRA groups (``share_inputs``): siblings that read one tensor (q/k/v, gate/up) share
one down-projection pass forward and one dA pass backward on the fused path, and compute exactly
what each layer computes alone: outputs and every gradient, over training steps, with in-place
changes, partial use, dropout, deterministic mode, activation checkpointing and torch.compile."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from peft_kernels import adapt, share_inputs
from peft_kernels.modules import lora as ML
from peft_kernels.modules.lora import LoRALinear, SharedInputGroup


class Attn(nn.Module):
    """q/k/v read one input; o reads another (it must not join the group)."""

    def __init__(self, d=24, kv=8):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, kv, bias=True)
        self.v_proj, self.o_proj = nn.Linear(d, kv, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, h):
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        return self.o_proj(q * torch.tanh(k).repeat(1, 1, 3) + v.repeat(1, 1, 3))


def _adapt(model, std=0.2, **options):
    """``adapt`` every linear with LoRA r=4, B drawn at random (PEFT's zeros would hide B's path)."""
    am = adapt(model, "lora", target_modules="all-linear", r=4, alpha=8, **options)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in am.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)
    return am


def _model(device, dtype=torch.float32, dropout=0.0, impl="triton", share=True):
    torch.manual_seed(0)
    return _adapt(nn.Sequential(Attn(), Attn()).to(device, dtype), dropout=dropout, impl=impl, share_inputs=share)


def _spy(monkeypatch):
    calls = []
    real = ML._group_down
    monkeypatch.setattr(ML, "_group_down", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _step(model, x, steps=1, lr=0.05):
    """Loss and adapter grads of ``steps`` SGD steps (the last step's grads)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return loss.detach(), grads


def _assert_same(a, b, tol=1e-5):
    la, ga = a
    lb, gb = b
    torch.testing.assert_close(la, lb, rtol=tol, atol=tol)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=tol, atol=tol, msg=k)


def test_groups_found_and_training_matches_ungrouped(interpret, monkeypatch):
    am = _model(interpret)
    groups = share_inputs(am.model)
    assert groups == [("0.q_proj", "0.k_proj", "0.v_proj"), ("1.q_proj", "1.k_proj", "1.v_proj")]
    x = torch.randn(3, 5, 24, device=interpret)
    calls = _spy(monkeypatch)
    got = _step(am, x, steps=3)  # steps 2-3: A changed in place by the optimizer: no stale round
    assert len(calls) == 3 * 2  # one group pass per Attn per step
    want = _step(_model(interpret, share=False), x, steps=3)
    ref = _step(_model(interpret, impl="torch", share=False), x, steps=3)
    _assert_same(got, want)
    _assert_same(got, ref, tol=1e-4)
    for m in am.model.modules():
        if isinstance(m, LoRALinear) and "_share_group" in m.__dict__:
            assert m._share_group._round is None  # every member consumed its share


def test_bf16_and_deterministic_mode(interpret):
    x = torch.randn(2, 7, 24, device=interpret)
    want = _step(_model(interpret, torch.bfloat16, share=False), x.bfloat16())
    got = _step(_model(interpret, torch.bfloat16), x.bfloat16())
    _assert_same(got, want, tol=2e-2)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = _step(_model(interpret), x)
    finally:
        torch.use_deterministic_algorithms(prev)
    _assert_same(det, _step(_model(interpret, share=False), x))


def test_never_stale(interpret, monkeypatch):
    """A round is only reused for the very same, unmodified tensor: an in-place change of the input
    between two members, another input, or a member called twice all compute afresh."""
    am = _model(interpret)
    attn = am.model[0]
    ref = _model(interpret, impl="torch", share=False).model[0]
    calls = _spy(monkeypatch)
    h = torch.randn(4, 24, device=interpret)
    with torch.no_grad():
        q = attn.q_proj(h)
        h.mul_(2.0)  # the round's input changed: k and v must see the new values
        k, v = attn.k_proj(h), attn.v_proj(h)
        k2 = attn.k_proj(h + 1)  # another input
        q2 = attn.q_proj(h)  # called again: a new round
        torch.testing.assert_close(q, ref.q_proj(h / 2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, ref.k_proj(h), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, ref.v_proj(h), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k2, ref.k_proj(h + 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q2, ref.q_proj(h), rtol=1e-5, atol=1e-5)
    assert len(calls) == 4


def test_partial_use_leaves_unused_members_without_grad(interpret):
    """Only q and k used: v's adapter gets no gradient (None, as without the group)."""
    am = _model(interpret)
    attn = am.model[0]
    h = torch.randn(6, 24, device=interpret)
    (attn.q_proj(h).sum() + attn.k_proj(h).square().sum()).backward()
    assert attn.v_proj.lora_A.weight.grad is None and attn.v_proj.lora_B.weight.grad is None
    assert attn.q_proj.lora_A.weight.grad is not None and attn.k_proj.lora_A.weight.grad is not None
    attn.q_proj._share_group.reset()


def test_not_grouped_with_dropout_in_training_or_under_compile(interpret, monkeypatch):
    x = torch.randn(2, 3, 24, device=interpret)
    calls = _spy(monkeypatch)
    am = _model(interpret, dropout=0.1)
    am(x).sum().backward()
    assert calls == []  # each member needs its own dropout mask of x
    am.eval()
    with torch.no_grad():
        am(x)
    assert len(calls) == 2  # eval: no dropout, grouped
    calls.clear()
    am = _model(interpret)
    eager = am(x)
    compiled = torch.compile(am, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # the eager call only


def test_activation_checkpointing(interpret):
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(2, 5, 24, device=interpret)

    def ckpt_step(model):
        out = x
        for blk in model.model:
            out = checkpoint(blk, out, use_reentrant=False)
        loss = out.square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    _assert_same(ckpt_step(_model(interpret)), ckpt_step(_model(interpret, share=False)))


def test_unlink_and_bad_options(interpret):
    am = _model(interpret)
    assert share_inputs(am.model, ()) == []
    assert not any("_share_group" in m.__dict__ for m in am.model.modules())
    assert share_inputs(am.model, [("q_proj", "o_proj")]) == [("0.q_proj", "0.o_proj"), ("1.q_proj", "1.o_proj")]
    with pytest.raises(TypeError, match="share_inputs is a LoRA option"):
        adapt(copy.deepcopy(nn.Sequential(Attn())), "monarch", target_modules="all-linear", share_inputs=True)
    g = SharedInputGroup([am.model[0].q_proj, am.model[0].k_proj])
    assert g.xa_for(am.model[0].q_proj, torch.randn(2, 24, device=interpret)).shape == (2, 4)


def _saved_bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def test_one_linked_layer_saves_and_copies_alone(interpret, monkeypatch):
    """The group held its members strongly, so saving or deep-copying one linked layer took its
    siblings (base weights included) along, and the copy's calls left rounds for them."""
    am = _model(interpret)
    attn = am.model[0]
    q = attn.q_proj
    alone = copy.deepcopy(q)
    alone.__dict__.pop("_share_group", None)
    assert _saved_bytes(q) < _saved_bytes(alone) + 512  # a placeholder group, not k and v

    c = copy.deepcopy(q)
    assert c._share_group is not q._share_group
    assert c._share_group.members[0] is c and c._share_group.members[1:] == (None, None)
    assert q._share_group.members == (q, attn.k_proj, attn.v_proj)  # the original is untouched
    h = torch.randn(3, 24, device=interpret)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(c(h), q(h))
    assert "_share_group" not in c.__dict__  # unlinked on its first call: no orphan round
    assert len(calls) == 1  # the original's group pass only
    q._share_group.reset()

    shallow = copy.copy(q)  # shares the live group: must not take q's place in it
    assert "_share_group" not in shallow.__dict__ and q._share_group.members[0] is q


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_whole_model_copy_relinks(interpret, monkeypatch, how):
    am = _model(interpret)
    if how == "deepcopy":
        dup = copy.deepcopy(am)
    else:
        buf = io.BytesIO()
        torch.save(am, buf)
        buf.seek(0)
        dup = torch.load(buf, weights_only=False)
    for orig, new in zip(am.model, dup.model):
        assert new.q_proj._share_group is not orig.q_proj._share_group
        assert new.q_proj._share_group.members == (new.q_proj, new.k_proj, new.v_proj)
    x = torch.randn(2, 5, 24, device=interpret)
    want = _step(_model(interpret, share=False), x)
    calls = _spy(monkeypatch)
    _assert_same(_step(dup, x), want)
    assert len(calls) == 2  # re-linked: one group pass per block


def test_model_pickled_before_weak_links_still_loads_linked(interpret, monkeypatch):
    """Whole models pickled by the earlier group (which stored its members) load, linked."""
    from peft_kernels.modules.lora import LoRALinear, SharedInputGroup

    am = _model(interpret)
    with monkeypatch.context() as m:  # the earlier pickled form: the group names its members
        m.setattr(SharedInputGroup, "__getstate__", lambda self: {"members": self.members, "_round": None})
        m.setattr(LoRALinear, "__getstate__", lambda self: dict(nn.Module.__getstate__(self)))
        buf = io.BytesIO()
        torch.save(am, buf)
    buf.seek(0)
    dup = torch.load(buf, weights_only=False)
    for new in dup.model:
        assert new.q_proj._share_group.members == (new.q_proj, new.k_proj, new.v_proj)
    x = torch.randn(2, 5, 24, device=interpret)
    want = _step(_model(interpret, share=False), x)
    calls = _spy(monkeypatch)
    _assert_same(_step(dup, x), want)
    assert len(calls) == 2


def test_llama_groups_q_k_v_and_gate_up(interpret, monkeypatch):
    """On an HF Llama, adapt(..., share_inputs=True) links q/k/v and gate/up in every layer, each
    group runs one pass per step, and loss and every gradient match the unlinked model."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(interpret)
    ids = torch.randint(0, 64, (2, 9), device=interpret)

    def run(share):
        torch.manual_seed(5)
        am = _adapt(copy.deepcopy(base), std=0.1, impl="triton", share_inputs=share)
        loss = am(input_ids=ids, labels=ids).loss
        loss.backward()
        return am, (loss.detach(), {n: p.grad for n, p in am.named_parameters() if p.grad is not None})

    calls = _spy(monkeypatch)
    am, got = run(True)
    assert len(calls) == 2 * 2
    assert sorted(share_inputs(am.model)) == sorted(
        [(f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.self_attn.k_proj",
          f"model.layers.{i}.self_attn.v_proj") for i in range(2)]
        + [(f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj") for i in range(2)])
    _assert_same(got, run(False)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_grouped_training_on_gpu(dtype, tol):
    """The same equality on a GPU (compiled kernels, autotuned tiles, fp32 atomics), 3 steps."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    x = torch.randn(4, 300, 24, device=dev, dtype=dtype)
    _assert_same(_step(_model(dev, dtype), x, steps=3), _step(_model(dev, dtype, share=False), x, steps=3), tol)


def test_review_edge_cases(interpret, monkeypatch):
    """Inference mode runs (no group); an empty input's dA is zero in deterministic mode; a round
    started without grad is not reused with grad (nor across autocast states); a DataParallel-style
    replica runs alone; a model with a pending round deep-copies; groups given as one bare tuple."""
    am = _model(interpret)
    attn = am.model[0]
    with torch.inference_mode():
        out = am(torch.randn(2, 5, 24, device=interpret))
    assert out.shape == (2, 5, 24)

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        h0 = torch.randn(0, 24, device=interpret)
        (attn.q_proj(h0).sum() + attn.k_proj(h0).sum() + attn.v_proj(h0).sum()).backward()
    finally:
        torch.use_deterministic_algorithms(prev)
    for name in ("q_proj", "k_proj", "v_proj"):
        g = getattr(attn, name).lora_A.weight.grad
        assert g is not None and torch.equal(g, torch.zeros_like(g)), name
    am.zero_grad(set_to_none=True)

    h = torch.randn(4, 24, device=interpret)
    with torch.no_grad():
        attn.q_proj(h)  # starts a round without a graph
    attn.k_proj(h).sum().backward()
    assert attn.k_proj.lora_A.weight.grad is not None  # not the graph-less round's xa

    assert attn.q_proj._share_group._round is not None  # k's round: q and v pending
    attn.q_proj._share_group.reset()
    calls = _spy(monkeypatch)
    replica = attn.q_proj._replicate_for_data_parallel()
    torch.testing.assert_close(replica(h), attn.q_proj(h))
    assert len(calls) == 1  # the original's call only
    attn.q_proj(h)  # leaves a pending round (k, v never called)
    copy.deepcopy(am)
    assert share_inputs(am.model, ("q_proj", "k_proj")) == [("0.q_proj", "0.k_proj"), ("1.q_proj", "1.k_proj")]
    with pytest.raises(TypeError, match="sequences of child names"):
        share_inputs(am.model, [("q_proj", 3)])
    adapt(nn.Sequential(Attn()).to(interpret), "lora", target_modules="all-linear", share_inputs=None)


def test_a_disabled_member_leaves_the_group_exact(interpret, monkeypatch):
    """A member switched off (``enable_adapters(False)``) computes its base layer alone; its group
    runs no shared pass while it is off, and the siblings' outputs and gradients are those of the
    unlinked model with the same member off."""
    x = torch.randn(3, 5, 24, device=interpret)
    grouped, alone = _model(interpret), _model(interpret, share=False)
    for am in (grouped, alone):
        am.model[0].k_proj.enable_adapters(False)
    calls = _spy(monkeypatch)
    got = _step(grouped, x)
    assert len(calls) == 1  # the second block's group only
    assert not any("0.k_proj.lora" in n for n in got[1])
    _assert_same(got, _step(alone, x))


def test_switching_adapters_relinks_the_groups(interpret, monkeypatch):
    """set_adapter installs the other adapter's layers: they are linked in their turn, and the
    results stay those of the unlinked model."""
    x = torch.randn(3, 5, 24, device=interpret)
    grouped, alone = _model(interpret), _model(interpret, share=False)
    for am in (grouped, alone):
        torch.manual_seed(5)
        am.add_adapter("b", r=2, alpha=4, impl="triton")
        am.set_adapter("b")
        with torch.no_grad():
            for n, p in am.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
    assert grouped.model[0].q_proj.__dict__.get("_share_group") is not None
    assert grouped.model[0].q_proj.r == 2
    calls = _spy(monkeypatch)
    got = _step(grouped, x)
    assert len(calls) == 2
    _assert_same(got, _step(alone, x))
