"""Supervised training with MultiBench's ``train()`` / ``test()`` contract.

A MultiBench script switches its import and keeps working::

    # from training_structures.Supervised_Learning import train, test
    from multizoo_ext.training_structures.Supervised_Learning import train, test

Same parameter names, order, defaults and semantics as MultiBench's (HEAD 49f9be2), plus,
after them, keyword arguments MultiBench lacks: ``device``, ``fusion_lr_mult``, ``seed``,
``patience``, ``progress``. Differences that fix MultiBench's weak points:

- the device is resolved once (``device=None``: CUDA if available, else CPU) and nothing
  calls ``.cuda()``;
- the best model is saved as a ``state_dict`` + JSON config (atomic), not a pickled module;
  ``train`` returns a :class:`TrainResult` whose ``model`` already holds the best weights
  (MultiBench scripts reload ``best.pt`` with ``torch.load``; use
  :func:`multizoo_ext.checkpoint.load_checkpoint` or the returned model instead);
- logging and tqdm instead of prints; the per-epoch history is returned;
- bad input raises a clear error before any work (arguments: the benchmark runner's rules)
  or at the batch that holds it (wrong number of modalities, NaN/Inf, empty loaders, labels
  that break the task's rules, checked on every train / valid / test batch);
- a NaN/Inf training loss stops with :class:`~multizoo_ext.training_structures.loop_utils.NonFiniteLossError`
  (a ``FloatingPointError``) naming the kept checkpoint and carrying the history so far.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, MutableMapping, Optional, Sequence, Union

import torch
from torch import nn

from multizoo_ext.metrics import SELECTION_METRIC, compute_metrics, multibench_view
from multizoo_ext.tasks import check_labels, check_task, prepare_truth
from multizoo_ext.training_structures import distributed
from multizoo_ext.training_structures.loop_utils import (
    BestKeeper,
    solver_stats,
    NonFiniteLossError,
    batch_inputs,
    check_loader,
    check_loop_args,
    check_loop_modules,
    check_number,
    mean_seconds,
    progress_bar,
    split_batch,
    trainable_parameters,
)
from multizoo_ext.utils import resolve_device, seed_everything

logger = logging.getLogger(__name__)

__all__ = ["MMDL", "TrainResult", "train", "test", "single_test", "deal_with_objective", "evaluate"]

# Losses MultiBench calls as objective(pred, truth); every other objective gets (pred, truth, args).
_PLAIN_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss, nn.L1Loss)


class MMDL(nn.Module):
    """Encoders -> fusion -> head, with MultiBench's attribute names.

    After each forward, ``reps`` holds the list of encoder outputs ``[(B, d_i)]`` and
    ``fuseout`` the fusion's output (the whole tuple if the fusion returned one).

    Args:
        encoders: one module per modality.
        fusion: ``forward(list of (B, d_i)) -> (B, d)`` (or a tuple whose first item is that).
        head: ``(B, d) -> (B, n_out)``.
        has_padding: inputs are MultiBench's packed ``[[x_1..x_M], lengths]``.
    """

    def __init__(self, encoders: Sequence[nn.Module], fusion: nn.Module, head: nn.Module,
                 has_padding: bool = False) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.fuse = fusion
        self.head = head
        self.has_padding = has_padding
        self.fuseout: Any = None
        self.reps: List[Any] = []

    def forward(self, inputs):
        xs = inputs[0] if self.has_padding else inputs
        if len(xs) != len(self.encoders):
            raise ValueError(f"the model has {len(self.encoders)} encoders (one per modality) "
                             f"but the batch holds {len(xs)} modalities")
        if self.has_padding:
            outs = [enc([x, inputs[1][i]]) for i, (enc, x) in enumerate(zip(self.encoders, xs))]
        else:
            outs = [enc(x) for enc, x in zip(self.encoders, xs)]
        self.reps = outs
        out = self.fuse(outs if isinstance(outs[0], torch.Tensor) else [o[0] for o in outs])
        self.fuseout = out
        if isinstance(out, tuple):
            out = out[0]
        if self.has_padding and not isinstance(outs[0], torch.Tensor):
            return self.head([out, inputs[1][0]])
        return self.head(out)


@dataclass
class TrainResult:
    """What :func:`train` returns (MultiBench's returns nothing; scripts may ignore this).

    Attributes:
        model: the MMDL with the best validation weights loaded.
        history: one dict per epoch (train_loss, valid_loss, valid metrics, seconds).
        best_epoch: epoch (0-based) whose weights ``model`` holds.
        best_score: its selection metric (accuracy / macro F1 / validation loss).
        checkpoint: path of the saved state_dict, or None.
        seconds_per_epoch: mean wall time of an epoch (training + validation).
        parameters: trainable parameters of model + additional modules.
    """

    model: MMDL
    history: List[Dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = math.nan
    checkpoint: Optional[str] = None
    seconds_per_epoch: float = math.nan
    parameters: int = 0


def deal_with_objective(objective: Callable, pred: torch.Tensor, truth: torch.Tensor,
                        args: Optional[Dict[str, Any]]) -> torch.Tensor:
    """Call ``objective`` the way MultiBench does: the four plain torch losses as
    ``objective(pred, truth)`` with the labels :func:`multizoo_ext.tasks.prepare_truth` gives
    (CrossEntropy: ``long``, a trailing singleton squeezed; the others: float of ``pred``'s
    shape, e.g. regression ``(B,)`` reshaped to ``(B, 1)``, never broadcast), any other
    objective as ``objective(pred, truth, args)`` with ``truth`` as it came, moved to
    ``pred``'s device (MultiBench moves it to ``cuda:0``)."""
    if type(objective) in _PLAIN_LOSSES:
        return objective(pred, prepare_truth(objective, pred, truth))
    return objective(pred, truth.to(pred.device), args)


def _loss_input(objective: Any, truth: torch.Tensor, checked: torch.Tensor) -> torch.Tensor:
    """Plain losses get the checked labels (canonical shape); custom objectives the batch's own."""
    return checked if type(objective) in _PLAIN_LOSSES else truth


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, task: str = "classification", objective: Any = None,
             objective_args_dict: Optional[Dict[str, Any]] = None, is_packed: bool = False,
             input_to_float: bool = True, device: Optional[Union[str, torch.device]] = None,
             check_inputs: bool = True, *, split: str = "evaluation") -> Dict[str, float]:
    """Run ``model`` over ``loader`` in eval mode; return the task metrics plus ``loss``
    (mean of ``objective`` over samples, when an objective is given) and ``n``.

    Every batch's labels are checked against the task and the head's output
    (:func:`multizoo_ext.tasks.check_labels`); errors name the batch as ``"<split> batch i"``
    (1-based), e.g. ``"test batch 3"``.
    """
    check_task(task)
    check_loader(loader, f"the {split} dataloader")
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    sharded = distributed.is_sharded(loader)  # one process's share: gathered below
    was_training = model.training
    model.eval()
    outs, truths, total, n, n_loss = [], [], 0.0, 0, 0
    try:
        for i, batch in enumerate(loader, 1):
            where = f"{split} batch {i}"
            inputs, truth = split_batch(batch, where)
            out = model(batch_inputs(inputs, is_packed, input_to_float, dev, check_inputs, where))
            checked = check_labels(truth, task, where=where, pred_shape=out.shape)
            if objective is not None:
                if objective_args_dict is not None:
                    objective_args_dict.update(reps=model.reps, fused=model.fuseout, inputs=inputs, training=False)
                pred, label, count = out, _loss_input(objective, truth, checked), out.shape[0]
                if sharded:  # the loss without the sampler's padding duplicates
                    count, (pred, label) = distributed.trim_padding(loader, n, pred, label)
                loss = deal_with_objective(objective, pred, label, objective_args_dict)
                total += float(loss) * count
                n_loss += count
            n += out.shape[0]
            outs.append(out.detach().float().cpu())
            truths.append(checked.detach().cpu())
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError(f"the {split} dataloader yielded no batches")
    pred_all, truth_all = torch.cat(outs), torch.cat(truths)
    if sharded:  # every process's outputs, in the sampler's order, padding dropped
        pred_all, truth_all = distributed.gather_predictions(pred_all, truth_all, loader)
        total, n_loss = distributed.all_reduce_sum(total, n_loss)
        n = len(truth_all)
    metrics = compute_metrics(task, truth_all, pred_all)
    if objective is not None:
        metrics["loss"] = total / n_loss
    metrics["n"] = n
    return metrics


