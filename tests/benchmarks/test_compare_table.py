"""``benchmarks/compare_table.py``: the bar check's verdicts and paired differences on
hand-made runs, and the printed tables. Skipped when ``benchmarks/`` is absent."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.skipif(not BENCH.is_dir(), reason="benchmarks/ is not in this checkout")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_table", BENCH / "compare_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(dataset, method, seed, acc, stage=None):
    return {"dataset": dataset, "method": method, "seed": seed, "status": "ok", "stage": stage, "task": "classification",
            "kind": "fusion", "test": None if stage else {"accuracy": acc, "n": 10}, "seconds_per_epoch": 1.0,
            "peak_memory_mb": 0.0, "parameters": 1, "finished_at": f"2026-01-01T00:00:{seed:02d}"}


def _runs():
    runs = []
    for seed, (a, b, c, d) in enumerate([(0.90, 0.80, 0.91, 0.70), (0.92, 0.82, 0.93, 0.72), (0.94, 0.84, 0.95, 0.74)]):
        runs += [_run("x", "concat", seed, a), _run("x", "logreg", seed, b), _run("x", "deq", seed, c),
                 _run("x", "refnet", seed, d)]
    runs.append(_run("x", "deq", 9, 0.0, stage="search"))                # a search trial: never counted
    return runs


def test_bar_check_verdicts_and_paired_differences(script):
    runs = _runs()
    summary = script.summarize(runs)
    (deq,) = script.bar_check(runs, summary, "deq", script.DEFAULT_BASELINES, "accuracy")
    dataset, best, b_mean, m_mean, s, paired, verdict = deq
    assert (dataset, best, verdict) == ("x", "concat", "within one std")
    assert b_mean == pytest.approx(0.92) and m_mean == pytest.approx(0.93) and s == pytest.approx(0.02)
    assert paired[0] == pytest.approx(0.01) and paired[1] == pytest.approx(0.0, abs=1e-12)
    (refnet,) = script.bar_check(runs, summary, "refnet", script.DEFAULT_BASELINES, "accuracy")
    assert refnet[1] == "concat" and refnet[-1] == "behind" and refnet[5][0] == pytest.approx(-0.2)
    # with Concat ahead by more than one std, DEQ is ahead beyond noise against logistic regression alone
    (alone,) = script.bar_check(runs, summary, "deq", ["logreg"], "accuracy")
    assert alone[1] == "logistic regression" and alone[-1] == "ahead beyond noise"


def test_main_prints_the_tables_from_a_results_file(script, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"format": "x", "version": 2, "runs": _runs()}))
    script.main([str(path), "--f1"])
    out = capsys.readouterr().out
    assert "| concat | 0.920 ± 0.020 |" in out and "| logistic regression | 0.820 ± 0.020 |" in out
    assert "| deq | 1.00 (1.0x) |" in out and "| x | concat | 0.920 | 0.930 | +0.010 | 0.020 | +0.010 ± 0.000 | within one std |" in out
