"""MultiSimilarityLoss against pytorch-metric-learning (single label) and against a plain
per-anchor loop (multi-label), edge cases, gradients and error messages."""
import math

import pytest
import torch
from pytorch_metric_learning import losses, miners

from multizoo_ext.objectives.multisimilarity import (
    DEFAULT_ALPHA,
    DEFAULT_BASE,
    DEFAULT_BETA,
    DEFAULT_EPSILON,
    MultiSimilarityLoss,
    multi_similarity_anchor_losses,
    multi_similarity_loss,
    pair_masks,
)
from multizoo_ext.objectives.multisimilarity import _needs_shift


TOL = {torch.float64: dict(atol=1e-9, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=1e-4)}
HP = dict(alpha=DEFAULT_ALPHA, beta=DEFAULT_BETA, base=DEFAULT_BASE, epsilon=DEFAULT_EPSILON)


def pml(emb, labels, alpha, beta, base, epsilon, mining=True):
    """pytorch-metric-learning's loss (+ miner); returns (loss, mined indices or None)."""
    loss_fn = losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
    tup = miners.MultiSimilarityMiner(epsilon=epsilon)(emb, labels) if mining else None
    return loss_fn(emb, labels, tup), tup


def pml_shortcut(emb, labels, tup):
    """True where PML returns 0 because it has at most one positive and one negative pair
    (GenericPairLoss shortcut, a documented difference) although pairs exist."""
    if tup is None:
        tup = _all_pairs(labels)
    sizes = [len(t) for t in tup]
    return all(s <= 1 for s in sizes) and any(s > 0 for s in sizes)


def _all_pairs(labels):
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    diff = labels[:, None] != labels[None, :]
    a1, p = torch.where(same)
    a2, n = torch.where(diff)
    return a1, p, a2, n


def reference_loop(emb, labels, alpha, beta, base, epsilon, mining=True):
    """Plain per-anchor loop over Python lists of pairs (the paper's formula)."""
    x = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    lab = labels.tolist()
    multi = labels.dim() == 2 and labels.shape[1] > 1

    def share(i, j):
        if multi:
            return any(a != 0 and b != 0 for a, b in zip(lab[i], lab[j]))
        return lab[i] == lab[j]

    batch = emb.shape[0]
    total = emb.sum() * 0
    for i in range(batch):
        sims = [x[i] @ x[j] for j in range(batch)]
        pos = [j for j in range(batch) if j != i and share(i, j)]
        neg = [j for j in range(batch) if j != i and not share(i, j)]
        if mining:
            plain = [s.item() for s in sims]
            min_pos = min(plain[k] for k in pos) if pos else math.inf
            max_neg = max(plain[j] for j in neg) if neg else -math.inf
            pos = [k for k in pos if plain[k] - epsilon < max_neg]
            neg = [j for j in neg if plain[j] + epsilon > min_pos]
        if pos:
            total = total + torch.log(1 + sum(torch.exp(-alpha * (sims[k] - base)) for k in pos)) / alpha
        if neg:
            total = total + torch.log(1 + sum(torch.exp(beta * (sims[j] - base)) for j in neg)) / beta
    return total / batch


def grad_of(fn, emb):
    emb = emb.detach().clone().requires_grad_(True)
    loss = fn(emb)
    (grad,) = torch.autograd.grad(loss, emb)
    return loss.detach(), grad


def random_batch(batch, dim, n_classes, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, n_classes, (batch,), generator=gen)
    return emb, labels


