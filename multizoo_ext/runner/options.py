"""The ``benchmark`` subcommand's options and config files (TOML or JSON).

A config file holds :class:`~multizoo_ext.runner.config.BenchmarkConfig` settings by name,
with two conveniences:

- ``datasets`` may be a table of named entries: ``[datasets.rosmap_a]`` with
  ``loader = "mogonet"`` (the registered dataset; default: the entry's name) and the
  loader's keywords (``path = ...``), so one loader can appear twice with two paths; tables
  and rows are labelled by the entry name.
- ``[sweep]``, ``[[references]]``, ``[fusion_kwargs.<fusion>]``, ... as in the dataclass.
- ``[search]``: ``trials = N`` (``search_trials``), ``seed = S`` (``search_seed``) and a
  ``[search.space]`` table (``search_space``, e.g. ``lr = {log_uniform = [3e-4, 1e-2]}``,
  ``"fusion_lr_mult.deq" = [0.1, 1.0]``); see :mod:`multizoo_ext.runner.search`.

Options given on the command line win over the file. Unknown keys are one-line errors that
list the valid ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from multizoo_ext.runner.config import PLAIN_OBJECTIVE, QUICK_SETTINGS, BenchmarkConfig
from multizoo_ext.utils import parse_value

__all__ = ["add_benchmark_arguments", "config_from_args", "load_config_file", "config_from_mapping"]


def _scoped_kv(text: str) -> Tuple[str, str, Any]:
    """Parse ``SCOPE:KEY=VALUE`` (VALUE as JSON when possible) into ``(scope, key, value)``."""
    left, sep, value = text.partition("=")
    scope, colon, key = left.partition(":")
    if not sep or not colon or not scope or not key:
        raise argparse.ArgumentTypeError(f"expected NAME:KEY=VALUE (e.g. rosmap:path=data/ROSMAP), got {text!r}")
    return scope.lower(), key, parse_value(value)


def _pair(text: str) -> Tuple[str, str]:
    """Parse ``NAME=VALUE``."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.lower(), value


