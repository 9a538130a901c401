"""One declaration per component: the class is the record, and every reader uses it.

Covers issue "One source of truth per component": the registry, ``somax-plug
list/show``, the planner and the conformance kit read the ``@declare`` record on the
class; options are checked at compose time by one mechanism; kinds refuse what they
would ignore; loss requirements are data; the default damping is declared by the
built-in plugin, not named by the planner.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import attrs
import jax
import jax.numpy as jnp
import pytest

import somax_plug
from somax_plug import (
    ComponentSpec,
    CompositionError,
    Option,
    OptionError,
    compose,
    declare,
    declared_in,
    get_loss,
    hookimpl,
    make_plan,
    option,
    spec_of,
)
from somax_plug.builtin import COMPONENT_MODULES

pytestmark = pytest.mark.usefixtures("somax_registry")


def _mlp(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def _problem(seed=0, batch=12, classes=3):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    params = {
        "w1": 0.5 * jax.random.normal(k1, (4, 6)),
        "w2": 0.5 * jax.random.normal(k2, (6, classes)),
    }
    x = jax.random.normal(k3, (batch, 4))
    y = jax.random.randint(k4, (batch,), 0, classes)
    return params, (x, y)


# ------------------------------------------------------------- one record


def test_registry_records_are_the_class_declarations(somax_registry):
    declared = {}
    for name in COMPONENT_MODULES:
        module = importlib.import_module(f"somax_plug.builtin.{name}")
        for spec in declared_in(module):
            declared[(spec.kind, spec.name)] = spec
    registered = {(s.kind, s.name): s for s in somax_registry.list(plugin="builtin")}
    assert set(registered) == set(declared)
    for key, spec in registered.items():
        cls = spec.factory
        assert spec_of(cls) is declared[key]  # the same record, plugin filled in
        assert attrs.evolve(spec, plugin="") == declared[key]
        instance = spec.create(**({"schedule": lambda c: 0.1} if spec.name == "schedule" else {}))
        assert isinstance(instance, cls)
        for name, value in spec.defaults:  # the declared defaults are the class's
            field = next(f for f in attrs.fields(cls) if (f.alias or f.name) == name)
            assert getattr(instance, field.name) == value, (spec.name, name)


def test_listing_imports_no_jax():
    code = (
        "import sys, json, io, contextlib\n"
        "from somax_plug._src.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    main(['list', '--json'])\n"
        "main(['show', 'cg'])\n"
        "rows = json.loads(buf.getvalue())\n"
        "assert not [m for m in sys.modules if m == 'jax' or m.startswith('jax.')], 'jax'\n"
        "print(len(rows))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) >= 26


def test_list_json_carries_the_declared_options():
    out = subprocess.run(
        [sys.executable, "-m", "somax_plug._src.cli", "list", "--json", "--kind", "solver"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    maxiter = next(o for o in rows["cg"]["options"] if o["name"] == "maxiter")
    assert maxiter == {
        "name": "maxiter",
        "default": 50,
        "type": "int",
        "allowed": "an int >= 1",
        "required": False,
        "doc": "at most this many iterations (matvecs)",
    }
    assert rows["cg"]["preconditioned"] is True and rows["direct"]["preconditioned"] is False


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("solver", "expect"),
    [
        ({"name": "cg", "maxiter": "ten"}, "option 'maxiter' = 'ten' is not allowed: expected"),
        ({"name": "cg", "maxiter": 2.5}, "option 'maxiter' = 2.5 is not allowed"),
        ({"name": "cg", "maxiter": 0}, "expected an int >= 1"),
        ({"name": "cg", "maxiter": 10**12}, "int32"),
        ({"name": "cg", "tol": -1.0}, "option 'tol' = -1.0 is not allowed"),
        ({"name": "cg", "warm_start": "no"}, "expected a bool"),
        ({"name": "cg", "negative_curvature": "skip"}, "one of 'guard', 'none'"),
        ({"name": "cg", "maxiterr": 5}, "did you mean 'maxiter'"),
    ],
)
def test_options_are_checked_before_tracing(solver, expect):
    with pytest.raises(OptionError, match="solver 'builtin:cg'") as info:
        make_plan({"curvature": "ggn", "solver": solver})
    assert expect in str(info.value)


def test_options_of_other_kinds_and_direct_construction():
    with pytest.raises(OptionError, match="damping 'builtin:constant': option 'lam' = inf"):
        make_plan(
            {
                "curvature": "ggn",
                "solver": "cg",
                "damping": {"name": "constant", "lam": float("inf")},
            }
        )
    with pytest.raises(OptionError, match="option 'num_probes' = 2.5"):
        make_plan(
            {
                "curvature": "hessian",
                "solver": "diagonal",
                "estimators": [{"name": "hutchinson_diag", "num_probes": 2.5}],
            }
        )
    with pytest.raises(OptionError, match="needs option 'schedule'"):
        make_plan({"curvature": "ggn", "solver": "cg", "damping": "schedule"})
    from somax_plug.builtin.solvers import CG

    with pytest.raises(OptionError, match="option 'maxiter' = 'ten'"):
        CG(maxiter="ten")
    assert CG(tol=1) == CG(tol=1.0)  # an int for a float option is accepted


def test_plugin_options_from_defaults_are_typed(somax_registry, register_plugin):
    class Plugin:
        @staticmethod
        @hookimpl
        def somax_plug_register(register):
            register(
                ComponentSpec(
                    kind="solver",
                    name="stringy",
                    factory="somax_plug.builtin.solvers:Identity",
                    defaults={"mode": "fast", "steps": 3},
                )
            )

    record = register_plugin(Plugin, name="stringy_plugin")
    assert record.status == "ok", record.error
    spec = somax_registry.get("solver", "stringy")
    assert [o.describe() for o in spec.options] == [
        "mode: a string (default 'fast')",
        "steps: an int (default 3)",
    ]
    with pytest.raises(OptionError, match="solver 'stringy_plugin:stringy': option 'steps'"):
        spec.check_options({"steps": "3"})


def test_option_record_rules():
    o = Option("beta", 0.9, type=float, ge=0, lt=1)
    assert o.check("x", 0) == 0.0 and isinstance(o.check("x", 0), float)
    for bad in (True, "0.5", 1.0, float("nan"), None):
        with pytest.raises(OptionError):
            o.check("x", bad)
    assert Option("clip", None, type=float, optional=True).check("x", None) is None
    assert Option("fn", None).check("x", print) is print  # untyped: anything


# --------------------------------------------------- what kinds honour


@pytest.mark.parametrize(
    "config",
    [
        {"curvature": "ggn", "solver": {"name": "cg", "every_k": 3}},
        {"curvature": {"name": "ggn", "every_k": 2}, "solver": "cg"},
    ],
)
def test_every_k_on_a_kind_without_cadence_is_refused(config):
    with pytest.raises(CompositionError, match=r"every_k=\d would be ignored"):
        make_plan(config)


@pytest.mark.parametrize("solver", ["direct", "row_cholesky", "row_cg", "steihaug"])
def test_a_preconditioner_the_solver_ignores_is_refused(solver):
    with pytest.raises(CompositionError, match=f"solver '{solver}' does not apply") as info:
        make_plan(
            {
                "curvature": "ggn",
                "estimators": ["hutchinson_diag"],
                "preconditioner": "jacobi",
                "solver": solver,
            }
        )
    assert "'cg'" in str(info.value)  # what would work


def test_a_statistic_nobody_reads_is_refused():
    with pytest.raises(CompositionError, match="no component of the composition reads"):
        make_plan({"curvature": "ggn", "solver": "cg", "estimators": ["hutchinson_trace"]})


# ------------------------------------------------------- requirements as data


def test_loss_requirement_is_data_and_accepts_a_loss_object():
    params, batch = _problem()
    method = compose(
        estimators="gnb_diag",
        preconditioner={"name": "diag_ema", "clip": 1.0},
        solver="identity",
        predict_fn=_mlp,
        loss=get_loss("softmax_cross_entropy"),
        learning_rate=0.05,
    )
    assert method.plan.loss == "softmax_cross_entropy"
    state = method.init(params)
    params, state, info = method.step(params, state, batch)
    assert bool(info["finite"])
    with pytest.raises(CompositionError, match="needs loss 'softmax_cross_entropy'.*'mse'"):
        compose(
            estimators="gnb_diag",
            preconditioner="diag_ema",
            solver="identity",
            predict_fn=_mlp,
            loss="mse",
        )
    assert spec_of(somax_plug.builtin.estimators.GNBDiag).requires.losses == {
        "softmax_cross_entropy"
    }


def test_no_validate_hook_is_needed_for_builtins(somax_registry):
    impls = somax_registry.hook.somax_plug_validate_plan.get_hookimpls()
    assert [i.plugin_name for i in impls] == []


def test_default_damping_survives_a_plugin_with_the_same_short_name(register_plugin):
    @declare("constant", summary="a plugin's own constant damping")
    @attrs.frozen
    class OtherConstant(somax_plug.Damping):
        lam: float = option(0.5, ge=0)

        def init(self):
            return {"lam": jnp.asarray(self.lam)}

        def value(self, state):
            return state["lam"]

        def update(self, state, stats):
            return state, stats.finite

    class Plugin:
        @staticmethod
        @hookimpl
        def somax_plug_register(register):
            register(OtherConstant)

    assert register_plugin(Plugin, name="other").status == "ok"
    plan = make_plan({"curvature": "ggn", "solver": "cg"})
    assert plan.component("damping").name == "builtin:constant"
    with pytest.raises(CompositionError, match="ambiguous"):
        make_plan({"curvature": "ggn", "solver": "cg", "damping": "constant"})


def test_hints_live_on_the_spec():
    with pytest.raises(CompositionError) as info:
        make_plan({"curvature": "hessian", "solver": {"name": "cg", "negative_curvature": "none"}})
    text = str(info.value)
    assert "solver 'cg' needs a psd operator" in text
    assert "'minres'" in text and "'ggn'" in text and "negative_curvature': 'guard'" in text


# ------------------------------------------------------------- step core


@pytest.mark.parametrize(
    "composition",
    [
        {"preset": "sgn", "damping": {"name": "constant", "lam": 1e-2}},
        {"preset": "sophia_h"},
        {
            "curvature": "ggn",
            "solver": {"name": "cg", "maxiter": 5},
            "damping": {
                "name": "schedule",
                "every_k": 2,
                "schedule": {
                    "name": "exponential_decay",
                    "init_value": 1.0,
                    "transition_steps": 1,
                    "decay_rate": 0.5,
                },
            },
        },
    ],
    ids=["sgn", "sophia_h", "schedule_every_2"],
)
def test_method_step_and_the_optax_bridge_agree_over_10_steps(composition):
    import optax

    params0, batch = _problem(seed=3)
    lr = 0.3
    method = compose(
        predict_fn=_mlp, loss="softmax_cross_entropy", learning_rate=lr, config=composition
    )
    bridge = optax.chain(
        somax_plug.as_optax(
            predict_fn=_mlp, loss="softmax_cross_entropy", learning_rate=lr, config=composition
        ),
        optax.scale_by_learning_rate(lr),
    )

    def loss_fn(p):
        logits = _mlp(p, batch[0])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))

    @jax.jit
    def bridge_step(p, s, key):
        updates, s = bridge.update(jax.grad(loss_fn)(p), s, p, batch=batch, key=key)
        return optax.apply_updates(p, updates), s

    p1, s1 = params0, method.init(params0)
    p2, s2 = params0, bridge.init(params0)
    for i in range(10):
        key = jax.random.key(i)
        p1, s1, info = method.step(p1, s1, batch, key)
        p2, s2 = bridge_step(p2, s2, key)
    bridge_info = s2[0].info
    assert set(bridge_info) == set(info)
    assert int(bridge_info["solver_iterations"]) == int(info["solver_iterations"])
    assert float(bridge_info["lam"]) == pytest.approx(float(info["lam"]))
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2), strict=True):
        # float32: the bridge's right-hand side is jax.grad, the method's the
        # linearization's transpose; they agree to rounding, which 10 steps amplify
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-5), float(jnp.max(jnp.abs(a - b)))
    assert int(s1.count) == int(s2[0].inner.count) == 10


# --------------------------------------------------------------- public API


def test_every_public_name_resolves_and_lives_in_the_namespace():
    for name in somax_plug.__all__:
        assert getattr(somax_plug, name) is not None, name
    assert somax_plug.OptionError.__module__ == "somax_plug"
    for module in ("tree", "losses", "checkpoint", "testing", "builtin"):
        assert getattr(somax_plug, module).__name__ == f"somax_plug.{module}"


def test_plugins_and_builtins_import_only_the_public_namespace():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    private = re.compile(r"somax_plug\._src|somax_plug\.(kinds|spec|operators|registry|planner"
                         r"|composition|step|resources|loader|optax_bridge)\b")
    offenders = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for folder in ("plugins_examples", "somax_plug/builtin")
        for path in sorted((root / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert offenders == []
