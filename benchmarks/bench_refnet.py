"""ReFNet measurements: accuracy, detach option, label efficiency, kNN graph.

Everything runs on the CPU with one thread, small MLP encoders and the project's own loops
(``multizoo_ext.training_structures.supervised.train`` / ``test`` and
``self_supervised.pretrain``). Each variant of one seed gets the same data split, the same
encoder and head initialisation, the same optimiser, epochs and batch order seed; model
selection is on the validation split (best validation accuracy over the epochs), the test
split is touched once per run.

Variants (fusion on top of the same MLP encoders, same Linear head):

- ``concat``:        Concat, cross-entropy only.
- ``refnet``:        ReFNet(Concat), cross-entropy + cosine refiner loss (weight 0.1 each).
- ``refnet_ms``:     as ``refnet`` + 0.1 * Multi-Similarity on the fused embedding.
- ``refnet_detach``: as ``refnet`` with ``detach_targets=True`` (stop-gradient targets).
- ``refnet_nodetach``: as ``refnet`` with ``detach_targets=False`` explicitly (the detach
  comparison names both values so it does not depend on the library default).

Parts:

- ``accuracy``: test accuracy / macro F1 / AUROC, mean and std over seeds.
- ``knn``: k-nearest-neighbour label agreement of the fused test embeddings (cosine,
  self excluded, k=10): the fraction of a sample's k neighbours that share its label,
  averaged over the test samples. Uses the same trained models as ``accuracy`` (they are
  cached within one process). Also reported for the raw concatenated inputs (no training).
- ``label``: label efficiency. ``split_labeled`` keeps a stratified fraction of the training
  split's labels; ``concat_sup`` and ``refnet_sup`` train on the labeled part only;
  ``refnet_pre`` first pre-trains encoders + ReFNet with the refiner loss alone on the
  unlabeled rest (at 100 %: on the same rows, labels unused), then fine-tunes like
  ``refnet_sup``. Validation (model selection) uses the full validation split in every case.
  Fine-tuning always runs the dataset's epochs; a labeled part too small for
  ``min_steps / epochs`` batches per epoch is cycled (random permutations) so that every
  fraction gets at least ``min_steps`` optimiser steps.
- ``reference``: scikit-learn logistic regression on the concatenated, standardised inputs
  (C=0.05), fitted on the same training split: the no-deep-learning bar (one fit, no seeds).

Usage (from the repository root)::

    python benchmarks/bench_refnet.py --json runs/bench_refnet.json --out runs/bench_refnet.md

(``--parts accuracy,detach,knn,label`` picks parts; ``--datasets`` / ``--label-datasets`` pick
datasets; ROSMAP is read from ``../shared/data/ROSMAP`` unless ``--rosmap-path`` is given.)

``python benchmarks/bench_refnet.py --quick`` runs a tiny smoke version (2 seeds, 3 epochs).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler

import multizoo_ext
from multizoo_ext.builder import build_encoders, infer_data_spec
from multizoo_ext.datasets.label_fraction import split_labeled
from multizoo_ext.fusions.common_fusions import Concat
from multizoo_ext.fusions.refnet import DEFAULT_DETACH_TARGETS, ReFNet
from multizoo_ext.objectives.refnet import refiner_only_objective, refnet_objective
from multizoo_ext.registry import create_dataset, list_datasets
from multizoo_ext.training_structures.self_supervised import pretrain
from multizoo_ext.training_structures.supervised import test, train
from multizoo_ext.utils import seed_everything

logger = logging.getLogger("bench_refnet")


def _repo_root() -> Path:
    """The source checkout multizoo_ext is imported from (editable install), else the current folder."""
    root = Path(multizoo_ext.__file__).resolve().parents[1]
    return root if (root / "setup.cfg").is_file() else Path.cwd()


REPO_ROOT = _repo_root()
#: ``shared/data/ROSMAP`` beside the repository (beside the current folder with a regular install).
DEFAULT_ROSMAP = REPO_ROOT.parent / "shared" / "data" / "ROSMAP"

VARIANTS: Dict[str, Dict[str, Any]] = {
    "concat": {"refnet": False},
    "refnet": {"refnet": True, "ms_weight": 0.0, "detach": None},
    "refnet_ms": {"refnet": True, "ms_weight": 0.1, "detach": None},
    "refnet_detach": {"refnet": True, "ms_weight": 0.0, "detach": True},
    "refnet_nodetach": {"refnet": True, "ms_weight": 0.0, "detach": False},
}
ACCURACY_VARIANTS = ("concat", "refnet", "refnet_ms")
DETACH_VARIANTS = ("refnet_nodetach", "refnet_detach")
LABEL_VARIANTS = ("concat_sup", "refnet_sup", "refnet_pre")
FRACTIONS = (0.05, 0.10, 0.25, 0.50, 1.0)


@dataclass(frozen=True)
class Settings:
    """Hyper-parameters shared by every variant (kept identical across variants)."""

    hidden: int = 64            # encoder hidden width: d_i -> 64 -> 32
    embed_dim: int = 32         # encoder output width
    epochs: int = 60            # supervised epochs (best validation epoch kept)
    batch_size: int = 32
    lr: float = 1e-3            # AdamW
    weight_decay: float = 1e-2
    refiner_weight: float = 0.1  # per modality, cosine refiner loss
    refiner_loss: str = "cosine"
    ms_weight: float = 0.1      # only for refnet_ms
    pretrain_epochs: int = 20   # refiner-only pre-training (label part)
    min_steps: int = 300        # label part: at least this many optimiser steps per fine-tuning
    k: int = 10                 # kNN agreement


#: Per-dataset settings (identical across variants of a dataset). ROSMAP: 245 training rows
#: (196 after the validation hold-out), batch 32, 60 epochs. Digits: ~1300 training rows, batch
#: 64 and 30 epochs (it reaches its plateau well before; keeps the CPU budget small).
DATASET_SETTINGS: Dict[str, Settings] = {
    "rosmap": Settings(epochs=60, batch_size=32),
    "digits": Settings(epochs=30, batch_size=64),
}
SettingsArg = Optional[Any]  # None (per-dataset defaults), one Settings, or {dataset: Settings}


def settings_for(dataset: str, settings: SettingsArg = None) -> Settings:
    """The settings a dataset runs with: ``settings`` itself, its entry for ``dataset``, or the
    default of :data:`DATASET_SETTINGS` (plain :class:`Settings` for an unknown dataset)."""
    if isinstance(settings, Settings):
        return settings
    if isinstance(settings, dict) and dataset in settings:
        return settings[dataset]
    return DATASET_SETTINGS.get(dataset, Settings())


# ----------------------------------------------------------------------------- data
def load_data(dataset: str, seed: int, batch_size: int, rosmap_path: Optional[Path] = None):
    """``(train, valid, test)`` loaders of a registered dataset; ``rosmap`` reads the MOGONET CSVs."""
    names = list_datasets()
    if dataset == "rosmap":
        path = Path(rosmap_path or DEFAULT_ROSMAP)
        if not path.is_dir():
            raise FileNotFoundError(f"ROSMAP folder not found at {path}; pass --rosmap-path")
        name = "rosmap" if "rosmap" in names else "mogonet"
        return create_dataset(name, path=str(path), batch_size=batch_size, seed=seed)
    return create_dataset(dataset, batch_size=batch_size, seed=seed)


_DATA_CACHE: Dict[Tuple[str, int, int], Tuple[Any, Any, Any]] = {}


def _data(dataset: str, seed: int, s: Settings, rosmap_path: Optional[Path]):
    key = (dataset, seed, s.batch_size)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_data(dataset, seed, s.batch_size, rosmap_path)
    return _DATA_CACHE[key]


# ----------------------------------------------------------------------------- models
def build(spec, variant: str, seed: int, s: Settings):
    """Encoders, fusion, head and (objective, objective_args_dict) for a variant.

    The encoders and the head are drawn from the same seed in every variant (the refiners
    are created afterwards), so variants of one seed start from the same weights.
    """
    cfg = VARIANTS[variant]
    seed_everything(seed)
    encoders = build_encoders(spec, "mlp", s.hidden, s.embed_dim)
    dims = [int(e.out_dim) for e in encoders]
    head = nn.Linear(sum(dims), spec.n_out)
    if not cfg["refnet"]:
        return encoders, Concat(dims), head, nn.CrossEntropyLoss(), None
    kwargs = {} if cfg["detach"] is None else {"detach_targets": cfg["detach"]}
    fusion = ReFNet(Concat(dims), modality_dims=dims, **kwargs)
    objective = refnet_objective(refiner_weight=s.refiner_weight, refiner_loss=s.refiner_loss,
                                 ms_weight=s.ms_weight if cfg["ms_weight"] > 0 else 0.0, task=spec.task)
    return encoders, fusion, head, objective, {}


@torch.no_grad()
def fused_embeddings(model: nn.Module, loader) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused embeddings ``(N, D)`` and labels ``(N,)`` of ``loader`` (eval mode)."""
    was = model.training
    model.eval()
    zs, ys = [], []
    for batch in loader:
        model([x.float() for x in batch[:-1]])
        out = model.fuseout[0] if isinstance(model.fuseout, tuple) else model.fuseout
        zs.append(out.detach().float().cpu())
        ys.append(batch[-1].reshape(-1).long().cpu())
    model.train(was)
    return torch.cat(zs), torch.cat(ys)


