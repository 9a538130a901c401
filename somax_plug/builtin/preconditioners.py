"""Built-in preconditioners: a state and an application of ``M^-1``.

``update(res, stats, lam, key, state)`` refreshes the state at the component's
cadence (the planner wraps it in ``lax.cond``); ``apply(state, v, lam)`` runs at
every solve and is handed to the solver as ``precond(v)``. States are dicts of
fixed-shape arrays, so they run inside ``lax.scan``.

===============  ===================================================
preconditioner   ``M^-1 v``
===============  ===================================================
``identity``     ``v``
``jacobi``       ``v / max(d + lam, eps)``, ``d = diag`` (or |diag|)
``diag_ema``     ``clip(v / max(scale h_hat^power + lam, eps))``,
                 ``h`` an EMA of the diagonal (bias correction,
                 spatial averaging, refresh cadence, lag: options)
``nystrom``      ``U (L + lam)^-1 U^T v + (v - U U^T v)/(l_min + lam)``
                 from a rank-r randomized Nystrom sketch of C
===============  ===================================================

What each requires and its options are declared on its class (``@declare``).

Example:
    >>> import jax.numpy as jnp
    >>> from somax_plug.builtin.preconditioners import Jacobi
    >>> pre = Jacobi()
    >>> state = pre.update(None, {"diag": jnp.array([1.0, 3.0])}, 1.0, None, pre.init(jnp.zeros(2)))
    >>> pre.apply(state, jnp.array([2.0, 2.0]), 1.0).tolist()
    [1.0, 0.5]

References: Yao et al. (2021), AdaHessian; Liu et al. (2023), Sophia; Frangella,
Tropp & Udell (2023), "Randomized Nystrom preconditioning", SIAM J. Matrix Anal. Appl.
"""

from __future__ import annotations

from typing import Any

import attrs

from somax_plug import (
    PSD,
    CompositionError,
    InputError,
    OptionError,
    Preconditioner,
    declare,
    lazy_import,
    option,
    tree,
)

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")

Stats = dict[str, Any]

PyTree = Any
Array = Any

__all__ = ["DiagEMA", "Identity", "Jacobi", "Nystrom"]


def _diag_stat(name: str, stats: Stats) -> PyTree:
    if stats is None or "diag" not in stats:
        got = sorted(stats) if stats else []
        raise CompositionError(
            f"preconditioner {name!r} needs the statistic 'diag' from an estimator "
            f"(got statistics {got}); add an estimator that provides 'diag'."
        )
    return stats["diag"]


def _state_dtype(x: Array) -> Any:
    """Statistics are kept in float32 at least (a bf16 EMA would lose ``1 - beta``)."""
    return jnp.result_type(x.dtype, jnp.float32)


@declare("identity", summary="no preconditioning (M = I)")
@attrs.frozen
class Identity(Preconditioner):
    """``M = I``: ``apply`` returns ``v``. State: ``()``."""

    def init(self, params: PyTree) -> PyTree:
        return ()

    def apply(self, state: PyTree, v: PyTree, lam: Array) -> PyTree:
        return v


@declare(
    "jacobi",
    summary="Jacobi M = diag(|diag|) + lam, floored at eps",
    requires={"statistics": {"diag"}},
)
@attrs.frozen
class Jacobi(Preconditioner):
    """Jacobi (diagonal) preconditioner ``M = diag(d) + lam I``.

    ``M^-1 v = v / max(d + lam, eps)`` with ``d = |stats["diag"]|`` (``abs=True``,
    default, so that M is SPD even when a Hessian diagonal estimate has negative
    entries) or ``d = stats["diag"]``. The floor keeps M SPD, as CG needs. State:
    ``{"diag": pytree}`` (float32 at least), initialised to ones.

    Options: ``eps`` (default 1e-8), ``abs`` (default True).
    """

    eps: float = option(1e-8, gt=0, doc="floor of M")
    abs: bool = option(True, doc="use |diag| (keeps M SPD)")

    def init(self, params: PyTree) -> PyTree:
        return {
            "diag": jax.tree_util.tree_map(lambda x: jnp.ones(x.shape, _state_dtype(x)), params)
        }

    def update(self, res: Any, stats: Stats, lam: Array, key: Array, state: PyTree) -> PyTree:
        diag = _diag_stat("jacobi", stats)
        return {"diag": tree.cast_like(diag, state["diag"])}

    def apply(self, state: PyTree, v: PyTree, lam: Array) -> PyTree:
        def leaf(d: Array, x: Array) -> Array:
            d = jnp.abs(d) if self.abs else d
            m = jnp.maximum(d + jnp.asarray(lam).astype(d.dtype), jnp.asarray(self.eps, d.dtype))
            return (x / m).astype(x.dtype)

        return jax.tree_util.tree_map(leaf, state["diag"], v)


