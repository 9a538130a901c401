"""Train contenders on a workload: time and steps to target, over seeds, interleaved.

Protocol (:func:`run`):

* for every seed (parameter initialisation, minibatch stream, the methods' keys) every
  contender trains once; the order of the contenders rotates from seed to seed
  (interleaved: none always runs first, and a slow phase of a shared machine hits
  several of them);
* every step gets a fresh minibatch ``workload.batch(seed, step)``, the same for every
  contender; the batch and the step's key are made and put on the device *before* the
  clock starts;
* compilation is excluded: the first steps run on a throw-away copy of the initial
  state (two, or the runner's ``warmup_steps``: kfac-jax compiles other variants of
  its step at the steps that update its inverses and its damping, so it warms up over
  a whole period); ``compile_s`` records the first call, compilation included, and
  the evaluation is compiled before the clock starts;
* the clock counts the steps only, each timed to ``jax.block_until_ready`` of the new
  parameters; the held-out evaluations are not timed. An evaluation follows the first
  step at which ``budget.eval_every_s`` seconds of training clock or
  ``budget.eval_every_steps`` steps have passed since the last one (the clock-based
  rule gives every contender the same time resolution, however long its steps);
* a run stops at the first evaluation that reaches the target (its clock and step
  count are the time and steps to target), at ``budget.max_steps`` steps or
  ``budget.max_seconds`` of training clock (``not reached``), when it diverges (a
  non-finite minibatch or held-out loss, or a held-out loss above
  ``DIVERGE_FACTOR`` times the initial one at ``DIVERGE_PATIENCE`` evaluations in a
  row: ``diverged``), or when it raises
  (``failed``, with the error). Every run records its last finite losses;
* a contender whose library is missing is ``not installed`` (reported, not run); a
  preset whose compiled step would need more than half the machine's memory is
  ``failed`` with the amount (checked once per workload, before it could exhaust the
  machine).

Every contender's runner is built once and reused by every seed, so it compiles
once (its first run's ``compile_s``; later seeds find the compiled step cached).

Per contender (:func:`summarize`): medians over seeds of the time and steps to target
(a seed that did not reach it counts as infinitely slow, so the median exists only
when most seeds reached the target), of the final held-out metrics and of the time
per step; the compilation time is the largest (the first run's). The best Adam is
the grid point with the smallest median time to target (then the best final metric);
the best preset likewise among the presets. ``ratios`` are the best preset's median
time over the best Adam's, over python-somax's and over kfac-jax's (null where either
did not reach the target; ``ratio_upper_bounds`` then bounds a ratio from above
when only the preset reached it, since a run that did not would have needed more than
its clock).
"""

from __future__ import annotations

import json
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from somax_plug._src.workloads.base import Budget, Workload
from somax_plug._src.workloads.contenders import Contender, Infeasible, NotInstalled

DIVERGE_FACTOR = 3.0
DIVERGE_PATIENCE = 5
"""A held-out loss above ``DIVERGE_FACTOR`` times the initial one at
``DIVERGE_PATIENCE`` consecutive evaluations counts as divergence (a transient spike
after a large first step does not)."""

STATUSES = ("reached", "not reached", "diverged", "failed", "not installed")

PEERS = {"python-somax": "python-somax sgn_ce", "kfac-jax": "kfac-jax"}


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _copy(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, tree)