def knn_agreement(z: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of each sample's k cosine nearest neighbours (self excluded) sharing its label."""
    n = z.shape[0]
    if n <= k:
        raise ValueError(f"knn_agreement needs more than k={k} samples, got {n}")
    zn = F.normalize(z.float(), dim=1)
    sim = zn @ zn.T  # (N, N)
    sim.fill_diagonal_(-math.inf)
    idx = sim.topk(k, dim=1).indices  # (N, k)
    return float((y[idx] == y[:, None]).float().mean())


def raw_knn(dataset: str, seed: int, s: Settings, rosmap_path: Optional[Path]) -> float:
    """kNN agreement of the raw (flattened, concatenated) test inputs: the no-learning reference."""
    _, _, test_dl = _data(dataset, seed, s, rosmap_path)
    xs, ys = [], []
    for batch in test_dl:
        xs.append(torch.cat([torch.flatten(x.float(), 1) for x in batch[:-1]], dim=1))
        ys.append(batch[-1].reshape(-1).long())
    return knn_agreement(torch.cat(xs), torch.cat(ys), s.k)


_RUN_CACHE: Dict[Tuple[Any, ...], Dict[str, float]] = {}


def fit_variant(dataset: str, variant: str, seed: int, s: Settings,
                rosmap_path: Optional[Path] = None) -> Dict[str, float]:
    """Train one variant on the full training split; test metrics + kNN agreement + timing.

    Cached per process, so ``run_accuracy`` and ``run_knn`` share the trained models.
    """
    cfg = VARIANTS[variant]
    detach = DEFAULT_DETACH_TARGETS if cfg.get("detach") is None else cfg["detach"]
    # canonical key: "refnet" and "refnet_nodetach" are the same run while the default is False
    key = (dataset, cfg["refnet"], cfg.get("ms_weight", 0.0), detach if cfg["refnet"] else None, seed, s)
    if key in _RUN_CACHE:
        return _RUN_CACHE[key]
    train_dl, valid_dl, test_dl = _data(dataset, seed, s, rosmap_path)
    spec = infer_data_spec(train_dl)
    encoders, fusion, head, objective, args = build(spec, variant, seed, s)
    t0 = time.perf_counter()
    res = train(encoders, fusion, head, train_dl, valid_dl, s.epochs, task=spec.task,
                optimtype=torch.optim.AdamW, lr=s.lr, weight_decay=s.weight_decay, objective=objective,
                objective_args_dict=args, save=None, device="cpu", seed=seed, progress=False,
                track_complexity=False)
    m = test(res.model, test_dl, task=spec.task, no_robust=True, full=True, device="cpu")
    z, y = fused_embeddings(res.model, test_dl)
    row = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "auroc": m["auroc"],
           "knn": knn_agreement(z, y, s.k), "best_epoch": res.best_epoch, "seconds": time.perf_counter() - t0}
    logger.info("%s %s seed %d: acc %.4f f1 %.4f auroc %.4f knn %.4f (best epoch %d, %.1fs)", dataset, variant,
                seed, row["accuracy"], row["f1_macro"], row["auroc"], row["knn"], res.best_epoch, row["seconds"])
    _RUN_CACHE[key] = row
    return row


