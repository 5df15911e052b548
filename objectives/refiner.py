"""ReFNet refiner (defusion) losses (Sankaran, Yang, Lim, arXiv 2104.03435).

Each modality ``i`` has a refiner ``R_i`` that decodes the fused embedding ``f`` back to a
target ``t_i`` (the unimodal embedding ``e_i``, or the flattened raw input for MultiBench
parity). :class:`RefinerLoss` scores the reconstructions ``r_i = R_i(f)`` against the
targets, one term per modality, and returns ``sum_i w_i * L(r_i, t_i)``.

The four kinds, for one modality with reconstructions ``r`` and targets ``t`` of shape
``(B, d)`` and ``S[b, c] = cos(r_b, t_c)`` (a (B, B) matrix, built only where needed):

- ``"mse"``: ``mean((r - t) ** 2)`` over all ``B * d`` entries.
- ``"cosine"``: ``1 - mean_b S[b, b]`` (``F.cosine_similarity``, eps 1e-8).
- ``"contrastive"``: ``mean_b relu(threshold - (S[b, b] - max_{c != b} S[b, c]))``: each
  reconstruction must be closer to its own target than to the closest other target of the
  batch by at least ``threshold``; a sample that already is contributes exactly 0. Only the
  hardest other target gets a gradient (a hinge on the margin of the ranking).
- ``"ms"``: Multi-Similarity between the reconstructions (anchors, rows of ``S``) and the
  batch targets (columns), the own target being the only positive and the B - 1 other
  targets the negatives, with mining; the mean over the B anchors. Reuses
  :func:`multizoo_ext.objectives.multisimilarity.multi_similarity_anchor_losses`.

A batch of one has no other target: ``"contrastive"`` and ``"ms"`` (with mining) give a zero
that is still connected to the graph. Defaults follow the ReFNet reference (MMF): weight 0.1
per modality, contrastive threshold 0.1, ms negative scale 50, positive scale 2, base 0.5,
margin 0.1 (MMF names the negative scale ``alpha``; ours are pytorch-metric-learning's names,
see ``objectives/multisimilarity.py``).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from multizoo_ext.objectives.multisimilarity import (
    DEFAULT_ALPHA,
    DEFAULT_BASE,
    DEFAULT_BETA,
    DEFAULT_EPSILON,
    multi_similarity_anchor_losses,
)
from multizoo_ext.validation import check_finite, check_modalities

__all__ = [
    "REFINER_KINDS",
    "DEFAULT_REFINER_WEIGHT",
    "DEFAULT_THRESHOLD",
    "RefinerLoss",
    "refiner_mse",
    "refiner_cosine",
    "refiner_contrastive",
    "refiner_ms",
]

REFINER_KINDS = ("mse", "cosine", "contrastive", "ms")
DEFAULT_REFINER_WEIGHT = 0.1  # per modality, ReFNet reference (MMF config)
DEFAULT_THRESHOLD = 0.1  # contrastive similarity margin, ReFNet reference

Weights = Union[None, float, Sequence[float]]


def _zero(recon: Tensor, target: Tensor) -> Tensor:
    # A zero that stays connected to both inputs (and on their device, in their dtype).
    return recon.sum() * 0 + target.sum() * 0


def _cosine_matrix(recon: Tensor, target: Tensor) -> Tensor:
    """``S[b, c] = cos(recon_b, target_c)``, (B, d) x (B, d) -> (B, B)."""
    return F.normalize(recon, dim=1) @ F.normalize(target, dim=1).T  # (B, B)


def refiner_mse(recon: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all entries. (B, d), (B, d) -> scalar."""
    return F.mse_loss(recon, target)


def refiner_cosine(recon: Tensor, target: Tensor) -> Tensor:
    """``1 - mean_b cos(recon_b, target_b)``. (B, d), (B, d) -> scalar."""
    return 1.0 - F.cosine_similarity(recon, target, dim=1).mean()


