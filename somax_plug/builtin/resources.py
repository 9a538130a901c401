"""Built-in resource providers (plugin ``"builtin"``).

Each provider computes one named intermediate of a step from the model
(``res.model``), the parameters and the batch ``(inputs, targets)``. Notation:
``f(params, x)`` the model, ``L = c * sum_b l_b`` the reduced loss (``c = 1/B`` for
"mean", 1 for "sum"), J the Jacobian of the outputs with respect to the parameters.

=====================  ========================================  ==========  ====================
resource               computes                                  requires    reuses when planned
=====================  ========================================  ==========  ====================
``outputs``            ``f(params, inputs)``                     --          linearization
``linearization``      one ``jax.linearize`` of f: outputs, J v,  --          layer_io
                       J^T u (``jax.linear_transpose``)
``loss``               L                                         --          hvp, linearization,
                                                                             outputs
``output_grad``        dL/d outputs                              outputs     --
``grad``               dL/d params                               --          hvp, linearization
                                                                             (+ output_grad)
``output_hessian``     :class:`OutputHessian` (mv, per-example   outputs     --
                       sqrt ``[B, K, K]``)
``hvp``                ``jax.linearize`` of ``grad L``: the       --          --
                       gradient, v -> H v, and the loss
``per_example_grads``  ``vmap`` of per-example gradients, each   --          --
                       scaled by c, so they sum to ``grad``
                       (through the full batch's forward pass
                       for a model with state or a key)
``loss_after``         L at ``params_after`` (after the update)  params_     --
                                                                 after
``predicted_decrease`` ``-(g.u + u.Cu / 2)`` for the update u    grad,       --
                                                                 operator,
                                                                 update
=====================  ========================================  ==========  ====================

``update`` and ``params_after`` are inputs of the step's second phase: the step
builder sets them once the direction is known, so the last two resources are
computed after the solve (at the finest cadence of their consumers, such as a
Levenberg-Marquardt damping or the ``rho`` telemetry).

Closures are ``jax.tree_util.Partial`` objects (pytrees), so the linearization, the
output Hessian, the HVP and the operators built on them can be passed through
``jax.jit``, ``lax.cond`` or ``lax.scan`` as arguments.

Sharing: ``grad`` comes from the HVP linearization when ``hvp`` is planned (free), else
from ``J^T (dL/dz)`` when ``linearization`` is planned (one transpose, no second
forward pass), else from ``jax.value_and_grad``. ``loss`` likewise reads ``hvp.loss`` or
the linearization's outputs. A provider reads a "reuses" resource only when
``res.planned(name)``, so those are recorded in :attr:`ResourceProvider.reuses`, not in
``requires``.

Example:
    >>> import jax.numpy as jnp
    >>> from somax_plug import Resources, make_model
    >>> from somax_plug.builtin.resources import PROVIDERS
    >>> model = make_model(lambda p, x: x @ p, "mse")
    >>> res = Resources(model, jnp.ones((2, 1)), (jnp.ones((3, 2)), jnp.zeros((3, 1))),
    ...                 None, PROVIDERS)
    >>> res["grad"].shape, float(res["loss"])
    ((2, 1), 2.0)
"""

from __future__ import annotations

from typing import Any

import jax
from jax.tree_util import Partial

from somax_plug import HVP, Linearization, OutputHessian, ResourceProvider, Resources, tree
from somax_plug.losses import batch_size_of

PyTree = Any


def _outputs(res: Resources) -> PyTree:
    if res.planned("linearization"):
        return res["linearization"].outputs
    return res.model.outputs(res.params, res.inputs)


def _first_cotangent(transpose: Any, u: PyTree) -> PyTree:
    return transpose(u)[0]


def _linearization(res: Resources) -> Linearization:
    if res.planned("layer_io"):  # the tapped pass is a linearization too: share it
        return res["layer_io"].linearization
    model, inputs, params = res.model, res.inputs, res.params
    outputs, jvp = jax.linearize(lambda p: model.outputs(p, inputs), params)
    transpose = jax.linear_transpose(jvp, params)
    # Partials are pytrees, so operators built on them can cross jit boundaries
    return Linearization(outputs=outputs, jvp=jvp, vjp=Partial(_first_cotangent, transpose))


def _loss(res: Resources) -> jax.Array:
    if res.planned("hvp"):
        hvp = res["hvp"]
        if hvp.loss is not None:
            return hvp.loss
    if res.planned("outputs"):
        return res.model.loss(res["outputs"], res.targets)
    if res.planned("linearization"):
        return res.model.loss(res["linearization"].outputs, res.targets)
    return res.model.loss_value(res.params, res.batch)


def _output_grad(res: Resources) -> PyTree:
    return res.model.loss.output_grad(res["outputs"], res.targets)


def _grad(res: Resources) -> PyTree:
    if res.planned("hvp"):
        return res["hvp"].grad
    if res.planned("linearization"):
        lin = res["linearization"]
        if res.planned("output_grad"):
            g_out = res["output_grad"]
        else:
            g_out = res.model.loss.output_grad(lin.outputs, res.targets)
        return lin.vjp(g_out)
    value, grad = jax.value_and_grad(res.model.loss_value)(res.params, res.batch)
    if not res.computed("loss"):  # one forward pass serves both (read grad first)
        res.set("loss", value)
    return grad


