"""Fused Lily / MoE-LoRA kernels (peft_kernels.ops.lily) against the reference (GUIDE.md section 3).

Every case checks the output and the gradients of x, lp, router, hp (and bias) of the Triton
kernel AND of a same-dtype torch run against an fp64 reference, with the 2x rule.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from helpers import assert_close_to_reference, grads, leaf
from peft_kernels import reference as R
from peft_kernels.ops.lily import lily_linear

D_IN, D_OUT = 53, 41          # primes: partial tiles in every direction
LEAD = (3, 13)                # 3-D input, T = 39 (two 32-row blocks, the second partial)


def _seed(*key) -> int:
    """A per-case seed that is the same in every run (``hash`` of strings is salted per process)."""
    return zlib.crc32(repr(key).encode()) % 1000


def _make(r, E, router_input, bias, lead=LEAD, d_in=D_IN, d_out=D_OUT):
    """fp64 master tensors; hp is random (not the zero init) so every gradient path matters."""
    x = torch.randn(*lead, d_in, dtype=torch.float64)
    weight = torch.randn(d_out, d_in, dtype=torch.float64) / d_in ** 0.5
    lp = torch.randn(r, d_in, dtype=torch.float64) / d_in ** 0.5
    router = torch.randn(E, r if router_input == "h" else d_in, dtype=torch.float64)
    hp = torch.randn(E, d_out, r, dtype=torch.float64) / r ** 0.5
    b = torch.randn(d_out, dtype=torch.float64) if bias else None
    return x, weight, lp, router, hp, b


def _check_against_reference(dtype, r, E, routing, router_input, bias, scaling=1.7, lead=LEAD, d_in=D_IN,
                             d_out=D_OUT, base=None, device="cpu"):
    x, weight, lp, router, hp, b = (None if t is None else t.to(device)
                                    for t in _make(r, E, router_input, bias, lead, d_in, d_out))
    dy = torch.randn(*lead, d_out, dtype=torch.float64, device=device)
    kw = dict(scaling=scaling, routing=routing, router_input=router_input)

    def run(fn, dt, **extra):
        ins = [leaf(x, dt), leaf(lp, dt), leaf(router, dt), leaf(hp, dt), None if b is None else leaf(b, dt)]
        out = fn(ins[0], weight.to(dt), ins[1], ins[2], ins[3], ins[4], **kw, **extra)
        return [out, *grads(out, ins, dy.to(dt))]

    exact = run(R.lily, torch.float64)
    same = run(R.lily, dtype)
    got = run(lily_linear, dtype, impl="triton", base=base)
    names = ["out", "dx", "dlp", "drouter", "dhp", "dbias"]
    for name, g, s, e in zip(names, got, same, exact):
        if e is None:
            assert g is None, f"{name}: gradient for an input without requires_grad"
            continue
        assert g.dtype == dtype, f"{name}: dtype {g.dtype} != {dtype}"
        assert_close_to_reference(name, g, s, e)


# A handful of cases that together cover both routings x both router inputs x 3 dtypes x
# r in {4, 16} x E in {2, 4} x bias on/off (each case costs ~1 s under the interpreter).
CASES = [
    ("token", "h", torch.float32, 4, 2, True),
    ("token", "h", torch.bfloat16, 16, 4, False),
    ("token", "x", torch.float16, 16, 4, True),
    ("token", "x", torch.float32, 4, 2, False),
    ("batch", "h", torch.float16, 4, 4, False),
    ("batch", "h", torch.float32, 16, 2, True),
    ("batch", "x", torch.bfloat16, 4, 2, True),
    ("batch", "x", torch.float32, 16, 4, False),
]


@pytest.mark.parametrize("routing,router_input,dtype,r,E,bias", CASES)
def test_lily_kernel_matches_reference(interpret, routing, router_input, dtype, r, E, bias):
    torch.manual_seed(_seed(routing, router_input, r, E))
    _check_against_reference(dtype, r, E, routing, router_input, bias)


@pytest.mark.parametrize("routing", ["token", "batch"])
def test_lily_extreme_rank_and_experts(interpret, routing):
    """r = 1 (below tl.dot's 16, padded with masks) and E = 33 (padded to 64), 2-D input."""
    _check_against_reference(torch.float32, 1, 33, routing, "h", True, lead=(19,), d_in=37, d_out=23)


@pytest.mark.parametrize("routing,dtype", [("token", torch.bfloat16), ("batch", torch.float16)])
def test_lily_router_term_outside_the_route_kernel(interpret, monkeypatch, routing, dtype):
    """Router on h with wide pads: the ``dlogits @ router`` term of dh runs as one fp32 GEMM after
    ``_lily_route_bwd_kernel`` (forced here for small pads) with the same result."""
    import peft_kernels.ops.lily as lily_ops

    monkeypatch.setattr(lily_ops, "ROUTE_BWD_MAX_RE", 0)
    torch.manual_seed(_seed("outside", routing))
    _check_against_reference(dtype, 16, 4, routing, "h", True)


def _record_bases(monkeypatch):
    """Which base (triton / cublas) each of the LoRA fused-GEMM calls resolved to."""
    import peft_kernels.ops.lora as lora_ops
    seen = []
    real = lora_ops._gemm_with_base

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(lora_ops, "_gemm_with_base", spy)
    return seen


# (path, base, routing, router_input, dtype, bias, r, E): both paths x both bases x both routings x
# both router inputs x 3 dtypes x bias on/off, 3-D input. "wide" forces the Lily-kernel path on these
# small shapes; "wide*" reaches it for real (E*r = 272 > 256, token routing).
PATH_CASES = [
    ("fused", "cublas", "token", "h", torch.bfloat16, True, 4, 3),
    ("fused", "cublas", "batch", "x", torch.float16, False, 16, 2),
    ("fused", "cublas", "token", "x", torch.float32, True, 4, 2),
    ("wide", "triton", "token", "h", torch.float16, True, 4, 3),
    ("wide", "triton", "token", "x", torch.bfloat16, False, 16, 2),
    ("wide", "cublas", "batch", "h", torch.float32, True, 4, 3),
    ("wide", "triton", "batch", "x", torch.bfloat16, True, 5, 2),
    ("wide*", "cublas", "token", "h", torch.float32, False, 17, 16),
]


@pytest.mark.parametrize("path,base,routing,router_input,dtype,bias,r,E", PATH_CASES)
def test_lily_paths_and_bases_match_reference(interpret, monkeypatch, path, base, routing, router_input, dtype, bias,
                                              r, E):
    """Output and every gradient on each path (fused LoRA primitives / wide Lily kernels) and each
    base, checked against fp64 with the 2x rule; the spies confirm the path and base really taken."""
    from launch_spy import spy_launches
    import peft_kernels.ops.lily as lily_ops
    import peft_kernels.ops.lora as lora_ops

    torch.manual_seed(_seed(path, base, routing, router_input, r, E))
    if path == "wide":
        _force_wide(monkeypatch)
    bases = _record_bases(monkeypatch)
    log = spy_launches(monkeypatch, lily_ops, "_device_guard")
    log_lora = spy_launches(monkeypatch, lora_ops, "_DeviceGuard")
    if path == "wide*":  # the real threshold, not a forced one
        assert E * r > lily_ops.FUSED_MAX_K
    d = dict(lead=(2, 11), d_in=29, d_out=23) if path == "wide*" else {}
    _check_against_reference(dtype, r, E, routing, router_input, bias, base=base, **d)
    want_lily, want_lora = EXPECTED_KERNELS["fused" if path == "fused" else "wide", routing]
    assert {name for name, *_ in log.launches} == want_lily
    assert {name for name, *_ in log_lora.launches} == want_lora
    assert bases and set(bases) == {base}


def test_lily_base_option_resolution(interpret, monkeypatch):
    """base=None follows PEFT_KERNELS_BASE, then "auto" (Triton when nothing can be timed: CPU)."""
    x, weight, lp, router, hp, b = (t.float() for t in _make(4, 3, "h", True, lead=(5,), d_in=17, d_out=11))
    bases = _record_bases(monkeypatch)
    for env, base, want in ((None, None, "triton"), ("cublas", None, "cublas"), ("cublas", "triton", "triton"),
                            (None, "auto", "triton")):
        if env is None:
            monkeypatch.delenv("PEFT_KERNELS_BASE", raising=False)
        else:
            monkeypatch.setenv("PEFT_KERNELS_BASE", env)
        bases.clear()
        ins = [leaf(x), leaf(lp)]
        y = lily_linear(ins[0], weight, ins[1], router, hp, b, routing="batch", impl="triton", base=base)
        grads(y, ins, torch.randn_like(y))
        assert bases == [want, want], (env, base, bases)  # forward GEMM and dX GEMM


@pytest.mark.parametrize("path,dtype", [("fused", torch.float32), ("fused", torch.bfloat16),
                                        ("wide", torch.float16)])
def test_lily_shared_hp_gradient_accumulates_over_layers(interpret, monkeypatch, path, dtype):
    """Three layers (token/h, batch/x, token/x) share one HP leaf; its .grad after backward() is the
    sum of the three layers' contributions, as the fp64 reference computes it, within the 2x rule."""
    if path == "wide":
        _force_wide(monkeypatch)
    torch.manual_seed(11)
    d, r, E, lead = 31, 4, 3, (2, 9)
    x = torch.randn(*lead, d, dtype=torch.float64)
    hp = torch.randn(E, d, r, dtype=torch.float64) / r ** 0.5
    modes = [("token", "h"), ("batch", "x"), ("token", "x")]
    layers = []
    for _, ri in modes:
        layers.append((torch.randn(d, d, dtype=torch.float64) / d ** 0.5, torch.randn(d, dtype=torch.float64),
                       torch.randn(r, d, dtype=torch.float64) / d ** 0.5,
                       torch.randn(E, r if ri == "h" else d, dtype=torch.float64)))
    dy = torch.randn(*lead, d, dtype=torch.float64)

    def run(fn, dt, **extra):
        hp_leaf = leaf(hp, dt)
        lps = [leaf(lay[2], dt) for lay in layers]
        hcur = x.to(dt)
        for (routing, ri), (w, b, _, router), lp in zip(modes, layers, lps):
            hcur = torch.tanh(fn(hcur, w.to(dt), lp, router.to(dt), hp_leaf, b.to(dt), scaling=1.3, routing=routing,
                                 router_input=ri, **extra))
        (hcur * dy.to(dt)).sum().backward()
        return [hp_leaf.grad, *(lp.grad for lp in lps)]

    exact = run(R.lily, torch.float64)
    same = run(R.lily, dtype)
    got = run(lily_linear, dtype, impl="triton", base="triton")
    for name, g, s_, e in zip(["dhp", "dlp0", "dlp1", "dlp2"], got, same, exact):
        assert_close_to_reference(name, g, s_, e)


@pytest.mark.parametrize("path", ["fused", "wide"])
def test_lily_empty_input(interpret, monkeypatch, path):
    """T = 0 tokens: an empty output and zero parameter gradients on both paths and routings."""
    if path == "wide":
        _force_wide(monkeypatch)
    x, weight, lp, router, hp, b = (t.float() for t in _make(3, 2, "x", True, lead=(0, 4), d_in=7, d_out=5))
    for routing in ("token", "batch"):
        ins = [leaf(t) for t in (x, lp, router, hp, b)]
        y = lily_linear(ins[0], weight, *ins[1:], routing=routing, router_input="x", impl="triton", base="triton")
        assert y.shape == (0, 4, 5)
        gs = grads(y, ins, torch.randn_like(y))
        assert gs[0].shape == x.shape
        for g, t in zip(gs[1:], ins[1:]):
            assert g.shape == t.shape and not g.any()


def test_lily_input_without_grad_and_dispatch(interpret):
    """Only parameter gradients requested (x is data); the default dispatch on CPU runs the reference."""
    x, weight, lp, router, hp, _ = _make(4, 3, "h", False)
    x = x.float()
    ps = [leaf(lp, torch.float32), leaf(router, torch.float32), leaf(hp, torch.float32)]
    out = lily_linear(x, weight.float(), *ps, routing="token", impl="triton")
    gs = torch.autograd.grad(out.square().sum(), ps)
    ps_ref = [leaf(p) for p in ps]
    ref = lily_linear(x, weight.float(), *ps_ref, routing="token")  # default on CPU: the torch reference
    gs_ref = torch.autograd.grad(ref.square().sum(), ps_ref)
    torch.testing.assert_close(out, ref)
    for g, gr in zip(gs, gs_ref):
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)


