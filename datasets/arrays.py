"""Anyone's own data: DataLoaders from in-memory arrays or from an ``.npz`` file.

Both entry points share the splitting and normalisation options of
:func:`multizoo_ext.datasets.common.arrays_to_dataloaders`.

Example:
    >>> import numpy as np
    >>> from multizoo_ext.datasets.arrays import get_dataloader
    >>> rng = np.random.default_rng(0)
    >>> x1, x2, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 3)), np.arange(200) % 4
    >>> train, valid, test = get_dataloader([x1, x2], y, normalize="standard", batch_size=32)
    >>> len(train.dataset), len(valid.dataset), len(test.dataset)
    (144, 16, 40)
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from multizoo_ext.datasets.common import ArrayLike, DataKeyError, Loaders, arrays_to_dataloaders
from multizoo_ext.registry import register_dataset

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


def get_dataloader(
    modalities: Sequence[ArrayLike],
    labels: ArrayLike,
    *,
    valid_modalities: Optional[Sequence[ArrayLike]] = None,
    valid_labels: Optional[ArrayLike] = None,
    test_modalities: Optional[Sequence[ArrayLike]] = None,
    test_labels: Optional[ArrayLike] = None,
    splits: Optional[Tuple[Sequence[int], Sequence[int], Sequence[int]]] = None,
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
    split_seed: Optional[int] = 0,
) -> Loaders:
    """(train, valid, test) DataLoaders from per-modality arrays held in memory.

    Args:
        modalities: M arrays ``(N, ...)`` (NumPy arrays, tensors or nested lists).
        labels: ``(N,)`` class indices, ``(N, K)`` multi-hot (task="multilabel"), or targets
            (task="regression").
        valid_modalities, valid_labels, test_modalities, test_labels, splits: where the
            validation and test splits come from (see ``arrays_to_dataloaders``); by default
            ``test_fraction`` of the rows, then ``valid_fraction`` of the rest, stratified.
        valid_fraction: Default: 0.1. test_fraction: Default: 0.2. stratify: Default: True.
        normalize: "standard", "minmax" or None, fitted on the training split. Default: None.
        task: "classification", "multilabel" or "regression". Default: "classification".
        num_classes, modality_names: optional.
        batch_size: Default: 32. num_workers: Default: 0.
        seed: training-loader shuffling. Default: 0.
        split_seed: random splits; fixed by default so every training seed sees the same
            split (None: use ``seed``). Default: 0.

    Returns:
        ``(train, valid, test)`` yielding ``[x_1 (B, ...), ..., x_M (B, ...), y]``.
    """
    return arrays_to_dataloaders(
        modalities, labels, valid_modalities=valid_modalities, valid_labels=valid_labels,
        test_modalities=test_modalities, test_labels=test_labels, splits=splits,
        valid_fraction=valid_fraction, test_fraction=test_fraction, stratify=stratify,
        normalize=normalize, task=task, num_classes=num_classes, modality_names=modality_names,
        batch_size=batch_size, num_workers=num_workers, seed=seed, split_seed=split_seed)


def load_npz(path: PathLike, modality_keys: Optional[Sequence[str]] = None,
             label_key: str = "labels") -> Tuple[List[np.ndarray], np.ndarray, List[str]]:
    """Read one ``.npz`` file: ``(modality arrays, labels, modality keys)``.

    Args:
        path: the file (``np.savez(path, text=..., image=..., labels=...)``).
        modality_keys: the arrays to use, in this order. Default: every array except
            ``label_key``, in the order stored in the file.
        label_key: name of the label array. Default: "labels".

    Raises:
        FileNotFoundError: no such file.
        DataKeyError: (a KeyError and ValueError) a named key is missing; the message lists
            the keys in the file.
        ValueError: the file is not a readable ``.npz``, or it holds no modality array.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"npz file not found: {p} (expected np.savez output with one array per "
                                f"modality plus {label_key!r})")
    try:
        data = np.load(p, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ValueError(f"{p} is not a readable .npz file: {exc}") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{p} holds a single array, not an .npz archive; save it with "
                         f"np.savez(path, <modality>=..., {label_key}=...)")
    with data:
        keys = list(data.files)
        if label_key not in keys:
            raise DataKeyError(f"{p} has no label array {label_key!r}; its keys are {keys}")
        names = list(modality_keys) if modality_keys is not None else [k for k in keys if k != label_key]
        missing = [k for k in names if k not in keys]
        if missing:
            raise DataKeyError(f"{p} has no array(s) {missing}; its keys are {keys}")
        if not names:
            raise ValueError(f"{p} holds only {label_key!r}; it needs at least one modality array")
        try:
            mods = [data[k] for k in names]
            labels = data[label_key]
        except ValueError as exc:  # object arrays need pickle, which we never enable
            raise ValueError(f"{p} holds object arrays, which are not loaded for safety; store numeric "
                             "arrays") from exc
    return mods, labels, names


def get_dataloader_npz(
    path: PathLike,
    modality_keys: Optional[Sequence[str]] = None,
    label_key: str = "labels",
    *,
    test_path: Optional[PathLike] = None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.2,
    stratify: bool = True,
    normalize: Optional[str] = None,
    task: str = "classification",
    num_classes: Optional[int] = None,
    batch_size: int = 32,
    num_workers: int = 0,
    seed: int = 0,
    split_seed: Optional[int] = 0,
) -> Loaders:
    """(train, valid, test) DataLoaders from an ``.npz`` file with one array per modality.

    Args:
        path: ``.npz`` with modality arrays ``(N, ...)`` and a label array.
        modality_keys: arrays to use, in order. Default: all but ``label_key``, file order.
        label_key: Default: "labels".
        test_path: optional second ``.npz`` with the same keys: the test split (otherwise
            ``test_fraction`` of ``path``'s rows).
        valid_fraction, test_fraction, stratify, normalize, task, num_classes, batch_size,
            num_workers, seed, split_seed: as in :func:`get_dataloader`.

    Returns:
        ``(train, valid, test)``; ``dataset.modality_names`` are the npz keys.

    Raises:
        FileNotFoundError / KeyError / ValueError: see :func:`load_npz` and
            ``arrays_to_dataloaders``.

    Example:
        >>> np.savez("mine.npz", rna=x1, methylation=x2, labels=y)   # doctest: +SKIP
        >>> train, valid, test = get_dataloader_npz("mine.npz")      # doctest: +SKIP
    """
    mods, labels, names = load_npz(path, modality_keys, label_key)
    kwargs: Dict[str, Any] = {}
    if test_path is not None:
        t_mods, t_labels, _ = load_npz(test_path, names, label_key)
        kwargs = {"test_modalities": t_mods, "test_labels": t_labels}
    logger.info("loaded %s: modalities %s", path, {k: m.shape for k, m in zip(names, mods)})
    return arrays_to_dataloaders(
        mods, labels, valid_fraction=valid_fraction, test_fraction=test_fraction, stratify=stratify,
        normalize=normalize, task=task, num_classes=num_classes, modality_names=names,
        batch_size=batch_size, num_workers=num_workers, seed=seed, split_seed=split_seed, **kwargs)


register_dataset("npz")(get_dataloader_npz)
