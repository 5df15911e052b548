"""Data-parallel training under ``torchrun`` (one process per device, gloo on CPU, NCCL on CUDA).

``train()`` and ``pretrain()`` call into this module when the launcher set ``WORLD_SIZE > 1``;
a single process initialises nothing and runs exactly as before. Launch::

    torchrun --nproc_per_node 2 my_script.py          # or: multizoo-ext train --nproc 2 ...

What changes with W processes (see ``docs/distributed.md``):

- :func:`init_from_env` joins the process group (``env://`` rendezvous from the variables the
  launcher sets); the device of a CUDA run is ``cuda:LOCAL_RANK``.
- :func:`distributed_loader` re-creates each DataLoader with a ``DistributedSampler``: every
  process reads ``1/W`` of the data with the same per-process batch size (so the effective
  batch is ``W`` times larger), the loader's shuffle is kept (the sampler's own seeded order,
  reshuffled by :func:`set_epoch` every epoch).
- :class:`GradientSync` keeps the replicas identical: a plain all-reduce of the gradients after
  ``backward`` (``"allreduce"``, the default), which carries custom and double backwards,
  state kept on modules and parameters that get no gradient, or ``DistributedDataParallel``
  (``"ddp"``; ``MULTIZOO_DDP_STRATEGY=ddp`` makes the loops use it).
- :func:`gather_predictions` all-gathers validation outputs and labels and drops the
  ``DistributedSampler``'s padding duplicates, so metrics equal the single-process figures.
- rank 0 alone logs, shows progress and writes checkpoints (:func:`is_main`, :func:`barrier`).

Equivalence: W processes at per-process batch ``B/W`` with ``shuffle=False`` take the same
steps as one process at batch ``B`` (the sampler deals sample ``i`` to rank ``i mod W``, so the
union of the W first batches is the single process's first batch, and gradients are averaged),
when the dataset size is a multiple of ``B`` and the model has no batch statistics.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from multizoo_ext.training_structures.loop_utils import trainable_parameters

logger = logging.getLogger(__name__)

__all__ = [
    "init_from_env", "is_distributed", "world_size", "rank", "is_main", "barrier", "local_device",
    "distributed_loader", "set_epoch", "is_sharded", "gather_predictions", "all_reduce_sum",
    "broadcast_object", "GradientSync", "wrap_model", "STRATEGIES", "silence_unless_main", "trim_padding",
    "padding_mask", "default_strategy", "run_main_first", "free_local_port",
]

#: Ways to keep the replicas in step (see :class:`GradientSync`).
STRATEGIES = ("ddp", "allreduce")


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ.get('WORLD_SIZE')!r}") from exc


def init_from_env(backend: Optional[str] = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group the launcher described, when ``WORLD_SIZE > 1``.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (``env://``
    rendezvous, as ``torchrun`` sets them). Idempotent: an already initialised group is kept.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ...; default NCCL when CUDA is available, else gloo.
        timeout_s: collective timeout in seconds.

    Returns:
        True when running with more than one process (the group is initialised), False for
        a single process (nothing is initialised).

    Raises:
        ValueError: ``WORLD_SIZE`` is not an integer.
        RuntimeError: ``torch.distributed`` is not available in this build of PyTorch.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if _env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("joined the process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_world_size() > 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def local_device(device: Union[None, str, torch.device] = None) -> torch.device:
    """The device of this process: ``device`` when given, else ``cuda:LOCAL_RANK`` when CUDA
    is available, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def silence_unless_main(log: logging.Logger) -> None:
    """Drop ``log``'s records on every rank but 0 (idempotent)."""
    if is_main() or any(isinstance(f, _DropAll) for f in log.filters):
        return
    log.addFilter(_DropAll())


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        return False


