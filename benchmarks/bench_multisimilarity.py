"""Multi-Similarity loss speed: ours (vectorised) vs a naive loop vs pytorch-metric-learning.

Thin wrapper: the code lives in :mod:`multizoo_ext.bench.multisimilarity` (installed with the
package, also run by ``multizoo-ext bench ms``); see its docstring for what is measured.

Usage (from the repository root)::

    python benchmarks/bench_multisimilarity.py
    python benchmarks/bench_multisimilarity.py --multibench /tmp/multibench --json runs/ms.json
"""
from multizoo_ext.bench.multisimilarity import *  # noqa: F401,F403  (run, to_markdown, ... for importers)
from multizoo_ext.bench.multisimilarity import main

if __name__ == "__main__":
    raise SystemExit(main())
