"""The five kinds of component, as abstract base classes.

A second-order step solves a damped curvature system and hands the direction to
Optax. Each piece of that sentence is a *kind*:

==================  ======================================================
kind                what an instance does inside the traced step
==================  ======================================================
``curvature``       ``build(res) -> LinearOperator``: C at (params, batch)
``estimator``       ``estimate(res, key, state) -> (stats, state)``
``solver``          ``solve(op, rhs, lam, precond, stats, state)``
``preconditioner``  ``update(res, stats, lam, key, state)``, ``apply(state, v, lam)``
``damping``         ``value(state)`` and ``update(state, step_stats)``
==================  ======================================================

Instances are immutable (frozen attrs classes, hashable): every option is static,
so the plan that contains them is hashable and the step compiles once. Whatever
changes from step to step lives in a *state* pytree that the instance creates
with ``init`` and whose shapes never change.

Operator tags are plain strings so that they travel through JSON unchanged:
:data:`SYMMETRIC`, :data:`PSD`, :data:`ROW_SPACE`, :data:`DIAG`.

Example:
    >>> from somax_plug import Kind, PSD
    >>> Kind("solver").value, PSD
    ('solver', 'psd')
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps import light
    from somax_plug._src.resources import Resources
    from somax_plug._src.spec import Requires

PyTree = Any
Array = Any
Stats = dict[str, Any]

SYMMETRIC = "symmetric"
"""Tag: u.Cv == v.Cu for all u, v."""
PSD = "psd"
"""Tag: v.Cv >= 0 for all v (implies :data:`SYMMETRIC`)."""
ROW_SPACE = "row_space"
"""Tag: C = U^T U with row factors U exposed by :meth:`LinearOperator.row_factors`."""
DIAG = "diag"
"""Tag: :meth:`LinearOperator.diag` returns the exact diagonal."""

OPERATOR_TAGS = frozenset({SYMMETRIC, PSD, ROW_SPACE, DIAG})


class Kind(enum.StrEnum):
    """The kinds of registered component (also the names used on the CLI)."""

    CURVATURE = "curvature"
    ESTIMATOR = "estimator"
    SOLVER = "solver"
    PRECONDITIONER = "preconditioner"
    DAMPING = "damping"


class RowFactors(NamedTuple):
    """Row-space factors of an operator: ``C = U^T U`` (before damping).

    ``matvec(v)`` computes ``U v`` (parameters -> rows, an array of shape ``[R]``)
    and ``rmatvec(r)`` computes ``U^T r`` (rows -> parameter pytree). ``num_rows``
    is R (batch size times output dimension for a GGN).
    """

    matvec: Any
    rmatvec: Any
    num_rows: int


class SolverInfo(NamedTuple):
    """Fixed-schema report of one solve."""

    iterations: Array
    residual: Array
    converged: Array


class LinearOperator(ABC):
    """A matrix-free linear operator over a parameter pytree.

    Subclasses implement :meth:`mv`; everything else has a default. ``primal``
    is a pytree with the shapes and dtypes of the vectors the operator acts on.

    Maths: for a vector ``v`` with the structure of ``primal``, ``mv(v) = C v``.
    """

    tags: frozenset[str] = frozenset()
    primal: PyTree

    @abstractmethod
    def mv(self, v: PyTree) -> PyTree:
        """Return ``C v`` (same pytree structure as ``v``)."""

    def diag(self) -> PyTree:
        """Exact diagonal of C as a pytree, where the operator can give it."""
        raise NotImplementedError(f"{type(self).__name__} has no exact diagonal")

    def row_factors(self) -> RowFactors | None:
        """Row-space factors ``U`` with ``C = U^T U``, or None."""
        return None

    def to_dense(self) -> Array:
        """Dense ``[n, n]`` matrix in ``ravel_pytree`` order (tests, small models)."""
        from somax_plug._src.tree import dense_from_mv

        return dense_from_mv(self.mv, self.primal)


class Curvature(ABC):
    """Curvature component: builds the operator C for the current step.

    Its ``build`` is the provider of the resource ``operator`` (read by every
    component that requires operator tags). No cadence: the operator is built at
    the current parameters whenever a consumer reads it.
    """

    cadence: ClassVar[bool] = False

    @abstractmethod
    def build(self, res: Resources) -> LinearOperator:
        """Return C at ``res.params`` on ``res.batch`` from the shared resources."""


class Estimator(ABC):
    """Estimator component: a statistic of the curvature from a few matvecs.

    Honours a cadence: with ``every_k = k`` it runs on steps ``0, k, 2k, ...`` and the
    last statistics are reused in between.
    """

    cadence: ClassVar[bool] = True

    @abstractmethod
    def init(self, params: PyTree) -> PyTree:
        """Initial state: a dict whose ``"stats"`` entry holds zero statistics.

        ``state["stats"]`` has exactly the structure, shapes and dtypes that
        :meth:`estimate` returns, so the step builder can reuse the last
        statistics between cadence ticks (``lax.cond`` needs equal branches).
        """

    @abstractmethod
    def estimate(self, res: Resources, key: Array, state: PyTree) -> tuple[Stats, PyTree]:
        """Return ``(stats, new_state)``; ``stats`` keys are the names it provides."""


class Solver(ABC):
    """Solver component: approximately solves ``(C + lam I) s = rhs``.

    No cadence (a direction is needed every step). A solver that applies the
    composition's preconditioner declares ``preconditioned=True``; the planner
    refuses a preconditioner for any other.
    """

    cadence: ClassVar[bool] = False
    needs_positive_lam: ClassVar[bool] = False
    """True when the solve divides by ``lam`` (the row-space Woodbury solvers): the
    planner then refuses a damping whose :meth:`Damping.lam_floor` is ``<= 0``."""

    def init(self, params: PyTree) -> PyTree:
        """Solver state (for example a warm start). Default: empty."""
        return ()

    @abstractmethod
    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        """Return ``(s, info, new_state)``. ``precond(v)`` applies M^-1 or is None."""


class Preconditioner(ABC):
    """Preconditioner component: a state and an application of M^-1.

    Honours a cadence: ``update`` runs every ``every_k`` steps, ``apply`` every step.
    """

    cadence: ClassVar[bool] = True

    @abstractmethod
    def init(self, params: PyTree) -> PyTree:
        """Initial state."""

    def update(self, res: Resources, stats: Stats, lam: Array, key: Array, state: PyTree) -> PyTree:
        """Refresh the state (run at the component's cadence). Default: unchanged."""
        return state

    @abstractmethod
    def apply(self, state: PyTree, v: PyTree, lam: Array) -> PyTree:
        """Return ``M^-1 v``."""


class StepStats(NamedTuple):
    """What a damping policy sees after the solve.

    ``loss_after`` and ``predicted_decrease`` are NaN unless the policy requires
    the resources ``loss_after`` / ``predicted_decrease``. ``finite`` is False when
    the loss, gradient or direction was not finite.
    """

    loss: Array
    loss_after: Array
    predicted_decrease: Array
    solver: SolverInfo
    finite: Array


class Damping(ABC):
    """Damping policy: the state of lambda and its update; may reject a step.

    Honours a cadence: ``update`` runs every ``every_k`` steps (in between lambda
    stays and every step is accepted unless it is not finite).
    """

    cadence: ClassVar[bool] = True

    @abstractmethod
    def init(self) -> PyTree:
        """Initial state (holds lambda)."""

    def init_for(self, params: PyTree) -> PyTree:
        """Initial state for these parameters (the step calls this). Default: ``init()``.

        Override it to follow the parameters' dtype (the built-ins store lambda in the
        parameters' accumulation dtype, float64 for float64 parameters).
        """
        return self.init()

    def lam_floor(self) -> float | None:
        """The smallest lambda this policy can ever hand to the solver, if known statically.

        None (the default): unknown. The planner refuses a solver with
        ``needs_positive_lam`` when this is ``<= 0``.
        """
        return None

    @abstractmethod
    def value(self, state: PyTree) -> Array:
        """The lambda to use for this step."""

    @abstractmethod
    def update(self, state: PyTree, stats: StepStats) -> tuple[PyTree, Array]:
        """Return ``(new_state, accept)``; ``accept`` is a boolean scalar."""


KIND_BASES: dict[Kind, type] = {
    Kind.CURVATURE: Curvature,
    Kind.ESTIMATOR: Estimator,
    Kind.SOLVER: Solver,
    Kind.PRECONDITIONER: Preconditioner,
    Kind.DAMPING: Damping,
}


def kind_of(cls: type) -> Kind | None:
    """The kind whose base class ``cls`` subclasses (None if none)."""
    for kind, base in KIND_BASES.items():
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    return None


def instance_requires(component: Any) -> Requires | None:
    """Requirements an instance declares for its options, or None for the spec's.

    A component may define ``requires`` (a :class:`~somax_plug.Requires`) as an
    attribute or property when its requirements depend on its options (``cg`` with
    its negative-curvature guard needs only a symmetric operator).
    """
    return getattr(component, "requires", None)


def instance_provides(component: Any) -> frozenset[str] | None:
    """Tags or statistics an instance declares for its options, or None."""
    return getattr(component, "provides", None)
