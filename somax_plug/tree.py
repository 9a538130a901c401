"""Linear algebra on parameter pytrees (vectors are pytrees of arrays).

Small pure functions, in the style of ``optax.tree_utils``; where Optax already
has the function (``tree_add``, ``tree_scale``, ...) we call it. Inner products
accumulate in :func:`accum_dtype` (float32 at least, float64 when any leaf is
float64), so bfloat16 parameters do not lose the reductions.

Example:
    >>> import jax.numpy as jnp
    >>> from somax_plug import tree
    >>> v = {"w": jnp.ones(3), "b": jnp.ones(())}
    >>> float(tree.vdot(v, v))
    4.0
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

PyTree = Any

add = otu.tree_add
sub = otu.tree_sub
scale = otu.tree_scale  # scale(scalar, tree)
zeros_like = otu.tree_zeros_like
ones_like = otu.tree_ones_like
axpy = otu.tree_add_scale  # axpy(x, a, y) = x + a*y  (optax argument order)
mul = otu.tree_mul  # elementwise product
div = otu.tree_div  # elementwise quotient


def accum_dtype(tree: PyTree) -> jnp.dtype:
    """Accumulation dtype for reductions over ``tree``: float64 if any leaf is, else float32."""
    leaves = jax.tree_util.tree_leaves(tree)
    if any(jnp.asarray(x).dtype == jnp.float64 for x in leaves):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Real inner product ``sum_i a_i b_i``, accumulated in :func:`accum_dtype`."""
    dt = accum_dtype(a)
    parts = jax.tree_util.tree_map(
        lambda x, y: jnp.vdot(x.astype(dt).ravel(), y.astype(dt).ravel()), a, b
    )
    return sum(jax.tree_util.tree_leaves(parts), jnp.zeros((), dt))


def norm(a: PyTree) -> jax.Array:
    """Euclidean norm of a pytree vector."""
    return jnp.sqrt(vdot(a, a))


def where(cond: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    """``a`` where the scalar ``cond`` holds, else ``b`` (leafwise ``jnp.where``)."""
    return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)


def cast_like(a: PyTree, like: PyTree) -> PyTree:
    """Cast every leaf of ``a`` to the dtype of the matching leaf of ``like``."""
    return jax.tree_util.tree_map(lambda x, y: jnp.asarray(x).astype(y.dtype), a, like)


def all_finite(tree: PyTree) -> jax.Array:
    """True when every element of every leaf is finite."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def size(tree: PyTree) -> int:
    """Number of scalars in a pytree vector (static)."""
    return sum(int(jnp.size(x)) for x in jax.tree_util.tree_leaves(tree))


def random_like(key: jax.Array, tree: PyTree, kind: str = "rademacher") -> PyTree:
    """A random probe with the structure of ``tree``: ``rademacher`` or ``normal``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    if kind == "rademacher":
        new = [
            jax.random.rademacher(k, x.shape, dtype=jnp.int8).astype(x.dtype)
            for k, x in zip(keys, leaves, strict=False)
        ]
    elif kind in ("normal", "gaussian"):
        new = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=False)]
    else:
        raise ValueError(f"unknown probe distribution {kind!r}; use 'rademacher' or 'normal'")
    return jax.tree_util.tree_unflatten(treedef, new)


def dense_from_mv(mv: Any, primal: PyTree) -> jax.Array:
    """Dense matrix of the linear map ``mv`` in ``ravel_pytree(primal)`` order.

    Column j is ``mv(e_j)``; built with ``jax.vmap`` over the identity, so use it
    on small problems only (tests, ``direct`` solver).
    """
    flat, unravel = ravel_pytree(primal)
    n = flat.shape[0]

    def column(e: jax.Array) -> jax.Array:
        return ravel_pytree(mv(unravel(e)))[0]

    return jax.vmap(column, out_axes=1)(jnp.eye(n, dtype=flat.dtype))
