"""SparseLinear (RoSA-style sparse delta, optionally with LoRA) and mask selection."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from helpers import assert_close_to_reference, grads, leaf
from peft_kernels import _ext
from peft_kernels.modules.masks import accumulate_scores, dense_to_csr, mask_nnz, select_mask
from peft_kernels.modules.sparse import SparseLinear
from peft_kernels.reference.lora import lora
from peft_kernels.reference.sparse import check_csr, sparse, sparse_adapter, sparse_delta_weight

HAS_CPP = _ext.native() is not None and hasattr(torch.ops.peft_kernels, "sparse_spmm")
IMPL = "cpp" if HAS_CPP else "torch"
D_IN, D_OUT = 123, 77


def _linear(bias=True, dtype=torch.float32):
    return nn.Linear(D_IN, D_OUT, bias=bias, dtype=dtype)


# ----------------------------------------------------------------------------------- mask selection
def test_select_mask_global_and_per_row_hand_checked():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.0],
                           [0.2, 0.3, 0.1, 0.4],
                           [0.7, 0.6, 0.5, 0.95]])
    # global top-4 of 12 (density 1/3): 0.95 (2,3), 0.9 (0,0), 0.8 (0,2), 0.7 (2,0)
    crow, col = select_mask((3, 4), scores, density=1 / 3, method="fisher")
    assert crow.tolist() == [0, 2, 2, 4] and col.tolist() == [0, 2, 0, 3]
    # per row, 2 of 4 (density 0.5): row0 {0,2}, row1 {1,3}, row2 {0,3}
    crow, col = select_mask((3, 4), scores, density=0.5, per_row=True, method="grad")
    assert crow.tolist() == [0, 2, 4, 6] and col.tolist() == [0, 2, 1, 3, 0, 3]
    # ties go to the lower flat index
    crow, col = select_mask((2, 2), torch.ones(2, 2), density=0.5)
    assert crow.tolist() == [0, 2, 2] and col.tolist() == [0, 1]


def test_select_mask_random_deterministic_exact_density():
    a = select_mask((D_OUT, D_IN), density=0.03, method="random", seed=5)
    b = select_mask((D_OUT, D_IN), density=0.03, method="random", seed=5)
    c = select_mask((D_OUT, D_IN), density=0.03, method="random", seed=6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[1], c[1])
    assert a[1].numel() == round(0.03 * D_OUT * D_IN) == mask_nnz((D_OUT, D_IN), 0.03)
    check_csr(a[0], a[1], torch.empty(a[1].numel()), (D_OUT, D_IN))  # sorted, duplicate-free, in range
    crow, col = select_mask((D_OUT, D_IN), density=0.05, per_row=True, method="random", seed=0)
    assert torch.equal(crow.diff(), torch.full((D_OUT,), round(0.05 * D_IN)))
    assert select_mask((5, 7), density=1e-9, method="random")[1].numel() == 1  # at least one entry


@pytest.mark.parametrize("kwargs,err", [
    (dict(density=0.0), ValueError), (dict(density=1.5), ValueError), (dict(density="0.1"), TypeError),
    (dict(method="fisher"), ValueError),  # no scores
    (dict(method="fisher", scores=torch.rand(3, 3)), ValueError),
    (dict(method="magnitude"), ValueError),
])
def test_select_mask_rejects_bad_arguments(kwargs, err):
    kwargs = {"density": 0.1, "method": "random", **kwargs}
    with pytest.raises(err):
        select_mask((4, 5), **kwargs)


@pytest.mark.parametrize("method", ["fisher", "grad"])
def test_accumulate_scores_equals_direct_computation(method):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [(torch.randn(4, 6), torch.randn(4, 3)) for _ in range(5)]

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    flags = [p.requires_grad for p in model.parameters()]
    model[0].bias.requires_grad_(False)  # restored as it was, too
    flags[1] = False
    scores = accumulate_scores(model, batches, loss_fn, method=method, n_samples=3)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert set(scores) == {"0", "2"}
    for name in ("0", "2"):
        want = torch.zeros_like(model.get_submodule(name).weight)
        for batch in batches[:3]:
            g, = torch.autograd.grad(loss_fn(model, batch), [model.get_submodule(name).weight])
            want += g.square() if method == "fisher" else g.abs()
        torch.testing.assert_close(scores[name], want / 3)
    # scores plug straight into select_mask / SparseLinear
    m = SparseLinear.from_linear(model[0], density=0.2, method=method, scores=scores["0"])
    assert m.nnz == round(0.2 * 30)


def test_accumulate_scores_targets_and_errors():
    model = nn.ModuleDict({"used": nn.Linear(4, 2), "unused": nn.Linear(4, 2)})
    batches = [torch.randn(3, 4) for _ in range(2)]

    def loss_fn(m, x):
        return m["used"](x).square().sum()

    assert set(accumulate_scores(model, batches, loss_fn, targets=["used"])) == {"used"}
    with pytest.warns(UserWarning, match="unused"):
        scores = accumulate_scores(model, batches, loss_fn, method="grad")
    assert scores["unused"].abs().sum() == 0 and scores["used"].abs().sum() > 0
    with pytest.raises(ValueError, match="targets not found"):
        accumulate_scores(model, batches, loss_fn, targets=["nope"])
    with pytest.raises(ValueError, match="method"):
        accumulate_scores(model, batches, loss_fn, method="random")
    with pytest.raises(ValueError, match="n_samples"):
        accumulate_scores(model, batches, loss_fn, n_samples=0)
    with pytest.raises(ValueError, match="nothing"):
        accumulate_scores(model, [], loss_fn)


# ----------------------------------------------------------------------------------- SparseLinear
def test_accumulate_scores_tied_weight_scored_once_for_every_name():
    """Two target linears sharing one weight: one hook per weight (a second hook found the gradient
    already dropped and crashed), and every name gets that weight's score."""
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    batches = [torch.randn(2, 4) for _ in range(3)]

    def loss_fn(m, x):
        return m(x).square().sum()

    scores = accumulate_scores(model, batches, loss_fn, n_samples=3)
    want = sum(torch.autograd.grad(loss_fn(model, x), [a.weight])[0].square() for x in batches) / 3
    torch.testing.assert_close(scores["0"], want)
    torch.testing.assert_close(scores["1"], want)
    assert scores["0"] is not scores["1"]  # separate tensors, as for unshared weights
    assert a.weight.grad is None


