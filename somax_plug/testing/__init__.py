"""The plugin author kit: a pytest plugin, conformance checks and test helpers.

==========================================  ==========================================
module                                      what it gives a plugin author
==========================================  ==========================================
:mod:`somax_plug.testing.plugin`            pytest fixtures ``somax_registry``,
                                            ``register_plugin``, ``fake_distribution``
:mod:`somax_plug.testing.conformance`       ``check_curvature``, ``check_estimator``,
                                            ``check_solver``, ``check_preconditioner``,
                                            ``check_damping``, ``make_conformance_tests``
:mod:`somax_plug.testing.references`        dense float64 references and reference
                                            components (test doubles)
:mod:`somax_plug.testing.strategies`        Hypothesis strategies: small MLP problems,
                                            linear systems
:mod:`somax_plug.testing.distributions`     ``install_fake_distribution`` (a real
                                            dist-info on ``sys.path``)
==========================================  ==========================================

This package is also a pytest plugin: ``pytest_plugins = ["somax_plug.testing"]`` (or
``["somax_plug.testing.plugin"]``, where the fixtures are defined; this module
re-exports them). It needs the ``test`` extra (pytest, hypothesis).

Example (a plugin's ``tests/conftest.py``)::

    pytest_plugins = ["somax_plug.testing"]
"""

from somax_plug.testing.plugin import fake_distribution, register_plugin, somax_registry

__all__ = ["fake_distribution", "register_plugin", "somax_registry"]
