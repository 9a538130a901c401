"""Losses: values, output derivatives against autodiff, square roots, sampling, lookup."""

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

from somax_plug._src.errors import CompositionError
from somax_plug._src.losses import (
    LOSSES,
    MSE,
    CallableLoss,
    SigmoidBinaryCrossEntropy,
    SoftmaxCrossEntropy,
    flatten_per_example,
    get_loss,
    unflatten_per_example,
)
from somax_plug._src.model import Model, make_model
from tests.strategies import cheap_compiles, make_targets, mlp_cases  # noqa: F401

pytestmark = pytest.mark.usefixtures("cheap_compiles")


def _outputs_and_targets(case, seed):
    """Random outputs of the case's shape (no forward pass needed) and matching targets."""
    rng = np.random.default_rng(seed)
    outputs = 2.0 * rng.normal(size=(case.batch_size, *case.out_shape))
    return jnp.asarray(outputs, case.dtype), make_targets(rng, case, case.batch_size)


def _dense_output_hessian(loss, outputs, targets):
    """jax.hessian of the reduced loss w.r.t. the flattened outputs: [B K, B K]."""
    flat = flatten_per_example(outputs)
    b, k = flat.shape

    def reduced(z):
        return loss(unflatten_per_example(z.reshape(b, k), outputs), targets)

    return jax.hessian(reduced)(flat.reshape(-1))


def _blockdiag(blocks):
    b, k, _ = blocks.shape
    out = np.zeros((b * k, b * k), blocks.dtype)
    for i in range(b):
        out[i * k : (i + 1) * k, i * k : (i + 1) * k] = blocks[i]
    return out


@functools.partial(jax.jit, static_argnums=0)
def _loss_quantities(loss, outputs, targets, u):
    """Everything the property test compares, in one compiled function."""
    reduced_ref = jax.grad(lambda z: loss(z, targets))(outputs)
    return {
        "per": loss.per_example(outputs, targets),
        "value": loss(outputs, targets),
        "grad": loss.output_grad(outputs, targets),
        "grad_ref": reduced_ref,
        "hu": loss.output_hessian_mv(outputs, targets, u),
        "h_ref": _dense_output_hessian(loss, outputs, targets),
        "sqrt": loss.output_hessian_sqrt(outputs, targets),
        "lt_u": loss.output_hessian_sqrt_t_mv(outputs, targets, flatten_per_example(u)),
        "l_u": loss.output_hessian_sqrt_mv(outputs, targets, flatten_per_example(u)),
    }


@given(case=mlp_cases(dtypes=(jnp.float64,)), reduction=st.sampled_from(["mean", "sum"]))
def test_builtin_loss_derivatives_match_autodiff(case, reduction):
    loss = get_loss(case.loss_name, reduction)
    outputs, targets = _outputs_and_targets(case, seed=1)
    b = case.batch_size
    u = jnp.asarray(np.random.default_rng(0).normal(size=outputs.shape), outputs.dtype)
    q = _loss_quantities(loss, outputs, targets, u)

    assert q["per"].shape == (b,)
    expected = jnp.mean(q["per"]) if reduction == "mean" else jnp.sum(q["per"])
    np.testing.assert_allclose(q["value"], expected, rtol=1e-12)
    # gradient and Hessian of the reduced loss, against autodiff of the reduced value
    np.testing.assert_allclose(q["grad"], q["grad_ref"], rtol=1e-10, atol=1e-12)
    assert q["hu"].shape == outputs.shape and q["hu"].dtype == outputs.dtype
    np.testing.assert_allclose(
        flatten_per_example(q["hu"]).ravel(), q["h_ref"] @ u.ravel(), rtol=1e-9, atol=1e-12
    )
    # square root: H_out = blockdiag(L_b L_b^T), K = flattened per-example size
    sq = q["sqrt"]
    k = math.prod(case.out_shape)
    assert sq.shape == (b, k, k)
    np.testing.assert_allclose(
        _blockdiag(np.einsum("bij,bkj->bik", sq, sq)), q["h_ref"], rtol=1e-9, atol=1e-12
    )
    # the closed-form products with L_b^T and L_b (no [B, K, K] array) are contractions
    uf = np.asarray(flatten_per_example(u))
    np.testing.assert_allclose(q["lt_u"], np.einsum("bkr,bk->br", sq, uf), rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(q["l_u"], np.einsum("bkr,br->bk", sq, uf), rtol=1e-10,
                               atol=1e-12)


@jax.jit
def _optax_values(z, labels, y):
    ce, bce = SoftmaxCrossEntropy(), SigmoidBinaryCrossEntropy(reduction="sum")
    one_hot = jax.nn.one_hot(labels, 3, dtype=jnp.float64)
    return {
        "ce": ce.per_example(z, labels),
        "ce_ref": optax.losses.softmax_cross_entropy_with_integer_labels(z, labels),
        "ce_one_hot": ce.per_example(z, one_hot),
        "sqrt": ce.output_hessian_sqrt(z, labels),
        "sqrt_one_hot": ce.output_hessian_sqrt(z, one_hot),
        "bce": bce(z, y),
        "bce_ref": optax.losses.sigmoid_binary_cross_entropy(z, y).sum(),
        "mse": MSE()(z, y),
    }


def test_values_match_optax():
    z = jnp.array([[0.3, -1.0, 2.0], [1.5, 0.2, -0.7]], jnp.float64)
    labels = jnp.array([2, 0])
    y = jnp.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.25]], jnp.float64)
    v = _optax_values(z, labels, y)
    np.testing.assert_allclose(v["ce"], v["ce_ref"], rtol=1e-12)
    np.testing.assert_allclose(v["ce_one_hot"], v["ce_ref"], rtol=1e-12)
    np.testing.assert_allclose(v["sqrt"], v["sqrt_one_hot"], rtol=1e-12)
    np.testing.assert_allclose(v["bce"], v["bce_ref"], rtol=1e-12)
    np.testing.assert_allclose(v["mse"], 0.5 * np.sum((z - y) ** 2) / 2, rtol=1e-12)


