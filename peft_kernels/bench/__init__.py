"""Benchmarks behind ``peft-kernels bench`` and ``peft-kernels train-speed``.

- ``layer``: one adapted layer per family and shape against the frozen base linear, HF PEFT and
  plain torch in the same process (``run_bench``).
- ``train_speed``: tokens/s and peak memory of a Llama-style causal LM with adapters on every
  linear layer (``run_train_speed``).
- ``cases``: the configurations and competitor implementations; ``timing``: timers and memory
  probes; ``report``: tables, CSV/JSON/PNG; ``meta``: the stamp every file carries.
"""
from .cases import FAMILIES
from .layer import BenchResult, run_bench
from .train_speed import TrainSpeedResult, TrainSpeedSettings, run_train_speed

__all__ = ["FAMILIES", "BenchResult", "run_bench", "TrainSpeedResult", "TrainSpeedSettings", "run_train_speed"]
