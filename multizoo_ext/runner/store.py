"""A results store that loses nothing: one file per finished run, plus an index.

Layout of a results folder::

    runs/<config_hash>-<dataset>-<method>-<seed>.json   one file per run (the truth)
    results.json                                       index: every run file's entry

- Each run file is written atomically (a temporary file in the same folder, flushed and
  fsync'ed, then renamed over the final name; the folder is fsync'ed after the rename), so a
  process killed at any instant leaves every finished run readable and never a half file.
- Several runners may write into one folder at once (different seeds, methods or machines
  sharing a file system): they never write the same file unless they run the same
  (settings, dataset, method, seed), in which case either complete copy wins.
- ``results.json`` is rebuilt from the run files under an advisory lock (``fcntl.flock``
  where available), and written atomically too: whichever runner rebuilds it last lists
  every run file written before, so the final index is complete. It is only an index: a
  missing or stale one is rebuilt from ``runs/``.
- :func:`move_aside` (``--fresh``) moves the old results into
  ``results.old-<timestamp>/`` instead of deleting them.
- A ``results.json`` of the single-file layout (no ``runs/`` folder) is split into run
  files on opening, so its runs are kept and reused.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from multizoo_ext import __version__
from multizoo_ext.checkpoint import _fsync_dir, atomic_write
from multizoo_ext.runner.config import jsonable

__all__ = ["ResultsStore", "atomic_write_text", "move_aside", "FORMAT"]

logger = logging.getLogger(__name__)

#: ``format`` field of ``results.json`` and of every run file.
FORMAT = "multizoo-ext-benchmark/2"
#: Files and folders :meth:`ResultsStore.move_aside` moves (what a benchmark writes).
RESULT_FILES = ("runs", "results.json", "results.md", "results.csv", "summary.csv", "config.json",
                "config.source.toml", "config.source.json")


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically and durably
    (:func:`multizoo_ext.checkpoint.atomic_write`: temp file, fsync, rename, fsync of the
    folder). A reader sees the old file or the new one."""
    atomic_write(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def _safe(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


class ResultsStore:
    """The runs of one results folder (see the module docstring).

    Args:
        folder: the results folder (created).
    Raises:
        ValueError: ``results.json`` of the single-file layout that is not valid JSON (it is
            left untouched: move it away, or start with ``--fresh``).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.runs_dir = self.folder / "runs"
        self.index_path = self.folder / "results.json"
        self._cache: Dict[str, Tuple[Tuple[int, int], Dict[str, Any]]] = {}  # name -> ((mtime_ns, size), entry)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.runs_dir.exists() and self.index_path.exists():
            self._import_single_file()
        self.runs_dir.mkdir(exist_ok=True)

    # ------------------------------------------------------------------ paths and reading
    def path_of(self, dataset: str, method: str, seed: int, config_hash: str) -> Path:
        """The run file of ``(dataset, method, seed)`` with settings hash ``config_hash``."""
        return self.runs_dir / f"{_safe(config_hash)}-{_safe(dataset)}-{_safe(method)}-{int(seed)}.json"

    @staticmethod
    def _read(path: Path) -> Optional[Dict[str, Any]]:
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("skipping unreadable run file %s", path)
            return None
        return entry if isinstance(entry, dict) else None

    def find(self, dataset: str, method: str, seed: int, config_hash: str) -> Optional[Dict[str, Any]]:
        """The finished (``status == "ok"``) entry of this run, if any."""
        path = self.path_of(dataset, method, seed, config_hash)
        if not path.exists():
            return None
        entry = self._read(path)
        return entry if entry is not None and entry.get("status") == "ok" else None

    def entries(self) -> List[Dict[str, Any]]:
        """Every readable run file's entry, in a stable order (finish time, then file name).
        Files unchanged since the last call (same modification time and size) are not read
        again, so rebuilding the index after each run stays cheap in a large grid."""
        found = []
        for path in sorted(self.runs_dir.glob("*.json")):
            try:
                st = path.stat()
            except OSError:  # replaced or moved meanwhile
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._cache.get(path.name)
            if cached is not None and cached[0] == stamp:
                found.append(cached[1])
                continue
            entry = self._read(path)
            if entry is not None:
                self._cache[path.name] = (stamp, entry)
                found.append(entry)
        found.sort(key=lambda e: str(e.get("finished_at") or ""))
        return found

    # ------------------------------------------------------------------ writing
    def put(self, entry: Dict[str, Any]) -> Path:
        """Write ``entry``'s run file atomically (replacing an earlier one of the same run),
        then rebuild the index."""
        path = self.path_of(entry["dataset"], entry["method"], entry["seed"], entry["config_hash"])
        atomic_write_text(path, json.dumps(jsonable(entry), indent=1, allow_nan=False) + "\n")
        self.rebuild_index()
        return path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: the final rebuild still lists every file
            yield
            return
        with open(self.folder / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def rebuild_index(self) -> List[Dict[str, Any]]:
        """Rewrite ``results.json`` from the run files (under the folder's lock); returns the runs."""
        with self._locked():
            runs = self.entries()
            doc = {"format": FORMAT, "version": __version__, "runs": runs}
            atomic_write_text(self.index_path, json.dumps(jsonable(doc), indent=1, allow_nan=False) + "\n")
        return runs

    def _import_single_file(self) -> None:
        """Split a ``results.json`` of the single-file layout into run files."""
        try:
            doc = json.loads(self.index_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.index_path} is not valid JSON ({exc}); move it away or pass resume=False "
                             "(--fresh, which moves it aside) to start a new benchmark there") from exc
        runs = doc.get("runs") if isinstance(doc, dict) else None
        if not isinstance(runs, list):
            raise ValueError(f"{self.index_path} is not a benchmark results file (expected an object with a 'runs' "
                             "list); move it away or pass resume=False (--fresh)")
        tmp = Path(tempfile.mkdtemp(prefix=".runs.", dir=self.folder))
        for entry in runs:
            if isinstance(entry, dict) and {"dataset", "method", "seed", "config_hash"} <= set(entry):
                name = self.path_of(entry["dataset"], entry["method"], entry["seed"], entry["config_hash"]).name
                atomic_write_text(tmp / name, json.dumps(jsonable(entry), indent=1) + "\n")
        os.replace(tmp, self.runs_dir)  # all or nothing
        _fsync_dir(self.folder)


def move_aside(folder: Path) -> Optional[Path]:
    """Move the benchmark results in ``folder`` (:data:`RESULT_FILES`, figures) into
    ``folder/results.old-<UTC timestamp>/``; nothing is deleted. Returns that folder, or None
    when there was nothing to move."""
    folder = Path(folder)
    present = [folder / name for name in RESULT_FILES if (folder / name).exists()]
    present += sorted(folder.glob("*.png"))
    runs_dir = folder / "runs"
    if not present or (present == [runs_dir] and not any(runs_dir.iterdir())):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = folder / f"results.old-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = folder / f"results.old-{stamp}-{n}"
    target.mkdir()
    for path in present:
        os.replace(path, target / path.name)  # same file system: a rename, nothing copied
    _fsync_dir(folder)
    logger.info("moved the earlier results to %s", target)
    return target
