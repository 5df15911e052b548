"""Command line: ``multizoo-ext train ...`` (also ``python -m multizoo_ext``).

Choices for ``--dataset`` and ``--fusion`` come from the registries, so a newly registered
fusion or dataset appears here without editing this file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from multizoo_ext import __version__
from multizoo_ext.registry import list_datasets, list_fusions
from multizoo_ext.utils import parse_value

logger = logging.getLogger("multizoo_ext.cli")


def key_value(text: str) -> Dict[str, Any]:
    """``argparse`` type of ``KEY=VALUE`` options: ``{key: value}``, the value as JSON when
    possible (numbers, true/false, null, lists), else the string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    return {key: parse_value(value)}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from multizoo_ext.builder import DEFAULT_EMBED_DIM, DEFAULT_ENCODER, DEFAULT_HIDDEN, ENCODER_CHOICES, PLAIN_OBJECTIVE
    from multizoo_ext.registry import list_objectives

    p.add_argument("--dataset", default="digits", choices=list_datasets(),
                   help="registered dataset (default: digits, bundled with scikit-learn, no download)")
    p.add_argument("--data-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="extra keyword for the dataset's get_dataloader, e.g. --data-arg path=data/ROSMAP "
                        "(repeatable)")
    p.add_argument("--fusion", default="concat", choices=list_fusions(), help="registered fusion (default: concat)")
    p.add_argument("--fusion-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="extra keyword for the fusion's constructor, e.g. --fusion-arg rank=8 (repeatable; "
                        "null passes None)")
    p.add_argument("--objective", default=None, choices=[PLAIN_OBJECTIVE] + list_objectives(),
                   help="objective factory; default: the one the fusion's recipe names (refnet -> refnet, "
                        f"deq -> deq, others: the task's plain loss); '{PLAIN_OBJECTIVE}' forces the plain loss")
    p.add_argument("--objective-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="extra keyword for the objective factory, e.g. --objective-arg ms_weight=0 (repeatable)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, choices=list(ENCODER_CHOICES),
                   help=f"per-modality encoder: an MLP to --embed-dim, or identity (default: {DEFAULT_ENCODER})")
    p.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN,
                   help=f"encoder hidden width (default: {DEFAULT_HIDDEN})")
    p.add_argument("--embed-dim", type=int, default=DEFAULT_EMBED_DIM,
                   help=f"encoder output width (default: {DEFAULT_EMBED_DIM})")
    p.add_argument("--epochs", type=int, default=20, help="maximum training epochs (default: 20)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of AdamW (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default: 1e-2)")
    p.add_argument("--fusion-lr-mult", type=float, default=None,
                   help="learning-rate multiplier for the fusion (default: the fusion's recipe: 0.1 for deq, "
                        "1 for the others)")
    p.add_argument("--early-stop", action="store_true", help="stop after 8 epochs without validation gain")
    p.add_argument("--seed", type=int, default=0, help="random seed for data order and weights (default: 0)")
    p.add_argument("--device", default=None,
                   help="'cpu', 'cuda', 'cuda:1', ... (default: cuda if available, else cpu)")
    p.add_argument("--output", default=None,
                   help="folder for best.pt, best.json and results.json (default: a new folder "
                        "runs/train/DATASET-FUSION-sSEED-TIME per run); an existing run there is kept unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine: re-run under 'python -m torch.distributed.run "
                        "--nproc_per_node N' (gloo on CPU, NCCL on GPUs; --batch-size is per process; default: 1)")


