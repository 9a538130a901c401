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

from somax_plug import compose
from somax_plug._src.errors import InputError
from somax_plug._src.sharding import (
    DataParallel,
    data_parallel_mesh,
    replicated,
    shard_batch,
    shard_large_2d,
)
from tests.reliability import Case, check_corpus

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


KRONECKER = ("kfac", "ekfac", "ggn_cg_kfac")


@pytest.fixture(scope="module")
def canonical_kronecker():
    # the default backend optimisation: at --xla_backend_optimization_level=0 the Gram
    # matrix of a 17-column layer input rounded differently with one chunk per device
    # (6e-8, float32); bitwise on 1, 2 and 4 devices with the default level
    flags = "--xla_force_host_platform_device_count=4 --xla_llvm_disable_expensive_passes=true"
    return _run_check("canonical_check.py", flags, *KRONECKER)


def test_canonical_kronecker_components_are_bitwise_the_same_on_1_2_and_4_devices(
        canonical_kronecker):
    """The layer map and the tapped pass under ``reduce_chunks``: KFAC (model_step,
    factor EMA, pi-damped inverses), EKFAC (its ``S`` through ``Loss.batch_sum``) and
    KFAC-preconditioned CG give bitwise the 1-device trajectories on 2 and 4 devices,
    and the run is not trivial (CG iterates, the layers are factored: KFAC-PCG ends
    at its maxiter only if the preconditioner did not solve it)."""
    cases = canonical_kronecker["cases"]
    assert set(cases) == set(KRONECKER)
    for name, case in cases.items():
        for n in ("2", "4"):
            got = case[n]
            assert got["params_bitwise"] and got["max_param_diff"] == 0.0, (name, n, got)
            for key in ("iterations", "lam", "accepted", "loss", "rho"):
                assert got[f"{key}_equal"], (name, n, key, got)
    assert all(i == 1 for r in cases["ekfac"]["iterations"] for i in r)  # direct inverse
    assert min(min(r) for r in cases["ggn_cg_kfac"]["iterations"]) >= 2


# ------------------------------------ the layer map under reduce_chunks (float64, 1 device)
def _tokens_model(p, x):  # x [B, T, d]: the layer sees [T, B, d] (batch axis 1)
    h = jnp.tanh(jnp.swapaxes(x, 0, 1) @ p["w1"] + p["b1"])  # [T, B, h]
    return jnp.mean(h, axis=0) @ p["w2"] + p["b2"]


