"""Reliability corpus, plugins and CLI: hostile plugins as real installed distributions.

Every bad plugin is a real ``.dist-info`` on ``sys.path`` (``install_fake_distribution``),
found by ``importlib.metadata`` through the entry-point group exactly as a pip-installed
plugin is, and loaded by the real loader next to the real built-in plugin. Each probe is
a :class:`reliability.Case`; :func:`reliability.check_corpus` fails on any raw
traceback, silent acceptance or lost file. The probes of issue 12 ("Plugins", the CLI
bullet, and "component outputs are never checked") are all here, one class each.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from somax_plug import (
    AmbiguousComponentError,
    ComponentError,
    CompositionError,
    PluginError,
    compose,
    load_registry,
    make_plan,
    use_registry,
)
from somax_plug._src import cli
from somax_plug._src.loader import ENTRY_POINT_GROUP, iter_entry_points
from somax_plug.testing.distributions import install_fake_distribution
from tests.reliability import Case, check_corpus

HEAD = "from somax_plug import hookimpl, ComponentSpec, Requires, SolverInfo, Solver\n"

PLUGINS = {
    "exiter": """
@hookimpl
def somax_plug_register(register):
    import sys
    sys.exit(0)
""",
    "boomer": """
def boom(**options):
    raise RuntimeError("factory boom")

@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="boom", factory=boom))
""",
    "nomod": """
@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="ghost", factory="no_such_module_xyz:Thing"))
""",
    "noattr": """
@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="ghost2", factory="collections:NoSuchThing"))
""",
    "lazyattr": """
@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="ghost3", factory="lazyattr_impl:Missing"))
""",
    "badres": """
import attrs

@attrs.frozen
class NeedsFactors(Solver):
    def init(self, params):
        return ()
    def solve(self, op, rhs, lam, precond, stats, state):
        return rhs, SolverInfo(jnp.int32(0), jnp.float32(0), jnp.bool_(True)), state

import jax.numpy as jnp

@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="needs_factors", factory=NeedsFactors,
                           requires=Requires(resources={"kfac_factors"})))

@hookimpl
def somax_plug_provide_resource(name, registry):
    raise RuntimeError(f"provider broken for {name}")
""",
    "vetoer": """
@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="vsolver", factory=dict))

@hookimpl
def somax_plug_validate_plan(plan):
    return 1 / 0
""",
    "vetotype": """
@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="vtsolver", factory=dict))

@hookimpl
def somax_plug_validate_plan(plan):
    return 42
""",
    "amender": """
@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="asolver", factory=dict))

@hookimpl(wrapper=True)
def somax_plug_amend_plan(plan):
    plan = yield
    raise KeyError("amend broke")
""",
    "notaplan": """
@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="nsolver", factory=dict))

@hookimpl(wrapper=True)
def somax_plug_amend_plan(plan):
    plan = yield
    return {"not": "a plan"}
""",
    "forgot": """
@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="fsolver", factory=dict))

@hookimpl(wrapper=True)
def somax_plug_amend_plan(plan):
    plan = yield
""",
    "bads": """
import attrs
import jax
import jax.numpy as jnp

INFO = lambda: SolverInfo(jnp.int32(0), jnp.float32(0.0), jnp.bool_(True))

@attrs.frozen
class IntDir(Solver):
    def init(self, params):
        return ()
    def solve(self, op, rhs, lam, precond, stats, state):
        return jax.tree.map(lambda g: jnp.full(g.shape, 1000, jnp.int32), rhs), INFO(), state

@attrs.frozen
class WrongShape(IntDir):
    def solve(self, op, rhs, lam, precond, stats, state):
        return jax.tree.map(lambda g: jnp.zeros(g.shape + (2,), g.dtype), rhs), INFO(), state

@attrs.frozen
class WrongTree(IntDir):
    def solve(self, op, rhs, lam, precond, stats, state):
        return list(jax.tree.leaves(rhs)), INFO(), state

@attrs.frozen
class BadInfo(IntDir):
    def solve(self, op, rhs, lam, precond, stats, state):
        return rhs, {"iterations": 3}, state

@attrs.frozen
class VectorInfo(IntDir):
    def solve(self, op, rhs, lam, precond, stats, state):
        return rhs, SolverInfo(jnp.zeros(3, jnp.int32), 0.0, True), state

from somax_plug import Estimator, Preconditioner