def test_lily_custom_ops_opcheck(interpret):
    """The torch.library ops have consistent fake (meta) implementations for torch.compile."""
    x, weight, lp, router, hp, b = (t.float() for t in _make(4, 2, "h", True, lead=(9,), d_in=17, d_out=11))
    args = (x, weight, b, lp, router, hp, 1.5, True, True, "triton")
    torch.library.opcheck(torch.ops.peft_kernels.lily_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    y, h, p, w = torch.ops.peft_kernels.lily_fwd(*args)
    bargs = (torch.randn_like(y), x, weight, lp, router, hp, h, p, w, 1.5, True, True, True, "triton")
    torch.library.opcheck(torch.ops.peft_kernels.lily_bwd.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


def _bad(**over):
    x, weight, lp, router, hp, b = (t.float() for t in _make(4, 3, "h", True))
    kw = dict(x=x, weight=weight, lp=lp, router=router, hp=hp, bias=b, routing="token", router_input="h")
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,exc,match", [
    (dict(lp=torch.randn(4, 52)), ValueError, "lp"),
    (dict(lp=torch.randn(0, 53)), ValueError, "lp"),
    (dict(hp=torch.randn(3, 41, 5)), ValueError, "hp"),
    (dict(hp=torch.randn(3, 40, 4)), ValueError, "hp"),
    (dict(router=torch.randn(3, 53)), ValueError, "router"),         # (E, d_in) given for router_input="h"
    (dict(router_input="x"), ValueError, "router"),                    # (E, r) given for router_input="x"
    (dict(router=torch.randn(2, 4)), ValueError, "router"),
    (dict(bias=torch.randn(40)), ValueError, "bias"),
    (dict(x=torch.randn(5, 52)), ValueError, "x"),
    (dict(x=torch.randint(0, 3, (5, 53))), TypeError, "x"),
    (dict(routing="tokens"), ValueError, "routing"),
    (dict(router_input="z"), ValueError, "router_input"),
    (dict(hp=torch.randn(3, 41, 4, dtype=torch.float64)), TypeError, "hp"),  # forced triton: no fp64 params
    (dict(scaling="2"), TypeError, "scaling"),
    (dict(base="cuda"), ValueError, "base"),
])
def test_lily_bad_input_raises_before_launch(interpret, monkeypatch, over, exc, match):
    import peft_kernels.ops.lily as ops

    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched before validation")

    monkeypatch.setattr(ops, "_launch_proj", no_launch)
    with pytest.raises(exc, match=match):
        lily_linear(**_bad(**over), impl="triton")



