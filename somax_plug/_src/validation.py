"""Checks of a step's arguments, run before tracing, once per input signature.

:meth:`somax_plug.Method.step` calls :meth:`InputValidator.check` before the
jitted step. The first time a *signature* (the pytree structures, shapes and
dtypes of params, state, batch and key) is seen it checks:

* the batch is a 2-tuple ``(inputs, targets)``, the targets are present, every
  leaf of both has a leading batch axis and they all share its size (and, with a
  mesh, that size splits evenly over the data axis);
* the parameters have the structure, shapes and (floating) dtypes that ``init``
  saw, and the state the structure, shapes and dtypes that ``init`` returns for
  them;
* the key is one PRNG key;
* ``predict_fn``'s outputs fit the loss and the targets: one ``jax.eval_shape``
  of ``predict_fn`` and of the loss (no FLOPs), whose failures are reported with
  the shapes involved.

On every call (:meth:`InputValidator.check_values`): the batch is not empty, and
integer labels of ``softmax_cross_entropy`` lie in ``[0, C)`` where the labels are
concrete (inside a user's own ``jit`` they are traced: the loss then turns an
out-of-range label into a NaN loss and the step is rejected).

Each failure is an :class:`~somax_plug.InputError` that names the
offending leaf and says what would be right. Later calls with a known signature
cost one pytree flatten and a set lookup.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from somax_plug import make_model
    >>> from somax_plug._src.validation import InputValidator
    >>> v = InputValidator(make_model(lambda p, x: x @ p, "mse"))
    >>> params = jnp.zeros((3, 2))
    >>> v.bind(params, ())
    >>> v.check(params, (), (jnp.ones((4, 3)), jnp.ones((4, 2))), jax.random.key(0))
    >>> try:
    ...     v.check(params, (), (jnp.ones((4, 3)), jnp.ones((4, 1))), jax.random.key(0))
    ... except Exception as e:
    ...     print(type(e).__name__)
    InputError
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from somax_plug._src.errors import InputError
from somax_plug._src.losses import MSE, SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy

PyTree = Any

__all__ = ["InputValidator", "signature", "spec_tree"]


# --------------------------------------------------------------------- helpers
def _leaf_sig(x: Any) -> tuple[tuple[int, ...], str]:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        try:
            return tuple(np.shape(x)), str(jnp.result_type(x))
        except (TypeError, ValueError):
            return (), f"<{type(x).__name__}>"
    return tuple(shape), str(dtype)


def _fast_sig(x: Any) -> tuple[Any, Any]:
    """``(shape, dtype)`` as objects (hashable, no string formatting: once per step)."""
    try:
        return x.shape, x.dtype
    except AttributeError:
        return _leaf_sig(x)


def _flat_sig(tree: PyTree) -> tuple[Any, tuple]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(map(_fast_sig, leaves))


def signature(params: PyTree, state: PyTree, batch: Any, key: Any) -> tuple:
    """A hashable summary of structures, shapes and dtypes (weak types ignored)."""
    return (_flat_sig(params), _flat_sig(state), _flat_sig(batch), _fast_sig(key))


def spec_tree(tree: PyTree) -> PyTree:
    """``tree`` with every leaf replaced by its ``jax.ShapeDtypeStruct``."""

    def one(x: Any) -> jax.ShapeDtypeStruct:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        shape, _ = _leaf_sig(x)
        return jax.ShapeDtypeStruct(shape, getattr(x, "dtype", None) or jnp.result_type(x))

    return jax.tree_util.tree_map(one, tree)


def _describe(tree: PyTree, prefix: str) -> str:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        return f"{prefix} (no arrays)"
    parts = []
    for path, x in leaves[:6]:
        shape, dtype = _leaf_sig(x)
        parts.append(f"{prefix}{jax.tree_util.keystr(path)}: {dtype}{list(shape)}")
    more = f", ... ({len(leaves) - 6} more)" if len(leaves) > 6 else ""
    return ", ".join(parts) + more


def _shape_str(tree: PyTree) -> str:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if treedef.num_leaves == 1 and treedef.num_nodes == 1:
        shape, dtype = _leaf_sig(leaves[0])
        return f"{dtype}{list(shape)}"
    return "{" + _describe(tree, "") + "}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _compare(given: PyTree, expected: PyTree, name: str, expected_by: str, remedy: str) -> None:
    """Structure, shapes and dtypes of ``given`` against the specs ``expected``."""
    g_leaves, g_def = jax.tree_util.tree_flatten_with_path(given)
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    if g_def != e_def:
        g_paths = {jax.tree_util.keystr(p) for p, _ in g_leaves}
        e_paths = {jax.tree_util.keystr(p) for p, _ in e_leaves}
        missing, extra = sorted(e_paths - g_paths), sorted(g_paths - e_paths)
        detail = []
        if missing:
            detail.append(f"missing {[name + p for p in missing][:6]}")
        if extra:
            detail.append(f"unexpected {[name + p for p in extra][:6]}")
        if not detail:
            detail.append(f"structure {g_def} instead of {e_def}")
        raise InputError(
            f"{name} does not have the pytree structure {expected_by}: "
            + "; ".join(detail)
            + f"; {remedy}"
        )
    for (path, x), (_, spec) in zip(g_leaves, e_leaves, strict=True):
        shape, dtype = _leaf_sig(x)
        want_shape, want_dtype = tuple(spec.shape), str(spec.dtype)
        where = f"{name}{jax.tree_util.keystr(path)}"
        if shape != want_shape:
            raise InputError(
                f"{where} has shape {shape}, but {expected_by} shape {want_shape}; {remedy}"
            )
        if dtype != want_dtype:
            raise InputError(
                f"{where} has dtype {dtype}, but {expected_by} dtype {want_dtype}; {remedy}"
            )


# ------------------------------------------------------------------ the checks
class InputValidator:
    """Checks ``(params, state, batch, key)`` before tracing; caches per signature.

    Args:
        model: the :class:`~somax_plug.Model` (``predict_fn`` and the loss).
        data_parallel: a :class:`~somax_plug._src.sharding.DataParallel`, or None.
    """

    def __init__(self, model: Any, data_parallel: Any = None) -> None:
        self.model = model
        self.data_parallel = data_parallel
        self.params_spec: PyTree = None
        self.state_spec: PyTree = None
        self._seen: set = set()
        self._classes: dict = {}
        self.curvature_batch: int | None = None
        """The plan's ``curvature_batch`` (set by the method): a batch needs that many rows."""

    @property
    def bound(self) -> bool:
        """Whether :meth:`bind` has recorded the parameters' and state's specs."""
        return self.params_spec is not None

    def bind(self, params: PyTree, state: PyTree) -> None:
        """Record what ``init`` saw (arrays or ShapeDtypeStructs); forget the cache."""
        self.params_spec = spec_tree(params)
        self.state_spec = spec_tree(state)
        self._seen = set()

    def check(self, params: PyTree, state: PyTree, batch: Any, key: Any) -> None:
        """Raise :class:`InputError` if the arguments do not fit.

        The structural checks are cached per signature; :meth:`check_values` (the
        batch size and the label range) runs on every call.
        """
        sig = signature(params, state, batch, key)
        try:
            known = sig in self._seen
        except TypeError:  # an unhashable treedef: check every time
            sig, known = None, False
        if not known:
            self._check_not_empty(batch)
            self._check_signature(params, state, batch, key)
            if sig is not None:
                self._seen.add(sig)
        self.check_values(params, batch)

    def check_values(self, params: PyTree, batch: Any) -> None:
        """Checks that depend on the batch's size and values, run on every call.

        * an empty batch (0 rows) is refused: a mean over no examples is 0/0;
        * with a ``curvature_batch``, the batch has at least that many rows;
        * integer labels of ``softmax_cross_entropy`` must lie in ``[0, C)`` (C the
          size of the logits' class axis), its soft labels be ``>= 0``, and the
          targets of ``sigmoid_binary_cross_entropy`` in ``[0, 1]``. Checked only
          where the labels are concrete (not traced): in
          :meth:`somax_plug.Method.step` and in the Optax bridge's ``update`` called
          outside ``jit``. Inside a user's own ``jit`` the loss maps every
          out-of-range integer label (and every BCE target outside ``[0, 1]``) to a
          NaN loss instead (never a wrapped class), so the step is rejected
          (``info["finite"]`` is False).

        Raises:
            InputError: naming the batch size, or the bad labels, their positions and
                the allowed range.
        """
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            return  # the structural check reports it
        self._check_not_empty(batch)
        self._check_curvature_batch(batch)
        loss = self.model.loss
        if isinstance(loss, SoftmaxCrossEntropy):
            self._check_labels(params, batch)
        elif isinstance(loss, SigmoidBinaryCrossEntropy):
            self._check_probabilities(batch[1], "sigmoid_binary_cross_entropy", upper=True)

    def _check_curvature_batch(self, batch: Any) -> None:
        rows = self.curvature_batch
        leaves = jax.tree_util.tree_leaves(batch)
        if not rows or not leaves:
            return
        shape = _leaf_sig(leaves[0])[0]
        if shape and shape[0] < rows:
            raise InputError(
                f"curvature_batch = {rows} but the batch has only {shape[0]} examples, so "
                f"the curvature would use all {shape[0]} rows, not a sub-batch of {rows}: "
                f"pass batches of at least {rows} examples (drop the last incomplete "
                f"batch of an epoch), or compose with curvature_batch <= {shape[0]}"
            )

    @staticmethod
    def _concrete(x: Any) -> bool:
        return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)

    def _check_probabilities(self, targets: Any, loss: str, upper: bool) -> None:
        """Soft targets: every entry in ``[0, 1]`` (``upper``) or ``>= 0``; concrete only."""
        t_leaves = jax.tree_util.tree_leaves(targets)
        if len(t_leaves) != 1 or not self._concrete(t_leaves[0]):
            return
        dtype = getattr(t_leaves[0], "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            return
        values = np.asarray(t_leaves[0])
        bad = ~(values >= 0) | ((values > 1) if upper else False)
        if not bad.any():
            return
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        allowed = "probabilities in [0, 1]" if upper else "nonnegative label weights"
        raise InputError(
            f"targets out of range for {loss}: {int(bad.sum())} of {values.size} entries "
            f"are not {allowed} (targets{list(first)} = {float(values[first])!r}); pass "
            + ("targets in [0, 1] (a label 2 or -1 makes the loss unbounded below)"
               if upper else "one-hot or soft labels >= 0 (NaN is refused too)")
        )

    @staticmethod
    def _check_not_empty(batch: Any) -> None:
        for path, x in jax.tree_util.tree_leaves_with_path(batch):
            shape = _leaf_sig(x)[0]
            if shape and shape[0] == 0:
                raise InputError(
                    f"empty batch: batch{jax.tree_util.keystr(path)} has 0 examples (shape "
                    f"{shape}); a step needs at least one example (the mean over no "
                    "examples is 0/0): skip empty batches, or drop the last incomplete "
                    "batch of an epoch"
                )

    def _check_labels(self, params: PyTree, batch: Any) -> None:
        inputs, targets = batch
        t_leaves = jax.tree_util.tree_leaves(targets)
        if len(t_leaves) != 1:
            return
        labels = t_leaves[0]
        if not self._concrete(labels):
            return  # traced (a user's own jit): the loss gives NaN for a bad label
        dtype = getattr(labels, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            self._check_probabilities(targets, "softmax_cross_entropy", upper=False)
            return
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            return
        classes = self._num_classes(params, inputs)
        if classes is None:
            return
        values = np.asarray(labels)
        bad = (values < 0) | (values >= classes)
        ignore = self.model.loss.ignore_label
        if ignore is not None:
            bad &= values != ignore
        if not bad.any():
            return
        where = np.argwhere(bad)
        first = tuple(int(i) for i in where[0])
        raise InputError(
            f"labels out of range for softmax_cross_entropy with C = {classes} classes: "
            f"{int(bad.sum())} of {values.size} integer labels are outside [0, {classes - 1}] "
            f"(targets{list(first)} = {int(values[first])}; min {int(values.min())}, max "
            f"{int(values.max())}); integer labels must be class indices 0..{classes - 1}. "
            "Remap them, drop those examples, mark padding with "
            "get_loss('softmax_cross_entropy', ignore_label=-1) (that label then counts "
            "nowhere), or pass one-hot/soft targets with an all-zero row for positions to "
            "ignore"
        )

    def _num_classes(self, params: PyTree, inputs: PyTree) -> int | None:
        """The logits' class-axis size for these input shapes (cached; None if unknown)."""
        key = (_flat_sig(params), _flat_sig(inputs))
        try:
            return self._classes[key]
        except KeyError:
            pass
        except TypeError:
            key = None
        try:
            outputs = jax.eval_shape(self.model.predict_fn, params, inputs)
        except Exception:  # the structural check reports a failing predict_fn
            return None
        o_leaves = jax.tree_util.tree_leaves(outputs)
        classes = (
            int(o_leaves[0].shape[-1]) if len(o_leaves) == 1 and o_leaves[0].ndim >= 2 else None
        )
        if key is not None:
            self._classes[key] = classes
        return classes

    def _check_signature(self, params: PyTree, state: PyTree, batch: Any, key: Any) -> None:
        self._check_batch(batch)
        self._check_params(params)
        _compare(
            state,
            self.state_spec,
            "state",
            "init gives for these parameters",
            "pass the state from method.init or from this method's previous step, "
            "made for parameters of these dtypes and shapes",
        )
        self._check_key(key)
        self._check_model(params, batch)

    # ----------------------------------------------------------------- batch
    def _check_batch(self, batch: Any) -> None:
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            got = type(batch).__name__ + (
                f" of length {len(batch)}" if isinstance(batch, tuple | list) else ""
            )
            raise InputError(
                f"the batch must be a 2-tuple (inputs, targets), got a {got}; pass "
                "batch=(inputs, targets) with a leading batch axis on every leaf"
            )
        inputs, targets = batch
        loss_name = self.model.loss.name
        if not jax.tree_util.tree_leaves(inputs):
            raise InputError("the batch inputs (batch[0]) hold no arrays; pass the model inputs")
        if targets is None or not jax.tree_util.tree_leaves(targets):
            raise InputError(
                f"missing labels: the batch targets (batch[1]) are {targets!r}; the loss "
                f"{loss_name!r} needs targets with the inputs' leading batch axis, e.g. "
                "integer class labels of shape (B,) for softmax_cross_entropy or arrays of "
                "the outputs' shape for mse; pass batch=(inputs, targets)"
            )
        sizes = []
        for part, tree in (("inputs", inputs), ("targets", targets)):
            for path, x in jax.tree_util.tree_leaves_with_path(tree):
                shape, dtype = _leaf_sig(x)
                where = f"{part}{jax.tree_util.keystr(path)}"
                if dtype.startswith("<"):
                    raise InputError(
                        f"batch leaf {where} is a {dtype[1:-1]}, not an array; every leaf of "
                        "the inputs and targets must be an array with a leading batch axis"
                    )
                if not shape:
                    raise InputError(
                        f"batch leaf {where} is a scalar ({dtype}); every leaf of the inputs "
                        "and targets needs a leading batch axis"
                    )
                sizes.append((where, shape))
        first_where, first_shape = sizes[0]
        for where, shape in sizes[1:]:
            if shape[0] != first_shape[0]:
                raise InputError(
                    f"inconsistent batch sizes: {first_where} has {first_shape[0]} examples "
                    f"(shape {first_shape}) but {where} has {shape[0]} (shape {shape}); every "
                    "leaf of the inputs and targets must share the leading batch axis"
                )
        if self.data_parallel is not None:
            self.data_parallel.check_batch_size(first_shape[0])

    # ---------------------------------------------------------------- params
    def _check_params(self, params: PyTree) -> None:
        _compare(
            params,
            self.params_spec,
            "params",
            "init saw",
            "pass the parameters the state was made for, or call method.init on these parameters",
        )
        for path, spec in jax.tree_util.tree_leaves_with_path(self.params_spec):
            if not jnp.issubdtype(spec.dtype, jnp.floating):
                raise InputError(
                    f"params{jax.tree_util.keystr(path)} has dtype {spec.dtype}; parameters "
                    "must be floating-point arrays (float32, float64, bfloat16)"
                )

    # ------------------------------------------------------------------- key
    @staticmethod
    def _check_key(key: Any) -> None:
        shape, dtype = _leaf_sig(key)
        typed = hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        if (typed and shape == ()) or (dtype == "uint32" and len(shape) == 1):
            return
        raise InputError(
            f"key must be one PRNG key such as jax.random.key(0) (or None for a key per "
            f"step), got {dtype}{list(shape)}"
        )

    # ---------------------------------------------------------------- model
    def _check_model(self, params: PyTree, batch: Any) -> None:
        inputs, targets = batch
        try:
            outputs = jax.eval_shape(self.model.predict_fn, params, inputs)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"predict_fn(params, inputs) fails for inputs {_shape_str(inputs)} and "
                f"params {_shape_str(params)}: {_first_line(exc)}"
            ) from exc
        b = _leaf_sig(jax.tree_util.tree_leaves(inputs)[0])[0][0]
        for path, out in jax.tree_util.tree_leaves_with_path(outputs):
            if not out.shape or out.shape[0] != b:
                raise InputError(
                    f"predict_fn returned outputs{jax.tree_util.keystr(path)} of shape "
                    f"{tuple(out.shape)} for a batch of {b} inputs; outputs need the leading "
                    f"batch axis of size {b} (did predict_fn reduce over the batch?)"
                )
        self._check_fit(outputs, targets)
        try:
            value = jax.eval_shape(self.model.loss, outputs, targets)
        except Exception as exc:
            raise InputError(
                f"the loss {self.model.loss.name!r} cannot combine the predict_fn outputs "
                f"{_shape_str(outputs)} with the targets {_shape_str(targets)}: "
                f"{_first_line(exc)}"
            ) from exc
        if getattr(value, "shape", None) != ():
            raise InputError(
                f"the loss {self.model.loss.name!r} returned shape {value.shape} for outputs "
                f"{_shape_str(outputs)} and targets {_shape_str(targets)}; expected a scalar"
            )

    def _check_fit(self, outputs: PyTree, targets: PyTree) -> None:
        loss = self.model.loss
        out_s, tgt_s = _shape_str(outputs), _shape_str(targets)
        same_shape = isinstance(loss, MSE | SigmoidBinaryCrossEntropy)
        if same_shape or isinstance(loss, SoftmaxCrossEntropy):
            o_leaves = jax.tree_util.tree_leaves(outputs)
            t_leaves = jax.tree_util.tree_leaves(targets)
            if len(o_leaves) != 1 or len(t_leaves) != 1:
                if (
                    same_shape
                    and jax.tree_util.tree_structure(outputs)
                    == (jax.tree_util.tree_structure(targets))
                    and all(
                        o.shape == _leaf_sig(t)[0] for o, t in zip(o_leaves, t_leaves, strict=True)
                    )
                ):
                    return
                raise InputError(
                    f"the loss {loss.name!r} needs targets shaped like the outputs; "
                    f"predict_fn returns {out_s}, the targets are {tgt_s}"
                )
            o_shape = tuple(o_leaves[0].shape)
            t_shape, t_dtype = _leaf_sig(t_leaves[0])
            if same_shape:
                if t_shape != o_shape:
                    raise InputError(
                        f"the loss {loss.name!r} needs targets of the outputs' shape: "
                        f"predict_fn returns {out_s}, the targets are {tgt_s} (expected "
                        f"shape {o_shape})"
                    )
                return
            integer = jnp.issubdtype(jnp.dtype(t_dtype), jnp.integer)
            if len(o_shape) < 2:
                raise InputError(
                    f"the loss {loss.name!r} needs logits with a class axis, shape (B, ..., "
                    f"C); predict_fn returns {out_s}"
                )
            if integer and t_shape != o_shape[:-1]:
                raise InputError(
                    f"the loss {loss.name!r} needs integer labels of shape {o_shape[:-1]} "
                    f"(the logits' shape without the class axis) or one-hot/soft labels of "
                    f"shape {o_shape}; predict_fn returns {out_s}, the targets are {tgt_s}"
                )
            if not integer and t_shape != o_shape:
                raise InputError(
                    f"the loss {loss.name!r} needs one-hot/soft labels of the logits' shape "
                    f"{o_shape} or integer labels of shape {o_shape[:-1]}; predict_fn returns "
                    f"{out_s}, the targets are {tgt_s}"
                )
            return
        b = tuple(jax.tree_util.tree_leaves(outputs)[0].shape)[0]
        try:
            per = jax.eval_shape(loss.per_example, outputs, targets)
        except Exception as exc:
            raise InputError(
                f"the loss {loss.name!r} cannot combine the predict_fn outputs {out_s} with "
                f"the targets {tgt_s}: {_first_line(exc)}"
            ) from exc
        if tuple(getattr(per, "shape", ())) != (b,):
            raise InputError(
                f"the loss {loss.name!r} returns per-example values of shape "
                f"{getattr(per, 'shape', None)} for outputs {out_s} and targets {tgt_s}; "
                f"expected ({b},)"
            )
