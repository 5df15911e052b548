"""``examples/*_in_multibench.py`` run as documented: from the root of the MultiBench tree, with
MultiBench's own ``MLP``, ``train`` and ``test``."""
from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("example, epochs, min_acc, flags", [("refnet_in_multibench.py", 4, 0.6, []),
                                                             ("deq_in_multibench.py", 4, 0.5, ["--trust-checkpoint"])])
def test_multibench_examples_run(multibench, tmp_path, example, epochs, min_acc, flags):
    """examples/*_in_multibench.py run from the root of an unmodified MultiBench checkout
    (MultiBench's MLP, train and test) and learn the random stand-in task (3 classes), testing
    the model in memory (default) or, with --trust-checkpoint, the best epoch unpickled from
    the file MultiBench's train() wrote."""
    script = EXAMPLES / example
    proc = multibench.run([script, "--epochs", epochs, "--save", tmp_path / "best.pt", *flags], multibench.root,
                          timeout=300)
    accs = multibench.printed(proc.stdout, "acc: ")
    assert len(accs) == 1 and accs[0] >= min_acc, proc.stdout[-2000:]
    assert (tmp_path / "best.pt").is_file()
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("checkpoint ") and ("3 refiners" in last or "converged" in last), last
