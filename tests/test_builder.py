"""One recipe per method, read by one builder; the registry passes None through; ReFNet cannot
go half-trained."""
import json
import warnings

import pytest
import torch
from torch import nn

from multizoo_ext import Recipe, create_dataset, create_fusion, get_recipe, seed_everything
from multizoo_ext.builder import DataSpec, build_method, infer_data_spec, rebuild_method
from multizoo_ext.checkpoint import load_checkpoint
from multizoo_ext.cli import main
from multizoo_ext.registry import Registry
from multizoo_ext.fusions import Concat, DEQFusion, ReFNet
from multizoo_ext.objectives import deq_objective, refnet_objective
from multizoo_ext.training_structures import train

SPEC = DataSpec([(5,), (7,)], "classification", 3)


def test_recipes_are_registered_with_their_methods():
    assert get_recipe("refnet").objective == "refnet"
    assert get_recipe("deq") == Recipe(objective="deq", objective_kwargs={"jacobian_weight": 1.0}, fusion_lr_mult=0.1)
    assert get_recipe("deq_paper") == Recipe(objective="deq", objective_kwargs={"jacobian_weight": 0.1},
                                             fusion_lr_mult=0.1)
    assert get_recipe("concat") == Recipe()


@pytest.mark.parametrize("name,weight", [("deq", 1.0), ("deq_paper", 0.1)])
def test_the_deq_recipes_weigh_the_jacobian_penalty_as_documented(name, weight):
    """The default layer trains with the objective's default weight (1.0), the published layer
    with the authors' MM-IMDB weight (0.1): the built objective is task loss + weight x penalty."""
    torch.manual_seed(0)
    m = build_method(SPEC, name)
    m.fusion.train()
    pred = m.head(m.fusion([enc(x) for enc, x in zip(m.encoders, (torch.randn(6, 5), torch.randn(6, 7)))]))
    truth = torch.tensor([0, 1, 2, 0, 1, 2])
    penalty = float(m.fusion.jac_loss.detach())
    assert penalty > 0
    loss = m.objective(pred, truth, {"deq": m.fusion, "training": True})
    expected = float(nn.functional.cross_entropy(pred, truth)) + weight * penalty
    assert float(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name,objective,mult,needs_args", [
    ("concat", "default", 1.0, False), ("lowrank", "default", 1.0, False),
    ("refnet", "refnet", 1.0, True), ("deq", "deq", 0.1, True)])
def test_build_method_follows_the_recipe(name, objective, mult, needs_args):
    m = build_method(SPEC, name)
    assert m.settings["objective"] == objective
    assert m.fusion_lr_mult == mult
    assert (m.objective_args_dict == {}) == needs_args
    if not needs_args:
        assert isinstance(m.objective, nn.CrossEntropyLoss)


def test_overrides_win_over_the_recipe():
    m = build_method(SPEC, "deq", objective="default", fusion_lr_mult=1.0, fusion_kwargs={"jac_reg": False})
    assert isinstance(m.objective, nn.CrossEntropyLoss) and m.objective_args_dict is None
    assert m.fusion_lr_mult == 1.0 and m.fusion.jac_reg is False
    with pytest.raises(ValueError, match="fusion_lr_mult must be a finite number > 0"):
        build_method(SPEC, "deq", fusion_lr_mult=-1.0)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        Recipe(fusion_lr_mult=0)
    with pytest.raises(ValueError, match="hidden must be an integer >= 1"):
        build_method(SPEC, "concat", hidden=0)


def test_library_defaults_compose():
    """DEQFusion(dims) with deq_objective(...) trains: the two defaults agree."""
    torch.manual_seed(0)
    fusion = DEQFusion([4, 6], width=8)
    head = nn.Linear(8, 3)
    objective = deq_objective(nn.CrossEntropyLoss())
    pred = head(fusion([torch.randn(5, 4), torch.randn(5, 6)]))
    loss = objective(pred, torch.tensor([0, 1, 2, 0, 1]), {"deq": fusion, "training": True})
    loss.backward()
    assert torch.isfinite(loss)


