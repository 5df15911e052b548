"""The native CPU kernels of the Multi-Similarity loss (objectives/multisimilarity_native.c):
same values and gradients as the eager path and as a float64 computation, the same label
handling, edge cases and errors, and the fallback to eager PyTorch when no compiler is there.
(The PML and reference-loop tests of test_multisimilarity.py run through these kernels too
for their float32 cases.)"""
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from multizoo_ext import native
from multizoo_ext.objectives import multisimilarity_native
from multizoo_ext.objectives.multisimilarity import MultiSimilarityLoss, multi_similarity_loss

from .test_multisimilarity import grad_of

pytestmark = pytest.mark.skipif(not multisimilarity_native.available(),
                                reason="no C compiler: the native kernels are not built here")


def _eager(fn):
    with native.disabled():
        return fn()


def _labels(kind, batch, gen):
    if kind == "class":
        return torch.randint(0, 5, (batch,), generator=gen)
    if kind == "class_column":
        return torch.randint(0, 5, (batch, 1), generator=gen).to(torch.int32)
    if kind == "float_class":
        return torch.randint(0, 5, (batch,), generator=gen).float()
    width = 70 if kind == "multi_wide" else 7  # > 64 labels: the share-matrix path
    hot = (torch.rand(batch, width, generator=gen) < 0.25).long()
    hot[0] = 0  # a sample without any label
    return hot.bool() if kind == "multi_bool" else hot


