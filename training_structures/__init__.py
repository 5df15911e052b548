"""Training loops (installed as ``multizoo_ext.training_structures``): MultiBench's
``train`` / ``test`` (also under MultiBench's module name ``Supervised_Learning``) and the
self-supervised refiner pre-training ``pretrain``."""
from multizoo_ext.training_structures.self_supervised import PretrainResult, pretrain
from multizoo_ext.training_structures.supervised import MMDL, TrainResult, test, train

__all__ = ["MMDL", "PretrainResult", "TrainResult", "pretrain", "test", "train"]
