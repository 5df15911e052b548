"""Baseline fusions with MultiBench's class names: Concat, TensorFusion, LowRankTensorFusion.

All take a list of M >= 2 tensors ``(B, d_i)`` (widths may differ; with ``flatten`` inputs
``(B, ...)`` are flattened first) and return one tensor ``(B, out_dim)``. Inputs are checked
by :func:`multizoo_ext.validation.check_fusion_inputs`: NaN/Inf values are refused, and
LowRankTensorFusion wants inputs of its parameters' dtype (``.double()`` it for float64).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from multizoo_ext.registry import register_fusion
from multizoo_ext.validation import check_fusion_inputs, check_input_dims, parameter_dtype

__all__ = ["Concat", "TensorFusion", "LowRankTensorFusion"]


@register_fusion("concat")
class Concat(nn.Module):
    """Concatenate the flattened modalities: ``[(B, d_1), ..., (B, d_M)] -> (B, sum d_i)``.

    Args:
        input_dims: optional widths; when given, ``out_dim`` is known and inputs are checked.
            ``Concat()`` with no argument works like MultiBench's.
    """

    def __init__(self, input_dims: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.input_dims = None if input_dims is None else check_input_dims(input_dims, "Concat")
        self.out_dim = sum(self.input_dims) if self.input_dims else None

    def forward(self, modalities: List[torch.Tensor]) -> torch.Tensor:
        flat = check_fusion_inputs(modalities, "Concat", self.input_dims)  # (B, d_i)
        return torch.cat(flat, dim=1)


@register_fusion("tensor")
class TensorFusion(nn.Module):
    """Tensor Fusion (Zadeh et al., 2017): outer product of ``[x_i, 1]`` over all modalities.

    ``[(B, d_1), ..., (B, d_M)] -> (B, prod_i (d_i + 1))``; no parameters. The output width
    grows multiplicatively: keep the encoders narrow.

    Args:
        input_dims: optional widths (sets ``out_dim`` and checks inputs).
        max_out_dim: the largest ``prod_i (d_i + 1)`` accepted with ``input_dims`` (a wider
            product is refused at construction instead of exhausting memory in the head:
            6 modalities of width 32 would give 33**6, about 1.3e9 features). Default: 2**24.
    """

    def __init__(self, input_dims: Optional[Sequence[int]] = None, max_out_dim: int = 2 ** 24) -> None:
        super().__init__()
        self.input_dims = None if input_dims is None else check_input_dims(input_dims, "TensorFusion")
        self.out_dim = math.prod(d + 1 for d in self.input_dims) if self.input_dims else None
        if self.out_dim is not None and self.out_dim > max_out_dim:
            raise ValueError(f"TensorFusion: output width prod(d_i + 1) = {self.out_dim:,} for input_dims "
                             f"{list(self.input_dims)} exceeds max_out_dim = {max_out_dim:,}; expected narrower "
                             "encoders (embed_dim) or fewer modalities")

    def forward(self, modalities: List[torch.Tensor]) -> torch.Tensor:
        flat = check_fusion_inputs(modalities, "TensorFusion", self.input_dims)  # (B, d_i)
        ones = flat[0].new_ones(flat[0].shape[0], 1)
        out = torch.cat([flat[0], ones], 1)  # (B, d_1 + 1)
        for x in flat[1:]:
            x1 = torch.cat([x, ones], 1)  # (B, d_i + 1)
            out = (out.unsqueeze(2) * x1.unsqueeze(1)).flatten(1)  # (B, prod so far)
        return out


@register_fusion("lowrank")
class LowRankTensorFusion(nn.Module):
    """Low-rank Multimodal Fusion (Liu et al., 2018), MultiBench's argument order.

    ``y = sum_r w_r * prod_i ([x_i, 1] @ W_i[r]) + b``. The factors ``W_i`` are registered
    parameters (MultiBench keeps them in a plain list, so they are neither moved by
    ``.to()`` nor saved: fixed here).

    Args:
        input_dims: widths ``d_i`` of the M modalities.
        output_dim: fused width. Default: 64.
        rank: number of rank-1 terms. Default: 4.
        flatten: flatten inputs ``(B, ...)`` to ``(B, d_i)`` first. Default: True.

    Shapes: ``[(B, d_i)] * M -> (B, output_dim)``.
    """

    def __init__(self, input_dims: Sequence[int], output_dim: int = 64, rank: int = 4,
                 flatten: bool = True) -> None:
        super().__init__()
        dims = check_input_dims(input_dims, "LowRankTensorFusion")
        if output_dim <= 0 or rank <= 0:
            raise ValueError(f"LowRankTensorFusion needs positive output_dim and rank, got {output_dim}, {rank}")
        self.input_dims, self.output_dim, self.rank, self.flatten = dims, int(output_dim), int(rank), flatten
        self.out_dim = self.output_dim
        self.factors = nn.ParameterList(
            nn.Parameter(nn.init.xavier_normal_(torch.empty(rank, d + 1, output_dim))) for d in dims)
        self.fusion_weights = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, rank)))
        self.fusion_bias = nn.Parameter(torch.zeros(1, output_dim))

    def forward(self, modalities: List[torch.Tensor]) -> torch.Tensor:
        xs = check_fusion_inputs(modalities, "LowRankTensorFusion", self.input_dims, parameter_dtype(self),
                                 flatten=self.flatten)  # (B, d_i)
        prod = None
        for x, factor in zip(xs, self.factors):
            x1 = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)  # (B, d_i + 1)
            proj = torch.einsum("bd,rdo->rbo", x1, factor)  # (rank, B, output_dim)
            prod = proj if prod is None else prod * proj
        out = torch.einsum("r,rbo->bo", self.fusion_weights[0], prod)  # (B, output_dim)
        return out + self.fusion_bias
