"""Seeding, device resolution and command-line values, shared by loops, datasets and the CLI."""
from __future__ import annotations

import json
import os
import random
from typing import Any, Union

import numpy as np
import torch

DeviceLike = Union[str, torch.device, None]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA) and return a CPU generator seeded the same.

    Args:
        seed: non-negative integer.

    Returns:
        A ``torch.Generator`` for DataLoader shuffling and samplers.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def resolve_device(device: DeviceLike = None) -> torch.device:
    """Resolve a device argument once.

    Args:
        device: ``None`` or ``"auto"`` (CUDA if available, else CPU), or any string /
            ``torch.device`` torch accepts ("cpu", "cuda", "cuda:1", "mps").

    Raises:
        ValueError: the string is not a device, or CUDA was asked for and is absent.
    """
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} was asked for but this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")
    if dev.type not in ("cpu", "cuda"):
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"device {device!r} is not usable with this PyTorch build ({first[:120]})") from None
    return dev


def count_parameters(module: torch.nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true/false, null, lists, objects),
    else the string as given (``data/ROSMAP``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
