"""The example plugins in ``plugins_examples/`` as installed distributions.

Fast, in-process: each example is installed as a real ``.dist-info`` (its own
``pyproject.toml`` name, version and entry point; its package's source files) with
the author kit's ``fake_distribution`` fixture, and loaded through
``somax_plug._src.loader.load_registry`` exactly as pip-installed plugins are.

Slow (``-m slow``): a fresh virtual environment, ``pip install`` of somax-plug and of
the three examples (the venv sees this interpreter's site-packages through a
``.pth`` file, so JAX and friends are not downloaded; the packages under test are
installed with ``--no-deps`` and shadow nothing), then the ``somax-plug list --json``
and ``somax-plug doctor --json`` contracts as subprocesses. ``scripts/ci_plugins.sh``
does the same with a fully isolated venv and the examples' own test-suites.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import warnings
from pathlib import Path

import pytest

from somax_plug._src.errors import CompositionError, PluginError
from somax_plug._src.loader import iter_entry_points, load_registry
from somax_plug.testing.plugin import fake_distribution  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "plugins_examples"
NAMES = ("somax-plug-lineax", "somax-plug-xdiag", "somax-plug-broken")
COMPONENTS = {
    "lineax": {"solver:lineax_gmres", "solver:lineax_bicgstab", "solver:lineax_cg"},
    "xdiag": {"estimator:xdiag"},
}


def _project(folder: Path) -> dict:
    with (folder / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)


def _modules(folder: Path, packages: list[str]) -> dict[str, str]:
    """Module name -> source for every ``.py`` of the packages (submodules first)."""
    out: dict[str, str] = {}
    for package in packages:
        files = sorted((folder / package).rglob("*.py"), key=lambda p: p.name == "__init__.py")
        for path in files:
            rel = path.relative_to(folder).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path.read_text()
    return out


@pytest.fixture
def examples(fake_distribution):  # noqa: F811 (the kit's fixture, imported above)
    """Install the three examples as fake (but real dist-info) distributions."""
    installed = {}
    for name in NAMES:
        folder = EXAMPLES / name
        project = _project(folder)
        installed[name] = fake_distribution(
            project["project"]["name"],
            _modules(folder, project["tool"]["setuptools"]["packages"]),
            project["project"]["entry-points"]["somax_plug"],
            version=project["project"]["version"],
        )
    return installed


def _load(env=None):
    eps = [ep for ep in iter_entry_points() if ep.dist.metadata["Name"] in NAMES]
    assert len(eps) == 3, [ep.name for ep in eps]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = load_registry(env=env or {}, entry_points=eps)
    return registry, [str(w.message) for w in caught]


def test_components_are_found_listed_and_attributed(examples):
    registry, warned = _load()
    for plugin, expected in COMPONENTS.items():
        record = registry.plugins[plugin]
        assert record.status == "ok", record.error
        assert record.distribution == f"somax-plug-{plugin}"
        assert record.version == "0.1.0"
        assert set(record.components) == expected
        listed = {f"{s.kind.value}:{s.name}" for s in registry.list(plugin=plugin)}
        assert listed == expected
    assert registry.get("solver", "lineax_cg").qualified_name == "lineax:lineax_cg"
    assert registry.get("estimator", "xdiag").plugin == "xdiag"
    assert "xdiag:xdiag" in registry.providers_of("estimator", "diag")
    assert registry.plugins["builtin"].status == "ok"
    assert [w for w in warned if "'broken'" in w], warned  # the failure is warned about


def test_the_broken_example_is_failed_with_its_reason_and_isolated(examples):
    import somax_plug_broken

    registry, _ = _load()
    record = registry.plugins["broken"]
    assert record.status == "failed"
    assert "RuntimeError" in record.error and somax_plug_broken.ERROR in record.error
    assert record.components == []
    assert not registry.find("broken_solver")
    assert registry.plugin_manager.get_plugin("broken") is None  # its hooks are gone
    # the others still compose, and the broken plugin's veto hook does not run
    from somax_plug._src.composition import compose

    # (the lineax solvers' module imports lineax, an optional extra: only xdiag is built)
    method = compose("ggn", "cg", estimators=["xdiag"], preconditioner="jacobi",
                     predict_fn=lambda p, x: x @ p, loss="mse", registry=registry)
    assert method.plan.component("estimator[0]").plugin == "xdiag"
    assert registry.get("solver", "lineax_cg").plugin == "lineax"
    with pytest.raises(CompositionError, match="plugin 'broken', which failed to load"):
        compose("ggn", "broken_solver", predict_fn=lambda p, x: x @ p, loss="mse",
                registry=registry)


def test_disable_hides_a_plugin_and_strict_mode_raises(examples):
    registry, warned = _load({"SOMAX_PLUG_DISABLE": "broken,xdiag"})
    assert registry.plugins["broken"].status == "disabled"
    assert registry.plugins["xdiag"].status == "disabled"
    assert not registry.find("xdiag")
    assert registry.plugins["lineax"].status == "ok"
    assert warned == []
    with pytest.raises(PluginError, match="broken"):
        _load({"SOMAX_PLUG_STRICT": "1"})


# ------------------------------------------------------------------ real pip install


def _run(args, env, cwd):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_pip_installed_examples_and_the_cli_json_contract(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     None, tmp_path).stdout.strip())
    (site / "_host_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # build from copies, so that pip writes no build/ or *.egg-info into the repo
    src = tmp_path / "src"
    shutil.copytree(ROOT, src / "somax-plug", ignore=shutil.ignore_patterns(
        ".git", "plugins_examples", "tests", "docs", "build", "*.egg-info", "__pycache__",
        ".hypothesis", "site", "demo_out", "out"))
    targets = [src / "somax-plug"]
    for name in NAMES:
        shutil.copytree(EXAMPLES / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        targets.append(src / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOMAX_PLUG_", "PYTHON"))}
    out = _run([py, "-m", "pip", "install", "--no-deps", "--quiet", *map(str, targets)], env,
               tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    cli = [str(venv / "bin" / "somax-plug")]

    listed = _run([*cli, "list", "--json"], env, tmp_path)
    assert listed.returncode == 0, listed.stderr[-3000:]
    rows = json.loads(listed.stdout)
    keys = {"kind", "name", "qualified_name", "plugin", "provides", "requires", "summary",
            "options", "every_k", "cadence", "preconditioned"}
    assert all(set(row) == keys for row in rows)
    by_plugin: dict[str, set[str]] = {}
    for row in rows:
        by_plugin.setdefault(row["plugin"], set()).add(f"{row['kind']}:{row['name']}")
        assert row["qualified_name"] == f"{row['plugin']}:{row['name']}"
    for plugin, expected in COMPONENTS.items():
        assert by_plugin[plugin] == expected
    assert "broken" not in by_plugin
    xdiag = next(r for r in rows if r["qualified_name"] == "xdiag:xdiag")
    assert xdiag["provides"] == ["diag"]
    assert xdiag["requires"] == {"tags": ["symmetric"], "statistics": [],
                                 "resources": ["operator"], "losses": []}
    assert xdiag["options"][0]["name"] == "num_probes"
    assert xdiag["options"][0]["allowed"] == "an int >= 2"

    # the plugins declare on their classes and import JAX lazily: listing stays light
    light = _run([py, "-c", "import sys; from somax_plug._src.cli import main; "
                  "main(['list', '--json']); "
                  "assert not [m for m in sys.modules if m.split('.')[0] in "
                  "('jax', 'lineax', 'optax')], 'heavy import'"], env, tmp_path)
    assert light.returncode == 0, light.stderr[-3000:]

    doctor = _run([*cli, "doctor", "--json"], env, tmp_path)
    assert doctor.returncode == 0, doctor.stderr[-3000:]
    report = json.loads(doctor.stdout)
    plugins = {p["name"]: p for p in report["plugins"]}
    fields = {"name", "distribution", "version", "status", "error"}
    assert all(fields <= set(p) for p in plugins.values())
    assert plugins["broken"]["status"] == "failed"
    assert "fails on purpose" in plugins["broken"]["error"]
    assert plugins["broken"]["distribution"] == "somax-plug-broken"
    for plugin in ("builtin", "lineax", "xdiag"):
        assert plugins[plugin]["status"] == "ok", plugins[plugin]

    hidden = _run([*cli, "doctor", "--json"], {**env, "SOMAX_PLUG_DISABLE": "broken"}, tmp_path)
    plugins = {p["name"]: p for p in json.loads(hidden.stdout)["plugins"]}
    assert plugins["broken"]["status"] == "disabled"
    assert not [p for p in plugins.values() if p["status"] == "failed"]

    strict = _run([*cli, "list", "--json"], {**env, "SOMAX_PLUG_STRICT": "1"}, tmp_path)
    assert strict.returncode != 0 and "broken" in strict.stderr
