"""Cost of one GGN-vector product and one Hessian-vector product, in gradients.

Model: an MLP 784-256-10 (tanh; 203,530 float32 parameters), batch 128, softmax
cross-entropy (mean). Three contenders, each a jitted function of
``(params, batch, v)`` that starts from nothing, as a training step would:

* ``grad``: the ``grad`` resource with nothing else planned (``jax.grad`` of the loss:
  one forward and one backward pass);
* ``ggnvp``: ``GGN().build(res).mv(v)`` with ``linearization`` and ``output_hessian``
  planned: ONE ``jax.linearize`` of the model (the forward pass, keeping residuals),
  one jvp ``J v``, the closed-form softmax output Hessian, one transpose ``J^T u``;
* ``hvp``: ``Hessian().build(res).mv(v)`` with ``hvp`` planned: ``jax.linearize`` of
  ``value_and_grad`` (forward + backward) and one jvp through it (forward-over-reverse).

Fairness: the same inputs, the same library code paths a step uses (the built-in
providers through :class:`~somax_plug.Resources`), outputs blocked with
``block_until_ready``; every function is compiled and run 3 times before timing; each
repeat round times the contenders one after the other, in an order that rotates from
round to round, and the reported time is the median over rounds. The ratios divide
medians. Nothing is cached between calls (each call redoes the forward pass).

Run: ``python benchmarks/bench_matvec.py [--quick]`` prints one JSON object.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from somax_plug._src.model import make_model
from somax_plug._src.resources import Resources
from somax_plug.builtin.curvature import GGN, Hessian
from somax_plug.builtin.resources import PROVIDERS

SIZES = (784, 256, 10)
BATCH = 128


def _predict(params: Any, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _init(key: jax.Array) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    d_in, d_hid, d_out = SIZES
    return {
        "w1": jax.random.normal(k1, (d_in, d_hid), jnp.float32) / jnp.sqrt(d_in),
        "b1": jnp.zeros((d_hid,), jnp.float32),
        "w2": jax.random.normal(k2, (d_hid, d_out), jnp.float32) / jnp.sqrt(d_hid),
        "b2": jnp.zeros((d_out,), jnp.float32),
    }


MODEL = make_model(_predict, "softmax_cross_entropy")


def _resources(params: Any, batch: Any, planned: set[str]) -> Resources:
    providers = {name: PROVIDERS[name] for name in planned}
    return Resources(MODEL, params, batch, jax.random.key(0), providers, planned=planned)


@jax.jit
def grad_fn(params: Any, batch: Any, v: Any) -> Any:
    del v
    return _resources(params, batch, {"grad"})["grad"]


@jax.jit
def ggnvp_fn(params: Any, batch: Any, v: Any) -> Any:
    res = _resources(params, batch, {"linearization", "outputs", "output_hessian"})
    return GGN().build(res).mv(v)


@jax.jit
def hvp_fn(params: Any, batch: Any, v: Any) -> Any:
    return Hessian().build(_resources(params, batch, {"hvp"})).mv(v)


CONTENDERS = {"grad": grad_fn, "ggnvp": ggnvp_fn, "hvp": hvp_fn}


def _time_once(fn: Any, args: tuple[Any, ...]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def run(quick: bool = False) -> dict[str, Any]:
    """Median seconds per call of each contender, and the ratios to one gradient."""
    key_p, key_x, key_y, key_v = jax.random.split(jax.random.key(0), 4)
    params = _init(key_p)
    batch = (
        jax.random.normal(key_x, (BATCH, SIZES[0]), jnp.float32),
        jax.random.randint(key_y, (BATCH,), 0, SIZES[-1]),
    )
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key_v, len(leaves))
    v = jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )
    args = (params, batch, v)
    names = list(CONTENDERS)
    for fn in CONTENDERS.values():  # compile, then warm up
        for _ in range(3):
            _time_once(fn, args)
    repeats = 7 if quick else 41
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(_time_once(CONTENDERS[name], args))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "ggnvp_over_grad": medians["ggnvp"] / medians["grad"],
        "hvp_over_grad": medians["hvp"] / medians["grad"],
        "cases": medians,
        "num_params": sum(int(x.size) for x in leaves),
        "batch": BATCH,
        "repeats": repeats,
        "device": str(jax.devices()[0]),
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)))
