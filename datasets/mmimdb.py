"""MM-IMDB as MultiBench ships it: one HDF5 file, read lazily with h5py.

File layout (MultiBench's ``multimodal_imdb.hdf5``), all arrays indexed by row:

* ``features`` ``(N, 300)``: averaged word2vec of the plot (text modality);
* ``vgg_features`` ``(N, 4096)``: VGG-16 image features, or ``images`` (raw images) with
  ``vgg=False``;
* ``genres`` ``(N, 23)``: multi-hot genre labels (multilabel task).

Splits are row ranges, MultiBench's by default: ``[0, 15552)`` train, ``[15552, 18160)``
validation, ``[18160, 25959)`` test. The file is opened on the first ``__getitem__`` of each
process (never in ``__init__``), reopened after a fork, and dropped when the dataset is
pickled, so DataLoader workers each get their own handle.

Example:
    >>> from multizoo_ext.datasets.mmimdb import get_dataloader
    >>> train, valid, test = get_dataloader("multimodal_imdb.hdf5")   # doctest: +SKIP
    >>> text, image, genres = next(iter(train))                        # doctest: +SKIP
    >>> tuple(text.shape), tuple(image.shape), tuple(genres.shape)     # doctest: +SKIP
    ((40, 300), (40, 4096), (40, 23))
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from multizoo_ext.datasets.common import (
    DataKeyError,
    Loaders,
    Normalizer,
    make_loader,
)
from multizoo_ext.registry import register_dataset

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
Range = Tuple[int, Optional[int]]

TRAIN_RANGE: Range = (0, 15552)
VALID_RANGE: Range = (15552, 18160)
TEST_RANGE: Range = (18160, 25959)
MODALITY_NAMES = ("text", "image")


class HDF5MultimodalDataset(Dataset):
    """Rows ``[start, end)`` of several same-length HDF5 arrays, opened lazily per process.

    Args:
        path: the HDF5 file.
        modality_keys: dataset names of the modalities, in batch order.
        label_key: dataset name of the labels.
        start, end: row range.
        normalizers: optional per-modality :class:`Normalizer` (or None) applied on the fly.
        modality_names: names for the robustness helpers. Default: the keys.

    ``dataset[i]`` returns ``[x_1 (float32), ..., x_M (float32), y (float32)]`` for row
    ``start + i``; a row holding NaN/Inf raises ``ValueError`` naming it.
    """

    def __init__(self, path: PathLike, modality_keys: Sequence[str], label_key: str, start: int, end: int,
                 normalizers: Optional[Sequence[Optional[Normalizer]]] = None,
                 modality_names: Optional[Sequence[str]] = None) -> None:
        if end <= start:
            raise ValueError(f"row range [{start}, {end}) is empty")
        self.path = str(path)
        self.modality_keys = list(modality_keys)
        self.label_key = label_key
        self.start, self.end = int(start), int(end)
        self.normalizers = list(normalizers) if normalizers is not None else [None] * len(self.modality_keys)
        self.modality_names = list(modality_names) if modality_names is not None else list(self.modality_keys)
        self._h5: Optional[h5py.File] = None
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return self.end - self.start

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            # a handle inherited through fork is not reused: open our own
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def __getitem__(self, i: int) -> List[torch.Tensor]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a split of {n} rows")
        f = self._file()
        row = self.start + i
        out = []
        for key in self.modality_keys + [self.label_key]:
            x = np.asarray(f[key][row], dtype=np.float32)
            if not np.isfinite(x).all():  # one pass over one row: a NaN never reaches a batch
                raise ValueError(f"{self.path}: {key!r} row {row} contains NaN/Inf values; clean the file first")
            out.append(torch.from_numpy(x))
        for j, nz in enumerate(self.normalizers):
            if nz is not None:
                out[j] = nz.transform_tensor(out[j])
        return out

    def close(self) -> None:
        """Close this process's handle (reopened on the next access)."""
        if self._h5 is not None and self._pid == os.getpid():
            try:
                self._h5.close()
            except Exception:  # pragma: no cover - interpreter shutdown
                pass
        self._h5, self._pid = None, None

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"], state["_pid"] = None, None  # h5py handles do not pickle
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _resolve_range(r: Range, n: int, name: str) -> Tuple[int, int]:
    if len(r) != 2:
        raise ValueError(f"{name} must be a (start, end) pair, got {r!r}")
    start, end = int(r[0]), n if r[1] is None else int(r[1])
    if not 0 <= start < end:
        raise ValueError(f"{name} must satisfy 0 <= start < end, got [{start}, {end})")
    if end > n:
        raise ValueError(f"{name} [{start}, {end}) exceeds the file's {n} rows; pass the ranges of your file")
    return start, end


def _check_disjoint(ranges: Sequence[Tuple[int, int]], names: Sequence[str]) -> None:
    """``ValueError`` if two ``[start, end)`` ranges share a row (a test row in training
    would inflate every score)."""
    for i in range(len(ranges)):
        for j in range(i + 1, len(ranges)):
            (a0, a1), (b0, b1) = ranges[i], ranges[j]
            if max(a0, b0) < min(a1, b1):
                raise ValueError(f"{names[i]} [{a0}, {a1}) and {names[j]} [{b0}, {b1}) overlap in rows "
                                 f"[{max(a0, b0)}, {min(a1, b1)}); the splits must be disjoint")


