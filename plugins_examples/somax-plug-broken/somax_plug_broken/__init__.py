"""somax_plug plugin ``broken``: deliberately fails half-way through registering.

Its ``somax_plug_register`` hook registers the solver ``broken_solver`` and then
raises. The loader runs each plugin's registration as a transaction, so the solver
is rolled back, the plugin is reported ``failed`` with this error (``somax-plug
doctor``), its other hooks never run, and every other plugin keeps working.
Naming ``broken_solver`` in a composition raises an error that quotes the failure.
"""

from __future__ import annotations

from typing import Any

from somax_plug import ComponentSpec, hookimpl

SOMAX_PLUG_API_VERSION = 1

ERROR = "somax-plug-broken fails on purpose after registering one component"


@hookimpl
def somax_plug_register(register: Any) -> None:
    """Register one solver, then fail (so the registration is rolled back)."""
    register(
        ComponentSpec(
            kind="solver",
            name="broken_solver",
            summary="never available: its plugin fails to register",
            factory="somax_plug.builtin.solvers:Identity",
        )
    )
    raise RuntimeError(ERROR)


@hookimpl
def somax_plug_validate_plan(plan: Any) -> str:
    """Would veto every plan, if a failed plugin's hooks ever ran (they must not)."""
    return "somax-plug-broken's validate hook ran although the plugin failed to load"
