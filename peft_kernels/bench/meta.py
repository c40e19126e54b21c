"""The stamp every benchmark file carries: device, library versions, git commit, date."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Optional

import torch

GPU_NOTE = ("No CUDA device: these are small CPU figures (torch / C++ paths, or the Triton interpreter "
            "when forced), useful to check the pipeline and relative costs only. GPU figures need a GPU (the issues' targets are H100 "
            "bf16 figures): rerun the same command on a CUDA machine.")


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken installs are reported, not raised
        return "not installed"
    return str(getattr(mod, "__version__", "unknown"))


def git_commit(path: Optional[str] = None) -> str:
    """``HEAD`` of the repository holding the package (``+dirty`` with local changes), or ``unknown``."""
    path = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        commit = head.stdout.strip()
        status = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        if status.returncode == 0 and status.stdout.strip():
            commit += "+dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()} ({torch.get_num_threads()} threads)"


def stamp(device: torch.device) -> dict:
    """Metadata written into every CSV / JSON / PNG the benchmarks produce."""
    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "peft_kernels": _version("peft_kernels"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type != "cuda":
        meta["note"] = GPU_NOTE
    return meta


def stamp_line(meta: dict) -> str:
    return (f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | peft {meta['peft']} | "
            f"commit {meta['git_commit'][:12]}{'+dirty' if meta['git_commit'].endswith('+dirty') else ''} | "
            f"{meta['date_utc']}")
