"""Time and steps to target on the real workloads: a CNN on digits, a stdlib char-LM.

The workloads (:mod:`somax_plug._src.workloads`) and the protocol
(:mod:`somax_plug._src.workloads.runner`: seeds interleaved, the same fresh minibatch
for every contender at every step, compilation and evaluation excluded, medians over
seeds) are documented there and in docs/workloads.md. Contenders: ``optax.adam`` over
the workload's learning-rate grid, ``optax.contrib.sophia``, python-somax's ``sgn_ce``,
kfac-jax (patched in-process for current JAX) and every somax_plug preset with its
defaults.

Ratios (lower is better, target <= 1 each), for each workload ``W``:

* ``W_time_to_target_over_adam``: the best preset's median wall-clock to target over
  the best Adam's (the grid point with the smallest median);
* ``W_time_to_target_over_somax``: over python-somax ``sgn_ce``'s;
* ``W_time_to_target_over_kfac``: over kfac-jax's.

A ratio is null when either side did not reach the target on most seeds (or did not
run); the case entry says which, and its ``ratio_upper_bounds`` bounds the ratio when
only the preset reached the target. Modes: full (3 seeds, the workloads' budgets),
quick (1 seed, half the budget), smoke (tiny models, 1 seed, 3 steps, Adam and
:data:`SMOKE_PRESET` only: the schema test).

Usage: ``python benchmarks/bench_workloads.py [--quick] [--workloads cnn,lm]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from somax_plug._src.workloads import NAMES, make

SMOKE_PRESET = "sophia_g"
"""The preset of the smoke mode: quick to compile at tiny size, and its clipped steps
cannot blow up in three steps whatever the random probes (adahessian's first steps can)."""

RATIO_KINDS = {"adam": "best_preset_over_adam", "somax": "best_preset_over_somax",
               "kfac": "best_preset_over_kfac"}


def ratio_names(workloads: Sequence[str] = NAMES) -> list[str]:
    """``W_time_to_target_over_{adam,somax,kfac}`` for every workload ``W``."""
    return [f"{w}_time_to_target_over_{k}" for w in workloads for k in RATIO_KINDS]


def _strip(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the per-run histories (they are in the written JSON)."""
    runs = {name: [{k: v for k, v in r.items() if k != "history"} for r in recs]
            for name, recs in report["runs"].items()}
    return {**report, "runs": runs}


def run(
    quick: bool = False,
    smoke: bool = False,
    workloads: Sequence[str] = NAMES,
    out: Path | None = None,
    seeds: Sequence[int] | None = None,
    log: Callable[[str], None] | None = None,
    contenders: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the workloads; ``{ratio: value, ..., "details": {W: report}}``.

    Args:
        out: write ``W_results.json`` and ``W_training.png`` there (None: not written).
        seeds: override the mode's seeds.
        log: called with a line before every run (progress).
        contenders: only the contenders with these names or families.
    """
    from somax_plug._src.workloads import contenders as roster
    from somax_plug._src.workloads import runner

    result: dict[str, Any] = {k: None for k in ratio_names(workloads)}
    details: dict[str, Any] = {}
    for name in workloads:
        if name not in NAMES:
            raise ValueError(f"unknown workload {name!r}; choose from {', '.join(NAMES)}")
        w = make(name, "tiny" if smoke else "full")
        if smoke:
            cs = [roster.adam(w.adam_grid[-1]), roster.preset(SMOKE_PRESET, check_memory=False)]
            budget = replace(w.budget, max_steps=3)
        else:
            cs = roster.default_contenders(w)
            budget = replace(w.budget, max_seconds=w.budget.max_seconds / 2) if quick \
                else w.budget
        if contenders is not None:
            cs = [c for c in cs if c.name in contenders or c.family in contenders]
        run_seeds = tuple(seeds) if seeds is not None else ((0,) if quick or smoke
                                                            else (0, 1, 2))
        on_start = None
        if log is not None:
            on_start = lambda n, s, w=name: log(f"{w}: {n} (seed {s})")
        report = runner.run(w, cs, seeds=run_seeds, budget=budget, on_start=on_start)
        report["mode"] = "smoke" if smoke else ("quick" if quick else "full")
        if out is not None:
            js, png = runner.write(report, Path(out))
            report["files"] = {"json": str(js), "plot": str(png)}
        for kind, key in RATIO_KINDS.items():
            result[f"{name}_time_to_target_over_{kind}"] = report["ratios"][key]
        details[name] = _strip(report)
    result["details"] = details
    return result
