"""``Loss.batch_sum``: the extension point for sums over the batch a component computes.

Default: ``fn(*xs)``. Under canonical reductions (``DataParallel(mesh,
reduce_chunks=K)``, the loss swapped by ``chunked_loss``) the batch is split into
``K`` fixed chunks and the chunk results are added in a fixed order: the same sum up
to rounding, checked here in float64 against the plain sum (tolerance 1e-12: a
reordering of ~100 float64 additions of O(1) terms moves the result by ~1e-15
relative). The bitwise device-count independence (float32, 1 / 2 / 4 devices) is
``tests/canonical_check.py``'s job (run by ``tests/test_sharding.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from somax_plug import DataParallel, compose, data_parallel_mesh, get_loss
from somax_plug._src.sharding import chunked_loss

K = 4


def _canonical(loss_name: str = "mse", k: int = K):
    dp = DataParallel(data_parallel_mesh(1), reduce_chunks=k)
    return chunked_loss(get_loss(loss_name), k=k, chunked=dp.batch, rep=dp.replicated)


def _gram(x):
    return jnp.einsum("bti,btj->ij", x, x)


def _g_gram(g):  # g: [B, R, T, d] (the batch first); the sum over b, r and t
    return jnp.einsum("brti,brtj->ij", g, g)


def _ef_mv(ps, v):  # sum_b p_b (p_b . v) over a pytree of per-example rows
    rows = sum(jnp.sum(p.reshape(p.shape[0], -1) * x.ravel(), axis=1)
               for p, x in zip(jax.tree_util.tree_leaves(ps), jax.tree_util.tree_leaves(v),
                               strict=True))
    return jax.tree_util.tree_map(lambda p: jnp.tensordot(rows, p, 1), ps)


def test_default_batch_sum_is_fn_of_xs():
    loss = get_loss("softmax_cross_entropy")
    a = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3, 2)))
    calls = []

    def fn(x):
        calls.append(x.shape)
        return _gram(x)

    got = loss.batch_sum(fn, a)
    assert calls == [(6, 3, 2)]  # called once, on the whole batch
    np.testing.assert_array_equal(got, _gram(a))


@pytest.mark.parametrize("b", [8, 12])
def test_canonical_batch_sum_equals_the_plain_sum_float64(b):
    rng = np.random.default_rng(b)
    a = jnp.asarray(rng.normal(size=(b, 3, 5)))
    g = jnp.asarray(rng.normal(size=(b, 2, 3, 4)))
    ps = {"w": jnp.asarray(rng.normal(size=(b, 5, 3))), "c": jnp.asarray(rng.normal(size=(b, 3)))}
    v = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape[1:])), ps)
    loss = _canonical()
    assert type(loss).__name__ == "ChunkedMSE"
    seen = []

    def gram_chunk(x):
        seen.append(x.shape)
        return _gram(x)

    for fn, args, ref in (
        (gram_chunk, (a,), np.einsum("bti,btj->ij", a, a)),
        (_g_gram, (g,), np.einsum("brti,brtj->ij", g, g)),
        (lambda x, y: jnp.einsum("bti,btj->ij", x, y), (a, a[..., :2]),
         np.einsum("bti,btj->ij", a, a[..., :2])),
    ):
        got = jax.jit(lambda *xs, fn=fn: loss.batch_sum(fn, *xs))(*args)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert seen == [(b // K, 3, 5)]  # fn saw one chunk (vmapped over the K chunks)
    got = loss.batch_sum(lambda q: _ef_mv(q, v), ps)  # a pytree in, a pytree out
    ref = _ef_mv(ps, v)
    for key in ps:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-12, atol=1e-12)
    # a scalar result (sum of squares) and a mean reduction's scale left to the caller
    got = loss.batch_sum(lambda x: jnp.sum(x * x), a)
    np.testing.assert_allclose(got, float(np.sum(np.asarray(a) ** 2)), rtol=1e-12)


def test_canonical_batch_sum_falls_back_for_sizes_not_divisible_by_k():
    loss = _canonical()
    a = jnp.asarray(np.random.default_rng(1).normal(size=(6, 2)))  # 6 % 4 != 0
    seen = []

    def fn(x):
        seen.append(x.shape)
        return x.T @ x

    np.testing.assert_array_equal(loss.batch_sum(fn, a), np.asarray(a).T @ np.asarray(a))
    assert seen == [(6, 2)]  # the whole batch, once
    # mixed leading sizes: not one batch, so no split either
    seen.clear()

    def fn2(x, y):
        seen.append((x.shape, y.shape))
        return jnp.sum(x) + jnp.sum(y)

    assert float(loss.batch_sum(fn2, jnp.ones((8, 2)), jnp.ones((4,)))) == 20.0
    assert seen == [((8, 2), (4,))]


def test_components_sum_through_the_canonical_loss():
    """``empirical_fisher``'s sums reach the step's loss: under reduce_chunks (1 device
    here) a float64 step (CG, several iterations) equals the plain step to 1e-12.

    (Not ``ggn_cg_kfac`` here: under reduce_chunks the layer map does not see the
    kernels through the chunk broadcast, so KFAC falls back to diagonal blocks and
    differs from the plain step by design; docs/howto/multi-process.md.)"""
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.zeros(2)}
    x = jnp.asarray(rng.normal(size=(8, 3)))
    y = jnp.asarray(rng.normal(size=(8, 2)))

    def predict(p, x):
        return jnp.tanh(x @ p["w"] + p["b"])

    for kw in (
        dict(curvature="empirical_fisher", solver={"name": "cg", "maxiter": 20, "tol": 1e-10},
             damping={"name": "constant", "lam": 0.1}),
        dict(curvature="empirical_fisher", solver={"name": "cg", "maxiter": 20, "tol": 1e-10},
             estimators=["exact_diag"], preconditioner="jacobi",
             damping={"name": "constant", "lam": 0.1}),
    ):
        plain = compose(predict_fn=predict, loss="mse", **kw)
        canon = compose(predict_fn=predict, loss="mse", **kw,
                        mesh=DataParallel(data_parallel_mesh(1), reduce_chunks=K))
        p1, _, i1 = plain.step(params, plain.init(params), (x, y), jax.random.key(0))
        p2, _, i2 = canon.step(params, canon.init(params), (x, y), jax.random.key(0))
        assert int(i1["solver_iterations"]) == int(i2["solver_iterations"]) >= 2, kw
        for key in params:
            np.testing.assert_allclose(p2[key], p1[key], rtol=1e-12, atol=1e-12)
