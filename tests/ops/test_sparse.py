"""Sparse adapter kernels (native C++/CUDA and Triton) vs the fp64 reference (GUIDE section 3)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_close_to_reference, grads, leaf
from peft_kernels import _ext, dispatch
from peft_kernels.ops import sparse as ops
from peft_kernels.reference.sparse import csr_rows, sparse, sparse_adapter, sparse_delta_weight

HAS_CPP = _ext.native() is not None and hasattr(torch.ops.peft_kernels, "sparse_spmm")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"peft_kernels._C sparse ops missing: {_ext.native_error()}")

T_SHAPE = (2, 19)  # 3-D input, 38 tokens
D_IN, D_OUT = 123, 77
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_mask(d_out, d_in, density, gen, index_dtype=torch.int64):
    """CSR of a random mask with an empty row (0), a fully dense row (1) and sorted columns."""
    dense = torch.rand(d_out, d_in, generator=gen) < density
    dense[0] = False
    if d_out > 1:
        dense[1] = True
    crow = torch.zeros(d_out + 1, dtype=torch.int64)
    crow[1:] = dense.sum(1).cumsum(0)
    col = dense.nonzero()[:, 1]
    return crow.to(index_dtype), col.to(index_dtype)


def _impl_device(request, impl):
    """The device an implementation runs on (skipping where it cannot)."""
    if impl == "cpp":
        if not HAS_CPP:
            pytest.skip(f"peft_kernels._C sparse ops missing: {_ext.native_error()}")
        return torch.device("cpu")
    if impl == "triton":
        return request.getfixturevalue("interpret")
    if not _ext.native_has_cuda():
        pytest.skip("peft_kernels._C was built without CUDA")
    return torch.device("cuda")


IMPLS = ["cpp", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]
assert 150 > 2 * max(ops.SPMM_BLOCK_T, ops.SDDMM_BLOCK_T)  # test_edge_masks spans several token tiles


def _check_linear(impl, device, dtype, use_bias, x_shape=(*T_SHAPE, D_IN), d_out=D_OUT, mask=None, density=0.1):
    d_in = x_shape[-1]
    g = torch.Generator().manual_seed(1)
    crow, col = mask if mask is not None else random_mask(d_out, d_in, density, g)
    nnz = col.shape[0]
    x = torch.randn(x_shape, generator=g)
    W = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    b = torch.randn(d_out, generator=g) if use_bias else None
    val = torch.randn(nnz, generator=g)
    dy = torch.randn(*x_shape[:-1], d_out, generator=g)
    crow, col = crow.to(device), col.to(device)

    def run(fn, dt, dev):
        xx, vv = leaf(x.to(dev), dt), leaf(val.to(dev), dt)
        bb = None if b is None else b.to(dev, dt)
        y = fn(xx, W.to(dev, dt), crow.to(dev), col.to(dev), vv, bb)
        return [y, *grads(y, [xx, vv], dy.to(dev, dt))]

    exact = run(lambda *a: sparse(*a), torch.float64, "cpu")
    same = run(lambda *a: sparse(*a), dtype, "cpu")
    got = run(lambda *a: ops.sparse_linear(*a, impl=impl), dtype, device)
    for name, k, s, e in zip(("y", "dx", "dval"), got, same, exact):
        assert k.dtype == dtype
        assert_close_to_reference(f"{impl}/{dtype}/{name}", k.cpu(), s, e)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,use_bias", [(torch.float32, True), (torch.float16, False), (torch.bfloat16, True)])
def test_sparse_linear_matches_reference(request, impl, dtype, use_bias):
    _check_linear(impl, _impl_device(request, impl), dtype, use_bias)


@pytest.mark.parametrize("impl", IMPLS)
def test_edge_masks(request, impl):
    """A single nnz in total; every row empty but one fully dense row; int32 indices; a single token;
    more tokens than one kernel tile (so the token-tile grids and loops run more than once)."""
    device = _impl_device(request, impl)
    d_out, d_in = 13, 29
    one = (torch.tensor([0] * 6 + [1] * 8), torch.tensor([17]))
    _check_linear(impl, device, torch.float32, False, x_shape=(1, d_in), d_out=d_out, mask=one)
    _check_linear(impl, device, torch.bfloat16, False, x_shape=(2, 75, d_in), d_out=d_out, mask=one)
    dense_row = torch.zeros(d_out + 1, dtype=torch.int32)
    dense_row[5:] = d_in
    _check_linear(impl, device, torch.float32, True, x_shape=(3, 67, d_in), d_out=d_out,
                  mask=(dense_row, torch.arange(d_in, dtype=torch.int32)))
    _check_linear(impl, device, torch.float16, True, x_shape=(150, d_in), d_out=d_out, density=0.3)


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_adapter_alone_and_cached_transpose(request, impl):
    device = _impl_device(request, impl)
    g = torch.Generator().manual_seed(2)
    crow, col = random_mask(D_OUT, D_IN, 0.05, g, torch.int32)
    crow, col = crow.to(device), col.to(device)
    x = torch.randn(3, 5, D_IN, generator=g)
    val = torch.randn(col.shape[0], generator=g)
    dy = torch.randn(3, 5, D_OUT, generator=g)

    def reference(dt):
        rx, rv = leaf(x, dt), leaf(val, dt)
        y = sparse_adapter(rx.reshape(-1, D_IN), crow.cpu(), col.cpu(), rv, D_OUT).reshape(3, 5, D_OUT)
        return [y, *grads(y, [rx, rv], dy.to(dt))]

    exact, same = reference(torch.float64), reference(torch.float32)
    csr_t = ops.csr_transpose(crow, col, D_IN)
    for kw in ({}, {"csr_t": csr_t}):
        xx, vv = leaf(x.to(device)), leaf(val.to(device))
        y = ops.sparse_adapter(xx, crow, col, vv, D_OUT, impl=impl, **kw)
        got_g = grads(y, [xx, vv], dy.to(device))
        for name, k, sd, e in zip(("y", "dx", "dval"), [y, *got_g], same, exact):
            assert_close_to_reference(f"{impl}/{name}", k.cpu(), sd, e)


def test_csr_transpose_is_the_transposed_mask():
    g = torch.Generator().manual_seed(3)
    crow, col = random_mask(D_OUT, D_IN, 0.1, g)
    val = torch.randn(col.shape[0], generator=g)
    crow_t, row_t, perm = ops.csr_transpose(crow, col, D_IN)
    dense = sparse_delta_weight(crow, col, val, (D_OUT, D_IN))
    dense_t = sparse_delta_weight(crow_t, row_t, val[perm], (D_IN, D_OUT))  # validates sorted/unique too
    assert torch.equal(dense_t, dense.t())


def test_no_dense_weight_sized_tensor_in_a_training_step(request):
    """Forward + backward allocate nothing of d_out * d_in elements (a dense gradient or delta)."""
    impls = [i for i in ("cpp", "triton") if i != "cpp" or HAS_CPP]
    g = torch.Generator().manual_seed(4)
    crow, col = random_mask(D_OUT, D_IN, 0.05, g)
    W = torch.randn(D_OUT, D_IN, generator=g)
    csr_t = ops.csr_transpose(crow, col, D_IN)
    limit = D_OUT * D_IN
    assert 37 * max(D_IN, D_OUT) < limit  # so the token-sized tensors cannot trip the check

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                for t in (out if isinstance(out, (tuple, list)) else [out]):
                    if isinstance(t, torch.Tensor) and t.numel() >= limit:
                        self.big.append((str(func), tuple(t.shape)))
            return out

    for impl in impls:
        dev = request.getfixturevalue("interpret") if impl == "triton" else torch.device("cpu")
        x = torch.randn(37, D_IN, device=dev, requires_grad=True)
        val = torch.randn(col.shape[0], device=dev, requires_grad=True)
        mask = [t.to(dev) for t in (crow, col)]
        cached = tuple(t.to(dev) for t in csr_t)
        with Watch() as w:
            y = ops.sparse_linear(x, W.to(dev), *mask, val, impl=impl, csr_t=cached)
            y.square().sum().backward()
        assert x.grad is not None and val.grad is not None
        assert not w.big, f"{impl}: dense-sized tensors allocated: {w.big}"


@needs_cpp
def test_cpu_default_is_cpp(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.choose("sparse", torch.device("cpu"), torch.bfloat16) == "cpp"
    assert dispatch.choose("sparse", torch.device("cpu"), torch.float64) == "torch"


@needs_cpp
def test_native_ops_opcheck_and_compile():
    g = torch.Generator().manual_seed(5)
    crow, col = random_mask(D_OUT, D_IN, 0.1, g)
    x = torch.randn(37, D_IN, generator=g)
    val = torch.randn(col.shape[0], generator=g)
    dy = torch.randn(37, D_OUT, generator=g)
    torch.library.opcheck(torch.ops.peft_kernels.sparse_spmm.default, (x, crow, col, val, D_OUT))
    torch.library.opcheck(torch.ops.peft_kernels.sparse_sddmm.default, (dy, x, crow, col))
    # the whole autograd path traces without graph breaks (fake kernels registered)
    f = torch.compile(lambda a, v: ops.sparse_adapter(a, crow, col, v, D_OUT, impl="cpp"), backend="aot_eager",
                      fullgraph=True)
    xx, vv = leaf(x), leaf(val)
    y = f(xx, vv)
    gx, gv = grads(y, [xx, vv], dy)
    rx, rv = leaf(x), leaf(val)
    ry = sparse_adapter(rx, crow, col, rv, D_OUT)
    ex, ev = grads(ry, [rx, rv], dy)
    for name, k, e in (("y", y, ry), ("dx", gx, ex), ("dval", gv, ev)):
        assert_close_to_reference(name, k, e, e)


def test_triton_ops_opcheck(interpret):
    g = torch.Generator().manual_seed(6)
    crow, col = random_mask(11, 17, 0.3, g)
    x = torch.randn(9, 17, generator=g).to(interpret)
    val = torch.randn(col.shape[0], generator=g).to(interpret)
    dy = torch.randn(9, 11, generator=g).to(interpret)
    crow, col = crow.to(interpret), col.to(interpret)
    torch.library.opcheck(torch.ops.peft_kernels.sparse_spmm_triton.default, (x, crow, col, val, 11),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.peft_kernels.sparse_sddmm_triton.default, (dy, x, crow, col),
                          test_utils=("test_schema", "test_faketensor"))
    rows = csr_rows(crow)
    assert torch.allclose(torch.ops.peft_kernels.sparse_sddmm_triton(dy, x, crow, col),
                          (dy[:, rows] * x[:, col]).sum(0), atol=1e-5)


def test_bad_arguments_raise_before_launch():
    g = torch.Generator().manual_seed(7)
    crow, col = random_mask(D_OUT, D_IN, 0.1, g)
    nnz = col.shape[0]
    x, val, W = torch.randn(5, D_IN), torch.randn(nnz), torch.randn(D_OUT, D_IN)
    with pytest.raises(ValueError, match="val must have shape"):
        ops.sparse_adapter(x, crow, col, torch.randn(nnz + 1), D_OUT)
    with pytest.raises(ValueError, match="crow must have shape"):
        ops.sparse_adapter(x, crow, col, val, D_OUT + 1)
    with pytest.raises(TypeError, match="col must have dtype"):
        ops.sparse_adapter(x, crow, col.float(), val, D_OUT)
    with pytest.raises(ValueError, match="x must have last dim"):
        ops.sparse_linear(torch.randn(5, D_IN + 1), W, crow, col, val)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.sparse_linear(x, W, crow, col, val, bias=torch.randn(D_OUT + 1))
    with pytest.raises(ValueError, match="out_features"):
        ops.sparse_adapter(x, crow, col, val, -1)
    with pytest.raises(TypeError, match="csr_t"):
        ops.sparse_adapter(x, crow, col, val, D_OUT, impl="cpp" if HAS_CPP else "torch", csr_t=(crow,))
    if HAS_CPP:
        # the native kernel's own last line of defence (no Python check reads index values per call)
        with pytest.raises(RuntimeError, match="out of range"):
            torch.ops.peft_kernels.sparse_spmm(x, crow, torch.full_like(col, D_IN), val, D_OUT)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_larger_shapes_on_gpu(request, impl, dtype):
    """Many row/token tiles and rows of uneven length at a realistic density."""
    _check_linear(impl, _impl_device(request, impl), dtype, True, x_shape=(4, 251, 1031), d_out=769, density=0.02)


@pytest.mark.gpu
def test_cuda_spmm_beyond_one_launch_of_token_tiles(request):
    """More than 65535 token tiles (CUDA's grid-axis-y cap, ~2.1 M tokens): the native SpMM splits
    the launch; rows on both sides of the split match the fp32 torch product."""
    device = _impl_device(request, "cuda")
    T = 65535 * 32 + 77
    g = torch.Generator().manual_seed(3)
    crow, col = random_mask(40, 8, 0.3, g)
    val = torch.randn(col.shape[0], generator=g)
    dense = torch.zeros(40, 8)
    rows = torch.repeat_interleave(torch.arange(40), crow[1:] - crow[:-1])
    dense[rows, col] = val
    x = torch.randn(T, 8, generator=g).to(device, torch.bfloat16)
    y = torch.ops.peft_kernels.sparse_spmm(x, crow.to(device), col.to(device), val.to(device), 40)
    want = x.float() @ dense.to(device).t()
    for sl in (slice(0, 64), slice(65535 * 32 - 64, 65535 * 32 + 77)):
        torch.testing.assert_close(y[sl].float(), want[sl], rtol=1e-2, atol=1e-2)
    y2 = torch.zeros_like(y)
    torch.ops.peft_kernels.sparse_spmm_add_(y2, x, crow.to(device), col.to(device), val.to(device))
    assert torch.equal(y2[-77:], y[-77:])


def test_triton_launches_guarded_and_grid_within_cuda_limits(interpret, monkeypatch):
    """Every launch runs under ``torch.cuda.device(x.device)`` (Triton launches on the current
    device), and no grid axis but 0 grows with T: CUDA caps axes 1/2 at 65535, which the
    interpreter does not. The huge-T launch is only recorded, never run."""
    from launch_spy import spy_launches

    g = torch.Generator().manual_seed(8)
    crow, col = random_mask(11, 17, 0.3, g)
    x = torch.randn(9, 17, generator=g).to(interpret).requires_grad_()
    val = torch.randn(col.shape[0], generator=g).to(interpret).requires_grad_()
    crow, col = crow.to(interpret), col.to(interpret)
    log = spy_launches(monkeypatch, ops, "_device_guard")
    y = ops.sparse_adapter(x, crow, col, val, 11, impl="triton")
    grads(y, [x, val], torch.randn_like(y))
    assert {name for name, *_ in log.launches} == {"_spmm_kernel", "_sddmm_kernel"}
    log.assert_guarded(x.device)
    log.assert_grid_within_cuda_limits()

    big = spy_launches(monkeypatch, ops, "_device_guard", run=False)
    T = 65536 * ops.SPMM_BLOCK_T + 1  # one more token tile than CUDA's axis-1 limit
    xb = torch.zeros(T, 1, device=interpret)
    crow1 = torch.tensor([0, 1], device=interpret)
    col1 = torch.tensor([0], device=interpret)
    torch.ops.peft_kernels.sparse_spmm_triton(xb, crow1, col1, torch.ones(1, device=interpret), 1)
    torch.ops.peft_kernels.sparse_sddmm_triton(xb, xb, crow1, col1)
    assert len(big.launches) == 2
    big.assert_grid_within_cuda_limits()


def test_triton_ops_accept_strided_index_tensors(interpret):
    """crow/col are indexed densely by the kernels; the ops make strided views dense first."""
    g = torch.Generator().manual_seed(9)
    crow, col = random_mask(11, 17, 0.3, g)
    x = torch.randn(9, 17, generator=g).to(interpret)
    val = torch.randn(col.shape[0], generator=g).to(interpret)
    dy = torch.randn(9, 11, generator=g).to(interpret)
    crow, col = crow.to(interpret), col.to(interpret)
    crow_s = torch.stack([crow, torch.full_like(crow, -1)], 1)[:, 0]  # stride 2
    col_s = torch.stack([col, torch.full_like(col, -1)], 1)[:, 0]
    assert not crow_s.is_contiguous() and not col_s.is_contiguous()
    spmm, sddmm = torch.ops.peft_kernels.sparse_spmm_triton, torch.ops.peft_kernels.sparse_sddmm_triton
    torch.testing.assert_close(spmm(x, crow_s, col_s, val, 11), spmm(x, crow, col, val, 11), rtol=0, atol=0)
    torch.testing.assert_close(sddmm(dy, x, crow_s, col_s), sddmm(dy, x, crow, col), rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["cpp", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spmm_add_accumulates_in_place(request, impl, dtype):
    """``y += x @ (M⊙S)^T`` in place (what sparse_linear runs on the frozen product's output and on
    dY @ W0): the same storage comes back holding the fp32 sum rounded once; schema/fake checked."""
    dev = _impl_device(request, impl)
    g = torch.Generator().manual_seed(8)
    crow, col = random_mask(D_OUT, D_IN, 0.1, g)
    x = torch.randn(37, D_IN, generator=g)
    val = torch.randn(col.shape[0], generator=g)
    y0 = torch.randn(37, D_OUT, generator=g)
    exact = y0.double() + sparse_adapter(x.double(), crow, col, val.double(), D_OUT)
    same = y0.to(dtype) + sparse_adapter(x.to(dtype), crow, col, val.to(dtype), D_OUT)
    op = ops._spmm_add(impl)
    y = y0.to(dev, dtype)
    ptr = y.data_ptr()
    args = (x.to(dev, dtype), crow.to(dev), col.to(dev), val.to(dev))
    assert op(y, *args) is None
    assert y.data_ptr() == ptr
    assert_close_to_reference(f"{impl}/{dtype}/y+=", y.cpu(), same, exact)
    utils = ("test_schema", "test_faketensor") if impl == "triton" else ("test_schema", "test_faketensor",
                                                                         "test_autograd_registration")
    torch.library.opcheck(op.default, (y0.to(dev, dtype), *args), test_utils=utils)


@needs_cpp
def test_sparse_linear_weight_bias_grads_and_compile():
    """The fused SparseLinearFunction also gives W0 and bias gradients when they require them, and
    traces whole (fwd + bwd, in-place adds included) under torch.compile."""
    g = torch.Generator().manual_seed(9)
    crow, col = random_mask(D_OUT, D_IN, 0.1, g)
    x, W = torch.randn(*T_SHAPE, D_IN, generator=g), torch.randn(D_OUT, D_IN, generator=g) / D_IN**0.5
    b, val = torch.randn(D_OUT, generator=g), torch.randn(col.shape[0], generator=g)
    dy = torch.randn(*T_SHAPE, D_OUT, generator=g)

    def run(fn, dt):
        ts = [leaf(t, dt) for t in (x, W, b, val)]
        y = fn(ts[0], ts[1], crow, col, ts[3], ts[2])
        return [y, *grads(y, ts, dy.to(dt))]

    exact = run(sparse, torch.float64)
    same = run(sparse, torch.float32)
    got = run(lambda *a: ops.sparse_linear(*a, impl="cpp"), torch.float32)
    comp = run(torch.compile(lambda *a: ops.sparse_linear(*a, impl="cpp"), backend="aot_eager", fullgraph=True),
               torch.float32)
    for name, k, c, s, e in zip(("y", "dx", "dW", "db", "dval"), got, comp, same, exact):
        assert_close_to_reference(name, k, s, e)
        torch.testing.assert_close(c, k, rtol=0, atol=0)


@pytest.mark.parametrize("impl,dtype,p,use_bias,base", [
    ("cpp", torch.float32, 0.3, True, "triton"),
    ("triton", torch.bfloat16, 0.0, False, "cublas"),
    ("cpp", torch.float16, 0.2, False, "cublas"),
    pytest.param("cuda", torch.bfloat16, 0.1, True, "auto", marks=pytest.mark.gpu),
])
def test_rosa_fused_matches_reference(request, monkeypatch, impl, dtype, p, use_bias, base):
    """RoSA (W0 + M⊙S + s B A) in one Function (LoRA on its Triton kernels, the sparse part added in
    place) against the fp64 composition of the two references: output and every gradient."""
    from peft_kernels.reference import lora as lora_reference

    calls = []
    fused_apply = ops.RoSAFunction.apply
    monkeypatch.setattr(ops.RoSAFunction, "apply", lambda *a: calls.append(1) or fused_apply(*a))

    dev = _impl_device(request, impl)
    if dev.type == "cpu":
        dev = request.getfixturevalue("interpret")  # the LoRA kernels run under the interpreter
    g = torch.Generator().manual_seed(10)
    crow, col = random_mask(D_OUT, D_IN, 0.1, g)
    r, s, seed = 5, 1.7, 321
    x = torch.randn(*T_SHAPE, D_IN, generator=g)
    W = torch.randn(D_OUT, D_IN, generator=g) / D_IN**0.5
    A, B = torch.randn(r, D_IN, generator=g) / D_IN**0.5, torch.randn(D_OUT, r, generator=g) / r**0.5
    b = torch.randn(D_OUT, generator=g) if use_bias else None
    val = torch.randn(col.shape[0], generator=g)
    dy = torch.randn(*T_SHAPE, D_OUT, generator=g)

    def ref(x, W, A, B, val, b):
        return lora_reference(x, W, A, B, b, s, p, seed) + ops.sparse_adapter(x, crow, col, val, D_OUT, impl="torch")

    def run(fn, dt, d):
        ts = [leaf(t.to(d), dt) for t in (x, A, B, val)]
        bb = None if b is None else leaf(b.to(d), dt)
        y = fn(ts[0], W.to(d, dt), ts[1], ts[2], ts[3], bb)
        return [y, *grads(y, ts + [bb], dy.to(d, dt))]

    exact = run(ref, torch.float64, "cpu")
    same = run(ref, dtype, "cpu")
    cr, cc = crow.to(dev), col.to(dev)
    got = run(lambda x, W, A, B, val, b: ops.rosa_linear(x, W, cr, cc, val, A, B, b, s, p, seed, impl=impl,
                                                         lora_impl="triton", base=base), dtype, dev)
    assert calls == [1]  # the fused Function ran, not the composition
    for name, k, sm, e in zip(("y", "dx", "dA", "dB", "dval", "dbias"), got, same, exact):
        if e is None:
            assert k is None, name
            continue
        assert k.dtype == dtype, name
        assert_close_to_reference(f"{impl}/{dtype}/{name}", k.cpu(), sm, e)


def test_rosa_falls_back_to_the_composition_on_the_torch_path():
    """Where the LoRA family has no kernel (CPU without the interpreter), rosa_linear is exactly
    lora_linear + sparse_adapter."""
    from peft_kernels.ops.lora import lora_linear

    g = torch.Generator().manual_seed(11)
    crow, col = random_mask(D_OUT, D_IN, 0.1, g)
    x, W = torch.randn(7, D_IN, generator=g), torch.randn(D_OUT, D_IN, generator=g)
    A, B, val = torch.randn(3, D_IN, generator=g), torch.randn(D_OUT, 3, generator=g), torch.randn(col.shape[0])
    got = ops.rosa_linear(x, W, crow, col, val, A, B, None, 0.5, 0.2, 9, lora_impl="torch")
    want = lora_linear(x, W, A, B, None, 0.5, 0.2, 9, impl="torch") + ops.sparse_adapter(x, crow, col, val, D_OUT)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="lora_A"):
        ops.rosa_linear(x, W, crow, col, val, A[:, :5], B, lora_impl="torch")


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_sparse_linear_under_autocast(request, impl):
    """fp32 inputs under bf16 autocast: the base GEMM and the in-place adapter run in bf16 (as
    F.linear would), the output is bf16 and the fp32 leaves get fp32 gradients."""
    dev = _impl_device(request, impl)
    g = torch.Generator().manual_seed(12)
    crow, col = random_mask(D_OUT, D_IN, 0.1, g)
    x, W = torch.randn(*T_SHAPE, D_IN, generator=g), torch.randn(D_OUT, D_IN, generator=g) / D_IN**0.5
    b, val = torch.randn(D_OUT, generator=g), torch.randn(col.shape[0], generator=g)
    dy = torch.randn(*T_SHAPE, D_OUT, generator=g)

    def run(fn, dt, d, autocast):
        xx, vv = leaf(x.to(d), dt), leaf(val.to(d), dt)
        with torch.autocast(d.type if isinstance(d, torch.device) else d, dtype=torch.bfloat16, enabled=autocast):
            y = fn(xx, W.to(d, dt), crow.to(d), col.to(d), vv, b.to(d, dt))
        return [y, *grads(y, [xx, vv], dy.to(d, y.dtype))]

    exact = run(sparse, torch.float64, "cpu", False)
    same = run(sparse, torch.bfloat16, "cpu", False)
    got = run(lambda *a: ops.sparse_linear(*a, impl=impl), torch.float32, dev, True)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for name, k, s, e in zip(("y", "dx", "dval"), got, same, exact):
        assert_close_to_reference(f"{impl}/autocast/{name}", k.cpu().to(s.dtype), s, e)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_rosa_under_autocast_runs_fused_in_bf16(request, monkeypatch, impl):
    """fp32 inputs and adapters under bf16 autocast: RoSA still runs its fused Function, in bf16 (as
    F.linear would), returns bf16 and gives the fp32 leaves fp32 gradients."""
    from peft_kernels.reference import lora as lora_reference

    calls = []
    fused_apply = ops.RoSAFunction.apply
    monkeypatch.setattr(ops.RoSAFunction, "apply", lambda *a: calls.append(a[0].dtype) or fused_apply(*a))
    dev = _impl_device(request, impl)
    if dev.type == "cpu":
        dev = request.getfixturevalue("interpret")
    g = torch.Generator().manual_seed(13)
    crow, col = random_mask(D_OUT, D_IN, 0.1, g)
    r, s, p, seed = 4, 2.0, 0.1, 5
    x, W = torch.randn(*T_SHAPE, D_IN, generator=g), torch.randn(D_OUT, D_IN, generator=g) / D_IN**0.5
    A, B = torch.randn(r, D_IN, generator=g) / D_IN**0.5, torch.randn(D_OUT, r, generator=g) / r**0.5
    b, val = torch.randn(D_OUT, generator=g), torch.randn(col.shape[0], generator=g)
    dy = torch.randn(*T_SHAPE, D_OUT, generator=g)

    def ref(x, W, A, B, val, b):
        return lora_reference(x, W, A, B, b, s, p, seed) + ops.sparse_adapter(x, crow, col, val, D_OUT, impl="torch")

    def run(fn, dt, d, autocast):
        ts = [leaf(t.to(d), dt) for t in (x, A, B, val)]
        with torch.autocast(d.type if isinstance(d, torch.device) else d, dtype=torch.bfloat16, enabled=autocast):
            y = fn(ts[0], W.to(d, dt), ts[1], ts[2], ts[3], b.to(d, dt))
        return [y, *grads(y, ts, dy.to(d, y.dtype))]

    exact = run(ref, torch.float64, "cpu", False)
    same = run(ref, torch.bfloat16, "cpu", False)
    cr, cc = crow.to(dev), col.to(dev)
    got = run(lambda x, W, A, B, val, b: ops.rosa_linear(x, W, cr, cc, val, A, B, b, s, p, seed, impl=impl,
                                                         lora_impl="triton"), torch.float32, dev, True)
    assert calls == [torch.bfloat16]
    assert got[0].dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in got[1:])
    for name, k, sm, e in zip(("y", "dx", "dA", "dB", "dval"), got, same, exact):
        assert_close_to_reference(f"{impl}/autocast/{name}", k.cpu().to(sm.dtype), sm, e)


def test_cuda_or_triton_is_measured(interpret, monkeypatch):
    """Where dispatch picks the native CUDA ops and the Triton ones can run too, the first call per
    key times both (the forward SpMM-add and the SDDMM on the call's operands) and keeps the faster;
    a forced implementation, or any other choice, is never second-guessed. Timed here with a stand-in
    timer that runs every callable once (the native ops run on CPU tensors through the same schema)."""
    monkeypatch.setattr(ops, "_IMPL_CHOICE", {})
    monkeypatch.setattr(ops, "_IMPL_TIMES", {})
    g = torch.Generator().manual_seed(14)
    crow, col = random_mask(D_OUT, D_IN, 0.1, g)
    x2 = torch.randn(37, D_IN, generator=g).to(interpret)
    val = torch.randn(col.shape[0], generator=g)
    crow, col, val = crow.to(interpret), col.to(interpret), val.to(interpret)
    ran = []

    def timer(fns):
        for name, fn in fns.items():
            fn()
            ran.append(name)
        return {"cuda": 2.0, "triton": 1.0}

    def no_timer(fns):
        raise AssertionError("timed again")

    if not ops._native_ops_loaded():
        pytest.skip("native extension not built")
    assert ops.measured_impl("cuda", False, x2, crow, col, val, D_OUT, timer=timer) == "triton"
    assert sorted(ran) == ["cuda", "triton"]
    assert ops.measured_impl("cuda", False, x2, crow, col, val, D_OUT, timer=no_timer) == "triton"  # cached
    assert ops.measured_impl("cuda", True, x2[:5], crow, col, val, D_OUT, timer=no_timer) == "cuda"  # forced
    assert ops.measured_impl("cpp", False, x2[:5], crow, col, val, D_OUT, timer=no_timer) == "cpp"
    (d,) = ops.impl_decisions()
    assert d["choice"] == "triton" and d["cuda_ms"] == 2.0 and d["d_in"] == D_IN and d["d_out"] == D_OUT


def test_measured_impl_stands_aside(interpret, monkeypatch):
    """No timing while torch.compile traces (the static order) or in deterministic mode (a timing
    decision may differ between processes, and the two SDDMMs sum in different orders)."""
    monkeypatch.setattr(ops, "_IMPL_CHOICE", {})
    monkeypatch.setattr(ops, "_IMPL_TIMES", {})
    g = torch.Generator().manual_seed(15)
    crow, col = random_mask(D_OUT, D_IN, 0.1, g)
    x2, val = torch.randn(9, D_IN, generator=g), torch.randn(col.shape[0], generator=g)

    def no_timer(fns):
        raise AssertionError("timed")

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ops.measured_impl("cuda", False, x2, crow, col, val, D_OUT, timer=no_timer) == "cuda"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    torch.use_deterministic_algorithms(True)
    try:
        assert ops.measured_impl("cuda", False, x2, crow, col, val, D_OUT, timer=no_timer) == "cuda"
    finally:
        torch.use_deterministic_algorithms(False)
    assert ops.impl_decisions() == []


@pytest.mark.gpu
def test_sparse_linear_measures_cuda_against_triton_gpu(monkeypatch):
    """On a GPU with the native ops built, an unforced call times both implementations once, keeps
    the faster, and computes the reference's result either way."""
    if not ops._native_ops_loaded() or not _ext.native_has_cuda():
        pytest.skip("native CUDA ops not built")
    monkeypatch.setattr(ops, "_IMPL_CHOICE", {})
    monkeypatch.setattr(ops, "_IMPL_TIMES", {})
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(16)
    d_in, d_out = 1031, 2051
    crow, col = random_mask(d_out, d_in, 0.01, g)
    x = torch.randn(1000, d_in, generator=g)
    W = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    val = torch.randn(col.shape[0], generator=g)
    dy = torch.randn(1000, d_out, generator=g)

    def run(fn, dt, d):
        xx, vv = leaf(x.to(d), dt), leaf(val.to(d), dt)
        y = fn(xx, W.to(d, dt), crow.to(d), col.to(d), vv)
        return [y, *grads(y, [xx, vv], dy.to(d, dt))]

    got = run(lambda *a: ops.sparse_linear(*a), torch.bfloat16, dev)
    (d,) = ops.impl_decisions()
    assert d["choice"] in ("cuda", "triton") and d["cuda_ms"] > 0 and d["triton_ms"] > 0
    same, exact = run(sparse, torch.bfloat16, "cpu"), run(sparse, torch.float64, "cpu")
    for name, k, s_, e in zip(("y", "dx", "dval"), got, same, exact):
        assert_close_to_reference(f"measured/{name}", k.cpu(), s_, e)


def test_raw_triton_ops_check_devices(interpret, monkeypatch):
    """Called through ``torch.ops`` directly (no public wrapper), the Triton ops check that every
    operand is on one device (a CPU index array handed to a GPU kernel would be read as a device
    pointer): each op passes all its tensors to the check, which refuses mixed devices."""
    with pytest.raises(ValueError, match="same device"):
        ops._check_raw(x=torch.zeros(1), crow=torch.zeros(1, device="meta"))
    seen = []
    monkeypatch.setattr(ops, "_check_raw", lambda **t: seen.append(sorted(t)))
    g = torch.Generator().manual_seed(17)
    crow, col = random_mask(D_OUT, D_IN, 0.1, g)
    x, val = torch.randn(3, D_IN, generator=g), torch.randn(col.shape[0], generator=g)
    x, crow, col, val = (t.to(interpret) for t in (x, crow, col, val))
    torch.ops.peft_kernels.sparse_spmm_triton(x, crow, col, val, D_OUT)
    torch.ops.peft_kernels.sparse_sddmm_triton(torch.randn(3, D_OUT, device=x.device), x, crow, col)
    torch.ops.peft_kernels.sparse_spmm_add_triton(torch.zeros(3, D_OUT, device=x.device), x, crow, col, val)
    assert seen == [["col", "crow", "val", "x"], ["col", "crow", "dy", "x"], ["col", "crow", "val", "x", "y"]]
