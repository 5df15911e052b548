"""The loops' guards: labels checked on every batch (a bad 3rd batch, in train, valid and
test), regression targets reshaped without broadcasting, arguments validated before any work,
NaN stops that keep and name the best checkpoint, pre-training checkpoints as it goes."""
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

from multizoo_ext.checkpoint import load_checkpoint
from multizoo_ext.fusions.common_fusions import Concat
from multizoo_ext.training_structures import NonFiniteLossError, pretrain, train
from multizoo_ext.training_structures import test as run_test
from multizoo_ext.training_structures.loop_utils import BestKeeper, check_number
from multizoo_ext.unimodals.common_models import MLP

B, N_BATCHES = 8, 4
WIDTH = {"classification": 3, "multilabel": 3, "regression": 1}


def _labels(task, g):
    if task == "classification":
        return torch.randint(0, 3, (B,), generator=g)
    if task == "multilabel":
        return torch.randint(0, 2, (B, 3), generator=g).float()
    return torch.randn(B, generator=g)  # (B,) targets for a (B, 1) head


def _bad(task, rule, y):
    y = y.clone()
    if rule == "float":
        y = y.float()
        y[1] = 0.5
    elif rule == "range":
        y[0] = 3  # a head of 3 outputs allows 0..2
    elif rule == "not01":
        y[0, 0] = 2.0
    elif rule == "width":
        y = torch.cat([y, y[:, :1]], 1)  # 4 columns for a head of 3
    elif rule == "shape":
        y = torch.stack([y, y], 1)  # (B, 2) for a (B, 1) head
    return y


