"""ReFNet label efficiency: does refiner-only pre-training on unlabelled rows help fine-tuning?

For one dataset, label fractions and seeds this trains

- ``concat``: Concat fusion, plain cross-entropy, on the labelled part only (reference);
- ``sup``: ReFNet(inner, target) with its recipe objective (task + 0.1 x refiner + 0.1 x
  Multi-Similarity) on the labelled part only;
- ``pre``: the same model, first pre-trained with ``refiner_only_objective`` on the unlabelled
  rest of the training split (at 100 %: on the same rows, labels unused), then fine-tuned like
  ``sup``.

Every ``pre`` variant is paired with the ``sup`` run of the same architecture (same inner
fusion, refiner target and detach setting, same seed, same initial weights), and the table
reports the paired difference. Model selection: the best epoch on the full validation split.
Small labelled sets are cycled so that every fine-tuning gets at least ``--min-steps``
optimiser steps; pre-training runs ``--pretrain-steps`` steps (rounded up to whole epochs).

Variant grammar (``--variants``, ``;``-separated): ``kind[,key=value...]`` with kind
``concat``, ``sup`` or ``pre`` and keys

- ``inner``: inner fusion of ReFNet (``concat``, ``transformer``, ``lowrank``, ``tensor``, ``deq``);
- ``target``: ``embedding`` or ``input`` (raw inputs; ``raw_input_dims`` from the data);
- ``detach``: 0/1, ReFNet's ``detach_targets``;
- ``loss``: pre-training refiner loss (``cosine``, ``mse``, ``contrastive``, ``ms``);
- ``steps``: pre-training steps (overrides ``--pretrain-steps``);
- ``mask``: probability that one modality (drawn uniformly) of a sample is zeroed at its
  encoder's output during pre-training; with ``target=input`` the refiner of that modality
  must rebuild its raw input from the other modalities (cross-modal pre-training). Done with
  an encoder wrapper in this script, no library change (see :class:`ModalityMasker`);
- ``name``: label in the table.

Usage (from the repository root)::

    python benchmarks/refnet_label_efficiency.py --dataset digits --seeds 0,1,2 \\
        --variants "concat;pre,inner=concat;pre,inner=transformer,target=input,loss=mse" \\
        --out /tmp/digits.md
    python benchmarks/refnet_label_efficiency.py --dataset ../shared/data/multiview/BBCSport.mat

What teaches (measured with this script, 5 seeds, 5 % / 10 % labels): a fusion that mixes the
modalities (``inner=transformer``) with raw-input targets (``target=input``) and, on sparse
bag-of-words views, the cosine refiner loss (MSE there is dominated by the zeros and hurts).
Concat with embedding targets (the paper's defaults) teaches the encoders nothing: a fixed
projection of ``concat(e_1..e_M)`` recovers every ``e_i`` whatever the encoders do; Concat with
raw-input targets is a per-view autoencoder and helps little. Masking one modality
(``mask=0.5``) is a small extra gain at most.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from multizoo_ext import create_dataset
from multizoo_ext.builder import build_method, infer_data_spec
from multizoo_ext.datasets import split_labeled
from multizoo_ext.objectives import refiner_only_objective
from multizoo_ext.training_structures import pretrain, test, train

logger = logging.getLogger("refnet_label_efficiency")

FRACTIONS = (0.05, 0.10, 0.25, 0.50, 1.0)
#: Reference, the paper's recipe (Concat inside, embedding targets) and the one that teaches.
DEFAULT_VARIANTS = "concat;pre,inner=concat;pre,inner=transformer,target=input,loss=cosine"
_KEYS = {"inner", "target", "detach", "loss", "steps", "mask", "name", "lr", "rw"}


# ----------------------------------------------------------------------------- variants
def parse_variants(text: str) -> List[Dict[str, Any]]:
    """``"concat;pre,inner=transformer,target=input"`` -> list of variant dicts (see module doc)."""
    out = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        kind, *items = [x.strip() for x in part.split(",")]
        if kind not in ("concat", "sup", "pre"):
            raise ValueError(f"variant kind must be concat, sup or pre, got {kind!r} in {part!r}")
        v: Dict[str, Any] = {"kind": kind, "inner": "concat", "target": "embedding", "detach": False,
                             "loss": "cosine", "steps": None, "mask": 0.0, "name": None, "lr": None, "rw": 0.1}
        for it in items:
            key, _, val = it.partition("=")
            if key not in _KEYS:
                raise ValueError(f"unknown variant key {key!r} in {part!r}; expected one of {sorted(_KEYS)}")
            v[key] = val
        v["detach"] = str(v["detach"]).lower() in ("1", "true", "yes")
        v["mask"] = float(v["mask"])
        v["rw"] = float(v["rw"])
        v["steps"] = None if v["steps"] is None else int(v["steps"])
        v["lr"] = None if v["lr"] is None else float(v["lr"])
        if v["name"] is None:
            if kind == "concat":
                v["name"] = "concat"
            else:
                bits = [kind, v["inner"]] + (["input"] if v["target"] == "input" else []) \
                    + (["detach"] if v["detach"] else [])
                if kind == "pre":
                    bits += [v["loss"]] + ([f"mask{v['mask']:g}"] if v["mask"] else []) \
                        + ([f"{v['steps']}st"] if v["steps"] else []) + ([f"lr{v['lr']:g}"] if v["lr"] else [])
                v["name"] = "/".join(bits)
        out.append(v)
    return out


def matched_sup(v: Dict[str, Any]) -> Dict[str, Any]:
    """The supervised-only variant of the same architecture as pre-training variant ``v``."""
    s = dict(v, kind="sup", loss="cosine", steps=None, mask=0.0, lr=None, rw=0.1)
    s["name"] = "/".join(["sup", v["inner"]] + (["input"] if v["target"] == "input" else [])
                         + (["detach"] if v["detach"] else []))
    return s


def _arch_key(v: Dict[str, Any]) -> Tuple[Any, ...]:
    return (v["kind"], v["inner"], v["target"], v["detach"])


# ----------------------------------------------------------------------------- helpers
class ModalityMasker:
    """Shared state of the :class:`MaskedEncoder` wrappers of one model: for every batch it
    draws, per sample, whether to mask and which modality (uniform), when encoder 0 runs."""

    def __init__(self, n_mod: int, p: float, seed: int) -> None:
        self.n_mod, self.p = n_mod, p
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.which: Optional[torch.Tensor] = None  # (B,) modality index, -1 = none masked

    def draw(self, batch: int) -> None:
        which = torch.randint(self.n_mod, (batch,), generator=self.gen)
        keep = torch.rand(batch, generator=self.gen) >= self.p
        self.which = torch.where(keep, torch.full_like(which, -1), which)


class MaskedEncoder(nn.Module):
    """Wraps encoder ``index``: in training mode, zeroes its output ``(B, d)`` for the samples the
    masker picked. Shares the wrapped encoder's parameters (unwrap by using the original)."""

    def __init__(self, encoder: nn.Module, index: int, masker: ModalityMasker) -> None:
        super().__init__()
        self.encoder, self.index, self.masker = encoder, index, masker
        self.out_dim = getattr(encoder, "out_dim", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        if not self.training or self.masker.p <= 0:
            return z
        if self.index == 0 or self.masker.which is None or self.masker.which.shape[0] != z.shape[0]:
            self.masker.draw(z.shape[0])
        drop = (self.masker.which == self.index).to(z.device)
        return z * (~drop).to(z.dtype).view(-1, *([1] * (z.dim() - 1)))


def cycled(loader: DataLoader, min_batches: int, seed: int) -> DataLoader:
    """``loader``, or a loader over the same rows drawing ``min_batches`` batches per epoch when it
    has fewer (successive random permutations, batch ``min(batch_size, n)``)."""
    if len(loader) >= min_batches:
        return loader
    bs = min(loader.batch_size or 32, len(loader.dataset))
    sampler = RandomSampler(loader.dataset, num_samples=min_batches * bs,
                            generator=torch.Generator().manual_seed(seed))
    return DataLoader(loader.dataset, batch_size=bs, sampler=sampler)


def load(dataset: str, seed: int, batch_size: int):
    if dataset.endswith(".mat"):
        return create_dataset("mat", path=dataset, seed=seed, batch_size=batch_size)
    return create_dataset(dataset, seed=seed, batch_size=batch_size)


def _method(spec, v: Dict[str, Any], embed_dim: int):
    if v["kind"] == "concat":
        return build_method(spec, "concat", embed_dim=embed_dim)
    kw: Dict[str, Any] = {"inner": v["inner"], "target": v["target"], "detach_targets": v["detach"]}
    if v["target"] == "input":
        kw["raw_input_dims"] = spec.input_dims
    if v["inner"] == "tensor" and embed_dim ** len(spec.input_dims) > 5000:
        raise ValueError(f"tensor fusion of {len(spec.input_dims)} x {embed_dim}-wide embeddings is too wide")
    return build_method(spec, "refnet", embed_dim=embed_dim, fusion_kwargs=kw)


# ----------------------------------------------------------------------------- one run
def run_one(a: argparse.Namespace, v: Dict[str, Any], frac: float, seed: int,
            data_cache: Dict[int, Any]) -> Dict[str, float]:
    if seed not in data_cache:
        data_cache[seed] = load(a.dataset, seed, a.batch_size)
    train_dl, valid_dl, test_dl = data_cache[seed]
    spec = infer_data_spec(train_dl)
    labeled, unlabeled = split_labeled(train_dl, frac, seed=seed, batch_size=a.batch_size)
    fit_dl = cycled(labeled, math.ceil(a.min_steps / a.epochs), seed)
    embed = a.tensor_embed if v["inner"] == "tensor" and v["kind"] != "concat" else a.embed_dim
    torch.manual_seed(seed)  # same encoders/head/fusion/refiners for sup and pre of one architecture
    m = _method(spec, v, embed)
    t0 = time.perf_counter()
    pre_info: Dict[str, float] = {}
    if v["kind"] == "pre":
        pre_dl = unlabeled if unlabeled is not None else labeled  # 100 %: same rows, labels unused
        steps = v["steps"] or a.pretrain_steps
        epochs = max(1, math.ceil(steps / len(pre_dl)))
        encs: List[nn.Module] = m.encoders
        if v["mask"] > 0:
            masker = ModalityMasker(len(encs), v["mask"], seed)
            encs = [MaskedEncoder(e, i, masker) for i, e in enumerate(encs)]
        obj = refiner_only_objective(refiner_weight=v["rw"], refiner_loss=v["loss"])
        pr = pretrain(encs, m.fusion, pre_dl, epochs, objective=obj, optimtype=torch.optim.AdamW,
                      lr=v["lr"] or a.lr, weight_decay=a.weight_decay, device="cpu", seed=seed, progress=False)
        pre_info = {"pre_loss_first": pr.history[0]["train_loss"], "pre_loss_last": pr.history[-1]["train_loss"],
                    "pre_epochs": epochs}
    res = train(m.encoders, m.fusion, m.head, fit_dl, valid_dl, a.epochs, task=spec.task,
                optimtype=torch.optim.AdamW, lr=a.lr, weight_decay=a.weight_decay, save=None, device="cpu",
                seed=seed, progress=False, track_complexity=False, **m.train_kwargs())
    met = test(res.model, test_dl, task=spec.task, no_robust=True, full=True, device="cpu")
    row = {"accuracy": float(met["accuracy"]), "f1_macro": float(met["f1_macro"]),
           "n_labeled": len(labeled.dataset), "best_epoch": res.best_epoch,
           "seconds": time.perf_counter() - t0, **pre_info}
    logger.info("%s %g%% seed %d: acc %.4f (%d labelled, best epoch %d, %.1fs)%s", v["name"], 100 * frac, seed,
                row["accuracy"], row["n_labeled"], res.best_epoch, row["seconds"],
                f" pre-loss {pre_info['pre_loss_first']:.4f}->{pre_info['pre_loss_last']:.4f}" if pre_info else "")
    return row


# ----------------------------------------------------------------------------- table
def _ms(xs: Sequence[float]) -> str:
    a = np.asarray(xs, dtype=float) * 100
    sd = a.std(ddof=1) if a.size > 1 else 0.0
    return f"{a.mean():.1f} ± {sd:.1f}"


def to_markdown(results: Dict[str, Any]) -> str:
    variants, fracs = results["variants"], results["fractions"]
    runs = results["runs"]
    pre = [v for v in variants if v["kind"] == "pre"]
    cols = [v["name"] for v in variants]
    extra_sup = [matched_sup(v)["name"] for v in pre if matched_sup(v)["name"] not in cols]
    cols += list(dict.fromkeys(extra_sup))
    lines = [f"Command: `{results['command']}`", "",
             f"Dataset `{results['dataset']}`, seeds {results['seeds']}; test accuracy (%) mean ± std over seeds; "
             "Δ = pre − matched sup, paired by seed (mean ± std).", "",
             "| labels | n lab | " + " | ".join(cols) + " | " + " | ".join(f"Δ {v['name']}" for v in pre) + " |",
             "|---|---|" + "---|" * (len(cols) + len(pre))]
    for f in fracs:
        r = runs[f"{f:g}"]
        n = r[cols[0]][0]["n_labeled"]
        cells = [_ms([x["accuracy"] for x in r[c]]) for c in cols]
        deltas = []
        for v in pre:
            a = [x["accuracy"] for x in r[v["name"]]]
            b = [x["accuracy"] for x in r[matched_sup(v)["name"]]]
            deltas.append(_ms([p - q for p, q in zip(a, b)]))
        lines.append(f"| {100 * f:g} % | {n} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", help="registered dataset name or a multi-view .mat path")
    p.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="';'-separated variant specs (module doc)")
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (best validation epoch kept)")
    p.add_argument("--min-steps", type=int, default=200, help="minimum fine-tuning optimiser steps")
    p.add_argument("--pretrain-steps", type=int, default=400, help="pre-training optimiser steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=32)
    p.add_argument("--tensor-embed", type=int, default=16, help="encoder width with inner=tensor")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--out", default=None, help="markdown file (a .json beside it holds every run)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("multizoo_ext").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    fracs = [float(x) for x in a.fractions.split(",") if x.strip()]
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    variants = parse_variants(a.variants)
    todo = list(variants)
    names = {v["name"] for v in variants}
    for v in variants:
        if v["kind"] == "pre" and matched_sup(v)["name"] not in names:
            todo.append(matched_sup(v))
            names.add(matched_sup(v)["name"])
    command = "python benchmarks/refnet_label_efficiency.py " + " ".join(
        shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    results: Dict[str, Any] = {"command": command, "dataset": a.dataset, "seeds": seeds, "fractions": fracs,
                               "variants": variants, "args": vars(a), "runs": {}}
    cache: Dict[int, Any] = {}
    for f in fracs:
        results["runs"][f"{f:g}"] = {v["name"]: [run_one(a, v, f, s, cache) for s in seeds] for v in todo}
    md = to_markdown(results)
    print(md)
    if a.out:
        Path(a.out).write_text(md)
        Path(a.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
