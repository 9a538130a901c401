"""Built-in curvature components: matrix-free operators over the parameter pytree.

Notation: ``f`` the model, ``z = f(params, x)`` the outputs (B examples, K numbers
each), ``J = dz/d params``, ``L = c sum_b l_b`` the reduced loss (``c = 1/B`` for
"mean", 1 for "sum"), ``H_out = d^2 L/dz^2 = blockdiag(H_b)``.

====================  ===============================================
name                  C
====================  ===============================================
``hessian``           ``d^2 L / d params^2`` (forward-over-reverse)
``ggn``               ``J^T H_out J``
``fisher``            ``J^T blockdiag_b(F_b) J``, MC estimate
``empirical_fisher``  ``c sum_b g_b g_b^T``, ``g_b = d l_b/d params``
====================  ===============================================

The tags each provides and the resources each reads are declared on its class.

Scaling convention: every operator is a curvature of the *reduced* loss, so for the
mean reduction they all carry the factor ``1/B`` (``empirical_fisher`` equals
``(1/B) sum_b g_b g_b^T``) and for the sum reduction they are additive over batches.

Monte-Carlo Fisher: with S target draws ``y_s ~ p(y | z)`` (``Loss.sample_targets``)
and ``G_s = dL/dz (z, y_s)`` (so ``G_s[b] = c dl_b/dz_b``), the per-example output
Fisher is estimated by ``F_b = (1/(c S)) sum_s G_s[b] G_s[b]^T``, whose expectation is
``c E[dl_b dl_b^T] = H_b`` for the built-in losses (canonical links: the Fisher equals
the GGN in expectation). Only per-example outer products are used (no cross-example
terms), which makes the estimate psd with ``S * B`` row factors.

Example:
    >>> import jax.numpy as jnp
    >>> from somax_plug.builtin.resources import PROVIDERS
    >>> from somax_plug import Resources, make_model
    >>> model = make_model(lambda p, x: x @ p, "mse", reduction="sum")
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]], jnp.float32), jnp.zeros((2, 1), jnp.float32)
    >>> res = Resources(model, jnp.zeros((2, 1), jnp.float32), (x, y), None, PROVIDERS)
    >>> GGN().build(res).mv(jnp.ones((2, 1), jnp.float32)).ravel()  # x^T x v
    Array([1., 4.], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from somax_plug import (
    DIAG,
    PSD,
    ROW_SPACE,
    SYMMETRIC,
    Curvature,
    Linearization,
    OutputHessian,
    PytreeOperator,
    Resources,
    RowFactors,
    declare,
    lazy_import,
    option,
    tree,
)
from somax_plug.losses import (
    batch_size_of,
    compute_dtype,
    flatten_per_example,
    unflatten_per_example,
)

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")

PyTree = Any
Array = Any


def _stat_dtype(x: Array) -> jnp.dtype:
    return compute_dtype(jnp.result_type(x))


def _diag_from_rows(rows: RowFactors, primal: PyTree) -> PyTree:
    """``diag(U^T U) = sum_r (U^T e_r)**2``: one ``rmatvec`` per row, in a ``fori_loop``."""
    acc0 = jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), _stat_dtype(x)), primal)
    eye_dtype = compute_dtype(tree.accum_dtype(primal))

    def body(r: Array, acc: PyTree) -> PyTree:
        e = jax.nn.one_hot(r, rows.num_rows, dtype=eye_dtype)
        col = rows.rmatvec(e)
        return jax.tree_util.tree_map(lambda a, u: a + jnp.square(u.astype(a.dtype)), acc, col)

    acc = jax.lax.fori_loop(0, rows.num_rows, body, acc0)
    return tree.cast_like(acc, primal)


class _RowSpaceOperator(PytreeOperator):
    """Shared ``diag`` for operators that expose row factors.

    The diagonal is exact but costs R transposed products (R = rows), so these
    operators do not carry the ``diag`` tag (which promises a cheap diagonal to
    preconditioners); ``exact_diag`` still uses it.
    """

    def diag(self) -> PyTree:
        rows = self.row_factors()
        assert rows is not None
        return _diag_from_rows(rows, self.primal)


# --------------------------------------------------------------------------- operators


class HessianOperator(PytreeOperator):
    """``v -> H v`` from the shared HVP linearization (one jvp of the gradient)."""

    tags = frozenset({SYMMETRIC})
    _children = ("primal", "_mv")

    def __init__(self, primal: PyTree, hvp_mv: Any) -> None:
        self.primal = primal
        self._mv = hvp_mv

    def mv(self, v: PyTree) -> PyTree:
        return self._mv(v)


class GGNOperator(_RowSpaceOperator):
    """``v -> J^T H_out J v``: one jvp, the closed-form output Hessian, one vjp.

    Row factors ``U = blockdiag(L_b^T) J`` (``R = B K`` rows) with ``H_b = L_b L_b^T``.
    When the loss does not promise a psd output Hessian, ``mv`` uses the psd part
    ``L L^T`` too, so the operator is psd and equals ``U^T U`` in every case.
    """

    tags = frozenset({SYMMETRIC, PSD, ROW_SPACE})
    _children = ("primal", "_lin", "_out_hess")
    _static = ("_exact_mv",)

    def __init__(
        self, primal: PyTree, lin: Linearization, out_hess: OutputHessian, exact_mv: bool
    ) -> None:
        self.primal = primal
        self._lin = lin
        self._out_hess = out_hess
        self._exact_mv = exact_mv

    def _sqrt(self) -> Array:
        if self._out_hess.sqrt is None:
            raise NotImplementedError("this output Hessian has no square root")
        return self._out_hess.sqrt

    def _sqrt_products(self) -> tuple[Any, Any, Any]:
        """``(u -> L^T u, r -> L r, dtype)`` on ``[B, K]``: the loss's closed forms when
        the output Hessian has them (no ``[B, K, K]`` array), else contractions with
        ``sqrt``."""
        oh = self._out_hess
        if oh.sqrt_t_mv is not None and oh.sqrt_mv is not None:
            dt = compute_dtype(flatten_per_example(self._lin.outputs).dtype)
            return oh.sqrt_t_mv, oh.sqrt_mv, dt
        sq = self._sqrt()
        return (lambda u: jnp.einsum("bkr,bk->br", sq, u.astype(sq.dtype)),
                lambda r: jnp.einsum("bkr,br->bk", sq, r.astype(sq.dtype)), sq.dtype)

    def mv(self, v: PyTree) -> PyTree:
        u = self._lin.jvp(v)
        if self._exact_mv:
            w = self._out_hess.mv(u)
        else:
            lt, l_, dt = self._sqrt_products()
            wf = l_(lt(flatten_per_example(u, dt)))
            w = unflatten_per_example(wf, self._lin.outputs)
        return self._lin.vjp(w)

    def row_factors(self) -> RowFactors:
        lt, l_, dt = self._sqrt_products()
        outputs = self._lin.outputs
        b = batch_size_of(outputs)
        k = flatten_per_example(outputs).shape[1]

        def matvec(v: PyTree) -> Array:
            return lt(flatten_per_example(self._lin.jvp(v), dt)).reshape(b * k)

        def rmatvec(r: Array) -> PyTree:
            wf = l_(r.reshape(b, k).astype(dt))
            return self._lin.vjp(unflatten_per_example(wf, outputs))

        return RowFactors(matvec=matvec, rmatvec=rmatvec, num_rows=b * k)


class FisherOperator(_RowSpaceOperator):
    """Monte-Carlo Fisher ``J^T blockdiag_b((1/(c S)) sum_s G_s[b] G_s[b]^T) J``.

    ``G`` holds the sampled output gradients flattened per example, ``[S, B, K]``.
    Row factors: ``U v [s, b] = G_s[b] . (J v)_b / sqrt(c S)`` (``R = S B`` rows).
    """

    tags = frozenset({SYMMETRIC, PSD, ROW_SPACE})
    _children = ("primal", "_lin", "_g", "_w")

    def __init__(self, primal: PyTree, lin: Linearization, grads: Array, c: Any) -> None:
        self.primal = primal
        self._lin = lin
        self._g = grads
        # c may be traced (a loss that averages over counted positions: c q, q = B / N)
        self._w = jax.lax.rsqrt(jnp.asarray(c * grads.shape[0], grads.dtype))

    def _rows(self, v: PyTree) -> Array:
        uf = flatten_per_example(self._lin.jvp(v), self._g.dtype)
        return self._w * jnp.einsum("sbk,bk->sb", self._g, uf)

    def _rmat(self, r: Array) -> PyTree:
        wf = self._w * jnp.einsum("sb,sbk->bk", r.astype(self._g.dtype), self._g)
        return self._lin.vjp(unflatten_per_example(wf, self._lin.outputs))

    def mv(self, v: PyTree) -> PyTree:
        return self._rmat(self._rows(v))

    def row_factors(self) -> RowFactors:
        s, b = self._g.shape[0], self._g.shape[1]
        return RowFactors(
            matvec=lambda v: self._rows(v).reshape(s * b),
            rmatvec=lambda r: self._rmat(r.reshape(s, b)),
            num_rows=s * b,
        )


class EmpiricalFisherOperator(PytreeOperator):
    """``v -> (1/c) sum_b p_b (p_b . v)`` from per-example gradients ``p_b = c g_b``.

    With ``p_b`` summing to the gradient this is ``c sum_b g_b g_b^T``: ``(1/B) sum g g^T``
    for the mean reduction and ``sum g g^T`` for the sum. Row factors are the B rows
    ``p_b / sqrt(c)``; the exact diagonal ``(1/c) sum_b p_b**2`` is cheap.

    The sums over the batch (``sum_b r_b p_b`` in ``mv`` and ``rmatvec``, ``sum_b
    p_b**2`` in ``diag``) go through ``batch_sum`` (the loss's
    :meth:`~somax_plug.losses.Loss.batch_sum`; plain sums by default), which is
    device-count independent under ``DataParallel(mesh, reduce_chunks=K)``.
    """

    tags = frozenset({SYMMETRIC, PSD, ROW_SPACE, DIAG})
    _children = ("primal", "_p")
    _static = ("_c", "_w", "_b", "_dtype", "_sum")

    def __init__(
        self, primal: PyTree, per_example_grads: PyTree, c: float, batch_sum: Any = None
    ) -> None:
        self.primal = primal
        self._p = per_example_grads
        self._c = c
        self._sum = _plain_sum if batch_sum is None else batch_sum
        self._w = 1.0 / math.sqrt(c)
        self._b = batch_size_of(per_example_grads)
        self._dtype = tree.accum_dtype(primal)

    def _rows_of(self, ps: PyTree, v: PyTree) -> Array:
        """``w (p_b . v)`` for the rows ``ps`` (any leading size: a chunk of the batch)."""
        b, dt = jax.tree_util.tree_leaves(ps)[0].shape[0], self._dtype
        # a product and a row sum, not a matrix-vector dot: under batch_sum's vmap over
        # chunks a dot with the unbatched v folds the chunks into its rows, and XLA's
        # kernel (so the rounding) then depends on how many chunks a device holds
        parts = jax.tree_util.tree_map(
            lambda p, x: jnp.sum(p.reshape(b, -1).astype(dt) * x.ravel().astype(dt), axis=1),
            ps,
            v,
        )
        return self._w * sum(jax.tree_util.tree_leaves(parts), jnp.zeros((b,), dt))

    def _rmat_of(self, r: Array, ps: PyTree) -> PyTree:
        """``sum_b w r_b p_b`` over the rows ``ps`` (in the accumulation dtype)."""
        r = self._w * r.astype(self._dtype)
        return jax.tree_util.tree_map(lambda p: jnp.tensordot(r, p.astype(self._dtype), 1), ps)

    def _cast(self, tree_: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda o, x: o.astype(x.dtype), tree_, self.primal)

    def _rows(self, v: PyTree) -> Array:
        return self._rows_of(self._p, v)

    def _rmat(self, r: Array) -> PyTree:
        return self._cast(self._sum(self._rmat_of, r, self._p))

    def mv(self, v: PyTree) -> PyTree:
        # one sum over the batch: each chunk's rows and its share of the product
        return self._cast(self._sum(lambda ps: self._rmat_of(self._rows_of(ps, v), ps), self._p))

    def row_factors(self) -> RowFactors:
        return RowFactors(matvec=self._rows, rmatvec=self._rmat, num_rows=self._b)

    def diag(self) -> PyTree:
        dt = self._dtype
        sq = self._sum(
            lambda ps: jax.tree_util.tree_map(
                lambda p: jnp.sum(jnp.square(p.astype(dt)), axis=0), ps), self._p)
        return jax.tree_util.tree_map(lambda s, x: (s / self._c).astype(x.dtype), sq, self.primal)


def _plain_sum(fn: Any, *xs: PyTree) -> PyTree:
    """``fn(*xs)``: the default ``batch_sum`` (see :meth:`somax_plug.losses.Loss.batch_sum`)."""
    return fn(*xs)


# --------------------------------------------------------------------------- components


@declare(
    "hessian",
    summary="loss Hessian d2L/dparams2, v -> Hv by forward-over-reverse (symmetric)",
    provides={SYMMETRIC},
    requires={"resources": {"hvp"}},
)
@attrs.frozen
class Hessian(Curvature):
    """The loss Hessian ``d^2 L / d params^2`` through the shared ``hvp`` resource.

    Symmetric, not psd in general (use ``minres`` or a negative-curvature-guarded CG).

    Example:
        >>> from somax_plug import spec_of
        >>> spec_of(Hessian).requires.resources
        frozenset({'hvp'})
    """

    def build(self, res: Resources) -> HessianOperator:
        return HessianOperator(res.params, res["hvp"].mv)


@declare(
    "ggn",
    summary="generalised Gauss-Newton J^T H_out J from one shared linearization",
    provides={SYMMETRIC, PSD, ROW_SPACE},
    requires={"resources": {"linearization", "output_hessian"}},
)
@attrs.frozen
class GGN(Curvature):
    """Generalised Gauss-Newton ``J^T H_out J`` from the shared linearization.

    One ``jax.linearize`` of the model serves every product (jvp, closed-form output
    Hessian, transpose). For a :class:`~somax_plug.losses.CallableLoss` without
    ``convex=True`` the psd part of ``H_out`` is used (see :mod:`somax_plug.losses`).

    Example:
        >>> from somax_plug import spec_of
        >>> sorted(spec_of(GGN).provides)
        ['psd', 'row_space', 'symmetric']
    """

    def build(self, res: Resources) -> GGNOperator:
        exact = res.model.loss.output_hessian_psd
        return GGNOperator(res.params, res["linearization"], res["output_hessian"], exact)


@declare(
    "fisher",
    summary="Monte-Carlo Fisher J^T (sampled output-gradient outer products) J",
    provides={SYMMETRIC, PSD, ROW_SPACE},
    requires={"resources": {"linearization"}},
)
@attrs.frozen
class Fisher(Curvature):
    """Monte-Carlo Fisher with ``num_samples`` target draws per example.

    The draws use ``res.key_for("fisher")``; the loss must define
    ``sample_targets`` (every built-in loss does).

    Attributes:
        num_samples: S, target draws per example (cost: S output gradients, no extra
            passes through the model).

    Example:
        >>> Fisher(num_samples=4).num_samples
        4
    """

    num_samples: int = option(1, ge=1, doc="target draws per example")

    def build(self, res: Resources) -> FisherOperator:
        lin = res["linearization"]
        loss = res.model.loss
        outputs = lin.outputs
        c = loss.position_scale(outputs, res.targets)
        targets = loss.sample_targets(res.key_for("fisher"), outputs, self.num_samples)
        targets = loss.mask_samples(targets, res.targets)
        grads = jax.vmap(lambda t: loss.output_grad(outputs, t))(targets)
        flat = jax.vmap(flatten_per_example)(grads)
        flat = flat.astype(compute_dtype(flat.dtype))
        return FisherOperator(res.params, lin, flat, c)


@declare(
    "empirical_fisher",
    summary="empirical Fisher c * sum_b g_b g_b^T from per-example gradients",
    provides={SYMMETRIC, PSD, ROW_SPACE, DIAG},
    requires={"resources": {"per_example_grads"}},
)
@attrs.frozen
class EmpiricalFisher(Curvature):
    """Empirical Fisher ``c sum_b g_b g_b^T`` from the shared per-example gradients.

    Equals ``(1/B) sum_b g_b g_b^T`` for the mean reduction (``g_b`` the gradient of the
    b-th example's loss) and ``sum_b g_b g_b^T`` for the sum reduction.

    Example:
        >>> from somax_plug import spec_of
        >>> sorted(spec_of(EmpiricalFisher).provides)
        ['diag', 'psd', 'row_space', 'symmetric']
    """

    def build(self, res: Resources) -> EmpiricalFisherOperator:
        c = res.model.scale(res.batch)
        return EmpiricalFisherOperator(res.params, res["per_example_grads"], c,
                                       res.model.loss.batch_sum)
