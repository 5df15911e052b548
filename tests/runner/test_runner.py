"""Tests of the benchmark runner (multizoo_ext/runner/) and its CLI subcommand.

A tiny in-memory dataset is registered for the duration of this module so the runner's
logic is tested independently of the real loaders; one smoke test uses the bundled digits.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from multizoo_ext.runner import LOGREG, RUN_KEYS, SINGLE_MODALITY, BenchmarkConfig, run_benchmark
from multizoo_ext.runner import options, report
from multizoo_ext.runner import run as bm
from multizoo_ext.cli import main
from multizoo_ext.registry import DATASETS, OBJECTIVES, list_datasets

TINY = "bench_tiny"


def _tiny_loaders(batch_size: int = 32, seed: int = 0, task: str = "classification", n: int = 150):
    """Two modalities (6 and 4 features), 3 classes (or a regression target) that need both;
    fixed data, 60/20/20 split, training order from ``seed``."""
    rng = np.random.default_rng(1234)
    x1 = rng.normal(size=(n, 6)).astype(np.float32)
    x2 = rng.normal(size=(n, 4)).astype(np.float32)
    if task == "regression":
        y = torch.from_numpy((x1[:, 0] + 0.5 * x2[:, 1]).reshape(-1, 1).astype(np.float32))
    else:
        y = torch.from_numpy(((x1[:, 0] + x2[:, 0] > 0).astype(np.int64) + (x1[:, 1] > 0.5)).astype(np.int64))
    xs = [torch.from_numpy(x1), torch.from_numpy(x2)]
    a, b = int(0.6 * n), int(0.8 * n)

    def make(lo: int, hi: int, shuffle: bool) -> DataLoader:
        ds = TensorDataset(*[x[lo:hi] for x in xs], y[lo:hi])
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(seed) if shuffle else None)

    return make(0, a, True), make(a, b, False), make(b, n, False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and far faster on a loaded 2-core machine (OpenMP /
    BLAS threads spin against other processes)."""
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):  # NumPy's BLAS too (logistic regression)
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def tiny_dataset():
    DATASETS.register(TINY)(_tiny_loaders)
    yield TINY
    DATASETS._entries.pop(TINY, None)


def _cfg(out: Path, **kw: Any) -> BenchmarkConfig:
    base: Dict[str, Any] = dict(datasets=[TINY], fusions=["concat", "lowrank"], seeds=[0, 1], epochs=2,
                                batch_size=32, hidden=16, embed_dim=8, output=str(out), plots=False)
    base.update(kw)
    return BenchmarkConfig(**base)


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_dataset):
    """One finished classification grid: 2 fusions + 2 baselines x 2 seeds."""
    out = tmp_path_factory.mktemp("bench")
    runs = run_benchmark(_cfg(out))
    return out, runs


def _load_runs(out: Path) -> List[Dict[str, Any]]:
    doc = json.loads((out / "results.json").read_text())
    assert doc["format"].startswith("multizoo-ext-benchmark/")
    return doc["runs"]


class _Counter:
    """Wraps a function and counts its calls (for monkeypatching train)."""

    def __init__(self, fn, fail_on: int = 0) -> None:
        self.fn, self.calls, self.fail_on = fn, 0, fail_on

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return self.fn(*args, **kwargs)


