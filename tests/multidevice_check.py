"""Multi-device check, run in its own process by tests/test_sharding.py.

Needs 4 devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set
before JAX starts (the test does it). For several presets it runs a few steps on
one device and on a 4-device data-parallel mesh (float64) and prints one JSON
object with, per case, the max abs differences of params, state and info, the
shardings seen *inside* the compiled step (``jax.debug.inspect_array_sharding`` of
the model inputs), the input shardings of the compiled executable, whether its
HLO has cross-device reductions, and the jit cache size. The test asserts on it.

Run by hand: ``XLA_FLAGS=--xla_force_host_platform_device_count=4
python tests/multidevice_check.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from somax_plug import checkpoint, compose  # noqa: E402
from somax_plug._src.errors import InputError  # noqa: E402
from somax_plug._src.sharding import data_parallel_mesh, shard_large_2d  # noqa: E402

STEPS = 3
PRESETS = ("sgn", "gauss_newton_lm", "sophia_h", "natural_gradient")


def make_predict(record: list):
    def predict(params, x):
        jax.debug.inspect_array_sharding(x, callback=lambda s: record.append(s))
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        return h @ params["w2"] + params["b2"]

    return predict


def init_params(key, d_in=4, hidden=8, d_out=3):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (d_in, hidden), jnp.float64) / np.sqrt(d_in),
        "b1": jnp.zeros(hidden, jnp.float64),
        "w2": jax.random.normal(k2, (hidden, d_out), jnp.float64) / np.sqrt(hidden),
        "b2": jnp.zeros(d_out, jnp.float64),
    }


def batches(n=16, d_in=4, d_out=3):
    out = []
    w = jax.random.normal(jax.random.key(99), (d_in, d_out), jnp.float64)
    for i in range(STEPS):
        x = jax.random.normal(jax.random.key(100 + i), (n, d_in), jnp.float64)
        out.append((x, jnp.argmax(x @ w, axis=-1)))
    return out


def run(method, params, data):
    state = method.init(params)
    infos = []
    for i, batch in enumerate(data):
        params, state, info = method.step(params, state, batch, jax.random.key(i))
        infos.append(info)
    return params, state, infos


def max_diff(a, b) -> float:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    worst = 0.0
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        both_nan = np.isnan(x) & np.isnan(y)
        if np.any(np.isnan(x) != np.isnan(y)):
            return float("inf")
        d = np.where(both_nan, 0.0, np.abs(x - y))
        worst = max(worst, float(np.max(d)) if d.size else 0.0)
    return worst


def spec_str(sharding) -> str:
    return str(getattr(sharding, "spec", sharding))


_SINGLE: dict = {}  # the one-device reference runs, per preset


def case(name, preset, mesh, param_sharding=None, compiled_check=False):
    data = batches()
    params = init_params(jax.random.key(0))
    seen_single, seen_multi = [], []
    single = compose(
        preset=preset, predict_fn=make_predict(seen_single), loss="softmax_cross_entropy"
    )
    multi = compose(
        preset=preset,
        predict_fn=make_predict(seen_multi),
        loss="softmax_cross_entropy",
        mesh=mesh,
        param_sharding=param_sharding,
    )
    if preset not in _SINGLE:
        _SINGLE[preset] = run(single, params, data) + (seen_single,)
    p1, s1, i1, seen_single = _SINGLE[preset]
    p4, s4, i4 = run(multi, params, data)
    compiled_specs, all_reduce = [], None
    if compiled_check:  # a second compile: done for one case only
        placed = multi.data_parallel.place(params, multi.init(params), data[0], jax.random.key(0))
        compiled = multi._step_jit.lower(*placed).compile()
        batch_in = jax.tree_util.tree_leaves(compiled.input_shardings[0][2])
        compiled_specs = sorted({spec_str(s) for s in batch_in})
        all_reduce = "all-reduce" in compiled.as_text()
    return {
        "name": name,
        "preset": preset,
        "param_diff": max_diff(p1, p4),
        "state_diff": max_diff(s1, s4),
        "info_diff": max(max_diff(a, b) for a, b in zip(i1, i4, strict=True)),
        "accepted": [bool(i["accepted"]) for i in i4],
        "loss_first_last": [float(i4[0]["loss"]), float(i4[-1]["loss"])],
        "inside_specs": sorted({spec_str(s) for s in seen_multi}),
        "inside_devices": sorted({len(s.device_set) for s in seen_multi}),
        "single_inside_devices": sorted({len(s.device_set) for s in seen_single}),
        "compiled_batch_specs": compiled_specs,
        "out_param_specs": {k: spec_str(v.sharding) for k, v in p4.items()},
        "out_param_devices": sorted({len(v.sharding.device_set) for v in p4.values()}),
        "state_replicated": all(
            x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(s4)
        ),
        "hlo_all_reduce": all_reduce,
        "cache_size": multi._step_jit._cache_size(),
    }


def checkpoint_round_trip(mesh) -> dict:
    rule = shard_large_2d("model", 1)
    kw = dict(
        preset="sgn",
        predict_fn=make_predict([]),
        loss="softmax_cross_entropy",
        mesh=mesh,
        param_sharding=rule,
    )
    method = compose(**kw)
    params = init_params(jax.random.key(0))
    state = method.init(params)
    params, _ = method.resume(params, state)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save(Path(tmp) / "c.npz", params, state, method)
        p, s = checkpoint.restore(path, compose(**kw))
    same = all(
        np.asarray(a).tobytes() == np.asarray(b).tobytes()
        for a, b in zip(
            jax.tree_util.tree_leaves((p, s)),
            jax.tree_util.tree_leaves((params, state)),
            strict=True,
        )
    )
    return {
        "bitwise": same,
        "param_specs": {k: spec_str(v.sharding) for k, v in p.items()},
        "devices": sorted({len(v.sharding.device_set) for v in p.values()}),
    }


def main() -> int:
    devices = jax.device_count()
    if devices != 4:
        print(json.dumps({"error": f"expected 4 devices, got {devices}"}))
        return 2
    results = {"devices": devices, "cases": []}
    mesh = data_parallel_mesh(4)
    for preset in PRESETS:
        results["cases"].append(case(preset, preset, mesh, compiled_check=preset == "sgn"))
    mesh2 = data_parallel_mesh(4, model_axis="model", model_size=2)
    results["cases"].append(
        case("sgn_model_sharded", "sgn", mesh2, param_sharding=shard_large_2d("model", 1))
    )
    # a checkpoint of the model-sharded run comes back bitwise, laid out over the mesh
    results["checkpoint"] = checkpoint_round_trip(mesh2)
    # a batch that does not split over the 4 devices is refused before tracing
    method = compose(
        preset="sgn", predict_fn=make_predict([]), loss="softmax_cross_entropy", mesh=mesh
    )
    params = init_params(jax.random.key(0))
    x, y = batches()[0]
    try:
        method.step(params, method.init(params), (x[:14], y[:14]))
        results["indivisible"] = "no error"
    except InputError as exc:
        results["indivisible"] = f"InputError: {exc}"
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
