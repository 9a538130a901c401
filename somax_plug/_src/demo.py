"""The main job: train an MLP on scikit-learn's bundled digits with several presets.

``somax-plug demo [--quick] [--out DIR] [--devices N] [--seed S]`` trains a
64-64-10 tanh MLP on the 8x8 digits (``sklearn.datasets.load_digits``, bundled, no
download; standardised; a stratified 25% test split with a fixed seed) with softmax
cross-entropy on minibatches, once per method:

* second-order presets composed with :func:`somax_plug.compose` (``sgn``,
  ``newton_cg``, ``gauss_newton_lm``, ``natural_gradient``, ``sophia_h``), each with the
  overrides of :data:`METHODS` (learning rate, damping, CG iterations), which are
  recorded in the results;
* ``optax.adam`` as the first-order baseline.

Wall-clock counts the training steps only: the first call (compilation plus one
step, on a throw-away copy) is reported separately as ``compile_s``, and the
evaluations (full training loss, test accuracy) are not timed. The job writes
``DIR/results.json`` (every configuration, history and summary, the machine) and
``DIR/training.png`` (loss and accuracy against wall-clock and against steps), and
prints a summary table.

``--model cnn`` trains, with the same methods, table, JSON and plot, a Flax NNX CNN
with BatchNorm and dropout on the digits as 8x8 images (:func:`make_cnn`, through
:func:`somax_plug.models.from_nnx`: the BatchNorm statistics are the model state
threaded through every step, one dropout mask per step); it needs the ``flax`` extra.

``--workload lm`` runs the second main job instead: the character-level transformer
language model on the Python standard library's sources
(:mod:`somax_plug._src.workloads.lm`), one seed, ``optax.adam`` (:data:`WORKLOAD_ADAM_LR`)
and every somax_plug preset with its defaults, each for at most
:data:`WORKLOAD_SECONDS` seconds of training clock (stopping at the target); it shows
progress bars, prints the summary table and writes ``DIR/lm_results.json`` and
``DIR/lm_training.png`` (``--workload cnn``: the same for the digits CNN). ``--quick``
keeps Adam and ``sgn`` only.

``--devices N`` trains data-parallel over a ``jax.sharding.Mesh`` of N devices (the
batch is sharded over the mesh's ``"data"`` axis); on CPU, N devices come from
``XLA_FLAGS=--xla_force_host_platform_device_count=N``.

The training loop (:func:`train`) works with any :class:`Runner`, so the benchmarks
reuse it for the time-to-accuracy comparison.

Example:
    >>> from somax_plug._src.demo import build_parser
    >>> build_parser().parse_args(["--quick"]).quick
    True
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

TARGETS = (0.95, 0.97)
"""Test accuracies whose time and step counts the summary reports."""

TITLE = "somax-plug main job: second-order training on scikit-learn's digits"


# ----------------------------------------------------------------------------- data
class Data(NamedTuple):
    """Standardised digits, split into train and test (float32 inputs, int32 labels)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_data(split_seed: int = 0, test_size: float = 0.25) -> Data:
    """The 1797 bundled 8x8 digits, standardised on the training split.

    The split is stratified with a fixed seed; features are centred and scaled by the
    training set's statistics (constant pixels keep scale 1).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - exercised without the extra
        raise SystemExit(
            "the demo needs scikit-learn: pip install 'somax-plug[demo]'"
        ) from exc
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=split_seed
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    return Data((x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te)


# ---------------------------------------------------------------------------- model
def init_mlp(key: jax.Array, sizes: Sequence[int] = (64, 64, 10)) -> dict[str, jax.Array]:
    """Parameters of a tanh MLP (``w{i}`` scaled by ``1/sqrt(fan_in)``, zero biases)."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = jax.random.normal(k, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
        params[f"b{i}"] = jnp.zeros((fan_out,), jnp.float32)
    return params


