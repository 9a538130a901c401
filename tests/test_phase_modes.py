"""How the cadence phases of a step run: ``lax.switch`` or compute-all-and-select.

Both give the same step, bitwise in float64 over steps that do and do not estimate;
``auto`` picks ``select`` on the CPU backend for a model with a convolution (XLA CPU
runs a conv inside a conditional body far slower, jax-ml/jax#12868) and ``switch``
otherwise, and ``Method.explain`` says which and why once the step is traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import somax_plug as sp


def conv_fn(p, x):
    h = jax.lax.conv_general_dilated(
        x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.tanh(h).reshape(x.shape[0], -1) @ p["out"]


def mlp_fn(p, x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"]) @ p["out"]


def _problem(conv: bool):
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (8, 4, 4, 1), jnp.float64)
    y = jax.random.randint(k[1], (8,), 0, 3)
    if conv:
        params = {"w": 0.5 * jax.random.normal(k[2], (3, 3, 1, 2), jnp.float64),
                  "out": 0.3 * jax.random.normal(k[3], (32, 3), jnp.float64)}
        return conv_fn, params, (x, y)
    params = {"w1": 0.3 * jax.random.normal(k[2], (16, 5), jnp.float64),
              "out": 0.3 * jax.random.normal(k[3], (5, 3), jnp.float64)}
    return mlp_fn, params, (x, y)


def _run(fn, params, batch, mode, steps=12):
    method = sp.compose(preset="sophia_h", predict_fn=fn, loss="softmax_cross_entropy")
    method.core.phase_mode = mode
    state = method.init(params)
    step = jax.jit(method.step)
    for i in range(steps):
        params, state, _ = step(params, state, batch, jax.random.key(i))
    return params, state, method


def test_select_and_switch_give_the_same_steps():
    fn, params, batch = _problem(conv=True)
    a, sa, _ = _run(fn, params, batch, "switch")
    b, sb, _ = _run(fn, params, batch, "select")
    for x, y in zip(jax.tree_util.tree_leaves((a, sa)), jax.tree_util.tree_leaves((b, sb)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a["w"]), np.asarray(params["w"]))


@pytest.mark.parametrize(("conv", "mode"), [(True, "select"), (False, "switch")])
def test_auto_selects_for_convs_on_cpu_and_explain_says_so(conv, mode):
    fn, params, batch = _problem(conv)
    *_, method = _run(fn, params, batch, "auto", steps=1)
    text = method.explain()
    assert f"step            cadence phases: {mode} (" in text
    assert jax.default_backend() == "cpu"
