"""Models with state and a key: the contract, the curvature convention, one mask per step.

References are dense float64 matrices built with the same convention as the step
(see ``somax_plug._src.model``): the state carried into the step is a constant, the
batch statistics of train mode are differentiated through, and the dropout mask is
the one drawn from ``model_key(step_key, count)``. Tolerances: 1e-10 relative for
float64 dense algebra (the step and the reference do the same products in a
different order); CG with ``tol=1e-12`` on a 33-dimensional SPD system.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import somax_plug as sp
from somax_plug import InputError, model_key
from tests.reliability import Case, check_corpus

B, D, H, C = 12, 3, 4, 3
KEEP = 0.7
LAM = 0.1


def _params(seed: int = 0) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "w1": jax.random.normal(k1, (D, H)) * 0.8,
        "g": 1.0 + 0.1 * jax.random.normal(k3, (H,)),
        "w2": jax.random.normal(k2, (H, C)) * 0.8,
    }


def _batch(seed: int = 1) -> tuple:
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (B, D)), jax.random.randint(ky, (B,), 0, C)


def _hidden(p: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dense layer, then batch normalisation on the batch's own statistics."""
    h = x @ p["w1"]
    mean, var = h.mean(0), h.var(0)
    return jnp.tanh(p["g"] * (h - mean) / jnp.sqrt(var + 1e-5)), mean


def bn_dropout(p: dict, x: jax.Array, *, state: dict, key: jax.Array) -> tuple:
    """BatchNorm in train mode (running mean as state) and dropout."""
    h, mean = _hidden(p, x)
    mask = jax.random.bernoulli(key, KEEP, h.shape)
    out = jnp.where(mask, h / KEEP, 0.0) @ p["w2"]
    return out, {"mean": 0.9 * state["mean"] + 0.1 * mean}


def bn_only(p: dict, x: jax.Array, *, state: dict) -> tuple:
    h, mean = _hidden(p, x)
    return h @ p["w2"] + 0.0 * state["mean"].sum(), {"mean": 0.9 * state["mean"] + 0.1 * mean}


def dropout_only(p: dict, x: jax.Array, *, key: jax.Array) -> jax.Array:
    return bn_dropout(p, x, state={"mean": jnp.zeros(H)}, key=key)[0]


STATE0 = {"mean": jnp.zeros(H)}


