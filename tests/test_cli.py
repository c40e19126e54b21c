"""The ``peft-kernels`` command: bench / train-speed / info on the CPU, argument errors, and the
benchmark's competitor baselines computing the same function as the references (a timing
comparison between different functions would be meaningless)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from peft_kernels import reference as R
from peft_kernels.bench import cases as C
from peft_kernels.bench.timing import saved_bytes, time_ms
from peft_kernels.cli import main

STAMP_KEYS = ("device", "torch", "triton", "git_commit", "date_utc")


def _read_csv(path):
    with open(path) as f:
        lines = f.read().splitlines()
    comments = {l[2:].split(":", 1)[0]: l.split(":", 1)[1].strip() for l in lines if l.startswith("# ")}
    rows = list(csv.DictReader(l for l in lines if not l.startswith("#")))
    return comments, rows


def test_bench_cpu_writes_table_csv_json_png(tmp_path, capsys):
    out = tmp_path / "bo"
    rc = main(["bench", "--shapes", "40x24,24x56", "--tokens", "19", "--reps", "1", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    for fam in C.FAMILIES:
        assert f"== {fam} ==" in text
    for needle in ("frozen base", "peft_kernels", "HF PEFT", "torch two-bmm", "torch densified",
                   "torch per-expert", "f+b x", "GPU figures need a GPU"):
        assert needle in text, needle

    meta = json.loads((out / "bench.json").read_text())
    for k in STAMP_KEYS:
        assert meta["meta"][k] and meta["meta"][k] != "", k
    assert meta["meta"]["torch"] == torch.__version__
    assert "GPU" in meta["meta"]["note"]
    rows = meta["rows"]
    # every family: a base row with ratio 1 and at least two measured competitors per shape
    for fam in C.FAMILIES:
        for shape in ("40x24", "24x56"):
            fam_rows = [r for r in rows if r["family"] == fam and r["shape"] == shape]
            base = [r for r in fam_rows if r["variant"] == "frozen base"]
            assert len(base) == 1 and base[0]["fwdbwd_ratio"] == 1.0 and base[0]["fwdbwd_ms"] > 0
            # timed before and after the variants: the ratios divide by the mean, the spread is shown
            assert base[0]["base_spread_pct"] is not None and base[0]["base_spread_pct"] >= 0
            ok = [r for r in fam_rows if r["variant"] != "frozen base" and r["status"] == "ok"]
            assert len(ok) >= 2, (fam, shape, [(r["variant"], r["status"]) for r in fam_rows])
            for r in ok:
                assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwdbwd_ms"] > 0
                assert r["fwdbwd_ratio"] == pytest.approx(r["fwdbwd_ms"] / base[0]["fwdbwd_ms"])
                assert r["saved_mib"] >= 0

    comments, csv_rows = _read_csv(out / "bench.csv")
    for k in STAMP_KEYS:
        assert comments.get(k), k
    assert comments["device"] == meta["meta"]["device"]  # the --device setting must not hide the stamp
    assert len(csv_rows) == len(rows)

    # rows that cannot run on the CPU are kept, skipped with a reason, and said once under the table
    lora_rows = [r for r in rows if r["family"] == "lora"]
    for name, why in ((C.LORA_TRITON_BASE, "triton path only"), (C.LORA_CUBLAS_BASE, "triton path only"),
                      (C.LORA_TMA_BASE, "triton path only"), ("torch.compile", "GPU only")):
        pinned = [r for r in lora_rows if r["variant"] == name]
        assert len(pinned) == 2 * 2, name  # 2 shapes x 2 default configs
        assert all(r["status"].startswith("skipped: ") and why in r["status"] for r in pinned), pinned[0]["status"]
        assert all(r["fwdbwd_ms"] is None for r in pinned)
        assert sum(1 for line in text.splitlines() if name in line and "skipped: " in line) == 1, name
    assert "not measured:" in text and "the fused path here is torch" in text
    # no GPU: no base decision taken; the decisions file is still written (header + stamp) and empty
    assert meta["base_decisions"] == []
    assert "base decisions" not in text
    dec_comments, dec_rows = _read_csv(out / "base_decisions.csv")
    assert dec_rows == [] and dec_comments["git_commit"] == meta["meta"]["git_commit"]
    with open(out / "base_decisions.csv") as f:
        header = next(l for l in f if not l.startswith("#"))
    assert header.strip().split(",")[:2] == ["gemm", "device"] and "triton_ms" in header

    from PIL import Image

    for fam in C.FAMILIES:
        png = out / f"bench_{fam}.png"
        assert png.is_file() and png.stat().st_size > 1000
        info = json.loads(Image.open(png).info["Description"])
        assert info["git_commit"] == meta["meta"]["git_commit"] and info["device"] == meta["meta"]["device"]


def test_train_speed_tiny(tmp_path, capsys):
    rc = main(["train-speed", "--model", "tiny", "--family", "lora", "--seq", "16", "--batch", "1",
               "--steps", "1", "--warmup", "0", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "frozen model (floor)" in text and "peft_kernels lora" in text and "HF PEFT lora" in text
    data = json.loads((tmp_path / "train_speed.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    for name in ("frozen model (floor)", "peft_kernels lora", "HF PEFT lora"):
        assert rows[name]["status"] == "ok", rows[name]["status"]
        assert rows[name]["tokens_per_s"] > 0
    # both adapters train the same parameter count on the same targets
    assert rows["peft_kernels lora"]["trainable_params"] == rows["HF PEFT lora"]["trainable_params"] > 0
    # the GPU-busy diagnostic exists only on CUDA: absent from the CPU table, None in the files
    assert "GPU busy" not in text and all(r["gpu_busy_pct"] is None for r in rows.values())
    for k in STAMP_KEYS:
        assert data["meta"][k], k


def test_train_speed_shared_inputs_row_on_the_fused_path(tmp_path, capsys, interpret):
    """The fused path adds a 'shared inputs' LoRA row (q/k/v, gate/up share one down-projection
    pass); it trains the same parameters and is compared with HF PEFT like the plain row. The torch
    path, where grouping does nothing, has no such row."""
    from peft_kernels.bench import train_speed as TS

    assert [n for n, *_ in TS._variants(TS.TrainSpeedSettings(device="cpu"))] == [
        "frozen model (floor)", "peft_kernels lora", "HF PEFT lora"]
    assert "peft_kernels lora (shared inputs)" in [n for n, *_ in TS._variants(TS.TrainSpeedSettings(device="cuda"))]
    rc = main(["train-speed", "--model", "tiny", "--family", "lora", "--seq", "8", "--batch", "1", "--steps", "1",
               "--warmup", "0", "--impl", "triton", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "train_speed.json").read_text())["rows"]}
    shared, plain = rows["peft_kernels lora (shared inputs)"], rows["peft_kernels lora"]
    assert shared["status"] == "ok" and shared["trainable_params"] == plain["trainable_params"] > 0
    assert shared["speedup_vs_peft"] is not None


def test_train_speed_gpu_busy_arithmetic_and_table(monkeypatch):
    """GPU busy = device-side profiler events' time (CPU-side events carry none) over the step time;
    the table shows the column and its reading when a row has it."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from peft_kernels.bench import train_speed as TS

    ev = [SimpleNamespace(device_type=DeviceType.CUDA, device_time_total=1500.0),
          SimpleNamespace(device_type=DeviceType.CUDA, device_time_total=500.0),
          SimpleNamespace(device_type=DeviceType.CPU, device_time_total=9999.0),
          # a record_function range mirrored on the device spans kernels already counted
          SimpleNamespace(device_type=DeviceType.CUDA, device_time_total=2000.0, is_user_annotation=True)]
    assert TS._device_busy_ms(ev) == 2.0
    assert TS._gpu_busy_ms(lambda: None, torch.device("cpu")) is None
    row = {"variant": "peft_kernels lora", "family": "lora", "trainable_params": 1, "step_ms": 4.0,
           "tokens_per_s": 10.0, "slowdown_vs_floor": None, "speedup_vs_peft": None, "peak_gib": 1.0,
           "gpu_busy_ms": 2.0, "gpu_busy_pct": 50.0, "status": "ok"}
    res = TS.TrainSpeedResult(meta={}, settings={"model": "tiny", "hidden_size": 1, "num_hidden_layers": 1,
                                                 "batch": 1, "seq": 1, "dtype": "bf16", "steps": 1, "warmup": 0,
                                                 "step": "x"}, rows=[row])
    monkeypatch.setattr("peft_kernels.bench.meta.stamp_line", lambda meta: "stamp")
    text = TS.train_speed_text(res)
    assert "GPU busy %" in text and " 50" in text and "leaves the GPU idle" in text


