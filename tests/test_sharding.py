"""Data parallelism: 4 virtual CPU devices (in a subprocess) against one device.

``test_canonical_reductions_*`` runs ``tests/canonical_check.py`` the same way
(float32, canonical reductions on 1, 2 and 4 devices: bitwise the same).

The multi-device comparison runs ``tests/multidevice_check.py`` in its own process
with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the flag must be set
before JAX starts, so it cannot run in the pytest process) and asserts on the JSON
it prints. The rest checks the mesh helpers and their errors on one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from somax_plug import CompositionError, compose
from somax_plug._src.errors import InputError
from somax_plug._src.sharding import (
    DataParallel,
    data_parallel_mesh,
    replicated,
    shard_batch,
    shard_large_2d,
)

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-9  # float64; observed differences are ~1e-12 (reduction order, amplified by CG)


def _run_check(script: str, flags: str, *args: str) -> dict:
    """Run ``tests/<script>`` in its own process with ``XLA_FLAGS=flags``: its JSON line."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / script), *args],
        env={**os.environ, "XLA_FLAGS": flags},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def multidevice():
    return _run_check("multidevice_check.py", "--xla_force_host_platform_device_count=4")


def test_four_devices_match_one_device(multidevice):
    assert multidevice["devices"] == 4
    names = [c["name"] for c in multidevice["cases"]]
    assert {"sgn", "gauss_newton_lm", "sophia_h", "natural_gradient"} <= set(names)
    for c in multidevice["cases"]:
        assert c["param_diff"] <= TOL, c
        assert c["state_diff"] <= TOL, c
        assert c["info_diff"] <= TOL, c
        assert all(c["accepted"]), c
        assert c["loss_first_last"][1] < c["loss_first_last"][0], c


def test_batch_is_sharded_inside_the_step(multidevice):
    for c in multidevice["cases"]:
        # what the model sees inside the compiled step: its inputs split over 4 devices
        assert c["inside_specs"] == ["P('data',)"], c
        assert c["inside_devices"] == [4], c
        assert c["single_inside_devices"] == [1], c
        assert c["out_param_devices"] == [4], c
        assert c["state_replicated"], c
        assert c["cache_size"] == 1, c  # no recompilation across steps
    sgn = multidevice["cases"][0]
    assert sgn["compiled_batch_specs"] == ["P('data',)"]
    assert sgn["hlo_all_reduce"] is True  # GSPMD inserted the cross-device reductions
    assert set(sgn["out_param_specs"].values()) == {"P()"}


def test_parameters_can_be_sharded_along_a_model_axis(multidevice):
    case = next(c for c in multidevice["cases"] if c["name"] == "sgn_model_sharded")
    assert case["out_param_specs"]["w1"] == "P(None, 'model')"
    assert case["out_param_specs"]["w2"] == "P()"  # 3 columns do not split over 2 devices
    assert case["param_diff"] <= TOL


def test_checkpoint_of_a_sharded_run_restores_onto_the_mesh(multidevice):
    ckpt = multidevice["checkpoint"]
    assert ckpt["bitwise"] is True
    assert ckpt["param_specs"]["w1"] == "P(None, 'model')" and ckpt["devices"] == [4]


def test_indivisible_batch_is_a_clear_input_error(multidevice):
    msg = multidevice["indivisible"]
    assert msg.startswith("InputError:")
    assert "14" in msg and "4 devices" in msg and "multiple of 4" in msg


# ----------------------------------------------------------- one-device helpers
def test_data_parallel_mesh_shapes_and_errors():
    mesh = data_parallel_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    mesh = data_parallel_mesh(1, axis="batch", model_axis="model", model_size=1)
    assert mesh.axis_names == ("batch", "model")
    with pytest.raises(InputError, match="between 1 and"):
        data_parallel_mesh(jax.device_count() + 1)
    with pytest.raises(InputError, match="give model_size"):
        data_parallel_mesh(1, model_axis="model")
    with pytest.raises(InputError, match="must differ"):
        data_parallel_mesh(1, model_axis="data", model_size=1)


