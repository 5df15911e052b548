"""Training loops (installed as ``multizoo_ext.training_structures``): MultiBench's
``train`` / ``test`` (also under MultiBench's module name ``Supervised_Learning``), the
self-supervised refiner pre-training ``pretrain``, and the helpers both share
(``loop_utils``; ``NonFiniteLossError`` is what a NaN/Inf training loss raises)."""
from multizoo_ext.training_structures.loop_utils import NonFiniteLossError
from multizoo_ext.training_structures.self_supervised import PretrainResult, pretrain
from multizoo_ext.training_structures.supervised import MMDL, TrainResult, test, train

__all__ = ["MMDL", "NonFiniteLossError", "PretrainResult", "TrainResult", "pretrain", "test", "train"]
