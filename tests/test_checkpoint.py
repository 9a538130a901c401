"""Checkpoints on Orbax: bitwise resume, PRNG keys and odd dtypes, clear refusals,
the state-spec check before the first step, Orbax's own API and CheckpointManager."""

from __future__ import annotations

import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from somax_plug import checkpoint, compose, hookimpl
from somax_plug._src.errors import CheckpointError
from somax_plug._src.loader import load_registry, register_plugin
from somax_plug._src.registry import PluginRecord
from somax_plug._src.spec import ComponentSpec

N = 6  # 2N = 12 steps: sophia_h's estimator (every 10 steps) ticks after the restore


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def init_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (4, 6), jnp.float64) / 2.0,
        "b1": jnp.zeros(6, jnp.float64),
        "w2": jax.random.normal(k2, (6, 3), jnp.float64) / np.sqrt(6.0),
        "b2": jnp.zeros(3, jnp.float64),
    }


def batch(i):
    x = jax.random.normal(jax.random.key(100 + i % 3), (16, 4), jnp.float64)
    w = jax.random.normal(jax.random.key(7), (4, 3), jnp.float64)
    return x, jnp.argmax(x @ w, axis=-1)


PARAMS = init_params()


def assert_bitwise(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y, equal_nan=x.dtype.kind in "fc")
        assert x.tobytes() == y.tobytes()


def make(preset, **kw):
    return compose(preset=preset, predict_fn=mlp, loss="softmax_cross_entropy", **kw)


@pytest.mark.parametrize("preset", ["sgn", "gauss_newton_lm", "sophia_h"])
def test_resume_is_bitwise(preset, tmp_path):
    method = make(preset)
    params, state = PARAMS, method.init(PARAMS)
    infos = []
    for i in range(2 * N):
        if i == N:
            path = checkpoint.save(tmp_path / "ckpt", params, state, method, metadata={"step": i})
        params, state, info = method.step(params, state, batch(i), jax.random.key(i))
        infos.append(info)

    fresh = make(preset)  # a new Method (new jit) from the same composition
    p, s = checkpoint.restore(path, fresh)
    assert int(s.count) == N
    assert checkpoint.read_header(path)["metadata"] == {"step": N}
    resumed = []
    for i in range(N, 2 * N):
        p, s, info = fresh.step(p, s, batch(i), jax.random.key(i))
        resumed.append(info)
    assert_bitwise(p, params)
    assert_bitwise(s, state)
    assert_bitwise(resumed, infos[N:])


# ------------------------------------------------------- cheap methods (no steps)
def cheap(**kw):
    base = dict(
        curvature="ggn",
        solver="identity",
        damping={"name": "constant", "lam": 0.0},
        predict_fn=mlp,
        loss="softmax_cross_entropy",
    )
    return compose(**{**base, **kw})


def keyed_tx():
    """An Optax transformation whose state holds a typed PRNG key and a raw one."""

    def init(params):
        return {"key": jax.random.key(5), "raw": jax.random.PRNGKey(6)}

    def update(updates, state, params=None):
        return updates, {
            "key": jax.random.split(state["key"])[0],
            "raw": jax.random.split(state["raw"])[0],
        }

    return optax.GradientTransformation(init, update)


def test_keys_and_bfloat16_round_trip(tmp_path):
    method = cheap(tx=optax.chain(keyed_tx(), optax.scale_by_learning_rate(0.1)))
    params = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) / 7, "b": jnp.ones(3)}
    state = method.init(params)
    path = checkpoint.save(tmp_path / "k", params, state, method)
    header = checkpoint.read_header(path)
    impls = [m.get("key_impl") for m in header["state"]["leaves"]]
    assert "threefry2x32" in impls
    p, s = checkpoint.restore(
        path, cheap(tx=optax.chain(keyed_tx(), optax.scale_by_learning_rate(0.1)))
    )
    assert p["w"].dtype == jnp.bfloat16
    assert_bitwise(p, params)
    assert_bitwise(s, state)
    assert jax.dtypes.issubdtype(s.tx[0]["key"].dtype, jax.dtypes.prng_key)


