"""AV-MNIST folder: image/{train,test}_data.npy, audio/{train,test}_data.npy, {train,test}_labels.npy."""
import numpy as np
import pytest
import torch

from multizoo_ext import create_dataset
from multizoo_ext.datasets.avmnist import get_dataloader

N_TR, N_TE, VALID = 30, 8, 10


def _write(root, n_tr=N_TR, n_te=N_TE, audio_rows=None):
    rng = np.random.default_rng(0)
    (root / "image").mkdir(parents=True)
    (root / "audio").mkdir()
    data = {}
    for split, n in (("train", n_tr), ("test", n_te)):
        img = rng.integers(0, 256, size=(n, 784)).astype(np.float64)  # MultiBench: flat pixels 0..255
        aud = rng.integers(0, 256, size=(audio_rows or n, 112, 112)).astype(np.float64)
        lab = np.arange(n) % 10
        np.save(root / "image" / f"{split}_data.npy", img)
        np.save(root / "audio" / f"{split}_data.npy", aud)
        np.save(root / f"{split}_labels.npy", lab)
        data[split] = (img, aud, lab)
    return data


def test_defaults_match_multibench_layout(tmp_path):
    data = _write(tmp_path)
    tr, va, te = get_dataloader(tmp_path, valid_size=VALID, batch_size=8)
    assert (len(tr.dataset), len(va.dataset), len(te.dataset)) == (20, 10, 8)
    img, aud, y = next(iter(te))
    assert img.shape == (8, 1, 28, 28) and aud.shape == (8, 1, 112, 112) and y.shape == (8,)
    assert img.dtype == aud.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_allclose(img.numpy().reshape(8, 784), data["test"][0] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(aud.numpy()[:, 0], data["test"][1] / 255.0, rtol=1e-6)
    # validation = the LAST valid_size training rows, in order
    vimg, _, vy = next(iter(get_dataloader(tmp_path, valid_size=VALID, batch_size=100)[1]))
    np.testing.assert_allclose(vimg.numpy().reshape(VALID, 784), data["train"][0][-VALID:] / 255.0, rtol=1e-6)
    assert vy.tolist() == data["train"][2][-VALID:].tolist()
    assert tr.dataset.modality_names == ["image", "audio"]


def test_options(tmp_path):
    data = _write(tmp_path)
    tr, _, _ = create_dataset("avmnist", data_dir=str(tmp_path), valid_size=VALID, flatten_image=True,
                              flatten_audio=True, unsqueeze_channel=False, normalize_image=False,
                              normalize_audio=False, train_shuffle=False, batch_size=4)
    img, aud, _ = next(iter(tr))
    assert img.shape == (4, 784) and aud.shape == (4, 112 * 112)
    np.testing.assert_array_equal(img.numpy(), data["train"][0][:4])  # raw, unshuffled
    tr, _, te = get_dataloader(tmp_path, valid_size=VALID, normalize="standard", flatten_image=True,
                               unsqueeze_channel=False, batch_size=100)
    fit = data["train"][0][:N_TR - VALID] / 255.0
    std = np.where(fit.std(0) > 0, fit.std(0), 1.0)
    np.testing.assert_allclose(next(iter(te))[0].numpy(), (data["test"][0] / 255.0 - fit.mean(0)) / std,
                               rtol=1e-4, atol=1e-4)


def test_seeded_shuffle(tmp_path):
    _write(tmp_path)
    a = next(iter(get_dataloader(tmp_path, valid_size=VALID, seed=1)[0]))[-1]
    b = next(iter(get_dataloader(tmp_path, valid_size=VALID, seed=1)[0]))[-1]
    assert torch.equal(a, b)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"AV-MNIST folder not found"):
        get_dataloader(tmp_path / "absent")
    root = tmp_path / "a"
    _write(root)
    (root / "audio" / "test_data.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"AV-MNIST test audio file not found: .*audio/test_data.npy"):
        get_dataloader(root, valid_size=VALID)
    root = tmp_path / "b"
    _write(root, audio_rows=5)
    with pytest.raises(ValueError, match=r"AV-MNIST train row counts disagree: image 30, audio 5, labels 30"):
        get_dataloader(root, valid_size=VALID)
    root = tmp_path / "c"
    _write(root)
    with pytest.raises(ValueError, match=r"valid_size must be an integer in \[1, 29\] for 30 training rows, got 5000"):
        get_dataloader(root)  # MultiBench's default needs the full 60000 rows
    bad = np.load(root / "image" / "train_data.npy")
    bad[2, 2] = np.nan
    np.save(root / "image" / "train_data.npy", bad)
    with pytest.raises(ValueError, match=r"training modality 0 contains 1 NaN/Inf"):
        get_dataloader(root, valid_size=VALID)
