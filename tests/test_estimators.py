"""Estimators: unbiasedness within explicit error budgets, exact paths, jit/scan, specs.

Random estimators are run for K independent keys (``vmap`` under one ``jit``) and
compared with the dense operator. Budgets:

* Hutchinson: the exact variance per probe is known (Rademacher: ``sum_{j != i} C_ij^2``
  for diagonal entry i and ``2 sum_{i != j} C_ij^2`` for the trace; Gaussian:
  ``sum_j C_ij^2 + C_ii^2`` and ``2 ||C||_F^2``), so the mean over K keys must lie within
  5 standard errors and the empirical mean squared error with N probes must be within
  a factor 2 of ``variance / N`` (this is the "error shrinks like 1/N" check).
* Hutch++ and GNB: variances are estimated from the K draws; the mean must lie within
  5 empirical standard errors (per entry) and the squared error summed over entries
  within 25x its expectation (the 5-sigma point of a chi-square with one degree of
  freedom, the worst case when the entries' errors are fully correlated).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from somax_plug._src.errors import CompositionError
from somax_plug._src.kinds import SYMMETRIC, LinearOperator
from somax_plug._src.model import make_model
from somax_plug._src.operators import MatrixOperator
from somax_plug._src.resources import ResourceProvider, Resources
from somax_plug.builtin.curvature import GGN
from somax_plug.builtin.estimators import (
    ExactDiag,
    GNBDiag,
    HutchinsonDiag,
    HutchinsonTrace,
    HutchppTrace,
    Lanczos,
    ritz_order,
)
from tests.strategies import (  # noqa: F401 (cheap_compiles is a fixture)
    CURVATURES,
    SMALL_ARCHITECTURES,
    cheap_compiles,
    init_mlp,
    make_batch,
    make_resources,
    mlp_cases,
    mlp_predict_fn,
    pooled_layouts,
    symmetric_matrices,
)

pytestmark = pytest.mark.usefixtures("cheap_compiles")

NUM_KEYS = 256


class _MvOnly(LinearOperator):
    """Only ``mv``: no diagonal, no row factors (exercises the dense fallbacks)."""

    def __init__(self, op):
        self.primal = op.primal
        self._op = op

    def mv(self, v):
        return self._op.mv(v)


def _flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def _rows(tree) -> np.ndarray:
    """A pytree with a leading axis -> ``[k, n]`` in ravel order."""
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree), np.float64)


def _same_layout(stats, init_stats):
    """``init(params)["stats"]`` has exactly the structure, shapes and dtypes of ``stats``."""
    assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(init_stats)
    leaves = zip(
        jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(init_stats), strict=True
    )
    for a, b in leaves:
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)


def _matrix_resources(op, key):
    provider = ResourceProvider("operator", lambda res: op)
    return Resources(None, op.primal, None, key, {"operator": provider})


def _first(draws):
    return jax.tree_util.tree_map(lambda a: a[0], draws)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _compiled_draws(estimators, mv_only, matrix, primal, keys):
    op = MatrixOperator(matrix, primal, tags={SYMMETRIC})
    op = _MvOnly(op) if mv_only else op

    def one(est, key):
        return est.estimate(_matrix_resources(op, key), key, est.init(primal))[0]

    return [jax.vmap(functools.partial(one, est))(keys) for est in estimators]


def _matrix_draws(estimators, case, keys, mv_only=False):
    """Every estimator for every key on the case's matrix (compiled per shape and layout)."""
    return _compiled_draws(estimators, mv_only, jnp.asarray(case.matrix), case.primal, keys)


# --------------------------------------------------------------------------- Hutchinson


def _exact_variance(dense, statistic, probe):
    off = dense - np.diag(np.diag(dense))
    if statistic == "diag":
        if probe == "rademacher":
            return np.sum(off**2, axis=1)
        return np.sum(dense**2, axis=1) + np.diag(dense) ** 2
    if probe == "rademacher":
        return np.array(2 * np.sum(off**2))
    return np.array(2 * np.sum(dense**2))


