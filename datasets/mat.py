"""Multi-view classification files in MATLAB's ``.mat`` format (MSRCV1, ORL, BBCSport, ...).

The layout the multi-view learning community shares its benchmarks in:

* ``X``: a 1 x V (or V x 1) cell array; cell v is an ``(N, d_v)`` matrix, dense or sparse
  (bag-of-words views are sparse). Views stored as ``(d_v, N)`` are detected from the label
  count and transposed (a square ``(N, N)`` view is taken as stored, samples in rows). A plain
  matrix instead of a cell is one view.
* labels under ``Y``, ``y``, ``gt`` or ``truth`` (the first present), ``(N, 1)``, ``(1, N)``
  or ``(N,)``, any integral values (1-based, 0-based, or not contiguous); they are mapped to
  ``0..K-1`` in sorted order (``dataset.classes`` holds the original values).

MATLAB v5/v7 files are read with ``scipy.io.loadmat``, v7.3 files (HDF5) with h5py: there a
cell is a dataset of object references, every array is stored transposed, and a sparse
matrix is a group holding ``data``, ``ir`` (row indices) and ``jc`` (column pointers).

Splits are stratified by class and drawn from ``split_seed`` (default: ``seed``).
Normalisation is fitted on the training rows only: dense views are standardised (or min-max
scaled), sparse views are max-abs scaled so they stay sparse; the rows of one batch are
densified when the batch is made. Before anything is densified the loader logs its memory
estimate and refuses dense copies above ``max_dense_bytes``.

Example:
    >>> from multizoo_ext.datasets.mat import get_dataloader
    >>> train, valid, test = get_dataloader("BBCSport.mat", seed=0)            # doctest: +SKIP
    >>> [tuple(t.shape) for t in next(iter(test))]                              # doctest: +SKIP
    [(32, 3183), (32, 3203), (32,)]
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.io
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from multizoo_ext.datasets.common import (DataKeyError, Loaders, Normalizer, _split_indices,
                                          arrays_to_dataloaders, check_seed, make_loader)
from multizoo_ext.registry import register_dataset

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
View = Union[np.ndarray, sp.csr_array]
LABEL_KEYS = ("Y", "y", "gt", "truth")
DEFAULT_MAX_DENSE_BYTES = 4 * 2 ** 30  # 4 GiB
_FLOAT_BYTES = 4  # views become float32


# ----------------------------------------------------------------------------- reading
class _H5Matrix:
    """A dense numeric HDF5 dataset of a v7.3 file, read only when needed; ``shape`` is
    MATLAB's (the transpose of the stored one)."""

    def __init__(self, ds: Any) -> None:
        self.ds, self.name = ds, ds.name
        self.shape = tuple(ds.shape[::-1])

    def read(self) -> np.ndarray:
        return np.asarray(self.ds[()]).T


def _h5_value(f: Any, obj: Any) -> Any:
    """One v7.3 variable: a list for a cell, a sparse matrix, or an :class:`_H5Matrix`."""
    import h5py

    if isinstance(obj, h5py.Group):
        if "jc" in obj and "ir" in obj:
            jc, ir = obj["jc"][()].astype(np.int64), obj["ir"][()].astype(np.int64)
            n_rows = int(obj.attrs.get("MATLAB_sparse", ir.max() + 1 if ir.size else 0))
            data = obj["data"][()] if "data" in obj else np.ones(ir.shape[0])  # logical sparse stores no data
            return sp.csc_array((data, ir, jc), shape=(n_rows, jc.shape[0] - 1))
        raise TypeError(f"{obj.name} is a MATLAB struct or object, expected a cell or a numeric matrix")
    if h5py.check_dtype(ref=obj.dtype) is not None:  # a cell: references into #refs#
        refs = np.asarray(obj[()])
        if refs.ndim == 2 and min(refs.shape) > 1:
            raise ValueError(f"{obj.name} is a {refs.shape[1]} x {refs.shape[0]} cell, expected 1 x V or V x 1")
        return [_h5_value(f, f[r]) for r in refs.ravel()]
    cls = obj.attrs.get("MATLAB_class", b"")
    cls = cls.decode() if isinstance(cls, bytes) else str(cls)
    if cls in ("char", "struct") or obj.dtype.fields is not None or not np.issubdtype(obj.dtype, np.number):
        raise TypeError(f"{obj.name} holds MATLAB class {cls or obj.dtype}, expected a numeric matrix")
    if obj.attrs.get("MATLAB_empty", 0):
        return np.zeros((0, 0))
    return _H5Matrix(obj)


