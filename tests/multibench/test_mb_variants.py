"""MultiBench's unmodified train()/test() with this package's ReFNet (every refiner target,
Multi-Similarity, multilabel, a decoder passed as ``args['refiner']``) and DEQ fusion (the
Jacobian penalty through ``args['model']``, the fusion at 0.1 x lr through an ``optimtype``)."""
from __future__ import annotations

import math
import textwrap

import pytest

_MB_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from training_structures.Supervised_Learning import train, test
    from multizoo_ext.fusions import Concat, ReFNet
    from multizoo_ext.objectives import refnet_objective
    from multizoo_ext.unimodals import MLP

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


def test_multibench_train_runs_refnet_variants(multibench, tmp_path):
    """Refiner targets (embedding / raw input), Multi-Similarity, multilabel, and MultiBench's own
    style (plain Concat + a decoder in ``args['refiner']``): every refiner / decoder weight trains."""
    results = multibench.result(multibench.run_code(_MB_SCRIPT, tmp_path, tmp_path, timeout=300))
    assert results == {"embedding_ms": True, "input_target": True, "multilabel_ms": True, "args_refiner": True}


# --------------------------------------------------------------------------- DEQ fusion in MultiBench's own train()
_MB_DEQ_SCRIPT = textwrap.dedent(
    """
    from torch.nn import functional as F
    from training_structures.Supervised_Learning import train, test
    from multizoo_ext.fusions import DEQFusion
    from multizoo_ext.objectives import deq_objective
    from multizoo_ext.unimodals import MLP

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


def test_multibench_train_runs_deq_penalty_and_fusion_lr(multibench, tmp_path):
    """MultiBench's unmodified train()/test() with DEQFusion(jac_reg=True) + deq_objective:
    the penalty is found through args['model'] and added in training only, the fusion trains
    (at 0.1 x lr through an optimtype factory), the pickled model reloads and learns."""
    proc = multibench.run_code(multibench.synthetic_task + _MB_DEQ_SCRIPT, tmp_path, tmp_path, timeout=300)
    r = multibench.result(proc)
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
