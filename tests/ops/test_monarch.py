"""Monarch (MoRe) Triton kernels vs the reference (GUIDE.md section 3).

Every case checks the output and every gradient of the kernel, and of the same-dtype torch
reference, against the float64 reference on the same inputs (``assert_close_to_reference``).
The cases are spread so that together they cover blk_r in {1, 3, 4, 16}, nblocks in
{1, 2, 4, 8, 64}, m != n both ways, in_features not divisible by nblocks, fp32/fp16/bf16,
2-D and 3-D inputs, bias on/off, dropout on/off (same mask regenerated from the seed),
x with and without grad, and an intermediate split into several launches.
"""
from __future__ import annotations

import pytest
import torch

import peft_kernels.ops.monarch as monarch_ops
from helpers import assert_close_to_reference, grads, leaf
from peft_kernels.ops import lora as lora_ops
from peft_kernels.ops.monarch import monarch_linear
from peft_kernels.reference.monarch import monarch, monarch_dims

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _make(lead, n, m, N, r, bias):
    """fp64 master inputs; random (never zero) W2 so every gradient path carries signal."""
    p, s = monarch_dims(n, m, N)
    x = torch.randn(*lead, n, dtype=torch.float64)
    weight = torch.randn(m, n, dtype=torch.float64) / n**0.5
    W1 = torch.randn(N, r, p, dtype=torch.float64) / p**0.5
    W2 = torch.randn(N, s, r, dtype=torch.float64) / r**0.5
    b = torch.randn(m, dtype=torch.float64) if bias else None
    dy = torch.randn(*lead, m, dtype=torch.float64)
    return x, weight, W1, W2, b, dy


def _run(fn, x, weight, W1, W2, b, dy, dtype, dropout_p, seed, x_grad=True):
    """Output and grads (x, W1, W2, bias) of ``fn`` on leaf copies of the inputs cast to dtype."""
    xs = leaf(x, dtype, requires_grad=x_grad)
    ws = leaf(weight, dtype, requires_grad=False)
    W1s, W2s = leaf(W1, dtype), leaf(W2, dtype)
    bs = leaf(b, dtype) if b is not None else None
    y = fn(xs, ws, W1s, W2s, bs, dropout_p, seed)
    return y, grads(y, [xs, W1s, W2s, bs], dy.to(dtype))


def _check_case(device, lead, n, m, N, r, dtype, bias, dropout_p, seed=1234, x_grad=True):
    x, weight, W1, W2, b, dy = (t.to(device) if t is not None else None for t in _make(lead, n, m, N, r, bias))
    kern = _run(lambda *a: monarch_linear(*a, impl="triton"), x, weight, W1, W2, b, dy, dtype, dropout_p, seed,
                x_grad)
    same = _run(monarch, x, weight, W1, W2, b, dy, dtype, dropout_p, seed, x_grad)
    exact = _run(monarch, x, weight, W1, W2, b, dy, torch.float64, dropout_p, seed, x_grad)
    assert kern[0].dtype == dtype and kern[0].shape == (*lead, m)
    assert_close_to_reference("y", kern[0], same[0], exact[0])
    for name, g, gs, ge in zip(("dx", "dW1", "dW2", "dbias"), kern[1], same[1], exact[1]):
        if ge is None:
            assert g is None, f"{name}: expected no gradient"
            continue
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}"
        assert_close_to_reference(name, g, gs, ge)


# (leading dims, n, m, nblocks, blk_r, dtype, bias, dropout)
CASES = [
    ((37,), 123, 77, 4, 4, F32, True, 0.0),     # n % N != 0, m < n, the MoRe default N = r = 4
    ((3, 13), 123, 77, 8, 1, F16, False, 0.2),  # rank 1, 3-D input, dropout
    ((37,), 64, 96, 2, 16, BF16, True, 0.1),    # r = 16, m > n, bias + dropout
    ((2, 11), 50, 31, 1, 4, BF16, False, 0.0),  # a single block (dense low-rank)
    ((37,), 77, 123, 8, 16, F32, False, 0.3),   # R = 128: the widest single-launch intermediate
    ((29,), 123, 77, 4, 4, F16, True, 0.0),
]


@pytest.fixture(params=["fused_gemm", "dedicated"])
def path(request, monkeypatch):
    """Both Triton paths of ``monarch_linear``: the LoRA family's fused-GEMM kernels on the
    dense-expanded factors (default for R <= FUSED_GEMM_MAX_R) and the dedicated kernels."""
    if request.param == "dedicated":
        monkeypatch.setattr(monarch_ops, "FUSED_GEMM_MAX_R", 0)
    return request.param


