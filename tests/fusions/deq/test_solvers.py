"""Fixed-point solvers: tolerance met, per-sample stopping, failures flagged, torchdeq agreement."""
import pytest
import torch

from multizoo_ext.fusions.deq import SOLVERS, anderson, broyden, fixed_point_iter, get_solver, residuals

SOLVER_NAMES = sorted(SOLVERS)



def _problem(B=6, n=12, dtype=torch.float64, seed=0, contraction=0.8):
    """A row-wise contraction z -> tanh(z W^T + c_b) and its compacting form f(z, index)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=dtype)
    W = contraction * W / torch.linalg.matrix_norm(W, 2)
    c = torch.randn(B, n, generator=g, dtype=dtype) * torch.linspace(0.5, 3.0, B, dtype=dtype)[:, None]
    f = lambda z: torch.tanh(z @ W.T + c)  # noqa: E731
    f_idx = lambda z, index: torch.tanh(z @ W.T + c[index])  # noqa: E731
    return f, f_idx, W, c


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_fixed_point_meets_tolerance(name, stop_mode):
    f, _, _, _ = _problem()
    tol = 1e-9
    z, info = get_solver(name)(f, torch.zeros(6, 12, dtype=torch.float64), max_iter=200, tol=tol,
                               stop_mode=stop_mode)
    abs_res, rel_res = residuals(z, f(z))          # measured directly on the returned point
    res = abs_res if stop_mode == "abs" else rel_res
    assert bool(info["converged"].all())
    assert float(res.max()) <= tol
    torch.testing.assert_close(info["abs_residual"], abs_res, rtol=1e-6, atol=1e-15)
    torch.testing.assert_close(info["rel_residual"], rel_res, rtol=1e-6, atol=1e-15)
    assert info["steps"].shape == (6,) and int(info["steps"].max()) <= info["iterations"] <= 200
    assert not bool(info["nan"].any()) and not bool(info["diverged"].any())


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_agrees_with_torchdeq(name):
    torchdeq_solver = pytest.importorskip("torchdeq.solver")
    ref_solver = {"anderson": torchdeq_solver.anderson_solver, "broyden": torchdeq_solver.broyden_solver,
                  "fixed_point_iter": torchdeq_solver.fixed_point_iter}[name]
    f, _, _, _ = _problem()
    z0 = torch.zeros(6, 12, dtype=torch.float64)
    z_ref, _, _ = ref_solver(f, z0, max_iter=300, tol=1e-11, stop_mode="abs")
    z, info = get_solver(name)(f, z0, max_iter=300, tol=1e-11, stop_mode="abs")
    assert bool(info["converged"].all())
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("compact", [False, True])
def test_sample_result_does_not_depend_on_batch(name, compact):
    f, f_idx, W, c = _problem(B=6)
    solver = get_solver(name)
    fn = f_idx if compact else f
    z_all, info_all = solver(fn, torch.zeros(6, 12, dtype=torch.float64), max_iter=100, tol=1e-6,
                             compact=compact)
    for b in (0, 3, 5):
        alone = (lambda z, index: torch.tanh(z @ W.T + c[b:b + 1][index])) if compact else \
            (lambda z: torch.tanh(z @ W.T + c[b:b + 1]))
        z_one, info_one = solver(alone, torch.zeros(1, 12, dtype=torch.float64), max_iter=100, tol=1e-6,
                                 compact=compact)
        torch.testing.assert_close(z_one[0], z_all[b], rtol=0, atol=1e-12)
        assert int(info_one["steps"][0]) == int(info_all["steps"][b])


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_compaction_gives_the_same_result_with_less_work(name):
    f, f_idx, _, _ = _problem(B=6)
    calls = {"rows": 0}

    def counted(z, index):
        calls["rows"] += z.shape[0]
        return f_idx(z, index)

    z0 = torch.zeros(6, 12, dtype=torch.float64)
    z, info = get_solver(name)(f, z0, max_iter=100, tol=1e-8)
    zc, infoc = get_solver(name)(counted, z0, max_iter=100, tol=1e-8, compact=0.01)
    torch.testing.assert_close(zc, z, rtol=0, atol=1e-12)
    assert torch.equal(infoc["steps"], info["steps"])
    assert calls["rows"] < 6 * infoc["iterations"]                  # finished rows left the work


def test_check_every_only_delays_the_stop():
    f, _, _, _ = _problem()
    z0 = torch.zeros(6, 12, dtype=torch.float64)
    z1, info1 = anderson(f, z0, max_iter=100, tol=1e-8, check_every=1)
    z5, info5 = anderson(f, z0, max_iter=100, tol=1e-8, check_every=5)
    torch.testing.assert_close(z5, z1, rtol=0, atol=0)
    assert torch.equal(info5["steps"], info1["steps"])
    assert info5["iterations"] % 5 == 0 and 0 <= info5["iterations"] - info1["iterations"] < 5


def test_iteration_cap_returns_best_iterate():
    f, _, _, _ = _problem()
    z, info = anderson(f, torch.zeros(6, 12, dtype=torch.float64), max_iter=4, tol=0.0)
    assert info["iterations"] == 4 and not bool(info["converged"].any())
    abs_res, _ = residuals(z, f(z))
    torch.testing.assert_close(info["abs_residual"], abs_res)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_nan_in_one_sample_is_flagged_not_raised(name):
    f, _, _, _ = _problem(B=4)
    state = {"calls": 0}

    def poisoned(z):
        state["calls"] += 1
        out = f(z)
        if state["calls"] >= 3:                                       # sample 1 turns NaN
            out = out.clone()
            out[1] = float("nan")
        return out

    z, info = get_solver(name)(poisoned, torch.zeros(4, 12, dtype=torch.float64), max_iter=100, tol=1e-8)
    assert info["nan"].tolist() == [False, True, False, False]
    assert info["converged"].tolist() == [True, False, True, True]
    assert bool(torch.isfinite(z).all())                             # best iterate of sample 1 kept
    assert int(info["steps"][1]) <= 2


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_no_fixed_point_ends_without_exception(name):
    def f(z):                                    # sample 0 contracts; sample 1 has no fixed point
        return torch.stack([0.5 * z[0] + 1.0, z[1] + 1.0 + z[1] ** 2])

    z, info = get_solver(name)(f, torch.zeros(2, 3, dtype=torch.float64), max_iter=60, tol=1e-8)
    assert info["converged"].tolist() == [True, False]
    torch.testing.assert_close(z[0], torch.full((3,), 2.0, dtype=torch.float64), rtol=0, atol=1e-6)
    assert bool(torch.isfinite(z).all())                             # best iterate, never NaN


def test_divergence_is_flagged():
    def f(z):                                    # plain iteration: sample 1 grows geometrically
        return torch.stack([0.5 * z[0] + 1.0, 3.0 * z[1] + 1.0])

    z, info = fixed_point_iter(f, torch.zeros(2, 3, dtype=torch.float64), max_iter=60, tol=1e-8,
                               stop_mode="abs", divergence=1e3)
    assert info["converged"].tolist() == [True, False] and info["diverged"].tolist() == [False, True]
    assert info["iterations"] < 60                                   # the diverged sample stopped the work
    torch.testing.assert_close(z[1], torch.zeros(3, dtype=torch.float64))  # its best iterate: the start


def test_nan_start_returns_start_with_flag():
    z, info = anderson(lambda z: z * float("nan"), torch.ones(2, 3), max_iter=5, tol=1e-3)
    assert bool(info["nan"].all()) and torch.equal(z, torch.ones(2, 3))
    assert torch.isinf(info["rel_residual"]).all()


@pytest.mark.parametrize("shape", [(), (5,), (4, 3), (2, 3, 4)])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_any_input_shape(name, shape):
    # Broyden included: the reference crashes on 2-D inputs.
    z, info = get_solver(name)(torch.cos, torch.zeros(shape, dtype=torch.float64), max_iter=100, tol=1e-10)
    assert z.shape == shape
    torch.testing.assert_close(z, torch.full(shape, 0.7390851332151607, dtype=torch.float64), rtol=0, atol=1e-8)
    B = shape[0] if len(shape) > 0 else 1
    assert info["converged"].shape == (B,)


def test_trace_switch():
    f, _, _, _ = _problem()
    z0 = torch.zeros(6, 12, dtype=torch.float64)
    _, info = anderson(f, z0, max_iter=50, tol=1e-8)
    assert "trace_rel" not in info
    _, info = anderson(f, z0, max_iter=50, tol=1e-8, trace=True, compact=False)
    assert len(info["trace_rel"]) == len(info["trace_abs"]) == info["iterations"]
    assert all(t.shape == (6,) for t in info["trace_rel"])
    assert float(info["trace_rel"][0].min()) == pytest.approx(1.0)   # z0 = 0: ||f(0) - 0|| / ||f(0)||
    torch.testing.assert_close(info["trace_rel"][-1], info["rel_residual"])


def test_anderson_damping_and_memory_options():
    f, _, _, _ = _problem()
    z0 = torch.zeros(6, 12, dtype=torch.float64)
    z_ref, _ = fixed_point_iter(f, z0, max_iter=400, tol=1e-12, stop_mode="abs")
    for kw in ({"m": 1}, {"m": 3, "beta": 0.7}, {"m": 8, "lam": 0.0}):
        z, info = anderson(f, z0, max_iter=200, tol=1e-11, stop_mode="abs", **kw)
        assert bool(info["converged"].all()), kw
        torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-9)
    z, info = broyden(f, z0, max_iter=200, tol=1e-11, stop_mode="abs", memory=3)
    assert bool(info["converged"].all())


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="stop_mode must be 'abs' or 'rel', got 'max'"):
        anderson(torch.cos, torch.zeros(2, 2), stop_mode="max")
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        broyden(torch.cos, torch.zeros(2, 2), max_iter=0)
    with pytest.raises(TypeError, match="floating-point"):
        fixed_point_iter(torch.cos, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown DEQ solver 'newton'; known solvers: anderson, broyden"):
        get_solver("newton")


@pytest.mark.parametrize("compact", [False, True])
def test_anderson_best_iterate_in_place_matches_where(monkeypatch, compact):
    """On the CPU Anderson assembles the best iterates in its own dead iterate (rows that did
    not improve copied back in); the result must be bitwise that of the ``where`` path, also
    with a NaN sample and non-monotone residuals, and the caller's z0 must stay untouched."""
    from multizoo_ext.fusions.deq import solvers as deq_solvers

    f, f_idx, _, _ = _problem(B=5, n=10, contraction=1.3)              # not a contraction: residuals jump
    state = {"calls": 0}

    def poisoned(z, index=None):
        state["calls"] += 1
        out = f(z) if index is None else f_idx(z, index)
        if state["calls"] >= 4 and (index is None or bool((index == 2).any())):
            out = out.clone()
            out[2 if index is None else int((index == 2).nonzero())] = float("nan")
        return out

    def run(sync_free):
        orig = deq_solvers._Tracker.__init__

        def init(self, *args, **kwargs):
            orig(self, *args, **kwargs)
            self.sync_free = sync_free

        monkeypatch.setattr(deq_solvers._Tracker, "__init__", init)
        state["calls"] = 0
        z0 = torch.full((5, 10), 0.3, dtype=torch.float64)
        z, info = anderson(poisoned, z0, max_iter=25, tol=1e-12, compact=compact)
        assert bool((z0 == 0.3).all())                                # z0 never written
        monkeypatch.setattr(deq_solvers._Tracker, "__init__", orig)
        return z, info

    z_a, info_a = run(True)
    z_b, info_b = run(False)
    assert bool(info_a["nan"][2]) and bool(torch.isfinite(z_a).all())
    assert torch.equal(z_a, z_b)
    for key in ("steps", "abs_residual", "rel_residual", "converged", "nan", "diverged"):
        assert torch.equal(info_a[key], info_b[key]), key
    # the returned iterate is the best one seen: its residual is the recorded best
    abs_res, _ = residuals(z_a, f(z_a))
    ok = ~info_a["nan"]
    torch.testing.assert_close(info_a["abs_residual"][ok], abs_res[ok])
