"""Summaries of finished runs: mean ± std per (dataset, sweep point, method), the Markdown
tables (with reference rows: published numbers, marked as such), CSV exports and figures.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from multizoo_ext.runner.config import BASELINES, LOGREG, SINGLE_MODALITY, BenchmarkConfig
from multizoo_ext.runner.search import LOGREG_KEY, describe_space, settings_text

__all__ = ["summarize", "format_markdown", "make_plots", "convergence_plots", "runs_csv", "summary_csv", "TABLE_METRICS",
           "ROBUSTNESS_MEASURE"]

logger = logging.getLogger(__name__)

#: Metrics shown in the Markdown table (and the bar plots) per task; the first one is the
#: headline metric logged per run. Classification shows F1 both macro-averaged (every class
#: counts the same) and weighted by class support.
TABLE_METRICS: Dict[str, Tuple[str, ...]] = {
    "classification": ("accuracy", "f1_macro", "f1_weighted", "auroc"),
    "multilabel": ("f1_micro", "f1_macro"),
    "regression": ("mse", "mae"),
}
#: The measure robustness curves follow (MultiBench's key in test()'s robustness dict).
ROBUSTNESS_MEASURE: Dict[str, str] = {"classification": "Accuracy", "multilabel": "macro", "regression": "MSE"}
_METRIC_LABEL = {"Accuracy": "accuracy", "macro": "F1 (macro)", "MSE": "MSE",
                 "accuracy": "accuracy", "f1_macro": "F1 (macro)", "f1_micro": "F1 (micro)",
                 "f1_weighted": "F1 (weighted)", "auroc": "AUROC",
                 "mse": "MSE", "mae": "MAE"}


def _stats(values: Sequence[Optional[float]]) -> Tuple[float, float, int]:
    """(mean, sample std with ddof=1 (NaN for one value), count) of the non-None values; a
    NaN value makes the mean NaN (it is not silently dropped)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return math.nan, math.nan, 0
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return mean, std, len(vals)


