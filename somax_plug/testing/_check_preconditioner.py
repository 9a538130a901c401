"""Conformance of preconditioners (private; see ``conformance.check_preconditioner``).

For each drawn problem (float64), C the dense reference curvature and the statistics
the preconditioner requires computed exactly from C (``diag``, ``trace``):

* ``update`` keeps the state's structure, shapes and dtypes (it runs under
  ``lax.cond`` at its cadence and inside ``lax.scan``);
* ``apply`` is finite, linear (``M^-1 (a u + b w) = a M^-1 u + b M^-1 w``), and its
  matrix is symmetric positive definite (CG and MINRES need an SPD preconditioner);
  ``linear=False`` relaxes this to ``v . M^-1 v >= 0`` (clipped, Sophia-style maps);
* with a ``reference(C, stats, lam) -> dense M^-1``, the matrix of ``apply`` equals it;
* the jitted update-and-apply does not retrace for a new lambda and key, and
  ``update`` reads only declared resources.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from somax_plug._src.kinds import Curvature
from somax_plug._src.spec import Requires
from somax_plug._src.tree import dense_from_mv
from somax_plug.testing import _harness as H
from somax_plug.testing._numeric import fro, min_sym_eig, same_avals
from somax_plug.testing.references import (
    DenseCurvature,
    ExactStatistics,
    ProbeSolver,
    exact_statistics,
)
from somax_plug.testing.strategies import LOSSES, make_problem, problems

PrecondReference = Callable[[np.ndarray, dict, float], np.ndarray]


@attrs.frozen
class PreconditionerConfig:
    curvature: str | Curvature = "ggn"
    reference: PrecondReference | None = None
    linear: bool = True
    lams: tuple[float, float] = (0.01, 1.0)
    losses: Sequence[str] = LOSSES
    rtol: float = 1e-8
    max_examples: int | None = None
    registry: Any = None


def _helpers(subj: H.Subject) -> list[Any]:
    needed = subj.requires.statistics
    unknown = needed - {"diag", "trace"}
    if unknown:
        raise ValueError(
            f"{subj.name!r} requires statistics {sorted(unknown)} that the kit cannot provide"
        )
    return [ExactStatistics(needed)] if needed else []


def _curvature(cfg: PreconditionerConfig) -> Curvature:
    return DenseCurvature(cfg.curvature) if isinstance(cfg.curvature, str) else cfg.curvature


def _plan(subj: H.Subject, cfg: PreconditionerConfig) -> Any:
    from somax_plug._src.planner import make_plan

    composition = {
        "curvature": _curvature(cfg),
        "estimators": _helpers(subj),
        "preconditioner": subj.instance,
        "solver": ProbeSolver(needs=Requires(resources={"operator"})),
    }
    try:
        return make_plan(composition, registry=cfg.registry)
    except Exception as exc:  # noqa: BLE001 - any planning error is the component's
        H.composition_error(subj, exc, "planning a composition that uses it")


def _check_example(subj: H.Subject, plan: Any, cfg: PreconditionerConfig, problem: Any) -> None:
    model, params, batch = problem.model, problem.params, problem.batch
    _helpers(subj)  # the kit can build what it requires
    traces = []
    pre = subj.instance

    def run(params: Any, batch: Any, key: Any, lam: Any, uw: Any, ab: Any) -> Any:
        traces.append(1)
        res = H.strict_resources(subj, plan, model, params, batch, key)
        dense = res.system("operator").to_dense()
        stats = exact_statistics(dense, params, subj.requires.statistics)
        state0 = pre.init(params)
        state1 = pre.update(res, stats, lam, key, state0)
        _, unravel = ravel_pytree(params)

        def apply_flat(x: Any) -> Any:
            return ravel_pytree(pre.apply(state1, unravel(x), lam))[0]

        m = dense_from_mv(lambda v: pre.apply(state1, v, lam), params)
        combo = apply_flat(ab[0] * uw[0] + ab[1] * uw[1])
        parts = ab[0] * apply_flat(uw[0]) + ab[1] * apply_flat(uw[1])
        return dense, stats, state0, state1, m, combo, parts

    fn = H.jit(run)
    rng = np.random.default_rng(problem.seed)
    n = problem.num_params
    where = f"on {problem.description}"
    keys = H.keys(problem.seed, 2)
    for i, lam in enumerate(cfg.lams):
        uw, ab = jnp.asarray(rng.normal(size=(2, n))), jnp.asarray(rng.normal(size=2))
        out = fn(params, batch, keys[i], jnp.asarray(lam), uw, ab)
        dense, stats, state0, state1, m, combo, parts = jax.tree_util.tree_map(np.asarray, out)
        _check_one(subj, cfg, dense, stats, state0, state1, m, combo, parts, lam,
                   f"{where}, lam={lam:g}")
    if len(traces) != 1:
        H.fail(subj, "no recompilation",
               f"its jitted update/apply retraced for a new lam and key ({len(traces)} traces) "
               f"{where}")


def _check_one(subj: H.Subject, cfg: PreconditionerConfig, dense: np.ndarray, stats: dict,
               state0: Any, state1: Any, m: np.ndarray, combo: np.ndarray, parts: np.ndarray,
               lam: float, where: str) -> None:
    why = same_avals(state0, state1)
    if why:
        H.fail(subj, "fixed state types", f"update changed its state: {why} {where}")
    if not np.all(np.isfinite(m)):
        H.fail(subj, "finite application", f"apply produced non-finite values {where}")
    scale = max(fro(m), 1e-300)
    tol = cfg.rtol * scale
    if cfg.linear:
        if np.linalg.norm(combo - parts) > tol * max(1.0, np.linalg.norm(parts) / scale):
            H.fail(subj, "linearity of apply",
                   f"M^-1(a u + b w) != a M^-1 u + b M^-1 w (error "
                   f"{np.linalg.norm(combo - parts):.3e}) {where}")
        if fro(m - m.T) > tol:
            H.fail(subj, "symmetric M^-1",
                   f"||M^-1 - M^-T|| = {fro(m - m.T):.3e} > {tol:.3e} {where}")
        lo = min_sym_eig(m)
        if not lo > 0:
            H.fail(subj, "positive definite M^-1", f"smallest eigenvalue {lo:.3e} {where}")
    else:
        quad = np.diag(m)
        if np.any(quad < -tol):
            H.fail(subj, "v . M^-1 v >= 0", f"e_i . M^-1 e_i = {quad.min():.3e} {where}")
    if cfg.reference is not None:
        want = np.asarray(cfg.reference(dense, stats, lam), np.float64)
        if fro(m - want) > cfg.rtol * max(fro(want), 1e-300) * 10:
            H.fail(subj, "agreement with its reference",
                   f"||M^-1 - reference|| = {fro(m - want):.3e} (||reference|| = "
                   f"{fro(want):.3e}) {where}")


def check_properties(subj: H.Subject, cfg: PreconditionerConfig) -> None:
    plan = _plan(subj, cfg)
    H.run_property(
        subj,
        "apply",
        problems(losses=cfg.losses),
        lambda problem: _check_example(subj, plan, cfg, problem),
        cfg.max_examples,
    )


def check_in_step(subj: H.Subject, cfg: PreconditionerConfig) -> None:
    problem = make_problem(seed=7, loss=cfg.losses[0], dtype=jnp.float32)
    roles = {
        "curvature": _curvature(cfg),
        "estimators": _helpers(subj),
        "solver": ProbeSolver(needs=Requires(resources={"operator"})),
    }
    rec, _ = H.check_in_step(subj, roles, problem, registry=cfg.registry)
    if not rec.calls.get("apply"):
        H.fail(subj, "composition", "the composed step never applied the preconditioner")
    needed = subj.requires.statistics
    seen = rec.seen.get("statistics", [])
    if needed and not all(needed <= s for s in seen):
        H.fail(subj, "declared requirements",
               f"it requires statistics {sorted(needed)} but its update received "
               f"{[sorted(s) for s in seen]} in the composed step")
