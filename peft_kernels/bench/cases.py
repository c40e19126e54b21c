"""What the layer benchmark runs: per family, the configurations and the competing implementations.

Every variant is built from one shared ``Setup`` (input, frozen weight, output gradient) so all
of them see the same data in the same process. Each builder returns ``(forward, params)``: a
zero-argument callable producing the layer output with autograd on, and the trainable tensors
whose gradients are reset between timed calls. Adapter tensors are random (never zeros: a
zero matrix can run faster than real data and would hide unwritten outputs).

Competitors written here, as users run them today:
- HF PEFT (``peft.get_peft_model`` on a one-Linear module) for LoRA and Lily, adapter weights in
  the layer's dtype (``autocast_adapter_dtype=False``) so every variant does the same arithmetic;
- plain torch LoRA with ``nn.functional.dropout`` and its ``torch.compile`` (GPU only);
- Monarch as MoRe's two batched matmuls; sparse as a dense scatter + matmul and as
  ``torch.sparse`` CSR; Lily's per-token mixture with per-expert outputs;
- ``peft_kernels.reference``: the package's pure-torch path (the CPU default and test oracle).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

FAMILIES = ("lora", "monarch", "sparse", "lily")
SEED = 1234  # dropout seed for the kernels; any fixed value times the same work

# The three shapes of GUIDE.md section 4 (d_in, d_out) at T=8192 bf16 on a GPU, and a small
# CPU default that keeps `peft-kernels bench` well under two minutes on two cores.
GPU_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
GPU_TOKENS = 8192
CPU_SHAPES = ((256, 256), (256, 688), (688, 256))
CPU_TOKENS = 256

Builder = Callable[["Setup", dict], tuple[Callable[[], torch.Tensor], list]]


@dataclass
class Setup:
    """Tensors shared by every variant of one (family, shape): input, frozen weight, grad of output."""

    x: torch.Tensor
    weight: torch.Tensor
    dy: torch.Tensor

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device


def make_setup(d_in: int, d_out: int, tokens: int, dtype: torch.dtype, device: torch.device) -> Setup:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)).to(device=device, dtype=dtype)
    dy = torch.randn(tokens, d_out, generator=g).to(device=device, dtype=dtype)
    return Setup(x=x, weight=w, dy=dy)


@dataclass
class Variant:
    """One competitor row. ``fused``: a peft_kernels fused-path row, built with ``impl=`` the
    family's resolved implementation (and ``base=`` when ``base`` pins LoRA's base GEMM).
    ``needs_impl``: the row only means something where that implementation runs (else it is
    listed as skipped). ``gpu_only`` rows are skipped off CUDA; ``why`` is the reason the table
    gives for such a skip."""

    name: str
    build: Builder
    gpu_only: bool = False
    applies: Callable[[dict], bool] = field(default=lambda cfg: True)
    fused: bool = False
    needs_impl: Optional[str] = None
    base: Optional[str] = None
    why: str = ""
    pin_impl: Optional[str] = None  # fused rows: run this implementation instead of dispatch's choice
    # fused rows: without --impl, call with impl=None (the op's own choice, which may measure between
    # implementations: the sparse family's cuda/triton), instead of dispatch's static pick bound
    unforced: bool = False
    # run after every other row of every shape (a baseline that costs a compile per shape: a run cut
    # short by a time limit keeps all the kernels' rows); the table still lists it in place
    deferred: bool = False


@dataclass
class Family:
    name: str
    configs: Callable[[bool], list]      # sweep -> list of config dicts
    label: Callable[[dict], str]         # config -> short text for tables
    variants: list
    op_module: str                       # where peft_kernels' fused op lives


def _param(shape, setup: Setup, scale: float, g: torch.Generator) -> torch.Tensor:
    t = torch.randn(*shape, generator=g) * scale
    return t.to(device=setup.device, dtype=setup.dtype).requires_grad_(True)


def _gen() -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(1)


class _One(nn.Module):
    """The smallest model HF PEFT can adapt: one Linear called ``proj``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        d_out, d_in = weight.shape
        self.proj = nn.Linear(d_in, d_out, bias=False, device="meta")
        self.proj.weight = nn.Parameter(weight.detach(), requires_grad=False)  # shares storage

    def forward(self, x):
        return self.proj(x)


