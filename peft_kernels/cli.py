"""The ``peft-kernels`` command (also ``python -m peft_kernels``).

- ``bench``: every adapter family's layer against the frozen base linear, HF PEFT and plain torch
  in one process; table on the terminal, CSV/JSON/PNG in ``--out``. The README's main job.
- ``train-speed``: tokens/s and peak memory of a Llama-style model with adapters on every linear.
- ``info``: versions and which implementation each family uses on this machine.
- ``select`` / ``finetune``: the training layer's commands (``peft_kernels.train.cli``).

With no GPU both benchmarks run a small embedded default on the CPU (torch path) in well under
two minutes and say that GPU figures need a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

from ._argtypes import dropout_value, nonneg_int, positive_int

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


# ------------------------------------------------------------------ argument types (clear errors)
def family_list(text: str) -> list:
    from .bench.cases import FAMILIES

    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list from {', '.join(FAMILIES)}")
    bad = [t for t in items if t not in FAMILIES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown family {', '.join(map(repr, bad))}; choose from {', '.join(FAMILIES)}")
    return list(dict.fromkeys(items))


def shape_list(text: str) -> list:
    shapes = []
    for item in (t.strip() for t in text.split(",")):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(
                f"malformed shape {item!r}: expected D_INxD_OUT with positive integers, e.g. 4096x11008")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def dtype_value(text: str) -> torch.dtype:
    if text.lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from bf16, fp16, fp32")
    return DTYPES[text.lower()]


def device_value(text: str) -> str:
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device must be cpu or cuda[:N], got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("--device cuda asked for, but torch sees no CUDA device")
    return str(dev)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _out_dir_error(out: str) -> str | None:
    """Make ``--out`` (a directory) before a run, so a long GPU run cannot finish and then lose
    its results to an unwritable path; the reason it cannot be used, or None."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        return f"--out {out!r} cannot be used as the output directory ({e.strerror or e})"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"--out {out!r} is not writable"
    return None


# ------------------------------------------------------------------------------------ commands
def cmd_bench(args) -> int:
    from .bench.layer import run_bench
    from .bench.report import bench_text, write_bench

    bad_out = _out_dir_error(args.out)
    if bad_out:
        print(f"peft-kernels bench: error: {bad_out}", file=sys.stderr)
        return 2
    device = torch.device(args.device or _default_device())
    if device.type == "cpu":
        print("peft-kernels bench: no CUDA device, running the small CPU default on the torch path. "
              "GPU figures need a GPU.", file=sys.stderr)
    result = run_bench(families=args.family, shapes=args.shapes, tokens=args.tokens, dtype=args.dtype,
                       device=device, sweep=args.sweep, impl=args.impl, reps=args.reps,
                       progress=not args.no_progress, threads=args.threads, stat=args.stat,
                       clock=args.clock)
    print(bench_text(result))
    paths = write_bench(result, args.out, plots=not args.no_plots)
    print(f"\nwrote {', '.join(paths)}")
    if getattr(result, "interrupted", False):
        print(f"peft-kernels bench: interrupted after {result.settings['cases']} cases; the files hold those",
              file=sys.stderr)
        return 130
    return 0


def cmd_train_speed(args) -> int:
    from .bench.train_speed import TrainSpeedSettings, run_train_speed, train_speed_text, write_train_speed

    bad_out = _out_dir_error(args.out)
    if bad_out:
        print(f"peft-kernels train-speed: error: {bad_out}", file=sys.stderr)
        return 2
    device = torch.device(args.device or _default_device())
    gpu = device.type == "cuda"
    if not gpu:
        print("peft-kernels train-speed: no CUDA device, running on the CPU with the torch path. "
              "GPU figures need a GPU.", file=sys.stderr)
    s = TrainSpeedSettings(
        model=args.model or ("llama-1b" if gpu else "tiny"), families=args.family,
        seq=args.seq or (2048 if gpu else 128), batch=args.batch or (4 if gpu else 2),
        steps=args.steps or 10, warmup=args.warmup if args.warmup is not None else 3,
        dtype=args.dtype or (torch.bfloat16 if gpu else torch.float32), device=str(device), r=args.r,
        dropout=args.dropout, impl=args.impl, threads=args.threads,
        rounds=args.rounds or (2 if gpu else 1), adapter_dtype=args.adapter_dtype)
    try:
        result = run_train_speed(s, progress=not args.no_progress)
    except ValueError as e:  # a bad --model path: say so plainly
        print(f"peft-kernels train-speed: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"peft-kernels train-speed: error: needs transformers ({e}); "
              "pip install -e '.[bench]'", file=sys.stderr)
        return 2
    print(train_speed_text(result))
    paths = write_train_speed(result, args.out)
    print(f"\nwrote {', '.join(paths)}")
    if getattr(result, "interrupted", False):
        print("peft-kernels train-speed: interrupted; the files hold the finished rows", file=sys.stderr)
        return 130
    return 0