class _Raising:
    """Stands for a runner whose construction raised ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


# ------------------------------------------------------------------------ one run
def train_run(
    workload: Workload,
    contender: Contender,
    seed: int,
    budget: Budget | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    runner: Any = None,
) -> dict[str, Any]:
    """Train one contender from one seed; the run's record (see the module docstring)."""
    budget = budget or workload.budget
    rec: dict[str, Any] = {
        "name": contender.name, "family": contender.family, "seed": seed, "status": None,
        "error": None, "steps": 0, "wall_clock_s": 0.0, "compile_s": None,
        "time_to_target_s": None, "steps_to_target": None, "final": None,
        "last_train_loss": None, "last_heldout_loss": None, "step_ms": None,
        "history": [], "details": {}, "warmup_s": None,
    }
    try:
        if isinstance(runner, _Raising):
            raise runner.exc
        runner = runner if runner is not None else contender.build(workload, seed)
    except NotInstalled as exc:
        rec.update(status="not installed", error=str(exc))
        return rec
    except Exception as exc:
        rec.update(status="failed", error=_error(exc))
        return rec
    if hasattr(runner, "seed"):
        runner.seed = seed
    for attr in ("version", "patch"):
        if getattr(runner, attr, None) is not None:
            rec["details"][attr] = getattr(runner, attr)
    if hasattr(runner, "describe"):
        rec["details"].update(runner.describe())

    base_key = jax.random.key(seed)

    def inputs(i: int) -> tuple[Any, Any]:
        batch = jax.block_until_ready(workload.batch(seed, i))
        return batch, jax.block_until_ready(jax.random.fold_in(base_key, i))

    history: list[dict[str, Any]] = rec["history"]

    def evaluate(step: int, clock: float, params: Any, train_loss: float | None) -> dict:
        m = workload.evaluate(params)
        h = {"step": step, "wall_clock_s": clock, "loss": m["loss"],
             "accuracy": m["accuracy"], "train_loss": train_loss}
        history.append(h)
        if _finite(m["loss"]):
            rec["last_heldout_loss"] = m["loss"]
        if on_eval is not None:
            on_eval(h)
        return h

    params = state = None
    try:
        params = workload.init_params(base_key)
        state = runner.init(params)
        b0, k0 = inputs(0)
        t = time.perf_counter()
        if hasattr(runner, "precheck"):  # may compile the step ahead of time
            rec["details"].update(runner.precheck(params, state, b0, k0))
        # on copies: some libraries (kfac-jax) donate their arguments
        p1, s1, _ = runner.step(_copy(params), _copy(state), b0, k0)
        jax.block_until_ready(p1)
        rec["compile_s"] = time.perf_counter() - t
        for i in range(1, getattr(runner, "warmup_steps", 2)):
            b1, k1 = inputs(i)
            p1, s1, _ = runner.step(p1, s1, b1, k1)
            jax.block_until_ready(p1)
        rec["warmup_s"] = time.perf_counter() - t
        del p1, s1
    except Infeasible as exc:
        rec.update(status="failed", error=f"infeasible: {exc}")
        return rec
    except Exception as exc:
        rec.update(status="failed", error=_error(exc))
        rec["details"]["traceback"] = traceback.format_exc(limit=4)[-2000:]
        return rec

    first = evaluate(0, 0.0, params, None)
    initial_loss = first["loss"]
    clock, done, high = 0.0, 0, 0
    last_eval_clock, last_eval_step = 0.0, 0
    status = None
    if workload.target.reached(first):
        status = "reached"
        rec.update(time_to_target_s=0.0, steps_to_target=0)
    try:
        while status is None:
            batch, key = inputs(done)
            t = time.perf_counter()
            params, state, loss = runner.step(params, state, batch, key)
            jax.block_until_ready(params)
            clock += time.perf_counter() - t
            done += 1
            loss = None if loss is None else float(loss)
            if loss is not None and not math.isfinite(loss):
                status = "diverged"
                evaluate(done, clock, params, loss)
                break
            if loss is not None:
                rec["last_train_loss"] = loss
            end = done >= budget.max_steps or clock >= budget.max_seconds
            due = (clock - last_eval_clock >= budget.eval_every_s
                   or done - last_eval_step >= budget.eval_every_steps)
            if not (due or end):
                continue
            h = evaluate(done, clock, params, loss)
            last_eval_clock, last_eval_step = clock, done
            high = high + 1 if _finite(h["loss"]) and h["loss"] > (
                DIVERGE_FACTOR * initial_loss) else 0
            if not _finite(h["loss"]) or high >= DIVERGE_PATIENCE:
                status = "diverged"
            elif workload.target.reached(h):
                status = "reached"
                rec.update(time_to_target_s=clock, steps_to_target=done)
            elif end:
                status = "not reached"
    except Exception as exc:
        status = "failed"
        rec["error"] = _error(exc)
    final = history[-1]
    rec.update(status=status, steps=done, wall_clock_s=clock,
               step_ms=1e3 * clock / done if done else None,
               final={"loss": final["loss"], "accuracy": final["accuracy"]})
    return rec


