"""KFAC and EKFAC (``somax_plug.builtin.kronecker``) against dense float64 references.

The references are the dense GGN (``J^T H_out J`` from ``jax.jacfwd``) and, for the
preconditioner, dense Kronecker products built with numpy. Tolerances are 1e-9
relative: everything is float64 and the sizes are tiny, so only rounding is left.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from somax_plug import InputError, OptionError, Resources, compose, make_model
from somax_plug.builtin.kronecker import (
    EKFAC,
    KFAC,
    KFACPreconditioner,
    KroneckerInverse,
    factor_resource,
)
from somax_plug.builtin.kronecker import (
    PROVIDERS as KRON,
)
from somax_plug.builtin.layers import PROVIDERS as LAYERS
from somax_plug.builtin.resources import PROVIDERS as BASE
from somax_plug.layers import param_paths
from somax_plug.testing.references import dense_reference
from tests.reliability import Case, check_corpus

PROVIDERS = {**BASE, **LAYERS, **KRON}
RTOL = 1e-9
FEW = settings(max_examples=max(2, settings().max_examples // 3))
"""A third of the profile's examples or fewer: each one traces the model several times."""
LOSSES = ("mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy")


def _res(model, params, batch, seed=0):
    return Resources(model, params, batch, jax.random.key(seed), PROVIDERS)


def _mlp(sizes, act=jnp.tanh, bias=True):
    """Plain-JAX MLP ``{"l0": {"w", "b"}, ...}`` and its predict function."""

    def f(p, x):
        for i in range(len(sizes) - 1):
            x = x @ p[f"l{i}"]["w"] + (p[f"l{i}"]["b"] if bias else 0)
            if i < len(sizes) - 2:
                x = act(x)
        return x

    return f


def _params(sizes, seed, bias=True):
    rng = np.random.default_rng(seed)
    p = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        p[f"l{i}"] = {"w": jnp.asarray(rng.normal(size=(m, n)) / math.sqrt(m))}
        if bias:
            p[f"l{i}"]["b"] = jnp.asarray(0.3 * rng.normal(size=(n,)))
    return p


def _batch(loss, b, din, dout, seed, tokens=None):
    rng = np.random.default_rng(seed + 100)
    lead = (b,) if tokens is None else (b, tokens)
    x = jnp.asarray(rng.normal(size=(*lead, din)))
    if loss == "softmax_cross_entropy":
        y = jnp.asarray(rng.integers(0, dout, size=lead), jnp.int32)
    elif loss == "sigmoid_binary_cross_entropy":
        y = jnp.asarray(rng.integers(0, 2, size=(*lead, dout)), jnp.float64)
    else:
        y = jnp.asarray(rng.normal(size=(*lead, dout)))
    return x, y


def _offsets(params):
    """Parameter path -> slice of the ravelled vector."""
    out, start = {}, 0
    for p, x in zip(param_paths(params), jax.tree_util.tree_leaves(params), strict=True):
        out[p] = slice(start, start + x.size)
        start += x.size
    return out


def _layer_index(params, layer):
    """Ravel indices of ``l{layer}``'s kernel and bias (a layer's block)."""
    off = _offsets(params)
    idx = [np.arange(s.start, s.stop) for p, s in off.items() if p.startswith(f"{layer}/")]
    return np.concatenate(idx)


def _block(d, idx):
    return np.asarray(d)[np.ix_(idx, idx)]


def _matrix_order(op, i):
    """Ravel index of each entry of block ``i``'s ``[rows, dout]`` matrix view."""
    flat, unravel = ravel_pytree(op.primal)
    labels = unravel(jnp.arange(flat.size, dtype=jnp.float64))
    lv = dict(zip(op.factors.paths, jax.tree_util.tree_leaves(labels), strict=True))
    return np.asarray(op._mat(op.factors.blocks[i], lv, jnp.float64)).astype(int)