@pytest.fixture
def dedicated(monkeypatch):
    monkeypatch.setattr(monarch_ops, "FUSED_GEMM_MAX_R", 0)


@pytest.mark.parametrize("lead,n,m,N,r,dtype,bias,dropout_p", CASES)
def test_monarch_matches_reference(interpret, path, lead, n, m, N, r, dtype, bias, dropout_p):
    _check_case(interpret, lead, n, m, N, r, dtype, bias, dropout_p)


def test_monarch_without_input_grad(interpret, path):
    """The NEED_DX=False kernel variant (first layer of a model: x needs no grad)."""
    _check_case(interpret, (37,), 123, 77, 4, 4, F32, True, 0.1, x_grad=False)


@pytest.mark.parametrize("N,r,n,m", [(4, 4, 123, 77), (8, 3, 50, 131), (1, 5, 20, 9), (16, 2, 40, 40)])
def test_dense_factors_fold_both_permutations(N, r, n, m):
    """``x @ B1^T @ B2^T`` is the reference adapter, exactly in fp64, for padded n and m != n."""
    from peft_kernels.reference.monarch import monarch_adapter

    x, _, W1, W2, _, _ = _make((11,), n, m, N, r, False)
    B1, B2 = monarch_ops.dense_factors(W1, W2, n, m)
    assert B1.shape == (N * r, n) and B2.shape == (m, N * r)
    torch.testing.assert_close(x @ B1.t() @ B2.t(), monarch_adapter(x, W1, W2, m), rtol=1e-12, atol=1e-12)
    assert int((B1 != 0).sum()) <= W1.numel() and int((B2 != 0).sum()) <= W2.numel()


@pytest.mark.parametrize("N,r,n,m,wdt,odt", [
    (4, 4, 123, 77, F32, F32), (8, 3, 50, 131, F32, BF16), (1, 5, 20, 9, F16, F16), (16, 2, 40, 40, BF16, F32),
    (4, 4, 2100, 1100, F32, BF16),  # several programs per expansion
])
def test_expand_kernels_match_dense_factors(interpret, N, r, n, m, wdt, odt):
    """The one-launch Triton expansion (and its one-launch adjoint) is ``dense_factors`` then a cast,
    bit for bit, values and both factor gradients, including the padding columns and rows."""
    _, _, W1, W2, _, _ = _make((1,), n, m, N, r, False)
    W1k, W2k = leaf(W1.to(interpret), wdt), leaf(W2.to(interpret), wdt)
    W1t, W2t = leaf(W1.to(interpret), wdt), leaf(W2.to(interpret), wdt)
    B1k, B2k = monarch_ops._ExpandFunction.apply(W1k, W2k, n, m, odt)
    B1t, B2t = (t.to(odt) for t in monarch_ops.dense_factors(W1t, W2t, n, m))
    assert B1k.dtype == odt and B1k.shape == B1t.shape and B2k.shape == B2t.shape
    assert torch.equal(B1k, B1t) and torch.equal(B2k, B2t)
    g1, g2 = torch.randn_like(B1t), torch.randn_like(B2t)
    (B1k * g1).sum().add((B2k * g2).sum()).backward()
    (B1t * g1).sum().add((B2t * g2).sum()).backward()
    assert W1k.grad.dtype == wdt and W2k.grad.dtype == wdt
    assert torch.equal(W1k.grad, W1t.grad) and torch.equal(W2k.grad, W2t.grad)
    # one factor without a gradient: the other's still flows
    W1n = W1.to(interpret, wdt)
    B1k, B2k = monarch_ops._ExpandFunction.apply(W1n, W2k, n, m, odt)
    W2k.grad = None
    (B2k * g2).sum().backward()
    torch.testing.assert_close(W2k.grad, W2t.grad, rtol=0, atol=0)


@pytest.mark.parametrize("base", ["triton", "cublas"])
def test_monarch_fused_gemm_bases(interpret, monkeypatch, base):
    """Both base products of the fused-GEMM path (the one ``auto`` chooses from on a GPU)."""
    monkeypatch.setenv("PEFT_KERNELS_BASE", base)
    _check_case(interpret, (3, 13), 123, 77, 4, 4, BF16, True, 0.2)


