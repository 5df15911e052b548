"""Task rules, in one place: the task names, the loss each task uses by default, the label
dtype/shape a loss needs, and the label checks the training loops run on every batch.

Tasks (MultiBench's):

- ``"classification"``: head ``(B, C)`` logits; labels ``(B,)`` or ``(B, 1)`` integral class
  indices in ``0..C-1`` (integer dtype, or floats holding whole numbers); CrossEntropy.
- ``"multilabel"``: head ``(B, K)`` logits; labels ``(B, K)`` multi-hot 0/1; BCEWithLogits.
- ``"regression"``: head ``(B, T)`` (usually ``T = 1``) or ``(B,)``; targets of the same
  number of values per sample (``(B,)`` against a ``(B, 1)`` head is reshaped explicitly to
  ``(B, 1)``, never broadcast to ``(B, B)``); MSE.

Example:
    >>> import torch
    >>> pred = torch.randn(4, 1)
    >>> truth = check_labels(torch.tensor([0.5, 1.0, 2.0, 3.0]), "regression", where="batch 1",
    ...                      pred_shape=pred.shape)
    >>> tuple(truth.shape)
    (4, 1)
    >>> loss = task_loss(default_criterion("regression"), pred, truth)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["TASKS", "check_task", "default_criterion", "prepare_truth", "task_loss", "check_labels"]

#: The task names every loop, metric, dataset and objective accepts.
TASKS = ("classification", "multilabel", "regression")

# Element-wise losses whose target must have the prediction's shape (and a float dtype).
_ELEMENTWISE = (nn.BCEWithLogitsLoss, nn.BCELoss, nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)


def check_task(task: str) -> str:
    """Return ``task`` when it is one of :data:`TASKS`; raise ValueError otherwise."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return task


#: Criteria whose type tells the task (MultiBench's plain losses and their relatives).
_TASK_OF_CRITERION = ((nn.BCEWithLogitsLoss, "multilabel"), (nn.BCELoss, "multilabel"),
                      (nn.MultiLabelSoftMarginLoss, "multilabel"), (nn.MSELoss, "regression"),
                      (nn.L1Loss, "regression"), (nn.SmoothL1Loss, "regression"), (nn.HuberLoss, "regression"),
                      (nn.CrossEntropyLoss, "classification"), (nn.NLLLoss, "classification"))


def resolve_task(task: Optional[str], criterion: Optional[Callable[..., Any]] = None) -> str:
    """The task an objective serves: ``task`` when given (checked), else the one its
    criterion implies (BCEWithLogits -> multilabel, MSE / L1 -> regression), else
    classification."""
    if task is not None:
        return check_task(task)
    return _implied_task(criterion) or "classification"


def _implied_task(criterion: Any) -> Optional[str]:
    for cls, implied in _TASK_OF_CRITERION:
        if isinstance(criterion, cls):
            return implied
    return None


def default_criterion(task: str) -> nn.Module:
    """The task loss MultiBench uses for ``task``: CrossEntropy (classification),
    BCEWithLogits (multilabel) or MSE (regression), as a fresh module."""
    check_task(task)
    return {"classification": nn.CrossEntropyLoss, "multilabel": nn.BCEWithLogitsLoss,
            "regression": nn.MSELoss}[task]()