@given(
    case=symmetric_matrices(layouts=pooled_layouts()),
    statistic=st.sampled_from(["diag", "trace"]),
    probe=st.sampled_from(["rademacher", "normal"]),
)
def test_hutchinson_is_unbiased_with_variance_shrinking_like_one_over_n(case, statistic, probe):
    cls = HutchinsonDiag if statistic == "diag" else HutchinsonTrace
    few, many = cls(num_probes=1, probe=probe), cls(num_probes=8, probe=probe)
    keys = jax.random.split(jax.random.key(7), NUM_KEYS)
    d1, d8 = _matrix_draws((few, many), case, keys)
    _same_layout(_first(d1), few.init(case.primal)["stats"])
    dense = case.matrix
    if statistic == "diag":
        truth, e1, e8 = np.diag(dense), _rows(d1["diag"]), _rows(d8["diag"])
    else:
        truth, e1, e8 = np.trace(dense), np.asarray(d1["trace"]), np.asarray(d8["trace"])
    var = _exact_variance(dense, statistic, probe)
    floor = 1e-10 * max(np.abs(dense).max(), 1e-6)
    for draws, n in ((e1, 1), (e8, 8)):
        # unbiased: the mean over K keys is within 5 standard errors of the truth
        stderr = np.sqrt(var / (n * NUM_KEYS))
        assert np.all(np.abs(draws.mean(0) - truth) <= 5 * stderr + floor)
        # the mean squared error summed over entries is var / N within a factor 2
        mse = np.sum(np.mean((draws - truth) ** 2, axis=0))
        expected = np.sum(var) / n
        if expected <= floor**2:
            assert mse <= floor**2
        else:
            assert 0.5 * expected <= mse <= 2.0 * expected, (mse, expected, n)


# --------------------------------------------------------------------------- Hutch++


@given(
    case=symmetric_matrices(layouts=pooled_layouts()),
    probe=st.sampled_from(["rademacher", "normal"]),
)
def test_hutchpp_is_unbiased_and_exact_with_a_full_sketch(case, probe):
    small, full = HutchppTrace(num_probes=3, probe=probe), HutchppTrace(num_probes=3 * case.n)
    keys = jax.random.split(jax.random.key(3), NUM_KEYS)
    ds, df = _matrix_draws((small, full), case, keys)
    _same_layout(_first(ds), small.init(case.primal)["stats"])
    truth = np.trace(case.matrix)
    scale = max(np.abs(case.matrix).max(), 1e-6)
    # m = n sketch vectors span everything: tr(Q^T C Q) is the trace, the rest is 0
    np.testing.assert_allclose(np.asarray(df["trace"]), truth, atol=1e-9 * scale * case.n)
    draws = np.asarray(ds["trace"])
    stderr = draws.std(ddof=1) / np.sqrt(NUM_KEYS)
    assert abs(draws.mean() - truth) <= 5 * stderr + 1e-10 * scale


# --------------------------------------------------------------------------- exact / Lanczos


@given(case=symmetric_matrices(layouts=pooled_layouts()))
def test_lanczos_matches_eigh_and_exact_diag_matches_the_diagonal(case):
    n, k = case.n, min(3, case.n)
    largest = Lanczos(num_iters=n, num_eigs=k, which="largest", grid_size=64)
    ests = (largest, ExactDiag())
    keys = jax.random.split(jax.random.key(2), 1)
    stats = [_first(d) for d in _matrix_draws(ests, case, keys, mv_only=True)]
    for est, st_ in zip(ests, stats, strict=True):
        _same_layout(st_, est.init(case.primal)["stats"])
    dense = case.matrix
    scale = max(np.abs(dense).max(), 1e-6)
    tol = 1e-8 * scale
    np.testing.assert_allclose(_flat(stats[1]["diag"]), np.diag(dense), atol=tol)

    lam = np.linalg.eigvalsh(dense)  # ascending
    lz = stats[0]
    vals = np.asarray(lz["eigenvalues"])
    np.testing.assert_allclose(vals, lam[::-1][:k], atol=10 * tol)  # repeated ones too
    vecs = _rows(lz["eigenvectors"])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-6)
    residual = vecs @ dense - vals[:, None] * vecs
    assert np.abs(residual).max() <= 1e-6 * scale
    grid = np.asarray(lz["spectral_density"]["grid"])
    density = np.asarray(lz["spectral_density"]["density"])
    assert np.all(density >= 0) and np.all(np.diff(grid) > 0)
    assert abs(density.sum() * (grid[1] - grid[0]) - 1.0) < 0.02


