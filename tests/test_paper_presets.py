"""The presets ``sophia_h``, ``sophia_g`` and ``adahessian`` against their references.

* ``sophia_h`` against ``optax.contrib.sophia`` (unmodified, its default Hutchinson
  estimator) at the preset's own hyperparameters: the same parameters to float
  tolerance over 20 steps (two Hessian refreshes). Same probes: the preset's
  ``hutchinson_diag`` is given ``draw="per_leaf", seed=0``, which draws from its own
  key stream ``PRNGKey(0)`` split per estimate, one key per leaf, exactly as optax's
  ``hutchinson_estimator_diag_hessian`` does (nothing else is overridden).
* ``adahessian`` against a dense float64 NumPy reference of the paper's update rule
  (Yao et al. 2021, Algorithm 1) with the exact Hutchinson estimate ``z * (H z)`` of
  the same probe, on a model with a convolution kernel (spatial averaging) and dense
  weights (none).
* unit checks of the options the presets rely on: ``identity``'s momentum,
  ``diag_ema``'s ``scale``, ``bias_correction``, ``refresh_every``, ``lag`` and
  ``spatial_average``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from somax_plug import OptionError, compose
from somax_plug._src.benchmarks.paper_presets import optax_sophia
from somax_plug.builtin import preconditioners as P
from somax_plug.builtin import solvers as S
from somax_plug.builtin.presets import PRESETS

STEPS = 20


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def mlp_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.normal(size=(6, 12)) * 0.5, dtype),
        "b1": jnp.asarray(rng.normal(size=12) * 0.1, dtype),
        "w2": jnp.asarray(rng.normal(size=(12, 4)) * 0.5, dtype),
        "b2": jnp.zeros(4, dtype),
    }


def batches(dtype, n, size=32, dim=6, classes=4, seed=1):
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.normal(size=(size, dim)), dtype),
            jnp.asarray(rng.integers(0, classes, size=size)),
        )
        for _ in range(n)
    ]


def ce(predict, params, x, y):
    logits = predict(params, x)
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# --------------------------------------------------------------------------- Sophia-H


def _optax_sophia(learning_rate, weight_decay):
    """``optax.contrib.sophia`` at the preset's configuration (read from the preset)."""
    config = PRESETS["sophia_h"][1]
    pre, solver = config["preconditioner"], config["solver"]
    (est,) = config["estimators"]
    assert est["num_probes"] == 1 and pre["refresh_every"] == est["every_k"] and pre["lag"]
    assert not pre["bias_correction"] and solver["bias_correction"] and not pre["abs"]
    assert pre["power"] == 1.0 and config["damping"]["lam"] == 0.0
    return optax_sophia(learning_rate, weight_decay)


@pytest.mark.parametrize(
    ("dtype", "weight_decay", "rtol", "atol"),
    [(jnp.float64, 0.0, 1e-10, 1e-12), (jnp.float64, 1e-2, 1e-10, 1e-12),
     (jnp.float32, 0.0, 1e-4, 1e-5)],
    ids=["float64", "float64_weight_decay", "float32"],
)
def test_sophia_h_matches_optax_contrib_sophia_over_20_steps(dtype, weight_decay, rtol, atol):
    lr = PRESETS["sophia_h"][1]["learning_rate"]
    every_k = PRESETS["sophia_h"][1]["estimators"][0]["every_k"]
    tx = None
    if weight_decay:
        tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(lr))
    method = compose(
        preset="sophia_h",
        predict_fn=mlp,
        loss="softmax_cross_entropy",
        # the same probes as optax: its key stream, one key per leaf (see the docstring)
        estimators=[
            {"name": "hutchinson_diag", "every_k": every_k, "num_probes": 1,
             "draw": "per_leaf", "seed": 0}
        ],
        tx=tx,
    )
    opt = _optax_sophia(lr, weight_decay)
    params0 = mlp_params(dtype)
    ours, state = params0, method.init(params0)
    ref, opt_state = params0, opt.init(params0)

    @jax.jit
    def optax_step(params, opt_state, x, y):
        obj = lambda p: ce(mlp, p, x, y)
        grads = jax.grad(obj)(params)
        updates, opt_state = opt.update(grads, opt_state, params, obj_fn=obj)
        return optax.apply_updates(params, updates), opt_state

    moved = []
    for t, (x, y) in enumerate(batches(dtype, STEPS)):
        prev = ours
        ours, state, info = method.step(ours, state, (x, y), jax.random.key(t))
        ref, opt_state = optax_step(ref, opt_state, x, y)
        assert bool(info["accepted"])
        for name in params0:
            assert ours[name].dtype == dtype
            np.testing.assert_allclose(
                np.asarray(ours[name]), np.asarray(ref[name]), rtol=rtol, atol=atol,
                err_msg=f"step {t}, leaf {name}",
            )
        step = ravel_pytree(ours)[0] - ravel_pytree(prev)[0]
        moved.append(float(jnp.max(jnp.abs(step))))
    # the clip bounds every coordinate's move by the learning rate (plus the decay)
    rounding = 1e-6 if dtype == jnp.float32 else 1e-12  # of the parameter differences
    assert max(moved) <= lr * (1 + 10 * weight_decay) + rounding
    # the Hessian EMA was refreshed twice (steps 0 and 10) and is in use
    assert int(state.preconditioner["count"]) == 2
    np.testing.assert_allclose(
        np.asarray(ravel_pytree(state.preconditioner["ema"])[0]),
        np.asarray(ravel_pytree(opt_state[0].nu)[0]),
        rtol=1e-4 if dtype == jnp.float32 else 1e-9,
        atol=1e-7 if dtype == jnp.float32 else 1e-13,
    )


