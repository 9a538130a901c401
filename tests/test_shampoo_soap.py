"""Shampoo and SOAP preconditioners against dense float64 references written here.

The references are NumPy (float64, ``numpy.linalg.eigh``), independent of the
component's JAX code: Shampoo's ``L^-1/4 G R^-1/4`` per block, SOAP as
``optax.scale_by_adam`` run on ``Q_L^T G Q_R`` and rotated back, and SOAP's update
with basis refreshes re-derived step by step. Tolerances: float64 throughout, so
1e-9 relative (eigh of well-conditioned factors, a few matrix products).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from somax_plug import CompositionError, InputError, as_optax, compose
from somax_plug.builtin.shampoo import SOAP, Shampoo, from_blocks, layout_of, to_blocks
from tests.reliability import Case, check_corpus

RTOL = 1e-9  # float64 eigh and products on factors with condition number < 1e4


def np_root(a: np.ndarray, e: float, eps: float) -> np.ndarray:
    w, q = np.linalg.eigh((a + a.T) / 2)
    return (q * (np.maximum(w, 0) + eps) ** (-e)) @ q.T


def grads(seed: int, shape: tuple[int, ...], n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for _ in range(n)]


def run(pre, gs, like):
    """Update with each gradient, apply to it; the outputs (jitted once, float64)."""

    @jax.jit
    def one(state, g):
        state = pre.update({"grad": g}, {}, 0.0, None, state)
        return state, pre.apply(state, g, 0.0)

    state, outs = pre.init(like), []
    for g in gs:
        state, out = one(state, jax.tree_util.tree_map(jnp.asarray, g))
        outs.append(jax.tree_util.tree_map(np.asarray, out))
    return state, outs


# ------------------------------------------------------------------------- shampoo


@pytest.mark.parametrize("every", [1, 3])
def test_shampoo_full_block_is_l_quarter_g_r_quarter(every):
    """One [6, 4] matrix, one block: the direction is c L^-1/4 G R^-1/4 (c = 1, no graft),
    with L, R the bias-corrected EMAs and the roots refreshed every ``every`` updates."""
    beta, eps = 0.9, 1e-6
    pre = Shampoo(graft="none", beta2=beta, eps=eps, precondition_every=every)
    gs = grads(0, (6, 4), 5)
    _, outs = run(pre, gs, jnp.zeros((6, 4)))
    big_l, big_r = np.zeros((6, 6)), np.zeros((4, 4))
    for t, (g, out) in enumerate(zip(gs, outs, strict=True)):
        big_l = beta * big_l + (1 - beta) * g @ g.T
        big_r = beta * big_r + (1 - beta) * g.T @ g
        if t % every == 0:
            corr = 1 - beta ** (t + 1)
            lr, rr = np_root(big_l / corr, 0.25, eps), np_root(big_r / corr, 0.25, eps)
        np.testing.assert_allclose(out, lr @ g @ rr, rtol=RTOL, atol=1e-12, err_msg=f"step {t}")


def test_shampoo_blocks_each_block_likewise():
    """A [7, 5] matrix in blocks of at most 3: 3x2 blocks (3, 3, 1 rows; 3, 2 columns),
    each preconditioned by its own factors, the padding invisible."""
    eps = 1e-8
    pre = Shampoo(graft="none", beta2=1.0, eps=eps, block_size=3, precondition_every=1)
    lay = layout_of((7, 5), 3, "merge_leading", None)
    assert (lay.nbr, lay.nbc, lay.br, lay.bc) == (3, 2, 3, 3)
    gs = grads(1, (7, 5), 3)
    _, outs = run(pre, gs, jnp.zeros((7, 5)))
    rows, cols = [(0, 3), (3, 6), (6, 7)], [(0, 3), (3, 5)]
    for t in range(3):
        want = np.zeros((7, 5))
        for r0, r1 in rows:
            for c0, c1 in cols:
                big_l = sum(g[r0:r1, c0:c1] @ g[r0:r1, c0:c1].T for g in gs[: t + 1])
                big_r = sum(g[r0:r1, c0:c1].T @ g[r0:r1, c0:c1] for g in gs[: t + 1])
                gb = gs[t][r0:r1, c0:c1]
                want[r0:r1, c0:c1] = np_root(big_l, 0.25, eps) @ gb @ np_root(big_r, 0.25, eps)
        np.testing.assert_allclose(outs[t], want, rtol=RTOL, atol=1e-12, err_msg=f"step {t}")


@given(shape=st.lists(st.integers(1, 9), min_size=0, max_size=4).map(tuple),
       block=st.integers(2, 5))
def test_layout_blocks_round_trip_and_cover_the_matrix(shape, block):
    """Every shape gets a layout; blocks of the merged matrix round-trip exactly and each
    block is the matching slice of the matrix (zeros where padded)."""
    lay = layout_of(shape, block, "merge_leading", None)
    x = np.arange(1, math.prod(shape) + 1, dtype=np.float64).reshape(shape)
    if lay.kind == "diagonal":
        assert len(shape) < 2 or min(math.prod(shape[:-1]), shape[-1]) == 1
        return
    assert lay.br <= block and lay.bc <= block
    blocks = np.asarray(to_blocks(jnp.asarray(x), lay))
    np.testing.assert_array_equal(np.asarray(from_blocks(jnp.asarray(blocks), lay)), x)
    m = x.reshape(lay.rows, lay.cols)
    for i in range(lay.nbr):
        for j in range(lay.nbc):
            want = np.zeros((lay.br, lay.bc))
            part = m[i * lay.br:(i + 1) * lay.br, j * lay.bc:(j + 1) * lay.bc]
            want[: part.shape[0], : part.shape[1]] = part
            np.testing.assert_array_equal(blocks[i * lay.nbc + j], want)


@pytest.mark.parametrize("graft", ["adam", "sgd"])
def test_grafting_norms_match(graft):
    """Per block, ||direction|| = ||Adam's step|| (or ||G||, SGD) on the same gradient;
    the diagonal fallback of a vector is Adam's step itself."""
    b2, geps = 0.99, 1e-8
    pre = Shampoo(graft=graft, graft_beta2=b2, graft_eps=geps, block_size=4)
    rng = np.random.default_rng(2)
    gs = [{"w": rng.normal(size=(8, 6)), "b": rng.normal(size=6)} for _ in range(3)]
    like = jax.tree_util.tree_map(jnp.zeros_like, gs[0])
    _, outs = run(pre, gs, like)
    v = {"w": np.zeros((8, 6)), "b": np.zeros(6)}
    for t, (g, out) in enumerate(zip(gs, outs, strict=True)):
        adam = {}
        for k in v:
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            adam[k] = g[k] / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + geps)
        ref = adam["w"] if graft == "adam" else g["w"]
        for r0 in (0, 4):
            for c0 in (0, 4):
                blk = np.s_[r0:r0 + 4, c0:c0 + 4]
                np.testing.assert_allclose(np.linalg.norm(out["w"][blk]),
                                           np.linalg.norm(ref[blk]), rtol=1e-10)
        if graft == "adam":
            np.testing.assert_allclose(out["b"], adam["b"], rtol=1e-10)
        else:
            np.testing.assert_allclose(np.linalg.norm(out["b"]), np.linalg.norm(g["b"]),
                                       rtol=1e-10)


