"""Hypothesis strategies of the conformance kit: small models and linear systems.

:func:`problems` draws a :class:`Problem`: a tiny MLP (at most a few dozen
parameters, so that dense float64 references are cheap) with its parameters in one
of several pytree layouts, a loss, and a matching batch. :func:`systems` draws a
:class:`System`: a dense ``[n, n]`` matrix of a chosen family (SPD of bounded
condition number, symmetric indefinite, diagonal, or ``U^T U`` with row factors),
a right-hand side, a damping ``lam`` and optionally a Jacobi preconditioner, all
acting on a random pytree layout.

Everything is float64 and built from a drawn seed with NumPy, so an example is
reproducible from the numbers Hypothesis prints. Architectures come from a small
set and ``predict_fn`` objects are cached per architecture, so jitted code keyed on
the model is reused when shapes repeat.

Example:
    >>> import jax
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=2, deadline=None)
    ... @given(problems(losses=("mse",)))
    ... def run(problem):
    ...     assert problem.model.loss.name == "mse"
    ...     assert problem.batch[0].dtype == "float64"
    >>> with jax.enable_x64(True):  # float64 problems are drawn inside it
    ...     run()
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from hypothesis import strategies as st

PyTree = Any

LOSSES = ("mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy")
LAYOUTS = ("dict", "list", "nested")
SYSTEM_KINDS = ("spd", "indefinite", "diagonal", "rows")

__all__ = [
    "LOSSES",
    "SYSTEM_KINDS",
    "Problem",
    "System",
    "make_problem",
    "make_system",
    "problems",
    "systems",
]


class Problem(NamedTuple):
    """A drawn model problem (float64).

    Attributes:
        model: a :class:`~somax_plug.Model` (``predict_fn`` and loss).
        params: the parameter pytree.
        batch: ``(inputs, targets)``.
        seed: the seed everything was drawn from.
        description: a short readable summary for failure messages.
    """

    model: Any
    params: PyTree
    batch: tuple[Any, Any]
    seed: int
    description: str

    @property
    def num_params(self) -> int:
        import jax

        return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(self.params))


class System(NamedTuple):
    """A drawn linear system ``(C + lam I) s = rhs`` on a pytree layout (float64).

    Attributes:
        kind: ``"spd"``, ``"indefinite"``, ``"diagonal"`` or ``"rows"``.
        matrix: ``[n, n]`` NumPy array C.
        rows: ``[R, n]`` row factors U with ``C = U^T U`` (``kind == "rows"``), else None.
        rhs: ``[n]`` NumPy right-hand side (ravel order of ``primal``).
        lam: the damping (a float >= 0).
        precond: ``[n]`` NumPy diagonal of ``M^-1`` (a Jacobi preconditioner of
            ``C + lam I``), or None.
        structure: ``(layout, leaf shapes)`` that the vectors are unravelled to.
        seed: the seed it was drawn from.
    """

    kind: str
    matrix: np.ndarray
    rows: np.ndarray | None
    rhs: np.ndarray
    lam: float
    precond: np.ndarray | None
    structure: tuple[str, tuple[tuple[int, ...], ...]]
    seed: int

    @property
    def n(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def damped(self) -> np.ndarray:
        """``C + lam I``."""
        return self.matrix + self.lam * np.eye(self.n)


# ----------------------------------------------------------------------------- models


@functools.cache
def mlp_predict_fn(layout: str, depth: int, out_dim: int) -> Callable[[PyTree, Any], Any]:
    """The cached ``predict_fn`` of a tanh MLP with ``depth`` layers in ``layout``."""
    import jax.numpy as jnp

    def layers(params: PyTree) -> list[tuple[Any, Any]]:
        if layout == "dict":
            return [(params[f"layer_{i}"]["w"], params[f"layer_{i}"]["b"]) for i in range(depth)]
        if layout == "list":
            return [(layer["w"], layer["b"]) for layer in params]
        body = [(w, b) for w, b in params["body"]]
        return [*body, (params["head"]["kernel"], params["head"]["bias"])]

    def predict_fn(params: PyTree, inputs: Any) -> Any:
        h = inputs
        pairs = layers(params)
        for i, (w, b) in enumerate(pairs):
            h = h @ w + b
            if i < len(pairs) - 1:
                h = jnp.tanh(h)
        return h.reshape(h.shape[0], out_dim)

    predict_fn.__name__ = f"mlp_{layout}_{depth}_{out_dim}"
    return predict_fn


def _pack(layers: Sequence[tuple[Any, Any]], layout: str) -> PyTree:
    if layout == "dict":
        return {f"layer_{i}": {"w": w, "b": b} for i, (w, b) in enumerate(layers)}
    if layout == "list":
        return [{"w": w, "b": b} for w, b in layers]
    w, b = layers[-1]
    return {"body": [(w_, b_) for w_, b_ in layers[:-1]], "head": {"kernel": w, "bias": b}}


def make_problem(
    seed: int,
    loss: str = "mse",
    layout: str = "dict",
    in_dim: int = 2,
    hidden: tuple[int, ...] = (3,),
    out_dim: int = 2,
    batch_size: int = 3,
    reduction: str = "mean",
    dtype: Any = None,
) -> Problem:
    """A deterministic :class:`Problem` (float64 unless ``dtype`` is given).

    Build float64 problems inside ``jax.enable_x64(True)``: outside it JAX silently
    makes float32 arrays.
    """
    import jax.numpy as jnp

    from somax_plug._src.model import make_model

    dtype = jnp.float64 if dtype is None else dtype
    if layout == "nested" and not hidden:
        hidden = (3,)
    if loss == "softmax_cross_entropy":
        out_dim = max(out_dim, 2)
    rng = np.random.default_rng(seed)
    sizes = [in_dim, *hidden, out_dim]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        w = rng.normal(size=(fan_in, fan_out)) / math.sqrt(fan_in)
        b = 0.3 * rng.normal(size=(fan_out,))
        layers.append((jnp.asarray(w, dtype), jnp.asarray(b, dtype)))
    params = _pack(layers, layout)
    inputs = jnp.asarray(rng.normal(size=(batch_size, in_dim)), dtype)
    if loss == "mse":
        targets = jnp.asarray(rng.normal(size=(batch_size, out_dim)), dtype)
    elif loss == "softmax_cross_entropy":
        targets = jnp.asarray(rng.integers(0, out_dim, size=(batch_size,)), jnp.int32)
    elif loss == "sigmoid_binary_cross_entropy":
        targets = jnp.asarray(rng.integers(0, 2, size=(batch_size, out_dim)), dtype)
    else:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    predict_fn = mlp_predict_fn(layout, len(sizes) - 1, out_dim)
    model = make_model(predict_fn, loss, reduction=reduction)
    text = (
        f"{loss} ({reduction}) on a {layout} MLP {'-'.join(map(str, sizes))}, "
        f"batch {batch_size}, seed {seed}"
    )
    return Problem(model, params, (inputs, targets), seed, text)


@st.composite
def problems(
    draw: st.DrawFn,
    losses: Sequence[str] = LOSSES,
    max_batch: int = 4,
    reductions: Sequence[str] = ("mean", "sum"),
) -> Problem:
    """A tiny random MLP problem (float64; draw it inside ``jax.enable_x64(True)``)."""
    # the first choice of each list is what Hypothesis tries first: a mid-sized case
    loss = draw(st.sampled_from(list(losses)))
    return make_problem(
        seed=draw(st.integers(0, 2**31 - 1)),
        loss=loss,
        layout=draw(st.sampled_from(LAYOUTS)),
        in_dim=draw(st.sampled_from([2, 1, 3])),
        hidden=draw(st.sampled_from([(3,), (), (4,)])),
        out_dim=draw(st.sampled_from([2, 1, 3])),
        batch_size=draw(st.sampled_from(_middle_first(1, max_batch))),
        reduction=draw(st.sampled_from(list(reductions))),
    )


def _middle_first(lo: int, hi: int) -> list[int]:
    """``lo..hi`` starting from the middle, so the first (simplest) draw is not tiny."""
    mid = (lo + hi + 1) // 2
    return [mid, *[v for v in range(lo, hi + 1) if v != mid]]


# ---------------------------------------------------------------------------- systems


def _structure(rng: np.random.Generator, n: int) -> tuple[str, tuple[tuple[int, ...], ...]]:
    k = int(rng.integers(1, min(3, n) + 1))
    cuts = sorted(rng.choice(np.arange(1, n), size=k - 1, replace=False).tolist()) if k > 1 else []
    sizes = np.diff([0, *cuts, n]).tolist()
    shapes: list[tuple[int, ...]] = []
    for m in sizes:
        if m % 2 == 0 and m > 2 and rng.random() < 0.5:
            shapes.append((2, m // 2))
        elif m == 1 and rng.random() < 0.5:
            shapes.append(())
        else:
            shapes.append((m,))
    layout = str(rng.choice(["dict", "tuple", "nested"]))
    return layout, tuple(shapes)


def unravel_numpy(flat: np.ndarray, structure: tuple, dtype: Any = None) -> PyTree:
    """A flat vector as a pytree of ``structure`` (``jax.numpy`` leaves)."""
    import jax.numpy as jnp

    dtype = jnp.float64 if dtype is None else dtype
    layout, shapes = structure
    leaves, i = [], 0
    for shape in shapes:
        m = math.prod(shape)
        leaves.append(jnp.asarray(np.reshape(flat[i : i + m], shape), dtype))
        i += m
    if layout == "dict":
        return {f"p{j}": leaf for j, leaf in enumerate(leaves)}
    if layout == "tuple":
        return tuple(leaves)
    return {"body": list(leaves[:-1]), "head": {"w": leaves[-1]}}


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random orthogonal matrix (Haar, by QR with sign correction)."""
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def make_system(
    seed: int,
    kind: str,
    n: int,
    spectrum: tuple[float, float] = (1.0, 100.0),
    lam: float = 0.0,
    precondition: bool = False,
) -> System:
    """A deterministic :class:`System` of ``kind`` with eigenvalues of C in ``spectrum``.

    ``spd``: ``Q diag(e) Q^T`` with ``e`` log-spaced over ``spectrum``; ``indefinite``:
    the same magnitudes with random signs (both signs present, and ``lam`` is added
    only where it cannot create a zero eigenvalue); ``diagonal``: ``diag(e)``;
    ``rows``: ``U^T U`` with ``R = n // 2 + 1`` random rows (psd, low rank when
    ``R < n``).
    """
    if kind not in SYSTEM_KINDS:
        raise ValueError(f"unknown system kind {kind!r}; expected one of {SYSTEM_KINDS}")
    rng = np.random.default_rng(seed)
    lo, hi = spectrum
    e = np.exp(rng.permutation(np.linspace(np.log(lo), np.log(hi), n)))
    rows = None
    if kind == "spd":
        q = orthogonal(rng, n)
        matrix = (q * e) @ q.T
    elif kind == "indefinite":
        signs = rng.choice([-1.0, 1.0], size=n)
        signs[0], signs[-1] = 1.0, -1.0
        e = signs * (e + 2 * lam)  # |e + lam| >= lo for every eigenvalue
        q = orthogonal(rng, n)
        matrix = (q * e) @ q.T
    elif kind == "diagonal":
        matrix = np.diag(e)
    else:
        rows = rng.normal(size=(n // 2 + 1, n)) * math.sqrt(hi / n)
        matrix = rows.T @ rows
    matrix = (matrix + matrix.T) / 2
    rhs = rng.normal(size=n)
    damped = matrix + lam * np.eye(n)
    precond = 1.0 / np.maximum(np.abs(np.diag(damped)), 1e-3) if precondition else None
    return System(kind, matrix, rows, rhs, float(lam), precond, _structure(rng, n), seed)


@st.composite
def systems(
    draw: st.DrawFn,
    kinds: Sequence[str] = ("spd",),
    sizes: tuple[int, int] = (2, 12),
    spectrum: tuple[float, float] = (1.0, 100.0),
    lams: Sequence[float] = (0.0, 0.1, 1.0),
    precondition: Sequence[bool] = (False, True),
) -> System:
    """A random :class:`System` (see :func:`make_system`)."""
    return make_system(
        seed=draw(st.integers(0, 2**31 - 1)),
        kind=draw(st.sampled_from(list(kinds))),
        n=draw(st.sampled_from(_middle_first(*sizes))),
        spectrum=spectrum,
        lam=draw(st.sampled_from(list(lams))),
        precondition=draw(st.sampled_from(list(precondition))),
    )
