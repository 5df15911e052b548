"""``benchmarks/deq_backward_direct.py`` runs and reports both solves with close gradients.
Skipped when ``benchmarks/`` is absent."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.skipif(not BENCH.is_dir(), reason="benchmarks/ is not in this checkout")


def test_one_epoch_reports_both_times_and_the_gradient_difference(capsys):
    spec = importlib.util.spec_from_file_location("deq_backward_direct", BENCH / "deq_backward_direct.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--epochs", "1", "--seed", "0"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.search(r"direct ([\d.]+) s, iterative ([\d.]+) s, ratio ([\d.]+); largest relative gradient difference ([\d.e+-]+)", line)
    assert m, line
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
    assert float(m.group(4)) < 0.5    # the same gradient up to the iterative solve's tolerance
