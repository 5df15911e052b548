""":func:`run_benchmark`: run (or resume) a grid of datasets x sweep points x seeds x methods.

With a search stage, the trials of every method run first (the same number for each,
scored on validation only; :mod:`multizoo_ext.runner.search`), then the seeded runs at each
method's best trial's settings. Every run is independent and reproducible: it seeds everything from its own seed, builds
its own data loaders (so the training loader's shuffle generator starts afresh) and its own
model (:func:`multizoo_ext.builder.build_method`, the method's registered recipe with the
config's overrides on top). A run's result therefore depends only on its settings, not on
which runs came before it, the order of the grid, an interruption, or the worker process
(``jobs``) that ran it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from multizoo_ext import __version__
from multizoo_ext.builder import DataSpec, infer_data_spec, seeded_loaders, seeded_method
from multizoo_ext.metrics import SELECTION_METRIC
from multizoo_ext.runner.baselines import loader_arrays, logistic_regression, run_single_modality
from multizoo_ext.runner.config import (BASELINES, LOGREG, SINGLE_MODALITY, BenchmarkConfig, RunSpec, expand_runs,
                                        jsonable, settings_hash)
from multizoo_ext.runner.report import (ROBUSTNESS_MEASURE, TABLE_METRICS, convergence_plots, format_markdown,
                                        make_plots, runs_csv, summarize, summary_csv)
from multizoo_ext.runner.search import choose_trials, expand_trials
from multizoo_ext.runner.store import ResultsStore, atomic_write_text, move_aside
from multizoo_ext.tasks import TASKS
from multizoo_ext.training_structures.supervised import test, train
from multizoo_ext.utils import resolve_device

__all__ = ["run_benchmark", "BenchmarkResults", "RUN_KEYS"]

logger = logging.getLogger(__name__)

#: Keys of every run entry (``status == "ok"``). Baseline-specific extras:
#: ``modality`` / ``per_modality`` (best-single-modality), ``C`` / ``valid_scores`` (logreg).
RUN_KEYS = (
    "dataset",            # dataset entry name (a registered dataset, or a named entry of the config)
    "method",             # fusion registry name, or "best-single-modality" / "logreg"
    "kind",               # "fusion" or "baseline"
    "seed",               # seed of the data split, initial weights and data order
    "variant",            # the sweep point's label ("" without a sweep); not in the run files, where
                          # one run can serve several sweep points that leave its settings unchanged
    "stage",              # "search" (a trial of the search stage, scored on validation only: "test" is
                          # None, "valid_metrics" holds its validation metrics) or "final" (a seeded run)
    "trial",              # the trial's index within its method's search (None for a final run)
    "search",             # trial: {"trial", "settings"}; final run after a search: the search's outcome
                          # {"trials", "trial", "settings", "valid_score", "selection_metric", "space",
                          # "search_seed"}; None without a search
    "task",               # "classification", "multilabel" or "regression"
    "status",             # "ok" (or "failed", with "error", when fail_fast is off)
    "config_hash",        # hash of "config" (resume key, part of the run file's name)
    "config",             # every setting of this run; for a fusion the effective method settings
    "test",               # all test metrics (multizoo_ext.metrics keys, plus "n")
    "valid_score",        # best validation selection metric (accuracy / macro F1 / loss or MSE)
    "selection_metric",   # its name
    "epochs_run",         # epochs trained (< epochs with early stopping; None for logreg)
    "best_epoch",         # epoch whose weights were tested (None for logreg)
    "seconds_per_epoch",  # mean wall time of an epoch, training + validation (None for logreg)
    "total_seconds",      # wall time of the whole run, evaluation included
    "parameters",         # trainable parameters (logreg: coefficients + intercepts)
    "peak_memory_mb",     # CUDA max_memory_allocated, or CPU max-RSS growth (approximate)
    "memory_measure",     # "cuda_max_allocated" or "cpu_max_rss_growth" (or None)
    "process_max_rss_mb",  # the process's max RSS after the run (CPU high-water mark)
    "robustness",         # test()'s robustness dict, or None
    "relative_robustness",  # {"<modality>:<kind>": relative robustness of ROBUSTNESS_MEASURE}, or None
    "robustness_levels",  # the noise levels of the curves, or None
    "history",            # per-epoch training history (None for logreg)
    "torch_threads",      # torch.get_num_threads() during the run (timings depend on it)
    "device", "version", "finished_at",
)
#: Fields that differ between two runs of the same settings (timings, memory, host state).
TIMING_KEYS = ("seconds_per_epoch", "total_seconds", "peak_memory_mb", "memory_measure", "process_max_rss_mb",
               "finished_at", "torch_threads", "device")


# ----------------------------------------------------------------------------- measuring
def _max_rss_mb() -> Optional[float]:
    """The process's max resident set size in MiB (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class _MemoryProbe:
    """Peak memory of one run.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak (exact for tensors).
    CPU: growth of the process's max RSS (``resource.getrusage``) during the run. This is
    approximate: max RSS is a high-water mark of the whole process, so a run that stays
    below an earlier run's peak records 0, and allocator caching and Python objects count.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.start_rss = _max_rss_mb()

    def result(self) -> Dict[str, Any]:
        rss = _max_rss_mb()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak, measure = torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        elif rss is not None and self.start_rss is not None:
            peak, measure = max(0.0, rss - self.start_rss), "cpu_max_rss_growth"
        else:
            peak, measure = None, None
        return {"peak_memory_mb": peak, "memory_measure": measure, "process_max_rss_mb": rss}


@contextlib.contextmanager
def _thread_limit(n: Optional[int]) -> Iterator[None]:
    """Limit torch's intra-op threads and NumPy's BLAS threads (threadpoolctl, a scikit-learn
    dependency) to ``n`` inside the block; ``None`` changes nothing."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - scikit-learn installs it
            yield
        else:
            with threadpool_limits(limits=int(n)):
                yield
    finally:
        torch.set_num_threads(before)


