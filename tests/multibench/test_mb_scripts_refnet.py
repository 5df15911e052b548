"""MultiBench's own example scripts with their fusion swapped for ReFNet (see ``mb_scripts.py``
for the edits, the tiny data and how the changed lines are counted)."""
from __future__ import annotations

import pytest

# lines added or rewritten per stage; "method" is what a MultiBench user changes
EXPECTED = {
    "mmimdb_simple_late_fusion.py": {"method": 4, "torch": 1, "data": 1, "speed": 1, "cpu": 3},
    "mmimdb_low_rank_tensor.py": {"method": 4, "torch": 1, "data": 1, "speed": 1, "cpu": 3},
    "avmnist_simple_late_fusion.py": {"method": 5, "torch": 1, "data": 2, "speed": 1, "cpu": 4},
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_multibench_script_with_refnet(multibench, mb_scripts, tmp_path, script):
    mb_scripts.run_and_check(multibench, script, "refnet", tmp_path, EXPECTED[script])
