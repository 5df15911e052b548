"""Train ReFNet(Concat) on the bundled two-view digits dataset and print its test metrics.

The digits dataset (scikit-learn's 8x8 handwritten digits, left and right image halves as
two modalities) ships with scikit-learn: nothing is downloaded. Run from anywhere once the
package is installed::

    python examples/refnet_digits.py                                # ReFNet as its recipe trains it
    python examples/refnet_digits.py --objective-arg ms_weight=0    # without Multi-Similarity
    python examples/refnet_digits.py --fusion-arg detach_targets=true
    python examples/refnet_digits.py --fusion concat                # plain Concat, for comparison

What it does:

1. ``seeded_loaders("digits", seed, batch_size)`` gives (train, valid, test) loaders yielding
   ``[left, right, y]``.
2. ``seeded_method(spec, "refnet", seed)`` (``build_method``, the builder the CLI and the
   benchmark runner use, after seeding as they do) builds one
   MLP encoder per view (32 -> 64 -> 32), ``ReFNet(Concat)`` as the fusion (per-view refiners
   decode the fused embedding back to each view's embedding), a Linear head, and the method's
   registered recipe: ``refnet_objective`` (cross-entropy + 0.1 x cosine refiner loss per view
   + 0.1 x Multi-Similarity on the fused embedding).
3. ``train`` (MultiBench's contract) with that objective and ``objective_args_dict={}``, AdamW;
   the best validation epoch is kept.
4. ``test`` prints accuracy, macro F1 and AUROC on the test split.
"""
from __future__ import annotations

import argparse

import torch

from multizoo_ext.builder import infer_data_spec, seeded_loaders, seeded_method
from multizoo_ext.cli import key_value
from multizoo_ext.training_structures import test, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fusion", default="refnet", help="registered fusion (default: refnet)")
    p.add_argument("--fusion-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE")
    p.add_argument("--objective-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (the CLI's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny model: one thread is fastest

    # the seeding order of `multizoo-ext train` and the runner: the same seed gives the same numbers
    spec = infer_data_spec(seeded_loaders("digits", args.seed, args.batch_size)[0])
    m = seeded_method(spec, args.fusion, args.seed, fusion_kwargs={k: v for d in args.fusion_arg for k, v in d.items()},
                     objective_kwargs={k: v for d in args.objective_arg for k, v in d.items()} or None)
    train_dl, valid_dl, test_dl = seeded_loaders("digits", args.seed, args.batch_size)

    result = train(m.encoders, m.fusion, m.head, train_dl, valid_dl, args.epochs, task=spec.task,
                   optimtype=torch.optim.AdamW, lr=args.lr, weight_decay=1e-2, save=None, device="cpu",
                   seed=args.seed, progress=False, **m.train_kwargs())
    metrics = test(result.model, test_dl, task=spec.task, no_robust=True, full=True)
    print(f"{m.name} ({m.settings['objective']} objective): {result.parameters} parameters, best validation "
          f"epoch {result.best_epoch} ({result.seconds_per_epoch:.2f} s/epoch)")
    print(f"test accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['f1_macro']:.4f}  "
          f"AUROC {metrics['auroc']:.4f}  (n={metrics['n']})")
    refiners = getattr(result.model.fuse, "refiners", None)
    if refiners is not None:
        print(f"refiners: {len(refiners)} (one per view), reconstructing widths {result.model.fuse.target_dims}")


if __name__ == "__main__":
    main()
