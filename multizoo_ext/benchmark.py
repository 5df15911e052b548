"""Standardized benchmark runner: a grid of fusions x datasets x seeds under one config.

:func:`run_benchmark` trains every registered fusion named in a :class:`BenchmarkConfig` on
every dataset and seed with the same encoders, head, optimiser and epoch budget, evaluates
each on the test split, and writes, into ``config.output``:

- ``results.json``: one entry per finished run (see :data:`RUN_KEYS`), rewritten atomically
  after every run. The runner is **resumable**: an entry whose ``(dataset, method, seed)``
  and ``config_hash`` match the current config is reused, not recomputed, so an interrupted
  benchmark continues where it stopped, and widening the grid (another seed, fusion or
  dataset) only runs what is new. The hash covers the settings, not the code: after
  changing a method's code, pass ``resume=False`` (``--fresh``) or use a new output folder.
- ``results.md``: a Markdown table of mean ± std over seeds per (dataset, method).
- ``<dataset>_metrics.png`` (metric bars with error bars) and, with robustness,
  ``<dataset>_robustness.png`` (robustness curves), when matplotlib is installed.

For honesty, every dataset also gets two baseline rows (``config.baselines``):

- ``best-single-modality``: the same encoder + head trained on each modality alone (same
  epochs, optimiser and seed); the modality with the best *validation* score is reported.
- ``logreg``: scikit-learn logistic regression on the concatenated, standardised
  (``StandardScaler`` fitted on the training split) flattened features, its inverse
  regularisation ``C`` chosen on the validation split from ``config.logreg_cs`` (one value
  = fixed ``C``; ``(0.05,)`` is the setting of ``shared/data/README.md``'s reference points,
  which fit on the full training split, whereas the runner fits on the training split
  minus the validation rows). Multilabel data: one-vs-rest logistic regression;
  regression: ridge regression with ``alpha = 1 / C``.

Per-fusion objectives: a fusion whose training needs a special loss is mapped, in
``config.fusion_objectives``, to the name of an objective factory in the objective registry
(default ``{"refnet": "refnet", "deq": "deq"}``); the runner then calls
``create_objective(name, task=task, **config.objective_kwargs.get(fusion, {}))`` and trains
with ``objective_args_dict={}``. The runner imports no method internals. Per-fusion defaults
(:data:`FUSION_DEFAULT_KWARGS`, :data:`FUSION_DEFAULT_LR_MULT`) sit under the user's settings:
DEQ fusion is built with ``jac_reg=True`` (its objective adds ``0.1 * jac_loss``) and trained
with the fusion's learning rate times 0.1, as the authors' MM-IMDB script does; pass e.g.
``--fusion-arg deq:jac_reg=false --objective deq=default --fusion-lr-mult deq=1`` to drop them.

Example:
    >>> from multizoo_ext.benchmark import BenchmarkConfig, run_benchmark
    >>> cfg = BenchmarkConfig.quick_config(output="runs/quick")        # doctest: +SKIP
    >>> runs = run_benchmark(cfg)                                      # doctest: +SKIP
    >>> print(runs.markdown)                                           # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from multizoo_ext import __version__
from multizoo_ext.checkpoint import atomic_write
from multizoo_ext.builder import DataSpec, build_encoders, build_model, default_objective, infer_data_spec
from multizoo_ext.metrics import SELECTION_METRIC, TASKS, compute_metrics
from multizoo_ext.registry import DATASETS, FUSIONS, OBJECTIVES, create_dataset, create_objective
from multizoo_ext.training_structures.supervised import test, train
from multizoo_ext.utils import resolve_device, seed_everything

logger = logging.getLogger(__name__)

__all__ = ["BenchmarkConfig", "BenchmarkResults", "run_benchmark", "summarize", "format_markdown",
           "make_plots", "add_benchmark_arguments", "config_from_args", "SINGLE_MODALITY", "LOGREG",
           "RUN_KEYS", "TABLE_METRICS", "QUICK_SETTINGS"]

#: Method name of the best-single-modality baseline row.
SINGLE_MODALITY = "best-single-modality"
#: Method name of the scikit-learn logistic-regression baseline row.
LOGREG = "logreg"
BASELINES = (SINGLE_MODALITY, LOGREG)
#: Constructor keywords a fusion gets unless the config overrides them: DEQ fusion computes
#: its Jacobian penalty, which its default objective (``"deq"``, weight 0.1) adds.
FUSION_DEFAULT_KWARGS: Dict[str, Dict[str, Any]] = {"deq": {"jac_reg": True}}
#: Learning-rate multipliers of a fusion's parameters unless the config overrides them
#: (DEQFusion's MM-IMDB script trains the fusion at 0.1 x the learning rate).
FUSION_DEFAULT_LR_MULT: Dict[str, float] = {"deq": 0.1}

#: Metrics shown in the Markdown table (and the bar plots) per task; the first one is the
#: headline metric logged per run. F1 is macro-averaged for classification.
TABLE_METRICS: Dict[str, Tuple[str, ...]] = {
    "classification": ("accuracy", "f1_macro", "auroc"),
    "multilabel": ("f1_micro", "f1_macro"),
    "regression": ("mse", "mae"),
}
#: The measure robustness curves follow (MultiBench's key in test()'s robustness dict).
ROBUSTNESS_MEASURE: Dict[str, str] = {"classification": "Accuracy", "multilabel": "macro", "regression": "MSE"}
_METRIC_LABEL = {"Accuracy": "accuracy", "macro": "F1 (macro)", "MSE": "MSE",
                 "accuracy": "accuracy", "f1_macro": "F1 (macro)", "f1_micro": "F1 (micro)", "auroc": "AUROC",
                 "mse": "MSE", "mae": "MAE"}

#: Keys of every ``results.json`` entry (``status == "ok"``). Baseline-specific extras:
#: ``modality`` / ``per_modality`` (best-single-modality), ``C`` / ``valid_scores`` (logreg).
RUN_KEYS = (
    "dataset",            # registry name of the dataset
    "method",             # fusion registry name, or "best-single-modality" / "logreg"
    "kind",               # "fusion" or "baseline"
    "seed",               # seed of the data split, initial weights and data order
    "task",               # "classification", "multilabel" or "regression"
    "status",             # "ok" (or "failed", with "error", when fail_fast is off)
    "config_hash",        # hash of every setting that affects this run (resume key)
    "config",             # those settings
    "test",               # all test metrics (multizoo_ext.metrics keys, plus "n")
    "valid_score",        # best validation selection metric (accuracy / macro F1 / loss or MSE)
    "selection_metric",   # its name
    "epochs_run",         # epochs trained (< epochs with early stopping; None for logreg)
    "best_epoch",         # epoch whose weights were tested (None for logreg)
    "seconds_per_epoch",  # mean wall time of an epoch, training + validation (None for logreg)
    "total_seconds",      # wall time of the whole run, evaluation included
    "parameters",         # trainable parameters (logreg: coefficients + intercepts)
    "peak_memory_mb",     # CUDA max_memory_allocated, or CPU max-RSS growth (approximate)
    "memory_measure",     # "cuda_max_allocated" or "cpu_max_rss_growth" (or None)
    "process_max_rss_mb",  # the process's max RSS after the run (CPU high-water mark)
    "robustness",         # test()'s robustness dict, or None
    "relative_robustness",  # {"<modality>:<kind>": relative robustness of ROBUSTNESS_MEASURE}, or None
    "robustness_levels",  # the noise levels of the curves, or None
    "history",            # per-epoch training history (None for logreg)
    "torch_threads",      # torch.get_num_threads() during the run (timings depend on it)
    "device", "version", "finished_at",
)

#: What :meth:`BenchmarkConfig.quick_config` sets: the bundled digits dataset, two fusions,
#: two seeds and a few epochs; about a minute on 2 CPU cores.
QUICK_SETTINGS: Dict[str, Any] = {
    "datasets": ["digits"],
    "fusions": ["concat", "lowrank"],
    "seeds": [0, 1],
    "epochs": 8,
    "logreg_cs": (0.05,),
    "num_threads": 1,  # small models: one thread is fastest, and immune to a busy machine
}

_FORMAT = "multizoo-ext-benchmark/1"


@dataclass
class BenchmarkConfig:
    """Every setting of a benchmark, with its default in this one place.

    Attributes:
        datasets: registered dataset names. Default: ``["digits"]`` (bundled, no download).
        fusions: registered fusion names. Default: ``["concat", "lowrank"]``.
        seeds: distinct non-negative seeds; each sets the validation split, initial weights
            and data order. Default: 0..4 (one ROSMAP test sample is ~1 point of accuracy:
            compare over several seeds).
        epochs: maximum training epochs per run. Default: 30.
        batch_size: Default: 64.
        lr, weight_decay: AdamW settings. Defaults: 1e-3, 1e-2 (the CLI ``train`` defaults).
        encoder: per-modality encoder, "mlp" or "identity" (builder). Default: "mlp".
        hidden, embed_dim: MLP encoder hidden and output widths. Defaults: 64, 32.
        head_hidden: hidden width of an MLP head; None = a linear head. Default: None.
        early_stop, patience: stop after ``patience`` epochs without validation gain.
            Defaults: False, 7 (MultiBench).
        device: None = CUDA if available, else CPU; or "cpu", "cuda:1", ...
        num_threads: CPU threads of torch and of NumPy's BLAS during the benchmark (restored
            afterwards); None leaves them as they are. Small models run fastest on 1 thread,
            and several threads on a machine busy with other work can be 10x slower (s/epoch
            in the table depends on this: each entry records ``torch_threads``). Default: None.
        output: folder for results.json, results.md and the figures. Default: "runs/bench".
        data_kwargs: per dataset, extra keywords for its loader, e.g.
            ``{"rosmap": {"path": "../shared/data/ROSMAP"}}``.
        fusion_kwargs: per fusion, extra constructor keywords, e.g. ``{"lowrank": {"rank": 8}}``;
            merged over :data:`FUSION_DEFAULT_KWARGS` (``{"deq": {"jac_reg": True}}``).
        fusion_objectives: fusion name -> objective registry name, for fusions trained with a
            special objective. Default: ``{"refnet": "refnet", "deq": "deq"}``.
        objective_kwargs: per fusion, keywords for its objective factory.
        fusion_lr_mult: per fusion, learning-rate multiplier of the fusion's parameters
            merged over :data:`FUSION_DEFAULT_LR_MULT` (``{"deq": 0.1}``, the reference's); 1.0
            for the others.
        robustness: also evaluate each fusion on noisy / missing-modality copies of the test
            split and record relative robustness per setting. Default: False.
        robustness_kwargs: keywords for the robustness-loader builder.
        baselines: add the best-single-modality and logistic-regression rows. Default: True.
        logreg_cs: grid of ``C`` for the logistic-regression baseline, chosen on the
            validation split. Default: (0.01, 0.05, 0.2, 1.0).
        plots: write figures when matplotlib is installed. Default: True.
        resume: reuse finished entries of an existing results.json; False starts a fresh
            file. Default: True.
        fail_fast: raise on the first failing run; False records it as ``status: "failed"``
            (retried on the next resume) and goes on. Default: True.
        progress: tqdm bar over the grid; None = only on a terminal. Default: False.
        quick: marks a config made by :meth:`quick_config` (informational).
    """

    datasets: List[str] = field(default_factory=lambda: ["digits"])
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
    output: str = "runs/bench"
    data_kwargs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    fusion_kwargs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    fusion_objectives: Dict[str, str] = field(default_factory=lambda: {"refnet": "refnet", "deq": "deq"})
    objective_kwargs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    fusion_lr_mult: Dict[str, float] = field(default_factory=dict)
    robustness: bool = False
    robustness_kwargs: Dict[str, Any] = field(default_factory=dict)
    baselines: bool = True
    logreg_cs: Tuple[float, ...] = (0.01, 0.05, 0.2, 1.0)
    plots: bool = True
    resume: bool = True
    fail_fast: bool = True
    progress: Optional[bool] = False
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> "BenchmarkConfig":
        """A config with :data:`QUICK_SETTINGS`; explicit ``overrides`` win over them."""
        return cls(**{**QUICK_SETTINGS, "quick": True, **overrides})

    def validated(self) -> "BenchmarkConfig":
        """A checked copy with lower-case names and plain-typed values.

        Raises:
            ValueError: an empty grid, unknown dataset / fusion / objective names (the
                message lists the known ones), bad seeds or numeric settings.
        """
        cfg = copy.deepcopy(self)
        for what, names in (("datasets", cfg.datasets), ("fusions", cfg.fusions)):
            if isinstance(names, str) or not names:
                raise ValueError(f"{what} must be a non-empty list of names, got {names!r}")
        cfg.datasets = _unique([str(n).lower() for n in cfg.datasets], "datasets")
        cfg.fusions = _unique([str(n).lower() for n in cfg.fusions], "fusions")
        for name in cfg.datasets:
            DATASETS.get(name)  # ValueError listing the known datasets
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
        for name, low in (("epochs", 1), ("batch_size", 1), ("hidden", 1), ("embed_dim", 1), ("patience", 0)):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not cfg.lr > 0 or not cfg.weight_decay >= 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got lr={cfg.lr!r}, "
                             f"weight_decay={cfg.weight_decay!r}")
        if cfg.encoder not in ("mlp", "identity"):
            raise ValueError(f"encoder must be 'mlp' or 'identity', got {cfg.encoder!r}")
        cs = (cfg.logreg_cs,) if isinstance(cfg.logreg_cs, (int, float)) else tuple(cfg.logreg_cs)
        if not cs or any(not float(c) > 0 for c in cs):
            raise ValueError(f"logreg_cs must be a non-empty list of positive numbers, got {cfg.logreg_cs!r}")
        cfg.logreg_cs = tuple(float(c) for c in cs)
        cfg.data_kwargs = _scoped(cfg.data_kwargs, DATASETS, "data_kwargs")
        cfg.fusion_kwargs = _scoped(cfg.fusion_kwargs, FUSIONS, "fusion_kwargs")
        cfg.fusion_kwargs = {name: {**FUSION_DEFAULT_KWARGS.get(name, {}), **cfg.fusion_kwargs.get(name, {})}
                             for name in sorted(set(cfg.fusion_kwargs) | set(FUSION_DEFAULT_KWARGS))}
        cfg.objective_kwargs = _scoped(cfg.objective_kwargs, FUSIONS, "objective_kwargs")
        cfg.fusion_objectives = {str(k).lower(): str(v).lower() for k, v in cfg.fusion_objectives.items()}
        for fusion in cfg.fusions:
            if fusion in cfg.fusion_objectives:
                OBJECTIVES.get(cfg.fusion_objectives[fusion])  # ValueError listing the known objectives
        cfg.fusion_lr_mult = {**FUSION_DEFAULT_LR_MULT,
                              **{str(k).lower(): float(v) for k, v in cfg.fusion_lr_mult.items()}}
        if any(not v > 0 for v in cfg.fusion_lr_mult.values()):
            raise ValueError(f"fusion_lr_mult values must be > 0, got {cfg.fusion_lr_mult!r}")
        if cfg.device is not None:
            resolve_device(cfg.device)  # ValueError for a bad or absent device
        if cfg.num_threads is not None and (isinstance(cfg.num_threads, bool) or
                                            not isinstance(cfg.num_threads, (int, np.integer)) or cfg.num_threads < 1):
            raise ValueError(f"num_threads must be None or an integer >= 1, got {cfg.num_threads!r}")
        return cfg

    def methods(self) -> List[str]:
        """Row names per dataset: the fusions, then the baselines when enabled."""
        return list(self.fusions) + (list(BASELINES) if self.baselines else [])

    def run_settings(self, dataset: str, method: str) -> Dict[str, Any]:
        """Every setting that affects the run ``(dataset, method, any seed)``: what its
        ``config_hash`` is computed from. Output folder, device, plots, the grid itself and
        the other datasets' / fusions' settings are left out, so changing them reuses
        finished runs."""
        base: Dict[str, Any] = {"dataset": dataset, "data_kwargs": self.data_kwargs.get(dataset, {}),
                                "method": method}
        if method == LOGREG:
            return {**base, "logreg_cs": list(self.logreg_cs)}
        base.update(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                    encoder=self.encoder, hidden=self.hidden, embed_dim=self.embed_dim,
                    head_hidden=self.head_hidden, early_stop=self.early_stop, patience=self.patience)
        if method == SINGLE_MODALITY:
            return base
        base.update(fusion_kwargs=self.fusion_kwargs.get(method, {}),
                    objective=self.fusion_objectives.get(method),
                    objective_kwargs=self.objective_kwargs.get(method, {}) if method in self.fusion_objectives else {},
                    fusion_lr_mult=self.fusion_lr_mult.get(method, 1.0), robustness=self.robustness,
                    robustness_kwargs=self.robustness_kwargs if self.robustness else {})
        return base

    def run_hash(self, dataset: str, method: str) -> str:
        """Short stable hash of :meth:`run_settings`."""
        text = json.dumps(_jsonable(self.run_settings(dataset, method)), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _unique(values: List[Any], what: str) -> List[Any]:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} must not repeat entries, got {values!r}")
    return values


def _scoped(mapping: Dict[str, Dict[str, Any]], registry: Any, what: str) -> Dict[str, Dict[str, Any]]:
    if not isinstance(mapping, dict):
        raise ValueError(f"{what} must map a {registry.kind} name to a dict of keywords, got {type(mapping).__name__}")
    out: Dict[str, Dict[str, Any]] = {}
    for key, kwargs in mapping.items():
        name = str(key).lower()
        registry.get(name)  # ValueError listing the known names
        if not isinstance(kwargs, dict):
            raise ValueError(f"{what}[{key!r}] must be a dict of keywords, got {type(kwargs).__name__}")
        out[name] = dict(kwargs)
    return out


# ----------------------------------------------------------------------------- JSON store
def _jsonable(obj: Any) -> Any:
    """``obj`` with NaN/Inf -> None, NumPy/torch scalars -> Python, tuples -> lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _atomic_write(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


class _RunStore:
    """The entries of ``results.json``, rewritten atomically after every change."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.runs: List[Dict[str, Any]] = []
        if resume and path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); move it away or pass resume=False "
                                 "(--fresh) to start a new benchmark there") from exc
            runs = data.get("runs") if isinstance(data, dict) else None
            if not isinstance(runs, list):
                raise ValueError(f"{path} is not a benchmark results file (expected an object with a 'runs' "
                                 "list); move it away or pass resume=False (--fresh)")
            self.runs = [r for r in runs if isinstance(r, dict)]

    @staticmethod
    def _key(entry: Dict[str, Any]) -> Tuple[Any, ...]:
        return entry.get("dataset"), entry.get("method"), entry.get("seed"), entry.get("config_hash")

    def find(self, dataset: str, method: str, seed: int, config_hash: str) -> Optional[Dict[str, Any]]:
        """The finished (``status == "ok"``) entry with this key and hash, if any."""
        for entry in self.runs:
            if self._key(entry) == (dataset, method, seed, config_hash) and entry.get("status") == "ok":
                return entry
        return None

    def put(self, entry: Dict[str, Any]) -> None:
        """Replace any entry with the same key and hash by ``entry``, then rewrite the file."""
        key = self._key(entry)
        self.runs = [r for r in self.runs if self._key(r) != key] + [entry]
        self.save()

    def save(self) -> None:
        doc = {"format": _FORMAT, "version": __version__, "runs": self.runs}
        _atomic_write(self.path, json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- measuring
def _max_rss_mb() -> Optional[float]:
    """The process's max resident set size in MiB (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class _MemoryProbe:
    """Peak memory of one run.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak (exact for tensors).
    CPU: growth of the process's max RSS (``resource.getrusage``) during the run. This is
    approximate: max RSS is a high-water mark of the whole process, so a run that stays
    below an earlier run's peak records 0, and allocator caching and Python objects count.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.start_rss = _max_rss_mb()

    def result(self) -> Dict[str, Any]:
        rss = _max_rss_mb()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak, measure = torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        elif rss is not None and self.start_rss is not None:
            peak, measure = max(0.0, rss - self.start_rss), "cpu_max_rss_growth"
        else:
            peak, measure = None, None
        return {"peak_memory_mb": peak, "memory_measure": measure, "process_max_rss_mb": rss}


@contextlib.contextmanager
def _thread_limit(n: Optional[int]) -> Iterator[None]:
    """Limit torch's intra-op threads and NumPy's BLAS threads (threadpoolctl, a scikit-learn
    dependency) to ``n`` inside the block; ``None`` changes nothing."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - scikit-learn installs it
            yield
        else:
            with threadpool_limits(limits=int(n)):
                yield
    finally:
        torch.set_num_threads(before)


def _warm_up(device: torch.device) -> None:
    """One tiny forward/backward/AdamW step, so one-time costs (lazy imports such as
    ``torch._dynamo`` on the first optimiser, CUDA context, kernel loading) do not inflate the
    first run's seconds per epoch."""
    layer = nn.Linear(4, 2).to(device)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    nn.functional.cross_entropy(layer(torch.zeros(3, 4, device=device)),
                                torch.zeros(3, dtype=torch.long, device=device)).backward()
    opt.step()


# ----------------------------------------------------------------------------- data
@dataclass
class _Data:
    train: Any
    valid: Any
    test: Any
    spec: DataSpec
    robust: Optional[Dict[str, List[Any]]] = None


class _ModalityView:
    """A loader yielding ``[x_m, y]`` from a loader yielding ``[x_1, ..., x_M, y]``."""

    def __init__(self, loader: Iterable, index: int) -> None:
        self.loader, self.index = loader, index

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  (TypeError for iterable-style loaders)

    def __iter__(self) -> Iterator[List[torch.Tensor]]:
        for batch in self.loader:
            yield [batch[self.index], batch[-1]]


class _SingleModality(nn.Module):
    """The "fusion" of a one-modality model: passes its only input through."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        return torch.flatten(inputs[0], 1)


def _load(cfg: BenchmarkConfig, dataset: str, seed: int) -> _Data:
    kwargs = dict(cfg.data_kwargs.get(dataset, {}))
    seed_everything(seed)
    train_dl, valid_dl, test_dl = create_dataset(dataset, batch_size=cfg.batch_size, seed=seed, **kwargs)
    task = kwargs.get("task") if kwargs.get("task") in TASKS else None
    return _Data(train_dl, valid_dl, test_dl, infer_data_spec(train_dl, task=task))


def _robust_loaders(cfg: BenchmarkConfig, data: _Data, seed: int) -> Dict[str, List[Any]]:
    """test()'s robustness dict ``{"<modality>:<kind>": [loader per level]}`` for the test
    split: Gaussian noise, entry dropout and whole-modality dropout ("missing", level 1 =
    the modality is absent) at levels 0.0, 0.1, ..., 1.0 per modality
    (``multizoo_ext.datasets.robustness.all_robustness_loaders``, keywords from
    ``cfg.robustness_kwargs``). Built once per dataset and seed."""
    if data.robust is None:
        from multizoo_ext.datasets.robustness import all_robustness_loaders

        data.robust = all_robustness_loaders(data.test, **{"seed": seed, **cfg.robustness_kwargs})
    return data.robust


# ----------------------------------------------------------------------------- single runs
def _base_entry(cfg: BenchmarkConfig, dataset: str, method: str, seed: int, task: str) -> Dict[str, Any]:
    return {"dataset": dataset, "method": method, "kind": "baseline" if method in BASELINES else "fusion",
            "seed": seed, "task": task, "status": "ok", "config_hash": cfg.run_hash(dataset, method),
            "config": cfg.run_settings(dataset, method)}


def _fit(cfg: BenchmarkConfig, encoders: List[nn.Module], fusion: nn.Module, head: nn.Module, train_dl: Any,
         valid_dl: Any, task: str, seed: int, objective: Any, objective_args: Optional[Dict[str, Any]],
         lr_mult: float) -> Any:
    return train(encoders, fusion, head, train_dl, valid_dl, cfg.epochs, early_stop=cfg.early_stop, task=task,
                 optimtype=torch.optim.AdamW, lr=cfg.lr, weight_decay=cfg.weight_decay, objective=objective,
                 save=None, objective_args_dict=objective_args, device=cfg.device, fusion_lr_mult=lr_mult,
                 seed=seed, patience=cfg.patience, progress=False)


def _run_fusion(cfg: BenchmarkConfig, data: _Data, dataset: str, fusion: str, seed: int,
                device: torch.device) -> Dict[str, Any]:
    spec = data.spec
    entry = _base_entry(cfg, dataset, fusion, seed, spec.task)
    t0 = time.perf_counter()
    probe = _MemoryProbe(device)
    seed_everything(seed)  # repeatable initial weights
    encoders, fuse, head = build_model(spec, fusion, cfg.encoder, cfg.hidden, cfg.embed_dim,
                                       cfg.fusion_kwargs.get(fusion, {}), cfg.head_hidden)
    if fusion in cfg.fusion_objectives:
        objective: Any = create_objective(cfg.fusion_objectives[fusion], task=spec.task,
                                          **cfg.objective_kwargs.get(fusion, {}))
        objective_args: Optional[Dict[str, Any]] = {}
    else:
        objective, objective_args = default_objective(spec.task), None
    res = _fit(cfg, encoders, fuse, head, data.train, data.valid, spec.task, seed, objective, objective_args,
               cfg.fusion_lr_mult.get(fusion, 1.0))
    metrics = test(res.model, data.test, task=spec.task, no_robust=True, full=True, device=cfg.device)
    entry.update(test=metrics, valid_score=res.best_score, selection_metric=SELECTION_METRIC[spec.task][0],
                 epochs_run=len(res.history), best_epoch=res.best_epoch, seconds_per_epoch=res.seconds_per_epoch,
                 parameters=res.parameters, **probe.result())
    entry.update(robustness=None, relative_robustness=None, robustness_levels=None)
    if cfg.robustness:
        robust = test(res.model, _robust_loaders(cfg, data, seed), task=spec.task, no_robust=False,
                      device=cfg.device)["robustness"]
        measure = ROBUSTNESS_MEASURE[spec.task]
        from multizoo_ext.datasets.robustness import DEFAULT_LEVELS

        entry["robustness"] = robust
        entry["robustness_levels"] = [float(v) for v in cfg.robustness_kwargs.get("levels", DEFAULT_LEVELS)]
        entry["relative_robustness"] = {setting: measures[measure]["relative"]
                                        for setting, measures in robust.items() if measure in measures}
    entry["history"] = res.history
    entry["total_seconds"] = time.perf_counter() - t0
    return entry


def _run_single_modality(cfg: BenchmarkConfig, data: _Data, dataset: str, seed: int,
                         device: torch.device) -> Dict[str, Any]:
    """Train the same encoder + head on each modality alone; report the best by validation."""
    spec = data.spec
    entry = _base_entry(cfg, dataset, SINGLE_MODALITY, seed, spec.task)
    metric, higher_better = SELECTION_METRIC[spec.task]
    t0 = time.perf_counter()
    probe = _MemoryProbe(device)
    per_modality: List[Dict[str, Any]] = []
    best: Optional[Tuple[int, Any, Dict[str, float]]] = None
    for m, shape in enumerate(spec.input_shapes):
        sub = DataSpec([shape], spec.task, spec.n_out)
        seed_everything(seed)
        (encoder,) = build_encoders(sub, cfg.encoder, cfg.hidden, cfg.embed_dim)
        dim = int(encoder.out_dim)  # type: ignore[attr-defined]
        head: nn.Module = (nn.Sequential(nn.Linear(dim, cfg.head_hidden), nn.ReLU(),
                                         nn.Linear(cfg.head_hidden, spec.n_out))
                           if cfg.head_hidden else nn.Linear(dim, spec.n_out))
        res = _fit(cfg, [encoder], _SingleModality(dim), head, _ModalityView(data.train, m),
                   _ModalityView(data.valid, m), spec.task, seed, default_objective(spec.task), None, 1.0)
        metrics = test(res.model, _ModalityView(data.test, m), task=spec.task, no_robust=True, full=True,
                       device=cfg.device)
        per_modality.append({"modality": m, "valid_score": res.best_score, "test": metrics,
                             "epochs_run": len(res.history), "seconds_per_epoch": res.seconds_per_epoch,
                             "parameters": res.parameters})
        better = best is None or (res.best_score > best[1].best_score if higher_better
                                  else res.best_score < best[1].best_score)
        if better:
            best = (m, res, metrics)
    assert best is not None  # spec has >= 1 modality
    m, res, metrics = best
    entry.update(test=metrics, valid_score=res.best_score, selection_metric=metric, modality=m,
                 per_modality=per_modality, epochs_run=len(res.history), best_epoch=res.best_epoch,
                 seconds_per_epoch=res.seconds_per_epoch, parameters=res.parameters, **probe.result(),
                 robustness=None, relative_robustness=None, robustness_levels=None, history=res.history,
                 total_seconds=time.perf_counter() - t0)
    return entry


def _arrays(loader: Iterable) -> Tuple[np.ndarray, np.ndarray]:
    """All of ``loader``'s samples as ``(X (N, sum_i D_i) float32, y)``, modalities flattened
    and concatenated (held in memory: for very wide data such as raw AV-MNIST spectrograms
    this is large; turn the baselines off there)."""
    parts: List[List[np.ndarray]] = []
    ys: List[np.ndarray] = []
    for batch in loader:
        if not parts:
            parts = [[] for _ in batch[:-1]]
        for i, x in enumerate(batch[:-1]):
            parts[i].append(torch.flatten(torch.as_tensor(x), 1).float().cpu().numpy())  # (B, D_i)
        ys.append(torch.as_tensor(batch[-1]).cpu().numpy())
    if not ys:
        raise ValueError("the logistic-regression baseline got an empty dataloader")
    return np.concatenate([np.concatenate(p) for p in parts], axis=1), np.concatenate(ys)


def _run_logreg(cfg: BenchmarkConfig, data: _Data, dataset: str, seed: int) -> Dict[str, Any]:
    """Logistic regression (one-vs-rest for multilabel; ridge for regression) on concatenated
    standardised features, ``C`` chosen on the validation split."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    spec = data.spec
    task = spec.task
    entry = _base_entry(cfg, dataset, LOGREG, seed, task)
    t0 = time.perf_counter()
    (xtr, ytr), (xva, yva), (xte, yte) = _arrays(data.train), _arrays(data.valid), _arrays(data.test)
    scaler = StandardScaler().fit(xtr)
    xtr, xva, xte = scaler.transform(xtr), scaler.transform(xva), scaler.transform(xte)

    def fit(c: float) -> Any:
        if task == "classification":
            model: Any = LogisticRegression(C=c, max_iter=2000)
            return model.fit(xtr, ytr.reshape(-1).astype(np.int64))
        if task == "multilabel":
            return OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000)).fit(xtr, ytr.astype(np.int64))
        return Ridge(alpha=1.0 / c).fit(xtr, ytr.reshape(len(ytr), -1))

    def outputs(model: Any, x: np.ndarray) -> torch.Tensor:
        """Model outputs in the form compute_metrics expects (logits / predictions)."""
        if task == "classification":
            probs = np.zeros((len(x), spec.n_out))
            probs[:, model.classes_.astype(np.int64)] = model.predict_proba(x)  # classes absent in training: p=0
            return torch.from_numpy(np.log(np.clip(probs, 1e-12, None)))  # softmax(log p) = p
        if task == "multilabel":
            p = np.clip(model.predict_proba(x), 1e-12, 1 - 1e-12)
            return torch.from_numpy(np.log(p / (1 - p)))  # sigmoid(logit p) = p
        return torch.from_numpy(model.predict(x).reshape(len(x), -1))

    metric = {"classification": "accuracy", "multilabel": "f1_macro", "regression": "mse"}[task]
    higher_better = task != "regression"
    scores: Dict[str, float] = {}
    best: Optional[Tuple[float, float, Any]] = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for c in sorted(cfg.logreg_cs):
            model = fit(c)
            score = compute_metrics(task, torch.from_numpy(yva), outputs(model, xva))[metric]
            scores[repr(c)] = score
            if best is None or (score > best[1] if higher_better else score < best[1]):
                best = (c, score, model)  # ties keep the smaller C (stronger regularisation)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.warning("logreg on %s (seed %d) did not fully converge for some C", dataset, seed)
    assert best is not None
    c, score, model = best
    metrics = compute_metrics(task, torch.from_numpy(yte), outputs(model, xte))
    metrics["n"] = len(yte)
    estimators = model.estimators_ if task == "multilabel" else [model]
    n_params = int(sum(np.size(e.coef_) + np.size(e.intercept_) for e in estimators))
    entry.update(test=metrics, valid_score=score, selection_metric=metric, C=c, valid_scores=scores,
                 epochs_run=None, best_epoch=None, seconds_per_epoch=None, parameters=n_params,
                 peak_memory_mb=None, memory_measure=None, process_max_rss_mb=_max_rss_mb(), robustness=None,
                 relative_robustness=None, robustness_levels=None, history=None,
                 total_seconds=time.perf_counter() - t0)
    return entry