def _wavy(outputs, targets):
    """A non-convex per-example loss: sum(cos(z - y)) + 0.1 sum(z^2)."""
    return jnp.sum(jnp.cos(outputs - targets) + 0.1 * outputs**2, axis=-1)


@given(
    seed=st.integers(0, 2**16),
    b=st.sampled_from([1, 3]),
    k=st.sampled_from([1, 3]),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_callable_loss_uses_exact_hessian_and_psd_part_in_sqrt(seed, b, k, reduction):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.normal(size=(b, k)) * 2.0, jnp.float64)
    y = jnp.asarray(rng.normal(size=(b, k)), jnp.float64)
    u = jnp.asarray(rng.normal(size=(b, k)), jnp.float64)
    loss = get_loss(_wavy, reduction)
    assert isinstance(loss, CallableLoss) and not loss.output_hessian_psd
    q = _loss_quantities(loss, z, y, u)
    c = 1.0 / b if reduction == "mean" else 1.0
    np.testing.assert_allclose(q["value"], c * np.sum(_wavy(z, y)), rtol=1e-12)
    h_ref = np.asarray(q["h_ref"])
    np.testing.assert_allclose(q["hu"].ravel(), h_ref @ u.ravel(), rtol=1e-10, atol=1e-12)
    lam, vecs = np.linalg.eigh(h_ref)
    psd_part = (vecs * np.maximum(lam, 0.0)) @ vecs.T
    sq = q["sqrt"]
    np.testing.assert_allclose(
        _blockdiag(np.einsum("bij,bkj->bik", sq, sq)), psd_part, rtol=1e-9, atol=1e-10
    )


def test_callable_loss_with_pytree_outputs():
    def loss_fn(outputs, targets):
        return jnp.sum((outputs["a"] - targets) ** 2, axis=-1) + jnp.sum(outputs["b"] ** 4, (1, 2))

    z = {"a": jnp.ones((3, 2), jnp.float64), "b": 0.5 * jnp.ones((3, 2, 2), jnp.float64)}
    y = jnp.zeros((3, 2), jnp.float64)
    loss = get_loss(loss_fn, "sum", convex=True)
    assert loss.output_hessian_psd
    u = jax.tree.map(jnp.ones_like, z)
    q = _loss_quantities(loss, z, y, u)
    sq = q["sqrt"]
    assert sq.shape == (3, 6, 6)
    np.testing.assert_allclose(
        _blockdiag(np.einsum("bij,bkj->bik", sq, sq)), q["h_ref"], rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(
        flatten_per_example(q["hu"]).ravel(), q["h_ref"] @ np.ones(18), rtol=1e-10
    )


@functools.partial(jax.jit, static_argnums=2)
def _sample_all(key, z, n):
    return {
        "labels": SoftmaxCrossEntropy().sample_targets(key, z, n),
        "bits": SigmoidBinaryCrossEntropy().sample_targets(key, z, n),
        "gauss": MSE().sample_targets(key, z, n),
    }


def test_sample_targets_follow_the_predictive_distribution():
    n = 20000
    z = jnp.array([[0.5, -1.0, 1.0], [2.0, 0.0, -2.0]], jnp.float64)
    d = {k: np.asarray(v) for k, v in _sample_all(jax.random.key(3), z, n).items()}
    z = np.asarray(z)
    # budget: 5 standard errors; Bernoulli frequencies have standard error <= 0.5/sqrt(n)
    labels = d["labels"]
    assert labels.shape == (n, 2) and np.issubdtype(labels.dtype, np.integer)
    freq = (labels[..., None] == np.arange(3)).mean(0)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    assert np.max(np.abs(freq - p)) < 5 * 0.5 / math.sqrt(n)
    bits = d["bits"]
    assert bits.shape == (n, 2, 3) and bits.dtype == z.dtype
    assert np.max(np.abs(bits.mean(0) - 1 / (1 + np.exp(-z)))) < 5 * 0.5 / math.sqrt(n)
    draws = d["gauss"]
    assert draws.shape == (n, 2, 3)
    assert np.max(np.abs(draws.mean(0) - z)) < 5 / math.sqrt(n)
    assert np.max(np.abs(draws.var(0) - 1.0)) < 5 * math.sqrt(2 / n)


def test_callable_loss_without_sampler_says_what_to_do():
    loss = get_loss(_wavy)
    with pytest.raises(NotImplementedError, match="sampler="):
        loss.sample_targets(jax.random.key(0), jnp.zeros((2, 2)), 1)
    sampled = get_loss(_wavy, sampler=lambda key, z, s: jnp.zeros((s, *z.shape)))
    assert sampled.sample_targets(jax.random.key(0), jnp.zeros((2, 2)), 3).shape == (3, 2, 2)


def test_unknown_loss_name_lists_the_valid_names():
    with pytest.raises(CompositionError) as err:
        get_loss("softmax_crossentropy")
    message = str(err.value)
    for name in LOSSES:
        assert name in message
    assert "Did you mean 'softmax_cross_entropy'" in message
    with pytest.raises(CompositionError, match="valid names"):
        get_loss("hinge")
    with pytest.raises(CompositionError, match="reduction"):
        get_loss("mse", "median")
    with pytest.raises(CompositionError, match="valid names"):
        get_loss(3)
    with pytest.raises(CompositionError, match="takes no options"):
        get_loss("mse", convex=True)


def test_callable_loss_must_return_per_example_values():
    loss = get_loss(lambda z, y: jnp.sum((z - y) ** 2))
    with pytest.raises(CompositionError, match=r"shape \(2,\)"):
        loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)))


