"""Every Triton kernel of peft_kernels.ops compiles for an H100 (sm_90), checked without a GPU.

The rest of the suite runs the kernels under ``TRITON_INTERPRET=1``, which never invokes the NVIDIA
compiler: a kernel can pass every interpreter test and still fail to lower (layout conversions,
wgmma operand types, a constexpr branch the interpreter tolerates). This test runs the compile
report (``benchmarks/sm90_compile_report.py --quick``: each kernel once, bf16, its first autotune
config, dropout on where it has a dropout flag) in a subprocess without ``TRITON_INTERPRET``
(``@triton.jit`` under the interpreter yields objects that cannot be compiled) and checks that
every case compiled and that every kernel the ops modules define was covered.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "sm90_compile_report.py")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "rows.json"
    # a private cache: the report recompiles anyway (ptxas must run to log), and CI's cache stays clean
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--jobs", "1", "--json", str(out)], cwd=ROOT,
                          env={**_env(), "TRITON_CACHE_DIR": str(tmp_path / "cache")}, capture_output=True,
                          text=True, timeout=300)
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log
    data = json.loads(out.read_text())
    rows = data["rows"]
    failed = [(r["kernel"], r["error"]) for r in rows if not r["ok"]]
    assert not failed, failed
    # coverage: every launched kernel compiled at least once, and the quick case is bf16 with dropout on
    assert data["launched"], log
    assert sorted({r["kernel"] for r in rows}) == data["launched"] == data["kernels"]
    for r in rows:
        assert r["dtype"] == "bf16"
        assert r["regs"] is not None and 0 < r["regs"] <= 255, r
        assert r["smem"] is not None and r["smem"] >= 0, r
        if "HAS_DROPOUT" in r["constexprs"]:
            assert r["constexprs"]["HAS_DROPOUT"] is True, r
    # the @triton.jit helpers (dropout mask, monarch tile gathers, ...) are compiled inside them
    helpers = set(data["helpers"])
    assert "_dropout.dropout_keep_tile" in helpers
    assert set(data["discovered"]) == set(data["launched"]) | helpers


def test_uncovered_kernel_fails_loudly():
    """Dropping a kernel from the case table (as a newly added kernel would be missing) is an error."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks')\n"
        "import sm90_compile_report as S\n"
        "found = S.discover()\n"
        "S.check_coverage(found)\n"
        "del S.CASES['lora._lora_rows_kernel']\n"
        "try:\n"
        "    S.check_coverage(found)\n"
        "except S.CoverageError as e:\n"
        "    assert 'lora._lora_rows_kernel' in str(e), e\n"
        "    print('raised')\n"
    )
    proc = _run(["-c", code])
    assert proc.returncode == 0 and "raised" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
