"""Shared dataset machinery: splits, labels, train-only normalisation, seeds, errors."""
import numpy as np
import pytest
import torch

from multizoo_ext import create_dataset, list_datasets
from multizoo_ext.datasets.common import (
    DataKeyError,
    MultimodalDataset,
    Normalizer,
    arrays_to_dataloaders,
    convert_labels,
)


def _data(n=200, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x1 = rng.normal(3.0, 2.0, size=(n, 5)).astype(np.float32)
    x2 = rng.uniform(-1, 4, size=(n, 2, 3))
    y = np.arange(n) % classes
    return [x1, x2], y


def _all(loader):
    batches = list(loader)
    return [torch.cat([b[j] for b in batches]) for j in range(len(batches[0]))]


def test_registered_names():
    assert {"synthetic", "digits", "mogonet", "rosmap", "mmimdb", "avmnist", "affect", "npz"} <= set(list_datasets())


def test_shapes_dtypes_and_split_sizes():
    mods, y = _data()
    tr, va, te = arrays_to_dataloaders(mods, y, batch_size=16)
    assert (len(tr.dataset), len(va.dataset), len(te.dataset)) == (144, 16, 40)
    x1, x2, yb = next(iter(tr))
    assert x1.shape == (16, 5) and x2.shape == (16, 2, 3) and yb.shape == (16,)
    assert x1.dtype == torch.float32 and x2.dtype == torch.float32 and yb.dtype == torch.int64
    idx = [d.dataset.indices for d in (tr, va, te)]
    assert sorted(np.concatenate(idx).tolist()) == list(range(200))  # disjoint and complete


def test_stratified_splits_keep_class_balance():
    mods, y = _data(n=200, classes=4)
    _, va, te = arrays_to_dataloaders(mods, y)
    assert np.bincount(te.dataset.split_labels.numpy()).tolist() == [10, 10, 10, 10]
    assert np.bincount(va.dataset.split_labels.numpy()).tolist() == [4, 4, 4, 4]


def test_label_conventions():
    mods, _ = _data(n=60)
    multi = (np.random.default_rng(0).random((60, 3)) > 0.5).astype(np.int64)
    tr, _, _ = arrays_to_dataloaders(mods, multi, task="multilabel")
    y = next(iter(tr))[-1]
    assert y.dtype == torch.float32 and y.shape[1] == 3
    tr, _, _ = arrays_to_dataloaders(mods, np.linspace(0, 1, 60), task="regression")
    y = next(iter(tr))[-1]
    assert y.dtype == torch.float32 and y.shape[1:] == (1,)
    # float class labels such as MOGONET's 0.0 / 1.0 and (N, 1) columns are accepted
    assert convert_labels(np.array([[0.0], [1.0]]), "classification").tolist() == [0, 1]


def test_standard_normalisation_uses_training_rows_only():
    mods, y = _data()
    tr, va, te = arrays_to_dataloaders(mods, y, normalize="standard", batch_size=500)
    train_rows = mods[0][tr.dataset.indices].astype(np.float64)
    mean, std = train_rows.mean(0), train_rows.std(0)
    x_tr = next(iter(tr))[0].numpy()
    np.testing.assert_allclose(x_tr.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x_tr.std(0), 1, atol=1e-4)
    x_te = te.dataset.modalities[0][torch.from_numpy(te.dataset.indices)].numpy()
    expected = (mods[0][te.dataset.indices] - mean) / std
    np.testing.assert_allclose(x_te, expected, rtol=1e-4, atol=1e-5)
    # statistics of all rows would differ: the test split was not used
    assert not np.allclose(mods[0].mean(0), mean)


def test_minmax_normalisation_and_constant_feature():
    rng = np.random.default_rng(1)
    x = rng.uniform(2, 5, size=(100, 3))
    x[:, 2] = 7.0  # constant: scale replaced by 1 -> 0
    tr, _, te = arrays_to_dataloaders([x], np.arange(100) % 2, normalize="minmax", batch_size=1000)
    xt = next(iter(tr))[0].numpy()
    assert xt[:, :2].min() == pytest.approx(0, abs=1e-6) and xt[:, :2].max() == pytest.approx(1, abs=1e-6)
    assert np.all(xt[:, 2] == 0)
    lo = x[tr.dataset.indices, :2].min(0)
    hi = x[tr.dataset.indices, :2].max(0)
    np.testing.assert_allclose(next(iter(te))[0].numpy()[:, :2], (x[te.dataset.indices, :2] - lo) / (hi - lo),
                               rtol=1e-5, atol=1e-6)


def test_normalizer_with_mask_and_axes():
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    nz = Normalizer.fit(x, "standard", reduce_axes=(0, 1))
    np.testing.assert_allclose(nz.shift, x.reshape(6, 4).mean(0))
    mask = np.array([[True, False, False], [True, True, False]])
    nz = Normalizer.fit(x, "minmax", mask=mask)
    np.testing.assert_allclose(nz.shift, x[mask].min(0))
    # chunked accumulation over chosen rows equals the one-shot statistics
    big = np.random.default_rng(0).normal(1e3, 2.0, size=(101, 3, 2))
    rows = np.arange(0, 101, 2)
    nz = Normalizer.fit(big, "standard", rows=rows, chunk_rows=7)
    np.testing.assert_allclose(nz.shift, big[rows].mean(0), rtol=1e-6)
    np.testing.assert_allclose(nz.scale, big[rows].std(0), rtol=1e-5)


def test_seeds_reproducible():
    mods, y = _data()
    a = [b[-1].tolist() for b in arrays_to_dataloaders(mods, y, seed=3)[0]]
    b = [b[-1].tolist() for b in arrays_to_dataloaders(mods, y, seed=3)[0]]
    tr = arrays_to_dataloaders(mods, y, seed=3)[0]
    first = [b0[0].sum().item() for b0 in tr]
    second = [b0[0].sum().item() for b0 in tr]
    assert a == b
    assert first != second  # a new epoch reshuffles, from the same generator
    c = arrays_to_dataloaders(mods, y, seed=4)[0]
    assert [b0[0].sum().item() for b0 in c] != first
    # the split follows split_seed
    s1 = arrays_to_dataloaders(mods, y, seed=0, split_seed=1)[2].dataset.indices
    s2 = arrays_to_dataloaders(mods, y, seed=5, split_seed=1)[2].dataset.indices
    s3 = arrays_to_dataloaders(mods, y, seed=0, split_seed=2)[2].dataset.indices
    assert np.array_equal(s1, s2) and not np.array_equal(s1, s3)


def test_separate_arrays_and_explicit_splits():
    mods, y = _data(n=100)
    vm, vy = _data(n=20, seed=1)
    tm, ty = _data(n=30, seed=2)
    tr, va, te = arrays_to_dataloaders(mods, y, valid_modalities=vm, valid_labels=vy, test_modalities=tm,
                                       test_labels=ty)
    assert (len(tr.dataset), len(va.dataset), len(te.dataset)) == (100, 20, 30)
    tr, va, te = arrays_to_dataloaders(mods, y, splits=(range(0, 60), range(60, 80), range(80, 100)))
    assert te.dataset.indices.tolist() == list(range(80, 100))
    tr, va, te = arrays_to_dataloaders(mods, y, test_modalities=tm, test_labels=ty, splits=(range(90), range(90, 100)))
    assert (len(tr.dataset), len(va.dataset), len(te.dataset)) == (90, 10, 30)


def test_dataset_shares_memory_and_yields_lists():
    x = np.zeros((10, 3), dtype=np.float32)
    ds = MultimodalDataset([x, x], np.arange(10) % 2)
    assert np.shares_memory(ds.modalities[0].numpy(), x)
    item = ds[4]
    assert isinstance(item, list) and len(item) == 3 and item[-1].item() == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"labels": np.arange(199) % 2}, r"row counts disagree: modalities have rows \[200, 200\] but labels have 199"),
    ({"nan": True}, r"training modality 0 contains 1 NaN/Inf value\(s\)"),
    ({"inf": True}, r"training modality 0 contains 1 NaN/Inf value\(s\)"),
    ({"labels": np.r_[-1, np.arange(199) % 2]}, r"must be non-negative class indices, got a minimum of -1"),
    ({"labels": np.arange(200) % 3, "num_classes": 2}, r"must lie in \[0, 1\] for num_classes=2, got a maximum of 2"),
    ({"labels": np.linspace(0, 1, 200)}, r"must be integer class indices"),
    ({"labels": np.r_[5, np.zeros(199, int)]}, r"class 5 has only 1 sample\(s\) in the test rows; stratified"),
    ({"task": "ranking"}, r"task must be one of classification, multilabel, regression, got 'ranking'"),
    ({"normalize": "zscore"}, r"normalize must be one of standard, minmax or None, got 'zscore'"),
    ({"test_fraction": 1.5}, r"the test fraction must be in \(0, 1\), got 1.5"),
    ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
    ({"seed": -1}, r"seed must be a non-negative integer, got -1"),
])
def test_clear_errors(kwargs, match):
    mods, y = _data()
    mods = [m.copy() for m in mods]
    if kwargs.pop("nan", False):
        mods[0][3, 1] = np.nan
    if kwargs.pop("inf", False):
        mods[0][3, 1] = np.inf
    y = kwargs.pop("labels", y)
    with pytest.raises(ValueError, match=match):
        arrays_to_dataloaders(mods, y, **kwargs)


