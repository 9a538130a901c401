"""The planner: composition -> :class:`~somax_plug.Plan`, before any tracing.

Four small stages, each a function of the previous one's output:

1. :func:`resolve_components`: every component of the composition through
   :func:`~somax_plug._src.resolution.resolve` (options checked, cadence honoured),
   plus the registry's default damping when the composition names none.
2. :func:`check_requirements`: operator tags against the curvature's ``provides``
   (``psd`` implies ``symmetric``), statistics against the estimators', losses
   against the composition's loss, a preconditioner only for a solver that applies
   one, and no statistic that nobody reads. A mismatch raises
   :class:`~somax_plug.CompositionError` naming the component, what it lacks, and
   what would work (the registered alternatives and the spec's own hints).
3. :func:`resource_graph`: every resource a consumer reads, expanded through its
   provider's requirements. Providers come from the components themselves (the
   curvature provides ``operator``) and from the ``somax_plug_provide_resource``
   hook; the step provides its inputs (``params``, ``batch``, ``key``) and, once the
   direction is known, ``update`` and ``params_after``, so ``loss_after`` and
   ``predicted_decrease`` are ordinary nodes of phase ``after_update``. Each node
   records its typed :class:`~somax_plug.Consumer` records and the finest cadence
   among them.
4. :func:`run_plan_hooks`: the ``somax_plug_amend_plan`` wrappers, then every
   ``somax_plug_validate_plan`` (any plugin may veto).

Nothing here knows a built-in component by name.

Example:
    >>> from somax_plug import make_plan
    >>> plan = make_plan({"curvature": "ggn", "solver": "cg"})
    >>> sorted(r.name for r in plan.resources)[:3]
    ['grad', 'linearization', 'loss']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from somax_plug._src.composition import ComponentRef, Composition, load_composition
from somax_plug._src.errors import CompositionError, PlanVetoed
from somax_plug._src.kinds import Kind
from somax_plug._src.plan import Consumer, Plan, PlannedComponent, ResourceNode
from somax_plug._src.resolution import close_tags, resolve
from somax_plug._src.resources import (
    AFTER_UPDATE_INPUTS,
    INPUT_RESOURCES,
    STATISTICS,
    SUB,
    ResourceProvider,
)

STEP_READS = ("loss", "grad")
"""What the step itself reads every step: the loss it reports and the right-hand side."""


# ------------------------------------------------------------------ 1. resolve


def resolve_components(composition: Composition, registry: Any) -> list[PlannedComponent]:
    """The composition's components in step order (curvature, estimators, ..., damping)."""
    refs: list[tuple[str, ComponentRef | None]] = [("curvature", composition.curvature)]
    refs += [(f"estimator[{i}]", ref) for i, ref in enumerate(composition.estimators)]
    refs += [
        ("preconditioner", composition.preconditioner),
        ("solver", composition.solver),
        ("damping", composition.damping or _default_ref(Kind.DAMPING, registry)),
    ]
    return [resolve(ref, role, registry) for role, ref in refs if ref is not None]


def _default_ref(kind: Kind, registry: Any) -> ComponentRef:
    spec = registry.default(kind)
    if spec is None:
        raise CompositionError(
            f"the composition names no {kind.value} and no plugin declares a default one; "
            f"pass {kind.value}= one of: "
            + (", ".join(s.qualified_name for s in registry.list(kind)) or "(none registered)")
        )
    return ComponentRef(kind, name=spec.qualified_name)


# ------------------------------------------------------------- 2. requirements


def check_requirements(
    components: list[PlannedComponent], composition: Composition, registry: Any
) -> None:
    """Raise :class:`CompositionError` for the first unmet requirement."""
    curvature = _one(components, Kind.CURVATURE)
    provided = _provided_statistics(components)
    for c in components:
        if c.kind != Kind.CURVATURE:
            _check_tags(c, curvature, registry, frozenset(provided))
    _check_statistics(components, provided, registry)
    _check_losses(components, composition, registry)
    _check_preconditioner(components, registry)
    _check_lam_floor(components)


def _one(components: list[PlannedComponent], kind: Kind) -> PlannedComponent | None:
    return next((c for c in components if c.kind == kind), None)


def _provided_statistics(components: list[PlannedComponent]) -> dict[str, str]:
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
    return providers


