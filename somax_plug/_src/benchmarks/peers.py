"""Per-step time against the peers: python-somax's ``sgn_ce`` and ``optax.adam``.

Same configuration in both libraries (python-somax's own benchmark setting): an MLP
784-256-10 (tanh) on random data, batch 256, mean softmax cross-entropy, GGN + CG
with 20 iterations, constant damping ``lam = 1``, warm start on, learning rate 1, no
rho telemetry. ``tol = 0`` so that all 20 iterations run in both (checked), and
python-somax's periodic exact-residual restart is disabled (``stabilise_every=0``)
because our CG has none; with it on (python-somax's default, ``stabilise_every=10``)
python-somax does one extra matvec per restart, recorded as an extra row. Our CG
runs textbook (``negative_curvature="none"``: the GGN is psd, like python-somax's
``assume_spd`` CG).

One timed call is ``steps_per_call`` consecutive steps from the same start, so the
warm start is exercised. The first step of both libraries from the same start is
compared as a correctness check (``max_param_diff``).

``optax.adam`` runs ``jax.value_and_grad`` of the same loss and its update, jitted.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import optax

from somax_plug._src.benchmarks.common import (
    alternate,
    ce_loss,
    init_mlp,
    median,
    mlp,
    random_batch,
    run_steps,
)

TARGET_SOMAX = 0.9
CONFIG = {"sizes": (784, 256, 10), "batch": 256, "maxiter": 20, "lam": 1.0, "tol": 0.0,
          "warm_start": True, "learning_rate": 1.0}
NOT_INSTALLED = "python-somax not installed (pip install somax-plug[bench])"


def somax_available() -> bool:
    """Whether python-somax (module ``somax``) can be imported."""
    try:
        import somax  # noqa: F401
    except Exception:
        return False
    return True


def ours_sgn(cfg: dict[str, Any]) -> Any:
    """Our SGN with the configuration ``cfg`` (see the module docstring)."""
    from somax_plug._src.composition import compose

    return compose(
        "ggn",
        {"name": "cg", "maxiter": cfg["maxiter"], "tol": cfg["tol"],
         "warm_start": cfg["warm_start"], "negative_curvature": "none"},
        predict_fn=mlp, loss="softmax_cross_entropy",
        damping={"name": "constant", "lam": cfg["lam"]},
        learning_rate=cfg["learning_rate"], rho_every_k=0,
    )


def somax_sgn(cfg: dict[str, Any], stabilise_every: int = 0, rho_every_k: int = -1) -> Any:
    """python-somax's ``sgn_ce`` with the same configuration."""
    import somax

    return somax.sgn_ce(
        predict_fn=mlp, lam0=cfg["lam"], tol=cfg["tol"], maxiter=cfg["maxiter"],
        warm_start=cfg["warm_start"], stabilise_every=stabilise_every,
        learning_rate=cfg["learning_rate"], record_rho_every_k=rho_every_k,
    )


class SomaxAdapter:
    """python-somax's ``step(params, batch_dict, state, rng)`` as ``step(p, s, batch, key)``."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self._step = jax.jit(method.step)

    def init(self, params: Any) -> Any:
        return self.method.init(params)

    def step(self, params: Any, state: Any, batch: Any, key: Any = None) -> Any:
        x, y = batch
        key = jax.random.key(0) if key is None else key
        return self._step(params, {"x": x, "y": y}, state, key)


def adam_step(learning_rate: float = 1e-3) -> tuple[Any, Any]:
    """A jitted ``optax.adam`` step on :func:`~somax_plug._src.benchmarks.common.ce_loss`."""
    tx = optax.adam(learning_rate)

    @jax.jit
    def step(params: Any, state: Any, batch: Any, key: Any = None) -> Any:
        loss, grads = jax.value_and_grad(ce_loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return tx, step


def run(quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Median per-step times; ratios ``ours_over_somax_same_config`` and ``..._adam_...``."""
    cfg = dict(CONFIG)
    if smoke:
        cfg.update(sizes=(8, 8, 3), batch=4, maxiter=3)
    repeats = 2 if smoke else (5 if quick else 25)
    n = 2 if smoke else 5
    params = init_mlp(jax.random.key(0), cfg["sizes"])
    batch = random_batch(jax.random.key(1), cfg["batch"], cfg["sizes"][0], cfg["sizes"][-1])
    keys = [jax.random.key(10 + i) for i in range(n)]

    ours = ours_sgn(cfg)
    ours_state = ours.init(params)
    tx, adam = adam_step()
    contenders = {
        "ours": run_steps(ours.step, params, ours_state, batch, n, keys),
        "adam": run_steps(adam, params, tx.init(params), batch, n, keys),
    }
    have_somax = somax_available()
    details: dict[str, Any] = {"config": {**cfg, "sizes": list(cfg["sizes"])},
                               "steps_per_call": n, "repeats": repeats}
    if have_somax:
        import somax

        sm = SomaxAdapter(somax_sgn(cfg))
        sm_default = SomaxAdapter(somax_sgn(cfg, stabilise_every=10))
        contenders["somax"] = run_steps(sm.step, params, sm.init(params), batch, n, keys)
        contenders["somax_stabilise10"] = run_steps(
            sm_default.step, params, sm_default.init(params), batch, n, keys)
        details["somax_version"] = somax.__version__
        # correctness: one step from the same start, and all iterations ran
        p_o, _, info_o = ours.step(params, ours_state, batch, keys[0])
        p_s, _, info_s = sm.step(params, sm.init(params), batch, keys[0])
        details["max_param_diff_first_step"] = max(
            float(abs(a - b).max()) for a, b in
            zip(jax.tree_util.tree_leaves(p_o), jax.tree_util.tree_leaves(p_s), strict=True))
        details["cg_iterations"] = {"ours": int(info_o["solver_iterations"]),
                                    "somax": int(info_s["cg_iters"])}
    else:
        details["somax"] = NOT_INSTALLED

    cpu: dict[str, list[float]] = {}
    times = alternate(contenders, repeats=repeats, warmup=1, cpu=cpu,
                      warmup_s=0.0 if smoke else 3.0)
    per_step = {k: median(v) / n for k, v in times.items()}
    cpu_step = {k: median(v) / n for k, v in cpu.items()}
    details["cpu_ms_per_step"] = {k: 1e3 * v for k, v in cpu_step.items()}
    details["step_ms"] = {k: 1e3 * v for k, v in per_step.items()}
    details["step_ms_min"] = {k: 1e3 * min(v) / n for k, v in times.items()}
    cpu_ratios = details["cpu_time_ratios"] = {
        f"ours_over_{k}": cpu_step["ours"] / cpu_step[k] for k in cpu_step if k != "ours"}
    out: dict[str, Any] = {
        "ours_over_adam_per_step": per_step["ours"] / per_step["adam"],
        "ours_over_somax_same_config": (per_step["ours"] / per_step["somax"])
        if have_somax else None,
        "target_somax": TARGET_SOMAX,
        "details": details,
    }
    out["cpu_time"] = {
        "ours_over_adam_per_step": cpu_ratios["ours_over_adam"],
        "ours_over_somax_same_config": cpu_ratios.get("ours_over_somax"),
    }
    if have_somax:
        details["ours_over_somax_default_stabilise"] = (
            per_step["ours"] / per_step["somax_stabilise10"])
    else:
        out["note"] = NOT_INSTALLED
    return out


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
