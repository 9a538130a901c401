"""Resolution: one component reference -> a :class:`~somax_plug.PlannedComponent`.

The one function that turns what a user or a test names (a registry name with
options, a spec, or a ready instance) into a built component with its declared
requirements. The planner and the conformance kit both call :func:`resolve`, so
the kit checks exactly what the planner does.

Rules, in order:

1. A registry name (short or qualified) is looked up; its options are checked
   against the declared ones (:class:`~somax_plug.Option`) and the instance is
   built with the defaults overridden by them.
2. An instance of a declared class (``@declare``) carries its class's record; its
   option values are read from its fields (so ``requires_for`` sees them).
3. An undeclared instance may declare ``requires`` (a :class:`~somax_plug.Requires`),
   ``provides`` (or, for an operator-like curvature, ``tags``) and ``every_k`` as
   attributes; it is named ``instance:ClassName``.
4. The cadence: the reference's ``every_k``, else the instance's or the spec's
   default. ``every_k > 1`` on a component that does not honour a cadence is an
   error (it would be printed by ``plan.explain()`` and then ignored).

Every failure is a :class:`~somax_plug.CompositionError` (an
:class:`~somax_plug.OptionError` for options) that names the component.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any

from somax_plug._src.composition import ComponentRef
from somax_plug._src.errors import CompositionError, RegistryError, SomaxPlugError
from somax_plug._src.kinds import KIND_BASES, PSD, SYMMETRIC, Kind
from somax_plug._src.plan import PlannedComponent
from somax_plug._src.spec import ComponentSpec, Requires, instance_options, spec_of

IMPLIED_TAGS = {PSD: {SYMMETRIC}}


def close_tags(tags: frozenset[str]) -> frozenset[str]:
    """Tags with their implications (``psd`` implies ``symmetric``)."""
    out = set(tags)
    for tag in tags:
        out |= IMPLIED_TAGS.get(tag, set())
    return frozenset(out)


def lookup(ref: ComponentRef, role: str, registry: Any) -> ComponentSpec:
    """The registry record a named reference points to (errors name the role)."""
    try:
        return registry.get(ref.kind, ref.name)
    except RegistryError as exc:
        raise CompositionError(f"{role}: {exc}") from None


def _origin(spec: ComponentSpec) -> str:
    plugin = f" (plugin {spec.plugin!r})" if spec.plugin and spec.plugin != "user" else ""
    return f"{spec.kind.value} {spec.qualified_name!r}{plugin}"


def _raised(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def build(spec: ComponentSpec, options: Mapping[str, Any], role: str) -> Any:
    """Build ``spec`` with checked ``options``; any failure names the component.

    Whatever the factory raises (``SystemExit`` included) becomes a
    :class:`~somax_plug.CompositionError` naming the role, the component, its plugin
    and the original exception; a lazy ``"module:attribute"`` factory that cannot be
    imported says so. Only ``KeyboardInterrupt`` passes through.
    """
    checked = spec.check_options(dict(options))  # OptionError names the option
    try:
        factory = spec.load_factory()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise CompositionError(
            f"{role} {_origin(spec)}: its factory {spec.factory!r} cannot be loaded: "
            f"{_raised(exc)}; the plugin registered a factory that does not exist (reinstall "
            "or fix the plugin, or choose another component)"
        ) from exc
    try:
        return factory(**{**dict(spec.defaults), **checked})
    except SomaxPlugError:
        raise
    except (TypeError, ValueError) as exc:
        declared = "; ".join(o.describe() for o in spec.options) or "none declared"
        raise CompositionError(
            f"{role} {_origin(spec)}: cannot build with options {dict(options)!r}: "
            f"{_raised(exc)}; its options: {declared}"
        ) from exc
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise CompositionError(
            f"{role} {_origin(spec)}: its factory raised {_raised(exc)} while building it "
            f"with options {dict(options)!r}; this is a bug in the component's plugin"
        ) from exc


def resolve(
    ref: ComponentRef, role: str, registry: Any, spec: ComponentSpec | None = None
) -> PlannedComponent:
    """Resolve one reference (see the module docstring for the rules).

    ``spec`` resolves a named reference against that record instead of the registry
    (the conformance kit checks specs that are not registered).
    """
    if ref.instance is not None:
        instance = ref.instance
        base = KIND_BASES[ref.kind]
        if not isinstance(instance, base):
            raise CompositionError(
                f"{role}: {type(instance).__name__} is not a somax_plug.{base.__name__}"
            )
        spec = spec_of(instance)
        options = instance_options(instance)
        name = f"instance:{type(instance).__name__}"
        plugin = "user"
    else:
        spec = spec or lookup(ref, role, registry)
        options = dict(ref.options)
        instance = build(spec, options, role)
        name, plugin = spec.qualified_name, spec.plugin
    if spec is not None:
        try:
            requires = spec.requirements(options)
        except SomaxPlugError:
            raise
        except Exception as exc:
            raise CompositionError(
                f"{role} {_origin(spec)}: its requires_for raised {_raised(exc)} for options "
                f"{dict(options)!r}; this is a bug in the component's plugin"
            ) from exc
        provides = frozenset(spec.provides)
        every_k = ref.every_k or spec.every_k
        cadence, preconditioned, hints = spec.honours_cadence, spec.preconditioned, spec.hints
    else:
        requires, provides = _undeclared(instance)
        every_k = ref.every_k or int(getattr(instance, "every_k", 1) or 1)
        cadence = bool(getattr(type(instance), "cadence", False))
        preconditioned = bool(getattr(instance, "preconditioned", False))
        hints = ()
    if ref.kind == Kind.CURVATURE:
        provides = close_tags(provides)
    component = PlannedComponent(
        role=role,
        kind=ref.kind,
        name=name,
        plugin=plugin,
        instance=instance,
        options=tuple(sorted(dict(ref.options).items())),
        every_k=every_k,
        provides=provides,
        requires_tags=frozenset(requires.tags),
        requires_statistics=frozenset(requires.statistics),
        requires_resources=frozenset(requires.resources),
        requires_losses=frozenset(requires.losses),
        cadence=cadence,
        preconditioned=preconditioned,
        hints=tuple(hints),
        spec=spec,
    )
    check_cadence(component)
    return component


def _undeclared(instance: Any) -> tuple[Requires, frozenset[str]]:
    """Requirements and provides an undeclared instance states as attributes."""
    requires = getattr(instance, "requires", None)
    if not isinstance(requires, Requires):
        requires = Requires()
    provides = getattr(instance, "provides", None)
    if not isinstance(provides, frozenset | set | tuple | list):
        provides = getattr(instance, "tags", None)
    if not isinstance(provides, frozenset | set | tuple | list):
        provides = ()
    return requires, frozenset(provides)


def check_cadence(component: PlannedComponent) -> None:
    """Refuse ``every_k > 1`` on a component that would ignore it."""
    if component.every_k > 1 and not component.cadence:
        kinds = ", ".join(k.value for k, b in KIND_BASES.items() if b.cadence)
        raise CompositionError(
            f"{component.role} {component.short_name!r}: every_k={component.every_k} would be "
            f"ignored: a {component.kind.value} runs every step and has no cadence; remove "
            f"every_k (cadences apply to the kinds {kinds})"
        )
