"""The loop: exact resume after an interruption, AdaLoRA allocator wiring, atomic checkpoints, bad configs."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from peft_kernels.adapters import adapt
from peft_kernels.train.trainer import TrainConfig, Trainer, atomic_save, evaluate


class Net(nn.Module):
    def __init__(self, d=11, h=17, classes=3):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, h), nn.Linear(h, h)])
        self.drop = nn.Dropout(0.2)  # exercises the RNG state in checkpoints
        self.head = nn.Linear(h, classes)

    def forward(self, x):
        for lin in self.layers:
            x = self.drop(torch.relu(lin(x)))
        return self.head(x)


def _data(n=40, d=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [(x[i], y[i]) for i in range(n)]


def collate(rows):
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def _build(method):
    torch.manual_seed(0)
    net = Net()
    opts = dict(r=4, dropout=0.1) if method == "lora" else dict(r=4)
    adapted = adapt(net, method=method, target_modules=["layers.0", "layers.1"], **opts)
    net.head.weight.requires_grad_(True)
    net.head.bias.requires_grad_(True)
    return adapted


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_resume_reproduces_uninterrupted_loss_curve(tmp_path, method):
    train, evald = _data(), _data(12, seed=1)
    kw = dict(max_steps=9, batch_size=6, grad_accum=2, lr=5e-3, warmup_steps=2, schedule="cosine",
              checkpoint_every=3, eval_every=4, progress=False, seed=7)

    torch.manual_seed(123)
    full = Trainer(_build(method), train, collate, TrainConfig(output_dir=str(tmp_path / "a"), **kw), eval_data=evald)
    curve = [r["loss"] for r in full.train()]

    def stop(step, rec):
        if step == 5:
            raise Interrupt

    torch.manual_seed(123)
    broken = Trainer(_build(method), train, collate, TrainConfig(output_dir=str(tmp_path / "b"), **kw),
                     eval_data=evald, on_step=stop)
    with pytest.raises(Interrupt):
        broken.train()
    assert os.path.exists(tmp_path / "b" / "checkpoint.pt")
    # a fresh process: new model, RNG in another state; the checkpoint (step 3) restores everything
    torch.manual_seed(999)
    resumed = Trainer(_build(method), train, collate, TrainConfig(output_dir=str(tmp_path / "b"), **kw),
                      eval_data=evald)
    curve2 = [r["loss"] for r in resumed.train(resume=True)]
    assert len(curve) == len(curve2) == 9
    assert curve2 == curve  # exactly, not approximately
    assert [e["loss"] for e in resumed.evals] == [e["loss"] for e in full.evals]
    if method == "adalora":
        assert resumed.allocator.current_ranks() == full.allocator.current_ranks()
        # the allocator ran: ranks went from 4 to the target
        assert sum(full.allocator.current_ranks().values()) == full.allocator.target_bgt < full.allocator.init_bgt


def test_training_learns_and_evaluates():
    train = _data(60)
    t = Trainer(_build("lora"), train, collate, TrainConfig(max_steps=30, batch_size=10, lr=2e-2, progress=False),
                eval_data=train)
    before = evaluate(t.model, train, collate)
    hist = t.train()
    after = t.evals[-1]
    assert after["loss"] < before["loss"]
    assert 0.0 <= after["accuracy"] <= 1.0
    assert sum(h["loss"] for h in hist[-5:]) < sum(h["loss"] for h in hist[:5])


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "ck.pt")
    atomic_save({"a": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(Exception):
        atomic_save({"a": Boom()}, path)
    assert torch.load(path) == {"a": 1}


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_steps=0), "max_steps"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(schedule="step"), "schedule"),
    (dict(precision="int8"), "precision"),
    (dict(checkpoint_every=2), "output_dir"),
    (dict(lr=0.0), "lr"),
])
def test_bad_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs).validate()


def test_too_little_data_and_adalora_config_without_modules():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Trainer(_build("lora"), _data(4), collate, TrainConfig(batch_size=8, progress=False))
    from peft_kernels.train.adalora import AdaLoRAConfig
    with pytest.raises(ValueError, match="no AdaLoRA modules"):
        Trainer(_build("lora"), _data(), collate, TrainConfig(progress=False), adalora=AdaLoRAConfig())
