"""Preconditioners: references, effect on CG iterations, state stability."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from somax_plug import requirements_of
from somax_plug._src.errors import CompositionError
from somax_plug._src.operators import MatrixOperator
from somax_plug._src.spec import Requires
from somax_plug.builtin import preconditioners as P
from somax_plug.builtin import solvers as S

PRIMAL = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(4)}  # n = 16, a dict of two leaves
N = 16
_, UNRAVEL = ravel_pytree(PRIMAL)


def tree(v: np.ndarray):
    return UNRAVEL(jnp.asarray(v))


def flat(t) -> np.ndarray:
    return np.asarray(ravel_pytree(t)[0])


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


@functools.partial(jax.jit, static_argnums=(0, 1))
def pcg(solver, pre, op, rhs, lam, stats, key):
    """Update the preconditioner (as the planner would), then solve with it."""
    state = pre.update({"operator": op}, stats, lam, key, pre.init(op.primal))
    return solver.solve(op, rhs, lam, lambda v: pre.apply(state, v, lam), stats, ())


CG = S.CG(tol=1e-10, maxiter=400)


# ----------------------------------------------------------------------- jacobi


@st.composite
def badly_scaled_systems(draw: st.DrawFn):
    """A = D^1/2 (I + E) D^1/2, ||E|| <= 0.6, D spanning several decades: diagonally dominant."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    decades = draw(st.sampled_from([1.0, 2.0, 4.0]))
    d = rng.permutation(np.logspace(0.0, decades, N))
    e = rng.normal(size=(N, N))
    e = (e + e.T) / 2
    np.fill_diagonal(e, 0.0)
    e *= draw(st.sampled_from([0.1, 0.6])) / np.linalg.norm(e, 2)
    a = np.sqrt(d)[:, None] * (np.eye(N) + e) * np.sqrt(d)[None, :]
    return a, rng.normal(size=N)


@given(badly_scaled_systems(), st.sampled_from([0.0, 1e-2]))
def test_jacobi_needs_no_more_cg_iterations_on_badly_scaled_systems(system, lam):
    a, b = system
    op = MatrixOperator(jnp.asarray(a), PRIMAL, tags={"psd"})
    stats = {"diag": op.diag()}
    key = jax.random.key(0)
    s_plain, info_plain, _ = pcg(CG, P.Identity(), op, tree(b), lam, stats, key)
    s_jac, info_jac, _ = pcg(CG, P.Jacobi(), op, tree(b), lam, stats, key)
    assert bool(info_plain.converged) and bool(info_jac.converged)
    assert int(info_jac.iterations) <= int(info_plain.iterations)
    ref = np.linalg.solve(a + lam * np.eye(N), b)
    kappa = np.linalg.cond(a + lam * np.eye(N))
    for s in (s_plain, s_jac):
        assert np.linalg.norm(flat(s) - ref) <= 1e-7 * kappa * np.linalg.norm(ref)


def test_jacobi_floor_abs_and_missing_statistic():
    pre = P.Jacobi(eps=0.5)
    state = pre.update(
        None, {"diag": jnp.array([-4.0, 0.0, 2.0])}, 0.0, None, pre.init(jnp.ones(3))
    )
    np.testing.assert_allclose(pre.apply(state, jnp.ones(3), 0.0), [0.25, 2.0, 0.5])
    np.testing.assert_allclose(pre.apply(state, jnp.ones(3), 1.0), [0.2, 1.0, 1 / 3])
    pre = P.Jacobi(abs=False, eps=0.5)
    state = pre.update(
        None, {"diag": jnp.array([-4.0, 0.0, 2.0])}, 0.0, None, pre.init(jnp.ones(3))
    )
    np.testing.assert_allclose(pre.apply(state, jnp.ones(3), 0.0), [2.0, 2.0, 0.5])
    with pytest.raises(CompositionError, match="statistic 'diag'"):
        pre.update(None, {}, 0.0, None, state)
    # before any update the state is ones: M = (1 + lam) I
    np.testing.assert_allclose(pre.apply(pre.init(jnp.ones(2)), jnp.ones(2), 1.0), [0.5, 0.5])


# ----------------------------------------------------------------------- nystrom


