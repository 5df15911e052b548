"""Data-parallel scaling on one machine: time per epoch, samples/s and the communication share
of train() at 1 and N processes (gloo on CPU), for Concat, ReFNet and DEQ fusion.

The global batch is fixed (``--batch``; each of N processes reads ``batch / N``), so every
process count takes the same optimisation steps. Communication time is the wall time spent
inside ``torch.distributed`` collectives called from Python (the gradient all-reduce of the
default ``allreduce`` strategy, the gathers of validation outputs and of Multi-Similarity, the
loss reductions), summed over the run on rank 0; it includes waiting for the slower process.

Usage (from the repository root; one thread per process)::

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py --nproc 1 2 --out runs/bench_distributed.md
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torch.distributed as dist

METHODS = ("concat", "refnet", "deq")
_COMM = {"seconds": 0.0}


def _timed(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _COMM["seconds"] += time.perf_counter() - t0
    return wrapper


def _instrument() -> None:
    for name in ("all_reduce", "all_gather", "broadcast", "broadcast_object_list", "barrier"):
        setattr(dist, name, _timed(getattr(dist, name)))


def _build(method: str, width: int):
    from multizoo_ext.fusions.common_fusions import Concat
    from multizoo_ext.fusions.deq import DEQFusion
    from multizoo_ext.fusions.refnet import ReFNet
    from multizoo_ext.objectives import deq_objective, refnet_objective
    from multizoo_ext.unimodals.common_models import MLP

    torch.manual_seed(0)
    encoders = [MLP(width, 2 * width, width), MLP(width, 2 * width, width)]
    if method == "concat":
        fusion, objective = Concat([width, width]), torch.nn.CrossEntropyLoss()
    elif method == "refnet":
        fusion = ReFNet(Concat([width, width]), [width, width])
        objective = refnet_objective(ms_weight=0.1, ms_gather=True)
    else:
        fusion, objective = DEQFusion([width, width]), deq_objective()
    return encoders, fusion, torch.nn.Linear(fusion.out_dim, 2), objective


def worker(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """Train each method in this process (one of WORLD_SIZE); rank 0 returns the figures."""
    from multizoo_ext.registry import create_dataset
    from multizoo_ext.training_structures import distributed
    from multizoo_ext.training_structures.supervised import train

    torch.set_num_threads(1)
    multi = distributed.init_from_env()
    _instrument()
    world = distributed.world_size()
    out: Dict[str, Dict[str, float]] = {}
    for method in args.methods:
        train_dl, valid_dl, _ = create_dataset("synthetic", n_samples=args.samples, dims=(args.width, args.width),
                                               batch_size=args.batch // world, seed=0)
        encoders, fusion, head, objective = _build(method, args.width)
        _COMM["seconds"] = 0.0
        t0 = time.perf_counter()
        res = train(encoders, fusion, head, train_dl, valid_dl, args.epochs, objective=objective,
                    objective_args_dict={}, optimtype=torch.optim.AdamW, lr=1e-3, save=None, seed=0,
                    progress=False)
        total = time.perf_counter() - t0
        later = [h["seconds"] for h in res.history[1:]] or [res.history[0]["seconds"]]
        epoch_s = sum(later) / len(later)
        n_train = len(train_dl.dataset)
        out[method] = {"processes": world, "epoch_s": epoch_s, "samples_per_s": n_train / epoch_s,
                       "comm_share": _COMM["seconds"] / total, "valid_accuracy": res.history[-1]["valid_accuracy"]}
    if multi:
        dist.destroy_process_group()
    return out


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts (default: 1 2)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch", type=int, default=256, help="global batch (default: 256)")
    p.add_argument("--samples", type=int, default=3000, help="synthetic samples (default: 3000)")
    p.add_argument("--width", type=int, default=64, help="input and embedding width (default: 64)")
    p.add_argument("--epochs", type=int, default=3, help="epochs; the first is not timed (default: 3)")
    p.add_argument("--out", default=None, help="write the Markdown table here")
    p.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_json is not None:
        res = worker(args)
        if int(os.environ.get("RANK", "0")) == 0:
            with open(args.worker_json, "w") as fh:
                json.dump(res, fh)
        return
    rows: Dict[int, Dict[str, Dict[str, float]]] = {}
    passthrough = ["--methods", *args.methods, "--batch", str(args.batch), "--samples", str(args.samples),
                   "--width", str(args.width), "--epochs", str(args.epochs)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nproc:
            path = os.path.join(tmp, f"{n}.json")
            launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={n}"]
            subprocess.run(launcher + [os.path.abspath(__file__), *passthrough, "--worker-json", path], env=env,
                           check=True)
            with open(path) as fh:
                rows[n] = json.load(fh)
    lines = ["| method | processes | batch / process | s / epoch | samples / s | speed-up | comm. share |",
             "|---|---|---|---|---|---|---|"]
    for method in args.methods:
        base = rows[args.nproc[0]][method]["epoch_s"]
        for n in args.nproc:
            r = rows[n][method]
            lines.append(f"| {method} | {n} | {args.batch // n} | {r['epoch_s']:.3f} | {r['samples_per_s']:.0f} | "
                         f"{base / r['epoch_s']:.2f}x | {100 * r['comm_share']:.1f}% |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