# --------------------------------------------------------------------------- single label
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 24, 48])
@pytest.mark.parametrize("mining", [True, False])
def test_matches_pytorch_metric_learning(dtype, batch, mining):
    compared = 0
    for seed in range(4):
        emb, labels = random_batch(batch, 8, max(2, batch // 4), seed, dtype)
        hp = dict(HP, alpha=[2.0, 1.0, 3.0, 2.0][seed], beta=[50.0, 40.0, 20.0, 50.0][seed],
                  base=[0.5, 0.3, 0.5, 0.6][seed], epsilon=[0.1, 0.05, 0.2, 0.1][seed])
        ours, g_ours = grad_of(lambda e: MultiSimilarityLoss(**hp, mining=mining)(e, labels), emb)
        e = emb.detach().clone().requires_grad_(True)
        theirs, tup = pml(e, labels, **hp, mining=mining)
        (g_theirs,) = torch.autograd.grad(theirs, e)
        if pml_shortcut(e, labels, tup):
            continue  # see test_pml_single_pair_shortcut_is_not_copied
        compared += 1
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, theirs.detach(), **TOL[dtype])
        torch.testing.assert_close(g_ours, g_theirs, **TOL[dtype])
    assert compared >= 2


def test_mining_changes_the_loss_and_matches_pml():
    emb, labels = random_batch(64, 8, 6, seed=11, dtype=torch.float64)
    mined, _ = grad_of(lambda e: multi_similarity_loss(e, labels), emb)
    full, _ = grad_of(lambda e: multi_similarity_loss(e, labels, mining=False), emb)
    _, tup = pml(emb, labels, **HP)
    n_all = sum(len(t) for t in _all_pairs(labels))
    assert sum(len(t) for t in tup) < n_all  # the miner dropped pairs here
    assert not torch.isclose(mined, full)


def test_pml_single_pair_shortcut_is_not_copied():
    # Labels [0, 0, 1]; S01 = 0.5, S02 = 0.5, S12 = 0: the miner keeps exactly the positive
    # (0, 1) and the negative (0, 2). PML's GenericPairLoss returns 0 for "at most one pair of
    # each"; we return the loss of those pairs, as the reference loop does.
    c = math.sqrt(0.75)
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.5, c, 0.0], [0.5, -0.25 / c, math.sqrt(1 - 0.25 - 0.0625 / 0.75)]],
                       dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    theirs, tup = pml(emb.clone().requires_grad_(True), labels, **HP)
    assert [len(t) for t in tup] == [1, 1, 1, 1] and float(theirs.detach()) == 0.0
    ours, g_ours = grad_of(lambda e: multi_similarity_loss(e, labels), emb)
    ref, g_ref = grad_of(lambda e: reference_loop(e, labels, **HP), emb)
    assert float(ours) > 0.1
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


def test_label_formats_agree():
    emb, labels = random_batch(24, 6, 4, seed=3, dtype=torch.float64)
    by_index = multi_similarity_loss(emb, labels)
    torch.testing.assert_close(multi_similarity_loss(emb, labels[:, None]), by_index)
    one_hot = torch.nn.functional.one_hot(labels, 4)
    torch.testing.assert_close(multi_similarity_loss(emb, one_hot), by_index)
    torch.testing.assert_close(multi_similarity_loss(emb, one_hot.float()), by_index)
    torch.testing.assert_close(multi_similarity_loss(emb, one_hot.bool()), by_index)


def test_scale_invariant_and_module_equals_functional():
    emb, labels = random_batch(16, 5, 3, seed=5, dtype=torch.float64)
    loss_fn = MultiSimilarityLoss(alpha=3.0, beta=30.0, base=0.4, epsilon=0.05)
    value = loss_fn(emb, labels)
    torch.testing.assert_close(value, loss_fn(7.5 * emb, labels))
    torch.testing.assert_close(
        value, multi_similarity_loss(emb, labels, alpha=3.0, beta=30.0, base=0.4, epsilon=0.05)
    )
    assert "alpha=3.0, beta=30.0, base=0.4, epsilon=0.05, mining=True" in repr(loss_fn)


