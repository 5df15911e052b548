import math

import pytest
import torch

from multizoo_ext.metrics import compute_metrics, multibench_view


def test_classification_metrics_by_hand():
    truth = torch.tensor([0, 1, 1, 0])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.5]])  # preds 0, 1, 0, 1
    m = compute_metrics("classification", truth, logits)
    assert m["accuracy"] == 0.5
    assert m["f1_macro"] == pytest.approx(0.5)
    # P(class 1) = sigmoid(l1 - l0): 0.119, 0.731, 0.047, 0.622 -> positives rank 2nd and 4th
    assert m["auroc"] == pytest.approx(0.5)
    assert multibench_view("classification", m) == {"Accuracy": 0.5}


def test_multilabel_and_regression_and_missing_class():
    truth = torch.tensor([[1, 0], [0, 1], [1, 1]])
    logits = torch.tensor([[3.0, -3.0], [-3.0, 3.0], [3.0, -3.0]])
    m = compute_metrics("multilabel", truth, logits)
    assert m["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))  # tp 3, fp 0, fn 1
    assert set(multibench_view("multilabel", m)) == {"micro", "macro"}
    r = compute_metrics("regression", torch.tensor([[1.0], [2.0]]), torch.tensor([[2.0], [2.0]]))
    assert r == {"mse": 0.5, "mae": 0.5}
    one_class = compute_metrics("classification", torch.tensor([1, 1]), torch.randn(2, 2))
    assert math.isnan(one_class["auroc"])
    with pytest.raises(ValueError, match="task must be one of"):
        compute_metrics("ranking", truth, logits)
