"""Fused LoRA kernels (Triton, run under the interpreter on CPU) against the reference.

GUIDE.md section 3: the kernel and a same-dtype torch run are both compared with an fp64
reference, for the output and every gradient; awkward shapes, 3-D input, each dtype, bias
on/off, dropout on/off (the mask regenerated from the seed), r below the 16-wide tl.dot minimum.
"""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close_to_reference, grads, leaf
from peft_kernels import reference as R
from peft_kernels.ops import lora as L

D_IN, D_OUT = 123, 77

# (dtype, leading dims, r, bias, dropout, rslora, base): spread over the axes instead of a full
# product, so every axis value is covered by some case and the interpreter run stays short.
CASES = [
    (torch.float32, (37,), 1, True, 0.0, False, "triton"),
    (torch.float16, (3, 13), 4, False, 0.3, False, "triton"),
    (torch.bfloat16, (37,), 16, True, 0.3, True, "cublas"),
    (torch.float32, (2, 19), 33, False, 0.3, False, "triton"),
    (torch.bfloat16, (3, 13), 4, True, 0.0, False, "triton"),
    (torch.float16, (37,), 33, True, 0.0, True, "cublas"),
    (torch.float32, (37,), 16, True, 0.3, False, "cublas"),
    (torch.bfloat16, (2, 19), 8, True, 0.3, False, "auto"),
]


def _inputs(lead, r, bias, dtype=torch.float64, d_in=D_IN, d_out=D_OUT):
    x = torch.randn(*lead, d_in, dtype=dtype)
    W = torch.randn(d_out, d_in, dtype=dtype) / d_in**0.5
    A = torch.randn(r, d_in, dtype=dtype) / d_in**0.5
    B = torch.randn(d_out, r, dtype=dtype) / r**0.5  # nonzero: PEFT's zero init would hide B's path
    b = torch.randn(d_out, dtype=dtype) if bias else None
    return x, W, A, B, b


def _run(fn, x, W, A, B, b, dtype, go, **kw):
    """Output and grads (x, A, B, bias) of ``fn`` on fresh leaves cast to ``dtype``."""
    xs = [leaf(x, dtype), leaf(W, dtype, requires_grad=False), leaf(A, dtype), leaf(B, dtype),
          None if b is None else leaf(b, dtype)]
    y = fn(*xs, **kw)
    g = grads(y, [xs[0], xs[2], xs[3], xs[4]], go.to(dtype))
    return y, g


def _check_against_reference(fn, x, W, A, B, b, dtype, go, **kw):
    """``fn`` against the reference run in fp64 and in ``dtype`` (GUIDE section 3), output and
    every gradient, all on the inputs' device."""
    y_exact, g_exact = _run(R.lora, x, W, A, B, b, torch.float64, go, **kw)
    y_same, g_same = _run(R.lora, x, W, A, B, b, dtype, go, **kw)
    y_got, g_got = _run(fn, x, W, A, B, b, dtype, go, **kw)
    assert y_got.dtype == dtype and y_got.shape == y_exact.shape
    assert_close_to_reference("y", y_got, y_same, y_exact)
    for name, got, same, exact in zip(["dx", "dA", "dB", "dbias"], g_got, g_same, g_exact):
        if exact is None:
            assert got is None, name
            continue
        assert got.dtype == dtype, name
        assert_close_to_reference(name, got, same, exact)


@pytest.mark.parametrize("dtype,lead,r,bias,p,rslora,base", CASES)
def test_lora_matches_reference(interpret, dtype, lead, r, bias, p, rslora, base):
    x, W, A, B, b = _inputs(lead, r, bias)
    s = R.lora_scaling(r, 8.0, rslora)
    seed = 1234
    go = torch.randn(*lead, D_OUT, dtype=torch.float64)
    kw = dict(scaling=s, dropout_p=p, seed=seed)
    to = lambda t: None if t is None else t.to(interpret)
    _check_against_reference(lambda *t, **k: L.lora_linear(*t, **k, impl="triton", base=base),
                             to(x), to(W), to(A), to(B), to(b), dtype, go.to(interpret), **kw)


def test_dropout_mask_seeded_and_regenerated_in_backward(interpret):
    """Same seed -> identical output; other seed -> different; and the dX LoRA term is zero exactly
    where the reference's mask drops (W0 = 0 isolates it), i.e. backward regenerates forward's mask."""
    T, r, p = 37, 4, 0.3
    x, _, A, B, _ = _inputs((T,), r, False, torch.float32)
    W = torch.zeros(D_OUT, D_IN)
    dev = interpret
    run = lambda seed, xx: L.lora_linear(xx, W.to(dev), A.to(dev), B.to(dev), None, 2.0, p, seed, impl="triton")
    y1, y1b, y2 = run(7, x.to(dev)), run(7, x.to(dev)), run(8, x.to(dev))
    assert torch.equal(y1, y1b)
    assert not torch.allclose(y1, y2)
    assert torch.equal(run(torch.tensor([7]), x.to(dev)), y1)  # a tensor seed (the modules') = the int

    xl = x.to(dev).requires_grad_()
    (dx,) = torch.autograd.grad(run(7, xl), [xl], torch.randn(T, D_OUT, device=dev))
    keep = R.keep_mask(7, p, T, D_IN).to(dev)
    assert (dx[~keep] == 0).all()
    assert (dx[keep] != 0).all()
    assert 0.6 < keep.float().mean().item() < 0.8  # ~ 1 - p kept