def test_lily_weight_grad_when_base_trains(interpret):
    """A trainable base weight (not the usual frozen one) also gets its gradient."""
    x, weight, lp, router, hp, b = _make(4, 3, "x", True, lead=(2, 7))
    dy = torch.randn(2, 7, D_OUT, dtype=torch.float64)

    def run(fn, dt, **extra):
        ins = [leaf(t, dt) for t in (x, weight, lp, router, hp, b)]
        out = fn(ins[0], ins[1], ins[2], ins[3], ins[4], ins[5], routing="batch", router_input="x", **extra)
        return grads(out, ins, dy.to(dt))

    for name, g, s, e in zip(["dx", "dweight", "dlp", "drouter", "dhp", "dbias"], run(lily_linear, torch.float32,
                             impl="triton"), run(R.lily, torch.float32), run(R.lily, torch.float64)):
        assert_close_to_reference(name, g, s, e)


def test_lily_compiles_without_graph_breaks(interpret):
    """fullgraph=True: the custom ops keep Dynamo from graph-breaking on the Triton launches."""
    x, weight, lp, router, hp, _ = _make(4, 3, "h", False, lead=(2, 9), d_in=17, d_out=11)
    x, weight, lp, router, hp = (leaf(t, torch.float32) for t in (x, weight, lp, router, hp))
    ins = [x, lp, router, hp]

    def f(x, lp, router, hp):
        return lily_linear(x, weight.detach(), lp, router, hp, scaling=1.5, routing="token", impl="triton")

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(*ins)
    g = torch.autograd.grad(y.square().sum(), ins)
    y_eager = f(*ins)
    g_eager = torch.autograd.grad(y_eager.square().sum(), ins)
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


