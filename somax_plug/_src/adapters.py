"""Adapters: Flax (Linen, NNX) and Equinox models as somax_plug models, and back.

Each adapter splits the user's model into what :func:`~somax_plug.compose` and
:func:`~somax_plug.as_optax` need, an :class:`Adapted` record:

* ``predict_fn(params, inputs, *, state, key) -> (outputs, new_state)`` (only the
  keywords its flags declare; the flags are attributes of ``predict_fn`` too, so
  ``compose(predict_fn=adapted.predict_fn, ...)`` picks them up),
* ``params``: the trainable leaves (Linen ``variables["params"]``, NNX ``nnx.Param``,
  Equinox ``eqx.is_inexact_array`` leaves),
* ``state``: the model state (Linen's non-``params`` collections such as
  ``batch_stats``, NNX ``nnx.BatchStat``, an Equinox ``eqx.nn.State``), or None,

and :meth:`Adapted.export` puts trained ``params`` and ``state`` back into the user's
kind of object (Linen: a ``variables`` dict; NNX: the user's module, updated in place;
Equinox: the model, or ``(model, state)``).

Train mode, keys. ``predict_fn`` runs the model in train mode (Linen:
``train_kwargs``; NNX: ``module.train()`` on a merged copy; Equinox: inference off),
so BatchNorm normalises with the batch's statistics and updates its running ones, and
dropout is on. The step gives it one key per step (:func:`~somax_plug.model_key`):
Linen gets ``rngs={name: fold_in(key, i)}`` for each name in ``rngs``; NNX's random
streams are reseeded from it (``nnx.reseed``) before the call, so the mask depends on
the step's key only; Equinox models are called once per example under ``jax.vmap``
(``axis_name`` for BatchNorm's batch statistics) with ``key`` split over the batch.
Within one step every consumer calls ``predict_fn`` with the same key, hence sees
the same mask (see :mod:`somax_plug._src.model` for the curvature convention).

Flax and Equinox are optional extras (``pip install somax-plug[flax]`` /
``[equinox]``), imported only when an adapter is called.

Example (NNX):
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from somax_plug.models import from_nnx
    >>> net = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
    ...                      nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    >>> adapted = from_nnx(net)
    >>> adapted.has_state, adapted.has_rng
    (True, False)
    >>> out, new_state = adapted.predict_fn(adapted.params, jnp.ones((5, 3)),
    ...                                     state=adapted.state)
    >>> out.shape
    (5, 4)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax

from somax_plug._src.errors import InputError

PyTree = Any

__all__ = ["Adapted", "from_equinox", "from_flax_linen", "from_nnx"]


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this adapter needs {module!r}, an optional extra of somax_plug: "
            f"pip install 'somax-plug[{extra}]'"
        ) from exc


def _salt(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


class Adapted:
    """A user's model split for somax_plug: ``predict_fn`` with its flags, params, state.

    Attributes:
        predict_fn: the model contract's function (attributes ``has_state`` and
            ``has_rng`` carry the flags).
        params: the trainable parameters (a pytree).
        state: the model state, or None when the model has none.
        has_state, has_rng: the declared flags.
        library: ``"flax.linen"``, ``"flax.nnx"`` or ``"equinox"``.
    """

    def __init__(
        self,
        predict_fn: Callable[..., Any],
        params: PyTree,
        state: PyTree,
        has_rng: bool,
        export: Callable[[PyTree, PyTree], Any],
        evaluate: Callable[[PyTree, PyTree, PyTree], Any],
        library: str,
    ) -> None:
        self.has_state = state is not None
        self.has_rng = bool(has_rng)
        predict_fn.has_state = self.has_state  # type: ignore[attr-defined]
        predict_fn.has_rng = self.has_rng  # type: ignore[attr-defined]
        self.predict_fn = predict_fn
        self.params = params
        self.state = state
        self.library = library
        self._export = export
        self._evaluate = evaluate

    def __repr__(self) -> str:
        n = sum(x.size for x in jax.tree_util.tree_leaves(self.params))
        return (
            f"Adapted({self.library}, {n} parameters, has_state={self.has_state}, "
            f"has_rng={self.has_rng})"
        )

    def compose(self, *args: Any, **kwargs: Any) -> Any:
        """:func:`~somax_plug.compose` with this model's ``predict_fn`` and flags."""
        from somax_plug._src.composition import compose

        return compose(*args, predict_fn=self.predict_fn, has_state=self.has_state,
                       has_rng=self.has_rng, **kwargs)

    def as_optax(self, *args: Any, **kwargs: Any) -> Any:
        """:func:`~somax_plug.as_optax` with this model's ``predict_fn``, flags and state."""
        from somax_plug._src.optax_bridge import as_optax

        if "method" not in kwargs:
            kwargs.update(predict_fn=self.predict_fn, has_state=self.has_state,
                          has_rng=self.has_rng)
        return as_optax(*args, model_state=self.state, **kwargs)

    def init(self, method: Any) -> Any:
        """``method.init(params, state)``: the method state for this model's start."""
        return method.init(self.params, self.state)

    def export(self, params: PyTree, state: PyTree = None) -> Any:
        """Put trained ``params`` (and ``state``) back into the user's kind of model."""
        if self.has_state and state is None:
            raise InputError(
                f"this {self.library} model has state: pass export(params, state) with the "
                "trained state (method_state.model_state, or model_state_of(opt_state))"
            )
        return self._export(params, state)

    def evaluate(self, params: PyTree, state: PyTree, inputs: PyTree) -> Any:
        """The outputs in inference mode (running statistics, no dropout)."""
        return self._evaluate(params, state, inputs)


