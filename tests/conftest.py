"""Suite-wide: one torch thread. Tiny tensors gain nothing from more, and on a shared
2-core machine extra intra-op threads stall (measured 15-50x slower)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