def _check_train_args(encoders: Any, fusion: Any, head: Any, additional_optimizing_modules: Any, task: str,
                      objective: Any, objective_args_dict: Any, fusion_lr_mult: Any, **loop_args: Any) -> None:
    """train()'s argument rules (the benchmark runner's): raise before any work."""
    check_task(task)
    check_loop_args(**loop_args)
    check_number("fusion_lr_mult", fusion_lr_mult, 0, strict=True)
    check_loop_modules(encoders, fusion, head, additional_optimizing_modules)
    if not callable(objective):
        raise TypeError(f"objective must be a loss module or a callable (pred, truth, args), got {objective!r}")
    if objective_args_dict is not None and not isinstance(objective_args_dict, MutableMapping):
        raise TypeError(f"objective_args_dict must be None or a dict, got {type(objective_args_dict).__name__}")


def train(
        encoders, fusion, head, train_dataloader, valid_dataloader, total_epochs,
        additional_optimizing_modules=[], is_packed=False, early_stop=False, task="classification",
        optimtype=torch.optim.RMSprop, lr=0.001, weight_decay=0.0, objective=nn.CrossEntropyLoss(),
        auprc=False, save="best.pt", validtime=False, objective_args_dict=None, input_to_float=True,
        clip_val=8, track_complexity=True, *,
        device: Optional[Union[str, torch.device]] = None, fusion_lr_mult: float = 1.0,
        seed: Optional[int] = None, patience: int = 7, progress: Optional[bool] = None,
        check_inputs: bool = True, config: Optional[Dict[str, Any]] = None) -> TrainResult:
    """Train encoders + fusion + head (MultiBench's ``train``, same first 20 parameters).

    Args (MultiBench's):
        encoders: list of modules, one per modality. fusion: fusion module. head: head module.
        train_dataloader, valid_dataloader: yield ``[x_1, ..., x_M, y]``.
        total_epochs: maximum number of epochs (an integer >= 1).
        additional_optimizing_modules: further modules whose parameters are optimised too
            (e.g. a refiner/decoder an objective uses). Never mutated.
        is_packed: batches are ``[[x_1..x_M], lengths, ..., y]``.
        early_stop: stop when the validation metric has not improved for more than
            ``patience`` (7, as MultiBench) epochs.
        task: "classification" (selects on accuracy), "multilabel" (macro F1) or
            "regression" (validation loss).
        optimtype, lr, weight_decay: optimiser class and its settings. Default RMSprop, 1e-3, 0.
            ``lr`` must be > 0 and finite, ``weight_decay`` >= 0 and finite.
        objective: a plain torch loss or a ``(pred, truth, args)`` callable.
        auprc: log validation AUPRC each epoch (always in the history).
        save: path for the best weights (state_dict + ``.json`` config), written as soon as an
            epoch improves; None saves nothing.
        validtime: log validation time.
        objective_args_dict: dict handed to custom objectives; each batch sets ``reps``,
            ``fused``, ``inputs`` (raw CPU inputs), ``training`` and, in training, ``model``.
        input_to_float: cast inputs to float. clip_val: gradient-norm clip (> 0).
        track_complexity: record parameter count and time per epoch in the result (and log them).

    Args (ours, keyword-only):
        device: None -> CUDA if available else CPU; or "cpu", "cuda:1", a torch.device.
        fusion_lr_mult: learning-rate multiplier (> 0, finite) for the fusion's parameters
            (DEQ fusion's reference trains the fusion at 0.1x). Default: 1.0. To freeze the
            fusion, call ``fusion.requires_grad_(False)`` instead.
        seed: seed Python/NumPy/torch before training (data order, dropout). Seed before
            building the modules for repeatable initial weights.
        patience: early-stopping patience, an integer >= 0 (MultiBench: 7).
        progress: tqdm progress bar; None -> only when stderr is a terminal.
        check_inputs: raise on NaN/Inf inputs (one check per batch).
        config: extra JSON-serialisable entries for the checkpoint's config.

    Labels are checked on every batch (train and validation) against the task and the head's
    output (:func:`multizoo_ext.tasks.check_labels`): integral class indices within the head's
    width, 0/1 multi-hot of the head's width, regression targets of the head's shape
    (``(B,)`` is reshaped to a ``(B, 1)`` head's shape, never broadcast). Plain torch losses
    receive those checked labels; custom objectives receive the batch's labels as they came.

    Returns:
        :class:`TrainResult` (model with the best weights, history, ...).

    Raises:
        ValueError / TypeError: bad arguments (checked before any work: the rules above,
            modules with zero-sized layers, bad task or device), empty loaders, wrong number
            of modalities, NaN/Inf inputs, labels that break the task's rules (the message
            names the epoch and batch).
        NonFiniteLossError: (a ``FloatingPointError``) the training loss became NaN/Inf. The
            message names the epoch and batch and which epoch's weights were kept and where;
            the modules hold those best weights again, and the exception's ``.result`` is the
            :class:`TrainResult` up to the last complete epoch (also ``.history``,
            ``.best_epoch``, ``.checkpoint``).
    """
    _check_train_args(encoders, fusion, head, additional_optimizing_modules, task, objective, objective_args_dict,
                      fusion_lr_mult, total_epochs=total_epochs, lr=lr, weight_decay=weight_decay,
                      patience=patience, clip_val=clip_val, optimtype=optimtype, seed=seed, save=save)
    multi = distributed.init_from_env()  # torchrun with WORLD_SIZE > 1: join the process group
    dev = distributed.local_device(device) if multi else resolve_device(device)
    check_loader(train_dataloader, "train_dataloader")
    check_loader(valid_dataloader, "valid_dataloader")
    if seed is not None:
        seed_everything(seed)
    model = MMDL(encoders, fusion, head, has_padding=is_packed).to(dev)
    extra = [m.to(dev) for m in additional_optimizing_modules]
    sync, net = None, model  # net: what the training forward calls (the DDP wrapper under torchrun)
    if multi:
        sync = distributed.GradientSync(model, extra, distributed.default_strategy(), dev)
        net = sync.forward_module
        train_dataloader = distributed.distributed_loader(train_dataloader, seed or 0)
        valid_dataloader = distributed.distributed_loader(valid_dataloader, seed or 0)
        distributed.silence_unless_main(logger)
        progress = progress if distributed.is_main() else False

    fusion_params = trainable_parameters([model.fuse])
    fusion_ids = {id(p) for p in fusion_params}
    other_params = [p for p in trainable_parameters([model] + extra) if id(p) not in fusion_ids]
    groups = [{"params": other_params, "lr": lr}]
    if fusion_params:
        groups.append({"params": fusion_params, "lr": lr * fusion_lr_mult})
    optimizer = optimtype(groups, lr=lr, weight_decay=weight_decay)
    n_params = sum(p.numel() for p in trainable_parameters([model] + extra))

    metric_name, higher_better = SELECTION_METRIC[task]
    keeper = BestKeeper(model, extra, save if distributed.is_main() else None, higher_better)  # rank 0 writes
    base_config = {"task": task, "parameters": n_params, "encoders": [type(e).__name__ for e in model.encoders],
                   "fusion": type(model.fuse).__name__, "head": type(model.head).__name__, **(config or {})}
    history: List[Dict[str, float]] = []
    result = TrainResult(model=model, parameters=n_params)

    def finish() -> TrainResult:
        keeper.restore()
        result.history = history
        result.best_epoch, result.best_score, result.checkpoint = keeper.best_epoch, keeper.best, keeper.checkpoint
        result.seconds_per_epoch = mean_seconds(history)
        return result

    epoch_bar = progress_bar(range(total_epochs), "epochs", progress)
    bad_epochs = 0
    for epoch in epoch_bar:
        t0 = time.perf_counter()
        model.train()
        total, n = 0.0, 0
        if sync is not None:
            distributed.set_epoch(train_dataloader, epoch)
        for i, batch in enumerate(train_dataloader, 1):
            where = f"epoch {epoch}, train batch {i}"
            inputs, truth = split_batch(batch, where)
            optimizer.zero_grad(set_to_none=True)
            out = net(batch_inputs(inputs, is_packed, input_to_float, dev, check_inputs, where))
            checked = check_labels(truth, task, where=where, pred_shape=out.shape)
            if objective_args_dict is not None:
                objective_args_dict.update(reps=model.reps, fused=model.fuseout, inputs=inputs,
                                           training=True, model=model)
            loss = deal_with_objective(objective, out, _loss_input(objective, truth, checked), objective_args_dict)
            loss_value = loss.detach().item()
            if not math.isfinite(loss_value):
                epoch_bar.close()
                finish()
                raise NonFiniteLossError(
                    f"training loss became {loss_value} at epoch {epoch}, train batch {i}; training stopped and "
                    f"{keeper.describe()}; lower the learning rate, check the inputs, or clip harder "
                    f"(clip_val={clip_val})", result, epoch, i)
            loss.backward()
            if sync is not None:
                sync.after_backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_val)
            optimizer.step()
            total += loss_value * out.shape[0]
            n += out.shape[0]
        if n == 0:
            raise ValueError("train_dataloader yielded no batches")
        if sync is not None:
            total, n = distributed.all_reduce_sum(total, n)
            sync.sync_buffers()
        # equilibrium fusions: how many training samples converged (over all processes)
        solver = solver_stats(model, distributed.all_reduce_sum, distributed.all_reduce_max) if sync is not None \
            else solver_stats(model)
        t_valid = time.perf_counter()
        valid = evaluate(model, valid_dataloader, task, objective, objective_args_dict, is_packed,
                         input_to_float, dev, check_inputs, split=f"epoch {epoch}, valid")
        solver_stats(model)  # validation forwards are not counted
        row = {"epoch": epoch, "train_loss": total / n, "seconds": time.perf_counter() - t0,
               **{f"valid_{k}": v for k, v in valid.items() if k != "n"}, **solver}
        history.append(row)
        score = valid[metric_name]
        if sync is not None:  # rank 0's score: the same decisions on every rank
            score = distributed.broadcast_object(score)
        improved = keeper.update(epoch, score, {**base_config, metric_name: score})
        if sync is not None and improved and save is not None:
            distributed.barrier()  # the checkpoint is complete before any rank goes on
        logger.info("epoch %d train loss %.4f valid %s %.4f%s", epoch, row["train_loss"], metric_name, score,
                    " (best)" if improved else "")
        if auprc:
            logger.info("epoch %d valid AUPRC %.4f", epoch, valid.get("auprc", math.nan))
        if validtime:
            logger.info("epoch %d validation took %.3fs", epoch, time.perf_counter() - t_valid)
        epoch_bar.set_postfix(train_loss=f"{row['train_loss']:.4f}", **{f"valid_{metric_name}": f"{score:.4f}"})
        bad_epochs = 0 if improved else bad_epochs + 1
        if early_stop and bad_epochs > patience:
            logger.info("early stop after epoch %d (no improvement for %d epochs)", epoch, bad_epochs)
            break
    epoch_bar.close()
    finish()
    if track_complexity:
        logger.info("trained %d parameters, %.3fs per epoch", n_params, result.seconds_per_epoch)
    return result


