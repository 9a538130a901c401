"""lineax Krylov solvers behind the somax_plug :class:`~somax_plug.Solver` interface.

Each solver wraps the damped operator ``A = C + lam I`` as a
``lineax.FunctionLinearOperator`` (:func:`somax_plug._src.operators.to_lineax`, which maps
the ``symmetric`` / ``psd`` tags to lineax's), passes the somax_plug preconditioner
``precond(v) = M^-1 v`` as lineax's ``preconditioner`` option, and solves with
``lineax.linear_solve(..., throw=False)`` so that a solve that does not converge
returns its last iterate instead of raising inside a jitted step.

:class:`~somax_plug.SolverInfo` is filled from the solution:

* ``iterations``: lineax's ``stats["num_steps"]``;
* ``residual``: the true ``||rhs - A s|| / ||rhs||``, at the price of one extra
  matvec (lineax does not report a residual);
* ``converged``: ``result == lineax.RESULTS.successful``, or the true residual is at
  most ``max(rtol, atol)`` (lineax reports an exhausted Krylov space as a
  "breakdown" even when it ended at the solution).

lineax stops when ``||r / (atol + rtol |s|)||_inf <= 1`` (a scale relative to the
solution, elementwise), not on ``||r|| / ||rhs||``; hence ``rtol`` and ``atol`` mean
what they mean in lineax.

Example:
    >>> import jax.numpy as jnp
    >>> from somax_plug._src.operators import MatrixOperator
    >>> op = MatrixOperator(jnp.diag(jnp.array([1.0, 4.0])), jnp.zeros(2), tags={"psd"})
    >>> s, info, _ = CG(rtol=1e-8).solve(op, jnp.array([1.0, 1.0]), 1.0, None, {}, ())
    >>> [round(float(x), 3) for x in s]
    [0.5, 0.2]

Reference: Rader, Lyons & Kidger (2023), "Lineax: unified linear solves and linear
least-squares in JAX and Equinox".
"""

from __future__ import annotations

from typing import Any

import attrs
import jax
import jax.numpy as jnp
import lineax as lx

from somax_plug._src import tree
from somax_plug._src.kinds import LinearOperator, Solver, SolverInfo
from somax_plug._src.operators import damp, damped_mv, to_lineax
from somax_plug._src.spec import Requires

PyTree = Any

__all__ = ["CG", "GMRES", "BiCGStab", "LineaxSolver"]


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{type(instance).__name__}: {attribute.name} must be an int >= 1")


def _nonneg(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not value >= 0:
        raise ValueError(f"{type(instance).__name__}: {attribute.name} must be >= 0")


@attrs.frozen
class LineaxSolver(Solver):
    """Base: ``(C + lam I) s = rhs`` with the lineax solver from :meth:`lineax_solver`.

    Options:
        rtol, atol: lineax's stopping tolerances (see the module docstring).
        max_steps: at most this many iterations.
    """

    rtol: float = attrs.field(default=1e-6, validator=_nonneg)
    atol: float = attrs.field(default=0.0, validator=_nonneg)
    max_steps: int = attrs.field(default=100, validator=_positive_int)

    @property
    def requires(self) -> Requires:
        # no tag needed, but the solve reads the operator: declare it, or the planner
        # hands this solver op=None (the conformance kit catches exactly that)
        return Requires(resources={"operator"})

    def lineax_solver(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Any,
        precond: Any,
        stats: Any,
        state: Any,
    ) -> tuple[PyTree, SolverInfo, Any]:
        # lam >= 0 is the damping contract, so a psd C stays psd after damping
        operator = to_lineax(damp(op, lam, nonnegative=True))
        options: dict[str, Any] = {}
        if precond is not None:
            structure = jax.eval_shape(lambda: rhs)
            options["preconditioner"] = lx.FunctionLinearOperator(
                precond, structure, frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})
            )
        bb = tree.vdot(rhs, rhs)
        sol = lx.linear_solve(operator, rhs, self.lineax_solver(), options=options, throw=False)
        s = tree.where(bb > 0, sol.value, tree.zeros_like(rhs))
        r = tree.sub(rhs, damped_mv(op, lam, s))
        residual = jnp.sqrt(tree.vdot(r, r) / jnp.where(bb > 0, bb, 1))
        # a "breakdown" or "stagnation" at the solution (the Krylov space is exhausted,
        # e.g. GMRES with restart >= n) is a success: judge it by the true residual
        at_solution = residual <= jnp.asarray(max(self.rtol, self.atol), residual.dtype)
        converged = (sol.result == lx.RESULTS.successful) | at_solution | (bb == 0)
        info = SolverInfo(
            iterations=jnp.asarray(sol.stats["num_steps"], jnp.int32),
            residual=residual.astype(bb.dtype),
            converged=jnp.asarray(converged, jnp.bool_),
        )
        return s, info, state


@attrs.frozen
class GMRES(LineaxSolver):
    """Restarted GMRES (``lineax.GMRES``); any nonsingular operator.

    Options: ``rtol``, ``atol``, ``max_steps``, ``restart`` (Krylov subspace size
    between restarts, default 20).
    """

    restart: int = attrs.field(default=20, validator=_positive_int)

    def lineax_solver(self) -> Any:
        return lx.GMRES(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps,
                        restart=self.restart)


@attrs.frozen
class BiCGStab(LineaxSolver):
    """Stabilised biconjugate gradients (``lineax.BiCGStab``); any nonsingular operator."""

    def lineax_solver(self) -> Any:
        return lx.BiCGStab(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)


@attrs.frozen
class CG(LineaxSolver):
    """Conjugate gradients (``lineax.CG``); needs a psd operator (lineax checks the tag)."""

    @property
    def requires(self) -> Requires:
        return Requires(tags={"psd"}, resources={"operator"})

    def lineax_solver(self) -> Any:
        return lx.CG(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)
