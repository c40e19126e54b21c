"""Host (CPU) cost of one adapted layer's training step: forward + backward + clearing the grads.

A GPU runs the kernels asynchronously, so a step costs max(GPU time, host time) per layer. The
host side (Python, checks, autograd, custom-op dispatch, Triton's launcher) is invisible in
`peft-kernels bench` (CUDA-event timing) but shows in `train-speed` wherever a layer's kernels are
short: llama-1b's k/v projections (2048 -> 256) run in a few microseconds each.

    python benchmarks/host_overhead.py                 # CPU: fused path with every Triton launch stubbed
    python benchmarks/host_overhead.py --json out.json

- On a CPU the fused path needs TRITON_INTERPRET=1 (set here) and every Triton launch is replaced
  by a no-op (``--no-stub`` keeps them; the interpreter is then the cost), so the figure is
  everything but the launches themselves.
- With CUDA the launches are real and the shapes tiny (the GPU finishes each kernel before the
  host issues the next), so the figure is the host-bound step time, launches included.
  ``--stub`` stubs the Triton launches there too (outputs are then garbage; only the time counts):
  the difference between the two runs is triton's launch path on that host.
Rows: the nn.Linear alone, each family's module on the fused (Triton) path and on the torch path,
and HF PEFT's LoRA layer where ``peft`` is installed. Median over rounds of many steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

CUDA_WANTED = "--cpu" not in sys.argv
if not CUDA_WANTED or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def stub_triton_launches() -> None:
    """Every Triton kernel launch becomes a no-op (host cost up to the launch call only)."""
    from triton.runtime import autotuner, interpreter, jit

    autotuner.Autotuner.run = lambda self, *a, **k: None
    interpreter.InterpretedFunction.run = lambda self, *a, **k: None
    jit.JITFunction.run = lambda self, *a, **k: None  # compiled kernels (CUDA with --stub)


def _peft_lora(linear: nn.Linear, p: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = linear

        def forward(self, x):
            return self.proj(x)

    w = linear.weight
    return get_peft_model(One(), LoraConfig(r=16, lora_alpha=32, lora_dropout=p, target_modules=["proj"]),
                          autocast_adapter_dtype=False).to(device=w.device, dtype=w.dtype)


def _modules(d: int, device, dtype):
    from peft_kernels import LilyLinear, LoRALinear, MonarchLinear, SparseLinear

    def lin():
        torch.manual_seed(0)
        return nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)

    fams = {
        "lora r16": lambda impl: LoRALinear.from_linear(lin(), r=16, alpha=32, impl=impl),
        "lora r16 dropout 0.05": lambda impl: LoRALinear.from_linear(lin(), r=16, alpha=32, dropout=0.05, impl=impl),
        "monarch N4 r4": lambda impl: MonarchLinear.from_linear(lin(), nblocks=4, blk_r=4, impl=impl),
        "sparse 1%": lambda impl: SparseLinear.from_linear(lin(), density=0.01, impl=impl),
        "lily batch r16 E4": lambda impl: LilyLinear.from_linear(lin(), r=16, num_experts=4, routing="batch",
                                                                 impl=impl),
        "lily token r16 E4": lambda impl: LilyLinear.from_linear(lin(), r=16, num_experts=4, routing="token",
                                                                 impl=impl),
    }
    rows = [("nn.Linear (frozen)", lambda: lin())]
    for name, make in fams.items():
        rows.append((f"{name}: fused", lambda make=make: make("triton")))
        rows.append((f"{name}: torch path", lambda make=make: make("torch")))
        if name.startswith("lora"):  # HF PEFT's LoRA right after ours (a time limit cuts the tail)
            rows.append((f"{name}: HF PEFT", lambda p=0.05 if "dropout" in name else 0.0: _peft_lora(lin(), p)))
    return rows


def measure(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, steps: int, rounds: int) -> float:
    """Median microseconds per forward + backward + grads cleared."""
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        module(x).backward(dy)
        x.grad = None
        for p in params:
            p.grad = None

    for _ in range(max(10, steps // 10)):
        step()
    times = []
    for _ in range(rounds):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / steps * 1e6)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=64, help="layer width (tiny: the step is host-bound)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu", action="store_true", help="measure on the CPU even where CUDA is present")
    ap.add_argument("--no-stub", action="store_true", help="CPU: run the Triton interpreter instead of stubbing")
    ap.add_argument("--stub", action="store_true", help="CUDA: stub the Triton launches too (host cost without them)")
    ap.add_argument("--only", default="", help="comma-separated substrings of row names")
    ap.add_argument("--json", default="", help="write the rows here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    stubbed = (device.type == "cpu" and not args.no_stub) or args.stub
    if stubbed:
        stub_triton_launches()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.d, generator=g).to(device, dtype).requires_grad_(True)
    dy = torch.randn(args.tokens, args.d, generator=g).to(device, dtype)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    out = []
    for name, make in _modules(args.d, device, dtype):
        if wanted and not any(w in name for w in wanted):
            continue
        try:
            us = measure(make(), x, dy, args.steps, args.rounds)
        except Exception as e:  # noqa: BLE001 - a row that cannot run says why, the rest go on
            print(f"{name:40s} skipped: {type(e).__name__}: {e}")
            continue
        out.append({"variant": name, "us_per_step": round(us, 1)})
        print(f"{name:40s} {us:9.1f} us/step")
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "launches": "stubbed (host cost up to the launch)" if stubbed else "real",
            "d": args.d, "tokens": args.tokens, "dtype": str(dtype), "torch": torch.__version__}
    print(json.dumps(meta))
    if args.json:
        from peft_kernels.bench.report import write_json  # temp file + rename, as the CLI's files

        write_json(args.json, {"meta": meta, "rows": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
