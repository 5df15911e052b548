"""DEQ fusion measurements: speed vs the authors' code, memory, convergence.

Thin wrapper: the code lives in :mod:`multizoo_ext.bench.deq` (installed with the package, also
run by ``multizoo-ext bench deq``); see its docstring for what is measured and
``benchmarks/deq_reference.md`` for running the reference.

Usage (from the repository root)::

    git clone <mirror of github.com/jinhong-ni/DEQFusion> /tmp/deqfusion   # outside the repo
    python benchmarks/bench_deq.py --reference /tmp/deqfusion --threads 1 --repeats 15 \\
        --out runs/bench_deq.json --plot docs/figures/deq_convergence.png
"""
from multizoo_ext.bench.deq import *  # noqa: F401,F403  (run, to_markdown, ... for importers)
from multizoo_ext.bench.deq import main

if __name__ == "__main__":
    main()  # returns the result dict; exit status 0, as before
