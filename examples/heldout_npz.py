"""Bring your own arrays: benchmark DEQ fusion, ReFNet and baselines on an ``.npz`` file through
the runner's Python API (``run_benchmark``), with no dataset code to write.

An ``.npz`` holds one array per modality (rows = samples, any widths) plus ``labels``::

    np.savez("mine.npz", rna=x_rna, methylation=x_meth, proteins=x_prot, labels=y)

and the registered ``"npz"`` dataset reads it; ``data_kwargs={"npz": {...}}`` passes its
options (``path``, ``test_path`` for a fixed test split in a second file with the same keys,
``normalize``, ``valid_fraction``, ...). Run::

    python examples/heldout_npz.py --npz mine.npz                      # your own file
    python examples/heldout_npz.py --npz mine.npz --test-npz mine_test.npz --epochs 30 --seeds 0 1 2
    python examples/heldout_npz.py --from-mogonet data/ROSMAP    # the demo below

``--from-mogonet FOLDER`` first writes a demo pair of files into ``--output``: a MOGONET-layout
folder (ROSMAP: three 200-column blocks, mRNA / DNA methylation / miRNA) re-cut into **six
modalities of unequal widths** by splitting each block into two column groups
(``--split 50 120 30``: mRNA 50 + 150, methylation 120 + 80, miRNA 30 + 170), keeping the
published train/test split (``train.npz`` and ``test.npz``). That is the "held-out real
dataset with six modalities of unequal widths in a plain array format" check.

The grid: Concat, DEQ fusion (the runner's DEQ defaults: ``jac_reg`` with ``deq_objective``,
fusion at 0.1 x lr as the reference) and ReFNet(Concat) (refiner objective), plus the best-single-modality and
logistic-regression baselines the runner adds. Results: a Markdown table on stdout and
``results.json`` / ``results.md`` in ``--output``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from multizoo_ext.runner import BenchmarkConfig, run_benchmark


def split_columns(block: np.ndarray, first: int) -> Tuple[np.ndarray, np.ndarray]:
    """``block (N, d) -> (block[:, :first], block[:, first:])``."""
    if not 0 < first < block.shape[1]:
        raise ValueError(f"split point {first} must be inside the block's {block.shape[1]} columns")
    return block[:, :first], block[:, first:]


def mogonet_to_six_npz(folder: str, out_dir: Path, split: Sequence[int]) -> Tuple[Path, Path, List[int]]:
    """Write ``train.npz`` / ``test.npz`` with each MOGONET modality split into two column groups.

    Returns:
        the two paths and the modality widths, in file order.
    """
    from multizoo_ext.datasets.mogonet import load_mogonet

    tr, y_tr, te, y_te, mods = load_mogonet(folder)
    if len(split) != len(mods):
        raise ValueError(f"--split needs one split point per modality ({len(mods)}), got {list(split)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, widths = [], []
    for name, blocks, labels in (("train", tr, y_tr), ("test", te, y_te)):
        arrays = {}
        for m, block, first in zip(mods, blocks, split):
            a, b = split_columns(block.astype(np.float32), int(first))
            arrays[f"m{m}a"], arrays[f"m{m}b"] = a, b
        path = out_dir / f"{name}.npz"
        np.savez(path, **arrays, labels=labels.astype(np.int64))
        paths.append(path)
        widths = [a.shape[1] for a in arrays.values()]
    return paths[0], paths[1], widths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--npz", help="your .npz: one array per modality plus 'labels'")
    src.add_argument("--from-mogonet", metavar="FOLDER",
                     help="demo: re-cut a MOGONET folder (e.g. data/ROSMAP) into six modalities")
    p.add_argument("--test-npz", help="optional .npz with the same keys: the test split (default: 20 %% of --npz)")
    p.add_argument("--split", type=int, nargs="+", default=[50, 120, 30],
                   help="--from-mogonet: first-group width per MOGONET modality (default: 50 120 30)")
    p.add_argument("--fusions", nargs="+", default=["concat", "deq", "refnet"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--valid-fraction", type=float, default=0.2, help="share of the training rows for validation")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (small models: 1 is fastest)")
    p.add_argument("--output", default="runs/heldout_npz")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")   # one line per finished run
    logging.getLogger("multizoo_ext.training_structures").setLevel(logging.WARNING)  # not per epoch

    out = Path(args.output)
    if args.from_mogonet:
        train_path, test_path, widths = mogonet_to_six_npz(args.from_mogonet, out / "data", args.split)
        print(f"wrote {train_path} and {test_path}: {len(widths)} modalities of widths {widths}")
    else:
        train_path, test_path = Path(args.npz), Path(args.test_npz) if args.test_npz else None

    data = {"path": str(train_path), "normalize": "standard", "valid_fraction": args.valid_fraction}
    if test_path is not None:
        data["test_path"] = str(test_path)
    cfg = BenchmarkConfig(
        datasets=["npz"], data_kwargs={"npz": data}, fusions=args.fusions, seeds=args.seeds,
        epochs=args.epochs, lr=args.lr, num_threads=args.threads, output=str(out))
    # each fusion trains as its registered recipe says: "deq": DEQFusion(jac_reg=True), objective "deq" (task loss +
    # 0.1 x Jacobian penalty), fusion_lr_mult 0.1; for "refnet": the refnet objective
    runs = run_benchmark(cfg)
    print(runs.markdown)
    print(f"results: {runs.json_path} ({runs.computed} runs computed, {runs.reused} reused)")


if __name__ == "__main__":
    main()