# ----------------------------------------------------------------------------- grid / JSON
def test_json_has_one_entry_per_dataset_method_seed_with_documented_keys(grid):
    out, runs = grid
    stored = _load_runs(out)
    keys = [(r["dataset"], r["method"], r["seed"]) for r in stored]
    expected = {(TINY, m, s) for m in ["concat", "lowrank", SINGLE_MODALITY, LOGREG] for s in [0, 1]}
    assert len(keys) == len(set(keys)) == 8 and set(keys) == expected
    assert len(runs) == 8 and runs.computed == 8 and runs.reused == 0
    for r in runs:
        assert set(RUN_KEYS) <= set(r), set(RUN_KEYS) - set(r)
    for r in stored:
        assert set(RUN_KEYS) - {"variant"} <= set(r), set(RUN_KEYS) - set(r)
        assert r["status"] == "ok" and r["task"] == "classification" and len(r["config_hash"]) == 16
        assert 0 <= r["test"]["accuracy"] <= 1 and r["test"]["n"] == 30
        assert r["parameters"] > 0 and r["total_seconds"] > 0
    fusions = [r for r in stored if r["kind"] == "fusion"]
    for r in fusions:
        assert r["epochs_run"] == 2 and len(r["history"]) == 2 and r["seconds_per_epoch"] > 0
        assert r["memory_measure"] in ("cpu_max_rss_growth", "cuda_max_allocated") and r["peak_memory_mb"] >= 0
        assert r["config"]["epochs"] == 2 and r["config"]["method"] == r["method"]
    # same config for both seeds of a method -> same hash; different methods -> different hashes
    by_method = {}
    for r in stored:
        by_method.setdefault(r["method"], set()).add(r["config_hash"])
    assert all(len(h) == 1 for h in by_method.values()) and len(set.union(*by_method.values())) == 4


def test_baseline_rows_present(grid):
    out, runs = grid
    single = [r for r in runs if r["method"] == SINGLE_MODALITY]
    logreg = [r for r in runs if r["method"] == LOGREG]
    assert len(single) == len(logreg) == 2
    for r in single:
        assert r["kind"] == "baseline" and len(r["per_modality"]) == 2
        scores = [p["valid_score"] for p in r["per_modality"]]
        assert r["modality"] == int(np.argmax(scores)) and r["valid_score"] == max(scores)
        assert r["test"] == r["per_modality"][r["modality"]]["test"]
        # one encoder + head only
        assert r["parameters"] == r["per_modality"][r["modality"]]["parameters"]
    for r in logreg:
        assert r["C"] in BenchmarkConfig().logreg_cs and set(r["valid_scores"]) == {repr(c) for c in
                                                                                   BenchmarkConfig().logreg_cs}
        assert r["epochs_run"] is None and r["parameters"] == 3 * (6 + 4) + 3  # coef (3 classes x 10) + intercepts
    md = (out / "results.md").read_text()
    assert "best single modality" in md and "logistic regression (concat features)" in md