def test_other_plan_is_refused_naming_both_fingerprints(tmp_path):
    method = make("sgn")
    path = checkpoint.save(tmp_path / "c", PARAMS, method.init(PARAMS), method)
    other = make("sgn", solver={"name": "cg", "maxiter": 20})
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(path, other)
    msg = str(info.value)
    assert method.plan.fingerprint in msg and other.plan.fingerprint in msg
    assert "solver" in msg and "maxiter=10" in msg and "maxiter=20" in msg
    with pytest.raises(CheckpointError, match="The plans differ"):
        checkpoint.restore(path, other, allow_plugin_change=True)
    with pytest.raises(CheckpointError, match="solver: builtin:cg"):  # sgn vs auto
        checkpoint.restore(path, make("gauss_newton_lm"))


def _registry_with_extra_plugin():
    @hookimpl
    def somax_plug_register(register):
        register(
            ComponentSpec(kind="solver", name="extra_solver", factory=lambda: None, provides=set())
        )

    plugin = types.SimpleNamespace(somax_plug_register=somax_plug_register)
    reg = load_registry(env={}, entry_points=[])
    record = PluginRecord(name="extra")
    reg.plugins["extra"] = record
    register_plugin(reg, reg.plugin_manager, "extra", plugin, record)
    assert record.status == "ok", record.error
    return reg


def test_other_plugin_set_needs_allow_plugin_change(tmp_path):
    method = make("sgn")
    state = method.init(PARAMS)
    path = checkpoint.save(tmp_path / "c", PARAMS, state, method)
    reg = _registry_with_extra_plugin()
    same_plan = make("sgn", registry=reg)
    assert same_plan.plan.registry_fingerprint != method.plan.registry_fingerprint
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(path, same_plan)
    msg = str(info.value)
    assert method.plan.registry_fingerprint in msg and same_plan.plan.registry_fingerprint in msg
    assert "plugin set" in msg and "allow_plugin_change=True" in msg
    p, s = checkpoint.restore(path, same_plan, allow_plugin_change=True)
    assert_bitwise(p, PARAMS)
    assert_bitwise(s, state)
    other_plan = make("sgn", registry=reg, damping={"name": "constant", "lam": 0.5})
    with pytest.raises(CheckpointError, match="damping"):
        checkpoint.restore(path, other_plan, allow_plugin_change=True)


class Params(NamedTuple):
    w: jax.Array
    b: jax.Array


def test_structure_mismatches_and_custom_nodes(tmp_path):
    predict = lambda p, x: x @ p.w + p.b
    method = cheap(predict_fn=predict, loss="mse")
    params = Params(jnp.ones((2, 3)), jnp.zeros(3))
    path = checkpoint.save(tmp_path / "n", params, method.init(params), method)
    with pytest.raises(CheckpointError, match="params_like"):
        checkpoint.restore(path, cheap(predict_fn=predict, loss="mse"))
    p, _ = checkpoint.restore(path, cheap(predict_fn=predict, loss="mse"), params_like=params)
    assert isinstance(p, Params)
    wrong = r"params\.w: expected float64\[3, 3\] \(params_like\), found float64\[2, 3\]"
    with pytest.raises(CheckpointError, match=wrong):
        checkpoint.restore(
            path,
            cheap(predict_fn=predict, loss="mse"),
            params_like=Params(jnp.ones((3, 3)), jnp.zeros(3)),
        )
    # same plan, another tx: the state no longer has the saved structure
    dict_params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    m = cheap(predict_fn=lambda p, x: x @ p["w"] + p["b"], loss="mse")
    path2 = checkpoint.save(tmp_path / "d", dict_params, m.init(dict_params), m)
    with pytest.raises(CheckpointError, match="state structure differs"):
        checkpoint.restore(
            path2, cheap(predict_fn=m.model.predict_fn, loss="mse", tx=optax.adam(1e-3))
        )
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a somax_plug checkpoint"):
        checkpoint.restore(tmp_path / "junk.npz", m)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.restore(tmp_path / "missing.npz", m)


