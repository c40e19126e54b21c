"""peft_kernels: fused kernels for parameter-efficient fine-tuning.

Importing this package touches no GPU, imports no Triton, and never fails because the native
extension is absent: the public names below load their module on first use.
"""
from __future__ import annotations

import importlib

from . import dispatch, reference
from ._ext import native_error

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    # kernels (autograd-backed functional API)
    "lora_linear": "peft_kernels.ops.lora",
    "monarch_linear": "peft_kernels.ops.monarch",
    "sparse_linear": "peft_kernels.ops.sparse",
    "sparse_adapter": "peft_kernels.ops.sparse",
    "rosa_linear": "peft_kernels.ops.sparse",
    "lily_linear": "peft_kernels.ops.lily",
    # drop-in modules
    "LoRALinear": "peft_kernels.modules.lora",
    "share_inputs": "peft_kernels.modules.lora",
    "AdaLoRALinear": "peft_kernels.modules.adalora",
    "MonarchLinear": "peft_kernels.modules.monarch",
    "SparseLinear": "peft_kernels.modules.sparse",
    "LilyLinear": "peft_kernels.modules.lily",
    "MoELoRALinear": "peft_kernels.modules.lily",
    "ModuleToSave": "peft_kernels.modules.to_save",
    # whole-model use
    "adapt": "peft_kernels.adapters",
    "get_peft_model": "peft_kernels.adapters",
    "AdaptedModel": "peft_kernels.adapters",
    "from_peft_model": "peft_kernels.adapters",
    "load_adapted": "peft_kernels.adapters",
    "load_peft_checkpoint": "peft_kernels.adapters",
    "CheckpointError": "peft_kernels.adapters",
}

__all__ = ["dispatch", "reference", "native_error", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peft_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