_WARMED: Dict[str, bool] = {}


def _warm_up(device: torch.device) -> None:
    """Once per process and device: one tiny forward/backward/AdamW step, so one-time costs
    (lazy imports on the first optimiser, CUDA context, kernel loading) do not inflate the
    first run's seconds per epoch."""
    if _WARMED.get(str(device)):
        return
    layer = nn.Linear(4, 2).to(device)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    nn.functional.cross_entropy(layer(torch.zeros(3, 4, device=device)),
                                torch.zeros(3, dtype=torch.long, device=device)).backward()
    opt.step()
    _WARMED[str(device)] = True


# ----------------------------------------------------------------------------- data
_SPECS: Dict[str, DataSpec] = {}


def _loaders(cfg: BenchmarkConfig, dataset: str, seed: int) -> Tuple[Any, Any, Any]:
    """Fresh ``(train, valid, test)`` loaders of ``dataset`` for ``seed`` (a new shuffle
    generator each call, so a run never continues another run's data order)."""
    return seeded_loaders(cfg.loader_of(dataset), seed, cfg.batch_size, **cfg.data_kwargs.get(dataset, {}))


def _spec(cfg: BenchmarkConfig, dataset: str, seed: int) -> DataSpec:
    """The layout of ``dataset``'s training split for ``seed`` (cached per process)."""
    kwargs = cfg.data_kwargs.get(dataset, {})
    key = json.dumps([cfg.loader_of(dataset), jsonable(kwargs), cfg.batch_size, seed], sort_keys=True, default=str)
    if key not in _SPECS:
        train_dl = _loaders(cfg, dataset, seed)[0]
        task = kwargs.get("task") if kwargs.get("task") in TASKS else None
        _SPECS[key] = infer_data_spec(train_dl, task=task)
    return _SPECS[key]


# ----------------------------------------------------------------------------- one run
def _build(cfg: BenchmarkConfig, spec: DataSpec, fusion: str, seed: int) -> Any:
    return seeded_method(spec, fusion, seed, encoder=cfg.encoder, hidden=cfg.hidden, embed_dim=cfg.embed_dim,
                        head_hidden=cfg.head_hidden, **cfg.method_overrides(fusion))


