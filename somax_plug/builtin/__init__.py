"""The built-in plugin ``builtin``: registered through the same public hooks.

Nothing here is special-cased by the loader: this module is a plugin object with
``@hookimpl`` functions, exactly like a third-party plugin's module, except that
the loader finds it without an entry point. Component specs live in light
catalog modules (no JAX import) with lazy ``"module:attr"`` factories, so that
``somax-plug list`` stays fast; resource providers are imported on first use.
"""

from __future__ import annotations

from typing import Any

from somax_plug.hookspecs import API_VERSION, hookimpl

SOMAX_PLUG_API_VERSION = API_VERSION


@hookimpl
def somax_plug_register(register: Any) -> None:
    """Register every built-in component and preset."""
    from somax_plug.builtin import catalog_curvature, catalog_presets, catalog_solvers

    for spec in (*catalog_curvature.SPECS, *catalog_solvers.SPECS):
        register(spec)
    for name, (summary, composition) in catalog_presets.PRESETS.items():
        register.preset(name, composition, summary=summary)


@hookimpl(trylast=True)
def somax_plug_provide_resource(name: str, registry: Any) -> Any:
    """Built-in resources (outputs, linearization, loss, grad, hvp, ...)."""
    from somax_plug.builtin.resources import PROVIDERS

    return PROVIDERS.get(name)


@hookimpl(trylast=True)
def somax_plug_amend_plan(plan: Any) -> Any:
    """Innermost implementation: the plan as the planner made it."""
    return plan


@hookimpl
def somax_plug_validate_plan(plan: Any) -> Any:
    """Refuse ``gnb_diag`` with a loss other than softmax cross-entropy, before tracing."""
    loss = plan.loss
    if loss is None or loss == "softmax_cross_entropy":
        return None
    users = [c.name for c in plan.estimators if c.name == "builtin:gnb_diag"]
    if not users:
        return None
    return (
        f"estimator 'gnb_diag' (Gauss-Newton-Bartlett) needs loss 'softmax_cross_entropy', "
        f"the composition uses {loss!r}; use estimator 'hutchinson_diag' on curvature 'ggn'"
    )
