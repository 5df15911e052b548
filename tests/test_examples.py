"""The examples run as documented (short settings) and print what their docstrings promise.

``examples/*_in_multibench.py`` need MultiBench: ``tests/multibench/test_mb_examples.py`` runs
them from the shared MultiBench tree (or ``MULTIBENCH_PATH``).
"""
from __future__ import annotations

import json
import logging
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run_example(name: str, args, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_deq_digits_example(monkeypatch, capsys):
    out = _run_example("deq_digits.py", ["--epochs", 1], monkeypatch, capsys)
    acc = re.search(r"test accuracy ([0-9.]+)\s+macro F1 ([0-9.]+)\s+AUROC ([0-9.]+)\s+\(n=(\d+)\)", out)
    assert acc, out
    assert float(acc.group(1)) >= 0.3 and int(acc.group(4)) == 359, out      # 10 classes: chance 0.1
    assert "deq (deq objective, fusion lr x0.1)" in out  # the recipe the CLI and the runner use
    solver = re.search(r"solver on the (\d+) test samples \(cap (\d+) steps per stage, tolerance ([0-9.e-]+)\): "
                       r"steps mean ([0-9.]+) \+ ([0-9.]+) \(stages\) / max (\d+), relative residual median "
                       r"([0-9.e+-]+) / max ([0-9.e+-]+), converged ([0-9.]+) %", out)
    assert solver, out
    n, cap, _, mean_m, mean_f, top, median, worst, conv = solver.groups()
    assert int(n) == 359 and int(cap) == 55
    assert 1 <= float(mean_m) <= int(top) <= 55 and 1 <= float(mean_f) <= int(top)
    assert 0 < float(median) <= float(worst) < 1 and 0 <= float(conv) <= 100


def _fake_mogonet(root: Path, widths=(10, 12, 8), n_train=90, n_test=30, seed=0) -> Path:
    """A MOGONET-layout folder with a label that the first modality predicts."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    y = rng.integers(0, 2, n_train + n_test)
    for i, w in enumerate(widths, start=1):
        x = rng.random((n_train + n_test, w))
        x[:, 0] += 0.8 * y
        np.savetxt(root / f"{i}_tr.csv", x[:n_train], delimiter=",")
        np.savetxt(root / f"{i}_te.csv", x[n_train:], delimiter=",")
    np.savetxt(root / "labels_tr.csv", y[:n_train].astype(float))
    np.savetxt(root / "labels_te.csv", y[n_train:].astype(float))
    return root


def test_heldout_npz_example_recuts_mogonet_into_six_modalities(tmp_path, monkeypatch, capsys):
    folder = _fake_mogonet(tmp_path / "mogonet")
    out_dir = tmp_path / "run"
    quiet = logging.getLogger("multizoo_ext.training_structures")   # the example quietens it
    level = quiet.level
    try:
        out = _run_example("heldout_npz.py", ["--from-mogonet", folder, "--split", 4, 5, 3, "--epochs", 2,
                                              "--fusions", "concat", "deq", "--output", out_dir], monkeypatch, capsys)
    finally:
        quiet.setLevel(level)
    assert "6 modalities of widths [4, 6, 5, 7, 3, 5]" in out, out
    with np.load(out_dir / "data" / "train.npz") as tr, np.load(out_dir / "data" / "test.npz") as te:
        assert tr.files == te.files == ["m1a", "m1b", "m2a", "m2b", "m3a", "m3b", "labels"]
        assert [tr[k].shape for k in tr.files] == [(90, w) for w in (4, 6, 5, 7, 3, 5)] + [(90,)]
        assert te["labels"].shape == (30,)
    runs = json.loads((out_dir / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["concat", "deq", "best-single-modality", "logreg"]
    for r in runs:
        assert r["status"] == "ok" and r["test"]["n"] == 30          # the published test split is kept
        assert 0.0 <= r["test"]["accuracy"] <= 1.0
    assert runs[-1]["test"]["accuracy"] >= 0.8                       # the label is easy for logreg
    assert "| deq | 1 |" in out


def test_heldout_npz_split_columns_checks_the_split_point():
    mod = runpy.run_path(str(EXAMPLES / "heldout_npz.py"))          # defines, does not run main()
    a, b = mod["split_columns"](np.arange(12.0).reshape(2, 6), 2)
    assert a.shape == (2, 2) and b.shape == (2, 4) and b[0, 0] == 2.0
    for bad in (0, 6, 9):
        with pytest.raises(ValueError, match="inside the block"):
            mod["split_columns"](np.zeros((2, 6)), bad)
