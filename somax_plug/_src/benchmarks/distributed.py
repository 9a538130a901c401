"""Per-step time of data parallelism and of canonical reductions on virtual CPU devices.

One child process with 4 virtual CPU devices (``jax_num_cpu_devices``; the parent's
devices cannot change once JAX started) times ``compose(preset="sgn")`` on the
784-256-10 tanh MLP of the other benchmarks (float32, softmax cross-entropy):

* ``1 device``: no mesh;
* ``4 devices``: ``mesh=data_parallel_mesh(4)`` (GSPMD's reductions);
* ``4 devices, reduce_chunks=4`` and ``1 device, reduce_chunks=4``:
  ``DataParallel(mesh, reduce_chunks=4)`` (the canonical, device-count-independent
  reductions), whose cost over the plain layout is what this part measures.

Protocol: each contender is compiled and warmed up, then the contenders alternate
over ``repeats`` rounds (:func:`~somax_plug._src.benchmarks.common.alternate`), one
step per call from the same start; the per-step time is the median. Virtual CPU
devices share the machine's cores, so "4 devices" measures the overhead of the
sharded program, not a speed-up. Run by ``somax-plug bench`` (part ``distributed``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

CHILD_FLAG = "--somax-plug-bench-child"


def run(quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Start the 4-device child and return its measurements (seconds per step)."""
    batch = 64 if smoke else (256 if quick else 512)
    repeats = 3 if smoke else (5 if quick else 15)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "somax_plug._src.benchmarks.distributed", CHILD_FLAG,
         str(batch), str(repeats)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"the 4-device child failed (exit {proc.returncode}): {proc.stderr[-800:]}"
        )
    return json.loads(lines[-1])


def _child(batch: int, repeats: int) -> dict[str, Any]:
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    from somax_plug import DataParallel, compose, data_parallel_mesh
    from somax_plug._src.benchmarks.common import (
        alternate,
        init_mlp,
        machine_info,
        median,
        mlp,
        random_batch,
    )

    params = init_mlp(jax.random.key(0))
    data = random_batch(jax.random.key(1), batch)
    layouts = {
        "1 device": None,
        "4 devices": data_parallel_mesh(4),
        "1 device, reduce_chunks=4": DataParallel(data_parallel_mesh(1), reduce_chunks=4),
        "4 devices, reduce_chunks=4": DataParallel(data_parallel_mesh(4), reduce_chunks=4),
    }
    calls = {}
    for name, mesh in layouts.items():
        method = compose(preset="sgn", predict_fn=mlp, loss="softmax_cross_entropy", mesh=mesh)
        state = method.init(params)
        calls[name] = (
            lambda m=method, s=state: m.step(params, s, data, jax.random.key(0))[0]
        )
    times = alternate(calls, repeats)
    per_step = {name: median(t) for name, t in times.items()}
    return {
        "what": "sgn per-step seconds, MLP 784-256-10, float32, 4 virtual CPU devices",
        "batch": batch,
        "repeats": repeats,
        "seconds_per_step": per_step,
        "reduce_chunks_overhead_4dev": per_step["4 devices, reduce_chunks=4"]
        / per_step["4 devices"],
        "reduce_chunks_overhead_1dev": per_step["1 device, reduce_chunks=4"]
        / per_step["1 device"],
        "machine": machine_info(),
    }


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == CHILD_FLAG:
    print(json.dumps(_child(int(sys.argv[2]), int(sys.argv[3]))))
