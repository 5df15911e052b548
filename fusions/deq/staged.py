"""Stage-by-stage solves of a block-triangular fixed point (the structure of DEQ fusion).

DEQ fusion's ``f_theta`` is lower block-triangular: the modality update ``z_m' = f_m(z_m)``
never reads the fused state, and the fused update ``z_f' = f_f(z_f; z_m')`` reads the
modalities only through their updated states (Gauss-Seidel order). So the joint fixed point
``z* = f(z*)`` is found in two smaller solves, one after the other:

1. ``z_m* = f_m(z_m*)``;
2. ``z_f* = f_f(z_f*; f_m(z_m*))``.

``(z_m*, z_f*)`` is the same joint fixed point, and its joint residual is exactly
``sqrt(r_m^2 + r_f^2)`` of the two stages' residuals (stage 2 uses ``f_m(z_m*)``, which is
what ``f`` computes at ``z*``). What changes is the cost: each stage has its own solver (own
Anderson mixing coefficients, own per-sample stopping), so the modality blocks stop when
*they* converge instead of iterating for as long as the fused block needs, and an evaluation
of a stage costs only its part of ``f`` (the fused stage two ``(d, d)`` products of the six in
``f`` with two modalities).

Implicit differentiation solves the adjoint system ``y = y J + g``, whose Jacobian is
block-triangular the other way round, so it is solved last stage first (see
:mod:`multizoo_ext.fusions.deq.backward`):
``y_f = y_f df_f/dz_f + g_f``, then ``y_m = y_m df_m/dz_m + (g_m + y_f dF_f/dz_m)``.

Tolerances: with ``stop_mode='rel'`` every stage stops at ``tol``, which bounds the joint
relative residual by ``tol`` (``sum r_k^2 <= tol^2 sum ||f_k||^2``); with ``'abs'`` at
``tol / sqrt(K)``. ``info`` is the solvers' (see :mod:`multizoo_ext.fusions.deq.solvers`)
for the joint state: ``abs_residual`` / ``rel_residual`` / ``f_norm`` of the joint residual,
``converged`` = joint residual within ``tol``, ``nan`` / ``diverged`` = in any stage,
``steps`` / ``iterations`` / ``max_iter`` = sums over the stages (an evaluation of a stage
costs a part of ``f``), and ``stages``: the list of the stages' own infos (with their
traces when asked for).

Protocol of a staged map ``f`` (:class:`~multizoo_ext.fusions.deq.fusion._FusionMap` has it):
``f.stage_sizes``, the widths of the K stages (summing to the state width), and
``f.stage(k, states, outputs=None)``, the map of stage ``k`` ``(b, n_k) -> (b, n_k)``
(accepting a row ``index`` like ``f``) given the earlier stages' full-batch ``states`` and,
when already computed, their ``outputs`` ``f_j(states[j])``. Block ``k`` of ``f(z)`` must
depend on blocks ``<= k`` of ``z`` only.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

__all__ = ["is_staged", "merge_stage_infos", "solve_staged", "stage_tolerance"]

_REL_EPS = 1e-9


def is_staged(f: Any) -> bool:
    """Whether ``f`` exposes the staged protocol with more than one stage."""
    return len(getattr(f, "stage_sizes", ())) > 1 and callable(getattr(f, "stage", None))


def stage_tolerance(tol: float, stop_mode: str, stages: int) -> float:
    """Per-stage tolerance that keeps the joint residual within ``tol``."""
    return float(tol) if stop_mode == "rel" else float(tol) / math.sqrt(stages)


def merge_stage_infos(infos: Sequence[Dict[str, Any]], tol: float, stop_mode: str) -> Dict[str, Any]:
    """Joint solver info from the stages' infos (see the module docstring).

    Args:
        infos: one solver info per stage, each with ``(B,)`` ``abs_residual``, ``f_norm``,
            ``steps``, ``nan``, ``diverged``.
        tol, stop_mode: the joint tolerance and its mode.
    """
    abs_res = torch.stack([i["abs_residual"] for i in infos]).square().sum(0).sqrt()      # (B,)
    f_norm = torch.stack([i["f_norm"] for i in infos]).square().sum(0).sqrt()
    rel_res = abs_res / (f_norm + _REL_EPS)
    res = abs_res if stop_mode == "abs" else rel_res
    finite = torch.isfinite(res)
    nan = torch.stack([i["nan"] for i in infos]).any(0)
    diverged = torch.stack([i["diverged"] for i in infos]).any(0)
    return {
        "steps": torch.stack([i["steps"] for i in infos]).sum(0),
        "abs_residual": abs_res,
        "rel_residual": rel_res,
        "f_norm": f_norm,
        "converged": finite & ~nan & ~diverged & (res <= tol),
        "nan": nan,
        "diverged": diverged,
        "iterations": sum(int(i["iterations"]) for i in infos),
        "stop_mode": stop_mode,
        "tol": float(tol),
        "max_iter": sum(int(i["max_iter"]) for i in infos),
        "stages": list(infos),
    }


def solve_staged(f: Any, z0: torch.Tensor, solve: Callable[..., Tuple[torch.Tensor, Dict[str, Any]]],
                 tol: float, stop_mode: str = "rel") -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Solve ``z = f(z)`` stage by stage (``f`` staged, see the module docstring).

    Args:
        f: staged map ``(B, n) -> (B, n)``.
        z0: ``(B, n)`` initial state.
        solve: ``solve(f_k, z0_k, tol=...) -> (z_k, info_k)``, a solver of
            :mod:`multizoo_ext.fusions.deq.solvers` with its other settings bound.
        tol, stop_mode: joint tolerance and its mode.

    Returns:
        ``(z*, info)``: ``z*`` ``(B, n)`` and the joint info with ``stages``.
    """
    sizes = list(f.stage_sizes)
    if sum(sizes) != z0.shape[1]:
        raise ValueError(f"staged map has stage widths {sizes} (total {sum(sizes)}) but the state "
                         f"is {tuple(z0.shape)}")
    k_tol = stage_tolerance(tol, stop_mode, len(sizes))
    states: List[torch.Tensor] = []
    outputs: List[torch.Tensor] = []
    infos: List[Dict[str, Any]] = []
    for k, part in enumerate(z0.split(sizes, dim=1)):
        fk = f.stage(k, states, outputs)
        zk, info = solve(fk, part.contiguous(), tol=k_tol)
        states.append(zk)
        infos.append(info)
        if k < len(sizes) - 1:
            outputs.append(fk(zk))            # f_k(z_k*), which the later stages read
    return torch.cat(states, dim=1), merge_stage_infos(infos, tol, stop_mode)
