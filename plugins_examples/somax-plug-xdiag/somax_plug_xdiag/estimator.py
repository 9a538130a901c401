"""XDiag: an exchangeable, low-rank-exact estimator of the diagonal of a symmetric C.

With ``m`` random sign vectors ``Omega = [w_1 ... w_m]`` (``[n, m]``) and
``Y = C Omega``, let ``Q_i`` be an orthonormal basis of ``C Omega_{-i}`` (every probe
but the i-th) and ``P_i = Q_i Q_i^T``. Because ``diag(C) = diag(P_i C) + diag((I - P_i) C)``
and ``P_i`` does not depend on ``w_i``, the leave-one-out estimate

    d_i = diag(P_i C) + w_i * ((I - P_i) C w_i)           (elementwise product)

is unbiased (``E[w w^T] = I``, so ``E[w * (B w)] = diag(B)`` for any fixed B), and so
is their average ``d = (1/m) sum_i d_i``, the XDiag estimator. If ``rank(C) < m`` then
``P_i C = C`` and every ``d_i`` is exact. This is the exchangeable construction of
Epperly, Tropp & Webber (2024), section on diagonal estimation ("XDiag"): every probe
serves both the low-rank sketch and the residual correction.

Computation (symmetric C, so ``P_i C`` has diagonal ``rowsum(Q_i * (C Q_i))``):

1. ``Y = C Omega`` (m matvecs) and ``Y = Q R`` (thin QR);
2. ``Z = C Q`` (m matvecs);
3. for each i: ``R_{-i} = W_i T_i`` (QR of R without its i-th column, ``m x (m-1)``),
   ``Q_i = Q W_i`` and ``C Q_i = Z W_i`` (no further matvecs), then ``d_i`` as above.

Cost: ``2m`` matvecs (vmapped) and m small QR factorisations; memory ``O(n m)``. The
paper downdates one QR instead of m small ones; the result is the same.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from somax_plug import MatrixOperator, ResourceProvider, Resources
    >>> u = jnp.array([[1.0, 2.0, 0.0, -1.0]])
    >>> op = MatrixOperator(u.T @ u, jnp.zeros(4), tags={"psd"})
    >>> res = Resources(None, None, None, None,
    ...                 {"operator": ResourceProvider("operator", lambda r: op)})
    >>> est = XDiag(num_probes=4)
    >>> stats, _ = est.estimate(res, jax.random.key(0), est.init(jnp.zeros(4)))
    >>> stats["diag"].round(4).tolist()  # rank 1 < m: exact
    [1.0, 4.0, 0.0, 1.0]

Reference: E. N. Epperly, J. A. Tropp and R. J. Webber (2024), "XTrace: making the
most of every sample in stochastic trace estimation", SIAM J. Matrix Anal. Appl.
45(1).
"""

from __future__ import annotations

from typing import Any

import attrs

from somax_plug import Estimator, declare, lazy_import, option, tree

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")

PyTree = Any

__all__ = ["XDiag", "xdiag"]


def _stat_dtype(x: Any) -> Any:
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _zeros(params: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), _stat_dtype(x)), params)


def xdiag(mv: Any, n: int, m: int, key: Any, dtype: Any) -> Any:
    """The XDiag estimate ``[n]`` of ``diag(C)`` for a symmetric ``mv: [n] -> [n]``."""
    omega = jax.random.rademacher(key, (n, m), dtype=jnp.int8).astype(dtype)
    mvs = jax.vmap(mv, in_axes=1, out_axes=1)
    y = mvs(omega)  # [n, m]
    q, r = jnp.linalg.qr(y)  # [n, k], [k, m], k = min(n, m)
    z = mvs(q)  # C Q, [n, k]

    def leave_out(i: Any) -> Any:
        keep = jnp.arange(m - 1)
        keep = keep + (keep >= i)
        w, _ = jnp.linalg.qr(r[:, keep])  # [k, min(k, m-1)]
        qi, cqi = q @ w, z @ w
        projected = jnp.sum(qi * cqi, axis=1)  # diag(P_i C) for symmetric C
        yi = y[:, i]
        rest = yi - qi @ (qi.T @ yi)  # (I - P_i) C w_i
        return projected + omega[:, i] * rest

    return jnp.mean(jax.vmap(leave_out)(jnp.arange(m)), axis=0)


@declare(
    "xdiag",
    summary="XDiag exchangeable diagonal estimator (Epperly-Tropp-Webber 2024), 2m matvecs",
    provides={"diag"},
    requires={"tags": {"symmetric"}, "resources": {"operator"}},
)
@attrs.frozen
class XDiag(Estimator):
    """XDiag diagonal estimator of a symmetric curvature operator (statistic ``diag``).

    Attributes:
        num_probes: m >= 2, the number of random sign vectors (2m matvecs per
            estimate); the estimate is exact when the operator's rank is below m.
    """

    num_probes: int = option(10, ge=2, doc="random sign vectors m (2m matvecs)")

    def init(self, params: PyTree) -> dict[str, Any]:
        return {"stats": {"diag": _zeros(params)}}

    def estimate(self, res: Any, key: Any, state: Any) -> tuple[dict[str, Any], Any]:
        op = res["operator"]
        primal = op.primal
        flat, unravel = tree.ravel(primal)
        zeros = _zeros(primal)
        dtype = jnp.promote_types(flat.dtype, jnp.float32)

        def mv(x: Any) -> Any:
            out = tree.ravel(op.mv(unravel(x.astype(flat.dtype))))[0]
            return out.astype(dtype)

        d = xdiag(mv, int(flat.shape[0]), self.num_probes, key, dtype)
        diag = jax.tree_util.tree_map(lambda a, z: a.astype(z.dtype), unravel(d), zeros)
        stats = {"diag": diag}
        return stats, {"stats": stats}
