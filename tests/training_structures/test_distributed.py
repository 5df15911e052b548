"""train() / pretrain() under torchrun: 2 gloo processes on loopback at per-process batch B/2
reproduce one process at batch B (float64, shuffle=False): same parameters after the same
steps, same validation metrics, for Concat, ReFNet (refiner + cross-process Multi-Similarity)
and DEQ fusion (implicit backward + Jacobian penalty, a double backward).

This file is also the worker script: ``python -m torch.distributed.run --nproc_per_node 2
test_distributed.py OUT`` runs every scenario under both strategies and saves each rank's
results in OUT.
"""
from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from multizoo_ext.checkpoint import load_checkpoint
from multizoo_ext.fusions.deq import fusion as deq_module  # the module whose jacobian_penalty the forward calls
from multizoo_ext.fusions.common_fusions import Concat
from multizoo_ext.fusions.deq import DEQFusion
from multizoo_ext.fusions.refnet import ReFNet
from multizoo_ext.objectives import deq_objective, refiner_only_objective, refnet_objective
from multizoo_ext.training_structures import distributed
from multizoo_ext.training_structures.self_supervised import pretrain
from multizoo_ext.training_structures.supervised import MMDL, evaluate, train
from multizoo_ext.unimodals.common_models import MLP

BATCH = 8  # single-process batch; each of the 2 processes reads BATCH // 2
N_TRAIN, N_VALID = 16, 12  # multiples of 2 processes: no padding (the padding rules are tested below)
SCENARIOS = ("concat", "refnet", "deq", "pretrain")
STRATEGIES = distributed.STRATEGIES  # both run in the same launch
TOL = 1e-5  # parameters; validation metrics within 1e-6 (the DEQ solves stop at a tolerance)


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 5, generator=g, dtype=torch.float64)
    b = torch.randn(n, 7, generator=g, dtype=torch.float64)
    y = ((a[:, 0] > 0).long() + (b[:, 0] > 0.5).long())  # 3 classes
    return TensorDataset(a, b, y)


def _fixed_penalty(fz, z_in, n_vectors=2, create_graph=True):
    """The Hutchinson penalty with v = 1 (deterministic, so that the two runs draw the same
    vectors): ||1^T J||^2 / numel, still an autograd.grad(create_graph=True) + double backward."""
    inputs = [z_in] if isinstance(z_in, torch.Tensor) else list(z_in)
    total = fz.new_zeros(())
    for vj in torch.autograd.grad(fz, inputs, torch.ones_like(fz), retain_graph=True, create_graph=create_graph):
        total = total + vj.pow(2).sum()
    return total / sum(t.numel() for t in inputs)


@contextlib.contextmanager
def _float64_and_fixed_penalty():
    dtype, penalty = torch.get_default_dtype(), deq_module.jacobian_penalty
    torch.set_default_dtype(torch.float64)
    deq_module.jacobian_penalty = _fixed_penalty
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        deq_module.jacobian_penalty = penalty


def _modules(name: str):
    torch.manual_seed(0)
    encoders = [MLP(5, 8, 4), MLP(7, 8, 4)]
    if name == "concat":
        fusion, objective = Concat([4, 4]), torch.nn.CrossEntropyLoss()
    elif name in ("refnet", "refnet_local", "pretrain"):
        fusion = ReFNet(Concat([4, 4]), [4, 4], dropout=0.0)
        objective = (refiner_only_objective() if name == "pretrain"
                     else refnet_objective(ms_weight=0.5, ms_gather=name == "refnet"))
    else:
        fusion = DEQFusion([4, 4], width=4, num_groups=2, f_tol=1e-12, b_tol=1e-12, f_max_iter=80, b_max_iter=80,
                           implicit_max_residual=None, jac_reg=True)
        objective = deq_objective(jacobian_weight=0.5)
    head = MLP(fusion.out_dim, 8, 3)
    return encoders, fusion, head, objective


@functools.lru_cache(maxsize=None)
def single_run(name: str) -> dict:
    return run_scenario(name, BATCH)


