"""One process of the multi-process test (tests/test_multiprocess.py), or its references.

Run as ``python tests/multiprocess_worker.py ROLE OUT_DIR [COORDINATOR NUM_PROCESSES
PROCESS_ID]``. Roles:

* ``train`` (a process of a group): joins the group with
  :func:`somax_plug.init_distributed` (``4 / NUM_PROCESSES`` virtual CPU devices per
  process, gloo: 2 x 2 in the test, 4 x 1 as a local check), builds the global mesh,
  feeds its own rows of every global batch through :func:`somax_plug.process_batch`
  and runs ``STEPS`` steps of every case of :data:`CASES` and of the Optax bridge;
  after step ``SAVE_AT`` of ``sgn`` it saves a checkpoint (every process calls
  :func:`somax_plug.checkpoint.save`); then ``PRESET_STEPS`` steps of every builtin
  preset. Writes ``train-<pid>.npz`` (parameters and solver iteration counts per
  case, and whether ``init_distributed`` put the CPU scheduler flag into
  ``XLA_FLAGS``).
* ``reference``: one process, 4 virtual devices, no ``jax.distributed``: the same
  cases on a 4-device mesh and (``sgn``, ``sgn_chunked``) a 2-device mesh; writes
  ``ref-<n>dev.npz``.
* ``resume`` (a process of a second group): restores the checkpoint into a
  two-process method, runs the remaining steps (``resume-<pid>.npz``); then process 1
  dies (``os._exit``) before the next step and process 0 must fail with an error
  (it writes ``fault-0.txt`` with the error it saw).
* ``resume_single``: the same cases and presets on one device (``ref-1dev.npz``), then restores
  the checkpoint in this one process (one device), continues, writes
  ``resume-single.npz``.
* ``f32`` (a process of a group) and ``f32_single`` (one process, one device): the
  float32 measurement (not in CI: ``python tests/test_multiprocess.py --float32``):
  ``STEPS`` float32 steps of :data:`F32_CASES`, each with GSPMD's reductions and with
  ``reduce_chunks=4``; writes ``f32-<pid>.npz`` / ``f32-1dev.npz``.

Float64 throughout (but the ``f32`` roles), so that the comparisons can be tight.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
import traceback
from pathlib import Path

# bounded in time: a worker that hangs (a lost peer, a stuck collective) prints
# where it is and exits
faulthandler.dump_traceback_later(float(os.environ.get("SOMAX_WORKER_TIMEOUT", "150")), exit=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

ROLE, OUT = sys.argv[1], Path(sys.argv[2])
GROUP = ROLE in ("train", "resume", "f32")

import jax  # noqa: E402

if GROUP:
    from somax_plug import init_distributed  # noqa: E402

    _flags_before = os.environ.get("XLA_FLAGS", "")
    init_distributed(
        sys.argv[3],
        num_processes=int(sys.argv[4]),
        process_id=int(sys.argv[5]),
        local_device_count=4 // int(sys.argv[4]),  # 4 devices in all: 2 x 2 or 4 x 1
        initialization_timeout_s=60,
        heartbeat_timeout_s=15,  # a loaded CI machine must not miss heartbeats
        shutdown_timeout_s=10,
    )
else:
    jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from somax_plug import (  # noqa: E402
    DataParallel,
    as_optax,
    checkpoint,
    compose,
    data_parallel_mesh,
    process_batch,
    process_slice,
    to_host,
)
from somax_plug._src.distributed import CPU_SCHEDULER_FLAG  # noqa: E402
from somax_plug.builtin.presets import PRESETS  # noqa: E402

STEPS, SAVE_AT, N, D_IN, HIDDEN, D_OUT = 5, 3, 16, 4, 6, 3
PRESET_STEPS = 2  # every builtin preset, 2 steps
# presets whose second step amplifies rounding: on one device, initial parameters
# perturbed by 1e-15 move shampoo's parameters by 1.8e-7 and soap's by 2.1e-3 after
# 2 steps (8.0e-13 and 8.4e-11 after 1; rank-deficient Kronecker factors of the
# tiny MLP): their parameters after step 1 are recorded too
ROUNDING_SENSITIVE = ("shampoo", "soap")
LOSS = "softmax_cross_entropy"
CASES = {
    "sgn": dict(preset="sgn"),
    # canonical reductions (DataParallel(reduce_chunks=4)): bitwise the same for any
    # number of devices and processes
    "sgn_chunked": dict(preset="sgn"),
    "gauss_newton_lm": dict(preset="gauss_newton_lm"),
    "sophia_h": dict(preset="sophia_h"),
    "pcg_jacobi": dict(
        curvature="ggn",
        solver={"name": "cg", "maxiter": 40, "tol": 1e-6},
        estimators=[{"name": "hutchinson_diag", "every_k": 2, "num_probes": 2}],
        preconditioner="jacobi",
        damping={"name": "constant", "lam": 0.5},
    ),
}


def predict(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def init_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": np.asarray(jax.random.normal(k1, (D_IN, HIDDEN), jnp.float64)) / np.sqrt(D_IN),
        "b1": np.zeros(HIDDEN),
        "w2": np.asarray(jax.random.normal(k2, (HIDDEN, D_OUT), jnp.float64)) / np.sqrt(HIDDEN),
        "b2": np.zeros(D_OUT),
    }


def global_batches():
    """The global batches, as NumPy, the same in every process (each feeds its rows)."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(D_IN, D_OUT))
    out = []
    for _ in range(STEPS):
        x = rng.normal(size=(N, D_IN))
        out.append((x, np.argmax(x @ w, axis=-1).astype(np.int32)))
    return out