def _merged(pairs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    return {k: v for d in pairs for k, v in d.items()}


def run_train(args: argparse.Namespace) -> Dict[str, Any]:
    """Train one model as the CLI's ``train`` does; return the results row (a dict).

    The method (fusion, objective, learning-rate multiplier) comes from
    :func:`multizoo_ext.builder.build_method`, the builder the benchmark runner uses too, so
    ``train --fusion X`` trains X as its registered recipe says.
    """
    from multizoo_ext.builder import infer_data_spec, seeded_loaders, seeded_method
    from multizoo_ext.runs import new_run_dir, prepare_output
    from multizoo_ext.training_structures.supervised import test, train

    data_kwargs = _merged(args.data_arg)
    # the runner's order of seeding (multizoo_ext.builder): same seed and settings, same numbers
    spec = infer_data_spec(seeded_loaders(args.dataset, args.seed, args.batch_size, **data_kwargs)[0])
    method = seeded_method(spec, args.fusion, args.seed, encoder=args.encoder, hidden=args.hidden,
                           embed_dim=args.embed_dim, fusion_kwargs=_merged(args.fusion_arg), objective=args.objective,
                           objective_kwargs=_merged(args.objective_arg), fusion_lr_mult=args.fusion_lr_mult)
    train_dl, valid_dl, test_dl = seeded_loaders(args.dataset, args.seed, args.batch_size, **data_kwargs)
    from multizoo_ext.training_structures import distributed

    distributed.init_from_env()  # under --nproc / torchrun: rank 0 picks and prepares the folder
    out = None
    if distributed.is_main():
        out = prepare_output(args.output or new_run_dir("runs/train", f"{args.dataset}-{args.fusion}-s{args.seed}"),
                             overwrite=args.overwrite)
    out = Path(distributed.broadcast_object(out))
    args.output = str(out)
    t0 = time.perf_counter()
    res = train(method.encoders, method.fusion, method.head, train_dl, valid_dl, args.epochs,
                early_stop=args.early_stop, task=spec.task, optimtype=torch.optim.AdamW, lr=args.lr,
                weight_decay=args.weight_decay, save=str(out / "best.pt"), device=args.device, seed=args.seed,
                progress=not args.quiet, **method.train_kwargs(),
                config={"dataset": args.dataset, "data_kwargs": data_kwargs, "seed": args.seed,
                        "method": method.settings, "lr": args.lr, "weight_decay": args.weight_decay,
                        "batch_size": args.batch_size, "version": __version__})
    metrics = test(res.model, test_dl, task=spec.task, no_robust=True, full=True, device=args.device)
    row = {"dataset": args.dataset, "fusion": args.fusion, "task": spec.task, "seed": args.seed,
           "method": method.settings, "epochs_run": len(res.history), "best_epoch": res.best_epoch,
           "seconds_per_epoch": res.seconds_per_epoch, "parameters": res.parameters,
           "total_seconds": time.perf_counter() - t0, "test": metrics, "history": res.history}
    if distributed.is_main():
        (out / "results.json").write_text(json.dumps(row, indent=2))
    return row


_SHOWN = {"classification": ["accuracy", "f1_macro", "auroc"], "multilabel": ["f1_micro", "f1_macro", "auroc"],
          "regression": ["mse", "mae"]}


def _add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a folder written by 'multizoo-ext train' (best.pt + best.json)")
    p.add_argument("--dataset", default=None, choices=list_datasets(),
                   help="dataset to score on (default: the one the run was trained on, same split)")
    p.add_argument("--data-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="extra keyword for the dataset's get_dataloader (repeatable)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the run's)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the run's)")
    p.add_argument("--device", default=None, help="'cpu', 'cuda', ... (default: cpu)")


def run_evaluate(args: argparse.Namespace) -> str:
    """Rebuild a saved run and score it; return a Markdown table of the test metrics."""
    from multizoo_ext.runs import evaluate_run, load_model

    run = load_model(args.run_dir)
    metrics = evaluate_run(run, args.dataset, _merged(args.data_arg), args.batch_size, args.seed,
                           args.device)
    task = run.config["method"]["spec"]["task"]
    keys = [k for k in _SHOWN[task] if k in metrics]
    head = ["run", "dataset"] + [f"test {k}" for k in keys] + ["n"]
    vals = [str(run.path), args.dataset or str(run.config.get("dataset"))] + [f"{metrics[k]:.4f}" for k in keys] + [
        str(metrics.get("n", ""))]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(vals) + " |"])


def format_results(row: Dict[str, Any]) -> str:
    """A Markdown table of the test metrics, time per epoch and parameter count."""
    keys = _SHOWN[row["task"]]
    head = ["dataset", "fusion"] + [f"test {k}" for k in keys] + ["s/epoch", "epochs", "parameters"]
    vals = [row["dataset"], row["fusion"]] + [f"{row['test'][k]:.4f}" for k in keys] + [
        f"{row['seconds_per_epoch']:.3f}", str(row["epochs_run"]), f"{row['parameters']:,}"]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(vals) + " |"])


# --- benchmark subcommand (options and runner live in multizoo_ext/runner/) ---
def _add_benchmark_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    from multizoo_ext.runner import add_benchmark_arguments

    p = sub.add_parser("benchmark", parents=list(parents), help="run a grid of fusions x datasets x seeds and print a mean ± std table",
                       description="Train every --fusions on every --datasets for every --seeds with one config "
                                   "(each fusion as its registered recipe says, with your overrides), plus a "
                                   "best-single-modality and a logistic-regression baseline per dataset. Writes one "
                                   "file per run to --output/runs/ as it finishes (resumable: finished runs are "
                                   "reused; several runners may share a folder), results.json (index), results.md "
                                   "(mean ± std tables), results.csv, summary.csv, config.json and figures (with "
                                   "matplotlib).")
    add_benchmark_arguments(p)


