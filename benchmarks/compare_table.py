"""One cross-dataset table from a benchmark's ``results.json``, and the bar check.

    python benchmarks/compare_table.py runs/multiview_table/results.json [--metric accuracy]

(or the output folder itself, to read the finished runs of a benchmark still running.)

Prints (markdown):

1. ``metric`` mean ± std over seeds, one row per method and one column per dataset, with
   macro and weighted F1 on the rows below when asked (``--f1``);
2. seconds per epoch of each trained method and its ratio to Concat's on the same dataset;
3. the bar check for ``--methods`` (default: ``deq refnet``) against the best baseline of each
   dataset (the best mean among ``--baselines``: the other fusions, logistic regression and
   the best single view). "Within one std" means ``mean - best >= -s`` and "ahead beyond
   noise" means ``mean - best > s``, with ``s`` the larger of the two methods' stds over
   seeds. The paired difference over the seeds both have (seed ``k`` of both methods sees the
   same split) is shown beside it.

Only test results of the seeded runs count (search trials are scored on validation and are
left out, as in the runner's own table).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from multizoo_ext.runner.config import LOGREG, SINGLE_MODALITY
from multizoo_ext.runner.report import summarize

LABELS = {LOGREG: "logistic regression", SINGLE_MODALITY: "best single view"}
#: Row order (methods not listed follow in the order they appear).
ORDER = ("concat", "lowrank", "tensor", "transformer", "refnet", "deq", LOGREG, SINGLE_MODALITY)
DEFAULT_BASELINES = ("concat", "lowrank", "tensor", "transformer", LOGREG, SINGLE_MODALITY)


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _per_seed(runs: Sequence[dict], dataset: str, method: str, metric: str) -> Dict[int, float]:
    return {r["seed"]: float(r["test"][metric]) for r in runs
            if r.get("status") == "ok" and r.get("stage") != "search" and r["dataset"] == dataset
            and r["method"] == method and r.get("test") and metric in r["test"]}


def bar_check(runs: Sequence[dict], summary: Sequence[dict], method: str, baselines: Sequence[str],
              metric: str) -> List[Tuple[str, str, float, float, float, Optional[Tuple[float, float]], str]]:
    """Per dataset: ``(dataset, best baseline, its mean, method mean, one std, paired diff, verdict)``."""
    out = []
    by = {(r["dataset"], r["method"]): r for r in summary}
    for dataset in dict.fromkeys(r["dataset"] for r in summary):
        mine = by.get((dataset, method))
        cands = [by[(dataset, b)] for b in baselines if (dataset, b) in by and b != method]
        if mine is None or not cands:
            continue
        best = max(cands, key=lambda r: r["metrics"][metric][0])
        m_mean, m_std = mine["metrics"][metric]
        b_mean, b_std = best["metrics"][metric]
        s = max(v for v in (m_std, b_std, 0.0) if not math.isnan(v))
        a, b = _per_seed(runs, dataset, method, metric), _per_seed(runs, dataset, best["method"], metric)
        diffs = [a[k] - b[k] for k in sorted(set(a) & set(b))]
        paired = (statistics.fmean(diffs), statistics.stdev(diffs)) if len(diffs) > 1 else None
        delta = m_mean - b_mean
        verdict = "ahead beyond noise" if delta > s else ("within one std" if delta >= -s else "behind")
        out.append((dataset, LABELS.get(best["method"], best["method"]), b_mean, m_mean, s, paired, verdict))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a benchmark's results.json, or its output folder")
    ap.add_argument("--metric", default="accuracy")
    ap.add_argument("--f1", action="store_true", help="also the macro and weighted F1 tables")
    ap.add_argument("--methods", nargs="+", default=["deq", "refnet"])
    ap.add_argument("--baselines", nargs="+", default=list(DEFAULT_BASELINES))
    args = ap.parse_args(argv)
    path = Path(args.results)
    if path.is_dir():
        runs = [json.loads(p.read_text()) for p in sorted((path / "runs").glob("*.json"))]
    else:
        runs = json.loads(path.read_text())["runs"]
    # the order the runner wrote them in (its grid: the config's datasets), not the file names'
    runs.sort(key=lambda r: r.get("finished_at") or "")
    summary = summarize(runs)
    summarised = {r["dataset"] for r in summary}
    datasets = [d for d in dict.fromkeys(r["dataset"] for r in runs) if d in summarised]
    seen = list(dict.fromkeys(r["method"] for r in summary))
    methods = [m for m in ORDER if m in seen] + [m for m in seen if m not in ORDER]
    by = {(r["dataset"], r["method"]): r for r in summary}
    metrics = [args.metric] + (["f1_macro", "f1_weighted"] if args.f1 else [])
    for metric in metrics:
        print(f"\n**{metric}** (mean ± std over seeds)\n")
        print("| method | " + " | ".join(datasets) + " |")
        print("|---|" + "---|" * len(datasets))
        for m in methods:
            cells = []
            for d in datasets:
                r = by.get((d, m))
                cells.append(_fmt(*r["metrics"][metric]) if r and metric in r["metrics"] else "-")
            print(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    print("\n**seconds per epoch** (mean over seeds; in brackets: ratio to Concat on the same dataset)\n")
    print("| method | " + " | ".join(datasets) + " |")
    print("|---|" + "---|" * len(datasets))
    for m in methods:
        if m == LOGREG:
            continue
        cells = []
        for d in datasets:
            r, c = by.get((d, m)), by.get((d, "concat"))
            if not r or math.isnan(r["seconds_per_epoch"][0]):
                cells.append("-")
                continue
            t = r["seconds_per_epoch"][0]
            ratio = f" ({t / c['seconds_per_epoch'][0]:.1f}x)" if c and c["seconds_per_epoch"][0] > 0 else ""
            cells.append(f"{t:.2f}{ratio}")
        print(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    for m in args.methods:
        print(f"\n**bar check: {m}** ({args.metric}; one std = the larger of the two stds)\n")
        print("| dataset | best baseline | its mean | method mean | difference | one std | paired diff over seeds | verdict |")
        print("|---|---|---|---|---|---|---|---|")
        for d, name, b, mm, s, paired, verdict in bar_check(runs, summary, m, args.baselines, args.metric):
            p = "-" if paired is None else f"{paired[0]:+.3f} ± {paired[1]:.3f}"
            print(f"| {d} | {name} | {b:.3f} | {mm:.3f} | {mm - b:+.3f} | {s:.3f} | {p} | {verdict} |")


if __name__ == "__main__":
    main()
