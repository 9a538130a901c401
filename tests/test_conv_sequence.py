"""Every curvature operator, estimator and solver on a conv net and a sequence model.

Two small float64 models, each against dense float64 references built from an
independent loss (``jax.nn.log_softmax`` and a mask, not the library's loss code):

* ``conv``: a 2D conv net (``conv_general_dilated`` 3x3, tanh, dense) on ``[B, 4, 4, 1]``
  images, logits ``[B, 3]``, integer labels ``[B]``;
* ``sequence``: embedding, a causal 1D conv over the tokens (weights shared over T),
  tanh and a dense read-out, logits ``[B, T, V]``, integer targets ``[B, T]`` with
  padding (``-1``, ``ignore_label=-1``) at the end of shorter sequences.

The loss is the per-token mean over the counted positions (``reduction="mean"``) or
their sum (``"sum"``); the references are ``jax.hessian`` of it (Hessian), ``J^T H_out
J`` with ``H_out = jax.hessian`` of it in the outputs (GGN; Fisher in expectation) and
``c sum_b g_b g_b^T`` of the per-sequence contributions (empirical Fisher).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import somax_plug as sp
from somax_plug._src.errors import InputError
from somax_plug._src.model import make_model
from somax_plug.builtin.curvature import GGN
from somax_plug.builtin.estimators import (
    ExactDiag,
    GNBDiag,
    HutchinsonDiag,
    HutchinsonTrace,
    HutchppTrace,
    Lanczos,
)
from somax_plug.losses import SoftmaxCrossEntropy
from tests.strategies import make_resources

LAM = 0.1
PAD = -1


# --------------------------------------------------------------------------- models


def conv_fn(p: dict, x: jax.Array) -> jax.Array:
    h = jax.lax.conv_general_dilated(
        x, p["conv"]["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jnp.tanh(h + p["conv"]["b"])
    return h.reshape(h.shape[0], -1) @ p["out"]["w"] + p["out"]["b"]


def seq_fn(p: dict, tokens: jax.Array) -> jax.Array:
    e = p["embed"][tokens]  # [B, T, E]
    h = jax.lax.conv_general_dilated(  # causal width-2 conv over the tokens
        e, p["conv"]["w"], (1,), [(1, 0)], dimension_numbers=("NWC", "WIO", "NWC")
    )
    h = jnp.tanh(h + p["conv"]["b"])
    return h @ p["out"]["w"] + p["out"]["b"]  # [B, T, V]


def _normal(key, shape, scale):
    return scale * jax.random.normal(key, shape, jnp.float64)


def conv_problem():
    k = jax.random.split(jax.random.key(0), 5)
    params = {
        "conv": {"w": _normal(k[0], (3, 3, 1, 2), 0.5), "b": _normal(k[1], (2,), 0.1)},
        "out": {"w": _normal(k[2], (32, 3), 0.3), "b": jnp.zeros(3, jnp.float64)},
    }
    x = _normal(k[3], (6, 4, 4, 1), 1.0)
    y = jax.random.randint(k[4], (6,), 0, 3)
    return conv_fn, params, (x, y)


def seq_problem():
    b, t, e, v = 4, 5, 3, 4
    k = jax.random.split(jax.random.key(1), 6)
    params = {
        "embed": _normal(k[0], (v, e), 1.0),
        "conv": {"w": _normal(k[1], (2, e, e), 0.6), "b": _normal(k[2], (e,), 0.1)},
        "out": {"w": _normal(k[3], (e, v), 0.8), "b": jnp.zeros(v, jnp.float64)},
    }
    tokens = jax.random.randint(k[4], (b, t), 0, v)
    labels = jax.random.randint(k[5], (b, t), 0, v)
    lengths = jnp.array([5, 3, 4, 2])
    labels = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], labels, PAD)
    return seq_fn, params, (tokens, labels)


PROBLEMS = {"conv": conv_problem, "sequence": seq_problem}


def _loss(reduction: str) -> SoftmaxCrossEntropy:
    return SoftmaxCrossEntropy(reduction=reduction, ignore_label=PAD)


# --------------------------------------------------------------------------- references


def ref_loss(z: jax.Array, y: jax.Array, reduction: str) -> jax.Array:
    """Masked per-token cross-entropy, written without the library's loss code."""
    counted = y != PAD
    logp = jax.nn.log_softmax(z, axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.where(counted, y, 0)[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(counted, ce, 0.0))
    return total / jnp.sum(counted) if reduction == "mean" else total


@functools.partial(jax.jit, static_argnums=(0, 3))
def references(fn, params, batch, reduction):
    """Dense Hessian, GGN, empirical Fisher and the gradient, in ravel order."""
    x, y = batch
    flat, unravel = ravel_pytree(params)
    f = lambda v: fn(unravel(v), x)  # noqa: E731
    loss = lambda v: ref_loss(f(v), y, reduction)  # noqa: E731
    z = f(flat)
    jac = jax.jacfwd(lambda v: f(v).ravel())(flat)
    h_out = jax.hessian(lambda zz: ref_loss(zz.reshape(z.shape), y, reduction))(z.ravel())
    b = z.shape[0]
    counted = jnp.sum(y != PAD)

    def contributions(v):  # l_b with L = c sum_b l_b, c = 1/B (mean) or 1 (sum)
        zz = f(v)
        per = jax.vmap(lambda zb, yb: ref_loss(zb[None], yb[None], "sum"))(zz, y)
        return per * b / counted if reduction == "mean" else per

    jl = jax.jacrev(contributions)(flat)
    c = 1.0 / b if reduction == "mean" else 1.0
    return {
        "hessian": jax.hessian(loss)(flat),
        "ggn": jac.T @ h_out @ jac,
        "empirical_fisher": c * jl.T @ jl,
        "grad": jax.grad(loss)(flat),
        "loss": loss(flat),
    }


def _compose(fn, curvature, solver, reduction, **kw):
    return sp.compose(
        curvature, solver, predict_fn=fn, loss=_loss(reduction),
        damping={"name": "constant", "lam": LAM}, **kw,
    )


def _operator_dense(method, params, batch):
    state = method.init(params)
    key = jax.random.key(3)
    return np.asarray(jax.jit(
        lambda p, s, b, k: method.direction(p, s, b, k).res["operator"].to_dense()
    )(params, state, batch, key))


def _update(method, params, batch, key=None):
    state = method.init(params)
    key = jax.random.key(3) if key is None else key
    new, _, info = method.step(params, state, batch, key)
    return np.asarray(ravel_pytree(new)[0] - ravel_pytree(params)[0]), info


# --------------------------------------------------------------------------- the loss


def test_the_sequence_loss_is_the_per_token_mean_over_counted_positions():
    fn, params, (tokens, labels) = seq_problem()
    z = fn(params, tokens)
    counted = labels != PAD
    per = optax.softmax_cross_entropy_with_integer_labels(z, jnp.where(counted, labels, 0))
    want_mean = jnp.sum(jnp.where(counted, per, 0.0)) / jnp.sum(counted)
    np.testing.assert_allclose(_loss("mean")(z, labels), want_mean, rtol=1e-14)
    np.testing.assert_allclose(_loss("sum")(z, labels), want_mean * jnp.sum(counted), rtol=1e-14)
    # without padding it is optax's plain .mean() over B * T tokens
    full = jnp.where(counted, labels, 1)
    np.testing.assert_allclose(
        SoftmaxCrossEntropy()(z, full),
        optax.softmax_cross_entropy_with_integer_labels(z, full).mean(), rtol=1e-14,
    )
    # the gradient of the model's loss is the reference's (padding counts nowhere)
    model = make_model(fn, _loss("mean"))
    got = ravel_pytree(jax.grad(model.loss_value)(params, (tokens, labels)))[0]
    want = references(fn, params, (tokens, labels), "mean")["grad"]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    # an all-padding batch: loss 0 and gradient 0, not 0/0
    none = jnp.full_like(labels, PAD)
    assert float(_loss("mean")(z, none)) == 0.0
    assert not np.any(np.asarray(_loss("mean").output_grad(z, none)))


def test_padding_label_is_accepted_and_other_bad_labels_still_refused():
    fn, params, (tokens, labels) = seq_problem()
    method = _compose(fn, "ggn", "direct", "mean")
    method.step(params, method.init(params), (tokens, labels))  # -1 is padding: fine
    with pytest.raises(InputError, match="ignore_label"):
        bad = labels.at[0, 0].set(7)
        method.step(params, method.init(params), (tokens, bad))
    plain = sp.compose("ggn", "direct", predict_fn=fn, loss="softmax_cross_entropy")
    with pytest.raises(InputError, match="outside"):
        plain.step(params, plain.init(params), (tokens, labels))  # -1 without ignore_label
    assert sp.get_loss("softmax_cross_entropy", ignore_label=PAD) == _loss("mean")
    with pytest.raises(sp.CompositionError, match="ignore_label"):
        sp.get_loss("softmax_cross_entropy", ignore_label="pad")
    with pytest.raises(sp.CompositionError, match="takes options ignore_label"):
        sp.get_loss("softmax_cross_entropy", ignore_index=PAD)


# --------------------------------------------------------------------------- operators


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_deterministic_operators_match_dense_float64(problem, reduction):
    fn, params, batch = PROBLEMS[problem]()
    ref = references(fn, params, batch, reduction)
    for name in ("hessian", "ggn", "empirical_fisher"):
        got = _operator_dense(_compose(fn, name, "direct", reduction), params, batch)
        scale = np.abs(ref[name]).max()
        np.testing.assert_allclose(got, ref[name], atol=1e-10 * scale, err_msg=name)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_fisher_is_the_ggn_in_expectation(problem):
    """Relative Frobenius error of an S-draw Fisher, against the dense GGN."""
    fn, params, batch = PROBLEMS[problem]()
    ggn = np.asarray(references(fn, params, batch, "mean")["ggn"])
    fisher = {"name": "fisher", "num_samples": 4000}
    got = _operator_dense(_compose(fn, fisher, "direct", "mean"), params, batch)
    err = np.linalg.norm(got - ggn) / np.linalg.norm(ggn)
    assert err < 0.06, err


# --------------------------------------------------------------------------- estimators


def _estimate(estimator, fn, params, batch, key=7):
    model = make_model(fn, _loss("mean"))
    res = make_resources(model, params, batch, jax.random.key(key), curvature=GGN())

    @jax.jit
    def run(p, b):
        r = make_resources(model, p, b, jax.random.key(key), curvature=GGN())
        return estimator.estimate(r, jax.random.key(key), estimator.init(p))[0]

    del res
    return run(params, batch)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_estimators_against_the_dense_ggn(problem):
    fn, params, batch = PROBLEMS[problem]()
    g = np.asarray(references(fn, params, batch, "mean")["ggn"])
    d = np.diag(g)
    off = g - np.diag(d)

    def flat(stats):
        return np.asarray(ravel_pytree(stats["diag"])[0])

    np.testing.assert_allclose(flat(_estimate(ExactDiag(), fn, params, batch)), d, atol=1e-12)
    n = 3000  # Rademacher Hutchinson: unbiased, variance sum_{j != i} G_ij^2 / n
    hd = flat(_estimate(HutchinsonDiag(num_probes=n), fn, params, batch))
    sigma = np.sqrt(np.sum(off**2, axis=1) / n)
    assert np.all(np.abs(hd - d) <= 5 * sigma + 1e-12), np.max(np.abs(hd - d) / (sigma + 1e-30))
    tr = float(_estimate(HutchinsonTrace(num_probes=n), fn, params, batch)["trace"])
    assert abs(tr - d.sum()) <= 5 * np.sqrt(2 * np.sum(off**2) / n)
    # Hutch++ with a sketch as large as the matrix is exact
    k = 3 * g.shape[0]
    tpp = float(_estimate(HutchppTrace(num_probes=k), fn, params, batch)["trace"])
    np.testing.assert_allclose(tpp, d.sum(), rtol=1e-8)
    # Lanczos with full reorthogonalisation: the leading eigenvalues
    lz = _estimate(Lanczos(num_iters=g.shape[0], num_eigs=3), fn, params, batch)
    np.testing.assert_allclose(
        np.sort(np.asarray(lz["eigenvalues"]))[::-1], np.linalg.eigvalsh(g)[::-1][:3],
        rtol=1e-6,
    )
    # Gauss-Newton-Bartlett: E[diag(J^T g_y g_y^T J)] / (c q) = diag(GGN), padding excluded
    gnb = flat(_estimate(GNBDiag(num_samples=4000), fn, params, batch))
    err = np.linalg.norm(gnb - d) / np.linalg.norm(d)
    assert err < 0.06, err


# --------------------------------------------------------------------------- solvers

EXACT = {
    "cg": {"name": "cg", "tol": 1e-13, "maxiter": 400},
    "minres": {"name": "minres", "tol": 1e-13, "maxiter": 400},
    "direct": "direct",
    "row_cholesky": {"name": "row_cholesky", "tol": 1e-13},
    "row_cg": {"name": "row_cg", "tol": 1e-13, "maxiter": 400},
    "steihaug": {"name": "steihaug", "radius": 1e6, "tol": 1e-13, "maxiter": 400},
    "auto": {"name": "auto", "tol": 1e-13, "maxiter": 400},
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_every_solver_solves_the_damped_ggn_system(problem):
    """``params - s`` with ``s = (G + lam I)^-1 g`` for the exact solvers; the
    approximate ones against their own dense formulas."""
    fn, params, batch = PROBLEMS[problem]()
    ref = references(fn, params, batch, "mean")
    g, grad = np.asarray(ref["ggn"]), np.asarray(ref["grad"])
    a = g + LAM * np.eye(g.shape[0])
    s = np.linalg.solve(a, grad)
    for name, cfg in EXACT.items():
        step, info = _update(_compose(fn, "ggn", cfg, "mean"), params, batch)
        np.testing.assert_allclose(step, -s, rtol=1e-7, atol=1e-9 * np.abs(s).max(),
                                   err_msg=name)
        np.testing.assert_allclose(info["loss"], ref["loss"], rtol=1e-12)
    # minres on the (indefinite) Hessian
    h = np.asarray(ref["hessian"]) + LAM * np.eye(g.shape[0])
    step, _ = _update(_compose(fn, "hessian", EXACT["minres"], "mean"), params, batch)
    np.testing.assert_allclose(step, -np.linalg.solve(h, grad), rtol=1e-6,
                               atol=1e-8 * np.abs(grad).max() / LAM)
    # diagonal with the exact diagonal: g / (|diag G| + lam)
    diag = sp.compose("ggn", "diagonal", predict_fn=fn, loss=_loss("mean"),
                      estimators="exact_diag", damping={"name": "constant", "lam": LAM})
    step, _ = _update(diag, params, batch)
    np.testing.assert_allclose(step, -grad / (np.abs(np.diag(g)) + LAM), rtol=1e-9)
    # identity: the gradient itself
    step, _ = _update(_compose(fn, "ggn", "identity", "mean"), params, batch)
    np.testing.assert_allclose(step, -grad, rtol=1e-12, atol=1e-15)
    # neumann: alpha * sum_{k < K} (I - alpha A)^k g
    alpha, terms = 0.5 / np.linalg.eigvalsh(a).max(), 6
    cfg = {"name": "neumann", "alpha": alpha, "maxiter": terms, "tol": 0.0}
    step, _ = _update(_compose(fn, "ggn", cfg, "mean"), params, batch)
    m, acc, term = np.eye(a.shape[0]) - alpha * a, np.zeros_like(grad), grad.copy()
    for _ in range(terms):
        acc, term = acc + term, m @ term
    np.testing.assert_allclose(step, -alpha * acc, rtol=1e-9, atol=1e-14)


def test_padded_positions_change_nothing_in_any_solver():
    """The model is causal, so the tokens at padded positions reach no counted output:
    changing them changes no step (their rows of J and of H_out are zero)."""
    fn, params, (tokens, labels) = seq_problem()
    moved = jnp.where(labels == PAD, (tokens + 1) % 4, tokens)
    assert np.any(np.asarray(moved != tokens))
    for name in ("cg", "row_cholesky"):
        for curvature in ("ggn", {"name": "fisher", "num_samples": 2}):
            method = _compose(fn, curvature, EXACT[name], "sum")
            a, _ = _update(method, params, (tokens, labels))
            b, _ = _update(method, params, (moved, labels))
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=name)
