"""The ONE builder: dataset layout + method name + overrides -> encoders, fusion, head,
objective and learning-rate multiplier, following the method's registered
:class:`~multizoo_ext.registry.Recipe`. The CLI, the benchmark runner and the examples all
call :func:`build_method`, so one name means one method everywhere.

Example:
    >>> spec = infer_data_spec(train_loader)                                # doctest: +SKIP
    >>> m = build_method(spec, "deq")                                       # doctest: +SKIP
    >>> train(m.encoders, m.fusion, m.head, train_loader, valid_loader, 20,
    ...       **m.train_kwargs())                                           # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from multizoo_ext.registry import FUSIONS, OBJECTIVES, create_dataset, create_encoder, create_fusion, create_objective
from multizoo_ext.utils import seed_everything
from multizoo_ext.validation import check_number
from multizoo_ext.tasks import default_criterion


@dataclass
class DataSpec:
    """What a model needs to know about a dataset.

    Attributes:
        input_shapes: per-modality sample shape (without the batch dimension).
        task: "classification", "multilabel" or "regression".
        n_out: head outputs (classes, labels, or regression targets).
    """

    input_shapes: List[Tuple[int, ...]]
    task: str
    n_out: int

    @property
    def input_dims(self) -> List[int]:
        """Flattened width of each modality."""
        return [math.prod(s) for s in self.input_shapes]


def infer_data_spec(loader: Iterable, task: Optional[str] = None) -> DataSpec:
    """Read modality shapes from the first batch and the task / output count from the labels
    (one pass over ``loader``'s labels for classification).

    Task inference when ``task`` is None: 2-D 0/1 labels with more than one column ->
    multilabel; non-integer floats -> regression; otherwise classification.
    """
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("cannot infer the data layout from an empty dataloader") from None
    shapes = [tuple(x.shape[1:]) for x in first[:-1]]
    y = first[-1]
    if task is None:
        if y.dim() == 2 and y.shape[1] > 1 and bool(((y == 0) | (y == 1)).all()):
            task = "multilabel"
        elif y.is_floating_point() and not torch.equal(y, y.round()):
            task = "regression"
        else:
            task = "classification"
    if task == "multilabel":
        n_out = int(y.shape[1])
    elif task == "regression":
        n_out = int(y[0].numel())
    else:
        top = int(y.max())
        for batch in it:
            top = max(top, int(batch[-1].max()))
        n_out = max(top + 1, 2)
    return DataSpec(shapes, task, n_out)


class Flatten(nn.Module):
    """``(B, ...) -> (B, prod(...))``, with ``out_dim`` set."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


#: Encoder, widths and head the builder uses unless told otherwise (the CLI and the runner
#: read these, so a default lives here only).
DEFAULT_ENCODER = "mlp"
DEFAULT_HIDDEN = 64
DEFAULT_EMBED_DIM = 32
#: Encoders :func:`build_encoders` can size from a dataset's layout alone.
ENCODER_CHOICES = ("mlp", "maxout_mlp", "identity")
#: ``objective=`` value that asks for the task's plain criterion whatever the recipe says.
PLAIN_OBJECTIVE = "default"


def build_encoders(spec: DataSpec, encoder: str = DEFAULT_ENCODER, hidden: int = DEFAULT_HIDDEN,
                   embed_dim: int = DEFAULT_EMBED_DIM) -> List[nn.Module]:
    """One encoder per modality: "mlp" (flatten -> MLP(d, hidden, embed_dim)), "maxout_mlp"
    (flatten -> MaxOut_MLP(embed_dim, hidden, d), MultiBench's MM-IMDB encoder) or "identity"
    (flatten only)."""
    if encoder not in ENCODER_CHOICES:
        raise ValueError(f"encoder must be one of {ENCODER_CHOICES}, got {encoder!r}")
    check_number("hidden", hidden, 1, integer=True)
    check_number("embed_dim", embed_dim, 1, integer=True)
    encs: List[nn.Module] = []
    for d in spec.input_dims:
        if encoder == "identity":
            encs.append(Flatten(d))
        else:
            if encoder == "maxout_mlp":
                mod = create_encoder(encoder, num_outputs=embed_dim, first_hidden=hidden, number_input_feats=d)
            else:
                mod = create_encoder(encoder, indim=d, hiddim=hidden, outdim=embed_dim)
            seq = nn.Sequential(Flatten(d), mod)
            seq.out_dim = mod.out_dim  # type: ignore[attr-defined]
            encs.append(seq)
    return encs


def build_model(spec: DataSpec, fusion: str = "concat", encoder: str = DEFAULT_ENCODER, hidden: int = DEFAULT_HIDDEN,
                embed_dim: int = DEFAULT_EMBED_DIM, fusion_kwargs: Optional[Dict[str, Any]] = None,
                head_hidden: Optional[int] = None) -> Tuple[List[nn.Module], nn.Module, nn.Module]:
    """Encoders, fusion (from the registry, built with the encoders' widths) and a head
    (Linear, or an MLP when ``head_hidden`` is given) sized for ``spec``."""
    encoders = build_encoders(spec, encoder, hidden, embed_dim)
    dims = [int(e.out_dim) for e in encoders]  # type: ignore[attr-defined]
    fuse = create_fusion(fusion, input_dims=dims, **(fusion_kwargs or {}))
    out_dim = getattr(fuse, "out_dim", None)
    if out_dim is None:
        raise ValueError(f"fusion {fusion!r} does not expose out_dim, so the head cannot be sized")
    if head_hidden:
        head: nn.Module = nn.Sequential(nn.Linear(out_dim, head_hidden), nn.ReLU(), nn.Linear(head_hidden, spec.n_out))
    else:
        head = nn.Linear(out_dim, spec.n_out)
    return encoders, fuse, head


def default_objective(task: str) -> nn.Module:
    """CrossEntropy / BCEWithLogits / MSE for classification / multilabel / regression
    (alias of :func:`multizoo_ext.tasks.default_criterion`)."""
    return default_criterion(task)


@dataclass
class Method:
    """Everything one training run of a method needs, built by :func:`build_method`.

    Attributes:
        name: the fusion's registry name.
        encoders, fusion, head: the modules (MultiBench's ``train(encoders, fusion, head, ...)``).
        objective: a plain criterion ``(pred, truth)`` or a MultiBench objective
            ``(pred, truth, args)``.
        objective_args_dict: ``{}`` for a MultiBench objective (which reads the model from it),
            None for a plain criterion.
        fusion_lr_mult: learning-rate multiplier of the fusion's parameters.
        settings: JSON-able record of every choice (spec, fusion and its effective keywords,
            objective and its keywords, multiplier, encoder and widths, head): what
            :func:`rebuild_method` needs to build the same modules again.
    """

    name: str
    encoders: List[nn.Module]
    fusion: nn.Module
    head: nn.Module
    objective: Callable[..., torch.Tensor]
    objective_args_dict: Optional[Dict[str, Any]]
    fusion_lr_mult: float
    settings: Dict[str, Any] = field(default_factory=dict)

    def train_kwargs(self) -> Dict[str, Any]:
        """The method's keywords for ``train()``: objective, its args dict, the multiplier."""
        return {"objective": self.objective, "objective_args_dict": self.objective_args_dict,
                "fusion_lr_mult": self.fusion_lr_mult}


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_objective(task: str, objective: Optional[str] = None,
                    objective_kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[Callable[..., torch.Tensor], bool]:
    """The objective named ``objective`` for ``task``: ``"default"`` or None = the task's plain
    criterion; any other name = ``create_objective(name, task=task, **objective_kwargs)``
    (``task`` passed when the factory takes it). Returns ``(objective, needs_args)``."""
    if objective is None or str(objective).lower() == PLAIN_OBJECTIVE:
        if objective_kwargs:
            raise ValueError(f"objective keywords {sorted(objective_kwargs)} given for the task's plain criterion; "
                             "name an objective to pass keywords to")
        return default_objective(task), False
    factory = OBJECTIVES.get(objective)
    kwargs = dict(objective_kwargs or {})
    if _accepts(factory, "task"):
        kwargs.setdefault("task", task)
    return create_objective(objective, **kwargs), True


def build_method(spec: DataSpec, fusion: str, *, encoder: str = DEFAULT_ENCODER, hidden: int = DEFAULT_HIDDEN,
                 embed_dim: int = DEFAULT_EMBED_DIM, head_hidden: Optional[int] = None,
                 fusion_kwargs: Optional[Mapping[str, Any]] = None, objective: Optional[str] = None,
                 objective_kwargs: Optional[Mapping[str, Any]] = None,
                 fusion_lr_mult: Optional[float] = None) -> Method:
    """Build a method as its registered recipe trains it, with the caller's overrides on top.

    Args:
        spec: the dataset's layout (:func:`infer_data_spec`).
        fusion: registered fusion name.
        encoder, hidden, embed_dim, head_hidden: encoders and head (see :func:`build_model`).
        fusion_kwargs: constructor keywords over the recipe's (None values are passed as given).
        objective: objective registry name; None = the recipe's; ``"default"`` = the task's
            plain criterion.
        objective_kwargs: keywords for the objective factory, over the recipe's when the
            objective is the recipe's.
        fusion_lr_mult: None = the recipe's; else a finite number > 0.

    Raises:
        ValueError: unknown names, keywords a constructor / factory does not take, a bad
            multiplier or width.
    """
    recipe = FUSIONS.recipe(fusion)
    name = str(fusion).lower()
    kwargs = {**recipe.fusion_kwargs, **dict(fusion_kwargs or {})}
    obj_name = recipe.objective if objective is None else str(objective).lower()
    if obj_name is not None and obj_name == PLAIN_OBJECTIVE:
        obj_name = None
    obj_kwargs = dict(recipe.objective_kwargs) if obj_name == recipe.objective and obj_name is not None else {}
    obj_kwargs.update(objective_kwargs or {})
    mult = recipe.fusion_lr_mult if fusion_lr_mult is None else fusion_lr_mult
    check_number("fusion_lr_mult", mult, 0, strict=True)
    if head_hidden is not None and (isinstance(head_hidden, bool) or not isinstance(head_hidden, int)
                                    or head_hidden < 1):
        raise ValueError(f"head_hidden must be None or an integer >= 1, got {head_hidden!r}")
    encoders, fuse, head = build_model(spec, name, encoder, hidden, embed_dim, kwargs, head_hidden)
    crit, needs_args = build_objective(spec.task, obj_name, obj_kwargs)
    settings = {
        "fusion": name, "fusion_kwargs": kwargs, "objective": obj_name or PLAIN_OBJECTIVE,
        "objective_kwargs": obj_kwargs, "fusion_lr_mult": float(mult), "encoder": encoder, "hidden": hidden,
        "embed_dim": embed_dim, "head_hidden": head_hidden,
        "spec": {"input_shapes": [list(s) for s in spec.input_shapes], "task": spec.task, "n_out": spec.n_out},
    }
    return Method(name, encoders, fuse, head, crit, {} if needs_args else None, float(mult), settings)


def rebuild_method(settings: Mapping[str, Any]) -> Method:
    """Build again the method :attr:`Method.settings` records (fresh weights: load a
    checkpoint into ``MMDL(m.encoders, m.fusion, m.head)`` afterwards)."""
    try:
        spec_d = settings["spec"]
        spec = DataSpec([tuple(int(v) for v in s) for s in spec_d["input_shapes"]], spec_d["task"], int(spec_d["n_out"]))
        return build_method(spec, settings["fusion"], encoder=settings["encoder"], hidden=settings["hidden"],
                            embed_dim=settings["embed_dim"], head_hidden=settings.get("head_hidden"),
                            fusion_kwargs=settings.get("fusion_kwargs"), objective=settings.get("objective"),
                            objective_kwargs=settings.get("objective_kwargs"),
                            fusion_lr_mult=settings.get("fusion_lr_mult"))
    except KeyError as exc:
        raise ValueError(f"method settings lack {exc.args[0]!r}; expected the dict Method.settings records") from None


# The order of seeding that makes a run depend on its settings alone. The CLI's ``train`` and
# the benchmark runner both follow it, so the same seed and settings give the same numbers:
#   layout = infer_data_spec(seeded_loaders(...)[0])    # a pass over a throw-away loader
#   method = seeded_method(layout, ...)                 # initial weights from the seed
#   loaders = seeded_loaders(...)                       # a fresh shuffle order from the seed
def seeded_loaders(dataset: str, seed: int, batch_size: int, **data_kwargs: Any) -> Tuple[Any, Any, Any]:
    """Fresh ``(train, valid, test)`` loaders of a registered dataset, the global RNGs seeded
    with ``seed`` first (a new shuffle generator each call: a run never continues another
    run's data order)."""
    seed_everything(seed)
    return create_dataset(dataset, batch_size=batch_size, seed=seed, **data_kwargs)


def seeded_method(spec: DataSpec, fusion: str, seed: int, **kwargs: Any) -> Method:
    """:func:`build_method` with the global RNGs seeded with ``seed`` first (repeatable
    initial weights)."""
    seed_everything(seed)
    return build_method(spec, fusion, **kwargs)