# Which kernels each path launches (forward + backward with every gradient): the fused path runs the
# GEMM-sized work on the LoRA primitives, the wide path on the Lily kernels that build Z in registers.
_LILY_SHARED = {"_lily_proj_kernel", "_lily_route_bwd_kernel", "_lily_gradw_kernel"}
EXPECTED_KERNELS = {
    ("fused", "token"): (_LILY_SHARED, {"_lora_gemm_kernel", "_lora_rows_kernel"}),
    ("fused", "batch"): (_LILY_SHARED, {"_lora_gemm_kernel", "_lora_rows_kernel"}),
    ("wide", "token"): (_LILY_SHARED | {"_lily_mix_kernel", "_lily_dz_kernel", "_lily_dhp_kernel"},
                        {"_lora_gemm_kernel"}),  # dX only
    ("wide", "batch"): (_LILY_SHARED | {"_lily_dz_kernel", "_lily_dhp_kernel"}, {"_lora_gemm_kernel"}),
}


def _force_wide(monkeypatch):
    """Every shape takes the wide path (as E*r > 256 does), so it is tested on small shapes too."""
    import peft_kernels.ops.lily as lily_ops
    monkeypatch.setattr(lily_ops, "FUSED_MAX_K", 0)


@pytest.mark.parametrize("path", ["fused", "wide"])
@pytest.mark.parametrize("routing,router_input", [("token", "h"), ("batch", "x")])
def test_lily_launches_guarded_and_grid_within_cuda_limits(interpret, monkeypatch, path, routing, router_input):
    """Each path launches exactly its kernels; every launch (Lily's and the LoRA primitives') runs
    under ``torch.cuda.device(x.device)`` (Triton launches on the current device), and no grid axis
    but 0 grows with T (CUDA caps axes 1/2 at 65535; the interpreter does not). The huge-T launches
    are only recorded, never run."""
    from launch_spy import spy_launches
    import peft_kernels.ops.lily as lily_ops
    import peft_kernels.ops.lora as lora_ops

    if path == "wide":
        _force_wide(monkeypatch)
    want_lily, want_lora = EXPECTED_KERNELS[path, routing]
    x, weight, lp, router, hp, b = (t.float().to(interpret) for t in _make(4, 3, router_input, True))
    log = spy_launches(monkeypatch, lily_ops, "_device_guard")
    log_lora = spy_launches(monkeypatch, lora_ops, "_DeviceGuard")
    xs = [leaf(x), leaf(weight, requires_grad=False), leaf(lp), leaf(router), leaf(hp), leaf(b)]
    y = lily_linear(*xs, scaling=0.7, routing=routing, router_input=router_input, impl="triton", base="triton")
    grads(y, [xs[0], xs[2], xs[3], xs[4], xs[5]], torch.randn_like(y))
    assert {name for name, *_ in log.launches} == want_lily
    assert {name for name, *_ in log_lora.launches} == want_lora
    for lg in (log, log_lora):
        lg.assert_guarded(x.device)
        lg.assert_grid_within_cuda_limits()

    big = spy_launches(monkeypatch, lily_ops, "_device_guard", run=False)
    big_lora = spy_launches(monkeypatch, lora_ops, "_DeviceGuard", run=False)
    T = 65536 * 128 + 1  # more token blocks than CUDA's axis-1/2 limit at any block size <= 128
    xb = torch.zeros(T, 1, device=interpret)
    wb, lpb = torch.zeros(1, 1, device=interpret), torch.zeros(1, 1, device=interpret)
    rb = torch.zeros(2, 1, device=interpret)
    hpb = torch.zeros(2, 1, 1, device=interpret)
    token, router_h = routing == "token", router_input == "h"
    _, h, p, w = torch.ops.peft_kernels.lily_fwd(xb, wb, None, lpb, rb, hpb, 1.0, token, router_h, "triton")
    torch.ops.peft_kernels.lily_bwd(xb, xb, wb, lpb, rb, hpb, h, p, w, 1.0, token, router_h, True, "triton")
    assert {name for name, *_ in big.launches} == want_lily
    assert {name for name, *_ in big_lora.launches} == want_lora
    big.assert_grid_within_cuda_limits()
    big_lora.assert_grid_within_cuda_limits()


