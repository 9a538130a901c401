"""The model: a prediction function and a loss, as one hashable record.

A :class:`Model` pairs ``predict_fn(params, inputs) -> outputs`` with a
:class:`~somax_plug.Loss`. The training objective on a batch
``(inputs, targets)`` (pytrees with a leading batch axis of size B) is::

    L(params) = loss(predict_fn(params, inputs), targets)
              = c * sum_b l_b(f(params, x_b), y_b),    c = 1/B ("mean") or 1 ("sum").

Every curvature is a derivative of this L: the Hessian ``d^2 L / d params^2``, the GGN
``J^T H_out J`` (J the Jacobian of the outputs), the Fisher, ...

Models with state and a key. A model may declare ``has_state`` (mutable collections
such as BatchNorm's running statistics) and/or ``has_rng`` (dropout). Its
``predict_fn`` then takes them as keyword arguments and, with state, returns the
new state too::

    has_state and has_rng:  predict_fn(params, inputs, *, state, key) -> (outputs, new_state)
    has_state only:         predict_fn(params, inputs, *, state)      -> (outputs, new_state)
    has_rng only:           predict_fn(params, inputs, *, key)        -> outputs

The contract (checked before tracing, :meth:`Model.check_contract`): ``new_state``
has exactly the structure, shapes and dtypes of ``state``; a model that declares
``has_rng`` uses its key (a ``predict_fn`` whose jaxpr never reads the key is
refused: it would train without the dropout it declares).

Curvature convention. Within one step, every consumer (the loss, the gradient, each
curvature product inside the solver, the estimators, the loss after the step) sees
the same function of the parameters::

    f_step(params) = predict_fn(params, inputs, state=state_t, key=k_t)[0]

in train mode on the step's batch: ``state_t`` (the state carried into the step)
is a *constant* of the linearization, and ``k_t`` is the step's one model key, so
every product sees the same dropout mask. Quantities that train mode computes from
the batch (BatchNorm's batch mean and variance) are functions of the parameters and
are differentiated through, exactly as the gradient of the training loss is. The
GGN is ``J^T H_out J`` with ``J = d f_step / d params``. ``new_state`` (from the
same forward pass) is what the step carries forward when it is accepted; a rejected
or non-finite step keeps ``state_t``. :meth:`Model.bind` builds ``f_step``.

Equality and hashing: ``predict_fn`` is compared by identity (two closures that
compute the same thing are different models), the loss by value. Both are static, so
a model can be closed over by a jitted step or passed as a static argument.

Dtypes: reductions accumulate in at least float32: ``loss_value`` is float32 for
float32 or bfloat16 parameters (the loss casts bfloat16 outputs up before reducing)
and float64 for float64 parameters; gradients keep the parameters' dtypes.

Example:
    >>> import jax.numpy as jnp
    >>> from somax_plug import make_model
    >>> model = make_model(lambda p, x: x @ p["w"], "mse")
    >>> params = {"w": jnp.ones((3, 2))}
    >>> batch = (jnp.ones((4, 3)), jnp.zeros((4, 2)))
    >>> float(model.loss_value(params, batch))  # 0.5 * (3**2 + 3**2)
    9.0
    >>> def bn(p, x, *, state):  # a model with state: a running mean of the batch mean
    ...     mean = x.mean(0)
    ...     return (x - mean) @ p["w"], {"mean": 0.9 * state["mean"] + 0.1 * mean}
    >>> stateful = make_model(bn, "mse", has_state=True)
    >>> out, new = stateful.apply(params, batch[0], state={"mean": jnp.zeros(3)})
    >>> new["mean"].shape
    (3,)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import jax

from somax_plug._src.errors import InputError
from somax_plug._src.losses import Loss, batch_size_of, get_loss

PyTree = Any
Batch = tuple[PyTree, PyTree]


@attrs.frozen
class Model:
    """``predict_fn`` with its declared flags and a :class:`~somax_plug.Loss`.

    Attributes:
        predict_fn: maps parameters and batched inputs to batched outputs (an array or
            a pytree of arrays with a leading batch axis); with ``has_state`` /
            ``has_rng`` it takes ``state=`` / ``key=`` (see the module docstring).
            Compared by identity.
        loss: the loss applied to the outputs and the targets.
        has_state: ``predict_fn`` takes ``state=`` and returns ``(outputs, new_state)``.
        has_rng: ``predict_fn`` takes ``key=`` (a PRNG key, one per step).
        couples_examples: the outputs of one example depend on the others of its batch
            (a model bound to a step's state and key: batch statistics, one mask for
            the whole batch), so per-example quantities are taken on the full batch.
    """

    predict_fn: Callable[..., PyTree] = attrs.field(eq=id)
    loss: Loss = attrs.field(validator=attrs.validators.instance_of(Loss))
    has_state: bool = attrs.field(default=False, converter=bool)
    has_rng: bool = attrs.field(default=False, converter=bool)
    couples_examples: bool = attrs.field(default=False, converter=bool)

    @property
    def plain(self) -> bool:
        """Whether ``predict_fn(params, inputs)`` is the whole model (no state, no key)."""
        return not (self.has_state or self.has_rng)

    def apply(
        self, params: PyTree, inputs: PyTree, state: PyTree = (), key: Any = None
    ) -> tuple[PyTree, PyTree]:
        """``(outputs, new_state)``: ``predict_fn`` called as its flags declare.

        A model without state returns ``state`` unchanged as ``new_state``.
        """
        kwargs: dict[str, Any] = {}
        if self.has_state:
            kwargs["state"] = state
        if self.has_rng:
            if key is None:
                raise InputError(
                    "this model declares has_rng=True, so it needs a PRNG key: pass key= "
                    "(the step derives one per step from its own key)"
                )
            kwargs["key"] = key
        out = self.predict_fn(params, inputs, **kwargs)
        if not self.has_state:
            return out, state
        if not isinstance(out, tuple) or len(out) != 2:
            got = type(out).__name__ + (f" of length {len(out)}" if isinstance(out, tuple) else "")
            raise InputError(
                f"predict_fn declares has_state=True, so it must return (outputs, new_state); "
                f"it returned a {got}. Return the updated state as the second element, or "
                "declare has_state=False"
            )
        return out

    def bind(self, state: PyTree, key: Any) -> Model:
        """The plain model ``f_step(params, inputs)`` of one step (the curvature convention).

        ``state`` is held constant and ``key`` fixes the dropout mask: every consumer
        of the step that calls the bound model sees the same function. A plain model
        is returned as it is.
        """
        if self.plain:
            return self

        def bound(params: PyTree, inputs: PyTree) -> PyTree:
            return self.apply(params, inputs, state, key)[0]

        return Model(bound, self.loss, couples_examples=True)

    def outputs(self, params: PyTree, inputs: PyTree) -> PyTree:
        """Model outputs ``f(params, inputs)`` (a plain or bound model)."""
        if not self.plain:
            raise InputError(
                "this model has state or needs a key: call model.apply(params, inputs, "
                "state, key), or model.bind(state, key).outputs(params, inputs)"
            )
        return self.predict_fn(params, inputs)

    def loss_value(self, params: PyTree, batch: Batch) -> jax.Array:
        """Reduced loss on ``batch = (inputs, targets)``."""
        inputs, targets = batch
        return self.loss(self.outputs(params, inputs), targets)

    def per_example_losses(self, params: PyTree, batch: Batch) -> jax.Array:
        """Unreduced losses ``l_b``, shape ``[B]``."""
        inputs, targets = batch
        return self.loss.per_example(self.outputs(params, inputs), targets)

    @staticmethod
    def batch_size(batch: Batch) -> int:
        """Static batch size B (leading axis of the inputs)."""
        return batch_size_of(batch[0])

    def scale(self, batch: Batch) -> float:
        """The reduction factor c of the loss for this batch (``1/B`` or ``1``)."""
        return self.loss.scale(self.batch_size(batch))

    def signature(self) -> str:
        """How ``predict_fn`` is called, as its flags declare (for error messages)."""
        sig = "predict_fn(params, inputs" + (", *, state" if self.has_state else "")
        sig += (", key" if self.has_state else ", *, key") if self.has_rng else ""
        return sig + ")" + (" -> (outputs, new_state)" if self.has_state else " -> outputs")

    def apply_checked(
        self, params: PyTree, inputs: PyTree, state: PyTree = (), key: Any = None
    ) -> tuple[PyTree, PyTree]:
        """:meth:`apply`, a ``TypeError`` of the call reported against the declared flags."""
        try:
            return self.apply(params, inputs, state, key)
        except TypeError as exc:
            from somax_plug._src.validation import _first_line

            flags = f"has_state={self.has_state}, has_rng={self.has_rng}"
            raise InputError(
                f"the model declares {flags}, so it is called as {self.signature()}; that "
                f"call fails: {_first_line(exc)}. Accept these keyword arguments or change "
                "the flags"
            ) from exc

    def check_contract(self, params: PyTree, inputs: PyTree, state: PyTree, key: Any) -> None:
        """Check ``predict_fn`` against its declared flags, before tracing (no FLOPs).

        Raises :class:`~somax_plug.InputError` when ``predict_fn`` does not accept the
        declared keywords, returns no ``(outputs, new_state)`` pair, returns a state
        whose structure, shapes or dtypes differ from ``state``, or (``has_rng``)
        never reads its key. A plain model is not checked here.
        """
        if self.plain:
            return
        from somax_plug._src.validation import _compare, spec_tree

        sig = self.signature()
        try:
            jaxpr, out_shape = jax.make_jaxpr(
                lambda p, x, s, k: self.apply_checked(p, x, s, k), return_shape=True
            )(params, inputs, state, key)
        except InputError:
            raise
        _outputs, new_state = out_shape
        _compare(
            new_state,
            spec_tree(state),
            "new_state",
            "the state passed in has",
            f"predict_fn must return the new state with the structure, shapes and dtypes of "
            f"the state it was given ({sig})",
        )
        if self.has_rng:
            n_key = len(jax.tree_util.tree_leaves(key))
            key_vars = jaxpr.jaxpr.invars[len(jaxpr.jaxpr.invars) - n_key :]
            if not _reads_any(jaxpr.jaxpr, key_vars):
                raise InputError(
                    f"the model declares has_rng=True but predict_fn never reads its key "
                    f"({sig}): its dropout would not change from step to step. Use the key "
                    "(e.g. for the dropout mask) or declare has_rng=False"
                )


def _reads_any(jaxpr: Any, variables: list) -> bool:
    """Whether any equation (or output) of ``jaxpr`` reads one of ``variables``."""
    wanted = {id(v) for v in variables}
    for eqn in jaxpr.eqns:
        if any(id(v) in wanted for v in eqn.invars):
            return True
    return any(id(v) in wanted for v in jaxpr.outvars)


def make_model(
    predict_fn: Callable[..., PyTree],
    loss: str | Loss | Callable[[PyTree, PyTree], Any],
    reduction: str | None = None,
    *,
    has_state: bool | None = None,
    has_rng: bool | None = None,
    **loss_options: Any,
) -> Model:
    """Build a :class:`Model`; ``loss`` and ``reduction`` go through
    :func:`~somax_plug.get_loss` (None: ``"mean"``, or a Loss instance's own).

    ``has_state`` / ``has_rng`` declare the keyword arguments ``predict_fn`` takes
    (see the module docstring); None reads them from ``predict_fn``'s attributes of
    the same names (the adapters in :mod:`somax_plug.models` set them), else False.
    """
    if not callable(predict_fn):
        raise TypeError(f"predict_fn must be callable, got {type(predict_fn).__name__}")
    if has_state is None:
        has_state = bool(getattr(predict_fn, "has_state", False))
    if has_rng is None:
        has_rng = bool(getattr(predict_fn, "has_rng", False))
    for name, value in (("has_state", has_state), ("has_rng", has_rng)):
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}")
    return Model(
        predict_fn,
        get_loss(loss, reduction, **loss_options),
        has_state=has_state,
        has_rng=has_rng,
    )
