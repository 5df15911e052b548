"""Train DEQ fusion on the bundled two-view digits dataset and print its test metrics and the
equilibrium solver's statistics.

The digits dataset (scikit-learn's 8x8 handwritten digits, left and right image halves as
two modalities) ships with scikit-learn: nothing is downloaded. Run from anywhere once the
package is installed::

    python examples/deq_digits.py                           # DEQ fusion as its recipe trains it
    python examples/deq_digits.py --objective-arg jacobian_weight=0   # task loss only
    python examples/deq_digits.py --fusion-arg solver=broyden         # another solver
    python examples/deq_digits.py --fusion concat           # plain Concat, for comparison

What it does:

1. ``seeded_loaders("digits", seed, batch_size)`` gives (train, valid, test) loaders yielding
   ``[left, right, y]``.
2. ``seeded_method(spec, "deq", seed)`` (``build_method``, the builder the CLI and the
   benchmark runner use, after seeding as they do) builds one
   MLP encoder per view (32 -> 64 -> 32), ``DEQFusion([32, 32])`` (the fused state is the fixed
   point of a purify-then-combine map, found by Anderson acceleration, gradients by implicit
   differentiation; ``jac_reg=True``), a Linear head, and the method's registered recipe:
   ``deq_objective`` (cross-entropy + 0.1 x the Hutchinson estimate of ``||J_f(z*)||_F^2``)
   and the fusion's parameters at 0.1 x the learning rate.
3. ``train`` (MultiBench's contract) with the recipe's objective and ``objective_args_dict={}``.
4. ``test`` gives accuracy, macro F1 and AUROC on the test split; then one pass over the test
   split reads ``DEQFusion.last_info`` after every batch: solver steps per sample, final
   relative residual ``||f(z) - z|| / ||f(z)||`` and the share of samples that met the
   tolerance.

Measured results: docs/RESULTS.md and docs/deq.md.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from multizoo_ext.builder import infer_data_spec, seeded_loaders, seeded_method
from multizoo_ext.cli import key_value
from multizoo_ext.training_structures import test, train


@torch.no_grad()
def solver_statistics(model: nn.Module, loader) -> dict:
    """Forward passes over ``loader`` (eval mode); gathers the DEQ solver's per-sample
    statistics from ``model.fuse.last_info`` after every batch."""
    deq = model.fuse
    model.eval()
    steps, residuals, converged = [], [], []
    for batch in loader:
        model([x.float() for x in batch[:-1]])
        info = deq.last_info
        stages = info.get("stages") or [info]  # staged solve: the modality stage, then the fused stage
        steps.append(torch.stack([st["steps"].float() for st in stages], 1))    # (b, stages)
        residuals.append(info["rel_residual"].float())
        converged.append(info["converged"].float())
    steps, residuals, converged = torch.cat(steps), torch.cat(residuals), torch.cat(converged)
    return {"n": len(steps), "max_iter": stages[0]["max_iter"], "tol": info["tol"],
            "steps_mean": steps.mean(0).tolist(), "steps_max": steps.max().item(),
            "residual_median": residuals.median().item(), "residual_max": residuals.max().item(),
            "converged": converged.mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fusion", default="deq", help="registered fusion (default: deq)")
    p.add_argument("--fusion-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE")
    p.add_argument("--objective-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (the CLI's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny model: 1 is fastest)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    # the seeding order of `multizoo-ext train` and the runner: the same seed gives the same numbers
    spec = infer_data_spec(seeded_loaders("digits", args.seed, args.batch_size)[0])
    m = seeded_method(spec, args.fusion, args.seed, fusion_kwargs={k: v for d in args.fusion_arg for k, v in d.items()},
                     objective_kwargs={k: v for d in args.objective_arg for k, v in d.items()} or None)
    train_dl, valid_dl, test_dl = seeded_loaders("digits", args.seed, args.batch_size)

    t0 = time.perf_counter()
    result = train(m.encoders, m.fusion, m.head, train_dl, valid_dl, args.epochs, task=spec.task,
                   optimtype=torch.optim.AdamW, lr=args.lr, weight_decay=1e-2, save=None, device="cpu",
                   seed=args.seed, progress=False, **m.train_kwargs())
    metrics = test(result.model, test_dl, task=spec.task, no_robust=True, full=True)
    print(f"{m.name} ({m.settings['objective']} objective, fusion lr x{m.fusion_lr_mult}): "
          f"{result.parameters} parameters, best validation epoch {result.best_epoch} of {args.epochs} "
          f"({result.seconds_per_epoch:.2f} s/epoch, {time.perf_counter() - t0:.1f} s in all)")
    print(f"test accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['f1_macro']:.4f}  "
          f"AUROC {metrics['auroc']:.4f}  (n={metrics['n']})")
    if getattr(result.model.fuse, "last_info", None) is not None or m.name == "deq":
        s = solver_statistics(result.model, test_dl)
        print(f"solver on the {s['n']} test samples (cap {s['max_iter']} steps per stage, tolerance {s['tol']:g}): "
              f"steps mean {' + '.join(f'{v:.1f}' for v in s['steps_mean'])} (stages) / max {s['steps_max']:.0f}, "
              f"relative residual median "
              f"{s['residual_median']:.2e} / max {s['residual_max']:.2e}, converged {100 * s['converged']:.1f} %")


if __name__ == "__main__":
    main()