def _close(a, b, what, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(np.linalg.norm(b), 1e-300)
    assert np.linalg.norm(a - b) <= rtol * scale, f"{what}: ||a - b|| = {np.linalg.norm(a - b)}"


# ------------------------------------------------------------------ (i), (ii)


@FEW
@given(
    din=st.integers(1, 4),
    dout=st.integers(1, 3),
    loss=st.sampled_from(LOSSES),
    bias=st.booleans(),
    approx=st.sampled_from(("expand", "reduce")),
    seed=st.integers(0, 50),
)
def test_single_layer_one_example_kfac_is_the_ggn(din, dout, loss, bias, approx, seed):
    dout = max(dout, 2) if loss == "softmax_cross_entropy" else dout
    sizes = (din, dout)
    model = make_model(_mlp(sizes, bias=bias), loss)
    params, batch = _params(sizes, seed, bias), _batch(loss, 1, din, dout, seed)
    op = KFAC(approx=approx).build(_res(model, params, batch))
    _close(op.to_dense(), dense_reference("ggn", model, params, batch), "KFAC vs GGN")
    assert op.uncovered == ()


@FEW
@given(widths=st.lists(st.integers(1, 3), min_size=2, max_size=4), seed=st.integers(0, 50))
def test_deep_linear_mse_one_example_blocks_are_ggn_blocks(widths, seed):
    sizes = tuple(widths)
    model = make_model(_mlp(sizes, act=lambda x: x), "mse")
    params, batch = _params(sizes, seed), _batch("mse", 1, sizes[0], sizes[-1], seed)
    op = KFAC().build(_res(model, params, batch))
    dense, ggn = np.asarray(op.to_dense()), np.asarray(dense_reference("ggn", model, params, batch))
    for layer in range(len(sizes) - 1):
        idx = _layer_index(params, f"l{layer}")
        _close(_block(dense, idx), _block(ggn, idx), f"block of layer {layer}")
        rest = np.setdiff1d(np.arange(dense.shape[0]), idx)
        assert np.all(dense[np.ix_(idx, rest)] == 0), "KFAC is block-diagonal over layers"


# ------------------------------------------------------------------ (iii)


@FEW
@given(
    batch_size=st.integers(1, 3),
    loss=st.sampled_from(LOSSES),
    approx=st.sampled_from(("expand", "reduce")),
    seed=st.integers(0, 50),
)
def test_ekfac_diagonal_is_exact_in_the_kfac_eigenbasis(batch_size, loss, approx, seed):
    sizes = (3, 2, 2)
    model = make_model(_mlp(sizes), loss)
    params, batch = _params(sizes, seed), _batch(loss, batch_size, 3, 2, seed)
    res = _res(model, params, batch)
    ekfac, kfac = EKFAC(approx=approx).build(res), KFAC(approx=approx).build(res)
    ggn = np.asarray(dense_reference("ggn", model, params, batch))
    dense_e, dense_k = np.asarray(ekfac.to_dense()), np.asarray(kfac.to_dense())
    for i in range(len(ekfac.factors.blocks)):
        qa, qg, s = (np.asarray(x) for x in ekfac.eig[i])
        order = _matrix_order(ekfac, i).ravel()  # matrix entry (row-major) -> ravel index
        block = ggn[np.ix_(order, order)]
        q = np.kron(qa, qg)
        _close(np.diag(q.T @ block @ q), np.asarray(s).ravel(), f"EKFAC diagonal, block {i}")
        err_e = np.linalg.norm(dense_e[np.ix_(order, order)] - block)
        err_k = np.linalg.norm(dense_k[np.ix_(order, order)] - block)
        assert err_e <= err_k * (1 + 1e-9) + 1e-12, (err_e, err_k)
        if batch_size == 1:  # one example: KFAC, hence EKFAC, is the block exactly
            assert err_e <= RTOL * np.linalg.norm(block) + 1e-15


# ------------------------------------------------------------------ (iv)


@FEW
@given(
    lam=st.floats(1e-3, 10.0),
    mode=st.sampled_from(("kfac", "kfac_pi", "ekfac")),
    seed=st.integers(0, 50),
)
def test_inverse_mv_inverts_the_damped_operator(lam, mode, seed):
    sizes = (3, 4, 2)
    model = make_model(_mlp(sizes), "softmax_cross_entropy")
    params, batch = _params(sizes, seed), _batch("softmax_cross_entropy", 3, 3, 2, seed)
    res = _res(model, params, batch)
    op = (EKFAC() if mode == "ekfac" else KFAC(pi_damping=mode == "kfac_pi")).build(res)
    flat, unravel = ravel_pytree(params)
    v = jnp.asarray(np.random.default_rng(seed).normal(size=flat.size))
    back = op.inverse_mv(op.damped_mv(unravel(v), lam), lam)
    _close(ravel_pytree(back)[0], v, "inverse_mv(damped_mv(v))")
    if mode != "kfac_pi":  # exact damping: the inverse of C + lam I
        dense = np.asarray(op.to_dense()) + lam * np.eye(flat.size)
        _close(ravel_pytree(op.inverse_mv(unravel(v), lam))[0], np.linalg.solve(dense, v),
               "inverse_mv vs dense solve")


def test_pi_damping_is_factored_with_the_trace_ratio():
    sizes = (3, 2)
    model = make_model(_mlp(sizes), "mse")
    params, batch = _params(sizes, 0), _batch("mse", 4, 3, 2, 0)
    res = _res(model, params, batch)
    op, lam = KFAC(pi_damping=True).build(res), 0.7
    a, g = (np.asarray(x) for x in (op.factors.A[0], op.factors.G[0]))
    pi = math.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    r = math.sqrt(lam)
    want = np.kron(a + pi * r * np.eye(len(a)), g + r / pi * np.eye(len(g)))
    order = _matrix_order(op, 0).ravel()
    flat, unravel = ravel_pytree(params)
    dense = np.stack([ravel_pytree(op.damped_mv(unravel(e), lam))[0] for e in np.eye(flat.size)], 1)
    _close(dense[np.ix_(order, order)], want, "factored damping")


# ------------------------------------------------------------------ (v) expand vs reduce


@FEW
@given(batch_size=st.integers(1, 3), seed=st.integers(0, 50), source=st.sampled_from(
    ("ggn", "empirical", "fisher")))
def test_expand_and_reduce_coincide_without_weight_sharing(batch_size, seed, source):
    sizes = (2, 3, 2)
    model = make_model(_mlp(sizes), "softmax_cross_entropy")
    params, batch = _params(sizes, seed), _batch("softmax_cross_entropy", batch_size, 2, 2, seed)
    res = _res(model, params, batch, seed)
    e = KFAC(source=source, approx="expand").build(res).to_dense()
    r = KFAC(source=source, approx="reduce").build(res).to_dense()
    _close(e, r, "expand vs reduce")


@FEW
@given(batch_size=st.integers(1, 3), tokens=st.integers(2, 3), seed=st.integers(0, 50))
def test_expand_and_reduce_with_tokens_match_their_formulas(batch_size, tokens, seed):
    # a linear layer on [B, T, D] with MSE: g = sqrt(c) e_(t, j) per column, so
    # G_expand = G_reduce = B T c I, A_expand = mean_{b,t} a a^T, A_reduce = mean_b abar abar^T
    din, dout = 3, 2
    model = make_model(lambda p, x: x @ p["w"] + p["b"], "mse")
    params = {"w": jnp.asarray(np.random.default_rng(seed).normal(size=(din, dout))),
              "b": jnp.zeros(dout)}
    x, y = _batch("mse", batch_size, din, dout, seed, tokens=tokens)
    res = _res(model, params, (x, y))
    a = np.concatenate([np.asarray(x), np.ones((batch_size, tokens, 1))], -1)
    c = 1.0 / batch_size
    fe, fr = res[factor_resource("ggn", "expand")], res[factor_resource("ggn", "reduce")]
    _close(fe.A[0], np.einsum("bti,btj->ij", a, a) / (batch_size * tokens), "A expand")
    abar = a.mean(1)
    _close(fr.A[0], abar.T @ abar / batch_size, "A reduce")
    for f in (fe, fr):
        _close(f.G[0], batch_size * tokens * c * np.eye(dout), "G")
    assert not np.allclose(fe.A[0], fr.A[0])


# ------------------------------------------------------------------ (vi) Flax, Equinox


def _plain_factors(sizes, params, x, y):
    model = make_model(_mlp(sizes, act=jax.nn.relu), "softmax_cross_entropy")
    return _res(model, params, (x, y))[factor_resource("ggn", "expand")]


def test_flax_and_equinox_factors_equal_plain_jax():
    flax_nn = pytest.importorskip("flax.linen")
    eqx = pytest.importorskip("equinox")
    sizes = (4, 3, 2)
    params = _params(sizes, 1)
    x, y = _batch("softmax_cross_entropy", 3, 4, 2, 1)
    want = _plain_factors(sizes, params, x, y)
    plain = make_model(_mlp(sizes, act=jax.nn.relu), "softmax_cross_entropy")
    plain_op = KFAC().build(_res(plain, params, (x, y)))
    plain_eigs = np.linalg.eigvalsh(np.asarray(plain_op.to_dense()))

    class MLP(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, h):
            h = jax.nn.relu(flax_nn.Dense(3, param_dtype=jnp.float64)(h))
            return flax_nn.Dense(2, param_dtype=jnp.float64)(h)

    fparams = {"params": {f"Dense_{i}": {"kernel": params[f"l{i}"]["w"],
                                          "bias": params[f"l{i}"]["b"]} for i in range(2)}}
    fmodel = make_model(MLP().apply, "softmax_cross_entropy")

    key = jax.random.key(0)
    net = eqx.nn.MLP(4, 2, 3, 1, activation=jax.nn.relu, key=key, dtype=jnp.float64)
    for i in range(2):
        net = eqx.tree_at(lambda n, i=i: (n.layers[i].weight, n.layers[i].bias), net,
                          (params[f"l{i}"]["w"].T, params[f"l{i}"]["b"]))
    eparams, static = eqx.partition(net, eqx.is_array)
    emodel = make_model(lambda p, h: jax.vmap(eqx.combine(p, static))(h), "softmax_cross_entropy")

    for name, model, p in (("flax", fmodel, fparams), ("equinox", emodel, eparams)):
        got = _res(model, p, (x, y))[factor_resource("ggn", "expand")]
        assert len(got.blocks) == 2 and got.uncovered == (), (name, got.uncovered)
        for i in range(2):
            _close(got.A[i], want.A[i], f"{name} A of layer {i}")
            _close(got.G[i], want.G[i], f"{name} G of layer {i}")
        # the operator on the framework's parameters: the same eigenvalues (a permutation)
        dense = np.asarray(KFAC().build(_res(model, p, (x, y))).to_dense())
        _close(np.linalg.eigvalsh(dense), plain_eigs, f"{name} KFAC spectrum")


# ------------------------------------------------------------------ conv layers


def _cnn(spec):
    """A VALID 3x3 conv (2 -> 4 channels, ``spec`` layouts) + tanh + dense, and params."""
    rng = np.random.default_rng(7)
    kshape = (3, 3, 2, 4) if spec[1] == "HWIO" else (4, 2, 3, 3)
    params = {"k": jnp.asarray(rng.normal(size=kshape) / 3), "b": jnp.asarray(rng.normal(size=4)),
              "w": jnp.asarray(rng.normal(size=(4 * 2 * 2, 3)) / 4)}

    def f(p, x):
        h = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "VALID", dimension_numbers=spec)
        h = h + (p["b"] if spec[2] == "NHWC" else p["b"][:, None, None])
        return jnp.tanh(h).reshape(x.shape[0], -1) @ p["w"]

    shape = (2, 4, 4, 2) if spec[0] == "NHWC" else (2, 2, 4, 4)
    x = jnp.asarray(rng.normal(size=shape))
    y = jnp.asarray(rng.integers(0, 3, size=2), jnp.int32)
    return make_model(f, "softmax_cross_entropy"), params, (x, y)


