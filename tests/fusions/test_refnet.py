"""ReFNet wrapper: output identity, registered refiners, targets, detach, raw-input variant, errors."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from multizoo_ext import create_fusion, list_fusions
from multizoo_ext.fusions.common_fusions import Concat
from multizoo_ext.fusions.refnet import ReFNet, Refiner, find_refnet

DIMS = [5, 7, 3]
INNER = [n for n in ("concat", "tensor", "lowrank", "transformer", "deq") if n in list_fusions()]


def _inputs(dims=DIMS, batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=g) for d in dims]


class _TupleFusion(nn.Module):
    """Returns (fused, extra) like some MultiBench fusions."""

    out_dim = 4

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(sum(DIMS), 4)

    def forward(self, xs):
        fused = self.lin(torch.cat(xs, 1))
        return fused, {"norm": fused.norm()}


class _DetachingFusion(nn.Module):
    """Concat that lets no gradient through to its inputs."""

    def __init__(self, dims):
        super().__init__()
        self.out_dim = sum(dims)

    def forward(self, xs):
        return torch.cat([x.detach() for x in xs], 1)


@pytest.mark.parametrize("inner", INNER)
def test_output_equals_inner_fusion_exactly(inner):
    torch.manual_seed(0)
    fusion = create_fusion(inner, input_dims=DIMS)
    refnet = ReFNet(fusion, DIMS).eval()
    xs = _inputs()
    with torch.no_grad():
        expected = fusion(xs)
        got = refnet(xs)
    assert torch.equal(got, expected)
    assert refnet.out_dim == fusion.out_dim == got.shape[1]
    assert refnet.fusion is fusion
    assert [tuple(r.shape) for r in refnet.last_reconstructions] == [(6, d) for d in DIMS]
    assert all(torch.equal(t, x) for t, x in zip(refnet.last_targets, xs))
    assert refnet.last_fused is got


@pytest.mark.parametrize("inner", INNER)
def test_registry_builder_wraps_any_registered_fusion(inner):
    for dims in ([5, 7], [5, 7, 3]):
        refnet = create_fusion("refnet", input_dims=dims, inner=inner)
        assert isinstance(refnet, ReFNet) and refnet.modality_dims == dims
        fused = refnet(_inputs(dims))
        assert fused.shape == (6, refnet.out_dim)
        assert [r.shape[1] for r in refnet.last_reconstructions] == dims


def test_builder_default_inner_is_concat_and_passes_inner_kwargs():
    refnet = create_fusion("refnet", input_dims=[5, 7])
    assert isinstance(refnet.fusion, Concat) and refnet.out_dim == 12
    low = create_fusion("refnet", input_dims=[5, 7], inner="lowrank", inner_kwargs={"output_dim": 16, "rank": 2},
                        hidden_dim=8, detach_targets=True)
    assert low.out_dim == 16 and low.hidden_dim == 8 and low.detach_targets
    assert low.refiners[0][0].in_features == 16 and low.refiners[0][0].out_features == 8
    raw = create_fusion("refnet", input_dims=[5, 7], target="input", raw_input_dims=[20, 30])
    assert raw.input_dims == [20, 30] and [r.out_dim for r in raw.refiners] == [20, 30]
    with pytest.raises(ValueError, match="unknown fusion 'nope'"):
        create_fusion("refnet", input_dims=[5, 7], inner="nope")


def test_refiner_architecture_and_hidden_default():
    refnet = ReFNet(Concat(DIMS), DIMS)
    assert refnet.hidden_dim == refnet.fused_dim == 15
    r = refnet.refiners[1]
    assert isinstance(r, Refiner)
    assert [type(m) for m in r] == [nn.Linear, nn.ReLU, nn.LayerNorm, nn.Dropout, nn.Linear]
    assert r[0].in_features == 15 and r[0].out_features == 15 and r[4].out_features == 7
    assert r[3].p == pytest.approx(0.1)


def test_refiners_are_registered_and_survive_state_dict_round_trip():
    torch.manual_seed(0)
    refnet = ReFNet(create_fusion("lowrank", input_dims=DIMS), DIMS)
    param_ids = {id(p) for p in refnet.parameters()}
    refiner_params = list(refnet.refiners.parameters())
    assert refiner_params and all(id(p) in param_ids for p in refiner_params)
    state = refnet.state_dict()
    assert "refiners.0.0.weight" in state and "refiners.2.4.bias" in state and "fusion.fusion_bias" in state

    torch.manual_seed(1)
    other = ReFNet(create_fusion("lowrank", input_dims=DIMS), DIMS)
    fused = torch.randn(3, refnet.fused_dim)
    assert not torch.allclose(other.eval().refine(fused)[0], refnet.eval().refine(fused)[0])
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    for a, b in zip(other.refine(fused), refnet.refine(fused)):
        assert torch.equal(a, b)


def test_refiners_get_gradients_from_reconstruction_loss():
    refnet = ReFNet(Concat(DIMS), DIMS)
    refnet(_inputs())
    loss = sum(nn.functional.mse_loss(r, t) for r, t in zip(refnet.last_reconstructions, refnet.last_targets))
    loss.backward()
    for name, p in refnet.refiners.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _encoder_grad(detach: bool, fusion_cls=None, by_hand: bool = False):
    """Gradient of the first encoder's weight under the refiner MSE loss alone (eval mode)."""
    torch.manual_seed(0)
    encoders = nn.ModuleList(nn.Linear(4, d) for d in DIMS)
    fusion = fusion_cls(DIMS) if fusion_cls else Concat(DIMS)
    refnet = ReFNet(fusion, DIMS, detach_targets=detach).eval()
    reps = [enc(x) for enc, x in zip(encoders, _inputs([4, 4, 4]))]
    refnet(reps)
    targets = [e.detach() for e in reps] if by_hand else refnet.last_targets
    loss = sum(nn.functional.mse_loss(r, t) for r, t in zip(refnet.last_reconstructions, targets))
    loss.backward()
    return encoders[0].weight.grad, refnet


