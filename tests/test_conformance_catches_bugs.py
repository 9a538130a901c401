"""The conformance kit fails deliberately wrong components, naming the property.

Each component here is a small, plausible bug: an operator that declares ``psd`` but
is the negated GGN, a solver that returns a wrong answer or misreports its residual,
a biased estimator, components that read a resource or statistic they do not
declare, a preconditioner that is not positive definite, a damping policy that
accepts non-finite steps or whose state changes type (so the jitted step retraces).
Each check must raise an ``AssertionError`` whose message names the component and
the violated property.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import jax.numpy as jnp
import pytest

from somax_plug._src import tree
from somax_plug._src.kinds import (
    Curvature,
    Damping,
    Estimator,
    LinearOperator,
    Preconditioner,
    Solver,
)
from somax_plug._src.spec import Requires
from somax_plug.builtin.curvature import GGN
from somax_plug.builtin.damping import Constant
from somax_plug.builtin.estimators import HutchinsonDiag
from somax_plug.builtin.solvers import CG
from somax_plug.testing.conformance import (
    ConformanceError,
    check_curvature,
    check_damping,
    check_estimator,
    check_preconditioner,
    check_solver,
    make_conformance_tests,
)
from somax_plug.testing.plugin import somax_registry  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("somax_registry")

EXAMPLES = 2


# ------------------------------------------------------------------------ curvature


class _Negated(LinearOperator):
    tags = frozenset({"symmetric", "psd"})

    def __init__(self, inner: LinearOperator) -> None:
        self.inner = inner
        self.primal = inner.primal

    def mv(self, v: Any) -> Any:
        return tree.scale(-1.0, self.inner.mv(v))


@attrs.frozen
class NegatedGGN(Curvature):
    """Claims psd, returns -GGN."""

    provides: ClassVar[frozenset[str]] = frozenset({"symmetric", "psd"})
    requires: ClassVar[Requires] = Requires(resources={"linearization", "output_hessian"})

    def build(self, res: Any) -> LinearOperator:
        return _Negated(GGN().build(res))


@attrs.frozen
class SneakyGGN(Curvature):
    """Reads output_hessian without declaring it."""

    provides: ClassVar[frozenset[str]] = frozenset({"symmetric", "psd"})
    requires: ClassVar[Requires] = Requires(resources={"linearization"})

    def build(self, res: Any) -> LinearOperator:
        return GGN().build(res)


def test_negated_ggn_declaring_psd_fails():
    with pytest.raises(AssertionError, match=r"curvature 'NegatedGGN' violates declared psd"):
        check_curvature(NegatedGGN, max_examples=EXAMPLES)


def test_negated_ggn_disagrees_with_its_reference():
    bad = NegatedGGN()
    with pytest.raises(ConformanceError, match="violates (declared psd|agreement)"):
        check_curvature(bad, reference="ggn", max_examples=EXAMPLES)


def test_undeclared_resource_read_fails():
    with pytest.raises(AssertionError, match=r"violates declared resources.*'output_hessian'"):
        check_curvature(SneakyGGN, reference="ggn", max_examples=EXAMPLES)


def test_undeclared_resource_read_fails_in_a_composed_step_too():
    # only the compose() + jitted step part: the plan has no provider for it
    tests = make_conformance_tests("curvature", SneakyGGN)
    with pytest.raises(AssertionError, match=r"violates declared resources.*'output_hessian'"):
        tests().test_in_step()


# --------------------------------------------------------------------------- solvers


@attrs.frozen
class SloppyCG(CG):
    """Stops after two iterations but reports a zero residual and convergence."""

    def solve(self, op, rhs, lam, precond, stats, state):
        s, info, state = CG(maxiter=2).solve(op, rhs, lam, precond, stats, state)
        info = info._replace(residual=jnp.zeros_like(info.residual), converged=jnp.asarray(True))
        return s, info, state


@attrs.frozen
class ScaledCG(CG):
    """Solves, then returns 1.1 times the answer (reporting that answer's true residual)."""

    def solve(self, op, rhs, lam, precond, stats, state):
        s, info, state = super().solve(op, rhs, lam, precond, stats, state)
        info = info._replace(residual=jnp.asarray(0.1, info.residual.dtype))
        return tree.scale(1.1, s), info, state


@attrs.frozen
class UndeclaredDiagSolver(CG):
    """Reads stats['diag'] without requiring the statistic."""

    def solve(self, op, rhs, lam, precond, stats, state):
        s, info, state = super().solve(op, rhs, lam, precond, stats, state)
        return tree.add(s, tree.scale(0.0, stats["diag"])), info, state


def test_wrong_answer_fails():
    with pytest.raises(AssertionError, match=r"solver 'ScaledCG' violates agreement"):
        check_solver(ScaledCG, options={"tol": 1e-10, "maxiter": 200}, indefinite="finite",
                     max_examples=EXAMPLES)


def test_misreported_residual_fails():
    with pytest.raises(AssertionError, match=r"solver 'SloppyCG' violates reported residual"):
        check_solver(SloppyCG, options={"tol": 1e-10, "maxiter": 200}, indefinite="finite",
                     sizes=(6, 12), max_examples=EXAMPLES)


def test_undeclared_statistic_fails():
    with pytest.raises(AssertionError, match=r"UndeclaredDiagSolver' violates .*'diag'"):
        check_solver(UndeclaredDiagSolver, options={"tol": 1e-10, "maxiter": 200},
                     indefinite="finite", max_examples=EXAMPLES)


# ------------------------------------------------------------------------ estimators


@attrs.frozen
class BiasedDiag(HutchinsonDiag):
    """Hutchinson's diagonal, scaled by 1.5."""

    def estimate(self, res, key, state):
        stats, _ = super().estimate(res, key, state)
        stats = {"diag": tree.scale(1.5, stats["diag"])}
        return stats, {"stats": stats}


@attrs.frozen
class GreedyDiag(HutchinsonDiag):
    """Also reads the gradient, which it does not declare."""

    def estimate(self, res, key, state):
        stats, state = super().estimate(res, key, state)
        return {"diag": tree.add(stats["diag"], tree.scale(0.0, res["grad"]))}, state


@attrs.frozen
class LooseLayoutTrace(Estimator):
    """Its init stats are float32 whatever the parameters, its estimates follow them."""

    provides: ClassVar[frozenset[str]] = frozenset({"trace"})
    requires: ClassVar[Requires] = Requires(resources={"operator"})

    def init(self, params):
        return {"stats": {"trace": jnp.zeros((), jnp.float32)}}

    def estimate(self, res, key, state):
        trace = jnp.trace(res["operator"].to_dense())
        return {"trace": trace}, {"stats": {"trace": trace}}


def test_biased_estimator_fails():
    with pytest.raises(AssertionError, match=r"estimator 'BiasedDiag' violates unbiasedness"):
        check_estimator(BiasedDiag, max_examples=EXAMPLES)


def test_estimator_reading_undeclared_resource_fails():
    with pytest.raises(AssertionError, match=r"violates declared resources.*'grad'"):
        check_estimator(GreedyDiag, max_examples=EXAMPLES)


def test_estimator_with_inconsistent_init_layout_fails():
    with pytest.raises(AssertionError, match=r"violates init stats layout"):
        check_estimator(LooseLayoutTrace, max_examples=EXAMPLES)


# ---------------------------------------------------------------- preconditioner, damping


@attrs.frozen
class Flip(Preconditioner):
    """M^-1 v = -v: linear and symmetric, but not positive definite."""

    def init(self, params):
        return ()

    def apply(self, state, v, lam):
        return tree.scale(-1.0, v)


@attrs.frozen
class Reckless(Constant):
    """Accepts every step, finite or not."""

    def update(self, state, stats):
        new, _ = super().update(state, stats)
        return new, jnp.asarray(True)


@attrs.frozen
class Drifting(Damping):
    """Its lambda starts weakly typed and loses the weak type: jitted updates retrace."""

    def init(self):
        return {"lam": jnp.asarray(0.1)}

    def value(self, state):
        return state["lam"]

    def update(self, state, stats):
        lam = state["lam"] * jnp.ones((), state["lam"].dtype)
        return {"lam": lam}, jnp.asarray(stats.finite)


def test_indefinite_preconditioner_fails():
    with pytest.raises(AssertionError, match=r"preconditioner 'Flip' violates positive definite"):
        check_preconditioner(Flip, max_examples=EXAMPLES)


def test_damping_accepting_nonfinite_steps_fails():
    with pytest.raises(AssertionError, match=r"damping 'Reckless' violates rejects non-finite"):
        check_damping(Reckless, max_examples=EXAMPLES)


def test_damping_whose_state_drifts_fails():
    with pytest.raises(AssertionError, match=r"damping 'Drifting' violates no recompilation"):
        check_damping(Drifting, max_examples=EXAMPLES)


def test_the_good_originals_pass():
    """The same checks pass the components the bugs were made from."""
    check_solver(CG, options={"tol": 1e-10, "maxiter": 200}, indefinite="finite",
                 max_examples=1)
    check_damping(Constant, max_examples=1)


# ---------------------------------------------------------------------------- options


@attrs.frozen
class LooseCG(Solver):
    """CG behind options it never checks (a hand-written spec without types)."""

    maxiter: Any = 50
    tol: Any = 1e-5

    def solve(self, op, rhs, lam, precond, stats, state):
        return CG(maxiter=self.maxiter, tol=self.tol).solve(op, rhs, lam, precond, stats, state)


def test_an_untyped_option_that_accepts_anything_fails():
    from somax_plug import ComponentSpec, Option

    spec = ComponentSpec(
        kind="solver",
        name="loose_cg",
        factory=LooseCG,
        requires={"tags": {"symmetric"}},
        preconditioned=True,
        options=[Option("maxiter", 50), Option("tol", 1e-5, type=float, ge=0)],
    )
    with pytest.raises(ConformanceError, match="'loose_cg' violates option checks.*maxiter"):
        make_conformance_tests("solver", spec)().test_options()
