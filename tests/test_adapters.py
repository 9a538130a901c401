"""Flax NNX, Flax Linen and Equinox models through compose and as_optax.

The researcher's check of issue 13: a Flax NNX CNN with BatchNorm and dropout and an
Equinox MLP (BatchNorm, dropout), trained with ``sgn``, ``gauss_newton_lm`` and
``sophia_h`` through ``compose`` and through ``as_optax``: the train-mode loss (one
fixed mask) decreases, the BatchNorm statistics move, and the trained values go back
into the user's model. The GGN the solver sees is compared with the dense
``J^T H_out J`` of the masked network in train mode (float64; 1e-9 relative: the
same products in another order). Networks are tiny (a few dozen parameters) so that
the compilations dominate and stay few.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import somax_plug as sp
from somax_plug import InputError, model_key

eqx = pytest.importorskip("equinox")
nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
from somax_plug.models import from_equinox, from_flax_linen, from_nnx  # noqa: E402

B, C = 8, 3
F64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}
PRESETS = ["sgn", "gauss_newton_lm", "sophia_h"]
BRIDGE_DAMPING = {"sgn": {"name": "constant", "lam": 1.0},
                  "gauss_newton_lm": {"name": "constant", "lam": 1.0}, "sophia_h": None}
LR = {"sgn": 1.0, "gauss_newton_lm": 1.0, "sophia_h": 0.05}
OVERRIDES = {"sgn": {"solver": {"name": "cg", "maxiter": 10, "loop": "while"}}}
"""sgn's CG as a while loop: on CPU, a convolution makes ``loop="auto"`` unroll its ten
iterations, which compiles ten copies of the products (several times slower to build)."""


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(1, 2, (3, 3), rngs=rngs, **F64)
        self.bn = nnx.BatchNorm(2, rngs=rngs, **F64)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(2 * 4 * 4, C, rngs=rngs, **F64)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.drop(nnx.relu(self.bn(self.conv(x))))
        return self.head(x.reshape(x.shape[0], -1))


class EqxMLP(eqx.Module):
    l1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout
    l2: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(16, 6, key=k1, dtype=jnp.float64)
        self.bn = eqx.nn.BatchNorm(6, "batch", mode="ema", dtype=jnp.float64)
        self.drop = eqx.nn.Dropout(0.1)
        self.l2 = eqx.nn.Linear(6, C, key=k2, dtype=jnp.float64)

    def __call__(self, x, state, *, key=None):
        h, state = self.bn(self.l1(x.ravel()), state)
        return self.l2(self.drop(jax.nn.tanh(h), key=key)), state


def _data():
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (B, 4, 4, 1), jnp.float64)
    y = jax.random.randint(ky, (B,), 0, C)
    return x, y


def _ce(z, y):
    return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


def _adapted(kind):
    if kind == "nnx":
        return from_nnx(CNN(nnx.Rngs(0)))
    model, state = eqx.nn.make_with_state(EqxMLP)(jax.random.key(0))
    return from_equinox(model, state)


def _train_loss(adapted, params, batch):
    """The train-mode loss with one fixed mask (the state is read only as a constant)."""
    x, y = batch
    out, _ = adapted.predict_fn(params, x, state=adapted.state, key=jax.random.key(99))
    return float(_ce(out, y))


def _moved(a, b):
    return not np.allclose(ravel_pytree(a)[0], ravel_pytree(b)[0])


@pytest.mark.parametrize("kind", ["nnx", "equinox"])
@pytest.mark.parametrize("preset", PRESETS)
def test_compose_trains_and_moves_batchnorm_statistics(kind, preset):
    adapted, batch = _adapted(kind), _data()
    assert adapted.has_state and adapted.has_rng
    method = adapted.compose(preset=preset, loss="softmax_cross_entropy",
                             learning_rate=LR[preset], **OVERRIDES.get(preset, {}))
    state, params = adapted.init(method), adapted.params
    for _ in range(4):
        params, state, info = method.step(params, state, batch)
        assert bool(info["finite"])
    assert _train_loss(adapted, params, batch) < _train_loss(adapted, adapted.params, batch)
    assert _moved(state.model_state, adapted.state)
    exported = adapted.export(params, state.model_state)
    if kind == "nnx":  # back into the user's module, in place
        np.testing.assert_array_equal(exported.bn.mean[...], state.model_state["bn"]["mean"][...])
    else:
        model, eq_state = exported
        np.testing.assert_array_equal(model.l1.weight, params.l1.weight)


@pytest.mark.parametrize("kind", ["nnx", "equinox"])
@pytest.mark.parametrize("preset", PRESETS)
def test_as_optax_trains_and_moves_batchnorm_statistics(kind, preset):
    adapted, (x, y) = _adapted(kind), _data()
    extra = {"damping": BRIDGE_DAMPING[preset]} if BRIDGE_DAMPING[preset] else {}
    extra.update(OVERRIDES.get(preset, {}))
    tx = optax.chain(adapted.as_optax(preset=preset, loss="softmax_cross_entropy", **extra),
                     optax.scale_by_learning_rate(LR[preset]))
    opt_state, params = tx.init(adapted.params), adapted.params

    @jax.jit
    def update(params, opt_state, key):
        # the gradient the bridge receives: same state, same mask as the bridge's step
        count = opt_state[0].inner.count
        mkey = model_key(key, count)
        grads = jax.grad(lambda p: _ce(adapted.predict_fn(
            p, x, state=sp.model_state_of(opt_state), key=mkey)[0], y))(params)
        u, opt_state = tx.update(grads, opt_state, params, batch=(x, y), key=key)
        return optax.apply_updates(params, u), opt_state

    for i in range(4):
        params, opt_state = update(params, opt_state, jax.random.key(i))
        assert bool(opt_state[0].info["finite"])
    assert _train_loss(adapted, params, (x, y)) < _train_loss(adapted, adapted.params, (x, y))
    assert _moved(sp.model_state_of(opt_state), adapted.state)


def test_nnx_ggn_the_solver_sees_is_the_dense_ggn_of_the_masked_network():
    adapted, (x, y) = _adapted("nnx"), _data()
    method = adapted.compose("ggn", "direct", loss="softmax_cross_entropy",
                             damping={"name": "constant", "lam": 0.1})
    state, key = adapted.init(method), jax.random.key(5)
    got = jax.jit(lambda p, s, k: method.direction(p, s, (x, y), k).res["operator"].to_dense())(
        adapted.params, state, key
    )
    flat, unravel = ravel_pytree(adapted.params)
    mkey = model_key(key, 0)

    def f(v):
        return adapted.predict_fn(unravel(v), x, state=adapted.state, key=mkey)[0].ravel()

    jac = jax.jacfwd(f)(flat)
    h_out = jax.hessian(lambda z: _ce(z.reshape(B, C), y))(f(flat))
    want = jac.T @ h_out @ jac
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # the mask matters: a different key gives a different matrix
    other = jax.jacfwd(lambda v: adapted.predict_fn(
        unravel(v), x, state=adapted.state, key=model_key(key, 1))[0].ravel())(flat)
    assert not np.allclose(other.T @ h_out @ other, want)


def test_flax_linen_mlp_with_batchnorm_and_dropout():
    class MLP(linen.Module):
        @linen.compact
        def __call__(self, x, train: bool):
            x = linen.Dense(6, **F64)(x.reshape(x.shape[0], -1))
            x = linen.BatchNorm(use_running_average=not train, **F64)(x)
            x = linen.Dropout(0.1, deterministic=not train)(jnp.tanh(x))
            return linen.Dense(C, **F64)(x)

    x, y = _data()
    variables = MLP().init(jax.random.key(0), x, train=False)
    adapted = from_flax_linen(MLP(), variables, rngs=("dropout",),
                              train_kwargs={"train": True}, eval_kwargs={"train": False})
    assert adapted.has_state and adapted.has_rng and sorted(adapted.state) == ["batch_stats"]
    method = adapted.compose(preset="sgn", loss="softmax_cross_entropy", **OVERRIDES["sgn"])
    state, params = adapted.init(method), adapted.params
    for _ in range(4):
        params, state, info = method.step(params, state, (x, y))
    assert _train_loss(adapted, params, (x, y)) < _train_loss(adapted, adapted.params, (x, y))
    new_vars = adapted.export(params, state.model_state)
    assert sorted(new_vars) == ["batch_stats", "params"]
    assert _moved(new_vars["batch_stats"], variables["batch_stats"])
    assert adapted.evaluate(params, state.model_state, x).shape == (B, C)


def test_adapters_refuse_what_they_cannot_split():
    with pytest.raises(InputError, match="flax.nnx.Module"):
        from_nnx(lambda x: x)
    with pytest.raises(InputError, match="'params' collection"):
        from_flax_linen(linen.Dense(2), {"batch_stats": {}})
    with pytest.raises(InputError, match="eqx.nn.State"):
        from_equinox(eqx.nn.Linear(2, 2, key=jax.random.key(0)), state={"mean": 0})
    adapted = _adapted("equinox")
    with pytest.raises(InputError, match="export\\(params, state\\)"):
        adapted.export(adapted.params)
