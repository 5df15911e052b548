"""The measurement scripts, installed: ``multizoo-ext bench {ms,deq,refnet} [script args...]``.

Each measurement script of ``benchmarks/`` lives here as a module with a ``main(argv, prog)``
(its argparse command line, unchanged) and the functions behind it:

- ``ms``: :mod:`multizoo_ext.bench.multisimilarity` (``benchmarks/bench_multisimilarity.py``):
  Multi-Similarity loss speed, ours vs a naive loop vs pytorch-metric-learning;
- ``deq``: :mod:`multizoo_ext.bench.deq` (``benchmarks/bench_deq.py``): DEQ fusion training-step
  speed vs the authors' code, peak memory, convergence;
- ``refnet``: :mod:`multizoo_ext.bench.refnet` (``benchmarks/bench_refnet.py``): ReFNet accuracy,
  detach option, kNN agreement, label efficiency.

Why here and not in ``benchmarks/``: ``benchmarks/`` is a folder of the repository, not an
installed package, so an installed ``multizoo-ext`` could not import it (and the scripts are
not on ``sys.path`` outside the checkout). The code therefore moved into this subpackage, and
``benchmarks/bench_*.py`` became thin wrappers that re-export the module and call its ``main``,
so ``python benchmarks/bench_multisimilarity.py --batches 128 --budget 1`` and
``multizoo-ext bench ms --batches 128 --budget 1`` run the same code with the same arguments
and write the same output (the CLI only passes ``prog``, so that the usage line of
``--help``, and the command that ``deq`` records, read ``multizoo-ext bench ...``).

Importing this package imports no script: :func:`load` imports one on demand, so the CLI pays
only for the script it runs. The scripts themselves import only the runtime dependencies at
import time; the optional ones are imported where they are used: pytorch-metric-learning
(``ms``: its column reads ``n/a`` without it), matplotlib (``deq --plot``: a clear error
before measuring), a MultiBench checkout (``ms --multibench PATH``) and the DEQFusion
reference checkout (``deq --reference PATH``: skipped with a message when unusable).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Dict, Optional, Sequence

#: CLI name -> (module, one-line description).
SCRIPTS: Dict[str, Dict[str, str]] = {
    "ms": {"module": "multizoo_ext.bench.multisimilarity",
           "help": "Multi-Similarity loss speed: ours vs a naive loop vs pytorch-metric-learning "
                   "(benchmarks/bench_multisimilarity.py)"},
    "deq": {"module": "multizoo_ext.bench.deq",
            "help": "DEQ fusion: training-step speed vs the reference, peak memory, convergence "
                    "(benchmarks/bench_deq.py)"},
    "refnet": {"module": "multizoo_ext.bench.refnet",
               "help": "ReFNet: accuracy, detach option, kNN agreement, label efficiency "
                       "(benchmarks/bench_refnet.py)"},
}


def load(name: str) -> ModuleType:
    """The module of script ``name`` (a key of :data:`SCRIPTS`), imported now."""
    if name not in SCRIPTS:
        raise ValueError(f"unknown benchmark script {name!r}; choose from {', '.join(SCRIPTS)}")
    return importlib.import_module(SCRIPTS[name]["module"])


def run_script(name: str, argv: Sequence[str], prog: Optional[str] = None) -> int:
    """Run script ``name``'s ``main(argv, prog)`` and return an exit status.

    ``main`` returns 0 (``ms``) or its results dict (``deq``, ``refnet``; 0 here); argparse's
    ``SystemExit`` (``--help``, a bad argument) passes through unchanged.
    """
    result: Any = load(name).main(list(argv), prog=prog)
    return result if isinstance(result, int) else 0


__all__ = ["SCRIPTS", "load", "run_script"]
