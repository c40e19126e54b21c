"""An adapted model trains under DDP and FSDP2 (``fully_shard``): 2 CPU processes with gloo via
``torchrun``; the adapter gradients of every step and the final adapter weights must agree with one
process training on the whole batch. The worker is ``tests/_dist_worker.py``.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("peft_kernels.modules.lora")
pytest.importorskip("peft_kernels.modules.lily")

import _dist_worker as worker  # noqa: E402  (tests/ is on sys.path via conftest)
from helpers import run_torchrun  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "_dist_worker.py"), str(out)]
    run_torchrun(cmd, env, r"_dist_worker|peft_kernels/[\w/]+")
    return out, torch.load(out / "results.pt")


RUNS = [(mode, case) for mode in ("ddp", "fsdp") for case in worker.CASES]
if "lora_shared_head" in worker.CASES:
    RUNS.append(("fsdplayer", "lora_shared_head"))  # FSDP2 with one unit per adapted layer


@pytest.mark.parametrize("mode, case", RUNS)
def test_distributed_matches_single_process(dist_results, mode, case):
    out, results = dist_results
    got = results[f"{mode}_{case}"]
    want = worker.train_single(case)
    assert len(got["grads"]) == len(want["grads"]) == worker.STEPS
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"])):
        assert g.keys() == w.keys() and g, f"step {step}: parameter names differ"
        for name in w:
            assert w[name].abs().max() > 0, f"{name}: zero gradient makes the comparison meaningless"
            torch.testing.assert_close(g[name], w[name], rtol=1e-4, atol=1e-6, msg=f"{mode} step {step} grad {name}")
    for name in want["weights"]:
        torch.testing.assert_close(got["weights"][name], want["weights"][name], rtol=1e-4, atol=1e-6,
                                   msg=f"{mode} final weight {name}")


@pytest.mark.parametrize("case", list(worker.CASES))
def test_fsdp_sharded_adapter_saves_whole(dist_results, case):
    """``save`` under FSDP2 gathers the sharded parameters: the checkpoint loads into a plain model
    and holds the final weights of the single-process run."""
    from peft_kernels.adapters import load_adapted

    out, _ = dist_results
    want = worker.train_single(case)
    # one checkpoint per case (written by rank 0 only), no temp files left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.pt", *(f"fsdp_{c}" for c in worker.CASES)])
    assert sorted(p.name for p in (out / f"fsdp_{case}").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    loaded = load_adapted(worker.TinyNet(), out / f"fsdp_{case}")
    got = dict(loaded.named_trainable_parameters())
    assert got.keys() == want["weights"].keys()
    for name, w in want["weights"].items():
        torch.testing.assert_close(got[name].detach(), w, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_head_case_really_links_and_wraps():
    """The interpreted case above runs what it says: gate/up linked, the head a ModuleToSave."""
    if "lora_shared_head" not in worker.CASES:
        pytest.skip("the fused-path case needs TRITON_INTERPRET=1 on a CPU-only machine")
    from peft_kernels.modules.to_save import ModuleToSave

    adapted = worker.build("lora_shared_head")
    block = adapted.model.layers[0]
    assert block.gate_proj.__dict__.get("_share_group") is block.up_proj.__dict__.get("_share_group") is not None
    assert isinstance(adapted.model.head, ModuleToSave)
