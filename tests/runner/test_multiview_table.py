"""examples/multiview_table.toml, the eight-dataset comparison table: the runner's config
loader accepts it, its entries, methods and search space are the intended ones (checked
without training), and with the shared data present every entry's loader finds its file."""
from __future__ import annotations

from pathlib import Path

import pytest

from multizoo_ext.registry import create_fusion
from multizoo_ext.runner import LOGREG, SINGLE_MODALITY, BenchmarkConfig, expand_runs, load_config_file
from multizoo_ext.runner import run as bm
from multizoo_ext.runner.search import describe_space, expand_trials, method_space, sample_trials

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "multiview_table.toml"
DATA = REPO.parent / "shared" / "data"

MAT_FILES = {"msrcv1": "MSRCV1", "orl": "ORL", "bbcsport": "BBCSport", "3-sources": "3-sources",
             "20newsgroups": "20newsgroups", "100leaves": "100Leaves"}
FUSIONS = ["concat", "lowrank", "tensor", "transformer", "refnet", "deq"]


@pytest.fixture(scope="module")
def cfg() -> BenchmarkConfig:
    kwargs, text = load_config_file(str(CONFIG))
    assert text == CONFIG.read_text()
    return BenchmarkConfig(**kwargs).validated()


def test_eight_named_entries_with_their_loaders_and_paths(cfg):
    assert cfg.datasets == ["digits", "rosmap", *MAT_FILES]
    assert cfg.dataset_loaders == {name: "mat" for name in MAT_FILES}
    assert cfg.loader_of("digits") == "digits" and cfg.loader_of("rosmap") == "rosmap"
    assert cfg.data_kwargs["rosmap"] == {"path": "../shared/data/ROSMAP"}
    for name, stem in MAT_FILES.items():
        assert cfg.data_kwargs[name] == {"path": f"../shared/data/multiview/{stem}.mat"}
        assert cfg.run_settings(name, "concat")["data_kwargs"]["path"].endswith(f"/{stem}.mat")
    assert "digits" not in cfg.data_kwargs                       # the bundled set takes no keywords


def test_methods_seeds_and_threads(cfg):
    assert cfg.fusions == FUSIONS
    assert cfg.methods() == FUSIONS + [SINGLE_MODALITY, LOGREG]  # both baselines, tuned like the fusions
    assert cfg.seeds == [0, 1, 2, 3, 4] and cfg.num_threads == 1 and cfg.baselines
    assert cfg.search_trials >= 1 and cfg.search_seed == 0
    assert len(expand_runs(cfg)) == 8 * 8 * 5
    assert len(expand_trials(cfg)) == 8 * 8 * cfg.search_trials  # the same budget for every method


def test_search_space_is_the_documented_one(cfg):
    space = cfg.search_space
    assert set(space) == {"lr", "weight_decay", "hidden", "embed_dim", "fusion_kwargs.refnet.inner",
                          "fusion_lr_mult.deq", "logreg_c"}
    assert space["lr"] == {"log_uniform": [3e-4, 1e-2]} and space["logreg_c"] == {"log_uniform": [1e-3, 10.0]}
    assert space["fusion_lr_mult.deq"] == [0.1, 1.0]
    assert {"concat", "lowrank", "transformer"} <= set(space["fusion_kwargs.refnet.inner"])
    assert "fusion_kwargs.refnet.inner in {concat, lowrank, transformer}" in describe_space(space)
    # each method samples only its own keys
    assert set(method_space(space, LOGREG)) == {"logreg_c"}
    assert set(method_space(space, SINGLE_MODALITY)) == {"lr", "weight_decay", "hidden", "embed_dim"}
    assert set(method_space(space, "refnet")) == {"lr", "weight_decay", "hidden", "embed_dim",
                                                  "fusion_kwargs.refnet.inner"}
    assert set(method_space(space, "deq")) == {"lr", "weight_decay", "hidden", "embed_dim", "fusion_lr_mult.deq"}


def test_every_inner_fusion_is_one_refnet_builds(cfg):
    for inner in cfg.search_space["fusion_kwargs.refnet.inner"]:
        fusion = create_fusion("refnet", input_dims=[8, 6, 4], inner=inner)
        assert fusion.out_dim > 0
    with pytest.raises(ValueError):
        create_fusion("refnet", input_dims=[8, 6], inner="no_such_fusion")


def test_a_refnet_trial_builds_its_sampled_inner_fusion(cfg):
    from multizoo_ext.builder import DataSpec

    trials = sample_trials(cfg.search_space, 12, cfg.search_seed, "orl", "refnet")
    inners = {t["fusion_kwargs.refnet.inner"] for t in trials}
    assert inners <= set(cfg.search_space["fusion_kwargs.refnet.inner"]) and len(inners) > 1
    run = next(r for r in expand_trials(cfg) if r.method == "refnet" and r.dataset == "orl")
    inner = run.search["settings"]["fusion_kwargs.refnet.inner"]
    assert run.config.fusion_kwargs["refnet"]["inner"] == inner
    spec = DataSpec([(6,), (5,)], "classification", 3)
    m = bm._build(run.config, spec, "refnet", 0)
    assert m.settings["fusion_kwargs"]["inner"] == inner


@pytest.mark.skipif(not DATA.is_dir(), reason="the shared data folder (../shared/data) is absent")
def test_every_entry_loads_through_the_runner_from_the_repository_root(cfg, monkeypatch):
    monkeypatch.chdir(REPO)  # the config's relative paths are read from the current folder
    for name, stem in MAT_FILES.items():
        assert (REPO / cfg.data_kwargs[name]["path"]).is_file(), stem
    assert (REPO / cfg.data_kwargs["rosmap"]["path"] / "labels_tr.csv").is_file()
    # the smallest .mat file through the runner's own loader call: the entry's path reaches the loader
    spec = bm._spec(cfg, "3-sources", 0)
    assert [s[0] for s in spec.input_shapes] == [3560, 3631, 3068] and spec.n_out == 6
