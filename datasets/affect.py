"""CMU-MOSI / CMU-MOSEI-style affect pickles (MultiBench's ``mosi_raw.pkl`` layout), fixed length.

The pickle holds a dict with keys ``"train"``, ``"valid"``, ``"test"``; each is a dict with

* ``"vision"`` ``(N, T, d_v)``, ``"audio"`` ``(N, T, d_a)``, ``"text"`` ``(N, T, d_t)``
  (MOSI: d = 35, 74, 300 and T = 50; time steps are zero-padded at the **front**);
* ``"labels"`` ``(N, 1, 1)`` (or ``(N,)``, ``(N, 1)``): sentiment in [-3, 3];
* other keys (``"id"``, ...) are ignored.

Processing, following MultiBench's ``Affectdataset`` in its fixed-length (``max_pad``) mode:

1. non-finite feature values: ``nonfinite="zero"`` (default, MultiBench's processing: its
   MOSI audio holds ``-inf``) replaces every NaN/+-inf of every modality by 0 with a visible
   warning giving the count; ``nonfinite="error"`` refuses them, as every other loader does;
2. samples whose text is all zeros are dropped (MultiBench's ``drop_entry``);
3. ``aligned=True``: the leading padding is cut at the first time step where the text is
   non-zero, for all three modalities (``aligned=False``: each modality at its own first
   non-zero step);
4. sequences are truncated to ``max_seq_len`` steps and zero-padded at the end;
5. optional ``z_norm`` (MultiBench's): per sample and feature over the kept steps;
6. optional ``normalize`` ("standard"/"minmax"): per feature over the *training* samples'
   kept (non-padded) steps, padding stays 0.

Labels: ``task="regression"`` -> ``(B, 1)`` float sentiment; ``task="classification"`` ->
``(B,)`` int64 with 1 for label > 0 and 0 otherwise (MultiBench's mapping for MOSI/MOSEI/
sarcasm: a neutral 0 counts as negative); ``drop_neutral=True`` removes label-0 samples first
(the "non-zero" binary accuracy convention). Batches are ``[vision (B, L, d_v),
audio (B, L, d_a), text (B, L, d_t), y]`` with ``L = max_seq_len`` (MultiBench's non-packed
mode; packed variable-length batches are not provided).

Example:
    >>> from multizoo_ext.datasets.affect import get_dataloader
    >>> train, valid, test = get_dataloader("mosi_raw.pkl", task="classification")  # doctest: +SKIP
    >>> [tuple(t.shape) for t in next(iter(train))]                                  # doctest: +SKIP
    [(32, 50, 35), (32, 50, 74), (32, 50, 300), (32,)]
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from multizoo_ext.datasets.common import (
    DataKeyError,
    Loaders,
    Normalizer,
    arrays_to_dataloaders,
    check_task,
)
from multizoo_ext.datasets.safe_pickle import load_pickle
from multizoo_ext.registry import register_dataset

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
MODALITY_NAMES = ("vision", "audio", "text")
SPLITS = ("train", "valid", "test")


def _first_nonzero_steps(x: np.ndarray) -> np.ndarray:
    """Index of the first time step with any non-zero feature, per sample; T when none.
    ``x``: (N, T, d) -> (N,)."""
    nz = np.any(x != 0, axis=2)  # (N, T)
    return np.where(nz.any(axis=1), nz.argmax(axis=1), x.shape[1])


def _fix_length(x: np.ndarray, starts: np.ndarray, max_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """Cut each sample at ``starts[i]``, keep at most ``max_len`` steps, pad zeros at the end.
    ``x``: (N, T, d) -> ((N, max_len, d) float32, lengths (N,))."""
    n, t, d = x.shape
    out = np.zeros((n, max_len, d), dtype=np.float32)
    lengths = np.minimum(t - starts, max_len).astype(np.int64)
    for i in range(n):
        k = int(lengths[i])
        if k > 0:
            out[i, :k] = x[i, starts[i]:starts[i] + k]
    return out, lengths


def _z_norm(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per sample and feature, standardise the kept steps (unbiased std, as torch.std);
    a feature with zero or undefined std becomes 0. ``x``: (N, L, d), modified in place."""
    for i in range(x.shape[0]):
        k = int(lengths[i])
        if k == 0:
            continue
        seg = x[i, :k]
        mean = seg.mean(axis=0, keepdims=True)
        std = seg.std(axis=0, ddof=1, keepdims=True) if k > 1 else np.zeros_like(mean)
        x[i, :k] = np.where(std > 0, (seg - mean) / np.where(std > 0, std, 1.0), 0.0)
    return x