def test_layout_helpers():
    mesh = data_parallel_mesh(1)
    x, y = shard_batch((jnp.ones((4, 2)), jnp.zeros(4)), mesh)
    assert x.sharding.spec == P("data") and y.sharding.spec == P("data")
    assert replicated(mesh).spec == P()
    rule = shard_large_2d("data", min_size=4)
    dp = DataParallel(mesh, param_sharding=rule)
    sh = dp.tree_shardings({"w": jnp.ones((2, 4)), "b": jnp.ones(4), "i": jnp.ones((4, 4), int)})
    assert sh["w"].spec == P(None, "data") and sh["b"].spec == P() and sh["i"].spec == P()
    bad = DataParallel(mesh, param_sharding=lambda path, leaf: P("nope"))
    with pytest.raises(InputError, match=r"params\['w'\] uses mesh axis 'nope'"):
        bad.tree_shardings({"w": jnp.ones(3)})
    with pytest.raises(InputError, match="at most 1 entries"):
        DataParallel(mesh, param_sharding=lambda p, leaf: P(None, None)).tree_shardings(
            {"w": jnp.ones(3)}
        )
    with pytest.raises(InputError, match="jax.sharding.Mesh"):
        DataParallel("data")
    with pytest.raises(InputError, match="not an axis"):
        DataParallel(mesh, data_axis="model")


def test_mesh_of_one_device_gives_the_unsharded_numbers():
    predict = lambda p, x: x @ p
    kw = dict(
        curvature="ggn",
        solver={"name": "cg", "maxiter": 3},
        damping={"name": "constant", "lam": 0.1},
        predict_fn=predict,
        loss="mse",
    )
    plain, sharded = compose(**kw), compose(**kw, mesh=data_parallel_mesh(1))
    params = jnp.ones(3, jnp.float64)
    batch = (jnp.arange(12.0).reshape(4, 3) / 10, jnp.ones(4))
    p1, s1, i1 = plain.step(params, plain.init(params), batch)
    p2, s2, i2 = sharded.step(params, sharded.init(params), batch)
    np.testing.assert_allclose(p1, p2, rtol=1e-12)
    assert p2.sharding.spec == P()
    assert float(i1["loss"]) == pytest.approx(float(i2["loss"]), rel=1e-12)
    with pytest.raises(InputError, match="param_sharding needs a mesh"):
        compose(**kw, param_sharding=shard_large_2d())


# ------------------------------------------------- canonical reductions (float32)
BITWISE = ("sgn", "gauss_newton_lm", "direct_lm", "sophia_h", "pcg_jacobi", "ef_pcg")


@pytest.fixture(scope="module")
def canonical():
    # less XLA optimisation: compile time is most of it (bitwise equal either way;
    # the docs' numbers are with the default flags)
    flags = ("--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
    return _run_check("canonical_check.py", flags, *BITWISE)


def test_canonical_reductions_are_bitwise_the_same_on_1_2_and_4_devices(canonical):
    """``DataParallel(mesh, reduce_chunks=4)``, float32, random problems: 2 and 4
    devices give bitwise the 1-device parameters, solver iteration counts, lambda and
    accept sequences, losses and rho (the loss value, row_cholesky's and direct's
    dense algebra included), and the 1-device program is not a trivial one: the
    compositions iterate, and gauss_newton_lm's and sgn's lambda moves."""
    assert set(canonical["cases"]) == set(BITWISE)
    for name, case in canonical["cases"].items():
        for n in ("2", "4"):
            got = case[n]
            assert got["params_bitwise"] and got["max_param_diff"] == 0.0, (name, n, got)
            for key in ("iterations", "lam", "accepted", "loss", "rho"):
                assert got[f"{key}_equal"], (name, n, key, got)
    its = canonical["cases"]["sgn"]["iterations"]
    assert min(min(r) for r in its) >= 2  # CG ran several iterations on every problem
    for name in ("sgn", "gauss_newton_lm"):
        lams = canonical["cases"][name]["lam"]
        assert all(r[0] != r[-1] for r in lams), (name, lams)  # lambda was updated
    accepted = [a for r in canonical["cases"]["direct_lm"]["accepted"] for a in r]
    assert True in accepted and False in accepted  # rejections happened, the same ones
    # Loss.batch_sum of the Kronecker factors' sums (A, G; expand and reduce)
    assert canonical["batch_sum"] and all(
        all(by_n.values()) for by_n in canonical["batch_sum"].values()), canonical["batch_sum"]


@pytest.mark.parametrize("preset", ["kfac", "ekfac", "ggn_cg_kfac"])
def test_canonical_mode_refuses_the_components_that_read_the_layer_map(preset):
    # under reduce_chunks every parameter enters through one copy per chunk, where the
    # layer map recognises no layer: refused before tracing, not a silent diagonal
    layout = DataParallel(data_parallel_mesh(1), reduce_chunks=2)
    with pytest.raises(CompositionError, match="layer map") as err:
        compose(preset=preset, predict_fn=lambda p, x: x @ p["w"],
                loss="softmax_cross_entropy", mesh=layout)
    assert "reduce_chunks=None" in str(err.value)
