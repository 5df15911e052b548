"""Deep Equilibrium fusion (Ni, Bai, Zhang, Yao, Mei, arXiv 2306.16645) as a MultiBench fusion.

Fusion is the equilibrium of a recursive process. With inputs ``x_1..x_M`` (projected to one
width ``d``), the state ``z = (z_1, ..., z_M, z_f)`` starts at zeros and one application of
``f_theta`` is

- per modality (residual block, its own weights per modality):
  ``z_i' = GN(ReLU(GN(W2 ReLU(GN(W1 z_i)) + x_i) + z_i))``;
- purify-then-combine fusion with one gate ``W_g`` shared by all modalities, using the
  already-updated ``z_i'`` (Gauss-Seidel order):
  ``a_i = W_g(z_i' + z_f)``, ``z_f' = GN(ReLU(W_f sum_i (z_f * a_i) + x_f))``;
- injection ``x_f = sum_i w_i x_i + b`` with learnable scalars (``w_i = 1``, ``b = 0`` at init).

The forward pass solves ``z* = f_theta(z*; x)`` (Anderson by default, per-sample stopping,
see :mod:`multizoo_ext.fusions.deq_solvers`; stage by stage, see below) and returns ``z_f*``
``(B, width)``; gradients
come from implicit differentiation by default (:mod:`multizoo_ext.fusions.deq_backward`).

Implementation notes (same function as the description, computed faster):

- ``sum_i z_f * W_g(z_i' + z_f) = z_f * W_g(sum_i z_i' + M z_f)`` (``W_g`` is affine; its
  bias is counted M times), so the gate costs one matrix product instead of M.
- The M per-modality GroupNorms of one stage run as one ``group_norm`` over the
  concatenated ``(B, M * d)`` state with ``M * num_groups`` groups (identical groups).
- Injections (``x_i`` plus the second linear layer's bias, ``x_f`` plus ``W_f``'s bias) are
  computed once per forward, not once per solver iteration.
- GroupNorm of a ``(B, C)`` state runs as a layer norm over ``(B, groups, C / groups)`` plus
  the affine (same values; ``group_norm``'s CPU kernel is built for spatial inputs and is
  2-5x slower here, forward and backward).
- ``f_theta`` is block-triangular (``z_i'`` never reads ``z_f``), so by default the fixed
  point is solved in two stages, the modality states first, then the fused state given them
  (:mod:`multizoo_ext.fusions.deq_staged`; ``staged=False`` solves the joint state at once, as
  the reference does); the backward's adjoint system likewise, last stage first
  (``staged_backward``). Samples whose forward residual stays above ``implicit_max_residual``
  get the Jacobian-free gradient instead of the implicit one (see :class:`DEQDefaults`).
- :meth:`DEQFusion.naive_step` is the readable module-by-module version, kept to check it.

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
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from multizoo_ext.fusions.deq_backward import (
    DEFAULT_JAC_VECTORS,
    DEFAULT_PHANTOM_STEPS,
    DEFAULT_PHANTOM_TAU,
    build_backward,
    jacobian_penalty,
)
from multizoo_ext.fusions.deq_solvers import get_solver
from multizoo_ext.fusions.deq_staged import solve_staged
from multizoo_ext.registry import Recipe, register_fusion
from multizoo_ext.validation import check_modalities, check_widths

__all__ = ["DEQ_DEFAULTS", "DEQDefaults", "DEQFusion", "find_deq"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DEQDefaults:
    """Defaults of :class:`DEQFusion`, in one place (solver internals such as Anderson's
    ``m = 6``, ``lam = 1e-4``, ``beta = 1`` live in ``deq_solvers``)."""

    #: GroupNorm groups per width-``d`` block (reference: 4).
    num_groups: int = 4
    #: Forward / backward iteration caps (reference: 55 / 56; 105 / 106 on MM-IMDB).
    f_max_iter: int = 55
    b_max_iter: int = 56
    #: Per-sample relative tolerances. Forward 1e-3 is the locuslab/deq default. The implicit
    #: gradient at a z* that is only 1e-3-accurate is itself only about that accurate, so the
    #: backward system ``y = y J + g`` is solved to the same 1e-3 (measured at width 512: about
    #: 0.5 % relative error in the parameter gradient, well below minibatch noise, for ~35
    #: instead of ~50 vector-Jacobian products per sample). The reference (jinhong-ni/DEQFusion)
    #: stops both solves when the *whole batch's* absolute residual norm ``||f(z) - z||`` falls
    #: below 1e-3 (its ``stop_mode='abs'``, ``eps=1e-3``), which at batch 128 and width 512 is
    #: rarely met, so it runs to the caps (measured: per-sample relative residual ~1e-4 forward,
    #: ~1e-2 backward; see docs/RESULTS.md).
    f_tol: float = 1e-3
    b_tol: float = 1e-3
    stop_mode: str = "rel"
    solver: str = "anderson"
    backward: str = "implicit"
    #: Drop converged samples from the solver's working batch (helps when samples converge
    #: at different speeds; one host sync per check).
    compact: bool = True
    #: Solve the block-triangular forward fixed point stage by stage (modality states, then
    #: the fused state): the same joint fixed point for fewer and cheaper evaluations (see
    #: ``deq_staged``). False solves the joint state at once, as the reference does.
    staged: bool = True
    #: Solve the backward (adjoint) system stage by stage too: the same solution when the
    #: solves converge, and faster. Without the Jacobian-free fallback below it trained worse
    #: than the joint backward from random initialisation (digits, 5 seeds: 0.804 vs 0.889);
    #: with it the two train alike (digits 0.913 vs 0.928, ROSMAP 0.762 vs 0.747, 5 seeds each;
    #: see docs/RESULTS.md).
    staged_backward: bool = True
    #: Samples whose forward residual stays above this (10x the forward tolerance) get the
    #: Jacobian-free gradient instead of the implicit one, which is only meaningful at a fixed
    #: point. From random initialisation most samples are far from it (digits: 5-20 % within
    #: tolerance in the first epochs), and the implicit gradient there hurt training: runner,
    #: 5 seeds, staged forward and joint backward, digits 0.928 +- 0.011 with the fallback vs
    #: 0.881 +- 0.014 without (ROSMAP 0.747 vs 0.721); see docs/RESULTS.md. None: implicit for
    #: every sample (the reference).
    implicit_max_residual: Optional[float] = 1e-2


#: The single instance the constructor reads.
DEQ_DEFAULTS = DEQDefaults()


def _group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.group_norm`` of a ``(B, C)`` tensor, as a layer norm over ``(B, groups, C / groups)``
    plus the per-channel affine: the same values (within float rounding), and on the CPU
    about 2x faster forward and 2-5x faster backward than ``group_norm``, whose kernel is
    built for spatial ``(B, C, H, W)`` inputs."""
    B, C = x.shape
    normed = F.layer_norm(x.view(B, groups, C // groups), (C // groups,), eps=eps)
    return torch.addcmul(bias, normed.view(B, C), weight)


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


class _ResidualBlock(nn.Module):
    """Per-modality block ``z' = GN3(ReLU(GN2(W2 ReLU(GN1(W1 z)) + x) + z))``, (B, d) -> (B, d)."""

    def __init__(self, width: int, num_groups: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, width)
        self.lin2 = nn.Linear(width, width)
        self.gn1 = nn.GroupNorm(num_groups, width)
        self.gn2 = nn.GroupNorm(num_groups, width)
        self.gn3 = nn.GroupNorm(num_groups, width)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gn1(self.lin1(z)))
        h = self.gn2(self.lin2(h) + x) + z
        return self.gn3(F.relu(h))


class _FusionBlock(nn.Module):
    """Purify-then-combine ``z_f' = GN(ReLU(W_f sum_i (z_f * W_g(z_i' + z_f)) + x_f))``."""

    def __init__(self, width: int, num_groups: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, width)
        self.fuse = nn.Linear(width, width)
        self.gn = nn.GroupNorm(num_groups, width)

    def forward(self, z_f: torch.Tensor, z_mods: Sequence[torch.Tensor], x_f: torch.Tensor) -> torch.Tensor:
        purified = sum(z_f * self.gate(z_i + z_f) for z_i in z_mods)
        return self.gn(F.relu(self.fuse(purified) + x_f))


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


class _FusionMap:
    """``f_theta(z; x)`` for one forward pass: ``(b, (M + 1) d) -> (b, (M + 1) d)``.

    Parameters are gathered once (with their graph, so the recomputation at ``z*`` trains
    them) and the injections precomputed. Row ``r`` of ``z`` is sample ``index[r]`` of the
    batch (all samples, in order, when ``index`` is None), so the solver can drop converged
    samples.

    The map is lower block-triangular in two stages (the protocol of
    :mod:`multizoo_ext.fusions.deq_staged`): ``stage_sizes = (M d, d)``; stage 0 is the
    modality update ``z_m' = f_m(z_m)``, which never reads ``z_f``; stage 1 is the fused update
    ``z_f' = f_f(z_f; z_m')`` given the updated modality states.
    """

    def __init__(self, layer: "DEQFusion", x: torch.Tensor, x_f: torch.Tensor) -> None:
        blocks, fb = layer.blocks, layer.fusion_block
        M, d = layer.num_modalities, layer.width
        self.M, self.d = M, d
        self.stage_sizes = (M * d, d)
        self.groups = layer.num_groups
        self.eps = blocks[0].gn1.eps
        self.w1 = [b.lin1.weight for b in blocks]
        self.b1 = [b.lin1.bias for b in blocks]
        self.w2t = [b.lin2.weight.t() for b in blocks]
        self.gn = [(torch.cat([getattr(b, n).weight for b in blocks]),     # (M d,) each
                    torch.cat([getattr(b, n).bias for b in blocks])) for n in ("gn1", "gn2", "gn3")]
        self.wg, self.bg = fb.gate.weight, fb.gate.bias * M
        self.wft = fb.fuse.weight.t()
        self.gnf = (fb.gn.weight, fb.gn.bias)
        self.inj = x + torch.stack([b.lin2.bias for b in blocks])   # (B, M, d): x_i + b2_i
        self.inj_f = x_f + fb.fuse.bias                              # (B, d):    x_f + b_f
        self._rows = _Rows(self.inj, self.inj_f)

    def modalities(self, z_m: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Stage 0, the M residual blocks: ``z_m (b, M d) -> z_m' (b, M d)``."""
        M, d, G, eps = self.M, self.d, self.groups, self.eps
        inj = self._rows(index)[0]                                                 # (b, M, d)
        # split (not slicing) so that the backward pass assembles one gradient tensor
        # instead of zero-filling a full-width one per slice
        zs = z_m.split(d, dim=1)                                                    # M x (b, d)
        h = torch.cat([F.linear(zs[i], self.w1[i], self.b1[i]) for i in range(M)], 1)
        # in-place ReLU / add on fresh intermediates whose producers' backward does not read
        # them: fewer allocations (on the CPU often fresh pages) and passes
        h = _group_norm(h, M * G, *self.gn[0], eps).relu_()                       # (b, M d)
        hs = h.split(d, dim=1)
        h = torch.cat([torch.addmm(inj[:, i], hs[i], self.w2t[i]) for i in range(M)], 1)
        h = _group_norm(h, M * G, *self.gn[1], eps).add_(z_m).relu_()
        return _group_norm(h, M * G, *self.gn[2], eps)

    def _fuse(self, z_f: torch.Tensor, a: torch.Tensor, inj_f: torch.Tensor) -> torch.Tensor:
        # z_f' = GN(ReLU(W_f (z_f * sum_i a_i) + x_f)), (b, d)
        return _group_norm(torch.addmm(inj_f, z_f * a, self.wft).relu_(), self.groups, *self.gnf, self.eps)

    def __call__(self, z: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        M, d = self.M, self.d
        inj_f = self._rows(index)[1]                                               # (b, d)
        b = z.shape[0]
        z_m, z_f = z.split([M * d, d], dim=1)                                      # (b, M d), (b, d)
        z_m = self.modalities(z_m, index)                                           # z_i', (b, M d)
        s = z_m.view(b, M, d).sum(1) + M * z_f                                      # (b, d)
        a = F.linear(s, self.wg, self.bg)                                           # sum_i a_i
        return torch.cat([z_m, self._fuse(z_f, a, inj_f)], 1)

    def stage(self, k: int, states: Sequence[torch.Tensor],
              outputs: Optional[Sequence[torch.Tensor]] = None) -> Callable[..., torch.Tensor]:
        """Map of stage ``k`` given the earlier stages' full-batch ``states`` (and, if
        already computed, their ``outputs`` ``f_j(states[j])``): stage 0 ``(b, M d) -> (b, M d)``,
        stage 1 ``(b, d) -> (b, d)``; both accept a row ``index``."""
        if k == 0:
            return self.modalities
        if k != 1:
            raise IndexError(f"DEQ fusion map has 2 stages, asked for stage {k}")
        z_m = outputs[0] if outputs else self.modalities(states[0])                 # z_m', (B, M d)
        return _FusedStage(self, z_m)


class _FusedStage:
    """Stage 1 of :class:`_FusionMap` with the updated modality states ``z_m'`` fixed:
    ``z_f (b, d) -> z_f' (b, d)``; ``W_g sum_i z_i'`` is computed once, so an evaluation
    costs two ``(d, d)`` products."""

    def __init__(self, fmap: _FusionMap, z_m: torch.Tensor) -> None:
        self.fmap = fmap
        B = z_m.shape[0]
        const = F.linear(z_m.view(B, fmap.M, fmap.d).sum(1), fmap.wg, fmap.bg)   # (B, d)
        self._rows = _Rows(const, fmap.inj_f)

    def __call__(self, z_f: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        const, inj_f = self._rows(index)
        a = torch.addmm(const, z_f, self.fmap.wg.t(), alpha=self.fmap.M)        # W_g(sum z_i' + M z_f) + M b_g
        return self.fmap._fuse(z_f, a, inj_f)


#: DEQ fusion trains with its Jacobian penalty (``jac_reg=True``, the constructor's default)
#: added by ``multizoo_ext.objectives.deq_objective`` (weight 0.1), and the fusion's parameters
#: at 0.1 x the learning rate, as the authors' MM-IMDB script does.
@register_fusion("deq", recipe=Recipe(objective="deq", fusion_lr_mult=0.1))
class DEQFusion(nn.Module):
    """Deep Equilibrium fusion: the fused state of the fixed point ``z* = f_theta(z*; x)``.

    Args:
        input_dims: widths ``d_i`` of the M >= 2 modality embeddings (any widths).
        width: DEQ width ``d`` (= ``out_dim``). Default: ``max(input_dims)`` rounded up to a
            multiple of ``num_groups``, so encoders of equal width (MultiBench's usual case,
            e.g. 512) are used as they are.
        num_groups: GroupNorm groups; ``width`` must be a multiple. Default: 4 (reference).
        always_project: give every modality a learned ``Linear(d_i, width)``. Default: False,
            which projects only the modalities whose width differs from ``width`` (the
            authors' answer for unequal widths) and feeds the others unchanged.
        solver: forward solver, ``'anderson'`` (default), ``'broyden'`` or
            ``'fixed_point_iter'``.
        b_solver: backward solver of the implicit mode. Default: same as ``solver``.
        f_max_iter, b_max_iter: iteration caps. Default: 55 / 56 (reference).
        f_tol, b_tol: per-sample tolerances. Default: 1e-3 / 1e-3 (see :class:`DEQDefaults`).
        stop_mode: ``'rel'`` (default) or ``'abs'`` residual for stopping.
        backward: gradient mode, ``'implicit'`` (default), ``'phantom'`` or ``'unrolled'``.
        phantom_steps, phantom_tau: phantom mode. Default: 5, 1.0.
        unroll_steps: iterations of the unrolled mode. Default: ``f_max_iter``.
        jac_reg: compute the Hutchinson Jacobian penalty ``||J_f(z*)||_F^2 / numel`` in
            training (kept as ``self.jac_loss`` for the objective, see
            ``multizoo_ext.objectives.deq``). Default: True (the recipe the method trains with).
        jac_vectors: random vectors of the estimate. Default: 2 (reference).
        compact: let the forward and backward solvers drop converged samples from their
            working batch. Default: True.
        staged: solve the (block-triangular) forward fixed point stage by stage, the modality
            states first, then the fused state, each with its own solver run: the same joint
            fixed point, within the same joint tolerance, for fewer and cheaper evaluations
            (:mod:`multizoo_ext.fusions.deq_staged`). Caps then apply per stage and
            ``steps`` counts stage evaluations. False: one solve of the joint state (the
            reference's way). Default: True.
        implicit_max_residual: implicit mode: samples whose forward residual (of
            ``stop_mode``) is above this get the Jacobian-free gradient (one application of
            ``f`` at the returned iterate) instead of the implicit one, which is only
            meaningful at a fixed point. None: implicit for every sample (the reference's
            behaviour). Default: 1e-2 (see :class:`DEQDefaults`).
        staged_backward: solve the implicit mode's adjoint system stage by stage as well
            (last stage first): faster, the same gradient when the solves converge (see
            :class:`DEQDefaults` for how it trains). False: one joint adjoint solve (the
            reference's way). Default: True.
        trace: keep the per-iteration residuals in the info (``trace_abs``/``trace_rel``; per
            stage, in ``info['stages']``, when ``staged``). Default: False.
        solver_kwargs: extra solver options for both solves (e.g. ``{'m': 5, 'lam': 1e-4,
            'beta': 1.0, 'check_every': 4}``); solver defaults otherwise.
        check_inputs: raise on NaN/Inf inputs (one host sync per forward). Default: True.

    Shapes:
        ``forward([(B, d_1), ..., (B, d_M)]) -> (B, width)``; ``(B, ...)`` inputs are
        flattened.

    State after each forward (never in the return value):
        ``last_info``: dict of detached solver statistics, per sample where it says (B,):
        ``steps``, ``abs_residual``, ``rel_residual``, ``converged``, ``nan``, ``diverged``,
        ``iterations``, ``jac_loss`` (float or None), and when ``staged`` ``stages`` (each
        stage's own solver info; ``steps`` is then their sum); after the backward pass of the implicit
        mode also ``backward`` (the backward solve's statistics).
        ``jac_loss``: scalar tensor with a graph when ``jac_reg`` and training, else None.

    Raises:
        ValueError / TypeError: fewer than 2 modalities, bad widths, ``width`` not a multiple
        of ``num_groups``, unknown solver or backward mode; on forward, wrong modality count
        or widths, or NaN/Inf inputs.
    """

    def __init__(self, input_dims: Sequence[int], width: Optional[int] = None,
                 num_groups: int = DEQ_DEFAULTS.num_groups, always_project: bool = False,
                 solver: str = DEQ_DEFAULTS.solver, b_solver: Optional[str] = None,
                 f_max_iter: int = DEQ_DEFAULTS.f_max_iter, b_max_iter: int = DEQ_DEFAULTS.b_max_iter,
                 f_tol: float = DEQ_DEFAULTS.f_tol, b_tol: float = DEQ_DEFAULTS.b_tol,
                 stop_mode: str = DEQ_DEFAULTS.stop_mode, backward: str = DEQ_DEFAULTS.backward,
                 phantom_steps: int = DEFAULT_PHANTOM_STEPS, phantom_tau: float = DEFAULT_PHANTOM_TAU,
                 unroll_steps: Optional[int] = None, jac_reg: bool = True,
                 jac_vectors: int = DEFAULT_JAC_VECTORS, compact: bool = DEQ_DEFAULTS.compact,
                 staged: bool = DEQ_DEFAULTS.staged, staged_backward: bool = DEQ_DEFAULTS.staged_backward,
                 implicit_max_residual: Optional[float] = DEQ_DEFAULTS.implicit_max_residual,
                 trace: bool = False, solver_kwargs: Optional[Mapping[str, Any]] = None,
                 check_inputs: bool = True) -> None:
        super().__init__()
        self.input_dims = self._dims(input_dims)
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
        if stop_mode not in ("abs", "rel"):
            raise ValueError(f"DEQFusion: stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
        for name, value in (("f_max_iter", f_max_iter), ("b_max_iter", b_max_iter)):
            if int(value) < 1:
                raise ValueError(f"DEQFusion: {name} must be >= 1, got {value}")
        self.out_dim = self.width

        self.projections = nn.ModuleList(
            nn.Linear(d, self.width) if (always_project or d != self.width) else nn.Identity()
            for d in self.input_dims)
        self.blocks = nn.ModuleList(_ResidualBlock(self.width, self.num_groups) for _ in self.input_dims)
        self.fusion_block = _FusionBlock(self.width, self.num_groups)
        self.weights = nn.Parameter(torch.ones(self.num_modalities))   # w_i of x_f
        self.bias = nn.Parameter(torch.zeros(()))                       # b of x_f

        self.solver_name = str(solver).lower()
        opts = dict(solver_kwargs or {})
        self.compact = bool(compact)
        self.staged = bool(staged)
        self.staged_backward = bool(staged_backward)
        self.trace = bool(trace)
        self.f_tol, self.stop_mode = float(f_tol), stop_mode
        self._solve = functools.partial(
            get_solver(self.solver_name), max_iter=int(f_max_iter), tol=float(f_tol),
            stop_mode=stop_mode, compact=self.compact, trace=self.trace, **opts)
        self.backward_mode = str(backward).lower()
        self._grad = build_backward(
            self.backward_mode, b_solver=(b_solver or self.solver_name), b_max_iter=int(b_max_iter),
            b_tol=float(b_tol), stop_mode=stop_mode, solver_options=opts, phantom_steps=phantom_steps,
            phantom_tau=phantom_tau, unroll_steps=int(f_max_iter if unroll_steps is None else unroll_steps),
            f_tol=float(f_tol), compact=self.compact, staged=self.staged_backward,
            implicit_max_residual=implicit_max_residual)
        self.jac_reg = bool(jac_reg)
        self.jac_vectors = int(jac_vectors)
        self.check_inputs = bool(check_inputs)
        self.last_info: Optional[Dict[str, Any]] = None
        self.jac_loss: Optional[torch.Tensor] = None

    @staticmethod
    def _dims(input_dims: Sequence[int]) -> List[int]:
        if input_dims is None or isinstance(input_dims, (str, bytes)):
            raise TypeError(f"DEQFusion: input_dims must be a sequence of positive ints, got {input_dims!r}")
        try:
            dims = [int(d) for d in input_dims]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"DEQFusion: input_dims must be a sequence of positive ints, got {input_dims!r}") from exc
        if len(dims) < 2:
            raise ValueError(f"DEQFusion fuses at least 2 modalities, got input_dims {dims}")
        if any(d <= 0 for d in dims):
            raise ValueError(f"DEQFusion: input_dims must be positive, got {dims}")
        return dims

    @property
    def num_modalities(self) -> int:
        """Number of modalities M."""
        return len(self.input_dims)

    @property
    def state_dim(self) -> int:
        """Width ``(M + 1) * width`` of the flat equilibrium state."""
        return (self.num_modalities + 1) * self.width

    def __getstate__(self) -> Dict[str, Any]:
        # Pickling / deepcopy must not carry the last batch's statistics and graph.
        state = self.__dict__.copy()
        state["last_info"] = None
        state["jac_loss"] = None
        return state

    # ------------------------------------------------------------------ pieces
    def _check(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        check_modalities(inputs, self.num_modalities, "DEQFusion")
        flat = [torch.flatten(x, 1) for x in inputs]                   # (B, d_i)
        check_widths(flat, self.input_dims, "DEQFusion")
        if not all(x.is_floating_point() for x in flat):
            raise TypeError(f"DEQFusion expects floating-point inputs, got {[x.dtype for x in flat]}")
        if self.check_inputs:
            bad = [i for i, ok in enumerate(torch.stack([torch.isfinite(x).all() for x in flat]).tolist())
                   if not ok]
            if bad:
                raise ValueError(f"DEQFusion: input(s) of modality {bad} contain NaN/Inf values; "
                                 f"clean or impute the data before fusing")
        return flat

    def injections(self, inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Projected inputs ``x`` (B, M, width) and the fused injection ``x_f`` (B, width)."""
        flat = self._check(inputs)
        x = torch.stack([p(t) for p, t in zip(self.projections, flat)], 1)  # (B, M, d)
        x_f = torch.einsum("m,bmd->bd", self.weights, x) + self.bias
        return x, x_f

    def deq_function(self, inputs: Sequence[torch.Tensor]) -> _FusionMap:
        """``f_theta(.; x)`` for these inputs: a callable ``(B, state_dim) -> (B, state_dim)``
        (accepts an optional ``index`` of batch rows); for plots, benchmarks and checks."""
        x, x_f = self.injections(inputs)
        return _FusionMap(self, x, x_f)

    def naive_step(self, z: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """One application of ``f_theta`` written module by module (slow; for checks).

        Args:
            z: ``(B, state_dim)`` state ``(z_1, ..., z_M, z_f)``.
            inputs: the M modality tensors.

        Returns:
            ``(B, state_dim)``.
        """
        x, x_f = self.injections(inputs)
        d, M = self.width, self.num_modalities
        zs = [z[:, i * d:(i + 1) * d] for i in range(M + 1)]
        z_mods = [blk(zs[i], x[:, i]) for i, blk in enumerate(self.blocks)]
        z_f = self.fusion_block(zs[M], z_mods, x_f)
        return torch.cat(z_mods + [z_f], 1)

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: List[torch.Tensor], return_info: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, Any]]]:
        """Fuse M modality embeddings into the equilibrium fused state.

        Args:
            inputs: list of M tensors ``(B, d_i)``.
            return_info: also return the solver statistics (same dict as ``last_info``).

        Returns:
            ``(B, width)``, or ``((B, width), info)`` with ``return_info=True``.

        Raises:
            ValueError / TypeError: wrong modality count or widths, NaN/Inf inputs.
        """
        f = self.deq_function(inputs)
        B = f.inj.shape[0]
        z0 = f.inj_f.new_zeros(B, self.state_dim)                     # (B, (M + 1) d)
        needs_grad = torch.is_grad_enabled() and (
            f.inj.requires_grad or any(p.requires_grad for p in self.parameters()))
        want_jac = self.jac_reg and self.training and needs_grad
        z, info, jac_pair = self._grad.run(f, z0, self._solve_fixed_point, needs_grad, want_jac, self.trace)
        self.jac_loss = (jacobian_penalty(*jac_pair, n_vectors=self.jac_vectors)
                         if jac_pair is not None else None)
        info = self._detach_info(info)
        info["jac_loss"] = None if self.jac_loss is None else self.jac_loss.detach()
        self.last_info = info
        fused = z[:, self.num_modalities * self.width:]                 # z_f*, (B, d)
        return (fused, info) if return_info else fused

    def _solve_fixed_point(self, f: _FusionMap, z0: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Forward solve of ``z = f(z)`` from ``z0`` (B, state_dim): staged or joint."""
        if self.staged:
            return solve_staged(f, z0, self._solve, self.f_tol, self.stop_mode)
        return self._solve(f, z0)

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

    def extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, width={self.width}, num_groups={self.num_groups}, "
                f"solver={self.solver_name!r}, backward={self.backward_mode!r}, jac_reg={self.jac_reg}")


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
