"""DEQ fusion measurements: speed vs the authors' code, memory, convergence.

Three parts, all on the CPU with a fixed ``torch.set_num_threads``:

- ``speed``: one training step (forward + backward of a Linear head with cross-entropy on
  random labels, plus ``jac_weight`` times the Jacobian penalty, as the reference's MultiBench
  loop adds ``0.1 * jac_loss``) of our :class:`~multizoo_ext.fusions.deq.DEQFusion` against
  the reference ``DEQFusion`` of jinhong-ni/DEQFusion (width 512, batch 128, 2 modalities,
  Anderson, 55 forward / 56 backward iterations). The reference's parameters are copied into
  ours, so both solve the same fixed point (checked: ``same_function_max_abs_diff``), from the
  same inputs, with the same head. For every implementation: median step / forward / backward
  time over ``repeats`` interleaved repeats, iterations used (forward evaluations of ``f`` and
  backward vector-Jacobian products; for ours also the per-sample steps and the rows actually
  evaluated, since converged samples leave the working batch) and the per-sample relative
  residual ``||f(z*) - z*|| / ||f(z*)||`` of the returned ``z*``, computed the same way for both
  by applying the implementation's own ``f`` once more at its returned ``z*`` (the backward
  residual likewise on ``y -> y J + g``). Residuals come from one untimed pass per
  implementation; the timed repeats are identical steps (the parameters are not updated).
  Also per implementation: the time spent inside the solvers' calls of ``f`` / of the
  backward VJP step versus the solvers' own bookkeeping, and the error of its gradient (CE
  loss only) against a float64 implicit gradient solved to 1e-9: per sample for the input
  gradients (median, 90th percentile) and for the fusion-parameter gradient. Variants of ours
  (:data:`VARIANTS`) include tolerances matched to the residuals the reference reached, so
  speed is compared at equal or better accuracy.
- ``memory``: peak memory of one training step with 10 vs 100 forward iterations (tolerance 0,
  so every iteration runs; backward cap = forward + 1), for our implicit mode, our unrolled
  ablation and the reference. Each configuration runs in a fresh subprocess, after a 3-iteration
  warm-up step of the same kind (one-time costs): ``peak RSS delta`` = the kernel's peak-RSS
  mark ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the step, minus the RSS
  just before it (``ru_maxrss`` where that is unavailable; glibc's ``MALLOC_MMAP_THRESHOLD_``
  is fixed at 64 KiB in the child so large tensors go back to the OS when freed and the RSS
  follows live memory), and ``peak tensor bytes`` = the highest running total of the CPU
  allocator during a second, profiled step (torch.profiler with ``profile_memory=True``),
  above its value at the start. ``torch.cuda.max_memory_allocated``
  is used instead when the device is CUDA.
- ``convergence``: per-sample relative residual per evaluation of ``f`` (median and 10-90 %
  band over the batch) for our Anderson and plain fixed-point solvers (their ``trace_rel``),
  our weight-tied unrolling (``backward='unrolled'``, its ``trace_rel``) and the reference's
  Anderson (residual of every iterate it evaluates, computed by wrapping its ``f``), all on
  the same function at random initialisation with tolerance 0 (all on the joint state; the
  staged solve's per-stage counts are in the speed part). At random initialisation the
  unrolled forward pass *is* plain fixed-point iteration (same iterates; only the gradient
  differs), so those two curves coincide. The PNG is written only when asked.

How the reference is made to run on torch 2.x / CPU (patches applied at benchmark time only,
never to the checkout): see ``benchmarks/deq_reference.md`` and :func:`reference_patches`.

Usage (from the repository root)::

    git clone <mirror of github.com/jinhong-ni/DEQFusion> /tmp/deqfusion   # outside the repo
    python benchmarks/bench_deq.py --reference /tmp/deqfusion --threads 1 --repeats 15 \\
        --out runs/bench_deq.json --plot docs/figures/deq_convergence.png

On a shared machine single steps scatter by +-15 % (other tenants' memory traffic), so
quote speed-ups from many repeats (``--repeats 25``; the table gives the quartiles of the
per-repeat ratios). Without ``--reference`` the reference columns are skipped with a message. ``--quick`` runs a
small smoke version (width 64, batch 16, 2 repeats). ``--plot`` needs matplotlib (the ``plot``
extra), imported only when a plot is asked for.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

import multizoo_ext.fusions
from multizoo_ext.fusions.deq import DEQ_DEFAULTS, PAPER_LAYER, DEQFusion
from multizoo_ext.fusions.deq.solvers import anderson, fixed_point_iter

logger = logging.getLogger("bench_deq")

#: The ``fusions/`` folder the DEQ code is imported from (hashed into the environment record),
#: and the folder above it: the repository for a source checkout (editable install), whose git
#: commit is recorded; with a regular install it is site-packages (commit: usually None).
FUSIONS_DIR = Path(multizoo_ext.fusions.__file__).resolve().parent
REPO_ROOT = FUSIONS_DIR.parent
REF_FILES = ("solver.py", "jacobian.py", "DEQ_fusion.py")
NUM_CLASSES = 10
_REL_EPS = 1e-9

#: Our variants timed against the reference: name -> DEQFusion keyword arguments. ``f_tol`` /
#: ``b_tol`` may be ``'ref_median'``: the median per-sample relative residual the reference
#: reached in its own untimed pass, forward / backward, rounded down to 2 significant digits
#: (so every converged sample of ours ends at least that low).
VARIANTS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "tol_matched": {"f_tol": "ref_median"},
    "tol_matched_nocompact": {"f_tol": "ref_median", "compact": False},
    "tol_matched_btol_matched": {"f_tol": "ref_median", "b_tol": "ref_median"},
    "tol_matched_btol_1e-3": {"f_tol": "ref_median", "b_tol": 1e-3},
    "tol_matched_phantom": {"f_tol": "ref_median", "backward": "phantom"},
    # Jacobian-free backprop (Fung et al., 2022): the phantom gradient with a single step
    "tol_matched_phantom1": {"f_tol": "ref_median", "backward": "phantom", "phantom_steps": 1},
    "tol_matched_btol_matched_anderson10": {"f_tol": "ref_median", "b_tol": "ref_median",
                                            "solver_kwargs": {"m": 10}},
    # the adjoint system solved jointly (staged forward)
    "tol_matched_btol_matched_joint_bwd": {"f_tol": "ref_median", "b_tol": "ref_median",
                                           "staged_backward": False},
    # one solve of the joint state (the reference's way) instead of the staged solve
    "joint": {"staged": False, "staged_backward": False},
    "tol_matched_joint": {"f_tol": "ref_median", "staged": False, "staged_backward": False},
    "tol_matched_btol_matched_joint": {"f_tol": "ref_median", "b_tol": "ref_median", "staged": False,
                                       "staged_backward": False},
    "tol_matched_phantom1_joint": {"f_tol": "ref_median", "backward": "phantom", "phantom_steps": 1,
                                   "staged": False},
}
DEFAULT_VARIANTS = ("default", "tol_matched", "tol_matched_nocompact", "tol_matched_btol_matched",
                    "tol_matched_phantom")
PARTS = ("speed", "memory", "convergence")


# ============================================================================ reference
class ReferenceUnavailable(RuntimeError):
    """The reference checkout is missing or cannot be imported."""


def _silent_print(*args: Any, **kwargs: Any) -> None:
    """Replaces ``print`` inside the reference modules (it prints every forward)."""


def _solve_shim(B: torch.Tensor, A: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.solve(B, A)`` of torch < 1.9 (removed in 2.x): ``(A^-1 B, A)``.

    The reference only reads ``[0]`` (the solution); the second item was the LU factorisation,
    which it never uses, so ``A`` stands in for it.
    """
    return torch.linalg.solve(A, B), A


