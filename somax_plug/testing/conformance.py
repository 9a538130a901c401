"""The conformance kit: property checks that a component honours its kind's contract.

One function per kind. Each takes the component as a
:class:`~somax_plug.ComponentSpec`, a registered name, a factory (a class or a
callable returning an instance, called with ``options``) or an instance, and runs:

1. **options** -- every declared option refuses a wrongly typed value at compose
   time, through the planner's own resolution (an untyped option whose default has
   a type is reported: it would let ``maxiter="ten"`` through to tracing);
2. **properties** -- Hypothesis property checks (``hypothesis.given`` inside, under
   the active settings profile: ``max_examples`` and ``derandomize`` come from it;
   the kit turns off the deadline and shrinking, because every example compiles JAX
   code) against dense float64 references on small random models and systems;
3. **in step** -- the component composed with reference components through the real
   :func:`somax_plug.compose` planner, its jitted step run twice inside
   ``lax.scan`` (with cadence ``every_k=2`` for estimators, preconditioners and
   damping, so both ``lax.cond`` branches must agree): planning and tracing must
   succeed, a resource read that the component did not declare fails, the second
   call must not retrace it, and what it declared it requires must reach it.

A violation raises :class:`ConformanceError` (an ``AssertionError``) whose message
names the component and the property, e.g. ``curvature 'neg_ggn' violates declared
psd: smallest eigenvalue -3.2e-01 < -1.0e-08 ...``.

==========================  ====================================================
check                       what it verifies (see each function)
==========================  ====================================================
:func:`check_curvature`     mv vs its dense matrix and a reference; declared
                            symmetric / psd / diag / row_space; unbiasedness of
                            stochastic operators
:func:`check_estimator`     statistics layout, unbiasedness within an error
                            budget (or exactness)
:func:`check_solver`        residual and agreement with ``jnp.linalg.solve`` on
                            SPD / indefinite / diagonal / row-space systems
:func:`check_preconditioner`  linear, symmetric positive definite ``M^-1``
:func:`check_damping`       ``lambda >= 0``, boolean accept, non-finite steps
                            rejected, scan agrees with stepping
==========================  ====================================================

Example (in a plugin's test-suite)::

    from somax_plug.testing.conformance import check_solver, make_conformance_tests
    from my_plugin.solvers import MyCG

    def test_my_cg_conforms():
        check_solver(MyCG, options={"tol": 1e-10, "maxiter": 200})

    # or one pytest test per check:
    TestMyCG = make_conformance_tests("solver", MyCG, options={"tol": 1e-10})
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from somax_plug._src.kinds import Kind
from somax_plug.testing import _check_curvature as _curv
from somax_plug.testing import _check_damping as _damp
from somax_plug.testing import _check_estimator as _est
from somax_plug.testing import _check_preconditioner as _pre
from somax_plug.testing import _check_solver as _sol
from somax_plug.testing import _harness as _h
from somax_plug.testing._check_estimator import (
    DEFAULT_REFERENCES,
    density_property,
    eigenpair_property,
)
from somax_plug.testing._harness import ConformanceError
from somax_plug.testing.strategies import LOSSES

__all__ = [
    "DEFAULT_REFERENCES",
    "ConformanceError",
    "check_curvature",
    "check_damping",
    "check_estimator",
    "check_preconditioner",
    "check_solver",
    "density_property",
    "eigenpair_property",
    "make_conformance_tests",
]

_CHECKS = {
    Kind.CURVATURE: (_curv.CurvatureConfig, _curv),
    Kind.ESTIMATOR: (_est.EstimatorConfig, _est),
    Kind.SOLVER: (_sol.SolverConfig, _sol),
    Kind.PRECONDITIONER: (_pre.PreconditionerConfig, _pre),
    Kind.DAMPING: (_damp.DampingConfig, _damp),
}


def _run(kind: Kind, component: Any, options: Any, name: Any, registry: Any,
         parts: Sequence[str], **config: Any) -> None:
    config_cls, module = _CHECKS[kind]
    cfg = config_cls(registry=registry, **config)
    subj = _h.subject(kind, component, options, name=name, registry=registry)
    for part in parts:
        if part == "options":
            _h.check_options(subj, registry)
        else:
            getattr(module, f"check_{part}")(subj, cfg)


_PARTS = ("options", "properties", "in_step")


def check_curvature(
    component: Any,
    *,
    reference: str | Callable[..., Any] | None = None,
    stochastic: bool = False,
    options: Mapping[str, Any] | None = None,
    losses: Sequence[str] = LOSSES,
    num_draws: int = 64,
    z: float = 5.0,
    rtol: float = 1e-8,
    max_examples: int | None = None,
    name: str | None = None,
    registry: Any = None,
) -> None:
    """Check a curvature component.

    On random small MLPs (float64) the operator ``C = build(res)`` must have a linear
    ``mv`` agreeing with its dense matrix ``D`` (and ``to_dense()``), satisfy each tag
    it declares (``||D - D^T|| <= rtol ||D||``; ``min eig D >= -rtol ||D||``; exact
    ``diag()``; ``U^T U = D``) and carry those tags. With ``reference``
    (``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``, or
    ``fn(model, params, batch) -> [n, n]``), ``D`` must equal it; with
    ``stochastic=True`` (a Monte-Carlo operator), the mean of ``D`` over ``num_draws``
    keys must, entrywise within ``z`` standard errors.

    Args:
        component: spec, registered name, factory or instance.
        losses: the losses the random models use (restrict for loss-specific ones).
        max_examples: override the profile's number of Hypothesis examples.
        name: the name used in failure messages (default: the spec's or class name).
        registry: where names and resource providers are looked up (default: the
            process-wide registry).
    """
    _run(Kind.CURVATURE, component, options, name, registry, _PARTS, reference=reference,
         stochastic=stochastic, losses=tuple(losses), num_draws=num_draws, z=z, rtol=rtol,
         max_examples=max_examples)


def check_estimator(
    component: Any,
    *,
    curvature: Any = "ggn",
    references: Mapping[str, Callable[..., Any]] | None = None,
    properties: Mapping[str, Callable[..., Any]] | None = None,
    exact: bool = False,
    options: Mapping[str, Any] | None = None,
    losses: Sequence[str] = LOSSES,
    num_draws: int = 64,
    z: float = 5.0,
    rtol: float = 1e-8,
    max_examples: int | None = None,
    name: str | None = None,
    registry: Any = None,
) -> None:
    """Check an estimator.

    The operator is the dense ``curvature`` reference (``"ggn"``, ``"hessian"``,
    ``"empirical_fisher"``) or a curvature instance. For every declared statistic,
    ``estimate`` must return it finite with the layout of ``init(params)["stats"]``,
    and over ``num_draws`` keys be unbiased within the error budget
    ``|mean - ref| <= z * s / sqrt(num_draws) + rtol * scale`` entrywise (or, with
    ``exact=True``, match in every draw). References: :data:`DEFAULT_REFERENCES`
    (``diag``, ``trace``, ``eigenvalues``) updated by ``references``
    (``stat -> fn(dense C, sample value) -> expected``); ``properties``
    (``stat -> fn(dense C, stats) -> message or None``) add per-draw checks, e.g.
    :func:`eigenpair_property`. A statistic with neither is an error, not a skip.
    """
    _run(Kind.ESTIMATOR, component, options, name, registry, _PARTS, curvature=curvature,
         references=dict(references or {}), properties=dict(properties or {}), exact=exact,
         losses=tuple(losses), num_draws=num_draws, z=z, rtol=rtol, max_examples=max_examples)


def check_solver(
    component: Any,
    *,
    options: Mapping[str, Any] | None = None,
    kinds: Sequence[str] | None = None,
    spectrum: tuple[float, float] = (1.0, 100.0),
    lams: Sequence[float] | None = None,
    precondition: Sequence[bool] = (False, True),
    indefinite: str = "solve",
    reference: Callable[..., Any] | None = None,
    reports_residual: bool = True,
    rtol: float = 1e-6,
    sizes: tuple[int, int] = (2, 12),
    max_examples: int | None = None,
    name: str | None = None,
    registry: Any = None,
) -> None:
    """Check a solver of ``(C + lam I) s = rhs``.

    Systems follow the declared requirements (see
    :mod:`somax_plug.testing._check_solver`): diagonal ones when it requires the
    statistic ``diag`` (which it then gets, exact), row-space ones when it requires
    ``row_space``, SPD ones when it requires ``psd``, SPD and indefinite ones when it
    requires only ``symmetric`` (or nothing); ``kinds`` overrides. The eigenvalues of
    C lie in ``spectrum``. The answer must have a true relative residual
    ``<= rtol`` and agree with ``jnp.linalg.solve``; pass ``options`` that let it
    converge (``tol``, ``maxiter``). ``indefinite="finite"``: on indefinite systems
    only a finite answer and a truthful residual are required. ``reference(A, b,
    lam, Minv) -> s`` replaces the dense solve (for solvers that do not solve the
    system, such as a first-order baseline), ``reports_residual=False`` allows a NaN
    ``info.residual``.
    """
    _run(Kind.SOLVER, component, options, name, registry, _PARTS,
         kinds=None if kinds is None else tuple(kinds), spectrum=spectrum,
         lams=None if lams is None else tuple(lams), precondition=tuple(precondition),
         indefinite=indefinite, reference=reference, reports_residual=reports_residual,
         rtol=rtol, sizes=sizes, max_examples=max_examples)


def check_preconditioner(
    component: Any,
    *,
    options: Mapping[str, Any] | None = None,
    curvature: Any = "ggn",
    reference: Callable[..., Any] | None = None,
    linear: bool = True,
    lams: tuple[float, float] = (0.01, 1.0),
    losses: Sequence[str] = LOSSES,
    rtol: float = 1e-8,
    max_examples: int | None = None,
    name: str | None = None,
    registry: Any = None,
) -> None:
    """Check a preconditioner.

    After ``update`` with the statistics it requires computed exactly from the dense
    ``curvature``, ``apply`` must be a linear, symmetric positive definite ``M^-1``
    (``linear=False``: only ``e_i . M^-1 e_i >= 0``), equal to ``reference(C, stats,
    lam)`` when given, with fixed state types.
    """
    _run(Kind.PRECONDITIONER, component, options, name, registry, _PARTS,
         curvature=curvature, reference=reference, linear=linear, lams=tuple(lams),
         losses=tuple(losses), rtol=rtol, max_examples=max_examples)


def check_damping(
    component: Any,
    *,
    options: Mapping[str, Any] | None = None,
    steps: int = 6,
    max_examples: int | None = None,
    name: str | None = None,
    registry: Any = None,
) -> None:
    """Check a damping policy on random sequences of ``steps`` step statistics.

    ``lambda >= 0`` and finite, ``accept`` a boolean scalar, non-finite steps never
    accepted, fixed state types, ``lax.scan`` equal to stepping, and required
    resources (``loss_after``, ``predicted_decrease``) received in a composed step.
    """
    _run(Kind.DAMPING, component, options, name, registry, _PARTS, steps=steps,
         max_examples=max_examples)


_BY_KIND: dict[Kind, Callable[..., None]] = {
    Kind.CURVATURE: check_curvature,
    Kind.ESTIMATOR: check_estimator,
    Kind.SOLVER: check_solver,
    Kind.PRECONDITIONER: check_preconditioner,
    Kind.DAMPING: check_damping,
}


def make_conformance_tests(kind: Kind | str, component: Any, **kwargs: Any) -> type:
    """A pytest test class with one test per part of ``check_<kind>(component, **kwargs)``.

    Assign it to a module-level name that starts with ``Test``::

        TestMyCG = make_conformance_tests("solver", MyCG, options={"tol": 1e-10})

    gives ``TestMyCG::test_options``, ``TestMyCG::test_properties`` and
    ``TestMyCG::test_in_step``.
    """
    kind = Kind(kind)
    inspect.signature(_BY_KIND[kind]).bind(component, **kwargs)  # unknown options fail now

    def make(part: str) -> Callable[[Any], None]:
        def test(self: Any) -> None:
            _run_part(kind, component, part, kwargs)

        test.__name__ = f"test_{part}"
        test.__doc__ = f"{kind.value} conformance: {part.replace('_', ' ')}"
        return test

    label = kwargs.get("name") or getattr(component, "__name__", None) or kind.value
    namespace = {f"test_{part}": make(part) for part in _PARTS}
    namespace["__doc__"] = f"Conformance of {kind.value} {label!r} (somax_plug.testing)."
    return type(f"TestConformance_{kind.value}", (), namespace)


def _run_part(kind: Kind, component: Any, part: str, kwargs: Mapping[str, Any]) -> None:
    kwargs = dict(kwargs)
    options = kwargs.pop("options", None)
    name = kwargs.pop("name", None)
    registry = kwargs.pop("registry", None)
    for key in ("losses", "lams", "precondition", "kinds"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    if kind == Kind.ESTIMATOR:
        kwargs["references"] = dict(kwargs.get("references") or {})
        kwargs["properties"] = dict(kwargs.get("properties") or {})
    _run(kind, component, options, name, registry, (part,), **kwargs)
