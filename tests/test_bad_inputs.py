"""Bad inputs are InputErrors raised before tracing, naming the leaf and the shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from somax_plug import compose
from somax_plug._src.errors import InputError


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def init_params(dtype=jnp.float64):
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (4, 6), dtype),
        "b1": jnp.zeros(6, dtype),
        "w2": jax.random.normal(k2, (6, 3), dtype),
        "b2": jnp.zeros(3, dtype),
    }


PARAMS = init_params()
X = jax.random.normal(jax.random.key(1), (16, 4), jnp.float64)
LABELS = jnp.arange(16) % 3
KEY = jax.random.key(0)


def method_for(predict_fn=mlp, loss="softmax_cross_entropy"):
    return compose(
        "ggn",
        "identity",
        damping={"name": "constant", "lam": 0.0},
        predict_fn=predict_fn,
        loss=loss,
        learning_rate=0.1,
    )


def raises(fn, *patterns):
    """``fn()`` raises exactly InputError (no JAX error leaks) matching every pattern."""
    with pytest.raises(InputError) as info:
        fn()
    assert type(info.value) is InputError
    msg = str(info.value)
    for pattern in patterns:
        assert pattern in msg, (pattern, msg)
    return msg


@pytest.fixture(scope="module")
def ready():
    method = method_for()
    return method, method.init(PARAMS)


def test_batch_must_be_an_inputs_targets_pair(ready):
    method, state = ready
    raises(lambda: method.step(PARAMS, state, {"x": X, "y": LABELS}, KEY), "2-tuple", "dict")
    raises(lambda: method.step(PARAMS, state, (X, LABELS, LABELS), KEY), "2-tuple", "length 3")
    raises(lambda: method.step(PARAMS, state, X, KEY), "2-tuple")


def test_missing_labels(ready):
    method, state = ready
    raises(
        lambda: method.step(PARAMS, state, (X, None), KEY),
        "missing labels",
        "batch[1]",
        "softmax_cross_entropy",
        "(B,)",
    )
    raises(lambda: method.step(PARAMS, state, (X, {}), KEY), "missing labels")


def test_inconsistent_batch_sizes_name_the_leaves(ready):
    method, state = ready
    raises(
        lambda: method.step(PARAMS, state, (X, LABELS[:15]), KEY),
        "inconsistent batch sizes",
        "inputs",
        "16",
        "targets",
        "15",
        "(15,)",
    )
    two = method_for(predict_fn=lambda p, x: mlp(p, x["a"]) + x["b"][:, :1])
    s2 = two.init(PARAMS)
    inputs = {"a": X, "b": jnp.ones((12, 2))}
    raises(lambda: two.step(PARAMS, s2, (inputs, LABELS), KEY), "inputs['b']", "12", "(12, 2)")
    raises(
        lambda: method.step(PARAMS, state, (X, jnp.asarray(1)), KEY),
        "targets",
        "scalar",
        "leading batch axis",
    )


def test_params_must_match_what_init_saw(ready):
    method, state = ready
    missing = {k: v for k, v in PARAMS.items() if k != "b2"}
    raises(lambda: method.step(missing, state, (X, LABELS), KEY), "missing", "params['b2']")
    extra = {**PARAMS, "w3": jnp.ones(2)}
    raises(lambda: method.step(extra, state, (X, LABELS), KEY), "unexpected", "params['w3']")
    wide = {**PARAMS, "w1": jnp.ones((4, 7))}
    raises(lambda: method.step(wide, state, (X, LABELS), KEY), "params['w1']", "(4, 7)", "(4, 6)")
    single = init_params(jnp.float32)
    raises(
        lambda: method.step(single, state, (X, LABELS), KEY), "params['b1']", "float32", "float64"
    )


def test_state_must_come_from_this_method(ready):
    method, state = ready
    raises(lambda: method.step(PARAMS, (X, LABELS), state, KEY), "MethodState", "tuple")
    other = compose(preset="sophia_h", predict_fn=mlp, loss="softmax_cross_entropy")
    raises(lambda: method.step(PARAMS, other.init(PARAMS), (X, LABELS), KEY), "state", "init")
    raises(
        lambda: method.step(PARAMS, state, (X, LABELS), jnp.ones(3)),
        "key",
        "jax.random.key",
        "float",
    )


def test_predict_fn_outputs_must_fit_the_loss_and_targets(ready):
    method, state = ready
    # integer labels with an extra axis
    raises(
        lambda: method.step(PARAMS, state, (X, LABELS[:, None]), KEY),
        "softmax_cross_entropy",
        "(16,)",
        "int",
        "[16, 1]",
    )
    # soft labels of the wrong width
    raises(lambda: method.step(PARAMS, state, (X, jnp.ones((16, 4))), KEY), "(16, 3)", "[16, 4]")
    mse = method_for(loss="mse")
    s = mse.init(PARAMS)
    # (16, 1) targets would broadcast silently against (16, 3) outputs
    raises(
        lambda: mse.step(PARAMS, s, (X, jnp.ones((16, 1))), KEY),
        "mse",
        "outputs' shape",
        "[16, 3]",
        "[16, 1]",
    )
    raises(lambda: mse.step(PARAMS, s, (X, jnp.ones(16)), KEY), "[16]", "(16, 3)")
    reduced = method_for(predict_fn=lambda p, x: jnp.mean(mlp(p, x), axis=0))
    raises(
        lambda: reduced.step(PARAMS, reduced.init(PARAMS), (X, LABELS), KEY),
        "(3,)",
        "batch of 16",
        "reduce over the batch",
    )


def test_predict_fn_failures_are_reported_with_the_shapes(ready):
    method, state = ready
    x5 = jnp.ones((16, 5))
    msg = raises(
        lambda: method.step(PARAMS, state, (x5, LABELS), KEY),
        "predict_fn(params, inputs) fails",
        "[16, 5]",
        "w1",
    )
    assert "TypeError" in msg
    bad_loss = method_for(loss=lambda z, y: jnp.sum((z - y) ** 2))  # not per example
    raises(
        lambda: bad_loss.step(PARAMS, bad_loss.init(PARAMS), (X, jnp.ones((16, 3))), KEY),
        "per-example",
        "(16,)",
    )


def test_validation_runs_once_per_signature():
    calls = {"n": 0}

    def counted(params, x):
        calls["n"] += 1
        return mlp(params, x)

    method = method_for(predict_fn=counted)
    params, state = PARAMS, method.init(PARAMS)
    params, state, info = method.step(params, state, (X, LABELS), KEY)
    first = calls["n"]  # one eval_shape check + the traces of the step
    assert first >= 2 and bool(info["finite"])
    for i in range(3):
        params, state, _ = method.step(params, state, (X + i, LABELS), jax.random.key(i))
    assert calls["n"] == first  # no re-check, no retrace
    raises(lambda: method.step(params, state, (X[:8], LABELS), KEY), "inconsistent")
    params, state, _ = method.step(params, state, (X[:8], LABELS[:8]), KEY)
    assert calls["n"] > first  # a new signature: checked (and traced) once


def test_a_fresh_method_accepts_a_state_it_did_not_init():
    a, b = method_for(), method_for()
    state = a.init(PARAMS)
    params, state, _ = b.step(PARAMS, state, (X, LABELS), KEY)  # b never saw init
    assert np.all(np.isfinite(np.asarray(params["w1"])))
    # a state whose dtypes follow the parameters' (sophia_h's diagonal EMA)
    sophia = lambda: compose(preset="sophia_h", predict_fn=mlp, loss="softmax_cross_entropy")
    state64 = sophia().init(PARAMS)
    raises(
        lambda: sophia().step(init_params(jnp.float32), state64, (X, LABELS), KEY),
        "state.",
        "has dtype float64",
        "init gives for these parameters dtype float32",
    )
