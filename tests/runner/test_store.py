"""The results store loses nothing: concurrent runners into one folder, a runner killed with
SIGKILL at random instants, ``--fresh`` moving the old results aside. The runners are the
real CLI (``multizoo_ext.cli.main``) in forked processes (no second import of torch), on the
bundled digits dataset with tiny models and one epoch."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import List

import pytest

from multizoo_ext.cli import main
from multizoo_ext.runner import ResultsStore, move_aside
from multizoo_ext.runner.store import atomic_write_text

pytestmark = pytest.mark.skipif(sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
                                reason="POSIX signals and fork")

TINY_ARGS = ["--datasets", "digits", "--epochs", "1", "--hidden", "8", "--embed-dim", "4", "--batch-size", "256",
             "--logreg-c", "0.05", "--threads", "1", "--no-plots", "--quiet"]


def _child(argv: List[str], log_path: str) -> None:
    """A runner process: the CLI, its per-run log lines ("<dataset> / <method> / seed N: test
    ...", written after the run's file) to ``log_path``; stdout to ``log_path + '.out'``."""
    handler = logging.FileHandler(log_path)
    run_logger = logging.getLogger("multizoo_ext.runner.run")
    run_logger.addHandler(handler)
    run_logger.setLevel(logging.INFO)
    with open(log_path + ".out", "w") as fh:
        os.dup2(fh.fileno(), 1)
        sys.stdout = fh
        rc = main(["benchmark", *TINY_ARGS, *argv])
        fh.flush()
    os._exit(rc)


def _start(argv: List[str], log_path: Path) -> multiprocessing.Process:
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(argv, str(log_path)))
    proc.start()
    return proc


def _run_files(out: Path) -> List[dict]:
    files = sorted((out / "runs").glob("*.json"))
    return [json.loads(p.read_text()) for p in files]  # every file parses: no half-written run


def _index(out: Path) -> List[dict]:
    return json.loads((out / "results.json").read_text())["runs"]


def test_two_concurrent_runners_keep_all_runs(tmp_path):
    out = tmp_path / "shared_out"
    procs = [_start(["--fusions", "concat", "lowrank", "--seeds", *seeds, "--output", str(out)], tmp_path / f"{i}.log")
             for i, seeds in enumerate((["0", "1"], ["2", "3"]))]
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    runs = _run_files(out)
    keys = {(r["method"], r["seed"]) for r in runs}
    expected = {(m, s) for m in ("concat", "lowrank", "best-single-modality", "logreg") for s in range(4)}
    assert keys == expected and len(runs) == 16
    # the index lists every run (whichever runner rebuilt it last saw all files)
    assert {(r["method"], r["seed"]) for r in _index(out)} == expected
    assert not list(out.glob("**/.*.tmp"))


def test_sigkill_at_random_instants_keeps_finished_runs_and_resumes(tmp_path, capsys):
    rng = random.Random()
    argv = ["--fusions", "concat", "--no-baselines", "--seeds", "0", "1", "2", "3", "4"]
    for trial in range(3):
        out, log = tmp_path / f"trial{trial}", tmp_path / f"trial{trial}.log"
        delay = rng.uniform(0.2, 3.0)
        proc = _start([*argv, "--output", str(out)], log)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=60)
        assert proc.exitcode in (-signal.SIGKILL, 0)
        # every run the runner reported finished (logged after its file was written) is on disk
        reported = {int(line.rsplit("seed ", 1)[1].split(":")[0]) for line in log.read_text().splitlines()
                    if "digits / concat / seed" in line}
        on_disk = {r["seed"] for r in _run_files(out)} if (out / "runs").exists() else set()
        assert reported <= on_disk, (trial, delay, reported, on_disk)
        # resume to completion: the finished runs are reused, the rest computed
        assert main(["benchmark", *TINY_ARGS, *argv, "--output", str(out)]) == 0
        text = capsys.readouterr().out
        assert f"{5 - len(on_disk)} run(s) computed, {len(on_disk)} reused" in text, (trial, delay, text[-300:])
        assert {r["seed"] for r in _run_files(out)} == set(range(5))
        assert {r["seed"] for r in _index(out)} == set(range(5))


def test_fresh_moves_old_results_aside(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["benchmark", *TINY_ARGS, "--fusions", "concat", "--no-baselines", "--seeds", "0", "--output", str(out)]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    index_before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--fresh"]) == 0
    text = capsys.readouterr().out
    assert "1 run(s) computed, 0 reused" in text
    (old,) = out.glob("results.old-*")
    assert f"moved the earlier results to {old}" in text
    assert {p.name: p.read_bytes() for p in (old / "runs").glob("*.json")} == before
    assert (old / "results.json").read_bytes() == index_before
    assert (old / "results.md").exists() and (old / "config.json").exists()
    assert len(list((out / "runs").glob("*.json"))) == 1


def test_store_unit_behaviour(tmp_path):
    store = ResultsStore(tmp_path)
    entry = {"dataset": "d/x", "method": "m", "seed": 3, "config_hash": "abc", "status": "ok", "finished_at": "1"}
    path = store.put(entry)
    assert path == tmp_path / "runs" / "abc-d_x-m-3.json"  # odd characters made safe
    assert store.find("d/x", "m", 3, "abc") == entry and store.find("d/x", "m", 3, "other") is None
    failed = {**entry, "seed": 4, "status": "failed"}
    store.put(failed)
    assert store.find("d/x", "m", 4, "abc") is None  # failed runs are retried
    # an unreadable stray file is skipped, not fatal; the index lists the readable runs
    (tmp_path / "runs" / "zzz-broken.json").write_text("{")
    assert [r["seed"] for r in store.rebuild_index()] == [3, 4]
    # atomic_write_text replaces whole files
    atomic_write_text(tmp_path / "f.txt", "a" * 10)
    atomic_write_text(tmp_path / "f.txt", "b")
    assert (tmp_path / "f.txt").read_text() == "b"
    moved = move_aside(tmp_path)
    assert moved is not None and (moved / "runs" / "abc-d_x-m-3.json").exists() and (moved / "f.txt").exists() is False
    assert move_aside(tmp_path) is None  # nothing left to move


def test_single_file_results_json_is_split_into_run_files(tmp_path):
    runs = [{"dataset": "d", "method": "m", "seed": s, "config_hash": "h", "status": "ok", "finished_at": str(s)}
            for s in range(3)]
    (tmp_path / "results.json").write_text(json.dumps({"format": "multizoo-ext-benchmark/1", "runs": runs}))
    store = ResultsStore(tmp_path)
    assert [store.find("d", "m", s, "h")["seed"] for s in range(3)] == [0, 1, 2]
