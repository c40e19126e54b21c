"""Lily / MoE-LoRA layer benchmark (issue 6): both routing modes, r in {16, 32}, E in {4, 8},
against HF PEFT's lily (batch routing) and the per-expert torch mixture (token routing) in the
same process, as ratios to the frozen base; peak memory.

Runs `peft-kernels bench --family lily --sweep` (the sweep of issue 6) with the CLI's device
defaults: on a GPU, GUIDE.md's three shapes at T=8192 in bf16 through the fused kernels; on a
CPU-only machine, small shapes in fp32 through the torch path. Extra arguments are passed on
(`--shapes 4096x4096 --tokens 8192 --dtype bf16 --out DIR`, ...). Writes CSV/JSON/PNG to
bench_out/lily unless `--out` says otherwise.

    python benchmarks/bench_lily.py
"""
import sys

from peft_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--family", "lily", "--sweep", "--out", "bench_out/lily", *sys.argv[1:]]))
