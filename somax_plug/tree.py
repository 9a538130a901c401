"""Linear algebra on parameter pytrees (public helpers for components and plugins).

Vectors are pytrees of arrays. Inner products accumulate in :func:`accum_dtype`
(float32 at least, float64 when any leaf is float64). Where Optax already has the
function (``tree_add``, ``tree_scale``, ...) these call it.

Example:
    >>> import jax.numpy as jnp
    >>> from somax_plug import tree
    >>> v = {"w": jnp.ones(3), "b": jnp.ones(())}
    >>> float(tree.vdot(v, v))
    4.0
"""

from somax_plug._src.tree import (
    accum_dtype,
    add,
    all_finite,
    axpy,
    cast_like,
    dense_from_mv,
    div,
    mul,
    norm,
    ones_like,
    random_like,
    ravel,
    scale,
    size,
    sub,
    vdot,
    where,
    zeros_like,
)

__all__ = [
    "accum_dtype",
    "add",
    "all_finite",
    "axpy",
    "cast_like",
    "dense_from_mv",
    "div",
    "mul",
    "norm",
    "ones_like",
    "random_like",
    "ravel",
    "scale",
    "size",
    "sub",
    "vdot",
    "where",
    "zeros_like",
]