def test_ritz_order_puts_the_leading_values_first():
    theta = jnp.array([-5.0, -1.0, 0.5, 2.0, 3.0])
    np.testing.assert_array_equal(ritz_order(theta, "largest"), [4, 3, 2, 1, 0])
    np.testing.assert_array_equal(ritz_order(theta, "magnitude"), [0, 4, 3, 1, 2])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _exact_diag_on_curvature(name, model, params, batch):
    res = make_resources(model, params, batch, curvature=CURVATURES[name])
    est = ExactDiag()
    return res["operator"].to_dense(), est.estimate(res, res.key, est.init(params))[0]


@pytest.mark.parametrize("name", sorted(CURVATURES))
def test_exact_diag_on_every_curvature(name):
    """Dense fallback (hessian), row factors (ggn, fisher) and op.diag() (empirical_fisher)."""
    predict = mlp_predict_fn("list", "softplus", (3,))
    params = init_mlp(4, 2, (3,), 3, "list", jnp.float64)
    model = make_model(predict, "sigmoid_binary_cross_entropy")
    rng = np.random.default_rng(0)
    batch = (jnp.asarray(rng.normal(size=(3, 2))), jnp.asarray(rng.uniform(size=(3, 3))))
    dense, stats = _exact_diag_on_curvature(name, model, params, batch)
    _same_layout(stats, ExactDiag().init(params)["stats"])
    dense = np.asarray(dense, np.float64)
    np.testing.assert_allclose(_flat(stats["diag"]), np.diag(dense), atol=1e-12)


class _DiagOverride(_MvOnly):
    """Overrides ``diag`` without the tag (like GGN); returns a marked value to trace the path."""

    def diag(self):
        return jax.tree_util.tree_map(lambda d: d + 100.0, self._op.diag())


class _DiagRaises(_MvOnly):
    def diag(self):
        raise NotImplementedError("no diagonal here")


@pytest.mark.parametrize(
    ("wrapper", "offset"), [(None, 0.0), (_DiagOverride, 100.0), (_DiagRaises, 0.0)]
)
def test_exact_diag_prefers_the_operators_diagonal(wrapper, offset):
    primal = {"a": jnp.zeros(2), "b": jnp.zeros(())}
    matrix = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 4.0]])
    op = MatrixOperator(matrix, primal, tags={SYMMETRIC})
    op = op if wrapper is None else wrapper(op)
    stats, _ = ExactDiag().estimate(_matrix_resources(op, None), None, {})
    np.testing.assert_allclose(_flat(stats["diag"]), np.diag(matrix)[[0, 1, 2]] + offset)


def test_exact_diag_refuses_large_models_with_a_clear_message():
    params = {"w": jnp.zeros((100, 100), jnp.float32)}
    with pytest.raises(CompositionError, match=r"10000 parameters > max_size=4096"):
        ExactDiag().init(params)
    assert ExactDiag(max_size=20000).init(params)["stats"]["diag"]["w"].shape == (100, 100)


# --------------------------------------------------------------------------- GNB


@functools.partial(jax.jit, static_argnums=(0, 1))
def _gnb_draws(model, est, params, batch, keys):
    res = make_resources(model, params, batch, curvature=GGN())
    state = est.init(params)
    draws = jax.vmap(lambda k: est.estimate(res, k, state)[0])(keys)
    return res["operator"].to_dense(), draws


@given(
    case=mlp_cases(
        losses=("softmax_cross_entropy",),
        dtypes=(jnp.float64,),
        architectures=SMALL_ARCHITECTURES,
    ),
    reduction=st.sampled_from(["mean", "sum"]),
    num_samples=st.sampled_from([1, 2]),
)
def test_gnb_diag_is_unbiased_for_the_ggn_diagonal(case, reduction, num_samples):
    est = GNBDiag(num_samples=num_samples)
    case = case._replace(target_kind="labels")  # the GGN of CE does not depend on the labels
    model = make_model(case.predict_fn, case.loss_name, reduction)
    batch = make_batch(case, seed=1)
    keys = jax.random.split(jax.random.key(5), NUM_KEYS)
    dense, draws = _gnb_draws(model, est, case.params, batch, keys)  # GNB draws its labels
    truth = np.diag(np.asarray(dense))
    _same_layout(_first(draws), est.init(case.params)["stats"])
    e = _rows(draws["diag"])
    assert np.all(e >= 0)
    var = e.var(axis=0, ddof=1)
    err = e.mean(0) - truth
    floor = 1e-10 * max(np.abs(truth).max(), 1e-6)
    assert np.all(np.abs(err) <= 5 * np.sqrt(var / NUM_KEYS) + floor)
    assert np.sum(err**2) <= 25 * np.sum(var) / NUM_KEYS + floor**2


