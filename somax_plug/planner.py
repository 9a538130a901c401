"""The planner: composition -> :class:`~somax_plug.plan.Plan`, before any tracing.

1. *Resolve* every component (registry name + options, or an instance) and read
   its requirements (the instance's ``requires`` if it declares one for its
   options, else the spec's).
2. *Match* requirements to providers: operator tags against the curvature's
   ``provides`` (``psd`` implies ``symmetric``), statistics against the
   estimators' ``provides``. A mismatch raises
   :class:`~somax_plug.errors.CompositionError` naming the component, what it
   lacks, and the registered components that would provide it.
3. *Build the resource graph*: every resource a component reads (a component
   that requires operator tags reads ``operator``), expanded through the
   providers that the ``somax_plug_provide_resource`` hook returns. Each
   resource has one producer, its consumers, and the finest cadence any consumer
   needs (``every_k``).
4. Run the ``somax_plug_amend_plan`` wrappers, then ``somax_plug_validate_plan``
   (any plugin may veto), and return the frozen plan.

Example:
    >>> from somax_plug.planner import make_plan
    >>> plan = make_plan({"curvature": "ggn", "solver": "cg"})
    >>> sorted(r.name for r in plan.resources)[:3]
    ['grad', 'linearization', 'loss']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from somax_plug.composition import ComponentRef, Composition, load_composition
from somax_plug.errors import CompositionError, PlanVetoed, RegistryError
from somax_plug.kinds import PSD, SYMMETRIC, Kind, instance_provides
from somax_plug.plan import Plan, PlannedComponent, ResourceNode
from somax_plug.resources import INPUT_RESOURCES, ResourceProvider
from somax_plug.spec import ComponentSpec, Requires

STEP = "step"

IMPLIED_TAGS = {PSD: {SYMMETRIC}}


def close_tags(tags: frozenset[str]) -> frozenset[str]:
    """Tags with their implications (``psd`` implies ``symmetric``)."""
    out = set(tags)
    for tag in tags:
        out |= IMPLIED_TAGS.get(tag, set())
    return frozenset(out)


def _resolve(ref: ComponentRef, role: str, registry: Any) -> PlannedComponent:
    spec: ComponentSpec | None = None
    if ref.instance is not None:
        instance = ref.instance
        name = f"instance:{type(instance).__name__}"
        plugin = "user"
        every_k = ref.every_k or int(getattr(instance, "every_k", 1) or 1)
        options: tuple = ()
    else:
        try:
            spec = registry.get(ref.kind, ref.name)
        except RegistryError as exc:
            raise CompositionError(f"{role}: {exc}") from None
        options = ref.options
        try:
            instance = spec.create(**dict(options))
        except (TypeError, ValueError) as exc:
            valid = ", ".join(k for k, _ in spec.defaults) or "(none declared)"
            raise CompositionError(
                f"{role} {spec.qualified_name!r}: cannot build with options {dict(options)!r}: "
                f"{exc}; its declared options are: {valid}"
            ) from None
        name, plugin = spec.qualified_name, spec.plugin
        every_k = ref.every_k or spec.every_k
    declared = getattr(instance, "requires", None)
    if declared is not None and not isinstance(declared, Requires):
        declared = None
    requires = declared or (spec.requires if spec is not None else Requires())
    provides = instance_provides(instance)
    if not isinstance(provides, frozenset | set | tuple | list):
        provides = None
    if provides is None and spec is None:
        provides = getattr(instance, "tags", None)
    if provides is None:
        provides = spec.provides if spec is not None else frozenset()
    provides = frozenset(provides)
    if ref.kind == Kind.CURVATURE:
        provides = close_tags(provides)
    return PlannedComponent(
        role=role,
        kind=ref.kind,
        name=name,
        plugin=plugin,
        instance=instance,
        options=tuple(options),
        every_k=every_k,
        provides=provides,
        requires_tags=frozenset(requires.tags),
        requires_statistics=frozenset(requires.statistics),
        requires_resources=frozenset(requires.resources),
    )


def _short(component: PlannedComponent) -> str:
    return component.name.rpartition(":")[2]


def _check_tags(
    component: PlannedComponent,
    curvature: PlannedComponent | None,
    registry: Any,
    stats: frozenset[str],
) -> None:
    needed = component.requires_tags
    if not needed:
        return
    what = f"{component.kind.value} {_short(component)!r}"
    need_text = " and ".join(sorted(needed))
    if curvature is None:
        options = [
            s.name for s in registry.list(Kind.CURVATURE) if needed <= close_tags(s.provides)
        ]
        raise CompositionError(
            f"{what} needs a {need_text} curvature operator, but the composition has no "
            f"curvature; add curvature= one of: {', '.join(options) or '(none registered)'}"
        )
    missing = needed - curvature.provides
    if not missing:
        return
    has = ", ".join(sorted(curvature.provides)) or "no tags"
    alternatives = [
        s.name
        for s in registry.list(component.kind)
        if s.requires.tags
        and s.requires.tags <= curvature.provides
        and s.requires.statistics <= stats
        and s.name != _short(component)
    ]
    curvatures = [s.name for s in registry.list(Kind.CURVATURE) if needed <= close_tags(s.provides)]
    hint = []
    if component.name.endswith(":cg") and PSD in missing and SYMMETRIC in curvature.provides:
        hint.append("or solver {'name': 'cg', 'negative_curvature': 'guard'}")
    raise CompositionError(
        f"{what} needs a {', '.join(sorted(missing))} operator; "
        f"{_short(curvature)!r} is only {has}; use {component.kind.value} "
        + (" or ".join(repr(a) for a in alternatives) or "(none registered fits)")
        + (", " + hint[0] if hint else "")
        + ", or curvature "
        + (" or ".join(repr(c) for c in curvatures) or "(none registered fits)")
    )


def _check_statistics(components: list[PlannedComponent], registry: Any) -> None:
    providers: dict[str, str] = {}
    for c in components:
        if c.kind != Kind.ESTIMATOR:
            continue
        for stat in c.provides:
            if stat in providers:
                raise CompositionError(
                    f"statistic {stat!r} is provided by both {providers[stat]!r} and "
                    f"{c.name!r}; keep one of these estimators"
                )
            providers[stat] = c.name
    for c in components:
        for stat in sorted(c.requires_statistics - set(providers)):
            offer = registry.providers_of(Kind.ESTIMATOR, stat)
            have = ", ".join(repr(e.name) for e in components if e.kind == Kind.ESTIMATOR)
            raise CompositionError(
                f"{c.kind.value} {_short(c)!r} needs statistic {stat!r} from an estimator; "
                f"the composition's estimators ({have or 'none'}) do not provide it; add "
                f"estimators= one of: {', '.join(offer) or '(none registered provides it)'}"
            )


def _call_in_order(hook: Any, **kwargs: Any) -> list[tuple[str, Any]]:
    """Call each non-wrapper implementation in pluggy's order, with attribution."""
    out = []
    for impl in reversed(hook.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            continue
        out.append((impl.plugin_name, impl.function(**kwargs)))
    return out


def _provider_for(name: str, registry: Any) -> tuple[ResourceProvider | None, str]:
    for plugin, result in _call_in_order(
        registry.hook.somax_plug_provide_resource, name=name, registry=registry
    ):
        if result is not None:
            if not isinstance(result, ResourceProvider):
                raise CompositionError(
                    f"plugin {plugin!r} answered somax_plug_provide_resource({name!r}) with "
                    f"{type(result).__name__}; it must return a ResourceProvider or None"
                )
            return result, plugin
    return None, ""


def make_plan(
    composition: Composition | Mapping[str, Any] | str,
    registry: Any = None,
    unplanned: bool = False,
) -> Plan:
    """Plan a composition (a :class:`Composition`, a mapping, a TOML path or a preset).

    Raises:
        CompositionError: an unknown component, bad options, an unmet requirement
            or an unknown resource; raised before anything is traced.
        PlanVetoed: a ``somax_plug_validate_plan`` hook refused the plan.
    """
    from somax_plug.registry import get_registry

    registry = registry or get_registry()
    if not isinstance(composition, Composition):
        if isinstance(composition, Mapping):
            composition = Composition.from_dict(composition, registry=registry)
        else:
            composition = load_composition(composition)

    components: list[PlannedComponent] = []
    curvature = None
    if composition.curvature is not None:
        curvature = _resolve(composition.curvature, "curvature", registry)
        components.append(curvature)
    for i, ref in enumerate(composition.estimators):
        components.append(_resolve(ref, f"estimator[{i}]", registry))
    if composition.preconditioner is not None:
        components.append(_resolve(composition.preconditioner, "preconditioner", registry))
    components.append(_resolve(composition.solver, "solver", registry))
    damping_ref = composition.damping or ComponentRef(Kind.DAMPING, name="constant")
    components.append(_resolve(damping_ref, "damping", registry))

    stats = frozenset(s for c in components if c.kind == Kind.ESTIMATOR for s in c.provides)
    for c in components:
        if c.kind != Kind.CURVATURE:
            _check_tags(c, curvature, registry, stats)
    _check_statistics(components, registry)

    # ---------------------------------------------------------------- resources
    consumers: dict[str, list[str]] = {}
    cadence_of: dict[str, int] = {STEP: 1}

    def consume(resource: str, consumer: str) -> None:
        lst = consumers.setdefault(resource, [])
        if consumer not in lst:
            lst.append(consumer)

    consume("loss", STEP)
    consume("grad", STEP)
    for c in components:
        if c.kind == Kind.CURVATURE:
            continue  # its resources are read by the ``operator`` provider (its build)
        label = (
            f"{c.role}:{_short(c)}"
            if not c.role.startswith("estimator")
            else (f"estimator:{_short(c)}")
        )
        cadence_of[label] = c.every_k
        reads = set(c.requires_resources)
        if c.kind != Kind.CURVATURE and c.requires_tags:
            reads.add("operator")
        for r in sorted(reads):
            consume(r, label)
    rho_every = composition.rho_every_k
    if rho_every:
        consume("predicted_decrease", "info:rho")
        consume("loss_after", "info:rho")
        cadence_of["info:rho"] = rho_every

    providers: dict[str, tuple[ResourceProvider, str]] = {}
    queue = list(consumers)
    hooks: list[tuple[str, str]] = []
    while queue:
        name = queue.pop(0)
        if name in providers or name in INPUT_RESOURCES:
            continue
        if name == "operator":
            if curvature is None:
                users = ", ".join(consumers["operator"])
                raise CompositionError(
                    f"{users} read the curvature operator, but the composition has no "
                    "curvature; add curvature= (for example 'ggn' or 'hessian')"
                )
            provider = ResourceProvider(
                "operator",
                compute=curvature.instance.build,
                requires=curvature.requires_resources,
                plugin=curvature.plugin,
                summary=f"{curvature.name}.build",
            )
            label = f"curvature:{_short(curvature)}"
        elif name == "loss_after":
            provider = ResourceProvider(
                "loss_after",
                compute=_step_only,
                requires=(),
                summary="loss at the updated parameters",
            )
            label = STEP
        elif name == "predicted_decrease":
            provider = ResourceProvider(
                "predicted_decrease",
                compute=_step_only,
                requires={"grad", "operator"},
                summary="-(g.u + u.Cu/2) for the update u",
            )
            label = STEP
        else:
            provider, plugin = _provider_for(name, registry)
            if provider is None:
                users = ", ".join(consumers[name])
                raise CompositionError(
                    f"{users} require resource {name!r}, but no plugin provides it; "
                    "install the plugin that defines it, or see `somax-plug plan` for the "
                    "resources the built-ins provide"
                )
            label = f"{plugin}:{provider.name}"
            hooks.append((f"provide_resource({name})", plugin))
        providers[name] = (provider, label)
        for dep in sorted(provider.requires):
            consume(dep, name)
            queue.append(dep)

    # sharing edges: a provider that reuses a planned resource consumes it
    for name, (provider, _) in list(providers.items()):
        for shared in sorted(provider.reuses & set(providers)):
            consume(shared, name)

    def deps(name: str) -> list[str]:
        provider = providers[name][0]
        return sorted(provider.requires | (provider.reuses & set(providers)))

    # cadence: a resource is needed as often as its most frequent consumer
    def every(name: str, seen: tuple[str, ...] = ()) -> int:
        if name in cadence_of:
            return cadence_of[name]
        if name in seen:
            raise CompositionError(f"resource cycle: {' -> '.join((*seen, name))}")
        value = min(every(c, (*seen, name)) for c in consumers[name])
        cadence_of[name] = value
        return value

    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...] = ()) -> None:
        if name in order or name in INPUT_RESOURCES:
            return
        if name in seen:
            raise CompositionError(f"resource cycle: {' -> '.join((*seen, name))}")
        for dep in deps(name):
            visit(dep, (*seen, name))
        order.append(name)

    for name in sorted(providers):
        visit(name)
    nodes = tuple(
        ResourceNode(
            name=name,
            producer=providers[name][1],
            consumers=tuple(consumers[name]),
            every_k=every(name),
            requires=tuple(deps(name)),
            provider=providers[name][0],
        )
        for name in order
    )
    plan = Plan(
        components=tuple(components),
        resources=nodes,
        hooks=tuple(hooks),
        registry_fingerprint=registry.fingerprint(),
        unplanned=unplanned,
        loss=composition.loss,
        learning_rate=composition.learning_rate,
        annotations=(("rho_every_k", rho_every),) if rho_every else (),
    )

    amended = registry.hook.somax_plug_amend_plan(plan=plan)
    if isinstance(amended, Plan):
        plan = amended
    amend_impls = [i.plugin_name for i in registry.hook.somax_plug_amend_plan.get_hookimpls()]
    vetoes = []
    validators = []
    for plugin, result in _call_in_order(registry.hook.somax_plug_validate_plan, plan=plan):
        validators.append(plugin)
        if not result:
            continue
        for message in [result] if isinstance(result, str) else list(result):
            vetoes.append(f"plugin {plugin!r}: {message}")
    if vetoes:
        raise PlanVetoed("the plan was vetoed by " + "; ".join(vetoes))
    extra = tuple(("amend_plan", p) for p in amend_impls) + tuple(
        ("validate_plan", p) for p in validators
    )
    return plan.evolve(hooks=plan.hooks + extra)


def _step_only(res: Any) -> Any:
    raise CompositionError(
        "loss_after and predicted_decrease are computed by the step builder after the solve; "
        "damping policies receive them in StepStats"
    )

