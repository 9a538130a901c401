"""The layer map: discovery on plain JAX, Flax Linen, Flax NNX and Equinox models, and
per-layer inputs / output gradients against dense float64 references.

Models are tiny (B=2, T=3, D=8) so that every test traces in well under a second.
Tolerances: 1e-10 in float64 (the tapped pass evaluates the same equations as the
reference, so only summation order differs).
"""

from __future__ import annotations

import functools
import subprocess
import sys

import attrs
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from somax_plug import (
    CompositionError,
    Estimator,
    InputError,
    Requires,
    Resources,
    compose,
    declare,
    make_model,
)
from somax_plug.layers import (
    LayerMap,
    discover,
    layer_io,
    layer_map_provider,
    layer_providers,
    param_paths,
)
from somax_plug.testing.references import ProbeSolver
from tests.reliability import Case, check_corpus

B, T, D, H = 2, 3, 8, 2
TOL = 1e-10


def fill(abstract, seed):
    """Random float64 values for a pytree of ``jax.ShapeDtypeStruct`` (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape)),
        abstract,
        is_leaf=lambda s: isinstance(s, jax.ShapeDtypeStruct),
    )


def normal(seed, shape, scale=0.5):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape))


def shapes(tree):
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float64), tree,
                                  is_leaf=lambda s: isinstance(s, tuple))


# ------------------------------------------------------------------ plain JAX models


def plain_mlp_fwd(p, x, d=None):
    d = d or {}
    y1 = x @ p["l1"]["w"] + d.get("l1/w", 0.0)
    h = jnp.tanh(y1 + p["l1"]["b"])
    return h @ p["l2"]["w"] + d.get("l2/w", 0.0) + p["l2"]["b"], {"l1/w": x, "l2/w": h}


@functools.cache
def plain_mlp():
    p = fill(shapes({"l1": {"w": (4, 5), "b": (5,)}, "l2": {"w": (5, 3), "b": (3,)}}), 0)
    return (lambda p, x: plain_mlp_fwd(p, x)[0]), p, normal(9, (B, 4))


CONV_DN = ("NCHW", "OIHW", "NCHW")


def plain_cnn_fwd(p, x, d=None):
    d = d or {}
    y = jax.lax.conv_general_dilated(x, p["conv"]["w"], (1, 1), "VALID",
                                     dimension_numbers=CONV_DN) + d.get("conv/w", 0.0)
    h = jax.nn.relu(y + p["conv"]["b"][None, :, None, None]).reshape(x.shape[0], -1)
    return h @ p["out"]["w"] + d.get("out/w", 0.0) + p["out"]["b"], {"conv/w": x, "out/w": h}


@functools.cache
def plain_cnn():
    p = fill(shapes({"conv": {"w": (3, 1, 3, 3), "b": (3,)}, "out": {"w": (48, 2), "b": (2,)}}), 1)
    return (lambda p, x: plain_cnn_fwd(p, x)[0]), p, normal(8, (B, 1, 6, 6))


def plain_block_fwd(p, x, d=None):
    d = d or {}
    tap = lambda name, a, w: a @ w + d.get(name, 0.0)
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    h = (x - m) / jnp.sqrt(v + 1e-5) * p["ln"]["scale"] + p["ln"]["bias"]
    q, k, vv = tap("q", h, p["q"]), tap("k", h, p["k"]), tap("v", h, p["v"])
    s = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / jnp.sqrt(D), -1)
    att = jnp.einsum("bts,bsd->btd", s, vv)
    x2 = x + tap("o", att, p["o"])
    h1 = jax.nn.gelu(tap("mlp1/w", x2, p["mlp1"]["w"]) + p["mlp1"]["b"])
    out = x2 + tap("mlp2/w", h1, p["mlp2"]["w"]) + p["mlp2"]["b"]
    return out, {"q": h, "k": h, "v": h, "o": att, "mlp1/w": x2, "mlp2/w": h1}


@functools.cache
def plain_block():
    p = fill(shapes({"ln": {"scale": (D,), "bias": (D,)}, "q": (D, D), "k": (D, D),
                     "v": (D, D), "o": (D, D), "mlp1": {"w": (D, 16), "b": (16,)},
                     "mlp2": {"w": (16, D), "b": (D,)}}), 2)
    return (lambda p, x: plain_block_fwd(p, x)[0]), p, normal(7, (B, T, D))


# ---------------------------------------------------------------- Flax Linen models


def _linen(module, x):
    return module.apply, fill(jax.eval_shape(module.init, jax.random.key(0), x), 3), x


@functools.cache
def linen_mlp():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.tanh(nn.Dense(5)(x)))

    return _linen(MLP(), normal(9, (B, 4)))


@functools.cache
def linen_cnn():
    nn = pytest.importorskip("flax.linen")

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.avg_pool(nn.relu(nn.Conv(4, (3, 3))(x)), (2, 2), (2, 2))
            return nn.Dense(2)(x.reshape(x.shape[0], -1))

    return _linen(CNN(), normal(8, (B, 6, 6, 1)))


@functools.cache
def linen_block():
    nn = pytest.importorskip("flax.linen")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + nn.MultiHeadDotProductAttention(num_heads=H)(nn.LayerNorm()(x))
            return x + nn.Dense(D)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))

    return _linen(Block(), normal(7, (B, T, D)))


# ------------------------------------------------------------------ Flax NNX models


def _nnx(module, x):
    nnx = pytest.importorskip("flax.nnx")
    graphdef, state = nnx.split(nnx.eval_shape(module))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), fill(state, 4), x


@functools.cache
def nnx_mlp():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 5, rngs=rngs)
            self.l2 = nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.tanh(self.l1(x)))

    return _nnx(lambda: MLP(nnx.Rngs(0)), normal(9, (B, 4)))


@functools.cache
def nnx_cnn():
    nnx = pytest.importorskip("flax.nnx")

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
            self.out = nnx.Linear(4 * 6 * 6, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))

    return _nnx(lambda: CNN(nnx.Rngs(0)), normal(8, (B, 6, 6, 1)))


@functools.cache
def nnx_block():
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1 = nnx.LayerNorm(D, rngs=rngs)
            self.ln2 = nnx.LayerNorm(D, rngs=rngs)
            self.att = nnx.MultiHeadAttention(num_heads=H, in_features=D, decode=False,
                                              rngs=rngs)
            self.l1 = nnx.Linear(D, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, D, rngs=rngs)

        def __call__(self, x):
            x = x + self.att(self.ln1(x))
            return x + self.l2(nnx.gelu(self.l1(self.ln2(x))))

    return _nnx(lambda: Block(nnx.Rngs(0)), normal(7, (B, T, D)))


# ------------------------------------------------------------------- Equinox models


def _eqx(module, x):
    eqx = pytest.importorskip("equinox")
    abstract = eqx.filter_eval_shape(module)
    params, static = eqx.partition(abstract, lambda s: isinstance(s, jax.ShapeDtypeStruct))
    return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), fill(params, 5), x


@functools.cache
def eqx_mlp():
    eqx = pytest.importorskip("equinox")
    mlp = lambda: eqx.nn.MLP(4, 3, 5, 1, activation=jnp.tanh, key=jax.random.key(0))
    return _eqx(mlp, normal(9, (B, 4)))


@functools.cache
def eqx_cnn():
    eqx = pytest.importorskip("equinox")
    class CNN(eqx.Module):
        conv: eqx.nn.Conv2d
        out: eqx.nn.Linear

        def __init__(self):
            k1, k2 = jax.random.split(jax.random.key(0))
            self.conv = eqx.nn.Conv2d(1, 4, 3, key=k1)
            self.out = eqx.nn.Linear(4 * 4 * 4, 2, key=k2)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.conv(x)).reshape(-1))

    return _eqx(CNN, normal(8, (B, 1, 6, 6)))


@functools.cache
def eqx_block():
    eqx = pytest.importorskip("equinox")
    class Block(eqx.Module):
        ln1: eqx.nn.LayerNorm
        ln2: eqx.nn.LayerNorm
        att: eqx.nn.MultiheadAttention
        l1: eqx.nn.Linear
        l2: eqx.nn.Linear

        def __init__(self):
            ks = jax.random.split(jax.random.key(0), 3)
            self.ln1, self.ln2 = eqx.nn.LayerNorm(D), eqx.nn.LayerNorm(D)
            self.att = eqx.nn.MultiheadAttention(H, D, key=ks[0])
            self.l1 = eqx.nn.Linear(D, 16, key=ks[1])
            self.l2 = eqx.nn.Linear(16, D, key=ks[2])

        def __call__(self, x):
            h = jax.vmap(self.ln1)(x)
            x = x + self.att(h, h, h)
            return x + jax.vmap(lambda t: self.l2(jax.nn.gelu(self.l1(t))))(jax.vmap(self.ln2)(x))

    return _eqx(Block, normal(7, (B, T, D)))


# ------------------------------------------------- expected layers: (kind, bias, batch, shared)

DENSE, TOKENS = ((0,), ()), ((0,), (1,))
MHA = ("query", "key", "value", "out")

EXPECTED = {
    "plain_mlp": ({"l1/w": ("dense", "l1/b", *DENSE), "l2/w": ("dense", "l2/b", *DENSE)}, set()),
    "plain_cnn": (
        {"conv/w": ("conv", "conv/b", (0,), (2, 3)), "out/w": ("dense", "out/b", *DENSE)},
        set(),
    ),
    "plain_block": (
        {**{k: ("dense", None, *TOKENS) for k in ("q", "k", "v", "o")},
         "mlp1/w": ("dense", "mlp1/b", *TOKENS), "mlp2/w": ("dense", "mlp2/b", *TOKENS)},
        {"ln/scale", "ln/bias"},
    ),
    "linen_mlp": (
        {f"params/Dense_{i}/kernel": ("dense", f"params/Dense_{i}/bias", *DENSE) for i in (0, 1)},
        set(),
    ),
    "linen_cnn": (
        {"params/Conv_0/kernel": ("conv", "params/Conv_0/bias", (0,), (1, 2)),
         "params/Dense_0/kernel": ("dense", "params/Dense_0/bias", *DENSE)},
        set(),
    ),
    "linen_block": (
        {**{f"params/MultiHeadDotProductAttention_0/{n}/kernel":
            ("dense", f"params/MultiHeadDotProductAttention_0/{n}/bias", *TOKENS) for n in MHA},
         **{f"params/Dense_{i}/kernel": ("dense", f"params/Dense_{i}/bias", *TOKENS)
            for i in (0, 1)}},
        {f"params/LayerNorm_{i}/{n}" for i in (0, 1) for n in ("scale", "bias")},
    ),
    "nnx_mlp": ({f"{n}/kernel": ("dense", f"{n}/bias", *DENSE) for n in ("l1", "l2")}, set()),
    "nnx_cnn": (
        {"conv/kernel": ("conv", "conv/bias", (0,), (1, 2)),
         "out/kernel": ("dense", "out/bias", *DENSE)},
        set(),
    ),
    "nnx_block": (
        {**{f"att/{n}/kernel": ("dense", f"att/{n}/bias", *TOKENS) for n in MHA},
         **{f"{n}/kernel": ("dense", f"{n}/bias", *TOKENS) for n in ("l1", "l2")}},
        {f"ln{i}/{n}" for i in (1, 2) for n in ("scale", "bias")},
    ),
    "eqx_mlp": (
        {f"layers/{i}/weight": ("dense", f"layers/{i}/bias", *DENSE) for i in (0, 1)}, set()
    ),
    "eqx_cnn": (
        {"conv/weight": ("conv", "conv/bias", (0,), (2, 3)),
         "out/weight": ("dense", "out/bias", *DENSE)},
        set(),
    ),
    "eqx_block": (
        {**{f"att/{n}_proj/weight": ("dense", None, *TOKENS)
            for n in ("query", "key", "value", "output")},
         **{f"{n}/weight": ("dense", f"{n}/bias", *TOKENS) for n in ("l1", "l2")}},
        {f"ln{i}/{n}" for i in (1, 2) for n in ("weight", "bias")},
    ),
}
MODELS = {name: globals()[name] for name in EXPECTED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_discovery_finds_every_kernel_with_its_shared_axes(name):
    f, params, x = MODELS[name]()
    lm = discover(f, params, x)
    layers, unmatched = EXPECTED[name]
    got = {la.kernel: (la.kind, la.bias, la.batch_axes, la.shared_axes) for la in lm}
    assert got == layers, str(lm)
    assert {p for p, _ in lm.unmatched} == unmatched, str(lm)
    # every parameter is in exactly one place: a layer (kernel or bias) or unmatched
    placed = [la.kernel for la in lm] + [la.bias for la in lm if la.bias] + [
        p for p, _ in lm.unmatched]
    assert sorted(placed) == sorted(param_paths(params)) == sorted(lm.paths)
    leaves = dict(zip(param_paths(params), jax.tree_util.tree_leaves(params), strict=True))
    for la in lm:
        assert la.kernel_shape == leaves[la.kernel].shape
        # the output has the kernel's free axes plus the input's batch and shared axes
        n_free = len(la.kernel_shape) - (len(la.contract_axes) if la.kind == "dense" else 1)
        if la.kind == "dense":
            assert len(la.output_feature_axes) == n_free
        assert len(la.output_batch_axes) == len(la.batch_axes)
        assert len(la.output_shared_axes) == len(la.shared_axes)
        for i, o in zip(la.batch_axes, la.output_batch_axes, strict=True):
            assert la.input_shape[i] == la.output_shape[o] == x.shape[0]
        if la.kind == "dense":
            for i, o in zip(la.shared_axes, la.output_shared_axes, strict=True):
                assert la.input_shape[i] == la.output_shape[o]


def test_axes_and_shapes_of_a_flax_attention_and_an_equinox_layer():
    f, params, x = linen_block()
    out = discover(f, params, x)["params/MultiHeadDotProductAttention_0/out/kernel"]
    assert out.kernel_shape == (H, D // H, D)
    assert out.input_shape == (B, T, H, D // H) and out.output_shape == (B, T, D)
    assert out.contract_axes == (2, 3) and out.output_feature_axes == (2,)
    q = discover(f, params, x)["params/MultiHeadDotProductAttention_0/query/bias"]
    assert q.kernel.endswith("query/kernel") and q.output_feature_axes == (2, 3)
    # Equinox applies W [out, in] to a vmapped input: the output is [out, B]
    f, params, x = eqx_mlp()
    la = discover(f, params, x)["layers/0/weight"]
    assert la.kernel_operand == 0 and la.output_shape == (5, B)
    assert la.output_feature_axes == (0,) and la.output_batch_axes == (1,)


# ------------------------------------------------------------- per-layer inputs / grads


@pytest.mark.parametrize(
    "build, fwd",
    [(plain_mlp, plain_mlp_fwd), (plain_cnn, plain_cnn_fwd), (plain_block, plain_block_fwd)],
    ids=["mlp", "cnn", "block"],
)
def test_layer_io_matches_hand_activations_and_perturbation_grads(build, fwd):
    f, params, x = build()
    lm = discover(f, params, x)
    u = normal(3, jax.eval_shape(f, params, x).shape, 1.0)
    zeros = {la.kernel: jnp.zeros(la.output_shape) for la in lm}

    @jax.jit
    def run(p, x, u):
        io = layer_io(f, p, x, lm)
        ref_out, acts = fwd(p, x)
        ref_d = jax.vjp(lambda d: fwd(p, x, d)[0], zeros)[1](u)[0]
        ref_p = jax.vjp(lambda p: f(p, x), p)[1](u)[0]
        return (io.outputs, io.inputs, io.output_grads(u), io.vjp(u)[0]), (ref_out, acts, ref_d,
                                                                            ref_p)

    (out, inputs, grads, cot), (ref_out, acts, ref_d, ref_p) = run(params, x, u)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=TOL)
    assert set(inputs) == set(acts) == set(grads) == set(lm.kernels)
    for k in acts:  # inputs: the activations computed by hand
        np.testing.assert_allclose(inputs[k], acts[k], rtol=0, atol=TOL, err_msg=k)
        # output gradients: jax.vjp with respect to an explicit perturbation of y_l
        np.testing.assert_allclose(grads[k], ref_d[k], rtol=0, atol=TOL, err_msg=k)
    # the same VJP gives J^T u for the parameters (the shared linearization)
    for a, b in zip(jax.tree_util.tree_leaves(cot), jax.tree_util.tree_leaves(ref_p),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", ["linen_cnn", "linen_block", "nnx_block", "eqx_cnn",
                                  "eqx_block"])
def test_kernel_and_bias_grads_rebuild_from_layer_inputs_and_output_grads(name):
    f, params, x = MODELS[name]()
    lm = discover(f, params, x)
    u = normal(4, jax.eval_shape(f, params, x).shape, 1.0)

    kernels = {la.kernel: la for la in lm}

    @jax.jit
    def run(p, x, u):
        io = layer_io(f, p, x, lm)
        grads = io.output_grads(u)
        leaves = dict(zip(param_paths(p), jax.tree_util.tree_leaves(p), strict=True))
        # grad_W = the VJP of contract(a, W) at the layer's output gradient g
        def grad_w(la):
            return jax.vjp(lambda w: la.apply(io.inputs[la.kernel], w), leaves[la.kernel])[1](
                grads[la.kernel])[0]

        gw = {k: grad_w(la) for k, la in kernels.items()}
        return io.inputs, grads, gw, jax.vjp(lambda p: f(p, x), p)[1](u)[0]

    inputs, grads, gws, ref = run(params, x, u)
    ref = dict(zip(param_paths(params), jax.tree_util.tree_leaves(ref), strict=True))
    for la in lm:
        a, g = inputs[la.kernel], grads[la.kernel]
        assert a.shape == la.input_shape and g.shape == la.output_shape
        np.testing.assert_allclose(gws[la.kernel], ref[la.kernel], rtol=0, atol=TOL,
                                   err_msg=la.kernel)
        # grad_b = g summed over the output's non-feature axes
        if la.bias is not None:
            other = tuple(i for i in range(g.ndim) if i not in la.output_feature_axes)
            gb = np.asarray(g).sum(other).reshape(la.bias_shape)
            np.testing.assert_allclose(gb, ref[la.bias], rtol=0, atol=TOL, err_msg=la.bias)


@jax.custom_vjp
def _matmul(x, w):
    return x @ w


_matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))


def nested_fwd(p, x, d=None):
    """Layers inside jit, checkpoint and custom_vjp sub-jaxprs (and relu's custom_jvp)."""
    d = d or {}
    inner = jax.jit(lambda w, b, x: jnp.tanh(x @ w + d.get("w1", 0.0) + b))
    h = jax.checkpoint(lambda x: inner(p["w1"], p["b1"], x))(x)
    h2 = jax.nn.relu(_matmul(h, p["w2"]) + d.get("w2", 0.0))
    return h2 @ p["w3"] + d.get("w3", 0.0), {"w1": x, "w2": h, "w3": h2}


def test_layers_inside_sub_jaxprs_are_found_and_tapped_at_another_batch_size():
    p = fill(shapes({"w1": (4, 5), "b1": (5,), "w2": (5, 5), "w3": (5, 2)}), 11)
    f = lambda p, x: nested_fwd(p, x)[0]
    lm = discover(f, p, normal(12, (B, 4)))
    assert lm.kernels == ("w1", "w2", "w3") and lm["w1"].bias == "b1" and not lm.unmatched
    x = normal(13, (5, 4))  # the map was found at B=2; layer_io re-traces at B=5
    u = normal(14, (5, 2), 1.0)
    zeros = {k: jnp.zeros((5, n)) for k, n in (("w1", 5), ("w2", 5), ("w3", 2))}

    @jax.jit
    def run(p, x, u):
        io = layer_io(f, p, x, lm)
        ref_d = jax.vjp(lambda d: nested_fwd(p, x, d)[0], zeros)[1](u)[0]
        return io.inputs, io.output_grads(u), nested_fwd(p, x)[1], ref_d

    inputs, grads, acts, ref_d = run(p, x, u)
    for k in ("w1", "w2", "w3"):
        np.testing.assert_allclose(inputs[k], acts[k], rtol=0, atol=TOL, err_msg=k)
        np.testing.assert_allclose(grads[k], ref_d[k], rtol=0, atol=TOL, err_msg=k)


def test_layer_io_crosses_jit_and_its_map_is_static():
    f, params, x = plain_mlp()
    lm = discover(f, params, x)
    assert jax.tree_util.tree_leaves(lm) == [] and hash(lm) == hash(discover(f, params, x))

    @jax.jit
    def run(p, x, lm, u):
        io = layer_io(f, p, x, lm)
        return io.inputs, io.output_grads(u), jax.tree_util.Partial(io.output_grads)

    u = jnp.ones((B, 3))
    inputs, grads, _ = run(params, x, lm, u)
    ref = layer_io(f, params, x, lm)
    np.testing.assert_allclose(inputs["l2/w"], ref.inputs["l2/w"], rtol=0, atol=TOL)
    np.testing.assert_allclose(grads["l1/w"], ref.output_grads(u)["l1/w"], rtol=0, atol=TOL)


def test_layer_map_is_frozen_and_prints_a_table():
    f, params, x = plain_block()
    lm = discover(f, params, x)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        lm.layers = ()
    text = str(lm)
    assert text.splitlines()[0] == "layer map: 6 layer(s), 2 unmatched"
    assert "kernel" in text.splitlines()[1] and "shared" in text.splitlines()[1]
    for la in lm:
        assert any(line.startswith(la.kernel + " ") for line in text.splitlines())
    assert "unmatched  ln/scale: used by mul" in text
    assert isinstance(lm, LayerMap) and len(lm) == 6 and "mlp1/b" in lm


# ----------------------------------------------------------- unmatched and overrides


@functools.cache
def tied():
    """An embedding used as the output projection (a tied weight) and an unused leaf."""
    p = fill(shapes({"emb": (6, 4), "w": (4, 4), "unused": (2,)}), 5)
    return (lambda p, x: jnp.tanh(x @ p["emb"] @ p["w"]) @ p["emb"].T), p, jnp.ones((B, 6))


def test_unrecognised_parameters_are_listed_with_the_reason():
    f, p, x = tied()
    lm = discover(f, p, x)
    why = dict(lm.unmatched)
    assert lm.kernels == ("w",)
    assert "feeds 2 dot_general" in why["emb"] and "not used" in why["unused"]


def test_overrides_take_out_change_and_declare_layers():
    f, p, x = tied()
    lm = discover(f, p, x, overrides={
        "w": {"shared_axes": (0,), "batch_axes": ()},
        "emb": {"kind": "dense", "contract_axes": (1,)},
    })
    assert lm["w"].shared_axes == (0,) and lm["w"].source == "override"
    assert lm["emb"].kind == "dense" and lm["emb"].source == "override"
    assert [path for path, _ in lm.unmatched] == ["unused"]
    assert "w*" in str(lm) and "set or changed by an override" in str(lm)
    f, params, x = plain_mlp()
    lm = discover(f, params, x, overrides={"l2/w": None})
    assert lm.kernels == ("l1/w",)
    assert dict(lm.unmatched) == {"l2/b": "bias of 'l2/w', taken out by an override",
                                  "l2/w": "taken out of the layer map by an override"}


def test_bad_layer_inputs_corpus():
    f, params, x = plain_mlp()

    def never(p, x):
        raise AssertionError("traced before the overrides were checked")

    tf, tp, tx = tied()
    declared_tied = discover(tf, tp, tx, overrides={"emb": {"kind": "dense"}})
    ln_f, ln_p, ln_x = plain_block()
    ln_as_dense = discover(ln_f, ln_p, ln_x, overrides={"ln/scale": {"kind": "dense"}})
    as_conv = discover(f, params, x, overrides={"l1/w": {"kind": "conv"}})
    lm = discover(f, params, x)
    cases = [
        Case("override path does not exist (before tracing)",
             lambda: discover(never, params, x, overrides={"l1/kernel": None}),
             error=InputError, says=("'l1/kernel'", "does not exist", "closest", "'l1/w'")),
        Case("override key not a string",
             lambda: discover(f, params, x, overrides={0: None}), says=("path string",)),
        Case("override value not a mapping",
             lambda: discover(f, params, x, overrides={"l1/w": "dense"}),
             says=("'l1/w'", "expected None", "mapping")),
        Case("override unknown field",
             lambda: discover(f, params, x, overrides={"l1/w": {"axes": (1,)}}),
             says=("unknown field", "'axes'", "shared_axes")),
        Case("override unknown kind",
             lambda: discover(f, params, x, overrides={"l1/w": {"kind": "lstm"}}),
             says=("'lstm'", "dense", "conv")),
        Case("override bias does not exist",
             lambda: discover(f, params, x, overrides={"l1/w": {"bias": "l1/bias"}}),
             says=("'l1/bias'", "does not exist", "'l1/b'")),
        Case("override names a bias instead of its kernel",
             lambda: discover(f, params, x, overrides={"l1/b": {"shared_axes": ()}}),
             says=("bias of layer 'l1/w'", "kernel path")),
        Case("override steals another layer's bias",
             lambda: discover(f, params, x, overrides={"l1/w": {"bias": "l2/b"}}),
             says=("'l2/b'", "already belongs", "'l2/w'")),
        Case("override declares an unmatched path without a kind",
             lambda: discover(tf, tp, tx, overrides={"emb": {"shared_axes": ()}}),
             says=("'emb'", "give its 'kind'")),
        Case("provider with a bad override value",
             lambda: layer_map_provider({"x": 3}), says=("'x'", "mapping")),
        Case("layer_io on a declared layer fed to no matmul",
             lambda: layer_io(ln_f, ln_p, ln_x, ln_as_dense),
             says=("'ln/scale'", "feeds no dot_general")),
        Case("layer_io on a tied weight",
             lambda: layer_io(tf, tp, tx, declared_tied), says=("'emb'", "feeds 2")),
        Case("layer_io with the wrong kind",
             lambda: layer_io(f, params, x, as_conv), says=("'l1/w'", "'conv'", "'dense'")),
        Case("inputs of the wrong shape",
             lambda: discover(f, params, jnp.ones((B, 7))),
             says=("discover", "tracing predict_fn", "TypeError", "(2, 7)", "batch axis first")),
        Case("layer_io on inputs of the wrong shape",
             lambda: layer_io(f, params, jnp.ones((B, 7)), lm), says=("layer_io", "(2, 7)")),
        Case("params with no leaves", lambda: discover(f, {}, x),
             says=("no array leaves", "parameter pytree")),
        Case("lookup of a path that does not exist", lambda: lm["l1/kernel"],
             error=KeyError, says=("closest", "'l1/w'")),
        Case("lookup of an unmatched path", lambda: declared_tied["unused"],
             error=KeyError, says=("in no layer", "not used")),
        Case("override that takes a layer out", expect="ok",
             run=lambda: discover(f, params, x, overrides={"l1/w": None}),
             check=lambda lm: (_ for _ in ()).throw(AssertionError("kept"))
             if "l1/w" in lm else None),
    ]
    counts = check_corpus("layer map", cases)
    assert counts["named"] == len(cases) - 1 and counts["ok"] == 1


# ---------------------------------------------------------------- planner resources


def test_layer_resources_from_one_context():
    f, params, x = plain_mlp()
    y = normal(6, (B, 3))
    from somax_plug.builtin.resources import PROVIDERS

    lm = discover(f, params, x)

    @jax.jit
    def run(p, x, y):
        res = Resources(make_model(f, "mse"), p, (x, y), None, {**PROVIDERS, **layer_providers()})
        assert res["layer_map"] == lm  # static: found at trace time
        g = res["layer_output_grads"](res["output_grad"])
        a = res["layer_inputs"]
        gw = jax.vjp(lambda w: lm["l1/w"].apply(a["l1/w"], w), p["l1"]["w"])[1](g["l1/w"])[0]
        return a, gw, res["grad"], res.counts

    a, gw, grad, counts = run(params, x, y)
    _, acts = plain_mlp_fwd(params, x)
    np.testing.assert_allclose(a["l2/w"], acts["l2/w"], rtol=0, atol=TOL)
    np.testing.assert_allclose(gw, grad["l1"]["w"], rtol=0, atol=TOL)
    assert counts["layer_io"] == 1 and counts["layer_map"] == 1


@declare("layer_gnorm2", provides={"layer_gnorm2"},
         requires={"resources": {"layer_map", "layer_inputs", "layer_output_grads",
                                 "output_grad"}})
@attrs.frozen
class LayerGradNorm(Estimator):
    """``sum_l ||grad_{W_l}||^2``, each rebuilt from the layer's input and output gradient."""

    def init(self, params):
        return {"stats": {"layer_gnorm2": jnp.zeros((), jnp.float64)}}

    def estimate(self, res, key, state):
        lm, a = res["layer_map"], res["layer_inputs"]
        g = res["layer_output_grads"](res["output_grad"])
        leaves = dict(zip(param_paths(res.params), jax.tree_util.tree_leaves(res.params),
                          strict=True))
        value = sum(
            jnp.sum(jax.vjp(lambda w, la=la: la.apply(a[la.kernel], w), leaves[la.kernel])[1](
                g[la.kernel])[0] ** 2)
            for la in lm
        )
        return {"layer_gnorm2": value}, {"stats": {"layer_gnorm2": value}}


def test_a_component_that_requires_layer_resources_is_planned_and_stepped():
    f, params, x = plain_mlp()
    y = normal(6, (B, 3))
    method = compose("ggn", ProbeSolver(needs=Requires(statistics={"layer_gnorm2"})),
                     estimators=[LayerGradNorm()], predict_fn=f, loss="mse", learning_rate=0.1)
    text = method.plan.explain()
    for name in ("layer_map", "layer_io", "layer_inputs", "layer_output_grads"):
        assert name in text and method.plan.resource(name).producer == f"builtin:{name}"
    assert "layer map:\n  required by estimator[0]:LayerGradNorm;" in text
    # with the model's params and inputs, the map itself: every kernel, shapes, sharing
    full = method.explain(params, x)
    assert full.startswith(text) and str(discover(f, params, x)) in full
    assert "l1/w" in full and "l2/w" in full
    plain = compose("ggn", "cg", predict_fn=f, loss="mse")
    assert "layer map" not in plain.explain(params, x)
    with pytest.raises(CompositionError, match="reads no layer map"):
        plain.layer_map(params, x)
    state = method.init(params)
    _, state, info = method.step(params, state, (x, y), jax.random.key(0))
    g = jax.grad(lambda p: make_model(f, "mse").loss_value(p, (x, y)))(params)
    expected = sum(float(jnp.sum(g[k]["w"] ** 2)) for k in ("l1", "l2"))
    got = float(state.estimators[0]["stats"]["layer_gnorm2"])
    assert got == pytest.approx(expected, rel=1e-10) and bool(info["finite"])


def count_primitive(jaxpr, name):
    """How many equations of ``name`` a jaxpr holds, sub-jaxprs included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += count_primitive(inner, name)
    return n


def test_one_forward_pass_serves_the_linearization_and_the_layer_resources():
    f, params, x = plain_mlp()  # one tanh per forward pass
    y = normal(6, (B, 3))
    reads_op = Requires(statistics={"layer_gnorm2"}, resources={"operator"})
    results = {}
    for label, unplanned in (("planned", False), ("unplanned", True)):
        method = compose("ggn", ProbeSolver(needs=reads_op), estimators=[LayerGradNorm()],
                         predict_fn=f, loss="mse", learning_rate=0.1, unplanned=unplanned)
        state = method.init(params)
        batch, key = (x, y), jax.random.key(0)
        jaxpr = jax.make_jaxpr(method._step)(params, state, batch, key).jaxpr
        _, state, info = method.step(params, state, batch, key)
        results[label] = (count_primitive(jaxpr, "tanh"), float(info["solver_residual"]),
                          float(state.estimators[0]["stats"]["layer_gnorm2"]))
    assert "linearization (shared when due)" in method.plan.explain()
    # planned: the tapped linearization is the linearization (loss, grad, GGN products)
    assert results["planned"][0] == 1 and results["unplanned"][0] > 1
    np.testing.assert_allclose(results["planned"][1:], results["unplanned"][1:], rtol=1e-12)


@declare("layer_grad_err", provides={"layer_grad_err"},
         requires={"resources": {"layer_map", "layer_inputs", "layer_output_grads",
                                 "output_grad", "grad"}})
@attrs.frozen
class LayerGradError(Estimator):
    """``max_l |contract-VJP(a_l, g_l) - grad_{W_l}|``: layer resources vs the step's grad."""

    def init(self, params):
        return {"stats": {"layer_grad_err": jnp.zeros((), jnp.float64)}}

    def estimate(self, res, key, state):
        lm, a = res["layer_map"], res["layer_inputs"]
        g = res["layer_output_grads"](res["output_grad"])
        paths = param_paths(res.params)
        leaves = dict(zip(paths, jax.tree_util.tree_leaves(res.params), strict=True))
        grad = dict(zip(paths, jax.tree_util.tree_leaves(res["grad"]), strict=True))
        err = jnp.zeros((), jnp.float64)
        for la in lm:
            gw = jax.vjp(lambda w, la=la: la.apply(a[la.kernel], w), leaves[la.kernel])[1](
                g[la.kernel])[0]
            err = jnp.maximum(err, jnp.max(jnp.abs(gw - grad[la.kernel])))
        return {"layer_grad_err": err}, {"stats": {"layer_grad_err": err}}


def test_layer_resources_see_the_steps_dropout_mask_and_batchnorm_state():
    nnx = pytest.importorskip("flax.nnx")
    from somax_plug.models import from_nnx

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 3, kernel_size=(3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(3, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.out = nnx.Linear(3 * 5 * 5, 2, rngs=rngs)

        def __call__(self, x):
            h = self.drop(nnx.relu(self.bn(self.conv(x))))
            return self.out(h.reshape(h.shape[0], -1))

    adapted = from_nnx(CNN(nnx.Rngs(0)))
    assert adapted.has_state and adapted.has_rng
    x, y = normal(15, (4, 5, 5, 1)).astype(jnp.float32), jnp.array([0, 1, 1, 0])
    method = adapted.compose("ggn", ProbeSolver(needs=Requires(statistics={"layer_grad_err"})),
                             estimators=[LayerGradError()], loss="softmax_cross_entropy",
                             learning_rate=0.1)
    state = adapted.init(method)
    _, state, info = method.step(adapted.params, state, (x, y), jax.random.key(1))
    err = float(state.estimators[0]["stats"]["layer_grad_err"])
    # float32 model (NNX's default dtype): the same mask gives agreement to rounding;
    # a different dropout mask would differ by O(1)
    assert bool(info["finite"]) and float(info["grad_norm"]) > 1e-3 and err < 1e-5, err


# ------------------------------------------------------------------------ no extras


def test_core_imports_without_flax_or_equinox():
    code = (
        "import sys\n"
        "for m in ('flax', 'flax.linen', 'flax.nnx', 'equinox'):\n"
        "    sys.modules[m] = None\n"
        "import somax_plug, somax_plug.layers, somax_plug.builtin.layers\n"
        "import jax.numpy as jnp\n"
        "lm = somax_plug.layers.discover(lambda p, x: x @ p, jnp.ones((3, 2)), jnp.ones((4, 3)))\n"
        "assert lm.kernels == ('',), lm\n"
        "assert not any(k.split('.')[0] in ('flax', 'equinox') and sys.modules[k] is not None\n"
        "               for k in list(sys.modules))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


MODEL_FACTORY = """
import jax.numpy as jnp

def f(p, x):
    return jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"]

def make():
    params = {"l1": {"w": jnp.ones((4, 5)), "b": jnp.zeros(5)}, "l2": {"w": jnp.ones((5, 2))}}
    return f, params, jnp.ones((3, 4))
"""


def test_cli_plan_prints_the_layer_map_of_a_model(tmp_path, monkeypatch, capsys):
    from somax_plug._src.cli import main

    (tmp_path / "my_layers_model.py").write_text(MODEL_FACTORY)
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "sgn", "--model", "my_layers_model:make"]) == 0
    out = capsys.readouterr().out
    import my_layers_model as m

    assert str(discover(*m.make())) in out and "l1/w" in out and "l2/w" in out
    assert main(["plan", "sgn", "--model", "my_layers_model"]) == 2
    assert "expected MODULE:FUNCTION" in capsys.readouterr().err
    assert main(["plan", "sgn", "--model", "my_layers_model:nope"]) == 2
    assert "cannot load it" in capsys.readouterr().err
