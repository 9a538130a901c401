"""Compiled FLOPs of every preset's step, amortised over its cadence period, against its minimum.

For a preset whose cadences are ``k_1, ..., k_m`` (period ``P = lcm(k_i)``), step
``c`` runs the phase of the cadences that tick at ``c``. Each phase is compiled on
its own (``StepCore.force_ticks``), so XLA's cost analysis sees one branch; CG runs
with ``tol = 0`` and its unrolled loop (XLA counts a loop body once), so every
product is visible. The operator products a phase makes are counted while tracing.

The minimum of a phase is built from primitives measured alone on the same model:

==========================  ==================================================
what the phase must do      FLOPs
==========================  ==================================================
loss and gradient           ``F_grad = flops(jax.value_and_grad(loss))``
one GGN / Fisher product    ``F_ggnvp = flops(jvp + closed-form H_out + vjp)
                            - flops(forward)`` (at a given linearization)
one Hessian product         ``F_hvp = flops(jvp of grad) - F_grad``
a Gauss-Newton-Bartlett     ``F_grad - F_fwd`` (one more backward pass on
diagonal                    sampled labels)
one random probe            ``F_probe = flops(jax.random.rademacher(key, (n,)))``
the loss after the update   ``F_fwd = flops(loss)``
==========================  ==================================================

``minimum(phase) = F_grad + products * F_product + probes * F_probe + [F_gnb] +
[F_fwd]`` and
``flops_over_minimum = sum_c flops(step at c) / sum_c minimum(c)`` over one period.
What it catches: a resource computed twice, or work in a phase that does not need
it (an HVP linearization on a step without a Hessian estimate). A row-space solve
(``gauss_newton_lm``'s choice when rows < parameters) builds an R x R Gram matrix,
which is neither a product nor a resource: its ratio is reported, not judged.

Model: MLP 784-256-10 (tanh), batch 256, mean softmax cross-entropy, float32.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp

from somax_plug._src.benchmarks.common import init_mlp, mlp, random_batch

TARGET = 1.05


def _flops(fn: Any, *args: Any) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0))


def _overrides(name: str) -> dict[str, Any]:
    """Fixed-work options: CG runs all its iterations, unrolled."""
    from somax_plug import get_registry

    composition = dict(get_registry().preset(name).composition)
    solver = composition.get("solver")
    solver_name = solver if isinstance(solver, str) else (solver or {}).get("name")
    if solver_name == "cg":
        options = dict(solver) if isinstance(solver, dict) else {"name": "cg"}
        return {"solver": {**options, "tol": 0.0, "loop": "unroll"}}
    return {}


class _Counting:
    """Wraps the operator provider: counts ``mv`` calls made while tracing."""

    def __init__(self) -> None:
        self.products = 0

    def wrap(self, build: Any) -> Any:
        counter = self

        def counted(res: Any) -> Any:
            op = build(res)
            inner_mv = op.mv

            def mv(v: Any) -> Any:
                counter.products += 1
                return inner_mv(v)

            op.mv = mv
            return op

        return counted


def primitives(params: Any, batch: Any) -> dict[str, float]:
    """The FLOPs of the pieces a minimum is made of (see the module docstring)."""
    from somax_plug._src.benchmarks.common import ce_loss
    from somax_plug._src.benchmarks.flops import ggn_vp_full

    v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * 0.01, params)
    f_fwd = _flops(ce_loss, params, batch)
    f_grad = _flops(jax.value_and_grad(ce_loss), params, batch)
    f_hvp_full = _flops(
        lambda p, t: jax.jvp(jax.grad(lambda q: ce_loss(q, batch)), (p,), (t,)), params, v
    )
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    f_probe = _flops(lambda k: jax.random.rademacher(k, (n,), dtype=jnp.float32),
                     jax.random.key(0))
    return {
        "probe": f_probe,
        "fwd": f_fwd,
        "grad": f_grad,
        "ggnvp": _flops(ggn_vp_full, params, batch[0], v) - _flops(mlp, params, batch[0]),
        "hvp": f_hvp_full - f_grad,
        "gnb": f_grad - f_fwd,
    }


def preset_row(name: str, params: Any, batch: Any, prim: dict[str, float]) -> dict[str, Any]:
    """FLOPs of ``name`` per phase and amortised, with the minimum of each phase."""
    import attrs

    from somax_plug import compose

    method = compose(preset=name, predict_fn=mlp, loss="softmax_cross_entropy",
                     **_overrides(name))
    core = method.core
    counter = _Counting()
    if "operator" in core.providers:
        provider = core.providers["operator"]
        core.providers["operator"] = attrs.evolve(provider, compute=counter.wrap(provider.compute))
    curvature = method.plan.component("curvature")
    product = prim["hvp"] if curvature is not None and curvature.short_name == "hessian" else (
        prim["ggnvp"])
    estimators = {e.short_name for e in method.plan.estimators}
    state = method.init(params)
    key = jax.random.key(2)
    period = math.lcm(*core.cadences) if core.cadences else 1
    phases: dict[frozenset[int], dict[str, float]] = {}
    for c in range(period):
        ticks = frozenset(k for k in core.cadences if c % k == 0)
        if ticks in phases:
            continue
        core.force_ticks = ticks
        counter.products = 0
        step_flops = _flops(method._step, params, state, batch, key)
        due = core._due(ticks)
        gnb = prim["gnb"] if "gnb_diag" in estimators and any(
            e.every_k == 1 or e.every_k in ticks for e in method.plan.estimators
            if e.short_name == "gnb_diag") else 0.0
        after = prim["fwd"] if "loss_after" in core._after_names else 0.0
        probes = sum(
            int(getattr(e.instance, "num_probes", 0))
            for e in method.plan.estimators
            if e.every_k == 1 or e.every_k in ticks
        )
        minimum = (
            prim["grad"] + counter.products * product + probes * prim["probe"] + gnb + after
        )
        phases[ticks] = {
            "step": step_flops,
            "minimum": minimum,
            "products": counter.products,
            "probes": probes,
            "row_space_solve": "linearization" in due and method.plan.component(
                "solver").short_name in ("auto", "row_cholesky", "row_cg"),
        }
    core.force_ticks = None
    per_step = [phases[frozenset(k for k in core.cadences if c % k == 0)] for c in range(period)]
    total = sum(p["step"] for p in per_step)
    minimum = sum(p["minimum"] for p in per_step)
    return {
        "preset": name,
        "period": period,
        "flops_over_minimum": total / minimum,
        "step_flops_in_gradients": total / period / prim["grad"],
        "judged": not any(p["row_space_solve"] for p in per_step),
        "phases": {
            ",".join(map(str, sorted(t))) or "none": v
            for t, v in sorted(phases.items(), key=lambda kv: sorted(kv[0]))
        },
    }


def run(quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Every built-in preset's ``flops_over_minimum`` (target ``<= 1.05``)."""
    from somax_plug import get_registry

    sizes, batch_size = ((8, 8, 3), 4) if smoke else ((784, 256, 10), 256)
    params = init_mlp(jax.random.key(0), sizes)
    batch = random_batch(jax.random.key(1), batch_size, sizes[0], sizes[-1])
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    prim = primitives(params, batch)
    rows = []
    for preset in get_registry().presets():
        if preset.plugin == "builtin":
            rows.append(preset_row(preset.name, params, batch, prim))
    worst = max(r["flops_over_minimum"] for r in rows if r["judged"])
    return {
        "target": TARGET,
        "primitives": prim,
        "worst_flops_over_minimum": worst,
        "met": worst <= TARGET,
        "model": f"MLP {'-'.join(map(str, sizes))} (tanh), batch {batch_size}",
        "presets": rows,
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(smoke="--smoke" in sys.argv), indent=2))