# ----------------------------------------------------------------------------- aggregation
def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def _summarise(runs: Dict[str, List[Dict[str, float]]], keys: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    return {v: {k: _mean_std([r[k] for r in rows]) for k in keys} for v, rows in runs.items()}


# ----------------------------------------------------------------------------- parts
def _settings_dict(datasets: Sequence[str], settings: SettingsArg) -> Dict[str, Any]:
    return {ds: asdict(settings_for(ds, settings)) for ds in datasets}


def run_accuracy(datasets: Sequence[str] = ("rosmap", "digits"), seeds: Sequence[int] = range(5),
                 variants: Sequence[str] = ACCURACY_VARIANTS, settings: SettingsArg = None,
                 rosmap_path: Optional[Path] = None) -> Dict[str, Any]:
    """Test accuracy / macro F1 / AUROC of each variant on each dataset over ``seeds``.

    Args:
        datasets: "rosmap" (MOGONET CSVs at ``rosmap_path``) and/or registered dataset names.
        seeds: seeds; each seed fixes the data split, initial weights and batch order.
        variants: keys of :data:`VARIANTS`.
        settings: None (per-dataset defaults, :data:`DATASET_SETTINGS`), one :class:`Settings`
            for all, or ``{dataset: Settings}``.
        rosmap_path: ROSMAP folder. Default: ``../shared/data/ROSMAP`` next to the repository.

    Returns:
        ``{"settings": {dataset: {...}}, "seeds": [...], "results": {dataset: {variant: {metric:
        {mean, std, n}}}}, "runs": {dataset: {variant: [per-seed rows]}}}``.
    """
    seeds = list(seeds)
    out: Dict[str, Any] = {"settings": _settings_dict(datasets, settings), "seeds": seeds, "results": {}, "runs": {}}
    for ds in datasets:
        s = settings_for(ds, settings)
        runs = {v: [fit_variant(ds, v, sd, s, rosmap_path) for sd in seeds] for v in variants}
        out["runs"][ds] = runs
        out["results"][ds] = _summarise(runs, ("accuracy", "f1_macro", "auroc", "seconds"))
    return out


def run_knn(datasets: Sequence[str] = ("rosmap", "digits"), seeds: Sequence[int] = range(5),
            variants: Sequence[str] = ACCURACY_VARIANTS, settings: SettingsArg = None,
            rosmap_path: Optional[Path] = None) -> Dict[str, Any]:
    """kNN label agreement (k = ``settings.k``, cosine, self excluded) of the fused test
    embeddings of each variant (the models of :func:`run_accuracy`, shared through a
    per-process cache), plus the raw concatenated test inputs as a reference row ``raw_input``.

    Returns:
        ``{"settings", "seeds", "results": {dataset: {variant: {"knn": {mean, std, n}}}}, "runs"}``.
    """
    seeds = list(seeds)
    out: Dict[str, Any] = {"settings": _settings_dict(datasets, settings), "seeds": seeds, "results": {}, "runs": {}}
    for ds in datasets:
        s = settings_for(ds, settings)
        runs = {v: [{"knn": fit_variant(ds, v, sd, s, rosmap_path)["knn"]} for sd in seeds] for v in variants}
        runs["raw_input"] = [{"knn": raw_knn(ds, sd, s, rosmap_path)} for sd in seeds]
        out["runs"][ds] = runs
        out["results"][ds] = _summarise(runs, ("knn",))
    return out


def run_reference(datasets: Sequence[str] = ("rosmap", "digits"), settings: SettingsArg = None,
                  rosmap_path: Optional[Path] = None, C: float = 0.05) -> Dict[str, Any]:
    """No-deep-learning reference on the same splits: scikit-learn logistic regression
    (features standardised on the training split, ``C``) on all modalities concatenated, fitted
    on the training split (the validation rows unused). Deterministic: one fit per dataset.

    Returns:
        ``{"C": C, "results": {dataset: {"logreg": {metric: {mean, std, n}}}}}``.
    """
    from multizoo_ext.runner.baselines import loader_arrays, logistic_regression

    out: Dict[str, Any] = {"C": C, "results": {}}
    for ds in datasets:
        s = settings_for(ds, settings)
        train_dl, _, test_dl = _data(ds, 0, s, rosmap_path)
        t0 = time.perf_counter()
        train_xy = loader_arrays(train_dl)
        fit = logistic_regression(train_xy, loader_arrays(test_dl), "classification",
                                  n_out=int(train_xy[1].max()) + 1, cs=(C,), max_iter=5000)
        m = fit["test"]
        row = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "auroc": m["auroc"],
               "seconds": time.perf_counter() - t0}
        out["results"][ds] = {"logreg": {k: _mean_std([v]) for k, v in row.items()}}
    return out


