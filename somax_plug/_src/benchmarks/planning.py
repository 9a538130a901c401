"""Planned vs unplanned: what sharing the per-step resources saves.

For each composition that shares the linearization (the ``sgn`` and
``gauss_newton_lm`` presets), the same composition is built twice, planned and
``unplanned=True`` (every component recomputes what it reads), and run side by side
on the same model, batch and keys. One timed call is a block of consecutive steps
(for ``sgn`` a whole cadence cycle of 10, so its every-10-steps rho is counted at its
real frequency; 3 for ``gauss_newton_lm``, which has no cadence); the ratio is the
median planned time over the median unplanned time (wall-clock; the ratio of process
CPU times is recorded beside it, as a cross-check on machines shared with other jobs).

Besides time, each case records the provider traces per step (``trace_counts``: what
the planner saves at trace time) and the compiled FLOPs of one step in both modes
(XLA's cost analysis, a while loop's body counted once; not with ``quick``), which
show how much of the duplicated work XLA's common-subexpression elimination removes
by itself when everything lives in one ``jit``.

``planned_over_unplanned`` is the geometric mean over the cases.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax

from somax_plug._src.benchmarks.common import (
    alternate,
    geomean,
    init_mlp,
    median,
    mlp,
    random_batch,
    run_steps,
)

TARGET = 0.7

CASES = (
    # name, preset, overrides, model sizes, batch, steps per timed call (a cadence cycle)
    ("sgn", "sgn", {}, (784, 256, 10), 256, 10),
    ("gauss_newton_lm", "gauss_newton_lm", {}, (64, 64, 10), 32, 3),
)


def _flops(method: Any, params: Any, state: Any, batch: Any, key: Any) -> float | None:
    try:
        cost = jax.jit(method._step).lower(params, state, batch, key).compile().cost_analysis()
    except Exception:  # pragma: no cover - backend without cost analysis
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) or None


def run_case(name: str, preset: str, overrides: dict[str, Any], sizes: tuple[int, ...],
             batch_size: int, repeats: int, cycle: int = 10,
             with_flops: bool = True, warmup_s: float = 3.0) -> dict[str, Any]:
    """Time one composition planned and unplanned; see the module docstring."""
    from somax_plug._src.composition import compose

    params = init_mlp(jax.random.key(0), sizes)
    batch = random_batch(jax.random.key(1), batch_size, sizes[0], sizes[-1])
    keys = [jax.random.key(10 + i) for i in range(cycle)]
    methods = {
        mode: compose(preset=preset, predict_fn=mlp, loss="softmax_cross_entropy",
                      unplanned=(mode == "unplanned"), **overrides)
        for mode in ("planned", "unplanned")
    }
    states = {mode: m.init(params) for mode, m in methods.items()}
    contenders = {mode: run_steps(m.step, params, states[mode], batch, cycle, keys)
                  for mode, m in methods.items()}
    cpu: dict[str, list[float]] = {}
    times = alternate(contenders, repeats=repeats, warmup=1, cpu=cpu, warmup_s=warmup_s)
    planned = median(times["planned"]) / cycle
    unplanned = median(times["unplanned"]) / cycle
    # numbers must agree
    p_out = contenders["planned"]()
    u_out = contenders["unplanned"]()
    diff = max(float(abs(a - b).max()) for a, b in
               zip(jax.tree_util.tree_leaves(p_out), jax.tree_util.tree_leaves(u_out),
                   strict=True))
    flops = {mode: _flops(m, params, states[mode], batch, keys[0]) if with_flops else None
             for mode, m in methods.items()}
    traces = {}
    for mode in methods:  # one fresh trace of one step: how often each provider ran
        m = compose(preset=preset, predict_fn=mlp, loss="softmax_cross_entropy",
                    unplanned=(mode == "unplanned"), **overrides)
        jax.make_jaxpr(m._step)(params, m.init(params), batch, keys[0])
        traces[mode] = dict(sorted(m.trace_counts.items()))
    return {
        "name": name,
        "preset": preset,
        "overrides": overrides,
        "model": f"MLP {'-'.join(map(str, sizes))} (tanh)",
        "batch": batch_size,
        "steps_per_call": cycle,
        "repeats": repeats,
        "planned_step_ms": 1e3 * planned,
        "unplanned_step_ms": 1e3 * unplanned,
        "ratio": planned / unplanned,
        "cpu_time_ratio": median(cpu["planned"]) / median(cpu["unplanned"]),
        "max_param_diff": diff,
        "provider_traces_per_step": traces,
        "flops_per_step": flops,
        "flops_ratio": (flops["planned"] / flops["unplanned"])
        if flops["planned"] and flops["unplanned"] else None,
    }


def run(quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Both cases; ``planned_over_unplanned`` is their geometric mean."""
    repeats = 2 if smoke else (4 if quick else 20)
    cases = []
    for name, preset, overrides, sizes, batch, cycle in CASES:
        if smoke:
            sizes, batch, cycle = (8, 8, 3), 4, 2
        cases.append(run_case(name, preset, overrides, sizes, batch, repeats, cycle=cycle,
                              with_flops=not quick, warmup_s=0.0 if smoke else 3.0))
    return {
        "planned_over_unplanned": geomean([c["ratio"] for c in cases]),
        "cpu_time": {"planned_over_unplanned": geomean([c["cpu_time_ratio"] for c in cases])},
        "target": TARGET,
        "cases": cases,
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
