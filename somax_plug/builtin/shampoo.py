"""Shampoo and SOAP: Kronecker-factored preconditioners built from gradient statistics.

Both read the step's gradient ``G`` (resource ``grad``) and keep, for every matrix
parameter (or block of one), the two Kronecker factors of Shampoo::

    L_t = beta L_{t-1} + (1 - beta) G_t G_t^T      (rows x rows)
    R_t = beta R_{t-1} + (1 - beta) G_t^T G_t      (cols x cols)

(``beta = 1``: the plain sums of the original Shampoo). They differ in what they do
with them:

``shampoo`` (Gupta, Koren & Singer 2018; Anil et al. 2020; Shi et al. 2023)::

    M^-1 V = c_b * Lhat^-e V Rhat^-e,   Lhat = L / (1 - beta^t) + eps I (same for R)

with ``e = exponent`` (1/4 for a matrix: the paper's inverse 4th roots), the roots
computed by ``jax.numpy.linalg.eigh`` every ``precondition_every`` updates (the
factors are updated at every update), and ``c_b`` the *grafting* factor of the block,
computed from the update's gradient: ``c_b = ||A(G_b)|| / ||Lhat^-e G_b Rhat^-e||``
with ``A`` Adam's diagonal step ``A(G) = G / (sqrt(vhat) + graft_eps)`` (``vhat`` the
bias-corrected EMA of ``G^2`` with ``graft_beta2``), or ``A(G) = G`` (SGD), or
``c_b = 1`` (``graft="none"``). Since ``c_b`` is fixed between two updates, ``apply``
is linear and symmetric positive definite (a positive multiple of the Kronecker
product of two SPD matrices), so the same component preconditions CG.

``soap`` (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's factors::

    L = Q_L diag(.) Q_L^T,  R = Q_R diag(.) Q_R^T    (eigh, every precondition_every)
    Gr = Q_L^T G Q_R,   v_t = beta2 v_{t-1} + (1 - beta2) Gr^2
    M^-1 V = Q_L [ (Q_L^T V Q_R) / (sqrt(v_t / (1 - beta2^t)) + eps) ] Q_R^T

Adam's first moment is the ``identity`` solver's momentum (the EMA of ``G`` in the
parameter basis, as the authors' code keeps it; rotating it is linear, so this is
Adam's first moment of the rotated gradients). When the basis is refreshed the second
moment is carried into the new basis: with ``P_L = Q_L^T Q_L'`` and ``P_R = Q_R^T
Q_R'``, ``v' = (P_L o P_L)^T v (P_R o P_R)`` (``o``: the elementwise product), the
diagonal of the old second-moment matrix seen in the new basis (a permutation of the
basis permutes ``v``, as the authors' code does).

Order inside one ``update`` (call ``t = 0, 1, ...``): (1) the factors take ``G_t``;
(2) when ``t % precondition_every == 0`` the roots (Shampoo) or the basis (SOAP) are
recomputed from them; (3) the graft factors (Shampoo) or the second moment (SOAP)
take ``G_t``. So the first step is already preconditioned, by the first gradient's
factors (the authors' SOAP skips its first step instead).

Which parameters get what (``explain``):

* a matrix ``[m, n]``: blocks of at most ``block_size x block_size`` (the last ones
  zero-padded; the padding changes nothing, since the factors of a padded block are
  block-diagonal), one ``L``, ``R`` per block, all blocks at once (batched);
* SOAP: a block side above ``max_precond_dim`` (when set) keeps no factor and is not
  rotated (``Q = I`` on that side), as the authors' ``max_precond_dim``;
* a parameter with more than two axes: ``reshape="merge_leading"`` (default) reshapes
  ``[a, b, ..., n]`` to ``[a*b*..., n]`` (for a flax HWIO conv kernel: rows = the
  receptive field times the input channels, columns = the output channels);
  ``reshape="diagonal"`` gives it the diagonal fallback;
* vectors, scalars, and (with ``max_dim``) a matrix with a dimension above
  ``max_dim``: the diagonal fallback ``M^-1 v = v / (sqrt(vhat) + graft_eps)``
  (Shampoo, Adam's second moment; its graft factor is 1 for Adam grafting and
  ``||G|| / ||A(G)||`` for SGD grafting) or Adam (SOAP: ``Q = I``).

``recorded_choices()`` lists the rule each parameter got (``method.explain()`` prints
it once the method is initialised); ``plan.explain()`` prints the rule itself.

Memory per ``[m, n]`` parameter (numbers, float32 at least), blocks of side ``b``
(``b >= m, n``: one block): Shampoo keeps ``2 (br^2 + bc^2)`` per block (factors and
roots) plus ``m n`` (Adam's second moment): ``(m n / b^2) 4 b^2 + m n = 5 m n`` for
``m, n`` multiples of ``b``; SOAP the same (factors and bases, the rotated second
moment). A one-block ``[m, n]`` matrix: ``2 (m^2 + n^2) + m n``. The diagonal
fallback keeps ``m n`` (one second moment). ``lam`` (damping) is not used by
``apply``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from somax_plug.builtin.shampoo import Shampoo
    >>> pre = Shampoo(graft="none", eps=1e-30)
    >>> g = jnp.array([[1.0, 0.0], [0.0, 4.0]])
    >>> state = pre.update({"grad": g}, {}, 0.0, None, pre.init(g))
    >>> [round(float(x), 4) for x in jnp.diag(pre.apply(state, g, 0.0))]
    [1.0, 1.0]

References: Gupta, Koren & Singer (2018), "Shampoo: Preconditioned Stochastic Tensor
Optimization", ICML; Anil et al. (2020), "Scalable Second Order Optimization for Deep
Learning"; Shi et al. (2023), "A Distributed Data-Parallel PyTorch Implementation of
the Distributed Shampoo Optimizer"; Vyas et al. (2024), "SOAP: Improving and
Stabilizing Shampoo using Adam".
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import attrs

from somax_plug import (
    Choices,
    CompositionError,
    InputError,
    Preconditioner,
    choices_field,
    declare,
    lazy_import,
    option,
)

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")
lax = lazy_import("jax.lax")

PyTree = Any
Array = Any
Stats = dict[str, Any]

__all__ = ["SOAP", "Layout", "Shampoo", "eigh_basis", "from_blocks", "inverse_root", "layout_of",
           "qr_basis", "to_blocks"]

RESHAPES = ("merge_leading", "diagonal")
GRAFTS = ("adam", "sgd", "none")


class Layout(NamedTuple):
    """How one parameter leaf is preconditioned (static: from its shape only).

    ``kind`` is ``"blocks"`` or ``"diagonal"``; for blocks, the leaf is viewed as a
    ``[rows, cols]`` matrix cut into ``nbr x nbc`` blocks of ``br x bc`` (padded).
    """

    kind: str
    shape: tuple[int, ...]
    rows: int = 0
    cols: int = 0
    br: int = 0
    bc: int = 0
    nbr: int = 0
    nbc: int = 0
    reason: str = ""

    @property
    def blocks(self) -> int:
        return self.nbr * self.nbc


def layout_of(shape: tuple[int, ...], block_size: int, reshape: str,
              max_dim: int | None) -> Layout:
    """The :class:`Layout` of a leaf of ``shape`` (the rule in the module docstring)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return Layout("diagonal", shape, reason=f"{len(shape)}-axis: diagonal fallback")
    if len(shape) > 2 and reshape == "diagonal":
        return Layout("diagonal", shape, reason=f"{len(shape)} axes: diagonal fallback "
                      "(reshape='diagonal')")
    rows, cols = math.prod(shape[:-1]), shape[-1]
    how = "" if len(shape) == 2 else f"{len(shape)} axes merged into rows: [{rows}, {cols}]; "
    if min(rows, cols) == 1:
        return Layout("diagonal", shape, reason=how + "a vector in disguise: diagonal fallback")
    if max_dim is not None and max(rows, cols) > max_dim:
        return Layout("diagonal", shape, reason=how + f"a dimension above max_dim={max_dim}: "
                      "diagonal fallback")
    br, bc = min(rows, block_size), min(cols, block_size)
    nbr, nbc = -(-rows // br), -(-cols // bc)
    return Layout("blocks", shape, rows, cols, br, bc, nbr, nbc,
                  how + f"{nbr}x{nbc} blocks of {br}x{bc} (L {br}x{br}, R {bc}x{bc} each)")


def to_blocks(x: Array, lay: Layout) -> Array:
    """``[nb, br, bc]`` blocks of leaf ``x`` (row-major block order, zero padding)."""
    m = x.reshape(lay.rows, lay.cols)
    m = jnp.pad(m, ((0, lay.nbr * lay.br - lay.rows), (0, lay.nbc * lay.bc - lay.cols)))
    m = m.reshape(lay.nbr, lay.br, lay.nbc, lay.bc).transpose(0, 2, 1, 3)
    return m.reshape(lay.blocks, lay.br, lay.bc)


def from_blocks(b: Array, lay: Layout) -> Array:
    """The inverse of :func:`to_blocks` (padding dropped), in the leaf's shape."""
    m = b.reshape(lay.nbr, lay.nbc, lay.br, lay.bc).transpose(0, 2, 1, 3)
    m = m.reshape(lay.nbr * lay.br, lay.nbc * lay.bc)[: lay.rows, : lay.cols]
    return m.reshape(lay.shape)


def _sym(a: Array) -> Array:
    return (a + jnp.swapaxes(a, -1, -2)) / 2


def inverse_root(a: Array, exponent: float, eps: float) -> Array:
    """``(a + eps I)^-exponent`` of a symmetric psd ``a`` (batched), by ``eigh``.

    Eigenvalues below 0 (rounding) are set to 0 before ``eps`` is added.
    """
    w, q = jnp.linalg.eigh(_sym(a))
    w = jnp.maximum(w, 0) + jnp.asarray(eps, w.dtype)
    return _sym((q * w[..., None, :] ** (-exponent)) @ jnp.swapaxes(q, -1, -2))


def _dtype(x: Array) -> Any:
    """Statistics and roots in float32 at least."""
    return jnp.result_type(x.dtype, jnp.float32)


def _ema(old: Array, new: Array, beta: float) -> Array:
    """``beta old + (1 - beta) new``, or ``old + new`` when ``beta == 1`` (sums)."""
    return old + new if beta == 1 else beta * old + (1 - beta) * new


def _correction(beta: float, count: Array, dtype: Any) -> Array:
    """``1 - beta^count`` (1 for sums or before the first update)."""
    if beta == 1:
        return jnp.ones((), dtype)
    corr = 1 - jnp.asarray(beta, dtype) ** count.astype(dtype)
    return jnp.where(count > 0, corr, 1)


def _grad(name: str, res: Any) -> PyTree:
    try:
        return res["grad"]
    except (KeyError, TypeError) as exc:
        raise CompositionError(
            f"preconditioner {name!r} needs the resource 'grad' (the step's gradient) in its "
            "update; it declares it, so run it through compose(...) or pass {'grad': g}"
        ) from exc




@attrs.frozen
class _Kronecker(Preconditioner):
    """What Shampoo and SOAP share: options, layouts, factors, cadence, explain."""

    block_size: int = option(128, ge=2, le=8192, doc="largest block side (eigh cost ~ b^3)")
    precondition_every: int = option(
        10, ge=1, le=100_000, doc="recompute roots / basis every n updates (factors: every one)"
    )
    reshape: str = option("merge_leading", choices=RESHAPES,
                          doc="parameters with > 2 axes: merge leading axes into rows, or diagonal")
    max_dim: int | None = option(
        None, ge=2, doc="diagonal fallback above this dimension (None: block)"
    )
    _choices: Choices = choices_field()

    name = "kronecker"

    @property
    def factor_beta(self) -> float:
        raise NotImplementedError

    def layouts(self, params: PyTree) -> list[Layout]:
        leaves = jax.tree_util.tree_leaves(params)
        return [layout_of(jnp.shape(x), self.block_size, self.reshape, self.max_dim)
                for x in leaves]

    def _record(self, params: PyTree) -> None:
        paths = jax.tree_util.tree_flatten_with_path(params)[0]
        for (path, x), lay in zip(paths, self.layouts(params), strict=True):
            where = jax.tree_util.keystr(path) or "params"
            self._choices.add(f"{where} {tuple(jnp.shape(x))}: {lay.reason}")

    @property
    def deferred_rule(self) -> str:
        """The per-parameter rule (printed by ``plan.explain()``)."""
        fallback = "merged into [prod(leading), last]" if self.reshape == "merge_leading" else (
            "diagonal fallback")
        cap = f"; a dimension > max_dim={self.max_dim}: diagonal" if self.max_dim else ""
        return (f"per parameter: a matrix -> blocks of at most {self.block_size}x"
                f"{self.block_size} with Kronecker factors; > 2 axes -> {fallback}; vectors "
                f"and scalars -> diagonal{cap}")

    def recorded_choices(self) -> list[str]:
        """Which rule each parameter got (recorded by ``init``)."""
        return list(self._choices.entries)

    def _factors(self, lay: Layout, dt: Any) -> dict[str, Array]:
        return {"L": jnp.zeros((lay.blocks, lay.br, lay.br), dt),
                "R": jnp.zeros((lay.blocks, lay.bc, lay.bc), dt)}

    def _eye(self, n: int, lay: Layout, dt: Any) -> Array:
        return jnp.broadcast_to(jnp.eye(n, dtype=dt), (lay.blocks, n, n))

    def _accumulate(self, st: dict, gb: Array) -> tuple[Array, Array]:
        ggt = gb @ jnp.swapaxes(gb, -1, -2)
        gtg = jnp.swapaxes(gb, -1, -2) @ gb
        b = self.factor_beta
        return _ema(st["L"], ggt, b), _ema(st["R"], gtg, b)

    def _leaves(self, params: PyTree) -> tuple[list[Array], Any, list[Layout]]:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        return leaves, treedef, self.layouts(params)

    def _check_state(self, state: PyTree, like: PyTree) -> None:
        """Refuse a state made for other parameters (a clear error, not a reshape error)."""
        want = jax.eval_shape(self.init, like)
        got_shapes = jax.tree_util.tree_map(jnp.shape, state)
        want_shapes = jax.tree_util.tree_map(jnp.shape, want)
        if got_shapes != want_shapes:
            raise InputError(
                f"preconditioner {self.name!r}: its state was made for other parameters "
                f"(state shapes {_short(got_shapes)}, these parameters need "
                f"{_short(want_shapes)}); initialise it from the same parameters (init(params))"
            )


def _short(x: Any, limit: int = 160) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@declare(
    "shampoo",
    summary="Shampoo: blocked Kronecker factors, inverse roots (eigh) at a cadence, grafting",
    requires={"resources": {"grad"}},
)
@attrs.frozen
class Shampoo(_Kronecker):
    """Shampoo: ``M^-1 V = c_b Lhat^-e V Rhat^-e`` per block (see the module docstring).

    State: ``{"count": int32, "leaves": (per leaf)}``; a block leaf holds ``L``, ``R``
    ``[nb, b, b]`` (the factors), ``Lr``, ``Rr`` (their inverse roots, identity
    before the first refresh), ``v`` (Adam's second moment, the leaf's shape) and
    ``scale`` ``[nb]`` (the graft factors); a diagonal leaf ``v`` and ``scale`` ``[]``.

    Options: ``exponent`` (0.25), ``beta2`` (factor EMA, 0.999; 1: sums), ``eps``
    (1e-12), ``graft`` ("adam"), ``graft_beta2`` (0.999), ``graft_eps`` (1e-8),
    ``block_size`` (128), ``precondition_every`` (10), ``reshape``
    ("merge_leading"), ``max_dim`` (None).
    """

    exponent: float = option(0.25, gt=0, le=0.5, doc="inverse root of each factor (1/4: Shampoo)")
    beta2: float = option(0.999, gt=0, le=1, doc="EMA decay of the factors (1: sums)")
    eps: float = option(1e-12, gt=0, le=1, doc="ridge added to the factors' eigenvalues")
    graft: str = option("adam", choices=GRAFTS, doc="step-size graft per block")
    graft_beta2: float = option(0.999, ge=0, lt=1, doc="Adam graft's second-moment decay")
    graft_eps: float = option(1e-8, gt=0, le=1, doc="Adam graft's (and the diagonal's) epsilon")

    name = "shampoo"

    @property
    def factor_beta(self) -> float:
        return self.beta2

    def init(self, params: PyTree) -> PyTree:
        self._record(params)
        leaves, _, lays = self._leaves(params)
        out = []
        for x, lay in zip(leaves, lays, strict=True):
            dt = _dtype(jnp.asarray(x))
            st = {"v": jnp.zeros(lay.shape, dt)}
            if lay.kind == "blocks":
                st.update(self._factors(lay, dt))
                st["Lr"] = self._eye(lay.br, lay, dt)
                st["Rr"] = self._eye(lay.bc, lay, dt)
                st["scale"] = jnp.ones((lay.blocks,), dt)
            else:
                st["scale"] = jnp.ones((), dt)
            out.append(st)
        return {"count": jnp.zeros((), jnp.int32), "leaves": tuple(out)}

    def _adam(self, g: Array, v: Array, count: Array) -> Array:
        vhat = v / _correction(self.graft_beta2, count, v.dtype)
        return g / (jnp.sqrt(vhat) + jnp.asarray(self.graft_eps, v.dtype))

    def update(self, res: Any, stats: Stats, lam: Array, key: Array, state: PyTree) -> PyTree:
        grad = _grad(self.name, res)
        self._check_state(state, grad)
        leaves, _, lays = self._leaves(grad)
        calls = state["count"]
        count = calls + 1
        due = (calls % self.precondition_every) == 0
        out = []
        for g, lay, st in zip(leaves, lays, state["leaves"], strict=True):
            dt = st["v"].dtype
            g = jnp.asarray(g).astype(dt)
            v = self.graft_beta2 * st["v"] + (1 - self.graft_beta2) * g * g
            adam = self._adam(g, v, count)
            if lay.kind == "diagonal":
                scale = jnp.ones((), dt)
                if self.graft == "sgd":
                    scale = _ratio(jnp.linalg.norm(g), jnp.linalg.norm(adam))
                out.append({"v": v, "scale": scale})
                continue
            gb = to_blocks(g, lay)
            big_l, big_r = self._accumulate(st, gb)
            corr = _correction(self.beta2, count, dt)

            def roots(_: Any, big_l: Array = big_l, big_r: Array = big_r,
                      corr: Array = corr) -> tuple[Array, Array]:
                return (inverse_root(big_l / corr, self.exponent, self.eps),
                        inverse_root(big_r / corr, self.exponent, self.eps))

            lr, rr = lax.cond(due, roots, lambda _, st=st: (st["Lr"], st["Rr"]), None)
            scale = jnp.ones((lay.blocks,), dt)
            if self.graft != "none":
                pg = lr @ gb @ rr
                ref = to_blocks(adam, lay) if self.graft == "adam" else gb
                scale = _ratio(_block_norm(ref), _block_norm(pg))
            out.append({"v": v, "L": big_l, "R": big_r, "Lr": lr, "Rr": rr, "scale": scale})
        return {"count": count, "leaves": tuple(out)}

    def apply(self, state: PyTree, v: PyTree, lam: Array) -> PyTree:
        self._check_state(state, v)
        leaves, treedef, lays = self._leaves(v)
        count = state["count"]
        out = []
        for x, lay, st in zip(leaves, lays, state["leaves"], strict=True):
            dt = st["v"].dtype
            xd = jnp.asarray(x).astype(dt)
            if lay.kind == "diagonal":
                y = st["scale"] * self._adam(xd, st["v"], count)
            else:
                yb = st["Lr"] @ to_blocks(xd, lay) @ st["Rr"]
                y = from_blocks(st["scale"][:, None, None] * yb, lay)
            out.append(y.astype(jnp.asarray(x).dtype))
        return jax.tree_util.tree_unflatten(treedef, out)


def _block_norm(b: Array) -> Array:
    return jnp.sqrt(jnp.sum(b * b, axis=(-2, -1)))


def _ratio(num: Array, den: Array) -> Array:
    """``num / den``, 1 where ``den`` is 0 or either is not finite (no step-size blow-up)."""
    ok = (den > 0) & jnp.isfinite(den) & jnp.isfinite(num)
    return jnp.where(ok, num / jnp.where(ok, den, 1), jnp.ones_like(num))


def _rotate(x: Array, ql: Array | None, qr: Array | None) -> Array:
    """``Q_L^T x Q_R`` (batched); a ``None`` side is the identity (not rotated)."""
    if ql is not None:
        x = jnp.swapaxes(ql, -1, -2) @ x
    return x if qr is None else x @ qr


def _rotate_back(x: Array, ql: Array | None, qr: Array | None) -> Array:
    """``Q_L x Q_R^T`` (batched), the inverse of :func:`_rotate`."""
    if ql is not None:
        x = ql @ x
    return x if qr is None else x @ jnp.swapaxes(qr, -1, -2)


def eigh_basis(f: Array) -> Array:
    """The eigenvectors of the symmetric ``f`` (batched; columns by ascending eigenvalue)."""
    return jnp.linalg.eigh(_sym(f))[1]


def qr_basis(f: Array, q: Array) -> Array:
    """One step of power iteration from the orthogonal ``q`` towards ``f``'s eigenbasis.

    As the SOAP authors' ``get_orthogonal_matrix_QR``: the columns of ``q`` are sorted
    by the estimated eigenvalues ``diag(q^T f q)`` (descending, stable), then
    ``Q' R = f q_sorted`` (QR); here ``Q'``'s column signs are fixed so that ``R``'s
    diagonal is >= 0 (the factorisation is then unique for a full-rank ``f q``). Costs
    one ``b x b`` product and one QR per factor, against an ``eigh``'s iterations.

    Example:
        >>> import jax.numpy as jnp
        >>> f = jnp.diag(jnp.array([1.0, 3.0]))
        >>> q = qr_basis(f, jnp.eye(2))  # the larger eigenvalue's vector first
        >>> bool((q == jnp.array([[0.0, 1.0], [1.0, 0.0]])).all())
        True
    """
    fq = f @ q
    est = jnp.sum(q * fq, axis=-2)  # diag(q^T f q), from the same product
    idx = jnp.argsort(-est, axis=-1, stable=True)[..., None, :]
    qn, r = jnp.linalg.qr(jnp.take_along_axis(fq, idx, axis=-1))
    sign = jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))
    return qn * jnp.where(sign == 0, 1, sign)[..., None, :]


