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
loop over samples or labels, and every pass treats both sides at once: the positive and
negative sides are stacked on a leading axis of 2 (``x = sign * S + penalties`` is ``-S`` on
the positives, ``S`` on the negatives and far below both elsewhere, so one row max gives
``-min_pos`` and ``max_neg``). The "+1" is the extra zero logit of a log-sum-exp,
``log(1 + sum exp(x)) = logsumexp([0, x...])``; since cosines are bounded, the logits are
bounded too (at most ``max(alpha (1 + base), beta (1 - base))``, 25 with the defaults), so
it is computed as ``log1p(sum exp(x))`` without a shift (exactly 0 for an anchor without a
kept pair), and with a per-row shift by the largest kept logit only when the scales could
overflow the dtype. Where it is exact (the defaults), each entry's logit comes from per-entry
coefficients built with the masks, so ``exp`` runs once per pair rather than once per side.
Masks and mining decisions are 0/1 float tensors (bool tensors, ``where`` and ``masked_fill``
are several times slower on the CPU), the mining comparisons are exact (the same rounded
values as pytorch-metric-learning's miner), and the backward is written by hand (the
gradient of a log-sum-exp is its softmax weights, formed in the forward; the Gram matrix
costs one product), which spares most of the matrix passes autograd's backward would take.
It is differentiable once (no double backward). The hot path is about 30 eager ops; most
constants are cached per setting and batch size (see ``_Config``). A CPU float32 batch whose
settings need no overflow shift (the defaults) goes instead through the C kernels of
:mod:`.multisimilarity_native` (compiled on first use; same maths and mining comparisons, two
BLAS products plus three kernel calls per forward + backward) when a C compiler is there;
everything else (GPU, float64, half types, large scales, no compiler) takes the eager path.

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
from typing import Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from multizoo_ext import native
from multizoo_ext.objectives import multisimilarity_native
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
    # values instead of B * D): see _norm_range.


def _norm_range(norm: Tensor, embeddings: Tensor, name: str) -> Tuple[float, float]:
    """Smallest and largest row norm (one reduction); raises if a norm is NaN/Inf (NaN/Inf
    in the embeddings, or values whose norm overflows)."""
    low, high = torch.aminmax(norm)  # both NaN if any is
    low, high = torch.stack((low, high)).tolist()
    if not math.isfinite(high):
        check_finite(embeddings, f"{name} embeddings")
        raise ValueError(f"{name} embeddings have rows whose norm overflows {embeddings.dtype}; rescale them")
    return low, high