def test_accumulate_scores_consumes_exactly_n_samples_batches():
    it = iter([torch.randn(2, 4) for _ in range(5)])
    accumulate_scores(nn.Linear(4, 4), it, lambda m, x: m(x).sum(), n_samples=2)
    assert len(list(it)) == 3  # the third batch was pulled and dropped before


def test_fresh_module_is_base_and_protocol():
    lin = _linear()
    m = SparseLinear.from_linear(lin, density=0.05, seed=3, impl=IMPL)
    assert m.family == "sparse" and m.base_layer is lin
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    assert m.nnz == round(0.05 * D_OUT * D_IN) and m.values.abs().sum() == 0
    x = torch.randn(2, 9, D_IN)
    torch.testing.assert_close(m(x), lin(x))
    adapter = {k for k in m.state_dict() if not k.startswith("base_layer.")}
    assert adapter == {"crow", "col", "values"}
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["values"]
    assert "nnz=" in repr(m)
    m2 = SparseLinear.from_linear(_linear(), density=0.05, seed=3)
    assert torch.equal(m.col, m2.col)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rosa_sparse_plus_lora_matches_reference(dtype):
    lin = _linear(dtype=dtype)
    m = SparseLinear.from_linear(lin, density=0.05, lora_r=4, lora_alpha=8, lora_dropout=0.2, seed=1, impl=IMPL)
    with torch.no_grad():
        m.values.normal_()
        m.lora_B.weight.normal_()
    adapter = {k for k in m.state_dict() if not k.startswith("base_layer.")}
    assert adapter == {"crow", "col", "values", "lora_A.weight", "lora_B.weight"}
    x = torch.randn(3, 13, D_IN)
    dy = torch.randn(3, 13, D_OUT)
    m.train()
    torch.manual_seed(11)
    xx = leaf(x, dtype)
    y = m(xx)
    got = [y, *grads(y, [xx, m.values, m.lora_A.weight, m.lora_B.weight], dy.to(dtype))]
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # the module draws its dropout seed this way

    def reference(dt):
        rx, rv = leaf(x, dt), leaf(m.values, dt)
        ra, rb = leaf(m.lora_A.weight, dt), leaf(m.lora_B.weight, dt)
        W, b = lin.weight.to(dt), lin.bias.to(dt)
        out = lora(rx, W, ra, rb, b, m.scaling, 0.2, seed) + sparse_adapter(
            rx.reshape(-1, D_IN), m.crow, m.col, rv, D_OUT).reshape(3, 13, D_OUT)
        return [out, *grads(out, [rx, rv, ra, rb], dy.to(dt))]

    exact, same = reference(torch.float64), reference(dtype)
    for name, k, s, e in zip(("y", "dx", "dval", "dA", "dB"), got, same, exact):
        assert_close_to_reference(name, k, s, e)