# --- data ---------------------------------------------------------------------------------
def distributed_loader(loader: DataLoader, seed: int = 0, num_replicas: Optional[int] = None,
                       rank_: Optional[int] = None) -> DataLoader:
    """Re-create ``loader`` with a ``DistributedSampler``: this process reads its share.

    Same dataset, per-process batch size, ``drop_last``, collate function, workers and
    pinning; shuffled iff ``loader`` shuffles (a ``RandomSampler``), with the sampler's own
    order seeded by ``seed`` (call :func:`set_epoch` at each epoch). A loader already holding a
    ``DistributedSampler`` is returned unchanged. The sampler pads the dataset to a multiple of
    W by repeating its first samples (:func:`gather_predictions` drops them again).

    Args:
        loader: a map-style DataLoader with a batch size.
        seed: seed of the sampler's shuffle (the same on every process).
        num_replicas, rank_: override the process group's world size and rank.

    Raises:
        TypeError: not a DataLoader, or an IterableDataset (cannot be sharded by index).
        ValueError: a custom sampler or batch sampler (only sequential or random ones can be
            re-created faithfully).
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"distributed_loader expects a torch DataLoader, got {type(loader).__name__}")
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError("distributed_loader cannot shard an IterableDataset by index; shard it in the dataset "
                        "itself (by torch.distributed.get_rank()) and pass it unchanged")
    if loader.batch_size is None:
        raise ValueError("distributed_loader needs a DataLoader built with batch_size, got one with a custom "
                         f"batch_sampler ({type(loader.batch_sampler).__name__})")
    if isinstance(loader.sampler, RandomSampler):
        shuffle = True
    elif isinstance(loader.sampler, SequentialSampler):
        shuffle = False
    else:
        raise ValueError("distributed_loader re-creates sequential or shuffled DataLoaders only, got a "
                         f"{type(loader.sampler).__name__}; build a DistributedSampler for it yourself")
    sampler = DistributedSampler(loader.dataset, num_replicas=num_replicas, rank=rank_, shuffle=shuffle,
                                 seed=seed, drop_last=False)
    kwargs: dict = dict(batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn)
    if loader.num_workers > 0:
        kwargs.update(multiprocessing_context=loader.multiprocessing_context,
                      persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)
    return DataLoader(loader.dataset, **kwargs)


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell ``loader``'s ``DistributedSampler`` (if any) the epoch, so shuffles differ per epoch."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def is_sharded(loader: Any) -> bool:
    """True when ``loader`` reads one process's share (a ``DistributedSampler`` in a group)."""
    return is_distributed() and isinstance(getattr(loader, "sampler", None), DistributedSampler)


def padding_mask(loader: DataLoader) -> Optional[torch.Tensor]:
    """``(num_samples,)`` bool, True for this process's samples that are padding duplicates
    (positions past the dataset's end in the sampler's padded index list), or None when the
    sampler pads nothing."""
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler) or sampler.total_size == len(sampler.dataset):
        return None
    positions = torch.arange(sampler.rank, sampler.total_size, sampler.num_replicas)  # (num_samples,)
    return positions >= len(sampler.dataset)


def trim_padding(loader: DataLoader, seen: int, *rows: torch.Tensor) -> Tuple[int, Tuple[torch.Tensor, ...]]:
    """Drop from a batch the rows that are the sampler's padding duplicates.

    Args:
        loader: the sharded loader the batch came from.
        seen: samples this process had read before this batch.
        rows: tensors whose first dimension is the batch.

    Returns:
        ``(count, rows)``: the number of real (non-padding) rows and ``rows`` without the
        padding rows. A batch of padding only comes back whole with ``count`` 0, so that an
        objective that communicates (e.g. a gathered Multi-Similarity) is still called on
        every process; weight its loss by ``count``.
    """
    b = rows[0].shape[0]
    mask = padding_mask(loader)
    if mask is None:
        return b, rows
    pad = mask[seen:seen + b]
    if not bool(pad.any()):
        return b, rows
    keep = (~pad).nonzero().squeeze(1)
    if keep.numel() == 0:
        return 0, rows
    return int(keep.numel()), tuple(r[keep.to(r.device)] for r in rows)


