"""A robustness suite for presets: small problems nobody tuned on, run with defaults.

Each :class:`Problem` is a tiny model, a loss and a data set (made here from a fixed
seed, no download). :func:`run` trains a preset (or any composition) with its default
options for a few steps, full batch or on minibatches with a fresh batch every step,
and returns the history; :func:`verdict` applies the suite's three rules:

* every loss is finite;
* no step-to-step increase of the training loss by more than ``max_jump`` (10x);
* the final loss on the whole data set is below the initial one.

==================  ===========================================================
problem             what it is
==================  ===========================================================
``mlp``             10-class classification, MLP 16-32-10 (tanh), teacher labels
``regression``      3 outputs, MLP 8-32-3 (tanh), MSE, noisy teacher targets
``sequence``        per-token softmax cross-entropy, embedding 7x6, tanh, 5 tokens
``conv``            1D CNN (conv 3x1->4, tanh, dense 64->10), teacher labels
``random_labels``   memorisation: MLP 16-64-10 on 512 points with random labels
``indefinite``      MSE on a tanh MLP with large weights (an indefinite Hessian)
==================  ===========================================================

Example:
    >>> from somax_plug.testing.robustness import PROBLEMS, run, verdict
    >>> history = run(PROBLEMS["regression"], {"preset": "gauss_newton_lm"}, steps=3)
    >>> verdict(history)                                       # doctest: +SKIP
    []
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class Problem(NamedTuple):
    """A model, its loss, initial parameters and a data set ``(inputs, targets)``."""

    name: str
    predict_fn: Callable[[PyTree, Any], Any]
    loss: str
    params: PyTree
    inputs: Any
    targets: Any


class History(NamedTuple):
    """What :func:`run` recorded: batch losses per step and whole-data losses."""

    problem: str
    composition: str
    losses: list[float]
    initial: float
    final: float


def _dense(key: Any, n_in: int, n_out: int, scale: float = 1.0) -> dict[str, Any]:
    w = scale * jax.random.normal(key, (n_in, n_out)) / np.sqrt(n_in)
    return {"w": w, "b": jnp.zeros((n_out,))}


def _mlp_fn(params: PyTree, x: Any) -> Any:
    h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
    return h @ params["l2"]["w"] + params["l2"]["b"]


def _mlp(seed: int, sizes: tuple[int, int, int], scale: float = 1.0) -> PyTree:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "l1": _dense(k1, sizes[0], sizes[1], scale),
        "l2": _dense(k2, sizes[1], sizes[2], scale),
    }


def _teacher_labels(x: Any, classes: int, seed: int) -> Any:
    teacher = _mlp(seed, (x.shape[1], 16, classes), scale=3.0)
    return jnp.argmax(_mlp_fn(teacher, x), axis=-1)


def mlp_problem(n: int = 2048) -> Problem:
    x = jax.random.normal(jax.random.key(1), (n, 16))
    return Problem("mlp", _mlp_fn, "softmax_cross_entropy", _mlp(2, (16, 32, 10)), x,
                   _teacher_labels(x, 10, 3))


def regression_problem(n: int = 2048) -> Problem:
    x = jax.random.normal(jax.random.key(11), (n, 8))
    teacher = _mlp(12, (8, 16, 3), scale=2.0)
    y = _mlp_fn(teacher, x) + 0.1 * jax.random.normal(jax.random.key(13), (n, 3))
    return Problem("regression", _mlp_fn, "mse", _mlp(14, (8, 32, 3)), x, y)


def _sequence_fn(params: PyTree, tokens: Any) -> Any:
    h = jnp.tanh(params["embed"][tokens])  # [B, T, 6]
    return h @ params["out"]["w"] + params["out"]["b"]  # [B, T, 7]


def sequence_problem(n: int = 2048, length: int = 5, vocab: int = 7) -> Problem:
    tokens = jax.random.randint(jax.random.key(21), (n, length), 0, vocab)
    targets = (3 * tokens + 1) % vocab  # a per-token map to learn
    k1, k2 = jax.random.split(jax.random.key(22))
    params = {"embed": jax.random.normal(k1, (vocab, 6)), "out": _dense(k2, 6, vocab)}
    return Problem("sequence", _sequence_fn, "softmax_cross_entropy", params, tokens, targets)


def _conv_fn(params: PyTree, x: Any) -> Any:
    h = jax.lax.conv_general_dilated(
        x, params["conv"], window_strides=(1,), padding="SAME",
        dimension_numbers=("NWC", "WIO", "NWC"),
    )
    h = jnp.tanh(h + params["conv_b"])
    return h.reshape(h.shape[0], -1) @ params["out"]["w"] + params["out"]["b"]


def conv_problem(n: int = 2048, length: int = 16) -> Problem:
    x = jax.random.normal(jax.random.key(31), (n, length, 1))
    y = _teacher_labels(x[..., 0], 10, 32)
    k1, k2 = jax.random.split(jax.random.key(33))
    params = {
        "conv": jax.random.normal(k1, (3, 1, 4)) / np.sqrt(3.0),
        "conv_b": jnp.zeros((4,)),
        "out": _dense(k2, 4 * length, 10),
    }
    return Problem("conv", _conv_fn, "softmax_cross_entropy", params, x, y)


def random_label_problem(n: int = 512) -> Problem:
    x = jax.random.normal(jax.random.key(41), (n, 16))
    y = jax.random.randint(jax.random.key(42), (n,), 0, 10)
    return Problem("random_labels", _mlp_fn, "softmax_cross_entropy", _mlp(43, (16, 64, 10)), x, y)


def indefinite_problem(n: int = 2048) -> Problem:
    x = jax.random.normal(jax.random.key(51), (n, 8))
    y = jnp.sin(2.0 * x[:, :3])
    return Problem("indefinite", _mlp_fn, "mse", _mlp(52, (8, 32, 3), scale=4.0), x, y)


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        mlp_problem(),
        regression_problem(),
        sequence_problem(),
        conv_problem(),
        random_label_problem(),
        indefinite_problem(),
    )
}
"""The suite's problems by name."""


