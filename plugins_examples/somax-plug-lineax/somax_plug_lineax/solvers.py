"""lineax Krylov solvers behind the somax_plug :class:`~somax_plug.Solver` interface.

Each solver wraps the damped operator ``A = C + lam I`` as a
``lineax.FunctionLinearOperator`` (:func:`somax_plug.to_lineax`, which maps
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
    >>> from somax_plug import MatrixOperator
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

from somax_plug import (
    LinearOperator,
    Solver,
    SolverInfo,
    damp,
    damped_mv,
    declare,
    lazy_import,
    option,
    to_lineax,
    tree,
)

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")
lx = lazy_import("lineax")

PyTree = Any

__all__ = ["CG", "GMRES", "BiCGStab", "LineaxSolver"]


@attrs.frozen
class LineaxSolver(Solver):
    """Base: ``(C + lam I) s = rhs`` with the lineax solver from :meth:`lineax_solver`.

    Options:
        rtol, atol: lineax's stopping tolerances (see the module docstring).
        max_steps: at most this many iterations.
    """

    rtol: float = option(1e-6, ge=0, doc="lineax's relative tolerance")
    atol: float = option(0.0, ge=0, doc="lineax's absolute tolerance")
    max_steps: int = option(100, ge=1, doc="at most this many iterations")

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


# No tag needed, but the solves read the operator: declare it, or the planner hands
# the solver op=None (the conformance kit catches exactly that).
@declare(
    "lineax_gmres",
    summary="lineax restarted GMRES: any (also nonsymmetric) operator",
    requires={"resources": {"operator"}},
    preconditioned=True,
)
@attrs.frozen
class GMRES(LineaxSolver):
    """Restarted GMRES (``lineax.GMRES``); any nonsingular operator.

    Options: ``rtol``, ``atol``, ``max_steps``, ``restart`` (Krylov subspace size
    between restarts, default 20).
    """

    restart: int = option(20, ge=1, doc="Krylov subspace size between restarts")

    def lineax_solver(self) -> Any:
        return lx.GMRES(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps,
                        restart=self.restart)


@declare(
    "lineax_bicgstab",
    summary="lineax BiCGStab: any (also nonsymmetric) operator",
    requires={"resources": {"operator"}},
    preconditioned=True,
)
@attrs.frozen
class BiCGStab(LineaxSolver):
    """Stabilised biconjugate gradients (``lineax.BiCGStab``); any nonsingular operator."""

    def lineax_solver(self) -> Any:
        return lx.BiCGStab(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)


@declare(
    "lineax_cg",
    summary="lineax conjugate gradients: psd operators, SPD preconditioner",
    requires={"tags": {"psd"}, "resources": {"operator"}},
    preconditioned=True,
)
@attrs.frozen
class CG(LineaxSolver):
    """Conjugate gradients (``lineax.CG``); needs a psd operator (lineax checks the tag)."""

    def lineax_solver(self) -> Any:
        return lx.CG(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)