REFRESHES = ("qr", "eigh")


@declare(
    "soap",
    summary="SOAP: Adam in the eigenbasis of Shampoo's factors, basis refreshed at a cadence",
    requires={"resources": {"grad"}},
)
@attrs.frozen
class SOAP(_Kronecker):
    """SOAP: ``M^-1 V = Q_L [(Q_L^T V Q_R) / (sqrt(vhat) + eps)] Q_R^T`` per block.

    See the module docstring for the order of an update and the rotation of the
    second moment on a basis refresh. Use it with the ``identity`` solver and
    ``momentum = beta1`` for the whole of SOAP (the ``soap`` preset).

    The basis: ``eigh`` of the factors at the first refresh; after it, with
    ``refresh="qr"`` (default, the authors' code), one step of power iteration from
    the current basis (:func:`qr_basis`: columns sorted by ``diag(Q^T L Q)``, then
    ``QR(L Q)``), with ``refresh="eigh"`` a full ``eigh`` every time. A block side
    longer than ``max_precond_dim`` keeps no factor and is not rotated (``Q = I`` on
    that side: the authors' one-sided preconditioning of large dimensions).

    State: ``{"count": int32, "leaves": (per leaf)}``; a block leaf holds ``L``, ``R``
    ``[nb, b, b]`` (the factors), ``QL``, ``QR`` (the bases, identity before the
    first refresh; both absent for a side above ``max_precond_dim``) and ``v``
    ``[nb, br, bc]`` (the rotated second moment); a diagonal leaf (Adam) ``v`` in the
    leaf's shape.

    Options: ``beta2`` (0.95), ``shampoo_beta`` (0.95), ``eps`` (1e-8),
    ``block_size`` (1024), ``precondition_every`` (10), ``refresh`` ("qr"),
    ``max_precond_dim`` (None: every side rotated), ``reshape`` ("merge_leading"),
    ``max_dim`` (None).
    """

    beta2: float = option(0.95, ge=0, lt=1, doc="Adam's second-moment decay (rotated basis)")
    shampoo_beta: float = option(0.95, gt=0, le=1, doc="EMA decay of the factors (1: sums)")
    eps: float = option(1e-8, gt=0, le=1, doc="Adam's epsilon")
    block_size: int = option(1024, ge=2, le=8192, doc="largest block side (eigh cost ~ b^3)")
    refresh: str = option("qr", choices=REFRESHES,
                          doc="basis after the first: power iteration + QR, or a full eigh")
    max_precond_dim: int | None = option(
        None, ge=1, doc="a block side above this is not rotated (no factor; None: all are)"
    )

    name = "soap"

    @property
    def factor_beta(self) -> float:
        return self.shampoo_beta

    def sides(self, lay: Layout) -> tuple[bool, bool]:
        """Whether the rows (left) and the columns (right) of ``lay``'s blocks are rotated."""
        cap = self.max_precond_dim
        return (cap is None or lay.br <= cap), (cap is None or lay.bc <= cap)

    def _record(self, params: PyTree) -> None:
        paths = jax.tree_util.tree_flatten_with_path(params)[0]
        for (path, x), lay in zip(paths, self.layouts(params), strict=True):
            where = jax.tree_util.keystr(path) or "params"
            note = ""
            if lay.kind == "blocks":
                left, right = self.sides(lay)
                off = [f"{n} {d} > max_precond_dim={self.max_precond_dim}" for ok, n, d in
                       ((left, "rows", lay.br), (right, "columns", lay.bc)) if not ok]
                note = f"; not rotated: {', '.join(off)}" if off else ""
            self._choices.add(f"{where} {tuple(jnp.shape(x))}: {lay.reason}{note}")

    def init(self, params: PyTree) -> PyTree:
        self._record(params)
        leaves, _, lays = self._leaves(params)
        out = []
        for x, lay in zip(leaves, lays, strict=True):
            dt = _dtype(jnp.asarray(x))
            if lay.kind == "blocks":
                left, right = self.sides(lay)
                st = {}
                if left:
                    st["L"] = jnp.zeros((lay.blocks, lay.br, lay.br), dt)
                    st["QL"] = self._eye(lay.br, lay, dt)
                if right:
                    st["R"] = jnp.zeros((lay.blocks, lay.bc, lay.bc), dt)
                    st["QR"] = self._eye(lay.bc, lay, dt)
                st["v"] = jnp.zeros((lay.blocks, lay.br, lay.bc), dt)
            else:
                st = {"v": jnp.zeros(lay.shape, dt)}
            out.append(st)
        return {"count": jnp.zeros((), jnp.int32), "leaves": tuple(out)}

    def update(self, res: Any, stats: Stats, lam: Array, key: Array, state: PyTree) -> PyTree:
        grad = _grad(self.name, res)
        self._check_state(state, grad)
        leaves, _, lays = self._leaves(grad)
        calls = state["count"]
        due = (calls % self.precondition_every) == 0
        # 0: keep the basis, 1: eigh (the first refresh, or every one), 2: power step + QR
        index = due.astype(jnp.int32)
        if self.refresh == "qr":
            index = jnp.where(due & (calls > 0), 2, index)
        b2, fb = self.beta2, self.factor_beta
        out = []
        for g, lay, st in zip(leaves, lays, state["leaves"], strict=True):
            dt = st["v"].dtype
            g = jnp.asarray(g).astype(dt)
            if lay.kind == "diagonal":
                out.append({"v": b2 * st["v"] + (1 - b2) * g * g})
                continue
            gb = to_blocks(g, lay)
            new = dict(st)
            if "L" in st:
                new["L"] = _ema(st["L"], gb @ jnp.swapaxes(gb, -1, -2), fb)
            if "R" in st:
                new["R"] = _ema(st["R"], jnp.swapaxes(gb, -1, -2) @ gb, fb)
            sides = [s for s in ("L", "R") if s in st]

            def carry(bases: dict, st: dict = st) -> tuple[dict, Array]:
                """The second moment seen in the new bases: (P_L o P_L)^T v (P_R o P_R)."""
                p = {s: jnp.swapaxes(st["Q" + s], -1, -2) @ bases[s] for s in bases}
                v = st["v"]
                if "L" in p:
                    v = jnp.swapaxes(p["L"] * p["L"], -1, -2) @ v
                if "R" in p:
                    v = v @ (p["R"] * p["R"])
                return bases, v

            def keep(_: Any, st: dict = st, sides: list = sides) -> tuple[dict, Array]:
                return {s: st["Q" + s] for s in sides}, st["v"]

            def by_eigh(_: Any, new: dict = new, sides: list = sides, carry: Any = carry
                        ) -> tuple[dict, Array]:
                return carry({s: eigh_basis(new[s]) for s in sides})

            def by_qr(_: Any, new: dict = new, st: dict = st, sides: list = sides,
                      carry: Any = carry) -> tuple[dict, Array]:
                return carry({s: qr_basis(new[s], st["Q" + s]) for s in sides})

            branches = [keep, by_eigh] + ([by_qr] if self.refresh == "qr" else [])
            if sides:
                bases, v = lax.switch(index, branches, None)
            else:
                bases, v = {}, st["v"]
            for s in sides:
                new["Q" + s] = bases[s]
            gr = _rotate(gb, bases.get("L"), bases.get("R"))
            new["v"] = b2 * v + (1 - b2) * gr * gr
            out.append(new)
        return {"count": calls + 1, "leaves": tuple(out)}

    def apply(self, state: PyTree, v: PyTree, lam: Array) -> PyTree:
        self._check_state(state, v)
        leaves, treedef, lays = self._leaves(v)
        count = state["count"]
        out = []
        for x, lay, st in zip(leaves, lays, state["leaves"], strict=True):
            dt = st["v"].dtype
            xd = jnp.asarray(x).astype(dt)
            denom = jnp.sqrt(st["v"] / _correction(self.beta2, count, dt)) + jnp.asarray(
                self.eps, dt)
            if lay.kind == "diagonal":
                y = xd / denom
            else:
                ql, qr = st.get("QL"), st.get("QR")
                y = from_blocks(_rotate_back(_rotate(to_blocks(xd, lay), ql, qr) / denom,
                                             ql, qr), lay)
            out.append(y.astype(jnp.asarray(x).dtype))
        return jax.tree_util.tree_unflatten(treedef, out)
