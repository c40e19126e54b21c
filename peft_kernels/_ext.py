"""Loads the optional native extension ``peft_kernels._C`` once, keeping the failure.

Importing ``peft_kernels`` never fails because the extension is absent: ``native()`` returns
the module or ``None``, and ``native_error()`` says why it is missing (not built, built
without CUDA, import error).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

_STATE: dict = {}


def _load() -> None:
    if "module" in _STATE:
        return
    _STATE["module"], _STATE["error"] = None, None
    if os.environ.get("PEFT_KERNELS_DISABLE_EXT", "0") == "1":
        _STATE["error"] = "disabled by PEFT_KERNELS_DISABLE_EXT=1"
        return
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        _STATE["module"] = importlib.import_module("peft_kernels._C")
    except ImportError as e:  # not built (PEFT_KERNELS_SKIP_EXT=1, no compiler) or ABI mismatch
        _STATE["error"] = (f"peft_kernels._C could not be imported ({e}); reinstall with a C++ compiler "
                           "and ninja, without PEFT_KERNELS_SKIP_EXT=1, to build it")


def native():
    """The ``_C`` module, or ``None`` when it is unavailable."""
    _load()
    return _STATE["module"]


def native_error() -> Optional[str]:
    """Why ``_C`` is unavailable, or ``None`` when it loaded."""
    _load()
    return _STATE["error"]


def native_has_cuda() -> bool:
    mod = native()
    return bool(mod is not None and getattr(mod, "with_cuda", lambda: False)())