@attrs.frozen
class NoDiag(Estimator):
    def init(self, params):
        return ()
    def estimate(self, res, key, state):
        return {"other": jnp.zeros(())}, state

@attrs.frozen
class GrowingState(NoDiag):
    def estimate(self, res, key, state):
        return {"diag": jax.tree.map(jnp.ones_like, res.params)}, jnp.zeros(3)

@attrs.frozen
class IntApply(Preconditioner):
    def init(self, params):
        return ()
    def apply(self, state, v, lam):
        return jax.tree.map(lambda x: x.astype(jnp.int32), v)

@attrs.frozen
class ShrinkingState(Preconditioner):
    def init(self, params):
        return {"m": jax.tree.map(jnp.zeros_like, params)}
    def update(self, res, stats, lam, key, state):
        return {"m": jax.tree.map(lambda m: m[:1], state["m"])}
    def apply(self, state, v, lam):
        return v

@hookimpl
def somax_plug_register(register):
    for name, cls in [("int_dir", IntDir), ("wrong_shape", WrongShape),
                      ("wrong_tree", WrongTree), ("bad_info", BadInfo),
                      ("vector_info", VectorInfo)]:
        register(ComponentSpec(kind="solver", name=name, factory=cls))
    for name, cls in [("no_diag", NoDiag), ("growing_state", GrowingState)]:
        register(ComponentSpec(kind="estimator", name=name, factory=cls, provides={"diag"}))
    for name, cls in [("int_apply", IntApply), ("shrinking_state", ShrinkingState)]:
        register(ComponentSpec(kind="preconditioner", name=name, factory=cls))
""",
    "othercg": """
@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="cg", factory=dict,
                           requires=Requires(tags={"symmetric"})))
""",
    "presetter": """
@hookimpl
def somax_plug_register(register):
    register.preset("uses_cg", {"curvature": "ggn", "solver": "cg"}, summary="borrows cg")
""",
    "taker": """
@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="cg", factory=dict,
                           requires=Requires(tags={"symmetric"})), override=True)
    register.preset("sgn", {"curvature": "ggn", "solver": "cg"}, override=True)
""",
    "typo": """
@hookimpl
def somax_plug_regster(register):
    register(ComponentSpec(kind="solver", name="typo_solver", factory=dict))
""",
    "unmarked": """
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="unmarked_solver", factory=dict))
""",
    "empty": """
@hookimpl
def somax_plug_register(register):
    pass
""",
    "sleepy": """
import time
time.sleep(0.3)

@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="sleepy_solver", factory=dict))
""",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Every plugin above as its own distribution ``somax-plug-<name>``, plus twins."""
    root = tmp_path_factory.mktemp("dists")
    made = []
    for name, body in PLUGINS.items():
        modules = {f"{name}_plugin": HEAD + textwrap.dedent(body)}
        if name == "lazyattr":
            modules["lazyattr_impl"] = "X = 1\n"
        made.append(
            install_fake_distribution(
                root / name, f"somax-plug-{name}", modules, {name: f"{name}_plugin"}
            )
        )
    for twin in ("a", "b"):  # two distributions, one entry-point name
        source = HEAD + textwrap.dedent(PLUGINS["sleepy"]).replace("sleepy_solver", f"twin_{twin}")
        source = source.replace("time.sleep(0.3)", "")
        made.append(
            install_fake_distribution(
                root / f"twin-{twin}",
                f"somax-plug-twin-{twin}",
                {f"twin_{twin}": source},
                {"twin": f"twin_{twin}"},
            )
        )
    yield root
    for dist in made:
        dist.remove()


def load(*names, env=None, strict=False):
    """The registry with the real built-in plugin and the named fake distributions."""
    wanted = {f"somax-plug-{n}" for n in names}
    eps = [ep for ep in iter_entry_points() if ep.dist.metadata["Name"] in wanted]
    assert {ep.dist.metadata["Name"] for ep in eps} == wanted, "a fake distribution is missing"
    env = dict(env or {})
    if strict:
        env["SOMAX_PLUG_STRICT"] = "1"
    return load_registry(env=env, entry_points=eps)


def doctor(reg):
    """``somax-plug doctor --json`` run in-process against ``reg``."""
    out = io.StringIO()
    with use_registry(reg), contextlib.redirect_stdout(out):
        assert cli.main(["doctor", "--json"]) == 0
    return {p["name"]: p for p in json.loads(out.getvalue())["plugins"]}


