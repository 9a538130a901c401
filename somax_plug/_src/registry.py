"""The component registry: lookup by kind and name, with attribution.

Every component lives under its *qualified name* ``plugin:name``. A short name
resolves when exactly one plugin registered it for that kind, or when one plugin
took it explicitly with ``override=True``. Unknown and ambiguous names raise
errors that list the candidates and suggest close matches. A registry is plain
Python; nothing here runs inside traced code.

The process-wide registry is built lazily on first use by
:func:`get_registry` (which runs the plugin loader); tests and tools can build
their own with :class:`Registry` and :func:`use_registry`.

Example:
    >>> from somax_plug import Registry
    >>> from somax_plug import ComponentSpec
    >>> reg = Registry()
    >>> with reg.transaction("demo") as register:
    ...     _ = register(kind="solver", name="noop", factory=dict)
    >>> reg.get("solver", "noop").qualified_name
    'demo:noop'
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from somax_plug._src.errors import (
    AmbiguousComponentError,
    ConflictError,
    RegistryError,
    UnknownComponentError,
)
from somax_plug._src.kinds import Kind
from somax_plug._src.spec import ComponentSpec, _kind, own_spec


@attrs.frozen
class PresetSpec:
    """A named composition (a dict of the ``compose`` arguments)."""

    name: str
    composition: tuple[tuple[str, Any], ...] = attrs.field(
        converter=lambda c: tuple(sorted(dict(c).items()))
    )
    summary: str = ""
    plugin: str = ""

    @property
    def qualified_name(self) -> str:
        return f"{self.plugin}:{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "preset",
            "name": self.name,
            "qualified_name": self.qualified_name,
            "plugin": self.plugin,
            "summary": self.summary,
            "composition": dict(self.composition),
        }


@attrs.define
class PluginRecord:
    """What the loader learned about one plugin (``somax-plug doctor``)."""

    name: str
    distribution: str | None = None
    version: str | None = None
    status: str = "ok"  # ok | degraded | failed | disabled
    error: str | None = None
    components: list[str] = attrs.field(factory=list)
    attempted: list[str] = attrs.field(factory=list)
    warnings: list[str] = attrs.field(factory=list)
    """Problems of a plugin that loaded (status ``degraded``): see the loader."""
    overrides: list[str] = attrs.field(factory=list)
    """Short names it took from other plugins with ``override=True``."""
    import_seconds: float | None = None
    """Wall time of importing and registering it (None: not imported)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "components": list(self.components),
            "warnings": list(self.warnings),
            "overrides": list(self.overrides),
            "import_seconds": (
                None if self.import_seconds is None else round(self.import_seconds, 4)
            ),
        }


@attrs.frozen
class Conflict:
    """Two plugins registered the same kind and short name."""

    kind: str
    name: str
    qualified_names: tuple[str, ...]
    resolution: str  # "ambiguous" or "overridden by <qualified name>"

    def message(self) -> str:
        names = ", ".join(self.qualified_names)
        if self.resolution == "ambiguous":
            how = f"use a qualified name ({names}) or register one with override=True"
        else:
            how = self.resolution
        return f"{self.kind} {self.name!r} is registered by several plugins ({names}): {how}"


