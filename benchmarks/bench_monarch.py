"""Monarch (MoRe) layer benchmark (issue 4): nblocks 4, blk_r in {4, 8, 32}, against the two-bmm
torch adapter in the same process, as ratios to the frozen base; peak memory.

Runs `peft-kernels bench --family monarch --sweep` (the sweep of issue 4) with the CLI's device
defaults: on a GPU, GUIDE.md's three shapes at T=8192 in bf16 through the fused kernels; on a
CPU-only machine, small shapes in fp32 through the torch path. Extra arguments are passed on
(`--shapes 4096x4096 --tokens 8192 --dtype bf16 --out DIR`, ...). Writes CSV/JSON/PNG to
bench_out/monarch unless `--out` says otherwise.

    python benchmarks/bench_monarch.py
"""
import sys

from peft_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--family", "monarch", "--sweep", "--out", "bench_out/monarch", *sys.argv[1:]]))
