"""``somax-plug bench [--json] [--quick]``: every benchmark in one run, with ratios.

Parts (each ``run(quick) -> dict``; the modules document their protocols):

* :mod:`somax_plug._src.benchmarks.planning`: ``planned_over_unplanned``;
* :mod:`somax_plug._src.benchmarks.peers`: ``ours_over_somax_same_config``,
  ``ours_over_adam_per_step``;
* :mod:`somax_plug._src.benchmarks.matvec` (also ``benchmarks/bench_matvec.py``):
  ``ggnvp_over_grad``, ``hvp_over_grad``;
* :mod:`somax_plug._src.benchmarks.flops`: ``flops_over_minimum``;
* :mod:`somax_plug._src.benchmarks.preset_flops`: ``preset_flops_over_minimum`` (the
  worst judged preset's compiled FLOPs over its amortised minimum);
* :mod:`somax_plug._src.benchmarks.paper_presets` (also
  ``benchmarks/bench_sophia_adahessian.py``): ``sophia_h_over_optax_sophia``,
  ``adahessian_over_adam`` (per step);
* :mod:`somax_plug._src.benchmarks.krylov` (also ``benchmarks/bench_krylov.py``):
  ``gauss_newton_lm_over_cg_lm``, ``gauss_newton_lm_over_best_solve`` (the worse side
  of the crossover), ``conv_cg_over_products_unrolled``;
* :mod:`somax_plug._src.benchmarks.time_to_accuracy`: ``time_to_97_over_adam``,
  ``time_to_97_over_somax``;
* :mod:`somax_plug._src.benchmarks.workloads`, only with ``--workloads cnn,lm`` (the
  real workloads, minutes each): ``cnn_time_to_target_over_adam``, ``..._somax``,
  ``..._kfac`` and the same for ``lm``; it also writes ``<workload>_results.json`` and
  ``<workload>_training.png`` to ``--out`` (default ``bench_out``).

``--workloads`` alone runs only that part; with ``--only`` it runs those parts too.

``--json`` prints one object::

    {"ratios": {name: value or null, ...},
     "cases": {"planning": ..., "peers": ..., "matvec": ..., "flops": ...,
               "preset_flops": ..., "paper_presets": ..., "krylov": ...,
               "time_to_accuracy": ..., "workloads": ... (with --workloads),
               "machine": {...}, "runtime_s": {...},
               "cpu_time_ratios": {...}, "mode": "full" | "quick" | "smoke"},
     "targets": {name: {"op": "<=", "value": v}, ...}}

Ratios are of wall-clock medians. ``cases.cpu_time_ratios`` repeats the per-step
ratios with process CPU time instead, which other jobs on a shared machine disturb
much less (the human table shows both).

A part that cannot run (python-somax not installed, the repository's
``benchmarks/`` folder absent) gives ``null`` ratios and says why in its case entry;
nothing fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RATIOS = (
    "planned_over_unplanned",
    "ours_over_somax_same_config",
    "ours_over_adam_per_step",
    "ggnvp_over_grad",
    "hvp_over_grad",
    "flops_over_minimum",
    "time_to_97_over_adam",
    "time_to_97_over_somax",
    "preset_flops_over_minimum",
    "sophia_h_over_optax_sophia",
    "adahessian_over_adam",
    "gauss_newton_lm_over_cg_lm",
    "gauss_newton_lm_over_best_solve",
    "conv_cg_over_products_unrolled",
    "cnn_time_to_target_over_adam",
    "cnn_time_to_target_over_somax",
    "cnn_time_to_target_over_kfac",
    "lm_time_to_target_over_adam",
    "lm_time_to_target_over_somax",
    "lm_time_to_target_over_kfac",
)
"""Every ratio ``--json`` reports (lower is better for all)."""

WORKLOAD_RATIOS = RATIOS[-6:]
"""The ratios of the ``workloads`` part (shown in the table only when it ran)."""

TARGETS: dict[str, dict[str, Any]] = {
    "planned_over_unplanned": {"op": "<=", "value": 0.7},
    "ours_over_somax_same_config": {"op": "<=", "value": 0.9},
    "flops_over_minimum": {"op": "<=", "value": 1.05},
    "time_to_97_over_adam": {"op": "<=", "value": 1.0},
    "time_to_97_over_somax": {"op": "<=", "value": 1.0},
    "preset_flops_over_minimum": {"op": "<=", "value": 1.05},
    "sophia_h_over_optax_sophia": {"op": "<=", "value": 1.0},
    "adahessian_over_adam": {"op": "<=", "value": 2.5},
    "gauss_newton_lm_over_cg_lm": {"op": "<=", "value": 1.2},
    "gauss_newton_lm_over_best_solve": {"op": "<=", "value": 1.2},
    "conv_cg_over_products_unrolled": {"op": "<=", "value": 1.2},
    **{name: {"op": "<=", "value": 1.0} for name in WORKLOAD_RATIOS},
}
"""Targets (ratios without one are reported for information)."""

PART_OF = {
    "planned_over_unplanned": "planning",
    "ours_over_somax_same_config": "peers",
    "ours_over_adam_per_step": "peers",
    "ggnvp_over_grad": "matvec",
    "hvp_over_grad": "matvec",
    "flops_over_minimum": "flops",
    "time_to_97_over_adam": "time_to_accuracy",
    "time_to_97_over_somax": "time_to_accuracy",
    "preset_flops_over_minimum": "preset_flops",
    "sophia_h_over_optax_sophia": "paper_presets",
    "adahessian_over_adam": "paper_presets",
    "gauss_newton_lm_over_cg_lm": "krylov",
    "gauss_newton_lm_over_best_solve": "krylov",
    "conv_cg_over_products_unrolled": "krylov",
    **{name: "workloads" for name in WORKLOAD_RATIOS},
}
"""Which part reports each ratio."""

def _matvec(quick: bool, smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"ggnvp_over_grad": None, "hvp_over_grad": None, "note": "not run (smoke)"}
    from somax_plug._src.benchmarks import matvec

    return matvec.run(quick)


def _preset_flops(quick: bool, smoke: bool) -> dict[str, Any]:
    from somax_plug._src.benchmarks import preset_flops

    case = preset_flops.run(quick=quick, smoke=smoke)
    return {"preset_flops_over_minimum": case["worst_flops_over_minimum"], **case}


def _krylov(quick: bool, smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"note": "not run (smoke)"}
    from somax_plug._src.benchmarks import krylov

    case = krylov.run(quick=quick)
    t = case["targets"]
    return {
        "gauss_newton_lm_over_cg_lm": t["auto_over_cg_more_rows"],
        "gauss_newton_lm_over_best_solve": max(t["auto_over_best_more_rows"],
                                               t["auto_over_best_fewer_rows"]),
        "conv_cg_over_products_unrolled": t["conv_cg_over_products_unrolled"],
        **case,
    }


def _parts() -> dict[str, Callable[[bool, bool], dict[str, Any]]]:
    from somax_plug._src.benchmarks import (
        canonical_kfac,
        distributed,
        flops,
        kfac,
        paper_presets,
        peers,
        planning,
        shampoo,
        time_to_accuracy,
    )

    return {
        "planning": lambda q, s: planning.run(quick=q, smoke=s),
        "peers": lambda q, s: peers.run(quick=q, smoke=s),
        "matvec": _matvec,
        "flops": lambda q, s: flops.run(quick=q, smoke=s),
        "preset_flops": _preset_flops,
        "paper_presets": lambda q, s: paper_presets.run(quick=q, smoke=s),
        "krylov": _krylov,
        "time_to_accuracy": lambda q, s: time_to_accuracy.run(quick=q, smoke=s),
        "shampoo": lambda q, s: shampoo.run(quick=q, smoke=s),
        "kfac": lambda q, s: kfac.run(quick=q, smoke=s),
        "distributed": lambda q, s: distributed.run(quick=q, smoke=s),
        "canonical_kfac": lambda q, s: canonical_kfac.run(quick=q, smoke=s),
    }


def collect(
    quick: bool = False,
    smoke: bool = False,
    only: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    workloads: Sequence[str] | None = None,
    out: Path | None = None,
    seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run the parts and assemble ``{"ratios", "cases", "targets"}``.

    Args:
        quick: fewer repeats and a smaller training budget (about 2-3 minutes).
        smoke: tiny models and budgets, for the schema test (numbers meaningless).
        only: run only these parts (the others' ratios are null).
        log: called with a line before each part (progress).
        workloads: run the ``workloads`` part on these (``"cnn"``, ``"lm"``); without
            ``only``, that part alone.
        out: where the workloads part writes its JSON and plots (None: not written).
        seeds: the workloads part's seeds (default: 3, or 1 with quick / smoke).
    """
    from somax_plug._src.demo import machine_info

    cases: dict[str, Any] = {}
    runtime: dict[str, float] = {}
    parts = _parts()
    if workloads:
        from somax_plug._src.benchmarks import workloads as wl

        parts["workloads"] = lambda q, s: wl.run(
            quick=q, smoke=s, workloads=workloads, out=out, seeds=seeds,
            log=None if log is None else (lambda line: log(f"  {line}")))
        only = ["workloads", *only] if only is not None else ["workloads"]
    for name, part in parts.items():
        if only is not None and name not in only:
            continue
        if log is not None:
            log(name)
        t = time.perf_counter()
        try:
            cases[name] = part(quick, smoke)
        except Exception as exc:  # one failing part must not hide the others
            cases[name] = {"error": f"{type(exc).__name__}: {exc}"}
        runtime[name] = time.perf_counter() - t
    ratios: dict[str, float | None] = {key: None for key in RATIOS}
    cpu: dict[str, float | None] = {}
    for case in cases.values():
        for key in RATIOS:
            if key in case and case[key] is not None:
                ratios[key] = float(case[key])
        cpu.update((case.get("cpu_time") or {}) if isinstance(case, dict) else {})
    cases["cpu_time_ratios"] = cpu
    cases["machine"] = machine_info()
    cases["runtime_s"] = runtime
    cases["mode"] = "smoke" if smoke else ("quick" if quick else "full")
    return {"ratios": ratios, "cases": cases, "targets": TARGETS}


