"""Solvers against dense float64 solves on random systems of chosen conditioning.

Systems are ``Q diag(e) Q^T`` with a random orthogonal Q (SPD with a chosen condition
number, or symmetric indefinite with random signs), acting on pytree layouts through
:class:`~somax_plug._src.operators.MatrixOperator`. To keep compilation affordable, most
properties draw the layout from a small pool (so one jitted solve serves many
examples) while the matrices, right-hand sides, conditioning and damping vary freely;
:func:`test_cg_on_random_pytree_layouts` draws fully random layouts.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from somax_plug import requirements_of
from somax_plug._src.errors import CompositionError, InputError
from somax_plug._src.kinds import LinearOperator, SolverInfo
from somax_plug._src.operators import MatrixOperator
from somax_plug._src.spec import Requires
from somax_plug.builtin import solvers as S
from somax_plug.testing.strategies import orthogonal
from somax_plug.testing.strategies import unravel_numpy as make_tree

TOL = 1e-10
MAXITER = 200

# ----------------------------------------------------------------------- strategies


@st.composite
def structures(draw: st.DrawFn, n: int) -> tuple[str, tuple[tuple[int, ...], ...]]:
    """A random pytree layout for n scalars: ("dict" | "tuple" | "nested", leaf shapes)."""
    k = draw(st.integers(1, min(4, n)))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1)))
    sizes = np.diff([0, *cuts, n]).tolist()
    shapes = []
    for m in sizes:
        divisors = [d for d in range(2, m) if m % d == 0]
        if m == 1 and draw(st.booleans()):
            shapes.append(())
        elif divisors and draw(st.booleans()):
            d = draw(st.sampled_from(divisors))
            shapes.append((d, m // d))
        else:
            shapes.append((m,))
    return draw(st.sampled_from(["dict", "tuple", "nested"])), tuple(shapes)


POOL = {6: ("dict", ((2,), (2, 2))), 9: ("nested", ((3, 2), (), (2,)))}
"""Layouts the accuracy properties draw from (n -> layout): one compile per solver each."""


def spd_matrix(rng: np.random.Generator, n: int, cond: float) -> np.ndarray:
    e = np.logspace(0.0, math.log10(cond), n)
    q = orthogonal(rng, n)
    return (q * rng.permutation(e)) @ q.T


def indefinite_matrix(rng: np.random.Generator, n: int) -> np.ndarray:
    e = rng.uniform(0.5, 5.0, size=n) * rng.choice([-1.0, 1.0], size=n)
    e[0], e[1] = 1.0, -1.0  # both signs present
    q = orthogonal(rng, n)
    return (q * e) @ q.T


@st.composite
def systems(draw: st.DrawFn, kind: str = "spd", sizes: tuple[int, ...] = tuple(POOL)):
    """(op, rhs, lam, dense damped matrix, flat rhs) for a random system."""
    n = draw(st.sampled_from(sizes))
    structure = POOL[n]
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if kind == "spd":
        c = spd_matrix(rng, n, draw(st.sampled_from([1.0, 10.0, 1e2, 1e3])))
        lam = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]))
        tags = {"psd"}
    else:
        c = indefinite_matrix(rng, n)
        lam = 0.0
        tags = {"symmetric"}
    op = MatrixOperator(jnp.asarray(c), make_tree(np.zeros(n), structure), tags=tags)
    b = rng.normal(size=n) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return op, make_tree(b, structure), lam, c + lam * np.eye(n), b


@st.composite
def row_systems(draw: st.DrawFn):
    """C = U^T U with R = 4 < n = 9 rows, on a pooled layout."""
    n = 9
    structure = POOL[n]
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    u = rng.normal(size=(4, n)) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    lam = draw(st.sampled_from([1e-2, 0.1, 1.0, 10.0]))
    op = MatrixOperator.from_rows(jnp.asarray(u), make_tree(np.zeros(n), structure))
    b = rng.normal(size=n)
    return op, make_tree(b, structure), lam, u.T @ u + lam * np.eye(n), b


# ----------------------------------------------------------------------- helpers


def jsolve(solver, op, rhs, lam, stats=None, state=(), pinv=None):
    """``solver.solve`` under jit; ``pinv`` (a dense M^-1) gives the preconditioner."""
    return _jsolve(solver, op, rhs, lam, stats, state, pinv)  # positional: one cache


@functools.partial(jax.jit, static_argnums=0)
def _jsolve(solver, op, rhs, lam, stats, state, pinv):
    precond = None
    if pinv is not None:
        _, unravel = ravel_pytree(rhs)

        def precond(v):
            return unravel(pinv @ ravel_pytree(v)[0])

    return solver.solve(op, rhs, lam, precond, stats or {}, state)


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


def true_residual(a: np.ndarray, s: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(b - a @ s) / np.linalg.norm(b))


def check_info(info: SolverInfo) -> None:
    assert info.iterations.dtype == jnp.int32 and info.iterations.shape == ()
    assert info.converged.dtype == jnp.bool_ and info.converged.shape == ()
    assert info.residual.shape == ()


def np_pcg(a: np.ndarray, b: np.ndarray, minv: np.ndarray, iters: int) -> np.ndarray:
    """Textbook preconditioned CG in numpy, ``iters`` iterations from zero."""
    x, r = np.zeros_like(b), b.copy()
    z = minv @ r
    p, rz = z.copy(), r @ z
    for _ in range(iters):
        ap = a @ p
        alpha = rz / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        z = minv @ r
        rz, rz_old = r @ z, rz
        p = z + (rz / rz_old) * p
    return x


MATVECS = [0]
"""Matvecs executed by :class:`CountingOperator` (incremented by a debug callback)."""


def _tick() -> None:
    MATVECS[0] += 1


@jax.tree_util.register_pytree_node_class
class CountingOperator(LinearOperator):
    """Wraps an operator and counts the matvecs actually executed at run time."""

    def __init__(self, inner: LinearOperator) -> None:
        self.inner = inner
        self.tags = inner.tags

    @property
    def primal(self):
        return self.inner.primal

    def mv(self, v):
        jax.debug.callback(_tick)
        return self.inner.mv(v)

    def tree_flatten(self):
        return (self.inner,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0])


def count_matvecs(fn, *args):
    MATVECS[0] = 0
    out = jax.block_until_ready(fn(*args))
    jax.effects_barrier()
    return out, MATVECS[0]


SPD_SOLVERS = (S.CG(tol=TOL, maxiter=MAXITER), S.MINRES(tol=TOL, maxiter=MAXITER), S.Direct())


# ----------------------------------------------------------------------- accuracy


@given(systems("spd"))
def test_cg_minres_direct_match_dense_solve_on_spd(system):
    op, rhs, lam, a, b = system
    ref = np.linalg.solve(a, b)
    kappa = np.linalg.cond(a)
    for solver in SPD_SOLVERS:
        s, info, _ = jsolve(solver, op, rhs, lam)
        check_info(info)
        assert jax.tree_util.tree_structure(s) == jax.tree_util.tree_structure(rhs)
        assert bool(info.converged), (type(solver).__name__, info)
        assert float(info.residual) <= TOL
        assert true_residual(a, flat(s), b) <= 100 * TOL
        assert rel_err(flat(s), ref) <= 100 * kappa * TOL + 1e-12


@jax.jit
def scipy_cg(a, b):
    return jax.scipy.sparse.linalg.cg(a, b, tol=TOL, maxiter=MAXITER)[0]


@given(systems("spd"))
def test_cg_agrees_with_jax_scipy_cg(system):
    op, rhs, lam, a, b = system
    ref = scipy_cg(jnp.asarray(a), jnp.asarray(b))
    s, info, _ = jsolve(SPD_SOLVERS[0], op, rhs, lam)
    assert rel_err(flat(s), np.asarray(ref)) <= 1e3 * np.linalg.cond(a) * TOL


@given(st.integers(3, 12).flatmap(lambda n: st.tuples(st.just(n), structures(n))), st.data())
def test_cg_on_random_pytree_layouts(layout, data):
    n, structure = layout
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    a = spd_matrix(rng, n, 100.0)
    op = MatrixOperator(jnp.asarray(a), make_tree(np.zeros(n), structure), tags={"psd"})
    b = rng.normal(size=n)
    s, info, _ = jsolve(SPD_SOLVERS[0], op, make_tree(b, structure), 0.5)
    assert jax.tree_util.tree_structure(s) == jax.tree_util.tree_structure(op.primal)
    assert bool(info.converged)
    assert rel_err(flat(s), np.linalg.solve(a + 0.5 * np.eye(n), b)) <= 1e-7


@given(row_systems())
def test_every_lane_gives_the_dense_direction_on_row_space_systems(system):
    """Parameter space (cg, minres, direct) and row space (row_cholesky, row_cg) agree."""
    op, rhs, lam, a, b = system
    ref = np.linalg.solve(a, b)
    kappa = np.linalg.cond(a)
    solvers = (*SPD_SOLVERS, S.RowCholesky(tol=1e-8), S.RowCG(tol=TOL, maxiter=MAXITER))
    for solver in solvers:
        s, info, _ = jsolve(solver, op, rhs, lam)
        check_info(info)
        name = type(solver).__name__
        assert bool(info.converged), (name, info)
        assert rel_err(flat(s), ref) <= 1e3 * kappa * TOL + 1e-10, name
        # the reported residual is the parameter-space one
        assert abs(true_residual(a, flat(s), b) - float(info.residual)) <= 1e-8, name


@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.1, 2.0]))
def test_diagonal_lane_matches_dense_on_diagonal_operators(seed, lam):
    n = 6
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.1, 100.0, size=n)
    primal = make_tree(np.zeros(n), POOL[n])
    op = MatrixOperator(jnp.diag(jnp.asarray(d)), primal, tags={"psd"})
    b = rng.normal(size=n)
    rhs = make_tree(b, POOL[n])
    ref = b / (d + lam)
    for solver in (S.Diagonal(), *SPD_SOLVERS):
        stats = {"diag": op.diag()} if isinstance(solver, S.Diagonal) else None
        s, info, _ = jsolve(solver, op, rhs, lam, stats)
        assert bool(info.converged)
        assert rel_err(flat(s), ref) <= 1e-8


def test_diagonal_eps_floor_and_abs():
    d = jnp.array([-4.0, 0.0, 2.0])
    b = jnp.ones(3)
    s, info, _ = S.Diagonal(eps=0.5).solve(None, b, 0.0, None, {"diag": d}, ())
    np.testing.assert_allclose(s, [0.25, 2.0, 0.5])  # |d|, floored at 0.5
    assert not bool(info.converged)  # the floor changed the answer at index 1
    s, _, _ = S.Diagonal(abs=False, eps=0.5).solve(None, b, 1.0, None, {"diag": d}, ())
    np.testing.assert_allclose(s, [2.0, 1.0, 1 / 3])
    with pytest.raises(CompositionError, match="statistic 'diag'"):
        S.Diagonal().solve(None, b, 0.0, None, {}, ())


# ----------------------------------------------------------------------- indefinite


@given(systems("indefinite"), st.booleans())
def test_guarded_cg_never_nan_and_stops_at_a_cg_iterate(system, preconditioned):
    op, rhs, lam, a, b = system
    n = b.size
    minv = (0.5 if preconditioned else 1.0) * np.eye(n)
    s, info, _ = jsolve(SPD_SOLVERS[0], op, rhs, lam, pinv=jnp.asarray(minv))
    assert np.all(np.isfinite(flat(s))) and np.isfinite(float(info.residual))
    assert abs(true_residual(a, flat(s), b) - float(info.residual)) <= 1e-6
    k = int(info.iterations)
    if bool(info.converged):
        return
    if k == MAXITER:  # ran out of iterations without meeting negative curvature
        np.testing.assert_allclose(flat(s), np_pcg(a, b, minv, k), rtol=1e-6, atol=1e-9)
    elif k == 1:  # negative curvature on the first direction: M^-1 rhs
        np.testing.assert_allclose(flat(s), minv @ b, rtol=1e-12)
    else:  # the last good iterate: plain CG stopped one iteration earlier
        np.testing.assert_allclose(flat(s), np_pcg(a, b, minv, k - 1), rtol=1e-6, atol=1e-9)


def test_guarded_cg_returns_rhs_on_immediate_negative_curvature():
    primal = {"a": jnp.zeros(2)}
    op = MatrixOperator(jnp.diag(jnp.array([-1.0, 2.0])), primal, tags={"symmetric"})
    rhs = {"a": jnp.array([1.0, 0.0])}
    s, info, _ = S.CG().solve(op, rhs, 0.0, None, {}, ())
    np.testing.assert_allclose(s["a"], [1.0, 0.0])
    assert int(info.iterations) == 1 and not bool(info.converged)
    # without the guard CG divides by the negative curvature and walks uphill
    s, _, _ = S.CG(negative_curvature="none").solve(op, rhs, 0.0, None, {}, ())
    np.testing.assert_allclose(s["a"], [-1.0, 0.0])


@given(systems("indefinite"), st.booleans())
def test_minres_and_direct_solve_indefinite_systems(system, preconditioned):
    op, rhs, lam, a, b = system
    ref = np.linalg.solve(a, b)
    n = b.size
    d = np.random.default_rng(n).uniform(0.2, 5.0, size=n) if preconditioned else np.ones(n)
    pinv = jnp.asarray(np.diag(1 / d))  # an SPD diagonal preconditioner (or I)
    for solver in SPD_SOLVERS[1:]:
        s, info, _ = jsolve(solver, op, rhs, lam, pinv=pinv)
        assert bool(info.converged) and float(info.residual) <= TOL, info
        assert true_residual(a, flat(s), b) <= 100 * TOL
        assert rel_err(flat(s), ref) <= 1e-7


def test_direct_abs_eigenvalues_is_saddle_free():
    rng = np.random.default_rng(0)
    a = indefinite_matrix(rng, 6)
    e, q = np.linalg.eigh(a)
    b = rng.normal(size=6)
    op = MatrixOperator(jnp.asarray(a), jnp.zeros(6), tags={"symmetric"})
    s, info, _ = S.Direct(eigenvalues="abs").solve(op, jnp.asarray(b), 0.5, None, {}, ())
    np.testing.assert_allclose(s, q @ ((q.T @ b) / (np.abs(e) + 0.5)), rtol=1e-10)
    assert float(info.residual) > 1e-3  # it does not solve C + lam I: reported honestly


def test_direct_refuses_above_max_size():
    op = MatrixOperator(jnp.eye(5), {"w": jnp.zeros(5)}, tags={"psd"})
    with pytest.raises(InputError, match=r"n = 5 > max_size = 4") as exc:
        S.Direct(max_size=4).solve(op, {"w": jnp.ones(5)}, 0.1, None, {}, ())
    assert "'cg'" in str(exc.value) and "'minres'" in str(exc.value)
    S.Direct(max_size=5).solve(op, {"w": jnp.ones(5)}, 0.1, None, {}, ())


def test_direct_psd_singular_falls_back_to_pseudo_inverse():
    op = MatrixOperator(jnp.diag(jnp.array([1.0, 0.0])), jnp.zeros(2), tags={"psd"})
    s, info, _ = S.Direct().solve(op, jnp.array([2.0, 0.0]), 0.0, None, {}, ())
    np.testing.assert_allclose(s, [2.0, 0.0])
    assert bool(info.converged)


# ----------------------------------------------------------------------- other solvers

NEUMANN = S.Neumann(alpha=5e-4, maxiter=6, tol=0.0)  # alpha * lambda_max(A) <= 0.51


@given(systems("spd"))
def test_neumann_equals_the_truncated_series(system):
    op, rhs, lam, a, b = system
    series, term = np.zeros_like(b), b.copy()
    for _ in range(NEUMANN.maxiter):
        series += NEUMANN.alpha * term
        term = term - NEUMANN.alpha * (a @ term)
    s, info, _ = jsolve(NEUMANN, op, rhs, lam)
    np.testing.assert_allclose(flat(s), series, rtol=1e-9, atol=1e-12 * np.abs(b).max())
    assert int(info.iterations) == NEUMANN.maxiter
    assert abs(float(info.residual) - true_residual(a, flat(s), b)) <= 1e-9


def test_neumann_converges_and_survives_divergence():
    op = MatrixOperator(jnp.diag(jnp.array([1.0, 2.0, 3.0])), jnp.zeros(3), tags={"psd"})
    b = jnp.ones(3)
    s, info, _ = S.Neumann(alpha=0.3, maxiter=200, tol=1e-10).solve(op, b, 0.0, None, {}, ())
    assert bool(info.converged)
    np.testing.assert_allclose(s, [1.0, 0.5, 1 / 3], rtol=1e-8)
    s, info, _ = S.Neumann(alpha=10.0, maxiter=2000, tol=0.0).solve(op, b, 0.0, None, {}, ())
    assert np.all(np.isfinite(s)) and not bool(info.converged)


STEIHAUG = S.Steihaug(radius=1.0, tol=TOL, maxiter=MAXITER)


@given(systems("spd"))
def test_steihaug_stays_in_the_trust_region(system):
    op, rhs, lam, a, b = system
    s, info, _ = jsolve(STEIHAUG, op, rhs, lam)
    norm = np.linalg.norm(flat(s))
    exact = np.linalg.solve(a, b)
    assert norm <= 1 + 1e-9
    if np.linalg.norm(exact) < 0.999:
        assert bool(info.converged)
        assert rel_err(flat(s), exact) <= 1e3 * np.linalg.cond(a) * TOL
    elif not bool(info.converged):
        assert norm == pytest.approx(1.0, rel=1e-9)
    assert abs(float(info.residual) - true_residual(a, flat(s), b)) <= 1e-8


@given(systems("indefinite"))
def test_steihaug_on_indefinite_systems_stops_on_the_boundary(system):
    op, rhs, lam, a, b = system
    s, info, _ = jsolve(STEIHAUG, op, rhs, lam)
    assert np.all(np.isfinite(flat(s)))
    assert np.linalg.norm(flat(s)) <= 1 + 1e-9
    if not bool(info.converged):
        assert np.linalg.norm(flat(s)) == pytest.approx(1.0, rel=1e-9)


def test_identity_solver_is_the_first_order_baseline():
    rhs = {"w": jnp.array([1.0, -2.0])}
    s, info, _ = S.Identity().solve(None, rhs, 0.1, None, {}, ())
    assert s is rhs and int(info.iterations) == 1 and bool(info.converged)
    assert np.isnan(float(info.residual))
    s, _, _ = S.Identity().solve(
        None, rhs, 0.1, lambda v: jax.tree_util.tree_map(lambda x: 3 * x, v), {}, ()
    )
    np.testing.assert_allclose(s["w"], [3.0, -6.0])


def test_zero_rhs_gives_zero_and_zero_residual():
    primal = make_tree(np.zeros(6), POOL[6])
    op = MatrixOperator(jnp.eye(6), primal, tags={"psd"})
    warm = S.CG(tol=1e-10, maxiter=80, warm_start=True)
    for solver in (*SPD_SOLVERS, warm, NEUMANN, STEIHAUG):
        state = {"x": make_tree(np.ones(6), POOL[6])} if solver is warm else ()
        s, info, _ = jsolve(solver, op, primal, 0.1, None, state)  # a nonzero warm start
        assert np.all(flat(s) == 0) and float(info.residual) == 0.0
        assert bool(info.converged)
        if solver is not SPD_SOLVERS[2]:
            assert int(info.iterations) == 0


# ----------------------------------------------------------------------- matvec counts


@given(systems("spd", sizes=(6,)))
def test_krylov_solvers_cost_exactly_one_matvec_per_iteration(system):
    op, rhs, lam, a, b = system
    for solver in (SPD_SOLVERS[0], SPD_SOLVERS[1], NEUMANN, STEIHAUG):
        (_, info, _), count = count_matvecs(jsolve, solver, CountingOperator(op), rhs, lam)
        assert count == int(info.iterations) > 0, type(solver).__name__


def test_cg_warm_start_costs_a_matvec_only_when_the_start_is_nonzero():
    rng = np.random.default_rng(1)
    a = spd_matrix(rng, 8, 100.0)
    op = CountingOperator(MatrixOperator(jnp.asarray(a), jnp.zeros(8), tags={"psd"}))
    b = jnp.asarray(rng.normal(size=8))
    solver = S.CG(tol=1e-10, maxiter=80, warm_start=True)
    (s, info, state), count = count_matvecs(jsolve, solver, op, b, 0.1, None, solver.init(b))
    assert count == int(info.iterations)
    np.testing.assert_allclose(state["x"], s)
    # warm start from the solution of a nearby system: one extra matvec, fewer iterations
    (s2, info2, _), count = count_matvecs(jsolve, solver, op, b, 0.11, None, state)
    assert count == int(info2.iterations) + 1
    assert bool(info2.converged) and int(info2.iterations) < int(info.iterations)
    assert rel_err(np.asarray(s2), np.linalg.solve(a + 0.11 * np.eye(8), np.asarray(b))) <= 1e-7


# ----------------------------------------------------------------------- transforms


VMAPPED = {"CG", "MINRES", "Direct", "RowCG", "Steihaug"}
"""Solvers whose vmap batches a while loop or a cond (the others are elementwise)."""


def test_solvers_jit_vmap_and_scan_with_stable_state():
    rng = np.random.default_rng(3)
    u = rng.normal(size=(3, 7))  # a float64 operator on float32 parameters: cast, not promote
    params = {"w": jnp.zeros((2, 3), jnp.float32), "b": jnp.zeros(1, jnp.float32)}
    _, unravel = ravel_pytree(params)
    solvers = [
        S.CG(tol=1e-6, maxiter=20, warm_start=True),
        S.MINRES(tol=1e-6, maxiter=20),
        S.Direct(),
        S.RowCholesky(),
        S.RowCG(tol=1e-6, maxiter=20),
        S.Diagonal(),
        S.Identity(),
        S.Neumann(alpha=0.02),
        S.Steihaug(radius=10.0),
    ]

    @jax.jit
    def run_all(rows, rhs_batch):  # one compilation for every solver
        op = MatrixOperator.from_rows(rows, params)
        stats = {"diag": op.diag()}
        out = {}
        for solver in solvers:

            def step(state, b, solver=solver):
                s, info, state = solver.solve(op, unravel(b), jnp.float32(1.0), None, stats, state)
                return state, (s, info)

            state0 = solver.init(params)
            scanned = jax.lax.scan(step, state0, rhs_batch)
            mapped = None
            if type(solver).__name__ in VMAPPED:
                mapped = jax.vmap(lambda b, step=step, s0=state0: step(s0, b)[1])(rhs_batch)
            out[type(solver).__name__] = (state0, scanned, mapped)
        return out

    rhs_batch = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    results = run_all(jnp.asarray(u), rhs_batch)
    assert set(results) == {type(solver).__name__ for solver in solvers}
    for name, (state0, (state, (s, info)), mapped) in results.items():
        assert info.residual.dtype == jnp.float32, name
        assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(state0)
        for x, y in zip(
            jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(state0), strict=True
        ):
            assert x.shape == y.shape and x.dtype == y.dtype, name
        assert s["w"].shape == (4, 2, 3) and s["w"].dtype == jnp.float32, name
        assert info.iterations.shape == (4,) and info.iterations.dtype == jnp.int32, name
        assert np.all(np.isfinite(np.asarray(s["w"]))), name
        if mapped is not None:
            vs, vinfo = mapped
            assert vinfo.converged.shape == (4,), name
            np.testing.assert_allclose(vs["w"][0], s["w"][0], rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(vs["w"], s["w"], rtol=1e-2, atol=1e-3, err_msg=name)
    # the warm-started CG really carried its solution from step to step
    np.testing.assert_allclose(
        results["CG"][1][0]["x"]["w"], results["CG"][1][1][0]["w"][-1], rtol=1e-6
    )


def test_row_solvers_need_row_factors():
    op = MatrixOperator(jnp.eye(3), jnp.zeros(3), tags={"psd"})
    for solver in (S.RowCholesky(), S.RowCG()):
        with pytest.raises(CompositionError, match="row_space"):
            solver.solve(op, jnp.ones(3), 1.0, None, {}, ())


# ----------------------------------------------------------------------- specs


def test_requires_follow_options():
    assert requirements_of(S.CG()) == Requires(tags={"symmetric"})
    assert requirements_of(S.CG(negative_curvature="none")) == Requires(tags={"psd"})
    assert requirements_of(S.MINRES()).tags == {"symmetric"}
    assert requirements_of(S.Direct()).tags == {"symmetric"}
    assert requirements_of(S.Steihaug()).tags == {"symmetric"}
    assert requirements_of(S.RowCholesky()).tags == requirements_of(S.RowCG()).tags == {"row_space"}
    assert requirements_of(S.Diagonal()) == Requires(statistics={"diag"})
    assert requirements_of(S.Identity()).is_empty()


def test_options_are_validated_and_instances_hashable():
    with pytest.raises(ValueError, match="negative_curvature"):
        S.CG(negative_curvature="ignore")
    with pytest.raises(ValueError, match="maxiter"):
        S.MINRES(maxiter=0)
    with pytest.raises(ValueError, match="alpha"):
        S.Neumann(alpha=0.0)
    with pytest.raises(ValueError, match="radius"):
        S.Steihaug(radius=-1.0)
    with pytest.raises(ValueError, match="eigenvalues"):
        S.Direct(eigenvalues="clip")
    assert hash(S.CG(tol=1e-3)) == hash(S.CG(tol=1e-3)) and S.CG(tol=1e-3) == S.CG(tol=1e-3)
    assert S.CG(tol=1e-3) != S.CG(tol=1e-4)
