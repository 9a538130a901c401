"""somax_plug: composable curvature-aware (second-order) training in JAX.

A second-order method is composed from five kinds of registered components
(curvature operators, estimators, solvers, preconditioners, damping policies),
planned into a static :class:`Plan` that computes every shared intermediate once,
and compiled into one jitted step that composes with Optax.

This namespace is the public API, for users and plugin authors alike, with five
public submodules: :mod:`somax_plug.tree` (pytree-vector helpers),
:mod:`somax_plug.losses`, :mod:`somax_plug.checkpoint`,
:mod:`somax_plug.testing` (the plugin author kit) and :mod:`somax_plug.models`
(Flax and Equinox adapters; Flax and Equinox are optional extras). The implementation lives in
``somax_plug._src`` and may change without notice; the built-in components in
:mod:`somax_plug.builtin` are a plugin written against this namespace only.

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

from somax_plug._src.hookspecs import API_VERSION, hookimpl, hookspec  # noqa: E402 (pluggy only)

_SRC = "somax_plug._src."
_LAZY = {
    # declaring and registering components
    "ComponentSpec": "spec",
    "Requires": "spec",
    "declare": "spec",
    "Choices": "choices",
    "choices_field": "choices",
    "spec_of": "spec",
    "declared_in": "spec",
    "requirements_of": "spec",
    "Option": "options",
    "option": "options",
    "Kind": "kinds",
    "PresetSpec": "registry",
    "Registry": "registry",
    "get_registry": "registry",
    "reset_registry": "registry",
    "use_registry": "registry",
    "load_registry": "loader",
    "lazy_import": "lazy",
    # the five kinds and what flows between them
    "LinearOperator": "kinds",
    "Curvature": "kinds",
    "Estimator": "kinds",
    "Solver": "kinds",
    "Preconditioner": "kinds",
    "Damping": "kinds",
    "SolverInfo": "kinds",
    "StepStats": "kinds",
    "RowFactors": "kinds",
    "SYMMETRIC": "kinds",
    "PSD": "kinds",
    "ROW_SPACE": "kinds",
    "DIAG": "kinds",
    # operators
    "PytreeOperator": "operators",
    "MatrixOperator": "operators",
    "SumOperator": "operators",
    "ScaledOperator": "operators",
    "DampedOperator": "operators",
    "add": "operators",
    "scale": "operators",
    "damp": "operators",
    "damped_mv": "operators",
    "normalize_tags": "operators",
    "to_lineax": "operators",
    # resources
    "ResourceProvider": "resources",
    "Resources": "resources",
    "Linearization": "resources",
    "OutputHessian": "resources",
    "HVP": "resources",
    "Layer": "layers",
    "LayerMap": "layers",
    "LayerIO": "layers",
    # model and losses
    "make_model": "model",
    "Model": "model",
    "model_key": "step_core",
    "model_state_of": "optax_bridge",
    "Loss": "losses",
    "get_loss": "losses",
    # composing, planning, stepping
    "compose": "composition",
    "Composition": "composition",
    "Method": "step",
    "MethodState": "step",
    "INFO_KEYS": "step_core",
    "Plan": "plan",
    "PlannedComponent": "plan",
    "ResourceNode": "plan",
    "Consumer": "plan",
    "make_plan": "planner",
    "as_optax": "optax_bridge",
    # data parallelism
    "data_parallel_mesh": "sharding",
    "DataParallel": "sharding",
    "shard_batch": "sharding",
    "shard_large_2d": "sharding",
    # many processes (jax.distributed)
    "init_distributed": "distributed",
    "cpu_scheduler_flag": "distributed",
    "process_batch": "distributed",
    "process_slice": "distributed",
    "to_host": "distributed",
    # errors
    "SomaxPlugError": "errors",
    "RegistryError": "errors",
    "UnknownComponentError": "errors",
    "AmbiguousComponentError": "errors",
    "ConflictError": "errors",
    "PluginError": "errors",
    "CompositionError": "errors",
    "OptionError": "errors",
    "PlanVetoed": "errors",
    "InputError": "errors",
    "CheckpointError": "errors",
    "ComponentError": "errors",
}

_SUBMODULES = ("tree", "losses", "checkpoint", "testing", "builtin", "models", "layers")

__all__ = ["API_VERSION", "__version__", "hookimpl", "hookspec", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"somax_plug.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'somax_plug' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SRC + module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
