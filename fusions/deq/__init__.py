"""Deep Equilibrium fusion (installed as ``multizoo_ext.fusions.deq``).

- :mod:`.fusion`: :class:`DEQFusion`, its map ``f_theta`` and its defaults (:data:`DEQ_DEFAULTS`);
- :mod:`.solvers`: fixed-point solvers with per-sample stopping, by name
  (:func:`get_solver`, :func:`register_solver`);
- :mod:`.staged`: stage-by-stage solves of block-triangular fixed points;
- :mod:`.backward`: gradient modes (implicit, phantom, unrolled) and the Jacobian penalty.

>>> from multizoo_ext.fusions.deq import DEQFusion
"""
from multizoo_ext.fusions.deq.backward import (
    BACKWARD_MODES,
    ImplicitBackward,
    PhantomBackward,
    UnrolledBackward,
    build_backward,
    jacobian_penalty,
)
from multizoo_ext.fusions.deq.fusion import DEQ_DEFAULTS, PAPER_LAYER, DEQDefaults, DEQFusion, find_deq
from multizoo_ext.fusions.deq.solvers import (
    SOLVERS,
    anderson,
    broyden,
    fixed_point_iter,
    get_solver,
    register_solver,
    residuals,
)
from multizoo_ext.fusions.deq.staged import merge_stage_infos, solve_staged

__all__ = [
    "BACKWARD_MODES",
    "DEQ_DEFAULTS",
    "DEQDefaults",
    "DEQFusion",
    "ImplicitBackward",
    "PAPER_LAYER",
    "PhantomBackward",
    "SOLVERS",
    "UnrolledBackward",
    "anderson",
    "broyden",
    "build_backward",
    "find_deq",
    "fixed_point_iter",
    "get_solver",
    "jacobian_penalty",
    "merge_stage_infos",
    "register_solver",
    "residuals",
    "solve_staged",
]
