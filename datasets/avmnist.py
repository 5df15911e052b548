"""AV-MNIST as MultiBench ships it (digit images paired with spoken-digit spectrograms).

Folder layout (MultiBench's ``avmnist``)::

    image/train_data.npy   (N_tr, 784)       pixels 0..255
    image/test_data.npy    (N_te, 784)
    audio/train_data.npy   (N_tr, 112, 112)  spectrograms 0..255
    audio/test_data.npy    (N_te, 112, 112)
    train_labels.npy       (N_tr,)           digits 0..9
    test_labels.npy        (N_te,)

The last ``valid_size`` (default 5000, MultiBench's) training rows are the validation split.
Options and their defaults follow MultiBench's loader: images and audio divided by 255,
images reshaped to ``(28, 28)`` unless ``flatten_image``, audio kept 2-D unless
``flatten_audio``, and a channel axis added to both with ``unsqueeze_channel``. So the
default batch is ``[image (B, 1, 28, 28), audio (B, 1, 112, 112), y (B,)]``.

Example:
    >>> from multizoo_ext.datasets.avmnist import get_dataloader
    >>> train, valid, test = get_dataloader("avmnist")                     # doctest: +SKIP
    >>> [tuple(t.shape) for t in next(iter(train))]                        # doctest: +SKIP
    [(40, 1, 28, 28), (40, 1, 112, 112), (40,)]
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Union

import numpy as np

from multizoo_ext.datasets.common import Loaders, arrays_to_dataloaders
from multizoo_ext.registry import register_dataset

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
MODALITY_NAMES = ("image", "audio")


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"AV-MNIST {what} file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path} is not a numeric .npy array: {exc}") from exc


def _shape_image(x: np.ndarray, flatten: bool, where: str) -> np.ndarray:
    n = x.shape[0]
    flat = x.reshape(n, -1)  # (N, 784)
    if flatten:
        return flat
    side = int(math.isqrt(flat.shape[1]))
    if side * side != flat.shape[1]:
        raise ValueError(f"{where} images have {flat.shape[1]} pixels, not a square; pass flatten_image=True")
    return flat.reshape(n, side, side)  # (N, 28, 28)


@register_dataset("avmnist")
def get_dataloader(
    data_dir: PathLike,
    valid_size: int = 5000,
    flatten_audio: bool = False,
    flatten_image: bool = False,
    unsqueeze_channel: bool = True,
    normalize_image: bool = True,
    normalize_audio: bool = True,
    normalize: Optional[str] = None,
    batch_size: int = 40,
    num_workers: int = 0,
    train_shuffle: bool = True,
    seed: int = 0,
) -> Loaders:
    """(train, valid, test) DataLoaders of an AV-MNIST folder.

    Args:
        data_dir: folder with ``image/``, ``audio/`` and the label files.
        valid_size: the last ``valid_size`` training rows form the validation split.
            Default: 5000 (MultiBench's 55000 / 5000 split of 60000).
        flatten_audio: audio ``(B, 112*112)`` instead of ``(B, 112, 112)``. Default: False.
        flatten_image: image ``(B, 784)`` instead of ``(B, 28, 28)``. Default: False.
        unsqueeze_channel: add a channel axis (``(B, 1, ...)``) to both. Default: True.
        normalize_image, normalize_audio: divide by 255 (MultiBench's). Default: True.
        normalize: additionally "standard" or "minmax" per feature, fitted on the training
            rows only. Default: None.
        batch_size: Default: 40 (MultiBench's). num_workers: Default: 0 (MultiBench: 8).
        train_shuffle: shuffle the training loader (with ``seed``). Default: True.
        seed: training-loader shuffling. Default: 0.

    Returns:
        ``(train, valid, test)`` yielding ``[image, audio, y (B,) int64]`` (float32 inputs).

    Raises:
        FileNotFoundError: a file is missing. ValueError: row counts that disagree, train and
            test shapes that differ, NaN/Inf, ``valid_size`` not below the training rows.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"AV-MNIST folder not found: {root}")
    parts = {}
    for split in ("train", "test"):
        img = _load(root / "image" / f"{split}_data.npy", f"{split} image")
        aud = _load(root / "audio" / f"{split}_data.npy", f"{split} audio")
        lab = _load(root / f"{split}_labels.npy", f"{split} label")
        if not (img.shape[0] == aud.shape[0] == lab.shape[0]):
            raise ValueError(f"AV-MNIST {split} row counts disagree: image {img.shape[0]}, audio {aud.shape[0]}, "
                             f"labels {lab.shape[0]}")
        img = img.astype(np.float32)
        aud = aud.astype(np.float32)
        if normalize_image:
            img /= 255.0
        if normalize_audio:
            aud /= 255.0
        img = _shape_image(img, flatten_image, split)
        if flatten_audio:
            aud = aud.reshape(aud.shape[0], -1)  # (N, 112*112)
        if unsqueeze_channel:
            img, aud = img[:, None], aud[:, None]  # (N, 1, ...)
        parts[split] = (img, aud, lab)
    img_tr, aud_tr, y_tr = parts["train"]
    n_tr = y_tr.shape[0]
    if isinstance(valid_size, bool) or not isinstance(valid_size, (int, np.integer)) or not 0 < valid_size < n_tr:
        raise ValueError(f"valid_size must be an integer in [1, {n_tr - 1}] for {n_tr} training rows, "
                         f"got {valid_size!r}")
    n_fit = n_tr - int(valid_size)
    img_te, aud_te, y_te = parts["test"]
    logger.info("AV-MNIST %s: %d train, %d valid, %d test rows", root, n_fit, valid_size, y_te.shape[0])
    # first n_fit training rows train, the last valid_size rows validate (no copy of the pool)
    return arrays_to_dataloaders([img_tr, aud_tr], y_tr, test_modalities=[img_te, aud_te], test_labels=y_te,
                                 splits=(np.arange(n_fit), np.arange(n_fit, n_tr)), normalize=normalize,
                                 task="classification", modality_names=list(MODALITY_NAMES),
                                 batch_size=batch_size, num_workers=num_workers, seed=seed,
                                 train_shuffle=train_shuffle)