@pytest.mark.parametrize("spec", [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW")])
def test_conv_layers_are_factored_from_im2col_patches(spec):
    model, params, batch = _cnn(spec)
    res = _res(model, params, batch)
    f = res[factor_resource("empirical", "expand")]
    assert [b.kernel for b in f.blocks] == ["k", "w"] and f.uncovered == ()
    blk = f.blocks[0]
    # one column u = dL/dz / sqrt(c): sum_{b,t} a g^T is the gradient of [K; b] / sqrt(c)
    m = np.einsum("bti,btj->ij", f.a[0], f.g[0][0]) * math.sqrt(0.5)
    grad = jax.grad(lambda p: model.loss(model.outputs(p, batch[0]), batch[1]))(params)
    gk = np.asarray(grad["k"]).transpose(blk.kernel_perm).reshape(blk.din, blk.dout)
    _close(m[: blk.din], gk, "kernel gradient from the patches")
    _close(m[blk.din], grad["b"], "bias gradient")
    # and EKFAC's diagonal is exact in the KFAC basis of the conv block (weight sharing)
    op = EKFAC().build(res)
    ggn = np.asarray(dense_reference("ggn", model, params, batch))
    order = _matrix_order(op, 0).ravel()
    qa, qg, s = (np.asarray(x) for x in op.eig[0])
    q = np.kron(qa, qg)
    _close(np.diag(q.T @ ggn[np.ix_(order, order)] @ q), s.ravel(), "EKFAC diagonal (conv)")


@FEW
@given(spatial=st.integers(1, 2), window=st.integers(1, 3), stride=st.integers(1, 2),
       padding=st.sampled_from(["SAME", "VALID", "explicit"]), dilation=st.integers(1, 2),
       lhs_dilation=st.sampled_from([None, 2]), channels_last=st.booleans(),
       seed=st.integers(0, 2**16))
def test_patches_are_conv_general_dilated_patches_bitwise(
        spatial, window, stride, padding, dilation, lhs_dilation, channels_last, seed):
    """The strided-slice im2col equals ``jax.lax.conv_general_dilated_patches`` exactly,
    in every layout, padding, stride and dilation (an input dilation takes that
    function itself)."""
    from somax_plug.builtin.kronecker import _patches

    lhs = ((0, spatial + 1, *range(1, spatial + 1)) if channels_last
           else (0, 1, *range(2, spatial + 2)))
    rhs = (spatial + 1, spatial, *range(spatial))
    shape = (3, *[6] * spatial, 4) if channels_last else (3, 4, *[6] * spatial)
    a = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
    pads = ((1, 2),) * spatial if padding == "explicit" else padding
    lhs_d = None if lhs_dilation is None else (lhs_dilation,) * spatial
    conv = (("filter_shape", (window,) * spatial), ("window_strides", (stride,) * spatial),
            ("padding", pads), ("lhs_dilation", lhs_d), ("rhs_dilation", (dilation,) * spatial),
            ("dimension_numbers", (lhs, rhs, lhs)))
    want = jax.lax.conv_general_dilated_patches(
        a, (window,) * spatial, (stride,) * spatial, pads, lhs_dilation=lhs_d,
        rhs_dilation=(dilation,) * spatial,
        dimension_numbers=jax.lax.ConvDimensionNumbers(lhs, rhs, lhs),
        precision=jax.lax.Precision.HIGHEST)
    got = _patches(a, conv)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_preconditioner_factors_an_hwio_conv_kernel_in_its_own_layout():
    model, params, batch = _cnn(("NHWC", "HWIO", "NHWC"))
    res = _res(model, params, batch)
    f = res[factor_resource("ggn", "expand")]
    pre, lam = KFACPreconditioner(), 0.2
    state = pre.update(res, {}, lam, None, pre.init(params))
    st = state["leaves"]["k"]
    assert bool(st["kron"])
    blk = f.blocks[0]
    a = np.asarray(f.A[0])[: blk.din, : blk.din]
    # rows of A are (in, h, w); the leaf (h, w, in) is a [h w in, out] matrix
    rows = np.arange(blk.din).reshape(2, 3, 3).transpose(1, 2, 0).ravel()
    _close(st["L"], a[np.ix_(rows, rows)], "A in the kernel's layout")
    v = {k: jnp.asarray(np.random.default_rng(1).normal(size=x.shape)) for k, x in params.items()}
    got = np.asarray(pre.apply(state, v, lam)["k"]).ravel()
    want = np.linalg.solve(np.kron(np.asarray(st["L"]), np.asarray(f.G[0])) + lam * np.eye(72),
                           np.asarray(v["k"]).ravel())
    _close(got, want, "M^-1 on the conv kernel")


# ------------------------------------------------------------------ uncovered parameters


def _scaled_model():
    def f(p, x):
        h = jnp.tanh(x @ p["l0"]["w"] + p["l0"]["b"]) * p["scale"]
        return h @ p["l1"]["w"] + p["l1"]["b"]

    params = {**_params((3, 2, 2), 3), "scale": jnp.asarray([1.5, -0.5])}
    return make_model(f, "softmax_cross_entropy"), params


def test_unfactored_parameters_get_an_exact_diagonal_block_and_are_listed():
    model, params = _scaled_model()
    batch = _batch("softmax_cross_entropy", 1, 3, 2, 3)
    op = KFAC().build(_res(model, params, batch))
    assert [p for p, _ in op.uncovered] == ["scale"]
    assert "used by mul" in op.uncovered[0][1]
    ggn = np.asarray(dense_reference("ggn", model, params, batch))
    s = _offsets(params)["scale"]
    dense = np.asarray(op.to_dense())
    _close(np.diag(dense)[s], np.diag(ggn)[s], "diagonal block (one example: exact)")
    assert np.count_nonzero(dense[s][:, np.r_[: s.start, s.stop : dense.shape[0]]]) == 0


def test_unfactored_diagonal_is_unbiased_over_sign_draws():
    model, params = _scaled_model()
    batch = _batch("softmax_cross_entropy", 3, 3, 2, 4)
    ggn = np.asarray(dense_reference("ggn", model, params, batch))
    s = _offsets(params)["scale"]
    fn = jax.jit(lambda key: KFAC().build(
        Resources(model, params, batch, key, PROVIDERS)).factors.diag["scale"])
    draws = np.stack([np.asarray(fn(jax.random.key(i))) for i in range(400)])
    se = draws.std(0, ddof=1) / math.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(0) - np.diag(ggn)[s]) <= 5 * se + 1e-12)


