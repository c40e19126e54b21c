"""HF Trainer + AdaLoRACallback: the allocator runs (ranks are pruned) and the regulariser is added."""
from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from peft_kernels.adapters import adapt  # noqa: E402
from peft_kernels.train.hf_callback import AdaLoRACallback  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(7, 13), nn.Linear(13, 13)])
        self.head = nn.Linear(13, 2)

    def forward(self, x, labels=None):
        for lin in self.layers:
            x = torch.relu(lin(x))
        logits = self.head(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class DS(torch.utils.data.Dataset):
    def __init__(self, n=48):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 7, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_callback_prunes_ranks_under_hf_trainer(tmp_path):
    torch.manual_seed(0)
    adapted = adapt(Net(), method="adalora", target_modules=["layers.0", "layers.1"], r=6)
    cb = AdaLoRACallback()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    trainer = transformers.Trainer(model=adapted.model, args=args, train_dataset=DS(), callbacks=[cb])
    trainer.train()
    assert cb.final_ranks is not None
    assert sum(cb.final_ranks.values()) == cb.allocator.target_bgt == 2 * 4 < cb.allocator.init_bgt
    assert {n: int(m.rank_mask.sum()) for n, m in adapted.adapted_modules().items()} == cb.final_ranks
    assert cb._hook is None  # the regulariser hook is removed at the end


def _started(net: nn.Module, args=None):
    """An AdaLoRA-adapted ``net`` with the callback started on it (10 steps), and one batch."""
    torch.manual_seed(0)
    adapted = adapt(net, method="adalora", target_modules=["layers.0", "layers.1"], r=4)
    cb = AdaLoRACallback()
    state = transformers.TrainerState()
    state.max_steps = 10
    cb.on_train_begin(args, state, None, model=adapted.model)
    batch = {"x": torch.randn(3, 7), "labels": torch.tensor([0, 1, 0])}
    return adapted, cb, state, batch


def test_callback_adds_orthogonal_regulariser_in_training_only(tmp_path):
    adapted, cb, state, batch = _started(Net())
    from peft_kernels.train.adalora import orthogonal_regularization
    adapted.model.eval()
    plain = adapted.model(**batch)["loss"]
    adapted.model.train()
    reg = adapted.model(**batch)["loss"]
    assert torch.allclose(reg, plain + orthogonal_regularization(adapted.model, 0.5))
    cb.on_train_end(None, state, None)
    assert torch.allclose(adapted.model(**batch)["loss"], plain)


def test_callback_rejects_models_without_adalora():
    cb = AdaLoRACallback()
    state = transformers.TrainerState()
    state.max_steps = 10
    with pytest.raises(ValueError, match="no AdaLoRA modules"):
        cb.on_train_begin(None, state, None, model=Net())


def test_callback_skips_steps_with_non_finite_gradients():
    """Under fp16 HF's grad scaler skips an overflowed optimizer step but still calls
    on_optimizer_step with the inf/nan gradients: they must not reach the importance EMAs."""
    adapted, cb, state, batch = _started(Net())
    adapted.model(**batch)["loss"].backward()
    state.global_step = 0
    cb.on_optimizer_step(None, state, None)
    before = {k: v.clone() for k, v in cb.allocator.exp_avg_ipt.items()}
    assert before  # the good step was folded in
    adapted.model.layers[1].lora_A.grad[0, 0] = float("inf")  # E is still zero: |0 * inf| = nan
    state.global_step = 1
    cb.on_optimizer_step(None, state, None)
    assert all(torch.equal(cb.allocator.exp_avg_ipt[k], v) for k, v in before.items())
    cb.on_train_end(None, state, None)


class LossKwargsNet(Net):
    """A model taking loss kwargs, as HF causal LMs do: Trainer then passes num_items_in_batch."""

    def forward(self, x, labels=None, **kwargs):
        return super().forward(x, labels)


def test_regulariser_is_per_optimizer_step_when_trainer_skips_the_accumulation_division(tmp_path):
    """When the forward gets num_items_in_batch, HF Trainer does not divide the loss by the
    accumulation steps (and multiplies it by the process count under
    average_tokens_across_devices): the regulariser is divided by both, so it weighs its setting
    once per optimizer step, as without accumulation."""
    from peft_kernels.train.adalora import orthogonal_regularization

    args = transformers.TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=4, use_cpu=True,
                                          report_to=[])
    adapted, cb, state, batch = _started(LossKwargsNet(), args)
    adapted.model.eval()
    plain = adapted.model(**batch)["loss"]
    adapted.model.train()
    reg = orthogonal_regularization(adapted.model, 0.5)
    assert torch.allclose(adapted.model(**batch)["loss"], plain + reg)  # Trainer divides this loss itself
    assert torch.allclose(adapted.model(**batch, num_items_in_batch=3)["loss"], plain + reg / 4)
    cb.on_train_end(args, state, None)
