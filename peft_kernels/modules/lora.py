"""``LoRALinear``: a frozen ``nn.Linear`` plus a LoRA adapter, running on the fused kernels.

State-dict keys are ``base_layer.weight`` / ``base_layer.bias`` (frozen) and ``lora_A.weight``
``(r, d_in)`` / ``lora_B.weight`` ``(d_out, r)``: the adapter keys map 1:1 onto HF PEFT's
``lora_A.<adapter>.weight`` / ``lora_B.<adapter>.weight``. Initialisation is PEFT's: A
Kaiming-uniform (a = sqrt(5)), B zeros, so a fresh adapter changes nothing.

``_AdapterLinear`` holds the module protocol shared with ``AdaLoRALinear``, ``SparseLinear`` and
``MonarchLinear`` (merge / unmerge / to_linear / seed drawing); a subclass provides
``delta_weight()`` and ``forward``.

``share_inputs(model)`` links LoRA layers that read the same input tensor (q/k/v, gate/up) so that
on the fused path they share one down-projection pass over it, forward and backward
(``SharedInputGroup``, ``ops.lora.lora_group_down``). Opt-in, runtime only (nothing is saved).
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
import weakref
from typing import Optional, Union

import torch
from torch import nn

from .. import dispatch
from .._checks import check_dropout, check_positive_int
from ..ops.lora import _group_down, lora_linear
from ..reference.lora import lora_delta_weight, lora_scaling


class _AdapterSwitch:
    """Turning a layer's adapter off and on, with HF PEFT's names (``layer.disable_adapters``,
    ``layer.enable_adapters(enabled)``). A disabled layer computes its base layer alone; its
    adapter parameters keep their values and ``requires_grad`` flags (they get no gradient while
    unused; PEFT also flips ``requires_grad`` off and back on, which would undo a user's own
    freezing). Disabling a merged layer unmerges it first, as PEFT does (``AdaptedModel.
    disable_adapter()`` merges it again on exit). Runtime state only: never saved or loaded."""

    _adapters_disabled = False  # class default: also for modules pickled before the switch existed

    @property
    def disable_adapters(self) -> bool:
        """True while the adapter is switched off (PEFT's attribute of the same name)."""
        return self._adapters_disabled

    def enable_adapters(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        if not enabled and self.merged:
            warnings.warn(f"{type(self).__name__} is merged: unmerging it to disable its adapter", stacklevel=2)
            self.unmerge()
        self._adapters_disabled = not enabled


class _BaseLayerAttrs:
    """``layer.weight`` / ``layer.bias`` are the base layer's (as on PEFT's LoRA layers): model code
    that reads them off the layer it calls (T5's ``self.wo.weight.dtype``) keeps working. A layer
    that replaced a GPT-2 ``Conv1D`` (``adapters`` sets ``_conv1d_layout``) shows the weight in the
    Conv1D's ``(in, out)`` layout, as a view of the base layer's."""

    _conv1d_layout = False

    @property
    def weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self._conv1d_layout else w

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias


class _AdapterLinear(_BaseLayerAttrs, _AdapterSwitch, nn.Module):
    """A frozen ``base_layer`` and the merge protocol; subclasses add the adapter and define
    ``delta_weight()`` (the dense ``(d_out, d_in)`` change, fp32)."""

    family = ""

    def __init__(self, base_layer: nn.Linear, dropout: float, impl: Optional[str]):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.dropout = check_dropout("dropout", dropout)
        self.impl = impl
        self._merged = False
        # the unmerged weight while merged with keep_original=True (see merge); never saved
        self.register_buffer("_original_weight", None, persistent=False)

    # -- forward helpers
    def _dropout_and_seed(self) -> tuple[float, Union[int, torch.Tensor]]:
        """Dropout only in training mode; the seed comes from torch's default CPU generator so
        ``torch.manual_seed`` reproduces it and activation checkpointing replays it. It stays a
        one-element int64 CPU tensor (read only inside the custom ops): an ``.item()`` here would
        graph-break ``torch.compile`` once per adapted layer. Under Inductor (not ``aot_eager``)
        the draw is lowered to Inductor's own RNG unless ``torch._inductor.config.fallback_random``:
        still reproducible with ``torch.manual_seed``, but not the seed eager mode draws."""
        if self.training and self.dropout > 0.0:
            return self.dropout, torch.randint(0, 2**62, (1,))
        return 0.0, 0

    # -- saving and loading
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # whether base_layer.weight holds the adapter's change, in the state dict's metadata (no
        # extra key: the keys stay PEFT's); torch.save keeps it, a safetensors round trip does not
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]]["merged"] = self._merged

    def _check_incoming_state(self, state_dict, prefix: str, local_metadata: Optional[dict] = None) -> None:
        """Refuse a ``load_state_dict`` whose base weight and adapter would not fit together, before
        anything is copied (subclasses add their own checks).

        A merged module's base weight holds the adapter's change, an unmerged one's does not. A
        state saved merged (the metadata says so) loads into a merged module and a state saved
        unmerged into an unmerged one; across, the change would be counted twice, or the forward
        would keep the old change while ``unmerge()`` subtracted the new one (the base weight then
        drifts for good). Without metadata (a dict built by hand, a safetensors file) only adapter
        tensors arriving without their base weight into a merged module are known to be wrong."""
        incoming = (local_metadata or {}).get("merged")
        name = type(self).__name__
        if incoming is not None:
            if bool(incoming) != self._merged:
                saved, here = ("merged", "unmerged") if incoming else ("unmerged", "merged")
                fix = "merge()" if incoming else "unmerge()"
                where = repr(prefix[:-1]) if prefix else "this module"
                raise RuntimeError(
                    f"cannot load the state of {where}, saved from {'a' if incoming else 'an'} {saved} {name}, "
                    f"into this {here} "
                    f"one: the base weight would count the adapter's change {'twice' if incoming else 'never'} "
                    f"(and unmerge() would then drift it); call {fix} on this module first")
            return
        if not self._merged:
            return
        keys = [k for k in self.state_dict(prefix=prefix, keep_vars=True) if k in state_dict]
        if keys and prefix + "base_layer.weight" not in state_dict:
            raise RuntimeError(
                f"cannot load {sorted(keys)} into a merged {name}: its base weight holds the adapter's "
                "current change, which unmerge() could no longer remove once the adapter is replaced; "
                "call unmerge() first (and merge() again after loading)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # checked here rather than in a registered hook so that modules unpickled from older
        # versions are checked too; this runs before any of this module's tensors (or its
        # children's, loaded after it) are copied, so a refused load leaves the module intact
        self._check_incoming_state(state_dict, prefix, local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- merge protocol
    @property
    def merged(self) -> bool:
        return self._merged

    def _merged_weight(self, sign: float) -> torch.Tensor:
        w = self.base_layer.weight
        return (w.float() + sign * self.delta_weight().float()).to(w.dtype)

    @contextlib.contextmanager
    def _unmerged(self):
        """Change what the adapter computes (a mask) inside this: a merged module is unmerged with
        the old adapter and merged again with the new one after (a kept original stays kept:
        ``unmerge()`` restored it exactly), so the merged weight stays right."""
        was_merged, kept = self._merged, self.keeps_original
        if was_merged:
            self.unmerge()
        yield
        if was_merged:
            self.merge(keep_original=kept)

    @torch.no_grad()
    def merge(self, keep_original: bool = False) -> None:
        """Add the adapter's dense delta into ``base_layer.weight`` (fp32 math, cast back).

        ``keep_original=True`` keeps a copy of the unmerged weight (a non-persistent buffer, so it
        follows ``.to()`` but is never saved) until ``unmerge()``, which then restores it bit for
        bit. It costs one more weight-sized tensor per merged layer, which is why it is off by
        default: merging is mostly done to serve a model, where a second copy of every adapted
        weight is what merging tries to avoid. Without it ``unmerge()`` subtracts the delta again;
        see there for the error that leaves in bf16/fp16 weights.
        """
        if not isinstance(keep_original, bool):
            raise TypeError(f"keep_original must be a bool, got {type(keep_original).__name__}")
        if self._merged:
            warnings.warn(f"{type(self).__name__} is already merged; merge() does nothing", stacklevel=2)
            return
        if self._adapters_disabled:
            raise RuntimeError(f"{type(self).__name__}: cannot merge a disabled adapter (its forward is the base layer "
                               "alone); call enable_adapters(True) first")
        original = self.base_layer.weight.detach().clone() if keep_original else None
        self.base_layer.weight.copy_(self._merged_weight(+1.0))
        self.register_buffer("_original_weight", original, persistent=False)
        self._merged = True

    @property
    def keeps_original(self) -> bool:
        """Whether a merged module holds its unmerged weight (``merge(keep_original=True)``)."""
        return self._merged and self._buffers.get("_original_weight") is not None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()``: restore the weight kept by ``merge(keep_original=True)`` exactly, or else
        subtract the dense delta again.

        Subtracting is not exact: ``merge`` rounds ``W + dW`` to the weight's dtype and ``unmerge``
        rounds ``(W + dW) - dW`` again, so each element can end up one unit in the last place of
        the merged value (in the weight's dtype) away from where it was, up to ``|W + dW| * 2**-7``
        for bf16, ``2**-10`` for fp16 and ``2**-23`` for fp32 (the fp32 arithmetic in between adds
        a negligible ``2**-24`` relative). The error accumulates over repeated merge/unmerge
        cycles: keep the original for half-precision weights merged and unmerged more than once.
        """
        if not self._merged:
            warnings.warn(f"{type(self).__name__} is not merged; unmerge() does nothing", stacklevel=2)
            return
        original = self._buffers.get("_original_weight")
        if original is not None:
            self.base_layer.weight.copy_(original)
        else:
            self.base_layer.weight.copy_(self._merged_weight(-1.0))
        self.register_buffer("_original_weight", None, persistent=False)
        self._merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new plain ``nn.Linear`` holding the merged weight (this module is left unchanged).

        Its parameters take the base layer's ``requires_grad`` flags (frozen, as the adapter left
        them): merging must not hand back a trainable weight the base layer did not have. Callers
        that froze the layer themselves restore their own flags (``AdaptedModel.merge_and_unload``)."""
        base = self.base_layer
        w = base.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                        device=w.device, dtype=w.dtype)
        lin.weight.copy_(w if self._merged else self._merged_weight(+1.0))
        lin.weight.requires_grad_(w.requires_grad)
        if base.bias is not None:
            lin.bias.copy_(base.bias)
            lin.bias.requires_grad_(base.bias.requires_grad)
        return lin


class LoRALinear(_AdapterLinear):
    """``y = base_layer(x) + scaling * dropout(x) @ A^T @ B^T``; ``scaling = alpha / r`` (or
    ``alpha / sqrt(r)`` with rsLoRA). The adapter lives in the base weight's dtype and device."""

    family = "lora"

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False, impl: Optional[str] = None):
        super().__init__(base_layer, dropout, impl)
        self.r = check_positive_int("r", r)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(self.r, self.alpha, self.use_rslora)
        w = base_layer.weight
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                    use_rslora: bool = False, impl: Optional[str] = None) -> "LoRALinear":
        return cls(linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, impl=impl)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's init: A Kaiming-uniform with a = sqrt(5), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        return lora_delta_weight(self.lora_A.weight.float(), self.lora_B.weight.float(), self.scaling)

    # A linked layer pickles / deep-copies its group as a bare placeholder (no references to the
    # siblings, see SharedInputGroup.__getstate__) plus its own place in it; copies made together
    # (a whole model) rejoin one new group, a layer copied alone comes back unlinked.
    def __getstate__(self):
        state = super().__getstate__()
        group = state.get("_share_group")
        if group is not None:
            state["_share_index"] = group.index_of(self)
        return state

    def __setstate__(self, state):
        index = state.pop("_share_index", None)
        super().__setstate__(state)
        group = self.__dict__.get("_share_group")
        if group is not None:
            # not one of the group's members (e.g. a data-parallel replica), or a shallow copy
            # whose original still holds its place: unlinked
            if index is None:
                # pickled before the weak references: the old group state names its members, and
                # may be restored after this member (a reference cycle); linked unless it is
                # restored already and does not name this one
                linked = getattr(group, "_refs", None) is None or group.index_of(self) is not None
            else:
                linked = group._adopt(index, self)
            if not linked:
                del self.__dict__["_share_group"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged or self._adapters_disabled:
            return self.base_layer(x)
        p, seed = self._dropout_and_seed()
        group = self.__dict__.get("_share_group")
        if group is not None and not torch.compiler.is_compiling() and not group.complete():
            # copied or unpickled without its siblings (or a sibling was freed): work alone (not
            # while compiling: xa_for runs each layer alone there anyway, nothing to trace here)
            del self.__dict__["_share_group"]
            group = None
        xa = group.xa_for(self, x) if group is not None and p == 0.0 else None
        return lora_linear(x, self.base_layer.weight, self.lora_A.weight, self.lora_B.weight,
                           self.base_layer.bias, self.scaling, p, seed, impl=self.impl, xa=xa)

    def adapter_config(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "use_rslora": self.use_rslora}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout}, "
                f"use_rslora={self.use_rslora}, merged={self._merged}, impl={self.impl}")


