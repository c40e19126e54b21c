"""The trainer under ``torchrun`` (2 CPU processes, gloo): same parameters and AdaLoRA masks on every rank."""
from __future__ import annotations

import os
import sys
import textwrap

import pytest

from helpers import run_torchrun

SCRIPT = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    from peft_kernels.adapters import adapt
    from peft_kernels.train.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(11, 17), nn.ReLU(), nn.Linear(17, 3))
    adapted = adapt(net, method="adalora", target_modules=["0", "2"], r=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 11, generator=g)
    y = (x[:, 0] > 0).long()
    data = [(x[i], y[i]) for i in range(64)]
    coll = lambda rows: (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
    t = Trainer(adapted.model, data, coll, TrainConfig(max_steps=8, batch_size=4, grad_accum=2, progress=False,
                checkpoint_every=4, output_dir=sys.argv[1]))
    hist = t.train()
    vec = torch.cat([p.detach().flatten() for p in t.params] + [m.rank_mask for m in t.allocator.modules.values()])
    out = [torch.zeros_like(vec) for _ in range(t.world)]
    dist.all_gather(out, vec)
    assert t.world == 2
    assert all(torch.equal(out[0], o) for o in out), "ranks diverged"
    assert sum(t.allocator.current_ranks().values()) == t.allocator.target_bgt
    # one file per rank: two processes printing to one pipe can interleave their lines
    with open(f"{sys.argv[1]}/rank{t.rank}.txt", "w") as f:
        f.write(f"OK {t.rank} {hist[-1]['loss']}\\n")
    dist.destroy_process_group()
    # leave without interpreter-shutdown destructors, where gloo's threads can abort the process
    # (as tests/_dist_worker.py does)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
''')


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on localhost")
def test_trainer_under_torchrun(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_torchrun([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  str(script), str(tmp_path / "out")], env, r"ddp_run|peft_kernels/[\w/]+")
    oks = [(tmp_path / "out" / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert sorted(o[1] for o in oks) == ["0", "1"]
    assert oks[0][2] == oks[1][2]  # the logged loss is the global mean, identical on both ranks
    assert (tmp_path / "out" / "checkpoint.pt").exists()  # written once, by rank 0
