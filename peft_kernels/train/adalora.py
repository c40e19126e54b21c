"""AdaLoRA rank allocation (arXiv 2303.10512) with HF PEFT's semantics, made hard to misuse.

The adapter itself (``delta = s * B diag(E * rank_mask) A``) is
:class:`peft_kernels.modules.adalora.AdaLoRALinear`; this file holds what *trains* it:

- :class:`AdaLoRAConfig`: PEFT's defaults (init_r 12, target_r 8, beta1 = beta2 = 0.85,
  orthogonal regularisation 0.5, tinit 0, tfinal 0, deltaT 1) and a :meth:`~AdaLoRAConfig.validate`
  that rejects a schedule with no budgeting phase (``tinit >= total_step - tfinal``), which in
  PEFT only surfaces later as a ``kthvalue`` crash or a division by zero.
- :class:`RankAllocator`: per-element importance ``I = |p * grad p|``, smoothed
  ``Ibar = b1 Ibar + (1-b1) I`` and uncertainty ``Ubar = b2 Ubar + (1-b2) |I - Ibar|``, element score
  ``Ibar * Ubar``, triplet score ``S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)``; the total budget
  stays at ``sum(init ranks)`` until ``tinit``, then decays cubically to ``target_r * n_modules`` at
  ``total_step - tfinal``; every ``deltaT`` steps the lowest triplets are masked; at
  ``total_step - tfinal`` the final mask is fixed and re-applied on every later step.
- :func:`orthogonal_regularization`: ``weight * mean over {A, B} of ||A A^T - I||_F / ||B^T B - I||_F``.

Differences from PEFT, each deliberate:

- masks go to the module's ``rank_mask`` buffer instead of zeroing ``E`` in place, so a pruned
  triplet keeps its learned value and a checkpoint records the mask explicitly (a module pruned to
  rank 0 is just an all-zero mask: it saves and loads with its full-size tensors);
- exactly ``budget`` triplets survive: PEFT masks every score ``<= kthvalue``, which with tied
  scores (e.g. all zero at step 0) prunes far more than asked. Among tied scores the triplets
  last in (module name order, triplet index) are pruned first, so the result is deterministic. With distinct scores
  the masks equal PEFT's (tested against ``peft.tuners.adalora.RankAllocator``);
- a step that asks to prune nothing (``budget >= current total``) is a no-op instead of a
  ``kthvalue(k=0)`` crash, and jumping past ``total_step - tfinal`` (e.g. after a resume)
  still fixes the final mask first.

Call :meth:`RankAllocator.step` once per optimizer step, *after* ``optimizer.step()`` and before
``zero_grad()`` (PEFT's order: the gradients are still there). The trainer in
:mod:`peft_kernels.train.trainer` and the HF ``Trainer`` callback in
:mod:`peft_kernels.train.hf_callback` do this for you.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

_FACTORS = ("lora_A", "lora_E", "lora_B")


@dataclasses.dataclass
class AdaLoRAConfig:
    """Schedule and smoothing of the rank allocator (PEFT's names and defaults)."""

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None

    def validate(self) -> "AdaLoRAConfig":
        """Raise ``ValueError`` naming the field when the schedule cannot work."""
        ints = {"init_r": self.init_r, "target_r": self.target_r, "tinit": self.tinit,
                "tfinal": self.tfinal, "deltaT": self.deltaT}
        for name, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"AdaLoRAConfig.{name} must be an int, got {type(v).__name__}")
        if self.init_r < 1:
            raise ValueError(f"AdaLoRAConfig.init_r must be >= 1, got {self.init_r}")
        if not 0 <= self.target_r <= self.init_r:
            raise ValueError(f"AdaLoRAConfig.target_r must be in [0, init_r={self.init_r}], got {self.target_r}")
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"AdaLoRAConfig.tinit/tfinal must be >= 0, got tinit={self.tinit}, tfinal={self.tfinal}")
        if self.deltaT < 1:
            raise ValueError(f"AdaLoRAConfig.deltaT must be >= 1, got {self.deltaT}")
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not 0.0 < b < 1.0:
                raise ValueError(f"AdaLoRAConfig.{name} must be in (0, 1), got {b}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoRAConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int) \
                or self.total_step <= 0:
            raise ValueError(f"AdaLoRAConfig.total_step must be a positive int (the number of optimizer "
                             f"steps of the run), got {self.total_step!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"AdaLoRA schedule has no budgeting phase: tinit={self.tinit} >= total_step - tfinal = "
                f"{self.total_step} - {self.tfinal} = {self.total_step - self.tfinal}. Lower tinit/tfinal "
                f"or raise total_step (ranks are pruned between step tinit and total_step - tfinal).")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_adalora_module(module: nn.Module) -> bool:
    """Duck-typed: anything holding ``lora_A``/``lora_E``/``lora_B`` tensors and a ``rank_mask``."""
    return (all(isinstance(getattr(module, f, None), torch.Tensor) for f in _FACTORS)
            and isinstance(getattr(module, "rank_mask", None), torch.Tensor))


def find_adalora_modules(model: Union[nn.Module, Mapping[str, nn.Module]]) -> Dict[str, nn.Module]:
    """Name -> AdaLoRA module, in sorted name order (the allocator's canonical order)."""
    if isinstance(model, Mapping):
        items = list(model.items())
    else:
        items = list(model.named_modules())
    found = {n: m for n, m in items if is_adalora_module(m)}
    return dict(sorted(found.items()))


def _set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    mask = mask.to(device=module.rank_mask.device, dtype=module.rank_mask.dtype)
    setter = getattr(module, "set_rank_mask", None)
    if callable(setter):
        setter(mask)
    else:
        with torch.no_grad():
            module.rank_mask.copy_(mask)


def orthogonal_regularization(model: Union[nn.Module, Mapping[str, nn.Module]], weight: float = 0.5) -> torch.Tensor:
    """``weight * mean over every A and B of ||A A^T - I||_F`` (``||B^T B - I||_F`` for B).

    PEFT's regulariser: it keeps ``A``'s rows and ``B``'s columns near-orthonormal so that ``E``
    behaves like singular values. Computed in fp32; returns a 0-dim tensor (0 without modules).
    """
    if weight < 0:
        raise ValueError(f"orthogonal regularisation weight must be >= 0, got {weight}")
    mods = find_adalora_modules(model)
    terms = []
    for m in mods.values():
        a = m.lora_A.float()
        b = m.lora_B.float()
        # The trainer calls this inside its (bf16/fp16) autocast region, which would run the two
        # Gram matmuls in half precision: ||A A^T - I|| is a small difference of O(1) entries,
        # exactly what bf16's 8-bit mantissa loses. Autocast is switched off here, not by the caller.
        with torch.autocast(a.device.type, enabled=False):
            cov_a = a @ a.T
            cov_b = b.T @ b
            eye = torch.eye(cov_a.shape[0], device=a.device, dtype=torch.float32)
            terms.append(torch.linalg.matrix_norm(cov_a - eye, ord="fro"))
            terms.append(torch.linalg.matrix_norm(cov_b - eye, ord="fro"))
    if not terms:
        return torch.zeros(())
    return weight * torch.stack(terms).mean()


class RankAllocator:
    """Scores AdaLoRA triplets and masks the weakest to a cubic budget (see the module docstring).

    ``model``: a model containing AdaLoRA modules, or a mapping name -> module. Names order the
    triplets for tie-breaking and key the state dict and the reported ranks.
    """

    def __init__(self, model: Union[nn.Module, Mapping[str, nn.Module]], config: AdaLoRAConfig):
        self.config = config.validate()
        self.modules = find_adalora_modules(model)
        if not self.modules:
            raise ValueError("RankAllocator: the model holds no AdaLoRA modules (lora_A/lora_E/lora_B + rank_mask); "
                             "adapt it with method='adalora' first")
        self.ranks = {n: int(m.lora_A.shape[0]) for n, m in self.modules.items()}
        self.init_bgt = sum(self.ranks.values())
        self.target_bgt = config.target_r * len(self.modules)
        if self.target_bgt > self.init_bgt:
            raise ValueError(f"RankAllocator: target budget target_r*n = {self.target_bgt} exceeds the modules' "
                             f"total rank {self.init_bgt}")
        self.reset_ipt()
        self.final_mask: Optional[Dict[str, torch.Tensor]] = None
        self.last_budget = self.init_bgt

    # ---- schedule ----------------------------------------------------------------------------
    def budget_schedule(self, step: int) -> Tuple[int, bool]:
        """``(budget, mask now?)`` at ``step``: PEFT's formula, cubic between tinit and T - tfinal."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1.0 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul ** 3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    # ---- importance --------------------------------------------------------------------------
    def reset_ipt(self) -> None:
        self.exp_avg_ipt: Dict[str, torch.Tensor] = {}
        self.exp_avg_unc: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def grads_finite(self) -> bool:
        """Whether every factor's gradient is finite (missing gradients count as finite).

        An fp16 step whose gradients overflowed is skipped by ``GradScaler``; its ``inf``/``nan``
        gradients must not reach the EMAs: ``E`` starts at zero, ``|0 * inf|`` is ``nan``, and a
        ``nan`` EMA stays ``nan`` for the rest of the run, leaving pruning to the tie order.
        """
        grads = [getattr(m, f).grad for m in self.modules.values() for f in _FACTORS]
        checks = [torch.isfinite(g).all() for g in grads if g is not None]
        if not checks:
            return True
        # one host sync for all factors (modules may sit on different devices: gather on one)
        return bool(torch.stack([c.to(checks[0].device) for c in checks]).all())

    @torch.no_grad()
    def update_ipt(self) -> bool:
        """Fold ``I = |p * grad|`` of every factor into the smoothed sensitivity and uncertainty.

        Returns False, changing nothing, when any gradient is non-finite (see :meth:`grads_finite`):
        the step is left out as a whole so that every module's EMAs have seen the same steps.
        """
        if not self.grads_finite():
            return False
        b1, b2 = self.config.beta1, self.config.beta2
        for name, m in self.modules.items():
            for f in _FACTORS:
                p = getattr(m, f)
                key = f"{name}.{f}"
                g = p.grad
                ipt = (p.detach().float() * g.float()).abs() if g is not None else torch.zeros_like(p, dtype=torch.float32)
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(ipt)
                    self.exp_avg_unc[key] = torch.zeros_like(ipt)
                ibar = self.exp_avg_ipt[key].mul_(b1).add_((1 - b1) * ipt)
                self.exp_avg_unc[key].mul_(b2).add_((1 - b2) * (ipt - ibar).abs())
        return True

    def triplet_scores(self) -> Dict[str, torch.Tensor]:
        """Module name -> ``(r,)`` triplet scores ``s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)``."""
        out = {}
        for name, m in self.modules.items():
            s = {}
            for f in _FACTORS:
                key = f"{name}.{f}"
                if key in self.exp_avg_ipt:
                    s[f] = self.exp_avg_ipt[key] * self.exp_avg_unc[key]
                else:
                    s[f] = torch.zeros(getattr(m, f).shape, device=m.lora_A.device)
            out[name] = s["lora_E"].reshape(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        return out

    # ---- masking -----------------------------------------------------------------------------
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> Dict[str, torch.Tensor]:
        """Keep the ``budget`` best triplets over all modules; write and return the masks."""
        scores = self.triplet_scores()
        names = list(scores)
        flat = torch.cat([scores[n].float().cpu() for n in names])
        n_prune = self.init_bgt - int(budget)
        keep = torch.ones_like(flat)
        if n_prune > 0:
            # ascending scores; among equal scores the *last* in (name, index) order goes first, so
            # ties keep earlier modules and lower triplet indices
            rev = torch.sort(flat.flip(0), stable=True).indices
            keep[(flat.numel() - 1 - rev)[:n_prune]] = 0.0
        masks, start = {}, 0
        for n in names:
            r = self.ranks[n]
            masks[n] = keep[start:start + r].clone()
            start += r
        self._apply(masks)
        return masks

    def _apply(self, masks: Mapping[str, torch.Tensor]) -> None:
        for n, mask in masks.items():
            _set_mask(self.modules[n], mask)

    def step(self, global_step: int, grads_valid: bool = True) -> Tuple[int, Optional[Dict[str, torch.Tensor]]]:
        """One allocation step (PEFT's ``update_and_allocate``); returns ``(budget, masks or None)``.

        ``grads_valid=False`` says the optimizer skipped this step (a ``GradScaler`` overflow); a
        step whose gradients are not finite is treated the same. Before ``total_step - tfinal`` such
        a step changes nothing (returns the last budget and None); from there on no gradient is
        read, so the final allocation and its re-application still happen on it.
        """
        c = self.config
        t_end = c.total_step - c.tfinal
        if global_step < t_end:
            if not (grads_valid and self.update_ipt()):
                # no new information, so no new masks either; the next good step catches up with
                # the schedule (the budget is a function of the step number)
                return self.last_budget, None
            budget, mask_now = self.budget_schedule(global_step)
            masks = self.mask_to_budget(budget) if mask_now else None
        elif self.final_mask is None:
            budget = self.target_bgt
            current = {n: (m.rank_mask != 0).float().cpu() for n, m in self.modules.items()}
            if global_step > t_end and not self.exp_avg_ipt and sum(int(c.sum()) for c in current.values()) == budget:
                # resumed past the budgeting phase without allocator state (e.g. an HF Trainer
                # checkpoint): the masks loaded into the model are the final ones; zero scores
                # would otherwise pick an arbitrary set
                masks = current
                self._apply(masks)
            else:
                # the final allocation: at exactly total_step - tfinal, or first call past it
                masks = self.mask_to_budget(budget)
            self.final_mask = {n: m.clone() for n, m in masks.items()}
            self.reset_ipt()
        else:
            budget = self.target_bgt
            masks = self.final_mask
            self._apply(masks)
        self.last_budget = budget
        return budget, masks

    # ---- reporting / checkpointing -----------------------------------------------------------
    def current_ranks(self) -> Dict[str, int]:
        """Module name -> number of unmasked triplets now."""
        return {n: int((m.rank_mask != 0).sum().item()) for n, m in self.modules.items()}

    def report(self) -> str:
        ranks = self.current_ranks()
        width = max(len(n) for n in ranks)
        lines = [f"AdaLoRA ranks (budget {sum(ranks.values())}/{self.init_bgt}, target {self.target_bgt}):"]
        lines += [f"  {n:<{width}}  {r:>3d} / {self.ranks[n]}" for n, r in ranks.items()]
        return "\n".join(lines)

    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "exp_avg_ipt": {k: v.cpu() for k, v in self.exp_avg_ipt.items()},
            "exp_avg_unc": {k: v.cpu() for k, v in self.exp_avg_unc.items()},
            "final_mask": None if self.final_mask is None else {k: v.cpu() for k, v in self.final_mask.items()},
            "masks": {n: m.rank_mask.detach().cpu().clone() for n, m in self.modules.items()},
            "last_budget": self.last_budget,
        }

    def load_state_dict(self, state: Mapping) -> None:
        dev = {n: m.lora_A.device for n, m in self.modules.items()}

        def _dev(key):
            return dev[key.rsplit(".", 1)[0]]

        self.exp_avg_ipt = {k: v.to(_dev(k)) for k, v in state["exp_avg_ipt"].items()}
        self.exp_avg_unc = {k: v.to(_dev(k)) for k, v in state["exp_avg_unc"].items()}
        fm = state.get("final_mask")
        self.final_mask = None if fm is None else {k: v.clone() for k, v in fm.items()}
        self._apply(state["masks"])
        self.last_budget = int(state.get("last_budget", self.init_bgt))


def adalora_config_for(total_step: int, init_r: int = 12, target_r: int = 8, tinit: Optional[int] = None,
                       tfinal: Optional[int] = None, deltaT: int = 1, **kw) -> AdaLoRAConfig:
    """A config whose schedule fits ``total_step``: by default warm up 10% and fix ranks for the last 20%.

    PEFT's defaults (tinit = tfinal = 0) prune from the very first step on scores that are still
    zero; a short warm-up gives the EMAs something to rank.
    """
    if tinit is None:
        tinit = max(0, total_step // 10)
    if tfinal is None:
        tfinal = max(0, total_step // 5)
    return AdaLoRAConfig(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
                         total_step=total_step, **kw).validate()


__all__ = ["AdaLoRAConfig", "RankAllocator", "orthogonal_regularization", "find_adalora_modules",
           "is_adalora_module", "adalora_config_for"]