def test_sophia_presets_refresh_every_10_steps_from_one_probe():
    for name in ("sophia_h", "sophia_g"):
        config = PRESETS[name][1]
        (est,) = config["estimators"]
        assert est["every_k"] == 10 == config["preconditioner"]["refresh_every"]
        assert est.get("num_probes", est.get("num_samples")) == 1
        method = compose(preset=name, predict_fn=mlp, loss="softmax_cross_entropy")
        (est_comp,) = method.plan.estimators
        assert est_comp.every_k == 10
        assert method.plan.component("preconditioner").every_k == 1  # lag: every step


@pytest.mark.parametrize("preset", ["sophia_h", "sophia_g", "adahessian"])
def test_paper_presets_train_with_their_defaults(preset):
    """60 steps on a small problem with the preset's defaults lower the loss by 30%.

    (Sophia's clipped steps move a coordinate by at most the learning rate, 0.01.)
    """
    params = mlp_params(jnp.float32)
    (x, y), = batches(jnp.float32, 1, size=64)
    method = compose(preset=preset, predict_fn=mlp, loss="softmax_cross_entropy")
    state = method.init(params)
    start = float(ce(mlp, params, x, y))
    for t in range(60):
        params, state, info = method.step(params, state, (x, y), jax.random.key(t))
        assert bool(info["finite"])
    assert float(ce(mlp, params, x, y)) < 0.7 * start


# --------------------------------------------------------------------------- AdaHessian


def conv_net(params, x):
    """A 3x3 conv (HWIO kernel, flax's layout), tanh, then a dense layer."""
    h = jax.lax.conv_general_dilated(
        x, params["conv"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jnp.tanh(h + params["conv_b"])
    return h.reshape(h.shape[0], -1) @ params["dense"] + params["dense_b"]


def conv_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 3)) * 0.4),
        "conv_b": jnp.asarray(rng.normal(size=3) * 0.1),
        "dense": jnp.asarray(rng.normal(size=(3 * 3 * 3, 4)) * 0.3),
        "dense_b": jnp.zeros(4),
    }


