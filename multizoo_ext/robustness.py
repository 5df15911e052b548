"""Relative and effective robustness, as MultiBench defines them (``eval_scripts/robustness.py``).

A robustness curve is a list of scores ``f = [f_0, f_1, ..., f_n]`` measured at increasing
noise levels, ``f_0`` on clean data (MultiBench's levels are 0.0, 0.1, ..., 1.0).

* **Relative robustness** is the area under the curve by the trapezoid rule with a level
  step of 0.1: ``sum_i (f_i + f_{i+1}) * step / 2``.
* **Effective robustness** compares the curve with a reference method's curve ``g`` shifted
  to the same clean score: ``sum_i (f_i - (g_i + f_0 - g_0))``. MultiBench's reference is
  late fusion's curve from its own tables; without a reference this uses a flat curve
  (no degradation), giving ``sum_i (f_i - f_0)``: the summed drop below the clean score
  (0 = perfectly robust, more negative = less robust).

MultiBench then min-max normalises both numbers across the methods of its tables;
:func:`maxmin_normalize` does that for any set of methods you measured yourself.
For error measures (MSE) lower is better: read the area accordingly, or negate.

Example:
    >>> round(relative_robustness([0.9, 0.8, 0.7]), 6)
    0.16
    >>> round(effective_robustness([0.9, 0.8, 0.7]), 6)
    -0.3
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

Curve = Sequence[float]


def _as_curve(curve: Curve, what: str = "curve") -> np.ndarray:
    f = np.asarray(curve, dtype=np.float64).reshape(-1)
    if f.size == 0:
        raise ValueError(f"{what} must hold at least one score, got an empty sequence")
    if not np.isfinite(f).all():
        raise ValueError(f"{what} contains NaN/Inf scores: {f.tolist()}")
    return f


def relative_robustness(curve: Curve, step: float = 0.1) -> float:
    """Area under the robustness curve (trapezoid rule, level spacing ``step``).

    Args:
        curve: scores ``(n+1,)`` at levels 0, step, 2*step, ...
        step: level spacing. Default: 0.1 (MultiBench's).

    Returns:
        ``sum_i (f_i + f_{i+1}) * step / 2``; 0 for a single point.
    """
    f = _as_curve(curve)
    return float(((f[:-1] + f[1:]) * step / 2).sum())


def effective_robustness(curve: Curve, reference: Optional[Curve] = None) -> float:
    """Summed gap between ``curve`` and a reference curve shifted to the same clean score.

    Args:
        curve: scores ``(n+1,)``, ``curve[0]`` clean.
        reference: the reference method's scores at the same levels (MultiBench: late
            fusion). Default: a flat curve, i.e. ``sum_i (f_i - f_0)``.

    Returns:
        ``sum_i (f_i - (g_i + f_0 - g_0))``.
    """
    f = _as_curve(curve)
    g = np.full_like(f, f[0]) if reference is None else _as_curve(reference, "reference")
    if g.shape != f.shape:
        raise ValueError(f"reference has {g.size} points but the curve has {f.size}; measure both at the same levels")
    return float((f - (g + (f[0] - g[0]))).sum())


def maxmin_normalize(scores: Mapping[str, float], lower_is_better: bool = False) -> Dict[str, float]:
    """Min-max normalise one robustness number across methods (MultiBench's last step).

    Args:
        scores: ``{method: value}``.
        lower_is_better: negate first (MultiBench does so for its finance/MSE tasks).

    Returns:
        ``{method: value in [0, 1]}`` (all 0 when every value is equal).
    """
    if not scores:
        raise ValueError("scores must name at least one method")
    v = np.array([float(x) for x in scores.values()])
    if lower_is_better:
        v = -v
    span = v.max() - v.min()
    norm = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    return {k: float(x) for k, x in zip(scores, norm)}


def _curves_of(entry: Any, measure: Optional[str]) -> Dict[str, Curve]:
    """``{measure: curve}`` from a plain curve, ``{measure: curve}`` or ``test()``'s
    ``{measure: {"curve": [...], ...}}``."""
    if isinstance(entry, Mapping):
        curves = {k: (v["curve"] if isinstance(v, Mapping) else v) for k, v in entry.items()}
    else:
        curves = {measure or "score": entry}
    if measure is not None:
        if measure not in curves:
            raise ValueError(f"measure {measure!r} not among the curves {sorted(curves)}")
        curves = {measure: curves[measure]}
    return curves


def robustness_table(
    results: Mapping[str, Any],
    measure: Optional[str] = None,
    step: float = 0.1,
    reference: Optional[Mapping[str, Curve]] = None,
) -> Dict[str, Dict[str, float]]:
    """Per-modality (per measure) relative and effective robustness of robustness curves.

    Args:
        results: ``{modality: curve}``, ``{modality: {measure: curve}}``, or the
            ``"robustness"`` entry of ``test(..., no_robust=False)``
            (``{modality: {measure: {"curve": [...], ...}}}``).
        measure: keep only this measure (e.g. "Accuracy"). Default: all.
        step: level spacing for the area. Default: 0.1.
        reference: optional ``{modality: reference curve}`` for effective robustness.

    Returns:
        ``{row: {"clean", "worst", "relative", "effective", "retained"}}`` where a row is the
        modality, or ``"modality/measure"`` when there are several measures; ``retained`` is
        the area divided by the area of a flat curve at the clean score (1.0 = no drop).
    """
    table: Dict[str, Dict[str, float]] = {}
    for modality, entry in results.items():
        curves = _curves_of(entry, measure)
        for meas, curve in curves.items():
            f = _as_curve(curve, f"curve of {modality}/{meas}")
            ref = reference.get(modality) if reference is not None else None
            rel = relative_robustness(f, step)
            flat = f[0] * step * (f.size - 1)
            row = modality if len(curves) == 1 else f"{modality}/{meas}"
            table[row] = {
                "clean": float(f[0]),
                "worst": float(f.min()),
                "relative": rel,
                "effective": effective_robustness(f, ref),
                "retained": float(rel / flat) if flat != 0 else math.nan,
            }
    return table


def format_robustness_table(table: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """A Markdown table of :func:`robustness_table`'s output."""
    cols = ["clean", "worst", "relative", "effective", "retained"]
    lines = ["| modality | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row, vals in table.items():
        lines.append(f"| {row} | " + " | ".join(f"{vals[c]:.{digits}f}" for c in cols) + " |")
    return "\n".join(lines)


__all__ = [
    "effective_robustness",
    "format_robustness_table",
    "maxmin_normalize",
    "relative_robustness",
    "robustness_table",
]
