"""Loading JSONL data: an evaluation file gets the training file's label ids."""
from __future__ import annotations

import argparse
import json

import pytest
from torch import nn

from peft_kernels.train import data as D


def _write(path, labels):
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": x}) + "\n" for i, x in enumerate(labels)))
    return str(path)


def test_eval_labels_use_training_ids(tmp_path):
    train, names = D.load_jsonl(_write(tmp_path / "tr.jsonl", ["pos", "neg", "neu", "pos"]))
    assert names == ["neg", "neu", "pos"]
    # alone, this file's sorted order would make "pos" id 1; with the training names it is 2
    assert [r["label"] for r in D.load_jsonl(_write(tmp_path / "alone.jsonl", ["pos", "neu"]))[0]] == [1, 0]
    evald, eval_names = D.load_jsonl(str(tmp_path / "alone.jsonl"), label_names=names)
    assert [r["label"] for r in evald] == [2, 1] and eval_names == names
    with pytest.raises(ValueError, match=r"label\(s\) \['meh'\] are not among the training labels"):
        D.load_jsonl(_write(tmp_path / "bad.jsonl", ["pos", "meh"]), label_names=names)


def test_eval_int_labels_against_training_names(tmp_path):
    _, names = D.load_jsonl(_write(tmp_path / "tr.jsonl", [0, 2, 1]))
    assert names == ["0", "1", "2"]
    evald, _ = D.load_jsonl(_write(tmp_path / "ev.jsonl", [2, "1"]), label_names=names)
    assert [r["label"] for r in evald] == [2, 1]
    with pytest.raises(ValueError, match=r"\['3'\] are not among"):
        D.load_jsonl(_write(tmp_path / "ev3.jsonl", [3]), label_names=names)


def test_cli_maps_eval_file_with_training_labels(tmp_path, monkeypatch):
    from peft_kernels.train import cli

    monkeypatch.setattr(D, "load_model", lambda path, num_labels, seed: (nn.Linear(2, num_labels), None))
    args = argparse.Namespace(data=_write(tmp_path / "tr.jsonl", ["b", "c", "a"]),
                              eval_data=_write(tmp_path / "ev.jsonl", ["c"]), seed=0, limit_train=None,
                              limit_eval=None, model=None, device="cpu")
    model, _, _, evald, names, _ = cli._load(args)
    assert names == ["a", "b", "c"] and [r["label"] for r in evald] == [2]
    assert model.out_features == 3
