"""Per-layer (or per-group) adapter ranks by Bayesian optimisation under a parameter budget (FLoE's step 2).

FLoE estimates each kept layer's rank with Bayesian optimisation instead of a grid. The paper leaves
the optimiser and the search space open; *this package's choices*:

- optimiser: optuna's TPE (``TPESampler(seed=seed)``, a well-kept library; one trial at a time), so
  the same seed gives the same sequence of trials and, on a deterministic device, the same result;
- search space: one categorical rank per group from ``choices`` (default powers of two 2..16); a
  group is a layer (block) by default, or each module (``group_by="module"``), or a mapping you give;
- budget: the total number of adapter parameters; a sampled configuration above it is pruned
  before any training (TPE learns to avoid that region); a budget that cannot pay even the
  smallest rank everywhere raises ``ValueError`` up front;
- objective: the validation loss after a short training probe (``probe`` steps of the trainer)
  of a freshly built model adapted with the sampled ranks (every probe starts from the same seed);
- bounds: ``n_trials`` and ``timeout`` seconds (whichever comes first; a timeout makes the trial
  count, and so the result, depend on the machine's speed).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .fisher import exact_names, layer_of

DEFAULT_CHOICES = (2, 4, 8, 16)


def adapter_param_count(linear_shape: tuple, method: str, r: int, **options) -> int:
    """Adapter parameters of one module of ``method`` at rank ``r`` (built on the meta device).

    ``linear_shape`` is ``(d_out, d_in)`` (see :func:`linear_shape`; a Conv1D's weight is transposed)."""
    from ..adapters import family_class

    d_out, d_in = linear_shape
    cls = family_class(method)
    m = cls.from_linear(nn.Linear(d_in, d_out, device="meta"), r=r, **options)
    return sum(p.numel() for n, p in m.named_parameters() if not n.startswith("base_layer."))


def adapt_with_ranks(model: nn.Module, method: str, ranks: Mapping[str, int], **options):
    """Adapt the named modules of ``model``, module ``name`` at rank ``ranks[name]``.

    Built with :func:`peft_kernels.adapters.adapt` (so save/load/merge work: each module's own
    options, rank included, go into the checkpoint), then modules whose rank differs from the
    most common one are rebuilt at their rank.
    """
    from ..adapters import _cast_adapters, adapt

    if not ranks:
        raise ValueError("adapt_with_ranks: no modules given")
    bad = {n: r for n, r in ranks.items() if isinstance(r, bool) or not isinstance(r, int) or r < 1}
    if bad:
        raise ValueError(f"adapt_with_ranks: ranks must be ints >= 1, got {bad}")
    counts: Dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r0 = max(sorted(counts), key=lambda r: counts[r])
    adapted = adapt(model, method=method, target_modules=exact_names(list(ranks)), r=r0, **options)
    for name, r in ranks.items():
        if r == r0:
            continue
        old = adapted.model.get_submodule(name)
        cfg = {**old.adapter_config(), "r": r}
        new = type(old).from_linear(old.base_layer, **cfg)
        # what adapt() set on the module it replaces: the adapter dtype (fp32 adapters on a
        # half-precision model by default) and a Conv1D layer's weight layout
        _cast_adapters({name: new}, adapted.adapter_dtype)
        for k, p in new.named_parameters():
            p.requires_grad_(not k.startswith("base_layer."))
        if getattr(old, "_conv1d_layout", False):
            new._conv1d_layout = True
        parent_name, _, leaf = name.rpartition(".")
        parent = adapted.model.get_submodule(parent_name) if parent_name else adapted.model
        setattr(parent, leaf, new)
    return adapted


def linear_shape(module: nn.Module, name: str = "module") -> tuple:
    """``(d_out, d_in)`` of an ``nn.Linear`` or a ``transformers`` ``Conv1D`` (GPT-2's, weight ``(in, out)``)."""
    from ..adapters import _is_conv1d

    if isinstance(module, nn.Linear):
        return tuple(module.weight.shape)
    if _is_conv1d(module):
        return (module.nf, module.nx)
    raise ValueError(f"{name!r} is a {type(module).__name__}, not an nn.Linear or transformers Conv1D")


@dataclasses.dataclass
class RankSearchResult:
    ranks: Dict[str, int]                 # module name -> rank (the best trial)
    group_ranks: Dict[str, int]           # group -> rank
    value: float                          # its validation loss
    params: int                           # its adapter parameter count
    budget: Optional[int]
    trials: List[dict]                    # every trial: number, group ranks, params, value or state

    def table(self) -> str:
        lines = [f"Rank search: {len(self.trials)} trials, best validation loss {self.value:.4f} "
                 f"with {self.params:,d} adapter parameters" + (f" (budget {self.budget:,d})" if self.budget else "")]
        width = max(len(g) for g in self.group_ranks)
        lines += [f"  {g:<{width}}  r={r}" for g, r in self.group_ranks.items()]
        return "\n".join(lines)


def _groups(names: Sequence[str], group_by: Union[str, Mapping[str, str]]) -> Dict[str, List[str]]:
    if isinstance(group_by, Mapping):
        missing = [n for n in names if n not in group_by]
        if missing:
            raise ValueError(f"group_by mapping lacks module(s) {missing}")
        key = lambda n: group_by[n]  # noqa: E731
    elif group_by == "layer":
        key = layer_of
    elif group_by == "module":
        key = lambda n: n  # noqa: E731
    else:
        raise ValueError(f"group_by must be 'layer', 'module' or a mapping, got {group_by!r}")
    out: Dict[str, List[str]] = {}
    for n in names:
        out.setdefault(key(n), []).append(n)
    return out


def search_ranks(build_model: Callable[[], nn.Module], modules: Sequence[str], train_data: Sequence,
                 eval_data: Sequence, collate_fn: Callable, method: str = "lora", budget: Optional[int] = None,
                 choices: Sequence[int] = DEFAULT_CHOICES, group_by: Union[str, Mapping[str, str]] = "layer",
                 n_trials: int = 8, timeout: Optional[float] = None, seed: int = 0, probe_steps: int = 20,
                 probe_config=None, prepare: Optional[Callable[[nn.Module], None]] = None,
                 **adapter_options) -> RankSearchResult:
    """Search one rank per group of ``modules`` (full module names) minimising the probe's eval loss.

    ``build_model()`` returns a fresh un-adapted model each call; ``prepare(model)`` runs after the
    adapters are in (e.g. to unfreeze a classification head). ``probe_config``: a
    :class:`~peft_kernels.train.trainer.TrainConfig` for the probe (``max_steps`` defaults to
    ``probe_steps``; progress bars off; no checkpoints).
    """
    import optuna

    from .trainer import TrainConfig, Trainer, evaluate

    modules = list(modules)
    if not modules:
        raise ValueError("search_ranks: no modules to search ranks for")
    choices = sorted({int(c) for c in choices})
    if not choices or choices[0] < 1:
        raise ValueError(f"search_ranks: choices must be ranks >= 1, got {choices}")
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"search_ranks: n_trials must be an int >= 1, got {n_trials!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"search_ranks: timeout must be > 0 seconds or None, got {timeout!r}")
    groups = _groups(modules, group_by)

    torch.manual_seed(seed)
    probe_model = build_model()
    shapes = {}
    for n in modules:
        try:
            lin = probe_model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"search_ranks: unknown module name {n!r}") from None
        try:
            shapes[n] = linear_shape(lin, n)
        except ValueError as e:
            raise ValueError(f"search_ranks: {e}") from None
    del probe_model
    cost = {(n, r): adapter_param_count(shapes[n], method, r, **adapter_options) for n in modules for r in choices}
    min_cost = sum(cost[(n, choices[0])] for n in modules)
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"search_ranks: budget must be a positive int (adapter parameters), got {budget!r}")
        one_rank = sum(adapter_param_count(shapes[n], method, 1, **adapter_options) for n in modules)
        if budget < one_rank:
            raise ValueError(f"search_ranks: budget {budget:,d} is below one rank per layer ({one_rank:,d} adapter "
                             f"parameters for rank 1 on all {len(modules)} modules)")
        if budget < min_cost:
            raise ValueError(f"search_ranks: budget {budget:,d} cannot pay the smallest rank choice "
                             f"r={choices[0]} everywhere ({min_cost:,d} parameters); lower the choices")

    base_cfg = probe_config or TrainConfig(max_steps=probe_steps)
    base_cfg = dataclasses.replace(base_cfg, max_steps=base_cfg.max_steps if probe_config else probe_steps,
                                   progress=False, checkpoint_every=0, output_dir=None, seed=seed)
    trials: List[dict] = []

    def objective(trial):
        granks = {g: trial.suggest_categorical(f"r[{g}]", choices) for g in groups}
        ranks = {n: granks[g] for g, ns in groups.items() for n in ns}
        params = sum(cost[(n, r)] for n, r in ranks.items())
        rec = {"number": trial.number, "group_ranks": granks, "params": params}
        trial.set_user_attr("params", params)
        if budget is not None and params > budget:
            rec["state"] = "over budget"
            trials.append(rec)
            raise optuna.TrialPruned(f"{params} adapter parameters > budget {budget}")
        torch.manual_seed(seed)
        model = build_model()
        adapted = adapt_with_ranks(model, method, ranks, **adapter_options)
        if prepare is not None:
            prepare(adapted.model)
        t0 = time.perf_counter()
        Trainer(adapted.model, train_data, collate_fn, base_cfg).train()
        value = evaluate(adapted.model, eval_data, collate_fn, base_cfg.eval_batch_size)["loss"]
        rec.update(value=value, state="complete", seconds=time.perf_counter() - t0)
        trials.append(rec)
        return value

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, n_trials))
        study = optuna.create_study(direction="minimize", sampler=sampler)
        study.optimize(objective, n_trials=n_trials, timeout=timeout, n_jobs=1)
    finally:
        optuna.logging.set_verbosity(verbosity)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise RuntimeError(f"search_ranks: no trial finished within the budget ({len(study.trials)} tried, all over "
                           f"budget {budget}); raise the budget or n_trials, or lower the rank choices")
    best = min(done, key=lambda t: (t.value, t.number))
    granks = {g: best.params[f"r[{g}]"] for g in groups}
    ranks = {n: granks[g] for g, ns in groups.items() for n in ns}
    return RankSearchResult(ranks=ranks, group_ranks=granks, value=float(best.value),
                            params=int(best.user_attrs["params"]), budget=budget, trials=trials)


__all__ = ["search_ranks", "adapt_with_ranks", "adapter_param_count", "linear_shape", "RankSearchResult",
           "DEFAULT_CHOICES"]
