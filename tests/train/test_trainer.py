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


class _ScaledTrainer(Trainer):
    """A GradScaler-driven run on the CPU: what ``precision="fp16"`` gives on CUDA, minus the
    autocast (whose overflows are not reproducible across machines); the overflow is forced by a
    poisoned batch instead."""

    def _precision(self):
        return None, True


def test_overflowed_steps_skip_allocator_and_schedule():
    from peft_kernels.train.adalora import AdaLoRAConfig

    poisoned = {2, 3, 7}  # micro-batches (= optimizer steps 3, 4 and 8) whose gradients are nan
    calls = []

    def poisoning_collate(rows):
        x, y = collate(rows)
        if len(calls) in poisoned:
            x = x * float("nan")
        calls.append(len(rows))
        return x, y

    ema_at = {}

    def on_step(step, rec):
        ipt = trainer.allocator.exp_avg_ipt
        assert all(torch.isfinite(v).all() for v in ipt.values()), f"non-finite importance EMA at step {step}"
        ema_at[step] = {k: v.clone() for k, v in ipt.items()}

    # masks are due at steps 4 and 8 (deltaT 4); 8 = total_step is the final allocation, and it
    # is one of the skipped steps: it reads no gradient, so it must still happen
    ada = AdaLoRAConfig(init_r=4, target_r=1, tinit=1, tfinal=0, deltaT=4, total_step=8)
    trainer = _ScaledTrainer(_build("adalora"), _data(), poisoning_collate,
                             TrainConfig(max_steps=8, batch_size=8, lr=1e-2, warmup_steps=2, progress=False),
                             adalora=ada, on_step=on_step)
    assert trainer.scaler is not None and trainer.scaler.is_enabled()
    scale0 = trainer.scaler.get_scale()
    hist = trainer.train()
    assert [r["skipped"] for r in hist] == [s in (3, 4, 8) for s in range(1, 9)]
    assert trainer.scaler.get_scale() == scale0 / 8  # GradScaler saw the three overflows
    assert trainer.scheduler.last_epoch == 5  # the LR schedule advanced on the 5 real steps only
    assert hist[2]["lr"] == hist[3]["lr"] == hist[1]["lr"]
    for step in (3, 4):  # the allocator did not see the skipped steps
        assert all(torch.equal(ema_at[step][k], v) for k, v in ema_at[2].items())
    assert trainer.allocator.final_mask is not None
    assert sum(trainer.allocator.current_ranks().values()) == trainer.allocator.target_bgt
    assert all(torch.isfinite(p).all() for p in trainer.params)


def test_seed_makes_runs_identical_whatever_the_global_rng():
    import random

    import numpy as np

    def run(global_seed, seed=7):
        adapted = _build("lora")  # adapter dropout 0.1 and the model's dropout 0.2 draw from torch's RNG
        torch.manual_seed(global_seed)  # whatever the caller did before training
        random.seed(global_seed)
        np.random.seed(global_seed)
        drawn = {}

        def on_step(step, rec):
            if step == 1:
                drawn["python"], drawn["numpy"] = random.random(), float(np.random.rand())

        t = Trainer(adapted.model, _data(), collate, TrainConfig(max_steps=4, batch_size=8, progress=False, seed=seed),
                    on_step=on_step)
        return [r["loss"] for r in t.train()], drawn

    assert run(1) == run(2)
    assert run(1)[0] != run(1, seed=8)[0]
