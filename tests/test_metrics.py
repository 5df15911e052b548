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


def test_f1_weighted_by_hand_and_against_sklearn():
    from sklearn.metrics import f1_score

    truth = torch.tensor([0, 0, 0, 0, 1, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 1])
    logits = torch.nn.functional.one_hot(pred, 3).float() * 4.0  # argmax is the prediction
    m = compute_metrics("classification", truth, logits)
    # class 0: precision 1, recall 3/4 -> F1 6/7; class 1: precision 1/3, recall 1 -> 1/2; class 2: 0.
    # Weighted by support 4, 1, 1 of 6 samples.
    assert m["f1_weighted"] == pytest.approx((4 * 6 / 7 + 1 * 0.5 + 1 * 0.0) / 6)
    assert m["f1_weighted"] == pytest.approx(f1_score(truth.numpy(), pred.numpy(), average="weighted"))
    assert m["f1_macro"] == pytest.approx((6 / 7 + 0.5 + 0.0) / 3)


def test_log_loss_against_sklearn_and_by_hand():
    from sklearn.metrics import log_loss

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
    truth = torch.tensor([0, 2, 1, 0])
    m = compute_metrics("classification", truth, logits)
    probs = torch.softmax(logits, 1).numpy()
    assert m["log_loss"] == pytest.approx(log_loss(truth.numpy(), probs, labels=[0, 1, 2]), rel=1e-6)
    # multilabel: mean binary cross-entropy over samples and labels
    ml = compute_metrics("multilabel", torch.tensor([[1, 0], [0, 1]]), torch.tensor([[0.0, 0.0], [2.0, -2.0]]))
    p = torch.sigmoid(torch.tensor(2.0))
    by_hand = (2 * math.log(2) + 2 * -math.log(1 - float(p))) / 4
    assert ml["log_loss"] == pytest.approx(by_hand, rel=1e-6)