@declare(
    "diag_ema",
    summary="EMA of a diagonal, scaled, powered, floored and clipped (AdaHessian, Sophia)",
    requires={"statistics": {"diag"}},
)
@attrs.frozen
class DiagEMA(Preconditioner):
    """Exponential moving average of a diagonal statistic, as in AdaHessian and Sophia.

    At each refresh, with ``d = stats["diag"]``::

        a = |d| (abs=True) or d;  a = spatial_mean(a) (spatial_average);
        u = a^2 (square=True) or a
        h_t = beta h_{t-1} + (1 - beta) u_t,   h_hat = h_t / (1 - beta^t) (bias_correction)

    with t the number of refreshes so far, and at each solve::

        M^-1 v = clip(v / max(scale * sign(h_hat) |h_hat|^power + lam, eps))

    the clip elementwise to ``[-clip, clip]`` (``clip=None``: off).

    * ``spatial_average``: leaves of rank >= 3 are taken as convolution kernels and
      ``a`` is averaged over their spatial axes (``"hwio"``, flax's layout: all axes
      but the last two; ``"oihw"``, PyTorch's: all axes after the first two), as
      AdaHessian does; rank 0-2 leaves (dense weights, biases) are left alone.
    * ``refresh_every = n``: only every n-th ``update`` call folds the diagonal in
      (calls 0, n, 2n, ...; the others keep ``h`` and cost a ``lax.cond`` only). Use
      it with the preconditioner updated every step (``every_k=1``) and ``n`` = the
      estimator's ``every_k``, which ``lag`` needs.
    * ``lag=True`` (needs ``refresh_every >= 2``): the fold happens one call later
      (calls 1, n + 1, 2n + 1, ...), from the estimate the estimator still holds, so
      the step that computes a new estimate is preconditioned by the previous EMA:
      the order of ``optax.contrib.sophia`` (update with the old EMA, then refresh
      it), at no extra memory. With ``every_k=1, refresh_every=k`` and the estimator
      at ``every_k=k`` this is optax's Sophia exactly (the paper, and ``lag=False``,
      use the fresh estimate at once).

    The call counter is part of the state, so a rejected (rolled back) step does not
    advance it while the step count (which the estimator's cadence follows) does:
    after r rejected steps the fold comes r calls (mod n) after the estimate (still
    the latest one). With the constant damping of the presets only non-finite steps
    are rejected.

    Presets:

    * AdaHessian: ``square=True, power=0.5, bias_correction=True``, spatial averaging;
      its additive epsilon is the damping ``lam``.
    * Sophia: ``power=1, scale=gamma, clip=1, abs=False, bias_correction=False`` with a
      Hutchinson or Gauss-Newton-Bartlett diagonal and ``eps`` as its floor:
      ``clip(m / max(gamma h, eps), -1, 1)``; the solver ``identity`` (with momentum)
      applies it to the gradient EMA ``m``.

    Before the first refresh the state is zero and ``M^-1 v = clip(v / max(lam, eps))``.
    State: ``{"ema": pytree (float32 at least), "count": int32}`` (``count``: the
    refreshes so far), plus ``"calls"`` (int32) when ``refresh_every > 1``.

    Options: ``beta`` (0.99), ``power`` (1.0), ``scale`` (1.0), ``eps`` (1e-12),
    ``clip`` (None), ``abs`` (True), ``square`` (False), ``bias_correction`` (True),
    ``spatial_average`` ("none"), ``refresh_every`` (1), ``lag`` (False).
    """

    beta: float = option(0.99, ge=0, lt=1, doc="EMA decay")
    power: float = option(1.0, gt=0, doc="exponent of the averaged diagonal")
    eps: float = option(1e-12, gt=0, doc="floor of the denominator")
    clip: float | None = option(None, gt=0, doc="clip M^-1 v to [-clip, clip] (None: off)")
    abs: bool = option(True, doc="average |diag|")
    square: bool = option(False, doc="average diag^2 (AdaHessian)")
    scale: float = option(1.0, gt=0, doc="factor of the powered EMA in the denominator (gamma)")
    bias_correction: bool = option(True, doc="divide the EMA by 1 - beta^t (AdaHessian)")
    spatial_average: str = option(
        "none",
        choices=("none", "hwio", "oihw"),
        doc="average over the spatial axes of rank >= 3 leaves (conv kernels)",
    )
    refresh_every: int = option(1, ge=1, doc="fold the diagonal in on every n-th update only")
    lag: bool = option(False, doc="fold one update after the estimate (optax Sophia's order)")

    def __attrs_post_init__(self) -> None:
        if self.lag and self.refresh_every < 2:
            raise OptionError(
                "preconditioner 'diag_ema': lag=True needs refresh_every >= 2 (the "
                "estimator's every_k, with the preconditioner updated every step); got "
                f"refresh_every={self.refresh_every}"
            )

    def init(self, params: PyTree) -> PyTree:
        ema = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, _state_dtype(x)), params)
        state = {"ema": ema, "count": jnp.zeros((), jnp.int32)}
        if self.refresh_every > 1:
            state["calls"] = jnp.zeros((), jnp.int32)
        return state

    def _spatial_mean(self, a: Array) -> Array:
        if self.spatial_average == "none" or a.ndim < 3:
            return a
        axes = tuple(range(a.ndim - 2)) if self.spatial_average == "hwio" else tuple(
            range(2, a.ndim)
        )
        return jnp.broadcast_to(jnp.mean(a, axis=axes, keepdims=True), a.shape)

    def statistic(self, d: Array) -> Array:
        """``u`` of one leaf: ``|d|`` or ``d``, spatially averaged, squared or not."""
        a = jnp.abs(d) if self.abs else d
        a = self._spatial_mean(a)
        return a * a if self.square else a

    def update(self, res: Any, stats: Stats, lam: Array, key: Array, state: PyTree) -> PyTree:
        diag = tree.cast_like(_diag_stat("diag_ema", stats), state["ema"])

        def fold(ema: PyTree, count: Array) -> tuple[PyTree, Array]:
            new = jax.tree_util.tree_map(
                lambda h, d: self.beta * h + (1 - self.beta) * self.statistic(d), ema, diag
            )
            return new, count + 1

        if self.refresh_every == 1:
            ema, count = fold(state["ema"], state["count"])
            return {"ema": ema, "count": count}
        calls = state["calls"]
        due = (calls % self.refresh_every) == (1 if self.lag else 0)
        ema, count = jax.lax.cond(due, fold, lambda e, c: (e, c), state["ema"], state["count"])
        return {"ema": ema, "count": count, "calls": calls + 1}

    def apply(self, state: PyTree, v: PyTree, lam: Array) -> PyTree:
        count = state["count"]

        def leaf(h: Array, x: Array) -> Array:
            h_hat = h
            if self.bias_correction:
                corr = 1 - jnp.asarray(self.beta, h.dtype) ** count.astype(h.dtype)
                h_hat = h / jnp.where(count > 0, corr, 1)
            if self.power != 1:
                nonneg = self.square or self.abs  # then h >= 0: no sign to keep
                mag = h_hat if nonneg else jnp.abs(h_hat)
                mag = jnp.sqrt(mag) if self.power == 0.5 else mag**self.power
                h_hat = mag if nonneg else jnp.sign(h_hat) * mag
            if self.scale != 1:
                h_hat = jnp.asarray(self.scale, h.dtype) * h_hat
            m = jnp.maximum(
                h_hat + jnp.asarray(lam).astype(h.dtype), jnp.asarray(self.eps, h.dtype)
            )
            out = x.astype(h.dtype) / m
            if self.clip is not None:
                out = jnp.clip(out, -self.clip, self.clip)
            return out.astype(x.dtype)

        return jax.tree_util.tree_map(leaf, state["ema"], v)


