"""The automatic solver choice, CG's stopping rules and its loop forms.

References are dense and float64: ``numpy.linalg.solve`` for the solutions, and a
textbook CG in numpy (:func:`np_cg_history`) that records every iterate, residual and
model value, from which the stopping point of each rule is computed directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from somax_plug import compose
from somax_plug._src.kinds import LinearOperator
from somax_plug._src.operators import MatrixOperator
from somax_plug.builtin import solvers as S
from somax_plug.testing.strategies import orthogonal

LOOPS = ("while", "scan", "unroll")


# ----------------------------------------------------------------------- systems


def spd(n: int, cond: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = orthogonal(rng, n)
    return (q * np.logspace(0.0, np.log10(cond), n)) @ q.T


def indefinite(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = rng.uniform(0.5, 3.0, n) * rng.choice([-1.0, 1.0], n)
    e[0], e[1] = 2.0, -1.0
    q = orthogonal(rng, n)
    return (q * e) @ q.T


def rows_system(n: int, r: int, seed: int) -> tuple[MatrixOperator, np.ndarray, np.ndarray]:
    """``C = U^T U`` with ``r`` rows over ``n`` parameters (a dict pytree), and a rhs."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(r, n)) / np.sqrt(n)
    primal = {"a": jnp.zeros(n - n // 3), "b": jnp.zeros(n // 3)}
    return MatrixOperator.from_rows(jnp.asarray(u), primal), u, rng.normal(size=n)


def as_tree(op: LinearOperator, b: np.ndarray) -> dict:
    k = op.primal["a"].shape[0]
    return {"a": jnp.asarray(b[:k]), "b": jnp.asarray(b[k:])}


def flat(tree: dict) -> np.ndarray:
    return np.concatenate([np.asarray(tree["a"]), np.asarray(tree["b"])])


def np_cg_history(a: np.ndarray, b: np.ndarray, maxiter: int) -> tuple[list, list, list]:
    """Textbook CG from 0 in float64: iterates, residuals (recursive) and phi values."""
    x, r = np.zeros_like(b), b.copy()
    p, rr = r.copy(), r @ r
    xs, rs = [x.copy()], [r.copy()]
    for _ in range(maxiter):
        ap = a @ p
        alpha = rr / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        rr, rr_old = r @ r, rr
        p = r + (rr / rr_old) * p
        xs.append(x.copy())
        rs.append(r.copy())
    phis = [-0.5 * xi @ (ri + b) for xi, ri in zip(xs, rs, strict=True)]
    return xs, rs, phis


def residual_stop(rs: list, b: np.ndarray, tol: float, maxiter: int) -> int:
    bn = np.linalg.norm(b)
    return next((i for i in range(maxiter + 1) if np.linalg.norm(rs[i]) <= tol * bn), maxiter)


def martens_stop(phis: list, rs: list, b: np.ndarray, tol: float, eps: float,
                 maxiter: int) -> int:
    """Martens (2010): stop at i > k = max(10, i // 10) when (phi_i - phi_{i-k}) / phi_i < k eps."""
    bn = np.linalg.norm(b)
    for i in range(1, maxiter + 1):
        k = max(10, i // 10)
        if i > k and phis[i] < 0 and (phis[i] - phis[i - k]) / phis[i] < k * eps:
            return i
        if np.linalg.norm(rs[i]) <= tol * bn:
            return i
    return maxiter


def jsolve(solver, op, rhs, lam, state=()):
    """``solver.solve`` under a fresh ``jit`` (so it is traced, and records its choices)."""
    fn = jax.jit(lambda op, rhs, lam, state: solver.solve(op, rhs, lam, None, {}, state))
    return fn(op, rhs, jnp.asarray(lam), state)


# ----------------------------------------------------------------------- auto: choices


def test_auto_choose_covers_every_branch():
    auto = S.Auto()  # dense_max = 32, row_cholesky_max = 32
    assert auto.choose(20, 500, 1.0)[0] == "direct"
    assert auto.choose(300, 20, 1.0) == ("row_cholesky", "R = 20 rows < n = 300 parameters")
    choice, why = auto.choose(300, 100, 1.0)
    assert choice == "cg" and "row_cholesky_max = 32" in why and "large_rows" in why
    choice, why = S.Auto(large_rows="row_cg").choose(300, 100, 1.0)
    assert choice == "row_cg" and "row_cholesky_max = 32" in why
    assert auto.choose(300, 700, 1.0) == ("cg", "R = 700 rows >= n = 300 parameters")
    assert auto.choose(300, None, 1.0)[0] == "cg"
    choice, why = auto.choose(300, 20, 0.0)
    assert choice == "cg" and "needs lam > 0" in why
    choice, why = auto.choose(300, 20, None)
    assert choice == "row_cholesky if lam > 0 else cg" and "lax.cond" in why
    assert S.Auto(dense_max=0).choose(5, None, 1.0)[0] == "cg"


@pytest.mark.parametrize(
    ("n", "r", "want", "iters", "large_rows"),
    [
        (60, 20, "row_cholesky", 1, "cg"),  # R < n, few rows
        (60, 45, "cg", None, "cg"),  # R < n, more rows than row_cholesky_max: default
        (60, 45, "row_cg", None, "row_cg"),  # the same with large_rows="row_cg"
        (40, 96, "cg", None, "cg"),  # R >= n: the other side of the crossover
        (12, 30, "direct", 1, "cg"),  # small n
    ],
)
@pytest.mark.parametrize("lam_static", [True, False])
def test_auto_matches_a_dense_float64_solve_on_both_sides(
    n, r, want, iters, large_rows, lam_static
):
    op, u, b = rows_system(n, r, seed=n + r)
    lam = 0.05
    auto = S.Auto(tol=1e-12, maxiter=200, large_rows=large_rows)
    rhs = as_tree(op, b)
    if lam_static:
        s, info, _ = auto.solve(op, rhs, lam, None, {}, ())
    else:
        s, info, _ = jsolve(auto, op, rhs, lam)
    ref = np.linalg.solve(u.T @ u + lam * np.eye(n), b)
    np.testing.assert_allclose(flat(s), ref, rtol=1e-8, atol=1e-10)
    (choice,) = [c for c in auto.recorded_choices() if c.startswith("auto -> ")]
    picked = choice.removeprefix("auto -> ").split(":")[0]
    if want in ("direct", "cg") or lam_static:
        assert picked == want, choice
    else:
        assert picked == f"{want} if lam > 0 else cg", choice
    if iters is not None:
        assert int(info.iterations) == iters
    else:
        assert int(info.iterations) > 1


def test_auto_runs_cg_at_run_time_when_a_traced_lam_is_zero():
    n, r = 60, 20
    op, u, _ = rows_system(n, r, seed=3)
    w = np.random.default_rng(4).normal(size=r)
    b = u.T @ w  # in the range of C, so the singular system is consistent
    auto = S.Auto(tol=1e-10, maxiter=200)
    s, info, _ = jsolve(auto, op, as_tree(op, b), 0.0)
    assert int(info.iterations) > 1  # cg ran, not the row-space solve (which divides by lam)
    x = flat(s)
    assert np.all(np.isfinite(x))
    assert np.linalg.norm(u.T @ (u @ x) - b) <= 1e-8 * np.linalg.norm(b)
    s1, info1, _ = jsolve(auto, op, as_tree(op, b), 0.5)  # the same compiled solve
    assert int(info1.iterations) == 1
    np.testing.assert_allclose(flat(s1), np.linalg.solve(u.T @ u + 0.5 * np.eye(n), b),
                               rtol=1e-8)


def test_auto_falls_back_to_cg_without_row_factors_and_on_indefinite_operators():
    n = 50
    for a in (spd(n, 100.0, 1), indefinite(n, 2)):
        tags = {"psd"} if np.all(np.linalg.eigvalsh(a) > 0) else {"symmetric"}
        op = MatrixOperator(jnp.asarray(a), jnp.zeros(n), tags=tags)
        b = np.random.default_rng(5).normal(size=n)
        auto = S.Auto(tol=1e-12, maxiter=300)
        s, info, _ = jsolve(auto, op, jnp.asarray(b), 0.0)
        assert any("auto -> cg: " in c and "no row factors" in c for c in auto.recorded_choices())
        assert np.all(np.isfinite(np.asarray(s)))
        if "psd" in tags:
            np.testing.assert_allclose(np.asarray(s), np.linalg.solve(a, b), rtol=1e-8)
    # a small indefinite system takes the dense branch, which solves it exactly
    a = indefinite(10, 3)
    op = MatrixOperator(jnp.asarray(a), jnp.zeros(10), tags={"symmetric"})
    b = np.ones(10)
    s, _, _ = jsolve(S.Auto(), op, jnp.asarray(b), 0.0)
    np.testing.assert_allclose(np.asarray(s), np.linalg.solve(a, b), rtol=1e-8)


def test_auto_declares_what_it_needs():
    from somax_plug import requirements_of

    assert requirements_of(S.Auto()).tags == {"symmetric"}
    spec = S.Auto.__somax_spec__
    assert not spec.preconditioned
    assert hash(S.Auto()) == hash(S.Auto()) and S.Auto() == S.Auto()


# ----------------------------------------------------------------------- auto: explain


def regression(rows: int):
    """A tanh MLP 3-8-1 (41 parameters) on ``rows`` examples."""
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k[0], (3, 8)) / 2, "b1": jnp.zeros(8),
              "w2": jax.random.normal(k[1], (8, 1)) / 3, "b2": jnp.zeros(1)}
    x = jax.random.normal(k[2], (rows, 3))
    y = jnp.sin(x.sum(axis=1, keepdims=True))

    def predict(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    return predict, params, (x, y)


@pytest.mark.parametrize(("rows", "picked"), [(100, "cg"), (20, "row_cholesky if lam > 0")])
def test_gauss_newton_lm_uses_auto_and_explains_its_choice(rows, picked):
    predict, params, batch = regression(rows)
    method = compose(preset="gauss_newton_lm", predict_fn=predict, loss="mse")
    assert method.plan.component("solver").short_name == "auto"
    plan_text = method.plan.explain()
    assert "chosen when the step is traced, by the rule: solver: 'direct' if n <= 32" in plan_text
    assert "not traced yet" in method.explain()
    state = method.init(params)
    p, state, info = method.step(params, state, batch)
    text = method.explain()
    assert "chosen when the step was traced:" in text and "not traced yet" not in text
    assert f"auto -> {picked}" in text
    assert "n = 41 parameters" in text and f"R = {rows} rows" in text
    assert bool(info["accepted"]) and bool(info["finite"])


def test_gauss_newton_lm_converges_with_its_defaults():
    predict, params, batch = regression(100)
    method = compose(preset="gauss_newton_lm", predict_fn=predict, loss="mse")
    state = method.init(params)
    p = params
    losses = []
    for _ in range(20):
        p, state, info = method.step(p, state, batch)
        losses.append(float(info["loss"]))
    assert losses[-1] < 0.2 * losses[0]


# ----------------------------------------------------------------------- stopping rules


@pytest.mark.parametrize("loop", LOOPS)
def test_residual_rule_stops_where_the_dense_reference_does(loop):
    n, maxiter, tol = 30, 30, 1e-4
    a = spd(n, 1e2, 7)
    b = np.random.default_rng(8).normal(size=n)
    _, rs, _ = np_cg_history(a, b, maxiter)
    want = residual_stop(rs, b, tol, maxiter)
    op = MatrixOperator(jnp.asarray(a), jnp.zeros(n), tags={"psd"})
    s, info, _ = jsolve(S.CG(tol=tol, maxiter=maxiter, loop=loop), op, jnp.asarray(b), 0.0)
    assert int(info.iterations) == want < maxiter
    assert bool(info.converged)
    assert np.linalg.norm(b - a @ np.asarray(s)) <= tol * np.linalg.norm(b) * 1.0001


@pytest.mark.parametrize("loop", LOOPS)
def test_martens_rule_stops_where_the_dense_reference_does(loop):
    n, maxiter, eps = 60, 30, 5e-3  # stops at 19, with a clear margin either side
    a = spd(n, 1e2, 0)
    b = np.random.default_rng(1).normal(size=n)
    xs, rs, phis = np_cg_history(a, b, maxiter)
    want = martens_stop(phis, rs, b, 0.0, eps, maxiter)
    assert 10 < want < maxiter  # the progress test, not the residual or the budget
    op = MatrixOperator(jnp.asarray(a), jnp.zeros(n), tags={"psd"})
    solver = S.CG(tol=0.0, maxiter=maxiter, stop="martens", progress_eps=eps, loop=loop)
    s, info, _ = jsolve(solver, op, jnp.asarray(b), 0.0)
    assert int(info.iterations) == want
    assert bool(info.converged)
    np.testing.assert_allclose(np.asarray(s), xs[want], rtol=1e-7, atol=1e-9)
    # the residual rule still applies under Martens' (here it comes first)
    if loop == "while":
        tol = 0.05
        first = residual_stop(rs, b, tol, maxiter)
        solver = S.CG(tol=tol, maxiter=maxiter, stop="martens", progress_eps=eps, loop=loop)
        _, info, _ = jsolve(solver, op, jnp.asarray(b), 0.0)
        assert int(info.iterations) == first < want


def np_forcing(gnorms: list[float], tol: float, gamma=0.9, alpha=2.0, eta_max=0.9) -> list:
    """Eisenstat-Walker choice 2 with the safeguards of :class:`CG`."""
    etas = []
    for k, g in enumerate(gnorms):
        if k == 0:
            eta = min(0.5, eta_max)
        else:
            eta = gamma * (g / gnorms[k - 1]) ** alpha
            guard = gamma * etas[-1] ** alpha
            if guard > 0.1:
                eta = max(eta, guard)
        etas.append(min(max(eta, tol), eta_max))
    return etas


@pytest.mark.parametrize("loop", LOOPS)
def test_eisenstat_walker_forcing_follows_the_gradient_norms(loop):
    n, maxiter, tol = 30, 40, 1e-8
    a = spd(n, 1e2, 13)
    op = MatrixOperator(jnp.asarray(a), jnp.zeros(n), tags={"psd"})
    rng = np.random.default_rng(14)
    scales = [1.0, 0.5, 0.45, 0.05, 0.049, 1e-3]  # fast and slow decrease
    rhs = [s * rng.normal(size=n) / np.sqrt(n) for s in scales]
    etas = np_forcing([float(np.linalg.norm(b)) for b in rhs], tol)
    solver = S.CG(tol=tol, maxiter=maxiter, stop="eisenstat_walker", loop=loop)
    state = solver.init(jnp.zeros(n))
    fn = jax.jit(lambda b, st: solver.solve(op, b, jnp.asarray(0.0), None, {}, st))  # one trace
    for b, eta in zip(rhs, etas, strict=True):
        _, rs, _ = np_cg_history(a, b, maxiter)
        want = residual_stop(rs, b, eta, maxiter)
        s, info, state = fn(jnp.asarray(b), state)
        assert int(info.iterations) == want, (eta, want)
        assert float(state["forcing"]["eta"]) == pytest.approx(eta, rel=1e-9)
        assert float(state["forcing"]["gnorm"]) == pytest.approx(np.linalg.norm(b), rel=1e-12)
        assert bool(info.converged)
    assert len(set(etas)) > 3  # the tolerance really moved


class Counting(LinearOperator):
    """A matrix operator that counts the products executed at run time."""

    count = [0]

    def __init__(self, a):
        self.a = a
        self.tags = frozenset({"psd", "symmetric"})
        self.primal = jnp.zeros(a.shape[0])

    def mv(self, v):
        jax.debug.callback(lambda: Counting.count.__setitem__(0, Counting.count[0] + 1))
        return self.a @ v


jax.tree_util.register_pytree_node(
    Counting, lambda o: ((o.a,), None), lambda _, c: Counting(c[0])
)


@pytest.mark.parametrize("stop", S.STOPS)
@pytest.mark.parametrize("loop", ["while", "scan"])
def test_one_matvec_per_iteration_for_every_rule(stop, loop):
    a = spd(30, 1e4, 15)
    b = jnp.asarray(np.random.default_rng(16).normal(size=30))
    solver = S.CG(tol=1e-9, maxiter=60, stop=stop, loop=loop)
    Counting.count[0] = 0
    _, info, _ = jax.block_until_ready(jsolve(solver, Counting(jnp.asarray(a)), b, 0.0,
                                              solver.init(b)))
    jax.effects_barrier()
    assert Counting.count[0] == int(info.iterations) > 10


def test_unroll_runs_its_whole_budget_and_reports_the_iterations():
    a = spd(30, 10.0, 17)
    b = jnp.asarray(np.random.default_rng(18).normal(size=30))
    solver = S.CG(tol=1e-3, maxiter=12, loop="unroll")
    Counting.count[0] = 0
    _, info, _ = jax.block_until_ready(jsolve(solver, Counting(jnp.asarray(a)), b, 0.0))
    jax.effects_barrier()
    assert int(info.iterations) < 12 and Counting.count[0] == 12


# ----------------------------------------------------------------------- loop forms


@pytest.mark.parametrize(
    ("stop", "case"),
    [
        ("residual", "spd"),
        ("residual", "indefinite"),
        ("residual", "preconditioned"),
        ("residual", "zero"),
        ("martens", "spd"),
        ("martens", "indefinite"),
        ("eisenstat_walker", "preconditioned"),
    ],
)
def test_every_loop_form_matches_the_while_loop(stop, case):
    n = 24
    a = indefinite(n, 19) if case == "indefinite" else spd(n, 1e2, 20)
    tags = {"symmetric"} if case == "indefinite" else {"psd"}
    op = MatrixOperator(jnp.asarray(a), jnp.zeros(n), tags=tags)
    b = np.zeros(n) if case == "zero" else np.random.default_rng(21).normal(size=n)
    pinv = jnp.asarray(1.0 / np.abs(np.diag(a))) if case == "preconditioned" else None
    precond = None if pinv is None else (lambda v: pinv * v)
    results = {}
    for loop in LOOPS:
        unroll = 3 if loop == "scan" else 1
        solver = S.CG(tol=1e-6, maxiter=24, stop=stop, loop=loop, unroll=unroll)
        fn = jax.jit(lambda b, st, solver=solver: solver.solve(
            op, b, jnp.asarray(1e-3), precond, {}, st))
        results[loop] = fn(jnp.asarray(b), solver.init(jnp.zeros(n)))
    s0, info0, st0 = results["while"]
    for loop in ("scan", "unroll"):
        s, info, st = results[loop]
        assert int(info.iterations) == int(info0.iterations), loop
        assert bool(info.converged) == bool(info0.converged), loop
        np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(float(info.residual), float(info0.residual), rtol=1e-8,
                                   atol=1e-14)
        for x, y in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(st0),
                        strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12)
    if case == "zero":
        assert int(info0.iterations) == 0 and np.all(np.asarray(s0) == 0)


def conv_problem():
    """A 1D CNN (lax.conv_general_dilated) on 8 signals of length 12."""
    k = jax.random.split(jax.random.key(5), 3)
    params = {"c": jax.random.normal(k[0], (3, 1, 3)) / 2,
              "w": jax.random.normal(k[1], (36, 2)) / 6}
    x = jax.random.normal(k[2], (8, 1, 12))

    def predict(p, x):
        h = jnp.tanh(jax.lax.conv_general_dilated(x, p["c"], (1,), "SAME"))
        return h.reshape(h.shape[0], -1) @ p["w"]

    return predict, params, (x, jnp.zeros((8, 2)))


def test_auto_loop_unrolls_convolutions_on_cpu_only_within_its_budget():
    predict, params, batch = conv_problem()
    for maxiter, want in ((6, "unroll"), (40, "while")):
        method = compose("ggn", {"name": "cg", "maxiter": maxiter, "unroll_max": 32},
                         damping={"name": "constant", "lam": 0.1}, predict_fn=predict,
                         loss="mse")
        assert "loop form: 'unroll' on the CPU backend" in method.plan.explain()
        method.step(params, method.init(params), batch)
        text = method.explain()
        assert f"cg loop -> {want}: " in text, text
        if jax.default_backend() == "cpu":
            assert "conv_general_dilated" in text
    mlp_pred, mlp_params, mlp_batch = regression(20)
    method = compose("ggn", "cg", predict_fn=mlp_pred, loss="mse")
    method.step(mlp_params, method.init(mlp_params), mlp_batch)
    assert "cg loop -> while: no convolution" in method.explain()
    fixed = compose("ggn", {"name": "cg", "loop": "while"}, predict_fn=mlp_pred, loss="mse")
    assert "chosen when the step is traced" not in fixed.plan.explain()
    assert "not traced yet" not in fixed.explain()


@pytest.mark.parametrize("loop", ["auto", *LOOPS])
def test_conv_cg_gives_the_same_step_in_every_loop_form(loop):
    predict, params, batch = conv_problem()
    out = {}
    for form in ("while", loop):
        method = compose("ggn", {"name": "cg", "maxiter": 8, "loop": form},
                         damping={"name": "constant", "lam": 0.1}, predict_fn=predict,
                         loss="mse")
        out[form] = method.step(params, method.init(params), batch)
    (p0, _, i0), (p1, _, i1) = out["while"], out[loop]
    assert int(i0["solver_iterations"]) == int(i1["solver_iterations"])
    for x, y in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(p1), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------- jit and scan


def test_steps_compile_once():
    predict, params, batch = conv_problem()
    for solver in ({"name": "cg", "maxiter": 6, "stop": "eisenstat_walker"}, "auto"):
        method = compose("ggn", solver, damping={"name": "levenberg_marquardt"},
                         predict_fn=predict, loss="mse")
        state, p = method.init(params), params
        for i in range(3):
            p, state, _ = method.step(p, state, batch, jax.random.key(i))
        assert method._step_jit._cache_size() == 1


@pytest.mark.parametrize(
    "solver",
    [
        {"name": "cg", "maxiter": 6, "stop": "eisenstat_walker", "loop": "unroll"},
        {"name": "cg", "maxiter": 12, "stop": "martens", "loop": "scan"},
        {"name": "cg", "maxiter": 6, "loop": "auto", "warm_start": True},
        "auto",
    ],
)
def test_steps_run_inside_lax_scan_with_stable_state(solver):
    predict, params, batch = regression(20)
    method = compose("ggn", solver, damping={"name": "levenberg_marquardt"},
                     predict_fn=predict, loss="mse")
    state0 = method.init(params)

    def body(carry, key):
        p, st = carry
        p, st, info = method._step(p, st, batch, key)
        return (p, st), (info["loss"], info["solver_iterations"])

    (_, state), (losses, iters) = jax.lax.scan(body, (params, state0),
                                               jax.random.split(jax.random.key(0), 5))
    shapes = lambda t: jax.tree_util.tree_map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), t)
    assert shapes(state) == shapes(state0)
    assert np.all(np.isfinite(np.asarray(losses))) and float(losses[-1]) < float(losses[0])
    assert np.all(np.asarray(iters) >= 1)


def test_cg_options_are_checked_at_compose_time():
    from somax_plug import OptionError

    for bad in ({"loop": "fori"}, {"stop": "never"}, {"forcing_max": 1.0}, {"unroll": 0},
                {"forcing_alpha": 3.0}, {"progress_eps": 0.0}):
        with pytest.raises(OptionError):
            compose("ggn", {"name": "cg", **bad}, predict_fn=lambda p, x: x @ p, loss="mse")
    with pytest.raises(OptionError):
        compose("ggn", {"name": "auto", "dense_max": -1}, predict_fn=lambda p, x: x @ p,
                loss="mse")
    assert S.CG().warm_start is False  # warm starts stay off (unsafe on minibatches)