def _labels(raw: Any, n: int, where: str) -> np.ndarray:
    y = np.asarray(raw, dtype=np.float64)
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"affect {where} labels have shape {y.shape} but the features have {n} rows")
    y = y.reshape(n, -1)
    if y.shape[1] > 1:
        logger.warning("affect %s labels have %d values per sample; using the first (as MultiBench does)",
                       where, y.shape[1])
    return y[:, 0]


def _process_split(split: Mapping[str, Any], where: str, max_seq_len: int, aligned: bool,
                   drop_empty_text: bool, z_norm: bool, nonfinite: str = "zero"
                   ) -> Tuple[List[np.ndarray], List[np.ndarray], np.ndarray]:
    """One split's dict -> (3 arrays (N', L, d), 3 length arrays (N',), labels (N',))."""
    if not isinstance(split, Mapping):
        raise ValueError(f"affect split {where!r} must be a dict with vision/audio/text/labels, "
                         f"got {type(split).__name__}")
    missing = [k for k in MODALITY_NAMES + ("labels",) if k not in split]
    if missing:
        raise DataKeyError(f"affect split {where!r} has no key(s) {missing}; its keys are {sorted(split)}")
    mods = []
    for k in MODALITY_NAMES:
        x = np.asarray(split[k], dtype=np.float32)
        if x.ndim != 3:
            raise ValueError(f"affect {where} {k!r} must have shape (N, T, d), got {x.shape}")
        bad = ~np.isfinite(x)
        if bad.any():
            if nonfinite == "error":
                raise ValueError(f"affect {where} {k!r} contains {int(bad.sum())} NaN/Inf value(s); pass "
                                 "nonfinite='zero' to replace them by 0 as MultiBench does")
            msg = (f"affect {where} {k!r}: replacing {int(bad.sum())} NaN/Inf value(s) with 0 (MultiBench's "
                   "processing; nonfinite='error' refuses them)")
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            x = np.where(bad, np.float32(0.0), x)
        mods.append(x)
    rows = [m.shape[0] for m in mods]
    if len(set(rows)) != 1:
        raise ValueError(f"affect {where} modality row counts disagree: "
                         f"{dict(zip(MODALITY_NAMES, rows))}")
    y = _labels(split["labels"], rows[0], where)
    if not np.isfinite(y).all():
        raise ValueError(f"affect {where} labels contain NaN/Inf values")
    if drop_empty_text:
        keep = np.any(mods[2] != 0, axis=(1, 2))  # (N,)
        if not keep.all():
            logger.info("affect %s: dropping %d sample(s) whose text is all zeros", where, int((~keep).sum()))
            mods, y = [m[keep] for m in mods], y[keep]
    if y.shape[0] == 0:
        raise ValueError(f"affect {where} split is empty (after dropping samples with all-zero text)")
    if aligned:
        starts = [_first_nonzero_steps(mods[2])] * 3
        starts = [np.minimum(s, m.shape[1]) for s, m in zip(starts, mods)]
    else:
        starts = [_first_nonzero_steps(m) for m in mods]
    fixed, lengths = [], []
    for m, s in zip(mods, starts):
        x, ln = _fix_length(m, s, max_seq_len)
        if z_norm:
            _z_norm(x, ln)
        fixed.append(x)
        lengths.append(ln)
    return fixed, lengths, y


def load_affect_pickle(filepath: PathLike, trust_pickle: bool = False) -> Dict[str, Any]:
    """Unpickle an affect file without running code from it (see
    :mod:`multizoo_ext.datasets.safe_pickle`): only NumPy arrays, dtypes and builtin
    containers/scalars are rebuilt unless ``trust_pickle=True``.

    Raises:
        FileNotFoundError: no such file. DataKeyError: a split is missing. ValueError: not a
            dict of splits, not a pickle, or (UnsafePickleError) a refused global.
    """
    p = Path(filepath)
    data = load_pickle(p, trust_pickle=trust_pickle, what="affect")
    if not isinstance(data, Mapping):
        raise ValueError(f"{p} must hold a dict with 'train', 'valid', 'test', got {type(data).__name__}")
    missing = [s for s in SPLITS if s not in data]
    if missing:
        raise DataKeyError(f"{p} has no split(s) {missing}; its keys are {sorted(map(str, data))}")
    return data


