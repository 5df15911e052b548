"""The settings of a benchmark (:class:`BenchmarkConfig`), their checks, and the grid of
runs they describe (:func:`expand_runs`).

A method's training recipe (objective, its keywords, the fusion's learning-rate multiplier,
constructor keywords) is registered with the method and read by
:func:`multizoo_ext.builder.build_method`; the config holds only the user's overrides of it
(``None`` / absent = the recipe's).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from multizoo_ext.builder import PLAIN_OBJECTIVE
from multizoo_ext.registry import DATASETS, FUSIONS, OBJECTIVES
from multizoo_ext.utils import resolve_device
from multizoo_ext.validation import check_number

__all__ = ["BenchmarkConfig", "RunSpec", "expand_runs", "jsonable", "settings_hash", "SINGLE_MODALITY", "LOGREG",
           "BASELINES", "QUICK_SETTINGS", "SWEEPABLE", "PLAIN_OBJECTIVE"]

#: Method name of the best-single-modality baseline row.
SINGLE_MODALITY = "best-single-modality"
#: Method name of the scikit-learn logistic-regression baseline row.
LOGREG = "logreg"
BASELINES = (SINGLE_MODALITY, LOGREG)

#: What :meth:`BenchmarkConfig.quick_config` sets: the bundled digits dataset, the two methods
#: beside the plain baseline, two seeds and a few epochs; about a minute on 2 CPU cores.
QUICK_SETTINGS: Dict[str, Any] = {
    "datasets": ["digits"],
    "fusions": ["concat", "refnet", "deq"],
    "seeds": [0, 1],
    "epochs": 8,
    "logreg_cs": (0.05,),
    "num_threads": 1,  # small models: one thread is fastest, and immune to a busy machine
}

#: Settings a sweep may vary (each value of a sweep axis gives its own rows); besides these,
#: ``fusion_kwargs.<fusion>.<key>`` and ``objective_kwargs.<fusion>.<key>`` axes vary one keyword.
SWEEPABLE = ("epochs", "batch_size", "lr", "weight_decay", "encoder", "hidden", "embed_dim", "head_hidden",
             "early_stop", "patience", "logreg_cs")


@dataclass
class BenchmarkConfig:
    """Every setting of a benchmark, with its default in this one place.

    Attributes:
        datasets: dataset entry names, one table per entry: a registered dataset name, or a
            key of ``dataset_loaders`` (so one loader can appear twice with two paths).
            Default: ``["digits"]`` (bundled, no download).
        dataset_loaders: entry name -> registered dataset (loader) name, for entries whose
            name is not itself a registered dataset. Default: empty.
        fusions: registered fusion names. Default: ``["concat", "lowrank"]``.
        seeds: distinct non-negative seeds; each sets the validation split, initial weights
            and data order of a run. Default: 0..4.
        epochs: maximum training epochs per run. Default: 30.
        batch_size: Default: 64.
        lr, weight_decay: AdamW settings. Defaults: 1e-3, 1e-2.
        encoder: per-modality encoder, "mlp" or "identity" (builder). Default: "mlp".
        hidden, embed_dim: MLP encoder hidden and output widths. Defaults: 64, 32.
        head_hidden: hidden width of an MLP head; None = a linear head. Default: None.
        early_stop, patience: stop after ``patience`` epochs without validation gain.
            Defaults: False, 7 (MultiBench).
        device: None = CUDA if available, else CPU; or "cpu", "cuda:1", ...
        num_threads: CPU threads of torch and of NumPy's BLAS during each run (restored
            afterwards); None leaves them as they are. Default: None.
        jobs: worker processes the independent runs are spread over (1 = in this process).
        output: folder for the results. Default: "runs/bench".
        data_kwargs: per dataset entry, extra keywords for its loader, e.g.
            ``{"rosmap": {"path": "data/ROSMAP"}}``.
        fusion_kwargs: per fusion, constructor keywords over the method's recipe.
        objectives: per fusion, objective registry name over the recipe's ("default" = the
            task's plain criterion).
        objective_kwargs: per fusion, keywords for its objective factory.
        fusion_lr_mult: per fusion, learning-rate multiplier of the fusion's parameters over
            the recipe's.
        sweep: setting -> list of values; every combination of values is its own variant
            (rows labelled ``method [setting=value]``). Keys: :data:`SWEEPABLE`, or
            ``fusion_kwargs.<fusion>.<key>`` / ``objective_kwargs.<fusion>.<key>``.
        references: published numbers shown beside ours, marked as such: dicts with
            ``dataset`` (entry name), ``method`` (label), ``source`` (where the number comes
            from) and metric values (e.g. ``accuracy = 0.815``).
        robustness: also evaluate each fusion on noisy / missing-modality copies of the test
            split. Default: False.
        robustness_kwargs: keywords for the robustness-loader builder.
        baselines: add the best-single-modality and logistic-regression rows. Default: True.
        logreg_cs: grid of ``C`` for the logistic-regression baseline, chosen on the
            validation split. Default: (0.01, 0.05, 0.2, 1.0).
        plots: write figures when matplotlib is installed. Default: True.
        resume: reuse finished runs in ``output``; False moves the old results aside into
            ``results.old-<timestamp>/`` and starts over. Default: True.
        fail_fast: raise on the first failing run; False records it as ``status: "failed"``
            (retried on the next resume) and goes on. Default: True.
        progress: tqdm bar over the grid; None = only on a terminal. Default: False.
        search_trials: trials of the search stage per (dataset, sweep point, method), the
            same for every method, baselines included; 0 = no search (every method at the
            settings above). See :mod:`multizoo_ext.runner.search`. Default: 0.
        search_space: key -> distribution (a list of values, ``{"log_uniform": [lo, hi]}``
            or ``{"uniform": [lo, hi]}``); None = ``DEFAULT_SEARCH_SPACE`` of
            :mod:`multizoo_ext.runner.search`. Default: None.
        search_seed: seeds the sampling of the trials (with the dataset and method names)
            and is the training seed of every trial. Default: 0.
        quick: marks a config made by :meth:`quick_config` (informational).
    """

    datasets: List[str] = field(default_factory=lambda: ["digits"])
    dataset_loaders: Dict[str, str] = field(default_factory=dict)
    fusions: List[str] = field(default_factory=lambda: ["concat", "lowrank"])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    encoder: str = "mlp"
    hidden: int = 64
    embed_dim: int = 32
    head_hidden: Optional[int] = None
    early_stop: bool = False
    patience: int = 7
    device: Optional[str] = None
    num_threads: Optional[int] = None
    jobs: int = 1
    output: str = "runs/bench"
    data_kwargs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    fusion_kwargs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    objectives: Dict[str, str] = field(default_factory=dict)
    objective_kwargs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    fusion_lr_mult: Dict[str, float] = field(default_factory=dict)
    sweep: Dict[str, List[Any]] = field(default_factory=dict)
    references: List[Dict[str, Any]] = field(default_factory=list)
    robustness: bool = False
    robustness_kwargs: Dict[str, Any] = field(default_factory=dict)
    baselines: bool = True
    logreg_cs: Tuple[float, ...] = (0.01, 0.05, 0.2, 1.0)
    plots: bool = True
    resume: bool = True
    fail_fast: bool = True
    progress: Optional[bool] = False
    search_trials: int = 0
    search_space: Optional[Dict[str, Any]] = None
    search_seed: int = 0
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> "BenchmarkConfig":
        """A config with :data:`QUICK_SETTINGS`; explicit ``overrides`` win over them."""
        return cls(**{**QUICK_SETTINGS, "quick": True, **overrides})

    @classmethod
    def field_names(cls) -> List[str]:
        """The names of the settings (the valid keys of a config file's top level)."""
        return [f.name for f in dataclasses.fields(cls)]

    def validated(self) -> "BenchmarkConfig":
        """A checked copy with lower-case names and plain-typed values.

        Raises:
            ValueError: an empty grid, unknown dataset / fusion / objective names (the
                message lists the known ones), bad seeds, numeric settings or sweep axes.
        """
        cfg = copy.deepcopy(self)
        for what, names in (("datasets", cfg.datasets), ("fusions", cfg.fusions)):
            if isinstance(names, str) or not names:
                raise ValueError(f"{what} must be a non-empty list of names, got {names!r}")
        if not isinstance(cfg.dataset_loaders, dict):
            raise ValueError(f"dataset_loaders must map an entry name to a registered dataset, "
                             f"got {type(cfg.dataset_loaders).__name__}")
        cfg.dataset_loaders = {str(k).lower(): str(v).lower() for k, v in cfg.dataset_loaders.items()}
        for loader in cfg.dataset_loaders.values():
            DATASETS.get(loader)  # ValueError listing the known datasets
        cfg.datasets = _unique([str(n).lower() for n in cfg.datasets], "datasets")
        for name in cfg.datasets:
            DATASETS.get(cfg.loader_of(name))
        cfg.fusions = _unique([str(n).lower() for n in cfg.fusions], "fusions")
        for name in cfg.fusions:
            if name in BASELINES:
                raise ValueError(f"{name!r} is the name of a baseline row, not a fusion; the runner adds it "
                                 "by itself (baselines=True)")
            FUSIONS.get(name)  # ValueError listing the known fusions
        if isinstance(cfg.seeds, (int, str)) or not cfg.seeds:
            raise ValueError(f"seeds must be a non-empty list of non-negative integers, got {cfg.seeds!r}")
        if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in cfg.seeds):
            raise ValueError(f"seeds must be non-negative integers, got {list(cfg.seeds)!r}")
        cfg.seeds = _unique([int(s) for s in cfg.seeds], "seeds")
        _check_training(cfg)
        for name, low in (("jobs", 1), ("search_trials", 0), ("search_seed", 0)):
            check_number(name, getattr(cfg, name), low, integer=True)
        cfg.data_kwargs = _scoped(cfg.data_kwargs, "data_kwargs", "dataset entry", cfg.datasets, cfg.dataset_loaders)
        cfg.fusion_kwargs = _scoped(cfg.fusion_kwargs, "fusion_kwargs", "fusion", FUSIONS.names())
        cfg.objective_kwargs = _scoped(cfg.objective_kwargs, "objective_kwargs", "fusion", FUSIONS.names())
        if not isinstance(cfg.objectives, dict):
            raise ValueError(f"objectives must map a fusion name to an objective name, got "
                             f"{type(cfg.objectives).__name__}")
        cfg.objectives = {str(k).lower(): str(v).lower() for k, v in cfg.objectives.items()}
        for fusion, name in cfg.objectives.items():
            FUSIONS.get(fusion)
            if name != PLAIN_OBJECTIVE:
                OBJECTIVES.get(name)  # ValueError listing the known objectives
        if not isinstance(cfg.fusion_lr_mult, dict):
            raise ValueError(f"fusion_lr_mult must map a fusion name to a number, got "
                             f"{type(cfg.fusion_lr_mult).__name__}")
        mults: Dict[str, float] = {}
        for k, v in cfg.fusion_lr_mult.items():
            FUSIONS.get(str(k).lower())
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
                raise ValueError(f"fusion_lr_mult values must be finite numbers > 0, got {k}={v!r}")
            mults[str(k).lower()] = float(v)
        cfg.fusion_lr_mult = mults
        cfg.sweep = _check_sweep(cfg.sweep, cfg)
        if cfg.search_trials or cfg.search_space is not None:
            from multizoo_ext.runner.search import check_search_space

            cfg.search_space = check_search_space(cfg.search_space, cfg)
        cfg.search_trials, cfg.search_seed = int(cfg.search_trials), int(cfg.search_seed)
        cfg.references = _check_references(cfg.references, cfg.datasets)
        if cfg.device is not None:
            resolve_device(cfg.device)  # ValueError for a bad or absent device
        if cfg.num_threads is not None and (isinstance(cfg.num_threads, bool) or
                                            not isinstance(cfg.num_threads, (int, np.integer)) or cfg.num_threads < 1):
            raise ValueError(f"num_threads must be None or an integer >= 1, got {cfg.num_threads!r}")
        return cfg

    def loader_of(self, dataset: str) -> str:
        """The registered dataset name behind dataset entry ``dataset``."""
        return self.dataset_loaders.get(dataset, dataset)

    def methods(self) -> List[str]:
        """Row names per dataset: the fusions, then the baselines when enabled."""
        return list(self.fusions) + (list(BASELINES) if self.baselines else [])

    def method_overrides(self, fusion: str) -> Dict[str, Any]:
        """The user's overrides of ``fusion``'s recipe, as keywords of ``build_method``."""
        return {"fusion_kwargs": dict(self.fusion_kwargs.get(fusion, {})),
                "objective": self.objectives.get(fusion),
                "objective_kwargs": dict(self.objective_kwargs.get(fusion, {})),
                "fusion_lr_mult": self.fusion_lr_mult.get(fusion)}

    def run_settings(self, dataset: str, method: str) -> Dict[str, Any]:
        """The settings of run ``(dataset, method, any seed)`` that do not need the data: for a
        fusion, the effective method settings (``build_method(...).settings``) are added by
        the runner. Output folder, device, plots, jobs and the other datasets' / fusions'
        settings are left out, so changing them reuses finished runs."""
        base: Dict[str, Any] = {"dataset": dataset, "loader": self.loader_of(dataset),
                                "data_kwargs": self.data_kwargs.get(dataset, {}), "method": method}
        if method == LOGREG:
            return {**base, "logreg_cs": list(self.logreg_cs)}
        base.update(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                    encoder=self.encoder, hidden=self.hidden, embed_dim=self.embed_dim,
                    head_hidden=self.head_hidden, early_stop=self.early_stop, patience=self.patience)
        if method == SINGLE_MODALITY:
            return base
        base.update(robustness=self.robustness, robustness_kwargs=self.robustness_kwargs if self.robustness else {})
        return base


