"""Checkpoints: bitwise resume, PRNG keys and odd dtypes, clear refusals."""

from __future__ import annotations

import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from somax_plug import checkpoint, compose, hookimpl
from somax_plug._src.errors import CheckpointError
from somax_plug._src.loader import load_registry, register_plugin
from somax_plug._src.registry import PluginRecord
from somax_plug._src.spec import ComponentSpec

N = 6  # 2N = 12 steps: sophia_h's estimator (every 10 steps) ticks after the restore


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def init_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (4, 6), jnp.float64) / 2.0,
        "b1": jnp.zeros(6, jnp.float64),
        "w2": jax.random.normal(k2, (6, 3), jnp.float64) / np.sqrt(6.0),
        "b2": jnp.zeros(3, jnp.float64),
    }


def batch(i):
    x = jax.random.normal(jax.random.key(100 + i % 3), (16, 4), jnp.float64)
    w = jax.random.normal(jax.random.key(7), (4, 3), jnp.float64)
    return x, jnp.argmax(x @ w, axis=-1)


PARAMS = init_params()


def assert_bitwise(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y, equal_nan=x.dtype.kind in "fc")
        assert x.tobytes() == y.tobytes()


def make(preset, **kw):
    return compose(preset=preset, predict_fn=mlp, loss="softmax_cross_entropy", **kw)


@pytest.mark.parametrize("preset", ["sgn", "gauss_newton_lm", "sophia_h"])
def test_resume_is_bitwise(preset, tmp_path):
    method = make(preset)
    params, state = PARAMS, method.init(PARAMS)
    infos = []
    for i in range(2 * N):
        if i == N:
            path = checkpoint.save(
                tmp_path / "ckpt.npz", params, state, method, metadata={"step": i}
            )
        params, state, info = method.step(params, state, batch(i), jax.random.key(i))
        infos.append(info)

    fresh = make(preset)  # a new Method (new jit) from the same composition
    p, s = checkpoint.restore(path, fresh)
    assert int(s.count) == N
    assert checkpoint.read_header(path)["metadata"] == {"step": N}
    resumed = []
    for i in range(N, 2 * N):
        p, s, info = fresh.step(p, s, batch(i), jax.random.key(i))
        resumed.append(info)
    assert_bitwise(p, params)
    assert_bitwise(s, state)
    assert_bitwise(resumed, infos[N:])


# ------------------------------------------------------- cheap methods (no steps)
def cheap(**kw):
    base = dict(
        curvature="ggn",
        solver="identity",
        damping={"name": "constant", "lam": 0.0},
        predict_fn=mlp,
        loss="softmax_cross_entropy",
    )
    return compose(**{**base, **kw})


def keyed_tx():
    """An Optax transformation whose state holds a typed PRNG key and a raw one."""

    def init(params):
        return {"key": jax.random.key(5), "raw": jax.random.PRNGKey(6)}

    def update(updates, state, params=None):
        return updates, {
            "key": jax.random.split(state["key"])[0],
            "raw": jax.random.split(state["raw"])[0],
        }

    return optax.GradientTransformation(init, update)


def test_keys_and_bfloat16_round_trip(tmp_path):
    method = cheap(tx=optax.chain(keyed_tx(), optax.scale_by_learning_rate(0.1)))
    params = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) / 7, "b": jnp.ones(3)}
    state = method.init(params)
    path = checkpoint.save(tmp_path / "k.npz", params, state, method)
    header = checkpoint.read_header(path)
    impls = [m.get("key_impl") for m in header["state"]["leaves"]]
    assert "threefry2x32" in impls
    p, s = checkpoint.restore(
        path, cheap(tx=optax.chain(keyed_tx(), optax.scale_by_learning_rate(0.1)))
    )
    assert p["w"].dtype == jnp.bfloat16
    assert_bitwise(p, params)
    assert_bitwise(s, state)
    assert jax.dtypes.issubdtype(s.tx[0]["key"].dtype, jax.dtypes.prng_key)


