"""Standardized benchmark runner: a grid of datasets x sweep points x seeds x methods under
one config, every fusion built by :func:`multizoo_ext.builder.build_method` (its registered
recipe plus the config's overrides), with two baseline rows per dataset.

- :mod:`~multizoo_ext.runner.config`: :class:`BenchmarkConfig` and its checks;
- :mod:`~multizoo_ext.runner.store`: the results store (one atomically written file per run
  in ``runs/``, ``results.json`` index; safe with concurrent writers and at any crash);
- :mod:`~multizoo_ext.runner.baselines`: best-single-modality and logistic regression;
- :mod:`~multizoo_ext.runner.report`: summary, Markdown, CSV, figures;
- :mod:`~multizoo_ext.runner.run`: :func:`run_benchmark` (resumable; ``jobs`` worker processes);
- :mod:`~multizoo_ext.runner.options`: the ``multizoo-ext benchmark`` options and config files.

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
from multizoo_ext.runner.run import RUN_KEYS, TIMING_KEYS, BenchmarkResults, run_benchmark
from multizoo_ext.runner.store import ResultsStore, move_aside

__all__ = ["BenchmarkConfig", "BenchmarkResults", "run_benchmark", "summarize", "format_markdown", "make_plots",
           "runs_csv", "summary_csv", "add_benchmark_arguments", "config_from_args", "load_config_file",
           "ResultsStore", "move_aside", "expand_runs", "logistic_regression", "loader_arrays", "SINGLE_MODALITY",
           "LOGREG", "BASELINES", "RUN_KEYS", "TIMING_KEYS", "TABLE_METRICS", "QUICK_SETTINGS", "SWEEPABLE"]