def _fit(cfg: BenchmarkConfig, device: torch.device, seed: int, task: str, encoders: List[nn.Module],
         fusion: nn.Module, head: nn.Module, train_dl: Any, valid_dl: Any, objective: Any,
         objective_args: Optional[Dict[str, Any]], lr_mult: float) -> Any:
    return train(encoders, fusion, head, train_dl, valid_dl, cfg.epochs, early_stop=cfg.early_stop, task=task,
                 optimtype=torch.optim.AdamW, lr=cfg.lr, weight_decay=cfg.weight_decay, objective=objective,
                 save=None, objective_args_dict=objective_args, device=device, fusion_lr_mult=lr_mult,
                 seed=seed, patience=cfg.patience, progress=False)


def _split_loaders(cfg: BenchmarkConfig, run: RunSpec) -> Tuple[Any, Any, Any]:
    """``(train, valid, evaluated)`` loaders of a run: a search trial is evaluated on the
    validation split (it never sees the test split), a final run on test."""
    train_dl, valid_dl, test_dl = _loaders(cfg, run.dataset, run.seed)
    return train_dl, valid_dl, (valid_dl if run.stage == "search" else test_dl)


def _run_fusion(cfg: BenchmarkConfig, run: RunSpec, spec: DataSpec, m: Any, device: torch.device) -> Dict[str, Any]:
    """Train and test ``m`` (built by :func:`_build` for this run, untrained)."""
    t0 = time.perf_counter()
    probe = _MemoryProbe(device)
    train_dl, valid_dl, test_dl = _split_loaders(cfg, run)
    res = _fit(cfg, device, run.seed, spec.task, m.encoders, m.fusion, m.head, train_dl, valid_dl, m.objective,
               m.objective_args_dict, m.fusion_lr_mult)
    metrics = test(res.model, test_dl, task=spec.task, no_robust=True, full=True, device=device)
    entry: Dict[str, Any] = dict(test=metrics, valid_score=res.best_score,
                                 selection_metric=SELECTION_METRIC[spec.task][0], epochs_run=len(res.history),
                                 best_epoch=res.best_epoch, seconds_per_epoch=res.seconds_per_epoch,
                                 parameters=res.parameters, **probe.result())
    entry.update(robustness=None, relative_robustness=None, robustness_levels=None)
    if cfg.robustness:
        from multizoo_ext.datasets.robustness import DEFAULT_LEVELS, all_robustness_loaders

        robust_dl = all_robustness_loaders(test_dl, **{"seed": run.seed, **cfg.robustness_kwargs})
        robust = test(res.model, robust_dl, task=spec.task, no_robust=False, device=device)["robustness"]
        measure = ROBUSTNESS_MEASURE[spec.task]
        entry["robustness"] = robust
        entry["robustness_levels"] = [float(v) for v in cfg.robustness_kwargs.get("levels", DEFAULT_LEVELS)]
        entry["relative_robustness"] = {setting: measures[measure]["relative"]
                                        for setting, measures in robust.items() if measure in measures}
    entry["history"] = res.history
    entry["total_seconds"] = time.perf_counter() - t0
    return entry


def _run_single(cfg: BenchmarkConfig, run: RunSpec, spec: DataSpec, device: torch.device) -> Dict[str, Any]:
    t0 = time.perf_counter()
    probe = _MemoryProbe(device)

    def fit(encoders: List[nn.Module], fusion: nn.Module, head: nn.Module, train_dl: Any, valid_dl: Any,
            objective: Any, objective_args: Optional[Dict[str, Any]], lr_mult: float) -> Any:
        return _fit(cfg, device, run.seed, spec.task, encoders, fusion, head, train_dl, valid_dl, objective,
                    objective_args, lr_mult)

    entry = run_single_modality(spec, lambda: _split_loaders(cfg, run), fit, run.seed, cfg.encoder,
                                cfg.hidden, cfg.embed_dim, cfg.head_hidden, device)
    entry.update(**probe.result(), robustness=None, relative_robustness=None, robustness_levels=None,
                 total_seconds=time.perf_counter() - t0)
    return entry


