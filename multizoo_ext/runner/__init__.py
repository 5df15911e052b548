"""Standardized benchmark runner: a grid of datasets x sweep points x seeds x methods under
one config, every fusion built by :func:`multizoo_ext.builder.build_method` (its registered
recipe plus the config's overrides), with two baseline rows per dataset.

- :mod:`~multizoo_ext.runner.config`: :class:`BenchmarkConfig` and its checks;
- :mod:`~multizoo_ext.runner.store`: the results store (one atomically written file per run
  in ``runs/``, ``results.json`` index; safe with concurrent writers and at any crash);
- :mod:`~multizoo_ext.runner.baselines`: best-single-modality and logistic regression;
- :mod:`~multizoo_ext.runner.report`: summary, Markdown, CSV, figures;
- :mod:`~multizoo_ext.runner.run`: :func:`run_benchmark` (resumable; ``jobs`` worker processes);
- :mod:`~multizoo_ext.runner.options`: the ``multizoo-ext benchmark`` options and config files;
- :mod:`~multizoo_ext.runner.search`: the search stage (an equal tuning budget per method).

Search stage (``search_trials = N``, CLI ``--search-trials N``, a config file's ``[search]``
table with ``trials``, ``seed`` and ``[search.space]``): before its seeded runs, every method
of every (dataset, sweep point), both baselines included, gets the same ``N`` trials sampled
from the search space (default :data:`~multizoo_ext.runner.search.DEFAULT_SEARCH_SPACE`: lr
log-uniform in [3e-4, 1e-2], weight_decay in {0, 1e-4, 1e-2}, hidden in {32, 64, 128},
embed_dim in {16, 32, 64}, refnet ``objective_kwargs.refnet.ms_weight`` in {0, 0.1}, deq
``fusion_lr_mult.deq`` in {0.1, 1.0}, logistic regression ``logreg_c`` log-uniform in
[1e-3, 10]; best-single-modality searches the shared training keys). The trials are sampled
by a generator seeded from ``(search_seed, dataset, method)`` (reproducible, independent of
the grid's order), trained with ``seed = search_seed`` and scored on the validation split
only; the best trial's settings are run for every seed and scored on test. Trials are
ordinary runs of the store (``stage: "search"``, their own ``config_hash``), so a search
resumes after an interruption and ``jobs`` runs them in parallel; they are listed in
``results.json`` / ``results.csv`` and left out of the mean ± std tables. ``results.md``
states the budget and space and has a "chosen settings" table per dataset; ``summary.csv``
has ``search_trials``, ``chosen_trial``, ``chosen_valid_score`` and ``chosen_settings``.

Example:
    >>> from multizoo_ext.runner import BenchmarkConfig, run_benchmark
    >>> cfg = BenchmarkConfig.quick_config(output="runs/quick")        # doctest: +SKIP
    >>> runs = run_benchmark(cfg)                                      # doctest: +SKIP
    >>> print(runs.markdown)                                           # doctest: +SKIP
"""
from multizoo_ext.runner.baselines import logistic_regression, loader_arrays
from multizoo_ext.runner.config import (BASELINES, LOGREG, QUICK_SETTINGS, SINGLE_MODALITY, SWEEPABLE, BenchmarkConfig,
                                        expand_runs)
from multizoo_ext.runner.options import add_benchmark_arguments, config_from_args, load_config_file
from multizoo_ext.runner.report import TABLE_METRICS, format_markdown, make_plots, runs_csv, summarize, summary_csv
from multizoo_ext.runner.search import DEFAULT_SEARCH_SPACE, sample_trials
from multizoo_ext.runner.run import RUN_KEYS, TIMING_KEYS, BenchmarkResults, run_benchmark
from multizoo_ext.runner.store import ResultsStore, move_aside

__all__ = ["BenchmarkConfig", "BenchmarkResults", "run_benchmark", "summarize", "format_markdown", "make_plots",
           "runs_csv", "summary_csv", "add_benchmark_arguments", "config_from_args", "load_config_file",
           "ResultsStore", "move_aside", "expand_runs", "logistic_regression", "loader_arrays", "SINGLE_MODALITY",
           "LOGREG", "BASELINES", "DEFAULT_SEARCH_SPACE", "sample_trials", "RUN_KEYS", "TIMING_KEYS", "TABLE_METRICS", "QUICK_SETTINGS", "SWEEPABLE"]