def _share_matrix(labels: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """(B, B) 0/1 matrix, 1 where two samples share a label (diagonal included), with the
    value checks of the labels."""
    if labels.dim() == 1 or labels.shape[1] == 1:
        if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
            raise ValueError(f"{name} labels contain NaN/Inf; expected class indices or 0/1 multi-hot")
        flat = labels.reshape(-1) if labels.dim() == 2 else labels
        # eq writing 0/1 straight into a float matrix: about twice as fast as a bool matrix
        # and a cast.
        share = torch.empty(flat.shape[0], flat.shape[0], dtype=dtype, device=labels.device)
        return torch.eq(flat.unsqueeze(1), flat, out=share)  # (B, B)
    present = labels if labels.dtype == torch.bool else labels.bool()  # (B, K)
    if present is not labels and not torch.equal(present.to(labels.dtype), labels):
        raise ValueError(f"{name} expects multi-hot labels (B, K) with values 0/1 only, got other values")
    hot = present.to(dtype)  # (B, K)
    return F.linear(hot, hot).clamp_max_(1.0)  # (B, B) = hot @ hot.T: 1 if at least one common label


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
    labels = labels.to(device) if device is not None else labels
    share = _share_matrix(labels, torch.float32 if dtype == torch.bool else dtype, "pair_masks")  # (B, B)
    share.fill_diagonal_(1.0)  # so that the diagonal is no negative (label-less rows too)
    neg = torch.sub(share.new_ones(()), share)  # (B, B)
    share.fill_diagonal_(0.0)
    if dtype == torch.bool:
        return share.bool(), neg.bool()
    return share, neg


def _sentinel(base: float, epsilon: float) -> float:
    # Subtracted from the similarities (cosines, in [-1, 1]) outside a mask before a row
    # min / max: large enough that a row with an empty mask mines nothing and gets a zero
    # shift, and that an entry outside the mask never passes a mining test.
    return 8.0 + 2.0 * (abs(base) + abs(epsilon))


@functools.lru_cache(maxsize=64)
def _needs_shift(alpha: float, beta: float, base: float, columns: int, dtype: torch.dtype) -> bool:
    """Whether ``sum exp(logits)`` could overflow ``dtype`` without a per-row shift.

    With cosines in [-1, 1] no logit exceeds ``max(alpha * (1 + base), beta * (1 - base))``;
    with the defaults that is 25, far from float32's limit of ~88 (float16's is ~11).
    """
    largest = max(alpha * (1.0 + base), beta * (1.0 - base), 0.0) + 0.01 * (alpha + beta)
    return largest + math.log(max(columns, 1)) + 2.0 > math.log(torch.finfo(dtype).max)


def _logit_floor(alpha: float, beta: float, base: float, dtype: torch.dtype, shifted: bool) -> float | None:
    """Lower clamp of the logits before ``exp``, or None where no logit can go below it.

    The floor is a little above the log of the smallest normal number (of float32 for the
    half types, which are computed in float32): arguments whose ``exp`` is subnormal or 0
    take a slow path in the vectorised ``exp`` of many CPUs (10-50x). A clamped entry adds at
    most ``exp(floor)`` (1e-37 in float32) to a sum that is at least 1 or a shifted maximum,
    or is masked out. Unshifted logits are at least ``min(alpha (base - 1), -beta (1 +
    base))`` (-75 with the defaults): then no clamp is needed.
    """
    floor = math.log(torch.finfo(dtype if dtype == torch.float64 else torch.float32).tiny) + 2.0
    lowest = min(alpha * (base - 1.0), -beta * (1.0 + base)) - 0.01 * (alpha + beta)
    return floor if shifted or lowest <= floor else None


class _Config:
    """Constants of the hot path for one setting and matrix shape (R, C).

    The positive and negative sides are stacked on a leading axis of 2 (index 0: positives,
    1: negatives). Arithmetic with Python numbers costs a hidden dtype copy per op in eager
    PyTorch, 0-dim tensors of the right dtype do not; an op whose first operand is a small
    broadcast tensor misses the vectorised loop, hence the materialised (k, R, C) constants.
    """

    __slots__ = ("sign", "scale", "offset", "scaled_sign", "offset_full", "label_slope", "label_base",
                 "combined", "inv_scale", "inv_full", "grad_sign", "neg_epsilon", "one", "zero", "big",
                 "shifted", "floor")

    def __init__(self, alpha: float, beta: float, base: float, epsilon: float, rows: int, cols: int,
                 count: int, dtype: torch.dtype, device: torch.device, diagonal: bool, combine: bool) -> None:
        big = _sentinel(base, epsilon)
        self.shifted = _needs_shift(alpha, beta, base, cols, dtype)
        self.floor = _logit_floor(alpha, beta, base, dtype, self.shifted)
        # Per-entry logit coefficients from the share matrix s in one affine op, c = s *
        # (-alpha - beta) + beta and d = s * (alpha base + beta base) - beta base, are only
        # used where they come out exact in this dtype (they do for the defaults), so that the
        # logits are bitwise those of the two-sided path.
        coef = torch.tensor([-alpha, beta, alpha * base, -beta * base], dtype=dtype)
        c_slope, d_slope = coef[0] - coef[1], coef[2] - coef[3]
        self.combined = (combine and not self.shifted and bool(c_slope + coef[1] == coef[0])
                         and bool(d_slope + coef[3] == coef[2]))
        table = [[-1.0, 1.0, 0.0, 0.0], [alpha, beta, 0.0, 0.0], [alpha * base, -beta * base, 0.0, 0.0],
                 [-alpha, beta, 0.0, 0.0], [big, -big, float(c_slope), float(d_slope)],
                 [-big, 0.0, beta, -beta * base], [1.0 / (alpha * count), 1.0 / (beta * count), 0.0, 0.0],
                 [-1.0 / count, 1.0 / count, -epsilon, 1.0]]
        values = torch.tensor(table, dtype=dtype, device=device)[:, :, None, None]  # (8, 4, 1, 1)
        self.sign = values[0, :2]  # (2, 1, 1): -1, +1; x = sign * S (+ penalties)
        self.scale = values[1, :2]  # (2, 1, 1): alpha, beta
        self.offset = values[2, :2]  # (2, 1, 1): alpha * base, -beta * base; logits = scale * x + offset
        self.scaled_sign = values[3, :2]  # (2, 1, 1): -alpha, beta; logits = scaled_sign * S + offset
        self.offset_full = None if self.combined else values[2, :2].expand(2, rows, cols).contiguous()
        # labels = label_base + share * label_slope, (k, R, C): the penalties (k = 0, 1: 0 on
        # the mask, <= -big off it, and off the diagonal of a batch against itself), then if
        # combined the logit coefficients c and d.
        k = 4 if self.combined else 2
        self.label_slope = values[4, :k]  # (k, 1, 1)
        self.label_base = values[5, :k].expand(k, rows, cols).contiguous()  # (k, R, C)
        if diagonal:
            self.label_base[:2].diagonal(0, 1, 2).sub_(big)
        self.inv_scale = values[6, :2]  # (2, 1, 1): 1 / (alpha * count), 1 / (beta * count)
        self.inv_full = values[6, :2].expand(2, rows, 1).reshape(-1)  # (2 R,)
        self.grad_sign = values[7, :2]  # (2, 1, 1): -1 / count, +1 / count
        self.neg_epsilon = values[7, 2, 0, 0]  # ()
        self.one = values[7, 3, 0, 0]  # ()
        self.zero = values[0, 2, 0, 0]  # ()
        self.big = big


@functools.lru_cache(maxsize=8)
def _config(alpha: float, beta: float, base: float, epsilon: float, rows: int, cols: int, count: int,
            dtype: torch.dtype, device: torch.device, diagonal: bool, combine: bool) -> _Config:
    """Cached :class:`_Config`; ``count`` is the number of anchors averaged over (1:
    per-anchor losses), ``diagonal`` whether the diagonal pairs are excluded (a batch against
    itself), ``combine`` whether the logits may be one matrix (labels from
    :func:`_label_terms`)."""
    return _Config(alpha, beta, base, epsilon, rows, cols, count, dtype, device, diagonal, combine)


def _label_terms(share: Tensor, cfg: _Config) -> Tensor:
    """(k, R, C) from a 0/1 share matrix (R, C), k = 2 or 4: index 0 is 0 where the pair
    shares a label (a positive) and ``<= -big`` elsewhere, index 1 is 0 where it shares none
    (a negative) and ``<= -big`` elsewhere (both ``<= -big`` on the diagonal of a batch
    against itself; exact, ``big * 1 - big`` is 0); if ``cfg.combined``, indices 2 and 3 are
    the logit coefficients: ``logit = c * S + d``."""
    return torch.addcmul(cfg.label_base, share, cfg.label_slope)


def _ms_terms(sim: Tensor, labels: Tensor, cfg: _Config, mining: bool,
              weights: bool) -> Tuple[Tensor, Tensor | None]:
    """Both log-sum-exps of every anchor, no autograd. sim (R, C), labels (k, R, C) from
    :func:`_label_terms` (overwritten).

    Every step is one op over both sides: ``x = sign * S + penalties`` is ``-S`` on the
    positives and ``S`` on the negatives (exactly), at most ``1 - big`` elsewhere, so that one
    row max gives ``-min_pos`` and ``max_neg``; the logits ``alpha (base - S)`` and ``beta (S
    - base)`` are computed on every entry (one matrix if combined: each entry's side is known,
    and the sides are disjoint) and the entries not kept are multiplied by 0.

    Returns:
        ``terms`` (2, R, 1): ``log(1 + sum exp(logits))`` over the kept pairs of each side;
        with ``weights``, the gradient of ``sum_r (terms[0, r] / alpha + terms[1, r] / beta)
        / count`` w.r.t. S on each side (2, R, C): the softmax weights ``exp / (1 + sum)``
        of the kept pairs (0 elsewhere), times ``-1 / count`` (positives) or ``1 / count``.
    """
    if cfg.combined:
        # slices (views) rather than Tensor.split, whose Python wrapper costs more than this op
        pen, c, d = labels[:2], labels[2:3], labels[3:]  # (2, R, C), (1, R, C), (1, R, C)
    else:
        pen = labels
    if not mining:
        mask = pen.eq(cfg.zero)  # (2, R, C), before pen is overwritten
    if mining or cfg.shifted:
        x = pen.addcmul_(sim, cfg.sign)  # (2, R, C)
        top = x.amax(dim=2, keepdim=True)  # (2, R, 1): -min_pos, max_neg (<= 1 - big if none)
    if cfg.shifted:
        # Large scales: shift each row by its largest logit over the mask, or 0 (the zero
        # logit of the "+1"). If any pair of a side is kept, its most extreme one (min_pos or
        # max_neg) is, so this is the kept maximum then. The logits come from x here, so
        # that the entries off the mask (whose other-side logits could overflow) are very
        # negative too, and all are <= 0.
        shift = torch.mul(top, cfg.scale).add_(cfg.offset).clamp_min_(0.0)  # (2, R, 1)
        logits = torch.mul(x, cfg.scale).add_(torch.sub(cfg.offset, shift))  # (2, R, C)
    elif cfg.combined:
        logits = torch.addcmul(d, sim, c)  # (1, R, C): alpha (base - S) or beta (S - base)
    else:
        logits = torch.addcmul(cfg.offset_full, sim, cfg.scaled_sign)  # (2, R, C): both
    if cfg.floor is not None:
        logits.clamp_min_(cfg.floor)
    exp = logits.exp_()
    if mining:
        # Keep a positive if S - eps < max_neg and a negative if S + eps > min_pos (the
        # paper's rules on the un-mined sets), i.e. -(x + eps) < (the other side's top): a
        # comparison of the same rounded values as pytorch-metric-learning's miner. Entries
        # off the masks never pass (x + eps < -1 there), nor any of a row whose other side is
        # empty (its top is <= 1 - big).
        kept = torch.sub(cfg.neg_epsilon, x, out=x).lt_(top.flip(0)).mul_(exp)  # (2, R, C)
    else:
        kept = torch.mul(mask, exp)  # (2, R, C), on the masks
    sums = kept.sum(dim=2, keepdim=True)  # (2, R, 1)
    if cfg.shifted:
        empty = sums.eq(0)  # no kept pair: exactly 0, as log1p gives below (not log(e^-s) + s)
        tot = sums.add_(torch.exp(-shift))
        terms = torch.log(tot).add_(shift).masked_fill_(empty, 0.0)
        tot.masked_fill_(empty, 1.0)  # exp(-shift) may underflow (half types): no 0 / 0 in the weights
    else:
        # log(1 + sum exp(x)) = log1p(sum exp(x)): exactly 0 for an anchor without a kept
        # pair, and the logits are bounded (see _needs_shift), so nothing overflows.
        terms = torch.log1p(sums)
        tot = sums.add_(cfg.one)
    # The gradient of a log-sum-exp is its softmax weights:
    # dL_r/dS_rc = exp_neg[r, c] / tot_neg[r] - exp_pos[r, c] / tot_pos[r].
    return terms, kept.mul_(torch.div(cfg.grad_sign, tot)) if weights else None


class _AnchorLosses(torch.autograd.Function):
    """Per-anchor MS losses from a similarity matrix, with a hand-written backward (the
    softmax weights of each side, computed in the forward), where autograd would replay the
    masked log-sum-exps op by op."""

    @staticmethod
    def forward(ctx, sim, pos, neg, alpha, beta, base, epsilon, mining):  # type: ignore[override]
        rows, cols = sim.shape
        # (Not combined: from given masks, the logit coefficients would cost more ops.)
        cfg = _config(alpha, beta, base, epsilon, rows, cols, 1, sim.dtype, sim.device, False, False)
        pen = torch.stack((pos, neg)).sub_(cfg.one).mul_(cfg.big)  # (2, R, C): 0 on the mask, -big off it
        terms, weights = _ms_terms(sim, pen, cfg, mining, ctx.needs_input_grad[0])
        ctx.save_for_backward(weights)
        return torch.mul(terms, cfg.inv_scale).sum(dim=0).view(rows)  # (R,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses):  # type: ignore[override]
        (weights,) = ctx.saved_tensors
        grad_sim = torch.mul(weights, grad_losses[:, None]).sum(dim=0)  # (R, C)
        return grad_sim, None, None, None, None, None, None, None


class _MeanMultiSimilarity(torch.autograd.Function):
    """Embeddings (B, D) -> mean MS loss, normalisation and Gram matrix included.

    Same maths as ``F.normalize`` + ``x @ x.T`` + :class:`_AnchorLosses` + ``mean``; the
    backward of the symmetric Gram matrix is one matrix product, ``(G + G^T) x``, where
    autograd would do two.
    """

    @staticmethod
    def forward(ctx, embeddings, labels, cfg, mining, name):  # type: ignore[override]
        norm = torch.linalg.vector_norm(embeddings, dim=1, keepdim=True)  # (B, 1)
        low, _ = _norm_range(norm, embeddings, name)
        # As F.normalize: norms below eps are clamped (those rows are only rescaled, so their
        # backward has no projection term).
        eps = max(_NORM_EPS, torch.finfo(embeddings.dtype).tiny)  # representable in the half types
        clamped = low < eps
        denom = norm.clamp_min(eps) if clamped else norm
        normed = embeddings / denom  # (B, D)
        sim = F.linear(normed, normed)  # (B, B) = normed @ normed.T
        terms, weights = _ms_terms(sim, labels, cfg, mining, ctx.needs_input_grad[0])
        if clamped:
            ctx.projected = norm == denom  # (B, 1)
        ctx.clamped = clamped
        ctx.save_for_backward(normed, denom, weights)
        return torch.dot(terms.view(-1), cfg.inv_full)  # the mean over the B anchors

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):  # type: ignore[override]
        normed, denom, weights = ctx.saved_tensors
        grad_sim = torch.add(weights[0], weights[1])  # (B, B), the 1/B included
        # d(x x^T) -> (G + G^T) x.
        grad_normed = torch.mm(grad_sim + grad_sim.T, normed)  # (B, D)
        radial = torch.mul(normed, grad_normed).sum(dim=1, keepdim=True)  # (B, 1)
        if ctx.clamped:
            radial.mul_(ctx.projected)
        grad_emb = grad_normed.addcmul_(normed, radial, value=-1.0)  # (B, D)
        return grad_emb.mul_(torch.div(grad_loss, denom)), None, None, None, None


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
    batch, dtype, device = embeddings.shape[0], embeddings.dtype, embeddings.device
    if (dtype == torch.float32 and device.type == "cpu" and native.enabled()
            and not _needs_shift(alpha, beta, base, batch, dtype)):
        loss = _native_loss(embeddings, labels, float(alpha), float(beta), float(base), float(epsilon),
                            bool(mining), name)
        if loss is not None:
            return loss
    cfg = _config(float(alpha), float(beta), float(base), float(epsilon), batch, batch, batch, dtype, device,
                  True, True)
    if labels.device != device:
        labels = labels.to(device)
    terms = _label_terms(_share_matrix(labels, dtype, name), cfg)  # (k, B, B), after the label checks
    return _MeanMultiSimilarity.apply(embeddings, terms, cfg, bool(mining), name)


