"""The solver ``model_step`` (KFAC's re-scaling and momentum) against float64 references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from somax_plug import MatrixOperator
from somax_plug.builtin.solvers import ModelStep


def _spd(rng: np.random.Generator, n: int) -> np.ndarray:
    q = rng.normal(size=(n, n))
    return q @ q.T / n + 0.1 * np.eye(n)


def _model(a: np.ndarray, g: np.ndarray, s: np.ndarray) -> float:
    """q(-s) = -g.s + s.A s / 2 (the update is -s)."""
    return float(-g @ s + 0.5 * s @ a @ s)


@settings(deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 9), st.floats(0.0, 2.0))
def test_the_step_is_the_model_minimum_over_the_direction_and_the_last_step(seed, n, lam):
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        c, g, p = _spd(rng, n), rng.normal(size=n), rng.normal(size=n)
        minv = np.abs(rng.normal(size=n)) + 0.1  # a diagonal preconditioner
        op = MatrixOperator(jnp.asarray(c), jnp.zeros(n))
        solver = ModelStep()
        s, info, state = solver.solve(op, jnp.asarray(g), jnp.asarray(lam),
                                      lambda v: jnp.asarray(minv) * v, {},
                                      {"p": jnp.asarray(p)})
        a = c + lam * np.eye(n)
        d = minv * g
        basis = np.stack([d, p], 1)
        coef = np.linalg.solve(basis.T @ a @ basis, basis.T @ g)
        want = basis @ coef
        np.testing.assert_allclose(np.asarray(s), want, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(np.asarray(state["p"]), np.asarray(s))
        assert int(info.iterations) == 2 and bool(info.converged)
        # never worse than the re-scaled direction alone, and a decrease of the model
        alpha = (g @ d) / (d @ a @ d)
        assert _model(a, g, want) <= _model(a, g, alpha * d) + 1e-12
        assert _model(a, g, want) < 0


def test_without_momentum_or_a_previous_step_it_rescales_the_direction():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        c, g = _spd(rng, 6), rng.normal(size=6)
        op = MatrixOperator(jnp.asarray(c), jnp.zeros(6))
        want = (g @ g) / (g @ (c + 0.5 * np.eye(6)) @ g) * g
        for solver in (ModelStep(momentum=False), ModelStep()):
            s, info, _ = solver.solve(op, jnp.asarray(g), jnp.asarray(0.5), None, {},
                                      solver.init(jnp.zeros(6)))
            np.testing.assert_allclose(np.asarray(s), want, rtol=1e-12)
        # a zero gradient gives a zero step, not 0/0
        s, info, _ = ModelStep().solve(op, jnp.zeros(6), jnp.asarray(0.5), None, {},
                                       ModelStep().init(jnp.zeros(6)))
        assert np.all(np.asarray(s) == 0) and bool(info.converged)


def test_a_stale_preconditioner_still_gives_a_positive_predicted_decrease():
    # the kfac preset's failure mode before: an inverse computed with an old, smaller
    # lambda is a step too long for the current model, the Levenberg-Marquardt damping
    # then saw a negative predicted decrease, rejected every step and raised lambda
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        c, g = _spd(rng, 8), rng.normal(size=8)
        lam_old, lam = 1e-3, 10.0
        stale = np.linalg.inv(c + lam_old * np.eye(8))
        op = MatrixOperator(jnp.asarray(c), jnp.zeros(8))
        raw = stale @ g
        assert -(-g @ raw + 0.5 * raw @ (c + lam * np.eye(8)) @ raw) < 0  # the old failure
        s, _, _ = ModelStep().solve(op, jnp.asarray(g), jnp.asarray(lam),
                                    lambda v: jnp.asarray(stale) @ v, {},
                                    ModelStep().init(jnp.zeros(8)))
        s = np.asarray(s)
        assert -(-g @ s + 0.5 * s @ c @ s) > 0  # the undamped predicted decrease