def test_markdown_mean_std_matches_json_by_hand(grid):
    out, runs = grid
    stored = _load_runs(out)
    acc = [r["test"]["accuracy"] for r in stored if r["method"] == "concat"]
    f1 = [r["test"]["f1_macro"] for r in stored if r["method"] == "concat"]
    f1w = [r["test"]["f1_weighted"] for r in stored if r["method"] == "concat"]
    md = (out / "results.md").read_text()
    assert md == runs.markdown
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = next([c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("| concat "))
    cell = row[header.index("test accuracy")]
    assert cell == f"{statistics.mean(acc):.4f} ± {statistics.stdev(acc):.4f}"
    assert row[header.index("test F1 (macro)")] == f"{statistics.mean(f1):.4f} ± {statistics.stdev(f1):.4f}"
    assert row[header.index("test F1 (weighted)")] == f"{statistics.mean(f1w):.4f} ± {statistics.stdev(f1w):.4f}"
    assert header[2:6] == ["test accuracy", "test F1 (macro)", "test F1 (weighted)", "test AUROC"]
    assert row[header.index("runs")] == "2"
    params = next(r["parameters"] for r in stored if r["method"] == "concat")
    assert row[header.index("parameters")] == f"{params:,}"
    summary = next(s for s in runs.summary if s["method"] == "concat")
    assert summary["metrics"]["accuracy"] == pytest.approx((statistics.mean(acc), statistics.stdev(acc)))


# ----------------------------------------------------------------------------- resume
def test_second_run_recomputes_nothing(grid, tmp_path, monkeypatch):
    out, first = grid
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    train_calls = _Counter(bm.train)
    logreg_calls = _Counter(bm._run_logreg)
    monkeypatch.setattr(bm, "train", train_calls)
    monkeypatch.setattr(bm, "_run_logreg", logreg_calls)
    again = run_benchmark(_cfg(copy))
    assert train_calls.calls == 0 and logreg_calls.calls == 0
    assert again.computed == 0 and again.reused == 8
    assert [{k: v for k, v in r.items() if k != "variant"} for r in again] == _load_runs(out)
    assert again.markdown == first.markdown


def test_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch):
    real_train = bm.train
    interrupted = _Counter(real_train, fail_on=3)  # seed 0: concat, lowrank finish; seed 1 concat dies
    monkeypatch.setattr(bm, "train", interrupted)
    cfg = _cfg(tmp_path, baselines=False, epochs=1)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(cfg)
    half = _load_runs(tmp_path)
    assert [(r["method"], r["seed"]) for r in half] == [("concat", 0), ("lowrank", 0)]
    assert not list(tmp_path.glob("**/.*.tmp"))  # no temporary file left behind

    resumed_calls = _Counter(real_train)
    monkeypatch.setattr(bm, "train", resumed_calls)
    runs = run_benchmark(cfg)
    assert resumed_calls.calls == 2 and runs.computed == 2 and runs.reused == 2
    full = _load_runs(tmp_path)
    assert sorted((r["method"], r["seed"]) for r in full) == [("concat", 0), ("concat", 1), ("lowrank", 0),
                                                              ("lowrank", 1)]
    assert full[:2] == half  # finished entries kept untouched

    # a hand-trimmed (half-finished) JSON resumes too, and widening the grid runs only what is new
    for path in (tmp_path / "runs").glob("*-lowrank-*.json"):  # a run file removed by hand
        path.unlink()
    calls = _Counter(real_train)
    monkeypatch.setattr(bm, "train", calls)
    runs = run_benchmark(_cfg(tmp_path, baselines=False, epochs=1, seeds=[0, 1, 2]))
    assert calls.calls == 2 + 1 + 1  # lowrank seeds 0, 1 + concat and lowrank seed 2
    assert runs.reused == 2 and len(runs) == 6

    # a changed setting changes the hash: recomputed, older entries stay in the file
    calls = _Counter(real_train)
    monkeypatch.setattr(bm, "train", calls)
    runs = run_benchmark(_cfg(tmp_path, baselines=False, epochs=2, seeds=[0], fusions=["concat"]))
    assert calls.calls == 1 and runs.computed == 1
    assert len(_load_runs(tmp_path)) == 7 and len(runs) == 1

    # resume=False moves the old results aside (nothing deleted) and starts afresh
    runs = run_benchmark(_cfg(tmp_path, baselines=False, epochs=1, seeds=[0], fusions=["concat"], resume=False))
    assert runs.computed == 1 and len(_load_runs(tmp_path)) == 1
    assert runs.moved_to is not None and runs.moved_to.parent == tmp_path
    assert len(list((runs.moved_to / "runs").glob("*.json"))) == 7
    assert len(json.loads((runs.moved_to / "results.json").read_text())["runs"]) == 7


