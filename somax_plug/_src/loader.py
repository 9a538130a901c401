"""The plugin loader: entry points -> pluggy -> registry, one plugin at a time.

Plugins are found through the entry-point group ``somax_plug`` (the entry point's
name is the plugin's name). The built-in components are the plugin ``builtin``,
loaded from :mod:`somax_plug.builtin` through the same hooks.

Isolation: each plugin is imported, checked and registered on its own. A plugin
that fails to import, declares another ``SOMAX_PLUG_API_VERSION``, raises in its
``somax_plug_register`` hook or registers an invalid record is rolled back (none
of its components stay, none of its hooks run) and recorded as ``failed`` with
the reason; the host keeps working, and naming one of its components later
raises an error quoting that reason.

Environment variables, read before any plugin is imported:

* ``SOMAX_PLUG_DISABLE=a,b``: skip these plugins (status ``disabled``);
* ``SOMAX_PLUG_ONLY=a,b``: load only these third-party plugins (``builtin`` is
  always loaded unless it is named in ``SOMAX_PLUG_DISABLE``);
* ``SOMAX_PLUG_STRICT=1``: raise :class:`~somax_plug.PluginError` for a
  failed plugin or a name conflict instead of warning (for CI).

Example:
    >>> from somax_plug import load_registry
    >>> reg = load_registry(env={"SOMAX_PLUG_ONLY": "builtin"})
    >>> reg.plugins["builtin"].status
    'ok'
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import pluggy

from somax_plug._src import hookspecs
from somax_plug._src.errors import PluginError
from somax_plug._src.registry import PluginRecord, Registry

ENTRY_POINT_GROUP = "somax_plug"
BUILTIN = "builtin"


def _names(value: str | None) -> set[str]:
    return {n.strip() for n in (value or "").split(",") if n.strip()}


def _short_error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def new_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager that knows the hookspecs (no plugins registered)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def iter_entry_points() -> list[Any]:
    """Entry points of the group ``somax_plug`` of the installed distributions."""
    import importlib_metadata

    return list(importlib_metadata.entry_points(group=ENTRY_POINT_GROUP))


def _dist_info(ep: Any) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _check_api(plugin: Any) -> str | None:
    declared = getattr(plugin, "SOMAX_PLUG_API_VERSION", hookspecs.API_VERSION)
    try:
        major = int(str(declared).split(".")[0])
    except ValueError:
        return f"SOMAX_PLUG_API_VERSION {declared!r} is not a version number"
    if major != hookspecs.API_VERSION:
        return (
            f"declares SOMAX_PLUG_API_VERSION {declared!r}, but this somax_plug speaks "
            f"API version {hookspecs.API_VERSION}; upgrade the plugin or somax_plug"
        )
    return None


def register_plugin(
    registry: Registry,
    pm: pluggy.PluginManager,
    name: str,
    plugin: Any,
    record: PluginRecord,
) -> None:
    """Register one imported plugin object in isolation (updates ``record``)."""
    error = _check_api(plugin)
    if error is None:
        try:
            pm.register(plugin, name=name)
        except Exception as exc:  # pluggy validation or duplicate name
            error = _short_error(exc)
    if error is None:
        impls = [i for i in pm.hook.somax_plug_register.get_hookimpls() if i.plugin_name == name]
        try:
            with registry.transaction(name) as register:
                for impl in impls:
                    impl.function(register=register)
        except Exception as exc:
            error = _short_error(exc)
            pm.unregister(name=name)
    record.status = "ok" if error is None else "failed"
    record.error = error


def load_registry(
    env: Mapping[str, str] | None = None,
    entry_points: Iterable[Any] | None = None,
    builtin: Any = None,
) -> Registry:
    """Discover, import and register every plugin; never raises unless strict.

    Args:
        env: environment (default ``os.environ``) for the ``SOMAX_PLUG_*`` switches.
        entry_points: entry points to load (default: the installed ones).
        builtin: the built-in plugin object (default :mod:`somax_plug.builtin`).
    """
    env = os.environ if env is None else env
    disabled = _names(env.get("SOMAX_PLUG_DISABLE"))
    only = _names(env.get("SOMAX_PLUG_ONLY"))
    strict = env.get("SOMAX_PLUG_STRICT", "").strip().lower() in {"1", "true", "yes", "on"}

    registry = Registry()
    pm = new_plugin_manager()
    registry.plugin_manager = pm

    from somax_plug import __version__

    builtin_record = PluginRecord(name=BUILTIN, distribution="somax-plug", version=__version__)
    registry.plugins[BUILTIN] = builtin_record
    if BUILTIN in disabled:
        builtin_record.status = "disabled"
    else:
        if builtin is None:
            import somax_plug.builtin as builtin
        register_plugin(registry, pm, BUILTIN, builtin, builtin_record)

    eps = iter_entry_points() if entry_points is None else list(entry_points)
    for ep in eps:
        name = ep.name
        dist, version = _dist_info(ep)
        record = PluginRecord(name=name, distribution=dist, version=version)
        if name in registry.plugins:
            record.status = "failed"
            record.error = (
                f"plugin name {name!r} is already taken (by distribution "
                f"{registry.plugins[name].distribution!r}); rename the entry point"
            )
            registry.plugins[f"{name}@{dist}"] = record
            continue
        registry.plugins[name] = record
        if name in disabled or (only and name not in only):
            record.status = "disabled"
            record.error = (
                "disabled by SOMAX_PLUG_DISABLE" if name in disabled else ("not in SOMAX_PLUG_ONLY")
            )
            continue
        try:
            plugin = ep.load()
        except BaseException as exc:  # a broken plugin never crashes the host
            if isinstance(exc, KeyboardInterrupt):
                raise
            record.status = "failed"
            record.error = "import failed: " + _short_error(exc)
            continue
        register_plugin(registry, pm, name, plugin, record)

    problems = [
        f"plugin {r.name!r} failed: {r.error}"
        for r in registry.plugins.values()
        if r.status == "failed"
    ]
    problems += [c.message() for c in registry.conflicts if c.resolution == "ambiguous"]
    if problems:
        if strict:
            raise PluginError("SOMAX_PLUG_STRICT is set and:\n  " + "\n  ".join(problems))
        for problem in problems:
            warnings.warn(f"somax_plug: {problem}", RuntimeWarning, stacklevel=2)
    return registry
