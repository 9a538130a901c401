"""The whole plugin contract: four pluggy hooks.

A plugin is a module (or object) named by an entry point in the group
``somax_plug``; it implements any of the hooks below with :data:`hookimpl`. It may
declare ``SOMAX_PLUG_API_VERSION = 1``; a plugin that declares another major
version is reported as ``failed`` and not loaded.

Example plugin module (``my_plugin/__init__.py``)::

    from somax_plug import hookimpl, ComponentSpec, Requires

    SOMAX_PLUG_API_VERSION = 1

    @hookimpl
    def somax_plug_register(register):
        register(ComponentSpec(
            kind="solver", name="my_cg", summary="CG with my tweak",
            requires=Requires(tags={"psd"}), factory="my_plugin.solver:MyCG",
        ))

and in its ``pyproject.toml``::

    [project.entry-points.somax_plug]
    my_plugin = "my_plugin"

The entry point's name is the plugin's name: its components are
``my_plugin:my_cg``.

What the host does when a plugin misbehaves (see the docs' "What can go wrong"):

* an exception in ``somax_plug_register`` (``SystemExit`` included) rolls the
  plugin back and reports it ``failed``; an exception in any other hook, or a
  result that breaks the hook's contract below, becomes a
  :class:`~somax_plug.PluginError` naming the plugin, the hook and the original
  exception (a ``provide_resource`` that raises is skipped, with a warning, when
  another plugin provides that resource);
* a function named ``somax_plug_*`` that is not a hook, or a hook function without
  ``@hookimpl``, or a plugin that registers nothing, is a warning (status
  ``degraded``), and an error under ``SOMAX_PLUG_STRICT=1``;
* what a component returns inside the step is checked when the step is traced
  (:class:`~somax_plug.ComponentError` names the component);
* ``os._exit`` (or a crash in native code) ends the process without unwinding:
  nothing in-process can catch it; run untrusted plugins in a subprocess.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from somax_plug._src.plan import Plan
    from somax_plug._src.registry import Registrar
    from somax_plug._src.resources import ResourceProvider

PROJECT = "somax_plug"
API_VERSION = 1
"""Major version of this hook contract; plugins declaring another are refused."""

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def somax_plug_register(register: Registrar) -> None:
    """Register this plugin's components and presets.

    Call ``register(MyClass)`` with a class declared by :func:`~somax_plug.declare`
    (or ``register(spec)`` with a :class:`~somax_plug.ComponentSpec`, or
    ``register(kind=..., name=..., ...)`` with its fields) once per component,
    ``register.preset(name, composition, summary=...)`` once per preset, and
    ``register.default(kind, name)`` to make one of its components the default of its
    kind (the built-in plugin makes ``constant`` the default damping). The
    registry attributes every registration to the calling plugin. The call is a
    transaction: if the hook raises, or a record is invalid, everything this
    plugin registered is rolled back and the plugin is reported ``failed``.
    Pass ``override=True`` to take a short name that another plugin already has.
    """


@hookspec(firstresult=True)
def somax_plug_provide_resource(name: str, registry: Any) -> ResourceProvider | None:
    """Return a :class:`~somax_plug.ResourceProvider` for ``name``, or None.

    The planner asks for every resource a component requires (and, recursively,
    every resource a provider requires). The first non-None answer wins; plugins
    are asked before the built-ins, so a plugin can add new intermediates (for
    example Kronecker factors) and the components it ships can require them.
    """


@hookspec
def somax_plug_validate_plan(plan: Plan) -> str | list[str] | None:
    """Veto a plan: return a message (or messages) to refuse it, None to accept.

    Runs after the planner matched every requirement and before anything is
    traced. Any message makes :func:`somax_plug.compose` raise
    :class:`~somax_plug.PlanVetoed`, quoting the plugin and its message.
    """


@hookspec(firstresult=True)
def somax_plug_amend_plan(plan: Plan) -> Plan | None:
    """Amend the finished plan; implement it as a wrapper.

    ``@hookimpl(wrapper=True)`` implementations receive the plan from the inner
    implementations with ``plan = yield`` and return it, possibly amended with
    ``plan.evolve(...)`` (for example to add ``annotations`` for telemetry). The
    built-in innermost implementation returns the plan unchanged. The amended plan
    is validated again by the planner.
    """