def adahessian_reference(params0, data, probes, lr, beta1, beta2, eps, k, clip=np.inf):
    """The paper's AdaHessian in float64 NumPy, with the exact Hessian (dense)."""
    flat0, unravel = ravel_pytree(params0)
    leaves, treedef = jax.tree_util.tree_flatten(params0)
    shapes = [np.shape(x) for x in leaves]
    sizes = [int(np.prod(s)) for s in shapes]
    theta = np.asarray(flat0, np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    out = []
    for t, ((x, y), z) in enumerate(zip(data, probes, strict=True), start=1):
        obj = lambda f, x=x, y=y: ce(conv_net, unravel(f), x, y)
        g = np.asarray(jax.grad(obj)(jnp.asarray(theta)))
        hess = np.asarray(jax.hessian(obj)(jnp.asarray(theta)))
        d = z * (hess @ z)  # the Hutchinson estimate of diag(H) with this probe
        parts, start = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            block = d[start : start + size].reshape(shape)
            if len(shape) >= 3:  # a conv kernel (HWIO): average over the spatial axes
                block = np.broadcast_to(block.mean(axis=(0, 1), keepdims=True), shape)
            parts.append(np.ravel(block))
            start += size
        d = np.concatenate(parts)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * d * d
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        # the preset's one departure: the direction is clipped to [-1, 1] per coordinate
        theta = theta - lr * np.clip(m_hat / (np.sqrt(v_hat) ** k + eps), -clip, clip)
        out.append(theta.copy())
    del treedef
    return out


def test_adahessian_matches_the_papers_update_rule_in_float64():
    config = PRESETS["adahessian"][1]
    pre, solver = config["preconditioner"], config["solver"]
    lr, eps, k = config["learning_rate"], config["damping"]["lam"], 2 * pre["power"]
    assert pre["square"] and pre["bias_correction"] and solver["bias_correction"]
    assert config["estimators"][0]["num_probes"] == 1 and k == 1.0
    params0 = conv_params()
    rng = np.random.default_rng(2)
    data = [
        (jnp.asarray(rng.normal(size=(8, 5, 5, 2))), jnp.asarray(rng.integers(0, 4, size=8)))
        for _ in range(6)
    ]
    seed = 3
    method = compose(
        preset="adahessian",
        predict_fn=conv_net,
        loss="softmax_cross_entropy",
        estimators=[{"name": "hutchinson_diag", "num_probes": 1, "seed": seed, "draw": "flat"}],
    )
    # the probes the estimator draws: its own stream PRNGKey(seed), one flat draw each
    n = ravel_pytree(params0)[0].shape[0]
    key, probes = jax.random.PRNGKey(seed), []
    for _ in data:
        key, sub = jax.random.split(key)
        probes.append(np.asarray(jax.random.rademacher(sub, (n,), dtype=jnp.int8), np.float64))
    ref = adahessian_reference(
        params0, data, probes, lr, solver["momentum"], pre["beta"], eps, k, pre["clip"]
    )
    params, state = params0, method.init(params0)
    for t, batch in enumerate(data):
        params, state, info = method.step(params, state, batch, jax.random.key(t))
        np.testing.assert_allclose(
            np.asarray(ravel_pytree(params)[0]), ref[t], rtol=1e-7, atol=1e-9,
            err_msg=f"step {t}",
        )
    # the spatial average made the conv kernel's EMA constant over its 3x3 window
    ema = np.asarray(state.preconditioner["ema"]["conv"])
    np.testing.assert_allclose(ema, np.broadcast_to(ema[:1, :1], ema.shape), rtol=1e-12)


# --------------------------------------------------------------------------- the options


def test_identity_momentum_is_a_bias_corrected_ema_before_the_preconditioner():
    solver = S.Identity(momentum=0.9)
    params = {"w": jnp.zeros(2)}
    state = solver.init(params)
    double = lambda v: jax.tree_util.tree_map(lambda x: 2 * x, v)
    m, rhss = np.zeros(2), [np.array([1.0, -2.0]), np.array([3.0, 0.5]), np.array([0.0, 1.0])]
    for t, g in enumerate(rhss, start=1):
        s, info, state = solver.solve(None, {"w": jnp.asarray(g)}, 0.0, double, {}, state)
        m = 0.9 * m + 0.1 * g
        np.testing.assert_allclose(s["w"], 2 * m / (1 - 0.9**t), rtol=1e-12)
        assert int(info.iterations) == 1 and bool(info.converged)
    np.testing.assert_allclose(state["m"]["w"], m, rtol=1e-12)
    assert int(state["count"]) == 3
    raw = S.Identity(momentum=0.5, bias_correction=False)
    s, _, _ = raw.solve(None, {"w": jnp.ones(2)}, 0.0, None, {}, raw.init(params))
    np.testing.assert_allclose(s["w"], [0.5, 0.5])
    assert S.Identity().init(params) == ()  # no momentum: stateless, as before


def test_identity_momentum_keeps_bf16_directions_and_a_float32_state():
    solver = S.Identity(momentum=0.9)
    state = solver.init({"w": jnp.zeros(3, jnp.bfloat16)})
    assert state["m"]["w"].dtype == jnp.float32
    s, _, state = solver.solve(None, {"w": jnp.ones(3, jnp.bfloat16)}, 0.0, None, {}, state)
    assert s["w"].dtype == jnp.bfloat16 and state["m"]["w"].dtype == jnp.float32


def _run(pre, diags, v):
    state, outs = pre.init(jnp.zeros(len(v))), []
    for d in diags:
        state = pre.update(None, {"diag": jnp.asarray(d)}, 0.0, None, state)
        outs.append(np.asarray(pre.apply(state, jnp.asarray(v), 0.0)))
    return state, outs


def test_diag_ema_sophia_options_refresh_every_and_lag():
    """``refresh_every=3, lag=True`` at every update: optax's Sophia order.

    The estimator (every 3 steps) holds its estimate in between, as in a composition.
    """
    pre = P.DiagEMA(beta=0.5, scale=0.1, abs=False, bias_correction=False, clip=1.0,
                    eps=1e-3, refresh_every=3, lag=True)
    rng = np.random.default_rng(0)
    estimates = [rng.uniform(0.5, 2.0, size=4) for _ in range(3)]
    held = [estimates[t // 3] for t in range(8)]  # estimates at steps 0, 3, 6
    v = np.array([0.01, -0.02, 0.5, -3.0])
    state, outs = _run(pre, held, v)
    h, nu_used = np.zeros(4), []
    for t, d in enumerate(held):  # optax: use the old h, then refresh it when due
        nu_used.append(h.copy())
        if t % 3 == 0:
            h = 0.5 * h + 0.5 * d
    for t, (out, h_used) in enumerate(zip(outs, nu_used, strict=True)):
        np.testing.assert_allclose(out, np.clip(v / np.maximum(0.1 * h_used, 1e-3), -1, 1),
                                   rtol=1e-12, err_msg=f"call {t}")
    assert int(state["count"]) == 3 and int(state["calls"]) == 8
    assert set(state) == {"ema", "count", "calls"}  # no second EMA buffer
    # without lag the refresh is used at once (the paper's order)
    fresh = P.DiagEMA(beta=0.5, abs=False, bias_correction=False, refresh_every=3)
    _, outs = _run(fresh, held, v)
    h = 0.5 * estimates[0]
    np.testing.assert_allclose(outs[0], v / h, rtol=1e-12)
    np.testing.assert_allclose(outs[2], v / h, rtol=1e-12)  # calls 1, 2: no refresh
    h = 0.5 * h + 0.5 * estimates[1]
    np.testing.assert_allclose(outs[3], v / h, rtol=1e-12)
    with pytest.raises(OptionError, match="refresh_every >= 2"):
        P.DiagEMA(lag=True)


def test_diag_ema_without_bias_correction_and_with_scale():
    pre = P.DiagEMA(beta=0.9, bias_correction=False, scale=4.0)
    _, outs = _run(pre, [np.array([1.0, 2.0])], np.array([1.0, 1.0]))
    np.testing.assert_allclose(outs[0], 1.0 / (4.0 * 0.1 * np.array([1.0, 2.0])), rtol=1e-12)
    corrected = P.DiagEMA(beta=0.9, scale=4.0)
    _, outs = _run(corrected, [np.array([1.0, 2.0])], np.array([1.0, 1.0]))
    np.testing.assert_allclose(outs[0], 1.0 / (4.0 * np.array([1.0, 2.0])), rtol=1e-12)


@pytest.mark.parametrize(("layout", "axes"), [("hwio", (0, 1)), ("oihw", (2, 3))])
def test_diag_ema_spatial_average_of_conv_kernels(layout, axes):
    pre = P.DiagEMA(beta=0.5, square=True, power=0.5, abs=False, spatial_average=layout)
    rng = np.random.default_rng(1)
    params = {"k": jnp.zeros((3, 3, 2, 2)), "w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}
    diag = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
    state = pre.update(None, {"diag": diag}, 0.0, None, pre.init(params))
    kernel = np.asarray(diag["k"])
    mean = np.broadcast_to(kernel.mean(axis=axes, keepdims=True), kernel.shape)
    np.testing.assert_allclose(state["ema"]["k"], 0.5 * mean**2, rtol=1e-12)
    for name in ("w", "b"):  # dense weights and biases: no averaging
        np.testing.assert_allclose(state["ema"][name], 0.5 * np.asarray(diag[name]) ** 2)
    # abs=True averages |d| (the authors' code) instead of d (the paper)
    absolute = P.DiagEMA(beta=0.5, square=True, spatial_average=layout)
    state = absolute.update(None, {"diag": diag}, 0.0, None, absolute.init(params))
    mean = np.broadcast_to(np.abs(kernel).mean(axis=axes, keepdims=True), kernel.shape)
    np.testing.assert_allclose(state["ema"]["k"], 0.5 * mean**2, rtol=1e-12)


def test_new_options_are_declared_and_checked():
    for bad in (
        lambda: P.DiagEMA(scale=0.0),
        lambda: P.DiagEMA(refresh_every=0),
        lambda: P.DiagEMA(spatial_average="nchw"),
        lambda: S.Identity(momentum=1.0),
    ):
        with pytest.raises((OptionError, ValueError)):
            bad()
    with pytest.raises(OptionError, match="draw"):
        compose(preset="sophia_h", predict_fn=mlp, loss="softmax_cross_entropy",
                estimators=[{"name": "hutchinson_diag", "draw": "leaves"}])
