"""Fixed-point solvers for deep equilibrium (DEQ) models, batched with per-sample stopping.

Every solver finds ``z*`` with ``z* = f(z*)`` and shares one signature::

    z, info = solver(f, z0, max_iter, tol, stop_mode="rel", **solver_options)

- ``f`` maps a batch ``(b, n)`` to ``(b, n)`` and must act on each row (sample) on its own,
  as a DEQ layer does. The solvers know nothing of the function they solve.
- ``z0`` is ``(B, ...)``: the first dimension is the batch, the rest is flattened to ``n``
  (a 1-D ``z0`` is ``B`` scalar problems; a 0-D one a single scalar problem). ``z`` comes back
  in the shape of ``z0``.
- **Per-sample stopping.** A sample stops when its own residual ``||f(z) - z||`` (``'abs'``)
  or ``||f(z) - z|| / ||f(z)||`` (``'rel'``) falls below ``tol``. Its result is frozen at that
  iterate, so a sample's result does not depend on which other samples share its batch (up
  to floating-point differences of batched matrix products). The reference implementation
  stops on the whole batch's residual norm instead, so its results depend on the batch.
- **Result.** Per sample: the first iterate that met ``tol``; otherwise the iterate with the
  lowest residual within ``max_iter`` evaluations of ``f``.
- **Failures never raise.** A sample whose residual is NaN/Inf, or grows above
  ``divergence`` times its initial residual, is frozen at its best iterate and flagged
  (``info['nan']``, ``info['diverged']``); the others go on.
- **Host synchronisation.** Convergence flags are updated on the device every iteration;
  whether *all* samples are done is read on the host (one ``.all()``) only every
  ``check_every`` iterations. On the CPU a check is free, so the default is 1; on an
  accelerator a check stalls the launch queue, so the default is 4 (up to 3 wasted
  iterations when everything has converged; results are identical because every sample is
  frozen at the iteration it converged).
- **Compaction** (``compact=True``, or a fraction): at a check, once at least that fraction
  (default 0.1) of the working batch is done, those samples leave it, so later iterations
  evaluate ``f`` only on the unfinished ones. ``f`` is then called as ``f(z_sub, index)``
  with ``index`` ``(b,)`` int64, the batch positions of the rows of ``z_sub`` (a DEQ layer
  uses it to pick the matching injections). Worth it when samples converge at different
  speeds; it costs a host sync per check and a copy of the solver's history per compaction.

``info`` (a dict, all tensors on ``z0``'s device, detached):
    ``steps`` (B,) int64: evaluations of ``f`` up to the returned iterate (1 = ``z0``);
    ``abs_residual`` / ``rel_residual`` (B,): residuals of the returned iterate;
    ``f_norm`` (B,): ``||f(z)||`` of the returned iterate (to combine residuals of parts);
    ``converged`` (B,) bool; ``nan`` (B,) bool; ``diverged`` (B,) bool;
    ``iterations`` (int): evaluations of ``f`` on the (working) batch;
    ``stop_mode``, ``tol``, ``max_iter``; and with ``trace=True``: ``trace_abs`` /
    ``trace_rel``, lists with one (B,) tensor per iteration (the residual of the iterate
    evaluated at that iteration; finished samples repeat their final value), for
    convergence plots.

Example:
    >>> import torch
    >>> from multizoo_ext.fusions.deq.solvers import anderson
    >>> A = 0.5 * torch.eye(3)
    >>> f = lambda z: z @ A + 1.0                     # fixed point z* = 2
    >>> z, info = anderson(f, torch.zeros(4, 3), max_iter=30, tol=1e-6)
    >>> torch.allclose(z, torch.full((4, 3), 2.0), atol=1e-4), bool(info["converged"].all())
    (True, True)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

__all__ = [
    "ANDERSON_BETA",
    "ANDERSON_LAM",
    "ANDERSON_MEMORY",
    "DEFAULT_DIVERGENCE",
    "SOLVERS",
    "anderson",
    "broyden",
    "fixed_point_iter",
    "get_solver",
    "register_solver",
    "residuals",
]

# ---------------------------------------------------------------------------- defaults
#: Anderson memory ``m``: the reference (DEQFusion, after locuslab/deq) mixes the last 6 iterates.
ANDERSON_MEMORY = 6
#: Anderson Tikhonov regularisation (reference: 1e-4). Here it is relative to the mean
#: squared residual norm in the memory, so it keeps the small least-squares problem
#: well-posed at any residual scale; the reference adds 1e-4 absolutely, which dominates
#: ``G G^T`` once ``||f(z) - z||^2`` falls below it and turns the step into a plain average
#: of the memory.
ANDERSON_LAM = 1e-4
#: Anderson mixing / damping ``beta`` (reference: 1.0, no damping).
ANDERSON_BETA = 1.0
#: A sample whose absolute residual exceeds this multiple of its initial one is declared
#: diverged (the reference's protective break uses 1e3 (rel) / 1e6 (abs)).
DEFAULT_DIVERGENCE = 1e4
#: Checks of "all samples done" on an accelerator happen every this many iterations (one
#: host sync each); on the CPU every iteration (a check costs nothing there).
DEFAULT_CHECK_EVERY_ACCEL = 4
#: Compact the working batch when at least this fraction of it is done (compaction copies
#: the solver's history, about one pass over it, and pays for itself within an iteration or
#: two at this fraction).
COMPACT_MIN_FRACTION = 0.1
#: Added to ``||f(z)||`` in the relative residual.
_REL_EPS = 1e-9
_STOP_MODES = ("abs", "rel")

Solver = Callable[..., Tuple[torch.Tensor, Dict[str, Any]]]


# ---------------------------------------------------------------------------- helpers
def residuals(z: torch.Tensor, fz: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample absolute and relative residuals of ``z`` given ``fz = f(z)``.

    Args:
        z, fz: ``(B, ...)``.

    Returns:
        ``(abs, rel)``, each ``(B,)``: ``||fz - z||`` and ``||fz - z|| / (||fz|| + 1e-9)``
        (2-norms over all but the batch dimension).
    """
    b = z.shape[0] if z.dim() > 0 else 1
    g = (fz - z).reshape(b, -1)
    abs_res = torch.linalg.vector_norm(g, dim=1)
    rel_res = abs_res / (torch.linalg.vector_norm(fz.reshape(b, -1), dim=1) + _REL_EPS)
    return abs_res, rel_res