def mesh_for(n_devices):
    return None if n_devices == 1 else data_parallel_mesh(n_devices)


def feed(batch, mesh):
    """The batch as the step gets it: per-process rows in a group, whole otherwise."""
    if mesh is None:
        return batch
    rows = process_slice(N, mesh)
    return process_batch(tuple(leaf[rows] for leaf in batch), mesh)


def method_for(name, mesh):
    kw = dict(CASES[name])
    if name.endswith("_chunked"):
        mesh = DataParallel(data_parallel_mesh(1) if mesh is None else mesh, reduce_chunks=4)
    return compose(predict_fn=predict, loss=LOSS, mesh=mesh, **kw)


def run_case(name, mesh, data, start=0, params=None, state=None, save=None):
    method = method_for(name, mesh)
    if params is None:
        params = init_params()
        state = method.init(params)
    iters = []
    for i in range(start, STEPS):
        params, state, info = method.step(params, state, feed(data[i], mesh), jax.random.key(i))
        iters.append(int(to_host(info["solver_iterations"])))
        if save is not None and i + 1 == SAVE_AT:
            checkpoint.save(save, params, state, method, metadata={"step": SAVE_AT})
    return to_host(params), np.asarray(iters)


def run_optax(mesh, data):
    """sgn's direction (constant damping) through the Optax bridge, in the user's own jit."""
    tx = optax.chain(
        as_optax(
            preset="sgn",
            damping={"name": "constant", "lam": 0.1},
            predict_fn=predict,
            loss=LOSS,
            mesh=mesh,
        ),
        optax.scale_by_learning_rate(0.5),
    )

    def loss_fn(p, batch):
        logits = predict(p, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    @jax.jit
    def train_step(p, opt_state, batch):
        g = jax.grad(loss_fn)(p, batch)
        updates, opt_state = tx.update(g, opt_state, p, batch=batch)
        return optax.apply_updates(p, updates), opt_state

    params = init_params()
    opt_state = tx.init(params)
    if mesh is not None:
        from somax_plug._src.distributed import put_global
        from somax_plug._src.sharding import replicated

        params = put_global(params, jax.tree_util.tree_map(lambda _: replicated(mesh), params))
    for i in range(STEPS):
        params, opt_state = train_step(params, opt_state, feed(data[i], mesh))
    return to_host(params)


F32_CASES = ("sgn", "gauss_newton_lm", "sophia_h", "pcg_jacobi")
"""The float32 measurement's compositions (``CASES``' entries), plain and chunked."""


def float32_cases(mesh):
    """``STEPS`` float32 steps of every :data:`F32_CASES` entry, with GSPMD's reductions
    (``<name>``) and with ``reduce_chunks=4`` (``<name>_chunked``): parameters and
    solver iteration counts."""
    f32 = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda x: np.asarray(x, np.float32) if np.issubdtype(np.asarray(x).dtype, np.floating)
        else x, tree)
    data = [f32(b) for b in global_batches()]
    out = {}
    for name in F32_CASES:
        for chunked in (False, True):
            layout = mesh
            if chunked:
                layout = DataParallel(data_parallel_mesh(1) if mesh is None else mesh,
                                      reduce_chunks=4)
            method = compose(predict_fn=predict, loss=LOSS, mesh=layout, **CASES[name])
            params = f32(init_params())
            state = method.init(params)
            iters = []
            for i in range(STEPS):
                params, state, info = method.step(params, state, feed(data[i], mesh),
                                                  jax.random.key(i))
                iters.append(int(to_host(info["solver_iterations"])))
            key = name + ("_chunked" if chunked else "")
            out.update(flat(key, to_host(params)))
            out[f"{key}/iterations"] = np.asarray(iters)
    return out


