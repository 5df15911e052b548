"""Baseline fusions against hand computations, plus a walk over the whole fusion registry."""
import pytest
import torch

from multizoo_ext.fusions.common_fusions import Concat, LowRankTensorFusion, TensorFusion
from multizoo_ext.fusions.refnet import ReFNet
from multizoo_ext.fusions.transformer import TransformerFusion
from multizoo_ext.registry import create_fusion, list_fusions
from multizoo_ext.validation import check_input_dims


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


# ----------------------------------------------------------------------------- input checks
PARAMETRISED = {
    "LowRankTensorFusion": lambda: LowRankTensorFusion([3, 4], 5, 2),
    "TransformerFusion": lambda: TransformerFusion([3, 4], d_model=8, nhead=2),
    "ReFNet": lambda: ReFNet(Concat([3, 4]), [3, 4]),
}


@pytest.mark.parametrize("name", sorted(PARAMETRISED))
@pytest.mark.parametrize("dtype, fix", [(torch.float64, r"fusion\.double\(\)"),
                                        (torch.bfloat16, r"fusion\.to\(torch\.bfloat16\)"),
                                        (torch.int64, r"cast the inputs to torch\.float32")])
def test_wrong_dtype_gets_a_clear_error_naming_the_fix(name, dtype, fix):
    fusion = PARAMETRISED[name]()
    xs = [x.to(dtype) for x in _inputs([3, 4])]
    with pytest.raises(TypeError, match=rf"{name}: expected float32 inputs like the fusion's parameters, "
                                        rf"got {str(dtype)[6:]}, {str(dtype)[6:]}; .*{fix}"):
        fusion(xs)
    if dtype.is_floating_point:  # and the fix works
        out = fusion.to(dtype)(xs)
        assert out.dtype == dtype and out.shape == (4, fusion.out_dim)


def test_autocast_inputs_are_accepted():
    fusion = LowRankTensorFusion([3, 4], 5, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fusion([x.bfloat16() for x in _inputs([3, 4])])
    assert out.shape == (4, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_fusions())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_registered_fusion_refuses_non_finite_inputs(name, bad):
    fusion = create_fusion(name, input_dims=[3, 4])
    xs = _inputs([3, 4])
    xs[1][2, 0] = bad
    with pytest.raises(ValueError, match=r"modality \[1\] contain NaN/Inf"):
        fusion(xs)


def test_inputs_without_a_feature_dimension():
    with pytest.raises(ValueError, match=r"Concat: modality 0 must be \(B, \.\.\.\) with a feature dimension, "
                                         r"got shape \(4,\)"):
        Concat()([torch.randn(4), torch.randn(4, 2)])
    with pytest.raises(ValueError, match=r"LowRankTensorFusion: modality 1 must be \(B, d\), got shape \(4, 2, 2\)"):
        LowRankTensorFusion([3, 4], 5, 2, flatten=False)([torch.randn(4, 3), torch.randn(4, 2, 2)])


@pytest.mark.parametrize("dims, err, match", [
    ([5], ValueError, r"input_dims must give at least 2 widths \(one per modality\), got \[5\]"),
    ([], ValueError, r"input_dims must be non-empty positive widths, got \[\]"),
    ([5, 0], ValueError, r"input_dims must be non-empty positive widths, got \[5, 0\]"),
    ([5, 2.5], TypeError, r"input_dims must be a sequence of positive ints, got \[5, 2\.5\]"),
    ([5, True], TypeError, r"input_dims must be a sequence of positive ints"),
    ("57", TypeError, r"input_dims must be a sequence of positive ints, got '57'"),
    (None, TypeError, r"input_dims must be a sequence of positive ints, got None"),
])
@pytest.mark.parametrize("cls", [LowRankTensorFusion, TransformerFusion, Concat, TensorFusion])
def test_one_width_validator_for_every_fusion(cls, dims, err, match):
    if dims is None and cls in (Concat, TensorFusion):
        assert cls(None).input_dims is None  # MultiBench's no-argument form
        return
    with pytest.raises(err, match=rf"{cls.__name__}: {match}"):
        cls(dims)
    assert check_input_dims([5.0, 7], "X") == [5, 7]


def test_finite_inputs_whose_sum_overflows_are_accepted():
    """The NaN/Inf probe is a sum; a sum that overflows on finite values must not be refused."""
    xs = [torch.full((4, 3), 3e38), torch.full((4, 4), -3e38)]
    assert torch.equal(Concat([3, 4])(xs), torch.cat(xs, 1))
    xs[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"modality \[1\] contain NaN/Inf"):
        Concat([3, 4])(xs)
    half = [torch.full((2, 3), 6e4, dtype=torch.float16), torch.full((2, 4), 6e4, dtype=torch.float16)]
    assert Concat()(half).dtype == torch.float16


def test_tensor_fusion_refuses_a_product_wider_than_max_out_dim():
    assert TensorFusion([32] * 4).out_dim == 33 ** 4                 # 1,185,921 <= 2**24: accepted
    with pytest.raises(ValueError, match=r"prod\(d_i \+ 1\) = 1,291,467,969 .* max_out_dim = 16,777,216"):
        TensorFusion([32] * 6)                                       # 33**6: refused before the head exists
    assert TensorFusion([2, 3], max_out_dim=12).out_dim == 12         # the limit itself is accepted
    with pytest.raises(ValueError, match="exceeds max_out_dim = 11"):
        TensorFusion([2, 3], max_out_dim=11)
