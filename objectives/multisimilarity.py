"""Multi-Similarity loss (Wang et al., "Multi-Similarity Loss with General Pair Weighting
for Deep Metric Learning", CVPR 2019), vectorised, single-label and multi-label.

Embeddings are L2-normalised and ``S`` is their (B, B) cosine-similarity matrix. For an
anchor ``i``, ``P_i`` are the other samples that share its label (multi-label: share at
least one label) and ``N_i`` the samples that share none. With mining (``epsilon``) only
the informative pairs are kept::

    keep j in N_i  if  S_ij + epsilon > min_{k in P_i} S_ik
    keep k in P_i  if  S_ik - epsilon < max_{j in N_i} S_ij

and the loss of anchor ``i`` over the kept pairs is::

    (1/alpha) * log(1 + sum_{k in P_i} exp(-alpha * (S_ik - base)))
  + (1/beta)  * log(1 + sum_{j in N_i} exp( beta  * (S_ij - base)))

Implementation: everything is a masked pass over the (B, B) similarity matrix, no Python
loop over samples or labels. The "+1" is the extra zero logit of a log-sum-exp,
``log(1 + sum exp(x)) = logsumexp([0, x...])``; since cosines are bounded, the logits are
bounded too (at most ``max(alpha (1 + base), beta (1 - base))``, 25 with the defaults), so
it is computed as ``log1p(sum exp(x))`` without a shift (exactly 0 for an anchor without a
kept pair), and with a per-row shift by the largest kept logit only when the scales could
overflow the dtype. Masks are 0/1 float matrices, the mining comparisons are exact (the sign
of a difference), and the backward is written by hand (the gradient of a log-sum-exp is its
softmax weights; the Gram matrix costs one product), which spares most of the matrix passes
autograd's backward would take. It is differentiable once (no double backward).

Names of the hyper-parameters in the three code bases this project meets (MMF's from the
ReFNet reference as described in ``docs/methods.md``):

- positive scale: ours / pytorch-metric-learning ``alpha`` = 2; MMF ``beta`` = 2;
  MultiBench ``scale_pos`` = 0.05.
- negative scale: ours / PML ``beta`` = 50; MMF ``alpha`` = 50 (the names are swapped);
  MultiBench ``scale_neg`` = 0.002.
- offset lambda: ours / PML ``base`` = 0.5; MMF ``base`` = 0.5; MultiBench ``thresh`` = 0.5.
- mining margin: ours ``epsilon`` = 0.1 (PML's ``MultiSimilarityMiner(epsilon)``); MMF
  ``margin`` = 0.1; MultiBench ``margin`` = 0.1.

MultiBench's ``objective_functions.contrast.MultiSimilarityLoss`` (HEAD 49f9be2) differs in
more than the scales, so its numbers are not comparable with ours: it takes multi-hot
labels only and does not normalise the features (``S`` is a raw dot product); it loops in
Python over anchors ``i`` and over each label ``k`` that ``i`` carries, treating every
(anchor, label) as its own anchor whose positives are the samples with label ``k`` (minus
those with ``S >= 1 - 1e-5``, meant to drop the anchor itself) and whose negatives are the
samples without label ``k`` (even if they share another label with ``i``); it skips an
(anchor, label) unless both mined sets are non-empty (the paper keeps the one-sided term),
divides the summed loss by the number of (anchor, label) pairs, raises when a label column
has no negatives (``max`` of an empty tensor), and returns a fresh CPU zero tensor that is
not connected to the graph when nothing was mined. With scales 0.05 / 0.002 its weighting
is almost flat (the log-sum-exp degenerates to a near-linear sum).

Reduction. pytorch-metric-learning's ``MultiSimilarityLoss`` with a
``MultiSimilarityMiner`` computes one loss per anchor row of the (B, B) matrix (rows with no
mined pair give exactly 0) and its default ``MeanReducer`` averages these B values, zero
rows included. We do the same: ``sum_i L_i / B``. The miner's batch-level rule (return no
pairs when the batch has no positive pair or no negative pair at all) falls out of the
per-anchor rule above, because an anchor keeps positives only if it has a negative and vice
versa. One deliberate difference: pytorch-metric-learning returns a zero loss whenever the
mined tuple holds at most one positive pair *and* at most one negative pair (a shortcut of
its ``GenericPairLoss``); we compute the loss of those pairs like any other.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from multizoo_ext.validation import check_finite

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_BASE",
    "DEFAULT_EPSILON",
    "MultiSimilarityLoss",
    "multi_similarity_loss",
    "multi_similarity_anchor_losses",
    "pair_masks",
]

# Defaults in one place (Wang et al. 2019; pytorch-metric-learning and the ReFNet reference
# use the same values). RefinerLoss(kind="ms") imports these.
DEFAULT_ALPHA = 2.0  # positive scale
DEFAULT_BETA = 50.0  # negative scale
DEFAULT_BASE = 0.5  # lambda, the similarity offset
DEFAULT_EPSILON = 0.1  # mining margin
_NORM_EPS = 1e-12  # F.normalize's default eps, so that we match pytorch-metric-learning


def _check_hparams(alpha: float, beta: float, base: float, epsilon: float, name: str) -> None:
    for key, val in (("alpha", alpha), ("beta", beta)):
        if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
            raise ValueError(f"{name}: {key} must be a positive finite number, got {val!r}")
    for key, val in (("base", base), ("epsilon", epsilon)):
        if not (isinstance(val, (int, float)) and math.isfinite(val)):
            raise ValueError(f"{name}: {key} must be a finite number, got {val!r}")


def _check_inputs(embeddings: Tensor, labels: Tensor, name: str) -> None:
    if not isinstance(embeddings, Tensor) or not embeddings.is_floating_point():
        got = embeddings.dtype if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise TypeError(f"{name} expects floating-point embeddings of shape (B, D), got {got}")
    if embeddings.dim() != 2:
        raise ValueError(
            f"{name} expects embeddings of shape (B, D), got shape {tuple(embeddings.shape)}"
        )
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} expects labels as a tensor, got {type(labels).__name__}")
    if labels.dim() not in (1, 2):
        raise ValueError(
            f"{name} expects labels of shape (B,), (B, 1) or multi-hot (B, K), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{name} got {embeddings.shape[0]} embeddings but {labels.shape[0]} labels; "
            "they must match one to one"
        )
    # Finiteness of the embeddings is checked on their row norms (computed anyway, and B
    # values instead of B * D): see _check_norms.


def _check_norms(norm: Tensor, embeddings: Tensor, name: str) -> None:
    """Raise if a row norm is NaN/Inf: NaN/Inf in the embeddings, or values whose norm overflows."""
    if not bool(torch.isfinite(norm).all()):
        check_finite(embeddings, f"{name} embeddings")
        raise ValueError(f"{name} embeddings have rows whose norm overflows {embeddings.dtype}; rescale them")


def _share_matrix(labels: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """(B, B) 0/1 matrix, 1 where two samples share a label (diagonal included), with the
    value checks of the labels."""
    if labels.dim() == 1 or labels.shape[1] == 1:
        if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
            raise ValueError(f"{name} labels contain NaN/Inf; expected class indices or 0/1 multi-hot")
        flat = labels.reshape(-1)
        return (flat[:, None] == flat[None, :]).to(dtype)  # (B, B)
    present = labels if labels.dtype == torch.bool else labels.bool()  # (B, K)
    if present is not labels and not torch.equal(present.to(labels.dtype), labels):
        raise ValueError(f"{name} expects multi-hot labels (B, K) with values 0/1 only, got other values")
    hot = present.to(dtype)  # (B, K)
    return (hot @ hot.T).clamp_max_(1.0)  # (B, B): 1 if at least one common label


def pair_masks(
    labels: Tensor, device: torch.device | None = None, dtype: torch.dtype = torch.bool
) -> Tuple[Tensor, Tensor]:
    """Positive and negative pair masks from class indices or multi-hot labels.

    Args:
        labels: ``(B,)`` or ``(B, 1)`` class indices (a ``(B, 1)`` tensor is always read as
            class indices), or ``(B, K)`` multi-hot with ``K >= 2`` (0/1; a row may be all
            zeros: that sample is a negative of everyone).
        device: where to build the masks. Default: ``labels.device``.
        dtype: ``torch.bool`` (default), or a floating dtype for 0/1 masks.

    Returns:
        ``(pos, neg)``, two ``(B, B)`` tensors. ``pos[i, j]``: ``j != i`` shares a label
        with ``i``; ``neg[i, j]``: ``j != i`` shares no label with ``i``. The diagonal is in
        neither.
    """
    return _pair_masks(labels, device, dtype, "pair_masks")


def _pair_masks(labels: Tensor, device: torch.device | None, dtype: torch.dtype,
                name: str) -> Tuple[Tensor, Tensor]:
    labels = labels.to(device) if device is not None else labels
    share = _share_matrix(labels, torch.float32 if dtype == torch.bool else dtype, name)  # (B, B)
    share.fill_diagonal_(1.0)  # so that the diagonal is no negative (label-less rows too)
    neg = torch.sub(share.new_ones(()), share)  # (B, B)
    share.fill_diagonal_(0.0)
    if dtype == torch.bool:
        return share.bool(), neg.bool()
    return share, neg


def _sentinel(base: float, epsilon: float) -> float:
    # Added to the similarities (cosines, in [-1, 1]) outside a mask before a row min / max:
    # large enough that a row with an empty mask mines nothing and gets a zero shift.
    return 8.0 + 2.0 * (abs(base) + abs(epsilon))


def _needs_shift(alpha: float, beta: float, base: float, columns: int, dtype: torch.dtype) -> bool:
    """Whether ``sum exp(logits)`` could overflow ``dtype`` without a per-row shift.

    With cosines in [-1, 1] no logit exceeds ``max(alpha * (1 + base), beta * (1 - base))``;
    with the defaults that is 25, far from float32's limit of ~88 (float16's is ~11).
    """
    largest = max(alpha * (1.0 + base), beta * (1.0 - base), 0.0) + 0.01 * (alpha + beta)
    return largest + math.log(max(columns, 1)) + 2.0 > math.log(torch.finfo(dtype).max)


class _Constants(NamedTuple):
    one: Tensor  # ()
    pos_offset: Tensor  # (), alpha * base
    neg_offset: Tensor  # (), -beta * base
    inv_alpha: Tensor  # (), 1 / alpha


@functools.lru_cache(maxsize=64)
def _constants(alpha: float, beta: float, base: float, dtype: torch.dtype,
               device: torch.device) -> _Constants:
    """0-dim tensors for the hot path (arithmetic with Python numbers costs a hidden dtype
    copy per op in eager PyTorch; 0-dim tensors of the right dtype and ``alpha=`` do not)."""
    values = torch.tensor([1.0, alpha * base, -beta * base, 1.0 / alpha], dtype=dtype, device=device)
    return _Constants(*values.unbind())


def _ms_forward(sim: Tensor, pos: Tensor, neg: Tensor, alpha: float, beta: float, base: float,
                epsilon: float, mining: bool) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """Per-anchor MS losses, no autograd. sim (R, C); pos, neg float 0/1 masks (R, C).

    Returns the (R,) losses and what :func:`_ms_grad_sim` needs: the kept exponentials and
    the denominators ``1 + sum`` of each side (both scaled by the same factor if shifted).
    """
    shifted = _needs_shift(alpha, beta, base, sim.shape[1], sim.dtype)
    consts = _constants(alpha, beta, base, sim.dtype, sim.device)
    one = consts.one
    if mining or shifted:
        big = _sentinel(base, epsilon)
        min_pos = torch.add(sim, torch.sub(one, pos), alpha=big).amin(dim=1)  # (R,), >= big - 1 if none
        max_neg = torch.add(sim, torch.sub(one, neg), alpha=-big).amax(dim=1)  # (R,), <= 1 - big if none
    if mining:
        # Both rules use the un-mined sets, in the paper's form (S - eps < max_neg,
        # S + eps > min_pos); the sign of a difference is an exact comparison.
        keep_pos = torch.sub(max_neg[:, None], torch.add(sim, one, alpha=-epsilon))
        keep_pos = keep_pos.sign_().clamp_min_(0.0).mul_(pos)  # (R, C) 0/1
        keep_neg = torch.sub(torch.add(sim, one, alpha=epsilon), min_pos[:, None])
        keep_neg = keep_neg.sign_().clamp_min_(0.0).mul_(neg)  # (R, C) 0/1
    else:
        keep_pos, keep_neg = pos, neg
    if not shifted:
        # log(1 + sum exp(x)) = log1p(sum exp(x)): exactly 0 for an anchor without a kept
        # pair, and the logits are bounded (see _needs_shift), so nothing overflows.
        exp_pos = torch.add(consts.pos_offset, sim, alpha=-alpha)  # alpha (base - S)
        exp_pos = exp_pos.exp_().mul_(keep_pos)  # (R, C)
        exp_neg = torch.add(consts.neg_offset, sim, alpha=beta)  # beta (S - base)
        exp_neg = exp_neg.exp_().mul_(keep_neg)  # (R, C)
        sum_pos = exp_pos.sum(dim=1)  # (R,)
        sum_neg = exp_neg.sum(dim=1)  # (R,)
        losses = torch.log1p(sum_pos).mul_(consts.inv_alpha)  # (R,)
        losses = losses.add_(torch.log1p(sum_neg), alpha=1.0 / beta)
        return losses, (exp_pos, exp_neg, sum_pos.add_(one), sum_neg.add_(one))
    # Large scales: shift each row by its largest kept logit, or 0 (the zero logit of the
    # "+1"). These are exact maxima: if any positive is kept, the least similar one
    # (min_pos) is; if any negative is kept, the most similar one (max_neg) is.
    shift_pos = ((base - min_pos) * alpha).clamp_min_(0.0)  # (R,)
    shift_neg = ((max_neg - base) * beta).clamp_min_(0.0)  # (R,)
    # The clamp only touches entries off the mask (kept logits are <= 0): no overflow.
    exp_pos = torch.add((alpha * base - shift_pos)[:, None], sim, alpha=-alpha)
    exp_pos = exp_pos.clamp_max_(0.0).exp_().mul_(keep_pos)  # (R, C)
    exp_neg = torch.add((-beta * base - shift_neg)[:, None], sim, alpha=beta)
    exp_neg = exp_neg.clamp_max_(0.0).exp_().mul_(keep_neg)  # (R, C)
    tot_pos = exp_pos.sum(dim=1).add_(torch.exp(-shift_pos))  # (R,) shifted 1 + sum
    tot_neg = exp_neg.sum(dim=1).add_(torch.exp(-shift_neg))  # (R,)
    losses = (torch.log(tot_pos).add_(shift_pos) / alpha).add_(torch.log(tot_neg).add_(shift_neg) / beta)
    return losses, (exp_pos, exp_neg, tot_pos, tot_neg)


def _ms_grad_sim(grad_losses: Tensor, saved: Tuple[Tensor, ...]) -> Tensor:
    """Gradient of ``sum_r grad_losses[r] * losses[r]`` w.r.t. sim, (R, C).

    The gradient of each log-sum-exp is its softmax weights:
    ``dL_r/dS_rc = exp_neg[r, c] / tot_neg[r] - exp_pos[r, c] / tot_pos[r]``.
    """
    exp_pos, exp_neg, tot_pos, tot_neg = saved
    grad_sim = exp_neg * torch.div(grad_losses, tot_neg)[:, None]  # (R, C)
    return grad_sim.addcmul_(exp_pos, torch.div(grad_losses, tot_pos)[:, None], value=-1.0)


class _AnchorLosses(torch.autograd.Function):
    """Per-anchor MS losses from a similarity matrix, with a hand-written backward.

    The backward is three passes over the (R, C) matrix (the softmax weights of each side),
    where autograd would replay the masked log-sum-exps op by op.
    """

    @staticmethod
    def forward(ctx, sim, pos, neg, alpha, beta, base, epsilon, mining):  # type: ignore[override]
        losses, saved = _ms_forward(sim, pos, neg, alpha, beta, base, epsilon, mining)
        ctx.save_for_backward(*saved)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses):  # type: ignore[override]
        return _ms_grad_sim(grad_losses, ctx.saved_tensors), None, None, None, None, None, None, None


class _MeanMultiSimilarity(torch.autograd.Function):
    """Embeddings (B, D) -> mean MS loss, normalisation and Gram matrix included.

    Same maths as ``F.normalize`` + ``x @ x.T`` + :class:`_AnchorLosses` + ``mean``; the
    backward of the symmetric Gram matrix is one matrix product, ``(G + G^T) x``, where
    autograd would do two.
    """

    @staticmethod
    def forward(ctx, embeddings, pos, neg, alpha, beta, base, epsilon, mining,  # type: ignore[override]
                name):
        norm = torch.linalg.vector_norm(embeddings, dim=1, keepdim=True)  # (B, 1)
        _check_norms(norm, embeddings, name)
        denom = norm.clamp_min(_NORM_EPS)  # as F.normalize
        normed = embeddings / denom  # (B, D)
        sim = normed @ normed.T  # (B, B)
        losses, saved = _ms_forward(sim, pos, neg, alpha, beta, base, epsilon, mining)
        # 1 where the norm was not clamped; clamped rows (norm < eps) are only rescaled, so
        # their backward has no projection term.
        one = _constants(alpha, beta, base, sim.dtype, sim.device).one
        projected = torch.sub(norm, denom).sign_().add_(one)  # (B, 1)
        ctx.save_for_backward(normed, denom, projected, *saved)
        return losses.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):  # type: ignore[override]
        normed, denom, projected, *saved = ctx.saved_tensors
        batch = normed.shape[0]
        grad_sim = _ms_grad_sim(grad_loss.expand(batch), tuple(saved))  # (B, B), 1/B below
        # d(x x^T) -> (G + G^T) x, the mean's 1/B folded into the product.
        grad_normed = torch.addmm(normed, grad_sim + grad_sim.T, normed, beta=0.0, alpha=1.0 / batch)
        radial = torch.linalg.vecdot(normed, grad_normed, dim=1)[:, None].mul_(projected)  # (B, 1)
        grad_emb = torch.addcmul(grad_normed, normed, radial, value=-1.0).div_(denom)  # (B, D)
        return grad_emb, None, None, None, None, None, None, None, None


def multi_similarity_anchor_losses(
    sim: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    base: float = DEFAULT_BASE,
    epsilon: float = DEFAULT_EPSILON,
    mining: bool = True,
) -> Tensor:
    """Per-anchor Multi-Similarity losses from a similarity matrix (the shared machinery).

    Anchors are rows, candidates columns; the matrix may be rectangular (e.g. ReFNet's
    reconstructions against the batch targets). No input checks: callers validate.
    Differentiable once in ``sim`` (no double backward).

    Args:
        sim: ``(R, C)`` cosine similarities (in [-1, 1]: the masking relies on it).
        pos_mask: ``(R, C)`` bool or 0/1 float, candidate ``c`` is a positive of anchor ``r``.
        neg_mask: ``(R, C)`` bool or 0/1 float, candidate ``c`` is a negative of anchor
            ``r``; disjoint from ``pos_mask``.
        alpha, beta, base, epsilon, mining: see :class:`MultiSimilarityLoss`.

    Returns:
        ``(R,)`` loss of each anchor; exactly 0 for an anchor without a kept pair.
    """
    return _AnchorLosses.apply(
        sim, pos_mask.to(sim.dtype), neg_mask.to(sim.dtype), float(alpha), float(beta),
        float(base), float(epsilon), bool(mining),
    )


def multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    base: float = DEFAULT_BASE,
    epsilon: float = DEFAULT_EPSILON,
    mining: bool = True,
) -> Tensor:
    """Functional Multi-Similarity loss; see :class:`MultiSimilarityLoss` for the arguments.

    Example:
        >>> import torch
        >>> emb = torch.randn(8, 16, requires_grad=True)
        >>> loss = multi_similarity_loss(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        >>> loss.backward()
    """
    return _multi_similarity_loss(embeddings, labels, alpha, beta, base, epsilon, mining,
                                  "multi_similarity_loss")


def _multi_similarity_loss(embeddings: Tensor, labels: Tensor, alpha: float, beta: float,
                           base: float, epsilon: float, mining: bool, name: str) -> Tensor:
    _check_hparams(alpha, beta, base, epsilon, name)
    _check_inputs(embeddings, labels, name)
    if embeddings.shape[0] < 2:
        check_finite(embeddings, f"{name} embeddings")
        _share_matrix(labels, embeddings.dtype, name)  # the label checks
        # No pair at all: a zero that keeps the graph (and device, dtype) of the input.
        return embeddings.sum() * 0
    pos, neg = _pair_masks(labels, embeddings.device, embeddings.dtype, name)  # (B, B) each
    return _MeanMultiSimilarity.apply(
        embeddings, pos, neg, float(alpha), float(beta), float(base), float(epsilon), bool(mining), name
    )


class MultiSimilarityLoss(nn.Module):
    """Multi-Similarity loss with its pair mining, for class-index or multi-hot labels.

    Equal (loss and gradient) to pytorch-metric-learning's
    ``losses.MultiSimilarityLoss(alpha, beta, base)`` fed the pairs of
    ``miners.MultiSimilarityMiner(epsilon)`` (``mining=False``: fed all pairs), averaged over
    the B anchors; see the module docstring for the one shortcut of theirs we do not copy
    and for how the names map onto MMF's and MultiBench's.

    Args:
        alpha: scale of the positive term. Default: 2.0 (paper, PML).
        beta: scale of the negative term. Default: 50.0 (paper, PML).
        base: similarity offset lambda. Default: 0.5.
        epsilon: mining margin. Default: 0.1 (PML's ``MultiSimilarityMiner``).
        mining: keep only the informative pairs (module docstring). Default: True.

    Shape:
        - embeddings: ``(B, D)`` floating point, L2-normalised inside.
        - labels: ``(B,)`` or ``(B, 1)`` class indices, or ``(B, K)`` 0/1 multi-hot
          (``K >= 2``; positives share at least one label, negatives share none). Moved to
          the embeddings' device.
        - output: scalar, same device and dtype as ``embeddings``. A batch without a usable
          pair (B = 1, no positives, no negatives) gives exactly 0, still connected to the
          graph, with a zero gradient.

    Raises:
        TypeError: non-tensor or non-float embeddings, non-tensor labels.
        ValueError: wrong shapes, label count mismatch, NaN/Inf, multi-hot values not 0/1,
            non-positive scales.

    Example:
        >>> import torch
        >>> loss_fn = MultiSimilarityLoss()
        >>> emb = torch.randn(6, 32, requires_grad=True)
        >>> genres = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 1, 0],
        ...                        [0, 1, 1], [0, 0, 1], [1, 1, 0]])
        >>> loss_fn(emb, genres).backward()
    """

    def __init__(
        self,
        alpha: float = DEFAULT_ALPHA,
        beta: float = DEFAULT_BETA,
        base: float = DEFAULT_BASE,
        epsilon: float = DEFAULT_EPSILON,
        mining: bool = True,
    ) -> None:
        super().__init__()
        _check_hparams(alpha, beta, base, epsilon, type(self).__name__)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)
        self.epsilon = float(epsilon)
        self.mining = bool(mining)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean Multi-Similarity loss of the batch (scalar)."""
        return _multi_similarity_loss(
            embeddings, labels, self.alpha, self.beta, self.base, self.epsilon, self.mining,
            type(self).__name__,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, base={self.base}, "
            f"epsilon={self.epsilon}, mining={self.mining}"
        )
