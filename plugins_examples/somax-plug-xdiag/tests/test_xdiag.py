"""XDiag through the somax_plug conformance kit, the registry and composed training."""

import jax
import jax.numpy as jnp
import optax
import pytest
import somax_plug_xdiag

from somax_plug import as_optax, compose
from somax_plug.testing.conformance import check_estimator


@pytest.fixture
def xdiag_plugin(somax_registry, register_plugin):
    record = register_plugin(somax_plug_xdiag, name="xdiag")
    assert record.status == "ok", record.error
    return somax_registry


def test_registers_xdiag_as_a_diag_provider(xdiag_plugin):
    spec = xdiag_plugin.get("estimator", "xdiag")
    assert spec.qualified_name == "xdiag:xdiag"
    assert "xdiag:xdiag" in xdiag_plugin.providers_of("estimator", "diag")


def test_unbiased_on_curvatures_of_any_rank(xdiag_plugin):
    # m = 4 probes: most drawn GGNs have rank >= 4, so this is the random regime;
    # the kit's error budget is 5 standard errors over 64 independent estimates
    check_estimator("xdiag", options={"num_probes": 4})


def test_unbiased_on_the_indefinite_hessian(xdiag_plugin):
    check_estimator("xdiag", curvature="hessian", options={"num_probes": 4})


def test_exact_on_low_rank_operators(xdiag_plugin):
    # the drawn GGNs have rank <= batch * outputs <= 12 < m = 16: every draw is exact
    check_estimator("xdiag", options={"num_probes": 16}, exact=True, rtol=1e-7)


def _problem():
    x = jax.random.normal(jax.random.key(0), (64, 3))
    y = jnp.tanh(x @ jnp.array([[1.0], [-2.0], [0.5]]))
    params = {"w1": 0.5 * jax.random.normal(jax.random.key(1), (3, 8)), "b1": jnp.zeros(8),
              "w2": 0.5 * jax.random.normal(jax.random.key(2), (8, 1)), "b2": jnp.zeros(1)}

    def predict(p, inputs):
        return jnp.tanh(inputs @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    return predict, params, (x, y)


@pytest.mark.parametrize(
    ("roles", "lam"),
    [
        # a diagonal model of a non-diagonal GGN needs strong damping to be stable
        ({"solver": "diagonal"}, 1.0),
        ({"solver": {"name": "cg", "maxiter": 10}, "preconditioner": "jacobi"}, 1e-2),
    ],
)
def test_composition_with_xdiag_trains(xdiag_plugin, roles, lam):
    predict, params, batch = _problem()
    method = compose(curvature="ggn", estimators=["xdiag"], predict_fn=predict, loss="mse",
                     damping={"name": "constant", "lam": lam}, learning_rate=0.5, **roles)
    assert "xdiag:xdiag" in method.explain()
    state = method.init(params)
    losses = []
    for _ in range(10):
        params, state, info = method.step(params, state, batch)
        losses.append(float(info["loss"]))
    assert losses[-1] < 0.2 * losses[0], losses


def test_through_the_optax_bridge(xdiag_plugin):
    predict, params, batch = _problem()
    tx = optax.chain(
        as_optax("ggn", "diagonal", estimators=["xdiag"], predict_fn=predict, loss="mse",
                 damping={"name": "constant", "lam": 1.0}),
        optax.scale_by_learning_rate(0.5),
    )
    state = tx.init(params)

    def loss(p):
        return 0.5 * jnp.mean((predict(p, batch[0]) - batch[1]) ** 2)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params, batch=batch)
        return optax.apply_updates(params, updates), state

    start = float(loss(params))
    for _ in range(10):
        params, state = step(params, state)
    assert float(loss(params)) < 0.2 * start
