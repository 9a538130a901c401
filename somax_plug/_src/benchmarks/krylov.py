"""Krylov loops and the automatic solver choice, measured.

Three parts, each a dict in :func:`run`'s result:

``loop_forms``
    CG on a GGN in every loop form of :class:`~somax_plug.builtin.solvers.CG`
    (``while``, ``scan``, ``scan`` partially unrolled, ``unroll``, ``auto``) against
    the same number of GGN-vector products run in straight-line code
    (``products_unrolled``, the floor) and inside a ``lax.fori_loop``
    (``products_fori``, the reported observation), on three models with batch 64:
    a tanh MLP 784-256-10 (203,530 parameters), and a plain-JAX 2D CNN
    (``lax.conv_general_dilated``: 1->8 3x3, tanh, 8->8 3x3 stride 2, tanh, dense
    512->10; 5,776 parameters) in the NCHW/OIHW layout (``lax``'s default) and in
    NHWC/HWIO. Each contender is one jitted function of ``(params, batch, v)``
    that linearizes the model (as a step does) and then runs its products, so every
    row includes one linearization. CG runs with ``tol=0`` (all ``maxiter = 10``
    iterations) and, in the ``early`` cases, with ``maxiter = 16`` and the loosest
    tolerance that needs at least 6 iterations (``products_unrolled_maxiter``: the
    16 products ``"unroll"`` runs).

``crossover``
    The preset ``gauss_newton_lm`` (solver ``auto``) against the same composition
    with ``cg``, ``row_cholesky``, ``row_cg`` and ``direct``, per step
    (``method.step``, the same start every call, three steps in), on a full-batch
    regression (tanh MLP 8-24-1, 241 parameters, mse) with more rows than
    parameters (R = 560, 2.3 per parameter) and with fewer (R = 100, 0.4 per
    parameter). ``auto_over_cg`` and ``auto_over_best_of_cg_and_row_space`` are the
    targets (<= 1.2). A contender over 5x slower than the fastest is timed in a
    group of its own (``timed_apart``).

``conv_cg_step``
    The conv net's CG step: the default ``cg`` (``loop="auto"``) over the same
    products run unrolled, from ``loop_forms`` (target <= 1.2), and one whole
    training step (``ggn + cg``, constant damping) with ``loop="auto"`` against
    ``loop="while"``.

Protocol (:func:`~somax_plug._src.benchmarks.common.alternate`): contenders
interleaved in a rotating order, each warmed up (compilation excluded: the first
call's time is reported apart as ``compile_s``), medians over ``repeats`` rounds,
every call blocked with ``jax.block_until_ready``.

Run: ``python benchmarks/bench_krylov.py [--quick]`` prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from somax_plug._src.benchmarks.common import alternate, init_mlp, machine_info, median, mlp
from somax_plug._src.model import make_model
from somax_plug._src.operators import damped_mv
from somax_plug._src.resources import Resources
from somax_plug.builtin.curvature import GGN
from somax_plug.builtin.resources import PROVIDERS
from somax_plug.builtin.solvers import CG

TARGET = 1.2
BATCH = 64
LAM = 1e-3
PLANNED = ("linearization", "outputs", "output_hessian")

# ------------------------------------------------------------------ models


def conv_net(layout: str = "NCHW") -> tuple[Callable[..., Any], Any, Any]:
    """``(predict, params, inputs)`` of a small 2D CNN on 16 x 16 images, batch 64."""
    k = jax.random.split(jax.random.key(0), 4)
    if layout == "NCHW":
        dn = ("NCHW", "OIHW", "NCHW")
        c1, c2, x_shape = (8, 1, 3, 3), (8, 8, 3, 3), (BATCH, 1, 16, 16)
    else:
        dn = ("NHWC", "HWIO", "NHWC")
        c1, c2, x_shape = (3, 3, 1, 8), (3, 3, 8, 8), (BATCH, 16, 16, 1)

    def predict(p: Any, x: jax.Array) -> jax.Array:
        conv = jax.lax.conv_general_dilated
        h = jnp.tanh(conv(x, p["c1"], (1, 1), "SAME", dimension_numbers=dn) + p["b1"])
        h = jnp.tanh(conv(h, p["c2"], (2, 2), "SAME", dimension_numbers=dn))
        return h.reshape(h.shape[0], -1) @ p["w"]

    bshape = (1, 8, 1, 1) if layout == "NCHW" else (1, 1, 1, 8)
    params = {
        "c1": jax.random.normal(k[0], c1) / 3.0,
        "b1": jnp.zeros(bshape),
        "c2": jax.random.normal(k[1], c2) / 8.5,
        "w": jax.random.normal(k[2], (512, 10)) / 22.6,
    }
    return predict, params, jax.random.normal(k[3], x_shape)


def models() -> dict[str, tuple[Callable[..., Any], Any, Any]]:
    """The three models of ``loop_forms``."""
    k = jax.random.split(jax.random.key(1), 2)
    return {
        "mlp_784_256_10": (mlp, init_mlp(k[0]), jax.random.normal(k[1], (BATCH, 784))),
        "cnn_nchw": conv_net("NCHW"),
        "cnn_nhwc": conv_net("NHWC"),
    }


def _labels() -> jax.Array:
    return jax.random.randint(jax.random.key(2), (BATCH,), 0, 10)


def _operator(model: Any, params: Any, batch: Any) -> Any:
    providers = {name: PROVIDERS[name] for name in PLANNED}
    res = Resources(model, params, batch, None, providers, planned=set(PLANNED))
    return GGN().build(res)


# ------------------------------------------------------------------ loop forms


def _contenders(model: Any, n_products: int, solvers: dict[str, CG]) -> dict[str, Any]:
    """Jitted ``(params, batch, v) -> pytree`` functions: products and CG solves."""

    def unrolled(params: Any, batch: Any, v: Any) -> Any:
        op = _operator(model, params, batch)
        for _ in range(n_products):  # normalised so the chain stays finite
            v = jax.tree_util.tree_map(lambda a: a * 0.1, damped_mv(op, LAM, v))
        return v

    def fori(params: Any, batch: Any, v: Any) -> Any:
        op = _operator(model, params, batch)

        def body(_: Any, v: Any) -> Any:
            return jax.tree_util.tree_map(lambda a: a * 0.1, damped_mv(op, LAM, v))

        return jax.lax.fori_loop(0, n_products, body, v)

    out = {"products_unrolled": jax.jit(unrolled), "products_fori": jax.jit(fori)}
    for name, solver in solvers.items():

        def solve(params: Any, batch: Any, v: Any, solver: CG = solver) -> Any:
            op = _operator(model, params, batch)
            return solver.solve(op, v, LAM, None, {}, ())[:2]

        out[name] = jax.jit(solve)
    return out


def _solvers(tol: float, maxiter: int) -> dict[str, CG]:
    kw = {"tol": tol, "maxiter": maxiter}
    return {
        "cg_while": CG(loop="while", **kw),
        "cg_scan": CG(loop="scan", **kw),
        "cg_scan_unroll2": CG(loop="scan", unroll=2, **kw),
        "cg_unroll": CG(loop="unroll", **kw),
        "cg_auto": CG(loop="auto", **kw),
    }


def _iterations(model: Any, params: Any, batch: Any, v: Any, solver: CG) -> int:
    """The iterations ``solver`` runs on this GGN system."""

    def solve(p: Any, b: Any, v: Any) -> Any:
        return solver.solve(_operator(model, p, b), v, LAM, None, {}, ())[1]

    return int(jax.jit(solve)(params, batch, v).iterations)


def loop_case(name: str, predict: Any, params: Any, x: Any, tol: float, maxiter: int,
              repeats: int) -> dict[str, Any]:
    """One row of ``loop_forms``: every contender's median ms and its ratio to the floor."""
    model = make_model(predict, "softmax_cross_entropy")
    batch = (x, _labels())
    v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * 1e-2, params)
    solvers = _solvers(tol, maxiter)
    iterations = _iterations(model, params, batch, v, solvers["cg_while"])
    fns = _contenders(model, iterations, solvers)
    if iterations < maxiter:  # what "unroll" runs: its whole budget
        fns["products_unrolled_maxiter"] = _contenders(model, maxiter, {})["products_unrolled"]
    args = (params, batch, v)
    compile_s = {}
    for key, fn in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        compile_s[key] = round(time.perf_counter() - t, 3)
    iters = {k: int(fns[k](*args)[1].iterations) for k in solvers}
    times = alternate({k: (lambda fn=fn: fn(*args)) for k, fn in fns.items()}, repeats=repeats,
                      warmup=2, warmup_s=2.0)
    ms = {k: round(median(t) * 1e3, 3) for k, t in times.items()}
    floor = ms["products_unrolled"]
    return {
        "case": name,
        "parameters": int(sum(np.size(a) for a in jax.tree_util.tree_leaves(params))),
        "tol": tol,
        "maxiter": maxiter,
        "iterations": iterations,
        "iterations_by_form": iters,
        "ms": ms,
        "over_products_unrolled": {k: round(t / floor, 3) for k, t in ms.items()},
        "compile_s": compile_s,
        "auto_chose": solvers["cg_auto"].recorded_choices(),
    }


