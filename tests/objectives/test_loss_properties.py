"""Property-based checks of the public losses and objectives: over random batch sizes (0, 1,
2, ...), widths, dtypes, label kinds, bad labels and NaN/Inf embeddings, every call either
returns a finite scalar (with finite gradients) or raises our own ValueError/TypeError;
never a raw error from deep inside torch and never a silent NaN."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from multizoo_ext.fusions import DEQFusion, LowRankTensorFusion, ReFNet
from multizoo_ext.objectives import MultiSimilarityLoss, RefinerLoss, deq_objective, refnet_objective

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OURS = (ValueError, TypeError)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _finite_or_ours(call):
    try:
        out = call()
    except OURS as exc:
        assert str(exc), "our errors carry a message"
        return None
    assert out.dim() == 0 and torch.isfinite(out), out
    return out


@st.composite
def ms_calls(draw):
    batch = draw(st.sampled_from([0, 1, 2, 3, 8]))
    width = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(DTYPES))
    labels = draw(st.sampled_from(["index", "index2d", "multihot", "float", "negative", "wrong_rows", "bad_multihot"]))
    fault = draw(st.sampled_from(["none", "none", "nan", "inf", "zero_row", "rank3"]))
    return batch, width, dtype, labels, fault, draw(st.integers(0, 2**16))


@FAST
@given(ms_calls())
def test_multi_similarity_is_finite_or_raises_our_error(call):
    batch, width, dtype, labels, fault, seed = call
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, width, generator=g).to(dtype)
    if fault == "nan" and batch:
        emb[0, 0] = float("nan")
    elif fault == "inf" and batch:
        emb[-1, -1] = float("inf")
    elif fault == "zero_row" and batch:
        emb[0] = 0
    elif fault == "rank3":
        emb = emb.unsqueeze(-1)
    y = {"index": lambda: torch.randint(0, 3, (batch,), generator=g),
         "index2d": lambda: torch.randint(0, 3, (batch, 1), generator=g),
         "multihot": lambda: (torch.rand(batch, 4, generator=g) > 0.5).float(),
         "float": lambda: torch.rand(batch, generator=g),
         "negative": lambda: -torch.ones(batch, dtype=torch.long),
         "wrong_rows": lambda: torch.zeros(batch + 1, dtype=torch.long),
         "bad_multihot": lambda: torch.full((batch, 4), 2.0)}[labels]()
    emb.requires_grad_(emb.is_floating_point())
    loss = _finite_or_ours(lambda: MultiSimilarityLoss()(emb, y))
    if loss is not None and loss.requires_grad:
        (grad,) = torch.autograd.grad(loss, emb)
        assert torch.isfinite(grad).all()


@FAST
@given(st.sampled_from([0, 1, 2, 5]), st.sampled_from(["mse", "cosine", "contrastive", "ms"]),
       st.sampled_from(["none", "nan", "count", "width", "batch"]), st.integers(0, 2**16))
def test_refiner_loss_is_finite_or_raises_our_error(batch, kind, fault, seed):
    g = torch.Generator().manual_seed(seed)
    recons = [torch.randn(batch, 3, generator=g, requires_grad=True), torch.randn(batch, 4, generator=g)]
    targets = [torch.randn(batch, 3, generator=g), torch.randn(batch, 4, generator=g)]
    if fault == "nan" and batch:
        targets[0] = targets[0].clone()
        targets[0][0, 0] = float("nan")
    elif fault == "count":
        targets = targets[:1]
    elif fault == "width":
        targets[1] = torch.randn(batch, 5, generator=g)
    elif fault == "batch":
        targets[1] = torch.randn(batch + 1, 4, generator=g)
    _finite_or_ours(lambda: RefinerLoss(kind=kind)(recons, targets))


@st.composite
def objective_calls(draw):
    which = draw(st.sampled_from(["refnet", "deq"]))
    batch = draw(st.sampled_from([1, 2, 6]))
    task = draw(st.sampled_from(["classification", "multilabel", "regression"]))
    # (a NaN prediction gives a NaN loss, as torch's losses do: the loops stop on it with
    # NonFiniteLossError naming the batch, see tests/training_structures/test_loop_checks.py)
    fault = draw(st.sampled_from(["none", "none", "label_range", "label_float", "args_none", "other_batch"]))
    return which, batch, task, fault, draw(st.integers(0, 2**16))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objective_calls())
def test_method_objectives_are_finite_or_raise_our_error(call):
    which, batch, task, fault, seed = call
    torch.manual_seed(seed)
    dims, k = [3, 4], 3
    if which == "refnet":
        fusion = ReFNet(LowRankTensorFusion(dims, 6, 2), dims)
        objective = refnet_objective(task=task)
    else:
        fusion = DEQFusion(dims, width=8)
        objective = deq_objective(task=task)
    head = nn.Linear(fusion.out_dim, 1 if task == "regression" else k)
    xs = [torch.randn(batch, d) for d in dims]
    pred = head(fusion(xs))
    truth = {"classification": torch.randint(0, k, (batch,)), "multilabel": (torch.rand(batch, k) > 0.5).float(),
             "regression": torch.randn(batch, 1)}[task]
    args = {"model": fusion, "deq": fusion, "training": True, "inputs": xs}
    if fault == "label_range" and task != "regression":
        truth = truth * 0 + 7
    elif fault == "label_float" and task == "classification":
        truth = truth.float() + 0.5
    elif fault == "args_none":
        args = None
    elif fault == "other_batch":
        pred = pred[:0] if batch > 1 else torch.cat([pred, pred])
        truth = truth[: pred.shape[0]] if pred.shape[0] <= truth.shape[0] else torch.cat([truth, truth])
    loss = _finite_or_ours(lambda: objective(pred, truth, args))
    if loss is not None:
        loss.backward()