def met(name: str, value: float | None) -> str:
    """``yes`` / ``no`` against the target, ``-`` without one, ``n/a`` without a value."""
    target = TARGETS.get(name)
    if target is None:
        return "-"
    if value is None:
        return "n/a"
    return "yes" if value <= target["value"] else "no"


def _why_null(name: str, cases: dict[str, Any]) -> str:
    case = cases.get(PART_OF[name])
    if case is None:
        return "not run"
    if "error" in case:
        return str(case["error"])
    if name == "time_to_97_over_somax" and case.get("details", {}).get("somax"):
        return str(case["details"]["somax"])
    if name.startswith("time_to_97"):
        return "97% test accuracy not reached within the budget"
    if name in WORKLOAD_RATIOS:
        return _why_null_workload(name, case)
    return str(case.get("note") or "")


def _why_null_workload(name: str, case: dict[str, Any]) -> str:
    workload, _, kind = name.partition("_time_to_target_over_")
    report = case.get("details", {}).get(workload)
    if report is None:
        return f"workload {workload} not run"
    summary, best = report["summary"], report["best"]
    other = {"adam": best.get("adam"), "somax": "python-somax sgn_ce",
             "kfac": "kfac-jax"}[kind]
    why = []
    key = {"adam": "best_preset_over_adam", "somax": "best_preset_over_somax",
           "kfac": "best_preset_over_kfac"}[kind]
    bound = report.get("ratio_upper_bounds", {}).get(key)
    if bound is not None:
        why.append(f"< {bound:.3f} (only the preset reached the target)")
    for who in (best.get("preset"), other):
        s = summary.get(who) if who else None
        if s is None:
            why.append(f"{who or kind}: not run")
        elif s["median_time_to_target_s"] is None:
            err = f" ({s['errors'][0]})" if s["errors"] else ""
            why.append(f"{who}: {s['status']}{err}")
    return "; ".join(why)