def test_soft_targets_must_match_logits():
    with pytest.raises(CompositionError, match="logits' shape"):
        SoftmaxCrossEntropy()(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_get_loss_keeps_or_overrides_an_instance_reduction():
    summed = MSE(reduction="sum")
    assert get_loss(summed) is summed
    assert get_loss(summed, "mean") == MSE()
    assert get_loss("mse") == MSE(reduction="mean")


def test_model_compares_predict_fn_by_identity_and_accumulates_bf16_in_float32():
    def f(p, x):
        return x @ p

    def g(p, x):
        return x @ p

    m1, m2 = make_model(f, "mse"), make_model(f, "mse")
    assert m1 == m2 and hash(m1) == hash(m2)
    assert make_model(g, "mse") != m1
    assert make_model(f, "mse", reduction="sum") != m1
    with pytest.raises(TypeError):
        Model(f, "mse")  # type: ignore[arg-type]

    params = jnp.full((4, 2), 0.1, jnp.bfloat16)
    batch = (jnp.ones((8, 4), jnp.bfloat16), jnp.zeros((8, 2), jnp.bfloat16))
    value, grad = jax.jit(jax.value_and_grad(m1.loss_value))(params, batch)
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(value), 0.5 * 2 * 0.4**2, rtol=2e-2)
    batch64 = jax.tree.map(lambda a: a.astype(jnp.float64), batch)
    assert m1.loss_value(params.astype(jnp.float64), batch64).dtype == jnp.float64
    assert m1.scale(batch) == 1 / 8 and m1.batch_size(batch) == 8


def test_softmax_sqrt_products_with_ignored_positions_match_the_factor():
    """Sequence logits ``[B, T, C]`` with padding (``ignore_label``): the closed-form
    ``L^T u`` and ``L r`` equal contractions with the block-diagonal ``[B, TC, TC]``
    factor, zero rows included (float64)."""
    ce = SoftmaxCrossEntropy(ignore_label=-1)
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        z = jnp.asarray(rng.normal(size=(3, 4, 5)))
        y = jnp.asarray([[0, 1, -1, 4], [2, -1, -1, 3], [1, 1, 0, 0]])
        u = jnp.asarray(rng.normal(size=(3, 20)))
        sq = np.asarray(ce.output_hessian_sqrt(z, y))
        lt = np.asarray(ce.output_hessian_sqrt_t_mv(z, y, u))
        lr = np.asarray(ce.output_hessian_sqrt_mv(z, y, u))
    np.testing.assert_allclose(lt, np.einsum("bkr,bk->br", sq, np.asarray(u)), atol=1e-14)
    np.testing.assert_allclose(lr, np.einsum("bkr,br->bk", sq, np.asarray(u)), atol=1e-14)
    assert np.all(lt.reshape(3, 4, 5)[0, 2] == 0) and np.all(lr.reshape(3, 4, 5)[1, 1] == 0)