def _tiny(dtype: torch.dtype) -> float:
    # Floor of the Anderson regularisation: keeps H invertible when every residual is 0,
    # while 1 / floor stays finite.
    return math.sqrt(torch.finfo(dtype).tiny)


def _flatten_batch(z0: torch.Tensor) -> torch.Tensor:
    if z0.dim() == 0:
        return z0.reshape(1, 1)
    if z0.dim() == 1:
        return z0.reshape(-1, 1)
    return z0.reshape(z0.shape[0], -1)


def _check_args(z0: torch.Tensor, max_iter: int, tol: float, stop_mode: str, name: str) -> None:
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point():
        got = z0.dtype if isinstance(z0, torch.Tensor) else type(z0).__name__
        raise TypeError(f"{name}: z0 must be a floating-point tensor (B, ...), got {got}")
    if z0.dim() > 0 and z0.shape[0] == 0:
        raise ValueError(f"{name}: z0 must hold at least one sample, got shape {tuple(z0.shape)}")
    if int(max_iter) < 1:
        raise ValueError(f"{name}: max_iter must be >= 1, got {max_iter}")
    if not (float(tol) >= 0.0):
        raise ValueError(f"{name}: tol must be >= 0, got {tol}")
    if stop_mode not in _STOP_MODES:
        raise ValueError(f"{name}: stop_mode must be 'abs' or 'rel', got {stop_mode!r}")


def _check_every(z0: torch.Tensor, check_every: Optional[int]) -> int:
    if check_every is None:
        return 1 if z0.device.type == "cpu" else DEFAULT_CHECK_EVERY_ACCEL
    if int(check_every) < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    return int(check_every)


