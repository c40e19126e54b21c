"""Fine-tuning throughput of a Llama-style causal LM: the frozen floor, peft_kernels, HF PEFT.

The model is built from a config with random weights (``transformers`` ``LlamaConfig`` /
``AutoModelForCausalLM.from_config``; nothing is downloaded). Adapters go on every linear layer
except the output head. One step = forward with the LM loss, backward, and AdamW on the adapter
parameters; tokens/s = batch * seq * steps / time of the timed steps after the warm-up steps.
The floor is the frozen model's forward+backward with the gradient reaching the input embeddings
only: no adapter can train faster than that.
"""
from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .meta import stamp
from .timing import keep_freed_memory

GiB = 1024 ** 3

# A ~1.1B Llama (TinyLlama's shape; GUIDE.md's end-to-end anchor) and a model small enough that a
# CPU step takes milliseconds.
MODELS = {
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                     rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rms_norm_eps=1e-5, tie_word_embeddings=False),
}

# Adapter options per family, the same for peft_kernels and HF PEFT where PEFT has the method.
FAMILY_OPTIONS = {
    "lora": lambda a: dict(r=a.r, alpha=2 * a.r, dropout=a.dropout),
    "monarch": lambda a: dict(nblocks=4, blk_r=4, dropout=a.dropout),
    "sparse": lambda a: dict(density=0.01),
    "lily": lambda a: dict(r=a.r, num_experts=4, routing="batch"),
}


@dataclass
class TrainSpeedSettings:
    model: str = "tiny"
    families: Sequence[str] = ("lora",)
    seq: int = 128
    batch: int = 2
    steps: int = 3
    warmup: int = 1
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    r: int = 16
    dropout: float = 0.0
    impl: Optional[str] = None
    threads: Optional[int] = None  # CPU: torch threads while timing (None -> 1, see layer.run_bench)
    rounds: int = 1  # passes over the variants, the order reversed every other pass (ABBA)
    # adapter weights' dtype for peft_kernels and HF PEFT alike: "auto" = both libraries' default
    # (fp32 adapters in a fp16/bf16 model; PEFT's autocast_adapter_dtype=True), "base" = the model's
    adapter_dtype: str = "auto"


@dataclass
class TrainSpeedResult:
    meta: dict
    settings: dict
    rows: list = field(default_factory=list)
    interrupted: bool = False  # stopped early (SIGINT, e.g. a time limit): the rows so far are kept


def load_config(model: str):
    """``tiny`` / ``llama-1b`` or a path to an HF ``config.json`` (or a directory holding one)."""
    from transformers import AutoConfig, LlamaConfig

    if model in MODELS:
        return LlamaConfig(**MODELS[model])
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise ValueError(f"--model must be one of {sorted(MODELS)} or a path to an HF config json, got {model!r}")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {path}: cannot read it as JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"--model {path}: an HF config json is an object, got a {type(d).__name__}")
    d.pop("architectures", None)
    model_type = d.pop("model_type", "llama")
    try:
        return AutoConfig.for_model(model_type, **d)
    except Exception as e:  # noqa: BLE001 - transformers raises several types for a bad config
        raise ValueError(f"--model {path}: not a usable {model_type!r} config ({type(e).__name__}: {e})") from None


def build_model(config, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    model.to(dtype=dtype)
    model.config.use_cache = False
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def linear_targets(model: nn.Module) -> list:
    """Name suffixes of every nn.Linear except the output head (HF PEFT's ``all-linear``)."""
    out_head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m is not out_head}
    return sorted(names)


def _randomize_trainable(params) -> None:
    """Adapters start with a zero factor; time on random values (zeros can run faster)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _time_steps(step, n_warmup: int, n_steps: int, device: torch.device) -> tuple:
    for _ in range(n_warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    if device.type != "cuda":
        return elapsed, None, None
    return elapsed, torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.max_memory_reserved(device) / GiB


def _device_busy_ms(events) -> float:
    """Milliseconds the GPU spent in kernels, copies and memsets among profiler ``events``
    (``prof.events()``: device-side events carry their own duration; one stream, no overlap)."""
    from torch.autograd import DeviceType

    # user annotations (record_function ranges mirrored on the device) span kernels already counted
    return sum(e.device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e3


def _gpu_busy_ms(step, device: torch.device) -> Optional[float]:
    """GPU time of one more step, from torch.profiler's CUDA activity (None off CUDA, or where the
    profiler cannot trace the device). Against the timed step's wall time it says who limits the
    step: near 100% the GPU; well below, the host (Python, launches) or a sync leaves the GPU idle.
    Profiled once, after the timed steps, so it costs them nothing."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        busy = _device_busy_ms(prof.events())
        return busy if busy > 0 else None
    except Exception:  # noqa: BLE001 - a diagnostic only: no CUPTI, a profiler already running, ...
        return None


