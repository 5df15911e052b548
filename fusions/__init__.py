"""Fusions (installed as ``multizoo_ext.fusions``): ``forward(list of (B, d_i)) -> (B, out_dim)``.

>>> from multizoo_ext.fusions import Concat, ReFNet, DEQFusion

Importing this package registers every fusion under its name (``concat``, ``tensor``,
``lowrank``, ``transformer``, ``refnet``, ``deq``).
"""
from multizoo_ext.fusions.common_fusions import Concat, LowRankTensorFusion, TensorFusion
from multizoo_ext.fusions.transformer import TransformerFusion
from multizoo_ext.fusions.refnet import ReFNet
from multizoo_ext.fusions.deq import DEQFusion

__all__ = [
    "Concat",
    "DEQFusion",
    "LowRankTensorFusion",
    "ReFNet",
    "TensorFusion",
    "TransformerFusion",
]