# ------------------------------------------------------------------- many runs
def _median_or_none(values: list[float | None]) -> float | None:
    """Median with None as +inf; None when the median is infinite (or no values)."""
    if not values:
        return None
    m = statistics.median([math.inf if v is None else v for v in values])
    return None if math.isinf(m) else float(m)


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if _finite(v)]
    return float(statistics.median(values)) if values else None


def summarize(records: list[dict[str, Any]], higher_is_better: bool) -> dict[str, Any]:
    """Medians over a contender's runs (see the module docstring)."""
    statuses = [r["status"] for r in records]
    counts = {s: statuses.count(s) for s in STATUSES if s in statuses}
    ran = [r for r in records if r["status"] != "not installed"]
    bad = [r for r in ran if r["status"] in ("diverged", "failed")]
    out: dict[str, Any] = {
        "runs": len(records),
        "statuses": counts,
        "reached": counts.get("reached", 0),
        "median_time_to_target_s": _median_or_none([r["time_to_target_s"] for r in ran]),
        "median_steps_to_target": _median_or_none([r["steps_to_target"] for r in ran]),
        "median_final_loss": _median([(r["final"] or {}).get("loss") for r in ran]),
        "median_final_accuracy": _median([(r["final"] or {}).get("accuracy") for r in ran]),
        "median_step_ms": _median([r["step_ms"] for r in ran]),
        "compile_s": max((r["compile_s"] for r in ran if r["compile_s"] is not None),
                         default=None),
        "median_steps": _median([r["steps"] for r in ran]),
        "errors": sorted({r["error"] for r in records if r["error"]}),
        # the last finite losses, of a diverged or failed run where there is one
        "last_train_loss": next((r["last_train_loss"] for r in reversed(bad or records)
                                 if r["last_train_loss"] is not None), None),
        "last_heldout_loss": next((r["last_heldout_loss"] for r in reversed(bad or records)
                                   if r["last_heldout_loss"] is not None), None),
    }
    if not ran:
        out["status"] = "not installed"
    elif out["median_time_to_target_s"] is not None:
        out["status"] = "reached"
    else:
        worst = [s for s in ("failed", "diverged", "not reached") if s in counts]
        out["status"] = worst[0] if worst else "not reached"
    if len(counts) > 1:  # mixed outcomes: say which
        out["status"] += " (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")"
    out["higher_is_better"] = higher_is_better
    return out


def _best(summary: dict[str, dict[str, Any]], names: list[str], metric: str,
          higher: bool) -> str | None:
    """Smallest median time to target, then the best median final metric."""
    if not names:
        return None
    reached = [n for n in names if summary[n]["median_time_to_target_s"] is not None]
    if reached:
        return min(reached, key=lambda n: summary[n]["median_time_to_target_s"])
    key = f"median_final_{metric}"
    scored = [n for n in names if summary[n][key] is not None]
    if not scored:
        return None
    return (max if higher else min)(scored, key=lambda n: summary[n][key])


