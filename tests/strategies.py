"""Hypothesis strategies shared by the test-suite and the conformance kit.

:func:`mlp_cases` draws a tiny random MLP (at most about 200 parameters) as a
:class:`MLPCase`: a ``predict_fn(params, inputs)``, its parameters in one of several
pytree layouts (dicts, lists, tuples, nested), the loss name, the target format, the
dtype and the batch size. :func:`make_batch` builds a matching ``(inputs, targets)``
batch, deterministically from a seed.

``predict_fn`` objects are cached per architecture (layout, depth, activation,
output shape), so equal architectures give the *same* function object and jitted
code keyed on the model is reused across examples.

Example:
    >>> from hypothesis import given
    >>> @given(mlp_cases())
    ... def test_runs(case):
    ...     inputs, targets = make_batch(case, seed=0)
    ...     assert case.predict_fn(case.params, inputs).shape[0] == case.batch_size
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

PyTree = Any

LOSS_NAMES = ("mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy")
LAYOUTS = ("dict", "list", "tuple", "nested")
TARGET_KINDS = {
    "mse": ("real",),
    "softmax_cross_entropy": ("labels", "one_hot", "soft"),
    "sigmoid_binary_cross_entropy": ("binary", "soft"),
}


class MLPCase(NamedTuple):
    """A drawn model: everything a test needs to build a batch and a Model."""

    predict_fn: Callable[[PyTree, Any], Any]
    params: PyTree
    loss_name: str
    target_kind: str
    in_dim: int
    out_shape: tuple[int, ...]
    dtype: Any
    batch_size: int
    layout: str

    @property
    def num_params(self) -> int:
        return sum(int(np.size(x)) for x in _leaves(self.params))


def _leaves(tree: PyTree) -> list[Any]:
    import jax

    return jax.tree_util.tree_leaves(tree)


def _layers(params: PyTree, layout: str) -> list[tuple[Any, Any]]:
    """The ``(w, b)`` pairs of a layout, in order."""
    if layout == "dict":
        return [(params[f"layer_{i}"]["w"], params[f"layer_{i}"]["b"]) for i in range(len(params))]
    if layout == "list":
        return [(layer["w"], layer["b"]) for layer in params]
    if layout == "tuple":
        return [tuple(layer) for layer in params]
    if layout == "nested":
        body = [(w, b) for w, b in params["body"]]
        return [*body, (params["head"]["kernel"], params["head"]["bias"])]
    raise ValueError(f"unknown layout {layout!r}")


def _pack(layers: Sequence[tuple[Any, Any]], layout: str) -> PyTree:
    if layout == "dict":
        return {f"layer_{i}": {"w": w, "b": b} for i, (w, b) in enumerate(layers)}
    if layout == "list":
        return [{"w": w, "b": b} for w, b in layers]
    if layout == "tuple":
        return tuple((w, b) for w, b in layers)
    if layout == "nested":
        w, b = layers[-1]
        return {"body": [(w_, b_) for w_, b_ in layers[:-1]], "head": {"kernel": w, "bias": b}}
    raise ValueError(f"unknown layout {layout!r}")


@functools.cache
def mlp_predict_fn(layout: str, activation: str, out_shape: tuple[int, ...]) -> Callable:
    """The (cached) prediction function of an MLP with this layout and output shape."""
    act = {"tanh": jnp.tanh, "softplus": lambda x: jnp.logaddexp(x, 0.0)}[activation]

    def predict_fn(params: PyTree, inputs: Any) -> Any:
        layers = _layers(params, layout)
        h = inputs
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < len(layers) - 1:
                h = act(h)
        return h.reshape(h.shape[0], *out_shape)

    predict_fn.__name__ = f"mlp_{layout}_{activation}_{'x'.join(map(str, out_shape))}"
    return predict_fn


def init_mlp(
    seed: int, in_dim: int, hidden: Sequence[int], out_size: int, layout: str, dtype: Any
) -> PyTree:
    """Random parameters (``N(0, 1/fan_in)`` weights, small biases) in ``layout``."""
    rng = np.random.default_rng(seed)
    sizes = [in_dim, *hidden, out_size]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        w = rng.normal(size=(fan_in, fan_out)) / math.sqrt(fan_in)
        b = 0.3 * rng.normal(size=(fan_out,))
        layers.append((jnp.asarray(w, dtype), jnp.asarray(b, dtype)))
    return _pack(layers, layout)


Architecture = tuple[str, str, int, tuple[int, ...], tuple[int, ...], int]
"""``(layout, activation, in_dim, hidden widths, per-example output shape, batch size)``."""

SMALL_ARCHITECTURES: tuple[Architecture, ...] = (
    ("dict", "tanh", 2, (3,), (3,), 3),
    ("nested", "softplus", 3, (4,), (2, 2), 2),
)
"""Two fixed architectures for expensive statistical tests (compiled code is reused)."""


@st.composite
def mlp_cases(
    draw: st.DrawFn,
    losses: Sequence[str] = LOSS_NAMES,
    dtypes: Sequence[Any] = (jnp.float32, jnp.float64),
    max_batch: int = 5,
    min_batch: int = 1,
    multi_axis_outputs: bool = True,
    max_hidden_layers: int = 2,
    architectures: Sequence[Architecture] | None = None,
) -> MLPCase:
    """A tiny MLP with a random layout, widths, output shape, loss, dtype and batch size.

    With ``architectures`` the layout, activation, sizes and batch size come from that
    list (only the values, the loss, the targets and the dtype are drawn), so jitted
    code is reused whenever an architecture repeats.
    """
    loss_name = draw(st.sampled_from(list(losses)))
    dtype = draw(st.sampled_from(list(dtypes)))
    min_out = 2 if loss_name == "softmax_cross_entropy" else 1
    if architectures is not None:
        arch = draw(st.sampled_from(list(architectures)))
        layout, activation, in_dim, hidden, out_shape, batch_size = arch
        if out_shape[-1] < min_out:
            out_shape = (*out_shape[:-1], min_out)
    else:
        layout = draw(st.sampled_from(LAYOUTS))
        in_dim = draw(st.integers(1, 4))
        hidden = tuple(draw(st.lists(st.integers(2, 6), min_size=0, max_size=max_hidden_layers)))
        if layout == "nested" and not hidden:
            hidden = (draw(st.integers(2, 5)),)
        out_last = draw(st.integers(min_out, 4))
        two_axes = multi_axis_outputs and draw(st.booleans()) and draw(st.booleans())
        out_shape = (2, out_last) if two_axes else (out_last,)
        activation = draw(st.sampled_from(("tanh", "softplus")))
        batch_size = draw(st.integers(min_batch, max_batch))
    seed = draw(st.integers(0, 2**31 - 1))
    params = init_mlp(seed, in_dim, hidden, math.prod(out_shape), layout, dtype)
    return MLPCase(
        predict_fn=mlp_predict_fn(layout, activation, out_shape),
        params=params,
        loss_name=loss_name,
        target_kind=draw(st.sampled_from(TARGET_KINDS[loss_name])),
        in_dim=in_dim,
        out_shape=out_shape,
        dtype=dtype,
        batch_size=batch_size,
        layout=layout,
    )


def make_targets(rng: np.random.Generator, case: MLPCase, batch_size: int) -> Any:
    """Targets in the case's format (labels as int32, everything else in the case's dtype)."""
    shape = (batch_size, *case.out_shape)
    kind = case.target_kind
    if kind == "real":
        return jnp.asarray(rng.normal(size=shape), case.dtype)
    if kind == "labels":
        return jnp.asarray(rng.integers(0, shape[-1], size=shape[:-1]), jnp.int32)
    if kind == "one_hot":
        labels = rng.integers(0, shape[-1], size=shape[:-1])
        return jnp.asarray(np.eye(shape[-1])[labels], case.dtype)
    if kind == "soft":
        if case.loss_name == "softmax_cross_entropy":
            logits = rng.normal(size=shape)
            probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
            return jnp.asarray(probs, case.dtype)
        return jnp.asarray(rng.uniform(size=shape), case.dtype)
    if kind == "binary":
        return jnp.asarray(rng.integers(0, 2, size=shape), case.dtype)
    raise ValueError(f"unknown target kind {kind!r}")


def make_batch(case: MLPCase, seed: int = 0, batch_size: int | None = None) -> tuple[Any, Any]:
    """A deterministic ``(inputs, targets)`` batch that fits ``case``."""
    b = case.batch_size if batch_size is None else batch_size
    rng = np.random.default_rng(seed)
    inputs = jnp.asarray(rng.normal(size=(b, case.in_dim)), case.dtype)
    return inputs, make_targets(rng, case, b)


def split_batch(batch: tuple[Any, Any], at: int) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """Split a batch along its leading axis into ``[:at]`` and ``[at:]``."""
    import jax

    first = jax.tree_util.tree_map(lambda a: a[:at], batch)
    second = jax.tree_util.tree_map(lambda a: a[at:], batch)
    return first, second


def cast_params(params: PyTree, dtype: Any) -> PyTree:
    """Every leaf cast to ``dtype``."""
    import jax

    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)


def make_resources(
    model: Any,
    params: PyTree,
    batch: tuple[Any, Any],
    key: Any = None,
    curvature: Any = None,
    planned: Any = None,
) -> Any:
    """A :class:`~somax_plug._src.resources.Resources` with the built-in providers.

    With ``curvature`` (a Curvature instance) an ``"operator"`` provider builds it, as
    the step builder would. ``planned`` (names) keeps only those providers, so reading
    anything else raises, as in a planned step.
    """
    import jax

    from somax_plug import requirements_of
    from somax_plug._src.resources import ResourceProvider, Resources
    from somax_plug.builtin.resources import PROVIDERS

    providers = dict(PROVIDERS)
    if curvature is not None:
        needs = requirements_of(curvature).resources
        providers["operator"] = ResourceProvider("operator", curvature.build, requires=needs)
    if planned is not None:
        providers = {k: p for k, p in providers.items() if k in planned or k == "operator"}
    if key is None:
        key = jax.random.key(0)
    return Resources(model, params, batch, key, providers, planned=planned)


@pytest.fixture(scope="module")
def cheap_compiles():
    """Turn off most XLA optimisation for one test module, then restore it.

    Property tests compile many tiny programs (new shapes every example) and run each
    once or twice, so XLA's optimisation passes cost more than they save (about half
    the CPU time of these suites). Import it into a module and mark it ``autouse``::

        pytestmark = pytest.mark.usefixtures("cheap_compiles")
    """
    import jax

    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


class MatrixCase(NamedTuple):
    """A dense symmetric ``[n, n]`` float64 matrix acting on a pytree layout."""

    matrix: np.ndarray
    primal: PyTree
    kind: str

    @property
    def n(self) -> int:
        return int(self.matrix.shape[0])


MATRIX_KINDS = ("psd_low_rank", "indefinite", "repeated")
LEAF_SHAPES = ((), (1,), (2,), (3,), (2, 2), (1, 3), (2, 3))


@st.composite
def pytree_layouts(draw: st.DrawFn, dtype: Any = jnp.float64, min_size: int = 2) -> PyTree:
    """A pytree of zeros: 1-3 leaves of small shapes in a dict, list, tuple or nesting."""
    shapes = draw(st.lists(st.sampled_from(LEAF_SHAPES), min_size=1, max_size=3))
    if sum(math.prod(s) for s in shapes) < min_size:
        shapes.append((min_size,))
    return _layout_of([jnp.zeros(s, dtype) for s in shapes], draw(st.sampled_from(LAYOUTS)))


def _layout_of(leaves: list[Any], layout: str) -> PyTree:
    if layout == "dict":
        return {f"leaf_{i}": x for i, x in enumerate(leaves)}
    if layout == "list":
        return list(leaves)
    if layout == "tuple":
        return tuple(leaves)
    return {"a": list(leaves[:-1]), "b": (leaves[-1],)}


LAYOUT_POOL = (
    ("tuple", ((2,),)),
    ("dict", ((), (2, 2))),
    ("nested", ((3,), (), (1, 3))),
)
"""A few fixed layouts (2, 5 and 7 scalars) for tests that compile per layout."""


def pooled_layouts(dtype: Any = jnp.float64) -> st.SearchStrategy[PyTree]:
    """One of :data:`LAYOUT_POOL` (compiled code is reused when a layout repeats)."""
    return st.sampled_from(LAYOUT_POOL).map(
        lambda item: _layout_of([jnp.zeros(s, dtype) for s in item[1]], item[0])
    )


@st.composite
def symmetric_matrices(
    draw: st.DrawFn, kinds: Sequence[str] = MATRIX_KINDS, layouts: Any = None
) -> MatrixCase:
    """A symmetric matrix with a chosen spectrum on a pytree layout.

    ``layouts`` is a strategy of primal pytrees (default :func:`pytree_layouts`; pass
    :func:`pooled_layouts` to reuse compiled code across examples).

    ``psd_low_rank``: ``U^T U`` with ``U`` of rank 1..n; ``indefinite``: Gaussian
    eigenvalues; ``repeated``: eigenvalues from {0, 1, 3} with multiplicities (Krylov
    methods must restart to find them all).
    """
    primal = draw(pytree_layouts() if layouts is None else layouts)
    n = sum(int(np.size(x)) for x in _leaves(primal))
    kind = draw(st.sampled_from(list(kinds)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if kind == "psd_low_rank":
        u = rng.normal(size=(draw(st.integers(1, n)), n))
        return MatrixCase(u.T @ u, primal, kind)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = rng.normal(size=n) * 2 if kind == "indefinite" else rng.choice([0.0, 1.0, 3.0], n)
    return MatrixCase((q * lam) @ q.T, primal, kind)


def _curvatures() -> dict:
    from somax_plug.builtin.curvature import GGN, EmpiricalFisher, Fisher, Hessian

    return {
        "hessian": Hessian(),
        "ggn": GGN(),
        "fisher": Fisher(num_samples=2),
        "empirical_fisher": EmpiricalFisher(),
    }


CURVATURES = _curvatures()
"""The built-in curvature components, by name, as the operator and estimator tests use them."""
