"""HF PEFT interop for LoRA, both ways, on tiny locally built models (no downloads).

- PEFT writes (``save_pretrained``) -> we load (``load_peft_checkpoint`` / ``load_adapted``);
- we write (``AdaptedModel.save``) -> PEFT loads (``PeftModel.from_pretrained``);
- a live PEFT model is converted in place (``from_peft_model``).
Each compares logits with the PEFT model's own, bit for bit where the math is the same.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft_kernels.adapters import (CONFIG_NAME, AdaptedModel, CheckpointError, adapt, from_peft_model,  # noqa: E402
                                   load_adapted, load_peft_checkpoint)
from peft_kernels.modules.lora import LoRALinear  # noqa: E402

from tiny_models import VOCAB, tiny_bert_cls, tiny_gpt2, tiny_llama  # noqa: E402
TOL = dict(rtol=1e-5, atol=1e-5)  # same math, different op order (fused vs two matmuls)


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def randomize(params, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_lora(model, **cfg):
    """A PEFT LoRA model with non-trivial adapter weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(**cfg))
    randomize([p for n, p in pm.named_parameters() if "lora_" in n])
    return pm.eval()


@pytest.mark.parametrize("variant", ["plain", "patterns_rslora_layers"])
def test_peft_checkpoint_loads_into_our_modules(variant, tmp_path):
    if variant == "plain":
        cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1)
    else:  # per-module ranks/alphas, rsLoRA and a layer subset: everything that changes scaling or shapes
        cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], use_rslora=True,
                   rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 5}, layers_to_transform=[1])
    pm = peft_lora(tiny_llama(), **cfg)
    expected = pm(input_ids=IDS).logits.detach()
    pm.save_pretrained(tmp_path)

    adapted = load_peft_checkpoint(tiny_llama(), tmp_path).eval()
    assert isinstance(adapted, AdaptedModel) and adapted.method == "lora"
    mods = adapted.adapted_modules()
    assert all(isinstance(m, LoRALinear) for m in mods.values())
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted(mods) == peft_names
    if variant != "plain":
        o = mods["model.layers.1.self_attn.o_proj"]
        u = mods["model.layers.1.mlp.up_proj"]
        assert (o.r, u.alpha, o.use_rslora) == (2, 5.0, True)
    torch.testing.assert_close(adapted(input_ids=IDS).logits, expected, **TOL)
    if variant == "plain":  # loading the same directory into an already adapted model works as well
        again = adapt(tiny_llama(), "lora", target_modules=list(mods), r=4, alpha=8.0, dropout=0.1).eval()
        again.load(tmp_path)
        torch.testing.assert_close(again(input_ids=IDS).logits, expected, **TOL)


