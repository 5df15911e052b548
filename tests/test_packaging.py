"""The MultiZoo folders import as multizoo_ext subpackages, even beside MultiBench's own."""
import subprocess
import sys
import textwrap
from pathlib import Path

import multizoo_ext

REPO = Path(__file__).resolve().parents[1]


def test_subpackages_win_over_foreign_top_level_folders(tmp_path):
    for name in ("fusions", "datasets", "unimodals", "objectives", "training_structures"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('this is the foreign package')\n")
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        import multizoo_ext.fusions, multizoo_ext.datasets, multizoo_ext.unimodals
        import multizoo_ext.objectives, multizoo_ext.training_structures
        from multizoo_ext.fusions.common_fusions import Concat
        print(multizoo_ext.fusions.__name__, Concat.__module__)
    """) % str(tmp_path)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["multizoo_ext.fusions", "multizoo_ext.fusions.common_fusions"]


def test_version():
    assert multizoo_ext.__version__.count(".") == 2
