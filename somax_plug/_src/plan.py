"""The Plan: a frozen, hashable, explainable description of one step.

A plan lists the resolved components (with their options, cadences and
requirements) and the graph of per-step resources: for each resource, who
produces it, who consumes it and how often it is needed (``every_k``, the finest
cadence of its consumers). The step builder executes exactly this graph.

Example:
    >>> from somax_plug import make_plan
    >>> plan = make_plan("sgn")                           # doctest: +SKIP
    >>> print(plan.explain())                             # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs

from somax_plug._src.kinds import Kind


@attrs.frozen
class PlannedComponent:
    """One resolved component of the plan (what :func:`resolve` returns).

    Attributes:
        role: ``curvature``, ``solver``, ``preconditioner``, ``damping`` or
            ``estimator[i]``.
        kind: its kind.
        name: qualified name, or ``instance:ClassName`` for an undeclared instance.
        plugin: the plugin that registered it (``user`` for an instance).
        instance: the built component.
        options: the options it was built with (as given, checked).
        every_k: its cadence.
        provides: operator tags (curvature, with implications) or statistics.
        requires_tags, requires_statistics, requires_resources, requires_losses:
            its requirements for these options.
        cadence: whether it honours ``every_k > 1``.
        preconditioned: a solver that applies the composition's preconditioner.
        hints: ``(missing tag, advice)`` pairs for unmet-requirement errors.
        spec: its registry record (None for an undeclared instance).
    """

    role: str
    kind: Kind
    name: str
    plugin: str
    instance: Any = attrs.field(eq=False, hash=False, repr=False)
    options: tuple[tuple[str, Any], ...] = ()
    every_k: int = 1
    provides: frozenset[str] = frozenset()
    requires_tags: frozenset[str] = frozenset()
    requires_statistics: frozenset[str] = frozenset()
    requires_resources: frozenset[str] = frozenset()
    requires_losses: frozenset[str] = frozenset()
    cadence: bool = False
    preconditioned: bool = False
    hints: tuple[tuple[str, str], ...] = ()
    spec: Any = attrs.field(default=None, eq=False, hash=False, repr=False)

    @property
    def short_name(self) -> str:
        return self.name.rpartition(":")[2]

    @property
    def label(self) -> str:
        """``kind 'name'`` for messages."""
        return f"{self.kind.value} {self.short_name!r}"

    @property
    def reads(self) -> frozenset[str]:
        """Resources it reads: the declared ones, plus ``operator`` if it needs tags."""
        extra = {"operator"} if self.requires_tags and self.kind != Kind.CURVATURE else set()
        return frozenset(self.requires_resources | extra)

    def to_dict(self) -> dict[str, Any]:
        from somax_plug._src.options import _jsonable

        return {
            "role": self.role,
            "kind": self.kind.value,
            "name": self.name,
            "plugin": self.plugin,
            "options": {k: _jsonable(v) for k, v in self.options},
            "every_k": self.every_k,
            "provides": sorted(self.provides),
            "requires": {
                "tags": sorted(self.requires_tags),
                "statistics": sorted(self.requires_statistics),
                "resources": sorted(self.requires_resources),
                "losses": sorted(self.requires_losses),
            },
        }


@attrs.frozen
class Consumer:
    """Who reads a resource: a component (by role), another resource, the step, or info.

    Attributes:
        kind: ``"component"``, ``"resource"``, ``"share"`` (a resource whose provider
            reuses this one on the steps where it is computed anyway, and computes
            its own value otherwise: it does not make this one more frequent),
            ``"step"`` (the loss and gradient the step reports and solves with) or
            ``"info"`` (telemetry such as ``rho``).
        name: the role (``"solver"``, ``"estimator[0]"``), the resource name, or the
            info key.
        every_k: how often it reads.
        component: the component's short name (display only), for ``"component"``.
    """

    kind: str
    name: str
    every_k: int = 1
    component: str = ""

    def __str__(self) -> str:
        if self.kind == "info":
            return f"info:{self.name}"
        if self.kind == "share":
            return f"{self.name} (shared when due)"
        return f"{self.name}:{self.component}" if self.component else self.name


@attrs.frozen
class ResourceNode:
    """One node of the resource graph.

    Attributes:
        name: the resource.
        producer: who computes it, for display (``plugin:name`` or ``curvature:ggn``).
        consumers: :class:`Consumer` records.
        every_k: the finest cadence of its consumers.
        requires: the resources it reads (its edges).
        phase: ``"step"`` (before the estimators), ``"solve"`` (it reads the step's
            estimator statistics, so it is computed after the estimators, when the
            solver reads it) or ``"after_update"`` (it reads the step's update, so it
            is computed once the direction is known).
        provider: the :class:`~somax_plug.ResourceProvider`.
    """

    name: str
    producer: str
    consumers: tuple[Consumer, ...]
    every_k: int
    requires: tuple[str, ...] = ()
    phase: str = "step"
    provider: Any = attrs.field(default=None, eq=False, hash=False, repr=False)

    def read_by(self, kind: str, name: str) -> bool:
        """Whether a consumer of this kind and name (role, resource, info key) reads it."""
        return any(c.kind == kind and c.name == name for c in self.consumers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "producer": self.producer,
            "consumers": [str(c) for c in self.consumers],
            "every_k": self.every_k,
            "requires": list(self.requires),
            "phase": self.phase,
        }


@attrs.frozen
class Plan:
    """Everything the step builder needs, as static data.

    Attributes:
        components: the resolved components, in step order.
        resources: the resource graph, in topological order.
        hooks: which plugin implementation took part in which hook.
        registry_fingerprint: :meth:`~somax_plug.Registry.fingerprint`.
        unplanned: every component recomputes its own resources (ablation).
        loss: the loss name the composition was planned for (None: any).
        learning_rate: float or schedule applied to the direction.
        annotations: free-form (key, value) pairs added by amend-plan hooks.
        curvature_batch: rows of the step's batch the curvature uses (None: all);
            the resources computed on them are named ``name@sub``.
    """

    components: tuple[PlannedComponent, ...]
    resources: tuple[ResourceNode, ...]
    hooks: tuple[tuple[str, str], ...] = ()
    registry_fingerprint: str = ""
    unplanned: bool = False
    loss: str | None = None
    learning_rate: Any = attrs.field(default=1.0, eq=False, hash=False)
    annotations: tuple[tuple[str, Any], ...] = ()
    curvature_batch: int | None = None

    # ----------------------------------------------------------------- access
    def component(self, role: str) -> PlannedComponent | None:
        for c in self.components:
            if c.role == role:
                return c
        return None

    @property
    def estimators(self) -> tuple[PlannedComponent, ...]:
        return tuple(c for c in self.components if c.kind == Kind.ESTIMATOR)

    def resource(self, name: str) -> ResourceNode | None:
        for r in self.resources:
            if r.name == name:
                return r
        return None

    @property
    def resource_names(self) -> frozenset[str]:
        return frozenset(r.name for r in self.resources)

    def reads(self, role: str, resource: str) -> bool:
        """Whether the component in ``role`` reads ``resource``."""
        node = self.resource(resource)
        return node is not None and node.read_by("component", role)

    def evolve(self, **changes: Any) -> Plan:
        """A copy with fields replaced (for ``somax_plug_amend_plan`` wrappers)."""
        return attrs.evolve(self, **changes)

    # ------------------------------------------------------------ description
    def to_dict(self) -> dict[str, Any]:
        from somax_plug._src.options import _jsonable

        return {
            "components": [c.to_dict() for c in self.components],
            "resources": [r.to_dict() for r in self.resources],
            "hooks": [{"hook": h, "plugin": p} for h, p in self.hooks],
            "fingerprint": self.fingerprint,
            "registry_fingerprint": self.registry_fingerprint,
            "unplanned": self.unplanned,
            "loss": self.loss,
            "curvature_batch": self.curvature_batch,
            "annotations": {k: _jsonable(v) for k, v in self.annotations},
        }

    @property
    def fingerprint(self) -> str:
        """Hash of the plan's content and the registry fingerprint (for checkpoints)."""
        body = self.to_dict_without_fingerprint()
        blob = json.dumps(body, sort_keys=True, default=repr).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict_without_fingerprint(self) -> dict[str, Any]:
        return {
            "components": [c.to_dict() for c in self.components],
            "resources": [r.to_dict() for r in self.resources],
            "registry": self.registry_fingerprint,
            "unplanned": self.unplanned,
            "loss": self.loss,
            "curvature_batch": self.curvature_batch,
        }

    def explain(self) -> str:
        """Readable text: the components, then each resource with producer and consumers."""
        lines = [f"Plan {self.fingerprint}" + (" (UNPLANNED ablation)" if self.unplanned else "")]
        lines.append("components:")
        for c in self.components:
            opts = ", ".join(f"{k}={v!r}" for k, v in c.options)
            cadence = f" every {c.every_k} steps" if c.every_k > 1 else ""
            lines.append(f"  {c.role:<15} {c.name}{cadence}" + (f"  ({opts})" if opts else ""))
            need = [
                f"{label}: {', '.join(sorted(v))}"
                for label, v in (
                    ("tags", c.requires_tags),
                    ("statistics", c.requires_statistics),
                    ("resources", c.requires_resources),
                    ("losses", c.requires_losses),
                )
                if v
            ]
            if c.provides:
                need.insert(0, f"provides: {', '.join(sorted(c.provides))}")
            if need:
                lines.append(f"  {'':<15}   " + "; ".join(need))
            rule = getattr(c.instance, "deferred_rule", "")
            if isinstance(rule, str) and rule:  # a choice made when the step is traced
                lines.append(f"  {'':<15}   chosen when the step is traced, by the rule: {rule}")
        how = (
            "each consumer recomputes what it reads"
            if self.unplanned
            else "each computed once per step and shared"
        )
        lines.append(f"resources ({how}):")
        if self.curvature_batch:
            lines.append(
                f"  (name@sub: computed on the first {self.curvature_batch} rows of the "
                "step's batch; every other resource on the whole batch)"
            )
        for r in self.resources:
            cadence = "every step" if r.every_k == 1 else f"every {r.every_k} steps"
            phase = {"after_update": ", after the update",
                     "solve": ", after the estimators"}.get(r.phase, "")
            lines.append(f"  {r.name:<18} <- {r.producer:<28} [{cadence}{phase}]")
            lines.append(f"  {'':<18}    consumed by: {', '.join(map(str, r.consumers))}")
        layer_map = next((r for r in self.resources if r.name == "layer_map"), None)
        if layer_map is not None:
            users = sorted({str(c) for r in self.resources if r.name.startswith("layer_")
                            for c in r.consumers if c.kind == "component"})
            lines.append("layer map:")
            lines.append(
                f"  required by {', '.join(users) or 'the layer resources'}; found in the "
                f"model's jaxpr when the step is traced ({layer_map.producer}). "
                "Method.explain(params, inputs) prints it: every dense/conv kernel with "
                "its shapes and shared axes, and the parameters it does not cover"
            )
        if self.hooks:
            lines.append("hooks:")
            for hook, plugin in self.hooks:
                lines.append(f"  {hook:<28} {plugin}")
        if self.annotations:
            lines.append("annotations:")
            for k, v in self.annotations:
                lines.append(f"  {k} = {v!r}")
        lines.append(f"registry fingerprint: {self.registry_fingerprint}")
        return "\n".join(lines)
