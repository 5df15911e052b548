"""Unimodal encoders with MultiBench's class names and constructor argument order.

Every encoder maps one modality's tensor to an embedding ``(B, out_dim)`` (the sequence
encoders may return the whole sequence when asked, like MultiBench's). ``out_dim`` is an
attribute so loops and the CLI can size the fusion.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from multizoo_ext.registry import register_encoder

__all__ = ["MLP", "MaxOut_MLP", "Maxout", "GRU", "LSTM", "LeNet", "Identity"]


@register_encoder("mlp")
class MLP(nn.Module):
    """Two-layer perceptron ``indim -> hiddim -> outdim`` with ReLU.

    Same arguments as MultiBench's ``unimodals.common_models.MLP`` (whose dropout branch
    returns the hidden layer instead of the output: not copied).

    Args:
        indim: input width. hiddim: hidden width. outdim: output width.
        dropout: apply dropout after the hidden layer. Default: False.
        dropoutp: dropout probability. Default: 0.1.
        output_each_layer: return ``[0, x, hidden, leaky_relu(out)]`` like MultiBench.

    Shapes: ``(B, indim) -> (B, outdim)`` (any leading dims are kept).
    """

    def __init__(self, indim: int, hiddim: int, outdim: int, dropout: bool = False,
                 dropoutp: float = 0.1, output_each_layer: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(indim, hiddim)
        self.fc2 = nn.Linear(hiddim, outdim)
        self.dropout = dropout
        self.dropout_layer = nn.Dropout(dropoutp)
        self.output_each_layer = output_each_layer
        self.in_dim, self.out_dim = indim, outdim

    def forward(self, x: torch.Tensor):
        hidden = F.relu(self.fc(x))
        if self.dropout:
            hidden = self.dropout_layer(hidden)
        out = self.fc2(hidden)
        if self.output_each_layer:
            return [0, x, hidden, F.leaky_relu(out, 0.2)]
        return out


class Maxout(nn.Module):
    """Maxout unit: ``Linear(d, m * k)`` then the max over each group of ``k``.

    Shapes: ``(..., d) -> (..., m)``.
    """

    def __init__(self, d: int, m: int, k: int) -> None:
        super().__init__()
        self.d_in, self.d_out, self.pool_size = d, m, k
        self.lin = nn.Linear(d, m * k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)  # (..., m * k)
        return out.unflatten(-1, (self.d_out, self.pool_size)).amax(-1)  # (..., m)


@register_encoder("maxout_mlp")
class MaxOut_MLP(nn.Module):
    """BatchNorm -> Maxout -> BN/Dropout(0.3) -> Maxout -> BN/Dropout(0.3) [-> Linear].

    MultiBench's MM-IMDB encoder (and DEQ fusion's). Same argument order as MultiBench.

    Args:
        num_outputs: output width (of the final Linear).
        first_hidden: first Maxout width. Default: 64.
        number_input_feats: input width. Default: 300 (word2vec text on MM-IMDB).
        second_hidden: second Maxout width. Default: ``first_hidden``.
        linear_layer: end with ``Linear(second_hidden, num_outputs)``; if False the output
            is the second Maxout's (width ``second_hidden``).

    Shapes: ``(B, number_input_feats) -> (B, out_dim)``.
    """

    def __init__(self, num_outputs: int, first_hidden: int = 64, number_input_feats: int = 300,
                 second_hidden: Optional[int] = None, linear_layer: bool = True) -> None:
        super().__init__()
        second_hidden = first_hidden if second_hidden is None else second_hidden
        self.op0 = nn.BatchNorm1d(number_input_feats, 1e-4)
        self.op1 = Maxout(number_input_feats, first_hidden, 2)
        self.op2 = nn.Sequential(nn.BatchNorm1d(first_hidden), nn.Dropout(0.3))
        self.op3 = Maxout(first_hidden, second_hidden, 2)
        self.op4 = nn.Sequential(nn.BatchNorm1d(second_hidden), nn.Dropout(0.3))
        self.hid2val = nn.Linear(second_hidden, num_outputs) if linear_layer else None
        self.in_dim = number_input_feats
        self.out_dim = num_outputs if linear_layer else second_hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.op4(self.op3(self.op2(self.op1(self.op0(x)))))
        return h if self.hid2val is None else self.hid2val(h)


class _RNNEncoder(nn.Module):
    """Shared body of the GRU and LSTM encoders (batch-first sequences ``(B, T, indim)``)."""

    rnn_cls: type = nn.GRU

    def __init__(self, indim: int, hiddim: int, dropout: bool = False, dropoutp: float = 0.1,
                 flatten: bool = False, has_padding: bool = False, last_only: bool = False,
                 batch_first: bool = True, pooling: Optional[str] = None) -> None:
        super().__init__()
        if pooling not in (None, "last", "mean"):
            raise ValueError(f"pooling must be None, 'last' or 'mean', got {pooling!r}")
        self.rnn = self.rnn_cls(indim, hiddim, batch_first=batch_first)
        self.dropout, self.dropout_layer = dropout, nn.Dropout(dropoutp)
        self.flatten, self.has_padding, self.batch_first = flatten, has_padding, batch_first
        # last_only is MultiBench's flag for the last hidden state.
        self.pooling = "last" if last_only else pooling
        self.in_dim, self.out_dim = indim, hiddim

    def _last_hidden(self, h) -> torch.Tensor:
        h = h[0] if isinstance(h, tuple) else h  # LSTM returns (h, c)
        return h[-1]  # (B, hiddim)

    def forward(self, x):
        if self.has_padding:  # MultiBench's packed input: [padded (B, T, d), lengths (B,)]
            seq, lengths = x
            packed = nn.utils.rnn.pack_padded_sequence(
                seq, torch.as_tensor(lengths).cpu(), batch_first=self.batch_first, enforce_sorted=False)
            out, h = self.rnn(packed)
            if self.pooling == "mean":
                padded, lens = nn.utils.rnn.pad_packed_sequence(out, batch_first=self.batch_first)
                lens = lens.to(padded.device).clamp_min(1)
                out = padded.sum(1) / lens.unsqueeze(1).to(padded.dtype)
            else:
                out = self._last_hidden(h)
        else:
            out, h = self.rnn(x)  # (B, T, hiddim)
            if self.pooling == "last":
                out = self._last_hidden(h)
            elif self.pooling == "mean":
                out = out.mean(1 if self.batch_first else 0)
        if self.dropout:
            out = self.dropout_layer(out)
        if self.flatten:
            out = torch.flatten(out, 1)
        return out


@register_encoder("gru")
class GRU(_RNNEncoder):
    """GRU sequence encoder, MultiBench's arguments plus ``pooling``.

    Args:
        indim, hiddim: input and hidden widths.
        dropout, dropoutp: dropout on the output. Default: False, 0.1.
        flatten: flatten the output sequence to ``(B, T * hiddim)``.
        has_padding: input is ``[padded (B, T, indim), lengths (B,)]``; returns the last
            valid hidden state.
        last_only: return the last hidden state ``(B, hiddim)`` (MultiBench's flag).
        batch_first: sequences are ``(B, T, indim)``. Default: True.
        pooling: None (the whole sequence ``(B, T, hiddim)``), "last" or "mean" ``(B, hiddim)``.
    """

    rnn_cls = nn.GRU


@register_encoder("lstm")
class LSTM(_RNNEncoder):
    """LSTM sequence encoder; same arguments as :class:`GRU`."""

    rnn_cls = nn.LSTM


@register_encoder("lenet")
class LeNet(nn.Module):
    """LeNet-style CNN (MultiBench's AV-MNIST encoder): conv5 -> BN -> ReLU -> maxpool, then
    ``additional_layers`` conv3 blocks doubling the channels.

    Args:
        in_channels: input channels. args_channels: channels of the first block.
        additional_layers: further blocks (channels ``args_channels * 2**i``).
        output_each_layer: also return each block's globally pooled output (a list).
        linear: optional ``(in, out)`` Linear applied to the flattened output.
        squeeze_output: flatten the output to ``(B, features)``. MultiBench calls
            ``squeeze()``, which also drops a batch of one; we flatten from dim 1.
        global_pool: average-pool the last block to 1x1 so the width is known in advance.

    Shapes: ``(B, in_channels, H, W) -> (B, out_dim)``; with 28x28 images and 3 additional
    layers the spatial size reaches 1x1 (``out_dim = args_channels * 8``).
    """

    def __init__(self, in_channels: int, args_channels: int, additional_layers: int,
                 output_each_layer: bool = False, linear: Optional[Tuple[int, int]] = None,
                 squeeze_output: bool = True, global_pool: bool = False) -> None:
        super().__init__()
        chans = [args_channels * 2**i for i in range(additional_layers + 1)]
        convs = [nn.Conv2d(in_channels, chans[0], kernel_size=5, padding=2, bias=False)]
        convs += [nn.Conv2d(chans[i], chans[i + 1], kernel_size=3, padding=1, bias=False)
                  for i in range(additional_layers)]
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in chans)
        self.linear = nn.Linear(*linear) if linear is not None else None
        self.output_each_layer, self.sq_out, self.global_pool = output_each_layer, squeeze_output, global_pool
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight)
        self.in_dim = in_channels
        # Known when the output is pooled to 1x1 or ends in a Linear; otherwise it depends
        # on the image size (1x1 for 28x28 with 3 additional layers).
        self.out_dim = linear[1] if linear is not None else chans[-1]

    def forward(self, x: torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"LeNet expects images (B, C, H, W), got shape {tuple(x.shape)}")
        pooled = []
        out = x
        for conv, bn in zip(self.convs, self.bns):
            out = F.max_pool2d(F.relu(bn(conv(out))), 2)  # (B, C_i, H / 2**(i+1), W / 2**(i+1))
            pooled.append(out.mean((2, 3)))  # (B, C_i)
        if self.global_pool:
            out = out.mean((2, 3), keepdim=True)
        if self.sq_out or self.linear is not None:
            out = torch.flatten(out, 1)
        if self.linear is not None:
            out = self.linear(out)
        if self.output_each_layer:
            return pooled + [out]
        return out


@register_encoder("identity")
class Identity(nn.Module):
    """Returns its input unchanged (pre-extracted features). ``out_dim`` is optional."""

    def __init__(self, out_dim: Optional[int] = None) -> None:
        super().__init__()
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
