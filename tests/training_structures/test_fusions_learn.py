"""Every registered fusion learns the synthetic synergy task (y = XOR of bits held by
different modalities; each modality alone is at chance) inside our train()."""
import pytest
import torch

from multizoo_ext import create_dataset, create_fusion, list_fusions
from multizoo_ext.training_structures.supervised import test as run_test
from multizoo_ext.training_structures.supervised import train
from multizoo_ext.unimodals.common_models import MLP

# Small widths keep the slowest fusion (DEQ) quick; every fusion gets the same budget.
_DEQ_KWARGS = {"width": 16, "num_groups": 4, "f_max_iter": 15, "b_max_iter": 15}
FUSION_KWARGS = {"deq": _DEQ_KWARGS, "deq_paper": _DEQ_KWARGS, "transformer": {"d_model": 16, "nhead": 2},
                 "lowrank": {"output_dim": 16, "rank": 4}}


@pytest.fixture(scope="module")
def synergy():
    return create_dataset("synthetic", task="synergy", n_samples=1500, dims=(6, 6), batch_size=32, seed=0)


@pytest.mark.parametrize("name", list_fusions())
def test_fusion_learns_synergy(name, synergy):
    train_dl, valid_dl, test_dl = synergy
    torch.manual_seed(0)
    encoders = [MLP(6, 32, 8), MLP(6, 32, 8)]
    fusion = create_fusion(name, input_dims=[8, 8], **FUSION_KWARGS.get(name, {}))
    head = MLP(fusion.out_dim, 32, 2)
    res = train(encoders, fusion, head, train_dl, valid_dl, 12, optimtype=torch.optim.Adam, lr=5e-3,
                save=None, seed=0, progress=False)
    acc = run_test(res.model, test_dl, no_robust=True)["Accuracy"]
    assert acc > 0.75, f"{name}: test accuracy {acc:.3f} (chance 0.5)"
