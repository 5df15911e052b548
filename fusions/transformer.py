"""Transformer fusion: self-attention over one token per modality."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from multizoo_ext.registry import register_fusion
from multizoo_ext.validation import check_fusion_inputs, check_input_dims, parameter_dtype

__all__ = ["TransformerFusion"]


@register_fusion("transformer")
class TransformerFusion(nn.Module):
    """Project each modality to one ``d_model`` token, add a learned modality embedding,
    prepend a learned [CLS] token, run a TransformerEncoder, and read out the [CLS] token
    (or the mean of the modality tokens).

    Args:
        input_dims: widths ``d_i`` of the M modalities (M >= 2, may differ).
        d_model: token width. Default: 64.
        nhead: attention heads (must divide ``d_model``). Default: 4.
        num_layers: encoder layers. Default: 2.
        dim_feedforward: feed-forward width. Default: ``2 * d_model``.
        dropout: dropout inside the encoder. Default: 0.1.
        output_dim: optional final Linear width; ``out_dim`` is ``output_dim or d_model``.
        pooling: "cls" or "mean". Default: "cls".

    Shapes: ``[(B, d_i)] * M -> (B, out_dim)``; inputs ``(B, ...)`` are flattened. Inputs
    must have the parameters' dtype (``.double()`` the fusion for float64) and be finite.
    """

    def __init__(self, input_dims: Sequence[int], d_model: int = 64, nhead: int = 4,
                 num_layers: int = 2, dim_feedforward: Optional[int] = None, dropout: float = 0.1,
                 output_dim: Optional[int] = None, pooling: str = "cls") -> None:
        super().__init__()
        dims = check_input_dims(input_dims, "TransformerFusion")
        if d_model % nhead != 0:
            raise ValueError(f"TransformerFusion: d_model ({d_model}) must be divisible by nhead ({nhead})")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"TransformerFusion: pooling must be 'cls' or 'mean', got {pooling!r}")
        self.input_dims, self.pooling = dims, pooling
        self.proj = nn.ModuleList(nn.Linear(d, d_model) for d in dims)
        self.modality_embed = nn.Parameter(torch.randn(len(dims), d_model) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward or 2 * d_model, dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, output_dim) if output_dim else nn.Identity()
        self.out_dim = int(output_dim or d_model)

    def forward(self, modalities: List[torch.Tensor]) -> torch.Tensor:
        xs = check_fusion_inputs(modalities, "TransformerFusion", self.input_dims, parameter_dtype(self))  # (B, d_i)
        tokens = torch.stack([p(x) for p, x in zip(self.proj, xs)], 1)  # (B, M, d_model)
        tokens = tokens + self.modality_embed
        cls = self.cls.expand(tokens.shape[0], -1, -1)  # (B, 1, d_model)
        h = self.norm(self.encoder(torch.cat([cls, tokens], 1)))  # (B, 1 + M, d_model)
        pooled = h[:, 0] if self.pooling == "cls" else h[:, 1:].mean(1)  # (B, d_model)
        return self.out(pooled)