def _workload_ran(name: str, cases: dict[str, Any]) -> bool:
    """Whether the workloads part ran (or failed) for this ratio's workload."""
    case = cases.get("workloads")
    if case is None:
        return False
    return "error" in case or name.split("_", 1)[0] in case.get("details", {})


def print_table(report: dict[str, Any]) -> None:
    """The ratios against their targets (rich when available)."""
    rows = []
    cpu = report["cases"].get("cpu_time_ratios", {})
    for name in RATIOS:
        if name in WORKLOAD_RATIOS and not _workload_ran(name, report["cases"]):
            continue
        value = report["ratios"][name]
        target = TARGETS.get(name)
        rows.append([
            name,
            "null" if value is None else f"{value:.3f}",
            "-" if cpu.get(name) is None else f"{cpu[name]:.3f}",
            f"{target['op']} {target['value']}" if target else "-",
            met(name, value),
            "" if value is not None else _why_null(name, report["cases"]),
        ])
    machine = report["cases"]["machine"]
    title = (f"somax-plug bench ({report['cases']['mode']}) on {machine['platform']}, "
             f"{machine['cpu_count']} CPUs, jax {machine['jax_version']} "
             f"({machine['backend']})")
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(title)
        for row in rows:
            print("  ".join(row))
        return
    table = Table(title=title)
    for h in ("ratio", "value", "cpu-time", "target", "met", "note"):
        table.add_column(h)
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="somax-plug bench",
                                     description="Benchmarks: ratios against targets.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, smaller budgets (about 2-3 minutes)")
    parser.add_argument("--only", nargs="+", choices=list(_part_names()),
                        help="run only these parts")
    parser.add_argument("--workloads", type=_workload_list, default=None,
                        metavar="cnn,lm",
                        help="run the real workloads (comma-separated: cnn, lm; minutes each); "
                        "alone, only them; with --only, those parts too")
    parser.add_argument("--out", type=Path, default=Path("bench_out"),
                        help="where --workloads writes its JSON and plots (default bench_out)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds of --workloads (default 3; 1 with --quick)")
    return parser


