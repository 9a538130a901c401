"""A small CNN on scikit-learn's digits as 8x8 images (plain JAX).

Data: ``sklearn.datasets.load_digits`` (1797 bundled images, no download), the same
stratified 25% test split with seed 0 as the main job (1347 train, 450 test), pixels
scaled to ``[0, 1]`` and standardised by the training set's global mean and standard
deviation, as ``[N, 8, 8, 1]`` (NHWC).

Model (``size="full"``, 38,282 parameters)::

    conv 3x3, 1 -> 16, SAME, relu          [8, 8, 16]
    conv 3x3, 16 -> 32, stride 2, SAME, relu   [4, 4, 32]
    flatten -> dense 512 -> 64, relu -> dense 64 -> 10

with ``jax.lax.conv_general_dilated`` and He-normal initialisation (zero biases).
``size="tiny"`` (for the tests) has 4 and 8 channels and a 16-unit hidden layer, and
minibatches of 32.

Minibatches: 128 images drawn without replacement, afresh at every step, by
``numpy.random.default_rng([seed, step])``. Target: 97% test accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from somax_plug._src.workloads.base import Budget, Target, Workload

SIZES = {"full": (16, 32, 64), "tiny": (4, 8, 16)}
TARGET_ACCURACY = 0.97
BATCH = {"full": 128, "tiny": 32}

ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
"""``optax.adam``'s learning rates (the bench reports every one and the best)."""

SOPHIA_LR = 3e-3
"""``optax.contrib.sophia``'s learning rate (required by optax; not tuned)."""

_DN = ("NHWC", "HWIO", "NHWC")


def load_images(split_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as ``[N, 8, 8, 1]`` float32 images (train-standardised) and int32 labels."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - exercised without the extra
        raise SystemExit("the cnn workload needs scikit-learn: pip install 'somax-plug[demo]'"
                         ) from exc
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y,
                                              random_state=split_seed)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def init_cnn(key: jax.Array, sizes: tuple[int, int, int] = SIZES["full"]) -> dict[str, Any]:
    """He-normal weights, zero biases (``c1, c2`` conv kernels HWIO, ``d1, d2`` dense)."""
    c1, c2, h = sizes
    k1, k2, k3, k4 = jax.random.split(key, 4)
    he = lambda k, shape, fan_in: (jax.random.normal(k, shape, jnp.float32)
                                   * math.sqrt(2.0 / fan_in))
    return {
        "c1_w": he(k1, (3, 3, 1, c1), 9), "c1_b": jnp.zeros((c1,), jnp.float32),
        "c2_w": he(k2, (3, 3, c1, c2), 9 * c1), "c2_b": jnp.zeros((c2,), jnp.float32),
        "d1_w": he(k3, (16 * c2, h), 16 * c2), "d1_b": jnp.zeros((h,), jnp.float32),
        "d2_w": he(k4, (h, 10), h) / math.sqrt(2.0), "d2_b": jnp.zeros((10,), jnp.float32),
    }


def cnn(params: dict[str, Any], x: jax.Array) -> jax.Array:
    """Logits ``[N, 10]`` of images ``[N, 8, 8, 1]``."""
    h = jax.lax.conv_general_dilated(x, params["c1_w"], (1, 1), "SAME", dimension_numbers=_DN)
    h = jax.nn.relu(h + params["c1_b"])
    h = jax.lax.conv_general_dilated(h, params["c2_w"], (2, 2), "SAME", dimension_numbers=_DN)
    h = jax.nn.relu(h + params["c2_b"])
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["d1_w"] + params["d1_b"])
    return h @ params["d2_w"] + params["d2_b"]


def make(size: str = "full") -> Workload:
    """The digits CNN workload (``size``: ``"full"`` or ``"tiny"``)."""
    x_tr, y_tr, x_te, y_te = load_images()
    sizes = SIZES[size]
    batch_size = BATCH[size]
    n = len(y_tr)

    def batch(seed: int, step: int) -> tuple[Any, Any]:
        rows = np.random.default_rng([seed, step]).choice(n, batch_size, replace=False)
        return jnp.asarray(x_tr[rows]), jnp.asarray(y_tr[rows])

    budget = (Budget(max_steps=3000, max_seconds=30.0, eval_every_s=0.0, eval_every_steps=1)
              if size == "full" else Budget(max_steps=5, max_seconds=30.0))
    return Workload(
        name="cnn",
        title=f"digits 8x8, CNN conv{sizes[0]}-conv{sizes[1]}s2-dense{sizes[2]}-10",
        size=size,
        init_params=lambda key: init_cnn(key, sizes),
        predict_fn=cnn,
        batch=batch,
        eval_data=(jnp.asarray(x_te), jnp.asarray(y_te)),
        target=Target("accuracy", TARGET_ACCURACY),
        budget=budget,
        batch_size=batch_size,
        adam_grid=ADAM_GRID,
        sophia_lr=SOPHIA_LR,
        info={
            "dataset": {"name": "sklearn.datasets.load_digits (8x8 images)",
                        "train": int(n), "test": int(len(y_te)),
                        "split": "stratified 25% test, seed 0",
                        "preprocessing": "x/16, standardised by the train set's global "
                                         "mean and std, NHWC [N, 8, 8, 1]"},
            "model": {"kind": "CNN", "layers": [
                f"conv3x3 1->{sizes[0]} SAME relu", f"conv3x3 {sizes[0]}->{sizes[1]} "
                f"stride 2 SAME relu", f"dense {16 * sizes[1]}->{sizes[2]} relu",
                f"dense {sizes[2]}->10"]},
            "loss": "softmax_cross_entropy, mean over the batch",
            "minibatches": f"{batch_size} images without replacement, fresh every step, "
                           "numpy.random.default_rng([seed, step])",
        },
    )