class _Tracker:
    """Per-sample bookkeeping shared by the solvers: best iterate, flags, trace.

    State is kept for the working batch only (rows ``index`` of the full batch; ``None`` =
    all rows in order) and written to full-batch buffers when rows leave (compaction) and at
    the end, so an iteration costs no scatter/gather over the full batch.
    """

    # ``converged`` and ``diverged`` are not tracked per iteration but read off at the end
    # (:meth:`_flags`): a sample stops on its first iterate within ``tol``, which is then its
    # best, so it converged iff its best residual is within ``tol``; a stopped sample that did
    # not converge and whose residual stayed finite diverged.
    _FIELDS = ("best_z", "best_abs", "best_rel", "best_fnorm", "steps", "nan", "active")

    def __init__(self, z0: torch.Tensor, tol: float, stop_mode: str, trace: bool,
                 divergence: float) -> None:
        B = z0.shape[0]
        dev, dt = z0.device, z0.dtype
        self.B = B
        self.tol = float(tol)
        self.stop_mode = stop_mode
        self.divergence = float(divergence)
        self.best_z = z0.clone()                                     # (b, n)
        self.best_abs = torch.full((B,), math.inf, device=dev, dtype=dt)
        self.best_rel = torch.full((B,), math.inf, device=dev, dtype=dt)
        self.best_fnorm = torch.full((B,), math.inf, device=dev, dtype=dt)
        self.steps = torch.zeros(B, device=dev, dtype=torch.long)
        self.nan = torch.zeros(B, device=dev, dtype=torch.bool)
        self.active = torch.ones(B, device=dev, dtype=torch.bool)
        self.sync_free = dev.type == "cpu"                           # reading a flag costs nothing
        self.limit: Optional[torch.Tensor] = None                    # (b,)
        self.index: Optional[torch.Tensor] = None                    # (b,) rows being worked on
        self.full: Optional[Dict[str, torch.Tensor]] = None          # full-batch buffers
        self._all_rows: Optional[torch.Tensor] = None
        self.iterations = 0
        self.trace = trace
        self.trace_abs: List[torch.Tensor] = []
        self.trace_rel: List[torch.Tensor] = []
        self.last_abs = torch.full((B,), math.inf, device=dev, dtype=dt)  # full batch, trace only
        self.last_rel = torch.full((B,), math.inf, device=dev, dtype=dt)

    def update(self, x: torch.Tensor, fx: torch.Tensor, abs_res: Optional[torch.Tensor] = None,
               owned: bool = False) -> torch.Tensor:
        """Record the iterate ``x`` (b, n) with ``fx = f(x)``; return ``done`` (b,) bool.

        ``owned``: the caller never reads ``x`` again, so where a host sync is free (the CPU)
        the best iterates are assembled in ``x`` itself, the rows that did not improve copied
        back in, instead of a full ``where`` pass over the state.
        """
        self.iterations += 1
        if abs_res is None:
            abs_res = torch.linalg.vector_norm(fx - x, dim=1)
        f_norm = torch.linalg.vector_norm(fx, dim=1)
        rel_res = abs_res / (f_norm + _REL_EPS)
        res = abs_res if self.stop_mode == "abs" else rel_res
        if self.limit is None:                                        # divergence threshold (b,)
            self.limit = self.divergence * abs_res
        active = self.active
        # NaN/Inf in x or f(x) makes the residual NaN/Inf; a residual is never negative, so
        # this one comparison is isfinite (which costs four ops)
        finite = res < math.inf
        ok = active & finite
        best = self.best_abs if self.stop_mode == "abs" else self.best_rel
        better = ok & (res < best)
        if owned and self.sync_free and not x.requires_grad:
            stale = better.logical_not().nonzero().squeeze(1)         # (s,), a free host sync
            if stale.numel():
                x.index_copy_(0, stale, self.best_z.index_select(0, stale))
            self.best_z = x
        else:
            self.best_z = torch.where(better[:, None], x, self.best_z)
        self.best_abs = torch.where(better, abs_res, self.best_abs)
        self.best_rel = torch.where(better, rel_res, self.best_rel)
        self.best_fnorm = torch.where(better, f_norm, self.best_fnorm)
        self.steps = torch.where(better, self.iterations, self.steps)
        fine = abs_res <= self.limit                                  # False for NaN and blow-ups
        self.nan = self.nan | (active > finite)                       # active and not finite
        self.active = ok & (fine > (res <= self.tol))                 # ok, fine, not converged
        if self.trace:
            last_abs = torch.where(active, abs_res, self._rows(self.last_abs))
            last_rel = torch.where(active, rel_res, self._rows(self.last_rel))
            self.last_abs = self._scatter(self.last_abs, last_abs)
            self.last_rel = self._scatter(self.last_rel, last_rel)
            self.trace_abs.append(self.last_abs)
            self.trace_rel.append(self.last_rel)
        return self.active.logical_not()

    def rows_index(self, device: torch.device) -> torch.Tensor:
        """``(b,)`` int64 batch positions of the working rows."""
        if self.index is None:
            if self._all_rows is None:
                self._all_rows = torch.arange(self.B, device=device)
            return self._all_rows
        return self.index

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.index is None else full.index_select(0, self.index)

    def _scatter(self, full: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.index is None else full.index_copy(0, self.index, rows)

    def _flush(self) -> None:
        """Write the working rows into the full-batch buffers."""
        if self.index is None:
            self.full = {k: getattr(self, k) for k in self._FIELDS}
            return
        assert self.full is not None
        for k in self._FIELDS:
            self.full[k].index_copy_(0, self.index, getattr(self, k))

    def keep(self, keep: torch.Tensor, *tensors: torch.Tensor) -> List[torch.Tensor]:
        """Drop finished rows from the working batch (one host sync for ``nonzero``); return
        the solver's own working tensors restricted to the kept rows."""
        self._flush()
        if self.index is None:
            assert self.full is not None
            self.full = {k: v.clone() for k, v in self.full.items()}
        sel = keep.nonzero().squeeze(1)                               # (b',)
        self.index = sel if self.index is None else self.index.index_select(0, sel)
        for k in self._FIELDS + ("limit",):
            setattr(self, k, getattr(self, k).index_select(0, sel))
        return [t.index_select(0, sel) for t in tensors]

    def _flags(self, full: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``converged``, ``nan``, ``diverged`` (B,) bool of the full batch at the end."""
        best = full["best_abs"] if self.stop_mode == "abs" else full["best_rel"]
        converged = best <= self.tol
        return {"converged": converged, "nan": full["nan"],
                "diverged": full["active"].logical_or(converged).logical_or_(full["nan"]).logical_not_()}

    def info(self, max_iter: int) -> Dict[str, Any]:
        self._flush()
        assert self.full is not None
        full = self.full
        info: Dict[str, Any] = {
            "steps": full["steps"],
            "abs_residual": full["best_abs"],
            "rel_residual": full["best_rel"],
            "f_norm": full["best_fnorm"],
            **self._flags(full),
            "iterations": self.iterations,
            "stop_mode": self.stop_mode,
            "tol": self.tol,
            "max_iter": int(max_iter),
        }
        if self.trace:
            info["trace_abs"] = self.trace_abs
            info["trace_rel"] = self.trace_rel
        return info

    def result(self) -> torch.Tensor:
        self._flush()
        assert self.full is not None
        return self.full["best_z"]


class _Schedule:
    """Decides, every iteration, whether to stop and which working rows to keep."""

    def __init__(self, z0: torch.Tensor, check_every: Optional[int], compact: Union[bool, float]) -> None:
        self.every = _check_every(z0, check_every)
        self.compact = bool(compact)
        self.fraction = COMPACT_MIN_FRACTION if isinstance(compact, bool) else float(compact)
        if self.compact and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"compact must be a bool or a fraction in (0, 1], got {compact}")

    def check(self, it: int, done: torch.Tensor) -> Tuple[bool, Optional[torch.Tensor]]:
        """``(stop, keep)``: ``keep`` (b,) bool mask of rows to keep when compacting, else None."""
        if it % self.every != 0:
            return False, None
        if not self.compact:
            return bool(done.all()), None
        n_done = int(done.sum())
        if n_done == done.numel():
            return True, None
        if n_done >= max(1, int(self.fraction * done.numel())):
            return False, ~done
        return False, None


def _call(f: Callable[..., torch.Tensor], x: torch.Tensor, tracker: _Tracker, compact: bool) -> torch.Tensor:
    if compact:
        return f(x, tracker.rows_index(x.device))
    return f(x)


def _wrap(f: Callable[..., torch.Tensor], z0: torch.Tensor, compact: bool) -> Callable[..., torch.Tensor]:
    """Let ``f`` see the caller's shape ``(b, *z0.shape[1:])`` while the solver works on (b, n)."""
    tail = tuple(z0.shape[1:]) if z0.dim() >= 2 else None
    scalar = z0.dim() < 2

    def to_user(x: torch.Tensor) -> torch.Tensor:
        if scalar:
            return x.reshape(-1) if z0.dim() == 1 else x.reshape(())
        return x.reshape((x.shape[0],) + tail)

    if compact:
        return lambda x, index: f(to_user(x), index).reshape(x.shape[0], -1)
    return lambda x: f(to_user(x)).reshape(x.shape[0], -1)


def _start(f: Callable[..., torch.Tensor], z0: torch.Tensor, tol: float, stop_mode: str, trace: bool,
           divergence: float, check_every: Optional[int], compact: Union[bool, float]
           ) -> Tuple[torch.Tensor, Callable[..., torch.Tensor], "_Tracker", "_Schedule"]:
    """What every solver starts from: the flat iterate ``(B, n)``, ``f`` on flat states, the
    per-sample tracker and the stopping / compaction schedule."""
    x = _flatten_batch(z0)
    return x, _wrap(f, z0, compact), _Tracker(x, tol, stop_mode, trace, divergence), _Schedule(z0, check_every, compact)


def _finish(tracker: _Tracker, z0: torch.Tensor, max_iter: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
    info = tracker.info(max_iter)
    return tracker.result().reshape(z0.shape), info


# ---------------------------------------------------------------------------- solvers
def fixed_point_iter(f: Callable[..., torch.Tensor], z0: torch.Tensor, max_iter: int = 50,
                     tol: float = 1e-3, stop_mode: str = "rel", *, beta: float = 1.0,
                     check_every: Optional[int] = None, compact: Union[bool, float] = False, trace: bool = False,
                     divergence: float = DEFAULT_DIVERGENCE, **unused: Any
                     ) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """(Damped) fixed-point iteration ``z <- (1 - beta) z + beta f(z)``.

    Args:
        f: ``(b, ...) -> (b, ...)``, row-wise (see the module docstring; ``f(z, index)``
            with ``compact=True``).
        z0: ``(B, ...)`` initial iterate.
        max_iter: maximum evaluations of ``f``. Default: 50.
        tol: stopping tolerance per sample. Default: 1e-3.
        stop_mode: ``'rel'`` (default) or ``'abs'`` residual.
        beta: damping; 1.0 (default) is plain iteration.
        check_every: iterations between host-side "all done?" checks. Default: 1 on the
            CPU, 4 elsewhere.
        compact: drop finished samples from the work (see module docstring); a float in
            (0, 1] also sets the fraction of finished rows that triggers it (True: 0.1).
            Default: False.
        trace: keep per-iteration residuals in ``info``. Default: False.
        divergence: residual growth factor that declares a sample diverged. Default: 1e4.
        unused: other solvers' options, ignored (one call site can switch solvers).

    Returns:
        ``(z, info)``: ``z`` shaped like ``z0``; ``info`` as in the module docstring.
    """
    _check_args(z0, max_iter, tol, stop_mode, "fixed_point_iter")
    x, g, tracker, sched = _start(f, z0, tol, stop_mode, trace, divergence, check_every, compact)   # x: (B, n)
    beta = float(beta)
    for it in range(1, int(max_iter) + 1):
        fx = _call(g, x, tracker, compact)
        done = tracker.update(x, fx)
        if it == max_iter:
            break
        x = fx if beta == 1.0 else torch.lerp(x, fx, beta)
        stop, keep = sched.check(it, done)
        if stop:
            break
        if keep is not None:
            (x,) = tracker.keep(keep, x)
    return _finish(tracker, z0, max_iter)


def anderson(f: Callable[..., torch.Tensor], z0: torch.Tensor, max_iter: int = 50, tol: float = 1e-3,
             stop_mode: str = "rel", *, m: int = ANDERSON_MEMORY, lam: float = ANDERSON_LAM,
             beta: float = ANDERSON_BETA, check_every: Optional[int] = None, compact: Union[bool, float] = False,
             trace: bool = False, divergence: float = DEFAULT_DIVERGENCE, **unused: Any
             ) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Anderson acceleration (type II, Walker & Ni form) with per-sample stopping.

    At iteration k with the last ``n = min(k, m)`` pairs ``(x_i, f(x_i))`` and residuals
    ``g_i = f(x_i) - x_i``, each sample solves
    ``min_alpha ||sum_i alpha_i g_i||^2 + lam' ||alpha||^2`` s.t. ``sum_i alpha_i = 1`` in
    closed form, ``alpha = H^-1 1 / (1^T H^-1 1)`` with ``H = G G^T + lam' I`` (a batched
    ``(B, n, n)`` solve), and moves to
    ``x = beta sum_i alpha_i f(x_i) + (1 - beta) sum_i alpha_i x_i``. ``G G^T`` is updated
    one row per iteration (``O(B m d)``), not recomputed. ``lam' = lam * mean_i ||g_i||^2``
    (scale-free; see ``ANDERSON_LAM``). A sample whose small solve fails takes a plain step.

    Args:
        f, z0, max_iter, tol, stop_mode, check_every, compact, trace, divergence: as in
            :func:`fixed_point_iter`. Defaults: 50, 1e-3, ``'rel'``.
        m: memory. Default: 6 (reference).
        lam: relative Tikhonov regularisation. Default: 1e-4.
        beta: mixing (damping) parameter. Default: 1.0 (reference).
        unused: other solvers' options, ignored.

    Returns:
        ``(z, info)`` as in the module docstring.

    Example:
        >>> import torch
        >>> z, info = anderson(torch.cos, torch.zeros(2, 1), max_iter=40, tol=1e-8)
        >>> round(float(z[0, 0]), 5)
        0.73909
    """
    _check_args(z0, max_iter, tol, stop_mode, "anderson")
    if int(m) < 1:
        raise ValueError(f"anderson: memory m must be >= 1, got {m}")
    m = int(m)
    x, g_f, tracker, sched = _start(f, z0, tol, stop_mode, trace, divergence, check_every, compact)
    B, n = x.shape                                                    # x: (B, n)
    dev, dt = x.device, x.dtype
    beta = float(beta)
    Fm = torch.zeros(B, m, n, device=dev, dtype=dt)                   # f(x_i)      (B, m, n)
    Gm = torch.zeros(B, m, n, device=dev, dtype=dt)                   # f(x_i)-x_i  (B, m, n)
    GG = torch.zeros(B, m, m, device=dev, dtype=dt)                   # G G^T       (B, m, m)
    eye = torch.eye(m, device=dev, dtype=dt)
    ones = torch.ones(B, m, 1, device=dev, dtype=dt)
    for it in range(1, int(max_iter) + 1):
        fx = _call(g_f, x, tracker, compact)
        s = (it - 1) % m                                              # slot of this pair
        Fm[:, s] = fx
        gx = torch.sub(fx, x, out=Gm[:, s])                           # (b, n), stored in place
        # x is the solver's own from the second iteration on (z0 may be the caller's)
        done = tracker.update(x, fx, torch.linalg.vector_norm(gx, dim=1), owned=it > 1)
        if it == max_iter:
            break
        k = min(it, m)                                                # pairs in memory
        b = x.shape[0]
        # (b, k) <g_i, g_s> as (b, 1, n) x (b, n, k): one pass over the memory; vecdot
        # (multiply, then sum) takes two, and (b, k, n) x (b, n, 1) takes a slow bmm path
        row = torch.bmm(gx.unsqueeze(1), Gm[:, :k].transpose(1, 2)).squeeze(1)
        GG[:, s, :k] = row
        GG[:, :k, s] = row
        H = GG[:, :k, :k]                                             # (b, k, k)
        reg = torch.diagonal(H, dim1=1, dim2=2).sum(dim=1).mul_(lam / k).add_(_tiny(dt))  # (b,)
        H = torch.addcmul(H, reg[:, None, None], eye[:k, :k])        # + reg I
        w, _ = torch.linalg.solve_ex(H, ones[:b, :k])                 # (b, k, 1), no error check/sync
        alpha = torch.div(w, w.sum(dim=1, keepdim=True)).squeeze(2)   # (b, k), sums to 1
        ok = torch.isfinite(alpha).all(dim=1, keepdim=True)           # else take a plain step
        alpha = torch.where(ok, alpha, eye[s, :k]).unsqueeze(1)       # (b, 1, k)
        x_new = torch.bmm(alpha, Fm[:, :k]).squeeze(1)                # (b, n)
        if beta != 1.0:
            x_new = x_new - (1.0 - beta) * torch.bmm(alpha, Gm[:, :k]).squeeze(1)
        x = x_new
        stop, keep = sched.check(it, done)
        if stop:
            break
        if keep is not None:
            x, Fm, Gm, GG = tracker.keep(keep, x, Fm, Gm, GG)
    return _finish(tracker, z0, max_iter)


def broyden(f: Callable[..., torch.Tensor], z0: torch.Tensor, max_iter: int = 50, tol: float = 1e-3,
            stop_mode: str = "rel", *, memory: Optional[int] = None, check_every: Optional[int] = None,
            compact: Union[bool, float] = False, trace: bool = False,
            divergence: float = DEFAULT_DIVERGENCE, **unused: Any) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Broyden's ("good") method on ``g(z) = f(z) - z``, without line search.

    The inverse Jacobian of ``g`` is kept as ``-I + U V^T`` with rank-one updates per sample
    (``U``, ``V``: ``(B, L, n)``, i.e. ``2 L`` copies of the state: at width 512, batch 128 and
    ``L = 55`` about 90 MB in float32, and each step reads them twice, so on the CPU a step
    costs several times an Anderson step; it usually needs a few fewer steps). Works on any
    ``(B, ...)`` input (the reference crashes on 2-D inputs). When the update's denominator
    is zero or not finite for a sample, that sample skips the update.

    Args:
        f, z0, max_iter, tol, stop_mode, check_every, compact, trace, divergence: as in
            :func:`fixed_point_iter`.
        memory: number of rank-one updates kept (oldest overwritten). Default: ``max_iter``.
        unused: other solvers' options, ignored.

    Returns:
        ``(z, info)`` as in the module docstring.
    """
    _check_args(z0, max_iter, tol, stop_mode, "broyden")
    L = int(max_iter) if memory is None else int(memory)
    if L < 1:
        raise ValueError(f"broyden: memory must be >= 1, got {memory}")
    x, f_flat, tracker, sched = _start(f, z0, tol, stop_mode, trace, divergence, check_every, compact)
    B, n = x.shape                                                    # x: (B, n)
    dev, dt = x.device, x.dtype
    U = torch.zeros(B, L, n, device=dev, dtype=dt)                    # (B, L, n)
    VT = torch.zeros(B, L, n, device=dev, dtype=dt)                   # (B, L, n)

    def matvec(v: torch.Tensor, used: int) -> torch.Tensor:          # (-I + U V^T) v, v (b, n)
        if used == 0:
            return -v
        c = torch.linalg.vecdot(VT[:, :used], v.unsqueeze(1))         # (b, used)
        return -v + torch.bmm(c.unsqueeze(1), U[:, :used]).squeeze(1)

    def rmatvec(v: torch.Tensor, used: int) -> torch.Tensor:         # v^T (-I + U V^T), v (b, n)
        if used == 0:
            return -v
        c = torch.linalg.vecdot(U[:, :used], v.unsqueeze(1))          # (b, used)
        return -v + torch.bmm(c.unsqueeze(1), VT[:, :used]).squeeze(1)

    fx = _call(f_flat, x, tracker, compact)
    gx = fx - x
    done = tracker.update(x, fx, torch.linalg.vector_norm(gx, dim=1))
    used = 0                                                          # rank-one terms in use
    n_updates = 0
    for it in range(1, int(max_iter)):
        stop, keep = sched.check(it, done)
        if stop:
            break
        if keep is not None:
            x, gx, U, VT = tracker.keep(keep, x, gx, U, VT)
        update = -matvec(gx, used)                                    # Newton-like step (b, n)
        bad = ~torch.isfinite(update.sum(dim=1, keepdim=True))        # NaN/Inf propagate to the sum
        update = torch.where(bad, gx, update)                         # fall back to a plain step
        x_new = x + update
        fx = _call(f_flat, x_new, tracker, compact)
        gx_new = fx - x_new
        done = tracker.update(x_new, fx, torch.linalg.vector_norm(gx_new, dim=1))
        if it == int(max_iter) - 1:
            break
        dx, dg = x_new - x, gx_new - gx
        x, gx = x_new, gx_new
        vT = rmatvec(dx, used)                                        # (b, n)
        denom = (vT * dg).sum(dim=1, keepdim=True)                    # (b, 1)
        u = (dx - matvec(dg, used)) / denom
        ok = torch.isfinite(u.sum(dim=1, keepdim=True) + vT.sum(dim=1, keepdim=True))
        slot = n_updates % L
        U[:, slot] = torch.where(ok, u, torch.zeros_like(u))
        VT[:, slot] = torch.where(ok, vT, torch.zeros_like(vT))
        n_updates += 1
        used = min(n_updates, L)
    return _finish(tracker, z0, max_iter)


#: Solvers by name (the ``solver=`` / ``b_solver=`` arguments of ``DEQFusion``); extended by
#: :func:`register_solver`.
SOLVERS: Dict[str, Solver] = {}


def register_solver(name: str) -> Callable[[Solver], Solver]:
    """Decorator registering ``fn`` as the solver ``name`` (case-insensitive):
    ``register_solver("mine")(fn)``. ``fn`` must follow the solver signature of the module
    docstring. Registering a name again replaces the solver.

    Raises:
        ValueError: ``name`` is not a non-empty string.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_solver: name must be a non-empty string, got {name!r}")
    key = name.strip().lower()

    def decorate(fn: Solver) -> Solver:
        if not callable(fn):
            raise TypeError(f"register_solver({name!r}): expected a callable solver, got {type(fn).__name__}")
        SOLVERS[key] = fn
        return fn

    return decorate


register_solver("anderson")(anderson)
register_solver("broyden")(broyden)
register_solver("fixed_point_iter")(fixed_point_iter)


def get_solver(name_or_callable: Union[str, Solver]) -> Solver:
    """The solver registered under a name (case-insensitive), or a callable as given.

    Raises:
        ValueError: unknown name; the message lists the known ones.
        TypeError: neither a string nor a callable.
    """
    if callable(name_or_callable):
        return name_or_callable
    if not isinstance(name_or_callable, str):
        raise TypeError(f"DEQ solver must be a name or a callable, got {type(name_or_callable).__name__}")
    key = name_or_callable.strip().lower()
    if key not in SOLVERS:
        raise ValueError(f"unknown DEQ solver {name_or_callable!r}; known solvers: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[key]
