"""Multi-Similarity across processes: each process's anchors scored against every process's
embeddings, so a data-parallel run mines its pairs in the whole (global) batch.

With W processes holding ``b_r`` embeddings each (``B = sum b_r``), process ``r`` computes::

    loss_r = (W / B) * sum_{i in r} L_i(E)

where ``E`` (B, D) are all processes' embeddings (this process's own rows keep their graph)
and ``L_i`` is anchor ``i``'s Multi-Similarity loss over the whole batch (its row of the
(B, B) problem: same positives, negatives and mining as in one process). The mean of the
``loss_r`` over processes is the single-process mean loss on the concatenated batch, and
since the gather's backward sums every process's column gradients back to the rows' owner,
DDP's averaging of the gradients (division by W) gives exactly the single-process gradient
(hence the factor W, as pytorch-metric-learning's ``DistributedLossWrapper`` scales).

Outside a process group (or with one process) the loss is the ordinary
:class:`~multizoo_ext.objectives.multisimilarity.MultiSimilarityLoss`.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F

from multizoo_ext.objectives.multisimilarity import (
    _check_hparams, _check_inputs, _multi_similarity_loss, multi_similarity_anchor_losses)
from multizoo_ext.validation import check_finite

__all__ = ["all_gather_with_grad", "gathered_multi_similarity_loss"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(t: Tensor) -> torch.device:
    return t.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _sizes(rows: int, like: Tensor) -> List[int]:
    """Every process's row count (one small all-gather)."""
    size = torch.tensor([rows], dtype=torch.int64, device=_comm_device(like))
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


class _AllGather(torch.autograd.Function):
    """Forward: every process's rows (``counts[r]`` of them, may differ), concatenated in rank
    order. Backward: the gradient of the whole ``(B, ...)`` output summed over processes
    (one all-reduce), this process's rows returned."""

    @staticmethod
    def forward(ctx, local: Tensor, counts: List[int]) -> Tensor:  # type: ignore[override]
        comm = _comm_device(local)
        buf = local.detach().to(comm)
        width = max(counts)
        if buf.shape[0] < width:
            buf = torch.cat([buf, buf.new_zeros((width - buf.shape[0],) + tuple(buf.shape[1:]))])
        parts = [torch.empty_like(buf) for _ in counts]
        dist.all_gather(parts, buf.contiguous())
        ctx.counts, ctx.rank, ctx.device = counts, dist.get_rank(), local.device
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(local.device)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:  # type: ignore[override]
        total = grad.contiguous().to(_comm_device(grad), copy=True)
        dist.all_reduce(total)
        start = sum(ctx.counts[:ctx.rank])
        return total[start:start + ctx.counts[ctx.rank]].to(ctx.device), None


def all_gather_with_grad(local: Tensor) -> Tensor:
    """Concatenate every process's ``(b_r, ...)`` tensor in rank order, ``(sum b_r, ...)``.

    Differentiable: the backward sends each process the sum over processes of the gradients
    of its rows (one all-reduce of the full gradient; every process must run the backward).
    The first dimension may differ between processes. Unchanged outside a process group.
    """
    if not _active():
        return local
    return _AllGather.apply(local, _sizes(local.shape[0], local))


def _share_rect(local: Tensor, every: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, B) 0/1: local sample i shares a label with sample j of the whole batch."""
    if local.dim() == 1 or local.shape[1] == 1:
        return torch.eq(local.reshape(-1, 1), every.reshape(1, -1)).to(dtype)
    hot_l, hot_e = local.bool().to(dtype), every.bool().to(dtype)
    return F.linear(hot_l, hot_e).clamp_max_(1.0)


def gathered_multi_similarity_loss(embeddings: Tensor, labels: Tensor, alpha: float, beta: float,
                                   base: float, epsilon: float, mining: bool = True,
                                   name: str = "MultiSimilarityLoss(gather=True)") -> Tensor:
    """This process's share of the Multi-Similarity loss of the global batch (module docstring).

    Args:
        embeddings: ``(b, D)`` this process's embeddings.
        labels: ``(b,)``/``(b, 1)`` class indices or ``(b, K)`` multi-hot (same K everywhere).
        alpha, beta, base, epsilon, mining: as :class:`MultiSimilarityLoss`.

    Returns:
        Scalar ``W / B * sum of this process's anchor losses``: averaged over processes (as
        DDP averages gradients) it is the single-process loss of the concatenated batch. Outside
        a process group of more than one process: the ordinary loss.
    """
    if not _active():
        return _multi_similarity_loss(embeddings, labels, alpha, beta, base, epsilon, mining, name)
    _check_hparams(alpha, beta, base, epsilon, name)
    _check_inputs(embeddings, labels, name)
    check_finite(embeddings, f"{name} embeddings")
    labels = labels.to(embeddings.device)
    if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
        raise ValueError(f"{name} labels contain NaN/Inf; expected class indices or 0/1 multi-hot")
    if labels.dim() == 2 and labels.shape[1] > 1 and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"{name} expects multi-hot labels (B, K) with values 0/1 only, got other values")
    b, world = embeddings.shape[0], dist.get_world_size()
    counts = _sizes(b, embeddings)
    if embeddings.dtype in (torch.float32, torch.float64):
        # one gather for both: the labels ride as extra columns (class indices and 0/1 are exact)
        dim = embeddings.shape[1]
        packed = torch.cat([embeddings, labels.reshape(b, -1).to(embeddings.dtype)], 1)  # (b, D + K)
        every_packed = _AllGather.apply(packed, counts)  # (B, D + K), own rows with their graph
        every, every_labels = every_packed[:, :dim], every_packed[:, dim:].detach()
    else:
        every = _AllGather.apply(embeddings, counts)  # (B, D), own rows with their graph
        with torch.no_grad():
            every_labels = _AllGather.apply(labels.float() if labels.dtype == torch.bool else labels, counts)
    total, start = sum(counts), sum(counts[:dist.get_rank()])
    sim = F.linear(F.normalize(embeddings, dim=1), F.normalize(every, dim=1))  # (b, B)
    share = _share_rect(labels, every_labels, sim.dtype)  # (b, B)
    self_pair = torch.zeros_like(share)
    idx = torch.arange(b, device=share.device)
    self_pair[idx, idx + start] = 1.0
    pos = share - self_pair  # diagonal pairs (a sample with itself) are neither
    neg = 1.0 - share
    losses = multi_similarity_anchor_losses(sim, pos, neg, alpha=alpha, beta=beta, base=base, epsilon=epsilon,
                                            mining=mining)  # (b,)
    return losses.sum() * (world / total)