@pytest.mark.parametrize("path", ["fused", "wide"])
def test_lily_ops_accept_strided_inputs(interpret, monkeypatch, path):
    """The Lily kernels index x, lp, router, hp, h, p as dense arrays; the custom ops must make them
    so (a compiled graph may pass strided views). Strided and contiguous calls agree exactly."""
    def strided(t):
        return t.t().contiguous().t() if t.dim() == 2 else t.transpose(0, 2).contiguous().transpose(0, 2)

    if path == "wide":
        _force_wide(monkeypatch)
    x, weight, lp, router, hp, b = (t.float().to(interpret) for t in _make(4, 3, "x", True))
    x2 = x.reshape(-1, x.shape[-1])
    args = (weight, b)
    for token in (True, False):
        ref = torch.ops.peft_kernels.lily_fwd(x2, *args, lp, router, hp, 0.7, token, False, "triton")
        got = torch.ops.peft_kernels.lily_fwd(strided(x2), *args, strided(lp), strided(router), strided(hp),
                                              0.7, token, False, "triton")
        for a, c in zip(ref, got):
            torch.testing.assert_close(c, a, rtol=0, atol=0)
        _, h, p, w = ref
        dy = torch.randn(x2.shape[0], weight.shape[0], device=interpret)
        bref = torch.ops.peft_kernels.lily_bwd(dy, x2, weight, lp, router, hp, h, p, w, 0.7, token, False, True,
                                               "triton")
        bgot = torch.ops.peft_kernels.lily_bwd(strided(dy), strided(x2), weight, strided(lp), strided(router),
                                               strided(hp), strided(h), strided(p), w, 0.7, token, False, True,
                                               "triton")
        for a, c in zip(bref, bgot):
            torch.testing.assert_close(c, a, rtol=0, atol=0)


