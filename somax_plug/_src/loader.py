"""The plugin loader: entry points -> pluggy -> registry, one plugin at a time.

Plugins are found through the entry-point group ``somax_plug`` (the entry point's
name is the plugin's name). The built-in components are the plugin ``builtin``,
loaded from :mod:`somax_plug.builtin` through the same hooks.

Isolation: each plugin is imported, checked and registered on its own. A plugin
that fails to import, declares another ``SOMAX_PLUG_API_VERSION``, raises (or
calls ``sys.exit``) in its ``somax_plug_register`` hook or registers an invalid
record is rolled back (none of its components stay, none of its hooks run) and
recorded as ``failed`` with the reason; the host keeps working, and naming one of
its components later raises an error quoting that reason. (``os._exit`` ends the
process without unwinding: no in-process loader can catch it.)

After loading, every other hook implementation of a plugin is *guarded*: an
exception (``SystemExit`` included) raised by its ``validate_plan``,
``amend_plan`` or ``provide_resource`` becomes a :class:`~somax_plug.PluginError`
naming the plugin, the hook and the original exception, and what a hook returns
is checked against its contract (an ``amend_plan`` wrapper must return a plan).
A ``provide_resource`` that raises is skipped with a warning when another plugin
provides the resource, so it breaks only the compositions that need it.

A plugin that loads but looks wrong is ``degraded`` (with its ``warnings``): a
function named like a hook but not marked ``@hookimpl``, a hook implementation
that matches no hook (``somax_plug_regster``), a plugin that registers nothing, a
lazy factory naming a module that cannot be found. ``override=True`` is reported
too (``overrides``). Each of these is a warning, and an error in strict mode.

Environment variables, read before any plugin is imported:

* ``SOMAX_PLUG_DISABLE=a,b``: skip these plugins (status ``disabled``); an entry
  ``name@distribution`` skips only that distribution's entry point ``name``;
* ``SOMAX_PLUG_ONLY=a,b``: load only these third-party plugins (``builtin`` is
  always loaded unless it is named in ``SOMAX_PLUG_DISABLE``);
* ``SOMAX_PLUG_STRICT``: ``1``, ``true``, ``yes`` or ``on`` (any case) raise
  :class:`~somax_plug.PluginError` for every problem instead of warning (for CI);
  ``0``, ``false``, ``no``, ``off`` or empty warn; any other value is an error.

A name in ``SOMAX_PLUG_DISABLE`` or ``SOMAX_PLUG_ONLY`` that matches no installed
plugin is a warning naming the installed ones.

Example:
    >>> from somax_plug import load_registry
    >>> reg = load_registry(env={"SOMAX_PLUG_ONLY": "builtin"})
    >>> reg.plugins["builtin"].status
    'ok'
"""

from __future__ import annotations

import difflib
import functools
import importlib.machinery
import importlib.util
import inspect
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pluggy

from somax_plug._src import hookspecs
from somax_plug._src.errors import PluginError, SomaxPlugError
from somax_plug._src.registry import PluginRecord, Registry

ENTRY_POINT_GROUP = "somax_plug"
BUILTIN = "builtin"
HOOK_PREFIX = "somax_plug_"
HOOKS = tuple(sorted(n for n in vars(hookspecs) if n.startswith(HOOK_PREFIX)))
"""The hook names of the contract (:mod:`somax_plug._src.hookspecs`)."""

STRICT_ON = ("1", "true", "yes", "on")
STRICT_OFF = ("", "0", "false", "no", "off")


def _names(value: str | None) -> set[str]:
    return {n.strip() for n in (value or "").split(",") if n.strip()}


def strict_mode(env: Mapping[str, str]) -> bool:
    """Whether ``SOMAX_PLUG_STRICT`` asks for strict mode (see the module docstring).

    Raises:
        PluginError: the value is neither an "on" nor an "off" spelling.

    Example:
        >>> strict_mode({"SOMAX_PLUG_STRICT": "Yes"}), strict_mode({})
        (True, False)
    """
    raw = env.get("SOMAX_PLUG_STRICT", "")
    value = raw.strip().lower()
    if value in STRICT_ON:
        return True
    if value in STRICT_OFF:
        return False
    raise PluginError(
        f"SOMAX_PLUG_STRICT={raw!r} is not a valid switch; use one of "
        f"{', '.join(STRICT_ON)} for strict mode (plugin problems are errors), or one of "
        f"{', '.join(repr(v) for v in STRICT_OFF)} (or leave it unset) for warnings"
    )


def _short_error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _fatal(exc: BaseException) -> bool:
    """Exceptions a plugin failure must not swallow (the user pressed Ctrl-C)."""
    return isinstance(exc, KeyboardInterrupt)


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


