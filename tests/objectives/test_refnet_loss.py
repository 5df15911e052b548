"""ReFNet objectives: locating the refiner, values by hand, labels, validation, errors, our train().
(Inside MultiBench's own train()/test(): tests/multibench/.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from multizoo_ext import create_fusion, create_objective
from multizoo_ext.fusions.common_fusions import Concat
from multizoo_ext.fusions.refnet import ReFNet
from multizoo_ext.objectives.multisimilarity import MultiSimilarityLoss
from multizoo_ext.objectives.refiner import RefinerLoss
from multizoo_ext.objectives.refnet import (
    refiner_loss_of,
    refiner_only_objective,
    refnet_objective,
    task_loss,
)

DIMS = [5, 7, 3]
RAW = [(1, 4, 4), (10,), (2, 3)]  # raw modality shapes (without batch)
RAW_FLAT = [16, 10, 6]
B = 8


class MMDLLike(nn.Module):
    """The attributes MultiBench's MMDL exposes: encoders, fuse, head, reps, fuseout."""

    def __init__(self, fusion: nn.Module, n_out: int = 3, fused_dim: int | None = None):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Flatten(), nn.Linear(r, d)) for r, d in zip(RAW_FLAT, DIMS))
        self.fuse = fusion
        self.head = nn.Linear(fused_dim or fusion.out_dim, n_out)

    def forward(self, inputs):
        self.reps = [enc(x) for enc, x in zip(self.encoders, inputs)]
        self.fuseout = self.fuse(self.reps)
        out = self.fuseout[0] if isinstance(self.fuseout, tuple) else self.fuseout
        return self.head(out)


def _batch(seed=0, n_classes=3):
    g = torch.Generator().manual_seed(seed)
    raw = [torch.randn(B, *s, generator=g) for s in RAW]
    labels = torch.arange(B) % n_classes
    return raw, labels


def _run(model, raw, training=True, extra=None):
    """One MultiBench-style step: forward, then fill args like Supervised_Learning.train does."""
    model.train(training)
    pred = model(raw)
    args = dict(extra or {})
    args.update(reps=model.reps, fused=model.fuseout, inputs=raw, training=training, model=model)
    return pred, args


def _cos(recons, targets, weights):
    return sum(w * (1 - F.cosine_similarity(r, t, dim=1).mean()) for w, r, t in zip(weights, recons, targets))


def _mse(recons, targets, weights):
    return sum(w * F.mse_loss(r, t) for w, r, t in zip(weights, recons, targets))


@pytest.mark.parametrize("kind,by_hand", [("cosine", _cos), ("mse", _mse)])
@pytest.mark.parametrize("weights", [0.1, [0.2, 0.5, 1.0]])
def test_value_equals_task_plus_weighted_refiner_terms_via_model_fuse(kind, by_hand, weights):
    torch.manual_seed(0)
    model = MMDLLike(ReFNet(Concat(DIMS), DIMS))
    raw, labels = _batch()
    pred, args = _run(model, raw)
    truth = labels.view(-1, 1).float()  # MultiBench-style (B, 1) labels
    loss = refnet_objective(ms_weight=0.0, refiner_weight=weights, refiner_loss=kind)(pred, truth, args)
    w = [weights] * 3 if isinstance(weights, float) else weights
    expected = F.cross_entropy(pred, labels) + by_hand(model.fuse.last_reconstructions, model.reps, w)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_objective_gives_gradients_to_refiners_encoders_and_head():
    torch.manual_seed(0)
    model = MMDLLike(ReFNet(create_fusion("lowrank", input_dims=DIMS, output_dim=16), DIMS))
    raw, labels = _batch()
    pred, args = _run(model, raw)
    refnet_objective(ms_weight=0.1)(pred, labels, args).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ms_term_and_nested_refnet():
    torch.manual_seed(0)
    refnet = ReFNet(Concat(DIMS), DIMS)
    model = MMDLLike(nn.Sequential(refnet), fused_dim=refnet.out_dim)  # ReFNet nested below .fuse
    raw, labels = _batch()
    pred, args = _run(model, raw)
    loss = refnet_objective(ms_weight=0.1)(pred, labels, args)
    fused = refnet.last_fused
    expected = (F.cross_entropy(pred, labels) + _cos(refnet.last_reconstructions, model.reps, [0.1] * 3)
                + 0.1 * MultiSimilarityLoss()(fused, labels))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_multilabel_uses_bce_and_multi_hot_ms():
    torch.manual_seed(0)
    model = MMDLLike(ReFNet(Concat(DIMS), DIMS), n_out=4)
    raw, _ = _batch()
    truth = (torch.arange(B * 4).view(B, 4) % 3 == 0).long()  # (B, K) multi-hot ints
    pred, args = _run(model, raw)
    loss = refnet_objective(task="multilabel", ms_weight=0.5, refiner_loss="mse")(pred, truth, args)
    expected = (F.binary_cross_entropy_with_logits(pred, truth.float())
                + _mse(model.fuse.last_reconstructions, model.reps, [0.1] * 3)
                + 0.5 * MultiSimilarityLoss()(model.fuse.last_fused, truth))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_regression_task_loss():
    torch.manual_seed(0)
    model = MMDLLike(ReFNet(Concat(DIMS), DIMS), n_out=1)
    raw, _ = _batch()
    truth = torch.linspace(-1, 1, B)  # (B,) floats vs pred (B, 1)
    pred, args = _run(model, raw)
    loss = refnet_objective(task="regression")(pred, truth, args)
    expected = F.mse_loss(pred, truth.view(-1, 1)) + _cos(model.fuse.last_reconstructions, model.reps, [0.1] * 3)
    assert torch.allclose(loss, expected, atol=1e-6)
    with pytest.raises(ValueError, match="Multi-Similarity is undefined for task='regression'"):
        refnet_objective(task="regression", ms_weight=0.1)


