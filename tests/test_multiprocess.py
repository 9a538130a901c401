"""Multi-process training with real processes (jax.distributed, gloo on CPU).

One test starts, through ``tests/multiprocess_worker.py``:

1. a group of two processes on 127.0.0.1 (a free port, two virtual CPU devices
   each, one four-device global mesh; each process feeds its own rows of every
   global batch through ``somax_plug.process_batch``) running 5 float64 steps of
   ``sgn``, ``gauss_newton_lm``, ``sophia_h``, a Jacobi-preconditioned CG composition
   and ``sgn``'s direction through the Optax bridge, saving an Orbax checkpoint of
   ``sgn`` after step 3; at the same time, one single-process reference on a
   4-device mesh and (the CG cases) a 2-device mesh;
2. then a second two-process group that restores the checkpoint and runs steps
   4-5, after which process 1 dies and process 0 must end with JAX's error about
   the dead task within a bounded time; at the same time a single process runs the
   cases on one device, then restores the same checkpoint there and continues.

Asserted: parameters after 5 steps equal across the two processes (bitwise), and
equal the 4-device and 1-device single-process runs to 1e-9 (float64; measured
<= 4.4e-16 for the step, 1.1e-13 for the Optax bridge: summation order only);
``sgn`` with canonical reductions (``DataParallel(reduce_chunks=4)``) bitwise equal
on 2 and 4 devices and 2 processes; equal Krylov iteration counts for 1, 2 and 4
devices and 1 and 2 processes; the restored runs reproduce
the uninterrupted trajectory (iteration counts equal, parameters to 1e-12); the
fault ends process 0 within 60 s of the death; every builtin preset, 2 steps in the
group, equal in both processes (bitwise) and to the 1-device run (1e-10; ``shampoo``
and ``soap`` after their first step, 1e-8: their second step amplifies rounding);
``init_distributed`` put the CPU scheduler flag into ``XLA_FLAGS``. Every wait has a
timeout (the whole test is bounded by ``BUDGET_S``) and every process is killed in a
``finally``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from reliability import Case, check_corpus

from somax_plug import (
    DataParallel,
    InputError,
    compose,
    data_parallel_mesh,
    init_distributed,
    process_batch,
    process_slice,
    shard_batch,
    to_host,
)
from somax_plug._src.distributed import cpu_scheduler_flag
from somax_plug._src.losses import SoftmaxCrossEntropy
from somax_plug.builtin.presets import PRESETS

WORKER = Path(__file__).with_name("multiprocess_worker.py")
ROOT = WORKER.parents[1]
# generous bounds: the test runs beside another pytest-xdist worker on 2 cores, where
# compiling every preset in both processes took up to 150 s (alone: about 120 s)
BUDGET_S = 600.0
# float64: the runs differ by the order of the cross-device sums only (measured
# <= 3.2e-12 after 5 steps, the ill-conditioned preconditioned CG case the largest)
TOL = 1e-9
PRESET_TOL = 1e-10  # every preset after 2 steps (summation order only)
# shampoo and soap after 1 step: a 1e-15 change of the initial parameters moves
# them by up to 8.4e-11 on one device (their 2nd step amplifies it to 2.1e-3)
SENSITIVE_TOL = 1e-8
ROUNDING_SENSITIVE = ("shampoo", "soap")
CASES = ("sgn", "sgn_chunked", "gauss_newton_lm", "sophia_h", "pcg_jacobi", "optax")
LEAVES = ("w1", "b1", "w2", "b2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", SOMAX_WORKER_TIMEOUT="480")
    # XLA compilation is most of the workers' time: compile with less optimisation
    # (every run uses the same flags, so the comparisons are unaffected)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    return env


class _Procs:
    """The worker processes of the test: started, waited for with a deadline, killed."""

    def __init__(self, out: Path, deadline: float) -> None:
        self.out, self.deadline, self.procs = out, deadline, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.out / f"{name}.log", "wb")  # noqa: SIM115 (closed in kill_all)
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            cwd=ROOT,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        proc.log, proc.name = log, name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def group(self, role: str) -> list[subprocess.Popen]:
        address = f"127.0.0.1:{_free_port()}"
        return [self.start(f"{role}-{i}", role, str(self.out), address, "2", str(i))
                for i in range(2)]

    def wait(self, proc: subprocess.Popen) -> tuple[int, float]:
        """Exit status and the time it was seen; fails the test at the deadline."""
        while proc.poll() is None:
            if time.monotonic() > self.deadline:
                raise AssertionError(
                    f"worker {proc.name} still running after the {BUDGET_S:.0f} s budget:\n"
                    + self.text(proc.name)[-3000:]
                )
            time.sleep(0.1)
        return proc.returncode, time.time()

    def text(self, name: str) -> str:
        return (self.out / f"{name}.log").read_bytes().decode("utf-8", "replace")

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            proc.log.close()


def _ok(procs: _Procs, proc: subprocess.Popen) -> None:
    rc, _ = procs.wait(proc)
    assert rc == 0, f"worker {proc.name} failed (exit {rc}):\n{procs.text(proc.name)[-4000:]}"


def _max_diff(a: np.lib.npyio.NpzFile, b: np.lib.npyio.NpzFile, case: str) -> float:
    return max(float(np.max(np.abs(a[f"{case}/{k}"] - b[f"{case}/{k}"]))) for k in LEAVES)


def test_two_processes_match_one_process_resume_and_fail_cleanly(tmp_path):
    procs = _Procs(tmp_path, time.monotonic() + BUDGET_S)
    try:
        # phase 1: the two-process group and the single-process references, together
        train = procs.group("train")
        ref = procs.start("reference", "reference", str(tmp_path))
        for proc in (*train, ref):
            _ok(procs, proc)
        t0, t1 = (np.load(tmp_path / f"train-{i}.npz") for i in range(2))
        sgn_moves = max(float(np.max(np.abs(t0[f"sgn/{k}"]))) for k in LEAVES)
        assert sgn_moves > 0.1  # the parameters did move: the comparison means something

        # phase 2: restore in a new group (then a process dies), and in one process
        resume = procs.group("resume")
        single = procs.start("resume-single", "resume_single", str(tmp_path))
        _ok(procs, single)
        rc1, _ = procs.wait(resume[1])
        assert rc1 == 17, procs.text("resume-1")[-3000:]  # the worker's os._exit(17)
        rc0, ended = procs.wait(resume[0])
        log0 = procs.text("resume-0")

        refs = {n: np.load(tmp_path / f"ref-{n}dev.npz") for n in (4, 2, 1)}
        for case in CASES:
            assert _max_diff(t0, t1, case) == 0.0, case  # one replicated result
            for n in (4, 1):
                assert _max_diff(t0, refs[n], case) < TOL, (case, n, _max_diff(t0, refs[n], case))
        # canonical reductions: bitwise the same on 2 and 4 devices and 2 processes; a
        # 1-device program is compiled without the SPMD partitioner (other fusions):
        # measured 3.2e-16 there
        for n in (4, 2):
            assert _max_diff(t0, refs[n], "sgn_chunked") == 0.0, n
        # reduce_chunks + cadence on CPU devices: the flag was set by data_parallel_mesh,
        # so no warning; without the flag, compose warns
        assert refs[4]["warned"].tolist() == [False, True]
        # every builtin preset, 2 steps: one result in both processes, the 1-device one
        # to float64 rounding (random probes: the same in every process)
        for name in PRESETS:
            case = f"preset:{name}"
            assert _max_diff(t0, t1, case) == 0.0, name
            if name in ROUNDING_SENSITIVE:  # compared after step 1 (see the worker)
                assert _max_diff(t0, t1, f"preset1:{name}") == 0.0, name
                case, tol = f"preset1:{name}", SENSITIVE_TOL
            else:
                tol = PRESET_TOL
            assert _max_diff(t0, refs[1], case) < tol, (name, _max_diff(t0, refs[1], case))
        # init_distributed put the CPU scheduler flag into XLA_FLAGS in both processes
        assert bool(t0["flag_set"]) and bool(t1["flag_set"])
        for case in ("sgn", "sgn_chunked", "gauss_newton_lm", "sophia_h", "pcg_jacobi"):
            it = t0[f"{case}/iterations"]
            assert it.shape == (5,) and np.all(it >= 1), (case, it)
            np.testing.assert_array_equal(t1[f"{case}/iterations"], it)
            for n in (4, 2, 1) if case in ("sgn", "sgn_chunked") else (4, 1):
                np.testing.assert_array_equal(refs[n][f"{case}/iterations"], it, f"{case} {n}")
        for name in ("resume-0", "resume-1", "resume-single"):
            got = np.load(tmp_path / f"{name}.npz")
            assert int(got["count"]) == 3, name
            np.testing.assert_array_equal(got["sgn/iterations"], t0["sgn/iterations"][3:], name)
            assert _max_diff(got, t0, "sgn") < 1e-12, (name, _max_diff(got, t0, "sgn"))
        # the fault: process 0 ends with an error naming the dead task, in bounded time
        assert rc0 != 0, log0[-3000:]
        marker = [line for line in log0.splitlines() if "fault: stepping without" in line]
        assert marker, log0[-3000:]
        started = float(marker[0].rsplit(" ", 1)[1])
        assert ended - started < 60.0, ended - started
        clear = ("another task died", "stopped sending heartbeats", "unhealthy")
        assert any(c in log0 for c in clear), log0[-3000:]
    finally:
        procs.kill_all()


# ------------------------------------------------------- in this process (fast)
def _join(**kw):
    args = dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0,
                local_device_count=None, cpu_collectives=None)
    args.update(kw)
    return init_distributed(**args)


def _same_as_shard_batch(got):
    x, y = got
    good = (np.arange(8.0).reshape(4, 2), np.arange(4))
    want_x, want_y = shard_batch(good, data_parallel_mesh(1))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want_x))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))
    assert x.sharding.spec == want_x.sharding.spec and x.shape == (4, 2)


def _chunked_step(batch=8, reduce_chunks=4):
    """One ggn + cg step on a 1-device mesh, with or without canonical reductions."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(batch, 3)), rng.normal(size=(batch, 2))
    mesh = DataParallel(data_parallel_mesh(1), reduce_chunks=reduce_chunks)
    method = compose("ggn", {"name": "cg", "tol": 1e-8}, predict_fn=lambda p, x: jnp.tanh(x @ p),
                     loss="mse", mesh=mesh)
    params = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    return method.step(params, method.init(params), (x.astype("f4"), y.astype("f4")))


