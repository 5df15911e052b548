"""MultiBench-contract behaviour of train()/test(): objective args, tasks, checkpoints, errors."""
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from multizoo_ext.checkpoint import load_checkpoint
from multizoo_ext.fusions.common_fusions import Concat
from multizoo_ext.training_structures.Supervised_Learning import MMDL, deal_with_objective, train
from multizoo_ext.training_structures.Supervised_Learning import test as run_test
from multizoo_ext.unimodals.common_models import MLP


def xor_loaders(n=600, seed=0, label_shape=(), batch=64):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, 3, generator=g), torch.randn(n, 5, generator=g)
    y = ((a[:, 0] > 0) ^ (b[:, 0] > 0)).long().reshape(n, *label_shape)
    ds = TensorDataset(a, b, y)
    return (DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(ds, batch_size=256))


def parts(out=2):
    return [MLP(3, 16, 8), MLP(5, 16, 8)], Concat([8, 8]), MLP(16, 16, out)


def test_custom_objective_receives_documented_args(tmp_path):
    tr, va = xor_loaders(n=128)
    seen = []
    extra = nn.Linear(16, 2)

    def objective(pred, truth, args):
        seen.append({k: args[k] for k in ("reps", "fused", "inputs", "training")} | {"model": args.get("model"),
                                                                                     "keep": args["keep"]})
        return nn.functional.cross_entropy(pred, truth.long()) + 0.0 * args["refiner"](args["fused"]).sum()

    enc, fus, head = parts()
    args = {"keep": 123, "refiner": extra}
    res = train(enc, fus, head, tr, va, 1, additional_optimizing_modules=[extra], objective=objective,
                objective_args_dict=args, save=None, optimtype=torch.optim.SGD, lr=0.1)
    training = [s for s in seen if s["training"]]
    assert training and any(not s["training"] for s in seen)
    s = training[0]
    assert len(s["reps"]) == 2 and s["reps"][0].shape[1] == 8
    assert s["fused"].shape[1] == 16
    assert len(s["inputs"]) == 2 and s["inputs"][0].device.type == "cpu" and s["inputs"][0].shape[1] == 3
    assert s["model"] is res.model and s["keep"] == 123


def test_additional_module_gets_trained():
    tr, va = xor_loaders(n=128)
    extra = nn.Linear(16, 1)

    def objective(pred, truth, args):
        return nn.functional.cross_entropy(pred, truth) + args["refiner"](args["fused"]).pow(2).mean()

    enc, fus, head = parts()
    before = extra.weight.detach().clone()
    train(enc, fus, head, tr, va, 1, additional_optimizing_modules=[extra], objective=objective,
          objective_args_dict={"refiner": extra}, save=None)
    assert not torch.equal(extra.weight, before)


def test_learns_xor_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    tr, va = xor_loaders()
    enc, fus, head = parts()
    res = train(enc, fus, head, tr, va, 15, optimtype=torch.optim.Adam, lr=3e-3, save=str(tmp_path / "best.pt"),
                seed=0)
    assert res.best_score > 0.9  # chance is 0.5
    assert len(res.history) == 15 and {"train_loss", "valid_loss", "valid_accuracy"} <= set(res.history[0])
    metrics = run_test(res.model, va, no_robust=True)
    assert metrics["Accuracy"] == pytest.approx(res.best_score)  # valid == test loader here
    sd, cfg = load_checkpoint(tmp_path / "best.pt")
    assert cfg["epoch"] == res.best_epoch and cfg["fusion"] == "Concat"
    enc2, fus2, head2 = parts()
    fresh = MMDL(enc2, fus2, head2)
    fresh.load_state_dict(sd)
    fresh.eval(), res.model.eval()
    xs = [torch.randn(7, 3), torch.randn(7, 5)]
    torch.testing.assert_close(fresh(xs), res.model(xs))
    with open(tmp_path / "best.pt", "rb") as fh:  # loadable with weights_only=True
        assert isinstance(torch.load(fh, weights_only=True), dict)


def test_labels_of_shape_b1_and_fusion_lr_mult():
    tr, va = xor_loaders(n=128, label_shape=(1,))
    enc, fus, head = parts()
    fus = nn.Sequential()  # no parameters is fine too; use a parametrised fusion instead:
    from multizoo_ext.fusions.common_fusions import LowRankTensorFusion
    fus = LowRankTensorFusion([8, 8], 16, 2)
    f0 = [p.detach().clone() for p in fus.parameters()]
    h0 = [p.detach().clone() for p in head.parameters()]
    res = train(enc, fus, head, tr, va, 1, fusion_lr_mult=1e-6, optimtype=torch.optim.SGD, lr=0.5, save=None)
    # SGD step = lr * mult * clipped grad: 2 steps of at most 0.5 * 1e-6 * 8 for the fusion
    assert max(float((a - b.detach()).abs().max()) for a, b in zip(f0, fus.parameters())) < 1e-5
    assert max(float((a - b.detach()).abs().max()) for a, b in zip(h0, head.parameters())) > 1e-3
    assert res.history[0]["train_loss"] > 0