def test_more_than_two_axes_reshape_rule_or_diagonal_and_explain_says_which():
    """A [3, 3, 2, 4] (HWIO) kernel: merged into [18, 4], or the diagonal fallback."""
    g = grads(3, (3, 3, 2, 4), 1)[0]
    eps = 1e-6
    merged = Shampoo(graft="none", beta2=1.0, eps=eps)
    _, (out,) = run(merged, [g], jnp.zeros(g.shape))
    m = g.reshape(18, 4)
    want = np_root(m @ m.T, 0.25, eps) @ m @ np_root(m.T @ m, 0.25, eps)
    np.testing.assert_allclose(out, want.reshape(g.shape), rtol=RTOL, atol=1e-12)
    diag = Shampoo(graft="none", reshape="diagonal", graft_eps=1e-8)
    _, (out_d,) = run(diag, [g], jnp.zeros(g.shape))
    np.testing.assert_allclose(out_d, g / (np.abs(g) + 1e-8), rtol=1e-10)

    def mlp(p, x):
        return x.reshape(x.shape[0], -1) @ p["k"].reshape(18, 4) + p["b"]

    for reshape, says in (("merge_leading", "4 axes merged into rows: [18, 4]"),
                          ("diagonal", "4 axes: diagonal fallback (reshape='diagonal')")):
        method = compose(preconditioner={"name": "shampoo", "reshape": reshape},
                         solver="identity", predict_fn=mlp, loss="mse")
        assert "> 2 axes ->" in method.plan.explain()
        method.init({"k": jnp.zeros((3, 3, 2, 4)), "b": jnp.zeros(4)})
        text = method.explain()
        assert f"['k'] (3, 3, 2, 4): {says}" in text, text
        assert "['b'] (4,): 1-axis: diagonal fallback" in text


