"""The published DEQ fusion layer (fusion ``deq_paper``) in the authors' ROSMAP setting.

The authors' code (jinhong-ni/DEQFusion, folder ``experiments/BRCA``: the MM-Dynamics model
``MMDynamic`` of ``mm_model.py`` with their DEQ fusion module, trained by ``train_test_deq.py``)
is imported from a checkout outside this repository, as ``bench_deq.py`` does, and patched in
memory only for the CPU (see ``benchmarks/deq_reference.md``). Per seed the script trains their
model three times, everything else equal:

- ``theirs``: their ``MMDynamic`` with their DEQ fusion module;
- ``deq_paper``: the same model, built from the same seed (so the same backbone and classifier
  weights), with its ``deq_fusion`` replaced by our registered fusion ``deq_paper`` into which
  their freshly initialised fusion's parameters are copied (``bench_deq._param_pairs``; the
  summed injection's weights start at 1 and its bias at 0, i.e. their plain sum);
- ``deq`` (``--variants``): our default layer, freshly initialised after their model (it has no
  counterpart of their weights: zero gate and residual branches, projected injection).

Their setting, reproduced by calling their functions: ``prepare_trte_data`` (MOGONET CSVs, the
three views mRNA / DNA methylation / miRNA, min-max scaled on the training split), ``MMDynamic``
with the ROSMAP branch of their ``train()`` (hidden width 300, 2 classes, dropout 0.5) and the
defaults of their ``main.py`` argument parser (Jacobian loss weight 20, Anderson, 55 / 56
iterations, ``stop_mode='abs'``), Adam (learning rate 1e-4, weight decay 1e-4) with
``StepLR(step_size=500, gamma=0.2)``, full-batch training (their ``train_epoch``: one step per
epoch on all 245 training samples, gradient norm clipped at 30), evaluation with their
``test_epoch`` every 50 epochs and their selection: the test epoch with the largest
accuracy + weighted F1 + macro F1 (strictly larger replaces). Their ROSMAP branch trains 1000
epochs; ``--epochs`` sets the count (epochs 0..N as in their loop). Besides the selected
epoch's metrics the script reports the last epoch's (no selection on the test set).

Checks: (1) the same function at initialisation: ``max |f_theirs(z) - f_ours(z)|`` at a random
state for the training batch's features, and the largest difference of the initial models'
logits (each with its own solver); (2) their trained model (the selected checkpoint) loaded into
the model with ``deq_paper``: largest logit difference and prediction agreement on the test set.

Usage (from the repository root, checkout as in ``benchmarks/deq_reference.md``)::

    python benchmarks/deq_rosmap_reference.py --reference /tmp/deqfusion --seeds 0 1 2 \\
        --epochs 300 --data ../shared/data/ROSMAP --out runs/deq_rosmap.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import inspect
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deq import (  # noqa: E402  (the benchmark next to this script)
    ReferenceUnavailable, _load_module, _param_pairs, _silent_print, environment, git_commit,
    importing_reference, reference_patches)

from multizoo_ext.fusions.deq import DEQFusion  # noqa: E402
from multizoo_ext.registry import create_fusion  # noqa: E402

#: Files of the authors' MM-Dynamics experiment (relative to the checkout).
EXPERIMENT_DIR = Path("experiments") / "BRCA"
EXPERIMENT_FILES = ("solver.py", "jacobian.py", "mm_model.py", "utils.py", "train_test_deq.py", "main.py")
#: The ROSMAP branch of their ``train()``; checked against its source at load time.
ROSMAP = {"hidden_dim": [300], "lr": 1e-4, "step_size": 500, "num_class": 2, "num_epoch": 1000}
_ROSMAP_SOURCE = ("hidden_dim = [300]", "num_epoch = 1000", "lr = 1e-4", "step_size = 500", "num_class = 2",
                  "weight_decay=1e-4", "gamma=0.2", "test_inverval = 50", "dropout=0.5")
TEST_INTERVAL = 50
VIEWS = ["mrna", "dna", "mirna"]
VARIANTS = ("theirs", "deq_paper", "deq")


# ============================================================================ their code
def load_experiment(path: str) -> types.SimpleNamespace:
    """Import their ``mm_model``, ``train_test_deq`` and ``main`` (with their ``solver``,
    ``jacobian``, ``utils``) from ``<checkout>/experiments/BRCA``.

    Import-time patches (as ``bench_deq.load_reference``): a ``termcolor`` stub when it is not
    installed; the generic top-level names their files import each other by exist in
    ``sys.modules`` only during the import; ``print`` -> no-op in their modules (their forward
    prints the solver's step count, their ``train_epoch`` the losses of every epoch).

    Raises:
        ReferenceUnavailable: files missing, import failed, or their ROSMAP settings are not
        the ones this script reproduces.
    """
    root = Path(path).expanduser().resolve()
    exp = root / EXPERIMENT_DIR
    missing = [f for f in EXPERIMENT_FILES if not (exp / f).is_file()]
    if missing:
        raise ReferenceUnavailable(f"{exp} lacks {', '.join(missing)}: not a DEQFusion checkout")
    names = ("solver", "jacobian", "mm_model", "utils", "train_test_deq", "main", "termcolor")
    with importing_reference(exp, names):
        if importlib.util.find_spec("termcolor") is None:
            sys.modules["termcolor"] = types.SimpleNamespace(colored=lambda text, *a, **k: text)
        mods = {n: _load_module(n, exp / f"{n}.py") for n in names[:-1]}
    for mod in mods.values():
        mod.print = _silent_print
    source = inspect.getsource(mods["train_test_deq"].train)
    absent = [s for s in _ROSMAP_SOURCE if s not in source]
    if absent:
        raise ReferenceUnavailable(f"their train() no longer has {absent}; update ROSMAP in this script")
    # the defaults of their main.py's parser, with the three views switched on
    argv = sys.argv
    try:
        sys.argv = ["main.py", "-mrna", "-dna", "-mirna"]
        args = mods["main"].parse_args()
    finally:
        sys.argv = argv
    return types.SimpleNamespace(mm=mods["mm_model"], tt=mods["train_test_deq"], args=args, root=str(root),
                                 commit=git_commit(root))


def build_their_model(exp: types.SimpleNamespace, dim_list: Sequence[int], seed: int) -> nn.Module:
    """Their ``MMDynamic`` exactly as their ``train()`` builds it for ROSMAP, under ``seed``."""
    a = exp.args
    torch.manual_seed(seed)
    np.random.seed(seed)
    return exp.mm.MMDynamic(list(dim_list), ROSMAP["hidden_dim"], ROSMAP["num_class"], dropout=0.5,
                            jacobian_weight=a.jacobian_weight, f_thres=a.f_thres, b_thres=a.b_thres,
                            stop_mode=a.stop_mode, use_deq=not a.use_default_fuse, deq=not a.no_deq,
                            num_layers=a.num_layers, solver=a.solver)


# ============================================================================ our layer in it
class OursInTheirModel(nn.Module):
    """Our :class:`DEQFusion` behind their fusion module's interface:
    ``forward(features, fusion_feature) -> (fused (B, d), jacobian_loss (1, 1), trace)``.

    ``fusion_feature`` (their plain sum of the features) is not read: our summed injection
    ``sum_i w_i x_i + b`` computes it (``w_i = 1``, ``b = 0`` when copied from theirs). The
    Jacobian penalty is ours (same Hutchinson estimate, 2 vectors, divided by the state's
    size), added by their model with their weight.
    """

    def __init__(self, fusion: DEQFusion) -> None:
        super().__init__()
        self.fusion = fusion

    def forward(self, features: List[torch.Tensor], fusion_feature: torch.Tensor):
        fused = self.fusion(list(features))
        if self.fusion.jac_loss is not None:
            jac = self.fusion.take_jacobian_penalty(fused.shape[0])
        else:
            jac = fused.new_zeros(())
        return fused, jac.view(1, -1), {"rel_trace": []}


def ours_from_theirs(their_fusion: nn.Module, width: int, modalities: int) -> DEQFusion:
    """``deq_paper`` with their fusion module's parameters (``bench_deq._param_pairs``)."""
    ours = create_fusion("deq_paper", input_dims=[width] * modalities, width=width)
    pairs = _param_pairs(their_fusion, ours)
    covered = {id(o) for _, o in pairs} | {id(ours.weights), id(ours.bias)}
    extra = [n for n, p in ours.named_parameters() if id(p) not in covered]
    if extra or len({id(r) for r, _ in pairs}) != sum(1 for _ in their_fusion.parameters()):
        raise ValueError(f"deq_paper and their fusion module do not correspond (ours has {extra} extra)")
    with torch.no_grad():
        for r, o in pairs:
            o.copy_(r)
        ours.weights.fill_(1.0)     # their injection is the plain sum of the features
        ours.bias.zero_()
    return ours


def build_variant(exp: types.SimpleNamespace, variant: str, dim_list: Sequence[int], seed: int) -> nn.Module:
    model = build_their_model(exp, dim_list, seed)
    width, M = ROSMAP["hidden_dim"][-1], len(dim_list)
    if variant == "deq_paper":
        model.deq_fusion = OursInTheirModel(ours_from_theirs(model.deq_fusion, width, M))
    elif variant == "deq":
        model.deq_fusion = OursInTheirModel(create_fusion("deq", input_dims=[width] * M, width=width))
    elif variant != "theirs":
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return model


# ============================================================================ measurements
@contextlib.contextmanager
def _captured_fusion_inputs(model: nn.Module) -> Iterator[Dict[str, Any]]:
    """The (features, fusion_feature) their model hands its fusion module in the next forward."""
    box: Dict[str, Any] = {}
    handle = model.deq_fusion.register_forward_pre_hook(lambda m, inp: box.update(inputs=inp))
    try:
        yield box
    finally:
        handle.remove()


def compare(exp: types.SimpleNamespace, theirs: nn.Module, swapped: nn.Module, data: Sequence[torch.Tensor],
            seed: int) -> Dict[str, float]:
    """Their model against the same model with ``deq_paper`` (eval mode, no dropout) on one
    batch: the fusion map at a random state (same function?), the logits (each with its own
    solver), and how far each solver's state is from a fixed point (per-sample relative
    residual ``||f(z) - z|| / ||f(z)||`` under their map; outputs can only agree where both
    solvers reach the fixed point)."""
    theirs.eval(), swapped.eval()
    mm, ours = exp.mm, swapped.deq_fusion.fusion
    with torch.no_grad(), reference_patches(torch.device("cpu")):
        with _captured_fusion_inputs(theirs) as box:
            logit_t, _ = theirs.infer(list(data))
        features, fusion_feature = box["inputs"]
        logit_o, _ = swapped.infer(list(data))
        info = ours.last_info
        x_list = list(features) + [fusion_feature]
        cutoffs = [t.shape[1] for t in x_list]
        f_t = lambda z: mm.list2vec(theirs.deq_fusion.func_(mm.vec2list(z, cutoffs), x_list))  # noqa: E731
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(fusion_feature.shape[0], sum(cutoffs), generator=g)
        ft_z = f_t(z)
        fo_z = ours.deq_function(list(features))(z)
        # their solver's state, as their forward computes it
        z_t = theirs.deq_fusion.f_solver(f_t, torch.zeros_like(z), threshold=theirs.deq_fusion.f_thres,
                                         stop_mode=theirs.deq_fusion.stop_mode)["result"]
        fz = f_t(z_t)
        rel_t = (fz - z_t).norm(dim=1) / (fz.norm(dim=1) + 1e-9)
    return {"map_max_abs_diff": float((ft_z - fo_z).abs().max()), "map_max_abs": float(ft_z.abs().max()),
            "logit_max_abs_diff": float((logit_t - logit_o).abs().max()),
            "prediction_agreement": float((logit_t.argmax(1) == logit_o.argmax(1)).float().mean()),
            "rel_residual_theirs_median": float(rel_t.median()),
            "rel_residual_ours_median": float(info["rel_residual"].median()),
            "converged_ours": float(info["converged"].float().mean())}


def _metrics(labels: np.ndarray, prob: np.ndarray) -> Dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
    pred = prob.argmax(1)
    return {"acc": float(accuracy_score(labels, pred)), "f1": float(f1_score(labels, pred)),
            "auroc": float(roc_auc_score(labels, prob[:, 1])),
            "wf1": float(f1_score(labels, pred, average="weighted")),
            "mf1": float(f1_score(labels, pred, average="macro"))}


def train_variant(exp: types.SimpleNamespace, model: nn.Module, data: Dict[str, Any], epochs: int,
                  seed: int) -> Dict[str, Any]:
    """Their training protocol (see the module docstring) with their ``train_epoch`` /
    ``test_epoch``; times the training epochs."""
    tt = exp.tt
    optimizer = torch.optim.Adam(model.parameters(), lr=ROSMAP["lr"], weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=ROSMAP["step_size"], gamma=0.2)
    torch.manual_seed(seed + 1000)          # the same dropout draws for every variant of a seed
    times: List[float] = []
    history: List[Dict[str, Any]] = []
    best: Optional[Dict[str, Any]] = None
    best_state = None
    with reference_patches(torch.device("cpu")):
        for epoch in range(epochs + 1):
            t0 = time.perf_counter()
            tt.train_epoch(data["tr"], data["y_tr"], model, optimizer, None, epoch)
            times.append(time.perf_counter() - t0)
            scheduler.step()
            if epoch % TEST_INTERVAL == 0:
                prob, _, _ = tt.test_epoch(data["te"], model)
                m = {"epoch": epoch, **_metrics(data["y_te"], prob)}
                history.append(m)
                if best is None or m["acc"] + m["wf1"] + m["mf1"] > best["acc"] + best["wf1"] + best["mf1"]:
                    best, best_state = m, copy.deepcopy(model.state_dict())
    return {"selected": best, "last": history[-1], "history": history,
            "sec_per_epoch": statistics.fmean(times), "sec_per_epoch_median": statistics.median(times),
            "best_state": best_state}


def trained_checkpoint_check(exp: types.SimpleNamespace, state: Dict[str, torch.Tensor], dim_list: Sequence[int],
                             data: Dict[str, Any], seed: int) -> Dict[str, float]:
    """Their trained (selected) model loaded into the model with ``deq_paper``: test logits."""
    theirs = build_their_model(exp, dim_list, seed)
    theirs.load_state_dict(state)
    swapped = build_their_model(exp, dim_list, seed)
    swapped.load_state_dict(state)
    swapped.deq_fusion = OursInTheirModel(ours_from_theirs(swapped.deq_fusion, ROSMAP["hidden_dim"][-1],
                                                           len(dim_list)))
    res = compare(exp, theirs, swapped, data["te"], seed)
    with torch.no_grad(), reference_patches(torch.device("cpu")):
        res["acc_theirs"] = float((theirs.infer(list(data["te"]))[0].argmax(1).numpy() == data["y_te"]).mean())
        res["acc_deq_paper"] = float((swapped.infer(list(data["te"]))[0].argmax(1).numpy() == data["y_te"]).mean())
    return res


def load_data(exp: types.SimpleNamespace, folder: str) -> Dict[str, Any]:
    """Their ``prepare_trte_data`` on the MOGONET ROSMAP files (their folder layout)."""
    root = Path(folder).expanduser().resolve()
    need = ["labels_tr.csv", "labels_te.csv"] + [f"{i}_{s}.csv" for i in (1, 2, 3) for s in ("tr", "te")]
    missing = [n for n in need if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not the MOGONET ROSMAP folder (missing {', '.join(missing)})")
    tr, te, idx, labels = exp.tt.prepare_trte_data(str(root), use_view=VIEWS)
    y_tr = torch.LongTensor(labels[idx["tr"]])
    return {"tr": tr, "te": te, "y_tr": y_tr, "y_te": labels[idx["te"]], "dims": [t.shape[1] for t in tr],
            "n_tr": len(idx["tr"]), "n_te": len(idx["te"])}


# ============================================================================ run + report
def run(reference: str, data_dir: str, seeds: Sequence[int], epochs: int, variants: Sequence[str],
        out_path: Optional[str] = None) -> Dict[str, Any]:
    torch.set_num_threads(1)
    exp = load_experiment(reference)
    data = load_data(exp, data_dir)
    out: Dict[str, Any] = {"reference": {"root": exp.root, "commit": exp.commit,
                                         "experiment": str(EXPERIMENT_DIR), "main_defaults": vars(exp.args)},
                           "setting": {**ROSMAP, "epochs_run": epochs, "test_interval": TEST_INTERVAL, "views": VIEWS,
                                       "n_train": data["n_tr"], "n_test": data["n_te"], "dims": data["dims"]},
                           "environment": environment(1), "seeds": {}}
    for seed in seeds:
        rec: Dict[str, Any] = {}
        rec["same_function"] = compare(exp, build_variant(exp, "theirs", data["dims"], seed),
                                             build_variant(exp, "deq_paper", data["dims"], seed), data["tr"], seed)
        print(f"seed {seed} same function: {rec['same_function']}", flush=True)
        for variant in variants:
            model = build_variant(exp, variant, data["dims"], seed)
            res = train_variant(exp, model, data, epochs, seed)
            state = res.pop("best_state")
            if variant == "theirs":
                rec["trained_checkpoint"] = trained_checkpoint_check(exp, state, data["dims"], data, seed)
                print(f"seed {seed} their trained model in deq_paper: {rec['trained_checkpoint']}", flush=True)
            rec[variant] = res
            s = res["selected"]
            print(f"seed {seed} {variant}: selected epoch {s['epoch']} acc {s['acc']:.4f} f1 {s['f1']:.4f} "
                  f"auroc {s['auroc']:.4f}; last acc {res['last']['acc']:.4f}; "
                  f"{res['sec_per_epoch']:.3f} s/epoch", flush=True)
        out["seeds"][str(seed)] = rec
        if out_path:   # after every seed, so a cut run keeps its finished seeds
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(out, indent=1))
    return out


def _mean_std(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def to_markdown(result: Dict[str, Any]) -> str:
    seeds = list(result["seeds"])
    variants = [v for v in VARIANTS if v in result["seeds"][seeds[0]]]
    lines = ["| seed | " + " | ".join(f"{v}: acc / F1 / AUROC (epoch)" for v in variants)
             + " | " + " | ".join(f"{v}: last epoch acc / AUROC" for v in variants) + " |",
             "|---|" + "---|" * (2 * len(variants))]
    for s in seeds:
        r = result["seeds"][s]
        cells = [f"{r[v]['selected']['acc']:.3f} / {r[v]['selected']['f1']:.3f} / {r[v]['selected']['auroc']:.3f} "
                 f"({r[v]['selected']['epoch']})" for v in variants]
        cells += [f"{r[v]['last']['acc']:.3f} / {r[v]['last']['auroc']:.3f}" for v in variants]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    cells = []
    for v in variants:
        cells.append(" / ".join(_mean_std([result["seeds"][s][v]["selected"][k] for s in seeds])
                                for k in ("acc", "f1", "auroc")))
    cells += [" / ".join(_mean_std([result["seeds"][s][v]["last"][k] for s in seeds]) for k in ("acc", "auroc"))
              for v in variants]
    lines.append("| mean ± std | " + " | ".join(cells) + " |")
    lines += ["", "| | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    lines.append("| seconds per epoch (mean over seeds) | " + " | ".join(
        _mean_std([result["seeds"][s][v]["sec_per_epoch"] for s in seeds]) for v in variants) + " |")
    if "theirs" in variants:
        base = statistics.fmean(result["seeds"][s]["theirs"]["sec_per_epoch"] for s in seeds)
        lines.append("| time per epoch vs theirs | " + " | ".join(
            f"{statistics.fmean(result['seeds'][s][v]['sec_per_epoch'] for s in seeds) / base:.3f}x"
            for v in variants) + " |")
    lines += ["", "| seed | map: max abs diff (max abs value) | initial: logits max abs diff / prediction agreement "
              "/ median rel. residual theirs, ours | trained: test logits max abs diff / prediction agreement / "
              "median rel. residual theirs, ours |", "|---|---|---|---|"]
    for s in seeds:
        r = result["seeds"][s]
        cells = [f"{r['same_function']['map_max_abs_diff']:.2e} ({r['same_function']['map_max_abs']:.2f})"]
        for c in (r["same_function"], r.get("trained_checkpoint")):
            cells.append("-" if c is None else
                         f"{c['logit_max_abs_diff']:.2e} / {c['prediction_agreement']:.3f} / "
                         f"{c['rel_residual_theirs_median']:.1e}, {c['rel_residual_ours_median']:.1e}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", help="checkout of jinhong-ni/DEQFusion (outside this repository)")
    p.add_argument("--data", default="../shared/data/ROSMAP", help="MOGONET ROSMAP folder (1_tr.csv, labels_tr.csv, ...)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=300, help="training epochs (their loop runs epochs 0..N); their ROSMAP "
                   "branch uses 1000")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--out", default=None, help="JSON file for the full result")
    p.add_argument("--markdown", default=None, help="Markdown file for the tables")
    p.add_argument("--from-json", default=None, help="only print the tables of an earlier run's --out file")
    a = p.parse_args(argv)
    if a.from_json:
        print(to_markdown(json.loads(Path(a.from_json).read_text())))
        return {}
    if not a.reference:
        p.error("--reference PATH (a checkout of jinhong-ni/DEQFusion) is required unless --from-json is given")
    if a.epochs < 0:
        p.error(f"--epochs must be >= 0, got {a.epochs}")
    try:
        result = run(a.reference, a.data, a.seeds, a.epochs, a.variants, a.out)
    except (ReferenceUnavailable, FileNotFoundError) as exc:
        p.error(str(exc))
    md = to_markdown(result)
    print(md)
    if a.markdown:
        Path(a.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(a.markdown).write_text(md + "\n")
    return result


if __name__ == "__main__":
    main()
