"""The built-in plugin ``builtin``: registered through the same public hooks.

Nothing here is special-cased by the loader or the planner: this package is a
plugin object with ``@hookimpl`` functions, exactly like a third-party plugin's
module, written against the public ``somax_plug`` namespace only (the loader finds
it without an entry point). Each component is declared once, on its class, with
``@declare`` in the module that implements it; :func:`somax_plug_register` registers
every class those modules declare, so adding a component touches only its module
(and its tests). The component modules import JAX lazily, so ``somax-plug list``
stays fast.

================================  ===========================================
module                            what it declares
================================  ===========================================
:mod:`~somax_plug.builtin.curvature`        curvature operators
:mod:`~somax_plug.builtin.estimators`       estimators
:mod:`~somax_plug.builtin.solvers`          solvers
:mod:`~somax_plug.builtin.preconditioners`  preconditioners
:mod:`~somax_plug.builtin.damping`          damping policies (``constant`` is the
                                            default damping of a composition)
:mod:`~somax_plug.builtin.presets`          presets (compositions as data)
:mod:`~somax_plug.builtin.resources`        resource providers
:mod:`~somax_plug.builtin.layers`           layer map and per-layer resources
:mod:`~somax_plug.builtin.kronecker`        KFAC, EKFAC and their factor resources
================================  ===========================================
"""

from __future__ import annotations

import importlib
from typing import Any

from somax_plug import API_VERSION, hookimpl

SOMAX_PLUG_API_VERSION = API_VERSION

COMPONENT_MODULES = ("curvature", "estimators", "solvers", "preconditioners", "damping", "shampoo",
                     "kronecker")
"""The modules whose declared classes this plugin registers, in this order."""


@hookimpl
def somax_plug_register(register: Any) -> None:
    """Register every declared built-in component, the default damping and the presets."""
    from somax_plug import declared_in
    from somax_plug.builtin.presets import PRESETS

    for name in COMPONENT_MODULES:
        for spec in declared_in(importlib.import_module(f"{__name__}.{name}")):
            register(spec)
    register.default("damping", "constant")
    for name, (summary, composition) in PRESETS.items():
        register.preset(name, composition, summary=summary)


@hookimpl(trylast=True)
def somax_plug_provide_resource(name: str, registry: Any) -> Any:
    """Built-in resources (outputs, linearization, loss, grad, hvp, ..., layer_map)."""
    from somax_plug.builtin.resources import PROVIDERS

    if name.startswith("layer_"):
        from somax_plug.builtin.layers import PROVIDERS as LAYERS

        return LAYERS.get(name)
    if name.startswith("kfac_"):
        from somax_plug.builtin.kronecker import PROVIDERS as KRONECKER

        return KRONECKER.get(name)
    return PROVIDERS.get(name)


@hookimpl(trylast=True)
def somax_plug_amend_plan(plan: Any) -> Any:
    """Innermost implementation: the plan as the planner made it."""
    return plan
