"""Built-in solvers of the damped curvature system ``(C + lam I) s = rhs``.

Every solver is a frozen attrs class (options are fields, so it is hashable and
static), works on parameter pytrees, runs under ``jit``, ``vmap`` and ``lax.scan``,
and returns ``(s, SolverInfo, new_state)`` with a fixed schema:

* ``iterations`` (int32): operator matvecs for the Krylov and series solvers (exactly
  one per iteration, none for the initial residual when ``x0 = 0``); 1 for the
  closed-form solvers (``direct``, ``row_cholesky``, ``diagonal``, ``identity``).
* ``residual``: ``||rhs - (C + lam I) s|| / ||rhs||`` (0 when ``rhs = 0``). Krylov
  solvers report the recursively updated residual, which equals the true one in
  exact arithmetic and costs no extra matvec. ``diagonal`` reports it for its own
  model ``diag(d) + lam I``; ``identity`` reports NaN (not computed: it would cost
  a matvec the first-order baseline must not pay).
* ``converged`` (bool): ``residual <= tol``; for ``direct`` and ``identity``: the
  direction is finite; for ``row_cg``: the row-space system met its tolerance (see
  :class:`RowCG`).

Each class carries its declaration (``@declare`` and its ``option`` fields): what it
requires, whether it applies the preconditioner, its options and their ranges.
``somax-plug list --kind solver``, ``somax-plug show NAME`` and the docs tables read it.

Why not ``jax.scipy.sparse.linalg.cg`` or lineax: they report neither iterations nor
the residual in a fixed schema, cannot stop on negative curvature and return the last
good iterate, and do not guarantee one matvec per iteration with no matvec for the
initial residual (which the FLOPs benchmarks count). They are used in the tests as
references.

Example:
    >>> import jax.numpy as jnp
    >>> from somax_plug import MatrixOperator
    >>> from somax_plug.builtin.solvers import CG
    >>> op = MatrixOperator(jnp.diag(jnp.array([1.0, 4.0])), jnp.zeros(2), tags={"psd"})
    >>> s, info, _ = CG(tol=1e-6).solve(op, jnp.array([1.0, 1.0]), 1.0, None, {}, ())
    >>> [round(float(x), 3) for x in s], int(info.iterations), bool(info.converged)
    ([0.5, 0.2], 2, True)

References:
    Hestenes & Stiefel (1952), conjugate gradients; Paige & Saunders (1975), MINRES;
    Steihaug (1983) and Toint (1981), truncated CG in a trust region; Martens (2010),
    Hessian-free optimization; Woodbury (1950) for the row-space solvers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from somax_plug import (
    PSD,
    ROW_SPACE,
    SYMMETRIC,
    CompositionError,
    InputError,
    LinearOperator,
    Solver,
    SolverInfo,
    damped_mv,
    declare,
    lazy_import,
    option,
    tree,
)

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")
lax = lazy_import("jax.lax")

Stats = dict[str, Any]

PyTree = Any
Array = Any

__all__ = [
    "CG",
    "MINRES",
    "Diagonal",
    "Direct",
    "Identity",
    "Neumann",
    "RowCG",
    "RowCholesky",
    "Steihaug",
]


# --------------------------------------------------------------------------- helpers


def _comb(*pairs: tuple[Array, PyTree]) -> PyTree:
    """``sum_i c_i t_i`` over pytrees; each scalar is cast to the leaf dtype."""
    coefs = [c for c, _ in pairs]
    trees = [t for _, t in pairs]

    def leaf(*xs: Array) -> Array:
        out = jnp.asarray(coefs[0]).astype(xs[0].dtype) * xs[0]
        for c, x in zip(coefs[1:], xs[1:], strict=True):
            out = out + jnp.asarray(c).astype(x.dtype) * x
        return out

    return jax.tree_util.tree_map(leaf, *trees)


def _safe_div(a: Array, b: Array) -> Array:
    """``a / b``, and 0 where ``b == 0`` (no NaN from 0/0)."""
    ok = b != 0
    return jnp.where(ok, a / jnp.where(ok, b, 1), jnp.zeros_like(a))


def _relative(rr: Array, bb: Array) -> Array:
    """``sqrt(rr / bb)``; 0 when ``rhs = 0``."""
    return jnp.sqrt(_safe_div(rr, bb))


def _info(iterations: Array, residual: Array, converged: Array, dtype: Any) -> SolverInfo:
    return SolverInfo(
        iterations=jnp.asarray(iterations, jnp.int32),
        residual=jnp.asarray(residual, dtype),
        converged=jnp.asarray(converged, jnp.bool_),
    )


def _identity(v: PyTree) -> PyTree:
    return v


def _matvec(op: LinearOperator, lam: Array) -> Callable[[PyTree], PyTree]:
    return lambda v: damped_mv(op, lam, v)


def _pcg(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree | None,
    precond: Callable[[PyTree], PyTree],
    tol: float,
    maxiter: int,
    guard: bool,
) -> tuple[PyTree, PyTree, Array, Array, Array]:
    """Preconditioned CG. Returns ``(x, r, rr, iterations, bb)`` (rr, bb squared norms).

    One matvec per iteration; none for the initial residual unless ``x0`` is given
    and nonzero (checked at run time with ``lax.cond``). With ``guard``, a direction
    with ``p.Ap <= 0`` (or NaN) stops the loop: the last iterate is kept, or on the
    first iteration ``x0 + M r0`` (the preconditioned rhs direction) is returned.
    """
    bb = tree.vdot(b, b)
    if x0 is None:
        x = tree.zeros_like(b)
        r = b
    else:
        x = tree.where(bb > 0, x0, tree.zeros_like(x0))
        r = lax.cond(
            tree.vdot(x, x) > 0,
            lambda x_: tree.sub(b, matvec(x_)),
            lambda x_: b,
            x,
        )
    z = precond(r)
    rz = tree.vdot(r, z)
    rr = tree.vdot(r, r)
    thresh = jnp.asarray(tol, bb.dtype) ** 2 * bb

    def cond(c: tuple) -> Array:
        i, _, _, _, _, rr, stop = c
        return (i < maxiter) & (rr > thresh) & ~stop

    def body(c: tuple) -> tuple:
        i, x, r, p, rz, _, _ = c
        ap = matvec(p)
        pap = tree.vdot(p, ap)
        alpha = _safe_div(rz, pap)
        x_new = _comb((1, x), (alpha, p))
        r_new = _comb((1, r), (-alpha, ap))
        if guard:
            bad = ~(pap > 0)
            first = i == 0
            x_fb = tree.where(first, _comb((1, x), (1, p)), x)
            r_fb = tree.where(first, _comb((1, r), (-1, ap)), r)
            x_new = tree.where(bad, x_fb, x_new)
            r_new = tree.where(bad, r_fb, r_new)
        else:
            bad = jnp.asarray(False)
        z_new = precond(r_new)
        rz_new = tree.vdot(r_new, z_new)
        p_new = _comb((1, z_new), (_safe_div(rz_new, rz), p))
        return i + 1, x_new, r_new, p_new, rz_new, tree.vdot(r_new, r_new), bad

    init = (jnp.asarray(0, jnp.int32), x, r, z, rz, rr, jnp.asarray(False))
    i, x, r, _, _, rr, _ = lax.while_loop(cond, body, init)
    return x, r, rr, i, bb


def _require_row_factors(name: str, op: LinearOperator) -> Any:
    factors = op.row_factors()
    if factors is None:
        raise CompositionError(
            f"solver {name!r} needs an operator with row factors (tag 'row_space'); "
            f"{type(op).__name__} with tags {sorted(op.tags)} has none. Use a curvature "
            "that provides 'row_space' (for example 'ggn'), or solver 'cg'."
        )
    return factors


def _row_gram(factors: Any, dtype: Any) -> Array:
    """``G = U U^T`` (R x R) by vmapping ``matvec o rmatvec`` over the basis."""
    eye = jnp.eye(factors.num_rows, dtype=dtype)
    return jax.vmap(lambda e: jnp.ravel(factors.matvec(factors.rmatvec(e))))(eye)


# --------------------------------------------------------------------------- solvers


@declare(
    "cg",
    summary="(preconditioned) conjugate gradients, negative-curvature guard, warm start",
    requires=lambda o: {"tags": {PSD} if o["negative_curvature"] == "none" else {SYMMETRIC}},
    preconditioned=True,
    hints={PSD: "or solver {'name': 'cg', 'negative_curvature': 'guard'} (needs only symmetric)"},
)
@attrs.frozen
class CG(Solver):
    """(Preconditioned) conjugate gradients on ``(C + lam I) s = rhs``.

    Iteration (Hestenes-Stiefel), ``z = M^-1 r``::

        alpha = r.z / p.Ap;  s += alpha p;  r -= alpha Ap;  p = z' + (r'.z' / r.z) p

    from ``s0 = 0`` (``r0 = rhs``, no matvec) or, with ``warm_start``, from the last
    solution kept in the state (one matvec for ``r0``, skipped at run time when the
    state is zero). Exactly one matvec per iteration.

    Options:
        tol: stop when ``||r|| <= tol ||rhs||``.
        maxiter: at most this many iterations (matvecs).
        warm_start: start from the previous solution (state ``{"x": pytree}``).
        negative_curvature: ``"guard"`` stops on ``p.(C + lam I)p <= 0`` and returns
            the last good iterate, or the preconditioned rhs direction ``M^-1 rhs``
            if it happens on the first iteration (never NaN); needs only a symmetric
            operator. ``"none"`` is textbook CG and needs a psd operator.

    Reference: Hestenes & Stiefel (1952); the guard as in Martens (2010), sec. 4.
    """

    tol: float = option(1e-5, ge=0, doc="stop when ||r|| <= tol ||rhs||")
    maxiter: int = option(50, ge=1, doc="at most this many iterations (matvecs)")
    warm_start: bool = option(False, doc="start from the previous solution")
    negative_curvature: str = option(
        "guard", choices=("guard", "none"), doc="'guard' stops on p.Ap <= 0; 'none' needs psd"
    )

    def init(self, params: PyTree) -> PyTree:
        return {"x": tree.zeros_like(params)} if self.warm_start else ()

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        x0 = tree.cast_like(state["x"], rhs) if self.warm_start else None
        x, _, rr, i, bb = _pcg(
            _matvec(op, lam),
            rhs,
            x0,
            precond or _identity,
            self.tol,
            self.maxiter,
            self.negative_curvature == "guard",
        )
        thresh = jnp.asarray(self.tol, bb.dtype) ** 2 * bb
        info = _info(i, _relative(rr, bb), rr <= thresh, bb.dtype)
        if self.warm_start:
            keep = tree.where(tree.all_finite(x), x, tree.zeros_like(x))
            state = {"x": tree.cast_like(keep, state["x"])}
        return x, info, state


@declare(
    "minres",
    summary="Paige-Saunders MINRES for symmetric indefinite systems (SPD preconditioner)",
    requires={"tags": {SYMMETRIC}},
    preconditioned=True,
)
@attrs.frozen
class MINRES(Solver):
    """Paige-Saunders MINRES for symmetric (possibly indefinite) ``C + lam I``.

    Minimises ``||rhs - (C + lam I) s||_{M^-1}`` over the Krylov space by the Lanczos
    process and Givens rotations; with a preconditioner it must be SPD (the loop
    stops if ``r.M^-1 r < 0``). The true residual is tracked by the same recurrence as
    the iterate (``A w_k`` alongside ``w_k``), so the reported 2-norm residual costs
    no extra matvec; one matvec per iteration. Stops when ``||r|| <= tol ||rhs||``,
    after ``maxiter`` iterations, or when the Krylov space is exhausted.

    Options: ``tol``, ``maxiter``.

    Reference: Paige & Saunders (1975), "Solution of sparse indefinite systems of
    linear equations", SIAM J. Numer. Anal. 12(4); the recurrences follow
    ``scipy.sparse.linalg.minres``.
    """

    tol: float = option(1e-5, ge=0, doc="stop when ||r|| <= tol ||rhs||")
    maxiter: int = option(50, ge=1, doc="at most this many iterations (matvecs)")

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        matvec = _matvec(op, lam)
        m_inv = precond or _identity
        b = rhs
        bb = tree.vdot(b, b)
        dt = bb.dtype
        zero = jnp.zeros((), dt)
        y = m_inv(b)
        beta1_sq = tree.vdot(b, y)
        beta1 = jnp.sqrt(jnp.maximum(beta1_sq, 0))
        thresh = jnp.asarray(self.tol, dt) ** 2 * bb
        tiny = jnp.finfo(dt).tiny
        zeros = tree.zeros_like(b)

        def cond(c: dict) -> Array:
            return (c["i"] < self.maxiter) & (c["rr"] > thresh) & ~c["stop"]

        def body(c: dict) -> dict:
            i, beta, oldb = c["i"], c["beta"], c["oldb"]
            v = _comb((1 / beta, c["y"]))
            av = matvec(v)
            # r1 starts at zero and oldb at 0 (safe division -> 0): no term on step 1
            y = _comb((1, av), (-_safe_div(beta, oldb), c["r1"]))
            alfa = tree.vdot(v, y)
            y = _comb((1, y), (-alfa / beta, c["r2"]))
            r1, r2 = c["r2"], y
            y = m_inv(r2)
            oldb = beta
            beta_sq = tree.vdot(r2, y)
            beta = jnp.sqrt(jnp.maximum(beta_sq, 0))
            cs, sn, dbar = c["cs"], c["sn"], c["dbar"]
            oldeps = c["epsln"]
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            gamma = jnp.maximum(jnp.sqrt(gbar**2 + beta**2), tiny)
            cs = gbar / gamma
            sn = beta / gamma
            phi = cs * c["phibar"]
            phibar = sn * c["phibar"]
            w = _comb((1 / gamma, v), (-oldeps / gamma, c["w2"]), (-delta / gamma, c["w"]))
            aw = _comb((1 / gamma, av), (-oldeps / gamma, c["aw2"]), (-delta / gamma, c["aw"]))
            x = _comb((1, c["x"]), (phi, w))
            r = _comb((1, c["r"]), (-phi, aw))
            return {
                "i": i + 1,
                "x": x,
                "r": r,
                "rr": tree.vdot(r, r),
                "y": y,
                "r1": r1,
                "r2": r2,
                "beta": beta,
                "oldb": oldb,
                "dbar": dbar,
                "epsln": epsln,
                "phibar": phibar,
                "cs": cs,
                "sn": sn,
                "w": w,
                "w2": c["w"],
                "aw": aw,
                "aw2": c["aw"],
                "stop": ~(beta_sq > 0),
            }

        init = {
            "i": jnp.asarray(0, jnp.int32),
            "x": zeros,
            "r": b,
            "rr": bb,
            "y": y,
            "r1": zeros,
            "r2": b,
            "beta": beta1,
            "oldb": zero,
            "dbar": zero,
            "epsln": zero,
            "phibar": beta1,
            "cs": -jnp.ones((), dt),
            "sn": zero,
            "w": zeros,
            "w2": zeros,
            "aw": zeros,
            "aw2": zeros,
            "stop": ~(beta1_sq > 0),
        }
        out = lax.while_loop(cond, body, init)
        rr = out["rr"]
        info = _info(out["i"], _relative(rr, bb), rr <= thresh, dt)
        return out["x"], info, state


@declare(
    "direct",
    summary="dense Cholesky (psd) or eigendecomposition solve; refuses n > max_size",
    requires={"tags": {SYMMETRIC}},
)
@attrs.frozen
class Direct(Solver):
    """Dense solve of ``(C + lam I) s = rhs`` (small models, references).

    Builds the ``[n, n]`` matrix with ``op.to_dense()`` (n matvecs). When the operator
    carries ``psd``: Cholesky (falling back to the eigendecomposition if the factor is
    not finite, i.e. the damped matrix is singular in floating point). Otherwise the
    symmetric eigendecomposition ``C = Q diag(e) Q^T`` and::

        s = Q diag(1 / d) Q^T rhs,  d = e + lam   (eigenvalues="exact")
                                    d = |e| + lam (eigenvalues="abs", saddle-free Newton)

    with ``1/d`` replaced by 0 where ``|d| <= n eps max|d|`` (a pseudo-inverse, so never
    inf). The default ``"exact"`` solves the stated system; ``"abs"`` (Dauphin et al.,
    2014) flips negative curvature and then the reported residual (always of
    ``C + lam I``) is not small where C has negative eigenvalues.

    Options:
        max_size: refuse (``InputError``, raised while tracing) when n exceeds it.
        eigenvalues: ``"exact"`` or ``"abs"`` (non-psd operators only).
    """

    max_size: int = option(4096, ge=1, doc="refuse a dense solve of size n > max_size")
    eigenvalues: str = option(
        "exact", choices=("exact", "abs"), doc="'abs' flips negative curvature (saddle-free)"
    )

    def check_size(self, n: int) -> None:
        """Raise :class:`~somax_plug.InputError` when ``n > max_size``."""
        if n > self.max_size:
            raise InputError(
                f"solver 'direct' refuses a dense solve of size n = {n} > max_size = "
                f"{self.max_size}: it would build an {n} x {n} matrix and factor it in "
                "O(n^3). Use solver 'cg' (psd operator) or 'minres' (symmetric indefinite), "
                "or raise max_size."
            )

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        b, unravel = tree.ravel(rhs)
        n = b.shape[0]
        self.check_size(n)
        c = op.to_dense()
        dt = jnp.result_type(c.dtype, b.dtype, jnp.float32)
        c = c.astype(dt)
        b = b.astype(dt)
        eye = jnp.eye(n, dtype=dt)
        a = c + jnp.asarray(lam).astype(dt) * eye

        def eig_solve() -> Array:
            e, q = jnp.linalg.eigh((c + c.T) / 2)
            e = jnp.abs(e) if self.eigenvalues == "abs" else e
            d = e + jnp.asarray(lam).astype(dt)
            cutoff = n * jnp.finfo(dt).eps * jnp.max(jnp.abs(d))
            inv = jnp.where(jnp.abs(d) > cutoff, 1 / jnp.where(d == 0, 1, d), 0)
            return q @ (inv * (q.T @ b))

        if PSD in op.tags:
            factor = jax.scipy.linalg.cho_factor(a, lower=True)
            s = jax.scipy.linalg.cho_solve(factor, b)
            s = lax.cond(jnp.all(jnp.isfinite(s)), lambda: s, eig_solve)
        else:
            s = eig_solve()
        r = b - a @ s
        bb = jnp.vdot(b, b)
        rel = _relative(jnp.vdot(r, r), bb)
        info = _info(1, rel, jnp.all(jnp.isfinite(s)), tree.accum_dtype(rhs))
        return unravel(s), info, state


@declare(
    "row_cholesky",
    summary="Woodbury row-space solve with an R x R Cholesky (needs lam > 0)",
    requires={"tags": {ROW_SPACE}},
)
@attrs.frozen
class RowCholesky(Solver):
    """Row-space solve by the Woodbury identity, for ``C = U^T U`` with R rows.

    ::

        s = (rhs - U^T (lam I + U U^T)^-1 U rhs) / lam

    ``U U^T`` (R x R) is built by vmapping ``matvec o rmatvec`` over the R basis
    vectors (R operator products) and factored by Cholesky. Cheaper than the
    parameter-space solve when R << n (small batches, Martens-style GGN). Requires
    ``lam > 0``: at ``lam = 0`` and R < n the system is singular and the formula
    divides by zero. The preconditioner is not used (it lives in parameter space).
    The residual is ``||U^T rho|| / (lam ||rhs||)`` with ``rho`` the row-space
    residual (an exact identity), so it costs one ``rmatvec``.

    Options: ``tol`` (for ``converged`` only).

    Reference: Woodbury (1950); Ren & Goldfarb (2019), "Efficient subsampled
    Gauss-Newton and natural gradient methods for training neural networks".
    """

    tol: float = option(1e-5, ge=0, doc="converged when the residual <= tol")

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        factors = _require_row_factors("row_cholesky", op)
        ub = jnp.ravel(factors.matvec(rhs))
        dt = jnp.result_type(ub.dtype, jnp.float32)
        ub = ub.astype(dt)
        lam_ = jnp.asarray(lam).astype(dt)
        k = _row_gram(factors, dt).astype(dt) + lam_ * jnp.eye(factors.num_rows, dtype=dt)
        c = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(k, lower=True), ub)
        rho = ub - k @ c
        return _finish_row(rhs, factors, c, rho, lam_, self.tol, jnp.asarray(1), state)


def _finish_row(
    rhs: PyTree,
    factors: Any,
    c: Array,
    rho: Array,
    lam: Array,
    tol: float,
    iterations: Array,
    state: PyTree,
) -> tuple[PyTree, SolverInfo, PyTree]:
    """``s = (rhs - U^T c) / lam`` and the residual ``-U^T rho / lam``."""
    s = _comb((1 / lam, rhs), (-1 / lam, factors.rmatvec(c)))
    res = factors.rmatvec(rho)
    bb = tree.vdot(rhs, rhs)
    rr = tree.vdot(res, res) / lam**2
    rel = _relative(rr.astype(bb.dtype), bb)
    return s, _info(iterations, rel, rel <= tol, bb.dtype), state


@declare(
    "row_cg",
    summary="Woodbury row-space solve with CG on the R x R system (needs lam > 0)",
    requires={"tags": {ROW_SPACE}},
)
@attrs.frozen
class RowCG(Solver):
    """The row-space system of :class:`RowCholesky` solved by CG, without forming ``U U^T``.

    ``(lam I + U U^T) c = U rhs`` by CG in R dimensions (one ``matvec`` and one
    ``rmatvec`` per iteration, counted as one iteration), then
    ``s = (rhs - U^T c) / lam``. The loop stops, and ``converged`` is True, when the
    row-space residual ``rho`` satisfies ``||rho|| <= tol ||U rhs||`` (the system CG
    actually solves). The reported ``residual`` is the parameter-space one,
    ``||U^T rho|| / (lam ||rhs||)`` (an exact identity; one ``rmatvec``), which can
    differ from the row-space one by up to ``||U||^2 / lam``. Requires ``lam > 0``;
    the preconditioner is not used.

    Options: ``tol``, ``maxiter``.
    """

    tol: float = option(1e-5, ge=0, doc="stop when the row-space residual <= tol ||U rhs||")
    maxiter: int = option(50, ge=1, doc="at most this many CG iterations")

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        factors = _require_row_factors("row_cg", op)
        ub = jnp.ravel(factors.matvec(rhs))
        dt = jnp.result_type(ub.dtype, jnp.float32)
        ub = ub.astype(dt)
        lam_ = jnp.asarray(lam).astype(dt)

        def row_mv(r: Array) -> Array:
            return lam_ * r + jnp.ravel(factors.matvec(factors.rmatvec(r))).astype(dt)

        c, rho, rr, i, uu = _pcg(row_mv, ub, None, _identity, self.tol, self.maxiter, True)
        s, info, state = _finish_row(rhs, factors, c, rho, lam_, self.tol, i, state)
        converged = rr <= jnp.asarray(self.tol, rr.dtype) ** 2 * uu
        return s, info._replace(converged=converged), state


@declare(
    "diagonal",
    summary="rhs / max(|diag| + lam, eps) from an estimated diagonal",
    requires={"statistics": {"diag"}},
)
@attrs.frozen
class Diagonal(Solver):
    """``s = rhs / max(d + lam, eps)`` with ``d = |diag|`` (or ``diag``) from the statistics.

    The diagonal comes from ``stats["diag"]`` (an estimator such as Hutchinson or
    Gauss-Newton-Bartlett). ``abs=True`` uses ``|diag|`` (AdaHessian-style; for a psd
    operator it changes nothing), ``eps`` floors the denominator (Sophia-style
    ``max(h, eps)``). No matvec; the reported residual is that of the diagonal model
    ``(diag(d) + lam I) s = rhs`` (nonzero only where the floor is active).

    Options: ``eps`` (floor, default 1e-12), ``abs`` (default True), ``tol``.

    Reference: Becker & LeCun (1988); Yao et al. (2021), AdaHessian; Liu et al.
    (2023), Sophia.
    """

    eps: float = option(1e-12, ge=0, doc="floor of the denominator")
    abs: bool = option(True, doc="use |diag|")
    tol: float = option(1e-5, ge=0, doc="converged when the residual <= tol")

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        if "diag" not in stats:
            raise CompositionError(
                "solver 'diagonal' needs the statistic 'diag' from an estimator "
                f"(got statistics {sorted(stats)}); add an estimator that provides 'diag'."
            )
        diag = tree.cast_like(stats["diag"], rhs)

        def damped(d: Array) -> Array:
            d = jnp.abs(d) if self.abs else d
            return d + jnp.asarray(lam).astype(d.dtype)

        model = jax.tree_util.tree_map(damped, diag)
        s = jax.tree_util.tree_map(
            lambda b, m: b / jnp.maximum(m, jnp.asarray(self.eps, m.dtype)), rhs, model
        )
        r = jax.tree_util.tree_map(lambda b, m, x: b - m * x, rhs, model, s)
        bb = tree.vdot(rhs, rhs)
        rel = _relative(tree.vdot(r, r), bb)
        return s, _info(1, rel, rel <= self.tol, bb.dtype), state


@declare(
    "identity",
    summary="first-order baseline: precond(rhs), or rhs without a preconditioner",
    preconditioned=True,
)
@attrs.frozen
class Identity(Solver):
    """The first-order baseline: ``s = precond(rhs)`` (or ``rhs``); no operator use.

    With a ``diag_ema`` preconditioner this is how the Sophia and AdaHessian presets
    apply their diagonal. Reports ``iterations = 1``, ``residual = NaN`` (computing it
    would cost a matvec) and ``converged`` = the direction is finite.
    """

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        s = precond(rhs) if precond is not None else rhs
        dt = tree.accum_dtype(rhs)
        return s, _info(1, jnp.nan, tree.all_finite(s), dt), state


@declare(
    "neumann",
    summary="truncated Neumann series alpha * sum_k (I - alpha A)^k rhs",
    requires={"tags": {PSD}},
    preconditioned=True,
)
@attrs.frozen
class Neumann(Solver):
    """Truncated Neumann series (preconditioned Richardson iteration).

    With ``A = C + lam I`` and ``K = maxiter`` terms::

        s = alpha * sum_{k<K} (I - alpha M^-1 A)^k M^-1 rhs

    computed as ``s += alpha M^-1 r;  r -= alpha A M^-1 r`` from ``s = 0, r = rhs``, so
    the residual is exact and each term costs one matvec. It converges when the
    spectral radius of ``I - alpha M^-1 A`` is below 1 (for psd C and ``M = I``:
    ``0 < alpha < 2 / lambda_max(A)``). Stops early when ``||r|| <= tol ||rhs||``, and
    keeps the last finite iterate if the series diverges to inf.

    Options: ``alpha`` (default 1.0), ``maxiter`` (K, default 10), ``tol``.

    Reference: Agarwal, Bullins & Hazan (2017), LiSSA; Lorraine et al. (2020).
    """

    alpha: float = option(1.0, gt=0, doc="step of the series")
    maxiter: int = option(10, ge=1, doc="number of terms K")
    tol: float = option(1e-5, ge=0, doc="stop when ||r|| <= tol ||rhs||")

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        matvec = _matvec(op, lam)
        m_inv = precond or _identity
        bb = tree.vdot(rhs, rhs)
        thresh = jnp.asarray(self.tol, bb.dtype) ** 2 * bb
        alpha = self.alpha

        def cond(c: tuple) -> Array:
            i, _, _, rr, stop = c
            return (i < self.maxiter) & (rr > thresh) & ~stop

        def body(c: tuple) -> tuple:
            i, s, r, rr, _ = c
            z = m_inv(r)
            az = matvec(z)
            s_new = _comb((1, s), (alpha, z))
            r_new = _comb((1, r), (-alpha, az))
            rr_new = tree.vdot(r_new, r_new)
            ok = jnp.isfinite(rr_new) & tree.all_finite(s_new)
            return (
                i + 1,
                tree.where(ok, s_new, s),
                tree.where(ok, r_new, r),
                jnp.where(ok, rr_new, rr),
                ~ok,
            )

        init = (jnp.asarray(0, jnp.int32), tree.zeros_like(rhs), rhs, bb, jnp.asarray(False))
        i, s, _, rr, _ = lax.while_loop(cond, body, init)
        return s, _info(i, _relative(rr, bb), rr <= thresh, bb.dtype), state


@declare(
    "steihaug",
    summary="Steihaug-Toint truncated CG inside a trust region of a given radius",
    requires={"tags": {SYMMETRIC}},
)
@attrs.frozen
class Steihaug(Solver):
    """Steihaug-Toint truncated CG: ``min -rhs.s + s.As/2`` subject to ``||s|| <= radius``.

    CG from ``s = 0`` on ``A = C + lam I``; stops at the first of: ``||r|| <= tol
    ||rhs||``; negative curvature ``d.Ad <= 0`` (then it moves along ``d`` to the
    boundary); an iterate leaving the trust region (then it stops on the boundary,
    ``s + tau d`` with ``||s + tau d|| = radius, tau >= 0``); ``maxiter``. The trust
    region is Euclidean and the preconditioner is not used (the monotone growth of
    ``||s||`` that the method relies on holds for plain CG). One matvec per iteration.

    Options: ``radius`` (trust-region radius, default 1.0), ``tol``, ``maxiter``.

    Reference: Steihaug (1983), SIAM J. Numer. Anal. 20(3); Nocedal & Wright (2006),
    Algorithm 7.2.
    """

    radius: float = option(1.0, gt=0, doc="trust-region radius")
    tol: float = option(1e-5, ge=0, doc="stop when ||r|| <= tol ||rhs||")
    maxiter: int = option(50, ge=1, doc="at most this many iterations (matvecs)")

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        matvec = _matvec(op, lam)
        bb = tree.vdot(rhs, rhs)
        dt = bb.dtype
        thresh = jnp.asarray(self.tol, dt) ** 2 * bb
        radius2 = jnp.asarray(self.radius, dt) ** 2

        def to_boundary(z: PyTree, d: PyTree) -> Array:
            a = tree.vdot(d, d)
            half_b = tree.vdot(z, d)
            c = tree.vdot(z, z) - radius2
            disc = jnp.sqrt(jnp.maximum(half_b**2 - a * c, 0))
            return _safe_div(-half_b + disc, a)

        def cond(c: tuple) -> Array:
            i, _, _, _, rr, stop = c
            return (i < self.maxiter) & (rr > thresh) & ~stop

        def body(c: tuple) -> tuple:
            i, z, r, d, rr, _ = c
            ad = matvec(d)
            dad = tree.vdot(d, ad)
            alpha = _safe_div(rr, dad)
            z_new = _comb((1, z), (alpha, d))
            boundary = ~(dad > 0) | (tree.vdot(z_new, z_new) >= radius2)
            tau = jnp.where(boundary, to_boundary(z, d), alpha)
            z_new = _comb((1, z), (tau, d))
            r_new = _comb((1, r), (-tau, ad))
            rr_new = tree.vdot(r_new, r_new)
            d_new = _comb((1, r_new), (_safe_div(rr_new, rr), d))
            return i + 1, z_new, r_new, d_new, rr_new, boundary

        zeros = tree.zeros_like(rhs)
        init = (jnp.asarray(0, jnp.int32), zeros, rhs, rhs, bb, jnp.asarray(False))
        i, s, _, _, rr, _ = lax.while_loop(cond, body, init)
        return s, _info(i, _relative(rr, bb), rr <= thresh, dt), state
