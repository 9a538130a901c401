"""Train a small model with a method composed from the example plugins' components.

The method names a solver of the ``lineax`` plugin and the estimator of the
``xdiag`` plugin: curvature ``ggn``, ``estimators=["xdiag"]`` (the statistic
``diag``), preconditioner ``jacobi`` (which requires ``diag``) and solver
``lineax_cg``. It runs through the Optax bridge, ``somax_plug.as_optax``, inside
``optax.chain`` with weight decay and a learning rate, and exits non-zero unless
the training loss falls by at least half and the plan attributes the components to
their plugins.

Run it where somax-plug and the two plugins are installed::

    pip install . ./plugins_examples/somax-plug-lineax ./plugins_examples/somax-plug-xdiag
    python scripts/train_with_plugins.py
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import optax

from somax_plug import as_optax, compose, get_registry


def make_data(key: jax.Array, n: int = 256) -> tuple[jax.Array, jax.Array]:
    """Three Gaussian blobs in 2-D, integer labels."""
    k1, k2 = jax.random.split(key)
    labels = jax.random.randint(k1, (n,), 0, 3)
    centers = jnp.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    return centers[labels] + 0.8 * jax.random.normal(k2, (n, 2)), labels


def predict(params: dict, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def main() -> int:
    registry = get_registry()
    for name, plugin in (("lineax_cg", "lineax"), ("xdiag", "xdiag")):
        kind = "solver" if name.startswith("lineax") else "estimator"
        spec = registry.get(kind, name)
        print(f"{kind} {name}: plugin {spec.plugin!r} ({registry.plugins[plugin].distribution})")

    x, y = make_data(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 2)
    params = {
        "w1": 0.5 * jax.random.normal(keys[0], (2, 16)),
        "b1": jnp.zeros(16),
        "w2": 0.5 * jax.random.normal(keys[1], (16, 3)),
        "b2": jnp.zeros(3),
    }
    method = compose(
        "ggn",
        {"name": "lineax_cg", "rtol": 1e-4, "max_steps": 20},
        estimators=[{"name": "xdiag", "num_probes": 8}],
        preconditioner="jacobi",
        damping={"name": "constant", "lam": 1e-2},
        predict_fn=predict,
        loss="softmax_cross_entropy",
    )
    print(method.explain())
    plugins = {c.role: c.plugin for c in method.plan.components}
    if plugins.get("solver") != "lineax" or plugins.get("estimator[0]") != "xdiag":
        print(f"FAIL: components attributed to {plugins}", file=sys.stderr)
        return 1
    bridge = as_optax(method=method)
    tx = optax.chain(bridge, optax.add_decayed_weights(1e-4), optax.scale_by_learning_rate(1.0))
    state = tx.init(params)

    def loss_fn(p: dict) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(predict(p, x), y).mean()

    @jax.jit
    def step(p: dict, s: object) -> tuple[dict, object, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p, batch=(x, y))
        return optax.apply_updates(p, updates), s, loss

    losses = []
    for i in range(15):
        params, state, loss = step(params, state)
        losses.append(float(loss))
        info = state[0].info
        print(f"step {i:2d}  loss {losses[-1]:.4f}  cg iterations {int(info['solver_iterations'])}")
    final = float(loss_fn(params))
    print(f"loss {losses[0]:.4f} -> {final:.4f}")
    if not final < 0.5 * losses[0]:
        print("FAIL: the loss did not fall by half", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