def _finetune_loader(labeled: DataLoader, s: Settings, seed: int) -> DataLoader:
    """The labeled loader, or, when it has fewer than ``ceil(min_steps / epochs)`` batches, a loader
    over the same rows that draws that many batches per epoch (successive random permutations,
    batch size ``min(batch_size, n_labeled)``). Every fraction then gets at least ``min_steps``
    optimiser steps while validation still runs ``epochs`` times."""
    per_epoch = math.ceil(s.min_steps / s.epochs)
    if len(labeled) >= per_epoch:
        return labeled
    bs = min(s.batch_size, len(labeled.dataset))
    sampler = RandomSampler(labeled.dataset, num_samples=per_epoch * bs,
                            generator=torch.Generator().manual_seed(seed))
    return DataLoader(labeled.dataset, batch_size=bs, sampler=sampler)


def _fit_fraction(dataset: str, variant: str, fraction: float, seed: int, s: Settings,
                  rosmap_path: Optional[Path]) -> Dict[str, float]:
    train_dl, valid_dl, test_dl = _data(dataset, seed, s, rosmap_path)
    spec = infer_data_spec(train_dl)
    labeled, unlabeled = split_labeled(train_dl, fraction, seed=seed, batch_size=s.batch_size)
    fit_dl = _finetune_loader(labeled, s, seed)
    if fraction == 1 and variant in ("concat_sup", "refnet_sup") and fit_dl is labeled:
        # 100 % without pre-training is exactly the accuracy part's run: reuse it (cached).
        r = fit_variant(dataset, "concat" if variant == "concat_sup" else "refnet", seed, s, rosmap_path)
        return {"accuracy": r["accuracy"], "f1_macro": r["f1_macro"], "auroc": r["auroc"],
                "n_labeled": len(train_dl.dataset), "steps": s.epochs * len(train_dl), "seconds": r["seconds"]}
    base = "concat" if variant == "concat_sup" else "refnet"
    encoders, fusion, head, objective, args = build(spec, base, seed, s)
    t0 = time.perf_counter()
    if variant == "refnet_pre":
        pre_dl = unlabeled if unlabeled is not None else labeled  # 100 %: same rows, labels unused
        pretrain(encoders, fusion, pre_dl, s.pretrain_epochs,
                 objective=refiner_only_objective(refiner_weight=s.refiner_weight, refiner_loss=s.refiner_loss),
                 optimtype=torch.optim.AdamW, lr=s.lr, weight_decay=s.weight_decay, device="cpu", seed=seed,
                 progress=False)
    res = train(encoders, fusion, head, fit_dl, valid_dl, s.epochs, task=spec.task,
                optimtype=torch.optim.AdamW, lr=s.lr, weight_decay=s.weight_decay, objective=objective,
                objective_args_dict=args, save=None, device="cpu", seed=seed, progress=False,
                track_complexity=False)
    m = test(res.model, test_dl, task=spec.task, no_robust=True, full=True, device="cpu")
    row = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "auroc": m["auroc"],
           "n_labeled": len(labeled.dataset), "steps": s.epochs * len(fit_dl), "best_epoch": res.best_epoch,
           "seconds": time.perf_counter() - t0}
    logger.info("%s %s %g%% seed %d: acc %.4f (%d labeled, %d steps, best epoch %d, %.1fs)", dataset, variant,
                100 * fraction, seed, row["accuracy"], row["n_labeled"], row["steps"], res.best_epoch, row["seconds"])
    return row


