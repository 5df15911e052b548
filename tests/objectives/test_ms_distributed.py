"""MultiSimilarityLoss(gather=True) across 2 gloo processes equals the single-process loss on
the concatenated batch: the mean of the per-process losses, and the gradients after DDP's
averaging (embeddings and the parameters of a DDP-wrapped layer), within 1e-6 in float64.
(refnet_objective(ms_gather=True) in training: tests/training_structures/test_distributed.py.)"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from multizoo_ext.objectives.distributed import all_gather_with_grad
from multizoo_ext.objectives.multisimilarity import MultiSimilarityLoss
from multizoo_ext.training_structures.distributed import free_local_port

WORLD = 2
# (rows of rank 0, rows of rank 1, label kind): equal and unequal shares, class and multi-hot labels
CASES = [(6, 6, "class"), (7, 4, "class"), (5, 5, "multihot")]


def _batch(case):
    n0, n1, kind = case
    g = torch.Generator().manual_seed(n0 * 10 + n1)
    x = torch.randn(n0 + n1, 6, generator=g, dtype=torch.float64)
    if kind == "class":
        y = torch.randint(0, 3, (n0 + n1,), generator=g)
    else:
        y = (torch.rand(n0 + n1, 4, generator=g) < 0.4).long()
    layer = nn.Linear(6, 5).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 6, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
    return x, y, layer


def _single(case):
    x, y, layer = _batch(case)
    x = x.clone().requires_grad_(True)
    loss = MultiSimilarityLoss()(layer(x), y)
    loss.backward()
    return loss.detach(), x.grad, layer.weight.grad, layer.bias.grad


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = []
    for case in CASES:
        x, y, layer = _batch(case)
        lo = 0 if rank == 0 else case[0]
        hi = case[0] if rank == 0 else case[0] + case[1]
        xl = x[lo:hi].clone().requires_grad_(True)
        ddp = nn.parallel.DistributedDataParallel(layer)
        loss = MultiSimilarityLoss(gather=True)(ddp(xl), y[lo:hi])
        loss.backward()
        results.append((loss.detach(), xl.grad, layer.weight.grad, layer.bias.grad))
    emb = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    gathered = all_gather_with_grad(emb)
    results.append((gathered,))
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ms"))
    ctx = mp.start_processes(_worker, args=(free_local_port(), out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process Multi-Similarity run did not finish in 120 s")
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@needs_gloo
@pytest.mark.parametrize("index", range(len(CASES)))
def test_gathered_loss_and_gradients_equal_the_single_process(gathered, index):
    loss, x_grad, w_grad, b_grad = _single(CASES[index])
    assert float(loss) > 0.1  # pairs were mined: not a trivial zero
    parts = [gathered[r][index] for r in range(WORLD)]
    mean_loss = sum(p[0] for p in parts) / WORLD
    assert torch.allclose(mean_loss, loss, atol=1e-6, rtol=0)
    # DDP divides the summed gradient by W: the embeddings' gradients are W times the single ones
    dist_x_grad = torch.cat([p[1] for p in parts]) / WORLD
    assert torch.allclose(dist_x_grad, x_grad, atol=1e-6, rtol=0)
    for p in parts:  # the DDP-averaged parameter gradients, identical on both ranks
        assert torch.allclose(p[2], w_grad, atol=1e-6, rtol=0)
        assert torch.allclose(p[3], b_grad, atol=1e-6, rtol=0)


@needs_gloo
def test_all_gather_with_grad_concatenates_in_rank_order(gathered):
    expected = torch.cat([torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
                          for r in range(WORLD)])
    for r in range(WORLD):
        assert torch.equal(gathered[r][-1][0], expected)


def test_without_a_process_group_gather_changes_nothing():
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    assert torch.equal(MultiSimilarityLoss(gather=True)(x, y), MultiSimilarityLoss()(x, y))
    assert "gather=True" in repr(MultiSimilarityLoss(gather=True))
    assert all_gather_with_grad(x) is x
