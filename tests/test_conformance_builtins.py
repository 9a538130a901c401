"""Every built-in component through the same conformance kit that plugin authors use.

The components are read from the registry, so every built-in is checked, including
one added later without touching this file (it runs with the kit's defaults). The
tables give only the options a check needs to be decisive: iterative solvers
get a tolerance and an iteration budget that let them converge, Lanczos enough
iterations to be exact on the small models, Steihaug a trust region that does not
bind.

Runtime: every Hypothesis example compiles JAX code, and the built-ins are already
property-tested in depth by ``test_operators.py``, ``test_solvers.py`` and the
estimator tests; here each component runs :data:`EXAMPLES` examples (fewer than the
profile's) plus its composed-step check.
"""

from __future__ import annotations

import numpy as np
import pytest

from somax_plug.testing.conformance import (
    check_curvature,
    check_damping,
    check_estimator,
    check_preconditioner,
    check_solver,
    density_property,
    eigenpair_property,
    make_conformance_tests,
)
from somax_plug.testing.plugin import somax_registry  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("somax_registry")  # built-ins only, process-wide

EXAMPLES = 2

CURVATURES = {
    "hessian": {"reference": "hessian"},
    "ggn": {"reference": "ggn"},
    "fisher": {"reference": "fisher", "stochastic": True, "num_draws": 96},
    "empirical_fisher": {"reference": "empirical_fisher"},
}

def _kfac_ema_property(dense, stats):
    """One estimate from the zero state: count 1, every running factor symmetric PSD,
    every diagonal block nonnegative (the factors themselves: tests/test_kfac.py)."""
    st = stats["kfac_ema"]
    if int(st["count"]) != 1:
        return f"count {int(st['count'])} after one estimate, expected 1"
    for path, leaf in st["leaves"].items():
        for k in ("L", "R", "M"):
            if k in leaf:
                m = np.asarray(leaf[k], np.float64)
                tol = 1e-8 * max(1.0, float(np.abs(m).max()))
                if not np.allclose(m, m.T, atol=tol) or np.linalg.eigvalsh(m).min() < -tol:
                    return f"{path}: running factor {k} is not symmetric PSD"
        if np.asarray(leaf["diag"]).min() < 0:
            return f"{path}: negative diagonal block"
    return None


ESTIMATORS = {
    "hutchinson_diag": {},
    "hutchinson_trace": {},
    "hutchpp_trace": {},
    "gnb_diag": {"losses": ("softmax_cross_entropy",)},
    "exact_diag": {"exact": True, "num_draws": 2},
    "lanczos": {
        "options": {"num_iters": 64},
        "exact": True,
        "num_draws": 2,
        "properties": {"eigenvectors": eigenpair_property, "spectral_density": density_property},
    },
    "kfac_ema": {"num_draws": 2, "properties": {"kfac_ema": _kfac_ema_property}},
}


def _identity_reference(a, b, lam, minv):
    return b if minv is None else minv * b


def _model_step_reference(a, b, lam, minv):
    # a fresh state (no previous step): alpha d, alpha = b.d / d.A d (a = C + lam I)
    d = b if minv is None else minv * b
    return (b @ d) / (d @ (a @ d)) * d


KRYLOV = {"tol": 1e-10, "maxiter": 200}
SOLVERS = {
    "cg": {"options": KRYLOV, "indefinite": "finite"},
    "minres": {"options": KRYLOV},
    "direct": {},
    "row_cholesky": {},
    "row_cg": {"options": {"tol": 1e-12, "maxiter": 200}},
    "diagonal": {},
    "identity": {"reference": _identity_reference, "reports_residual": False},
    "model_step": {"reference": _model_step_reference, "reports_residual": False},
    "neumann": {
        "options": {"alpha": 0.4, "maxiter": 1000, "tol": 1e-10},
        "spectrum": (0.5, 1.5),
        "lams": (0.0, 0.5),
    },
    "steihaug": {"options": {"radius": 1e6, **KRYLOV}, "indefinite": "finite"},
    # the kit's systems (n <= 12, no row factors) would all take auto's dense branch,
    # which is `direct` again: dense_max = 1 checks its cg branch instead
    "auto": {"options": {"dense_max": 1, **KRYLOV}, "indefinite": "finite"},
}


def _jacobi_reference(dense, stats, lam, eps=1e-8):
    return np.diag(1.0 / np.maximum(np.abs(np.diag(dense)) + lam, eps))


PRECONDITIONERS = {
    "identity": {"reference": lambda dense, stats, lam: np.eye(dense.shape[0])},
    "jacobi": {"reference": _jacobi_reference},
    # one update from the zero state: the bias-corrected EMA is |diag|
    "diag_ema": {"reference": lambda d, s, lam: _jacobi_reference(d, s, lam, eps=1e-12)},
    "nystrom": {"options": {"rank": 2}},
}

DAMPING = {
    "constant": {},
    "levenberg_marquardt": {},
    "schedule": {
        "options": {
            "schedule": {
                "name": "exponential_decay",
                "init_value": 1.0,
                "transition_steps": 1,
                "decay_rate": 0.5,
            }
        }
    },
}


def _builtin(kind):
    """Every built-in of ``kind``, read from the registry (a new one is checked too)."""
    from somax_plug import load_registry

    return sorted(s.name for s in load_registry().list(kind, plugin="builtin"))


def test_the_tables_name_only_registered_builtins():
    tables = {
        "curvature": CURVATURES,
        "estimator": ESTIMATORS,
        "solver": SOLVERS,
        "preconditioner": PRECONDITIONERS,
        "damping": DAMPING,
    }
    for kind, table in tables.items():
        assert set(table) <= set(_builtin(kind)), f"stale {kind} entries"


@pytest.mark.parametrize("name", _builtin("curvature"))
def test_curvature_conforms(name):
    check_curvature(name, max_examples=EXAMPLES, **CURVATURES.get(name, {}))


@pytest.mark.parametrize("name", _builtin("estimator"))
def test_estimator_conforms(name):
    check_estimator(name, max_examples=EXAMPLES, **ESTIMATORS.get(name, {}))


@pytest.mark.parametrize("name", _builtin("solver"))
def test_solver_conforms(name):
    check_solver(name, max_examples=EXAMPLES, **SOLVERS.get(name, {}))


@pytest.mark.parametrize("name", _builtin("preconditioner"))
def test_preconditioner_conforms(name):
    check_preconditioner(name, max_examples=EXAMPLES, **PRECONDITIONERS.get(name, {}))


@pytest.mark.parametrize("name", _builtin("damping"))
def test_damping_conforms(name):
    check_damping(name, max_examples=EXAMPLES, **DAMPING.get(name, {}))


# the ready-made test class, as a plugin author would use it
TestJacobiConformance = make_conformance_tests(
    "preconditioner", "jacobi", max_examples=1, **PRECONDITIONERS["jacobi"]
)
