"""scikit-learn digits as two views (left / right image halves)."""
import numpy as np
import torch
from sklearn.datasets import load_digits

from multizoo_ext import create_dataset
from multizoo_ext.datasets.digits import get_dataloader, load_digit_views


def test_views_are_left_and_right_halves():
    (left, right), y = load_digit_views()
    images = load_digits().images
    assert left.shape == (1797, 32) and right.shape == (1797, 32) and y.dtype == np.int64
    np.testing.assert_array_equal(left[5].reshape(8, 4), images[5][:, :4])
    np.testing.assert_array_equal(right[5].reshape(8, 4), images[5][:, 4:])


def test_fixed_stratified_split_and_batches():
    tr, va, te = create_dataset("digits", batch_size=64, seed=3)
    assert (len(tr.dataset), len(va.dataset), len(te.dataset)) == (1222, 216, 359)
    left, right, y = next(iter(tr))
    assert left.shape == (64, 32) and right.shape == (64, 32) and left.dtype == torch.float32
    assert y.dtype == torch.int64
    assert tr.dataset.modality_names == ["left", "right"]
    share = np.bincount(load_digits().target) / 1797
    for loader in (va, te):
        counts = np.bincount(loader.dataset.split_labels.numpy(), minlength=10)
        assert np.all(np.abs(counts - share * len(loader.dataset)) <= 1.5)  # stratified
    # the split does not move with the training seed
    te2 = get_dataloader(seed=7)[2]
    assert np.array_equal(te.dataset.indices, te2.dataset.indices)


def test_standardised_on_training_rows_raw_option():
    tr, _, te = get_dataloader(batch_size=2000)
    x = next(iter(tr))[0].numpy()
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)
    raw_tr, _, raw_te = get_dataloader(normalize=None, batch_size=2000)
    (left, _), _ = load_digit_views()
    np.testing.assert_array_equal(next(iter(raw_te))[0].numpy(), left[raw_te.dataset.indices])
    assert next(iter(raw_tr))[0].max() == 16