# Seeds at which batch routing / router on x / bf16 failed the 2x rule on drouter (48, 180) or came close
# (30, 102) while Triton's interpreter truncated fp32 -> bf16 casts (a GPU rounds to nearest even): the
# truncation bias of h summed over T in dY^T h, and so in dw and drouter. With the operands rounded to
# nearest (ops/lily.py: _cast, _rounded_operand) the kernel's drouter error equals that of an fp64
# computation on the same bf16 operands at all of 200 seeds checked; at these seeds the same-dtype torch
# run is the lucky one (0.24-0.5x that error), so they also keep the 2x rule's atol honest.
@pytest.mark.parametrize("seed", [30, 48, 102, 180])
def test_lily_batch_router_x_bf16_previously_failing_seeds(interpret, seed):
    torch.manual_seed(seed)
    _check_against_reference(torch.bfloat16, 4, 2, "batch", "x", True)


@pytest.mark.parametrize("path", ["fused", "wide"])
@pytest.mark.parametrize("routing", ["token", "batch"])
def test_lily_bf16_operands_round_to_nearest(interpret, monkeypatch, path, routing):
    """dHP = s * dY^T Z (Z = h for batch routing, times w_e) from bf16 operands must equal torch's fp32
    product of the same operands, Z rounded to bf16 by torch (round to nearest even, as a GPU kernel
    does): fp32 accumulation-order differences only. A truncating cast (Triton's interpreter, left as it
    is) is ~2^-9 off per operand, with a bias that adds up over T, and fails this by orders of magnitude."""
    if path == "wide":
        _force_wide(monkeypatch)
    torch.manual_seed(_seed("round", path, routing))
    bf = torch.bfloat16
    x, weight, lp, router, hp, b = (t.to(device=interpret, dtype=bf) for t in _make(4, 3, "x", True))
    x2 = x.reshape(-1, x.shape[-1])
    s, token = 1.7, routing == "token"
    _, h, p, w = torch.ops.peft_kernels.lily_fwd(x2, weight, b, lp, router, hp, s, token, False, "triton")
    dy = torch.randn(x2.shape[0], D_OUT, device=interpret).to(bf)
    dhp = torch.ops.peft_kernels.lily_bwd(dy, x2, weight, lp, router, hp, h, p, w, s, token, False, False,
                                          "triton")[3]
    dy32 = dy.float()
    if token:
        z = (p[:, :, None] * h[:, None, :]).to(bf).float()                  # (T, E, r)
        want = s * torch.einsum("to,ter->eor", dy32, z)
    else:
        want = w[:, None, None] * (s * (dy32.t() @ h.to(bf).float()))
    torch.testing.assert_close(dhp, want)