def test_validation_returns_task_loss_only_unless_asked():
    torch.manual_seed(0)
    model = MMDLLike(ReFNet(Concat(DIMS), DIMS))
    raw, labels = _batch()
    with torch.no_grad():
        pred, args = _run(model, raw, training=False)
        task_only = refnet_objective(ms_weight=0.1)(pred, labels, args)
        full = refnet_objective(ms_weight=0.1, eval_full_loss=True)(pred, labels, args)
    assert torch.allclose(task_only, F.cross_entropy(pred, labels))
    assert full > task_only


def test_target_input_refnet_reconstructs_raw_cpu_inputs():
    torch.manual_seed(0)
    model = MMDLLike(ReFNet(Concat(DIMS), DIMS, target="input", input_dims=RAW_FLAT))
    raw, labels = _batch()
    raw_int = [(x * 10).to(torch.int64) for x in raw]  # any dtype: flattened and cast
    pred, args = _run(model, [x.float() for x in raw_int])
    args["inputs"] = raw_int
    loss = refnet_objective(ms_weight=0.0)(pred, labels, args)
    targets = [x.flatten(1).float() for x in raw_int]
    expected = F.cross_entropy(pred, labels) + _cos(model.fuse.last_reconstructions, targets, [0.1] * 3)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.fuse.refiners.parameters())


def test_multibench_style_plain_refiner_in_args():
    """MultiBench's example: objective_args_dict={'refiner': MLP(fused, ..., sum raw widths)}."""
    torch.manual_seed(0)
    model = MMDLLike(Concat(DIMS))
    decoder = nn.Sequential(nn.Linear(15, 20), nn.ReLU(), nn.Linear(20, sum(RAW_FLAT)))
    raw, labels = _batch()
    pred, args = _run(model, raw, extra={"refiner": decoder})
    loss = refnet_objective(ms_weight=0.0, refiner_weight=0.3)(pred, labels.view(-1, 1), args)
    out = decoder(model.fuseout)
    slices = torch.split(out, RAW_FLAT, dim=1)
    targets = [x.flatten(1) for x in raw]
    # MultiBench's RefNet_objective: ce + w * sum_i CosineEmbeddingLoss(slice_i, input_i, 1)
    mb = sum(nn.CosineEmbeddingLoss()(s, t, torch.ones(B)) for s, t in zip(slices, targets))
    assert torch.allclose(loss, F.cross_entropy(pred, labels) + 0.3 * mb, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in decoder.parameters())
    # A decoder with the wrong output width is caught.
    args["refiner"] = nn.Linear(15, 5)
    with pytest.raises(ValueError, match=r"must map the fused embedding to \(B, 32\)"):
        refnet_objective()(pred, labels, args)


def test_refnet_passed_as_args_refiner():
    torch.manual_seed(0)
    refnet = ReFNet(Concat(DIMS), DIMS)
    model = MMDLLike(refnet)
    raw, labels = _batch()
    pred, args = _run(model, raw, extra={"refiner": refnet})
    del args["model"]
    loss = refnet_objective(ms_weight=0.0)(pred, labels, args)
    expected = F.cross_entropy(pred, labels) + _cos(refnet.last_reconstructions, model.reps, [0.1] * 3)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_refiner_only_objective_and_function():
    torch.manual_seed(0)
    model = MMDLLike(ReFNet(Concat(DIMS), DIMS))
    raw, _ = _batch()
    pred, args = _run(model, raw)
    expected = _cos(model.fuse.last_reconstructions, model.reps, [0.1] * 3)
    assert torch.allclose(refiner_only_objective()(pred, None, args), expected, atol=1e-6)
    assert torch.allclose(refiner_loss_of(model), expected, atol=1e-6)
    mse = refiner_only_objective(refiner_weight=[1.0, 0.0, 2.0], refiner_loss="mse")(pred, None, args)
    assert torch.allclose(mse, _mse(model.fuse.last_reconstructions, model.reps, [1.0, 0.0, 2.0]), atol=1e-6)


