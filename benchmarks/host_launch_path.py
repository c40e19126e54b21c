"""Host cost of triton's REAL launch path for the fused LoRA layer, measured without a GPU.

    python benchmarks/host_launch_path.py [--steps 400] [--rounds 5] [--json out.json]

`benchmarks/host_overhead.py --cpu` stubs every Triton launch, so it cannot see what triton's own
launch path costs: Autotuner.run, JITFunction.run (argument binding and specialisation, the
compiled-kernel cache lookup), the launch metadata. Here the kernels are compiled for sm_90 on the
CPU (triton's bundled ptxas) and launched through that whole path: triton's active driver is
replaced by one that reports an sm_90 target, loads no module and launches nothing. Autotuning
benchmarks are stubbed (the first config wins). Only cuLaunchKernel itself (a few us on a real
GPU) and the GPU work are missing.

Rows, all one LoRA r16 layer step (forward + backward, T=16, d=64, bf16) through
``LoRAFunction``: "autotuner" (every launch through ``Autotuner.run``), "launch_tuned" (what the
package does: the tuned config launched on the JIT function directly), "stubbed" (no triton
call at all; the difference to it is triton's share). Interleaved rounds, medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter

import torch  # noqa: E402


def _install_fake_sm90_driver() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class _Utils:
        def load_binary(self, name, kernel, shared, device):
            return (0, 0, 64, 0, 1024)  # module, function, n_regs, n_spills, n_max_threads

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                    "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    class _Sm90:
        utils = _Utils()

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def launcher_cls(self, src, metadata):
            return lambda *args, **kwargs: None

        def get_device_interface(self):
            return torch.cuda

        def is_active(self):
            return True

    driver.set_active(_Sm90())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        print("a GPU is present: measure there with benchmarks/host_overhead.py instead", file=sys.stderr)
        return 2
    _install_fake_sm90_driver()
    from triton.runtime import autotuner

    autotuner.Autotuner._bench = lambda self, *a, config, **k: [1.0, 1.0, 1.0]
    from peft_kernels.ops import _triton as TT
    from peft_kernels.ops import lora as L

    L._num_sms = lambda device: 132  # the H100's count (the dA kernel's split)
    torch.set_num_threads(1)
    T, d, r = 16, 64, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g).to(torch.bfloat16).requires_grad_(True)
    W = torch.randn(d, d, generator=g).to(torch.bfloat16)
    A = torch.randn(r, d, generator=g).to(torch.bfloat16).requires_grad_(True)
    B = torch.randn(d, r, generator=g).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(T, d, generator=g).to(torch.bfloat16)

    def step():
        L.LoRAFunction.apply(x, W, A, B, None, 2.0, 0.0, L._ZERO_SEED, "triton", False).backward(dy)
        x.grad = A.grad = B.grad = None

    t0 = time.perf_counter()
    step()  # compiles each kernel's chosen config for sm_90
    compile_s = time.perf_counter() - t0
    launches = []
    real = L._tuned_launch
    L._tuned_launch = lambda k, grid, a, kw: launches.append(1) or real(k, grid, a, kw)
    step()
    n_launch = len(launches)
    variants = {
        "autotuner": lambda k, grid, a, kw: k[grid](*a, **kw),
        "launch_tuned": TT.launch_tuned,
        "stubbed": lambda k, grid, a, kw: None,
    }
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            L._tuned_launch = fn
            for _ in range(20):
                step()
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t) / args.steps * 1e6)
    L._tuned_launch = real
    med = {name: statistics.median(v) for name, v in times.items()}
    rows = [{"variant": name, "us_per_step": round(us, 1),
             "triton_us_per_launch": None if name == "stubbed" else round((us - med["stubbed"]) / n_launch, 1)}
            for name, us in med.items()]
    for row in rows:
        extra = "" if row["triton_us_per_launch"] is None else f"  ({row['triton_us_per_launch']} us per launch in triton)"
        print(f"{row['variant']:14s} {row['us_per_step']:8.1f} us/step{extra}")
    meta = {"launches_per_step": n_launch, "first_step_compile_s": round(compile_s, 1), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "cpu_threads": os.cpu_count()}
    print(json.dumps(meta))
    if args.json:
        from peft_kernels.bench.report import write_json  # temp file + rename, as the CLI's files

        write_json(args.json, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
