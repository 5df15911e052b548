"""The default layer against the published one: initialisation, convergence at
initialisation, and that the zero-initialised weights still learn."""
import pytest
import torch

from multizoo_ext.fusions import DEQFusion
from multizoo_ext.registry import create_fusion


def _inputs(seed, B=64, dims=(32, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g).relu() for d in dims]


def test_default_layer_starts_the_gate_and_the_residual_branches_at_zero():
    torch.manual_seed(0)
    layer = create_fusion("deq", input_dims=[8, 8])
    assert (layer.gate_init, layer.injection, layer.residual_init) == ("zero", "proj", "zero")
    assert (layer.modality_block, layer.fused_update, layer.output) == ("plain", "sigmoid", "state+injection")
    assert not layer.fusion_block["gate"].weight.any() and not layer.fusion_block["gate"].bias.any()
    assert all(not b["lin2"].weight.any() for b in layer.blocks)
    assert all(b["lin1"].weight.any() and b["lin2"].bias.any() for b in layer.blocks)
    paper = create_fusion("deq_paper", input_dims=[8, 8])
    assert (paper.gate_init, paper.injection, paper.residual_init) == ("default", "sum", "default")
    assert (paper.modality_block, paper.fused_update, paper.output) == ("residual", "groupnorm", "state")
    assert paper.fusion_block["gate"].weight.abs().min() > 0
    assert all(b["lin2"].weight.abs().sum() > 0 for b in paper.blocks)
    with pytest.raises(ValueError, match="residual_init must be 'zero' or 'default', got 'ones'"):
        DEQFusion([8, 8], residual_init="ones")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_layer_converges_at_initialisation_where_the_published_one_does_not(seed):
    # measured: default [2.0, 5.3-5.8] mean steps per stage, all converged; published
    # [24-29, 29-34], 50-56 % converged
    stats = {}
    for name in ("deq", "deq_paper"):
        torch.manual_seed(seed)
        layer = create_fusion(name, input_dims=[32, 32, 32]).eval()
        with torch.no_grad():
            _, info = layer(_inputs(seed), return_info=True)
        stats[name] = ([float(s["steps"].float().mean()) for s in info["stages"]],
                       float(info["converged"].float().mean()))
    (modality, fused), conv = stats["deq"]
    assert conv == 1.0 and modality <= 3 and fused <= 8
    (p_modality, p_fused), p_conv = stats["deq_paper"]
    assert p_conv <= 0.8 and p_modality >= 5 * modality and p_fused >= 3 * fused


def test_zero_initialised_weights_learn():
    # step 1: z_f reads the modality states only through the gate, which starts at 0, so only
    # the gate (and the injection) get gradient; step 2: W2 too; step 3: W1 (behind W2)
    torch.manual_seed(0)
    layer = create_fusion("deq", input_dims=[16, 16], jac_reg=False)
    xs = _inputs(0, B=8, dims=(16, 16))
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    grads = []
    for _ in range(3):
        opt.zero_grad()
        # not a plain sum of squares: that is (almost) constant after a GroupNorm
        (layer(xs) * w).sum().backward()
        grads.append({n: p.grad.abs().sum().item() for n, p in layer.named_parameters()})
        opt.step()
    first, second, third = grads
    assert first["fusion_block.gate.weight"] > 0 and first["injection_proj.weight"] > 0
    assert first["blocks.0.lin2.weight"] == 0 and first["blocks.1.lin1.weight"] == 0
    assert all(second[f"blocks.{i}.lin2.weight"] > 0 for i in range(2))
    assert all(third[f"blocks.{i}.{n}.weight"] > 0 for i in range(2) for n in ("lin1", "lin2"))


def test_exact_adjoint_solve_is_the_default_up_to_width_64_and_not_for_the_published_layer():
    from multizoo_ext.fusions.deq.fusion import DEQ_DEFAULTS
    assert DEQ_DEFAULTS.b_direct == "auto" and DEQ_DEFAULTS.b_direct_max_width == 64
    assert DEQFusion([8, 8], width=64).b_direct is True
    assert DEQFusion([8, 8], width=68).b_direct is False
    assert DEQFusion([8, 8], width=32, b_direct=False).b_direct is False
    assert DEQFusion([8, 8], width=128, b_direct=True).b_direct is True
    assert create_fusion("deq_paper", input_dims=[8, 8], width=32).b_direct is False
    with pytest.raises(ValueError, match="b_direct must be True, False or 'auto', got 'yes'"):
        DEQFusion([8, 8], b_direct="yes")
    # the default's backward is the exact one: each stage of the adjoint solve says so
    torch.manual_seed(0)
    layer = DEQFusion([8, 8], width=16)
    layer(_inputs(0, B=4, dims=(8, 8))).sum().backward()
    assert [bool(st.get("direct")) for st in layer.last_info["backward"]["stages"]] == [True, True]