def test_strict_coverage_refuses_unfactored_parameters():
    model, params = _scaled_model()
    batch = _batch("softmax_cross_entropy", 2, 3, 2, 3)
    with pytest.raises(InputError, match="'scale': used by mul"):
        KFAC(coverage="strict").build(_res(model, params, batch))


# ------------------------------------------------------------------ preconditioner


def test_preconditioner_applies_the_damped_per_leaf_kronecker_inverse():
    sizes = (3, 4, 2)
    model = make_model(_mlp(sizes), "softmax_cross_entropy")
    params = _params(sizes, 5)
    b1, b2 = (_batch("softmax_cross_entropy", 3, 3, 2, s) for s in (5, 6))
    pre, lam = KFACPreconditioner(decay=0.8, inverse_every=2), 0.3
    state = pre.init(params)
    f1 = _res(model, params, b1)[factor_resource("ggn", "expand")]
    f2 = _res(model, params, b2)[factor_resource("ggn", "expand")]
    s1 = pre.update(_res(model, params, b1), {}, lam, None, state)
    s2 = pre.update(_res(model, params, b2), {}, lam, None, s1)
    # EMA: the first refresh sets the factors, the second averages them
    for i, layer in enumerate(("l0", "l1")):
        ema_a = 0.8 * np.asarray(f1.A[i]) + 0.2 * np.asarray(f2.A[i])
        ema_g = 0.8 * np.asarray(f1.G[i]) + 0.2 * np.asarray(f2.G[i])
        st_w = s2["leaves"][f"{layer}/w"]
        din = sizes[i]
        _close(st_w["L"], ema_a[:din, :din], "EMA of A (kernel part)")
        _close(st_w["R"], ema_g, "EMA of G")
        _close(s2["leaves"][f"{layer}/b"]["M"], ema_a[din, din] * ema_g, "bias block")

    flat, unravel = ravel_pytree(params)
    v = jnp.asarray(np.random.default_rng(0).normal(size=flat.size))
    off = _offsets(params)

    def dense_inverse(f):
        m = np.zeros((flat.size, flat.size))
        for i, layer in enumerate(("l0", "l1")):
            a, g, din = np.asarray(f["A"][i]), np.asarray(f["G"][i]), sizes[i]
            w, bsl = off[f"{layer}/w"], off[f"{layer}/b"]
            m[w, w] = np.kron(a[:din, :din], g)
            m[bsl, bsl] = a[din, din] * g
        return np.linalg.inv(m + lam * np.eye(flat.size))

    # inverse_every=2: after the second refresh the inverse is still the first one's
    got = ravel_pytree(pre.apply(s2, unravel(v), lam))[0]
    _close(got, dense_inverse({"A": f1.A, "G": f1.G}) @ v, "stale inverse (inverse_every=2)")
    s3 = pre.update(_res(model, params, b1), {}, lam, None, s2)
    ema = {"A": [0.8 * (0.8 * a1 + 0.2 * a2) + 0.2 * a1 for a1, a2 in zip(f1.A, f2.A, strict=True)],
           "G": [0.8 * (0.8 * g1 + 0.2 * g2) + 0.2 * g1 for g1, g2 in zip(f1.G, f2.G, strict=True)]}
    got = ravel_pytree(pre.apply(s3, unravel(v), lam))[0]
    _close(got, dense_inverse(ema) @ v, "refreshed inverse of the EMA")


