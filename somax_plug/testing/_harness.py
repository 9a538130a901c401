"""Shared machinery of the conformance checks (private; see ``conformance``).

* :func:`subject` resolves what an author passes (a spec, a registry name, a
  factory or an instance) into a :class:`Subject` with its declared requirements.
* :func:`fail` raises :class:`ConformanceError` naming the component and property.
* :func:`run_property` runs a Hypothesis property under the active profile.
* :class:`StrictResources` lets a component read only the resources it declared.
* :func:`check_in_step` composes the component with reference components, runs the
  jitted step inside ``lax.scan`` twice and checks that nothing retraces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import attrs
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from somax_plug._src.composition import ComponentRef
from somax_plug._src.errors import CompositionError, OptionError
from somax_plug._src.kinds import (
    KIND_BASES,
    Curvature,
    Damping,
    Estimator,
    Kind,
    Preconditioner,
    Solver,
)
from somax_plug._src.resolution import resolve
from somax_plug._src.resources import INPUT_RESOURCES, Resources
from somax_plug._src.spec import ComponentSpec, Requires, own_spec, spec_of

PyTree = Any


class ConformanceError(AssertionError):
    """A component violates a property of its kind's contract."""


ConformanceError.__module__ = "somax_plug.testing.conformance"  # its public home


@attrs.frozen
class Subject:
    """The component under test and what it declares."""

    kind: Kind
    name: str
    instance: Any = attrs.field(eq=False)
    provides: frozenset[str]
    requires: Requires
    every_k: int = 1
    spec: ComponentSpec | None = attrs.field(default=None, eq=False)
    preconditioned: bool = False

    @property
    def reads(self) -> frozenset[str]:
        """Resources it may read: the declared ones, plus ``operator`` if it needs tags."""
        extra = {"operator"} if self.requires.tags and self.kind != Kind.CURVATURE else set()
        return frozenset(self.requires.resources | extra)


def fail(subject: Subject, prop: str, detail: str) -> NoReturn:
    """Raise :class:`ConformanceError` for ``subject`` violating ``prop``."""
    raise ConformanceError(f"{subject.kind.value} {subject.name!r} violates {prop}: {detail}")


def subject(
    kind: Kind | str,
    component: Any,
    options: Mapping[str, Any] | None = None,
    name: str | None = None,
    registry: Any = None,
) -> Subject:
    """Resolve a spec, registry name, factory/class or instance of ``kind``.

    Resolution is the planner's own (:func:`somax_plug._src.resolution.resolve`): the
    options are checked against the declared ones and the requirements are those the
    planner would use. A hand-written spec whose factory builds a declared class must
    declare the same facts as the class.
    """
    kind = Kind(kind)
    options = dict(options or {})
    base = KIND_BASES[kind]
    spec: ComponentSpec | None = None
    ref = ComponentRef(kind, name="?", options=options)
    if isinstance(component, str):
        from somax_plug._src.registry import get_registry

        spec = (registry or get_registry()).get(kind, component)
    elif isinstance(component, ComponentSpec):
        spec = component
    elif isinstance(component, type) and own_spec(component) is not None:
        spec = own_spec(component)
    elif isinstance(component, base):
        if options:
            raise TypeError("options apply to a spec or a factory, not to an instance")
        ref = ComponentRef(kind, instance=component)
    elif callable(component):
        ref = ComponentRef(kind, instance=component(**options))
    else:
        raise TypeError(
            f"expected a ComponentSpec, a registered name, a factory or a {base.__name__} "
            f"instance, got {type(component).__name__}"
        )
    if spec is not None and spec.kind != kind:
        raise TypeError(f"{spec.name!r} is a {spec.kind.value}, not a {kind.value}")
    label = name or (
        (spec.qualified_name if spec.plugin else spec.name)
        if spec is not None
        else getattr(component, "__name__", type(ref.instance).__name__)
    )
    provisional = Subject(kind, label, ref.instance, frozenset(), Requires())
    if ref.instance is not None and not isinstance(ref.instance, base):
        fail(
            provisional,
            "the kind's base class",
            f"its factory built a {type(ref.instance).__name__}, which is not a "
            f"somax_plug.{base.__name__}",
        )
    try:
        planned = resolve(ref, kind.value, registry, spec=spec)
    except CompositionError as exc:
        fail(provisional, "resolution (the planner's)", str(exc))
    if spec is not None:
        _same_declaration(provisional, spec, spec_of(planned.instance))
    requires = Requires(
        tags=planned.requires_tags,
        statistics=planned.requires_statistics,
        resources=planned.requires_resources,
        losses=planned.requires_losses,
    )
    return Subject(
        kind,
        label,
        planned.instance,
        planned.provides,
        requires,
        planned.every_k,
        spec,
        planned.preconditioned,
    )


