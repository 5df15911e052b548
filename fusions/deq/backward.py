"""Gradient modes for deep equilibrium layers, resolved once into a callable (torchdeq style).

A mode is built once, when the layer is built (:func:`build_backward`). Every forward, the
layer first solves ``z* = f(z*)`` without a graph (modes with ``solves_forward``; the unrolled
mode instead iterates with one, ``mode.unroll(f, z0, needs_grad, trace)``), then hands the
result to ``mode.attach(f, z, info, needs_grad, want_jac)``, which gives ``z`` the mode's
gradient; ``forward`` never branches on the mode's name. ``f`` maps a flat state ``(B, n)`` to
``(B, n)`` row-wise and closes over the parameters. Nothing here calls back into the layer.

Modes:

- ``"implicit"`` (:class:`ImplicitBackward`, the DEQ default): solve without a graph, then
  recompute ``f`` once at ``z*`` with a graph. In the backward pass the incoming gradient
  ``g`` (B, n) is replaced by the solution ``y`` of ``y = y J_f(z*) + g``, found by a solver
  (with its own tolerance and cap, per-sample stopping) on vector-Jacobian products, and
  ``y`` then flows through the recomputed ``f`` to the parameters and inputs. Memory does not
  grow with the number of forward iterations. With ``staged=True`` and a staged
  (block-triangular) ``f``, the adjoint system is solved one stage at a time, last stage
  first, each on the vector-Jacobian products of its own stage map
  (:mod:`multizoo_ext.fusions.deq.staged`). Each forward builds its own
  ``torch.autograd.Function`` node, so several forwards before one backward (or a backward
  with ``retain_graph=True`` run twice) are safe.
- ``"phantom"`` (:class:`PhantomBackward`): after the graph-free solve, ``k`` damped steps
  ``z <- (1 - tau) z + tau f(z)`` from ``z*`` with a graph; plain backprop through them (a
  truncated Neumann series of the implicit gradient; cheap, approximate).
- ``"unrolled"`` (:class:`UnrolledBackward`, ablation): no solver; ``k`` weight-tied
  iterations ``z <- f(z)`` from ``z0`` with a graph and plain backprop (memory grows with
  ``k``).

``attach`` returns ``(z, jac_pair)``: ``z`` (B, n) carries the graph when ``needs_grad``;
``jac_pair = (f(z_in), z_in)`` when ``want_jac`` (for :func:`jacobian_penalty`), else None.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from multizoo_ext.fusions.deq.solvers import get_solver, residuals
from multizoo_ext.fusions.deq.staged import is_staged, merge_stage_infos, stage_tolerance

__all__ = [
    "BACKWARD_MODES",
    "DEFAULT_JAC_VECTORS",
    "DEFAULT_PHANTOM_STEPS",
    "DEFAULT_PHANTOM_TAU",
    "ImplicitBackward",
    "PhantomBackward",
    "UnrolledBackward",
    "build_backward",
    "jacobian_penalty",
]

Func = Callable[[torch.Tensor], torch.Tensor]
Solve = Callable[..., Tuple[torch.Tensor, Dict[str, Any]]]
Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]
JacPair = Optional[Tuple[torch.Tensor, Inputs]]

# ---------------------------------------------------------------------------- defaults
#: Phantom gradient: unrolled steps from the fixed point and their damping (torchdeq's
#: phantom-gradient paper uses a handful of steps; tau = 1 is the truncated Neumann series).
DEFAULT_PHANTOM_STEPS = 5
DEFAULT_PHANTOM_TAU = 1.0
#: Random vectors of the Hutchinson estimate of ||J_f||_F^2 (reference: 2).
DEFAULT_JAC_VECTORS = 2
#: With compaction, the backward solve drops converged samples once at least this fraction
#: of its working rows is done: each drop recomputes f on the remaining rows (about one
#: vector-Jacobian product's cost), which later products then save.
BACKWARD_COMPACT_FRACTION = 0.5


def jacobian_penalty(fz: torch.Tensor, z_in: Inputs, n_vectors: int = DEFAULT_JAC_VECTORS,
                     create_graph: bool = True) -> torch.Tensor:
    """Hutchinson estimate of ``||J_f(z)||_F^2 / numel(z)``.

    ``E_v ||v^T J||^2 = ||J||_F^2`` for ``v ~ N(0, I)``; averaged over ``n_vectors`` draws
    and divided by ``z.numel()`` (``B * n``), as in the reference.

    Args:
        fz: ``f(z_in)`` (B, n), with a graph back to ``z_in``.
        z_in: ``(B, n)`` leaf that requires grad, or the leaves of its column blocks (a staged
            graph, :class:`StagedGraph`): ``J`` is then the Jacobian w.r.t. all of them.
        n_vectors: random vectors. Default: 2.
        create_graph: keep the graph so the estimate can be trained on. Default: True.

    Returns:
        Scalar tensor (>= 0).
    """
    inputs = [z_in] if isinstance(z_in, torch.Tensor) else list(z_in)
    total = fz.new_zeros(())
    for _ in range(int(n_vectors)):
        v = torch.randn_like(fz)
        for vj in torch.autograd.grad(fz, inputs, v, retain_graph=True, create_graph=create_graph):
            total = total + vj.pow(2).sum()
    return total / (int(n_vectors) * sum(t.numel() for t in inputs))


def _solve_adjoint(f: Callable[..., torch.Tensor], out: torch.Tensor, inp: torch.Tensor,
                   rhs: torch.Tensor, solve: Solve, compact: Union[bool, float]
                   ) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Solve ``y = y J_f(z) + rhs`` (all ``(B, n)``) on vector-Jacobian products.

    ``out = f(inp)`` is the full-batch graph at the leaf ``inp`` (``z`` with grad). When the
    solver drops converged samples (compact), ``f`` is recomputed on the remaining rows once,
    so later products cost only those rows.
    """
    B = rhs.shape[0]
    graph: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {B: (out, inp, rhs)}

    def step(y: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        b = y.shape[0]                                                # y J_f(z) + rhs, (b, n)
        if b not in graph:
            assert index is not None
            with torch.enable_grad():
                zi = inp.detach().index_select(0, index).requires_grad_()
                fzi = f(zi, index)
            for key in [k for k in graph if k != B]:
                del graph[key]
            graph[b] = (fzi, zi, rhs.index_select(0, index))
        o, i, r = graph[b]
        (vjp,) = torch.autograd.grad(o, i, y, retain_graph=True)
        return vjp + r

    # Start at rhs, which is the first fixed-point iterate from 0 (saves one VJP).
    y, info = solve(step, rhs, compact=compact)
    graph.clear()
    return y, info


def _solve_adjoint_direct(jac: torch.Tensor, rhs: torch.Tensor, tol: float, stop_mode: str
                          ) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Solve ``y = y J + rhs`` exactly for a block-diagonal per-sample ``J`` given as its blocks
    ``jac`` (B, nb, s, s) (``rhs`` (B, nb s)): one batched linear solve ``y (I - J) = rhs``.
    A sample whose system is singular (or not finite) gets ``y = rhs``, the Jacobian-free
    gradient, and is flagged ``nan``. The info has the solvers' keys (``steps`` 1) and
    ``direct`` True."""
    B, nb, s, _ = jac.shape
    r = rhs.reshape(B, nb, 1, s)
    eye = torch.eye(s, device=jac.device, dtype=jac.dtype)
    y, status = torch.linalg.solve_ex(eye - jac, r, left=False)                  # (B, nb, 1, s)
    fy = torch.matmul(y, jac).add_(r).reshape(B, nb * s)                          # y J + rhs
    y = y.reshape(B, nb * s)
    abs_res, rel_res = residuals(y, fy)
    bad = (status != 0).any(1) | ~torch.isfinite(abs_res)
    y = torch.where(bad[:, None], rhs, y)
    res = abs_res if stop_mode == "abs" else rel_res
    info: Dict[str, Any] = {
        "steps": torch.ones(B, dtype=torch.long, device=rhs.device), "abs_residual": abs_res,
        "rel_residual": rel_res, "f_norm": torch.linalg.vector_norm(fy, dim=1),
        "converged": ~bad & (res <= tol), "nan": bad, "diverged": torch.zeros_like(bad), "iterations": 1,
        "stop_mode": stop_mode, "tol": float(tol), "max_iter": 1, "direct": True,
    }
    return y, info


class StagedGraph:
    """``f`` at ``z`` with a graph, built stage by stage for a staged (lower block-triangular)
    map (see :mod:`multizoo_ext.fusions.deq.staged`): one leaf per column block of ``z``
    (``inputs``), each stage's map (``maps``) and output (``outs``), later stages built from the
    earlier stages' graphed outputs. ``output`` (``torch.cat(outs)``) is ``f(z)`` with the
    graph the parameters train through, and the same graph gives each stage's own
    vector-Jacobian products for the staged adjoint solve, so ``f`` is evaluated once at
    ``z*`` for both."""

    def __init__(self, f: Any, z: torch.Tensor) -> None:
        self.sizes = list(f.stage_sizes)
        with torch.enable_grad():
            self.inputs = [t.contiguous().requires_grad_() for t in z.detach().split(self.sizes, dim=1)]
            self.maps: List[Callable[..., torch.Tensor]] = []
            self.outs: List[torch.Tensor] = []
            for k in range(len(self.sizes)):
                self.maps.append(f.stage(k, self.inputs[:k], self.outs[:k]))
                self.outs.append(self.maps[k](self.inputs[k]))
            self.output = torch.cat(self.outs, dim=1)                                  # (B, n)


def _solve_adjoint_staged(graph: StagedGraph, g: torch.Tensor, solve: Solve, compact: Union[bool, float],
                          tol: float, stop_mode: str, direct: bool = False) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """``y = y J_f(z) + g`` for a staged ``f`` on its :class:`StagedGraph`, last stage first:
    stage ``k`` solves ``y_k = y_k df_k/dz_k + rhs_k`` (with ``direct``, exactly from the stage
    map's ``jacobian`` when it has one: :func:`_solve_adjoint_direct`), then passes ``y_k
    df_k/dz_j`` to the earlier stages' rhs. The graph is kept (the parameter gradients flow
    through it next)."""
    K = len(graph.sizes)
    rhs = [t.contiguous() for t in g.split(graph.sizes, dim=1)]
    ys: List[Optional[torch.Tensor]] = [None] * K
    infos: List[Optional[Dict[str, Any]]] = [None] * K
    k_tol = stage_tolerance(tol, stop_mode, K)
    k_solve = functools.partial(solve, tol=k_tol)
    for k in reversed(range(K)):
        jacobian = getattr(graph.maps[k], "jacobian", None) if direct else None
        if jacobian is not None:
            ys[k], infos[k] = _solve_adjoint_direct(jacobian(graph.inputs[k].detach()), rhs[k], k_tol, stop_mode)
        else:
            ys[k], infos[k] = _solve_adjoint(graph.maps[k], graph.outs[k], graph.inputs[k], rhs[k], k_solve,
                                             compact)
        if k > 0:
            for j, c in enumerate(torch.autograd.grad(graph.outs[k], graph.inputs[:k], ys[k], retain_graph=True)):
                rhs[j] = rhs[j] + c
    return torch.cat(ys, dim=1), merge_stage_infos(infos, tol, stop_mode)


class _ImplicitFn(torch.autograd.Function):
    """Identity on ``fz`` whose backward solves ``y = y J + g`` (one node per forward)."""

    @staticmethod
    def forward(ctx: Any, fz: torch.Tensor, z_in: torch.Tensor,  # type: ignore[override]
                f: Callable[..., torch.Tensor], mode: "ImplicitBackward", info: Dict[str, Any],
                graph: Optional[StagedGraph]) -> torch.Tensor:
        # fz = f(z_in) with a graph; with a staged graph, fz is graph.output and z_in unused
        ctx.save_for_backward(fz, z_in)
        ctx.f, ctx.mode, ctx.info, ctx.graph = f, mode, info, graph
        return fz.view_as(fz)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        fz, z_in = ctx.saved_tensors
        g = g.detach()
        mode = ctx.mode
        trusted = None
        limit = mode.implicit_max_residual
        res = ctx.info.get("rel_residual" if mode.stop_mode == "rel" else "abs_residual")
        if limit is not None and isinstance(res, torch.Tensor):
            # Where the forward solve ended far from a fixed point the implicit gradient has no
            # meaning: those samples take the Jacobian-free gradient y = g instead. Their rows
            # are solved with a zero right-hand side, which converges at the first iterate (and
            # leaves the working batch), so they cost nothing.
            trusted = (res <= limit)[:, None]                         # (B, 1), False for NaN
            rhs = torch.where(trusted, g, torch.zeros_like(g))
        else:
            rhs = g
        if ctx.graph is not None:
            y, binfo = _solve_adjoint_staged(ctx.graph, rhs, mode.backward_solve, mode.compact, mode.tol,
                                             mode.stop_mode, mode.direct)
        else:
            # the full batch uses the forward's recomputation of f at z*
            y, binfo = _solve_adjoint(ctx.f, fz, z_in, rhs, mode.backward_solve, mode.compact)
        if trusted is not None:
            y = torch.where(trusted, y, g)
            binfo["implicit"] = trusted.squeeze(1)
        ctx.info["backward"] = binfo
        return y, None, None, None, None, None


class ImplicitBackward:
    """Implicit differentiation at the fixed point (see module docstring).

    Args:
        solver: the backward solver, a registered name (``'anderson'``, ``'broyden'``,
            ``'fixed_point_iter'``, see :func:`~multizoo_ext.fusions.deq.solvers.register_solver`)
            or a callable with the solver signature.
        max_iter: cap on vector-Jacobian products per backward (per stage when staged).
        tol: per-sample tolerance of the backward fixed point.
        stop_mode: ``'rel'`` or ``'abs'``.
        solver_options: extra solver keyword arguments (``m``, ``lam``, ``beta``, ...).
        compact: let the backward solver drop converged samples; ``f`` must then accept
            ``f(z_sub, index)`` (as a DEQ layer's map does). Default: False.
        staged: when ``f`` is staged (block-triangular, :mod:`multizoo_ext.fusions.deq.staged`),
            solve the adjoint system stage by stage, last stage first. Default: False.
        implicit_max_residual: samples whose forward residual (``stop_mode``'s) is above this
            get the Jacobian-free gradient ``y = g`` (the gradient of one application of ``f``
            at the returned iterate) instead of the implicit one, which assumes a fixed point.
            None: every sample gets the implicit gradient. Default: None.
        direct: with ``staged``, solve each stage whose map has a ``jacobian(z)`` (its
            per-sample Jacobian blocks ``(B, blocks, s, s)``, as the DEQ fusion's stage maps
            have) exactly, by one batched linear solve, instead of with ``solver``.
            Default: False.
    """

    solves_forward = True

    def __init__(self, solver: Union[str, Solve], max_iter: int, tol: float, stop_mode: str,
                 solver_options: Optional[Mapping[str, Any]] = None, compact: bool = False,
                 staged: bool = False, implicit_max_residual: Optional[float] = None,
                 direct: bool = False) -> None:
        opts = {k: v for k, v in dict(solver_options or {}).items() if k not in ("compact", "trace")}
        self.compact: Union[bool, float] = BACKWARD_COMPACT_FRACTION if compact else False
        self.tol, self.stop_mode, self.staged = float(tol), stop_mode, bool(staged)
        if implicit_max_residual is not None and not float(implicit_max_residual) > 0:
            raise ValueError(f"implicit_max_residual must be positive or None, got {implicit_max_residual!r}")
        self.implicit_max_residual = None if implicit_max_residual is None else float(implicit_max_residual)
        self.direct = bool(direct)
        self.backward_solve: Solve = functools.partial(
            get_solver(solver), max_iter=int(max_iter), tol=float(tol), stop_mode=stop_mode, **opts)

    def attach(self, f: Func, z_star: torch.Tensor, info: Dict[str, Any], needs_grad: bool,
               want_jac: bool) -> Tuple[torch.Tensor, JacPair]:
        """``z*`` (B, n) -> ``f(z*)`` whose backward pass solves the adjoint system."""
        if not needs_grad:
            return z_star, None
        if self.staged and is_staged(f):
            # one graph of f at z*, stage by stage: for the parameters and for the adjoint solve
            graph: Optional[StagedGraph] = StagedGraph(f, z_star)
            fz, z_in, leaves = graph.output, z_star.detach(), graph.inputs
        else:
            graph = None
            z_in = leaves = z_star.detach().requires_grad_()
            fz = f(z_in)                                              # (B, n), one step with a graph
        out = _ImplicitFn.apply(fz, z_in, f, self, info, graph)
        return out, ((fz, leaves) if want_jac else None)


class PhantomBackward:
    """Phantom gradient: ``steps`` damped iterations from ``z*`` with a graph.

    Args:
        steps: unrolled steps (>= 1). Default: 5.
        tau: damping in (0, 1]. Default: 1.0.
    """

    solves_forward = True

    def __init__(self, steps: int = DEFAULT_PHANTOM_STEPS, tau: float = DEFAULT_PHANTOM_TAU) -> None:
        if int(steps) < 1:
            raise ValueError(f"phantom gradient needs steps >= 1, got {steps}")
        if not 0.0 < float(tau) <= 1.0:
            raise ValueError(f"phantom gradient damping tau must be in (0, 1], got {tau}")
        self.steps, self.tau = int(steps), float(tau)

    def attach(self, f: Func, z_star: torch.Tensor, info: Dict[str, Any], needs_grad: bool,
               want_jac: bool) -> Tuple[torch.Tensor, JacPair]:
        """``z*`` (B, n) -> the last of ``steps`` damped steps from it, with a graph."""
        if not needs_grad:
            return z_star, None
        z = z_star.detach().requires_grad_(want_jac)
        jac: JacPair = None
        for k in range(self.steps):
            fz = f(z)
            if k == 0 and want_jac:
                jac = (fz, z)
            z = fz if self.tau == 1.0 else torch.lerp(z, fz, self.tau)
        return z, jac


class UnrolledBackward:
    """Weight-tied unrolling from ``z0`` with plain backprop (ablation; no solver).

    Args:
        steps: iterations (>= 1).
        tol, stop_mode: only to fill ``info['converged']`` (last step's residual <= tol).
    """

    solves_forward = False

    def __init__(self, steps: int, tol: float, stop_mode: str) -> None:
        if int(steps) < 1:
            raise ValueError(f"unrolled mode needs steps >= 1, got {steps}")
        self.steps, self.tol, self.stop_mode = int(steps), float(tol), stop_mode

    def unroll(self, f: Func, z0: torch.Tensor, needs_grad: bool, trace: bool = False
               ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """``steps`` iterations from ``z0`` (B, n), with a graph when ``needs_grad``; the info
        has the solvers' keys."""
        trace_abs, trace_rel = [], []
        z = z0
        abs_res = rel_res = None
        with torch.set_grad_enabled(needs_grad):
            for k in range(self.steps):
                fz = f(z)
                if trace or k == self.steps - 1:
                    abs_res, rel_res = residuals(z.detach(), fz.detach())  # residual of z, (B,)
                if trace:
                    trace_abs.append(abs_res)
                    trace_rel.append(rel_res)
                z = fz
        res = abs_res if self.stop_mode == "abs" else rel_res
        B = z0.shape[0]
        info: Dict[str, Any] = {
            "steps": torch.full((B,), self.steps, dtype=torch.long, device=z0.device),
            "abs_residual": abs_res,
            "rel_residual": rel_res,
            "converged": res <= self.tol,
            "nan": ~torch.isfinite(res),
            "diverged": torch.zeros(B, dtype=torch.bool, device=z0.device),
            "iterations": self.steps,
            "stop_mode": self.stop_mode,
            "tol": self.tol,
            "max_iter": self.steps,
        }
        if trace:
            info["trace_abs"], info["trace_rel"] = trace_abs, trace_rel
        return z, info

    def attach(self, f: Func, z: torch.Tensor, info: Dict[str, Any], needs_grad: bool,
               want_jac: bool) -> Tuple[torch.Tensor, JacPair]:
        """The unrolled ``z`` (B, n) as it is (its graph is the gradient), with the Jacobian
        pair at it when ``want_jac``."""
        if needs_grad and want_jac:
            z_in = z.detach().requires_grad_()
            return z, (f(z_in), z_in)
        return z, None


BACKWARD_MODES = ("implicit", "phantom", "unrolled")


def build_backward(mode: str, *, b_solver: Union[str, Solve], b_max_iter: int, b_tol: float, stop_mode: str,
                   solver_options: Optional[Mapping[str, Any]] = None,
                   phantom_steps: int = DEFAULT_PHANTOM_STEPS, phantom_tau: float = DEFAULT_PHANTOM_TAU,
                   unroll_steps: int = 1, f_tol: float = 0.0, compact: bool = False,
                   staged: bool = False, implicit_max_residual: Optional[float] = None,
                   direct: bool = False) -> Any:
    """Resolve a gradient mode by name into an object with ``attach(...)`` (see the module
    docstring).

    Args:
        mode: ``'implicit'``, ``'phantom'`` or ``'unrolled'``.
        b_solver, b_max_iter, b_tol, stop_mode, solver_options, compact, staged,
            implicit_max_residual, direct: implicit mode's backward solve (see
            :class:`ImplicitBackward`).
        phantom_steps, phantom_tau: phantom mode.
        unroll_steps, f_tol: unrolled mode (``f_tol`` only fills ``info['converged']``).

    Raises:
        ValueError: unknown mode; the message lists the known ones.
    """
    key = str(mode).lower()
    if key == "implicit":
        return ImplicitBackward(b_solver, b_max_iter, b_tol, stop_mode, solver_options, compact, staged,
                                implicit_max_residual, direct)
    if key == "phantom":
        return PhantomBackward(phantom_steps, phantom_tau)
    if key == "unrolled":
        return UnrolledBackward(unroll_steps, f_tol, stop_mode)
    raise ValueError(f"unknown DEQ backward mode {mode!r}; known modes: {', '.join(BACKWARD_MODES)}")
