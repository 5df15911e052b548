"""ReFNet objectives in MultiBench's ``objective(pred, truth, args)`` form.

``refnet_objective(...)`` returns a closure for MultiBench's ``train(objective=...,
objective_args_dict={...})`` and for our own supervised loop (same contract)::

    loss = task_loss(pred, truth)
         + sum_i w_i * L_ref(R_i(fused), target_i)          # objectives/refiner.py
         + ms_weight * MultiSimilarity(fused, truth)       # objectives/multisimilarity.py

Where the reconstructions come from (first match wins):

1. ``args['refiner']`` set (MultiBench's example passes its decoder this way):
   - a :class:`~multizoo_ext.fusions.refnet.ReFNet` (or a module holding one): its cached
     reconstructions and targets are used, as in case 2;
   - any other module (MultiBench's ``RefNet_objective`` style): it decodes
     ``args['fused']`` (element 0 of a tuple) to ``(B, sum_i D_i)`` (or returns a list of M
     ``(B, D_i)``), and the targets are the flattened raw inputs ``args['inputs']``
     (``D_i`` their flattened widths), cast to float and moved to ``pred``'s device.
2. Otherwise the ReFNet module is searched in ``args['model']`` (MultiBench's MMDL: its
   ``.fuse`` first, then every submodule), and its ``last_reconstructions`` /
   ``reconstruction_targets(args.get('inputs'))`` of the batch just run are used (embedding
   targets; or the flattened raw inputs with ``ReFNet(target='input')``).

MultiBench calls a custom objective with ``args = objective_args_dict``, which stays ``None``
(and is never filled) unless the caller passes a dict: pass ``objective_args_dict={}`` (or
``{'refiner': decoder}``) to ``train()``. ``truth`` arrives on the CPU there: it is moved to
``pred.device`` here.

Validation (``args['training']`` False, set by MultiBench's loop): the closure returns the
task loss only by default (``eval_full_loss=False``), so the validation loss MultiBench
reports (and uses for early stopping with ``task='regression'``) is comparable with a
plain-fusion baseline's. Set ``eval_full_loss=True`` to get the full training loss there too.

Example (inside a MultiBench checkout)::

    refnet = ReFNet(Concat([300, 512]), modality_dims=[300, 512])
    train(encoders, refnet, head, traindata, validdata, 10, task="multilabel",
          objective=refnet_objective(task="multilabel", ms_weight=0.1),
          objective_args_dict={})
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from multizoo_ext.fusions.refnet import ReFNet, find_refnet
from multizoo_ext.objectives.multisimilarity import MultiSimilarityLoss
from multizoo_ext.objectives.refiner import DEFAULT_REFINER_WEIGHT, REFINER_KINDS, RefinerLoss
from multizoo_ext.registry import register_objective
from multizoo_ext.tasks import default_criterion, resolve_task, task_loss

__all__ = [
    "refnet_objective",
    "refiner_only_objective",
    "refiner_loss_of",
    "task_loss",
    "default_criterion",
]

logger = logging.getLogger(__name__)

Objective = Callable[[Tensor, Optional[Tensor], Optional[MutableMapping[str, Any]]], Tensor]
Weights = Union[float, Sequence[float]]

#: Weight ``lambda_ms`` of Multi-Similarity on the fused embedding (reference: 0.1).
DEFAULT_MS_WEIGHT = 0.1
#: Multi-Similarity hyper-parameters (paper / pytorch-metric-learning names).
DEFAULT_MS = {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1}


def _ms_labels(truth: Tensor, task: str, device: torch.device) -> Tensor:
    truth = truth.to(device)
    if task == "classification":
        return truth.reshape(-1).long()  # (B,) class indices
    return truth  # (B, K) multi-hot


def _fused_tensor(fused: Any) -> Optional[Tensor]:
    if isinstance(fused, (tuple, list)) and fused:
        fused = fused[0]
    return fused if isinstance(fused, Tensor) else None


def _flatten_raw(raw_inputs: Any, like: Tensor) -> List[Tensor]:
    if not isinstance(raw_inputs, (list, tuple)) or not all(isinstance(x, Tensor) for x in raw_inputs):
        raise ValueError("the refiner objective reconstructs the raw inputs, so args['inputs'] must be the list of "
                         f"raw modality tensors (MultiBench sets it every batch), got {type(raw_inputs).__name__}")
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return [torch.flatten(x, 1).detach().to(device=like.device, dtype=dtype) for x in raw_inputs]  # (B, D_i)


def _split_decoder_output(out: Any, targets: Sequence[Tensor]) -> List[Tensor]:
    """Split a plain decoder's ``(B, sum D_i)`` output into the M target widths."""
    widths = [t.shape[1] for t in targets]
    if isinstance(out, (list, tuple)):
        recons = list(out)
        if len(recons) != len(targets):
            raise ValueError(f"args['refiner'] returned {len(recons)} reconstructions for {len(targets)} modalities")
        return recons
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] != sum(widths):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"args['refiner'] must map the fused embedding to (B, {sum(widths)}) = the summed "
                         f"flattened input widths {widths}, got {got}")
    return list(torch.split(out, widths, dim=1))