def test_preconditioner_pi_damping_caches_the_factored_inverses():
    sizes = (3, 4, 2)
    model = make_model(_mlp(sizes), "softmax_cross_entropy")
    params, batch = _params(sizes, 4), _batch("softmax_cross_entropy", 3, 3, 2, 4)
    res = _res(model, params, batch)
    pre, lam = KFACPreconditioner(pi_damping=True), 0.4
    state = pre.update(res, {}, lam, None, pre.init(params))
    v = jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.random.default_rng(2).normal(size=x.shape)), params)
    out = pre.apply(state, v, 123.0)  # the lam of the refresh, not of the call
    r = math.sqrt(lam)
    for layer in ("l0", "l1"):
        st = state["leaves"][f"{layer}/w"]
        left, right = np.asarray(st["L"]), np.asarray(st["R"])
        pi = math.sqrt((np.trace(left) / len(left)) / (np.trace(right) / len(right)))
        m = np.kron(left + pi * r * np.eye(len(left)), right + r / pi * np.eye(len(right)))
        _close(np.asarray(out[layer]["w"]).ravel(),
               np.linalg.solve(m, np.asarray(v[layer]["w"]).ravel()), f"{layer} kernel")
        mb = np.asarray(state["leaves"][f"{layer}/b"]["M"])
        _close(out[layer]["b"], np.linalg.solve(mb + lam * np.eye(len(mb)), v[layer]["b"]),
               f"{layer} bias")


@FEW
@given(n=st.integers(1, 300), shift=st.sampled_from([0.0, 1e-3, 0.5]), rank=st.floats(0.2, 1),
       seed=st.integers(0, 2**16))
def test_spd_inverse_matches_a_dense_float64_inverse(n, shift, rank, seed):
    """The block-recursive SPD inverse against ``np.linalg.inv``.

    Sizes across the recursions' base cases (64, 128); rank-deficient factors with a
    positive shift (the damped inverse of a singular factor); 1e-7 relative: float64,
    condition numbers up to about 1e6 here.
    """
    from somax_plug.builtin.kronecker import spd_block_inverse, spd_inverse

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(max(1, int(rank * n)), n))
    with jax.enable_x64(True):
        m = x.T @ x / n
        if shift == 0.0:
            m = m + 0.1 * np.eye(n)
        ref = np.linalg.inv(m + shift * np.eye(n))
        out = np.asarray(jax.jit(spd_inverse)(jnp.asarray(m), shift))
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-7 * np.abs(ref).max())
        for base in (16, 64):  # deeper recursions than the default's
            np.testing.assert_allclose(
                np.asarray(spd_block_inverse(jnp.asarray(m + np.eye(n)), base)),
                np.linalg.inv(m + np.eye(n)), atol=1e-10)


def test_spd_inverse_of_a_singular_factor_without_shift_falls_back_to_eigh():
    """``m`` singular and ``shift = 0``: Cholesky fails, the floored eigendecomposition is
    used (finite, and the pseudo-inverse's action on ``m``'s range)."""
    from somax_plug.builtin.kronecker import spd_inverse

    with jax.enable_x64(True):
        v = np.array([1.0, 2.0, 2.0]) / 3
        m = np.outer(v, v)
        out = np.asarray(spd_inverse(jnp.asarray(m), 0.0, eps=1e-6))
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out @ v, v, rtol=1e-9)  # range: eigenvalue 1


def test_preset_quadratic_forms_from_row_factors_equal_the_dense_ggn():
    """The kfac preset's model (curvature ``ggn``): model_step's Gram matrix and the
    damping's predicted decrease come from row factors ``|U v|^2``; they equal the same
    quantities from the dense GGN (float64, 1e-9)."""
    from somax_plug.builtin.curvature import GGN
    from somax_plug.builtin.solvers import _bilinear

    sizes = (3, 4, 2)
    model = make_model(_mlp(sizes), "softmax_cross_entropy")
    params, batch = _params(sizes, 0), _batch("softmax_cross_entropy", 5, 3, 2, 0)
    res = _res(model, params, batch)
    op = GGN().build(res)
    assert op.row_factors() is not None
    dense = np.asarray(dense_reference("ggn", model, params, batch))
    flat, unravel = ravel_pytree(params)
    d = unravel(jnp.asarray(np.random.default_rng(0).normal(size=flat.shape)))
    p = unravel(jnp.asarray(np.random.default_rng(1).normal(size=flat.shape)))
    lam = 0.3
    form = _bilinear(op, lam, (d, p))
    a = dense + lam * np.eye(dense.shape[0])
    dv, pv = np.asarray(ravel_pytree(d)[0]), np.asarray(ravel_pytree(p)[0])
    for (u, v), ref in (((d, d), dv @ a @ dv), ((d, p), dv @ a @ pv), ((p, p), pv @ a @ pv)):
        np.testing.assert_allclose(float(form(u, v)), ref, rtol=1e-9)
    res.set("update", d)
    res.set("operator", op)
    g = np.asarray(ravel_pytree(res["grad"])[0])
    np.testing.assert_allclose(float(res["predicted_decrease"]),
                               -(g @ dv + 0.5 * dv @ dense @ dv), rtol=1e-9)


def _ema_composition(sizes, **pre):
    model_fn = _mlp(sizes)
    return compose(predict_fn=model_fn, loss="softmax_cross_entropy", curvature="ggn",
                   estimators=[{"name": "kfac_ema", "source": "ggn", "decay": 0.8}],
                   preconditioner={"name": "kfac", "factors": "kfac_ema", **pre},
                   solver={"name": "cg", "maxiter": 3},
                   damping={"name": "constant", "lam": 0.1})


