"""A model with fused adapters trains under DistributedDataParallel and under FSDP2 (fully_shard):
2 CPU processes, gloo, each on half of the batch; the gradients equal single-process training on the
whole batch. (Spawned processes, a file:// rendezvous: no network.)"""
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import adapterfuse as af
from helpers import cpu_backends

WORLD = 2


class Net(nn.Module):
    """A frozen Linear backbone with two Adapter+ adapters and a trainable head."""

    def __init__(self, backend):
        super().__init__()
        self.backbone = nn.Linear(24, 24)
        self.backbone.requires_grad_(False)
        cfg = af.AdapterConfig.adapter_plus(bottleneck=4, drop_path=0.0, init="bert")
        self.a1 = af.Adapter.from_config(24, cfg, backend=backend)
        self.a2 = af.Adapter.from_config(24, cfg, backend=backend)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        h = self.backbone(x)
        h = self.a1(h, skip=h)
        h = torch.relu(h)
        h = self.a2(h, skip=h)
        return self.head(h.mean(1))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, 24, generator=g), torch.randint(0, 3, (8,), generator=g)


def _model(backend):
    torch.manual_seed(0)
    m = Net(backend)
    with torch.no_grad():
        for a in (m.a1, m.a2):
            a.up.weight.normal_(std=0.3)
            a.scale.uniform_(0.5, 1.5)
    return m


def reference_grads(backend):
    m = _model(backend)
    x, y = _data()
    nn.functional.cross_entropy(m(x), y).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def _worker(rank, mode, backend, init_file, out_file):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        m = _model(backend)
        if mode == "ddp":
            model = nn.parallel.DistributedDataParallel(m)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for sub in (m.a1, m.a2, m.head):
                fully_shard(sub, mesh=mesh)
            model = fully_shard(m, mesh=mesh)
        x, y = _data()
        shard = slice(rank * 4, rank * 4 + 4)
        nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        grads = {}
        for n, p in m.named_parameters():
            if p.requires_grad:
                g = p.grad
                grads[n.replace("_fsdp_wrapped_module.", "")] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
        if rank == 0:
            torch.save(grads, out_file)
        dist.barrier()  # no rank tears the group down while the other is still in a collective
    finally:
        dist.destroy_process_group()
    # Results are saved. Skip interpreter teardown: torch's gloo/FSDP background threads sometimes die in
    # it with "terminate called without an active exception" (SIGABRT), seen with the pure-torch backend
    # too, so not something this test checks. An exception above still fails the test as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("backend", ["torch"] + cpu_backends())
def test_distributed_grads_equal_single_process(mode, backend, tmp_path):
    out = tmp_path / "grads.pt"
    ctx = mp.spawn(_worker, args=(mode, backend, str(tmp_path / "init"), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{mode} workers did not finish in 240 s")
    got, want = torch.load(out), reference_grads(backend)
    assert set(got) == set(want), (set(got) ^ set(want))
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-6), n