def loop_forms(repeats: int, quick: bool) -> list[dict[str, Any]]:
    """Per model: CG running its whole budget of 10 (``tol=0``) and, unless ``quick``,
    CG stopping at about half of a budget of 16 (the loosest tol that needs >= 6)."""
    rows = []
    for name, (predict, params, x) in models().items():
        rows.append(loop_case(name, predict, params, x, 0.0, 10, repeats))
        if not quick:
            model = make_model(predict, "softmax_cross_entropy")
            batch = (x, _labels())
            v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * 1e-2, params)
            for tol in (3e-1, 1e-1, 5e-2, 2e-2, 1e-2, 5e-3):
                need = _iterations(model, params, batch, v, CG(tol=tol, maxiter=16, loop="while"))
                if need >= 6:
                    break
            rows.append(loop_case(f"{name}_early", predict, params, x, tol, 16, repeats))
    return rows


# ------------------------------------------------------------------ crossover


def _regression(rows: int) -> tuple[Any, Any, Any]:
    """A tanh MLP 8-24-1 (241 parameters) and ``rows`` examples of a smooth target."""
    k = jax.random.split(jax.random.key(3), 4)
    params = {
        "w1": jax.random.normal(k[0], (8, 24)) / jnp.sqrt(8.0),
        "b1": jnp.zeros(24),
        "w2": jax.random.normal(k[1], (24, 1)) / jnp.sqrt(24.0),
        "b2": jnp.zeros(1),
    }
    x = jax.random.normal(k[2], (rows, 8))
    y = jnp.sin(x @ jax.random.normal(k[3], (8, 1)))

    def predict(p: Any, x: jax.Array) -> jax.Array:
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    return predict, params, (x, y)