# ------------------------------------------------------------------ hook guards


def hook_error(plugin: str, hook: str, exc: BaseException, what: str = "") -> PluginError:
    """The error for an exception raised by a plugin's hook implementation."""
    call = f"{hook}({what})" if what else hook
    return PluginError(
        f"plugin {plugin!r}: its hook {call} raised {_short_error(exc)}; fix or disable the "
        f"plugin (SOMAX_PLUG_DISABLE={plugin})"
    )


def _check_result(plugin: str, hook: str, result: Any, wrapper: bool) -> None:
    """Check what a hook implementation returned against its hookspec."""
    if hook == "somax_plug_validate_plan":
        ok = result is None or isinstance(result, str)
        ok = ok or (isinstance(result, list | tuple) and all(isinstance(m, str) for m in result))
        if not ok:
            raise PluginError(
                f"plugin {plugin!r}: somax_plug_validate_plan returned "
                f"{type(result).__name__} {result!r:.80}; it must return None (accept), a "
                "message or a list of messages (veto)"
            )
    elif hook == "somax_plug_amend_plan":
        from somax_plug._src.plan import Plan

        if isinstance(result, Plan) or (result is None and not wrapper):
            return
        how = "a wrapper must return the plan it received from `plan = yield` (or an amended one)"
        raise PluginError(
            f"plugin {plugin!r}: somax_plug_amend_plan returned {type(result).__name__} "
            f"{result!r:.80}, not a Plan; {how}, built with plan.evolve(...)"
        )


def _provider_elsewhere(registry: Registry, plugin: str, kwargs: Mapping[str, Any]) -> bool:
    """Whether another plugin answers this ``provide_resource`` call."""
    pm = registry.plugin_manager
    for impl in pm.hook.somax_plug_provide_resource.get_hookimpls():
        if impl.plugin_name == plugin or impl.wrapper or impl.hookwrapper:
            continue
        function = getattr(impl.function, "__wrapped__", impl.function)
        try:
            if function(**kwargs) is not None:
                return True
        except Exception:  # noqa: BLE001 (that plugin's own guard reports it)
            continue
    return False