# ----------------------------------------------------------------------------- summary
def _stats(values: Sequence[Optional[float]]) -> Tuple[float, float, int]:
    """(mean, sample std with ddof=1 (NaN for one value), count) of the non-None values; a
    NaN value makes the mean NaN (it is not silently dropped)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return math.nan, math.nan, 0
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return mean, std, len(vals)


def summarize(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Aggregate finished runs per (dataset, method), in first-seen order.

    Returns:
        one dict per (dataset, method): ``dataset``, ``method``, ``task``, ``n`` (seeds),
        ``seeds``, ``metrics`` ``{name: (mean, std)}`` for every test metric,
        ``seconds_per_epoch`` / ``peak_memory_mb`` ``(mean, std)``, ``parameters`` (mean),
        ``relative_robustness`` ``{setting: (mean, std)}``, ``robustness_curves``
        ``{setting: (levels, mean curve, std curve)}`` of :data:`ROBUSTNESS_MEASURE`, and ``modalities``
        (best-single-modality: the modality chosen per seed). Std is the sample std (ddof=1)
        over seeds, NaN with one seed.
    """
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for run in runs:
        if run.get("status") == "ok":
            groups.setdefault((run["dataset"], run["method"]), []).append(run)
    out: List[Dict[str, Any]] = []
    for (dataset, method), rows in groups.items():
        task = rows[0]["task"]
        names = sorted({k for r in rows for k, v in r["test"].items() if k != "n"})
        metrics = {k: _stats([r["test"].get(k) for r in rows])[:2] for k in names}
        row: Dict[str, Any] = {
            "dataset": dataset, "method": method, "kind": rows[0].get("kind"), "task": task, "n": len(rows),
            "seeds": [r["seed"] for r in rows], "metrics": metrics,
            "seconds_per_epoch": _stats([r.get("seconds_per_epoch") for r in rows])[:2],
            "peak_memory_mb": _stats([r.get("peak_memory_mb") for r in rows])[:2],
            "parameters": _stats([r.get("parameters") for r in rows])[0],
        }
        if method == SINGLE_MODALITY:
            row["modalities"] = [r.get("modality") for r in rows]
        rel: Dict[str, Tuple[float, float]] = {}
        curves: Dict[str, Tuple[List[float], List[float], List[float]]] = {}
        settings = [s for s in (rows[0].get("relative_robustness") or {})]
        measure = ROBUSTNESS_MEASURE[task]
        for s in settings:
            rel[s] = _stats([(r.get("relative_robustness") or {}).get(s) for r in rows])[:2]
            per_seed = [r["robustness"][s][measure]["curve"] for r in rows
                        if r.get("robustness") and s in r["robustness"] and measure in r["robustness"][s]]
            if per_seed and len({len(c) for c in per_seed}) == 1:
                points = list(zip(*per_seed))  # one tuple of per-seed scores per level
                levels = rows[0].get("robustness_levels") or [i / 10 for i in range(len(points))]
                curves[s] = (list(levels), [_stats(v)[0] for v in points], [_stats(v)[1] for v in points])
        row["relative_robustness"], row["robustness_curves"] = rel, curves
        out.append(row)
    return out