def test_unreadable_single_file_json_is_not_overwritten(tmp_path):
    (tmp_path / "results.json").write_text('{"runs": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        run_benchmark(_cfg(tmp_path))
    assert (tmp_path / "results.json").read_text() == '{"runs": ['


# ----------------------------------------------------------------------------- other tasks, hooks
def test_regression_rows_use_mse_mae_and_ridge(tmp_path):
    runs = run_benchmark(_cfg(tmp_path, fusions=["concat"], seeds=[0], epochs=1,
                              data_kwargs={TINY: {"task": "regression"}}))
    assert {r["task"] for r in runs} == {"regression"}
    assert all({"mse", "mae"} <= set(r["test"]) for r in runs)
    md = runs.markdown
    assert "test MSE" in md and "test MAE" in md and "ridge regression (concat features)" in md
    assert "regression" in md
    logreg = next(r for r in runs if r["method"] == LOGREG)
    assert logreg["selection_metric"] == "mse" and logreg["parameters"] == 10 + 1


def test_per_fusion_objective_hook(tmp_path):
    seen: Dict[str, Any] = {"factory": [], "calls": 0}

    def factory(task: str = "classification", scale: float = 1.0):
        seen["factory"].append((task, scale))
        ce = nn.CrossEntropyLoss()

        def objective(pred, truth, args):
            assert isinstance(args, dict) and "model" in args or args.get("training") is False
            seen["calls"] += 1
            return scale * ce(pred, truth.to(pred.device).long())

        return objective

    OBJECTIVES.register("bench_counting")(factory)
    try:
        runs = run_benchmark(_cfg(tmp_path, fusions=["concat", "lowrank"], seeds=[0], epochs=1, baselines=False,
                                  objectives={"concat": "bench_counting"},
                                  objective_kwargs={"concat": {"scale": 2.0}}))
    finally:
        OBJECTIVES._entries.pop("bench_counting", None)
    assert seen["factory"] == [("classification", 2.0)] and seen["calls"] > 0
    concat = next(r for r in runs if r["method"] == "concat")
    lowrank = next(r for r in runs if r["method"] == "lowrank")
    assert concat["config"]["objective"] == "bench_counting" and lowrank["config"]["objective"] == "default"
    assert concat["config"]["objective_kwargs"] == {"scale": 2.0}


def test_fail_fast_off_records_failures(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise FloatingPointError("loss became nan")

    monkeypatch.setattr(bm, "train", boom)
    torch.set_num_threads(2)
    try:
        runs = run_benchmark(_cfg(tmp_path, fusions=["concat"], seeds=[0], baselines=False, fail_fast=False,
                                  num_threads=1))
        assert torch.get_num_threads() == 2  # restored after the benchmark
    finally:
        torch.set_num_threads(1)
    assert runs[0]["torch_threads"] == 1
    assert runs[0]["status"] == "failed" and "loss became nan" in runs[0]["error"]
    assert runs.summary == []
    monkeypatch.undo()
    again = run_benchmark(_cfg(tmp_path, fusions=["concat"], seeds=[0], baselines=False, epochs=1))
    assert again.computed == 1 and again[0]["status"] == "ok"  # failed entries are retried


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("kwargs, match", [
    ({"fusions": ["nope"]}, r"unknown fusion 'nope'; known fusions: .*concat.*lowrank"),
    ({"datasets": ["nope"]}, r"unknown dataset 'nope'; known datasets: .*" + TINY),
    ({"seeds": []}, r"seeds must be a non-empty list"),
    ({"seeds": [0, -1]}, r"seeds must be non-negative integers"),
    ({"seeds": [1, 1]}, r"seeds must not repeat"),
    ({"fusions": []}, r"fusions must be a non-empty list"),
    ({"epochs": 0}, r"epochs must be an integer >= 1"),
    ({"fusions": ["logreg"]}, r"name of a baseline row"),
    ({"fusion_kwargs": {"nope": {}}}, r"unknown fusion 'nope'"),
    ({"objectives": {"concat": "nope"}}, r"unknown objective 'nope'; known objectives: .*refnet"),
    ({"fusion_lr_mult": {"deq": 0}}, r"fusion_lr_mult values must be finite numbers > 0"),
    ({"sweep": {"nope": [1]}}, r"sweep axis 'nope' is not a setting that can be swept; valid: epochs"),
    ({"sweep": {"lr": [1e-3, -1.0]}}, r"lr must be > 0"),
    ({"references": [{"dataset": TINY, "method": "x"}]}, r"lacks source"),
    ({"jobs": 0}, r"jobs must be an integer >= 1"),
    ({"logreg_cs": []}, r"logreg_cs must be a non-empty list"),
    ({"num_threads": 0}, r"num_threads must be None or an integer >= 1"),
])
def test_bad_config_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_benchmark(_cfg(tmp_path / "x", **kwargs))
    assert not (tmp_path / "x").exists()  # nothing written for a bad config


def test_quick_config_keeps_explicit_overrides():
    cfg = BenchmarkConfig.quick_config(epochs=1, output="o")
    assert cfg.quick and cfg.epochs == 1 and cfg.output == "o"
    assert cfg.datasets == ["digits"] and cfg.seeds == [0, 1] and cfg.fusions == ["concat", "refnet", "deq"]
    assert cfg.logreg_cs == (0.05,) and cfg.num_threads == 1


# ----------------------------------------------------------------------------- CLI
def test_cli_benchmark_prints_table_and_paths(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["benchmark", "--datasets", TINY, "--fusions", "concat", "--seeds", "0", "1",
               "--epochs", "1", "--hidden", "8", "--embed-dim", "4", "--output", str(out), "--no-plots",
               "--quiet", "--data-arg", f"{TINY}:n=120", "--logreg-c", "0.1", "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| method | runs | test accuracy |" in captured.out
    assert "| concat | 2 |" in captured.out and "| logistic regression (concat features) | 2 |" in captured.out
    assert str(out / "results.json") in captured.out and str(out / "results.md") in captured.out
    stored = _load_runs(out)
    assert len(stored) == 6 and all(r["test"]["n"] == 24 for r in stored)  # n=120 -> 24 test rows
    concat = next(r for r in stored if r["method"] == "concat")
    assert concat["config"]["data_kwargs"] == {"n": 120} and concat["config"]["epochs"] == 1
    assert next(r for r in stored if r["method"] == LOGREG)["C"] == 0.1
    assert all(r["torch_threads"] == 1 for r in stored)


def test_cli_options_become_config():
    from multizoo_ext.cli import build_parser

    args = build_parser().parse_args([
        "benchmark", "--quick", "--epochs", "3", "--fusion-arg", "lowrank:rank=2", "--fusion-arg",
        "lowrank:flatten=true", "--data-arg", "rosmap:path=C:/data/ROSMAP", "--objective", "concat=refnet",
        "--objective", "refnet=default", "--objective-arg", "concat:ms_weight=0.1", "--fusion-lr-mult", "lowrank=0.1",
        "--robustness", "--fresh", "--keep-going", "--no-baselines"])
    cfg = options.config_from_args(args)
    assert cfg.quick and cfg.epochs == 3 and cfg.datasets == ["digits"] and cfg.seeds == [0, 1]
    assert cfg.fusion_kwargs == {"lowrank": {"rank": 2, "flatten": True}}
    assert cfg.data_kwargs == {"rosmap": {"path": "C:/data/ROSMAP"}}
    assert cfg.objectives == {"concat": "refnet", "refnet": "default"}
    assert cfg.objective_kwargs == {"concat": {"ms_weight": 0.1}}
    assert cfg.fusion_lr_mult == {"lowrank": 0.1}
    assert cfg.robustness and not cfg.resume and not cfg.fail_fast and not cfg.baselines
    assert build_parser().parse_args(["benchmark", "-v", "--quick"]).verbose  # -v after the subcommand too
    plain = options.config_from_args(build_parser().parse_args(["benchmark"]))
    assert plain == BenchmarkConfig(progress=None)  # options left out keep the dataclass defaults


def test_method_recipe_comes_from_the_builder_and_overrides_sit_on_top(tmp_path):
    """The runner keeps only overrides; a run's config holds the effective method settings of
    build_method (the deq recipe: deq objective, fusion at 0.1 x lr), and its hash covers them."""
    from multizoo_ext.builder import build_method
    from multizoo_ext.runner.run import _spec

    cfg = BenchmarkConfig(datasets=[TINY], fusions=["deq", "lowrank"], fusion_kwargs={"lowrank": {"rank": 2}}).validated()
    assert cfg.method_overrides("deq") == {"fusion_kwargs": {}, "objective": None, "objective_kwargs": {},
                                           "fusion_lr_mult": None}
    runs = run_benchmark(_cfg(tmp_path, fusions=["deq", "lowrank"], seeds=[0], epochs=1, baselines=False,
                              fusion_kwargs={"lowrank": {"rank": 2}}))
    deq, lowrank = runs
    recipe = build_method(_spec(cfg, TINY, 0), "deq", encoder="mlp", hidden=16, embed_dim=8).settings
    assert {k: deq["config"][k] for k in recipe} == recipe
    assert deq["config"]["objective"] == "deq" and deq["config"]["fusion_lr_mult"] == 0.1
    assert lowrank["config"]["fusion_kwargs"] == {"rank": 2} and lowrank["config"]["fusion_lr_mult"] == 1.0
    # an override equal to the recipe is the same run (the hash covers effective settings)
    same = run_benchmark(_cfg(tmp_path, fusions=["deq"], seeds=[0], epochs=1, baselines=False,
                              fusion_lr_mult={"deq": 0.1}, objectives={"deq": "deq"}))
    assert same.reused == 1 and same[0]["config_hash"] == deq["config_hash"]
    mine = run_benchmark(_cfg(tmp_path, fusions=["deq"], seeds=[0], epochs=1, baselines=False,
                              fusion_lr_mult={"deq": 1.0}, objectives={"deq": "default"}))
    assert mine.computed == 1 and mine[0]["config_hash"] != deq["config_hash"]
    assert mine[0]["config"]["objective"] == "default" and mine[0]["config"]["fusion_lr_mult"] == 1.0


def test_cli_benchmark_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["benchmark", "--fusions", "nope"])
    assert exc.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["benchmark", "--data-arg", "path=foo"])
    assert "expected NAME:KEY=VALUE" in capsys.readouterr().err
    rc = main(["benchmark", "--datasets", TINY, "--seeds", "-1", "--output", str(tmp_path)])
    assert rc == 2 and "seeds must be non-negative" in capsys.readouterr().err


def test_bench_subcommand_is_gone(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "ms"])
    assert exc.value.code == 2 and "invalid choice: 'bench'" in capsys.readouterr().err


def test_cli_help_lists_registry_choices(capsys):
    with pytest.raises(SystemExit):
        main(["benchmark", "--help"])
    text = capsys.readouterr().out
    for opt in ("--datasets", "--fusions", "--seeds", "--epochs", "--quick", "--robustness", "--data-arg",
                "--output", "--fusion-arg", "--objective"):
        assert opt in text
    assert "lowrank" in text and TINY in text
    assert "shared" not in text  # the data path is always the user's


# ----------------------------------------------------------------------------- plots, robustness, digits
def test_plots_written_next_to_json(grid, tmp_path):
    pytest.importorskip("matplotlib")
    _, runs = grid
    paths = report.make_plots(runs.summary, tmp_path)
    assert paths == [tmp_path / f"{TINY}_metrics.png"] and paths[0].stat().st_size > 1000


def test_robustness_recorded_per_modality(tmp_path):
    pytest.importorskip("multizoo_ext.datasets.robustness")
    levels = [0.0, 0.1, 0.2]
    runs = run_benchmark(_cfg(tmp_path, fusions=["concat"], seeds=[0, 1], epochs=1, baselines=False,
                              robustness=True, robustness_kwargs={"kinds": ["gaussian", "missing"],
                                                                  "levels": levels}, plots=True))
    for r in runs:
        rel = r["relative_robustness"]
        assert set(rel) == set(r["robustness"]) == {"modality_0:gaussian", "modality_1:gaussian",
                                                   "modality_0:missing", "modality_1:missing"}
        for setting, value in rel.items():
            curve = r["robustness"][setting]["Accuracy"]["curve"]
            assert len(curve) == 3 and curve[0] == pytest.approx(r["test"]["accuracy"])
            assert value == pytest.approx((curve[0] + 2 * curve[1] + curve[2]) * 0.05)  # trapezoid, step 0.1
    row = runs.summary[0]
    assert row["relative_robustness"]["modality_0:missing"][0] == pytest.approx(
        statistics.mean(r["relative_robustness"]["modality_0:missing"] for r in runs))
    assert row["robustness_curves"]["modality_0:missing"][0] == levels
    assert "Relative robustness" in runs.markdown and "modality_1:missing" in runs.markdown
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert tmp_path / f"{TINY}_robustness.png" in runs.figures


@pytest.mark.skipif("digits" not in list_datasets(), reason="the digits dataset is not registered")
def test_digits_smoke(tmp_path):
    runs = run_benchmark(BenchmarkConfig(datasets=["digits"], fusions=["concat"], seeds=[0], epochs=1,
                                         batch_size=512, output=str(tmp_path), plots=False, logreg_cs=(0.05,)))
    assert [r["method"] for r in runs] == ["concat", SINGLE_MODALITY, LOGREG]
    logreg = runs[-1]
    assert logreg["test"]["accuracy"] > 0.85 and not math.isnan(logreg["test"]["auroc"])
