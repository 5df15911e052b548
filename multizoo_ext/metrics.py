"""Task metrics from scikit-learn, computed once per evaluation on CPU numpy arrays.

``compute_metrics(task, truth, out)`` returns lower-case keys (accuracy, f1_micro,
f1_macro, f1_weighted, auroc, auprc, mse, mae); ``multibench_view`` maps them to the keys
MultiBench's ``test()`` returns (``Accuracy``; ``micro``/``macro``; ``MSE``).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict

import numpy as np
import torch
from sklearn import metrics as skm

from multizoo_ext.tasks import TASKS, check_task  # noqa: F401  (TASKS re-exported: one owner of the task rules)

# The metric each task selects the best epoch on, and whether larger is better.
SELECTION_METRIC = {"classification": ("accuracy", True), "multilabel": ("f1_macro", True),
                    "regression": ("loss", False)}


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _safe(fn, *args, **kwargs) -> float:
    """AUROC/AUPRC are undefined when a class is absent from ``truth``: NaN, not an error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(fn(*args, **kwargs))
    except ValueError:
        return math.nan


def classification_metrics(truth: torch.Tensor, logits: torch.Tensor) -> Dict[str, float]:
    """Args: truth ``(N,)`` class indices; logits ``(N, C)``. AUROC/AUPRC use softmax
    probabilities (binary: of class 1; multi-class: one-vs-rest, macro); ``log_loss`` is the
    mean cross-entropy of the softmax probabilities (natural log; summed in float64, so that
    it does not depend on the order of the rows)."""
    y = _np(truth).astype(np.int64).reshape(-1)
    logits = logits.detach().float().cpu()
    probs = torch.softmax(logits, dim=1).numpy()  # (N, C)
    pred = probs.argmax(1)
    out = {"accuracy": float(skm.accuracy_score(y, pred)),
           "log_loss": float(torch.nn.functional.cross_entropy(logits.double(), torch.from_numpy(y)))}
    for avg in ("micro", "macro", "weighted"):
        out[f"f1_{avg}"] = float(skm.f1_score(y, pred, average=avg, zero_division=0))
    if probs.shape[1] == 2:
        out["auroc"] = _safe(skm.roc_auc_score, y, probs[:, 1])
        out["auprc"] = _safe(skm.average_precision_score, y, probs[:, 1])
    else:
        labels = np.arange(probs.shape[1])
        out["auroc"] = _safe(skm.roc_auc_score, y, probs, multi_class="ovr", average="macro", labels=labels)
        onehot = np.eye(probs.shape[1])[y]
        out["auprc"] = _safe(skm.average_precision_score, onehot, probs, average="macro")
    return out


def multilabel_metrics(truth: torch.Tensor, logits: torch.Tensor) -> Dict[str, float]:
    """Args: truth ``(N, K)`` multi-hot; logits ``(N, K)``. Predictions: sigmoid > 0.5
    (MultiBench's ``sigmoid(out).round()``). AUROC/AUPRC: macro over labels present.
    ``log_loss``: mean binary cross-entropy over samples and labels (natural log)."""
    y = _np(truth).astype(np.int64)
    logits = logits.detach().float().cpu()
    probs = torch.sigmoid(logits).numpy()
    pred = (probs > 0.5).astype(np.int64)
    out = {"accuracy": float(skm.accuracy_score(y, pred)),  # exact-match (subset) accuracy
           "log_loss": float(torch.nn.functional.binary_cross_entropy_with_logits(
               logits.double().reshape(y.shape), torch.from_numpy(y).double()))}
    for avg in ("micro", "macro", "weighted", "samples"):
        out[f"f1_{avg}"] = float(skm.f1_score(y, pred, average=avg, zero_division=0))
    present = (y.sum(0) > 0) & (y.sum(0) < len(y))
    out["auroc"] = _safe(skm.roc_auc_score, y[:, present], probs[:, present], average="macro") if present.any() else math.nan
    out["auprc"] = _safe(skm.average_precision_score, y[:, present], probs[:, present], average="macro") if present.any() else math.nan
    return out


def regression_metrics(truth: torch.Tensor, pred: torch.Tensor) -> Dict[str, float]:
    """Args: truth and pred of the same number of elements (``(N,)`` or ``(N, 1)``)."""
    y, p = _np(truth).reshape(len(truth), -1), _np(pred).reshape(len(pred), -1)
    return {"mse": float(skm.mean_squared_error(y, p)), "mae": float(skm.mean_absolute_error(y, p))}


def compute_metrics(task: str, truth: torch.Tensor, out: torch.Tensor) -> Dict[str, float]:
    """Metrics of ``task`` for model outputs ``out`` (logits / predictions) against ``truth``."""
    check_task(task)
    if task == "classification":
        return classification_metrics(truth, out)
    if task == "multilabel":
        return multilabel_metrics(truth, out)
    return regression_metrics(truth, out)


def multibench_view(task: str, m: Dict[str, float]) -> Dict[str, float]:
    """The keys MultiBench's ``test()`` returns for ``task``."""
    if task == "classification":
        return {"Accuracy": m["accuracy"]}
    if task == "multilabel":
        return {"micro": m["f1_micro"], "macro": m["f1_macro"]}
    return {"MSE": m["mse"]}
