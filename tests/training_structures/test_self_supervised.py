"""Refiner pre-training: labels are ignored, the refiner loss falls, weights carry over."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from multizoo_ext.datasets.label_fraction import split_labeled
from multizoo_ext.fusions.common_fusions import Concat
from multizoo_ext.fusions.refnet import ReFNet
from multizoo_ext.training_structures.self_supervised import pretrain
from multizoo_ext.unimodals.common_models import MLP


def _data(n=256, labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g)
    y = (a[:, 0] > 0).long()
    return TensorDataset(a, b, y) if labels else TensorDataset(a, b)


def _parts():
    torch.manual_seed(0)
    enc = [MLP(6, 16, 8), MLP(4, 16, 8)]
    return enc, ReFNet(Concat([8, 8]), [8, 8])


def test_pretrain_lowers_refiner_loss_and_trains_in_place(tmp_path):
    enc, refnet = _parts()
    dl = DataLoader(_data(), batch_size=32, shuffle=True)
    before = refnet.refiners[0][0].weight.detach().clone()
    res = pretrain(enc, refnet, dl, 8, valid_dataloader=DataLoader(_data(seed=1), batch_size=64),
                   save=str(tmp_path / "pre.pt"), lr=3e-3, seed=0)
    assert res.history[-1]["train_loss"] < 0.8 * res.history[0]["train_loss"]
    assert not torch.equal(refnet.refiners[0][0].weight, before)  # same module object, trained in place
    assert res.model.fuse is refnet and res.model.encoders[0] is enc[0]
    assert (tmp_path / "pre.pt").is_file() and (tmp_path / "pre.json").is_file()


def test_labels_are_ignored():
    losses = []
    for labels in (True, False):
        enc, refnet = _parts()
        ds = _data(labels=labels)
        if labels:  # scramble labels: must not change anything
            ds = TensorDataset(*ds.tensors[:2], torch.randint(0, 9, (len(ds),)))
        res = pretrain(enc, refnet, DataLoader(ds, batch_size=32), 2, seed=0)
        losses.append([h["train_loss"] for h in res.history])
    assert losses[0] == pytest.approx(losses[1])


def test_pretrain_errors():
    enc, refnet = _parts()
    with pytest.raises(ValueError, match="train_dataloader is empty"):
        pretrain(enc, refnet, DataLoader(TensorDataset(torch.zeros(0, 6), torch.zeros(0, 4))), 1)
    with pytest.raises(ValueError, match="2 encoders but the batch holds 1"):
        pretrain(enc, refnet, DataLoader(TensorDataset(torch.zeros(4, 6)), batch_size=2), 1)


def test_split_labeled_is_stratified_and_disjoint():
    y = torch.tensor([0] * 80 + [1] * 20)
    ds = TensorDataset(torch.randn(100, 3), torch.randn(100, 2), y)
    lab, unlab = split_labeled(DataLoader(ds, batch_size=8), 0.1, seed=3)
    li, ui = lab.dataset.indices, unlab.dataset.indices
    assert len(li) == 10 and len(ui) == 90 and not set(li) & set(ui)
    assert int(y[li].sum()) == 2  # 20 % positives kept
    lab2, _ = split_labeled(DataLoader(ds, batch_size=8), 0.1, seed=3)
    assert lab2.dataset.indices == li
    full, none = split_labeled(DataLoader(ds), 1.0)
    assert none is None and len(full.dataset) == 100
    with pytest.raises(ValueError, match="fewer than the 2 classes"):
        split_labeled(DataLoader(ds), 0.01)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        split_labeled(DataLoader(ds), 0.0)