def test_lily_under_autocast():
    """fp32 inputs and parameters under bf16 autocast: the kernels run in bf16 (as F.linear would),
    not in fp32: x and W0 reach the Function in bf16, the adapter parameters as they are (it reads
    bf16 copies and returns fp32 gradients itself); the result is the bf16 computation's (2x rule
    against the fp64 reference)."""
    r, E = 8, 4
    x, weight, lp, router, hp, b = _make(r, E, "h", True)
    dy = torch.randn(*LEAD, D_OUT, dtype=torch.float64)
    kw = dict(scaling=1.7, routing="token", router_input="h")
    seen = []
    import peft_kernels.ops.lily as lily_ops

    orig = lily_ops.LilyFunction.apply

    def spy(*a):
        seen.append(({t.dtype for t in a[:2]}, {t.dtype for t in a[2:5]}))
        return orig(*a)

    ins = [leaf(x, torch.float32), leaf(lp, torch.float32), leaf(router, torch.float32), leaf(hp, torch.float32),
           leaf(b, torch.float32)]
    lily_ops.LilyFunction.apply = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lily_linear(ins[0], weight.float(), *ins[1:4], ins[4], **kw, impl="triton")
    finally:
        lily_ops.LilyFunction.apply = orig
    assert seen == [({torch.bfloat16}, {torch.float32})], seen
    assert y.dtype == torch.bfloat16
    got = [y, *grads(y, ins, dy.to(torch.bfloat16))]
    assert all(g.dtype == torch.float32 for g in got[1:])

    def run(dt):
        t = [leaf(x, dt), leaf(lp, dt), leaf(router, dt), leaf(hp, dt), leaf(b, dt)]
        out = R.lily(t[0], weight.to(dt), *t[1:4], t[4], **kw)
        return [out, *grads(out, t, dy.to(dt))]

    same, exact = run(torch.bfloat16), run(torch.float64)
    for name, g, sm, e in zip(["out", "dx", "dlp", "drouter", "dhp", "dbias"], got, same, exact):
        assert_close_to_reference(name, g.to(sm.dtype), sm, e)


def test_lily_rank_cap():
    """r above the kernels' limit: the default dispatch falls back to the reference (same result),
    a forced Triton run is refused with an error naming lp, before any launch."""
    import peft_kernels.ops.lily as lily_ops

    r = lily_ops.MAX_R + 1
    x, weight, lp, router, hp, b = (t.float() if t is not None else None for t in _make(r, 2, "h", False, lead=(3,)))
    with pytest.raises(ValueError, match="lp has rank"):
        lily_linear(x, weight, lp, router, hp, b, impl="triton")
    import peft_kernels.dispatch as D

    if D.choose("lily", x.device, x.dtype, None) == "triton":
        torch.testing.assert_close(lily_linear(x, weight, lp, router, hp, b), R.lily(x, weight, lp, router, hp, b))


# Realistic sizes on a GPU (the CPU cases above are tiny): autotuned tiles, both paths (fused:
# K = E*r <= 256; wide: K = 512), both routings and router inputs, every base, deterministic mode.
GPU_CASES = [
    (16, 4, "token", "h", "auto"), (16, 4, "token", "x", "triton"), (16, 4, "batch", "h", "cublas"),
    (16, 8, "batch", "x", "auto"), (32, 8, "token", "h", "tma"), (64, 8, "token", "h", "auto"),
    (64, 8, "batch", "x", "auto"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("r,E,routing,router_input,base", GPU_CASES)
def test_lily_large_gpu(r, E, routing, router_input, base):
    _check_against_reference(torch.bfloat16, r, E, routing, router_input, True, lead=(1000,), d_in=1031,
                             d_out=2051, base=base, device="cuda")


@pytest.mark.gpu
def test_lily_deterministic_gpu():
    """Deterministic mode on the GPU: fixed-order sums, bit-identical runs, still within tolerance."""
    torch.use_deterministic_algorithms(True)
    try:
        _check_against_reference(torch.bfloat16, 16, 4, "token", "h", True, lead=(1000,), d_in=1031, d_out=2051,
                                 device="cuda")
    finally:
        torch.use_deterministic_algorithms(False)
