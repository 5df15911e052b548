"""Train ReFNet(Concat) on the bundled two-view digits dataset and print its test metrics.

The digits dataset (scikit-learn's 8x8 handwritten digits, left and right image halves as
two modalities) ships with scikit-learn: nothing is downloaded. Run from anywhere once the
package is installed::

    python examples/refnet_digits.py                 # ReFNet(Concat), refiner loss only
    python examples/refnet_digits.py --ms-weight 0.1  # + Multi-Similarity on the fused embedding
    python examples/refnet_digits.py --baseline       # plain Concat, for comparison

What it does:

1. ``create_dataset("digits")`` gives (train, valid, test) loaders yielding ``[left, right, y]``.
2. One MLP encoder per view (32 -> 64 -> 32), ``ReFNet(Concat)`` as the fusion (per-view
   refiners decode the fused embedding back to each view's embedding), a Linear head.
3. ``train`` (MultiBench's contract) with ``objective=refnet_objective(...)`` and
   ``objective_args_dict={}``: cross-entropy + 0.1 x cosine refiner loss per view
   (+ ``ms_weight`` x Multi-Similarity), AdamW; the best validation epoch is kept.
4. ``test`` prints accuracy, macro F1 and AUROC on the test split.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from multizoo_ext.fusions.common_fusions import Concat
from multizoo_ext.fusions.refnet import ReFNet
from multizoo_ext.objectives.refnet import refnet_objective
from multizoo_ext.registry import create_dataset
from multizoo_ext.training_structures.supervised import test, train
from multizoo_ext.unimodals.common_models import MLP
from multizoo_ext.utils import seed_everything


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ms-weight", type=float, default=0.0, help="Multi-Similarity weight (reference: 0.1)")
    p.add_argument("--refiner-weight", type=float, default=0.1, help="refiner loss weight per modality")
    p.add_argument("--detach-targets", action="store_true", help="stop-gradient on the refiner targets")
    p.add_argument("--baseline", action="store_true", help="train plain Concat instead of ReFNet(Concat)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny model: one thread is fastest

    seed_everything(args.seed)
    train_dl, valid_dl, test_dl = create_dataset("digits", batch_size=args.batch_size, seed=args.seed)
    left, right, _ = next(iter(train_dl))
    dims_in = [left.shape[1], right.shape[1]]  # 32, 32
    encoders = [MLP(d, 64, 32) for d in dims_in]
    embed_dims = [32, 32]
    head = nn.Linear(sum(embed_dims), 10)

    if args.baseline:
        fusion = Concat(embed_dims)
        objective, objective_args = nn.CrossEntropyLoss(), None
        name = "Concat"
    else:
        fusion = ReFNet(Concat(embed_dims), modality_dims=embed_dims, detach_targets=args.detach_targets)
        objective = refnet_objective(refiner_weight=args.refiner_weight, ms_weight=args.ms_weight,
                                     task="classification")
        objective_args = {}  # the loop fills model / fused / inputs / training every batch
        name = f"ReFNet(Concat), refiner weight {args.refiner_weight}, MS weight {args.ms_weight}"

    result = train(encoders, fusion, head, train_dl, valid_dl, args.epochs, task="classification",
                   optimtype=torch.optim.AdamW, lr=1e-3, weight_decay=1e-2, objective=objective,
                   objective_args_dict=objective_args, save=None, device="cpu", seed=args.seed, progress=False)
    metrics = test(result.model, test_dl, task="classification", no_robust=True, full=True)
    print(f"{name}: {result.parameters} parameters, best validation epoch {result.best_epoch} "
          f"({result.seconds_per_epoch:.2f} s/epoch)")
    print(f"test accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['f1_macro']:.4f}  "
          f"AUROC {metrics['auroc']:.4f}  (n={metrics['n']})")
    if not args.baseline:
        refnet = result.model.fuse
        print(f"refiners: {len(refnet.refiners)} (one per view), reconstructing widths {refnet.target_dims}")


if __name__ == "__main__":
    main()