# Sibling names that read one input in common architectures: Llama/Mistral/Qwen attention and MLP,
# BERT-style attention, Mixtral/Llama-original expert and attention naming.
DEFAULT_SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
                         ("wq", "wk", "wv"), ("w1", "w3"))


def _is_dtensor(t: torch.Tensor) -> bool:
    # never imported here: only FSDP2/TP make DTensors (torch < 2.5 keeps the class in ._tensor)
    return any(mod is not None and isinstance(t, getattr(mod, "DTensor", ()))
               for mod in (sys.modules.get("torch.distributed.tensor"), sys.modules.get("torch.distributed._tensor")))


def _no_member():
    """Placeholder reference of a copied group's member that has not rejoined it (yet)."""
    return None


class SharedInputGroup:
    """LoRA layers called one after another with the same input tensor (``q = q_proj(h); k =
    k_proj(h); v = v_proj(h)``). The first member called computes every member's ``x @ A^T`` in
    one pass over x (and, in backward, every dA in one pass); the others take theirs from the
    round. A round is used only for the very same input tensor, unmodified (its version), with the
    same A tensors unchanged (their versions; a change through ``.data`` is invisible, as to
    autograd), the same grad mode and the same compute dtype (autocast): any other call starts a
    new round, and a member whose input differs computes again (never a stale value). Used only on
    the fused path, without dropout, outside inference mode, and not while torch.compile traces
    (each layer then runs alone). Saves (n - 1) passes over x forward and backward per group;
    costs one concatenation of the A's per round and of the ``s dY B`` terms in backward.

    Limits: the members' down-projections are one autograd node, so their outputs must be
    differentiated in one backward (two separate ``backward()`` calls through different members
    need ``retain_graph=True`` on the first). A round some member never takes (that member was
    not called, or was called with another tensor) keeps its input and buffers alive until the
    group's next call (``reset()`` drops it); copies and pickles of the model leave it out.

    The group refers to its members weakly: a member's state (pickle, deepcopy) carries the group
    and its own index, never its siblings, so saving or copying one layer stays one layer's worth.
    Members copied together in one deepcopy / pickle rejoin one new group; a layer copied alone
    finds its group incomplete and unlinks itself on its next call."""

    def __init__(self, members):
        self._refs = [weakref.ref(m) for m in members]
        self._round = None

    def __getstate__(self):
        # deepcopy / pickle: only the size; each member re-registers itself (LoRALinear.__setstate__).
        # Never the siblings (they would be saved or copied along) nor a round in progress.
        return {"n_members": len(self._refs)}

    def __setstate__(self, state):
        if "members" in state:  # pickled before the weak references (whole models only)
            self._refs = [weakref.ref(m) for m in state["members"]]
        else:
            self._refs = [_no_member] * state["n_members"]
        self._round = None

    def _adopt(self, index: int, member: "LoRALinear") -> bool:
        """Take ``member`` as the copy of member ``index``; False if that place is already taken
        (a shallow ``copy.copy`` shares the live group: the copy must not replace the original)."""
        if not 0 <= index < len(self._refs) or self._refs[index]() is not None:
            return False
        self._refs[index] = weakref.ref(member)
        return True

    @property
    def members(self) -> tuple:
        """The linked layers, in group order (None for one not copied along or freed)."""
        return tuple(r() for r in self._refs)

    def complete(self) -> bool:
        return all(r() is not None for r in self._refs)

    def index_of(self, member: "LoRALinear") -> Optional[int]:
        return next((k for k, r in enumerate(self._refs) if r() is member), None)

    @staticmethod
    def _eligible(x: torch.Tensor, members: tuple) -> bool:
        first = members[0]
        w = first.lora_A.weight
        return not x.is_inference() and not torch.is_inference_mode_enabled() and all(
            not m._merged and not m._adapters_disabled and not (m.training and m.dropout > 0.0) and m.impl == first.impl
            and m.lora_A.weight.device == w.device and m.lora_A.weight.dtype == w.dtype
            # a DTensor is a sibling still sharded: FSDP2 with one unit per layer unshards each
            # member only when that member runs, so the group's pass cannot read its A yet
            and not _is_dtensor(m.lora_A.weight) for m in members)

    def reset(self) -> None:
        """Drop the round in progress (it holds the last input and its down-projections)."""
        self._round = None

    @staticmethod
    def _state(x: torch.Tensor, members: tuple) -> tuple:
        """What a round is valid for, besides the input's identity."""
        return (x._version, torch.is_grad_enabled(), dispatch.compute_dtype(x),
                tuple((m.lora_A.weight, m.lora_A.weight._version) for m in members))

    def xa_for(self, member: "LoRALinear", x: torch.Tensor) -> Optional[torch.Tensor]:
        """``member``'s down-projection of ``x`` from the group's pass, or None (run alone)."""
        if torch.compiler.is_compiling():
            return None
        members = self.members  # resolve the weak references once per call
        i = next((k for k, m in enumerate(members) if m is member), None)
        if i is None or None in members:  # e.g. an nn.DataParallel replica: its members are copies
            return None
        rnd = self._round
        if rnd is not None:
            rx, state, pending = rnd
            if rx is x and i in pending and self._same(state, self._state(x, members)):  # rx: never an inference tensor
                xa = pending.pop(i)
                if not pending:
                    self._round = None
                return xa
        self._round = None
        if not self._eligible(x, members):
            return None
        xas = _group_down(x, [m.lora_A.weight for m in members], member.impl)
        if xas is None:
            return None
        pending = {k: xa for k, xa in enumerate(xas) if k != i}
        self._round = (x, self._state(x, members), pending) if pending else None
        return xas[i]

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        return a[:3] == b[:3] and all(t is u and vt == vu for (t, vt), (u, vu) in zip(a[3], b[3]))