# ---------------------------------------------------------------------------- soap


def test_soap_is_adam_on_the_rotated_gradient():
    """With one basis (refresh at the first update only), ten composed steps of SOAP
    equal optax.scale_by_adam run on Q_L^T G Q_R, rotated back, Q from the first
    gradient's factors (the first moment is the identity solver's momentum)."""
    b1, b2, eps, lr = 0.9, 0.95, 1e-8, 0.05
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(16, 4)), rng.normal(size=(16, 4))  # G: 4x4, full rank

    def model(p, x):
        return x @ p

    def grad_of(p):
        return jax.grad(lambda p: 0.5 * jnp.mean(jnp.sum((x @ p - y) ** 2, -1)))(p)

    method = compose(
        preconditioner={"name": "soap", "beta2": b2, "eps": eps, "precondition_every": 1000},
        solver={"name": "identity", "momentum": b1, "bias_correction": True},
        predict_fn=model, loss="mse", learning_rate=lr,
    )
    p0 = jnp.asarray(rng.normal(size=(4, 4)))
    ours, state = p0, method.init(p0)
    g0 = np.asarray(grad_of(p0))
    ql, qr = np.linalg.eigh(g0 @ g0.T)[1], np.linalg.eigh(g0.T @ g0)[1]
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    ref, adam_state = np.asarray(p0), adam.init(jnp.zeros((4, 4)))
    for t in range(10):
        ours, state, _ = method.step(ours, state, (x, y), jax.random.key(t))
        g = np.asarray(grad_of(jnp.asarray(ref)))
        u, adam_state = adam.update(jnp.asarray(ql.T @ g @ qr), adam_state)
        ref = ref - lr * ql @ np.asarray(u) @ qr.T
        # Adam divides by sqrt(v) + 1e-8, and Q_L^T G_0 Q_R is diagonal: its off-diagonal
        # rounding (~1e-17) over ~1e-8 moves the first step by up to ~1e-9
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6, atol=1e-9,
                                   err_msg=f"step {t}")


def np_qr_basis(f: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The authors' refresh in float64: sort q's columns by diag(q^T f q) (descending),
    one power step f q, QR, column signs fixed so that R's diagonal is positive."""
    q = q[:, np.argsort(-np.diag(q.T @ f @ q), kind="stable")]
    qn, r = np.linalg.qr(f @ q)
    return qn * np.where(np.diag(r) < 0, -1.0, 1.0)


def soap_reference(gs, b2, sb, eps, k, refresh, left=True, right=True):
    """SOAP's outputs step by step (float64): factors, bases (eigh at the first refresh,
    then eigh or the QR power step), the second moment carried into the new basis as
    (P_L o P_L)^T v (P_R o P_R), Adam's denominator; a side not rotated keeps Q = I."""
    m, n = gs[0].shape
    big_l, big_r, ql, qr, v = np.zeros((m, m)), np.zeros((n, n)), np.eye(m), np.eye(n), 0.0
    outs = []
    for t, g in enumerate(gs):
        big_l = sb * big_l + (1 - sb) * g @ g.T
        big_r = sb * big_r + (1 - sb) * g.T @ g
        if t % k == 0:
            if refresh == "eigh" or t == 0:
                nl, nr = np.linalg.eigh(big_l)[1], np.linalg.eigh(big_r)[1]
            else:
                nl, nr = np_qr_basis(big_l, ql), np_qr_basis(big_r, qr)
            nl, nr = (nl if left else np.eye(m)), (nr if right else np.eye(n))
            pl, pr = ql.T @ nl, qr.T @ nr
            v = (pl**2).T @ (v * np.ones((m, n))) @ pr**2
            ql, qr = nl, nr
        v = b2 * v + (1 - b2) * (ql.T @ g @ qr) ** 2
        outs.append(ql @ ((ql.T @ g @ qr) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)) @ qr.T)
    return outs


