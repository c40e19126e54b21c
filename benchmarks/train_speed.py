"""Fine-tuning throughput (issue 9): a Llama-style causal LM from a config (random weights, no
downloads) with adapters on every linear layer: the frozen floor, peft_kernels and HF PEFT.

Same as `peft-kernels train-speed`; GPU default: the ~1.1B model, batch 4 x seq 2048, bf16,
LoRA r=16. On a CPU-only machine a tiny model in seconds. Arguments are passed on, e.g.

    python benchmarks/train_speed.py --family lora,lily --dropout 0.05
    python benchmarks/train_speed.py --model path/to/config.json --seq 1024
"""
import sys

from peft_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-speed", "--out", "bench_out/train_speed", *sys.argv[1:]]))
