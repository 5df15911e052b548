"""Build encoders + fusion + head for a dataset from names (used by the CLI, the benchmark
runner and the examples; library users can also build modules by hand).

Example:
    >>> spec = infer_data_spec(train_loader)                      # doctest: +SKIP
    >>> encoders, fusion, head = build_model(spec, fusion="concat")  # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from multizoo_ext.registry import create_encoder, create_fusion
from multizoo_ext.tasks import default_criterion


@dataclass
class DataSpec:
    """What a model needs to know about a dataset.

    Attributes:
        input_shapes: per-modality sample shape (without the batch dimension).
        task: "classification", "multilabel" or "regression".
        n_out: head outputs (classes, labels, or regression targets).
    """

    input_shapes: List[Tuple[int, ...]]
    task: str
    n_out: int

    @property
    def input_dims(self) -> List[int]:
        """Flattened width of each modality."""
        return [math.prod(s) for s in self.input_shapes]


def infer_data_spec(loader: Iterable, task: Optional[str] = None) -> DataSpec:
    """Read modality shapes from the first batch and the task / output count from the labels
    (one pass over ``loader``'s labels for classification).

    Task inference when ``task`` is None: 2-D 0/1 labels with more than one column ->
    multilabel; non-integer floats -> regression; otherwise classification.
    """
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("cannot infer the data layout from an empty dataloader") from None
    shapes = [tuple(x.shape[1:]) for x in first[:-1]]
    y = first[-1]
    if task is None:
        if y.dim() == 2 and y.shape[1] > 1 and bool(((y == 0) | (y == 1)).all()):
            task = "multilabel"
        elif y.is_floating_point() and not torch.equal(y, y.round()):
            task = "regression"
        else:
            task = "classification"
    if task == "multilabel":
        n_out = int(y.shape[1])
    elif task == "regression":
        n_out = int(y[0].numel())
    else:
        top = int(y.max())
        for batch in it:
            top = max(top, int(batch[-1].max()))
        n_out = max(top + 1, 2)
    return DataSpec(shapes, task, n_out)


class Flatten(nn.Module):
    """``(B, ...) -> (B, prod(...))``, with ``out_dim`` set."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


def build_encoders(spec: DataSpec, encoder: str = "mlp", hidden: int = 64, embed_dim: int = 32) -> List[nn.Module]:
    """One encoder per modality: "mlp" (flatten -> MLP(d, hidden, embed_dim)) or "identity"
    (flatten only)."""
    encs: List[nn.Module] = []
    for d in spec.input_dims:
        if encoder == "identity":
            encs.append(Flatten(d))
        else:
            mod = create_encoder(encoder, indim=d, hiddim=hidden, outdim=embed_dim)
            seq = nn.Sequential(Flatten(d), mod)
            seq.out_dim = mod.out_dim  # type: ignore[attr-defined]
            encs.append(seq)
    return encs


def build_model(spec: DataSpec, fusion: str = "concat", encoder: str = "mlp", hidden: int = 64,
                embed_dim: int = 32, fusion_kwargs: Optional[Dict[str, Any]] = None,
                head_hidden: Optional[int] = None) -> Tuple[List[nn.Module], nn.Module, nn.Module]:
    """Encoders, fusion (from the registry, built with the encoders' widths) and a head
    (Linear, or an MLP when ``head_hidden`` is given) sized for ``spec``."""
    encoders = build_encoders(spec, encoder, hidden, embed_dim)
    dims = [int(e.out_dim) for e in encoders]  # type: ignore[attr-defined]
    fuse = create_fusion(fusion, input_dims=dims, **(fusion_kwargs or {}))
    out_dim = getattr(fuse, "out_dim", None)
    if out_dim is None:
        raise ValueError(f"fusion {fusion!r} does not expose out_dim, so the head cannot be sized")
    if head_hidden:
        head: nn.Module = nn.Sequential(nn.Linear(out_dim, head_hidden), nn.ReLU(), nn.Linear(head_hidden, spec.n_out))
    else:
        head = nn.Linear(out_dim, spec.n_out)
    return encoders, fuse, head


def default_objective(task: str) -> nn.Module:
    """CrossEntropy / BCEWithLogits / MSE for classification / multilabel / regression
    (alias of :func:`multizoo_ext.tasks.default_criterion`)."""
    return default_criterion(task)