def _output_hessian(res: Resources) -> OutputHessian:
    loss, outputs, targets = res.model.loss, res["outputs"], res.targets
    mv = Partial(loss.output_hessian_mv, outputs, targets)
    return OutputHessian(mv=mv, sqrt=loss.output_hessian_sqrt(outputs, targets),
                         sqrt_t_mv=Partial(loss.output_hessian_sqrt_t_mv, outputs, targets),
                         sqrt_mv=Partial(loss.output_hessian_sqrt_mv, outputs, targets))


def _hvp(res: Resources) -> HVP:
    model, batch = res.model, res.batch

    def grad_and_loss(p: PyTree) -> tuple[PyTree, jax.Array]:
        value, g = jax.value_and_grad(model.loss_value)(p, batch)
        return g, value

    grad, lin, loss = jax.linearize(grad_and_loss, res.params, has_aux=True)
    return HVP(grad=grad, mv=lin, loss=loss)


def _per_example_grads(res: Resources) -> PyTree:
    model, params = res.model, res.params
    inputs, targets = res.batch
    c = model.loss.scale(batch_size_of(inputs))
    if model.couples_examples:
        # batch statistics and one dropout mask for the whole batch: the gradient of
        # c * l_b through the full-batch forward pass (one VJP per row of the identity)
        losses, vjp = jax.vjp(lambda p: c * model.per_example_losses(p, res.batch), params)
        eye = jax.numpy.eye(losses.shape[0], dtype=losses.dtype)
        return jax.vmap(lambda row: vjp(row)[0])(eye)

    # the batch's own weights, not those of a batch of one: c * l_b = w_b * l_b(one) with
    # w_b = position_scale(batch) / position_scale(example b alone) -- c for most losses,
    # c q / q_b for a loss that averages over positions (softmax cross-entropy [B, T, C])
    full = model.loss.position_scale(jax.eval_shape(model.outputs, params, inputs), targets)

    def one(x: PyTree, y: PyTree) -> PyTree:
        x1 = jax.tree_util.tree_map(lambda a: a[None], x)
        y1 = jax.tree_util.tree_map(lambda a: a[None], y)

        def scaled_loss(p: PyTree) -> jax.Array:
            out = model.outputs(p, x1)
            w = full / model.loss.position_scale(out, y1)
            return w * model.loss.per_example(out, y1)[0]

        return jax.grad(scaled_loss)(params)

    return jax.vmap(one)(inputs, targets)


def _loss_after(res: Resources) -> jax.Array:
    return res.model.loss_value(res["params_after"], res.batch)


def _predicted_decrease(res: Resources) -> jax.Array:
    g, u = res["grad"], res["update"]
    op = res["operator"]
    rf = op.row_factors()
    if rf is not None:  # u.Cu = |U u|^2: one row product (a JVP for the GGN), no transpose
        ru = rf.matvec(u)
        return -(tree.vdot(g, u) + 0.5 * jax.numpy.vdot(ru, ru))
    return -(tree.vdot(g, u) + 0.5 * tree.vdot(u, op.mv(u)))


PROVIDERS: dict[str, ResourceProvider] = {
    p.name: p
    for p in (
        ResourceProvider(
            "outputs",
            _outputs,
            plugin="builtin",
            reuses={"linearization"},
            summary="model outputs f(params, inputs)",
        ),
        ResourceProvider(
            "linearization",
            _linearization,
            plugin="builtin",
            reuses={"layer_io"},
            summary="one jax.linearize of the model: outputs, J v, J^T u (layer_io's if planned)",
        ),
        ResourceProvider(
            "loss",
            _loss,
            plugin="builtin",
            reuses={"hvp", "linearization", "outputs"},
            summary="reduced loss (from hvp or the linearization's outputs when planned)",
        ),
        ResourceProvider(
            "output_grad",
            _output_grad,
            requires={"outputs"},
            plugin="builtin",
            summary="dL/d outputs",
        ),
        ResourceProvider(
            "grad",
            _grad,
            plugin="builtin",
            reuses={"hvp", "linearization", "output_grad"},
            summary="gradient (from hvp, else J^T dL/dz, else jax.value_and_grad)",
        ),
        ResourceProvider(
            "output_hessian",
            _output_hessian,
            requires={"outputs"},
            plugin="builtin",
            summary="Hessian of the loss w.r.t. the outputs (mv and per-example sqrt)",
        ),
        ResourceProvider(
            "hvp",
            _hvp,
            plugin="builtin",
            summary="jax.linearize of the gradient: grad, v -> H v (forward-over-reverse), loss",
        ),
        ResourceProvider(
            "per_example_grads",
            _per_example_grads,
            plugin="builtin",
            summary="vmapped per-example gradients (scaled by the reduction; they sum to grad)",
        ),
        ResourceProvider(
            "loss_after",
            _loss_after,
            requires={"params_after"},
            plugin="builtin",
            summary="loss at the updated parameters",
        ),
        ResourceProvider(
            "predicted_decrease",
            _predicted_decrease,
            requires={"grad", "operator", "update"},
            plugin="builtin",
            summary="-(g.u + u.Cu/2) for the update u",
        ),
    )
}
"""Built-in providers by resource name."""
