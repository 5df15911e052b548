"""``benchmarks/deq_rosmap_reference.py`` without the authors' checkout (not in this
repository): the errors for a missing checkout or data folder, the same-parameter copy into
``deq_paper`` and the report's mean ± std. Skipped when ``benchmarks/`` is absent."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.skipif(not BENCH.is_dir(), reason="benchmarks/ is not in this checkout")


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("deq_rosmap_reference", BENCH / "deq_rosmap_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_checkout_is_a_clear_usage_error(script, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--reference", str(tmp_path), "--epochs", "1"], prog="deq_rosmap_reference")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "experiments/BRCA lacks solver.py, jacobian.py, mm_model.py" in err and "not a DEQFusion checkout" in err


class _Block(nn.Module):      # the attribute names of the authors' modules, our own code
    def __init__(self, d, names):
        super().__init__()
        for n in names:
            setattr(self, n, nn.Linear(d, d) if n in ("conv1", "conv2", "gate", "fuse") else nn.GroupNorm(4, d))


def test_their_parameters_are_copied_into_deq_paper_with_the_plain_sum(script):
    torch.manual_seed(0)
    d, M = 8, 2
    theirs = nn.Module()
    theirs.func_ = nn.Module()
    theirs.func_.branches = nn.ModuleList([_Block(d, ("conv1", "conv2", "gn1", "gn2", "gn3")) for _ in range(M)]
                                          + [_Block(d, ("gate", "fuse", "gn3"))])
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours = script.ours_from_theirs(theirs, d, M)
    assert ours.injection == "sum" and ours.gate_init == "default"
    assert torch.equal(ours.blocks[1]["lin2"].weight, theirs.func_.branches[1].conv2.weight)
    assert torch.equal(ours.fusion_block["gn"].bias, theirs.func_.branches[M].gn3.bias)
    assert ours.weights.detach().tolist() == [1.0, 1.0] and float(ours.bias.detach()) == 0.0
    theirs.func_.branches[0].extra = nn.Linear(d, d)    # a parameter with no counterpart
    with pytest.raises(ValueError, match="do not correspond"):
        script.ours_from_theirs(theirs, d, M)


def test_report_gives_per_seed_rows_and_mean_and_sample_std(script):
    def res(acc, sec):
        m = {"acc": acc, "f1": acc, "auroc": acc, "wf1": acc, "mf1": acc, "epoch": 50}
        return {"selected": m, "last": m, "sec_per_epoch": sec}
    check = {"map_max_abs_diff": 1e-6, "map_max_abs": 5.0, "logit_max_abs_diff": 2e-6, "prediction_agreement": 1.0,
             "rel_residual_theirs_median": 1e-4, "rel_residual_ours_median": 1e-5}
    result = {"seeds": {"0": {"theirs": res(0.70, 2.0), "deq_paper": res(0.72, 0.5), "same_function": check},
                        "1": {"theirs": res(0.74, 2.0), "deq_paper": res(0.76, 0.5), "same_function": check}}}
    md = script.to_markdown(result)
    assert "| 0 | 0.700 / 0.700 / 0.700 (50) | 0.720 / 0.720 / 0.720 (50) | 0.700 / 0.700 | 0.720 / 0.720 |" in md
    # mean 0.72, sample std of (0.70, 0.74) = 0.0283
    assert "| mean ± std | 0.720 ± 0.028 / 0.720 ± 0.028 / 0.720 ± 0.028 | 0.740 ± 0.028" in md
    assert md.count("0.720 ± 0.028 / 0.720 ± 0.028 |") == 2      # last epoch: acc / AUROC
    assert "| time per epoch vs theirs | 1.000x | 0.250x |" in md
    assert "| 1 | 1.00e-06 (5.00) | 2.00e-06 / 1.000 / 1.0e-04, 1.0e-05 | - |" in md
