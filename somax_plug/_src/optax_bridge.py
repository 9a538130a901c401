"""The Optax bridge: a composed direction as an Optax gradient transformation.

``as_optax(...)`` returns an :class:`optax.GradientTransformationExtraArgs` whose
``update(updates, state, params, *, batch, key=None)`` maps the incoming
gradient ``g`` (the ``updates``) to the direction ``s ~ (C + lam I)^-1 g``,
computed by the same planned step as :class:`~somax_plug.Method`. Chain
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
* the bridge runs the same step core as :meth:`~somax_plug.Method.step` (direction,
  finite check, damping update at its cadence, rollback), and ``state.info`` holds
  the last step's statistics in the same :data:`~somax_plug.INFO_KEYS` schema;
  ``loss_after``, ``predicted_decrease`` and ``rho`` are NaN there (the bridge does
  not see the final update). It works under ``optax.inject_hyperparams`` and inside
  ``jax.jit`` / ``lax.scan``.

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

from somax_plug._src import step_core as core
from somax_plug._src import tree
from somax_plug._src.errors import CompositionError, InputError


class BridgeState(NamedTuple):
    """Optax state of the bridge: the method state and the last step's info."""

    inner: Any
    info: dict


def as_optax(
    curvature: Any = None,
    solver: Any = None,
    *,
    method: Any = None,
    on_nonfinite: str = "zero",
    model_state: Any = None,
    **compose_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """The direction of a composition as an Optax transformation.

    Args:
        curvature, solver, **compose_kwargs: as for :func:`somax_plug.compose`
            (``predict_fn`` and ``loss`` are required); or
        method: an already composed :class:`~somax_plug.Method`.
        on_nonfinite: ``"zero"`` (zero updates on a bad batch) or ``"propagate"``
            (NaN updates, for use inside ``optax.apply_if_finite``).
        model_state: the model's initial state, for a model that declares
            ``has_state`` (``tx.init(params)`` cannot take it). The bridge carries
            the model state in its own state, threads it through every update
            (unchanged by a rejected or non-finite step) and
            :func:`somax_plug.model_state_of` reads it back from the chain's state.
    """
    if on_nonfinite not in ("zero", "propagate"):
        raise ValueError(f"on_nonfinite must be 'zero' or 'propagate', got {on_nonfinite!r}")
    if method is None:
        from somax_plug._src.composition import compose

        method = compose(curvature, solver, **compose_kwargs)
    elif curvature is not None or solver is not None or compose_kwargs:
        raise TypeError("pass either method= or the composition arguments, not both")
    plan = method.plan
    damping_c = plan.component("damping")
    needs = sorted(r.name for r in plan.resources if r.phase == "after_update" and r.read_by(
        "component", "damping"))
    if needs:
        raise CompositionError(
            f"damping {damping_c.name!r} needs {', '.join(needs)}, i.e. the loss after "
            "the full update, which an Optax transformation cannot see; use "
            "somax_plug.compose(...).step for step rejection, or pass damping= 'constant' or "
            "'schedule' inside an Optax chain (for example damping={'name': 'constant', "
            "'lam': 1e-2} with a preset whose default damping is Levenberg-Marquardt)"
        )
    step = method.core
    fill = 0.0 if on_nonfinite == "zero" else jnp.nan

    def init_fn(params: Any) -> BridgeState:
        return BridgeState(
            method.init(params, model_state), core.empty_info(tree.accum_dtype(params))
        )

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
        method._validator.check_values(params, batch)  # empty batch; labels when concrete
        inner = state.inner
        key = core.default_key(inner.count) if key is None else key
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise InputError(
                f"batch must be a 2-tuple (inputs, targets), got {type(batch).__name__}; "
                "call tx.update(grads, state, params, batch=(inputs, targets))"
            )
        if not method.model.plain:
            method._check_model_state(inner)
            method._check_model_contract(params, inner, batch, key)
        d = step.direction(params, inner, batch, key, rhs=updates)
        ok = core.finite(d)
        after: dict = {}  # the final update is made by the transformations after this one
        damping_state, accept = step.update_damping(
            inner.damping, core.step_stats(d, after, ok), inner.count
        )
        accept = accept & ok
        new_inner = core.commit(accept, d.state, inner, damping_state)
        out = tree.where(accept, d.s, jax.tree_util.tree_map(lambda x: jnp.full_like(x, fill), d.s))
        info = jax.tree_util.tree_map(
            lambda new, old: jnp.asarray(new, old.dtype),
            core.info(d, after, accept, ok),
            state.info,
        )
        return tree.cast_like(out, updates), BridgeState(new_inner, info)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def model_state_of(opt_state: Any) -> Any:
    """The model state held by the bridge inside an Optax state (a chain's, or the bridge's).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from somax_plug import as_optax, model_state_of
        >>> def f(p, x, *, state):
        ...     return x @ p, {"n": state["n"] + 1.0}
        >>> tx = optax.chain(as_optax("ggn", "cg", predict_fn=f, loss="mse", has_state=True,
        ...                           model_state={"n": jnp.zeros(())}),
        ...                  optax.scale_by_learning_rate(1.0))
        >>> model_state_of(tx.init(jnp.zeros(2)))["n"].shape
        ()
    """
    found = [
        x.inner.model_state
        for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, BridgeState))
        if isinstance(x, BridgeState)
    ]
    if len(found) != 1:
        raise InputError(
            f"expected the Optax state of exactly one somax_plug bridge (as_optax), found "
            f"{len(found)}; pass the state returned by tx.init or tx.update"
        )
    return found[0]
