"""Adapters for Flax (Linen, NNX) and Equinox models (optional extras).

``from_flax_linen(module, variables, ...)``, ``from_nnx(model)`` and
``from_equinox(model, state=None)`` return an :class:`Adapted` record: a
``predict_fn`` with its declared ``has_state`` / ``has_rng`` flags, the ``params``
and the model ``state``, ready for :func:`somax_plug.compose` and
:func:`somax_plug.as_optax`; ``adapted.export(params, state)`` puts the trained values
back into the user's model. Importing this module imports neither Flax nor Equinox;
each adapter imports its library when called (``pip install somax-plug[flax]`` /
``[equinox]``).

Example:
    >>> import jax
    >>> import equinox as eqx
    >>> from somax_plug.models import from_equinox
    >>> adapted = from_equinox(eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0)))
    >>> method = adapted.compose(preset="sgn", loss="mse")
    >>> state = adapted.init(method)
"""

from somax_plug._src.adapters import Adapted, from_equinox, from_flax_linen, from_nnx

__all__ = ["Adapted", "from_equinox", "from_flax_linen", "from_nnx"]
