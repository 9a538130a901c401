"""The layer map (public): dense and conv layers discovered from the jaxpr.

:func:`discover` finds every dense (``dot_general``) and conv
(``conv_general_dilated``) layer of ``predict_fn(params, inputs)``: kernel and bias
paths, input and output shapes, contract, batch and shared axes. :func:`layer_io`
gives each layer's input and a VJP for its output gradients from one forward pass
(the KFAC trick). See the implementation's docstrings for the conventions.

Example:
    >>> import jax.numpy as jnp
    >>> from somax_plug.layers import discover
    >>> lm = discover(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, jnp.ones((4, 3)))
    >>> lm.kernels
    ('w',)
"""

from somax_plug._src.layers import (
    LAYER_FIELDS,
    Layer,
    LayerIO,
    LayerMap,
    discover,
    layer_io,
    layer_map_provider,
    layer_providers,
    param_paths,
)

__all__ = [
    "LAYER_FIELDS",
    "Layer",
    "LayerIO",
    "LayerMap",
    "discover",
    "layer_io",
    "layer_map_provider",
    "layer_providers",
    "param_paths",
]
