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

from somax_plug._src.lazy import lazy_import

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")
otu = lazy_import("optax.tree_utils")
flatten_util = lazy_import("jax.flatten_util")

PyTree = Any


def add(a: PyTree, b: PyTree) -> PyTree:
    """``a + b`` (``optax.tree_utils.tree_add``)."""
    return otu.tree_add(a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """``a - b`` (``optax.tree_utils.tree_sub``)."""
    return otu.tree_sub(a, b)


def scale(c: Any, a: PyTree) -> PyTree:
    """``c * a`` for a scalar ``c`` (``optax.tree_utils.tree_scale``)."""
    return otu.tree_scale(c, a)


def zeros_like(a: PyTree) -> PyTree:
    """Zeros with the structure, shapes and dtypes of ``a``."""
    return otu.tree_zeros_like(a)


def ones_like(a: PyTree) -> PyTree:
    """Ones with the structure, shapes and dtypes of ``a``."""
    return otu.tree_ones_like(a)


def axpy(x: PyTree, a: Any, y: PyTree) -> PyTree:
    """``x + a * y`` (``optax.tree_utils.tree_add_scale``, optax argument order)."""
    return otu.tree_add_scale(x, a, y)


def mul(a: PyTree, b: PyTree) -> PyTree:
    """Elementwise product."""
    return otu.tree_mul(a, b)


def div(a: PyTree, b: PyTree) -> PyTree:
    """Elementwise quotient."""
    return otu.tree_div(a, b)


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
    flat, unravel = flatten_util.ravel_pytree(primal)
    n = flat.shape[0]

    def column(e: jax.Array) -> jax.Array:
        return flatten_util.ravel_pytree(mv(unravel(e)))[0]

    return jax.vmap(column, out_axes=1)(jnp.eye(n, dtype=flat.dtype))


def ravel(tree: PyTree) -> tuple[Any, Any]:
    """``ravel_pytree`` whose ``unravel`` first casts its input to the flat dtype.

    ``jax.flatten_util.ravel_pytree``'s ``unravel`` keeps a wider dtype for
    single-dtype trees (float64 in, float64 leaves out) and raises for mixed-dtype
    trees; this one always returns the original leaf dtypes.
    """
    flat, unravel = flatten_util.ravel_pytree(tree)
    dtype = flat.dtype

    def unravel_cast(x: Any) -> PyTree:
        return unravel(jnp.asarray(x).astype(dtype))

    return flat, unravel_cast
