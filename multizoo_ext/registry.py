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
import logging
from typing import Any, Callable, Dict, List, Optional, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=Callable[..., Any])


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

    def _ensure_populated(self) -> None:
        if not self._populated:
            importlib.import_module(self._populate)  # type: ignore[arg-type]  (errors propagate)
            self._populated = True

    def register(self, name: Optional[str] = None) -> Callable[[T], T]:
        """Decorator registering a class or builder function under ``name``.

        Re-registering a name replaces the old entry with a warning.
        """

        def decorator(obj: T) -> T:
            key = (name or obj.__name__).lower()
            if key in self._entries and self._entries[key] is not obj:
                logger.warning("%s %r was registered twice; the later one wins", self.kind, key)
            self._entries[key] = obj
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

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build ``name`` with ``kwargs``; kwargs left at ``None`` are dropped so the
        builder's own default applies (a CLI flag that was not given)."""
        builder = self.get(name)
        return builder(**{k: v for k, v in kwargs.items() if v is not None})

    def __contains__(self, name: str) -> bool:
        self._ensure_populated()
        return str(name).lower() in self._entries


FUSIONS = Registry("fusion", "multizoo_ext.fusions")
ENCODERS = Registry("encoder", "multizoo_ext.unimodals")
OBJECTIVES = Registry("objective", "multizoo_ext.objectives")
DATASETS = Registry("dataset", "multizoo_ext.datasets")

register_fusion = FUSIONS.register
create_fusion = FUSIONS.create
list_fusions = FUSIONS.names

register_encoder = ENCODERS.register
create_encoder = ENCODERS.create
list_encoders = ENCODERS.names

register_objective = OBJECTIVES.register
create_objective = OBJECTIVES.create
list_objectives = OBJECTIVES.names

register_dataset = DATASETS.register
create_dataset = DATASETS.create
list_datasets = DATASETS.names
