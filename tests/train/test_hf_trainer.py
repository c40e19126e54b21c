"""A PEFT user's whole journey under HF ``transformers.Trainer``, on the fused-kernel adapter:
``get_peft_model`` with a SEQ_CLS ``LoraConfig`` (LoRA + a head trained in full), Trainer
checkpoints, an exact resume from one, and ``save_pretrained`` output that PEFT itself loads."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

from peft_kernels import get_peft_model  # noqa: E402

from tiny_models import VOCAB, tiny_bert_cls  # noqa: E402


class _DS(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, 9), generator=g)
        self.y = self.ids[:, 0] % 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.y[i]}


def _adapted():
    return get_peft_model(tiny_bert_cls(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                   target_modules=["query", "value"]))


def test_trainer_checkpoints_resume_and_peft_loads_the_result(tmp_path):
    handle = _adapted()
    original = handle.model.classifier.original_module.weight.detach().clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8,
                                          learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=3,
                                          use_cpu=True, logging_strategy="no", disable_tqdm=True)
    transformers.Trainer(model=handle.model, args=args, train_dataset=_DS()).train()
    assert torch.equal(handle.model.classifier.original_module.weight, original)  # only the copy trains
    assert not torch.equal(handle.model.classifier.trained_module.weight, original)
    resumed = _adapted()
    transformers.Trainer(model=resumed.model, args=args, train_dataset=_DS()).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    ids = _DS().ids[:4]
    handle.eval()
    resumed.eval()
    want = handle(input_ids=ids).logits.detach()
    torch.testing.assert_close(resumed(input_ids=ids).logits, want, rtol=0, atol=0)
    handle.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_bert_cls(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
