"""somax_plug plugin ``lineax``: lineax's Krylov solvers as somax_plug solvers.

Registers three solvers of the damped system ``(C + lam I) s = rhs``:

===================  =============================  ==============================
name                 lineax solver                  requires
===================  =============================  ==============================
``lineax_gmres``     ``lineax.GMRES`` (restarted)   the resource ``operator`` (no
                                                    tag: any nonsingular operator)
``lineax_bicgstab``  ``lineax.BiCGStab``            the resource ``operator``
``lineax_cg``        ``lineax.CG``                  a ``psd`` operator
===================  =============================  ==============================

A solver that reads the operator must declare it: a tag requirement implies it,
otherwise ``Requires(resources={"operator"})``, or the planner passes ``op=None``.

The module is light: it imports neither JAX nor lineax; the factories are lazy
``"module:attribute"`` strings, so ``somax-plug list`` stays fast.

Example:
    >>> import somax_plug
    >>> somax_plug.get_registry().get("solver", "lineax_gmres").plugin  # doctest: +SKIP
    'lineax'
"""

from __future__ import annotations

from typing import Any

from somax_plug import ComponentSpec, Requires, hookimpl

SOMAX_PLUG_API_VERSION = 1

_COMMON = {"rtol": 1e-6, "atol": 0.0, "max_steps": 100}

SPECS = [
    ComponentSpec(
        kind="solver",
        name="lineax_gmres",
        summary="lineax restarted GMRES: any (also nonsymmetric) operator",
        requires=Requires(resources={"operator"}),
        factory="somax_plug_lineax.solvers:GMRES",
        defaults={**_COMMON, "restart": 20},
    ),
    ComponentSpec(
        kind="solver",
        name="lineax_bicgstab",
        summary="lineax BiCGStab: any (also nonsymmetric) operator",
        requires=Requires(resources={"operator"}),
        factory="somax_plug_lineax.solvers:BiCGStab",
        defaults=_COMMON,
    ),
    ComponentSpec(
        kind="solver",
        name="lineax_cg",
        summary="lineax conjugate gradients: psd operators, SPD preconditioner",
        requires=Requires(tags={"psd"}, resources={"operator"}),
        factory="somax_plug_lineax.solvers:CG",
        defaults=_COMMON,
    ),
]


@hookimpl
def somax_plug_register(register: Any) -> None:
    """Register the lineax solvers."""
    for spec in SPECS:
        register(spec)
