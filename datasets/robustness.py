"""Robustness test loaders: the ``{modality: [loader at level 0, level 1, ...]}`` dict that
``test(..., no_robust=False)`` (ours and MultiBench's) evaluates.

Perturbations, applied to one modality at a time, lazily (a wrapper dataset perturbs each
sample when it is read; nothing is copied) and deterministically (the random numbers of
sample i depend only on ``seed``, the modality and i, not on batch order, workers or level):

* ``"gaussian"``: ``x + level * sigma * z`` with ``z ~ N(0, 1)`` per entry. ``sigma`` is the
  modality's standard deviation over the wrapped dataset (``relative=True``, the default:
  level 1 means noise as large as the signal) or 1 (``relative=False``: ``level`` is the
  absolute noise std), or given per modality with ``scales``.
* ``"dropout"``: each entry is zeroed with probability ``level`` (level 1 zeroes everything).
* ``"missing"``: the whole modality of a sample is zeroed with probability ``level``, so
  level 1 is the missing-modality setting (the modality is zeros for every sample).

The same random draw serves every level, so perturbations are nested: the entries dropped
at level 0.3 are also dropped at 0.5, and the Gaussian noise grows linearly with the level.
Level 0 returns the clean samples exactly. Default levels are MultiBench's 0.0, 0.1, ..., 1.0,
which is the step its relative robustness (area under the curve, step 0.1) assumes.

Example:
    >>> from multizoo_ext.datasets.robustness import robustness_loaders
    >>> robust = robustness_loaders(test_loader, kind="gaussian")           # doctest: +SKIP
    >>> results = test(model, robust, no_robust=False)                       # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

KINDS = ("gaussian", "dropout", "missing")
DEFAULT_LEVELS = tuple(i / 10 for i in range(11))
_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant for seed mixing


def _sample_seed(seed: int, modality: int, index: int) -> int:
    """A deterministic 63-bit seed for (seed, modality, sample index)."""
    h = (seed * _MIX + (modality + 1) * 0xBF58476D1CE4E5B9 + (index + 1) * 0x94D049BB133111EB) % (1 << 64)
    h ^= h >> 31
    return h % (1 << 63)


class PerturbedDataset(Dataset):
    """Wraps a map-style dataset yielding ``[x_1, ..., x_M, y]``; perturbs modality
    ``modality`` of every sample on access.

    Args:
        dataset: the clean dataset (not copied).
        modality: index of the modality to perturb (0-based).
        kind: "gaussian", "dropout" or "missing".
        level: in [0, 1] for dropout/missing, >= 0 for gaussian.
        seed: base seed. Default: 0.
        scale: sigma of the Gaussian noise (see the module docstring). Default: 1.0.

    Other modalities and the label are returned unchanged; the perturbed modality comes back
    as a tensor of its original shape (floating point).
    """

    def __init__(self, dataset: Dataset, modality: int, kind: str, level: float, seed: int = 0,
                 scale: float = 1.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        level = float(level)
        if not math.isfinite(level) or level < 0 or (kind != "gaussian" and level > 1):
            bound = "[0, inf)" if kind == "gaussian" else "[0, 1]"
            raise ValueError(f"{kind} level must lie in {bound}, got {level}")
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale must be a finite non-negative number, got {scale}")
        self.dataset, self.modality, self.kind = dataset, int(modality), kind
        self.level, self.seed, self.scale = level, int(seed), float(scale)
        self.modality_names = getattr(dataset, "modality_names", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> List[Any]:
        item = list(self.dataset[i])
        if self.level == 0:
            return item
        x = torch.as_tensor(item[self.modality])
        if not x.is_floating_point():
            x = x.float()
        g = torch.Generator().manual_seed(_sample_seed(self.seed, self.modality, int(i)))
        if self.kind == "gaussian":
            z = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)
            x = x + (self.level * self.scale) * z
        elif self.kind == "dropout":
            u = torch.rand(x.shape, generator=g)
            x = torch.where(u < self.level, torch.zeros((), dtype=x.dtype), x)
        else:  # missing
            u = float(torch.rand((), generator=g))
            if u < self.level:
                x = torch.zeros_like(x)
        item[self.modality] = x
        return item


def _num_modalities(dataset: Dataset) -> int:
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("cannot build robustness loaders for an empty dataset")
    first = dataset[0]
    if not isinstance(first, (list, tuple)) or len(first) < 2:
        raise ValueError("robustness loaders need a dataset yielding [x_1, ..., x_M, y], "
                         f"got items of type {type(first).__name__}")
    return len(first) - 1


@torch.no_grad()
def modality_stds(loader: DataLoader) -> List[float]:
    """One standard deviation per modality, pooled over all its entries and samples in one
    pass of ``loader`` (population std, float64 accumulation). Returns M floats."""
    sums: List[float] = []
    sq: List[float] = []
    counts: List[int] = []
    for batch in loader:
        xs = batch[:-1]
        if not sums:
            sums, sq, counts = [0.0] * len(xs), [0.0] * len(xs), [0] * len(xs)
        for j, x in enumerate(xs):
            x = torch.as_tensor(x).double()
            sums[j] += float(x.sum())
            sq[j] += float((x * x).sum())
            counts[j] += x.numel()
    if not sums:
        raise ValueError("cannot measure modality scales on an empty loader")
    return [math.sqrt(max(s2 / c - (s / c) ** 2, 0.0)) for s, s2, c in zip(sums, sq, counts)]


def _loader_like(loader: DataLoader, dataset: Dataset, batch_size: Optional[int]) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size or loader.batch_size or 1, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn)


def _modality_names(dataset: Dataset, modality_names: Optional[Sequence[str]], m: int) -> List[str]:
    names = list(modality_names) if modality_names is not None else \
        list(getattr(dataset, "modality_names", None) or [f"modality_{i}" for i in range(m)])
    if len(names) != m:
        raise ValueError(f"got {len(names)} modality names for {m} modalities")
    return names


def _resolve_modalities(modalities: Optional[Sequence[Union[int, str]]], names: List[str], m: int) -> List[int]:
    if modalities is None:
        return list(range(m))
    out = []
    for k in modalities:
        if isinstance(k, str):
            if k not in names:
                raise ValueError(f"unknown modality {k!r}; this dataset's modalities are {names}")
            out.append(names.index(k))
        else:
            if not 0 <= int(k) < m:
                raise ValueError(f"modality index must be in [0, {m - 1}], got {k}")
            out.append(int(k))
    return out


def robustness_loaders(
    loader: DataLoader,
    kind: str = "gaussian",
    levels: Sequence[float] = DEFAULT_LEVELS,
    modalities: Optional[Sequence[Union[int, str]]] = None,
    modality_names: Optional[Sequence[str]] = None,
    relative: bool = True,
    scales: Optional[Sequence[float]] = None,
    seed: int = 0,
    batch_size: Optional[int] = None,
) -> Dict[str, List[DataLoader]]:
    """``{modality_name: [loader at levels[0], levels[1], ...]}`` for one perturbation kind.

    Args:
        loader: the clean test DataLoader (over a map-style dataset yielding
            ``[x_1, ..., x_M, y]``); its batch size, workers and collate_fn are reused.
        kind: "gaussian", "dropout" or "missing". Default: "gaussian".
        levels: perturbation levels; the first should be 0 so the first loader is clean
            (``test()`` reads its clean score there). Default: 0.0, 0.1, ..., 1.0.
        modalities: which modalities get a curve (indices or names). Default: all.
        modality_names: keys of the dict. Default: ``loader.dataset.modality_names`` when
            present, else ``"modality_0"``, ...
        relative: gaussian only, scale the noise by each modality's std over ``loader``
            (one streaming pass). Default: True.
        scales: gaussian only, explicit sigma per modality (all M), overriding ``relative``
            (e.g. training-set stds).
        seed: Default: 0.
        batch_size: Default: the loader's.

    Returns:
        The dict for ``test(model, robust, no_robust=False)``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    levels = [float(v) for v in levels]
    if not levels:
        raise ValueError("levels must hold at least one level")
    if levels[0] != 0:
        logger.warning("the first robustness level is %s, not 0: test() will read its clean score from "
                       "a perturbed loader", levels[0])
    dataset = loader.dataset
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ValueError("robustness loaders need a DataLoader over a map-style dataset (with __getitem__ "
                         "and __len__)")
    m = _num_modalities(dataset)
    names = _modality_names(dataset, modality_names, m)
    chosen = _resolve_modalities(modalities, names, m)
    sig = [1.0] * m
    if kind == "gaussian":
        if scales is not None:
            if len(scales) != m:
                raise ValueError(f"scales must give one sigma per modality ({m}), got {len(scales)}")
            sig = [float(s) for s in scales]
        elif relative:
            sig = modality_stds(_loader_like(loader, dataset, batch_size))
    out: Dict[str, List[DataLoader]] = {}
    for j in chosen:
        out[names[j]] = [_loader_like(loader, PerturbedDataset(dataset, j, kind, lv, seed, sig[j]), batch_size)
                         for lv in levels]
    return out


