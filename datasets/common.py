"""Shared machinery of the dataset loaders: an in-memory multimodal dataset, input
validators, train-only normalisation, stratified splits and DataLoader construction.

Every loader in this folder ends in :func:`arrays_to_dataloaders` (or, for HDF5 data, reuses
its pieces), so they share one behaviour:

* batches are ``[x_1, ..., x_M, y]`` with one tensor per modality, label last;
* labels follow the package convention: classification ``(B,)`` int64, multilabel
  ``(B, K)`` float32 multi-hot, regression ``(B, 1)`` float32 (``(B, k)`` for k targets);
* normalisation statistics are fitted on the training split only and applied to all three;
* the training loader is shuffled with a seeded ``torch.Generator``; validation and test
  loaders keep the stored order.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x1, x2 = rng.normal(size=(100, 4)), rng.normal(size=(100, 6))
    >>> y = np.arange(100) % 2
    >>> train, valid, test = arrays_to_dataloaders([x1, x2], y, batch_size=16)
    >>> [t.shape for t in next(iter(train))]
    [torch.Size([16, 4]), torch.Size([16, 6]), torch.Size([16])]
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Any]]
Loaders = Tuple[DataLoader, DataLoader, DataLoader]

from multizoo_ext.tasks import TASKS  # noqa: E402  (the one owner of the task names)
NORMALIZATIONS = ("standard", "minmax")


class DataKeyError(KeyError, ValueError):
    """A file lacks a required key/array. Both a ``KeyError`` (what it is) and a
    ``ValueError`` (what the CLI reports as bad input); ``str()`` is the plain message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------- conversion
def to_numpy(x: ArrayLike, what: str = "array") -> np.ndarray:
    """``x`` as a NumPy array (a tensor is moved to the CPU and detached; no copy when possible).

    Raises:
        TypeError: ``x`` cannot be turned into a numeric array.
    """
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be a NumPy array, a tensor or a nested list of numbers, "
                        f"got {type(x).__name__}") from exc
    if arr.dtype == object:
        raise TypeError(f"{what} must hold numbers of one shape per row, got an object array "
                        "(ragged rows or mixed types)")
    return arr


