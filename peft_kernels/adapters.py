"""Switch the kernels on for a model you already train: inject by name, merge, save/load, PEFT interop.

HF PEFT's workflow is the anchor (``get_peft_model`` -> ``adapt``, ``save_pretrained`` -> ``save``,
``PeftModel.from_pretrained`` -> ``load_adapted``, ``merge_and_unload``), and so is its checkpoint
layout: a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.<adapter param>``. For LoRA the files ARE a PEFT LoRA checkpoint
(``lora_A.weight`` / ``lora_B.weight``, a plain ``LoraConfig`` json), so PEFT loads what we write
and we load what PEFT writes. This package's own metadata (family, per-module options, version)
goes into the safetensors header, and for the other families also into the json. When a
checkpoint's json is a PEFT ``LoraConfig``, loading reads that json alone (as PEFT does), so the two
libraries never load different adapters from one directory; any option PEFT would act on and a plain
LoRA layer would not is refused (see ``_peft_config_problems``).

Loading is all-or-nothing: every problem (missing, unexpected and mis-shaped keys, wrong family,
changed options) is collected into one :class:`CheckpointError`, and nothing in the model is touched
until everything has been checked.

GPT-2 style ``transformers`` ``Conv1D`` layers (``x @ W + b`` with W ``(in, out)``) are adapted by
converting them to an equivalent ``nn.Linear`` (transposed weight); ``merge_and_unload``/``unload``
turn them back into ``Conv1D`` so the model's own state dict layout is preserved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import importlib
import itertools
import json
import math
import os
import re
import secrets
import sys
import tempfile
import warnings
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix: PeftModel.base_model (LoraModel).model (your model)
FORMAT_VERSION = 1
META_KEY = "peft_kernels"

# method name -> (module, class). Imported lazily: a family whose module is missing only fails
# when it is asked for.
FAMILIES = {
    "lora": ("peft_kernels.modules.lora", "LoRALinear"),
    "adalora": ("peft_kernels.modules.adalora", "AdaLoRALinear"),
    "monarch": ("peft_kernels.modules.monarch", "MonarchLinear"),
    "sparse": ("peft_kernels.modules.sparse", "SparseLinear"),
    "lily": ("peft_kernels.modules.lily", "LilyLinear"),
    "moelora": ("peft_kernels.modules.lily", "MoELoRALinear"),
}
# Router-mixed adapters have no input-independent dense change (Lily's batch routing depends on
# the batch, MoE-LoRA routes per token), so they cannot be merged.
UNMERGEABLE = frozenset({"lily", "moelora"})
# Options that do not change what a trained adapter computes (or that only pick the initial
# sparse mask, which the checkpoint's own mask replaces): a checkpoint may differ in them.
_OPTIONS_NOT_COMPARED = frozenset({"impl", "dropout", "lora_dropout", "seed", "method", "mask", "density", "per_row",
                                   "scores"})


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message lists every problem found."""


# ----------------------------------------------------------------------------- module discovery


def family_class(method: str) -> type:
    if method not in FAMILIES:
        raise ValueError(f"method must be one of {sorted(FAMILIES)}, got {method!r}")
    mod_name, cls_name = FAMILIES[method]
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportError(f"adapter family {method!r} needs {mod_name}, which failed to import: {e}") from e
    return getattr(mod, cls_name)


def _is_adapter(m: nn.Module) -> bool:
    """A module wrapping a frozen base layer (ours, or PEFT's LoraLayer) or a module trained in full
    (ours, or PEFT's ModulesToSaveWrapper): never adapt inside it."""
    return "base_layer" in m._modules or "original_module" in m._modules


def _is_to_save(m: nn.Module) -> bool:
    """Our ``ModuleToSave`` wrapper (a frozen original and its trained copy)."""
    return "original_module" in m._modules and "trained_module" in m._modules


def _is_conv1d(m: nn.Module) -> bool:
    # Checked by name so this module never imports transformers itself.
    mod = sys.modules.get("transformers.pytorch_utils")
    return mod is not None and isinstance(m, getattr(mod, "Conv1D", ()))


