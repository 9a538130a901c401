"""Benchmarks behind ``somax-plug bench`` (each module has ``run(quick) -> dict``).

=======================  ===================================================  ============
module                   measures                                             ratio
=======================  ===================================================  ============
``matvec``               one GGN-vp and one HVP over one gradient (~200k      ggnvp_over_grad,
                         parameters)                                          hvp_over_grad
``planning``             planned vs unplanned per-step time (sgn,             planned_over_
                         gauss_newton_lm)                                     unplanned
``peers``                the same SGN configuration as python-somax's         ours_over_somax_
                         ``sgn_ce``, and per-step time relative to Adam        same_config,
                                                                              ours_over_adam_
                                                                              per_step
``flops``                compiled FLOPs of the sgn step over                  flops_over_
                         flops(gradient) + k flops(GGN-vp)                    minimum
``time_to_accuracy``     wall-clock to 97% test accuracy on digits (best      time_to_97_over_
                         preset vs Adam and python-somax)                     adam, ..._somax
=======================  ===================================================  ============

The matrix-vector product ratios (``ggnvp_over_grad``, ``hvp_over_grad``) come from
``matvec``. Every timing alternates the contenders, takes medians over repeats after a
warm-up, excludes compilation and waits with ``jax.block_until_ready``.
"""
