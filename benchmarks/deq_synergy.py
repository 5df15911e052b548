"""Does DEQ fusion learn a two-modality synergy (XOR) task inside MultiBench's own train()?

Task: each modality is ``dim`` standard-normal features; the label is the XOR of the signs of
feature 0 of modality 0 and feature 0 of modality 1, so each modality alone is at chance and
an additive model is at chance too. Model: per-modality ``Linear(dim, 32) + ReLU`` encoders,
the fusion, an MLP head (``Linear(out, 32) + ReLU + Linear(32, 2)``); MultiBench's unmodified
``training_structures.Supervised_Learning.train`` (Adam, lr 3e-3, 15 epochs, batch 32) and its
``single_test`` on the best-validation checkpoint.

Each named variant changes ONE thing of the published layer (``deq``: Jacobian weight 0.1, the
authors' value, uniform learning rate) or, joined with ``+``, of the package's default layer
(``deq_default``: ``DEQFusion([32, 32], 32)`` with ``deq_objective(CrossEntropyLoss())``, whose
Jacobian weight is the objective's default, 1.0) or of the earlier default (``deq_gn``: the
published function with the default's initialisation and injection); the variants pass
DEQFusion's options or subclass and patch it here, the library module is not edited.

Usage (MultiBench on the path, from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/deq_synergy.py --variants concat deq --seeds 0 1 2
    python benchmarks/deq_synergy.py --list

Prints one row per variant: mean +- std of the test accuracy over the seeds, the per-seed
values, the mean seconds per epoch, the fraction of converged training samples and the median
relative residual in the last epoch, and the Jacobian penalty / task loss at initialisation.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
MULTIBENCH = os.environ.get("MULTIBENCH", os.path.join(HERE, "..", "..", "shared", "third_party", "MultiBench"))
if MULTIBENCH not in sys.path:
    sys.path.insert(0, MULTIBENCH)

from multizoo_ext.fusions import Concat  # noqa: E402
from multizoo_ext.fusions.deq import PAPER_LAYER, DEQFusion  # noqa: E402

from multizoo_ext.fusions.deq import fusion as deq_module  # noqa: E402  (DEQFusion's internals)

_group_norm = deq_module._group_norm
from multizoo_ext.objectives import deq_objective  # noqa: E402
from multizoo_ext.objectives.deq import DEFAULT_JACOBIAN_WEIGHT  # noqa: E402

WIDTH = 32


# ---------------------------------------------------------------------------------- data
def xor_loaders(seed: int, n_train: int = 1024, n_valid: int = 512, n_test: int = 1024, dim: int = 8,
                batch_size: int = 32) -> Tuple[torch.utils.data.DataLoader, ...]:
    """Loaders of ``(x_0 (B, dim), x_1 (B, dim), y (B,))`` with ``y = [x_0[0] > 0] xor [x_1[0] > 0]``."""
    g = torch.Generator().manual_seed(10_000 + seed)

    def split(n: int) -> torch.utils.data.TensorDataset:
        x0, x1 = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
        y = ((x0[:, 0] > 0) ^ (x1[:, 0] > 0)).long()
        return torch.utils.data.TensorDataset(x0, x1, y)

    train, valid, test = split(n_train), split(n_valid), split(n_test)
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            torch.utils.data.DataLoader(valid, batch_size=128),
            torch.utils.data.DataLoader(test, batch_size=128))


# ------------------------------------------------------------------------------ variants
class _PatchedMap(deq_module._FusionMap):
    """``_FusionMap`` with the benchmark's own knobs: the GroupNorm update's normalisation
    (``out_norm`` None: the layer's own update; 'none' (ReLU only), 'ln' (one group), 'ball'),
    the gate's scale and what the gate reads besides ``z_f`` (``gate_input``)."""

    out_norm = None
    gate_scale = 1.0

    def __init__(self, layer, inputs) -> None:
        super().__init__(layer, inputs)
        self.gate_scale = getattr(layer, "gate_scale", 1.0)
        if self.gate_scale != 1.0:       # a = c (W_g (.) + M b_g): under Adam, W_g learns c times slower
            self.wg, self.bg = self.wg * self.gate_scale, self.bg * self.gate_scale
        self.gate_input = getattr(layer, "gate_input", "states")
        if self.gate_input != "states":      # the gate reads the injections x_i, or z_f only
            b = self.inj.shape[0]
            if self.gate_input == "inj":
                x = torch.stack([p(t) for p, t in zip(layer.projections, inputs)], 1)   # (B, M, d)
                const = F.linear(x.sum(1), self.wg, self.bg)
            else:
                const = self.bg.expand(b, -1)
            self._gate_rows = deq_module._Rows(const)

    def _gate_const(self, z_m: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gate sum's part that does not read ``z_f``: ``W_g s + M b_g`` (b, d), where ``s``
        is ``sum_i z_i'`` ('states', the layer's), ``sum_i x_i`` ('inj') or nothing ('fused')."""
        if self.gate_input == "states":
            b, M, d = z_m.shape[0], self.M, self.d
            return F.linear(z_m.view(b, M, d).sum(1), self.wg, self.bg)
        return self._gate_rows(index)[0]

    def __call__(self, z: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        M, d = self.M, self.d
        z_m, z_f = z.split([M * d, d], dim=1)
        z_m = self.modalities(z_m, index)
        a = torch.addmm(self._gate_const(z_m, index), z_f, self.wg.t(), alpha=M)
        return torch.cat([z_m, self.fused(z_f, a, self._rows(index)[1])], 1)

    def stage(self, k, states, outputs=None):
        if k != 1 or self.gate_input == "states":
            return super().stage(k, states, outputs)
        M = self.M
        rows = deq_module._Rows(self._gate_rows(None)[0], self.inj_f)

        def fused_stage(z_f, index=None):
            const, inj_f = rows(index)
            return self.fused(z_f, torch.addmm(const, z_f, self.wg.t(), alpha=M), inj_f)

        return deq_module._StageMap(fused_stage, lambda z_f: self.fused_jacobian(z_f, rows(None)[0]))

    def _norm_fused(self, z_f: torch.Tensor, a: torch.Tensor, inj_f: torch.Tensor) -> torch.Tensor:
        if self.out_norm is None:            # the layer's own fused update
            return deq_module._FusionMap.fused(self, z_f, a, inj_f)
        h = torch.addmm(inj_f, z_f * a, self.wft).relu_()
        if self.out_norm == "none":
            return h
        if self.out_norm == "ball":
            return ball(h)
        groups = 1 if self.out_norm == "ln" else self.groups
        return _group_norm(h, groups, *self.gnf, self.eps)

    fused = _norm_fused


class DEQVariant(DEQFusion):
    """DEQFusion with the knobs of the hypotheses (all at their first value = the paper's
    function; DEQFusion's own options, e.g. ``modality_block``, ``fused_update``, ``output``,
    are passed through, at the paper's values unless a variant sets them).

    Args (besides DEQFusion's):
        out_norm: None (the layer's fused update) | 'none' | 'ln' | 'ball': the GroupNorm
            update with another normalisation of z_f' (hypothesis b); these use the iterative
            adjoint solve.
        gate_init: None (PyTorch's Linear init) | 'one' (W_g = 0, bias so that sum_i a_i = 1)
            | 'zero' (W_g = 0, bias 0: the multiplicative term starts at 0) (hypothesis a).
        injection: 'sum' (x_f = sum_i w_i x_i + b) | 'proj' (Linear of the concatenation) (c).
        readout: 'layer' (what the layer returns) | 'cat' (concat(z_f*, x_1..x_M)) (g).
        residual_init: 'default' (PyTorch's Linear init of the modality blocks) | 'zero'
            (each block's W2 at 0) (hypothesis h).
        fuse_init: 'default' | 'zero' (the fused update's ``W_f`` at 0, so the layer starts as
            the control without a fixed point: hypothesis l).
        gate_input: 'states' (the layer's: the gate reads sum_i z_i') | 'inj' (sum_i x_i) |
            'fused' (nothing besides z_f) (hypothesis m).
    """

    def __init__(self, input_dims: Sequence[int], width: Optional[int] = None, *, out_norm: Optional[str] = None,
                 gate_init: Optional[str] = None, injection: str = "sum", readout: str = "layer",
                 residual_init: str = "default", gate_scale: float = 1.0, fuse_init: str = "default",
                 gate_input: str = "states", **kw) -> None:
        # gate 'zero' and the projected injection are DEQFusion's own options (its defaults);
        # None / 'sum' give the published layer
        for key in ("modality_block", "fused_update", "output"):
            kw.setdefault(key, PAPER_LAYER[key])
        if out_norm is not None or gate_input != "states":   # the closed-form stage Jacobians are the layer's own
            kw["b_direct"] = False
        if gate_input != "states":   # the fused stage no longer reads the modality stage: one joint adjoint solve
            kw["staged_backward"] = False
        super().__init__(input_dims, width, gate_init="zero" if gate_init == "zero" else "default",
                         injection=injection, residual_init=residual_init, **kw)
        self.out_norm, self.readout, self.gate_scale = out_norm, readout, float(gate_scale)
        self.gate_input = gate_input
        M, d = self.num_modalities, self.width
        if gate_init == "one":
            gate = self.fusion_block.gate
            with torch.no_grad():
                gate.weight.zero_()
                gate.bias.fill_(1.0 / M)
        if fuse_init == "zero":   # W_f = 0: z_f' = norm(ReLU(x_f)) at init, the recurrence learned from there
            with torch.no_grad():
                self.fusion_block["fuse"].weight.zero_()
        self.out_dim = {"layer": d, "cat": (M + 1) * d}[readout]

    def _injections(self, inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B, M, d) and x_f (B, d) of this variant."""
        flat = [torch.flatten(t, 1) for t in inputs]
        x = torch.stack([p(t) for p, t in zip(self.projections, flat)], 1)
        if self.injection == "proj":
            return x, self.injection_proj(x.flatten(1))
        return x, torch.einsum("m,bmd->bd", self.weights, x) + self.bias

    def deq_function(self, inputs):
        fmap = _PatchedMap(self, self._check(inputs))
        fmap.out_norm = self.out_norm
        return fmap

    def forward(self, inputs, return_info: bool = False):
        fused = super().forward(inputs)
        info = self.last_info
        if self.training and getattr(self, "stats", None) is not None and info and "converged" in info:
            self.stats["conv"].append(float(info["converged"].float().mean()))
            self.stats["res"].append(float(info["rel_residual"].median()))
        if self.readout == "cat":
            x, _ = self._injections(inputs)
            fused = torch.cat([fused, x.flatten(1)], 1)
        return (fused, self.last_info) if return_info else fused


def ball(h: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Projection of each row's groups onto the ball of RMS 1: ``h * min(1, 1 / rms(h))``,
    identity inside the ball (keeps the scale of small states), nonexpansive."""
    B, C = h.shape
    g = h.view(B, groups, C // groups)
    rms = g.square().mean(2, keepdim=True).add(1e-12).sqrt()
    return (g / rms.clamp(min=1.0)).view(B, C)


def rms_norm(h: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``h / rms(h)`` per group (no mean subtraction)."""
    B, C = h.shape
    g = h.view(B, groups, C // groups)
    return (g * g.square().mean(2, keepdim=True).add(1e-5).rsqrt()).view(B, C)


class ConcatLayer(nn.Module):
    """Control: what the default layer computes at initialisation (gate and residual branches
    at zero), ``norm(ReLU(W_x [x_1; ..; x_M] + b))`` with ``norm`` 'gn' (4 groups, the layer's
    output norm), 'ln' or 'none'; no fixed point."""

    def __init__(self, input_dims: Sequence[int], width: int, norm: str = "gn") -> None:
        super().__init__()
        self.lin = nn.Linear(sum(input_dims), width)
        self.norm = {"gn": nn.GroupNorm(4, width), "ln": nn.GroupNorm(1, width), "none": nn.Identity(),
                     "ball": ball, "rms": functools.partial(rms_norm, groups=4)}[norm]
        self.out_dim = width

    def forward(self, inputs):
        return self.norm(torch.relu(self.lin(torch.cat(inputs, 1))))


#: name -> (DEQVariant kwargs or None for Concat, Jacobian weight, fusion lr multiplier, description)
VARIANTS: Dict[str, Tuple[Optional[dict], float, float, str]] = {
    "concat": (None, 0.0, 1.0, "Concat (reference point)"),
    "ctl_lin_gn": ({"control": "gn"}, 0.0, 1.0, "control, no DEQ: GN(ReLU(Linear(concat)))"),
    "ctl_lin_ln": ({"control": "ln"}, 0.0, 1.0, "control, no DEQ: LN(ReLU(Linear(concat)))"),
    "ctl_lin": ({"control": "none"}, 0.0, 1.0, "control, no DEQ: ReLU(Linear(concat))"),
    "ctl_lin_ball": ({"control": "ball"}, 0.0, 1.0, "control, no DEQ: ball(ReLU(Linear(concat))), RMS <= 1"),
    "ctl_lin_rms": ({"control": "rms"}, 0.0, 1.0, "control, no DEQ: RMSNorm (4 groups) of ReLU(Linear(concat))"),
    "deq": ({}, 0.1, 1.0, "baseline: the published layer (fusion 'deq_paper'), jac 0.1, uniform lr"),
    "deq_default": ({"gate_init": "zero", "injection": "proj", "residual_init": "zero", "modality_block": "plain",
                     "fused_update": "sigmoid", "output": "state+injection"},
                    DEFAULT_JACOBIAN_WEIGHT, 1.0,
                    "the package's default layer (fusion 'deq'): plain modality blocks, sigmoid-gated "
                    "fused update without a norm, returns z_f* + x_f; gate and W2 at zero, projected "
                    "injection; the objective's default Jacobian weight"),
    "deq_gn": ({"gate_init": "zero", "injection": "proj", "residual_init": "zero"},
               DEFAULT_JACOBIAN_WEIGHT, 1.0,
               "the earlier default: the published function (residual blocks, GroupNorm update, "
               "returns z_f*) with gate and W2 at zero and the projected injection"),
    # (a) gate / fused-state initialisation
    "a_gate_one": ({"gate_init": "one"}, 0.1, 1.0, "W_g = 0, bias: sum_i a_i = 1 at init"),
    "a_gate_zero": ({"gate_init": "zero"}, 0.1, 1.0, "W_g = 0 and bias 0: z_f' = GN(ReLU(x_f + b_f)) at init"),
    # (b) GroupNorm on z_f'
    "b_norm_none": ({"out_norm": "none", "fused_update": "groupnorm"}, 0.1, 1.0, "no GroupNorm on z_f' (ReLU only)"),
    "b_norm_ln": ({"out_norm": "ln", "fused_update": "groupnorm"}, 0.1, 1.0, "one-group GroupNorm (layer norm) on z_f'"),
    "b_norm_ball": ({"out_norm": "ball", "fused_update": "groupnorm"}, 0.1, 1.0, "projection of z_f' onto the ball of RMS 1 (no affine)"),
    "b_sigmoid": ({"fused_update": "sigmoid"}, 0.1, 1.0, "no norm on z_f', gate squashed: ReLU(W_f(z_f * sigmoid(a)) + x_f)"),
    "b_groupnorm": ({"fused_update": "groupnorm"}, 0.1, 1.0, "the published fused update: GN(ReLU(W_f(z_f * a) + x_f))"),
    "b_groups1": ({"num_groups": 1}, 0.1, 1.0, "one group in every GroupNorm of the layer"),
    # (c) injection
    "c_inj_proj": ({"injection": "proj"}, 0.1, 1.0, "x_f = Linear(concat(x_1..x_M))"),
    # (d) Jacobian weight
    "d_jac0": ({"jac_reg": False}, 0.0, 1.0, "no Jacobian term"),
    "d_jac001": ({}, 0.01, 1.0, "Jacobian weight 0.01"),
    "d_jac01": ({}, 0.1, 1.0, "Jacobian weight 0.1 (the authors' MM-IMDB value)"),
    "d_jac05": ({}, 0.5, 1.0, "Jacobian weight 0.5"),
    "d_jac1": ({}, 1.0, 1.0, "Jacobian weight 1"),
    "d_jac2": ({}, 2.0, 1.0, "Jacobian weight 2"),
    # (e) gradient far from the fixed point
    "e_implicit_all": ({"implicit_max_residual": None}, 0.1, 1.0, "implicit gradient for every sample"),
    "e_phantom": ({"backward": "phantom"}, 0.1, 1.0, "phantom gradient (5 steps, tau 1)"),
    "e_unrolled": ({"backward": "unrolled", "unroll_steps": 12}, 0.1, 1.0, "12 unrolled steps, backprop"),
    "e_iter110": ({"f_max_iter": 110, "b_max_iter": 110}, 0.1, 1.0, "2x iteration caps"),
    # (f) fusion learning-rate multiplier
    "f_lr01": ({}, 0.1, 0.1, "fusion lr x0.1 (the CLI recipe)"),
    # (g) what the head sees
    "g_cat": ({"readout": "cat"}, 0.1, 1.0, "output concat(z_f*, x_1..x_M)"),
    "g_zf_xf": ({"output": "state+injection"}, 0.1, 1.0, "output z_f* + x_f"),
    "g_zf": ({"output": "state"}, 0.1, 1.0, "output z_f* (the published layer's)"),
    # (h) initialisation of the modality blocks
    "h_res_zero": ({"residual_init": "zero"}, 0.1, 1.0, "each modality block's W2 at 0"),
    # (i) cost of the gradient: backward tolerance and the penalty's random vectors
    "i_btol": ({"b_tol": 1e-2}, 0.1, 1.0, "backward tolerance 1e-2"),
    "k_gate_01": ({"gate_scale": 0.1}, 0.1, 1.0, "gate sum scaled by 0.1 (W_g learns 10x slower under Adam)"),
    "k_gate_03": ({"gate_scale": 0.3}, 0.1, 1.0, "gate sum scaled by 0.3"),
    "k_gate_0": ({"gate_scale": 0.0}, 0.1, 1.0, "gate off (control: no multiplicative term, no fixed point to speak of)"),
    "l_fuse_zero": ({"fuse_init": "zero"}, 0.1, 1.0, "W_f = 0 at init: z_f' = norm(ReLU(x_f)), the recurrence learned"),
    # (m) what the gate reads besides z_f
    "m_gate_inj": ({"gate_input": "inj"}, 0.1, 1.0, "gate reads the injections x_i instead of the modality states z_i'"),
    "m_gate_zf": ({"gate_input": "fused"}, 0.1, 1.0, "gate reads z_f only (the modality stage unused)"),
    # (n) modality blocks
    "n_mod_plain": ({"modality_block": "plain"}, 0.1, 1.0, "plain modality blocks, which keep the injection's scale: ReLU(W2 ReLU(GN1(W1 z_i)) + x_i)"),
    "n_mod_residual": ({"modality_block": "residual"}, 0.1, 1.0, "the published modality blocks: GN3(ReLU(GN2(W2 ReLU(GN1(W1 z_i)) + x_i) + z_i))"),
    "i_jacv1": ({"jac_vectors": 1}, 0.1, 1.0, "one random vector in the Jacobian penalty's estimate"),
}


def parse_variant(name: str) -> Tuple[Optional[dict], float, float, str]:
    """A registered name, or '+'-joined registered names (their settings merged, later wins)."""
    if name in VARIANTS:
        return VARIANTS[name]
    parts = name.split("+")
    if not all(p in VARIANTS for p in parts):
        raise SystemExit(f"unknown variant {name!r}; --list shows the names")
    kw: dict = {}
    jac, lrm = VARIANTS[parts[0]][1], 1.0     # the first part's Jacobian weight unless a d_ part sets it
    for p in parts:
        pkw, pjac, plrm, _ = VARIANTS[p]
        kw.update(pkw)
        if p.startswith("d_"):
            jac = pjac
        if p.startswith("f_"):
            lrm = plrm
    if kw.get("jac_reg") is False:
        jac = 0.0
    return kw, jac, lrm, " + ".join(parts)


def grouped_adam(fusion: nn.Module, mult: float) -> Callable:
    """``optimtype`` for MultiBench's train: Adam with the fusion's parameters at ``mult`` x lr."""
    fusion_ids = {id(p) for p in fusion.parameters()}

    def make(params, lr, weight_decay):
        params = list(params)
        fus = [p for p in params if id(p) in fusion_ids]
        rest = [p for p in params if id(p) not in fusion_ids]
        return torch.optim.Adam([{"params": rest}, {"params": fus, "lr": lr * mult}], lr=lr,
                                weight_decay=weight_decay)
    return make


# ---------------------------------------------------------------------------------- run
def run_one(name: str, seed: int, epochs: int, lr: float, save_dir: str) -> Dict[str, float]:
    from training_structures.Supervised_Learning import single_test, train

    kw, jac, lr_mult, _ = parse_variant(name)
    torch.manual_seed(seed)
    train_dl, valid_dl, test_dl = xor_loaders(seed)
    dim = train_dl.dataset.tensors[0].shape[1]
    encoders = [nn.Sequential(nn.Linear(dim, WIDTH), nn.ReLU()) for _ in range(2)]
    if kw is None or "control" in kw:
        fusion: nn.Module = (Concat([WIDTH, WIDTH]) if kw is None
                             else ConcatLayer([WIDTH, WIDTH], WIDTH, kw["control"]))
        objective: Callable = nn.CrossEntropyLoss()
        args = None
        kw = None
    else:
        kw = dict(kw)
        kw.setdefault("jac_reg", jac > 0)
        fusion = DEQVariant([WIDTH, WIDTH], WIDTH, **kw)
        objective = deq_objective(nn.CrossEntropyLoss(), jacobian_weight=jac)
        args = {}
    head = nn.Sequential(nn.Linear(fusion.out_dim, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 2))

    # Jacobian penalty vs task loss at initialisation (one training batch, no step)
    init = {}
    if kw is not None:
        x0, x1, y = next(iter(train_dl))
        fusion.train()
        out = head(fusion([encoders[0](x0), encoders[1](x1)]))
        init["task0"] = float(F.cross_entropy(out, y).detach())
        init["jac0"] = float(fusion.jac_loss.detach()) if fusion.jac_loss is not None else float("nan")
        if fusion.jac_loss is not None and hasattr(fusion, "take_jacobian_penalty"):
            fusion.take_jacobian_penalty(y.shape[0])   # mark this probe's penalty as read

    save = os.path.join(save_dir, f"deq_synergy_{os.getpid()}.pt")
    optimtype = grouped_adam(fusion, lr_mult) if lr_mult != 1.0 else torch.optim.Adam
    stats: Dict[str, List[float]] = {"conv": [], "res": []}
    if kw is not None:
        fusion.stats = stats
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        train(encoders, fusion, head, train_dl, valid_dl, epochs, optimtype=optimtype, lr=lr,
              objective=objective, objective_args_dict=args, save=save, track_complexity=False)
    seconds = (time.perf_counter() - t0) / epochs
    model = torch.load(save, weights_only=False)   # MultiBench saves whole models
    os.remove(save)
    with contextlib.redirect_stdout(io.StringIO()):
        acc = float(single_test(model, test_dl)["Accuracy"])
        train_acc = float(single_test(model, train_dl)["Accuracy"])
    per_epoch = max(1, len(train_dl))
    last = slice(-per_epoch, None)
    return {"acc": acc, "train_acc": train_acc, "s_per_epoch": seconds,
            "conv": statistics.mean(stats["conv"][last]) if stats["conv"] else float("nan"),
            "res": statistics.median(stats["res"][last]) if stats["res"] else float("nan"), **init}


def _fmt(values: List[float]) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3f} +- {s:.3f}"


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["concat", "deq"],
                   help="names from --list, or '+'-joined names to combine them")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--save-dir", default=os.environ.get("TMPDIR", "/tmp"))
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.list:
        for k, (_, jac, lrm, desc) in VARIANTS.items():
            print(f"{k:16s} jac={jac:<5} fusion_lr_x{lrm:<4} {desc}")
        return
    print(f"XOR synergy inside MultiBench train(): {a.epochs} epochs, Adam lr {a.lr}, seeds {a.seeds}")
    print(f"{'variant':28s} {'test acc':16s} {'per seed':24s} {'s/epoch':>8s} {'conv':>6s} "
          f"{'res':>8s} {'jac0/task0':>10s}")
    for name in a.variants:
        rows = []
        for s in a.seeds:
            rows.append(run_one(name, s, a.epochs, a.lr, a.save_dir))
            print(f"  {name} seed {s}: {rows[-1]}", file=sys.stderr, flush=True)
        accs = [r["acc"] for r in rows]
        ratio = statistics.mean(r.get("jac0", float("nan")) / r["task0"] for r in rows) if "task0" in rows[0] else float("nan")
        print(f"{name:28s} {_fmt(accs):16s} {' '.join(f'{x:.3f}' for x in accs):24s} "
              f"{statistics.mean(r['s_per_epoch'] for r in rows):8.2f} "
              f"{statistics.mean(r['conv'] for r in rows):6.2f} "
              f"{statistics.median(r['res'] for r in rows):8.1e} {ratio:10.3f}", flush=True)


if __name__ == "__main__":
    main()
