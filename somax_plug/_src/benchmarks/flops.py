"""Compiled FLOPs of the sgn step relative to the minimum it must do.

The minimum of one SGN step with k CG iterations is one gradient (the loss comes
with it) plus k GGN-vector products at the current linearization:
``flops(grad) + k * flops(GGN-vp)``. All numbers are XLA's cost analysis
(``jax.jit(f).lower(...).compile().cost_analysis()["flops"]``) on the same model and
batch (MLP 784-256-10, batch 256, softmax cross-entropy):

* ``grad``: ``jax.value_and_grad`` of the loss;
* ``ggnvp``: one ``J^T H_out J v`` (``jax.jvp`` and ``jax.vjp`` of the model, the
  closed-form softmax output Hessian) *minus* one forward pass, because a product at
  a given linearization does not redo the forward pass;
* the step: the ``sgn`` preset with ``maxiter = k``, ``tol = 0`` (all k iterations run,
  checked), ``rho_every_k = 0`` (no rho telemetry). XLA counts the body of a
  ``while`` loop once, whatever its trip count, so the step's total is
  ``flops(step) + (k - 1) * flops(body) + k * flops(cond)``, with the CG loop's body
  and condition compiled on their own from the step's jaxpr.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import jax.numpy as jnp

from somax_plug._src.benchmarks.common import ce_loss, init_mlp, mlp, random_batch

TARGET = 1.05
K = 20


def _compiled_cost(fn: Any, *args: Any) -> tuple[Any, float]:
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX returned one dict per computation
        cost = cost[0] if cost else {}
    return compiled, float(cost.get("flops", 0.0))


def _cost(fn: Any, *args: Any) -> float:
    return _compiled_cost(fn, *args)[1]


def _while_loops(jaxpr: Any) -> list[Any]:
    """Every ``while`` equation in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    found.extend(_while_loops(inner))
                elif hasattr(sub, "eqns"):
                    found.extend(_while_loops(sub))
    return found


def _closed_cost(closed: Any) -> float:
    from jax.extend.core import jaxpr_as_fun

    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals]
    return _cost(jaxpr_as_fun(closed), *args)


def ggn_vp_full(params: Any, x: jax.Array, v: Any) -> Any:
    """``J^T H_out J v`` for mean softmax cross-entropy, from scratch (with the forward)."""
    f = lambda p: mlp(p, x)
    logits, jv = jax.jvp(f, (params,), (v,))
    prob = jax.nn.softmax(logits, axis=-1)
    pj = prob * jv
    hjv = (pj - prob * jnp.sum(pj, axis=-1, keepdims=True)) / x.shape[0]
    _, vjp = jax.vjp(f, params)
    return vjp(hjv)[0]


def run(quick: bool = False, smoke: bool = False, k: int = K) -> dict[str, Any]:
    """FLOPs of the step, the gradient and a GGN-vp; ``flops_over_minimum``."""
    from somax_plug._src.composition import compose

    sizes, batch_size = ((8, 8, 3), 4) if smoke else ((784, 256, 10), 256)
    k = 3 if smoke else k
    params = init_mlp(jax.random.key(0), sizes)
    batch = random_batch(jax.random.key(1), batch_size, sizes[0], sizes[-1])
    v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * 0.01, params)

    f_fwd = _cost(mlp, params, batch[0])
    f_grad = _cost(jax.value_and_grad(ce_loss), params, batch)
    f_ggnvp_full = _cost(ggn_vp_full, params, batch[0], v)
    f_ggnvp = f_ggnvp_full - f_fwd

    method = compose(preset="sgn", predict_fn=mlp, loss="softmax_cross_entropy",
                     solver={"name": "cg", "maxiter": k, "tol": 0.0}, rho_every_k=0)
    state = method.init(params)
    key = jax.random.key(2)
    compiled, f_step_xla = _compiled_cost(method._step, params, state, batch, key)
    _, _, info = compiled(params, state, batch, key)
    iterations = int(info["solver_iterations"])

    closed = jax.make_jaxpr(method._step)(params, state, batch, key)
    loops = _while_loops(closed.jaxpr)
    bodies = [_closed_cost(e.params["body_jaxpr"]) for e in loops]
    conds = [_closed_cost(e.params["cond_jaxpr"]) for e in loops]
    f_step = f_step_xla + sum((iterations - 1) * b for b in bodies) + sum(
        iterations * c for c in conds)
    minimum = f_grad + iterations * f_ggnvp
    return {
        "flops_over_minimum": f_step / minimum,
        "target": TARGET,
        "details": {
            "model": f"MLP {'-'.join(map(str, sizes))} (tanh)",
            "batch": batch_size,
            "k": k,
            "cg_iterations_run": iterations,
            "flops_forward": f_fwd,
            "flops_grad": f_grad,
            "flops_ggnvp": f_ggnvp,
            "flops_ggnvp_with_forward": f_ggnvp_full,
            "flops_step_xla_body_once": f_step_xla,
            "while_loops": len(loops),
            "flops_loop_bodies": bodies,
            "flops_loop_conds": conds,
            "flops_step_total": f_step,
            "flops_minimum": minimum,
            "composition": "preset sgn, cg maxiter=k tol=0, rho_every_k=0",
        },
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