def _floor_step(model, ids):
    emb = model.get_input_embeddings()

    def step():
        x = emb(ids).detach().requires_grad_(True)  # the gradient reaches the embeddings, no weight grads
        model(inputs_embeds=x, labels=ids).loss.backward()

    return step


def _train_step(model, params, ids):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _kernels_model(config, fam: str, opts: dict, s: TrainSpeedSettings, device: torch.device):
    from peft_kernels.adapters import adapt

    model = build_model(config, s.dtype, device)
    if s.impl:
        opts = {**opts, "impl": s.impl}
    handle = adapt(model, method=fam, target_modules=linear_targets(model), adapter_dtype=s.adapter_dtype, **opts)
    params = list(handle.trainable_parameters())
    return handle, params


def _kernels_model_shared(config, fam: str, opts: dict, s: TrainSpeedSettings, device: torch.device):
    """peft_kernels LoRA with ``share_inputs=True``: q/k/v and gate/up share one down-projection
    pass over their input (opt-in until this row shows it pays)."""
    return _kernels_model(config, fam, {**opts, "share_inputs": True}, s, device)


def _peft_model(config, fam: str, opts: dict, s: TrainSpeedSettings, device: torch.device):
    import peft

    model = build_model(config, s.dtype, device)
    targets = linear_targets(model)
    if fam == "lora":
        cfg = peft.LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], lora_dropout=opts["dropout"],
                              target_modules=targets)
    elif fam == "lily":
        cfg = peft.LilyConfig(r=opts["r"], num_B=opts["num_experts"], scaling=1.0, target_modules=targets)
    else:
        raise ImportError(f"HF PEFT has no {fam} tuner to compare with")
    pm = peft.get_peft_model(model, cfg, autocast_adapter_dtype=s.adapter_dtype == "auto")
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    return pm, params


def _variants(s: TrainSpeedSettings):
    yield "frozen model (floor)", None, None
    for fam in s.families:
        yield f"peft_kernels {fam}", fam, _kernels_model
        if fam == "lora" and (s.device.startswith("cuda") or s.impl == "triton"):
            yield f"peft_kernels {fam} (shared inputs)", fam, _kernels_model_shared  # fused path only
        if fam in ("lora", "lily"):
            yield f"HF PEFT {fam}", fam, _peft_model


def _adapters_text(s: TrainSpeedSettings) -> str:
    half = s.dtype in (torch.float16, torch.bfloat16)
    if s.adapter_dtype == "auto":
        return ("both libraries' default: " + ("fp32 adapter weights in the half-precision model (HF PEFT's "
                                               "autocast_adapter_dtype=True)" if half else "the model's dtype"))
    return "weights in the model dtype for every variant (HF PEFT built with autocast_adapter_dtype=False)"


def run_train_speed(s: TrainSpeedSettings, progress: bool = True) -> TrainSpeedResult:
    """Time the floor and every (family, implementation) on fresh models built from one config."""
    device = torch.device(s.device)
    saved_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(s.threads or 1)
        keep_freed_memory()
    try:
        return _run(s, device, progress)
    finally:
        torch.set_num_threads(saved_threads)


