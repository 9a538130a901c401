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
* ``converged`` (bool): ``residual <= tol``; for ``cg``: its stopping rule was met
  (see :class:`CG`); for ``direct`` and ``identity``: the direction is finite.
  ``auto`` reports what the solve it chose reports.

``residual`` and ``converged`` always refer to the system the user asked to solve,
``(C + lam I) s = rhs`` in parameter space, never to an inner system: the row-space
solvers (``row_cholesky``, ``row_cg``) report ``||U^T rho|| / (lam ||rhs||)``, the
exact parameter-space residual of their row-space residual ``rho``, and ``row_cg``
stops on it.

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
from typing import Any, ClassVar, NamedTuple

import attrs

from somax_plug import (
    PSD,
    ROW_SPACE,
    SYMMETRIC,
    Choices,
    CompositionError,
    InputError,
    LinearOperator,
    OptionError,
    Solver,
    SolverInfo,
    choices_field,
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
    "Auto",
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


def _zeros_f32(params: PyTree) -> PyTree:
    """Zeros like ``params``, float32 at least (a solver's running state)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.zeros(jnp.shape(x), jnp.result_type(jnp.result_type(x), jnp.float32)),
        params,
    )


def _matvec(op: LinearOperator, lam: Array) -> Callable[[PyTree], PyTree]:
    return lambda v: damped_mv(op, lam, v)


class _CGResult(NamedTuple):
    """What :func:`_pcg` returns (``rr``, ``bb``: squared norms of ``r`` and ``b``)."""

    x: PyTree
    r: PyTree
    rr: Array
    iterations: Array
    bb: Array
    progress_met: Array


def _same(c: Any) -> Any:
    return c


def run_loop(
    cond: Callable[[Any], Array],
    body: Callable[[Any], Any],
    init: Any,
    maxiter: int,
    form: str = "while",
    unroll: int = 1,
    body_at: Callable[[int], Callable[[Any], Any]] | None = None,
) -> Any:
    """``while cond(c): c = body(c)``, at most ``maxiter`` times, in one of three loop forms.

    ``body`` must count its iterations in the carry and ``cond`` must be False once
    ``maxiter`` are done (as a ``lax.while_loop`` needs). The forms give the same
    carry (the same iterates and count, up to XLA's fusion choices) and differ in
    what XLA compiles and in the work they do after ``cond`` fails:

    * ``"while"``: ``lax.while_loop``; stops as soon as ``cond`` fails.
    * ``"scan"``: a fixed-length ``lax.scan`` of ``maxiter`` steps, each a ``lax.cond``
      that skips the body once ``cond`` fails (a skipped step still copies the
      carry); ``unroll`` is ``lax.scan``'s partial unrolling.
    * ``"unroll"``: ``maxiter`` copies of the body in straight-line code, each masked
      (``tree.where(cond(c), body(c), c)``): no loop and no conditional for XLA to
      compile around the body, so all ``maxiter`` bodies run, and those after
      ``cond`` fails are discarded. XLA's CPU backend compiles a convolution inside
      any loop body or conditional branch without its fast layout (measured ~4x
      slower; ``docs/howto/krylov-solvers.md``), which is why this form exists.
      ``body_at(j)``, if given, is the body specialised to iteration ``j`` (a static
      index), used by this form instead of ``body``.
    """
    if form == "while":
        return lax.while_loop(cond, body, init)
    if form == "scan":

        def step(c: Any, _: Any) -> tuple[Any, None]:
            return lax.cond(cond(c), body, _same, c), None

        return lax.scan(step, init, None, length=maxiter, unroll=unroll)[0]
    if form != "unroll":
        raise ValueError(f"unknown loop form {form!r}; use 'while', 'scan' or 'unroll'")
    c = init
    for t in range(maxiter):  # copy t runs iteration t + 1 (it is discarded otherwise)
        c = tree.where(cond(c), (body if body_at is None else body_at(t + 1))(c), c)
    return c


def _pcg(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree | None,
    precond: Callable[[PyTree], PyTree],
    tol: Any,
    maxiter: int,
    guard: bool,
    loop: str = "while",
    unroll: int = 1,
    progress_eps: float | None = None,
) -> _CGResult:
    """Preconditioned CG (see :class:`CG`); ``tol`` may be a traced scalar.

    One matvec per iteration; none for the initial residual unless ``x0`` is given
    and nonzero (checked at run time with ``lax.cond``). With ``guard``, a direction
    with ``p.Ap <= 0`` (or NaN) stops the loop: the last iterate is kept, or on the
    first iteration ``x0 + M r0`` (the preconditioned rhs direction) is returned.

    With ``progress_eps`` the loop also stops on Martens' relative-progress test of
    the quadratic model ``phi(x) = x.Ax/2 - b.x``, evaluated without a matvec as
    ``phi(x) = -x.(r + b)/2`` (``Ax = b - r``): at iteration ``i > k`` with
    ``k = max(10, floor(i/10))``, stop when ``phi_i < 0`` and
    ``(phi_i - phi_{i-k}) / phi_i < k * eps``. The values ``phi_0..phi_maxiter`` are
    kept in a fixed-shape buffer in the carry.
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
    thresh = jnp.asarray(tol, bb.dtype) ** 2 * bb
    track = progress_eps is not None

    def phi(x: PyTree, r: PyTree) -> Array:
        return (-0.5 * tree.vdot(x, tree.add(r, b))).astype(bb.dtype)

    def cond(c: dict) -> Array:
        go = (c["i"] < maxiter) & (c["rr"] > thresh) & ~c["stop"]
        return go & ~c["met"] if track else go

    def body(c: dict, step: int | None = None) -> dict:
        i, x, r, p, rz = c["i"], c["x"], c["r"], c["p"], c["rz"]
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
        out = {
            "i": i + 1,
            "x": x_new,
            "r": r_new,
            "p": p_new,
            "rz": rz_new,
            "rr": tree.vdot(r_new, r_new),
            "stop": bad,
        }
        if track:
            phi_j = phi(x_new, r_new)
            if step is None:  # j = i + 1 traced: dynamic slices
                j = i + 1
                k = jnp.maximum(10, j // 10)
                phis = c["phi"].at[j].set(phi_j)
                before = phis[jnp.maximum(j - k, 0)]
            else:  # unrolled copy of iteration ``step``: static slices (linear compile time)
                j, k = step, max(10, step // 10)
                phis = c["phi"].at[j].set(phi_j)
                before = phis[max(j - k, 0)]
            eps = jnp.asarray(progress_eps, bb.dtype)
            kf = jnp.asarray(k, bb.dtype)
            # (phi_j - phi_{j-k}) / phi_j < k eps, multiplied by phi_j < 0
            out["met"] = (j > k) & (phi_j < 0) & (phi_j - before > kf * eps * phi_j)
            out["phi"] = phis
        return out

    init = {
        "i": jnp.asarray(0, jnp.int32),
        "x": x,
        "r": r,
        "p": z,
        "rz": tree.vdot(r, z),
        "rr": tree.vdot(r, r),
        "stop": jnp.asarray(False),
    }
    if track:
        init["met"] = jnp.asarray(False)
        init["phi"] = jnp.zeros((maxiter + 1,), bb.dtype).at[0].set(phi(x, r))
    out = run_loop(cond, body, init, maxiter, loop, unroll,
                   body_at=lambda j: lambda c: body(c, j))
    met = out["met"] if track else jnp.asarray(False)
    return _CGResult(out["x"], out["r"], out["rr"], out["i"], bb, met)


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
    """``G = U U^T`` (R x R): the rows ``U^T e_r`` by vmapping ``rmatvec``, then one matmul.

    R transposed products and an ``R x n`` matrix (which vmapping ``matvec o rmatvec``
    held too, as the intermediate), instead of R products of both kinds: XLA's CPU
    backend runs a ``matvec`` (a jvp) batched over R tangents up to ~50x slower than R
    transposed products at R = 560 (the Krylov benchmark, ``benchmarks/bench_krylov.py``).
    """
    eye = jnp.eye(factors.num_rows, dtype=dtype)
    # an rmatvec may build its stacked rows itself (canonical reductions: row by row)
    rows = getattr(factors.rmatvec, "map_rows", None) or jax.vmap(factors.rmatvec)
    cols = jax.tree_util.tree_leaves(rows(eye))
    u = jnp.concatenate([jnp.reshape(c, (factors.num_rows, -1)).astype(dtype) for c in cols], 1)
    return u @ u.T


# --------------------------------------------------------------------------- solvers


LOOPS = ("auto", "while", "scan", "unroll")
"""Loop forms of :class:`CG` (see :func:`run_loop`)."""
STOPS = ("residual", "eisenstat_walker", "martens")
"""Stopping rules of :class:`CG`."""
MARTENS_MAXITER = 100_000
"""The largest ``maxiter`` of ``cg`` with ``stop="martens"`` (its buffer of model values)."""
UNROLL_MAXITER = 1_000
"""The largest ``maxiter`` of ``cg`` with ``loop="unroll"`` (trace and compile time)."""
CONVOLUTIONS = frozenset({"conv_general_dilated"})
"""Primitives that make ``loop="auto"`` unroll on CPU (see :meth:`CG.choose_loop`)."""


def primitives_of(fn: Callable[[PyTree], Any], x: PyTree) -> frozenset[str]:
    """The primitive names in ``jax.make_jaxpr(fn)(x)``, sub-jaxprs included (trace only)."""
    seen: set[str] = set()

    def walk(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            seen.add(eqn.primitive.name)
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(x).jaxpr)
    return frozenset(seen)


def _static_float(x: Any) -> float | None:
    """``float(x)`` when ``x`` is known while tracing (a Python or concrete value), else None."""
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None




@declare(
    "cg",
    summary="(preconditioned) CG: negative-curvature guard, adaptive stopping, loop forms",
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
    state is zero). Exactly one matvec per iteration, whatever the stopping rule;
    ``info.iterations`` counts them (the ``"unroll"`` loop form runs all ``maxiter``
    products and discards those after the stop, see below).

    Stopping rules (``stop``), each also bounded by ``maxiter`` and the guard:

    * ``"residual"``: ``||r|| <= tol ||rhs||``.
    * ``"eisenstat_walker"``: ``||r|| <= eta_k ||rhs||`` with the forcing term of
      Eisenstat & Walker (1996), choice 2, from the ratio of successive right-hand
      side (gradient) norms::

          eta_k = gamma (||g_k|| / ||g_{k-1}||)^alpha
          eta_k = max(eta_k, gamma eta_{k-1}^alpha)   if gamma eta_{k-1}^alpha > 0.1
          eta_k = min(forcing_max, max(tol, eta_k));  eta_0 = min(0.5, forcing_max)

      The state keeps ``||g_{k-1}||`` and ``eta_{k-1}`` (two scalars); a rejected
      step keeps the old ones. On minibatches the ratio is noisy (each gradient is
      of another batch): the rule then mostly sits at its bounds.
    * ``"martens"``: Martens' (2010, sec. 4.4) relative progress of the quadratic
      model ``phi(s) = s.As/2 - rhs.s``: stop at iteration ``i > k``,
      ``k = max(10, floor(i/10))``, when ``phi_i < 0`` and
      ``(phi_i - phi_{i-k}) / phi_i < k * progress_eps``. ``phi_i = -s_i.(r_i + rhs)/2``
      costs two dot products and no matvec. ``||r|| <= tol ||rhs||`` still stops it
      (``tol=0`` leaves Martens' test alone).

    ``info.converged`` is True when the rule in effect was met (the residual below
    its tolerance, or Martens' test).

    Loop forms (``loop``; all give the same iterates and iteration count, see
    :func:`run_loop`): ``"while"`` (``lax.while_loop``, stops earliest), ``"scan"``
    (fixed-length ``lax.scan`` skipping converged iterations with ``lax.cond``),
    ``"unroll"`` (straight-line code: ``maxiter`` masked copies of the iteration, all
    of whose products run) and ``"auto"``, decided when the step is traced
    (:meth:`choose_loop`): ``"unroll"`` on the CPU backend when the curvature product
    contains a convolution and ``maxiter <= unroll_max``, else ``"while"``. Measured
    on CPU (jax 0.10, ``docs/howto/krylov-solvers.md``): a conv net's GGN products
    inside any XLA loop or conditional (while, fori, scan, partially unrolled scan,
    ``lax.cond``) run 3-4x slower than the same products in straight-line code,
    because XLA's CPU backend compiles those convolutions without its fast layout;
    an MLP's products cost the same in every form, so ``"while"`` (which does no
    work after the stop) is the better choice there. ``"unroll"`` pays in compile
    time (about ``maxiter`` times the product's) and in the products it runs after
    the stop: it wins whenever CG runs more than a quarter of ``maxiter``.

    Options:
        tol: stop when ``||r|| <= tol ||rhs||`` (the floor of the forcing term).
        maxiter: at most this many iterations (matvecs).
        warm_start: start from the previous solution (state ``{"x": pytree}``). Off by
            default: on minibatches the previous solution solves another system and
            may be a worse start than zero, and it costs one matvec.
        negative_curvature: ``"guard"`` stops on ``p.(C + lam I)p <= 0`` and returns
            the last good iterate, or the preconditioned rhs direction ``M^-1 rhs``
            if it happens on the first iteration (never NaN); needs only a symmetric
            operator. ``"none"`` is textbook CG and needs a psd operator.
        stop, forcing_gamma, forcing_alpha, forcing_max, progress_eps: the stopping
            rule and its constants (above).
        loop, unroll, unroll_max: the loop form; ``unroll`` is ``lax.scan``'s
            partial unrolling (``loop="scan"``); ``unroll_max`` bounds ``"auto"``.

    ``maxiter`` is an int32 (checked); with ``stop="martens"`` it is at most
    :data:`MARTENS_MAXITER` and with ``loop="unroll"`` at most
    :data:`UNROLL_MAXITER` (``OptionError`` at compose time).

    Reference: Hestenes & Stiefel (1952); the guard and the progress test as in
    Martens (2010), "Deep learning via Hessian-free optimization", sec. 4;
    Eisenstat & Walker (1996), "Choosing the forcing terms in an inexact Newton
    method", SIAM J. Sci. Comput. 17(1).
    """

    tol: float = option(1e-5, ge=0, doc="stop when ||r|| <= tol ||rhs||")
    maxiter: int = option(50, ge=1, doc="at most this many iterations (matvecs)")
    warm_start: bool = option(
        False, doc="start from the previous solution (off: unsafe on minibatches, one matvec)"
    )
    negative_curvature: str = option(
        "guard", choices=("guard", "none"), doc="'guard' stops on p.Ap <= 0; 'none' needs psd"
    )
    stop: str = option(
        "residual", choices=STOPS, doc="stopping rule: fixed tol, Eisenstat-Walker, or Martens"
    )
    forcing_gamma: float = option(0.9, gt=0, le=1, doc="Eisenstat-Walker gamma")
    forcing_alpha: float = option(2.0, gt=1, le=2, doc="Eisenstat-Walker exponent alpha")
    forcing_max: float = option(0.9, gt=0, lt=1, doc="largest Eisenstat-Walker forcing term")
    progress_eps: float = option(5e-4, gt=0, doc="Martens' relative-progress epsilon")
    loop: str = option("auto", choices=LOOPS, doc="loop form; 'auto' decides at trace time")
    unroll: int = option(1, ge=1, doc="lax.scan's partial unrolling (loop='scan')")
    unroll_max: int = option(16, ge=1, doc="'auto' unrolls only when maxiter <= unroll_max")
    _choices: Choices = choices_field()

    def __attrs_post_init__(self) -> None:
        limits = (
            ("stop", "martens", MARTENS_MAXITER, "keeps maxiter + 1 model values in the carry"),
            ("loop", "unroll", UNROLL_MAXITER, "traces maxiter copies of the iteration"),
        )
        for name, value, limit, why in limits:
            if getattr(self, name) == value and self.maxiter > limit:
                raise OptionError(
                    f"solver 'cg': maxiter = {self.maxiter} is too large with {name}="
                    f"{value!r}, which {why}; use maxiter <= {limit}, or {name}="
                    f"{'residual' if name == 'stop' else 'while'!r}"
                )

    def init(self, params: PyTree) -> PyTree:
        state: dict[str, Any] = {}
        if self.warm_start:
            state["x"] = tree.zeros_like(params)
        if self.stop == "eisenstat_walker":
            dt = tree.accum_dtype(params)
            state["forcing"] = {
                "gnorm": jnp.zeros((), dt),
                "eta": jnp.asarray(min(0.5, self.forcing_max), dt),
            }
        return state or ()

    # ------------------------------------------------------------ trace time
    @property
    def deferred_rule(self) -> str:
        """What is decided when the step is traced (empty when nothing is)."""
        if self.loop != "auto":
            return ""
        return (
            f"loop form: 'unroll' on the CPU backend when the curvature product contains a "
            f"convolution and maxiter <= {self.unroll_max}, else 'while'"
        )

    def recorded_choices(self) -> list[str]:
        """The decisions made while tracing, with their reasons (see ``Method.explain``)."""
        return list(self._choices)

    def choose_loop(self, matvec: Callable[[PyTree], PyTree], rhs: PyTree) -> tuple[str, str]:
        """``(form, reason)`` for this solve; ``loop="auto"`` traces one product to decide."""
        if self.loop != "auto":
            return self.loop, "given"
        backend = jax.default_backend()
        if backend != "cpu":
            return "while", f"the {backend} backend (the loop penalty was measured on CPU)"
        conv = sorted(primitives_of(matvec, rhs) & CONVOLUTIONS)
        if not conv:
            return "while", "no convolution in the product: every form costs the same on CPU"
        if self.maxiter > self.unroll_max:
            return "while", (
                f"the product contains {', '.join(conv)}, but maxiter = {self.maxiter} > "
                f"unroll_max = {self.unroll_max} (compile time)"
            )
        return "unroll", (
            f"the product contains {', '.join(conv)}, which XLA's CPU backend runs 3-4x "
            f"slower inside a loop; maxiter = {self.maxiter} <= unroll_max = {self.unroll_max}"
        )

    def forcing_term(self, bb: Array, forcing: dict) -> tuple[Array, dict]:
        """Eisenstat-Walker ``eta_k`` from ``||rhs||^2 = bb`` and the state; the new state."""
        dt = bb.dtype
        gnorm = jnp.sqrt(bb)
        prev = jnp.asarray(forcing["gnorm"]).astype(dt)
        eta_prev = jnp.asarray(forcing["eta"]).astype(dt)
        gamma, alpha = self.forcing_gamma, self.forcing_alpha
        eta = gamma * _safe_div(gnorm, prev) ** alpha
        guard = gamma * eta_prev**alpha
        eta = jnp.where(guard > 0.1, jnp.maximum(eta, guard), eta)
        eta = jnp.where(prev > 0, eta, jnp.asarray(min(0.5, self.forcing_max), dt))
        eta = jnp.minimum(jnp.maximum(eta, jnp.asarray(self.tol, dt)), self.forcing_max)
        new = {
            "gnorm": gnorm.astype(jnp.result_type(forcing["gnorm"])),
            "eta": eta.astype(jnp.result_type(forcing["eta"])),
        }
        return eta, new

    # ----------------------------------------------------------------- solve
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
        x0 = tree.cast_like(state["x"], rhs) if self.warm_start else None
        tol: Any = self.tol
        new_state: dict[str, Any] = {}
        if self.stop == "eisenstat_walker":
            tol, new_state["forcing"] = self.forcing_term(tree.vdot(rhs, rhs), state["forcing"])
        form, reason = self.choose_loop(matvec, rhs)
        if self.loop == "auto":
            self._choices.add(f"cg loop -> {form}: {reason}")
        res = _pcg(
            matvec,
            rhs,
            x0,
            precond or _identity,
            tol,
            self.maxiter,
            self.negative_curvature == "guard",
            loop=form,
            unroll=self.unroll,
            progress_eps=self.progress_eps if self.stop == "martens" else None,
        )
        thresh = jnp.asarray(tol, res.bb.dtype) ** 2 * res.bb
        converged = (res.rr <= thresh) | res.progress_met
        info = _info(res.iterations, _relative(res.rr, res.bb), converged, res.bb.dtype)
        if self.warm_start:
            x = res.x
            keep = tree.where(tree.all_finite(x), x, tree.zeros_like(x))
            new_state["x"] = tree.cast_like(keep, state["x"])
        return res.x, info, {**state, **new_state} if new_state else state


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
    needs_positive_lam: ClassVar[bool] = True

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
    """``s = (rhs - U^T c) / lam`` and the residual ``-U^T rho / lam``.

    A difference, then a division: no multiply feeding an add, so XLA's CPU backend
    (which contracts such pairs into FMAs wherever a fusion allows) rounds it the
    same in every program (canonical reductions: bitwise on 1, 2 and 4 devices).
    """
    s = jax.tree_util.tree_map(
        lambda b, u: (b - u.astype(b.dtype)) / lam.astype(b.dtype), rhs, factors.rmatvec(c)
    )
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

    CG on ``(lam I + U U^T) c = U rhs`` in R dimensions, then
    ``s = (rhs - U^T c) / lam``. The parameter-space residual of the system the user
    asked to solve is, exactly, ``rhs - (C + lam I) s = -U^T rho / lam`` with ``rho``
    the row-space residual, so the loop carries ``t = U^T rho`` and ``w = U^T p``
    alongside the row-space iterates (``U^T`` is linear: ``t' = t - alpha (lam w +
    U^T U w)``, ``w' = t' + beta w``) and also ``U^T c``, which gives ``s`` with no
    final product. Each iteration costs one ``matvec`` (``U w``) and one ``rmatvec``
    (``U^T (U w)``), counted as one iteration; the start costs one ``rmatvec``.

    The loop stops, and ``converged`` is True, when the parameter-space residual
    ``||U^T rho|| / (lam ||rhs||) <= tol``: the same ``tol``, ``residual`` and
    ``converged`` as :class:`CG` on ``(C + lam I) s = rhs``, whatever ``||U||^2 / lam``
    (by which the row-space residual can differ). Like CG's, the residual is the
    recursively updated one (equal to the true one in exact arithmetic). Requires
    ``lam > 0`` (refused at compose time for a damping that can reach 0); the
    preconditioner is not used.

    Options: ``tol``, ``maxiter``.
    """

    tol: float = option(1e-5, ge=0, doc="stop when ||rhs - (C + lam I) s|| <= tol ||rhs||")
    maxiter: int = option(50, ge=1, doc="at most this many CG iterations")
    needs_positive_lam: ClassVar[bool] = True

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
        bb = tree.vdot(rhs, rhs)
        acc = bb.dtype

        def up(r: Array) -> PyTree:  # U^T r, in the accumulation dtype
            return jax.tree_util.tree_map(lambda x: x.astype(acc), factors.rmatvec(r))

        t0 = up(ub)  # U^T rho_0 (rho_0 = U rhs, c_0 = 0)
        thresh = (jnp.asarray(self.tol, acc) * lam_.astype(acc)) ** 2 * bb

        def cond(c: dict) -> Array:
            return (c["i"] < self.maxiter) & (c["tt"] > thresh) & ~c["stop"]

        def body(c: dict) -> dict:
            v = jnp.ravel(factors.matvec(tree.cast_like(c["w"], rhs))).astype(dt)  # U U^T p
            q = lam_ * c["p"] + v  # (lam I + U U^T) p
            pq = jnp.vdot(c["p"], q)
            alpha = _safe_div(c["rr"], pq)
            rho = c["rho"] - alpha * q
            uv = up(v)  # U^T U U^T p = C w
            t = _comb((1, c["t"]), (-alpha * lam_, c["w"]), (-alpha, uv))
            rr = jnp.vdot(rho, rho)
            beta = _safe_div(rr, c["rr"])
            return {
                "i": c["i"] + 1,
                "c": c["c"] + alpha * c["p"],
                "utc": _comb((1, c["utc"]), (alpha, c["w"])),
                "rho": rho,
                "p": rho + beta * c["p"],
                "t": t,
                "w": _comb((1, t), (beta, c["w"])),
                "rr": rr,
                "tt": tree.vdot(t, t),
                "stop": ~(pq > 0),
            }

        init = {
            "i": jnp.asarray(0, jnp.int32),
            "c": jnp.zeros_like(ub),
            "utc": tree.zeros_like(t0),
            "rho": ub,
            "p": ub,
            "t": t0,
            "w": t0,
            "rr": jnp.vdot(ub, ub),
            "tt": tree.vdot(t0, t0),
            "stop": jnp.asarray(False),
        }
        out = lax.while_loop(cond, body, init)
        inv = 1 / lam_.astype(acc)
        s = jax.tree_util.tree_map(
            lambda b, u: ((b.astype(acc) - u) * inv).astype(b.dtype), rhs, out["utc"]
        )
        tt = out["tt"] / lam_.astype(acc) ** 2
        info = _info(out["i"], _relative(tt, bb), out["tt"] <= thresh, acc)
        return s, info, state


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
    summary="first-order baseline: precond(m), m = rhs or its EMA (momentum)",
    preconditioned=True,
)
@attrs.frozen
class Identity(Solver):
    """The first-order baseline: ``s = precond(m)`` (or ``m``); no operator use.

    ``m = rhs``, or with ``momentum = beta`` an exponential moving average of the
    right-hand side kept in the solver state, taken before the preconditioner::

        m_t = beta m_{t-1} + (1 - beta) rhs_t,   m_hat = m_t / (1 - beta^t)

    (``bias_correction=True``, the default; else ``m_hat = m_t``), t the number of
    solves so far. With a ``diag_ema`` preconditioner this is how the Sophia
    (``clip(m / max(gamma h, eps))``) and AdaHessian (``m_hat / (sqrt(v_hat) + eps)``)
    presets apply their diagonal. A rejected step rolls the state back with the
    others, so ``m`` only sees accepted steps.

    Reports ``iterations = 1``, ``residual = NaN`` (computing it would cost a matvec)
    and ``converged`` = the direction is finite. State: ``()``, or with momentum
    ``{"m": pytree (float32 at least), "count": int32}``.

    Options: ``momentum`` (None: off), ``bias_correction`` (True).
    """

    momentum: float | None = option(
        None, ge=0, lt=1, doc="EMA decay of the rhs before the preconditioner (None: off)"
    )
    bias_correction: bool = option(True, doc="divide the momentum by 1 - beta^t")

    def init(self, params: PyTree) -> PyTree:
        if self.momentum is None:
            return ()
        return {"m": _zeros_f32(params), "count": jnp.zeros((), jnp.int32)}

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        dt = tree.accum_dtype(rhs)
        if self.momentum is None:
            s = precond(rhs) if precond is not None else rhs
            return s, _info(1, jnp.nan, tree.all_finite(s), dt), state
        beta = self.momentum
        m = jax.tree_util.tree_map(
            lambda g, t: (1 - beta) * g.astype(t.dtype) + beta * t, rhs, state["m"]
        )
        count = state["count"] + 1
        m_hat = m
        if self.bias_correction:
            corr = 1 - beta**count
            m_hat = jax.tree_util.tree_map(lambda t: t / corr.astype(t.dtype), m)
        s = precond(m_hat) if precond is not None else m_hat
        s = tree.cast_like(s, rhs)
        return s, _info(1, jnp.nan, tree.all_finite(s), dt), {"m": m, "count": count}


def _bilinear(op: LinearOperator, lam: Array,
              vectors: tuple = ()) -> Callable[[PyTree, PyTree], Array]:
    """``(x, y) -> x.(C + lam I) y``; from row factors ``U x . U y`` where the operator
    has them (a GGN: one JVP per vector, products cached; the row products of
    ``vectors`` in one batched JVP), else one ``mv`` per ``y``."""
    rf = op.row_factors()
    if rf is None:
        mv = _matvec(op, lam)
        cache: dict[int, PyTree] = {}

        def by_mv(x: PyTree, y: PyTree) -> Array:
            if id(y) not in cache:
                cache[id(y)] = (y, mv(y))
            return tree.vdot(x, cache[id(y)][1])

        return by_mv
    rows: dict[int, tuple[PyTree, Array]] = {}
    if len(vectors) > 1:
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *vectors)
        for v, r in zip(vectors, jax.vmap(rf.matvec)(stacked), strict=True):
            rows[id(v)] = (v, r)

    def row(v: PyTree) -> Array:
        if id(v) not in rows:
            rows[id(v)] = (v, rf.matvec(v))
        return rows[id(v)][1]

    def by_rows(x: PyTree, y: PyTree) -> Array:
        uxy = jnp.vdot(row(x), row(y))
        return uxy + jnp.asarray(lam, uxy.dtype) * tree.vdot(x, y)

    return by_rows


@declare(
    "model_step",
    summary="precond(rhs) rescaled, plus momentum, by the damped quadratic model "
    "(KFAC's update, Martens & Grosse 2015 sec. 7)",
    requires={"tags": {PSD}},
    preconditioned=True,
)
@attrs.frozen
class ModelStep(Solver):
    """KFAC's re-scaling and momentum: the best step in ``span{d, p}`` under the model.

    ``d = precond(rhs)`` (or ``rhs``), ``p`` the previous accepted step (solver state),
    ``A = C + lam I`` (the operator's damped product, factored for ``kfac`` with
    ``pi_damping``). The step ``s = alpha d + mu p`` minimises the damped quadratic
    model ``q(-s) = -rhs.s + s.A s / 2``::

        [d.Ad  d.Ap] [alpha]   [rhs.d]
        [p.Ad  p.Ap] [ mu  ] = [rhs.p]

    (with ``momentum=False``, or while ``p = 0`` or the system is singular, ``mu = 0``
    and ``alpha = rhs.d / d.Ad``). So the update ``-s`` never increases the model, which
    keeps a Levenberg-Marquardt damping's predicted decrease positive however stale
    the preconditioner is (an inverse computed every k steps with an older ``lam``).
    Two operator products per step (``A d``, ``A p``), or with an operator that has
    row factors (``C = U^T U``: the GGN) two row products ``U d``, ``U p`` (one JVP
    each, no transpose). Meant for ``learning_rate=1``:
    the scale is chosen here.

    Reports ``iterations = 2`` (products), ``residual = NaN`` (not computed) and
    ``converged`` = the step is finite. State: ``{"p": pytree (float32 at least)}``.

    Example:
        >>> import jax.numpy as jnp
        >>> from somax_plug import MatrixOperator
        >>> op = MatrixOperator(jnp.diag(jnp.array([1.0, 4.0])), jnp.zeros(2))
        >>> solver = ModelStep(momentum=False)
        >>> s, info, _ = solver.solve(op, jnp.array([1.0, 1.0]), 0.0, None, {},
        ...                           solver.init(jnp.zeros(2)))
        >>> [round(float(v), 3) for v in s]   # (2/5) * rhs: the model's minimum on rhs
        [0.4, 0.4]

    Reference: Martens & Grosse (2015), "Optimizing neural networks with
    Kronecker-factored approximate curvature", section 7.
    """

    momentum: bool = option(True, doc="combine with the previous step (KFAC momentum)")

    def init(self, params: PyTree) -> PyTree:
        return {"p": _zeros_f32(params)}

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        dt = tree.accum_dtype(rhs)
        d = tree.cast_like(precond(rhs) if precond is not None else rhs, rhs)
        p = tree.cast_like(state["p"], rhs)
        form = _bilinear(op, lam, (d, p) if self.momentum else ())
        tiny = jnp.finfo(dt).tiny
        dad, gd = form(d, d).astype(dt), tree.vdot(rhs, d).astype(dt)
        alpha1 = jnp.where(dad > tiny, gd / jnp.where(dad > tiny, dad, 1), 0)
        if self.momentum:
            pap, dap = form(p, p).astype(dt), form(d, p).astype(dt)
            gp = tree.vdot(rhs, p).astype(dt)
            det = dad * pap - dap * dap
            ok = (pap > tiny) & (det > 1e-6 * jnp.maximum(dad * pap, tiny))
            safe = jnp.where(ok, det, 1)
            alpha = jnp.where(ok, (pap * gd - dap * gp) / safe, alpha1)
            mu = jnp.where(ok, (dad * gp - dap * gd) / safe, 0)
            s = jax.tree_util.tree_map(
                lambda a, b: (alpha.astype(a.dtype) * a + mu.astype(a.dtype) * b), d, p)
        else:
            s = tree.scale(alpha1.astype(dt), d)
        s = tree.cast_like(s, rhs)
        new = {"p": jax.tree_util.tree_map(lambda x, o: x.astype(o.dtype), s, state["p"])}
        return s, _info(2 if self.momentum else 1, jnp.nan, tree.all_finite(s), dt), new


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


@declare(
    "auto",
    summary="chooses direct, row_cholesky / row_cg or cg from n, R and lam when traced",
    requires={"tags": {SYMMETRIC}},
)
@attrs.frozen
class Auto(Solver):
    """The solve chosen from the problem's shapes when the step is traced.

    Shapes are static under ``jit``, so the choice costs nothing at run time. With
    ``n`` the number of parameters and ``R`` the operator's rows (``R = B * K`` for a
    GGN: examples times outputs per example, from :meth:`~somax_plug.LinearOperator.row_factors`)::

        n <= dense_max                          -> direct  (n products, vmapped, and
                                                            an n x n Cholesky / eigh)
        row factors, R < n, lam > 0             -> row_cholesky if R <= row_cholesky_max
                                                   (R products, vmapped, R x R Cholesky),
                                                   else large_rows: cg (default) or
                                                   row_cg (CG on the R x R system)
        otherwise                               -> cg  (at most maxiter products)

    like lineax's ``AutoLinearSolver.select_solver``, which picks a solver from the
    operator's structure. The thresholds come from measurements on CPU
    (``docs/howto/krylov-solvers.md``): building a dense or a Gram matrix costs n or
    R products *batched* with ``vmap``, which XLA runs far less efficiently than the
    same number of sequential products (the work of R transposed products on a batch
    of B examples grows as R * B), so ``direct`` and ``row_cholesky`` pay off only
    below a few tens of parameters or rows (below the iterations CG would need);
    ``row_cg`` costs one product per iteration like ``cg`` but needs fewer iterations
    on the smaller system when R < n. The row-space solves divide by ``lam`` and need
    ``lam > 0``: when ``lam`` is known while tracing (a Python number or a constant)
    a ``lam <= 0`` picks ``cg``; when it is traced (a damping state, which is how
    every built-in damping hands it over) both solves are compiled and ``lax.cond``
    runs the row-space one when ``lam > 0`` and ``cg`` otherwise (under ``vmap``
    over ``lam`` both run).

    Requirements: a symmetric operator (``direct`` and guarded ``cg`` need no more);
    the row-space branch is taken only when the operator has row factors (tag
    ``row_space``, for example ``ggn`` and ``fisher``), so without them auto
    falls back to ``cg``. On a symmetric indefinite operator (``hessian``) the dense
    branch solves the stated system exactly, as ``direct`` does, while ``cg`` stops at
    negative curvature (its guard). No preconditioner: only the ``cg`` branch could
    apply one; compose ``cg`` itself to precondition. No state.

    The decision and its reason (for example ``auto -> row_cholesky: R = 20 rows <
    n = 300 parameters``) are recorded when the step is traced: ``method.explain()``
    prints them after the first step; ``plan.explain()`` prints the rule.

    Options:
        dense_max: the dense solve when ``n <= dense_max``.
        row_cholesky_max: ``row_cholesky`` up to this many rows, ``large_rows`` above.
        large_rows: ``"cg"`` (default) or ``"row_cg"`` when ``row_cholesky_max < R < n``.
            ``row_cg`` costs one product per iteration like ``cg``; measured on CPU it
            was slower (R = 100 over n = 241: 1.51 ms per step against 0.81; a CNN at
            R = 1,280: 1.45 s per step, inside the ``lax.cond`` on a traced ``lam``).
        tol, maxiter: of ``cg`` and ``row_cg`` (``tol`` also sets ``row_cholesky``'s
            ``converged``).
        loop: ``cg``'s loop form (see :class:`CG`).
    """

    dense_max: int = option(32, ge=0, doc="the dense solve when n <= dense_max")
    row_cholesky_max: int = option(32, ge=1, doc="row_cholesky up to this R; above: large_rows")
    large_rows: str = option(
        "cg", choices=("cg", "row_cg"), doc="the solve when row_cholesky_max < R < n"
    )
    tol: float = option(1e-5, ge=0, doc="tolerance of cg and row_cg")
    maxiter: int = option(50, ge=1, doc="iteration budget of cg and row_cg")
    loop: str = option("auto", choices=LOOPS, doc="cg's loop form")
    _choices: Choices = choices_field()

    def __attrs_post_init__(self) -> None:
        self._cg()  # its cg's options are checked when the composition is planned

    @property
    def deferred_rule(self) -> str:
        """The rule applied when the step is traced (printed by ``plan.explain()``)."""
        rule = (
            f"solver: 'direct' if n <= {self.dense_max}; else, if the operator has row "
            f"factors and R = B*K < n: 'row_cholesky' (R <= {self.row_cholesky_max}) or "
            f"'{self.large_rows}', when lam > 0 (a traced lam: lax.cond at run time, 'cg' "
            "when lam = 0); else 'cg'"
        )
        inner = self._cg().deferred_rule
        return f"{rule}; cg {inner}" if inner else rule

    def recorded_choices(self) -> list[str]:
        """The decisions made while tracing, with their reasons (see ``Method.explain``)."""
        return list(self._choices)

    def choose(self, n: int, rows: int | None, lam: float | None) -> tuple[str, str]:
        """``(solver, reason)`` for ``n`` parameters, ``rows`` (None: no row factors) and
        ``lam`` (None: traced, decided at run time)."""
        if n <= self.dense_max:
            return "direct", f"n = {n} parameters <= dense_max = {self.dense_max}"
        big = f"n = {n} parameters > dense_max = {self.dense_max}"
        if rows is None:
            return "cg", f"{big} and the operator has no row factors"
        if rows >= n:
            return "cg", f"R = {rows} rows >= n = {n} parameters"
        why = f"R = {rows} rows < n = {n} parameters"
        if rows > self.row_cholesky_max and self.large_rows == "cg":
            return "cg", (f"{why}, but R > row_cholesky_max = {self.row_cholesky_max}: "
                          "row_cg costs a product per iteration like cg and measured slower "
                          "(large_rows='row_cg' to use it)")
        row = "row_cholesky" if rows <= self.row_cholesky_max else "row_cg"
        if row == "row_cg":
            why += f", R > row_cholesky_max = {self.row_cholesky_max}"
        if lam is None:
            return f"{row} if lam > 0 else cg", f"{why}; lam is traced: lax.cond at run time"
        if not lam > 0:
            return "cg", f"{why}, but lam = {lam:g} and the row-space solve needs lam > 0"
        return row, why

    def _cg(self) -> CG:
        return CG(tol=self.tol, maxiter=self.maxiter, loop=self.loop)

    def solve(
        self,
        op: LinearOperator,
        rhs: PyTree,
        lam: Array,
        precond: Any,
        stats: Stats,
        state: PyTree,
    ) -> tuple[PyTree, SolverInfo, PyTree]:
        n = tree.size(rhs)
        factors = op.row_factors()
        rows = None if factors is None else int(factors.num_rows)
        lam_static = _static_float(lam)
        choice, reason = self.choose(n, rows, lam_static)
        self._choices.add(f"auto -> {choice}: {reason}")
        if choice == "direct":
            return Direct(max_size=max(n, 1)).solve(op, rhs, lam, None, stats, state)
        cg = self._cg()

        def run_cg() -> tuple[PyTree, SolverInfo]:
            s, info, _ = cg.solve(op, rhs, lam, None, stats, ())
            return tree.cast_like(s, rhs), info

        if choice == "cg":
            out = run_cg()
        else:
            row: Solver = (
                RowCholesky(tol=self.tol)
                if choice.startswith("row_cholesky")
                else RowCG(tol=self.tol, maxiter=self.maxiter)
            )

            def run_row() -> tuple[PyTree, SolverInfo]:
                s, info, _ = row.solve(op, rhs, lam, None, stats, ())
                return tree.cast_like(s, rhs), info

            out = run_row() if lam_static is not None else lax.cond(lam > 0, run_row, run_cg)
        for text in cg.recorded_choices():
            self._choices.add(text)
        return out[0], out[1], state
