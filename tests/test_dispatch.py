"""Dispatch: preference order, env override, reasons when a forced implementation cannot run."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from peft_kernels import _ext, dispatch


@pytest.fixture
def fam():
    name = "_test_family"
    dispatch.register(name, "cuda")
    dispatch.register(name, "triton")
    dispatch.register(name, "torch")
    yield name
    dispatch._REGISTRY.pop(name)


def test_cpu_defaults_to_torch(fam, monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.choose(fam, torch.device("cpu"), torch.float32) == "torch"


def test_env_forces_torch(fam, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert dispatch.choose(fam, "cpu", torch.bfloat16) == "torch"


def test_per_family_env(fam, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, f"other:triton,{fam}:torch")
    assert dispatch.choose(fam, "cpu", torch.float32) == "torch"


def test_forced_unavailable_lists_reasons(fam, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "cuda")
    with pytest.raises(RuntimeError) as e:
        dispatch.choose(fam, "cpu", torch.float32)
    msg = str(e.value)
    assert "forced implementation 'cuda' cannot run" in msg and "triton:" in msg and "torch: available" in msg


def test_forced_missing_impl(fam):
    with pytest.raises(RuntimeError, match="has no cpp implementation"):
        dispatch.choose(fam, "cpu", torch.float32, impl="cpp")


def test_bad_impl_name(fam, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "fastest")
    with pytest.raises(ValueError, match="PEFT_KERNELS_IMPL must name one of"):
        dispatch.choose(fam, "cpu", torch.float32)


def test_fp64_never_triton(fam, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "fp32/fp16/bf16" in dispatch.unavailable_reason(fam, "triton", torch.device("cpu"), torch.float64)


def test_interpreter_allows_triton_on_cpu_when_forced(fam, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose(fam, "cpu", torch.float32, impl="triton") == "triton"
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.choose(fam, "cpu", torch.float32) == "torch"  # never auto-picked on CPU


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family"):
        dispatch.choose("nope", "cpu", torch.float32)


def test_explain_lists_everything(fam):
    text = dispatch.explain("cpu", torch.float32)
    assert fam in text and "torch   available" in text


def test_import_without_extension_touches_no_gpu():
    code = ("import os; os.environ['PEFT_KERNELS_DISABLE_EXT']='1'; import torch; "
            "torch.cuda.is_available = lambda: (_ for _ in ()).throw(AssertionError('GPU touched')); "
            "import peft_kernels, sys; from peft_kernels import _ext; "
            "assert _ext.native() is None and 'disabled' in _ext.native_error(); "
            "assert 'triton' not in sys.modules, 'import pulled in triton'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_native_error_is_explained_or_loaded():
    mod, err = _ext.native(), _ext.native_error()
    assert (mod is None) != (err is None)
    if mod is None:
        assert "peft_kernels._C" in err or "disabled" in err