def test_gnb_diag_refuses_other_losses():
    model = make_model(lambda p, x: x @ p, "mse")
    params = jnp.ones((2, 2), jnp.float32)
    res = make_resources(model, params, (jnp.ones((3, 2), jnp.float32), jnp.zeros((3, 2))))
    with pytest.raises(CompositionError, match="softmax_cross_entropy.*'mse'.*hutchinson_diag"):
        GNBDiag().estimate(res, jax.random.key(0), GNBDiag().init(params))


# --------------------------------------------------------------------------- jit / scan / bf16

ESTIMATORS = {
    "hutchinson_diag": HutchinsonDiag(num_probes=3),
    "hutchinson_trace": HutchinsonTrace(num_probes=3),
    "hutchpp_trace": HutchppTrace(num_probes=6),
    "gnb_diag": GNBDiag(num_samples=2),
    "exact_diag": ExactDiag(),
    "lanczos": Lanczos(num_iters=4, num_eigs=2, which="magnitude", grid_size=8),
}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scan_estimator(est, model, params, batch, key):
    """Two steps of ``lax.scan``: the stats carried in the state keep their layout."""

    def step(state, k):
        res = make_resources(model, params, batch, k, curvature=GGN())
        stats, state = est.estimate(res, k, state)
        return state, stats

    return jax.lax.scan(step, est.init(params), jax.random.split(key, 2))


@functools.partial(jax.jit, static_argnums=(0,))
def _scan_on_matrix(est, matrix, primal, key):
    """The same two scan steps on a bfloat16 matrix operator (a smaller program)."""

    def step(state, k):
        op = MatrixOperator(matrix, primal, tags={SYMMETRIC})
        stats, state = est.estimate(_matrix_resources(op, k), k, state)
        return state, stats

    return jax.lax.scan(step, est.init(primal), jax.random.split(key, 2))


ON_GGN = ("gnb_diag", "hutchinson_diag")


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimators_run_in_scan_with_bfloat16_params_and_float32_stats(name):
    """jit + lax.scan with a carried state; bfloat16 parameters give float32 statistics.

    ``gnb_diag`` and ``hutchinson_diag`` run on the GGN of a bfloat16 MLP; the others on
    a bfloat16 matrix operator.
    """
    est = ESTIMATORS[name]
    if name in ON_GGN:
        predict = mlp_predict_fn("tuple", "tanh", (3,))
        params = init_mlp(1, 2, (3,), 3, "tuple", jnp.bfloat16)
        model = make_model(predict, "softmax_cross_entropy")
        batch = (jnp.ones((4, 2), jnp.bfloat16), jnp.array([0, 1, 2, 0]))
        state, stats = _scan_estimator(est, model, params, batch, jax.random.key(0))
    else:
        params = {"w": jnp.zeros((2, 2), jnp.bfloat16), "b": jnp.zeros((3,), jnp.bfloat16)}
        rng = np.random.default_rng(0)
        u = rng.normal(size=(4, 7))
        matrix = jnp.asarray(u.T @ u, jnp.bfloat16)
        state, stats = _scan_on_matrix(est, matrix, params, jax.random.key(0))
    init = est.init(params)
    _same_layout(state["stats"], init["stats"])
    for leaf in jax.tree_util.tree_leaves(stats):
        assert leaf.dtype == jnp.float32 and leaf.shape[0] == 2
        assert bool(jnp.all(jnp.isfinite(leaf)))
    for leaf in jax.tree_util.tree_leaves(init["stats"]):
        assert leaf.dtype == jnp.float32
    if name == "lanczos":  # 4 steps on 7 parameters: Ritz values interlace the spectrum
        lam = np.linalg.eigvalsh(np.asarray(matrix, np.float64))
        ritz = np.asarray(stats["eigenvalues"], np.float64)
        assert np.all(ritz >= lam[0] - 0.05 * lam[-1]) and np.all(ritz <= 1.05 * lam[-1])
        assert np.all(np.diff(np.abs(ritz), axis=1) <= 1e-3 * lam[-1])  # leading first


# --------------------------------------------------------------------------- specs

def test_bad_options_are_rejected():
    with pytest.raises(CompositionError, match="option 'probe' = 'gauss' is not allowed"):
        HutchinsonDiag(probe="gauss")
    with pytest.raises(ValueError):
        HutchppTrace(num_probes=2)
    with pytest.raises(ValueError):
        Lanczos(which="smallest")
