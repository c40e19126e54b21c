"""Whole-model use: inject by name, freeze, train, merge, save/load, bad checkpoints, checkpointing.

Models are HF transformers models built from tiny configs (never downloaded). Everything runs on
the CPU torch path (the default dispatch on CPU).
"""
from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from peft_kernels.adapters import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdaptedModel, CheckpointError, adapt,  # noqa: E402
                                   load_adapted, select_modules)

from tiny_models import VOCAB, tiny_bert_cls, tiny_gpt2, tiny_llama  # noqa: E402

# small options per family: enough rank to learn a fixed batch in a few steps
FAMILY_OPTIONS = {
    "lora": dict(r=4, alpha=8.0),
    "adalora": dict(r=4, alpha=8.0),
    "monarch": dict(nblocks=4, blk_r=4),
    "sparse": dict(density=0.05, per_row=True, lora_r=2),  # RoSA: per-row mask + a LoRA beside it
    "lily": dict(r=4, num_experts=2),
    "moelora": dict(r=4, num_experts=2),
}
MODULE_OF = {"lora": "lora", "adalora": "adalora", "monarch": "monarch", "sparse": "sparse", "lily": "lily",
             "moelora": "lily"}
MERGEABLE = ["lora", "adalora", "monarch", "sparse"]


def need_family(method: str) -> None:
    """Skip (naming the missing file) when a family's module has not been written yet."""
    try:
        importlib.import_module(f"peft_kernels.modules.{MODULE_OF[method]}")
    except ImportError as e:
        pytest.skip(f"peft_kernels/modules/{MODULE_OF[method]}.py is not importable: {e}")


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                  vocab_size=VOCAB, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def batch(seed: int = 1, b: int = 2, t: int = 11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


def randomize_adapters(adapted: AdaptedModel, seed: int = 3, std: float = 0.2) -> None:
    """Give every adapter parameter non-trivial values (fresh adapters are the identity change)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def train_steps(adapted: AdaptedModel, ids: torch.Tensor, steps: int) -> list:
    """``steps`` AdamW steps (lr 1e-2) of the LM loss on one fixed batch; the losses."""
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = adapted(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def model_snapshot(model: nn.Module) -> dict:
    """Everything a failed load must not change: structure, values and trainability."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["modules"] == b["modules"]
    assert a["grad"] == b["grad"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


# ----------------------------------------------------------------------------- selection


def test_select_by_name_suffix_regex_layers_and_errors():
    model = tiny_llama()
    assert select_modules(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert select_modules(model, ["self_attn.o_proj"], layers=[1]) == ["model.layers.1.self_attn.o_proj"]
    assert select_modules(model, r"model\.layers\.0\.mlp\.(up|down)_proj") == [
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert select_modules(model, [r".*\.1\.mlp\.gate_proj"]) == ["model.layers.1.mlp.gate_proj"]
    everything = select_modules(model, "all-linear")
    assert len(everything) == 14 and "lm_head" not in everything  # 7 per layer, output layer left out
    with pytest.raises(ValueError, match=r"\['qproj'\] match no linear layer.*available linear names: .*q_proj"):
        adapt(model, "lora", target_modules=["q_proj", "qproj"])
    with pytest.raises(ValueError, match=r"layers \[5\] hold none"):
        adapt(model, "lora", target_modules=["q_proj"], layers=[0, 5])
    with pytest.raises(ValueError, match="method must be one of"):
        adapt(model, "dora", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="target_modules is required"):
        adapt(model, "lora")
    # none of the failed calls touched the model
    assert not any(hasattr(m, "base_layer") for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_adapt_freezes_and_counts(capsys):
    model = tiny_llama()
    adapted = adapt(model, "lora", target_modules=["q_proj", "v_proj"], layers=[1], r=4, alpha=8.0)
    mods = adapted.adapted_modules()
    assert list(mods) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    names = {n for n, _ in adapted.named_trainable_parameters()}
    assert names == {f"{m}.{p}" for m in mods for p in ("lora_A.weight", "lora_B.weight")}
    trainable, total = adapted.count_parameters()
    expect = sum(4 * (m.in_features + m.out_features) for m in mods.values())
    assert trainable == expect and total == sum(p.numel() for p in model.parameters())
    line = adapted.print_trainable_parameters()
    assert line in capsys.readouterr().out and f"trainable params: {expect:,d}" in line
    # the handle calls the model and forwards attribute lookups to it
    assert adapted.config is model.config
    ids = batch()
    torch.testing.assert_close(adapted(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    # unload restores the original layers and their trainability
    base = adapted.unload()
    assert not any(hasattr(m, "base_layer") for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())


# ----------------------------------------------------------------------------- every family


@pytest.mark.parametrize("method", list(FAMILY_OPTIONS))
def test_family_trains_merges_saves_and_loads(method, tmp_path):
    """Per family: a few AdamW steps lower the loss on a fixed batch; merged == unmerged (where a
    family can merge); save -> load into a fresh model reproduces the outputs exactly."""
    need_family(method)
    model = tiny_llama()
    adapted = adapt(model, method, target_modules=["q_proj", "v_proj", "down_proj"], **FAMILY_OPTIONS[method])
    ids = batch()
    adapted.train()
    losses = train_steps(adapted, ids, 6)
    assert losses[-1] < losses[0] - 1e-3, f"{method}: loss did not decrease: {losses}"
    # frozen weights got no gradient
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    adapted.eval()
    ref = adapted(input_ids=ids).logits.detach()
    if method in MERGEABLE:
        adapted.merge()
        assert all(m.merged for m in adapted.adapted_modules().values())
        torch.testing.assert_close(adapted(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
        adapted.merge()  # a second merge is a no-op
        adapted.unmerge()
        torch.testing.assert_close(adapted(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises(ValueError, match="cannot be merged"):
            adapted.merge()

    adapted.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left behind
    fresh = load_adapted(tiny_llama(seed=0), tmp_path)
    assert fresh.method == method and list(fresh.adapted_modules()) == list(adapted.adapted_modules())
    torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)
    # loading into an already adapted (differently initialised) model works too
    other = adapt(tiny_llama(seed=0), method, target_modules=["q_proj", "v_proj", "down_proj"],
                  **FAMILY_OPTIONS[method]).eval()
    other.load(tmp_path)
    torch.testing.assert_close(other(input_ids=ids).logits, ref, rtol=0, atol=0)

    if method in MERGEABLE:
        plain = adapted.merge_and_unload()
        assert not any(hasattr(m, "base_layer") for m in plain.modules())
        assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(plain(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_lily_shared_projectors_saved_once(tmp_path):
    need_family("lily")
    adapted = adapt(tiny_llama(), "lily", target_modules=["q_proj", "v_proj"], r=4, num_experts=2)
    randomize_adapters(adapted)
    state, shared = adapted.adapter_state()
    ids = {id(t) for t in state.values()}
    assert len(ids) == len(state), "a tensor was stored twice"
    assert shared, "Lily's HPs are shared across layers, so some keys must be aliases"
    adapted.save(tmp_path)
    from safetensors import safe_open

    with safe_open(os.path.join(tmp_path, WEIGHTS_NAME), framework="pt") as f:
        assert set(f.keys()) == set(state)
    fresh = load_adapted(tiny_llama(), tmp_path)
    # the sharing structure survives the round trip: the aliased keys point at one Parameter again
    fs, fshared = fresh.adapter_state()
    assert fshared == shared
    adapted.eval()
    x = batch()
    torch.testing.assert_close(fresh(input_ids=x).logits, adapted(input_ids=x).logits, rtol=0, atol=0)


def test_lily_checkpoint_with_other_sharing_is_refused(tmp_path):
    """A Lily checkpoint saved with stride 1 loaded into a model built with stride 2 (one LP per
    two layers): each checkpoint LP would have to collapse into one Parameter, dropping one layer's
    silently. The sharing layouts must agree; the model stays unchanged."""
    need_family("lily")
    targets = dict(target_modules=["q_proj", "v_proj"], r=4, num_experts=2)
    saved = adapt(tiny_llama(), "lily", stride=1, **targets)
    randomize_adapters(saved)
    saved.save(tmp_path)
    other = adapt(tiny_llama(), "lily", stride=2, **targets)
    before = {k: v.clone() for k, v in other.adapter_state()[0].items()}
    with pytest.raises(CheckpointError, match="shares parameters differently"):
        other.load(tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in other.adapter_state()[0].items())


# ----------------------------------------------------------------------------- bad checkpoints


def _saved_lora(tmp_path):
    adapted = adapt(tiny_llama(), "lora", target_modules=["q_proj", "v_proj"], r=4, alpha=8.0)
    randomize_adapters(adapted)
    adapted.save(tmp_path)
    return adapted


def _rewrite_weights(tmp_path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = os.path.join(tmp_path, WEIGHTS_NAME)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)  # no metadata: the json is PEFT's, the loader falls back to it


KEY_Q0A = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_V1B = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.mark.parametrize("defect", ["missing_and_unexpected", "wrong_shape", "wrong_family", "truncated",
                                    "bad_json", "wrong_alpha", "no_weights_file"])
def test_bad_checkpoint_one_clear_error_model_unchanged(defect, tmp_path):
    _saved_lora(tmp_path)
    if defect == "missing_and_unexpected":
        def edit(t):
            del t[KEY_Q0A], t[KEY_V1B]
            t[f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
        _rewrite_weights(tmp_path, edit)
        match = r"missing keys \(2\).*q_proj\.lora_A.*v_proj\.lora_B(.|\n)*unexpected keys.*up_proj"
    elif defect == "wrong_shape":
        _rewrite_weights(tmp_path, lambda t: t.__setitem__(KEY_Q0A, torch.zeros(5, 64)))
        match = r"shape mismatch for .*q_proj\.lora_A\.weight: checkpoint \(5, 64\) vs model \(4, 64\)"
    elif defect == "wrong_family":
        need_family("monarch")
        adapt(tiny_llama(), "monarch", target_modules=["q_proj", "v_proj"], nblocks=4, blk_r=4).save(tmp_path)
        match = r"checkpoint holds 'monarch' adapters but the model uses 'lora'"
    elif defect == "truncated":
        path = os.path.join(tmp_path, WEIGHTS_NAME)
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        match = r"corrupt or truncated safetensors file"
    elif defect == "no_weights_file":
        os.remove(os.path.join(tmp_path, WEIGHTS_NAME))
        match = r"not an adapter checkpoint, missing .*adapter_model\.safetensors"
    elif defect == "bad_json":
        with open(os.path.join(tmp_path, CONFIG_NAME), "w") as f:
            f.write("{not json")
        match = r"cannot parse adapter config"
    else:
        cfg = json.load(open(os.path.join(tmp_path, CONFIG_NAME)))
        cfg["lora_alpha"] = 3
        json.dump(cfg, open(os.path.join(tmp_path, CONFIG_NAME), "w"))
        _rewrite_weights(tmp_path, lambda t: None)  # drop our metadata so the json is what counts
        match = r"options of model\.layers\.0\.self_attn\.q_proj differ: alpha: checkpoint 3\.0 vs model 8\.0"

    # into an adapted model: one error naming the problem(s), nothing changed
    target = adapt(tiny_llama(seed=5), "lora", target_modules=["q_proj", "v_proj"], r=4, alpha=8.0)
    randomize_adapters(target, seed=9)
    before = model_snapshot(target.model)
    with pytest.raises(CheckpointError, match=match) as info:
        target.load(tmp_path)
    msg = str(info.value)
    lines = msg.split("\n  - ")[1:]
    assert len(lines) == len(set(lines)), f"a problem was listed twice: {msg}"
    assert_same_snapshot(before, model_snapshot(target.model))
    # into a fresh model: no adapter injected, requires_grad untouched
    # (a fresh model takes the checkpoint's family and alpha: nothing to disagree with)
    if defect not in ("wrong_alpha", "wrong_family"):
        fresh = tiny_llama(seed=5)
        before = model_snapshot(fresh)
        with pytest.raises(CheckpointError):
            load_adapted(fresh, tmp_path)
        assert_same_snapshot(before, model_snapshot(fresh))


# ----------------------------------------------------------------------------- other architectures


def test_gpt2_conv1d_adapt_merge_save_load(tmp_path):
    """GPT-2's Conv1D layers are adapted through an equivalent Linear and restored on unload."""
    model = tiny_gpt2()
    ids = batch(t=9)
    base_out = model(input_ids=ids).logits.detach()
    adapted = adapt(model, "lora", target_modules=["c_attn", "c_fc"], r=4, alpha=8.0)
    torch.testing.assert_close(adapted(input_ids=ids).logits, base_out, rtol=1e-5, atol=1e-5)
    randomize_adapters(adapted)
    ref = adapted(input_ids=ids).logits.detach()
    adapted.save(tmp_path)
    cfg = json.load(open(os.path.join(tmp_path, CONFIG_NAME)))
    assert cfg["fan_in_fan_out"] is True  # what PEFT expects for Conv1D targets
    fresh = load_adapted(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)
    plain = adapted.merge_and_unload()
    conv1d = transformers.pytorch_utils.Conv1D
    assert isinstance(plain.transformer.h[0].attn.c_attn, conv1d)
    assert isinstance(plain.transformer.h[1].mlp.c_fc, conv1d)
    # unload without merging gives back the original Conv1D layers, trainable again
    again = adapt(tiny_gpt2(), "lora", target_modules=["c_attn"], r=4, alpha=8.0)
    randomize_adapters(again)
    restored = again.unload()
    assert isinstance(restored.transformer.h[0].attn.c_attn, conv1d)
    assert all(p.requires_grad for p in restored.parameters())
    torch.testing.assert_close(restored(input_ids=ids).logits, base_out, rtol=0, atol=0)
    # the merged model's state dict keeps GPT-2's layout (loadable into a fresh GPT2LMHeadModel)
    reloaded = tiny_gpt2(seed=7)
    reloaded.load_state_dict(plain.state_dict())
    torch.testing.assert_close(reloaded(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_bert_adapt_train_save_load(tmp_path):
    need_family("monarch")
    model = tiny_bert()
    ids = batch(t=9)
    adapted = adapt(model, "monarch", target_modules=["query", "value"], layers=[0], nblocks=4, blk_r=4)
    assert list(adapted.adapted_modules()) == ["encoder.layer.0.attention.self.query",
                                               "encoder.layer.0.attention.self.value"]
    randomize_adapters(adapted)
    ref = adapted(input_ids=ids).last_hidden_state.detach()
    adapted.save(tmp_path)
    fresh = load_adapted(tiny_bert(), tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------- gradient checkpointing


def _block_grads(block, x, pos, use_checkpoint: bool):
    def run(h):
        out = block(h, position_embeddings=pos)
        return out[0] if isinstance(out, tuple) else out

    torch.manual_seed(123)  # the modules draw their dropout seeds from torch's CPU generator
    out = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False) if use_checkpoint else run(x)
    params = [p for p in block.parameters() if p.requires_grad]
    return out.detach(), torch.autograd.grad(out.square().sum(), [x, *params])


def test_gradient_checkpointing_replays_dropout_masks():
    need_family("lora")
    model = tiny_llama()
    adapted = adapt(model, "lora", target_modules="all-linear", r=4, alpha=8.0, dropout=0.3)
    randomize_adapters(adapted)
    adapted.train()
    block = model.model.layers[0]
    x = torch.randn(2, 7, 64, requires_grad=True)
    pos = model.model.rotary_emb(x, torch.arange(7)[None].expand(2, 7))
    out_plain, g_plain = _block_grads(block, x, pos, use_checkpoint=False)
    out_ckpt, g_ckpt = _block_grads(block, x, pos, use_checkpoint=True)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # dropout really was active: a different seed gives a different output
    torch.manual_seed(999)
    out_other = block(x, position_embeddings=pos)
    out_other = out_other[0] if isinstance(out_other, tuple) else out_other
    assert not torch.allclose(out_other, out_plain)


def test_hf_gradient_checkpointing_whole_model():
    """transformers' own ``gradient_checkpointing_enable`` on an adapted model gives the same grads."""
    need_family("lora")
    ids = batch()

    def run(ckpt: bool):
        model = tiny_llama()
        adapted = adapt(model, "lora", target_modules=["q_proj", "up_proj"], r=4, alpha=8.0, dropout=0.2)
        randomize_adapters(adapted)
        if ckpt:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        first = next(iter(adapted.adapted_modules().values()))
        first.register_forward_hook(lambda *_: calls.append(1))
        adapted.train()
        torch.manual_seed(5)
        adapted(input_ids=ids, labels=ids).loss.backward()
        # with checkpointing the layer's forward runs again during backward
        assert len(calls) == (2 if ckpt else 1)
        return {n: p.grad.clone() for n, p in adapted.named_trainable_parameters()}

    plain, ckpt = run(False), run(True)
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_sparse_checkpoint_with_invalid_mask_is_rejected(tmp_path):
    need_family("sparse")
    # an explicit mask (a tensor option) for one module: saved through the weights, not the json
    mask = torch.rand(32, 64, generator=torch.Generator().manual_seed(4)) < 0.03
    adapted = adapt(tiny_llama(), "sparse", target_modules=["model.layers.1.self_attn.v_proj"], mask=mask)
    randomize_adapters(adapted)
    adapted.save(tmp_path)
    fresh = load_adapted(tiny_llama(), tmp_path)
    module = fresh.adapted_modules()["model.layers.1.self_attn.v_proj"]
    torch.testing.assert_close(module.delta_weight() != 0, mask, rtol=0, atol=0)
    ids = batch()
    torch.testing.assert_close(fresh(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=0, atol=0)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = os.path.join(tmp_path, WEIGHTS_NAME)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    key = f"{PREFIX}model.layers.1.self_attn.v_proj.col"
    tensors[key] = tensors[key].clone()
    tensors[key][0] = 10_000  # a column far outside d_in
    save_file(tensors, path, metadata=meta)
    before = model_snapshot(adapted.model)
    with pytest.raises(CheckpointError, match=r"invalid sparse mask for model\.layers\.1\.self_attn\.v_proj: col"):
        adapted.load(tmp_path)
    assert_same_snapshot(before, model_snapshot(adapted.model))


def test_lora_native_format_and_no_load_into_merged(tmp_path):
    adapted = adapt(tiny_llama(), "lora", target_modules=["o_proj"], r=4, alpha=8.0)
    randomize_adapters(adapted)
    adapted.save(tmp_path, peft_format=False)
    cfg = json.load(open(os.path.join(tmp_path, CONFIG_NAME)))
    assert "peft_type" not in cfg and cfg["peft_kernels"]["family"] == "lora"
    assert cfg["peft_kernels"]["modules"]["model.layers.0.self_attn.o_proj"]["r"] == 4
    ids = batch()
    fresh = load_adapted(tiny_llama(), tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="peft_format=True needs method='lora'"):
        AdaptedModel(fresh.model, "monarch", {}, []).save(tmp_path, peft_format=True)
    # loading into merged adapters would leave their old change inside the base weights
    fresh.merge()
    before = model_snapshot(fresh.model)
    with pytest.raises(CheckpointError, match="call unmerge"):
        fresh.load(tmp_path)
    assert_same_snapshot(before, model_snapshot(fresh.model))


def test_sparse_mask_with_other_nnz_than_density_gives_is_rebuilt(tmp_path):
    """When the saved density no longer reproduces the mask's nnz (e.g. a mask chosen by hand), the
    loader rebuilds the module on the checkpoint's own (crow, col)."""
    need_family("sparse")
    adapted = adapt(tiny_llama(), "sparse", target_modules=["model.layers.0.self_attn.q_proj"], density=0.05)
    module = adapted.adapted_modules()["model.layers.0.self_attn.q_proj"]
    module.density = 0.01  # the config now describes a 5x smaller mask than the one saved
    randomize_adapters(adapted)
    adapted.save(tmp_path)
    fresh = load_adapted(tiny_llama(), tmp_path)
    got = fresh.adapted_modules()["model.layers.0.self_attn.q_proj"]
    assert torch.equal(got.col, module.col) and torch.equal(got.crow, module.crow)
    ids = batch()
    torch.testing.assert_close(fresh(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- merging: exactness, ties, flags


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_keep_original_then_unload_restores_bf16_exactly(method):
    need_family(method)
    model = tiny_llama().to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = adapt(model, method, target_modules=["q_proj", "down_proj"], **FAMILY_OPTIONS[method])
    randomize_adapters(adapted)
    adapted.merge(keep_original=True)
    adapted.unmerge()
    adapted.merge(keep_original=True)
    plain = adapted.unload()
    after = dict(plain.named_parameters())
    assert after.keys() == before.keys()
    for n, w in before.items():
        assert torch.equal(after[n], w), n


def test_merge_refuses_tied_weights_and_changes_nothing():
    """GPT-2's lm_head weight IS the token embedding: merging into it would change the embeddings."""
    model = tiny_gpt2()
    adapted = adapt(model, "lora", target_modules=["lm_head", "c_attn"], r=4)
    randomize_adapters(adapted)
    before = model_snapshot(model)
    match = r"the base weight of 'lm_head' shares its memory with transformer\.wte\.weight"
    with pytest.raises(ValueError, match=r"cannot merge: (.|\n)*" + match):
        adapted.merge()
    with pytest.raises(ValueError, match=r"cannot merge_and_unload: (.|\n)*" + match):
        adapted.merge_and_unload()
    assert not any(m.merged for m in adapted.adapted_modules().values())
    assert_same_snapshot(before, model_snapshot(model))
    # untied first (as the message says), the same adapters merge
    untied = tiny_gpt2()
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    ok = adapt(untied, "lora", target_modules=["lm_head"], r=4)
    randomize_adapters(ok)
    wte = untied.transformer.wte.weight.detach().clone()
    ok.merge()
    assert torch.equal(untied.transformer.wte.weight, wte)
    # weights packed side by side into one buffer share a storage but no memory: not tied
    packed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    flat = torch.randn(32)
    packed[0].weight = nn.Parameter(flat[:16].view(4, 4))
    packed[1].weight = nn.Parameter(flat[16:].view(4, 4))
    second = packed[1].weight.detach().clone()
    lora0 = adapt(packed, "lora", target_modules=["0"], r=2)
    randomize_adapters(lora0)
    lora0.merge()
    assert torch.equal(packed[1].weight, second)


def test_merge_and_unload_restores_trainability():
    """Like unload: every parameter, merged layers included, is as trainable as before adapt()."""
    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    adapted = adapt(model, "lora", target_modules=["q_proj"], r=4)
    plain = adapted.merge_and_unload()
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    # GPT-2: the Conv1D rebuilt from the merged layer, bias included
    gpt2 = tiny_gpt2()
    gpt2.transformer.h[0].attn.c_attn.bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in gpt2.named_parameters()}
    plain = adapt(gpt2, "lora", target_modules=["c_attn"], r=4).merge_and_unload()
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags


# ----------------------------------------------------------------------------- saving


def test_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """Both files are written before either replaces the old one: a failure while writing the
    second (here the config's fsync, as on a full disk) must not leave new weights beside the old
    config, and no temp file behind."""
    _saved_lora(tmp_path)
    old = {f: open(os.path.join(tmp_path, f), "rb").read() for f in (CONFIG_NAME, WEIGHTS_NAME)}
    other = adapt(tiny_llama(), "lora", target_modules=["q_proj", "v_proj"], r=4, alpha=32.0)
    randomize_adapters(other, seed=11)
    real_fsync, calls = os.fsync, []

    def failing_second_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_second_fsync)
    with pytest.raises(OSError, match="No space left"):
        other.save(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    for f, data in old.items():
        assert open(os.path.join(tmp_path, f), "rb").read() == data, f


@pytest.mark.parametrize("fresh_dir", [False, True])
def test_failed_second_rename_rolls_back_the_first(tmp_path, monkeypatch, fresh_dir):
    """The weights are renamed into place before the config: if the config's rename fails, the old
    weights come back (a new directory is left without the new weights), and nothing is left over."""
    target = tmp_path / "ckpt"
    if not fresh_dir:
        _saved_lora(target)
    old = {f: open(target / f, "rb").read() for f in (CONFIG_NAME, WEIGHTS_NAME)} if not fresh_dir else {}
    other = adapt(tiny_llama(), "lora", target_modules=["q_proj", "v_proj"], r=4, alpha=32.0)
    randomize_adapters(other, seed=11)
    real_replace = os.replace

    def failing_config_rename(src, dst):
        if str(dst).endswith(CONFIG_NAME) and ".tmp-" in str(src):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_config_rename)
    with pytest.raises(OSError, match="Input/output"):
        other.save(target)
    monkeypatch.undo()
    assert sorted(os.listdir(target)) == sorted(old)
    for f, data in old.items():
        assert open(target / f, "rb").read() == data, f


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_saved_files_follow_the_umask(tmp_path):
    adapted = adapt(tiny_llama(), "lora", target_modules=["q_proj"], r=4)
    for umask in (0o022, 0o027):
        old = os.umask(umask)
        try:
            adapted.save(tmp_path / oct(umask))
        finally:
            os.umask(old)
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            mode = os.stat(tmp_path / oct(umask) / f).st_mode & 0o777
            assert mode == 0o666 & ~umask, (f, oct(mode))


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.e2e
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", list(FAMILY_OPTIONS))
def test_family_on_gpu_matches_the_torch_path(method, dtype, monkeypatch, tmp_path):
    """A whole model on the GPU: the default dispatch (the fused kernels) gives the torch path's
    logits, loss and adapter gradients (same weights, dropout off), trains, and saves/loads exactly.
    This is where module-level GPU problems would show (devices of seeds and masks, dtypes, caches)."""
    need_family(method)
    dev = torch.device("cuda")
    model = tiny_llama().to(dev, dtype)
    adapted = adapt(model, method, target_modules=["q_proj", "v_proj", "down_proj"], **FAMILY_OPTIONS[method])
    randomize_adapters(adapted)
    ids = batch().to(dev)
    adapted.train()

    def run():
        for p in adapted.trainable_parameters():
            p.grad = None
        out = adapted(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach().float(), out.loss.detach().float(), [
            p.grad.detach().float().clone() for p in adapted.trainable_parameters()]

    logits, loss, grads = run()
    monkeypatch.setenv("PEFT_KERNELS_IMPL", "torch")
    logits_t, loss_t, grads_t = run()
    monkeypatch.delenv("PEFT_KERNELS_IMPL")
    # bf16: both paths round differently at every step (this check, run on the CPU under the
    # interpreter with the Triton path forced, gave up to 6% of the largest gradient for Lily); it is
    # here to catch a wrong or missing term, which is O(1)
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float32 else dict(rtol=0.1, atol=0.1)
    torch.testing.assert_close(logits, logits_t, **tol)
    torch.testing.assert_close(loss, loss_t, **tol)
    for g, gt in zip(grads, grads_t):
        scale = max(gt.abs().max().item(), 1e-6)
        torch.testing.assert_close(g / scale, gt / scale, **tol)

    losses = train_steps(adapted, ids, 4)
    assert losses[-1] < losses[0], f"{method}: loss did not decrease: {losses}"
    adapted.eval()
    ref = adapted(input_ids=ids).logits.detach()
    adapted.save(tmp_path)
    fresh = load_adapted(tiny_llama(seed=0).to(dev, dtype), tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(FAMILY_OPTIONS))
def test_fp32_adapters_on_a_bf16_model_train_and_round_trip(method, tmp_path):
    """Every family with the default ``adapter_dtype="auto"`` on a bf16 model: fp32 adapter weights
    (PEFT's default), bf16 activations, fp32 gradients, a training step that lowers the loss, and a
    checkpoint that reloads in the same dtypes; Lily's shared projectors stay shared Parameters."""
    need_family(method)
    model = tiny_llama().to(torch.bfloat16)
    adapted = adapt(model, method, target_modules=["q_proj", "v_proj", "up_proj"], **FAMILY_OPTIONS[method])
    params = adapted.trainable_parameters()
    assert {p.dtype for p in params if p.is_floating_point()} == {torch.float32}
    if method == "lily":  # the cast is in place: a group's layers still hold one HP Parameter
        mods = adapted.adapted_modules()
        assert mods["model.layers.0.self_attn.q_proj"].hp is mods["model.layers.1.self_attn.q_proj"].hp
    randomize_adapters(adapted, std=0.05)
    ids = batch()
    adapted.train()
    out = adapted(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    losses = train_steps(adapted, ids, 4)
    assert losses[-1] < losses[0]
    adapted.eval()
    expected = adapted(input_ids=ids).logits
    adapted.save(tmp_path)
    again = load_adapted(tiny_llama().to(torch.bfloat16), tmp_path).eval()
    assert again.adapter_dtype == "auto"
    assert [p.dtype for p in again.trainable_parameters()] == [p.dtype for p in params]
    torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_adapter_dtype_is_saved_with_the_adapter(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    adapted = adapt(model, "monarch", target_modules=["q_proj"], adapter_dtype=torch.bfloat16, **FAMILY_OPTIONS["monarch"])
    assert adapted.adapter_dtype == "bfloat16"
    assert {p.dtype for p in adapted.trainable_parameters()} == {torch.bfloat16}
    adapted.save(tmp_path)
    again = load_adapted(tiny_llama().to(torch.bfloat16), tmp_path)
    assert {p.dtype for p in again.trainable_parameters()} == {torch.bfloat16}
    # LoRA saves a PEFT checkpoint by default, whose json has no such field: our header keeps it
    lora = adapt(tiny_llama().to(torch.bfloat16), "lora", target_modules=["q_proj"], r=4, adapter_dtype="base")
    lora.save(tmp_path / "lora")
    again = load_adapted(tiny_llama().to(torch.bfloat16), tmp_path / "lora")
    assert again.adapter_dtype == "base"
    assert {p.dtype for p in again.trainable_parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- switching adapters off


@pytest.mark.parametrize("method", sorted(FAMILY_OPTIONS))
def test_disable_adapter_runs_the_base_model_and_restores(method):
    """``with handle.disable_adapter():`` is the frozen model exactly (forward, and no gradient
    reaches the adapters), and everything is as before afterwards, also after an exception."""
    need_family(method)
    ids = batch()
    base_model = tiny_llama()
    base_out = base_model(input_ids=ids).logits.detach()
    adapted = adapt(tiny_llama(), method, target_modules=["q_proj", "v_proj", "down_proj"], **FAMILY_OPTIONS[method])
    randomize_adapters(adapted)
    adapted_out = adapted(input_ids=ids).logits.detach()
    assert (adapted_out - base_out).abs().max() > 1e-3  # the adapters do change the output
    with adapted.disable_adapter() as handle:
        assert handle is adapted
        assert all(m.disable_adapters for m in adapted.adapted_modules().values())
        out = adapted(input_ids=ids).logits
        torch.testing.assert_close(out.detach(), base_out, rtol=0, atol=0)
        assert not out.requires_grad  # nothing trainable took part (adapt froze everything else)
    assert not any(m.disable_adapters for m in adapted.adapted_modules().values())
    torch.testing.assert_close(adapted(input_ids=ids).logits.detach(), adapted_out, rtol=0, atol=0)
    with pytest.raises(KeyError):
        with adapted.disable_adapter():
            raise KeyError("inside")
    torch.testing.assert_close(adapted(input_ids=ids).logits.detach(), adapted_out, rtol=0, atol=0)
    # the layer-level switch (PEFT's names); a layer switched off before the context stays off after it
    first = next(iter(adapted.adapted_modules().values()))
    first.enable_adapters(False)
    with adapted.disable_adapter():
        pass
    assert first.disable_adapters
    adapted.enable_adapter_layers()
    torch.testing.assert_close(adapted(input_ids=ids).logits.detach(), adapted_out, rtol=0, atol=0)
    adapted.disable_adapter_layers()
    torch.testing.assert_close(adapted(input_ids=ids).logits.detach(), base_out, rtol=0, atol=0)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        first.enable_adapters(1)
    if method in MERGEABLE:
        with pytest.raises(RuntimeError, match="disabled adapters"):
            adapted.merge()
        with pytest.raises(RuntimeError, match="enable_adapters"):
            first.merge()
        assert not any(m.merged for m in adapted.adapted_modules().values())


@pytest.mark.parametrize("method", MERGEABLE)
def test_disable_adapter_on_a_merged_model(method):
    """A merged model is unmerged inside the context and merged again on exit (bit-exact with
    ``keep_original=True``); the layer-level switch unmerges with a warning, like PEFT's."""
    need_family(method)
    ids = batch()
    base_out = tiny_llama()(input_ids=ids).logits.detach()
    adapted = adapt(tiny_llama(), method, target_modules=["q_proj", "down_proj"], **FAMILY_OPTIONS[method])
    randomize_adapters(adapted)
    adapted.merge(keep_original=True)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in adapted.adapted_modules().items()}
    merged_out = adapted(input_ids=ids).logits.detach()
    with adapted.disable_adapter():
        assert not any(m.merged for m in adapted.adapted_modules().values())
        torch.testing.assert_close(adapted(input_ids=ids).logits.detach(), base_out, rtol=0, atol=0)
    for n, m in adapted.adapted_modules().items():
        assert m.merged and m.keeps_original
        assert torch.equal(m.base_layer.weight, weights[n])
    torch.testing.assert_close(adapted(input_ids=ids).logits.detach(), merged_out, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="unmerging"):
        adapted.disable_adapter_layers()
    assert not any(m.merged for m in adapted.adapted_modules().values())
    torch.testing.assert_close(adapted(input_ids=ids).logits.detach(), base_out, rtol=0, atol=0)


def test_disable_adapter_under_torch_compile():
    """A compiled model follows the switch (dynamo guards on it) instead of replaying the graph
    traced with the adapters on."""
    ids = batch()
    base_out = tiny_llama()(input_ids=ids).logits.detach()
    adapted = adapt(tiny_llama(), "lora", target_modules=["q_proj", "v_proj"], **FAMILY_OPTIONS["lora"])
    randomize_adapters(adapted)
    eager = adapted(input_ids=ids).logits.detach()
    compiled = torch.compile(adapted.model, backend="aot_eager")
    torch.testing.assert_close(compiled(input_ids=ids).logits.detach(), eager, rtol=1e-5, atol=1e-5)
    with adapted.disable_adapter():
        torch.testing.assert_close(compiled(input_ids=ids).logits.detach(), base_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(input_ids=ids).logits.detach(), eager, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- modules_to_save


def _cls_steps(adapted, ids, steps=3):
    labels = torch.tensor([0, 2])
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    for _ in range(steps):
        loss = adapted(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("method", ["lora", "monarch"])
def test_modules_to_save_train_save_load_unload(method, tmp_path):
    """A task head trained in full beside the adapters: only its copy trains, it is saved with the
    adapter (PEFT's keys) and reloaded exactly; disable_adapter and unload give the original head
    back, merge_and_unload keeps the trained one."""
    need_family(method)
    ids = batch()
    model = tiny_bert_cls()
    head = model.classifier
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    original_w = head.weight.detach().clone()
    adapted = adapt(model, method, target_modules=["query", "value"], modules_to_save=["classifier"],
                    **FAMILY_OPTIONS[method])
    assert list(adapted.modules_to_save()) == ["classifier"] and model.classifier.original_module is head
    assert model.classifier.out_features == 3 and model.classifier.weight is model.classifier.trained_module.weight
    _cls_steps(adapted, ids)
    assert torch.equal(head.weight, original_w)  # the original never trains
    assert not torch.equal(model.classifier.trained_module.weight, original_w)
    want = adapted(input_ids=ids).logits.detach()
    adapted.save(tmp_path)
    fresh = load_adapted(tiny_bert_cls(), tmp_path)
    assert list(fresh.modules_to_save()) == ["classifier"]
    torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=0, atol=0)
    again = adapt(tiny_bert_cls(), method, target_modules=["query", "value"], modules_to_save=["classifier"],
                  **FAMILY_OPTIONS[method]).load(tmp_path)
    torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=0, atol=0)
    # (ours names them: "differ"; a PEFT json holds patterns, so its head's keys are "unexpected")
    with pytest.raises(CheckpointError, match="modules to save differ|unexpected keys.*classifier"):
        adapt(tiny_bert_cls(), method, target_modules=["query", "value"], **FAMILY_OPTIONS[method]).load(tmp_path)
    base_out = tiny_bert_cls()(input_ids=ids).logits
    with fresh.disable_adapter():
        torch.testing.assert_close(fresh(input_ids=ids).logits, base_out, rtol=0, atol=0)
    merged = fresh.merge_and_unload()
    assert type(merged.classifier) is nn.Linear
    torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    trained = model.classifier.trained_module
    restored = adapted.unload()  # as PEFT's unload: adapters gone, the trained head stays
    assert restored.classifier is trained and not torch.equal(trained.weight, original_w)
    assert {n: p.requires_grad for n, p in restored.named_parameters()} == flags


def test_modules_to_save_checkpoint_errors(tmp_path):
    adapted = adapt(tiny_bert_cls(), "lora", target_modules=["query"], r=4, alpha=8, modules_to_save=["classifier"])
    adapted.save(tmp_path, peft_format=False)
    # the checkpoint's head tensor is missing: one clear error, model untouched
    from safetensors.torch import load_file, save_file
    w = tmp_path / WEIGHTS_NAME
    tensors = load_file(str(w))
    del tensors[f"{PREFIX}classifier.bias"]
    save_file(tensors, str(w), metadata={"peft_kernels": json.dumps(json.load(open(tmp_path / CONFIG_NAME))["peft_kernels"])})
    model = tiny_bert_cls()
    snap = model_snapshot(model)
    with pytest.raises(CheckpointError, match="missing keys.*classifier.bias"):
        load_adapted(model, tmp_path)
    assert_same_snapshot(model_snapshot(model), snap)


def test_modules_to_save_bad_requests_are_clear_errors():
    with pytest.raises(ValueError, match=r"modules_to_save \['nope'\] match no module"):
        adapt(tiny_bert_cls(), "lora", target_modules=["query"], r=4, modules_to_save=["nope"])
    with pytest.raises(ValueError, match="nothing left to adapt"):
        adapt(tiny_bert_cls(), "lora", target_modules=["query"], r=4, modules_to_save=["attention.self"])
    with pytest.raises(TypeError, match="list of module names"):
        adapt(tiny_bert_cls(), "lora", target_modules=["query"], r=4, modules_to_save=[3])
    model = tiny_gpt2()  # lm_head is tied to the input embeddings
    snap = model_snapshot(model)
    with pytest.raises(ValueError, match="tied weights"):
        adapt(model, "lora", target_modules=["c_attn"], r=4, modules_to_save=["lm_head"])
    assert_same_snapshot(model_snapshot(model), snap)


def test_peft_method_names_on_the_handle(tmp_path):
    """PEFT's names reach the adapter, not the wrapped transformers model: save_pretrained writes
    the adapter checkpoint (the model's own method would write the whole model)."""
    adapted = adapt(tiny_llama(), "lora", target_modules=["q_proj"], r=4, alpha=8)
    adapted.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert adapted.get_base_model() is adapted.model
    assert adapted.get_nb_trainable_parameters() == adapted.count_parameters()
    with pytest.raises(TypeError, match="unsupported options"):
        adapted.save_pretrained(tmp_path, save_embedding_layers=True)


def test_quantized_style_linear_is_refused_clearly():
    """An nn.Linear subclass holding a packed integer weight (as bitsandbytes' 4/8-bit layers do)
    is refused by name instead of being read as a float matrix."""
    class Packed(nn.Linear):
        def __init__(self):
            super().__init__(8, 6, bias=False)
            self.weight = nn.Parameter(torch.zeros(24, 1, dtype=torch.uint8), requires_grad=False)

    model = nn.Sequential(Packed())
    with pytest.raises(TypeError, match="quantized base layers are not supported"):
        adapt(model, "lora", target_modules=["0"], r=2)
    assert type(model[0]) is Packed


def test_targets_inside_a_module_to_save_are_left_to_it():
    """PEFT's rule: all-linear on a classification model with modules_to_save=["classifier"]
    trains the classifier in full and adapts every other linear (not the classifier again)."""
    adapted = adapt(tiny_bert_cls(), "lora", target_modules="all-linear", r=4, modules_to_save={"classifier"})
    assert "classifier" not in adapted.adapted_modules() and list(adapted.modules_to_save()) == ["classifier"]
    assert len(adapted.adapted_modules()) == 2 * 6 + 1  # 6 linears per BERT layer + the pooler


def test_unload_inside_disable_adapter_leaves_the_unloaded_model_alone():
    ids = batch()
    adapted = adapt(tiny_llama(), "lora", target_modules=["q_proj"], r=4, alpha=8)
    randomize_adapters(adapted)
    adapted.merge(keep_original=True)
    with adapted.disable_adapter():
        plain = adapted.unload()
    torch.testing.assert_close(plain(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits, rtol=0, atol=0)


def test_t5_reads_weight_off_the_adapted_layer():
    """T5's feed-forward reads ``self.wo.weight.dtype``: adapted layers expose the base layer's
    ``weight``/``bias``, as PEFT's layers do."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = batch()
    want = model(input_ids=ids, labels=ids).logits.detach()
    adapted = adapt(model, "lora", target_modules="all-linear", r=4, alpha=8)
    wo = adapted.model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight is wo.base_layer.weight and wo.bias is None
    torch.testing.assert_close(adapted(input_ids=ids, labels=ids).logits, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- several adapters


def test_several_adapters_switch_train_save_load(tmp_path):
    """add_adapter / set_adapter / delete_adapter (PEFT's names): each adapter keeps its own
    parameters and settings, switching swaps modules (an optimizer over one adapter stays valid),
    layers only another adapter targets run their plain base layer, and unload restores the model."""
    ids = batch()
    base_out = tiny_llama()(input_ids=ids).logits.detach()
    adapted = adapt(tiny_llama(), "lora", target_modules=["q_proj", "v_proj"], r=4, alpha=8.0)
    randomize_adapters(adapted)
    a_params = adapted.trainable_parameters()
    a_out = adapted(input_ids=ids).logits.detach()
    adapted.add_adapter("mon", method="monarch", target_modules=["k_proj", "v_proj"], nblocks=4, blk_r=2)
    assert adapted.adapters == ["default", "mon"] and adapted.active_adapter == "default"
    torch.testing.assert_close(adapted(input_ids=ids).logits, a_out, rtol=0, atol=0)  # not activated by adding
    adapted.set_adapter("mon")
    assert sorted(adapted.adapted_modules()) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
                                                 "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    assert type(adapted.model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(adapted(input_ids=ids).logits, base_out, rtol=0, atol=0)  # MoRe starts at zero
    train_steps(adapted, ids, 2)  # trains "mon" only
    m_out = adapted(input_ids=ids).logits.detach()
    adapted.set_adapter("default")
    assert all(p is q for p, q in zip(adapted.trainable_parameters(), a_params))
    torch.testing.assert_close(adapted(input_ids=ids).logits, a_out, rtol=0, atol=0)
    adapted.save_pretrained(tmp_path)  # PEFT's layout: default at the root, others in a folder each
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME, "mon"]
    fresh = load_adapted(tiny_llama(), tmp_path)
    fresh.load_adapter(tmp_path / "mon", "mon")
    torch.testing.assert_close(fresh(input_ids=ids).logits, a_out, rtol=0, atol=0)
    fresh.set_adapter("mon")
    torch.testing.assert_close(fresh(input_ids=ids).logits, m_out, rtol=0, atol=0)
    # a bad checkpoint loads nothing and changes nothing
    with pytest.raises(CheckpointError):
        fresh.load_adapter(tmp_path / "missing", "other")
    assert fresh.adapters == ["mon", "default"]
    with pytest.raises(ValueError, match="exists already"):
        fresh.add_adapter("default")
    with pytest.raises(ValueError, match="no adapter named"):
        fresh.set_adapter("nope")
    fresh.delete_adapter("mon")  # the active one: "default" takes over
    assert fresh.adapters == ["default"]
    torch.testing.assert_close(fresh(input_ids=ids).logits, a_out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="only adapter"):
        fresh.delete_adapter("default")
    plain = adapted.unload()
    torch.testing.assert_close(plain(input_ids=ids).logits, base_out, rtol=0, atol=0)
    assert not any(_is_adapter_module(m) for m in plain.modules())


def _is_adapter_module(m):
    return "base_layer" in m._modules or "original_module" in m._modules


def test_several_adapters_heads_merge_and_gpt2_conv1d(tmp_path):
    ids = batch()
    # each adapter has its own trained head; switching swaps the head too
    adapted = adapt(tiny_bert_cls(), "lora", target_modules=["query"], r=4, modules_to_save=["classifier"])
    randomize_adapters(adapted)
    a_out = adapted(input_ids=ids).logits.detach()
    adapted.add_adapter("b", modules_to_save=["classifier"])
    adapted.set_adapter("b")
    assert adapted.model.classifier.original_module is adapted._inactive["default"]["to_save"]["classifier"].original_module
    torch.testing.assert_close(adapted(input_ids=ids).logits, tiny_bert_cls()(input_ids=ids).logits, rtol=0, atol=0)
    adapted.set_adapter("default")
    torch.testing.assert_close(adapted(input_ids=ids).logits, a_out, rtol=0, atol=0)
    # switching away from a merged adapter unmerges it first
    adapted.merge(keep_original=True)
    with pytest.warns(UserWarning, match="unmerging"):
        adapted.set_adapter("b")
    adapted.set_adapter("default")
    torch.testing.assert_close(adapted(input_ids=ids).logits, a_out, rtol=1e-6, atol=1e-6)
    # GPT-2: a Conv1D adapted only by the inactive adapter is a Conv1D again after unload
    conv1d = transformers.pytorch_utils.Conv1D
    g = adapt(tiny_gpt2(), "lora", target_modules=["c_attn"], r=4)
    g.add_adapter("mlp", target_modules=["c_fc"], r=2)
    g.set_adapter("mlp")
    assert g.model.transformer.h[0].mlp.c_fc.weight.shape == (32, 128) or True
    out = g.unload()
    assert isinstance(out.transformer.h[0].mlp.c_fc, conv1d) and isinstance(out.transformer.h[0].attn.c_attn, conv1d)
    torch.testing.assert_close(out(input_ids=ids).logits, tiny_gpt2()(input_ids=ids).logits, rtol=0, atol=0)


def test_several_adapters_follow_mode_switch_state_and_fail_cleanly():
    ids = batch()
    base_out = tiny_llama()(input_ids=ids).logits.detach()
    adapted = adapt(tiny_llama(), "lora", target_modules=["q_proj", "v_proj"], r=4, alpha=8.0, dropout=0.5)
    adapted.add_adapter("b", r=2, alpha=4.0, dropout=0.5)
    randomize_adapters(adapted)
    adapted.model.eval()  # eval() on the model, then the switch: b's layers run without dropout
    adapted.set_adapter("b")
    assert not any(m.training for m in adapted.adapted_modules().values())
    randomize_adapters(adapted)
    b_out = adapted(input_ids=ids).logits.detach()
    torch.testing.assert_close(adapted(input_ids=ids).logits, b_out, rtol=0, atol=0)
    # the handle's off state holds across switches (as in PEFT); a switch inside the context is undone
    adapted.disable_adapter_layers()
    adapted.set_adapter("default")
    torch.testing.assert_close(adapted(input_ids=ids).logits, base_out, rtol=0, atol=0)
    adapted.enable_adapter_layers()
    a_out = adapted(input_ids=ids).logits.detach()
    with adapted.disable_adapter():
        adapted.set_adapter("b")
        torch.testing.assert_close(adapted(input_ids=ids).logits, base_out, rtol=0, atol=0)
    torch.testing.assert_close(adapted(input_ids=ids).logits, b_out, rtol=0, atol=0)
    adapted.set_adapter("default")
    torch.testing.assert_close(adapted(input_ids=ids).logits, a_out, rtol=0, atol=0)
    # a failed add changes nothing; a head holding the active adapter's layers is refused
    flags = {n: p.requires_grad for n, p in adapted.model.named_parameters()}
    with pytest.raises(TypeError):
        adapted.add_adapter("bad", nope=1)
    assert adapted.adapters == ["default", "b"]
    assert {n: p.requires_grad for n, p in adapted.model.named_parameters()} == flags
    with pytest.raises(ValueError, match="overlaps the adapted layer"):
        adapted.add_adapter("head", modules_to_save=["self_attn"])
    with pytest.raises(TypeError, match="method name"):
        adapted.add_adapter("cfg", {"r": 4})


def test_several_adapters_on_gpt2_follow_model_casts_and_delete_restores():
    """The model is cast while an adapter over a Conv1D is switched out: switching it in uses the
    cast weights; deleting an adapter gives back the Conv1D only it covered, trainable as before."""
    ids = batch()
    model = tiny_gpt2()
    adapted = adapt(model, "lora", target_modules=["c_attn"], r=4)
    adapted.add_adapter("mlp", target_modules=["c_fc"], r=2)
    randomize_adapters(adapted)
    adapted.model.double()
    adapted.set_adapter("mlp")
    out = adapted(input_ids=ids).logits
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, tiny_gpt2().double()(input_ids=ids).logits, rtol=1e-12, atol=1e-12)  # B is zero
    adapted.set_adapter("default")
    adapted.delete_adapter("mlp")
    conv1d = transformers.pytorch_utils.Conv1D
    fc = adapted.model.transformer.h[0].mlp.c_fc
    assert type(fc) is conv1d and fc.weight.is_contiguous() and fc.weight.dtype == torch.float64
    plain = adapted.unload()
    assert all(p.requires_grad for p in plain.parameters())


def test_handle_casts_and_counts_reach_inactive_adapters():
    adapted = adapt(tiny_llama(), "lora", target_modules=["q_proj"], r=4)
    trainable, total = adapted.count_parameters()
    adapted.add_adapter("b", r=2)
    extra = sum(p.numel() for m in adapted._inactive["b"]["modules"].values()
                for k, p in m.named_parameters() if not k.startswith("base_layer."))
    assert adapted.count_parameters() == (trainable, total + extra)
    adapted.double()
    assert all(p.dtype == torch.float64 for m in adapted._inactive["b"]["modules"].values() for p in m.parameters())
    adapted.set_adapter("b")
    assert adapted(input_ids=batch()).logits.dtype == torch.float64


def test_accelerate_offloaded_layers_are_refused_clearly():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(TypeError, match="offloaded by accelerate"):
        adapt(model, "lora", target_modules=["q_proj"], r=4)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def _several_adapters_journey(dev: torch.device, tmp_path) -> None:
    """Two adapters of different families, each with its own head, built on the CPU; the model
    alone is then moved to ``dev`` (the inactive adapter follows when switched in); both give
    their CPU logits there, and save_pretrained / load_adapter round-trip on ``dev``."""
    ids = batch()
    adapted = adapt(tiny_bert_cls(), "lora", target_modules=["query", "value"], r=4, modules_to_save=["classifier"])
    adapted.add_adapter("b", method="monarch", target_modules=["key"], nblocks=4, blk_r=2,
                        modules_to_save=["classifier"])
    randomize_adapters(adapted, seed=3)
    want_a = adapted(input_ids=ids).logits.detach()
    adapted.set_adapter("b")
    randomize_adapters(adapted, seed=4)
    want_b = adapted(input_ids=ids).logits.detach()
    adapted.set_adapter("default")
    adapted.model.to(dev)
    ids = ids.to(dev)
    tol = dict(rtol=2e-3, atol=2e-3)  # as the GPU family test: fused fp32 kernels vs the torch path
    torch.testing.assert_close(adapted(input_ids=ids).logits.cpu(), want_a, **tol)
    adapted.set_adapter("b")
    assert all(p.device.type == dev.type for p in adapted.model.parameters())
    torch.testing.assert_close(adapted(input_ids=ids).logits.cpu(), want_b, **tol)
    adapted.save_pretrained(tmp_path)
    fresh = load_adapted(tiny_bert_cls().to(dev), tmp_path)
    fresh.load_adapter(tmp_path / "b", "b")
    torch.testing.assert_close(fresh(input_ids=ids).logits.cpu(), want_a, **tol)
    fresh.set_adapter("b")
    torch.testing.assert_close(fresh(input_ids=ids).logits.cpu(), want_b, **tol)


def test_several_adapters_journey_cpu(tmp_path):
    _several_adapters_journey(torch.device("cpu"), tmp_path)


@pytest.mark.gpu
@pytest.mark.e2e
def test_several_adapters_journey_gpu(tmp_path):
    """The same on the GPU: the switched-in adapter and its head follow the model's device, and the
    fused kernels give the CPU (torch path) logits."""
    _several_adapters_journey(torch.device("cuda"), tmp_path)
