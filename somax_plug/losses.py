"""Losses with the structure the curvature operators use (public).

A :class:`Loss` maps model outputs and targets to per-example losses and knows its
output Hessian (closed forms for the built-ins); see the implementation's
docstrings for the maths.

Example:
    >>> from somax_plug.losses import get_loss
    >>> get_loss("softmax_cross_entropy").name
    'softmax_cross_entropy'
"""

from somax_plug._src.losses import (
    LOSSES,
    MSE,
    CallableLoss,
    Loss,
    SigmoidBinaryCrossEntropy,
    SoftmaxCrossEntropy,
    batch_size_of,
    compute_dtype,
    flatten_per_example,
    get_loss,
    unflatten_per_example,
)

__all__ = [
    "LOSSES",
    "MSE",
    "CallableLoss",
    "Loss",
    "SigmoidBinaryCrossEntropy",
    "SoftmaxCrossEntropy",
    "batch_size_of",
    "compute_dtype",
    "flatten_per_example",
    "get_loss",
    "unflatten_per_example",
]
