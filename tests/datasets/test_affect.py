"""CMU-MOSI/MOSEI-style pickles: {'train','valid','test'} x {vision, audio, text, labels}."""
import os
import pickle

import numpy as np
import pytest
import torch

from multizoo_ext import create_dataset
from multizoo_ext.datasets.affect import get_dataloader, load_affect_pickle
from multizoo_ext.datasets.common import DataKeyError
from multizoo_ext.datasets.safe_pickle import UnsafePickleError

T, DV, DA, DT = 8, 3, 4, 5


def _split(n, rng, starts, labels):
    """Front-padded sequences as in MultiBench's pickles: zeros before ``starts[i]``."""
    v = rng.normal(size=(n, T, DV))
    a = rng.normal(size=(n, T, DA))
    t = rng.normal(size=(n, T, DT))
    for i, s in enumerate(starts):
        v[i, :s] = a[i, :s] = t[i, :s] = 0.0
    return {"vision": v, "audio": a, "text": t, "labels": np.asarray(labels, dtype=np.float64).reshape(n, 1, 1),
            "id": np.array([[f"vid_{i}"] for i in range(n)])}


def _write(path, **edit):
    rng = np.random.default_rng(0)
    data = {
        "train": _split(10, rng, [0, 1, 2, 3, 4, 0, 6, 7, 1, 2],
                        [2.4, -1.0, 0.0, 0.6, -2.2, 1.0, -0.4, 3.0, 0.0, -3.0]),
        "valid": _split(4, rng, [0, 3, 5, 1], [1.2, -0.2, 0.0, 2.0]),
        "test": _split(5, rng, [2, 0, 4, 1, 3], [-1.6, 0.8, 0.0, 1.4, -0.6]),
    }
    data["train"]["text"][9] = 0.0  # all-zero text: dropped as MultiBench's drop_entry does
    data["train"]["audio"][0, 1, 2] = -np.inf  # MultiBench zeroes the audio's -inf
    data["train"]["vision"][1, 5, 0] = np.nan
    for key, fn in edit.items():
        fn(data)
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return data


def test_regression_fixed_length_alignment(tmp_path):
    path = tmp_path / "mosi_raw.pkl"
    raw = _write(path)
    tr, va, te = get_dataloader(path, max_seq_len=5, batch_size=100)
    assert (len(tr.dataset), len(va.dataset), len(te.dataset)) == (9, 4, 5)
    v, a, t, y = next(iter(te))
    assert v.shape == (5, 5, DV) and a.shape == (5, 5, DA) and t.shape == (5, 5, DT)
    assert v.dtype == torch.float32 and y.dtype == torch.float32 and y.shape == (5, 1)
    np.testing.assert_allclose(y[:, 0].numpy(), raw["test"]["labels"].reshape(-1), rtol=1e-6)
    # sample 2 starts at step 4: 4 real steps (4..7), then one padded step at the END
    np.testing.assert_allclose(t[2, :4].numpy(), raw["test"]["text"][2, 4:8], rtol=1e-6)
    assert torch.all(t[2, 4:] == 0) and torch.all(v[2, 4:] == 0)
    # sample 1 starts at 0 and is truncated to the first 5 steps
    np.testing.assert_allclose(a[1].numpy(), raw["test"]["audio"][1, :5], rtol=1e-6)
    assert tr.dataset.modality_names == ["vision", "audio", "text"]
    # non-finite raw values became 0 and nothing non-finite is left
    all_train = [torch.cat([b[j] for b in tr]) for j in range(3)]
    assert all(torch.isfinite(x).all() for x in all_train)


def test_classification_label_mapping(tmp_path):
    path = tmp_path / "mosi.pkl"
    _write(path)
    _, _, te = create_dataset("affect", filepath=str(path), task="classification", batch_size=100)
    y = next(iter(te))[-1]
    assert y.dtype == torch.int64 and y.shape == (5,)
    assert y.tolist() == [0, 1, 0, 1, 0]  # label > 0 -> 1; 0 counts as negative (MultiBench)
    tr, va, te = get_dataloader(path, task="classification", drop_neutral=True, batch_size=100)
    assert next(iter(te))[-1].tolist() == [0, 1, 1, 0]
    assert (len(tr.dataset), len(va.dataset)) == (7, 3)  # 9 kept train rows minus 2 neutral


def test_default_length_and_unaligned(tmp_path):
    path = tmp_path / "mosi.pkl"
    raw = _write(path)
    _, _, te = get_dataloader(path, batch_size=100)
    assert next(iter(te))[0].shape == (5, 50, DV)  # MultiBench's max_seq_len=50, padded
    raw_path = tmp_path / "unaligned.pkl"

    def shift_vision(d):
        d["test"]["vision"][0] = 0.0
        d["test"]["vision"][0, 6:] = 1.0  # vision starts later than text

    _write(raw_path, v=shift_vision)
    _, _, te = get_dataloader(raw_path, aligned=False, max_seq_len=T, batch_size=100)
    v = next(iter(te))[0]
    assert torch.all(v[0, :2] == 1) and torch.all(v[0, 2:] == 0)
    _, _, te = get_dataloader(raw_path, aligned=True, max_seq_len=T, batch_size=100)
    v = next(iter(te))[0]
    assert torch.all(v[0, :4] == 0) and torch.all(v[0, 4:6] == 1)  # cut at the text's start (2)