def status(reg, name, expected):
    def check(_):
        assert reg.plugins[name].status == expected, reg.plugins[name]

    return check


class CliExit(PluginError):
    """A CLI run that ended with a non-zero exit status (its stderr as the message)."""


def run_cli(*argv, reg=None):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if reg is not None:
            stack.enter_context(use_registry(reg))
        stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(contextlib.redirect_stdout(out))
        rc = cli.main(list(argv))
    if rc:
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got {lines}"
        raise CliExit(f"exit {rc}: {lines[0]}")
    return out.getvalue()


def predict(params, x):
    return x @ params["w"] + params["b"]


PARAMS = {"w": jnp.full((3, 2), 0.1, jnp.float32), "b": jnp.zeros(2, jnp.float32)}
BATCH = (jnp.ones((4, 3), jnp.float32), jnp.zeros((4, 2), jnp.float32))


def one_step(reg, **composition):
    method = compose(predict_fn=predict, loss="mse", registry=reg, **composition)
    params, _, info = method.step(PARAMS, method.init(PARAMS), BATCH, jax.random.key(0))
    return params, info


def plugin_cases(get):
    """Cases that load plugins; ``get(*names, **kw)`` builds the registry."""
    cases = [
        # -- a register hook that calls sys.exit: rolled back, host alive, doctor says so
        Case(
            "sys.exit in somax_plug_register",
            lambda: get("exiter"),
            expect="warning",
            says=("plugin 'exiter' failed", "sys.exit(0)"),
            check=lambda reg: _assert(doctor(reg)["exiter"]["status"] == "failed"),
        ),
        Case("sys.exit, strict", lambda: get("exiter", strict=True), says=("sys.exit(0)",)),
        # -- factories
        Case(
            "factory that raises",
            lambda: make_plan({"curvature": "ggn", "solver": "boom"}, registry=get("boomer")),
            error=CompositionError,
            says=("boomer:boom", "plugin 'boomer'", "RuntimeError: factory boom"),
        ),
        Case(
            "factory naming a missing module: warned at load",
            lambda: get("nomod"),
            expect="warning",
            says=("no_such_module_xyz", "cannot be found"),
            check=lambda reg: _assert(doctor(reg)["nomod"]["status"] == "degraded"),
        ),
        Case(
            "factory naming a missing module: compose",
            lambda: make_plan({"curvature": "ggn", "solver": "ghost"}, registry=get("nomod")),
            error=CompositionError,
            says=("nomod:ghost", "cannot be loaded", "ModuleNotFoundError", "no_such_module_xyz"),
        ),
        Case(
            "factory naming a missing attribute of an imported module",
            lambda: get("noattr"),
            expect="warning",
            says=("collections:NoSuchThing", "has no attribute 'NoSuchThing'"),
        ),
        Case(
            "factory naming a missing attribute of a module not yet imported: doctor",
            lambda: doctor(get("lazyattr"))["lazyattr"],
            expect="ok",
            check=lambda p: _assert(
                p["status"] == "degraded" and "lazyattr_impl:Missing" in p["warnings"][0], p
            ),
        ),
        Case(
            "factory naming a missing attribute: compose",
            lambda: make_plan({"curvature": "ggn", "solver": "ghost3"}, registry=get("lazyattr")),
            error=CompositionError,
            says=("lazyattr:ghost3", "cannot be loaded", "AttributeError"),
        ),
        # -- provide_resource that raises
        Case(
            "provide_resource raising: a composition that does not need it",
            lambda: one_step(get("badres"), curvature="ggn", solver="cg"),
            expect="warning",
            says=("plugin 'badres'", "somax_plug_provide_resource", "RuntimeError", "skipped"),
            check=lambda out: _assert(
                bool(out[1]["accepted"]) and not jnp.allclose(out[0]["w"], 0.1)
            ),
        ),
        Case(
            "provide_resource raising: the resource only it provides",
            lambda: make_plan(
                {"curvature": "ggn", "solver": "needs_factors"}, registry=get("badres")
            ),
            error=PluginError,
            says=(
                "plugin 'badres'",
                "somax_plug_provide_resource('kfac_factors')",
                "RuntimeError: provider broken for kfac_factors",
            ),
        ),
        Case(
            "provide_resource raising, strict",
            lambda: make_plan(
                {"curvature": "ggn", "solver": "cg"}, registry=get("badres", strict=True)
            ),
            error=PluginError,
            says=("plugin 'badres'", "somax_plug_provide_resource('", "RuntimeError"),
        ),
        # -- validate_plan / amend_plan
        Case(
            "validate_plan raising",
            lambda: make_plan({"curvature": "ggn", "solver": "cg"}, registry=get("vetoer")),
            error=PluginError,
            says=("plugin 'vetoer'", "somax_plug_validate_plan", "ZeroDivisionError"),
        ),
        Case(
            "validate_plan returning a non-message",
            lambda: make_plan({"curvature": "ggn", "solver": "cg"}, registry=get("vetotype")),
            error=PluginError,
            says=("plugin 'vetotype'", "returned int 42", "None (accept)"),
        ),
        Case(
            "amend_plan wrapper raising",
            lambda: make_plan({"curvature": "ggn", "solver": "cg"}, registry=get("amender")),
            error=PluginError,
            says=("plugin 'amender'", "somax_plug_amend_plan", "KeyError", "amend broke"),
        ),
        Case(
            "amend_plan wrapper returning a non-plan",
            lambda: make_plan({"curvature": "ggn", "solver": "cg"}, registry=get("notaplan")),
            error=PluginError,
            says=("plugin 'notaplan'", "returned dict", "not a Plan"),
        ),
        Case(
            "amend_plan wrapper returning nothing",
            lambda: make_plan({"curvature": "ggn", "solver": "cg"}, registry=get("forgot")),
            error=PluginError,
            says=("plugin 'forgot'", "returned NoneType", "not a Plan"),
        ),
    ]
    # -- component outputs, checked at trace time
    for name, says in (
        ("int_dir", ("its direction", "dtype int32", "float32 was expected")),
        ("wrong_shape", ("its direction", "shape [2, 2] at ['b']", "[2] was expected")),
        ("wrong_tree", ("its direction", "structure", "was expected")),
        ("bad_info", ("dict", "solver info", "somax_plug.SolverInfo(")),
        ("vector_info", ("SolverInfo.iterations = int32[3]", "an integer scalar")),
    ):
        cases.append(
            Case(
                f"solver output: {name}",
                lambda n=name: one_step(get("bads"), solver=n),
                error=ComponentError,
                says=(f"solver 'bads:{name}'", "plugin 'bads'", *says),
            )
        )
    cg = {"curvature": "ggn", "solver": "cg"}
    for name, composition, says in (
        (
            "estimator 'bads:no_diag'",
            {**cg, "estimators": ["no_diag"], "preconditioner": "jacobi"},
            ("provides ['diag']", "only ['other']"),
        ),
        (
            "estimator 'bads:growing_state'",
            {**cg, "estimators": ["growing_state"], "preconditioner": "jacobi"},
            ("its new state", "structure", "the state it was given"),
        ),
        (
            "preconditioner 'bads:int_apply'",
            {**cg, "preconditioner": "int_apply"},
            ("M^-1 v", "dtype int32", "float32 was expected"),
        ),
        (
            "preconditioner 'bads:shrinking_state'",
            {**cg, "preconditioner": "shrinking_state"},
            ("its new state", "shape [1] at ['m']['b']", "[2] was expected"),
        ),
    ):
        cases.append(
            Case(
                f"{name} output",
                lambda c=composition: one_step(get("bads"), **c),
                error=ComponentError,
                says=(name, "plugin 'bads'", *says),
            )
        )
    cases += [
        # -- name clashes, presets and overrides
        Case(
            "a second plugin's cg: the built-in presets keep builtin:cg",
            lambda: [
                make_plan(p, registry=get("othercg")).component("solver").name
                for p in ("sgn", "newton_cg", "natural_gradient")
            ],
            expect="warning",
            says=("several plugins", "builtin:cg", "othercg:cg"),
            check=lambda names: _assert(set(names) == {"builtin:cg"}, names),
        ),
        Case(
            "a second plugin's cg: a bare 'cg' is ambiguous",
            lambda: make_plan({"curvature": "ggn", "solver": "cg"}, registry=get("othercg")),
            error=CompositionError,
            says=("ambiguous", "builtin:cg", "othercg:cg"),
        ),
        Case(
            "a preset naming another plugin's ambiguous cg mentions the preset",
            lambda: make_plan("uses_cg", registry=get("othercg", "presetter")),
            error=AmbiguousComponentError,
            says=("preset 'presetter:uses_cg'", "solver 'cg'", "ambiguous", "othercg:cg"),
        ),
        Case(
            "override=True: warned, in doctor, built-in presets unchanged",
            lambda: get("taker"),
            expect="warning",
            says=("plugin 'taker' overrides solver 'cg'", "presets keep their own plugin's"),
            check=lambda reg: _assert(
                any("solver 'cg'" in o for o in doctor(reg)["taker"]["overrides"])
                and make_plan("newton_cg", registry=reg).component("solver").name == "builtin:cg"
                and reg.preset("sgn").plugin == "taker"
            ),
        ),
        Case(
            "override=True, strict",
            lambda: get("taker", strict=True),
            error=PluginError,
            says=("SOMAX_PLUG_STRICT", "overrides solver 'cg'", "overrides preset 'sgn'"),
        ),
        # -- plugins that look fine but do nothing
        Case(
            "misspelled hook",
            lambda: get("typo"),
            expect="warning",
            says=("'somax_plug_regster' matches no hook", "did you mean 'somax_plug_register'"),
            check=status_of("typo", "degraded"),
        ),
        Case(
            "misspelled hook, strict",
            lambda: get("typo", strict=True),
            says=("somax_plug_regster",),
        ),
        Case(
            "hook without @hookimpl",
            lambda: get("unmarked"),
            expect="warning",
            says=("'somax_plug_register' is not marked @hookimpl",),
            check=status_of("unmarked", "degraded"),
        ),
        Case(
            "hook without @hookimpl, strict",
            lambda: get("unmarked", strict=True),
            says=("not marked @hookimpl",),
        ),
        Case(
            "plugin that registers nothing",
            lambda: get("empty"),
            expect="warning",
            says=("plugin 'empty'", "registered nothing"),
        ),
        # -- environment switches
        Case(
            "SOMAX_PLUG_DISABLE naming no plugin",
            lambda: get("empty", env={"SOMAX_PLUG_DISABLE": "emtpy"}),
            expect="warning",
            says=("SOMAX_PLUG_DISABLE names 'emtpy'", "did you mean 'empty'", "builtin, empty"),
        ),
        Case(
            "SOMAX_PLUG_ONLY naming no plugin",
            lambda: get("sleepy", env={"SOMAX_PLUG_ONLY": "nonexistent"}),
            expect="warning",
            says=("SOMAX_PLUG_ONLY names 'nonexistent'", "installed plugins: builtin, sleepy"),
        ),
        Case(
            "SOMAX_PLUG_STRICT=2",
            lambda: get("sleepy", env={"SOMAX_PLUG_STRICT": "2"}),
            error=PluginError,
            says=("SOMAX_PLUG_STRICT='2'", "1, true, yes, on", "'0', 'false', 'no', 'off'"),
        ),
        Case(
            "SOMAX_PLUG_STRICT=TRUE is strict",
            lambda: get("empty", env={"SOMAX_PLUG_STRICT": " TRUE "}),
            error=PluginError,
            says=("SOMAX_PLUG_STRICT is set", "registered nothing"),
        ),
        Case(
            "SOMAX_PLUG_STRICT=off is not strict",
            lambda: get("empty", env={"SOMAX_PLUG_STRICT": "off"}),
            expect="warning",
            says=("registered nothing",),
        ),
        Case(
            "two distributions with one entry-point name, one disabled: not an error",
            lambda: get(
                "twin-a",
                "twin-b",
                env={"SOMAX_PLUG_DISABLE": "twin@somax-plug-twin-a"},
                strict=True,
            ),
            expect="ok",
            check=lambda reg: _assert(
                reg.plugins["twin"].distribution == "somax-plug-twin-b"
                and reg.plugins["twin"].status == "ok"
                and reg.plugins["twin@somax-plug-twin-a"].status == "disabled"
                and reg.get("solver", "twin_b").plugin == "twin"
            ),
        ),
        Case(
            "two distributions with one entry-point name, both disabled by name",
            lambda: get("twin-a", "twin-b", env={"SOMAX_PLUG_DISABLE": "twin"}, strict=True),
            expect="ok",
            check=lambda reg: _assert(
                {r.status for n, r in reg.plugins.items() if n.startswith("twin")} == {"disabled"}
            ),
        ),
        Case(
            "two distributions with one entry-point name, both enabled",
            lambda: get("twin-a", "twin-b"),
            expect="warning",
            says=("already taken", "SOMAX_PLUG_DISABLE=twin@somax-plug-twin-"),
        ),
        Case(
            "doctor shows each plugin's import time",
            lambda: (sys.modules.pop("sleepy_plugin", None), doctor(get("sleepy")))[1],
            expect="ok",
            check=lambda plugins: _assert(
                plugins["sleepy"]["import_seconds"] >= 0.3
                and plugins["builtin"]["import_seconds"] is not None,
                plugins,
            ),
        ),
    ]
    return cases