def _mlp_model(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _conv_model(p, x):  # x [B, 4, 4, 3] NHWC, a 3x3 VALID conv to 5 channels
    y = jax.lax.conv_general_dilated(x, p["w1"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y + p["b1"]).reshape(x.shape[0], -1)[:, :5] @ p["w2"] + p["b2"]


def _layer_case(which, seed=0):
    rng = np.random.default_rng(seed)
    d_in, hid, d_out, b = 3, 5, 4, 8
    params = {"w1": rng.normal(size=(3, 3, d_in, hid) if which == "conv" else (d_in, hid)),
              "b1": rng.normal(size=hid), "w2": rng.normal(size=(hid, d_out)),
              "b2": rng.normal(size=d_out)}
    params = {k: jnp.asarray(v) / 3 for k, v in params.items()}
    shape = {"tokens": (b, 2, d_in), "conv": (b, 4, 4, d_in)}.get(which, (b, d_in))
    x = jnp.asarray(rng.normal(size=shape))
    y = jnp.asarray(rng.integers(0, d_out, b))
    models = {"tokens": _tokens_model, "conv": _conv_model, "mlp": _mlp_model}
    return models[which], params, x, y


def _spd(n):
    q = np.linalg.qr(np.random.default_rng(n).normal(size=(n, n)))[0]
    return jnp.asarray(q @ np.diag(np.arange(1.0, n + 1)) @ q.T)


@pytest.mark.parametrize("which", ["mlp", "tokens", "conv"])
def test_canonical_layer_map_and_factors_equal_the_plain_model(which):
    """Under ``reduce_chunks=4`` the layer map is the plain model's (the same layers,
    axes and shapes), the tapped pass gives the same outputs, layer inputs, ``J^T u``
    and output gradients, and the Kronecker factors (both approximations), EKFAC's
    ``S`` (in a fixed basis) equal the plain model's to 1e-12 (float64: the canonical
    mode only reorders sums of ~10 terms). ``tokens`` puts the layer's batch axis at
    position 1 (the chunks split and merge along it) with a shared axis; ``conv`` a
    conv layer (an HWIO kernel), whose transposed, chunk-batched conv the factors
    ``vmap`` again inside the jitted step (this failed in JAX's conv batching rule
    while the chunk broadcast kept a pinned parameter's mesh in its abstract value):
    there a KFAC step equals the plain one too."""
    from somax_plug import Resources, make_model
    from somax_plug._src.sharding import canonical_model
    from somax_plug.builtin.kronecker import PROVIDERS as KRON
    from somax_plug.builtin.kronecker import _ekfac_eig, factor_resource
    from somax_plug.builtin.layers import PROVIDERS as LAYERS
    from somax_plug.builtin.resources import PROVIDERS as BASE
    from somax_plug.layers import discover, layer_io

    predict, params, x, y = _layer_case(which)
    dp = DataParallel(data_parallel_mesh(1), reduce_chunks=4)
    plain = make_model(predict, "softmax_cross_entropy")
    canon = canonical_model(plain, dp)
    lm = discover(predict, params, x)
    assert discover(canon.predict_fn, params, x) == lm
    assert lm.kernels == ("w1", "w2") and not lm.unmatched
    assert lm["w1"].kind == ("conv" if which == "conv" else "dense")
    if which == "tokens":
        assert lm["w1"].batch_axes == (1,) and lm["w1"].shared_axes == (0,)
    u = jnp.asarray(np.random.default_rng(1).normal(size=(x.shape[0], 4)))
    providers = {**BASE, **LAYERS, **KRON}

    def pieces(model, p, inputs):
        io = layer_io(model.predict_fn, p, inputs, lm)
        out = {"outputs": io.outputs, "inputs": io.inputs, "vjp": io.vjp(u),
               "jvp": io.jvp(p)}
        res = Resources(model, p, (inputs, y), jax.random.key(0), providers)
        for approx in ("expand", "reduce"):
            f = res[factor_resource("ggn", approx)]
            out[approx] = (f.A, f.G)
            # S in a fixed basis (spd matrices with distinct eigenvalues): the factors'
            # own bases are arbitrary in a degenerate eigenspace (KFAC-reduce of the
            # conv: 8 rows for 28 columns), and 1e-17 apart they rotate it
            out[approx + "_S"] = [
                _ekfac_eig(_spd(a.shape[0]), _spd(g.shape[0]), ra, rg, approx,
                           model.loss.batch_sum)[2]
                for a, g, ra, rg in zip(f.A, f.G, f.a, f.g, strict=True)]
        return out

    got = jax.jit(lambda p, inputs: pieces(canon, p, inputs))(params, x)
    want = jax.jit(lambda p, inputs: pieces(plain, p, inputs))(params, x)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12,
                                                                   atol=1e-13), got, want)
    if which != "conv":
        return
    kw = dict(predict_fn=predict, loss="softmax_cross_entropy", curvature="kfac",
              solver="kronecker_inverse", damping={"name": "constant", "lam": 0.1})
    m_c, m_p = compose(**kw, mesh=dp), compose(**kw)
    p_c = m_c.step(params, m_c.init(params), (x, y), jax.random.key(0))[0]
    p_p = m_p.step(params, m_p.init(params), (x, y), jax.random.key(0))[0]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-11), p_c, p_p)


def _pairs_model(p, x):  # [B, B, d]: both leading axes of the layer input grow with B
    return jnp.mean((x[:, None, :] * x[None, :, :]) @ p["w1"], axis=1)


def _whole_batch_model(p, x):  # a layer that sees the whole batch as one row
    return jnp.broadcast_to(x.reshape(1, -1) @ p["w1"], (x.shape[0], 2))