def test_shared_ema_is_updated_once_per_step_and_read_as_is():
    """Estimator ``kfac_ema``: one EMA update per step (two steps: ``0.8 F(p0) + 0.2
    F(p1)``, float64 against the factors recomputed at each step's parameters); the
    preconditioner reading it holds exactly the estimator's values, and the solver
    ``kronecker_inverse`` reading it solves ``(L (x) R + lam I) s = g`` per leaf (dense
    float64 solve). One composition cannot hold both readers (the planner refuses a
    preconditioner for a solver that does not apply one), so the solver reads the
    statistic the estimator returned."""
    from somax_plug.builtin.kronecker import KFACEMA

    sizes = (3, 4, 2)
    model = make_model(_mlp(sizes), "softmax_cross_entropy")
    params, batch = _params(sizes, 7), _batch("softmax_cross_entropy", 5, 3, 2, 7)
    method = _ema_composition(sizes, pi_damping=True)
    state = method.init(params)
    seen = [params]
    for i in range(2):
        params, state, _ = method.step(params, state, batch, jax.random.key(i))
        seen.append(params)
    stat = state.estimators[0]["stats"]["kfac_ema"]
    assert int(stat["count"]) == 2
    f0, f1 = (_res(model, p, batch)[factor_resource("ggn", "expand")] for p in seen[:2])
    for i, layer in enumerate(("l0", "l1")):
        din = sizes[i]
        got = stat["leaves"][f"{layer}/w"]
        _close(got["L"], 0.8 * f0.A[i][:din, :din] + 0.2 * f1.A[i][:din, :din], "EMA of A")
        _close(got["R"], 0.8 * f0.G[i] + 0.2 * f1.G[i], "EMA of G")
        mine = state.preconditioner["leaves"][f"{layer}/w"]
        for k in ("L", "R"):
            np.testing.assert_array_equal(np.asarray(mine[k]), np.asarray(got[k]))
    est = KFACEMA(source="ggn")
    res = _res(model, seen[0], batch)
    out, _ = est.estimate(res, None, est.init(seen[0]))
    g, lam = res["grad"], 0.3
    s, info, _ = KroneckerInverse(factors="kfac_ema").solve(None, g, lam, None, out, ())
    for layer in ("l0", "l1"):
        leaf = out["kfac_ema"]["leaves"][f"{layer}/w"]
        m = np.kron(np.asarray(leaf["L"]), np.asarray(leaf["R"]))
        _close(np.asarray(s[layer]["w"]).ravel(),
               np.linalg.solve(m + lam * np.eye(len(m)), np.asarray(g[layer]["w"]).ravel()),
               f"{layer} kernel from the shared EMA")
    assert bool(info.converged)


def test_reader_without_the_ema_estimator_is_refused_before_tracing():
    from somax_plug import CompositionError

    for kw in ({"preconditioner": {"name": "kfac", "factors": "kfac_ema"}, "solver": "cg",
                "curvature": "ggn"},
               {"solver": {"name": "kronecker_inverse", "factors": "kfac_ema"}}):
        with pytest.raises(CompositionError, match="kfac_ema.*estimators= one of: "
                           "builtin:kfac_ema"):
            compose(predict_fn=_mlp((3, 2)), loss="mse", **kw)


def _ema_stat(sizes, seed):
    from somax_plug.builtin.kronecker import KFACEMA

    model = make_model(_mlp(sizes), "softmax_cross_entropy")
    params, batch = _params(sizes, seed), _batch("softmax_cross_entropy", 5, sizes[0],
                                                 sizes[-1], seed)
    est = KFACEMA(source="ggn")
    out, _ = est.estimate(_res(model, params, batch), None, est.init(params))
    return params, out["kfac_ema"]


def _ema_dense(params, stat):
    """The float64 dense matrix of the per-leaf blocks (kron(L, R), M, diag)."""
    blocks = []
    for path in param_paths(params):
        leaf = stat["leaves"][path]
        if "L" in leaf and bool(leaf["kron"]):
            blocks.append(np.kron(np.asarray(leaf["L"]), np.asarray(leaf["R"])))
        elif "M" in leaf and bool(leaf["kron"]):
            blocks.append(np.asarray(leaf["M"]))
        else:
            blocks.append(np.diag(np.asarray(leaf["diag"]).ravel()))
    n = sum(len(b) for b in blocks)
    dense, i = np.zeros((n, n)), 0
    for b in blocks:
        dense[i:i + len(b), i:i + len(b)] = b
        i += len(b)
    return dense


@FEW
@given(seed=st.integers(0, 50), lam=st.sampled_from([1e-3, 0.1, 2.0]), pi=st.booleans())
def test_kfac_curvature_on_the_shared_ema_is_its_dense_blocks(seed, lam, pi):
    """Curvature ``kfac`` with ``factors="kfac_ema"``: ``mv``, ``diag``, ``damped_mv`` and
    ``inverse_mv`` of the per-leaf running averages against the dense float64 block
    matrix (``kron(L, R)`` per kernel, ``M`` per bias), the factored damping included."""
    from somax_plug.builtin.kronecker import LeafKroneckerOperator, _pi

    params, stat = _ema_stat((3, 4, 2), seed)
    op = LeafKroneckerOperator(params, stat["leaves"], pi_damping=pi)
    dense = _ema_dense(params, stat)
    flat, unravel = ravel_pytree(params)
    v = np.random.default_rng(seed).normal(size=flat.size)
    _close(ravel_pytree(op.mv(unravel(jnp.asarray(v))))[0], dense @ v, "mv")
    _close(ravel_pytree(op.diag())[0], np.diag(dense), "diag")
    if pi:  # the factored damping of each Kronecker block, lam I elsewhere
        blocks = []
        for path in param_paths(params):
            leaf = stat["leaves"][path]
            if "L" in leaf:
                a, g = np.asarray(leaf["L"]), np.asarray(leaf["R"])
                r, q = math.sqrt(lam), float(_pi(leaf["L"], leaf["R"], jnp.float64))
                blocks.append(np.kron(a + q * r * np.eye(len(a)), g + r / q * np.eye(len(g))))
            else:
                m = np.asarray(leaf["M"]) if "M" in leaf else np.diag(np.asarray(leaf["diag"]))
                blocks.append(m + lam * np.eye(len(m)))
        damped = np.zeros_like(dense)
        i = 0
        for b in blocks:
            damped[i:i + len(b), i:i + len(b)] = b
            i += len(b)
    else:
        damped = dense + lam * np.eye(flat.size)
    _close(ravel_pytree(op.damped_mv(unravel(jnp.asarray(v)), lam))[0], damped @ v, "damped_mv")
    _close(ravel_pytree(op.inverse_mv(unravel(jnp.asarray(v)), lam))[0],
           np.linalg.solve(damped, v), "inverse_mv", rtol=1e-7)