def _interrupt_at_call(monkeypatch, module, name: str, n: int) -> None:
    """Replace ``module.name`` by a wrapper that raises KeyboardInterrupt (a time limit's SIGINT) on
    its ``n``-th call and otherwise calls the original."""
    real, calls = getattr(module, name), []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)


def test_train_speed_interrupted_keeps_finished_rows(tmp_path, capsys, monkeypatch):
    """A SIGINT during the third model (HF PEFT) keeps the floor and peft_kernels rows, with their
    ratio to the floor, in the printout and the files; the exit code says it was cut short."""
    from peft_kernels.bench import train_speed

    _interrupt_at_call(monkeypatch, train_speed, "_time_steps", 3)
    rc = main(["train-speed", "--model", "tiny", "--family", "lora", "--seq", "16", "--batch", "1",
               "--steps", "1", "--warmup", "0", "--out", str(tmp_path), "--no-progress"])
    assert rc == 130
    assert "INTERRUPTED" in capsys.readouterr().out
    rows = json.loads((tmp_path / "train_speed.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["frozen model (floor)", "peft_kernels lora"]
    assert rows[1]["slowdown_vs_floor"] > 0


def test_train_speed_bad_model_path(tmp_path, capsys):
    rc = main(["train-speed", "--model", str(tmp_path / "nope.json"), "--out", str(tmp_path), "--no-progress"])
    assert rc == 2
    assert "--model must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("content,match", [("[1, 2]", "is an object, got a list"),
                                           ("{not json", "cannot read it as JSON"),
                                           ('{"model_type": "llama", "hidden_size": "wide"}', "not a usable 'llama' config")])