def _canonical_layer_io(predict, params, x):
    from somax_plug import make_model
    from somax_plug._src.sharding import canonical_model
    from somax_plug.layers import discover, layer_io

    canon = canonical_model(make_model(predict, "mse"),
                            DataParallel(data_parallel_mesh(1), reduce_chunks=4))
    lm = discover(predict, params, x)
    return layer_io(canon.predict_fn, params, x, lm), layer_io(predict, params, x, lm)


def _same_io(got):
    io_c, io_p = got
    np.testing.assert_array_equal(io_c.outputs, io_p.outputs)
    np.testing.assert_array_equal(io_c.inputs["w2"], io_p.inputs["w2"])


def _kfac_steps(predict, params, x, reduce_chunks=4):
    y = jnp.asarray(np.random.default_rng(2).integers(0, 2, x.shape[0]))
    mesh = DataParallel(data_parallel_mesh(1), reduce_chunks=reduce_chunks)
    method = compose(predict_fn=predict, loss="softmax_cross_entropy", curvature="kfac",
                     solver="kronecker_inverse", damping={"name": "constant", "lam": 0.1},
                     mesh=mesh)
    return method.step(params, method.init(params), (x, y), jax.random.key(0))[0]


def _scaled_model(p, x):  # "s" is in no layer: a diagonal block, from the tapped VJP
    return p["s"] * jnp.tanh(x @ p["w1"]) @ p["w2"]


def _like_plain(params, x):
    def check(got):
        want = _kfac_steps(_scaled_model, params, x, reduce_chunks=None)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-11),
                               got, want)
    return check


def test_canonical_layer_io_refuses_what_it_cannot_chunk():
    """The tapped pass under ``reduce_chunks``, bad and edge inputs: a layer with two
    batch axes is refused (at ``layer_io`` and inside a KFAC step) naming the layer,
    its axes and what to do; a layer that sees the whole batch as one row is refused
    by the step's input check (the chunked model cannot run); inputs that do not
    split into the chunks (3 examples, ``K = 4``) get the plain tapped pass; a
    parameter in no layer gets its diagonal block as without ``reduce_chunks``."""
    from somax_plug.layers import discover

    predict, params, x, _ = _layer_case("mlp")
    p1 = {"w1": params["w1"]}
    assert discover(_pairs_model, p1, x)["w1"].batch_axes == (0, 1)
    scaled = {"s": jnp.asarray(1.5), "w1": params["w1"], "w2": params["w2"][:, :2]}
    cases = [
        Case("layer_io: a layer with two batch axes",
             lambda: _canonical_layer_io(_pairs_model, p1, x),
             says=("'w1'", "2 batch axes (0, 1)", "one batch axis", "reduce_chunks=None")),
        Case("kfac step: a layer with two batch axes",
             lambda: _kfac_steps(_pairs_model, {"w1": params["w1"][:, :2]}, x),
             says=("'w1'", "2 batch axes", "reduce_chunks=None")),
        Case("kfac step: a layer that sees the whole batch as one row",
             lambda: _kfac_steps(_whole_batch_model, {"w1": jnp.ones((24, 2))}, x),
             says=("predict_fn", "fails", "[24, 2]")),
        Case("layer_io: 3 examples, K = 4: the plain tapped pass",
             lambda: _canonical_layer_io(predict, params, x[:3]), expect="ok",
             check=_same_io),
        Case("kfac step: a parameter in no layer (diagonal block)",
             lambda: _kfac_steps(_scaled_model, scaled, x), expect="ok",
             check=_like_plain(scaled, x)),
    ]
    counts = check_corpus("canonical layer map", cases)
    assert counts["named"] == 3 and counts["ok"] == 2


def test_bench_part_canonical_kfac_is_registered_with_its_schema():
    from somax_plug._src import bench
    from somax_plug._src.benchmarks import canonical_kfac

    assert "canonical_kfac" in bench._part_names()
    report = canonical_kfac.run(smoke=True)
    assert set(report["seconds_per_step"]) == set(canonical_kfac.LAYOUTS)
    assert all(t > 0 for t in report["seconds_per_step"].values())
    assert report["reduce_chunks_overhead"] > 0

