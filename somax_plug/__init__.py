"""somax_plug: composable curvature-aware (second-order) training in JAX.

A second-order method is composed from five kinds of registered components
(curvature operators, estimators, solvers, preconditioners, damping policies),
planned into a static :class:`~somax_plug.plan.Plan` that computes every shared
intermediate once, and compiled into one jitted step that composes with Optax.

``import somax_plug`` is light: JAX, Optax and the plugins are imported on first
use of the names below.

Example:
    >>> import somax_plug
    >>> spec = somax_plug.get_registry().get("solver", "cg")
    >>> spec.qualified_name
    'builtin:cg'
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from somax_plug.hookspecs import API_VERSION, hookimpl, hookspec  # noqa: E402 (pluggy only)

_LAZY = {
    # records and registry
    "ComponentSpec": "somax_plug.spec",
    "Requires": "somax_plug.spec",
    "Kind": "somax_plug.kinds",
    "Registry": "somax_plug.registry",
    "get_registry": "somax_plug.registry",
    "reset_registry": "somax_plug.registry",
    "use_registry": "somax_plug.registry",
    "load_registry": "somax_plug.loader",
    # abstract bases
    "LinearOperator": "somax_plug.kinds",
    "Curvature": "somax_plug.kinds",
    "Estimator": "somax_plug.kinds",
    "Solver": "somax_plug.kinds",
    "Preconditioner": "somax_plug.kinds",
    "Damping": "somax_plug.kinds",
    "SolverInfo": "somax_plug.kinds",
    "StepStats": "somax_plug.kinds",
    "RowFactors": "somax_plug.kinds",
    "ResourceProvider": "somax_plug.resources",
    "Resources": "somax_plug.resources",
    # model
    "make_model": "somax_plug.model",
    "Model": "somax_plug.model",
    "get_loss": "somax_plug.losses",
    # planning and the step
    "compose": "somax_plug.composition",
    "Composition": "somax_plug.composition",
    "Method": "somax_plug.step",
    "Plan": "somax_plug.plan",
    "make_plan": "somax_plug.planner",
    "as_optax": "somax_plug.optax_bridge",
}

__all__ = ["API_VERSION", "__version__", "hookimpl", "hookspec", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'somax_plug' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
