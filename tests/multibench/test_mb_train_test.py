"""ReFNet and DEQ fusion inside MultiBench's own, unmodified ``train()`` / ``test()``, and how to
load the whole-model file that MultiBench's ``train()`` pickles.

Each test runs one subprocess (see ``conftest.py``) on its small learnable task
(``SYNTHETIC_TASK``: three classes, chance about 1/3).
"""
from __future__ import annotations

import textwrap

import pytest

_HEADER = textwrap.dedent(
    """
    from training_structures.Supervised_Learning import MMDL, train, test   # MultiBench
    from unimodals.common_models import MLP                                  # MultiBench
    from multizoo_ext.fusions import Concat, DEQFusion, ReFNet
    from multizoo_ext.objectives import deq_objective, refnet_objective

    def snapshot(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def changed(before, module):
        return sorted(k for k, v in module.state_dict().items() if not torch.equal(before[k], v))
    """
)

_REFNET = _HEADER + textwrap.dedent(
    """
    def build():
        torch.manual_seed(1)
        dims = [8, 12]
        encoders = [MLP(6, 16, 8), MLP(10, 16, 12)]
        return encoders, ReFNet(Concat(dims), dims), nn.Linear(sum(dims), k)

    import warnings

    def refnet_warnings(record):
        return sum("refiners" in str(w.message) for w in record)

    # MultiBench's default objective: the refiners get no gradient and stay at their init (one warning)
    encoders, fusion, head = build()
    before_plain = snapshot(fusion.refiners)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(encoders, fusion, head, train_dl, valid_dl, 1, optimtype=torch.optim.AdamW, lr=1e-2,
              save=out_dir + "/plain.pt")
    plain_changed, plain_warnings = changed(before_plain, fusion.refiners), refnet_warnings(record)

    # the ReFNet objective: task loss + refiner loss; MultiBench fills the dict every batch
    encoders, fusion, head = build()
    before = snapshot(fusion.refiners)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(encoders, fusion, head, train_dl, valid_dl, 5, optimtype=torch.optim.AdamW, lr=1e-2,
              objective=refnet_objective(nn.CrossEntropyLoss()), objective_args_dict={},
              save=out_dir + "/best.pt")
    refnet_changed, refnet_warned = changed(before, fusion.refiners), refnet_warnings(record)
    model = torch.load(out_dir + "/best.pt", weights_only=False)   # trusted: written just above
    test(model, test_dl, no_robust=True)
    print("RESULT " + json.dumps({"plain_changed": plain_changed, "refnet_changed": refnet_changed,
                                  "n_tensors": len(before), "plain_warnings": plain_warnings,
                                  "refnet_warnings": refnet_warned}))
    """
)

_DEQ = _HEADER + textwrap.dedent(
    """
    import warnings

    # the Jacobian penalty unused (MultiBench's default objective): one warning, then the recipe
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train([MLP(6, 16, 8), MLP(10, 16, 12)], DEQFusion([8, 12], 16), nn.Linear(16, k), train_dl, valid_dl, 1,
              optimtype=torch.optim.AdamW, lr=1e-2, save=out_dir + "/plain.pt")
    plain_warnings = sum("Jacobian penalty" in str(w.message) for w in record)
    torch.manual_seed(1)
    encoders = [MLP(6, 16, 8), MLP(10, 16, 12)]
    fusion = DEQFusion([8, 12], 16)          # width 16: unequal widths are projected inside
    head = nn.Linear(16, k)                  # sized to the DEQ width (fusion.out_dim)
    before = snapshot(fusion)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(encoders, fusion, head, train_dl, valid_dl, 8, optimtype=torch.optim.AdamW, lr=1e-2,
              objective=deq_objective(nn.CrossEntropyLoss()), objective_args_dict={}, save=out_dir + "/best.pt")
    recipe_warnings = sum("Jacobian penalty" in str(w.message) for w in record)
    model = torch.load(out_dir + "/best.pt", weights_only=False)   # trusted: written just above
    test(model, test_dl, no_robust=True)
    info = model.fuse.last_info
    print("RESULT " + json.dumps({"changed": len(changed(before, fusion)), "n_tensors": len(before),
                                  "out_dim": fusion.out_dim, "steps": info["steps"].tolist(),
                                  "max_iter": info["max_iter"], "plain_warnings": plain_warnings,
                                  "recipe_warnings": recipe_warnings}))
    """
)