@register_dataset("affect")
def get_dataloader(
    filepath: PathLike,
    task: str = "regression",
    max_seq_len: int = 50,
    aligned: bool = True,
    drop_empty_text: bool = True,
    drop_neutral: bool = False,
    z_norm: bool = False,
    normalize: Optional[str] = None,
    batch_size: int = 32,
    num_workers: int = 0,
    train_shuffle: bool = True,
    seed: int = 0,
    trust_pickle: bool = False,
    nonfinite: str = "zero",
) -> Loaders:
    """(train, valid, test) DataLoaders of an affect pickle, fixed-length sequences.

    Args:
        filepath: the pickle (``{"train": {...}, "valid": {...}, "test": {...}}``).
        task: "regression" (float sentiment) or "classification" (label > 0 vs not).
            Default: "regression" (MultiBench's ``task=None``).
        max_seq_len: L, steps kept per sample after alignment. Default: 50 (MultiBench's).
        aligned: cut every modality at the text's first non-zero step. Default: True.
        drop_empty_text: drop samples with all-zero text (MultiBench's). Default: True.
        drop_neutral: classification only, drop samples labelled exactly 0. Default: False.
        z_norm: MultiBench's per-sample z-normalisation. Default: False.
        normalize: "standard", "minmax" or None, per feature over the training samples'
            non-padded steps. Default: None.
        batch_size: Default: 32 (MultiBench's). num_workers: Default: 0 (MultiBench: 2).
        train_shuffle: Default: True. seed: training-loader shuffling. Default: 0.
        trust_pickle: False (default): the file is unpickled without running code from it
            (NumPy arrays, dtypes and builtin containers/scalars only; anything else is refused
            with an error naming it). True: plain ``pickle.load``, for files you trust (warns).
            From the CLI: ``--data-arg trust_pickle=true``.
        nonfinite: "zero" (default): NaN/Inf features become 0 with a visible warning
            (MultiBench's processing); "error": refuse them.

    Returns:
        ``(train, valid, test)`` yielding ``[vision (B, L, d_v), audio (B, L, d_a),
        text (B, L, d_t), y]`` with y ``(B, 1)`` float (regression) or ``(B,)`` int64.

    Raises:
        FileNotFoundError, DataKeyError (a KeyError and ValueError), ValueError: missing
            file, split or key; shapes that disagree; an empty split.
    """
    if task not in ("regression", "classification"):
        check_task(task)
        raise ValueError(f"affect supports task 'regression' or 'classification', got {task!r}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, (int, np.integer)) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    data = load_affect_pickle(filepath, trust_pickle=trust_pickle)
    if nonfinite not in ("zero", "error"):
        raise ValueError(f"nonfinite must be 'zero' or 'error', got {nonfinite!r}")
    parts = {s: _process_split(data[s], s, int(max_seq_len), aligned, drop_empty_text, z_norm, nonfinite)
             for s in SPLITS}
    widths = {s: [m.shape[2] for m in parts[s][0]] for s in SPLITS}
    if widths["valid"] != widths["train"] or widths["test"] != widths["train"]:
        raise ValueError(f"affect feature widths (vision, audio, text) differ across splits: {widths}")

    labels: Dict[str, np.ndarray] = {}
    for s in SPLITS:
        mods, lens, y = parts[s]
        if task == "classification":
            if drop_neutral:
                keep = y != 0
                mods, lens, y = [m[keep] for m in mods], [ln[keep] for ln in lens], y[keep]
                if y.shape[0] == 0:
                    raise ValueError(f"affect {s} split is empty after drop_neutral=True")
                parts[s] = (mods, lens, y)
            labels[s] = (y > 0).astype(np.int64)
        else:
            labels[s] = y.astype(np.float32)

    if normalize is not None:
        tr_mods, tr_lens, _ = parts["train"]
        for j in range(len(MODALITY_NAMES)):
            mask = np.arange(max_seq_len)[None, :] < tr_lens[j][:, None]  # (N, L) kept steps
            nz = Normalizer.fit(tr_mods[j], normalize, reduce_axes=(0, 1), mask=mask)
            for s in SPLITS:
                m, ln = parts[s][0][j], parts[s][1][j]
                keep = (np.arange(max_seq_len)[None, :] < ln[:, None])[..., None]  # (N, L, 1)
                parts[s][0][j] = np.where(keep, nz.transform(m), np.float32(0.0)).astype(np.float32)

    logger.info("affect %s: %s rows (train/valid/test), L=%d, widths %s", filepath,
                [labels[s].shape[0] for s in SPLITS], max_seq_len, widths["train"])
    return arrays_to_dataloaders(
        parts["train"][0], labels["train"], valid_modalities=parts["valid"][0], valid_labels=labels["valid"],
        test_modalities=parts["test"][0], test_labels=labels["test"], task=task,
        modality_names=list(MODALITY_NAMES), batch_size=batch_size, num_workers=num_workers, seed=seed,
        train_shuffle=train_shuffle)
