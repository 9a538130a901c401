"""Curvature operators against dense float64 references, and the shared resources.

References are built independently of the library's operator code: ``jax.hessian``
of the flattened loss (Hessian), ``jax.jacfwd`` of the outputs and ``jax.hessian`` of
the loss in the outputs (GGN), the Jacobian of the per-example losses (empirical
Fisher, an explicit outer-product sum) and the closed-form Fisher of each loss's
predictive distribution (Fisher).

Each property test compiles one function per example that computes everything it
compares (the library's operators and the references), to keep CI fast.
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

from somax_plug import spec_of
from somax_plug._src.kinds import DIAG, PSD, ROW_SPACE, SYMMETRIC, LinearOperator
from somax_plug._src.losses import flatten_per_example, unflatten_per_example
from somax_plug._src.model import make_model
from somax_plug.builtin.curvature import GGN, Fisher
from tests.strategies import (  # noqa: F401 (cheap_compiles is a fixture)
    CURVATURES,
    cheap_compiles,
    init_mlp,
    make_batch,
    make_resources,
    mlp_cases,
    mlp_predict_fn,
    split_batch,
)

pytestmark = pytest.mark.usefixtures("cheap_compiles")

DETERMINISTIC = ("hessian", "ggn", "empirical_fisher")


# --------------------------------------------------------------------------- helpers


def _tol(dtype) -> float:
    return {jnp.float64: 1e-9, jnp.float32: 2e-3}[jnp.dtype(dtype).type]


def _to64(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def _flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(_to64(tree))[0])


def _wavy(outputs, targets):
    """Non-convex per-example loss: its output Hessian has negative eigenvalues."""
    axes = tuple(range(1, outputs.ndim))
    return jnp.sum(jnp.cos(outputs - targets) + 0.1 * outputs**2, axis=axes)


def _gaussian_sampler(key, outputs, num_samples):
    return outputs[None] + jax.random.normal(key, (num_samples, *outputs.shape), outputs.dtype)


def _model(case, reduction="mean"):
    return make_model(case.predict_fn, case.loss_name, reduction)


def _probe_vectors(params, seed):
    rng = np.random.default_rng(seed)

    def make():
        return jax.tree_util.tree_map(
            lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), params
        )

    return make(), make()


def _report(op, u, v, with_structure=True):
    """Dense C, products, row factors and diagonal of one operator (traced).

    One vmapped ``mv`` over ``[e_1 .. e_n, u, v, 2u - 3v]`` gives the dense matrix and
    the products, so the compiled graph holds a single copy of the operator.
    """
    flat, unravel = ravel_pytree(op.primal)
    n = flat.shape[0]
    eye = jnp.eye(n, dtype=flat.dtype)
    vecs = [eye, ravel_pytree(u)[0][None]]
    if with_structure:
        uf, vf = ravel_pytree(u)[0], ravel_pytree(v)[0]
        vecs += [vf[None], (2 * uf - 3 * vf)[None]]
    cols = jax.vmap(lambda e: ravel_pytree(op.mv(unravel(e)))[0])(jnp.concatenate(vecs))
    out = {"dense": cols[:n].T, "mv_u": cols[n], "primal": op.primal}
    if not with_structure:
        return out
    out["mv_v"], out["mv_lin"] = cols[n + 1], cols[n + 2]
    rows = op.row_factors()
    if rows is not None:
        out["u_cols"] = jax.vmap(lambda e: rows.matvec(unravel(e)), out_axes=1)(eye)
        eye_r = jnp.eye(rows.num_rows, dtype=out["u_cols"].dtype)
        out["ut_rows"] = jax.vmap(lambda r: ravel_pytree(rows.rmatvec(r))[0])(eye_r)
    if type(op).diag is not LinearOperator.diag:
        out["diag"] = op.diag()
    return out


def _reference(name, model, params, batch):
    """Dense float64 Hessian, GGN or empirical Fisher (traced; params/batch in float64).

    The GGN reference uses the psd part of each example's output Hessian (what the GGN of
    a non-convex callable loss is defined with); for convex losses that is the Hessian.
    """
    flat, unravel = ravel_pytree(params)
    inputs, targets = batch
    loss = model.loss
    if name == "hessian":
        return jax.hessian(lambda f: model.loss_value(unravel(f), batch))(flat)
    if name == "ggn":
        outputs = model.outputs(params, inputs)
        z0 = flatten_per_example(outputs)

        def loss_of_outputs(z):
            return loss(unflatten_per_example(z.reshape(z0.shape), outputs), targets)

        jac = jax.jacfwd(lambda f: flatten_per_example(model.outputs(unravel(f), inputs)))(flat)
        b, k = z0.shape
        h_out = jax.hessian(loss_of_outputs)(z0.reshape(-1)).reshape(b, k, b, k)
        blocks = jnp.einsum("bkbl->bkl", h_out)  # H_out is block diagonal over examples
        lam, vecs = jnp.linalg.eigh(blocks)  # psd part (the identity for convex losses)
        h_plus = jnp.einsum("bkr,br,blr->bkl", vecs, jnp.maximum(lam, 0.0), vecs)
        return jnp.einsum("bki,bkl,blj->ij", jac, h_plus, jac)
    if name == "empirical_fisher":  # c sum_b g_b g_b^T, g_b = rows of the per-example Jacobian
        per_example_jac = jax.jacrev(lambda f: model.per_example_losses(unravel(f), batch))(flat)
        return loss.scale(per_example_jac.shape[0]) * per_example_jac.T @ per_example_jac
    raise ValueError(name)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _operator_and_reference(name, model, split, params, batch, params64, batch64, key, u, v):
    """One operator's report, its products on two halves of the batch, and its reference."""
    curv = CURVATURES[name]
    structure = jnp.dtype(jax.tree_util.tree_leaves(params)[0].dtype) != jnp.bfloat16
    out = _report(curv.build(make_resources(model, params, batch, key)), u, v, structure)
    if name in DETERMINISTIC:
        for i, part in enumerate(split_batch(batch, split)):
            out[f"part{i}_u"] = curv.build(make_resources(model, params, part, key)).mv(u)
        out["reference"] = _reference(name, model, params64, batch64)
    out["loss"] = model.loss_value(params, batch)
    return out


