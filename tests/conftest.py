"""Shared fixtures: seeding, a ``gpu`` marker, and the Triton interpreter on CPU."""
from __future__ import annotations

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")
    config.addinivalue_line("markers", "e2e: whole-model GPU checks (many kernel compiles; gpu_session.sh runs "
                                       "them as their own step)")


def pytest_collection_modifyitems(config, items):
    # PEFT_KERNELS_TESTS_FIRST="tests/ops/test_lora.py,...": those run first, in that order (a time-
    # limited GPU run gets the core kernels' tests before the rest; pytest reorders overlapping paths)
    first = [p.strip() for p in os.environ.get("PEFT_KERNELS_TESTS_FIRST", "").split(",") if p.strip()]
    if first:
        items.sort(key=lambda item: next((i for i, p in enumerate(first) if item.nodeid.startswith(p)), len(first)))
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels on the CPU under ``TRITON_INTERPRET=1``; yields the device to use.

    The interpreter reads the variable when a kernel is first decorated, so CI also exports it
    for the whole run (``.ci/run``); this fixture makes single tests work outside CI too.
    """
    pytest.importorskip("triton")
    if HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") != "1":
        yield torch.device("cuda")
        return
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1 set before import (see .ci/run)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield torch.device("cpu")


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
