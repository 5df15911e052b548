"""ReFNet measurements: accuracy, detach option, label efficiency, kNN graph.

Thin wrapper: the code lives in :mod:`multizoo_ext.bench.refnet` (installed with the package,
also run by ``multizoo-ext bench refnet``); see its docstring for what is measured.

Usage (from the repository root)::

    python benchmarks/bench_refnet.py --json runs/bench_refnet.json --out runs/bench_refnet.md
    python benchmarks/bench_refnet.py --quick
"""
from multizoo_ext.bench.refnet import *  # noqa: F401,F403  (run_accuracy, to_markdown, ... for importers)
from multizoo_ext.bench.refnet import main

if __name__ == "__main__":
    main()  # returns the results dict; exit status 0, as before