def single_test(model, test_dataloader, is_packed=False, criterion=nn.CrossEntropyLoss(),
                task="classification", auprc=False, input_to_float=True, *, device=None,
                full: bool = False, split: str = "test") -> Dict[str, float]:
    """One evaluation pass, MultiBench's ``single_test``. Returns MultiBench's keys
    (``Accuracy`` [+ ``AUPRC``]; ``micro``/``macro``; ``MSE``), or with ``full=True`` every metric.
    Every batch's labels are checked (see :func:`evaluate`); ``split`` names the batches in errors."""
    m = evaluate(model, test_dataloader, task, None, None, is_packed, input_to_float, device, split=split)
    if full:
        return m
    out = multibench_view(task, m)
    if auprc:
        out["AUPRC"] = m["auprc"]
    return out


def test(model, test_dataloaders_all, dataset="default", method_name="My method", is_packed=False,
         criterion=nn.CrossEntropyLoss(), task="classification", auprc=False, input_to_float=True,
         no_robust=False, *, device=None, full: bool = False) -> Dict[str, Any]:
    """Evaluate a trained model, MultiBench's ``test``.

    Args:
        model: the trained model (e.g. ``train(...).model``).
        test_dataloaders_all: with ``no_robust=True`` one DataLoader; otherwise a dict
            ``{modality_name: [loader at noise level 0, level 1, ...]}`` (see
            ``multizoo_ext.datasets.robustness``); the first loader of the first key is clean.
        dataset, method_name: names used in the log lines.
        criterion: used for regression's MSE. task, auprc, input_to_float: as in ``train``.
        device: where to run (default: the model's device). full: return every metric.

    Returns:
        The clean metrics (MultiBench's keys, or all with ``full``). In robustness mode, also
        ``"robustness"``: ``{modality: {measure: {"curve": [...], "relative": r, "effective": e}}}``
        where relative robustness is the area under the curve (MultiBench's trapezoid with
        step 0.1) and effective robustness the curve's summed drop below its clean score.
    """
    if no_robust:
        return single_test(model, test_dataloaders_all, is_packed, criterion, task, auprc, input_to_float,
                           device=device, full=full)
    if not isinstance(test_dataloaders_all, dict) or not test_dataloaders_all:
        raise ValueError("with no_robust=False, test_dataloaders_all must be a non-empty dict "
                         "{modality: [loader per noise level]}; pass no_robust=True for one DataLoader")
    from multizoo_ext.robustness import effective_robustness, relative_robustness

    first = next(iter(test_dataloaders_all.values()))
    clean = single_test(model, first[0], is_packed, criterion, task, auprc, input_to_float, device=device, full=full)
    robustness: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for modality, loaders in test_dataloaders_all.items():
        curves: Dict[str, List[float]] = {}
        for level, loader in enumerate(loaders):
            res = single_test(model, loader, is_packed, criterion, task, auprc, input_to_float, device=device,
                              full=full, split=f"test ({modality}, noise level {level})")
            for k, v in res.items():
                curves.setdefault(k, []).append(v)
        robustness[modality] = {}
        for measure, curve in curves.items():
            rel, eff = relative_robustness(curve), effective_robustness(curve)
            robustness[modality][measure] = {"curve": curve, "relative": rel, "effective": eff}
            logger.info("%s %s: %s relative robustness %.4f, effective robustness %.4f",
                        method_name, dataset, f"{modality}/{measure}", rel, eff)
    return {**clean, "robustness": robustness}
