"""argparse value types shared by the ``peft-kernels`` subcommands: each rejects bad input with
a message that names what was expected."""
from __future__ import annotations

import argparse
from typing import Callable


def _number(text: str, cast: Callable, ok: Callable, expected: str):
    try:
        v = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive integer")


def nonneg_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a positive number")


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")


def dropout_value(text: str) -> float:
    return _number(text, float, lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)")


def csv_list(text: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def positive_int_list(text: str) -> list:
    return [positive_int(t) for t in csv_list(text)]