def test_weight_grad_and_noncontiguous_inputs(interpret):
    """W0 is frozen in normal use; when it does require grad it still gets the right gradient.
    Transposed (non-contiguous) x / A / B views give the same result as contiguous ones."""
    r = 5
    x, W, A, B, b = _inputs((37,), r, True, torch.float64)
    go = torch.randn(37, D_OUT, dtype=torch.float64)
    exact_leaves = [leaf(t) for t in (x, W, A, B, b)]
    y_exact = R.lora(*exact_leaves, scaling=1.5, dropout_p=0.2, seed=3)
    g_exact = grads(y_exact, exact_leaves, go)
    f32 = [leaf(t, torch.float32) for t in (x, W, A, B, b)]
    y_same = R.lora(*f32, scaling=1.5, dropout_p=0.2, seed=3)
    g_same = grads(y_same, f32, go.float())

    dev = interpret
    xt = leaf(x.t().contiguous().to(dev), torch.float32)  # stored (d_in, T); used transposed
    At = leaf(A.t().contiguous().to(dev), torch.float32)
    Bt = leaf(B.t().contiguous().to(dev), torch.float32)
    Wl = leaf(W.to(dev), torch.float32)
    bl = leaf(b.to(dev), torch.float32)
    y = L.lora_linear(xt.t(), Wl, At.t(), Bt.t(), bl, 1.5, 0.2, 3, impl="triton")
    g = grads(y, [xt, Wl, At, Bt, bl], go.float().to(dev))
    assert_close_to_reference("y", y.cpu(), y_same, y_exact)
    for name, got, same, exact in zip(["dx", "dW", "dA", "dB", "dbias"], g, g_same, g_exact):
        if name in ("dx", "dA", "dB"):
            got = got.t()  # gradient of the stored transposed leaf
        assert_close_to_reference(name, got.cpu(), same, exact)


def test_autocast_and_mixed_dtypes(interpret):
    """Under autocast the kernel runs in the autocast dtype; fp32 adapter weights with a bf16
    base get fp32 gradients through the differentiable casts."""
    r = 8
    x, W, A, B, b = _inputs((37,), r, True, torch.float32)
    dev = interpret
    Al, Bl = leaf(A.to(dev)), leaf(B.to(dev))
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        y = L.lora_linear(x.to(dev), W.to(dev), Al, Bl, b.to(dev), 2.0, impl="triton")
    assert y.dtype == torch.bfloat16
    gA, gB = torch.autograd.grad(y.float().sum(), [Al, Bl])
    assert gA.dtype == torch.float32 and gB.dtype == torch.float32

    exact = [leaf(t.double()) for t in (A, B)]
    y_exact = R.lora(x.double(), W.double(), exact[0], exact[1], b.double(), 2.0)
    same = [leaf(t.bfloat16()) for t in (A, B)]
    y_same = R.lora(x.bfloat16(), W.bfloat16(), same[0], same[1], b.bfloat16(), 2.0)
    ge, gs = torch.autograd.grad(y_exact.sum(), exact), torch.autograd.grad(y_same.float().sum(), same)
    assert_close_to_reference("y", y.cpu(), y_same, y_exact)
    assert_close_to_reference("dA", gA.cpu(), gs[0], ge[0], atol=1e-2)
    assert_close_to_reference("dB", gB.cpu(), gs[1], ge[1], atol=1e-2)


