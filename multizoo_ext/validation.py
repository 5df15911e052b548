"""Named input validators: one sentence saying what was expected and what came.

For fusions: :func:`check_input_dims` validates the constructor's widths (``input_dims``
and the like), :func:`check_fusion_inputs` a forward's list of modality tensors (count,
batch, widths, dtype against the fusion's parameters, NaN/Inf). For settings:
:func:`check_number` (a finite number or an integer above a bound).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Sequence

import torch


def check_modalities(inputs: Sequence[torch.Tensor], expected: Optional[int] = None,
                     name: str = "fusion", min_count: int = 2) -> None:
    """Check a list of per-modality tensors (B, ...) before fusing.

    Raises:
        TypeError: ``inputs`` is not a list/tuple of tensors.
        ValueError: wrong number of modalities, or batch sizes disagree.
    """
    if not isinstance(inputs, (list, tuple)) or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError(f"{name} expects a list of tensors, one per modality, got {type(inputs).__name__}")
    n = len(inputs)
    if expected is not None and n != expected:
        raise ValueError(f"{name} was built for {expected} modalities but got {n}")
    if n < min_count:
        raise ValueError(f"{name} needs at least {min_count} modalities, got {n}")
    batch = {x.shape[0] if x.dim() > 0 else None for x in inputs}
    if len(batch) != 1 or None in batch:
        shapes = [tuple(x.shape) for x in inputs]
        raise ValueError(f"{name}: all modalities must share the batch dimension, got shapes {shapes}")


def check_widths(inputs: Sequence[torch.Tensor], widths: Sequence[int], name: str = "fusion") -> None:
    """Check that modality i has last dimension ``widths[i]``."""
    got = [int(x.shape[-1]) for x in inputs]
    if list(widths) != got:
        raise ValueError(f"{name} was built for modality widths {list(widths)} but got widths {got}")


def check_finite(x: torch.Tensor, what: str = "input") -> None:
    """Raise if ``x`` holds NaN or Inf (one host sync; call at loop boundaries, not in solvers)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} contains {n_bad} NaN/Inf value(s); clean or impute the data first")


def check_input_dims(values: Any, name: str, what: str = "input_dims", min_count: int = 2) -> List[int]:
    """The one validator of a fusion's constructor widths.

    Args:
        values: a sequence of positive integers (e.g. ``[5, 7]``); integral floats such as
            ``5.0`` are accepted.
        name: the fusion's name for the messages (``"LowRankTensorFusion"``).
        what: the argument's name. Default: ``"input_dims"``.
        min_count: fewest widths accepted. Default: 2 (a fusion fuses at least two modalities).

    Returns:
        The widths as a list of ints.

    Raises:
        TypeError: not a sequence of integers (None, a string, a float such as 2.5, a bool).
        ValueError: an empty list, a width below 1, or fewer than ``min_count`` widths.
    """
    if values is None or isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: {what} must be a sequence of positive ints, got {values!r}")
    dims = []
    for d in values:
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or int(d) != d:
            raise TypeError(f"{name}: {what} must be a sequence of positive ints, got {list(values)!r}")
        dims.append(int(d))
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"{name}: {what} must be non-empty positive widths, got {dims}")
    if len(dims) < min_count:
        raise ValueError(f"{name}: {what} must give at least {min_count} widths (one per modality), got {dims}")
    return dims


def check_fusion_inputs(inputs: Sequence[torch.Tensor], name: str, widths: Optional[Sequence[int]] = None,
                        dtype: Optional[torch.dtype] = None, flatten: bool = True,
                        min_count: int = 2) -> List[torch.Tensor]:
    """The one forward-input check of the fusions: one tensor per modality, a shared batch
    size, the built widths, the fusion's dtype, and finite values.

    Args:
        inputs: list of M tensors ``(B, ...)``.
        name: the fusion's name for the messages.
        widths: the widths the fusion was built for (``input_dims``), or None (not checked;
            then any count >= ``min_count`` is accepted).
        dtype: the fusion's parameter dtype, or None (a fusion without parameters: any dtype).
            Inputs must be floating point of exactly this dtype, except under
            ``torch.autocast``, which casts per op.
        flatten: flatten each input to ``(B, d_i)`` (else each must already be 2-D).
        min_count: fewest modalities. Default: 2.

    Returns:
        The inputs as ``(B, d_i)`` tensors (flattened when ``flatten``).

    Raises:
        TypeError: not a list of tensors, or the wrong dtype (names the fix, e.g.
            ``fusion.double()``).
        ValueError: wrong modality count, batch sizes that disagree, an input without a
            feature dimension, wrong widths, or NaN/Inf values. The NaN/Inf check is one sum
            per input and one host sync (an exact per-element check only when that sum is not
            finite), and cannot be switched off.
    """
    check_modalities(inputs, len(widths) if widths is not None else None, name, min_count)
    for i, x in enumerate(inputs):
        if x.dim() < 2 or (not flatten and x.dim() != 2):
            form = "(B, d)" if not flatten else "(B, ...) with a feature dimension"
            raise ValueError(f"{name}: modality {i} must be {form}, got shape {tuple(x.shape)}")
    flat = [torch.flatten(x, 1) for x in inputs] if flatten else list(inputs)
    if widths is not None:
        check_widths(flat, widths, name)
    if dtype is not None:
        autocast = torch.is_autocast_enabled(flat[0].device.type)
        wrong = [x.dtype for x in flat if x.dtype != dtype and not (autocast and x.is_floating_point())]
        if wrong:
            fix = {torch.float64: "fusion.double()", torch.float16: "fusion.half()",
                   torch.bfloat16: "fusion.to(torch.bfloat16)", torch.float32: "fusion.float()"}.get(wrong[0])
            hint = f"call {fix} or cast the inputs" if fix else f"cast the inputs to {dtype}"
            raise TypeError(f"{name}: expected {str(dtype).replace('torch.', '')} inputs like the fusion's parameters, "
                            f"got {', '.join(str(t).replace('torch.', '') for t in [x.dtype for x in flat])}; {hint}")
    floating = [x for x in flat if x.is_floating_point()]
    if floating:
        with torch.no_grad():
            # NaN/Inf anywhere makes the sum non-finite; a finite sum proves every value finite.
            # Far cheaper than isfinite(x).all() on large inputs; a sum that overflows on finite
            # values falls through to the exact per-element check below.
            probe = torch.stack([x.sum(dtype=torch.float32) for x in floating]).sum()
            if not math.isfinite(float(probe)):
                bad = [i for i, x in enumerate(flat) if x.is_floating_point() and not bool(torch.isfinite(x).all())]
                if bad:
                    raise ValueError(f"{name}: input(s) of modality {bad} contain NaN/Inf values; clean or impute the "
                                     "data, or find the encoder that produced them")
    return flat


def parameter_dtype(module: torch.nn.Module) -> Optional[torch.dtype]:
    """The dtype of ``module``'s first floating parameter (None without parameters)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def check_number(name: str, value: Any, low: float, *, strict: bool = False, integer: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite number ``> low`` (``strict``) or ``>= low``;
    with ``integer``, an int (not a bool)."""
    kind = "an integer" if integer else "a finite number"
    ok_type = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{name} must be {kind} {'>' if strict else '>='} {low}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (v <= low if strict else v < low):
        raise ValueError(f"{name} must be {kind} {'>' if strict else '>='} {low}, got {value!r}")
