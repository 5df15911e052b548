"""Robustness loaders (noise, dropout, missing modality) and relative / effective robustness."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from multizoo_ext.datasets.common import arrays_to_dataloaders
from multizoo_ext.datasets.robustness import (
    DEFAULT_LEVELS,
    PerturbedDataset,
    all_robustness_loaders,
    missing_modality_loaders,
    robustness_loaders,
)
from multizoo_ext.robustness import (
    effective_robustness,
    format_robustness_table,
    maxmin_normalize,
    relative_robustness,
    robustness_table,
)


@pytest.fixture(scope="module")
def test_loader():
    rng = np.random.default_rng(0)
    x1 = rng.normal(2.0, 3.0, size=(400, 6))
    x2 = rng.normal(size=(400, 2, 5))
    y = np.arange(400) % 2
    _, _, te = arrays_to_dataloaders([x1, x2], y, splits=(range(0, 100), range(100, 150), range(150, 400)),
                                     modality_names=["rna", "image"], batch_size=50)
    return te


def _stack(loader):
    batches = list(loader)
    return [torch.cat([b[j] for b in batches]) for j in range(len(batches[0]))]


def test_structure_and_clean_level_zero(test_loader):
    robust = robustness_loaders(test_loader, "gaussian")
    assert list(robust) == ["rna", "image"]
    assert all(len(v) == len(DEFAULT_LEVELS) == 11 for v in robust.values())
    clean = _stack(test_loader)
    for name, loaders in robust.items():
        assert loaders[0].batch_size == 50
        level0 = _stack(loaders[0])
        assert all(torch.equal(a, b) for a, b in zip(clean, level0))
        # lazy: every level wraps the same dataset object, nothing copied
        assert all(isinstance(dl.dataset, PerturbedDataset) and dl.dataset.dataset is test_loader.dataset
                   for dl in loaders)


def test_gaussian_noise_grows_with_level_relative_to_std(test_loader):
    robust = robustness_loaders(test_loader, "gaussian", seed=1)
    clean = _stack(test_loader)
    errs = []
    for level, dl in zip(DEFAULT_LEVELS, robust["rna"]):
        noisy = _stack(dl)
        assert torch.equal(noisy[1], clean[1]) and torch.equal(noisy[2], clean[2])  # others untouched
        errs.append(float((noisy[0] - clean[0]).std()))
    assert all(b > a for a, b in zip(errs, errs[1:]))
    sigma = float(clean[0].double().std())  # ~3: noise at level 1 is as large as the modality
    assert errs[-1] == pytest.approx(sigma, rel=0.1)
    absolute = robustness_loaders(test_loader, "gaussian", levels=[0.0, 0.5], relative=False)
    assert float((_stack(absolute["image"][1])[1] - clean[1]).std()) == pytest.approx(0.5, rel=0.1)


def test_deterministic_and_nested(test_loader):
    a = _stack(robustness_loaders(test_loader, "dropout", seed=3)["rna"][4])[0]
    b = _stack(robustness_loaders(test_loader, "dropout", seed=3)["rna"][4])[0]
    c = _stack(robustness_loaders(test_loader, "dropout", seed=4)["rna"][4])[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same sample gives the same noise whatever the batch size
    small = robustness_loaders(test_loader, "dropout", seed=3, batch_size=7)["rna"][4]
    assert torch.equal(_stack(small)[0], a)
    dl = robustness_loaders(test_loader, "dropout", seed=3)["rna"]
    z3, z6 = (_stack(dl[3])[0] == 0), (_stack(dl[6])[0] == 0)
    assert torch.all(z6[z3])  # entries dropped at 0.3 stay dropped at 0.6


def test_dropout_fraction_and_missing_modality(test_loader):
    drop = robustness_loaders(test_loader, "dropout")["image"]
    fracs = [float((_stack(dl)[1] == 0).float().mean()) for dl in drop]
    assert fracs[0] == 0 and fracs[-1] == 1
    assert fracs[5] == pytest.approx(0.5, abs=0.05)
    missing = robustness_loaders(test_loader, "missing")["rna"]
    x = _stack(missing[-1])
    assert torch.all(x[0] == 0) and not torch.all(x[1] == 0)  # only rna zeroed, for every sample
    half = _stack(missing[5])[0]
    gone = (half == 0).all(dim=1).float().mean()
    assert float(gone) == pytest.approx(0.5, abs=0.1)
    zeroed = missing_modality_loaders(test_loader)
    assert set(zeroed) == {"rna", "image"} and torch.all(_stack(zeroed["image"])[1] == 0)


def test_all_kinds_names_and_plain_tensor_datasets(test_loader):
    out = all_robustness_loaders(test_loader, levels=[0.0, 0.5, 1.0], modalities=["image"])
    assert list(out) == ["image:gaussian", "image:dropout", "image:missing"]
    ds = TensorDataset(torch.randn(20, 3), torch.arange(20) % 2)  # items are tuples, no names
    robust = robustness_loaders(DataLoader(ds, batch_size=5), "missing", levels=[0, 1])
    assert list(robust) == ["modality_0"] and torch.all(_stack(robust["modality_0"][1])[0] == 0)


def test_errors(test_loader):
    with pytest.raises(ValueError, match=r"kind must be one of gaussian, dropout, missing, got 'blur'"):
        robustness_loaders(test_loader, "blur")
    with pytest.raises(ValueError, match=r"dropout level must lie in \[0, 1\], got 1.5"):
        robustness_loaders(test_loader, "dropout", levels=[0, 1.5])
    with pytest.raises(ValueError, match=r"unknown modality 'audio'; this dataset's modalities are \['rna', 'image'\]"):
        robustness_loaders(test_loader, modalities=["audio"])
    with pytest.raises(ValueError, match=r"scales must give one sigma per modality \(2\), got 1"):
        robustness_loaders(test_loader, scales=[1.0])


def test_inside_supervised_test():
    """A hand-set model that reads only the first rna feature: its accuracy falls as rna goes missing."""
    from multizoo_ext import create_fusion
    from multizoo_ext.training_structures.supervised import MMDL
    from multizoo_ext.training_structures.supervised import test as run_test

    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(200, 6)), rng.normal(size=(200, 2, 5))
    y = (x1[:, 0] > 0).astype(np.int64)
    _, _, loader = arrays_to_dataloaders([x1, x2], y, splits=(range(100), range(100, 120), range(120, 200)),
                                         modality_names=["rna", "image"], batch_size=16)
    enc_rna = torch.nn.Linear(6, 1, bias=False)
    enc_img = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 1))
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        enc_rna.weight.copy_(torch.eye(6)[:1])
        for p in enc_img.parameters():
            p.zero_()
        head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    model = MMDL([enc_rna, enc_img], create_fusion("concat", input_dims=[1, 1]), head)
    out = run_test(model, robustness_loaders(loader, "missing", levels=[0.0, 0.5, 1.0]), no_robust=False)
    assert out["Accuracy"] == 1.0 and set(out["robustness"]) == {"rna", "image"}
    rna = out["robustness"]["rna"]["Accuracy"]
    assert rna["curve"][0] == 1.0 and rna["curve"][0] > rna["curve"][1] > rna["curve"][2]
    assert rna["relative"] == pytest.approx(relative_robustness(rna["curve"]))
    assert out["robustness"]["image"]["Accuracy"]["curve"] == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- metrics
def test_relative_robustness_is_multibench_trapezoid_area():
    assert relative_robustness([1.0, 0.8, 0.6]) == pytest.approx((1.8 + 1.4) * 0.1 / 2)
    assert relative_robustness([0.5] * 11) == pytest.approx(0.5)  # flat curve over [0, 1]
    assert relative_robustness([0.7]) == 0
    assert relative_robustness([1.0, 0.0], step=0.5) == pytest.approx(0.25)


def test_effective_robustness_against_reference():
    f, lf = [0.9, 0.8, 0.7], [0.8, 0.75, 0.7]
    # MultiBench: sum(f - (lf + f0 - lf0)) = (0) + (0.8 - 0.85) + (0.7 - 0.8)
    assert effective_robustness(f, lf) == pytest.approx(-0.15)
    assert effective_robustness(f) == pytest.approx(-0.3)  # flat reference: summed drop
    assert effective_robustness([0.6, 0.6]) == 0
    with pytest.raises(ValueError, match=r"reference has 2 points but the curve has 3"):
        effective_robustness(f, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"curve contains NaN/Inf scores"):
        relative_robustness([0.5, math.nan])
    with pytest.raises(ValueError, match=r"curve must hold at least one score"):
        relative_robustness([])


def test_maxmin_normalize():
    assert maxmin_normalize({"a": 0.2, "b": 0.6, "c": 0.4}) == pytest.approx({"a": 0.0, "b": 1.0, "c": 0.5})
    assert maxmin_normalize({"a": 1.0, "b": 3.0}, lower_is_better=True) == pytest.approx({"a": 1.0, "b": 0.0})
    assert maxmin_normalize({"a": 2.0}) == {"a": 0.0}


def test_robustness_table_per_modality():
    curves = {"text": [0.8, 0.7, 0.6], "image": [0.8, 0.8, 0.8]}
    table = robustness_table(curves)
    assert table["image"]["retained"] == pytest.approx(1.0) and table["text"]["relative"] == pytest.approx(0.14)
    assert table["text"]["worst"] == pytest.approx(0.6) and table["text"]["effective"] == pytest.approx(-0.3)
    # test()'s nested output, several measures, one kept
    nested = {"text": {"Accuracy": {"curve": [0.9, 0.5], "relative": 0.07},
                       "f1_macro": {"curve": [0.8, 0.4]}}}
    assert list(robustness_table(nested)) == ["text/Accuracy", "text/f1_macro"]
    only = robustness_table(nested, measure="Accuracy")
    assert list(only) == ["text"] and only["text"]["relative"] == pytest.approx(0.07)
    md = format_robustness_table(table)
    assert md.splitlines()[0].startswith("| modality | clean | worst | relative") and "| text | 0.8000 |" in md
    with pytest.raises(ValueError, match=r"measure 'AUPRC' not among the curves"):
        robustness_table(nested, measure="AUPRC")