# ---------------------------------------------------------------------------- multi-label
@pytest.mark.parametrize("batch", [2, 3, 7, 16, 28])
@pytest.mark.parametrize("mining", [True, False])
def test_multilabel_matches_reference_loop(batch, mining):
    for seed in range(3):
        gen = torch.Generator().manual_seed(100 + seed)
        emb = torch.randn(batch, 6, generator=gen, dtype=torch.float64)
        labels = (torch.rand(batch, 5, generator=gen) < 0.3).long()
        labels[0] = 0  # a sample without any label: a negative of everyone
        hp = dict(HP, alpha=[2.0, 1.5, 4.0][seed], beta=[50.0, 10.0, 30.0][seed])
        ours, g_ours = grad_of(lambda e: multi_similarity_loss(e, labels, **hp, mining=mining), emb)
        ref, g_ref = grad_of(lambda e: reference_loop(e, labels, **hp, mining=mining), emb)
        torch.testing.assert_close(ours, ref, **TOL[torch.float64])
        torch.testing.assert_close(g_ours, g_ref, **TOL[torch.float64])


def test_multilabel_float32_close_to_float64():
    gen = torch.Generator().manual_seed(7)
    emb = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    labels = (torch.rand(32, 23, generator=gen) < 0.15).float()
    l64, g64 = grad_of(lambda e: multi_similarity_loss(e, labels), emb)
    l32, g32 = grad_of(lambda e: multi_similarity_loss(e, labels), emb.float())
    assert l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), l64, **TOL[torch.float32])
    torch.testing.assert_close(g32.double(), g64, **TOL[torch.float32])


def test_pair_masks():
    pos, neg = pair_masks(torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 1], [0, 0, 0]]))
    assert pos.dtype == torch.bool
    assert pos.tolist() == [[False, False, True, False], [False, False, False, False],
                            [True, False, False, False], [False, False, False, False]]
    assert neg.tolist() == [[False, True, False, True], [True, False, True, True],
                            [False, True, False, True], [True, True, True, False]]
    pos_f, neg_f = pair_masks(torch.tensor([3, 3, 1]), dtype=torch.float64)
    assert pos_f.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    assert neg_f.tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 0]]


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 0, 2, 1]), (torch.arange(15).reshape(5, 3) % 2)])
@pytest.mark.parametrize("mining", [True, False])
def test_gradcheck(labels, mining):
    emb = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: multi_similarity_loss(e, labels, mining=mining), (emb,))


