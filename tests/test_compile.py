"""``torch.compile`` over an adapted model: same outputs and gradients as eager, no graph breaks
from the adapter wrapper.

CPU runs use the ``aot_eager`` backend (Dynamo + AOTAutograd: where graph breaks and fake-tensor
problems show up; Inductor's CPU codegen would take ~1 min per test on CI's 2 cores and tests nothing
of ours), on the torch reference path and, for single layers, on the Triton custom ops under the
interpreter. Dropout seeds are one-element tensors, so training with dropout is one graph too. The
GPU test compiles with Inductor over the Triton kernels.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_kernels.adapters import adapt

pytest.importorskip("peft_kernels.modules.lora")


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.up_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.down_proj(torch.nn.functional.gelu(self.up_proj(x)))


class TinyNet(nn.Module):
    """Two residual MLP blocks and a head: module paths ``layers.<i>.up_proj`` like a transformer."""

    def __init__(self, d: int = 23, h: int = 37, out: int = 5):
        super().__init__()
        self.layers = nn.ModuleList([Block(d, h) for _ in range(2)])
        self.head = nn.Linear(d, out)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def adapted_net(dropout: float, device="cpu"):
    torch.manual_seed(0)
    adapted = adapt(TinyNet().to(device), "lora", target_modules=["up_proj", "down_proj"], r=4, alpha=8.0,
                    dropout=dropout)
    with torch.no_grad():  # B starts at zero; make the adapter (and its dropout) matter
        for p in adapted.trainable_parameters():
            p.normal_(0, 0.3)
    return adapted.train()


def loss_and_grads(fn, adapted, x, seed: int = 1):
    torch.manual_seed(seed)  # the dropout seeds come from torch's CPU generator
    adapted.zero_grad(set_to_none=True)
    loss = fn(x).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapted.named_trainable_parameters()}


def graph_break_reasons() -> list[str]:
    from torch._dynamo.utils import counters

    return list(counters["graph_break"])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and counts only its own graph breaks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compile_fullgraph_matches_eager():
    """Without dropout the whole adapted model is one graph (``fullgraph=True`` would raise on a break)."""
    adapted = adapted_net(dropout=0.0)
    x = torch.randn(3, 7, 23)
    compiled = torch.compile(adapted, backend="aot_eager", fullgraph=True)
    loss_c, grads_c = loss_and_grads(compiled, adapted, x)
    loss_e, grads_e = loss_and_grads(adapted, adapted, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    assert grads_c.keys() == grads_e.keys() and len(grads_c) == 8
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-5, atol=1e-7, msg=n)


def test_compile_with_dropout_one_graph_matches_eager():
    """With dropout the modules draw their seed as a one-element CPU tensor (no ``.item()``), so the
    training-mode model is still one graph (``fullgraph=True``) and consumes the same seeds as eager."""
    adapted = adapted_net(dropout=0.25)
    x = torch.randn(3, 7, 23)
    compiled = torch.compile(adapted, backend="aot_eager", fullgraph=True)
    loss_c, grads_c = loss_and_grads(compiled, adapted, x)
    loss_e, grads_e = loss_and_grads(adapted, adapted, x)
    assert not graph_break_reasons(), graph_break_reasons()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-5, atol=1e-7, msg=n)
    # dropout is live: another seed changes the loss, compiled as in eager
    loss_other_c, _ = loss_and_grads(compiled, adapted, x, seed=2)
    loss_other, _ = loss_and_grads(adapted, adapted, x, seed=2)
    assert not torch.allclose(loss_other, loss_e)
    torch.testing.assert_close(loss_other_c, loss_other, rtol=1e-6, atol=1e-7)


def _dropout_layer(family: str, impl: str):
    """One adapted layer (awkward sizes: 3-D input, d_in = 29, d_out = 19) with dropout 0.1 in
    training mode, adapter weights randomised so the adapter (and its mask) matters."""
    from peft_kernels.modules.lora import LoRALinear
    from peft_kernels.modules.monarch import MonarchLinear

    torch.manual_seed(0)
    lin = nn.Linear(29, 19)
    if family == "lora":
        layer = LoRALinear.from_linear(lin, r=4, alpha=8.0, dropout=0.1, impl=impl)
    else:
        layer = MonarchLinear.from_linear(lin, nblocks=4, blk_r=4, dropout=0.1, impl=impl)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):
                p.normal_(0, 0.3)
    return layer.train()


def _layer_step(fn, layer, x, seed: int):
    torch.manual_seed(seed)  # the module draws its dropout seed from torch's CPU generator
    layer.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y = fn(xx)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))  # a fixed, non-trivial dY
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), xx.grad, grads


@pytest.mark.parametrize("family", ["lora", "monarch"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_compile_dropout_layer_fullgraph(request, family, impl):
    """An adapted LoRA / Monarch layer in training mode with dropout 0.1 compiles to one graph
    (``fullgraph=True`` raises on any break), forward and backward, on the torch path and on the
    Triton path (the custom ops, interpreted on CPU), and matches eager under the same seed."""
    if impl == "triton":
        request.getfixturevalue("interpret")
    layer = _dropout_layer(family, impl)
    x = torch.randn(2, 5, 29)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y_c, dx_c, g_c = _layer_step(compiled, layer, x, seed=3)
    y_e, dx_e, g_e = _layer_step(layer, layer, x, seed=3)
    assert not graph_break_reasons(), graph_break_reasons()
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_c, dx_e, rtol=1e-5, atol=1e-6)
    assert len(g_e) == 2 and g_c.keys() == g_e.keys()
    for n in g_e:
        torch.testing.assert_close(g_c[n], g_e[n], rtol=1e-5, atol=1e-6, msg=n)
    # the mask is live and follows the drawn seed: another seed gives another output, in both modes
    y_c2, _, _ = _layer_step(compiled, layer, x, seed=4)
    y_e2, _, _ = _layer_step(layer, layer, x, seed=4)
    assert not torch.allclose(y_e2, y_e)
    torch.testing.assert_close(y_c2, y_e2, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compile_inductor_gpu_llama(dtype):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=512)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", dtype)
    adapted = adapt(model, "lora", target_modules="all-linear", r=16, alpha=32.0)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.normal_(0, 0.02)
    ids = torch.randint(0, 512, (2, 128), device="cuda")

    def step(fn):
        adapted.zero_grad(set_to_none=True)
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float().clone() for n, p in adapted.named_trainable_parameters()}

    loss_c, grads_c = step(torch.compile(adapted))
    loss_e, grads_e = step(adapted)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(loss_c, loss_e, **tol)
    for n in grads_e:
        scale = grads_e[n].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(grads_c[n] / scale, grads_e[n] / scale, **tol, msg=n)


def test_compile_hf_llama_one_graph():
    """A real HF model: the adapted tiny Llama, in training mode with adapter dropout, compiles to a
    single graph, forward and backward (the dropout seeds are tensors: no ``.item()`` break)."""
    transformers = pytest.importorskip("transformers")
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64)
    adapted = adapt(transformers.LlamaForCausalLM(cfg), "lora", target_modules=["q_proj", "down_proj"], r=4,
                    alpha=8.0, dropout=0.1)
    adapted.train()
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(0, 64, (2, 7))
    compiled = torch.compile(adapted, backend="aot_eager")
    loss_c, grads_c = loss_and_grads(lambda i: compiled(input_ids=i, labels=i).loss, adapted, ids)
    loss_e, grads_e = loss_and_grads(lambda i: adapted(input_ids=i, labels=i).loss, adapted, ids)
    assert not graph_break_reasons(), graph_break_reasons()
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-5, atol=1e-7, msg=n)