def _guarded(registry: Registry, plugin: str, hook: str, impl: Any) -> Callable[..., Any]:
    """``impl.function`` with exceptions attributed and results checked."""
    function = impl.function

    if impl.wrapper or impl.hookwrapper:

        @functools.wraps(function)
        def guarded_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                result = yield from function(*args, **kwargs)
            except SomaxPlugError:
                raise  # a named error (an inner implementation's, or the plugin's own)
            except BaseException as exc:
                if _fatal(exc):
                    raise
                raise hook_error(plugin, hook, exc) from exc
            if impl.wrapper:
                _check_result(plugin, hook, result, wrapper=True)
            return result

        return guarded_wrapper

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            result = function(*args, **kwargs)
        except SomaxPlugError:
            raise
        except BaseException as exc:
            if _fatal(exc):
                raise
            if hook != "somax_plug_provide_resource":
                raise hook_error(plugin, hook, exc) from exc
            named = dict(zip(impl.argnames, args, strict=False)) | kwargs
            resource = named.get("name", "?")
            error = hook_error(plugin, hook, exc, repr(resource))
            if registry.strict or not _provider_elsewhere(registry, plugin, named):
                raise error from exc
            key = (plugin, str(resource))
            if key not in registry.hook_failures:
                registry.hook_failures[key] = str(error)
                warnings.warn(
                    f"somax_plug: {error}; its answer is skipped, another plugin provides "
                    f"{resource!r}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None
        _check_result(plugin, hook, result, wrapper=False)
        return result

    return guarded


def _guard_hooks(registry: Registry, pm: pluggy.PluginManager, name: str) -> None:
    for hook in HOOKS:
        if hook == "somax_plug_register":
            continue
        for impl in getattr(pm.hook, hook).get_hookimpls():
            if impl.plugin_name == name and not hasattr(impl.function, "__somax_guarded__"):
                impl.function = _guarded(registry, name, hook, impl)
                impl.function.__somax_guarded__ = True  # type: ignore[attr-defined]


# ------------------------------------------------------------------ lint a plugin


def _hook_problems(pm: pluggy.PluginManager, name: str, plugin: Any) -> list[str]:
    """Misspelled hooks and hook functions without ``@hookimpl``."""
    problems = []
    marker = f"{hookspecs.PROJECT}_impl"
    for attr in sorted(set(dir(plugin))):
        if not attr.startswith(HOOK_PREFIX):
            continue
        try:
            value = getattr(plugin, attr)
        except Exception:  # noqa: BLE001 (a property that raises: not a hook)
            continue
        if not inspect.isroutine(value):
            continue
        marked = getattr(value, marker, None) is not None
        if attr not in HOOKS:
            close = difflib.get_close_matches(attr, HOOKS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                f"{attr!r} matches no hook, so it never runs; {hint}the hooks are "
                + ", ".join(HOOKS)
            )
        elif not marked:
            problems.append(
                f"function {attr!r} is not marked @hookimpl, so it never runs; decorate it "
                "with @somax_plug.hookimpl"
            )
    for hook, caller in vars(pm.hook).items():  # marked implementations of unknown hooks
        if hook.startswith("_") or caller.has_spec() or hook.startswith(HOOK_PREFIX):
            continue  # somax_plug_* names were reported above
        for impl in caller.get_hookimpls():
            if impl.plugin_name == name and not impl.optionalhook:
                problems.append(f"hook implementation {hook!r} matches no hook, so it never runs")
    return problems


def _locate(module: str) -> bool | None:
    """Whether ``module`` can be found, without running it (None: cannot tell)."""
    if module in sys.modules:
        return True
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
        for i in range(1, len(parts)):
            if spec is None:
                return False
            full = ".".join(parts[: i + 1])
            if full in sys.modules:
                return True
            locations = spec.submodule_search_locations
            if locations is None:
                return False
            spec = importlib.machinery.PathFinder.find_spec(full, list(locations))
    except Exception:  # noqa: BLE001 (a parent that cannot be inspected: do not guess)
        return None
    return spec is not None


def factory_problem(spec: Any, deep: bool = False) -> str | None:
    """What is wrong with ``spec``'s lazy ``"module:attribute"`` factory (None: fine).

    Without ``deep`` the module is only located (nothing is imported: ``somax-plug
    list`` stays light); with ``deep`` it is imported and the attribute looked up
    (``somax-plug doctor``).
    """
    factory = spec.factory
    if not isinstance(factory, str):
        return None
    owner = f"{spec.kind.value} {spec.qualified_name!r}"
    module, _, attr = factory.partition(":")
    if not module or not attr:
        return f"{owner}: factory {factory!r} must be 'module:attribute'"
    if not deep and module in sys.modules:  # imported already: the attribute is free to check
        obj: Any = sys.modules[module]
        for part in attr.split("."):
            if not hasattr(obj, part):
                return f"{owner}: factory {factory!r}: module {module!r} has no attribute {part!r}"
            obj = getattr(obj, part)
        return None
    if not deep:
        if _locate(module) is False:
            return f"{owner}: factory {factory!r} names module {module!r}, which cannot be found"
        return None
    try:
        spec.load_factory()
    except BaseException as exc:
        if _fatal(exc):
            raise
        return f"{owner}: factory {factory!r} cannot be loaded: {_short_error(exc)}"
    return None


# ------------------------------------------------------------------ registration


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
        except BaseException as exc:  # SystemExit too: a plugin never ends the host
            if _fatal(exc):
                pm.unregister(name=name)
                raise
            error = _short_error(exc)
            if isinstance(exc, SystemExit):
                error = f"called sys.exit({exc.code!r}) in somax_plug_register: {error}"
            pm.unregister(name=name)
    record.status = "ok" if error is None else "failed"
    record.error = error
    if error is not None:
        return
    _guard_hooks(registry, pm, name)
    problems = _hook_problems(pm, name, plugin)
    other_hooks = [
        h
        for h in HOOKS
        if h != "somax_plug_register"
        and any(i.plugin_name == name for i in getattr(pm.hook, h).get_hookimpls())
    ]
    if not record.components and not other_hooks:
        problems.append(
            "registered nothing (no component, preset or hook other than somax_plug_register); "
            "check that somax_plug_register is marked @hookimpl and calls register(...)"
        )
    for spec in registry.list(plugin=name):
        problem = factory_problem(spec)
        if problem:
            problems.append(problem)
    record.warnings.extend(problems)
    if problems:
        record.status = "degraded"


def _disabled_reason(name: str, dist: str | None, disabled: set[str], only: set[str]) -> str | None:
    keys = {name, f"{name}@{dist}"}
    if keys & disabled:
        return "disabled by SOMAX_PLUG_DISABLE"
    if only and not keys & only:
        return "not in SOMAX_PLUG_ONLY"
    return None


def _load_entry_point(registry: Registry, pm: pluggy.PluginManager, ep: Any, record: PluginRecord):
    start = time.perf_counter()
    try:
        try:
            plugin = ep.load()
        except BaseException as exc:  # a broken plugin never crashes the host
            if _fatal(exc):
                raise
            record.status = "failed"
            record.error = "import failed: " + _short_error(exc)
            return
        register_plugin(registry, pm, ep.name, plugin, record)
    finally:
        record.import_seconds = time.perf_counter() - start


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

    Raises:
        PluginError: ``SOMAX_PLUG_STRICT`` is on and a plugin failed, is degraded,
            overrides a name or clashes, or an environment switch names no plugin;
            or ``SOMAX_PLUG_STRICT`` has a value that is not a switch.
    """
    env = os.environ if env is None else env
    disabled = _names(env.get("SOMAX_PLUG_DISABLE"))
    only = _names(env.get("SOMAX_PLUG_ONLY"))
    strict = strict_mode(env)

    registry = Registry()
    registry.strict = strict
    pm = new_plugin_manager()
    registry.plugin_manager = pm

    from somax_plug import __version__

    builtin_record = PluginRecord(name=BUILTIN, distribution="somax-plug", version=__version__)
    registry.plugins[BUILTIN] = builtin_record
    if BUILTIN in disabled:
        builtin_record.status = "disabled"
        builtin_record.error = "disabled by SOMAX_PLUG_DISABLE"
    else:
        start = time.perf_counter()
        if builtin is None:
            import somax_plug.builtin as builtin
        register_plugin(registry, pm, BUILTIN, builtin, builtin_record)
        builtin_record.import_seconds = time.perf_counter() - start

    eps = iter_entry_points() if entry_points is None else list(entry_points)
    for ep in eps:
        name = ep.name
        dist, version = _dist_info(ep)
        record = PluginRecord(name=name, distribution=dist, version=version)
        reason = _disabled_reason(name, dist, disabled, only)
        taken = registry.plugins.get(name)
        if reason is not None:
            record.status, record.error = "disabled", reason
            registry.plugins[name if taken is None else f"{name}@{dist}"] = record
            continue
        if taken is not None and taken.status != "disabled":
            record.status = "failed"
            record.error = (
                f"plugin name {name!r} is already taken (by distribution "
                f"{taken.distribution!r}); rename the entry point, or disable one of them "
                f"with SOMAX_PLUG_DISABLE={name}@{dist}"
            )
            registry.plugins[f"{name}@{dist}"] = record
            continue
        if taken is not None:  # a disabled namesake steps aside
            registry.plugins[f"{name}@{taken.distribution}"] = registry.plugins.pop(name)
        registry.plugins[name] = record
        _load_entry_point(registry, pm, ep, record)

    problems = _problems(registry, eps, disabled, only)
    if problems:
        if strict:
            raise PluginError("SOMAX_PLUG_STRICT is set and:\n  " + "\n  ".join(problems))
        for problem in problems:
            warnings.warn(f"somax_plug: {problem}", RuntimeWarning, stacklevel=2)
    return registry


def _problems(registry: Registry, eps: list[Any], disabled: set[str], only: set[str]) -> list[str]:
    """Everything worth a warning (an error in strict mode), in a stable order."""
    problems = [
        f"plugin {r.name!r} failed: {r.error}"
        for r in registry.plugins.values()
        if r.status == "failed"
    ]
    for record in registry.plugins.values():
        problems += [f"plugin {record.name!r}: {w}" for w in record.warnings]
    for conflict in registry.conflicts:
        if conflict.resolution == "ambiguous":
            problems.append(conflict.message())
            continue
        winner = conflict.resolution.removeprefix("overridden by ")
        plugin = winner.partition(":")[0]
        others = ", ".join(q for q in conflict.qualified_names if q != winner)
        note = f"{conflict.kind} {conflict.name!r} (over {others})"
        registry.plugins[plugin].overrides.append(note)
        problems.append(
            f"plugin {plugin!r} overrides {note} with override=True: the short name "
            f"{conflict.name!r} now means {winner!r}; presets keep their own plugin's "
            f"components, and {others} stays reachable by its qualified name"
        )
    installed = [BUILTIN] + [ep.name for ep in eps]
    qualified = {f"{ep.name}@{_dist_info(ep)[0]}" for ep in eps}
    for var, names in (("SOMAX_PLUG_DISABLE", disabled), ("SOMAX_PLUG_ONLY", only)):
        for unknown in sorted(names - set(installed) - qualified):
            close = difflib.get_close_matches(unknown, installed, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                f"{var} names {unknown!r}, which matches no installed plugin; {hint}installed "
                f"plugins: {', '.join(sorted(set(installed)))}"
            )
    return problems
