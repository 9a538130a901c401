"""somax_plug plugin ``xdiag``: the XDiag diagonal estimator.

Registers one estimator, ``xdiag``, which provides the statistic ``diag`` (a pytree
like the parameters) of a symmetric curvature operator from ``2 m`` matrix-vector
products, exactly when the operator has rank below ``m`` and unbiased otherwise.
Any component that requires ``diag`` (the ``diagonal`` solver, the ``jacobi`` and
``diag_ema`` preconditioners) can use it.

The estimator is declared once, on its class (``@somax_plug.declare`` with a
``somax_plug.option`` field), and its module imports JAX lazily, so registering it
imports no JAX and ``somax-plug list`` stays fast.
"""

from __future__ import annotations

from typing import Any

from somax_plug import hookimpl

SOMAX_PLUG_API_VERSION = 1


@hookimpl
def somax_plug_register(register: Any) -> None:
    """Register the XDiag estimator."""
    from somax_plug_xdiag.estimator import XDiag

    register(XDiag)
