"""Operator algebra over parameter pytrees.

Every class here is a :class:`~somax_plug.LinearOperator` and a JAX pytree
(arrays are children, tags are static), so an operator can be passed through
``jax.jit`` as an argument.

==========================  ===========================================  ==========================
operator                    maths                                        tags it keeps
==========================  ===========================================  ==========================
``MatrixOperator(M, x)``    ``v -> M v`` in ``ravel_pytree(x)`` order    the tags given, plus diag
``SumOperator(A, B)``       ``A + B``                                    sym, psd, diag, row_space
                                                                         when both operands have it
``ScaledOperator(c, A)``    ``c A``                                      sym, diag; psd, row_space
                                                                         only when ``c >= 0``
``DampedOperator(A, lam)``  ``A + lam I``                                sym, diag; psd only when
                                                                         A is psd and ``lam >= 0``
==========================  ===========================================  ==========================

Tag rules, with the reason for each:

* ``symmetric``: kept by sums of symmetric operators, by any scaling and by any
  damping (``(A + lam I)^T = A^T + lam I``).
* ``psd``: kept by sums of psd operators, by scaling with ``c >= 0`` and by damping
  with ``lam >= 0`` (``v.(A + lam I)v = v.Av + lam |v|^2``). The sign of ``c`` or
  ``lam`` is checked when it is concrete (on the host, so a negative denormal such as
  ``-2.2e-313``, which XLA on CPU flushes to zero, counts as negative); when it is
  traced the tag is dropped unless the caller asserts ``nonnegative=True``. ``psd``
  always implies ``symmetric``.
* ``row_space``: ``A + B = [U_A; U_B]^T [U_A; U_B]`` (the stacked rows, ``R_A + R_B``
  of them) when both have row factors; ``c A = (sqrt(c) U)^T (sqrt(c) U)`` when
  ``c >= 0``; damping drops it (``A + lam I`` has no short row factorisation).
* ``diag`` (an exact diagonal is available): ``diag(A + B) = diag A + diag B``,
  ``diag(c A) = c diag A``, ``diag(A + lam I) = diag A + lam``.

:func:`to_lineax` wraps any operator as a ``lineax.FunctionLinearOperator``
(``symmetric`` -> ``lineax.symmetric_tag``, ``psd`` -> ``symmetric_tag`` and
``positive_semidefinite_tag``; our ``diag`` tag means "has an exact diagonal", not
"is diagonal", so it is not mapped to ``lineax.diagonal_tag``).

Example:
    >>> import jax.numpy as jnp
    >>> import somax_plug as ops
    >>> primal = {"w": jnp.zeros(2), "b": jnp.zeros(())}
    >>> A = ops.MatrixOperator(jnp.diag(jnp.array([1.0, 2.0, 3.0])), primal, tags={"psd"})
    >>> B = ops.damp(ops.scale(2.0, A), 0.5)
    >>> sorted(B.tags)
    ['diag', 'psd', 'symmetric']
    >>> B.mv({"w": jnp.ones(2), "b": jnp.ones(())})["w"].tolist()  # ravel order: "b", "w"
    [4.5, 6.5]

Reference: the operator interface follows curvlinops (Dangel et al., 2025) and the
tag vocabulary follows lineax (Rader, Lyons & Kidger, 2023).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from somax_plug._src.kinds import DIAG, PSD, ROW_SPACE, SYMMETRIC, LinearOperator, RowFactors
from somax_plug._src.lazy import flush_pytree_classes, lazy_import, register_pytree_class
from somax_plug._src.tree import ravel

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")
flatten_util = lazy_import("jax.flatten_util")

PyTree = Any
Array = Any

__all__ = [
    "DampedOperator",
    "MatrixOperator",
    "PytreeOperator",
    "ScaledOperator",
    "SumOperator",
    "add",
    "damp",
    "damped_mv",
    "normalize_tags",
    "scale",
    "to_lineax",
]


def normalize_tags(tags: Iterable[str] | str | None) -> frozenset[str]:
    """Tags as a frozenset, with ``psd`` implying ``symmetric``."""
    if tags is None:
        out: frozenset[str] = frozenset()
    elif isinstance(tags, str):
        out = frozenset({tags})
    else:
        out = frozenset(tags)
    if PSD in out:
        out = out | {SYMMETRIC}
    return out


def _is_nonnegative(value: Any) -> bool | None:
    """``value >= 0`` when it is concrete, None when it is traced.

    Compared on the host with NumPy, on the value as given: XLA on CPU flushes
    denormals to zero, so a comparison run by XLA would call ``-2.2e-313`` (a negative
    denormal) nonnegative.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return bool(np.all(np.asarray(value) >= 0))
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


