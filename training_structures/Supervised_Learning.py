"""MultiBench's module name, so ``from training_structures.Supervised_Learning import train, test``
becomes ``from multizoo_ext.training_structures.Supervised_Learning import train, test``."""
from multizoo_ext.training_structures.supervised import (  # noqa: F401
    MMDL,
    TrainResult,
    deal_with_objective,
    evaluate,
    single_test,
    test,
    train,
)
