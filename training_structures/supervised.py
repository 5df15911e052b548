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
- bad input raises a clear error (wrong number of modalities, NaN/Inf, empty loaders,
  labels out of range, non-finite loss).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from multizoo_ext.checkpoint import save_checkpoint
from multizoo_ext.training_structures import distributed
from multizoo_ext.metrics import SELECTION_METRIC, check_task, compute_metrics, multibench_view
from multizoo_ext.utils import count_parameters, resolve_device, seed_everything
from multizoo_ext.validation import check_finite

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


def _prepare_truth(objective: Any, pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    if isinstance(objective, nn.CrossEntropyLoss):
        if truth.dim() == pred.dim():
            truth = truth.squeeze(pred.dim() - 1)
        return truth.long().to(pred.device)
    return truth.float().to(pred.device)


def deal_with_objective(objective: Callable, pred: torch.Tensor, truth: torch.Tensor,
                        args: Optional[Dict[str, Any]]) -> torch.Tensor:
    """Call ``objective`` the way MultiBench does: the four plain torch losses as
    ``objective(pred, truth)`` (CrossEntropy gets ``long`` labels with a trailing singleton
    squeezed, the others ``float``), any other objective as ``objective(pred, truth, args)``.
    ``truth`` is moved to ``pred``'s device (MultiBench moves it to ``cuda:0``)."""
    if type(objective) in _PLAIN_LOSSES:
        return objective(pred, _prepare_truth(objective, pred, truth))
    return objective(pred, truth.to(pred.device), args)


def _check_labels(task: str, out: torch.Tensor, truth: torch.Tensor) -> None:
    """Raise a clear error when labels cannot belong to this head/task (first batch only)."""
    if task == "classification":
        y = truth.reshape(-1) if truth.dim() > 1 and truth.shape[-1] == 1 else truth
        if y.dim() != 1 or y.shape[0] != out.shape[0]:
            raise ValueError(f"classification expects labels of shape (B,) or (B, 1) with B={out.shape[0]}, "
                             f"got {tuple(truth.shape)}")
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise ValueError("classification labels must be integer class indices, got non-integer values")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= out.shape[1]:
            raise ValueError(f"classification labels must lie in [0, {out.shape[1] - 1}] for a head with "
                             f"{out.shape[1]} outputs, got labels in [{lo}, {hi}]")
    elif task == "multilabel":
        if tuple(truth.shape) != tuple(out.shape):
            raise ValueError(f"multilabel expects multi-hot labels of shape {tuple(out.shape)} (B, K), "
                             f"got {tuple(truth.shape)}")
        if not bool(((truth == 0) | (truth == 1)).all()):
            raise ValueError("multilabel labels must be multi-hot (0/1) values")
    else:
        if truth.numel() != out.numel():
            raise ValueError(f"regression expects {out.numel()} target values for outputs of shape "
                             f"{tuple(out.shape)}, got labels of shape {tuple(truth.shape)}")


def _batch_inputs(batch: Sequence[Any], is_packed: bool, input_to_float: bool, device: torch.device,
                  check_inputs: bool):
    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.float() if input_to_float else x
        if check_inputs:
            check_finite(x, "a batch input")
        return x.to(device, non_blocking=True)

    if is_packed:
        return [[prep(x) for x in batch[0]], batch[1]]
    return [prep(x) for x in batch[:-1]]


def _len_or_none(loader: Iterable) -> Optional[int]:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_loader(loader: Iterable, name: str) -> None:
    if loader is None:
        raise ValueError(f"{name} is None; pass a DataLoader yielding [x_1, ..., x_M, y]")
    if _len_or_none(loader) == 0:
        raise ValueError(f"{name} is empty (0 batches); check the dataset split and batch_size")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, task: str = "classification", objective: Any = None,
             objective_args_dict: Optional[Dict[str, Any]] = None, is_packed: bool = False,
             input_to_float: bool = True, device: Optional[Union[str, torch.device]] = None,
             check_inputs: bool = True) -> Dict[str, float]:
    """Run ``model`` over ``loader`` in eval mode; return the task metrics plus ``loss``
    (mean of ``objective`` over samples, when an objective is given) and ``n``."""
    check_task(task)
    _check_loader(loader, "the evaluation dataloader")
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    sharded = distributed.is_sharded(loader)  # one process's share: gather the outputs below
    was_training = model.training
    model.eval()
    outs, truths, total, n, n_loss = [], [], 0.0, 0, 0
    try:
        for batch in loader:
            out = model(_batch_inputs(batch, is_packed, input_to_float, dev, check_inputs))
            truth = batch[-1]
            if n == 0:
                _check_labels(task, out, truth.to(out.device))
            if objective is not None:
                if objective_args_dict is not None:
                    objective_args_dict.update(reps=model.reps, fused=model.fuseout,
                                               inputs=batch[:-1], training=False)
                lout, ltruth = distributed.trim_padding(loader, n, out, truth) if sharded else (out, truth)
                if len(ltruth):
                    total += float(deal_with_objective(objective, lout, ltruth, objective_args_dict)) * len(ltruth)
                n_loss += len(ltruth)
            n += len(truth)
            outs.append(out.detach().float().cpu())
            truths.append(truth.detach().cpu())
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("the evaluation dataloader yielded no batches")
    pred_all, truth_all = torch.cat(outs), torch.cat(truths)
    if sharded:
        pred_all, truth_all = distributed.gather_predictions(pred_all, truth_all, loader)
        total, n_loss = distributed.all_reduce_sum(total, n_loss)
        n = len(truth_all)
    metrics = compute_metrics(task, truth_all, pred_all)
    if objective is not None:
        metrics["loss"] = total / (n_loss if sharded else n)
    metrics["n"] = n
    return metrics


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
        total_epochs: maximum number of epochs.
        additional_optimizing_modules: further modules whose parameters are optimised too
            (e.g. a refiner/decoder an objective uses). Never mutated.
        is_packed: batches are ``[[x_1..x_M], lengths, ..., y]``.
        early_stop: stop when the validation metric has not improved for more than
            ``patience`` (7, as MultiBench) epochs.
        task: "classification" (selects on accuracy), "multilabel" (macro F1) or
            "regression" (validation loss).
        optimtype, lr, weight_decay: optimiser class and its settings. Default RMSprop, 1e-3, 0.
        objective: a plain torch loss or a ``(pred, truth, args)`` callable.
        auprc: log validation AUPRC each epoch (always in the history).
        save: path for the best weights (state_dict + ``.json`` config); None saves nothing.
        validtime: log validation time.
        objective_args_dict: dict handed to custom objectives; each batch sets ``reps``,
            ``fused``, ``inputs`` (raw CPU inputs), ``training`` and, in training, ``model``.
        input_to_float: cast inputs to float. clip_val: gradient-norm clip.
        track_complexity: record parameter count and time per epoch in the result (and log them).

    Args (ours, keyword-only):
        device: None -> CUDA if available else CPU; or "cpu", "cuda:1", a torch.device.
        fusion_lr_mult: learning-rate multiplier for the fusion's parameters (DEQ fusion's
            reference trains the fusion at 0.1x). Default: 1.0.
        seed: seed Python/NumPy/torch before training (data order, dropout). Seed before
            building the modules for repeatable initial weights.
        patience: early-stopping patience (MultiBench: 7).
        progress: tqdm progress bar; None -> only when stderr is a terminal.
        check_inputs: raise on NaN/Inf inputs (one check per batch).
        config: extra JSON-serialisable entries for the checkpoint's config.

    Returns:
        :class:`TrainResult` (model with the best weights, history, ...).

    Raises:
        ValueError: empty loaders, wrong number of modalities, NaN/Inf inputs, labels out of
            range, bad task; FloatingPointError: the training loss became NaN/Inf.
    """
    check_task(task)
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    _check_loader(train_dataloader, "train_dataloader")
    _check_loader(valid_dataloader, "valid_dataloader")
    if seed is not None:
        seed_everything(seed)
    multi = distributed.init_from_env()  # torchrun with WORLD_SIZE > 1: join the group
    dev = distributed.local_device(device) if multi else resolve_device(device)
    model = MMDL(encoders, fusion, head, has_padding=is_packed).to(dev)
    extra = [m.to(dev) for m in additional_optimizing_modules]
    sync, net = None, model  # net: the module the training forward calls (a DDP wrapper when multi)
    if multi:
        sync = distributed.GradientSync(model, extra, distributed.default_strategy(), dev)
        net = sync.forward_module
        train_dataloader = distributed.distributed_loader(train_dataloader, seed or 0)
        valid_dataloader = distributed.distributed_loader(valid_dataloader, seed or 0)
        distributed.silence_unless_main(logger)
        if not distributed.is_main():
            progress = False

    def _params(mods):
        seen, out = set(), []
        for m in mods:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    fusion_params = _params([model.fuse])
    fusion_ids = {id(p) for p in fusion_params}
    other_params = [p for p in _params([model] + extra) if id(p) not in fusion_ids]
    groups = [{"params": other_params, "lr": lr}]
    if fusion_params:
        groups.append({"params": fusion_params, "lr": lr * fusion_lr_mult})
    optimizer = optimtype(groups, lr=lr, weight_decay=weight_decay)
    n_params = sum(p.numel() for p in _params([model] + extra))

    metric_name, higher_better = SELECTION_METRIC[task]
    best = -math.inf if higher_better else math.inf
    best_state, best_extra, best_epoch, bad_epochs = None, None, -1, 0
    history: List[Dict[str, float]] = []
    result = TrainResult(model=model, parameters=n_params)
    epoch_bar = tqdm(range(total_epochs), desc="epochs", disable=None if progress is None else not progress,
                     leave=False)
    checked = False
    for epoch in epoch_bar:
        t0 = time.perf_counter()
        model.train()
        total, n = 0.0, 0
        if sync is not None:
            distributed.set_epoch(train_dataloader, epoch)
        for batch in train_dataloader:
            optimizer.zero_grad(set_to_none=True)
            out = net(_batch_inputs(batch, is_packed, input_to_float, dev, check_inputs))
            truth = batch[-1]
            if not checked:
                _check_labels(task, out, truth.to(out.device))
                checked = True
            if objective_args_dict is not None:
                objective_args_dict.update(reps=model.reps, fused=model.fuseout, inputs=batch[:-1],
                                           training=True, model=model)
            loss = deal_with_objective(objective, out, truth, objective_args_dict)
            loss_value = loss.detach().item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss became {loss_value} at epoch {epoch}; lower the learning "
                                         f"rate, check the inputs, or clip harder (clip_val={clip_val})")
            loss.backward()
            if sync is not None:
                sync.after_backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_val)
            optimizer.step()
            total += loss_value * len(truth)
            n += len(truth)
        if n == 0:
            raise ValueError("train_dataloader yielded no batches")
        if sync is not None:
            total, n = distributed.all_reduce_sum(total, n)
            sync.sync_buffers()
        t_valid = time.perf_counter()
        valid = evaluate(model, valid_dataloader, task, objective, objective_args_dict, is_packed,
                         input_to_float, dev, check_inputs)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": total / n, "seconds": seconds,
               **{f"valid_{k}": v for k, v in valid.items() if k != "n"}}
        history.append(row)
        score = valid[metric_name]
        improved = score > best if higher_better else score < best
        if sync is not None:  # the same decision on every rank (the metrics already agree)
            improved = distributed.broadcast_object(improved)
        logger.info("epoch %d train loss %.4f valid %s %.4f%s", epoch, row["train_loss"], metric_name, score,
                    " (best)" if improved else "")
        if auprc:
            logger.info("epoch %d valid AUPRC %.4f", epoch, valid.get("auprc", math.nan))
        if validtime:
            logger.info("epoch %d validation took %.3fs", epoch, time.perf_counter() - t_valid)
        epoch_bar.set_postfix(train_loss=f"{row['train_loss']:.4f}", **{f"valid_{metric_name}": f"{score:.4f}"})
        if improved:
            best, best_epoch, bad_epochs = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            best_extra = [copy.deepcopy(m.state_dict()) for m in extra]
            if save is not None and distributed.is_main():
                cfg = {"epoch": epoch, "task": task, metric_name: score, "parameters": n_params,
                       "encoders": [type(e).__name__ for e in model.encoders],
                       "fusion": type(model.fuse).__name__, "head": type(model.head).__name__,
                       **(config or {})}
                save_checkpoint(save, best_state, cfg)
            if save is not None and sync is not None:
                distributed.barrier()  # the checkpoint is complete before any rank goes on
        else:
            bad_epochs += 1
        if early_stop and bad_epochs > patience:
            logger.info("early stop after epoch %d (no improvement for %d epochs)", epoch, bad_epochs)
            break
    epoch_bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
        for m, sd in zip(extra, best_extra or []):
            m.load_state_dict(sd)
    result.history = history
    result.best_epoch, result.best_score = best_epoch, best
    result.checkpoint = None if save is None or best_state is None else str(save)
    result.seconds_per_epoch = sum(h["seconds"] for h in history) / len(history)
    if track_complexity:
        logger.info("trained %d parameters, %.3fs per epoch", n_params, result.seconds_per_epoch)
    return result


def single_test(model, test_dataloader, is_packed=False, criterion=nn.CrossEntropyLoss(),
                task="classification", auprc=False, input_to_float=True, *, device=None,
                full: bool = False) -> Dict[str, float]:
    """One evaluation pass, MultiBench's ``single_test``. Returns MultiBench's keys
    (``Accuracy`` [+ ``AUPRC``]; ``micro``/``macro``; ``MSE``), or with ``full=True`` every metric."""
    m = evaluate(model, test_dataloader, task, None, None, is_packed, input_to_float, device)
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
        for loader in loaders:
            res = single_test(model, loader, is_packed, criterion, task, auprc, input_to_float, device=device,
                              full=full)
            for k, v in res.items():
                curves.setdefault(k, []).append(v)
        robustness[modality] = {}
        for measure, curve in curves.items():
            rel, eff = relative_robustness(curve), effective_robustness(curve)
            robustness[modality][measure] = {"curve": curve, "relative": rel, "effective": eff}
            logger.info("%s %s: %s relative robustness %.4f, effective robustness %.4f",
                        method_name, dataset, f"{modality}/{measure}", rel, eff)
    return {**clean, "robustness": robustness}
