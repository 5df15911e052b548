"""The DEQ fusion map written module by module, as the paper describes it: the oracle the
fast map of multizoo_ext/fusions/deq/fusion.py is checked against (values and gradients).

It reads the fusion's own parameters (``projections``, ``blocks``, ``fusion_block``,
``weights``, ``bias``) through their modules' forwards and shares no code with the fast map.
"""
from typing import Sequence

import torch
import torch.nn.functional as F


def residual_block(blk, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``z' = GN3(ReLU(GN2(W2 ReLU(GN1(W1 z)) + x) + z))``, (B, d) -> (B, d)."""
    h = F.relu(blk.gn1(blk.lin1(z)))
    h = blk.gn2(blk.lin2(h) + x) + z
    return blk.gn3(F.relu(h))


def plain_block(blk, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``z' = ReLU(W2 ReLU(GN1(W1 z)) + x)``, (B, d) -> (B, d)."""
    return F.relu(blk.lin2(F.relu(blk.gn1(blk.lin1(z)))) + x)


def fusion_block(fb, z_f: torch.Tensor, z_mods: Sequence[torch.Tensor], x_f: torch.Tensor,
                 update: str = "groupnorm") -> torch.Tensor:
    """Purify-then-combine ``z_f' = GN(ReLU(W_f sum_i (z_f * W_g(z_i' + z_f)) + x_f))``, one
    gate application per modality; ``update="sigmoid"``: ``ReLU(W_f (z_f * sigmoid(sum_i
    W_g(z_i' + z_f))) + x_f)``."""
    if update == "sigmoid":
        gate = torch.sigmoid(sum(fb.gate(z_i + z_f) for z_i in z_mods))
        return F.relu(fb.fuse(z_f * gate) + x_f)
    purified = sum(z_f * fb.gate(z_i + z_f) for z_i in z_mods)
    return fb.gn(F.relu(fb.fuse(purified) + x_f))


def injections(fusion, inputs: Sequence[torch.Tensor]):
    """``x_i = P_i(input_i)`` (B, d) each and ``x_f`` (B, d): ``sum_i w_i x_i + b`` (``injection="sum"``)
    or ``W_x [x_1; ...; x_M] + b_x`` (``"proj"``)."""
    xs = [p(torch.flatten(t, 1)) for p, t in zip(fusion.projections, inputs)]
    if fusion.injection == "sum":
        x_f = sum(w * x for w, x in zip(fusion.weights, xs)) + fusion.bias
    else:
        x_f = fusion.injection_proj(torch.cat(list(xs), 1))
    return xs, x_f


def naive_step(fusion, z: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """One application of ``f_theta``: ``z`` (B, (M + 1) d) -> (B, (M + 1) d)."""
    xs, x_f = injections(fusion, inputs)
    d, M = fusion.width, fusion.num_modalities
    zs = [z[:, i * d:(i + 1) * d] for i in range(M + 1)]
    block = plain_block if fusion.modality_block == "plain" else residual_block
    z_mods = [block(blk, zs[i], xs[i]) for i, blk in enumerate(fusion.blocks)]
    return torch.cat(z_mods + [fusion_block(fusion.fusion_block, zs[M], z_mods, x_f, fusion.fused_update)], 1)