def mlp(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Logits of the tanh MLP built by :func:`init_mlp`."""
    n = len(params) // 2
    h = x
    for i in range(n):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            h = jnp.tanh(h)
    return h


def ce_loss(params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of the MLP."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y))


def make_cnn(seed: int = 0) -> Any:
    """The ``--model cnn`` network: a Flax NNX CNN on the digits as 8x8 images.

    conv 3x3 (8) -> BatchNorm -> relu -> conv 3x3 stride 2 (16) -> BatchNorm -> relu ->
    dropout 0.1 -> dense 10 (BatchNorm momentum 0.9, so that the running statistics the
    evaluation uses settle within a few dozen steps), adapted with
    :func:`somax_plug.models.from_nnx` (the BatchNorm statistics are the model state,
    dropout draws from the step's key). Needs the ``flax`` extra.
    """
    from flax import nnx

    from somax_plug._src.adapters import from_nnx

    class DigitsCNN(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
            self.bn1 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
            self.conv2 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), rngs=rngs)
            self.bn2 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)
            self.head = nnx.Linear(16 * 4 * 4, 10, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            x = x.reshape(x.shape[0], 8, 8, 1)
            x = nnx.relu(self.bn1(self.conv1(x)))
            x = nnx.relu(self.bn2(self.conv2(x)))
            return self.head(self.drop(x).reshape(x.shape[0], -1))

    return from_nnx(DigitsCNN(nnx.Rngs(params=seed, dropout=seed + 1)))


MODELS = {
    "mlp": {"kind": "MLP", "sizes": [64, 64, 10], "activation": "tanh",
            "loss": "softmax_cross_entropy (mean)"},
    "cnn": {"kind": "Flax NNX CNN", "layers": "conv3x3(8)-BN-relu-conv3x3/2(16)-BN-relu-"
            "dropout(0.1)-dense(10)", "inputs": "8x8x1 images",
            "loss": "softmax_cross_entropy (mean)",
            "state": "BatchNorm statistics (model state, threaded through the step)"},
}
"""What ``results.json`` records about the model of ``--model``."""


@jax.jit
def _evaluate(params: PyTree, x_tr: jax.Array, y_tr: jax.Array, x_te: jax.Array,
              y_te: jax.Array) -> tuple[jax.Array, jax.Array]:
    train_loss = ce_loss(params, x_tr, y_tr)
    accuracy = jnp.mean(jnp.argmax(mlp(params, x_te), axis=-1) == y_te)
    return train_loss, accuracy


# -------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodConfig:
    """One contender: a preset with compose overrides, or an Optax optimizer.

    Attributes:
        name: label in the table and the plot.
        kind: ``"somax_plug"`` (``compose(preset=..., **overrides)``), ``"optax"``
            (``optax.<optimizer>(**overrides)``) or ``"external"`` (a runner passed in).
        preset: the somax_plug preset (or the optax optimizer's name).
        overrides: keyword arguments for :func:`somax_plug.compose` or the optimizer.
        steps: training steps of the default run.
        batch_size: minibatch size.
        note: why the overrides depart from the preset, where they do.
    """

    name: str
    kind: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 200
    batch_size: int = 128
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "note": self.note,
            "kind": self.kind,
            "preset": self.preset,
            "overrides": self.overrides,
            "steps": self.steps,
            "batch_size": self.batch_size,
        }


METHODS: dict[str, MethodConfig] = {
    m.name: m
    for m in (
        MethodConfig(
            "sgn", "somax_plug", "sgn",
            {"solver": {"name": "cg", "maxiter": 10, "tol": 1e-4},
             "damping": {"name": "constant", "lam": 0.1}, "learning_rate": 1.0},
            steps=200, batch_size=256,
        ),
        MethodConfig(
            "newton_cg", "somax_plug", "newton_cg",
            {"solver": {"name": "cg", "maxiter": 10, "tol": 1e-4, "negative_curvature": "guard"},
             "damping": {"name": "constant", "lam": 1.0}, "learning_rate": 1.0},
            steps=200, batch_size=256,
        ),
        MethodConfig(
            "gauss_newton_lm", "somax_plug", "gauss_newton_lm",
            {"solver": {"name": "cg", "maxiter": 10, "tol": 1e-4},
             "damping": {"name": "levenberg_marquardt", "init": 1.0}, "learning_rate": 1.0},
            steps=200, batch_size=256,
            note="solver row_cholesky replaced by cg: its R x R Gram (R = batch x 10 rows) is "
            "too slow at batch 256 on CPU, and batches small enough for it (16) stall near 88%",
        ),
        MethodConfig(
            "natural_gradient", "somax_plug", "natural_gradient",
            {"solver": {"name": "cg", "maxiter": 10, "tol": 1e-4},
             "damping": {"name": "constant", "lam": 0.1}, "learning_rate": 1.0},
            steps=200, batch_size=256,
        ),
        MethodConfig(
            "sophia_h", "somax_plug", "sophia_h",
            {"learning_rate": 0.003},  # the preset's clipped steps move each weight <= lr
            steps=1000, batch_size=128,
        ),
        MethodConfig("adam", "optax", "adam", {"learning_rate": 1e-2},
                     steps=1000, batch_size=128),
    )
}
"""The contenders of the default run, with their tuned overrides."""

QUICK = ("sgn", "adam")
"""The contenders of ``--quick``."""


# -------------------------------------------------------------------------- runners
class Runner(Protocol):
    """What :func:`train` drives: ``init`` and one step returning the minibatch loss."""

    def init(self, params: PyTree) -> Any: ...

    def step(self, params: PyTree, state: Any, batch: tuple[Any, Any], i: int) -> tuple[
        PyTree, Any, jax.Array]: ...


class MethodRunner:
    """A composed :class:`~somax_plug.Method` (its public jitted ``step``)."""

    def __init__(self, method: Any, seed: int = 0, model_state: Any = None) -> None:
        self.method = method
        self._key = jax.random.key(seed)
        self._model_state = model_state

    def init(self, params: PyTree) -> Any:
        if self._model_state is not None:
            return self.method.init(params, self._model_state)
        return self.method.init(params)

    @staticmethod
    def model_state(state: Any) -> Any:
        return state.model_state

    def step(self, params: PyTree, state: Any, batch: Any, i: int) -> Any:
        params, state, info = self.method.step(params, state, batch,
                                               jax.random.fold_in(self._key, i))
        return params, state, info["loss"]


class OptaxRunner:
    """A plain Optax optimizer on ``jax.value_and_grad`` of the same loss (jitted)."""

    def __init__(self, tx: optax.GradientTransformation) -> None:
        self.tx = tx

        def step(params: PyTree, state: Any, batch: Any) -> Any:
            loss, grads = jax.value_and_grad(ce_loss)(params, *batch)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        self._step = jax.jit(step)

    def init(self, params: PyTree) -> Any:
        return self.tx.init(params)

    def step(self, params: PyTree, state: Any, batch: Any, i: int) -> Any:
        return self._step(params, state, batch)

    @staticmethod
    def model_state(state: Any) -> Any:
        return None


class ModelOptaxRunner:
    """An Optax optimizer on an adapted model with state and dropout (the ``--model``
    baseline): train mode, one key per step, the new state carried in the runner state."""

    def __init__(self, tx: optax.GradientTransformation, model: Any, seed: int = 0) -> None:
        self.tx, self.model = tx, model
        self._key = jax.random.key(seed)

        def step(params: PyTree, state: Any, batch: Any, key: Any) -> Any:
            opt_state, model_state = state
            x, y = batch

            def loss(p: PyTree) -> Any:
                out, new = model.predict_fn(p, x, state=model_state, key=key)
                return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y)), new

            (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), (opt_state, new_state), value

        self._step = jax.jit(step)

    def init(self, params: PyTree) -> Any:
        return self.tx.init(params), self.model.state

    def step(self, params: PyTree, state: Any, batch: Any, i: int) -> Any:
        return self._step(params, state, batch, jax.random.fold_in(self._key, i))

    @staticmethod
    def model_state(state: Any) -> Any:
        return state[1]


def make_runner(cfg: MethodConfig, mesh: Any = None, seed: int = 0, model: Any = None) -> Runner:
    """The runner of a :class:`MethodConfig` (``mesh`` is passed to ``compose``);
    ``model``: an adapted model (:mod:`somax_plug.models`) instead of the MLP."""
    if cfg.kind == "somax_plug":
        from somax_plug._src.composition import compose

        if model is not None:
            method = compose(preset=cfg.preset, predict_fn=model.predict_fn,
                             loss="softmax_cross_entropy", mesh=mesh,
                             has_state=model.has_state, has_rng=model.has_rng, **cfg.overrides)
            return MethodRunner(method, seed, model_state=model.state)
        method = compose(preset=cfg.preset, predict_fn=mlp, loss="softmax_cross_entropy",
                         mesh=mesh, **cfg.overrides)
        return MethodRunner(method, seed)
    if cfg.kind == "optax":
        if model is not None:
            return ModelOptaxRunner(getattr(optax, cfg.preset)(**cfg.overrides), model, seed)
        return OptaxRunner(getattr(optax, cfg.preset)(**cfg.overrides))
    raise ValueError(f"method {cfg.name!r}: kind {cfg.kind!r} needs a runner passed to train()")


# ---------------------------------------------------------------------------- train
def _batches(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """``[steps, batch_size]`` indices: shuffled epochs, the incomplete tail dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    idx = [rng.permutation(n)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
           for _ in range(epochs)]
    return np.concatenate(idx)[:steps]


def _first_reaching(history: list[dict[str, float]], target: float) -> tuple[Any, Any]:
    for h in history:
        if h["test_accuracy"] >= target:
            return h["wall_clock_s"], h["step"]
    return None, None


def train(
    cfg: MethodConfig,
    data: Data,
    *,
    steps: int | None = None,
    seed: int = 0,
    runner: Runner | None = None,
    mesh: Any = None,
    eval_every: int | None = None,
    stop_at: float | None = None,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    model: Any = None,
) -> dict[str, Any]:
    """Train one method and return ``{"config", "history", "summary"}``.

    Args:
        cfg: the method (its ``steps`` and ``batch_size`` unless ``steps`` is given).
        data: the dataset.
        seed: parameter initialisation, minibatch order and the methods' keys.
        runner: a ready runner (else :func:`make_runner`).
        mesh: a ``jax.sharding.Mesh``: the batch is sharded over its ``"data"`` axis.
        eval_every: steps between evaluations (default 1: every step).
        stop_at: stop at the first evaluation with this test accuracy.
        on_eval: called with every history record (progress bars).
        model: an adapted model (:func:`make_cnn`) instead of the MLP; it is evaluated
            in inference mode (running statistics, no dropout) with the runner's
            current model state.
    """
    steps = cfg.steps if steps is None else steps
    runner = runner or make_runner(cfg, mesh=mesh, seed=seed, model=model)
    eval_every = eval_every or 1
    batch_size = cfg.batch_size
    if mesh is not None:
        n_dev = mesh.devices.size
        batch_size = max(n_dev, batch_size // n_dev * n_dev)
    order = _batches(len(data.y_train), batch_size, steps, seed)

    put: Callable[[Any], Any] = jax.device_put
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        sharding = NamedSharding(mesh, PartitionSpec("data"))
        put = lambda a: jax.device_put(a, sharding)
    eval_data = tuple(jnp.asarray(a) for a in data)

    def batch(i: int) -> tuple[Any, Any]:
        rows = order[i]
        return put(data.x_train[rows]), put(data.y_train[rows])

    if model is None:
        params0 = init_mlp(jax.random.key(seed))

        def evaluate(params: PyTree, state: Any) -> Any:
            return _evaluate(params, *eval_data)
    else:
        params0 = model.params
        model_eval = _model_evaluator(model)

        def evaluate(params: PyTree, state: Any) -> Any:
            return model_eval(params, runner.model_state(state), *eval_data)
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        params0 = jax.device_put(params0, NamedSharding(mesh, PartitionSpec()))
    state0 = runner.init(params0)

    # compilation (and one step) on a throw-away copy, timed apart; a second untimed
    # call compiles any re-specialisation to the step's own output shardings
    t = time.perf_counter()
    p1, s1, _ = runner.step(params0, state0, batch(0), 0)
    jax.block_until_ready(p1)
    compile_s = time.perf_counter() - t
    jax.block_until_ready(runner.step(p1, s1, batch(1 % steps), 1))
    jax.block_until_ready(evaluate(params0, state0))

    history: list[dict[str, float]] = []

    def record(step: int, clock: float, params: PyTree, state: Any) -> dict[str, float]:
        loss, acc = evaluate(params, state)
        rec = {"step": step, "wall_clock_s": clock, "train_loss": float(loss),
               "test_accuracy": float(acc)}
        history.append(rec)
        if on_eval is not None:
            on_eval(rec)
        return rec

    params, state = params0, state0
    clock = 0.0
    record(0, 0.0, params, state)
    done = 0
    start = time.perf_counter()
    for i in range(steps):
        params, state, _ = runner.step(params, state, batch(i), i)
        done = i + 1
        if done % eval_every == 0 or done == steps:
            jax.block_until_ready(params)
            clock += time.perf_counter() - start
            rec = record(done, clock, params, state)
            if stop_at is not None and rec["test_accuracy"] >= stop_at:
                break
            start = time.perf_counter()

    summary: dict[str, Any] = {
        "final_test_accuracy": history[-1]["test_accuracy"],
        "final_train_loss": history[-1]["train_loss"],
        "steps": done,
        "wall_clock_s": clock,
        "compile_s": compile_s,
        "step_time_ms": 1e3 * clock / max(done, 1),
    }
    for target in TARGETS:
        pct = round(target * 100)
        summary[f"time_to_{pct}_s"], summary[f"steps_to_{pct}"] = _first_reaching(history, target)
    config = {**cfg.to_dict(), "steps": steps, "batch_size": batch_size,
              "eval_every": eval_every, "seed": seed}
    if isinstance(runner, MethodRunner):
        config["composition"] = runner.method.plan.to_dict()["components"]
        config["plan_fingerprint"] = runner.method.plan.fingerprint
    return {"name": cfg.name, "config": config, "history": history, "summary": summary}


def _model_evaluator(model: Any) -> Any:
    """Jitted ``(params, model_state, data...) -> (train loss, test accuracy)``, inference mode."""

    def evaluate(params: PyTree, model_state: Any, x_tr: jax.Array, y_tr: jax.Array,
                 x_te: jax.Array, y_te: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model.evaluate(params, model_state, x_tr)
        train_loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_tr))
        acc = jnp.mean(jnp.argmax(model.evaluate(params, model_state, x_te), -1) == y_te)
        return train_loss, acc

    return jax.jit(evaluate)


# --------------------------------------------------------------------------- output
def machine_info() -> dict[str, Any]:
    """The machine, Python, JAX and its devices (for results and benchmarks)."""
    import os
    import platform

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of the summary table (strings; ``-`` where a target was never reached)."""
    rows = []
    for r in results:
        s = r["summary"]
        rows.append([
            r["name"],
            f"{s['final_test_accuracy']:.4f}",
            str(s["steps"]),
            f"{s['wall_clock_s']:.2f}",
            f"{s['step_time_ms']:.2f}",
            _fmt(s["time_to_95_s"], ".2f"),
            _fmt(s["steps_to_95"], "d"),
            _fmt(s["time_to_97_s"], ".2f"),
            _fmt(s["steps_to_97"], "d"),
            f"{s['compile_s']:.2f}",
        ])
    return rows


HEADERS = ["method", "test acc", "steps", "time s", "ms/step", "t95 s", "steps95", "t97 s",
           "steps97", "compile s"]
"""Columns: final test accuracy, steps, training wall-clock, per step, time and steps to
95% / 97% test accuracy (``-``: never reached), first-call compilation."""


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """2x2 panels: training loss and test accuracy against wall-clock and steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for r in results:
        h = r["history"]
        t = [x["wall_clock_s"] for x in h]
        s = [x["step"] for x in h]
        loss = [x["train_loss"] for x in h]
        acc = [x["test_accuracy"] for x in h]
        axes[0, 0].plot(t, loss, label=r["name"])
        axes[0, 1].plot(s, loss, label=r["name"])
        axes[1, 0].plot(t, acc, label=r["name"])
        axes[1, 1].plot(s, acc, label=r["name"])
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.set_ylabel("training loss (full train set)")
    for ax in axes[1]:
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.8, 1.0)
        for target in TARGETS:
            ax.axhline(target, color="grey", lw=0.6, ls="--")
    for ax in axes[:, 0]:
        ax.set_xlabel("wall-clock (s, compilation excluded)")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlim(left=0)
    for ax in axes[:, 1]:
        ax.set_xlabel("steps")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
    axes[0, 0].legend()
    fig.suptitle("digits, MLP 64-64-10: somax_plug presets vs optax.adam")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_job(
    names: Sequence[str],
    *,
    out: Path,
    seed: int = 0,
    mesh: Any = None,
    steps: dict[str, int] | None = None,
    console: Any = None,
    progress: bool = True,
    model: str = "mlp",
) -> dict[str, Any]:
    """Train every named method, write ``results.json`` and ``training.png``.

    ``model``: ``"mlp"`` (the default job) or ``"cnn"`` (:func:`make_cnn`: Flax NNX,
    BatchNorm and dropout; each method starts from the same initial parameters and
    state).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    data = load_digits_data()
    results = []
    bar = None
    if progress and console is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        bar = Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"),
                       console=console, transient=False)
        bar.start()
    try:
        for name in names:
            cfg = METHODS[name]
            n = (steps or {}).get(name, cfg.steps)
            task = None
            if bar is not None:
                task = bar.add_task(name, total=n, loss="-", acc="-")

            def on_eval(rec: dict[str, float], task: Any = task) -> None:
                if bar is not None:
                    bar.update(task, completed=rec["step"], loss=f"{rec['train_loss']:.4f}",
                               acc=f"{rec['test_accuracy']:.4f}")

            adapted = make_cnn(seed) if model == "cnn" else None
            results.append(train(cfg, data, steps=n, seed=seed, mesh=mesh, on_eval=on_eval,
                                 model=adapted))
    finally:
        if bar is not None:
            bar.stop()
    report = {
        "title": TITLE,
        "job": "the README's main job (somax-plug demo)",
        "machine": machine_info(),
        "jax_version": jax.__version__,
        "dataset": {"name": "sklearn.datasets.load_digits", "train": int(len(data.y_train)),
                    "test": int(len(data.y_test)), "split": "stratified 25% test, seed 0",
                    "standardised": True},
        "model": MODELS[model],
        "seed": seed,
        "devices": 1 if mesh is None else int(mesh.devices.size),
        "targets": list(TARGETS),
        "results": results,
        "summary": [{"name": r["name"], **r["summary"]} for r in results],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "training.png")
    return report


# ------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="somax-plug demo",
        description="The main job: train an MLP on the bundled digits with somax_plug "
        "presets and optax.adam; writes results.json and training.png.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="fewer methods and steps (under a minute)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"),
                        help="output folder (default ./demo_out)")
    parser.add_argument("--devices", type=int, default=1,
                        help="data-parallel over a mesh of N devices")
    parser.add_argument("--seed", type=int, default=0,
                        help="initialisation and minibatch seed")
    parser.add_argument("--model", choices=tuple(MODELS), default="mlp",
                        help="mlp: the 64-64-10 MLP (default); cnn: a Flax NNX CNN with "
                        "BatchNorm and dropout on the digits as 8x8 images (needs flax)")
    parser.add_argument("--workload", choices=("mlp", "cnn", "lm"), default="mlp",
                        help="mlp: the MLP on digits (default); lm: the stdlib character-level "
                        "transformer LM (a few minutes); cnn: the digits CNN")
    return parser


def make_mesh(n: int) -> Any:
    """A 1-D ``("data",)`` mesh over the first ``n`` devices (None for ``n == 1``)."""
    if n <= 1:
        return None
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()[:n]), ("data",))


QUICK_STEPS = {"sgn": 60, "adam": 400}

CNN_STEPS = {"sgn": 100, "newton_cg": 100, "gauss_newton_lm": 100, "natural_gradient": 100,
             "sophia_h": 400, "adam": 400}
"""Steps per method of ``--model cnn`` (each CNN step costs several MLP steps)."""
CNN_QUICK_STEPS = {"sgn": 30, "adam": 150}


WORKLOAD_ADAM_LR = {"cnn": 1e-2, "lm": 1e-3}
"""Adam's learning rate in ``--workload`` runs (the grid's best in docs/workloads.md)."""

WORKLOAD_SECONDS = {"cnn": 10.0, "lm": 12.0}
"""Training-clock budget per contender in ``--workload`` runs (``--quick``: half)."""


def workload_job(name: str, *, out: Path, seed: int = 0, quick: bool = False,
                 console: Any = None, progress: bool = True, size: str = "full",
                 presets: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``--workload`` job: Adam and the presets on one workload, one seed.

    Writes ``out/<name>_results.json`` and ``out/<name>_training.png``; returns the
    report of :func:`somax_plug._src.workloads.runner.run`.
    """
    from dataclasses import replace

    from somax_plug._src.workloads import contenders as roster
    from somax_plug._src.workloads import make
    from somax_plug._src.workloads import runner as wrunner

    w = make(name, size)
    if presets is None:
        presets = ["sgn"] if quick else roster.preset_names()
    cs = [roster.adam(WORKLOAD_ADAM_LR[name])] + [roster.preset(p, size == "full")
                                                  for p in presets]
    budget = w.budget
    if size == "full":
        budget = replace(budget, max_seconds=WORKLOAD_SECONDS[name] / (2 if quick else 1))
    bar = None
    tasks: dict[str, Any] = {}
    if progress and console is not None:
        from rich.progress import BarColumn, Progress, TextColumn

        bar = Progress(TextColumn("{task.description:<18}"), BarColumn(),
                       TextColumn("{task.fields[info]}"), console=console, transient=False)
        bar.start()

    def on_start(cname: str, s: int) -> None:
        if bar is not None:
            tasks[cname] = bar.add_task(cname, total=budget.max_seconds,
                                        info="compiling ...")

    def on_eval(cname: str, s: int, h: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(tasks[cname], completed=min(h["wall_clock_s"], budget.max_seconds),
                       info=f"step {h['step']:>5}  {h['wall_clock_s']:6.1f} s  "
                            f"loss {h['loss']:.4f}  acc {h['accuracy']:.4f}")

    def on_run(rec: dict[str, Any]) -> None:
        if bar is not None and rec["name"] in tasks:
            extra = f"  {rec['error']}" if rec["error"] else ""
            bar.update(tasks[rec["name"]], completed=budget.max_seconds,
                       info=bar.tasks[tasks[rec["name"]]].fields["info"]
                       + f"  ({rec['status']}){extra}")

    try:
        report = wrunner.run(w, cs, seeds=(seed,), budget=budget, on_eval=on_eval,
                             on_run=on_run, on_start=on_start)
    finally:
        if bar is not None:
            bar.stop()
    report["job"] = f"somax-plug demo --workload {name}" + (" --quick" if quick else "")
    js, png = wrunner.write(report, out)
    report["files"] = {"json": str(js), "plot": str(png)}
    return report


def _main_workload(args: argparse.Namespace, console: Any) -> int:
    from rich.panel import Panel

    from somax_plug._src.workloads import make
    from somax_plug._src.workloads import runner as wrunner

    w = make(args.workload)
    console.print(Panel.fit(
        f"[bold]somax-plug second main job: {w.title}[/bold]\n"
        f"target: {w.target.describe()}   seed: {args.seed}   budget per method: "
        f"{WORKLOAD_SECONDS[args.workload] / (2 if args.quick else 1):g} s of training "
        "(compilation and evaluation excluded)" + ("   (--quick)" if args.quick else ""),
        border_style="cyan",
    ))
    t0 = time.perf_counter()
    report = workload_job(args.workload, out=args.out, seed=args.seed, quick=args.quick,
                          console=console)
    wrunner.print_report(report, console)
    console.print(f"wrote {report['files']['json']} and {report['files']['plot']} "
                  f"in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        from rich.console import Console
        from rich.panel import Panel
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print("the demo needs rich, matplotlib and scikit-learn: pip install 'somax-plug[demo]'",
              file=sys.stderr)
        return 2
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    if args.workload != "mlp":
        if args.devices != 1:
            console.print("[red]--devices applies to the MLP job only[/red]")
            return 2
        return _main_workload(args, console)
    available = len(jax.devices())
    if args.devices < 1 or args.devices > available:
        console.print(
            f"[red]--devices {args.devices}: only {available} JAX device(s) here.[/red] "
            f"On CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={args.devices} "
            "before starting (for example "
            f"`XLA_FLAGS=--xla_force_host_platform_device_count={args.devices} "
            f"somax-plug demo --devices {args.devices}`)."
        )
        return 2
    mesh = make_mesh(args.devices)
    names = QUICK if args.quick else tuple(METHODS)
    console.print(Panel.fit(
        f"[bold]{TITLE}[/bold]\n"
        "This is the README's main job: the output below is what `somax-plug demo` prints.\n"
        f"methods: {', '.join(names)}   devices: {args.devices}   seed: {args.seed}"
        + ("   (--quick)" if args.quick else ""),
        border_style="cyan",
    ))
    t0 = time.perf_counter()
    if args.model == "cnn":
        try:
            import flax  # noqa: F401
        except ImportError:
            console.print("[red]--model cnn needs Flax: pip install 'somax-plug[flax]'[/red]")
            return 2
    steps = QUICK_STEPS if args.quick else None
    if args.model == "cnn":
        steps = CNN_QUICK_STEPS if args.quick else CNN_STEPS
    report = run_job(names, out=args.out, seed=args.seed, mesh=mesh, steps=steps,
                     console=console, model=args.model)
    label = "MLP 64-64-10" if args.model == "mlp" else "Flax NNX CNN, BatchNorm + dropout"
    table = Table(title=f"digits, {label} (wall-clock excludes compilation)")
    for h in HEADERS:
        table.add_column(h, justify="left" if h == "method" else "right")
    for row in summary_rows(report["results"]):
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {args.out / 'results.json'} and {args.out / 'training.png'} "
                  f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
