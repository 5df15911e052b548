"""Label-free pre-training of encoders + fusion (e.g. ReFNet's refiner loss), then hand the
same modules to supervised fine-tuning.

Example:
    >>> from multizoo_ext.training_structures.self_supervised import pretrain   # doctest: +SKIP
    >>> pre = pretrain(encoders, refnet, unlabeled_loader, 20)                  # doctest: +SKIP
    >>> res = train(encoders, refnet, head, labeled_loader, valid_loader, 30)   # doctest: +SKIP

The loop owns device, optimiser, progress, history and checkpoints; the loss is an objective
``(pred, truth, args) -> scalar`` called with ``truth=None`` (labels in the batch are never
read) and ``args`` holding ``model``, ``reps``, ``fused``, ``inputs``, ``training``. Default:
the registered ``"refnet_refiner_only"`` objective (cosine refiner loss, weight 0.1 each).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from multizoo_ext.registry import create_objective
from multizoo_ext.training_structures import distributed
from multizoo_ext.training_structures.loop_utils import (
    BestKeeper,
    NonFiniteLossError,
    batch_inputs,
    check_loader,
    check_loop_args,
    check_loop_modules,
    mean_seconds,
    progress_bar,
    trainable_parameters,
)
from multizoo_ext.training_structures.supervised import MMDL
from multizoo_ext.utils import resolve_device, seed_everything

logger = logging.getLogger(__name__)

__all__ = ["PretrainResult", "pretrain"]


@dataclass
class PretrainResult:
    """Attributes:
        model: MMDL(encoders, fusion, Identity) holding the kept weights (the encoders and
            fusion are the very modules passed in, trained in place).
        history: per epoch ``train_loss`` (and ``valid_loss`` with a validation loader).
        best_epoch: epoch whose weights are kept (lowest validation loss; else the last).
        checkpoint: path of the saved state_dict, or None.
        seconds_per_epoch: mean wall time per epoch.
    """

    model: MMDL
    history: List[Dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    checkpoint: Optional[str] = None
    seconds_per_epoch: float = math.nan


def _run_epoch(model: MMDL, loader, objective, n_mod: int, is_packed: bool, input_to_float: bool,
               dev: torch.device, check_inputs: bool, optimizer=None, clip_val: float = 8.0,
               extra_params: Sequence[nn.Parameter] = (), *, split: str = "train",
               on_nonfinite: Optional[Callable[[float, str, int], None]] = None,
               sync: Optional[distributed.GradientSync] = None) -> float:
    """One pass over ``loader`` (training when ``optimizer`` is given); mean loss per sample.
    ``on_nonfinite(value, where, batch)`` is called (and should raise) when the loss is NaN/Inf."""
    training = optimizer is not None
    net = sync.forward_module if sync is not None and training else model
    model.train(training)
    total, n = 0.0, 0
    with torch.set_grad_enabled(training):
        for i, batch in enumerate(loader, 1):
            where = f"{split} batch {i}"
            batch = list(batch) if isinstance(batch, (list, tuple)) else [batch]
            if is_packed:
                inputs = batch[:2]
            else:
                if len(batch) < n_mod:
                    raise ValueError(f"{where}: the model has {n_mod} encoders but the batch holds {len(batch)} "
                                     "tensors")
                inputs = batch[:n_mod]  # a label after the modalities, if any, is ignored
            out = net(batch_inputs(inputs, is_packed, input_to_float, dev, check_inputs, where))
            args = {"model": model, "reps": model.reps, "fused": model.fuseout, "inputs": inputs,
                    "training": training}
            loss = objective(out, None, args)
            value = loss.detach().item()
            if not math.isfinite(value):
                if on_nonfinite is not None:
                    on_nonfinite(value, where, i)
                raise FloatingPointError(f"{where}: pre-training loss became {value}; lower the learning rate or "
                                         "check inputs")
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if sync is not None:
                    sync.after_backward()
                torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(extra_params), clip_val)
                optimizer.step()
            bsz = out.shape[0]
            total += value * bsz
            n += bsz
    if n == 0:
        raise ValueError(f"the {split} dataloader yielded no batches")
    if distributed.is_sharded(loader):
        total, n = distributed.all_reduce_sum(total, n)
    return total / n


def pretrain(encoders: Sequence[nn.Module], fusion: nn.Module, train_dataloader, total_epochs: int,
             valid_dataloader=None, objective: Optional[Callable] = None,
             additional_optimizing_modules: Sequence[nn.Module] = (), is_packed: bool = False,
             optimtype=torch.optim.AdamW, lr: float = 1e-3, weight_decay: float = 0.0,
             save: Optional[str] = None, input_to_float: bool = True, clip_val: float = 8.0, *,
             device: Optional[Union[str, torch.device]] = None, seed: Optional[int] = None,
             early_stop: bool = False, patience: int = 7, progress: Optional[bool] = None,
             check_inputs: bool = True) -> PretrainResult:
    """Pre-train ``encoders`` + ``fusion`` without labels.

    Args:
        encoders: one module per modality (trained in place).
        fusion: the fusion (e.g. a ``ReFNet``), trained in place with its refiners.
        train_dataloader: yields ``[x_1, ..., x_M]`` or ``[x_1, ..., x_M, y]`` (``y`` ignored).
        total_epochs: epochs (an integer >= 1).
        valid_dataloader: optional; selects the epoch with the lowest loss.
        objective: ``(pred, truth, args) -> scalar``; default
            ``create_objective("refnet_refiner_only")``.
        additional_optimizing_modules: further modules to optimise (e.g. a decoder the
            objective reads from ``args``; add it to ``args`` yourself through a closure).
        is_packed, input_to_float, clip_val: as in ``supervised.train``.
        optimtype, lr, weight_decay: optimiser. Default AdamW, 1e-3, 0 (same rules as ``train``).
        save: path for the kept weights (state_dict of MMDL(encoders, fusion, Identity) + JSON),
            written as soon as an epoch becomes the best (without ``valid_dataloader``: after
            every epoch), so an interruption or a NaN keeps the best epoch so far.
        device, seed, early_stop, patience, progress, check_inputs: as in ``supervised.train``.

    Returns:
        :class:`PretrainResult`.

    Raises:
        ValueError / TypeError: bad arguments (before any work), empty loaders, too few
            tensors per batch, NaN/Inf inputs.
        NonFiniteLossError: (a ``FloatingPointError``) the pre-training loss became NaN/Inf;
            as in ``supervised.train``: the message names the kept epoch and checkpoint, the
            modules hold those weights again, ``.result`` is the :class:`PretrainResult` so far.
    """
    check_loop_args(total_epochs=total_epochs, lr=lr, weight_decay=weight_decay, patience=patience,
                    clip_val=clip_val, optimtype=optimtype, seed=seed, save=save)
    check_loop_modules(encoders, fusion, None, additional_optimizing_modules)
    if objective is not None and not callable(objective):
        raise TypeError(f"objective must be a callable (pred, truth, args) -> loss, got {objective!r}")
    multi = distributed.init_from_env()  # torchrun with WORLD_SIZE > 1: join the process group
    dev = distributed.local_device(device) if multi else resolve_device(device)
    check_loader(train_dataloader, "train_dataloader")
    if valid_dataloader is not None:
        check_loader(valid_dataloader, "valid_dataloader")
    if seed is not None:
        seed_everything(seed)
    objective = objective if objective is not None else create_objective("refnet_refiner_only")
    model = MMDL(encoders, fusion, nn.Identity(), has_padding=is_packed).to(dev)
    extra = [m.to(dev) for m in additional_optimizing_modules]
    extra_params = trainable_parameters(extra)
    params = trainable_parameters([model] + extra)
    optimizer = optimtype(params, lr=lr, weight_decay=weight_decay)
    n_mod = len(model.encoders)
    sync = None
    if multi:
        sync = distributed.GradientSync(model, extra, distributed.default_strategy(), dev)
        train_dataloader = distributed.distributed_loader(train_dataloader, seed or 0)
        if valid_dataloader is not None:
            valid_dataloader = distributed.distributed_loader(valid_dataloader, seed or 0)
        distributed.silence_unless_main(logger)
        progress = progress if distributed.is_main() else False
    history: List[Dict[str, float]] = []
    keeper = BestKeeper(model, extra, save if distributed.is_main() else None, higher_better=False)  # rank 0 writes
    result = PretrainResult(model=model)

    def finish() -> PretrainResult:
        keeper.restore()
        result.history, result.best_epoch, result.checkpoint = history, keeper.best_epoch, keeper.checkpoint
        result.seconds_per_epoch = mean_seconds(history)
        return result

    bar = progress_bar(range(total_epochs), "pre-training", progress)
    bad = 0
    for epoch in bar:
        def stop(value: float, where: str, batch: int, _epoch: int = epoch) -> None:
            bar.close()
            finish()
            raise NonFiniteLossError(f"pre-training loss became {value} at {where}; "
                                     f"training stopped and {keeper.describe()}; lower the learning rate or "
                                     f"check the inputs", result, _epoch, batch)

        t0 = time.perf_counter()
        row: Dict[str, float] = {"epoch": epoch}
        if sync is not None:
            distributed.set_epoch(train_dataloader, epoch)
        row["train_loss"] = _run_epoch(model, train_dataloader, objective, n_mod, is_packed, input_to_float, dev,
                                       check_inputs, optimizer, clip_val, extra_params,
                                       split=f"epoch {epoch}, train", on_nonfinite=stop, sync=sync)
        if sync is not None:
            sync.sync_buffers()
        if valid_dataloader is not None:
            row["valid_loss"] = _run_epoch(model, valid_dataloader, objective, n_mod, is_packed, input_to_float,
                                           dev, check_inputs, split=f"epoch {epoch}, valid", on_nonfinite=stop)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        score = row.get("valid_loss", -epoch)  # without validation, keep the last epoch
        bar.set_postfix(loss=f"{row['train_loss']:.4f}")
        logger.info("pre-training epoch %d loss %.4f%s", epoch, row["train_loss"],
                    f" valid {row['valid_loss']:.4f}" if "valid_loss" in row else "")
        if sync is not None:  # rank 0's score: the same decisions on every rank
            score = distributed.broadcast_object(score)
        improved = keeper.update(epoch, score, {"stage": "pretrain", "fusion": type(model.fuse).__name__,
                                                "valid_loss": row.get("valid_loss")})
        if sync is not None and improved and save is not None:
            distributed.barrier()  # the checkpoint is complete before any rank goes on
        bad = 0 if improved else bad + 1
        if early_stop and bad > patience:
            break
    bar.close()
    return finish()
