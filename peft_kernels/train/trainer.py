"""A thin fine-tuning loop: AdamW, LR schedule, accumulation, autocast, clipping, eval, exact resume.

What it adds over a hand-written loop is what PEFT users get wrong:

- AdaLoRA is never silently trained as LoRA: when the model holds AdaLoRA modules, the loop adds
  the orthogonal regulariser to the loss and calls :class:`~peft_kernels.train.adalora.RankAllocator`
  after every optimizer step (before ``zero_grad``, with the gradients still there). An fp16 step that
  ``GradScaler`` skips (overflowed gradients) advances neither the LR schedule nor the importance scores.
- A fresh run seeds torch/python/numpy from ``TrainConfig.seed`` (dropout included), so two runs
  with one seed give the same losses whatever the global RNG state was before.
- Checkpoints are atomic (``torch.save`` to a temp file in the same folder, then ``os.replace``), so
  an interruption mid-write leaves the previous checkpoint intact. A checkpoint holds the trainable
  parameters and all buffers (AdaLoRA rank masks included), optimizer, LR scheduler, grad scaler,
  allocator state, every RNG (torch CPU/CUDA, python, numpy) and the data position; the data order
  is a pure function of ``(seed, epoch)``, so ``resume=True`` continues exactly: the resumed loss
  curve equals the uninterrupted one (tested).
- ``torchrun``: when ``WORLD_SIZE > 1`` the loop initialises the process group (NCCL on CUDA, gloo
  otherwise), wraps the model in DDP, gives each rank a disjoint slice of every global batch, skips
  the gradient all-reduce on non-final accumulation micro-steps (``no_sync``), and only rank 0
  prints and writes checkpoints. AdaLoRA masks agree across ranks because the allocator reads the
  all-reduced gradients. (Not exercised by the CPU test suite.)

A batch is whatever ``collate_fn`` returns: a dict fed as ``model(**batch)`` (HF style; the loss is
``outputs.loss``), or an ``(inputs, labels)`` pair scored with cross-entropy.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .adalora import AdaLoRAConfig, RankAllocator, adalora_config_for, find_adalora_modules, orthogonal_regularization

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ---- batches -----------------------------------------------------------------------------------
def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def forward_loss(model: nn.Module, batch: Any):
    """``(loss, logits or None)`` for a dict batch (HF: ``model(**batch).loss``) or an ``(x, y)`` pair."""
    if isinstance(batch, dict):
        out = model(**batch)
        loss = out["loss"] if isinstance(out, dict) else getattr(out, "loss", None)
        logits = out["logits"] if isinstance(out, dict) and "logits" in out else getattr(out, "logits", None)
        if loss is None:
            if logits is None or "labels" not in batch:
                raise ValueError("the model returned no loss; give the batch 'labels' or pass loss_fn")
            loss = nn.functional.cross_entropy(logits.float().flatten(0, -2), batch["labels"].flatten())
        return loss, logits
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        x, y = batch
        logits = model(x)
        return nn.functional.cross_entropy(logits.float().flatten(0, -2), y.flatten()), logits
    raise TypeError(f"batch must be a dict (HF style) or an (inputs, labels) pair, got {type(batch).__name__}")


def compute_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return forward_loss(model, batch)[0]


def count_tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum().item())
        if "input_ids" in batch:
            return int(batch["input_ids"].numel())
        return int(next(iter(batch.values())).shape[0])
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(x.shape[0] * (x.shape[1] if x.dim() > 2 else 1))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of one epoch: a pure function of ``(seed, epoch)`` (what makes resume exact)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def iterate_batches(dataset: Sequence, batch_size: int, collate_fn: Callable, seed: int = 0, shuffle: bool = True,
                    epoch: int = 0):
    """Yield collated batches of one pass over ``dataset`` (the last one may be smaller)."""
    order = epoch_order(len(dataset), seed, epoch) if shuffle else torch.arange(len(dataset))
    for i in range(0, len(dataset), batch_size):
        yield collate_fn([dataset[int(j)] for j in order[i:i + batch_size]])


# ---- config ------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    max_steps: int = 100            # optimizer steps
    batch_size: int = 16            # examples per micro-batch per rank
    grad_accum: int = 1             # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"        # linear | cosine | constant (after warmup)
    max_grad_norm: Optional[float] = 1.0
    precision: str = "auto"         # auto: bf16 (fp16 without bf16) autocast on CUDA, fp32 on CPU
    eval_every: int = 0             # 0: only at the end
    eval_batch_size: int = 64
    checkpoint_every: int = 0       # 0: no checkpoints
    output_dir: Optional[str] = None
    seed: int = 0
    progress: bool = True

    def validate(self) -> "TrainConfig":
        for name in ("max_steps", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.checkpoint_every and not self.output_dir:
            raise ValueError("TrainConfig.checkpoint_every needs output_dir")
        return self


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        frac = min(max(frac, 0.0), 1.0)
        if cfg.schedule == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


# ---- distributed -------------------------------------------------------------------------------
def _dist_setup(device: torch.device):
    """``(rank, world)``; initialises the process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