def loader(task, rule=None, seed=0):
    """A list of N_BATCHES batches [a, b, y] (a loader); the 3rd breaks ``rule`` when given."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(N_BATCHES):
        y = _labels(task, g)
        if rule is not None and i == 2:
            y = _bad(task, rule, y)
        batches.append([torch.randn(B, 3, generator=g), torch.randn(B, 5, generator=g), y])
    return batches


def parts(task="classification", head_hidden=8):
    torch.manual_seed(0)
    return [nn.Linear(3, 4), nn.Linear(5, 4)], Concat(), MLP(8, head_hidden, WIDTH[task])


def objective_for(task):
    return {"classification": nn.CrossEntropyLoss(), "multilabel": nn.BCEWithLogitsLoss(),
            "regression": nn.MSELoss()}[task]


RULES = [("classification", "float", r"integral class indices, got non-integer values such as 0\.5"),
         ("classification", "range", r"must lie in \[0, 2\] for a head with 3 outputs, got labels in \[0, 3\]"),
         ("multilabel", "not01", r"multi-hot 0/1 values, got values such as 2"),
         ("multilabel", "width", r"labels have 4 columns but the head has 3 outputs"),
         ("regression", "shape", r"must hold 1 value\(s\) per sample .* shape \(8, 1\), got targets of shape \(8, 2\)")]


@pytest.mark.parametrize("split", ["train", "valid", "test"])
@pytest.mark.parametrize("task,rule,match", RULES)
def test_a_bad_third_batch_is_caught(split, task, rule, match):
    good, bad = loader(task), loader(task, rule)
    kw = dict(task=task, objective=objective_for(task), save=None, optimtype=torch.optim.SGD, lr=0.01)
    if split == "test":
        res = train(*parts(task), good, good, 1, **kw)
        with pytest.raises(ValueError, match=rf"^test batch 3: .*{match}"):
            run_test(res.model, bad, task=task, no_robust=True)
        return
    tr, va = (bad, good) if split == "train" else (good, bad)
    with pytest.raises(ValueError, match=rf"^epoch 0, {split} batch 3: .*{match}"):
        train(*parts(task), tr, va, 1, **kw)


def test_robustness_test_names_the_noise_level():
    res = train(*parts(), loader("classification"), loader("classification"), 1, save=None)
    curves = {"image": [loader("classification"), loader("classification", "range")]}
    with pytest.raises(ValueError, match=r"^test \(image, noise level 1\) batch 3: classification labels must lie"):
        run_test(res.model, curves)


def test_regression_b_targets_with_b1_head_learn_the_right_answer():
    g = torch.Generator().manual_seed(3)
    w = torch.tensor([1.5, -2.0, 0.5, 1.0, -1.0, 0.25, 2.0, 0.0])

    def batches(n):
        out = []
        for _ in range(n):
            a, b = torch.randn(32, 3, generator=g), torch.randn(32, 5, generator=g)
            out.append([a, b, torch.cat([a, b], 1) @ w + 0.3])  # (B,) noiseless linear targets
        return out

    tr, te = batches(8), batches(4)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a (B, 1) vs (B,) broadcast would warn here
        res = train([nn.Identity(), nn.Identity()], Concat(), nn.Linear(8, 1), tr, te, 60, task="regression",
                    objective=nn.MSELoss(), optimtype=torch.optim.Adam, lr=0.05, save=None)
        mse = run_test(res.model, te, task="regression", no_robust=True)["MSE"]
    var = float(torch.cat([t[-1] for t in te]).var())
    assert mse < 1e-4 * var  # broadcasting to (B, B) would fit the mean: MSE ~ var
    torch.testing.assert_close(res.model.head.weight.detach().reshape(-1), w, atol=1e-2, rtol=0)


class _Untouchable:
    """A loader that fails the test if the loop iterates it (arguments must be checked first)."""

    def __len__(self):
        return 1

    def __iter__(self):
        raise AssertionError("the loop started work before validating its arguments")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("kwargs,match", [
    ({"lr": 0.0}, r"lr must be a finite number > 0, got 0\.0"),
    ({"lr": -1e-3}, "lr must be a finite number > 0"),
    ({"lr": math.nan}, "lr must be a finite number > 0, got nan"),
    ({"lr": math.inf}, "lr must be a finite number > 0, got inf"),
    ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
    ({"fusion_lr_mult": -1}, "fusion_lr_mult must be a finite number > 0, got -1"),
    ({"fusion_lr_mult": 0}, "fusion_lr_mult must be a finite number > 0"),
    ({"fusion_lr_mult": math.inf}, "fusion_lr_mult must be a finite number > 0"),
    ({"total_epochs": 0}, "total_epochs must be an integer >= 1, got 0"),
    ({"total_epochs": 2.5}, "total_epochs must be an integer >= 1, got 2.5"),
    ({"total_epochs": True}, "total_epochs must be an integer >= 1, got True"),
    ({"patience": -1}, "patience must be an integer >= 0"),
    ({"clip_val": 0}, "clip_val must be a finite number > 0"),
    ({"seed": -3}, "seed must be an integer >= 0"),
    ({"head_hidden": 0}, r"head has a zero-sized parameter 'fc.weight' of shape \(0, 8\); every layer width"),
    ({"task": "ranking"}, "task must be one of"),
    ({"device": "tpu9"}, "device"),
])
def test_train_validates_arguments_before_any_work(kwargs, match):
    kwargs = dict(kwargs)
    epochs = kwargs.pop("total_epochs", 1)
    enc, fus, head = parts(head_hidden=kwargs.pop("head_hidden", 8))
    with pytest.raises(ValueError, match=match):
        train(enc, fus, head, _Untouchable(), _Untouchable(), epochs, save=None, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"encoders": []}, "encoders must be a non-empty list of modules"),
    ({"fusion": "concat"}, "fusion must be a torch.nn.Module, got str"),
    ({"objective": 3}, "objective must be a loss module or a callable"),
    ({"objective_args_dict": []}, "objective_args_dict must be None or a dict, got list"),
    ({"additional_optimizing_modules": nn.Linear(2, 2)}, "additional_optimizing_modules must be a list"),
    ({"optimtype": "adam"}, "optimtype must be an optimizer class"),
])
def test_train_rejects_wrong_types_before_any_work(kwargs, match):
    enc, fus, head = parts()
    args = {"encoders": enc, "fusion": fus, "head": head, **kwargs}
    with pytest.raises(TypeError, match=match):
        train(train_dataloader=_Untouchable(), valid_dataloader=_Untouchable(), total_epochs=1, save=None, **args)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_pretrain_validates_arguments_before_any_work():
    enc, fus, _ = parts()
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        pretrain(enc, fus, _Untouchable(), 1, lr=-1.0)
    with pytest.raises(ValueError, match="total_epochs must be an integer >= 1"):
        pretrain(enc, fus, _Untouchable(), 0)
    with pytest.raises(ValueError, match="encoders\\[1\\] has a zero-sized parameter"):
        pretrain([nn.Linear(3, 4), nn.Linear(5, 0)], fus, _Untouchable(), 1)


def test_nan_stop_names_the_kept_checkpoint_and_carries_the_history(tmp_path):
    calls = {"n": 0}

    def objective(pred, truth, args):  # NaN at epoch 2, batch 2 (4 training batches per epoch)
        loss = nn.functional.cross_entropy(pred, truth)
        if args["training"]:
            calls["n"] += 1
            if calls["n"] == 2 * N_BATCHES + 2:
                return loss * math.nan
        return loss

    path = tmp_path / "best.pt"
    with pytest.raises(FloatingPointError) as info:
        train(*parts(), loader("classification"), loader("classification", seed=1), 5, objective=objective,
              objective_args_dict={}, save=str(path), optimtype=torch.optim.Adam, lr=1e-2)
    err = info.value
    assert isinstance(err, NonFiniteLossError) and (err.epoch, err.batch) == (2, 2)
    assert len(err.history) == 2 and [h["epoch"] for h in err.history] == [0, 1]
    accs = [h["valid_accuracy"] for h in err.history]
    assert err.best_epoch == accs.index(max(accs))
    assert err.checkpoint == str(path) and err.result.best_score == max(accs)
    msg = str(err)
    assert msg.startswith("training loss became nan at epoch 2, train batch 2; training stopped and the weights "
                          f"of epoch {err.best_epoch} (best, score")
    assert f"saved at {path}" in msg
    sd, cfg = load_checkpoint(path)
    assert cfg["epoch"] == err.best_epoch
    for k, v in err.result.model.state_dict().items():  # the modules hold the kept weights again
        torch.testing.assert_close(v, sd[k])


def test_nan_in_the_first_epoch_says_nothing_was_kept():
    with pytest.raises(NonFiniteLossError, match="no epoch had finished, so no weights were kept") as info:
        train(*parts(), loader("classification"), loader("classification"), 2, save=None,
              objective=lambda p, t, a: p.sum() * math.nan)
    assert info.value.history == [] and info.value.best_epoch == -1 and info.value.checkpoint is None
    back = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries (parallel runners)
    assert str(back) == str(info.value) and back.best_epoch == -1 and (back.epoch, back.batch) == (0, 1)


def test_pretrain_nan_at_a_late_epoch_keeps_the_best_checkpoint(tmp_path):
    calls = {"n": 0}
    epochs, late = 10, 9

    def objective(pred, truth, args):  # label-free: shrink the fused embedding; NaN in epoch 9
        calls["n"] += 1
        loss = pred.pow(2).mean()
        return loss * math.nan if calls["n"] > late * N_BATCHES else loss

    enc, fus, _ = parts()
    path = tmp_path / "pre.pt"
    with pytest.raises(NonFiniteLossError, match=rf"pre-training loss became nan at epoch {late}, train batch 1; "
                                                 rf"training stopped and the weights of epoch {late - 1} "
                                                 rf"\(best, .*saved at {path}") as info:
        pretrain(enc, fus, loader("classification"), epochs, objective=objective, save=str(path), lr=1e-2)
    err = info.value
    assert err.best_epoch == late - 1 and len(err.history) == late and err.checkpoint == str(path)
    sd, cfg = load_checkpoint(path)
    assert cfg["epoch"] == late - 1 and cfg["stage"] == "pretrain"
    for k, v in err.result.model.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    assert torch.isfinite(enc[0].weight).all()  # the encoders passed in hold the kept weights, not NaN


def test_best_keeper_and_check_number():
    model = nn.Linear(2, 1)
    keeper = BestKeeper(model, higher_better=True)
    assert keeper.update(0, 0.5) and not keeper.update(1, math.nan) and not keeper.update(2, 0.4)
    kept = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert keeper.restore() and torch.equal(model.weight, kept) and keeper.best_epoch == 0
    assert "kept in memory only" in keeper.describe()
    assert not BestKeeper(model).restore()
    check_number("x", 3, 1, integer=True)
    with pytest.raises(ValueError, match="x must be a finite number >= 0, got '1'"):
        check_number("x", "1", 0)
