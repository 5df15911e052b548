"""MM-IMDB HDF5 (features / vgg_features / images / genres), lazily opened per process."""
import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from multizoo_ext import create_dataset
from multizoo_ext.datasets.common import DataKeyError
from multizoo_ext.datasets.mmimdb import HDF5MultimodalDataset, get_dataloader

N, D_TEXT, D_VGG, K = 30, 12, 20, 5
RANGES = dict(train_range=(0, 18), valid_range=(18, 24), test_range=(24, 30))


def _write(path, n=N, text_key="features", nan=False, **overrides):
    """A small file with MultiBench's key names and dtypes."""
    rng = np.random.default_rng(0)
    arrays = {
        text_key: rng.normal(size=(n, D_TEXT)).astype(np.float32),
        "vgg_features": rng.uniform(0, 5, size=(n, D_VGG)).astype(np.float32),
        "images": rng.integers(0, 256, size=(n, 3, 4, 4)).astype(np.uint8),
        "genres": (rng.random((n, K)) > 0.6).astype(np.int64),
        "imdb_ids": np.array([f"tt{i:07d}".encode() for i in range(n)]),
    }
    if nan:
        arrays[text_key][20, 3] = np.nan
    arrays.update(overrides)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            if v is not None:
                f.create_dataset(k, data=v)
    return arrays


def test_shapes_splits_dtypes_and_rows(tmp_path):
    path = tmp_path / "multimodal_imdb.hdf5"
    arrays = _write(path)
    tr, va, te = get_dataloader(path, **RANGES, batch_size=8)
    assert (len(tr.dataset), len(va.dataset), len(te.dataset)) == (18, 6, 6)
    text, image, genres = next(iter(te))
    assert text.shape == (6, D_TEXT) and image.shape == (6, D_VGG) and genres.shape == (6, K)
    assert text.dtype == image.dtype == genres.dtype == torch.float32
    np.testing.assert_array_equal(text.numpy(), arrays["features"][24:30])
    np.testing.assert_array_equal(genres.numpy(), arrays["genres"][24:30])
    assert tr.dataset.modality_names == ["text", "image"]
    # raw images instead of VGG features, and an open-ended range
    tr, va, te = create_dataset("mmimdb", path=str(path), vgg=False, train_range=(0, 18), valid_range=(18, 24),
                                test_range=(24, None))
    assert next(iter(te))[1].shape == (6, 3, 4, 4)


def test_lazy_per_process_handle_and_pickling(tmp_path):
    path = tmp_path / "imdb.h5"
    _write(path)
    tr, _, te = get_dataloader(path, **RANGES)
    ds = te.dataset
    assert isinstance(ds, HDF5MultimodalDataset) and ds._h5 is None  # nothing opened in __init__
    first = ds[0]
    assert ds._h5 is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._h5 is None
    assert all(torch.equal(a, b) for a, b in zip(clone[0], first))
    assert all(torch.equal(a, b) for a, b in zip(ds[-1], ds[5]))
    with pytest.raises(IndexError, match=r"index 6 out of range for a split of 6 rows"):
        ds[6]
    # workers each open their own handle (the parent's stays open meanwhile)
    serial = torch.cat([b[0] for b in DataLoader(ds, batch_size=2)])
    parallel = torch.cat([b[0] for b in DataLoader(ds, batch_size=2, num_workers=2)])
    assert torch.equal(serial, parallel)
    ds.close()
    assert ds._h5 is None


