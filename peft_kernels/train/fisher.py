"""FLoE layer selection (arXiv 2506.00495): score layers by the Fisher information of their adapters.

1. **Calibrate**: put an adapter on every target module (FLoE's low-rank experts, ``MoELoRALinear``,
   by default; any family works since only the adapter's parameters are read), run ``num_batches``
   forward/backward passes and record each adapter parameter's gradient after each batch.
2. **Score**: the diagonal empirical Fisher of parameter ``theta`` is ``F(theta) = (1/N) sum_i g_i(theta)^2``
   over the ``N`` calibration *samples*, ``g_i`` the gradient of sample ``i``'s own loss (one
   forward/backward per sample). Squaring batch-mean gradients instead would compute
   ``mean_b (mean_i g_i)^2``, which shrinks with the batch size (noise averages out before the
   square) and ranks layers differently at different batch sizes; per-sample gradients make the
   score independent of how the samples were batched. A layer's score is the *mean over its adapter
   parameters* of ``F``: ``score_l = (1/|theta_l|) sum_{theta in layer l} F(theta)``.
   *This normalisation is this package's choice* (the paper leaves it open): dividing by the
   parameter count keeps wide layers (MLP projections) from outranking narrow ones (attention)
   just for having more parameters, and makes scores comparable across adapter families and ranks.
3. **Select** the top ``fraction`` (rounded up; FLoE's headline setting is 25%) or top ``k`` layers;
   ties are broken by model order, so selection is deterministic.
4. **FLoE proper**: :func:`floe_adapt` puts the low-rank experts only on the selected layers.

Granularity: ``"layer"`` (default) groups modules into transformer blocks: the block of
``bert.encoder.layer.3.attention.self.query`` is ``bert.encoder.layer.3`` (the name up to its first
numeric component); ``"module"`` scores each adapted module on its own.

Adapters start with a zero up-projection (B = 0), so at calibration only B (and MoE-LoRA's experts)
receive gradient; that gradient is ``dL/d(layer output)`` projected on the adapter's random down
projection, which is what ranks layers. ``warmup_steps`` optionally trains the calibration adapters
briefly first (the calibration copy is thrown away afterwards).
"""
from __future__ import annotations

import copy
import math
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn

_INDEX = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(module_name: str) -> str:
    """The block a module belongs to: its name up to the first numeric component (else itself)."""
    m = _INDEX.match(module_name)
    return m.group(1) if m else module_name


def layer_index(layer_name: str) -> int:
    """The block index of a layer name like ``bert.encoder.layer.3`` (its last numeric component)."""
    tail = layer_name.rsplit(".", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"layer name {layer_name!r} has no numeric block index")
    return int(tail)


def adapter_parameters(module: nn.Module) -> Dict[str, nn.Parameter]:
    """The adapter's own parameters: everything not under ``base_layer.`` (the module protocol)."""
    return {n: p for n, p in module.named_parameters() if not n.startswith("base_layer.")}


class FisherReport:
    """Per-layer empirical Fisher scores, ranked; :meth:`select` picks the layers to adapt."""

    def __init__(self, scores: Mapping[str, float], num_params: Mapping[str, int], members: Mapping[str, List[str]],
                 num_batches: int, method: str = "", granularity: str = "layer", num_samples: Optional[int] = None):
        self.scores = dict(scores)
        self.num_params = dict(num_params)
        self.members = {k: list(v) for k, v in members.items()}
        self.num_batches = num_batches
        self.num_samples = num_samples
        self.method = method
        self.granularity = granularity
        self.order = list(self.scores)  # model order: the tie-breaker

    def __len__(self) -> int:
        return len(self.scores)

    def ranked(self) -> List[tuple]:
        """``[(name, score)]`` best first; equal scores keep model order."""
        pos = {n: i for i, n in enumerate(self.order)}
        return sorted(self.scores.items(), key=lambda kv: (-kv[1], pos[kv[0]]))

    def _check_names(self, names: Iterable[str], what: str) -> List[str]:
        names = list(names)
        unknown = [n for n in names if n not in self.scores]
        if unknown:
            raise ValueError(f"{what}: unknown layer name(s) {unknown}; known: {self.order}")
        return names

    def select(self, fraction: Optional[float] = None, k: Optional[int] = None,
               among: Optional[Iterable[str]] = None) -> List[str]:
        """The top ``k`` (or ``ceil(fraction * n)``) layers, returned in model order.

        ``among`` restricts the choice to the named layers. Exactly one of ``fraction``/``k``.
        """
        if (fraction is None) == (k is None):
            raise ValueError("select: give exactly one of fraction= (in (0, 1]) or k= (a layer count)")
        pool = self.order if among is None else self._check_names(among, "select(among=...)")
        n = len(pool)
        if n == 0:
            raise ValueError("select: no layers to choose from")
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
                raise ValueError(f"select: fraction must be in (0, 1], got {fraction!r}")
            k = max(1, math.ceil(fraction * n - 1e-9))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"select: k must be an int in [1, {n}] (the number of scored layers), got {k!r}")
        pool_set = set(pool)
        chosen = [name for name, _ in self.ranked() if name in pool_set][:k]
        chosen_set = set(chosen)
        return [name for name in self.order if name in chosen_set]

    def table(self, selected: Optional[Sequence[str]] = None) -> str:
        """A printable table: rank, layer, score, score relative to the best, params, selected."""
        selected = set(selected or ())
        rows = self.ranked()
        top = rows[0][1] if rows and rows[0][1] > 0 else 1.0
        width = max([len("layer")] + [len(n) for n in self.scores])
        samples = f", {self.num_samples} samples" if self.num_samples is not None else ""
        lines = [f"Empirical Fisher per {self.granularity} ({self.method or 'adapter'} calibration, "
                 f"{self.num_batches} batches{samples}; mean squared per-sample gradient per adapter parameter)",
                 f"{'rank':>4}  {'layer':<{width}}  {'fisher':>11}  {'rel':>6}  {'params':>9}  sel"]
        for i, (n, s) in enumerate(rows, 1):
            lines.append(f"{i:>4}  {n:<{width}}  {s:>11.4e}  {s / top:>6.3f}  {self.num_params[n]:>9,d}  "
                         f"{'*' if n in selected else ''}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"scores": self.scores, "num_params": self.num_params, "members": self.members,
                "num_batches": self.num_batches, "num_samples": self.num_samples, "method": self.method,
                "granularity": self.granularity}