def test_two_components_read_one_shared_ema():
    """The KFAC step with the KFAC model: curvature ``kfac`` and preconditioner ``kfac``
    both read estimator ``kfac_ema``'s statistic. After three steps the EMA was updated
    once per step (count 3, the factors computed once per step), the preconditioner
    holds exactly the estimator's averages, and the step's operator is the dense block
    matrix of those same averages (float64)."""
    sizes = (3, 4, 2)
    method = compose(
        predict_fn=_mlp(sizes), loss="softmax_cross_entropy",
        curvature={"name": "kfac", "factors": "kfac_ema", "pi_damping": True},
        estimators=[{"name": "kfac_ema", "source": "ggn", "decay": 0.8}],
        preconditioner={"name": "kfac", "factors": "kfac_ema", "pi_damping": True},
        solver="model_step", damping={"name": "levenberg_marquardt", "init": 1.0})
    operator = next(r for r in method.plan.resources if r.name == "operator")
    assert operator.phase == "solve" and "statistics" in operator.requires
    params, batch = _params(sizes, 3), _batch("softmax_cross_entropy", 5, 3, 2, 3)
    state = method.init(params)
    losses = []
    for i in range(3):
        params, state, info = method.step(params, state, batch, jax.random.key(i))
        losses.append(float(info["loss"]))
    assert losses[-1] < losses[0]
    counts = method.trace_counts
    assert counts["kfac_factors_ggn_expand"] == 1 and counts["operator"] == 1, counts
    stat = state.estimators[0]["stats"]["kfac_ema"]
    assert int(stat["count"]) == 3
    for path, leaf in stat["leaves"].items():
        mine = state.preconditioner["leaves"][path]
        for k in ("L", "R", "M"):
            if k in leaf:
                np.testing.assert_array_equal(np.asarray(mine[k]), np.asarray(leaf[k]))
    built = KFAC(factors="kfac_ema").build(_StatRes(params, stat))
    v = np.random.default_rng(0).normal(size=ravel_pytree(params)[0].size)
    unravel = ravel_pytree(params)[1]
    _close(ravel_pytree(built.mv(unravel(jnp.asarray(v))))[0], _ema_dense(params, stat) @ v,
           "the operator of the shared averages")


class _StatRes:
    """The two things curvature ``kfac(factors="kfac_ema")`` reads from a context."""

    def __init__(self, params, stat):
        self.params, self._stat = params, stat

    def __getitem__(self, name):
        assert name == "statistics", name
        return {"kfac_ema": self._stat}


def test_curvature_on_the_ema_is_refused_beside_an_early_reader_of_the_operator():
    from somax_plug import CompositionError

    with pytest.raises(CompositionError, match="estimator.*hutchinson_diag.*reads resource "
                       "'operator'.*after the estimators"):
        compose(predict_fn=_mlp((3, 2)), loss="mse",
                curvature={"name": "kfac", "factors": "kfac_ema"},
                estimators=["kfac_ema", "hutchinson_diag"], solver="cg",
                preconditioner="jacobi")
    with pytest.raises(CompositionError, match="kfac_ema.*estimators= one of: builtin:kfac_ema"):
        compose(predict_fn=_mlp((3, 2)), loss="mse",
                curvature={"name": "kfac", "factors": "kfac_ema"}, solver="kronecker_inverse")


def test_preconditioner_uses_the_block_diagonal_above_max_dim():
    sizes = (3, 4, 2)
    model = make_model(_mlp(sizes), "softmax_cross_entropy")
    params, batch = _params(sizes, 5), _batch("softmax_cross_entropy", 3, 3, 2, 5)
    res = _res(model, params, batch)
    f = res[factor_resource("ggn", "expand")]
    pre, lam = KFACPreconditioner(max_dim=3), 0.3
    state = pre.update(res, {}, lam, None, pre.init(params))
    assert "L" not in state["leaves"]["l0/w"] and "M" not in state["leaves"]["l0/b"]
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    out = pre.apply(state, v, lam)
    a, g = np.asarray(f.A[0]), np.asarray(f.G[0])
    _close(out["l0"]["w"], 1 / (np.outer(np.diag(a)[:3], np.diag(g)) + lam),
           "diagonal of A (x) G")
    _close(out["l0"]["b"], 1 / (a[3, 3] * np.diag(g) + lam), "bias diagonal")
    assert any("max_dim=3" in c for c in pre.recorded_choices())


def test_preconditioner_before_any_refresh_is_one_over_lambda():
    params = _params((2, 2), 0)
    pre = KFACPreconditioner()
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    out = pre.apply(pre.init(params), v, 0.5)
    assert all(np.allclose(x, 2.0) for x in jax.tree_util.tree_leaves(out))


# ------------------------------------------------------------------ in a step


@pytest.mark.parametrize("composition", [
    # the three presets run on six problems in tests/test_robustness.py; here one
    # composition of each new component, the preconditioner under CG
    {"curvature": "ggn", "solver": {"name": "cg", "maxiter": 5},
     "preconditioner": {"name": "kfac", "pi_damping": True},
     "damping": {"name": "levenberg_marquardt", "init": 1.0}},
])
def test_compositions_decrease_the_loss(composition):
    sizes = (3, 4, 2)
    f = _mlp(sizes)
    params, (x, y) = _params(sizes, 2), _batch("softmax_cross_entropy", 8, 3, 2, 2)
    method = compose(predict_fn=f, loss="softmax_cross_entropy", **composition)
    state = method.init(params)
    model = make_model(f, "softmax_cross_entropy")
    first = float(model.loss(f(params, x), y))
    for i in range(5):
        params, state, _ = method.step(params, state, (x, y), jax.random.key(i))
    assert float(model.loss(f(params, x), y)) < first


def test_kronecker_inverse_solves_exactly_in_a_step():
    sizes = (3, 2)
    model = make_model(_mlp(sizes), "mse")
    params, batch = _params(sizes, 0), _batch("mse", 4, 3, 2, 0)
    op = KFAC().build(_res(model, params, batch))
    g = jax.grad(lambda p: model.loss(model.outputs(p, batch[0]), batch[1]))(params)
    s, info, _ = KroneckerInverse().solve(op, g, 0.1, None, {}, ())
    dense = np.asarray(op.to_dense()) + 0.1 * np.eye(ravel_pytree(params)[0].size)
    _close(ravel_pytree(s)[0], np.linalg.solve(dense, ravel_pytree(g)[0]), "direct solve")
    assert float(info.residual) < 1e-10 and bool(info.converged)