def _workload_list(text: str) -> list[str]:
    from somax_plug._src.workloads import NAMES

    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(NAMES)
    bad = [n for n in names if n not in NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown workload(s) {', '.join(bad) or text!r}; choose from {', '.join(NAMES)}")
    return names


def _part_names() -> tuple[str, ...]:
    """The parts, in order (without importing them: ``--help`` stays instant)."""
    return ("planning", "peers", "matvec", "flops", "preset_flops", "paper_presets", "krylov",
            "time_to_accuracy", "shampoo", "kfac", "distributed", "canonical_kfac")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    log = None if args.json else (lambda name: print(f"running {name} ...", flush=True))
    seeds = None if args.seeds is None else list(range(args.seeds))
    report = collect(quick=args.quick, only=args.only, log=log, workloads=args.workloads,
                     out=args.out if args.workloads else None, seeds=seeds)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_table(report)
        _print_workloads(report)
    return 0


def _print_workloads(report: dict[str, Any]) -> None:
    case = report["cases"].get("workloads")
    if not case or "details" not in case:
        return
    from somax_plug._src.workloads.runner import print_report

    for sub in case["details"].values():
        print()
        print_report(sub)
        files = sub.get("files")
        if files:
            print(f"wrote {files['json']} and {files['plot']}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