class Registrar:
    """The ``register`` callback handed to one plugin's ``somax_plug_register``.

    ``register(DeclaredClass)`` (a class decorated with :func:`~somax_plug.declare`),
    ``register(spec)`` or ``register(kind=..., name=..., ...)``; ``override=True``
    claims the short name. ``register.preset(name, composition, summary=...)`` adds a
    preset; ``register.default(kind, name)`` makes one of this plugin's components the
    default of its kind (the damping a composition without one gets).
    """

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry = registry
        self.plugin = plugin
        self.added: list[tuple[str, Any]] = []

    def __call__(
        self, spec: ComponentSpec | None = None, /, *, override: bool = False, **fields: Any
    ) -> ComponentSpec:
        if spec is None:
            spec = ComponentSpec(**fields)
        elif fields:
            raise TypeError("pass either a ComponentSpec or its fields, not both")
        if isinstance(spec, type):
            declared = own_spec(spec)
            if declared is None:
                raise TypeError(
                    f"register({spec.__name__}): the class declares no component; decorate "
                    "it with @somax_plug.declare(name, summary=..., requires=...)"
                )
            spec = declared
        if not isinstance(spec, ComponentSpec):
            raise TypeError(
                f"register() takes a declared class or a ComponentSpec, got "
                f"{type(spec).__name__}; decorate the class with @somax_plug.declare(...) or "
                "build a somax_plug.ComponentSpec(kind=..., name=..., factory=...)"
            )
        self._registry._record_attempt(self.plugin, f"{spec.kind.value} {spec.name}")
        if spec.factory is None:
            raise ValueError(f"{spec.kind.value} {spec.name!r} has no factory")
        if spec.plugin and spec.plugin != self.plugin:
            raise ValueError(
                f"{spec.name!r} claims plugin {spec.plugin!r} but is registered by "
                f"{self.plugin!r}; leave ComponentSpec.plugin empty"
            )
        spec = attrs.evolve(spec, plugin=self.plugin)
        self._registry._add(spec, override=override)
        self.added.append(("component", spec))
        return spec

    def default(self, kind: Kind | str, name: str) -> None:
        """Make this plugin's component ``name`` the default of ``kind``."""
        kind = _kind(kind)
        qualified = f"{self.plugin}:{name}"
        if (kind, qualified) not in self._registry._specs:
            raise ValueError(
                f"register.default({kind.value!r}, {name!r}): plugin {self.plugin!r} has not "
                f"registered a {kind.value} named {name!r}; register it first"
            )
        self._registry._set_default(kind, qualified)
        self.added.append(("default", kind))

    def preset(
        self, name: str, composition: Mapping[str, Any], summary: str = "", override: bool = False
    ) -> PresetSpec:
        self._registry._record_attempt(self.plugin, f"preset {name}")
        preset = PresetSpec(name=name, composition=composition, summary=summary, plugin=self.plugin)
        self._registry._add_preset(preset, override=override)
        self.added.append(("preset", preset))
        return preset