def run_label_efficiency(datasets: Sequence[str] = ("digits", "rosmap"), seeds: Sequence[int] = range(5),
                         fractions: Sequence[float] = FRACTIONS, variants: Sequence[str] = LABEL_VARIANTS,
                         settings: SettingsArg = None, rosmap_path: Optional[Path] = None) -> Dict[str, Any]:
    """Test accuracy vs the fraction of training labels kept, with and without refiner pre-training.

    ``split_labeled(train, fraction, seed)`` keeps a stratified ``fraction`` of the training
    split labeled; ``concat_sup`` / ``refnet_sup`` train on it alone; ``refnet_pre`` first
    pre-trains encoders + ReFNet (refiner loss only) for ``pretrain_epochs`` on the unlabeled
    rest (at 100 %: on the same rows, without their labels), then fine-tunes like
    ``refnet_sup``. Fine-tuning runs ``epochs`` epochs of at least ``ceil(min_steps / epochs)``
    batches each (small labeled sets are cycled, see ``_finetune_loader``) and keeps the best
    epoch on the full validation split.

    Returns:
        ``{"settings", "seeds", "fractions", "results": {dataset: {fraction: {variant: {metric:
        {mean, std, n}}}}}, "runs"}`` (fractions as strings, e.g. ``"0.05"``).
    """
    seeds = list(seeds)
    out: Dict[str, Any] = {"settings": _settings_dict(datasets, settings), "seeds": seeds,
                           "fractions": list(fractions), "results": {}, "runs": {}}
    for ds in datasets:
        s = settings_for(ds, settings)
        out["results"][ds], out["runs"][ds] = {}, {}
        for frac in fractions:
            runs = {v: [_fit_fraction(ds, v, frac, sd, s, rosmap_path) for sd in seeds] for v in variants}
            out["runs"][ds][f"{frac:g}"] = runs
            out["results"][ds][f"{frac:g}"] = _summarise(runs, ("accuracy", "f1_macro", "auroc", "n_labeled",
                                                                "steps"))
    return out


