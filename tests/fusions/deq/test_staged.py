"""Stage-by-stage solves of block-triangular fixed points (fusions/deq/staged.py) and their
adjoint (the staged implicit backward), against closed forms on a linear map. DEQFusion's
staged solves against its joint ones: tests/fusions/deq/test_fusion.py."""
import functools
import math

import pytest
import torch

from multizoo_ext.fusions.deq import ImplicitBackward, anderson, residuals
from multizoo_ext.fusions.deq.staged import is_staged, merge_stage_infos, solve_staged


class _TriangularLinear:
    """``f(z) = z A^T + c`` with ``A`` lower block-triangular in stages of widths ``sizes``:
    the fixed point is ``z* = c (I - A)^-T`` in closed form."""

    def __init__(self, A: torch.Tensor, c: torch.Tensor, sizes):
        self.A, self.c, self.stage_sizes = A, c, tuple(sizes)
        self.calls = []
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)

    def __call__(self, z, index=None):
        c = self.c if index is None else self.c[index]
        return z @ self.A.T + c

    def stage(self, k, states, outputs=None):
        self.calls.append((k, len(states), None if outputs is None else len(outputs)))
        lo, hi = self.offsets[k], self.offsets[k + 1]
        A_kk = self.A[lo:hi, lo:hi]
        coupled = sum((s @ self.A[lo:hi, self.offsets[j]:self.offsets[j + 1]].T for j, s in enumerate(states)),
                      self.c[:, lo:hi])                                 # c_k + sum_j A_kj z_j, (B, n_k)

        def fk(z, index=None):
            return z @ A_kk.T + (coupled if index is None else coupled[index])
        return fk


def _triangular(B=5, sizes=(3, 4, 2), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    A = torch.randn(n, n, generator=g, dtype=dtype)
    mask = torch.zeros(n, n, dtype=torch.bool)
    lo = 0
    for s in sizes:
        mask[lo:lo + s, :lo + s] = True                                 # lower block-triangular
        lo += s
    A = torch.where(mask, A, torch.zeros_like(A))
    A = 0.6 * A / torch.linalg.matrix_norm(A, ord=2)                    # a contraction
    c = torch.randn(B, n, generator=g, dtype=dtype)
    return A, c


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_staged_solve_finds_the_joint_fixed_point_within_the_joint_tolerance(stop_mode):
    A, c = _triangular()
    f = _TriangularLinear(A, c, (3, 4, 2))
    assert is_staged(f)
    solve = functools.partial(anderson, max_iter=200, stop_mode=stop_mode, compact=True)
    z, info = solve_staged(f, torch.zeros_like(c), solve, tol=1e-9, stop_mode=stop_mode)
    exact = torch.linalg.solve(torch.eye(9, dtype=A.dtype) - A, c.T).T
    torch.testing.assert_close(z, exact, rtol=0, atol=1e-7)
    # joint residual reported = the residual of the joint map at z*, and within tol
    abs_res, rel_res = residuals(z, f(z))
    torch.testing.assert_close(info["abs_residual"], abs_res, rtol=1e-6, atol=1e-15)
    torch.testing.assert_close(info["rel_residual"], rel_res, rtol=1e-6, atol=1e-15)
    res = abs_res if stop_mode == "abs" else rel_res
    assert bool(info["converged"].all()) and float(res.max()) <= 1e-9
    # stages solved in order, each given all earlier states and outputs
    assert f.calls == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    assert len(info["stages"]) == 3
    assert torch.equal(info["steps"], sum(s["steps"] for s in info["stages"]))
    assert info["max_iter"] == 600 and info["iterations"] == sum(s["iterations"] for s in info["stages"])


def test_staged_implicit_gradient_equals_the_closed_form():
    # w . z*(c) with z* = c (I - A)^-T: d/dc = w (I - A)^-1, found by the staged adjoint solve
    A, c = _triangular(B=4, sizes=(5, 3))
    c = c.clone().requires_grad_()
    w = torch.randn(4, 8, dtype=A.dtype, generator=torch.Generator().manual_seed(3))
    for staged in (True, False):
        f = _TriangularLinear(A, c, (5, 3))
        mode = ImplicitBackward("anderson", max_iter=200, tol=1e-11, stop_mode="abs", compact=True, staged=staged)
        solve = functools.partial(anderson, max_iter=200, tol=1e-11, stop_mode="abs", compact=True)
        with torch.no_grad():
            z, info = solve_staged(f, torch.zeros(4, 8, dtype=A.dtype), solve, 1e-11, "abs")
        z, _ = mode.attach(f, z, info, True, False)
        (grad,) = torch.autograd.grad((z * w).sum(), c)
        exact = w @ torch.linalg.inv(torch.eye(8, dtype=A.dtype) - A)
        torch.testing.assert_close(grad, exact, rtol=0, atol=1e-9)
        assert bool(info["backward"]["converged"].all())
        assert ("stages" in info["backward"]) == staged


def test_merge_flags_a_nan_stage_and_never_calls_it_converged():
    ok = {"abs_residual": torch.tensor([1e-5, 1e-5]), "f_norm": torch.tensor([1.0, 1.0]),
          "steps": torch.tensor([3, 4]), "nan": torch.tensor([False, False]),
          "diverged": torch.tensor([False, False]), "iterations": 4, "max_iter": 10}
    bad = dict(ok, abs_residual=torch.tensor([1e-5, math.nan]), nan=torch.tensor([False, True]))
    info = merge_stage_infos([ok, bad], tol=1e-3, stop_mode="rel")
    assert info["converged"].tolist() == [True, False] and info["nan"].tolist() == [False, True]
    assert info["rel_residual"][0] == pytest.approx(math.sqrt(2e-10) / math.sqrt(2), rel=1e-6)


def test_staged_solve_rejects_a_state_of_the_wrong_width():
    A, c = _triangular()
    f = _TriangularLinear(A, c, (3, 4, 2))
    with pytest.raises(ValueError, match=r"stage widths \[3, 4, 2\] \(total 9\) but the state is \(5, 8\)"):
        solve_staged(f, torch.zeros(5, 8, dtype=A.dtype), anderson, tol=1e-6)
