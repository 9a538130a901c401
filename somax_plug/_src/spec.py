"""Records that describe registered components (plain data, never traced).

A :class:`ComponentSpec` is what the registry stores for a component: what it is
(kind, name, summary), what it offers (``provides``), what it needs
(:class:`Requires`), its declared options (:class:`~somax_plug.Option`), its
default cadence and whether it honours one, and how to build it.

A component declares all of this **once, on its class**, with :func:`declare`;
``register(MyClass)`` then registers it, and ``somax-plug list``, ``show``, the
docs tables, the planner and the conformance kit all read the same record. A
plugin that wants its module imported only when the component is first built can
register a spec by hand with a lazy ``"module:attribute"`` factory (and check it
against the class with the kit, see the plugin guide).

Example:
    >>> import attrs
    >>> from somax_plug import Solver, declare, option
    >>> @declare("my_cg", summary="CG with my tweak", requires={"tags": {"psd"}},
    ...          preconditioned=True)
    ... @attrs.frozen
    ... class MyCG(Solver):
    ...     maxiter: int = option(50, ge=1)
    ...     def solve(self, op, rhs, lam, precond, stats, state): ...
    >>> spec = MyCG.__somax_spec__
    >>> spec.kind.value, spec.defaults, sorted(spec.requires.tags)
    ('solver', (('maxiter', 50),), ['psd'])
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from somax_plug._src.kinds import Kind, kind_of
from somax_plug._src.options import (
    Option,
    check_options,
    class_options,
    options_from_defaults,
)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
REQUIREMENT_KEYS = ("tags", "statistics", "resources", "losses")


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
        losses: the loss names it works with (empty: any loss).
    """

    tags: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)
    statistics: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)
    resources: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)
    losses: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)

    def to_dict(self) -> dict[str, list[str]]:
        return {key: sorted(getattr(self, key)) for key in REQUIREMENT_KEYS}

    def is_empty(self) -> bool:
        return not any(getattr(self, key) for key in REQUIREMENT_KEYS)


def as_requires(value: Requires | Mapping[str, Any] | None) -> Requires:
    """A :class:`Requires` from itself, a mapping of its fields, or None."""
    if value is None:
        return Requires()
    if isinstance(value, Requires):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - set(REQUIREMENT_KEYS)
        if unknown:
            raise ValueError(
                f"unknown requirement keys {sorted(unknown)}; expected some of "
                + ", ".join(repr(k) for k in REQUIREMENT_KEYS)
            )
        return Requires(**value)
    raise TypeError(f"requires must be a Requires or a mapping, got {type(value).__name__}")


def _options(value: Iterable[Option] | None) -> tuple[Option, ...]:
    options = tuple(value or ())
    for o in options:
        if not isinstance(o, Option):
            raise TypeError(f"options must be somax_plug.Option records, got {o!r}")
    return options


