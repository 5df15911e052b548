"""MOGONET CSV layout: {i}_tr.csv, {i}_te.csv, labels_tr.csv, labels_te.csv (no header)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from multizoo_ext import create_dataset
from multizoo_ext.datasets.mogonet import ENV_PATH, discover_modalities, get_dataloader, load_mogonet

# ../shared/data/ROSMAP beside the repository root, passed explicitly: the loaders have no default folder
ROSMAP = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ROSMAP"
WIDTHS = (6, 4, 5)


def _write(folder: Path, n_tr=40, n_te=12, widths=WIDTHS, seed=0):
    """A small folder written exactly as MOGONET's files are (floats, comma, no header)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for i, d in enumerate(widths, start=1):
        for split, n in (("tr", n_tr), ("te", n_te)):
            x = rng.uniform(0, 1, size=(n, d))
            np.savetxt(folder / f"{i}_{split}.csv", x, delimiter=",")
            data[(i, split)] = x
        (folder / f"{i}_featname.csv").write_text("\n".join(f"g{i}_{k}" for k in range(d)) + "\n")
    y_tr = (np.arange(n_tr) % 2).astype(float)
    y_te = (np.arange(n_te) % 2).astype(float)
    np.savetxt(folder / "labels_tr.csv", y_tr)
    np.savetxt(folder / "labels_te.csv", y_te)
    return data, y_tr, y_te


def test_load_shapes_splits_and_test_rows(tmp_path):
    data, y_tr, y_te = _write(tmp_path)
    assert discover_modalities(tmp_path) == [1, 2, 3]
    tr, va, te = get_dataloader(tmp_path, batch_size=100, normalize="none")
    assert (len(tr.dataset), len(va.dataset), len(te.dataset)) == (32, 8, 12)
    batch = next(iter(te))
    assert [tuple(t.shape) for t in batch] == [(12, 6), (12, 4), (12, 5), (12,)]
    assert batch[0].dtype == torch.float32 and batch[-1].dtype == torch.int64
    np.testing.assert_allclose(batch[1].numpy(), data[(2, "te")], rtol=1e-6)
    assert batch[-1].tolist() == y_te.astype(int).tolist()
    assert np.bincount(va.dataset.split_labels.numpy()).tolist() == [4, 4]  # stratified
    assert tr.dataset.modality_names == ["modality_1", "modality_2", "modality_3"]


def test_chosen_modalities_seed_and_alias(tmp_path):
    _write(tmp_path)
    tr, _, _ = create_dataset("mogonet", path=str(tmp_path), modalities=[3, 1], batch_size=4)
    assert [t.shape[1] for t in next(iter(tr))[:-1]] == [5, 6]
    v0 = get_dataloader(tmp_path, split_seed=0)[1].dataset.indices
    v1 = get_dataloader(tmp_path, split_seed=1)[1].dataset.indices
    v0b = get_dataloader(tmp_path, split_seed=0, seed=9)[1].dataset.indices
    assert not np.array_equal(v0, v1) and np.array_equal(v0, v0b)
    tr, va, te = create_dataset("rosmap", path=str(tmp_path))
    assert len(te.dataset) == 12


def test_rosmap_alias_standardises_by_default(tmp_path):
    data, _, _ = _write(tmp_path)
    tr, _, te = create_dataset("rosmap", path=str(tmp_path), batch_size=100)
    fit_rows = data[(1, "tr")][tr.dataset.indices]
    expected = (data[(1, "te")] - fit_rows.mean(0)) / fit_rows.std(0)
    np.testing.assert_allclose(next(iter(te))[0].numpy(), expected, rtol=1e-4, atol=1e-5)
    _, _, raw = create_dataset("rosmap", path=str(tmp_path), batch_size=100, normalize="none")
    np.testing.assert_allclose(next(iter(raw))[0].numpy(), data[(1, "te")], rtol=1e-6)