def _peft_model(setup: Setup, config, fp32_adapters: bool = False):
    """``fp32_adapters``: PEFT's default (``autocast_adapter_dtype=True``: fp32 adapter weights on
    a half-precision layer); else the adapter in the layer's dtype like every other row."""
    from peft import get_peft_model

    model = get_peft_model(_One(setup.weight), config, autocast_adapter_dtype=fp32_adapters)
    if fp32_adapters:
        model.to(device=setup.device)
    else:
        model.to(device=setup.device, dtype=setup.dtype)
    model.train()
    return model


def _randomize(params, g: torch.Generator) -> list:
    """PEFT initialises B-side factors to zero; time on random data like every other variant."""
    out = []
    with torch.no_grad():
        for p in params:
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            out.append(p)
    return out


# ----------------------------------------------------------------------------------------- LoRA
def _lora_params(setup: Setup, cfg: dict):
    g = _gen()
    r = cfg["r"]
    A = _param((r, setup.d_in), setup, 1 / math.sqrt(setup.d_in), g)
    B = _param((setup.d_out, r), setup, 1 / math.sqrt(r), g)
    return A, B, 2.0  # alpha = 2r, PEFT's usual choice -> scaling 2


def lora_kernel(setup: Setup, cfg: dict, impl: Optional[str] = None, base: Optional[str] = None,
                fp32_adapters: bool = False):
    """The fused op; ``base`` pins who runs the frozen product on the Triton path (``triton``:
    Triton GEMM with the LoRA term in its epilogue, ``cublas``: cuBLAS + in-place LoRA pass);
    ``None`` is the op's own default (``PEFT_KERNELS_BASE``, else ``auto``: timed per shape).
    ``fp32_adapters``: A/B in fp32 on the layer's (half-precision) activations, what ``adapt``
    builds on a bf16/fp16 model by default (PEFT's default too); the kernels read bf16 copies."""
    from peft_kernels.ops.lora import lora_linear

    A, B, s = _lora_params(setup, cfg)
    if fp32_adapters:
        A, B = (t.detach().float().requires_grad_(True) for t in (A, B))
    x, w, p = setup.x, setup.weight, cfg["dropout"]
    kw = {} if base is None else {"base": base}
    return (lambda: lora_linear(x, w, A, B, scaling=s, dropout_p=p, seed=SEED, impl=impl, **kw)), [A, B]


def lora_kernel_fp32_adapters(setup: Setup, cfg: dict, impl: Optional[str] = None, base: Optional[str] = None):
    return lora_kernel(setup, cfg, impl, base, fp32_adapters=True)


def lora_reference(setup: Setup, cfg: dict):
    from peft_kernels.reference import lora

    A, B, s = _lora_params(setup, cfg)
    x, w, p = setup.x, setup.weight, cfg["dropout"]
    return (lambda: lora(x, w, A, B, scaling=s, dropout_p=p, seed=SEED)), [A, B]


def _torch_lora(x, w, A, B, s: float, p: float):
    return F.linear(x, w) + s * F.linear(F.linear(F.dropout(x, p, training=True), A), B)


def lora_torch(setup: Setup, cfg: dict):
    A, B, s = _lora_params(setup, cfg)
    x, w, p = setup.x, setup.weight, cfg["dropout"]
    return (lambda: _torch_lora(x, w, A, B, s, p)), [A, B]


def lora_compiled(setup: Setup, cfg: dict):
    A, B, s = _lora_params(setup, cfg)
    x, w, p = setup.x, setup.weight, cfg["dropout"]
    # every (shape, config) recompiles the same function; start from a clean cache so a sweep
    # never hits Dynamo's recompile limit and silently falls back to eager
    torch._dynamo.reset()
    fn = torch.compile(_torch_lora, dynamic=False)
    # AOTAutograd's donated buffers off (for the rest of this process: the flag is read again at
    # each backward; the compiled rows run last): with them a retained graph cannot run backward,
    # and the row's bwd would be derived (f+b - fwd, with a warm L2) instead of timed like the others
    from torch._functorch import config as aot_config

    aot_config.donated_buffer = False
    return (lambda: fn(x, w, A, B, s, p)), [A, B]


