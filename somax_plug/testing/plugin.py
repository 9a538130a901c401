"""pytest plugin of the author kit: fixtures for testing a somax_plug plugin.

Opt in from a ``conftest.py`` (or a test module) with either line::

    pytest_plugins = ["somax_plug.testing.plugin"]
    pytest_plugins = ["somax_plug.testing"]      # the same fixtures, re-exported

Design: the fixtures live here; :mod:`somax_plug.testing` re-exports them so the
shorter name works too. Name only one of the two (naming both registers the
fixtures twice, which pytest accepts, the later definition winning).

Fixtures:

``somax_registry``
    A fresh :class:`~somax_plug.Registry` holding only the built-in
    components, installed as the process-wide registry for the duration of the test
    (:func:`somax_plug.use_registry`), so ``compose("ggn", "my_solver",
    ...)`` resolves names in it.
``register_plugin``
    ``register_plugin(plugin, name=None) -> PluginRecord``: register a plugin object
    (a module or any object with ``@hookimpl`` functions) in ``somax_registry``
    through the real loader path (:func:`somax_plug._src.loader.register_plugin`: API
    version check, pluggy registration, the transactional ``register`` hook with
    rollback). A failing plugin is *not* raised: its record says ``failed`` and why,
    exactly as ``somax-plug doctor`` would; pass ``check=True`` to raise instead.
``fake_distribution``
    ``fake_distribution(name, modules, entry_points, version="0.1.0")``: install a
    real ``.dist-info`` under ``tmp_path`` with
    :func:`~somax_plug.testing.distributions.install_fake_distribution`, removed (and
    its modules forgotten) at the end of the test.

Example (``tests/test_my_plugin.py`` of a plugin)::

    import my_plugin

    pytest_plugins = ["somax_plug.testing"]

    def test_registers(somax_registry, register_plugin):
        record = register_plugin(my_plugin, name="mine")
        assert record.status == "ok"
        assert somax_registry.get("solver", "my_cg").plugin == "mine"
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from somax_plug._src.registry import PluginRecord, Registry

__all__ = ["fake_distribution", "register_plugin", "somax_registry"]


def fresh_registry() -> Registry:
    """A registry with only the built-in plugin loaded (no entry points, no env switches)."""
    from somax_plug._src.loader import load_registry

    return load_registry(env={}, entry_points=[])


@pytest.fixture
def somax_registry() -> Iterator[Registry]:
    """A fresh built-ins-only registry, process-wide during the test."""
    from somax_plug._src.registry import use_registry

    registry = fresh_registry()
    with use_registry(registry):
        yield registry


@pytest.fixture
def register_plugin(somax_registry: Registry) -> Callable[..., PluginRecord]:
    """Register plugin objects in ``somax_registry`` through the real loader path."""
    from somax_plug._src.loader import register_plugin as load_one

    def register(plugin: Any, name: str | None = None, check: bool = False) -> PluginRecord:
        label = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        label = label.rpartition(".")[2]
        if label in somax_registry.plugins:
            raise ValueError(f"a plugin named {label!r} is already registered; pass name=")
        record = PluginRecord(name=label)
        somax_registry.plugins[label] = record
        load_one(somax_registry, somax_registry.plugin_manager, label, plugin, record)
        if check and record.status != "ok":
            raise AssertionError(f"plugin {label!r} failed to register: {record.error}")
        return record

    return register


@pytest.fixture
def fake_distribution(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Install fake distributions (real dist-info) under ``tmp_path``; removed afterwards."""
    from somax_plug.testing.distributions import install_fake_distribution

    made: list[Any] = []

    def install(
        name: str,
        modules: Mapping[str, str],
        entry_points: Mapping[str, str],
        version: str = "0.1.0",
        group: str = "somax_plug",
    ) -> Any:
        folder = tmp_path / f"dist-{len(made)}-{name}"
        dist = install_fake_distribution(folder, name, modules, entry_points, version, group)
        made.append(dist)
        return dist

    yield install
    for dist in reversed(made):
        with contextlib.suppress(Exception):
            dist.remove()