def _scale_tree(c: Array, v: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jnp.asarray(c).astype(x.dtype) * x, v)


def damped_mv(op: LinearOperator, lam: Array, v: PyTree) -> PyTree:
    """``(C + lam I) v``; ``lam`` is cast to each leaf's dtype (no dtype promotion)."""
    cv = op.mv(v)
    return jax.tree_util.tree_map(lambda a, x: a + jnp.asarray(lam).astype(x.dtype) * x, cv, v)


class PytreeOperator(LinearOperator):
    """A :class:`~somax_plug.LinearOperator` that is also a JAX pytree.

    Fields named in ``_children`` are traced (arrays, ``jax.tree_util.Partial``
    closures); fields named in ``_static`` and the ``tags`` are static aux data. Every
    subclass is registered with JAX when it is defined, or, when JAX is not imported
    yet, before its first instance is built (so a module that only declares
    operators does not import JAX). An operator can then be an argument or a result
    of ``jax.jit``.

    Example:
        >>> import jax.numpy as jnp
        >>> from somax_plug import PytreeOperator
        >>> class Diagonal(PytreeOperator):
        ...     _children = ("d", "primal")
        ...     def __init__(self, d):
        ...         self.d, self.primal, self.tags = d, jnp.zeros_like(d), frozenset({"psd"})
        ...     def mv(self, v):
        ...         return self.d * v
        >>> Diagonal(jnp.array([1.0, 2.0])).mv(jnp.ones(2)).tolist()
        [1.0, 2.0]
    """

    _children: tuple[str, ...] = ()
    _static: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register_pytree_class(cls)

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        flush_pytree_classes()
        return super().__new__(cls)

    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        children = tuple(getattr(self, name) for name in self._children)
        aux = (frozenset(self.tags), *(getattr(self, name) for name in self._static))
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> Any:
        obj = object.__new__(cls)
        for name, value in zip(cls._children, children, strict=True):
            object.__setattr__(obj, name, value)
        object.__setattr__(obj, "tags", aux[0])
        for name, value in zip(cls._static, aux[1:], strict=True):
            object.__setattr__(obj, name, value)
        return obj

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tags={sorted(self.tags)})"