@declare(
    "nystrom",
    summary="randomized rank-r Nystrom preconditioner of C + lam I (Frangella et al.)",
    requires={"tags": {PSD}, "resources": {"operator"}},
)
@attrs.frozen
class Nystrom(Preconditioner):
    """Randomized Nystrom preconditioner of rank ``r`` for ``C + lam I`` (C psd).

    Sketch (Frangella, Tropp & Udell 2023, Algorithm 2.1), with ``n`` the number of
    parameters and ``Omega`` an orthonormalised Gaussian ``[n, r]`` test matrix::

        Y = C Omega (r matvecs, vmapped);  nu = sqrt(n) eps(||Y||);  Y_nu = Y + nu Omega
        L L^T = Omega^T Y_nu;  B = Y_nu L^-T;  U S V^T = svd(B);  lhat = max(S^2 - nu, 0)

    so that ``C ~ U diag(lhat) U^T``, and::

        M^-1 v = U (diag(lhat) + lam)^-1 U^T v + (v - U U^T v) / (lhat_min + lam)

    (FTU's preconditioner divided by ``lhat_min + lam``, which CG does not notice).
    The sketch reads ``res["operator"]`` (the undamped C) and the update's key. If the
    sketch is not finite (C not psd, so the Cholesky fails), the previous state is
    kept. Before the first update ``U = 0`` and ``M^-1 v = v / max(lam, eps)``.

    State: ``{"U": [n, r] (ravel_pytree order), "eigs": [r]}``, float32 at least.

    Options: ``rank`` (r, default 10), ``eps`` (floor of the denominators, 1e-12).
    """

    rank: int = option(10, ge=1, doc="sketch rank r")
    eps: float = option(1e-12, gt=0, doc="floor of the denominators")

    def init(self, params: PyTree) -> PyTree:
        flat, _ = tree.ravel(params)
        n = flat.shape[0]
        if self.rank > n:
            raise InputError(
                f"preconditioner 'nystrom': rank {self.rank} exceeds the {n} parameters; "
                f"use rank <= {n}"
            )
        dt = _state_dtype(flat)
        return {"U": jnp.zeros((n, self.rank), dt), "eigs": jnp.zeros((self.rank,), dt)}

    def sketch(self, op: Any, key: Array, primal: PyTree, dtype: Any) -> tuple[Array, Array]:
        """``(U, lhat)`` of the rank-r Nystrom approximation of ``op`` (no fallback)."""
        flat, unravel = tree.ravel(primal)
        n = flat.shape[0]
        omega = jax.random.normal(key, (n, self.rank), dtype)
        omega, _ = jnp.linalg.qr(omega)

        def column(w: Array) -> Array:
            return tree.ravel(op.mv(unravel(w)))[0].astype(dtype)

        y = jax.vmap(column, in_axes=1, out_axes=1)(omega)
        nu = jnp.sqrt(jnp.asarray(n, dtype)) * jnp.finfo(dtype).eps * jnp.linalg.norm(y, 2)
        y_nu = y + nu * omega
        core = omega.T @ y_nu
        chol = jnp.linalg.cholesky((core + core.T) / 2)
        b = jax.scipy.linalg.solve_triangular(chol, y_nu.T, lower=True).T
        u, s, _ = jnp.linalg.svd(b, full_matrices=False)
        lhat = jnp.maximum(s**2 - nu, 0)
        return u, lhat

    def update(self, res: Any, stats: Stats, lam: Array, key: Array, state: PyTree) -> PyTree:
        op = res["operator"]
        dt = state["U"].dtype
        u, lhat = self.sketch(op, key, op.primal, dt)
        ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(lhat))
        return {
            "U": jnp.where(ok, u, state["U"]),
            "eigs": jnp.where(ok, lhat, state["eigs"]),
        }

    def apply(self, state: PyTree, v: PyTree, lam: Array) -> PyTree:
        flat, unravel = tree.ravel(v)
        u, eigs = state["U"], state["eigs"]
        dt = u.dtype
        x = flat.astype(dt)
        lam_ = jnp.asarray(lam).astype(dt)
        eps = jnp.asarray(self.eps, dt)
        utx = u.T @ x
        low = u @ (utx / jnp.maximum(eigs + lam_, eps))
        rest = (x - u @ utx) / jnp.maximum(jnp.min(eigs) + lam_, eps)
        return unravel(low + rest)
