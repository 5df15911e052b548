"""DEQ fusion inside a MultiBench checkout: MultiBench's own ``train``/``test`` and ``MLP`` encoders,
this package's ``DEQFusion`` and ``deq_objective``. Nothing in MultiBench is modified.

Run it from the root of a MultiBench checkout (MultiBench scripts import its top-level
folders ``training_structures``, ``unimodals``, ... from the current directory), with this
package installed in the same environment (``pip install -e /path/to/multizoo-ext``)::

    cd /path/to/MultiBench
    python /path/to/multizoo-ext/examples/deq_in_multibench.py               # random stand-in data
    python /path/to/multizoo-ext/examples/deq_in_multibench.py --mogonet /path/to/ROSMAP

MultiBench's ``unimodals.common_models`` imports torchvision at module level (its ``MLP``
does not use it): where no torchvision wheel matches the installed torch, an empty
``torchvision`` package (with an empty ``models`` subpackage) on ``PYTHONPATH`` is enough.

Without ``--mogonet``, random tensors (three modalities, a learnable label) stand in for a
MultiBench loader: any ``(train, valid, test)`` triple of DataLoaders that yields
``[x_1, ..., x_M, y]`` batches works the same, e.g. one from MultiBench's own
``datasets.<name>.get_data.get_dataloader(...)``. ``--mogonet`` reads a MOGONET-layout folder
(ROSMAP, BRCA, ...) with this package's loader, which yields that same batch layout; the
features are standardised on the training rows (with MOGONET's raw [0, 1] features and
lr 1e-2, DEQ fusion stayed at chance on ROSMAP for 10 epochs).

Measured (CPU, 1 thread, MultiBench 49f9be2, defaults: 10 epochs, lr 1e-2, fusion 1e-3):
random stand-in data, 3 classes: test accuracy 0.848, about 30 s; ROSMAP: 0.717 (106 test
samples, one seed), about 15 s.

The lines that matter (everything else here is data plumbing)::

    from training_structures.Supervised_Learning import MMDL, train, test   # MultiBench
    from unimodals.common_models import MLP                             # MultiBench
    from multizoo_ext.fusions import DEQFusion
    from multizoo_ext.objectives import deq_objective

    encoders = [MLP(d, 64, 32) for d in input_widths]
    fusion = DEQFusion([32] * len(input_widths), jac_reg=True)   # any widths; unequal ones are projected
    head = MLP(fusion.out_dim, 32, n_classes)
    train(encoders, fusion, head, traindata, validdata, epochs, task="classification",
          optimtype=fusion_lr_optimizer(fusion, 0.1),   # optional: fusion at 0.1 x lr, as the reference
          lr=1e-2, weight_decay=1e-2,
          objective=deq_objective(nn.CrossEntropyLoss()),
          objective_args_dict={},            # required: MultiBench fills it every batch
          save="best.pt")
    trust_checkpoint = False   # True only for a best.pt your own train() just wrote (see below)
    model = torch.load("best.pt", weights_only=False) if trust_checkpoint else MMDL(encoders, fusion, head)
    test(model, testdata, no_robust=True)
    print(model.fuse.last_info["steps"], model.fuse.last_info["rel_residual"])   # solver statistics

``objective_args_dict={}`` matters: MultiBench hands the model (where ``deq_objective`` finds
the DEQFusion and its Jacobian penalty) to a custom objective only when that dict is not None.
MultiBench's ``train`` builds one optimiser over all parameters with one learning rate; the
reference trains the fusion at 0.1 x the rest, which ``fusion_lr_optimizer`` below gives
without touching MultiBench: it is passed as ``optimtype`` and splits the parameter list it
receives into two groups. (Plain ``optimtype=torch.optim.AdamW`` works too, with one rate.)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.getcwd())  # the MultiBench checkout root, as MultiBench's own examples do

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

try:
    from training_structures.Supervised_Learning import MMDL, test, train  # MultiBench's loop  # noqa: E402
    from unimodals.common_models import MLP  # MultiBench's encoder  # noqa: E402
except ImportError as exc:  # pragma: no cover - depends on where it is run
    raise SystemExit(f"run this from the root of a MultiBench checkout (cd /path/to/MultiBench) with MultiBench's "
                     f"requirements installed (torchvision, memory_profiler, matplotlib, ...): {exc}") from exc

from multizoo_ext.fusions import DEQFusion  # noqa: E402
from multizoo_ext.objectives import deq_objective  # noqa: E402


def fusion_lr_optimizer(fusion: nn.Module, mult: float, base=torch.optim.AdamW):
    """An ``optimtype`` for MultiBench's ``train``: it is called as ``optimtype(params, lr=...,
    weight_decay=...)`` and returns ``base`` with the fusion's parameters at ``mult * lr``."""
    fusion_ids = {id(p) for p in fusion.parameters()}

    def make(params, lr, weight_decay=0.0):
        params = list(params)
        rest = [p for p in params if id(p) not in fusion_ids]
        fused = [p for p in params if id(p) in fusion_ids]
        return base([{"params": rest}, {"params": fused, "lr": lr * mult}], lr=lr, weight_decay=weight_decay)

    return make