def test_registry_passes_none_through_and_names_valid_keywords():
    things = Registry("thing")

    @things.register("probe")
    def probe(input_dims, cap=1e-2):
        return cap

    assert things.create("probe", input_dims=[4], cap=None) is None  # None is a value, not "unset"
    assert things.create("probe", input_dims=[4]) == 1e-2
    with pytest.raises(ValueError, match="valid arguments: .*rank"):
        create_fusion("lowrank", input_dims=[4, 4], rnak=2)


def test_rebuild_from_settings_gives_the_same_modules():
    m = build_method(SPEC, "refnet", hidden=16, embed_dim=8, head_hidden=12, fusion_kwargs={"inner": "lowrank"})
    again = rebuild_method(m.settings)
    shapes = lambda mods: [tuple(p.shape) for mod in mods for p in mod.parameters()]  # noqa: E731
    assert shapes([*m.encoders, m.fusion, m.head]) == shapes([*again.encoders, again.fusion, again.head])
    assert again.settings == m.settings
    with pytest.raises(ValueError, match="lack 'spec'"):
        rebuild_method({"fusion": "concat"})


def _initial_refiners(seed: int) -> dict:
    """The refiner weights `multizoo-ext train --fusion refnet --seed S` starts from (same RNG path)."""
    seed_everything(seed)
    train_dl, _, _ = create_dataset("digits", batch_size=64, seed=seed)
    m = build_method(infer_data_spec(train_dl), "refnet")
    return {k: v.clone() for k, v in m.fusion.refiners.state_dict().items()}


def test_cli_train_refnet_trains_the_refiners(tmp_path):
    assert main(["train", "--fusion", "refnet", "--epochs", "1", "--quiet", "--output", str(tmp_path)]) == 0
    saved, _ = load_checkpoint(tmp_path / "best.pt")
    start = _initial_refiners(0)
    prefix = "fuse.refiners."
    trained = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    assert set(trained) == set(start) and len(start) == 12
    assert all(not torch.equal(trained[k], start[k]) for k in start), "some refiner tensor kept its initial value"


def _loaders(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, 5, generator=g), torch.randn(n, 7, generator=g)
    y = ((a[:, 0] + b[:, 0]) > 0).long()
    data = list(zip(a.split(32), b.split(32), y.split(32)))
    return [list(batch) for batch in data]


def test_refnet_without_its_objective_warns_once():
    torch.manual_seed(0)
    fusion = ReFNet(Concat([5, 7]), [5, 7])
    with pytest.warns(RuntimeWarning, match="refiners") as record:
        train([nn.Identity(), nn.Identity()], fusion, nn.Linear(12, 2), _loaders(), _loaders(seed=1), 2,
              save=None, progress=False)
    assert sum("refiners" in str(w.message) for w in record) == 1


def test_refnet_with_its_objective_does_not_warn():
    torch.manual_seed(0)
    fusion = ReFNet(Concat([5, 7]), [5, 7])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train([nn.Identity(), nn.Identity()], fusion, nn.Linear(12, 2), _loaders(), _loaders(seed=1), 2,
              objective=refnet_objective(), objective_args_dict={}, save=None, progress=False)


@pytest.mark.parametrize("fusion", ["concat", "refnet", "deq"])
def test_cli_train_and_the_runner_give_the_same_numbers(fusion, tmp_path):
    """One name, one method: `train --fusion X` and a benchmark run of X with the same seed and
    settings train the same model on the same batches."""
    from multizoo_ext.runner import BenchmarkConfig, run_benchmark

    args = ["train", "--fusion", fusion, "--dataset", "synthetic", "--data-arg", "n_samples=300", "--epochs", "2",
            "--seed", "3", "--quiet", "--output", str(tmp_path / "cli")]
    assert main(args) == 0
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    runs = run_benchmark(BenchmarkConfig(datasets=["synthetic"], data_kwargs={"synthetic": {"n_samples": 300}},
                                         fusions=[fusion], seeds=[3], epochs=2, baselines=False,
                                         output=str(tmp_path / "bench"), plots=False))
    entry = next(e for e in runs if e["method"] == fusion)
    assert entry["test"]["accuracy"] == cli["test"]["accuracy"]
    assert [h["train_loss"] for h in entry["history"]] == [h["train_loss"] for h in cli["history"]]
    assert entry["config"]["fusion_lr_mult"] == cli["method"]["fusion_lr_mult"]
