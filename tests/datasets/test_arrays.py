"""In-memory arrays and .npz files (np.savez) -> DataLoaders."""
import numpy as np
import pytest
import torch

from multizoo_ext import create_dataset
from multizoo_ext.datasets.arrays import get_dataloader, get_dataloader_npz
from multizoo_ext.datasets.common import DataKeyError


def _arrays(n=120):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 7)), rng.normal(size=(n, 3)).astype(np.float32), np.arange(n) % 3


def test_in_memory_arrays_and_tensors():
    a, b, y = _arrays()
    tr, va, te = get_dataloader([torch.from_numpy(a), b], torch.from_numpy(y), batch_size=10,
                                modality_names=["rna", "cnv"])
    assert (len(tr.dataset), len(va.dataset), len(te.dataset)) == (86, 10, 24)
    x1, x2, yb = next(iter(te))
    assert x1.shape == (10, 7) and x1.dtype == torch.float32 and x2.shape == (10, 3) and yb.dtype == torch.int64
    assert tr.dataset.modality_names == ["rna", "cnv"]
    # test rows are the original rows (no reordering)
    np.testing.assert_allclose(x1.numpy(), a[te.dataset.indices[:10]], rtol=1e-6)


def test_npz_round_trip_keeps_file_order(tmp_path):
    a, b, y = _arrays()
    path = tmp_path / "mine.npz"
    np.savez(path, image=a, text=b, labels=y)
    tr, va, te = get_dataloader_npz(path, normalize="standard", batch_size=200)
    assert tr.dataset.modality_names == ["image", "text"]
    x1, x2, yb = next(iter(tr))
    assert x1.shape[1] == 7 and x2.shape[1] == 3
    np.testing.assert_allclose(x1.numpy().mean(0), 0, atol=1e-5)
    # chosen keys in the given order, through the registry
    tr, _, _ = create_dataset("npz", path=str(path), modality_keys=["text", "image"], batch_size=8)
    x1, x2, _ = next(iter(tr))
    assert x1.shape[1] == 3 and x2.shape[1] == 7


def test_npz_with_test_file(tmp_path):
    a, b, y = _arrays()
    np.savez(tmp_path / "train.npz", x=a, z=b, labels=y)
    np.savez(tmp_path / "test.npz", x=a[:15], z=b[:15], labels=y[:15])
    tr, va, te = get_dataloader_npz(tmp_path / "train.npz", test_path=tmp_path / "test.npz")
    assert len(te.dataset) == 15 and len(tr.dataset) + len(va.dataset) == 120


def test_npz_regression_and_multilabel(tmp_path):
    a, b, _ = _arrays()
    np.savez(tmp_path / "r.npz", a=a, b=b, target=np.linspace(0, 1, 120))
    tr, _, _ = get_dataloader_npz(tmp_path / "r.npz", label_key="target", task="regression")
    assert next(iter(tr))[-1].shape[1:] == (1,)
    np.savez(tmp_path / "m.npz", a=a, b=b, labels=(a[:, :4] > 0).astype(np.int8))
    tr, _, _ = get_dataloader_npz(tmp_path / "m.npz", task="multilabel")
    assert next(iter(tr))[-1].shape[1:] == (4,)


def test_npz_errors(tmp_path):
    a, b, y = _arrays()
    with pytest.raises(FileNotFoundError, match=r"npz file not found: .*absent.npz"):
        get_dataloader_npz(tmp_path / "absent.npz")
    np.savez(tmp_path / "nolabels.npz", a=a, b=b)
    with pytest.raises(DataKeyError, match=r"has no label array 'labels'; its keys are \['a', 'b'\]"):
        get_dataloader_npz(tmp_path / "nolabels.npz")
    np.savez(tmp_path / "ok.npz", a=a, b=b, labels=y)
    with pytest.raises(KeyError, match=r"has no array\(s\) \['c'\]; its keys are \['a', 'b', 'labels'\]"):
        get_dataloader_npz(tmp_path / "ok.npz", modality_keys=["a", "c"])
    np.save(tmp_path / "single.npy", a)
    with pytest.raises(ValueError, match=r"holds a single array, not an .npz archive"):
        get_dataloader_npz(tmp_path / "single.npy")
    np.savez(tmp_path / "only.npz", labels=y)
    with pytest.raises(ValueError, match=r"holds only 'labels'; it needs at least one modality array"):
        get_dataloader_npz(tmp_path / "only.npz")
    np.savez(tmp_path / "short.npz", a=a[:100], b=b, labels=y)
    with pytest.raises(ValueError, match=r"row counts disagree: modalities have rows \[100, 120\] but labels have 120"):
        get_dataloader_npz(tmp_path / "short.npz")
    bad = a.copy()
    bad[0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", a=bad, labels=y)
    with pytest.raises(ValueError, match=r"modality 0 contains 1 NaN/Inf"):
        get_dataloader_npz(tmp_path / "nan.npz")
