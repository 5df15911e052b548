"""The two baseline rows of every benchmark dataset.

- ``best-single-modality`` (:func:`run_single_modality`): the same encoder + head trained on
  each modality alone (same epochs, optimiser and seed); the modality with the best
  *validation* score is reported.
- ``logreg`` (:func:`logistic_regression`): scikit-learn logistic regression on the
  concatenated, standardised (``StandardScaler`` fitted on the training split) flattened
  features, its inverse regularisation ``C`` chosen on the validation split from a grid (one
  value = fixed ``C``). Multilabel data: one-vs-rest logistic regression; regression: ridge
  regression with ``alpha = 1 / C``. This is the project's one logistic-regression baseline
  (the ReFNet measurement script calls it too).
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from multizoo_ext.builder import DataSpec, build_encoders, default_objective
from multizoo_ext.metrics import SELECTION_METRIC, compute_metrics
from multizoo_ext.training_structures.supervised import test

__all__ = ["loader_arrays", "logistic_regression", "run_single_modality", "ModalityView", "SingleModality"]

logger = logging.getLogger(__name__)


class ModalityView:
    """A loader yielding ``[x_m, y]`` from a loader yielding ``[x_1, ..., x_M, y]``."""

    def __init__(self, loader: Iterable, index: int) -> None:
        self.loader, self.index = loader, index

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  (TypeError for iterable-style loaders)

    def __iter__(self) -> Iterator[List[torch.Tensor]]:
        for batch in self.loader:
            yield [batch[self.index], batch[-1]]


class SingleModality(nn.Module):
    """The "fusion" of a one-modality model: ``[x (B, D)] -> x`` flattened to ``(B, D)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        return torch.flatten(inputs[0], 1)


def run_single_modality(spec: DataSpec, loaders: Callable[[], Tuple[Any, Any, Any]], fit: Callable[..., Any],
                        seed: int, encoder: str, hidden: int, embed_dim: int, head_hidden: Optional[int],
                        device: Any) -> Dict[str, Any]:
    """Train encoder + head on each modality alone; the result of the best by validation.

    Args:
        spec: the dataset's layout.
        loaders: returns fresh ``(train, valid, test)`` loaders (called once per modality, so
            each modality sees the same data order).
        fit: ``fit(encoders, fusion, head, train, valid, objective, objective_args, lr_mult)``
            -> ``train()``'s result (the runner's training settings bound).
        seed: seeds the initial weights of each modality's model.

    Returns:
        the entry fields: ``test``, ``valid_score``, ``selection_metric``, ``modality``,
        ``per_modality`` and the chosen model's ``epochs_run``, ``best_epoch``,
        ``seconds_per_epoch``, ``parameters``, ``history``.
    """
    from multizoo_ext.utils import seed_everything

    metric, higher_better = SELECTION_METRIC[spec.task]
    per_modality: List[Dict[str, Any]] = []
    best: Optional[Tuple[int, Any, Dict[str, float]]] = None
    for m, shape in enumerate(spec.input_shapes):
        sub = DataSpec([shape], spec.task, spec.n_out)
        train_dl, valid_dl, test_dl = loaders()
        seed_everything(seed)
        (enc,) = build_encoders(sub, encoder, hidden, embed_dim)
        dim = int(enc.out_dim)  # type: ignore[attr-defined]
        head: nn.Module = (nn.Sequential(nn.Linear(dim, head_hidden), nn.ReLU(), nn.Linear(head_hidden, spec.n_out))
                           if head_hidden else nn.Linear(dim, spec.n_out))
        res = fit([enc], SingleModality(dim), head, ModalityView(train_dl, m), ModalityView(valid_dl, m),
                  default_objective(spec.task), None, 1.0)
        metrics = test(res.model, ModalityView(test_dl, m), task=spec.task, no_robust=True, full=True, device=device)
        per_modality.append({"modality": m, "valid_score": res.best_score, "test": metrics,
                             "epochs_run": len(res.history), "seconds_per_epoch": res.seconds_per_epoch,
                             "parameters": res.parameters})
        better = best is None or (res.best_score > best[1].best_score if higher_better
                                  else res.best_score < best[1].best_score)
        if better:
            best = (m, res, metrics)
    assert best is not None  # spec has >= 1 modality
    m, res, metrics = best
    return dict(test=metrics, valid_score=res.best_score, selection_metric=metric, modality=m,
                per_modality=per_modality, epochs_run=len(res.history), best_epoch=res.best_epoch,
                seconds_per_epoch=res.seconds_per_epoch, parameters=res.parameters, history=res.history)