def test_normalisation_fitted_on_training_rows(tmp_path):
    data, _, _ = _write(tmp_path)
    tr, _, te = get_dataloader(tmp_path, batch_size=100)  # standardised by default, like rosmap
    fit_rows = data[(1, "tr")][tr.dataset.indices]  # training rows after the validation hold-out
    mean, std = fit_rows.mean(0), fit_rows.std(0)
    np.testing.assert_allclose(next(iter(te))[0].numpy(), (data[(1, "te")] - mean) / std, rtol=1e-4, atol=1e-5)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MOGONET data folder not found"):
        get_dataloader(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no MOGONET modality files in .*expected 1_tr.csv"):
        get_dataloader(tmp_path / "empty")
    d = tmp_path / "a"
    _write(d)
    (d / "labels_te.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"MOGONET test label file not found: .*labels_te.csv"):
        get_dataloader(d)
    d = tmp_path / "b"
    _write(d)
    np.savetxt(d / "2_tr.csv", np.zeros((39, 4)), delimiter=",")
    with pytest.raises(ValueError, match=r"2_tr.csv has 39 rows but labels_tr.csv has 40"):
        get_dataloader(d)
    d = tmp_path / "c"
    _write(d)
    np.savetxt(d / "3_te.csv", np.zeros((12, 7)), delimiter=",")
    with pytest.raises(ValueError, match=r"modality 3 has 5 training columns but 7 test columns"):
        get_dataloader(d)
    d = tmp_path / "d"
    _write(d)
    x = np.loadtxt(d / "1_tr.csv", delimiter=",")
    np.savetxt(d / "1_tr.csv", x, delimiter=",", header="a,b,c,d,e,f", comments="")
    with pytest.raises(ValueError, match=r"must hold comma-separated numbers with no header row"):
        get_dataloader(d)
    d = tmp_path / "e"
    _write(d)
    with pytest.raises(FileNotFoundError, match=r"modality 4 training file not found"):
        get_dataloader(d, modalities=[1, 4])
    d = tmp_path / "f"
    _write(d)
    np.savetxt(d / "labels_tr.csv", np.r_[np.zeros(39), 1.0])
    with pytest.raises(ValueError, match=r"class 1 has only 1 sample\(s\) in the validation rows"):
        get_dataloader(d)


@pytest.mark.skipif(not ROSMAP.is_dir(), reason=f"real ROSMAP data not found at {ROSMAP} (../shared/data "
                                                 "next to the repository root); nothing to check on a fresh clone")
def test_real_rosmap():
    tr, va, te = get_dataloader(ROSMAP, batch_size=512)
    assert len(tr.dataset) + len(va.dataset) == 245 and len(te.dataset) == 106
    batch = next(iter(te))
    assert [tuple(t.shape) for t in batch[:-1]] == [(106, 200)] * 3
    assert set(batch[-1].tolist()) == {0, 1}
    train_labels = torch.cat([tr.dataset.split_labels, va.dataset.split_labels])
    assert np.bincount(train_labels.numpy()).tolist() == [118, 127]  # 118 NC, 127 AD


def test_gap_in_modality_numbering_is_an_error(tmp_path):
    _write(tmp_path)
    (tmp_path / "2_tr.csv").unlink()  # modality 3 used to vanish silently
    with pytest.raises(ValueError, match=r"numbered 1\.\.3 without gaps; missing \['2_tr.csv'\]"):
        get_dataloader(tmp_path)
    (tmp_path / "1_tr.csv").rename(tmp_path / "1_tr.csv.bak")
    with pytest.raises(ValueError, match=r"missing \['1_tr.csv', '2_tr.csv'\]"):
        discover_modalities(tmp_path)
    # with the modalities named, the present ones still load
    tr, _, _ = get_dataloader(tmp_path, modalities=[3], batch_size=4)
    assert next(iter(tr))[0].shape == (4, 5)


@pytest.mark.parametrize("mods, err, match", [
    ([1, 1], ValueError, r"modalities must not repeat an entry, got \[1, 1\] \(repeated: \[1\]\)"),
    ([2, 3, 2], ValueError, r"repeated: \[2\]"),
    ([0, 1], ValueError, r"modality numbers start at 1"),
    ("12", TypeError, r"must be a list of modality numbers"),
    ([1.5, 2], TypeError, r"must be integer modality numbers"),
])
def test_bad_modality_lists(tmp_path, mods, err, match):
    _write(tmp_path)
    with pytest.raises(err, match=match):
        create_dataset("mogonet", path=str(tmp_path), modalities=mods)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["2_tr.csv", "3_te.csv", "labels_tr.csv"])
def test_non_finite_values_are_an_error(tmp_path, bad, name):
    _write(tmp_path)
    x = np.loadtxt(tmp_path / name, delimiter=",", ndmin=2)
    x[3, 0] = bad
    np.savetxt(tmp_path / name, x, delimiter=",")
    with pytest.raises(ValueError, match=rf"{name} contains 1 NaN/Inf value\(s\)"):
        get_dataloader(tmp_path)


def test_no_default_folder_path_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_PATH, raising=False)
    monkeypatch.chdir(tmp_path)
    for name in ("rosmap", "mogonet"):
        with pytest.raises(ValueError, match=rf"pass path=\.\.\. \(CLI: --data-arg path=FOLDER\) or set the "
                                             rf"environment variable {ENV_PATH}=FOLDER"):
            create_dataset(name)
    data, _, _ = _write(tmp_path / "data")
    monkeypatch.setenv(ENV_PATH, str(tmp_path / "data"))
    _, _, te = create_dataset("rosmap", batch_size=100, normalize="none")
    np.testing.assert_allclose(next(iter(te))[0].numpy(), data[(1, "te")], rtol=1e-6)
    assert load_mogonet(None)[4] == [1, 2, 3]
