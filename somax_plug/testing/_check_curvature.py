"""Conformance of curvature components (private; see ``conformance.check_curvature``).

For each drawn problem (float64), the operator ``C = build(res)`` must satisfy:

* ``mv`` is linear and agrees with its dense matrix ``D`` (columns ``mv(e_j)``), and
  ``to_dense()`` (if overridden) equals ``D``;
* what the component declares in ``provides``: ``symmetric`` (``D = D^T``), ``psd``
  (``min eig D >= 0``), ``diag`` (``diag()`` equals ``diag D``), ``row_space``
  (``row_factors()`` exists and ``U^T U = D``), each within ``rtol ||D||``, and the
  operator carries those tags;
* ``D`` equals the dense reference (``jax.hessian`` / ``J^T H J``), or for a
  stochastic operator, its mean over draws does, within ``z`` standard errors;
* the jitted build-and-apply function does not retrace on a second call, and
  ``build`` reads only the resources it declares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from somax_plug._src.kinds import DIAG, PSD, ROW_SPACE, SYMMETRIC
from somax_plug._src.planner import close_tags
from somax_plug._src.spec import Requires
from somax_plug._src.tree import dense_from_mv
from somax_plug.testing import _harness as H
from somax_plug.testing._numeric import fro, min_sym_eig
from somax_plug.testing.references import REFERENCES, ProbeSolver, dense_reference
from somax_plug.testing.strategies import LOSSES, make_problem, problems


@attrs.frozen
class CurvatureConfig:
    reference: str | Callable[..., Any] | None = None
    stochastic: bool = False
    losses: Sequence[str] = LOSSES
    num_draws: int = 64
    z: float = 5.0
    rtol: float = 1e-8
    max_examples: int | None = None
    registry: Any = None


def _plan(subj: H.Subject, registry: Any) -> Any:
    from somax_plug._src.planner import make_plan

    solver = ProbeSolver(needs=Requires(resources={"operator"}))
    try:
        return make_plan({"curvature": subj.instance, "solver": solver}, registry=registry)
    except Exception as exc:  # noqa: BLE001 - any planning error is the component's
        H.composition_error(subj, exc, "planning a composition that uses it")


def _report_fn(subj: H.Subject, plan: Any, model: Any, cfg: CurvatureConfig) -> Any:
    traces: list[int] = []
    seen: dict[str, frozenset[str]] = {}
    declared = close_tags(subj.provides)

    def report(params: Any, batch: Any, key: Any, vs: Any) -> dict[str, Any]:
        traces.append(1)
        res = H.strict_resources(subj, plan, model, params, batch, key,
                                 allowed=subj.requires.resources)
        op = subj.instance.build(res)
        seen["tags"] = close_tags(frozenset(op.tags))
        _, unravel = ravel_pytree(params)
        out: dict[str, Any] = {
            "dense_mv": dense_from_mv(op.mv, params),
            "to_dense": op.to_dense(),
            "mvs": jax.vmap(lambda v: ravel_pytree(op.mv(unravel(v)))[0])(vs),
        }
        if DIAG in declared:
            out["diag"] = ravel_pytree(op.diag())[0]
        if ROW_SPACE in declared:
            factors = op.row_factors()
            if factors is None:
                H.fail(subj, "declared row_space", "row_factors() returned None")
            eye = jnp.eye(factors.num_rows, dtype=ravel_pytree(params)[0].dtype)
            out["rows_t"] = jax.vmap(lambda r: ravel_pytree(factors.rmatvec(r))[0])(eye).T
            out["u_vs"] = jax.vmap(lambda v: jnp.ravel(factors.matvec(unravel(v))))(vs)
        if isinstance(cfg.reference, str):
            out["reference"] = dense_reference(cfg.reference, model, params, batch)
        elif cfg.reference is not None:
            out["reference"] = jnp.asarray(cfg.reference(model, params, batch))
        return out

    return report, traces, seen


def _check_example(subj: H.Subject, plan: Any, cfg: CurvatureConfig, problem: Any) -> None:
    model, params, batch = problem.model, problem.params, problem.batch
    n = problem.num_params
    report, traces, seen = _report_fn(subj, plan, model, cfg)
    fn = H.jit(report)
    rng = np.random.default_rng(problem.seed)
    draws = cfg.num_draws if cfg.stochastic else 2
    keys = H.keys(problem.seed, draws)
    outs = []
    for i in range(draws):
        vs = jnp.asarray(rng.normal(size=(2, n)))
        outs.append((jax.tree_util.tree_map(np.asarray, fn(params, batch, keys[i], vs)), vs))
    where = f"on {problem.description}"
    if len(traces) != 1:
        H.fail(subj, "no recompilation",
               f"its jitted build/mv retraced ({len(traces)} traces for {draws} calls) {where}")
    declared = close_tags(subj.provides)
    missing = (declared & {SYMMETRIC, PSD, ROW_SPACE, DIAG}) - seen["tags"]
    if missing:
        H.fail(subj, "declared provides",
               f"it declares {sorted(declared)} but its operator's tags are "
               f"{sorted(seen['tags'])} (missing {sorted(missing)})")
    for out, vs in outs:
        _check_one(subj, cfg, out, np.asarray(vs), where)
    if "reference" in outs[0][0]:
        _check_reference(subj, cfg, [o for o, _ in outs], where)


def _check_one(subj: H.Subject, cfg: CurvatureConfig, out: dict, vs: np.ndarray,
               where: str) -> None:
    d = out["dense_mv"]
    scale = max(fro(d), 1e-300)
    tol = cfg.rtol * scale
    if not np.all(np.isfinite(d)):
        H.fail(subj, "finite mv", f"mv produced non-finite values {where}")
    got, want = out["mvs"], vs @ d.T
    err = np.max(np.linalg.norm(got - want, axis=1) / np.maximum(np.linalg.norm(vs, axis=1), 1))
    if err > tol:
        H.fail(subj, "linearity of mv",
               f"mv(v) differs from sum_j v_j mv(e_j) by {err:.3e} > {tol:.3e} {where}")
    if fro(out["to_dense"] - d) > tol:
        H.fail(subj, "to_dense agrees with mv",
               f"||to_dense() - [mv(e_j)]|| = {fro(out['to_dense'] - d):.3e} > {tol:.3e} {where}")
    declared = close_tags(subj.provides)
    if SYMMETRIC in declared and fro(d - d.T) > tol:
        H.fail(subj, "declared symmetric",
               f"||C - C^T|| = {fro(d - d.T):.3e} > {tol:.3e} (||C|| = {scale:.3e}) {where}")
    if PSD in declared:
        lo = min_sym_eig(d)
        if lo < -tol:
            H.fail(subj, "declared psd",
                   f"smallest eigenvalue {lo:.3e} < -{tol:.3e} (||C|| = {scale:.3e}) {where}")
    if DIAG in declared and np.max(np.abs(out["diag"] - np.diag(d)), initial=0) > tol:
        err = np.max(np.abs(out["diag"] - np.diag(d)))
        H.fail(subj, "declared diag", f"diag() differs from diag(C) by {err:.3e} {where}")
    if ROW_SPACE in declared:
        u_t = out["rows_t"]
        if fro(u_t @ u_t.T - d) > tol:
            H.fail(subj, "declared row_space",
                   f"||U^T U - C|| = {fro(u_t @ u_t.T - d):.3e} > {tol:.3e} {where}")
        if fro(out["u_vs"] - vs @ u_t) > tol * max(1.0, fro(vs)):
            H.fail(subj, "declared row_space", f"row_factors().matvec is not U v {where}")


def _check_reference(subj: H.Subject, cfg: CurvatureConfig, outs: list[dict],
                     where: str) -> None:
    ref = outs[0]["reference"]
    scale = max(fro(ref), 1e-300)
    samples = np.stack([o["dense_mv"] for o in outs])
    if not cfg.stochastic:
        err = fro(samples[0] - ref)
        if err > cfg.rtol * scale * 10:
            H.fail(subj, "agreement with the dense reference",
                   f"||C - C_ref|| = {err:.3e} (||C_ref|| = {scale:.3e}) {where}")
        return
    k = samples.shape[0]
    mean = samples.mean(axis=0)
    se = samples.std(axis=0, ddof=1) / np.sqrt(k)
    budget = cfg.z * se + cfg.rtol * scale * 10
    excess = np.abs(mean - ref) - budget
    if np.any(excess > 0):
        i, j = np.unravel_index(int(np.argmax(excess)), excess.shape)
        H.fail(subj, "unbiasedness (mean over draws equals the reference)",
               f"entry ({i}, {j}): mean of {k} draws {mean[i, j]:.6e}, reference "
               f"{ref[i, j]:.6e}, error budget {cfg.z} standard errors = {budget[i, j]:.3e} "
               f"{where}")


def check_properties(subj: H.Subject, cfg: CurvatureConfig) -> None:
    if isinstance(cfg.reference, str) and cfg.reference not in REFERENCES:
        raise ValueError(f"unknown reference {cfg.reference!r}; expected one of {REFERENCES}")
    plan = _plan(subj, cfg.registry)
    H.run_property(
        subj,
        "operator",
        problems(losses=cfg.losses),
        lambda problem: _check_example(subj, plan, cfg, problem),
        cfg.max_examples,
    )


def check_in_step(subj: H.Subject, cfg: CurvatureConfig) -> None:
    problem = make_problem(seed=7, loss=cfg.losses[0], dtype=jnp.float32)
    solver = ProbeSolver(needs=Requires(resources={"operator"}))
    rec, _ = H.check_in_step(subj, {"solver": solver}, problem, registry=cfg.registry)
    if not rec.calls.get("build"):
        H.fail(subj, "composition", "the composed step never built the operator")
    tags = [t for t in rec.seen.get("op_tags", []) if t is not None]
    declared = close_tags(subj.provides) & {SYMMETRIC, PSD, ROW_SPACE, DIAG}
    for seen in tags:
        if not declared <= close_tags(seen):
            H.fail(subj, "declared provides",
                   f"inside the step its operator has tags {sorted(seen)}, not the declared "
                   f"{sorted(declared)}")
