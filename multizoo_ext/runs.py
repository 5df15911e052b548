"""Run folders you can reuse: where ``multizoo-ext train`` writes, and how a saved run is rebuilt
and scored again.

A run folder holds ``best.pt`` (the best epoch's ``state_dict``), ``best.json`` (its config,
with ``method``: :attr:`multizoo_ext.builder.Method.settings`, everything needed to rebuild
the modules) and ``results.json`` (the run's metrics and history).

Example:
    >>> from multizoo_ext.runs import load_model, evaluate_run          # doctest: +SKIP
    >>> run = load_model("runs/train/digits-deq-s0-20261202-130000")   # doctest: +SKIP
    >>> evaluate_run(run.path)["accuracy"]                              # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from torch import nn

from multizoo_ext.builder import rebuild_method
from multizoo_ext.checkpoint import load_checkpoint

__all__ = ["LoadedRun", "evaluate_run", "load_model", "new_run_dir", "prepare_output"]

PathLike = Union[str, Path]
#: File names a run folder holds.
WEIGHTS, RESULTS = "best.pt", "results.json"


def new_run_dir(root: PathLike, name: str) -> Path:
    """A new, not yet existing folder ``root/name-YYYYmmdd-HHMMSS`` (``-2``, ``-3``... when taken)."""
    stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = Path(root) / stem, 1
    while candidate.exists():
        n += 1
        candidate = Path(root) / f"{stem}-{n}"
    return candidate


def prepare_output(path: PathLike, overwrite: bool = False) -> Path:
    """Create the run folder ``path``; refuse a file, or a folder that already holds a run
    (``best.pt`` or ``results.json``) unless ``overwrite``.

    Raises:
        ValueError: ``path`` is a file, or holds a run and ``overwrite`` is False.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {str(out)!r} is a file; give a folder for the run")
    if not overwrite and any((out / f).exists() for f in (WEIGHTS, RESULTS)):
        raise ValueError(f"{str(out)!r} already holds a run; pass --overwrite to replace it, or leave --output out "
                         "for a new folder per run")
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class LoadedRun:
    """A saved run, rebuilt: ``model`` (MultiBench's MMDL holding the best weights, in eval
    mode), the checkpoint ``config`` and the run folder ``path``."""

    model: nn.Module
    config: Dict[str, Any]
    path: Path


def load_model(run_dir: PathLike, map_location: str = "cpu") -> LoadedRun:
    """Rebuild the model a run folder records and load its best weights
    (``torch.load(..., weights_only=True)``: no code runs from the file).

    Raises:
        FileNotFoundError: no ``best.pt`` in ``run_dir``.
        ValueError: the config does not record the method (a run saved by something other
            than ``multizoo-ext train``), or the weights do not fit the rebuilt model.
    """
    from multizoo_ext.training_structures.supervised import MMDL

    path = Path(run_dir)
    weights = path / WEIGHTS if path.is_dir() else path
    state, config = load_checkpoint(weights, map_location=map_location)
    settings = config.get("method")
    if not isinstance(settings, Mapping):
        raise ValueError(f"{str(weights)!r} has no method record in its config (keys: {sorted(config)}); "
                         "it was not written by multizoo-ext train, so the model cannot be rebuilt from it")
    m = rebuild_method(settings)
    model = MMDL(m.encoders, m.fusion, m.head)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"the weights in {str(weights)!r} do not fit the model its config describes: {exc}") from None
    model.eval()
    return LoadedRun(model, config, weights.parent)


def evaluate_run(run_dir: Union[PathLike, LoadedRun], dataset: Optional[str] = None,
                 data_kwargs: Optional[Mapping[str, Any]] = None, batch_size: Optional[int] = None,
                 seed: Optional[int] = None, device: Optional[str] = None) -> Dict[str, Any]:
    """Score a saved run (its folder, or the :class:`LoadedRun` of :func:`load_model`) on the
    test split of a dataset: by default the one it was trained on, with the same loader
    keywords and seed (so the same split), giving its recorded test metrics.

    Returns:
        every metric of :func:`multizoo_ext.metrics.compute_metrics` for the run's task.
    """
    from multizoo_ext.registry import create_dataset
    from multizoo_ext.training_structures.supervised import test

    run = run_dir if isinstance(run_dir, LoadedRun) else load_model(run_dir)
    cfg = run.config
    name = dataset or cfg.get("dataset")
    if name is None:
        raise ValueError("the run does not record its dataset; pass dataset=")
    kwargs = dict(cfg.get("data_kwargs") or {}) if dataset is None or dataset == cfg.get("dataset") else {}
    kwargs.update(data_kwargs or {})
    _, _, test_dl = create_dataset(name, batch_size=batch_size or cfg.get("batch_size", 64),
                                   seed=cfg.get("seed", 0) if seed is None else seed, **kwargs)
    task = cfg["method"]["spec"]["task"]
    return test(run.model, test_dl, task=task, no_robust=True, full=True, device=device)
