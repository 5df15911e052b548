import pytest
import torch

from multizoo_ext.unimodals.common_models import GRU, LSTM, MLP, Identity, LeNet, MaxOut_MLP


def _grads_everywhere(module, out):
    out.float().pow(2).mean().backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reached {missing}"


def test_mlp_matches_hand_computation_and_multibench_signature():
    m = MLP(3, 5, 2)  # MultiBench's positional order: indim, hiddim, outdim
    x = torch.randn(4, 3)
    expected = torch.relu(x @ m.fc.weight.T + m.fc.bias) @ m.fc2.weight.T + m.fc2.bias
    torch.testing.assert_close(m(x), expected)
    assert m.out_dim == 2
    _grads_everywhere(m, m(x))


def test_mlp_dropout_returns_output_not_hidden():
    m = MLP(3, 7, 2, dropout=True, dropoutp=0.5).train()
    assert m(torch.randn(6, 3)).shape == (6, 2)  # MultiBench's returns the (6, 7) hidden layer here


def test_maxout_mlp_shapes_and_grads():
    m = MaxOut_MLP(10, first_hidden=16, number_input_feats=30)
    out = m(torch.randn(8, 30))
    assert out.shape == (8, 10) and m.out_dim == 10
    _grads_everywhere(m, out)
    assert MaxOut_MLP(10, 16, 30, linear_layer=False).out_dim == 16


@pytest.mark.parametrize("cls", [GRU, LSTM])
def test_sequence_encoders_pooling(cls):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5)
    seq = cls(5, 8)
    assert seq(x).shape == (3, 7, 8)
    last = cls(5, 8, last_only=True)
    last.load_state_dict(seq.state_dict())
    torch.testing.assert_close(last(x), seq(x)[:, -1])  # last hidden = last output for 1 layer
    mean = cls(5, 8, pooling="mean")
    mean.load_state_dict(seq.state_dict())
    torch.testing.assert_close(mean(x), seq(x).mean(1))
    _grads_everywhere(mean, mean(x))


def test_gru_padding_uses_last_valid_step():
    torch.manual_seed(0)
    enc = GRU(4, 6, has_padding=True)
    x = torch.randn(2, 5, 4)
    out = enc([x, torch.tensor([5, 2])])
    ref = GRU(4, 6, last_only=True)
    ref.load_state_dict(enc.state_dict())
    torch.testing.assert_close(out[1], ref(x[1:2, :2])[0])
    torch.testing.assert_close(out[0], ref(x[0:1])[0])


def test_bad_pooling_message():
    with pytest.raises(ValueError, match="pooling must be None, 'last' or 'mean'"):
        GRU(3, 4, pooling="max")


def test_lenet_avmnist_shape_and_batch_of_one():
    m = LeNet(1, 6, 3)
    assert m(torch.randn(5, 1, 28, 28)).shape == (5, 48) and m.out_dim == 48
    m.eval()
    assert m(torch.randn(1, 1, 28, 28)).shape == (1, 48)  # MultiBench's squeeze() drops the batch dim
    with pytest.raises(ValueError, match=r"LeNet expects images \(B, C, H, W\)"):
        m(torch.randn(5, 784))
    g = LeNet(1, 4, 1, global_pool=True)
    assert g(torch.randn(2, 1, 20, 20)).shape == (2, 8)


def test_identity():
    x = torch.randn(2, 3)
    assert Identity()(x) is x
