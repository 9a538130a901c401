"""Conformance of estimator components (private; see ``conformance.check_estimator``).

For each drawn problem (float64), with the operator C of a reference curvature:

* ``estimate`` returns exactly the declared statistics, finite, with the structure,
  shapes and dtypes of ``init(params)["stats"]`` (the cadence contract: between
  ticks the step reuses the stored statistics in ``lax.cond``), and a new state of
  the same types as ``init``'s;
* unbiasedness within an explicit error budget: over ``num_draws`` independent keys,
  every entry of the mean of each statistic with a reference (``diag``: the diagonal
  of C, ``trace``: its trace, ``eigenvalues``: the leading eigenvalues) satisfies
  ``|mean - ref| <= z * s / sqrt(num_draws) + rtol * scale``, ``s`` the sample
  standard deviation of that entry and ``scale`` the largest ``|ref|`` (or
  ``||C||``); with ``exact=True`` every single draw must match;
* extra per-draw ``properties`` (see :func:`eigenpair_property`,
  :func:`density_property`) hold;
* the jitted estimate does not retrace across keys, and reads only declared resources.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import jax
import jax.numpy as jnp
import numpy as np

from somax_plug._src.kinds import Curvature, Kind
from somax_plug._src.spec import Requires
from somax_plug.testing import _harness as H
from somax_plug.testing._numeric import flat64, fro, same_avals
from somax_plug.testing.references import DenseCurvature, ExactStatistics, ProbeSolver
from somax_plug.testing.strategies import LOSSES, make_problem, problems

Reference = Callable[[np.ndarray], Any]
Property = Callable[[np.ndarray, Any], "str | None"]


def _top_eigenvalues(dense: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.linalg.eigvalsh((dense + dense.T) / 2))[::-1][:k]


DEFAULT_REFERENCES: dict[str, Callable[[np.ndarray, Any], Any]] = {
    "diag": lambda dense, value: np.diag(dense),
    "trace": lambda dense, value: np.trace(dense),
    "eigenvalues": lambda dense, value: _top_eigenvalues(dense, int(np.size(value))),
}
"""Expected value of the known statistics, given the dense C (and a sample, for sizes)."""


def eigenpair_property(
    dense: np.ndarray, stats: Mapping[str, Any], rtol: float = 1e-6
) -> str | None:
    """Unit eigenvectors with ``||C v_i - lambda_i v_i|| <= rtol ||C||`` (exact Lanczos)."""
    leaves = jax.tree_util.tree_leaves(stats["eigenvectors"])
    k = int(np.shape(leaves[0])[0])
    rows = np.concatenate([np.asarray(x, np.float64).reshape(k, -1) for x in leaves], axis=1)
    vals = np.asarray(stats["eigenvalues"], np.float64)
    norms = np.linalg.norm(rows, axis=1)
    if np.any(np.abs(norms - 1) > 1e-6):
        return f"eigenvectors are not unit vectors (norms {norms.round(6).tolist()})"
    resid = np.linalg.norm(rows @ dense.T - vals[:, None] * rows, axis=1)
    scale = max(fro(dense), 1e-300)
    if np.any(resid > rtol * scale):
        return f"eigenpair residuals ||C v - lambda v|| = {resid.tolist()} > {rtol:g} ||C||"
    return None


def density_property(dense: np.ndarray, stats: Mapping[str, Any]) -> str | None:
    """A spectral density on a uniform grid: nonnegative, integrating to about 1."""
    grid = np.asarray(stats["spectral_density"]["grid"], np.float64)
    dens = np.asarray(stats["spectral_density"]["density"], np.float64)
    if np.any(dens < 0):
        return f"negative density {dens.min():.3e}"
    mass = float(dens.sum() * (grid[1] - grid[0]))
    if not 0.9 <= mass <= 1.1:
        return f"density integrates to {mass:.4f}, not about 1"
    return None


@attrs.frozen
class EstimatorConfig:
    curvature: str | Curvature = "ggn"
    references: Mapping[str, Callable[[np.ndarray, Any], Any]] = attrs.field(factory=dict)
    properties: Mapping[str, Property] = attrs.field(factory=dict)
    exact: bool = False
    losses: Sequence[str] = LOSSES
    num_draws: int = 64
    z: float = 5.0
    rtol: float = 1e-8
    max_examples: int | None = None
    registry: Any = None


def _curvature(cfg: EstimatorConfig) -> Curvature:
    return DenseCurvature(cfg.curvature) if isinstance(cfg.curvature, str) else cfg.curvature


def _helpers(subj: H.Subject) -> list[Any]:
    needed = subj.requires.statistics
    unknown = needed - {"diag", "trace"}
    if unknown:
        raise ValueError(
            f"{subj.name!r} requires statistics {sorted(unknown)} that the kit cannot provide; "
            "test it in a composition of your own"
        )
    return [ExactStatistics(needed)] if needed else []


def _roles(subj: H.Subject, cfg: EstimatorConfig) -> dict[str, Any]:
    solver = ProbeSolver(needs=Requires(statistics=subj.provides, resources={"operator"}))
    return {"curvature": _curvature(cfg), "solver": solver, "helpers": _helpers(subj)}


def _plan(subj: H.Subject, cfg: EstimatorConfig) -> Any:
    from somax_plug._src.planner import make_plan

    roles = _roles(subj, cfg)
    composition = {
        "curvature": roles["curvature"],
        "solver": roles["solver"],
        "estimators": [subj.instance, *roles["helpers"]],
    }
    try:
        return make_plan(composition, registry=cfg.registry)
    except Exception as exc:  # noqa: BLE001 - any planning error is the component's
        H.composition_error(subj, exc, "planning a composition that uses it")


def _check_example(subj: H.Subject, plan: Any, cfg: EstimatorConfig, problem: Any) -> None:
    model, params, batch = problem.model, problem.params, problem.batch
    traces = []

    def draw(params: Any, batch: Any, key: Any) -> Any:
        traces.append(1)
        res = H.strict_resources(subj, plan, model, params, batch, key)
        dense = res.system("operator").to_dense()
        state = subj.instance.init(params)
        stats, new_state = subj.instance.estimate(res, key, state)
        return stats, new_state, state, dense

    fn = H.jit(draw)
    keys = H.keys(problem.seed, cfg.num_draws)
    where = f"on {problem.description}"
    samples = []
    for i in range(cfg.num_draws):
        stats, new_state, state, dense = fn(params, batch, keys[i])
        if i == 0:
            _check_layout(subj, stats, new_state, state, where)
        samples.append(jax.tree_util.tree_map(np.asarray, stats))
    if len(traces) != 1:
        H.fail(subj, "no recompilation",
               f"its jitted estimate retraced ({len(traces)} traces for {cfg.num_draws} keys) "
               f"{where}")
    dense = np.asarray(dense, np.float64)
    for stat in sorted(subj.provides):
        check = cfg.properties.get(stat)
        if check is not None:
            for sample in samples:
                problem_text = check(dense, sample)
                if problem_text:
                    H.fail(subj, f"statistic {stat!r}", f"{problem_text} {where}")
        ref_fn = cfg.references.get(stat, DEFAULT_REFERENCES.get(stat))
        if ref_fn is None:
            continue
        _check_unbiased(subj, cfg, stat, dense, [s[stat] for s in samples], ref_fn, where)


def _check_layout(subj: H.Subject, stats: Any, new_state: Any, state: Any, where: str) -> None:
    if set(stats) != set(subj.provides):
        H.fail(subj, "declared provides",
               f"estimate returned statistics {sorted(stats)}, but it declares "
               f"{sorted(subj.provides)} {where}")
    if not isinstance(state, dict) or "stats" not in state:
        H.fail(subj, "estimator state layout",
               f"init(params) must return a dict with a 'stats' entry, got "
               f"{type(state).__name__} {where}")
    why = same_avals(state["stats"], stats)
    if why:
        H.fail(subj, "init stats layout (cadence contract)",
               f"init(params)['stats'] and estimate's statistics differ: {why} {where}")
    why = same_avals(state, new_state)
    if why:
        H.fail(subj, "fixed state types", f"estimate changed its state: {why} {where}")
    kept, given = flat64(new_state["stats"]), flat64(stats)
    if not np.array_equal(kept, given, equal_nan=True):
        H.fail(subj, "init stats layout (cadence contract)",
               f"the new state's 'stats' differ from the statistics returned (the step "
               f"reuses state['stats'] between cadence ticks) {where}")
    for stat, value in stats.items():
        if not np.all(np.isfinite(flat64(value))):
            H.fail(subj, f"statistic {stat!r}", f"it is not finite {where}")


def _check_unbiased(subj: H.Subject, cfg: EstimatorConfig, stat: str, dense: np.ndarray,
                    values: list[Any], ref_fn: Any, where: str) -> None:
    x = np.stack([flat64(v) for v in values])
    ref = flat64(ref_fn(dense, values[0]))
    if ref.shape != x.shape[1:]:
        H.fail(subj, f"statistic {stat!r}",
               f"has {x.shape[1]} entries, the reference {ref.shape[0]} {where}")
    scale = max(float(np.max(np.abs(ref), initial=0.0)), fro(dense), 1e-300)
    atol = cfg.rtol * scale
    if cfg.exact:
        err = np.max(np.abs(x - ref[None]), axis=0)
        if np.any(err > atol):
            i = int(np.argmax(err))
            H.fail(subj, f"exactness of {stat!r}",
                   f"entry {i}: a draw differs from the reference {ref[i]:.6e} by {err[i]:.3e} "
                   f"> {atol:.3e} {where}")
        return
    k = x.shape[0]
    mean = x.mean(axis=0)
    se = x.std(axis=0, ddof=1) / np.sqrt(k)
    budget = cfg.z * se + atol
    excess = np.abs(mean - ref) - budget
    if np.any(excess > 0):
        i = int(np.argmax(excess))
        H.fail(subj, f"unbiasedness of {stat!r}",
               f"entry {i}: mean of {k} draws {mean[i]:.6e}, expected {ref[i]:.6e}; error "
               f"{abs(mean[i] - ref[i]):.3e} > budget {cfg.z:g} standard errors + "
               f"{cfg.rtol:g} * scale = {budget[i]:.3e} {where}")


def check_properties(subj: H.Subject, cfg: EstimatorConfig) -> None:
    for stat in sorted(subj.provides):
        if stat not in cfg.properties and stat not in {**DEFAULT_REFERENCES, **cfg.references}:
            raise ValueError(
                f"statistic {stat!r} of {subj.name!r} has no reference; pass "
                f"references={{{stat!r}: fn(dense, value) -> expected}} or "
                f"properties={{{stat!r}: fn(dense, stats) -> message or None}}"
            )
    plan = _plan(subj, cfg)
    H.run_property(
        subj,
        "statistics",
        problems(losses=cfg.losses),
        lambda problem: _check_example(subj, plan, cfg, problem),
        cfg.max_examples,
    )


def check_in_step(subj: H.Subject, cfg: EstimatorConfig) -> None:
    problem = make_problem(seed=7, loss=cfg.losses[0], dtype=jnp.float32)
    roles = _roles(subj, cfg)
    helpers = roles.pop("helpers")
    spy_solver, solver_rec = H.spy(
        H.Subject(Kind.SOLVER, "probe", roles["solver"], frozenset(), roles["solver"].needs)
    )
    roles["solver"] = spy_solver
    H.check_in_step(subj, {**roles, "estimators": helpers}, problem, registry=cfg.registry)
    seen = solver_rec.seen.get("statistics", [])
    if not seen or not all(subj.provides <= s for s in seen):
        H.fail(subj, "declared provides",
               f"inside the composed step the solver received statistics "
               f"{[sorted(s) for s in seen]}, not the declared {sorted(subj.provides)}")
