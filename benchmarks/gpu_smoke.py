"""First contact with a GPU: one small fused LoRA layer (forward + backward) per base GEMM path.

    python benchmarks/gpu_smoke.py          # prints one line per base: "<base> ok ..." or "<base> FAILED ..."
    TRITON_INTERPRET=1 python benchmarks/gpu_smoke.py --cpu   # the script itself, on the CPU (smaller layer)

``gpu_session.sh`` runs this before the GPU tests. The paths have never run on a GPU before; the
riskiest is ``tma`` (host-side tensor descriptors), which ``base="auto"`` (the default) times on
every new shape. A base that raises is caught here and by ``auto`` itself, but a device fault
(e.g. an illegal address) poisons the whole process: run alone, it costs this script only, and
the session then leaves the failed base out (``PEFT_KERNELS_AUTO_BASES``, tests ``-k "not tma"``).
Bases run cheapest-risk first and each line is flushed, so a crash still shows which base did it.
Each result is checked against the fp64 reference with GUIDE section 3's rule (error at most twice
the same-dtype reference's, plus a small absolute slack for bf16's rounding of near-zero values).
Exit status: 0 all ran, 3 only ``tma`` failed, 1 otherwise.
"""
from __future__ import annotations

import sys
import time

import torch


def _run(fn, tensors, dtype, dy):
    x, w, a, b, bias = (t.to(dtype).detach().requires_grad_(t.requires_grad) for t in tensors)
    y = fn(x, w, a, b, bias)
    y.backward(dy.to(dtype))
    return [t.detach().double() for t in (y, x.grad, a.grad, b.grad)]


def main(argv=None) -> int:
    cpu = "--cpu" in (sys.argv[1:] if argv is None else argv)
    if not cpu and not torch.cuda.is_available():
        print("no CUDA device: nothing to smoke-test (--cpu with TRITON_INTERPRET=1 checks the script)", file=sys.stderr)
        return 2
    from peft_kernels.ops import lora as L
    from peft_kernels.reference.lora import lora as reference

    dev, dt = torch.device("cpu" if cpu else "cuda"), torch.bfloat16
    T, d_in, d_out, r, p, seed = (48, 64, 32, 16, 0.05, 7) if cpu else (512, 768, 640, 16, 0.05, 7)
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dev)
    x, w, a, b, bias, dy = make(T, d_in), make(d_out, d_in) / d_in**0.5, make(r, d_in) / d_in**0.5, \
        make(d_out, r), make(d_out), make(T, d_out)
    tensors = (x.requires_grad_(True), w, a.requires_grad_(True), b.requires_grad_(True), bias)
    ref = lambda *t: reference(*t, scaling=2.0, dropout_p=p, seed=seed)
    exact = _run(ref, tensors, torch.float64, dy)
    same = _run(ref, tensors, dt, dy)
    name = "CPU (Triton interpreter)" if cpu else torch.cuda.get_device_name(dev)
    print(f"torch {torch.__version__}, {name}; layer T={T} {d_in}->{d_out} r={r} "
          f"dropout {p} bf16", flush=True)
    failed = []
    for base in ("triton", "cublas", "tma"):
        if base == "tma" and not L.tma_eligible(x.to(dt), w.to(dt).t(), dt):
            print("tma skipped (not eligible on this device)", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            fn = lambda *t: L.lora_linear(*t, scaling=2.0, dropout_p=p, seed=seed, impl="triton", base=base)
            got = _run(fn, tensors, dt, dy)
            if not cpu:
                torch.cuda.synchronize()
            worst = []
            for name, gv, sv, ev in zip(("y", "dx", "dA", "dB"), got, same, exact):
                err, budget = (gv - ev).abs().max().item(), 2 * (sv - ev).abs().max().item() + 1e-2
                worst.append(f"{name} {err:.2e}/{budget:.2e}")
                if not err <= budget:
                    raise AssertionError(f"{name}: max error {err:.3e} above {budget:.3e}")
            print(f"{base} ok ({time.perf_counter() - t0:.1f} s incl. compile; err/budget: {', '.join(worst)})",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - the point is to report every base's failure
            failed.append(base)
            print(f"{base} FAILED ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)
    return 0 if not failed else 3 if failed == ["tma"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