def prepare_truth(criterion: Callable[[Tensor, Tensor], Tensor], pred: Tensor, truth: Tensor) -> Tensor:
    """The labels ``criterion(pred, ·)`` needs, on ``pred``'s device.

    - ``nn.CrossEntropyLoss``: a ``(B, 1)`` truth is squeezed to ``(B,)`` and cast to int64
      (float class-probability targets of ``pred``'s shape stay float).
    - element-wise losses (BCE, BCEWithLogits, MSE, L1, SmoothL1, Huber): cast to ``pred``'s
      float dtype and reshaped to ``pred.shape`` when they hold the same number of values per
      sample (e.g. regression ``(B,)`` against ``(B, 1)``); any other shape is a ValueError
      (torch would broadcast ``(B,)`` against ``(B, 1)`` to ``(B, B)``).
    - anything else: ``truth`` as it came, moved only.

    Args:
        criterion: the loss module or function.
        pred: ``(B, ...)`` model output.
        truth: labels, on any device.

    Raises:
        TypeError: ``truth`` is not a tensor. ValueError: shapes that cannot be matched.
    """
    if not isinstance(truth, Tensor):
        raise TypeError(f"truth must be a tensor of labels, got {type(truth).__name__}")
    truth = truth.to(pred.device)
    if isinstance(criterion, nn.CrossEntropyLoss):
        if truth.dim() == pred.dim() and truth.dim() > 1 and truth.shape[-1] == 1:
            truth = truth.squeeze(-1)  # (B, 1) -> (B,)
        if not truth.is_floating_point() or truth.dim() < pred.dim():
            truth = truth.long()
        return truth
    if isinstance(criterion, _ELEMENTWISE):
        truth = truth.to(pred.dtype if pred.is_floating_point() else torch.float32)
        if truth.shape != pred.shape:
            if pred.dim() == 0 or truth.dim() == 0 or truth.shape[0] != pred.shape[0] or truth.numel() != pred.numel():
                raise ValueError(f"{type(criterion).__name__} needs targets of the prediction's shape "
                                 f"{tuple(pred.shape)} (or the same number of values per sample), got "
                                 f"{tuple(truth.shape)}")
            truth = truth.reshape(pred.shape)  # e.g. regression (B,) -> (B, 1), explicit, no broadcasting
        return truth
    return truth


def task_loss(criterion: Callable[[Tensor, Tensor], Tensor], pred: Tensor, truth: Tensor) -> Tensor:
    """``criterion(pred, prepare_truth(criterion, pred, truth))``: the task loss with the label
    dtype/shape the criterion needs, on ``pred``'s device (see :func:`prepare_truth`).

    Args:
        criterion: loss module or function ``(pred, truth) -> scalar``.
        pred: ``(B, n_out)`` model output.
        truth: labels, on any device.

    Raises:
        ValueError / TypeError: labels that break the rules of the task the criterion implies
            (:func:`check_labels`: a class outside the head, a fractional class, a multi-hot
            value other than 0/1, a target shape that does not match): objectives called by
            a loop that does not check them (MultiBench's ``train()``) fail clearly too.
    """
    task = _implied_task(criterion)
    soft = task == "classification" and isinstance(truth, Tensor) and truth.is_floating_point() \
        and tuple(truth.shape) == tuple(pred.shape)  # class-probability targets
    if task is not None and isinstance(truth, Tensor) and not soft:
        check_labels(truth, task, where="the objective's labels", pred_shape=tuple(pred.shape))
    return criterion(pred, prepare_truth(criterion, pred, truth))


def _bad_values(truth: Tensor, ok: Tensor, limit: int = 3) -> str:
    return ", ".join(f"{v:g}" for v in truth[~ok].reshape(-1)[:limit].tolist())