@pytest.mark.parametrize("refresh", ["eigh", "qr"])
def test_soap_with_refreshes_matches_a_dense_reference(refresh):
    """Basis refreshed every 2 updates, by eigh each time or (after the first) by the
    authors' power step + QR: equal to :func:`soap_reference` in float64."""
    b2, sb, eps, k = 0.9, 0.8, 1e-8, 2
    pre = SOAP(beta2=b2, shampoo_beta=sb, eps=eps, precondition_every=k, refresh=refresh)
    # square gradients: full-rank factors from the first step (in a null direction of
    # L the rotated gradient is rounding, and Adam's ratio of it is not reproducible)
    gs = grads(5, (4, 4), 6)
    _, outs = run(pre, gs, jnp.zeros((4, 4)))
    wants = soap_reference(gs, b2, sb, eps, k, refresh)
    for t, (out, want) in enumerate(zip(outs, wants, strict=True)):
        # eigh's bases are unique up to signs, and the direction is invariant to them. At
        # step 0 Q_L^T G Q_R is diagonal (G's singular values): its off-diagonal entries
        # are rounding (~1e-17) divided by sqrt(v) + eps ~ 1e-8, hence atol 1e-6 there
        np.testing.assert_allclose(out, want, rtol=1e-8, atol=1e-6 if t == 0 else 1e-11,
                                   err_msg=f"step {t}")


def test_soap_qr_refresh_tracks_the_eigenbasis():
    """Repeated power steps + QR on a fixed SPD factor converge to its eigh basis
    (columns by descending eigenvalue, up to signs)."""
    from somax_plug.builtin.shampoo import qr_basis

    rng = np.random.default_rng(7)
    u = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    f = (u * np.array([9.0, 4.0, 2.0, 1.0, 0.5])) @ u.T
    q = jnp.eye(5)
    for _ in range(60):
        q = qr_basis(jnp.asarray(f), q)
    np.testing.assert_allclose(np.abs(np.asarray(q).T @ u), np.eye(5), atol=1e-8)
    np.testing.assert_allclose(np.asarray(q).T @ np.asarray(q), np.eye(5), atol=1e-12)


def test_soap_one_sided_above_max_precond_dim():
    """A [3, 6] matrix with max_precond_dim=4: the 6 columns keep no factor and are not
    rotated (Q_R = I), the rows are; equal to the float64 reference; explain says so."""
    b2, sb, eps, k = 0.9, 0.8, 1e-8, 2
    pre = SOAP(beta2=b2, shampoo_beta=sb, eps=eps, precondition_every=k, max_precond_dim=4)
    gs = grads(8, (3, 6), 5)
    state, outs = run(pre, gs, jnp.zeros((3, 6)))
    assert set(state["leaves"][0]) == {"L", "QL", "v"}
    for t, (out, want) in enumerate(zip(outs, soap_reference(gs, b2, sb, eps, k, "qr",
                                                             right=False), strict=True)):
        np.testing.assert_allclose(out, want, rtol=1e-8, atol=1e-6 if t == 0 else 1e-11,
                                   err_msg=f"step {t}")
    assert "not rotated: columns 6 > max_precond_dim=4" in pre.recorded_choices()[0]


# ---------------------------------------------------------- in a step, scan, optax, pcg


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def mlp_problem(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": (0.5 * jax.random.normal(k[0], (6, 8))).astype(dtype), "b1": jnp.zeros(8, dtype),
        "w2": (0.5 * jax.random.normal(k[1], (8, 3))).astype(dtype), "b2": jnp.zeros(3, dtype),
    }
    x = jax.random.normal(k[2], (48, 6)).astype(dtype)
    y = jax.random.randint(k[3], (48,), 0, 3)
    return params, (x, y)


def ce(p, batch):
    x, y = batch
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(mlp(p, x), y))


