"""Tests of the benchmark runner's search stage (multizoo_ext/runner/search.py): the same
trial budget for every method, selection on validation only, reproducible trials, resume,
space checks and the report. Tiny in-memory data, one or two epochs, 2-3 trials."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from multizoo_ext.registry import DATASETS
from multizoo_ext.runner import LOGREG, SINGLE_MODALITY, BenchmarkConfig, run_benchmark
from multizoo_ext.runner import options
from multizoo_ext.runner import run as bm
from multizoo_ext.runner.search import DEFAULT_SEARCH_SPACE, expand_trials, sample_trials

TINY = "search_tiny"
FLIPPED = "search_flipped"


def _loaders(batch_size: int = 32, seed: int = 0, flip_test: bool = False, n: int = 120):
    """Two modalities (5 and 3 features), 2 classes needing both; fixed data, 60/20/20 split,
    training order from ``seed``. ``flip_test``: the test split is the validation split with
    its labels flipped, so a model's test accuracy is 1 - its validation accuracy."""
    rng = np.random.default_rng(7)
    x1 = torch.from_numpy(rng.normal(size=(n, 5)).astype(np.float32))
    x2 = torch.from_numpy(rng.normal(size=(n, 3)).astype(np.float32))
    y = ((x1[:, 0] + x2[:, 0] + 0.7 * torch.from_numpy(rng.normal(size=n).astype(np.float32))) > 0).long()
    a, b = int(0.6 * n), int(0.8 * n)

    def make(lo: int, hi: int, shuffle: bool, flip: bool = False) -> DataLoader:
        ds = TensorDataset(x1[lo:hi], x2[lo:hi], 1 - y[lo:hi] if flip else y[lo:hi])
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(seed) if shuffle else None)

    test = make(a, b, False, flip=True) if flip_test else make(b, n, False)
    return make(0, a, True), make(a, b, False), test


@pytest.fixture(scope="module", autouse=True)
def datasets():
    DATASETS.register(TINY)(_loaders)
    DATASETS.register(FLIPPED)(lambda batch_size=32, seed=0: _loaders(batch_size, seed, flip_test=True))
    yield
    DATASETS._entries.pop(TINY, None)
    DATASETS._entries.pop(FLIPPED, None)


def _cfg(out: Path, **kw: Any) -> BenchmarkConfig:
    base: Dict[str, Any] = dict(datasets=[TINY], fusions=["concat"], seeds=[0, 1], epochs=1, batch_size=32,
                                hidden=16, embed_dim=8, output=str(out), plots=False, search_trials=2,
                                search_seed=3, search_space={"lr": {"log_uniform": [3e-4, 1e-2]},
                                                             "hidden": [8, 16], "logreg_c": {"log_uniform": [1e-3, 10]}})
    base.update(kw)
    return BenchmarkConfig(**base)


def _by_stage(runs: List[Dict[str, Any]], stage: str) -> List[Dict[str, Any]]:
    return [r for r in runs if r["stage"] == stage]


# ----------------------------------------------------------------------------- budget / report
@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    space = {**DEFAULT_SEARCH_SPACE, "hidden": [8, 16], "embed_dim": [4, 8]}
    runs = run_benchmark(_cfg(out, fusions=["concat", "refnet"], search_trials=3, search_space=space))
    return out, runs


def test_every_method_gets_the_same_trials_and_runs_the_chosen_settings(searched):
    out, runs = searched
    trials, finals = _by_stage(runs, "search"), _by_stage(runs, "final")
    methods = ["concat", "refnet", SINGLE_MODALITY, LOGREG]
    assert sorted((r["method"], r["trial"]) for r in trials) == sorted((m, i) for m in methods for i in range(3))
    assert all(r["seed"] == 3 and r["test"] is None and 0 <= r["valid_metrics"]["accuracy"] <= 1 for r in trials)
    assert sorted((r["method"], r["seed"]) for r in finals) == sorted((m, s) for m in methods for s in (0, 1))
    # each method samples its own keys only
    keys = {r["method"]: set(r["search"]["settings"]) for r in trials}
    assert keys["concat"] == keys[SINGLE_MODALITY] == {"lr", "weight_decay", "hidden", "embed_dim"}
    assert keys["refnet"] == keys["concat"] | {"objective_kwargs.refnet.ms_weight"}
    assert keys[LOGREG] == {"logreg_c"}
    for final in finals:
        info = final["search"]
        best = max((t for t in trials if t["method"] == final["method"]), key=lambda t: (t["valid_score"], -t["trial"]))
        assert info["trials"] == 3 and info["trial"] == best["trial"] and info["valid_score"] == best["valid_score"]
        assert info["settings"] == best["search"]["settings"]
        cfg = final["config"]
        if final["method"] == LOGREG:
            assert cfg["logreg_cs"] == [info["settings"]["logreg_c"]] and 0 <= final["test"]["accuracy"] <= 1
        else:
            assert (cfg["lr"], cfg["hidden"], cfg["embed_dim"]) == tuple(info["settings"][k] for k in
                                                                          ("lr", "hidden", "embed_dim"))
    refnet = [f for f in finals if f["method"] == "refnet"][0]
    assert refnet["config"]["objective_kwargs"]["ms_weight"] == refnet["search"]["settings"][
        "objective_kwargs.refnet.ms_weight"]
    # trials are their own runs in the store and marked in results.json
    stored = json.loads((out / "results.json").read_text())["runs"]
    assert len(stored) == 12 + 8 and sum(r["stage"] == "search" for r in stored) == 12
    assert len({r["config_hash"] for r in stored if r["stage"] == "search"}) == 12


