"""Training loops: ``supervised`` (MultiBench's train/test; alias ``Supervised_Learning``)."""
from multizoo_ext.training_structures.supervised import MMDL, TrainResult, test, train  # noqa: F401