class Registry:
    """Components and presets by kind and name, plus the plugins they came from."""

    def __init__(self) -> None:
        self._specs: dict[tuple[Kind, str], ComponentSpec] = {}
        self._by_short: dict[tuple[Kind, str], list[str]] = {}
        self._overrides: dict[tuple[Kind, str], str] = {}
        self._presets: dict[str, PresetSpec] = {}
        self._preset_short: dict[str, list[str]] = {}
        self._preset_overrides: dict[str, str] = {}
        self._defaults: dict[Kind, str] = {}
        self.plugins: dict[str, PluginRecord] = {}
        self.conflicts: list[Conflict] = []
        self.plugin_manager: Any = None
        self.strict = False
        """Strict mode (``SOMAX_PLUG_STRICT``): plugin problems found later raise too."""
        self.hook_failures: dict[tuple[str, str], str] = {}
        """(plugin, resource) -> the error of a skipped ``provide_resource`` answer."""

    # ------------------------------------------------------------------ adding
    def _record_attempt(self, plugin: str, what: str) -> None:
        self.plugins.setdefault(plugin, PluginRecord(name=plugin)).attempted.append(what)

    def _add(self, spec: ComponentSpec, override: bool) -> None:
        key = (spec.kind, spec.qualified_name)
        if key in self._specs:
            raise ConflictError(
                f"plugin {spec.plugin!r} registered {spec.kind.value} {spec.name!r} twice; "
                "each (kind, name) may be registered once per plugin"
            )
        short = (spec.kind, spec.name)
        if override and short in self._overrides:
            raise ConflictError(
                f"{spec.kind.value} {spec.name!r}: both {self._overrides[short]!r} and "
                f"{spec.qualified_name!r} claim the short name with override=True"
            )
        self._specs[key] = spec
        owners = self._by_short.setdefault(short, [])
        owners.append(spec.qualified_name)
        if override:
            self._overrides[short] = spec.qualified_name
        record = self.plugins.setdefault(spec.plugin, PluginRecord(name=spec.plugin))
        record.components.append(f"{spec.kind.value}:{spec.name}")
        self._refresh_conflicts()

    def _add_preset(self, preset: PresetSpec, override: bool) -> None:
        if preset.qualified_name in self._presets:
            raise ConflictError(f"plugin {preset.plugin!r} registered preset {preset.name!r} twice")
        if override and preset.name in self._preset_overrides:
            raise ConflictError(f"preset {preset.name!r}: two plugins claim it with override=True")
        self._presets[preset.qualified_name] = preset
        self._preset_short.setdefault(preset.name, []).append(preset.qualified_name)
        if override:
            self._preset_overrides[preset.name] = preset.qualified_name
        record = self.plugins.setdefault(preset.plugin, PluginRecord(name=preset.plugin))
        record.components.append(f"preset:{preset.name}")
        self._refresh_conflicts()

    def _set_default(self, kind: Kind, qualified: str) -> None:
        current = self._defaults.get(kind)
        if current is not None and current != qualified:
            raise ConflictError(
                f"the default {kind.value} is {current!r} already; plugin "
                f"{qualified.partition(':')[0]!r} cannot make {qualified!r} the default too"
            )
        self._defaults[kind] = qualified

    def default(self, kind: Kind | str) -> ComponentSpec | None:
        """The spec a composition gets for ``kind`` when it names none (None: no default)."""
        qualified = self._defaults.get(_kind(kind))
        return None if qualified is None else self._specs[(_kind(kind), qualified)]

    def _remove_spec(self, spec: ComponentSpec) -> None:
        del self._specs[(spec.kind, spec.qualified_name)]
        short = (spec.kind, spec.name)
        self._by_short[short].remove(spec.qualified_name)
        if not self._by_short[short]:
            del self._by_short[short]
        if self._overrides.get(short) == spec.qualified_name:
            del self._overrides[short]
        self.plugins[spec.plugin].components.remove(f"{spec.kind.value}:{spec.name}")

    def _remove_preset(self, preset: PresetSpec) -> None:
        qname = preset.qualified_name
        del self._presets[qname]
        self._preset_short[preset.name].remove(qname)
        if not self._preset_short[preset.name]:
            del self._preset_short[preset.name]
        if self._preset_overrides.get(preset.name) == qname:
            del self._preset_overrides[preset.name]
        self.plugins[preset.plugin].components.remove(f"preset:{preset.name}")

    def _refresh_conflicts(self) -> None:
        conflicts = []
        for (kind, name), owners in sorted(self._by_short.items()):
            if len(owners) > 1:
                winner = self._overrides.get((kind, name))
                how = f"overridden by {winner}" if winner else "ambiguous"
                conflicts.append(Conflict(kind.value, name, tuple(sorted(owners)), how))
        for name, owners in sorted(self._preset_short.items()):
            if len(owners) > 1:
                winner = self._preset_overrides.get(name)
                how = f"overridden by {winner}" if winner else "ambiguous"
                conflicts.append(Conflict("preset", name, tuple(sorted(owners)), how))
        self.conflicts = conflicts

    @contextlib.contextmanager
    def transaction(self, plugin: str) -> Iterator[Registrar]:
        """Register as ``plugin``; on any exception roll back what this block registered."""
        registrar = Registrar(self, plugin)
        self.plugins.setdefault(plugin, PluginRecord(name=plugin))
        try:
            yield registrar
        except BaseException:
            for what, item in reversed(registrar.added):
                if what == "component":
                    self._remove_spec(item)
                elif what == "default":
                    self._defaults.pop(item, None)
                else:
                    self._remove_preset(item)
            self._refresh_conflicts()
            raise

    # ------------------------------------------------------------------ lookup
    def _failure_note(self, kind: Kind | None, name: str) -> str:
        plugin, _, short = name.rpartition(":")
        notes = []
        for record in self.plugins.values():
            if record.status != "failed":
                continue
            attempted = {a.split(" ", 1)[-1] for a in record.attempted}
            named = (plugin == record.name) or (short in attempted)
            if named:
                return (
                    f"; it would come from plugin {record.name!r}, which failed to load: "
                    f"{record.error}"
                )
            notes.append(f"{record.name!r} ({record.error})")
        if notes:
            return "; note: these plugins failed to load and may have provided it: " + ", ".join(
                notes
            )
        return ""

    def resolve(self, kind: Kind | str, name: str) -> str:
        """The qualified name that ``name`` refers to for ``kind``."""
        kind = _kind(kind)
        if ":" in name:
            if (kind, name) in self._specs:
                return name
            raise UnknownComponentError(
                f"no {kind.value} named {name!r}"
                + self._suggest(kind, name)
                + self._failure_note(kind, name)
            )
        owners = self._by_short.get((kind, name), [])
        if len(owners) == 1:
            return owners[0]
        if len(owners) > 1:
            if (kind, name) in self._overrides:
                return self._overrides[(kind, name)]
            raise AmbiguousComponentError(
                f"{kind.value} {name!r} is ambiguous: registered by "
                + ", ".join(sorted(owners))
                + "; use one of these qualified names"
            )
        raise UnknownComponentError(
            f"no {kind.value} named {name!r}"
            + self._suggest(kind, name)
            + self._failure_note(kind, name)
        )

    def _suggest(self, kind: Kind, name: str) -> str:
        shorts = sorted({n for (k, n) in self._by_short if k == kind})
        qualified = sorted(q for (k, q) in self._specs if k == kind)
        close = difflib.get_close_matches(name.rpartition(":")[2], shorts, n=3, cutoff=0.5)
        out = ""
        if close:
            out += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
        out += f"; registered {kind.value} components: " + (", ".join(qualified) or "(none)")
        other = sorted(k.value for (k, n) in self._by_short if n == name and k != kind)
        if other:
            out += f"; {name!r} exists as a {' and a '.join(other)}"
        return out

    def get(self, kind: Kind | str, name: str) -> ComponentSpec:
        """The spec that ``name`` (short or qualified) refers to for ``kind``."""
        kind = _kind(kind)
        return self._specs[(kind, self.resolve(kind, name))]

    def create(self, kind: Kind | str, name: str, **options: Any) -> Any:
        """Build an instance of a registered component with ``options``."""
        return self.get(kind, name).create(**options)

    def preset(self, name: str) -> PresetSpec:
        """A preset by short or qualified name, its names bound to its own plugin.

        A short component name in a preset means the preset's own plugin's component
        when that plugin registered one of that kind (so another plugin's ``cg``, even
        with ``override=True``, never changes the built-in ``sgn``); the returned
        composition carries the qualified name where the short one would resolve
        elsewhere. Any other short name resolves as usual, and an ambiguous one raises
        an error that names the preset.
        """
        return self._bind_preset(self._find_preset(name))

    def _find_preset(self, name: str) -> PresetSpec:
        if name in self._presets:
            return self._presets[name]
        owners = self._preset_short.get(name, [])
        if len(owners) == 1:
            return self._presets[owners[0]]
        if len(owners) > 1:
            if name in self._preset_overrides:
                return self._presets[self._preset_overrides[name]]
            raise AmbiguousComponentError(
                f"preset {name!r} is ambiguous: registered by {', '.join(sorted(owners))}; "
                "use one of these qualified names"
            )
        names = sorted(self._preset_short)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise UnknownComponentError(
            f"no preset named {name!r}{hint}; registered presets: {', '.join(names) or '(none)'}"
            + self._failure_note(None, name)
        )

    def _bind_preset(self, preset: PresetSpec) -> PresetSpec:
        composition = dict(preset.composition)
        changed = False
        for role, value in composition.items():
            if role in PRESET_ROLES:
                bound = self._bind(preset, Kind(role), value)
            elif role == "estimators" and isinstance(value, list | tuple):
                bound = type(value)(self._bind(preset, Kind.ESTIMATOR, v) for v in value)
            elif role == "estimators":
                bound = self._bind(preset, Kind.ESTIMATOR, value)
            else:
                continue
            changed = changed or bound is not value
            composition[role] = bound
        return attrs.evolve(preset, composition=composition) if changed else preset

    def _bind(self, preset: PresetSpec, kind: Kind, value: Any) -> Any:
        """``value`` with its short name bound to the preset's plugin (see :meth:`preset`)."""
        if isinstance(value, str):
            name = value
        elif isinstance(value, Mapping) and isinstance(value.get("name"), str):
            name = value["name"]
        elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            name = value[0]
        else:
            return value
        if ":" in name:
            return value
        own = f"{preset.plugin}:{name}"
        owners = self._by_short.get((kind, name), [])
        if (kind, own) in self._specs:
            if owners == [own] or self._overrides.get((kind, name)) == own:
                return value  # the short name already means the preset's own component
            name = own
        elif len(owners) > 1 and (kind, name) not in self._overrides:
            raise AmbiguousComponentError(
                f"preset {preset.qualified_name!r} names {kind.value} {name!r}, which is "
                f"ambiguous: registered by {', '.join(sorted(owners))}; pass "
                f"{kind.value}='<plugin>:{name}' to compose(preset={preset.name!r}, ...), or "
                "uninstall or disable one of the plugins"
            )
        else:
            return value
        if isinstance(value, str):
            return name
        if isinstance(value, tuple):
            return (name, value[1])
        return {**value, "name": name}

    def check_factories(self) -> None:
        """Import every lazy factory (``somax-plug doctor``); a failure degrades its plugin."""
        from somax_plug._src.loader import factory_problem

        for spec in list(self._specs.values()):
            record = self.plugins.get(spec.plugin)
            owner = f"{spec.kind.value} {spec.qualified_name!r}: factory"
            if record is None or any(w.startswith(owner) for w in record.warnings):
                continue  # no record, or its factory was reported at load already
            problem = factory_problem(spec, deep=True)
            if problem:
                record.warnings.append(problem)
                if record.status == "ok":
                    record.status = "degraded"

    def find(self, name: str) -> list[ComponentSpec | PresetSpec]:
        """Every component or preset, of any kind, that ``name`` refers to."""
        found: list[ComponentSpec | PresetSpec] = []
        for kind in Kind:
            with contextlib.suppress(RegistryError):
                found.append(self.get(kind, name))
        with contextlib.suppress(RegistryError):
            found.append(self.preset(name))
        return found

    def list(
        self,
        kind: Kind | str | None = None,
        tag: str | None = None,
        plugin: str | None = None,
    ) -> list[ComponentSpec]:
        """Specs, sorted by kind then qualified name, filtered by kind/provided tag/plugin."""
        kind = None if kind is None else _kind(kind)
        out = [
            s
            for s in self._specs.values()
            if (kind is None or s.kind == kind)
            and (tag is None or tag in s.provides)
            and (plugin is None or s.plugin == plugin)
        ]
        order = {k: i for i, k in enumerate(Kind)}
        return sorted(out, key=lambda s: (order[s.kind], s.name, s.qualified_name))

    def presets(self) -> list[PresetSpec]:
        return sorted(self._presets.values(), key=lambda p: (p.name, p.qualified_name))

    def providers_of(self, kind: Kind | str, item: str) -> list[str]:
        """Qualified names of ``kind`` components whose ``provides`` contains ``item``."""
        return [s.qualified_name for s in self.list(kind) if item in s.provides]

    def fingerprint(self) -> str:
        """A stable hash of the loaded plugins, their versions and what they registered."""
        from somax_plug._src.hookspecs import API_VERSION

        payload = {
            "api": API_VERSION,
            "plugins": sorted(
                (r.name, r.distribution or "", r.version or "", r.status)
                for r in self.plugins.values()
            ),
            "components": sorted(
                f"{s.kind.value}/{s.qualified_name}" for s in self._specs.values()
            ),
            "presets": sorted(self._presets),
            "defaults": sorted(f"{k.value}/{q}" for k, q in self._defaults.items()),
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def hook(self) -> Any:
        """The pluggy hook relay (``registry.hook.somax_plug_validate_plan(...)``)."""
        if self.plugin_manager is None:
            from somax_plug._src.loader import new_plugin_manager

            self.plugin_manager = new_plugin_manager()
        return self.plugin_manager.hook


PRESET_ROLES = ("curvature", "solver", "preconditioner", "damping")
"""The composition keys of a preset that name one component of their kind."""

_lock = threading.Lock()
_current: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loading plugins on first use."""
    global _current
    with _lock:
        if _current is None:
            from somax_plug._src.loader import load_registry

            _current = load_registry()
        return _current


def reset_registry() -> None:
    """Forget the process-wide registry (the next use reloads plugins)."""
    global _current
    with _lock:
        _current = None


@contextlib.contextmanager
def use_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the process-wide one inside the ``with`` block."""
    global _current
    with _lock:
        previous, _current = _current, registry
    try:
        yield registry
    finally:
        with _lock:
            _current = previous