def test_our_checkpoint_loads_in_peft(tmp_path):
    adapted = adapt(tiny_llama(), "lora", target_modules=["k_proj", "gate_proj"], layers=[0], r=4, alpha=12.0)
    randomize(adapted.trainable_parameters())
    adapted.eval()
    expected = adapted(input_ids=IDS).logits.detach()
    adapted.save(tmp_path)
    cfg = peft.LoraConfig.from_pretrained(str(tmp_path))  # a valid PEFT LoraConfig, no warnings needed
    assert (cfg.peft_type, cfg.r, cfg.lora_alpha, cfg.bias) == (peft.PeftType.LORA, 4, 12, "none")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "unexpected keyword arguments" or missing keys
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    lora_layers = sorted(n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert lora_layers == ["base_model.model.model.layers.0.mlp.gate_proj", "base_model.model.model.layers.0.self_attn.k_proj"]
    torch.testing.assert_close(pm(input_ids=IDS).logits, expected, **TOL)
    # the json is still readable by us after PEFT read it, and our metadata rides in the safetensors header
    again = load_adapted(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(again(input_ids=IDS).logits, expected, rtol=0, atol=0)


def test_mixed_ranks_written_as_rank_pattern(tmp_path):
    model = tiny_llama()
    a = adapt(model, "lora", target_modules=["q_proj"], r=4, alpha=8.0)
    # swap one layer for a rank-2 module with another alpha, as a loaded PEFT rank_pattern would give
    name = "model.layers.1.self_attn.q_proj"
    base = a.adapted_modules()[name].base_layer
    model.model.layers[1].self_attn.q_proj = LoRALinear.from_linear(base, r=2, alpha=3.0)
    randomize(a.trainable_parameters())
    a.eval()
    expected = a(input_ids=IDS).logits.detach()
    a.save(tmp_path)
    cfg = json.load(open(os.path.join(tmp_path, CONFIG_NAME)))
    assert cfg["rank_pattern"] == {name: 2} and cfg["alpha_pattern"] == {name: 3}
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(pm(input_ids=IDS).logits, expected, **TOL)


def test_from_live_peft_model_converts_in_place():
    pm = peft_lora(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
    expected = pm(input_ids=IDS).logits.detach()
    peft_weights = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    adapted = from_peft_model(pm).eval()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in adapted.model.modules())
    mods = adapted.adapted_modules()
    assert len(mods) == 4 and all(isinstance(m, LoRALinear) and m.dropout == 0.05 for m in mods.values())
    for name, m in mods.items():
        torch.testing.assert_close(m.lora_A.weight, peft_weights[f"base_model.model.{name}.lora_A.default.weight"],
                                   rtol=0, atol=0)
    torch.testing.assert_close(adapted(input_ids=IDS).logits, expected, **TOL)
    assert {n for n, _ in adapted.named_trainable_parameters()} == {
        f"{n}.{w}.weight" for n in mods for w in ("lora_A", "lora_B")}


def test_gpt2_conv1d_round_trips_with_peft(tmp_path):
    pm = peft_lora(tiny_gpt2(), r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    expected = pm(input_ids=IDS).logits.detach()
    pm.save_pretrained(tmp_path / "peft")
    ours = load_peft_checkpoint(tiny_gpt2(), tmp_path / "peft").eval()
    torch.testing.assert_close(ours(input_ids=IDS).logits, expected, **TOL)
    ours.save(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(back(input_ids=IDS).logits, expected, **TOL)
    live = from_peft_model(peft_lora(tiny_gpt2(), r=4, lora_alpha=8, target_modules=["c_fc"], fan_in_fan_out=True))
    assert len(live.adapted_modules()) == 2


def test_unsupported_peft_features_are_clear_errors(tmp_path):
    pm = peft_lora(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA is not supported"):
        from_peft_model(pm)
    pm.save_pretrained(tmp_path)
    fresh = tiny_llama()
    with pytest.raises(CheckpointError, match=r"use_dora=true \(DoRA\) is not supported"):
        load_peft_checkpoint(fresh, tmp_path)
    assert not any(hasattr(m, "base_layer") for m in fresh.modules())


# PEFT options that make PEFT compute (or, on load, rebuild) something a plain LoRA layer does not:
# refused by name, by the checkpoint loader and by the live conversion alike
REFUSED = {
    "pissa": (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa' is not supported"),  # rewrites W on load
    "olora": (dict(init_lora_weights="olora"), r"init_lora_weights='olora' is not supported"),
    "alora": (dict(task_type="CAUSAL_LM", alora_invocation_tokens=[5, 6]),
              r"alora_invocation_tokens=\[5, 6\] is not supported"),
    "layer_replication": (dict(layer_replication=[[0, 2], [1, 2]]), r"layer_replication=\[\[0, 2\], \[1, 2\]\] is not"),
    "mica": (dict(init_lora_weights="mica"), r"init_lora_weights='mica' is not supported"),  # freezes lora_B
}


@pytest.mark.parametrize("variant", list(REFUSED))
def test_peft_variants_are_refused_not_loaded_as_plain_lora(variant, tmp_path):
    extra, match = REFUSED[variant]
    pm = peft_lora(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj"], **extra)
    pm.save_pretrained(tmp_path)
    fresh = tiny_llama()
    with pytest.raises(CheckpointError, match=match):
        load_peft_checkpoint(fresh, tmp_path)
    assert not any(hasattr(m, "base_layer") for m in fresh.modules())
    with pytest.raises(ValueError, match=r"adapter 'default': " + match):
        from_peft_model(pm)


def _plain_peft_checkpoint(tmp_path):
    pm = peft_lora(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj"])
    pm.save_pretrained(tmp_path)
    return pm(input_ids=IDS).logits.detach()


def _edit_config(tmp_path, **fields) -> None:
    path = os.path.join(tmp_path, CONFIG_NAME)
    cfg = json.load(open(path))
    cfg.update(fields)
    json.dump(cfg, open(path, "w"))


def test_unknown_peft_fields_must_be_unset(tmp_path, monkeypatch):
    """An option this PEFT version does not know (a newer PEFT's variant) passes only while unset;
    without peft installed, a plain PEFT json must still load (every field then only unset)."""
    expected = _plain_peft_checkpoint(tmp_path)
    import peft_kernels.adapters as adapters

    monkeypatch.setattr(adapters, "_peft_lora_defaults", lambda: {})
    torch.testing.assert_close(load_peft_checkpoint(tiny_llama(), tmp_path)(input_ids=IDS).logits, expected, **TOL)
    monkeypatch.undo()
    _edit_config(tmp_path, future_variant_config=None, use_future_variant=False)
    torch.testing.assert_close(load_peft_checkpoint(tiny_llama(), tmp_path)(input_ids=IDS).logits, expected, **TOL)
    _edit_config(tmp_path, future_variant_config={"k": 2})
    with pytest.raises(CheckpointError, match=r"future_variant_config=\{'k': 2\} is not supported .*None/false/empty"):
        load_peft_checkpoint(tiny_llama(), tmp_path)


def test_from_peft_model_refuses_trained_biases():
    pm = peft_lora(tiny_gpt2(), r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only", fan_in_fan_out=True)
    with pytest.raises(ValueError, match=r"bias='lora_only'.*only bias='none'"):
        from_peft_model(pm)
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules())  # nothing converted


def test_edited_peft_json_wins_over_our_header(tmp_path):
    """Our PEFT-format save also keeps our options in the safetensors header; the json is what
    PEFT reads and what people edit, so an edited lora_alpha must load the same adapter in both."""
    adapted = adapt(tiny_llama(), "lora", target_modules=["q_proj"], r=4, alpha=8.0)
    randomize(adapted.trainable_parameters())
    adapted.save(tmp_path)
    _edit_config(tmp_path, lora_alpha=32)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    ours = load_adapted(tiny_llama(), tmp_path).eval()
    assert {m.alpha for m in ours.adapted_modules().values()} == {32.0}
    torch.testing.assert_close(ours(input_ids=IDS).logits, pm(input_ids=IDS).logits, **TOL)
    with pytest.raises(CheckpointError, match=r"alpha: checkpoint 32\.0 vs model 8\.0"):
        adapted.load(tmp_path)


def test_bf16_model_gets_fp32_adapters_like_peft(tmp_path):
    """PEFT's default (``autocast_adapter_dtype=True``) keeps adapter weights in fp32 on a bf16
    model; ``adapt``'s default does the same, so a PEFT checkpoint loads without rounding its
    weights to bf16 and a live PEFT model converts exactly. ``adapter_dtype="base"`` keeps the
    model's dtype."""
    pm = peft_lora(tiny_llama().to(torch.bfloat16), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_weights = {n.removeprefix("base_model.model."): p.detach().clone() for n, p in pm.named_parameters()
                    if "lora_" in n}
    assert {p.dtype for p in peft_weights.values()} == {torch.float32}
    pm.save_pretrained(tmp_path)
    loaded = load_peft_checkpoint(tiny_llama().to(torch.bfloat16), tmp_path)
    converted = from_peft_model(pm)
    for adapted in (loaded, converted):
        assert adapted.adapter_dtype == "auto"
        for name, m in adapted.adapted_modules().items():
            assert m.base_layer.weight.dtype == torch.bfloat16
            for w in ("lora_A", "lora_B"):
                torch.testing.assert_close(getattr(m, w).weight, peft_weights[f"{name}.{w}.default.weight"],
                                           rtol=0, atol=0)
    fresh = adapt(tiny_llama().to(torch.bfloat16), "lora", target_modules=["q_proj"], r=4)
    assert {p.dtype for p in fresh.trainable_parameters()} == {torch.float32}
    kept = adapt(tiny_llama().to(torch.bfloat16), "lora", target_modules=["q_proj"], r=4, adapter_dtype="base")
    assert {p.dtype for p in kept.trainable_parameters()} == {torch.bfloat16}
    fp32_model = adapt(tiny_llama(), "lora", target_modules=["q_proj"], r=4)  # auto on fp32: fp32
    assert {p.dtype for p in fp32_model.trainable_parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="adapter_dtype must be"):
        adapt(tiny_llama(), "lora", target_modules=["q_proj"], r=4, adapter_dtype="int8")


def test_eva_checkpoint_loads_exactly(tmp_path):
    """EVA's data-driven init runs before training and only picks A and the per-layer ranks
    (saved as rank_pattern); PEFT rebuilds nothing from it on load, and neither do we."""
    from peft.tuners.lora import initialize_lora_eva_weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights="eva",
                                                                eva_config=peft.EvaConfig(rho=2.0)))
        g = torch.Generator().manual_seed(2)
        batches = [{"input_ids": torch.randint(0, VOCAB, (4, 16), generator=g),
                    "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(4)]
        initialize_lora_eva_weights(pm, dataloader=batches, show_progress_bar=False)
    randomize([p for n, p in pm.named_parameters() if "lora_B" in n])
    pm.eval()
    expected = pm(input_ids=IDS).logits.detach()
    pm.save_pretrained(tmp_path)
    cfg = json.load(open(os.path.join(tmp_path, CONFIG_NAME)))
    assert cfg["init_lora_weights"] == "eva" and cfg["eva_config"]
    adapted = load_peft_checkpoint(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(adapted(input_ids=IDS).logits, expected, **TOL)


# ----------------------------------------------------------------------------- modules_to_save (task heads)


def test_sequence_classification_head_round_trips_with_peft(tmp_path):
    """PEFT's SEQ_CLS models train the head in full (modules_to_save: its json names 'classifier'
    and 'score', of which BERT has one): we load that checkpoint, convert the live model, and write
    one PEFT loads, all giving PEFT's logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                                 target_modules=["query", "value"]))
    randomize([p for _, p in pm.named_parameters() if p.requires_grad])
    pm.eval()
    want = pm(input_ids=IDS).logits.detach()
    assert (want - tiny_bert_cls()(input_ids=IDS).logits).abs().max() > 1e-2  # the head did change
    pm.save_pretrained(tmp_path / "peft")
    assert set(json.load(open(tmp_path / "peft" / CONFIG_NAME))["modules_to_save"]) >= {"classifier", "score"}
    ours = load_peft_checkpoint(tiny_bert_cls(), tmp_path / "peft")
    assert list(ours.modules_to_save()) == ["classifier"]
    torch.testing.assert_close(ours(input_ids=IDS).logits, want, **TOL)
    with ours.disable_adapter():  # base model, original head
        torch.testing.assert_close(ours(input_ids=IDS).logits, tiny_bert_cls()(input_ids=IDS).logits, **TOL)
    ours.save(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(input_ids=IDS).logits, want, **TOL)
    converted = from_peft_model(pm)
    assert list(converted.modules_to_save()) == ["classifier"]
    torch.testing.assert_close(converted(input_ids=IDS).logits, want, **TOL)
    trainable = {n for n, _ in converted.named_trainable_parameters()}
    assert {"classifier.trained_module.weight", "classifier.trained_module.bias"} <= trainable
    assert not any("original_module" in n for n in trainable)


def test_peft_checkpoint_with_head_keys_but_no_modules_to_save_is_refused(tmp_path):
    ours = adapt(tiny_bert_cls(), "lora", target_modules=["query"], r=4, alpha=8, modules_to_save=["classifier"])
    ours.save(tmp_path)
    cfg = json.load(open(tmp_path / CONFIG_NAME))
    cfg["modules_to_save"] = None
    json.dump(cfg, open(tmp_path / CONFIG_NAME, "w"))
    with pytest.raises(CheckpointError, match="classifier.weight"):
        load_peft_checkpoint(tiny_bert_cls(), tmp_path)


# ----------------------------------------------------------------------------- get_peft_model


GET_CONFIGS = {
    "patterns_rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                            rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, lora_dropout=0.1),
    "layers_exclude": dict(r=3, lora_alpha=6, target_modules=["q_proj", "o_proj", "up_proj"], layers_to_transform=[1],
                           exclude_modules=["o_proj"]),
    "all_linear_exclude": dict(r=3, lora_alpha=6, target_modules="all-linear", exclude_modules=["gate_proj"]),
    "regex": dict(r=2, lora_alpha=4, target_modules=r".*\.(q|k)_proj"),
    # PEFT's rules for list entries: never a regex, an entry matching nothing is fine, a full name
    # skips the layer filter; an empty / out-of-range layers_to_transform; "all-linear" in any case
    "list_entries": dict(r=2, lora_alpha=4, target_modules=["q_proj", r"model\.layers\.1\..*", "query"]),
    "full_name_skips_layers": dict(r=2, lora_alpha=4, target_modules=["model.layers.1.self_attn.q_proj", "v_proj"],
                                   layers_to_transform=[0]),
    "layers_out_of_range": dict(r=2, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[0, 5]),
    "layers_empty": dict(r=2, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[]),
    "upper_all_linear": dict(r=2, lora_alpha=4, target_modules="ALL-LINEAR"),
}


@pytest.mark.parametrize("variant", list(GET_CONFIGS))
def test_get_peft_model_builds_what_peft_builds(variant, tmp_path):
    """Same LoraConfig, same adapted modules with the same ranks, scalings and dropout: PEFT's
    trained weights load into ours without a difference and give PEFT's logits."""
    cfg = GET_CONFIGS[variant]
    pm = peft_lora(tiny_llama(), **cfg)
    pm.save_pretrained(tmp_path)
    ours = pk_get(tiny_llama(), peft.LoraConfig(**cfg))
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert sorted(ours.adapted_modules()) == sorted(peft_layers)
    for n, m in ours.adapted_modules().items():
        assert (m.r, m.scaling, m.dropout) == (peft_layers[n].r["default"], peft_layers[n].scaling["default"],
                                               getattr(peft_layers[n].lora_dropout["default"], "p", 0.0)), n
        assert m.lora_A.weight.dtype == peft_layers[n].lora_A["default"].weight.dtype
    ours.load(tmp_path)
    torch.testing.assert_close(ours.eval()(input_ids=IDS).logits, pm(input_ids=IDS).logits, **TOL)


def pk_get(model, config, **kw):
    from peft_kernels import get_peft_model

    return get_peft_model(model, config, **kw)


def test_get_peft_model_task_head_and_refusals(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    ours = pk_get(tiny_bert_cls(), cfg)
    assert list(ours.modules_to_save()) == ["classifier"]  # PEFT's SEQ_CLS model trains its head too
    assert pk_get(tiny_bert_cls(), cfg.to_dict()).modules_to_save().keys() == {"classifier"}
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"use_dora=true \(DoRA\) is not supported"):
        pk_get(model, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights='gaussian'"):
        pk_get(model, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    with pytest.raises(ValueError, match="target_modules is required"):
        pk_get(model, dict(peft_type="LORA", r=4))
    with pytest.raises(ValueError, match="peft_type 'IA3'"):
        pk_get(model, dict(peft_type="IA3", target_modules=["q_proj"]))
    assert not any(hasattr(m, "base_layer") for m in model.modules())  # nothing was changed


def test_from_peft_model_keeps_peft_switch_and_set_modules_to_save():
    """A PEFT model whose adapters were switched off converts switched off (same logits), and a
    modules_to_save given as a set (PEFT allows it) converts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"],
                                                                 modules_to_save={"classifier"}))
    randomize([p for _, p in pm.named_parameters() if p.requires_grad])
    pm.eval()
    pm.base_model.disable_adapter_layers()
    want = pm(input_ids=IDS).logits.detach()
    converted = from_peft_model(pm)
    assert all(m.disable_adapters for m in converted._switchable().values())
    torch.testing.assert_close(converted(input_ids=IDS).logits, want, **TOL)
    converted.enable_adapter_layers()
    assert (converted(input_ids=IDS).logits - want).abs().max() > 1e-3


def test_get_peft_model_heads_inference_mode_and_conv1d():
    # a saved SEQ_CLS config lists both heads; BERT has one: PEFT ignores the other, so do we
    ours = pk_get(tiny_bert_cls(), dict(peft_type="LORA", task_type="SEQ_CLS", r=4, lora_alpha=8,
                                        target_modules=["query"], modules_to_save=["classifier", "score"]))
    assert list(ours.modules_to_save()) == ["classifier"]
    # a module the user saves nested in the task head (RoBERTa's classifier.dense) would never run
    torch.manual_seed(0)
    roberta = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
        max_position_embeddings=40, num_labels=3))
    with pytest.raises(ValueError, match="'classifier.dense' sits inside 'classifier'"):
        pk_get(roberta, dict(peft_type="LORA", task_type="SEQ_CLS", r=4, target_modules=["query"],
                             modules_to_save=["classifier.dense"]))
    # inference_mode=True builds the adapter frozen, as PEFT does
    frozen = pk_get(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], inference_mode=True))
    assert frozen.count_parameters()[0] == 0
    # GPT-2 Conv1D: the adapted layer's .weight has the Conv1D layout, as PEFT's does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
        ours = pk_get(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    mine = ours.model.transformer.h[0].attn.c_attn
    theirs = pm.base_model.model.transformer.h[0].attn.c_attn
    assert mine.weight.shape == theirs.weight.shape and torch.equal(mine.weight, theirs.weight)
    # a target that is not a linear layer is refused, not skipped
    with pytest.raises(ValueError, match="not nn.Linear/Conv1D"):
        pk_get(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_from_peft_model_with_several_adapters(arch):
    """Each of PEFT's adapters becomes one of ours (PEFT's active one active), with its own targets;
    switching gives PEFT's logits for each, and unload gives the base model back (GPT-2's Conv1D
    layers as Conv1D)."""
    make, t1, t2 = (tiny_llama, ["q_proj", "v_proj"], ["k_proj", "v_proj"]) if arch == "llama" else \
        (tiny_gpt2, ["c_attn"], ["c_fc"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=t1))
        pm.add_adapter("ref", peft.LoraConfig(r=2, lora_alpha=4, target_modules=t2))
    randomize([p for n, p in pm.named_parameters() if "lora_" in n])
    pm.eval()
    pm.set_adapter("ref")
    want_ref = pm(input_ids=IDS).logits.detach()
    pm.set_adapter("default")
    want = pm(input_ids=IDS).logits.detach()
    ours = from_peft_model(pm).eval()
    assert ours.adapters == ["default", "ref"] and ours.active_adapter == "default"
    torch.testing.assert_close(ours(input_ids=IDS).logits, want, **TOL)
    ours.set_adapter("ref")
    torch.testing.assert_close(ours(input_ids=IDS).logits, want_ref, **TOL)
    plain = ours.unload()
    torch.testing.assert_close(plain(input_ids=IDS).logits, make()(input_ids=IDS).logits, rtol=0, atol=0)
    if arch == "gpt2":
        conv1d = transformers.pytorch_utils.Conv1D
        assert all(isinstance(plain.transformer.h[i].attn.c_attn, conv1d) and
                   isinstance(plain.transformer.h[i].mlp.c_fc, conv1d) for i in range(2))