def crossover_case(rows: int, repeats: int, steps: int = 3) -> dict[str, Any]:
    """``gauss_newton_lm`` (auto) vs the same composition with each fixed solver."""
    from somax_plug import compose

    predict, params, batch = _regression(rows)
    n = int(sum(np.size(a) for a in jax.tree_util.tree_leaves(params)))
    methods = {
        "auto": compose(preset="gauss_newton_lm", predict_fn=predict, loss="mse"),
        "cg": compose(preset="gauss_newton_lm", solver="cg", predict_fn=predict, loss="mse"),
        "row_cholesky": compose(preset="gauss_newton_lm", solver="row_cholesky",
                                predict_fn=predict, loss="mse"),
        "row_cg": compose(preset="gauss_newton_lm", solver="row_cg", predict_fn=predict,
                          loss="mse"),
        "direct": compose(preset="gauss_newton_lm", solver="direct", predict_fn=predict,
                          loss="mse"),
    }
    states = {k: m.init(params) for k, m in methods.items()}
    # the same start every call: a few steps in, so lambda has moved off its init
    starts = {}
    for k, m in methods.items():
        p, s = params, states[k]
        for i in range(steps):
            p, s, _ = m.step(p, s, batch, jax.random.key(i))
        starts[k] = (p, s)
    info = {}
    for k, m in methods.items():
        _, _, i = m.step(*starts[k], batch, jax.random.key(0))
        info[k] = {"iterations": int(i["solver_iterations"]), "loss": float(i["loss"])}
    calls = {k: (lambda m=m, k=k: m.step(*starts[k], batch, jax.random.key(0))[0])
             for k, m in methods.items()}
    # a contender 5x slower than the fastest is timed apart: interleaved, whoever
    # follows it in the rotation would pay for the caches and threads it disturbed
    once = alternate(calls, repeats=3, warmup=2, warmup_s=2.0)
    fastest = min(median(t) for t in once.values())
    heavy = {k for k, t in once.items() if median(t) > 5 * fastest}
    times = alternate({k: c for k, c in calls.items() if k not in heavy}, repeats=repeats,
                      warmup=2, warmup_s=2.0)
    if heavy:
        times.update(alternate({k: calls[k] for k in heavy}, repeats=max(3, repeats // 3)))
    ms = {k: round(median(t) * 1e3, 4) for k, t in times.items()}
    best_two = min(ms["cg"], ms["row_cholesky"], ms["row_cg"])
    return {
        "n": n,
        "R": rows,
        "rows_per_parameter": round(rows / n, 2),
        "ms_per_step": ms,
        "timed_apart": sorted(heavy),
        "auto_chose": methods["auto"].plan.component("solver").instance.recorded_choices(),
        "solver_info": info,
        "auto_over_cg": round(ms["auto"] / ms["cg"], 3),
        "auto_over_best_of_cg_and_row_space": round(ms["auto"] / best_two, 3),
        "auto_over_best": round(ms["auto"] / min(ms.values()), 3),
    }


# ------------------------------------------------------------------ conv step


def conv_step(repeats: int) -> dict[str, Any]:
    """A whole training step (ggn + cg, maxiter 10) on the NCHW conv net, auto vs while."""
    from somax_plug import compose

    predict, params, x = conv_net("NCHW")
    batch = (x, _labels())
    methods = {
        loop: compose("ggn", {"name": "cg", "maxiter": 10, "tol": 1e-5, "loop": loop},
                      damping={"name": "constant", "lam": LAM}, predict_fn=predict,
                      loss="softmax_cross_entropy")
        for loop in ("auto", "while")
    }
    states = {k: m.init(params) for k, m in methods.items()}
    times = alternate(
        {k: (lambda m=m, k=k: m.step(params, states[k], batch)[0]) for k, m in methods.items()},
        repeats=repeats, warmup=2, warmup_s=2.0,
    )
    ms = {k: round(median(t) * 1e3, 3) for k, t in times.items()}
    iters = int(methods["auto"].step(params, states["auto"], batch)[2]["solver_iterations"])
    return {
        "ms_per_step": ms,
        "iterations": iters,
        "auto_over_while": round(ms["auto"] / ms["while"], 3),
        "explain_tail": methods["auto"].explain().split("chosen when the step was traced:")[-1]
        .strip(),
    }


# ------------------------------------------------------------------ all


def run(quick: bool = False) -> dict[str, Any]:
    repeats = 7 if quick else 21
    forms = loop_forms(repeats, quick)
    cross = [crossover_case(560, repeats), crossover_case(100, repeats)]
    conv_full = [r for r in forms if r["case"].startswith("cnn") and r["tol"] == 0.0]
    conv_early = [r for r in forms if r["case"].startswith("cnn") and r["tol"] > 0.0]
    step = conv_step(repeats)
    worst_conv = max(r["over_products_unrolled"]["cg_auto"] for r in conv_full)
    return {
        "machine": machine_info(),
        "protocol": "interleaved contenders, rotating order, medians over "
        f"{repeats} rounds after a warm-up; compile time excluded (reported apart)",
        "loop_forms": forms,
        "crossover": cross,
        "conv_cg_step": {
            "cg_auto_over_products_unrolled": worst_conv,
            "meets_target": worst_conv <= TARGET,
            "early_stop": {
                r["case"]: {
                    "iterations": r["iterations"],
                    "maxiter": r["maxiter"],
                    "cg_auto_over_products_unrolled": r["over_products_unrolled"]["cg_auto"],
                    "cg_auto_over_maxiter_products_unrolled": round(
                        r["ms"]["cg_auto"] / r["ms"]["products_unrolled_maxiter"], 3),
                    "cg_auto_over_cg_while": round(r["ms"]["cg_auto"] / r["ms"]["cg_while"], 3),
                }
                for r in conv_early
            },
            "training_step": step,
        },
        "targets": {
            "auto_over_cg_more_rows": cross[0]["auto_over_cg"],
            "auto_over_best_more_rows": cross[0]["auto_over_best_of_cg_and_row_space"],
            "auto_over_best_fewer_rows": cross[1]["auto_over_best_of_cg_and_row_space"],
            "conv_cg_over_products_unrolled": worst_conv,
            "target": TARGET,
        },
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
