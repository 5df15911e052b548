"""Named input validators: one sentence saying what was expected and what came."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def check_modalities(inputs: Sequence[torch.Tensor], expected: Optional[int] = None,
                     name: str = "fusion", min_count: int = 2) -> None:
    """Check a list of per-modality tensors (B, ...) before fusing.

    Raises:
        TypeError: ``inputs`` is not a list/tuple of tensors.
        ValueError: wrong number of modalities, or batch sizes disagree.
    """
    if not isinstance(inputs, (list, tuple)) or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError(f"{name} expects a list of tensors, one per modality, got {type(inputs).__name__}")
    n = len(inputs)
    if expected is not None and n != expected:
        raise ValueError(f"{name} was built for {expected} modalities but got {n}")
    if n < min_count:
        raise ValueError(f"{name} needs at least {min_count} modalities, got {n}")
    batch = {x.shape[0] if x.dim() > 0 else None for x in inputs}
    if len(batch) != 1 or None in batch:
        shapes = [tuple(x.shape) for x in inputs]
        raise ValueError(f"{name}: all modalities must share the batch dimension, got shapes {shapes}")


def check_widths(inputs: Sequence[torch.Tensor], widths: Sequence[int], name: str = "fusion") -> None:
    """Check that modality i has last dimension ``widths[i]``."""
    got = [int(x.shape[-1]) for x in inputs]
    if list(widths) != got:
        raise ValueError(f"{name} was built for modality widths {list(widths)} but got widths {got}")


def check_finite(x: torch.Tensor, what: str = "input") -> None:
    """Raise if ``x`` holds NaN or Inf (one host sync; call at loop boundaries, not in solvers)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} contains {n_bad} NaN/Inf value(s); clean or impute the data first")