def test_report_states_budget_and_chosen_settings_and_leaves_trials_out(searched):
    out, runs = searched
    md = (out / "results.md").read_text()
    assert "Tuning budget: 3 search trials per method" in md and "lr log-uniform in [0.0003, 0.01]" in md
    assert "objective_kwargs.refnet.ms_weight in {0, 0.1}" in md and "logreg_c log-uniform in [0.001, 10]" in md
    assert "Chosen settings on search_tiny" in md
    chosen_lines = [line for line in md.splitlines() if line.startswith("| concat | 3 |")]
    concat = [r for r in runs if r["method"] == "concat" and r["stage"] == "final"][0]["search"]
    assert len(chosen_lines) == 1 and f"lr={concat['settings']['lr']:g}" in chosen_lines[0]
    assert runs.summary and all(row["n"] == 2 for row in runs.summary)  # seeds only, no trials
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    for row in summary:
        assert row["search_trials"] == "3" and json.loads(row["chosen_settings"])
    row = [r for r in summary if r["method"] == "concat"][0]
    assert int(row["chosen_trial"]) == concat["trial"] and json.loads(row["chosen_settings"]) == concat["settings"]
    lines = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert sum(r["stage"] == "search" for r in lines) == 12 and sum(r["stage"] == "final" for r in lines) == 8
    assert all(r["valid_accuracy"] and not r["test_accuracy"] for r in lines if r["stage"] == "search")


# ----------------------------------------------------------------------------- validation only
def test_choice_uses_validation_not_test(tmp_path):
    """On FLIPPED the test split is the validation split with flipped labels: the trial best
    on validation is the worst on test, and it is the one chosen."""
    runs = run_benchmark(_cfg(tmp_path, datasets=[FLIPPED], seeds=[3], search_trials=3, epochs=2,
                              search_space={"lr": {"log_uniform": [1e-4, 3e-2]}, "logreg_c": [1e-4, 1e-2, 10.0]}))
    for method in ("concat", LOGREG):
        trials = [r for r in runs if r["method"] == method and r["stage"] == "search"]
        (final,) = [r for r in runs if r["method"] == method and r["stage"] == "final"]
        valid = [t["valid_metrics"]["accuracy"] for t in trials]
        test_of_trial = [1 - v for v in valid]  # what each trial would score on test
        assert len(set(valid)) > 1, valid  # the trials differ, so the two choices differ
        chosen = final["search"]["trial"]
        assert chosen == int(np.argmax(valid)) != int(np.argmax(test_of_trial))
        # the final run (same seed as the trials) reproduces the chosen trial: 1 - its validation accuracy
        assert final["test"]["accuracy"] == pytest.approx(test_of_trial[chosen])