def _batch_size(batch) -> int:
    """Samples in a batch: the leading size of its tensors (which must agree)."""
    tensors = list(batch.values()) if isinstance(batch, Mapping) else list(batch) if isinstance(batch, (list, tuple)) \
        else [batch]
    sizes = {int(t.shape[0]) for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"empirical_fisher: cannot split a batch into samples: its tensors' leading sizes are "
                         f"{sorted(sizes) or 'missing'} (expected one batch size shared by every tensor)")
    return sizes.pop()


def _sample(batch, i: int):
    """Sample ``i`` of a batch as a batch of one (a mapping, e.g. a dict or transformers'
    ``BatchEncoding``, or a tuple/list of tensors; other values kept)."""
    def take(v):
        return v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
    if isinstance(batch, Mapping):
        return {k: take(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(take(v) for v in batch)
    return take(batch)


def empirical_fisher(model: nn.Module, adapters: Mapping[str, nn.Module], batches: Iterable,
                     loss_fn: Optional[Callable] = None, num_batches: Optional[int] = None,
                     granularity: str = "layer", method: str = "") -> FisherReport:
    """Score already-adapted modules (``adapters``: name -> module) over ``batches``.

    Each batch is split into samples (every tensor along dim 0) and each sample's gradient is
    taken on its own: the score is the diagonal empirical Fisher, the same whatever the batch
    size (see the module docstring). ``loss_fn(model, batch) -> loss`` defaults to
    :func:`peft_kernels.train.trainer.compute_loss` (``model(**batch).loss`` or cross-entropy of an
    ``(x, y)`` pair) and is called on batches of one. Only the adapters' gradients are read (with
    ``torch.autograd.grad``, so no ``.grad`` is touched); every parameter's ``requires_grad`` is
    as before when this returns.
    """
    from .trainer import compute_loss, to_device, _model_device

    if granularity not in ("layer", "module"):
        raise ValueError(f"granularity must be 'layer' or 'module', got {granularity!r}")
    if not adapters:
        raise ValueError("empirical_fisher: no adapted modules to score")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
    loss_fn = loss_fn or compute_loss
    params = {name: adapter_parameters(m) for name, m in adapters.items()}
    for name, ps in params.items():
        if not ps:
            raise ValueError(f"module {name!r} has no adapter parameters (everything is under base_layer)")
    flat = [p for ps in params.values() for p in ps.values()]
    requires_grad = [p.requires_grad for p in flat]
    sq = {name: torch.zeros((), dtype=torch.float64) for name in params}
    device = _model_device(model)
    was_training = model.training
    seen = samples = 0
    try:
        for p in flat:
            p.requires_grad_(True)
        model.train()
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            batch = to_device(batch, device)
            for i in range(_batch_size(batch)):
                loss = loss_fn(model, _sample(batch, i))
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
                it = iter(grads)
                for name, ps in params.items():
                    for _ in ps:
                        g = next(it)
                        if g is not None:
                            sq[name] += g.detach().double().pow(2).sum().cpu()
                samples += 1
            seen += 1
    finally:
        model.train(was_training)
        for p, flag in zip(flat, requires_grad):
            p.requires_grad_(flag)
    if samples == 0:
        raise ValueError("empirical_fisher: the batch iterable was empty")

    groups: Dict[str, List[str]] = {}
    for name in params:
        groups.setdefault(layer_of(name) if granularity == "layer" else name, []).append(name)
    scores, counts = {}, {}
    for g, names in groups.items():
        n_par = sum(p.numel() for name in names for p in params[name].values())
        total = sum(float(sq[name]) for name in names)
        scores[g] = total / (samples * n_par)
        counts[g] = n_par
    return FisherReport(scores, counts, groups, seen, method=method, granularity=granularity, num_samples=samples)


def calibrate(model: nn.Module, batches: Iterable, target_modules: Sequence[str], method: str = "moelora",
              num_batches: int = 8, loss_fn: Optional[Callable] = None, granularity: str = "layer",
              copy_model: bool = True, seed: int = 0, warmup_steps: int = 0, warmup_lr: float = 1e-3,
              **adapter_options) -> FisherReport:
    """Adapt every target module of (a copy of) ``model`` with ``method`` and score its layers.

    ``copy_model=False`` adapts ``model`` itself (saves memory for big models; the model then keeps
    the calibration adapters). The adapter init is seeded with ``seed`` (torch's default generator
    state is restored afterwards) so the scores are reproducible.
    """
    from ..adapters import adapt
    from .trainer import compute_loss, to_device, _model_device

    batches = list(b for _, b in zip(range(num_batches + warmup_steps), batches))
    if len(batches) <= warmup_steps:
        raise ValueError(f"calibrate: need more than warmup_steps={warmup_steps} batches, got {len(batches)}")
    work = copy.deepcopy(model) if copy_model else model
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        adapted = adapt(work, method=method, target_modules=list(target_modules), **adapter_options)
    finally:
        torch.set_rng_state(state)
    net = adapted.model
    mods = dict(adapted.adapted_modules())
    if warmup_steps:
        loss_fn_ = loss_fn or compute_loss
        ps = [p for m in mods.values() for p in adapter_parameters(m).values()]
        opt = torch.optim.AdamW(ps, lr=warmup_lr)
        dev = _model_device(net)
        net.train()
        for b in batches[:warmup_steps]:
            loss_fn_(net, to_device(b, dev)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return empirical_fisher(net, mods, batches[warmup_steps:], loss_fn=loss_fn, granularity=granularity,
                            method=method)


def modules_in_layers(model: nn.Module, layers: Sequence[str], target_modules) -> List[str]:
    """Full names of the target modules of ``model`` that lie in ``layers`` (model order).

    ``layers`` are :class:`FisherReport` names: blocks (``layer_of`` of a module name, e.g.
    ``encoder.layers.1``, or a module without a numeric component such as ``head``) or single
    modules (``"module"`` granularity). Matching is by name, never by block index: ``encoder.layers.1``
    and ``decoder.layers.1`` are different layers. Raises ``ValueError`` for names that are not
    modules of ``model`` or that hold none of the target modules.
    """
    from ..adapters import select_modules

    layers = list(layers)
    if not layers:
        raise ValueError("no layers given (expected names from FisherReport.select)")
    mods = dict(model.named_modules())
    unknown = [n for n in layers if n not in mods]
    if unknown:
        raise ValueError(f"unknown layer name(s) {unknown} (not modules of the model)")
    wanted = set(layers)
    chosen = [n for n in select_modules(model, target_modules) if n in wanted or layer_of(n) in wanted]
    hit = set(chosen) | {layer_of(n) for n in chosen}
    empty = [n for n in layers if n not in hit]
    if empty:
        raise ValueError(f"layer(s) {empty} hold none of the target modules {target_modules!r}")
    return chosen


def exact_names(names: Sequence[str]) -> str:
    """A ``target_modules`` value for :func:`~peft_kernels.adapters.adapt` that matches exactly ``names``.

    A list of names would also match by dotted suffix (``"0"`` matches ``"2.0"``); one string is a
    regular expression over the full name, so an alternation of the escaped names is exact.
    """
    return "|".join(re.escape(n) for n in names)


def floe_adapt(model: nn.Module, layers: Sequence[str], target_modules: Sequence[str], method: str = "moelora",
               **adapter_options):
    """FLoE proper: put ``method`` adapters (MoE-LoRA experts by default) only on the given layers.

    ``layers`` are names from a :class:`FisherReport` (``report.select(...)``): blocks (``"layer"``
    granularity; every target module inside them is adapted) or modules (``"module"`` granularity),
    see :func:`modules_in_layers`. Names that do not exist in ``model`` raise ``ValueError``. Works
    for every module :func:`~peft_kernels.adapters.adapt` takes (``nn.Linear``, GPT-2's ``Conv1D``).
    Returns the :class:`~peft_kernels.adapters.AdaptedModel`.
    """
    from ..adapters import adapt

    try:
        names = modules_in_layers(model, layers, target_modules)
    except ValueError as e:
        raise ValueError(f"floe_adapt: {e}") from None
    return adapt(model, method=method, target_modules=exact_names(names), **adapter_options)


__all__ = ["FisherReport", "empirical_fisher", "calibrate", "floe_adapt", "modules_in_layers", "exact_names",
           "layer_of", "layer_index", "adapter_parameters"]
