"""Repository text hygiene: the text is about the software, not about how it was written.

- No tracked text file mentions work periods by the word built in ``_WORK_WORD`` below (the
  word is assembled from two halves so that this file does not match its own pattern).
- No outside links (``http://`` / ``https://``) in the user documentation (``docs/*.md``,
  ``benchmarks/*.md``, ``README.md``, ``CHANGELOG.md``) or in the docstrings of the installed
  code (the folders that ``setup.cfg`` installs as ``multizoo_ext.*``).

Each test lists every offender as ``path:line: text`` so that one run shows all of them.
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]

_WORK_WORD = "ses" + "sion"
WORD_PATTERN = re.compile(r"\b" + _WORK_WORD + r"s?\b", re.IGNORECASE)
LINK_PATTERN = re.compile(r"https?://", re.IGNORECASE)

#: Folders installed as ``multizoo_ext`` and its subpackages (``package_dir`` in setup.cfg).
INSTALLED_FOLDERS = ("multizoo_ext", "datasets", "unimodals", "fusions", "objectives",
                     "training_structures")
#: User documentation checked for outside links: (folder, glob) pairs and single files.
DOC_GLOBS = (("docs", "*.md"), ("benchmarks", "*.md"))
DOC_FILES = ("README.md", "CHANGELOG.md")


def tracked_files() -> List[Path]:
    """Paths (relative to the repository root) of the files git tracks; skips the test when
    the tree is not a git checkout (e.g. an unpacked source distribution)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [Path(p) for p in out.decode("utf-8", "surrogateescape").split("\0") if p]


def read_text(rel: Path) -> str:
    """The file's text, or "" for binary files and files missing from the work tree."""
    path = ROOT / rel
    if ".git" in rel.parts or not path.is_file():
        return ""
    data = path.read_bytes()
    if b"\0" in data:
        return ""
    return data.decode("utf-8", "replace")


def matching_lines(rel: Path, text: str, pattern: re.Pattern, first_line: int = 1) -> Iterator[str]:
    for number, line in enumerate(text.splitlines(), start=first_line):
        if pattern.search(line):
            yield f"{rel.as_posix()}:{number}: {line.strip()[:160]}"


def docstrings(tree: ast.AST) -> Iterator[Tuple[int, str]]:
    """``(first line, text)`` of the module, class and function docstrings of a parsed file."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                yield body[0].lineno, body[0].value.value


def test_patterns_match_what_they_should() -> None:
    assert WORD_PATTERN.search(f"measured in {_WORK_WORD.capitalize()} 7")
    assert WORD_PATTERN.search(f"the {_WORK_WORD}s before")
    assert not WORD_PATTERN.search(f"{_WORK_WORD}al or pos{_WORK_WORD}")
    assert LINK_PATTERN.search("see https://example.org") and LINK_PATTERN.search("HTTP://x")
    assert not LINK_PATTERN.search("docs/RESULTS.md#3-deq-fusion")
    tree = ast.parse('"""mod"""\nclass A:\n    """cls"""\n    def f(self):\n        """fn"""\n')
    assert sorted(text for _, text in docstrings(tree)) == ["cls", "fn", "mod"]


def test_no_work_period_word_in_tracked_text() -> None:
    offenders = [hit for rel in tracked_files() for hit in matching_lines(rel, read_text(rel), WORD_PATTERN)]
    assert not offenders, "tracked files mention work periods:\n" + "\n".join(offenders)


def test_no_outside_links_in_user_docs() -> None:
    tracked = set(tracked_files())
    wanted = {Path(f) for f in DOC_FILES} | {
        rel for folder, glob in DOC_GLOBS for rel in tracked
        if rel.parent == Path(folder) and rel.match(glob)}
    checked = sorted(rel for rel in wanted if rel in tracked)
    assert Path("README.md") in checked
    offenders = [hit for rel in checked for hit in matching_lines(rel, read_text(rel), LINK_PATTERN)]
    assert not offenders, "outside links in the documentation:\n" + "\n".join(offenders)


def test_no_outside_links_in_docstrings_of_installed_code() -> None:
    sources = [rel for rel in tracked_files()
               if rel.suffix == ".py" and rel.parts and rel.parts[0] in INSTALLED_FOLDERS]
    assert sources, "no installed Python sources found"
    offenders: List[str] = []
    for rel in sources:
        text = read_text(rel)
        if not text:
            continue
        for lineno, doc in docstrings(ast.parse(text, filename=str(rel))):
            offenders.extend(matching_lines(rel, doc, LINK_PATTERN, first_line=lineno))
    assert not offenders, "outside links in docstrings:\n" + "\n".join(offenders)


ISSUE_PATTERN = re.compile(r"\bissue[ s]*#?\d+|\bitem \d+\)", re.IGNORECASE)


def test_no_issue_numbers_in_tracked_text() -> None:
    """The repository speaks to users: no references to the tracker's issue numbers."""
    offenders = [hit for rel in tracked_files() if rel != Path(__file__).relative_to(ROOT)
                 for hit in matching_lines(rel, read_text(rel), ISSUE_PATTERN)]
    assert not offenders, "tracked files name issue numbers:\n" + "\n".join(offenders)