def default_strategy() -> str:
    """The gradient synchronisation ``train()`` and ``pretrain()`` use: the environment
    variable ``MULTIZOO_DDP_STRATEGY`` (one of :data:`STRATEGIES`), default ``"allreduce"``."""
    value = os.environ.get("MULTIZOO_DDP_STRATEGY", "allreduce")
    if value not in STRATEGIES:
        raise ValueError(f"MULTIZOO_DDP_STRATEGY must be one of {STRATEGIES}, got {value!r}")
    return value


# --- collectives ----------------------------------------------------------------------------
def all_reduce_sum(*values: float, device: Union[None, str, torch.device] = None) -> List[float]:
    """Sum Python numbers over the processes (one collective); unchanged in a single process."""
    if not is_distributed():
        return [float(v) for v in values]
    buf = torch.tensor(values, dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(buf)
    return buf.tolist()


def all_reduce_max(*values: float, device: Union[None, str, torch.device] = None) -> List[float]:
    """Maximum of Python numbers over the processes (one collective); unchanged in a single process."""
    if not is_distributed():
        return [float(v) for v in values]
    buf = torch.tensor(values, dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (picklable objects; unchanged in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device(device: Union[None, str, torch.device] = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return local_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_rows(t: torch.Tensor) -> List[torch.Tensor]:
    """All-gather tensors whose first dimension may differ between processes."""
    comm = _comm_device()
    local = t.to(comm)
    sizes = torch.tensor([local.shape[0]], dtype=torch.int64, device=comm)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    width = max(counts)
    if local.shape[0] < width:
        local = torch.cat([local, local.new_zeros((width - local.shape[0],) + tuple(local.shape[1:]))])
    parts = [torch.empty_like(local) for _ in counts]
    dist.all_gather(parts, local.contiguous())
    return [p[:c] for p, c in zip(parts, counts)]


def gather_predictions(outputs: torch.Tensor, labels: torch.Tensor, loader: Optional[DataLoader] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """All processes' predictions and labels, in dataset order, without padding duplicates.

    Args:
        outputs: ``(n_r, ...)`` this process's outputs, in the order its loader yielded them.
        labels: ``(n_r, ...)`` the matching labels.
        loader: the sharded loader they came from: with it, the rows are put back in the
            sampler's order (dataset order when it does not shuffle) and the padding rows are
            dropped, so the result is the single process's ``(N, ...)``. Without it, the
            parts are concatenated rank by rank.

    Returns:
        ``(outputs, labels)`` on the CPU (unchanged in a single process).
    """
    if not is_distributed():
        return outputs, labels
    outs, labs = _gather_rows(outputs.detach()), _gather_rows(labels.detach())
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler) and all(o.shape[0] == sampler.num_samples for o in outs):
        # Rank r holds positions r, r + W, r + 2W, ... of the padded index list: interleave,
        # and the padding sits at its end.
        n = len(sampler.dataset)
        out = torch.stack([o.cpu() for o in outs], 1).flatten(0, 1)[:n]
        lab = torch.stack([y.cpu() for y in labs], 1).flatten(0, 1)[:n]
        return out, lab
    return torch.cat([o.cpu() for o in outs]), torch.cat([y.cpu() for y in labs])


# --- keeping the replicas in step -----------------------------------------------------------
def _all_reduce_mean_grads(params: Sequence[nn.Parameter]) -> None:
    """Average ``.grad`` over processes in one flat all-reduce. A parameter whose gradient is
    None on every process stays None; on some only, it counts as zero there (as in one process
    holding the whole batch)."""
    if not params:
        return
    ref = params[0]
    flat_parts = []
    for p in params:
        g = p.grad
        flat_parts.append(g.reshape(-1) if g is not None else ref.new_zeros(p.numel(), dtype=p.dtype))
    flags = torch.tensor([p.grad is not None for p in params], dtype=flat_parts[0].dtype, device=ref.device)
    flat = torch.cat(flat_parts + [flags])
    comm = _comm_device()
    buf = flat.to(comm)
    dist.all_reduce(buf)
    buf = buf.to(ref.device).div_(world_size())
    offset = 0
    present = buf[-len(params):].tolist()  # one host copy
    for i, p in enumerate(params):
        k = p.numel()
        if present[i] > 0:
            g = buf[offset:offset + k].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += k


def _broadcast_state(module: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    tensors = list(module.buffers()) if buffers_only else list(module.parameters()) + list(module.buffers())
    for t in tensors:
        if t.numel() == 0:
            continue
        comm = _comm_device()
        buf = t.detach().to(comm)
        dist.broadcast(buf, src)
        if buf.data_ptr() != t.data_ptr():
            with torch.no_grad():
                t.copy_(buf)


class GradientSync:
    """Keeps W replicas of a model (and of extra modules an objective uses) identical.

    ``strategy=None`` takes :func:`default_strategy` (``"allreduce"`` unless the environment
    variable ``MULTIZOO_DDP_STRATEGY`` says otherwise).

    ``strategy="ddp"``: ``model`` is wrapped in ``DistributedDataParallel``
    (``find_unused_parameters=False``: every parameter must get a gradient each step, as
    DDP's reducer expects); the parameters of ``extra`` modules outside ``model`` are averaged
    after ``backward`` by :meth:`after_backward`.

    ``strategy="allreduce"``: no wrapper; :meth:`after_backward` averages every gradient in
    one flat all-reduce. This is DDP's arithmetic without its reducer, so it also carries
    a double backward (DEQ's Jacobian penalty), objectives that read state a module kept
    from its forward, and parameters that get no gradient on some steps; it overlaps no
    communication with the backward (irrelevant for models that fit in one DDP bucket).

    Both start from rank 0's weights (broadcast at construction) and average gradients, so
    a step of W processes equals one process's step on the union of their batches.

    Attributes:
        forward_module: call this for the training forward (the DDP wrapper, or ``model``).
        model: the plain module (state dicts, evaluation, objectives' ``args['model']``).
    """

    def __init__(self, model: nn.Module, extra: Sequence[nn.Module] = (), strategy: Optional[str] = None,
                 device: Union[None, str, torch.device] = None) -> None:
        strategy = default_strategy() if strategy is None else strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not is_distributed():
            raise RuntimeError("GradientSync needs an initialised process group of more than one process; "
                               "call init_from_env() under torchrun first")
        self.model = model
        self.strategy = strategy
        _broadcast_state(model)
        for m in extra:
            _broadcast_state(m)
        in_model = {id(p) for p in model.parameters()}
        extra_params = [p for p in trainable_parameters(extra) if id(p) not in in_model]
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            dev = torch.device(device) if device is not None else next(model.parameters()).device
            ids = [dev] if dev.type == "cuda" else None
            self.forward_module: nn.Module = DistributedDataParallel(model, device_ids=ids)
            self._synced = extra_params
        else:
            self.forward_module = model
            self._synced = trainable_parameters([model]) + extra_params

    def after_backward(self) -> None:
        """Average the gradients DDP does not (all of them with ``"allreduce"``). Call after
        ``loss.backward()`` and before clipping / ``optimizer.step()``."""
        _all_reduce_mean_grads(self._synced)

    def sync_buffers(self) -> None:
        """Copy rank 0's buffers (e.g. BatchNorm statistics) to every process (before evaluating)."""
        if self.strategy == "allreduce":
            _broadcast_state(self.model, buffers_only=True)


def wrap_model(model: nn.Module, extra: Sequence[nn.Module] = (), strategy: Optional[str] = None,
               device: Union[None, str, torch.device] = None) -> GradientSync:
    """Shorthand for :class:`GradientSync` ``(model, extra, strategy, device)``."""
    return GradientSync(model, extra, strategy, device)


def free_local_port() -> int:
    """A TCP port free on the loopback interface now (for ``MASTER_PORT`` of a local launch)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_main_first(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only (e.g. write a file), then wait for every process; returns
    ``fn()``'s value on rank 0 and None elsewhere."""
    out = fn() if is_main() else None
    barrier()
    return out
