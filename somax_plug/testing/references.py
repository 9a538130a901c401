"""Dense float64 references and reference components for the conformance kit.

Dense curvature matrices of ``L(params) = loss(predict_fn(params, inputs), targets)``
in ``ravel_pytree(params)`` order, computed independently of the library's operator
code:

==================  ==========================================================
name                reference
==================  ==========================================================
``hessian``         ``jax.hessian`` of L in the flattened parameters
``ggn``             ``J^T H_out J``: ``J = jax.jacfwd`` of the flattened outputs,
                    ``H_out = jax.hessian`` of L in the flattened outputs
``fisher``          the same as ``ggn``: for the built-in losses (canonical links)
                    the Fisher equals the GGN in expectation
``empirical_fisher``  ``c sum_b g_b g_b^T`` with ``g_b`` the gradient of example b's
                    loss and ``c`` the reduction factor (1/B or 1)
==================  ==========================================================

Reference components (used by the kit to run a component inside a real composed
step, and by plugin authors as test doubles):

* :class:`DenseCurvature`: builds a :class:`~somax_plug.MatrixOperator` of
  one of the references above, reading no resource (its ``ggn`` carries row factors
  ``U = diag(sqrt(e)) Q^T J`` from ``H_out = Q diag(e) Q^T``, so it is tagged
  ``psd``, ``row_space`` and ``diag``);
* :class:`ExactStatistics`: an estimator of ``diag`` and/or ``trace`` from the dense
  operator;
* :class:`DenseSolver`: ``s = (C + lam I)^-1 rhs`` by ``jnp.linalg.solve``;
* :class:`ProbeSolver`: ``s = precond(rhs)`` (or ``rhs``), reporting the true residual
  of the damped system; it declares whatever requirements it is given, so the planner
  routes the requested statistics and resources to it.

Example:
    >>> import jax
    >>> from somax_plug.testing.strategies import make_problem
    >>> with jax.enable_x64(True):
    ...     p = make_problem(seed=0, loss="mse")
    ...     C = dense_reference("ggn", p.model, p.params, p.batch)
    >>> C.shape == (p.num_params, p.num_params)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from somax_plug._src import tree
from somax_plug._src.kinds import DIAG, PSD, SYMMETRIC, Curvature, Estimator, Solver, SolverInfo
from somax_plug._src.operators import MatrixOperator, damped_mv
from somax_plug._src.spec import Requires

PyTree = Any
Array = Any

REFERENCES = ("hessian", "ggn", "fisher", "empirical_fisher")

__all__ = [
    "REFERENCES",
    "DenseCurvature",
    "DenseSolver",
    "ExactStatistics",
    "ProbeSolver",
    "dense_reference",
    "exact_statistics",
    "ggn_rows",
]


def _flat_loss(model: Any, params: PyTree, batch: Any) -> tuple[Callable, Array]:
    flat, unravel = ravel_pytree(params)
    return (lambda x: model.loss_value(unravel(x), batch)), flat


def ggn_rows(model: Any, params: PyTree, batch: Any) -> Array:
    """Row factors ``U`` (``[B K, n]``) with ``U^T U = J^T H_out J``."""
    flat, unravel = ravel_pytree(params)
    inputs, targets = batch

    def outputs(x: Array) -> Array:
        return jnp.ravel(model.outputs(unravel(x), inputs))

    z = model.outputs(params, inputs)
    zf = jnp.ravel(z)
    jac = jax.jacfwd(outputs)(flat)  # [BK, n]
    h_out = jax.hessian(lambda u: model.loss(u.reshape(z.shape), targets))(zf)
    e, q = jnp.linalg.eigh((h_out + h_out.T) / 2)
    return (jnp.sqrt(jnp.maximum(e, 0))[:, None] * q.T) @ jac


def dense_reference(name: str, model: Any, params: PyTree, batch: Any) -> Array:
    """The dense ``[n, n]`` reference curvature ``name`` (see the module table)."""
    if name == "hessian":
        fn, flat = _flat_loss(model, params, batch)
        h = jax.hessian(fn)(flat)
        return (h + h.T) / 2
    if name in ("ggn", "fisher"):
        u = ggn_rows(model, params, batch)
        return u.T @ u
    if name == "empirical_fisher":
        flat, unravel = ravel_pytree(params)
        inputs, targets = batch

        def one(x: Any, y: Any) -> Array:
            def loss_b(p: Array) -> Array:
                outputs = model.outputs(unravel(p), x[None])
                return model.loss.per_example(outputs, y[None])[0]

            return jax.grad(loss_b)(flat)

        g = jax.vmap(one)(inputs, targets)  # [B, n]
        return model.scale(batch) * g.T @ g
    raise ValueError(f"unknown reference {name!r}; expected one of {REFERENCES}")


@attrs.frozen
class DenseCurvature(Curvature):
    """A reference curvature: the dense matrix of ``reference`` as a MatrixOperator.

    Reads no resource (it differentiates ``res.model`` itself), so a composition that
    uses it plans only what the *other* components declare.

    Attributes:
        reference: ``"ggn"`` (tags psd, row_space, diag), ``"hessian"`` (symmetric,
            diag) or ``"empirical_fisher"`` (psd, diag).
    """

    reference: str = attrs.field(default="ggn", validator=attrs.validators.in_(REFERENCES))

    @property
    def provides(self) -> frozenset[str]:
        if self.reference in ("ggn", "fisher"):
            return frozenset({SYMMETRIC, PSD, "row_space", DIAG})
        if self.reference == "empirical_fisher":
            return frozenset({SYMMETRIC, PSD, DIAG})
        return frozenset({SYMMETRIC, DIAG})

    @property
    def requires(self) -> Requires:
        return Requires()

    def build(self, res: Any) -> MatrixOperator:
        model, params, batch = res.model, res.params, res.batch
        if self.reference in ("ggn", "fisher"):
            rows = ggn_rows(model, params, batch)
            return MatrixOperator.from_rows(rows, params)
        matrix = dense_reference(self.reference, model, params, batch)
        tags = {PSD} if self.reference == "empirical_fisher" else {SYMMETRIC}
        return MatrixOperator(matrix, params, tags=tags)


@attrs.frozen
class ExactStatistics(Estimator):
    """A reference estimator: exact ``diag`` and/or ``trace`` of the dense operator.

    Attributes:
        statistics: the statistics to provide (a subset of ``{"diag", "trace"}``).
    """

    statistics: frozenset[str] = attrs.field(
        default=frozenset({"diag"}), converter=frozenset
    )

    def __attrs_post_init__(self) -> None:
        unknown = self.statistics - {"diag", "trace"}
        if unknown:
            raise ValueError(
                f"ExactStatistics provides only 'diag' and 'trace', not {sorted(unknown)}"
            )

    @property
    def provides(self) -> frozenset[str]:
        return self.statistics

    @property
    def requires(self) -> Requires:
        return Requires(resources={"operator"})

    def init(self, params: PyTree) -> dict[str, Any]:
        return {"stats": _stat_zeros(self.statistics, params)}

    def estimate(self, res: Any, key: Any, state: Any) -> tuple[dict[str, Any], Any]:
        op = res["operator"]
        stats = exact_statistics(op.to_dense(), op.primal, self.statistics)
        return stats, {"stats": stats}


def _stat_zeros(names: frozenset[str], params: PyTree) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "diag" in names:
        out["diag"] = tree.zeros_like(params)
    if "trace" in names:
        out["trace"] = jnp.zeros((), tree.accum_dtype(params))
    return out


def exact_statistics(dense: Array, params: PyTree, names: frozenset[str]) -> dict[str, Any]:
    """``diag`` (a pytree like ``params``) and/or ``trace`` of a dense ``[n, n]`` matrix."""
    _, unravel = ravel_pytree(params)
    zeros = _stat_zeros(names, params)
    stats: dict[str, Any] = {}
    if "diag" in names:
        stats["diag"] = tree.cast_like(unravel(jnp.diagonal(dense)), zeros["diag"])
    if "trace" in names:
        stats["trace"] = jnp.trace(dense).astype(zeros["trace"].dtype)
    return stats


def _relative_residual(op: Any, lam: Array, rhs: PyTree, s: PyTree) -> Array:
    r = tree.sub(rhs, damped_mv(op, lam, s))
    bb = tree.vdot(rhs, rhs)
    return jnp.sqrt(tree.vdot(r, r) / jnp.where(bb > 0, bb, 1))


@attrs.frozen
class DenseSolver(Solver):
    """A reference solver: ``s = (C + lam I)^-1 rhs`` with ``jnp.linalg.solve``."""

    @property
    def requires(self) -> Requires:
        return Requires(resources={"operator"})

    def solve(
        self, op: Any, rhs: PyTree, lam: Array, precond: Any, stats: Any, state: Any
    ) -> tuple[PyTree, SolverInfo, Any]:
        b, unravel = ravel_pytree(rhs)
        dense = op.to_dense().astype(b.dtype)
        a = dense + jnp.asarray(lam).astype(b.dtype) * jnp.eye(b.shape[0], dtype=b.dtype)
        s = tree.cast_like(unravel(jnp.linalg.solve(a, b)), rhs)
        rel = _relative_residual(op, lam, rhs, s)
        info = SolverInfo(jnp.asarray(1, jnp.int32), rel, jnp.all(jnp.isfinite(rel)))
        return s, info, state


@attrs.frozen
class ProbeSolver(Solver):
    """``s = precond(rhs)`` (or ``rhs``) with whatever requirements it is given.

    It reads the operator when ``requires`` asks for it (tags or the resource
    ``operator``) and then reports the true residual of ``(C + lam I) s = rhs``;
    otherwise the residual is NaN. Useful to route statistics or an operator to a
    composition whose solver does not matter.
    """

    needs: Requires = attrs.field(factory=Requires)
    preconditioned: ClassVar[bool] = True  # it applies the composition's preconditioner

    @property
    def requires(self) -> Requires:
        return self.needs

    def solve(
        self, op: Any, rhs: PyTree, lam: Array, precond: Any, stats: Any, state: Any
    ) -> tuple[PyTree, SolverInfo, Any]:
        s = precond(rhs) if precond is not None else rhs
        dt = tree.accum_dtype(rhs)
        rel = _relative_residual(op, lam, rhs, s) if op is not None else jnp.asarray(jnp.nan, dt)
        info = SolverInfo(jnp.asarray(1, jnp.int32), jnp.asarray(rel, dt), tree.all_finite(s))
        return s, info, state
