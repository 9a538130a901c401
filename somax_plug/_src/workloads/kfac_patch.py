"""A compatibility patch for kfac-jax 0.0.8 on current JAX, applied in-process only.

kfac-jax 0.0.8's ``kfac_jax._src.tag_graph_matcher.eval_jaxpr_eqn`` unpacks
``subfuns, bind_params = eqn.primitive.get_bind_params(eqn.params)``; current JAX's
``Primitive.get_bind_params`` returns the parameters alone (a dict, with any
sub-functions inside it under ``"subfuns"``), so the unpacking fails
(``ValueError: too many values to unpack``) as soon as kfac-jax traces a model.
:func:`apply` replaces that module attribute (which kfac-jax's tracer calls through
its module) by a version that accepts both forms. Nothing on disk is changed: the
patch lives in the process that applies it (the benchmark's), and
:data:`DESCRIPTION` is what the reports print about it.
"""

from __future__ import annotations

from typing import Any

DESCRIPTION = (
    "kfac_jax._src.tag_graph_matcher.eval_jaxpr_eqn replaced in this process only: "
    "kfac-jax 0.0.8 unpacks two values from Primitive.get_bind_params, which current JAX "
    "returns as one (the bind parameters); the replacement accepts both"
)

_applied: dict[str, Any] = {}


def apply() -> str | None:
    """Patch kfac-jax if it needs it; returns :data:`DESCRIPTION` when patched, else None."""
    if "done" in _applied:
        return _applied["done"]
    import jax
    from kfac_jax._src import tag_graph_matcher as tgm

    probe = jax.make_jaxpr(lambda x: x + 1)(1.0).jaxpr.eqns[0]
    if isinstance(probe.primitive.get_bind_params(probe.params), tuple):
        _applied["done"] = None  # an older JAX: kfac-jax works as shipped
        return None

    def eval_jaxpr_eqn(eqn: Any, in_values: list[Any]) -> list[Any]:
        bind = eqn.primitive.get_bind_params(eqn.params)
        if isinstance(bind, tuple) and len(bind) == 2:
            subfuns, params = bind
        else:
            subfuns, params = (), bind
        with jax.extend.source_info_util.user_context(eqn.source_info.traceback):
            output = eqn.primitive.bind(*subfuns, *in_values, **params)
        return output if isinstance(output, list) else [output]

    tgm.eval_jaxpr_eqn = eval_jaxpr_eqn
    _applied["done"] = DESCRIPTION
    return DESCRIPTION