def test_merge_round_trip():
    lin = _linear()
    w0 = lin.weight.detach().clone()
    m = SparseLinear.from_linear(lin, density=0.05, lora_r=2, impl=IMPL)
    with torch.no_grad():
        m.values.normal_()
        m.lora_B.weight.normal_()
    m.eval()
    x = torch.randn(7, D_IN)
    y = m(x)
    dense = sparse_delta_weight(m.crow, m.col, m.values.detach(), (D_OUT, D_IN))
    torch.testing.assert_close(m.delta_weight(), dense + m.scaling * m.lora_B.weight @ m.lora_A.weight)
    plain = m.to_linear()
    m.merge()
    assert m.merged
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), lin(x))
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning):
        m.merge()
    m.unmerge()
    torch.testing.assert_close(lin.weight, w0)
    torch.testing.assert_close(m(x), y)


def test_set_mask_while_merged_keeps_the_weight_right():
    """A merged module re-merges with the new mask: its output is the unmerged module's with that
    mask, and unmerging gives the original weight back (it used to subtract the new mask's delta
    from a weight merged with the old one)."""
    lin = _linear()
    w0 = lin.weight.detach().clone()
    m = SparseLinear.from_linear(lin, density=0.05, impl=IMPL)
    with torch.no_grad():
        m.values.normal_()
    m.eval()
    x = torch.randn(7, D_IN)
    new_mask = select_mask((D_OUT, D_IN), density=0.05, method="random", seed=5)
    m.merge()
    m.set_mask(new_mask)
    assert m.merged
    merged_out = m(x)
    m.unmerge()
    torch.testing.assert_close(lin.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged_out, m(x), rtol=1e-5, atol=1e-5)


def test_mask_argument_and_bad_masks_rejected():
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(D_OUT, D_IN, generator=g) < 0.05
    dense[0] = False
    dense[1] = True
    m = SparseLinear.from_linear(_linear(), mask=dense, impl=IMPL)
    crow, col = dense_to_csr(dense)
    assert torch.equal(m.crow, crow) and torch.equal(m.col, col)
    m2 = SparseLinear.from_linear(_linear(), mask=(crow.to(torch.int32), col.to(torch.int32)))
    assert torch.equal(m2.col, col)
    # adapter_config rebuilds the same shapes (the mask itself travels in the state dict)
    m3 = SparseLinear.from_linear(_linear(), **m.adapter_config())
    assert m3.col.shape == m.col.shape
    crow3 = crow.clone()
    crow3[-1] += 1
    bad = {
        "out-of-range column": (crow, torch.where(col == col.max(), D_IN, col)),
        "unsorted columns": (crow, torch.cat([col[: int(crow[1])], col[int(crow[1]):int(crow[2])].flip(0),
                                               col[int(crow[2]):]])),
        "crow not ending at nnz": (crow3, col),
        "duplicate column": (crow, torch.cat([col[: int(crow[1])], torch.zeros(D_IN, dtype=col.dtype),
                                               col[int(crow[2]):]])),
    }
    for what, mask in bad.items():
        with pytest.raises(ValueError):
            SparseLinear.from_linear(_linear(), mask=mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        SparseLinear.from_linear(_linear(), mask=dense[:, :-1])
    with pytest.raises(TypeError, match="mask must be"):
        SparseLinear.from_linear(_linear(), mask="everything")
    with pytest.raises(ValueError, match="at least one"):
        SparseLinear.from_linear(_linear(), mask=torch.zeros(D_OUT, D_IN, dtype=torch.bool))
    with pytest.raises(ValueError, match="density"):
        SparseLinear.from_linear(_linear(), density=0.0)
    with pytest.raises(ValueError, match="lora_r"):
        SparseLinear.from_linear(_linear(), lora_r=-1)
    lin = _linear()
    with pytest.raises(ValueError):
        SparseLinear.from_linear(lin, mask=bad["unsorted columns"])
    assert lin.weight.requires_grad  # a rejected mask leaves the caller's layer untouched


def test_state_dict_round_trip_rebuilds_cached_transpose():
    src = SparseLinear.from_linear(_linear(), density=0.04, seed=1, impl=IMPL)
    with torch.no_grad():
        src.values.normal_()
    cfg = {**src.adapter_config(), "seed": 99}  # same nnz, a different random mask
    dst = SparseLinear.from_linear(src.base_layer, **cfg, impl=IMPL)
    assert dst.col.shape == src.col.shape and not torch.equal(dst.col, src.col)
    x = torch.randn(5, D_IN, requires_grad=True)
    dst(x).sum().backward()  # builds dst's cached transpose for its own (different) mask
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("base_layer.")}
    dst.load_state_dict(state, strict=False)
    assert torch.equal(dst.col, src.col)
    xs, xd = leaf(x), leaf(x)
    ys, yd = src(xs), dst(xd)
    torch.testing.assert_close(yd, ys)
    gs = grads(ys, [xs, src.values], torch.ones_like(ys))
    gd = grads(yd, [xd, dst.values], torch.ones_like(yd))
    for a, b in zip(gs, gd):
        torch.testing.assert_close(b, a)
    want = sparse(x, src.base_layer.weight, src.crow, src.col, src.values, src.base_layer.bias)
    torch.testing.assert_close(ys, want)
    dst._adapter_state_loaded()  # the checkpoint loader's hook validates the mask


