"""A full disk: a small tmpfs (mounted where the test may, else skipped). A write that does not
fit fails with an OSError and leaves what was written before whole and consistent."""
import errno
import os
import shutil
import subprocess

import pytest
import torch
from torch import nn

from multizoo_ext.checkpoint import load_checkpoint, save_checkpoint
from multizoo_ext.runner.store import ResultsStore


@pytest.fixture
def tiny_disk(tmp_path):
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder, keep_free: int = 0) -> None:
    """Write a filler file until the disk is full (minus ``keep_free`` bytes freed again)."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    if keep_free:
        os.truncate(folder / "filler", max(0, os.path.getsize(folder / "filler") - keep_free))


def test_checkpoint_that_does_not_fit_keeps_the_previous_one_whole(tiny_disk):
    small = nn.Linear(4, 2)
    path = tiny_disk / "best.pt"
    save_checkpoint(path, small, {"epoch": 1})
    _fill(tiny_disk, keep_free=8192)
    big = nn.Linear(256, 256)  # 257 KiB of weights: cannot fit
    with pytest.raises(OSError):
        save_checkpoint(path, big, {"epoch": 2})
    fresh = nn.Linear(4, 2)
    state, config = load_checkpoint(path, fresh)
    assert config["epoch"] == 1 and torch.equal(fresh.weight, small.weight)  # weights and config agree
    leftovers = sorted(p.name for p in tiny_disk.iterdir() if p.name not in ("best.pt", "best.json", "filler"))
    assert leftovers == [], leftovers


def test_results_store_keeps_every_finished_run_when_the_disk_fills(tiny_disk):
    store = ResultsStore(tiny_disk / "bench")
    entry = {"dataset": "d", "method": "m", "status": "ok", "config_hash": "h", "test": {"accuracy": 0.5}}
    written = 0
    with pytest.raises(OSError):
        for seed in range(100000):
            store.put({**entry, "seed": seed, "padding": "x" * 2000})
            written += 1
    assert written > 0
    runs = ResultsStore(tiny_disk / "bench").entries()
    seeds = sorted(r["seed"] for r in runs)
    assert seeds[:written] == list(range(written))  # every reported run is readable