def cpu_warning():
    """compose's warning about XLA's CPU collectives (reduce_chunks + a cadenced
    estimator): ``[warned with the flag set, warned without it]``.

    ``data_parallel_mesh`` (this role's first JAX call) has put the flag into
    ``XLA_FLAGS``: no warning; without it (a backend started before the flag could
    be set) ``compose`` warns.
    """
    import warnings

    def warned():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            compose(predict_fn=predict, loss=LOSS, **CASES["pcg_jacobi"],
                    mesh=DataParallel(data_parallel_mesh(4), reduce_chunks=4))
        return any("xla_cpu_enable_concurrency_optimized_scheduler" in str(w.message)
                   for w in seen)

    flags = os.environ["XLA_FLAGS"]
    with_flag = CPU_SCHEDULER_FLAG in flags and warned()
    os.environ["XLA_FLAGS"] = flags.replace(CPU_SCHEDULER_FLAG, "")
    try:
        without = warned()
    finally:
        os.environ["XLA_FLAGS"] = flags
    return np.asarray([with_flag, without])


def flat(prefix, params):
    return {f"{prefix}/{k}": np.asarray(v) for k, v in params.items()}


def all_cases(mesh, save=None, only=None):
    data = global_batches()
    out = {}
    for name in only or CASES:
        params, iters = run_case(name, mesh, data, save=save if name == "sgn" else None)
        out.update(flat(name, params))
        out[f"{name}/iterations"] = iters
    if only is None:
        out.update(flat("optax", run_optax(mesh, data)))
    return out


def all_presets(mesh):
    """``PRESET_STEPS`` steps of every builtin preset (``preset:<name>/<leaf>``)."""
    data = global_batches()
    out = {}
    for name in PRESETS:
        method = compose(preset=name, predict_fn=predict, loss=LOSS, mesh=mesh)
        params = init_params()
        state = method.init(params)
        for i in range(PRESET_STEPS):
            params, state, _ = method.step(params, state, feed(data[i], mesh), jax.random.key(i))
            if i == 0 and name in ROUNDING_SENSITIVE:
                out.update(flat(f"preset1:{name}", to_host(params)))
        out.update(flat(f"preset:{name}", to_host(params)))
    return out


def restore_and_continue(mesh, path):
    method = method_for("sgn", mesh)
    params, state = checkpoint.restore(path, method)
    restored_count = int(to_host(state.count))
    p, iters = run_case("sgn", mesh, global_batches(), SAVE_AT, params, state)
    return {**flat("sgn", p), "sgn/iterations": iters, "count": np.asarray(restored_count)}


def main():
    t0 = time.time()
    ckpt = OUT / "ckpt-sgn"
    if ROLE == "train":
        mesh = data_parallel_mesh()
        assert jax.device_count() == 4, jax.devices()
        assert jax.local_device_count() == 4 // jax.process_count(), jax.devices()
        out = all_cases(mesh, save=ckpt)
        out.update(all_presets(mesh))
        # init_distributed put the CPU scheduler flag into XLA_FLAGS (not set before)
        out["flag_set"] = np.asarray(
            CPU_SCHEDULER_FLAG not in _flags_before
            and CPU_SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", ""))
        np.savez(OUT / f"train-{jax.process_index()}.npz", **out)
    elif ROLE == "reference":
        np.savez(OUT / "ref-4dev.npz", **all_cases(mesh_for(4)), warned=cpu_warning())
        # 2 devices: the Krylov iteration counts (and parameters) of the CG cases
        np.savez(
            OUT / "ref-2dev.npz",
            **all_cases(mesh_for(2), only=("sgn", "sgn_chunked")),
        )
    elif ROLE == "resume_single":
        np.savez(OUT / "ref-1dev.npz", **all_cases(mesh_for(1)), **all_presets(None))
        np.savez(OUT / "resume-single.npz", **restore_and_continue(None, ckpt))
    elif ROLE == "f32":
        np.savez(OUT / f"f32-{jax.process_index()}.npz", **float32_cases(data_parallel_mesh()))
    elif ROLE == "f32_single":
        np.savez(OUT / "f32-1dev.npz", **float32_cases(None))
    elif ROLE == "resume":
        mesh = data_parallel_mesh()
        np.savez(OUT / f"resume-{jax.process_index()}.npz", **restore_and_continue(mesh, ckpt))
        fault(mesh)
    print(f"{ROLE} done in {time.time() - t0:.1f} s", flush=True)


def fault(mesh):
    """Process 1 dies before a step; process 0's step must fail, not hang."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("before the fault")
    if jax.process_index() == 1:
        os._exit(17)
    method = method_for("sgn", mesh)
    params = init_params()
    state = method.init(params)
    t0 = time.time()
    print(f"fault: stepping without process 1 at {t0:.3f}", flush=True)
    try:
        for i in range(3):
            params, state, info = method.step(
                params, state, feed(global_batches()[i], mesh), jax.random.key(i)
            )
            to_host(info["loss"])
        text = "no error"
    except Exception as exc:  # noqa: BLE001 (the test reads what it was)
        text = f"{type(exc).__name__}: {exc}"
    (OUT / "fault-0.txt").write_text(f"{time.time() - t0:.1f}\n{text}")
    print("fault seen:", text[:300], flush=True)
    os._exit(3)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
