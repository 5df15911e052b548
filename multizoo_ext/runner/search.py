"""The search stage: an equal tuning budget for every method of a benchmark.

With ``search_trials = N > 0`` every method of the grid (fusions and both baselines) gets
the same ``N`` trials per (dataset, sweep point) before its seeded runs:

1. ``N`` settings are sampled from the method's part of the search space with a NumPy
   generator seeded from ``(search_seed, dataset, method)`` only, so they are reproducible
   and do not depend on the order of the grid or on the other methods.
2. Each trial trains on the training split with ``seed = search_seed`` and is scored on the
   *validation* split only (its ``test`` is ``None``; the validation metrics are in
   ``valid_metrics``). Trials are ordinary runs of the results store (``stage: "search"``,
   part of their settings and so of their ``config_hash``): an interrupted search resumes
   and ``jobs`` runs them in parallel.
3. The trial with the best validation score (ties: the earlier trial) gives the settings of
   the method's runs for every seed of the grid, scored on test as without a search. (Ties
   are common on small validation splits; breaking them by the lower validation log-loss
   instead was measured on the eight-dataset table and cost test accuracy: docs/RESULTS.md,
   section 4.)

A search space maps a key to a distribution: a list (uniform choice among its values),
``{"log_uniform": [low, high]}`` or ``{"uniform": [low, high]}``. Keys (see
:func:`valid_keys`): the shared training settings :data:`SHARED_KEYS` (every trained method,
best-single-modality included); ``logreg_c`` (the logistic-regression baseline's ``C``, its
only key); ``fusion_kwargs.FUSION.KEY``, ``objective_kwargs.FUSION.KEY`` and
``fusion_lr_mult.FUSION`` (that fusion only; ignored when it is not in the grid).
:data:`DEFAULT_SEARCH_SPACE` is used when ``search_space`` is None; a given space replaces it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from multizoo_ext.registry import FUSIONS
from multizoo_ext.runner.config import (LOGREG, SINGLE_MODALITY, BenchmarkConfig, RunSpec, _apply,
                                        _check_training, _variants, variant_label)

__all__ = ["DEFAULT_SEARCH_SPACE", "SHARED_KEYS", "check_search_space", "method_space", "sample_trials",
           "apply_trial", "expand_trials", "choose_trials", "describe_space", "settings_text", "valid_keys"]

#: Training settings shared by every trained method (fusions and best-single-modality).
SHARED_KEYS = ("lr", "weight_decay", "hidden", "embed_dim", "head_hidden", "epochs", "batch_size")
#: The logistic-regression baseline's key: its inverse regularisation ``C``.
LOGREG_KEY = "logreg_c"

#: The space searched when ``search_space`` is None.
DEFAULT_SEARCH_SPACE: Dict[str, Any] = {
    "lr": {"log_uniform": [3e-4, 1e-2]},
    "weight_decay": [0.0, 1e-4, 1e-2],
    "hidden": [32, 64, 128],
    "embed_dim": [16, 32, 64],
    "objective_kwargs.refnet.ms_weight": [0.0, 0.1],
    "fusion_lr_mult.deq": [0.1, 1.0],
    LOGREG_KEY: {"log_uniform": [1e-3, 10.0]},
}


def valid_keys() -> str:
    """The valid search-space keys, as one line."""
    return (f"{', '.join(SHARED_KEYS)}, {LOGREG_KEY}, fusion_kwargs.FUSION.KEY, objective_kwargs.FUSION.KEY, "
            "fusion_lr_mult.FUSION")


def _key_scope(key: str) -> Optional[str]:
    """``"shared"``, ``"logreg"`` or the fusion a key belongs to; None for an invalid key."""
    parts = key.split(".")
    if key in SHARED_KEYS:
        return "shared"
    if key == LOGREG_KEY:
        return "logreg"
    if len(parts) == 3 and parts[0] in ("fusion_kwargs", "objective_kwargs") and parts[1] and parts[2]:
        return parts[1].lower()
    if len(parts) == 2 and parts[0] == "fusion_lr_mult" and parts[1]:
        return parts[1].lower()
    return None


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def check_search_space(space: Any, cfg: BenchmarkConfig) -> Dict[str, Any]:
    """A checked copy of ``space`` (None = :data:`DEFAULT_SEARCH_SPACE`).

    Raises:
        ValueError: an unknown key (one line listing the valid ones), an unknown fusion, a
            malformed distribution, or a value the setting does not accept.
    """
    if space is None:
        space = DEFAULT_SEARCH_SPACE
    if not isinstance(space, dict) or not space:
        raise ValueError(f"search_space must be a non-empty table of key -> distribution, got {space!r}")
    out: Dict[str, Any] = {}
    for key, dist in space.items():
        key = str(key)
        scope = _key_scope(key)
        if scope is None:
            raise ValueError(f"unknown search_space key {key!r}; valid keys: {valid_keys()}")
        if scope not in ("shared", "logreg"):
            FUSIONS.get(scope)  # ValueError listing the known fusions
        if isinstance(dist, dict):
            kinds = sorted(dist)
            if kinds not in (["log_uniform"], ["uniform"]):
                raise ValueError(f"search_space[{key!r}] must be a list of values, {{log_uniform = [low, high]}} or "
                                 f"{{uniform = [low, high]}}, got {dist!r}")
            bounds = dist[kinds[0]]
            if not isinstance(bounds, (list, tuple)) or len(bounds) != 2 or not all(map(_number, bounds)) \
                    or not bounds[0] <= bounds[1] or (kinds[0] == "log_uniform" and not bounds[0] > 0):
                raise ValueError(f"search_space[{key!r}]: {kinds[0]} needs [low, high] with low <= high"
                                 f"{' and low > 0' if kinds[0] == 'log_uniform' else ''}, got {bounds!r}")
            out[key] = {kinds[0]: [float(bounds[0]), float(bounds[1])]}
            values: List[Any] = list(out[key][kinds[0]])
        elif isinstance(dist, (list, tuple)) and dist:
            out[key] = list(dist)
            values = list(dist)
        else:
            raise ValueError(f"search_space[{key!r}] must be a non-empty list of values or a "
                             f"{{log_uniform|uniform = [low, high]}} table, got {dist!r}")
        for value in values:  # every value (or bound) must be a valid setting
            _check_value(cfg, key, value)
    both = [k for k in cfg.sweep if k in out or (k == "logreg_cs" and LOGREG_KEY in out)]
    if cfg.search_trials and both:
        raise ValueError(f"sweep axis {both[0]!r} is also a search_space key (or the same setting); a setting is "
                         "either swept or searched, not both")
    return out


def _check_value(cfg: BenchmarkConfig, key: str, value: Any) -> None:
    if key == LOGREG_KEY or key.startswith("fusion_lr_mult."):
        if not _number(value) or not value > 0:
            raise ValueError(f"search_space[{key!r}] values must be finite numbers > 0, got {value!r}")
        return
    if key in SHARED_KEYS:
        _check_training(apply_trial(cfg, "", {key: value}))


def method_space(space: Dict[str, Any], method: str) -> Dict[str, Any]:
    """The part of a checked ``space`` that applies to ``method``, keys sorted."""
    def applies(key: str) -> bool:
        scope = _key_scope(key)
        if method == LOGREG:
            return scope == "logreg"
        if method == SINGLE_MODALITY:
            return scope == "shared"
        return scope in ("shared", method)
    return {k: space[k] for k in sorted(space) if applies(k)}


def _rng(search_seed: int, dataset: str, method: str) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps([int(search_seed), dataset, method]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_trials(space: Dict[str, Any], n: int, search_seed: int, dataset: str,
                  method: str) -> List[Dict[str, Any]]:
    """``n`` settings ``{key: value}`` for ``method`` on ``dataset``, from a generator seeded
    by ``(search_seed, dataset, method)`` only (continuous values rounded to 4 significant
    digits). An empty method space gives ``n`` empty dicts (the method's settings unchanged)."""
    rng = _rng(search_seed, dataset, method)
    mspace = method_space(space, method)
    trials: List[Dict[str, Any]] = []
    for _ in range(n):
        trial: Dict[str, Any] = {}
        for key, dist in mspace.items():
            if isinstance(dist, dict) and "log_uniform" in dist:
                lo, hi = dist["log_uniform"]
                value: Any = float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.4g}")
            elif isinstance(dist, dict):
                lo, hi = dist["uniform"]
                value = float(f"{rng.uniform(lo, hi):.4g}")
            else:
                value = copy.deepcopy(dist[int(rng.integers(len(dist)))])
            trial[key] = value
        trials.append(trial)
    return trials