def _check_structure(name, report, dtype, scale):
    """Tags, linearity, row factors and diagonal, all from one report."""
    tol = _tol(dtype) * scale
    dense = np.asarray(report["dense"], np.float64)
    op_tags = spec_of(CURVATURES[name]).provides
    if SYMMETRIC in op_tags:  # u.Cv == v.Cu for all u, v
        np.testing.assert_allclose(dense, dense.T, atol=tol)
    if PSD in op_tags:  # v.Cv >= 0
        assert np.linalg.eigvalsh(0.5 * (dense + dense.T)).min() >= -tol
    lin = _flat(report["mv_lin"])
    np.testing.assert_allclose(lin, 2 * _flat(report["mv_u"]) - 3 * _flat(report["mv_v"]), atol=tol)
    if ROW_SPACE in op_tags:  # U^T U = C, and rmatvec is the transpose of matvec
        u_mat = np.asarray(report["u_cols"], np.float64)  # [R, n]
        np.testing.assert_allclose(u_mat.T @ u_mat, dense, atol=tol)
        np.testing.assert_allclose(np.asarray(report["ut_rows"], np.float64), u_mat, atol=tol)
    if DIAG in op_tags:
        assert "diag" in report
    if "diag" in report:
        np.testing.assert_allclose(_flat(report["diag"]), np.diag(dense), atol=tol)


# --------------------------------------------------------------------------- operators


@given(
    case=mlp_cases(min_batch=2, dtypes=(jnp.float32, jnp.float64, jnp.bfloat16)),
    name=st.sampled_from(sorted(CURVATURES)),
    reduction=st.sampled_from(["mean", "sum"]),
    data=st.data(),
)
def test_operator_matches_dense_float64_reference(case, name, reduction, data):
    """mv == dense float64 reference; tags, linearity, row factors, diag, batch additivity.

    With an MSE case the loss may be swapped for a non-convex callable, whose GGN uses
    the psd part of the output Hessian (and whose Fisher samples from a Gaussian).

    bfloat16 parameters: the products stay bfloat16, the loss accumulates in float32 and
    the dense operator is within 10% (Frobenius) of the float64 reference.
    """
    model = _model(case, reduction)
    if case.loss_name == "mse" and data.draw(st.booleans(), label="non-convex callable loss"):
        model = make_model(case.predict_fn, _wavy, reduction, sampler=_gaussian_sampler)
    batch = make_batch(case, seed=1)
    split = data.draw(st.integers(1, case.batch_size - 1), label="split")
    u, v = _probe_vectors(case.params, seed=2)
    key = jax.random.key(0)
    out = _operator_and_reference(
        name, model, split, case.params, batch, _to64(case.params), _to64(batch), key, u, v
    )
    assert jax.tree_util.tree_structure(out["primal"]) == jax.tree_util.tree_structure(case.params)
    dense = np.asarray(out["dense"], np.float64)
    assert np.all(np.isfinite(dense))
    if case.dtype == jnp.bfloat16:
        assert out["mv_u"].dtype == jnp.bfloat16 and out["loss"].dtype == jnp.float32
        if name in DETERMINISTIC:
            ref = np.asarray(out["reference"])
            assert np.linalg.norm(dense - ref) <= 0.1 * np.linalg.norm(ref) + 1e-2
        return
    _check_structure(name, out, case.dtype, max(np.abs(dense).max(), 1e-6))
    if name == "fisher":
        assert out["u_cols"].shape[0] == 2 * case.batch_size  # R = S * B rows
        return  # random: its expectation is checked below
    ref = np.asarray(out["reference"])
    tol = _tol(case.dtype) * max(np.abs(ref).max(), 1e-6)
    np.testing.assert_allclose(dense, ref, atol=tol)
    np.testing.assert_allclose(_flat(out["mv_u"]), ref @ _flat(u), atol=10 * tol)
    # batch additivity: C_all u = c_all (C_1 u / c_1 + C_2 u / c_2) (a plain sum for "sum")
    b1, b2 = split, case.batch_size - split
    weights = (1.0, 1.0) if reduction == "sum" else (b1 / case.batch_size, b2 / case.batch_size)
    parts = sum(w * _flat(out[f"part{i}_u"]) for i, w in enumerate(weights))
    np.testing.assert_allclose(parts, _flat(out["mv_u"]), atol=10 * tol)


