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

Each solver is declared once, on its class in :mod:`somax_plug_lineax.solvers`
(``@somax_plug.declare`` with ``somax_plug.option`` fields), and registered with
``register(Class)``; ``somax-plug list``, ``show``, the planner and the conformance
kit read that one record. A solver that reads the operator must declare it: a tag
requirement implies it, otherwise ``requires={"resources": {"operator"}}``, or the
planner passes ``op=None``. The three apply the composition's preconditioner
(``preconditioned=True``).

The solvers module imports JAX and lineax lazily (``somax_plug.lazy_import``), so
registering the classes imports neither and ``somax-plug list`` stays fast.

Example:
    >>> import somax_plug
    >>> somax_plug.get_registry().get("solver", "lineax_gmres").plugin  # doctest: +SKIP
    'lineax'
"""

from __future__ import annotations

from typing import Any

from somax_plug import hookimpl

SOMAX_PLUG_API_VERSION = 1


@hookimpl
def somax_plug_register(register: Any) -> None:
    """Register the lineax solvers (their declarations live on the classes)."""
    from somax_plug_lineax import solvers

    for cls in (solvers.GMRES, solvers.BiCGStab, solvers.CG):
        register(cls)
