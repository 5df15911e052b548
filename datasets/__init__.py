"""Dataset loaders (installed as ``multizoo_ext.datasets``).

Each registered builder is ``get_dataloader(**kwargs) -> (train, valid, test)`` DataLoaders
yielding ``[x_1, ..., x_M, y]``. Registered names: ``synthetic``, ``digits``, ``mogonet``
(and ``rosmap``, the same with a default path), ``mmimdb``, ``avmnist``, ``affect``, ``npz``.
Importing this package runs the ``@register_dataset`` decorators.
"""
from multizoo_ext.datasets import (  # noqa: F401  (imported for registration)
    affect,
    arrays,
    avmnist,
    common,
    digits,
    mmimdb,
    mogonet,
    robustness,
    synthetic,
)