def as_float_tensor(x: np.ndarray) -> torch.Tensor:
    """Floating or boolean arrays as float32 tensors, integer arrays as int64 tensors (token
    ids stay integers). Shares memory with ``x`` when it is already float32/int64."""
    if np.issubdtype(x.dtype, np.floating) or x.dtype == bool:
        x = x.astype(np.float32, copy=False)
    elif np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.int64, copy=False)
    else:
        raise TypeError(f"modality arrays must be numeric, got dtype {x.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x))


# ----------------------------------------------------------------------------- validators
def check_finite_array(x: np.ndarray, what: str) -> None:
    """Raise ``ValueError`` if a floating array holds NaN/Inf (one pass; integer arrays pass
    untouched). ``what`` names the array in the message."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.complexfloating):
        finite = np.isfinite(x)
        if not finite.all():
            raise ValueError(f"{what} contains {int(x.size - np.count_nonzero(finite))} NaN/Inf value(s); "
                             "clean or impute the data first")


def check_distinct(values: Sequence[Any], what: str) -> List[Any]:
    """``values`` as a list; ``ValueError`` if it repeats an entry (e.g. ``modalities=[1, 1]``)."""
    items = list(values)
    repeated = sorted({v for v in items if items.count(v) > 1}, key=str)
    if repeated:
        raise ValueError(f"{what} must not repeat an entry, got {items} (repeated: {repeated})")
    return items


def check_task(task: str) -> None:
    """Raise unless ``task`` is one of ``classification``, ``multilabel``, ``regression``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def check_modality_arrays(modalities: Sequence[ArrayLike], labels: ArrayLike,
                          where: str = "training") -> Tuple[List[np.ndarray], np.ndarray]:
    """Validate the arrays of one split and return them as NumPy arrays.

    Args:
        modalities: M arrays, each ``(N, ...)``.
        labels: ``(N,)`` or ``(N, K)``.
        where: split name used in the error messages.

    Returns:
        ``(modalities, labels)`` as NumPy arrays (no copy when the inputs already are).

    Raises:
        TypeError: ``modalities`` is not a list/tuple of arrays.
        ValueError: no modality, an empty split, row counts that disagree, a scalar array,
            or NaN/Inf values.
    """
    if isinstance(modalities, (np.ndarray, torch.Tensor)) or not isinstance(modalities, (list, tuple)):
        raise TypeError(f"{where} modalities must be a list of arrays, one per modality, "
                        f"got {type(modalities).__name__}")
    if len(modalities) == 0:
        raise ValueError(f"{where} data needs at least one modality array, got an empty list")
    mods = [to_numpy(m, f"{where} modality {i}") for i, m in enumerate(modalities)]
    y = to_numpy(labels, f"{where} labels")
    for i, m in enumerate(mods):
        if m.ndim == 0:
            raise ValueError(f"{where} modality {i} must have a row dimension (N, ...), got a scalar")
    if y.ndim == 0:
        raise ValueError(f"{where} labels must have a row dimension (N,) or (N, K), got a scalar")
    rows = [m.shape[0] for m in mods]
    if y.shape[0] == 0 or any(r == 0 for r in rows):
        raise ValueError(f"{where} split is empty: modality rows {rows}, label rows {y.shape[0]}")
    if any(r != y.shape[0] for r in rows):
        raise ValueError(f"{where} modality and label row counts disagree: modalities have rows {rows} "
                         f"but labels have {y.shape[0]}")
    for i, m in enumerate(mods):
        check_finite_array(m, f"{where} modality {i}")
    check_finite_array(y, f"{where} labels")
    return mods, y


def check_same_feature_shapes(reference: Sequence[np.ndarray], other: Sequence[np.ndarray],
                              where: str) -> None:
    """Raise if ``other`` has a different number of modalities or per-sample shapes than
    ``reference`` (the training arrays)."""
    if len(other) != len(reference):
        raise ValueError(f"{where} data has {len(other)} modalities but the training data has {len(reference)}")
    for i, (a, b) in enumerate(zip(reference, other)):
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"{where} modality {i} has sample shape {tuple(b.shape[1:])} but the training "
                             f"data has {tuple(a.shape[1:])}")


def convert_labels(labels: np.ndarray, task: str, num_classes: Optional[int] = None,
                   where: str = "training") -> np.ndarray:
    """Labels in the package convention.

    Args:
        labels: classification ``(N,)``/``(N, 1)`` integral values (floats such as 0.0/1.0
            are accepted); multilabel ``(N, K)`` 0/1 values; regression ``(N,)`` or ``(N, k)``.
        task: "classification", "multilabel" or "regression".
        num_classes: classification only, labels must lie in ``[0, num_classes)``.

    Returns:
        classification ``(N,)`` int64; multilabel ``(N, K)`` float32; regression ``(N, 1)``
        (or ``(N, k)``) float32.

    Raises:
        ValueError: wrong shape, non-integral or negative class labels, labels at or above
            ``num_classes``, or multi-hot values other than 0/1.
    """
    check_task(task)
    y = np.asarray(labels)
    if task == "classification":
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise ValueError(f"{where} classification labels must have shape (N,) or (N, 1), got {y.shape}; "
                             "use task='multilabel' for multi-hot labels")
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
            if not np.issubdtype(y.dtype, np.floating) or not np.all(np.mod(y, 1) == 0):
                raise ValueError(f"{where} classification labels must be integer class indices, "
                                 f"got non-integer values of dtype {y.dtype}")
        y = y.astype(np.int64)
        if y.min() < 0:
            raise ValueError(f"{where} classification labels must be non-negative class indices, "
                             f"got a minimum of {int(y.min())}")
        if num_classes is not None and y.max() >= num_classes:
            raise ValueError(f"{where} classification labels must lie in [0, {num_classes - 1}] for "
                             f"num_classes={num_classes}, got a maximum of {int(y.max())}")
        return y
    if task == "multilabel":
        if y.ndim != 2:
            raise ValueError(f"{where} multilabel labels must be multi-hot of shape (N, K), got {y.shape}")
        if not np.all((y == 0) | (y == 1)):
            raise ValueError(f"{where} multilabel labels must be multi-hot 0/1 values")
        return y.astype(np.float32)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise ValueError(f"{where} regression labels must have shape (N,) or (N, k), got {y.shape}")
    return y.astype(np.float32)


