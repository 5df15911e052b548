"""The README's "Use inside a MultiBench checkout" section: its Python blocks run as written,
one after the other in one MultiBench process, on tiny MM-IMDB-shaped loaders that the test
defines as ``traindata``, ``validdata``, ``testdata``."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Use inside a MultiBench checkout"

_LOADERS = '''
import torch
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)
_g = torch.Generator().manual_seed(0)
_n = 96
_genres = (torch.rand(_n, 23, generator=_g) < 0.15).float()
_text = torch.randn(_n, 300, generator=_g)
_image = torch.randn(_n, 4096, generator=_g)
_text[:, :23] += 2 * _genres
_image[:, :23] += 2 * _genres

def _loader(a, b, shuffle=False):
    return DataLoader(TensorDataset(_text[a:b], _image[a:b], _genres[a:b]), batch_size=16, shuffle=shuffle,
                      generator=_g if shuffle else None)

traindata, validdata, testdata = _loader(0, 64, True), _loader(64, 80), _loader(80, 96)
'''

_PROBE = '''
import json
model.eval(); fresh.eval()
_x = [_text[80:], _image[80:]]
with torch.no_grad():
    _diff = float((model(_x) - fresh(_x)).abs().max())
print("RESULT " + json.dumps({"max_abs_diff": _diff, "config": config,
                              "keys": sorted(state) == sorted(fresh.state_dict()),
                              "best_model": type(result.model).__name__}))
'''


def section_text() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end >= 0 else len(text)]


def python_blocks(text: str):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_multibench_blocks_run_as_written(multibench, tmp_path):
    blocks = python_blocks(section_text())
    assert len(blocks) == 4, "ReFNet, DEQ fusion, checkpoints, our own loop"
    code = _LOADERS + "\n".join(blocks) + _PROBE
    proc = multibench.run_code(code, tmp_path, timeout=300)
    r = multibench.result(proc)
    assert r["max_abs_diff"] < 1e-5 and r["keys"] and r["config"] == {"fusion": "deq", "width": 64}
    assert r["best_model"] == "MMDL"
    # MultiBench's train() ran three times (ReFNet, DEQ) and its test() once: f1 lines printed
    assert sum(ln.strip().startswith("f1_micro: ") for ln in proc.stdout.splitlines()) >= 1
    for name in ("refnet.pt", "deq.pt", "deq_weights.pt", "deq_weights.json", "best.pt"):
        assert (tmp_path / name).is_file(), name


def test_readme_multibench_section_names_what_the_tests_check(mb_scripts):
    text = section_text()
    for package in ("memory_profiler", "matplotlib", "scikit-learn", "tqdm"):   # MultiBench's train() imports
        assert package in text
    assert "objective_args_dict={}" in text and "trust_checkpoint = True" in text
    assert "http" not in text
    # the line counts in the README table are the ones the script tests assert
    table = {name: [int(v) for v in row.split(" | ")]
             for name, row in re.findall(r"\| `(\w+\.py)` \| (\d+ \| \d+ \| \d+ \| \d+) \|", text)}
    counts = mb_scripts.EXPECTED
    assert table == {name: [counts["refnet"][name]["method"], counts["deq"][name]["method"],
                            counts["refnet"][name]["torch"], counts["refnet"][name]["cpu"]]
                     for name in counts["refnet"]}, table
