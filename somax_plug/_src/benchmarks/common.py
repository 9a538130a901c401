"""Shared pieces of the benchmarks: timing, the 784-256-10 model, random data.

Timing protocol (:func:`alternate`): every contender is a zero-argument callable
that does one unit of work and returns arrays; each is warmed up (compilation
included; at least ``warmup`` calls and ``warmup_s`` seconds) and then timed over
``repeats`` rounds, the contenders alternating (the order rotates every round so none
always runs first), each call timed to ``jax.block_until_ready``. Results are
medians.

Example:
    >>> from somax_plug._src.benchmarks.common import alternate
    >>> times = alternate({"a": lambda: 1, "b": lambda: 2}, repeats=3, warmup=1)
    >>> sorted(times), len(times["a"])
    (['a', 'b'], 3)
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from somax_plug._src.demo import machine_info

__all__ = ["alternate", "machine_info", "median", "mlp", "init_mlp", "random_batch", "ce_loss",
           "geomean"]

PyTree = Any


def alternate(
    contenders: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    cpu: dict[str, list[float]] | None = None,
    warmup_s: float = 2.0,
    max_warmup: int = 30,
) -> dict[str, list[float]]:
    """Wall-clock seconds per call of each contender, alternating, after a warm-up.

    The warm-up calls every contender at least ``warmup`` times and, in alternation,
    until ``warmup_s`` seconds have passed (at most ``max_warmup`` rounds): on CPU the
    first seconds after compilation can run several times slower (XLA's runtime and
    LAPACK kernels warming up), which a single warm-up call does not absorb.

    With ``cpu`` (a dict), the process CPU seconds of every call are stored there too:
    on a machine shared with other jobs they are less disturbed than wall-clock.
    """
    names = list(contenders)
    start = time.perf_counter()
    rounds = 0
    while rounds < warmup or (time.perf_counter() - start < warmup_s and rounds < max_warmup):
        for name in names:
            jax.block_until_ready(contenders[name]())
        rounds += 1
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            c = time.process_time()
            t = time.perf_counter()
            jax.block_until_ready(contenders[name]())
            times[name].append(time.perf_counter() - t)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - c)
    return times


def median(values: list[float]) -> float:
    """The median (seconds)."""
    return float(statistics.median(values))


def geomean(values: list[float]) -> float | None:
    """Geometric mean of positive ratios (None when there are none)."""
    values = [v for v in values if v is not None and v > 0]
    if not values:
        return None
    return float(math.exp(sum(math.log(v) for v in values) / len(values)))


def init_mlp(key: jax.Array, sizes: tuple[int, ...] = (784, 256, 10)) -> dict[str, jax.Array]:
    """A tanh MLP (the shape of python-somax's benchmark model by default)."""
    from somax_plug._src.demo import init_mlp as _init

    return _init(key, sizes)


def mlp(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Logits of :func:`init_mlp`'s MLP."""
    from somax_plug._src.demo import mlp as _mlp

    return _mlp(params, x)


def random_batch(key: jax.Array, batch: int, d_in: int = 784,
                 classes: int = 10) -> tuple[jax.Array, jax.Array]:
    """Standard-normal inputs and uniform integer labels."""
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (batch, d_in), jnp.float32),
            jax.random.randint(ky, (batch,), 0, classes, jnp.int32))


def ce_loss(params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean softmax cross-entropy of :func:`mlp`."""
    x, y = batch
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y))


def run_steps(step: Callable[..., Any], params: PyTree, state: Any, batch: Any, n: int,
              keys: list[Any] | None = None) -> Callable[[], Any]:
    """A contender that runs ``n`` consecutive steps from ``(params, state)``.

    ``step(params, state, batch, key)`` returns ``(params, state, ...)``; the same
    start is reused on every call, so every call does the same work.
    """

    def go() -> Any:
        p, s = params, state
        for i in range(n):
            out = step(p, s, batch, None if keys is None else keys[i])
            p, s = out[0], out[1]
        return p

    return go