def _check_training(cfg: BenchmarkConfig) -> None:
    for name, low in (("epochs", 1), ("batch_size", 1), ("hidden", 1), ("embed_dim", 1), ("patience", 0)):
        check_number(name, getattr(cfg, name), low, integer=True)
    if cfg.head_hidden is not None and (isinstance(cfg.head_hidden, bool) or
                                        not isinstance(cfg.head_hidden, (int, np.integer)) or cfg.head_hidden < 1):
        raise ValueError(f"head_hidden must be None or an integer >= 1, got {cfg.head_hidden!r}")
    if isinstance(cfg.lr, bool) or not isinstance(cfg.lr, (int, float)) or not cfg.lr > 0 \
            or isinstance(cfg.weight_decay, bool) or not isinstance(cfg.weight_decay, (int, float)) \
            or not cfg.weight_decay >= 0:
        raise ValueError(f"lr must be > 0 and weight_decay >= 0, got lr={cfg.lr!r}, "
                         f"weight_decay={cfg.weight_decay!r}")
    if cfg.encoder not in ("mlp", "identity"):
        raise ValueError(f"encoder must be 'mlp' or 'identity', got {cfg.encoder!r}")
    cs = (cfg.logreg_cs,) if isinstance(cfg.logreg_cs, (int, float)) else tuple(cfg.logreg_cs)
    if not cs or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not float(c) > 0 for c in cs):
        raise ValueError(f"logreg_cs must be a non-empty list of positive numbers, got {cfg.logreg_cs!r}")
    cfg.logreg_cs = tuple(float(c) for c in cs)