def run(
    workload: Workload,
    contenders: Sequence[Contender],
    seeds: Sequence[int] = (0, 1, 2),
    budget: Budget | None = None,
    on_eval: Callable[[str, int, dict[str, Any]], None] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Every contender from every seed, interleaved; the report (JSON-serialisable).

    Args:
        on_eval: ``on_eval(name, seed, history_record)`` after every evaluation.
        on_run: called with every finished run's record.
        on_start: ``on_start(name, seed)`` before every run.
    """
    from somax_plug._src.demo import machine_info

    t0 = time.perf_counter()
    load_before = _load_average()
    budget = budget or workload.budget
    contenders = list(contenders)
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
    settled: dict[str, dict[str, Any]] = {}  # not installed / infeasible: not rerun
    built: dict[str, Any] = {}  # one runner per contender: compiled once, reused by seeds
    for r, seed in enumerate(seeds):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            if c.name not in built and c.name not in settled:
                try:
                    built[c.name] = c.build(workload, seed)
                except Exception as exc:
                    settled[c.name] = train_run(workload, c, seed, budget,
                                                runner=_Raising(exc))
            if c.name in settled:
                rec = {**settled[c.name], "seed": seed}
            else:
                if on_start is not None:
                    on_start(c.name, seed)
                cb = None if on_eval is None else (lambda h, n=c.name, s=seed: on_eval(n, s, h))
                rec = train_run(workload, c, seed, budget, on_eval=cb, runner=built[c.name])
                if str(rec["error"]).startswith("infeasible"):
                    settled[c.name] = rec
            runs[c.name].append(rec)
            if on_run is not None:
                on_run(rec)
    higher = workload.target.higher_is_better
    summary = {name: summarize(recs, higher) for name, recs in runs.items()}
    family = {c.name: c.family for c in contenders}
    metric = workload.target.metric
    best = {
        fam: _best(summary, [n for n in runs if family[n] == fam], metric, higher)
        for fam in ("adam", "sophia", "preset")
    }

    def t(name: str | None) -> float | None:
        return None if name is None or name not in summary else (
            summary[name]["median_time_to_target_s"])

    def ratio(other: str | None) -> float | None:
        a, b = t(best["preset"]), t(other)
        return None if a is None or not b else a / b

    others = {"best_preset_over_adam": best["adam"],
              "best_preset_over_somax": PEERS["python-somax"],
              "best_preset_over_kfac": PEERS["kfac-jax"],
              "best_preset_over_sophia": best["sophia"]}
    ratios = {key: ratio(other) for key, other in others.items()}

    def bound(other: str | None) -> float | None:
        """``ratio < bound`` when the best preset reached the target and ``other`` did not
        (a run that did not reach it would need more than its clock; never, if it
        diverged or failed)."""
        a = t(best["preset"])
        if a is None or other not in runs or t(other) is not None:
            return None
        ran = [r for r in runs[other] if r["status"] != "not installed"]
        if not ran:
            return None
        lower = statistics.median([
            math.inf if r["status"] in ("diverged", "failed") else
            (r["time_to_target_s"] if r["time_to_target_s"] is not None else r["wall_clock_s"])
            for r in ran])
        return 0.0 if math.isinf(lower) else (a / lower if lower > 0 else None)

    ratio_upper_bounds = {key: bound(other) for key, other in others.items()
                          if ratios[key] is None and bound(other) is not None}
    patches = sorted({r["details"]["patch"] for recs in runs.values() for r in recs
                      if r["details"].get("patch")})
    return {
        "title": workload.title,
        "workload": workload.to_dict(),
        "machine": machine_info(),
        "seeds": list(seeds),
        "budget": budget.to_dict(),
        "protocol": "interleaved over seeds, fresh minibatch every step (same for all), "
                    "compilation and evaluation excluded from the clock, stop at target",
        "contenders": [c.to_dict() for c in contenders],
        "summary": summary,
        "best": best,
        "ratios": ratios,
        "ratio_upper_bounds": ratio_upper_bounds,
        "patches": patches,
        "runs": runs,
        "runtime_s": time.perf_counter() - t0,
        "load_average": {"before": load_before, "after": _load_average()},
    }


def _load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (other jobs sharing the CPUs)."""
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # pragma: no cover
        return None


# -------------------------------------------------------------------------- output
def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


HEADERS = ["contender", "status", "reached", "steps to tgt", "s to tgt", "final loss",
           "final acc", "ms/step", "compile s"]
"""Columns of :func:`table_rows`: status, seeds that reached the target, then medians over
seeds of the steps and wall-clock seconds to target (``-``: not reached on most seeds),
the final held-out loss and accuracy, the time per step, and the compilation time."""


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per contender (strings), best Adam and best preset marked with ``*``."""
    rows = []
    best = set(v for k, v in report["best"].items() if k in ("adam", "preset") and v)
    for c in report["contenders"]:
        s = report["summary"][c["name"]]
        status = s["status"]
        if s["status"] in ("failed", "diverged", "not installed") and s["errors"]:
            status += f": {s['errors'][0]}"
        if ("failed" in s["status"] or "diverged" in s["status"]) and (
                s["last_heldout_loss"] is not None):
            status += f", last held-out loss {s['last_heldout_loss']:.4g}"
        ran = s["runs"] - s["statuses"].get("not installed", 0)
        rows.append([
            c["name"] + (" *" if c["name"] in best else ""),
            status,
            f"{s['reached']}/{ran}" if ran else "-",
            _fmt(s["median_steps_to_target"], ".0f"),
            _fmt(s["median_time_to_target_s"], ".2f"),
            _fmt(s["median_final_loss"], ".4f"),
            _fmt(s["median_final_accuracy"], ".4f"),
            _fmt(s["median_step_ms"], ".1f"),
            _fmt(s["compile_s"], ".1f"),
        ])
    return rows


def print_report(report: dict[str, Any], console: Any = None) -> None:
    """The summary table and the ratios (rich when available)."""
    w = report["workload"]
    title = (f"{report['title']}: target {w['target']['metric']} {w['target']['op']} "
             f"{w['target']['value']:g}, medians over seeds {report['seeds']}")
    bounds = report.get("ratio_upper_bounds", {})
    lines = [f"{k} = {_fmt(v, '.3f')}" + (f" (< {bounds[k]:.3f}: only the preset reached the "
                                          "target)" if k in bounds else "")
             for k, v in report["ratios"].items()]
    lines.append(f"best adam: {report['best']['adam']} (grid {w['adam_grid']}), "
                 f"best preset: {report['best']['preset']}")
    lines += [f"note: {p}" for p in report["patches"]]
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(title)
        for row in table_rows(report):
            print("  ".join(row))
        print("\n".join(lines))
        return
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
    table = Table(title=escape(title))
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("contender", "status") else "right",
                         overflow="fold", no_wrap=h != "status")
    for row in table_rows(report):
        table.add_row(*(escape(c) for c in row))
    console.print(table)
    for line in lines:
        console.print(escape(line))


def plot(report: dict[str, Any], path: Path) -> None:
    """2x2: held-out loss and accuracy against wall-clock and against steps (all seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
    cmap = plt.get_cmap("tab20")
    color = lambda i: cmap((2 * i) % 20 + (i // 10) % 2)  # saturated first, then pale
    best_adam = report["best"].get("adam")
    target = report["workload"]["target"]
    for i, c in enumerate(report["contenders"]):
        name = c["name"]
        faint = c["family"] == "adam" and name != best_adam
        style = {"color": color(i), "lw": 0.8 if faint else 1.4,
                 "ls": ":" if faint else "-", "alpha": 0.85}
        for j, rec in enumerate(report["runs"][name]):
            h = rec["history"]
            if not h:
                continue
            label = name if j == 0 else None
            t = [x["wall_clock_s"] for x in h]
            s = [x["step"] for x in h]
            for row, key in enumerate(("loss", "accuracy")):
                y = [x[key] for x in h]
                axes[row, 0].plot(t, y, label=label, **style)
                axes[row, 1].plot(s, y, **style)
    axes[0, 0].set_ylabel("held-out loss (nats" + (" per character)" if
                                                    report["workload"]["name"] == "lm"
                                                    else ")"))
    axes[1, 0].set_ylabel("held-out accuracy" + (" (next character)" if
                                                  report["workload"]["name"] == "lm" else ""))
    start = [r["history"][0]["loss"] for recs in report["runs"].values() for r in recs
             if r["history"]]
    for ax in axes[0]:
        ax.set_yscale("log")
        if start:
            ax.set_ylim(top=1.5 * max(start))
    row = 0 if target["metric"] == "loss" else 1
    for ax in axes[row]:
        ax.axhline(target["value"], color="grey", lw=0.8, ls="--")
    if target["metric"] == "accuracy":
        for ax in axes[1]:
            ax.set_ylim(max(0.0, target["value"] - 0.25), 1.0)
    for ax in axes[:, 0]:
        ax.set_xlabel("wall-clock (s, compilation and evaluation excluded)")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0)
    for ax in axes[:, 1]:
        ax.set_xlabel("steps")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{report['title']}, seeds {report['seeds']} "
                 f"(dashed: target; dotted: other Adam learning rates)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``out/<workload>_results.json`` and ``out/<workload>_training.png``."""
    out.mkdir(parents=True, exist_ok=True)
    name = report["workload"]["name"]
    js, png = out / f"{name}_results.json", out / f"{name}_training.png"
    js.write_text(json.dumps(report, indent=2, default=str))
    plot(report, png)
    return js, png