def test_normalisation_streams_training_rows(tmp_path):
    path = tmp_path / "imdb.h5"
    arrays = _write(path)
    _, _, te = get_dataloader(path, **RANGES, normalize="standard", batch_size=100)
    fit = arrays["vgg_features"][0:18].astype(np.float64)
    expected = (arrays["vgg_features"][24:30] - fit.mean(0)) / fit.std(0)
    np.testing.assert_allclose(next(iter(te))[1].numpy(), expected, rtol=1e-4, atol=1e-5)
    _, _, te = get_dataloader(path, **RANGES, normalize="minmax", batch_size=100)
    lo, hi = fit.min(0), fit.max(0)
    np.testing.assert_allclose(next(iter(te))[1].numpy(), (arrays["vgg_features"][24:30] - lo) / (hi - lo),
                               rtol=1e-4, atol=1e-5)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MM-IMDB HDF5 file not found"):
        get_dataloader(tmp_path / "absent.hdf5")
    (tmp_path / "text.hdf5").write_text("not hdf5")
    with pytest.raises(ValueError, match=r"is not a readable HDF5 file"):
        get_dataloader(tmp_path / "text.hdf5")
    path = tmp_path / "novgg.h5"
    _write(path, vgg_features=None)
    with pytest.raises(DataKeyError, match=r"has no dataset\(s\) \['vgg_features'\]; its keys are \['features', "):
        get_dataloader(path, **RANGES)
    path = tmp_path / "small.h5"
    _write(path)
    with pytest.raises(ValueError, match=r"train_range \[0, 15552\) exceeds the file's 30 rows"):
        get_dataloader(path)  # MultiBench's default ranges need the full file
    with pytest.raises(ValueError, match=r"valid_range must satisfy 0 <= start < end, got \[24, 18\)"):
        get_dataloader(path, train_range=(0, 18), valid_range=(24, 18), test_range=(24, 30))
    path = tmp_path / "rows.h5"
    _write(path, genres=np.zeros((29, K), dtype=np.int64))
    with pytest.raises(ValueError, match=r"arrays must share the row count"):
        get_dataloader(path, **RANGES)
    path = tmp_path / "labels.h5"
    _write(path, genres=np.full((N, K), 2))
    with pytest.raises(ValueError, match=r"'genres' must hold multi-hot 0/1 values"):
        get_dataloader(path, **RANGES)
    path = tmp_path / "nan.h5"
    _write(path, nan=True)
    with pytest.raises(ValueError, match=r"'features' contains NaN/Inf values in the valid rows"):
        get_dataloader(path, **RANGES)


@pytest.mark.parametrize("ranges, match", [
    (dict(train_range=(0, 20), valid_range=(18, 24), test_range=(24, 30)),
     r"train_range \[0, 20\) and valid_range \[18, 24\) overlap in rows \[18, 20\)"),
    (dict(train_range=(0, 18), valid_range=(18, 24), test_range=(0, None)),
     r"train_range \[0, 18\) and test_range \[0, 30\) overlap"),
    (dict(train_range=(0, 18), valid_range=(20, 30), test_range=(24, 26)),
     r"valid_range \[20, 30\) and test_range \[24, 26\) overlap in rows \[24, 26\)"),
])
def test_overlapping_ranges_are_an_error(tmp_path, ranges, match):
    path = tmp_path / "imdb.h5"
    _write(path)
    with pytest.raises(ValueError, match=match):
        get_dataloader(path, **ranges)


@pytest.mark.parametrize("key", ["vgg_features", "genres"])
def test_non_finite_image_or_label_row_is_an_error_when_read(tmp_path, key):
    path = tmp_path / "imdb.h5"
    rng = np.random.default_rng(1)
    bad = {"vgg_features": rng.uniform(0, 5, size=(N, D_VGG)).astype(np.float32),
           "genres": (rng.random((N, K)) > 0.6).astype(np.float32)}[key]
    bad[25, 1] = np.inf if key == "vgg_features" else np.nan
    _write(path, **{key: bad})
    if key == "genres":  # labels are checked at load (multi-hot 0/1)
        with pytest.raises(ValueError, match="must hold multi-hot 0/1 values"):
            get_dataloader(path, **RANGES)
        return
    _, _, te = get_dataloader(path, **RANGES, batch_size=100)
    assert torch.isfinite(te.dataset[0][1]).all()
    with pytest.raises(ValueError, match=r"'vgg_features' row 25 contains NaN/Inf values"):
        next(iter(te))
    te.dataset.close()
    path2 = tmp_path / "imdb2.h5"
    _write(path2, **{key: np.where(np.arange(N)[:, None] == 2, np.float32(np.nan), bad)})
    with pytest.raises(ValueError, match=r"vgg_features contains NaN/Inf values in rows \[0, 18\)"):
        get_dataloader(path2, **RANGES, normalize="standard")  # with normalize: all training rows at load
