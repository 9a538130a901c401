"""The planner and the step: requirements, shared resources, cadences, Optax."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import somax_plug
from somax_plug import hookimpl
from somax_plug._src.cli import main as cli_main
from somax_plug._src.composition import Composition, compose, load_composition
from somax_plug._src.errors import CompositionError, PlanVetoed
from somax_plug._src.kinds import Estimator, Kind
from somax_plug._src.loader import load_registry
from somax_plug._src.optax_bridge import as_optax
from somax_plug._src.planner import make_plan
from somax_plug._src.registry import get_registry
from somax_plug._src.resources import ResourceProvider
from somax_plug._src.spec import ComponentSpec, Requires
from somax_plug.testing.references import ProbeSolver


# ----------------------------------------------------------------- a small model
def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def init_params(key, d_in=4, hidden=6, d_out=3, dtype=jnp.float64):
    k1, k2 = jax.random.split(key)
    return {
        "w1": (jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in)).astype(dtype),
        "b1": jnp.zeros(hidden, dtype),
        "w2": (jax.random.normal(k2, (hidden, d_out)) / np.sqrt(hidden)).astype(dtype),
        "b2": jnp.zeros(d_out, dtype),
    }


def make_batch(key, n=16, d_in=4, d_out=3, dtype=jnp.float64):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d_in), dtype)
    w = jax.random.normal(kw, (d_in, d_out), dtype)
    labels = jnp.argmax(x @ w, axis=-1)
    return x, labels


def counting(fn):
    calls = {"n": 0}

    def wrapped(params, x):
        calls["n"] += 1
        return fn(params, x)

    return wrapped, calls


PARAMS = init_params(jax.random.key(0))
CONSTANT = {"name": "constant", "lam": 1e-2}
BATCH = make_batch(jax.random.key(1))


def loss_of(params, batch=BATCH):
    logits = mlp(params, batch[0])
    return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])))


# -------------------------------------------------------------- plan structure
def test_sgn_plan_shares_one_linearization():
    plan = make_plan("sgn")
    lin = plan.resource("linearization")
    assert lin is not None and lin.every_k == 1
    assert [r.name for r in plan.resources].count("linearization") == 1
    consumers = {(c.kind, c.name) for c in lin.consumers}
    # loss and grad reuse the linearization when it is computed anyway (sharing edges)
    assert {("share", "loss"), ("share", "grad"), ("resource", "operator")} <= consumers
    op = plan.resource("operator")
    assert op.read_by("component", "solver") and op.read_by("resource", "predicted_decrease")
    assert plan.resource("predicted_decrease").phase == "after_update"
    text = plan.explain()
    assert "linearization" in text and "solver:cg" in text
    data = plan.to_dict()
    assert set(data) >= {"components", "resources", "hooks", "fingerprint"}
    for r in data["resources"]:
        assert set(r) >= {"name", "producer", "consumers", "every_k"}
    assert hash(plan) == hash(make_plan("sgn"))
    assert plan.fingerprint == make_plan("sgn").fingerprint
    assert plan.registry_fingerprint == get_registry().fingerprint()


def test_cadence_is_the_finest_consumer():
    plan = make_plan(
        {
            "curvature": "hessian",
            "estimators": [{"name": "hutchinson_diag", "every_k": 5}],
            "preconditioner": {"name": "diag_ema", "every_k": 5},
            "solver": "identity",
        }
    )
    assert plan.resource("operator").every_k == 5  # only the estimator reads it
    assert plan.resource("grad").every_k == 1  # the step reads it every step
    assert plan.component("estimator[0]").every_k == 5


def test_cg_on_hessian_is_refused_before_tracing_naming_alternatives():
    with pytest.raises(CompositionError) as info:
        make_plan({"curvature": "hessian", "solver": {"name": "cg", "negative_curvature": "none"}})
    msg = str(info.value)
    assert "psd" in msg and "'minres'" in msg and "'ggn'" in msg
    # the guarded variant runs on a symmetric operator
    make_plan({"curvature": "hessian", "solver": {"name": "cg", "negative_curvature": "guard"}})


def test_missing_statistic_names_estimators():
    with pytest.raises(CompositionError, match="needs statistic 'diag'.*hutchinson_diag"):
        make_plan({"curvature": "ggn", "solver": "diagonal"})


def test_gnb_with_another_loss_is_refused_by_its_declared_loss_requirement():
    expect = "'gnb_diag' needs loss 'softmax_cross_entropy'.*'mse'"
    with pytest.raises(CompositionError, match=expect):
        compose(preset="sophia_g", predict_fn=mlp, loss="mse")


def test_bad_options_and_names_fail_before_tracing():
    with pytest.raises(CompositionError, match="did you mean 'minres'"):
        make_plan({"curvature": "ggn", "solver": "minre"})
    with pytest.raises(CompositionError, match="has no option 'not_an_option'; its options: tol"):
        make_plan({"curvature": "ggn", "solver": {"name": "cg", "not_an_option": 1}})
    with pytest.raises(CompositionError, match="unknown composition keys"):
        Composition.from_dict({"solver": "cg", "solvr": "cg"})
    with pytest.raises(CompositionError, match="needs a solver"):
        Composition.from_dict({"curvature": "ggn"})


# ------------------------------------------------------------ plugin hooks
class SquaredGradNorm(Estimator):
    """Test estimator reading a plugin-provided resource."""

    def init(self, params):
        return {"stats": {"gnorm2": jnp.zeros((), jnp.float64)}}

    def estimate(self, res, key, state):
        value = res["grad_norm_sq"]
        return {"gnorm2": value}, {"stats": {"gnorm2": value}}


def _plugin_registry(**hooks):
    calls = {"provider": 0}

    @hookimpl
    def somax_plug_register(register):
        register(
            ComponentSpec(
                kind="estimator",
                name="gnorm2",
                provides={"gnorm2"},
                requires=Requires(resources={"grad_norm_sq"}),
                factory=SquaredGradNorm,
            )
        )

    @hookimpl
    def somax_plug_provide_resource(name, registry):
        if name != "grad_norm_sq":
            return None

        def compute(res):
            calls["provider"] += 1
            return somax_plug._src.tree.vdot(res["grad"], res["grad"])

        return ResourceProvider("grad_norm_sq", compute, requires={"grad"})

    plugin = types.SimpleNamespace(
        somax_plug_register=somax_plug_register,
        somax_plug_provide_resource=somax_plug_provide_resource,
        **hooks,
    )
    reg = load_registry(env={}, entry_points=[])
    from somax_plug._src.loader import register_plugin
    from somax_plug._src.registry import PluginRecord

    record = PluginRecord(name="extra")
    reg.plugins["extra"] = record
    register_plugin(reg, reg.plugin_manager, "extra", plugin, record)
    assert record.status == "ok", record.error
    return reg, calls


def test_plugin_resource_is_honoured_and_computed_once():
    reg, calls = _plugin_registry()
    method = compose(
        "ggn",
        ProbeSolver(needs=Requires(statistics={"gnorm2"})),  # a solver that reads it
        estimators=["gnorm2"],
        predict_fn=mlp,
        loss="softmax_cross_entropy",
        registry=reg,
    )
    node = method.plan.resource("grad_norm_sq")
    assert node.producer == "extra:grad_norm_sq"
    assert ("provide_resource(grad_norm_sq)", "extra") in method.plan.hooks
    state = method.init(PARAMS)
    _, state, _ = method.step(PARAMS, state, BATCH, jax.random.key(0))
    g = jax.grad(
        lambda p: jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(mlp(p, BATCH[0]), BATCH[1])
        )
    )(PARAMS)
    expected = sum(float(jnp.sum(x**2)) for x in jax.tree_util.tree_leaves(g))
    assert float(state.estimators[0]["stats"]["gnorm2"]) == pytest.approx(expected, rel=1e-9)
    assert calls["provider"] == 1  # traced once


def test_unknown_resource_is_a_composition_error():
    reg = load_registry(env={}, entry_points=[])
    with reg.transaction("x") as register:
        register(
            kind="estimator",
            name="needs_kfac",
            factory=SquaredGradNorm,
            provides={"kfac"},
            requires=Requires(resources={"kronecker_factors"}),
        )
    reader = ProbeSolver(needs=Requires(statistics={"kfac"}))
    with pytest.raises(CompositionError, match="needs_kfac read resource 'kronecker_factors'"):
        make_plan(
            Composition.from_dict(
                {"curvature": "ggn", "solver": reader, "estimators": ["needs_kfac"]}, registry=reg
            ),
            registry=reg,
        )


def test_validate_hook_can_veto_and_amend_wrapper_annotates():
    @hookimpl
    def somax_plug_validate_plan(plan):
        if plan.component("solver").name == "builtin:minres":
            return "minres is banned in this lab"
        return None

    @hookimpl(wrapper=True)
    def somax_plug_amend_plan(plan):
        inner = yield
        return inner.evolve(annotations=inner.annotations + (("telemetry", "on"),))

    reg, _ = _plugin_registry(
        somax_plug_validate_plan=somax_plug_validate_plan,
        somax_plug_amend_plan=somax_plug_amend_plan,
    )
    with pytest.raises(PlanVetoed, match="plugin 'extra': minres is banned"):
        make_plan({"curvature": "hessian", "solver": "minres"}, registry=reg)
    plan = make_plan({"curvature": "ggn", "solver": "cg"}, registry=reg)
    assert dict(plan.annotations)["telemetry"] == "on"
    assert ("validate_plan", "extra") in plan.hooks


# ----------------------------------------------------------------- the step
def test_planned_traces_each_resource_once_and_matches_unplanned():
    fn_p, calls_p = counting(mlp)
    fn_u, calls_u = counting(mlp)
    kw = dict(loss="softmax_cross_entropy", preset="gauss_newton_lm")
    planned = compose(predict_fn=fn_p, **kw)
    unplanned = compose(predict_fn=fn_u, unplanned=True, **kw)
    key = jax.random.key(3)
    sp, su = planned.init(PARAMS), unplanned.init(PARAMS)
    # forward passes in the step's own trace (the jaxpr), not counting input checks
    calls_p["n"] = calls_u["n"] = 0
    jax.make_jaxpr(planned._step)(PARAMS, sp, BATCH, key)
    jax.make_jaxpr(unplanned._step)(PARAMS, su, BATCH, key)
    # planned: one linearization + the loss after the step; unplanned recomputes
    assert calls_p["n"] == 2
    assert calls_u["n"] > calls_p["n"]
    planned.trace_counts.clear()
    unplanned.trace_counts.clear()
    p1, s1, i1 = planned.step(PARAMS, sp, BATCH, key)
    p2, s2, i2 = unplanned.step(PARAMS, su, BATCH, key)
    assert all(v == 1 for v in planned.trace_counts.values())
    assert max(unplanned.trace_counts.values()) > 1
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert float(i1["loss"]) == pytest.approx(float(i2["loss"]), rel=1e-12)


def test_no_recompilation_and_fixed_info_schema():
    method = compose(preset="sgn", predict_fn=mlp, loss="softmax_cross_entropy")
    state = method.init(PARAMS)
    params = PARAMS
    for i in range(3):
        params, state, info = method.step(params, state, BATCH, jax.random.key(i))
    assert method._step_jit._cache_size() == 1
    from somax_plug._src.step import INFO_KEYS

    assert sorted(info) == sorted(INFO_KEYS)
    assert int(state.count) == 3
    assert bool(info["accepted"]) and int(info["solver_iterations"]) >= 1


def test_step_runs_inside_scan_with_stable_state_shapes():
    method = compose(
        preset="sophia_h",
        predict_fn=mlp,
        loss="softmax_cross_entropy",
        estimators=[{"name": "hutchinson_diag", "every_k": 2}],
    )
    state0 = method.init(PARAMS)

    def body(carry, key):
        params, state = carry
        params, state, info = method._step(params, state, BATCH, key)
        return (params, state), info["loss"]

    keys = jax.random.split(jax.random.key(0), 6)
    (params, state), losses = jax.lax.scan(body, (PARAMS, state0), keys)
    shapes = lambda t: jax.tree_util.tree_map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), t)
    assert shapes(state) == shapes(state0)
    assert losses.shape == (6,)
    assert float(losses[-1]) < float(losses[0])


@pytest.mark.parametrize(
    "preset",
    [
        "sgn",
        "newton_cg",
        "gauss_newton_lm",
        "sophia_h",
        "sophia_g",
        "adahessian",
        "natural_gradient",
    ],
)
def test_every_preset_lowers_the_loss(preset):
    method = compose(preset=preset, predict_fn=mlp, loss="softmax_cross_entropy")
    params, state = PARAMS, method.init(PARAMS)
    for i in range(15):
        params, state, info = method.step(params, state, BATCH, jax.random.key(i))
        assert bool(info["finite"])
    assert loss_of(params) < 0.9 * loss_of(PARAMS)


def test_lm_rejection_keeps_parameters_bitwise():
    method = compose(
        preset="gauss_newton_lm", predict_fn=mlp, loss="softmax_cross_entropy", learning_rate=50.0
    )  # absurd step: must be rejected
    state = method.init(PARAMS)
    params, new_state, info = method.step(PARAMS, state, BATCH, jax.random.key(0))
    assert not bool(info["accepted"])
    for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(PARAMS), strict=True
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert float(info["lam"]) < float(
        method.plan.component("damping").instance.value(new_state.damping)
    )


# ----------------------------------------------------------------- Optax
def test_optax_bridge_chains_and_trains():
    schedule = optax.linear_schedule(1.0, 0.5, 10)
    tx = optax.chain(
        optax.clip_by_global_norm(10.0),
        as_optax(
            "ggn",
            "cg",
            predict_fn=mlp,
            loss="softmax_cross_entropy",
            damping={"name": "constant", "lam": 1e-2},
        ),
        optax.trace(decay=0.5),
        optax.add_decayed_weights(1e-4),
        optax.scale_by_learning_rate(schedule),
    )
    loss_fn = lambda p: jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(mlp(p, BATCH[0]), BATCH[1])
    )

    @jax.jit
    def train_step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, batch=BATCH)
        return optax.apply_updates(params, updates), state

    params, state = PARAMS, tx.init(PARAMS)
    for _ in range(10):
        params, state = train_step(params, state)
    assert loss_of(params) < 0.7 * loss_of(PARAMS)
    bridge_state = state[1]
    assert int(bridge_state.inner.count) == 10
    assert bool(bridge_state.info["finite"])


def test_optax_bridge_under_inject_hyperparams():
    def make(learning_rate):
        return optax.chain(
            as_optax(preset="sgn", predict_fn=mlp, loss="softmax_cross_entropy",
                     damping=CONSTANT),  # the preset's LM damping needs step rejection
            optax.scale_by_learning_rate(learning_rate),
        )

    tx = optax.inject_hyperparams(make)(learning_rate=0.5)
    state = tx.init(PARAMS)
    grads = jax.grad(
        lambda p: jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(mlp(p, BATCH[0]), BATCH[1])
        )
    )(PARAMS)
    update = jax.jit(lambda g, s: tx.update(g, s, PARAMS, batch=BATCH))
    updates, state = update(grads, state)
    assert float(state.hyperparams["learning_rate"]) == 0.5
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))
    lr = state.hyperparams["learning_rate"]
    state.hyperparams["learning_rate"] = jnp.zeros_like(lr)
    zero, _ = update(grads, state)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree_util.tree_leaves(zero))


def test_optax_bridge_with_apply_if_finite_keeps_everything_on_a_bad_batch():
    tx = optax.apply_if_finite(
        optax.chain(
            as_optax(
                preset="sgn",
                predict_fn=mlp,
                loss="softmax_cross_entropy",
                on_nonfinite="propagate",
                damping=CONSTANT,
            ),
            optax.trace(decay=0.9),
            optax.scale_by_learning_rate(0.5),
        ),
        max_consecutive_errors=5,
    )
    bad = (BATCH[0].at[0, 0].set(jnp.nan), BATCH[1])
    loss_fn = lambda p, b: jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(mlp(p, b[0]), b[1])
    )

    @jax.jit
    def train_step(params, state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params, batch=batch)
        return optax.apply_updates(params, updates), state

    params, state = train_step(PARAMS, tx.init(PARAMS), BATCH)  # momentum is non-zero now
    after_bad, state_bad = train_step(params, state, bad)
    for a, b in zip(
        jax.tree_util.tree_leaves((after_bad, state_bad.inner_state)),
        jax.tree_util.tree_leaves((params, state.inner_state)),
        strict=True,
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # bitwise, NaN info too
    assert int(state_bad.notfinite_count) == 1


def test_optax_bridge_refuses_lm_clearly():
    with pytest.raises(CompositionError, match="loss after the full update"):
        as_optax(preset="gauss_newton_lm", predict_fn=mlp, loss="softmax_cross_entropy")


# ------------------------------------------------------- config and the CLI
def test_toml_and_cli_plan(tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_text(
        'loss = "softmax_cross_entropy"\n[curvature]\nname = "ggn"\n'
        '[solver]\nname = "cg"\nmaxiter = 7\n[damping]\nname = "constant"\nlam = 0.1\n'
    )
    comp = load_composition(path)
    assert dict(comp.solver.options) == {"maxiter": 7}
    assert cli_main(["plan", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"components", "resources", "hooks", "fingerprint"}
    assert cli_main(["plan", "sgn"]) == 0
    assert "linearization" in capsys.readouterr().out
    assert cli_main(["show", "sgn"]) == 0
    assert "builtin:cg" in capsys.readouterr().out


# ------------------------------------------- random compositions (Hypothesis)
def _names(kind):
    return [s.name for s in get_registry().list(kind)]


@given(st.data())
def test_random_compositions_plan_or_fail_clearly(data):
    """Any composition drawn from the registry gives a valid plan or a clear
    CompositionError before tracing; a valid plan's step runs without JAX errors."""
    reg = get_registry()
    comp = {
        "curvature": data.draw(st.sampled_from(_names(Kind.CURVATURE))),
        "solver": data.draw(st.sampled_from(_names(Kind.SOLVER))),
        "estimators": data.draw(
            st.lists(st.sampled_from(_names(Kind.ESTIMATOR)), max_size=2, unique=True)
        ),
        "damping": data.draw(st.sampled_from(_names(Kind.DAMPING))),
    }
    if data.draw(st.booleans()):
        comp["preconditioner"] = data.draw(st.sampled_from(_names(Kind.PRECONDITIONER)))
    try:
        method = compose(predict_fn=mlp, loss="softmax_cross_entropy", registry=reg, **comp)
    except CompositionError as exc:
        assert str(exc)
        return
    state = method.init(PARAMS)
    params, state, info = method.step(PARAMS, state, BATCH, jax.random.key(0))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(PARAMS)
    if bool(info["accepted"]):
        assert bool(info["finite"])