def run_scenario(name: str, batch: int, save: str | None = None) -> dict:
    """Train scenario ``name`` for 2 epochs at ``batch``; its final parameters and history."""
    with _float64_and_fixed_penalty():
        encoders, fusion, head, objective = _modules(name)
        train_dl = DataLoader(_data(N_TRAIN, 1), batch_size=batch, shuffle=False)
        valid_dl = DataLoader(_data(N_VALID, 2), batch_size=batch, shuffle=False)
        common = dict(optimtype=torch.optim.SGD, lr=0.1, seed=0, progress=False, input_to_float=False, save=save)
        if name == "pretrain":
            res = pretrain(encoders, fusion, train_dl, 2, valid_dataloader=valid_dl, objective=objective, **common)
        else:
            res = train(encoders, fusion, head, train_dl, valid_dl, 2, objective=objective, objective_args_dict={},
                        **common)
        return {"params": {k: v.detach().clone() for k, v in res.model.state_dict().items()},
                "history": res.history, "best_epoch": res.best_epoch}


def evaluate_padded(shuffle: bool) -> dict:
    """Validation metrics of a fixed model on 11 samples (2 processes: one padding duplicate),
    batch 5 (rank 1's last batch is the padding alone), with a loss; in a process group the
    loader is sharded and the outputs gathered."""
    with _float64_and_fixed_penalty():
        encoders, fusion, head, _ = _modules("concat")
        model = MMDL(encoders, fusion, head)
        loader = DataLoader(_data(11, 3), batch_size=5, shuffle=shuffle)
        if distributed.is_distributed():
            loader = distributed.distributed_loader(loader, seed=0)
        return evaluate(model, loader, "classification", torch.nn.CrossEntropyLoss(), input_to_float=False)