def lora_peft(setup: Setup, cfg: dict, fp32_adapters: bool = False):
    from peft import LoraConfig

    r = cfg["r"]
    model = _peft_model(setup, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=cfg["dropout"],
                                          target_modules=["proj"]), fp32_adapters)
    layer = model.base_model.model.proj
    params = _randomize([layer.lora_A["default"].weight, layer.lora_B["default"].weight], _gen())
    x = setup.x
    return (lambda: model(x)), params


def lora_peft_default(setup: Setup, cfg: dict):
    return lora_peft(setup, cfg, fp32_adapters=True)


def _lora_configs(sweep: bool) -> list:
    if sweep:  # issue 3: r in {8, 16, 64}, dropout {0, 0.05}
        return [dict(r=r, dropout=p) for r in (8, 16, 64) for p in (0.0, 0.05)]
    return [dict(r=16, dropout=0.0), dict(r=16, dropout=0.05)]


# -------------------------------------------------------------------------------------- Monarch
def _monarch_params(setup: Setup, cfg: dict):
    from peft_kernels.reference import monarch_dims

    g = _gen()
    N, r = cfg["nblocks"], cfg["blk_r"]
    p, s = monarch_dims(setup.d_in, setup.d_out, N)
    W1 = _param((N, r, p), setup, 1 / math.sqrt(p), g)
    W2 = _param((N, s, r), setup, 1 / math.sqrt(r), g)
    return W1, W2


def monarch_kernel(setup: Setup, cfg: dict, impl: Optional[str] = None):
    from peft_kernels.ops.monarch import monarch_linear

    W1, W2 = _monarch_params(setup, cfg)
    x, w, p = setup.x, setup.weight, cfg["dropout"]
    return (lambda: monarch_linear(x, w, W1, W2, dropout_p=p, seed=SEED, impl=impl)), [W1, W2]


def monarch_reference(setup: Setup, cfg: dict):
    from peft_kernels.reference import monarch

    W1, W2 = _monarch_params(setup, cfg)
    x, w, p = setup.x, setup.weight, cfg["dropout"]
    return (lambda: monarch(x, w, W1, W2, dropout_p=p, seed=SEED)), [W1, W2]


def monarch_two_bmm(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, out_features: int) -> torch.Tensor:
    """MoRe's public form: block-diagonal bmm, permutation, block-diagonal bmm (adapter only)."""
    T, n = x.shape
    N, r, p = W1.shape
    s = W2.shape[1]
    X = F.pad(x, (0, N * p - n)).view(T, N, p).transpose(0, 1)          # (N, T, p)
    Y1 = torch.bmm(X, W1.transpose(1, 2))                               # (N, T, r)
    Y1flat = Y1.transpose(0, 1).reshape(T, N * r)                        # [t, k*r + j]
    Z = Y1flat.view(T, r, N).permute(2, 0, 1)                            # Z[l, t, i] = Y1flat[t, i*N + l]
    Y2 = torch.bmm(Z, W2.transpose(1, 2))                                # (N, T, s)
    return Y2.permute(1, 2, 0).reshape(T, s * N)[:, :out_features]      # out[t, c*N + l] = Y2[l, t, c]


def monarch_torch(setup: Setup, cfg: dict):
    W1, W2 = _monarch_params(setup, cfg)
    x, w, p, m = setup.x, setup.weight, cfg["dropout"], setup.d_out
    return (lambda: F.linear(x, w) + F.dropout(monarch_two_bmm(x, W1, W2, m), p, training=True)), [W1, W2]


def _monarch_configs(sweep: bool) -> list:
    if sweep:  # issue 4: nblocks 4, blk_r in {4, 8, 32}
        return [dict(nblocks=4, blk_r=r, dropout=0.0) for r in (4, 8, 32)]
    return [dict(nblocks=4, blk_r=4, dropout=0.0)]


# --------------------------------------------------------------------------------------- sparse
def random_csr(d_out: int, d_in: int, density: float, device, g: torch.Generator):
    """A random mask with the same number of nonzeros in every row, columns sorted (int64 CSR)."""
    k = max(1, min(d_in, round(density * d_in)))
    col = torch.rand(d_out, d_in, generator=g).topk(k, dim=1).indices.sort(dim=1).values.reshape(-1)
    crow = torch.arange(0, d_out * k + 1, k, dtype=torch.int64)
    return crow.to(device), col.to(device)


