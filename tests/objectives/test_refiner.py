"""RefinerLoss: each kind against a hand computation or small loop, gradients, edge cases
and error messages."""
import math

import pytest
import torch

from multizoo_ext.objectives.refiner import (
    DEFAULT_REFINER_WEIGHT,
    REFINER_KINDS,
    RefinerLoss,
    refiner_contrastive,
    refiner_ms,
)



def cos(a, b):
    return (a @ b) / (a.norm() * b.norm())


def pair(batch, dim, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    recon = torch.randn(batch, dim, generator=gen, dtype=dtype)
    target = torch.randn(batch, dim, generator=gen, dtype=dtype)
    return recon, target


def loop_mse(r, t):
    return sum(((r[b, k] - t[b, k]) ** 2 for b in range(r.shape[0]) for k in range(r.shape[1]))) / r.numel()


def loop_cosine(r, t):
    return 1 - sum(cos(r[b], t[b]) for b in range(r.shape[0])) / r.shape[0]


def loop_contrastive(r, t, threshold=0.1):
    batch = r.shape[0]
    total = 0.0
    for b in range(batch):
        own = cos(r[b], t[b])
        hardest = max((cos(r[b], t[c]) for c in range(batch) if c != b), key=lambda v: v.item())
        total = total + torch.clamp(threshold - (own - hardest), min=0)
    return total / batch


def loop_ms(r, t, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, mining=True):
    """Per-anchor loop: reconstruction b, its own target the positive, the others negatives."""
    batch = r.shape[0]
    total = r.sum() * 0
    for b in range(batch):
        own = cos(r[b], t[b])
        negs = [cos(r[b], t[c]) for c in range(batch) if c != b]
        pos = [own]
        if mining:
            max_neg = max((n.item() for n in negs), default=-math.inf)
            negs = [n for n in negs if n.item() + epsilon > own.item()]
            pos = [own] if own.item() - epsilon < max_neg else []
        if pos:
            total = total + torch.log(1 + sum(torch.exp(-alpha * (p - base)) for p in pos)) / alpha
        if negs:
            total = total + torch.log(1 + sum(torch.exp(beta * (n - base)) for n in negs)) / beta
    return total / batch


LOOPS = {"mse": loop_mse, "cosine": loop_cosine, "contrastive": loop_contrastive, "ms": loop_ms}


def values_and_grads(fn, r, t):
    r = r.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    out = fn(r, t)
    gr, gt = torch.autograd.grad(out, (r, t))
    return out.detach(), gr, gt


@pytest.mark.parametrize("kind", REFINER_KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_each_kind_matches_loop(kind, seed):
    r, t = pair(batch=[6, 9, 12][seed], dim=5, seed=seed)
    if kind in ("contrastive", "ms"):
        t = t + 0.8 * r  # make some samples already well ranked, others not
    ours = values_and_grads(lambda a, b: RefinerLoss(kind, weights=[1.0])([a], [b]), r, t)
    ref = values_and_grads(LOOPS[kind], r, t)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want)


def test_ms_mining_prunes_and_matches_loop_without_mining():
    r, t = pair(batch=10, dim=4, seed=4)
    t = t + 1.5 * r
    mined = refiner_ms(r, t)
    full = refiner_ms(r, t, mining=False)
    assert not torch.isclose(mined, full)
    torch.testing.assert_close(full, loop_ms(r, t, mining=False))
    torch.testing.assert_close(refiner_ms(r, t, alpha=3.0, beta=20.0, base=0.3, epsilon=0.2),
                               loop_ms(r, t, alpha=3.0, beta=20.0, base=0.3, epsilon=0.2))


def test_contrastive_zero_when_already_ranked():
    eye = torch.eye(4, dtype=torch.float64)
    recon = (2.0 * eye).requires_grad_(True)  # cos(r_b, t_b) = 1, cos(r_b, t_c) = 0
    loss = refiner_contrastive(recon, eye, threshold=0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(recon.grad, torch.zeros_like(recon))
    # margin 1 < threshold 1.5: every sample pays 0.5
    torch.testing.assert_close(refiner_contrastive(2.0 * eye, eye, threshold=1.5), torch.tensor(0.5, dtype=torch.float64))


def test_weighted_sum_and_last_terms():
    r1, t1 = pair(5, 7, seed=0)
    r2, t2 = pair(5, 3, seed=1)
    for kind in REFINER_KINDS:
        loss_fn = RefinerLoss(kind, weights=[0.1, 0.3])
        total = loss_fn([r1, r2], [t1, t2])
        l1, l2 = LOOPS[kind](r1, t1), LOOPS[kind](r2, t2)
        torch.testing.assert_close(total, 0.1 * l1 + 0.3 * l2)
        assert len(loss_fn.last_terms) == 2
        torch.testing.assert_close(loss_fn.last_terms[0], l1)
        torch.testing.assert_close(loss_fn.last_terms[1], l2)
        assert not any(term.requires_grad for term in loss_fn.last_terms)


def test_default_and_scalar_weights():
    rs = [pair(4, d, seed=d)[0] for d in (2, 3, 5)]
    ts = [pair(4, d, seed=d)[1] for d in (2, 3, 5)]
    per = [loop_mse(r, t) for r, t in zip(rs, ts)]
    default = RefinerLoss("mse")
    torch.testing.assert_close(default(rs, ts), DEFAULT_REFINER_WEIGHT * sum(per))
    torch.testing.assert_close(default(rs[:1], ts[:1]), DEFAULT_REFINER_WEIGHT * per[0])  # any count
    torch.testing.assert_close(RefinerLoss("mse", weights=2.0)(rs, ts), 2.0 * sum(per))
    assert "weights=0.1 each" in repr(default)
    assert "threshold=0.2" in repr(RefinerLoss("contrastive", threshold=0.2))


def test_detached_target_gets_no_gradient():
    r, t = pair(6, 4, seed=2)
    r.requires_grad_(True)
    t.requires_grad_(True)
    RefinerLoss("ms")([r], [t.detach()]).backward()
    assert r.grad is not None and t.grad is None


@pytest.mark.parametrize("kind", REFINER_KINDS)
def test_gradcheck(kind):
    r, t = pair(4, 3, seed=7)
    t = t + r
    r.requires_grad_(True)
    t.requires_grad_(True)
    loss_fn = RefinerLoss(kind, weights=[0.7])
    assert torch.autograd.gradcheck(lambda a, b: loss_fn([a], [b]), (r, t))


@pytest.mark.parametrize("kind", ["contrastive", "ms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_of_one_is_a_connected_zero(kind, dtype):
    r = torch.randn(1, 5, dtype=dtype, requires_grad=True)
    t = torch.randn(1, 5, dtype=dtype, requires_grad=True)
    loss = RefinerLoss(kind)([r], [t])
    assert loss.item() == 0.0 and loss.dtype == dtype and loss.requires_grad
    loss.backward()
    assert torch.equal(r.grad, torch.zeros_like(r)) and torch.equal(t.grad, torch.zeros_like(t))


def test_ms_batch_of_one_without_mining_keeps_the_positive():
    r, t = pair(1, 3, seed=3)
    expected = torch.log(1 + torch.exp(-2.0 * (cos(r[0], t[0]) - 0.5))) / 2.0
    torch.testing.assert_close(refiner_ms(r, t, mining=False), expected)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="l1"), r"kind must be one of \['mse', 'cosine', 'contrastive', 'ms'\], got 'l1'"),
        (dict(weights=[]), "weights must be None, a float or a non-empty list"),
        (dict(weights="0.1"), "weights must be None, a float or a non-empty list"),
        (dict(weights=[0.1, -1.0]), "weights must be finite and >= 0"),
        (dict(weights=float("nan")), "weights must be finite and >= 0"),
        (dict(threshold=float("nan")), "threshold must be a finite number"),
        (dict(ms_beta=0), "ms_beta must be a positive finite number"),
        (dict(ms_epsilon=None), "ms_epsilon must be a finite number"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefinerLoss(**kwargs)


def test_forward_errors():
    r, t = pair(4, 3, seed=0)
    with pytest.raises(ValueError, match="was built for 2 modalities but got 1"):
        RefinerLoss("mse", weights=[0.1, 0.1])([r], [t])
    with pytest.raises(ValueError, match="got 2 reconstructions but 1 targets"):
        RefinerLoss("mse")([r, r], [t])
    with pytest.raises(ValueError, match=r"modality 0 needs reconstruction and target of the same shape \(B, d\), got \(4, 3\) and \(4, 2\)"):
        RefinerLoss("cosine")([r], [t[:, :2]])
    with pytest.raises(ValueError, match=r"same shape \(B, d\), got \(4, 3, 1\)"):
        RefinerLoss("cosine")([r[..., None]], [t[..., None]])
    with pytest.raises(TypeError, match="expects a list of tensors"):
        RefinerLoss("mse")(r, [t])
    with pytest.raises(TypeError, match="floating-point tensors"):
        RefinerLoss("mse")([r.long()], [t.long()])
    with pytest.raises(ValueError, match="must share the batch dimension"):
        RefinerLoss("mse")([r, r[:2]], [t, t[:2]])