@pytest.mark.parametrize("lead,n,m,N,r,dtype", [
    ((21,), 123, 77, 8, 3, F32),   # R = 24 in chunks of 16: a block's rows split across launches
    ((5,), 130, 70, 64, 2, BF16),  # nblocks = 64: R = 128 in 8 launches
])
def test_monarch_chunked_intermediate(interpret, monkeypatch, dedicated, lead, n, m, N, r, dtype):
    """An intermediate wider than MAX_R_CHUNK runs as several additive launches."""
    monkeypatch.setattr(monarch_ops, "MAX_R_CHUNK", 16)
    _check_case(interpret, lead, n, m, N, r, dtype, bias=True, dropout_p=0.25, seed=2**40 + 3)


def test_monarch_mixed_dtypes_and_weight_grad(interpret, path):
    """bf16 activations with fp32 adapter factors (factors are cast to x's dtype as in the
    reference; their grads come back in fp32), and a base weight that requires grad."""
    x, weight, W1, W2, b, dy = (t.to(interpret) for t in _make((2, 9), 123, 77, 4, 4, True))

    def run(fn, act_dtype, fac_dtype):
        xs, ws, bs = leaf(x, act_dtype), leaf(weight, act_dtype), leaf(b, act_dtype)
        W1s, W2s = leaf(W1, fac_dtype), leaf(W2, fac_dtype)
        y = fn(xs, ws, W1s, W2s, bs, 0.1, 99)
        return [y, *grads(y, [xs, ws, W1s, W2s, bs], dy.to(act_dtype))]

    kern = run(lambda *a: monarch_linear(*a, impl="triton"), BF16, F32)
    same = run(monarch, BF16, F32)
    exact = run(monarch, torch.float64, torch.float64)
    for name, g, gs, ge in zip(("y", "dx", "dweight", "dW1", "dW2", "dbias"), kern, same, exact):
        assert g.dtype == gs.dtype, f"{name}: dtype {g.dtype} != reference {gs.dtype}"
        assert_close_to_reference(name, g, gs, ge)


def test_monarch_torch_compile_fullgraph(interpret, path):
    """The launchers are custom ops with fake implementations: Dynamo traces without a graph break
    and the compiled forward/backward equal eager bit for bit."""
    x, weight, W1, W2, b, dy = (t.float().to(interpret) for t in _make((6,), 40, 24, 4, 4, True))

    def f(xs, ws, W1s, W2s, bs, dropout_p, seed):
        return monarch_linear(xs, ws, W1s, W2s, bs, dropout_p, seed, impl="triton")

    eager = _run(f, x, weight, W1, W2, b, dy, F32, 0.1, 5)
    comp = _run(torch.compile(f, backend="aot_eager", fullgraph=True), x, weight, W1, W2, b, dy, F32, 0.1, 5)
    assert torch.equal(eager[0], comp[0])
    assert all(torch.equal(g, gc) for g, gc in zip(eager[1], comp[1]))


def test_monarch_deterministic_and_seeded(interpret, path):
    """Same seed -> bitwise-equal output and gradients; another seed -> another mask. (The
    dedicated kernels use no atomics; the fused-GEMM path's dW1/dW2 meet in fp32 atomics, which the
    interpreter runs in program order, so on a GPU only its output and dx are bit-reproducible.)"""
    x, weight, W1, W2, b, dy = (t.to(interpret) for t in _make((19,), 40, 24, 4, 4, True))
    fn = lambda *a: monarch_linear(*a, impl="triton")  # noqa: E731
    y1, g1 = _run(fn, x, weight, W1, W2, b, dy, F32, 0.5, 7)
    y2, g2 = _run(fn, x, weight, W1, W2, b, dy, F32, 0.5, 7)
    y3, _ = _run(fn, x, weight, W1, W2, b, dy, F32, 0.5, 8)
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))
    assert not torch.equal(y1, y3)
    y4, g4 = _run(fn, x, weight, W1, W2, b, dy, F32, 0.5, torch.tensor([7]))  # the modules' tensor seed
    assert torch.equal(y4, y1) and all(torch.equal(a, c) for a, c in zip(g4, g1))


def test_monarch_zero_tokens(interpret):
    x = torch.randn(0, 40, device=interpret, requires_grad=True)
    weight = torch.randn(24, 40, device=interpret)
    p, s = monarch_dims(40, 24, 4)
    W1 = torch.randn(4, 4, p, device=interpret, requires_grad=True)
    W2 = torch.randn(4, s, 4, device=interpret, requires_grad=True)
    y = monarch_linear(x, weight, W1, W2, impl="triton")
    assert y.shape == (0, 24)
    dx, dW1, dW2 = torch.autograd.grad(y.sum(), [x, W1, W2])
    assert dx.shape == (0, 40) and not dW1.any() and not dW2.any()


