"""Specs of the built-in curvature operators and estimators (light: no jax import).

The registry reads :data:`SPECS` to list and plan components without importing
JAX; each factory is a lazy ``"module:attribute"`` string, imported only when the
component is first built. The ``plugin`` field is left empty: the registry fills it.

The data here restates the ``provides`` / ``requires`` class attributes of
:mod:`somax_plug.builtin.curvature` and :mod:`somax_plug.builtin.estimators` and the
defaults of their options (the tests check that they agree).

Example:
    >>> from somax_plug.builtin.catalog_curvature import SPECS
    >>> sorted(s.name for s in SPECS if s.kind.value == "curvature")
    ['empirical_fisher', 'fisher', 'ggn', 'hessian']
"""

from __future__ import annotations

from somax_plug.spec import ComponentSpec, Requires

_CURV = "somax_plug.builtin.curvature"
_EST = "somax_plug.builtin.estimators"

CURVATURE_SPECS: list[ComponentSpec] = [
    ComponentSpec(
        kind="curvature",
        name="hessian",
        summary="loss Hessian d2L/dparams2, v -> Hv by forward-over-reverse (symmetric)",
        provides={"symmetric"},
        requires=Requires(resources={"hvp"}),
        factory=f"{_CURV}:Hessian",
    ),
    ComponentSpec(
        kind="curvature",
        name="ggn",
        summary="generalised Gauss-Newton J^T H_out J from one shared linearization",
        provides={"symmetric", "psd", "row_space"},
        requires=Requires(resources={"linearization", "output_hessian"}),
        factory=f"{_CURV}:GGN",
    ),
    ComponentSpec(
        kind="curvature",
        name="fisher",
        summary="Monte-Carlo Fisher J^T (sampled output-gradient outer products) J",
        provides={"symmetric", "psd", "row_space"},
        requires=Requires(resources={"linearization"}),
        factory=f"{_CURV}:Fisher",
        defaults={"num_samples": 1},
    ),
    ComponentSpec(
        kind="curvature",
        name="empirical_fisher",
        summary="empirical Fisher c * sum_b g_b g_b^T from per-example gradients",
        provides={"symmetric", "psd", "row_space", "diag"},
        requires=Requires(resources={"per_example_grads"}),
        factory=f"{_CURV}:EmpiricalFisher",
    ),
]

ESTIMATOR_SPECS: list[ComponentSpec] = [
    ComponentSpec(
        kind="estimator",
        name="hutchinson_diag",
        summary="Hutchinson diagonal E[z * Cz] from random probes",
        provides={"diag"},
        requires=Requires(resources={"operator"}),
        factory=f"{_EST}:HutchinsonDiag",
        defaults={"num_probes": 10, "probe": "rademacher"},
        every_k=1,
    ),
    ComponentSpec(
        kind="estimator",
        name="hutchinson_trace",
        summary="Hutchinson trace E[z . Cz] from random probes",
        provides={"trace"},
        requires=Requires(resources={"operator"}),
        factory=f"{_EST}:HutchinsonTrace",
        defaults={"num_probes": 10, "probe": "rademacher"},
        every_k=1,
    ),
    ComponentSpec(
        kind="estimator",
        name="hutchpp_trace",
        summary="Hutch++ trace: low-rank sketch plus Hutchinson on the deflated rest",
        provides={"trace"},
        requires=Requires(resources={"operator"}),
        factory=f"{_EST}:HutchppTrace",
        defaults={"num_probes": 30, "probe": "rademacher"},
        every_k=1,
    ),
    ComponentSpec(
        kind="estimator",
        name="gnb_diag",
        summary="Gauss-Newton-Bartlett GGN diagonal (Sophia-G; softmax cross-entropy only)",
        provides={"diag"},
        requires=Requires(resources={"linearization"}),
        factory=f"{_EST}:GNBDiag",
        defaults={"num_samples": 1},
        every_k=1,
    ),
    ComponentSpec(
        kind="estimator",
        name="exact_diag",
        summary="exact diagonal (op.diag() or the dense matrix; small models only)",
        provides={"diag"},
        requires=Requires(resources={"operator"}),
        factory=f"{_EST}:ExactDiag",
        defaults={"max_size": 4096},
        every_k=1,
    ),
    ComponentSpec(
        kind="estimator",
        name="lanczos",
        summary="leading eigenpairs and spectral density by Lanczos (full reorthogonalisation)",
        provides={"eigenvalues", "eigenvectors", "spectral_density"},
        requires=Requires(resources={"operator"}),
        factory=f"{_EST}:Lanczos",
        defaults={
            "num_iters": 30,
            "num_eigs": 5,
            "which": "largest",
            "grid_size": 128,
            "smoothing": 0.02,
        },
        every_k=1,
    ),
]

SPECS: list[ComponentSpec] = CURVATURE_SPECS + ESTIMATOR_SPECS
"""Every curvature operator and estimator of the built-in plugin."""
