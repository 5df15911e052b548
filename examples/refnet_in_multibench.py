"""ReFNet inside a MultiBench checkout: MultiBench's own ``train``/``test`` and ``MLP`` encoders,
this package's ``ReFNet`` fusion and ``refnet_objective``. Nothing in MultiBench is modified.

Run it from the root of a MultiBench checkout (MultiBench scripts import its top-level
folders ``training_structures``, ``unimodals``, ... from the current directory), with this
package installed in the same environment (``pip install -e /path/to/multizoo-ext``)::

    cd /path/to/MultiBench
    python /path/to/multizoo-ext/examples/refnet_in_multibench.py               # random stand-in data
    python /path/to/multizoo-ext/examples/refnet_in_multibench.py --mogonet /path/to/ROSMAP

Without ``--mogonet``, random tensors (three modalities, a learnable label) stand in for a
MultiBench loader: any ``(train, valid, test)`` triple of DataLoaders that yields
``[x_1, ..., x_M, y]`` batches works the same, e.g. one from MultiBench's own
``datasets.<name>.get_data.get_dataloader(...)``. ``--mogonet`` reads a MOGONET-layout folder
(ROSMAP, BRCA, ...) with this package's loader, which yields that same batch layout.

The lines that matter (everything else here is data plumbing)::

    from training_structures.Supervised_Learning import MMDL, train, test   # MultiBench
    from unimodals.common_models import MLP                             # MultiBench
    from multizoo_ext.fusions import Concat, ReFNet
    from multizoo_ext.objectives import refnet_objective

    encoders = [MLP(d, 64, 32) for d in input_widths]
    dims = [32] * len(input_widths)                         # encoder output widths
    fusion = ReFNet(Concat(dims), modality_dims=dims)       # wraps any fusion module
    head = MLP(sum(dims), 32, n_classes)
    train(encoders, fusion, head, traindata, validdata, epochs, task="classification",
          optimtype=torch.optim.AdamW, lr=1e-3, weight_decay=1e-2,
          objective=refnet_objective(task="classification", ms_weight=0.1),
          objective_args_dict={},            # required: MultiBench fills it every batch
          save="best.pt")
    trust_checkpoint = False   # True only for a best.pt your own train() just wrote (see below)
    model = torch.load("best.pt", weights_only=False) if trust_checkpoint else MMDL(encoders, fusion, head)
    test(model, testdata, no_robust=True)

``objective_args_dict={}`` matters: MultiBench only hands the model, the fused output and the
raw inputs to a custom objective when that dict is not None. The refiners are submodules of
the ReFNet fusion, so MultiBench's optimiser (built on the MMDL's parameters) trains them; no
``additional_optimizing_modules`` are needed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.getcwd())  # the MultiBench checkout root, as MultiBench's own examples do

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

try:
    from training_structures.Supervised_Learning import MMDL, test, train  # MultiBench's loop  # noqa: E402
    from unimodals.common_models import MLP  # MultiBench's encoder  # noqa: E402
except ImportError as exc:  # pragma: no cover - depends on where it is run
    raise SystemExit(f"run this from the root of a MultiBench checkout (cd /path/to/MultiBench) with MultiBench's "
                     f"requirements installed (torchvision, memory_profiler, matplotlib, ...): {exc}") from exc

from multizoo_ext.fusions import Concat, ReFNet  # noqa: E402
from multizoo_ext.objectives import refnet_objective  # noqa: E402


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
    p = argparse.ArgumentParser(description="ReFNet with MultiBench's own train()/test().")
    p.add_argument("--mogonet", default=None, help="MOGONET-layout folder (e.g. ROSMAP); default: random data")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--ms-weight", type=float, default=0.1, help="Multi-Similarity weight (reference: 0.1)")
    p.add_argument("--save", default=None, help="checkpoint path (MultiBench pickles the model); default: a temp dir")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="test the best epoch by unpickling the file train() wrote (only for your own file); "
                        "default: test the last epoch's model from memory")
    args = p.parse_args()

    if args.mogonet:
        from multizoo_ext.registry import create_dataset
        traindata, validdata, testdata = create_dataset("mogonet", path=args.mogonet, batch_size=32)
    else:
        traindata, validdata, testdata = random_loaders()
    first = next(iter(traindata))
    input_widths = [x.shape[1] for x in first[:-1]]
    n_classes = int(max(int(b[-1].max()) for b in traindata)) + 1
    print(f"{len(input_widths)} modalities of widths {input_widths}, {n_classes} classes")

    # --- the MultiBench lines -----------------------------------------------------------------
    torch.manual_seed(0)
    encoders = [MLP(d, 64, 32) for d in input_widths]   # MultiBench's MLP
    dims = [32] * len(input_widths)                     # encoder output widths
    fusion = ReFNet(Concat(dims), modality_dims=dims)   # wraps any fusion module
    head = MLP(sum(dims), 32, n_classes)
    save = args.save or os.path.join(tempfile.mkdtemp(prefix="refnet_mb_"), "best.pt")
    train(encoders, fusion, head, traindata, validdata, args.epochs, task="classification",
          optimtype=torch.optim.AdamW, lr=1e-3, weight_decay=1e-2,
          objective=refnet_objective(task="classification", ms_weight=args.ms_weight),
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

    refnet = model.fuse
    print(f"checkpoint {save}: fusion {type(refnet).__name__} with {len(refnet.refiners)} refiners, "
          f"{sum(p.numel() for p in refnet.refiners.parameters())} refiner parameters")


if __name__ == "__main__":
    main()
