"""Per-step time of ``sophia_h`` vs ``optax.contrib.sophia`` and ``adahessian`` vs Adam.

Model and data: the 784-256-10 tanh MLP of the other benchmarks, a batch of 256
standard-normal inputs with random labels, float32, softmax cross-entropy.

Contenders (all at the same configuration: the presets' hyperparameters):

* ``sophia_h``: ``compose(preset="sophia_h")``, its public ``method.step``;
* ``optax_sophia``: ``optax.contrib.sophia`` with the preset's b1, b2, eps, gamma,
  clip, update interval and learning rate and no weight decay (the preset has none),
  its default Hutchinson estimator; one jitted function per step
  (``value_and_grad``, ``update(..., obj_fn=...)``, ``apply_updates``);
* ``adahessian``: ``compose(preset="adahessian")``, ``method.step``;
* ``adam``: ``optax.adam(1e-3)``, one jitted function per step;
* ``adahessian_ref``: a hand-written JAX AdaHessian step (one ``jax.jvp`` of
  ``jax.grad`` gives the gradient and the Hessian-vector product together), the cost
  floor of the method, for reference;
* ``somax_sgd`` vs ``sgd``: ``compose(solver="identity")`` (plain gradient descent
  through the framework) vs ``optax.sgd``: the framework's fixed cost per step (finite
  checks, rollback, the ``info`` record, ``method.step``'s dispatch), for reference.

Protocol: one call runs ``block`` consecutive steps from the same start (step count 0,
so a 10-step block holds exactly one Sophia Hessian refresh: its amortised cost);
every contender is compiled and warmed up first (compilation excluded), then the
contenders alternate over ``repeats`` rounds (the order rotating), each call timed to
``jax.block_until_ready``; the per-step time is the median block time / ``block``.
With ``--scan`` each block is one jitted ``lax.scan`` over the steps instead (no
Python dispatch per step; ``method._step`` is traced inside the scan).

Run by ``somax-plug bench`` (part ``paper_presets``) and by
``python benchmarks/bench_sophia_adahessian.py [--repeats 15] [--block 10] [--scan] [--json]``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from somax_plug import compose
from somax_plug._src.benchmarks.common import (
    alternate,
    ce_loss,
    init_mlp,
    machine_info,
    median,
    mlp,
    random_batch,
    run_steps,
)
from somax_plug.builtin.presets import PRESETS

TARGETS = {"sophia_h / optax_sophia": 1.0, "adahessian / adam": 2.5}


def optax_sophia(learning_rate: float | None = None,
                 weight_decay: float = 0.0) -> optax.GradientTransformation:
    """``optax.contrib.sophia`` at the ``sophia_h`` preset's configuration (read from the
    preset; its learning rate unless given; the preset has no weight decay)."""
    config = PRESETS["sophia_h"][1]
    pre, solver = config["preconditioner"], config["solver"]
    (est,) = config["estimators"]
    return optax.contrib.sophia(
        config["learning_rate"] if learning_rate is None else learning_rate,
        b1=solver["momentum"],
        b2=pre["beta"],
        eps=pre["eps"],
        gamma=pre["scale"],
        clip_threshold=pre["clip"],
        update_interval=est["every_k"],
        weight_decay=weight_decay,
    )


def optax_step(tx: optax.GradientTransformation, hessian: bool) -> Any:
    def step(params: Any, state: Any, batch: Any, key: Any = None) -> Any:
        obj = lambda p: ce_loss(p, batch)
        loss, grads = jax.value_and_grad(obj)(params)
        extra = {"obj_fn": obj} if hessian else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state, loss

    return step


def adahessian_ref_step(lr: float, b1: float, b2: float, eps: float) -> Any:
    """The paper's AdaHessian for dense weights, written directly in JAX."""

    def step(params: Any, state: Any, batch: Any, key: Any) -> Any:
        m, v, t = state
        obj = lambda p: ce_loss(p, batch)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(key, len(leaves))
        z = jax.tree_util.tree_unflatten(
            treedef,
            [jax.random.rademacher(k, x.shape, jnp.float32)
             for k, x in zip(keys, leaves, strict=True)],
        )
        grads, hz = jax.jvp(jax.grad(obj), (params,), (z,))
        d = jax.tree_util.tree_map(lambda a, b: a * b, z, hz)
        t = t + 1
        m = jax.tree_util.tree_map(lambda a, g: b1 * a + (1 - b1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda a, h: b2 * a + (1 - b2) * h * h, v, d)
        c1, c2 = 1 - b1**t, 1 - b2**t
        params = jax.tree_util.tree_map(
            lambda p, a, b: p - lr * (a / c1) / (jnp.sqrt(b / c2) + eps), params, m, v
        )
        return params, (m, v, t), None

    return step


def contenders(params: Any, batch: Any, block: int, scan: bool) -> dict[str, Any]:
    sophia = compose(preset="sophia_h", predict_fn=mlp, loss="softmax_cross_entropy")
    ada = compose(preset="adahessian", predict_fn=mlp, loss="softmax_cross_entropy")
    ada_cfg = PRESETS["adahessian"][1]
    plain = compose(curvature="ggn", solver="identity", predict_fn=mlp,
                    loss="softmax_cross_entropy", learning_rate=1e-2)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx_sophia, tx_adam, tx_sgd = optax_sophia(), optax.adam(1e-3), optax.sgd(1e-2)
    steps = {
        "sophia_h": (sophia._step if scan else sophia.step, sophia.init(params)),
        "optax_sophia": (optax_step(tx_sophia, True), tx_sophia.init(params)),
        "adahessian": (ada._step if scan else ada.step, ada.init(params)),
        "adam": (optax_step(tx_adam, False), tx_adam.init(params)),
        "adahessian_ref": (
            adahessian_ref_step(
                ada_cfg["learning_rate"],
                ada_cfg["solver"]["momentum"],
                ada_cfg["preconditioner"]["beta"],
                ada_cfg["damping"]["lam"],
            ),
            (zeros, zeros, jnp.zeros((), jnp.int32)),
        ),
        "somax_sgd": (plain._step if scan else plain.step, plain.init(params)),
        "sgd": (optax_step(tx_sgd, False), tx_sgd.init(params)),
    }
    keys = jax.random.split(jax.random.key(1), block)
    out = {}
    for name, (step, state) in steps.items():
        somax = name in ("sophia_h", "adahessian", "somax_sgd")
        if scan:

            def body(carry: Any, key: Any, step: Any = step) -> Any:
                p, s = carry
                p, s, _ = step(p, s, batch, key)
                return (p, s), None

            run = jax.jit(lambda p, s, body=body: jax.lax.scan(body, (p, s), keys)[0][0])
            out[name] = lambda run=run, state=state: run(params, state)
        else:
            if not somax:
                step = jax.jit(step)

            out[name] = run_steps(step, params, state, batch, block, list(keys))
    return out


def run(repeats: int = 15, block: int = 10, scan: bool = False, quick: bool = False,
        smoke: bool = False) -> dict[str, Any]:
    """Per-step times and ratios (see the module docstring); ``quick``: 5 repeats;
    ``smoke``: nothing timed, null ratios (the report's schema only)."""
    if smoke:
        return {"sophia_h_over_optax_sophia": None, "adahessian_over_adam": None,
                "note": "not run (smoke)"}
    if quick:
        repeats = min(repeats, 5)
    params = init_mlp(jax.random.key(0))
    batch = random_batch(jax.random.key(2), 256)
    cpu: dict[str, list[float]] = {}
    times = alternate(contenders(params, batch, block, scan), repeats=repeats, cpu=cpu)
    per_step = {name: median(t) / block for name, t in times.items()}
    cpu_step = {name: median(t) / block for name, t in cpu.items()}
    ratios = {
        "sophia_h / optax_sophia": per_step["sophia_h"] / per_step["optax_sophia"],
        "adahessian / adam": per_step["adahessian"] / per_step["adam"],
        "adahessian_ref / adam": per_step["adahessian_ref"] / per_step["adam"],
        "somax_sgd / sgd": per_step["somax_sgd"] / per_step["sgd"],
    }
    cpu_ratios = {
        "sophia_h / optax_sophia": cpu_step["sophia_h"] / cpu_step["optax_sophia"],
        "adahessian / adam": cpu_step["adahessian"] / cpu_step["adam"],
        "adahessian_ref / adam": cpu_step["adahessian_ref"] / cpu_step["adam"],
        "somax_sgd / sgd": cpu_step["somax_sgd"] / cpu_step["sgd"],
    }
    return {
        "model": "mlp 784-256-10 tanh, batch 256, float32",
        "mode": "lax.scan" if scan else "method.step per step",
        "block": block,
        "repeats": repeats,
        "per_step_ms": {k: round(v * 1e3, 4) for k, v in per_step.items()},
        "per_step_cpu_ms": {k: round(v * 1e3, 4) for k, v in cpu_step.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "cpu_ratios": {k: round(v, 3) for k, v in cpu_ratios.items()},
        "sophia_h_over_optax_sophia": round(ratios["sophia_h / optax_sophia"], 3),
        "adahessian_over_adam": round(ratios["adahessian / adam"], 3),
        "targets": TARGETS,
        "machine": machine_info(),
    }
