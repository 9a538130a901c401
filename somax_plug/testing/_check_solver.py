"""Conformance of solver components (private; see ``conformance.check_solver``).

Random float64 systems ``(C + lam I) s = rhs`` wrapped in
:class:`~somax_plug.MatrixOperator` over random pytree layouts, with and
without a Jacobi preconditioner. The family follows what the solver declares:

=====================================  =============================================
the solver requires                    systems
=====================================  =============================================
statistic ``diag``                     diagonal C, ``stats["diag"] = diag(C)`` exact
tag ``row_space``                      ``C = U^T U`` with row factors, ``lam > 0``
tag ``psd``                            SPD C of condition number <= ``spectrum``
tag ``symmetric`` only, or nothing     SPD and symmetric indefinite C
=====================================  =============================================

On each system: ``s`` is finite; its true relative residual
``||rhs - (C + lam I) s|| / ||rhs||`` is at most ``rtol`` and ``s`` agrees with
``jnp.linalg.solve`` (or the ``reference`` the author gives) within
``rtol * cond``; the reported ``SolverInfo.residual`` matches the true one (within a
factor 2, or ``rtol``); ``converged`` is True; the state keeps its types; the
jitted solve does not retrace for new right-hand sides. On indefinite systems,
``indefinite="finite"`` asks only for a finite ``s`` and a truthful residual (for
example CG with a negative-curvature guard, which stops instead of solving).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from somax_plug._src.kinds import PSD, ROW_SPACE, SYMMETRIC, SolverInfo
from somax_plug._src.operators import MatrixOperator
from somax_plug.testing import _harness as H
from somax_plug.testing._numeric import flat64, rel_err, same_avals
from somax_plug.testing.references import DenseCurvature, ExactStatistics
from somax_plug.testing.strategies import make_problem, systems, unravel_numpy

SolveReference = Callable[[np.ndarray, np.ndarray, float, "np.ndarray | None"], np.ndarray]


@attrs.frozen
class SolverConfig:
    kinds: Sequence[str] | None = None
    spectrum: tuple[float, float] = (1.0, 100.0)
    lams: Sequence[float] | None = None
    precondition: Sequence[bool] = (False, True)
    indefinite: str = attrs.field(
        default="solve", validator=attrs.validators.in_(("solve", "finite"))
    )
    reference: SolveReference | None = None
    reports_residual: bool = True
    rtol: float = 1e-6
    sizes: tuple[int, int] = (2, 12)
    max_examples: int | None = None
    registry: Any = None


def _kinds(subj: H.Subject, cfg: SolverConfig) -> tuple[str, ...]:
    if cfg.kinds is not None:
        return tuple(cfg.kinds)
    req = subj.requires
    if "diag" in req.statistics:
        return ("diagonal",)
    if ROW_SPACE in req.tags:
        return ("rows",)
    if PSD in req.tags:
        return ("spd",)
    return ("spd", "indefinite")


def _lams(kinds: Sequence[str], cfg: SolverConfig) -> tuple[float, ...]:
    if cfg.lams is not None:
        return tuple(cfg.lams)
    return (0.1, 1.0) if "rows" in kinds else (0.0, 0.1, 1.0)


def _operator(system: Any, primal: Any) -> MatrixOperator:
    if system.kind == "rows":
        return MatrixOperator.from_rows(jnp.asarray(system.rows), primal)
    tags = {SYMMETRIC} if system.kind == "indefinite" else {PSD}
    return MatrixOperator(jnp.asarray(system.matrix), primal, tags=tags)


def _stats(subj: H.Subject, system: Any, primal: Any) -> dict[str, Any]:
    _, unravel = ravel_pytree(primal)
    out: dict[str, Any] = {}
    if "diag" in subj.requires.statistics:
        out["diag"] = unravel(jnp.asarray(np.diag(system.matrix)))
    if "trace" in subj.requires.statistics:
        out["trace"] = jnp.asarray(np.trace(system.matrix))
    unknown = subj.requires.statistics - {"diag", "trace"}
    if unknown:
        raise ValueError(
            f"{subj.name!r} requires statistics {sorted(unknown)} that the kit cannot build"
        )
    return out


def _check_example(subj: H.Subject, cfg: SolverConfig, system: Any) -> None:
    primal = unravel_numpy(np.zeros(system.n), system.structure)
    op = _operator(system, primal)
    stats = _stats(subj, system, primal)
    minv = None if system.precond is None else jnp.asarray(system.precond)
    traces = []

    def solve(op: Any, rhs: Any, lam: Any, minv: Any, stats: Any, state: Any) -> Any:
        traces.append(1)
        if minv is None:
            precond = None
        else:
            def precond(v: Any) -> Any:
                flat, unravel = ravel_pytree(v)
                return unravel(minv.astype(flat.dtype) * flat)

        return subj.instance.solve(op, rhs, lam, precond, stats, state)

    fn = H.jit(solve)
    state0 = subj.instance.init(primal)
    rng = np.random.default_rng(system.seed + 1)
    where = (f"on a {system.kind} system of size {system.n}, lam={system.lam:g}"
             f"{', preconditioned' if minv is not None else ''} (seed {system.seed})")
    for rhs_np in (system.rhs, rng.normal(size=system.n)):
        rhs = unravel_numpy(rhs_np, system.structure)
        s, info, state1 = fn(op, rhs, jnp.asarray(system.lam), minv, stats, state0)
        _check_solution(subj, cfg, system, rhs_np, s, info, state0, state1, where)
    if len(traces) != 1:
        H.fail(subj, "no recompilation",
               f"its jitted solve retraced for a new right-hand side ({len(traces)} traces) "
               f"{where}")


def _check_solution(subj: H.Subject, cfg: SolverConfig, system: Any, b: np.ndarray, s: Any,
                    info: Any, state0: Any, state1: Any, where: str) -> None:
    if not isinstance(info, SolverInfo):
        H.fail(subj, "SolverInfo", f"solve returned {type(info).__name__}, not a SolverInfo")
    for field in SolverInfo._fields:
        if np.shape(getattr(info, field)) != ():
            H.fail(subj, "SolverInfo", f"info.{field} is not a scalar {where}")
    if not np.issubdtype(np.asarray(info.iterations).dtype, np.integer):
        H.fail(subj, "SolverInfo", f"info.iterations is not an integer {where}")
    if np.asarray(info.converged).dtype != np.bool_:
        H.fail(subj, "SolverInfo", f"info.converged is not a boolean {where}")
    why = same_avals(state0, state1)
    if why:
        H.fail(subj, "fixed state types", f"solve changed its state: {why} {where}")
    x = flat64(s)
    if x.shape != b.shape or not np.all(np.isfinite(x)):
        H.fail(subj, "finite solution", f"s is not a finite vector like rhs {where}")
    a = system.damped
    true_res = float(np.linalg.norm(b - a @ x) / np.linalg.norm(b))
    reported = float(info.residual)
    if np.isnan(reported):
        if cfg.reports_residual:
            H.fail(subj, "reported residual", f"info.residual is NaN {where}")
    elif abs(reported - true_res) > max(0.5 * max(reported, true_res), cfg.rtol):
        H.fail(subj, "reported residual",
               f"info.residual = {reported:.3e} but the true relative residual is "
               f"{true_res:.3e} {where}")
    if system.kind == "indefinite" and cfg.indefinite == "finite":
        return
    minv = None if system.precond is None else np.asarray(system.precond)
    if cfg.reference is not None:
        want = np.asarray(cfg.reference(a, b, system.lam, minv), np.float64)
        if rel_err(x, want) > cfg.rtol:
            H.fail(subj, "agreement with its reference",
                   f"||s - s_ref|| / ||s_ref|| = {rel_err(x, want):.3e} > {cfg.rtol:g} {where}")
        return
    want = np.asarray(jnp.linalg.solve(jnp.asarray(a), jnp.asarray(b)))
    cond = np.linalg.cond(a)
    if true_res > cfg.rtol or rel_err(x, want) > cfg.rtol * cond:
        H.fail(subj, "agreement with a dense solve",
               f"true relative residual {true_res:.3e} (allowed {cfg.rtol:g}), "
               f"||s - solve(A, b)|| / ||solve(A, b)|| = {rel_err(x, want):.3e} "
               f"(cond(A) = {cond:.1f}) {where}")
    if not bool(info.converged):
        H.fail(subj, "reported convergence",
               f"info.converged is False although the residual is {true_res:.3e} {where}")


def check_properties(subj: H.Subject, cfg: SolverConfig) -> None:
    kinds = _kinds(subj, cfg)
    strategy = systems(kinds=kinds, sizes=cfg.sizes, spectrum=cfg.spectrum,
                       lams=_lams(kinds, cfg), precondition=cfg.precondition)
    H.run_property(subj, "solve", strategy, lambda system: _check_example(subj, cfg, system),
                   cfg.max_examples)


def check_in_step(subj: H.Subject, cfg: SolverConfig) -> None:
    problem = make_problem(seed=7, loss="mse", dtype=jnp.float32)
    needed = subj.requires.statistics
    helpers = [ExactStatistics(needed & {"diag", "trace"})] if needed else []
    curvature = DenseCurvature("ggn")
    rec, (_, _, infos) = H.check_in_step(
        subj, {"curvature": curvature, "estimators": helpers}, problem, registry=cfg.registry
    )
    seen = rec.seen.get("statistics", [])
    if needed and not all(needed <= s for s in seen):
        H.fail(subj, "declared requirements",
               f"it requires statistics {sorted(needed)} but received "
               f"{[sorted(s) for s in seen]} in the composed step")
    res = np.asarray(infos["solver_residual"])
    if cfg.reports_residual and not np.all(np.isfinite(res)):
        H.fail(subj, "reported residual", f"non-finite residuals {res.tolist()} in the step")