def _label(composition: Mapping[str, Any]) -> str:
    return composition.get("preset") or ",".join(f"{k}={v}" for k, v in composition.items())


def run(
    problem: Problem,
    composition: Mapping[str, Any],
    steps: int = 20,
    batch_size: int | None = None,
    seed: int = 0,
) -> History:
    """Train ``composition`` (e.g. ``{"preset": "sgn"}``) on ``problem`` with defaults.

    ``batch_size=None`` is full batch; otherwise a fresh minibatch every step (drawn
    without replacement within an epoch, the same for every composition and seed).
    """
    from somax_plug import compose

    method = compose(predict_fn=problem.predict_fn, loss=problem.loss, config=dict(composition))
    whole = (problem.inputs, problem.targets)
    n = int(problem.inputs.shape[0])
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n) for _ in range(steps * (batch_size or n) // n + 1)])
    loss_of = jax.jit(lambda p: method.model.loss_value(p, whole))
    params = problem.params
    state = method.init(params)
    initial = float(loss_of(params))
    losses = []
    for i in range(steps):
        if batch_size is None:
            batch = whole
        else:
            idx = order[i * batch_size : (i + 1) * batch_size]
            batch = (problem.inputs[idx], problem.targets[idx])
        params, state, info = method.step(params, state, batch, jax.random.key(seed * 1000 + i))
        losses.append(float(info["loss"]))
    return History(problem.name, _label(composition), losses, initial, float(loss_of(params)))


def verdict(history: History, max_jump: float = 10.0) -> list[str]:
    """The rules ``history`` breaks (empty: it passes)."""
    broken = []
    values = [*history.losses, history.final]
    if not all(np.isfinite(v) for v in values):
        broken.append(f"non-finite loss: {values}")
    for i in range(1, len(history.losses)):
        before, after = history.losses[i - 1], history.losses[i]
        if np.isfinite(before) and after > max_jump * max(before, 1e-12):
            broken.append(f"step {i}: loss {before:.4g} -> {after:.4g} (> {max_jump}x)")
            break
    if not history.final < history.initial:
        broken.append(f"final loss {history.final:.4g} >= initial {history.initial:.4g}")
    return broken
