"""Held-out data in a plain array format (.npz): six modalities of unequal widths, never seen
by the code under test, through the registered "npz" loader, our ``train`` (DEQ fusion over
six modalities, ReFNet(LowRank) over more than three) and the benchmark runner's Python API.

The dataset is built here, seeded: 6 modalities of widths 5, 17, 32, 8, 64, 3 on very
different scales, 3 classes that shift the mean of a few columns of four of them
(modalities 1 and 3 are noise), so that no single modality predicts the label well and
fusing them does.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from multizoo_ext.runner import LOGREG, SINGLE_MODALITY, BenchmarkConfig, run_benchmark
from multizoo_ext.fusions.common_fusions import LowRankTensorFusion
from multizoo_ext.fusions.deq import DEQFusion
from multizoo_ext.fusions.refnet import ReFNet
from multizoo_ext.objectives.deq import deq_objective
from multizoo_ext.objectives.refnet import refnet_objective
from multizoo_ext.registry import create_dataset
from multizoo_ext.training_structures import supervised
from multizoo_ext.unimodals.common_models import MLP
from multizoo_ext.utils import seed_everything

WIDTHS = (5, 17, 32, 8, 64, 3)
SCALES = (1.0, 50.0, 0.01, 3.0, 1.0, 1000.0)   # raw feature scales: the loader standardises
INFORMATIVE = (0, 2, 4, 5)
N_ROWS, N_CLASSES = 360, 3


def make_heldout_npz(path: Path, n: int = N_ROWS, seed: int = 0, separation: float = 0.9) -> Path:
    """Write the six-modality .npz (keys ``m0_w5`` ... ``m5_w3``, ``labels``) and return its path.

    Labels are drawn first; in each informative modality the first ``min(width, 3)`` columns
    get a class-dependent mean (``separation`` x a random Gaussian vector per class), so each
    informative modality alone predicts the label weakly (about 0.45-0.7 accuracy with
    logistic regression) and all of them together well (about 0.9).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, n).astype(np.int64)                          # (n,)
    mods = [rng.normal(size=(n, w)) for w in WIDTHS]
    for i in INFORMATIVE:
        k = min(WIDTHS[i], 3)
        means = rng.normal(size=(N_CLASSES, k)) * separation                          # (classes, k)
        mods[i][:, :k] += means[labels]
    arrays = {f"m{i}_w{w}": (m * s + 5.0 * s).astype(np.float32)
              for i, (m, w, s) in enumerate(zip(mods, WIDTHS, SCALES))}
    np.savez(path, **arrays, labels=labels)
    return path


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    return make_heldout_npz(tmp_path_factory.mktemp("heldout") / "six_modalities.npz")


def _loaders(path: Path, seed: int = 0, batch_size: int = 32):
    return create_dataset("npz", path=str(path), normalize="standard", batch_size=batch_size, seed=seed)


def _majority(loader) -> float:
    y = torch.cat([b[-1] for b in loader])
    return float(torch.bincount(y).max()) / len(y)


def test_npz_loader_keeps_six_unequal_widths(heldout):
    train_dl, valid_dl, test_dl = _loaders(heldout)
    batch = next(iter(train_dl))
    assert len(batch) == 7
    assert [tuple(x.shape[1:]) for x in batch[:-1]] == [(w,) for w in WIDTHS]
    assert batch[-1].dtype == torch.int64 and all(x.dtype == torch.float32 for x in batch[:-1])
    assert train_dl.dataset.modality_names == [f"m{i}_w{w}" for i, w in enumerate(WIDTHS)]
    sizes = [len(dl.dataset) for dl in (train_dl, valid_dl, test_dl)]
    assert sum(sizes) == N_ROWS and sizes[2] == round(0.2 * N_ROWS)
    # standardised on the training split despite raw scales from 0.01 to 1000
    xs = [torch.cat([b[i] for b in train_dl]) for i in range(6)]
    for x in xs:
        assert x.mean(0).abs().max() < 1e-3 and (x.std(0) - 1).abs().max() < 0.05


def test_deq_fusion_learns_six_unequal_modalities(heldout):
    train_dl, valid_dl, test_dl = _loaders(heldout)
    seed_everything(0)
    embed = [4, 12, 16, 8, 24, 4]                                   # unequal encoder outputs
    encoders = [MLP(d, 32, e) for d, e in zip(WIDTHS, embed)]
    fusion = DEQFusion(embed, jac_reg=True)                           # width 24: five projections
    assert fusion.width == 24 and sum(not isinstance(p, nn.Identity) for p in fusion.projections) == 5
    head = nn.Linear(fusion.out_dim, N_CLASSES)
    result = supervised.train(encoders, fusion, head, train_dl, valid_dl, 6, task="classification",
                   optimtype=torch.optim.AdamW, lr=1e-2, weight_decay=1e-2,
                   objective=deq_objective(nn.CrossEntropyLoss(), jacobian_weight=0.1), objective_args_dict={},
                   save=None, device="cpu", fusion_lr_mult=0.1, seed=0, progress=False)
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    metrics = supervised.test(result.model, test_dl, task="classification", no_robust=True, full=True)
    assert metrics["n"] == len(test_dl.dataset)
    assert metrics["accuracy"] >= _majority(test_dl) + 0.2, metrics
    # the last test batch's solver statistics: per sample, finite, mostly converged
    info = result.model.fuse.last_info
    b = len(list(test_dl)[-1][-1])
    assert info["steps"].shape == info["rel_residual"].shape == (b,)
    # (6 epochs from a random start: the map is not yet contractive enough for every sample to
    # reach the 1e-3 tolerance within the 55-step cap, but the residual is small)
    assert torch.isfinite(info["rel_residual"]).all() and float(info["rel_residual"].max()) < 0.2
    assert ((info["steps"] >= 1) & (info["steps"] <= info["max_iter"])).all()
    with torch.no_grad():
        fused = result.model.fuse([torch.randn(3, e) for e in embed])
    assert fused.shape == (3, 24) and torch.isfinite(fused).all()