# ---- checkpoint --------------------------------------------------------------------------------
def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` so that a crash mid-write never leaves a truncated file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def set_seed(seed: int) -> None:
    """Seed every generator a run draws from: torch (CPU and all CUDA devices), python, numpy."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Trainable parameters and every persistent buffer (rank masks etc.): what a run changes."""
    sd = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    persistent = set(model.state_dict(keep_vars=True))  # non-persistent buffers cannot be loaded back
    sd.update({n: b.detach().cpu().clone() for n, b in model.named_buffers() if n in persistent})
    return sd


# ---- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, dataset: Sequence, collate_fn: Callable, batch_size: int = 64,
             autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Mean loss, and accuracy when the model returns classification logits and the batch has labels."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    tot_loss, n, correct, counted = 0.0, 0, 0, 0
    for batch in iterate_batches(dataset, batch_size, collate_fn, shuffle=False):
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, logits = forward_loss(model, batch)
        labels = batch.get("labels") if isinstance(batch, dict) else batch[1]
        bs = int(labels.shape[0]) if labels is not None else 1
        tot_loss += float(loss) * bs
        n += bs
        # accuracy for classification only (a causal LM's labels are shifted inside the model)
        if logits is not None and labels is not None and logits.dim() == 2 and labels.dim() == 1 \
                and logits.shape[0] == labels.shape[0]:
            valid = labels != -100
            correct += int(((logits.argmax(-1) == labels) & valid).sum())
            counted += int(valid.sum())
    model.train(was_training)
    out = {"loss": tot_loss / max(n, 1)}
    if counted:
        out["accuracy"] = correct / counted
    return out


# ---- the loop ----------------------------------------------------------------------------------
class Trainer:
    """Train the trainable parameters of ``model`` on ``train_data`` (a sequence of examples).

    ``on_step(step, record)`` is called after each optimizer step (a hook for logging, or for
    tests that interrupt a run). ``adalora``: an :class:`AdaLoRAConfig` (``total_step`` defaults to
    ``max_steps``); when omitted and the model holds AdaLoRA modules, :func:`adalora_config_for`
    builds one for the run's length, so the allocator always runs.
    """

    CHECKPOINT = "checkpoint.pt"

    def __init__(self, model: nn.Module, train_data: Sequence, collate_fn: Callable, config: TrainConfig,
                 eval_data: Optional[Sequence] = None, adalora: Optional[AdaLoRAConfig] = None,
                 on_step: Optional[Callable[[int, dict], None]] = None):
        self.cfg = config.validate()
        self.model = model
        self.train_data = train_data
        self.collate_fn = collate_fn
        self.eval_data = eval_data
        self.on_step = on_step
        self.device = _model_device(model)
        self.rank, self.world = _dist_setup(self.device)
        per_epoch = len(train_data) // (self.cfg.batch_size * self.world)
        if per_epoch < 1:
            raise ValueError(f"train_data has {len(train_data)} examples, fewer than one global batch "
                             f"(batch_size {self.cfg.batch_size} x world {self.world})")
        self.batches_per_epoch = per_epoch
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (did you adapt it?)")
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        self.autocast_dtype, use_scaler = self._precision()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler) if use_scaler else None
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg))

        mods = find_adalora_modules(model)
        self.allocator = None
        if mods:
            if adalora is None:
                init_r = max(int(m.lora_A.shape[0]) for m in mods.values())
                # PEFT's ratio (init_r 12 -> target_r 8) for whatever rank the modules were built with
                adalora = adalora_config_for(self.cfg.max_steps, init_r=init_r, target_r=max(1, 2 * init_r // 3))
            elif adalora.total_step is None:
                adalora = dataclasses.replace(adalora, total_step=self.cfg.max_steps)
            self.allocator = RankAllocator(mods, adalora)
        elif adalora is not None:
            raise ValueError("an AdaLoRA config was given but the model has no AdaLoRA modules")
        self.step = 0
        self.micro = 0  # micro-batches consumed (fixes the data position)
        self.resumed_from: Optional[int] = None
        self.history: List[dict] = []
        self.evals: List[dict] = []

    def _precision(self):
        p = self.cfg.precision
        if p == "fp32" or (p == "auto" and self.device.type != "cuda"):
            return None, False
        if p == "auto":
            p = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return (torch.bfloat16, False) if p == "bf16" else (torch.float16, self.device.type == "cuda")

    def _is_main(self) -> bool:
        return self.rank == 0

    # data position -> micro-batch
    def _micro_batch(self, micro: int):
        epoch, pos = divmod(micro, self.batches_per_epoch)
        order = epoch_order(len(self.train_data), self.cfg.seed, epoch)
        bs = self.cfg.batch_size
        start = (pos * self.world + self.rank) * bs
        return self.collate_fn([self.train_data[int(j)] for j in order[start:start + bs]])

    # ---- checkpointing
    @property
    def checkpoint_path(self) -> Optional[str]:
        return os.path.join(self.cfg.output_dir, self.CHECKPOINT) if self.cfg.output_dir else None

    def save_checkpoint(self, path: Optional[str] = None) -> Optional[str]:
        path = path or self.checkpoint_path
        if path is None or not self._is_main():
            return None
        atomic_save({
            "step": self.step, "micro": self.micro, "model": trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "allocator": self.allocator.state_dict() if self.allocator is not None else None,
            "rng": _rng_state(), "history": self.history, "evals": self.evals,
            "config": dataclasses.asdict(self.cfg),
        }, path)
        return path

    def load_checkpoint(self, path: Optional[str] = None) -> bool:
        path = path or self.checkpoint_path
        if path is None or not os.path.exists(path):
            return False
        ck = torch.load(path, map_location="cpu", weights_only=False)
        missing = self.model.load_state_dict(ck["model"], strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"checkpoint {path} does not match the model: unexpected {missing.unexpected_keys[:5]}")
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.scaler is not None and ck.get("scaler") is not None:
            self.scaler.load_state_dict(ck["scaler"])
        if self.allocator is not None and ck.get("allocator") is not None:
            self.allocator.load_state_dict(ck["allocator"])
        _set_rng_state(ck["rng"])
        self.step, self.micro = int(ck["step"]), int(ck["micro"])
        self.history, self.evals = list(ck["history"]), list(ck["evals"])
        return True

    # ---- run
    def evaluate(self) -> Dict[str, float]:
        if self.eval_data is None:
            return {}
        return evaluate(self.model, self.eval_data, self.collate_fn, self.cfg.eval_batch_size, self.autocast_dtype)

    def train(self, resume: bool = False) -> List[dict]:
        """Run to ``max_steps``; with ``resume`` first load the checkpoint in ``output_dir`` if any.

        A fresh run (no checkpoint loaded) first seeds torch, python and numpy from ``config.seed``
        (like HF's ``set_seed``): the data order alone is not the run's randomness, dropout (the
        adapters' included) draws from the global generators. A resumed run restores them from the
        checkpoint instead. A step skipped by the fp16 ``GradScaler`` (overflow) is recorded with
        ``skipped: True``; it advances neither the LR schedule nor the AdaLoRA importance scores.
        """
        if resume and self.load_checkpoint():
            self.resumed_from = self.step
        else:
            set_seed(self.cfg.seed)
        cfg = self.cfg
        net = self.ddp or self.model
        self.model.train()
        bar = None
        if cfg.progress and self._is_main():
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        t0, tokens = time.perf_counter(), 0
        while self.step < cfg.max_steps:
            loss_sum = 0.0
            for k in range(cfg.grad_accum):
                batch = to_device(self._micro_batch(self.micro), self.device)
                self.micro += 1
                tokens += count_tokens(batch) * self.world
                sync = self.ddp is None or k == cfg.grad_accum - 1
                ctx = net.no_sync() if not sync else _nullcontext()
                with ctx:
                    with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                        enabled=self.autocast_dtype is not None):
                        loss = compute_loss(net, batch)
                        if self.allocator is not None and self.allocator.config.orth_reg_weight > 0:
                            loss = loss + orthogonal_regularization(self.allocator.modules,
                                                                    self.allocator.config.orth_reg_weight)
                    scaled = loss.float() / cfg.grad_accum
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                loss_sum += float(loss.detach())
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            skipped = False
            if self.scaler is not None:
                scale_before = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                # GradScaler skips optimizer.step when the gradients overflowed and then lowers
                # the scale (it never lowers it otherwise): HF Trainer's test for a skipped step
                skipped = self.scaler.get_scale() < scale_before
            else:
                self.optimizer.step()
            if not skipped:
                self.scheduler.step()  # a skipped step does not advance the LR schedule (as in HF Trainer)
            self.step += 1
            if self.allocator is not None:
                # after optimizer.step, before zero_grad (PEFT's order). A skipped step's inf/nan
                # gradients must not reach the importance EMAs (they would stay nan for good): the
                # allocator leaves the step out, but still fixes the final masks if it is due
                self.allocator.step(self.step, grads_valid=not skipped)
            self.optimizer.zero_grad(set_to_none=True)

            step_loss = loss_sum / cfg.grad_accum
            if self.world > 1:  # log the global mean, identical on every rank
                import torch.distributed as dist
                t = torch.tensor([step_loss], dtype=torch.float64, device=self.device)
                dist.all_reduce(t)
                step_loss = float(t.item()) / self.world
            rec = {"step": self.step, "loss": step_loss, "lr": self.scheduler.get_last_lr()[0], "skipped": skipped}
            self.history.append(rec)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                ev = {"step": self.step, **self.evaluate()}
                self.evals.append(ev)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if bar is not None:
                dt = max(time.perf_counter() - t0, 1e-9)
                post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{tokens / dt:,.0f}"}
                if self.evals and self.evals[-1]["step"] == self.step and "accuracy" in self.evals[-1]:
                    post["eval_acc"] = f"{self.evals[-1]['accuracy']:.3f}"
                bar.set_postfix(post)
                bar.update(1)
            if self.on_step is not None:
                self.on_step(self.step, rec)
        if bar is not None:
            bar.close()
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every != 0:
            self.save_checkpoint()
        if self.eval_data is not None:
            self.evals.append({"step": self.step, **self.evaluate()})
        return self.history


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


__all__ = ["TrainConfig", "Trainer", "evaluate", "compute_loss", "forward_loss", "iterate_batches",
           "atomic_save", "to_device", "epoch_order", "set_seed"]
