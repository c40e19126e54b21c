"""LoRA layer benchmark (issue 3): r in {8, 16, 64}, dropout {0, 0.05}, against HF PEFT, plain torch
LoRA and torch.compile LoRA (GPU) in the same process, as ratios to the frozen base; peak memory.

On the Triton path three peft_kernels rows per case: the default (base GEMM ``auto``: Triton vs
cuBLAS timed once per shape, the faster kept), ``peft_kernels (triton base)`` (Triton GEMM with the
LoRA term in its epilogue) and ``peft_kernels (cublas base)`` (cuBLAS + in-place LoRA pass). The
auto decisions, both times each, are printed under the table and written to base_decisions.csv
and bench.json. Where the fused path is not Triton (a CPU-only machine) the two pinned rows are
listed as skipped, with the reason.

Runs `peft-kernels bench --family lora --sweep` (the sweep of issue 3) with the CLI's device
defaults: on a GPU, GUIDE.md's three shapes at T=8192 in bf16 through the fused kernels; on a
CPU-only machine, small shapes in fp32 through the torch path. Extra arguments are passed on
(`--shapes 4096x4096 --tokens 8192 --dtype bf16 --out DIR`, ...). Writes CSV/JSON/PNG to
bench_out/lora unless `--out` says otherwise.

    python benchmarks/bench_lora.py
"""
import sys

from peft_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--family", "lora", "--sweep", "--out", "bench_out/lora", *sys.argv[1:]]))
