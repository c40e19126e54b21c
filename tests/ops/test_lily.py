"""Fused Lily / MoE-LoRA kernels (peft_kernels.ops.lily) against the reference (GUIDE.md section 3).

Every case checks the output and the gradients of x, lp, router, hp (and bias) of the Triton
kernel AND of a same-dtype torch run against an fp64 reference, with the 2x rule.
"""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close_to_reference, grads, leaf
from peft_kernels import reference as R
from peft_kernels.ops.lily import lily_linear

D_IN, D_OUT = 53, 41          # primes: partial tiles in every direction
LEAD = (3, 13)                # 3-D input, T = 39 (two 32-row blocks, the second partial)


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
                             d_out=D_OUT):
    x, weight, lp, router, hp, b = _make(r, E, router_input, bias, lead, d_in, d_out)
    dy = torch.randn(*lead, d_out, dtype=torch.float64)
    kw = dict(scaling=scaling, routing=routing, router_input=router_input)

    def run(fn, dt, **extra):
        ins = [leaf(x, dt), leaf(lp, dt), leaf(router, dt), leaf(hp, dt), None if b is None else leaf(b, dt)]
        out = fn(ins[0], weight.to(dt), ins[1], ins[2], ins[3], ins[4], **kw, **extra)
        return [out, *grads(out, ins, dy.to(dt))]

    exact = run(R.lily, torch.float64)
    same = run(R.lily, dtype)
    got = run(lily_linear, dtype, impl="triton")
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
    torch.manual_seed(hash((routing, router_input, r, E)) % 1000)
    _check_against_reference(dtype, r, E, routing, router_input, bias)


@pytest.mark.parametrize("routing", ["token", "batch"])
def test_lily_extreme_rank_and_experts(interpret, routing):
    """r = 1 (below tl.dot's 16, padded with masks) and E = 33 (padded to 64), 2-D input."""
    _check_against_reference(torch.float32, 1, 33, routing, "h", True, lead=(19,), d_in=37, d_out=23)


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
    args = (x, weight, b, lp, router, hp, 1.5, True, True)
    torch.library.opcheck(torch.ops.peft_kernels.lily_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    y, h, p, w = torch.ops.peft_kernels.lily_fwd(*args)
    bargs = (torch.randn_like(y), x, weight, lp, router, hp, h, p, w, 1.5, True, True, True)
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


@pytest.mark.parametrize("routing,router_input", [("token", "h"), ("batch", "x")])
def test_lily_launches_guarded_and_grid_within_cuda_limits(interpret, monkeypatch, routing, router_input):
    """Every launch runs under ``torch.cuda.device(x.device)`` (Triton launches on the current
    device), and no grid axis but 0 grows with T (CUDA caps axes 1/2 at 65535; the interpreter
    does not). The huge-T launches are only recorded, never run."""
    from launch_spy import spy_launches
    import peft_kernels.ops.lily as lily_ops

    x, weight, lp, router, hp, b = (t.float().to(interpret) for t in _make(4, 3, router_input, True))
    log = spy_launches(monkeypatch, lily_ops, "_device_guard")
    xs = [leaf(x), leaf(weight, requires_grad=False), leaf(lp), leaf(router), leaf(hp), leaf(b)]
    y = lily_linear(*xs, scaling=0.7, routing=routing, router_input=router_input, impl="triton")
    grads(y, [xs[0], xs[2], xs[3], xs[4], xs[5]], torch.randn_like(y))
    assert len({name for name, *_ in log.launches}) == 6
    log.assert_guarded(x.device)
    log.assert_grid_within_cuda_limits()

    big = spy_launches(monkeypatch, lily_ops, "_device_guard", run=False)
    T = 65536 * 128 + 1  # more token blocks than CUDA's axis-1/2 limit at any block size <= 128
    xb = torch.zeros(T, 1, device=interpret)
    wb, lpb = torch.zeros(1, 1, device=interpret), torch.zeros(1, 1, device=interpret)
    rb = torch.zeros(2, 1, device=interpret)
    hpb = torch.zeros(2, 1, 1, device=interpret)
    token, router_h = routing == "token", router_input == "h"
    _, h, p, w = torch.ops.peft_kernels.lily_fwd(xb, wb, None, lpb, rb, hpb, 1.0, token, router_h)
    torch.ops.peft_kernels.lily_bwd(xb, xb, wb, lpb, rb, hpb, h, p, w, 1.0, token, router_h, False)
    assert len(big.launches) == 6
    big.assert_grid_within_cuda_limits()


def test_lily_ops_accept_strided_inputs(interpret):
    """The kernels index x, lp, router, hp, h, p as dense arrays; the custom ops must make them so
    (a compiled graph may pass strided views). Strided and contiguous calls agree exactly."""
    def strided(t):
        return t.t().contiguous().t() if t.dim() == 2 else t.transpose(0, 2).contiguous().transpose(0, 2)

    x, weight, lp, router, hp, b = (t.float().to(interpret) for t in _make(4, 3, "x", True))
    x2 = x.reshape(-1, x.shape[-1])
    args = (weight, b)
    for token in (True, False):
        ref = torch.ops.peft_kernels.lily_fwd(x2, *args, lp, router, hp, 0.7, token, False)
        got = torch.ops.peft_kernels.lily_fwd(strided(x2), *args, strided(lp), strided(router), strided(hp),
                                              0.7, token, False)
        for a, c in zip(ref, got):
            torch.testing.assert_close(c, a, rtol=0, atol=0)
        _, h, p, w = ref
        dy = torch.randn(x2.shape[0], weight.shape[0], device=interpret)
        bref = torch.ops.peft_kernels.lily_bwd(dy, x2, weight, lp, router, hp, h, p, w, 0.7, token, False, True)
        bgot = torch.ops.peft_kernels.lily_bwd(strided(dy), strided(x2), weight, strided(lp), strided(router),
                                               strided(hp), strided(h), strided(p), w, 0.7, token, False, True)
        for a, c in zip(bref, bgot):
            torch.testing.assert_close(c, a, rtol=0, atol=0)
