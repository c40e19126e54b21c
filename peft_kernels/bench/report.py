"""Terminal tables, CSV, JSON and PNG plots, each stamped with device, versions, commit and date."""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Optional, Sequence

from .meta import stamp_line


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return format(v, spec)


def format_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """Plain fixed-width table; ``columns`` = (header, key, format spec)."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([_fmt(r.get(k), f) if f else str(r.get(k) if r.get(k) is not None else "-")
                      for _, k, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells[1:]]
    return "\n".join(lines)


BENCH_COLUMNS = (
    ("shape", "shape", None), ("config", "config", None), ("variant", "variant", None), ("base", "base", None),
    ("fwd ms", "fwd_ms", ".3f"), ("bwd ms", "bwd_ms", ".3f"), ("f+b ms", "fwdbwd_ms", ".3f"),
    ("fwd x", "fwd_ratio", ".2f"), ("bwd x", "bwd_ratio", ".2f"), ("f+b x", "fwdbwd_ratio", ".2f"),
    ("peak MiB", "peak_mib", ".1f"), ("saved MiB", "saved_mib", ".2f"), ("base spread %", "base_spread_pct", ".1f"),
    ("target", "target", ".2f"), ("met", "meets_target", None),
)


DECISION_TABLE = (
    ("gemm", "gemm", None), ("dtype", "dtype", None), ("T bucket", "tokens_bucket", None), ("N", "N", None),
    ("K", "K", None), ("r pad", "r_pad", None), ("dropout", "dropout", None), ("bias", "bias", None),
    ("triton ms", "triton_ms", ".3f"), ("cublas ms", "cublas_ms", ".3f"), ("tma ms", "tma_ms", ".3f"),
    ("tri/cub", "triton_over_cublas", ".2f"),
    ("choice", "choice", None),
)


def _not_measured(rows: Sequence[dict]) -> list:
    """One line per status for rows that did not run: a reason shared by many cases and variants
    (GPU-only competitors on the CPU) is said once, naming the variants and how many cases each."""
    groups: dict = {}
    for r in rows:
        if r["status"] != "ok":
            groups.setdefault(r["status"], {}).setdefault(r["variant"], []).append(r)
    lines = []
    for status, by_variant in groups.items():
        names = ", ".join(by_variant)
        counts = {len(rs) for rs in by_variant.values()}
        if len(by_variant) == 1 and counts == {1}:
            rs = next(iter(by_variant.values()))
            where = f"{rs[0]['shape']} {rs[0]['config']} {names}"
        elif len(by_variant) == 1 and max(counts) <= 3:
            rs = next(iter(by_variant.values()))
            where = f"{names}: " + "; ".join(f"{r['shape']} {r['config']}" for r in rs)
        elif len(counts) == 1:
            n = counts.pop()
            where = f"{names}: {n} case{'s' if n > 1 else ''}{' each' if len(by_variant) > 1 else ''}"
        else:
            where = f"{names}: {sum(len(rs) for rs in by_variant.values())} cases"
        lines.append(f"  [{where}] {status}")
    return lines


def decisions_text(decisions: Sequence[dict]) -> str:
    """The LoRA GEMM's base='auto' decisions (empty string when none were taken)."""
    if not decisions:
        return ""
    return ("== LoRA GEMM base decisions (LoRA, and Monarch's fused-GEMM path; base=auto: Triton GEMM + "
            "LoRA epilogue vs cuBLAS + in-place LoRA pass, both timed once per shape key, the faster kept; "
            "fwd = x @ W0^T, dX = dY @ W0; tri/cub > 1: cuBLAS faster) ==\n"
            + format_table(decisions, DECISION_TABLE))


def bench_text(result) -> str:
    """The terminal report: stamp, settings, one table per family, failures listed under it."""
    meta, s = result.meta, result.settings
    out = [f"peft-kernels bench | {stamp_line(meta)}",
           f"tokens={s['tokens']} dtype={s['dtype']} device={s['device']} timer: {s['timer']}",
           "ratios (x) = variant / frozen base linear measured in this run (the mean of its timings before and "
           "after the variants; base spread % = how far they lay apart); f+b = forward+backward; "
           "saved = activations kept for backward beyond input and weights"]
    if meta.get("note"):
        out.append(f"NOTE: {meta['note']}")
    if getattr(result, "interrupted", False):
        out.append(f"INTERRUPTED: {s.get('cases')} cases measured; the rest are missing below")
    for fam in s["families"]:
        rows = [r for r in result.rows if r["family"] == fam]
        ok = [r for r in rows if r["status"] == "ok"]
        out.append("")
        out.append(f"== {fam} ==")
        cols = BENCH_COLUMNS if any(r["target"] is not None for r in ok) else BENCH_COLUMNS[:-2]
        if s["device"].startswith("cpu") or all(r["peak_mib"] is None for r in ok):
            cols = tuple(c for c in cols if c[1] != "peak_mib")
        if all(r.get("base") is None for r in ok):  # only LoRA's Triton path has a base GEMM to name
            cols = tuple(c for c in cols if c[1] != "base")
        out.append(format_table(ok, cols))
        derived = [r for r in ok if r.get("bwd_method") == "fwd+bwd minus fwd"]
        if derived:
            names = ", ".join(sorted({r["variant"] for r in derived}))
            out.append(f"  bwd of {names} = f+b - fwd (its graph cannot be retained for a separate backward)")
        missing = _not_measured(rows)
        if missing:
            out.append("  not measured:")
            out += missing
    table = decisions_text(getattr(result, "base_decisions", None) or [])
    if table:
        out += ["", table]
    sparse = getattr(result, "sparse_decisions", None) or []
    if sparse:
        from .layer import SPARSE_DECISION_COLUMNS

        out += ["", "== sparse ops: native CUDA vs Triton, both timed once per shape key (forward SpMM-add + "
                    "SDDMM, ms), the faster kept ==",
                format_table(sparse, [(c, c, ".3f" if c.endswith("_ms") else None) for c in SPARSE_DECISION_COLUMNS])]
    return "\n".join(out)