def fit_streamed_normalizer(dset: h5py.Dataset, start: int, end: int, method: str,
                            chunk: int = 2048) -> Normalizer:
    """Per-feature statistics of rows ``[start, end)`` of an HDF5 array (the training range
    only), read ``chunk`` rows at a time."""

    def chunks():
        for a in range(start, end, chunk):
            x = np.asarray(dset[a:min(a + chunk, end)], dtype=np.float64)  # (c, ...)
            if not np.isfinite(x).all():
                raise ValueError(f"{dset.name} contains NaN/Inf values in rows [{a}, {min(a + chunk, end)})")
            yield x

    return Normalizer.from_chunks(method, chunks())


@register_dataset("mmimdb")
def get_dataloader(
    path: PathLike,
    train_range: Range = TRAIN_RANGE,
    valid_range: Range = VALID_RANGE,
    test_range: Range = TEST_RANGE,
    vgg: bool = True,
    text_key: str = "features",
    image_key: Optional[str] = None,
    label_key: str = "genres",
    normalize: Optional[str] = None,
    batch_size: int = 40,
    num_workers: int = 0,
    train_shuffle: bool = True,
    seed: int = 0,
) -> Loaders:
    """(train, valid, test) DataLoaders over MultiBench's MM-IMDB HDF5 file (multilabel).

    Args:
        path: the HDF5 file (``multimodal_imdb.hdf5``).
        train_range, valid_range, test_range: ``(start, end)`` row ranges; ``end=None`` means
            the last row. Defaults: MultiBench's (0, 15552), (15552, 18160), (18160, 25959).
        vgg: image modality from ``vgg_features`` (N, 4096) if True, else from ``images``.
            Default: True (MultiBench's own default is False, raw images; its examples pass
            ``vgg=True``).
        text_key: Default: "features". image_key: overrides the key chosen by ``vgg``.
        label_key: Default: "genres".
        normalize: "standard", "minmax" or None; statistics streamed over the training range
            only and applied on the fly. Default: None.
        batch_size: Default: 40 (MultiBench's). num_workers: Default: 0 (MultiBench: 8).
        train_shuffle: Default: True.
        seed: training-loader shuffling. Default: 0.

    Returns:
        ``(train, valid, test)`` yielding ``[text (B, 300), image (B, 4096), genres (B, 23)]``
        (float32; genres multi-hot).

    Raises:
        FileNotFoundError: no such file. DataKeyError (a KeyError and ValueError): a key is
            missing. ValueError: not an HDF5 file, arrays with different row counts, labels
            that are not 2-D multi-hot, a range outside the file, overlapping ranges, NaN/Inf
            text features (checked at load) or NaN/Inf in any row read later (image features
            are checked row by row as they are read, or all at load with ``normalize``).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"MM-IMDB HDF5 file not found: {p}")
    img_key = image_key or ("vgg_features" if vgg else "images")
    keys = [text_key, img_key]
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise ValueError(f"{p} is not a readable HDF5 file: {exc}") from exc
    with f:
        present = sorted(f.keys())
        missing = [k for k in keys + [label_key] if k not in f]
        if missing:
            raise DataKeyError(f"{p} has no dataset(s) {missing}; its keys are {present}")
        rows = {k: f[k].shape[0] for k in keys + [label_key]}
        if len(set(rows.values())) != 1:
            raise ValueError(f"{p}: arrays must share the row count, got {rows}")
        n = rows[label_key]
        names = ("train_range", "valid_range", "test_range")
        ranges = [_resolve_range(r, n, name) for r, name in zip((train_range, valid_range, test_range), names)]
        _check_disjoint(ranges, names)
        labels = f[label_key]
        if labels.ndim != 2:
            raise ValueError(f"{p}: {label_key!r} must be multi-hot of shape (N, K), got {labels.shape}")
        for (a, b), name in zip(ranges, ("train", "valid", "test")):
            y = np.asarray(labels[a:b])
            if not np.all((y == 0) | (y == 1)):
                raise ValueError(f"{p}: {label_key!r} must hold multi-hot 0/1 values, found others in the {name} rows")
            t = np.asarray(f[text_key][a:b], dtype=np.float64)
            if not np.isfinite(t).all():
                raise ValueError(f"{p}: {text_key!r} contains NaN/Inf values in the {name} rows")
        normalizers: List[Optional[Normalizer]] = [None, None]
        if normalize is not None:
            a, b = ranges[0]
            normalizers = [fit_streamed_normalizer(f[k], a, b, normalize) for k in keys]
        logger.info("MM-IMDB %s: %d rows, %s %s, %s %s; splits %s", p, n, text_key, f[text_key].shape[1:],
                    img_key, f[img_key].shape[1:], ranges)
    datasets = [HDF5MultimodalDataset(p, keys, label_key, a, b, normalizers, list(MODALITY_NAMES))
                for a, b in ranges]
    return (make_loader(datasets[0], batch_size, train_shuffle, seed, num_workers),
            make_loader(datasets[1], batch_size, False, seed, num_workers),
            make_loader(datasets[2], batch_size, False, seed, num_workers))
