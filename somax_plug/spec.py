"""Records that describe registered components (plain data, never traced).

A :class:`ComponentSpec` is what a plugin hands to the ``register`` callback. It
says what the component is (kind, name, summary), what it offers (``provides``),
what it needs (:class:`Requires`), its default options and cadence, and how to
build it (a *lazy* factory: a callable, or a ``"module:attribute"`` string that is
imported only when the component is first built).

Example:
    >>> from somax_plug.spec import ComponentSpec, Requires
    >>> spec = ComponentSpec(
    ...     kind="solver", name="my_cg", summary="CG with my tweak",
    ...     provides=(), requires=Requires(tags={"psd"}),
    ...     factory="my_pkg.solvers:MyCG", defaults={"maxiter": 50},
    ... )
    >>> spec.qualified_name  # plugin is filled in by the registry
    ':my_cg'
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from somax_plug.kinds import Kind

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def _frozenset(value: Iterable[str] | None) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset({value})
    return frozenset(value)


def _frozen_items(value: Mapping[str, Any] | Iterable[tuple[str, Any]] | None):
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), v) for k, v in items))


def _kind(value: Kind | str) -> Kind:
    try:
        return Kind(value)
    except ValueError:
        kinds = ", ".join(k.value for k in Kind)
        raise ValueError(f"unknown component kind {value!r}; expected one of: {kinds}") from None


def _check_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value) or ":" in value:
        raise ValueError(
            f"invalid component name {value!r}: use letters, digits, '_', '-' or '.', "
            "starting with a letter or '_' (':' is reserved for 'plugin:name')"
        )


@attrs.frozen
class Requires:
    """What a component needs, as data.

    Attributes:
        tags: operator tags the curvature operator must carry (``{"psd"}``).
        statistics: statistics another component must provide (``{"diag"}``).
        resources: per-step resources the planner must compute (``{"grad"}``).
    """

    tags: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)
    statistics: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)
    resources: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)

    def to_dict(self) -> dict[str, list[str]]:
        return {
            "tags": sorted(self.tags),
            "statistics": sorted(self.statistics),
            "resources": sorted(self.resources),
        }

    def is_empty(self) -> bool:
        return not (self.tags or self.statistics or self.resources)


def _requires(value: Requires | Mapping[str, Any] | None) -> Requires:
    if value is None:
        return Requires()
    if isinstance(value, Requires):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"tags", "statistics", "resources"}
        if unknown:
            raise ValueError(
                f"unknown requirement keys {sorted(unknown)}; "
                "expected 'tags', 'statistics' and/or 'resources'"
            )
        return Requires(**value)
    raise TypeError(f"requires must be a Requires or a mapping, got {type(value).__name__}")


@attrs.frozen
class ComponentSpec:
    """A registered component, described as hashable data.

    Attributes:
        kind: one of the five kinds.
        name: short name, unique within its plugin and kind.
        summary: one line for ``somax-plug list``.
        provides: operator tags (curvature) or statistics (estimator) it offers.
        requires: see :class:`Requires`.
        factory: callable ``factory(**options) -> instance`` or ``"module:attr"``.
        defaults: default options, merged under the user's options.
        every_k: default cadence (estimators, preconditioners, damping).
        plugin: the plugin that registered it (filled in by the registry).
    """

    kind: Kind = attrs.field(converter=_kind)
    name: str = attrs.field(validator=_check_name)
    summary: str = attrs.field(default="", converter=str)
    provides: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)
    requires: Requires = attrs.field(factory=Requires, converter=_requires)
    factory: Callable[..., Any] | str | None = attrs.field(default=None, eq=False)
    defaults: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_frozen_items)
    every_k: int = attrs.field(default=1)
    plugin: str = ""

    @every_k.validator
    def _check_every_k(self, attribute: attrs.Attribute, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"every_k must be a positive int, got {value!r}")

    @property
    def qualified_name(self) -> str:
        return f"{self.plugin}:{self.name}"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.defaults)

    def load_factory(self) -> Callable[..., Any]:
        """Resolve the lazy factory (imports its module on first use)."""
        factory = self.factory
        if factory is None:
            raise TypeError(f"component {self.qualified_name!r} has no factory")
        if isinstance(factory, str):
            module_name, _, attr = factory.partition(":")
            if not attr:
                raise ValueError(
                    f"factory {factory!r} of {self.qualified_name!r} must be 'module:attribute'"
                )
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            factory = obj
        if not callable(factory):
            raise TypeError(f"factory of {self.qualified_name!r} is not callable: {factory!r}")
        return factory

    def create(self, **options: Any) -> Any:
        """Build an instance with ``defaults`` overridden by ``options``."""
        merged = {**self.options, **options}
        return self.load_factory()(**merged)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the ``somax-plug list --json`` row)."""
        return {
            "kind": self.kind.value,
            "name": self.name,
            "qualified_name": self.qualified_name,
            "plugin": self.plugin,
            "provides": sorted(self.provides),
            "requires": self.requires.to_dict(),
            "summary": self.summary,
            "defaults": {k: _jsonable(v) for k, v in self.defaults},
            "every_k": self.every_k,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