def test_other_plan_is_refused_naming_both_fingerprints(tmp_path):
    method = make("sgn")
    path = checkpoint.save(tmp_path / "c.npz", PARAMS, method.init(PARAMS), method)
    other = make("sgn", solver={"name": "cg", "maxiter": 20})
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(path, other)
    msg = str(info.value)
    assert method.plan.fingerprint in msg and other.plan.fingerprint in msg
    assert "solver" in msg and "maxiter=10" in msg and "maxiter=20" in msg
    with pytest.raises(CheckpointError, match="The plans differ"):
        checkpoint.restore(path, other, allow_plugin_change=True)
    with pytest.raises(CheckpointError, match="solver: builtin:cg"):  # sgn vs auto
        checkpoint.restore(path, make("gauss_newton_lm"))


def _registry_with_extra_plugin():
    @hookimpl
    def somax_plug_register(register):
        register(
            ComponentSpec(kind="solver", name="extra_solver", factory=lambda: None, provides=set())
        )

    plugin = types.SimpleNamespace(somax_plug_register=somax_plug_register)
    reg = load_registry(env={}, entry_points=[])
    record = PluginRecord(name="extra")
    reg.plugins["extra"] = record
    register_plugin(reg, reg.plugin_manager, "extra", plugin, record)
    assert record.status == "ok", record.error
    return reg


def test_other_plugin_set_needs_allow_plugin_change(tmp_path):
    method = make("sgn")
    state = method.init(PARAMS)
    path = checkpoint.save(tmp_path / "c.npz", PARAMS, state, method)
    reg = _registry_with_extra_plugin()
    same_plan = make("sgn", registry=reg)
    assert same_plan.plan.registry_fingerprint != method.plan.registry_fingerprint
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(path, same_plan)
    msg = str(info.value)
    assert method.plan.registry_fingerprint in msg and same_plan.plan.registry_fingerprint in msg
    assert "plugin set" in msg and "allow_plugin_change=True" in msg
    p, s = checkpoint.restore(path, same_plan, allow_plugin_change=True)
    assert_bitwise(p, PARAMS)
    assert_bitwise(s, state)
    other_plan = make("sgn", registry=reg, damping={"name": "constant", "lam": 0.5})
    with pytest.raises(CheckpointError, match="damping"):
        checkpoint.restore(path, other_plan, allow_plugin_change=True)


class Params(NamedTuple):
    w: jax.Array
    b: jax.Array


def test_structure_mismatches_and_custom_nodes(tmp_path):
    predict = lambda p, x: x @ p.w + p.b
    method = cheap(predict_fn=predict, loss="mse")
    params = Params(jnp.ones((2, 3)), jnp.zeros(3))
    path = checkpoint.save(tmp_path / "n.npz", params, method.init(params), method)
    with pytest.raises(CheckpointError, match="params_like"):
        checkpoint.restore(path, cheap(predict_fn=predict, loss="mse"))
    p, _ = checkpoint.restore(path, cheap(predict_fn=predict, loss="mse"), params_like=params)
    assert isinstance(p, Params)
    with pytest.raises(CheckpointError, match=r"params\.w: expected float64\[3, 3\] \(params_like\), found float64\[2, 3\]"):
        checkpoint.restore(
            path,
            cheap(predict_fn=predict, loss="mse"),
            params_like=Params(jnp.ones((3, 3)), jnp.zeros(3)),
        )
    # same plan, another tx: the state no longer has the saved structure
    dict_params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    m = cheap(predict_fn=lambda p, x: x @ p["w"] + p["b"], loss="mse")
    path2 = checkpoint.save(tmp_path / "d.npz", dict_params, m.init(dict_params), m)
    with pytest.raises(CheckpointError, match="state structure differs"):
        checkpoint.restore(
            path2, cheap(predict_fn=m.model.predict_fn, loss="mse", tx=optax.adam(1e-3))
        )
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a somax_plug checkpoint"):
        checkpoint.restore(tmp_path / "junk.npz", m)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.restore(tmp_path / "missing.npz", m)