@pytest.mark.parametrize("preset", ["shampoo", "soap"])
def test_preset_step_runs_inside_lax_scan(preset):
    """Fixed state shapes: 12 steps in one lax.scan equal 12 jitted Python-loop steps
    (the roots / basis refreshed at steps 0 and 10 inside both)."""
    params, batch = mlp_problem()
    method = compose(preset=preset, predict_fn=mlp, loss="softmax_cross_entropy")
    keys = jax.random.split(jax.random.key(1), 12)

    def body(carry, key):
        p, s = carry
        p, s, info = method.step(p, s, batch, key)
        return (p, s), info["loss"]

    (p_scan, s_scan), losses = jax.lax.scan(body, (params, method.init(params)), keys)
    p, s = params, method.init(params)
    for key in keys:
        p, s, _ = method.step(p, s, batch, key)
    for a, b in zip(jax.tree_util.tree_leaves(p_scan), jax.tree_util.tree_leaves(p),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert int(s_scan.preconditioner["count"]) == 12
    assert float(losses[-1]) < float(losses[0])


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_standalone_in_optax_chain_with_weight_decay_and_cosine_schedule(name):
    params, batch = mlp_problem()
    tx = optax.chain(
        as_optax(preconditioner=name, solver={"name": "identity", "momentum": 0.9},
                 predict_fn=mlp, loss="softmax_cross_entropy"),
        optax.add_decayed_weights(1e-4),
        optax.scale_by_learning_rate(optax.cosine_decay_schedule(0.02, 40)),
    )
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(ce)(p, batch)
        u, s = tx.update(g, s, p, batch=batch)
        return optax.apply_updates(p, u), s

    start = float(ce(params, batch))
    for _ in range(40):
        params, state = step(params, state)
    assert float(ce(params, batch)) < 0.8 * start


@functools.cache
def _ggn_cg_trajectory(name: str, eps: float | None) -> dict:
    """Ten GGN-CG steps on the float64 MLP with preconditioner ``name`` (cached: the plain
    CG trajectory is shared by both parametrizations)."""
    params, batch = mlp_problem(jnp.float64)
    pre = name if eps is None else {"name": name, "eps": eps}
    method = compose(curvature="ggn", preconditioner=pre,
                     solver={"name": "cg", "tol": 1e-10, "maxiter": 200},
                     damping={"name": "constant", "lam": 1e-1},
                     predict_fn=mlp, loss="softmax_cross_entropy", learning_rate=1.0)
    p, state = params, method.init(params)
    for t in range(10):
        p, state, info = method.step(p, state, batch, jax.random.key(t))
        assert bool(info["solver_converged"]), (pre, t, info["solver_residual"])
    return p


@pytest.mark.parametrize(("name", "eps"), [("shampoo", 1e-4), ("soap", 1e-2)])
def test_as_pcg_preconditioner_of_cg_on_the_ggn(name, eps):
    """GGN-CG preconditioned by Shampoo / SOAP solves the same damped system as plain CG
    (the preconditioner is linear SPD): ten steps converge every solve and follow plain
    CG's trajectory. (A larger eps than the first-order defaults: with 1e-12 / 1e-8 the
    factors' null directions make M^-1 ill-conditioned and CG needs ~n iterations.)"""
    params, batch = mlp_problem(jnp.float64)
    ours, plain = _ggn_cg_trajectory(name, eps), _ggn_cg_trajectory("identity", None)
    assert float(ce(ours, batch)) < 0.5 * float(ce(params, batch))
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(plain),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)


