"""Wall-clock to 97% test accuracy on digits: our best preset vs Adam and python-somax.

Reuses the main job's training loop (:func:`somax_plug._src.demo.train`: same data split,
model, minibatches, evaluation after every step, compilation excluded from the
clock). Contenders:

* our second-order presets with the demo's tuned overrides
  (:data:`somax_plug._src.demo.METHODS`; ``--quick``: ``sgn`` only);
* ``optax.adam`` with the demo's learning rate;
* python-somax's ``sgn_ce`` with the same hyperparameters as our ``sgn`` entry (lam,
  CG iterations and tolerance, learning rate, no warm start, rho every 10 steps, no
  residual restarts), when python-somax is installed.

Every contender trains ``repeats`` times (rounds alternate the contenders; each
stops at 97%); the time to 97% is the median over repeats. The *best preset* is the
one of ours with the smallest median; the ratios are its time over Adam's and over
python-somax's.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

import jax

from somax_plug._src.benchmarks.peers import NOT_INSTALLED, SomaxAdapter, somax_available
from somax_plug._src.demo import METHODS, MethodConfig, load_digits_data, make_runner, mlp, train

SOMAX_CFG = MethodConfig(
    "python-somax sgn_ce", "external", "sgn_ce",
    {"lam0": 0.1, "maxiter": 10, "tol": 1e-4, "warm_start": False, "stabilise_every": 0,
     "learning_rate": 1.0, "record_rho_every_k": 10},
    steps=METHODS["sgn"].steps, batch_size=METHODS["sgn"].batch_size,
)
"""python-somax on the digits setup, configured like our ``sgn`` entry."""


class SomaxRunner:
    """python-somax's method as a :class:`somax_plug._src.demo.Runner`."""

    def __init__(self, overrides: dict[str, Any], seed: int = 0) -> None:
        import somax

        self._adapter = SomaxAdapter(somax.sgn_ce(predict_fn=mlp, **overrides))
        self._key = jax.random.key(seed)

    def init(self, params: Any) -> Any:
        return self._adapter.init(params)

    def step(self, params: Any, state: Any, batch: Any, i: int) -> Any:
        params, state, info = self._adapter.step(params, state, batch,
                                                 jax.random.fold_in(self._key, i))
        return params, state, info


def _median(values: list[float | None]) -> float | None:
    """Median over repeats; None if any repeat never reached the target."""
    if not values or any(v is None for v in values):
        return None
    return float(statistics.median(values))


def run(quick: bool = False, smoke: bool = False, target: float = 0.97) -> dict[str, Any]:
    """Median time to ``target`` per contender; ratios for the best preset."""
    data = load_digits_data()
    presets = ["sgn"] if (quick or smoke) else [
        n for n, c in METHODS.items() if c.kind == "somax_plug"]
    configs = [METHODS[n] for n in presets] + [METHODS["adam"]]
    runners = {c.name: make_runner(c) for c in configs}
    have_somax = somax_available()
    if have_somax:
        configs.append(SOMAX_CFG)
        runners[SOMAX_CFG.name] = SomaxRunner(SOMAX_CFG.overrides)
    repeats = 1 if smoke else (3 if quick else 7)
    steps_cap = 3 if smoke else None
    times: dict[str, list[float | None]] = {c.name: [] for c in configs}
    steps: dict[str, list[int | None]] = {c.name: [] for c in configs}
    compile_s: dict[str, float] = {}
    for r in range(repeats):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for cfg in order:
            out = train(cfg, data, steps=steps_cap, runner=runners[cfg.name], stop_at=target)
            pct = round(target * 100)
            times[cfg.name].append(out["summary"][f"time_to_{pct}_s"])
            steps[cfg.name].append(out["summary"][f"steps_to_{pct}"])
            compile_s.setdefault(cfg.name, out["summary"]["compile_s"])
    medians = {name: _median(v) for name, v in times.items()}
    reached = {n: medians[n] for n in presets if medians[n] is not None}
    best = min(reached, key=reached.get) if reached else None
    best_t = reached.get(best) if best else None

    def ratio(other: str) -> float | None:
        if best_t is None or medians.get(other) in (None, 0):
            return None
        return best_t / medians[other]

    return {
        "time_to_97_over_adam": ratio("adam"),
        "time_to_97_over_somax": ratio(SOMAX_CFG.name) if have_somax else None,
        "best_preset": best,
        "details": {
            "target_accuracy": target,
            "repeats": repeats,
            "median_time_to_target_s": medians,
            "times_s": times,
            "steps_to_target": steps,
            "compile_s_first_run": compile_s,
            "configs": {c.name: c.to_dict() for c in configs},
            "somax": None if have_somax else NOT_INSTALLED,
        },
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
