"""The model: a prediction function and a loss, as one hashable record.

A :class:`Model` pairs ``predict_fn(params, inputs) -> outputs`` with a
:class:`~somax_plug.Loss`. The training objective on a batch
``(inputs, targets)`` (pytrees with a leading batch axis of size B) is::

    L(params) = loss(predict_fn(params, inputs), targets)
              = c * sum_b l_b(f(params, x_b), y_b),    c = 1/B ("mean") or 1 ("sum").

Every curvature is a derivative of this L: the Hessian ``d^2 L / d params^2``, the GGN
``J^T H_out J`` (J the Jacobian of the outputs), the Fisher, ...

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import jax

from somax_plug._src.losses import Loss, batch_size_of, get_loss

PyTree = Any
Batch = tuple[PyTree, PyTree]


@attrs.frozen
class Model:
    """``predict_fn(params, inputs)`` and a :class:`~somax_plug.Loss`.

    Attributes:
        predict_fn: maps parameters and batched inputs to batched outputs (an array or
            a pytree of arrays with a leading batch axis). Compared by identity.
        loss: the loss applied to the outputs and the targets.
    """

    predict_fn: Callable[[PyTree, PyTree], PyTree] = attrs.field(eq=id)
    loss: Loss = attrs.field(validator=attrs.validators.instance_of(Loss))

    def outputs(self, params: PyTree, inputs: PyTree) -> PyTree:
        """Model outputs ``f(params, inputs)``."""
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


def make_model(
    predict_fn: Callable[[PyTree, PyTree], PyTree],
    loss: str | Loss | Callable[[PyTree, PyTree], Any],
    reduction: str | None = None,
    **loss_options: Any,
) -> Model:
    """Build a :class:`Model`; ``loss`` and ``reduction`` go through
    :func:`~somax_plug.get_loss` (None: ``"mean"``, or a Loss instance's own)."""
    if not callable(predict_fn):
        raise TypeError(f"predict_fn must be callable, got {type(predict_fn).__name__}")
    return Model(predict_fn, get_loss(loss, reduction, **loss_options))
