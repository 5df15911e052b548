"""scikit-learn's bundled handwritten digits as a two-view dataset (no download).

``sklearn.datasets.load_digits``: 1797 images of 8x8 pixels with values 0..16, 10 classes.
The two views are the **left** and **right halves** of each image: columns 0-3 and 4-7 of
the 8x8 grid, flattened row by row to 32 features each. Left/right (rather than top/bottom)
keeps each view ambiguous on its own (1 vs 7, 3 vs 8 differ mostly on one side), so fusion
matters.

The split is stratified and fixed by default (``split_seed=0``): 20 % test (359 images),
then 15 % of the rest for validation (216), 1222 for training, whatever the training seed.

Example:
    >>> from multizoo_ext.datasets.digits import get_dataloader
    >>> train, valid, test = get_dataloader(batch_size=64)
    >>> left, right, y = next(iter(train))
    >>> tuple(left.shape), tuple(right.shape), y.dtype
    ((64, 32), (64, 32), torch.int64)
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from multizoo_ext.datasets.common import Loaders, arrays_to_dataloaders
from multizoo_ext.registry import register_dataset

VIEW_NAMES = ("left", "right")


def load_digit_views() -> Tuple[List[np.ndarray], np.ndarray]:
    """``([left (N, 32), right (N, 32)], labels (N,))`` from ``load_digits`` (pixels 0..16,
    float32; labels int64)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # (N, 8, 8)
    n, h, w = images.shape
    half = w // 2
    left = images[:, :, :half].reshape(n, -1)  # (N, 32)
    right = images[:, :, half:].reshape(n, -1)  # (N, 32)
    return [left, right], bunch.target.astype(np.int64)


@register_dataset("digits")
def get_dataloader(
    valid_fraction: float = 0.15,
    test_fraction: float = 0.2,
    normalize: Optional[str] = "standard",
    split_seed: int = 0,
    batch_size: int = 32,
    num_workers: int = 0,
    seed: int = 0,
) -> Loaders:
    """(train, valid, test) DataLoaders of the two-view digits.

    Args:
        valid_fraction: share of the non-test images for validation. Default: 0.15.
        test_fraction: share of all images for test. Default: 0.2.
        normalize: "standard", "minmax" or None (raw 0..16 pixels); fitted on the training
            split. Default: "standard".
        split_seed: seed of the stratified split; fixed so that every training seed is
            evaluated on the same test images. Default: 0.
        batch_size: Default: 32. num_workers: Default: 0.
        seed: training-loader shuffling. Default: 0.

    Returns:
        ``(train, valid, test)`` yielding ``[left (B, 32), right (B, 32), y (B,) int64]``.
    """
    views, labels = load_digit_views()
    return arrays_to_dataloaders(views, labels, valid_fraction=valid_fraction, test_fraction=test_fraction,
                                 stratify=True, normalize=normalize, task="classification", num_classes=10,
                                 modality_names=list(VIEW_NAMES), batch_size=batch_size,
                                 num_workers=num_workers, seed=seed, split_seed=split_seed)
