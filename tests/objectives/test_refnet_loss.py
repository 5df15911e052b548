"""ReFNet objectives: locating the refiner, values by hand, labels, validation, errors, MultiBench's train()
(ReFNet and DEQ fusion in an unmodified MultiBench checkout, with the examples, when MULTIBENCH_PATH is set)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


# --------------------------------------------------------------------------- MultiBench's own train()
MULTIBENCH_EXTRAS = ("memory_profiler", "matplotlib", "sklearn", "tqdm")

_MB_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.getcwd())  # MultiBench is used from its checkout root
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from training_structures.Supervised_Learning import train, test
    from multizoo_ext.fusions.common_fusions import Concat
    from multizoo_ext.fusions.refnet import ReFNet
    from multizoo_ext.objectives.refnet import refnet_objective
    from multizoo_ext.unimodals.common_models import MLP

    out_dir = sys.argv[1]
    torch.manual_seed(0)
    n, k = 64, 3
    x1, x2 = torch.randn(n, 10), torch.randn(n, 1, 4, 4)
    y = torch.randint(0, k, (n,))
    y_multi = (torch.rand(n, k) < 0.4).float()

    def loaders(labels):
        ds = TensorDataset(x1, x2, labels)
        return DataLoader(ds, batch_size=16, shuffle=True), DataLoader(ds, batch_size=32)

    def encoders():
        return [MLP(10, 16, 8), nn.Sequential(nn.Flatten(), nn.Linear(16, 6))]

    def snapshot(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def changed(before, module):
        return all(not torch.equal(before[k], v) for k, v in module.state_dict().items() if k.endswith("weight"))

    results = {}
    variants = {
        "embedding_ms": dict(target="embedding", task="classification", ms=0.1),
        "input_target": dict(target="input", task="classification", ms=0.0),
        "multilabel_ms": dict(target="embedding", task="multilabel", ms=0.1),
    }
    for name, v in variants.items():
        torch.manual_seed(1)
        refnet = ReFNet(Concat([8, 6]), [8, 6], target=v["target"],
                        input_dims=[10, 16] if v["target"] == "input" else None)
        head = nn.Linear(14, k)
        before = snapshot(refnet.refiners)
        train_dl, valid_dl = loaders(y_multi if v["task"] == "multilabel" else y)
        save = os.path.join(out_dir, name + ".pt")
        train(encoders(), refnet, head, train_dl, valid_dl, 2, task=v["task"], optimtype=torch.optim.Adam,
              lr=1e-2, objective=refnet_objective(task=v["task"], ms_weight=v["ms"]),
              objective_args_dict={}, save=save)
        model = torch.load(save, weights_only=False)
        crit = nn.BCEWithLogitsLoss() if v["task"] == "multilabel" else nn.CrossEntropyLoss()
        test(model, valid_dl, no_robust=True, task=v["task"], criterion=crit)
        results[name] = changed(before, refnet.refiners)

    # MultiBench's own example style: plain Concat + a decoder passed as args['refiner'].
    torch.manual_seed(2)
    decoder = MLP(14, 32, 26)
    before = snapshot(decoder)
    train_dl, valid_dl = loaders(y)
    train(encoders(), Concat(), nn.Linear(14, k), train_dl, valid_dl, 2, [decoder], optimtype=torch.optim.Adam,
          lr=1e-2, objective=refnet_objective(), objective_args_dict={"refiner": decoder},
          save=os.path.join(out_dir, "decoder.pt"))
    results["args_refiner"] = changed(before, decoder)
    print("RESULT " + json.dumps(results))
    """
)


def _multibench_root() -> Path:
    """The MultiBench checkout of MULTIBENCH_PATH, or skip."""
    root = os.environ.get("MULTIBENCH_PATH")
    if not root:
        pytest.skip("MULTIBENCH_PATH is not set: point it at a MultiBench checkout (git clone of pliang279/MultiBench)")
    if not (Path(root) / "training_structures" / "Supervised_Learning.py").is_file():
        pytest.skip(f"MULTIBENCH_PATH={root} has no training_structures/Supervised_Learning.py")
    missing = [m for m in MULTIBENCH_EXTRAS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"MultiBench's train() imports {missing} (eval_scripts); pip install memory-profiler "
                    "matplotlib scikit-learn tqdm to run this test")
    return Path(root)


