"""multizoo_ext.tasks: the one owner of task names, default losses, label preparation and the
per-batch label checks."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multizoo_ext import tasks
from multizoo_ext.tasks import TASKS, check_labels, check_task, default_criterion, prepare_truth, task_loss


def test_every_module_uses_the_one_task_list_and_rules():
    import multizoo_ext.builder as builder
    import multizoo_ext.datasets.common as dcommon
    import multizoo_ext.metrics as metrics
    import multizoo_ext.objectives.deq as odeq
    import multizoo_ext.objectives.refnet as orefnet

    assert TASKS == ("classification", "multilabel", "regression")
    assert metrics.TASKS is TASKS and dcommon.TASKS is TASKS and metrics.check_task is check_task
    assert orefnet.default_criterion is default_criterion and orefnet.task_loss is task_loss
    assert odeq.default_criterion is default_criterion and odeq.task_loss is task_loss
    for task, cls in zip(TASKS, (nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.MSELoss)):
        assert type(default_criterion(task)) is cls and type(builder.default_objective(task)) is cls
    with pytest.raises(ValueError, match="task must be one of classification, multilabel, regression, got 'rank'"):
        default_criterion("rank")
    with pytest.raises(ValueError, match="task must be one of"):
        check_labels(torch.zeros(2), "rank")


def test_classification_labels():
    got = check_labels(torch.tensor([[0.0], [2.0], [1.0]]), "classification", where="train batch 3",
                       pred_shape=(3, 3))
    assert got.dtype == torch.int64 and got.tolist() == [0, 2, 1]
    assert check_labels(torch.tensor([0, 4]), "classification").tolist() == [0, 4]  # width unknown: no upper bound
    with pytest.raises(ValueError, match=r"^train batch 3: classification labels must be integral class "
                                         r"indices, got non-integer values such as 0\.5"):
        check_labels(torch.tensor([0.0, 0.5, 1.0]), "classification", where="train batch 3", pred_shape=(3, 2))
    with pytest.raises(ValueError, match=r"valid batch 2: classification labels must lie in \[0, 1\] for a head "
                                         r"with 2 outputs, got labels in \[0, 2\]"):
        check_labels(torch.tensor([0, 2, 1]), "classification", 2, where="valid batch 2")
    with pytest.raises(ValueError, match=r"labels in \[-1, 1\]"):
        check_labels(torch.tensor([0, -1, 1]), "classification", 2)
    with pytest.raises(ValueError, match="non-integer values such as nan"):
        check_labels(torch.tensor([0.0, math.nan]), "classification", 2)
    with pytest.raises(ValueError, match="non-integer values such as inf"):
        check_labels(torch.tensor([0.0, math.inf]), "classification")  # width unknown: still refused
    with pytest.raises(ValueError, match=r"shape \(B,\) or \(B, 1\).*got \(3, 2\)"):
        check_labels(torch.zeros(3, 2), "classification", 2)
    with pytest.raises(ValueError, match="model produced 4 outputs but the batch holds 3 labels"):
        check_labels(torch.zeros(3), "classification", pred_shape=(4, 2))
    with pytest.raises(ValueError, match="at least 1 output"):
        check_labels(torch.zeros(3), "classification", pred_shape=(3, 0))
    with pytest.raises(TypeError, match="labels must be a tensor, got list"):
        check_labels([0, 1], "classification")


def test_multilabel_labels():
    y = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert check_labels(y, "multilabel", pred_shape=(2, 3)) is y
    with pytest.raises(ValueError, match=r"test batch 3: multilabel labels must be multi-hot 0/1 values, got values "
                                         r"such as 0\.5"):
        check_labels(torch.tensor([[0.0, 0.5, 1.0]]), "multilabel", 3, where="test batch 3")
    with pytest.raises(ValueError, match=r"multilabel labels have 3 columns but the head has 4 outputs"):
        check_labels(y, "multilabel", pred_shape=(2, 4))
    with pytest.raises(ValueError, match=r"multi-hot of shape \(B, 3\), got \(2,\)"):
        check_labels(torch.ones(2), "multilabel", 3)


def test_regression_targets_reshaped_explicitly_or_rejected():
    y = torch.tensor([0.5, -1.0, 2.0])
    got = check_labels(y, "regression", where="b", pred_shape=(3, 1))
    assert got.shape == (3, 1) and got.reshape(-1).tolist() == y.tolist()
    assert check_labels(y.view(3, 1), "regression", pred_shape=(3,)).shape == (3,)
    assert check_labels(y, "regression", 1).shape == (3, 1)
    assert check_labels(torch.ones(3, 2), "regression", pred_shape=(3, 2)).shape == (3, 2)
    with pytest.raises(ValueError, match=r"train batch 3: regression targets must hold 1 value\(s\) per sample to "
                                         r"match the model output of shape \(3, 1\), got targets of shape \(3, 2\)"):
        check_labels(torch.ones(3, 2), "regression", where="train batch 3", pred_shape=(3, 1))
    with pytest.raises(ValueError, match="model produced 3 outputs but the batch holds 1 labels"):
        check_labels(torch.ones(1, 3), "regression", pred_shape=(3, 1))  # same numel, wrong layout
    with pytest.raises(ValueError, match="regression targets must be finite, got values such as inf"):
        check_labels(torch.tensor([1.0, math.inf]), "regression", 1)


def test_prepare_truth_and_task_loss():
    pred = torch.randn(4, 3)
    ce = task_loss(nn.CrossEntropyLoss(), pred, torch.tensor([[0.0], [1.0], [2.0], [1.0]]))
    torch.testing.assert_close(ce, F.cross_entropy(pred, torch.tensor([0, 1, 2, 1])))
    soft = torch.softmax(torch.randn(4, 3), 1)  # class probabilities stay float
    torch.testing.assert_close(task_loss(nn.CrossEntropyLoss(), pred, soft), F.cross_entropy(pred, soft))
    reg = torch.randn(4, 1)
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when MSE broadcasts (B, 1) against (B,)
        loss = task_loss(nn.MSELoss(), reg, y)
    torch.testing.assert_close(loss, ((reg.reshape(-1) - y) ** 2).mean())  # not the (B, B) broadcast
    assert prepare_truth(nn.MSELoss(), reg.double(), y).dtype == torch.float64
    with pytest.raises(ValueError, match=r"MSELoss needs targets of the prediction's shape \(4, 1\).*got \(4, 2\)"):
        prepare_truth(nn.MSELoss(), reg, torch.zeros(4, 2))
    with pytest.raises(TypeError, match="truth must be a tensor"):
        prepare_truth(nn.MSELoss(), reg, [1.0])
    marker = object()
    assert task_loss(lambda p, t: marker, pred, torch.zeros(4)) is marker  # other criteria: labels as they came
    assert set(tasks.__all__) >= {"TASKS", "default_criterion", "prepare_truth", "task_loss", "check_labels"}


def test_refnet_objective_takes_the_task_from_its_criterion():
    """refnet_objective(nn.BCEWithLogitsLoss()) on multi-hot labels: the Multi-Similarity term
    reads them as multilabel without task= (the criterion says so)."""
    import torch
    from torch import nn

    from multizoo_ext.fusions import Concat, ReFNet
    from multizoo_ext.objectives import refnet_objective
    from multizoo_ext.tasks import resolve_task

    assert resolve_task(None, nn.BCEWithLogitsLoss()) == "multilabel"
    assert resolve_task(None, nn.MSELoss()) == "regression"
    assert resolve_task(None, None) == "classification"
    assert resolve_task("classification", nn.BCEWithLogitsLoss()) == "classification"
    torch.manual_seed(0)
    fusion = ReFNet(Concat([4, 6]), [4, 6])
    head = nn.Linear(10, 5)
    pred = head(fusion([torch.randn(8, 4), torch.randn(8, 6)]))
    truth = (torch.rand(8, 5) > 0.5).float()
    loss = refnet_objective(nn.BCEWithLogitsLoss())(pred, truth, {"model": fusion, "training": True})
    assert torch.isfinite(loss)
    loss.backward()