def info_text() -> str:
    import platform

    from . import __version__, dispatch
    from ._ext import native_error
    from .bench.cases import FAMILY_SPECS
    from .bench.meta import _version, device_name, git_commit

    # import every op module so each family has registered its implementations
    missing = []
    for spec in FAMILY_SPECS.values():
        try:
            __import__(spec.op_module)
        except Exception as e:  # noqa: BLE001
            missing.append(f"{spec.op_module}: {type(e).__name__}: {e}")
    lines = [f"peft_kernels {__version__} (commit {git_commit()})",
             f"python {platform.python_version()}  torch {torch.__version__} (cuda {torch.version.cuda or 'none'})  "
             f"triton {_version('triton')}  peft {_version('peft')}  transformers {_version('transformers')}",
             f"native extension: {'loaded' if native_error() is None else native_error()}",
             "  ".join(f"{k}={os.environ.get(k, '') or unset}" for k, unset in (
                 ("TRITON_INTERPRET", "0"), ("PEFT_KERNELS_IMPL", "(unset)"), ("PEFT_KERNELS_BASE", "(unset: auto)"),
                 ("PEFT_KERNELS_AUTO_BASES", "(unset: all)"), ("PEFT_KERNELS_TUNE_CACHE", "(unset: on)"))),
             "", f"[cpu] {device_name(torch.device('cpu'))}", dispatch.explain("cpu", torch.float32)]
    if torch.cuda.is_available():
        lines += ["", f"[cuda] {device_name(torch.device('cuda'))}", dispatch.explain("cuda", torch.bfloat16)]
    else:
        lines += ["", "[cuda] no CUDA device visible to torch"]
    if missing:
        lines += ["", "op modules that failed to import:"] + [f"  {m}" for m in missing]
    return "\n".join(lines)


def cmd_info(args) -> int:
    print(info_text())
    return 0


