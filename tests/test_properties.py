"""Property-based checks of the public fusion entry points and of the loaders: over random
shapes, dtypes, batch sizes (0, 1, 2, ...) and NaN/Inf values, every call either returns a
finite tensor of the promised shape or raises our own ValueError/TypeError naming the
fusion or the data; never a raw error from deep inside torch and never a silent NaN."""
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from multizoo_ext.datasets.common import arrays_to_dataloaders
from multizoo_ext.datasets.mogonet import get_dataloader as mogonet_loaders
from multizoo_ext.fusions.common_fusions import Concat, LowRankTensorFusion, TensorFusion
from multizoo_ext.fusions.refnet import ReFNet
from multizoo_ext.fusions.transformer import TransformerFusion

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BUILDERS = {
    "Concat": lambda dims: Concat(dims),
    "TensorFusion": lambda dims: TensorFusion(dims),
    "LowRankTensorFusion": lambda dims: LowRankTensorFusion(dims, 4, 2),
    "TransformerFusion": lambda dims: TransformerFusion(dims, d_model=8, nhead=2, num_layers=1).eval(),
    "ReFNet": lambda dims: ReFNet(LowRankTensorFusion(dims, 4, 2), dims).eval(),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]


@st.composite
def fusion_calls(draw):
    name = draw(st.sampled_from(sorted(BUILDERS)))
    m = draw(st.integers(2, 3))
    dims = draw(st.lists(st.integers(1, 5), min_size=m, max_size=m))
    batch = draw(st.sampled_from([0, 1, 2, 5]))
    dtype = draw(st.sampled_from(DTYPES))
    # the inputs may disagree with the build: another width, another batch size, a missing modality
    fault = draw(st.sampled_from(["none", "none", "width", "batch", "count", "nan", "inf", "rank3"]))
    return name, dims, batch, dtype, fault, draw(st.integers(0, 2**16))


@FAST
@given(fusion_calls())
def test_fusions_return_finite_correct_shapes_or_raise_our_errors(call):
    name, dims, batch, dtype, fault, seed = call
    torch.manual_seed(seed)
    fusion = BUILDERS[name](dims)
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, d) for d in dims]
    if fault == "width":
        shapes[-1] = (batch, dims[-1] + 1)
    elif fault == "batch":
        shapes[0] = (batch + 1, dims[0])
    elif fault == "count":
        shapes = shapes[:-1]
    elif fault == "rank3":
        shapes[0] = (batch, dims[0], 1)  # flattens to the right width
    xs = [(torch.randn(s, generator=g) * 3).to(dtype) for s in shapes]
    if fault in ("nan", "inf") and batch > 0 and dtype.is_floating_point:
        xs[-1][batch - 1, 0] = float("nan") if fault == "nan" else float("-inf")
    try:
        out = fusion(xs)
    except (ValueError, TypeError) as exc:
        assert name in str(exc), f"not our error: {type(exc).__name__}: {exc}"
        event(f"refused: {fault}")
        return
    event(f"served: {fault}")
    assert isinstance(out, torch.Tensor) and out.shape == (batch, fusion.out_dim)
    assert bool(torch.isfinite(out).all()), f"{name} returned NaN/Inf for {fault} inputs"
    # what must have been refused was refused
    assert fault in ("none", "rank3") or (fault in ("nan", "inf") and (batch == 0 or not dtype.is_floating_point))


@st.composite
def loader_arrays(draw):
    n = draw(st.integers(0, 14))
    m = draw(st.integers(0, 3))
    widths = draw(st.lists(st.integers(1, 4), min_size=m, max_size=m))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int64]))
    fault = draw(st.sampled_from(["none", "none", "nan", "inf", "rows", "label_nan"]))
    return n, widths, dtype, fault, draw(st.integers(0, 2**16))


@FAST
@given(loader_arrays())
def test_array_loaders_give_finite_batches_or_raise_our_errors(case):
    n, widths, dtype, fault, seed = case
    rng = np.random.default_rng(seed)
    mods = [rng.normal(size=(n, w)).astype(dtype) if dtype != np.int64 else rng.integers(0, 9, (n, w))
            for w in widths]
    labels = (np.arange(n) % 2).astype(np.float64)
    if fault in ("nan", "inf") and n and mods and dtype != np.int64:
        mods[-1][n - 1, 0] = np.nan if fault == "nan" else np.inf
    elif fault == "rows" and mods:
        mods[0] = mods[0][: max(n - 1, 0)]
    elif fault == "label_nan" and n:
        labels[0] = np.nan
    try:
        loaders = arrays_to_dataloaders(mods, labels, batch_size=4, valid_fraction=0.25, test_fraction=0.25,
                                        stratify=False)
    except (ValueError, TypeError) as exc:
        assert str(exc), "an error without a message"
        event(f"refused: {fault}")
        return
    event(f"served: {fault}")
    assert mods and n >= 4 and fault in ("none", "nan", "inf") and (fault == "none" or dtype == np.int64)
    for loader in loaders:
        for batch in loader:
            assert [tuple(t.shape[1:]) for t in batch[:-1]] == [(w,) for w in widths]
            assert all(bool(torch.isfinite(t.float()).all()) for t in batch)