def status_of(name, expected):
    return lambda reg: _assert(reg.plugins[name].status == expected, reg.plugins[name])


def _assert(condition, detail=""):
    assert condition, detail


def test_plugin_corpus(installed):
    counts = check_corpus("plugins", plugin_cases(load))
    assert counts["named"] >= 30


def test_cli_corpus(installed, monkeypatch):
    reg = load("sleepy")

    def broken(args):
        raise ZeroDivisionError("deep inside")

    cases = [
        Case(
            "list --tag bogus",
            lambda: run_cli("list", "--tag", "bogus", reg=reg),
            says=("exit 2", "no component matches --tag 'bogus'", "diag, eigenvalues"),
        ),
        Case(
            "list --tag dag (close to diag)",
            lambda: run_cli("list", "--tag", "dag", reg=reg),
            says=("exit 2", "did you mean 'diag'"),
        ),
        Case(
            "list --plugin nonexistent",
            lambda: run_cli("list", "--plugin", "nonexistent", reg=reg),
            says=("exit 2", "no plugin is named 'nonexistent'", "plugins: builtin, sleepy"),
        ),
        Case(
            "list --plugin buitlin",
            lambda: run_cli("list", "--plugin", "buitlin", "--json", reg=reg),
            says=("exit 2", "did you mean 'builtin'"),
        ),
        Case(
            "list --kind damping --tag psd",
            lambda: run_cli("list", "--kind", "damping", "--tag", "psd", reg=reg),
            says=("exit 2", "no component matches --kind 'damping' --tag 'psd'"),
        ),
        Case(
            "list --plugin sleepy still lists",
            lambda: run_cli("list", "--plugin", "sleepy", reg=reg),
            expect="ok",
            check=lambda out: _assert("sleepy_solver" in out, out),
        ),
        Case(
            "an unexpected exception is one line naming it",
            lambda: (monkeypatch.setattr(cli, "cmd_list", broken), run_cli("list", reg=reg)),
            says=("exit 1", "internal error: ZeroDivisionError: deep inside", "--debug"),
        ),
        Case(
            "--debug shows the traceback (the exception itself)",
            lambda: (
                monkeypatch.setattr(cli, "cmd_list", broken),
                run_cli("--debug", "list", reg=reg),
            ),
            error=ZeroDivisionError,
            says=("deep inside",),
        ),
    ]
    if Path("/dev/full").exists():
        cases.append(
            Case(
                "writing to a full device",
                lambda: _full_device(),
                says=("exit 1", "No space left on device", "--debug"),
            )
        )
    check_corpus("cli", cases)


def _full_device():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOMAX_PLUG_")}
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "somax_plug._src.cli", "list"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=120,
        )
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    if done.returncode:
        raise CliExit(f"exit {done.returncode}: {lines[0]}")


def test_host_survives_sys_exit_in_a_subprocess(installed):
    """``somax-plug doctor`` and a script calling ``compose()`` run to the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOMAX_PLUG_")}
    env["PYTHONPATH"] = os.pathsep.join([str(installed / "exiter"), *sys.path])
    env["SOMAX_PLUG_ONLY"] = "exiter"
    script = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from somax_plug import make_plan, get_registry\n"
        "make_plan({'curvature': 'ggn', 'solver': 'cg'})\n"
        "print('alive', get_registry().plugins['exiter'].status)\n"
        "from somax_plug._src.cli import main; raise SystemExit(main(['doctor']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "alive failed" in done.stdout
    assert "exiter" in done.stdout and "sys.exit(0)" in done.stdout
    assert ENTRY_POINT_GROUP == "somax_plug"
