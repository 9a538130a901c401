"""Built-in presets: each one a composition, as plain data.

``somax-plug show NAME`` prints the composition and its plan. Any key can be
overridden at :func:`somax_plug.compose` time (``compose(preset="sgn",
solver={"name": "cg", "maxiter": 50}, ...)``).

=====================  =========================================================
preset                 composition
=====================  =========================================================
``sgn``                ggn + cg (Somax's SGN), rho reported every 10 steps
``newton_cg``          hessian + cg with the negative-curvature guard
``gauss_newton_lm``    ggn + auto + levenberg_marquardt (step rejection)
``sophia_h``           hutchinson_diag (1 probe) every 10 steps + diag_ema (gamma,
                       clip 1, lagged) + identity (momentum 0.96)
``sophia_g``           gnb_diag every 10 steps + diag_ema (gamma, clip 1, lagged)
                       + identity (momentum 0.96)
``adahessian``         hutchinson_diag (1 probe) + diag_ema (squared, spatially
                       averaged, power 1/2, clip 1) + identity (momentum 0.9) +
                       lam = eps
``natural_gradient``   fisher (Monte-Carlo) + cg
``shampoo``            shampoo (blocks 128, roots every 10 steps, Adam grafting)
                       + identity (momentum 0.9)
``soap``               soap (betas 0.95, basis every 10 steps) + identity
                       (momentum 0.95)
``kfac``               ggn (the exact quadratic model) + kfac preconditioner
                       (Monte-Carlo Fisher factors, EMA 0.95, pi-damped
                       inverses every 10) + model_step (re-scaling and momentum
                       by the model) + levenberg_marquardt every 5 steps
``ekfac``              ekfac (Monte-Carlo Fisher) + kronecker_inverse +
                       levenberg_marquardt
``ggn_cg_kfac``        ggn + cg preconditioned by kfac (Monte-Carlo Fisher
                       factors) + levenberg_marquardt
=====================  =========================================================

The first-order diagonal presets (maths, defaults and departures in
``docs/presets_first_order_diagonal.md``):

* ``sophia_h`` / ``sophia_g`` follow Liu et al. (2023), "Sophia", Algorithm 3, with
  the paper's beta1 = 0.96, beta2 = 0.99, eps = 1e-12, k = 10, clip 1, one Hutchinson
  probe (H) or one Gauss-Newton-Bartlett label draw (G), and gamma = 0.01 (H, also
  optax's default) / 0.05 (G). They depart from the paper where
  ``optax.contrib.sophia`` (after levanter, the authors' JAX code) does, and
  ``sophia_h`` computes optax's updates exactly (``tests/test_paper_presets.py``):
  the momentum is bias-corrected, and the step
  that refreshes the Hessian EMA still uses the previous one (``lag``; the paper uses
  the fresh one). Probes are Rademacher (the paper's Hutchinson uses Gaussian ones).
  No weight decay (chain ``optax.add_decayed_weights`` through ``tx=``); the learning
  rate 0.01 is this project's choice for small models.
* ``adahessian`` follows Yao et al. (2021), "ADAHESSIAN", Algorithm 1: one Rademacher
  probe per step, beta1 = 0.9, beta2 = 0.999, bias corrections, Hessian power k = 1,
  spatial averaging of conv kernels (flax's HWIO layout), eps = 1e-4 (the authors'
  code) as the damping ``lam``, learning rate 0.15 (the authors' code default). It
  departs from the paper in one place: the preconditioned direction is clipped to
  ``[-1, 1]`` per coordinate (a trust region of radius ``lr``, as Adam's step is
  bounded by ``lr``): where the Hessian diagonal is near zero (saturated units), the
  paper's ``m_hat / (sqrt(v_hat) + eps)`` is unbounded, and the unclipped preset
  diverged on the robustness suite's indefinite problem (loss 19 -> 4467 in one
  step); the clip changes nothing where ``|m_hat| <= sqrt(v_hat) + eps``.
"""

from __future__ import annotations


def _sophia(gamma: float) -> dict:
    """What Sophia-H and Sophia-G share: the clipped diagonal EMA and the momentum."""
    return {
        "preconditioner": {
            "name": "diag_ema",
            "beta": 0.99,
            "power": 1.0,
            "scale": gamma,
            "clip": 1.0,
            "abs": False,
            "eps": 1e-12,
            "bias_correction": False,
            "refresh_every": 10,
            "lag": True,
        },
        "solver": {"name": "identity", "momentum": 0.96, "bias_correction": True},
        "damping": {"name": "constant", "lam": 0.0},
        "learning_rate": 0.01,
    }


