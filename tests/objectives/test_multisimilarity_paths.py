"""White-box tests of MultiSimilarityLoss's internal eager code paths: the combined (one
``exp`` per pair) and two-sided logits, the logit floor, the shifted path without mining, the
saved softmax weights, and the half types. The native CPU kernels are switched off here (their
own tests: test_multisimilarity_native.py)."""
import pytest
import torch

from multizoo_ext import native

from multizoo_ext.objectives.multisimilarity import (
    DEFAULT_ALPHA,
    DEFAULT_BASE,
    DEFAULT_BETA,
    DEFAULT_EPSILON,
    MultiSimilarityLoss,
    _config,
    _label_terms,
    _MeanMultiSimilarity,
    _share_matrix,
    multi_similarity_loss,
)

from .test_multisimilarity import grad_of, pml, reference_loop

HP = dict(alpha=DEFAULT_ALPHA, beta=DEFAULT_BETA, base=DEFAULT_BASE, epsilon=DEFAULT_EPSILON)


@pytest.fixture(autouse=True)
def eager_only():
    with native.disabled():
        yield


def _batch(kind, batch=40, dim=12, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    if kind == "single":
        return emb, torch.randint(0, 5, (batch,), generator=gen)
    labels = (torch.rand(batch, 7, generator=gen) < 0.25).long()
    labels[0] = 0  # a sample without any label
    return emb, labels


def _loss_with(emb, labels, combine, mining, hp=HP):
    """The mean loss through the combined or the two-sided logits path."""
    batch = emb.shape[0]
    cfg = _config(hp["alpha"], hp["beta"], hp["base"], hp["epsilon"], batch, batch, batch, emb.dtype,
                  emb.device, True, combine)
    assert cfg.combined == combine
    terms = _label_terms(_share_matrix(labels, emb.dtype, "test"), cfg)
    return _MeanMultiSimilarity.apply(emb, terms, cfg, mining, "test")


@pytest.mark.parametrize("kind", ["single", "multi"])
@pytest.mark.parametrize("mining", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_combined_logits_equal_two_sided(kind, mining, dtype):
    # The defaults take the combined path (one exp per pair, per-entry logit coefficients),
    # whose logits are bitwise those of the two-sided path (both sides' logits everywhere).
    for seed in range(3):
        emb, labels = _batch(kind, seed=seed, dtype=dtype)
        one, g_one = grad_of(lambda e: _loss_with(e, labels, True, mining), emb)
        two, g_two = grad_of(lambda e: _loss_with(e, labels, False, mining), emb)
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(one, two, **tol)
        torch.testing.assert_close(g_one, g_two, **tol)
        # and the public entry point takes the combined path with the defaults
        torch.testing.assert_close(multi_similarity_loss(emb, labels, mining=mining), one, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_inexact_coefficients_fall_back_to_two_sided(kind):
    # base = 0.3: the per-entry coefficient d = s (alpha base + beta base) - beta base is not
    # exact, so the combined path is not taken; the loss still equals the reference loop.
    hp = dict(HP, base=0.3, beta=40.0)
    cfg = _config(hp["alpha"], hp["beta"], hp["base"], hp["epsilon"], 8, 8, 8, torch.float64,
                  torch.device("cpu"), True, True)
    assert not cfg.combined
    emb, labels = _batch(kind, batch=24, seed=4)
    ours, g_ours = grad_of(lambda e: multi_similarity_loss(e, labels, **hp), emb)
    ref, g_ref = grad_of(lambda e: reference_loop(e, labels, **hp), emb)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("mining", [True, False])
def test_logit_floor_matches_float64(mining):
    # beta = 100: negative logits go down to -150, below float32's normal range; they are
    # clamped (white-box) and the loss stays equal to float64 and to PML.
    hp = dict(HP, beta=100.0)
    cfg = _config(hp["alpha"], hp["beta"], hp["base"], hp["epsilon"], 32, 32, 32, torch.float32,
                  torch.device("cpu"), True, True)
    assert cfg.floor is not None and not cfg.shifted
    emb, labels = _batch("single", batch=32, seed=2)
    emb[1] = -emb[0]  # a similarity of -1: the lowest logit
    l64, g64 = grad_of(lambda e: multi_similarity_loss(e, labels, mining=mining, **hp), emb)
    l32, g32 = grad_of(lambda e: multi_similarity_loss(e, labels, mining=mining, **hp), emb.float())
    torch.testing.assert_close(l32.double(), l64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(g32.double(), g64, atol=2e-5, rtol=1e-4)
    e = emb.clone().requires_grad_(True)
    theirs, _ = pml(e, labels, **hp, mining=mining)
    (g_theirs,) = torch.autograd.grad(theirs, e)
    torch.testing.assert_close(l64, theirs.detach(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(g64, g_theirs, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_shifted_path_without_mining(kind):
    # alpha = 30, beta = 200 shift float32 (see test_large_scales_take_the_shifted_path);
    # without mining every pair of the masks counts.
    hp = dict(HP, alpha=30.0, beta=200.0)
    emb, labels = _batch(kind, batch=20, seed=3)
    l64, g64 = grad_of(lambda e: multi_similarity_loss(e, labels, mining=False, **hp), emb)
    ref, g_ref = grad_of(lambda e: reference_loop(e, labels, **hp, mining=False), emb)
    torch.testing.assert_close(l64, ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(g64, g_ref, atol=1e-9, rtol=1e-9)
    l32, g32 = grad_of(lambda e: multi_similarity_loss(e, labels, mining=False, **hp), emb.float())
    assert torch.isfinite(l32) and torch.isfinite(g32).all()
    torch.testing.assert_close(l32.double(), l64, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g32.double(), g64, atol=1e-3, rtol=1e-4)


def test_backward_twice_and_without_grad():
    # The softmax weights are saved by the forward; a second backward (retain_graph) must
    # see them unchanged, and a forward without grad gives the same value.
    emb, labels = _batch("multi", seed=5)
    leaf = emb.clone().requires_grad_(True)
    loss = MultiSimilarityLoss()(leaf, labels)
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (second,) = torch.autograd.grad(loss, leaf)
    assert torch.equal(first, second)
    with torch.no_grad():
        torch.testing.assert_close(MultiSimilarityLoss()(emb, labels), loss.detach(), rtol=0, atol=0)
    # a non-unit upstream gradient scales the gradient
    (scaled,) = torch.autograd.grad(MultiSimilarityLoss()(leaf, labels) * 3.0, leaf)
    torch.testing.assert_close(scaled, 3.0 * first)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["single", "multi"])
def test_half_types_close_to_float64(dtype, kind):
    emb, labels = _batch(kind, batch=24, seed=6)
    l64, g64 = grad_of(lambda e: multi_similarity_loss(e, labels), emb)
    low, g_low = grad_of(lambda e: multi_similarity_loss(e, labels), emb.to(dtype))
    assert low.dtype == dtype and torch.isfinite(low) and torch.isfinite(g_low).all()
    torch.testing.assert_close(low.double(), l64, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(g_low.double(), g64, atol=5e-3, rtol=5e-2)