def check_labels(truth: Tensor, task: str, n_out: Optional[int] = None, where: str = "a batch", *,
                 pred_shape: Optional[Sequence[int]] = None) -> Tensor:
    """Check one batch of labels against ``task`` and the head; return them in the task's form.

    Cheap enough for every batch (a few reductions over ``B`` labels; run it on the CPU
    labels before they are moved). Rules:

    - classification: ``(B,)`` or ``(B, 1)``; integral values (a float 0.5 is an error, never
      truncated); in ``0..n_out-1`` when ``n_out`` is known. Returns ``(B,)`` int64.
    - multilabel: ``(B, K)`` of 0/1 values with ``K == n_out`` when known. Returned as it came.
    - regression: finite values; with ``pred_shape`` known, ``B`` rows of ``prod(pred_shape[1:])``
      values each, returned reshaped to ``pred_shape`` (``(B,)`` -> ``(B, 1)`` for a ``(B, 1)``
      head); with only ``n_out`` known, reshaped to ``(B, n_out)``.

    Args:
        truth: the batch's labels.
        task: one of :data:`TASKS`.
        n_out: the head's width (classes / labels / targets); default: from ``pred_shape``.
        where: names the batch in error messages, e.g. ``"epoch 2, train batch 3"``.
        pred_shape: the shape of the model output for this batch; gives ``B`` and ``n_out``.

    Raises:
        TypeError: ``truth`` is not a tensor. ValueError: the labels break a rule above; the
        message names ``where``, what was expected and what came.
    """
    check_task(task)
    if not isinstance(truth, Tensor):
        raise TypeError(f"{where}: labels must be a tensor, got {type(truth).__name__}")
    shape = tuple(truth.shape)
    pshape = tuple(int(s) for s in pred_shape) if pred_shape is not None else None
    if pshape is not None and n_out is None:
        n_out = pshape[1] if len(pshape) == 2 else (1 if len(pshape) == 1 else None)
    bsz = pshape[0] if pshape else None
    if truth.dim() == 0:
        raise ValueError(f"{where}: {task} labels must have a batch dimension, got a scalar")
    if bsz is not None and shape[0] != bsz:
        raise ValueError(f"{where}: the model produced {bsz} outputs but the batch holds {shape[0]} labels "
                         f"(labels of shape {shape})")

    if task == "classification":
        if pshape is not None and len(pshape) != 2:
            raise ValueError(f"{where}: classification needs head outputs of shape (B, n_classes), got {pshape}")
        if n_out is not None and n_out < 1:
            raise ValueError(f"{where}: classification needs a head with at least 1 output, got {n_out}")
        if not (truth.dim() == 1 or (truth.dim() == 2 and shape[1] == 1)):
            raise ValueError(f"{where}: classification labels must have shape (B,) or (B, 1) (class indices), "
                             f"got {shape}")
        y = truth.reshape(-1)
        if y.dtype == torch.bool or y.is_complex():
            raise ValueError(f"{where}: classification labels must be integer class indices, got dtype {y.dtype}")
        if y.numel() == 0:
            return y.long()
        if y.is_floating_point():
            ok = (y == y.round()) & torch.isfinite(y)
            if not bool(ok.all()):
                raise ValueError(f"{where}: classification labels must be integral class indices, got "
                                 f"non-integer values such as {_bad_values(y, ok)} (they would be truncated)")
        lo, hi = (float(v) for v in torch.aminmax(y.double() if y.is_floating_point() else y))
        if lo < 0 or (n_out is not None and hi > n_out - 1):
            want = f"[0, {n_out - 1}] for a head with {n_out} outputs" if n_out is not None else "[0, C-1]"
            raise ValueError(f"{where}: classification labels must lie in {want}, got labels in "
                             f"[{lo:g}, {hi:g}]")
        return y.long()

    if task == "multilabel":
        if truth.dim() != 2:
            want = f"(B, {n_out})" if n_out is not None else "(B, K)"
            raise ValueError(f"{where}: multilabel labels must be multi-hot of shape {want}, got {shape}")
        if n_out is not None and shape[1] != n_out:
            raise ValueError(f"{where}: multilabel labels have {shape[1]} columns but the head has {n_out} "
                             f"outputs (labels of shape {shape})")
        ok = (truth == 0) | (truth == 1)
        if not bool(ok.all()):
            raise ValueError(f"{where}: multilabel labels must be multi-hot 0/1 values, got values such as "
                             f"{_bad_values(truth.double(), ok)}")
        return truth

    # regression
    if truth.dtype == torch.bool or truth.is_complex():
        raise ValueError(f"{where}: regression targets must be numbers, got dtype {truth.dtype}")
    if truth.is_floating_point():
        ok = torch.isfinite(truth)
        if not bool(ok.all()):
            raise ValueError(f"{where}: regression targets must be finite, got values such as "
                             f"{_bad_values(truth, ok)}")
    target = pshape if pshape is not None else ((shape[0], n_out) if n_out is not None else None)
    if target is not None and shape != target:
        per_sample = truth[0].numel() if shape[0] else 0
        want = math.prod(target[1:])
        if per_sample != want:
            raise ValueError(f"{where}: regression targets must hold {want} value(s) per sample to match the "
                             f"model output of shape {target}, got targets of shape {shape}")
        truth = truth.reshape(target)  # explicit: (B,) -> (B, 1), never broadcast
    return truth