def share_inputs(model: nn.Module, groups=DEFAULT_SHARED_INPUTS) -> list[tuple[str, ...]]:
    """Link the ``LoRALinear`` children of one parent whose names form one of ``groups`` (at least
    two present, same ``in_features``) into a ``SharedInputGroup``; returns the linked groups' full
    names. Existing links in ``model`` are removed first, so ``share_inputs(model, ())`` unlinks.

    Only for siblings the parent really calls with one input tensor (as Llama's q/k/v and gate/up):
    a member called with another tensor is still correct, but its group's pass is then wasted."""
    groups = list(groups)
    if groups and all(isinstance(n, str) for n in groups):
        groups = [tuple(groups)]  # one group given as a bare tuple of names
    for g in groups:
        if isinstance(g, str) or not all(isinstance(n, str) for n in g):
            raise TypeError(f"groups must be sequences of child names such as ('q_proj', 'k_proj'), got {g!r}")
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.__dict__.pop("_share_group", None)
    linked = []
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        for names in groups:
            present = [(n, children[n]) for n in names if isinstance(children.get(n), LoRALinear)]
            if len(present) < 2 or len({m.in_features for _, m in present}) != 1:
                continue
            group = SharedInputGroup([m for _, m in present])
            for _, m in present:
                m.__dict__["_share_group"] = group
            linked.append(tuple(f"{parent_name}.{n}" if parent_name else n for n, _ in present))
    return linked
