"""A run's result depends only on its settings: not on the order of the grid, on the runs
before it, on an interruption, or on the worker process (``jobs``). Entries are compared
exactly (test metrics, validation scores, per-epoch history), timing fields left out."""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any, Dict, List

import pytest

from multizoo_ext.runner import TIMING_KEYS, BenchmarkConfig, run_benchmark
from multizoo_ext.runner import run as run_module

GRID = dict(datasets=["digits"], fusions=["concat", "lowrank"], seeds=[0, 1], epochs=2, batch_size=128, hidden=16,
            embed_dim=8, logreg_cs=(0.05,), num_threads=1, plots=False)
_DROP = set(TIMING_KEYS) | {"seconds"}


def _stable(obj: Any) -> Any:
    """``obj`` without timing fields (at any depth)."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in _DROP}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def _by_key(runs: List[Dict[str, Any]]) -> Dict[tuple, Dict[str, Any]]:
    return {(r["dataset"], r["method"], r["seed"]): _stable(r) for r in runs}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Dict[tuple, Dict[str, Any]]:
    out = tmp_path_factory.mktemp("ordered")
    runs = run_benchmark(BenchmarkConfig(**GRID, output=str(out)))
    assert runs.computed == 8
    return _by_key(runs)


def test_grid_in_another_order_gives_identical_entries(reference, tmp_path):
    runs = run_benchmark(BenchmarkConfig(**{**GRID, "fusions": ["lowrank", "concat"], "seeds": [1, 0]},
                                         output=str(tmp_path)))
    assert _by_key(runs) == reference
    # one fusion alone equals the same fusion after another one
    alone = run_benchmark(BenchmarkConfig(**{**GRID, "fusions": ["lowrank"], "seeds": [1], "baselines": False},
                                          output=str(tmp_path / "alone")))
    assert _by_key(alone)[("digits", "lowrank", 1)] == reference[("digits", "lowrank", 1)]


def test_interrupted_and_resumed_grid_gives_identical_entries(reference, tmp_path, monkeypatch):
    real = run_module.train
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(BenchmarkConfig(**GRID, output=str(tmp_path)))
    monkeypatch.setattr(run_module, "train", real)
    runs = run_benchmark(BenchmarkConfig(**GRID, output=str(tmp_path)))
    assert 0 < runs.reused < 8
    assert _by_key(runs) == reference
    stored = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert _by_key(stored) == {k: {kk: vv for kk, vv in v.items() if kk != "variant"} for k, v in reference.items()}


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="workers are forked")
def test_jobs_2_gives_the_same_entries_as_jobs_1(reference, tmp_path):
    runs = run_benchmark(BenchmarkConfig(**GRID, jobs=2, output=str(tmp_path)))
    assert runs.computed == 8
    assert [(r["method"], r["seed"]) for r in runs] == [(m, s) for s in (0, 1) for m in
                                                        ("concat", "lowrank", "best-single-modality", "logreg")]
    assert _by_key(runs) == reference
    stored = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert _by_key(stored) == {k: {kk: vv for kk, vv in v.items() if kk != "variant"} for k, v in reference.items()}
