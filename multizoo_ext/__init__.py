"""multizoo-ext: ReFNet and DEQ fusion as drop-in MultiBench / MultiZoo modules.

The MultiZoo folders install as subpackages: ``multizoo_ext.datasets``,
``multizoo_ext.unimodals``, ``multizoo_ext.fusions``, ``multizoo_ext.objectives`` and
``multizoo_ext.training_structures``.
"""
import logging

from multizoo_ext.registry import (
    Recipe,
    create_dataset,
    create_encoder,
    create_fusion,
    create_objective,
    get_recipe,
    list_datasets,
    list_encoders,
    list_fusions,
    list_objectives,
    register_dataset,
    register_encoder,
    register_fusion,
    register_objective,
)
from multizoo_ext.utils import resolve_device, seed_everything

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Recipe",
    "__version__",
    "create_dataset",
    "create_encoder",
    "create_fusion",
    "create_objective",
    "get_recipe",
    "list_datasets",
    "list_encoders",
    "list_fusions",
    "list_objectives",
    "register_dataset",
    "register_encoder",
    "register_fusion",
    "register_objective",
    "resolve_device",
    "seed_everything",
]