def _cell(stat: Tuple[float, float], digits: int = 4) -> str:
    mean, std = stat
    if mean is None or math.isnan(mean):
        return "n/a"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _method_label(row: Dict[str, Any]) -> str:
    if row["method"] == SINGLE_MODALITY:
        mods = sorted({m for m in row.get("modalities", []) if m is not None})
        return f"best single modality (modality {', '.join(str(m) for m in mods)})" if mods else "best single modality"
    if row["method"] == LOGREG:
        return "ridge regression (concat features)" if row["task"] == "regression" \
            else "logistic regression (concat features)"
    return row["method"]


def _settings_line(cfg: BenchmarkConfig) -> str:
    head = f"MLP head ({cfg.head_hidden})" if cfg.head_hidden else "linear head"
    stop = f"early stop after {cfg.patience} epochs without gain" if cfg.early_stop else "no early stop"
    line = (f"Settings: {cfg.epochs} epochs max ({stop}), batch size {cfg.batch_size}, AdamW lr {cfg.lr:g}, "
            f"weight decay {cfg.weight_decay:g}, encoder {cfg.encoder} (hidden {cfg.hidden}, embedding "
            f"{cfg.embed_dim}), {head}; test metrics of the epoch with the best validation score.")
    if cfg.baselines:
        line += (" Baselines: the same encoder + head on each modality alone (best by validation), and "
                 f"logistic regression on standardised concatenated features with C in "
                 f"{{{', '.join(f'{c:g}' for c in cfg.logreg_cs)}}} chosen on validation.")
    return line + " Peak memory on CPU: growth of the process's max RSS (approximate).\n"