@attrs.frozen
class ComponentSpec:
    """A registered component, described as hashable data.

    Attributes:
        kind: one of the five kinds.
        name: short name, unique within its plugin and kind.
        summary: one line for ``somax-plug list``.
        provides: operator tags (curvature) or statistics (estimator) it offers.
        requires: see :class:`Requires` (for the default options).
        factory: callable ``factory(**options) -> instance`` or ``"module:attr"``.
        options: the declared options (:class:`~somax_plug.Option`); a spec built
            with ``defaults={...}`` infers them from the default values.
        every_k: default cadence.
        cadence: whether it honours ``every_k > 1`` (None: what its kind says).
        preconditioned: a solver that applies the composition's preconditioner.
        requires_for: ``requires_for(options) -> Requires`` when the requirements
            depend on the options (``cg`` needs ``psd`` without its guard).
        hints: ``(missing tag, advice)`` pairs added to an unmet-requirement error.
        plugin: the plugin that registered it (filled in by the registry).
    """

    kind: Kind = attrs.field(converter=_kind)
    name: str = attrs.field(validator=_check_name)
    summary: str = attrs.field(default="", converter=str)
    provides: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)
    requires: Requires = attrs.field(factory=Requires, converter=as_requires)
    factory: Callable[..., Any] | str | None = attrs.field(default=None, eq=False)
    options: tuple[Option, ...] = attrs.field(default=(), converter=_options)
    defaults: Any = attrs.field(default=None, eq=False, repr=False)
    every_k: int = attrs.field(default=1)
    cadence: bool | None = None
    preconditioned: bool = False
    requires_for: Callable[[Mapping[str, Any]], Any] | None = attrs.field(
        default=None, eq=False, repr=False
    )
    hints: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_frozen_items)
    plugin: str = ""

    def __attrs_post_init__(self) -> None:
        # ``defaults={...}`` is the short form of untyped options; afterwards
        # ``defaults`` is always derived from ``options`` (one fact, one place).
        given = self.defaults
        if isinstance(given, Mapping | tuple | list) and given and not self.options:
            object.__setattr__(self, "options", options_from_defaults(dict(given)))
        defaults = tuple((o.name, o.default) for o in self.options if not o.required)
        object.__setattr__(self, "defaults", defaults)
        for o in self.options:
            if not o.required:
                o.check(self._owner(), o.default)
        from somax_plug._src.kinds import KIND_BASES

        if self.cadence and not KIND_BASES[self.kind].cadence:
            raise ValueError(
                f"{self._owner()} declares cadence=True, but the step runs every "
                f"{self.kind.value} every step (the kind has no cadence); remove cadence="
            )

    @every_k.validator
    def _check_every_k(self, attribute: attrs.Attribute, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"every_k must be a positive int, got {value!r}")

    # ----------------------------------------------------------------- reading
    @property
    def qualified_name(self) -> str:
        return f"{self.plugin}:{self.name}"

    @property
    def label(self) -> str:
        """``kind 'plugin:name'`` for messages."""
        return f"{self.kind.value} {self.qualified_name if self.plugin else self.name!r}"

    @property
    def honours_cadence(self) -> bool:
        """Whether ``every_k > 1`` means something for this component."""
        if self.cadence is not None:
            return self.cadence
        from somax_plug._src.kinds import KIND_BASES

        return bool(KIND_BASES[self.kind].cadence)

    def check_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The user's options checked against the declared ones (see :class:`Option`)."""
        return check_options(self._owner(), self.options, given)

    def _owner(self) -> str:
        name = self.qualified_name if self.plugin else self.name
        return f"{self.kind.value} {name!r}"

    def requirements(self, options: Mapping[str, Any] | None = None) -> Requires:
        """The requirements for ``options`` (merged over the defaults)."""
        if self.requires_for is None:
            return self.requires
        return as_requires(self.requires_for({**dict(self.defaults), **dict(options or {})}))

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
        """Build an instance with the defaults overridden by the (checked) ``options``."""
        merged = {**dict(self.defaults), **self.check_options(options)}
        return self.load_factory()(**merged)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the ``somax-plug list --json`` row)."""
        from somax_plug._src.options import _jsonable

        return {
            "kind": self.kind.value,
            "name": self.name,
            "qualified_name": self.qualified_name,
            "plugin": self.plugin,
            "provides": sorted(self.provides),
            "requires": self.requires.to_dict(),
            "summary": self.summary,
            "defaults": {k: _jsonable(v) for k, v in self.defaults},
            "options": [o.to_dict() for o in self.options],
            "every_k": self.every_k,
            "cadence": self.honours_cadence,
            "preconditioned": self.preconditioned,
        }


def declare(
    name: str,
    *,
    summary: str = "",
    provides: Iterable[str] = (),
    requires: Requires | Mapping[str, Any] | Callable[[Mapping[str, Any]], Any] | None = None,
    every_k: int = 1,
    cadence: bool | None = None,
    preconditioned: bool = False,
    hints: Mapping[str, str] | None = None,
) -> Callable[[type], type]:
    """Declare a component on its class: the one place its facts are written.

    The kind comes from the base class (:class:`~somax_plug.Solver`, ...), the options
    from the attrs fields (see :func:`~somax_plug.option`), everything else from the
    arguments. ``requires`` may be a function of the options. The record is stored as
    ``cls.__somax_spec__``; ``register(cls)`` registers it.
    """

    def wrap(cls: type) -> type:
        kind = kind_of(cls)
        if kind is None:
            raise TypeError(
                f"@declare({name!r}): {cls.__name__} must subclass one of somax_plug.Curvature, "
                "Estimator, Solver, Preconditioner or Damping"
            )
        requires_for = requires if callable(requires) else None
        options = class_options(cls)
        defaults = {o.name: o.default for o in options if not o.required}
        base = as_requires(requires_for(defaults) if requires_for else requires)
        cls.__somax_spec__ = ComponentSpec(
            kind=kind,
            name=name,
            summary=summary or (cls.__doc__ or "").strip().split("\n")[0],
            provides=provides,
            requires=base,
            factory=cls,
            options=options,
            every_k=every_k,
            cadence=cadence,
            preconditioned=preconditioned,
            requires_for=requires_for,
            hints=hints,
        )
        return cls

    return wrap


def spec_of(obj: Any) -> ComponentSpec | None:
    """The declared spec of a class or instance (None when it declares none).

    A subclass of a declared class without a declaration of its own (a test double,
    a tweak) has its parent's requirements; it cannot be registered under that name.
    """
    cls = obj if isinstance(obj, type) else type(obj)
    spec = getattr(cls, "__somax_spec__", None)
    return spec if isinstance(spec, ComponentSpec) else None


def own_spec(cls: type) -> ComponentSpec | None:
    """The spec ``cls`` declares itself (not one inherited from a declared parent)."""
    spec = cls.__dict__.get("__somax_spec__")
    return spec if isinstance(spec, ComponentSpec) else None


def declared_in(module: Any) -> list[ComponentSpec]:
    """Specs of the classes a module declares, in definition order."""
    return [
        spec
        for value in vars(module).values()
        if isinstance(value, type)
        and value.__module__ == module.__name__
        and (spec := own_spec(value)) is not None
    ]


def instance_options(instance: Any) -> dict[str, Any]:
    """The option values of a declared instance (its attrs fields)."""
    spec = spec_of(instance)
    if spec is None:
        return {}
    return {o.name: getattr(instance, o.name) for o in spec.options if hasattr(instance, o.name)}


def requirements_of(component: Any) -> Requires:
    """What a declared class or instance requires (for an instance, at its options).

    Example:
        >>> from somax_plug import requirements_of
        >>> from somax_plug.builtin.solvers import CG
        >>> sorted(requirements_of(CG(negative_curvature="none")).tags)
        ['psd']
    """
    spec = spec_of(component)
    if spec is None:
        raise TypeError(f"{component!r} declares no component (see somax_plug.declare)")
    if isinstance(component, type):
        return spec.requires
    return spec.requirements(instance_options(component))