def _run_benchmark_command(args: argparse.Namespace) -> int:
    import importlib.util

    from multizoo_ext.runner import config_from_args, run_benchmark
    from multizoo_ext.runner.options import source_of

    runs = _guarded(lambda a: run_benchmark(config_from_args(a), config_text=source_of(a)), args)
    if runs is None:
        return 2
    print(runs.markdown)
    if not getattr(args, "no_plots", False) and importlib.util.find_spec("matplotlib") is None:
        print("no figures: matplotlib is not installed (pip install 'multizoo-ext[plot]', or pip install matplotlib)")
    print(f"{runs.computed} run(s) computed, {runs.reused} reused from an earlier run")
    if runs.moved_to is not None:
        print(f"moved the earlier results to {runs.moved_to}")
    for path in runs.paths:
        print(f"wrote {path}")
    return 0


#: What a user's input can raise on its way through a command: reported in one line, exit 2.
_USER_ERRORS = (ValueError, TypeError, KeyError, OSError, FloatingPointError, zipfile.BadZipFile,
                pickle.UnpicklingError)


def _guarded(command: Any, args: argparse.Namespace) -> Any:
    """Run ``command(args)``; a user error becomes one line on stderr (and None); -v also
    logs its traceback."""
    try:
        return command(args)
    except _USER_ERRORS as exc:
        if getattr(args, "verbose", False):
            logger.info("traceback of the error below", exc_info=True)
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {text or type(exc).__name__}", file=sys.stderr)
        return None


def _relaunch_distributed(nproc: int, argv: Sequence[str]) -> int:
    """Run this command again in ``nproc`` processes under ``torch.distributed.run`` (single
    machine, a free local port); the children see ``WORLD_SIZE`` and train data-parallel."""
    if nproc < 1:
        print(f"error: --nproc must be >= 1, got {nproc}", file=sys.stderr)
        return 2
    import subprocess

    rest, skip = [], False  # the children run without --nproc (torchrun's parser would take it for its own)
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "multizoo_ext", *rest]
    logger.info("launching %s", " ".join(cmd))
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multizoo-ext",
        description="ReFNet and DEQ fusion for MultiBench-style multimodal experiments.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each epoch (also after the command)")
    verbose = argparse.ArgumentParser(add_help=False)  # so -v works after the subcommand too
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log each epoch, and show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_train = sub.add_parser("train", parents=[verbose],
                             help="train one fusion on one dataset and print a results table",
                             description="Train encoders + a fusion + a head as the fusion's registered recipe "
                                         "says (its objective and fusion learning rate), select the best epoch on "
                                         "the validation split, and report test metrics.")
    _add_train_args(p_train)
    p_eval = sub.add_parser("evaluate", parents=[verbose], help="rebuild a saved run and score it on a dataset",
                            description="Rebuild the model a 'multizoo-ext train' folder records, load its best "
                                        "weights (weights_only) and print its test metrics.")
    _add_evaluate_args(p_eval)
    p_list = sub.add_parser("list", parents=[verbose],
                            help="list the datasets, fusions, encoders and objectives train accepts")
    p_list.set_defaults(command="list")
    _add_benchmark_parser(sub, [verbose])
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "list":
        from multizoo_ext.builder import ENCODER_CHOICES, PLAIN_OBJECTIVE
        from multizoo_ext.registry import list_encoders, list_objectives
        for kind, names in [("datasets", list_datasets()), ("fusions", list_fusions()),
                            ("encoders", list(ENCODER_CHOICES)), ("objectives", [PLAIN_OBJECTIVE] + list_objectives())]:
            print(f"{kind}: {', '.join(names)}")
        others = [n for n in list_encoders() if n not in ENCODER_CHOICES]
        print(f"(also registered for the Python API, for sequence and image inputs: {', '.join(others)})")
        return 0
    if args.command == "train" and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_distributed(args.nproc, list(sys.argv[1:] if argv is None else argv))
    if args.command == "train":
        row = _guarded(run_train, args)
        if row is None:
            return 2
        from multizoo_ext.training_structures import distributed

        if distributed.is_main():
            print(format_results(row))
            print(f"\nweights and results in {args.output}/ (best.pt, best.json, results.json)")
        if distributed.is_distributed():
            torch.distributed.destroy_process_group()
        return 0
    if args.command == "evaluate":
        table = _guarded(run_evaluate, args)
        if table is None:
            return 2
        print(table)
        return 0
    if args.command == "benchmark":
        return _run_benchmark_command(args)
    parser.print_help()
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