# ------------------------------------------------------------- on Orbax
def tiny():
    return compose(preset="sgn", predict_fn=lambda p, x: x @ p["w"] + p["b"], loss="mse")


TINY = {"w": jnp.arange(6.0).reshape(3, 2) / 10, "b": jnp.ones(2)}


def _resave_state(path, state):
    """Hand-edit a checkpoint: replace its Orbax ``state`` item (the header is kept)."""
    import shutil

    import orbax.checkpoint as ocp

    shutil.rmtree(path / "state")
    with ocp.StandardCheckpointer() as ck:
        ck.save(path / "state", state)
        ck.wait_until_finished()


@pytest.mark.parametrize("which", ["shape", "dtype"])
def test_a_wrong_shape_or_dtype_is_named_before_the_first_step(which, tmp_path):
    method = tiny()
    state = method.init(TINY)
    path = checkpoint.save(tmp_path / "c", TINY, state, method)
    if which == "shape":
        lam = state.damping.lam
        bad = state._replace(damping=state.damping._replace(lam=jnp.zeros(2, lam.dtype)))
        leaf, expected, found = "state.damping.lam", f"{lam.dtype}[]", f"{lam.dtype}[2]"
    else:
        bad = state._replace(count=np.int16(0))
        leaf, expected, found = "state.count", "int32[]", "int16[]"
    _resave_state(path, bad)
    fresh = tiny()
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(path, fresh)
    msg = str(info.value)
    assert f"{leaf}: expected {expected} (this method's state spec), found {found}" in msg
    assert fresh._validator.state_spec is None  # nothing was adopted


def test_save_refuses_a_state_that_is_not_this_methods(tmp_path):
    method = tiny()
    state = method.init(TINY)
    bad = state._replace(count=jnp.zeros(3, jnp.int32))
    with pytest.raises(CheckpointError, match=r"state\.count is int32\[3\] but this method"):
        checkpoint.save(tmp_path / "c", TINY, bad, method)
    with pytest.raises(CheckpointError, match="metadata must be JSON-serialisable"):
        checkpoint.save(tmp_path / "c", TINY, state, method, metadata={"x": object()})
    with pytest.raises(CheckpointError, match="metadata must be a dict"):
        checkpoint.save(tmp_path / "c", TINY, state, method, metadata=[1, 2])
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp left


def test_checkpoints_open_with_orbax_own_api(tmp_path):
    import orbax.checkpoint as ocp

    method = tiny()
    params, state, _ = method.step(TINY, method.init(TINY), (jnp.ones((4, 3)), jnp.ones((4, 2))))
    path = checkpoint.save(tmp_path / "c", params, state, method, metadata={"epoch": 2})
    with ocp.StandardCheckpointer() as ck:
        s = ck.restore(path / "state", method.state_spec(params))
        p = ck.restore(path / "params", jax.eval_shape(lambda: params))
    assert_bitwise(s, state)
    assert_bitwise(p, params)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        both = ck.restore(
            path,
            ocp.args.Composite(
                params=ocp.args.StandardRestore(jax.eval_shape(lambda: params)),
                somax_plug=ocp.args.JsonRestore(),
            ),
        )
    assert_bitwise(both["params"], params)
    header = both["somax_plug"]
    assert header["plan_fingerprint"] == method.plan.fingerprint
    assert header["registry_fingerprint"] == method.plan.registry_fingerprint
    assert header["metadata"] == {"epoch": 2} and header["format"] == checkpoint_format()


def checkpoint_format():
    from somax_plug._src.checkpoint import FORMAT

    return FORMAT