def _same_declaration(
    subject_: Subject, spec: ComponentSpec, declared: ComponentSpec | None
) -> None:
    """A registered spec must say what its class declares (when the class declares)."""
    if declared is None or declared is spec:
        return
    for fact in ("provides", "requires", "options", "preconditioned", "cadence", "every_k"):
        if getattr(spec, fact) != getattr(declared, fact):
            fail(
                subject_,
                "declared " + fact,
                f"the registered spec says {fact}={getattr(spec, fact)!r} but its class "
                f"{spec.factory!r} declares {getattr(declared, fact)!r}; register the class "
                "itself (register(MyClass)) so the two cannot drift",
            )


def check_options(subject_: Subject, registry: Any = None) -> None:
    """Every declared option refuses a wrong-typed value, before anything is built."""
    spec = subject_.spec or spec_of(subject_.instance)
    if spec is None:
        return
    required = {
        o.name: getattr(subject_.instance, o.name, None) for o in spec.options if o.required
    }
    for opt in spec.options:
        wrong = opt.wrong_value()
        if wrong is None:
            continue
        ref = ComponentRef(subject_.kind, name="?", options={**required, opt.name: wrong})
        try:
            resolve(ref, subject_.kind.value, registry, spec=spec)
        except OptionError as exc:
            if opt.name not in str(exc):
                fail(subject_, "option checks", f"the error for {opt.name}={wrong!r} does "
                     f"not name the option: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001
            fail(subject_, "option checks", f"{opt.name}={wrong!r} raised "
                 f"{type(exc).__name__}: {exc}, not an OptionError at compose time")
        fail(subject_, "option checks", f"option {opt.name}={wrong!r} was accepted; "
             f"declared: {opt.allowed()}")


# ----------------------------------------------------------------------- environment


@contextlib.contextmanager
def x64() -> Iterator[None]:
    """Enable float64 inside the block (``jax.enable_x64`` or its older home)."""
    manager = getattr(jax, "enable_x64", None)
    if manager is None:  # pragma: no cover - older JAX
        from jax.experimental import enable_x64 as manager
    with manager(True):
        yield


def kit_settings(max_examples: int | None = None) -> settings:
    """The active Hypothesis profile, with no deadline and no shrinking.

    Every example compiles JAX code, so a deadline would only measure the compiler,
    and shrinking a failure would recompile for each candidate; the failure message
    names the component, the property and the example's numbers instead.
    """
    extra: dict[str, Any] = {}
    if max_examples is not None:
        extra["max_examples"] = max_examples
    phases = [p for p in settings.default.phases if p != Phase.shrink]
    return settings(
        deadline=None,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **extra,
    )


def run_property(
    subject_: Subject,
    prop: str,
    strategy: st.SearchStrategy,
    body: Callable[[Any], None],
    max_examples: int | None = None,
) -> None:
    """Run ``body(example)`` on examples of ``strategy`` (Hypothesis ``given``)."""

    def test(example: Any) -> None:
        try:
            body(example)
        except ConformanceError:
            raise
        except Exception as exc:  # noqa: BLE001 - the component raised on a valid input
            fail(subject_, f"no exception ({prop})", f"it raised {type(exc).__name__}: {exc}")

    test.__name__ = f"conformance_{subject_.kind.value}_{prop}"
    test._hypothesis_internal_add_digest = (  # type: ignore[attr-defined]
        f"{subject_.kind.value}/{subject_.name}/{prop}".encode()
    )
    with x64():  # examples are drawn (and arrays built) in float64 too
        kit_settings(max_examples)(given(strategy)(test))()


FAST_COMPILE = {"xla_backend_optimization_level": 0}
"""XLA options of the kit's own jitted checks: every example compiles, and on CPU
optimisation level 0 halves the compile time of these small programs."""


def jit(fn: Callable[..., Any]) -> Any:
    """``jax.jit(fn)`` with :data:`FAST_COMPILE` where this JAX accepts compiler options."""
    try:
        return jax.jit(fn, compiler_options=FAST_COMPILE)
    except TypeError:  # pragma: no cover - JAX without compiler_options
        return jax.jit(fn)


def keys(seed: int, num: int) -> Any:
    """``num`` independent typed PRNG keys from ``seed``."""
    return jax.random.split(jax.random.key(seed % (2**31)), num)


# ------------------------------------------------------------------------- resources


class StrictResources(Resources):
    """Resources that a component may read only as far as it declared them.

    Reads made by the component itself (depth 0) must be in ``allowed`` (or the step
    inputs ``params``, ``batch``, ``key``); reads made by resource providers while
    computing a resource are not restricted. A forbidden read raises
    :class:`ConformanceError` through ``on_violation``.
    """

    def __init__(
        self, *args: Any, allowed: frozenset[str], on_violation: Callable[[str], None],
        **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.allowed = frozenset(allowed)
        self.on_violation = on_violation
        self._depth = 0

    def __getitem__(self, name: str) -> Any:
        if self._depth == 0 and name not in self.allowed and name not in INPUT_RESOURCES:
            self.on_violation(name)
        self._depth += 1
        try:
            return super().__getitem__(name)
        finally:
            self._depth -= 1

    def system(self, name: str) -> Any:
        """Read ``name`` on behalf of the harness (not counted as the component's read)."""
        self._depth += 1
        try:
            return super().__getitem__(name)
        finally:
            self._depth -= 1


def plan_providers(plan: Any) -> dict[str, Any]:
    """Resource providers of a plan."""
    return {r.name: r.provider for r in plan.resources}


def strict_resources(
    subject_: Subject,
    plan: Any,
    model: Any,
    params: PyTree,
    batch: Any,
    key: Any,
    allowed: frozenset[str] | None = None,
) -> StrictResources:
    """A :class:`StrictResources` with the plan's providers for ``subject_``."""

    def violation(name: str) -> None:
        fail(
            subject_,
            "declared resources",
            f"it read resource {name!r}, which it does not declare (declared: "
            f"{sorted(subject_.reads) or 'none'}); add it to Requires(resources=...)",
        )

    return StrictResources(
        model,
        params,
        batch,
        key,
        plan_providers(plan),
        planned=plan.resource_names,
        allowed=subject_.reads if allowed is None else allowed,
        on_violation=violation,
    )


# ------------------------------------------------------------------------------ spies


class _Recorder:
    """Counts trace-time calls and keeps trace-time observations."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.seen: dict[str, list[Any]] = {}

    def call(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    def note(self, what: str, value: Any) -> None:
        self.seen.setdefault(what, []).append(value)


class _SpyMixin:
    def _setup(self, inner: Any, subject_: Subject, every_k: int, rec: _Recorder) -> None:
        self.inner = inner
        self.requires = subject_.requires
        self.provides = subject_.provides
        self.every_k = every_k
        self.preconditioned = subject_.preconditioned
        self.rec = rec


class SpyCurvature(_SpyMixin, Curvature):
    def build(self, res: Any) -> Any:
        self.rec.call("build")
        return self.inner.build(res)


class SpyEstimator(_SpyMixin, Estimator):
    def init(self, params: PyTree) -> Any:
        return self.inner.init(params)

    def estimate(self, res: Any, key: Any, state: Any) -> Any:
        self.rec.call("estimate")
        return self.inner.estimate(res, key, state)


class SpySolver(_SpyMixin, Solver):
    def init(self, params: PyTree) -> Any:
        return self.inner.init(params)

    def solve(self, op: Any, rhs: Any, lam: Any, precond: Any, stats: Any, state: Any) -> Any:
        self.rec.call("solve")
        self.rec.note("statistics", frozenset(stats))
        self.rec.note("op_tags", None if op is None else frozenset(op.tags))
        return self.inner.solve(op, rhs, lam, precond, stats, state)


class SpyPreconditioner(_SpyMixin, Preconditioner):
    def init(self, params: PyTree) -> Any:
        return self.inner.init(params)

    def update(self, res: Any, stats: Any, lam: Any, key: Any, state: Any) -> Any:
        self.rec.call("update")
        self.rec.note("statistics", frozenset(stats or {}))
        return self.inner.update(res, stats, lam, key, state)

    def apply(self, state: Any, v: Any, lam: Any) -> Any:
        self.rec.call("apply")
        return self.inner.apply(state, v, lam)


class SpyDamping(_SpyMixin, Damping):
    """Wraps the state to record the StepStats values the policy received."""

    def init(self) -> Any:
        nan = jnp.full((), jnp.nan, jnp.float32)
        return {"inner": self.inner.init(), "loss_after": nan, "predicted_decrease": nan}

    def value(self, state: Any) -> Any:
        self.rec.call("value")
        return self.inner.value(state["inner"])

    def update(self, state: Any, stats: Any) -> Any:
        self.rec.call("update")
        new, accept = self.inner.update(state["inner"], stats)
        seen = {
            k: jnp.asarray(getattr(stats, k), jnp.float32)
            for k in ("loss_after", "predicted_decrease")
        }
        return {"inner": new, **seen}, accept


SPIES = {
    Kind.CURVATURE: SpyCurvature,
    Kind.ESTIMATOR: SpyEstimator,
    Kind.SOLVER: SpySolver,
    Kind.PRECONDITIONER: SpyPreconditioner,
    Kind.DAMPING: SpyDamping,
}


def spy(subject_: Subject, every_k: int = 1) -> tuple[Any, _Recorder]:
    """A spy wrapping the subject's instance, declaring the same requirements."""
    rec = _Recorder()
    obj = SPIES[subject_.kind].__new__(SPIES[subject_.kind])
    obj._setup(subject_.instance, subject_, every_k, rec)
    return obj, rec


# -------------------------------------------------------------------------- the step


def avals(tree_: PyTree) -> list[str]:
    """Readable ``dtype[shape]`` (``weak`` marked) of every leaf."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree_)[0]:
        aval = jax.typeof(leaf) if hasattr(jax, "typeof") else jax.core.get_aval(leaf)
        weak = " weak" if getattr(aval, "weak_type", False) else ""
        out.append(f"{jax.tree_util.keystr(path)}: {aval.str_short()}{weak}")
    return out


def composition_error(subject_: Subject, exc: Exception, where: str) -> NoReturn:
    """Turn an error raised while planning or tracing the step into a failure."""
    text = str(exc)
    if "was read but no provider is planned" in text:
        fail(subject_, "declared resources", f"{where}: {text}")
    fail(subject_, f"composition ({where})", f"{type(exc).__name__}: {text}")


def check_in_step(
    subject_: Subject,
    roles: Mapping[str, Any],
    problem: Any,
    every_k: int = 2,
    steps: int = 3,
    registry: Any = None,
) -> tuple[_Recorder, Any]:
    """Compose ``roles`` with a spy of the subject, scan the jitted step, twice.

    Returns the recorder and ``(final state, infos)`` of the second run. Fails when
    planning or tracing raises (an undeclared resource, a broken requirement), when
    the state's types change over a step, when the second run retraces the
    component, or when the step's outputs are not finite.
    """
    from somax_plug._src.composition import compose

    role = {
        Kind.CURVATURE: "curvature",
        Kind.ESTIMATOR: "estimators",
        Kind.SOLVER: "solver",
        Kind.PRECONDITIONER: "preconditioner",
        Kind.DAMPING: "damping",
    }[subject_.kind]
    cadence = every_k if subject_.kind in (Kind.ESTIMATOR, Kind.PRECONDITIONER, Kind.DAMPING) else 1
    component, rec = spy(subject_, cadence)
    kwargs = dict(roles)
    extra = list(kwargs.pop("estimators", None) or [])
    if role == "estimators":
        kwargs["estimators"] = [*extra, component]
    else:
        kwargs[role] = component
        if extra:
            kwargs["estimators"] = extra
    kwargs.setdefault("damping", _constant_damping())
    try:
        method = compose(
            predict_fn=problem.model.predict_fn,
            loss=problem.model.loss,
            learning_rate=kwargs.pop("learning_rate", 0.1),
            registry=registry,
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001 - any planning error is the component's
        composition_error(subject_, exc, "planning a composition that uses it")

    params, batch = problem.params, problem.batch
    state0 = method.init(params)

    def body(carry: Any, key: Any) -> Any:
        p, s = carry
        p, s, info = method.step(p, s, batch, key)
        return (p, s), info

    run = jit(lambda p, s, ks: jax.lax.scan(body, (p, s), ks))
    keys1, keys2 = keys(1, steps), keys(2, steps)
    try:
        (p1, s1), _ = run(params, state0, keys1)
        jax.block_until_ready(s1)
    except TypeError as exc:
        text = str(exc)
        if any(word in text for word in ("carry", "branch", "true_fun", "cond")):
            fail(
                subject_,
                "fixed state types (lax.scan / lax.cond)",
                f"the step could not run inside lax.scan with cadence every_k={cadence}: {text}",
            )
        composition_error(subject_, exc, "tracing the jitted step")
    except Exception as exc:  # noqa: BLE001 - any tracing error is the component's
        composition_error(subject_, exc, "tracing the jitted step")
    before = dict(rec.calls)
    before_avals, after_avals = avals(state0), avals(s1)
    (p2, s2), infos = run(p1, s1, keys2)
    jax.block_until_ready(s2)
    if rec.calls != before:
        changed = [f"{a}  ->  {b}" for a, b in zip(before_avals, after_avals, strict=False)
                   if a != b]
        fail(
            subject_,
            "no recompilation",
            f"the jitted step retraced it on the second call (calls {before} -> "
            f"{rec.calls}); state leaves whose types changed over a step: "
            f"{changed or 'none (look for Python-side state or non-hashable options)'}",
        )
    loss = np.asarray(infos["loss"])
    if not np.all(np.isfinite(loss)):
        fail(subject_, "finite step", f"the composed step produced losses {loss.tolist()}")
    return rec, (p2, s2, infos)


def _constant_damping(lam: float = 0.1) -> Any:
    return {"name": "builtin:constant", "lam": lam}