def test_normalisation_on_training_steps_and_z_norm(tmp_path):
    path = tmp_path / "mosi.pkl"
    _write(path)
    tr_raw, _, te_raw = get_dataloader(path, max_seq_len=6, batch_size=100)
    tr, _, te = get_dataloader(path, max_seq_len=6, normalize="standard", batch_size=100)
    x_tr = next(iter(tr_raw))[2].numpy()  # text (N, L, d), padded steps are exact zeros
    mask = np.any(x_tr != 0, axis=2)
    mean, std = x_tr[mask].mean(0), x_tr[mask].std(0)
    t_raw = next(iter(te_raw))[2].numpy()
    t_norm = next(iter(te))[2].numpy()
    m_te = np.any(t_raw != 0, axis=2)
    np.testing.assert_allclose(t_norm[m_te], (t_raw[m_te] - mean) / std, rtol=1e-4, atol=1e-5)
    assert np.all(t_norm[~m_te] == 0)  # padding stays zero
    _, _, te = get_dataloader(path, max_seq_len=6, z_norm=True, batch_size=100)
    t = next(iter(te))[2].numpy()
    np.testing.assert_allclose(t[1].mean(0), 0, atol=1e-5)  # sample 1: six real steps
    np.testing.assert_allclose(t[1].std(0, ddof=1), 1, atol=1e-4)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"affect pickle not found"):
        get_dataloader(tmp_path / "absent.pkl")
    path = tmp_path / "a.pkl"
    _write(path, drop=lambda d: d.pop("valid"))
    with pytest.raises(DataKeyError, match=r"has no split\(s\) \['valid'\]; its keys are \['test', 'train'\]"):
        get_dataloader(path)
    path = tmp_path / "b.pkl"
    _write(path, drop=lambda d: d["test"].pop("audio"))
    with pytest.raises(KeyError, match=r"affect split 'test' has no key\(s\) \['audio'\]"):
        get_dataloader(path)
    path = tmp_path / "c.pkl"
    _write(path, cut=lambda d: d["valid"].update(audio=d["valid"]["audio"][:3]))
    with pytest.raises(ValueError, match=r"affect valid modality row counts disagree: .*'audio': 3"):
        get_dataloader(path)
    path = tmp_path / "d.pkl"
    _write(path, flat=lambda d: d["train"].update(text=d["train"]["text"][:, 0]))
    with pytest.raises(ValueError, match=r"affect train 'text' must have shape \(N, T, d\), got \(10, 5\)"):
        get_dataloader(path)
    path = tmp_path / "e.pkl"
    _write(path, wide=lambda d: d["test"].update(vision=np.ones((5, T, DV + 1))))
    with pytest.raises(ValueError, match=r"feature widths \(vision, audio, text\) differ across splits"):
        get_dataloader(path)
    path = tmp_path / "f.pkl"
    _write(path)
    with pytest.raises(ValueError, match=r"affect supports task 'regression' or 'classification', got 'multilabel'"):
        get_dataloader(path, task="multilabel")


class _WritesMarker:
    """Unpickling this object would call ``exec`` and write a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pkl"
    data = {"train": {"vision": _WritesMarker(marker)}, "valid": {}, "test": {}}
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(UnsafePickleError, match=r"refused to unpickle the global builtins\.exec.*trust_pickle=True"):
        get_dataloader(path)
    with pytest.raises(ValueError, match=r"builtins\.exec"):  # also a ValueError (the CLI's bad input)
        create_dataset("affect", filepath=str(path))
    assert not marker.exists()
    # os.system through protocol 0 and 2 as well
    for proto in (0, 2, 5):
        evil = pickle.dumps({"train": _Reduce(os.system, ("true",))}, protocol=proto)
        path.write_bytes(evil)
        with pytest.raises(UnsafePickleError, match=r"refused to unpickle the global (posix|nt|os)\.system"):
            load_affect_pickle(path)


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("proto", [2, 4, 5])
def test_legitimate_pickles_load_with_every_protocol_and_object_ids(tmp_path, proto):
    path = tmp_path / "ok.pkl"
    raw = _write(path)
    raw["test"]["id"] = np.array([b"a", b"b", None, "c", 1.5], dtype=object)  # object ids, as some files have
    raw["train"]["labels"] = raw["train"]["labels"].astype(np.float32)
    path.write_bytes(pickle.dumps(raw, protocol=proto))
    _, _, te = get_dataloader(path, max_seq_len=5, batch_size=100)
    np.testing.assert_allclose(next(iter(te))[-1][:, 0].numpy(), raw["test"]["labels"].reshape(-1), rtol=1e-6)
    loaded = load_affect_pickle(path)
    assert list(loaded["test"]["id"]) == [b"a", b"b", None, "c", 1.5]


def test_trust_pickle_opens_everything_with_a_warning(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "trusted.pkl"
    raw = _write(path)
    raw["extra"] = _WritesMarker(marker)
    path.write_bytes(pickle.dumps(raw))
    with pytest.warns(UserWarning, match="trust_pickle=True"):
        tr, _, _ = create_dataset("affect", filepath=str(path), trust_pickle=True, batch_size=100)
    assert marker.exists() and len(tr.dataset) == 9  # the trusted file's code ran, as asked
    with pytest.raises(TypeError, match="trust_pickle must be True or False, got 'yes'"):
        get_dataloader(path, trust_pickle="yes")


def test_not_a_pickle(tmp_path):
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="is not a readable pickle"):
        get_dataloader(path)


def test_nonfinite_features_are_replaced_visibly_or_refused(tmp_path):
    path = tmp_path / "mosi.pkl"
    _write(path)
    with pytest.warns(RuntimeWarning, match="replacing 1 NaN/Inf value"):
        get_dataloader(path, max_seq_len=5)
    with pytest.raises(ValueError, match="contains 1 NaN/Inf value.*nonfinite='zero'"):
        get_dataloader(path, max_seq_len=5, nonfinite="error")
    with pytest.raises(ValueError, match="nonfinite must be"):
        get_dataloader(path, nonfinite="drop")
