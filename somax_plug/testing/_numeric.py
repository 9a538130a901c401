"""Small NumPy helpers of the conformance kit (private)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any


def flat64(tree: PyTree) -> np.ndarray:
    """A pytree (or array) as a flat float64 NumPy vector."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return np.zeros(0)
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def unraveler(primal: PyTree) -> Any:
    """``unravel`` of ``ravel_pytree(primal)``."""
    return ravel_pytree(primal)[1]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / max(||b||, tiny)``."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def fro(a: np.ndarray) -> float:
    return float(np.linalg.norm(a))


def min_sym_eig(a: np.ndarray) -> float:
    return float(np.linalg.eigvalsh((a + a.T) / 2).min())


def same_avals(a: PyTree, b: PyTree) -> str | None:
    """None when ``a`` and ``b`` have the same structure, shapes and dtypes, else why not."""
    ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    if ta != tb:
        return f"structure {ta} != {tb}"
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b), strict=True
    ):
        sx, sy = np.shape(x), np.shape(y)
        dx, dy = _dtype(x), _dtype(y)
        if sx != sy or dx != dy:
            return f"leaf {jax.tree_util.keystr(path)}: {dx}{list(sx)} != {dy}{list(sy)}"
    return None


def _dtype(x: Any) -> Any:
    dtype = getattr(x, "dtype", None)
    return np.asarray(x).dtype if dtype is None else dtype


def worst(err: np.ndarray, budget: np.ndarray) -> int:
    """Index of the entry that exceeds its budget the most."""
    return int(np.argmax(err - budget))