def test_more_errors():
    mods, y = _data()
    with pytest.raises(ValueError, match=r"training split is empty"):
        arrays_to_dataloaders([np.zeros((0, 3))], np.zeros(0))
    with pytest.raises(TypeError, match=r"must be a list of arrays, one per modality, got ndarray"):
        arrays_to_dataloaders(mods[0], y)
    with pytest.raises(ValueError, match=r"needs at least one modality array"):
        arrays_to_dataloaders([], y)
    with pytest.raises(ValueError, match=r"test modality 1 has sample shape \(3,\) but the training data has \(2, 3\)"):
        arrays_to_dataloaders(mods, y, test_modalities=[mods[0], np.zeros((200, 3))], test_labels=y)
    with pytest.raises(ValueError, match=r"pass both valid_modalities and valid_labels, or neither"):
        arrays_to_dataloaders(mods, y, valid_modalities=mods)
    with pytest.raises(ValueError, match=r"multilabel labels must be multi-hot 0/1 values"):
        arrays_to_dataloaders(mods, np.full((200, 3), 2), task="multilabel")
    with pytest.raises(ValueError, match=r"splits must be \(train, valid, test\) index arrays here, got 2 parts"):
        arrays_to_dataloaders(mods, y, splits=(range(10), range(10, 20)))
    assert issubclass(DataKeyError, KeyError) and issubclass(DataKeyError, ValueError)
    assert str(DataKeyError("plain message")) == "plain message"


def test_create_dataset_passes_kwargs_through():
    tr, _, _ = create_dataset("synthetic", n_samples=200, seed=1)
    assert tr.batch_size == 32  # the builder's default applied
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got None"):
        create_dataset("synthetic", n_samples=200, batch_size=None, seed=1)  # None is a value
