"""DEQ fusion objective in MultiBench's ``objective(pred, truth, args)`` form.

``deq_objective(task_criterion, jacobian_weight)`` returns a closure for MultiBench's
``train(objective=..., objective_args_dict={})`` and for our supervised loop (same contract)::

    loss = task_loss(pred, truth) + jacobian_weight * jac_loss

where ``jac_loss`` is the Hutchinson estimate of ``||J_f(z*)||_F^2 / numel`` that a
:class:`~multizoo_ext.fusions.deq.DEQFusion` built with ``jac_reg=True`` computes in each
training forward, read with its ``take_jacobian_penalty(batch_size)``. The DEQ module is
found in ``args['deq']`` when the caller put it there, else in ``args['model']``
(MultiBench's MMDL: its ``.fuse`` and that module's children first, so a DEQFusion wrapped
by e.g. ``ReFNet(...).fusion`` is found, then the whole model).

Reference weights: 0.1 on MM-IMDB, 20 on BRCA, 0.01 on MOSI; the default here is 1.0
(``DEFAULT_JACOBIAN_WEIGHT``).

MultiBench calls a custom objective with ``args = objective_args_dict``, which stays ``None``
unless the caller passes a dict: pass ``objective_args_dict={}`` to ``train()``. ``truth``
arrives on the CPU there: it is moved to ``pred.device`` here (CrossEntropy labels ``(B, 1)``
are squeezed to ``(B,)`` int64, BCE/MSE labels cast to float, as MultiBench does).

Example::

    fusion = DEQFusion([512, 512], jac_reg=True)
    train(encoders, fusion, head, traindata, validdata, 10, task="multilabel",
          objective=deq_objective(nn.BCEWithLogitsLoss()),   # Jacobian weight 1.0
          objective_args_dict={})
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, MutableMapping, Optional

from torch import Tensor, nn

from multizoo_ext.fusions.deq import DEQFusion, find_deq
from multizoo_ext.fusions.deq.fusion import DEFAULT_JACOBIAN_WEIGHT  # defined with DEQ fusion's recipe
from multizoo_ext.registry import register_objective
from multizoo_ext.tasks import default_criterion, resolve_task, task_loss

__all__ = ["DEFAULT_JACOBIAN_WEIGHT", "deq_objective", "find_deq_in_args"]

Objective = Callable[[Tensor, Tensor, Optional[MutableMapping[str, Any]]], Tensor]


def find_deq_in_args(args: Optional[Mapping[str, Any]]) -> Optional[DEQFusion]:
    """The DEQFusion an objective should read: ``args['deq']`` (a DEQFusion or a module
    holding one), else the first one in ``args['model'].fuse``, else in ``args['model']``.
    None when there is none (or ``args`` is None)."""
    if not args:
        return None
    explicit = args.get("deq")
    if explicit is not None:
        found = find_deq(explicit) if isinstance(explicit, nn.Module) else None
        if found is None:
            raise TypeError(f"args['deq'] must be a DEQFusion or a module holding one, got {type(explicit).__name__}")
        return found
    model = args.get("model")
    if not isinstance(model, nn.Module):
        return None
    fuse = getattr(model, "fuse", None)
    return find_deq(fuse if isinstance(fuse, nn.Module) else None) or find_deq(model)


@register_objective("deq")
def deq_objective(task_criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                  jacobian_weight: float = DEFAULT_JACOBIAN_WEIGHT,
                  task: Optional[str] = None) -> Objective:
    """Task loss plus the DEQ fusion's Jacobian penalty, for MultiBench's ``train``.

    Args:
        task_criterion: ``(pred, truth) -> scalar`` task loss (e.g. ``nn.BCEWithLogitsLoss()``).
            Default: MultiBench's loss for ``task`` (CrossEntropy / BCEWithLogits / MSE).
        jacobian_weight: weight of ``jac_loss``, finite and >= 0; 0 gives the task loss
            alone. Default: 1.0 (``DEFAULT_JACOBIAN_WEIGHT``; the authors' MM-IMDB value 0.1 is
            what the ``deq_paper`` recipe uses).
        task: used only when ``task_criterion`` is None: its default criterion. Default:
            classification.

    Returns:
        ``objective(pred, truth, args) -> scalar``. In validation (``args['training']``
        False) it returns the task loss (the penalty is only computed in training).

    Raises:
        ValueError: ``jacobian_weight`` negative, NaN or infinite. When the closure is called
        in training with ``jacobian_weight > 0``: ``args`` is None (pass
        ``objective_args_dict={}`` to ``train``), no DEQFusion in ``args``, or the
        DEQFusion's last forward computed no penalty for this batch (built without
        ``jac_reg=True``, another batch size, or already scored; see
        ``DEQFusion.take_jacobian_penalty``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from multizoo_ext.fusions.deq import DEQFusion
        >>> deq = DEQFusion([4, 6], width=8, jac_reg=True)
        >>> head = nn.Linear(8, 3)
        >>> pred = head(deq([torch.randn(5, 4), torch.randn(5, 6)]))
        >>> loss = deq_objective(nn.CrossEntropyLoss(), 0.1)(pred, torch.tensor([0, 1, 2, 0, 1]), {"deq": deq})
        >>> loss.backward()
    """
    weight = float(jacobian_weight)
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"deq_objective: jacobian_weight must be >= 0 and finite, got {jacobian_weight}")
    criterion = default_criterion(resolve_task(task)) if task_criterion is None else task_criterion

    def objective(pred: Tensor, truth: Tensor, args: Optional[MutableMapping[str, Any]] = None) -> Tensor:
        loss = task_loss(criterion, pred, truth)
        if weight == 0.0:
            return loss
        training = True if args is None else bool(args.get("training", True))
        if not training:
            return loss
        if args is None:
            raise ValueError("deq_objective needs the model to find the Jacobian penalty: pass "
                             "objective_args_dict={} to train() (or set jacobian_weight=0)")
        deq = find_deq_in_args(args)
        if deq is None:
            raise ValueError("deq_objective found no DEQFusion in args['deq'] or args['model']; "
                             "put it in objective_args_dict['deq'] or set jacobian_weight=0")
        return loss + weight * deq.take_jacobian_penalty(pred.shape[0]).to(loss.device)

    return objective
