"""``ops._triton.EagerOp``: eager calls run the op's Python body without the dispatcher round trip;
tracing (a TorchDispatchMode, torch.compile) sees the registered op with its fake. And the host
helpers that replace triton's constexpr-function wrappers on the launch path."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peft_kernels.ops._triton import EagerOp, cdiv, custom_op, next_pow2

CALLS = {"body": 0, "fake": 0}


@custom_op("peft_kernels_test::twice_plus", mutates_args=())
def _twice_plus(x: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    CALLS["body"] += 1
    return x * 2 + c


@_twice_plus.register_fake
def _(x, c=1.0):
    CALLS["fake"] += 1
    return torch.empty_like(x)


class _Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_call_runs_the_body_directly():
    assert isinstance(_twice_plus, EagerOp) and _twice_plus.__name__ == "_twice_plus"
    x = torch.arange(4.0)
    before = dict(CALLS)
    with _Log() as outer_check:
        pass
    assert outer_check.ops == []
    got = _twice_plus(x, 0.5)
    torch.testing.assert_close(got, x * 2 + 0.5)
    assert CALLS["body"] == before["body"] + 1 and CALLS["fake"] == before["fake"]
    # the registered op is still there, same result
    torch.testing.assert_close(torch.ops.peft_kernels_test.twice_plus(x, 0.5), got)
    assert _twice_plus.default is torch.ops.peft_kernels_test.twice_plus.default


def test_dispatch_mode_sees_the_registered_op():
    x = torch.arange(3.0)
    with _Log() as log:
        y = _twice_plus(x)
    assert "peft_kernels_test.twice_plus.default" in log.ops
    torch.testing.assert_close(y, x * 2 + 1)


def test_compile_traces_the_op_through_its_fake():
    x = torch.randn(5)
    fakes = CALLS["fake"]
    fn = torch.compile(lambda t: _twice_plus(t, 3.0) + 1, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x), x * 2 + 4)
    assert CALLS["fake"] > fakes  # traced as the op, not inlined through the body


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 16, 17, 1000, 2**20 + 1])
def test_host_int_helpers_match_triton(n):
    triton = pytest.importorskip("triton")
    assert next_pow2(n) == triton.next_power_of_2(n)
    for d in (1, 3, 16, 64):
        assert cdiv(n, d) == triton.cdiv(n, d)


@custom_op("peft_kernels_test::add_into", mutates_args=("y",))
def _add_into(y: torch.Tensor, x: torch.Tensor) -> None:
    CALLS["body"] += 1
    y.add_(x)


@_add_into.register_fake
def _(y, x):
    return None


def test_direct_call_only_where_nothing_can_tell():
    """The registered op (not the body) where autograd must see the call (grad mode on, an input
    requiring grad) or a tensor subclass must dispatch it; mutated inputs get a version bump
    either way (autograd's saved-tensor check relies on it)."""
    x = torch.arange(3.0, requires_grad=True)
    with _Log() as log:
        pass
    assert _twice_plus._direct((x.detach(),), {})
    assert not _twice_plus._direct((x,), {})  # would need autograd: the op raises "no autograd formula"
    with torch.no_grad():
        assert _twice_plus._direct((x,), {})

    class Sub(torch.Tensor):
        pass

    assert not _twice_plus._direct((torch.zeros(2).as_subclass(Sub),), {})
    assert log.ops == []
    y = torch.zeros(3)
    v0 = y._version
    _add_into(y, torch.ones(3))
    assert y._version > v0 and torch.equal(y, torch.ones(3))
    v1 = y._version
    _add_into(y=y, x=torch.ones(3))
    assert y._version > v1 and torch.equal(y, 2 * torch.ones(3))