def _v5_value(obj: Any) -> Any:
    """One v5 variable as ``scipy.io.loadmat`` returns it: a list for a cell, else the array."""
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        if obj.ndim == 2 and min(obj.shape) > 1:
            raise ValueError(f"a {obj.shape[0]} x {obj.shape[1]} cell, expected 1 x V or V x 1")
        return list(obj.ravel())
    return obj


def _dense(m: Any, what: str) -> np.ndarray:
    """A matrix-like (ndarray, sparse, :class:`_H5Matrix`) as a NumPy array."""
    if isinstance(m, _H5Matrix):
        return m.read()
    if sp.issparse(m):
        return m.toarray()
    a = np.asarray(m)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise TypeError(f"{what} must be numeric, got dtype {a.dtype}")
    return a


def _labels(raw: Any, where: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(y (N,) int64 in 0..K-1, classes (K,) original values)``."""
    if isinstance(raw, list):
        raise TypeError(f"{where} labels are a cell array, expected a numeric (N, 1) array")
    y = _dense(raw, f"{where} labels")
    if y.ndim == 2 and 1 in y.shape:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise ValueError(f"{where} labels must be an (N, 1), (1, N) or (N,) array of class labels, got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{where} labels are empty")
    if np.iscomplexobj(y) or not np.all(np.isfinite(y)):
        raise ValueError(f"{where} labels must be finite real class labels, got NaN/Inf or complex values")
    if not np.all(np.mod(y, 1) == 0):
        raise ValueError(f"{where} labels must be integral class labels, got non-integer values such as "
                         f"{y[np.mod(y, 1) != 0][0]}")
    classes, y_idx = np.unique(y.astype(np.int64), return_inverse=True)
    if classes.shape[0] < 2:
        raise ValueError(f"{where} labels hold a single class ({classes[0]}); classification needs at least 2")
    return y_idx.astype(np.int64).reshape(-1), classes


def _orient(shapes: List[Tuple[int, ...]], numbers: List[int], n: int, where: str) -> List[bool]:
    """Which views (``numbers``: their places in the file's cell) are stored ``(d_v, N)``
    (to transpose), given N labels."""
    for v, s in zip(numbers, shapes):
        if len(s) != 2:
            raise ValueError(f"{where} view {v} must be a 2-D (N, d) matrix, got shape {s}")
    fits = [s[0] == n or s[1] == n for s in shapes]
    if not any(fits):
        if len({s[0] for s in shapes}) == 1 or len({s[1] for s in shapes}) == 1:
            raise ValueError(f"{where} labels do not match the row count: {n} labels but the views have shapes "
                             f"{shapes}")
        raise ValueError(f"{where} views have different row counts (shapes {shapes}) and none matches the {n} labels")
    for v, s, ok in zip(numbers, shapes, fits):
        if not ok:
            raise ValueError(f"{where} views have different row counts: view {v} has shape {s} but the labels "
                             f"and the other views have {n} rows")
    return [s[0] != n for s in shapes]


def memory_estimate(widths: Sequence[int], sparse: Sequence[bool], n: int, batch_size: int = 32) -> Dict[str, int]:
    """Bytes of float32 copies: ``dense_views`` (the dense views, materialised whole),
    ``sparse_if_dense`` (the sparse views if they were densified whole: never done here)
    and ``batch`` (one densified batch of every view)."""
    dense = sum(n * d for d, s in zip(widths, sparse) if not s) * _FLOAT_BYTES
    sparse_dense = sum(n * d for d, s in zip(widths, sparse) if s) * _FLOAT_BYTES
    return {"dense_views": dense, "sparse_if_dense": sparse_dense,
            "batch": min(batch_size, n) * sum(widths) * _FLOAT_BYTES}


def _check_memory(est: Dict[str, int], max_dense_bytes: int, where: str) -> None:
    mib = 2 ** 20
    logger.info("%s memory (float32): dense views %.1f MiB, sparse views %.1f MiB if densified (kept sparse), "
                "one dense batch %.2f MiB", where, est["dense_views"] / mib, est["sparse_if_dense"] / mib,
                est["batch"] / mib)
    for key, what in (("dense_views", "the dense views"), ("batch", "one densified batch")):
        if est[key] > max_dense_bytes:
            raise ValueError(f"{where}: a float32 copy of {what} needs {est[key]} bytes ({est[key] / mib:.1f} MiB), "
                             f"above max_dense_bytes={max_dense_bytes}; select fewer "
                             "views, lower batch_size, or raise max_dense_bytes")


def _finish_view(m: Any, transpose: bool, where: str) -> View:
    """A view as float32 ``(N, d)``: a C-contiguous array, or a CSR sparse array."""
    if sp.issparse(m):
        out = sp.csr_array(m.T if transpose else m, dtype=np.float32)
        vals = out.data
    else:
        a = _dense(m, where)
        if np.iscomplexobj(a):
            raise TypeError(f"{where} holds complex values, expected real numbers")
        with np.errstate(over="ignore"):  # values beyond float32's range become Inf, reported below
            out = np.ascontiguousarray((a.T if transpose else a).astype(np.float32, copy=False))
        vals = out
    if not np.all(np.isfinite(vals)):
        raise ValueError(f"{where} contains {int((~np.isfinite(vals)).sum())} NaN/Inf value(s) (after conversion "
                         "to float32); clean or impute the data first")
    return out


def _assemble(p: Path, keys: List[str], read: Callable[[str], Any], view_key: str, label_key: Optional[str],
              views: Optional[Sequence[int]], max_dense_bytes: int, batch_size: int
              ) -> Tuple[List[View], np.ndarray, np.ndarray]:
    if view_key not in keys:
        raise DataKeyError(f"{p} has no view cell {view_key!r}; its keys are {keys}")
    if label_key is None:
        found = [k for k in LABEL_KEYS if k in keys]
        if not found:
            raise DataKeyError(f"{p} has no label array (looked for {', '.join(LABEL_KEYS)}); its keys are {keys}")
        label_key = found[0]
    elif label_key not in keys:
        raise DataKeyError(f"{p} has no label array {label_key!r}; its keys are {keys}")
    raw = read(view_key)
    raw = raw if isinstance(raw, list) else [raw]
    if not raw:
        raise ValueError(f"{p}: {view_key!r} is an empty cell, expected at least one view")
    chosen = list(range(len(raw))) if views is None else [int(v) for v in views]
    if not chosen or any(not 0 <= v < len(raw) for v in chosen):
        raise ValueError(f"views must name view indices in [0, {len(raw)}) of {p}, got {views}")
    raw = [raw[v] for v in chosen]
    for v, m in zip(chosen, raw):
        if isinstance(m, list):
            raise TypeError(f"{p}: view {v} is a nested cell, expected a numeric matrix")
        if isinstance(m, np.ndarray) and not (np.issubdtype(m.dtype, np.number) or m.dtype == bool):
            raise TypeError(f"{p}: view {v} has dtype {m.dtype}, expected a numeric matrix")
    y, classes = _labels(read(label_key), f"{p}")
    n = y.shape[0]
    shapes = [tuple(int(s) for s in np.shape(m)) for m in raw]
    transpose = _orient(shapes, chosen, n, str(p))
    widths = [s[1] if not t else s[0] for s, t in zip(shapes, transpose)]
    is_sparse = [sp.issparse(m) for m in raw]
    _check_memory(memory_estimate(widths, is_sparse, n, batch_size), max_dense_bytes, str(p))
    out = [_finish_view(m, t, f"{p} view {v}") for v, m, t in zip(chosen, raw, transpose)]
    logger.info("%s: %d rows, views %s (sparse %s, transposed %s), %d classes from %r (values %s..%s)", p, n,
                widths, is_sparse, transpose, classes.shape[0], label_key, classes[0], classes[-1])
    return out, y, classes


def load_mat(path: PathLike, view_key: str = "X", label_key: Optional[str] = None,
             views: Optional[Sequence[int]] = None, max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
             batch_size: int = 32) -> Tuple[List[View], np.ndarray, np.ndarray]:
    """Read a multi-view ``.mat`` file (v5/v7 through scipy, v7.3 through h5py).

    Args:
        path: the file.
        view_key: the cell of views. Default: "X".
        label_key: the label array. Default: the first of ``Y``, ``y``, ``gt``, ``truth``.
        views: indices of the views to keep, in order. Default: all.
        max_dense_bytes: refuse (ValueError) when a float32 copy of the dense views, or one
            densified batch of ``batch_size`` rows, would exceed it (checked, and the estimate
            logged, before any view is converted; a v7.3 file's dense views are not even read
            then, while scipy reads a v5 file whole first). Default: 4 GiB.
        batch_size: rows of the batch in the memory estimate. Default: 32.

    Returns:
        ``(views, labels, classes)``: views ``(N, d_v)`` as float32 arrays or float32 CSR
        sparse arrays; labels ``(N,)`` int64 in ``0..K-1``; classes ``(K,)`` the original
        label values (label k is ``classes[k]``).

    Raises:
        FileNotFoundError: no such file. DataKeyError (a KeyError and ValueError): a key is
            missing (the message lists the keys found). ValueError: an unreadable file, views
            whose row counts differ, labels that do not match the row count, NaN/Inf values,
            non-integral labels, a single class, a dense copy above ``max_dense_bytes``.
            TypeError: a view that is not a numeric matrix.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"MATLAB file not found: {p} (expected a .mat file with a cell of views "
                                f"{view_key!r} and labels)")
    if isinstance(max_dense_bytes, bool) or not isinstance(max_dense_bytes, (int, float)) or max_dense_bytes <= 0:
        raise ValueError(f"max_dense_bytes must be a positive number of bytes, got {max_dense_bytes!r}")
    import h5py

    if h5py.is_hdf5(str(p)):  # MATLAB v7.3
        with h5py.File(p, "r") as f:
            keys = [k for k in f.keys() if not k.startswith("#")]
            return _assemble(p, keys, lambda k: _h5_value(f, f[k]), view_key, label_key, views, max_dense_bytes,
                             batch_size)
    try:
        data = scipy.io.loadmat(str(p))
    except (ValueError, TypeError, NotImplementedError, OSError) as exc:
        raise ValueError(f"{p} is not a readable MATLAB .mat file: {exc}") from exc
    keys = [k for k in data if not k.startswith("__")]
    return _assemble(p, keys, lambda k: _v5_value(data[k]), view_key, label_key, views, max_dense_bytes,
                     batch_size)


# ----------------------------------------------------------------------------- dataset
class SparseViewsDataset(Dataset):
    """Rows of V views, dense arrays or CSR sparse arrays, densified a batch at a time.

    ``dataset[i]`` is ``[x_1 (d_1,), ..., x_V (d_V,), y ()]`` (float32 / int64 tensors).
    ``__getitems__`` (which DataLoader calls with the indices of a whole batch) slices each
    sparse view once per batch and densifies only those rows.

    Attributes:
        views, labels (N,), indices (rows exposed), modality_names, normalizers.
    """

    def __init__(self, views: Sequence[View], labels: np.ndarray, indices: np.ndarray,
                 modality_names: Sequence[str], normalizers: Sequence[Optional[Normalizer]]) -> None:
        self.views = list(views)
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        self.indices = np.asarray(indices, dtype=np.int64)
        self.modality_names = list(modality_names)
        self.normalizers = list(normalizers)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitems__(self, idx: Sequence[int]) -> List[List[torch.Tensor]]:
        rows = self.indices[np.asarray(idx, dtype=np.int64)]
        xs = [torch.from_numpy(v[rows].toarray() if sp.issparse(v) else v[rows]) for v in self.views]  # (B, d_v)
        y = self.labels[torch.from_numpy(rows)]
        return [[x[k] for x in xs] + [y[k]] for k in range(rows.shape[0])]

    def __getitem__(self, i: int) -> List[torch.Tensor]:
        return self.__getitems__([i])[0]

    @property
    def split_labels(self) -> torch.Tensor:
        """Labels of the exposed rows, ``(len(self),)``."""
        return self.labels[torch.from_numpy(self.indices)]


def maxabs_scale(x: sp.csr_array, rows: np.ndarray) -> Tuple[sp.csr_array, Normalizer]:
    """Scale each column of ``x`` (N, d) by its largest absolute value over ``rows`` (the
    training rows; a column that is all zero there keeps scale 1). Returns the scaled sparse
    array and the scaling as a ``Normalizer`` with method "maxabs" (shift 0)."""
    train = x[rows]
    scale = np.zeros(x.shape[1], dtype=np.float64)
    np.maximum.at(scale, train.indices, np.abs(train.data.astype(np.float64)))
    scale[scale == 0] = 1.0
    out = x.copy()
    out.data = (out.data / scale[out.indices]).astype(np.float32)
    return out, Normalizer("maxabs", np.zeros(x.shape[1], dtype=np.float32), scale.astype(np.float32))


@register_dataset("mat")
def get_dataloader(
    path: PathLike,
    view_key: str = "X",
    label_key: Optional[str] = None,
    views: Optional[Sequence[int]] = None,
    valid_fraction: Optional[float] = None,
    test_fraction: float = 0.2,
    stratify: bool = True,
    normalize: Optional[str] = "standard",
    max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
    batch_size: int = 32,
    num_workers: int = 0,
    seed: int = 0,
    split_seed: Optional[int] = None,
) -> Loaders:
    """(train, valid, test) DataLoaders of a multi-view ``.mat`` file.

    Args:
        path: the ``.mat`` file. view_key, label_key, views, max_dense_bytes: see :func:`load_mat`.
        valid_fraction: share of the non-test rows held out for validation. Default: None,
            i.e. 0.1, raised where needed so that a stratified split holds one row per class
            (ORL: 40 classes in 320 rows -> 0.125).
        test_fraction: share of all rows held out for test. Default: 0.2.
        stratify: stratify both splits by class. Default: True.
        normalize: dense views "standard" (zero mean, unit variance) or "minmax"; sparse
            views are then max-abs scaled. None or "none": no scaling. Fitted on the training
            rows only. Default: "standard".
        batch_size: Default: 32. num_workers: Default: 0.
        seed: training-loader shuffling, and the splits unless ``split_seed`` is given. Default: 0.
        split_seed: seed of the splits. Default: None, i.e. ``seed``.

    Returns:
        ``(train, valid, test)`` yielding ``[x_1 (B, d_1), ..., x_V (B, d_V), y (B,) int64]``
        (float32 views). Each dataset has ``modality_names`` (``view_0``, ... after the file's
        view numbers), ``indices`` (its rows of the file), ``normalizers`` (one
        ``Normalizer`` or None per view) and ``classes`` (original label values).
    """
    seed = check_seed(seed)
    split_seed = seed if split_seed is None else check_seed(split_seed, "split_seed")
    if isinstance(normalize, str) and normalize.lower() == "none":
        normalize = None
    if normalize not in ("standard", "minmax", None):
        raise ValueError(f"normalize must be 'standard', 'minmax' or None, got {normalize!r}")
    xs, y, classes = load_mat(path, view_key, label_key, views, max_dense_bytes, batch_size)
    names = [f"view_{v}" for v in (range(len(xs)) if views is None else views)]
    pool, test_idx = _split_indices(y, np.arange(y.shape[0]), test_fraction, stratify, split_seed, "test")
    if valid_fraction is None:
        k = int(y.max()) + 1
        valid_fraction = max(0.1, k / pool.shape[0]) if stratify else 0.1
    train_idx, valid_idx = _split_indices(y, pool, valid_fraction, stratify, split_seed, "validation")
    if not any(sp.issparse(x) for x in xs):
        loaders = arrays_to_dataloaders(xs, y, splits=(train_idx, valid_idx, test_idx), normalize=normalize,
                                        modality_names=names, batch_size=batch_size, num_workers=num_workers,
                                        seed=seed, split_seed=split_seed)
    else:
        normalizers: List[Optional[Normalizer]] = [None] * len(xs)
        if normalize is not None:
            for v, x in enumerate(xs):
                if sp.issparse(x):
                    xs[v], normalizers[v] = maxabs_scale(x, train_idx)
                else:
                    normalizers[v] = Normalizer.fit(x, normalize, rows=train_idx)
                    xs[v] = normalizers[v].transform(x)
        loaders = tuple(make_loader(SparseViewsDataset(xs, y, idx, names, normalizers), batch_size, shuffle,
                                    seed, num_workers)
                        for idx, shuffle in ((train_idx, True), (valid_idx, False), (test_idx, False)))
    for dl in loaders:
        dl.dataset.classes = classes  # type: ignore[attr-defined]
    logger.info("%s: %d train, %d valid, %d test rows (split_seed %d, normalize=%s)", path, len(train_idx),
                len(valid_idx), len(test_idx), split_seed, normalize)
    return loaders  # type: ignore[return-value]