def _doc_block(tag):
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs/howto/checkpoint.md").read_text()
    block = text.split(f"<!-- test: {tag} -->\n```python\n", 1)[1]
    return block.split("```", 1)[0]


def test_the_howto_checkpoint_manager_example_runs(tmp_path):
    """The worked example of docs/howto/checkpoint.md, the restore in a new process."""
    import subprocess
    import sys

    run_dir = str(tmp_path / "run")
    env = {"run_dir": run_dir}
    exec(compile(_doc_block("manager-save"), "manager-save", "exec"), env)
    saved_params, saved_state = env["params"], env["state"]
    prelude = "\n".join(
        line for line in _doc_block("manager-save").splitlines() if "import" in line
    )
    helpers = _doc_block("manager-save").split("method = make_method()")[0]
    script = (
        f"{prelude}\nimport numpy as np\nrun_dir = {run_dir!r}\n{helpers}\n"
        "x, y = jnp.arange(12.0).reshape(4, 3) / 10, jnp.ones((4, 2))\n"
        + _doc_block("manager-restore")
        + "\nprint(int(step), int(state.count), np.asarray(params['w']).tobytes().hex())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    step, count, w = out.stdout.split()[-3:]
    assert (int(step), int(count)) == (2, 4)  # restored after 3 steps, then one more
    assert int(saved_state.count) == 3
    assert saved_params["w"].shape == (3, 2) and len(bytes.fromhex(w)) == 6 * 4


def test_adopt_checks_the_plan_and_the_stored_arrays(tmp_path):
    import orbax.checkpoint as ocp

    method = tiny()
    state = method.init(TINY)
    good = state._replace(count=jnp.asarray(5, jnp.int32))
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(
            0,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(good),
                somax_plug=ocp.args.JsonSave(checkpoint.describe(method)),
            ),
        )
        mngr.save(
            1,
            args=ocp.args.Composite(state=ocp.args.StandardSave(good._replace(count=np.int16(5)))),
        )
        mngr.wait_until_finished()
        spec = method.state_spec(TINY)
        r0 = mngr.restore(
            0,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(spec), somax_plug=ocp.args.JsonRestore()
            ),
        )
        r1 = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(spec)))
        stored0, stored1 = mngr.item_metadata(0)["state"], mngr.item_metadata(1)["state"]
    p, s = checkpoint.adopt(tiny(), TINY, r0["state"], described=r0["somax_plug"], stored=stored0)
    assert_bitwise(s, good)
    other = compose(
        preset="sgn",
        predict_fn=lambda p, x: x @ p["w"] + p["b"],
        loss="mse",
        damping={"name": "constant", "lam": 0.5},
    )
    with pytest.raises(CheckpointError) as info:
        checkpoint.adopt(other, TINY, r0["state"], described=r0["somax_plug"])
    assert method.plan.fingerprint in str(info.value)
    assert other.plan.fingerprint in str(info.value)
    # Orbax cast the int16 count into the int32 target; the stored metadata shows it
    assert r1["state"].count.dtype == jnp.int32
    with pytest.raises(CheckpointError, match=r"state\.count: expected int32\[\] .*found int16"):
        checkpoint.adopt(tiny(), TINY, r1["state"], stored=stored1)
    with pytest.raises(CheckpointError, match="structure differs"):
        checkpoint.adopt(tiny(), TINY, {"count": r1["state"].count})


