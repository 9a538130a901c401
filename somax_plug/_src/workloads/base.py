"""What a workload is: a model, a loss, a minibatch stream, an evaluation and a target.

A :class:`Workload` holds everything the runner
(:mod:`somax_plug._src.workloads.runner`) and every contender need, in plain JAX:

* ``init_params(key)`` and ``predict_fn(params, inputs) -> logits [N, C]``, the pair
  given to :func:`somax_plug.compose` with ``loss="softmax_cross_entropy"`` (mean
  over the N rows);
* ``objective(params, batch)``, the same mean cross-entropy as a scalar (for the
  first-order contenders and kfac-jax);
* ``batch(seed, step)``: the minibatch of one step, a pure function of the seed and
  the step (a fresh batch every step, the same batches for every contender);
* ``evaluate(params) -> {"loss", "accuracy"}`` on held-out data (jitted, untimed);
* ``target``: the held-out metric (``"accuracy"`` at least, or ``"loss"`` at most
  ``target.value``) whose first crossing is the time and step count to target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


@dataclass(frozen=True)
class Target:
    """A held-out metric threshold: ``accuracy >= value`` or ``loss <= value``."""

    metric: str
    value: float

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def reached(self, metrics: dict[str, float]) -> bool:
        v = metrics[self.metric]
        return v >= self.value if self.higher_is_better else v <= self.value

    def describe(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        return f"held-out {self.metric} {op} {self.value:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value,
                "op": ">=" if self.higher_is_better else "<="}


@dataclass(frozen=True)
class Budget:
    """Per run: at most ``max_steps`` steps and ``max_seconds`` of training clock.

    ``eval_every_s`` / ``eval_every_steps``: evaluate after the first step at which
    at least this much training clock, or this many steps, have passed since the last
    evaluation (the clock-based rule gives every contender the same time resolution,
    however long its steps are).
    """

    max_steps: int
    max_seconds: float
    eval_every_s: float = 0.0
    eval_every_steps: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"max_steps": self.max_steps, "max_seconds": self.max_seconds,
                "eval_every_s": self.eval_every_s, "eval_every_steps": self.eval_every_steps}


@dataclass
class Workload:
    """One training problem (see the module docstring)."""

    name: str
    title: str
    size: str
    init_params: Callable[[jax.Array], PyTree]
    predict_fn: Callable[[PyTree, Any], jax.Array]
    batch: Callable[[int, int], tuple[Any, Any]]
    eval_data: tuple[Any, Any]
    target: Target
    budget: Budget
    batch_size: int
    info: dict[str, Any] = field(default_factory=dict)
    adam_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    sophia_lr: float = 1e-3
    _evaluate: Any = None

    def objective(self, params: PyTree, batch: tuple[Any, Any]) -> jax.Array:
        """Mean softmax cross-entropy over the rows of ``predict_fn`` (the compose loss)."""
        x, y = batch
        logits = self.predict_fn(params, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def evaluate(self, params: PyTree) -> dict[str, float]:
        """Held-out mean cross-entropy and accuracy (jitted once per workload)."""
        if self._evaluate is None:
            predict = self.predict_fn

            @jax.jit
            def ev(params: PyTree, x: Any, y: Any) -> tuple[jax.Array, jax.Array]:
                logits = predict(params, x)
                loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
                return loss, jnp.mean(jnp.argmax(logits, axis=-1) == y)

            self._evaluate = ev
        loss, acc = self._evaluate(params, *self.eval_data)
        return {"loss": float(loss), "accuracy": float(acc)}

    def num_params(self) -> int:
        params = jax.eval_shape(self.init_params, jax.random.key(0))
        return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "size": self.size,
                "target": self.target.to_dict(), "budget": self.budget.to_dict(),
                "batch_size": self.batch_size, "num_params": self.num_params(),
                "adam_grid": list(self.adam_grid), "sophia_lr": self.sophia_lr, **self.info}