def _unique(values: List[Any], what: str) -> List[Any]:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} must not repeat entries, got {values!r}")
    return values


def _scoped(mapping: Any, what: str, kind: str, known: List[str],
            aliases: Optional[Dict[str, str]] = None) -> Dict[str, Dict[str, Any]]:
    if not isinstance(mapping, dict):
        raise ValueError(f"{what} must map a {kind} name to a dict of keywords, got {type(mapping).__name__}")
    out: Dict[str, Dict[str, Any]] = {}
    for key, kwargs in mapping.items():
        name = str(key).lower()
        if kind == "fusion":
            FUSIONS.get(name)  # ValueError listing the known fusions
        elif name not in known:
            try:  # a registered dataset not in the grid is allowed (its settings are unused)
                DATASETS.get((aliases or {}).get(name, name))
            except ValueError:
                raise ValueError(f"{what} names {name!r}, which is neither a dataset of the grid nor a "
                                 f"registered dataset; grid datasets: {', '.join(known)}") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"{what}[{key!r}] must be a dict of keywords, got {type(kwargs).__name__}")
        out[name] = dict(kwargs)
    return out


def _check_sweep(sweep: Any, cfg: BenchmarkConfig) -> Dict[str, List[Any]]:
    if not isinstance(sweep, dict):
        raise ValueError(f"sweep must map a setting to a list of values, got {type(sweep).__name__}")
    out: Dict[str, List[Any]] = {}
    for key, values in sweep.items():
        parts = str(key).split(".")
        if not (key in SWEEPABLE or (len(parts) == 3 and parts[0] in ("fusion_kwargs", "objective_kwargs"))):
            raise ValueError(f"sweep axis {key!r} is not a setting that can be swept; valid: "
                             f"{', '.join(SWEEPABLE)}, fusion_kwargs.FUSION.KEY, objective_kwargs.FUSION.KEY")
        if len(parts) == 3:
            FUSIONS.get(parts[1].lower())
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"sweep axis {key!r} must be a non-empty list of values, got {values!r}")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise ValueError(f"sweep axis {key!r} repeats a value: {list(values)!r}")
        out[str(key)] = list(values)
    for variant in _variants(out):  # each point must itself be a valid config
        _check_training(_apply(cfg, variant))
    return out