def _run(s: TrainSpeedSettings, device: torch.device, progress: bool) -> TrainSpeedResult:
    config = load_config(s.model)
    tokens = s.batch * s.seq
    settings = {"model": s.model, "families": list(s.families), "seq": s.seq, "batch": s.batch,
                "steps": s.steps, "warmup": s.warmup, "dtype": str(s.dtype).replace("torch.", ""),
                "device": str(device), "torch_threads": torch.get_num_threads(), "r": s.r, "dropout": s.dropout, "impl": s.impl or "dispatch default",
                "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                "step": "forward (LM loss) + backward + AdamW on adapter parameters; floor: no optimizer, "
                        "gradient to the input embeddings only",
                "adapter_dtype": s.adapter_dtype,
                "adapters": _adapters_text(s),
                "rounds": s.rounds,
                "order": "every variant once per round, the order reversed every other round (ABBA: a drift "
                         "of the clocks over the run hits every variant alike); times are the rounds' mean"}
    result = TrainSpeedResult(meta=stamp(device), settings=settings)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (s.batch, s.seq), generator=g).to(device)
    try:
        _run_variants(s, device, progress, config, ids, tokens, result)
    except KeyboardInterrupt:  # a time limit's SIGINT: keep (and let the caller write) the finished rows
        result.interrupted = True
    ok = [r for r in result.rows if r["status"] == "ok" and r["tokens_per_s"]]
    floor_tps = next((r["tokens_per_s"] for r in ok if r["family"] == "-"), None)
    by_name = {r["variant"]: r for r in ok}
    for row in result.rows:
        if row["tokens_per_s"] and floor_tps:
            row["slowdown_vs_floor"] = floor_tps / row["tokens_per_s"]
        if not (row["variant"].startswith("peft_kernels") and row["tokens_per_s"]):
            continue
        ref = by_name.get(f"HF PEFT {row['family']}")  # same adapter dtype: the like-for-like reference
        if ref is not None:
            row["speedup_vs_peft"] = row["tokens_per_s"] / ref["tokens_per_s"]
            if row["peak_gib"] and ref["peak_gib"]:
                row["peak_vs_peft"] = row["peak_gib"] / ref["peak_gib"]
    return result


def _run_variants(s, device, progress, config, ids, tokens, result) -> None:
    """Time every variant, ``s.rounds`` times (ABBA order), one row each in ``result.rows`` (updated
    after every measurement, so an interrupt keeps what finished)."""
    from tqdm.auto import tqdm

    variants = list(_variants(s))
    rows, times = {}, {}
    for name, fam, _ in variants:
        rows[name] = {"variant": name, "family": fam or "-", "trainable_params": 0, "rounds_done": 0, "step_ms": None,
                      "tokens_per_s": None, "step_spread_pct": None, "slowdown_vs_floor": None,
                      "speedup_vs_peft": None, "peak_gib": None,
                      "peak_reserved_gib": None, "peak_vs_peft": None,
                      "gpu_busy_ms": None, "gpu_busy_pct": None, "status": "ok"}
        times[name] = []
    order = [v for rnd in range(s.rounds) for v in (variants if rnd % 2 == 0 else variants[::-1])]
    listed = set()  # rows join the table once measured (or failed): an interrupted one does not
    for name, fam, maker in tqdm(order, desc="peft-kernels train-speed", unit="model", disable=not progress):
        row = rows[name]
        if row["status"] != "ok":  # failed in an earlier round
            continue
        model = params = step = None
        try:
            if maker is None:
                model = build_model(config, s.dtype, device)
                step = _floor_step(model, ids)
            else:
                opts = FAMILY_OPTIONS[fam](s)
                model, params = maker(config, fam, opts, s, device)
                _randomize_trainable(params)
                row["trainable_params"] = sum(p.numel() for p in {id(p): p for p in params}.values())
                step = _train_step(model, params, ids)
            elapsed, peak, reserved = _time_steps(step, s.warmup, s.steps, device)
            times[name].append(elapsed / s.steps)
            row["rounds_done"] = len(times[name])
            step_s = sum(times[name]) / len(times[name])
            row.update(step_ms=1e3 * step_s, tokens_per_s=tokens / step_s)
            if len(times[name]) > 1:
                row["step_spread_pct"] = 100.0 * (max(times[name]) - min(times[name])) / step_s
            if peak is not None:
                row["peak_gib"] = max(peak, row["peak_gib"] or 0.0)
                row["peak_reserved_gib"] = max(reserved, row["peak_reserved_gib"] or 0.0)
            if row["gpu_busy_ms"] is None:  # profiled once, in the first round
                row["gpu_busy_ms"] = _gpu_busy_ms(step, device)
            if row["gpu_busy_ms"] is not None:
                # not clamped: above 100 the profile counted overlapping work, and says so
                row["gpu_busy_pct"] = 100.0 * row["gpu_busy_ms"] / row["step_ms"]
        except ImportError as e:
            row["status"] = f"n/a: {type(e).__name__}: {e}"[:200]
        except Exception as e:  # noqa: BLE001 - one failing variant must not sink the comparison
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            if times[name]:  # failed in a later round: no figure of it may stand (nor be compared with)
                row["status"] += f" (in round {len(times[name]) + 1})"
                row.update(step_ms=None, tokens_per_s=None, step_spread_pct=None, peak_gib=None,
                           peak_reserved_gib=None, gpu_busy_ms=None, gpu_busy_pct=None)
        finally:
            # drop every reference (the step closure holds the model and optimizer) before the
            # next model is built, or its peak memory would include this one
            model = params = step = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if name not in listed:
            listed.add(name)
            result.rows.append(row)


