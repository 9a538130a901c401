"""somax_plug plugin ``xdiag``: the XDiag diagonal estimator.

Registers one estimator, ``xdiag``, which provides the statistic ``diag`` (a pytree
like the parameters) of a symmetric curvature operator from ``2 m`` matrix-vector
products, exactly when the operator has rank below ``m`` and unbiased otherwise.
Any component that requires ``diag`` (the ``diagonal`` solver, the ``jacobi`` and
``diag_ema`` preconditioners) can use it.

The module imports no JAX: the factory is the lazy string
``"somax_plug_xdiag.estimator:XDiag"``.
"""

from __future__ import annotations

from typing import Any

from somax_plug import ComponentSpec, Requires, hookimpl

SOMAX_PLUG_API_VERSION = 1

SPEC = ComponentSpec(
    kind="estimator",
    name="xdiag",
    summary="XDiag exchangeable diagonal estimator (Epperly-Tropp-Webber 2024), 2m matvecs",
    provides={"diag"},
    requires=Requires(tags={"symmetric"}, resources={"operator"}),
    factory="somax_plug_xdiag.estimator:XDiag",
    defaults={"num_probes": 10},
    every_k=1,
)


@hookimpl
def somax_plug_register(register: Any) -> None:
    """Register the XDiag estimator."""
    register(SPEC)