def test_refnet_lowrank_learns_six_unequal_modalities(heldout):
    train_dl, valid_dl, test_dl = _loaders(heldout)
    seed_everything(0)
    embed = [4, 12, 16, 8, 24, 4]
    encoders = [MLP(d, 32, e) for d, e in zip(WIDTHS, embed)]
    fusion = ReFNet(LowRankTensorFusion(embed, output_dim=32, rank=4), modality_dims=embed)
    head = nn.Linear(fusion.out_dim, N_CLASSES)
    objective = refnet_objective(task="classification", ms_weight=0.1)
    result = supervised.train(encoders, fusion, head, train_dl, valid_dl, 10, task="classification",
                   optimtype=torch.optim.AdamW, lr=1e-2, weight_decay=1e-2, objective=objective,
                   objective_args_dict={}, save=None, device="cpu", seed=0, progress=False)
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    metrics = supervised.test(result.model, test_dl, task="classification", no_robust=True, full=True)
    assert metrics["accuracy"] >= _majority(test_dl) + 0.2, metrics
    refnet = result.model.fuse
    assert len(refnet.refiners) == 6 and refnet.target_dims == embed
    # every refiner reconstructs its own modality's width, with finite values
    refnet.eval()
    with torch.no_grad():
        refnet([torch.randn(5, e) for e in embed])
    assert [tuple(r.shape) for r in refnet.last_reconstructions] == [(5, e) for e in embed]
    assert all(torch.isfinite(r).all() for r in refnet.last_reconstructions)
    terms = objective.refiner_loss.last_terms
    assert len(terms) == 6 and all(math.isfinite(float(t)) for t in terms)


def test_runner_python_api_on_heldout_npz(heldout, tmp_path):
    cfg = BenchmarkConfig(
        datasets=["npz"], data_kwargs={"npz": {"path": str(heldout), "normalize": "standard"}},
        fusions=["concat", "deq", "refnet"], seeds=[0], epochs=4, batch_size=32, lr=1e-2, hidden=32, embed_dim=16,
        fusion_kwargs={"refnet": {"inner": "lowrank"}},    # DEQ: its registered recipe
        logreg_cs=(0.05, 1.0), num_threads=1, output=str(tmp_path / "bench"), plots=False)
    runs = run_benchmark(cfg)
    by_method = {r["method"]: r for r in runs}
    assert list(by_method) == ["concat", "deq", "refnet", SINGLE_MODALITY, LOGREG]
    n_test = round(0.2 * N_ROWS)
    for method, r in by_method.items():
        assert r["status"] == "ok" and r["dataset"] == "npz" and r["task"] == "classification", r
        assert r["test"]["n"] == n_test
        for key in ("accuracy", "f1_macro", "auroc"):
            assert isinstance(r["test"][key], float) and math.isfinite(r["test"][key]), (method, key, r["test"])
        assert r["parameters"] > 0
    # the per-fusion settings reached the runs (DEQ's from its registered recipe: Jacobian
    # penalty, deq objective, fusion at 0.1 x lr)
    assert by_method["deq"]["config"]["objective"] == "deq"
    assert by_method["deq"]["config"]["fusion_kwargs"] == {}  # jac_reg=True is DEQFusion's own default
    assert by_method["deq"]["config"]["fusion_lr_mult"] == 0.1
    assert by_method["refnet"]["config"]["fusion_kwargs"] == {"inner": "lowrank"}
    assert by_method["concat"]["epochs_run"] == 4
    # the label needs several modalities: models on all of them beat the best single one
    single = by_method[SINGLE_MODALITY]
    assert single["modality"] in range(6) and len(single["per_modality"]) == 6
    assert by_method[LOGREG]["test"]["accuracy"] >= 0.8
    assert by_method[LOGREG]["test"]["accuracy"] > single["test"]["accuracy"]
    assert by_method["concat"]["test"]["accuracy"] > single["test"]["accuracy"]
    chance = 1.0 / N_CLASSES
    for method in ("concat", "refnet"):
        assert by_method[method]["test"]["accuracy"] > chance + 0.15, (method, by_method[method]["test"])
    # DEQ fusion learns more slowly than these from a random start (4 epochs here; its accuracy
    # after 6 epochs is checked above): its training loss must still go down, with finite values
    deq_loss = [h["train_loss"] for h in by_method["deq"]["history"]]
    assert len(deq_loss) == 4 and all(math.isfinite(v) for v in deq_loss) and deq_loss[-1] < deq_loss[0]
    # what the runner wrote
    saved = json.loads(runs.json_path.read_text())
    assert {(r["method"], r["status"]) for r in saved["runs"]} == {(m, "ok") for m in by_method}
    table = runs.markdown_path.read_text()
    assert "### npz (classification" in table
    for label in ("concat", "deq", "refnet", "best single modality", "logistic regression"):
        assert label in table
