"""Specs of the built-in solvers, preconditioners and damping policies (light: no jax).

The registry reads :data:`SPECS` to list and plan components without importing
JAX; each factory is a lazy ``"module:attribute"`` string. The ``plugin`` field is
left empty: the registry fills it. ``requires`` here is the requirement for the
default options; an instance whose requirements depend on its options says so with
its own ``requires`` property (``cg`` with ``negative_curvature="none"`` needs a psd
operator, with the default ``"guard"`` only a symmetric one). The tests check that
the two agree for the defaults.

The solver ``identity`` and the preconditioner ``identity`` share a short name
across kinds; lookups are by kind, so there is no clash.

Example:
    >>> from somax_plug.builtin.catalog_solvers import SPECS
    >>> sorted(s.name for s in SPECS if s.kind.value == "damping")
    ['constant', 'levenberg_marquardt', 'schedule']
"""

from __future__ import annotations

from somax_plug.spec import ComponentSpec, Requires

_SOL = "somax_plug.builtin.solvers"
_PRE = "somax_plug.builtin.preconditioners"
_DAMP = "somax_plug.builtin.damping"

SOLVER_SPECS: list[ComponentSpec] = [
    ComponentSpec(
        kind="solver",
        name="cg",
        summary="(preconditioned) conjugate gradients, negative-curvature guard, warm start",
        requires=Requires(tags={"symmetric"}),
        factory=f"{_SOL}:CG",
        defaults={"tol": 1e-5, "maxiter": 50, "warm_start": False, "negative_curvature": "guard"},
    ),
    ComponentSpec(
        kind="solver",
        name="minres",
        summary="Paige-Saunders MINRES for symmetric indefinite systems (SPD preconditioner)",
        requires=Requires(tags={"symmetric"}),
        factory=f"{_SOL}:MINRES",
        defaults={"tol": 1e-5, "maxiter": 50},
    ),
    ComponentSpec(
        kind="solver",
        name="direct",
        summary="dense Cholesky (psd) or eigendecomposition solve; refuses n > max_size",
        requires=Requires(tags={"symmetric"}),
        factory=f"{_SOL}:Direct",
        defaults={"max_size": 4096, "eigenvalues": "exact"},
    ),
    ComponentSpec(
        kind="solver",
        name="row_cholesky",
        summary="Woodbury row-space solve with an R x R Cholesky (needs lam > 0)",
        requires=Requires(tags={"row_space"}),
        factory=f"{_SOL}:RowCholesky",
        defaults={"tol": 1e-5},
    ),
    ComponentSpec(
        kind="solver",
        name="row_cg",
        summary="Woodbury row-space solve with CG on the R x R system (needs lam > 0)",
        requires=Requires(tags={"row_space"}),
        factory=f"{_SOL}:RowCG",
        defaults={"tol": 1e-5, "maxiter": 50},
    ),
    ComponentSpec(
        kind="solver",
        name="diagonal",
        summary="rhs / max(|diag| + lam, eps) from an estimated diagonal",
        requires=Requires(statistics={"diag"}),
        factory=f"{_SOL}:Diagonal",
        defaults={"eps": 1e-12, "abs": True, "tol": 1e-5},
    ),
    ComponentSpec(
        kind="solver",
        name="identity",
        summary="first-order baseline: precond(rhs), or rhs without a preconditioner",
        factory=f"{_SOL}:Identity",
    ),
    ComponentSpec(
        kind="solver",
        name="neumann",
        summary="truncated Neumann series alpha * sum_k (I - alpha A)^k rhs",
        requires=Requires(tags={"psd"}),
        factory=f"{_SOL}:Neumann",
        defaults={"alpha": 1.0, "maxiter": 10, "tol": 1e-5},
    ),
    ComponentSpec(
        kind="solver",
        name="steihaug",
        summary="Steihaug-Toint truncated CG inside a trust region of a given radius",
        requires=Requires(tags={"symmetric"}),
        factory=f"{_SOL}:Steihaug",
        defaults={"radius": 1.0, "tol": 1e-5, "maxiter": 50},
    ),
]

PRECONDITIONER_SPECS: list[ComponentSpec] = [
    ComponentSpec(
        kind="preconditioner",
        name="identity",
        summary="no preconditioning (M = I)",
        factory=f"{_PRE}:Identity",
        every_k=1,
    ),
    ComponentSpec(
        kind="preconditioner",
        name="jacobi",
        summary="Jacobi M = diag(|diag|) + lam, floored at eps",
        requires=Requires(statistics={"diag"}),
        factory=f"{_PRE}:Jacobi",
        defaults={"eps": 1e-8, "abs": True},
        every_k=1,
    ),
    ComponentSpec(
        kind="preconditioner",
        name="diag_ema",
        summary="bias-corrected EMA of a diagonal, power and clip (AdaHessian, Sophia)",
        requires=Requires(statistics={"diag"}),
        factory=f"{_PRE}:DiagEMA",
        defaults={
            "beta": 0.99,
            "power": 1.0,
            "eps": 1e-12,
            "clip": None,
            "abs": True,
            "square": False,
        },
        every_k=1,
    ),
    ComponentSpec(
        kind="preconditioner",
        name="nystrom",
        summary="randomized rank-r Nystrom preconditioner of C + lam I (Frangella et al.)",
        requires=Requires(tags={"psd"}, resources={"operator"}),
        factory=f"{_PRE}:Nystrom",
        defaults={"rank": 10, "eps": 1e-12},
        every_k=1,
    ),
]

DAMPING_SPECS: list[ComponentSpec] = [
    ComponentSpec(
        kind="damping",
        name="constant",
        summary="fixed lambda; rejects only non-finite steps",
        factory=f"{_DAMP}:Constant",
        defaults={"lam": 1e-3, "dtype": "float32"},
        every_k=1,
    ),
    ComponentSpec(
        kind="damping",
        name="levenberg_marquardt",
        summary="ratio-test lambda (Martens 2010), rejects steps with rho < eta",
        requires=Requires(resources={"loss_after", "predicted_decrease"}),
        factory=f"{_DAMP}:LevenbergMarquardt",
        defaults={
            "init": 1.0,
            "increase": 1.5,
            "decrease": 2.0 / 3.0,
            "rho_low": 0.25,
            "rho_high": 0.75,
            "eta": 1e-4,
            "min_lambda": 1e-8,
            "max_lambda": 1e8,
            "dtype": "float32",
        },
        every_k=1,
    ),
    ComponentSpec(
        kind="damping",
        name="schedule",
        summary="lambda from an Optax schedule (callable or {'name': ..., **kwargs})",
        factory=f"{_DAMP}:Schedule",
        defaults={"dtype": "float32"},
        every_k=1,
    ),
]

SPECS: list[ComponentSpec] = [*SOLVER_SPECS, *PRECONDITIONER_SPECS, *DAMPING_SPECS]
"""Every spec of this module, in registration order."""