class MatrixOperator(PytreeOperator):
    """A dense ``[n, n]`` matrix acting on pytrees in ``ravel_pytree(primal)`` order.

    ``mv(v) = unravel(M @ ravel(v))``. The exact diagonal is always available, so
    ``diag`` is always among the tags; ``psd`` implies ``symmetric``. The tags are
    *declared*, not checked (as in lineax). Build one from row factors with
    :meth:`from_rows` to get ``row_space``.

    Args:
        matrix: ``[n, n]`` array, n the number of scalars in ``primal``.
        primal: pytree with the structure, shapes and dtypes of the vectors.
        tags: operator tags (``{"psd"}``, ``{"symmetric"}``, ...).
        rows: optional ``[R, n]`` array U with ``matrix = U^T U``; gives row factors.

    Example:
        >>> import jax.numpy as jnp
        >>> U = jnp.array([[1.0, 2.0]])
        >>> op = MatrixOperator.from_rows(U, (jnp.zeros(1), jnp.zeros(1)))
        >>> op.to_dense().tolist(), op.row_factors().num_rows
        ([[1.0, 2.0], [2.0, 4.0]], 1)
    """

    _children = ("matrix", "primal", "rows")

    def __init__(
        self,
        matrix: Array,
        primal: PyTree,
        tags: Iterable[str] | str | None = None,
        rows: Array | None = None,
    ) -> None:
        flat, _ = flatten_util.ravel_pytree(primal)
        n = flat.shape[0]
        matrix = jnp.asarray(matrix)
        if matrix.shape != (n, n):
            raise ValueError(
                f"MatrixOperator: matrix has shape {matrix.shape} but primal has {n} scalars; "
                f"expected ({n}, {n})"
            )
        if rows is not None:
            rows = jnp.asarray(rows)
            if rows.ndim != 2 or rows.shape[1] != n:
                raise ValueError(f"MatrixOperator: rows must have shape [R, {n}], got {rows.shape}")
        tags = normalize_tags(tags) | {DIAG}
        if rows is not None:
            tags = tags | {ROW_SPACE}
        elif ROW_SPACE in tags:
            raise ValueError("MatrixOperator: tag 'row_space' needs rows=U with matrix = U^T U")
        self.matrix = matrix
        self.primal = primal
        self.rows = rows
        self.tags = tags

    @classmethod
    def from_rows(
        cls, rows: Array, primal: PyTree, tags: Iterable[str] | str | None = None
    ) -> MatrixOperator:
        """``C = U^T U`` from row factors ``U`` (``[R, n]``): tags psd and row_space."""
        rows = jnp.asarray(rows)
        return cls(rows.T @ rows, primal, normalize_tags(tags) | {PSD}, rows=rows)

    def mv(self, v: PyTree) -> PyTree:
        flat, unravel = ravel(v)
        return unravel(self.matrix @ flat.astype(self.matrix.dtype))

    def diag(self) -> PyTree:
        _, unravel = ravel(self.primal)
        return unravel(jnp.diagonal(self.matrix))

    def to_dense(self) -> Array:
        return self.matrix

    def row_factors(self) -> RowFactors | None:
        if self.rows is None:
            return None
        rows = self.rows
        _, unravel = ravel(self.primal)

        def matvec(v: PyTree) -> Array:
            flat, _ = flatten_util.ravel_pytree(v)
            return rows @ flat.astype(rows.dtype)

        def rmatvec(r: Array) -> PyTree:
            return unravel(rows.T @ r)

        return RowFactors(matvec, rmatvec, int(rows.shape[0]))


class SumOperator(PytreeOperator):
    """``A + B``. Keeps a tag when both operands carry it (row factors are stacked)."""

    _children = ("a", "b")

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        self.a = a
        self.b = b
        self.tags = normalize_tags(a.tags & b.tags)

    @property
    def primal(self) -> PyTree:
        return self.a.primal

    def mv(self, v: PyTree) -> PyTree:
        return jax.tree_util.tree_map(jnp.add, self.a.mv(v), self.b.mv(v))

    def diag(self) -> PyTree:
        return jax.tree_util.tree_map(jnp.add, self.a.diag(), self.b.diag())

    def row_factors(self) -> RowFactors | None:
        fa, fb = self.a.row_factors(), self.b.row_factors()
        if fa is None or fb is None:
            return None
        ra = fa.num_rows

        def matvec(v: PyTree) -> Array:
            return jnp.concatenate([jnp.ravel(fa.matvec(v)), jnp.ravel(fb.matvec(v))])

        def rmatvec(r: Array) -> PyTree:
            return jax.tree_util.tree_map(jnp.add, fa.rmatvec(r[:ra]), fb.rmatvec(r[ra:]))

        return RowFactors(matvec, rmatvec, ra + fb.num_rows)


