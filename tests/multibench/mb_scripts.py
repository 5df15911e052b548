"""Run MultiBench's own example scripts with their fusion swapped for ReFNet or DEQ fusion.

A test reads the script from the MultiBench tree, applies a short list of whole-line edits in
a temporary copy, writes tiny data files in MultiBench's formats and runs the copy in a
subprocess. Nothing of MultiBench is copied into this repository: the scripts are read at
test time.

Edits come in stages, counted separately (lines added or rewritten, from ``difflib``):

- ``method``: what a MultiBench user changes to use this package (imports, the fusion line,
  the objective and ``objective_args_dict={}``, the head width where the DEQ width differs).
- ``torch``: torch >= 2.6 loads with ``weights_only=True`` by default, which refuses the
  whole pickled model MultiBench's ``train()`` saves; the script's own ``torch.load(filename)``
  needs ``weights_only=False`` (the file was written by the same script). Needed with any
  fusion, MultiBench's own included.
- ``data``: MultiBench's loaders cannot read a tiny file: the AV-MNIST loader reshapes to
  exactly 60000 / 10000 rows, the MM-IMDB loader slices fixed index ranges (0-15552-18160-25959),
  imports a ``datasets/imdb/vgg.py`` and gensim that are not in the tree, and rebuilds its
  robustness test sets from raw images with VGG16 and word2vec. The import is swapped for
  :data:`LOADERS` (``tiny_loaders.py``), which reads the same files: for MM-IMDB through
  MultiBench's own ``IMDBDataset`` / ``IMDBDataset_robust`` classes; the data path is changed
  where it is absolute.
- ``speed``: the epoch count (1000 or 30) becomes 2, and ``torch.manual_seed(0)`` follows
  ``import torch`` (MultiBench's scripts do not seed; ``train()`` saves a checkpoint only when
  the validation score beats 0, which an unlucky 2-epoch run on a dozen rows may not).
- ``cpu``: ``.cuda()`` removed (no GPU here; on a GPU machine these stay).
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np

Edit = Tuple[str, str]   # (an exact, whole original line, its replacement: one or more lines)

EPOCHS = 2
STAGES = ("method", "torch", "data", "speed", "cpu")

# --------------------------------------------------------------------------- the scripts and their edits
_IMDB_HARNESS = {
    "torch": [("model = torch.load(filename).cuda()", "model = torch.load(filename, weights_only=False).cuda()")],
    "data": [("from datasets.imdb.get_data import get_dataloader",
              "from tiny_loaders import imdb_dataloader as get_dataloader")],
}
_IMDB_OBJECTIVE_LINE = ("      save=filename, optimtype=torch.optim.AdamW, lr=8e-3, weight_decay=0.01, "
                        "objective=torch.nn.BCEWithLogitsLoss())")
_AVMNIST_HARNESS = {
    "torch": [("model = torch.load('best.pt').cuda()", "model = torch.load('best.pt', weights_only=False).cuda()")],
    "data": [("from datasets.avmnist.get_data import get_dataloader",
              "from tiny_loaders import avmnist_dataloader as get_dataloader"),
             ("    '/home/paul/yiwei/avmnist/_MFAS/avmnist')", "    'avmnist')")],
}


def _imdb_objective(objective: str) -> Edit:
    # refnet_objective's Multi-Similarity term reads the labels by task: multi-hot here
    extra = ', task="multilabel"' if objective == "refnet_objective" else ""
    return (_IMDB_OBJECTIVE_LINE, _IMDB_OBJECTIVE_LINE[:-len("torch.nn.BCEWithLogitsLoss())")]
            + f"{objective}(torch.nn.BCEWithLogitsLoss(){extra}), objective_args_dict={{}})")


def _imports(fusion_import: str, fusion: str, objective: str) -> Edit:
    return (fusion_import, f"{fusion_import}\nfrom multizoo_ext.fusions import {fusion}\n"
                           f"from multizoo_ext.objectives import {objective}")


SCRIPTS: Dict[str, Dict[str, object]] = {
    "mmimdb_simple_late_fusion.py": {
        "dataset": "imdb",
        "harness": _IMDB_HARNESS,
        "refnet": [
            _imports("from fusions.common_fusions import Concat", "ReFNet", "refnet_objective"),
            ("fusion = Concat().cuda()", "fusion = ReFNet(Concat(), [512, 512], fused_dim=1024).cuda()"),
            _imdb_objective("refnet_objective"),
        ],
        "deq": [
            _imports("from fusions.common_fusions import Concat", "DEQFusion", "deq_objective"),
            ("head = Linear(1024, 23).cuda()", "head = Linear(512, 23).cuda()"),
            ("fusion = Concat().cuda()", "fusion = DEQFusion([512, 512]).cuda()"),
            _imdb_objective("deq_objective"),
        ],
    },
    "mmimdb_low_rank_tensor.py": {
        "dataset": "imdb",
        "harness": _IMDB_HARNESS,
        "refnet": [   # ReFNet wraps MultiBench's own LowRankTensorFusion
            _imports("from fusions.common_fusions import LowRankTensorFusion", "ReFNet", "refnet_objective"),
            ("fusion = LowRankTensorFusion([512, 512], 512, 128).cuda()",
             "fusion = ReFNet(LowRankTensorFusion([512, 512], 512, 128), [512, 512], fused_dim=512).cuda()"),
            _imdb_objective("refnet_objective"),
        ],
        "deq": [
            _imports("from fusions.common_fusions import LowRankTensorFusion", "DEQFusion", "deq_objective"),
            ("fusion = LowRankTensorFusion([512, 512], 512, 128).cuda()", "fusion = DEQFusion([512, 512]).cuda()"),
            _imdb_objective("deq_objective"),
        ],
    },
    "avmnist_simple_late_fusion.py": {
        "dataset": "avmnist",
        "harness": _AVMNIST_HARNESS,
        "refnet": [
            _imports("from fusions.common_fusions import Concat", "ReFNet", "refnet_objective"),
            ("fusion = Concat().cuda()",
             "fusion = ReFNet(Concat(), [channels*8, channels*32], fused_dim=channels*40).cuda()"),
            ("      optimtype=torch.optim.SGD, lr=0.1, weight_decay=0.0001)",
             "      optimtype=torch.optim.SGD, lr=0.1, weight_decay=0.0001,\n"
             "      objective=refnet_objective(nn.CrossEntropyLoss()), objective_args_dict={})"),
        ],
        "deq": [   # DEQ width = the head's input width, so the head line stays
            _imports("from fusions.common_fusions import Concat", "DEQFusion", "deq_objective"),
            ("fusion = Concat().cuda()", "fusion = DEQFusion([channels*8, channels*32], channels*40).cuda()"),
            ("      optimtype=torch.optim.SGD, lr=0.1, weight_decay=0.0001)",
             "      optimtype=torch.optim.SGD, lr=0.1, weight_decay=0.0001,\n"
             "      objective=deq_objective(nn.CrossEntropyLoss()), objective_args_dict={})"),
        ],
    },
}


# lines added or rewritten per stage ("method": what a MultiBench user changes); the README's
# table quotes these numbers
EXPECTED = {
    "refnet": {
        "mmimdb_simple_late_fusion.py": {"method": 4, "torch": 1, "data": 1, "speed": 2, "cpu": 3},
        "mmimdb_low_rank_tensor.py": {"method": 4, "torch": 1, "data": 1, "speed": 2, "cpu": 3},
        "avmnist_simple_late_fusion.py": {"method": 5, "torch": 1, "data": 2, "speed": 2, "cpu": 4},
    },
    "deq": {
        "mmimdb_simple_late_fusion.py": {"method": 5, "torch": 1, "data": 1, "speed": 2, "cpu": 3},
        "mmimdb_low_rank_tensor.py": {"method": 4, "torch": 1, "data": 1, "speed": 2, "cpu": 3},
        "avmnist_simple_late_fusion.py": {"method": 5, "torch": 1, "data": 2, "speed": 2, "cpu": 4},
    },
}


def _apply(text: str, edits: Sequence[Edit]) -> str:
    lines = text.split("\n")
    for old, new in edits:
        hits = [i for i, ln in enumerate(lines) if ln.rstrip() == old]
        if len(hits) != 1:
            raise AssertionError(f"expected the line {old!r} once in the script, found it {len(hits)} times")
        lines[hits[0]] = new
        lines = "\n".join(lines).split("\n")
    return "\n".join(lines)


def _speed(text: str) -> str:
    text, n = re.subn(r"^import torch$", "import torch\ntorch.manual_seed(0)", text, count=1, flags=re.M)
    if n != 1:
        raise AssertionError("expected an 'import torch' line")
    # the positional epoch count of the train(...) call: train(encoders, fusion, head, traindata, validdata, N,
    new, n = re.subn(r"^(train\(encoders, fusion, head, traindata, validdata, )\d+,", rf"\g<1>{EPOCHS},", text,
                     flags=re.M)
    if n != 1:
        raise AssertionError("expected one train(encoders, fusion, head, traindata, validdata, <epochs>, ... line")
    return new


def _cpu(text: str) -> str:
    return text.replace(".cuda()", "")


def changed_lines(before: str, after: str) -> int:
    """Lines added or rewritten going from ``before`` to ``after``."""
    diff = difflib.unified_diff(before.split("\n"), after.split("\n"), lineterm="", n=0)
    return sum(1 for ln in diff if ln.startswith("+") and not ln.startswith("+++"))


def edited_script(original: str, script: str, method: str) -> Tuple[str, Dict[str, int]]:
    """The script with every stage applied, and the number of lines each stage changed."""
    spec = SCRIPTS[script]
    harness = spec["harness"]
    steps = {
        "method": lambda t: _apply(t, spec[method]),
        "torch": lambda t: _apply(t, harness["torch"]),
        "data": lambda t: _apply(t, harness["data"]),
        "speed": _speed,
        "cpu": _cpu,
    }
    counts: Dict[str, int] = {}
    text = original
    for stage in STAGES:
        new = steps[stage](text)
        counts[stage] = changed_lines(text, new)
        text = new
    counts["total"] = changed_lines(original, text)
    return text, counts


# --------------------------------------------------------------------------- tiny data in MultiBench's formats
def write_imdb(folder: Path, n: int = 60, seed: int = 0) -> Path:
    """``folder/multimodal_imdb.hdf5`` as MultiBench's MM-IMDB file: ``features`` (N, 300)
    word2vec text features, ``vgg_features`` (N, 4096) image features, ``genres`` (N, 23)
    multi-hot, ``imdb_ids`` (N,) bytes. Genres shift a slice of both feature vectors."""
    import h5py

    rng = np.random.default_rng(seed)
    genres = (rng.random((n, 23)) < 0.15).astype(np.int8)
    genres[np.arange(n), rng.integers(0, 23, n)] = 1                      # at least one genre each
    text = rng.normal(0, 1, (n, 300)).astype(np.float32)
    image = rng.normal(0, 1, (n, 4096)).astype(np.float32)
    text[:, :23] += 2.0 * genres
    image[:, :23] += 2.0 * genres
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "multimodal_imdb.hdf5"
    with h5py.File(path, "w") as f:
        f["features"] = text
        f["vgg_features"] = image
        f["genres"] = genres
        f["imdb_ids"] = np.array([f"tt{i:07d}".encode() for i in range(n)])
    return path


def write_avmnist(folder: Path, n_train: int = 144, n_test: int = 40, seed: int = 0) -> Path:
    """AV-MNIST as MultiBench's folder: ``image/{train,test}_data.npy`` (N, 784) float32 in
    [0, 255], ``audio/{train,test}_data.npy`` (N, 112, 112) float32 in [0, 255] (spectrograms),
    ``{train,test}_labels.npy`` (N,) int. The digit lights a block of both."""
    rng = np.random.default_rng(seed)
    for sub in ("image", "audio"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, 10, n)
        image = rng.uniform(0, 80, (n, 28, 28)).astype(np.float32)
        audio = rng.uniform(0, 80, (n, 112, 112)).astype(np.float32)
        for i, c in enumerate(y):
            r, col = divmod(int(c), 5)
            image[i, 4 + 10 * r:12 + 10 * r, 1 + 5 * col:5 + 5 * col] += 170
            audio[i, 10 + 50 * r:40 + 50 * r, 2 + 22 * col:20 + 22 * col] += 170
        np.save(folder / "image" / f"{split}_data.npy", image.reshape(n, 784))
        np.save(folder / "audio" / f"{split}_data.npy", audio)
        np.save(folder / f"{split}_labels.npy", y)
    return folder


# Replaces only the loader import of a script: reads the files written above.
LOADERS = '''
"""Loaders for tiny files in MultiBench's formats (MultiBench's own ones need the full sizes)."""
import sys
import types

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader


def _imdb_classes():
    # datasets/imdb/get_data.py imports ``.vgg`` (not in the tree) and gensim at module level; the
    # Dataset classes need neither.
    for name, attr in (("gensim", None), ("gensim.models", "KeyedVectors"), ("datasets.imdb.vgg", "VGGClassifier")):
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                mod = sys.modules[name] = types.ModuleType(name)
                if attr:
                    setattr(mod, attr, None)
    from datasets.imdb.get_data import IMDBDataset, IMDBDataset_robust
    return IMDBDataset, IMDBDataset_robust


def imdb_dataloader(path, test_path, num_workers=0, train_shuffle=True, batch_size=40, vgg=False,
                    skip_process=False, no_robust=False):
    """MultiBench's get_dataloader on a small file: 60 / 20 / 20 % splits in file order; the test
    sets are 11 noise levels per modality (Gaussian noise of std level/10 on the features)."""
    IMDBDataset, IMDBDataset_robust = _imdb_classes()
    with h5py.File(path, "r") as f:
        n = f["genres"].shape[0]
        a, b = int(0.6 * n), int(0.8 * n)
        text, image, labels = f["features"][b:], f["vgg_features"][b:], f["genres"][b:]
    train = DataLoader(IMDBDataset(path, 0, a, vgg), shuffle=train_shuffle, batch_size=batch_size)
    valid = DataLoader(IMDBDataset(path, a, b, vgg), shuffle=False, batch_size=batch_size)
    if no_robust:
        return train, valid, DataLoader(IMDBDataset(path, b, n, vgg), shuffle=False, batch_size=batch_size)
    rng = np.random.default_rng(0)
    tests = {"image": [], "text": []}
    for level in range(11):
        noisy_image = image + rng.normal(0, level / 10, image.shape).astype(np.float32)
        noisy_text = text + rng.normal(0, level / 10, text.shape).astype(np.float32)
        for key, rows in (("image", [(text[i], noisy_image[i], labels[i]) for i in range(len(labels))]),
                          ("text", [(noisy_text[i], image[i], labels[i]) for i in range(len(labels))])):
            tests[key].append(DataLoader(IMDBDataset_robust(rows, 0, len(rows)), shuffle=False,
                                         batch_size=batch_size))
    return train, valid, tests


def avmnist_dataloader(data_dir, batch_size=40, num_workers=0, train_shuffle=True, **unused):
    """MultiBench's AV-MNIST batches (image (B, 1, 28, 28) and audio (B, 1, 112, 112) in [0, 1],
    int labels) from a folder of any size; the last 1/12 of the training rows validate."""
    def split(name):
        image = np.load(f"{data_dir}/image/{name}_data.npy").reshape(-1, 1, 28, 28) / 255.0
        audio = np.load(f"{data_dir}/audio/{name}_data.npy")[:, None] / 255.0
        labels = np.load(f"{data_dir}/{name}_labels.npy").astype(int)
        return [[image[i], audio[i], labels[i]] for i in range(len(labels))]

    train, test = split("train"), split("test")
    cut = len(train) - len(train) // 12
    return (DataLoader(train[:cut], shuffle=train_shuffle, batch_size=batch_size),
            DataLoader(train[cut:], shuffle=False, batch_size=batch_size),
            DataLoader(test, shuffle=False, batch_size=batch_size))
'''


def prepare(root: Path, script: str, method: str, workdir: Path) -> Tuple[Path, Dict[str, int]]:
    """Write the data, the loaders and the edited script under ``workdir``; the script runs
    from ``workdir/run`` (MM-IMDB's relative ``../video/multimodal_imdb.hdf5`` then resolves
    to ``workdir/video``)."""
    original = (root / "examples" / "multimedia" / script).read_text()
    text, counts = edited_script(original, script, method)
    run = workdir / "run"
    run.mkdir(parents=True)
    if SCRIPTS[script]["dataset"] == "imdb":
        write_imdb(workdir / "video")
    else:
        write_avmnist(run / "avmnist")
    (run / "tiny_loaders.py").write_text(LOADERS)
    (run / script).write_text(text)
    return run / script, counts


def run_and_check(multibench, script: str, method: str, workdir: Path) -> Dict[str, int]:
    """Prepare, check the per-stage line counts against :data:`EXPECTED`, run the script with
    MultiBench (the ``multibench`` fixture of ``conftest.py``) and check what it printed."""
    path, counts = prepare(multibench.root, script, method, workdir)
    print(script, method, counts)
    expected = EXPECTED[method][script]
    assert {k: counts[k] for k in expected} == expected, counts
    proc = multibench.run([path], path.parent, timeout=300)
    saved = {"mmimdb_simple_late_fusion.py": "best_lf.pt", "mmimdb_low_rank_tensor.py": "best_lrtf.pt"}
    assert "Saving Best" in proc.stdout and (path.parent / saved.get(script, "best.pt")).is_file()
    if SCRIPTS[script]["dataset"] == "avmnist":
        accs = multibench.printed(proc.stdout, "acc: ")
        assert len(accs) == 1 and 0.0 <= accs[0] <= 1.0, proc.stdout[-2000:]
    else:   # test(): the clean set, then 11 noise levels per modality, then MultiBench's robustness scores
        f1 = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("f1_micro: ")]
        assert len(f1) == 1 + 2 * 11, proc.stdout[-2000:]
        assert "relative robustness (image, macro)" in proc.stdout
        assert "effective robustness (text, micro)" in proc.stdout
    return counts
