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

from somax_plug import operators as ops
from somax_plug.kinds import DIAG, PSD, ROW_SPACE, SYMMETRIC, LinearOperator
from somax_plug.tree import dense_from_mv


@st.composite
def layouts(draw: st.DrawFn):
    """A random pytree of zeros with 2..10 scalars: dict / tuple / nested, mixed shapes."""
    n_leaves = draw(st.integers(1, 3))
    shapes = draw(
        st.lists(
            st.sampled_from([(), (1,), (2,), (3,), (2, 2), (1, 3)]),
            min_size=n_leaves,
            max_size=n_leaves,
        )
    )
    leaves = [jnp.zeros(s, jnp.float64) for s in shapes]
    kind = draw(st.sampled_from(["dict", "tuple", "nested"]))
    if kind == "dict":
        return {f"k{i}": x for i, x in enumerate(leaves)}
    if kind == "tuple":
        return tuple(leaves)
    return {"a": list(leaves[:-1]), "b": (leaves[-1],)}


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
    built = {
        "sum": ops.add(op_a, op_b),
        "scaled": ops.scale(c, op_a),
        "damped": ops.damp(op_a, lam),
        "nested": ops.damp(ops.scale(c, ops.add(op_a, op_b)), lam),
    }
    for name, op in built.items():
        assert isinstance(op, LinearOperator)
        np.testing.assert_allclose(op.to_dense(), expected[name], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(flat(op.mv(vec)), expected[name] @ flat(vec), rtol=1e-10)
        np.testing.assert_allclose(flat(op.diag()), np.diag(expected[name]), atol=1e-12)
        out = op.mv(vec)
        assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(primal)


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


@given(layouts(), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_row_factors_of_sums_and_scalings(primal, ra, rb, seed):
    n = size(primal)
    rng = np.random.default_rng(seed)
    ua, ub = rng.normal(size=(ra, n)), rng.normal(size=(rb, n))
    op_a = ops.MatrixOperator.from_rows(jnp.asarray(ua), primal)
    op_b = ops.MatrixOperator.from_rows(jnp.asarray(ub), primal)
    assert {PSD, SYMMETRIC, ROW_SPACE, DIAG} <= op_a.tags
    total = ops.add(op_a, op_b)
    factors = total.row_factors()
    assert ROW_SPACE in total.tags and factors.num_rows == ra + rb
    u = np.vstack([ua, ub])
    vec = unflat(primal, rng.normal(size=n))
    rows = rng.normal(size=ra + rb)
    np.testing.assert_allclose(factors.matvec(vec), u @ flat(vec), rtol=1e-10)
    np.testing.assert_allclose(flat(factors.rmatvec(jnp.asarray(rows))), u.T @ rows, rtol=1e-10)
    np.testing.assert_allclose(total.to_dense(), u.T @ u, rtol=1e-10, atol=1e-10)
    scaled = ops.scale(2.5, total)
    f = scaled.row_factors()
    u_scaled = jax.vmap(lambda e: ravel_pytree(f.rmatvec(e))[0])(jnp.eye(f.num_rows))
    np.testing.assert_allclose(u_scaled.T @ u_scaled, 2.5 * u.T @ u, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(f.matvec(vec), u_scaled @ flat(vec), rtol=1e-10)
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


def test_damping_keeps_leaf_dtypes():
    primal = (jnp.zeros(2, jnp.float32), jnp.zeros(1, jnp.bfloat16))
    op = ops.MatrixOperator(jnp.eye(3, dtype=jnp.float32), primal, tags={PSD})
    out = ops.damp(op, jnp.float64(0.5)).mv((jnp.ones(2, jnp.float32), jnp.ones(1, jnp.bfloat16)))
    assert out[0].dtype == jnp.float32 and out[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out[0]), [1.5, 1.5])


@given(operator_cases(), st.floats(0.5, 3))
def test_to_lineax_solves_and_carries_tags(case, lam):
    lx = pytest.importorskip("lineax")
    primal, a, _, op_a, _, vec = case
    psd_op = ops.damp(ops.MatrixOperator(jnp.asarray(a @ a.T), primal, tags={PSD}), lam)
    lop = ops.to_lineax(psd_op)
    assert lx.is_symmetric(lop) and lx.is_positive_semidefinite(lop)
    assert not lx.is_diagonal(lop)  # our "diag" tag means "has an exact diagonal"
    np.testing.assert_allclose(flat(lop.mv(vec)), flat(psd_op.mv(vec)), rtol=1e-12)
    sol = lx.linear_solve(lop, vec, lx.CG(rtol=1e-10, atol=1e-12, max_steps=500)).value
    ref = np.linalg.solve(a @ a.T + lam * np.eye(a.shape[0]), flat(vec))
    np.testing.assert_allclose(flat(sol), ref, rtol=1e-6, atol=1e-8)
    general = ops.to_lineax(op_a)
    assert lx.is_symmetric(general) == (SYMMETRIC in op_a.tags)


def test_to_lineax_without_lineax_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lineax", None)  # makes `import lineax` fail
    op = ops.MatrixOperator(jnp.eye(2), jnp.zeros(2), tags={PSD})
    with pytest.raises(ImportError, match=r"pip install somax-plug\[lineax\]"):
        ops.to_lineax(op)
