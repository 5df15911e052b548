"""Multi-Similarity loss speed: ours (vectorised) vs a naive loop vs pytorch-metric-learning.

Times one forward + backward on the CPU for each implementation, all in the same process and
the same run: a fixed thread count (1 by default), the implementations taking turns in
rounds (a block of calls each), the median per call over the rounds, measured by default in
process CPU time, so that other processes on a shared machine disturb the ratios as little
as possible (``--clock wall`` for wall time). Implementations:

- ``ours``: :class:`multizoo_ext.objectives.multisimilarity.MultiSimilarityLoss` as a user
  gets it: through the native CPU kernels where they are built (a C compiler is there; the
  header line says whether they were), else eager PyTorch.
- ``eager``: the same loss with the native kernels switched off (eager PyTorch ops only).
- ``naive``: a per-anchor Python loop in the style of MultiBench's
  ``objective_functions.contrast.MultiSimilarityLoss``: an outer loop over the anchors and an
  inner loop over the label columns that tests ``labels[i][k] == 1`` one element at a time
  (a tensor op per test), OR-ing the matching columns into the anchor's positive set; then
  boolean indexing of the anchor's similarity row, mining with ``min`` / ``max`` and one
  ``log(1 + sum(exp(...)))`` per side, the anchor losses summed and divided by B. It
  computes the same loss as ``ours`` (checked in every run: ``naive_err``). Single-label
  batches go through it as one-hot rows.
- ``pml``: ``pytorch_metric_learning.losses.MultiSimilarityLoss`` fed by
  ``miners.MultiSimilarityMiner`` (same values as ours, checked: ``pml_err``). It takes
  class indices only, so it is ``n/a`` for multi-hot labels.
- ``multibench`` (only with ``--multibench PATH``): MultiBench's own class, imported from a
  checkout at PATH. Its loss is not the same function (per-label anchors, other scales, no
  normalisation, see ``objectives/multisimilarity.py``); it is fed L2-normalised embeddings
  and multi-hot labels (one-hot for the single-label setting) and only its time is compared.
  It raises when a label column has no negative; such a cell reads ``error``.

Settings: ``multilabel23`` (23-label multi-hot, each label on with probability 0.1, as
MM-IMDB's genres) and ``single10`` (10 classes); batch 32 / 128 / 512; embedding dim 128.

Usage (from the repository root)::

    python benchmarks/bench_multisimilarity.py
    python benchmarks/bench_multisimilarity.py --multibench /tmp/multibench --json runs/ms.json

``run(...)`` returns one dict per (setting, batch) and ``to_markdown(rows)`` renders them, so
other code can call them. Optional: ``pytorch-metric-learning`` (imported inside :func:`run`; its
column reads ``n/a`` without it) and a MultiBench checkout (``--multibench PATH``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.nn import functional as F

from multizoo_ext import native
from multizoo_ext.objectives import multisimilarity_native
from multizoo_ext.objectives.multisimilarity import (
    DEFAULT_ALPHA,
    DEFAULT_BASE,
    DEFAULT_BETA,
    DEFAULT_EPSILON,
    MultiSimilarityLoss,
)

SETTINGS = {
    "multilabel23": {"kind": "multi", "labels": 23, "p": 0.1},
    "single10": {"kind": "single", "labels": 10},
}
DEFAULT_BATCHES = (32, 128, 512)
DEFAULT_DIM = 128
IMPLS = ("ours", "eager", "naive", "pml", "multibench")


def naive_loop_loss(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = DEFAULT_ALPHA,
                    beta: float = DEFAULT_BETA, base: float = DEFAULT_BASE,
                    epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """The same loss as ours, written as a MultiBench-style double loop.

    Args:
        embeddings: (B, D).
        labels: (B, K) multi-hot (one-hot for single-label data).
    """
    normed = F.normalize(embeddings, dim=1)
    sim = normed @ normed.T  # (B, B)
    batch, n_labels = labels.shape
    anchor_losses = []
    for i in range(batch):
        share = torch.zeros(batch, dtype=torch.bool)
        for k in range(n_labels):
            if labels[i][k] == 1:
                share = share | (labels[:, k] == 1)
        share[i] = False
        others = torch.ones(batch, dtype=torch.bool)
        others[i] = False
        pos = sim[i][share]
        neg = sim[i][others & ~share]
        if len(pos) == 0 or len(neg) == 0:
            continue  # mining keeps nothing for this anchor
        hard_neg = neg[neg + epsilon > pos.min()]
        hard_pos = pos[pos - epsilon < neg.max()]
        loss = embeddings.new_zeros(())
        if len(hard_pos) > 0:
            loss = loss + torch.log(1 + torch.exp(-alpha * (hard_pos - base)).sum()) / alpha
        if len(hard_neg) > 0:
            loss = loss + torch.log(1 + torch.exp(beta * (hard_neg - base)).sum()) / beta
        anchor_losses.append(loss)
    if not anchor_losses:
        return embeddings.sum() * 0
    return sum(anchor_losses) / batch


def _make_batch(setting: str, batch: int, dim: int, seed: int):
    spec = SETTINGS[setting]
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=gen)
    if spec["kind"] == "multi":
        multi_hot = (torch.rand(batch, spec["labels"], generator=gen) < spec["p"]).long()
        return emb, multi_hot, multi_hot, None
    classes = torch.randint(0, spec["labels"], (batch,), generator=gen)
    return emb, classes, F.one_hot(classes, spec["labels"]), classes


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _time_round_robin(steps: Dict[str, Callable[[], Any]], budget: float, clock: Callable[[], float],
                      block: float = 0.02, min_rounds: int = 3, max_rounds: int = 200) -> Dict[str, float]:
    """Median seconds per call of each step.

    The steps take turns (one block each per round, a block being as many calls as fit in
    about ``block`` seconds, at least one), so that a load that comes and goes on a shared
    machine hits every implementation alike. Rounds go on until ``budget`` seconds have
    passed (at least ``min_rounds``).
    """
    calls: Dict[str, int] = {}
    for name, step in steps.items():  # warm-up and block size
        step()
        t0 = clock()
        step()
        calls[name] = max(1, int(block / max(clock() - t0, 1e-9)))
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget):
        for name, step in steps.items():
            t0 = clock()
            for _ in range(calls[name]):
                step()
            samples[name].append((clock() - t0) / calls[name])
        rounds += 1
    return {name: statistics.median(values) for name, values in samples.items()}


def _fwd_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], emb: torch.Tensor) -> Callable[[], torch.Tensor]:
    leaf = emb.clone().requires_grad_(True)

    def step() -> torch.Tensor:
        leaf.grad = None
        loss = loss_fn(leaf)
        loss.backward()
        return loss.detach()

    return step


def _eager(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    with native.disabled():
        return fn(*args)


def _quiet(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    # MultiBench's loss calls math.isinf on a tensor that requires grad: one warning per call.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args)


def _load_multibench(path: str):
    """MultiBench's MultiSimilarityLoss class from a checkout at ``path`` (sys.path touched
    only here, and restored)."""
    root = str(Path(path).resolve())
    if not (Path(root) / "objective_functions" / "contrast.py").is_file():
        raise FileNotFoundError(f"no objective_functions/contrast.py under {root}; pass a MultiBench checkout")
    sys.path.insert(0, root)
    try:
        module = importlib.import_module("objective_functions.contrast")
    finally:
        sys.path.remove(root)
    return module.MultiSimilarityLoss


def run(batches: Sequence[int] = DEFAULT_BATCHES, settings: Sequence[str] = tuple(SETTINGS),
        dim: int = DEFAULT_DIM, threads: int = 1, seed: int = 0, budget: float = 3.0, clock: str = "cpu",
        multibench_path: Optional[str] = None, naive_max_batch: Optional[int] = None) -> List[Dict[str, Any]]:
    """Time forward + backward of each implementation.

    Args:
        batches: batch sizes.
        settings: keys of ``SETTINGS``.
        dim: embedding width.
        threads: ``torch.set_num_threads`` during the run (restored after).
        seed: data seed.
        budget: seconds of timing per (setting, batch), all implementations together (at
            least 3 rounds).
        clock: "cpu" (process CPU time, default: robust to other processes on a shared
            machine, valid with ``threads=1``) or "wall".
        multibench_path: a MultiBench checkout to time its class too; None skips it.
        naive_max_batch: skip the loops (naive, MultiBench) above this batch size.

    Returns:
        One dict per (setting, batch): ``{impl}_ms`` (median milliseconds or None),
        ``{impl}_over_ours`` (time ratio), ``eager_err`` / ``naive_err`` / ``pml_err``
        (absolute difference of the loss value from ours), ``multibench_status``, ``native``
        (whether ``ours`` ran on the native kernels).
    """
    try:
        from pytorch_metric_learning import losses as pml_losses
        from pytorch_metric_learning import miners as pml_miners
    except ImportError:  # optional dependency: the column reads n/a
        pml_losses = pml_miners = None
    mb_class = _load_multibench(multibench_path) if multibench_path else None

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: List[Dict[str, Any]] = []
    try:
        for setting in settings:
            for batch in batches:
                emb, labels, multi_hot, classes = _make_batch(setting, batch, dim, seed)
                row: Dict[str, Any] = {"setting": setting, "batch": batch, "dim": dim, "threads": threads,
                                       "native": multisimilarity_native.available()}
                ours = MultiSimilarityLoss()
                steps: Dict[str, Callable[[], torch.Tensor]] = {
                    "ours": _fwd_bwd(lambda e, y=labels: ours(e, y), emb),
                    "eager": _fwd_bwd(lambda e, y=labels: _eager(ours, e, y), emb)}
                loops_ok = naive_max_batch is None or batch <= naive_max_batch
                if loops_ok:
                    steps["naive"] = _fwd_bwd(lambda e, y=multi_hot: naive_loop_loss(e, y), emb)
                if classes is not None and pml_losses is not None:
                    pml_loss, pml_miner = pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner()
                    steps["pml"] = _fwd_bwd(
                        lambda e, y=classes, f=pml_loss, m=pml_miner: f(e, y, m(e, y)), emb)
                if mb_class is not None and loops_ok:
                    steps["multibench"] = _fwd_bwd(
                        lambda e, y=multi_hot, f=mb_class(): _quiet(f, F.normalize(e, dim=1), y), emb)
                reference = float(steps["ours"]())
                for impl in list(steps):
                    try:
                        value = float(steps[impl]())
                    except Exception as exc:  # MultiBench raises on a label column without negatives
                        row[f"{impl}_status"] = f"error: {type(exc).__name__}"
                        del steps[impl]
                        continue
                    if impl in ("eager", "naive", "pml"):
                        row[f"{impl}_err"] = abs(value - reference)
                for impl, seconds in _time_round_robin(steps, budget, CLOCKS[clock]).items():
                    row[f"{impl}_ms"] = seconds * 1e3
                for impl in IMPLS:
                    row.setdefault(f"{impl}_ms", None)
                    mine = row[f"{impl}_ms"]
                    row[f"{impl}_over_ours"] = (mine / row["ours_ms"]) if mine is not None and impl != "ours" else None
                row.setdefault("multibench_status", "ok" if row["multibench_ms"] is not None else "not run")
                rows.append(row)
    finally:
        torch.set_num_threads(old_threads)
    return rows


def _fmt(value: Optional[float], spec: str, na: str = "n/a") -> str:
    return na if value is None else format(value, spec)


def to_markdown(rows: Sequence[Dict[str, Any]]) -> str:
    """A markdown table of ``run``'s rows (times in ms, ratios = their time / ours)."""
    with_mb = any(r.get("multibench_ms") is not None or r.get("multibench_status", "").startswith("error")
                  for r in rows)
    head = ["setting", "batch", "ours ms", "eager ms", "naive ms", "PML ms"]
    if with_mb:
        head.append("MultiBench ms")
    head += ["naive / ours", "naive / eager", "PML / ours"]
    if with_mb:
        head.append("MultiBench / ours")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], str(r["batch"]), _fmt(r["ours_ms"], ".3f"), _fmt(r["eager_ms"], ".3f"),
                 _fmt(r["naive_ms"], ".1f"), _fmt(r["pml_ms"], ".3f")]
        if with_mb:
            status = r.get("multibench_status", "")
            cells.append(_fmt(r["multibench_ms"], ".1f", "error" if status.startswith("error") else "n/a"))
        by_eager = (r["naive_ms"] / r["eager_ms"]) if r["naive_ms"] and r["eager_ms"] else None
        cells += [_fmt(r["naive_over_ours"], ".0f") + ("x" if r["naive_over_ours"] else ""),
                  _fmt(by_eager, ".0f") + ("x" if by_eager else ""),
                  _fmt(r["pml_over_ours"], ".2f") + ("x" if r["pml_over_ours"] else "")]
        if with_mb:
            cells.append(_fmt(r["multibench_over_ours"], ".0f") + ("x" if r["multibench_over_ours"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command line (``python benchmarks/bench_multisimilarity.py``).

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
        prog: program name in the usage line (default: the running script's name).
    """
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)),
                        help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of: " + ", ".join(SETTINGS))
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM, help="embedding width (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds of timing per (setting, batch) (default: %(default)s)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="process CPU time (default; robust on a shared machine) or wall time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--multibench", metavar="PATH", default=None,
                        help="also time MultiBench's objective_functions.contrast.MultiSimilarityLoss from a checkout")
    parser.add_argument("--naive-max-batch", type=int, default=None, help="skip the loops above this batch")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    rows = run(batches=[int(b) for b in args.batches.split(",") if b], settings=settings, dim=args.dim,
               threads=args.threads, seed=args.seed, budget=args.budget, clock=args.clock,
               multibench_path=args.multibench, naive_max_batch=args.naive_max_batch)
    kernels = "native CPU kernels" if multisimilarity_native.available() else "eager (no native kernels)"
    print(f"Multi-Similarity loss, forward + backward, CPU, {args.threads} thread(s), dim {args.dim}, "
          f"{args.clock} clock, median per call, torch {torch.__version__}; ours: {kernels}")
    print(to_markdown(rows))
    worst = max((r.get("naive_err") or 0.0) for r in rows)
    worst_pml = max((r.get("pml_err") or 0.0) for r in rows)
    worst_eager = max((r.get("eager_err") or 0.0) for r in rows)
    print(f"\nlargest |loss - ours|: eager {worst_eager:.2e}, naive {worst:.2e}, PML {worst_pml:.2e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
