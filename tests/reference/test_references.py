"""References: gradcheck in float64, delta_weight == forward, dropout determinism, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from peft_kernels import reference as R

D = torch.float64


def rnd(*shape, dtype=D, requires_grad=True, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(requires_grad)


def make_csr(d_out, d_in, density, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(d_out, d_in, generator=g) < density
    mask[0] = False          # an empty row
    mask[-1] = True          # a fully dense row
    idx = mask.nonzero()
    crow = torch.zeros(d_out + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(mask.sum(1), 0)
    col = idx[:, 1].contiguous()
    val = torch.randn(col.shape[0], dtype=dtype, generator=g)
    return crow, col, val


# ---------------------------------------------------------------- gradcheck (float64)

def test_gradcheck_lora():
    x, W, A, B, b = rnd(5, 7), rnd(6, 7, requires_grad=False), rnd(3, 7), rnd(6, 3), rnd(6)
    assert torch.autograd.gradcheck(lambda x, A, B, b: R.lora(x, W, A, B, b, scaling=0.7, dropout_p=0.3, seed=5),
                                    (x, A, B, b))


def test_gradcheck_adalora():
    x, W, A, E, B = rnd(5, 7), rnd(6, 7, requires_grad=False), rnd(4, 7), rnd(4), rnd(6, 4)
    mask = torch.tensor([1, 0, 1, 1])
    assert torch.autograd.gradcheck(lambda x, A, E, B: R.adalora(x, W, A, E, B, scaling=0.5, rank_mask=mask),
                                    (x, A, E, B))


@pytest.mark.parametrize("n,m,N,r", [(7, 5, 2, 3), (8, 8, 4, 4), (9, 13, 3, 2)])
def test_gradcheck_monarch(n, m, N, r):
    p, s = R.monarch_dims(n, m, N)
    x, W, W1, W2 = rnd(4, n), rnd(m, n, requires_grad=False), rnd(N, r, p), rnd(N, s, r)
    assert torch.autograd.gradcheck(lambda x, W1, W2: R.monarch(x, W, W1, W2, dropout_p=0.25, seed=3),
                                    (x, W1, W2))


def test_gradcheck_sparse():
    crow, col, val = make_csr(6, 9, 0.3)
    x, W = rnd(4, 9), rnd(6, 9, requires_grad=False)
    val.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, v: R.sparse(x, W, crow, col, v), (x, val))


@pytest.mark.parametrize("routing", ["token", "batch"])
@pytest.mark.parametrize("router_input", ["h", "x"])
def test_gradcheck_lily(routing, router_input):
    d_in, d_out, r, E = 7, 5, 3, 4
    x, W, lp, hp = rnd(6, d_in), rnd(d_out, d_in, requires_grad=False), rnd(r, d_in), rnd(E, d_out, r)
    router = rnd(E, r if router_input == "h" else d_in)
    assert torch.autograd.gradcheck(
        lambda x, lp, router, hp: R.lily(x, W, lp, router, hp, scaling=1.3, routing=routing,
                                         router_input=router_input), (x, lp, router, hp))


# ---------------------------------------------------------------- delta_weight == forward

def _check_delta(y, x, W, delta, b=None):
    dense = x @ (W + delta).t() + (0 if b is None else b)
    torch.testing.assert_close(y, dense, rtol=1e-10, atol=1e-10)


def test_delta_lora():
    x, W, A, B, b = rnd(2, 5, 7, requires_grad=False), rnd(6, 7), rnd(3, 7), rnd(6, 3), rnd(6)
    s = R.lora_scaling(3, 8.0, use_rslora=True)
    _check_delta(R.lora(x, W, A, B, b, scaling=s), x, W, R.lora_delta_weight(A, B, s), b)


def test_delta_adalora():
    x, W, A, E, B = rnd(5, 7), rnd(6, 7), rnd(4, 7), rnd(4), rnd(6, 4)
    m = torch.tensor([True, False, True, False])
    _check_delta(R.adalora(x, W, A, E, B, scaling=2.0, rank_mask=m), x, W,
                 R.adalora_delta_weight(A, E, B, 2.0, rank_mask=m))


@pytest.mark.parametrize("n,m,N,r", [(123, 77, 4, 4), (16, 40, 8, 2), (10, 10, 1, 5), (30, 17, 7, 16)])
def test_delta_monarch(n, m, N, r):
    p, s = R.monarch_dims(n, m, N)
    x, W, W1, W2 = rnd(3, 4, n), rnd(m, n), rnd(N, r, p), rnd(N, s, r)
    _check_delta(R.monarch(x, W, W1, W2), x, W, R.monarch_delta_weight(W1, W2, n, m))


def test_monarch_transpose_case():
    # N == r: the permutation is a transpose of the (N, r) intermediate
    n = m = 8
    W1, W2 = rnd(4, 4, 2), rnd(4, 2, 4)
    x = rnd(3, n, requires_grad=False)
    X = x.view(3, 4, 2)
    Y1 = torch.stack([X[:, k] @ W1[k].t() for k in range(4)], 1)   # (T, N, r)
    Z = Y1.transpose(1, 2)
    Y2 = torch.stack([Z[:, l] @ W2[l].t() for l in range(4)], 1)   # (T, N, s)
    out = Y2.transpose(1, 2).reshape(3, 8)
    torch.testing.assert_close(R.monarch_adapter(x, W1, W2, m), out)


def test_delta_sparse():
    crow, col, val = make_csr(11, 13, 0.2)
    x, W = rnd(2, 3, 13, requires_grad=False), rnd(11, 13)
    dense = R.sparse_delta_weight(crow, col, val, (11, 13))
    assert int((dense != 0).sum()) == col.numel()
    _check_delta(R.sparse(x, W, crow, col, val), x, W, dense)


@pytest.mark.parametrize("router_input", ["h", "x"])
def test_delta_lily_batch(router_input):
    d_in, d_out, r, E = 9, 6, 3, 5
    x, W, lp, hp = rnd(4, 3, d_in), rnd(d_out, d_in), rnd(r, d_in), rnd(E, d_out, r)
    router = rnd(E, r if router_input == "h" else d_in)
    y = R.lily(x, W, lp, router, hp, scaling=0.5, routing="batch", router_input=router_input)
    _check_delta(y, x, W, R.lily_delta_weight(x, lp, router, hp, 0.5, router_input))


def test_lily_token_equals_expert_loop():
    d_in, d_out, r, E = 9, 6, 3, 5
    x, W, lp, hp, router = rnd(7, d_in), rnd(d_out, d_in), rnd(r, d_in), rnd(E, d_out, r), rnd(E, r)
    y = R.lily(x, W, lp, router, hp, scaling=0.5, routing="token")
    h = x @ lp.t()
    p = torch.softmax(h @ router.t(), -1)
    want = x @ W.t() + 0.5 * sum(p[:, e:e + 1] * (h @ hp[e].t()) for e in range(E))
    torch.testing.assert_close(y, want)


# ---------------------------------------------------------------- dropout

@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dropout_mask_deterministic_and_rate(p):
    rows, cols = 200, 301  # cols not a multiple of 8: the last counter of each row is partly unused
    m1 = R.keep_mask(123, p, rows, cols)
    m2 = R.keep_mask(123, p, rows, cols)
    m3 = R.keep_mask(124, p, rows, cols)
    assert m1.shape == (rows, cols) and m1.dtype == torch.bool
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    # kept fraction within 5 binomial standard deviations of 1 - p (plus the 16-bit quantisation)
    tol = 5 * math.sqrt(p * (1 - p) / (rows * cols)) + 2**-16
    assert abs(m1.float().mean().item() - (1 - p)) < tol
    # rows are independent streams, not copies of one another (counters never overlap)
    assert not torch.equal(m1[0], m1[1])
    assert R.keep_mask(1, 0.0, 10, 10).all()


def test_dropout_mask_follows_the_spec():
    """The vectorised mask equals the spec in _philox's docstring written out element by element:
    counter row * ceil(cols / 8) + col // 8, half (col & 1) of word (col & 7) >> 1, kept iff >= threshold."""
    rows, cols, p = 3, 21, 0.4
    for seed in (7, 2**40 + 5):
        thr = R._philox.drop_threshold(p)
        groups = -(-cols // 8)
        want = torch.zeros(rows, cols, dtype=torch.bool)
        for r in range(rows):
            for c in range(cols):
                words = R._philox.philox4x32(seed, torch.tensor([r * groups + (c >> 3)]))
                j = c & 7
                half = (int(words[j >> 1]) >> (16 * (j & 1))) & 0xFFFF
                want[r, c] = half >= thr
        assert torch.equal(R.keep_mask(seed, p, rows, cols), want)


def test_drop_threshold_and_scale():
    """16-bit threshold: within 1e-5 of p, never 0 (keep everything) or 65536 (keep nothing) for
    p > 0, and the kept scale is 1 / (1 - threshold / 65536) so the mask is unbiased."""
    from peft_kernels.reference._philox import drop_threshold, keep_scale

    assert drop_threshold(0.0) == 0 and keep_scale(0.0) == 1.0
    assert drop_threshold(0.25) == 16384 and keep_scale(0.25) == 4 / 3
    for p in torch.linspace(2**-17, 1 - 2**-17, 1001, dtype=torch.float64).tolist() + [0.05, 0.1, 0.3, 0.9]:
        thr = drop_threshold(p)
        assert 1 <= thr <= 65535 and abs(thr / 65536 - p) < 1e-5, p
        assert keep_scale(p) == 1.0 / (1.0 - thr / 65536)
    assert drop_threshold(1e-12) == 1  # a tiny p still drops something
    assert drop_threshold(1 - 1e-12) == 65535 and math.isfinite(keep_scale(1 - 1e-12))
    assert (~R.keep_mask(3, 1e-12, 512, 512)).any()  # ~4 of 262144 dropped at rate 2**-16
    assert R.keep_mask(3, 1 - 1e-12, 512, 512).any()  # ~4 kept
    # unbiased: the mean of dropout(ones) is 1 up to sampling noise
    for p in (0.1, 0.9):
        y = R.apply_dropout(torch.ones(400, 500, dtype=D), p, 11)
        thr = drop_threshold(p)
        tol = 5 * math.sqrt(thr / (65536 - thr) / y.numel())
        assert abs(y.mean().item() - 1.0) < tol


def test_dropout_scales_kept_elements():
    from peft_kernels.reference._philox import keep_scale

    x = torch.randn(50, 40, dtype=D)
    for p in (0.25, 0.1):
        y = R.apply_dropout(x, p, 9)
        keep = R.keep_mask(9, p, 50, 40)
        torch.testing.assert_close(y[keep], x[keep] * keep_scale(p), rtol=0, atol=0)
        assert (y[~keep] == 0).all()


def test_tensor_seed_equals_int_seed():
    """A one-element int64 tensor seed (what the modules draw) gives the int seed's mask, big seeds
    included, and the references accept it without reading it."""
    for seed in (0, 9, 2**40 + 7, 2**62 - 1):
        for t in (torch.tensor([seed]), torch.tensor(seed)):
            assert torch.equal(R.keep_mask(t, 0.3, 13, 77), R.keep_mask(seed, 0.3, 13, 77))
    x, W, A, B = rnd(5, 7, requires_grad=False), rnd(6, 7), rnd(2, 7), rnd(6, 2)
    seed = 2**61 + 3
    assert torch.equal(R.lora(x, W, A, B, dropout_p=0.4, seed=torch.tensor([seed])),
                       R.lora(x, W, A, B, dropout_p=0.4, seed=seed))


def test_philox_matches_triton(interpret):
    """``philox4x32`` is ``tl.randint4x``: all four words, int64 counters past 2**32, big seeds."""
    import triton
    import triton.language as tl

    @triton.jit
    def _rand_kernel(out_ptr, seed, base, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        w0, w1, w2, w3 = tl.randint4x(seed, base + offs.to(tl.int64))
        ok = offs < n
        tl.store(out_ptr + offs, w0.to(tl.int64), mask=ok)
        tl.store(out_ptr + n + offs, w1.to(tl.int64), mask=ok)
        tl.store(out_ptr + 2 * n + offs, w2.to(tl.int64), mask=ok)
        tl.store(out_ptr + 3 * n + offs, w3.to(tl.int64), mask=ok)

    n = 300
    for seed, base in ((0, 0), (42, 2**32 - 100), (2**40 + 5, 7), (2**62 - 1, 2**45 + 3)):
        out = torch.empty(4 * n, dtype=torch.int64, device=interpret)
        _rand_kernel[(triton.cdiv(n, 128),)](out, seed, base, n, BLOCK=128)
        want = torch.cat(R._philox.philox4x32(seed, base + torch.arange(n)))
        assert torch.equal(out.cpu() & 0xFFFFFFFF, want)
    assert torch.equal(R.philox_uint32(5, torch.arange(9)), R._philox.philox4x32(5, torch.arange(9))[0])


# ---------------------------------------------------------------- upcast

def test_upcast_is_closer_to_fp64():
    x, W, A, B = rnd(64, 96, requires_grad=False), rnd(80, 96), rnd(8, 96), rnd(80, 8)
    exact = R.lora(x, W, A, B, scaling=2.0)
    h = lambda t: t.to(torch.bfloat16)
    plain = R.lora(h(x), h(W), h(A), h(B), scaling=2.0)
    up = R.lora(h(x), h(W), h(A), h(B), scaling=2.0, upcast=True)
    assert up.dtype == torch.bfloat16
    assert (up.double() - exact).abs().max() <= (plain.double() - exact).abs().max()


# ---------------------------------------------------------------- bad input

def test_bad_lora_args():
    x, W, A, B = torch.randn(3, 7), torch.randn(6, 7), torch.randn(2, 7), torch.randn(6, 2)
    with pytest.raises(ValueError, match="x must have last dim 7"):
        R.lora(torch.randn(3, 8), W, A, B)
    with pytest.raises(ValueError, match="lora_B must have shape"):
        R.lora(x, W, A, torch.randn(6, 3))
    with pytest.raises(ValueError, match="rank r >= 1"):
        R.lora(x, W, torch.randn(0, 7), torch.randn(6, 0))
    with pytest.raises(ValueError, match="dropout_p"):
        R.lora(x, W, A, B, dropout_p=1.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        R.lora([1.0], W, A, B)
    with pytest.raises(TypeError, match="lora_A must have dtype"):
        R.lora(x, W, A.to(torch.int32), B)
    with pytest.raises(ValueError, match="bias must have shape"):
        R.lora(x, W, A, B, bias=torch.randn(5))
    with pytest.raises(ValueError, match="r must be a positive int"):
        R.lora_scaling(0, 8)


def test_bad_monarch_args():
    W = torch.randn(6, 8)
    with pytest.raises(ValueError, match="nblocks must be a positive int"):
        R.monarch_dims(8, 6, 0)
    with pytest.raises(ValueError, match="nblocks must be <= in_features"):
        R.monarch_dims(8, 6, 9)
    with pytest.raises(ValueError, match="W1 must have shape"):
        R.monarch(torch.randn(2, 8), W, torch.randn(4, 2, 3), torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="W2 must have shape"):
        R.monarch(torch.randn(2, 8), W, torch.randn(4, 2, 2), torch.randn(4, 5, 2))


def test_bad_sparse_args():
    crow, col, val = make_csr(5, 6, 0.5)
    W, x = torch.randn(5, 6, dtype=D), torch.randn(2, 6, dtype=D)
    bad = col.clone()
    bad[0] = 6
    with pytest.raises(ValueError, match="col indices must be in"):
        R.sparse(x, W, crow, bad, val)
    if col.numel() >= 2 and crow[-1] - crow[-2] >= 2:
        uns = col.clone()
        a, b = int(crow[-2]), int(crow[-2]) + 1
        uns[a], uns[b] = col[b], col[a]
        with pytest.raises(ValueError, match="strictly increasing"):
            R.sparse(x, W, crow, uns, val)
    with pytest.raises(ValueError, match="crow must have shape"):
        R.sparse(x, W, crow[:-1], col, val)
    with pytest.raises(TypeError, match="col must have dtype"):
        R.sparse(x, W, crow, col.float(), val)


def test_bad_lily_args():
    x, W, lp, hp, router = torch.randn(3, 7), torch.randn(5, 7), torch.randn(2, 7), torch.randn(4, 5, 2), torch.randn(4, 2)
    with pytest.raises(ValueError, match="routing must be one of"):
        R.lily(x, W, lp, router, hp, routing="global")
    with pytest.raises(ValueError, match="router must have shape"):
        R.lily(x, W, lp, router, hp, router_input="x")
    with pytest.raises(ValueError, match="hp must have shape"):
        R.lily(x, W, lp, router, torch.randn(4, 5, 3))


def test_native_cpu_mask_equals_torch_spec():
    """The C++ keep-mask (used on CPU when _C is built) is bit-identical to the torch spec."""
    from peft_kernels import _ext
    from peft_kernels.reference import _philox

    if _ext.native() is None:
        pytest.skip(f"native extension not built: {_ext.native_error()}")
    assert _philox.native_keep_mask_available()
    for rows, cols in ((1, 1), (3, 9), (37, 123), (5, 8), (16, 77)):
        for seed in (0, 7, 2**40 + 3, 2**62 - 1):
            for p in (1e-9, 0.05, 0.5, 1 - 1e-9):
                want = _philox.keep_mask_torch(seed, p, rows, cols)
                assert torch.equal(_philox.keep_mask(seed, p, rows, cols), want), (rows, cols, seed, p)
    t = torch.tensor([12345])
    assert torch.equal(_philox.keep_mask(t, 0.1, 4, 20), _philox.keep_mask_torch(12345, 0.1, 4, 20))