def _default(name: str) -> Any:
    f = BenchmarkConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``benchmark`` subcommand's options to ``parser``; choices come from the
    registries and defaults from :class:`BenchmarkConfig` (options left out keep them)."""
    from multizoo_ext.registry import list_datasets, list_fusions

    q = QUICK_SETTINGS
    g = parser.add_argument_group("grid")
    g.add_argument("--config", metavar="FILE",
                   help="TOML or JSON file of settings (named dataset entries, [sweep], [[references]], ...; "
                        "see examples/*.toml); options given here win over it")
    g.add_argument("--datasets", nargs="+", choices=list_datasets(), metavar="DATASET",
                   help=f"registered datasets: {', '.join(list_datasets())} "
                        f"(default: {' '.join(_default('datasets'))}; --quick: {' '.join(q['datasets'])})")
    g.add_argument("--fusions", nargs="+", choices=list_fusions(), metavar="FUSION",
                   help=f"registered fusions: {', '.join(list_fusions())} "
                        f"(default: {' '.join(_default('fusions'))}; --quick: {' '.join(q['fusions'])})")
    g.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="seeds; each sets the validation split, initial weights and data order of a run "
                        f"(default: {' '.join(map(str, _default('seeds')))}; "
                        f"--quick: {' '.join(map(str, q['seeds']))})")
    g.add_argument("--quick", action="store_true",
                   help="quick preset (digits, concat + lowrank, 2 seeds, few epochs, fixed C=0.05 for logreg, "
                        "1 thread; well under a minute on 2 cores); explicitly given options still win")
    t = parser.add_argument_group("training (the same for every fusion)")
    t.add_argument("--epochs", type=int,
                   help=f"maximum epochs per run (default: {_default('epochs')}; --quick: {q['epochs']})")
    t.add_argument("--batch-size", type=int, help=f"batch size (default: {_default('batch_size')})")
    t.add_argument("--lr", type=float, help=f"AdamW learning rate (default: {_default('lr')})")
    t.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default: {_default('weight_decay')})")
    t.add_argument("--encoder", choices=["mlp", "identity"],
                   help=f"per-modality encoder (default: {_default('encoder')})")
    t.add_argument("--hidden", type=int, help=f"encoder hidden width (default: {_default('hidden')})")
    t.add_argument("--embed-dim", type=int, help=f"encoder output width (default: {_default('embed_dim')})")
    t.add_argument("--head-hidden", type=int, help="hidden width of an MLP head (default: a linear head)")
    t.add_argument("--early-stop", action="store_true", default=None,
                   help="stop after --patience epochs without validation gain (default: off)")
    t.add_argument("--patience", type=int, help=f"early-stopping patience (default: {_default('patience')})")
    t.add_argument("--device", help="'cpu', 'cuda', 'cuda:1', ... (default: cuda if available, else cpu)")
    t.add_argument("--threads", type=int, dest="num_threads", metavar="N",
                   help="CPU threads for torch and BLAS in each run; 1 is fastest for small models and on a busy "
                        "machine (default: torch's own choice, 1 per worker with --jobs; --quick: 1)")
    t.add_argument("--jobs", type=int, metavar="N",
                   help="worker processes the independent (dataset, method, seed) runs are spread over; the "
                        "results are the same as with 1 (default: 1)")
    k = parser.add_argument_group("per-dataset / per-fusion settings (repeatable; fusion settings override "
                                  "the method's registered recipe)")
    k.add_argument("--data-arg", action="append", type=_scoped_kv, default=[], metavar="DATASET:KEY=VALUE",
                   help="loader keyword for one dataset, e.g. --data-arg rosmap:path=data/ROSMAP")
    k.add_argument("--fusion-arg", action="append", type=_scoped_kv, default=[], metavar="FUSION:KEY=VALUE",
                   help="constructor keyword for one fusion, e.g. --fusion-arg lowrank:rank=8")
    k.add_argument("--objective", action="append", type=_pair, default=[], metavar="FUSION=OBJECTIVE",
                   help=f"train FUSION with the registered objective OBJECTIVE ('{PLAIN_OBJECTIVE}' = the task's "
                        "plain loss; default: the one the fusion's recipe names)")
    k.add_argument("--objective-arg", action="append", type=_scoped_kv, default=[], metavar="FUSION:KEY=VALUE",
                   help="keyword for FUSION's objective factory, e.g. --objective-arg refnet:ms_weight=0.1")
    k.add_argument("--fusion-lr-mult", action="append", type=_pair, default=[], metavar="FUSION=MULT",
                   help="learning-rate multiplier of one fusion's parameters, e.g. deq=1 (default: the recipe's)")
    s = parser.add_argument_group("search stage (an equal tuning budget for every method)")
    s.add_argument("--search-trials", type=int, metavar="N",
                   help="tune every method, baselines included, with the same N trials sampled from the search "
                        "space (a config file's [search.space]; default space: lr, weight_decay, hidden, embed_dim, "
                        "refnet ms_weight, deq fusion_lr_mult, logreg C), each trained with the search seed and "
                        "scored on the validation split; the best trial's settings are then run for every seed "
                        f"(default: {_default('search_trials')} = no search)")
    s.add_argument("--search-seed", type=int, metavar="S",
                   help=f"seed of the trials' sampling and training (default: {_default('search_seed')})")
    o = parser.add_argument_group("evaluation and output")
    o.add_argument("--robustness", action="store_true", default=None,
                   help="also test each fusion under per-modality noise / missing modality and report "
                        "relative robustness (slower)")
    o.add_argument("--no-baselines", action="store_true",
                   help="leave out the best-single-modality and logistic-regression rows")
    o.add_argument("--logreg-c", nargs="+", type=float, metavar="C",
                   help="C grid of the logistic-regression baseline, chosen on the validation split; one value "
                        f"= fixed (default: {' '.join(map(str, _default('logreg_cs')))}; --quick: 0.05)")
    o.add_argument("--output", help=f"folder for runs/, results.json, results.md, results.csv, summary.csv, "
                                    f"config.json and figures (default: {_default('output')})")
    o.add_argument("--fresh", action="store_true",
                   help="move the results already in --output aside (into results.old-<timestamp>/) and start "
                        "over (default: resume, reusing finished runs)")
    o.add_argument("--keep-going", action="store_true",
                   help="record a failing run as failed and continue (default: stop at the first error)")
    o.add_argument("--no-plots", action="store_true", help="write no figures (default: figures when matplotlib "
                                                           "is installed)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


#: Keys of a config file's ``[search]`` table -> BenchmarkConfig settings.
_SEARCH_TABLE = {"trials": "search_trials", "seed": "search_seed", "space": "search_space"}


def config_from_mapping(data: Dict[str, Any], source: str = "config") -> Dict[str, Any]:
    """:class:`BenchmarkConfig` keywords from a parsed config file (``datasets`` may be a
    table of named entries, see the module docstring).

    Raises:
        ValueError: an unknown key (one line, listing the valid ones), or a malformed entry.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a table of settings at the top level, got {type(data).__name__}")
    valid = [n for n in BenchmarkConfig.field_names() if n not in ("quick", "progress", "dataset_loaders")]
    valid.append("search")
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"valid keys: {', '.join(valid)}")
    out = dict(data)
    datasets = out.get("datasets")
    if isinstance(datasets, dict):
        names, loaders, kwargs = [], {}, dict(out.get("data_kwargs") or {})
        for name, entry in datasets.items():
            if not isinstance(entry, dict):
                raise ValueError(f"{source}: datasets.{name} must be a table (loader = ..., and the loader's "
                                 f"keywords), got {entry!r}")
            entry = dict(entry)
            loader = str(entry.pop("loader", name))
            names.append(str(name))
            if loader.lower() != str(name).lower():
                loaders[str(name)] = loader
            if entry:
                kwargs[str(name)] = {**kwargs.get(str(name), {}), **entry}
        out["datasets"], out["dataset_loaders"], out["data_kwargs"] = names, loaders, kwargs
    search = out.pop("search", None)
    if search is not None:
        if not isinstance(search, dict):
            raise ValueError(f"{source}: [search] must be a table (trials = N, seed = S, [search.space]), "
                             f"got {search!r}")
        bad = sorted(set(search) - set(_SEARCH_TABLE))
        if bad:
            raise ValueError(f"{source}: unknown key{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} in "
                             f"[search]; valid keys: {', '.join(_SEARCH_TABLE)}")
        for key, name in _SEARCH_TABLE.items():
            if key in search:
                if name in out:
                    raise ValueError(f"{source}: {name} is given twice (top level and [search] {key})")
                out[name] = search[key]
    if "logreg_cs" in out and isinstance(out["logreg_cs"], list):
        out["logreg_cs"] = tuple(out["logreg_cs"])
    return out


