"""Damping policies: bounds, rejection, schedules, scan-stable state."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from somax_plug import requirements_of
from somax_plug._src.kinds import SolverInfo, StepStats
from somax_plug._src.spec import Requires
from somax_plug.builtin import damping as D

INFO = SolverInfo(jnp.int32(3), jnp.float32(1e-3), jnp.bool_(True))


def step_stats(loss, loss_after, predicted, finite=True) -> StepStats:
    return StepStats(
        loss=jnp.asarray(loss, jnp.float32),
        loss_after=jnp.asarray(loss_after, jnp.float32),
        predicted_decrease=jnp.asarray(predicted, jnp.float32),
        solver=INFO,
        finite=jnp.asarray(finite),
    )


special = st.sampled_from([math.nan, math.inf, -math.inf])
number = st.one_of(st.floats(-1e3, 1e3), special)
stats_rows = st.tuples(number, number, number, st.booleans())
"""(loss, loss_after, predicted_decrease, finite): arbitrary, including NaN and inf."""

LM = D.LevenbergMarquardt(init=1.0, increase=3.0, decrease=0.3, min_lambda=1e-3, max_lambda=1e2)


def lm_reference(lm: D.LevenbergMarquardt, rows):
    """The documented rule, in float64 Python, step by step."""
    lam = min(max(lm.init_value, lm.min_lambda), lm.max_lambda)
    out = []
    for loss, after, pred, finite in rows:
        ok = finite and all(math.isfinite(x) for x in (loss, after, pred))
        rho = (loss - after) / pred if pred > 0 else -math.inf
        ok = ok and not math.isnan(rho)
        accept = ok and rho >= lm.eta
        if not ok or rho < lm.rho_low:
            lam *= lm.increase
        elif rho > lm.rho_high:
            lam *= lm.decrease
        lam = min(max(lam, lm.min_lambda), lm.max_lambda)
        out.append((lam, accept))
    return out


@jax.jit
def _lm_scan(columns):
    def step(state, row):
        loss, after, pred, finite = row
        state, accept = LM.update(state, step_stats(loss, after, pred, finite))
        return state, (LM.value(state), accept, state.rho)

    return jax.lax.scan(step, LM.init(), columns)


def _columns(rows):
    padded = list(rows) + [(1.0, 0.5, 0.5, True)] * (20 - len(rows))  # one compile
    loss, after, pred, finite = zip(*padded, strict=True)
    return (
        jnp.asarray(loss, jnp.float32),
        jnp.asarray(after, jnp.float32),
        jnp.asarray(pred, jnp.float32),
        jnp.asarray(finite),
    ), padded


@given(st.lists(stats_rows, min_size=1, max_size=20))
def test_levenberg_marquardt_keeps_lambda_in_bounds_and_follows_the_rule(rows):
    columns, padded = _columns(rows)
    # the reference sees the same float32-rounded inputs
    rounded = [
        (float(np.float32(a)), float(np.float32(b)), float(np.float32(c)), f)
        for a, b, c, f in padded
    ]
    state, (lams, accepts, rhos) = _lm_scan(columns)
    lams = np.asarray(lams)
    assert np.all(np.isfinite(lams))
    assert np.all(lams >= LM.min_lambda * (1 - 1e-6)) and np.all(lams <= LM.max_lambda * (1 + 1e-6))
    ref = lm_reference(LM, rounded)
    np.testing.assert_allclose(lams, [r[0] for r in ref], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(accepts), [r[1] for r in ref])
    for (loss, after, pred, finite), accept, lam_prev, lam in zip(
        rounded, np.asarray(accepts), [LM.init().lam, *lams[:-1]], lams, strict=True
    ):
        bad = not (finite and math.isfinite(loss) and math.isfinite(after) and math.isfinite(pred))
        if bad:  # non-finite steps are always rejected and never decrease lambda
            assert not accept and lam >= min(lam_prev * LM.increase, LM.max_lambda) * (1 - 1e-6)
    assert state.lam.shape == () and state.count.dtype == jnp.int32 and int(state.count) == 20


def test_levenberg_marquardt_ratio_test():
    lm = D.LevenbergMarquardt()
    state = lm.init()
    assert float(lm.value(state)) == 1.0
    # a good step (rho = 1): accepted, lambda decreased by 2/3
    state, accept = lm.update(state, step_stats(1.0, 0.5, 0.5))
    assert bool(accept) and float(state.lam) == pytest.approx(2 / 3)
    assert float(state.rho) == pytest.approx(1.0)
    # a bad step (rho < eta): rejected, lambda increased by 3/2
    state, accept = lm.update(state, step_stats(1.0, 1.2, 0.5))
    assert not bool(accept) and float(state.lam) == pytest.approx(1.0)
    # middling rho in [rho_low, rho_high]: accepted, unchanged
    state, accept = lm.update(state, step_stats(1.0, 0.75, 0.5))
    assert bool(accept) and float(state.lam) == pytest.approx(1.0)
    # the model predicts no decrease: rejected
    state, accept = lm.update(state, step_stats(1.0, 0.5, 0.0))
    assert not bool(accept) and float(state.lam) == pytest.approx(1.5)
    # a NaN loss after the step: rejected, rho reported as NaN
    state, accept = lm.update(state, step_stats(1.0, math.nan, 0.5))
    assert not bool(accept) and np.isnan(float(state.rho))
    assert requirements_of(lm) == Requires(resources={"loss_after", "predicted_decrease"})


def test_levenberg_marquardt_validates_options_and_clips_init():
    assert float(D.LevenbergMarquardt(init=1e9, max_lambda=10.0).init().lam) == 10.0
    for bad in (
        {"increase": 1.0},
        {"decrease": 1.5},
        {"min_lambda": 2.0, "max_lambda": 1.0},
        {"rho_low": 0.9, "rho_high": 0.1},
        {"dtype": "int32"},
    ):
        with pytest.raises(ValueError, match="levenberg_marquardt"):
            D.LevenbergMarquardt(**bad)


@given(st.lists(stats_rows, min_size=1, max_size=5))
def test_constant_rejects_only_non_finite_steps(rows):
    policy = D.Constant(lam=0.25)
    state = policy.init()
    update = jax.jit(policy.update)
    for loss, after, pred, finite in rows:
        state, accept = update(state, step_stats(loss, after, pred, finite))
        assert bool(accept) == finite
        assert float(policy.value(state)) == 0.25
    assert int(state.count) == len(rows)
    assert requirements_of(policy).is_empty()


def test_schedule_from_an_optax_dict_matches_optax():
    options = {"name": "exponential_decay", "init_value": 1.0, "transition_steps": 2}
    policy = D.Schedule(schedule={**options, "decay_rate": 0.5})
    ref = optax.schedules.exponential_decay(1.0, 2, 0.5)
    hash(policy)
    assert policy == D.Schedule(schedule={**options, "decay_rate": 0.5})
    assert policy != D.Schedule(schedule={**options, "decay_rate": 0.25})

    @jax.jit
    def run(state):
        def step(state, finite):
            state, accept = policy.update(state, step_stats(1.0, 1.0, 1.0, finite))
            return state, (policy.value(state), accept)

        return jax.lax.scan(step, state, jnp.array([True, False, True, True, True]))

    state, (lams, accepts) = run(policy.init())
    assert float(policy.value(policy.init())) == 1.0
    np.testing.assert_allclose(lams, [ref(t) for t in range(1, 6)], rtol=1e-6)
    np.testing.assert_array_equal(accepts, [True, False, True, True, True])
    assert int(state.count) == 5 and state.lam.dtype == jnp.float32


def test_schedule_with_nested_options_and_callables():
    piecewise = D.Schedule(
        schedule={
            "name": "piecewise_constant_schedule",
            "init_value": 1.0,
            "boundaries_and_scales": {2: 0.1, 4: 0.5},
        }
    )
    hash(piecewise)
    state, lams = piecewise.init(), []
    for _ in range(5):
        state, _ = piecewise.update(state, step_stats(1.0, 1.0, 1.0))
        lams.append(float(piecewise.value(state)))
    np.testing.assert_allclose(lams, [1.0, 0.1, 0.1, 0.05, 0.05], rtol=1e-6)
    linear = D.Schedule(schedule=lambda count: 0.5 + count, dtype="float64")
    state, _ = linear.update(linear.init(), step_stats(1.0, 1.0, 1.0))
    assert float(linear.value(state)) == 1.5 and state.lam.dtype == jnp.float64
    with pytest.raises(ValueError, match="optax.schedules"):
        D.Schedule(schedule={"name": "no_such_schedule"})
    with pytest.raises(ValueError, match="callable"):
        D.Schedule(schedule=0.1)


def test_policies_are_hashable_and_scan_stable():
    def build():
        return (
            D.Constant(lam=0.5),
            D.LevenbergMarquardt(init=2.0, eta=0.01),
            D.Schedule(schedule={"name": "constant_schedule", "value": 0.1}),
        )

    for policy, twin in zip(build(), build(), strict=True):
        assert policy == twin and hash(policy) == hash(twin)
        state0 = policy.init()

        def step(state, _, policy=policy):
            return policy.update(state, step_stats(1.0, 0.9, 0.2))[0], None

        state, _ = jax.lax.scan(step, state0, None, length=4)
        assert isinstance(state, D.DampingState)
        for x, y in zip(state, state0, strict=True):
            assert x.shape == y.shape == () and x.dtype == y.dtype
