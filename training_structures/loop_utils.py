"""Pieces the training loops share (``supervised.train`` / ``evaluate`` and
``self_supervised.pretrain``), public so that a user writing their own loop can reuse them.

- batches: :func:`split_batch` (``[x_1, ..., x_M, y]`` -> inputs, labels) and
  :func:`batch_inputs` (cast, NaN/Inf check, move to the device);
- loaders: :func:`len_or_none`, :func:`check_loader` (None / empty loaders);
- arguments: :func:`check_number`, :func:`check_modules`, :func:`check_loop_modules`,
  :func:`check_loop_args` (the numeric rules the benchmark runner applies), checked before
  any work;
- optimisation: :func:`trainable_parameters` (deduplicated, in order);
- the best epoch: :class:`BestKeeper` keeps the best weights in memory, writes them to the
  checkpoint as soon as an epoch improves (state_dict + JSON config, atomic) and puts them
  back at the end or when training stops early;
- stops: :class:`NonFiniteLossError`, raised when the training loss becomes NaN/Inf; it
  names the kept checkpoint and carries the loop's result (history so far, best epoch);
- :func:`progress_bar`, :func:`mean_seconds` (per-epoch history).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(3, 2)
    >>> keeper = BestKeeper(model, save=None, higher_better=False)
    >>> keeper.update(0, 0.7)
    True
    >>> keeper.update(1, 0.9)
    False
    >>> keeper.best_epoch
    0
"""
from __future__ import annotations

import copy
import logging
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from multizoo_ext.checkpoint import save_checkpoint
from multizoo_ext.validation import check_finite, check_number

logger = logging.getLogger(__name__)

__all__ = [
    "solver_stats",
    "BestKeeper",
    "NonFiniteLossError",
    "batch_inputs",
    "check_loader",
    "check_loop_args",
    "check_loop_modules",
    "check_modules",
    "check_number",
    "len_or_none",
    "mean_seconds",
    "progress_bar",
    "split_batch",
    "trainable_parameters",
]

PathLike = Union[str, os.PathLike]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/Inf; training stopped.

    A ``FloatingPointError`` (what the loops raised before), so existing ``except`` clauses
    keep working. The message says which epoch's weights were kept and where they were
    saved. The modules passed to the loop hold those best weights again (when an epoch had
    finished; otherwise the weights of the failing step).

    Attributes:
        result: the loop's result object (``TrainResult`` / ``PretrainResult``) as if it had
            ended after the last complete epoch: ``history``, ``best_epoch``, ``checkpoint``...
        history: ``result.history``, one dict per complete epoch.
        best_epoch: ``result.best_epoch`` (-1 when no epoch finished).
        checkpoint: path of the saved best weights, or None.
        epoch, batch: where the loss became non-finite (epoch 0-based, batch 1-based).
    """

    def __init__(self, message: str, result: Any = None, epoch: int = -1, batch: int = -1) -> None:
        super().__init__(message)
        self.result = result
        self.history: List[Dict[str, float]] = list(getattr(result, "history", []))
        self.best_epoch: int = int(getattr(result, "best_epoch", -1))
        self.checkpoint: Optional[str] = getattr(result, "checkpoint", None)
        self.epoch, self.batch = epoch, batch


def len_or_none(loader: Iterable) -> Optional[int]:
    """``len(loader)``, or None for loaders without a length (iterable datasets)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def check_loader(loader: Iterable, name: str) -> None:
    """Raise ValueError when ``loader`` is None or has zero batches."""
    if loader is None:
        raise ValueError(f"{name} is None; pass a DataLoader yielding [x_1, ..., x_M, y]")
    if not hasattr(loader, "__iter__"):
        raise TypeError(f"{name} must be an iterable of batches (e.g. a DataLoader), got {type(loader).__name__}")
    if len_or_none(loader) == 0:
        raise ValueError(f"{name} is empty (0 batches); check the dataset split and batch_size")