# ----------------------------------------------------------------------------- markdown
LABELS = {"concat": "Concat", "refnet": "ReFNet(Concat)", "refnet_ms": "ReFNet(Concat) + MS 0.1",
          "refnet_detach": "ReFNet(Concat), detach_targets=True",
          "refnet_nodetach": "ReFNet(Concat), detach_targets=False", "raw_input": "raw inputs (no training)",
          "concat_sup": "Concat, supervised only", "refnet_sup": "ReFNet, supervised only",
          "refnet_pre": "ReFNet, pre-trained + fine-tuned"}


def _fmt(ms: Dict[str, float], digits: int = 3) -> str:
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def paired_difference(runs: Dict[str, List[Dict[str, float]]], base: str, other: str,
                      key: str = "accuracy") -> Dict[str, float]:
    """Per-seed difference ``other - base`` (same seeds: same split, initial encoder/head weights
    and batch order): mean, std, and how many seeds ``other`` wins / ties / loses."""
    d = np.array([o[key] - b[key] for b, o in zip(runs[base], runs[other])], dtype=float)
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if d.size > 1 else 0.0,
            "wins": int((d > 1e-12).sum()), "ties": int((np.abs(d) <= 1e-12).sum()),
            "losses": int((d < -1e-12).sum()), "n": int(d.size)}


def _paired_lines(r: Dict[str, Any], pairs: Sequence[Tuple[str, str]]) -> List[str]:
    lines = ["| dataset | paired difference (same seeds) | accuracy | macro F1 | AUROC "
             "| wins / ties / losses (accuracy) |", "|---|---|---|---|---|---|"]
    for ds, runs in r["runs"].items():
        for base, other in pairs:
            if base not in runs or other not in runs:
                continue
            cells = []
            for key in ("accuracy", "f1_macro", "auroc"):
                pd_ = paired_difference(runs, base, other, key)
                cells.append(f"{pd_['mean']:+.3f} ± {pd_['std']:.3f}")
            acc = paired_difference(runs, base, other, "accuracy")
            lines.append(f"| {ds} | {LABELS.get(other, other)} − {LABELS.get(base, base)} | " + " | ".join(cells)
                         + f" | {acc['wins']} / {acc['ties']} / {acc['losses']} |")
    return lines + [""]


