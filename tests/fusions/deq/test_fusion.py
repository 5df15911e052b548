"""DEQFusion: the equilibrium, its gradients (implicit vs unrolled vs finite differences),
per-sample independence, several modalities, backward modes, Jacobian penalty, errors."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from multizoo_ext import create_fusion
from multizoo_ext.fusions.deq import DEQ_DEFAULTS, PAPER_LAYER, DEQFusion, anderson, find_deq, residuals

_spec = importlib.util.spec_from_file_location("deq_oracle", Path(__file__).with_name("deq_oracle.py"))
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)


def _inputs(dims, B=4, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g, dtype=dtype).requires_grad_(requires_grad) for d in dims]


#: The layer's two functions: the default, and the published one (residual modality blocks,
#: GroupNorm fused update, ``z_f*`` returned).
FUNCTIONS = {"default": {}, "paper": {k: PAPER_LAYER[k] for k in ("modality_block", "fused_update", "output")}}


def _contractive(m: DEQFusion) -> DEQFusion:
    """Make f_theta strongly contractive (plain iteration converges in ~20 steps), so that
    unrolling to convergence is a valid reference: a small W1 makes GN1's input bias-dominated;
    residual blocks and the GroupNorm update get small last GroupNorm gains, which shrink the
    state; plain blocks get a small random W2 (so the branch reads z_i), the sigmoid update a
    small W_f."""
    with torch.no_grad():
        for blk in m.blocks:
            blk.lin1.weight.mul_(0.1)
            if "gn3" in blk:
                blk.gn3.weight.fill_(0.1)
            else:
                blk.lin2.weight.copy_(0.3 * torch.randn_like(blk.lin2.weight) / m.width ** 0.5)
        if "gn" in m.fusion_block:
            m.fusion_block.gn.weight.fill_(0.1)
        else:
            m.fusion_block.fuse.weight.mul_(0.3)
    return m


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def _rel_err(a, b):
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b)
    den = sum((v ** 2).sum() for v in b.values())
    return float((num / den).sqrt())


@pytest.mark.parametrize("dims", [[5, 7], [5, 7, 3]])
def test_registry_construction_and_shapes(dims):
    fusion = create_fusion("deq", input_dims=dims)
    assert isinstance(fusion, DEQFusion)
    assert fusion.out_dim == fusion.width == 8                      # max(dims) rounded up to num_groups
    xs = _inputs(dims, B=3)
    out = fusion(xs)
    assert out.shape == (3, 8) and bool(torch.isfinite(out).all())
    out.square().sum().backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name


@pytest.mark.parametrize("dims", [[6, 10], [4, 9, 16], [3, 5, 8, 13, 16, 2]])
def test_two_three_and_six_modalities_of_different_widths(dims):
    torch.manual_seed(0)
    fusion = DEQFusion(dims, width=16)
    fused, info = fusion(_inputs(dims, B=5), return_info=True)
    assert fused.shape == (5, 16) and fusion.state_dim == (len(dims) + 1) * 16
    for key in ("steps", "abs_residual", "rel_residual", "converged", "nan", "diverged"):
        assert info[key].shape == (5,), key
    assert fusion.last_info is info
    assert [type(p).__name__ for p in fusion.projections] == ["Identity" if d == 16 else "Linear" for d in dims]
    fused.sum().backward()
    assert fusion.projections[0].weight.grad is not None
    assert fusion.injection_proj.weight.grad.shape == (16, 16 * len(dims))


def _perturbed(dims, width, num_groups, **kw):
    torch.manual_seed(0)
    fusion = DEQFusion(dims, width=width, num_groups=num_groups, **kw).double()
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(0.1 * torch.randn_like(p))                         # non-trivial GN affines, w_i, b
    return fusion


@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("always_project", [False, True])
def test_fast_map_equals_the_module_by_module_oracle(always_project, function):
    fusion = _perturbed([5, 12, 3], 12, 3, always_project=always_project, **FUNCTIONS[function])
    xs = _inputs([5, 12, 3], B=4, dtype=torch.float64)
    z = torch.randn(4, fusion.state_dim, dtype=torch.float64)
    f = fusion.deq_function(xs)
    expected = oracle.naive_step(fusion, z, xs)
    torch.testing.assert_close(f(z), expected, rtol=1e-12, atol=1e-12)
    index = torch.tensor([2, 0])
    torch.testing.assert_close(f(z[index], index), expected[index], rtol=1e-12, atol=1e-12)
    # the stage maps are the same function: stage 0 the modality part, stage 1 the fused part
    # given the updated modality states
    z_m, z_f = z.split([36, 12], 1)
    torch.testing.assert_close(f.stage(0, [])(z_m), expected[:, :36], rtol=1e-12, atol=1e-12)
    stage1 = f.stage(1, [z_m])
    torch.testing.assert_close(stage1(z_f), expected[:, 36:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stage1(z_f[index], index), expected[index, 36:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_fast_map_gradients_equal_the_oracle_gradients(function):
    fusion = _perturbed([5, 12, 3], 12, 3, **FUNCTIONS[function])
    xs = _inputs([5, 12, 3], B=4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(4, fusion.state_dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, fusion.state_dim, dtype=torch.float64)
    wrt = [z, *xs, *fusion.parameters()]
    fast = torch.autograd.grad((fusion.deq_function(xs)(z) * w).sum(), wrt)
    slow = torch.autograd.grad((oracle.naive_step(fusion, z, xs) * w).sum(), wrt)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_state_dict_keys_are_those_of_the_module_by_module_layout():
    """The reference's layer keeps the reference's keys (its checkpoints load); the default
    layer has no GN2 / GN3 in its plain modality blocks and no GroupNorm in its fused update,
    and its injection is a Linear of the concatenation instead of the two scalars."""
    def keys(block_modules, fused_modules):
        return (["projections.0.weight", "projections.0.bias"]
                + [f"blocks.{i}.{m}.{t}" for i in range(2) for m in block_modules for t in ("weight", "bias")]
                + [f"fusion_block.{m}.{t}" for m in fused_modules for t in ("weight", "bias")])
    paper = DEQFusion([5, 8], width=8, **PAPER_LAYER).state_dict()
    assert sorted(paper) == sorted(["weights", "bias"] + keys(("lin1", "lin2", "gn1", "gn2", "gn3"),
                                                              ("gate", "fuse", "gn")))
    assert sorted(DEQFusion([5, 8], width=8).state_dict()) == sorted(
        keys(("lin1", "lin2", "gn1"), ("gate", "fuse")) + ["injection_proj.weight", "injection_proj.bias"])


@pytest.mark.parametrize("contractive", [True, False])
def test_forward_returns_a_fixed_point_within_tolerance(contractive):
    # At random initialisation f_theta need not be contractive and some samples may not reach
    # the tolerance within the cap (they are reported as not converged); every sample reported
    # converged must satisfy it, checked on ||f(z*) - z*|| / ||f(z*)|| directly.
    torch.manual_seed(0)
    fusion = DEQFusion([6, 10], width=16, f_tol=1e-8, f_max_iter=150, output="state").double().eval()
    if contractive:
        _contractive(fusion)
    xs = _inputs([6, 10], B=8, dtype=torch.float64)
    with torch.no_grad():
        fused, info = fusion(xs, return_info=True)
        f = fusion.deq_function(xs)
        z, zinfo = anderson(f, torch.zeros(8, fusion.state_dim, dtype=torch.float64), max_iter=150, tol=1e-8)
        _, rel = residuals(z, f(z))
    conv = zinfo["converged"]
    assert int(conv.sum()) >= (8 if contractive else 4)
    assert float(rel[conv].max()) <= 1e-8
    torch.testing.assert_close(zinfo["rel_residual"][conv], rel[conv], rtol=1e-6, atol=0)
    both = conv & info["converged"]
    assert int(both.sum()) >= (8 if contractive else 4)
    torch.testing.assert_close(fused[both], z[both, -16:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("b_direct", [False, True])   # iterative / exact adjoint solves
def test_implicit_gradients_match_unrolling_to_convergence_float64(b_direct):
    torch.manual_seed(0)
    dims = [5, 7, 3]
    implicit = _contractive(DEQFusion(dims, width=16, f_tol=1e-12, b_tol=1e-12, f_max_iter=100,
                                      b_max_iter=100, stop_mode="abs", b_direct=b_direct).double())
    unrolled = DEQFusion(dims, width=16, backward="unrolled", unroll_steps=60).double()
    unrolled.load_state_dict(implicit.state_dict())
    xs = _inputs(dims, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 16, dtype=torch.float64)

    out_i, info = implicit(xs, return_info=True)
    (out_i - target).square().sum().backward()
    g_i, gx_i = _grads(implicit), [x.grad.clone() for x in xs]
    for x in xs:
        x.grad = None
    out_u, info_u = unrolled(xs, return_info=True)
    (out_u - target).square().sum().backward()
    g_u, gx_u = _grads(unrolled), [x.grad.clone() for x in xs]

    assert bool(info["converged"].all()) and bool(info["backward"]["converged"].all())
    assert [bool(st.get("direct")) for st in info["backward"]["stages"]] == [b_direct] * 2
    assert float(info_u["abs_residual"].max()) < 1e-12                # unrolling did converge
    torch.testing.assert_close(out_i, out_u, rtol=0, atol=1e-10)
    assert _rel_err(g_i, g_u) <= 1e-4
    assert _rel_err(dict(enumerate(gx_i)), dict(enumerate(gx_u))) <= 1e-4


@pytest.mark.parametrize("b_direct", [False, True])
def test_gradcheck_against_finite_differences(b_direct):
    torch.manual_seed(0)
    fusion = _contractive(DEQFusion([3, 2], width=8, num_groups=2, f_tol=1e-13, b_tol=1e-13,
                                    f_max_iter=100, b_max_iter=100, stop_mode="abs", jac_reg=False,
                                    gate_init="default", injection="sum", b_direct=b_direct).double())
    xa, xb = _inputs([3, 2], B=2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fusion([a, b]), (xa, xb), eps=1e-6, atol=1e-7, rtol=1e-5)
    # parameters' gradients through the implicit backward, too
    names = ("fusion_block.gate.bias", "weights")
    params = tuple(dict(fusion.named_parameters())[n].detach().clone().requires_grad_() for n in names)
    xs = [xa.detach(), xb.detach()]
    assert torch.autograd.gradcheck(
        lambda *p: functional_call(fusion, dict(zip(names, p)), (xs,)), params, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_sample_output_does_not_change_when_other_samples_join():
    # Per-sample stopping: a converged sample is frozen at the iterate where it met the
    # tolerance, whatever else is in the batch; on a contraction the trajectory is the same
    # up to the rounding of batched products.
    torch.manual_seed(0)
    fusion = _contractive(DEQFusion([6, 10], width=16, f_tol=1e-8, f_max_iter=150).double().eval())
    xs = _inputs([6, 10], B=8, dtype=torch.float64)
    with torch.no_grad():
        full, info = fusion(xs, return_info=True)
        assert bool(info["converged"].all()) and len(set(info["steps"].tolist())) > 1
        for b in (0, 3, 7):
            alone, info_b = fusion([x[b:b + 1] for x in xs], return_info=True)
            torch.testing.assert_close(alone[0], full[b], rtol=0, atol=1e-12)
            assert int(info_b["steps"][0]) == int(info["steps"][b])
        part, _ = fusion([x[[6, 2, 1]] for x in xs], return_info=True)
    torch.testing.assert_close(part, full[[6, 2, 1]], rtol=0, atol=1e-12)


def test_no_coupling_between_samples_at_random_init():
    # At random init f_theta is not contractive and a sample may wander chaotically before it
    # settles, so rounding differences between batch shapes can send it to another iterate or
    # even another fixed point. With the batch shape fixed (no compaction), rows see identical
    # arithmetic, so a sample's result must not depend on its companions at all.
    torch.manual_seed(0)
    fusion = DEQFusion([6, 10], width=16, f_max_iter=80, compact=False).double().eval()
    xs = _inputs([6, 10], B=8, dtype=torch.float64, seed=0)
    others = _inputs([6, 10], B=8, dtype=torch.float64, seed=1)
    mixed = [torch.cat([x[:3], o[3:]]) for x, o in zip(xs, others)]
    with torch.no_grad():
        a, info_a = fusion(xs, return_info=True)
        b, info_b = fusion(mixed, return_info=True)
    torch.testing.assert_close(b[:3], a[:3], rtol=0, atol=1e-12)
    assert torch.equal(info_b["steps"][:3], info_a["steps"][:3])


def test_nan_input_raises_at_the_boundary():
    fusion = DEQFusion([4, 6], width=8)
    xs = _inputs([4, 6])
    xs[1][2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"modality \[1\] contain NaN/Inf"):
        fusion(xs)


def test_bad_construction_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="width 10 is not divisible by num_groups 4"):
        DEQFusion([5, 7], width=10, num_groups=4)
    with pytest.raises(ValueError, match="at least 2 widths"):
        DEQFusion([5])
    with pytest.raises(ValueError, match="unknown DEQ solver 'newton'"):
        DEQFusion([5, 7], solver="newton")
    with pytest.raises(ValueError, match="unknown DEQ backward mode 'magic'; known modes: implicit, phantom"):
        DEQFusion([5, 7], backward="magic")
    fusion = DEQFusion([5, 7])
    with pytest.raises(ValueError, match=r"built for modality widths \[5, 7\] but got widths \[5, 6\]"):
        fusion(_inputs([5, 6]))
    with pytest.raises(ValueError, match="built for 2 modalities but got 3"):
        fusion(_inputs([5, 7, 3]))


def test_two_forwards_then_one_backward_equals_separate_backwards():
    torch.manual_seed(0)
    fusion = DEQFusion([5, 7], width=16, b_tol=1e-6, b_max_iter=100, jac_reg=False).double()
    x1, x2 = _inputs([5, 7], dtype=torch.float64, seed=1), _inputs([5, 7], dtype=torch.float64, seed=2)
    (fusion(x1).square().sum() + fusion(x2).sin().sum()).backward()
    together = _grads(fusion)
    fusion.zero_grad()
    fusion(x1).square().sum().backward()
    fusion(x2).sin().sum().backward()                                 # grads accumulate
    torch.testing.assert_close(_grads(fusion), together, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unrolled"])
def test_every_backward_mode_gives_gradients(backward):
    torch.manual_seed(0)
    fusion = DEQFusion([5, 7, 3], width=16, backward=backward, f_max_iter=20, b_max_iter=20)
    xs = _inputs([5, 7, 3], requires_grad=True)
    out, info = fusion(xs, return_info=True)
    out.square().sum().backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert all(x.grad is not None and float(x.grad.abs().sum()) > 0 for x in xs)
    assert ("backward" in info) == (backward == "implicit")


def test_phantom_gradient_approaches_implicit_on_a_contraction():
    torch.manual_seed(0)
    base = _contractive(DEQFusion([5, 7], width=16, f_tol=1e-10, b_tol=1e-10, stop_mode="abs").double())
    xs = _inputs([5, 7], dtype=torch.float64)
    base(xs).square().sum().backward()
    g_impl = _grads(base)
    phantom = DEQFusion([5, 7], width=16, backward="phantom", phantom_steps=12, f_tol=1e-10,
                        stop_mode="abs").double()
    phantom.load_state_dict(base.state_dict())
    phantom(xs).square().sum().backward()
    assert _rel_err(_grads(phantom), g_impl) < 1e-3


@pytest.mark.parametrize("solver", ["broyden", "fixed_point_iter"])
def test_other_solvers_train(solver):
    torch.manual_seed(0)
    fusion = _contractive(DEQFusion([5, 7], width=16, solver=solver, f_tol=1e-6, b_tol=1e-6))
    out, info = fusion(_inputs([5, 7]), return_info=True)
    out.sum().backward()
    assert bool(info["converged"].all()) and bool(info["backward"]["converged"].all())


def test_output_is_the_fused_equilibrium_plus_the_injection_or_the_equilibrium_alone():
    torch.manual_seed(0)
    fusion = DEQFusion([6, 10], width=16, f_tol=1e-10, f_max_iter=100).double().eval()
    assert fusion.output == "state+injection"
    xs = _inputs([6, 10], B=5, dtype=torch.float64)
    with torch.no_grad():
        fused = fusion(xs)
        fusion.output = "state"
        state = fusion(xs)
        x_f = oracle.injections(fusion, xs)[1]
    torch.testing.assert_close(fused, state + x_f, rtol=1e-12, atol=1e-12)
    z = torch.cat([fusion.deq_function(xs).stage(0, [])(torch.zeros(5, 32, dtype=torch.float64)), state], 1)
    with torch.no_grad():   # state is the fused part of a fixed point of f
        torch.testing.assert_close(fusion.deq_function(xs)(z)[:, 32:], state, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="output must be 'state' or 'state\\+injection', got 'sum'"):
        DEQFusion([6, 10], output="sum")
    with pytest.raises(ValueError, match="modality_block must be 'residual' or 'plain', got 'x'"):
        DEQFusion([6, 10], modality_block="x")
    with pytest.raises(ValueError, match="fused_update must be 'groupnorm' or 'sigmoid', got 'x'"):
        DEQFusion([6, 10], fused_update="x")


def test_jacobian_penalty_is_positive_and_trains():
    torch.manual_seed(0)
    fusion = DEQFusion([5, 7], width=16, jac_reg=True, residual_init="default")   # (W2 = 0: the blocks' J is 0)
    out = fusion(_inputs([5, 7]))
    jac = fusion.jac_loss
    assert jac is not None and jac.dim() == 0 and float(jac.detach()) > 0 and jac.requires_grad
    assert float(fusion.last_info["jac_loss"]) == pytest.approx(float(jac.detach()))
    (out.sum() * 0 + jac).backward()
    grads = [p.grad for p in fusion.blocks.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    fusion.eval()
    with torch.no_grad():
        fusion(_inputs([5, 7]))
    assert fusion.jac_loss is None and fusion.last_info["jac_loss"] is None


def test_defaults_live_in_one_place_and_copies_drop_state():
    fusion = DEQFusion([5, 7])
    assert fusion._solve.keywords["max_iter"] == DEQ_DEFAULTS.f_max_iter == 55
    assert fusion._grad.backward_solve.keywords["max_iter"] == DEQ_DEFAULTS.b_max_iter == 56
    fusion(_inputs([5, 7]))
    clone = copy.deepcopy(fusion)
    assert clone.last_info is None and clone.jac_loss is None
    wrapper = torch.nn.Sequential(torch.nn.Identity(), fusion)
    assert find_deq(wrapper) is fusion and find_deq(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("dims", [[5, 7], [3, 5, 8, 13, 16, 2]])
def test_deq_fusion_staged_and_joint_agree_in_value_and_gradient(dims):
    # staged forward and staged backward against the joint forward and joint backward
    torch.manual_seed(0)
    kw = dict(width=16, f_tol=1e-12, b_tol=1e-12, f_max_iter=150, b_max_iter=150, stop_mode="abs", jac_reg=True)
    staged = _contractive(DEQFusion(dims, staged=True, staged_backward=True, **kw).double())
    joint = DEQFusion(dims, staged=False, staged_backward=False, **kw).double()
    joint.load_state_dict(staged.state_dict())
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(6, d, generator=g, dtype=torch.float64) for d in dims]
    results = []
    for m in (staged, joint):
        xr = [x.clone().requires_grad_() for x in xs]
        torch.manual_seed(2)                                          # same Hutchinson vectors
        out, info = m(xr, return_info=True)
        (out.sin().sum() + m.jac_loss).backward()
        results.append((out.detach(), [p.grad.clone() for p in m.parameters()], [x.grad for x in xr], info))
    (o_s, g_s, gx_s, i_s), (o_j, g_j, gx_j, i_j) = results
    assert bool(i_s["converged"].all()) and bool(i_j["converged"].all())
    assert len(i_s["stages"]) == 2 and "stages" not in i_j and "stages" in i_s["backward"]
    assert "stages" not in i_j["backward"]
    torch.testing.assert_close(o_s, o_j, rtol=0, atol=1e-10)
    for a, b in zip(g_s + gx_s, g_j + gx_j):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    # the joint residual the staged solve reports is the joint map's residual at z*
    f = staged.deq_function(xs)
    assert f.stage_sizes == (16 * len(dims), 16)
    with torch.no_grad():
        z, info = staged._solve_fixed_point(f, torch.zeros(6, staged.state_dim, dtype=torch.float64))
        abs_res, rel_res = residuals(z, f(z))
    torch.testing.assert_close(info["abs_residual"], abs_res, rtol=1e-6, atol=1e-14)
    torch.testing.assert_close(info["rel_residual"], rel_res, rtol=1e-6, atol=1e-14)
    assert float(abs_res.max()) <= 1e-12


@pytest.mark.parametrize("staged_backward", [False, True])
def test_one_graphed_evaluation_of_f_per_training_step(monkeypatch, staged_backward):
    """The implicit mode evaluates f at z* with a graph once per step: the parameters, the
    Jacobian penalty and the (staged or joint) adjoint solve all use that one graph."""
    from multizoo_ext.fusions.deq import fusion as deq_module

    calls = []
    orig = deq_module._FusionMap.modalities

    def counting(self, z_m, index=None):
        calls.append(torch.is_grad_enabled())
        return orig(self, z_m, index)

    monkeypatch.setattr(deq_module._FusionMap, "modalities", counting)
    torch.manual_seed(0)
    fusion = DEQFusion([5, 7], width=16, jac_reg=True, compact=False, staged_backward=staged_backward)
    out = fusion(_inputs([5, 7]))
    (out.sum() + fusion.jac_loss).backward()
    assert sum(calls) == 1 and len(calls) > 2                        # the solves ran without a graph
    assert len(fusion.last_info["backward"].get("stages", [])) == (2 if staged_backward else 0)


@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("residual_init", ["zero", "default"])
def test_closed_form_stage_jacobians_equal_autograd(residual_init, function):
    torch.manual_seed(0)
    dims, d, B = [6, 16, 5], 16, 4
    fusion = DEQFusion(dims, width=d, gate_init="default", residual_init=residual_init, **FUNCTIONS[function]).double()
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(0.3 * torch.randn_like(p))
    f = fusion.deq_function(_inputs(dims, B=B, dtype=torch.float64))
    z_m, z_f = torch.randn(B, 3 * d, dtype=torch.float64), torch.randn(B, d, dtype=torch.float64)
    for k, z, stage in ((0, z_m, f.stage(0, [])), (1, z_f, f.stage(1, [z_m]))):
        full = torch.autograd.functional.jacobian(stage, z)                   # (B, n, B, n)
        per_sample = torch.stack([full[b, :, b, :] for b in range(B)])        # (B, n, n)
        blocks = stage.jacobian(z)                                            # (B, nb, s, s)
        nb, s = blocks.shape[1], blocks.shape[2]
        dense = torch.zeros_like(per_sample)
        for i in range(nb):
            dense[:, i * s:(i + 1) * s, i * s:(i + 1) * s] = blocks[:, i]
        assert (nb, s) == ((3, d) if k == 0 else (1, d))
        torch.testing.assert_close(dense, per_sample, rtol=1e-10, atol=1e-12)   # off-diagonal blocks are 0


def test_direct_adjoint_solve_of_a_singular_system_falls_back_to_the_rhs():
    from multizoo_ext.fusions.deq.backward import _solve_adjoint_direct

    jac = torch.stack([torch.eye(2), 0.5 * torch.eye(2)]).unsqueeze(1)       # (2, 1, 2, 2): I - J singular for sample 0
    rhs = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y, info = _solve_adjoint_direct(jac, rhs, 1e-6, "abs")
    assert info["nan"].tolist() == [True, False] and info["converged"].tolist() == [False, True]
    torch.testing.assert_close(y, torch.tensor([[1.0, 2.0], [6.0, 8.0]]))    # rhs; rhs / (1 - 0.5)


def test_default_stages_both_solves_with_the_jacobian_free_fallback():
    fusion = DEQFusion([5, 7], width=8)
    out, info = fusion([torch.randn(3, 5), torch.randn(3, 7)], return_info=True)
    out.sum().backward()
    assert fusion.staged and fusion.staged_backward and fusion._grad.implicit_max_residual == 1e-2
    assert len(info["stages"]) == 2 and len(info["backward"]["stages"]) == 2
    assert torch.equal(info["backward"]["implicit"], info["rel_residual"] <= 1e-2)


@pytest.mark.parametrize("staged_backward", [False, True])
def test_implicit_max_residual_falls_back_to_the_jacobian_free_gradient(staged_backward):
    # Samples whose forward residual is above the limit get y = g: the gradient of one
    # application of f at the returned iterate, i.e. the phantom gradient with one step.
    torch.manual_seed(0)
    dims = [5, 7]
    # the reference's initialisation: some samples stay far from the fixed point
    kw = dict(width=16, f_tol=1e-10, f_max_iter=100, b_tol=1e-10, b_max_iter=100, gate_init="default",
              injection="sum", residual_init="default")
    xs = _inputs(dims, B=5, dtype=torch.float64)

    def grads(**extra):
        m = DEQFusion(dims, **kw, **extra).double()
        m.load_state_dict(base.state_dict())
        xr = [x.clone().requires_grad_() for x in xs]
        out, info = m(xr, return_info=True)
        out.sin().sum().backward()
        return torch.cat([x.grad for x in xr], 1), _grads(m), info

    base = _contractive(DEQFusion(dims, **kw).double())
    implicit = grads(staged_backward=staged_backward)
    everywhere = grads(staged_backward=staged_backward, implicit_max_residual=1e30)
    jfb = grads(backward="phantom", phantom_steps=1)
    nowhere = grads(staged_backward=staged_backward, implicit_max_residual=1e-300)
    torch.testing.assert_close(everywhere[0], implicit[0], rtol=0, atol=0)
    torch.testing.assert_close(nowhere[0], jfb[0], rtol=1e-10, atol=1e-12)
    assert _rel_err(nowhere[1], jfb[1]) < 1e-10 and _rel_err(nowhere[1], implicit[1]) > 1e-6   # (a contraction: close)
    assert bool(everywhere[2]["backward"]["implicit"].all())
    assert not bool(nowhere[2]["backward"]["implicit"].any())
    with pytest.raises(ValueError, match="implicit_max_residual must be positive or None, got -1"):
        DEQFusion(dims, implicit_max_residual=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = _contractive(DEQFusion([5, 7], width=16, f_tol=1e-6, b_tol=1e-6, jac_reg=True))
    gpu = copy.deepcopy(cpu).to("cuda")
    xs = _inputs([5, 7])
    cpu(xs).square().sum().backward()
    out = gpu([x.to("cuda") for x in xs])
    assert out.device.type == "cuda" and gpu.last_info["steps"].device.type == "cuda"
    out.square().sum().backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_solvers_by_name_or_callable(monkeypatch):
    from multizoo_ext.fusions.deq import SOLVERS, get_solver, register_solver

    calls = []

    def counting(f, z0, *args, **kwargs):
        calls.append(z0.shape)
        return anderson(f, z0, *args, **kwargs)

    monkeypatch.setitem(SOLVERS, "counting_test", None)           # restored after the test
    assert register_solver("Counting_Test")(counting) is counting
    assert get_solver("counting_test") is counting and get_solver(counting) is counting
    xs = _inputs([5, 7])
    torch.manual_seed(0)
    by_name = DEQFusion([5, 7], width=8, solver="counting_test")
    out_name = by_name(xs)
    n_named = len(calls)
    torch.manual_seed(0)
    by_callable = DEQFusion([5, 7], width=8, solver=counting, b_solver="anderson")
    out_callable = by_callable(xs)
    assert n_named == 2 and len(calls) == 4                       # one run per stage
    assert torch.equal(out_name, out_callable) and by_callable.solver_name == "counting"
    out_callable.sum().backward()                                 # backward solver by name
    with pytest.raises(ValueError, match="unknown DEQ solver 'newton'; known solvers: anderson, broyden"):
        DEQFusion([5, 7], solver="newton")
    with pytest.raises(TypeError, match="name or a callable, got int"):
        DEQFusion([5, 7], b_solver=3)


def test_inputs_unlike_the_parameters_are_refused_clearly():
    fusion = DEQFusion([5, 7], width=8)
    with pytest.raises(TypeError, match="expected float32 inputs like the fusion's parameters, got float64, "
                                        "float64; call fusion.double\\(\\)"):
        fusion(_inputs([5, 7], dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN/Inf"):
        fusion([torch.full((2, 5), float("nan")), torch.zeros(2, 7)])
    with pytest.raises(ValueError, match="modality 1 is on meta but the fusion's parameters are on cpu"):
        fusion([torch.zeros(2, 5), torch.zeros(2, 7, device="meta")])


def test_non_convergence_is_counted_and_logged_at_most_once_per_window(caplog):
    torch.manual_seed(0)
    fusion = DEQFusion([5, 7], width=8, f_max_iter=2, f_tol=1e-12, warn_every=3).eval()
    with caplog.at_level("WARNING", logger="multizoo_ext.fusions.deq.fusion"), torch.no_grad():
        for _ in range(7):
            fusion(_inputs([5, 7], B=4))
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and all("0 of 12 samples (0.0%) in the last 3 forward(s)" in m for m in logged)
    worst = float(fusion.last_info["rel_residual"].max())
    stats = fusion.convergence_stats()
    assert stats["forwards"] == 7 and stats["samples"] == 28 and stats["converged"] == 0
    assert stats["fraction_converged"] == 0.0 and stats["max_residual"] >= worst > 1e-12
    assert fusion.convergence_stats()["samples"] == 0                # reset
    easy = _contractive(DEQFusion([5, 7], width=8, warn_every=1, f_tol=1e-3))
    caplog.clear()
    with caplog.at_level("WARNING", logger="multizoo_ext.fusions.deq.fusion"), torch.no_grad():
        easy(_inputs([5, 7], B=4))
    assert caplog.records == [] and easy.convergence_stats(reset=False)["fraction_converged"] == 1.0
    assert copy.deepcopy(easy).convergence_stats()["forwards"] == 0


def test_a_few_stragglers_are_logged_at_info_not_warning(caplog):
    # windows of one forward each (the counts are set by hand, then one empty forward's
    # record closes the window): 3 of 4 converged (75 % < 95 %) is a WARNING, 39 of 40 INFO
    fusion = DEQFusion([5, 7], width=8, warn_every=1)
    with caplog.at_level("INFO", logger="multizoo_ext.fusions.deq.fusion"), torch.no_grad():
        fusion._window.add(torch.tensor(3), torch.tensor(0.5), 4)     # a window of 4 with 1 straggler
        fusion._record_convergence({"converged": torch.ones(0, dtype=torch.bool),
                                    "rel_residual": torch.zeros(1)})
        fusion._window.add(torch.tensor(39), torch.tensor(0.5), 40)   # 1 straggler in 40
        fusion._record_convergence({"converged": torch.ones(0, dtype=torch.bool),
                                    "rel_residual": torch.zeros(1)})
    levels = [(r.levelname, r.getMessage().split(" in the last")[0]) for r in caplog.records]
    assert levels == [("WARNING", "DEQFusion: 3 of 4 samples (75.0%)"),
                      ("INFO", "DEQFusion: 39 of 40 samples (97.5%)")]


def test_take_jacobian_penalty_checks_the_batch_and_is_read_once():
    torch.manual_seed(0)
    fusion = DEQFusion([5, 7], width=8)
    out = fusion(_inputs([5, 7], B=4))
    with pytest.raises(ValueError, match="a batch of 4 samples, but the objective scores 2"):
        fusion.take_jacobian_penalty(2)
    jac = fusion.take_jacobian_penalty(4)
    assert jac is fusion.jac_loss and jac.requires_grad
    with pytest.raises(ValueError, match="already taken"):
        fusion.take_jacobian_penalty(4)
    (out.sum() + jac).backward()
    with torch.no_grad():
        fusion(_inputs([5, 7], B=4))
    with pytest.raises(ValueError, match="computed no Jacobian penalty in its last forward"):
        fusion.take_jacobian_penalty(4)