def test_anchor_losses_rectangular_and_mask_dtypes():
    gen = torch.Generator().manual_seed(1)
    a = torch.nn.functional.normalize(torch.randn(3, 4, generator=gen, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(5, 4, generator=gen, dtype=torch.float64), dim=1)
    sim = (a @ b.T).requires_grad_(True)  # (3, 5)
    pos = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    neg = ~pos
    neg[2] = False  # anchor 2 has no pair at all
    out = multi_similarity_anchor_losses(sim, pos, neg, mining=False)
    assert out.shape == (3,) and out[2].item() == 0.0
    expected = [
        torch.log(1 + torch.exp(-2 * (sim[r][pos[r]] - 0.5)).sum()) / 2
        + torch.log(1 + torch.exp(50 * (sim[r][neg[r]] - 0.5)).sum()) / 50
        for r in range(2)
    ]
    torch.testing.assert_close(out[:2], torch.stack(expected))
    torch.testing.assert_close(out, multi_similarity_anchor_losses(sim, pos.double(), neg.double(), mining=False))
    assert torch.autograd.gradcheck(
        lambda s: multi_similarity_anchor_losses(s, pos, neg, mining=True), (sim.detach().requires_grad_(True),)
    )


def test_large_scales_take_the_shifted_path():
    # beta = 200: logits up to 100 overflow float32's exp, so float32 shifts each row by its
    # largest kept logit (white-box check below); float64 does not need to.
    hp = dict(HP, beta=200.0, alpha=30.0)
    assert _needs_shift(hp["alpha"], hp["beta"], hp["base"], 32, torch.float32)
    assert not _needs_shift(hp["alpha"], hp["beta"], hp["base"], 32, torch.float64)
    assert not _needs_shift(DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_BASE, 4096, torch.float32)
    for seed in range(3):
        emb, labels = random_batch(32, 4, 3, seed=seed, dtype=torch.float64)
        emb[1] = emb[0] + 1e-3  # a near-duplicate: similarity ~1, the largest logits
        labels[1] = 1 - labels[0].clamp_max(1)
        l64, g64 = grad_of(lambda e: multi_similarity_loss(e, labels, **hp), emb)
        l32, g32 = grad_of(lambda e: multi_similarity_loss(e, labels, **hp), emb.float())
        assert torch.isfinite(l32) and torch.isfinite(g32).all()
        torch.testing.assert_close(l32.double(), l64, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(g32.double(), g64, atol=1e-3, rtol=1e-4)
        e = emb.clone().requires_grad_(True)
        theirs, _ = pml(e, labels, **hp)
        (g_theirs,) = torch.autograd.grad(theirs, e)
        torch.testing.assert_close(l64, theirs.detach(), **TOL[torch.float64])
        torch.testing.assert_close(g64, g_theirs, **TOL[torch.float64])
    zero = multi_similarity_loss(torch.randn(4, 3, requires_grad=True), torch.arange(4), **hp)
    assert zero.item() == 0.0


# ------------------------------------------------------------------------------ edge cases
EDGE_CASES = {
    "batch of one": (1, torch.tensor([3])),
    "batch of one, multi-hot": (1, torch.tensor([[1, 0, 1]])),
    "no positives": (4, torch.tensor([0, 1, 2, 3])),
    "no negatives (all same label)": (4, torch.tensor([5, 5, 5, 5])),
    "multi-hot, nobody shares": (3, torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]])),
    "multi-hot, everybody shares": (3, torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 1]])),
    "empty batch": (0, torch.zeros(0, dtype=torch.long)),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_cases_give_connected_zero(case, dtype):
    batch, labels = EDGE_CASES[case]
    emb = torch.randn(batch, 6, dtype=dtype, requires_grad=True)
    loss = MultiSimilarityLoss()(emb, labels)
    assert loss.dim() == 0 and loss.dtype == dtype and loss.device == emb.device
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert emb.grad is not None and torch.equal(emb.grad, torch.zeros_like(emb))


def test_without_mining_one_sided_terms_remain():
    # mining=False keeps the positive term when a batch has no negative (as PML without miner).
    emb = torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([1, 1, 1])
    ours = multi_similarity_loss(emb, labels, mining=False)
    assert float(ours) > 0
    torch.testing.assert_close(ours, reference_loop(emb, labels, **HP, mining=False))