def test_pcg_direction_equals_the_dense_solve():
    """One PCG solve against numpy.linalg.solve on the dense damped GGN (float64)."""
    from jax.flatten_util import ravel_pytree

    from somax_plug.builtin.solvers import CG

    params, batch = mlp_problem(jnp.float64)
    flat, unravel = ravel_pytree(params)
    x, y = batch

    jac = np.asarray(jax.jit(jax.jacfwd(lambda f: mlp(unravel(f), x)))(flat))  # [B, K, n]
    prob = np.asarray(jax.nn.softmax(mlp(params, x)))
    hess = (np.einsum("bk,kl->bkl", prob, np.eye(3)) - np.einsum("bk,bl->bkl", prob, prob))
    ggn = np.einsum("bkn,bkl,blm->nm", jac, hess / x.shape[0], jac)
    g = jax.jit(jax.grad(ce))(params, batch)
    lam = 1e-1
    want = np.linalg.solve(ggn + lam * np.eye(flat.size), np.asarray(ravel_pytree(g)[0]))
    for pre in (Shampoo(), SOAP()):
        state = jax.jit(lambda g, pre=pre: pre.update({"grad": g}, {}, lam, None,
                                                      pre.init(params)))(g)

        class Op:
            primal = params
            tags = frozenset({"psd", "symmetric"})

            def mv(self, v):
                return unravel(jnp.asarray(ggn) @ ravel_pytree(v)[0])

        op = Op()
        solve = jax.jit(lambda st, g, pre=pre, op=op: CG(tol=1e-12, maxiter=300).solve(
            op, g, lam, lambda v: pre.apply(st, v, lam), {}, ()))
        s, info, _ = solve(state, g)
        np.testing.assert_allclose(np.asarray(ravel_pytree(s)[0]), want, rtol=1e-7, atol=1e-10)
        assert bool(info.converged)


# ------------------------------------------------------------------------ bad input


def _compose(**pre):
    return lambda: compose(preconditioner=pre, solver="identity", predict_fn=mlp,
                           loss="softmax_cross_entropy")


def test_bad_inputs_are_refused_with_clear_errors():
    bad = [
        ("shampoo", "exponent", 0.0, "> 0 and <= 0.5"),
        ("shampoo", "exponent", 0.75, "> 0 and <= 0.5"),
        ("shampoo", "block_size", 1, ">= 2"),
        ("shampoo", "block_size", 100_000, "<= 8192"),
        ("shampoo", "precondition_every", 0, ">= 1"),
        ("shampoo", "eps", 0.0, "> 0"),
        ("shampoo", "eps", -1e-12, "> 0"),
        ("shampoo", "eps", float("nan"), "finite"),
        ("shampoo", "graft", "adagrad", "'adam', 'sgd', 'none'"),
        ("shampoo", "beta2", 1.5, "<= 1"),
        ("shampoo", "reshape", "split", "'merge_leading', 'diagonal'"),
        ("soap", "beta2", 1.0, "< 1"),
        ("soap", "eps", 0.0, "> 0"),
        ("soap", "precondition_every", -3, ">= 1"),
        ("soap", "block_size", 1, ">= 2"),
        ("soap", "max_dim", 1, ">= 2"),
        ("soap", "refresh", "lanczos", "'qr', 'eigh'"),
        ("soap", "max_precond_dim", 0, ">= 1"),
    ]
    cases = [
        Case(f"{name} {opt}={value!r}", _compose(name=name, **{opt: value}),
             error=CompositionError, says=(name, f"'{opt}'", repr(value), allowed))
        for name, opt, value, allowed in bad
    ]
    params, _ = mlp_problem()
    for pre in (Shampoo(), SOAP()):
        other = {"w": jnp.zeros((3, 3))}
        cases.append(Case(f"{pre.name}: state of other parameters",
                          lambda pre=pre, other=other: pre.apply(pre.init(params), other, 0.0),
                          error=InputError, says=("state was made for other parameters",
                                                  "init(params)")))
        cases.append(Case(f"{pre.name}: update without a gradient",
                          lambda pre=pre: pre.update({}, {}, 0.0, None, pre.init(params)),
                          error=CompositionError, says=("'grad'",)))
    # a non-finite gradient is a rejected step, not a poisoned state
    method = compose(preset="shampoo", predict_fn=mlp, loss="softmax_cross_entropy")

    def nan_batch():
        p, batch = mlp_problem()
        state = method.init(p)
        x = batch[0].at[0, 0].set(jnp.nan)
        p2, state2, info = method.step(p, state, (x, batch[1]), jax.random.key(0))
        assert not bool(info["accepted"])
        for a, b in zip(jax.tree_util.tree_leaves(state2.preconditioner),
                        jax.tree_util.tree_leaves(state.preconditioner), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))

    cases.append(Case("non-finite batch: step rejected, state kept", nan_batch, expect="ok"))
    counts = check_corpus("shampoo/soap bad inputs", cases)
    assert counts["named"] == len(bad) + 4 and counts["ok"] == 1