def _native_loss(embeddings: Tensor, labels: Tensor, alpha: float, beta: float, base: float, epsilon: float,
                 mining: bool, name: str) -> Tensor | None:
    """The CPU float32 loss through the C kernels (:mod:`.multisimilarity_native`), or None
    where they are not available. Integer class indices go in as they are, integer or bool
    multi-hot labels with up to 64 columns as bit masks, other labels (float) as the 0/1
    share matrix; the label checks are those of the eager path."""
    if not multisimilarity_native.available():
        return None
    if labels.device != embeddings.device:
        labels = labels.to(embeddings.device)
    single = labels.dim() == 1 or labels.shape[1] == 1
    if single and not labels.is_floating_point():
        key, mode = labels, 0  # (B,)
        if labels.dim() != 1 or labels.dtype != torch.int64 or not labels.is_contiguous():
            key = labels.reshape(-1).to(torch.int64).contiguous()
    elif (not single and not labels.is_floating_point()
          and labels.shape[1] <= multisimilarity_native.MULTIHOT_MAX_LABELS):
        key, mode = multisimilarity_native.pack_multihot(labels), 2  # (B,)
        if key is None:
            raise ValueError(f"{name} expects multi-hot labels (B, K) with values 0/1 only, got other values")
    else:
        key, mode = _share_matrix(labels, torch.float32, name).contiguous(), 1  # (B, B)

    def on_bad() -> None:
        check_finite(embeddings, f"{name} embeddings")
        raise ValueError(f"{name} embeddings have rows whose norm overflows {embeddings.dtype}; rescale them")

    return multisimilarity_native.mean_loss(embeddings, key, mode, alpha, beta, base, epsilon, mining, _NORM_EPS,
                                            on_bad)


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
        gather: in a process group of W > 1 processes (data-parallel training), score this
            process's anchors against the embeddings of all processes and return ``W / B``
            times their summed losses, so that DDP's gradient averaging gives the gradient of
            the single-process loss on the concatenated batch (``objectives/distributed.py``).
            Every process must call it the same number of times. Outside a process group it
            changes nothing. Default: False (each process's batch on its own).

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
        gather: bool = False,
    ) -> None:
        super().__init__()
        _check_hparams(alpha, beta, base, epsilon, type(self).__name__)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)
        self.epsilon = float(epsilon)
        self.mining = bool(mining)
        self.gather = bool(gather)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean Multi-Similarity loss of the batch (scalar)."""
        if self.gather:
            from multizoo_ext.objectives.distributed import gathered_multi_similarity_loss

            return gathered_multi_similarity_loss(embeddings, labels, self.alpha, self.beta, self.base,
                                                  self.epsilon, self.mining, type(self).__name__)
        return _multi_similarity_loss(
            embeddings, labels, self.alpha, self.beta, self.base, self.epsilon, self.mining,
            type(self).__name__,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, base={self.base}, "
            f"epsilon={self.epsilon}, mining={self.mining}" + (", gather=True" if self.gather else "")
        )