def check_stratifiable(labels: np.ndarray, n_holdout: int, n_keep: int, where: str) -> None:
    """Raise unless a stratified split of ``labels`` (N,) into ``n_keep`` + ``n_holdout`` rows
    can hold every class on both sides."""
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        c = classes[counts.argmin()]
        raise ValueError(f"class {c} has only {counts.min()} sample(s) in the {where} rows; stratified "
                         "splitting needs at least 2 per class (pass stratify=False or supply the split)")
    if n_holdout < len(classes) or n_keep < len(classes):
        raise ValueError(f"a stratified split of the {where} rows into {n_keep} + {n_holdout} samples cannot "
                         f"hold all {len(classes)} classes on both sides; raise the fraction or pass stratify=False")


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as a non-negative int, else a ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}")
    return int(seed)


# ----------------------------------------------------------------------------- normalisation
@dataclass
class Normalizer:
    """Per-feature affine normalisation ``(x - shift) / scale`` fitted on training rows.

    Attributes:
        method: "standard" (shift = mean, scale = population std) or "minmax" (shift = min,
            scale = max - min, so training values land in [0, 1]).
        shift, scale: arrays of the per-sample shape (one value per feature); a zero scale
            (constant feature) is replaced by 1 so constant features map to 0.

    Example:
        >>> nz = Normalizer.fit(np.array([[1.0, 5.0], [3.0, 5.0]]), "standard")
        >>> nz.transform(np.array([[2.0, 5.0]])).tolist()
        [[0.0, 0.0]]
    """

    method: str
    shift: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, method: str, reduce_axes: Tuple[int, ...] = (0,),
            mask: Optional[np.ndarray] = None, rows: Optional[np.ndarray] = None,
            chunk_rows: int = 2048) -> "Normalizer":
        """Fit on the TRAINING values of ``x``, ``chunk_rows`` samples at a time (float64
        accumulators; the training rows are never copied whole).

        Args:
            x: ``(N, ...)`` values.
            method: "standard" or "minmax".
            reduce_axes: axes the statistics are pooled over; must contain 0. Default
                ``(0,)``: one value per entry of the sample shape. Sequences ``(N, T, d)``
                use ``(0, 1)`` (one value per feature).
            mask: optional boolean array of ``x.shape[:2]`` (with ``reduce_axes=(0, 1)``)
                marking the positions that count, e.g. non-padded time steps.
            rows: the training rows of ``x``. Default: all rows.
            chunk_rows: samples per chunk. Default: 2048.
        """
        if method not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)} or None, got {method!r}")
        if 0 not in reduce_axes:
            raise ValueError(f"reduce_axes must contain the sample axis 0, got {reduce_axes}")
        axes = sorted(reduce_axes)
        keep = [a for a in range(x.ndim) if a not in axes]
        index = np.arange(x.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)

        def chunks():
            for a in range(0, len(index), chunk_rows):
                sel = index[a:a + chunk_rows]
                c = x[sel] if rows is not None else x[sel[0]:sel[-1] + 1]
                if mask is not None:
                    yield c[mask[sel]]  # (n_valid, feature...)
                else:
                    yield np.transpose(c, axes + keep).reshape((-1,) + tuple(x.shape[k] for k in keep))

        return cls.from_chunks(method, chunks())

    @classmethod
    def from_chunks(cls, method: str, chunks: Iterable[np.ndarray]) -> "Normalizer":
        """Fit from chunks ``(n_j, feature...)`` of training values (pooled over axis 0),
        merging per-chunk means and squared deviations (Chan et al.) in float64."""
        if method not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)} or None, got {method!r}")
        n, mean, m2, lo, hi = 0, None, None, None, None
        for c in chunks:
            c = np.asarray(c, dtype=np.float64)
            k = c.shape[0]
            if k == 0:
                continue
            if method == "standard":
                c_mean = c.mean(axis=0)
                c_m2 = ((c - c_mean) ** 2).sum(axis=0)
                if mean is None:
                    mean, m2 = c_mean, c_m2
                else:
                    delta = c_mean - mean
                    mean = mean + delta * (k / (n + k))
                    m2 = m2 + c_m2 + delta * delta * (n * k / (n + k))
            else:
                lo = c.min(axis=0) if lo is None else np.minimum(lo, c.min(axis=0))
                hi = c.max(axis=0) if hi is None else np.maximum(hi, c.max(axis=0))
            n += k
        if n == 0:
            raise ValueError("cannot fit a normaliser on zero training values")
        if method == "standard":
            shift, scale = mean, np.sqrt(m2 / n)
        else:
            shift, scale = lo, hi - lo
        # constant features (spread below float32 resolution) get scale 1, i.e. map to ~0
        scale = np.where(scale > 1e-7 * np.maximum(np.abs(shift), 1.0), scale, 1.0)
        return cls(method, np.asarray(shift, dtype=np.float32), np.asarray(scale, dtype=np.float32))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - shift) / scale`` as float32; ``x`` is ``(N, ...)`` with the fitted feature shape."""
        return ((x.astype(np.float32, copy=False) - self.shift) / self.scale).astype(np.float32, copy=False)

    def transform_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`transform` for one sample or a batch tensor."""
        return (x.float() - torch.from_numpy(self.shift)) / torch.from_numpy(self.scale)


