"""The Optax bridge: a composed direction as an Optax gradient transformation.

``as_optax(...)`` returns an :class:`optax.GradientTransformationExtraArgs` whose
``update(updates, state, params, *, batch, key=None)`` maps the incoming
gradient ``g`` (the ``updates``) to the direction ``s ~ (C + lam I)^-1 g``,
computed by the same planned step as :class:`~somax_plug.step.Method`. Chain
momentum, weight decay, clipping and the learning rate after it::

    tx = optax.chain(
        somax_plug.as_optax("ggn", "cg", predict_fn=f, loss="softmax_cross_entropy"),
        optax.add_decayed_weights(1e-4),
        optax.scale_by_learning_rate(0.5),
    )
    state = tx.init(params)
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    params = optax.apply_updates(params, updates)

What the bridge supports, and what it refuses:

* damping policies that need only their own state (``constant``, ``schedule``):
  yes. Policies that need the loss *after the full update* (``levenberg_marquardt``
  requires ``loss_after``) are refused with an error: an Optax transformation
  cannot see the later transformations in its chain, so it cannot compute the
  gain ratio or reject a step. Use ``compose(...).step`` for those.
* a non-finite loss, gradient or direction: with ``on_nonfinite="zero"`` (the
  default) the bridge outputs zero updates and keeps its own state (only its count
  moves), so the parameters stay as they were *unless a stateful transformation
  follows it* (``optax.trace`` would still apply its momentum). For chains with
  state after the bridge use ``on_nonfinite="propagate"`` and wrap the chain in
  ``optax.apply_if_finite``: the bridge then emits NaN updates, and
  ``apply_if_finite`` discards the whole update and keeps every inner state, so
  neither the parameters nor any optimizer state change on a bad batch.
* the statistics the composition needs (loss, linearization) are computed inside
  from ``params`` and ``batch``; the incoming ``updates`` are the right-hand side,
  so transformations placed *before* the bridge (clipping) act on ``g``.
* ``state.info`` holds the last step's statistics (fixed schema), and the bridge
  works under ``optax.inject_hyperparams`` and inside ``jax.jit`` / ``lax.scan``.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from somax_plug import as_optax
    >>> tx = optax.chain(as_optax("ggn", "cg", predict_fn=lambda p, x: x @ p, loss="mse"),
    ...                  optax.scale_by_learning_rate(1.0))
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> batch = (jnp.eye(2), jnp.ones(2))
    >>> g = jax.grad(lambda p: 0.5 * jnp.mean((batch[0] @ p - batch[1]) ** 2))(params)
    >>> updates, state = tx.update(g, state, params, batch=batch)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from somax_plug import tree
from somax_plug.errors import CompositionError, InputError
from somax_plug.kinds import StepStats


class BridgeState(NamedTuple):
    """Optax state of the bridge: the method state and the last info."""

    inner: Any
    info: dict


def as_optax(
    curvature: Any = None,
    solver: Any = None,
    *,
    method: Any = None,
    on_nonfinite: str = "zero",
    **compose_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """The direction of a composition as an Optax transformation.

    Args:
        curvature, solver, **compose_kwargs: as for :func:`somax_plug.compose`
            (``predict_fn`` and ``loss`` are required); or
        method: an already composed :class:`~somax_plug.step.Method`.
        on_nonfinite: ``"zero"`` (zero updates on a bad batch) or ``"propagate"``
            (NaN updates, for use inside ``optax.apply_if_finite``).
    """
    if on_nonfinite not in ("zero", "propagate"):
        raise ValueError(f"on_nonfinite must be 'zero' or 'propagate', got {on_nonfinite!r}")
    if method is None:
        from somax_plug.composition import compose

        method = compose(curvature, solver, **compose_kwargs)
    elif curvature is not None or solver is not None or compose_kwargs:
        raise TypeError("pass either method= or the composition arguments, not both")
    plan = method.plan
    damping_c = plan.component("damping")
    needs = {"loss_after", "predicted_decrease"} & damping_c.requires_resources
    if needs:
        raise CompositionError(
            f"damping {damping_c.name!r} needs {', '.join(sorted(needs))}, i.e. the loss after "
            "the full update, which an Optax transformation cannot see; use "
            "somax_plug.compose(...).step for step rejection, or damping 'constant' or 'schedule' "
            "inside an Optax chain"
        )

    def init_fn(params: Any) -> BridgeState:
        inner = method.init(params)
        nan = jnp.full((), jnp.nan, tree.accum_dtype(params))
        info = {
            "loss": nan,
            "lam": nan,
            "solver_iterations": jnp.zeros((), jnp.int32),
            "solver_residual": nan,
            "finite": jnp.asarray(True),
        }
        return BridgeState(inner, info)

    def update_fn(
        updates: Any,
        state: BridgeState,
        params: Any = None,
        *,
        batch: Any = None,
        key: Any = None,
        **extra: Any,
    ) -> tuple[Any, BridgeState]:
        if params is None or batch is None:
            raise InputError(
                "the somax_plug direction needs the parameters and the batch: call "
                "tx.update(grads, state, params, batch=(inputs, targets))"
            )
        inner = state.inner
        if key is None:
            key = jax.random.fold_in(jax.random.key(0), inner.count)
        d = method.direction(params, inner, batch, key, rhs=updates)
        finite = jnp.isfinite(d.loss) & tree.all_finite(updates) & tree.all_finite(d.s)
        new_ds, _ = damping_c.instance.update(
            inner.damping,
            StepStats(d.loss, jnp.nan, jnp.nan, d.solver_info, finite),
        )
        advanced = d.state._replace(damping=new_ds)
        new_inner = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), advanced, inner)
        new_inner = new_inner._replace(count=inner.count + 1)
        fill = 0.0 if on_nonfinite == "zero" else jnp.nan
        out = tree.where(finite, d.s, jax.tree_util.tree_map(lambda x: jnp.full_like(x, fill), d.s))
        dtype = state.info["loss"].dtype
        info = {
            "loss": jnp.asarray(d.loss, dtype),
            "lam": jnp.asarray(d.lam, dtype),
            "solver_iterations": jnp.asarray(d.solver_info.iterations, jnp.int32),
            "solver_residual": jnp.asarray(d.solver_info.residual, dtype),
            "finite": finite,
        }
        out = tree.cast_like(out, updates)
        return out, BridgeState(new_inner, info)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