def _check_references(refs: Any, datasets: List[str]) -> List[Dict[str, Any]]:
    if not isinstance(refs, (list, tuple)):
        raise ValueError(f"references must be a list of dicts, got {type(refs).__name__}")
    out: List[Dict[str, Any]] = []
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise ValueError(f"references[{i}] must be a dict, got {type(ref).__name__}")
        missing = [k for k in ("dataset", "method", "source") if not ref.get(k)]
        if missing:
            raise ValueError(f"references[{i}] lacks {', '.join(missing)}; a reference row needs dataset, method, "
                             "source and metric values")
        if str(ref["dataset"]).lower() not in datasets:
            raise ValueError(f"references[{i}] is for dataset {ref['dataset']!r}, which is not in the grid "
                             f"({', '.join(datasets)})")
        metrics = {k: v for k, v in ref.items() if k not in ("dataset", "method", "source")}
        bad = {k: v for k, v in metrics.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad or not metrics:
            raise ValueError(f"references[{i}] needs numeric metric values besides dataset/method/source, "
                             f"got {bad or 'none'}")
        out.append({"dataset": str(ref["dataset"]).lower(), "method": str(ref["method"]),
                    "source": str(ref["source"]), "metrics": {k: float(v) for k, v in metrics.items()}})
    return out


def _variants(sweep: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    """Every combination of the sweep's values, in the order of the axes (one empty dict
    without a sweep)."""
    if not sweep:
        return [{}]
    keys = list(sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


def _apply(cfg: BenchmarkConfig, variant: Dict[str, Any]) -> BenchmarkConfig:
    """``cfg`` with the settings of one sweep point."""
    out = copy.deepcopy(cfg)
    for key, value in variant.items():
        parts = key.split(".")
        if len(parts) == 3:
            scope = getattr(out, parts[0])
            scope.setdefault(parts[1].lower(), {})[parts[2]] = value
        else:
            setattr(out, key, copy.deepcopy(value))
    if variant:
        _check_training(out)  # plain-types logreg_cs of a swept value
    return out


def variant_label(variant: Dict[str, Any]) -> str:
    """``"lr=0.003, hidden=32"`` (empty without a sweep)."""
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in variant.items())


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: a dataset entry, a method, a seed, and the sweep point (the
    config with that point's settings applied); ``stage`` is "search" for a trial of the
    search stage (``trial``: its index), else "final"; ``search``: the trial's settings, or
    for a final run the search's outcome (None without a search)."""

    dataset: str
    method: str
    seed: int
    variant: str
    config: BenchmarkConfig = field(compare=False, repr=False)
    stage: str = "final"
    trial: Optional[int] = None
    search: Optional[Dict[str, Any]] = field(default=None, compare=False, repr=False)


def expand_runs(cfg: BenchmarkConfig) -> List[RunSpec]:
    """The runs of a validated config, in grid order: dataset, sweep point, seed, method."""
    runs: List[RunSpec] = []
    variants = [(variant_label(v), _apply(cfg, v)) for v in _variants(cfg.sweep)]
    for dataset in cfg.datasets:
        for label, vcfg in variants:
            for seed in cfg.seeds:
                for method in cfg.methods():
                    runs.append(RunSpec(dataset, method, seed, label, vcfg))
    return runs


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN/Inf -> None, NumPy/torch scalars -> Python, tuples -> lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def settings_hash(settings: Dict[str, Any]) -> str:
    """Short stable hash of a run's settings (its resume key)."""
    text = json.dumps(jsonable(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
