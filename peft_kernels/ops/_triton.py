"""Triton import shared by the ops modules.

Triton is a dependency on Linux only. Where it is missing the ops modules still import (the
kernels are decorated by a stand-in that keeps the Python function) and dispatch reports
"triton is not installed", so the torch and native paths keep working.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

    class _Lang:
        constexpr = object

    class _Triton:
        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_a, **_kw):
            return lambda f: f

        @staticmethod
        def heuristics(*_a, **_kw):
            return lambda f: f

        class Config:  # noqa: D106
            def __init__(self, *a, **kw):
                pass

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << (max(int(n), 1) - 1).bit_length()

    triton = _Triton()
    tl = _Lang()

__all__ = ["triton", "tl", "HAS_TRITON"]
