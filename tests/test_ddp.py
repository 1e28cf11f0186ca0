"""DEQFusion inside DistributedDataParallel (two gloo processes on the CPU) gives the gradients of
single-process training on the whole batch: no per-instance hooks or state break the replicas; with a
per-sample modality mask (issue 13) too."""
import datetime
import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import make_contractive
from deqfusion_core import DEQFusion

DIMS = [6, 8, 5]
# per sample of the batch of 8 (each rank gets 4): absent modalities, one sample per half with one modality only
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 0, 0], [1, 1, 1]],
                    dtype=torch.bool)


def build():
    torch.manual_seed(0)
    m = make_contractive(DEQFusion(DIMS, dim=8, num_groups=2, f_tol=1e-10, f_max_iter=200, b_tol=1e-10,
                                   b_max_iter=200, jac_samples=1, jac_weight=0.5)).double()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, d, generator=g, dtype=torch.float64) for d in DIMS]
    return m, xs


def loss_fn(fused):
    return (fused.sin() * torch.arange(fused.shape[1])).sum(1).mean()


def forward(m, xs, half, masked):
    return m([x[half] for x in xs], present=MASK[half] if masked else None)


def worker(rank, port, out, masked):
    """One DDP replica. It leaves with os._exit, skipping teardown: torch 2.13's ProcessGroupGloo destructor
    (run when DDP's reducer is freed) can deadlock on the GIL with gloo's runloop thread (1 run in ~5 here)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
        m, xs = build()
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        torch.manual_seed(100 + rank)          # Hutchinson probes: the same on every run of this rank
        half = slice(rank * 4, rank * 4 + 4)
        loss_fn(forward(ddp, xs, half, masked).fused).backward()
        if rank == 0:
            torch.save([p.grad for p in m.parameters()], out)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("masked", [False, True])
def test_ddp_gloo_matches_single_process(tmp_path, masked):
    out = tmp_path / "grads.pt"
    mp.spawn(worker, args=(free_port(), str(out), masked), nprocs=2, join=True)
    ddp_grads = torch.load(out)
    # single process: the same two halves, same probes, gradients averaged as DDP does
    m, xs = build()
    total = None
    for rank in range(2):
        m.zero_grad()
        torch.manual_seed(100 + rank)
        half = slice(rank * 4, rank * 4 + 4)
        loss_fn(forward(m, xs, half, masked).fused).backward()
        grads = [p.grad.clone() for p in m.parameters()]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    for a, b in zip(ddp_grads, total):
        torch.testing.assert_close(a, b / 2, rtol=1e-7, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in ddp_grads)