def _run_logreg(cfg: BenchmarkConfig, run: RunSpec, spec: DataSpec) -> Dict[str, Any]:
    t0 = time.perf_counter()
    train_dl, valid_dl, test_dl = _split_loaders(cfg, run)
    entry = logistic_regression(loader_arrays(train_dl), loader_arrays(test_dl), spec.task, spec.n_out,
                                cfg.logreg_cs, valid=loader_arrays(valid_dl))
    entry.update(epochs_run=None, best_epoch=None, seconds_per_epoch=None, peak_memory_mb=None, memory_measure=None,
                 process_max_rss_mb=_max_rss_mb(), robustness=None, relative_robustness=None,
                 robustness_levels=None, history=None, total_seconds=time.perf_counter() - t0)
    return entry


def execute(run: RunSpec, store: ResultsStore, device: torch.device) -> Tuple[Dict[str, Any], bool]:
    """Run ``run`` unless the store holds it finished with the same settings; write it.

    Returns:
        ``(entry, reused)``; the entry's ``variant`` is ``run.variant``.

    Raises:
        whatever the run raised, when ``fail_fast`` is on.
    """
    cfg = run.config
    settings = cfg.run_settings(run.dataset, run.method)
    if run.stage == "search":
        settings["stage"] = "search"  # a trial is scored on validation: never the same run as a final one
    spec: Optional[DataSpec] = None
    method: Any = None
    try:
        if run.method not in BASELINES:
            spec = _spec(cfg, run.dataset, run.seed)
            method = _build(cfg, spec, run.method, run.seed)
            settings.update(method.settings)  # the effective method settings
        config_hash = settings_hash(settings)
        done = store.find(run.dataset, run.method, run.seed, config_hash)
        if done is not None:
            return {**done, **_marks(run)}, True
        _warm_up(device)
        spec = spec or _spec(cfg, run.dataset, run.seed)
        if run.method == SINGLE_MODALITY:
            result = _run_single(cfg, run, spec, device)
        elif run.method == LOGREG:
            result = _run_logreg(cfg, run, spec)
        else:
            result = _run_fusion(cfg, run, spec, method, device)
        status: Dict[str, Any] = {"status": "ok"}
    except Exception as exc:  # noqa: BLE001  (fail_fast off: record and go on)
        if cfg.fail_fast:
            raise
        logger.warning("%s / %s / seed %d failed: %s", run.dataset, run.method, run.seed, exc)
        config_hash = settings_hash(settings)
        result, status = {}, {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    if run.stage == "search" and "test" in result:  # what a trial measured is the validation split
        result["valid_metrics"], result["test"] = result.pop("test"), None
        for per in result.get("per_modality") or []:
            per["valid_metrics"], per["test"] = per.pop("test"), None
    entry = {"dataset": run.dataset, "method": run.method, "kind": "baseline" if run.method in BASELINES else "fusion",
             "seed": run.seed, "task": spec.task if spec is not None else "unknown",
             **status, "config_hash": config_hash, "config": settings, **result, **_marks(run),
             "torch_threads": torch.get_num_threads(), "device": str(device), "version": __version__,
             "finished_at": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
    entry.pop("variant")
    entry = jsonable(entry)
    store.put(entry)
    entry = {**entry, "variant": run.variant}
    if entry["status"] == "ok" and entry.get("test"):
        headline = TABLE_METRICS[entry["task"]][0]
        logger.info("%s / %s / seed %d: test %s %.4f (%.1fs)", run.dataset, run.method, run.seed, headline,
                    entry["test"].get(headline) or math.nan, entry["total_seconds"])
    return entry, False


def _marks(run: RunSpec) -> Dict[str, Any]:
    """What an entry says of its place in this grid: sweep label, stage, trial index and the
    search's trial settings / outcome (not part of the run's settings)."""
    return jsonable({"variant": run.variant, "stage": run.stage, "trial": run.trial, "search": run.search})


def _worker(run: RunSpec, folder: str, device: str, threads: Optional[int]) -> Tuple[Dict[str, Any], bool]:
    """One run in a worker process (``jobs > 1``), writing through the store."""
    with _thread_limit(threads):
        return execute(run, ResultsStore(Path(folder)), torch.device(device))


# ----------------------------------------------------------------------------- the grid
class BenchmarkResults(list):
    """What :func:`run_benchmark` returns: the list of run entries (dicts, see
    :data:`RUN_KEYS`) of the configured grid, reused and new, in grid order (search trials
    first), with extra attributes.

    Attributes:
        summary: :func:`summarize` of the entries (means/stds, curves: the plotted data).
        markdown: :func:`format_markdown` of the summary (also in ``results.md``).
        json_path, markdown_path, csv_path, summary_csv_path, config_path, source_path: the files
            written (source_path: the config file as given, or None).
        figures: the figure paths written (empty without matplotlib or with plots off).
        moved_to: where ``resume=False`` moved the earlier results (None: nothing moved).
        computed, reused: how many entries were run now / taken from an earlier run.
    """

    def __init__(self, runs: Any = (), **attrs: Any) -> None:
        super().__init__(runs)
        self.summary: List[Dict[str, Any]] = attrs.pop("summary", [])
        self.markdown: str = attrs.pop("markdown", "")
        self.json_path: Optional[Path] = attrs.pop("json_path", None)
        self.markdown_path: Optional[Path] = attrs.pop("markdown_path", None)
        self.csv_path: Optional[Path] = attrs.pop("csv_path", None)
        self.summary_csv_path: Optional[Path] = attrs.pop("summary_csv_path", None)
        self.config_path: Optional[Path] = attrs.pop("config_path", None)
        self.source_path: Optional[Path] = attrs.pop("source_path", None)
        self.figures: List[Path] = attrs.pop("figures", [])
        self.moved_to: Optional[Path] = attrs.pop("moved_to", None)
        self.computed: int = attrs.pop("computed", 0)
        self.reused: int = attrs.pop("reused", 0)
        if attrs:
            raise TypeError(f"unknown BenchmarkResults attributes: {sorted(attrs)}")

    @property
    def paths(self) -> List[Path]:
        """Every file written, results first."""
        return [p for p in (self.json_path, self.markdown_path, self.csv_path, self.summary_csv_path,
                            self.config_path, self.source_path) if p is not None] + list(self.figures)


def _execute_all(runs: List[RunSpec], store: ResultsStore, device: torch.device,
                 pool: Optional[ProcessPoolExecutor], out: Path, threads: Optional[int], bar: Any,
                 counts: List[int]) -> List[Dict[str, Any]]:
    """Execute ``runs`` here (``pool`` None) or in ``pool``'s workers; their entries in the
    order of ``runs``. ``counts`` (computed, reused) is updated."""
    results: List[Optional[Dict[str, Any]]] = [None] * len(runs)

    def done(i: int, entry: Dict[str, Any], was_reused: bool) -> None:
        results[i] = entry
        counts[0] += not was_reused
        counts[1] += was_reused
        bar.update()

    if pool is None:
        for i, run in enumerate(runs):
            bar.set_postfix_str(f"{run.dataset}/{run.method}/" + (f"trial {run.trial}" if run.stage == "search"
                                                                  else f"seed {run.seed}"))
            done(i, *execute(run, store, device))
    else:
        futures = {pool.submit(_worker, run, str(out), str(device), threads): i for i, run in enumerate(runs)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in finished:
                done(futures[fut], *fut.result())  # re-raises a worker's exception (fail_fast)
    return [r for r in results if r is not None]


def _chosen_run(run: RunSpec, best: Dict[str, Any]) -> RunSpec:
    """``run`` with the settings of its method's best trial (its own seed); without a
    successful trial (all failed, ``fail_fast`` off) the configured settings, with a warning."""
    info = {k: v for k, v in best.items() if k != "config"}
    if best["config"] is None:
        logger.warning("%s / %s: every search trial failed; its runs use the configured settings",
                       run.dataset, run.method)
        return dataclasses.replace(run, search=info)
    chosen = copy.deepcopy(best["config"])
    chosen.robustness = run.config.robustness  # trials run without robustness; final runs as configured
    return dataclasses.replace(run, config=chosen, search=info)


def _config_record(cfg: BenchmarkConfig) -> Dict[str, Any]:
    return jsonable({k: v for k, v in asdict(cfg).items() if k not in ("progress",)})


def _start_method() -> str:
    """``fork`` where the platform has it (workers see datasets registered at run time and
    start fast), else ``spawn``."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" else "spawn"


def run_benchmark(config: BenchmarkConfig, config_text: Optional[Tuple[str, str]] = None) -> BenchmarkResults:
    """Run (or resume) the grid ``datasets x sweep points x seeds x (fusions + baselines)``;
    with ``search_trials > 0``, first the search stage (:mod:`multizoo_ext.runner.search`:
    the same number of trials for every method, scored on validation) and then every seed at
    each method's chosen settings.

    Every run is written to its own file in ``<output>/runs/`` as it finishes (atomically:
    see :mod:`multizoo_ext.runner.store`), and ``results.json`` (index of every run in the
    folder) is rebuilt after each. At the end: ``results.md`` (mean ± std tables of this
    grid, with the reference rows), ``results.csv`` (one line per run of this grid),
    ``summary.csv``, ``config.json`` (the settings used), figures (with matplotlib). Nothing
    is printed (progress: tqdm when ``config.progress``; per-run lines: ``logging`` at INFO).

    Args:
        config: the benchmark's settings (checked by :meth:`BenchmarkConfig.validated`).
        config_text: ``(file name, text)`` of the config file the settings came from, saved
            beside the results as given.

    Returns:
        :class:`BenchmarkResults`: the entries of this grid (``list`` of dicts: the search
        trials first, ``stage == "search"``, then the seeded runs) with the summary, Markdown
        and paths.

    Raises:
        ValueError: a bad config or an unreadable single-file ``results.json``; with
            ``fail_fast`` (default), whatever a run raised.
    """
    cfg = config.validated()
    device = resolve_device(cfg.device)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    moved = None if cfg.resume else move_aside(out)
    store = ResultsStore(out)
    runs = expand_runs(cfg)
    trials = expand_trials(cfg) if cfg.search_trials else []
    threads = cfg.num_threads if cfg.jobs == 1 else (cfg.num_threads or 1)
    counts = [0, 0]  # computed, reused
    bar = tqdm(total=len(trials) + len(runs), desc="benchmark",
               disable=None if cfg.progress is None else not cfg.progress)
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        pool: Optional[ProcessPoolExecutor] = None
        if cfg.jobs == 1:
            stack.enter_context(_thread_limit(threads))
        else:
            pool = ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=multiprocessing.get_context(_start_method()))
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        trial_entries = _execute_all(trials, store, device, pool, out, threads, bar, counts)
        if trials:
            chosen = choose_trials(trials, trial_entries, cfg)
            runs = [_chosen_run(run, chosen[(run.dataset, run.variant, run.method)]) for run in runs]
        results = _execute_all(runs, store, device, pool, out, threads, bar, counts)
    computed, reused = counts
    store.rebuild_index()
    grid = trial_entries + results
    summary = summarize(grid)
    markdown = format_markdown(summary, cfg)
    paths = {"json_path": store.index_path, "markdown_path": out / "results.md", "csv_path": out / "results.csv",
             "summary_csv_path": out / "summary.csv", "config_path": out / "config.json"}
    atomic_write_text(paths["markdown_path"], markdown)
    atomic_write_text(paths["csv_path"], runs_csv(grid))
    atomic_write_text(paths["summary_csv_path"], summary_csv(summary, cfg.references))
    atomic_write_text(paths["config_path"], json.dumps(_config_record(cfg), indent=1) + "\n")
    if config_text is not None:
        name, text = config_text
        paths["source_path"] = out / ("config.source.json" if name.endswith(".json") else "config.source.toml")
        atomic_write_text(paths["source_path"], text)
    figures = make_plots(summary, out, cfg.references) + convergence_plots(grid, out) if cfg.plots else []
    return BenchmarkResults(grid, summary=summary, markdown=markdown, figures=figures, moved_to=moved,
                            computed=computed, reused=reused, **paths)
