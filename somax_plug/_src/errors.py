"""Exceptions. Every message names what was wrong and what would be right."""

from __future__ import annotations


class SomaxPlugError(Exception):
    """Base class of every error this library raises on purpose."""


class RegistryError(SomaxPlugError, LookupError):
    """A registry lookup failed (unknown or ambiguous name, failed plugin)."""


class UnknownComponentError(RegistryError):
    """No registered component has that name; the message lists candidates."""


class AmbiguousComponentError(RegistryError):
    """A short name matches components of several plugins; qualify it."""


class ConflictError(RegistryError):
    """Two plugins registered the same qualified name, or one name twice."""


class PluginError(SomaxPlugError):
    """A plugin failed to load or register (raised in strict mode, else stored)."""


class CompositionError(SomaxPlugError, ValueError):
    """A composition cannot be planned; raised before any tracing."""


class PlanVetoed(CompositionError):
    """A ``somax_plug_validate_plan`` hook rejected the plan."""


class InputError(SomaxPlugError, ValueError):
    """Parameters or a batch do not fit the composition (raised before tracing)."""


class CheckpointError(SomaxPlugError, ValueError):
    """A checkpoint does not match the current plan or plugin set."""


class ComponentError(SomaxPlugError, TypeError):
    """A component returned something its kind's contract forbids (raised while tracing)."""


class OptionError(CompositionError):
    """A component option has a wrong name, type or value (raised at compose time)."""


for _error in (
    SomaxPlugError,
    RegistryError,
    UnknownComponentError,
    AmbiguousComponentError,
    ConflictError,
    PluginError,
    CompositionError,
    PlanVetoed,
    InputError,
    CheckpointError,
    ComponentError,
    OptionError,
):
    _error.__module__ = "somax_plug"  # their public home (tracebacks, docs, pickling)
del _error