def test_nothing_in_the_checkpoint_path_unpickles(tmp_path, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("the checkpoint path unpickled")

    class Refuse(pickle.Unpickler):
        def __init__(self, *a, **k):
            refuse()

    method = tiny()
    state = method.init(TINY)
    for name, value in (("loads", refuse), ("load", refuse), ("Unpickler", Refuse)):
        monkeypatch.setattr(pickle, name, value)
    monkeypatch.setattr(np, "load", refuse)
    path = checkpoint.save(tmp_path / "c", TINY, state, method)
    checkpoint.read_header(path)
    p, s = checkpoint.restore(path, tiny())
    assert_bitwise(s, state)
    (tmp_path / "r").write_bytes(b"\x80\x04\x95random bytes that look like a pickle")
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(tmp_path / "r", method)
    assert "pickle" not in str(info.value).lower()


def test_without_orbax_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    method = tiny()
    with pytest.raises(CheckpointError, match=r"somax-plug\[checkpoint\]"):
        checkpoint.save(tmp_path / "c", TINY, method.init(TINY), method)
    with pytest.raises(CheckpointError, match="pip install"):
        checkpoint.restore(tmp_path / "c", method)
    code = (
        "import sys, somax_plug, somax_plug.checkpoint\n"
        "print(sorted(m for m in sys.modules if m.startswith('orbax')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-500:]


def test_a_bare_array_of_parameters_round_trips(tmp_path):
    """Orbax's StandardSave takes containers only: a bare array is stored as {"value": x}."""
    import orbax.checkpoint as ocp

    method = compose("ggn", "cg", predict_fn=lambda p, x: x @ p, loss="mse")
    params = jnp.arange(3.0)
    params, state, _ = method.step(params, method.init(params), (jnp.eye(3), jnp.ones(3)))
    path = checkpoint.save(tmp_path / "c", params, state, method)
    p, s = checkpoint.restore(path, compose("ggn", "cg", predict_fn=lambda p, x: x @ p, loss="mse"))
    assert_bitwise(p, params)
    assert_bitwise(s, state)
    assert checkpoint.read_header(path)["params"]["wrapped"] is True
    with ocp.StandardCheckpointer() as ck:
        raw = ck.restore(path / "params", {"value": jax.eval_shape(lambda: params)})
    assert_bitwise(raw["value"], params)


def bn_dropout(p, x, *, state, key):
    """A tiny model with a running mean (state) and dropout (key)."""
    h = x @ p["w1"]
    mean = h.mean(0)
    h = jnp.tanh((h - mean) / jnp.sqrt(h.var(0) + 1e-5))
    h = jnp.where(jax.random.bernoulli(key, 0.7, h.shape), h / 0.7, 0.0)
    return h @ p["w2"], {"mean": 0.9 * state["mean"] + 0.1 * mean}


def test_a_model_with_state_and_key_resumes_bitwise(tmp_path):
    def make_stateful():
        return compose(
            "ggn",
            "cg",
            predict_fn=bn_dropout,
            loss="softmax_cross_entropy",
            has_state=True,
            has_rng=True,
        )

    k1, k2 = jax.random.split(jax.random.key(3))
    params = {"w1": jax.random.normal(k1, (4, 5)), "w2": jax.random.normal(k2, (5, 3))}
    model_state = {"mean": jnp.zeros(5)}
    method = make_stateful()
    state = method.init(params, model_state)
    n = 2
    for i in range(2 * n):
        if i == n:
            path = checkpoint.save(tmp_path / "c", params, state, method)
        params, state, _ = method.step(params, state, batch(i), jax.random.key(i))
    fresh = make_stateful()
    with pytest.raises(CheckpointError, match="call method.init"):
        checkpoint.restore(path, fresh)  # the model state's shapes come from init
    fresh.init(zeros_like_saved(path), model_state)
    p, s = checkpoint.restore(path, fresh)
    for i in range(n, 2 * n):
        p, s, _ = fresh.step(p, s, batch(i), jax.random.key(i))
    assert_bitwise(p, params)
    assert_bitwise(s, state)


def zeros_like_saved(path):
    """Parameters of the checkpoint's shapes (zeros), for a fresh method's init."""
    leaves = checkpoint.read_header(path)["params"]["leaves"]
    return {m["path"][2:-2]: jnp.zeros(m["shape"], m["dtype"]) for m in leaves}


def test_the_docstring_examples_run():
    import doctest

    from somax_plug._src import checkpoint as impl

    result = doctest.testmod(impl, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0