# -------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .bench.cases import FAMILIES

    p = argparse.ArgumentParser(prog="peft-kernels", description="Fused kernels for parameter-efficient "
                                "fine-tuning: benchmarks, training-speed comparison, fine-tuning.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser("bench", help="layer benchmark of every family vs the frozen base, HF PEFT, plain torch",
                       description="Forward, backward and forward+backward time of each adapted layer as a ratio "
                       "to the frozen base linear (grad to input only), against HF PEFT and plain torch in the "
                       "same process, plus peak memory. GPU defaults: shapes 4096x4096,4096x11008,11008x4096, "
                       "T=8192, bf16. CPU default (no GPU): a small run on the torch path.")
    b.add_argument("--family", type=family_list, default=list(FAMILIES), metavar="LIST",
                   help=f"comma-separated families (default: {','.join(FAMILIES)})")
    b.add_argument("--shapes", type=shape_list, default=None, metavar="LIST",
                   help="comma-separated D_INxD_OUT shapes (default: GUIDE's three on GPU, small ones on CPU)")
    b.add_argument("--tokens", type=positive_int, default=None, help="tokens T (default 8192 GPU, 256 CPU)")
    b.add_argument("--dtype", type=dtype_value, default=None, help="bf16 | fp16 | fp32 (default bf16 GPU, fp32 CPU)")
    b.add_argument("--device", type=device_value, default=None, help="cpu or cuda (default: cuda when present)")
    b.add_argument("--out", default="bench_out", help="output directory for CSV/JSON/PNG (default ./bench_out)")
    b.add_argument("--sweep", action="store_true",
                   help="the full per-family sweeps of the kernel issues (ranks, dropout, densities, E)")
    b.add_argument("--impl", choices=("torch", "triton", "cuda", "cpp"), default=None,
                   help="force peft_kernels' implementation (default: dispatch's choice)")
    b.add_argument("--reps", type=positive_int, default=5, help="CPU timer repetitions (GPU uses do_bench)")
    b.add_argument("--threads", type=positive_int, default=None,
                   help="CPU only: torch threads while timing (default 1: stable ratios on a shared machine)")
    b.add_argument("--stat", choices=("median", "min"), default="median",
                   help="CPU only: statistic over the timed calls (min suits a shared, noisy machine)")
    b.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="CPU only: wall clock (time.perf_counter) or this thread's CPU time, which a busy "
                        "shared machine cannot inflate (single-threaded runs only)")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("train-speed", help="tokens/s and peak memory of a Llama-style model with adapters",
                       description="Fine-tuning throughput of a Llama-style causal LM built from a config "
                       "(random weights, no downloads) with adapters on all linear layers: the frozen floor, "
                       "peft_kernels (adapt) and HF PEFT. GPU default: llama-1b, seq 2048, batch 4, bf16.")
    t.add_argument("--model", default=None, help="tiny | llama-1b | path to an HF config json "
                   "(default llama-1b on GPU, tiny on CPU)")
    t.add_argument("--family", type=family_list, default=["lora"], metavar="LIST",
                   help=f"comma-separated families from {','.join(FAMILIES)} (default lora)")
    t.add_argument("--seq", type=positive_int, default=None, help="sequence length (default 2048 GPU, 128 CPU)")
    t.add_argument("--batch", type=positive_int, default=None, help="batch size (default 4 GPU, 2 CPU)")
    t.add_argument("--steps", type=positive_int, default=None, help="timed steps (default 10)")
    t.add_argument("--warmup", type=nonneg_int, default=None, help="warm-up steps (default 3)")
    t.add_argument("--rounds", type=positive_int, default=None,
                   help="passes over the variants, order reversed every other pass; times are the mean "
                        "(default 2 on GPU, 1 on CPU)")
    t.add_argument("--dtype", type=dtype_value, default=None, help="bf16 | fp16 | fp32")
    t.add_argument("--device", type=device_value, default=None, help="cpu or cuda")
    t.add_argument("--r", type=positive_int, default=16, help="adapter rank for lora / lily (default 16)")
    t.add_argument("--dropout", type=dropout_value, default=0.0, help="adapter dropout (default 0)")
    t.add_argument("--adapter-dtype", choices=("auto", "base"), default="auto",
                   help="adapter weights' dtype, for both libraries: auto = their default (fp32 adapters in a "
                        "bf16/fp16 model), base = the model's dtype (default auto)")
    t.add_argument("--impl", choices=("torch", "triton", "cuda", "cpp"), default=None,
                   help="force peft_kernels' implementation")
    t.add_argument("--threads", type=positive_int, default=None,
                   help="CPU only: torch threads while timing (default 1)")
    t.add_argument("--out", default="bench_out", help="output directory for CSV/JSON (default ./bench_out)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train_speed)

    i = sub.add_parser("info", help="versions and the implementation each family uses here")
    i.set_defaults(func=cmd_info)

    try:  # the training layer's commands (select, finetune) register themselves
        from .train import cli as train_cli
    except ModuleNotFoundError as e:
        if e.name != "peft_kernels.train.cli":
            print(f"peft-kernels: select/finetune unavailable ({e})", file=sys.stderr)
        train_cli = None
    except Exception as e:  # noqa: BLE001 - a broken training layer must not take bench down with it
        print(f"peft-kernels: select/finetune unavailable ({type(e).__name__}: {e})", file=sys.stderr)
        train_cli = None
    if train_cli is not None and hasattr(train_cli, "register"):
        train_cli.register(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "clock", None) == "thread" and (args.threads or 1) > 1:
        parser.error("--clock thread counts only the calling thread's CPU time: use it with --threads 1")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
