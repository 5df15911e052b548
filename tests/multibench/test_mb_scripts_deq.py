"""MultiBench's own example scripts with their fusion swapped for DEQ fusion (see ``mb_scripts.py``
for the edits, the tiny data, how the changed lines are counted and the expected counts)."""
from __future__ import annotations

import pytest

SCRIPTS = ("avmnist_simple_late_fusion.py", "mmimdb_low_rank_tensor.py", "mmimdb_simple_late_fusion.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_multibench_script_with_deq(multibench, mb_scripts, tmp_path, script):
    mb_scripts.run_and_check(multibench, script, "deq", tmp_path)
