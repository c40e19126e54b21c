"""Sparse-adapter layer benchmark (issue 5): densities {0.5%, 1%, 5%}, against the densified torch
adapter and torch.sparse CSR in the same process, as ratios to the frozen base; peak memory.

Runs `peft-kernels bench --family sparse --sweep` (the sweep of issue 5) with the CLI's device
defaults: on a GPU, GUIDE.md's three shapes at T=8192 in bf16 through the fused kernels; on a
CPU-only machine, small shapes in fp32 through the torch path. Extra arguments are passed on
(`--shapes 4096x4096 --tokens 8192 --dtype bf16 --out DIR`, ...). Writes CSV/JSON/PNG to
bench_out/sparse unless `--out` says otherwise.

    python benchmarks/bench_sparse.py
"""
import sys

from peft_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--family", "sparse", "--sweep", "--out", "bench_out/sparse", *sys.argv[1:]]))