@pytest.mark.parametrize("corrupt", ["crow past nnz", "crow decreasing", "col out of range", "col unsorted"])
def test_load_state_dict_rejects_a_corrupt_mask(corrupt):
    """A corrupt checkpoint mask is refused at load time with a clear error (before, the rebuilt
    transpose indexed with it: out-of-bounds writes on CPU, an illegal address on a GPU)."""
    src = SparseLinear.from_linear(_linear(), density=0.04, seed=1, impl=IMPL)
    state = {k: v.clone() for k, v in src.state_dict().items() if not k.startswith("base_layer.")}
    crow, col = state["crow"], state["col"]
    if corrupt == "crow past nnz":
        crow[10] = 10**6
    elif corrupt == "crow decreasing":
        crow[5], crow[6] = crow[6] + 1, crow[5]
    elif corrupt == "col out of range":
        col[0] = D_IN
    else:
        row = int(((crow[1:] - crow[:-1]) >= 2).nonzero()[0])
        i = int(crow[row])
        col[i], col[i + 1] = col[i + 1].clone(), col[i].clone()
    dst = SparseLinear.from_linear(src.base_layer, **{**src.adapter_config(), "seed": 7}, impl=IMPL)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match="crow|col"):
        dst.load_state_dict(state, strict=False)
    # refused before anything was copied
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def test_load_state_dict_with_another_nnz_leaves_the_module_intact():
    """torch skips the mismatched col/values but copied crow (same size), and the post-load check
    then blamed crow: the module was left with the new crow and the old col/values."""
    src = SparseLinear.from_linear(_linear(), density=0.02, seed=1, impl=IMPL)
    dst = SparseLinear.from_linear(_linear(), density=0.04, seed=2, impl=IMPL)
    with torch.no_grad():
        dst.values.normal_()
    x = torch.randn(5, D_IN)
    y0 = dst(x)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=rf"col has shape \({src.nnz},\).*nnz={dst.nnz}"):
        dst.load_state_dict(src.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    torch.testing.assert_close(dst(x), y0)
    with pytest.raises(ValueError, match=rf"values has shape \({src.nnz},\).*nnz={dst.nnz}"):
        dst.load_state_dict({"values": src.values.detach()}, strict=False)
    with pytest.raises(ValueError, match=rf"crow must have shape \({D_OUT + 1},\)"):
        dst.load_state_dict({"crow": src.crow[:-1]}, strict=False)
    model = nn.Sequential(dst)
    with pytest.raises(ValueError, match=r"0\.col has shape"):  # names the full key
        model.load_state_dict(nn.Sequential(src).state_dict())
    # a module built with the checkpoint's mask loads it
    fit = SparseLinear.from_linear(_linear(), mask=(src.crow, src.col), impl=IMPL)
    fit.load_state_dict(src.state_dict())
    torch.testing.assert_close(fit(x), src(x))


def test_training_step_updates_only_values():
    m = SparseLinear.from_linear(_linear(), density=0.02, impl=IMPL)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, D_IN)
    w0 = m.base_layer.weight.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = m(x).square().mean()
        loss.backward()
    opt.step()
    assert m.values.abs().sum() > 0 and torch.equal(m.base_layer.weight, w0)
