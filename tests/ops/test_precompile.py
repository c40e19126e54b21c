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
    """An Autotuner stand-in: configs, cache, key names, pruning, and a JIT function whose warm-up
    records its arguments, whether it ran inside AsyncCompileMode, and the hook's last value."""
    arg_names = ["x_ptr", "N", "FLAG"]
    keys = ["N", "FLAG"]

    def __init__(self, n_configs=2):
        self.hooked = None

        def hook(nargs):
            self.hooked = nargs["BLOCK"]

        self.configs = [triton.Config({"BLOCK": 16 * (i + 1)}, pre_hook=hook if i == 1 else None)
                        for i in range(n_configs)]
        self.cache = {}
        self.warmups = []
        self.nargs = None
        outer = self

        class _Fn:
            def warmup(self, *args, grid, **kwargs):
                from triton.runtime import _async_compile

                outer.warmups.append((args, kwargs["BLOCK"], kwargs["FLAG"], _async_compile.active_mode.get() is not None,
                                      outer.hooked))

        self.fn = _Fn()

    def prune_configs(self, kwargs):
        assert self.nargs is not None  # set, as Autotuner.warmup sets it
        return self.configs


def test_precompile_once_per_new_key_and_only_when_opted_in(monkeypatch):
    monkeypatch.setattr(T, "_PRECOMPILED", set())
    x = torch.zeros(4)
    k = _FakeTuned()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(T.PRECOMPILE_ENV, raising=False)
    assert not T.precompile_configs(k, (x, 64), dict(FLAG=True)) and k.warmups == []  # default off
    monkeypatch.setenv(T.PRECOMPILE_ENV, "1")
    assert T.precompile_configs(k, (x, 64), dict(FLAG=True))
    # every config, inside AsyncCompileMode, each after its own pre_hook (none for the first)
    assert k.warmups == [((x, 64), 16, True, True, None), ((x, 64), 32, True, True, 32)]
    assert k.nargs is None
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

    k.fn.warmup = boom
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


# Runs in a subprocess without TRITON_INTERPRET (compiled kernels) and with triton's active driver
# replaced by one that reports an sm_90 target, so JITFunction.warmup specialises and compiles
# (the NVIDIA backend's own ptxas) on a machine without a GPU; nothing is launched.
_REAL_WARMUP = r'''
import json, os, sys, torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.tools.tensor_descriptor import TensorDescriptor

class Sm90:
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)

driver.set_active(Sm90())
from peft_kernels.ops import _triton as T, lora as L
M, N, K, R = 8192, 4096, 4096, 16
x = torch.empty(M, K, dtype=torch.bfloat16)
w = torch.empty(N, K, dtype=torch.bfloat16).t()
left, right = torch.empty(M, R), torch.empty(R, N, dtype=torch.bfloat16)
out = torch.empty(M, N, dtype=torch.bfloat16)
tail = (left.stride(0), left.stride(1), right.stride(0), right.stride(1), out.stride(0), out.stride(1), 0.5, 0, 0)
kw = dict(HAS_C=False, HAS_BIAS=False, HAS_DROPOUT=False, R_BLOCK=16, DOT_PRECISION="tf32")
gemm = (x, w, left, left, right, left, out, M, N, K, R, L._m_bucket(M), x.stride(0), x.stride(1), w.stride(0),
        w.stride(1), 0, 0) + tail
xd, wd = TensorDescriptor.from_tensor(x, [16, 16]), TensorDescriptor.from_tensor(w.t(), [16, 16])
tma = (xd, wd, left, left, right, left, out, M, N, K, R, L._m_bucket(M), 2, 0, 0) + tail
res = {}
for name, k, a, extra in (("gemm", L._lora_gemm_kernel, gemm, dict(HAS_GEMM=True)),
                          ("tma", L._lora_gemm_tma_kernel, tma, dict(W_NK=True))):
    ok = T.precompile_configs(k, a, {**kw, **extra})
    res[name] = [ok, len(k.fn.device_caches[0][0]), len(k.configs)]
print(json.dumps(res))
'''


