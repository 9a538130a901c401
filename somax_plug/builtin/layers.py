"""Built-in layer resources (plugin ``"builtin"``): the layer map and per-layer I/O.

=======================  ===============================================  ============
resource                 computes                                         requires
=======================  ===============================================  ============
``layer_map``            :func:`somax_plug.layers.discover` on the         --
                         step's model, params and inputs (static)
``layer_io``             one tapped forward pass                          layer_map
                         (:func:`somax_plug.layers.layer_io`)
``layer_inputs``         kernel path -> the layer's input                 layer_io
``layer_output_grads``   ``u -> {kernel path: (dy_l)^T u}``, a VJP of the  layer_io
                         tapped pass (a ``Partial``)
=======================  ===============================================  ============

A plugin overrides the map by answering ``somax_plug_provide_resource("layer_map")``
with :func:`somax_plug.layers.layer_map_provider` built with its overrides.

Example:
    >>> from somax_plug.builtin.layers import PROVIDERS
    >>> sorted(PROVIDERS)
    ['layer_inputs', 'layer_io', 'layer_map', 'layer_output_grads']
"""

from __future__ import annotations

from somax_plug.layers import layer_providers

PROVIDERS = layer_providers("builtin")
"""Built-in layer providers by resource name."""
