"""Keep a stratified fraction of the labels: for label-efficiency experiments and for
pre-training on the rest without labels."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Subset


def _labels_of(dataset) -> np.ndarray:
    ys = [dataset[i][-1] for i in range(len(dataset))]
    return np.stack([np.asarray(y.numpy() if isinstance(y, torch.Tensor) else y) for y in ys])


def split_labeled(loader: DataLoader, fraction: float, seed: int = 0,
                  batch_size: Optional[int] = None) -> Tuple[DataLoader, Optional[DataLoader]]:
    """Split ``loader``'s dataset into a labeled part (``fraction`` of the samples, stratified
    by class for single-label data, at least one sample per class) and the unlabeled rest.

    Args:
        loader: a DataLoader over a map-style dataset yielding ``[x_1, ..., x_M, y]``.
        fraction: in (0, 1]; 1 keeps everything labeled (the second loader is then None).
        seed: seed of the split and of the shuffling.
        batch_size: of both new loaders. Default: ``loader.batch_size``.

    Returns:
        ``(labeled, unlabeled)`` DataLoaders (shuffled, seeded). The unlabeled loader still
        yields the labels; pre-training ignores them.

    Raises:
        ValueError: fraction outside (0, 1], or too small to keep one sample per class.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    dataset = loader.dataset
    bs = batch_size or loader.batch_size or 32
    n = len(dataset)
    idx = np.arange(n)

    def make(sub_idx) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        return DataLoader(Subset(dataset, sub_idx.tolist()), batch_size=bs, shuffle=True, generator=g)

    if fraction == 1:
        return make(idx), None
    y = _labels_of(dataset)
    single = y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)
    integral = single and bool(np.all(np.mod(y, 1) == 0))
    strat = y.reshape(-1).astype(np.int64) if integral else None  # multilabel / regression: random split
    n_lab = int(round(fraction * n))
    if strat is not None:
        n_classes = len(np.unique(strat))
        if n_lab < n_classes:
            raise ValueError(f"fraction {fraction} keeps {n_lab} of {n} samples, fewer than the {n_classes} classes; "
                             "use a larger fraction")
    n_lab = max(1, min(n - 1, n_lab))
    lab, unlab = train_test_split(idx, train_size=n_lab, random_state=seed, stratify=strat)
    return make(np.sort(lab)), make(np.sort(unlab))