def _check_args(args: Any, who: str) -> Mapping[str, Any]:
    if args is None:
        raise ValueError(f"{who} needs MultiBench's objective_args_dict: pass objective_args_dict={{}} (or "
                         "{'refiner': decoder}) to train() so the loop fills args['model'], args['fused'], "
                         "args['inputs'] every batch")
    if not isinstance(args, Mapping):
        raise TypeError(f"{who} expects args to be a dict, got {type(args).__name__}")
    return args


def _locate(args: Mapping[str, Any], who: str, batch_size: Optional[int]
            ) -> Tuple[List[Tensor], List[Tensor], Optional[Tensor], Optional[ReFNet]]:
    """Reconstructions, targets, fused embedding and the ReFNet module (if any) of the batch of
    ``batch_size`` rows being scored (None: whatever the ReFNet last saw)."""
    refiner = args.get("refiner")
    if refiner is not None:
        refnet = find_refnet(refiner)
        if refnet is None:
            if not callable(refiner):
                raise TypeError(f"args['refiner'] must be a module, got {type(refiner).__name__}")
            fused = _fused_tensor(args.get("fused"))
            if fused is None:
                raise ValueError(f"{who}: args['refiner'] decodes args['fused'], which is missing; "
                                 "pass objective_args_dict to train() so the loop sets it")
            targets = _flatten_raw(args.get("inputs"), fused)
            recons = _split_decoder_output(refiner(fused), targets)
            return recons, targets, fused, None
    else:
        refnet = find_refnet(args.get("model"))
        if refnet is None:
            model = args.get("model")
            raise ValueError(f"{who} found no ReFNet: args['model'] ({type(model).__name__}) holds none and "
                             "args['refiner'] is not set; use ReFNet as the fusion or pass "
                             "objective_args_dict={'refiner': decoder}")
    if refnet.last_fused is None:
        raise RuntimeError(f"{who}: the ReFNet module has not run a forward yet")
    rows = int(refnet.last_fused.shape[0]) if batch_size is None else batch_size
    try:
        recons, targets, last_fused = refnet.objective_state(rows, args.get("inputs"))
    except ValueError as exc:
        raise ValueError(f"{who}: {exc}") from None
    fused = _fused_tensor(args.get("fused"))
    return recons, targets, (fused if fused is not None else last_fused), refnet


class _RefinerTerm:
    """``RefinerLoss`` with a friendlier weight-count check; its module is kept as ``.loss``
    (``.loss.last_terms`` holds the unweighted per-modality terms of the last call)."""

    def __init__(self, kind: str, weight: Weights, kwargs: Optional[Dict[str, Any]]) -> None:
        if kind not in REFINER_KINDS:
            raise ValueError(f"refiner_loss must be one of {list(REFINER_KINDS)}, got {kind!r}")
        if isinstance(weight, (str, bytes)) or not isinstance(weight, (int, float, Sequence)):
            raise ValueError(f"refiner_weight must be a float or a list of floats, got {weight!r}")
        self.weights = None if isinstance(weight, (int, float)) else [float(w) for w in weight]
        self.loss = RefinerLoss(kind=kind, weights=weight if self.weights is None else self.weights,
                                **dict(kwargs or {}))

    def __call__(self, recons: List[Tensor], targets: List[Tensor]) -> Tensor:
        if self.weights is not None and len(self.weights) != len(recons):
            raise ValueError(f"refiner_weight has {len(self.weights)} weights but the model has "
                             f"{len(recons)} modalities")
        return self.loss(recons, targets)