@st.composite
def low_rank_plus_identity(draw: st.DrawFn):
    """C = V diag(big) V^T + (small full-rank tail), a spread top-k spectrum."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    k = draw(st.sampled_from([4, 6]))
    q = orthogonal(rng, N)
    e = np.concatenate([np.logspace(1.0, 4.0, k), rng.uniform(0.0, 0.05, size=N - k)])
    return (q * e) @ q.T, rng.normal(size=N)


NYSTROM = P.Nystrom(rank=8)


@given(low_rank_plus_identity(), st.sampled_from([1e-2, 1e-1]), st.integers(0, 2**16))
def test_nystrom_cg_converges_in_fewer_iterations(system, lam, seed):
    a, b = system
    op = MatrixOperator(jnp.asarray(a), PRIMAL, tags={"psd"})
    key = jax.random.key(seed)
    _, info_plain, _ = pcg(CG, P.Identity(), op, tree(b), lam, {}, key)
    s, info_nys, _ = pcg(CG, NYSTROM, op, tree(b), lam, {}, key)
    assert bool(info_plain.converged) and bool(info_nys.converged)
    assert int(info_nys.iterations) < int(info_plain.iterations)
    ref = np.linalg.solve(a + lam * np.eye(N), b)
    assert np.linalg.norm(flat(s) - ref) <= 1e-6 * np.linalg.norm(ref)


@jax.jit
def _sketch_and_apply(op, key, v, lam):
    state = NYSTROM.update({"operator": op}, {}, lam, key, NYSTROM.init(PRIMAL))
    return state, NYSTROM.apply(state, v, lam)


@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.5]))
def test_nystrom_recovers_a_low_rank_operator_and_applies_the_ftu_formula(seed, lam):
    rng = np.random.default_rng(seed)
    v_low = orthogonal(rng, N)[:, :5]
    c = (v_low * rng.uniform(1.0, 10.0, size=5)) @ v_low.T  # rank 5 <= r = 8
    op = MatrixOperator(jnp.asarray(c), PRIMAL, tags={"psd"})
    v = rng.normal(size=N)
    state, out = _sketch_and_apply(op, jax.random.key(seed % 1000), tree(v), lam)
    u, eigs = np.asarray(state["U"]), np.asarray(state["eigs"])
    assert u.shape == (N, 8) and eigs.shape == (8,)
    np.testing.assert_allclose(u.T @ u, np.eye(8), atol=1e-10)
    np.testing.assert_allclose((u * eigs) @ u.T, c, atol=1e-8 * np.abs(c).max())
    inv = (u / np.maximum(eigs + lam, 1e-12)) @ u.T
    inv += (np.eye(N) - u @ u.T) / max(eigs.min() + lam, 1e-12)
    np.testing.assert_allclose(flat(out), inv @ v, rtol=1e-8, atol=1e-8 * np.abs(inv @ v).max())


def test_nystrom_keeps_its_state_when_the_operator_is_not_psd():
    pre = P.Nystrom(rank=3)

    @jax.jit
    def update(matrix, key, state):
        op = MatrixOperator(matrix, PRIMAL, tags={"symmetric"})
        return pre.update({"operator": op}, {}, 0.1, key, state)

    good = update(jnp.eye(N), jax.random.key(0), pre.init(PRIMAL))
    np.testing.assert_allclose(good["eigs"], np.ones(3), rtol=1e-10)
    state = update(-jnp.eye(N), jax.random.key(1), good)  # Cholesky of the core fails
    for x, y in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(good), strict=True):
        np.testing.assert_array_equal(x, y)
    assert np.all(np.isfinite(flat(pre.apply(state, tree(np.ones(N)), 0.0))))


# ----------------------------------------------------------------------- diag_ema


def ema_reference(pre: P.DiagEMA, diags: list[np.ndarray], v: np.ndarray, lam: float):
    h = np.zeros_like(v)
    outs = []
    for t, d in enumerate(diags, start=1):
        u = d * d if pre.square else (np.abs(d) if pre.abs else d)
        h = pre.beta * h + (1 - pre.beta) * u
        h_hat = h / (1 - pre.beta**t)
        h_hat = np.sign(h_hat) * np.abs(h_hat) ** pre.power
        out = v / np.maximum(h_hat + lam, pre.eps)
        if pre.clip is not None:
            out = np.clip(out, -pre.clip, pre.clip)
        outs.append(out)
    return np.stack(outs)


DIAG_EMAS = [
    P.DiagEMA(),
    P.DiagEMA(beta=0.999, square=True, power=0.5),  # AdaHessian
    P.DiagEMA(beta=0.9, clip=1.0, eps=1e-3, abs=False),  # Sophia
]


@functools.partial(jax.jit, static_argnums=0)
def _ema_run(pre, diags, v, lam):
    def step(state, d):
        state = pre.update(None, {"diag": UNRAVEL(d)}, lam, None, state)
        return state, ravel_pytree(pre.apply(state, UNRAVEL(v), lam))[0]

    return jax.lax.scan(step, pre.init(PRIMAL), diags)


@given(
    st.sampled_from(range(len(DIAG_EMAS))),
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.0, 1e-4]),
)
def test_diag_ema_matches_a_reference_inside_scan(which, steps, seed, lam):
    pre = DIAG_EMAS[which]
    rng = np.random.default_rng(seed)
    diags = [rng.normal(size=N) * 10.0 ** rng.uniform(-2, 2, size=N) for _ in range(steps)]
    diags += [np.zeros(N)] * (6 - steps)  # fixed length: one compile per preconditioner
    v = rng.normal(size=N)
    state, outs = _ema_run(pre, jnp.asarray(np.stack(diags)), jnp.asarray(v), lam)
    ref = ema_reference(pre, diags, v, lam)
    np.testing.assert_allclose(np.asarray(outs), ref, rtol=1e-9, atol=1e-12)
    assert int(state["count"]) == 6 and state["count"].dtype == jnp.int32
    if pre.clip is not None:
        assert np.all(np.abs(np.asarray(outs)) <= pre.clip)


def test_diag_ema_bias_correction_and_low_precision_state():
    pre = P.DiagEMA(beta=0.99)
    params = {"w": jnp.zeros(3, jnp.bfloat16)}
    state = pre.init(params)
    assert state["ema"]["w"].dtype == jnp.float32  # bf16 would lose (1 - beta) updates
    d = {"w": jnp.array([1.0, 2.0, 4.0], jnp.bfloat16)}
    for _ in range(3):
        state = pre.update(None, {"diag": d}, 0.0, None, state)
    out = pre.apply(state, {"w": jnp.ones(3, jnp.bfloat16)}, 0.0)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["w"], np.float32), [1.0, 0.5, 0.25], rtol=1e-2)
    # before the first update: v / max(lam, eps)
    np.testing.assert_allclose(pre.apply(pre.init(jnp.ones(2)), jnp.ones(2), 0.5), [2.0, 2.0])


# ----------------------------------------------------------------------- all of them


def test_preconditioners_run_in_scan_with_stable_state():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(N, N))
    op = MatrixOperator(jnp.asarray(a @ a.T), PRIMAL, tags={"psd"})
    for pre in (P.Identity(), P.Jacobi(), P.DiagEMA(clip=1.0), P.Nystrom(rank=4)):
        state0 = pre.init(PRIMAL)

        def step(state, key, pre=pre):
            stats = {"diag": op.diag()}
            state = pre.update({"operator": op}, stats, jnp.asarray(0.1), key, state)
            return state, pre.apply(state, tree(np.ones(N)), jnp.asarray(0.1))

        keys = jax.random.split(jax.random.key(0), 3)
        state, outs = jax.jit(lambda s, k, step=step: jax.lax.scan(step, s, k))(state0, keys)
        assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(state0)
        for x, y in zip(
            jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(state0), strict=True
        ):
            assert x.shape == y.shape and x.dtype == y.dtype
        assert outs["w"].shape == (3, 4, 3) and np.all(np.isfinite(np.asarray(outs["w"])))


def test_requires_options_and_hashing():
    assert requirements_of(P.Identity()).is_empty()
    assert requirements_of(P.Jacobi()) == Requires(statistics={"diag"})
    assert requirements_of(P.DiagEMA()) == Requires(statistics={"diag"})
    assert requirements_of(P.Nystrom()) == Requires(tags={"psd"}, resources={"operator"})
    for bad in (
        lambda: P.DiagEMA(beta=1.0),
        lambda: P.DiagEMA(clip=0.0),
        lambda: P.Jacobi(eps=0.0),
        lambda: P.Nystrom(rank=0),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="exceeds"):
        P.Nystrom(rank=20).init(PRIMAL)
    assert hash(P.DiagEMA(beta=0.9)) == hash(P.DiagEMA(beta=0.9))
    assert P.DiagEMA(beta=0.9) != P.DiagEMA(beta=0.8)