def test_multilabel_and_regression_tasks():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(256, 3, generator=g), torch.randn(256, 5, generator=g)
    y_ml = torch.stack([(a[:, 0] > 0), (b[:, 0] > 0), (a[:, 1] + b[:, 1] > 0)], 1).float()
    dl = DataLoader(TensorDataset(a, b, y_ml), batch_size=32)
    enc, fus, head = parts(3)
    res = train(enc, fus, head, dl, dl, 10, task="multilabel", objective=nn.BCEWithLogitsLoss(), save=None,
                optimtype=torch.optim.Adam, lr=1e-2)
    out = run_test(res.model, dl, task="multilabel", no_robust=True)
    assert set(out) == {"micro", "macro"} and out["micro"] > 0.8
    y_reg = (a[:, :1] * 2 - b[:, :1])
    dl = DataLoader(TensorDataset(a, b, y_reg), batch_size=32)
    enc, fus, head = parts(1)
    res = train(enc, fus, head, dl, dl, 10, task="regression", objective=nn.MSELoss(), save=None,
                optimtype=torch.optim.Adam, lr=1e-2)
    out = run_test(res.model, dl, task="regression", criterion=nn.MSELoss(), no_robust=True)
    assert out["MSE"] < 0.5 * float(y_reg.var())
    assert res.best_score == pytest.approx(min(h["valid_loss"] for h in res.history))


def test_early_stopping_patience():
    tr, va = xor_loaders(n=64)
    enc, fus, head = parts()
    res = train(enc, fus, head, tr, va, 50, early_stop=True, lr=1e-12, save=None, patience=2)
    assert len(res.history) == 4  # epoch 0 sets the best, then 3 epochs without gain (> patience)


def test_deal_with_objective_matches_multibench_rules():
    pred = torch.randn(4, 3)
    truth = torch.tensor([[0], [2], [1], [0]])
    ce = deal_with_objective(nn.CrossEntropyLoss(), pred, truth, None)
    torch.testing.assert_close(ce, nn.functional.cross_entropy(pred, truth.squeeze(1)))
    got = deal_with_objective(lambda p, t, a: (p, t, a), pred, truth, {"x": 1})
    assert got[2] == {"x": 1}


@pytest.mark.parametrize("case,match", [
    ("empty", "train_dataloader is empty"),
    ("modalities", "3 modalities"),
    ("nan", "NaN/Inf"),
    ("labels", r"labels must lie in \[0, 1\].*got labels in \[0, 5\]"),
    ("task", "task must be one of"),
])
def test_bad_input_errors(case, match):
    tr, va = xor_loaders(n=64)
    enc, fus, head = parts()
    kwargs = {}
    if case == "empty":
        tr = DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, 5), torch.zeros(0).long()), batch_size=4)
    elif case == "modalities":
        tr = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 5), torch.randn(8, 5),
                                      torch.zeros(8).long()), batch_size=4)
    elif case == "nan":
        a = torch.randn(8, 3)
        a[3, 1] = math.nan
        tr = DataLoader(TensorDataset(a, torch.randn(8, 5), torch.zeros(8).long()), batch_size=4)
    elif case == "labels":
        tr = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 5), torch.tensor([0, 1, 5, 0, 1, 0, 1, 0])),
                        batch_size=8)
    elif case == "task":
        kwargs["task"] = "ranking"
    with pytest.raises(ValueError, match=match):
        train(enc, fus, head, tr, va, 1, save=None, **kwargs)


def test_nonfinite_loss_raises():
    tr, va = xor_loaders(n=64)
    enc, fus, head = parts()
    with pytest.raises(FloatingPointError, match="training loss became nan"):
        train(enc, fus, head, tr, va, 1, save=None, objective=lambda p, t, a: p.sum() * math.nan)


def test_device_argument_cpu_and_bad_device():
    tr, va = xor_loaders(n=64)
    enc, fus, head = parts()
    res = train(enc, fus, head, tr, va, 1, save=None, device="cpu")
    assert next(res.model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="device"):
        train(*parts(), tr, va, 1, save=None, device="tpu9")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")
def test_cuda_training():
    tr, va = xor_loaders(n=128)
    res = train(*parts(), tr, va, 2, save=None, device="cuda")
    assert next(res.model.parameters()).is_cuda
    assert run_test(res.model, va, no_robust=True)["Accuracy"] >= 0.0


def test_seed_makes_runs_repeatable():
    def run():
        torch.manual_seed(3)
        tr, va = xor_loaders(n=128)
        return train(*parts(), tr, va, 2, save=None, seed=5).history[-1]["train_loss"]

    assert run() == run()


def test_history_counts_deq_convergence():
    """DEQ non-convergence reaches the training history (fraction of training samples whose
    forward solve met the tolerance, and the largest residual)."""
    import torch
    from torch import nn

    from multizoo_ext.fusions import DEQFusion
    from multizoo_ext.objectives import deq_objective
    from multizoo_ext.training_structures import train

    torch.manual_seed(0)
    data = [[torch.randn(16, 4), torch.randn(16, 4), torch.randint(0, 2, (16,))] for _ in range(3)]
    fusion = DEQFusion([4, 4], width=8, f_max_iter=3)  # a cap too low to converge
    res = train([nn.Identity(), nn.Identity()], fusion, nn.Linear(8, 2), data, data, 2, save=None,
                progress=False, objective=deq_objective(), objective_args_dict={})
    for row in res.history:
        assert 0.0 <= row["train_solver_converged"] < 1.0 and row["train_solver_max_residual"] > 1e-3
    from multizoo_ext.fusions import Concat

    res = train([nn.Identity(), nn.Identity()], Concat([4, 4]), nn.Linear(8, 2), data, data, 1, save=None,
                progress=False)
    assert "train_solver_converged" not in res.history[0]
