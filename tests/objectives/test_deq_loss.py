"""deq_objective: task loss + weight * DEQFusion.jac_loss in MultiBench's (pred, truth, args) form;
the fusion reports a penalty no objective used."""
import logging
import warnings

import pytest
import torch
from torch import nn

from multizoo_ext import create_dataset, create_objective
from multizoo_ext.fusions.deq import DEQFusion
from multizoo_ext.fusions.refnet import ReFNet
from multizoo_ext.objectives.deq import deq_objective, find_deq_in_args
from multizoo_ext.training_structures.supervised import MMDL, train
from multizoo_ext.unimodals.common_models import MLP



def _model(wrap=False, jac_reg=True, n_out=3):
    torch.manual_seed(0)
    deq = DEQFusion([4, 6], width=8, jac_reg=jac_reg, f_max_iter=20, b_max_iter=20)
    fusion = ReFNet(deq, modality_dims=[4, 6]) if wrap else deq
    model = MMDL([nn.Identity(), nn.Identity()], fusion, nn.Linear(8, n_out))
    return model, deq


def _batch(B=5):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, 4, generator=g), torch.randn(B, 6, generator=g)]


@pytest.mark.parametrize("wrap", [False, True])
def test_adds_weighted_jacobian_term_found_through_the_model(wrap):
    model, deq = _model(wrap)
    pred = model(_batch())
    truth = torch.tensor([[0], [1], [2], [0], [1]])                 # (B, 1) int on the CPU, as MultiBench
    loss = deq_objective(nn.CrossEntropyLoss(), jacobian_weight=0.5)(pred, truth, {"model": model, "training": True})
    expected = nn.functional.cross_entropy(pred, truth.squeeze(1)) + 0.5 * deq.jac_loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert deq.blocks[0].lin1.weight.grad is not None and model.head.weight.grad is not None


def test_explicit_deq_in_args_and_multilabel_truth():
    model, deq = _model(n_out=2)
    pred = model(_batch(4))
    truth = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])          # multi-hot ints
    obj = deq_objective(nn.BCEWithLogitsLoss(), jacobian_weight=2.0)
    loss = obj(pred, truth, {"deq": deq, "training": True})
    expected = nn.functional.binary_cross_entropy_with_logits(pred, truth.float()) + 2.0 * deq.jac_loss
    torch.testing.assert_close(loss, expected)
    assert find_deq_in_args({"deq": model}) is deq                    # a module holding one works too


def test_validation_and_zero_weight_give_the_task_loss():
    model, deq = _model(jac_reg=False)
    pred = model(_batch())
    truth = torch.tensor([0, 1, 2, 0, 1])
    task = nn.functional.cross_entropy(pred, truth)
    in_validation = {"model": model, "training": False}
    torch.testing.assert_close(deq_objective(nn.CrossEntropyLoss())(pred, truth, in_validation), task)
    torch.testing.assert_close(deq_objective(nn.CrossEntropyLoss(), 0.0)(pred, truth, None), task)
    torch.testing.assert_close(create_objective("deq", jacobian_weight=0.0)(pred, truth, None), task)


def test_missing_pieces_raise_clear_errors():
    model, _ = _model(jac_reg=False)
    pred = model(_batch())
    truth = torch.tensor([0, 1, 2, 0, 1])
    obj = deq_objective(nn.CrossEntropyLoss(), 0.1)
    with pytest.raises(ValueError, match="pass objective_args_dict=\\{\\} to train"):
        obj(pred, truth, None)
    with pytest.raises(ValueError, match="built without|jac_reg=True"):
        obj(pred, truth, {"model": model, "training": True})
    plain = MMDL([nn.Identity(), nn.Identity()], nn.Identity(), nn.Identity())
    with pytest.raises(ValueError, match="found no DEQFusion"):
        obj(pred, truth, {"model": plain, "training": True})
    with pytest.raises(TypeError, match="args\\['deq'\\] must be a DEQFusion"):
        obj(pred, truth, {"deq": "nope", "training": True})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="jacobian_weight must be >= 0 and finite"):
            deq_objective(nn.CrossEntropyLoss(), bad)


def test_a_penalty_for_another_batch_or_already_scored_is_refused():
    model, deq = _model()
    pred = model(_batch(B=5))
    truth = torch.tensor([0, 1, 2, 0, 1])
    obj = deq_objective(nn.CrossEntropyLoss(), 0.1)
    with pytest.raises(ValueError, match="a batch of 5 samples, but the objective scores 3"):
        obj(pred[:3], truth[:3], {"model": model, "training": True})
    obj(pred, truth, {"model": model, "training": True})
    with pytest.raises(ValueError, match="already taken \\(stale\\)"):
        obj(pred, truth, {"model": model, "training": True})


def test_runs_inside_train_with_the_jacobian_term():
    train_dl, valid_dl, _ = create_dataset("synthetic", task="mixed", n_samples=160, dims=(6, 6),
                                           batch_size=32, seed=0)
    torch.manual_seed(0)
    fusion = DEQFusion([8, 8], width=8, jac_reg=True, f_max_iter=15, b_max_iter=15)
    res = train([MLP(6, 16, 8), MLP(6, 16, 8)], fusion, nn.Linear(8, 2), train_dl, valid_dl, 1,
                optimtype=torch.optim.Adam, lr=1e-3, save=None, seed=0, progress=False, fusion_lr_mult=0.1,
                objective=deq_objective(nn.CrossEntropyLoss(), 0.1), objective_args_dict={})
    assert len(res.history) == 1 and res.history[0]["train_loss"] > 0
    assert fusion.last_info is not None and fusion.last_info["jac_loss"] is None   # last pass: validation


def _train_two_epochs(objective, caplog):
    train_dl, valid_dl, _ = create_dataset("synthetic", task="mixed", n_samples=96, dims=(6, 6),
                                           batch_size=32, seed=0)
    torch.manual_seed(0)
    fusion = DEQFusion([8, 8], width=8, f_max_iter=10, b_max_iter=10)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        train([MLP(6, 16, 8), MLP(6, 16, 8)], fusion, nn.Linear(8, 2), train_dl, valid_dl, 2,
              optimtype=torch.optim.Adam, lr=1e-3, save=None, seed=0, progress=False,
              objective=objective, objective_args_dict={})
    logged = [r for r in caplog.records if "no objective used" in r.getMessage()]
    return [w for w in caught if "no objective used" in str(w.message)], logged


def test_a_plain_loss_loop_is_warned_once_that_the_penalty_went_unused(caplog):
    caught, logged = _train_two_epochs(nn.CrossEntropyLoss(), caplog)
    assert len(caught) == 1 and len(logged) == 1
    assert "deq_objective(...) or build DEQFusion(jac_reg=False)" in str(caught[0].message)


def test_a_deq_objective_loop_is_not_warned(caplog):
    caught, logged = _train_two_epochs(deq_objective(nn.CrossEntropyLoss(), 0.1), caplog)
    assert caught == [] and logged == []