@functools.partial(jax.jit, static_argnums=(0,))
def _bf16_operators(model, params, batch, params64, batch64):
    """Returns the four operators themselves: they are pytrees."""
    res = make_resources(model, params, batch)
    ops = {name: c.build(res) for name, c in CURVATURES.items()}
    return ops, res["loss"], _reference("ggn", model, params64, batch64)


@jax.jit
def _apply_operators(ops, u):
    out = {name: op.mv(u) for name, op in ops.items()}
    out["ggn_dense"] = ops["ggn"].to_dense()
    return out


def test_bfloat16_params_run_for_every_operator():
    """A fixed bfloat16 case for all four operators (the property test draws bf16 too).

    The operators are returned from one jitted function and applied in another: they
    are pytrees, so they pass through ``jax.jit`` like any other value.
    """
    predict = mlp_predict_fn("nested", "tanh", (3,))
    params = init_mlp(0, 3, (4,), 3, "nested", jnp.bfloat16)
    model = make_model(predict, "softmax_cross_entropy")
    inputs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.bfloat16)
    batch = (inputs, jnp.array([0, 1, 2, 1]))
    u, _ = _probe_vectors(params, seed=2)
    ops, loss, ref = _bf16_operators(model, params, batch, _to64(params), _to64(batch))
    out = _apply_operators(ops, u)  # operators cross the jit boundary as pytrees
    assert loss.dtype == jnp.float32
    assert sorted(type(op).__name__ for op in ops.values()) == [
        "EmpiricalFisherOperator",
        "FisherOperator",
        "GGNOperator",
        "HessianOperator",
    ]
    for name in CURVATURES:
        leaves = jax.tree_util.tree_leaves(out[name])
        assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
        assert np.all(np.isfinite(_flat(out[name]))) and np.abs(_flat(out[name])).max() > 0
    ref, got = np.asarray(ref), np.asarray(out["ggn_dense"], np.float64)
    assert np.linalg.norm(got - ref) <= 0.05 * np.linalg.norm(ref)


def _exact_output_fisher(loss_name, outputs):
    """E_y[grad l grad l^T] of each example's predictive distribution, [B, K, K]."""
    b = outputs.shape[0]
    z = outputs.reshape(b, -1, outputs.shape[-1])
    if loss_name == "mse":
        k = z.shape[1] * z.shape[2]
        return jnp.broadcast_to(jnp.eye(k, dtype=z.dtype), (b, k, k))
    if loss_name == "sigmoid_binary_cross_entropy":
        s = jax.nn.sigmoid(z).reshape(b, -1)
        return jax.vmap(jnp.diag)(s * (1 - s))
    p = jax.nn.softmax(z, axis=-1)  # [B, T, C]
    blocks = jax.vmap(jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q)))(p)
    t, c = p.shape[1], p.shape[2]
    full = jnp.einsum("btcd,ts->btcsd", blocks, jnp.eye(t, dtype=p.dtype))
    return full.reshape(b, t * c, t * c)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fisher_draws(fisher, model, params, batch, keys):
    def one(key):
        return make_resources(model, params, batch, key, fisher)["operator"].to_dense()

    return jax.lax.map(one, keys)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fisher_draws_and_exact(fisher, model, params, batch, keys):
    flat, unravel = ravel_pytree(params)
    inputs = batch[0]
    outputs = model.outputs(params, inputs)
    jac = jax.jacfwd(lambda f: flatten_per_example(model.outputs(unravel(f), inputs)))(flat)
    f_out = _exact_output_fisher(type(model.loss).name, outputs)
    exact = model.loss.scale(outputs.shape[0]) * jnp.einsum("bki,bkl,blj->ij", jac, f_out, jac)
    return _fisher_draws(fisher, model, params, batch, keys), exact