def apply_trial(cfg: BenchmarkConfig, method: str, trial: Dict[str, Any]) -> BenchmarkConfig:
    """``cfg`` with one trial's settings applied (a copy)."""
    plain = {k: v for k, v in trial.items() if k != LOGREG_KEY and not k.startswith("fusion_lr_mult.")}
    out = _apply(cfg, plain) if plain else copy.deepcopy(cfg)
    for key, value in trial.items():
        if key == LOGREG_KEY:
            out.logreg_cs = (float(value),)
        elif key.startswith("fusion_lr_mult."):
            out.fusion_lr_mult = {**out.fusion_lr_mult, key.split(".")[1].lower(): float(value)}
    return out


def expand_trials(cfg: BenchmarkConfig) -> List[RunSpec]:
    """The search runs of a validated config with ``search_trials > 0``: per dataset, sweep
    point, method and trial, a run with ``seed = search_seed``, ``stage = "search"`` and the
    trial's settings (robustness off: trials are scored on validation only)."""
    runs: List[RunSpec] = []
    variants = [(variant_label(v), _apply(cfg, v)) for v in _variants(cfg.sweep)]
    for dataset in cfg.datasets:
        for label, vcfg in variants:
            for method in cfg.methods():
                for i, trial in enumerate(sample_trials(cfg.search_space, cfg.search_trials, cfg.search_seed,
                                                        dataset, method)):
                    tcfg = apply_trial(vcfg, method, trial)
                    tcfg.robustness = False
                    runs.append(RunSpec(dataset, method, cfg.search_seed, label, tcfg, stage="search", trial=i,
                                        search={"trial": i, "settings": trial}))
    return runs


