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