def _check_tags(
    component: PlannedComponent,
    curvature: PlannedComponent | None,
    registry: Any,
    stats: frozenset[str],
) -> None:
    needed = component.requires_tags
    if not needed:
        return
    curvatures = [s.name for s in registry.list(Kind.CURVATURE) if needed <= close_tags(s.provides)]
    if curvature is None:
        raise CompositionError(
            f"{component.label} needs a {' and '.join(sorted(needed))} curvature operator, but "
            f"the composition has no curvature; add curvature= one of: "
            f"{', '.join(curvatures) or '(none registered)'}"
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
        and s.name != component.short_name
    ]
    hints = [text for tag, text in component.hints if tag in missing]
    raise CompositionError(
        f"{component.label} needs a {', '.join(sorted(missing))} operator; "
        f"{curvature.short_name!r} is only {has}; use {component.kind.value} "
        + (" or ".join(repr(a) for a in alternatives) or "(none registered fits)")
        + "".join(f", {h}" for h in hints)
        + ", or curvature "
        + (" or ".join(repr(c) for c in curvatures) or "(none registered fits)")
    )


def _check_statistics(
    components: list[PlannedComponent], provided: dict[str, str], registry: Any
) -> None:
    have = ", ".join(repr(c.short_name) for c in components if c.kind == Kind.ESTIMATOR)
    for c in components:
        for stat in sorted(c.requires_statistics - set(provided)):
            offer = registry.providers_of(Kind.ESTIMATOR, stat)
            raise CompositionError(
                f"{c.label} needs statistic {stat!r} from an estimator; the composition's "
                f"estimators ({have or 'none'}) do not provide it; add estimators= one of: "
                f"{', '.join(offer) or '(none registered provides it)'}"
            )
    read = set().union(*(c.requires_statistics for c in components))
    for c in components:
        if c.kind == Kind.ESTIMATOR and not (c.provides & read):
            readers = sorted(
                {
                    f"{s.kind.value} {s.name!r}"
                    for s in registry.list()
                    if s.requires.statistics & c.provides
                }
            )
            raise CompositionError(
                f"{c.role} {c.short_name!r} provides {', '.join(sorted(c.provides))}, which no "
                "component of the composition reads, so it would run for nothing; remove it"
                + (f", or add a component that reads it: {', '.join(readers)}" if readers else "")
            )


def _check_losses(
    components: list[PlannedComponent], composition: Composition, registry: Any
) -> None:
    loss = composition.loss
    for c in components:
        if not c.requires_losses or loss is None or loss in c.requires_losses:
            continue
        others = [
            repr(s.name)
            for s in registry.list(c.kind)
            if c.provides <= s.provides
            and (not s.requires.losses or loss in s.requires.losses)
            and s.name != c.short_name
        ]
        raise CompositionError(
            f"{c.label} needs loss {' or '.join(map(repr, sorted(c.requires_losses)))}, the "
            f"composition uses {loss!r}; use that loss"
            + (f", or {c.kind.value} " + " or ".join(others) if others else "")
        )


def _check_preconditioner(components: list[PlannedComponent], registry: Any) -> None:
    pre = _one(components, Kind.PRECONDITIONER)
    solver = _one(components, Kind.SOLVER)
    if pre is None or solver is None or solver.preconditioned:
        return
    users = [repr(s.name) for s in registry.list(Kind.SOLVER) if s.preconditioned]
    raise CompositionError(
        f"preconditioner {pre.short_name!r} would be ignored: solver {solver.short_name!r} does "
        f"not apply a preconditioner; remove the preconditioner, or use a solver that applies "
        f"one: {', '.join(users) or '(none registered)'}"
    )


def _check_lam_floor(components: list[PlannedComponent]) -> None:
    """A solver that divides by lam (``needs_positive_lam``) with a damping that reaches 0."""
    solver, damping = _one(components, Kind.SOLVER), _one(components, Kind.DAMPING)
    if solver is None or damping is None:
        return
    if not getattr(solver.instance, "needs_positive_lam", False):
        return
    floor_of = getattr(damping.instance, "lam_floor", None)
    floor = floor_of() if callable(floor_of) else None
    if floor is None or floor > 0:
        return
    raise CompositionError(
        f"{solver.label} needs lam > 0 (its Woodbury solve divides by lam, and at lam = 0 "
        f"the row-space system is singular, so every step would be rejected), but damping "
        f"{damping.short_name!r} can give lam = {floor:g}; use a positive lam (e.g. "
        "{'name': 'constant', 'lam': 1e-3}, or min_lambda > 0 for levenberg_marquardt), or "
        "solver 'cg' or 'auto' (which falls back to cg when lam = 0)"
    )


# ------------------------------------------------------------- 3. resources


def _consumers(
    components: list[PlannedComponent], composition: Composition
) -> dict[str, list[Consumer]]:
    """The resources the step, the components and the telemetry read directly."""
    reads: dict[str, list[Consumer]] = {}
    for name in STEP_READS:
        reads.setdefault(name, []).append(Consumer("step", "step"))
    for c in components:
        if c.kind == Kind.CURVATURE:
            continue  # its reads belong to the provider of ``operator`` (its build)
        for name in sorted(c.reads):
            reads.setdefault(name, []).append(
                Consumer("component", c.role, c.every_k, c.short_name)
            )
    if composition.rho_every_k:
        for name in ("loss_after", "predicted_decrease"):
            reads.setdefault(name, []).append(Consumer("info", "rho", composition.rho_every_k))
    return reads