_MASKS: dict = {}  # (d_out, d_in, density, device) -> (crow, col): a big mask takes seconds to draw


def _sparse_params(setup: Setup, cfg: dict):
    g = _gen()
    key = (setup.d_out, setup.d_in, cfg["density"], str(setup.device))
    if key not in _MASKS:
        if len(_MASKS) > 8:
            _MASKS.clear()
        _MASKS[key] = random_csr(setup.d_out, setup.d_in, cfg["density"], setup.device,
                                 torch.Generator(device="cpu").manual_seed(2))
    crow, col = _MASKS[key]
    val = _param((col.numel(),), setup, 1 / math.sqrt(setup.d_in * cfg["density"]), g)
    return crow, col, val


def sparse_kernel(setup: Setup, cfg: dict, impl: Optional[str] = None):
    from peft_kernels.ops.sparse import sparse_linear

    from peft_kernels.ops.sparse import csr_transpose

    crow, col, val = _sparse_params(setup, cfg)
    x, w = setup.x, setup.weight
    csr_t = csr_transpose(crow, col, w.shape[1])  # built once per mask, as SparseLinear caches it
    return (lambda: sparse_linear(x, w, crow, col, val, impl=impl, csr_t=csr_t)), [val]


def sparse_reference(setup: Setup, cfg: dict):
    from peft_kernels.reference import sparse

    crow, col, val = _sparse_params(setup, cfg)
    x, w = setup.x, setup.weight
    return (lambda: sparse(x, w, crow, col, val)), [val]


def sparse_densified(setup: Setup, cfg: dict):
    """Scatter the values into a dense (d_out, d_in) delta every step, then a dense matmul."""
    crow, col, val = _sparse_params(setup, cfg)
    rows = torch.repeat_interleave(torch.arange(setup.d_out, device=setup.device), crow.diff())
    x, w = setup.x, setup.weight

    def fwd():
        delta = torch.zeros_like(w).index_put((rows, col), val)
        return F.linear(x, w) + F.linear(x, delta)

    return fwd, [val]


def sparse_merged(setup: Setup, cfg: dict):
    """The values added into a copy of W0 every step, then one dense matmul ``x (W0 + delta)^T``: the
    strongest plain-torch form, as a user would write it (3 GEMMs a step: forward, dX, and the full
    ``(d_out, d_in)`` weight gradient that autograd then gathers at the mask)."""
    crow, col, val = _sparse_params(setup, cfg)
    rows = torch.repeat_interleave(torch.arange(setup.d_out, device=setup.device), crow.diff())
    x, w = setup.x, setup.weight
    return (lambda: F.linear(x, w.index_put((rows, col), val, accumulate=True))), [val]


def sparse_torch_csr(setup: Setup, cfg: dict):
    """``torch.sparse`` CSR matmul (autograd reaches the values)."""
    crow, col, val = _sparse_params(setup, cfg)
    x, w = setup.x, setup.weight
    shape = (setup.d_out, setup.d_in)
    with warnings.catch_warnings():  # torch warns once per process that CSR is "beta"
        warnings.simplefilter("ignore")
        torch.sparse_csr_tensor(crow, col, val.detach(), size=shape, check_invariants=False)

    def fwd():
        S = torch.sparse_csr_tensor(crow, col, val, size=shape, check_invariants=False)
        return F.linear(x, w) + torch.sparse.mm(S, x.t()).t()

    return fwd, [val]


def _sparse_configs(sweep: bool) -> list:
    if sweep:  # issue 5: densities {0.5%, 1%, 5%}
        return [dict(density=d) for d in (0.005, 0.01, 0.05)]
    return [dict(density=0.01)]


# ----------------------------------------------------------------------------------------- Lily
def _lily_params(setup: Setup, cfg: dict):
    g = _gen()
    r, E = cfg["r"], cfg["E"]
    lp = _param((r, setup.d_in), setup, 1 / math.sqrt(setup.d_in), g)
    router = _param((E, r), setup, 1 / math.sqrt(r), g)
    hp = _param((E, setup.d_out, r), setup, 1 / math.sqrt(r), g)
    return lp, router, hp


