"""Modules imported on first use, so that declaring a component does not import JAX.

``somax-plug list`` imports every built-in component class (each class carries its
own declaration) but must stay fast, so the modules that define components import
JAX through :func:`lazy_import`: the name is bound at once, the module is imported
the first time an attribute is read (when a component first runs, inside the
traced step). Pytree classes are registered with JAX the same way: when JAX is
first needed, or when an instance is first built (:func:`register_pytree_class`).

Example:
    >>> from somax_plug import lazy_import
    >>> jnp = lazy_import("jax.numpy")      # nothing imported yet
    >>> float(jnp.sqrt(4.0))                # imports jax.numpy now
    2.0
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_PENDING: list[type] = []


class LazyModule(types.ModuleType):
    """A stand-in for the module ``name``, imported when an attribute is first read."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def _load(self) -> types.ModuleType:
        module = importlib.import_module(self.__dict__["_lazy_target"])
        if _PENDING and "jax" in sys.modules:
            flush_pytree_classes()
        return module

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._load(), attr)
        self.__dict__[attr] = value  # later reads skip __getattr__
        return value

    def __dir__(self) -> list[str]:
        return dir(self._load())

    def __repr__(self) -> str:
        state = "loaded" if self.__dict__["_lazy_target"] in sys.modules else "not loaded"
        return f"<lazy module {self.__dict__['_lazy_target']!r} ({state})>"


def lazy_import(name: str) -> Any:
    """``import name`` deferred to the first attribute access (see the module docstring)."""
    return LazyModule(name)


def register_pytree_class(cls: type) -> type:
    """Register ``cls`` (``tree_flatten`` / ``tree_unflatten``) with JAX when JAX is needed.

    Registered at once when JAX is already imported, else queued and registered by
    :func:`flush_pytree_classes`, which the lazy modules call on first use and
    :class:`~somax_plug.PytreeOperator` calls when an instance is built.
    """
    _PENDING.append(cls)
    if "jax" in sys.modules:
        flush_pytree_classes()
    return cls


def flush_pytree_classes() -> None:
    """Register every queued pytree class with JAX (imports JAX if needed)."""
    if not _PENDING:
        return
    import jax

    while _PENDING:
        jax.tree_util.register_pytree_node_class(_PENDING.pop(0))
