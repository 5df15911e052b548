"""Synthetic unique / redundant / synergistic data: shapes, seeds and the information structure."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from multizoo_ext import create_dataset
from multizoo_ext.datasets.synthetic import get_dataloader, make_synthetic

N_FIT = 1500


def _score(x, y):
    """Test accuracy of logistic regression fitted on the first N_FIT rows."""
    clf = LogisticRegression(max_iter=2000).fit(x[:N_FIT], y[:N_FIT])
    return clf.score(x[N_FIT:], y[N_FIT:])


def _outer(a, b):
    return np.einsum("ni,nj->nij", a, b).reshape(len(a), -1)  # (N, d_a * d_b)


def test_default_loaders_shapes_sizes_dtypes():
    tr, va, te = create_dataset("synthetic")
    assert (len(tr.dataset), len(va.dataset), len(te.dataset)) == (2040, 360, 600)
    x1, x2, y = next(iter(tr))
    assert x1.shape == (32, 16) and x2.shape == (32, 16) and x1.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}


def test_any_number_of_modalities_and_widths():
    tr, _, _ = get_dataloader(num_modalities=4, n_samples=400, dims=(3, 5, 7, 9), batch_size=8)
    assert [tuple(t.shape) for t in next(iter(tr))] == [(8, 3), (8, 5), (8, 7), (8, 9), (8,)]
    assert tr.dataset.modality_names == ["modality_0", "modality_1", "modality_2", "modality_3"]


def test_seeds():
    a = make_synthetic(n_samples=100, seed=1)
    b = make_synthetic(n_samples=100, seed=1)
    c = make_synthetic(n_samples=100, seed=2)
    assert np.array_equal(a.modalities[0], b.modalities[0]) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.modalities[0], c.modalities[0])
    # the shuffling seed changes the order, not the data or the split
    t0 = get_dataloader(n_samples=300, seed=0)
    t1 = get_dataloader(n_samples=300, seed=1)
    assert np.array_equal(t0[2].dataset.indices, t1[2].dataset.indices)
    assert next(iter(t0[0]))[-1].tolist() != next(iter(t1[0]))[-1].tolist()


def test_synergy_needs_both_modalities():
    d = make_synthetic(task="synergy", n_samples=2000, dims=(8, 8), seed=0)
    x0, x1, y = d.modalities[0], d.modalities[1], d.labels
    assert np.array_equal(y, d.latents["synergy"][:, 0] ^ d.latents["synergy"][:, 1])
    # each modality alone, and even both with an additive (linear) model: chance
    assert _score(x0, y) < 0.58
    assert _score(x1, y) < 0.58
    assert _score(np.hstack([x0, x1]), y) < 0.58
    # the multiplicative interaction of the two (tensor-fusion features) is learnable
    assert _score(_outer(x0, x1), y) > 0.85


def test_redundant_and_unique_components():
    d = make_synthetic(task="redundant", n_samples=2000, dims=(8, 8), seed=0)
    assert _score(d.modalities[0], d.labels) > 0.9 and _score(d.modalities[1], d.labels) > 0.9
    d = make_synthetic(task="unique", n_samples=2000, dims=(8, 8), unique_modality=1, seed=0)
    assert _score(d.modalities[1], d.labels) > 0.9
    assert _score(d.modalities[0], d.labels) < 0.58


def test_mixed_default_is_partly_additive():
    d = make_synthetic(n_samples=2000, dims=(8, 8), seed=0)
    assert d.weights == {"redundant": 1.0, "unique": 1.0, "synergy": 1.0}
    single = _score(d.modalities[1], d.labels)
    joint = _score(np.hstack(d.modalities), d.labels)
    assert 0.65 < single < 0.85 and 0.68 < joint < 0.85  # ~75 %: the XOR part needs interaction
    assert _score(np.hstack([np.hstack(d.modalities), _outer(*d.modalities)]), d.labels) > joint + 0.05


def test_three_way_synergy_and_custom_weights():
    d = make_synthetic(num_modalities=3, task="synergy", synergy_modalities=(0, 1, 2), n_samples=200, seed=0)
    s = d.latents["synergy"]
    assert np.array_equal(d.labels, s[:, 0] ^ s[:, 1] ^ s[:, 2])
    d = make_synthetic(weights={"redundant": 2.0, "synergy": 1.0}, n_samples=200, seed=0)
    assert np.array_equal(d.labels, d.latents["redundant"])  # the heavier component decides


@pytest.mark.parametrize("kwargs, match", [
    ({"num_modalities": 1}, r"num_modalities must be an integer >= 2, got 1"),
    ({"dims": (2, 8)}, r"each modality needs width >= 3 \(three latent directions\), got dims \[2, 8\]"),
    ({"dims": (8,)}, r"dims must give one width per modality \(2\), got 1"),
    ({"task": "xor"}, r"task must be one of synergy, redundant, unique, mixed, got 'xor'"),
    ({"weights": {"noise": 1.0}}, r"weights keys must be among redundant, unique, synergy, got \['noise'\]"),
    ({"synergy_modalities": (0, 0)}, r"synergy_modalities must name >= 2 distinct modalities"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic(**kwargs)