def summarize(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Aggregate finished runs per (dataset, sweep point, method), in first-seen order.

    Returns:
        one dict per (dataset, variant, method): ``dataset``, ``variant`` (the sweep point's
        label, "" without a sweep), ``method``, ``task``, ``n`` (seeds),
        ``seeds``, ``metrics`` ``{name: (mean, std)}`` for every test metric,
        ``seconds_per_epoch`` / ``peak_memory_mb`` ``(mean, std)``, ``parameters`` (mean),
        ``relative_robustness`` ``{setting: (mean, std)}``, ``robustness_curves``
        ``{setting: (levels, mean curve, std curve)}`` of :data:`ROBUSTNESS_MEASURE`, and ``modalities``
        (best-single-modality: the modality chosen per seed), and ``search`` (the search's
        outcome for this method: trials, chosen trial and settings, its validation score;
        None without a search). Std is the sample std (ddof=1) over seeds, NaN with one
        seed. Search trials (``stage == "search"``) are left out: they are no test results.
    """
    groups: Dict[Tuple[str, str, str], List[Dict[str, Any]]] = {}
    for run in runs:
        if run.get("status") == "ok" and run.get("stage") != "search":
            groups.setdefault((run["dataset"], run.get("variant") or "", run["method"]), []).append(run)
    out: List[Dict[str, Any]] = []
    for (dataset, variant, method), rows in groups.items():
        task = rows[0]["task"]
        names = sorted({k for r in rows for k, v in r["test"].items() if k != "n"})
        metrics = {k: _stats([r["test"].get(k) for r in rows])[:2] for k in names}
        row: Dict[str, Any] = {
            "dataset": dataset, "variant": variant, "method": method, "kind": rows[0].get("kind"), "task": task, "n": len(rows),
            "seeds": [r["seed"] for r in rows], "metrics": metrics,
            "seconds_per_epoch": _stats([r.get("seconds_per_epoch") for r in rows])[:2],
            "peak_memory_mb": _stats([r.get("peak_memory_mb") for r in rows])[:2],
            "parameters": _stats([r.get("parameters") for r in rows])[0],
            "search": rows[0].get("search"),
        }
        if method == SINGLE_MODALITY:
            row["modalities"] = [r.get("modality") for r in rows]
        rel: Dict[str, Tuple[float, float]] = {}
        curves: Dict[str, Tuple[List[float], List[float], List[float]]] = {}
        settings = [s for s in (rows[0].get("relative_robustness") or {})]
        measure = ROBUSTNESS_MEASURE[task]
        for s in settings:
            rel[s] = _stats([(r.get("relative_robustness") or {}).get(s) for r in rows])[:2]
            per_seed = [r["robustness"][s][measure]["curve"] for r in rows
                        if r.get("robustness") and s in r["robustness"] and measure in r["robustness"][s]]
            if per_seed and len({len(c) for c in per_seed}) == 1:
                points = list(zip(*per_seed))  # one tuple of per-seed scores per level
                levels = rows[0].get("robustness_levels") or [i / 10 for i in range(len(points))]
                curves[s] = (list(levels), [_stats(v)[0] for v in points], [_stats(v)[1] for v in points])
        row["relative_robustness"], row["robustness_curves"] = rel, curves
        out.append(row)
    return out


def _cell(stat: Tuple[float, float], digits: int = 4) -> str:
    mean, std = stat
    if mean is None or math.isnan(mean):
        return "n/a"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _method_label(row: Dict[str, Any]) -> str:
    if row["method"] == SINGLE_MODALITY:
        mods = sorted({m for m in row.get("modalities", []) if m is not None})
        label = f"best single modality (modality {', '.join(str(m) for m in mods)})" if mods \
            else "best single modality"
    elif row["method"] == LOGREG:
        label = "ridge regression (concat features)" if row["task"] == "regression" \
            else "logistic regression (concat features)"
    else:
        label = row["method"]
    return f"{label} [{row['variant']}]" if row.get("variant") else label


def _short_label(row: Dict[str, Any]) -> str:
    return f"{row['method']} [{row['variant']}]" if row.get("variant") else row["method"]


def _settings_line(cfg: BenchmarkConfig) -> str:
    head = f"MLP head ({cfg.head_hidden})" if cfg.head_hidden else "linear head"
    stop = f"early stop after {cfg.patience} epochs without gain" if cfg.early_stop else "no early stop"
    line = (f"Settings: {cfg.epochs} epochs max ({stop}), batch size {cfg.batch_size}, AdamW lr {cfg.lr:g}, "
            f"weight decay {cfg.weight_decay:g}, encoder {cfg.encoder} (hidden {cfg.hidden}, embedding "
            f"{cfg.embed_dim}), {head}; test metrics of the epoch with the best validation score.")
    if cfg.baselines:
        searched_c = bool(cfg.search_trials) and LOGREG_KEY in (cfg.search_space or {})
        cs = "C from the search (below)" if searched_c else \
            f"C in {{{', '.join(f'{c:g}' for c in cfg.logreg_cs)}}} chosen on validation"
        line += (" Baselines: the same encoder + head on each modality alone (best by validation), and "
                 f"logistic regression on standardised concatenated features with {cs}.")
    if cfg.sweep:
        axes = "; ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in cfg.sweep.items())
        line += f" Sweep: {axes} (every combination is its own row, labelled [setting=value])."
    if cfg.search_trials:
        line += (f"\n\nTuning budget: {cfg.search_trials} search trials per method and dataset, the same for every "
                 f"method (baselines included), sampled with search seed {cfg.search_seed} over: "
                 f"{describe_space(cfg.search_space)} (each method samples only its own keys: the shared training "
                 f"settings for every trained method, {LOGREG_KEY} for logistic regression, the FUSION-scoped keys "
                 f"for that fusion). Each trial trained with seed {cfg.search_seed} and was scored on the validation "
                 "split only; the best trial's settings (table \"chosen settings\") were then run for every seed "
                 "and scored on test. The settings above apply where the space has no key.")
    return line + " Peak memory on CPU: growth of the process's max RSS (approximate).\n"


def format_markdown(summary: Sequence[Dict[str, Any]], config: Optional[BenchmarkConfig] = None) -> str:
    """Markdown: per dataset, a table of mean ± std over seeds (test metrics of
    :data:`TABLE_METRICS`, seconds per epoch, peak memory, parameters; one row per method
    and sweep point), the config's reference rows (published numbers, marked "reference" and
    followed by their sources), and a relative robustness table where robustness was
    measured; with ``config``, a settings line first."""
    by_dataset: Dict[str, List[Dict[str, Any]]] = {}
    for row in summary:
        by_dataset.setdefault(row["dataset"], []).append(row)
    parts: List[str] = [_settings_line(config)] if config is not None else []
    references = list(config.references) if config is not None else []
    for dataset, rows in by_dataset.items():
        task = rows[0]["task"]
        keys = TABLE_METRICS[task]
        seeds = sorted({s for r in rows for s in r["seeds"]})
        parts.append(f"### {dataset} ({task}; mean ± std over seeds {', '.join(map(str, seeds))})\n")
        head = ["method", "runs"] + [f"test {_METRIC_LABEL.get(k, k)}" for k in keys] + \
            ["s/epoch", "peak mem (MB)", "parameters"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            vals = [_method_label(r), str(r["n"])] + [_cell(r["metrics"].get(k, (math.nan, math.nan))) for k in keys]
            vals += [_cell(r["seconds_per_epoch"], 3), _cell(r["peak_memory_mb"], 1),
                     "n/a" if math.isnan(r["parameters"]) else f"{int(round(r['parameters'])):,}"]
            lines.append("| " + " | ".join(vals) + " |")
        refs = [r for r in references if r["dataset"] == dataset]
        for i, ref in enumerate(refs, 1):
            vals = [f"{ref['method']} (reference [{i}])", "reference"]
            vals += [f"{ref['metrics'][k]:.4f}" if k in ref["metrics"] else "-" for k in keys] + ["-", "-", "-"]
            lines.append("| " + " | ".join(vals) + " |")
        parts.append("\n".join(lines) + "\n")
        searched = [r for r in rows if r.get("search")]
        if searched:
            parts.append(f"Chosen settings on {dataset} (best of the search trials by validation score):\n")
            chead = ["method", "trials", "chosen trial", "valid score", "chosen settings"]
            clines = ["| " + " | ".join(chead) + " |", "|" + "---|" * len(chead)]
            for r in searched:
                info = r["search"]
                score = info.get("valid_score")
                metric = info.get("selection_metric") or ""
                clines.append("| " + " | ".join([
                    _short_label(r), str(info.get("trials")),
                    "none (every trial failed)" if info.get("trial") is None else str(info["trial"]),
                    "n/a" if score is None else f"{score:.4f} ({metric})",
                    settings_text(info.get("settings") or {})]) + " |")
            parts.append("\n".join(clines) + "\n")
        if refs:
            parts.append("References (numbers from elsewhere, not run here; their splits and settings may differ): "
                         + "; ".join(f"[{i}] {ref['source']}" for i, ref in enumerate(refs, 1)) + "\n")
        robust = [r for r in rows if r["relative_robustness"]]
        if robust:
            settings = list(robust[0]["relative_robustness"])
            measure = _METRIC_LABEL[ROBUSTNESS_MEASURE[task]]
            parts.append(f"Relative robustness of test {measure} on {dataset} (area under the curve over noise "
                         "levels 0, 0.1, ..., 1 per modality:perturbation, MultiBench's measure):\n")
            rhead = ["method"] + settings
            rlines = ["| " + " | ".join(rhead) + " |", "|" + "---|" * len(rhead)]
            for r in robust:
                rlines.append("| " + " | ".join([_short_label(r)] + [_cell(r["relative_robustness"].get(
                    s, (math.nan, math.nan))) for s in settings]) + " |")
            parts.append("\n".join(rlines) + "\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- plots
def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def axis_range(lows: Sequence[float], highs: Sequence[float], pad: float = 0.12) -> Tuple[float, float]:
    """A value-axis range around the data: from the lowest to the highest value (error bars
    included), widened by ``pad`` of that span on each side (and by a little more than the
    value itself when all values are equal), ignoring NaN. ``(0, 1)`` without data."""
    vals = [float(v) for v in list(lows) + list(highs) if v is not None and math.isfinite(float(v))]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    span = hi - lo if hi > lo else max(abs(hi) * 0.05, 1e-3)
    return lo - pad * span, hi + 2 * pad * span  # room above the bars for their value labels


def make_plots(summary: Sequence[Dict[str, Any]], out_dir: Path,
               references: Sequence[Dict[str, Any]] = ()) -> List[Path]:
    """Per dataset, metric bars with std error bars and each bar's value written on it
    (``<dataset>_metrics.png``; the value axis spans the data, see :func:`axis_range`;
    reference rows hatched) and, when robustness was measured, the mean robustness curves per
    fusion (``<dataset>_robustness.png``).

    Returns:
        the written paths; empty when matplotlib is not installed (``pip install matplotlib``).
    """
    try:
        from matplotlib.figure import Figure  # lazy: matplotlib is an optional extra
    except ImportError:
        logger.info("matplotlib is not installed: no figures (pip install matplotlib)")
        return []
    out_dir = Path(out_dir)
    paths: List[Path] = []
    by_dataset: Dict[str, List[Dict[str, Any]]] = {}
    for row in summary:
        by_dataset.setdefault(row["dataset"], []).append(row)
    for dataset, rows in by_dataset.items():
        keys = TABLE_METRICS[rows[0]["task"]]
        refs = [r for r in references if r["dataset"] == dataset]
        n = len(rows) + len(refs)
        fig = Figure(figsize=(max(3.2, 0.55 * n + 1.2) * len(keys) + 1, 3.8), layout="constrained")
        axes = fig.subplots(1, len(keys), squeeze=False)[0]
        labels = [_short_label(r) for r in rows] + [f"{r['method']} (ref.)" for r in refs]
        labels = [label if len(label) <= 32 else label[:31] + "…" for label in labels]
        for ax, key in zip(axes, keys):
            means = [r["metrics"].get(key, (math.nan, math.nan))[0] for r in rows]
            stds = [r["metrics"].get(key, (math.nan, math.nan))[1] for r in rows]
            stds = [0.0 if s is None or math.isnan(s) else s for s in stds]
            means += [r["metrics"].get(key, math.nan) for r in refs]
            stds += [0.0] * len(refs)
            colors = ["tab:gray" if r["method"] in BASELINES else "tab:blue" for r in rows] + ["white"] * len(refs)
            bars = ax.bar(range(n), means, yerr=stds, capsize=3, color=colors, edgecolor="black", linewidth=0.5,
                          hatch=None)
            for bar in list(bars)[len(rows):]:
                bar.set_hatch("//")
            ax.bar_label(bars, labels=["" if math.isnan(m) else f"{m:.3f}" for m in means], fontsize=7, padding=2)
            ax.set_ylim(*axis_range([m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)]))
            ax.set_xticks(range(n), labels, rotation=40, ha="right", fontsize=8)
            ax.set_title(f"test {_METRIC_LABEL.get(key, key)}")
        fig.suptitle(f"{dataset}: mean ± std over seeds")
        path = out_dir / f"{_safe_name(dataset)}_metrics.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
        robust = [r for r in rows if r["robustness_curves"]]
        if robust:
            settings = list(robust[0]["robustness_curves"])
            ncol = min(4, len(settings))
            nrow = math.ceil(len(settings) / ncol)
            fig = Figure(figsize=(3.4 * ncol, 2.9 * nrow), layout="constrained")
            axes = fig.subplots(nrow, ncol, squeeze=False).reshape(-1)
            for ax, setting in zip(axes, settings):
                for r in robust:
                    if setting not in r["robustness_curves"]:
                        continue
                    x, mean, std = (np.asarray(v, dtype=float) for v in r["robustness_curves"][setting])
                    ax.plot(x, mean, marker="o", ms=3, label=_short_label(r))
                    ax.fill_between(x, mean - np.nan_to_num(std), mean + np.nan_to_num(std), alpha=0.2)
                ax.set_title(setting, fontsize=9)
                ax.set_xlabel("noise level")
            for ax in axes[len(settings):]:
                ax.set_visible(False)
            axes[0].set_ylabel(f"test {_METRIC_LABEL[ROBUSTNESS_MEASURE[rows[0]['task']]]}")
            axes[0].legend(fontsize=7)
            fig.suptitle(f"{dataset}: robustness (mean ± std over seeds)")
            path = out_dir / f"{_safe_name(dataset)}_robustness.png"
            fig.savefig(path, dpi=120)
            paths.append(path)
    return paths




def convergence_plots(runs: Sequence[Dict[str, Any]], out_dir: Path) -> List[Path]:
    """Per dataset with an equilibrium fusion (runs whose history records
    ``train_solver_converged``), the fraction of training samples whose forward solve met its
    tolerance, per epoch, mean ± std over seeds per method (``<dataset>_convergence.png``).

    Returns:
        the written paths; empty without such runs or without matplotlib.
    """
    curves: Dict[str, Dict[str, List[List[float]]]] = {}
    for run in runs:
        history = run.get("history") or []
        values = [h.get("train_solver_converged") for h in history]
        if run.get("status") == "ok" and run.get("stage") != "search" and values and all(v is not None for v in values):
            label = run.get("variant") or run["method"]
            curves.setdefault(run["dataset"], {}).setdefault(label, []).append([float(v) for v in values])
    if not curves:
        return []
    try:
        from matplotlib.figure import Figure  # lazy: matplotlib is an optional extra
    except ImportError:
        return []
    paths: List[Path] = []
    for dataset, methods in curves.items():
        fig = Figure(figsize=(5.0, 3.4), layout="constrained")
        ax = fig.subplots()
        for label, seeds in methods.items():
            n = min(len(c) for c in seeds)
            arr = np.asarray([c[:n] for c in seeds], dtype=float)  # (seeds, epochs)
            mean, std = arr.mean(0), arr.std(0)
            epochs = np.arange(1, n + 1)
            ax.plot(epochs, mean, marker="o", ms=3, label=label)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
            ax.annotate(f"{mean[-1]:.2f}", (epochs[-1], mean[-1]), fontsize=7, xytext=(3, 0),
                        textcoords="offset points")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training samples converged")
        ax.set_ylim(*axis_range([0.0], [1.0], pad=0.05))
        ax.legend(fontsize=7)
        ax.set_title(f"{dataset}: equilibrium solver convergence (mean ± std over seeds)", fontsize=9)
        path = Path(out_dir) / f"{_safe_name(dataset)}_convergence.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- CSV
#: Columns of results.csv before the flattened test metrics.
RUN_COLUMNS = ("dataset", "variant", "method", "kind", "stage", "trial", "seed", "task", "status", "config_hash", "valid_score",
               "selection_metric", "epochs_run", "best_epoch", "seconds_per_epoch", "total_seconds", "parameters",
               "peak_memory_mb", "memory_measure", "torch_threads", "device", "version", "finished_at", "error")


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def runs_csv(runs: Sequence[Dict[str, Any]]) -> str:
    """One line per run, flat columns: :data:`RUN_COLUMNS` (``stage`` "search" marks a search
    trial, scored on validation only), then ``test_<metric>`` for every test metric any run
    has, ``valid_<metric>`` for the trials' validation metrics, then ``setting_<key>`` for
    every scalar setting of ``config`` (lists and dicts as JSON)."""
    metrics = sorted({k for r in runs for k in (r.get("test") or {})})
    valid = sorted({k for r in runs for k in (r.get("valid_metrics") or {})})
    settings = sorted({k for r in runs for k in (r.get("config") or {})} - {"dataset", "method"})
    header = list(RUN_COLUMNS) + [f"test_{m}" for m in metrics] + [f"valid_{m}" for m in valid] + \
        [f"setting_{k}" for k in settings]
    rows = []
    for r in runs:
        cfg = r.get("config") or {}
        cells = [r.get(c) for c in RUN_COLUMNS] + [(r.get("test") or {}).get(m) for m in metrics]
        cells += [(r.get("valid_metrics") or {}).get(m) for m in valid]
        cells += [json.dumps(cfg[k], sort_keys=True) if isinstance(cfg.get(k), (dict, list)) else cfg.get(k)
                  for k in settings]
        rows.append(cells)
    return _csv_text(header, rows)


def summary_csv(summary: Sequence[Dict[str, Any]], references: Sequence[Dict[str, Any]] = ()) -> str:
    """One line per (dataset, sweep point, method) of :func:`summarize`: ``<metric>_mean`` /
    ``<metric>_std`` for every test metric, seconds per epoch, peak memory and parameters;
    then one line per reference row (``kind`` = "reference", its ``source``, std empty).
    After a search: ``search_trials``, ``chosen_trial``, ``chosen_valid_score`` and
    ``chosen_settings`` (JSON) of each method (empty without a search)."""
    metrics = sorted({k for s in summary for k in s["metrics"]} | {k for r in references for k in r["metrics"]})
    header = ["dataset", "variant", "method", "kind", "task", "n", "seeds"]
    header += [f"{m}_{part}" for m in metrics for part in ("mean", "std")]
    header += ["seconds_per_epoch_mean", "seconds_per_epoch_std", "peak_memory_mb_mean", "peak_memory_mb_std",
               "parameters", "source", "search_trials", "chosen_trial", "chosen_valid_score", "chosen_settings"]

    def num(v: Any) -> Any:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    rows = []
    for s in summary:
        cells = [s["dataset"], s.get("variant", ""), s["method"], s.get("kind"), s["task"], s["n"],
                 " ".join(map(str, s["seeds"]))]
        for m in metrics:
            mean, std = s["metrics"].get(m, (None, None))
            cells += [num(mean), num(std)]
        cells += [num(v) for v in (*s["seconds_per_epoch"], *s["peak_memory_mb"], s["parameters"])] + [None]
        info = s.get("search") or {}
        cells += [info.get("trials"), info.get("trial"), num(info.get("valid_score")),
                  json.dumps(info["settings"], sort_keys=True) if info else None]
        rows.append(cells)
    for r in references:
        cells = [r["dataset"], "", r["method"], "reference", None, None, None]
        for m in metrics:
            cells += [r["metrics"].get(m), None]
        cells += [None] * 5 + [r["source"]] + [None] * 4
        rows.append(cells)
    return _csv_text(header, rows)