def test_bad_inputs_raise_before_launch(interpret, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a kernel was launched despite bad input")

    monkeypatch.setattr(L.LoRAFunction, "apply", boom)
    x, W, A, B, b = _inputs((37,), 4, True, torch.float32)
    dev = interpret
    x, W, A, B, b = (t.to(dev) for t in (x, W, A, B, b))
    cases = [
        (ValueError, "lora_A", dict(lora_A=A[:, :-1])),
        (ValueError, "lora_B", dict(lora_B=B[:, :-1])),
        (ValueError, "x", dict(x=x[:, :-1])),
        (ValueError, "bias", dict(bias=b[:-1])),
        (TypeError, "x", dict(x=x.to(torch.int32))),
        (TypeError, "lora_A", dict(lora_A=[[1.0]])),
        (ValueError, "dropout_p", dict(dropout_p=1.0)),
        (ValueError, "seed", dict(seed=-1)),
        (TypeError, "seed", dict(seed=torch.tensor([1.0]))),  # a tensor seed: integer dtype
        (ValueError, "seed", dict(seed=torch.tensor([1, 2]))),  # ... and exactly one element
        (ValueError, "device", dict(weight=W.to("meta"))),
        (ValueError, "r <= 256", dict(lora_A=torch.randn(257, D_IN), lora_B=torch.randn(D_OUT, 257))),
    ]
    for exc, word, override in cases:
        args = dict(x=x, weight=W, lora_A=A, lora_B=B, bias=b, dropout_p=0.0, seed=0)
        args.update(override)
        with pytest.raises(exc, match=word):
            L.lora_linear(**args, impl="triton")
    with pytest.raises(ValueError, match="base"):
        L.lora_linear(x, W, A, B, impl="triton", base="cutlass")


def test_base_env_and_empty_input(interpret, monkeypatch):
    monkeypatch.setenv(L.BASE_ENV, "cublas")
    assert L.base_mode() == "cublas"
    assert L.base_mode("triton") == "triton"
    monkeypatch.setenv(L.BASE_ENV, "nope")
    with pytest.raises(ValueError, match=L.BASE_ENV):
        L.base_mode()
    monkeypatch.delenv(L.BASE_ENV)
    assert L.base_mode() == L.DEFAULT_BASE

    dev = interpret
    x = torch.randn(0, D_IN, device=dev, requires_grad=True)
    A = torch.randn(3, D_IN, device=dev, requires_grad=True)
    B = torch.randn(D_OUT, 3, device=dev, requires_grad=True)
    y = L.lora_linear(x, torch.randn(D_OUT, D_IN, device=dev), A, B, impl="triton")
    assert y.shape == (0, D_OUT)
    dA, dB = torch.autograd.grad(y.sum(), [A, B])
    assert (dA == 0).all() and (dB == 0).all()


def test_torch_compile_fullgraph(interpret):
    """The launchers are custom ops with fake kernels: Dynamo traces the whole layer (fwd+bwd)
    without a graph break and gives the eager result."""
    r = 4
    x, W, A, B, b = _inputs((37,), r, True, torch.float32)
    dev = interpret
    x, W, b = x.to(dev), W.to(dev), b.to(dev)

    def f(x, A, B):
        return L.lora_linear(x, W, A, B, b, 2.0, 0.1, 11, impl="triton")

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    Ae, Be = leaf(A.to(dev)), leaf(B.to(dev))
    Ac, Bc = leaf(A.to(dev)), leaf(B.to(dev))
    ye, yc = f(x, Ae, Be), compiled(x, Ac, Bc)
    torch.testing.assert_close(yc, ye)
    ge = torch.autograd.grad(ye.sum(), [Ae, Be])
    gc = torch.autograd.grad(yc.sum(), [Ac, Bc])
    for a, c in zip(ge, gc):
        torch.testing.assert_close(c, a)


def test_custom_ops_opcheck(interpret):
    """Schemas and fake kernels of the launchers; the seed is a one-element int64 CPU tensor (read
    only inside the op), whatever device the data is on."""
    r = 4
    x, W, A, B, _ = (t.float().to(interpret) if t is not None else None for t in _inputs((19,), r, False))
    seed = torch.tensor([2**40 + 3])
    xa = L._lora_down(x, A, 0.2, seed)
    dy = torch.randn(19, D_OUT, device=interpret)
    g, _ = L._lora_bwd_gb(dy, B, xa, 0.0, seed)
    for op, args in [
        (torch.ops.peft_kernels.lora_down.default, (x, A, 0.2, seed)),
        (torch.ops.peft_kernels.lora_bwd_gb.default, (dy, B, xa, 0.2, seed)),
        (torch.ops.peft_kernels.lora_gemm.default, (dy, W, None, g, A, None, 1.5, 0.2, seed, torch.float32, "triton")),
        (torch.ops.peft_kernels.lora_gemm.default, (dy, W, None, g, A, None, 1.5, 0.2, seed, torch.float32, "cublas")),
        (torch.ops.peft_kernels.lora_bwd.default, (dy, x, B, xa, 1.5, 0.5, 0.2, 0.0, seed, True, True)),
        (torch.ops.peft_kernels.lora_bwd.default, (dy, x, B, xa, 1.5, 0.5, 0.0, 0.2, seed, True, False, True)),
        (torch.ops.peft_kernels.lora_bwd.default, (dy, x, B, xa, 1.5, 0.5, 0.2, 0.0, seed, False, True, True)),
        (torch.ops.peft_kernels.lora_bwd_gb.default, (dy, B, xa, 0.2, seed, True)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("r", [16, 64, 256])
@pytest.mark.parametrize("base", ["triton", "cublas", "auto"])
def test_lora_large_gpu(r, base):
    """Realistic sizes on a GPU: autotuned tiles, the r = 256 register budget, both bases."""
    dev, dtype = torch.device("cuda"), torch.bfloat16
    T, d_in, d_out = 1000, 1024 + 7, 2048 + 3
    x, W, A, B, b = (t.to(dev) for t in _inputs((T,), r, True, d_in=d_in, d_out=d_out))
    go = torch.randn(T, d_out, device=dev, dtype=torch.float64)
    _check_against_reference(lambda *t, **k: L.lora_linear(*t, **k, impl="triton", base=base),
                             x, W, A, B, b, dtype, go, scaling=2.0, dropout_p=0.05, seed=99)


@pytest.mark.parametrize("base", ["triton", "cublas"])
def test_launches_guarded_and_grid_within_cuda_limits(interpret, monkeypatch, base):
    """Every launch runs under ``torch.cuda.device(x.device)`` (Triton launches on the current
    device), and no grid axis but 0 grows with T (CUDA caps axes 1/2 at 65535; the interpreter
    does not). The huge-T launches are only recorded, never run."""
    from launch_spy import spy_launches

    x, W, A, B, b = (t.float().to(interpret) if t is not None else None for t in _inputs((37,), 4, True))
    log = spy_launches(monkeypatch, L, "_DeviceGuard")
    xs = [leaf(x), leaf(W, requires_grad=False), leaf(A), leaf(B), leaf(b)]
    y = L.lora_linear(*xs, scaling=0.5, dropout_p=0.3, seed=11, impl="triton", base=base)
    grads(y, [xs[0], xs[2], xs[3], xs[4]], torch.randn_like(y))
    names = {name for name, *_ in log.launches}
    assert names == {"_lora_rows_kernel", "_lora_gemm_kernel", "_lora_bwd_da_kernel"}
    log.assert_guarded(x.device)
    log.assert_grid_within_cuda_limits()

    big = spy_launches(monkeypatch, L, "_DeviceGuard", run=False)
    T = 65536 * 64 + 1  # more token blocks than CUDA's axis-1/2 limit at any block size <= 64
    xb = torch.zeros(T, 1, device=interpret)
    w1 = torch.zeros(1, 1, device=interpret)
    seed = torch.tensor([3])
    xa = L._lora_down(xb, w1, 0.3, seed)
    L._lora_gemm(xb, w1, None, xa, w1, None, 1.0, 0.3, seed, torch.float32, "triton")
    L._lora_bwd(xb, xb, w1, xa, 1.0, 1.0, 0.3, 0.0, seed, True, True)
    assert len(big.launches) == 4
    big.assert_grid_within_cuda_limits()


@pytest.mark.parametrize("train_a,train_b", [(True, True), (True, False), (False, True)])
def test_adapter_grads_one_buffer_accumulate_and_frozen_factors(interpret, monkeypatch, train_a, train_b):
    """dA and dB come from one zeroed fp32 buffer cast once (no separate scaling or cast launches):
    they accumulate correctly over two backward passes (``.grad += ...`` into views of one storage),
    a frozen factor gets no gradient and no space in the buffer, and the values match the reference."""
    x, W, A, B, b = (t.to(interpret) for t in _inputs((29,), 6, True))
    go = torch.randn(29, D_OUT, device=interpret)
    made = []
    real = L._lora_bwd
    monkeypatch.setattr(L, "_lora_bwd", lambda *a: made.append(real(*a)) or made[-1])
    dtype = torch.bfloat16
    xs = [leaf(x, dtype), leaf(W, dtype, requires_grad=False), leaf(A, dtype, requires_grad=train_a),
          leaf(B, dtype, requires_grad=train_b), leaf(b, dtype)]
    for _ in range(2):
        L.lora_linear(*xs, scaling=0.7, dropout_p=0.25, seed=5, impl="triton").backward(go.to(dtype))
    n_want = (D_OUT * 6 if train_b else 0) + (6 * D_IN if train_a else 0)
    assert len(made) == 2 and all(buf.shape == (n_want,) and buf.dtype == torch.float32 for _, buf in made)
    if train_a and train_b:  # one cast for both: autograd keeps the two views of its result
        assert xs[2].grad.untyped_storage().data_ptr() == xs[3].grad.untyped_storage().data_ptr()
    ref = [leaf(x), leaf(W, requires_grad=False), leaf(A, requires_grad=train_a), leaf(B, requires_grad=train_b),
           leaf(b)]
    y = R.lora(*ref, scaling=0.7, dropout_p=0.25, seed=5)
    y.backward(2 * go.double())
    for got, want in [(xs[2].grad, ref[2].grad), (xs[3].grad, ref[3].grad), (xs[0].grad, ref[0].grad)]:
        if want is None:
            assert got is None
        else:
            assert got.dtype == dtype and got.shape == want.shape
            torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_backward_issues_no_small_ops_beyond_one_cast(interpret):
    """The fused backward is the ``lora_bwd`` op (g, dB, dA in one zeroed buffer), one cast of
    that buffer to the parameters' dtype, and the dX ``lora_gemm``: no separate scaling, zeroing
    or per-gradient casts (each a kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.name())
            return func(*args, **(kwargs or {}))

    x, W, A, B = (t.to(interpret) for t in _inputs((29,), 4, False)[:4])
    xs = [leaf(x, torch.bfloat16), leaf(W, torch.bfloat16, requires_grad=False), leaf(A, torch.bfloat16),
          leaf(B, torch.bfloat16)]
    y = L.lora_linear(*xs, scaling=0.5, dropout_p=0.1, seed=3, impl="triton", base="triton")
    dy = torch.randn_like(y)
    seen = []
    with Log():
        y.backward(dy)
    launching = [n for n in seen if not n.startswith(("aten::view", "aten::slice", "aten::detach", "aten::t"))]
    assert launching == ["peft_kernels::lora_bwd", "aten::_to_copy", "peft_kernels::lora_gemm"]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_double_backward_raises_and_jit_trace_replays(interpret):
    """The fused backward is first-order only: ``create_graph=True`` through it raises (it must not
    silently drop the second-order terms), and ``torch.jit.trace`` records the op and replays it
    on a new input."""
    x, W, A, B, b = (t.float().to(interpret) for t in _inputs((13,), 4, True))
    xs = [leaf(x), leaf(W, requires_grad=False), leaf(A), leaf(B), leaf(b)]
    y = L.lora_linear(*xs, scaling=0.5, impl="triton")
    (gx,) = torch.autograd.grad(y.square().sum(), [xs[0]], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|no autograd formula"):
        gx.square().sum().backward()

    fn = lambda t: L.lora_linear(t, W, A, B, b, scaling=0.5, impl="triton")  # noqa: E731
    traced = torch.jit.trace(fn, (x,), check_trace=False)
    x2 = torch.randn_like(x)
    torch.testing.assert_close(traced(x2), R.lora(x2, W, A, B, b, scaling=0.5), rtol=1e-4, atol=1e-4)


def test_gemm_op_accepts_strided_bias(interpret):
    """The GEMM kernel reads the bias without a stride: the op makes a strided bias dense first."""
    x, W, A, B, _ = (t.float().to(interpret) if t is not None else None for t in _inputs((19,), 4, False))
    xa = L._lora_down(x, A, 0.0, torch.tensor([0]))
    bias2 = torch.randn(D_OUT, 2, device=interpret)
    seed = torch.tensor([0])
    ref = L._lora_gemm(x, W.t(), None, xa, B.t(), bias2[:, 0].contiguous(), 1.5, 0.0, seed, torch.float32, "triton")
    got = L._lora_gemm(x, W.t(), None, xa, B.t(), bias2[:, 0], 1.5, 0.0, seed, torch.float32, "triton")
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_auto_base_measures_once_per_key_and_keeps_the_faster(interpret, monkeypatch):
    """``base="auto"``: both bases timed on the call's operands, the faster kept and reused for
    the same key; a new key (another N) is measured again. The timer is injected (no GPU here)."""
    monkeypatch.setattr(L, "_AUTO_CHOICE", {})
    monkeypatch.setattr(L, "_AUTO_TIMES", {})
    x, W, A, B, b = (t.float().to(interpret) if t is not None else None for t in _inputs((19,), 4, True))
    seed = torch.tensor([5])
    xa = L._lora_down(x, A, 0.0, seed)
    calls = []

    def timer(fns):
        assert list(fns) == ["triton", "cublas"]
        calls.extend(fn() for fn in fns.values())  # the candidates really run
        return {"triton": 2.0, "cublas": 1.0}

    args = (x, W.t(), None, xa, B.t(), b, 1.5, 0.0, seed, torch.float32)
    assert L._auto_base(*args, timer=timer) == "cublas"
    torch.testing.assert_close(calls[0], calls[1])  # same result from both bases
    assert L._auto_base(*args, timer=lambda fns: pytest.fail("measured twice")) == "cublas"
    (d,) = L.base_decisions()
    assert d["choice"] == "cublas" and d["triton_ms"] == 2.0 and d["cublas_ms"] == 1.0 and d["N"] == D_OUT
    # the op follows the cached decision: the add-only path runs after torch.mm
    got = L._lora_gemm(*args, "auto")
    torch.testing.assert_close(got, calls[1], rtol=0, atol=0)
    calls.clear()
    args2 = (x, W[:50].t(), None, xa, B[:50].t(), b[:50], 1.5, 0.0, seed, torch.float32)
    assert L._auto_base(*args2, timer=timer) == "cublas" and len(calls) == 2
    assert len(L.base_decisions()) == 2
    # another rank (same rank chunk on a GPU) is another decision
    xa8 = L._lora_down(x, torch.randn(40, D_IN, device=interpret), 0.0, seed)
    args3 = (x, W.t(), None, xa8, torch.randn(40, D_OUT, device=interpret), b, 1.5, 0.0, seed, torch.float32)
    assert L._auto_base(*args3, timer=timer) == "cublas" and len(L.base_decisions()) == 3
    # with no timer and no CUDA device nothing is measured: the Triton path (what CI must cover)
    monkeypatch.setattr(L, "_AUTO_CHOICE", {})
    assert L._auto_base(*args) == "triton" and L._AUTO_CHOICE == {}


def test_auto_base_leaves_out_a_base_that_raises_and_follows_the_env_list(interpret, monkeypatch):
    """A base whose first call raises (e.g. a TMA path the device or build cannot run) leaves the
    race with a warning and its error in ``base_decisions()``, instead of failing every default
    call; only when no base is left does the error reach the caller. ``PEFT_KERNELS_AUTO_BASES``
    narrows the candidates (the first GPU session's fallback if the TMA path faults)."""
    monkeypatch.setattr(L, "_AUTO_CHOICE", {})
    monkeypatch.setattr(L, "_AUTO_TIMES", {})
    monkeypatch.setattr(L, "_AUTO_ERRORS", {})
    x, W, A, B, b = (t.float().to(interpret) if t is not None else None for t in _inputs((19,), 4, True))
    seed = torch.tensor([5])
    xa = L._lora_down(x, A, 0.0, seed)
    args = (x, W.t(), None, xa, B.t(), b, 1.5, 0.0, seed, torch.float32)
    real = L._gemm_with_base

    def broken(*a):
        if a[-1] == "cublas":
            raise RuntimeError("no cuBLAS today")
        return real(*a)

    monkeypatch.setattr(L, "_gemm_with_base", broken)
    with pytest.warns(RuntimeWarning, match="base='cublas' failed on its first call"):
        assert L._auto_base(*args, timer=lambda fns: {b: 1.0 for b in fns}) == "triton"
    (d,) = L.base_decisions()
    assert "cublas_ms" not in d and "no cuBLAS today" in d["cublas_error"]  # no time (JSON has no inf)
    # the only candidate failing is the caller's error
    monkeypatch.setattr(L, "_AUTO_CHOICE", {})
    monkeypatch.setenv(L.AUTO_BASES_ENV, "cublas")
    with pytest.raises(RuntimeError, match="no cuBLAS today"):
        L._auto_base(*args, timer=lambda fns: {b: 1.0 for b in fns})
    monkeypatch.setenv(L.AUTO_BASES_ENV, " triton ,tma")
    assert L.auto_bases() == ("triton", "tma")
    for bad, match in (("triton,gpu", "PEFT_KERNELS_AUTO_BASES"), ("tma", "must include 'triton' or 'cublas'")):
        monkeypatch.setenv(L.AUTO_BASES_ENV, bad)
        with pytest.raises(ValueError, match=match):
            L.auto_bases()
        # checked with the base choice, before any kernel runs (on the CPU too)
        with pytest.raises(ValueError, match=match):
            L.lora_linear(x, W, A, B, impl="triton")
    # deterministic mode keeps one fixed base, from the allowed ones
    monkeypatch.setenv(L.AUTO_BASES_ENV, "cublas,tma")
    monkeypatch.setattr(L, "_AUTO_CHOICE", {})
    monkeypatch.setattr(L, "deterministic", lambda: True)
    assert L._auto_base(*args) == "cublas"


@pytest.mark.parametrize("dtype,p,base", [(torch.float32, 0.3, "triton"), (torch.bfloat16, 0.3, "cublas"),
                                          (torch.float16, 0.0, "triton")])
def test_output_dropout_mode(interpret, dtype, p, base):
    """``LoRAFunction(..., output_dropout=True)`` (what Monarch runs on): the mask covers the
    ``(T, d_out)`` adapter output, the same spec regenerated in backward."""
    from peft_kernels.reference._philox import keep_mask, keep_scale

    r, seed = 8, 77
    x, W, A, B, b = _inputs((37,), r, True)
    go = torch.randn(37, D_OUT, dtype=torch.float64)
    keep = keep_mask(seed, p, 37, D_OUT) if p > 0 else torch.ones(37, D_OUT, dtype=torch.bool)

    def ref(x, W, A, B, b):
        delta = 0.5 * (x @ A.t() @ B.t())
        return x @ W.t() + b + torch.where(keep, delta * keep_scale(p), torch.zeros_like(delta))

    y_exact, g_exact = _run(ref, x, W, A, B, b, torch.float64, go)
    y_same, g_same = _run(ref, x, W, A, B, b, dtype, go)
    fn = lambda *t: L.LoRAFunction.apply(*t, 0.5, p, torch.tensor([seed]), base, True)
    to = lambda t: t.to(interpret)
    y_got, g_got = _run(fn, to(x), to(W), to(A), to(B), to(b), dtype, go.to(interpret))
    assert_close_to_reference("y", y_got.cpu(), y_same, y_exact)
    for name, got, same, exact in zip(["dx", "dA", "dB", "dbias"], g_got, g_same, g_exact):
        assert_close_to_reference(name, got.cpu(), same, exact)


def test_add_only_pass_is_not_autotuned_and_leaves_inputs_alone(interpret, monkeypatch):
    """The cuBLAS path adds the LoRA term into its own fresh output in place, with one fixed tile:
    an autotuner benchmarking configs on that live output would add the term once per run. And the
    op's add-only mode on a caller's ``c`` never writes into ``c``."""
    x, W, A, B, b = (t.float().to(interpret) if t is not None else None for t in _inputs((19,), 4, True))
    seed = torch.tensor([5])
    xa = L._lora_down(x, A, 0.0, seed)
    runs = []
    monkeypatch.setattr(L._lora_gemm_kernel, "run", lambda *a, **k: runs.append(1) or pytest.fail("autotuned"))
    want = x @ W.t() + b + 1.5 * (xa @ B.t())
    got = L._lora_gemm(x, W.t(), None, xa, B.t(), b, 1.5, 0.0, seed, torch.float32, "cublas")
    torch.testing.assert_close(got, want)
    c = torch.randn(19, D_OUT, device=interpret)
    c0 = c.clone()
    got = L._lora_gemm(None, None, c, xa, B.t(), None, 1.5, 0.0, seed, torch.float32, "triton")
    torch.testing.assert_close(got, c0 + 1.5 * (xa @ B.t()))
    assert torch.equal(c, c0) and runs == []


@pytest.mark.parametrize("p,output_dropout", [(0.0, False), (0.3, False), (0.3, True)])
def test_deterministic_mode_reduces_without_atomics(interpret, monkeypatch, p, output_dropout):
    """Under torch.use_deterministic_algorithms(True) dA and dB come from per-split partials summed
    in a fixed order (no fp32 atomics): same values as the atomic path up to fp32 summation order,
    and bit-identical between two runs."""
    x, W, A, B, b = (t.float().to(interpret) if t is not None else None for t in _inputs((37,), 5, True))
    go = torch.randn(37, D_OUT, device=interpret)
    seen = []
    orig = L._launch_da
    monkeypatch.setattr(L, "_launch_da", lambda *a, **k: seen.append(a[5]) or orig(*a, **k))

    def run():
        xs = [leaf(x), leaf(W, requires_grad=False), leaf(A), leaf(B), leaf(b)]
        y = L.LoRAFunction.apply(*xs, 1.5, p, torch.tensor([7]), "triton", output_dropout)
        return [y, *grads(y, [xs[0], xs[2], xs[3], xs[4]], go)]

    atomic = run()
    assert seen == [False]  # dB from the g pass's atomics, dA from atomics
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det1, det2 = run(), run()
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen[1:] == [True, True] * 2  # dB and dA, both runs, from fixed-order partial sums
    for a, d1, d2 in zip(atomic, det1, det2):
        torch.testing.assert_close(d1, a, rtol=1e-5, atol=1e-5)
        assert torch.equal(d1, d2)


# ------------------------------------------------------------------------------- TMA base
# Shapes whose row strides are multiples of 16 bytes in every dtype (136 * 2 and 88 * 2 bytes), so
# ``base="tma"`` really runs the descriptor kernel; still awkward for the tiles (not multiples of 32).
TMA_D_IN, TMA_D_OUT = 136, 88

TMA_CASES = [  # (dtype, leading dims, r, bias, dropout)
    (torch.float32, (37,), 4, True, 0.3),
    (torch.bfloat16, (3, 13), 33, True, 0.3),
    (torch.float16, (37,), 33, False, 0.0),
    (torch.bfloat16, (37,), 4, False, 0.0),
]


def _spy_gemm_launchers(monkeypatch):
    """Record which GEMM launcher ran each fused GEMM: ("tma", W_NK) or ("pointer", None)."""
    seen = []
    tma, ptr = L._launch_gemm_tma, L._launch_gemm
    monkeypatch.setattr(L, "_launch_gemm_tma", lambda *a: seen.append(("tma", L._tma_layout(a[1]))) or tma(*a))
    monkeypatch.setattr(L, "_launch_gemm", lambda *a: seen.append(("pointer", None)) or ptr(*a))
    return seen


@pytest.mark.parametrize("dtype,lead,r,bias,p", TMA_CASES)
def test_tma_base_matches_reference(interpret, monkeypatch, dtype, lead, r, bias, p):
    """``base="tma"`` on aligned shapes: the descriptor kernel runs both GEMMs (forward reads W0 as
    (N, K) tiles, dX as (K, N) tiles) and the output and every gradient meet the reference rule."""
    seen = _spy_gemm_launchers(monkeypatch)
    x, W, A, B, b = (None if t is None else t.to(interpret) for t in _inputs(lead, r, bias, d_in=TMA_D_IN, d_out=TMA_D_OUT))
    go = torch.randn(*lead, TMA_D_OUT, dtype=torch.float64, device=interpret)
    fn = lambda *t, **k: L.lora_linear(*t, **k, impl="triton", base="tma")
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # fp32 takes the TMA base with TF32 dots only
    try:
        _check_against_reference(fn, x, W, A, B, b, dtype, go, scaling=R.lora_scaling(r, 8.0, False), dropout_p=p,
                                 seed=4321)
    finally:
        torch.set_float32_matmul_precision(prev)
    assert seen == [("tma", True), ("tma", False)]  # forward (W0^T view), dX (W0 row-major)


def test_tma_base_falls_back_when_misaligned(interpret, monkeypatch):
    """d_in = 123 bf16 rows are 246 bytes, not a multiple of 16: ``base="tma"`` runs the pointer
    kernel, same result rule. Ineligible operands are recognised without launching anything."""
    seen = _spy_gemm_launchers(monkeypatch)
    x, W, A, B, b = (t.to(interpret) for t in _inputs((37,), 8, True))
    go = torch.randn(37, 77, dtype=torch.float64, device=interpret)
    fn = lambda *t, **k: L.lora_linear(*t, **k, impl="triton", base="tma")
    _check_against_reference(fn, x, W, A, B, b, torch.bfloat16, go, scaling=2.0, dropout_p=0.3, seed=9)
    assert seen == [("pointer", None), ("pointer", None)]

    xa = torch.randn(37, TMA_D_IN, device=interpret, dtype=torch.bfloat16)
    Wa = torch.randn(TMA_D_OUT, TMA_D_IN, device=interpret, dtype=torch.bfloat16)
    assert L.tma_eligible(xa, Wa.t(), torch.bfloat16) and L.tma_eligible(xa[:, :TMA_D_OUT], Wa, torch.bfloat16) is False
    assert L.tma_eligible(xa[:, :TMA_D_OUT].contiguous(), Wa, torch.bfloat16)  # dX layout: W0 (K, N) row-major
    shifted = torch.empty(37 * TMA_D_IN + 1, device=interpret, dtype=torch.bfloat16)[1:].view(37, TMA_D_IN)
    assert not L.tma_eligible(shifted, Wa.t(), torch.bfloat16)  # data pointer 2 bytes off
    assert not L.tma_eligible(xa, Wa.t().float(), torch.bfloat16)  # mixed dtypes
    assert not L.tma_eligible(xa.double(), Wa.t().double(), torch.float64)
    assert torch.get_float32_matmul_precision() == "highest"  # torch's default: exact fp32, no tensor cores
    assert not L.tma_eligible(xa.float(), Wa.t().float(), torch.float32)
    assert not L.tma_eligible(xa, Wa[:, :64].t(), torch.bfloat16)  # W0 columns sliced: neither layout
    monkeypatch.setattr(L.dispatch, "interpreter_enabled", lambda: False)
    assert not L.tma_eligible(xa, Wa.t(), torch.bfloat16)  # CPU without the interpreter: no descriptors


def test_auto_base_times_all_eligible_bases(interpret, monkeypatch):
    """``base="auto"`` on aligned operands times the three bases (they agree), keeps the fastest,
    and the op then runs it; on misaligned operands ``tma`` is not a candidate. The autotuned TMA
    kernel writes a fresh output and leaves its inputs as they were."""
    monkeypatch.setattr(L, "_AUTO_CHOICE", {})
    monkeypatch.setattr(L, "_AUTO_TIMES", {})
    seen = _spy_gemm_launchers(monkeypatch)
    x, W, A, B, b = (t.to(interpret, torch.bfloat16) for t in _inputs((19,), 4, True, d_in=TMA_D_IN, d_out=TMA_D_OUT))
    seed = torch.tensor([5])
    xa = L._lora_down(x, A, 0.0, seed)
    snapshot = [t.clone() for t in (x, W, xa, B, b)]
    calls = []

    def timer(fns):
        assert list(fns) == ["triton", "cublas", "tma"]
        calls.extend(fn() for fn in fns.values())
        return {"triton": 2.0, "cublas": 1.5, "tma": 1.0}

    args = (x, W.t(), None, xa, B.t(), b, 1.5, 0.0, seed, torch.bfloat16)
    assert L._auto_base(*args, timer=timer) == "tma"
    # the same result from all three: cuBLAS rounds its bf16 base product once more (<= 1 bf16 ulp of |y|)
    torch.testing.assert_close(calls[1], calls[0], rtol=0, atol=2**-7 * calls[0].abs().max().item())
    torch.testing.assert_close(calls[2], calls[0])
    (d,) = L.base_decisions()
    assert d["choice"] == "tma" and d["tma_ms"] == 1.0 and d["tma_eligible"] is True
    seen.clear()
    got = L._lora_gemm(*args, "auto")
    assert seen == [("tma", True)]
    torch.testing.assert_close(got, calls[2], rtol=0, atol=0)
    for before, after in zip(snapshot, (x, W, xa, B, b)):
        assert torch.equal(before, after)

    # d_in = 123 bf16: 246-byte rows, no descriptor; only the two other bases compete
    x123 = torch.randn(19, 123, device=interpret, dtype=torch.bfloat16)
    W123 = torch.randn(TMA_D_OUT, 123, device=interpret, dtype=torch.bfloat16)
    xa123 = L._lora_down(x123, torch.randn(4, 123, device=interpret, dtype=torch.bfloat16), 0.0, seed)
    two = lambda fns: (list(fns) == ["triton", "cublas"] or pytest.fail(str(list(fns)))) and {"triton": 1, "cublas": 2}
    assert L._auto_base(x123, W123.t(), None, xa123, B.t(), b, 1.5, 0.0, seed, torch.bfloat16, timer=two) == "triton"
    assert L.base_decisions()[-1]["tma_eligible"] is False


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,r", [(torch.bfloat16, 16), (torch.float16, 256)])
def test_tma_base_large_gpu(monkeypatch, dtype, r):
    """Realistic aligned sizes on a Hopper GPU: the autotuned TMA configs (descriptor block shapes
    set per config), tails in every dimension, both W0 layouts, against the reference rule."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9.0 or newer")
    seen = _spy_gemm_launchers(monkeypatch)
    dev = torch.device("cuda")
    T, d_in, d_out = 1000, 1024 + 8, 2048 + 24
    x, W, A, B, b = (t.to(dev) for t in _inputs((T,), r, True, d_in=d_in, d_out=d_out))
    go = torch.randn(T, d_out, device=dev, dtype=torch.float64)
    fn = lambda *t, **k: L.lora_linear(*t, **k, impl="triton", base="tma")
    _check_against_reference(fn, x, W, A, B, b, dtype, go, scaling=2.0, dropout_p=0.05, seed=99)
    assert seen == [("tma", True), ("tma", False)]


def test_deterministic_mode_fixes_the_auto_base_and_handles_empty_dims(interpret, monkeypatch):
    """Under torch.use_deterministic_algorithms(True), ``auto`` takes the Triton base without
    timing (bit-reproducible across processes); a zero-sized d_out layer still backprops (the
    deterministic dB runs the dA kernel over d_out columns)."""
    x, W, A, B, b = (t.float().to(interpret) if t is not None else None for t in _inputs((19,), 4, True))
    xa = L._lora_down(x, A, 0.0, torch.tensor([1]))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        monkeypatch.setattr(L, "_AUTO_CHOICE", {})
        args = (x, W.t(), None, xa, B.t(), b, 1.0, 0.0, torch.tensor([1]), torch.float32)
        assert L._auto_base(*args, timer=lambda fns: pytest.fail("timed in deterministic mode")) == "triton"
        for d_in, d_out in ((8, 0),):
            xs = torch.randn(5, d_in, device=interpret, requires_grad=True)
            As = torch.randn(4, d_in, device=interpret, requires_grad=True)
            Bs = torch.randn(d_out, 4, device=interpret, requires_grad=True)
            y = L.lora_linear(xs, torch.randn(d_out, d_in, device=interpret), As, Bs, impl="triton")
            y.sum().backward()
            assert y.shape == (5, d_out) and As.grad.shape == As.shape and Bs.grad.shape == Bs.shape
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.gpu
def test_new_shape_under_cuda_graph_capture_asks_for_a_warm_up():
    """A shape no kernel has been tuned for cannot be autotuned inside a CUDA graph capture (the
    benchmark synchronises): the launcher says to run the step once uncaptured, before triton's
    benchmark fails inside the capture. Unusual sizes, so no earlier test tuned this key."""
    dev = torch.device("cuda")
    x = torch.randn(333, 72, device=dev, dtype=torch.bfloat16)
    W = torch.randn(40, 72, device=dev, dtype=torch.bfloat16)
    A = torch.randn(3, 72, device=dev, dtype=torch.bfloat16)
    B = torch.randn(40, 3, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError) as info:
        with torch.cuda.graph(graph):
            L.lora_linear(x, W, A, B, impl="triton", base="triton")
    chain = [info.value, info.value.__context__, info.value.__cause__]
    assert any(e is not None and "before capturing" in str(e) for e in chain), chain


def test_dropout_seed_refuses_a_cuda_graph_capture(monkeypatch):
    """The kernels take the dropout seed as a host int: a captured graph would replay one mask at
    every replay, silently (torch's dropout draws anew). ``host_seed`` refuses a capture on the
    launch device's stream (the operands' GPU, not merely the current one) and reads the seed
    otherwise. CUDA's state is faked here; the GPU test below captures for real."""
    from peft_kernels.ops import _dropout as D

    capturing = {"now": False}
    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["now"])
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    seed = torch.tensor([123456789012], dtype=torch.int64)
    assert D.host_seed(seed, torch.device("cuda:0")) == 123456789012
    assert D.host_seed(seed, torch.device("cpu")) == 123456789012
    capturing["now"] = True
    assert D.host_seed(seed, torch.device("cpu")) == 123456789012  # the interpreter never captures
    for dev in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(RuntimeError, match="every replay"):
            D.host_seed(seed, torch.device(dev))
    assert entered == [torch.device("cuda:1")]  # another GPU's stream is asked under its own device
    # dropout 0 reads no seed, so it is never refused
    assert L._dropout_args(0.0, seed, torch.device("cuda:0")) == (False, 0, 0, 1.0)


@pytest.mark.gpu
def test_dropout_under_cuda_graph_capture_is_refused():
    """Warmed-up shapes capture fine without dropout; with dropout the launcher refuses the capture
    (a baked seed) instead of recording a graph that repeats one mask."""
    dev = torch.device("cuda")
    x = torch.randn(129, 72, device=dev, dtype=torch.bfloat16)
    W = torch.randn(40, 72, device=dev, dtype=torch.bfloat16)
    A = torch.randn(3, 72, device=dev, dtype=torch.bfloat16)
    B = torch.randn(40, 3, device=dev, dtype=torch.bfloat16)
    for p in (0.0, 0.1):  # tune and load every kernel of both variants uncaptured
        L.lora_linear(x, W, A, B, dropout_p=p, seed=7, impl="triton", base="triton")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError) as info:
        with torch.cuda.graph(graph):
            L.lora_linear(x, W, A, B, dropout_p=0.1, seed=7, impl="triton", base="triton")
    chain = [info.value, info.value.__context__, info.value.__cause__]
    assert any(e is not None and "every replay" in str(e) for e in chain), chain


def test_fp32_adapter_weights_on_bf16_activations(interpret):
    """The default adapter dtype on a bf16 model: fp32 A/B with bf16 x and W0. The Function takes
    them as they are (no cast node between the parameters and it) and returns fp32 gradients
    straight from its fp32 reduction, as close to the fp64 reference as an all-bf16 torch run."""
    torch.manual_seed(0)
    T, d_in, d_out, r = 37, 48, 40, 4
    x = torch.randn(T, d_in, device=interpret).to(torch.bfloat16).requires_grad_()
    W = (torch.randn(d_out, d_in, device=interpret) * 0.2).to(torch.bfloat16)
    A = (torch.randn(r, d_in, device=interpret) * 0.2).requires_grad_()
    B = (torch.randn(d_out, r, device=interpret) * 0.2).requires_grad_()
    dy = torch.randn(T, d_out, device=interpret).to(torch.bfloat16)
    y = L.lora_linear(x, W, A, B, scaling=2.0, dropout_p=0.1, seed=5, impl="triton")
    assert y.dtype == torch.bfloat16
    # A and B feed the Function directly: their gradients never pass through a bf16 cast
    node = y.grad_fn
    while type(node).__name__ != "LoRAFunctionBackward":  # past the reshape to the leading dims
        node = node.next_functions[0][0]
    feeds = [type(fn).__name__ for fn, _ in node.next_functions[2:4]]
    assert feeds == ["AccumulateGrad", "AccumulateGrad"], feeds
    y.backward(dy)
    assert A.grad.dtype == B.grad.dtype == torch.float32
    ref = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y_ref = R.lora(ref[0], W.double(), ref[1], ref[2], scaling=2.0, dropout_p=0.1, seed=5)
    y_ref.backward(dy.double())
    same = [t.detach().clone().requires_grad_() for t in (x, A.to(torch.bfloat16), B.to(torch.bfloat16))]
    y_bf = R.lora(same[0], W, same[1], same[2], scaling=2.0, dropout_p=0.1, seed=5)
    y_bf.backward(dy)
    for got, want, torch_err_from in ((A.grad, ref[1].grad, same[1].grad), (B.grad, ref[2].grad, same[2].grad),
                                      (x.grad, ref[0].grad, same[0].grad)):
        err = (got.double() - want).abs().max().item()
        torch_err = (torch_err_from.double() - want).abs().max().item()
        assert err <= 2 * torch_err + 1e-3, (err, torch_err)


def test_group_down_declines_a_summed_rank_above_max(interpret):
    """A shared-input group runs its kernels at the members' summed rank; above MAX_RANK the
    members run alone (None), where each still fits the single-layer kernels."""
    x = torch.randn(5, 24, device=interpret)
    half = L.MAX_RANK // 2
    fits = [torch.randn(half, 24, device=interpret), torch.randn(half, 24, device=interpret)]
    assert [t.shape for t in L.lora_group_down(x, fits, impl="triton")] == [(5, half), (5, half)]
    over = fits + [torch.randn(1, 24, device=interpret)]
    assert L.lora_group_down(x, over, impl="triton") is None