class ScaledOperator(PytreeOperator):
    """``c A`` for a scalar ``c``.

    ``psd`` and ``row_space`` survive only when ``c >= 0``: checked when ``c`` is
    concrete; a traced ``c`` drops them unless ``nonnegative=True`` is asserted.
    """

    _children = ("c", "a")

    def __init__(self, c: Array, a: LinearOperator, nonnegative: bool | None = None) -> None:
        self.c = c
        self.a = a
        nonneg = _is_nonnegative(c) if nonnegative is None else nonnegative
        tags = set(a.tags)
        if not nonneg:
            tags -= {PSD, ROW_SPACE}
        self.tags = normalize_tags(tags)

    @property
    def primal(self) -> PyTree:
        return self.a.primal

    def mv(self, v: PyTree) -> PyTree:
        return _scale_tree(self.c, self.a.mv(v))

    def diag(self) -> PyTree:
        return _scale_tree(self.c, self.a.diag())

    def row_factors(self) -> RowFactors | None:
        f = self.a.row_factors()
        if f is None or ROW_SPACE not in self.tags:
            return None
        root = jnp.sqrt(jnp.asarray(self.c))

        def matvec(v: PyTree) -> Array:
            out = f.matvec(v)
            return root.astype(out.dtype) * out

        def rmatvec(r: Array) -> PyTree:
            return _scale_tree(root, f.rmatvec(r))

        return RowFactors(matvec, rmatvec, f.num_rows)


class DampedOperator(PytreeOperator):
    """``A + lam I`` (Tikhonov / Levenberg-Marquardt damping).

    Keeps ``symmetric`` and ``diag``; keeps ``psd`` when A is psd and ``lam >= 0``
    (checked when ``lam`` is concrete; a traced ``lam`` drops it unless
    ``nonnegative=True`` is asserted); drops ``row_space``.
    """

    _children = ("a", "lam")

    def __init__(self, a: LinearOperator, lam: Array, nonnegative: bool | None = None) -> None:
        self.a = a
        self.lam = lam
        nonneg = _is_nonnegative(lam) if nonnegative is None else nonnegative
        tags = set(a.tags) - {ROW_SPACE}
        if not nonneg:
            tags -= {PSD}
        self.tags = normalize_tags(tags)

    @property
    def primal(self) -> PyTree:
        return self.a.primal

    def mv(self, v: PyTree) -> PyTree:
        return damped_mv(self.a, self.lam, v)

    def diag(self) -> PyTree:
        return jax.tree_util.tree_map(
            lambda d: d + jnp.asarray(self.lam).astype(d.dtype), self.a.diag()
        )


def add(a: LinearOperator, b: LinearOperator) -> SumOperator:
    """``a + b`` (see :class:`SumOperator` for the tags kept)."""
    return SumOperator(a, b)


def scale(c: Array, a: LinearOperator, nonnegative: bool | None = None) -> ScaledOperator:
    """``c * a`` (see :class:`ScaledOperator` for the tags kept)."""
    return ScaledOperator(c, a, nonnegative)


def damp(a: LinearOperator, lam: Array, nonnegative: bool | None = None) -> DampedOperator:
    """``a + lam I`` (see :class:`DampedOperator` for the tags kept)."""
    return DampedOperator(a, lam, nonnegative)


def to_lineax(op: LinearOperator) -> Any:
    """Wrap ``op`` as a ``lineax.FunctionLinearOperator`` with the matching tags.

    ``symmetric`` -> ``lineax.symmetric_tag``; ``psd`` -> ``symmetric_tag`` and
    ``positive_semidefinite_tag``. lineax is imported here, on first use.

    Raises:
        ImportError: lineax is not installed (``pip install somax-plug[lineax]``).
    """
    try:
        import lineax as lx
    except ImportError as exc:
        raise ImportError(
            "somax_plug._src.operators.to_lineax needs the optional dependency lineax; "
            "install it with: pip install somax-plug[lineax]"
        ) from exc
    tags: set[Any] = set()
    if SYMMETRIC in op.tags or PSD in op.tags:
        tags.add(lx.symmetric_tag)
    if PSD in op.tags:
        tags.add(lx.positive_semidefinite_tag)
    structure = jax.eval_shape(lambda: op.primal)
    return lx.FunctionLinearOperator(op.mv, structure, frozenset(tags))