def _close_to_plain(got):
    plain = _chunked_step(reduce_chunks=None)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(plain[0]), rtol=0, atol=1e-5)
    assert bool(got[2]["accepted"]) and int(got[2]["solver_iterations"]) >= 1


def _all_rows(got):
    assert got == slice(0, 8), got


def _flag_with(flags):
    """``cpu_scheduler_flag()`` with ``XLA_FLAGS=flags`` (restored): result, env after."""
    saved = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = flags
    try:
        return cpu_scheduler_flag(), os.environ["XLA_FLAGS"]
    finally:
        if saved is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = saved


def _too_late(got):  # this process's backend runs: XLA has read its flags, env untouched
    assert got == ("too late", ""), got


def _users_choice(got):  # XLA_FLAGS names the option: the user's value is kept
    assert got == ("user", "--xla_cpu_enable_concurrency_optimized_scheduler=true"), got


def _loss_keeps_its_class(method):
    loss = method.core.model.loss
    assert isinstance(loss, SoftmaxCrossEntropy) and type(loss) is not SoftmaxCrossEntropy


def test_distributed_helpers_refuse_bad_input():
    mesh = data_parallel_mesh(1)
    good = (np.arange(8.0).reshape(4, 2), np.arange(4))
    cases = [
        Case("num_processes 0", lambda: _join(num_processes=0), says=("num_processes", ">= 1")),
        Case("process_id out of range", lambda: _join(process_id=2),
             says=("process_id", "[0, 1]")),
        Case("address without a port", lambda: _join(coordinator_address="localhost"),
             says=("host:port", "localhost")),
        Case("heartbeat 0 s", lambda: _join(heartbeat_timeout_s=0),
             says=("heartbeat_timeout_s", ">= 1")),
        Case("local_device_count 0", lambda: _join(local_device_count=0),
             says=("local_device_count", ">= 1")),
        # this process has created arrays already: JAX cannot join a group any more
        Case("after other JAX calls", _join, error=InputError,
             says=("could not join", "before any other JAX call")),
        Case("process_batch: not a mesh", lambda: process_batch(good, "mesh"),
             says=("jax.sharding.Mesh",)),
        Case("process_batch: no such axis", lambda: process_batch(good, mesh, axis="batch"),
             says=("'batch'", "not an axis")),
        Case("process_batch: no arrays", lambda: process_batch((), mesh), says=("no arrays",)),
        Case("process_batch: a scalar leaf", lambda: process_batch((np.ones(4), 1.0), mesh),
             says=("local_batch[1]", "scalar")),
        Case("process_batch: sizes differ",
             lambda: process_batch((np.ones((4, 2)), np.ones(3)), mesh),
             says=("4 examples", "3", "leading batch axis")),
        Case("process_batch: empty", lambda: process_batch((np.ones((0, 2)), np.ones(0)), mesh),
             says=("0 examples", "positive multiple")),
        Case("process_slice: 0 rows", lambda: process_slice(0, mesh),
             says=("global_batch_size", "positive multiple")),
        Case("process_batch: one process = shard_batch", lambda: process_batch(good, mesh),
             expect="ok", check=_same_as_shard_batch),
        Case("process_slice: one process owns all rows", lambda: process_slice(8, mesh),
             expect="ok", check=_all_rows),
        Case("reduce_chunks 0", lambda: DataParallel(mesh, reduce_chunks=0),
             says=("reduce_chunks", "positive multiple")),
        Case("reduce_chunks True", lambda: DataParallel(mesh, reduce_chunks=True),
             says=("reduce_chunks", "True")),
        Case("reduce_chunks with a stateful model", lambda: compose(
            "ggn", "cg", predict_fn=lambda p, x, *, state: (x @ p, state), loss="mse",
            has_state=True, mesh=DataParallel(mesh, reduce_chunks=2)),
             says=("reduce_chunks", "plain model")),
        Case("reduce_chunks with a model that needs a key", lambda: compose(
            "ggn", "cg", predict_fn=lambda p, x, *, key: x @ p, loss="mse",
            has_rng=True, mesh=DataParallel(mesh, reduce_chunks=2)),
             says=("reduce_chunks", "plain model", "dropout")),
        Case("reduce_chunks: the loss keeps its class", lambda: compose(
            "ggn", "cg", predict_fn=lambda p, x: x @ p, loss="softmax_cross_entropy",
            mesh=DataParallel(mesh, reduce_chunks=2)), expect="ok", check=_loss_keeps_its_class),
        Case("cpu_scheduler_flag after the backend started", lambda: _flag_with(""),
             expect="ok", check=_too_late),
        Case("cpu_scheduler_flag when XLA_FLAGS names the option",
             lambda: _flag_with("--xla_cpu_enable_concurrency_optimized_scheduler=true"),
             expect="ok", check=_users_choice),
        Case("batch not divisible by reduce_chunks", lambda: _chunked_step(batch=6),
             says=("batch size 6", "reduce_chunks=4", "8")),
        Case("reduce_chunks: one device, same as GSPMD to rounding", _chunked_step,
             expect="ok", check=_close_to_plain),
    ]
    counts = check_corpus("distributed helpers", cases)
    assert counts["named"] == 18 and counts["ok"] == 6