KINDS = ["class", "class_column", "float_class", "multi", "multi_bool", "multi_wide"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mining", [True, False])
@pytest.mark.parametrize("batch", [2, 3, 17, 96])
def test_native_equals_eager_and_float64(kind, mining, batch):
    gen = torch.Generator().manual_seed(batch)
    for _ in range(2):
        emb = torch.randn(batch, 24, generator=gen)
        labels = _labels(kind, batch, gen)
        loss_fn = lambda e: multi_similarity_loss(e, labels, mining=mining)  # noqa: E731
        fast, g_fast = grad_of(loss_fn, emb)
        slow, g_slow = _eager(lambda: grad_of(loss_fn, emb))
        exact, g_exact = grad_of(loss_fn, emb.double())  # float64: eager
        scale = float(g_exact.abs().max()) + 1e-30
        assert fast.dtype == torch.float32
        torch.testing.assert_close(fast, slow, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(fast.double(), exact, rtol=2e-6, atol=1e-7)
        assert float((g_fast - g_slow).abs().max()) <= 1e-5 * scale
        assert float((g_fast.double() - g_exact).abs().max()) <= 1e-5 * scale


def test_native_takes_the_kernels_and_the_mining_matters():
    gen = torch.Generator().manual_seed(3)
    emb, labels = torch.randn(64, 16, generator=gen), torch.randint(0, 6, (64,), generator=gen)
    calls = []
    original = multisimilarity_native.mean_loss

    def spy(*args, **kwargs):
        calls.append(args[2])  # the mode
        return original(*args, **kwargs)

    multisimilarity_native.mean_loss = spy
    try:
        mined = multi_similarity_loss(emb, labels)
        full = multi_similarity_loss(emb, labels, mining=False)
        multi_similarity_loss(emb, (torch.rand(64, 5, generator=gen) < 0.3).long())
        multi_similarity_loss(emb.double(), labels)  # float64: eager
    finally:
        multisimilarity_native.mean_loss = original
    assert calls == [0, 0, 2]
    assert abs(float(mined) - float(full)) > 1e-3


@pytest.mark.parametrize("case", ["one_class", "all_distinct", "no_labels"])
def test_native_edge_cases_give_connected_zero(case):
    emb = torch.randn(6, 5, requires_grad=True)
    labels = {"one_class": torch.zeros(6, dtype=torch.long), "all_distinct": torch.arange(6),
              "no_labels": torch.zeros(6, 4, dtype=torch.long)}[case]
    loss = MultiSimilarityLoss()(emb, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(emb.grad) == 0


def test_native_zero_rows_and_grad_scale_match_eager():
    # A zero row (norm below eps: F.normalize's clamped branch) and an outer factor on the loss.
    gen = torch.Generator().manual_seed(5)
    emb, labels = torch.randn(12, 8, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    emb[4] = 0.0
    fn = lambda e: 3.5 * multi_similarity_loss(e, labels)  # noqa: E731
    fast, g_fast = grad_of(fn, emb)
    slow, g_slow = _eager(lambda: grad_of(fn, emb))
    torch.testing.assert_close(fast, slow, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    ("nan", "NaN/Inf"), ("inf", "NaN/Inf"), ("overflow", "overflows"), ("multi_two", "values 0/1"),
])
def test_native_errors(bad, match):
    emb, labels = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 2])
    if bad == "nan":
        emb[2, 1] = float("nan")
    elif bad == "inf":
        emb[0, 0] = float("inf")
    elif bad == "overflow":
        emb[3] = 3e30  # finite values whose norm overflows float32
    else:
        labels = torch.tensor([[1, 0], [0, 1], [2, 0], [1, 1], [0, 0]])
    with pytest.raises(ValueError, match=match):
        MultiSimilarityLoss()(emb, labels)


def test_without_a_compiler_the_eager_path_runs(monkeypatch, tmp_path, caplog):
    gen = torch.Generator().manual_seed(7)
    emb, labels = torch.randn(20, 6, generator=gen), torch.randint(0, 4, (20,), generator=gen)
    expected = _eager(lambda: multi_similarity_loss(emb, labels))
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.forget("multisimilarity")
    try:
        with caplog.at_level(logging.WARNING, logger="multizoo_ext.native"):
            with pytest.warns(RuntimeWarning, match="native multisimilarity kernels unavailable.*no C compiler"):
                assert not multisimilarity_native.available()
            got = multi_similarity_loss(emb, labels)
        assert "no C compiler" in caplog.text
        assert torch.equal(got, expected)  # bitwise: the eager path
        assert list(tmp_path.iterdir()) == []
    finally:
        native.forget("multisimilarity")  # the next test loads the real library again


def test_compiled_library_is_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    native.forget("multisimilarity")
    try:
        assert multisimilarity_native.available()
        built = sorted(p.name for p in tmp_path.iterdir())
        assert len(built) == 2 and built[0].startswith("multisimilarity-") and built[0].endswith(".so")
        assert built[1] == built[0] + ".sha256"
        assert (tmp_path / built[1]).read_text() == hashlib.sha256((tmp_path / built[0]).read_bytes()).hexdigest()
        # a second process-level load uses the file: compiling would fail now
        native.forget("multisimilarity")
        monkeypatch.setattr(native, "_try_compile", lambda *a: "must not compile")
        assert multisimilarity_native.available()
    finally:
        native.forget("multisimilarity")


def _built_cache(monkeypatch, tmp_path):
    """Build the library into ``tmp_path/built``; returns (folder, library name)."""
    built = tmp_path / "built"
    monkeypatch.setenv(native.ENV_CACHE, str(built))
    native.forget("multisimilarity")
    assert multisimilarity_native.available()
    lib = [p.name for p in built.iterdir() if p.name.endswith(".so")]
    assert len(lib) == 1
    return built, lib[0]


_CHILD = """
import torch
from multizoo_ext.objectives import multisimilarity_native
from multizoo_ext.objectives.multisimilarity import multi_similarity_loss
assert multisimilarity_native.available(), "the kernels were not rebuilt"
g = torch.Generator().manual_seed(0)
print(float(multi_similarity_loss(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))))
"""


@pytest.mark.parametrize("checksum", ["absent", "stale", "forged"])
def test_truncated_cached_library_is_rebuilt_and_the_process_survives(monkeypatch, tmp_path, checksum):
    """A truncated library made every later loss call die with SIGBUS inside dlopen; the
    checksum verified before loading sends it to a rebuild. Run in a child process, so a
    crash would show as a signal exit code instead of killing the test run."""
    built, name = _built_cache(monkeypatch, tmp_path)
    native.forget("multisimilarity")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    good = (built / name).read_bytes()
    (damaged / name).write_bytes(good[: len(good) // 3])  # an interrupted copy or a full disk
    if checksum == "stale":  # the checksum of the complete file: the truncated one does not match it
        shutil.copy(built / (name + ".sha256"), damaged / (name + ".sha256"))
    elif checksum == "forged":  # matches the truncated bytes: the ELF segment check catches it
        (damaged / (name + ".sha256")).write_text(hashlib.sha256((damaged / name).read_bytes()).hexdigest())
    env = dict(os.environ, **{native.ENV_CACHE: str(damaged), "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    expected = float(_eager(lambda: multi_similarity_loss(emb, labels)))
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-5)
    assert native.verified(damaged / name) and (damaged / name).read_bytes() == good


def test_garbage_library_is_rebuilt(monkeypatch, tmp_path):
    built, name = _built_cache(monkeypatch, tmp_path)
    garbage = tmp_path / "garbage.tmp"
    garbage.write_bytes(os.urandom(4096))
    os.replace(garbage, built / name)  # a new file (the loaded one's pages stay valid)
    (built / (name + ".sha256")).write_text("0" * 64)
    native.forget("multisimilarity")
    try:
        assert multisimilarity_native.available()
        assert native.verified(built / name)
    finally:
        native.forget("multisimilarity")


_TINY_C = "int tiny_add(int a, int b) { return a + b; }\n"


def test_missing_symbol_rebuilds_once_then_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    source = tmp_path / "tiny.c"
    source.write_text(_TINY_C)
    compiles = []
    real = native._try_compile
    monkeypatch.setattr(native, "_try_compile", lambda *a: compiles.append(1) or real(*a))

    def prepare(lib):
        lib.tiny_add.restype = None  # present
        lib.tiny_missing.restype = None  # absent: AttributeError

    try:
        with pytest.warns(RuntimeWarning, match=r"native tiny_missing kernels unavailable.*tiny_missing"):
            assert native.load("tiny_missing", source, prepare) is None
        assert len(compiles) == 2  # the first build and one rebuild, no more
        assert native.load("tiny_missing", source, prepare) is None and len(compiles) == 2  # cached: no retry
    finally:
        native.forget("tiny_missing")


def test_hanging_compiler_times_out_and_falls_back(monkeypatch, tmp_path):
    fake = tmp_path / "slowcc"
    fake.write_text("#!/bin/sh\nsleep 60\n")  # a compiler driver whose child hangs
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "COMPILE_TIMEOUT_S", 1.0)
    source = tmp_path / "tiny.c"
    source.write_text(_TINY_C)
    start = time.monotonic()
    try:
        with pytest.warns(RuntimeWarning, match=r"did not finish within 1 s"):
            assert native.load("tiny_slow", source) is None
    finally:
        native.forget("tiny_slow")
    assert time.monotonic() - start < 10  # one budget for both flag sets, the process group killed
