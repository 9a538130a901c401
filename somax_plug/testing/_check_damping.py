"""Conformance of damping policies (private; see ``conformance.check_damping``).

On random sequences of :class:`~somax_plug.StepStats` (finite and non-finite
steps, positive and negative gain ratios):

* ``init()`` gives a lambda ``value(state)`` that is a finite scalar ``>= 0``, and so
  does every later state;
* ``update`` keeps the state's structure, shapes and dtypes and returns a boolean
  scalar ``accept``; a non-finite step (``finite=False``) is never accepted;
* the sequence run by a jitted ``update`` one step at a time (traced once) and by
  ``lax.scan`` gives the same lambdas and decisions;
* in a composed step, a policy that requires ``loss_after`` / ``predicted_decrease``
  receives finite values of them.
"""

from __future__ import annotations

from typing import Any

import attrs
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from somax_plug._src.kinds import SolverInfo, StepStats
from somax_plug.testing import _harness as H
from somax_plug.testing._numeric import same_avals
from somax_plug.testing.references import DenseCurvature, DenseSolver
from somax_plug.testing.strategies import make_problem


@attrs.frozen
class DampingConfig:
    steps: int = 6
    max_examples: int | None = None
    registry: Any = None


@st.composite
def step_stats(draw: st.DrawFn, steps: int) -> list[tuple[float, float, float, bool]]:
    """``steps`` tuples ``(loss, loss_after, predicted_decrease, finite)``."""
    out = []
    for _ in range(steps):
        loss = draw(st.floats(0.1, 10.0))
        rho = draw(st.sampled_from([-1.0, 0.0, 0.1, 0.5, 0.9, 1.0, 2.0]))
        pred = draw(st.floats(1e-3, 1.0))
        finite = draw(st.booleans()) or draw(st.booleans())
        out.append((loss, loss - rho * pred, pred, finite))
    return out


def _stats(row: Any, dtype: Any) -> StepStats:
    loss, after, pred, finite = row
    info = SolverInfo(jnp.asarray(3, jnp.int32), jnp.asarray(1e-3, dtype), jnp.asarray(True))
    return StepStats(jnp.asarray(loss, dtype), jnp.asarray(after, dtype),
                     jnp.asarray(pred, dtype), info, jnp.asarray(finite))


def _check_lambda(subj: H.Subject, lam: Any, where: str) -> None:
    if np.shape(lam) != ():
        H.fail(subj, "scalar lambda", f"value(state) has shape {np.shape(lam)} {where}")
    value = float(lam)
    if not (np.isfinite(value) and value >= 0):
        H.fail(subj, "lambda >= 0", f"value(state) = {value} {where}")


def _check_sequence(subj: H.Subject, rows: list) -> None:
    pol = subj.instance
    traces = []

    def update(state: Any, stats: StepStats) -> Any:
        traces.append(1)
        new, accept = pol.update(state, stats)
        return new, jnp.asarray(accept), pol.value(new)

    fn = H.jit(update)
    dtype = jnp.float32
    state0 = pol.init()
    _check_lambda(subj, pol.value(state0), "for init()")
    state = state0
    lams, accepts = [], []
    for i, row in enumerate(rows):
        where = f"after step {i} of {rows}"
        new, accept, lam = fn(state, _stats(row, dtype))
        why = same_avals(state0, new)
        if why:
            H.fail(subj, "fixed state types", f"update changed its state: {why} {where}")
        if np.shape(accept) != () or np.asarray(accept).dtype != np.bool_:
            H.fail(subj, "boolean accept", f"accept is {np.asarray(accept)!r} {where}")
        if not row[3] and bool(accept):
            H.fail(subj, "rejects non-finite steps",
                   f"it accepted a step with finite=False {where}")
        _check_lambda(subj, lam, where)
        lams.append(float(lam))
        accepts.append(bool(accept))
        state = new
    if len(traces) != 1:
        H.fail(subj, "no recompilation",
               f"its jitted update retraced ({len(traces)} traces for {len(rows)} steps)")
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                     *[_stats(r, dtype) for r in rows])

    def body(s: Any, stats: StepStats) -> Any:
        new, accept = pol.update(s, stats)
        return new, (jnp.asarray(accept), pol.value(new))

    try:
        _, (acc_scan, lam_scan) = H.jit(lambda s, xs: jax.lax.scan(body, s, xs))(
            state0, stacked
        )
    except TypeError as exc:
        H.fail(subj, "fixed state types (lax.scan)", f"update cannot run in lax.scan: {exc}")
    if not np.allclose(np.asarray(lam_scan, np.float64), lams, rtol=1e-5, atol=0) or (
        list(np.asarray(acc_scan)) != accepts
    ):
        H.fail(subj, "lax.scan agrees with stepping",
               f"lambdas {np.asarray(lam_scan).tolist()} / {lams}, decisions "
               f"{np.asarray(acc_scan).tolist()} / {accepts} for {rows}")


def check_properties(subj: H.Subject, cfg: DampingConfig) -> None:
    H.run_property(subj, "update", step_stats(cfg.steps),
                   lambda rows: _check_sequence(subj, rows), cfg.max_examples)


def check_in_step(subj: H.Subject, cfg: DampingConfig) -> None:
    problem = make_problem(seed=7, loss="mse", dtype=jnp.float32)
    roles = {"curvature": DenseCurvature("ggn"), "solver": DenseSolver()}
    _, (_, state, infos) = H.check_in_step(subj, roles, problem, registry=cfg.registry)
    lam = np.asarray(infos["lam"])
    if not np.all(np.isfinite(lam) & (lam >= 0)):
        H.fail(subj, "lambda >= 0", f"lambdas {lam.tolist()} in the composed step")
    for resource in ("loss_after", "predicted_decrease"):
        if resource in subj.requires.resources:
            seen = float(state.damping[resource])
            if not np.isfinite(seen):
                H.fail(subj, "declared requirements",
                       f"it requires {resource!r} but received {seen} in the composed step")