def write_csv(path: str, rows: Sequence[dict], meta: dict, settings: Optional[dict] = None,
              fieldnames: Optional[Sequence[str]] = None) -> str:
    """CSV with the stamp as leading ``#`` comment lines (``pandas.read_csv(comment='#')`` reads it).
    ``fieldnames`` gives the header when ``rows`` may be empty (default: the first row's keys)."""
    keys = list(fieldnames) if fieldnames is not None else (list(rows[0].keys()) if rows else [])
    for r in rows:  # keys the caller did not list still reach the file
        keys += [k for k in r if k not in keys]
    tmp = path + ".tmp"
    # a setting named like a stamp key (``device``: "cuda" vs the stamp's device name) is written
    # as ``settings.<key>`` so it cannot hide the stamp
    header = {**meta, **{(f"settings.{k}" if k in meta else k): v for k, v in (settings or {}).items()}}
    with open(tmp, "w", newline="") as f:
        for k, v in header.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)  # never leave a half-written table behind
    return path


def write_json(path: str, payload: dict) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)
    return path


def _figure_stamp(fig, meta: dict) -> None:
    text = stamp_line(meta)
    if meta.get("note"):
        text += "\nCPU figures (no CUDA device); GPU figures need a GPU"
    fig.text(0.01, 0.005, text, fontsize=6.5, color="0.35", ha="left", va="bottom")


def _png_metadata(meta: dict) -> dict:
    return {"Title": "peft-kernels benchmark", "Software": f"peft_kernels {meta.get('peft_kernels')}",
            "Description": json.dumps(meta)}


def plot_bench(result, out_dir: str) -> list:
    """One PNG per family: grouped bars of the fwd+bwd ratio per (shape, config), one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")  # never needs a display
    import matplotlib.pyplot as plt

    paths = []
    for fam in result.settings["families"]:
        rows = [r for r in result.rows if r["family"] == fam and r["status"] == "ok" and r["config"] != "-"]
        if not rows:
            continue
        groups = list(dict.fromkeys((r["shape"], r["config"]) for r in rows))
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        width = 0.8 / max(1, len(variants))
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 4.2))
        for j, v in enumerate(variants):
            xs, ys = [], []
            for i, g in enumerate(groups):
                r = next((r for r in rows if (r["shape"], r["config"]) == g and r["variant"] == v), None)
                if r is not None and r["fwdbwd_ratio"] is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r["fwdbwd_ratio"])
            ax.bar(xs, ys, width=width, label=v)
        for i, g in enumerate(groups):
            tgt = next((r["target"] for r in rows if (r["shape"], r["config"]) == g and r["target"]), None)
            if tgt:
                ax.hlines(tgt, i - 0.45, i + 0.45, colors="k", linestyles="dashed", linewidth=1)
        ax.axhline(1.0, color="0.5", linewidth=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{s}\n{c}" for s, c in groups], fontsize=7)
        ax.set_ylabel("fwd+bwd time / frozen base")
        s = result.settings
        ax.set_title(f"{fam}: T={s['tokens']} {s['dtype']} on {result.meta['device']}"
                     + (" (dashed: target)" if any(r["target"] for r in rows) else ""), fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        _figure_stamp(fig, result.meta)
        path = os.path.join(out_dir, f"bench_{fam}.png")
        fig.savefig(path, dpi=110, metadata=_png_metadata(result.meta))
        plt.close(fig)
        paths.append(path)
    return paths


def write_bench(result, out_dir: str, plots: bool = True) -> list:
    """CSV + JSON (+ PNGs) of one bench run into ``out_dir``; returns the paths written.

    ``base_decisions.csv`` and ``sparse_impl_decisions.csv`` are written on every run, header only
    when no decision was taken (CPU, or every row pinned), so a directory never keeps a stale one
    from an older run."""
    from .layer import DECISION_COLUMNS, SPARSE_DECISION_COLUMNS

    os.makedirs(out_dir, exist_ok=True)
    decisions = list(getattr(result, "base_decisions", None) or [])
    sparse = list(getattr(result, "sparse_decisions", None) or [])
    paths = [write_csv(os.path.join(out_dir, "bench.csv"), result.rows, result.meta, result.settings),
             write_json(os.path.join(out_dir, "bench.json"),
                        {"meta": result.meta, "settings": result.settings, "rows": result.rows,
                         "base_decisions": decisions, "sparse_decisions": sparse}),
             write_csv(os.path.join(out_dir, "base_decisions.csv"), decisions, result.meta, result.settings,
                       fieldnames=DECISION_COLUMNS),
             write_csv(os.path.join(out_dir, "sparse_impl_decisions.csv"), sparse, result.meta, result.settings,
                       fieldnames=SPARSE_DECISION_COLUMNS)]
    # an older run's figures would sit beside this run's tables (another --family, or --no-plots):
    # remove every figure this command writes before drawing this run's
    from .cases import FAMILY_SPECS

    for fam in FAMILY_SPECS:
        stale = os.path.join(out_dir, f"bench_{fam}.png")
        if os.path.exists(stale):
            os.unlink(stale)
    if plots:
        try:
            paths += plot_bench(result, out_dir)
        except ImportError as e:  # matplotlib is in the [bench] extra; the tables still stand
            print(f"peft-kernels bench: no plots ({e}); pip install matplotlib", file=sys.stderr)
    return paths