def test_real_warmup_compiles_every_config_for_sm90(tmp_path):
    """The real path (AsyncCompileMode, JITFunction.warmup, the TMA pre_hook per config) leaves one
    compiled kernel per autotune config in the JIT cache, where the autotuner's runs will find them."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""), TRITON_CACHE_DIR=str(tmp_path),
               **{T.PRECOMPILE_ENV: "1"})
    proc = subprocess.run([sys.executable, "-c", _REAL_WARMUP], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (ok, compiled, configs) in res.items():
        assert ok and compiled == configs and configs >= 2, (name, res)


def test_launch_tuned_uses_the_tuned_config_without_the_autotuner(interpret, monkeypatch):
    """``launch_tuned``: a new key goes through the autotuner (which benchmarks and caches a
    config); the next launch with that key runs the cached config on the JIT function directly,
    with the same result; a config with a pre_hook (the TMA descriptors) always goes through it."""
    import triton.language as tl
    from triton.runtime.autotuner import Autotuner

    @triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["N"])
    @triton.jit
    def add_one(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < N) + 1.0, mask=offs < N)

    monkeypatch.setattr(Autotuner, "_bench", lambda self, *a, config, **k: [float(config.kwargs["BLOCK"])] * 3)
    runs = []
    real_run = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: runs.append(1) or real_run(self, *a, **k))
    x = torch.arange(40, dtype=torch.float32, device=interpret)
    grid = lambda meta: (triton.cdiv(40, meta["BLOCK"]),)  # noqa: E731
    for i in range(3):
        y = torch.zeros_like(x)
        T.launch_tuned(add_one, grid, (x, y, 40), {})
        torch.testing.assert_close(y, x + 1)
        assert len(runs) == 1  # only the first launch (a new key) went through Autotuner.run
    assert add_one.cache[T._autotune_key(add_one, (x, y, 40), {})].kwargs["BLOCK"] == 16
    hooked = []
    for cfg in add_one.configs:
        cfg.pre_hook = lambda nargs: hooked.append(nargs["BLOCK"])
    y = torch.zeros_like(x)
    T.launch_tuned(add_one, grid, (x, y, 40), {})
    torch.testing.assert_close(y, x + 1)
    assert len(runs) == 2 and hooked == [16]


def test_host_launch_path_script_runs_without_a_gpu(tmp_path):
    """benchmarks/host_launch_path.py compiles the LoRA kernels for sm_90 and launches them through
    triton's real launch path on a fake driver (nothing runs on a device), and writes its rows."""
    import json
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("the script measures with a fake driver on machines without a GPU")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""), TRITON_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "launch.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "host_launch_path.py"), "--steps", "5",
                           "--rounds", "1", "--json", str(out)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["rows"]] == ["autotuner", "launch_tuned", "stubbed"]
    assert data["meta"]["launches_per_step"] == 5 and all(r["us_per_step"] > 0 for r in data["rows"])


# One LoRA layer step through triton's real launch path on the fake sm_90 driver of
# benchmarks/host_launch_path.py (compiled for sm_90 on the CPU, nothing launched), with the
# autotuner's benchmark stubbed: prints how many config timings it asked for.
_TUNE_TWICE = r'''
import os, sys, torch
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import host_launch_path
host_launch_path._install_fake_sm90_driver()
from triton.runtime import autotuner
timed = []
autotuner.Autotuner._bench = lambda self, *a, config, **k: timed.append(1) or [1.0, 1.0, 1.0]
from peft_kernels.ops import _triton as T, lora as L
L._num_sms = lambda device: 132
g = torch.Generator().manual_seed(0)
x, W = torch.randn(16, 64, generator=g).bfloat16().requires_grad_(), torch.randn(64, 64, generator=g).bfloat16()
A = torch.randn(16, 64, generator=g).bfloat16().requires_grad_()
B = torch.randn(64, 16, generator=g).bfloat16().requires_grad_()
L.LoRAFunction.apply(x, W, A, B, None, 2.0, 0.0, L._ZERO_SEED, "triton", False).backward(torch.ones(16, 64).bfloat16())
print(len(timed), len(T._PRECOMPILED))
'''


def test_tuning_results_are_reused_by_a_later_process(tmp_path):
    """``cache_results`` (``TUNE_CACHE``): the configs timed in one process are stored in triton's
    cache dir, and a later process with the same kernels, configs and keys times none of them and,
    with PEFT_KERNELS_PRECOMPILE=1, compiles none ahead either (``tuned_on_disk`` finds the stored
    choice first); PEFT_KERNELS_TUNE_CACHE=0 times them again."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("runs on a fake sm_90 driver on machines without a GPU")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", T.TUNE_CACHE_ENV)}
    env.update(PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""), TRITON_CACHE_DIR=str(tmp_path))

    def timings(**extra):
        proc = subprocess.run([sys.executable, "-c", _TUNE_TWICE], cwd=root, env={**env, **extra},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return tuple(int(v) for v in proc.stdout.strip().splitlines()[-1].split())

    first, _ = timings()
    assert first >= 6  # the fused GEMM (forward and dX), the rows and the dA kernels, several configs each
    assert timings(**{T.PRECOMPILE_ENV: "1"}) == (0, 0)
    assert timings(**{T.TUNE_CACHE_ENV: "0"}) == (first, 0)