def to_markdown(results: Dict[str, Any]) -> str:
    """Markdown tables for whatever parts ``results`` holds (keys ``accuracy``, ``detach``,
    ``knn``, ``label``: the dicts returned by the ``run_*`` functions)."""
    lines: List[str] = []
    for part, title in (("accuracy", "Test accuracy, macro F1, AUROC"),
                        ("detach", "detach_targets: ReFNet(Concat) with and without stop-gradient targets")):
        if part not in results:
            continue
        r = results[part]
        lines += [f"### {title} (mean ± std over {len(r['seeds'])} seeds)", ""]
        lines += ["| dataset | variant | accuracy | macro F1 | AUROC | s / run |", "|---|---|---|---|---|---|"]
        for ds, per in r["results"].items():
            for v, m in per.items():
                lines.append(f"| {ds} | {LABELS.get(v, v)} | {_fmt(m['accuracy'])} | {_fmt(m['f1_macro'])} | "
                             f"{_fmt(m['auroc'])} | {m['seconds']['mean']:.1f} |")
        lines.append("")
        pairs = ([("concat", "refnet"), ("concat", "refnet_ms"), ("refnet", "refnet_ms")] if part == "accuracy"
                 else [("refnet_nodetach", "refnet_detach")])
        lines += _paired_lines(r, pairs)
    if "reference" in results:
        r = results["reference"]
        lines += [f"### Reference: logistic regression on the concatenated inputs (C={r['C']}, standardised, "
                  "same train/test split, one deterministic fit)", ""]
        lines += ["| dataset | accuracy | macro F1 | AUROC |", "|---|---|---|---|"]
        for ds, per in r["results"].items():
            m = per["logreg"]
            lines.append(f"| {ds} | {m['accuracy']['mean']:.3f} | {m['f1_macro']['mean']:.3f} | "
                         f"{m['auroc']['mean']:.3f} |")
        lines.append("")
    if "knn" in results:
        r = results["knn"]
        k = next(iter(r["settings"].values()))["k"] if r["settings"] else 10
        lines += [f"### kNN label agreement of the fused test embeddings (k={k}, cosine, self excluded; "
                  f"mean ± std over {len(r['seeds'])} seeds)", ""]
        lines += ["| dataset | variant | kNN agreement |", "|---|---|---|"]
        for ds, per in r["results"].items():
            for v, m in per.items():
                lines.append(f"| {ds} | {LABELS.get(v, v)} | {_fmt(m['knn'])} |")
        lines.append("")
    if "label" in results:
        r = results["label"]
        lines += [f"### Label efficiency: test accuracy (mean ± std over {len(r['seeds'])} seeds)", ""]
        for ds, per_frac in r["results"].items():
            variants = list(next(iter(per_frac.values())).keys())
            paired = "refnet_pre" in variants and "refnet_sup" in variants
            extra = " | pre-trained − supervised ReFNet, paired (wins/ties/losses) |" if paired else " |"
            lines += [f"**{ds}**", "",
                      "| labels | n labeled | fine-tune steps | " + " | ".join(LABELS.get(v, v) for v in variants)
                      + extra, "|---|---|---|" + "---|" * (len(variants) + int(paired))]
            for frac, per in per_frac.items():
                first = next(iter(per.values()))
                cells = " | ".join(_fmt(per[v]["accuracy"]) for v in variants)
                if paired:
                    d = paired_difference(r["runs"][ds][frac], "refnet_sup", "refnet_pre")
                    cells += f" | {d['mean']:+.3f} ± {d['std']:.3f} ({d['wins']}/{d['ties']}/{d['losses']})"
                lines.append(f"| {float(frac) * 100:g} % | {first['n_labeled']['mean']:.0f} | "
                             f"{first['steps']['mean']:.0f} | {cells} |")
            lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> Dict[str, Any]:
    """Command line (``python benchmarks/bench_refnet.py``); returns
    the results dict (also written with ``--json``).

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
        prog: program name in the usage line (default: the running script's name).
    """
    p = argparse.ArgumentParser(prog=prog,
                                description="ReFNet measurements: accuracy, detach option, kNN graph agreement, "
                                            "label efficiency (CPU).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="accuracy,detach,knn,label,reference",
                   help="comma-separated subset of accuracy,detach,knn,label,reference")
    p.add_argument("--datasets", default="rosmap,digits", help="datasets for accuracy/detach/knn")
    p.add_argument("--label-datasets", default="digits,rosmap", help="datasets for the label-efficiency part")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0..n-1)")
    p.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS), help="label fractions")
    p.add_argument("--epochs", type=int, default=None, help="supervised epochs (default: per dataset, 60 rosmap / "
                                                             "30 digits)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: per dataset, 32 / 64)")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help=f"refiner pre-training epochs (default: {Settings.pretrain_epochs})")
    p.add_argument("--min-steps", type=int, default=None,
                   help=f"label part: minimum optimiser steps of a fine-tuning run (default: {Settings.min_steps})")
    p.add_argument("--rosmap-path", type=Path, default=DEFAULT_ROSMAP)
    p.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 3 epochs, 2 pre-training epochs")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown tables here")
    p.add_argument("--json", type=Path, default=None, help="write all results (with per-seed rows) here")
    p.add_argument("--verbose", action="store_true", help="log every run")
    p.add_argument("--from-json", type=Path, default=None,
                   help="only print the markdown of a results file written by --json (no training)")
    a = p.parse_args(argv)
    if a.from_json is not None:
        results = json.loads(a.from_json.read_text())
        print(to_markdown(results))
        return results
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO if a.verbose else logging.WARNING)
    torch.set_num_threads(a.threads)

    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    unknown = set(parts) - {"accuracy", "detach", "knn", "label", "reference"}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}")
    datasets = [x.strip() for x in a.datasets.split(",") if x.strip()]
    label_datasets = [x.strip() for x in a.label_datasets.split(",") if x.strip()]
    fractions = [float(x) for x in a.fractions.split(",") if x.strip()]
    overrides = {k: v for k, v in (("epochs", a.epochs), ("batch_size", a.batch_size),
                                   ("pretrain_epochs", a.pretrain_epochs), ("min_steps", a.min_steps))
                 if v is not None}
    if a.quick:
        overrides.update(epochs=3, pretrain_epochs=2, min_steps=10)
    n_seeds = min(a.seeds, 2) if a.quick else a.seeds
    seeds = list(range(n_seeds))
    settings = {ds: replace(settings_for(ds), **overrides) for ds in set(datasets) | set(label_datasets)}

    results: Dict[str, Any] = {}
    timings: Dict[str, float] = {}
    cpu: Dict[str, float] = {}
    t_all, c_all = time.perf_counter(), time.process_time()
    for part in parts:
        t0, c0 = time.perf_counter(), time.process_time()
        if part == "accuracy":
            results["accuracy"] = run_accuracy(datasets, seeds, ACCURACY_VARIANTS, settings, a.rosmap_path)
        elif part == "detach":
            results["detach"] = run_accuracy(datasets, seeds, DETACH_VARIANTS, settings, a.rosmap_path)
        elif part == "knn":
            results["knn"] = run_knn(datasets, seeds, ACCURACY_VARIANTS, settings, a.rosmap_path)
        elif part == "label":
            results["label"] = run_label_efficiency(label_datasets, seeds, fractions, LABEL_VARIANTS, settings,
                                                    a.rosmap_path)
        elif part == "reference":
            results["reference"] = run_reference(datasets, settings, a.rosmap_path)
        timings[part] = time.perf_counter() - t0
        cpu[part] = time.process_time() - c0
        logger.info("part %s done in %.1fs", part, timings[part])
    timings["total"] = time.perf_counter() - t_all
    cpu["total"] = time.process_time() - c_all
    results["timings_s"] = timings
    results["cpu_s"] = cpu
    results["torch"] = torch.__version__
    results["argv"] = list(sys.argv[1:] if argv is None else argv)
    md = to_markdown(results)
    md += ("\nWall time (s; parts share cached runs): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
           + "\nProcess CPU time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()) + "\n")
    print(md)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(md)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