def _component_providers(
    components: list[PlannedComponent], composition: Composition
) -> dict[str, tuple[Any, str]]:
    """Resources a component of the composition provides: the curvature's ``operator``.

    With ``curvature_batch`` the operator is built on the sub-batch context, so the
    resources it reads are its ``name@sub`` versions.
    """
    curvature = _one(components, Kind.CURVATURE)
    if curvature is None:
        return {}
    build = curvature.instance.build
    requires = curvature.requires_resources
    if composition.curvature_batch:
        requires = frozenset(r + SUB for r in requires)
        compute = lambda res: build(res.subbatch())  # noqa: E731
    else:
        compute = build
    if curvature.requires_statistics:  # its operator is built from the estimators' outputs
        requires = requires | {STATISTICS}
    provider = ResourceProvider(
        "operator",
        compute=compute,
        requires=requires,
        plugin=curvature.plugin,
        summary=f"{curvature.name}.build",
    )
    return {"operator": (provider, f"curvature:{curvature.short_name}")}


def _on_subbatch(found: tuple[ResourceProvider, str], name: str) -> tuple[ResourceProvider, str]:
    """The provider of ``name@sub``: the same computation, its edges renamed."""
    provider, label = found
    sub = attrs.evolve(
        provider,
        name=name,
        requires=frozenset(r + SUB for r in provider.requires),
        reuses=frozenset(r + SUB for r in provider.reuses),
    )
    return sub, label


def _hook_provider(name: str, registry: Any) -> tuple[ResourceProvider, str] | None:
    for plugin, result in _call_in_order(
        registry.hook.somax_plug_provide_resource, name=name, registry=registry
    ):
        if result is None:
            continue
        if not isinstance(result, ResourceProvider):
            raise CompositionError(
                f"plugin {plugin!r} answered somax_plug_provide_resource({name!r}) with "
                f"{type(result).__name__}; it must return a ResourceProvider or None"
            )
        return result, f"{plugin}:{result.name}"
    return None


def resource_graph(
    components: list[PlannedComponent], composition: Composition, registry: Any
) -> tuple[tuple[ResourceNode, ...], tuple[tuple[str, str], ...]]:
    """The resource nodes in topological order, and the provide-resource hooks used."""
    reads = _consumers(components, composition)
    own = _component_providers(components, composition)
    providers: dict[str, tuple[ResourceProvider, str]] = {}
    hooks: list[tuple[str, str]] = []
    hooked: set[str] = set()
    queue = sorted(reads)
    while queue:
        name = queue.pop(0)
        if name in providers or name in INPUT_RESOURCES | AFTER_UPDATE_INPUTS | {STATISTICS}:
            continue
        base = name.removesuffix(SUB)
        found = own.get(base) or _hook_provider(base, registry)
        if found is not None and base != name:
            found = _on_subbatch(found, name)
        if found is None:
            users = ", ".join(map(str, reads[name]))
            hint = (
                "add curvature= (for example 'ggn' or 'hessian')"
                if name == "operator"
                else "install the plugin that defines it, or see `somax-plug plan` for the "
                "resources the installed plugins provide"
            )
            raise CompositionError(
                f"{users} read resource {name!r}, but nothing in the composition or the "
                f"installed plugins provides it; {hint}"
            )
        providers[name] = found
        if base not in own and base not in hooked:
            hooks.append((f"provide_resource({base})", found[1].partition(":")[0]))
            hooked.add(base)
        for dep in sorted(found[0].requires):
            reads.setdefault(dep, []).append(Consumer("resource", name))
            queue.append(dep)
    for name, (provider, _) in list(providers.items()):  # sharing edges
        for shared in sorted(provider.reuses & set(providers)):
            reads[shared].append(Consumer("share", name))
    return _nodes(providers, reads), tuple(hooks)


