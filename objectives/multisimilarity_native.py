"""The Multi-Similarity loss of a CPU float32 batch through the C kernels of
``multisimilarity_native.c`` (compiled on first use by :mod:`multizoo_ext.native`).

Why: on a (B, B) matrix of a few thousand to a few hundred thousand entries, eager PyTorch
spends most of the loss's time launching its ~30 ops, not computing them. The kernels do
the masked log-sum-exps, the mining, the softmax weights and the normalisation's forward and
backward in a handful of calls; the two matrix products stay with PyTorch (BLAS). Same
maths and the same mining comparisons as the eager path; the values agree to float32
rounding (the ``exp`` is a polynomial with relative error < 1e-8 before rounding).

Used by :func:`multizoo_ext.objectives.multisimilarity.multi_similarity_loss` (and so by
:class:`~multizoo_ext.objectives.multisimilarity.MultiSimilarityLoss`) when the embeddings
are a CPU float32 matrix, the settings need no overflow shift (true for the defaults) and
the kernels are available; :func:`available` tells. Everything else takes the eager path.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from multizoo_ext import native

__all__ = ["available", "mean_loss", "pack_multihot"]

_SOURCE = Path(__file__).with_name("multisimilarity_native.c")
_NAME = "multisimilarity"
_P, _F, _L, _I = ctypes.c_void_p, ctypes.c_float, ctypes.c_long, ctypes.c_int


def _prepare(lib: ctypes.CDLL) -> None:
    """Look up and type the kernels' symbols (inside :func:`native.load`'s guarded load: a
    library without them is rebuilt once, then the eager path is used)."""
    lib.ms_normalize_f32.argtypes = [_P, _L, _L, _F, _P, _P]
    lib.ms_normalize_f32.restype = _I
    lib.ms_square_f32.argtypes = [_P, _P, _I, _L, _F, _F, _F, _F, _I, _P, _P, _P]
    lib.ms_square_f32.restype = None
    lib.ms_project_f32.argtypes = [_P, _P, _P, _L, _L, _F, _F]
    lib.ms_project_f32.restype = None
    lib.ms_pack_multihot_i64.argtypes = [_P, _L, _L, _P]
    lib.ms_pack_multihot_i64.restype = _I


def _library() -> Optional[ctypes.CDLL]:
    return native.load(_NAME, _SOURCE, _prepare)


def available() -> bool:
    """Whether the kernels can be used in this process (compiles them on the first call)."""
    return _library() is not None


class _NativeMeanMultiSimilarity(torch.autograd.Function):
    """Embeddings (B, D) -> mean MS loss (scalar); backward: one matrix product plus one
    kernel call."""

    @staticmethod
    def forward(ctx, embeddings, plan):  # type: ignore[override]
        lib, key, mode, hp, norm_eps, on_bad = plan
        emb = embeddings.contiguous()
        batch, dim = emb.shape
        unit = torch.empty_like(emb)  # (B, D): rows / max(norm, eps)
        norms = emb.new_empty(batch)  # (B,)
        if lib.ms_normalize_f32(emb.data_ptr(), batch, dim, norm_eps, unit.data_ptr(), norms.data_ptr()):
            on_bad()  # raises
        sim = torch.mm(unit, unit.t())  # (B, B)
        loss = emb.new_empty(())
        grad_sim = torch.empty_like(sim)  # (B, B): d mean / dS, symmetrised
        coef = emb.new_empty(batch, 2)  # workspace: each anchor's softmax factors
        lib.ms_square_f32(sim.data_ptr(), key.data_ptr(), mode, batch, *hp, loss.data_ptr(), grad_sim.data_ptr(),
                          coef.data_ptr())
        ctx.lib, ctx.norm_eps = lib, norm_eps
        ctx.save_for_backward(unit, norms, grad_sim)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):  # type: ignore[override]
        unit, norms, grad_sim = ctx.saved_tensors
        grad = torch.mm(grad_sim, unit)  # (B, D) = dL/dU
        ctx.lib.ms_project_f32(grad.data_ptr(), unit.data_ptr(), norms.data_ptr(), grad.shape[0], grad.shape[1],
                               ctx.norm_eps, float(grad_loss))
        return grad, None


MULTIHOT_MAX_LABELS = 64  # multi-hot rows are packed into one 64-bit mask each


def pack_multihot(labels: Tensor) -> Optional[Tensor]:
    """(B, K) integer or bool multi-hot labels, K <= 64 -> (B,) int64 bit masks (bit c of
    row i set where ``labels[i, c] != 0``); None if any value is not 0/1. Kernels needed
    (:func:`available`)."""
    lib = _library()
    hot = labels.to(torch.int64).contiguous()
    bits = hot.new_empty(hot.shape[0])
    if lib.ms_pack_multihot_i64(hot.data_ptr(), hot.shape[0], hot.shape[1], bits.data_ptr()):
        return None
    return bits


def mean_loss(embeddings: Tensor, key: Tensor, mode: int, alpha: float, beta: float, base: float, epsilon: float,
              mining: bool, norm_eps: float, on_bad) -> Optional[Tensor]:
    """Mean MS loss through the kernels, or None when they are not available.

    No input checks (the caller validated); B >= 2.

    Args:
        embeddings: ``(B, D)`` CPU float32.
        key: how to tell which pairs share a label, by ``mode``: 0, ``(B,)`` contiguous int64
            class indices; 1, ``(B, B)`` contiguous float32, non-zero where two samples share
            a label; 2, ``(B,)`` int64 label bit masks from :func:`pack_multihot`.
        mode: 0, 1 or 2.
        alpha, beta, base, epsilon, mining: the loss's settings.
        norm_eps: the normalisation's eps (F.normalize's 1e-12).
        on_bad: called (no arguments) when a row norm is NaN/Inf; must raise.

    Returns:
        Scalar float32 loss connected to ``embeddings``, or None.
    """
    lib = _library()
    if lib is None:
        return None
    hp = (alpha, beta, base, epsilon, int(mining))
    return _NativeMeanMultiSimilarity.apply(embeddings, (lib, key, mode, hp, norm_eps, on_bad))
