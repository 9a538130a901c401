"""Built-in estimators: statistics of a curvature operator C from a few matvecs.

================  =====================  ==========================================
name              statistic              estimate
================  =====================  ==========================================
hutchinson_diag   ``diag``               ``(1/N) sum_j z_j * C z_j``
hutchinson_trace  ``trace``              ``(1/N) sum_j z_j . C z_j``
hutchpp_trace     ``trace``              Hutch++: ``tr(Q^T C Q)`` + Hutchinson on
                                         ``(I - QQ^T) C (I - QQ^T)``
gnb_diag          ``diag``               Gauss-Newton-Bartlett (Sophia-G)
exact_diag        ``diag``               ``op.diag()`` or the dense matrix
lanczos           ``eigenvalues``,       Lanczos with full reorthogonalisation,
                  ``eigenvectors``,      Gaussian-smoothed Ritz values (stochastic
                  ``spectral_density``   Lanczos quadrature)
================  =====================  ==========================================

The resources and losses each requires are declared on its class (``@declare``).

All of them are unbiased where they are random (Rademacher or Gaussian probes
``z`` with ``E[z z^T] = I``), take their randomness from the ``key`` passed to
``estimate`` and run under ``jax.jit`` and inside ``lax.scan`` (fixed shapes,
``lax.fori_loop`` / ``vmap``, no Python branching on traced values).

Stats layout (every ``init(params)["stats"]`` holds zeros of exactly this layout):

* ``diag``: a pytree like the parameters;
* ``trace``: a scalar;
* ``eigenvalues``: ``[k]``, leading Ritz values first (see :class:`Lanczos`);
* ``eigenvectors``: a pytree like the parameters with a leading axis ``k`` (row i is
  the unit Ritz vector of ``eigenvalues[i]``);
* ``spectral_density``: ``{"grid": [G], "density": [G]}``, a density on the grid
  that integrates to about 1 (see :class:`Lanczos`).

Dtypes: statistics are in ``promote_types(param dtype, float32)`` (float32 for bfloat16
and float32 parameters, float64 for float64), and so are the accumulations.

Example:
    >>> from somax_plug import spec_of
    >>> spec_of(HutchinsonDiag).provides
    frozenset({'diag'})
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from somax_plug import (
    DIAG,
    CompositionError,
    Estimator,
    LinearOperator,
    OptionError,
    Resources,
    declare,
    lazy_import,
    option,
    tree,
)
from somax_plug.losses import SoftmaxCrossEntropy, compute_dtype

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")

PyTree = Any
Array = Any
Stats = dict[str, Any]

PROBES = ("rademacher", "normal")


def _stat_zeros(params: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: jnp.zeros(jnp.shape(x), compute_dtype(jnp.result_type(x))), params
    )


def _scalar_dtype(params: PyTree) -> jnp.dtype:
    return tree.accum_dtype(params)


class _Flat:
    """A pytree operator seen as ``[n] -> [n]`` in a float dtype of at least 32 bits."""

    def __init__(self, op: LinearOperator) -> None:
        primal = op.primal
        flat, self._unravel = tree.ravel(primal)
        self.n = int(flat.shape[0])
        self.dtype = _scalar_dtype(primal)
        self._flat_dtype = flat.dtype
        self._primal = primal
        self._op = op

    def unravel(self, x: Array) -> PyTree:
        return tree.cast_like(self._unravel(x.astype(self._flat_dtype)), self._primal)

    def ravel(self, v: PyTree) -> Array:
        leaves = jax.tree_util.tree_leaves(v)
        return jnp.concatenate([jnp.ravel(x).astype(self.dtype) for x in leaves])

    def mv(self, x: Array) -> Array:
        return self.ravel(self._op.mv(self.unravel(x)))

    def probes(self, key: Array, shape: tuple[int, ...], kind: str) -> Array:
        return _probes(key, shape, kind, self.dtype)


def _probes(key: Array, shape: tuple[int, ...], kind: str, dtype: Any) -> Array:
    """Rademacher (+-1) or standard normal probes; ``E[z z^T] = I`` either way."""
    if kind == "rademacher":
        return jax.random.rademacher(key, shape, dtype=jnp.int8).astype(dtype)
    return jax.random.normal(key, shape, dtype)


def _probe_like(key: Array, primal: PyTree, kind: str, draw: str = "flat") -> PyTree:
    """One probe with the structure of ``primal``.

    ``draw="flat"``: a single draw for the flattened pytree (one random op keeps the
    traced step small). ``draw="per_leaf"``: the key split into one key per leaf (in
    ``tree_leaves`` order) and each leaf drawn with its own shape in float32 (float64
    for float64 leaves), exactly as ``optax.tree.random_like`` draws the probes of
    ``optax.contrib.hutchinson_estimator_diag_hessian``.
    """
    if draw == "per_leaf":
        leaves, treedef = jax.tree_util.tree_flatten(primal)
        keys = jax.random.split(key, len(leaves))
        out = [
            _probes(keys[i], jnp.shape(x), kind, compute_dtype(jnp.result_type(x))).astype(
                jnp.result_type(x)
            )
            for i, x in enumerate(leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, out)
    flat, unravel = tree.ravel(primal)
    z = _probes(key, flat.shape, kind, compute_dtype(flat.dtype))
    return tree.cast_like(unravel(z.astype(flat.dtype)), primal)


def _probe_keys(key: Array, n: int) -> Array:
    """``n`` probe keys: the key itself for one probe (as optax), else ``split(key, n)``."""
    return key[None] if n == 1 else jax.random.split(key, n)


def _stats_state(stats: Stats) -> dict[str, Stats]:
    return {"stats": stats}


# --------------------------------------------------------------------------- Hutchinson


@declare(
    "hutchinson_diag",
    summary="Hutchinson diagonal E[z * Cz] from random probes",
    provides={"diag"},
    requires={"resources": {"operator"}},
)
@attrs.frozen
class HutchinsonDiag(Estimator):
    """Hutchinson's diagonal estimator ``diag(C) ~ (1/N) sum_j z_j * C z_j``.

    Unbiased for ``E[z z^T] = I``; with Rademacher probes the variance of entry i is
    ``sum_{j != i} C_ij^2 / N`` (Bekas, Kokiopoulou & Saad, 2007). Sophia-H and
    AdaHessian use one Rademacher probe (``num_probes=1``).

    Probe keys: one probe is drawn from the key itself, N > 1 from ``split(key, N)``.
    The key is the step's (``Resources.key_for`` of the estimator's role), or, with
    ``seed`` set, the estimator's own stream: the state holds
    ``jax.random.PRNGKey(seed)`` and every estimate draws from
    ``key, sub = jax.random.split(key)``, as ``optax.contrib.sophia``'s default
    Hutchinson estimator does. With ``draw="per_leaf"`` and ``seed`` set the probes
    are exactly optax's (see ``tests/test_paper_presets.py``).

    Attributes:
        num_probes: N, matvecs per estimate.
        probe: ``"rademacher"`` or ``"normal"``.
        draw: ``"per_leaf"`` (default: one key per leaf, ``optax.tree.random_like``'s
            layout) or ``"flat"`` (one draw for the flattened parameters: one random op
            in the traced step, but about 30-70 more FLOPs per parameter on the CPU,
            measured by ``benchmarks/bench_flops.py``'s preset part).
        seed: None (probes from the step's key) or the seed of the estimator's own
            key stream (state ``{"stats", "key"}``).
    """


    num_probes: int = option(10, ge=1, doc="probes per estimate (matvecs)")
    probe: str = option("rademacher", choices=PROBES, doc="probe distribution")
    draw: str = option(
        "per_leaf", choices=("flat", "per_leaf"),
        doc="one key per leaf (optax's layout; fewer FLOPs), or one draw for all",
    )
    seed: int | None = option(
        None, ge=0, doc="own key stream PRNGKey(seed), split per estimate (None: the step's key)"
    )

    def init(self, params: PyTree) -> dict[str, Stats]:
        state = _stats_state({"diag": _stat_zeros(params)})
        if self.seed is not None:
            state["key"] = jax.random.PRNGKey(self.seed)
        return state

    def estimate(self, res: Resources, key: Array, state: PyTree) -> tuple[Stats, PyTree]:
        op = res["operator"]
        primal = op.primal
        if self.seed is not None:
            next_key, key = jax.random.split(state["key"])
        keys = _probe_keys(key, self.num_probes)

        def body(i: Array, acc: PyTree) -> PyTree:
            z = _probe_like(keys[i], primal, self.probe, self.draw)
            cz = op.mv(z)
            return jax.tree_util.tree_map(
                lambda a, zi, ci: a + zi.astype(a.dtype) * ci.astype(a.dtype), acc, z, cz
            )

        if self.num_probes == 1:  # no loop: the product fuses with what reads it
            stats = {"diag": body(0, _stat_zeros(primal))}
        else:
            acc = jax.lax.fori_loop(0, self.num_probes, body, _stat_zeros(primal))
            stats = {"diag": tree.scale(1.0 / self.num_probes, acc)}
        new_state = _stats_state(stats)
        if self.seed is not None:
            new_state["key"] = next_key
        return stats, new_state


@declare(
    "hutchinson_trace",
    summary="Hutchinson trace E[z . Cz] from random probes",
    provides={"trace"},
    requires={"resources": {"operator"}},
)
@attrs.frozen
class HutchinsonTrace(Estimator):
    """Hutchinson's trace estimator ``tr(C) ~ (1/N) sum_j z_j . C z_j``.

    Variance per probe: ``2 sum_{i != j} C_ij^2`` (Rademacher), ``2 ||C||_F^2`` (normal),
    for symmetric C (Hutchinson, 1989).

    Attributes:
        num_probes: N, matvecs per estimate.
        probe: ``"rademacher"`` or ``"normal"``.
    """


    num_probes: int = option(10, ge=1, doc="probes per estimate (matvecs)")
    probe: str = option("rademacher", choices=PROBES, doc="probe distribution")

    def init(self, params: PyTree) -> dict[str, Stats]:
        return _stats_state({"trace": jnp.zeros((), _scalar_dtype(params))})

    def estimate(self, res: Resources, key: Array, state: PyTree) -> tuple[Stats, PyTree]:
        op = res["operator"]
        primal = op.primal
        dtype = _scalar_dtype(primal)
        keys = jax.random.split(key, self.num_probes)

        def body(i: Array, acc: Array) -> Array:
            z = _probe_like(keys[i], primal, self.probe)
            return acc + tree.vdot(z, op.mv(z)).astype(dtype)

        total = jax.lax.fori_loop(0, self.num_probes, body, jnp.zeros((), dtype))
        stats = {"trace": total / self.num_probes}
        return stats, _stats_state(stats)


@declare(
    "hutchpp_trace",
    summary="Hutch++ trace: low-rank sketch plus Hutchinson on the deflated rest",
    provides={"trace"},
    requires={"resources": {"operator"}},
)
@attrs.frozen
class HutchppTrace(Estimator):
    """Hutch++ trace estimator (Meyer, Musco, Musco & Woodruff, 2021).

    With ``m = num_probes // 3``: a sketch ``Q = orth(C S)`` (m matvecs, S random
    ``[n, m]``), the exact part ``tr(Q^T C Q)`` (m matvecs) and Hutchinson on the
    deflated operator with ``g = num_probes - 2m`` probes ``G``::

        tr(C) ~ tr(Q^T C Q) + (1/g) tr(G^T (I - QQ^T) C (I - QQ^T) G).

    Unbiased (``tr(C) = tr(Q^T C Q) + tr(P C P)`` with ``P = I - QQ^T`` for any Q with
    orthonormal columns, and G is independent of Q); its error falls like 1/N instead
    of Hutchinson's 1/sqrt(N) when the spectrum decays.

    Attributes:
        num_probes: total matvecs, at least 3.
        probe: ``"rademacher"`` or ``"normal"``.
    """


    num_probes: int = option(30, ge=3, doc="matvecs in all (a third sketch, the rest probes)")
    probe: str = option("rademacher", choices=PROBES, doc="probe distribution")

    def init(self, params: PyTree) -> dict[str, Stats]:
        return _stats_state({"trace": jnp.zeros((), _scalar_dtype(params))})

    def estimate(self, res: Resources, key: Array, state: PyTree) -> tuple[Stats, PyTree]:
        flat = _Flat(res["operator"])
        m = min(self.num_probes // 3, flat.n)
        g = self.num_probes - 2 * m
        mvs = jax.vmap(flat.mv, in_axes=1, out_axes=1)
        probes = flat.probes(key, (flat.n, m + g), self.probe)  # one draw: S and G
        q, _ = jnp.linalg.qr(mvs(probes[:, :m]))
        gs = probes[:, m:]
        gs = gs - q @ (q.T @ gs)
        both = jnp.concatenate([q, gs], axis=1)
        c_both = mvs(both)  # C Q and C (I - QQ^T) G in one batched product
        exact = jnp.sum(q * c_both[:, :m])
        resid = jnp.sum(gs * c_both[:, m:]) / g
        stats = {"trace": (exact + resid).astype(flat.dtype)}
        return stats, _stats_state(stats)


# --------------------------------------------------------------------------- GNB


@declare(
    "gnb_diag",
    summary="Gauss-Newton-Bartlett GGN diagonal (Sophia-G; softmax cross-entropy only)",
    provides={"diag"},
    requires={"resources": {"linearization"}, "losses": {"softmax_cross_entropy"}},
)
@attrs.frozen
class GNBDiag(Estimator):
    """Gauss-Newton-Bartlett diagonal estimator, as in Sophia-G (Liu et al., 2023).

    Draw labels from the model, ``y_hat_b ~ Categorical(softmax(z_b))``, take the
    gradient of the reduced loss at them, ``g_hat = J^T dL/dz(z, y_hat)`` (one vjp of
    the shared linearization), and return ``(1/c) g_hat * g_hat`` averaged over
    ``num_samples`` draws (``1/c = B`` for the mean reduction, as in Sophia). Because
    ``E[(p - e_y)(p - e_y)^T] = diag p - p p^T``, this is unbiased for the diagonal of
    the GGN of the softmax cross-entropy; it needs that loss.

    Attributes:
        num_samples: label draws (vjps) per estimate.
    """


    num_samples: int = option(1, ge=1, doc="sampled labels per example")

    def init(self, params: PyTree) -> dict[str, Stats]:
        return _stats_state({"diag": _stat_zeros(params)})

    def estimate(self, res: Resources, key: Array, state: PyTree) -> tuple[Stats, PyTree]:
        loss = res.model.loss
        if not isinstance(loss, SoftmaxCrossEntropy):
            raise CompositionError(
                f"estimator 'gnb_diag' (Gauss-Newton-Bartlett) needs loss "
                f"'softmax_cross_entropy'; the model's loss is {loss.name!r}. Use "
                "'hutchinson_diag' on curvature 'ggn' or 'fisher' instead."
            )
        lin = res["linearization"]
        outputs, primal = lin.outputs, res.params
        c = loss.position_scale(outputs, res.targets)
        labels = loss.sample_targets(key, outputs, self.num_samples)
        labels = loss.mask_samples(labels, res.targets)

        def body(i: Array, acc: PyTree) -> PyTree:
            g = lin.vjp(loss.output_grad(outputs, labels[i]))
            return jax.tree_util.tree_map(lambda a, x: a + jnp.square(x.astype(a.dtype)), acc, g)

        if self.num_samples == 1:  # no loop: the square fuses with what reads it
            acc = body(0, _stat_zeros(primal))
        else:
            acc = jax.lax.fori_loop(0, self.num_samples, body, _stat_zeros(primal))
        stats = {"diag": tree.scale(1.0 / (c * self.num_samples), acc)}
        return stats, _stats_state(stats)


# --------------------------------------------------------------------------- exact


@declare(
    "exact_diag",
    summary="exact diagonal (op.diag() or the dense matrix; small models only)",
    provides={"diag"},
    requires={"resources": {"operator"}},
)
@attrs.frozen
class ExactDiag(Estimator):
    """The exact diagonal: ``op.diag()`` when the operator has one, else the dense matrix.

    The dense path costs n matvecs and ``n^2`` memory, so it refuses models with more
    than ``max_size`` parameters (small models and tests only).

    Attributes:
        max_size: largest parameter count accepted.
    """


    max_size: int = option(4096, ge=1, doc="refuse more parameters than this")

    def _check(self, params: PyTree) -> None:
        n = tree.size(params)
        if n > self.max_size:
            raise CompositionError(
                f"estimator 'exact_diag' builds the dense curvature and is for small models: "
                f"{n} parameters > max_size={self.max_size}. Use 'hutchinson_diag' (or "
                "'gnb_diag'), or raise max_size if you really want the dense diagonal."
            )

    def init(self, params: PyTree) -> dict[str, Stats]:
        self._check(params)
        return _stats_state({"diag": _stat_zeros(params)})

    def estimate(self, res: Resources, key: Array, state: PyTree) -> tuple[Stats, PyTree]:
        op = res["operator"]
        primal = op.primal
        diag = _operator_diag(op)
        if diag is None:
            self._check(primal)
            flat = _Flat(op)
            eye = jnp.eye(flat.n, dtype=flat.dtype)
            diag = flat.unravel(jnp.diagonal(jax.vmap(flat.mv)(eye)))
        diag = jax.tree_util.tree_map(lambda d, z: d.astype(z.dtype), diag, _stat_zeros(primal))
        stats = {"diag": diag}
        return stats, _stats_state(stats)


def _operator_diag(op: LinearOperator) -> PyTree | None:
    """``op.diag()`` when the operator is tagged ``diag`` or overrides ``diag``, else None."""
    if DIAG in op.tags:
        return op.diag()
    if type(op).diag is LinearOperator.diag:
        return None
    try:
        return op.diag()
    except NotImplementedError:
        return None


# --------------------------------------------------------------------------- Lanczos


@declare(
    "lanczos",
    summary="leading eigenpairs and spectral density by Lanczos (full reorthogonalisation)",
    provides={"eigenvalues", "eigenvectors", "spectral_density"},
    requires={"resources": {"operator"}},
)
@attrs.frozen
class Lanczos(Estimator):
    """Leading eigenpairs and a spectral density by Lanczos with full reorthogonalisation.

    ``m = min(num_iters, n)`` Lanczos steps from a Gaussian start vector build
    ``C V = V T + residual`` with orthonormal ``V`` (every new vector is
    Gram-Schmidt-orthogonalised twice against all previous ones; an invariant subspace
    is left by restarting from a fresh random vector, so repeated eigenvalues are found
    too). Ritz pairs ``(theta_i, V y_i)`` come from ``eigh(T)``.

    Statistics:
        ``eigenvalues`` ``[k]``: the ``num_eigs`` Ritz values with the largest value
        (``which="largest"``) or modulus (``which="magnitude"``), in decreasing order.
        ``eigenvectors``: a parameter-like pytree with leading axis k, unit vectors.
        ``spectral_density``: ``{"grid": [G], "density": [G]}``, stochastic Lanczos
        quadrature (Ghorbani, Krishnan & Xiao, 2019): ``sum_i w_i N(x; theta_i, s^2)``
        with weights ``w_i = (y_i[0])^2`` (summing to 1), ``s = smoothing * (theta_max -
        theta_min)`` (or a small floor), on a uniform grid from ``theta_min - 3s`` to
        ``theta_max + 3s``; ``sum(density) * (grid[1] - grid[0])`` is about 1.

    Attributes:
        num_iters: Lanczos steps (matvecs), capped at the parameter count.
        num_eigs: k, eigenpairs returned; ``num_eigs > num_iters`` is refused
            (``OptionError``); beyond the parameter count n, k is capped at n.
        which: ``"largest"`` (algebraic) or ``"magnitude"``.
        grid_size: G, points of the density grid.
        smoothing: Gaussian width relative to the Ritz range.
    """


    num_iters: int = option(30, ge=1, doc="Lanczos steps (matvecs)")
    num_eigs: int = option(5, ge=1, doc="eigenpairs returned")
    which: str = option("largest", choices=("largest", "magnitude"), doc="which eigenvalues")
    grid_size: int = option(128, ge=2, doc="points of the density grid")
    smoothing: float = option(0.02, gt=0, doc="Gaussian width relative to the Ritz range")

    def __attrs_post_init__(self) -> None:
        if self.num_eigs > self.num_iters:
            raise OptionError(
                f"estimator 'lanczos': num_eigs = {self.num_eigs} > num_iters = "
                f"{self.num_iters}: m Lanczos steps give at most m Ritz pairs, so it would "
                f"return {self.num_iters} eigenvalues; use num_iters >= {self.num_eigs} "
                f"(several times num_eigs for accurate pairs) or num_eigs <= {self.num_iters}"
            )

    def _sizes(self, params: PyTree) -> tuple[int, int]:
        m = min(self.num_iters, tree.size(params))
        return m, min(self.num_eigs, m)

    def init(self, params: PyTree) -> dict[str, Stats]:
        _, k = self._sizes(params)
        dtype = _scalar_dtype(params)
        vecs = jax.tree_util.tree_map(
            lambda z: jnp.zeros((k, *z.shape), z.dtype), _stat_zeros(params)
        )
        return _stats_state(
            {
                "eigenvalues": jnp.zeros((k,), dtype),
                "eigenvectors": vecs,
                "spectral_density": {
                    "grid": jnp.zeros((self.grid_size,), dtype),
                    "density": jnp.zeros((self.grid_size,), dtype),
                },
            }
        )

    def estimate(self, res: Resources, key: Array, state: PyTree) -> tuple[Stats, PyTree]:
        flat = _Flat(res["operator"])
        m, k = self._sizes(res["operator"].primal)
        theta, y, basis = _lanczos(flat, m, key)
        order = ritz_order(theta, self.which)[:k]
        vecs = (basis.T @ y[:, order]).T  # [k, n]
        primal = res["operator"].primal
        vec_tree = jax.vmap(flat.unravel)(vecs)
        vec_tree = jax.tree_util.tree_map(
            lambda v, z: v.astype(z.dtype), vec_tree, _stat_zeros(primal)
        )
        stats = {
            "eigenvalues": theta[order],
            "eigenvectors": vec_tree,
            "spectral_density": _density(theta, jnp.square(y[0]), self.grid_size, self.smoothing),
        }
        return stats, _stats_state(stats)


def ritz_order(theta: Array, which: str) -> Array:
    """Indices of ``theta``, leading first: by value (``"largest"``) or by modulus."""
    return jnp.argsort(-(theta if which == "largest" else jnp.abs(theta)), stable=True)


def _lanczos(flat: _Flat, m: int, key: Array) -> tuple[Array, Array, Array]:
    """Ritz values ``[m]`` (ascending), eigenvectors of T ``[m, m]`` and the basis ``[m, n]``."""
    n, dtype = flat.n, flat.dtype
    eps = jnp.finfo(dtype).eps
    tiny = jnp.finfo(dtype).tiny

    def orthogonalise(basis: Array, w: Array) -> Array:
        w = w - basis.T @ (basis @ w)
        return w - basis.T @ (basis @ w)

    def unit(w: Array) -> Array:
        return w / jnp.maximum(jnp.linalg.norm(w), tiny)

    draws = jax.random.normal(key, (m + 1, n), dtype)  # the start vector, then restarts
    restarts = draws[1:]
    basis0 = jnp.zeros((m + 1, n), dtype).at[0].set(unit(draws[0]))
    carry0 = (basis0, jnp.zeros((m,), dtype), jnp.zeros((m,), dtype), jnp.zeros((), dtype))

    def body(j: Array, carry: tuple[Array, Array, Array, Array]) -> tuple[Array, ...]:
        basis, alphas, betas, scale = carry
        v = basis[j]
        w = flat.mv(v)
        alpha = jnp.dot(v, w)
        w = orthogonalise(basis, w)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        broke = beta <= jnp.sqrt(eps) * scale
        fresh = unit(orthogonalise(basis, restarts[j]))
        nxt = jnp.where(broke, fresh, w / jnp.maximum(beta, tiny))
        beta = jnp.where(broke, jnp.zeros_like(beta), beta)
        basis = basis.at[j + 1].set(nxt)
        return basis, alphas.at[j].set(alpha), betas.at[j].set(beta), scale

    basis, alphas, betas, _ = jax.lax.fori_loop(0, m, body, carry0)
    off = betas[: m - 1]
    tri = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
    theta, y = jnp.linalg.eigh(tri)
    return theta, y, basis[:m]


def _density(theta: Array, weights: Array, grid_size: int, smoothing: float) -> dict[str, Array]:
    lo, hi = jnp.min(theta), jnp.max(theta)
    floor = 1e-6 * (1.0 + jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
    sigma = jnp.maximum(smoothing * (hi - lo), floor)
    grid = jnp.linspace(lo - 3 * sigma, hi + 3 * sigma, grid_size, dtype=theta.dtype)
    z = (grid[:, None] - theta[None, :]) / sigma
    gauss = jnp.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    return {"grid": grid, "density": gauss @ weights}