def test_monarch_default_dispatch_on_cpu_is_reference():
    """Without a forced impl, CPU tensors take the torch reference (the interpreter is opt-in)."""
    x, weight, W1, W2, b, _ = _make((5, 3), 20, 12, 2, 4, True)
    assert torch.equal(monarch_linear(x, weight, W1, W2, b, 0.1, 3), monarch(x, weight, W1, W2, b, 0.1, 3))


def test_monarch_custom_ops_opcheck(interpret):
    """Schemas, fake (meta) implementations and torch.compile tracing of the launchers."""
    x, weight, W1, W2, b, dy = (t.float().to(interpret) for t in _make((17,), 40, 24, 4, 4, True))
    seed = torch.tensor([5])  # the ops take the seed as a one-element int64 CPU tensor
    y, y1 = torch.ops.peft_kernels.monarch_fwd(x, weight, W1, W2, b, 0.1, seed)
    torch.library.opcheck(torch.ops.peft_kernels.monarch_fwd.default, (x, weight, W1, W2, b, 0.1, seed),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.peft_kernels.monarch_bwd.default, (dy, x, weight, W1, W2, y1, 0.1, seed, True),
                          test_utils=("test_schema", "test_faketensor"))
    # the expansion ops, with a non-contiguous W1 (the real ops return contiguous tensors; so must the fakes)
    W1s = W1.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    B1, B2 = torch.ops.peft_kernels.monarch_expand(W1s, W2, 40, 24, torch.bfloat16)
    torch.library.opcheck(torch.ops.peft_kernels.monarch_expand.default, (W1s, W2, 40, 24, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.peft_kernels.monarch_expand_bwd.default, (B1, B2, W1s, W2),
                          test_utils=("test_schema", "test_faketensor"))


def test_monarch_frozen_factor_gets_no_gradient_pass(interpret, monkeypatch):
    """W1 frozen, W2 trained: the fused path computes no gradient for W1's expansion (no dA pass over
    x in the LoRA kernels), and W2's gradient is still right."""
    x, weight, W1, W2, b, dy = (t.float().to(interpret) for t in _make((17,), 40, 24, 4, 4, True))
    calls = []
    real = lora_ops._launch_da
    monkeypatch.setattr(lora_ops, "_launch_da", lambda *a, **k: calls.append(1) or real(*a, **k))
    W2l = leaf(W2)
    y = monarch_linear(leaf(x), weight, W1, W2l, b, impl="triton")
    (gW2,) = torch.autograd.grad(y, [W2l], dy)
    assert calls == []
    W2r = leaf(W2)
    (want,) = torch.autograd.grad(monarch(x, weight, W1, W2r, b), [W2r], dy)
    torch.testing.assert_close(gW2, want, rtol=1e-4, atol=1e-4)


# --- bad input: a clear error naming the argument, raised before any launch -------------------


def _good():
    p, s = monarch_dims(40, 24, 4)
    return dict(x=torch.randn(6, 40), weight=torch.randn(24, 40), W1=torch.randn(4, 4, p),
                W2=torch.randn(4, s, 4), bias=torch.randn(24))


@pytest.mark.parametrize("change,exc,match", [
    (dict(x=torch.randn(6, 41)), ValueError, "x"),
    (dict(W1=torch.randn(4, 4, 11)), ValueError, "W1"),
    (dict(W1=torch.randn(4, 11)), ValueError, "W1"),
    (dict(W2=torch.randn(4, 6, 5)), ValueError, "W2"),
    (dict(W1=torch.randn(41, 4, 1), W2=torch.randn(41, 1, 4)), ValueError, "nblocks"),
    (dict(W1=torch.randint(0, 3, (4, 4, 10))), TypeError, "W1"),
    (dict(bias=torch.randn(25)), ValueError, "bias"),
    (dict(weight=torch.randn(24, 40, 1)), ValueError, "weight"),
    (dict(W2=torch.randn(4, 6, 4, device="meta")), ValueError, "same device"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=torch.tensor([True])), TypeError, "seed"),
    (dict(seed=torch.zeros(2, dtype=torch.int64)), ValueError, "seed"),
])
def test_monarch_bad_input_raises_before_launch(monkeypatch, change, exc, match):
    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched before validation")

    monkeypatch.setattr(monarch_ops.MonarchFunction, "apply", no_launch)
    monkeypatch.setattr(lora_ops.LoRAFunction, "apply", no_launch)
    kwargs = {**_good(), **change}
    with pytest.raises(exc, match=match):
        monarch_linear(impl="triton", **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("N,r", [(4, 4), (4, 32), (64, 64)])
def test_monarch_gpu_llama_like_shape(dtype, N, r):
    """A real-size layer on the GPU (compiled kernels, autotuned configs, chunking at N = r = 64)."""
    _check_case(torch.device("cuda"), (2, 512), 4096, 11008 // 4, N, r, dtype, True, 0.05)


def test_monarch_launches_guarded_and_grid_within_cuda_limits(interpret, monkeypatch, dedicated):
    """Every launch runs under ``torch.cuda.device(x.device)`` (Triton launches on the current
    device), and no grid axis but 0 grows with T (CUDA caps axes 1/2 at 65535; the interpreter
    does not). Chunked intermediate, so every chunk's launches are covered. The huge-T launches
    are only recorded, never run."""
    from launch_spy import spy_launches

    monkeypatch.setattr(monarch_ops, "MAX_R_CHUNK", 16)
    x, weight, W1, W2, b, dy = (t.float().to(interpret) for t in _make((21,), 40, 24, 4, 8, True))
    log = spy_launches(monkeypatch, monarch_ops, "_device_guard")
    xs = [leaf(x), leaf(weight, requires_grad=False), leaf(W1), leaf(W2), leaf(b)]
    y = monarch_linear(*xs, dropout_p=0.2, seed=9, impl="triton")
    grads(y, [xs[0], xs[2], xs[3], xs[4]], dy)
    counts = {}
    for name, *_ in log.launches:
        counts[name] = counts.get(name, 0) + 1
    assert counts == {"_monarch_fwd_kernel": 2, "_monarch_bwd_dy1_kernel": 2, "_monarch_bwd_dx_kernel": 2}
    log.assert_guarded(x.device)
    log.assert_grid_within_cuda_limits()

    big = spy_launches(monkeypatch, monarch_ops, "_device_guard", run=False)
    T = 65536 * max(monarch_ops._BWD_BLOCK_T_INTERP, 16) + 1  # the interpreter's token tiles are 16
    xb = torch.zeros(T, 4, device=interpret)
    wb = torch.zeros(4, 4, device=interpret)
    W1b = torch.zeros(2, 1, 2, device=interpret)
    W2b = torch.zeros(2, 2, 1, device=interpret)
    seed = torch.tensor([1])
    _, y1 = torch.ops.peft_kernels.monarch_fwd(xb, wb, W1b, W2b, None, 0.1, seed)
    torch.ops.peft_kernels.monarch_bwd(xb, xb, wb, W1b, W2b, y1, 0.1, seed, True)
    assert len(big.launches) == 3
    big.assert_grid_within_cuda_limits()


def _two_configs_each(monkeypatch, bench) -> None:
    """Give each dedicated kernel two configs (the interpreter has one), a fresh tuning cache and
    ``bench`` as its autotuner's timer, as a GPU's autotuner would meet them."""
    for name in ("_monarch_fwd_kernel", "_monarch_bwd_dy1_kernel", "_monarch_bwd_dx_kernel"):
        kernel = getattr(monarch_ops, name)
        cfg = kernel.configs[0]
        twin = type(cfg)(dict(cfg.kwargs), num_warps=cfg.num_warps * 2, num_stages=cfg.num_stages)
        monkeypatch.setattr(kernel, "configs", [cfg, twin])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setitem(kernel.__dict__, "do_bench", bench)


@pytest.mark.parametrize("x_grad", [True, False])
def test_monarch_autotuning_leaves_outputs_and_inputs_alone(interpret, monkeypatch, dedicated, x_grad):
    """On a GPU the dedicated kernels autotune several configs on a new key; two of them add into
    an output in place (Y forward, DX backward). The timed runs must go to copies (launch_tuned's
    ``inplace``): no sum of theirs may remain in the result, and the caller's x, which the dX
    kernel receives in no form when x needs no gradient, keeps its version (another node may have
    saved it). The interpreter has one config per kernel: here each gets two and a do_bench that
    runs every candidate twice, as the GPU's autotuner would (several times)."""
    runs = []

    def bench(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        runs.append(1)
        return [1.0, 1.0, 1.0]

    _two_configs_each(monkeypatch, bench)
    x, weight, W1, W2, b, dy = (t.to(interpret) for t in _make((21,), 40, 24, 4, 8, True))
    xs = leaf(x, F32, requires_grad=x_grad)
    ws, W1s, W2s, bs = leaf(weight, F32, requires_grad=False), leaf(W1, F32), leaf(W2, F32), leaf(b, F32)
    version = xs._version
    y = monarch_linear(xs, ws, W1s, W2s, bs, dropout_p=0.2, seed=5, impl="triton")
    got = grads(y, [xs, W1s, W2s, bs], dy.float())
    assert len(runs) == 6, "every kernel should have timed both configs"
    assert xs._version == version
    ref = [leaf(t, F32) if t is not None else None for t in (x, W1, W2, b)]
    ref[0].requires_grad_(x_grad)
    y_ref = monarch(ref[0], ws, ref[1], ref[2], ref[3], 0.2, 5)
    want = grads(y_ref, ref, dy.float())
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_monarch_tuning_keys_on_token_bucket(interpret, monkeypatch, dedicated):
    """The dedicated kernels' autotune key holds the token count's power-of-two bucket: a tuning at
    a small T (a test, a warm-up; with the disk cache, an earlier process) must not decide the
    config for a much larger T, while T values in one bucket share one tuning."""
    tuned = []

    def bench(kernel_call, quantiles):
        kernel_call()
        tuned.append(1)
        return [1.0, 1.0, 1.0]

    _two_configs_each(monkeypatch, bench)

    def step(T):
        x, weight, W1, W2, b, dy = (t.to(interpret) for t in _make((T,), 40, 24, 4, 8, True))
        xs, W1s, W2s = leaf(x, F32), leaf(W1, F32), leaf(W2, F32)
        y = monarch_linear(xs, leaf(weight, F32, requires_grad=False), W1s, W2s, None, impl="triton")
        grads(y, [xs, W1s, W2s], dy.float())
        count = len(tuned)
        tuned.clear()
        return count

    assert step(21) == 6  # bucket 32: each of the three kernels times both configs
    assert step(29) == 0  # same bucket: no new tuning
    assert step(40) == 6  # bucket 64: tuned again


def test_monarch_fake_gradients_contiguous_for_strided_factors(interpret):
    """The real backward returns contiguous dW1/dW2 whatever the factors' strides; the fake must
    report the same strides or torch.compile (inductor) miscompiles code that relies on them."""
    x, weight, W1, W2, b, dy = (t.float().to(interpret) for t in _make((17,), 40, 24, 4, 4, True))
    W1s = W1.transpose(0, 2).contiguous().transpose(0, 2)  # same values and shape, strided
    W2s = W2.transpose(0, 1).contiguous().transpose(0, 1)
    assert not W1s.is_contiguous() and not W2s.is_contiguous()
    seed = torch.tensor([5])
    _, y1 = torch.ops.peft_kernels.monarch_fwd(x, weight, W1s, W2s, b, 0.1, seed)
    torch.library.opcheck(torch.ops.peft_kernels.monarch_bwd.default,
                          (dy, x, weight, W1s, W2s, y1, 0.1, seed, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_monarch_under_autocast(interpret, path):
    """fp32 inputs and factors under bf16 autocast run the kernels in bf16 on both paths and
    whichever base runs (the cuBLAS product must not pick its own precision); fp32 gradients."""
    x, weight, W1, W2, b, dy = (t.to(interpret) for t in _make((2, 9), 123, 77, 4, 4, True))

    def run(fn, dt, autocast, base=None):
        xs, ws, bs = leaf(x, dt), leaf(weight, dt, requires_grad=False), leaf(b, dt)
        W1s, W2s = leaf(W1, dt), leaf(W2, dt)
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            y = fn(xs, ws, W1s, W2s, bs, 0.1, 99)
        return [y, *grads(y, [xs, W1s, W2s, bs], dy.to(y.dtype))]

    same = run(monarch, BF16, False)
    exact = run(monarch, torch.float64, False)
    for base in ("triton", "cublas"):
        got = run(lambda *a: monarch_linear(*a, impl="triton", base=base), F32, True)
        assert got[0].dtype == BF16 and all(g.dtype == F32 for g in got[1:])
        for name, g, gs, ge in zip(("y", "dx", "dW1", "dW2", "dbias"), got, same, exact):
            assert_close_to_reference(f"{base}/{name}", g.to(gs.dtype), gs, ge)
