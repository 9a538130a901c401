"""Operator algebra: dense equivalence, tag rules, row factors, lineax bridge."""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from somax_plug._src import operators as ops
from somax_plug._src.kinds import DIAG, PSD, ROW_SPACE, SYMMETRIC, LinearOperator
from somax_plug._src.tree import dense_from_mv


def _zeros(*shapes):
    return [jnp.zeros(s, jnp.float64) for s in shapes]


LAYOUTS = (
    {"k0": _zeros(())[0], "k1": _zeros((2, 2))[0]},
    tuple(_zeros((3,), (1, 2))),
    {"a": _zeros((2,), ()), "b": tuple(_zeros((2, 1)))},
)
"""Pytree layouts (dict with a scalar leaf, tuple, nested lists/tuples); the matrices,
vectors and scalars are drawn per example. A small pool keeps compilation cached."""


def layouts():
    return st.sampled_from(LAYOUTS)


def size(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def unflat(primal, v: np.ndarray):
    return ravel_pytree(primal)[1](jnp.asarray(v))


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


@st.composite
def matrices(draw: st.DrawFn, n: int, kind: str):
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    m = rng.normal(size=(n, n))
    if kind == "general":
        return m
    if kind == "symmetric":
        return (m + m.T) / 2
    return m @ m.T  # psd


@st.composite
def operator_cases(draw: st.DrawFn):
    primal = draw(layouts())
    n = size(primal)
    kind_a = draw(st.sampled_from(["general", "symmetric", "psd"]))
    kind_b = draw(st.sampled_from(["general", "symmetric", "psd"]))
    a = draw(matrices(n, kind_a))
    b = draw(matrices(n, kind_b))
    tags = {"general": set(), "symmetric": {SYMMETRIC}, "psd": {PSD}}
    op_a = ops.MatrixOperator(jnp.asarray(a), primal, tags=tags[kind_a])
    op_b = ops.MatrixOperator(jnp.asarray(b), primal, tags=tags[kind_b])
    v = draw(st.integers(0, 2**31 - 1))
    vec = unflat(primal, np.random.default_rng(v).normal(size=n))
    return primal, a, b, op_a, op_b, vec


@jax.jit
def _evaluate(op_a, op_b, c, lam, vec):
    built = {
        "sum": ops.add(op_a, op_b),
        "scaled": ops.scale(c, op_a),
        "damped": ops.damp(op_a, lam),
        "nested": ops.damp(ops.scale(c, ops.add(op_a, op_b)), lam),
    }
    return {
        name: (LinearOperator.to_dense(op), op.mv(vec), op.diag()) for name, op in built.items()
    }


@given(operator_cases(), st.floats(-3, 3), st.floats(0, 3))
def test_algebra_matches_dense_matrices(case, c, lam):
    primal, a, b, op_a, op_b, vec = case
    n = a.shape[0]
    expected = {
        "sum": a + b,
        "scaled": c * a,
        "damped": a + lam * np.eye(n),
        "nested": c * (a + b) + lam * np.eye(n),
    }
    plain_a = ops.MatrixOperator(op_a.matrix, primal)  # tags do not change the maths
    plain_b = ops.MatrixOperator(op_b.matrix, primal)
    for name, (dense, mv, diag) in _evaluate(plain_a, plain_b, c, lam, vec).items():
        np.testing.assert_allclose(dense, expected[name], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(flat(mv), expected[name] @ flat(vec), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(flat(diag), np.diag(expected[name]), atol=1e-12)
        assert jax.tree_util.tree_structure(mv) == jax.tree_util.tree_structure(primal)
        assert jax.tree_util.tree_structure(diag) == jax.tree_util.tree_structure(primal)


@given(operator_cases(), st.floats(-3, 3), st.floats(-1, 3))
def test_tag_rules(case, c, lam):
    _, _, _, op_a, op_b, _ = case
    ta, tb = op_a.tags, op_b.tags
    for tags in (ta, tb):
        assert DIAG in tags and (PSD not in tags or SYMMETRIC in tags)
    assert ops.add(op_a, op_b).tags == ta & tb
    scaled = ops.scale(c, op_a).tags
    assert (SYMMETRIC in scaled) == (SYMMETRIC in ta)
    assert (PSD in scaled) == (PSD in ta and c >= 0)
    damped = ops.damp(op_a, lam).tags
    assert (SYMMETRIC in damped) == (SYMMETRIC in ta) and DIAG in damped
    assert (PSD in damped) == (PSD in ta and lam >= 0)
    assert ROW_SPACE not in damped


def test_traced_scalars_drop_psd_unless_asserted():
    op = ops.MatrixOperator(jnp.eye(2), jnp.zeros(2), tags={PSD})
    seen = {}

    def record(lam):
        seen["damped"] = ops.damp(op, lam).tags
        seen["asserted"] = ops.damp(op, lam, nonnegative=True).tags
        seen["scaled"] = ops.scale(lam, op).tags
        return ops.damp(op, lam).mv(jnp.ones(2))

    np.testing.assert_allclose(jax.jit(record)(0.5), [1.5, 1.5])
    assert PSD not in seen["damped"] and SYMMETRIC in seen["damped"]
    assert PSD in seen["asserted"]
    assert PSD not in seen["scaled"]


@jax.jit
def _row_products(op_a, op_b, c, vec, rows):
    total = ops.add(op_a, op_b)
    factors = total.row_factors()
    scaled = ops.scale(c, total, nonnegative=True).row_factors()
    u_scaled = jax.vmap(lambda e: ravel_pytree(scaled.rmatvec(e))[0])(jnp.eye(scaled.num_rows))
    return (
        factors.matvec(vec),
        factors.rmatvec(rows),
        LinearOperator.to_dense(total),
        u_scaled,
        scaled.matvec(vec),
    )


@given(layouts(), st.sampled_from([(1, 2), (3, 1)]), st.integers(0, 2**31 - 1))
def test_row_factors_of_sums_and_scalings(primal, row_counts, seed):
    ra, rb = row_counts
    n = size(primal)
    rng = np.random.default_rng(seed)
    ua, ub = rng.normal(size=(ra, n)), rng.normal(size=(rb, n))
    op_a = ops.MatrixOperator.from_rows(jnp.asarray(ua), primal)
    op_b = ops.MatrixOperator.from_rows(jnp.asarray(ub), primal)
    assert {PSD, SYMMETRIC, ROW_SPACE, DIAG} <= op_a.tags
    total = ops.add(op_a, op_b)
    assert ROW_SPACE in total.tags and total.row_factors().num_rows == ra + rb
    u = np.vstack([ua, ub])
    vec = unflat(primal, rng.normal(size=n))
    rows = rng.normal(size=ra + rb)
    c = float(rng.uniform(0.1, 3.0))
    umv, urmv, dense, u_scaled, scaled_mv = _row_products(op_a, op_b, c, vec, jnp.asarray(rows))
    np.testing.assert_allclose(umv, u @ flat(vec), rtol=1e-10)
    np.testing.assert_allclose(flat(urmv), u.T @ rows, rtol=1e-10)
    np.testing.assert_allclose(dense, u.T @ u, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(u_scaled.T @ u_scaled, c * u.T @ u, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(scaled_mv, u_scaled @ flat(vec), rtol=1e-10)
    assert ops.scale(-1.0, total).row_factors() is None
    assert ops.damp(total, 1.0).row_factors() is None
    plain = ops.MatrixOperator(jnp.eye(n), primal, tags={PSD})
    assert ops.add(total, plain).row_factors() is None
    assert ROW_SPACE not in ops.add(total, plain).tags


def test_matrix_operator_to_dense_agrees_with_the_generic_builder():
    primal = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(1)}
    m = jnp.asarray(np.random.default_rng(0).normal(size=(5, 5)))
    op = ops.MatrixOperator(m, primal)
    np.testing.assert_allclose(dense_from_mv(op.mv, primal), m)
    np.testing.assert_allclose(LinearOperator.to_dense(op), m)


def test_matrix_operator_validates_shapes_and_tags():
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        ops.MatrixOperator(jnp.eye(2), jnp.zeros(3))
    with pytest.raises(ValueError, match="rows must have shape"):
        ops.MatrixOperator(jnp.eye(3), jnp.zeros(3), rows=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="row_space"):
        ops.MatrixOperator(jnp.eye(3), jnp.zeros(3), tags={ROW_SPACE})


def test_operators_are_pytrees_and_jit_arguments():
    primal = {"w": jnp.zeros(2)}
    op = ops.damp(ops.scale(2.0, ops.MatrixOperator(jnp.eye(2), primal, tags={PSD})), 1.0)
    leaves, treedef = jax.tree_util.tree_flatten(op)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.tags == op.tags
    out = jax.jit(lambda o, v: o.mv(v))(op, {"w": jnp.array([1.0, 2.0])})
    np.testing.assert_allclose(out["w"], [3.0, 6.0])


def test_float64_matrices_keep_the_leaf_dtypes_of_the_vector():
    op = ops.MatrixOperator(2 * jnp.eye(3, dtype=jnp.float64), {"w": jnp.zeros(3, jnp.float32)})
    v = {"w": jnp.ones(3, jnp.float32)}
    assert op.mv(v)["w"].dtype == jnp.float32 and op.diag()["w"].dtype == jnp.float32
    flat_v, unravel = ops.ravel(v)
    assert unravel(flat_v.astype(jnp.float64))["w"].dtype == jnp.float32


def test_damping_keeps_leaf_dtypes():
    primal = (jnp.zeros(2, jnp.float32), jnp.zeros(1, jnp.bfloat16))
    op = ops.MatrixOperator(jnp.eye(3, dtype=jnp.float32), primal, tags={PSD})
    out = ops.damp(op, jnp.float64(0.5)).mv((jnp.ones(2, jnp.float32), jnp.ones(1, jnp.bfloat16)))
    assert out[0].dtype == jnp.float32 and out[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out[0]), [1.5, 1.5])


@pytest.mark.parametrize("kind", ["general", "symmetric", "psd"])
def test_to_lineax_solves_and_carries_tags(kind):
    import lineax as lx  # the optional extra somax-plug[lineax]; in the test extra too
    primal = LAYOUTS[2]
    n = size(primal)
    rng = np.random.default_rng(0)
    m = rng.normal(size=(n, n))
    a = {"general": m, "symmetric": m + m.T, "psd": m @ m.T}[kind]
    tags = {"general": set(), "symmetric": {SYMMETRIC}, "psd": {PSD}}[kind]
    op = ops.MatrixOperator(jnp.asarray(a), primal, tags=tags)
    lop = ops.to_lineax(op)
    assert lx.is_symmetric(lop) == (kind != "general")
    assert lx.is_positive_semidefinite(lop) == (kind == "psd")
    assert lx.diagonal_tag not in lop.tags  # our "diag" tag means "has an exact diagonal"
    vec = unflat(primal, rng.normal(size=n))
    np.testing.assert_allclose(flat(lop.mv(vec)), flat(op.mv(vec)), rtol=1e-12)
    if kind == "psd":
        damped = ops.to_lineax(ops.damp(op, 0.5))
        sol = lx.linear_solve(damped, vec, lx.CG(rtol=1e-10, atol=1e-12, max_steps=500)).value
        ref = np.linalg.solve(a + 0.5 * np.eye(n), flat(vec))
        np.testing.assert_allclose(flat(sol), ref, rtol=1e-6, atol=1e-8)


def test_to_lineax_without_lineax_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lineax", None)  # makes `import lineax` fail
    op = ops.MatrixOperator(jnp.eye(2), jnp.zeros(2), tags={PSD})
    with pytest.raises(ImportError, match=r"pip install somax-plug\[lineax\]"):
        ops.to_lineax(op)