def loader_arrays(loader: Iterable) -> Tuple[np.ndarray, np.ndarray]:
    """All of ``loader``'s samples as ``(X (N, sum_i D_i) float32, y)``, modalities flattened
    and concatenated (held in memory: for very wide data such as raw AV-MNIST spectrograms
    this is large; turn the baselines off there)."""
    parts: List[List[np.ndarray]] = []
    ys: List[np.ndarray] = []
    for batch in loader:
        if not parts:
            parts = [[] for _ in batch[:-1]]
        for i, x in enumerate(batch[:-1]):
            parts[i].append(torch.flatten(torch.as_tensor(x), 1).float().cpu().numpy())  # (B, D_i)
        ys.append(torch.as_tensor(batch[-1]).cpu().numpy())
    if not ys:
        raise ValueError("the logistic-regression baseline got an empty dataloader")
    return np.concatenate([np.concatenate(p) for p in parts], axis=1), np.concatenate(ys)


def logistic_regression(train: Tuple[np.ndarray, np.ndarray], test_xy: Tuple[np.ndarray, np.ndarray], task: str,
                        n_out: int, cs: Sequence[float] = (0.05,),
                        valid: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                        max_iter: int = 2000) -> Dict[str, Any]:
    """Logistic regression (one-vs-rest for multilabel; ridge with ``alpha = 1 / C`` for
    regression) on standardised features (scaler fitted on ``train``).

    Args:
        train, test_xy, valid: ``(X (N, D), y)`` arrays (:func:`loader_arrays`).
        task: "classification", "multilabel" or "regression".
        n_out: number of classes (classification: classes absent from training get p = 0).
        cs: grid of ``C``, chosen on ``valid`` (ties keep the smaller C); one value needs no
            ``valid``.
        max_iter: iterations of the solver.

    Returns:
        ``{"test": metrics (with "n"), "C", "valid_score" (None without valid),
        "valid_scores" {repr(C): score}, "selection_metric", "parameters"}``.

    Raises:
        ValueError: several ``cs`` without ``valid``, or an empty grid.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    cs = sorted(float(c) for c in cs)
    if not cs:
        raise ValueError("logistic_regression needs at least one C, got an empty grid")
    if len(cs) > 1 and valid is None:
        raise ValueError(f"choosing C among {cs} needs a validation split (valid=None given)")
    xtr, ytr = train
    scaler = StandardScaler().fit(xtr)
    xtr = scaler.transform(xtr)

    def fit(c: float) -> Any:
        if task == "classification":
            return LogisticRegression(C=c, max_iter=max_iter).fit(xtr, ytr.reshape(-1).astype(np.int64))
        if task == "multilabel":
            return OneVsRestClassifier(LogisticRegression(C=c, max_iter=max_iter)).fit(xtr, ytr.astype(np.int64))
        return Ridge(alpha=1.0 / c).fit(xtr, ytr.reshape(len(ytr), -1))

    def outputs(model: Any, x: np.ndarray) -> torch.Tensor:
        """Model outputs in the form compute_metrics expects (logits / predictions)."""
        x = scaler.transform(x)
        if task == "classification":
            probs = np.zeros((len(x), n_out))
            probs[:, model.classes_.astype(np.int64)] = model.predict_proba(x)  # classes absent in training: p=0
            return torch.from_numpy(np.log(np.clip(probs, 1e-12, None)))  # softmax(log p) = p
        if task == "multilabel":
            p = np.clip(model.predict_proba(x), 1e-12, 1 - 1e-12)
            return torch.from_numpy(np.log(p / (1 - p)))  # sigmoid(logit p) = p
        return torch.from_numpy(model.predict(x).reshape(len(x), -1))

    metric = {"classification": "accuracy", "multilabel": "f1_macro", "regression": "mse"}[task]
    higher_better = task != "regression"
    scores: Dict[str, float] = {}
    best: Optional[Tuple[float, Optional[float], Any]] = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for c in cs:
            model = fit(c)
            if valid is None:
                best = (c, None, model)
                continue
            score = compute_metrics(task, torch.from_numpy(valid[1]), outputs(model, valid[0]))[metric]
            scores[repr(c)] = score
            if best is None or (score > best[1] if higher_better else score < best[1]):  # type: ignore[operator]
                best = (c, score, model)  # ties keep the smaller C (stronger regularisation)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.warning("logistic regression did not fully converge for some C")
    assert best is not None
    c, score, model = best
    xte, yte = test_xy
    metrics = compute_metrics(task, torch.from_numpy(yte), outputs(model, xte))
    metrics["n"] = len(yte)
    estimators = model.estimators_ if task == "multilabel" else [model]
    n_params = int(sum(np.size(e.coef_) + np.size(e.intercept_) for e in estimators))
    return {"test": metrics, "C": c, "valid_score": score, "valid_scores": scores, "selection_metric": metric,
            "parameters": n_params}