def _worker(out: str) -> None:
    world = int(os.environ["WORLD_SIZE"])
    distributed.init_from_env()
    torch.save([evaluate_padded(False), evaluate_padded(True)], os.path.join(out, f"eval_rank{dist.get_rank()}.pt"))
    for strategy in STRATEGIES:
        os.environ["MULTIZOO_DDP_STRATEGY"] = strategy
        for name in SCENARIOS:
            res = run_scenario(name, BATCH // world, save=os.path.join(out, f"{name}_{strategy}.pt"))
            torch.save(res, os.path.join(out, f"{name}_{strategy}_rank{dist.get_rank()}.pt"))
    res = run_scenario("refnet_local", BATCH // world)  # Multi-Similarity of each process's batch alone
    torch.save(res, os.path.join(out, f"refnet_local_allreduce_rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


def launch(script: str, out: Path, *args: str, nproc: int = 2, timeout: float = 150.0) -> None:
    """Run ``script out args...`` under ``torch.distributed.run`` with ``nproc`` gloo processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={distributed.free_local_port()}", script, str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(__file__, out)
    return out


def _load(out: Path, name: str, strategy: str, rank: int) -> dict:
    return torch.load(out / f"{name}_{strategy}_rank{rank}.pt", weights_only=False)


@needs_gloo
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", SCENARIOS)
def test_two_processes_equal_one_process_at_twice_the_batch(two_process_run, name, strategy):
    single = single_run(name)
    ranks = [_load(two_process_run, name, strategy, r) for r in (0, 1)]
    for res in ranks:  # both replicas hold the single-process weights
        assert res["params"].keys() == single["params"].keys()
        for k, v in single["params"].items():
            assert torch.allclose(res["params"][k], v, atol=TOL, rtol=0), (name, k, (res["params"][k] - v).abs().max())
        assert res["best_epoch"] == single["best_epoch"]
        assert len(res["history"]) == len(single["history"])
        for row_d, row_s in zip(res["history"], single["history"]):
            for key, value in row_s.items():
                if key != "seconds":
                    assert row_d[key] == pytest.approx(value, abs=1e-6), (name, key)
    # the parameters moved: the comparison is not between two untouched initialisations
    with _float64_and_fixed_penalty():
        encoders, fusion, head, _ = _modules(name)
        init = MMDL(encoders, fusion, head if name != "pretrain" else torch.nn.Identity()).state_dict()
    assert max(float((single["params"][k] - v).abs().max()) for k, v in init.items() if v.numel()) > 1e-3


@needs_gloo
def test_without_gather_multi_similarity_is_another_loss(two_process_run):
    # each process mining pairs in its own half batch trains differently: what gather=True fixes
    local = _load(two_process_run, "refnet_local", "allreduce", 0)
    single = single_run("refnet")
    assert max(float((local["params"][k] - v).abs().max()) for k, v in single["params"].items()) > 1e-4


@needs_gloo
def test_validation_metrics_of_two_processes_drop_the_padding(two_process_run):
    single = evaluate_padded(False)
    assert single["n"] == 11
    for r in (0, 1):
        for res in _load_eval(two_process_run, r):  # shuffle=False, then shuffle=True
            assert res.keys() == single.keys() and res["n"] == 11
            for key, value in single.items():
                assert res[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key


def _load_eval(out: Path, rank: int) -> list:
    return torch.load(out / f"eval_rank{rank}.pt", weights_only=False)


@needs_gloo
def test_checkpoint_of_two_processes_loads_in_one(two_process_run):
    single = single_run("concat")
    with _float64_and_fixed_penalty():
        encoders, fusion, head, _ = _modules("concat")
        model = MMDL(encoders, fusion, head)
    sd, cfg = load_checkpoint(two_process_run / "concat_allreduce.pt", model)  # no "module." prefix: any world size
    assert cfg["epoch"] == single["best_epoch"]
    for k, v in model.state_dict().items():
        assert not k.startswith("module.")


def test_gather_predictions_restores_dataset_order_without_padding():
    # the interleaving rule, checked without a process group: rank r holds positions r, r + W, ...
    n, world = 7, 2
    sampler_positions = [list(range(r, 8, world)) for r in range(world)]  # padded to 8: position 7 repeats 0
    parts = [torch.tensor([p % n for p in pos]) for pos in sampler_positions]
    merged = torch.stack(parts, 1).flatten(0, 1)[:n]
    assert merged.tolist() == list(range(n))
    ds = TensorDataset(torch.arange(7.0))
    loader = DataLoader(ds, batch_size=2)
    sharded = [distributed.distributed_loader(loader, num_replicas=2, rank_=r) for r in (0, 1)]
    assert [len(s.sampler) for s in sharded] == [4, 4]
    assert distributed.padding_mask(sharded[0]).tolist() == [False] * 4
    assert distributed.padding_mask(sharded[1]).tolist() == [False, False, False, True]
    # the last batch of rank 1 loses its padding row (a repeat of sample 0)
    count, (kept,) = distributed.trim_padding(sharded[1], 2, torch.tensor([5.0, 0.0]))
    assert count == 1 and kept.tolist() == [5.0]
    count, (kept,) = distributed.trim_padding(sharded[1], 0, torch.tensor([1.0, 3.0]))
    assert count == 2 and kept.tolist() == [1.0, 3.0]
    # a batch of padding only comes back whole, counted 0 (the objective is still called)
    sharded_1 = distributed.distributed_loader(DataLoader(ds, batch_size=3), num_replicas=2, rank_=1)
    count, (kept,) = distributed.trim_padding(sharded_1, 3, torch.tensor([0.0]))
    assert count == 0 and kept.tolist() == [0.0]


def test_distributed_loader_keeps_batch_size_and_shuffle():
    ds = TensorDataset(torch.arange(10.0))
    shuffled = distributed.distributed_loader(DataLoader(ds, batch_size=3, shuffle=True), seed=4, num_replicas=2,
                                              rank_=1)
    assert shuffled.batch_size == 3 and shuffled.sampler.shuffle and shuffled.sampler.seed == 4
    plain = distributed.distributed_loader(DataLoader(ds, batch_size=3), num_replicas=2, rank_=0)
    assert not plain.sampler.shuffle
    assert [b[0].tolist() for b in plain] == [[0.0, 2.0, 4.0], [6.0, 8.0]]
    first = [b[0].tolist() for b in shuffled]
    distributed.set_epoch(shuffled, 1)
    assert [b[0].tolist() for b in shuffled] != first  # reshuffled per epoch


def test_distributed_loader_rejects_what_it_cannot_shard():
    ds = TensorDataset(torch.arange(10.0))
    with pytest.raises(TypeError, match="DataLoader"):
        distributed.distributed_loader([1, 2, 3])
    sampler = torch.utils.data.WeightedRandomSampler([1.0] * 10, 10)
    with pytest.raises(ValueError, match="WeightedRandomSampler"):
        distributed.distributed_loader(DataLoader(ds, batch_size=2, sampler=sampler), num_replicas=2, rank_=0)


def test_single_process_needs_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False
    assert not dist.is_initialized() and distributed.is_main() and distributed.world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.init_from_env()


def test_cli_nproc_relaunches_under_torch_distributed_run(monkeypatch):
    import subprocess

    from multizoo_ext import cli

    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert cli.main(["train", "--epochs", "1", "--nproc", "2", "--quiet"]) == 0
    (cmd,) = calls
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert cmd[6:] == ["multizoo_ext", "train", "--epochs", "1", "--quiet"]  # --nproc is not passed on


if __name__ == "__main__":  # the worker, under torch.distributed.run
    torch.set_num_threads(1)
    _worker(sys.argv[1])