def format_markdown(summary: Sequence[Dict[str, Any]], config: Optional[BenchmarkConfig] = None) -> str:
    """Markdown: per dataset, a table of mean ± std over seeds (test metrics of
    :data:`TABLE_METRICS`, seconds per epoch, peak memory, parameters), plus a relative
    robustness table where robustness was measured; with ``config``, a settings line first."""
    by_dataset: Dict[str, List[Dict[str, Any]]] = {}
    for row in summary:
        by_dataset.setdefault(row["dataset"], []).append(row)
    parts: List[str] = [_settings_line(config)] if config is not None else []
    for dataset, rows in by_dataset.items():
        task = rows[0]["task"]
        keys = TABLE_METRICS[task]
        seeds = sorted({s for r in rows for s in r["seeds"]})
        parts.append(f"### {dataset} ({task}; mean ± std over seeds {', '.join(map(str, seeds))})\n")
        head = ["method", "runs"] + [f"test {_METRIC_LABEL.get(k, k)}" for k in keys] + \
            ["s/epoch", "peak mem (MB)", "parameters"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            vals = [_method_label(r), str(r["n"])] + [_cell(r["metrics"].get(k, (math.nan, math.nan))) for k in keys]
            vals += [_cell(r["seconds_per_epoch"], 3), _cell(r["peak_memory_mb"], 1),
                     "n/a" if math.isnan(r["parameters"]) else f"{int(round(r['parameters'])):,}"]
            lines.append("| " + " | ".join(vals) + " |")
        parts.append("\n".join(lines) + "\n")
        robust = [r for r in rows if r["relative_robustness"]]
        if robust:
            settings = list(robust[0]["relative_robustness"])
            measure = _METRIC_LABEL[ROBUSTNESS_MEASURE[task]]
            parts.append(f"Relative robustness of test {measure} on {dataset} (area under the curve over noise "
                         "levels 0, 0.1, ..., 1 per modality:perturbation, MultiBench's measure):\n")
            rhead = ["method"] + settings
            rlines = ["| " + " | ".join(rhead) + " |", "|" + "---|" * len(rhead)]
            for r in robust:
                rlines.append("| " + " | ".join([r["method"]] + [_cell(r["relative_robustness"].get(
                    s, (math.nan, math.nan))) for s in settings]) + " |")
            parts.append("\n".join(rlines) + "\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- plots
def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def make_plots(summary: Sequence[Dict[str, Any]], out_dir: Path) -> List[Path]:
    """Per dataset, metric bars with std error bars (``<dataset>_metrics.png``) and, when
    robustness was measured, the mean robustness curves per fusion (``<dataset>_robustness.png``).

    Returns:
        the written paths; empty when matplotlib is not installed (``pip install matplotlib``).
    """
    try:
        from matplotlib.figure import Figure  # lazy: matplotlib is an optional extra
    except ImportError:
        logger.info("matplotlib is not installed: no figures (pip install matplotlib)")
        return []
    out_dir = Path(out_dir)
    paths: List[Path] = []
    by_dataset: Dict[str, List[Dict[str, Any]]] = {}
    for row in summary:
        by_dataset.setdefault(row["dataset"], []).append(row)
    for dataset, rows in by_dataset.items():
        keys = TABLE_METRICS[rows[0]["task"]]
        fig = Figure(figsize=(3.2 * len(keys) + 1, 3.6), layout="constrained")
        axes = fig.subplots(1, len(keys), squeeze=False)[0]
        labels = [r["method"] for r in rows]
        for ax, key in zip(axes, keys):
            means = [r["metrics"].get(key, (math.nan, math.nan))[0] for r in rows]
            stds = [r["metrics"].get(key, (math.nan, math.nan))[1] for r in rows]
            stds = [0.0 if s is None or math.isnan(s) else s for s in stds]
            colors = ["tab:gray" if r["method"] in BASELINES else "tab:blue" for r in rows]
            ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color=colors)
            ax.set_xticks(range(len(rows)), labels, rotation=40, ha="right", fontsize=8)
            ax.set_title(f"test {_METRIC_LABEL.get(key, key)}")
        fig.suptitle(f"{dataset}: mean ± std over seeds")
        path = out_dir / f"{_safe_name(dataset)}_metrics.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
        robust = [r for r in rows if r["robustness_curves"]]
        if robust:
            settings = list(robust[0]["robustness_curves"])
            ncol = min(4, len(settings))
            nrow = math.ceil(len(settings) / ncol)
            fig = Figure(figsize=(3.4 * ncol, 2.9 * nrow), layout="constrained")
            axes = fig.subplots(nrow, ncol, squeeze=False).reshape(-1)
            for ax, setting in zip(axes, settings):
                for r in robust:
                    if setting not in r["robustness_curves"]:
                        continue
                    x, mean, std = (np.asarray(v, dtype=float) for v in r["robustness_curves"][setting])
                    ax.plot(x, mean, marker="o", ms=3, label=r["method"])
                    ax.fill_between(x, mean - np.nan_to_num(std), mean + np.nan_to_num(std), alpha=0.2)
                ax.set_title(setting, fontsize=9)
                ax.set_xlabel("noise level")
            for ax in axes[len(settings):]:
                ax.set_visible(False)
            axes[0].set_ylabel(f"test {_METRIC_LABEL[ROBUSTNESS_MEASURE[rows[0]['task']]]}")
            axes[0].legend(fontsize=7)
            fig.suptitle(f"{dataset}: robustness (mean ± std over seeds)")
            path = out_dir / f"{_safe_name(dataset)}_robustness.png"
            fig.savefig(path, dpi=120)
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------- runner
class BenchmarkResults(list):
    """What :func:`run_benchmark` returns: the list of run entries (dicts, see
    :data:`RUN_KEYS`) of the configured grid, reused and new, with extra attributes.

    Attributes:
        summary: :func:`summarize` of the entries (means/stds, curves: the plotted data).
        markdown: :func:`format_markdown` of the summary (also in ``results.md``).
        json_path, markdown_path: the files written.
        figures: the figure paths written (empty without matplotlib or with plots off).
        computed, reused: how many entries were run now / taken from an earlier run.
    """

    def __init__(self, runs: Iterable[Dict[str, Any]] = (), *, summary: Optional[List[Dict[str, Any]]] = None,
                 markdown: str = "", json_path: Optional[Path] = None, markdown_path: Optional[Path] = None,
                 figures: Optional[List[Path]] = None, computed: int = 0, reused: int = 0) -> None:
        super().__init__(runs)
        self.summary = summary or []
        self.markdown = markdown
        self.json_path = json_path
        self.markdown_path = markdown_path
        self.figures = figures or []
        self.computed = computed
        self.reused = reused


def run_benchmark(config: BenchmarkConfig) -> BenchmarkResults:
    """Run (or resume) the grid ``config.datasets x (config.fusions + baselines) x config.seeds``.

    Data are loaded once per (dataset, seed) and only when some run there is missing.
    ``results.json`` is rewritten atomically after every finished run; ``results.md`` and
    the figures at the end. Nothing is printed (progress: tqdm when ``config.progress``;
    per-run lines: ``logging`` at INFO).

    Args:
        config: the benchmark's settings (checked by :meth:`BenchmarkConfig.validated`).

    Returns:
        :class:`BenchmarkResults`: the entries of this grid (``list`` of dicts), with
        ``summary``, ``markdown``, ``json_path``, ``markdown_path``, ``figures``.

    Raises:
        ValueError: a bad config (see :meth:`BenchmarkConfig.validated`) or an unreadable
            ``results.json``; with ``fail_fast`` (default), whatever a run raised.

    Example:
        >>> cfg = BenchmarkConfig(datasets=["digits"], fusions=["concat"], seeds=[0, 1],
        ...                       epochs=3, output="runs/bench-demo")     # doctest: +SKIP
        >>> runs = run_benchmark(cfg)                                      # doctest: +SKIP
        >>> runs[0]["test"]["accuracy"], runs.json_path                    # doctest: +SKIP
    """
    cfg = config.validated()
    device = resolve_device(cfg.device)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    store = _RunStore(out / "results.json", resume=cfg.resume)
    if not cfg.resume:
        store.save()
    methods = cfg.methods()
    total = len(cfg.datasets) * len(cfg.seeds) * len(methods)
    results: List[Dict[str, Any]] = []
    computed = reused = 0
    bar = tqdm(total=total, desc="benchmark", disable=None if cfg.progress is None else not cfg.progress)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_thread_limit(cfg.num_threads))
        stack.callback(bar.close)
        warmed = False
        for dataset in cfg.datasets:
            for seed in cfg.seeds:
                data: Optional[_Data] = None
                for method in methods:
                    bar.set_postfix_str(f"{dataset}/{method}/seed {seed}")
                    done = store.find(dataset, method, seed, cfg.run_hash(dataset, method))
                    if done is not None:
                        results.append(done)
                        reused += 1
                        bar.update()
                        continue
                    try:
                        if not warmed:
                            _warm_up(device)
                            warmed = True
                        if data is None:
                            data = _load(cfg, dataset, seed)
                        if method == SINGLE_MODALITY:
                            entry = _run_single_modality(cfg, data, dataset, seed, device)
                        elif method == LOGREG:
                            entry = _run_logreg(cfg, data, dataset, seed)
                        else:
                            entry = _run_fusion(cfg, data, dataset, method, seed, device)
                    except Exception as exc:  # noqa: BLE001  (fail_fast off: record and go on)
                        if cfg.fail_fast:
                            raise
                        logger.warning("%s / %s / seed %d failed: %s", dataset, method, seed, exc)
                        task = data.spec.task if data is not None else None
                        entry = {**_base_entry(cfg, dataset, method, seed, task or "unknown"), "status": "failed",
                                 "error": f"{type(exc).__name__}: {exc}"}
                    entry.update(torch_threads=torch.get_num_threads(), device=str(device), version=__version__,
                                 finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
                    store.put(_jsonable(entry))
                    results.append(store.runs[-1])
                    computed += 1
                    if entry["status"] == "ok":
                        headline = TABLE_METRICS[entry["task"]][0]
                        logger.info("%s / %s / seed %d: test %s %.4f (%.1fs)", dataset, method, seed, headline,
                                    entry["test"].get(headline) or math.nan, entry["total_seconds"])
                    bar.update()
    summary = summarize(results)
    markdown = format_markdown(summary, cfg)
    md_path = out / "results.md"
    _atomic_write(md_path, markdown)
    figures = make_plots(summary, out) if cfg.plots else []
    return BenchmarkResults(results, summary=summary, markdown=markdown, json_path=store.path,
                            markdown_path=md_path, figures=figures, computed=computed, reused=reused)


# ----------------------------------------------------------------------------- CLI pieces
def _scoped_kv(text: str) -> Tuple[str, str, Any]:
    """Parse ``SCOPE:KEY=VALUE`` (VALUE as JSON when possible) into ``(scope, key, value)``."""
    left, sep, value = text.partition("=")
    scope, colon, key = left.partition(":")
    if not sep or not colon or not scope or not key:
        raise argparse.ArgumentTypeError(f"expected NAME:KEY=VALUE (e.g. rosmap:path=../shared/data/ROSMAP), "
                                         f"got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return scope.lower(), key, parsed


def _pair(text: str) -> Tuple[str, str]:
    """Parse ``NAME=VALUE``."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.lower(), value


def _default(name: str) -> Any:
    f = BenchmarkConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``benchmark`` subcommand's options to ``parser``; choices come from the
    registries and defaults from :class:`BenchmarkConfig` (options left out keep them)."""
    from multizoo_ext.registry import list_datasets, list_fusions

    q = QUICK_SETTINGS
    g = parser.add_argument_group("grid")
    g.add_argument("--datasets", nargs="+", choices=list_datasets(), metavar="DATASET",
                   help=f"registered datasets: {', '.join(list_datasets())} "
                        f"(default: {' '.join(_default('datasets'))}; --quick: {' '.join(q['datasets'])})")
    g.add_argument("--fusions", nargs="+", choices=list_fusions(), metavar="FUSION",
                   help=f"registered fusions: {', '.join(list_fusions())} "
                        f"(default: {' '.join(_default('fusions'))}; --quick: {' '.join(q['fusions'])})")
    g.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="seeds; each sets the validation split, initial weights and data order "
                        f"(default: {' '.join(map(str, _default('seeds')))}; "
                        f"--quick: {' '.join(map(str, q['seeds']))})")
    g.add_argument("--quick", action="store_true",
                   help="quick preset (digits, concat + lowrank, 2 seeds, few epochs, fixed C=0.05 for logreg, "
                        "1 thread; well under a minute on 2 cores); explicitly given options still win")
    t = parser.add_argument_group("training (the same for every fusion)")
    t.add_argument("--epochs", type=int,
                   help=f"maximum epochs per run (default: {_default('epochs')}; --quick: {q['epochs']})")
    t.add_argument("--batch-size", type=int, help=f"batch size (default: {_default('batch_size')})")
    t.add_argument("--lr", type=float, help=f"AdamW learning rate (default: {_default('lr')})")
    t.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default: {_default('weight_decay')})")
    t.add_argument("--encoder", choices=["mlp", "identity"],
                   help=f"per-modality encoder (default: {_default('encoder')})")
    t.add_argument("--hidden", type=int, help=f"encoder hidden width (default: {_default('hidden')})")
    t.add_argument("--embed-dim", type=int, help=f"encoder output width (default: {_default('embed_dim')})")
    t.add_argument("--head-hidden", type=int, help="hidden width of an MLP head (default: a linear head)")
    t.add_argument("--early-stop", action="store_true", default=None,
                   help="stop after --patience epochs without validation gain (default: off)")
    t.add_argument("--patience", type=int, help=f"early-stopping patience (default: {_default('patience')})")
    t.add_argument("--device", help="'cpu', 'cuda', 'cuda:1', ... (default: cuda if available, else cpu)")
    t.add_argument("--threads", type=int, dest="num_threads", metavar="N",
                   help="CPU threads for torch and BLAS during the benchmark; 1 is fastest for small models and "
                        "on a busy machine (default: torch's own choice; --quick: 1)")
    k = parser.add_argument_group("per-dataset / per-fusion settings (repeatable)")
    k.add_argument("--data-arg", action="append", type=_scoped_kv, default=[], metavar="DATASET:KEY=VALUE",
                   help="loader keyword for one dataset, e.g. --data-arg rosmap:path=../shared/data/ROSMAP")
    k.add_argument("--fusion-arg", action="append", type=_scoped_kv, default=[], metavar="FUSION:KEY=VALUE",
                   help="constructor keyword for one fusion, e.g. --fusion-arg lowrank:rank=8")
    k.add_argument("--objective", action="append", type=_pair, default=[], metavar="FUSION=OBJECTIVE",
                   help="train FUSION with the registered objective OBJECTIVE ('default' = the task loss); "
                        f"built-in: {', '.join(f'{a}={b}' for a, b in _default('fusion_objectives').items())}")
    k.add_argument("--objective-arg", action="append", type=_scoped_kv, default=[], metavar="FUSION:KEY=VALUE",
                   help="keyword for FUSION's objective factory, e.g. --objective-arg refnet:ms_weight=0.1")
    k.add_argument("--fusion-lr-mult", action="append", type=_pair, default=[], metavar="FUSION=MULT",
                   help="learning-rate multiplier of one fusion's parameters, e.g. deq=0.1 (default: 1)")
    o = parser.add_argument_group("evaluation and output")
    o.add_argument("--robustness", action="store_true", default=None,
                   help="also test each fusion under per-modality noise / missing modality and report "
                        "relative robustness (slower)")
    o.add_argument("--no-baselines", action="store_true",
                   help="leave out the best-single-modality and logistic-regression rows")
    o.add_argument("--logreg-c", nargs="+", type=float, metavar="C",
                   help="C grid of the logistic-regression baseline, chosen on the validation split; one value "
                        f"= fixed (default: {' '.join(map(str, _default('logreg_cs')))}; --quick: 0.05)")
    o.add_argument("--output", help=f"folder for results.json, results.md and figures "
                                    f"(default: {_default('output')})")
    o.add_argument("--fresh", action="store_true",
                   help="ignore an existing results.json in --output and start over (default: resume)")
    o.add_argument("--keep-going", action="store_true",
                   help="record a failing run as failed and continue (default: stop at the first error)")
    o.add_argument("--no-plots", action="store_true", help="write no figures (default: figures when matplotlib "
                                                           "is installed)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """The :class:`BenchmarkConfig` of parsed ``benchmark`` options: options left out keep
    the defaults (or the quick preset with ``--quick``); per-name options are merged into the
    default mappings."""
    given: Dict[str, Any] = {}
    for opt, name in (("datasets", "datasets"), ("fusions", "fusions"), ("seeds", "seeds"), ("epochs", "epochs"),
                      ("batch_size", "batch_size"), ("lr", "lr"), ("weight_decay", "weight_decay"),
                      ("encoder", "encoder"), ("hidden", "hidden"), ("embed_dim", "embed_dim"),
                      ("head_hidden", "head_hidden"), ("early_stop", "early_stop"), ("patience", "patience"),
                      ("device", "device"), ("num_threads", "num_threads"), ("output", "output"), ("robustness", "robustness"),
                      ("logreg_c", "logreg_cs")):
        value = getattr(args, opt, None)
        if value is not None:
            given[name] = value

    def scoped(items: Sequence[Tuple[str, str, Any]]) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for scope, key, value in items:
            out.setdefault(scope, {})[key] = value
        return out

    if args.data_arg:
        given["data_kwargs"] = scoped(args.data_arg)
    if args.fusion_arg:
        given["fusion_kwargs"] = scoped(args.fusion_arg)
    if args.objective_arg:
        given["objective_kwargs"] = scoped(args.objective_arg)
    objectives = dict(_default("fusion_objectives"))
    for fusion, name in args.objective:
        if name.lower() == "default":
            objectives.pop(fusion, None)
        else:
            objectives[fusion] = name
    given["fusion_objectives"] = objectives
    if args.fusion_lr_mult:
        mults: Dict[str, float] = {}
        for fusion, value in args.fusion_lr_mult:
            try:
                mults[fusion] = float(value)
            except ValueError:
                raise ValueError(f"--fusion-lr-mult expects FUSION=NUMBER, got {fusion}={value}") from None
        given["fusion_lr_mult"] = mults
    given["baselines"] = not args.no_baselines
    given["plots"] = not args.no_plots
    given["resume"] = not args.fresh
    given["fail_fast"] = not args.keep_going
    given["progress"] = False if args.quiet else None
    return BenchmarkConfig.quick_config(**given) if args.quick else BenchmarkConfig(**given)
