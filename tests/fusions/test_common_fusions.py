"""Baseline fusions against hand computations, plus a walk over the whole fusion registry."""
import pytest
import torch

from multizoo_ext.fusions.common_fusions import Concat, LowRankTensorFusion, TensorFusion
from multizoo_ext.fusions.transformer import TransformerFusion
from multizoo_ext.registry import create_fusion, list_fusions


def _inputs(dims, b=4, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, requires_grad=requires_grad) for d in dims]


@pytest.mark.parametrize("name", list_fusions())
@pytest.mark.parametrize("dims", [[5, 7], [5, 7, 3]])
def test_every_registered_fusion(name, dims):
    """Shape, finiteness, a gradient on every parameter and on every input."""
    torch.manual_seed(0)
    fusion = create_fusion(name, input_dims=dims)
    xs = _inputs(dims, requires_grad=True)
    out = fusion(xs)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (4, fusion.out_dim)
    assert torch.isfinite(out).all()
    loss = out.pow(2).mean()
    # ReFNet's refiners only reach the loss through their reconstructions
    loss = loss + sum(r.pow(2).mean() for r in getattr(fusion, "last_reconstructions", None) or [])
    loss.backward()
    for n, p in fusion.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no gradient on {n}"
    for i, x in enumerate(xs):
        assert x.grad is not None and x.grad.abs().sum() > 0, f"{name}: modality {i} does not reach the output"


@pytest.mark.parametrize("name", list_fusions())
def test_every_registered_fusion_rejects_wrong_modality_count(name):
    fusion = create_fusion(name, input_dims=[5, 7])
    with pytest.raises(ValueError, match="modalit"):
        fusion(_inputs([5, 7, 3]))


def test_concat_values_and_multibench_no_arg_form():
    xs = _inputs([2, 3])
    torch.testing.assert_close(Concat()(xs), torch.cat(xs, 1))
    img = torch.randn(4, 2, 3)
    assert Concat()([img, xs[0]]).shape == (4, 8)  # flattens like MultiBench


def test_tensor_fusion_is_outer_product_with_ones():
    a, b, c = _inputs([2, 3, 2])
    out = TensorFusion([2, 3, 2])([a, b, c])
    one = torch.ones(4, 1)
    ref = torch.einsum("bi,bj,bk->bijk", torch.cat([a, one], 1), torch.cat([b, one], 1), torch.cat([c, one], 1))
    torch.testing.assert_close(out, ref.reshape(4, -1))
    assert out.shape[1] == 3 * 4 * 3


def test_lowrank_matches_loop_and_registers_factors():
    torch.manual_seed(0)
    f = LowRankTensorFusion([3, 4], 5, 2)
    a, b = _inputs([3, 4])
    one = torch.ones(4, 1)
    ref = torch.zeros(4, 5)
    for r in range(2):
        term = (torch.cat([a, one], 1) @ f.factors[0][r]) * (torch.cat([b, one], 1) @ f.factors[1][r])
        ref += f.fusion_weights[0, r] * term
    torch.testing.assert_close(f([a, b]), ref + f.fusion_bias)
    names = dict(f.named_parameters())
    assert "factors.0" in names and "factors.1" in names  # registered, so .to() and state_dict see them
    assert set(f.state_dict()) == {"factors.0", "factors.1", "fusion_weights", "fusion_bias"}


def test_width_mismatch_message():
    with pytest.raises(ValueError, match=r"built for modality widths \[3, 4\] but got widths \[3, 5\]"):
        LowRankTensorFusion([3, 4], 5, 2)(_inputs([3, 5]))
    with pytest.raises(ValueError, match="share the batch dimension"):
        Concat([3, 4])([torch.randn(2, 3), torch.randn(3, 4)])
    with pytest.raises(TypeError, match="expects a list of tensors"):
        Concat()(torch.randn(2, 3))


def test_transformer_is_permutation_sensitive_per_modality_and_validates():
    torch.manual_seed(0)
    f = TransformerFusion([4, 4], d_model=16, nhead=2).eval()
    a, b = _inputs([4, 4])
    assert not torch.allclose(f([a, b]), f([b, a]))  # modality embeddings tell the tokens apart
    with pytest.raises(ValueError, match="divisible by nhead"):
        TransformerFusion([4, 4], d_model=10, nhead=4)


def test_fusions_follow_input_dtype_float64():
    for name in list_fusions():
        fusion = create_fusion(name, input_dims=[3, 4]).double()
        out = fusion([x.double() for x in _inputs([3, 4])])
        out = out[0] if isinstance(out, tuple) else out
        assert out.dtype == torch.float64, name