def random_loaders(widths=(20, 30, 10), n=(600, 150, 250), n_classes=3, batch_size=32, seed=0):
    """Random stand-in for a MultiBench loader triple: ``[x_1, ..., x_M, y]`` batches, y (B,) int64.

    The label is the arg-max of a fixed random linear map of all modalities, so it is learnable
    and needs every modality.
    """
    g = torch.Generator().manual_seed(seed)
    total = sum(n)
    xs = [torch.randn(total, w, generator=g) for w in widths]
    proj = [torch.randn(w, n_classes, generator=g) for w in widths]
    y = sum(x @ p for x, p in zip(xs, proj)).argmax(1)  # (N,)
    loaders, start = [], 0
    for i, k in enumerate(n):
        part = TensorDataset(*[x[start:start + k] for x in xs], y[start:start + k])
        loaders.append(DataLoader(part, batch_size=batch_size, shuffle=(i == 0), generator=g if i == 0 else None))
        start += k
    return loaders[0], loaders[1], loaders[2]


def main() -> None:
    p = argparse.ArgumentParser(description="DEQ fusion with MultiBench's own train()/test().")
    p.add_argument("--mogonet", default=None, help="MOGONET-layout folder (e.g. ROSMAP); default: random data")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate of encoders and head")
    p.add_argument("--fusion-lr-mult", type=float, default=0.1, help="fusion learning-rate multiplier (reference: 0.1)")
    p.add_argument("--jacobian-weight", type=float, default=0.1,
                   help="Jacobian penalty weight (reference: 0.1 MM-IMDB, 20 BRCA, 0.01 MOSI)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small models on a busy CPU run 10x slower with more; "
                        "0 = torch's own choice)")
    p.add_argument("--save", default=None, help="checkpoint path (MultiBench pickles the model); default: a temp dir")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="test the best epoch by unpickling the file train() wrote (only for your own file); "
                        "default: test the last epoch's model from memory")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.mogonet:
        from multizoo_ext.registry import create_dataset
        traindata, validdata, testdata = create_dataset("mogonet", path=args.mogonet, normalize="standard",
                                                     batch_size=32)
    else:
        traindata, validdata, testdata = random_loaders()
    first = next(iter(traindata))
    input_widths = [x.shape[1] for x in first[:-1]]
    n_classes = int(max(int(b[-1].max()) for b in traindata)) + 1
    print(f"{len(input_widths)} modalities of widths {input_widths}, {n_classes} classes")

    # --- the MultiBench lines -----------------------------------------------------------------
    torch.manual_seed(0)
    encoders = [MLP(d, 64, 32) for d in input_widths]    # MultiBench's MLP
    fusion = DEQFusion([32] * len(input_widths), jac_reg=args.jacobian_weight > 0)
    head = MLP(fusion.out_dim, 32, n_classes)
    save = args.save or os.path.join(tempfile.mkdtemp(prefix="deq_mb_"), "best.pt")
    train(encoders, fusion, head, traindata, validdata, args.epochs, task="classification",
          optimtype=fusion_lr_optimizer(fusion, args.fusion_lr_mult), lr=args.lr, weight_decay=1e-2,
          objective=deq_objective(nn.CrossEntropyLoss(), jacobian_weight=args.jacobian_weight),
          objective_args_dict={}, save=save)
    # MultiBench's train() saves the best epoch as a pickled whole model (torch.save(model)), which
    # torch.load refuses by default (weights_only=True) and which runs code from the file when
    # unpickled. Set trust_checkpoint = True only for a file your own train() wrote (or pass
    # --trust-checkpoint); otherwise this tests the model as train() left it (the last epoch).
    # To keep or share weights: multizoo_ext.checkpoint.save_checkpoint(path, model) writes a
    # state_dict that load_checkpoint(path, model) reads with weights_only=True.
    trust_checkpoint = args.trust_checkpoint  # False unless --trust-checkpoint
    if trust_checkpoint:
        model = torch.load(save, weights_only=False)  # the best epoch, unpickled from our own file
    else:
        model = MMDL(encoders, fusion, head)          # the last epoch, from memory
    test(model, testdata, no_robust=True)
    # -------------------------------------------------------------------------------------------

    info = model.fuse.last_info  # statistics of the last forward: the last test batch
    steps, rel = info["steps"].float(), info["rel_residual"]
    print(f"checkpoint {save}: fusion {type(model.fuse).__name__} (width {model.fuse.width}); solver on the last "
          f"test batch of {len(steps)}: steps mean {steps.mean():.1f} (cap {info['max_iter']}), relative residual "
          f"median {rel.median():.2e}, converged {100 * info['converged'].float().mean():.0f} %")


if __name__ == "__main__":
    main()