@given(
    case=mlp_cases(dtypes=(jnp.float64,), max_hidden_layers=1),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_fisher_expectation_matches_exact_fisher(case, reduction):
    """Mean of K independent MC Fishers (S samples each) is within budget of the exact one.

    Budget: the squared Frobenius error of the mean is at most 25x its expectation
    ``sum_ij var_ij / K`` (estimated from the K draws; 25 is the 5-sigma point of a
    one-degree-of-freedom chi-square, the worst case for correlated entries), and every
    entry is within 8 standard errors.
    """
    model = _model(case, reduction)
    batch = make_batch(case, seed=1)
    num_keys = 64
    keys = jax.random.split(jax.random.key(11), num_keys)
    draws, exact = _fisher_draws_and_exact(Fisher(num_samples=16), model, case.params, batch, keys)
    draws, exact = np.asarray(draws), np.asarray(exact)
    mean, var = draws.mean(0), draws.var(0, ddof=1)
    err = mean - exact
    floor = 1e-12 * max(np.abs(exact).max(), 1e-6)
    assert np.sum(err**2) <= 25 * np.sum(var) / num_keys + floor**2
    assert np.all(np.abs(err) <= 8 * np.sqrt(var / num_keys) + floor)


# --------------------------------------------------------------------------- resources


PLANS = {
    "hvp": frozenset({"hvp", "grad", "loss", "outputs", "output_grad"}),
    "linearization": frozenset(
        {"linearization", "grad", "loss", "outputs", "output_grad", "output_hessian"}
    ),
    "linearization_only": frozenset({"linearization", "grad", "loss"}),
    "nothing_shared": frozenset({"grad", "loss", "outputs", "output_grad"}),
}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _resource_values(plan, model, params, batch):
    planned = PLANS[plan]
    res = make_resources(model, params, batch, planned=planned)
    out = {"grad": res["grad"], "loss": res["loss"], "grad_again": res["grad"]}
    if "output_hessian" in planned:
        out["ggn_v"] = GGN().build(res).mv(params)
        out["outputs"] = res["outputs"]
    out["counts"] = {k: jnp.asarray(n) for k, n in res.counts.items()}
    out["grad_ref"] = jax.grad(model.loss_value)(params, batch)
    out["loss_ref"] = model.loss_value(params, batch)
    out["per_example_grads"] = make_resources(model, params, batch)["per_example_grads"]
    return out


@given(
    case=mlp_cases(max_hidden_layers=1),
    plan=st.sampled_from(sorted(PLANS)),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_resources_agree_across_plans_and_are_computed_once(case, plan, reduction):
    model = _model(case, reduction)
    batch = make_batch(case, seed=3)
    out = _resource_values(plan, model, case.params, batch)
    grad_ref = _flat(out["grad_ref"])
    tol = _tol(case.dtype)
    scale = max(np.abs(grad_ref).max(), 1e-3)
    np.testing.assert_allclose(_flat(out["grad"]), grad_ref, atol=10 * tol * scale)
    np.testing.assert_allclose(out["loss"], out["loss_ref"], rtol=10 * tol)
    # per-example gradients carry the reduction's 1/B: they sum to the gradient
    summed = jax.tree_util.tree_map(lambda a: a.sum(0), out["per_example_grads"])
    np.testing.assert_allclose(_flat(summed), grad_ref, atol=10 * tol * scale)
    counts = {k: int(n) for k, n in out["counts"].items()}
    assert all(n == 1 for n in counts.values()), counts
    if plan == "hvp":
        assert counts["hvp"] == 1 and "linearization" not in counts
    elif plan.startswith("linearization"):
        assert counts["linearization"] == 1 and "hvp" not in counts
    else:
        assert "hvp" not in counts and "linearization" not in counts


def test_ggn_example_from_docs():
    model = make_model(lambda p, x: x @ p, "mse", reduction="sum")
    x = jnp.array([[1.0, 0.0], [0.0, 2.0]], jnp.float32)
    params = jnp.zeros((2, 1), jnp.float32)
    res = make_resources(model, params, (x, jnp.zeros((2, 1), jnp.float32)))
    np.testing.assert_allclose(GGN().build(res).mv(jnp.ones((2, 1), jnp.float32)).ravel(), [1, 4])


def test_fisher_draws_depend_on_the_step_key_only():
    model = make_model(lambda p, x: x @ p, "softmax_cross_entropy")
    params = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float64)
    batch = (jnp.ones((2, 3), jnp.float64), jnp.array([0, 1]))
    keys = jax.random.split(jax.random.key(0), 2)
    draws = np.asarray(_fisher_draws(Fisher(num_samples=1), model, params, batch, keys))
    assert not np.allclose(draws[0], draws[1])
    again = np.asarray(_fisher_draws(Fisher(num_samples=1), model, params, batch, keys))
    np.testing.assert_array_equal(draws, again)