def refiner_contrastive(recon: Tensor, target: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """Hinge on ``cos(r_b, t_b) - max_{c != b} cos(r_b, t_c) >= threshold``, mean over b.

    (B, d), (B, d) -> scalar; exactly 0 (connected) for B = 1.
    """
    batch = recon.shape[0]
    if batch < 2:
        return _zero(recon, target)
    sim = _cosine_matrix(recon, target)  # (B, B)
    own = sim.diagonal()  # (B,)
    # Push the diagonal below every cosine (>= -1) so the row max is over the others.
    others = sim - 4.0 * torch.eye(batch, dtype=sim.dtype, device=sim.device)
    hardest = others.amax(dim=1)  # (B,)
    return F.relu(threshold - (own - hardest)).mean()


def refiner_ms(
    recon: Tensor,
    target: Tensor,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    base: float = DEFAULT_BASE,
    epsilon: float = DEFAULT_EPSILON,
    mining: bool = True,
) -> Tensor:
    """Multi-Similarity of reconstructions (anchors) against the batch targets, own target
    the only positive; mean over the B anchors. (B, d), (B, d) -> scalar.

    With ``mining`` (default) a batch of one keeps no pair and gives exactly 0 (connected);
    without it, the lone positive term remains.
    """
    batch = recon.shape[0]
    sim = _cosine_matrix(recon, target)  # (B, B)
    pos = torch.eye(batch, dtype=sim.dtype, device=sim.device)  # (B, B): own target only
    losses = multi_similarity_anchor_losses(
        sim, pos, 1.0 - pos, alpha=alpha, beta=beta, base=base, epsilon=epsilon, mining=mining
    )  # (B,)
    return losses.mean()


class RefinerLoss(nn.Module):
    """Weighted sum of per-modality refiner losses, ``sum_i w_i * L(r_i, t_i)``.

    Args:
        kind: "mse", "cosine", "contrastive" or "ms" (module docstring). Default: "cosine"
            (also MultiBench's ``RefNet_objective``).
        weights: ``w_i``. ``None``: ``DEFAULT_REFINER_WEIGHT`` (0.1) for every modality,
            whatever their number; a float: that weight for every modality; a sequence: one
            weight per modality, and ``forward`` then requires exactly that many. Default: None.
        threshold: similarity margin of "contrastive". Default: 0.1.
        ms_alpha: positive scale of "ms". Default: 2.0.
        ms_beta: negative scale of "ms". Default: 50.0.
        ms_base: similarity offset of "ms". Default: 0.5.
        ms_epsilon: mining margin of "ms". Default: 0.1.
        ms_mining: mine pairs in "ms". Default: True.

    Attributes:
        last_terms: after a forward, the unweighted per-modality losses ``L_i`` as detached
            0-dim tensors (no host sync; call ``float()`` when logging).

    Shape:
        - reconstructions: list of M tensors ``(B, d_i)``.
        - targets: list of M tensors ``(B, d_i)``, same shapes (detach them yourself for a
          stop-gradient target).
        - output: scalar.

    Raises:
        ValueError: unknown kind, bad weights or threshold; at forward, different numbers of
            reconstructions and targets, a weight count that does not match, or shapes that
            do not match.
        TypeError: inputs that are not lists of tensors.

    Example:
        >>> import torch
        >>> loss_fn = RefinerLoss("contrastive", weights=[0.1, 0.2])
        >>> recons = [torch.randn(4, 8, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
        >>> targets = [torch.randn(4, 8), torch.randn(4, 3)]
        >>> loss_fn(recons, targets).backward()
        >>> len(loss_fn.last_terms)
        2
    """

    def __init__(
        self,
        kind: str = "cosine",
        weights: Weights = None,
        threshold: float = DEFAULT_THRESHOLD,
        ms_alpha: float = DEFAULT_ALPHA,
        ms_beta: float = DEFAULT_BETA,
        ms_base: float = DEFAULT_BASE,
        ms_epsilon: float = DEFAULT_EPSILON,
        ms_mining: bool = True,
    ) -> None:
        super().__init__()
        if kind not in REFINER_KINDS:
            raise ValueError(f"RefinerLoss kind must be one of {list(REFINER_KINDS)}, got {kind!r}")
        self.kind = kind
        self.weights: Optional[Tuple[float, ...]]
        self.default_weight = DEFAULT_REFINER_WEIGHT
        if weights is None:
            self.weights = None
        elif isinstance(weights, (int, float)) and not isinstance(weights, bool):
            self.weights, self.default_weight = None, float(weights)
        elif isinstance(weights, Sequence) and not isinstance(weights, str) and len(weights) > 0:
            self.weights = tuple(float(w) for w in weights)
        else:
            raise ValueError(
                f"RefinerLoss weights must be None, a float or a non-empty list of floats, got {weights!r}"
            )
        all_weights = self.weights if self.weights is not None else (self.default_weight,)
        if not all(math.isfinite(w) and w >= 0 for w in all_weights):
            raise ValueError(f"RefinerLoss weights must be finite and >= 0, got {weights!r}")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError(f"RefinerLoss threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)
        for key, val in (("ms_alpha", ms_alpha), ("ms_beta", ms_beta)):
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                raise ValueError(f"RefinerLoss {key} must be a positive finite number, got {val!r}")
        for key, val in (("ms_base", ms_base), ("ms_epsilon", ms_epsilon)):
            if not (isinstance(val, (int, float)) and math.isfinite(val)):
                raise ValueError(f"RefinerLoss {key} must be a finite number, got {val!r}")
        self.ms_alpha, self.ms_beta = float(ms_alpha), float(ms_beta)
        self.ms_base, self.ms_epsilon, self.ms_mining = float(ms_base), float(ms_epsilon), bool(ms_mining)
        # The kind is resolved into a callable once, so forward never branches on strings.
        self._term: Callable[[Tensor, Tensor], Tensor] = {
            "mse": refiner_mse,
            "cosine": refiner_cosine,
            "contrastive": functools.partial(refiner_contrastive, threshold=self.threshold),
            "ms": functools.partial(
                refiner_ms, alpha=self.ms_alpha, beta=self.ms_beta, base=self.ms_base,
                epsilon=self.ms_epsilon, mining=self.ms_mining,
            ),
        }[kind]
        self.last_terms: List[Tensor] = []

    def _check(self, reconstructions: Sequence[Tensor], targets: Sequence[Tensor]) -> None:
        name = "RefinerLoss"
        expected = len(self.weights) if self.weights is not None else None
        check_modalities(reconstructions, expected=expected, name=f"{name} reconstructions", min_count=1)
        check_modalities(targets, name=f"{name} targets", min_count=1)
        if len(reconstructions) != len(targets):
            raise ValueError(
                f"{name} got {len(reconstructions)} reconstructions but {len(targets)} targets; "
                "expected one target per reconstruction"
            )
        for i, (r, t) in enumerate(zip(reconstructions, targets)):
            if r.dim() != 2 or r.shape != t.shape:
                raise ValueError(
                    f"{name}: modality {i} needs reconstruction and target of the same shape (B, d), "
                    f"got {tuple(r.shape)} and {tuple(t.shape)}"
                )
            if not (r.is_floating_point() and t.is_floating_point()):
                raise TypeError(
                    f"{name}: modality {i} needs floating-point tensors, got {r.dtype} and {t.dtype}"
                )

    def forward(self, reconstructions: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        """``sum_i w_i * L(reconstructions[i], targets[i])`` (scalar); 0 (with the graph of
        the reconstructions) for an empty batch.

        Raises:
            ValueError / TypeError: counts, shapes or dtypes that do not match, or NaN/Inf
                values.
        """
        self._check(reconstructions, targets)
        if reconstructions[0].shape[0] == 0:  # no sample: nothing to reconstruct (not a mean of nothing)
            self.last_terms = [r.detach().sum() * 0 for r in reconstructions]
            return sum(r.sum() * 0 for r in reconstructions)
        with torch.no_grad():  # one sum per tensor, one host sync: a finite total proves every value finite
            probe = torch.stack([x.sum(dtype=torch.float32) for x in (*reconstructions, *targets)]).sum()
        if not math.isfinite(float(probe)):
            for i, (r, t) in enumerate(zip(reconstructions, targets)):
                check_finite(r.detach(), f"RefinerLoss reconstruction {i}")
                check_finite(t.detach(), f"RefinerLoss target {i}")
        terms = [self._term(r, t.to(r.dtype)) for r, t in zip(reconstructions, targets)]
        weights = self.weights if self.weights is not None else (self.default_weight,) * len(terms)
        self.last_terms = [term.detach() for term in terms]
        total = terms[0] * weights[0]
        for w, term in zip(weights[1:], terms[1:]):
            total = total + term * w
        return total

    def extra_repr(self) -> str:
        weights = list(self.weights) if self.weights is not None else f"{self.default_weight} each"
        extra = ""
        if self.kind == "contrastive":
            extra = f", threshold={self.threshold}"
        elif self.kind == "ms":
            extra = (f", ms_alpha={self.ms_alpha}, ms_beta={self.ms_beta}, ms_base={self.ms_base}, "
                     f"ms_epsilon={self.ms_epsilon}, ms_mining={self.ms_mining}")
        return f"kind={self.kind!r}, weights={weights}{extra}"