PRESETS: dict[str, tuple[str, dict]] = {
    "sgn": (
        "Stochastic Gauss-Newton: GGN + CG (Somax's sgn) with Levenberg-Marquardt damping",
        {
            "curvature": "ggn",
            "solver": {"name": "cg", "maxiter": 10, "tol": 1e-5},
            "damping": {"name": "levenberg_marquardt", "init": 1.0},
        },
    ),
    "newton_cg": (
        "Newton-CG: exact Hessian + guarded CG with Levenberg-Marquardt damping (HF-style)",
        {
            "curvature": "hessian",
            "solver": {"name": "cg", "maxiter": 10, "negative_curvature": "guard"},
            "damping": {"name": "levenberg_marquardt", "init": 1.0},
        },
    ),
    "gauss_newton_lm": (
        "Gauss-Newton with Levenberg-Marquardt damping and step rejection (solver chosen "
        "from the shapes: dense, row-space or CG)",
        {
            "curvature": "ggn",
            "solver": "auto",
            "damping": {"name": "levenberg_marquardt", "init": 1.0},
        },
    ),
    "sophia_h": (
        "Sophia-H (Liu et al. 2023): gradient EMA, one-probe Hutchinson diagonal EMA "
        "every 10 steps, clip(m / max(gamma h, eps), 1); optax.contrib.sophia's order",
        {
            "curvature": "hessian",
            "estimators": [{"name": "hutchinson_diag", "every_k": 10, "num_probes": 1}],
            **_sophia(gamma=0.01),
        },
    ),
    "sophia_g": (
        "Sophia-G (Liu et al. 2023): gradient EMA, Gauss-Newton-Bartlett diagonal EMA "
        "every 10 steps, clip(m / max(gamma h, eps), 1); optax.contrib.sophia's order",
        {
            "estimators": [{"name": "gnb_diag", "every_k": 10, "num_samples": 1}],
            **_sophia(gamma=0.05),
            "loss": "softmax_cross_entropy",
        },
    ),
    "adahessian": (
        "AdaHessian (Yao et al. 2021): gradient EMA and EMA of the squared one-probe "
        "Hutchinson diagonal (conv kernels spatially averaged), m_hat / (sqrt(v_hat) + eps)",
        {
            "curvature": "hessian",
            "estimators": [{"name": "hutchinson_diag", "num_probes": 1}],
            "preconditioner": {
                "name": "diag_ema",
                "beta": 0.999,
                "square": True,
                "power": 0.5,
                "abs": False,
                "bias_correction": True,
                "spatial_average": "hwio",
                "clip": 1.0,
            },
            "solver": {"name": "identity", "momentum": 0.9, "bias_correction": True},
            "damping": {"name": "constant", "lam": 1e-4},
            "learning_rate": 0.15,
        },
    ),
    "natural_gradient": (
        "Natural gradient: Monte-Carlo Fisher + CG with Levenberg-Marquardt damping",
        {
            "curvature": "fisher",
            "solver": {"name": "cg", "maxiter": 10},
            "damping": {"name": "levenberg_marquardt", "init": 1.0},
        },
    ),
    # Shampoo (Gupta et al. 2018; Shi et al. 2023's defaults) and SOAP (Vyas et al. 2024):
    # docs/howto/shampoo-soap.md; the learning rates are this project's, for small models.
    "shampoo": (
        "Shampoo (Gupta et al. 2018): blocked L^-1/4 G R^-1/4, roots every 10 steps, "
        "Adam grafting, momentum 0.9",
        {
            "preconditioner": {
                "name": "shampoo",
                "exponent": 0.25,
                "beta2": 0.999,
                "eps": 1e-12,
                "graft": "adam",
                "graft_beta2": 0.999,
                "graft_eps": 1e-8,
                "block_size": 128,
                "precondition_every": 10,
            },
            "solver": {"name": "identity", "momentum": 0.9, "bias_correction": True},
            "damping": {"name": "constant", "lam": 0.0},
            "learning_rate": 0.01,
        },
    ),
    "soap": (
        "SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's factors, betas "
        "(0.95, 0.95), basis every 10 steps (QR), sides > 256 unrotated",
        {
            "preconditioner": {
                "name": "soap",
                "beta2": 0.95,
                "shampoo_beta": 0.95,
                "eps": 1e-8,
                "block_size": 1024,
                "precondition_every": 10,
                "refresh": "qr",
                "max_precond_dim": 256,
            },
            "solver": {"name": "identity", "momentum": 0.95, "bias_correction": True},
            "damping": {"name": "constant", "lam": 0.0},
            "learning_rate": 0.003,
        },
    ),
    "kfac": (
        "KFAC (Martens & Grosse 2015): Monte-Carlo Fisher Kronecker factors every step "
        "(EMA 0.95), inverses every 10 refreshes, re-scaling and momentum by the quadratic "
        "model (the exact GGN), Levenberg-Marquardt damping every 5 steps",
        {
            # the quadratic model of model_step and of the damping: the exact GGN (the
            # Fisher for canonical links), as Martens & Grosse sec. 6-7 and kfac-jax
            "curvature": "ggn",
            "preconditioner": {"name": "kfac", "source": "fisher", "decay": 0.95,
                               "inverse_every": 10, "pi_damping": True},
            "solver": "model_step",
            # adapted every 5 steps: kfac-jax's damping_adaptation_interval
            "damping": {"name": "levenberg_marquardt", "init": 1.0, "every_k": 5},
        },
    ),
    "ekfac": (
        "EKFAC (George et al. 2018): KFAC's eigenbasis with the exact diagonal in it "
        "(Monte-Carlo Fisher), damped inverse applied directly, Levenberg-Marquardt damping",
        {
            "curvature": {"name": "ekfac", "source": "fisher"},
            "solver": "kronecker_inverse",
            "damping": {"name": "levenberg_marquardt", "init": 1.0},
        },
    ),
    "ggn_cg_kfac": (
        "GGN-CG preconditioned by KFAC (factor EMA 0.95, inverses every step), "
        "Levenberg-Marquardt damping",
        {
            "curvature": "ggn",
            "solver": {"name": "cg", "maxiter": 10, "tol": 1e-5},
            "preconditioner": {"name": "kfac", "source": "fisher", "decay": 0.95,
                               "inverse_every": 1, "pi_damping": True},
            "damping": {"name": "levenberg_marquardt", "init": 1.0},
        },
    ),
}
