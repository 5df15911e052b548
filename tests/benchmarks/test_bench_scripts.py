"""The measurement scripts of ``benchmarks/`` (not installed), run from the repository root
as ``python benchmarks/bench_NAME.py ...``. They are imported by path here and their ``main``
called in-process on tiny sizes (one subprocess checks the optional imports and the script
entry point). Skipped when ``benchmarks/`` is absent (an installed package without the checkout).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
SCRIPTS = {"ms": "bench_multisimilarity", "deq": "bench_deq", "refnet": "bench_refnet"}

pytestmark = pytest.mark.skipif(not BENCH.is_dir(), reason="benchmarks/ is not in this checkout")
_LOADED: dict = {}


def load(name: str) -> ModuleType:
    """The script ``benchmarks/bench_<...>.py`` of ``name`` imported by path (once)."""
    if name not in _LOADED:
        spec = importlib.util.spec_from_file_location(SCRIPTS[name], BENCH / f"{SCRIPTS[name]}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[SCRIPTS[name]] = module
        spec.loader.exec_module(module)            # no __main__: nothing runs
        _LOADED[name] = module
    return _LOADED[name]


def run(name: str, argv):
    return load(name).main(list(argv), prog=f"bench_{name}")


def test_bench_ms_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "ms.json"
    threads = torch.get_num_threads()
    rc = run("ms", ["--batches", "32", "--budget", "0", "--dim", "16",
                    "--settings", "single10,multilabel23", "--json", str(out)])
    assert rc == 0
    assert torch.get_num_threads() == threads
    stdout = capsys.readouterr().out
    assert stdout.startswith("Multi-Similarity loss, forward + backward, CPU, 1 thread(s), dim 16")
    assert "| setting | batch | ours ms | eager ms | naive ms | PML ms |" in stdout
    assert "largest |loss - ours|" in stdout
    rows = json.loads(out.read_text())
    assert [(r["setting"], r["batch"], r["dim"]) for r in rows] == [("single10", 32, 16), ("multilabel23", 32, 16)]
    have_pml = importlib.util.find_spec("pytorch_metric_learning") is not None
    for r in rows:
        assert r["ours_ms"] > 0 and r["naive_ms"] > 0 and r["naive_over_ours"] > 0
        assert r["naive_err"] < 1e-5          # the loop computes the same loss as ours
        assert r["eager_ms"] > 0 and r["eager_err"] < 1e-5
        assert r["multibench_ms"] is None and r["multibench_status"] == "not run"
    single, multi = rows
    assert multi["pml_ms"] is None            # PML takes class indices only
    if have_pml:
        assert single["pml_ms"] > 0 and single["pml_err"] < 1e-5
    else:
        assert single["pml_ms"] is None


def test_bench_ms_exit_status_and_script_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        run("ms", ["--settings", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: bench_ms" in err and "unknown settings ['nope']" in err


@pytest.mark.parametrize("name, options", [("deq", ["--reference", "--quick", "--parts", "--plot"]),
                                           ("refnet", ["--parts", "--quick", "--json", "--from-json"]),
                                           ("ms", ["--batches", "--budget", "--settings", "--json"])])
def test_bench_script_help_is_the_scripts_own(name, options, capsys):
    with pytest.raises(SystemExit) as exc:
        run(name, ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: bench_{name} [-h]")
    for option in options:
        assert option in out


def test_deq_plot_without_matplotlib_fails_before_measuring(monkeypatch, capsys):
    deq = load("deq")
    real = importlib.util.find_spec
    monkeypatch.setattr(deq.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(deq, "run", lambda **kw: pytest.fail("measured without matplotlib"))
    with pytest.raises(SystemExit) as exc:
        run("deq", ["--quick", "--plot", "fig.png"])
    assert exc.value.code == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_scripts_import_without_optional_dependencies():
    """No optional package at import time; ``ms`` without pytorch-metric-learning reads n/a."""
    code = textwrap.dedent("""
        import runpy, sys
        for name in ("pytorch_metric_learning", "torchdeq", "matplotlib"):
            sys.modules[name] = None        # any import of them raises ImportError
        for script in ("bench_deq", "bench_refnet"):
            runpy.run_path(f"benchmarks/{script}.py", run_name="not_main")
        sys.argv = ["benchmarks/bench_multisimilarity.py", "--batches", "8", "--dim", "8", "--budget", "0",
                    "--settings", "single10"]
        runpy.run_path("benchmarks/bench_multisimilarity.py", run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table_row = next(line for line in proc.stdout.splitlines() if line.startswith("| single10 | 8 |"))
    assert "n/a" in table_row


def test_deq_paired_cell_shows_the_spread_of_the_per_repeat_ratios():
    deq = load("deq")
    row = {"speedup_paired_median": 3.3187,
           "speedup_paired_spread": {"q1": 3.12, "q3": 3.54, "min": 2.99, "max": 4.06}}
    assert deq._paired_cell(row) == "3.32x (IQR 3.12-3.54)"
    assert deq._paired_cell({"speedup_paired_median": 2.0,
                             "speedup_paired_spread": {"q1": None, "q3": None, "min": 1.9, "max": 2.1}}) == "2.00x"
    assert deq._paired_cell({}) == "-"
