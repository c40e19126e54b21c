"""pytest-benchmark cases mirroring `peft-kernels bench`: forward+backward of every family's
headline configurations, each variant in a group with the frozen base of the same shape.

    pytest benchmarks/ --benchmark-only                      # all cases
    pytest benchmarks/ --benchmark-only -k "lora and 4096"   # a subset
    pytest benchmarks/ --benchmark-only --benchmark-compare  # against the last saved run

With CUDA: GUIDE.md's three shapes, T=8192, bf16 (each call ends with a synchronize so the
host timer sees the GPU work). Without: the CLI's small CPU shapes in fp32, single-threaded.
The variants, shapes and configurations are the ones in `peft_kernels.bench.cases`, so these
numbers and the CLI's table measure the same thing, including LoRA's two base-pinned rows
(`-k "lora and base"`: Triton GEMM with the LoRA epilogue vs cuBLAS + in-place LoRA pass; they
skip, saying why, where the fused path is not Triton). Not collected by `pytest tests`.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_kernels.bench import cases as C
from peft_kernels.bench.layer import fused_builder, kernel_impl, skip_reason

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = C.GPU_SHAPES if CUDA else C.CPU_SHAPES
TOKENS = C.GPU_TOKENS if CUDA else C.CPU_TOKENS


def _slug(name: str) -> str:
    """A variant name usable in ``-k``: "peft_kernels (cublas base)" -> "peft_kernels_cublas_base"."""
    return name.replace("(", "").replace(")", "").replace(" ", "_")


def _cases():
    for fam, spec in C.FAMILY_SPECS.items():
        for shape in SHAPES:
            yield pytest.param(fam, None, None, shape, id=f"{fam}-{shape[0]}x{shape[1]}-frozen_base")
            for cfg in spec.configs(False):
                for var in spec.variants:  # GPU-only / Triton-only rows skip in the test, saying why
                    if not var.applies(cfg):
                        continue
                    label = spec.label(cfg).replace(" ", "_")
                    yield pytest.param(fam, cfg, var, shape,
                                       id=f"{fam}-{shape[0]}x{shape[1]}-{label}-{_slug(var.name)}")


@pytest.fixture(autouse=True, scope="module")
def _threads():
    saved = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)  # stable CPU numbers on a shared machine (see bench.layer)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("family, cfg, variant, shape", list(_cases()))
def test_fwd_bwd(benchmark, family, cfg, variant, shape):
    setup = C.make_setup(shape[0], shape[1], TOKENS, DTYPE, DEVICE)
    if variant is None:
        w = setup.weight
        fwd, params, name = (lambda: F.linear(setup.x, w)), [], "frozen base"
    else:
        name = variant.name
        impl, reason = kernel_impl(family, DEVICE, DTYPE, None)
        skip = skip_reason(variant, DEVICE, impl, reason)
        if skip is not None:
            pytest.skip(skip)
        if variant.fused:
            if impl is None:
                pytest.skip(reason)
            if variant.name == C.KERNEL:
                name = f"{C.KERNEL}[{impl}]"
            fwd, params = fused_builder(variant, impl)(setup, cfg)
        elif variant.name == C.REFERENCE and impl == "torch":
            pytest.skip("peft_kernels runs its reference here: same case as the kernel row")
        else:
            try:
                fwd, params = variant.build(setup, cfg)
            except ImportError as e:
                pytest.skip(str(e))
    grads = [setup.x, *params]
    dy = setup.dy

    def step():
        for t in grads:
            t.grad = None
        fwd().backward(dy)
        if CUDA:
            torch.cuda.synchronize()

    step()  # compile / first-call work outside the measurement
    benchmark.group = f"{family} {shape[0]}x{shape[1]} T={TOKENS} {str(DTYPE).replace('torch.', '')}"
    benchmark.extra_info.update(family=family, variant=name, config=cfg and C.FAMILY_SPECS[family].label(cfg),
                                shape=f"{shape[0]}x{shape[1]}", tokens=TOKENS, device=str(DEVICE))
    benchmark(step)
