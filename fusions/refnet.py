"""ReFNet: Refiner Fusion Network (Sankaran, Yang, Lim, arXiv 2104.03435) as a fusion wrapper.

``ReFNet(fusion, modality_dims)`` wraps ANY fusion module ``F`` (a module with
``forward(list of (B, d_i)) -> (B, D)`` or a tuple whose element 0 is that tensor). Its forward
returns ``F``'s fused embedding unchanged, so it drops into MultiBench's ``MMDL`` and into our
loops with no other edit. On the side it decodes the fused embedding back to each modality with
one small refiner MLP ``R_i`` per modality (the "defusion" module) and keeps, for the objective
to read (see ``multizoo_ext.objectives.refnet``):

- ``last_fused``:           ``(B, fused_dim)``, the fused embedding of the last forward;
- ``last_reconstructions``: list of ``(B, d_i)`` (or ``(B, input_dims[i])``), ``R_i(fused)``;
- ``last_targets``:         list of ``(B, d_i)``, the flattened unimodal embeddings the fusion
  received (detached when ``detach_targets``); ``None`` with ``target='input'``, whose
  targets (the flattened raw inputs, never seen by the fusion) come from
  :meth:`ReFNet.reconstruction_targets`;
- ``last_fusion_output``:   the inner fusion's whole return value when it was a tuple, else
  ``None`` (MultiBench keeps such a tuple as ``fuseout``).

The refiners are registered submodules (``nn.ModuleList``): they are in ``parameters()``, are
moved by ``.to()``, saved by ``state_dict()`` and trained by any optimiser built on the model
(the reference implementation keeps them in a plain dict, so they are never trained).

Example:
    >>> import torch
    >>> from multizoo_ext.fusions.common_fusions import Concat
    >>> from multizoo_ext.fusions.refnet import ReFNet
    >>> refnet = ReFNet(Concat([5, 7]), modality_dims=[5, 7])
    >>> fused = refnet([torch.randn(4, 5), torch.randn(4, 7)])
    >>> fused.shape, [tuple(r.shape) for r in refnet.last_reconstructions]
    (torch.Size([4, 12]), [(4, 5), (4, 7)])
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from multizoo_ext.registry import Recipe, create_fusion, register_fusion
from multizoo_ext.validation import (check_fusion_inputs, check_input_dims, check_modalities, check_widths,
                                     parameter_dtype)

__all__ = ["ReFNet", "Refiner", "build_refnet", "find_refnet"]

logger = logging.getLogger(__name__)

#: Refiner dropout of the reference implementation (MMF ``refiner`` head).
DEFAULT_REFINER_DROPOUT = 0.1
#: Default of ``detach_targets``: gradients reach the encoders through both the reconstruction
#: and the target (the reference implementation does not detach). See ``ReFNet`` docstring.
DEFAULT_DETACH_TARGETS = False
_TARGETS = ("embedding", "input")


class Refiner(nn.Sequential):
    """One per-modality refiner ``R_i``: ``(B, fused_dim) -> (B, out_dim)``.

    ``Linear(fused_dim, hidden_dim) -> ReLU -> LayerNorm(hidden_dim) -> Dropout(dropout)
    -> Linear(hidden_dim, out_dim)`` (the layer order of the reference refiner head).

    Args:
        fused_dim: width of the fused embedding.
        out_dim: width of the target (unimodal embedding ``d_i`` or flattened raw input).
        hidden_dim: hidden width.
        dropout: dropout probability after the LayerNorm.
    """

    def __init__(self, fused_dim: int, out_dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(fused_dim, hidden_dim),
            nn.ReLU(),
            nn.LayerNorm(hidden_dim),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )
        self.out_dim = int(out_dim)


def _positive_ints(values: Optional[Sequence[int]], what: str) -> List[int]:
    return check_input_dims(values, "ReFNet", what, min_count=1)


class ReFNet(nn.Module):
    """Refiner Fusion Network: wrap a fusion and decode its output back to every modality.

    Args:
        fusion: the inner fusion module, ``forward(list of M tensors (B, d_i)) -> (B, D)`` or a
            tuple whose element 0 is ``(B, D)``. Kept as ``self.fusion`` so other code can
            reach it (e.g. a DEQ fusion's solver statistics via ``refnet.fusion``).
        modality_dims: widths ``d_i`` of the M (flattened) unimodal embeddings the fusion
            receives; checked on every forward.
        fused_dim: width ``D`` of the fused embedding. Default: ``fusion.out_dim``.
        hidden_dim: hidden width of each refiner. Default: ``fused_dim`` (one hidden layer of
            fused width, as in the reference).
        dropout: refiner dropout. Default: 0.1 (reference).
        target: what the refiners reconstruct. ``'embedding'`` (default, the paper): the
            unimodal embeddings ``e_i`` the fusion received, refiner ``i`` outputs ``d_i``.
            ``'input'`` (MultiBench's ``RefNet_objective`` variant): the flattened raw
            inputs; refiner ``i`` outputs ``input_dims[i]``, and the targets are built from
            the raw batch by :meth:`reconstruction_targets` (the objective passes
            MultiBench's ``args['inputs']``).
        input_dims: flattened raw input widths, required with ``target='input'`` (e.g.
            ``[1*28*28, 112*112]``), ignored otherwise.
        detach_targets: stop the gradient through the targets (the unimodal embeddings), so
            the refiner loss reaches the encoders only through the fused embedding. Default:
            False (the reference does not detach). On noisy two-modality digits (5 seeds;
            Concat and LowRank; cosine and mse; supervised on 200 labels, and refiner-only
            pre-training then 10 % labels) the two settings were within one standard
            deviation of each other, except that mse pre-training without detaching shrank
            the fused embeddings a little and scored 0.693 vs 0.715 accuracy: consider
            ``True`` for label-free pre-training with ``mse``. Raw-input targets never carry
            a gradient.
        modality_dropout: probability, per training sample, that ONE modality (drawn
            uniformly) is replaced by zeros in what the inner fusion receives; the targets
            stay the unmasked embeddings (or raw inputs), so that modality's refiner must
            predict it from the others (cross-modal reconstruction). Training mode only; set
            it to 0 before fine-tuning if it should act in pre-training only. Default: 0.0.

    Shapes:
        ``forward([(B, d_1), ..., (B, d_M)]) -> (B, fused_dim)``; inputs ``(B, ...)`` whose
        flattened width is ``d_i`` are accepted as far as the inner fusion accepts them.

    Raises:
        ValueError / TypeError: bad widths, unknown ``target``, missing ``input_dims`` or
        ``fused_dim``; on forward, wrong modality count/widths or a fused width other than
        ``fused_dim``.
    """

    def __init__(self, fusion: nn.Module, modality_dims: Sequence[int], fused_dim: Optional[int] = None,
                 hidden_dim: Optional[int] = None, dropout: float = DEFAULT_REFINER_DROPOUT,
                 target: str = "embedding", input_dims: Optional[Sequence[int]] = None,
                 detach_targets: bool = DEFAULT_DETACH_TARGETS, modality_dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= float(modality_dropout) < 1.0:
            raise ValueError(f"ReFNet: modality_dropout must be in [0, 1), got {modality_dropout}")
        if not isinstance(fusion, nn.Module):
            raise TypeError(f"ReFNet wraps a fusion nn.Module, got {type(fusion).__name__}")
        self.modality_dims = _positive_ints(modality_dims, "modality_dims")
        if target not in _TARGETS:
            raise ValueError(f"ReFNet: target must be one of {_TARGETS}, got {target!r}")
        if fused_dim is None:
            fused_dim = getattr(fusion, "out_dim", None)
            if fused_dim is None:
                raise ValueError(
                    f"ReFNet: {type(fusion).__name__} has no out_dim; pass fused_dim (the width of its output)")
        fused_dim = int(fused_dim)
        if fused_dim <= 0:
            raise ValueError(f"ReFNet: fused_dim must be positive, got {fused_dim}")
        hidden_dim = fused_dim if hidden_dim is None else int(hidden_dim)
        if hidden_dim <= 0:
            raise ValueError(f"ReFNet: hidden_dim must be positive, got {hidden_dim}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"ReFNet: dropout must be in [0, 1), got {dropout}")
        if target == "input":
            if input_dims is None:
                raise ValueError("ReFNet: target='input' needs input_dims, the flattened raw input widths")
            raw_dims: Optional[List[int]] = _positive_ints(input_dims, "input_dims")
            if len(raw_dims) != len(self.modality_dims):
                raise ValueError(f"ReFNet: input_dims has {len(raw_dims)} widths but modality_dims has "
                                 f"{len(self.modality_dims)}")
        else:
            raw_dims = None

        self.fusion = fusion
        self.fused_dim = fused_dim
        self.out_dim = fused_dim
        self.hidden_dim = hidden_dim
        self.target = target
        self.input_dims = raw_dims
        self.detach_targets = bool(detach_targets)
        self.modality_dropout = float(modality_dropout)
        self.target_dims: List[int] = list(raw_dims if raw_dims is not None else self.modality_dims)
        self.refiners = nn.ModuleList(
            Refiner(fused_dim, d, hidden_dim, float(dropout)) for d in self.target_dims)
        self._clear_cache()
        self._pending_step: Optional[Dict[str, bool]] = None  # did the last training step reach the refiners?
        self._warned_untrained = False

    # ------------------------------------------------------------------ state for the objective
    def _clear_cache(self) -> None:
        self.last_fused: Optional[torch.Tensor] = None
        self.last_reconstructions: Optional[List[torch.Tensor]] = None
        self.last_targets: Optional[List[torch.Tensor]] = None
        self.last_fusion_output: Optional[tuple] = None

    def __getstate__(self) -> Dict[str, Any]:
        # Pickling / deepcopy (e.g. MultiBench's torch.save(model)) must not carry the last
        # batch's activations and their autograd graph.
        state = self.__dict__.copy()
        for key in ("last_fused", "last_reconstructions", "last_targets", "last_fusion_output", "_pending_step"):
            state[key] = None
        return state

    # ------------------------------------------------------------------ cannot go half-trained
    def _check_last_step(self) -> None:
        """Warn once when the previous training forward's reconstructions got no gradient: the
        objective ignored the refiners, so they stay at their initial weights."""
        pending, self._pending_step = self._pending_step, None
        if pending is None or pending["reached"] or self._warned_untrained:
            return
        self._warned_untrained = True
        msg = ("ReFNet: a training step ended without gradient reaching the refiners, so they stay untrained "
               "and the fused embedding is not made to keep each modality; train with "
               "multizoo_ext.objectives.refnet_objective(...) (and objective_args_dict={} in MultiBench's train())")
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)

    def _watch(self, reconstructions: Sequence[torch.Tensor]) -> None:
        if not (self.training and torch.is_grad_enabled()):
            return
        tracked = [r for r in reconstructions if r.requires_grad]
        if not tracked:
            return
        pending = {"reached": False}

        def reached(grad: torch.Tensor) -> None:
            pending["reached"] = True

        for r in tracked:
            r.register_hook(reached)
        self._pending_step = pending

    @property
    def num_modalities(self) -> int:
        """Number of modalities M."""
        return len(self.modality_dims)

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        """Fuse with the inner fusion and refine.

        Args:
            inputs: list of M tensors ``(B, d_i)`` (or ``(B, ...)`` flattening to ``d_i``).

        Returns:
            The inner fusion's output ``(B, fused_dim)``, unchanged (element 0 when it
            returned a tuple; the tuple is kept as ``last_fusion_output``).
        """
        self._check_last_step()
        flat = check_fusion_inputs(inputs, "ReFNet", self.modality_dims, parameter_dtype(self.refiners))  # (B, d_i)
        out = self.fusion(self._mask(inputs) if self.training and self.modality_dropout > 0 else inputs)
        if isinstance(out, tuple):
            fused = out[0]
            self.last_fusion_output = out
        else:
            fused = out
            self.last_fusion_output = None
        if not isinstance(fused, torch.Tensor) or fused.dim() != 2 or fused.shape[1] != self.fused_dim:
            got = tuple(fused.shape) if isinstance(fused, torch.Tensor) else type(fused).__name__
            raise ValueError(f"ReFNet was built for a fused output (B, {self.fused_dim}) but "
                             f"{type(self.fusion).__name__} returned {got}; pass the right fused_dim")
        self.last_fused = fused
        self.last_reconstructions = self.refine(fused)
        self._watch(self.last_reconstructions)
        if self.target == "embedding":
            self.last_targets = [t.detach() for t in flat] if self.detach_targets else flat
        else:
            self.last_targets = None
        return fused

    def _mask(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        """Zero one uniformly drawn modality of each sample with probability ``modality_dropout``."""
        b = inputs[0].shape[0]
        which = torch.randint(self.num_modalities, (b,), device=inputs[0].device)  # (B,)
        hit = torch.rand(b, device=inputs[0].device) < self.modality_dropout  # (B,)
        out = []
        for i, x in enumerate(inputs):
            keep = ~(hit & (which == i))  # (B,)
            out.append(x * keep.to(x.dtype).view(-1, *([1] * (x.dim() - 1))))
        return out

    def objective_state(self, batch_size: int, raw_inputs: Optional[Sequence[torch.Tensor]] = None
                        ) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
        """What an objective reads from the last forward: the one accessor objectives use.

        Args:
            batch_size: rows of the batch being scored (``pred.shape[0]``); the cached state
                must be of that batch.
            raw_inputs: the raw batch inputs, needed with ``target='input'``.

        Returns:
            ``(reconstructions, targets, fused)``: M tensors ``(B, target_dims[i])``, M
            targets of the same shapes, and the fused embedding ``(B, fused_dim)``.

        Raises:
            RuntimeError: no forward yet.
            ValueError: the cached state holds another number of rows than ``batch_size``
                (it is from another batch).
        """
        if self.last_reconstructions is None or self.last_fused is None:
            raise RuntimeError("ReFNet has no state yet: run its forward on the batch before the objective")
        rows = int(self.last_fused.shape[0])
        if rows != int(batch_size):
            raise ValueError(f"ReFNet holds the state of a batch of {rows} rows but the batch being scored has "
                             f"{int(batch_size)}: the state is from another batch (run the objective right after "
                             "this batch's forward)")
        return list(self.last_reconstructions), list(self.reconstruction_targets(raw_inputs)), self.last_fused

    def refine(self, fused: torch.Tensor) -> List[torch.Tensor]:
        """Decode a fused embedding with every refiner.

        Args:
            fused: ``(B, fused_dim)``.

        Returns:
            list of M tensors ``(B, target_dims[i])``.
        """
        if not isinstance(fused, torch.Tensor) or fused.dim() != 2 or fused.shape[1] != self.fused_dim:
            got = tuple(fused.shape) if isinstance(fused, torch.Tensor) else type(fused).__name__
            raise ValueError(f"ReFNet.refine expects a fused tensor (B, {self.fused_dim}), got {got}")
        return [r(fused) for r in self.refiners]

    def reconstruction_targets(self, raw_inputs: Optional[Sequence[torch.Tensor]] = None,
                               like: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """The refiner targets of the last forward.

        Args:
            raw_inputs: with ``target='input'``, the raw batch inputs (MultiBench's
                ``args['inputs']``: M tensors ``(B, ...)``, possibly on the CPU and of any
                dtype); flattened to ``(B, input_dims[i])``, cast and moved like ``like``.
                Ignored with ``target='embedding'``.
            like: tensor whose device and floating dtype the targets take. Default: the last
                fused embedding.

        Returns:
            list of M tensors ``(B, target_dims[i])``, without gradient for raw inputs.

        Raises:
            RuntimeError: no forward yet (embedding targets).
            ValueError / TypeError: raw inputs missing, or of the wrong count or widths.
        """
        if self.target == "embedding":
            if self.last_targets is None:
                raise RuntimeError("ReFNet has no targets yet: call forward before the objective")
            return self.last_targets
        if raw_inputs is None:
            raise ValueError("ReFNet(target='input') needs the raw batch inputs (MultiBench's args['inputs']) "
                             "to build its reconstruction targets")
        like = self.last_fused if like is None else like
        check_modalities(list(raw_inputs), self.num_modalities, "ReFNet raw inputs", min_count=1)
        flat = [torch.flatten(x, 1) for x in raw_inputs]  # (B, input_dims[i])
        check_widths(flat, self.input_dims or [], "ReFNet raw inputs")
        if like is None:
            return [x.float() for x in flat]
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return [x.detach().to(device=like.device, dtype=dtype) for x in flat]

    def extra_repr(self) -> str:
        return (f"modality_dims={self.modality_dims}, fused_dim={self.fused_dim}, hidden_dim={self.hidden_dim}, "
                f"target={self.target!r}, input_dims={self.input_dims}, detach_targets={self.detach_targets}, "
                f"modality_dropout={self.modality_dropout}")


def find_refnet(module: Any) -> Optional[ReFNet]:
    """The first :class:`ReFNet` in ``module``: itself, its ``.fuse`` (MultiBench's MMDL), or any
    submodule (depth-first). ``None`` when there is none or ``module`` is not an ``nn.Module``."""
    if isinstance(module, ReFNet):
        return module
    if not isinstance(module, nn.Module):
        return None
    fuse = getattr(module, "fuse", None)
    if isinstance(fuse, ReFNet):
        return fuse
    for sub in module.modules():
        if isinstance(sub, ReFNet):
            return sub
    return None


#: ReFNet trains with its objective: task loss + 0.1 x cosine refiner loss per modality +
#: 0.1 x Multi-Similarity on the fused embedding (the reference's weights; defaults of
#: ``multizoo_ext.objectives.refnet_objective``).
@register_fusion("refnet", recipe=Recipe(objective="refnet"))
def build_refnet(input_dims: Sequence[int], inner: str = "concat", inner_kwargs: Optional[Dict[str, Any]] = None,
                 fused_dim: Optional[int] = None, hidden_dim: Optional[int] = None,
                 dropout: float = DEFAULT_REFINER_DROPOUT, target: str = "embedding",
                 raw_input_dims: Optional[Sequence[int]] = None,
                 detach_targets: bool = DEFAULT_DETACH_TARGETS, modality_dropout: float = 0.0) -> ReFNet:
    """Registry builder: ``create_fusion("refnet", input_dims=[5, 7], inner="lowrank")``.

    Args:
        input_dims: widths of the M encoder outputs (the registry convention; these are
            ReFNet's ``modality_dims``).
        inner: name of any registered fusion, built as
            ``create_fusion(inner, input_dims=input_dims, **inner_kwargs)``. Default: "concat".
        inner_kwargs: extra arguments for the inner fusion. Default: none.
        raw_input_dims: flattened raw input widths for ``target='input'`` (ReFNet's
            ``input_dims``).
        fused_dim, hidden_dim, dropout, target, detach_targets, modality_dropout: as in
            :class:`ReFNet`.
    """
    dims = _positive_ints(input_dims, "input_dims")
    fusion = create_fusion(inner, input_dims=dims, **dict(inner_kwargs or {}))
    return ReFNet(fusion, dims, fused_dim=fused_dim, hidden_dim=hidden_dim, dropout=dropout, target=target,
                  input_dims=raw_input_dims, detach_targets=detach_targets,
                  modality_dropout=modality_dropout)
