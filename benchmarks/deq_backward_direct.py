"""Time of a DEQ fusion training step with the exact adjoint solve (``b_direct=True``) against
the iterative one, alternating on the same model and batches.

One model (the CLI's digits model: MLP encoders, DEQ fusion with its defaults, linear head,
AdamW lr 1e-3, Jacobian weight 0.1) is trained with the iterative backward; before each of its
steps the same batch is run once more, forward and backward without an update, with
``b_direct=True``, so both see the same parameters and the machine's load hits both alike.
Prints, per epoch, the summed step time (forward + backward) of each and their ratio, and the
largest relative difference of the parameter gradients of the two on the epoch's last batch.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/deq_backward_direct.py --epochs 6 --seed 0
"""
from __future__ import annotations

import argparse
import time
from typing import List, Optional, Sequence

import torch

from multizoo_ext.builder import infer_data_spec, seeded_loaders, seeded_method
from multizoo_ext.fusions.deq import find_deq


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    train_dl, _, _ = seeded_loaders(a.dataset, a.seed, a.batch_size)
    m = seeded_method(infer_data_spec(train_dl), "deq", a.seed)
    encoders, fusion, head = torch.nn.ModuleList(m.encoders), m.fusion, m.head
    deq = find_deq(fusion)
    params = [*encoders.parameters(), *fusion.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step(batch: List[torch.Tensor], direct: bool, seed: int) -> float:
        deq._grad.direct = direct
        torch.manual_seed(seed)   # the same random vectors in the Jacobian penalty's estimate for both
        *xs, y = batch
        for q in params:
            q.grad = None
        t0 = time.perf_counter()
        out = head(fusion([e(x.float()) for e, x in zip(encoders, xs)]))
        loss = torch.nn.functional.cross_entropy(out, y.long()) + 0.1 * deq.take_jacobian_penalty(len(y))
        loss.backward()
        return time.perf_counter() - t0

    print(f"{a.dataset}, seed {a.seed}: summed training-step time per epoch (forward + backward)")
    for epoch in range(a.epochs):
        t_direct = t_iter = 0.0
        for i, batch in enumerate(train_dl):
            t_direct += step(batch, True, 1000 * epoch + i)
            g_direct = [q.grad.clone() for q in params if q.grad is not None]
            t_iter += step(batch, False, 1000 * epoch + i)
            g_iter = [q.grad for q in params if q.grad is not None]
            optimizer.step()
        diff = max(float((u - v).norm() / (v.norm() + 1e-12)) for u, v in zip(g_direct, g_iter))
        print(f"epoch {epoch}: direct {t_direct:.3f} s, iterative {t_iter:.3f} s, ratio {t_direct / t_iter:.2f}; "
              f"largest relative gradient difference {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
