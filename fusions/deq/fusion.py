"""Deep Equilibrium fusion (Ni, Bai, Zhang, Yao, Mei, arXiv 2306.16645) as a MultiBench fusion.

Fusion is the equilibrium of a recursive process: with the modality embeddings projected to one
width ``d``, the state ``z = (z_1, ..., z_M, z_f)`` (``(B, (M + 1) d)``) starts at zeros, the
forward pass solves ``z* = f_theta(z*; x)`` and returns the fused part ``z_f*`` plus the fused
injection ``x_f`` (``(B, d)``; ``output="state"``: ``z_f*`` alone, as the published layer).
``f_theta`` is written once, in :class:`_FusionMap`.

One batch's path, top to bottom: :meth:`DEQFusion.forward` builds the map for the batch,
solves its fixed point without a graph (stage by stage, :mod:`.staged`, or jointly, with a
solver of :mod:`.solvers`), hands ``z*`` to the gradient mode of :mod:`.backward` (which
attaches the implicit, phantom or unrolled gradient and, in training, the pair the Jacobian
penalty needs), then records the solver statistics (``last_info``, the convergence counts).

Example:
    >>> import torch
    >>> from multizoo_ext.fusions.deq import DEQFusion
    >>> fusion = DEQFusion([5, 7, 3], width=16)
    >>> fused, info = fusion([torch.randn(4, 5), torch.randn(4, 7), torch.randn(4, 3)], return_info=True)
    >>> fused.shape, info["converged"].shape
    (torch.Size([4, 16]), torch.Size([4]))
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from multizoo_ext.fusions.deq.backward import (
    DEFAULT_JAC_VECTORS,
    DEFAULT_PHANTOM_STEPS,
    DEFAULT_PHANTOM_TAU,
    build_backward,
    jacobian_penalty,
)
from multizoo_ext.fusions.deq.solvers import Solver, get_solver
from multizoo_ext.fusions.deq.staged import solve_staged
from multizoo_ext.registry import Recipe, register_fusion
from multizoo_ext.validation import check_fusion_inputs, check_input_dims

__all__ = ["DEFAULT_JACOBIAN_WEIGHT", "DEQ_DEFAULTS", "DEQ_PAPER_RECIPE", "DEQ_RECIPE", "DEQDefaults", "DEQFusion",
           "PAPER_LAYER", "REFERENCE_JACOBIAN_WEIGHT", "build_deq_paper", "find_deq"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DEQDefaults:
    """Defaults of :class:`DEQFusion`, in one place (solver internals such as Anderson's
    memory live in :mod:`.solvers`)."""

    #: GroupNorm groups per width-``d`` block (reference: 4).
    num_groups: int = 4
    #: Forward / backward iteration caps (reference: 55 / 56).
    f_max_iter: int = 55
    b_max_iter: int = 56
    #: Per-sample tolerances of the forward solve and of the backward (adjoint) solve, whose
    #: gradient is no more accurate than the forward fixed point it is taken at.
    f_tol: float = 1e-3
    b_tol: float = 1e-3
    #: ``'rel'``: stop on ``||f(z) - z|| / ||f(z)||``; ``'abs'``: on ``||f(z) - z||``.
    stop_mode: str = "rel"
    #: Forward solver (a name of :func:`.solvers.get_solver`); the backward's defaults to it.
    solver: str = "anderson"
    #: Gradient mode: ``'implicit'``, ``'phantom'`` or ``'unrolled'`` (:mod:`.backward`).
    backward: str = "implicit"
    #: Phantom mode: damped steps from ``z*`` and their damping.
    phantom_steps: int = DEFAULT_PHANTOM_STEPS
    phantom_tau: float = DEFAULT_PHANTOM_TAU
    #: Compute the Hutchinson Jacobian penalty in training (the method's recipe) and the
    #: random vectors of its estimate (reference: 2).
    jac_reg: bool = True
    jac_vectors: int = DEFAULT_JAC_VECTORS
    #: Drop converged samples from the solvers' working batch (one host sync per check).
    compact: bool = True
    #: Solve the block-triangular forward fixed point stage by stage (modality states, then
    #: the fused state): the same joint fixed point for fewer and cheaper evaluations.
    staged: bool = True
    #: Solve the backward (adjoint) system stage by stage too, last stage first.
    staged_backward: bool = True
    #: Samples whose forward residual stays above this get the Jacobian-free gradient instead
    #: of the implicit one, which is only meaningful at a fixed point. None: implicit for all.
    implicit_max_residual: Optional[float] = 1e-2
    #: Solve each stage's adjoint system exactly instead of iteratively: the stage's
    #: per-sample Jacobian blocks in closed form (``(B, M, d, d)`` for the modality stage,
    #: which is block-diagonal over the modalities, ``(B, 1, d, d)`` for the fused one), then
    #: one batched linear solve. "auto": exactly when the width is at most
    #: ``b_direct_max_width``, where it makes a training step about a quarter cheaper on the
    #: CPU; at larger widths its ``O(B M d^2)`` memory and ``O(B M d^3)`` work cost more than
    #: the iterative solve saves (docs/deq.md).
    b_direct: Union[bool, str] = "auto"
    b_direct_max_width: int = 64
    #: Initialisation of the gate ``W_g``. "zero" (weight and bias 0): the gate sum ``a``
    #: starts at 0 for every sample. With the GroupNorm update the multiplicative term then
    #: starts at 0 (``z_f' = GN(ReLU(x_f + b_f))`` does not read ``z_f`` and is solved in one
    #: step); with the sigmoid update the gate starts at 1/2 (``z_f' = ReLU(W_f z_f / 2 + x_f +
    #: b_f)``, a contraction at PyTorch's initialisation of ``W_f``, solved in about 6 steps).
    #: The gate learns from there (its gradient, ``z_f`` times the gate's input, is not 0).
    #: "default": PyTorch's Linear initialisation, the reference's; the published fused map is
    #: then not a contraction at initialisation (about half of the samples reach the tolerance).
    gate_init: str = "zero"
    #: Initialisation of each modality block's second Linear ``W2`` (the branch's last layer).
    #: "zero" (weight 0): at initialisation the branch does not read ``z_i`` (a plain block is
    #: then ``z_i' = ReLU(x_i + b2_i)``, solved in 2 steps; a residual block ``GN3(ReLU(GN2(x_i
    #: + b2_i) + z_i))``, about 10) instead of hitting the cap for half of the samples (residual
    #: blocks at PyTorch's initialisation), and ``W2`` learns from there
    #: (its gradient is the branch's hidden state times the upstream gradient, not 0). The
    #: zero-initialised last layer of a residual branch is the usual trick for deep residual
    #: networks. "default": PyTorch's Linear initialisation (the reference's).
    residual_init: str = "zero"
    #: The fused state's injection. "sum": ``x_f = sum_i w_i x_i + b`` with learnable scalars
    #: (the reference's). "proj": ``x_f = W_x [x_1; ...; x_M] + b_x``, a Linear of the
    #: concatenation, so x_f keeps which modality a feature came from. The reference's function
    #: is ``DEQFusion(..., gate_init="default", injection="sum")``.
    injection: str = "proj"
    #: Each modality's block. "residual": ``z_i' = GN3(ReLU(GN2(W2 ReLU(GN1(W1 z_i)) + x_i) +
    #: z_i))`` (the reference's), whose per-sample GroupNorms put every modality state at unit
    #: scale. "plain": ``z_i' = ReLU(W2 ReLU(GN1(W1 z_i)) + x_i)``, which keeps the injection's
    #: scale (the branch reads only the direction of ``z_i``, through GN1).
    modality_block: str = "plain"
    #: The fused update. "groupnorm": ``z_f' = GN(ReLU(W_f(z_f * a) + x_f))`` (the
    #: reference's). "sigmoid": ``z_f' = ReLU(W_f(z_f * sigmoid(a)) + x_f)``: the gate is
    #: bounded instead of the state normalised, so ``z_f`` keeps the injection's scale.
    fused_update: str = "sigmoid"
    #: What the layer returns: "state", the fused equilibrium ``z_f*`` (the reference's), or
    #: "state+injection", ``z_f* + x_f`` (a skip connection around the equilibrium).
    output: str = "state+injection"
    #: Log non-convergence at most once per this many forwards: at WARNING when fewer than
    #: ``warn_fraction`` of the window's samples reached the tolerance, else at INFO (a few
    #: stragglers get the Jacobian-free gradient and are no cause for alarm).
    warn_every: int = 100
    warn_fraction: float = 0.95


#: The single instance the constructor reads.
DEQ_DEFAULTS = DEQDefaults()


def _group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.group_norm`` of a ``(B, C)`` tensor, as a layer norm over ``(B, groups, C / groups)``
    plus the per-channel affine: the same values (within float rounding), and on the CPU
    faster than ``group_norm``, whose kernel is built for spatial ``(B, C, H, W)`` inputs."""
    B, C = x.shape
    normed = F.layer_norm(x.view(B, groups, C // groups), (C // groups,), eps=eps)
    return torch.addcmul(bias, normed.view(B, C), weight)


def _group_norm_jacobian_times(x: torch.Tensor, groups: int, weight: torch.Tensor, eps: float,
                               a: torch.Tensor) -> torch.Tensor:
    """``J_GN(x) @ a`` per row, without forming ``J_GN``: ``x`` (N, C) the GroupNorm's input,
    ``weight`` its gain, (C,) or per row (N, C), ``a`` (N, C, P); returns (N, C, P). Per group
    of ``k = C / groups`` channels, with ``xh`` the normalised group and ``s = sqrt(var + eps)``
    (biased variance), ``J = diag(weight) (I - 1/k - xh xh^T / k) / s``."""
    N, C = x.shape
    k = C // groups
    # xh and 1 / s from one layer-norm kernel (a var_mean over groups of a few channels is slow)
    xh, _, inv = torch.native_layer_norm(x.view(N, groups, k), (k,), None, None, eps)  # (N, G, k), (N, G, 1)
    ag = a.reshape(N, groups, k, -1)                                              # (N, G, k, P)
    xh4 = xh.unsqueeze(3)                                                         # (N, G, k, 1)
    # (I - 1/k - xh xh^T / k) a = a - (mean of a over the group) - xh (xh^T a) / k; xh^T a as a
    # product and a sum (a batched (1, k) x (k, P) product over N G tiny matrices is slower)
    proj = (xh4 * ag).sum(2, keepdim=True).div_(k)                                # (N, G, 1, P)
    out = torch.addcmul(ag - ag.mean(2, keepdim=True), xh4, proj, value=-1.0)
    gain = inv * weight.expand(N, C).reshape(N, groups, k)                        # (N, G, k)
    return out.mul_(gain.unsqueeze(3)).view(N, C, -1)


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


class _Rows:
    """Rows ``index`` of some full-batch tensors, gathered once per index tensor.

    A compacting solver passes the same index tensor until it drops rows again; the gather
    is cached per grad mode, so a gather made without a graph is never used with one."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.full = tensors
        self._key: Optional[Tuple[torch.Tensor, bool]] = None
        self._rows: Tuple[torch.Tensor, ...] = tensors

    def __call__(self, index: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        if index is None:
            return self.full
        grad = torch.is_grad_enabled()
        if self._key is None or self._key[0] is not index or self._key[1] != grad:
            self._key = (index, grad)
            self._rows = tuple(t.index_select(0, index) for t in self.full)
        return self._rows


# ------------------------------------------------------------------------------ the map f
#: The GroupNorms of each kind of modality block, in the order the map applies them.
_BLOCK_NORMS = {"plain": ("gn1",), "residual": ("gn1", "gn2", "gn3")}


class _FusionMap:
    """``f_theta(z; x)`` of one batch: ``(b, (M + 1) d) -> (b, (M + 1) d)``, ``z = (z_1..z_M, z_f)``.

    1. injection: ``x_i = P_i(input_i)`` (a Linear, or the identity when the widths agree),
       ``x_f = W_x [x_1; ..; x_M] + b_x`` ('proj') or ``sum_i w_i x_i + b`` ('sum');
    2. per-modality block (own weights per modality): 'plain' ``z_i' = ReLU(W2 ReLU(GN1(W1
       z_i)) + x_i)``, or 'residual' ``z_i' = GN3(ReLU(GN2(W2 ReLU(GN1(W1 z_i)) + x_i) + z_i))``;
    3. purify-then-combine with one gate ``W_g`` shared by the modalities, reading the updated
       ``z_i'``, ``a = sum_i W_g(z_i' + z_f)``: 'sigmoid' ``z_f' = ReLU(W_f (z_f * sigmoid(a))
       + x_f)``, or 'groupnorm' ``z_f' = GN(ReLU(W_f (z_f * a) + x_f))``.

    Row ``r`` of ``z`` is sample ``index[r]`` of the batch (all samples, in order, when
    ``index`` is None), so a solver can drop converged samples. ``f`` is lower block-triangular
    (``z_i'`` never reads ``z_f``): ``stage_sizes = (M d, d)`` and :meth:`stage` give the
    stage maps :mod:`.staged` solves one after the other.

    Speed-ups (same function): the injections and the biases added to them are computed once
    per batch; the M GroupNorms of a stage run as one layer norm over the concatenated
    ``(b, M d)`` state (:func:`_group_norm`); ``sum_i z_f * W_g(z_i' + z_f) = z_f * W_g(sum_i
    z_i' + M z_f)`` (bias ``M b_g``), so the gate is one matrix product instead of M.
    """

    def __init__(self, layer: "DEQFusion", inputs: Sequence[torch.Tensor]) -> None:
        blocks, fb = layer.blocks, layer.fusion_block
        M, d = layer.num_modalities, layer.width
        self.M, self.d, self.groups = M, d, layer.num_groups
        self.stage_sizes = (M * d, d)
        # 1. injection, once per batch (parameters keep their graph: the recomputation at z* trains them)
        x = torch.stack([p(t) for p, t in zip(layer.projections, inputs)], 1)       # (B, M, d)
        if layer.injection_proj is not None:                                          # W_x [x_1; ..; x_M] + b_x
            x_f = layer.injection_proj(x.flatten(1))                                  # (B, d)
        else:
            x_f = torch.einsum("m,bmd->bd", layer.weights, x) + layer.bias          # (B, d)
        self.inj = x + torch.stack([b.lin2.bias for b in blocks])                     # (B, M, d): x_i + b2_i
        self.x_f = x_f
        self.inj_f = x_f + fb.fuse.bias                                               # (B, d):    x_f + b_f
        self._rows = _Rows(self.inj, self.inj_f)
        # weights, gathered once
        self.eps = blocks[0].gn1.eps
        # the M blocks' Linears as one batched product each: (M, d, d) transposed weights
        self.w1t = torch.stack([b.lin1.weight for b in blocks]).transpose(1, 2)       # (M, d, d)
        self.b1 = torch.stack([b.lin1.bias for b in blocks]).unsqueeze(1)             # (M, 1, d)
        self.w2t = torch.stack([b.lin2.weight for b in blocks]).transpose(1, 2)       # (M, d, d)
        self.plain = layer.modality_block == "plain"
        self.gn = [(torch.cat([b[n].weight for b in blocks]),                        # (M d,) each
                    torch.cat([b[n].bias for b in blocks])) for n in _BLOCK_NORMS[layer.modality_block]]
        self.wg, self.bg = fb.gate.weight, fb.gate.bias * M                           # W_g, M b_g
        self.wft = fb.fuse.weight.t()
        self.sigmoid = layer.fused_update == "sigmoid"
        self.gnf = None if self.sigmoid else (fb.gn.weight, fb.gn.bias)

    def modalities(self, z_m: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """2. The M modality blocks (stage 0): ``z_m (b, M d) -> z_m' (b, M d)``."""
        if self.plain:                                                                # z_i' = ReLU(h2)
            return self._branches(z_m, self._rows(index)[0])[2].relu()
        r2 = self._blocks(z_m, self._rows(index)[0])[3]
        return _group_norm(r2, self.M * self.groups, *self.gn[2], self.eps)         # z_i' = GN3(r2), (b, M d)

    def _branches(self, z_m: torch.Tensor, inj: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The M blocks' branches, given ``inj = x_i + b2_i`` (b, M, d): ``h1 = W1 z_i + b1``,
        ``r1 = ReLU(GN1(h1))``, ``h2 = W2 r1 + x_i + b2``, all (b, M d) (a plain block is
        ``ReLU(h2)``; the stage's Jacobian reads them all)."""
        M, d, G, eps = self.M, self.d, self.groups, self.eps
        b = z_m.shape[0]
        # the M blocks' products as one batched product over (M, b, d) (modality-major)
        h1 = torch.baddbmm(self.b1, z_m.view(b, M, d).transpose(0, 1), self.w1t)     # (M, b, d)
        h1 = h1.transpose(0, 1).reshape(b, M * d)                                     # (b, M d)
        # in-place ReLU on a fresh intermediate whose producer's backward does not read it
        r1 = _group_norm(h1, M * G, *self.gn[0], eps).relu_()
        h2 = torch.baddbmm(inj.transpose(0, 1), r1.view(b, M, d).transpose(0, 1), self.w2t)  # (M, b, d)
        return h1, r1, h2.transpose(0, 1).reshape(b, M * d)

    def _blocks(self, z_m: torch.Tensor, inj: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The M residual blocks up to GN3: :meth:`_branches` and ``r2 = ReLU(GN2(h2) + z_i)``
        (b, M d), the input of GN3."""
        h1, r1, h2 = self._branches(z_m, inj)
        r2 = _group_norm(h2, self.M * self.groups, *self.gn[1], self.eps).add_(z_m).relu_()
        return h1, r1, h2, r2

    def fused(self, z_f: torch.Tensor, a: torch.Tensor, inj_f: torch.Tensor) -> torch.Tensor:
        """3. ``z_f' = GN(ReLU(W_f (z_f * a) + x_f))`` ('groupnorm'), or ``ReLU(W_f (z_f *
        sigmoid(a)) + x_f)`` ('sigmoid'), given the gate sum ``a = W_g(sum_i z_i' + M z_f) + M
        b_g`` and ``inj_f = x_f + b_f``, all ``(b, d)``."""
        h = torch.addmm(inj_f, z_f * (torch.sigmoid(a) if self.sigmoid else a), self.wft).relu_()
        return h if self.sigmoid else _group_norm(h, self.groups, *self.gnf, self.eps)

    @torch.no_grad()
    def modalities_jacobian(self, z_m: torch.Tensor) -> torch.Tensor:
        """Per-sample Jacobian of stage 0 at ``z_m`` (B, M d), full batch, no graph. The stage
        is block-diagonal over the modalities, so this is ``(B, M, d, d)``, block ``i`` being
        ``d z_i' / d z_i`` (``[b, i, r, c] = d z_i'[r] / d z_i[c]``)."""
        M, d, G, eps = self.M, self.d, self.groups, self.eps
        B = z_m.shape[0]
        rows = (B * M, d)                                                            # (sample, modality) rows
        gains = [w.view(1, M, d).expand(B, M, d).reshape(rows) for w, _ in self.gn]  # GN gains by row
        if self.plain:
            h1, r1, h2 = (t.view(rows) for t in self._branches(z_m, self._rows(None)[0]))
        else:
            h1, r1, h2, r2 = (t.view(rows) for t in self._blocks(z_m, self._rows(None)[0]))
        # chain rule, right to left: W1, GN1, ReLU, W2, then (plain) ReLU, or GN2, + I, ReLU, GN3
        a = self.w1t.transpose(1, 2).expand(B, M, d, d).reshape(B * M, d, d)         # W1_i
        a = _group_norm_jacobian_times(h1, G, gains[0], eps, a)
        a = (r1.unsqueeze(2) > 0) * a
        a = torch.matmul(self.w2t.transpose(1, 2), a.view(B, M, d, d)).view(B * M, d, d)
        if self.plain:
            return ((h2.unsqueeze(2) > 0) * a).view(B, M, d, d)
        a = _group_norm_jacobian_times(h2, G, gains[1], eps, a)
        a = a + torch.eye(d, device=a.device, dtype=a.dtype)
        a = (r2.unsqueeze(2) > 0) * a
        return _group_norm_jacobian_times(r2, G, gains[2], eps, a).view(B, M, d, d)

    @torch.no_grad()
    def fused_jacobian(self, z_f: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        """Per-sample Jacobian of stage 1 at ``z_f`` (B, d), full batch, no graph, given the
        gate's constant part ``const = W_g sum_i z_i' + M b_g`` (B, d): ``(B, 1, d, d)``.
        With ``a = const + M W_g z_f``: ``d(z_f * a)/dz_f = diag(a) + M diag(z_f) W_g``, then
        ``W_f``, the ReLU and the GroupNorm; 'sigmoid': ``d(z_f * s(a))/dz_f = diag(s) + M
        diag(z_f s (1 - s)) W_g``, then ``W_f`` and the ReLU."""
        M = self.M
        a = torch.addmm(const, z_f, self.wg.t(), alpha=M)                            # (B, d)
        if self.sigmoid:                                                             # gate value, d gate / d a
            gate = torch.sigmoid(a)
            dz_f = z_f * gate * (1 - gate)
        else:
            gate, dz_f = a, z_f
        du = torch.diag_embed(gate) + M * dz_f.unsqueeze(2) * self.wg                # (B, d, d)
        pre = torch.addmm(self._rows(None)[1], z_f * gate, self.wft)                 # (B, d)
        j = (pre.unsqueeze(2) > 0) * torch.matmul(self.wft.t(), du)                  # ReLU(W_f .)
        if self.sigmoid:
            return j.unsqueeze(1)
        return _group_norm_jacobian_times(pre.relu(), self.groups, self.gnf[0], self.eps, j).unsqueeze(1)

    def __call__(self, z: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The whole map, 2 then 3: ``z`` (b, (M + 1) d) -> ``f(z)`` (b, (M + 1) d)."""
        M, d = self.M, self.d
        b = z.shape[0]
        z_m, z_f = z.split([M * d, d], dim=1)                                        # (b, M d), (b, d)
        z_m = self.modalities(z_m, index)                                             # z_i', (b, M d)
        # gate sum a = sum_i W_g(z_i' + z_f) = W_g(sum_i z_i' + M z_f) + M b_g: one product
        a = F.linear(z_m.view(b, M, d).sum(1) + M * z_f, self.wg, self.bg)           # (b, d)
        return torch.cat([z_m, self.fused(z_f, a, self._rows(index)[1])], 1)         # (b, (M + 1) d)

    def stage(self, k: int, states: Sequence[torch.Tensor],
              outputs: Optional[Sequence[torch.Tensor]] = None) -> Callable[..., torch.Tensor]:
        """Map of stage ``k`` given the earlier stages' full-batch ``states`` (and, if already
        computed, their ``outputs``): stage 0 is :meth:`modalities`; stage 1 is
        ``z_f (b, d) -> z_f' (b, d)`` with ``z_m'`` fixed, so the gate's ``W_g sum_i z_i' +
        M b_g`` is computed once and an evaluation costs two ``(d, d)`` products."""
        if k == 0:
            return _StageMap(self.modalities, self.modalities_jacobian)
        if k != 1:
            raise IndexError(f"DEQ fusion map has 2 stages, asked for stage {k}")
        z_m = outputs[0] if outputs else self.modalities(states[0])                  # z_m', (B, M d)
        B, M, d = z_m.shape[0], self.M, self.d
        rows = _Rows(F.linear(z_m.view(B, M, d).sum(1), self.wg, self.bg), self.inj_f)  # (B, d) each

        def fused_stage(z_f: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
            const, inj_f = rows(index)
            return self.fused(z_f, torch.addmm(const, z_f, self.wg.t(), alpha=M), inj_f)

        return _StageMap(fused_stage, lambda z_f: self.fused_jacobian(z_f, rows(None)[0]))


class _StageMap:
    """A stage map ``(b, n_k) -> (b, n_k)`` (called as ``f_k(z, index=None)``) that also gives
    its per-sample Jacobian at a full batch: ``jacobian(z)`` -> ``(B, blocks, s, s)``, the
    stage being block-diagonal with ``blocks`` blocks of width ``s`` (the exact adjoint solve
    of :mod:`.backward` reads it)."""

    __slots__ = ("_map", "jacobian")

    def __init__(self, fn: Callable[..., torch.Tensor], jacobian: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._map, self.jacobian = fn, jacobian

    def __call__(self, z: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._map(z, index)


# ------------------------------------------------------------------------------ the layer
def _modality_block_params(width: int, num_groups: int, kind: str) -> nn.ModuleDict:
    """Weights of one modality's block (applied in :meth:`_FusionMap.modalities`): two Linears
    and the GroupNorms of ``_BLOCK_NORMS[kind]``."""
    return nn.ModuleDict({"lin1": nn.Linear(width, width), "lin2": nn.Linear(width, width),
                          **{n: nn.GroupNorm(num_groups, width) for n in _BLOCK_NORMS[kind]}})


def _fusion_block_params(width: int, num_groups: int, update: str) -> nn.ModuleDict:
    """Weights of the purify-then-combine update (applied in :meth:`_FusionMap.fused`); the
    'sigmoid' update has no GroupNorm."""
    params = {"gate": nn.Linear(width, width), "fuse": nn.Linear(width, width)}
    if update == "groupnorm":
        params["gn"] = nn.GroupNorm(num_groups, width)
    return nn.ModuleDict(params)


def _solver_name(solver: Union[str, Solver]) -> str:
    return solver.lower() if isinstance(solver, str) else getattr(solver, "__name__", type(solver).__name__)


#: Weight of the Jacobian penalty in DEQ fusion's training objective (the default of
#: ``multizoo_ext.objectives.deq_objective``, which re-exports it). The authors' MM-IMDB script
#: uses 0.1 (``REFERENCE_JACOBIAN_WEIGHT``, the published layer's recipe); at 1.0 the default
#: layer converges in fewer solver steps late in training and was as accurate or more on the
#: datasets measured (docs/RESULTS.md, section 3.7).
DEFAULT_JACOBIAN_WEIGHT = 1.0

#: DEQ fusion trains with its Jacobian penalty (``jac_reg=True``, the constructor's default)
#: added by ``deq_objective`` with weight ``DEFAULT_JACOBIAN_WEIGHT`` (recorded in the run's
#: settings), and the fusion's parameters at 0.1 x the learning rate, as the authors' MM-IMDB
#: script does.
DEQ_RECIPE = Recipe(objective="deq", objective_kwargs={"jacobian_weight": DEFAULT_JACOBIAN_WEIGHT},
                    fusion_lr_mult=0.1)

#: The Jacobian weight of the authors' MM-IMDB script, which the published layer trains with.
REFERENCE_JACOBIAN_WEIGHT = 0.1

#: The published layer's recipe: DEQ fusion's, with the authors' MM-IMDB Jacobian weight.
DEQ_PAPER_RECIPE = replace(DEQ_RECIPE, objective_kwargs={"jacobian_weight": REFERENCE_JACOBIAN_WEIGHT})


@register_fusion("deq", recipe=DEQ_RECIPE)
class DEQFusion(nn.Module):
    """Deep Equilibrium fusion: the fused state of the fixed point ``z* = f_theta(z*; x)``
    (``f_theta``: :class:`_FusionMap`).

    Args:
        input_dims: widths ``d_i`` of the M >= 2 modality embeddings (any widths).
        width: DEQ width ``d`` (= ``out_dim``). Default: ``max(input_dims)`` rounded up to a
            multiple of ``num_groups``, so encoders of equal width (MultiBench's usual case,
            e.g. 512) are used as they are.
        num_groups: GroupNorm groups; ``width`` must be a multiple. Default: 4.
        always_project: give every modality a learned ``Linear(d_i, width)``. Default: False,
            which projects only the modalities whose width differs from ``width`` and feeds
            the others unchanged.
        solver: forward solver, a registered name (``'anderson'`` (default), ``'broyden'``,
            ``'fixed_point_iter'``, or one added with
            :func:`~multizoo_ext.fusions.deq.solvers.register_solver`) or a callable with the
            solver signature of :mod:`.solvers`.
        b_solver: backward solver of the implicit mode, the same way. Default: ``solver``.
        f_max_iter, b_max_iter: iteration caps. Default: 55 / 56.
        f_tol, b_tol: per-sample tolerances. Default: 1e-3 / 1e-3.
        stop_mode: ``'rel'`` (default) or ``'abs'`` residual for stopping.
        backward: gradient mode, ``'implicit'`` (default), ``'phantom'`` or ``'unrolled'``.
        phantom_steps, phantom_tau: phantom mode. Default: 5, 1.0.
        unroll_steps: iterations of the unrolled mode. Default: ``f_max_iter``.
        jac_reg: compute the Hutchinson Jacobian penalty ``||J_f(z*)||_F^2 / numel`` in
            training, for the objective to read with :meth:`take_jacobian_penalty` (as
            ``multizoo_ext.objectives.deq_objective`` does). A training forward whose
            penalty no objective took is reported once per module (logging and
            ``warnings.warn``) at the next training forward. Default: True.
        jac_vectors: random vectors of the estimate. Default: 2.
        compact: let the forward and backward solvers drop converged samples from their
            working batch. Default: True.
        staged: solve the (block-triangular) forward fixed point stage by stage, the modality
            states first, then the fused state, each with its own solver run: the same joint
            fixed point, within the same joint tolerance (:mod:`.staged`). Caps then apply
            per stage and ``steps`` counts stage evaluations. False: one solve of the joint
            state. Default: True.
        implicit_max_residual: implicit mode: samples whose forward residual (of
            ``stop_mode``) is above this get the Jacobian-free gradient (one application of
            ``f`` at the returned iterate) instead of the implicit one. None: implicit for
            every sample. Default: 1e-2.
        staged_backward: solve the implicit mode's adjoint system stage by stage as well
            (last stage first). False: one joint adjoint solve. Default: True.
        b_direct: implicit mode with ``staged_backward``: solve each stage's adjoint system
            exactly, from its per-sample Jacobian blocks in closed form (``(B, M, width,
            width)`` and ``(B, 1, width, width)``) and one batched linear solve, instead of
            iterating with ``b_solver`` (``b_max_iter`` then does not apply; ``b_tol`` decides
            the reported ``converged``). Costs ``O(B M width^2)`` memory and ``O(B M
            width^3)`` time per backward, so it pays at small widths only. ``'auto'``
            (default): exact when ``width <= 64``, iterative above.
        trace: keep the per-iteration residuals in the info (``trace_abs``/``trace_rel``; per
            stage, in ``info['stages']``, when ``staged``). Default: False.
        solver_kwargs: extra solver options for both solves (e.g. ``{'m': 5, 'lam': 1e-4,
            'beta': 1.0, 'check_every': 4}``); solver defaults otherwise.
        warn_every: log non-convergence at most once per this many forwards, at WARNING when
            fewer than 95 % of the window's samples reached the tolerance, else at INFO.
            Default: 100.
        gate_init: ``'zero'`` (default): the gate ``W_g`` starts at weight 0 and bias 0, so the
            gate sum starts at 0 for every sample (the fused update is then a contraction at
            initialisation) and learns from there; ``'default'``: PyTorch's Linear
            initialisation (the reference's). The function computed is the same either way.
        injection: ``'proj'`` (default): ``x_f = Linear(M width, width)`` of the concatenated
            ``x_1..x_M`` (parameters ``injection_proj.*``); ``'sum'``: ``x_f = sum_i w_i x_i + b`` with learnable scalars (the
            reference's).
        residual_init: ``'zero'`` (default): each modality block's second Linear ``W2``
            starts at weight 0, so at initialisation the branch does not read ``z_i`` and the
            modality stage converges in a few steps; ``'default'``:
            PyTorch's Linear initialisation (the reference's). The function computed is the
            same either way.
        modality_block: ``'plain'`` (default): ``z_i' = ReLU(W2 ReLU(GN1(W1 z_i)) + x_i)``,
            which keeps the injection's scale; ``'residual'``: ``z_i' = GN3(ReLU(GN2(W2
            ReLU(GN1(W1 z_i)) + x_i) + z_i))`` (the reference's).
        fused_update: ``'sigmoid'`` (default): ``z_f' = ReLU(W_f (z_f * sigmoid(a)) + x_f)``,
            the gate bounded and the state not normalised; ``'groupnorm'``: ``z_f' = GN(ReLU(W_f
            (z_f * a) + x_f))`` (the reference's).
        output: ``'state+injection'`` (default): return ``z_f* + x_f``; ``'state'``: ``z_f*``
            (the reference's). :data:`PAPER_LAYER` holds the keywords of the reference's layer.

    Shapes:
        ``forward([(B, d_1), ..., (B, d_M)]) -> (B, width)``; ``(B, ...)`` inputs are
        flattened. Inputs must have the parameters' dtype and device.

    State after each forward (never in the return value):
        ``last_info``: dict of detached solver statistics, per sample where it says (B,):
        ``steps``, ``abs_residual``, ``rel_residual``, ``converged``, ``nan``, ``diverged``,
        ``iterations``, ``jac_loss`` (float or None), and when ``staged`` ``stages`` (each
        stage's own solver info; ``steps`` is then their sum); after the backward pass of the
        implicit mode also ``backward`` (the backward solve's statistics).
        ``jac_loss``: the penalty (scalar tensor with a graph) when ``jac_reg`` and training,
        else None; for inspection; objectives read it with :meth:`take_jacobian_penalty`.
        Running convergence counts: :meth:`convergence_stats`.

    Raises:
        ValueError / TypeError: fewer than 2 modalities, bad widths, ``width`` not a multiple
        of ``num_groups``, unknown solver or backward mode; on forward, wrong modality count
        or widths, dtype or device unlike the parameters', or NaN/Inf inputs.
    """

    def __init__(self, input_dims: Sequence[int], width: Optional[int] = None,
                 num_groups: int = DEQ_DEFAULTS.num_groups, always_project: bool = False,
                 solver: Union[str, Solver] = DEQ_DEFAULTS.solver, b_solver: Union[str, Solver, None] = None,
                 f_max_iter: int = DEQ_DEFAULTS.f_max_iter, b_max_iter: int = DEQ_DEFAULTS.b_max_iter,
                 f_tol: float = DEQ_DEFAULTS.f_tol, b_tol: float = DEQ_DEFAULTS.b_tol,
                 stop_mode: str = DEQ_DEFAULTS.stop_mode, backward: str = DEQ_DEFAULTS.backward,
                 phantom_steps: int = DEQ_DEFAULTS.phantom_steps, phantom_tau: float = DEQ_DEFAULTS.phantom_tau,
                 unroll_steps: Optional[int] = None, jac_reg: bool = DEQ_DEFAULTS.jac_reg,
                 jac_vectors: int = DEQ_DEFAULTS.jac_vectors, compact: bool = DEQ_DEFAULTS.compact,
                 staged: bool = DEQ_DEFAULTS.staged, staged_backward: bool = DEQ_DEFAULTS.staged_backward,
                 implicit_max_residual: Optional[float] = DEQ_DEFAULTS.implicit_max_residual,
                 b_direct: Union[bool, str] = DEQ_DEFAULTS.b_direct,
                 trace: bool = False, solver_kwargs: Optional[Mapping[str, Any]] = None,
                 warn_every: int = DEQ_DEFAULTS.warn_every, gate_init: str = DEQ_DEFAULTS.gate_init,
                 injection: str = DEQ_DEFAULTS.injection, residual_init: str = DEQ_DEFAULTS.residual_init,
                 modality_block: str = DEQ_DEFAULTS.modality_block, fused_update: str = DEQ_DEFAULTS.fused_update,
                 output: str = DEQ_DEFAULTS.output) -> None:
        super().__init__()
        self.input_dims = check_input_dims(input_dims, "DEQFusion")
        if int(num_groups) < 1:
            raise ValueError(f"DEQFusion: num_groups must be >= 1, got {num_groups}")
        self.num_groups = int(num_groups)
        if width is None:
            width = _round_up(max(self.input_dims), self.num_groups)
        if int(width) < 1:
            raise ValueError(f"DEQFusion: width must be positive, got {width}")
        self.width = int(width)
        if self.width % self.num_groups != 0:
            raise ValueError(
                f"DEQFusion: width {self.width} is not divisible by num_groups {self.num_groups}; "
                f"GroupNorm needs equal groups, so pick a width that is a multiple of {self.num_groups} "
                f"(e.g. {_round_up(self.width, self.num_groups)}) or another num_groups")
        for name, value, allowed in (("stop_mode", stop_mode, ("abs", "rel")),
                                     ("gate_init", gate_init, ("zero", "default")),
                                     ("injection", injection, ("sum", "proj")),
                                     ("residual_init", residual_init, ("zero", "default")),
                                     ("modality_block", modality_block, ("residual", "plain")),
                                     ("fused_update", fused_update, ("groupnorm", "sigmoid")),
                                     ("output", output, ("state", "state+injection"))):
            if value not in allowed:
                raise ValueError(f"DEQFusion: {name} must be {' or '.join(map(repr, allowed))}, got {value!r}")
        for name, value in (("f_max_iter", f_max_iter), ("b_max_iter", b_max_iter), ("warn_every", warn_every)):
            if int(value) < 1:
                raise ValueError(f"DEQFusion: {name} must be >= 1, got {value}")
        self.out_dim = self.width

        # parameters (state_dict keys: projections.i.*, blocks.i.{lin1,lin2,gn1,gn2,gn3}.*,
        # fusion_block.{gate,fuse,gn}.*, weights, bias)
        self.projections = nn.ModuleList(
            nn.Linear(d, self.width) if (always_project or d != self.width) else nn.Identity()
            for d in self.input_dims)
        self.modality_block, self.fused_update, self.output = modality_block, fused_update, output
        self.blocks = nn.ModuleList(_modality_block_params(self.width, self.num_groups, modality_block)
                                    for _ in self.input_dims)
        self.residual_init = residual_init
        if residual_init == "zero":  # each residual branch starts without W2 (see DEQDefaults.residual_init)
            for block in self.blocks:
                nn.init.zeros_(block["lin2"].weight)
        self.gate_init = gate_init
        self.fusion_block = _fusion_block_params(self.width, self.num_groups, fused_update)
        if gate_init == "zero":   # the multiplicative term starts at 0 (see DEQDefaults.gate_init)
            nn.init.zeros_(self.fusion_block["gate"].weight)
            nn.init.zeros_(self.fusion_block["gate"].bias)
        self.injection = injection
        if injection == "sum":
            self.weights = nn.Parameter(torch.ones(self.num_modalities))   # w_i of x_f
            self.bias = nn.Parameter(torch.zeros(()))                       # b of x_f
            self.injection_proj = None
        else:                                                               # x_f = W_x [x_1; ..; x_M] + b_x
            self.injection_proj = nn.Linear(self.num_modalities * self.width, self.width)

        # the forward solve (staged or joint) and the gradient mode, resolved once
        self.solver_name = _solver_name(solver)
        opts = dict(solver_kwargs or {})
        self.compact = bool(compact)
        self.staged = bool(staged)
        self.staged_backward = bool(staged_backward)
        self.trace = bool(trace)
        self.f_tol, self.stop_mode = float(f_tol), stop_mode
        if b_direct == "auto":
            b_direct = self.width <= DEQ_DEFAULTS.b_direct_max_width
        if not isinstance(b_direct, bool):
            raise ValueError(f"DEQFusion: b_direct must be True, False or 'auto', got {b_direct!r}")
        self.b_direct = b_direct
        self._solve = functools.partial(
            get_solver(solver), max_iter=int(f_max_iter), tol=float(f_tol),
            stop_mode=stop_mode, compact=self.compact, trace=self.trace, **opts)
        self.backward_mode = str(backward).lower()
        self._grad = build_backward(
            self.backward_mode, b_solver=(solver if b_solver is None else b_solver), b_max_iter=int(b_max_iter),
            b_tol=float(b_tol), stop_mode=stop_mode, solver_options=opts, phantom_steps=phantom_steps,
            phantom_tau=phantom_tau, unroll_steps=int(f_max_iter if unroll_steps is None else unroll_steps),
            f_tol=float(f_tol), compact=self.compact, staged=self.staged_backward,
            implicit_max_residual=implicit_max_residual, direct=self.b_direct)
        self.jac_reg = bool(jac_reg)
        self.jac_vectors = int(jac_vectors)
        self.warn_every = int(warn_every)
        self.last_info: Optional[Dict[str, Any]] = None
        self.jac_loss: Optional[torch.Tensor] = None
        self._reset_state()

    def _reset_state(self) -> None:
        """Per-batch state and counters that copies do not carry."""
        self._jac_batch: Optional[int] = None      # batch size of the forward that computed jac_loss
        self._jac_taken = False                     # an objective read this forward's penalty
        self._jac_unused_warned = False
        self._stats = _ConvergenceCounts()          # for convergence_stats()
        self._window = _ConvergenceCounts()         # for the rate-limited warning

    @property
    def num_modalities(self) -> int:
        """Number of modalities M."""
        return len(self.input_dims)

    @property
    def state_dim(self) -> int:
        """Width ``(M + 1) * width`` of the flat equilibrium state."""
        return (self.num_modalities + 1) * self.width

    def __getstate__(self) -> Dict[str, Any]:
        # Pickling / deepcopy must not carry the last batch's statistics, graph and counters.
        state = self.__dict__.copy()
        state["last_info"] = None
        state["jac_loss"] = None
        for key in ("_jac_batch", "_jac_taken", "_jac_unused_warned", "_stats", "_window"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_state()

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: List[torch.Tensor], return_info: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, Any]]]:
        """Fuse M modality embeddings into the equilibrium fused state.

        Args:
            inputs: list of M tensors ``(B, d_i)`` (or ``(B, ...)``, flattened).
            return_info: also return the solver statistics (same dict as ``last_info``).

        Returns:
            ``(B, width)``, or ``((B, width), info)`` with ``return_info=True``.

        Raises:
            ValueError / TypeError: wrong modality count or widths, dtype or device unlike the
            parameters', NaN/Inf inputs.
        """
        f = self.deq_function(inputs)                                   # f_theta(.; x)
        B = f.inj.shape[0]
        z0 = f.inj_f.new_zeros(B, self.state_dim)                     # (B, (M + 1) d)
        needs_grad = torch.is_grad_enabled() and (
            f.inj.requires_grad or any(p.requires_grad for p in self.parameters()))
        want_jac = self.jac_reg and self.training and needs_grad
        if want_jac:
            self._warn_if_penalty_unused()
        # 1. solve z* = f(z*) without a graph (the unrolled mode iterates with one instead)
        if self._grad.solves_forward:
            with torch.no_grad():
                z, info = self._solve_fixed_point(f, z0)                # (B, (M + 1) d)
        else:
            z, info = self._grad.unroll(f, z0, needs_grad, self.trace)
        # 2. the gradient mode's backward hook, and what the Jacobian penalty needs
        z, jac_pair = self._grad.attach(f, z, info, needs_grad, want_jac)
        self.jac_loss = (jacobian_penalty(*jac_pair, n_vectors=self.jac_vectors)
                         if jac_pair is not None else None)
        self._jac_batch, self._jac_taken = (B if self.jac_loss is not None else None), False
        # 3. statistics
        info = self._detach_info(info)
        info["jac_loss"] = None if self.jac_loss is None else self.jac_loss.detach()
        self.last_info = info
        self._record_convergence(info)
        fused = z[:, self.num_modalities * self.width:]                 # z_f*, (B, d)
        if self.output == "state+injection":
            fused = fused + f.x_f                                       # z_f* + x_f
        return (fused, info) if return_info else fused

    def deq_function(self, inputs: Sequence[torch.Tensor]) -> _FusionMap:
        """``f_theta(.; x)`` for these inputs: a callable ``(B, state_dim) -> (B, state_dim)``
        (accepts an optional ``index`` of batch rows); for plots, benchmarks and checks."""
        return _FusionMap(self, self._check(inputs))

    def _solve_fixed_point(self, f: _FusionMap, z0: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Forward solve of ``z = f(z)`` from ``z0`` (B, state_dim): staged or joint."""
        if self.staged:
            return solve_staged(f, z0, self._solve, self.f_tol, self.stop_mode)
        return self._solve(f, z0)

    def _check(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        param = self.fusion_block["fuse"].weight
        bad = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.device != param.device]
        if bad:
            raise ValueError(f"DEQFusion: input of modality {bad[0]} is on {inputs[bad[0]].device} but the fusion's "
                             f"parameters are on {param.device}; move one with .to(device)")
        return check_fusion_inputs(inputs, "DEQFusion", self.input_dims, param.dtype)  # (B, d_i) each

    @staticmethod
    def _detach_info(info: Dict[str, Any]) -> Dict[str, Any]:
        # Keep the same dict object: the implicit backward adds info["backward"] to it later.
        for key, value in list(info.items()):
            if isinstance(value, torch.Tensor):
                info[key] = value.detach()
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                info[key] = [v.detach() for v in value]
            elif key == "stages":
                info[key] = [DEQFusion._detach_info(dict(v)) for v in value]
        return info

    # ------------------------------------------------------------------ Jacobian penalty
    def take_jacobian_penalty(self, batch_size: int) -> torch.Tensor:
        """The Jacobian penalty of the last forward, for the objective scoring that batch.

        The one way objectives read the penalty: it marks the penalty as used (a training
        forward whose penalty nobody took is reported once) and checks it belongs to the
        batch being scored.

        Args:
            batch_size: size of the batch the objective scores (``pred.shape[0]``).

        Returns:
            Scalar tensor with a graph to the parameters.

        Raises:
            ValueError: the last forward computed no penalty (built with ``jac_reg=False``,
            evaluation mode or no gradients), it was computed for a batch of another size,
            or it was already taken (stale: from a forward that was scored already).
        """
        if self.jac_loss is None or self._jac_batch is None:
            raise ValueError("DEQFusion computed no Jacobian penalty in its last forward: build it with "
                             "DEQFusion(..., jac_reg=True) and run the forward in training mode with "
                             "gradients enabled")
        if int(batch_size) != self._jac_batch:
            raise ValueError(f"DEQFusion's Jacobian penalty belongs to its last forward, a batch of "
                             f"{self._jac_batch} samples, but the objective scores {int(batch_size)}; "
                             f"score each batch right after its forward")
        if self._jac_taken:
            raise ValueError("DEQFusion's Jacobian penalty of the last forward was already taken (stale); "
                             "run a new forward for each loss")
        self._jac_taken = True
        return self.jac_loss

    def _warn_if_penalty_unused(self) -> None:
        if self._jac_batch is None or self._jac_taken or self._jac_unused_warned:
            return
        self._jac_unused_warned = True
        msg = ("DEQFusion computed a Jacobian penalty that no objective used; train with "
               "multizoo_ext.objectives.deq_objective(...) or build DEQFusion(jac_reg=False)")
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=5)

    # ------------------------------------------------------------------ convergence
    def _record_convergence(self, info: Mapping[str, Any]) -> None:
        converged = info["converged"]                                  # (B,) bool
        n, worst = converged.sum(), info["rel_residual" if self.stop_mode == "rel" else "abs_residual"].max()
        self._stats.add(n, worst, converged.numel())
        self._window.add(n, worst, converged.numel())
        if self._window.forwards >= self.warn_every:                  # one host sync per window
            window = self._window.take()
            if window["converged"] < window["samples"]:
                level = logging.WARNING if window["fraction_converged"] < DEQ_DEFAULTS.warn_fraction else logging.INFO
                logger.log(level,
                    "DEQFusion: %d of %d samples (%.1f%%) in the last %d forward(s) reached the %s "
                    "tolerance %g; max %s residual %.3g (raise f_max_iter, or expect approximate "
                    "fixed points)", window["converged"], window["samples"],
                    100.0 * window["fraction_converged"], window["forwards"], self.stop_mode, self.f_tol,
                    self.stop_mode, window["max_residual"])

    def convergence_stats(self, reset: bool = True) -> Dict[str, Union[int, float]]:
        """Forward-solve convergence since the last reset, for a training history.

        Returns:
            ``{'forwards', 'samples', 'converged'}`` counts, ``'fraction_converged'`` (1.0 when
            no sample was seen) and ``'max_residual'`` (of ``stop_mode``; 0.0 when none).
            One host sync.

        Args:
            reset: start counting afresh. Default: True.
        """
        return self._stats.take() if reset else self._stats.peek()

    def extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, width={self.width}, num_groups={self.num_groups}, "
                f"solver={self.solver_name!r}, backward={self.backward_mode!r}, jac_reg={self.jac_reg}, "
                f"gate_init={self.gate_init!r}, injection={self.injection!r}, residual_init={self.residual_init!r}, "
                f"modality_block={self.modality_block!r}, fused_update={self.fused_update!r}, output={self.output!r}, "
                f"b_direct={self.b_direct}")


#: The constructor keywords that give the published layer's function and initialisation.
PAPER_LAYER: Dict[str, str] = {"gate_init": "default", "injection": "sum", "residual_init": "default",
                               "modality_block": "residual", "fused_update": "groupnorm", "output": "state"}


@register_fusion("deq_paper", recipe=DEQ_PAPER_RECIPE)
def build_deq_paper(input_dims: Sequence[int], **kwargs: Any) -> DEQFusion:
    """The published layer, unchanged: :class:`DEQFusion` with the reference's function and
    initialisation (:data:`PAPER_LAYER`: residual modality blocks, GroupNorm fused update
    returning ``z_f*``, summed injection, PyTorch's initialisation of the gate and of the
    residual blocks), with the reference's iterative adjoint solve
    (``b_direct=False``), trained with the authors' recipe (Jacobian weight 0.1, fusion learning
    rate x 0.1). Other keywords as :class:`DEQFusion`."""
    return DEQFusion(input_dims, **{**PAPER_LAYER, "b_direct": False, **kwargs})


class _ConvergenceCounts:
    """Running counts of converged samples and the largest residual, kept on the device
    (no host sync until read)."""

    def __init__(self) -> None:
        self.forwards = 0
        self.samples = 0
        self.converged: Optional[torch.Tensor] = None
        self.max_residual: Optional[torch.Tensor] = None

    def add(self, converged: torch.Tensor, max_residual: torch.Tensor, samples: int) -> None:
        """One forward: ``converged`` samples (0-d), its largest residual (0-d; NaN propagates)."""
        self.converged = converged if self.converged is None else self.converged + converged
        self.max_residual = (max_residual if self.max_residual is None
                             else torch.maximum(self.max_residual, max_residual))
        self.forwards += 1
        self.samples += int(samples)

    def peek(self) -> Dict[str, Union[int, float]]:
        conv = 0 if self.converged is None else int(self.converged)
        worst = 0.0 if self.max_residual is None else float(self.max_residual)
        return {"forwards": self.forwards, "samples": self.samples, "converged": conv,
                "fraction_converged": conv / self.samples if self.samples else 1.0, "max_residual": worst}

    def take(self) -> Dict[str, Union[int, float]]:
        out = self.peek()
        self.__init__()
        return out


def find_deq(module: Optional[nn.Module]) -> Optional[DEQFusion]:
    """The first :class:`DEQFusion` in ``module`` or its children (e.g. inside a ReFNet
    wrapper's ``.fusion``), or None."""
    if module is None:
        return None
    if isinstance(module, DEQFusion):
        return module
    for sub in module.modules():
        if isinstance(sub, DEQFusion):
            return sub
    return None
