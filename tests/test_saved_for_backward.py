"""What each family's kernel path keeps for backward: the memory half of the issues' targets.

Issue 3 asks that nothing of size T x d_out be saved and that dropout masks be regenerated from
the seed, never stored; the other families share the claim (their per-token intermediates are
T x rank). A ``saved_tensors_hooks`` sees every tensor autograd keeps (all our Functions use
``save_for_backward``). Every saved tensor with a token dimension must be either the caller's x
itself (same storage, so a layer shared by q/k/v adds nothing) or rank-sized per token.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

T = 37  # prime: no weight or index dimension equals it, so "has a token dimension" is unambiguous
RANK_WIDTH = 32  # widest per-token intermediate below: Monarch's N*blk_r = 16, Lily's r + E


def _families():
    from peft_kernels.modules.adalora import AdaLoRALinear
    from peft_kernels.modules.lily import LilyLinear, MoELoRALinear
    from peft_kernels.modules.lora import LoRALinear
    from peft_kernels.modules.monarch import MonarchLinear
    from peft_kernels.modules.sparse import SparseLinear
    return {
        "lora": lambda lin: LoRALinear.from_linear(lin, r=4, dropout=0.2, impl="triton"),
        "adalora": lambda lin: AdaLoRALinear.from_linear(lin, r=4, dropout=0.2, impl="triton"),
        "monarch": lambda lin: MonarchLinear.from_linear(lin, nblocks=4, blk_r=4, dropout=0.2, impl="triton"),
        "lily-token": lambda lin: LilyLinear.from_linear(lin, r=4, num_experts=2, routing="token", impl="triton"),
        "lily-batch": lambda lin: LilyLinear.from_linear(lin, r=4, num_experts=2, routing="batch", impl="triton"),
        "moelora": lambda lin: MoELoRALinear.from_linear(lin, r=4, num_experts=2, impl="triton"),
        "sparse": lambda lin: SparseLinear.from_linear(lin, density=0.05, impl="triton"),
        "rosa": lambda lin: SparseLinear.from_linear(lin, density=0.05, lora_r=2, lora_dropout=0.2, impl="triton"),
    }


FAMILIES = ["lora", "adalora", "monarch", "lily-token", "lily-batch", "moelora", "sparse", "rosa"]


@pytest.mark.parametrize("d_in,d_out", [(48, 120), (120, 48)])
@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_token_sized_but_x_is_saved(interpret, family, d_in, d_out):
    torch.manual_seed(0)
    module = _families()[family](nn.Linear(d_in, d_out)).to(interpret).train()
    with torch.no_grad():  # adapters that start as the identity change still run every kernel
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    x = torch.randn(1, T, d_in, device=interpret, requires_grad=True)
    x_storage = x.untyped_storage().data_ptr()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    assert saved, "the forward saved nothing: the hook did not see the Function"
    x_copies = 0
    for t in saved:
        if T not in t.shape or t.untyped_storage().data_ptr() == x_storage:
            continue
        per_token = t.numel() // T
        if family in ("sparse", "rosa") and tuple(t.shape) == (d_in, T):
            # the sparse SDDMM reads x column-major: one transposed copy instead of x itself
            x_copies += 1
            continue
        assert per_token <= RANK_WIDTH, (
            f"{family} saved a {tuple(t.shape)} {t.dtype} tensor for backward: {per_token} values per "
            f"token, more than a rank-sized intermediate (d_in={d_in}, d_out={d_out})")
    assert x_copies <= 1
    # and the saved state is enough: backward runs and reaches x and every trainable parameter
    y.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{family}: no gradient for {name}"