def _ce(z: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


def dense_ggn(f, params, y):
    """``J^T H_out J`` of ``params -> f(params)`` (flattened, float64)."""
    flat, unravel = ravel_pytree(params)
    g = lambda v: f(unravel(v))  # noqa: E731
    z = g(flat)
    jac = jax.jacfwd(lambda v: g(v).ravel())(flat)
    h_out = jax.hessian(lambda zz: _ce(zz.reshape(z.shape), y))(z.ravel())
    loss, grad = jax.value_and_grad(lambda v: _ce(g(v), y))(flat)
    return jac.T @ h_out @ jac, grad, loss


def _operator_dense(method, params, state, batch, key):
    """The dense matrix of the operator the solver reads in this step."""
    return jax.jit(lambda p, s, b, k: method.direction(p, s, b, k).res["operator"].to_dense())(
        params, state, batch, key
    )


# ------------------------------------------------------------ the curvature convention
def test_ggn_with_state_is_the_dense_ggn_of_train_mode_with_state_constant():
    params, (x, y) = _params(), _batch()
    method = sp.compose("ggn", "direct", predict_fn=bn_only, loss="softmax_cross_entropy",
                        has_state=True, damping={"name": "constant", "lam": LAM})
    state = method.init(params, STATE0)
    got = _operator_dense(method, params, state, (x, y), jax.random.key(3))
    want, grad, _ = dense_ggn(lambda p: bn_only(p, x, state=STATE0)[0], params, y)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # the step solves that system and carries the running mean of this batch forward
    new_params, new_state, info = method.step(params, state, (x, y), jax.random.key(3))
    s = jnp.linalg.solve(want + LAM * jnp.eye(want.shape[0]), grad)
    np.testing.assert_allclose(
        ravel_pytree(new_params)[0], ravel_pytree(params)[0] - s, rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(
        new_state.model_state["mean"], 0.1 * (x @ params["w1"]).mean(0), rtol=1e-12
    )


@pytest.mark.parametrize(
    ("solver", "unplanned"), [("direct", False), ("cg", False), ("cg", True)]
)
def test_dropout_one_mask_per_step_the_solver_sees_the_masked_ggn(solver, unplanned):
    params, (x, y) = _params(), _batch()
    key = jax.random.key(7)
    opts = {"tol": 1e-12, "maxiter": 200} if solver == "cg" else {}
    method = sp.compose(
        "ggn", {"name": solver, **opts}, predict_fn=bn_dropout, loss="softmax_cross_entropy",
        has_state=True, has_rng=True, damping={"name": "constant", "lam": LAM},
        rho_every_k=1, unplanned=unplanned,
    )
    state = method.init(params, STATE0)
    mkey = model_key(key, 0)  # the step's one model key
    masked = lambda p: bn_dropout(p, x, state=STATE0, key=mkey)[0]  # noqa: E731
    want, grad, loss = dense_ggn(masked, params, y)
    if not unplanned:
        got = _operator_dense(method, params, state, (x, y), key)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    new_params, new_state, info = method.step(params, state, (x, y), key)
    s = jnp.linalg.solve(want + LAM * jnp.eye(want.shape[0]), grad)
    np.testing.assert_allclose(
        ravel_pytree(new_params)[0], ravel_pytree(params)[0] - s, rtol=1e-8, atol=1e-10
    )
    np.testing.assert_allclose(info["loss"], loss, rtol=1e-12)
    # the loss after the step and the predicted decrease use the same mask
    np.testing.assert_allclose(info["loss_after"], _ce(masked(new_params), y), rtol=1e-12)
    pd = -(grad @ -s + 0.5 * s @ want @ s)
    np.testing.assert_allclose(info["predicted_decrease"], pd, rtol=1e-8)


def test_the_mask_changes_from_step_to_step_even_with_the_same_key():
    params, batch = _params(), _batch()
    method = sp.compose("ggn", "direct", predict_fn=dropout_only, loss="softmax_cross_entropy",
                        has_rng=True, damping={"name": "constant", "lam": LAM},
                        learning_rate=0.0)
    state = method.init(params)
    key = jax.random.key(0)
    _, state1, info0 = method.step(params, state, batch, key)
    _, _, info1 = method.step(params, state1, batch, key)  # same params, same key
    assert float(info0["loss"]) != float(info1["loss"])
    for count, info in ((0, info0), (1, info1)):
        ref = _ce(dropout_only(params, batch[0], key=model_key(key, count)), batch[1])
        np.testing.assert_allclose(info["loss"], ref, rtol=1e-12)


def test_per_example_grads_of_a_coupled_model_go_through_the_full_batch():
    params, (x, y) = _params(), _batch()
    method = sp.compose("empirical_fisher", "direct", predict_fn=bn_dropout,
                        loss="softmax_cross_entropy", has_state=True, has_rng=True,
                        damping={"name": "constant", "lam": LAM})
    state = method.init(params, STATE0)
    got = _operator_dense(method, params, state, (x, y), jax.random.key(2))
    mkey = model_key(jax.random.key(2), 0)
    flat, unravel = ravel_pytree(params)

    def per_example(v):
        z = bn_dropout(unravel(v), x, state=STATE0, key=mkey)[0]
        return optax.softmax_cross_entropy_with_integer_labels(z, y) / B

    rows = jax.jacrev(per_example)(flat)  # [B, n]: gradients of c * l_b
    np.testing.assert_allclose(got, rows.T @ rows / (1.0 / B), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------- the state through the step
def test_non_finite_step_keeps_the_model_state_and_params():
    params, (x, y) = _params(), _batch()
    method = sp.compose("ggn", "direct", predict_fn=bn_dropout, loss="softmax_cross_entropy",
                        has_state=True, has_rng=True, damping={"name": "constant", "lam": LAM})
    state = method.init(params, {"mean": jnp.full((H,), 0.5)})
    bad_x = x.at[0, 0].set(jnp.nan)
    new_params, new_state, info = method.step(params, state, (bad_x, y))
    assert not bool(info["finite"]) and not bool(info["accepted"])
    np.testing.assert_array_equal(new_state.model_state["mean"], 0.5)
    np.testing.assert_array_equal(ravel_pytree(new_params)[0], ravel_pytree(params)[0])
    # then a good batch moves both
    p2, s2, info2 = method.step(new_params, new_state, (x, y))
    assert bool(info2["accepted"])
    assert not np.allclose(s2.model_state["mean"], 0.5)


def test_rejected_step_keeps_the_model_state():
    params, batch = _params(), _batch()
    # a learning rate that overshoots: Levenberg-Marquardt's ratio test rejects it
    method = sp.compose(preset="gauss_newton_lm", predict_fn=bn_only,
                        loss="softmax_cross_entropy", has_state=True, tx=optax.scale(50.0))
    state = method.init(params, STATE0)
    _, new_state, info = method.step(params, state, batch)
    assert not bool(info["accepted"]) and bool(info["finite"])
    np.testing.assert_array_equal(new_state.model_state["mean"], 0.0)


def test_optax_bridge_threads_the_model_state():
    params, (x, y) = _params(), _batch()
    tx = optax.chain(
        sp.as_optax("ggn", "cg", predict_fn=bn_dropout, loss="softmax_cross_entropy",
                    has_state=True, has_rng=True, model_state=STATE0,
                    damping={"name": "constant", "lam": LAM}),
        optax.scale_by_learning_rate(0.5),
    )
    opt_state = tx.init(params)
    key = jax.random.key(4)

    @jax.jit
    def update(p, s):
        mkey = model_key(key, s[0].inner.count)
        g = jax.grad(lambda q: _ce(bn_dropout(q, x, state=sp.model_state_of(s), key=mkey)[0], y))(p)
        u, s = tx.update(g, s, p, batch=(x, y), key=key)
        return optax.apply_updates(p, u), s

    p, opt_state = update(params, opt_state)
    np.testing.assert_allclose(
        sp.model_state_of(opt_state)["mean"], 0.1 * (x @ params["w1"]).mean(0), rtol=1e-12
    )
    assert bool(opt_state[0].info["finite"])
    loss0 = _ce(bn_dropout(params, x, state=STATE0, key=model_key(key, 0))[0], y)
    np.testing.assert_allclose(opt_state[0].info["loss"], loss0, rtol=1e-12)


# ----------------------------------------------------------------------- bad input
def _step(predict_fn, *, has_state=False, has_rng=False, model_state=None, batch=None):
    method = sp.compose("ggn", "cg", predict_fn=predict_fn, loss="softmax_cross_entropy",
                        has_state=has_state, has_rng=has_rng)
    state = method.init(_params(), model_state)
    try:
        return method.step(_params(), state, batch or _batch())
    except InputError:
        assert method.trace_counts == {}, "the error must come before tracing"
        raise


def _no_state(p, x, *, state):
    return bn_only(p, x, state=state)[0]


def _extra_state(p, x, *, state):
    out, new = bn_only(p, x, state=state)
    return out, {**new, "count": jnp.zeros(())}


def _reshaped_state(p, x, *, state):
    out, new = bn_only(p, x, state=state)
    return out, {"mean": jnp.concatenate([new["mean"], new["mean"]])}


def _recast_state(p, x, *, state):
    out, new = bn_only(p, x, state=state)
    return out, {"mean": new["mean"].astype(jnp.float32)}


def _ignores_key(p, x, *, key):
    return bn_only(p, x, state=STATE0)[0]


def _positional_only(p, x):
    return x @ p["w1"] @ jnp.ones((H, C))


def _state_changes_between_steps():
    method = sp.compose("ggn", "cg", predict_fn=bn_only, loss="softmax_cross_entropy",
                        has_state=True)
    state = method.init(_params(), STATE0)
    _, state, _ = method.step(_params(), state, _batch())
    bad = state._replace(model_state={"mean": jnp.zeros(H + 1)})
    return method.step(_params(), bad, _batch())


CASES = [
    Case("has_state but returns no state", lambda: _step(_no_state, has_state=True,
         model_state=STATE0), says=("has_state=True", "(outputs, new_state)")),
    Case("new state with an extra leaf", lambda: _step(_extra_state, has_state=True,
         model_state=STATE0), says=("new_state", "unexpected", "count")),
    Case("new state of another shape", lambda: _step(_reshaped_state, has_state=True,
         model_state=STATE0), says=("new_state['mean']", "shape (8,)", "(4,)")),
    Case("new state of another dtype", lambda: _step(_recast_state, has_state=True,
         model_state=STATE0), says=("new_state['mean']", "float32", "float64")),
    Case("has_rng but the key is ignored", lambda: _step(_ignores_key, has_rng=True),
         says=("has_rng=True", "never reads its key")),
    Case("flags declared, predict_fn takes no keywords", lambda: _step(
        _positional_only, has_state=True, model_state=STATE0),
        says=("has_state=True", "predict_fn(params, inputs, *, state)")),
    Case("has_state without an initial state", lambda: _step(bn_only, has_state=True),
         says=("has_state=True", "method.init(params, model_state)")),
    Case("a model state for a model without state", lambda: _step(
        _positional_only, model_state=STATE0), says=("model_state", "has_state=True")),
    Case("model state changes shape between steps", _state_changes_between_steps,
         says=("state.model_state['mean']", "shape (5,)", "(4,)")),
    Case("has_state is not a bool", lambda: sp.make_model(bn_only, "mse", has_state="yes"),
         says=("has_state must be True or False",)),
    Case("a good stateful model", lambda: _step(bn_dropout, has_state=True, has_rng=True,
         model_state=STATE0), expect="ok"),
]


def test_bad_models_get_clear_errors_before_tracing():
    counts = check_corpus("model contract", CASES)
    assert (counts["named"], counts["ok"]) == (len(CASES) - 1, 1)


def test_a_good_stateful_model_passes_the_contract_checks():
    params, batch = _params(), _batch()
    method = sp.compose("ggn", "cg", predict_fn=bn_dropout, loss="softmax_cross_entropy",
                        has_state=True, has_rng=True)
    state = method.init(params, STATE0)
    _, state, info = method.step(params, state, batch)
    assert bool(info["finite"])
    with pytest.raises(InputError, match="state.model_state"):
        method.step(params, state._replace(model_state={"mean": jnp.zeros(H, jnp.int32)}),
                    batch)


def test_core_imports_neither_flax_nor_equinox():
    code = (
        "import sys, jax.numpy as jnp, somax_plug, somax_plug.models\n"
        "m = somax_plug.compose('ggn', 'cg', predict_fn=lambda p, x: x @ p, loss='mse')\n"
        "s = m.init(jnp.zeros(2)); m.step(jnp.zeros(2), s, (jnp.eye(2), jnp.ones(2)))\n"
        "bad = [n for n in ('flax', 'equinox') if n in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_state_spec_of_a_stateful_model_needs_init_first():
    method = sp.compose("ggn", "cg", predict_fn=bn_only, loss="softmax_cross_entropy",
                        has_state=True)
    with pytest.raises(InputError, match=r"method.init\(params, model_state\) first"):
        method.state_spec(_params())
    method.init(_params(), STATE0)
    assert method.state_spec(_params()).model_state["mean"].shape == (H,)


def test_the_new_state_costs_no_second_forward_pass():
    """The new state's ``apply`` has the operands of the loss's forward pass: XLA merges
    them, so the compiled step has as many dots and tanhs as the same model without state."""
    import re

    def plain(p, x):
        return bn_only(p, x, state=STATE0)[0]

    counts = []
    for f, kw, ms in ((bn_only, {"has_state": True}, STATE0), (plain, {}, None)):
        method = sp.compose("ggn", "cg", predict_fn=f, loss="softmax_cross_entropy",
                            damping={"name": "constant", "lam": LAM}, **kw)
        state = method.init(_params(), ms)
        text = jax.jit(method._step).lower(_params(), state, _batch(), jax.random.key(0))
        text = text.compile().as_text()
        counts.append((len(re.findall(r"= \S+ dot\(", text)), len(re.findall(r" tanh\(", text))))
    assert counts[0] == counts[1] and counts[0][0] > 0