def _nodes(
    providers: dict[str, tuple[ResourceProvider, str]], reads: dict[str, list[Consumer]]
) -> tuple[ResourceNode, ...]:
    def deps(name: str) -> list[str]:
        provider = providers[name][0]
        return sorted(provider.requires | (provider.reuses & set(providers)))

    every: dict[str, int] = {}

    def cadence(name: str, seen: tuple[str, ...]) -> int:
        if name not in every:
            if name in seen:
                raise CompositionError(f"resource cycle: {' -> '.join((*seen, name))}")
            # a sharing edge reads the resource only on steps it is computed anyway,
            # so it does not make it more frequent (the cheapest provider per phase)
            every[name] = min(
                (
                    cadence(c.name, (*seen, name)) if c.kind == "resource" else c.every_k
                    for c in reads[name]
                    if c.kind != "share"
                ),
                default=1,
            )
        return every[name]

    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...]) -> None:
        if name in order or name not in providers:
            return
        if name in seen:
            raise CompositionError(f"resource cycle: {' -> '.join((*seen, name))}")
        for dep in deps(name):
            visit(dep, (*seen, name))
        order.append(name)

    for name in sorted(providers):
        visit(name, ())
    after: set[str] = set()
    solve: set[str] = set()
    for name in order:  # topological: a node is after the update if it reads one that is
        needs = set(providers[name][0].requires)
        if needs & (AFTER_UPDATE_INPUTS | after):
            after.add(name)
        elif needs & ({STATISTICS} | solve):
            solve.add(name)
    _check_solve_phase(solve, reads)
    return tuple(
        ResourceNode(
            name=name,
            producer=providers[name][1],
            consumers=_unique(reads[name]),
            every_k=cadence(name, ()),
            requires=tuple(deps(name)),
            phase="after_update" if name in after else "solve" if name in solve else "step",
            provider=providers[name][0],
        )
        for name in order
    )


def _check_solve_phase(solve: set[str], reads: dict[str, list[Consumer]]) -> None:
    """Refuse a read of a ``solve``-phase resource before the estimators have run.

    A resource built from the step's estimator statistics (the operator of a curvature
    that requires statistics) exists only after the estimators; an estimator or a
    preconditioner update that reads it (directly or through a resource computed
    before the estimators), or the step's own loss and gradient, would need it first.
    """
    for name in sorted(solve):
        for c in reads.get(name, []):
            early = c.kind == "step" or (
                c.kind == "component" and c.name.split("[")[0] in ("estimator", "preconditioner"))
            if early:
                raise CompositionError(
                    f"{c} reads resource {name!r}, which is built from this step's "
                    "estimator statistics (the curvature requires statistics), so it "
                    "exists only after the estimators have run; the estimators, the "
                    "preconditioner's update and the step's loss and gradient come "
                    "before. Give the curvature its own factors (for 'kfac': "
                    f"factors='own'), or drop the component that reads {name!r} before "
                    "the solve"
                )


def _unique(consumers: list[Consumer]) -> tuple[Consumer, ...]:
    return tuple(dict.fromkeys(consumers))


# ----------------------------------------------------------------- 4. hooks


def _call_in_order(hook: Any, **kwargs: Any) -> list[tuple[str, Any]]:
    """Call each non-wrapper implementation in pluggy's order, with attribution."""
    out = []
    for impl in reversed(hook.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            continue
        out.append((impl.plugin_name, impl.function(**kwargs)))
    return out


def run_plan_hooks(plan: Plan, registry: Any) -> Plan:
    """The ``amend_plan`` wrappers, then every ``validate_plan`` (a veto raises)."""
    amended = registry.hook.somax_plug_amend_plan(plan=plan)
    if isinstance(amended, Plan):
        plan = amended
    amend_impls = [i.plugin_name for i in registry.hook.somax_plug_amend_plan.get_hookimpls()]
    vetoes, validators = [], []
    for plugin, result in _call_in_order(registry.hook.somax_plug_validate_plan, plan=plan):
        validators.append(plugin)
        for message in [result] if isinstance(result, str) else list(result or ()):
            vetoes.append(f"plugin {plugin!r}: {message}")
    if vetoes:
        raise PlanVetoed("the plan was vetoed by " + "; ".join(vetoes))
    extra = tuple(("amend_plan", p) for p in amend_impls) + tuple(
        ("validate_plan", p) for p in validators
    )
    return plan.evolve(hooks=plan.hooks + extra)


# ------------------------------------------------------------------ the whole


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
    from somax_plug._src.registry import get_registry

    registry = registry or get_registry()
    if not isinstance(composition, Composition):
        if isinstance(composition, Mapping):
            composition = Composition.from_dict(composition, registry=registry)
        else:
            composition = load_composition(composition, registry=registry)
    components = resolve_components(composition, registry)
    check_requirements(components, composition, registry)
    nodes, hooks = resource_graph(components, composition, registry)
    rho_every = composition.rho_every_k
    plan = Plan(
        curvature_batch=composition.curvature_batch,
        components=tuple(components),
        resources=nodes,
        hooks=hooks,
        registry_fingerprint=registry.fingerprint(),
        unplanned=unplanned,
        loss=composition.loss,
        learning_rate=composition.learning_rate,
        annotations=(("rho_every_k", rho_every),) if rho_every else (),
    )
    return run_plan_hooks(plan, registry)