def lily_kernel(setup: Setup, cfg: dict, impl: Optional[str] = None):
    from peft_kernels.ops.lily import lily_linear

    lp, router, hp = _lily_params(setup, cfg)
    x, w, routing = setup.x, setup.weight, cfg["routing"]
    return (lambda: lily_linear(x, w, lp, router, hp, routing=routing, impl=impl)), [lp, router, hp]


def lily_reference(setup: Setup, cfg: dict):
    from peft_kernels.reference import lily

    lp, router, hp = _lily_params(setup, cfg)
    x, w, routing = setup.x, setup.weight, cfg["routing"]
    return (lambda: lily(x, w, lp, router, hp, routing=routing)), [lp, router, hp]


def lily_torch_per_expert(setup: Setup, cfg: dict):
    """The straightforward per-token mixture: every expert's output ``(T, E, d_out)``, then weighted."""
    lp, router, hp = _lily_params(setup, cfg)
    x, w = setup.x, setup.weight

    def fwd():
        h = F.linear(x, lp)                                                  # (T, r)
        dt = torch.promote_types(h.dtype, torch.float32)                     # softmax in >= fp32
        p = torch.softmax(F.linear(h.to(dt), router.to(dt)), dim=-1)         # (T, E)
        experts = torch.einsum("tr,eor->teo", h, hp)                         # (T, E, d_out)
        return F.linear(x, w) + (p.to(x.dtype).unsqueeze(-1) * experts).sum(dim=1)

    return fwd, [lp, router, hp]


def lily_peft(setup: Setup, cfg: dict):
    from peft import LilyConfig

    model = _peft_model(setup, LilyConfig(r=cfg["r"], num_B=cfg["E"], scaling=1.0, target_modules=["proj"]))
    layer = model.base_model.model.proj
    params = _randomize([layer.lily_A["default"].weight, layer.lily_B["default"].weight,
                         layer.lily_router["default"].weight], _gen())
    x = setup.x
    return (lambda: model(x)), params


def _lily_configs(sweep: bool) -> list:
    if sweep:  # issue 6: r in {16, 32}, E in {4, 8}, both routing modes
        return [dict(r=r, E=E, routing=m) for m in ("token", "batch") for r in (16, 32) for E in (4, 8)]
    return [dict(r=16, E=4, routing="token"), dict(r=16, E=4, routing="batch")]


# ------------------------------------------------------------------------------------- registry
KERNEL = "peft_kernels"      # the fused path (dispatch's choice, or --impl)
REFERENCE = "pk reference"   # peft_kernels.reference: the package's own plain-torch path
# LoRA's fused path with its base GEMM pinned (issue 3: Triton GEMM + fused epilogue vs cuBLAS +
# in-place LoRA pass), beside the KERNEL row, which runs the op's default (``auto``: both timed
# once per shape, the faster kept; the decisions land in base_decisions.csv)
LORA_TRITON_BASE = "peft_kernels (triton base)"
LORA_CUBLAS_BASE = "peft_kernels (cublas base)"
LORA_TMA_BASE = "peft_kernels (tma base)"
_BASE_PIN_WHY = "pins its base GEMM"
# The sparse ops in Triton beside the KERNEL row, which runs dispatch's choice (the native CUDA ops
# where built, else Triton; between the two, the faster measured: sparse_impl_decisions.csv)
SPARSE_TRITON = "peft_kernels (triton sparse ops)"
_COMPILE_WHY = "compiling every case on the CPU would take longer than the whole CPU default"
# Both libraries' default on a bf16/fp16 model: fp32 adapter weights (on the CPU's fp32 default
# these rows would repeat the two above them); dropout-0 configs only, to keep the GPU bench short
LORA_FP32_ADAPTERS = "peft_kernels (fp32 adapters)"
PEFT_FP32_ADAPTERS = "HF PEFT (fp32 adapters, its default)"
_FP32_WHY = "fp32 adapter weights on half-precision activations (on the CPU's fp32 default: the rows above)"