def load_config_file(path: str) -> Tuple[Dict[str, Any], str]:
    """Read a TOML (``tomllib``; Python >= 3.11) or JSON (``.json``) config file; returns
    ``(BenchmarkConfig keywords, the file's text)``.

    Raises:
        FileNotFoundError: no such file. ValueError: unparsable or with unknown keys.
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from None
    else:
        try:
            import tomllib
        except ImportError:  # pragma: no cover - Python 3.10
            raise ValueError(f"{p}: reading TOML needs Python >= 3.11 (tomllib); use a .json config") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{p}: not valid TOML ({exc})") from None
    return config_from_mapping(data, source=p.name), text


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """The :class:`BenchmarkConfig` of parsed ``benchmark`` options: the ``--config`` file's
    settings, then the options given (which win); options left out keep the defaults (or the
    quick preset with ``--quick``). Per-name options are merged into the file's mappings."""
    given: Dict[str, Any] = {}
    if getattr(args, "config", None):
        given, _ = load_config_file(args.config)
    for opt, name in (("datasets", "datasets"), ("fusions", "fusions"), ("seeds", "seeds"), ("epochs", "epochs"),
                      ("batch_size", "batch_size"), ("lr", "lr"), ("weight_decay", "weight_decay"),
                      ("encoder", "encoder"), ("hidden", "hidden"), ("embed_dim", "embed_dim"),
                      ("head_hidden", "head_hidden"), ("early_stop", "early_stop"), ("patience", "patience"),
                      ("device", "device"), ("num_threads", "num_threads"), ("jobs", "jobs"), ("output", "output"),
                      ("robustness", "robustness"), ("logreg_c", "logreg_cs"),
                      ("search_trials", "search_trials"), ("search_seed", "search_seed")):
        value = getattr(args, opt, None)
        if value is not None:
            given[name] = value

    def scoped(name: str, items: Sequence[Tuple[str, str, Any]]) -> None:
        if not items:
            return
        merged: Dict[str, Dict[str, Any]] = {k: dict(v) for k, v in (given.get(name) or {}).items()}
        for scope, key, value in items:
            merged.setdefault(scope, {})[key] = value
        given[name] = merged

    scoped("data_kwargs", args.data_arg)
    scoped("fusion_kwargs", args.fusion_arg)
    scoped("objective_kwargs", args.objective_arg)
    if args.objective:
        given["objectives"] = {**(given.get("objectives") or {}), **{f: n.lower() for f, n in args.objective}}
    if args.fusion_lr_mult:
        mults: Dict[str, float] = dict(given.get("fusion_lr_mult") or {})
        for fusion, value in args.fusion_lr_mult:
            try:
                mults[fusion] = float(value)
            except ValueError:
                raise ValueError(f"--fusion-lr-mult expects FUSION=NUMBER, got {fusion}={value}") from None
        given["fusion_lr_mult"] = mults
    for flag, name, value in (("no_baselines", "baselines", False), ("no_plots", "plots", False),
                              ("fresh", "resume", False), ("keep_going", "fail_fast", False)):
        if getattr(args, flag):
            given[name] = value
    given["progress"] = False if args.quiet else None
    return BenchmarkConfig.quick_config(**given) if args.quick else BenchmarkConfig(**given)


def source_of(args: argparse.Namespace) -> Optional[Tuple[str, str]]:
    """``(file name, text)`` of the ``--config`` file, to save beside the results."""
    if not getattr(args, "config", None):
        return None
    return Path(args.config).name, Path(args.config).read_text(encoding="utf-8")
