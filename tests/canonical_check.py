"""Canonical reductions, run in its own process by tests/test_sharding.py.

Needs 4 devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``, set by the
test before JAX starts). For every composition of :data:`COMPOSITIONS` it runs
``STEPS`` float32 steps on ``PROBLEMS`` random 8-example classification problems
(a 5-16-4 tanh MLP) with ``DataParallel(mesh, reduce_chunks=4)`` on meshes of 1, 2
and 4 devices, and prints one JSON object: per composition and device count,
whether the parameters, the solver iteration counts, the lambda and accept
sequences, the losses and ``rho`` equal the 1-device run's *bitwise*, and the
with ``--plain``, the largest parameter difference of the plain GSPMD step
(``reduce_chunks=None``) on 2 and 4 devices against 1, for contrast (the docs' table).

``ef_pcg`` (empirical Fisher + Jacobi-PCG) covers the sums over the batch that a
component computes itself (``Loss.batch_sum``: the empirical Fisher's products and
diagonal). ``kfac``, ``ekfac`` and ``ggn_cg_kfac`` cover the layer map and the tapped
pass under ``reduce_chunks`` (the base model traced at one chunk, ``vmap``-ed over the
chunks), the Kronecker factors and EKFAC's ``S`` (``Loss.batch_sum``), the factor
EMAs and inverses; tests/test_sharding.py runs them with the default backend
optimisation level (at level 0 the Gram matrix of the 17-column layer input rounded
differently with one chunk per device). The factors' ``batch_sum`` alone is the
``batch_sum`` entry below.

Run by hand: ``XLA_FLAGS=--xla_force_host_platform_device_count=4
python tests/canonical_check.py [--plain]``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from somax_plug import DataParallel, compose, data_parallel_mesh  # noqa: E402
from somax_plug._src.distributed import cpu_scheduler_flag  # noqa: E402

PROBLEMS, STEPS, N, D_IN, HIDDEN, D_OUT, K = 4, 3, 8, 5, 16, 4, 4
LOSS = "softmax_cross_entropy"
LM = {"name": "levenberg_marquardt", "init": 1.0}
COMPOSITIONS = {
    "sgn": dict(preset="sgn"),
    # auto: n = 164 > dense_max and R = 32 rows: row_cholesky (lam traced: lax.cond)
    "gauss_newton_lm": dict(preset="gauss_newton_lm"),
    # lambda from 0.03: about a third of the steps are rejected (accept sequences vary)
    "direct_lm": dict(curvature="ggn", solver="direct",
                      damping={"name": "levenberg_marquardt", "init": 0.03}),
    "sophia_h": dict(preset="sophia_h", estimators=[
        {"name": "hutchinson_diag", "every_k": 2, "num_probes": 1}]),
    "pcg_jacobi": dict(
        curvature="ggn",
        solver={"name": "cg", "maxiter": 10, "tol": 1e-4},
        estimators=[{"name": "hutchinson_diag", "every_k": 2, "num_probes": 2}],
        preconditioner="jacobi",
        damping=LM,
    ),
    "minres_lm": dict(curvature="hessian", solver={"name": "minres", "maxiter": 10}, damping=LM),
    # the empirical Fisher's own sums over the batch: mv (sum_b p_b (p_b . v)) and diag
    "ef_pcg": dict(
        curvature="empirical_fisher",
        solver={"name": "cg", "maxiter": 10, "tol": 1e-4},
        estimators=["exact_diag"],
        preconditioner="jacobi",
        damping=LM,
    ),
    # the layer map and the tapped pass under reduce_chunks: the Kronecker factors
    # (Fisher-sampled), their EMA and inverses, EKFAC's S and the KFAC-PCG
    "kfac": dict(preset="kfac"),
    "ekfac": dict(preset="ekfac"),
    "ggn_cg_kfac": dict(preset="ggn_cg_kfac"),
}


def predict(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def problem(seed):
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(size=(D_IN, HIDDEN)) / np.sqrt(D_IN),
        "b1": 0.1 * rng.normal(size=HIDDEN),
        "w2": rng.normal(size=(HIDDEN, D_OUT)) / np.sqrt(HIDDEN),
        "b2": np.zeros(D_OUT),
    }
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    w = rng.normal(size=(D_IN, D_OUT))
    data = []
    for _ in range(STEPS):
        x = rng.normal(size=(N, D_IN)).astype(np.float32)
        data.append((jnp.asarray(x), jnp.asarray(np.argmax(x @ w, -1).astype(np.int32))))
    return params, data


def trajectory(method, params, data):
    state = method.init(params)
    rec = {"iterations": [], "lam": [], "accepted": [], "loss": [], "rho": []}
    for i, batch in enumerate(data):
        params, state, info = method.step(params, state, batch, jax.random.key(i))
        for k, name in (("iterations", "solver_iterations"), ("lam", "lam"),
                        ("accepted", "accepted"), ("loss", "loss"), ("rho", "rho")):
            rec[k].append(np.asarray(info[name]).item())
    rec["params"] = {k: np.asarray(v) for k, v in params.items()}
    return rec


def bitwise(a, b) -> bool:
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


def batch_sums() -> dict:
    """``Loss.batch_sum`` of the Kronecker factors' sums (float32, [W; b] rows of 8
    examples x 3 positions, g with R = 2 samples) on 1, 2 and 4 devices: bitwise?"""
    from jax.sharding import NamedSharding, PartitionSpec

    from somax_plug import get_loss
    from somax_plug._src.sharding import chunked_loss
    from somax_plug.builtin.kronecker import gram

    rng = np.random.default_rng(7)
    a = jnp.asarray(rng.normal(size=(N, 3, D_IN + 1)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(N, 2, 3, D_OUT)), jnp.float32)  # batch first
    fns = {
        "A_expand": lambda x: gram(x.reshape(-1, x.shape[-1])),
        "G_expand": lambda x: jnp.einsum("brti,brtj->ij", x, x),
        "A_reduce": lambda x: gram(x.mean(axis=1)),
        "G_reduce": lambda x: (lambda s: jnp.einsum("bri,brj->ij", s, s))(x.sum(axis=2)),
    }
    got: dict = {}
    for n in (1, 2, 4):
        mesh = data_parallel_mesh(n)
        chunked = NamedSharding(mesh, PartitionSpec("data"))
        loss = chunked_loss(get_loss(LOSS), k=K, chunked=chunked,
                            rep=NamedSharding(mesh, PartitionSpec()))
        xa, xg = jax.device_put(a, chunked), jax.device_put(g, chunked)
        for name, fn in fns.items():
            x = xg if name.startswith("G") else xa
            got[(name, n)] = np.asarray(jax.jit(lambda x, fn=fn, s=loss.batch_sum: s(fn, x))(x))
    return {name: {str(n): bitwise(got[(name, 1)], got[(name, n)]) for n in (2, 4)}
            for name in fns}


def main() -> int:
    cpu_scheduler_flag()  # before the backend starts: cadenced estimators on 4 devices
    if jax.device_count() != 4:
        print(json.dumps({"error": f"expected 4 devices, got {jax.device_count()}"}))
        return 2
    t0 = time.time()
    problems = [problem(s) for s in range(PROBLEMS)]
    out: dict = {"problems": PROBLEMS, "steps": STEPS, "cases": {}, "batch_sum": batch_sums()}
    only = [a for a in sys.argv[1:] if not a.startswith("--")] or list(COMPOSITIONS)
    for name in only:
        kw = COMPOSITIONS[name]
        t_case = time.time()
        runs = {}
        for n in (1, 2, 4):
            method = compose(predict_fn=predict, loss=LOSS, **kw,
                             mesh=DataParallel(data_parallel_mesh(n), reduce_chunks=K))
            runs[n] = [trajectory(method, p, d) for p, d in problems]
        case: dict = {}
        for n in (2, 4):
            one, many = runs[1], runs[n]
            case[str(n)] = {
                "params_bitwise": all(
                    bitwise(a["params"][k], b["params"][k]) for a, b in zip(one, many, strict=True)
                    for k in a["params"]),
                "max_param_diff": max(
                    float(np.max(np.abs(a["params"][k] - b["params"][k])))
                    for a, b in zip(one, many, strict=True) for k in a["params"]),
                **{f"{k}_equal": all(bitwise(a[k], b[k]) for a, b in zip(one, many, strict=True))
                   for k in ("iterations", "lam", "accepted", "loss", "rho")},
            }
        case["iterations"] = [r["iterations"] for r in runs[1]]
        case["lam"] = [r["lam"] for r in runs[1]]
        case["accepted"] = [r["accepted"] for r in runs[1]]
        case["seconds"] = round(time.time() - t_case, 1)
        if "--plain" not in sys.argv:
            out["cases"][name] = case
            continue
        plain = {}
        for n in (1, 2, 4):
            method = compose(predict_fn=predict, loss=LOSS, **kw, mesh=data_parallel_mesh(n))
            plain[n] = [trajectory(method, p, d) for p, d in problems]
        for n in (2, 4):
            case[f"plain_{n}_vs_1_max_param_diff"] = max(
                float(np.max(np.abs(a["params"][k] - b["params"][k])))
                for a, b in zip(plain[1], plain[n], strict=True) for k in a["params"])
            case[f"plain_{n}_vs_1_iterations_equal"] = all(
                a["iterations"] == b["iterations"] for a, b in zip(plain[1], plain[n], strict=True))
        out["cases"][name] = case
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