@pytest.mark.parametrize("kind,kwargs", [("contrastive", {"threshold": 0.2}), ("ms", {"ms_beta": 40.0})])
def test_contrastive_and_ms_refiner_kinds_match_refiner_loss(kind, kwargs):
    torch.manual_seed(0)
    model = MMDLLike(ReFNet(Concat(DIMS), DIMS, detach_targets=True))
    raw, labels = _batch()
    pred, args = _run(model, raw)
    obj = refnet_objective(ms_weight=0.0, refiner_loss=kind, refiner_weight=[0.1, 0.2, 0.3], refiner_kwargs=kwargs)
    loss = obj(pred, labels, args)
    ref = RefinerLoss(kind, weights=[0.1, 0.2, 0.3], **kwargs)(model.fuse.last_reconstructions,
                                                               [r.detach() for r in model.reps])
    assert torch.allclose(loss, F.cross_entropy(pred, labels) + ref, atol=1e-6)
    assert len(obj.refiner_loss.last_terms) == 3


def test_our_supervised_train_runs_refnet():
    from multizoo_ext.training_structures.supervised import train

    torch.manual_seed(0)
    raw, labels = _batch()
    data = torch.utils.data.TensorDataset(*raw, labels)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    encoders = [nn.Sequential(nn.Flatten(), nn.Linear(r, d)) for r, d in zip(RAW_FLAT, DIMS)]
    refnet = ReFNet(Concat(DIMS), DIMS)
    before = [p.detach().clone() for p in refnet.refiners.parameters()]
    train(encoders, refnet, nn.Linear(15, 3), loader, loader, 2, optimtype=torch.optim.Adam,
          objective=refnet_objective(ms_weight=0.1), objective_args_dict={}, save=None, progress=False,
          device="cpu")
    assert all(not torch.equal(b, p) for b, p in zip(before, refnet.refiners.parameters()))


def test_registry_and_task_loss_helper():
    obj = create_objective("refnet", ms_weight=None, refiner_weight=0.2)
    assert callable(obj)
    assert callable(create_objective("refnet_refiner_only"))
    pred = torch.randn(4, 3)
    assert torch.allclose(task_loss(nn.CrossEntropyLoss(), pred, torch.tensor([[0.], [1.], [2.], [1.]])),
                          F.cross_entropy(pred, torch.tensor([0, 1, 2, 1])))


def test_truth_on_cpu_moves_to_pred_device():
    # pred on the meta device stands in for an accelerator: the truth must follow it.
    pred = torch.randn(4, 3, device="meta")
    loss = task_loss(nn.CrossEntropyLoss(), pred, torch.tensor([[0.], [1.], [2.], [1.]]))
    assert loss.device.type == "meta"


def test_errors():
    torch.manual_seed(0)
    model = MMDLLike(ReFNet(Concat(DIMS), DIMS))
    raw, labels = _batch()
    pred, args = _run(model, raw)
    obj = refnet_objective(ms_weight=0.0)
    with pytest.raises(ValueError, match="pass objective_args_dict=\\{\\} \\(or"):
        obj(pred, labels, None)
    with pytest.raises(ValueError, match="found no ReFNet"):
        obj(pred, labels, {"model": MMDLLike(Concat(DIMS)), "training": True})
    with pytest.raises(ValueError, match="refiner_weight has 2 weights but the model has 3 modalities"):
        refnet_objective(refiner_weight=[0.1, 0.1])(pred, labels, args)
    with pytest.raises(ValueError, match="another batch"):
        obj(pred[:4], labels[:4], args)
    with pytest.raises(ValueError, match="refiner_loss must be one of"):
        refnet_objective(refiner_loss="l1")
    with pytest.raises(ValueError, match="task must be one of"):
        refnet_objective(task="ranking")
    with pytest.raises(ValueError, match="ms_weight must be a finite number >= 0"):
        refnet_objective(ms_weight=-1.0)
    raw_refnet = MMDLLike(ReFNet(Concat(DIMS), DIMS, target="input", input_dims=RAW_FLAT))
    pred, args = _run(raw_refnet, raw)
    args.pop("inputs")
    with pytest.raises(ValueError, match="needs the raw batch inputs"):
        obj(pred, labels, args)
