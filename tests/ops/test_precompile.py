"""The opt-in parallel precompile of autotuned kernels (``ops._triton.precompile_configs``).

Compiling needs a GPU target, so here: the autotune key it computes is the one triton's Autotuner
caches under (checked by running the real ``Autotuner.run`` with benchmarking and launching
stubbed out), and the warm-up is submitted once per new key, inside ``AsyncCompileMode``, only
when opted in and not under the interpreter.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from peft_kernels.ops import _triton as T  # noqa: E402


def _tuned():
    @triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["N", "FLAG"])
    @triton.jit
    def kern(x_ptr, N, M, FLAG: triton.language.constexpr, BLOCK: triton.language.constexpr):
        pass

    return kern


def test_key_is_the_autotuners(monkeypatch):
    kern = _tuned()
    monkeypatch.setattr(type(kern), "_bench", lambda self, *a, config, **k: [1.0, 1.0, 1.0])
    monkeypatch.setattr(kern.fn, "run", lambda *a, **k: None)
    x = torch.zeros(4, dtype=torch.bfloat16)
    args, kwargs = (x, 64, 7), dict(FLAG=True)
    kern.run(*args, grid=(1,), warmup=False, **kwargs)
    assert list(kern.cache) == [T._autotune_key(kern, args, kwargs)]
    # a different key value or dtype is a different key; a non-key argument is not
    assert T._autotune_key(kern, (x, 65, 7), kwargs) not in kern.cache
    assert T._autotune_key(kern, (x.float(), 64, 7), kwargs) not in kern.cache
    assert T._autotune_key(kern, (x, 64, 8), kwargs) in kern.cache


class _FakeTuned:
    arg_names = ["x_ptr", "N", "FLAG"]
    keys = ["N", "FLAG"]

    def __init__(self, n_configs=2):
        self.configs = [object()] * n_configs
        self.cache = {}
        self.warmups = []

    def warmup(self, *args, grid, **kwargs):
        from triton.runtime import _async_compile

        self.warmups.append((args, kwargs, _async_compile.active_mode.get() is not None))


def test_precompile_once_per_new_key_and_only_when_opted_in(monkeypatch):
    monkeypatch.setattr(T, "_PRECOMPILED", set())
    x = torch.zeros(4)
    k = _FakeTuned()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(T.PRECOMPILE_ENV, raising=False)
    assert not T.precompile_configs(k, (x, 64), dict(FLAG=True)) and k.warmups == []  # default off
    monkeypatch.setenv(T.PRECOMPILE_ENV, "1")
    assert T.precompile_configs(k, (x, 64), dict(FLAG=True))
    assert k.warmups == [((x, 64), dict(FLAG=True), True)]  # inside AsyncCompileMode
    assert not T.precompile_configs(k, (x, 64), dict(FLAG=True))  # once per key
    k.cache[T._autotune_key(k, (x, 128), dict(FLAG=True))] = "tuned"
    assert not T.precompile_configs(k, (x, 128), dict(FLAG=True))  # the autotuner already knows it
    assert not T.precompile_configs(_FakeTuned(1), (x, 64), dict(FLAG=True))  # nothing to parallelise
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not T.precompile_configs(k, (x, 256), dict(FLAG=True))  # the interpreter compiles nothing


def test_precompile_failure_is_silent(monkeypatch):
    monkeypatch.setattr(T, "_PRECOMPILED", set())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(T.PRECOMPILE_ENV, "1")
    k = _FakeTuned()

    def boom(*a, **kw):
        raise RuntimeError("compile failed")

    k.warmup = boom
    assert not T.precompile_configs(k, (torch.zeros(1), 64), dict(FLAG=False))


def test_every_autotuned_kernel_uses_the_short_timer():
    """Each autotuned kernel of the ops modules times its configs with ``tuning_bench``."""
    from triton.runtime.autotuner import Autotuner

    from peft_kernels.ops import lily, lora, monarch, sparse

    tuned = [(m.__name__, n, k) for m in (lora, monarch, lily, sparse) for n, k in vars(m).items()
             if isinstance(k, Autotuner)]
    assert {n for _, n, _ in tuned} >= {"_lora_gemm_kernel", "_lora_gemm_tma_kernel", "_lora_rows_kernel",
                                        "_lora_bwd_da_kernel", "_monarch_fwd_kernel"}
    for mod, name, k in tuned:
        assert k._do_bench is T.tuning_bench, f"{mod}.{name}"
