"""One small registry per kind of component (timm-style).

Components register themselves with a decorator; the CLI and the benchmark runner read
their choices from here, so a newly registered fusion shows up in ``--fusion`` with no
edit to the CLI.

Example:
    >>> from multizoo_ext import create_fusion
    >>> fusion = create_fusion("concat", input_dims=[4, 6])
    >>> fusion.out_dim
    10
"""
from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, TypeVar

logger = logging.getLogger(__name__)

from multizoo_ext.validation import check_number

T = TypeVar("T", bound=Callable[..., Any])


@dataclass(frozen=True)
class Recipe:
    """How a registered fusion is trained: registered beside the fusion (as timm registers a
    model's default config beside the model) and read by ONE builder,
    :func:`multizoo_ext.builder.build_method`, which the CLI, the benchmark runner and the
    examples share. Constructor defaults live in the fusion's own signature; the recipe holds
    only what the constructor cannot: the objective and the learning rate.

    Attributes:
        objective: name of the objective factory in the objective registry the method trains
            with (called as ``create_objective(name, task=task, **objective_kwargs)``); None:
            the task's plain criterion (cross-entropy, BCE-with-logits or MSE).
        objective_kwargs: keywords for that factory beyond its own defaults.
        fusion_kwargs: constructor keywords the method trains with, when they differ from the
            constructor's defaults (normally empty: the constructor's defaults are the recipe).
        fusion_lr_mult: learning-rate multiplier of the fusion's parameters.
    """

    objective: Optional[str] = None
    objective_kwargs: Mapping[str, Any] = field(default_factory=dict)
    fusion_kwargs: Mapping[str, Any] = field(default_factory=dict)
    fusion_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        check_number("Recipe.fusion_lr_mult", self.fusion_lr_mult, 0, strict=True)
        object.__setattr__(self, "objective_kwargs", dict(self.objective_kwargs))
        object.__setattr__(self, "fusion_kwargs", dict(self.fusion_kwargs))


#: The recipe of a fusion registered without one: the task's plain criterion, full learning rate.
PLAIN_RECIPE = Recipe()


class Registry:
    """A name -> builder mapping for one kind of component.

    Args:
        kind: what is registered ("fusion", "encoder", ...), used in error messages.
        populate: module imported before the first lookup, so that its ``register_*``
            decorators have run (e.g. ``"multizoo_ext.fusions"``).
    """

    def __init__(self, kind: str, populate: Optional[str] = None) -> None:
        self.kind = kind
        self._populate = populate
        self._populated = populate is None
        self._entries: Dict[str, Callable[..., Any]] = {}
        self._recipes: Dict[str, Recipe] = {}

    def _ensure_populated(self) -> None:
        if not self._populated:
            importlib.import_module(self._populate)  # type: ignore[arg-type]  (errors propagate)
            self._populated = True

    def register(self, name: Optional[str] = None, recipe: Optional[Recipe] = None) -> Callable[[T], T]:
        """Decorator registering a class or builder function under ``name``, with the
        method's training :class:`Recipe` (fusions only; None = :data:`PLAIN_RECIPE`).

        Re-registering a name replaces the old entry with a warning.
        """
        if recipe is not None and not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be a multizoo_ext.registry.Recipe, got {type(recipe).__name__}")

        def decorator(obj: T) -> T:
            key = (name or obj.__name__).lower()
            if key in self._entries and self._entries[key] is not obj:
                logger.warning("%s %r was registered twice; the later one wins", self.kind, key)
            self._entries[key] = obj
            self._recipes[key] = recipe or PLAIN_RECIPE
            return obj

        return decorator

    def names(self) -> List[str]:
        """Sorted list of registered names."""
        self._ensure_populated()
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., Any]:
        """The registered builder for ``name``.

        Raises:
            ValueError: unknown name; the message lists the known ones.
        """
        self._ensure_populated()
        key = str(name).lower()
        if key not in self._entries:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise ValueError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {known}. "
                f"Register a new one with @register_{self.kind}('name')."
            )
        return self._entries[key]

    def recipe(self, name: str) -> Recipe:
        """The training recipe registered with ``name`` (ValueError for an unknown name)."""
        self.get(name)
        return self._recipes[str(name).lower()]

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build ``name`` with ``kwargs``, every keyword passed through as given (``None`` is a
        value: ``DEQFusion(implicit_max_residual=None)`` means "never"). Leaving out options
        the user did not set is the caller's job (the CLI does it).

        Raises:
            ValueError: unknown name, or a keyword the builder does not take (the message
                lists the ones it does).
        """
        builder = self.get(name)
        _check_keywords(builder, kwargs, f"{self.kind} {name!r}")
        return builder(**kwargs)

    def __contains__(self, name: str) -> bool:
        self._ensure_populated()
        return str(name).lower() in self._entries


def _check_keywords(builder: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> None:
    """ValueError naming the accepted keywords when ``kwargs`` holds one ``builder`` does not take."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                         inspect.Parameter.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ValueError(f"{what} takes no argument {', '.join(map(repr, unknown))}; "
                         f"valid arguments: {', '.join(names)}")


FUSIONS = Registry("fusion", "multizoo_ext.fusions")
ENCODERS = Registry("encoder", "multizoo_ext.unimodals")
OBJECTIVES = Registry("objective", "multizoo_ext.objectives")
DATASETS = Registry("dataset", "multizoo_ext.datasets")

register_fusion = FUSIONS.register
create_fusion = FUSIONS.create
list_fusions = FUSIONS.names
get_recipe = FUSIONS.recipe

register_encoder = ENCODERS.register
create_encoder = ENCODERS.create
list_encoders = ENCODERS.names

register_objective = OBJECTIVES.register
create_objective = OBJECTIVES.create
list_objectives = OBJECTIVES.names

register_dataset = DATASETS.register
create_dataset = DATASETS.create
list_datasets = DATASETS.names
