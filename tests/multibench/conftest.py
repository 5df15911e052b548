"""MultiBench itself, unmodified, running this package's fusions and objectives.

The MultiBench root is ``MULTIBENCH_PATH`` when set, else ``<repo>/../shared/third_party/MultiBench``
(a subset of MultiBench at commit 49f9be2: its ``training_structures``, ``fusions``,
``objective_functions``, ``unimodals``, ``datasets``, ``eval_scripts``, ``robustness``, ``utils`` and
``examples/multimedia``). The tests skip when neither exists.

MultiBench's top-level packages (``datasets``, ``fusions``, ``unimodals``, ...) share their names
with this repository's source folders, so MultiBench always runs in a subprocess whose working
directory is a temporary folder and whose ``PYTHONPATH`` holds the MultiBench root (and, where
torchvision is not installed, an empty stand-in: ``unimodals.common_models`` imports it at module
level but the encoders used here do not need it). This package comes from the installed
``multizoo_ext``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO.parent / "shared" / "third_party" / "MultiBench"
# imported by MultiBench's training_structures.Supervised_Learning (through eval_scripts)
MULTIBENCH_EXTRAS = ("memory_profiler", "matplotlib", "sklearn", "tqdm")

# Prelude of the subprocess scripts: a small learnable task, 3 classes, label = arg-max of a
# fixed random linear map of both modalities (chance about 1/3); train/valid/test 240/60/60.
SYNTHETIC_TASK = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    out_dir = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    n, k, widths = 360, 3, (6, 10)
    xs = [torch.randn(n, w, generator=g) for w in widths]
    y = sum(x @ torch.randn(x.shape[1], k, generator=g) for x in xs).argmax(1)   # needs both modalities
    train_dl = DataLoader(TensorDataset(*[x[:240] for x in xs], y[:240]), batch_size=32, shuffle=True, generator=g)
    valid_dl = DataLoader(TensorDataset(*[x[240:300] for x in xs], y[240:300]), batch_size=60)
    test_dl = DataLoader(TensorDataset(*[x[300:] for x in xs], y[300:]), batch_size=60)
    """
)


def find_multibench_root() -> Optional[Path]:
    """``MULTIBENCH_PATH`` if set, else the shared subset; None when it is not a MultiBench tree."""
    root = Path(os.environ.get("MULTIBENCH_PATH") or DEFAULT_ROOT)
    if (root / "training_structures" / "Supervised_Learning.py").is_file():
        return root
    return None


class MultiBench:
    """Runs Python code in a subprocess that imports MultiBench from ``root``."""

    synthetic_task = SYNTHETIC_TASK

    def __init__(self, root: Path, stub_dir: Path) -> None:
        self.root = root
        self.stub_dir = stub_dir

    def env(self) -> Dict[str, str]:
        paths: List[str] = [str(self.root)]
        if importlib.util.find_spec("torchvision") is None:
            paths.append(str(self.stub_dir))
        extra = os.environ.get("PYTHONPATH")
        if extra:
            paths.append(extra)
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}

    def run(self, argv: Sequence[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        """``python argv...`` in ``cwd`` with MultiBench importable; fails the test on a non-zero exit."""
        proc = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=self.env(), capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, (f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\n"
                                      f"STDERR:\n{proc.stderr[-4000:]}")
        return proc

    def run_code(self, code: str, cwd: Path, *args: Any, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(["-c", code, *map(str, args)], cwd, timeout=timeout)

    @staticmethod
    def result(proc: subprocess.CompletedProcess) -> Dict[str, Any]:
        """The JSON after the last ``RESULT `` line of a subprocess' stdout."""
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, proc.stdout[-3000:]
        return json.loads(lines[-1][len("RESULT "):])

    @staticmethod
    def printed(stdout: str, prefix: str) -> List[float]:
        """Every value MultiBench printed as ``<prefix><number>`` (e.g. ``'acc: '`` from ``test()``)."""
        return [float(ln[len(prefix):].split()[0]) for ln in stdout.splitlines() if ln.startswith(prefix)]


@pytest.fixture(scope="package")
def multibench_root() -> Path:
    root = find_multibench_root()
    if root is None:
        where = os.environ.get("MULTIBENCH_PATH") or DEFAULT_ROOT
        pytest.skip(f"no MultiBench tree at {where} (no training_structures/Supervised_Learning.py): "
                    "set MULTIBENCH_PATH to a MultiBench checkout")
    missing = [m for m in MULTIBENCH_EXTRAS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"MultiBench's train() imports {missing}: pip install memory_profiler matplotlib scikit-learn tqdm")
    return root


@pytest.fixture(scope="package")
def multibench(multibench_root: Path, tmp_path_factory: pytest.TempPathFactory) -> MultiBench:
    stub = tmp_path_factory.mktemp("torchvision_stub")
    (stub / "torchvision" / "models").mkdir(parents=True)
    (stub / "torchvision" / "__init__.py").write_text('"""empty stand-in: MultiBench imports it, unused here"""\n')
    (stub / "torchvision" / "models" / "__init__.py").write_text("")
    return MultiBench(multibench_root, stub)


def _load_sibling(name: str):
    """A helper module next to this file (tests run with ``--import-mode=importlib``, so the
    folder is not on ``sys.path``)."""
    spec = importlib.util.spec_from_file_location(f"_multibench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses / typing look the module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="package")
def mb_scripts():
    """``mb_scripts.py``: MultiBench example scripts with their fusion swapped, and tiny data."""
    return _load_sibling("mb_scripts")
