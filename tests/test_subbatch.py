"""Curvature on a sub-batch (Martens 2010): the products use the first rows, the gradient all.

Checked against dense float64 references built on the sub-batch: the direction a
dense solver returns is ``(C_sub + lam I)^-1 g_full``, with ``C_sub`` the GGN
(``J_sub^T H_out J_sub``) or the Hessian of the loss on the first ``m`` rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from somax_plug import CompositionError, compose, make_plan
from somax_plug.testing.references import DenseSolver

LAM = 0.1
ROWS = 4


def _predict(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def _problem(loss):
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w1": jax.random.normal(k[0], (3, 4)), "w2": jax.random.normal(k[1], (4, 2))}
    x = jax.random.normal(k[2], (10, 3))
    y = jax.random.normal(k[3], (10, 2)) if loss == "mse" else jax.random.randint(k[3], (10,), 0, 2)
    return params, (x, y)


def _method(curvature, loss, **kw):
    return compose(
        curvature,
        DenseSolver(),
        predict_fn=_predict,
        loss=loss,
        damping={"name": "constant", "lam": LAM, "dtype": "float64"},
        curvature_batch=ROWS,
        **kw,
    )


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("loss", ["mse", "softmax_cross_entropy"])
def test_direction_uses_the_sub_batch_curvature_and_the_full_gradient(curvature, loss):
    params, (x, y) = _problem(loss)
    method = _method(curvature, loss)
    d = method.direction(params, method.init(params), (x, y), jax.random.key(0))
    flat, unravel = ravel_pytree(params)

    def loss_on(p, rows):
        return method.model.loss_value(unravel(p), (x[:rows], y[:rows]))

    g_full = jax.grad(loss_on)(flat, len(x))
    if curvature == "hessian":
        c_sub = jax.hessian(loss_on)(flat, ROWS)
    else:
        jac = jax.jacfwd(lambda p: _predict(unravel(p), x[:ROWS]))(flat)  # [m, K, n]
        z = _predict(params, x[:ROWS])
        h_out = jax.hessian(lambda zz: method.model.loss(zz, y[:ROWS]))(z)  # [m,K,m,K]
        m, k = z.shape
        c_sub = jac.reshape(m * k, -1).T @ h_out.reshape(m * k, m * k) @ jac.reshape(m * k, -1)
    expected = np.linalg.solve(np.asarray(c_sub) + LAM * np.eye(flat.size), np.asarray(g_full))
    # float64 throughout; the dense solves agree to rounding
    np.testing.assert_allclose(ravel_pytree(d.s)[0], expected, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(float(d.loss), float(loss_on(flat, len(x))), rtol=1e-12)


def test_the_plan_shows_which_resources_use_the_sub_batch():
    plan = make_plan({"curvature": "ggn", "solver": "cg", "curvature_batch": 32})
    names = {r.name for r in plan.resources}
    assert {"linearization@sub", "output_hessian@sub", "operator", "grad", "loss"} <= names
    assert "linearization" not in names  # the gradient no longer shares it
    assert plan.curvature_batch == 32
    assert "computed on the first 32 rows" in plan.explain()
    assert plan.fingerprint != make_plan({"curvature": "ggn", "solver": "cg"}).fingerprint


def test_a_step_trains_and_traces_each_resource_once():
    params, batch = _problem("softmax_cross_entropy")
    method = compose(
        preset="sgn", predict_fn=_predict, loss="softmax_cross_entropy", curvature_batch=ROWS
    )
    state = method.init(params)
    losses = []
    for i in range(5):
        params, state, info = method.step(params, state, batch, jax.random.key(i))
        losses.append(float(info["loss"]))
    assert losses[-1] < losses[0]
    assert all(v == 1 for v in method.trace_counts.values()), method.trace_counts


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_curvature_batch_is_refused(bad):
    with pytest.raises(CompositionError, match="curvature_batch must be a positive int"):
        make_plan({"curvature": "ggn", "solver": "cg", "curvature_batch": bad})
