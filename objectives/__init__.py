"""Objectives (installed as ``multizoo_ext.objectives``).

Losses are small ``nn.Module``s on tensors, usable anywhere; the factories return
MultiBench objectives ``objective(pred, truth, args) -> scalar`` for its ``train()``:

>>> from multizoo_ext.objectives import refnet_objective, deq_objective, MultiSimilarityLoss

Importing this package registers the factories (``refnet``, ``refnet_refiner_only``, ``deq``).
"""
from multizoo_ext.objectives.multisimilarity import MultiSimilarityLoss, multi_similarity_loss
from multizoo_ext.objectives.refiner import RefinerLoss
from multizoo_ext.objectives.refnet import refiner_only_objective, refnet_objective
from multizoo_ext.objectives.deq import deq_objective

__all__ = [
    "MultiSimilarityLoss",
    "RefinerLoss",
    "deq_objective",
    "multi_similarity_loss",
    "refiner_only_objective",
    "refnet_objective",
]