def refiner_loss_of(source: Any, loss: Optional[Callable[[List[Tensor], List[Tensor]], Tensor]] = None,
                    raw_inputs: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Refiner loss of the last forward of a ReFNet (found in ``source``), no labels needed.

    Args:
        source: a :class:`ReFNet` or any module holding one (e.g. MultiBench's MMDL).
        loss: ``(reconstructions, targets) -> scalar``. Default:
            ``RefinerLoss('cosine', weights=0.1 each)``.
        raw_inputs: the raw batch inputs, needed with ``ReFNet(target='input')``.

    Returns:
        scalar tensor on the ReFNet's device, with gradient.

    Example:
        >>> import torch
        >>> from multizoo_ext.fusions.refnet import ReFNet
        >>> from multizoo_ext.fusions.common_fusions import Concat
        >>> refnet = ReFNet(Concat([3, 4]), [3, 4])
        >>> _ = refnet([torch.randn(5, 3), torch.randn(5, 4)])
        >>> refiner_loss_of(refnet).backward()
    """
    refnet = find_refnet(source)
    if refnet is None:
        raise ValueError(f"refiner_loss_of found no ReFNet in {type(source).__name__}")
    if refnet.last_fused is None:
        raise RuntimeError("refiner_loss_of: the ReFNet module has not run a forward yet")
    recons, targets, _ = refnet.objective_state(int(refnet.last_fused.shape[0]), raw_inputs)
    if loss is None:
        loss = _RefinerTerm("cosine", DEFAULT_REFINER_WEIGHT, None)
    return loss(recons, targets)


@register_objective("refnet")
def refnet_objective(task_criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                     refiner_weight: Weights = DEFAULT_REFINER_WEIGHT, refiner_loss: str = "cosine",
                     ms_weight: Optional[float] = None, ms_alpha: float = DEFAULT_MS["alpha"],
                     ms_beta: float = DEFAULT_MS["beta"], ms_base: float = DEFAULT_MS["base"],
                     ms_epsilon: float = DEFAULT_MS["epsilon"], task: Optional[str] = None,
                     refiner_kwargs: Optional[Dict[str, Any]] = None,
                     eval_full_loss: bool = False, ms_gather: bool = True) -> Objective:
    """Supervised ReFNet objective for MultiBench's ``train`` (and ours).

    Args:
        task_criterion: task loss. Default: by ``task`` (CrossEntropy / BCEWithLogits / MSE).
        refiner_weight: weight ``w_i`` of each modality's refiner loss, one float for all or a
            list of M floats. Default: 0.1 (reference).
        refiner_loss: "cosine" (default; also MultiBench's choice), "mse", "contrastive" or
            "ms" (see ``objectives/refiner.py``).
        ms_weight: ``lambda_ms``, weight of Multi-Similarity on the fused embedding with the
            labels; 0 turns it off. Default (None): 0.1, the reference's, for class labels
            (classification, multilabel); 0 for regression, which has none.
        ms_alpha, ms_beta, ms_base, ms_epsilon: Multi-Similarity positive scale, negative
            scale, offset and mining margin. Defaults: 2, 50, 0.5, 0.1 (paper).
        task: "classification" (labels ``(B,)``/``(B, 1)``), "multilabel" (multi-hot
            ``(B, K)``) or "regression" (no Multi-Similarity). Default (None): the one
            ``task_criterion`` implies (``BCEWithLogitsLoss`` -> multilabel, ``MSELoss`` /
            ``L1Loss`` -> regression), else classification.
        refiner_kwargs: extra arguments for ``RefinerLoss`` (e.g. its contrastive threshold).
        eval_full_loss: in validation (``args['training']`` False) also add the refiner and
            Multi-Similarity terms. Default: False (task loss only; module docstring).
        ms_gather: under data-parallel training, mine the Multi-Similarity pairs in the
            global batch of all processes (``MultiSimilarityLoss(gather=True)``), so that W
            processes train as one process on their concatenated batches. No effect in a
            single process. Default: True (False: each process's batch on its own).

    Returns:
        ``objective(pred, truth, args) -> scalar``, the total loss on ``pred``'s device. Its
        attribute ``objective.refiner_loss`` is the ``RefinerLoss`` module (``.last_terms``:
        the unweighted per-modality terms of the last training call, for logging).

    Raises:
        ValueError: bad task / weights / loss name, ``ms_weight > 0`` with regression; when
            called, ``args`` is None or no ReFNet / refiner can be found, or shapes disagree.
    """
    task = resolve_task(task, task_criterion)
    if ms_weight is None:
        ms_weight = 0.0 if task == "regression" else DEFAULT_MS_WEIGHT
    if isinstance(ms_weight, bool) or not isinstance(ms_weight, (int, float)) or not ms_weight >= 0 \
            or ms_weight == float("inf"):
        raise ValueError(f"ms_weight must be a finite number >= 0, got {ms_weight!r}")
    if ms_weight > 0 and task == "regression":
        raise ValueError("ms_weight > 0 needs class labels; Multi-Similarity is undefined for task='regression'")
    criterion = task_criterion if task_criterion is not None else default_criterion(task)
    refiner_term = _RefinerTerm(refiner_loss, refiner_weight, refiner_kwargs)
    ms_loss = MultiSimilarityLoss(alpha=ms_alpha, beta=ms_beta, base=ms_base, epsilon=ms_epsilon,
                                  gather=ms_gather) if ms_weight > 0 else None
    who = "refnet_objective"

    def objective(pred: Tensor, truth: Tensor, args: Optional[MutableMapping[str, Any]]) -> Tensor:
        args = _check_args(args, who)
        loss = task_loss(criterion, pred, truth)
        if not args.get("training", True) and not eval_full_loss:
            return loss
        recons, targets, fused, _ = _locate(args, who, int(pred.shape[0]))
        if recons and recons[0].shape[0] != pred.shape[0]:
            raise ValueError(f"{who}: the refiner holds a batch of {recons[0].shape[0]} but pred has "
                             f"{pred.shape[0]} rows; the ReFNet cache is from another batch")
        loss = loss + refiner_term(recons, targets).to(loss.device)
        if ms_loss is not None:
            if fused is None:
                raise ValueError(f"{who}: ms_weight > 0 needs the fused embedding (args['fused'])")
            loss = loss + ms_weight * ms_loss(fused, _ms_labels(truth, task, fused.device)).to(loss.device)
        return loss

    objective.refiner_loss = refiner_term.loss  # type: ignore[attr-defined]  # .last_terms for logging
    return objective


@register_objective("refnet_refiner_only")
def refiner_only_objective(refiner_weight: Weights = DEFAULT_REFINER_WEIGHT, refiner_loss: str = "cosine",
                           refiner_kwargs: Optional[Dict[str, Any]] = None) -> Objective:
    """Label-free objective: the weighted refiner loss alone (self-supervised pre-training).

    Same ``(pred, truth, args)`` contract as :func:`refnet_objective`; ``pred`` only gives the
    batch size check and ``truth`` is ignored (may be ``None``). Finds the ReFNet like
    :func:`refnet_objective`. Always returns the refiner loss (also in validation).

    Args:
        refiner_weight, refiner_loss, refiner_kwargs: as in :func:`refnet_objective`.
    """
    refiner_term = _RefinerTerm(refiner_loss, refiner_weight, refiner_kwargs)
    who = "refiner_only_objective"

    def objective(pred: Optional[Tensor], truth: Optional[Tensor], args: Optional[MutableMapping[str, Any]]) -> Tensor:
        args = _check_args(args, who)
        recons, targets, _, _ = _locate(args, who, int(pred.shape[0]) if isinstance(pred, Tensor) else None)
        if isinstance(pred, Tensor) and recons[0].shape[0] != pred.shape[0]:
            raise ValueError(f"{who}: the refiner holds a batch of {recons[0].shape[0]} but pred has "
                             f"{pred.shape[0]} rows; the ReFNet cache is from another batch")
        return refiner_term(recons, targets)

    objective.refiner_loss = refiner_term.loss  # type: ignore[attr-defined]  # .last_terms for logging
    return objective
