"""Fusions: ``forward(list of (B, d_i)) -> (B, out_dim)``; importing registers them."""
from multizoo_ext.fusions import common_fusions, transformer  # noqa: F401
from multizoo_ext.fusions.common_fusions import Concat, LowRankTensorFusion, TensorFusion  # noqa: F401
from multizoo_ext.fusions.transformer import TransformerFusion  # noqa: F401
from multizoo_ext.fusions import refnet  # noqa: F401
from multizoo_ext.fusions import deq  # noqa: F401