def _plain(tree: PyTree) -> PyTree:
    """Mappings (FrozenDict included) as plain dicts, recursively."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


# ------------------------------------------------------------------ Flax Linen
def from_flax_linen(
    module: Any,
    variables: Mapping[str, Any],
    *,
    rngs: Sequence[str] = (),
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
    method: Any = None,
) -> Adapted:
    """A Flax Linen module and its ``variables`` as a somax_plug model.

    ``variables["params"]`` are the parameters; every other collection
    (``batch_stats``, ...) is the model state, passed as ``mutable`` in train mode.

    Args:
        module: the ``flax.linen.Module``.
        variables: ``module.init(...)``'s result.
        rngs: the rng names the module draws in train mode (e.g. ``("dropout",)``);
            each gets ``fold_in(key, crc32(name))`` of the step's key.
        train_kwargs / eval_kwargs: keyword arguments of ``module.apply`` in train /
            inference mode (e.g. ``{"train": True}`` / ``{"train": False}``).
        method: passed to ``module.apply``.

    Returns: an :class:`Adapted`; ``export(params, state)`` is the new ``variables``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> from somax_plug.models import from_flax_linen
        >>> class MLP(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, train):
        ...         x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        ...         return nn.Dense(2)(nn.Dropout(0.1, deterministic=not train)(x))
        >>> v = MLP().init(jax.random.key(0), jnp.ones((3, 5)), train=False)
        >>> a = from_flax_linen(MLP(), v, rngs=("dropout",), train_kwargs={"train": True},
        ...                     eval_kwargs={"train": False})
        >>> a.has_state, a.has_rng, sorted(a.state)
        (True, True, ['batch_stats'])
    """
    _require("flax.linen", "flax")
    variables = _plain(variables)
    if not isinstance(variables, dict) or "params" not in variables:
        raise InputError(
            f"variables must be the mapping module.init returns, with a 'params' collection; "
            f"got {type(variables).__name__}"
            + (f" with collections {sorted(variables)}" if isinstance(variables, dict) else "")
        )
    names = tuple(rngs)
    for name in names:
        if not isinstance(name, str):
            raise InputError(f"rngs must be rng names (str) such as 'dropout', got {name!r}")
    params = variables["params"]
    collections = sorted(c for c in variables if c != "params")
    state = {c: variables[c] for c in collections} if collections else None
    train_kw = dict(train_kwargs or {})
    eval_kw = dict(eval_kwargs or {})
    extra = {} if method is None else {"method": method}

    def rng_dict(key: Any) -> dict[str, Any]:
        return {name: jax.random.fold_in(key, _salt(name)) for name in names}

    def call(params: PyTree, inputs: PyTree, state: PyTree, key: Any) -> Any:
        kw = dict(train_kw, **extra)
        if names:
            kw["rngs"] = rng_dict(key)
        if state is None:
            return module.apply({"params": params}, inputs, **kw)
        out, updates = module.apply(
            {"params": params, **state}, inputs, mutable=list(collections), **kw
        )
        updates = _plain(updates)
        new = {c: updates.get(c, state[c]) for c in collections}
        # keep the state's dtypes (Linen may compute float64 statistics for float32
        # variables under jax_enable_x64)
        return out, jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), new, state)

    predict_fn = _contract(call, state is not None, bool(names))

    def export(params: PyTree, state: PyTree) -> dict[str, Any]:
        return {"params": params, **(state or {})}

    def evaluate(params: PyTree, state: PyTree, inputs: PyTree) -> Any:
        return module.apply({"params": params, **(state or {})}, inputs, **eval_kw, **extra)

    return Adapted(predict_fn, params, state, bool(names), export, evaluate, "flax.linen")


def _contract(call: Callable[..., Any], has_state: bool, has_rng: bool) -> Callable[..., Any]:
    """``predict_fn`` with exactly the keywords the flags declare."""
    if has_state and has_rng:

        def predict_fn(params: PyTree, inputs: PyTree, *, state: PyTree, key: Any) -> Any:
            return call(params, inputs, state, key)
    elif has_state:

        def predict_fn(params: PyTree, inputs: PyTree, *, state: PyTree) -> Any:  # type: ignore[misc]
            return call(params, inputs, state, None)
    elif has_rng:

        def predict_fn(params: PyTree, inputs: PyTree, *, key: Any) -> Any:  # type: ignore[misc]
            return call(params, inputs, None, key)
    else:

        def predict_fn(params: PyTree, inputs: PyTree) -> Any:  # type: ignore[misc]
            return call(params, inputs, None, None)

    return predict_fn


# -------------------------------------------------------------------- Flax NNX
def from_nnx(model: Any, *, state_filter: Any = None, train: bool = True) -> Adapted:
    """A Flax NNX module as a somax_plug model (``nnx.split`` / ``nnx.merge``).

    The parameters are the ``nnx.Param`` variables; the state the ``state_filter``
    ones (default ``nnx.BatchStat``); everything else (the rng streams' keys and
    counts, other variables) is held constant. The model draws randomness (it has
    rng streams, e.g. for ``nnx.Dropout``) exactly when it has ``nnx.RngKey``
    variables; each stream is reseeded from the step's key before the call.

    Args:
        model: the ``flax.nnx.Module`` (left untouched until :meth:`Adapted.export`).
        state_filter: an NNX filter for the state variables (default ``nnx.BatchStat``).
        train: call ``module.train()`` on the merged copy (BatchNorm on batch
            statistics, dropout on); False keeps the model's own modes.

    Returns: an :class:`Adapted`; ``export(params, state)`` updates ``model`` in
    place (``nnx.update``) and returns it.

    Example:
        >>> from flax import nnx
        >>> from somax_plug.models import from_nnx
        >>> net = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
        ...                      nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1)))
        >>> from_nnx(net).has_rng
        True
    """
    nnx = _require("flax.nnx", "flax")
    if not isinstance(model, nnx.Module):
        raise InputError(
            f"from_nnx needs a flax.nnx.Module, got {type(model).__name__}; for a Linen "
            "module use from_flax_linen(module, variables)"
        )
    state_filter = nnx.BatchStat if state_filter is None else state_filter
    graphdef, params, state, rest = nnx.split(model, nnx.Param, state_filter, ...)
    streams = sorted(
        {
            str(getattr(v, "tag", "default"))
            for _, v in nnx.to_flat_state(rest)
            if isinstance(v, nnx.RngKey)
        }
    )
    has_state = bool(jax.tree_util.tree_leaves(state))

    def is_var(x: Any) -> bool:
        return isinstance(x, nnx.Variable)

    def seeded(key: Any) -> Any:
        """``rest`` with fresh variables: each stream's key from ``key``, counts 0
        (functional: the variables are created in the current trace, not mutated)."""

        def one(v: Any) -> Any:
            if key is not None and isinstance(v, nnx.RngKey):
                tag = str(getattr(v, "tag", "default"))
                return v.replace(jax.random.fold_in(key, _salt(tag)))
            if key is not None and isinstance(v, nnx.RngCount):
                return v.replace(jax.numpy.zeros_like(v.get_value()))
            return v.replace(v.get_value()) if is_var(v) else v

        return jax.tree_util.tree_map(one, rest, is_leaf=is_var)

    def fresh(tree: PyTree) -> PyTree:
        # NNX refuses to mutate a variable made at another trace level (a state
        # closed over by the step's linearization): copy every variable here
        return jax.tree_util.tree_map(
            lambda v: v.replace(v.get_value()) if is_var(v) else v, tree, is_leaf=is_var
        )

    def merged(params: PyTree, st: PyTree, key: Any = None) -> Any:
        return nnx.merge(graphdef, fresh(params), fresh(st if has_state else state), seeded(key))

    def call(params: PyTree, inputs: PyTree, st: PyTree, key: Any) -> Any:
        m = merged(params, st, key if streams else None)
        if train:
            m.train()
        out = m(inputs)
        if not has_state:
            return out
        return out, nnx.state(m, state_filter)

    predict_fn = _contract(call, has_state, bool(streams))

    def export(params: PyTree, st: PyTree) -> Any:
        nnx.update(model, params, *((st,) if has_state else ()))
        return model

    def evaluate(params: PyTree, st: PyTree, inputs: PyTree) -> Any:
        m = merged(params, st)
        m.eval()
        return m(inputs)

    return Adapted(
        predict_fn, params, state if has_state else None, bool(streams), export, evaluate,
        "flax.nnx",
    )


# --------------------------------------------------------------------- Equinox
def from_equinox(
    model: Any,
    state: Any = None,
    *,
    has_rng: bool | None = None,
    axis_name: Hashable = "batch",
    batched: bool = False,
) -> Adapted:
    """An Equinox module (and its ``eqx.nn.State``) as a somax_plug model.

    The parameters are the floating-point array leaves (``eqx.partition(model,
    eqx.is_inexact_array)``); the rest of the module is static. Equinox modules act
    on one example: the adapter maps them over the batch with ``jax.vmap``
    (``axis_name`` is the name ``eqx.nn.BatchNorm(..., axis_name=...)`` reduces over)
    and calls ``model(x, state, key=k)`` (with state) or ``model(x, key=k)``, the
    step's key split over the batch. ``batched=True`` calls the model on the whole
    batch instead.

    Args:
        model: the ``eqx.Module`` (from ``eqx.nn.make_with_state`` when it has state).
        state: its ``eqx.nn.State``, or None.
        has_rng: whether to pass a key (None: when the model holds an
            ``eqx.nn.Dropout``).
        axis_name: the vmapped batch axis's name.
        batched: the model takes the whole batch itself.

    Returns: an :class:`Adapted`; ``export(params, state)`` is the trained model, or
    ``(model, state)`` when it has state.

    Example:
        >>> import jax
        >>> import equinox as eqx
        >>> from somax_plug.models import from_equinox
        >>> mlp = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0))
        >>> a = from_equinox(mlp)
        >>> a.predict_fn(a.params, jax.numpy.ones((4, 3))).shape
        (4, 2)
    """
    eqx = _require("equinox", "equinox")
    if not isinstance(model, eqx.Module):
        raise InputError(f"from_equinox needs an equinox.Module, got {type(model).__name__}")
    if state is not None and not isinstance(state, eqx.nn.State):
        raise InputError(
            f"state must be the eqx.nn.State from eqx.nn.make_with_state, got "
            f"{type(state).__name__}"
        )
    if has_rng is None:
        is_drop = lambda x: isinstance(x, eqx.nn.Dropout)  # noqa: E731
        has_rng = any(map(is_drop, jax.tree_util.tree_leaves(model, is_leaf=is_drop)))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    train_static = eqx.nn.inference_mode(static, value=False)

    def one(m: Any, x: Any, st: Any, k: Any) -> Any:
        kw = {"key": k} if has_rng else {}
        return m(x, st, **kw) if state is not None else m(x, **kw)

    def clone(st: Any) -> Any:
        # every consumer of a step reads the same state: a clone per call (Equinox
        # refuses to read a state object twice)
        if st is None:
            return st
        leaves, treedef = jax.tree_util.tree_flatten(st)
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def run(static_part: Any, params: PyTree, inputs: PyTree, st: PyTree, key: Any) -> Any:
        m = eqx.combine(params, static_part)
        st = clone(st)
        if batched:
            return one(m, inputs, st, key)
        b = jax.tree_util.tree_leaves(inputs)[0].shape[0]
        keys = jax.random.split(key, b) if has_rng else None
        in_axes = (0, 0 if has_rng else None)
        out_axes = (0, None) if state is not None else 0
        return jax.vmap(
            lambda x, k: one(m, x, st, k), axis_name=axis_name, in_axes=in_axes,
            out_axes=out_axes,
        )(inputs, keys)

    def call(params: PyTree, inputs: PyTree, st: PyTree, key: Any) -> Any:
        return run(train_static, params, inputs, st, key)

    predict_fn = _contract(call, state is not None, has_rng)

    def export(params: PyTree, st: PyTree) -> Any:
        trained = eqx.combine(params, static)
        return (trained, st) if state is not None else trained

    def evaluate(params: PyTree, st: PyTree, inputs: PyTree) -> Any:
        m = eqx.nn.inference_mode(eqx.combine(params, static), value=True)
        st = clone(st)
        if batched:
            out = m(inputs, st) if state is not None else m(inputs)
        elif state is not None:
            out = jax.vmap(lambda x: m(x, st), axis_name=axis_name, out_axes=(0, None))(inputs)
        else:
            out = jax.vmap(m)(inputs)
        return out[0] if state is not None else out

    return Adapted(predict_fn, params, state, has_rng, export, evaluate, "equinox")