# ----------------------------------------------------------------------------- reproducible
def test_trials_are_reproducible_and_independent_of_grid_order():
    one = _cfg(Path("unused"), datasets=[TINY, FLIPPED], fusions=["concat", "refnet"], search_trials=3,
               search_space=dict(DEFAULT_SEARCH_SPACE)).validated()
    two = _cfg(Path("unused"), datasets=[FLIPPED, TINY], fusions=["refnet", "concat", "lowrank"], search_trials=3,
               search_space=dict(DEFAULT_SEARCH_SPACE)).validated()

    def sampled(cfg: BenchmarkConfig) -> Dict[Any, Dict[str, Any]]:
        return {(r.dataset, r.method, r.trial): r.search["settings"] for r in expand_trials(cfg)}

    a, b = sampled(one), sampled(two)
    assert len(a) == 2 * 4 * 3 and all(b[k] == v for k, v in a.items())
    assert a[(TINY, "concat", 0)] != a[(FLIPPED, "concat", 0)]  # each (dataset, method) its own stream
    assert sample_trials(one.search_space, 3, 4, TINY, "concat") != sample_trials(one.search_space, 3, 3, TINY,
                                                                                 "concat")
    for settings in a.values():
        if "lr" in settings:
            assert 3e-4 <= settings["lr"] <= 1e-2 and settings["hidden"] in (32, 64, 128)
        else:
            assert 1e-3 <= settings["logreg_c"] <= 10


# ----------------------------------------------------------------------------- resume / jobs
def test_interrupted_search_resumes_with_finished_trials_and_jobs(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path / "a", baselines=False, fusions=["concat", "lowrank"], seeds=[0])
    real, calls = bm.execute, [0]

    def interrupted(*args: Any, **kwargs: Any):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(bm, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(cfg)
    monkeypatch.setattr(bm, "execute", real)
    assert len(list((tmp_path / "a" / "runs").glob("*.json"))) == 3  # three of the four trials
    resumed = run_benchmark(_cfg(tmp_path / "a", baselines=False, fusions=["concat", "lowrank"], seeds=[0], jobs=2))
    assert (resumed.reused, resumed.computed) == (3, 3)  # 1 trial + 2 final runs left
    fresh = run_benchmark(_cfg(tmp_path / "b", baselines=False, fusions=["concat", "lowrank"], seeds=[0]))
    assert (fresh.reused, fresh.computed) == (0, 6)
    for x, y in zip(resumed, fresh):
        assert (x["method"], x["stage"], x["config_hash"]) == (y["method"], y["stage"], y["config_hash"])
        assert x["valid_score"] == pytest.approx(y["valid_score"], abs=1e-6)
    again = run_benchmark(cfg)
    assert (again.reused, again.computed) == (6, 0)


# ----------------------------------------------------------------------------- checks
def test_unknown_space_keys_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown search_space key 'lrate'; valid keys: lr, weight_decay") as err:
        _cfg(tmp_path, search_space={"lrate": [1e-3]}).validated()
    assert "\n" not in str(err.value) and "fusion_lr_mult.FUSION" in str(err.value)
    with pytest.raises(ValueError, match="log_uniform needs"):
        _cfg(tmp_path, search_space={"lr": {"log_uniform": [0, 1]}}).validated()
    with pytest.raises(ValueError, match="lr must be > 0"):
        _cfg(tmp_path, search_space={"lr": [-1.0]}).validated()
    with pytest.raises(ValueError, match="unknown fusion|nope"):
        _cfg(tmp_path, search_space={"fusion_lr_mult.nope": [1.0]}).validated()
    with pytest.raises(ValueError, match="sweep axis 'lr' is also a search_space key"):
        _cfg(tmp_path, sweep={"lr": [1e-3, 1e-2]}).validated()
    with pytest.raises(ValueError, match="search_trials must be an integer >= 0"):
        _cfg(tmp_path, search_trials=-1).validated()
    bad = tmp_path / "bad.toml"
    bad.write_text("[search]\ntrials = 2\nrounds = 3\n")
    with pytest.raises(ValueError, match=r"unknown key 'rounds' in \[search\]; valid keys: trials, seed, space"):
        options.load_config_file(str(bad))


def test_search_table_and_cli_options(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('fusions = ["concat"]\n[search]\ntrials = 4\nseed = 9\n[search.space]\n'
                    'lr = {log_uniform = [1e-3, 1e-2]}\n"fusion_lr_mult.deq" = [0.1, 1.0]\n')
    kwargs, _ = options.load_config_file(str(path))
    cfg = BenchmarkConfig(**kwargs).validated()
    assert (cfg.search_trials, cfg.search_seed) == (4, 9)
    assert cfg.search_space == {"lr": {"log_uniform": [1e-3, 1e-2]}, "fusion_lr_mult.deq": [0.1, 1.0]}
    import argparse

    parser = argparse.ArgumentParser()
    options.add_benchmark_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--search-trials", "2"])
    cfg = options.config_from_args(args).validated()
    assert (cfg.search_trials, cfg.search_seed) == (2, 9)