def test_detach_targets_stops_gradient_through_targets():
    # A fusion that passes no gradient: the only path to the encoders is the target.
    g_keep, _ = _encoder_grad(False, _DetachingFusion)
    g_det, refnet = _encoder_grad(True, _DetachingFusion)
    assert g_keep is not None and g_keep.abs().sum() > 0
    assert g_det is None or torch.count_nonzero(g_det) == 0
    assert all(not t.requires_grad for t in refnet.last_targets)


def test_detach_targets_keeps_gradient_through_fused_path():
    g_det, _ = _encoder_grad(True)
    g_hand, _ = _encoder_grad(False, by_hand=True)  # same loss with targets detached by hand
    g_keep, _ = _encoder_grad(False)
    assert g_det.abs().sum() > 0
    assert torch.allclose(g_det, g_hand)
    assert not torch.allclose(g_det, g_keep)


def test_tuple_returning_fusion_keeps_tuple_and_returns_element_zero():
    fusion = _TupleFusion()
    refnet = ReFNet(fusion, DIMS)
    xs = _inputs()
    fused = refnet(xs)
    assert isinstance(fused, torch.Tensor) and fused.shape == (6, 4)
    assert isinstance(refnet.last_fusion_output, tuple) and refnet.last_fusion_output[0] is fused
    assert torch.equal(fused, fusion(xs)[0])


def test_target_input_variant():
    raw_dims = [16, 9, 3]
    refnet = ReFNet(Concat(DIMS), DIMS, target="input", input_dims=raw_dims)
    assert [r.out_dim for r in refnet.refiners] == raw_dims
    fused = refnet(_inputs())
    assert refnet.last_targets is None
    assert [tuple(r.shape) for r in refnet.last_reconstructions] == [(6, d) for d in raw_dims]
    raw = [torch.randint(0, 255, (6, 1, 4, 4), dtype=torch.uint8), torch.randn(6, 3, 3, dtype=torch.float64),
           torch.randn(6, 3)]
    targets = refnet.reconstruction_targets(raw)
    assert [tuple(t.shape) for t in targets] == [(6, d) for d in raw_dims]
    assert all(t.dtype == fused.dtype and t.device == fused.device and not t.requires_grad for t in targets)
    assert torch.equal(targets[0], raw[0].flatten(1).float())
    with pytest.raises(ValueError, match=r"built for modality widths \[16, 9, 3\] but got widths \[16, 9, 4\]"):
        refnet.reconstruction_targets(raw[:2] + [torch.randn(6, 4)])
    with pytest.raises(ValueError, match="needs the raw batch inputs"):
        refnet.reconstruction_targets(None)
    with pytest.raises(ValueError, match="target='input' needs input_dims"):
        ReFNet(Concat(DIMS), DIMS, target="input")
    with pytest.raises(ValueError, match="input_dims has 2 widths but modality_dims has 3"):
        ReFNet(Concat(DIMS), DIMS, target="input", input_dims=[4, 4])