def test_to_host_and_put_global_in_one_process():
    from somax_plug._src.distributed import put_global
    from somax_plug._src.sharding import replicated

    mesh = data_parallel_mesh(1)
    tree = {"rho": jnp.full((), jnp.nan), "w": jnp.arange(3.0), "key": jax.random.key(3)}
    placed = put_global(tree, jax.tree_util.tree_map(lambda _: replicated(mesh), tree))
    assert all(x.sharding == replicated(mesh) for x in jax.tree_util.tree_leaves(placed))
    host = to_host(placed)
    assert np.isnan(host["rho"]) and isinstance(host["w"], np.ndarray)
    np.testing.assert_array_equal(host["w"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(host["key"], np.asarray(jax.random.key_data(tree["key"])))
    assert put_global(placed, jax.tree_util.tree_map(lambda _: replicated(mesh), tree))["w"] is (
        placed["w"]
    )  # already laid out: no copy


# ------------------------------------------- float32 across processes (measured by hand)
def measure_float32(out: Path) -> dict:
    """Float32, 5 steps: 2 processes x 2 devices against 1 device, GSPMD and canonical.

    Not a test (its compile time would double the group's): ``python
    tests/test_multiprocess.py --float32`` prints, per composition, the largest
    parameter difference against the 1-device run, with GSPMD's reductions and with
    ``reduce_chunks=4``, whether the two processes agree bitwise and whether the
    solver iteration counts equal the 1-device ones (docs/howto/multi-process.md).
    """
    procs = _Procs(out, time.monotonic() + BUDGET_S)
    try:
        group = procs.group("f32")
        single = procs.start("f32-single", "f32_single", str(out))
        for proc in (*group, single):
            _ok(procs, proc)
    finally:
        procs.kill_all()
    t0, t1, one = (np.load(out / f"f32-{n}.npz") for n in ("0", "1", "1dev"))
    table = {}
    for name in ("sgn", "gauss_newton_lm", "sophia_h", "pcg_jacobi"):
        for case in (name, name + "_chunked"):
            table[case] = {
                "vs_1_device": _max_diff(t0, one, case),
                "processes_bitwise": _max_diff(t0, t1, case) == 0.0,
                "iterations_equal": bool(np.array_equal(t0[f"{case}/iterations"],
                                                        one[f"{case}/iterations"])),
                "iterations": t0[f"{case}/iterations"].tolist(),
            }
    return table


if __name__ == "__main__" and "--float32" in sys.argv:
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure_float32(Path(tmp)), indent=1))