def _higher_better(entry: Dict[str, Any]) -> bool:
    from multizoo_ext.metrics import SELECTION_METRIC

    if entry["method"] == LOGREG:
        return entry["task"] != "regression"
    return SELECTION_METRIC[entry["task"]][1]


def choose_trials(trials: Sequence[RunSpec], entries: Sequence[Dict[str, Any]],
                  cfg: BenchmarkConfig) -> Dict[Tuple[str, str, str], Dict[str, Any]]:
    """The best trial per (dataset, sweep label, method) by validation score (ties: the
    earlier trial; failed trials and missing scores never win).

    Returns:
        ``{(dataset, variant, method): {"trials", "trial" (index or None when every trial
        failed), "settings", "valid_score", "selection_metric", "space", "search_seed",
        "config" (the chosen BenchmarkConfig, or None)}}``.
    """
    out: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    for run, entry in zip(trials, entries):
        key = (run.dataset, run.variant, run.method)
        best = out.setdefault(key, {"trials": 0, "trial": None, "settings": {}, "valid_score": None,
                                    "selection_metric": None, "search_seed": cfg.search_seed,
                                    "space": method_space(cfg.search_space, run.method), "config": None})
        best["trials"] += 1
        score = entry.get("valid_score") if entry.get("status") == "ok" else None
        if score is None or (isinstance(score, float) and math.isnan(score)):
            continue
        if best["valid_score"] is None or (score > best["valid_score"] if _higher_better(entry)
                                           else score < best["valid_score"]):
            best.update(trial=run.trial, settings=dict((run.search or {}).get("settings") or {}),
                        valid_score=score, selection_metric=entry.get("selection_metric"), config=run.config)
    return out


def _dist_text(dist: Any) -> str:
    if isinstance(dist, dict) and "log_uniform" in dist:
        return "log-uniform in [{:g}, {:g}]".format(*dist["log_uniform"])
    if isinstance(dist, dict):
        return "uniform in [{:g}, {:g}]".format(*dist["uniform"])
    return "{" + ", ".join(f"{v:g}" if _number(v) else str(v) for v in dist) + "}"


def describe_space(space: Dict[str, Any]) -> str:
    """``"lr log-uniform in [0.0003, 0.01]; weight_decay in {0, 0.0001, 0.01}; ..."``."""
    return "; ".join(f"{k} {_dist_text(d)}" if isinstance(d, dict) else f"{k} in {_dist_text(d)}"
                     for k, d in space.items())


def settings_text(settings: Dict[str, Any]) -> str:
    """``"lr=0.001, hidden=64"`` (``"-"`` for none)."""
    if not settings:
        return "-"
    return ", ".join(f"{k}={v:g}" if _number(v) else f"{k}={v}" for k, v in settings.items())