# ------------------------------------------------------------------ bad input corpus


def _fisher_without_sampler():
    params = _params((3, 2), 0)
    method = compose(predict_fn=_mlp((3, 2)), loss=lambda z, y: jnp.sum((z - y) ** 2, -1),
                     curvature={"name": "kfac", "source": "fisher"}, solver="kronecker_inverse")
    return method.step(params, method.init(params), _batch("mse", 2, 3, 2, 0), jax.random.key(0))


def _scaled_step(composition):
    model, params = _scaled_model()
    method = compose(predict_fn=model.outputs, loss="softmax_cross_entropy", **composition)
    return method.step(params, method.init(params), _batch("softmax_cross_entropy", 2, 3, 2, 0),
                       jax.random.key(0))


def _compose(**kw):
    return compose(predict_fn=_mlp((3, 2)), loss="mse", **kw)


def _reshaped_conv_kernel(coverage):
    """A conv kernel stored as a 2-D parameter and reshaped to HWIO in the model."""
    def f(p, x):
        h = jax.lax.conv_general_dilated(x, p["w"].reshape(3, 3, 1, 2), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return h.reshape(h.shape[0], -1) @ p["d"]

    params = {"w": 0.1 * jnp.ones((9, 2)), "d": 0.01 * jnp.ones((32, 3))}
    method = compose(predict_fn=f, loss="softmax_cross_entropy",
                     curvature={"name": "kfac", "coverage": coverage}, solver="kronecker_inverse")
    batch = (jnp.ones((2, 4, 4, 1)), jnp.array([0, 1]))
    out = method.step(params, method.init(params), batch, jax.random.key(0))
    return method, out


def _listed_as_diagonal(result):
    method, (_, _, info) = result
    assert np.isfinite(float(info["loss"]))
    text = method.explain()
    assert "w: diagonal block (conv kernel of rank 4 reshaped from a parameter" in text, text


CASES = [
    Case("unknown source", lambda: _compose(curvature={"name": "kfac", "source": "hessian"},
                                            solver="kronecker_inverse"),
         says=("source", "ggn")),
    Case("unknown approximation", lambda: _compose(curvature={"name": "ekfac", "approx": "sum"},
                                                   solver="kronecker_inverse"),
         says=("approx", "expand")),
    Case("negative decay", lambda: _compose(curvature="ggn", solver="cg",
                                            preconditioner={"name": "kfac", "decay": -0.1}),
         says=("decay",)),
    Case("inverse_every 0", lambda: _compose(
        curvature="ggn", solver="cg", preconditioner={"name": "kfac", "inverse_every": 0}),
        says=("inverse_every",)),
    Case("shared EMA without its estimator", lambda: _compose(
        curvature="ggn", solver="cg", preconditioner={"name": "kfac", "factors": "kfac_ema"}),
         says=("statistic 'kfac_ema'", "builtin:kfac_ema")),
    Case("unknown factors option", lambda: _compose(
        curvature="ggn", solver="cg", preconditioner={"name": "kfac", "factors": "shared"}),
         says=("factors", "kfac_ema")),
    Case("EMA estimator with decay 1", lambda: _compose(
        curvature="ggn", solver="cg", estimators=[{"name": "kfac_ema", "decay": 1.0}],
        preconditioner={"name": "kfac", "factors": "kfac_ema"}),
         says=("decay",)),
    Case("unknown coverage", lambda: _compose(curvature={"name": "kfac", "coverage": "some"},
                                              solver="kronecker_inverse"),
         says=("coverage", "strict")),
    Case("strict coverage, a LayerNorm-like scale",
         lambda: _scaled_step({"curvature": {"name": "kfac", "coverage": "strict"},
                               "solver": "kronecker_inverse"}),
         says=("'scale'", "coverage='diagonal'")),
    Case("strict coverage in the preconditioner",
         lambda: _scaled_step({"curvature": "ggn", "solver": "cg",
                               "preconditioner": {"name": "kfac", "coverage": "strict"}}),
         says=("preconditioner 'kfac'", "'scale'")),
    Case("fisher source with a loss that cannot sample", _fisher_without_sampler,
         says=("fisher", "'ggn' or 'empirical'")),
    Case("conv kernel reshaped from a 2-D parameter: a listed diagonal block",
         lambda: _reshaped_conv_kernel("diagonal"), expect="ok", check=_listed_as_diagonal),
    Case("conv kernel reshaped from a 2-D parameter, strict coverage",
         lambda: _reshaped_conv_kernel("strict"), says=("'w'", "reshaped", "coverage='diagonal'")),
    Case("unfactored parameters are handled, not dropped",
         lambda: _scaled_step({"curvature": "kfac", "solver": "kronecker_inverse"}),
         expect="ok"),
]


def test_bad_input_corpus():
    counts = check_corpus("kfac", CASES)
    assert counts["named"] >= 8


def test_option_errors_are_option_errors():
    with pytest.raises(OptionError, match="decay"):
        KFACPreconditioner(decay=1.5)


def test_method_explain_lists_the_unfactored_parameters():
    model, params = _scaled_model()
    method = compose(predict_fn=model.outputs, loss="softmax_cross_entropy", curvature="kfac",
                     solver="kronecker_inverse")
    assert "diagonal block" in method.explain()  # the rule, before the first step
    batch = _batch("softmax_cross_entropy", 2, 3, 2, 0)
    method.step(params, method.init(params), batch, jax.random.key(0))
    text = method.explain()
    assert "scale: diagonal block (used by mul" in text
    assert "l0/w + l0/b: Kronecker block A 4x4, G 2x2" in text


# ------------------------------------------------------------------ kfac-jax (bench extra)


def test_bench_part_is_registered_with_its_schema():
    from somax_plug._src import bench
    from somax_plug._src.benchmarks import kfac as kfac_bench

    assert "kfac" in bench._part_names()
    assert bench._part_names() == tuple(bench._parts()), "--only lists every part, in order"
    report = kfac_bench.run(smoke=True)
    assert set(report["ratios"]) == {"kfac / kfac-jax (k=1)", "kfac / kfac-jax (k=10)"}