def test_train_speed_bad_model_config(tmp_path, capsys, content, match):
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    cfg.write_text(content)
    rc = main(["train-speed", "--model", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("command", [["bench", "--family", "lora"], ["train-speed"]])
def test_unusable_out_fails_before_the_run(tmp_path, capsys, monkeypatch, command):
    """--out is made (or refused) before anything is timed: a long GPU run must not finish and
    then lose its results to an unwritable path."""
    import peft_kernels.bench.layer as layer
    import peft_kernels.bench.train_speed as ts

    def no_run(*a, **k):
        raise AssertionError("the run started before --out was checked")

    monkeypatch.setattr(layer, "run_bench", no_run)
    monkeypatch.setattr(ts, "run_train_speed", no_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main([*command, "--out", str(blocker), "--no-progress"]) == 2
    assert "cannot be used as the output directory" in capsys.readouterr().err


def test_info_via_python_m():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "peft_kernels", "info"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert f"torch {torch.__version__}" in p.stdout
    assert "device=cpu" in p.stdout and "lora: default ->" in p.stdout


@pytest.mark.parametrize("argv, message", [
    (["bench", "--family", "lora,foo"], "unknown family 'foo'"),
    (["bench", "--shapes", "4096by4096"], "malformed shape '4096by4096'"),
    (["bench", "--shapes", "0x16"], "malformed shape '0x16'"),
    (["bench", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["bench", "--tokens", "-3"], "expected a positive integer"),
    (["train-speed", "--family", "adalora"], "unknown family 'adalora'"),
    (["train-speed", "--dropout", "1.5"], "expected a probability"),
    (["bench", "--clock", "thread", "--threads", "2"], "--clock thread"),
    ([], "required"),
])
def test_bad_arguments_give_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------- the baselines compute the reference's function
def _setup(d_in=37, d_out=23, T=11):
    return C.make_setup(d_in, d_out, T, torch.float64, torch.device("cpu"))


def test_monarch_two_bmm_matches_reference():
    s = _setup()
    for r in (1, 3):
        W1, W2 = C._monarch_params(s, dict(nblocks=4, blk_r=r, dropout=0.0))
        got = C.monarch_two_bmm(s.x, W1, W2, s.d_out)
        torch.testing.assert_close(got, R.monarch_adapter(s.x, W1, W2, s.d_out))


def test_sparse_baselines_match_reference():
    s = _setup()
    cfg = dict(density=0.1)
    crow, col, val = C._sparse_params(s, cfg)
    R.check_csr(crow, col, val, (s.d_out, s.d_in))
    want = R.sparse(s.x, s.weight, crow, col, val)
    for build in (C.sparse_densified, C.sparse_torch_csr):
        fwd, _ = build(s, cfg)
        torch.testing.assert_close(fwd(), want)


def test_lily_per_expert_matches_reference():
    s = _setup()
    cfg = dict(r=5, E=3, routing="token")
    fwd, (lp, router, hp) = C.lily_torch_per_expert(s, cfg)
    torch.testing.assert_close(fwd(), R.lily(s.x, s.weight, lp, router, hp, routing="token"))


@pytest.mark.parametrize("builder, ref_builder", [(C.lora_torch, C.lora_reference), (C.lora_peft, C.lora_reference),
                                                  (C.lily_peft, C.lily_reference)])
def test_peft_and_torch_baselines_match_reference(builder, ref_builder):
    s = _setup()
    cfg = dict(r=4, dropout=0.0) if "lora" in builder.__name__ else dict(r=4, E=3, routing="batch")
    fwd, params = builder(s, cfg)
    _, ref_params = ref_builder(s, cfg)
    if builder is C.lily_peft:  # PEFT stores B as (E*r, d_out) and the router as (E, r)
        A, Bw, router = params
        lp, hp = A, Bw.detach().reshape(cfg["E"], cfg["r"], s.d_out).transpose(1, 2)
        want = R.lily(s.x, s.weight, lp, router, hp, routing="batch")
    elif builder is C.lora_peft:
        A, B = params
        want = R.lora(s.x, s.weight, A, B, scaling=2.0)
    else:  # _lora_params draws from a fixed generator: the reference's factors hold the same values
        want = R.lora(s.x, s.weight, *ref_params[:2], scaling=2.0)
    torch.testing.assert_close(fwd(), want)


def test_saved_bytes_and_timer():
    s = _setup()
    w = s.weight
    # the frozen base keeps only the input (excluded) for backward: nothing extra
    assert saved_bytes(lambda: torch.nn.functional.linear(s.x, w), exclude=[s.x, w]) == 0
    fwd, params = C.lora_torch(s, dict(r=4, dropout=0.5))
    # dropout keeps its mask / dropped input (T x d_in) for backward
    assert saved_bytes(fwd, exclude=[s.x, w, *params]) >= s.x.numel()
    assert time_ms(lambda: fwd().sum().backward(), torch.device("cpu"), [s.x, *params], reps=2) > 0
    assert time_ms(fwd, torch.device("cpu"), reps=2, stat="min", clock="thread") > 0
    with pytest.raises(ValueError, match="stat"):
        time_ms(fwd, torch.device("cpu"), stat="mean")
    with pytest.raises(ValueError, match="clock"):
        time_ms(fwd, torch.device("cpu"), clock="process")


def test_targets_only_for_the_issue_setting():
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    lora = dict(r=16, dropout=0.0)
    assert C.target_for("lora", lora, (4096, 4096), 8192, bf16, cuda) == 1.10
    assert C.target_for("lora", lora, (4096, 11008), 8192, bf16, cuda) == 1.06
    assert C.target_for("lora", dict(r=64, dropout=0.0), (4096, 4096), 8192, bf16, cuda) is None
    assert C.target_for("lora", lora, (4096, 4096), 8192, bf16, cpu) is None
    assert C.target_for("lora", lora, (4096, 4096), 4096, bf16, cuda) is None
    assert C.target_for("sparse", dict(density=0.05), (4096, 4096), 8192, bf16, cuda) == 1.35
    assert C.target_for("lily", dict(r=16, E=4, routing="batch"), (4096, 4096), 8192, bf16, cuda) == 1.10


def test_report_marks_targets_and_failures(tmp_path):
    from peft_kernels.bench.layer import BenchResult, _row
    from peft_kernels.bench.meta import stamp
    from peft_kernels.bench.report import bench_text, write_bench

    res = BenchResult(meta=stamp(torch.device("cpu")),
                      settings={"families": ["lora"], "shapes": ["4096x4096"], "tokens": 8192, "dtype": "bfloat16",
                                "device": "cuda", "timer": "t", "ratio": "r"})
    shape = (4096, 4096)
    base = _row("lora", shape, 8192, torch.bfloat16, "-", "frozen base", fwd_ms=0.3, bwd_ms=0.4, fwdbwd_ms=0.7,
                fwd_ratio=1.0, bwd_ratio=1.0, fwdbwd_ratio=1.0, peak_mib=300.0)
    kern = _row("lora", shape, 8192, torch.bfloat16, "r=16 drop=0", "peft_kernels[triton]", fwd_ms=0.33,
                bwd_ms=0.45, fwdbwd_ms=0.80, fwd_ratio=1.1, bwd_ratio=1.12, fwdbwd_ratio=1.14, peak_mib=310.0,
                target=1.10, meets_target=False)
    broken = _row("lora", shape, 8192, torch.bfloat16, "r=16 drop=0", "torch.compile", status="error: boom")
    res.rows += [base, kern, broken]
    text = bench_text(res)
    assert "NO" in text and "1.10" in text and "error: boom" in text and "peak MiB" in text
    (tmp_path / "bench_sparse.png").write_bytes(b"an older run's figure")
    paths = write_bench(res, str(tmp_path))
    assert any(p.endswith("bench_lora.png") for p in paths)
    assert not (tmp_path / "bench_sparse.png").exists()  # no stale figure beside this run's tables
    write_bench(res, str(tmp_path), plots=False)
    assert not (tmp_path / "bench_lora.png").exists()


# ------------------------------------------------ LoRA base-pinned rows and the auto decisions
def _fake_decisions():
    """Two decisions in the form ``ops.lora.base_decisions()`` returns them (dtypes as torch dtypes)."""
    common = dict(device="cuda:0", dtype=torch.bfloat16, out_dtype=torch.bfloat16, tokens_bucket=8192,
                  r_pad=16, dropout=False, bias=False, c=False)
    return [dict(common, N=11008, K=4096, w_transposed=True, choice="triton", triton_ms=1.25, cublas_ms=1.5),
            dict(common, N=4096, K=11008, w_transposed=False, choice="cublas", triton_ms=1.5, cublas_ms=1.2)]


def test_bench_writes_and_prints_base_decisions(tmp_path, capsys, monkeypatch):
    from peft_kernels.ops import lora

    monkeypatch.setattr(lora, "base_decisions", _fake_decisions)
    out = tmp_path / "bo"
    rc = main(["bench", "--family", "lora", "--shapes", "24x16", "--tokens", "7", "--reps", "1", "--out",
               str(out), "--no-progress", "--no-plots"])
    assert rc == 0
    text = capsys.readouterr().out
    table = text[text.index("LoRA GEMM base decisions"):].splitlines()
    assert table[1].split()[:2] == ["gemm", "dtype"] and "cublas ms" in table[1] and "choice" in table[1]
    fwd_line, dx_line = table[3], table[4]
    assert fwd_line.split()[0] == "fwd" and fwd_line.split()[-1] == "triton" and "0.83" in fwd_line
    assert dx_line.split()[0] == "dX" and dx_line.split()[-1] == "cublas" and "1.25" in dx_line

    data = json.loads((out / "bench.json").read_text())
    got = data["base_decisions"]
    assert [d["gemm"] for d in got] == ["fwd", "dX"] and [d["choice"] for d in got] == ["triton", "cublas"]
    assert got[0]["dtype"] == "bfloat16" and got[0]["N"] == 11008 and got[0]["cublas_ms"] == 1.5
    assert got[1]["triton_over_cublas"] == pytest.approx(1.5 / 1.2)

    comments, rows = _read_csv(out / "base_decisions.csv")
    for k in STAMP_KEYS:
        assert comments.get(k) == str(data["meta"][k]), k
    assert [r["choice"] for r in rows] == ["triton", "cublas"]
    assert [float(r["triton_ms"]) for r in rows] == [1.25, 1.5] and rows[1]["K"] == "11008"


def test_bench_sparse_impl_decisions_and_triton_row(tmp_path, capsys, monkeypatch):
    """The sparse family's measured cuda-vs-Triton choices are printed and written
    (``sparse_impl_decisions.csv``, ``bench.json``); the pinned Triton row is GPU-only and says so."""
    from peft_kernels.ops import sparse

    fake = [dict(device="cuda:0", dtype=torch.bfloat16, tokens_bucket=8192, d_in=4096, d_out=4096, nnz_bucket=262144,
                 index_dtype=torch.int64, choice="triton", cuda_ms=0.5, triton_ms=0.25)]
    monkeypatch.setattr(sparse, "impl_decisions", lambda: fake)
    out = tmp_path / "so"
    rc = main(["bench", "--family", "sparse", "--shapes", "24x16", "--tokens", "7", "--reps", "1", "--out",
               str(out), "--no-progress", "--no-plots"])
    assert rc == 0
    text = capsys.readouterr().out
    table = text[text.index("native CUDA vs Triton"):].splitlines()
    assert table[1].split()[-3:] == ["choice", "cuda_ms", "triton_ms"]
    assert table[3].split()[-3:] == ["triton", "0.500", "0.250"]
    data = json.loads((out / "bench.json").read_text())
    assert data["sparse_decisions"][0]["dtype"] == "bfloat16" and data["sparse_decisions"][0]["choice"] == "triton"
    _, rows = _read_csv(out / "sparse_impl_decisions.csv")
    assert [r["choice"] for r in rows] == ["triton"] and float(rows[0]["cuda_ms"]) == 0.5
    pinned = [r for r in data["rows"] if r["variant"] == "peft_kernels (triton sparse ops)"]
    assert pinned and all(r["status"].startswith("skipped: GPU only") for r in pinned)


def test_bench_interrupted_keeps_what_was_measured(tmp_path, capsys, monkeypatch):
    """A SIGINT mid-run (gpu_session.sh's time limit sends one) ends the run early, but the rows
    measured so far are printed and written, and the exit code says it was cut short. Jobs run
    shape-major: every family's first shape before any family's second."""
    from peft_kernels.bench import layer

    jobs = layer._jobs(["lora", "sparse"], [(24, 16), (16, 24)], False, torch.device("cpu"))
    assert [(f, s) for _, f, s, c, v in jobs if v is None] == [("lora", (24, 16)), ("sparse", (24, 16)),
                                                            ("lora", (16, 24)), ("sparse", (16, 24))]
    _interrupt_at_call(monkeypatch, layer, "measure", 3)
    out = tmp_path / "bi"
    rc = main(["bench", "--family", "lora,sparse", "--shapes", "24x16,16x24", "--tokens", "7", "--reps", "1",
               "--out", str(out), "--no-progress", "--no-plots"])
    assert rc == 130
    text = capsys.readouterr().out
    assert "INTERRUPTED:" in text
    data = json.loads((out / "bench.json").read_text())
    measured = [r for r in data["rows"] if r["status"] == "ok"]
    assert len(measured) == 2 and measured[0]["variant"] == "frozen base"
    assert data["settings"]["cases"].endswith("(interrupted)")


def test_bench_defers_compile_rows_and_restores_table_order(monkeypatch):
    """torch.compile rows (a compile per shape) run after every other row of every shape, reuse the
    base timed for their (family, shape), and land back in their place in the table."""
    import dataclasses

    from peft_kernels.bench import layer

    spec = C.FAMILY_SPECS["lora"]
    i = next(k for k, v in enumerate(spec.variants) if v.name == "torch.compile")
    assert spec.variants[i].deferred
    shapes = [(24, 16), (16, 24)]
    jobs = layer._jobs(["lora", "monarch"], shapes, False, torch.device("cpu"))
    late = [j for j in jobs if j[4] is not None and j[4].deferred]
    assert late and jobs[-len(late):] == late and all(j[4].name == "torch.compile" for j in late)
    assert sorted(j[0] for j in jobs) == list(range(len(jobs)))  # every case once, with its table position
    # run it on the CPU (as plain torch LoRA) to see the base reuse and the order
    variants = list(spec.variants)
    variants[i] = dataclasses.replace(variants[i], build=C.lora_torch, gpu_only=False)
    monkeypatch.setitem(C.FAMILY_SPECS, "lora", dataclasses.replace(spec, variants=variants))
    res = layer.run_bench(families=["lora", "monarch"], shapes=shapes, tokens=5, reps=1, progress=False)
    keys = [(r["family"], r["shape"], r["config"], r["variant"].split("[")[0]) for r in res.rows]
    order = {}  # (family, shape, config label, variant name) -> position in the table order
    for fam, shape, cfg, var in layer._all_cases(["lora", "monarch"], shapes, False):
        label, name = ("-", "frozen base") if var is None else (C.FAMILY_SPECS[fam].label(cfg), var.name)
        order.setdefault((fam, f"{shape[0]}x{shape[1]}", label, name), len(order))
    assert [order[k] for k in keys] == sorted(order[k] for k in keys)
    compiled = [r for r in res.rows if r["variant"] == "torch.compile"]
    assert len(compiled) == 4 and all(r["status"] == "ok" and r["fwdbwd_ratio"] > 0 for r in compiled)
    assert sum(r["variant"] == "frozen base" for r in res.rows) == 4  # timed once per (family, shape)


def test_lora_base_rows_run_on_the_triton_path(interpret, monkeypatch):
    """Forced onto the Triton path (the interpreter on a CPU-only machine, else the GPU),
    the default row and the two base-pinned rows are all measured and labelled with their base,
    and each computes the reference's function (output and every gradient)."""
    from helpers import assert_close_to_reference, grads

    from peft_kernels.bench.layer import fused_builder, run_bench

    dev = interpret
    res = run_bench(families=["lora"], shapes=[(24, 16)], tokens=7, dtype=torch.float32, device=dev,
                    impl="triton", reps=1, progress=False)
    rows = {(r["config"], r["variant"]): r for r in res.rows}
    for cfg in ("r=16 drop=0", "r=16 drop=0.05"):
        for name, base in (("peft_kernels[triton]", "auto"), (C.LORA_TRITON_BASE, "triton"),
                           (C.LORA_CUBLAS_BASE, "cublas"), (C.LORA_TMA_BASE, "tma")):
            r = rows[(cfg, name)]
            assert r["status"] == "ok" and r["impl"] == "triton" and r["fwdbwd_ms"] > 0, r["status"]
            if os.environ.get("PEFT_KERNELS_BASE") is None or name != "peft_kernels[triton]":
                assert r["base"] == base
    if dev.type == "cuda":  # the auto row timed both bases for its forward and dX GEMMs
        assert {d["gemm"] for d in res.base_decisions} >= {"fwd", "dX"}
        assert all(d["triton_ms"] > 0 and d["cublas_ms"] > 0 for d in res.base_decisions)
    else:  # nothing is timed off a GPU (the auto base runs the Triton GEMM)
        assert res.base_decisions == []

    spec = C.FAMILY_SPECS["lora"]
    cfg = dict(r=5, dropout=0.25)
    exact_setup = C.make_setup(23, 13, 11, torch.float64, torch.device("cpu"))
    exact_fwd, exact_params = C.lora_reference(exact_setup, cfg)
    same_setup = C.make_setup(23, 13, 11, torch.float32, torch.device("cpu"))
    same_fwd, same_params = C.lora_reference(same_setup, cfg)
    exact_y, same_y = exact_fwd(), same_fwd()
    exact_g = grads(exact_y, [exact_setup.x, *exact_params], exact_setup.dy)
    same_g = grads(same_y, [same_setup.x, *same_params], same_setup.dy)
    from peft_kernels.ops import lora

    asked = []  # the base each row hands the op (None: the op's default)
    real_base_mode = lora.base_mode
    monkeypatch.setattr(lora, "base_mode", lambda base=None: asked.append(base) or real_base_mode(base))
    for var in spec.variants:
        if not var.fused:
            continue
        setup = C.make_setup(23, 13, 11, torch.float32, dev)
        fwd, params = fused_builder(var, "triton")(setup, cfg)
        asked.clear()
        y = fwd()
        assert asked == [var.base], (var.name, asked)
        got = grads(y, [setup.x, *params], setup.dy)
        assert_close_to_reference(f"{var.name} y", y.cpu(), same_y, exact_y)
        for n, g, sg, eg in zip(("dx", "dA", "dB"), got, same_g, exact_g):
            assert_close_to_reference(f"{var.name} {n}", g.cpu(), sg, eg)


def test_host_overhead_script_writes_rows(tmp_path):
    """benchmarks/host_overhead.py (its own process: it stubs every Triton launch) measures the
    host cost of a layer step for the fused and torch paths and HF PEFT, and writes them."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "host.json"
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "host_overhead.py"), "--cpu", "--steps", "3",
                        "--rounds", "1", "--only", "nn.Linear,lora r16:,monarch", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(out.read_text())
    names = [r["variant"] for r in got["rows"]]
    assert names[:3] == ["nn.Linear (frozen)", "lora r16: fused", "lora r16: torch path"]
    assert "monarch N4 r4: fused" in names and "lora r16: HF PEFT" in names
    assert all(r["us_per_step"] > 0 for r in got["rows"])
    assert got["meta"]["launches"].startswith("stubbed")


def test_train_speed_rounds_alternate_order_and_average(tmp_path, capsys, monkeypatch):
    """``--rounds 2``: every variant is measured once per round, the second round in reverse order
    (ABBA), and its row holds the mean step time and the spread between the rounds."""
    from peft_kernels.bench import train_speed

    seen = []
    for fn, tag in (("_floor_step", "floor"), ("_kernels_model", "pk"), ("_peft_model", "peft")):
        real = getattr(train_speed, fn)
        monkeypatch.setattr(train_speed, fn, lambda *a, real=real, tag=tag: seen.append(tag) or real(*a))
    rc = main(["train-speed", "--model", "tiny", "--family", "lora", "--seq", "16", "--batch", "1",
               "--steps", "2", "--warmup", "0", "--rounds", "2", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "2 rounds" in out and "spread %" in out
    data = json.loads((tmp_path / "train_speed.json").read_text())
    rows = data["rows"]
    names = [r["variant"] for r in rows]
    assert names == ["frozen model (floor)", "peft_kernels lora", "HF PEFT lora"]
    assert seen == ["floor", "pk", "peft", "peft", "pk", "floor"]  # a fresh model each time, ABBA
    assert data["settings"]["rounds"] == 2 and "ABBA" in data["settings"]["order"]
    for r in rows:
        assert r["status"] == "ok" and r["step_spread_pct"] is not None and r["step_spread_pct"] >= 0
        assert r["tokens_per_s"] == pytest.approx(16 / (r["step_ms"] / 1e3))


@pytest.mark.parametrize("adapter_dtype,want", [("auto", torch.float32), ("base", torch.bfloat16)])
def test_train_speed_builds_both_libraries_with_one_adapter_dtype(adapter_dtype, want):
    """In a bf16 model both libraries get the same adapter dtype: their common default (fp32
    adapters, PEFT's autocast_adapter_dtype=True) or the model's; the table says which."""
    from peft_kernels.bench import train_speed as TS

    pytest.importorskip("peft")
    s = TS.TrainSpeedSettings(model="tiny", seq=8, batch=1, steps=1, warmup=0, dtype=torch.bfloat16,
                              adapter_dtype=adapter_dtype)
    names = [name for name, _, _ in TS._variants(s)]
    assert names == ["frozen model (floor)", "peft_kernels lora", "HF PEFT lora"]
    config = TS.load_config("tiny")
    opts = TS.FAMILY_OPTIONS["lora"](s)
    _, ours = TS._kernels_model(config, "lora", opts, s, torch.device("cpu"))
    _, peft_params = TS._peft_model(config, "lora", opts, s, torch.device("cpu"))
    assert {p.dtype for p in ours} == {p.dtype for p in peft_params} == {want}
    res = TS.run_train_speed(s, progress=False)
    assert res.settings["adapter_dtype"] == adapter_dtype
    assert ("fp32 adapter" in res.settings["adapters"]) == (adapter_dtype == "auto")
    rows = {r["variant"]: r for r in res.rows}
    ours_row = rows["peft_kernels lora"]
    assert ours_row["speedup_vs_peft"] == pytest.approx(ours_row["tokens_per_s"] / rows["HF PEFT lora"]["tokens_per_s"])


def test_train_speed_failure_in_a_later_round_voids_the_row(tmp_path, monkeypatch):
    """A variant that fails in round 2 after measuring in round 1 is an error row with no figures,
    and no other row is compared with its round-1 numbers."""
    from peft_kernels.bench import train_speed as TS

    calls = []
    real = TS._peft_model

    def flaky(*a):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of luck")
        return real(*a)

    monkeypatch.setattr(TS, "_peft_model", flaky)
    s = TS.TrainSpeedSettings(model="tiny", seq=8, batch=1, steps=1, warmup=0, rounds=2)
    rows = {r["variant"]: r for r in TS.run_train_speed(s, progress=False).rows}
    peft, ours = rows["HF PEFT lora"], rows["peft_kernels lora"]
    assert peft["status"].startswith("error: RuntimeError: out of luck") and "round 2" in peft["status"]
    assert peft["tokens_per_s"] is None and peft["step_ms"] is None and peft["rounds_done"] == 1
    assert ours["status"] == "ok" and ours["rounds_done"] == 2 and ours["speedup_vs_peft"] is None
    assert ours["slowdown_vs_floor"] > 0
