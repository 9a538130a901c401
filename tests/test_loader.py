"""Plugin loading through real entry points (fake dist-info on sys.path).

Each test installs distributions with ``install_fake_distribution``: a real
``.dist-info`` that ``importlib.metadata`` discovers, so the loader runs exactly
as it does for a pip-installed plugin. (``.ci/run`` also pip-installs the example
plugins into a fresh virtual environment.)
"""

from __future__ import annotations

import types
import warnings

import pytest

from somax_plug import hookimpl
from somax_plug._src.errors import PluginError, UnknownComponentError
from somax_plug._src.loader import iter_entry_points, load_registry
from somax_plug.testing.distributions import install_fake_distribution

GOOD = """
from somax_plug import hookimpl
from somax_plug._src.spec import ComponentSpec, Requires
SOMAX_PLUG_API_VERSION = 1

@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="good_solver", summary="a good one",
                           requires=Requires(tags={"psd"}), factory="collections:OrderedDict"))
    register.preset("good_preset", {"curvature": "ggn", "solver": "good_solver"})
"""

HALF = """
from somax_plug import hookimpl
from somax_plug._src.spec import ComponentSpec

@hookimpl
def somax_plug_register(register):
    register(ComponentSpec(kind="solver", name="half_solver", factory="collections:OrderedDict"))
    raise RuntimeError("deliberately broken after one registration")

@hookimpl
def somax_plug_validate_plan(plan):
    return "must never run: this plugin was rolled back"
"""

IMPORT_ERROR = "import definitely_not_a_module_somax\n"

OLD_API = """
from somax_plug import hookimpl
SOMAX_PLUG_API_VERSION = 99
@hookimpl
def somax_plug_register(register):
    raise AssertionError("never called")
"""

INVALID = """
from somax_plug import hookimpl
@hookimpl
def somax_plug_register(register):
    register(kind="solver", name="bad:name", factory=dict)
"""


def _fake_builtin():
    @hookimpl
    def somax_plug_register(register):
        register(kind="curvature", name="ggn", factory=dict, provides={"psd"})

    return types.SimpleNamespace(somax_plug_register=somax_plug_register)


@pytest.fixture
def dists(tmp_path):
    made = []

    def make(name, source, plugin):
        module = name.replace("-", "_")
        d = install_fake_distribution(
            tmp_path / name, name, {module: source}, {plugin: module}, version="1.2.3"
        )
        made.append(d)
        return d

    yield make
    for d in made:
        d.remove()


def _load(names, env=None):
    eps = [ep for ep in iter_entry_points() if ep.dist.metadata["Name"] in names]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = load_registry(env=env or {}, entry_points=eps, builtin=_fake_builtin())
    return reg, [str(w.message) for w in caught]


def test_good_plugin_is_found_listed_and_attributed(dists):
    dists("somax-plug-good", GOOD, "good")
    reg, warned = _load({"somax-plug-good"})
    assert warned == []
    spec = reg.get("solver", "good_solver")
    assert spec.qualified_name == "good:good_solver"
    assert reg.plugins["good"].status == "ok"
    assert reg.plugins["good"].distribution == "somax-plug-good"
    assert reg.plugins["good"].version == "1.2.3"
    assert reg.preset("good_preset").plugin == "good"
    assert reg.get("curvature", "ggn").plugin == "builtin"


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (HALF, "deliberately broken after one registration"),
        (IMPORT_ERROR, "import failed: ModuleNotFoundError"),
        (OLD_API, "SOMAX_PLUG_API_VERSION 99"),
        (INVALID, "invalid component name 'bad:name'"),
    ],
)
def test_broken_plugin_is_isolated_and_quoted(dists, source, reason):
    dists("somax-plug-good", GOOD, "good")
    dists("somax-plug-bad", source, "bad")
    reg, warned = _load({"somax-plug-good", "somax-plug-bad"})
    record = reg.plugins["bad"]
    assert record.status == "failed" and reason in record.error
    assert any("plugin 'bad' failed" in w for w in warned)
    # the host keeps working and nothing of the broken plugin remains
    assert reg.get("solver", "good_solver").plugin == "good"
    assert [s.plugin for s in reg.list()] == ["builtin", "good"]
    assert reg.plugin_manager.get_plugin("bad") is None
    assert reg.hook.somax_plug_validate_plan(plan=None) == []
    with pytest.raises(UnknownComponentError, match="plugin 'bad', which failed") as info:
        reg.get("solver", "bad:anything")
    assert reason in str(info.value)


def test_half_registered_component_name_quotes_failure(dists):
    dists("somax-plug-bad", HALF, "bad")
    reg, _ = _load({"somax-plug-bad"})
    with pytest.raises(UnknownComponentError) as info:
        reg.get("solver", "half_solver")
    assert "deliberately broken" in str(info.value)


def test_disable_only_and_strict(dists):
    dists("somax-plug-good", GOOD, "good")
    dists("somax-plug-bad", IMPORT_ERROR, "bad")
    names = {"somax-plug-good", "somax-plug-bad"}
    reg, warned = _load(names, env={"SOMAX_PLUG_DISABLE": "bad, good"})
    assert {reg.plugins[n].status for n in ("good", "bad")} == {"disabled"}
    assert warned == []
    with pytest.raises(UnknownComponentError):
        reg.get("solver", "good_solver")
    reg, _ = _load(names, env={"SOMAX_PLUG_ONLY": "good"})
    assert reg.plugins["good"].status == "ok" and reg.plugins["bad"].status == "disabled"
    assert reg.plugins["builtin"].status == "ok"
    with pytest.raises(PluginError, match="plugin 'bad' failed"):
        _load(names, env={"SOMAX_PLUG_STRICT": "1"})


def test_disable_is_applied_before_import(dists, tmp_path):
    marker = tmp_path / "imported.txt"
    dists("somax-plug-spy", f"open({str(marker)!r}, 'w').write('x')\n", "spy")
    _load({"somax-plug-spy"}, env={"SOMAX_PLUG_DISABLE": "spy"})
    assert not marker.exists()
    _load({"somax-plug-spy"})
    assert marker.exists()


def test_name_clash_with_builtin_is_explicit(dists):
    clash = GOOD.replace('name="good_solver"', 'name="ggn"').replace(
        'kind="solver"', 'kind="curvature"'
    )
    dists("somax-plug-clash", clash, "clash")
    reg, warned = _load({"somax-plug-clash"})
    assert any("registered by several plugins (builtin:ggn, clash:ggn)" in w for w in warned)
    with pytest.raises(PluginError, match="several plugins"):
        _load({"somax-plug-clash"}, env={"SOMAX_PLUG_STRICT": "1"})


def test_import_is_light():
    import subprocess
    import sys

    code = "import somax_plug, sys; print(sorted(m for m in ('jax', 'optax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