FAMILY_SPECS = {
    "lora": Family(
        "lora", _lora_configs, lambda c: f"r={c['r']} drop={c['dropout']:g}",
        [Variant(KERNEL, lora_kernel, fused=True),
         Variant(LORA_TRITON_BASE, lora_kernel, fused=True, needs_impl="triton", base="triton", why=_BASE_PIN_WHY),
         Variant(LORA_CUBLAS_BASE, lora_kernel, fused=True, needs_impl="triton", base="cublas", why=_BASE_PIN_WHY),
         Variant(LORA_TMA_BASE, lora_kernel, fused=True, needs_impl="triton", base="tma", why=_BASE_PIN_WHY),
         Variant(REFERENCE, lora_reference), Variant("torch", lora_torch),
         Variant("torch.compile", lora_compiled, gpu_only=True, why=_COMPILE_WHY, deferred=True), Variant("HF PEFT", lora_peft),
         Variant(LORA_FP32_ADAPTERS, lora_kernel_fp32_adapters, fused=True, gpu_only=True, why=_FP32_WHY,
                 applies=lambda c: c["dropout"] == 0.0),
         Variant(PEFT_FP32_ADAPTERS, lora_peft_default, gpu_only=True, why=_FP32_WHY,
                 applies=lambda c: c["dropout"] == 0.0)],
        "peft_kernels.ops.lora"),
    "monarch": Family(
        "monarch", _monarch_configs, lambda c: f"N={c['nblocks']} r={c['blk_r']}",
        [Variant(KERNEL, monarch_kernel, fused=True), Variant(REFERENCE, monarch_reference),
         Variant("torch two-bmm", monarch_torch)],
        "peft_kernels.ops.monarch"),
    "sparse": Family(
        "sparse", _sparse_configs, lambda c: f"density={100 * c['density']:g}%",
        [Variant(KERNEL, sparse_kernel, fused=True, unforced=True),
         Variant(SPARSE_TRITON, sparse_kernel, fused=True, gpu_only=True, pin_impl="triton",
                 why="the Triton ops on a GPU, timed beside the native ones"),
         Variant(REFERENCE, sparse_reference),
         Variant("torch densified", sparse_densified), Variant("torch merged (W0+delta)", sparse_merged),
         Variant("torch.sparse CSR", sparse_torch_csr)],
        "peft_kernels.ops.sparse"),
    "lily": Family(
        "lily", _lily_configs, lambda c: f"{c['routing']} r={c['r']} E={c['E']}",
        [Variant(KERNEL, lily_kernel, fused=True), Variant(REFERENCE, lily_reference),
         Variant("torch per-expert", lily_torch_per_expert, applies=lambda c: c["routing"] == "token"),
         Variant("HF PEFT", lily_peft, applies=lambda c: c["routing"] == "batch")],
        "peft_kernels.ops.lily"),
}

# Layer targets of issues 3-6 (H100, bf16, T=8192, fwd+bwd ratio to the frozen base), keyed by
# family, the config fields that matter and the shape (d_in, d_out).
_SQ, _UP, _DOWN = (4096, 4096), (4096, 11008), (11008, 4096)
TARGETS = {
    ("lora", (("r", 16), ("dropout", 0.0))): {_SQ: 1.10, _UP: 1.06, _DOWN: 1.06},
    ("monarch", (("nblocks", 4), ("blk_r", 4), ("dropout", 0.0))): {_SQ: 1.10, _UP: 1.06, _DOWN: 1.06},
    ("sparse", (("density", 0.01),)): {_SQ: 1.15},
    ("sparse", (("density", 0.05),)): {_SQ: 1.35},
    ("lily", (("r", 16), ("E", 4), ("routing", "token"))): {_SQ: 1.12, _UP: 1.08, _DOWN: 1.08},
    ("lily", (("r", 16), ("E", 4), ("routing", "batch"))): {_SQ: 1.10},
}


def target_for(family: str, cfg: dict, shape: tuple[int, int], tokens: int, dtype: torch.dtype,
               device: torch.device) -> Optional[float]:
    """The issue's fwd+bwd ratio target for this row, when the row is measured as the target says."""
    if device.type != "cuda" or dtype != torch.bfloat16 or tokens != GPU_TOKENS:
        return None
    for (fam, fields), per_shape in TARGETS.items():
        if fam == family and all(cfg.get(k) == v for k, v in fields):
            return per_shape.get(tuple(shape))
    return None