@st.composite
def mogonet_folders(draw):
    k = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(1, 4), min_size=k, max_size=k))
    fault = draw(st.sampled_from(["none", "gap", "nan", "inf", "repeat", "rows"]))
    return widths, fault, draw(st.integers(0, k - 1)), draw(st.integers(0, 2**16))


@settings(max_examples=20, deadline=None)
@given(mogonet_folders())
def test_mogonet_loads_every_modality_finite_or_raises(case):
    widths, fault, which, seed = case
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, d in enumerate(widths, start=1):
            for split, n in (("tr", 20), ("te", 6)):
                x = rng.uniform(size=(n, d))
                if i == which + 1 and split == "te" and fault in ("nan", "inf"):
                    x[1, 0] = np.nan if fault == "nan" else -np.inf
                if i == which + 1 and split == "tr" and fault == "rows":
                    x = x[:-1]
                np.savetxt(root / f"{i}_{split}.csv", x, delimiter=",")
        np.savetxt(root / "labels_tr.csv", np.arange(20) % 2)
        np.savetxt(root / "labels_te.csv", np.arange(6) % 2)
        if fault == "gap" and which + 1 < len(widths):
            (root / f"{which + 1}_tr.csv").unlink()
        mods = [which + 1, which + 1] if fault == "repeat" else None
        try:
            tr, va, te = mogonet_loaders(root, modalities=mods, batch_size=64)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            assert str(exc)
            event(f"refused: {fault}")
            return
        event(f"served: {fault}")
        # loaded: nothing was wrong, and no modality went missing
        assert fault == "none" or (fault == "gap" and which + 1 == len(widths))
        batch = next(iter(te))
        assert [t.shape[1] for t in batch[:-1]] == widths
        assert all(bool(torch.isfinite(t.float()).all()) for t in batch)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_batch_of_one_and_zero_are_served(name):
    """The edge batch sizes the property test draws, checked once by hand."""
    fusion = BUILDERS[name]([3, 2])
    for b in (0, 1):
        out = fusion([torch.randn(b, 3), torch.randn(b, 2)])
        assert out.shape == (b, fusion.out_dim)


@st.composite
def affect_files(draw):
    n = draw(st.integers(0, 5))
    t = draw(st.integers(1, 4))
    fault = draw(st.sampled_from(["none", "nan", "inf", "missing_key", "rows", "flat", "label_nan"]))
    proto = draw(st.sampled_from([2, 4, 5]))
    return n, t, fault, proto, draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(affect_files())
def test_affect_pickles_load_finite_or_raise(case):
    import pickle

    from multizoo_ext.datasets.affect import get_dataloader as affect_loaders

    n, t, fault, proto, seed = case
    rng = np.random.default_rng(seed)

    def split():
        d = {k: rng.normal(size=(n, t, w)) for k, w in (("vision", 2), ("audio", 3), ("text", 2))}
        d["labels"] = rng.uniform(-3, 3, size=(n, 1, 1))
        return d

    data = {s: split() for s in ("train", "valid", "test")}
    if n and fault in ("nan", "inf"):
        data["valid"]["audio"][0, 0, 0] = np.nan if fault == "nan" else -np.inf  # zeroed, as MultiBench does
    elif fault == "missing_key":
        del data["test"]["text"]
    elif fault == "rows" and n:
        data["train"]["vision"] = data["train"]["vision"][:-1]
    elif fault == "flat":
        data["train"]["audio"] = data["train"]["audio"][:, 0]
    elif fault == "label_nan" and n:
        data["train"]["labels"][0] = np.nan
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "affect.pkl"
        path.write_bytes(pickle.dumps(data, protocol=proto))
        try:
            loaders = affect_loaders(path, max_seq_len=3, batch_size=8)
        except (ValueError, TypeError) as exc:  # DataKeyError is a ValueError
            assert str(exc)
            event(f"refused: {fault}")
            return
    event(f"served: {fault}")
    assert n > 0 and fault in ("none", "nan", "inf")
    for loader in loaders:
        for batch in loader:
            assert [tuple(x.shape[1:]) for x in batch[:3]] == [(3, 2), (3, 3), (3, 2)]
            assert all(bool(torch.isfinite(x).all()) for x in batch)