def split_batch(batch: Any, where: str = "a batch") -> Tuple[List[Any], Any]:
    """``[x_1, ..., x_M, y]`` (or packed ``[[x_1..x_M], lengths, ..., y]``) -> ``(inputs, y)``."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(f"{where}: a batch must be a list [x_1, ..., x_M, y] with inputs and labels, got "
                         f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (list, tuple))
                                                      else ""))
    return list(batch[:-1]), batch[-1]


def batch_inputs(inputs: Sequence[Any], is_packed: bool, input_to_float: bool, device: torch.device,
                 check_inputs: bool, where: str = "a batch") -> List[Any]:
    """The model's input list from a batch's inputs (labels already removed).

    Plain: ``[x_1, ..., x_M]`` -> each cast to float (``input_to_float``), checked for NaN/Inf
    (``check_inputs``) and moved to ``device``. Packed: ``[[x_1..x_M], lengths, ...]`` ->
    ``[[x_1..x_M] prepared as above, lengths]``. ``where`` names the batch in errors.
    """
    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.float() if input_to_float else x
        if check_inputs:
            check_finite(x, f"{where}: an input")
        return x.to(device, non_blocking=True)

    if is_packed:
        return [[prep(x) for x in inputs[0]], inputs[1]]
    return [prep(x) for x in inputs]


def trainable_parameters(modules: Iterable[nn.Module]) -> List[nn.Parameter]:
    """Parameters with ``requires_grad`` of all ``modules``, each once, in order."""
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def check_modules(named: Sequence[Tuple[str, Any]]) -> None:
    """Each ``(name, module)`` must be an ``nn.Module`` without zero-sized parameters (a layer
    of width 0 trains to chance without any torch error)."""
    for name, m in named:
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
        for pname, p in m.named_parameters():
            if p.numel() == 0:
                raise ValueError(f"{name} has a zero-sized parameter {pname!r} of shape {tuple(p.shape)}; "
                                 "every layer width must be >= 1")


def check_loop_modules(encoders: Any, fusion: Any, head: Any = None,
                       additional_optimizing_modules: Any = ()) -> None:
    """``encoders`` a non-empty list of modules, ``fusion`` (and ``head`` unless None) modules,
    ``additional_optimizing_modules`` a list of modules; none with a zero-sized parameter
    (:func:`check_modules`). Raises TypeError / ValueError."""
    if isinstance(encoders, nn.Module) or not isinstance(encoders, Sequence) or not encoders:
        raise TypeError(f"encoders must be a non-empty list of modules (one per modality), got "
                        f"{type(encoders).__name__}")
    extra = additional_optimizing_modules
    if isinstance(extra, nn.Module) or not isinstance(extra, Sequence):
        raise TypeError(f"additional_optimizing_modules must be a list of modules, got {type(extra).__name__}")
    check_modules([(f"encoders[{i}]", e) for i, e in enumerate(encoders)] + [("fusion", fusion)]
                  + ([("head", head)] if head is not None else [])
                  + [(f"additional_optimizing_modules[{i}]", m) for i, m in enumerate(extra)])


def check_loop_args(*, total_epochs: Any, lr: Any, weight_decay: Any, patience: Any, clip_val: Any,
                    optimtype: Any, seed: Any = None, save: Any = None) -> None:
    """The argument rules both loops share (and the benchmark runner applies): ``total_epochs``
    an integer >= 1, ``lr`` > 0 and finite, ``weight_decay`` >= 0 and finite, ``patience`` an
    integer >= 0, ``clip_val`` > 0 and finite, ``optimtype`` callable, ``seed`` None or an
    integer >= 0, ``save`` None or a path. Raises ValueError / TypeError."""
    check_number("total_epochs", total_epochs, 1, integer=True)
    check_number("lr", lr, 0, strict=True)
    check_number("weight_decay", weight_decay, 0)
    check_number("patience", patience, 0, integer=True)
    check_number("clip_val", clip_val, 0, strict=True)
    if not callable(optimtype):
        raise TypeError(f"optimtype must be an optimizer class such as torch.optim.Adam, got {optimtype!r}")
    if seed is not None:
        check_number("seed", seed, 0, integer=True)
    if save is not None and not isinstance(save, (str, os.PathLike)):
        raise TypeError(f"save must be None or a file path, got {type(save).__name__}")


def progress_bar(iterable: Iterable, desc: str, progress: Optional[bool]) -> tqdm:
    """tqdm over ``iterable``; ``progress=None`` shows it only when stderr is a terminal."""
    return tqdm(iterable, desc=desc, disable=None if progress is None else not progress, leave=False)


def mean_seconds(history: Sequence[Dict[str, float]]) -> float:
    """Mean of the ``seconds`` entries of a per-epoch history (NaN when empty)."""
    return sum(h["seconds"] for h in history) / len(history) if history else math.nan


class BestKeeper:
    """Keep the best epoch's weights: in memory for ``model`` and ``extra`` modules, and on disk
    (``model``'s state_dict + JSON config, atomic, via :func:`multizoo_ext.checkpoint.save_checkpoint`)
    as soon as an epoch improves, so a crash or a NaN later loses nothing.

    Args:
        model: the module whose state_dict is checkpointed.
        extra: further modules whose best weights are kept in memory (and restored) too.
        save: checkpoint path, or None for memory only.
        higher_better: True when a larger score is better (accuracy), False for losses.

    Attributes:
        best: best score so far (``-inf`` / ``inf`` before any epoch).
        best_epoch: its epoch (-1 before any).
        checkpoint: the path written, or None (nothing saved yet, or ``save`` None).
    """

    def __init__(self, model: nn.Module, extra: Sequence[nn.Module] = (), save: Optional[PathLike] = None,
                 higher_better: bool = True) -> None:
        self.model, self.extra, self.save = model, list(extra), save
        self.higher_better = higher_better
        self.best = -math.inf if higher_better else math.inf
        self.best_epoch = -1
        self.checkpoint: Optional[str] = None
        self._states: Optional[Tuple[Dict[str, Any], List[Dict[str, Any]]]] = None

    def improves(self, score: float) -> bool:
        """Whether ``score`` beats the best so far (NaN never does)."""
        return score > self.best if self.higher_better else score < self.best

    def update(self, epoch: int, score: float, config: Optional[Dict[str, Any]] = None) -> bool:
        """Record ``epoch``'s ``score``; when it is the best so far, keep the weights and write
        the checkpoint (``config`` plus ``epoch``). Returns whether it improved."""
        if not self.improves(score):
            return False
        self.best, self.best_epoch = score, epoch
        self._states = (copy.deepcopy(self.model.state_dict()), [copy.deepcopy(m.state_dict()) for m in self.extra])
        if self.save is not None:
            save_checkpoint(self.save, self._states[0], {**(config or {}), "epoch": epoch})
            self.checkpoint = str(self.save)
        return True

    def restore(self) -> bool:
        """Load the best weights back into the modules; False when no epoch was recorded."""
        if self._states is None:
            return False
        self.model.load_state_dict(self._states[0])
        for m, sd in zip(self.extra, self._states[1]):
            m.load_state_dict(sd)
        return True

    def describe(self) -> str:
        """One clause for messages: which weights were kept and where."""
        if self.best_epoch < 0:
            return "no epoch had finished, so no weights were kept"
        where = f"saved at {self.checkpoint}" if self.checkpoint else "kept in memory only (save=None)"
        return f"the weights of epoch {self.best_epoch} (best, score {self.best:.6g}) were kept, {where}"


def solver_stats(model: nn.Module, reduce_sum: Optional[Any] = None,
                 reduce_max: Optional[Any] = None) -> Dict[str, float]:
    """Convergence of the equilibrium solvers in ``model`` since the last call (modules with a
    ``convergence_stats(reset=True)`` method, e.g. DEQ fusion), as history entries:
    ``train_solver_converged`` (fraction of samples whose forward solve met its tolerance)
    and ``train_solver_max_residual``; empty without such a module. Resets the counts.

    Args:
        reduce_sum, reduce_max: ``f(*numbers) -> list`` combining the counts of all processes
            (``distributed.all_reduce_sum`` / ``all_reduce_max``); None: this process only.
    """
    stats = [m.convergence_stats(reset=True) for m in model.modules()
             if callable(getattr(m, "convergence_stats", None))]
    if not stats:
        return {}
    samples = float(sum(int(s.get("samples", 0)) for s in stats))
    converged = float(sum(int(s.get("converged", 0)) for s in stats))
    worst = max(float(s.get("max_residual", 0.0)) for s in stats)
    if reduce_sum is not None:
        samples, converged = reduce_sum(samples, converged)
    if reduce_max is not None:
        (worst,) = reduce_max(worst)
    if samples == 0:
        return {}
    return {"train_solver_converged": converged / samples, "train_solver_max_residual": worst}