_CHECKPOINT = _HEADER + textwrap.dedent(
    """
    from multizoo_ext.checkpoint import load_checkpoint, save_checkpoint

    out = {}
    for name in ("refnet", "deq"):
        torch.manual_seed(1)
        encoders = [MLP(6, 16, 8), MLP(10, 16, 12)]
        if name == "refnet":
            fusion, head = ReFNet(Concat([8, 12]), [8, 12]), nn.Linear(20, k)
            objective = refnet_objective(nn.CrossEntropyLoss())
        else:
            fusion, head, objective = DEQFusion([8, 12], 16), nn.Linear(16, k), deq_objective(nn.CrossEntropyLoss())
        save = f"{out_dir}/{name}.pt"
        train(encoders, fusion, head, train_dl, valid_dl, 1, optimtype=torch.optim.AdamW, lr=1e-2,
              objective=objective, objective_args_dict={}, save=save)
        r = {}
        # 1. the safe loaders refuse MultiBench's pickled whole model
        try:
            torch.load(save)                     # weights_only=True, torch's default since 2.6
            r["default_load"] = "loaded"
        except Exception as exc:
            r["default_load"] = type(exc).__name__
        try:
            load_checkpoint(save)
            r["load_checkpoint"] = "loaded"
        except ValueError as exc:
            r["load_checkpoint"] = str(exc)
        # 2. the README's way: unpickle only the file your own train() wrote, behind an explicit flag
        trust_checkpoint = True
        model = torch.load(save, weights_only=not trust_checkpoint)
        # 3. convert once to a state_dict + JSON config, then load that safely into a rebuilt MMDL
        save_checkpoint(f"{out_dir}/{name}_weights.pt", model, {"fusion": name})
        torch.manual_seed(123)                   # different init: the weights must come from the file
        encoders = [MLP(6, 16, 8), MLP(10, 16, 12)]
        if name == "refnet":
            fresh = MMDL(encoders, ReFNet(Concat([8, 12]), [8, 12]), nn.Linear(20, k))
        else:
            fresh = MMDL(encoders, DEQFusion([8, 12], 16), nn.Linear(16, k))
        differs_before = not torch.equal(fresh.head.weight, model.head.weight)
        _, config = load_checkpoint(f"{out_dir}/{name}_weights.pt", fresh)
        model.eval(); fresh.eval()
        x = [t.float() for t in next(iter(test_dl))[:-1]]
        with torch.no_grad():
            diff = float((model(x) - fresh(x)).abs().max())
        r.update(differs_before=differs_before, config=config, max_abs_diff=diff)
        out[name] = r
    print("RESULT " + json.dumps(out))
    """
)


def test_refnet_trains_its_refiners_in_multibench_train(multibench, tmp_path):
    proc = multibench.run_code(multibench.synthetic_task + _REFNET, tmp_path, tmp_path)
    r = multibench.result(proc)
    assert r["plain_changed"] == []                           # nn.CrossEntropyLoss alone: refiners untouched
    assert r["plain_warnings"] == 1 and r["refnet_warnings"] == 0   # ... and the user is told, once
    assert len(r["refnet_changed"]) == r["n_tensors"] > 0   # every refiner tensor trained
    accs = multibench.printed(proc.stdout, "acc: ")
    print("test accuracy", accs)
    assert len(accs) == 1 and accs[0] >= 0.6, proc.stdout[-2000:]               # chance about 0.33


def test_deq_fusion_trains_in_multibench_train_and_test(multibench, tmp_path):
    proc = multibench.run_code(multibench.synthetic_task + _DEQ, tmp_path, tmp_path)
    r = multibench.result(proc)
    assert r["out_dim"] == 16
    assert r["plain_warnings"] == 1 and r["recipe_warnings"] == 0   # an unused penalty is reported, once
    assert r["changed"] == r["n_tensors"] > 0                  # every fusion tensor was updated
    assert len(r["steps"]) == 60 and all(1 <= s <= r["max_iter"] for s in r["steps"])   # test() ran the solver
    accs = multibench.printed(proc.stdout, "acc: ")
    print("test accuracy", accs)
    assert len(accs) == 1 and accs[0] >= 0.5, proc.stdout[-2000:]


def test_multibench_checkpoint_loads_only_when_trusted_then_converts(multibench, tmp_path):
    r = multibench.result(multibench.run_code(multibench.synthetic_task + _CHECKPOINT, tmp_path, tmp_path))
    for name in ("refnet", "deq"):
        assert r[name]["default_load"] == "UnpicklingError", r[name]
        assert "not a state_dict checkpoint" in r[name]["load_checkpoint"], r[name]
        assert r[name]["differs_before"] and r[name]["config"] == {"fusion": name}
        assert r[name]["max_abs_diff"] == pytest.approx(0.0, abs=1e-6)
