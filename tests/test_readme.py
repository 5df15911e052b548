"""The README and the docs as a new user reads them: every import they show works exactly as
written, and every Python block of the README outside the MultiBench section (which
tests/multibench/test_mb_readme.py runs inside a MultiBench checkout) runs as written."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MULTIBENCH_SECTION = "## Use inside a MultiBench checkout"


def _imports(text: str):
    """``from multizoo_ext... import ...`` statements in code blocks and in inline code."""
    found = []
    for m in re.finditer(r"`(from multizoo_ext[\w.]* import [^`]+)`", text):  # inline, may wrap lines
        found.append(" ".join(m.group(1).split()))
    for m in re.finditer(r"(?m)^[ \t]*(from multizoo_ext[\w.]* import (?:\([^)]*\)|[^\n#]+))", text):
        found.append(" ".join(m.group(1).split()))
    return sorted(set(s.rstrip(" ,") for s in found))


def _python_blocks(text: str):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_import_the_docs_show_works(doc):
    statements = _imports(doc.read_text())
    for stmt in statements:
        exec(stmt, {})  # noqa: S102  (our own docs)


def test_the_readme_names_the_public_api():
    statements = _imports((ROOT / "README.md").read_text())
    joined = " ".join(statements)
    for name in ("ReFNet", "DEQFusion", "refnet_objective", "deq_objective", "MultiSimilarityLoss",
                 "RefinerLoss", "refiner_only_objective"):
        assert name in joined


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    start = text.index(MULTIBENCH_SECTION)
    end = text.index("\n## ", start + 1)
    outside = text[:start] + text[end:]
    blocks = _python_blocks(outside)
    assert blocks, "the README shows no Python outside the MultiBench section"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102