TRAIN_COLUMNS = (
    ("variant", "variant", None), ("trainable", "trainable_params", ","), ("step ms", "step_ms", ".1f"),
    ("spread %", "step_spread_pct", ".1f"), ("tokens/s", "tokens_per_s", ",.0f"),
    ("x floor", "slowdown_vs_floor", ".2f"), ("vs HF PEFT", "speedup_vs_peft", ".2f"),
    ("peak GiB", "peak_gib", ".2f"), ("reserved GiB", "peak_reserved_gib", ".2f"),
    ("peak vs PEFT", "peak_vs_peft", ".2f"), ("GPU busy %", "gpu_busy_pct", ".0f"),
)
_OPTIONAL_COLUMNS = ("step_spread_pct", "peak_gib", "peak_reserved_gib", "peak_vs_peft",
                     "gpu_busy_pct")


def train_speed_text(result: TrainSpeedResult) -> str:
    from .meta import stamp_line
    from .report import format_table

    s = result.settings
    out = [f"peft-kernels train-speed | {stamp_line(result.meta)}",
           f"model={s['model']} (hidden {s['hidden_size']}, {s['num_hidden_layers']} layers) "
           f"batch={s['batch']} seq={s['seq']} dtype={s['dtype']} steps={s['steps']} (+{s['warmup']} warm-up)",
           f"step: {s['step']}", f"adapters: {s.get('adapters', '?')}",
           "x floor = floor tokens/s / variant tokens/s; vs HF PEFT = tokens/s over HF PEFT's with the same "
           "adapter dtype, same family; "
           "GiB = 2**30 bytes (max_memory_allocated / _reserved over the timed steps)"]
    if s.get("rounds", 1) > 1:
        out.append(f"{s['rounds']} rounds: {s['order']}; spread % = slowest - fastest round / mean")
    if result.meta.get("note"):
        out.append(f"NOTE: {result.meta['note']}")
    if result.interrupted:
        out.append("INTERRUPTED: the variants below finished at least one round (rounds_done in the files); "
                   "the rest are missing")
    ok = [r for r in result.rows if r["status"] == "ok"]
    cols = [c for c in TRAIN_COLUMNS if c[1] not in _OPTIONAL_COLUMNS or any(r.get(c[1]) for r in ok)]
    out.append(format_table(ok, cols))
    if any(r.get("gpu_busy_pct") for r in ok):
        out.append("GPU busy % = GPU time of one profiled step (kernels, copies) / timed step time: "
                   "well below 100 = the host (Python, launches) leaves the GPU idle; above 100 = the "
                   "profile counted overlapping work: do not read it")
    for r in result.rows:
        if r["status"] != "ok":
            out.append(f"  [{r['variant']}] {r['status']}")
    return "\n".join(out)


def write_train_speed(result: TrainSpeedResult, out_dir: str) -> list:
    from .report import write_csv, write_json

    os.makedirs(out_dir, exist_ok=True)
    return [write_csv(os.path.join(out_dir, "train_speed.csv"), result.rows, result.meta, result.settings),
            write_json(os.path.join(out_dir, "train_speed.json"),
                       {"meta": result.meta, "settings": result.settings, "rows": result.rows})]
