"""``ModuleToSave``: a module trained in full beside the adapters (HF PEFT's ``modules_to_save``).

A task head (``classifier``, ``score``) is new or changed as a whole when a model is fine-tuned
for another task, so it is trained in full and saved with the adapter. As in PEFT, the module is
kept twice: ``original_module`` (frozen, what runs under ``disable_adapter()``) and
``trained_module`` (a copy, trainable, what the forward uses, what ``unload()`` and
``merge_and_unload()`` keep, as PEFT's do, and what a checkpoint stores, under the module's own
parameter names: the keys are PEFT's, ``base_model.model.<name>.<param>``).

Attributes the wrapper lacks are read from the module in use, so code that reads
``model.score.weight`` or ``model.classifier.out_features`` keeps working.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .lora import _AdapterSwitch


class ModuleToSave(_AdapterSwitch, nn.Module):
    """``original_module`` frozen, ``trained_module`` (a deep copy unless given) trainable."""

    def __init__(self, original_module: nn.Module, trained_module: Optional[nn.Module] = None):
        super().__init__()
        if not isinstance(original_module, nn.Module):
            raise TypeError(f"original_module must be an nn.Module, got {type(original_module).__name__}")
        if isinstance(original_module, ModuleToSave) or "base_layer" in original_module._modules:
            raise TypeError(f"cannot train a {type(original_module).__name__} in full: it is already an adapter or a "
                            "module to save")
        self.original_module = original_module
        self.trained_module = copy.deepcopy(original_module) if trained_module is None else trained_module
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.trained_module.parameters():
            if p.is_floating_point() or p.is_complex():
                p.requires_grad_(True)

    @property
    def merged(self) -> bool:  # the switch's protocol: nothing to merge, the copy is used as it is
        return False

    @property
    def active_module(self) -> nn.Module:
        return self.original_module if self._adapters_disabled else self.trained_module

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "trained_module") or name.startswith("__"):
                raise
            return getattr(self.active_module, name)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the trained copy's state dict (live tensors, its own key names)."""
        return self.trained_module.state_dict(keep_vars=True)

    def extra_repr(self) -> str:
        return f"disabled={self._adapters_disabled}"