def test_zero_embedding_rows_match_pml():
    emb = torch.zeros(4, 3, dtype=torch.float64)
    emb[1] = torch.tensor([1.0, 2.0, 0.0])
    emb[3] = torch.tensor([0.0, -1.0, 1.0])
    labels = torch.tensor([0, 0, 1, 1])
    ours, g_ours = grad_of(lambda e: multi_similarity_loss(e, labels), emb)
    e = emb.clone().requires_grad_(True)
    theirs, _ = pml(e, labels, **HP)
    (g_theirs,) = torch.autograd.grad(theirs, e)
    torch.testing.assert_close(ours, theirs.detach())
    torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_follows_embeddings_with_cpu_labels():
    emb, labels = random_batch(32, 8, 4, seed=0, dtype=torch.float32)
    cpu = multi_similarity_loss(emb, labels)
    gpu = multi_similarity_loss(emb.to("cuda"), labels)  # labels stay on the CPU
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, **TOL[torch.float32])
    zero = multi_similarity_loss(emb[:1].to("cuda").requires_grad_(True), labels[:1])
    assert zero.device.type == "cuda" and zero.item() == 0.0


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "emb, labels, exc, match",
    [
        (torch.randn(4), torch.zeros(4, dtype=torch.long), ValueError, r"embeddings of shape \(B, D\), got shape \(4,\)"),
        (torch.randn(4, 2, 3), torch.zeros(4, dtype=torch.long), ValueError, r"embeddings of shape \(B, D\)"),
        (torch.ones(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), TypeError, "floating-point embeddings"),
        ([[0.0, 1.0]], torch.zeros(1, dtype=torch.long), TypeError, "floating-point embeddings"),
        (torch.randn(4, 3), torch.zeros(3, dtype=torch.long), ValueError, "got 4 embeddings but 3 labels"),
        (torch.randn(4, 3), torch.zeros(4, 2, 2), ValueError, r"labels of shape \(B,\), \(B, 1\) or multi-hot"),
        (torch.randn(4, 3), [0, 1, 0, 1], TypeError, "labels as a tensor"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.tensor([0, 1]), ValueError, "NaN/Inf"),
        (torch.tensor([[0.0, 1.0], [float("inf"), 0.0]]), torch.tensor([0, 1]), ValueError, "NaN/Inf"),
        (torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]), ValueError, "NaN/Inf"),  # batch of one
        (torch.full((2, 3), 3e38), torch.tensor([0, 1]), ValueError, "norm overflows torch.float32"),
        (torch.randn(2, 3), torch.tensor([0.0, float("nan")]), ValueError, "labels contain NaN/Inf"),
        (torch.randn(1, 3), torch.tensor([float("nan")]), ValueError, "labels contain NaN/Inf"),
        (torch.randn(2, 3), torch.tensor([[0, 2], [1, 0]]), ValueError, "values 0/1 only"),
    ],
)
def test_input_errors(emb, labels, exc, match):
    with pytest.raises(exc, match=match):
        MultiSimilarityLoss()(emb, labels)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=0.0), "alpha must be a positive finite number, got 0.0"),
        (dict(beta=-1.0), "beta must be a positive finite number"),
        (dict(beta=float("inf")), "beta must be a positive finite number"),
        (dict(base=float("nan")), "base must be a finite number"),
        (dict(epsilon="0.1"), "epsilon must be a finite number"),
    ],
)
def test_hyperparameter_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiSimilarityLoss(**kwargs)
    with pytest.raises(ValueError, match=match):
        multi_similarity_loss(torch.randn(3, 2), torch.tensor([0, 0, 1]), **kwargs)


def test_error_names_the_caller():
    with pytest.raises(ValueError, match="^MultiSimilarityLoss got 2 embeddings"):
        MultiSimilarityLoss()(torch.randn(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="^multi_similarity_loss got 2 embeddings"):
        multi_similarity_loss(torch.randn(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="^MultiSimilarityLoss expects multi-hot labels"):
        MultiSimilarityLoss()(torch.randn(2, 3), torch.tensor([[0.5, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="^MultiSimilarityLoss embeddings contains 1 NaN/Inf"):
        MultiSimilarityLoss()(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="^pair_masks expects multi-hot labels"):
        pair_masks(torch.tensor([[2, 0], [1, 0]]))


# ------------------------------------------------------------------------------- benchmark
def test_benchmark_smoke():
    """benchmarks/bench_multisimilarity.py runs, its loops agree with ours, and renders."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_multisimilarity.py"
    spec = importlib.util.spec_from_file_location("bench_multisimilarity", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    rows = bench.run(batches=(6, 12), dim=8, budget=0.0)
    assert torch.get_num_threads() == threads
    assert [(r["setting"], r["batch"]) for r in rows] == [("multilabel23", 6), ("multilabel23", 12),
                                                          ("single10", 6), ("single10", 12)]
    for r in rows:
        assert r["ours_ms"] > 0 and r["naive_ms"] > 0 and r["naive_err"] < 1e-5
        assert r["eager_ms"] > 0 and r["eager_err"] < 1e-5
        assert (r["pml_ms"] is None) == (r["setting"] == "multilabel23")
        assert r["multibench_ms"] is None
    assert rows[2]["pml_err"] < 1e-5
    table = bench.to_markdown(rows)
    assert table.splitlines()[0].startswith("| setting | batch | ours ms") and "n/a" in table