def test_errors_for_bad_modalities_and_arguments():
    refnet = ReFNet(Concat(DIMS), DIMS)
    with pytest.raises(ValueError, match="ReFNet was built for 3 modalities but got 2"):
        refnet(_inputs([5, 7]))
    with pytest.raises(ValueError, match=r"ReFNet was built for modality widths \[5, 7, 3\] but got widths \[5, 7, 4\]"):
        refnet(_inputs([5, 7, 4]))
    with pytest.raises(TypeError, match="expects a list of tensors"):
        refnet(torch.randn(6, 15))
    with pytest.raises(ValueError, match="has no out_dim; pass fused_dim"):
        ReFNet(Concat(), DIMS)
    with pytest.raises(ValueError, match=r"fused output \(B, 10\) but Concat returned \(6, 15\)"):
        ReFNet(Concat(), DIMS, fused_dim=10)(_inputs())
    with pytest.raises(ValueError, match="target must be one of"):
        ReFNet(Concat(DIMS), DIMS, target="raw")
    with pytest.raises(ValueError, match="modality_dims must be non-empty positive widths"):
        ReFNet(Concat(DIMS), [5, 0, 3])
    with pytest.raises(TypeError, match="wraps a fusion nn.Module"):
        ReFNet(lambda xs: xs, DIMS, fused_dim=3)
    with pytest.raises(ValueError, match=r"refine expects a fused tensor \(B, 15\), got \(2, 3\)"):
        refnet.refine(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="call forward before the objective"):
        refnet.reconstruction_targets()
    # Concat() without widths works once fused_dim is given.
    assert ReFNet(Concat(), DIMS, fused_dim=15)(_inputs()).shape == (6, 15)


def test_pickle_and_deepcopy_drop_the_last_batch():
    refnet = ReFNet(Concat(DIMS), DIMS)
    xs = [x.requires_grad_() for x in _inputs()]
    refnet(xs)
    clone = copy.deepcopy(refnet)
    assert clone.last_fused is None and clone.last_reconstructions is None and clone.last_targets is None
    assert refnet.last_fused is not None  # the original keeps its cache
    restored = pickle.loads(pickle.dumps(refnet))
    assert restored.last_targets is None
    for a, b in zip(restored.state_dict().values(), refnet.state_dict().values()):
        assert torch.equal(a, b)


def test_find_refnet_in_nested_modules():
    refnet = ReFNet(Concat(DIMS), DIMS)

    class MMDLLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.fuse = refnet
            self.head = nn.Linear(15, 2)

    assert find_refnet(MMDLLike()) is refnet
    assert find_refnet(nn.Sequential(nn.Linear(2, 2), nn.ModuleList([refnet]))) is refnet
    assert find_refnet(refnet) is refnet
    assert find_refnet(nn.Linear(2, 2)) is None and find_refnet(None) is None


def test_modality_dropout_masks_one_modality_per_hit_sample_in_training_only():
    """Cross-modal pre-training: a hit sample has one modality zeroed in what the inner fusion
    sees, never two; the targets stay unmasked; nothing is masked in eval mode."""
    import pytest
    import torch
    from torch import nn

    from multizoo_ext.fusions import ReFNet

    class Seen(nn.Module):
        out_dim = 8

        def forward(self, xs):
            self.seen = [x.clone() for x in xs]
            return torch.cat(xs, 1)

    torch.manual_seed(0)
    inner = Seen()
    refnet = ReFNet(inner, [4, 4], modality_dropout=0.9)
    xs = [torch.ones(400, 4), torch.ones(400, 4)]
    refnet(xs)
    zeroed = torch.stack([(s == 0).all(1) for s in inner.seen], 1)  # (B, 2)
    assert not (zeroed[:, 0] & zeroed[:, 1]).any()
    assert 0.8 < zeroed.any(1).float().mean() < 1.0 and zeroed[:, 0].any() and zeroed[:, 1].any()
    assert all(torch.equal(t, x) for t, x in zip(refnet.last_targets, xs))
    refnet.eval()
    refnet(xs)
    assert all(torch.equal(s, x) for s, x in zip(inner.seen, xs))
    with pytest.raises(ValueError, match="modality_dropout must be in"):
        ReFNet(Seen(), [4, 4], modality_dropout=1.0)