def all_robustness_loaders(
    loader: DataLoader,
    kinds: Sequence[str] = KINDS,
    levels: Sequence[float] = DEFAULT_LEVELS,
    modalities: Optional[Sequence[Union[int, str]]] = None,
    modality_names: Optional[Sequence[str]] = None,
    relative: bool = True,
    scales: Optional[Sequence[float]] = None,
    seed: int = 0,
    batch_size: Optional[int] = None,
) -> Dict[str, List[DataLoader]]:
    """Every kind in one dict for ``test()``: keys ``"{modality}:{kind}"`` (e.g.
    ``"left:gaussian"``, ``"left:missing"``), values as in :func:`robustness_loaders`."""
    out: Dict[str, List[DataLoader]] = {}
    for kind in kinds:
        part = robustness_loaders(loader, kind, levels, modalities, modality_names, relative, scales, seed,
                                  batch_size)
        out.update({f"{name}:{kind}": loaders for name, loaders in part.items()})
    return out


def missing_modality_loaders(loader: DataLoader, modality_names: Optional[Sequence[str]] = None,
                             batch_size: Optional[int] = None) -> Dict[str, DataLoader]:
    """``{modality_name: loader with that modality zeroed for every sample}`` (no levels)."""
    dataset = loader.dataset
    m = _num_modalities(dataset)
    names = _modality_names(dataset, modality_names, m)
    return {names[j]: _loader_like(loader, PerturbedDataset(dataset, j, "missing", 1.0), batch_size)
            for j in range(m)}
