"""Dataset loaders (installed as ``multizoo_ext.datasets``).

Each registered builder is ``get_dataloader(**kwargs) -> (train, valid, test)`` DataLoaders
yielding ``[x_1, ..., x_M, y]``; build one by name with
``multizoo_ext.create_dataset(name, ...)``. Registered names: ``synthetic``, ``digits``,
``mogonet`` (and ``rosmap``: the same, standardised), ``mmimdb``, ``avmnist``, ``affect``,
``npz``, ``mat`` (multi-view MATLAB ``.mat`` files). Importing this package runs the
``@register_dataset`` decorators.
"""
from multizoo_ext.datasets.affect import load_affect_pickle
from multizoo_ext.datasets.arrays import get_dataloader as arrays_dataloaders
from multizoo_ext.datasets.arrays import load_npz
from multizoo_ext.datasets.avmnist import get_dataloader as avmnist_dataloaders
from multizoo_ext.datasets.common import MultimodalDataset, Normalizer, arrays_to_dataloaders
from multizoo_ext.datasets.digits import load_digit_views
from multizoo_ext.datasets.label_fraction import split_labeled
from multizoo_ext.datasets.mat import get_dataloader as mat_dataloaders
from multizoo_ext.datasets.mat import load_mat
from multizoo_ext.datasets.mmimdb import get_dataloader as mmimdb_dataloaders
from multizoo_ext.datasets.mogonet import load_mogonet
from multizoo_ext.datasets.robustness import missing_modality_loaders, robustness_loaders
from multizoo_ext.datasets.synthetic import make_synthetic

__all__ = [
    "MultimodalDataset",
    "Normalizer",
    "arrays_dataloaders",
    "arrays_to_dataloaders",
    "avmnist_dataloaders",
    "load_affect_pickle",
    "load_digit_views",
    "load_mat",
    "load_mogonet",
    "load_npz",
    "make_synthetic",
    "mat_dataloaders",
    "missing_modality_loaders",
    "mmimdb_dataloaders",
    "robustness_loaders",
    "split_labeled",
]