def _load_module(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise ReferenceUnavailable(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def importing_reference(root: os.PathLike, names: Sequence[str]) -> Iterator[None]:
    """Around the import of reference modules: the ``sys.modules`` entries ``names`` (generic
    top-level names the reference's files import each other by) are restored on exit, and
    the checkout's own import errors become :class:`ReferenceUnavailable`."""
    saved = {n: sys.modules.get(n) for n in names}
    try:
        yield
    except ReferenceUnavailable:
        raise
    except Exception as exc:  # the checkout's own import errors
        raise ReferenceUnavailable(f"importing the reference from {root} failed: {exc!r}") from exc
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod


def load_reference(path: os.PathLike) -> types.SimpleNamespace:
    """Import the reference ``DEQ_fusion.py`` (+ ``solver.py``, ``jacobian.py``) from a checkout.

    Import-time patches (documented in ``benchmarks/deq_reference.md``):

    - ``termcolor`` (imported by ``solver.py``, only used by a debugging helper) gets a stub
      module when it is not installed;
    - the top-level names ``solver`` / ``jacobian`` that ``DEQ_fusion.py`` imports exist in
      ``sys.modules`` only while it is imported (then the previous entries are restored);
    - ``print`` inside ``DEQ_fusion`` and ``solver`` is replaced by a no-op (module globals).

    The call-time patches are in :func:`reference_patches`.

    Raises:
        ReferenceUnavailable: files missing or the import failed.
    """
    root = Path(path).expanduser().resolve()
    missing = [f for f in REF_FILES if not (root / f).is_file()]
    if missing:
        raise ReferenceUnavailable(f"{root} is not a DEQFusion checkout (missing {', '.join(missing)})")
    patches: List[str] = []
    if importlib.util.find_spec("termcolor") is None and "termcolor" not in sys.modules:
        stub = types.ModuleType("termcolor")
        stub.colored = lambda text, *a, **k: text  # type: ignore[attr-defined]
        sys.modules["termcolor"] = stub
        patches.append("termcolor stub module (not installed; only used by solver.analyze_broyden)")
    with importing_reference(root, ("solver", "jacobian")):
        solver = _load_module("solver", root / "solver.py")
        jacobian = _load_module("jacobian", root / "jacobian.py")
        deq = _load_module("_deqfusion_reference", root / "DEQ_fusion.py")
    deq.print = _silent_print  # type: ignore[attr-defined]
    solver.print = _silent_print  # type: ignore[attr-defined]
    patches.append("print -> no-op in DEQ_fusion and solver (module globals)")
    return types.SimpleNamespace(module=deq, solver=solver, jacobian=jacobian, root=str(root), commit=git_commit(root),
                                 import_patches=patches)


@contextlib.contextmanager
def reference_patches(device: torch.device) -> Iterator[List[str]]:
    """Call-time patches the reference needs on torch 2.x / CPU, active only inside the block.

    - ``torch.solve`` (removed in torch 2.x; the reference's Anderson calls
      ``torch.solve(y, H)[0]``) -> :func:`_solve_shim` on ``torch.linalg.solve(H, y)``;
    - ``Tensor.cuda()`` (the reference creates its initial state with ``.cuda()``) ->
      ``.to(device)``, the device of the benchmark;
    - ``torch.cuda.synchronize()`` (called in the reference's backward hook; raises without
      CUDA) -> no-op when CUDA is not available.

    Everything is restored on exit (the backward pass must run inside the block too: the
    reference's backward hook calls ``torch.cuda.synchronize`` and its solver ``torch.solve``).
    """
    applied: List[str] = []
    had_solve = "solve" in torch.__dict__
    old_solve = torch.__dict__.get("solve")
    old_cuda = torch.Tensor.cuda
    old_sync = torch.cuda.synchronize
    torch.solve = _solve_shim  # type: ignore[attr-defined]
    applied.append("torch.solve -> torch.linalg.solve shim")
    torch.Tensor.cuda = lambda self, *a, **k: self.to(device)  # type: ignore[assignment]
    applied.append(f"Tensor.cuda -> .to({device})")
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        applied.append("torch.cuda.synchronize -> no-op")
    try:
        yield applied
    finally:
        if had_solve:
            torch.solve = old_solve  # type: ignore[attr-defined]
        else:
            del torch.solve  # type: ignore[attr-defined]
        torch.Tensor.cuda = old_cuda  # type: ignore[assignment]
        torch.cuda.synchronize = old_sync  # type: ignore[assignment]


def build_reference(ref: types.SimpleNamespace, width: int, modalities: int, f_max_iter: int,
                    b_max_iter: int, stop_mode: str = "abs") -> torch.nn.Module:
    """The reference ``DEQFusion(channel_dim, num_modals, f_thres, b_thres, stop_mode)``.

    ``stop_mode='abs'`` is the module's default and what its MM-IMDB script passes; its
    solvers' ``eps`` stays at the default 1e-3 (forward: absolute residual norm of the whole
    batch; backward: relative, also on the whole batch).
    """
    return ref.module.DEQFusion(width, modalities, f_max_iter, b_max_iter, stop_mode)


def _ref_func(ref: types.SimpleNamespace, model: torch.nn.Module,
              x: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference's ``f`` for inputs ``x``, built from its own pieces (list2vec/vec2list/func_)."""
    mod = ref.module
    fusion_feature = sum(model.weights[i] * t for i, t in enumerate(x)) + model.bias
    x_list = list(x) + [fusion_feature]
    cutoffs = [t.shape[1] for t in x_list]
    return lambda z: mod.list2vec(model.func_(mod.vec2list(z, cutoffs), x_list))


_OURS_BLOCK = ("lin1", "lin2", "gn1", "gn2", "gn3")
_REF_BLOCK = ("conv1", "conv2", "gn1", "gn2", "gn3")


def _param_pairs(ref_model: torch.nn.Module, ours: DEQFusion) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Matching (reference, ours) weight tensors of the fusion function (not ``weights``/``bias``)."""
    M = ours.num_modalities
    br = ref_model.func_.branches
    pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(M):
        for r, o in zip(_REF_BLOCK, _OURS_BLOCK):
            rm, om = getattr(br[i], r), getattr(ours.blocks[i], o)
            pairs += [(rm.weight, om.weight), (rm.bias, om.bias)]
    for r, o in (("gate", "gate"), ("fuse", "fuse"), ("gn3", "gn")):
        rm, om = getattr(br[M], r), getattr(ours.fusion_block, o)
        pairs += [(rm.weight, om.weight), (rm.bias, om.bias)]
    return pairs


def copy_reference_into_ours(ref_model: torch.nn.Module, ours: DEQFusion) -> None:
    """Copy the reference's parameters into ours (same fusion function, same init).

    Mapping: ``func_.branches[i].{conv1,conv2,gn1,gn2,gn3}`` -> ``blocks[i].{lin1,lin2,gn1,gn2,gn3}``;
    ``func_.branches[M].{gate,fuse,gn3}`` -> ``fusion_block.{gate,fuse,gn}``; ``weights[i]`` ->
    ``weights[i]``; ``bias`` -> ``bias``. Our projections must be identities (equal widths).
    """
    M = ours.num_modalities
    pairs = _param_pairs(ref_model, ours)
    covered = {id(o) for _, o in pairs} | {id(ours.weights), id(ours.bias)}
    extra = [n for n, p in ours.named_parameters() if id(p) not in covered]
    if extra:
        raise ValueError(f"our DEQFusion has parameters with no reference counterpart: {extra}")
    with torch.no_grad():
        for r, o in pairs:
            if r.shape != o.shape:
                raise ValueError(f"shape mismatch copying the reference: {tuple(r.shape)} vs {tuple(o.shape)}")
            o.copy_(r)
        for i in range(M):
            ours.weights[i] = ref_model.weights[i].reshape(())
        ours.bias.copy_(ref_model.bias.reshape(()))


def _flat_grad(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.zeros(t.numel(), dtype=torch.float64) if t.grad is None
                      else t.grad.detach().double().flatten().cpu() for t in tensors])


def ours_grad_vector(ours: DEQFusion) -> torch.Tensor:
    """Gradients of our fusion parameters, in the order of :func:`ref_grad_vector`."""
    ts: List[torch.Tensor] = []
    for blk in ours.blocks:
        for n in _OURS_BLOCK:
            ts += [getattr(blk, n).weight, getattr(blk, n).bias]
    for n in ("gate", "fuse", "gn"):
        ts += [getattr(ours.fusion_block, n).weight, getattr(ours.fusion_block, n).bias]
    return _flat_grad(ts + [ours.weights, ours.bias])


def ref_grad_vector(ref_model: torch.nn.Module, modalities: int) -> torch.Tensor:
    """Gradients of the reference's fusion parameters, in the order of :func:`ours_grad_vector`."""
    br = ref_model.func_.branches
    ts: List[torch.Tensor] = []
    for i in range(modalities):
        for n in _REF_BLOCK:
            ts += [getattr(br[i], n).weight, getattr(br[i], n).bias]
    for n in ("gate", "fuse", "gn3"):
        ts += [getattr(br[modalities], n).weight, getattr(br[modalities], n).bias]
    return _flat_grad(ts + list(ref_model.weights) + [ref_model.bias])


def _grad_error(g: torch.Tensor, exact: torch.Tensor) -> Dict[str, float]:
    return {"rel_error": float((g - exact).norm() / exact.norm()),
            "cosine": float(F.cosine_similarity(g, exact, dim=0))}


# ============================================================================ instrumentation
def per_sample_residuals(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(abs, rel)`` per sample: ``||f(z) - z||`` and ``||f(z) - z|| / (||f(z)|| + 1e-9)``."""
    with torch.no_grad():
        fz = f(z)
        b = z.shape[0]
        d = (fz - z).reshape(b, -1)
        a = torch.linalg.vector_norm(d, dim=1)
        return a, a / (torch.linalg.vector_norm(fz.reshape(b, -1), dim=1) + _REL_EPS)


def _vjp_residuals(step: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(abs, ||step(y)||)`` per sample for the backward fixed point ``y = y J + g``
    (``step(y) = y J + g``)."""
    fy = step(y).detach()
    b = y.shape[0]
    d = (fy - y).reshape(b, -1)
    return torch.linalg.vector_norm(d, dim=1), torch.linalg.vector_norm(fy.reshape(b, -1), dim=1)


def _stats(t: Optional[torch.Tensor]) -> Optional[Dict[str, float]]:
    if t is None:
        return None
    t = t.detach().double().flatten()
    return {"median": float(t.median()), "mean": float(t.mean()), "max": float(t.max()), "min": float(t.min())}


class _Probe:
    """Records evaluations and (when ``measure``) the residuals of a forward/backward solve."""

    def __init__(self) -> None:
        self.measure = False
        self.reset()

    def reset(self) -> None:
        self.fwd: Dict[str, Any] = {}
        self.bwd: Dict[str, Any] = {}

    @staticmethod
    def _counting(f: Callable[..., torch.Tensor], rec: Dict[str, Any]) -> Callable[..., torch.Tensor]:
        """``f`` counting into ``rec`` (totals accumulate over the solves of one step, e.g.
        the stages of a staged solve; ``stage_rows`` lists each solve's rows)."""
        for key, zero in (("evals", 0), ("rows", 0), ("f_time", 0.0)):
            rec.setdefault(key, zero)
        rec.setdefault("stage_rows", []).append(0)

        def g(z: torch.Tensor, *index: Any) -> torch.Tensor:
            rec["evals"] += 1
            rec["rows"] += int(z.shape[0])
            rec["stage_rows"][-1] += int(z.shape[0])
            t = time.perf_counter()
            out = f(z, *index)
            rec["f_time"] += time.perf_counter() - t            # CPU ops are synchronous
            return out
        return g

    @staticmethod
    def _timed(rec: Dict[str, Any], t0: float) -> None:
        rec["solve_time"] = rec.get("solve_time", 0.0) + time.perf_counter() - t0


class OursProbe(_Probe):
    """Wraps ``fusion._solve`` (each solver run: counts evaluations), ``fusion._solve_fixed_point``
    (the whole forward solve, staged or not: keeps the joint residual of ``z*`` on the joint
    ``f``) and the implicit mode's ``backward_solve`` (each backward solver run; a staged
    backward runs one per stage, whose residuals combine exactly into the joint one) as
    instance attributes; the library file is not changed."""

    def __init__(self, fusion: DEQFusion) -> None:
        super().__init__()
        self.fusion = fusion
        orig_f, orig_fp = fusion._solve, fusion._solve_fixed_point

        def fsolve(f: Callable[..., torch.Tensor], z0: torch.Tensor, *args: Any, **kw: Any
                   ) -> Tuple[torch.Tensor, Dict[str, Any]]:
            t = time.perf_counter()
            z, info = orig_f(self._counting(f, self.fwd), z0, *args, **kw)
            self._timed(self.fwd, t)
            return z, info

        def fixed_point(f: Callable[..., torch.Tensor], z0: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
            z, info = orig_fp(f, z0)
            if self.measure:
                a, r = per_sample_residuals(f, z)
                self.fwd.update(abs=a, rel=r)
            return z, info
        fusion._solve = fsolve
        fusion._solve_fixed_point = fixed_point
        grad = fusion._grad
        if hasattr(grad, "backward_solve"):
            orig_b = grad.backward_solve

            def bsolve(step: Callable[..., torch.Tensor], y0: torch.Tensor, *args: Any, **kw: Any
                       ) -> Tuple[torch.Tensor, Dict[str, Any]]:
                t = time.perf_counter()
                y, info = orig_b(self._counting(step, self.bwd), y0, *args, **kw)
                self._timed(self.bwd, t)
                if self.measure:
                    a, n = _vjp_residuals(step, y)
                    a2 = self.bwd.get("abs2", 0.0) + a.square()
                    n2 = self.bwd.get("norm2", 0.0) + n.square()
                    self.bwd.update(abs2=a2, norm2=n2, abs=a2.sqrt(), rel=a2.sqrt() / (n2.sqrt() + _REL_EPS))
                return y, info
            grad.backward_solve = bsolve


class RefProbe(_Probe):
    """Wraps the reference module's ``f_solver`` / ``b_solver`` (instance attributes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()

        def vjp_residuals(func: Callable[..., torch.Tensor], y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            a, n = _vjp_residuals(func, y)
            return a, a / (n + _REL_EPS)

        model.f_solver = self._wrap(model.f_solver, self.fwd_rec, per_sample_residuals)
        model.b_solver = self._wrap(model.b_solver, self.bwd_rec, vjp_residuals)

    def fwd_rec(self) -> Dict[str, Any]:
        return self.fwd

    def bwd_rec(self) -> Dict[str, Any]:
        return self.bwd

    def _wrap(self, orig: Callable[..., Dict[str, Any]], rec: Callable[[], Dict[str, Any]],
              residuals_of: Callable[..., Tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., Dict[str, Any]]:
        """The reference solver ``orig`` counting, timing and (when measuring) keeping the
        per-sample residuals of its result in ``rec()`` (the dict is replaced by ``reset``)."""
        def solve(func: Callable[..., torch.Tensor], x0: torch.Tensor, **kw: Any) -> Dict[str, Any]:
            record = rec()
            t = time.perf_counter()
            res = orig(self._counting(func, record), x0, **kw)
            self._timed(record, t)
            record["nstep"] = res.get("nstep")
            if self.measure:
                a, r = residuals_of(func, res["result"])
                record.update(abs=a, rel=r)
            return res
        return solve


# ============================================================================ training step
def _ref_step(ref: types.SimpleNamespace, model: torch.nn.Module, head: torch.nn.Module,
              x: Sequence[torch.Tensor], y: torch.Tensor, jac_weight: float,
              device: torch.device) -> Tuple[float, float]:
    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    with reference_patches(device):
        t0 = time.perf_counter()
        if jac_weight > 0:
            out, jac, _ = model(list(x))                       # reference forward as it trains
            loss = F.cross_entropy(head(out), y) + jac_weight * jac.mean()
        else:                                                  # same, without the Jacobian estimate
            fusion_feature = sum(model.weights[i] * t for i, t in enumerate(x)) + model.bias
            out, _, _ = model.featureFusion(list(x), fusion_feature, compute_jac_loss=False)
            loss = F.cross_entropy(head(out), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _ours_step(model: DEQFusion, head: torch.nn.Module, x: Sequence[torch.Tensor], y: torch.Tensor,
               jac_weight: float) -> Tuple[float, float]:
    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = model(list(x))
    loss = F.cross_entropy(head(out), y)
    if jac_weight > 0 and model.jac_loss is not None:
        loss = loss + jac_weight * model.jac_loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _inputs(width: int, batch: int, modalities: int, seed: int, device: torch.device
            ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    x = [torch.randn(batch, width, generator=g).to(device) for _ in range(modalities)]
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    return x, y


def _round_down(v: float, digits: int = 2) -> float:
    """``v`` rounded down to ``digits`` significant digits (a tolerance never above ``v``)."""
    if not v > 0 or not math.isfinite(v):
        return v
    e = math.floor(math.log10(v)) - digits + 1
    return math.floor(v / 10 ** e) * 10 ** e


def _ours(width: int, modalities: int, f_max_iter: int, b_max_iter: int, **kw: Any) -> DEQFusion:
    """Our layer computing the reference's function (``PAPER_LAYER``), with our solver defaults."""
    return DEQFusion([width] * modalities, width=width, f_max_iter=f_max_iter, b_max_iter=b_max_iter,
                     **{**PAPER_LAYER, **kw})


def _effective_settings(model: DEQFusion) -> Dict[str, Any]:
    """The tolerances/caps our module actually runs with (its defaults may change)."""
    out: Dict[str, Any] = {"backward": getattr(model, "backward_mode", None),
                           "staged": getattr(model, "staged", False),
                           "staged_backward": getattr(model, "staged_backward", False)}
    fk = getattr(getattr(model, "_solve", None), "keywords", {}) or {}
    out.update({"f_tol": fk.get("tol"), "f_max_iter": fk.get("max_iter"), "stop_mode": fk.get("stop_mode"),
                "compact": fk.get("compact")})
    bk = getattr(getattr(getattr(model, "_grad", None), "backward_solve", None), "keywords", {}) or {}
    if bk:
        out.update({"b_tol": bk.get("tol"), "b_max_iter": bk.get("max_iter")})
    return out


def _summary(probe: _Probe, model_info: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "forward_evals": probe.fwd.get("evals"),
        "forward_rows": probe.fwd.get("rows"),
        "backward_evals": probe.bwd.get("evals"),
        "backward_rows": probe.bwd.get("rows"),
        "forward_stage_rows": list(probe.fwd.get("stage_rows", [])),
        "backward_stage_rows": list(probe.bwd.get("stage_rows", [])),
        "forward_rel_residual": _stats(probe.fwd.get("rel")),
        "forward_abs_residual": _stats(probe.fwd.get("abs")),
        "backward_rel_residual": _stats(probe.bwd.get("rel")),
    }
    if model_info is not None:  # ours: the solver's own statistics
        out["forward_steps_per_sample"] = _stats(model_info.get("steps"))
        out["forward_converged_fraction"] = float(model_info["converged"].float().mean())
        b = model_info.get("backward")
        if b is not None:
            out["backward_steps_per_sample"] = _stats(b.get("steps"))
            out["backward_converged_fraction"] = float(b["converged"].float().mean())
            out["backward_iterations"] = b.get("iterations")
    return out


def measure_speed(ref: Optional[types.SimpleNamespace], width: int = 512, batch: int = 128, modalities: int = 2,
                  f_max_iter: int = 55, b_max_iter: int = 56, repeats: int = 15, jac_weight: float = 0.1,
                  variants: Sequence[str] = DEFAULT_VARIANTS, seed: int = 0,
                  device: torch.device = torch.device("cpu"), grad_check: bool = True) -> Dict[str, Any]:
    """Training-step time, iterations and residuals of the reference and our variants (see module doc)."""
    torch.manual_seed(seed)
    x, y = _inputs(width, batch, modalities, seed, device)
    head = torch.nn.Linear(width, NUM_CLASSES).to(device)
    impls: Dict[str, Dict[str, Any]] = {}
    res: Dict[str, Any] = {"config": {"width": width, "batch": batch, "modalities": modalities,
                                      "f_max_iter": f_max_iter, "b_max_iter": b_max_iter, "repeats": repeats,
                                      "jac_weight": jac_weight, "seed": seed, "loss": "CE(Linear head) "
                                      + (f"+ {jac_weight} * jacobian penalty" if jac_weight > 0 else "")},
                           "impls": {}}
    ref_model = None
    if ref is not None:
        torch.manual_seed(seed)
        ref_model = build_reference(ref, width, modalities, f_max_iter, b_max_iter).to(device).train()
        rprobe = RefProbe(ref_model)
        impls["reference"] = {"kind": "ref", "model": ref_model, "probe": rprobe, "kwargs": {
            "stop_mode": "abs (whole batch)", "f_eps": 1e-3, "b_eps": "1e-3 rel (whole batch)"}}
    # One untimed pass each, with residuals (also the warm-up).
    ref_median = ref_bwd_median = None
    if ref_model is not None:
        p = impls["reference"]["probe"]
        p.measure = True
        _ref_step(ref, ref_model, head, x, y, jac_weight, device)
        p.measure = False
        res["impls"]["reference"] = _summary(p, None)
        res["impls"]["reference"]["settings"] = impls["reference"]["kwargs"]
        ref_median = res["impls"]["reference"]["forward_rel_residual"]["median"]
        ref_bwd_median = res["impls"]["reference"]["backward_rel_residual"]["median"]
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        kw = dict(VARIANTS[name])
        needs_ref = [k for k in ("f_tol", "b_tol") if kw.get(k) == "ref_median"]
        if needs_ref and ref_median is None:
            logger.warning("variant %s needs the reference's residuals; skipped (no --reference)", name)
            continue
        for k in needs_ref:
            kw[k] = _round_down(ref_median if k == "f_tol" else ref_bwd_median)
        kw.setdefault("jac_reg", jac_weight > 0)
        torch.manual_seed(seed)
        model = _ours(width, modalities, f_max_iter, b_max_iter, **kw).to(device).train()
        if ref_model is not None:
            copy_reference_into_ours(ref_model, model)
        effective = _effective_settings(model)
        probe = OursProbe(model)
        impls[name] = {"kind": "ours", "model": model, "probe": probe, "kwargs": kw}
        probe.measure = True
        _ours_step(model, head, x, y, jac_weight)
        probe.measure = False
        res["impls"][name] = _summary(probe, model.last_info)
        res["impls"][name]["settings"] = {k: v for k, v in kw.items()}
        res["impls"][name]["effective_settings"] = effective
    if ref_model is not None:
        ours_any = next((v["model"] for v in impls.values() if v["kind"] == "ours"), None)
        if ours_any is not None:
            fr = _ref_func(ref, ref_model, x)
            fo = ours_any.deq_function(x)
            with torch.no_grad():
                z = torch.randn(batch, (modalities + 1) * width, generator=torch.Generator().manual_seed(seed + 2))
                z = z.to(device)
                res["same_function_max_abs_diff"] = float((fr(z) - fo(z)).abs().max())
    # Gradient quality (loss without the stochastic Jacobian term) against a float64 implicit
    # gradient solved to 1e-9: per sample, the gradient w.r.t. that sample's inputs (a DEQ
    # acts row by row, so each sample's input gradient depends on its own solves only; the
    # median is robust to the odd sample whose equilibrium is barely stable), and the
    # fusion-parameter gradient (a sum over samples, so one such sample can dominate it).
    if grad_check and any(v["kind"] == "ours" for v in impls.values()):
        first = next(v["model"] for v in impls.values() if v["kind"] == "ours")
        # the joint (unstaged) solve, so the staged default is checked against the other path
        exact_model = _ours(width, modalities, 300, 300, f_tol=1e-9, b_tol=1e-9,
                            staged=False).to(device).double().train()
        exact_model.load_state_dict(first.state_dict())
        head64 = torch.nn.Linear(width, NUM_CLASSES).to(device).double()
        head64.load_state_dict(head.state_dict())
        x64 = [t.detach().double().requires_grad_() for t in x]
        _ours_step(exact_model, head64, x64, y, 0.0)
        exact = ours_grad_vector(exact_model)
        exact_x = torch.cat([t.grad for t in x64], 1).cpu()                       # (B, M d)
        info = exact_model.last_info or {}
        res["exact_gradient"] = {
            "how": "ours, float64, Anderson on the joint state, f_tol = b_tol = 1e-9 (rel), caps 300/300, "
                   "CE loss only",
            "forward_converged_fraction": float(info["converged"].float().mean()) if "converged" in info else None,
            "backward_converged_fraction": float(info["backward"]["converged"].float().mean())
            if "backward" in info else None}
        del exact_model, head64, x64
        for name, imp in impls.items():
            xr = [t.detach().clone().requires_grad_() for t in x]
            if imp["kind"] == "ref":
                _ref_step(ref, imp["model"], head, xr, y, 0.0, device)
                gv = ref_grad_vector(imp["model"], modalities)
            else:
                _ours_step(imp["model"], head, xr, y, 0.0)
                gv = ours_grad_vector(imp["model"])
            gx = torch.cat([t.grad for t in xr], 1).double().cpu()
            per_sample = (gx - exact_x).norm(dim=1) / exact_x.norm(dim=1).clamp_min(1e-30)
            q = torch.quantile(per_sample, torch.tensor([0.5, 0.9], dtype=per_sample.dtype))
            res["impls"][name]["gradient_vs_exact"] = dict(
                _grad_error(gv, exact), input_grad_rel_error_median=float(q[0]),
                input_grad_rel_error_p90=float(q[1]), input_grad_rel_error_max=float(per_sample.max()))
    # Timed, interleaved repeats (order rotated each repeat).
    names = list(impls)
    # in_f / in_vjp: time spent inside the solvers' calls of f (forward) and of the
    # vector-Jacobian step (backward); the rest of the solve is solver bookkeeping.
    times: Dict[str, Dict[str, List[float]]] = {
        n: {"forward": [], "backward": [], "step": [], "in_f": [], "in_vjp": [], "fwd_solve": [], "bwd_solve": []}
        for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            imp = impls[n]
            imp["probe"].reset()
            gc.collect()
            if imp["kind"] == "ref":
                tf, tb = _ref_step(ref, imp["model"], head, x, y, jac_weight, device)
            else:
                tf, tb = _ours_step(imp["model"], head, x, y, jac_weight)
            times[n]["forward"].append(tf)
            times[n]["backward"].append(tb)
            times[n]["step"].append(tf + tb)
            times[n]["in_f"].append(imp["probe"].fwd.get("f_time", 0.0))
            times[n]["in_vjp"].append(imp["probe"].bwd.get("f_time", 0.0))
            times[n]["fwd_solve"].append(imp["probe"].fwd.get("solve_time", 0.0))
            times[n]["bwd_solve"].append(imp["probe"].bwd.get("solve_time", 0.0))
    for n in names:
        t = times[n]
        res["impls"][n]["time_s"] = {k: statistics.median(v) for k, v in t.items()}
        res["impls"][n]["time_s_all"] = t
    if "reference" in names:
        ref_t = times["reference"]
        for n in names:
            if n == "reference":
                continue
            t = times[n]
            res["impls"][n]["speedup_vs_reference"] = {
                k: statistics.median(ref_t[k]) / statistics.median(t[k]) for k in ("step", "forward", "backward")}
            paired = sorted(a / b for a, b in zip(ref_t["step"], t["step"]))
            res["impls"][n]["speedup_paired_median"] = statistics.median(paired)
            # spread of the per-repeat ratios: quartiles (with >= 4 repeats) and range
            q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) >= 4 else (None, None, None)
            res["impls"][n]["speedup_paired_spread"] = {"q1": q1, "q3": q3, "min": paired[0], "max": paired[-1]}
            rr, ro = res["impls"]["reference"]["forward_rel_residual"], res["impls"][n]["forward_rel_residual"]
            res["impls"][n]["residual_equal_or_better"] = bool(
                ro["median"] <= rr["median"] * 1.0001 and ro["max"] <= rr["max"] * 1.0001)
    return res


# ============================================================================ memory
def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_delta(step: Callable[[], Any]) -> Tuple[int, int, str]:
    """``(peak RSS during step - RSS before, RSS before, method)`` in bytes.

    Linux: the peak mark ``VmHWM`` is reset just before the step and read after it. Elsewhere
    ``ru_maxrss`` (lifetime peak of the process) is used, which is only meaningful when the
    step's peak exceeds every earlier one.
    """
    if _reset_peak_rss() and _proc_status_kb("VmHWM") is not None:
        before = (_proc_status_kb("VmRSS") or 0) * 1024
        step()
        return (_proc_status_kb("VmHWM") or 0) * 1024 - before, before, "VmHWM reset via /proc/self/clear_refs"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    before = kb * scale
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - before, before, "ru_maxrss (lifetime peak)"


def _profiled_peak(step: Callable[[], Any]) -> Optional[int]:
    """Highest running total of CPU tensor allocations during ``step``, above its start value."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        nodes: List[Any] = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            n = stack.pop()
            nodes.append(n)
            stack.extend(n.children)
        allocs = sorted((n for n in nodes if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
        if not allocs:
            return None
        start = allocs[0].extra_fields.total_allocated - allocs[0].extra_fields.alloc_size
        return int(max(n.extra_fields.total_allocated for n in allocs) - start)
    except Exception as exc:  # private API; optional cross-check
        logger.debug("profiler peak unavailable: %r", exc)
        return None


def memory_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One memory configuration, run inside a fresh process (see :func:`measure_memory`)."""
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec.get("device", "cpu"))
    width, batch, M, n = spec["width"], spec["batch"], spec["modalities"], int(spec["iters"])
    impl = spec["impl"]
    torch.manual_seed(spec["seed"])
    x, y = _inputs(width, batch, M, spec["seed"], device)
    head = torch.nn.Linear(width, NUM_CLASSES).to(device)
    out: Dict[str, Any] = {"impl": impl, "iters": n}
    ref = load_reference(spec["reference"]) if impl == "reference" else None

    def make(iters: int) -> Tuple[Callable[[], Any], _Probe]:
        if ref is not None:
            model = build_reference(ref, width, M, iters, iters + 1).to(device).train()
            probe: _Probe = RefProbe(model)
            return (lambda: _ref_step(ref, model, head, x, y, 0.0, device)), probe
        mode = "unrolled" if impl == "ours_unrolled" else "implicit"
        ours = _ours(width, M, iters, iters + 1, f_tol=0.0, b_tol=0.0, backward=mode).to(device).train()
        return (lambda: _ours_step(ours, head, x, y, 0.0)), OursProbe(ours)

    # Warm-up: a 3-iteration step of the same kind pays the one-time costs (kernels, autograd
    # engine, thread pools) before the baseline is taken.
    warm, _ = make(3)      # 3: the reference's Anderson crashes below 3 (UnboundLocalError)
    warm()
    del warm
    step, probe = make(n)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        out["peak_bytes_cuda"] = int(torch.cuda.max_memory_allocated() - base)
    delta, before, method = _peak_rss_delta(step)
    out["rss_before_bytes"] = before
    out["peak_rss_delta_bytes"] = int(delta)
    out["rss_method"] = method
    out["forward_evals"] = probe.fwd.get("evals")
    out["backward_evals"] = probe.bwd.get("evals")
    gc.collect()
    out["peak_tensor_bytes"] = _profiled_peak(step)
    return out


def measure_memory(ref_path: Optional[str], width: int = 512, batch: int = 128, modalities: int = 2,
                   iters: Sequence[int] = (10, 100), threads: int = 1, seed: int = 0,
                   impls: Sequence[str] = ("ours_implicit", "ours_unrolled", "reference"),
                   timeout: float = 900.0) -> Dict[str, Any]:
    """Peak memory of one training step per (implementation, iterations), each in a fresh process."""
    rows: List[Dict[str, Any]] = []
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"      # large blocks via mmap: freed memory leaves the RSS
    env.setdefault("PYTHONPATH", "")
    for impl in impls:
        if impl == "reference" and ref_path is None:
            continue
        for n in iters:
            spec = {"impl": impl, "iters": int(n), "width": width, "batch": batch, "modalities": modalities,
                    "threads": threads, "seed": seed, "reference": ref_path, "device": "cpu"}
            # This file run as a script (its ``__main__`` block calls :func:`main`): the child
            # imports multizoo_ext from the same place as this process.
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            if proc.returncode != 0:
                rows.append({"impl": impl, "iters": int(n), "error": proc.stderr.strip()[-2000:]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ratios: Dict[str, Dict[str, Optional[float]]] = {}
    if len(iters) >= 2:
        lo, hi = min(iters), max(iters)
        for impl in impls:
            a = next((r for r in rows if r["impl"] == impl and r["iters"] == lo and "error" not in r), None)
            b = next((r for r in rows if r["impl"] == impl and r["iters"] == hi and "error" not in r), None)
            if a and b:
                ratios[impl] = {k: (b[k] / a[k] if a.get(k) and b.get(k) is not None else None)
                                for k in ("peak_rss_delta_bytes", "peak_tensor_bytes")}
    return {"config": {"width": width, "batch": batch, "modalities": modalities, "iters": list(iters),
                       "threads": threads, "tolerance": 0.0, "backward_cap": "forward + 1",
                       "loss": "CE(Linear head), no Jacobian term"},
            "rows": rows, "ratio_hi_vs_lo": ratios}


# ============================================================================ convergence
def _trace_stats(trace: Sequence[torch.Tensor]) -> Dict[str, List[float]]:
    t = torch.stack([v.detach().double().cpu() for v in trace])            # (iters, B)
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=t.dtype), dim=1)
    return {"p10": q[0].tolist(), "median": q[1].tolist(), "p90": q[2].tolist()}


def measure_convergence(ref: Optional[types.SimpleNamespace], width: int = 512, batch: int = 128,
                        modalities: int = 2, iters: int = 100, seed: int = 0,
                        device: torch.device = torch.device("cpu"), plot: Optional[os.PathLike] = None,
                        f_tol: Optional[float] = None) -> Dict[str, Any]:
    """Per-sample relative residual per evaluation of ``f`` (see module doc); PNG only if ``plot``."""
    torch.manual_seed(seed)
    x, _ = _inputs(width, batch, modalities, seed, device)
    ours = _ours(width, modalities, iters, iters + 1).to(device).eval()
    ref_model = None
    if ref is not None:
        torch.manual_seed(seed)
        ref_model = build_reference(ref, width, modalities, iters, iters + 1).to(device).eval()
        copy_reference_into_ours(ref_model, ours)
    curves: Dict[str, Dict[str, List[float]]] = {}
    with torch.no_grad():
        f = ours.deq_function(x)
        z0 = torch.zeros(batch, ours.state_dim, device=device)
        _, info = anderson(f, z0, max_iter=iters, tol=0.0, trace=True)
        curves["DEQ, Anderson (ours)"] = _trace_stats(info["trace_rel"])
        _, info = fixed_point_iter(f, z0, max_iter=iters, tol=0.0, trace=True)
        curves["DEQ, fixed-point iteration (ours)"] = _trace_stats(info["trace_rel"])
    unrolled = _ours(width, modalities, iters, iters + 1, backward="unrolled", trace=True).to(device).train()
    unrolled.load_state_dict(ours.state_dict())
    _, uinfo = unrolled(list(x), return_info=True)
    curves["weight-tied unrolling (ours)"] = _trace_stats(uinfo["trace_rel"])
    del unrolled
    if ref_model is not None:
        trace: List[torch.Tensor] = []

        def record(func: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
            def g(z: torch.Tensor) -> torch.Tensor:
                fz = func(z)
                b = z.shape[0]
                a = torch.linalg.vector_norm((fz - z).reshape(b, -1), dim=1)
                trace.append(a / (torch.linalg.vector_norm(fz.reshape(b, -1), dim=1) + _REL_EPS))
                return fz
            return g
        orig = ref_model.f_solver
        ref_model.f_solver = lambda func, x0, **kw: orig(record(func), x0, **kw)
        with torch.no_grad(), reference_patches(device):
            ref_model(list(x))
        curves["DEQ, Anderson (reference)"] = _trace_stats(trace)
    out: Dict[str, Any] = {"config": {"width": width, "batch": batch, "modalities": modalities, "iters": iters,
                                      "tolerance": 0.0, "seed": seed, "init": "random (reference init when "
                                      "the reference is loaded)"},
                           "curves": curves,
                           "final_median": {k: v["median"][-1] for k, v in curves.items()},
                           "evals_to_reach": {}}
    for thr in (1e-2, 1e-3, 1e-4):
        out["evals_to_reach"][f"{thr:g}"] = {
            k: next((i + 1 for i, v in enumerate(c["median"]) if v <= thr), None) for k, c in curves.items()}
    if plot is not None:
        out["plot"] = str(plot_convergence(out, plot, f_tol=f_tol))
    return out


_NO_MATPLOTLIB = ("the convergence plot (--plot) needs matplotlib: pip install matplotlib "
                  "(or the package's extra: pip install 'multizoo-ext[plot]')")


def plot_convergence(conv: Dict[str, Any], path: os.PathLike, f_tol: Optional[float] = None) -> Path:
    """Write the convergence plot (matplotlib imported here, lazily)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(_NO_MATPLOTLIB) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    styles = {"DEQ, Anderson (ours)": "-", "DEQ, fixed-point iteration (ours)": "-",
              "weight-tied unrolling (ours)": "--", "DEQ, Anderson (reference)": ":"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, c in conv["curves"].items():
        it = range(1, len(c["median"]) + 1)
        label = name + ("\n(same iterates as fixed-point iteration)" if name.startswith("weight-tied") else "")
        (line,) = ax.plot(it, c["median"], styles.get(name, "-"), label=label, lw=1.8)
        ax.fill_between(it, c["p10"], c["p90"], color=line.get_color(), alpha=0.15, lw=0)
    if f_tol:
        ax.axhline(f_tol, color="grey", lw=0.8, ls="-.", label=f"f_tol = {f_tol:g}")
    cfg = conv["config"]
    ax.set_yscale("log")
    ax.set_xlabel("evaluations of f")
    ax.set_ylabel("relative residual ||f(z)-z|| / ||f(z)|| per sample")
    ax.set_title(f"DEQ fusion convergence at random init (width {cfg['width']}, batch {cfg['batch']}, "
                 f"{cfg['modalities']} modalities)\nmedian over samples, band 10-90 %", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ============================================================================ run / report
def git_commit(root: os.PathLike) -> Optional[str]:
    """Short commit of the git checkout at ``root``, or None (not a checkout, no git)."""
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(threads: int) -> Dict[str, Any]:
    commit = git_commit(REPO_ROOT)
    files = {}
    for rel in ("fusions/deq/fusion.py", "fusions/deq/solvers.py", "fusions/deq/backward.py", "fusions/deq/staged.py"):
        fp = FUSIONS_DIR / Path(rel).relative_to("fusions")
        if fp.is_file():
            files[rel] = hashlib.sha1(fp.read_bytes()).hexdigest()[:10]
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": threads,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "commit": commit,
            "cuda": torch.cuda.is_available(), "deq_files_sha1": files}


def run(reference: Optional[os.PathLike] = None, width: int = 512, batch: int = 128, modalities: int = 2,
        repeats: int = 15, threads: int = 1, f_max_iter: int = 55, b_max_iter: int = 56, jac_weight: float = 0.1,
        variants: Sequence[str] = DEFAULT_VARIANTS, parts: Sequence[str] = PARTS,
        memory_iters: Sequence[int] = (10, 100), conv_iters: int = 100, plot: Optional[os.PathLike] = None,
        seed: int = 0, grad_check: bool = True) -> Dict[str, Any]:
    """All measurements; returns a JSON-able dict (see :func:`to_markdown`)."""
    torch.set_num_threads(int(threads))
    device = torch.device("cpu")
    result: Dict[str, Any] = {"environment": environment(int(threads)), "reference": None}
    ref = None
    if reference is not None:
        try:
            ref = load_reference(reference)
            with reference_patches(device) as applied:
                pass
            result["reference"] = {"path": ref.root, "commit": ref.commit,
                                   "patches": ref.import_patches + applied}
        except ReferenceUnavailable as exc:
            logger.warning("reference skipped: %s", exc)
            result["reference"] = {"error": str(exc)}
    else:
        logger.warning("no --reference given: reference columns are skipped")
    for p in parts:
        if p not in PARTS:
            raise ValueError(f"unknown part {p!r}; known: {', '.join(PARTS)}")
    if "speed" in parts:
        t = time.perf_counter()
        result["speed"] = measure_speed(ref, width, batch, modalities, f_max_iter, b_max_iter, repeats,
                                        jac_weight, variants, seed, device, grad_check)
        result["speed"]["wall_s"] = time.perf_counter() - t
    if "memory" in parts:
        t = time.perf_counter()
        result["memory"] = measure_memory(ref.root if ref is not None else None, width, batch, modalities,
                                          memory_iters, threads, seed)
        result["memory"]["wall_s"] = time.perf_counter() - t
    if "convergence" in parts:
        t = time.perf_counter()
        f_tol = DEQ_DEFAULTS.f_tol
        result["convergence"] = measure_convergence(ref, width, batch, modalities, conv_iters, seed, device,
                                                    plot, f_tol)
        result["convergence"]["wall_s"] = time.perf_counter() - t
    return result


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return format(v, spec)
    return str(v)


def _mib(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _rows_cell(r: Dict[str, Any], side: str, B: int) -> str:
    """Rows evaluated per batch sample; per stage (``a + b``) for a staged solve."""
    stages = r.get(f"{side}_stage_rows") or []
    if len(stages) > 1:
        return " + ".join(_fmt(v / B) for v in stages)
    rows = r.get(f"{side}_rows")
    return _fmt(rows / B if rows else None)


def _paired_cell(r: Dict[str, Any]) -> str:
    """``3.32x (IQR 3.12-3.54)``: the paired speed-up and the quartiles of the per-repeat ratios."""
    med = r.get("speedup_paired_median")
    if not med:
        return "-"
    spread = r.get("speedup_paired_spread") or {}
    if spread.get("q1") is None:
        return f"{med:.2f}x"
    return f"{med:.2f}x (IQR {spread['q1']:.2f}-{spread['q3']:.2f})"


def to_markdown(result: Dict[str, Any]) -> str:
    """Markdown tables of :func:`run`'s result."""
    env = result.get("environment", {})
    lines = [f"torch {env.get('torch')}, {env.get('threads')} thread(s) (`torch.set_num_threads`), "
             f"{env.get('cpu_count')} CPU cores, commit {env.get('commit')} (DEQ files sha1: "
             + ", ".join(f"{k} {v}" for k, v in env.get("deq_files_sha1", {}).items()) + f"), {env.get('platform')}"]
    if result.get("command"):
        lines.insert(0, f"Command: `{result['command']}`\n")
    ref = result.get("reference")
    if not ref:
        lines.append("\nReference: not given (`--reference PATH`), its columns are skipped.")
    elif "error" in ref:
        lines.append(f"\nReference: skipped ({ref['error']}).")
    else:
        lines.append(f"\nReference: {ref['path']} at {ref.get('commit')}; patches: " + "; ".join(ref["patches"]) + ".")
    sp = result.get("speed")
    if sp:
        c = sp["config"]
        lines += ["", f"### Training step (width {c['width']}, batch {c['batch']}, {c['modalities']} modalities, "
                  f"Anderson, caps {c['f_max_iter']}/{c['b_max_iter']}, loss {c['loss']}, median of "
                  f"{c['repeats']} interleaved repeats)", ""]
        lines.append("Speed-up = median(reference) / median(impl); paired = median over repeats of the ratio "
                     "within one repeat (all implementations run back to back, so it is less sensitive to "
                     "load changes on a shared machine; IQR: quartiles of those per-repeat ratios). "
                     "Residuals: per sample, ||f(z*) - z*|| / ||f(z*)|| at "
                     "the returned z* with each implementation's own f; 'equal or better' = median and max "
                     "both <= the reference's.\n")
        if "same_function_max_abs_diff" in sp:
            lines.append(f"Same fusion function in both (reference parameters copied into ours): max |f_ref(z) - "
                         f"f_ours(z)| = {sp['same_function_max_abs_diff']:.2e} at a random z.\n")
        lines.append("| impl | settings | step s | fwd s | bwd s | speed-up (step / fwd / bwd) | paired step speed-up | fwd evals | "
                     "fwd rows / B (per stage when staged) | steps/sample (mean, max) | bwd VJPs | bwd rows / B | fwd rel. residual "
                     "(median, max) | bwd rel. residual (median, max) | equal or better | input-grad rel. error "
                     "per sample (median, p90) | param-grad rel. error (cosine) |")
        lines.append("|" + "---|" * 17)
        B = c["batch"]
        for name, r in sp["impls"].items():
            t = r.get("time_s", {})
            s = r.get("speedup_vs_reference")
            sps = r.get("forward_steps_per_sample")
            fr, br = r.get("forward_rel_residual") or {}, r.get("backward_rel_residual") or {}
            ge = r.get("gradient_vs_exact")
            settings = ", ".join(f"{k}={_fmt(v)}" for k, v in r.get("settings", {}).items() if k != "jac_reg")
            eff = r.get("effective_settings")
            if eff:
                settings = (settings + "; " if settings else "") + "runs with " + ", ".join(
                    f"{k}={_fmt(eff.get(k))}" for k in ("f_tol", "b_tol", "compact", "staged", "staged_backward", "backward")
                    if k in eff)
            lines.append(
                f"| {name} | {settings} | {_fmt(t.get('step'))} | {_fmt(t.get('forward'))} | "
                f"{_fmt(t.get('backward'))} | "
                + (f"{s['step']:.2f}x / {s['forward']:.2f}x / {s['backward']:.2f}x" if s
                   else ("1" if name == "reference" else "-")) + " | "
                + _paired_cell(r) + " | "
                f"{_fmt(r.get('forward_evals'))} | "
                f"{_rows_cell(r, 'forward', B)} | "
                + (f"{sps['mean']:.1f}, {sps['max']:.0f}" if sps else "-") + " | "
                f"{_fmt(r.get('backward_evals'))} | "
                f"{_rows_cell(r, 'backward', B)} | "
                f"{_fmt(fr.get('median'))}, {_fmt(fr.get('max'))} | {_fmt(br.get('median'))}, {_fmt(br.get('max'))} | "
                + ("-" if "residual_equal_or_better" not in r else ("yes" if r["residual_equal_or_better"] else "no"))
                + " | " + (f"{ge['input_grad_rel_error_median']:.2g}, {ge['input_grad_rel_error_p90']:.2g} | "
                           f"{ge['rel_error']:.2g} ({ge['cosine']:.4f})" if ge else "- | -") + " |")
        lines += ["", "Where the time goes (medians over the repeats): the solve (inside it: calls of f / of the "
                  "backward vector-Jacobian step, the rest is solver bookkeeping) and outside it (forward: "
                  "injections, f recomputed at z* with a graph, Jacobian penalty; backward: head, graph "
                  "recomputation, Jacobian-penalty double backward, parameter gradients); ms per evaluation "
                  "of one full batch (time in f / (rows / B); for a staged solve an average over stages of "
                  "different costs).", "",
                  "| impl | fwd s | fwd solve s | in f s | solver rest s | outside solve s | ms per f | "
                  "bwd s | bwd solve s | in VJP s | solver rest s | outside solve s | ms per VJP |",
                  "|" + "---|" * 13]
        for name, r in sp["impls"].items():
            t = r.get("time_s", {})
            fr_ = (r.get("forward_rows") or 0) / B
            br_ = (r.get("backward_rows") or 0) / B

            def d(a: str, b: str) -> Optional[float]:
                return t[a] - t[b] if a in t and b in t else None
            lines.append(
                f"| {name} | {_fmt(t.get('forward'))} | {_fmt(t.get('fwd_solve'))} | {_fmt(t.get('in_f'))} | "
                f"{_fmt(d('fwd_solve', 'in_f'))} | {_fmt(d('forward', 'fwd_solve'))} | "
                f"{_fmt(t['in_f'] / fr_ * 1e3 if fr_ and 'in_f' in t else None)} | {_fmt(t.get('backward'))} | "
                f"{_fmt(t.get('bwd_solve'))} | {_fmt(t.get('in_vjp'))} | {_fmt(d('bwd_solve', 'in_vjp'))} | "
                f"{_fmt(d('backward', 'bwd_solve'))} | "
                f"{_fmt(t['in_vjp'] / br_ * 1e3 if br_ and 'in_vjp' in t else None)} |")
        if sp.get("exact_gradient"):
            eg = sp["exact_gradient"]
            lines.append(f"\nGradient errors (CE loss without the Jacobian term; per-sample input gradients and the "
                         f"fusion-parameter gradient) against "
                         f"{eg['how']} (forward converged {_fmt(eg.get('forward_converged_fraction'))}, "
                         f"backward converged {_fmt(eg.get('backward_converged_fraction'))}).")
    mem = result.get("memory")
    if mem:
        c = mem["config"]
        lines += ["", f"### Peak memory of one training step (width {c['width']}, batch {c['batch']}, "
                  f"tolerance 0 so every iteration runs, backward cap = forward + 1; fresh process each)", "",
                  "| impl | fwd iters | fwd evals | bwd evals | peak RSS delta MiB | peak tensor MiB (profiler) |",
                  "|---|---|---|---|---|---|"]
        for r in mem["rows"]:
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['iters']} | error: {r['error'].splitlines()[-1] if r['error'] else ''} |"
                             " | | |")
                continue
            lines.append(f"| {r['impl']} | {r['iters']} | {_fmt(r.get('forward_evals'))} | "
                         f"{_fmt(r.get('backward_evals'))} | {_mib(r.get('peak_rss_delta_bytes'))} | "
                         f"{_mib(r.get('peak_tensor_bytes'))} |")
        if mem.get("ratio_hi_vs_lo"):
            lo, hi = min(c["iters"]), max(c["iters"])
            lines += ["", f"| impl | RSS ratio {hi}/{lo} | tensor ratio {hi}/{lo} |", "|---|---|---|"]
            for impl, rr in mem["ratio_hi_vs_lo"].items():
                lines.append(f"| {impl} | {_fmt(rr.get('peak_rss_delta_bytes'), '.2f')} | "
                             f"{_fmt(rr.get('peak_tensor_bytes'), '.2f')} |")
    conv = result.get("convergence")
    if conv:
        c = conv["config"]
        lines += ["", f"### Convergence at random init (width {c['width']}, batch {c['batch']}, tolerance 0, "
                  f"{c['iters']} evaluations): median per-sample relative residual", ""]
        cols = [n for n in (5, 10, 20, 30, 40, 55, 75, 100) if n <= c["iters"]]
        lines.append("| solver | " + " | ".join(f"@{n}" for n in cols) + " | evals to 1e-2 / 1e-3 / 1e-4 |")
        lines.append("|" + "---|" * (len(cols) + 2))
        for name, cv in conv["curves"].items():
            reach = [conv["evals_to_reach"][k].get(name) for k in ("0.01", "0.001", "0.0001")]
            med = cv["median"]
            lines.append(f"| {name} | " + " | ".join(_fmt(med[n - 1]) if n <= len(med) else "-" for n in cols)
                         + " | " + " / ".join(_fmt(v) for v in reach) + " |")
        if conv.get("plot"):
            lines.append(f"\nPlot: `{conv['plot']}`.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> Dict[str, Any]:
    """Command line (``python benchmarks/bench_deq.py``); returns the result.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
        prog: program name in the usage line and the recorded command (default: the running
            script's name).
    """
    p = argparse.ArgumentParser(prog=prog,
                                description="DEQ fusion measurements: training-step speed vs the reference, "
                                "peak memory vs iterations, convergence plot.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reference", default=None, help="path to a checkout of github.com/jinhong-ni/DEQFusion "
                   "(outside this repository); without it the reference columns are skipped")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--modalities", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15,
                   help="interleaved timed repeats (many: single steps scatter on a shared machine)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--f-max-iter", type=int, default=55)
    p.add_argument("--b-max-iter", type=int, default=56)
    p.add_argument("--jac-weight", type=float, default=0.1,
                   help="weight of the Jacobian penalty in the loss (reference MultiBench loop: 0.1); 0 = none")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"ours: any of {', '.join(VARIANTS)}")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--memory-iters", default="10,100")
    p.add_argument("--conv-iters", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--markdown", default=None, help="write the tables here")
    p.add_argument("--plot", default=None, help="write the convergence PNG here "
                   "(e.g. docs/figures/deq_convergence.png)")
    p.add_argument("--no-grad-check", action="store_true", help="skip the gradient-error column")
    p.add_argument("--quick", action="store_true", help="smoke run: width 64, batch 16, 2 repeats")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_child is not None:
        print(json.dumps(memory_child(json.loads(a.memory_child))))
        return {}
    if a.plot is not None and importlib.util.find_spec("matplotlib") is None:
        p.error(_NO_MATPLOTLIB)  # before the measurements, not after them
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.quick:
        a.width, a.batch, a.repeats = 64, 16, 2
    result = run(reference=a.reference, width=a.width, batch=a.batch, modalities=a.modalities, repeats=a.repeats,
                 threads=a.threads, f_max_iter=a.f_max_iter, b_max_iter=a.b_max_iter, jac_weight=a.jac_weight,
                 variants=[v for v in a.variants.split(",") if v], parts=[v for v in a.parts.split(",") if v],
                 memory_iters=[int(v) for v in a.memory_iters.split(",")], conv_iters=a.conv_iters,
                 plot=a.plot, seed=a.seed, grad_check=not a.no_grad_check)
    result["command"] = " ".join([prog or Path(sys.argv[0]).name] + list(sys.argv[1:] if argv is None else argv))
    md = to_markdown(result)
    print(md)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    if a.markdown:
        Path(a.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(a.markdown).write_text(md)
    return result


if __name__ == "__main__":
    main()