def _linear_like(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(full name, module)`` of every nn.Linear / Conv1D in model order, outside adapter modules."""
    out = []

    def walk(prefix: str, m: nn.Module):
        for child_name, child in m._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            if _is_adapter(child):
                continue
            if isinstance(child, nn.Linear) or _is_conv1d(child):
                out.append((name, child))
            else:
                walk(name, child)

    walk("", model)
    return out


def _layer_index(name: str) -> Optional[int]:
    """The first purely numeric path component (``model.layers.3.self_attn.q_proj`` -> 3)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _target_matches(target: str, name: str) -> bool:
    """A target matches the full name, a dotted suffix of it (``q_proj``, ``self_attn.q_proj``), or
    is a regular expression matching the whole name."""
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def _output_layer_names(model: nn.Module) -> set[str]:
    """Names of the model's output projection (excluded by ``"all-linear"``, as in PEFT)."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        return set()
    return {n for n, m in model.named_modules() if m is out}


def select_modules(model: nn.Module, target_modules, layers: Optional[Iterable[int]] = None,
                   candidates: Optional[list] = None) -> list[str]:
    """Full names of the linear layers ``adapt`` would replace (model order); ``candidates``
    (``(name, layer)`` pairs) replaces the model's own un-adapted linear layers."""
    candidates = _linear_like(model) if candidates is None else candidates
    names = [n for n, _ in candidates]
    if target_modules is None:
        raise ValueError("target_modules is required: a list of names/regexes, one regex string, or 'all-linear'")
    if isinstance(target_modules, str) and target_modules == "all-linear":
        excluded = _output_layer_names(model)
        chosen = [n for n in names if n not in excluded]
    elif isinstance(target_modules, str):
        # PEFT's rule for a single string: a regex over the full name.
        chosen = [n for n in names if re.fullmatch(target_modules, n)]
        if not chosen:
            raise ValueError(f"target_modules regex {target_modules!r} matches no linear layer; "
                             f"{_describe_available(names)}")
    else:
        targets = list(target_modules)
        if not targets or not all(isinstance(t, str) for t in targets):
            raise TypeError(f"target_modules must be a non-empty list of strings, got {target_modules!r}")
        unmatched = [t for t in targets if not any(_target_matches(t, n) for n in names)]
        if unmatched:
            raise ValueError(f"target_modules {unmatched} match no linear layer (nn.Linear or Conv1D) of "
                             f"{type(model).__name__}; {_describe_available(names)}")
        chosen = [n for n in names if any(_target_matches(t, n) for t in targets)]
    if layers is not None:
        wanted = {int(i) for i in ([layers] if isinstance(layers, int) else layers)}
        found = {_layer_index(n) for n in chosen} - {None}
        missing = sorted(wanted - found)
        if missing:
            raise ValueError(f"layers {missing} hold none of the targeted modules; targeted layers are "
                             f"{sorted(found) or 'none (no numeric index in the module names)'}")
        chosen = [n for n in chosen if _layer_index(n) in wanted]
    if not chosen:
        raise ValueError(f"no linear layer selected; {_describe_available(names)}")
    return chosen


def _describe_available(names: Sequence[str]) -> str:
    if not names:
        return "the model has no nn.Linear/Conv1D layers outside adapters"
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"available linear names: {short} (e.g. full name {names[0]!r})"


def _inside(name: str, other: str) -> bool:
    """``name`` is ``other`` or a submodule of it (dotted paths; "" is the root)."""
    return other == "" or name == other or name.startswith(other + ".")


def select_modules_to_save(model: nn.Module, modules_to_save, adapted: Sequence[str] = (),
                           strict: bool = True, exact: bool = False) -> list[str]:
    """Full names of the modules ``modules_to_save`` names, by HF PEFT's rule (a module is taken
    when its full name ends with one of the strings: ``"classifier"``, ``"model.score"``), in
    model order. ``strict``: a string that matches nothing is an error (PEFT ignores it, and does
    so for the ``classifier``/``score`` pair its sequence-classification models add). ``exact``:
    full names only (our checkpoints). A module that holds, or sits inside, an adapted layer or
    another module to save is refused."""
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    patterns = sorted(modules_to_save) if isinstance(modules_to_save, (set, frozenset)) else list(modules_to_save)
    if not all(isinstance(t, str) and t for t in patterns):
        raise TypeError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    def match(n: str, t: str) -> bool:
        return n == t if exact else n.endswith(t)

    # nothing inside an adapter; a module to save's wrapper itself may be chosen again (for
    # another adapter of the same model), its insides may not
    blocked = [(n, _is_to_save(m)) for n, m in model.named_modules() if n and _is_adapter(m)]
    chosen = [n for n, _ in model.named_modules() if n and any(match(n, t) for t in patterns)
              and not any(_inside(n, b) and not (wrapper and n == b) for b, wrapper in blocked)]
    if strict:
        unmatched = [t for t in patterns if not any(match(n, t) for n in chosen)]
        if unmatched:
            how = "no module has that full name" if exact else \
                "a module is taken when its full name ends with the string, as in HF PEFT"
            raise ValueError(f"modules_to_save {unmatched} match no module of {type(model).__name__} ({how})")
    problems = [f"{n!r} overlaps the adapted layer {a!r}" for n in chosen for a in adapted
                if _inside(n, a) or _inside(a, n)]
    problems += [f"{n!r} sits inside {o!r}, also matched" for n in chosen for o in chosen if o != n and _inside(n, o)]
    if problems:
        raise ValueError("modules_to_save cannot take these modules (a module is trained in full or adapted, "
                         "once):\n  - " + "\n  - ".join(problems))
    return chosen


def _outside(names: Sequence[str], to_save: Sequence[str]) -> list[str]:
    """``names`` without the layers inside a module to save (PEFT's rule: a module trained in full
    is not also adapted, e.g. RoBERTa's ``classifier.dense`` under ``all-linear`` with
    ``modules_to_save=["classifier"]``)."""
    kept = [n for n in names if not any(_inside(n, t) for t in to_save)]
    if names and not kept:
        raise ValueError(f"every targeted layer lies inside modules_to_save {list(to_save)}: nothing left to adapt")
    return kept


def _wrap_to_save(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """A ``ModuleToSave`` per name (built, not installed), refusing modules with tied weights: the
    trained copy would silently come apart from the weight it shares (a tied ``lm_head``)."""
    from .modules.to_save import ModuleToSave

    owners: dict = {}
    for n, t in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(t), []).append(n)
    out = {}
    for name in names:
        m = model.get_submodule(name)
        if _is_to_save(m):  # wrapped for another adapter: this one gets its own copy of the original
            m = m.original_module
        if any(_offloaded(sub) for sub in m.modules()):
            raise ValueError(f"modules_to_save: {name!r} is offloaded by accelerate; its trained copy would keep "
                             "loading the original's weights. Load the model without offload")
        tied = sorted({o for p in m.parameters() for o in owners.get(id(p), ()) if not _inside(o, name)})
        if tied:
            raise ValueError(f"modules_to_save: {name!r} shares parameters with {tied} (tied weights); its trained "
                             "copy would no longer be tied. Untie it first, or leave it out")
        out[name] = ModuleToSave(m)
    return out


# ----------------------------------------------------------------------------- module surgery


def _conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D computes ``x @ W + b`` with W ``(in, out)``: the same as Linear with W^T."""
    w = conv.weight
    lin = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if conv.bias is not None:
        lin.bias = conv.bias
    return lin


def _linear_to_conv1d(lin: nn.Linear, requires_grad: bool) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(lin.out_features, lin.in_features)
    conv.weight = nn.Parameter(lin.weight.detach().t().contiguous(), requires_grad=requires_grad)
    if lin.bias is not None:
        conv.bias = lin.bias
    else:
        conv.bias = None
    return conv


def _refresh_base(base: nn.Linear, conv: nn.Module) -> None:
    """Make ``base`` (an adapter's Linear over a Conv1D) hold what the Conv1D ``conv`` holds now,
    unless ``conv`` still views ``base``'s own weight."""
    w = conv.weight.detach().t()
    if w.data_ptr() != base.weight.data_ptr() or w.dtype != base.weight.dtype or w.device != base.weight.device:
        base.weight.data = w.contiguous()
    if conv.bias is not None and conv.bias is not base.bias:
        base.bias = conv.bias


def _offloaded(m: nn.Module) -> bool:
    """An accelerate hook on ``m`` that offloads its weights (they live on ``meta`` between calls)."""
    def offloads(hook) -> bool:
        return bool(getattr(hook, "offload", False)) or any(offloads(h) for h in getattr(hook, "hooks", ()))
    hook = getattr(m, "_hf_hook", None)
    return hook is not None and offloads(hook)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _adapter_items(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapter's own persistent state: everything in its state dict not under ``base_layer.``
    (the live Parameter/buffer objects, so shared tensors can be recognised by identity); for a
    module trained in full, its trained copy's state under the module's own names (PEFT's keys)."""
    if _is_to_save(module):
        yield from module.trained_state().items()
        return
    for k, t in module.state_dict(keep_vars=True).items():
        if not k.startswith("base_layer."):
            yield k, t


def _build_modules(method: str, linears: dict[str, nn.Linear], options: dict,
                   per_module: Optional[dict[str, dict]] = None) -> dict[str, nn.Module]:
    """Build (not install) the adapter modules. ``per_module`` overrides options per name."""
    cls = family_class(method)
    if method == "lily":
        build_lily = getattr(importlib.import_module(FAMILIES["lily"][0]), "build_lily")
        built = build_lily(dict(linears), **options)
        return {n: built[n] for n in linears}
    out = {}
    for name, lin in linears.items():
        opts = per_module[name] if per_module is not None else options
        out[name] = cls.from_linear(lin, **opts)
    return out


def _snapshot_requires_grad(model: nn.Module) -> dict[int, tuple[nn.Parameter, bool]]:
    return {id(p): (p, p.requires_grad) for p in model.parameters()}


def _restore_requires_grad(snapshot) -> None:
    for p, flag in snapshot.values():
        p.requires_grad_(flag)


def _adapter_params(m: nn.Module) -> list[nn.Parameter]:
    """The parameters an adapter module trains: everything outside its ``base_layer``, or for a
    module to save its trained copy's floating-point parameters."""
    if _is_to_save(m):
        return [p for p in m.trained_module.parameters() if p.is_floating_point() or p.is_complex()]
    return [p for k, p in m.named_parameters() if not k.startswith("base_layer.")]


def _freeze_all_but_adapters(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        for p in _adapter_params(m):
            p.requires_grad_(True)


# adapter_dtype: "auto" (HF PEFT's default, autocast_adapter_dtype=True: fp32 adapter weights on a
# fp16/bf16 base, else the base weight's dtype), "base" (the base weight's dtype), or a float dtype
_HALF = (torch.float16, torch.bfloat16)
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def adapter_dtype_spec(adapter_dtype) -> str:
    """``adapter_dtype`` checked and in its canonical (JSON) form: ``"auto"``, ``"base"`` or a dtype
    name (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"``)."""
    if adapter_dtype in ("auto", "base"):
        return adapter_dtype
    if isinstance(adapter_dtype, torch.dtype):
        if adapter_dtype in _DTYPE_NAMES.values():
            return str(adapter_dtype).replace("torch.", "")
    elif isinstance(adapter_dtype, str) and adapter_dtype in _DTYPE_NAMES:
        return str(_DTYPE_NAMES[adapter_dtype]).replace("torch.", "")
    raise ValueError(f"adapter_dtype must be 'auto', 'base', or one of torch.float32 / bfloat16 / float16 / "
                     f"float64 (or their names), got {adapter_dtype!r}")


def adapter_dtype_for(spec: str, base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of an adapter's weights on a base weight of ``base_dtype`` (``spec`` canonical)."""
    if spec == "base" or (spec == "auto" and base_dtype not in _HALF):
        return base_dtype
    if spec == "auto":
        return torch.float32
    return _DTYPE_NAMES[spec]


def _cast_adapters(modules: dict[str, nn.Module], spec: str) -> None:
    """Put every adapter weight in the dtype ``spec`` gives for its base layer. In place on the
    Parameters (``.data``), so a Parameter shared between layers (Lily's HPs/LPs) stays one object;
    done before any optimizer sees them."""
    for m in modules.values():
        target = adapter_dtype_for(spec, m.base_layer.weight.dtype)
        for p in _adapter_params(m):
            if p.is_floating_point() and p.dtype != target:
                p.data = p.data.to(target)


def _install(model: nn.Module, method: str, options: dict, modules: dict[str, nn.Module],
             conv1d: dict[str, bool], snapshot, adapter_dtype: str = "auto",
             to_save: Optional[dict[str, nn.Module]] = None) -> "AdaptedModel":
    _cast_adapters(modules, adapter_dtype)
    for name in conv1d:
        if name in modules:
            modules[name]._conv1d_layout = True  # .weight shows the Conv1D's (in, out) layout
    installed = {**modules, **(to_save or {})}
    for name, m in installed.items():
        _set_submodule(model, name, m)
    _freeze_all_but_adapters(model, installed)
    return AdaptedModel(model, method, options, list(modules), conv1d=conv1d, requires_grad_snapshot=snapshot,
                        adapter_dtype=adapter_dtype, to_save=list(to_save or ()))


def _base_linears(model: nn.Module, names: Sequence[str], snapshot: dict,
                  error_cls: type = TypeError) -> tuple[dict[str, nn.Linear], dict]:
    """The nn.Linear to wrap for each name (Conv1D converted: a transposed copy of the weight, the
    bias shared); also ``{Conv1D name: its weight's requires_grad}`` to restore it on unload. The
    Conv1D weight leaves ``snapshot`` so nothing keeps the replaced weight alive."""
    linears, conv1d = {}, {}
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the model has no module {name!r}") from None
        if _offloaded(m):
            raise error_cls(f"{name!r} is offloaded by accelerate (device_map with cpu/disk offload, cpu_offload): "
                            "its weight is only materialised inside its own forward, and the fused kernels read "
                            "the weight directly. Load the model without offload to adapt it")
        if _is_conv1d(m):
            linears[name] = _conv1d_to_linear(m)
            conv1d[name] = m.weight.requires_grad
            snapshot.pop(id(m.weight), None)
        elif isinstance(m, nn.Linear):
            w = m.weight
            if not (isinstance(w, torch.Tensor) and w.is_floating_point()
                    and tuple(w.shape) == (m.out_features, m.in_features)):
                # e.g. bitsandbytes' Linear4bit/Linear8bitLt (nn.Linear subclasses holding packed
                # integer weights): the kernels read the weight as a dense float matrix
                raise error_cls(f"{name!r} is a {type(m).__name__} whose weight is not a dense floating-point "
                                f"({m.out_features}, {m.in_features}) matrix (dtype {getattr(w, 'dtype', None)}, "
                                f"shape {tuple(getattr(w, 'shape', ()))}): quantized base layers are not supported")
            linears[name] = m
        else:
            raise error_cls(f"{name!r} is a {type(m).__name__}, not an nn.Linear or transformers Conv1D")
    return linears, conv1d


# ----------------------------------------------------------------------------- public API


def adapt(model: nn.Module, method: str = "lora", target_modules=None, layers: Optional[Iterable[int]] = None,
          adapter_dtype="auto", modules_to_save=None, **method_options) -> "AdaptedModel":
    """Replace the matching linear layers of ``model`` in place and freeze everything else.

    ``target_modules``: names matching the last component(s) of a module path (``"q_proj"``,
    ``"self_attn.q_proj"``), full names, or regexes over the full name; a single string is a regex
    (PEFT's rule); ``"all-linear"`` takes every linear but the output layer. ``layers`` keeps only
    modules whose path holds one of these integer indices (``model.layers.3.mlp.up_proj`` -> 3).
    ``method_options`` go to the family's ``from_linear`` (``build_lily`` for Lily), except
    ``share_inputs`` (LoRA only): True links siblings that read one input (q/k/v, gate/up; see
    ``modules.lora.share_inputs``) so they share one down-projection pass on the fused path; a
    sequence of name tuples picks the groups. Runtime only: a saved adapter does not record it.

    ``adapter_dtype``: the dtype of the adapter weights. ``"auto"`` (default) is HF PEFT's default
    (``autocast_adapter_dtype=True``): fp32 adapter weights on a fp16/bf16 model, so optimizer
    updates far below a half type's resolution are not rounded away, else the base weight's dtype.
    ``"base"`` keeps them in the base weight's dtype; a dtype (``torch.bfloat16``, ``"float32"``)
    fixes it. The fused kernels run in the activations' dtype either way (fp32 weights are cast on
    the way in, their gradients come back in fp32); it is saved with the adapter.

    ``modules_to_save``: modules trained in full beside the adapters and saved with them (HF PEFT's
    option of the same name, e.g. ``["classifier"]`` for a new task head; matched by the end of the
    full name as in PEFT). Each is kept twice, frozen original and trainable copy
    (``modules.to_save.ModuleToSave``), in its own dtype.
    """
    adapter_dtype = adapter_dtype_spec(adapter_dtype)
    if isinstance(model, AdaptedModel):
        raise TypeError("model is already an AdaptedModel; pass adapted.model to adapt more layers")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    family_class(method)  # fail early on an unknown or missing family
    share = method_options.pop("share_inputs", False)
    if share is None:
        share = False
    if share is not False and method != "lora":
        raise TypeError(f"share_inputs is a LoRA option, not one of {method!r}")
    names = select_modules(model, target_modules, layers)
    to_save_names = select_modules_to_save(model, modules_to_save)
    names = _outside(names, to_save_names)
    adapted = _adapt_names(model, method, names, method_options, None, adapter_dtype, to_save_names)
    if share is not False:
        adapted._link_shared_inputs(share)
    return adapted


def _adapt_names(model: nn.Module, method: str, names: Sequence[str], options: dict,
                 per_module: Optional[dict[str, dict]], adapter_dtype: str, to_save_names: Sequence[str]) -> "AdaptedModel":
    """Build and install the adapters on ``names`` (options per module if ``per_module``) and the
    modules to save; on any error the model is left as it was."""
    snapshot = _snapshot_requires_grad(model)
    linears, conv1d = _base_linears(model, names, snapshot)
    try:
        to_save = _wrap_to_save(model, to_save_names)
        modules = _build_modules(method, linears, options, per_module)
    except BaseException:
        _restore_requires_grad(snapshot)  # from_linear may already have frozen some base layers
        raise
    return _install(model, method, options, modules, conv1d, snapshot, adapter_dtype, to_save)


def _json_safe(options: dict) -> dict:
    """Options for the json: tensors (a sparse ``mask=``/``scores=``) are described, not stored; the
    mask itself travels in the weights file and the per-module configs rebuild the shapes."""
    out = {}
    for k, v in options.items():
        if isinstance(v, torch.Tensor):
            out[k] = f"<tensor {tuple(v.shape)} {v.dtype}>"
        elif isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v):
            out[k] = f"<{len(v)} tensors>"
        else:
            out[k] = v
    return out


class AdaptedModel(nn.Module):
    """Handle over a model whose linear layers were replaced by adapter modules.

    Calling it calls the model; attributes it lacks are looked up on the model (``adapted.config``).
    """

    def __init__(self, model: nn.Module, method: str, options: dict, names: Sequence[str],
                 conv1d: Optional[dict[str, bool]] = None, requires_grad_snapshot=None,
                 adapter_dtype: str = "auto", to_save: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.method = method
        self.options = dict(options)
        self.adapter_dtype = adapter_dtype  # canonical spec (adapter_dtype_spec), saved with the adapter
        self._names = list(names)
        self._to_save = list(to_save)  # names of the modules trained in full (ModuleToSave)
        self.active_adapter = "default"
        self._inactive: dict[str, dict] = {}  # adapter name -> its modules and settings (not installed)
        self._layers_off = False  # disable_adapter_layers(): also for adapters switched in later
        self._share_spec = None  # the share_inputs groups adapt() linked (re-linked on set_adapter)
        self._conv1d_plain: dict[str, nn.Module] = {}  # Conv1D views installed while no adapter covers them
        self._conv1d = dict(conv1d or {})  # Conv1D name -> its weight's original requires_grad
        self._snapshot = requires_grad_snapshot or {}

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- inspection
    def adapted_modules(self) -> dict[str, nn.Module]:
        return {n: self.model.get_submodule(n) for n in self._names}

    def modules_to_save(self) -> dict[str, nn.Module]:
        """The modules trained in full (``ModuleToSave``), by full name."""
        return {n: self.model.get_submodule(n) for n in self._to_save}

    def _switchable(self) -> dict[str, nn.Module]:
        return {**self.adapted_modules(), **self.modules_to_save()}

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to hand to an optimizer (shared ones once)."""
        return [p for _, p in self.named_trainable_parameters()]

    def count_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` element counts, shared parameters counted once: trainable are the
        model's (the active adapter's), the total also counts the inactive adapters (as PEFT does)."""
        params = list(self.model.parameters())
        seen = {id(p) for p in params}
        extra = {id(p): p for m in self._inactive_modules() for p in m.parameters() if id(p) not in seen}
        return (sum(p.numel() for p in params if p.requires_grad),
                sum(p.numel() for p in params) + sum(p.numel() for p in extra.values()))

    def _inactive_modules(self) -> list[nn.Module]:
        """Every module of the inactive adapters (adapters and heads), each once."""
        mods = [m for rec in self._inactive.values() for m in (*rec["modules"].values(), *rec["to_save"].values())]
        return list({id(m): m for m in mods}.values())

    def _apply(self, fn, recurse: bool = True):
        # .to() / .half() / .cuda() of the handle reach the inactive adapters too (they live outside
        # the model; the base layers they share with it are converted again, which is a no-op)
        super()._apply(fn, recurse)
        if recurse:
            for m in self._inactive_modules():
                m._apply(fn)
        return self

    def print_trainable_parameters(self) -> str:
        trainable, total = self.count_parameters()
        line = (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                f"trainable%: {100 * trainable / max(total, 1):.4f}")
        print(line)
        return line

    def extra_repr(self) -> str:
        return f"method={self.method!r}, adapted={len(self._names)} modules"

    # -- several adapters on one model (HF PEFT's names): one is installed at a time
    @property
    def adapters(self) -> list[str]:
        """Every adapter's name, the active one first."""
        return [self.active_adapter, *self._inactive]

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def _link_shared_inputs(self, spec) -> None:
        """Link the installed LoRA layers' shared-input groups (``share_inputs``: True for the
        default groups, or the groups' names) and remember ``spec`` for ``set_adapter``."""
        from .modules.lora import DEFAULT_SHARED_INPUTS, share_inputs

        share_inputs(self.model, DEFAULT_SHARED_INPUTS if spec in (None, True) else spec)
        self._share_spec = spec

    def _record(self, adapter_name: Optional[str] = None) -> dict:
        """The modules and settings of adapter ``adapter_name`` (default: the active one)."""
        if adapter_name is None or adapter_name == self.active_adapter:
            return self._active_record()
        if adapter_name not in self._inactive:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {self.adapters}")
        return self._inactive[adapter_name]

    def _active_record(self) -> dict:
        return {"method": self.method, "options": self.options, "adapter_dtype": self.adapter_dtype,
                "names": list(self._names), "modules": self.adapted_modules(), "to_save": self.modules_to_save()}

    def _check_adapter_name(self, adapter_name) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or "/" in adapter_name or adapter_name.startswith("."):
            raise ValueError(f"adapter_name must be a non-empty name without '/', got {adapter_name!r}")
        if adapter_name in self.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} exists already (adapters: {self.adapters})")

    def _base_candidates(self) -> list:
        """``(name, base layer)`` of every linear layer an adapter could target, in model order:
        the model's plain ones and the base layers under installed adapters."""
        plain = [(n, m) for n, m in _linear_like(self.model) if n not in self._conv1d_plain]
        installed = [(n, m.base_layer) for n, m in self.adapted_modules().items()]
        installed += [(n, self._shared_base(n)) for n in self._conv1d_plain if n not in self._names]
        order = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
        return sorted(plain + installed, key=lambda item: order[item[0]])

    def _shared_base(self, name: str) -> Optional[nn.Linear]:
        """The base ``nn.Linear`` some adapter of this model already wraps at ``name``, or None."""
        installed = self.adapted_modules()
        if name in installed:
            return installed[name].base_layer
        for rec in self._inactive.values():
            if name in rec["modules"]:
                return rec["modules"][name].base_layer
        return None

    def _plain_layer(self, name: str, base: nn.Linear) -> nn.Module:
        """What the model holds at ``name`` while no installed adapter covers it: the base layer,
        or for a GPT-2 Conv1D a Conv1D viewing the base layer's weight (no copy; made at each
        switch, so it follows the base layer's current storage and device)."""
        if name not in self._conv1d:
            return base
        from transformers.pytorch_utils import Conv1D

        view = Conv1D(base.out_features, base.in_features)
        view.weight = nn.Parameter(base.weight.detach().t(), requires_grad=False)
        view.bias = base.bias
        self._conv1d_plain[name] = view
        return view

    def _new_base_linears(self, names: Sequence[str]) -> dict[str, nn.Linear]:
        """The base ``nn.Linear`` of each name, shared with the adapters that already wrap it; a
        Conv1D met for the first time is converted (and its pre-adapt flag remembered for unload)."""
        linears = {}
        for name in names:
            base = self._shared_base(name)
            if base is not None:
                linears[name] = base
                continue
            conv = self.model.get_submodule(name)
            flag = self._flag_before_adapt(conv.weight) if _is_conv1d(conv) else None
            got, conv1d = _base_linears(self.model, [name], self._snapshot)
            linears.update(got)
            if conv1d:
                self._conv1d[name] = flag
        return linears

    @contextlib.contextmanager
    def _all_or_nothing(self):
        """Undo this handle's bookkeeping and the model's ``requires_grad`` flags if the body fails
        (a failed ``add_adapter``/``load_adapter`` changes nothing)."""
        snapshot, conv1d = dict(self._snapshot), dict(self._conv1d)
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            yield
        except BaseException:
            self._snapshot, self._conv1d = snapshot, conv1d
            for p, flag in flags:
                p.requires_grad_(flag)
            raise

    def _stash(self, adapter_name: str, method: str, options: dict, adapter_dtype: str,
               modules: dict[str, nn.Module], to_save: dict[str, nn.Module]) -> None:
        _cast_adapters(modules, adapter_dtype)
        for name, m in modules.items():
            if name in self._conv1d:
                m._conv1d_layout = True
            for p in _adapter_params(m):
                p.requires_grad_(True)
        self._inactive[adapter_name] = {"method": method, "options": dict(options), "adapter_dtype": adapter_dtype,
                                        "names": list(modules), "modules": dict(modules), "to_save": dict(to_save)}
        for name, m in modules.items():
            # a Conv1D this adapter converted first: the model runs a view of the converted weight
            # meanwhile (one copy of the weight, not two)
            if name in self._conv1d and name not in self._names and name not in self._conv1d_plain:
                _set_submodule(self.model, name, self._plain_layer(name, m.base_layer))

    def add_adapter(self, adapter_name: str, method: Optional[str] = None, target_modules=None,
                    layers: Optional[Iterable[int]] = None, modules_to_save=None, adapter_dtype=None,
                    **method_options) -> None:
        """Build another adapter on the same base layers (PEFT's ``add_adapter``); it is not
        activated (``set_adapter``). ``method`` and ``adapter_dtype`` default to the active
        adapter's, ``target_modules`` to the layers it adapts (``layers`` filters either); options
        as for :func:`adapt`. All-or-nothing."""
        self._check_adapter_name(adapter_name)
        if method is not None and not isinstance(method, str):
            raise TypeError(f"add_adapter takes a method name and its options (as adapt() does), got "
                            f"{type(method).__name__}; for a PEFT LoraConfig pass its fields: method='lora', r=..., "
                            "alpha=..., target_modules=...")
        method = self.method if method is None else method
        family_class(method)
        spec = adapter_dtype_spec(self.adapter_dtype if adapter_dtype is None else adapter_dtype)
        if method_options.pop("share_inputs", None):
            raise TypeError("share_inputs is a property of the model: it follows set_adapter (see adapt)")
        candidates = self._base_candidates()
        targets = list(self._names) if target_modules is None else target_modules
        names = select_modules(self.model, targets, layers, candidates)
        to_save_names = select_modules_to_save(self.model, modules_to_save, self._names)
        names = _outside(names, to_save_names)
        with self._all_or_nothing():
            linears = self._new_base_linears(names)
            to_save = _wrap_to_save(self.model, to_save_names)
            modules = _build_modules(method, linears, method_options)
            self._stash(adapter_name, method, method_options, spec, modules, to_save)

    def load_adapter(self, directory: Union[str, os.PathLike], adapter_name: str) -> None:
        """Load a checkpoint (ours or a PEFT LoRA one) as another adapter on the same base layers
        (PEFT's ``load_adapter``); it is not activated (``set_adapter``). All-or-nothing."""
        self._check_adapter_name(adapter_name)
        where, meta, tensors, method, names = _read_for_load(directory)
        known = {n for n, _ in self._base_candidates()}
        missing = [n for n in names if n not in known]
        if missing:
            raise CheckpointError(f"{where}: the checkpoint adapts modules {missing} this model does not have "
                                  "as linear layers")
        if "peft" in meta:  # a PEFT json names no order (sorted tensor keys): the model's, as adapt() does
            order = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
            names.sort(key=order.__getitem__)
        meta, options, per_module, spec = _checkpoint_plan(meta, tensors, names, where)
        with self._all_or_nothing():
            # its heads may not hold layers of the installed adapter (their copies would carry it)
            to_save = _checkpoint_to_save(self.model, meta, tensors, [*names, *self._names], where)
            linears = self._new_base_linears(names)
            modules = _build_modules(method, linears, options, per_module)
            modules = _apply_checkpoint_masks(method, modules, linears, per_module, tensors)
            _cast_adapters(modules, spec)
            _load_into(method, modules, meta, tensors, where, to_save)
            self._stash(adapter_name, method, options, spec, modules, to_save)

    def set_adapter(self, adapter_name: str) -> None:
        """Install adapter ``adapter_name`` in the model and make it the one every method of this
        handle acts on (PEFT's ``set_adapter``). Module objects are swapped, never weights: each
        adapter keeps its own parameters (an optimizer over one adapter's parameters stays valid);
        layers only the other adapter targets get their plain layer back. The incoming layers take
        the model's train/eval mode, their base layer's device and the handle's on/off state
        (``disable_adapter_layers``). A merged adapter is unmerged first (with a warning, as in
        PEFT). Shared-input groups are re-linked for the new adapter if the old one had them.
        Switch outside DDP/FSDP wrappers; a torch.compile'd model recompiles for each adapter."""
        if not isinstance(adapter_name, str):
            raise TypeError(f"set_adapter takes one adapter name (one adapter is active at a time), got {adapter_name!r}")
        if adapter_name == self.active_adapter:
            return
        if adapter_name not in self._inactive:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {self.adapters}")
        if any(m.merged for m in self.adapted_modules().values()):
            warnings.warn(f"adapter {self.active_adapter!r} is merged: unmerging it to switch adapters", stacklevel=2)
            self.unmerge()
        new = self._inactive.pop(adapter_name)
        old = self._active_record()
        linked = any("_share_group" in m.__dict__ for m in old["modules"].values())
        for name, m in old["modules"].items():
            if name not in new["modules"]:
                _set_submodule(self.model, name, self._plain_layer(name, m.base_layer))
        for name, m in old["to_save"].items():
            if name not in new["to_save"]:
                _set_submodule(self.model, name, m.original_module)
        training = self.model.training
        for name, m in itertools.chain(new["modules"].items(), new["to_save"].items()):
            current = self.model.get_submodule(name)
            if "base_layer" in m._modules:
                if name in self._conv1d and _is_conv1d(current):
                    # what the model ran meanwhile is the truth: a .to()/.half() of the model (or a
                    # load_state_dict) reached that Conv1D, not the Linear this adapter wraps
                    _refresh_base(m.base_layer, current)
                m.to(device=m.base_layer.weight.device)
            else:  # a module to save: its trained copy follows its original (shared with others)
                p0 = next(m.original_module.parameters(), None)
                if p0 is not None:
                    m.trained_module.to(device=p0.device, dtype=p0.dtype if p0.is_floating_point() else None)
            m.train(training)
            m.enable_adapters(not self._layers_off)
            _set_submodule(self.model, name, m)
        self._inactive[self.active_adapter] = old
        self.active_adapter = adapter_name
        self.method, self.options, self.adapter_dtype = new["method"], new["options"], new["adapter_dtype"]
        self._names, self._to_save = list(new["names"]), list(new["to_save"])
        if linked:
            self._link_shared_inputs(self._share_spec)

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop an adapter (PEFT's ``delete_adapter``). Deleting the active one activates the next
        one first; the last adapter cannot be deleted (``unload()`` removes it)."""
        if adapter_name not in self.adapters:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {self.adapters}")
        if adapter_name == self.active_adapter:
            if not self._inactive:
                raise ValueError(f"{adapter_name!r} is the only adapter; use unload() or merge_and_unload() to remove it")
            self.set_adapter(next(iter(self._inactive)))
        rec = self._inactive.pop(adapter_name)
        for name, m in rec["modules"].items():
            if self._shared_base(name) is None:  # no adapter left covers it: the layer it replaced
                self._restore_layer(name, m.base_layer)
                self._conv1d.pop(name, None)
                self._conv1d_plain.pop(name, None)

    def _drop_inactive(self) -> None:
        """Forget every inactive adapter (unload / merge_and_unload): each layer only they adapted
        gets back the layer it replaced (a Conv1D a contiguous Conv1D), once."""
        done = set(self._names)
        for rec in self._inactive.values():
            for name, m in rec["modules"].items():
                if name not in done:
                    self._restore_layer(name, m.base_layer)
                    done.add(name)
        self._inactive, self._conv1d_plain = {}, {}

    # -- switching the adapters off and on (HF PEFT's names)
    def disable_adapter_layers(self) -> None:
        """Every adapted layer computes its base layer alone until ``enable_adapter_layers()``;
        merged layers are unmerged first (with a warning each, as in PEFT). Adapter parameters
        keep their values and ``requires_grad`` flags. Modules to save run their frozen original.
        The state holds for adapters switched in later (``set_adapter``), as in PEFT."""
        self._layers_off = True
        for m in self._switchable().values():
            m.enable_adapters(False)

    def enable_adapter_layers(self) -> None:
        """Switch every adapted layer's adapter back on (merged layers stay unmerged)."""
        self._layers_off = False
        for m in self._switchable().values():
            m.enable_adapters(True)

    @contextlib.contextmanager
    def disable_adapter(self):
        """``with handle.disable_adapter(): ...`` runs the base model alone (PEFT's
        ``PeftModel.disable_adapter()``: e.g. the reference model of DPO-style training without a
        second copy of the weights); modules to save run their frozen original. On exit, even
        after an exception, every installed layer is as it was: layers that were enabled are
        enabled again and merged layers are merged again. A merged layer is unmerged for the
        duration (exactly if it was merged with ``keep_original=True``; otherwise within
        ``unmerge()``'s rounding, in both directions). An adapter switched out inside the context
        gets its on/off state back but stays unmerged; one switched in follows the state before."""
        states = [(n, m, m.disable_adapters, m.merged, getattr(m, "keeps_original", False))
                  for n, m in self._switchable().items()]
        before = self._layers_off
        self._layers_off = True
        try:
            for _, m, _, merged, _ in states:
                if merged:
                    m.unmerge()
                m.enable_adapters(False)
            yield self
        finally:
            self._layers_off = before
            seen = set()
            for name, m, disabled, merged, kept in states:
                seen.add(id(m))
                m.enable_adapters(not disabled)
                if merged and not m.merged and self._installed(name, m):
                    m.merge(keep_original=kept)
            for m in self._switchable().values():  # switched in inside the context
                if id(m) not in seen:
                    m.enable_adapters(not before)

    # -- merging
    def _check_mergeable(self) -> None:
        if self.method in UNMERGEABLE:
            raise ValueError(f"{self.method} adapters route per batch/token and have no input-independent "
                             "dense change: they cannot be merged (keep the adapter modules for inference)")

    def _installed(self, name: str, m: nn.Module) -> bool:
        try:
            return self.model.get_submodule(name) is m
        except AttributeError:
            return False

    def _check_enabled(self, action: str) -> None:
        off = [n for n, m in self._switchable().items() if m.disable_adapters]
        if off:
            raise RuntimeError(f"cannot {action} with disabled adapters (their forward is the base layer alone): "
                               f"{off[:3]}{' ...' if len(off) > 3 else ''}; call enable_adapter_layers() first")

    def _check_untied(self, action: str) -> None:
        """Refuse to merge into a base weight the model also uses elsewhere (GPT-2 / tied-embedding
        models share lm_head's weight with the input embeddings): the merged change would land in
        the embeddings too (``merge``), or the tie would silently come apart (``merge_and_unload``:
        ``transformers`` re-ties such weights when it saves or loads, dropping the merged change)."""
        owners: dict = {}  # storage -> [(first byte, end byte, name)]
        for n, t in itertools.chain(self.model.named_parameters(remove_duplicate=False),
                                    self.model.named_buffers(remove_duplicate=False)):
            span = _memory_span(t)
            if span is not None:
                owners.setdefault(span[0], []).append((span[1], span[2], n))
        problems = []
        for name, m in self.adapted_modules().items():
            own = f"{name}.base_layer."
            span = _memory_span(m.base_layer.weight)
            if span is None:
                continue
            # overlapping bytes, not just one storage: parameters packed into one flat buffer
            # (FSDP1's use_orig_params, fused optimisers' views) share a storage but no elements
            others = [n for lo, hi, n in owners.get(span[0], ())
                      if lo < span[2] and span[1] < hi and not n.startswith(own)]
            if others:
                problems.append(f"the base weight of {name!r} shares its memory with {', '.join(others)}")
        if problems:
            raise ValueError(f"cannot {action}: tied weights would be changed together:\n  - " + "\n  - ".join(problems)
                             + "\nKeep these adapters unmerged, or untie the weight before adapt() (give the layer a "
                               "copy: layer.weight = nn.Parameter(layer.weight.detach().clone()), and set "
                               "config.tie_word_embeddings = False so transformers does not tie it again).")

    def merge(self, keep_original: bool = False) -> None:
        """Add every adapter's dense change into its base weight (forward == base layer alone).

        ``keep_original=True`` keeps a copy of each unmerged weight so that ``unmerge()`` and
        ``unload()`` restore it bit for bit, for one extra copy of every adapted weight; without
        it they subtract the change again, which in bf16/fp16 is off by up to one unit in the last
        place per merge/unmerge cycle (see ``LoRALinear.unmerge``). Raises ValueError, merging
        nothing, when an adapted base weight is tied to another tensor of the model."""
        self._check_mergeable()
        if not isinstance(keep_original, bool):
            raise TypeError(f"keep_original must be a bool, got {type(keep_original).__name__}")
        self._check_enabled("merge")
        self._check_untied("merge")
        for m in self.adapted_modules().values():
            if not m.merged:
                m.merge(keep_original=keep_original)

    def unmerge(self) -> None:
        for m in self.adapted_modules().values():
            if m.merged:
                m.unmerge()

    def _restore_layer(self, name: str, linear: nn.Linear) -> None:
        new = _linear_to_conv1d(linear, self._conv1d[name]) if name in self._conv1d else linear
        _set_submodule(self.model, name, new)

    def _flag_before_adapt(self, p: nn.Parameter) -> bool:
        """``p.requires_grad`` as it was before the adapters froze it."""
        entry = self._snapshot.get(id(p))
        return entry[1] if entry is not None and entry[0] is p else p.requires_grad

    def _unwrap_modules_to_save(self) -> None:
        """Put each module to save's trained copy in its place (PEFT's ``unload`` and
        ``merge_and_unload`` both keep it), with the flags its original had before ``adapt``."""
        for name, m in self.modules_to_save().items():
            for (_, p0), (_, p) in zip(m.original_module.named_parameters(), m.trained_module.named_parameters()):
                p.requires_grad_(self._flag_before_adapt(p0))
            _set_submodule(self.model, name, m.trained_module)

    def merge_and_unload(self) -> nn.Module:
        """Replace every adapter by a plain layer holding the merged weight, and every module to
        save by its trained copy; returns the model.

        Trainability goes back to what it was before ``adapt`` (as ``unload`` does): each merged
        layer's weight and bias take the flags of the ones they replace. Raises ValueError, changing
        nothing, when an adapted base weight is tied to another tensor of the model."""
        self._check_mergeable()
        self._check_enabled("merge_and_unload")
        self._check_untied("merge_and_unload")
        for name, m in self.adapted_modules().items():
            lin = m.to_linear()
            lin.weight.requires_grad_(self._flag_before_adapt(m.base_layer.weight))
            if lin.bias is not None:
                lin.bias.requires_grad_(self._flag_before_adapt(m.base_layer.bias))
            self._restore_layer(name, lin)
        self._unwrap_modules_to_save()
        self._drop_inactive()
        self._names, self._to_save = [], []
        _restore_requires_grad(self._snapshot)
        return self.model

    def unload(self) -> nn.Module:
        """Remove the adapters without merging, restoring the original layers and trainability
        (merged adapters are unmerged first: exactly, if merged with ``keep_original=True``).
        Modules to save keep their trained copy, as PEFT's ``unload`` does (``disable_adapter()``
        runs the frozen originals)."""
        for name, m in self.adapted_modules().items():
            if getattr(m, "merged", False):
                m.unmerge()
            self._restore_layer(name, m.base_layer)
        self._unwrap_modules_to_save()
        self._drop_inactive()
        self._names, self._to_save = [], []
        _restore_requires_grad(self._snapshot)
        return self.model

    # -- checkpoints
    def adapter_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``(state, shared)``: checkpoint key -> live tensor, each tensor once; ``shared`` maps the
        keys of tensors seen again (Lily's shared projectors) to the key they are stored under."""
        return _adapter_state(self._switchable())

    def _metadata(self, rec: Optional[dict] = None) -> dict:
        from . import __version__

        rec = self._active_record() if rec is None else rec
        return {
            "format_version": FORMAT_VERSION,
            "version": __version__,
            "family": rec["method"],
            # the implementation choice belongs to the machine that runs, not to the checkpoint
            "options": _json_safe({k: v for k, v in rec["options"].items() if k != "impl"}),
            "target_modules": list(rec["names"]),
            "modules": {n: _module_config(m) for n, m in rec["modules"].items()},
            "conv1d": sorted(n for n in rec["names"] if n in self._conv1d),
            "adapter_dtype": rec["adapter_dtype"],
            "modules_to_save": list(rec["to_save"]),
        }

    def save(self, directory: Union[str, os.PathLike], peft_format: Optional[bool] = None,
             is_main_process: bool = True, adapter_name: Optional[str] = None) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors``: both to temp files first,
        then renamed into place back to back, so a failed save (disk full, an error, an interrupt
        while writing) leaves the previous checkpoint in the directory untouched.

        For LoRA the default (``peft_format=None``) writes a plain PEFT LoRA checkpoint that
        ``peft.PeftModel.from_pretrained`` loads; ``peft_format=False`` writes this package's
        json instead. Other families cannot be written in PEFT's format.

        Under FSDP2 the adapter parameters are sharded and gathering them is a collective: call
        ``save`` on every rank with ``is_main_process=(rank == 0)`` (PEFT's argument); only that
        rank writes. Under DDP calling it on rank 0 alone is enough.

        ``adapter_name`` saves another adapter of the model (``add_adapter``/``load_adapter``)
        instead of the active one.
        """
        rec = self._record(adapter_name)
        if peft_format is None:
            peft_format = rec["method"] == "lora"
        if peft_format and rec["method"] != "lora":
            raise ValueError(f"peft_format=True needs method='lora', this model uses {rec['method']!r}")
        if not rec["names"]:
            raise ValueError("no adapter modules left (after merge_and_unload/unload): nothing to save")
        state, shared = _adapter_state({**rec["modules"], **rec["to_save"]})
        meta = self._metadata(rec)
        meta["shared"] = shared
        try:
            meta_json = json.dumps(meta, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"adapter options must be JSON-serialisable to be saved: {e}") from None
        tensors = {k: _to_saveable(t) for k, t in state.items()}
        config = _peft_lora_config(meta) if peft_format else {META_KEY: meta}
        if not is_main_process:
            return
        os.makedirs(directory, exist_ok=True)
        from safetensors.torch import save as st_save

        # The config goes last, as the commit record: it is the file PEFT, transformers and we look
        # for to decide a directory holds an adapter, so it never names weights not yet in place
        # (after a crash between the renames a new directory is simply not a checkpoint).
        _atomic_write_files(directory, [
            (WEIGHTS_NAME, st_save(tensors, metadata={META_KEY: meta_json})),
            (CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()),
        ])

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *, is_main_process: bool = True,
                        selected_adapters: Optional[Sequence[str]] = None, **kwargs) -> None:
        """PEFT's name for :meth:`save` (it writes the adapters only, never the whole model: without
        it, ``handle.save_pretrained`` would reach the wrapped ``transformers`` model's own method).
        PEFT's layout: every adapter (or ``selected_adapters``), the one named ``"default"`` in
        ``save_directory`` itself and each other one in ``save_directory/<name>``.
        ``peft_format`` is passed on and ``safe_serialization=True`` accepted (always safetensors);
        PEFT's other options have no counterpart here and are refused. Options are keyword-only
        (PEFT's second positional parameter is ``safe_serialization``)."""
        peft_format = kwargs.pop("peft_format", None)
        if kwargs.pop("safe_serialization", True) is not True:
            raise ValueError("save_pretrained: safe_serialization=False is not supported (always safetensors)")
        if kwargs:
            raise TypeError(f"save_pretrained: unsupported options {sorted(kwargs)} (peft_kernels writes "
                            "safetensors adapters; see AdaptedModel.save)")
        names = self.adapters if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} are not adapters of this model ({self.adapters})")
        if peft_format:  # checked for all before anything is written
            other = {n: self._record(n)["method"] for n in names if self._record(n)["method"] != "lora"}
            if other:
                raise ValueError(f"peft_format=True needs LoRA adapters; these are not: {other}")
        for name in names:
            where = save_directory if name == "default" else os.path.join(save_directory, name)
            self.save(where, peft_format=peft_format, is_main_process=is_main_process, adapter_name=name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (PEFT's name); the adapters live inside it."""
        return self.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """PEFT's name for :meth:`count_parameters`."""
        return self.count_parameters()

    def load(self, directory: Union[str, os.PathLike]) -> "AdaptedModel":
        """Load adapter weights saved from a model adapted the same way (our format or PEFT LoRA)."""
        meta, tensors = read_checkpoint(directory)
        if "peft" in meta:
            meta = _with_peft_module_options(meta, tensors)
        _load_into(self.method, self.adapted_modules(), meta, tensors, str(directory), self.modules_to_save())
        return self

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory) -> "AdaptedModel":
        return load_adapted(model, directory)


def _module_config(m: nn.Module) -> dict:
    cfg = dict(m.adapter_config())
    return {k: v for k, v in cfg.items() if k != "impl"}


def _adapter_state(modules: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state, shared, seen = {}, {}, {}
    for name, m in modules.items():
        for k, t in _adapter_items(m):
            key = f"{PREFIX}{name}.{k}"
            if id(t) in seen:
                shared[key] = seen[id(t)]
            else:
                seen[id(t)] = key
                state[key] = t
    return state, shared


def _memory_span(t: torch.Tensor):
    """``(storage, first byte, end byte)`` of the memory ``t`` covers, to find tied weights; None
    when there is nothing to compare (empty or meta tensors all report address 0). A tensor
    subclass without a storage of its own is identified by the object alone."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        storage = (t.device, t.untyped_storage().data_ptr())
        start = t.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return ("id", id(t)), 0, 1
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return storage, start, start + extent * t.element_size()


def _to_saveable(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if hasattr(t, "full_tensor"):  # an FSDP2-sharded DTensor: gather the whole tensor
        t = t.full_tensor()
    return t.to("cpu").contiguous().clone()


def _write_temp(directory: str, name: str, data: bytes) -> str:
    """``data`` in a new, fsynced temp file beside ``name`` in ``directory``; returns its path.

    Created with mode 0o666 so the kernel applies the umask (and any default ACL) exactly as for
    ``open(path, "w")``: the checkpoint gets the permissions any other file written there would
    (``tempfile.mkstemp`` would leave 0600, and reading the umask with ``os.umask`` means changing
    it for a moment, for every thread of the process)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(tempfile.TMP_MAX):
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}-{name}")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{directory}: could not create a unique temp file for {name}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _fsync_directory(directory: str) -> None:
    """Make the renames durable (POSIX); a platform that cannot open a directory skips it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the renames themselves are done
    finally:
        os.close(fd)


def _atomic_write_files(directory: str, files: Sequence[tuple[str, bytes]]) -> None:
    """Write every ``(name, data)`` into ``directory`` so no file is ever half written, and the set
    is replaced as a unit as far as a file system allows: all temp files are written and fsynced
    first (any failure there removes them and leaves the old files as they were), then renamed in
    the given order, back to back. The files being replaced are hard-linked to backups first, so a
    rename that fails after an earlier one succeeded puts the old files back (and removes a new
    file that had no predecessor). Only a crash between two renames can mix old and new files."""
    directory = os.path.abspath(directory)
    pending, backups, done = [], {}, []
    try:
        for name, data in files:
            pending.append((_write_temp(directory, name, data), name))
        for _, name in pending:
            target = os.path.join(directory, name)
            if os.path.exists(target):
                backup = os.path.join(directory, f".bak-{secrets.token_hex(8)}-{name}")
                try:
                    os.link(target, backup)
                except OSError:  # no hard links here: no rollback, the renames stay back to back
                    continue
                backups[name] = backup
        while pending:
            tmp, name = pending[0]
            os.replace(tmp, os.path.join(directory, name))
            done.append(name)
            pending.pop(0)
    except BaseException:
        for tmp, _ in pending:
            _unlink_quietly(tmp)
        for name in done:  # roll back what was already renamed into place
            target = os.path.join(directory, name)
            if name in backups:
                os.replace(backups.pop(name), target)
            else:
                _unlink_quietly(target)
        raise
    finally:
        for backup in backups.values():
            _unlink_quietly(backup)
    _fsync_directory(directory)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------- PEFT LoRA configs


def _peft_lora_config(meta: dict) -> dict:
    """A ``peft.LoraConfig`` json for our LoRA modules (only fields PEFT >= 0.9 knows, so it loads
    without "unexpected keyword" warnings)."""
    mods = meta["modules"]
    names = meta["target_modules"]
    rs = {n: int(c["r"]) for n, c in mods.items()}
    alphas = {n: float(c.get("alpha", 16.0)) for n, c in mods.items()}
    drops = {float(c.get("dropout", 0.0)) for c in mods.values()}
    rsl = {bool(c.get("use_rslora", False)) for c in mods.values()}
    if len(rsl) > 1:
        raise ValueError("PEFT's LoraConfig has one use_rslora for all modules; these modules mix both")
    # the most common r/alpha is the default; the others go to PEFT's rank/alpha patterns, keyed by
    # full module name (PEFT matches a pattern key against the end of the module name)
    r0, a0 = _most_common([rs[n] for n in names]), _most_common([alphas[n] for n in names])
    a0_json = int(a0) if float(a0).is_integer() else a0
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": False,
        "r": r0,
        "lora_alpha": a0_json,
        "lora_dropout": max(drops) if drops else 0.0,
        "use_rslora": rsl.pop() if rsl else False,
        # full module names: PEFT adapts a module when a list entry equals its name (or a suffix),
        # so exactly these modules get LoRA even when a layer subset was chosen
        "target_modules": list(names),
        "bias": "none",
        "fan_in_fan_out": bool(meta.get("conv1d")),
        "modules_to_save": list(meta.get("modules_to_save") or []) or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {n: r for n, r in rs.items() if r != r0},
        "alpha_pattern": {n: (int(a) if float(a).is_integer() else a) for n, a in alphas.items() if a != a0},
        "use_dora": False,
    }


def _most_common(values: list):
    """The most frequent value; ties go to the one seen first (deterministic configs)."""
    return max(dict.fromkeys(values), key=values.count)


def _pattern_value(patterns: dict, name: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): a key matches the end of the dotted name
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# LoraConfig fields the loaders read (r, alpha, dropout, rsLoRA, patterns) or check below.
_PEFT_CHECKED = frozenset({"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern",
                           "alpha_pattern", "bias", "lora_bias", "use_dora", "modules_to_save", "init_lora_weights"})
# LoraConfig fields that may hold anything: which modules carry LoRA (the tensor keys / the live
# layers say that, not these), what the checkpoint was made from, and options that are only read
# together with a field that is itself checked.
_PEFT_IGNORED = frozenset({
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "fan_in_fan_out",  # PEFT derives it from the layer type (True for Conv1D, False for Linear), as we do
    "task_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "runtime_config",  # runtime-only (ephemeral GPU offload); PEFT does not save it
    "megatron_core",  # read only with megatron_config, which must be unset
    "qalora_group_size",  # read only with use_qalora, which must be unset
})
# init_lora_weights values that only draw the initial A/B, which the loaded weights replace. EVA
# is one of them: its data-driven init runs before training (PEFT's layer only zeroes lora_B when
# built) and the ranks it picked are in rank_pattern/alpha_pattern, which we read; its eva_config
# is then ignorable. Every other value makes PEFT do more when it builds the layer, which these
# loaders do not reproduce: rewrite the base weight from an SVD or quantisation (pissa*, olora,
# corda, loftq, lora_ga) or freeze lora_B for training (mica).
_PEFT_PLAIN_INITS = ("gaussian", "orthogonal", "eva")
_PEFT_INIT_CONFIGS = {"eva": "eva_config"}  # an init's own config field, ignorable with that init


def _is_unset(value) -> bool:
    """None, False or empty: what an option PEFT does not know here must hold to be ignorable."""
    return value is None or value is False or (isinstance(value, (str, list, tuple, dict, set)) and not value)


@functools.lru_cache(maxsize=1)
def _peft_lora_defaults() -> dict:
    """``peft.LoraConfig``'s field defaults, or {} without peft (``_is_unset`` then decides)."""
    try:
        from peft import LoraConfig
    except ImportError:
        return {}
    out = {}
    for f in dataclasses.fields(LoraConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _peft_config_problems(cfg: dict) -> list[str]:
    """Every reason the PEFT ``LoraConfig`` ``cfg`` (a json dict, or a live config's ``to_dict()``)
    describes an adapter that a plain ``LoRALinear`` would compute differently from PEFT.

    An allowlist: fields read or checked here, fields that cannot change the result, and any other
    field only at its PEFT default (or None/False/empty: also what a field of a newer PEFT must
    hold). So a variant PEFT adds later (aLoRA's ``alora_invocation_tokens``, ``layer_replication``,
    ``use_bdlora``, ``arrow_config``, ``kasa_config``, ...) is refused instead of loaded as plain LoRA."""
    problems = []
    if cfg.get("use_dora"):
        problems.append("use_dora=true (DoRA) is not supported")
    bias, lora_bias = cfg.get("bias", "none"), cfg.get("lora_bias", False)
    if bias != "none" or lora_bias:
        problems.append(f"bias={bias!r}/lora_bias={lora_bias!r}: only bias='none' without lora_bias is supported "
                        "(trained biases are not carried over)")
    to_save = cfg.get("modules_to_save")
    if to_save is not None and (isinstance(to_save, str) or not isinstance(to_save, (list, tuple, set, frozenset))
                                or not all(isinstance(t, str) and t for t in to_save)):
        problems.append(f"modules_to_save={to_save!r} is not a list of module names")
    init = cfg.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in _PEFT_PLAIN_INITS):
        problems.append(f"init_lora_weights={init!r} is not supported: PEFT re-runs that initialisation when it "
                        "loads the adapter (e.g. rewriting the base weight); only True, False, "
                        f"{', '.join(repr(v) for v in _PEFT_PLAIN_INITS)} load as plain LoRA")
    defaults = _peft_lora_defaults()
    for key in sorted(cfg):
        if key in _PEFT_CHECKED or key in _PEFT_IGNORED or key == _PEFT_INIT_CONFIGS.get(init):
            continue
        value = cfg[key]
        if _is_unset(value) or (key in defaults and value == defaults[key]):
            continue
        expected = repr(defaults[key]) if key in defaults else "None/false/empty"
        problems.append(f"{key}={value!r} is not supported (a plain LoRA adapter has {key}={expected}); "
                        "PEFT computes such an adapter differently")
    return problems


def _meta_from_peft_config(cfg: dict, keys: Iterable[str], where: str) -> dict:
    """Our metadata for a checkpoint written by HF PEFT (a LoraConfig json + its tensor keys)."""
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: adapter_config.json has peft_type {cfg.get('peft_type')!r} and no "
                              f"'{META_KEY}' section; only PEFT LoRA checkpoints (peft_type 'LORA') can be read")
    problems = _peft_config_problems(cfg)
    names, odd = [], []
    for k in keys:
        if not k.startswith(PREFIX):
            odd.append(k)
            continue
        body = k[len(PREFIX):]
        if body.endswith(".lora_A.weight"):
            names.append(body[: -len(".lora_A.weight")])
        elif not body.endswith(".lora_B.weight"):
            odd.append(k)
    to_save = _name_list(cfg.get("modules_to_save"))
    if to_save:  # a trained module's keys: matched against the model's modules when loading
        odd = [k for k in odd if not k.startswith(PREFIX)]
    if odd:
        problems.append(f"keys that are not LoRA Linear weights (embedding/conv LoRA, DoRA magnitudes, biases "
                        f"or modules to save outside modules_to_save are not supported): {sorted(odd)}")
    if problems:
        raise CheckpointError(f"{where}: cannot load this PEFT checkpoint:\n  - " + "\n  - ".join(problems))
    return {"format_version": FORMAT_VERSION, "family": "lora", "peft": cfg, "target_modules": sorted(names),
            "modules": None, "shared": {}, "modules_to_save": list(to_save)}


def _name_list(names) -> list:
    """A config's list of module names (PEFT also allows a set) as a list, in a fixed order."""
    if not names:
        return []
    return sorted(names) if isinstance(names, (set, frozenset)) else list(names)


def _with_peft_module_options(meta: dict, tensors: dict) -> dict:
    """Fill ``modules`` of a PEFT checkpoint's metadata: r from each lora_A's shape (PEFT's
    rank_pattern), alpha from alpha_pattern or lora_alpha."""
    cfg, per_module = meta["peft"], {}
    for n in meta["target_modules"]:
        a = tensors.get(f"{PREFIX}{n}.lora_A.weight")
        r = a.shape[0] if a is not None and a.dim() == 2 else _pattern_value(cfg.get("rank_pattern"), n, cfg.get("r", 8))
        per_module[n] = _peft_module_options(cfg, n, r)
    return dict(meta, modules=per_module)


def _peft_module_options(cfg: dict, name: str, r: int) -> dict:
    alpha = _pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8))
    return {"r": int(r), "alpha": float(alpha), "dropout": float(cfg.get("lora_dropout", 0.0) or 0.0),
            "use_rslora": bool(cfg.get("use_rslora", False))}


# ----------------------------------------------------------------------------- loading


def _header_meta(header: dict, w_path: str) -> dict:
    """Our metadata from the safetensors header ({} when absent)."""
    if META_KEY not in header:
        return {}
    try:
        return json.loads(header[META_KEY])
    except ValueError as e:
        raise CheckpointError(f"{w_path}: unreadable '{META_KEY}' metadata: {e}") from e


def read_checkpoint(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and parse a checkpoint directory: ``(metadata, tensors)``; one clear error if unreadable.

    The metadata comes from the json's ``peft_kernels`` section (our own format) or, for a PEFT
    ``LoraConfig`` json, from that json alone: its r / lora_alpha / use_rslora / lora_dropout and
    rank/alpha patterns win over what our ``save`` also wrote into the safetensors header."""
    directory = str(directory)
    cfg_path = os.path.join(directory, CONFIG_NAME)
    w_path = os.path.join(directory, WEIGHTS_NAME)
    missing = [p for p in (cfg_path, w_path) if not os.path.isfile(p)]
    if missing:
        raise CheckpointError(f"{directory}: not an adapter checkpoint, missing {', '.join(missing)}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot parse adapter config: {e}") from e
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    try:
        with open(w_path, "rb") as f:
            blob = f.read()
        tensors = st_load(blob)
        with safe_open(w_path, framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{w_path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: adapter config must be a JSON object, got {type(cfg).__name__}")
    meta = cfg.get(META_KEY)
    if meta is None and "peft_type" in cfg:
        # A PEFT LoraConfig json (PEFT's, or ours saved with peft_format) is read as PEFT reads it,
        # and our copy of the options in the safetensors header is ignored: the json is the file
        # people edit (an edited lora_alpha must not load as one adapter in PEFT and another here).
        meta = _meta_from_peft_config(cfg, tensors.keys(), directory)
        # ...except the adapter dtype, which PEFT's json cannot hold and which changes nothing PEFT
        # computes: our header's copy keeps a saved adapter_dtype="base"/a dtype across a reload
        header_dtype = _header_meta(header, w_path).get("adapter_dtype")
        if header_dtype is not None:
            meta["adapter_dtype"] = header_dtype
    elif meta is None and META_KEY in header:
        meta = _header_meta(header, w_path)
    if meta is None:
        meta = _meta_from_peft_config(cfg, tensors.keys(), directory)
    return meta, tensors


def _compare_options(want: dict, have: dict) -> list[str]:
    diffs = []
    for k in sorted(set(want) | set(have)):
        if k in _OPTIONS_NOT_COMPARED:
            continue
        if want.get(k) != have.get(k):
            diffs.append(f"{k}: checkpoint {want.get(k)!r} vs model {have.get(k)!r}")
    return diffs


def _validate(method: str, modules: dict[str, nn.Module], meta: dict, tensors: dict[str, torch.Tensor],
              where: str, to_save: Optional[dict[str, nn.Module]] = None) -> dict[str, torch.Tensor]:
    """Check everything; returns live tensor -> checkpoint tensor pairs keyed by our key. Raises one
    CheckpointError listing every problem, having changed nothing. ``to_save``: the model's modules
    trained in full (``ModuleToSave``), checked with the adapters."""
    problems = []
    to_save = dict(to_save or {})
    if "peft" not in meta:  # ours names them exactly (a PEFT json holds patterns: its keys decide)
        ck_to_save = list(meta.get("modules_to_save") or [])
        if sorted(ck_to_save) != sorted(to_save):
            problems.append(f"modules to save differ: checkpoint {sorted(ck_to_save)} vs model {sorted(to_save)}")
    fam = meta.get("family")
    if fam != method:
        raise CheckpointError(f"{where}: checkpoint holds {fam!r} adapters but the model uses {method!r}; "
                              "a checkpoint only loads into the family that saved it")
    ck_names, names = list(meta.get("target_modules") or []), list(modules)
    miss_m = sorted(set(names) - set(ck_names))
    extra_m = sorted(set(ck_names) - set(names))
    if miss_m:
        problems.append(f"adapted modules absent from the checkpoint: {miss_m}")
    if extra_m:
        problems.append(f"checkpoint modules not adapted in this model: {extra_m}")
    ck_mods = meta.get("modules") or {}
    for n in names:
        if n in ck_mods:
            diffs = _compare_options(ck_mods[n], _module_config(modules[n]))
            if diffs:
                problems.append(f"options of {n} differ: " + "; ".join(diffs))
    state, shared = _adapter_state({**modules, **to_save})
    ck_shared = dict(meta.get("shared") or {})
    if shared != ck_shared:
        # e.g. Lily saved with stride 1 loaded into a model built with stride 2: the model's shared
        # LP would take one layer's checkpoint tensor and silently drop the other's
        diff = sorted(set(shared.items()) ^ set(ck_shared.items()))
        problems.append(f"the checkpoint shares parameters differently from the model ({len(diff)} difference(s), "
                        f"e.g. {diff[:3]}; as (key, the key it shares): check options such as Lily's stride)")
    # resolve every key the model expects (shared ones included) to a checkpoint tensor
    expected = dict(state)
    expected.update({k: state[v] for k, v in shared.items()})
    available = set(tensors) | set(ck_shared)
    missing = sorted(set(expected) - available)
    unexpected = sorted(available - set(expected))
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    pairs = {}
    for key, live in state.items():
        src_key = ck_shared.get(key, key)
        if src_key not in tensors:
            continue
        src = tensors[src_key]
        if tuple(src.shape) != tuple(live.shape):
            problems.append(f"shape mismatch for {key}: checkpoint {tuple(src.shape)} vs model {tuple(live.shape)}")
        elif src.is_floating_point() != live.is_floating_point():
            problems.append(f"dtype mismatch for {key}: checkpoint {src.dtype} vs model {live.dtype}")
        else:
            pairs[key] = src
    problems += _check_sparse_masks(modules, pairs)
    if problems:
        raise CheckpointError(f"{where}: cannot load adapter checkpoint ({len(problems)} problem(s)); "
                              "the model was not changed:\n  - " + "\n  - ".join(problems))
    return pairs


def _check_sparse_masks(modules: dict[str, nn.Module], pairs: dict[str, torch.Tensor]) -> list[str]:
    """A sparse adapter's mask arrives as index buffers: check them as CSR before anything is copied
    (an out-of-range column would otherwise surface later, inside a kernel)."""
    from .reference.sparse import check_csr

    problems = []
    for name, m in modules.items():
        keys = [f"{PREFIX}{name}.{k}" for k in ("crow", "col", "values")]
        if not (isinstance(getattr(m, "crow", None), torch.Tensor) and keys[0] in pairs and keys[1] in pairs):
            continue
        crow, col = pairs[keys[0]], pairs[keys[1]]
        val = pairs.get(keys[2], torch.empty(col.shape[0] if col.dim() == 1 else 0))
        try:
            check_csr(crow, col, val, (m.out_features, m.in_features))
        except (ValueError, TypeError) as e:
            problems.append(f"invalid sparse mask for {name}: {e}")
    return problems


def _load_into(method: str, modules: dict[str, nn.Module], meta: dict, tensors: dict, where: str,
               to_save: Optional[dict[str, nn.Module]] = None) -> None:
    merged = [n for n, m in modules.items() if getattr(m, "merged", False)]
    if merged:
        raise CheckpointError(f"{where}: cannot load into merged adapters {merged} (their old change is in the "
                              "base weights); call unmerge() first")
    pairs = _validate(method, modules, meta, tensors, where, to_save)
    state, _ = _adapter_state({**modules, **(to_save or {})})
    with torch.no_grad():
        for key, src in pairs.items():
            state[key].copy_(src.to(state[key].dtype))
    for m in modules.values():
        # modules that cache something derived from their buffers (e.g. a sparse mask's transpose)
        hook = getattr(m, "_adapter_state_loaded", None)
        if callable(hook):
            hook()


def _read_for_load(directory) -> tuple:
    """``(where, meta, tensors, family, adapted names)`` of a checkpoint about to be loaded."""
    where = str(directory)
    meta, tensors = read_checkpoint(directory)
    method = meta.get("family")
    if method not in FAMILIES:
        raise CheckpointError(f"{where}: unknown adapter family {method!r} (known: {sorted(FAMILIES)})")
    names = list(meta.get("target_modules") or [])
    if not names:
        raise CheckpointError(f"{where}: the checkpoint names no adapted modules")
    return where, meta, tensors, method, names


def _checkpoint_plan(meta: dict, tensors: dict, names: Sequence[str], where: str) -> tuple:
    """``(meta, options, per_module, adapter dtype spec)`` to rebuild a checkpoint's modules."""
    options = dict(meta.get("options") or {})
    if "peft" in meta:
        meta = _with_peft_module_options(meta, tensors)
        per_module = meta["modules"]
        options = dict(per_module[names[0]])
    elif meta.get("family") == "lily":
        per_module = None
    else:
        per_module = meta.get("modules")
        if per_module is None or set(per_module) != set(names):
            raise CheckpointError(f"{where}: metadata lacks the per-module options of {list(names)}")
    # a PEFT json records no adapter dtype: "auto" is what PeftModel.from_pretrained does by default
    try:
        spec = adapter_dtype_spec(meta.get("adapter_dtype", "auto"))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return meta, options, per_module, spec


def load_adapted(model: nn.Module, directory) -> AdaptedModel:
    """Adapt a fresh ``model`` as the checkpoint in ``directory`` says and load its weights.

    Reads our format and HF PEFT LoRA checkpoints. On any error the model is left unchanged.
    """
    if isinstance(model, AdaptedModel):
        raise TypeError("model is already adapted; use adapted.load(directory)")
    where, meta, tensors, method, names = _read_for_load(directory)
    if "peft" in meta:
        # a PEFT json names no order (the names come from sorted tensor keys): use the model's, as adapt() does
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        names.sort(key=lambda n: order.get(n, len(order)))
    snapshot = _snapshot_requires_grad(model)
    try:
        linears, conv1d = _base_linears(model, names, snapshot, error_cls=CheckpointError)
        meta, options, per_module, dtype_spec = _checkpoint_plan(meta, tensors, names, where)
        to_save = _checkpoint_to_save(model, meta, tensors, names, where)
        modules = _build_modules(method, linears, options, per_module)
        modules = _apply_checkpoint_masks(method, modules, linears, per_module, tensors)
        _validate(method, modules, meta, tensors, where, to_save)
    except BaseException:
        _restore_requires_grad(snapshot)
        raise
    adapted = _install(model, method, options, modules, conv1d, snapshot, dtype_spec, to_save)
    _load_into(method, modules, meta, tensors, where, to_save)
    return adapted


def _checkpoint_to_save(model: nn.Module, meta: dict, tensors: dict, adapted: Sequence[str],
                        where: str) -> dict[str, nn.Module]:
    """A ``ModuleToSave`` (built, not installed) for each module the checkpoint trained in full.
    Ours lists full names; a PEFT json lists patterns (matched by PEFT's rule), of which only
    modules with tensors in the file count: PEFT's sequence-classification models add
    ``classifier`` and ``score`` whether or not both exist, and a matched module without tensors
    would load as an untouched copy of itself. A module that cannot be taken is a CheckpointError."""
    wanted = list(meta.get("modules_to_save") or [])
    if not wanted:
        return {}
    try:
        if "peft" not in meta:
            names = select_modules_to_save(model, wanted, adapted, strict=True, exact=True)
        else:
            names = [n for n in select_modules_to_save(model, wanted, adapted, strict=False)
                     if any(k.startswith(f"{PREFIX}{n}.") for k in tensors)]
        return _wrap_to_save(model, names)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _apply_checkpoint_masks(method, modules, linears, per_module, tensors):
    """A sparse checkpoint's mask may hold another nnz than a fresh module draws from its density:
    rebuild such modules on the checkpoint's own ``(crow, col)`` so the shapes agree. A mask the
    module rejects is left for ``_validate`` to report with everything else."""
    if method != "sparse":
        return modules
    cls = family_class("sparse")
    for name in list(modules):
        crow, col = tensors.get(f"{PREFIX}{name}.crow"), tensors.get(f"{PREFIX}{name}.col")
        live = dict(_adapter_items(modules[name]))
        if crow is None or col is None or "col" not in live or tuple(col.shape) == tuple(live["col"].shape):
            continue
        device = linears[name].weight.device
        try:
            modules[name] = cls.from_linear(linears[name], **dict(per_module[name], mask=(crow.to(device),
                                                                                        col.to(device))))
        except (ValueError, TypeError):
            pass
    return modules


def load_peft_checkpoint(model: nn.Module, directory) -> AdaptedModel:
    """Load an HF PEFT LoRA checkpoint directory (``save_pretrained`` output) into ``model``."""
    meta, _ = read_checkpoint(directory)
    if meta.get("family") != "lora":
        raise CheckpointError(f"{directory}: not a LoRA checkpoint (family {meta.get('family')!r})")
    return load_adapted(model, directory)


# ----------------------------------------------------------------------------- live PEFT models


def from_peft_model(peft_model: nn.Module) -> AdaptedModel:
    """Convert a live HF PEFT LoRA model in place: every PEFT ``LoraLayer`` becomes a ``LoRALinear``
    holding the same weights (and every ``ModulesToSaveWrapper`` a ``ModuleToSave`` holding the
    same modules); returns an AdaptedModel over the unwrapped base model. Each of PEFT's adapters
    becomes one of ours under its name, PEFT's active adapter the active one (``set_adapter``
    switches). Do not use the PEFT wrapper afterwards."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    cls = family_class("lora")
    configs = getattr(peft_model, "peft_config", None) or getattr(base, "peft_config", None) or {}
    problems, plan, checked, wrappers = [], [], set(), []
    disabled = {}  # name -> PEFT's switch (disable_adapter_layers()), carried over
    for name, m in base.named_modules():
        if type(m).__name__ == "ModulesToSaveWrapper":
            for a, trained in getattr(m, "modules_to_save", {}).items():
                wrappers.append((name, a, m.original_module, trained))
            disabled[name] = bool(getattr(m, "disable_adapters", False))
            continue
        if not isinstance(m, LoraLayer):
            continue
        if getattr(m, "merged", False):
            problems.append(f"{name}: the adapter is merged; call unmerge_adapter() first")
        base_layer = m.get_base_layer()
        if not (isinstance(base_layer, nn.Linear) or _is_conv1d(base_layer)):
            problems.append(f"{name}: LoRA on {type(base_layer).__name__} is not supported (Linear/Conv1D only)")
            continue
        disabled[name] = bool(getattr(m, "disable_adapters", False))
        for a in m.lora_A.keys():
            if a not in checked:
                # the same rules as for a saved checkpoint: a live aLoRA, bias="lora_only", PiSSA,
                # ... model converted to plain LoRA would compute (or, saved, reload) something
                # else. For an init that rewrote the base weight the live conversion would even
                # match, but anything saved from it loads onto the unmodified base model wrongly.
                checked.add(a)
                cfg = configs.get(a)
                if cfg is None or not hasattr(cfg, "to_dict"):
                    problems.append(f"adapter {a!r} has no LoraConfig in peft_config: cannot check its options")
                else:
                    # enums as their json values (PeftType.LORA -> 'LORA'), as in a saved config
                    cfg_dict = {k: v.value if isinstance(v, enum.Enum) else v for k, v in cfg.to_dict().items()}
                    if cfg_dict.get("peft_type") != "LORA":
                        problems.append(f"adapter {a!r}: peft_type {cfg_dict.get('peft_type')!r} is not supported "
                                        "(only plain LoRA, 'LORA')")
                    problems += [f"adapter {a!r}: {msg}" for msg in _peft_config_problems(cfg_dict)]
            if getattr(m, "use_dora", {}).get(a, False):
                problems.append(f"{name}: DoRA is not supported")
            if getattr(m, "lora_bias", {}).get(a, False):
                problems.append(f"{name}: lora_bias is not supported")
            drop = m.lora_dropout[a]
            use_rslora = bool(getattr(configs.get(a), "use_rslora", False))
            plan.append((name, m, a, base_layer, {
                "r": int(m.r[a]), "alpha": float(m.lora_alpha[a]),
                "dropout": float(drop.p) if isinstance(drop, nn.Dropout) else 0.0, "use_rslora": use_rslora}))
    active = getattr(peft_model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            problems.append(f"{len(active)} active adapters {list(active)}: one adapter is active at a time here")
        active = active[0] if active else None
    names_in_order = list(dict.fromkeys([a for _, _, a, _, _ in plan] + [a for _, a, _, _ in wrappers]))
    if active is None or active not in names_in_order:
        active = names_in_order[0] if names_in_order else None
    if problems:
        raise ValueError("cannot convert this PEFT model:\n  - " + "\n  - ".join(problems))
    if not any(a == active for _, _, a, _, _ in plan):
        raise ValueError("the model holds no PEFT LoRA layers" + (f" for its active adapter {active!r}" if plan else ""))
    snapshot = _snapshot_requires_grad(base)
    linears, conv1d, originals = {}, {}, {}
    modules: dict[str, dict] = {a: {} for a in names_in_order}
    options, specs = {}, {}
    for name, m, a, base_layer, opts in plan:
        if name not in linears:
            originals[name] = base_layer
            linears[name] = base_layer
            if _is_conv1d(base_layer):
                linears[name] = _conv1d_to_linear(base_layer)
                conv1d[name] = base_layer.weight.requires_grad
                snapshot.pop(id(base_layer.weight), None)
        new = cls.from_linear(linears[name], **opts)
        new.train(m.training)
        new.to(device=m.lora_A[a].weight.device)
        # PEFT's adapter dtype (fp32 by default, autocast_adapter_dtype=True), so copying loses nothing
        new.lora_A.to(dtype=m.lora_A[a].weight.dtype)
        new.lora_B.to(dtype=m.lora_B[a].weight.dtype)
        with torch.no_grad():
            new.lora_A.weight.copy_(m.lora_A[a].weight)
            new.lora_B.weight.copy_(m.lora_B[a].weight)
        if not math.isclose(new.scaling, float(m.scaling[a]), rel_tol=1e-12):
            # e.g. a scaling changed by hand with PEFT's set_scale: r/alpha/rslora do not describe it
            raise ValueError(f"{name}: PEFT scaling {m.scaling[a]} differs from what r={opts['r']}, "
                             f"alpha={opts['alpha']}, use_rslora={opts['use_rslora']} give ({new.scaling})")
        modules[a][name] = new
        if a not in options:
            options[a] = dict(opts)
            # the adapter dtype PEFT used, as the spec that reproduces it (its default: "auto")
            peft_dtype = m.lora_A[a].weight.dtype
            specs[a] = ("auto" if peft_dtype == adapter_dtype_for("auto", base_layer.weight.dtype)
                        else adapter_dtype_spec(peft_dtype))
    if hasattr(base, "peft_config"):
        try:
            del base.peft_config  # set by PEFT's injection; the model is no longer a PEFT model
        except AttributeError:
            pass
    from .modules.to_save import ModuleToSave

    # PEFT's modules_to_save wrappers: the same frozen original and trained copy (not copied again)
    to_save: dict[str, dict] = {a: {} for a in names_in_order}
    for name, a, original, trained in wrappers:
        to_save[a][name] = ModuleToSave(original, trained).train(original.training)
    # heads only inactive adapters cover hold their plain original meanwhile
    for name, a, original, _ in wrappers:
        if name not in to_save[active]:
            _set_submodule(base, name, original)
    adapted = _install(base, "lora", options[active], modules[active], conv1d, snapshot, specs[active],
                       to_save[active])
    adapted.active_adapter = active
    # layers only inactive adapters cover: the plain layer (a Conv1D as a view of the converted weight)
    for name in originals:
        if name not in modules[active]:
            _set_submodule(base, name, adapted._plain_layer(name, linears[name]))
    for a in names_in_order:
        if a != active:
            adapted._stash(a, "lora", options.get(a, options[active]), specs.get(a, specs[active]), modules[a],
                           to_save[a])
    for name, m in adapted._switchable().items():
        m.enable_adapters(not disabled.get(name, False))
    if disabled and all(disabled.values()):
        adapted._layers_off = True
    return adapted


# ----------------------------------------------------------------------------- PEFT's entry point

# PEFT's task types whose model class adds the task head to modules_to_save
_PEFT_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


def get_peft_model(model: nn.Module, peft_config, adapter_dtype="auto", share_inputs=False) -> "AdaptedModel":
    """``peft.get_peft_model(model, LoraConfig(...))`` on the fused kernels: the same adapted modules,
    ranks, alphas (``rank_pattern``/``alpha_pattern``, rsLoRA), dropout, modules to save (including
    the head a ``task_type`` such as ``"SEQ_CLS"`` adds) and initialisation, so switching is one
    import. ``peft_config`` is a ``peft.LoraConfig`` or its ``to_dict()``/json dict. Anything a plain
    LoRA layer would compute differently (DoRA, biases, PiSSA and other inits, aLoRA, ...) is
    refused by name, as when loading. ``adapter_dtype`` / ``share_inputs`` are :func:`adapt`'s.
    Returns an :class:`AdaptedModel` (its ``save`` writes a PEFT checkpoint)."""
    if isinstance(peft_config, dict):
        cfg = dict(peft_config)
    elif hasattr(peft_config, "to_dict"):
        cfg = {k: v.value if isinstance(v, enum.Enum) else v for k, v in peft_config.to_dict().items()}
    else:
        raise TypeError(f"peft_config must be a peft.LoraConfig or a dict, got {type(peft_config).__name__}")
    if cfg.get("peft_type") not in ("LORA", None):
        raise ValueError(f"peft_config: peft_type {cfg.get('peft_type')!r} is not supported (only LoRA, 'LORA')")
    if isinstance(model, AdaptedModel):
        raise TypeError("model is already an AdaptedModel; pass adapted.model to adapt more layers")
    adapter_dtype = adapter_dtype_spec(adapter_dtype)
    problems = _peft_config_problems(cfg)
    init = cfg.get("init_lora_weights", True)
    if init is not True:
        problems.append(f"init_lora_weights={init!r}: a new adapter here starts from PEFT's default init (True) only")
    if problems:
        raise ValueError("peft_config: cannot build this adapter:\n  - " + "\n  - ".join(problems))
    names = _peft_target_names(model, cfg)
    to_save = _name_list(cfg.get("modules_to_save"))
    to_save += [h for h in _PEFT_HEADS.get(cfg.get("task_type"), ()) if h not in to_save]
    # as PEFT: names that match no module are ignored (its saved SEQ_CLS configs list both
    # "classifier" and "score"); one call, so a task head nested in a user's module is refused
    to_save_names = select_modules_to_save(model, to_save, strict=False)
    names = _outside(names, to_save_names)
    per_module = {n: _peft_module_options(cfg, n, _pattern_value(cfg.get("rank_pattern"), n, cfg.get("r", 8)))
                  for n in names}
    adapted = _adapt_names(model, "lora", names, dict(per_module[names[0]]), per_module, adapter_dtype, to_save_names)
    if cfg.get("inference_mode"):
        for p in adapted.trainable_parameters():  # PEFT builds such an adapter frozen
            p.requires_grad_(False)
    if share_inputs:
        adapted._link_shared_inputs(share_inputs)
    return adapted


def _peft_layer_index(name: str, layers_pattern) -> Optional[int]:
    """PEFT's layer index of a module path: the first number two components in (``model.layers.3.``
    -> 3, not ``h.3.`` at the root), or the number after one of ``layers_pattern``."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def _peft_target_names(model: nn.Module, cfg: dict) -> list[str]:
    """The modules PEFT 0.21 would give LoRA for ``cfg`` (``check_target_module_exists``): a str is
    a regex over the full name (``all-linear`` in any case: every linear but the output layer);
    list entries match a full name exactly or a dotted suffix, never as a regex; ``layers_to_transform``
    filters suffix matches only, by PEFT's index rule; ``exclude_modules`` (a regex or names) wins.
    A matched module that is not an nn.Linear/Conv1D is refused (PEFT would adapt an embedding or a
    convolution; these kernels do not)."""
    targets = cfg.get("target_modules")
    if targets is None:
        raise ValueError("peft_config: target_modules is required (PEFT's per-architecture defaults are not "
                         "reproduced); e.g. ['q_proj', 'v_proj'] or 'all-linear'")
    exclude = cfg.get("exclude_modules")

    def excluded(n: str) -> bool:
        if not exclude:
            return False
        if isinstance(exclude, str):
            return re.fullmatch(exclude, n) is not None
        return n in exclude or any(n.endswith("." + e) for e in exclude)

    if isinstance(targets, str) and targets.lower() == "all-linear":
        found = [n for n in select_modules(model, "all-linear") if not excluded(n)]
    else:
        layers = cfg.get("layers_to_transform")
        if isinstance(layers, (list, tuple)) and not layers:
            layers = None
        listed = None if isinstance(targets, str) else set(targets)
        found = []
        for n, _ in model.named_modules():
            if not n or excluded(n):
                continue
            if listed is None:
                hit = re.fullmatch(targets, n) is not None
            elif n in listed:
                hit = True
            else:
                hit = any(n.endswith("." + t) for t in listed)
                if hit and layers is not None:
                    idx = _peft_layer_index(n, cfg.get("layers_pattern"))
                    hit = idx is not None and (idx == layers if isinstance(layers, int) else idx in layers)
            if hit:
                found.append(n)
        linear = {n for n, _ in _linear_like(model)}
        others = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in found if n not in linear]
        if others:
            raise ValueError(f"peft_config: target_modules {targets!r} match modules that are not nn.Linear/Conv1D "
                             f"layers (LoRA on them is not supported here): {others[:5]}")
    if not found:
        raise ValueError(f"peft_config: target_modules {targets!r} match no linear layer of {type(model).__name__}"
                         f"{' (after exclude_modules / layers_to_transform)' if exclude or cfg.get('layers_to_transform') else ''}; "
                         f"{_describe_available([n for n, _ in _linear_like(model)])}")
    return found


__all__ = ["adapt", "get_peft_model", "adapter_dtype_spec", "adapter_dtype_for", "AdaptedModel", "CheckpointError", "load_adapted",
           "load_peft_checkpoint", "from_peft_model", "read_checkpoint", "select_modules", "select_modules_to_save",
           "family_class", "FAMILIES",
           "CONFIG_NAME", "WEIGHTS_NAME"]
