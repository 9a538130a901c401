"""Per-step time of the ``shampoo`` and ``soap`` presets vs ``optax.adam``.

Workloads:

* ``mlp``: the 784-256-10 tanh MLP of the other benchmarks, a batch of 256
  standard-normal inputs with random labels, float32, softmax cross-entropy;
* ``lm``: the stdlib character-level transformer of the workloads
  (:mod:`somax_plug._src.workloads.lm`, ``size="full"``: 2 layers, width 96, 245,858
  parameters), one fixed minibatch of 16 windows x 32 characters.

Contenders: ``compose(preset="shampoo")`` and ``compose(preset="soap")`` through their
public ``method.step``, the ``soap`` preset two-sided (:data:`VARIANTS`), and
``optax.adam(1e-3)`` as one jitted function per step
(``value_and_grad``, ``update``, ``apply_updates``).

Protocol (as :mod:`~somax_plug._src.benchmarks.paper_presets`): one call runs
``block`` consecutive steps from the same start (step count 0, so a 10-step block
holds exactly one root / basis refresh of the presets' ``precondition_every = 10``:
the amortised cost); every contender is compiled and warmed up first, then the
contenders alternate over ``repeats`` rounds (the order rotating), each call timed to
``jax.block_until_ready``; the per-step time is the median block time / ``block``.
The process CPU time is recorded too (less disturbed on a shared machine).

Run by ``somax-plug bench`` (part ``shampoo``).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from somax_plug import compose
from somax_plug._src.benchmarks.common import (
    alternate,
    init_mlp,
    machine_info,
    median,
    mlp,
    random_batch,
    run_steps,
)

TARGETS = {"soap / adam (lm)": 1.5}
"""Issue 16: amortised per-step cost of ``soap`` <= 1.5x Adam on the language model."""

PRESETS = ("shampoo", "soap")

VARIANTS = {"soap two-sided": ("soap", {"max_precond_dim": None})}
"""Rows beside the presets: the ``soap`` preset with these preconditioner options changed
(two-sided: every side rotated, the authors' ``max_precond_dim = 10000`` on these
models, against the preset's one-sided 256)."""


def _variant(base: str, changes: dict[str, Any], predict_fn: Any) -> Any:
    from somax_plug.builtin.presets import PRESETS as DATA

    spec = dict(DATA[base][1])
    spec["preconditioner"] = {**spec["preconditioner"], **changes}
    return compose(**spec, predict_fn=predict_fn, loss="softmax_cross_entropy")


def _adam_step(objective: Any, tx: optax.GradientTransformation) -> Any:
    @jax.jit
    def step(params: Any, state: Any, batch: Any, key: Any = None) -> Any:
        loss, grads = jax.value_and_grad(objective)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


def contenders(predict_fn: Any, objective: Any, params: Any, batch: Any,
               block: int) -> dict[str, Any]:
    """``name -> call`` running ``block`` steps of each contender from ``params``."""
    tx = optax.adam(1e-3)
    steps: dict[str, tuple[Any, Any]] = {"adam": (_adam_step(objective, tx), tx.init(params))}
    for name in PRESETS:
        method = compose(preset=name, predict_fn=predict_fn, loss="softmax_cross_entropy")
        steps[name] = (method.step, method.init(params))
    for name, (base, changes) in VARIANTS.items():
        method = _variant(base, changes, predict_fn)
        steps[name] = (method.step, method.init(params))
    keys = jax.random.split(jax.random.key(1), block)
    return {name: run_steps(step, params, state, batch, block, list(keys))
            for name, (step, state) in steps.items()}


def _workload(name: str) -> tuple[Any, Any, Any, Any, str]:
    if name == "mlp":
        from somax_plug._src.benchmarks.common import ce_loss

        params = init_mlp(jax.random.key(0))
        return (mlp, lambda p, b: ce_loss(p, b), params, random_batch(jax.random.key(2), 256),
                "mlp 784-256-10 tanh, batch 256, float32")
    from somax_plug._src.workloads import lm

    w = lm.make("full")
    return (w.predict_fn, w.objective, w.init_params(jax.random.key(0)), w.batch(0, 0),
            f"{w.title}, {w.num_params()} parameters, batch {w.batch_size} windows")


def run(repeats: int = 15, block: int = 10, quick: bool = False, smoke: bool = False,
        workloads: tuple[str, ...] = ("mlp", "lm")) -> dict[str, Any]:
    """Per-step times and ratios (see the module docstring); ``quick``: 5 repeats;
    ``smoke``: nothing timed, null ratios (the report's schema only)."""
    if smoke:
        return {"soap_over_adam_lm": None, "note": "not run (smoke)"}
    if quick:
        repeats = min(repeats, 5)
    rows: dict[str, Any] = {}
    for wname in workloads:
        predict_fn, objective, params, batch, title = _workload(wname)
        cpu: dict[str, list[float]] = {}
        times = alternate(contenders(predict_fn, objective, params, batch, block),
                          repeats=repeats, cpu=cpu)
        per_step = {k: median(t) / block for k, t in times.items()}
        cpu_step = {k: median(t) / block for k, t in cpu.items()}
        rows[wname] = {
            "workload": title,
            "per_step_ms": {k: round(v * 1e3, 4) for k, v in per_step.items()},
            "per_step_cpu_ms": {k: round(v * 1e3, 4) for k, v in cpu_step.items()},
            "ratios": {f"{k} / adam": round(per_step[k] / per_step["adam"], 3)
                       for k in (*PRESETS, *VARIANTS)},
            "cpu_ratios": {f"{k} / adam": round(cpu_step[k] / cpu_step["adam"], 3)
                           for k in (*PRESETS, *VARIANTS)},
        }
    lm_row = rows.get("lm")
    return {
        "mode": "method.step per step",
        "block": block,
        "repeats": repeats,
        "workloads": rows,
        "soap_over_adam_lm": None if lm_row is None else lm_row["ratios"]["soap / adam"],
        "targets": TARGETS,
        "machine": machine_info(),
    }


def time_to_target(workload: str = "lm", seeds: tuple[int, ...] = (0,),
                   max_seconds: float | None = None) -> dict[str, Any]:
    """Time to the workload's target: ``shampoo``, ``soap`` and Adam over its grid.

    The workloads runner (:func:`somax_plug._src.workloads.runner.run`: interleaved,
    fresh minibatches, compilation and evaluation off the clock) with only these
    contenders; ``max_seconds`` caps each run's training clock (default: the
    workload's budget). Returns the runner's summary per contender (status, median time
    and steps to target, final held-out loss, step time).
    """
    import dataclasses

    from somax_plug._src.workloads import cnn, lm, runner
    from somax_plug._src.workloads import contenders as C

    w = (lm if workload == "lm" else cnn).make("full")
    budget = w.budget if max_seconds is None else dataclasses.replace(
        w.budget, max_seconds=max_seconds)
    roster = [C.adam(lr) for lr in w.adam_grid] + [C.preset(n) for n in PRESETS]
    report = runner.run(w, roster, seeds=seeds, budget=budget)
    rows = {}
    for name, summ in report["summary"].items():
        rows[name] = {k: summ.get(k) for k in (
            "status", "median_time_to_target_s", "median_steps_to_target", "median_final_loss",
            "median_step_ms", "compile_s", "median_steps", "errors")}
    return {"workload": w.title, "target": w.target.to_dict(), "budget": budget.to_dict(),
            "seeds": list(seeds), "summary": rows, "machine": machine_info(),
            "load_average": report["load_average"]}