def _multibench_result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-3000:]
    return json.loads(line[-1][len("RESULT "):])


def test_multibench_train_runs_refnet(tmp_path):
    root = _multibench_root()
    proc = subprocess.run([sys.executable, "-c", _MB_SCRIPT, str(tmp_path)], cwd=root, capture_output=True,
                          text=True, timeout=300)
    results = _multibench_result(proc)
    assert results == {"embedding_ms": True, "input_target": True, "multilabel_ms": True, "args_refiner": True}


# --------------------------------------------------------------------------- DEQ fusion in MultiBench's own train()
_MB_DEQ_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.getcwd())  # MultiBench is used from its checkout root
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from training_structures.Supervised_Learning import train, test
    from multizoo_ext.fusions.deq import DEQFusion
    from multizoo_ext.objectives.deq import deq_objective
    from multizoo_ext.unimodals.common_models import MLP

    torch.set_num_threads(1)
    out_dir = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    n, k, widths = 360, 3, (6, 10)
    xs = [torch.randn(n, w, generator=g) for w in widths]
    y = sum(x @ torch.randn(x.shape[1], k, generator=g) for x in xs).argmax(1)   # needs both modalities
    train_dl = DataLoader(TensorDataset(*[x[:240] for x in xs], y[:240]), batch_size=32, shuffle=True, generator=g)
    valid_dl = DataLoader(TensorDataset(*[x[240:300] for x in xs], y[240:300]), batch_size=60)
    test_dl = DataLoader(TensorDataset(*[x[300:] for x in xs], y[300:]), batch_size=60)

    torch.manual_seed(1)
    encoders = [MLP(6, 16, 8), MLP(10, 16, 12)]                  # unequal widths: projected inside
    fusion = DEQFusion([8, 12], width=16, jac_reg=True)
    head = nn.Linear(fusion.out_dim, k)
    before = {name: p.detach().clone() for name, p in fusion.named_parameters()}
    fusion_ids = {id(p) for p in fusion.parameters()}
    groups = []

    def fusion_lr_optimizer(params, lr, weight_decay=0.0):   # MultiBench calls optimtype(params, lr=, weight_decay=)
        params = list(params)
        rest = [p for p in params if id(p) not in fusion_ids]
        fused = [p for p in params if id(p) in fusion_ids]
        opt = torch.optim.AdamW([{"params": rest}, {"params": fused, "lr": lr * 0.1}], lr=lr,
                                weight_decay=weight_decay)
        groups.extend((len(gr["params"]), gr["lr"]) for gr in opt.param_groups)
        return opt

    objective = deq_objective(nn.CrossEntropyLoss(), jacobian_weight=0.1)
    penalties, valid_calls = [], []

    def recording(pred, truth, args):
        loss = objective(pred, truth, args)
        task = F.cross_entropy(pred, truth.long().to(pred.device))
        if args["training"]:
            deq = args["model"].fuse
            penalties.append((float(loss - task), 0.1 * float(deq.jac_loss)))
        else:
            valid_calls.append(float(loss - task))
        return loss

    save = os.path.join(out_dir, "deq.pt")
    train(encoders, fusion, head, train_dl, valid_dl, 6, task="classification", optimtype=fusion_lr_optimizer,
          lr=1e-2, weight_decay=1e-2, objective=recording, objective_args_dict={}, save=save)
    trained = dict(fusion.named_parameters())
    model = torch.load(save, weights_only=False)
    assert model.fuse.last_info is None and model.fuse.jac_loss is None   # not pickled
    test(model, test_dl, no_robust=True)
    info = model.fuse.last_info                                          # set by test()'s forwards
    model.eval()
    with torch.no_grad():
        correct = sum(int((model([a.float(), b.float()]).argmax(1) == t).sum()) for a, b, t in test_dl)
    print("RESULT " + json.dumps({
        "groups": groups,
        "fusion_params": sum(1 for _ in fusion.parameters()),
        "changed": [name for name, p in trained.items() if not torch.equal(before[name], p.detach())],
        "n_params": len(before),
        "penalties": penalties,
        "valid_extra": valid_calls,
        "accuracy": correct / 60,
        "info_steps": info["steps"].tolist(),
        "info_rel": info["rel_residual"].tolist(),
        "info_converged": info["converged"].tolist(),
        "max_iter": info["max_iter"],
    }))
    """
)


def test_multibench_train_runs_deq(tmp_path):
    """MultiBench's unmodified train()/test() with DEQFusion(jac_reg=True) + deq_objective:
    the penalty is found through args['model'] and added in training only, the fusion trains
    (at 0.1 x lr through an optimtype factory), the pickled model reloads and learns."""
    root = _multibench_root()
    proc = subprocess.run([sys.executable, "-c", _MB_DEQ_SCRIPT, str(tmp_path)], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = _multibench_result(proc)
    # one optimiser, two groups: encoders + head at lr, every fusion parameter at 0.1 x lr
    assert len(r["groups"]) == 2 and r["groups"][1] == [r["fusion_params"], pytest.approx(1e-3)]
    assert r["groups"][0][1] == pytest.approx(1e-2)
    # every fusion tensor (projection, blocks, gate, injection weights) was updated
    assert len(r["changed"]) == r["n_params"]
    # 6 epochs x 8 batches of training; the objective added exactly 0.1 x the module's Hutchinson estimate
    assert len(r["penalties"]) == 48
    for added, expected in r["penalties"]:
        assert added == pytest.approx(expected, rel=1e-4, abs=1e-6) and expected > 0
    # validation calls get the task loss only
    assert r["valid_extra"] and all(abs(v) < 1e-6 for v in r["valid_extra"])
    # learned: 3 balanced-ish classes, chance about 0.33-0.4
    assert r["accuracy"] >= 0.5, r["accuracy"]
    # test() left per-sample solver statistics of its last batch on the module
    assert len(r["info_steps"]) == 60 and all(1 <= s <= r["max_iter"] for s in r["info_steps"])
    assert all(math.isfinite(v) and 0 <= v < 1 for v in r["info_rel"])
    assert sum(r["info_converged"]) >= 30


def _torchvision_stub(tmp_path: Path) -> dict:
    """Environment for a subprocess that imports MultiBench's ``unimodals.common_models``,
    which imports torchvision at module level (the MLP we use does not need it): an empty
    stand-in package on PYTHONPATH when torchvision itself cannot be imported."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    if probe.returncode != 0:
        stub = tmp_path / "stub"
        (stub / "torchvision" / "models").mkdir(parents=True)
        (stub / "torchvision" / "__init__.py").write_text('"""empty stand-in for MultiBench imports"""\n')
        (stub / "torchvision" / "models" / "__init__.py").write_text("")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stub), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize("example, epochs, min_acc", [("refnet_in_multibench.py", 4, 0.6),
                                                      ("deq_in_multibench.py", 4, 0.5)])
def test_multibench_examples_run(tmp_path, example, epochs, min_acc):
    """examples/*_in_multibench.py run from the root of an unmodified MultiBench checkout
    (MultiBench's MLP, train and test) and learn the random stand-in task (3 classes)."""
    root = _multibench_root()
    script = Path(__file__).resolve().parents[2] / "examples" / example
    proc = subprocess.run([sys.executable, str(script), "--epochs", str(epochs), "--save", str(tmp_path / "best.pt")],
                          cwd=root, capture_output=True, text=True, timeout=300, env=_torchvision_stub(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    accs = [float(ln.split()[-1]) for ln in proc.stdout.splitlines() if ln.startswith("acc: ")]
    assert len(accs) == 1 and accs[0] >= min_acc, proc.stdout[-2000:]
    assert (tmp_path / "best.pt").is_file()
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("checkpoint ") and ("3 refiners" in last or "converged" in last), last
