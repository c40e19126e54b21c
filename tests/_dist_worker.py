"""Worker for tests/test_distributed.py: trains a tiny adapted model for 2 steps under DDP and FSDP2.

Launched as ``torchrun --standalone --nproc_per_node=2 tests/_dist_worker.py OUT_DIR`` (gloo, CPU).
Each rank trains on its half of one fixed global batch; rank 0 writes the adapter gradients of
every step and the final adapter weights to ``OUT_DIR/<mode>.pt``. The test compares them with
``train_single`` on the whole batch in one process (mean losses, so the averaged gradients agree).
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

from peft_kernels.adapters import adapt

D, H, OUT, BATCH, SEQ, STEPS = 23, 37, 5, 4, 7, 2
# (method, options, targets): LoRA, and Lily, whose projectors are shared across layers
CASES = {
    "lora": ("lora", dict(r=4, alpha=8.0, dropout=0.0), ["up_proj", "down_proj"]),
    "lily": ("lily", dict(r=4, num_experts=2, routing="token"), ["up_proj", "down_proj"]),
}
if os.environ.get("TRITON_INTERPRET") == "1":
    # the fused path (interpreted): gate/up share one down-projection pass (share_inputs), and
    # the output head is trained in full beside the adapters (modules_to_save)
    CASES["lora_shared_head"] = ("lora", dict(r=4, alpha=8.0, impl="triton", share_inputs=True,
                                              modules_to_save=["head"]), ["gate_proj", "up_proj", "down_proj"])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D, H, bias=False)
        self.up_proj = nn.Linear(D, H)
        self.down_proj = nn.Linear(H, D, bias=False)

    def forward(self, x):
        return x + self.down_proj(torch.sigmoid(self.gate_proj(x)) * torch.nn.functional.gelu(self.up_proj(x)))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(2)])
        self.head = nn.Linear(D, OUT)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build(case: str):
    method, options, targets = CASES[case]
    torch.manual_seed(0)
    adapted = adapt(TinyNet(), method, target_modules=targets, **options)
    with torch.no_grad():  # non-trivial adapter weights, identical on every rank
        for p in adapted.trainable_parameters():
            p.normal_(0, 0.3)
    return adapted


def global_batch():
    g = torch.Generator().manual_seed(42)
    return torch.randn(BATCH, SEQ, D, generator=g), torch.randn(BATCH, SEQ, OUT, generator=g)


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def train(model: nn.Module, names: list[str], params: list[nn.Parameter], x, y):
    """STEPS steps of AdamW; returns per-step gradients and final weights by parameter name."""
    opt = torch.optim.AdamW(params, lr=1e-2)
    grads = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).square().mean()
        loss.backward()
        grads.append({n: _full(p.grad) for n, p in zip(names, params)})
        opt.step()
    return {"grads": grads, "weights": {n: _full(p) for n, p in zip(names, params)}}


def train_single(case: str):
    adapted = build(case)
    named = adapted.named_trainable_parameters()
    x, y = global_batch()
    return train(adapted.model, [n for n, _ in named], [p for _, p in named], x, y)


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = global_batch()
    per = BATCH // world
    x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    results = {}
    for case in CASES:
        # DDP: gradients all-reduced (averaged) across ranks; frozen weights are not synchronised
        adapted = build(case)
        named = adapted.named_trainable_parameters()
        ddp = DDP(adapted.model)
        results[f"ddp_{case}"] = train(ddp, [n for n, _ in named], [p for _, p in named], x, y)
        # FSDP2: sharded over the 2 ranks, frozen and trainable parameters together. Per-block
        # groups for LoRA; Lily's projectors are shared across blocks and FSDP2 needs a shared
        # parameter inside ONE group, so there only the root is sharded.
        adapted = build(case)
        mesh = init_device_mesh("cpu", (world,))
        if case != "lily":
            for block in adapted.model.layers:
                fully_shard(block, mesh=mesh)
        fully_shard(adapted.model, mesh=mesh)
        named = adapted.named_trainable_parameters()  # DTensor parameters after sharding
        results[f"fsdp_{case}"] = train(adapted.model, [n for n, _ in named], [p for _, p in named], x, y)
        # saving gathers the sharded adapter (a collective: every rank calls save, rank 0 writes)
        adapted.save(os.path.join(out_dir, f"fsdp_{case}"), is_main_process=rank == 0)
        if case == "lora_shared_head":
            # one FSDP2 unit per adapted layer: a group's siblings are still sharded when its first
            # member runs, so each member must run alone (and still match)
            adapted = build(case)
            for m in adapted.adapted_modules().values():
                fully_shard(m, mesh=mesh)
            fully_shard(adapted.model, mesh=mesh)
            named = adapted.named_trainable_parameters()
            results[f"fsdplayer_{case}"] = train(adapted.model, [n for n, _ in named], [p for _, p in named], x, y)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Leave without running interpreter-shutdown destructors: gloo's background threads can abort
    # the process there ("terminate called without an active exception", seen once in ~10 CI runs)
    # after every result is written and the process group is destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
