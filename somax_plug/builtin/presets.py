"""Built-in presets: each one a composition, as plain data.

``somax-plug show NAME`` prints the composition and its plan. Any key can be
overridden at :func:`somax_plug.compose` time (``compose(preset="sgn",
solver={"name": "cg", "maxiter": 50}, ...)``).

=====================  =========================================================
preset                 composition
=====================  =========================================================
``sgn``                ggn + cg (Somax's SGN), rho reported every 10 steps
``newton_cg``          hessian + cg with the negative-curvature guard
``gauss_newton_lm``    ggn + row_cholesky + levenberg_marquardt (step rejection)
``sophia_h``           hutchinson_diag every 10 steps + diag_ema (clipped) + identity
``sophia_g``           gnb_diag every 10 steps + diag_ema (clipped) + identity
``adahessian``         hutchinson_diag + diag_ema (power 1/2) + identity
``natural_gradient``   fisher (Monte-Carlo) + cg
=====================  =========================================================
"""

from __future__ import annotations

PRESETS: dict[str, tuple[str, dict]] = {
    "sgn": (
        "Stochastic Gauss-Newton: GGN + CG (Somax's sgn), rho reported every 10 steps",
        {
            "curvature": "ggn",
            "solver": {"name": "cg", "maxiter": 10, "tol": 1e-5},
            "damping": {"name": "constant", "lam": 1e-2},
            "rho_every_k": 10,
        },
    ),
    "newton_cg": (
        "Newton-CG: exact Hessian + CG with the negative-curvature guard",
        {
            "curvature": "hessian",
            "solver": {"name": "cg", "maxiter": 10, "negative_curvature": "guard"},
            "damping": {"name": "constant", "lam": 1e-1},
        },
    ),
    "gauss_newton_lm": (
        "Gauss-Newton with Levenberg-Marquardt damping and step rejection (row-space solve)",
        {
            "curvature": "ggn",
            "solver": "row_cholesky",
            "damping": {"name": "levenberg_marquardt", "init": 1.0},
        },
    ),
    "sophia_h": (
        "Sophia-H: Hutchinson diagonal every 10 steps, clipped diagonal EMA",
        {
            "curvature": "hessian",
            "estimators": [{"name": "hutchinson_diag", "every_k": 10}],
            "preconditioner": {
                "name": "diag_ema",
                "beta": 0.99,
                "power": 1.0,
                "clip": 1.0,
                "abs": True,
                "eps": 1e-4,
            },
            "solver": "identity",
            "damping": {"name": "constant", "lam": 0.0},
            "learning_rate": 0.05,
        },
    ),
    "sophia_g": (
        "Sophia-G: Gauss-Newton-Bartlett diagonal every 10 steps, clipped diagonal EMA",
        {
            "estimators": [{"name": "gnb_diag", "every_k": 10}],
            "preconditioner": {
                "name": "diag_ema",
                "beta": 0.99,
                "power": 1.0,
                "clip": 1.0,
                "eps": 1e-4,
            },
            "solver": "identity",
            "damping": {"name": "constant", "lam": 0.0},
            "learning_rate": 0.05,
            "loss": "softmax_cross_entropy",
        },
    ),
    "adahessian": (
        "AdaHessian: Hutchinson diagonal, square-root diagonal EMA",
        {
            "curvature": "hessian",
            "estimators": ["hutchinson_diag"],
            "preconditioner": {
                "name": "diag_ema",
                "beta": 0.999,
                "power": 0.5,
                "abs": True,
                "eps": 1e-8,
            },
            "solver": "identity",
            "damping": {"name": "constant", "lam": 0.0},
            "learning_rate": 0.05,
        },
    ),
    "natural_gradient": (
        "Natural gradient: Monte-Carlo Fisher + CG",
        {
            "curvature": "fisher",
            "solver": {"name": "cg", "maxiter": 10},
            "damping": {"name": "constant", "lam": 1e-1},
        },
    ),
}