# ----------------------------------------------------------------------------- dataset
class MultimodalDataset(Dataset):
    """Rows of M in-memory modality arrays plus labels.

    Args:
        modalities: M arrays/tensors ``(N, ...)`` (floating -> float32 tensors, integer ->
            int64; NumPy arrays already of that dtype are shared, not copied).
        labels: ``(N,)`` or ``(N, K)`` array/tensor, already in the package convention.
        indices: rows of the arrays this dataset exposes (default: all). Splits of one pool
            share the pool's memory.
        modality_names: optional names (used by the robustness helpers). Default
            ``["modality_0", ...]``.
        validate: run :func:`check_modality_arrays` (row counts, NaN/Inf). Default: True.

    ``dataset[i]`` returns ``[x_1 (d_1...), ..., x_M (d_M...), y]`` (tensors).
    """

    def __init__(self, modalities: Sequence[ArrayLike], labels: ArrayLike,
                 indices: Optional[Sequence[int]] = None,
                 modality_names: Optional[Sequence[str]] = None, validate: bool = True) -> None:
        if validate:
            mods, y = check_modality_arrays(modalities, labels, "dataset")
        else:
            mods, y = [to_numpy(m) for m in modalities], to_numpy(labels)
        self.modalities: List[torch.Tensor] = [as_float_tensor(m) for m in mods]
        self.labels: torch.Tensor = torch.from_numpy(np.ascontiguousarray(y))
        n = len(self.labels)
        if indices is None:
            self.indices = np.arange(n)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if self.indices.size and (self.indices.min() < -n or self.indices.max() >= n):
                raise ValueError(f"dataset indices must lie in [0, {n}), got [{self.indices.min()}, "
                                 f"{self.indices.max()}]")
        self.modality_names = list(modality_names) if modality_names is not None else \
            [f"modality_{i}" for i in range(len(self.modalities))]
        if len(self.modality_names) != len(self.modalities):
            raise ValueError(f"got {len(self.modality_names)} modality names for {len(self.modalities)} modalities")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> List[torch.Tensor]:
        j = int(self.indices[i])
        return [m[j] for m in self.modalities] + [self.labels[j]]

    @property
    def split_labels(self) -> torch.Tensor:
        """Labels of the exposed rows, ``(len(self),)`` or ``(len(self), K)``."""
        return self.labels[torch.from_numpy(self.indices)]


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                num_workers: int = 0, collate_fn: Any = None) -> DataLoader:
    """A DataLoader; when ``shuffle`` the order comes from a ``torch.Generator`` seeded with
    ``seed`` (reproducible across runs and independent of the global RNG)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    generator = torch.Generator().manual_seed(check_seed(seed)) if shuffle else None
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=shuffle, generator=generator,
                      num_workers=int(num_workers), collate_fn=collate_fn)


# ----------------------------------------------------------------------------- splitting
def _split_indices(labels: np.ndarray, idx: np.ndarray, fraction: float, stratify: bool, seed: int,
                   where: str) -> Tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (kept, held out) with ``round(fraction * len(idx))`` held out,
    stratified by ``labels[idx]`` when ``stratify``. Both parts are sorted."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ValueError(f"the {where} fraction must be in (0, 1), got {fraction}")
    n = len(idx)
    n_out = int(round(fraction * n))
    if n_out < 1 or n - n_out < 1:
        raise ValueError(f"cannot hold out a fraction {fraction} of {n} {where} rows and keep both parts "
                         "non-empty; supply more rows or another fraction")
    strat = None
    if stratify:
        strat = labels[idx]
        check_stratifiable(strat, n_out, n - n_out, where)
    keep, out = train_test_split(idx, test_size=n_out, random_state=seed, stratify=strat)
    return np.sort(keep), np.sort(out)


def arrays_to_dataloaders(
    modalities: Sequence[ArrayLike],
    labels: ArrayLike,
    *,
    valid_modalities: Optional[Sequence[ArrayLike]] = None,
    valid_labels: Optional[ArrayLike] = None,
    test_modalities: Optional[Sequence[ArrayLike]] = None,
    test_labels: Optional[ArrayLike] = None,
    splits: Optional[Sequence[Sequence[int]]] = None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.2,
    stratify: bool = True,
    normalize: Optional[str] = None,
    task: str = "classification",
    num_classes: Optional[int] = None,
    modality_names: Optional[Sequence[str]] = None,
    batch_size: int = 32,
    num_workers: int = 0,
    seed: int = 0,
    split_seed: Optional[int] = None,
    train_shuffle: bool = True,
) -> Loaders:
    """Turn per-modality arrays into (train, valid, test) DataLoaders.

    Where the three splits come from, in order of precedence:

    1. ``splits=(train_idx, valid_idx, test_idx)``: explicit row indices into ``modalities``
       (then no ``valid_*`` arrays may be given); with separate ``test_*`` arrays,
       ``splits=(train_idx, valid_idx)``;
    2. ``test_modalities``/``test_labels`` given: they are the test split; otherwise
       ``test_fraction`` of the rows are held out (stratified for classification);
    3. ``valid_modalities``/``valid_labels`` given: they are the validation split; otherwise
       ``valid_fraction`` of the remaining training rows are held out (stratified).

    Args:
        modalities: M arrays ``(N, ...)``, the training pool (or everything, see above).
        labels: ``(N,)`` class indices, ``(N, K)`` multi-hot, or regression targets.
        valid_modalities, valid_labels: optional separate validation arrays.
        test_modalities, test_labels: optional separate test arrays.
        splits: optional explicit ``(train, valid, test)`` row indices (``(train, valid)``
            when test arrays are given).
        valid_fraction: share of the training rows held out for validation. Default: 0.1.
        test_fraction: share of all rows held out for test when no test arrays are given.
            Default: 0.2.
        stratify: stratify random splits by class (classification only; multilabel and
            regression splits are random). Default: True.
        normalize: "standard" (zero mean, unit variance per feature), "minmax" (training
            range -> [0, 1]) or None (also the string "none", for callers such as the registry
            and the CLI, which drop None keywords). Statistics come from the TRAINING split
            only. Default: None.
        task: "classification", "multilabel" or "regression" (label conversion, see
            :func:`convert_labels`). Default: "classification".
        num_classes: optional, classification labels must be below it.
        modality_names: names exposed as ``dataset.modality_names``.
        batch_size: of all three loaders. Default: 32.
        num_workers: DataLoader workers. Default: 0.
        seed: seed of the training loader's shuffling. Default: 0.
        split_seed: seed of the random splits. Default: None, i.e. ``seed``.
        train_shuffle: shuffle the training loader (seeded). Default: True.

    Returns:
        ``(train, valid, test)`` DataLoaders over :class:`MultimodalDataset` yielding
        ``[x_1 (B, ...), ..., x_M (B, ...), y]``. Each dataset carries ``normalizers`` (a list
        of :class:`Normalizer` or None per modality).

    Raises:
        ValueError: any failed validation (row counts, NaN/Inf, empty split, bad labels,
            classes too small to stratify, inconsistent split arguments).
    """
    check_task(task)
    seed = check_seed(seed)
    split_seed = seed if split_seed is None else check_seed(split_seed, "split_seed")
    mods, y_raw = check_modality_arrays(modalities, labels, "training")
    y = convert_labels(y_raw, task, num_classes, "training")
    n = y.shape[0]
    do_strat = stratify and task == "classification"

    def _extra(m: Optional[Sequence[ArrayLike]], lab: Optional[ArrayLike], where: str):
        if (m is None) != (lab is None):
            raise ValueError(f"pass both {where}_modalities and {where}_labels, or neither")
        if m is None:
            return None
        em, ey = check_modality_arrays(m, lab, where)
        check_same_feature_shapes(mods, em, where)
        return em, convert_labels(ey, task, num_classes, where)

    valid_extra = _extra(valid_modalities, valid_labels, "valid")
    test_extra = _extra(test_modalities, test_labels, "test")

    # row indices into the pool per split (None: that split has its own arrays)
    if splits is not None:
        if valid_extra is not None:
            raise ValueError("pass either splits indices or separate valid arrays, not both")
        want = 2 if test_extra is not None else 3
        if len(splits) != want:
            form = "(train, valid)" if want == 2 else "(train, valid, test)"
            raise ValueError(f"splits must be {form} index arrays here, got {len(splits)} parts")
        idx = []
        for name, part in zip(("train", "valid", "test"), splits):
            a = np.asarray(part, dtype=np.int64).reshape(-1)
            if a.size == 0:
                raise ValueError(f"the {name} split given in splits is empty")
            if a.min() < 0 or a.max() >= n:
                raise ValueError(f"{name} split indices must lie in [0, {n}), got [{a.min()}, {a.max()}]")
            idx.append(a)
        train_idx, valid_idx = idx[0], idx[1]
        test_idx = idx[2] if want == 3 else None
        for name, other in (("valid", valid_idx), ("test", test_idx)):
            if other is not None and np.intersect1d(train_idx, other).size:
                logger.warning("splits: %d row(s) are in both the train and the %s split",
                               np.intersect1d(train_idx, other).size, name)
    else:
        pool = np.arange(n)
        if test_extra is None:
            pool, test_idx = _split_indices(y, pool, test_fraction, do_strat, split_seed, "test")
        else:
            test_idx = None
        if valid_extra is None:
            train_idx, valid_idx = _split_indices(y, pool, valid_fraction, do_strat, split_seed, "validation")
        else:
            train_idx, valid_idx = pool, None

    normalizers: List[Optional[Normalizer]] = [None] * len(mods)
    if isinstance(normalize, str) and normalize.lower() == "none":
        normalize = None
    if normalize is not None:
        normalizers = [Normalizer.fit(m, normalize, rows=train_idx) for m in mods]

    def _apply(arrays: List[np.ndarray]) -> List[np.ndarray]:
        # normalise, or convert once to the tensor dtype so the three splits share one copy
        return [nz.transform(a) if nz is not None else as_float_tensor(a).numpy()
                for a, nz in zip(arrays, normalizers)]

    pool_mods = _apply(mods)

    def _dataset(extra, idx) -> MultimodalDataset:
        if extra is not None:
            ds = MultimodalDataset(_apply(extra[0]), extra[1], None, modality_names, validate=False)
        else:
            ds = MultimodalDataset(pool_mods, y, idx, modality_names, validate=False)
        ds.normalizers = normalizers  # type: ignore[attr-defined]
        return ds

    train_ds = _dataset(None, train_idx)
    valid_ds = _dataset(valid_extra, valid_idx)
    test_ds = _dataset(test_extra, test_idx)
    logger.info("splits: %d train, %d valid, %d test rows (%s, normalize=%s)", len(train_ds), len(valid_ds),
                len(test_ds), task, normalize)
    return (make_loader(train_ds, batch_size, train_shuffle, seed, num_workers),
            make_loader(valid_ds, batch_size, False, seed, num_workers),
            make_loader(test_ds, batch_size, False, seed, num_workers))
