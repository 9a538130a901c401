"""Shared test set-up: Hypothesis profiles and float64 references.

Profiles: ``ci`` (few examples, no deadline; chosen when ``CI`` is set) and ``dev``
(more examples, for local runs). Pick one explicitly with
``pytest --hypothesis-profile=dev``. Both are deterministic: ``derandomize=True``
(examples seeded from each test's own source) and no example database (so a
failure saved by an earlier run on this machine is not replayed), so a plain
``python -m pytest`` on a fresh clone runs the same examples every time.

``jax_enable_x64`` is on so that tests can build dense float64 references; tests
that check float32 or bfloat16 behaviour set their dtypes explicitly.
"""

from __future__ import annotations

import os

# XLA's CPU runtime can wedge when a LAPACK kernel (a batched eigh's ParallelBatchMap)
# waits on its own intra-op pool (seen three times in long Shampoo/KFAC runs: every
# thread parked, the main thread in block_until_ready); single-threaded Eigen avoids
# the re-entrant wait. Set before the backend starts; subprocess tests inherit it.
_NO_REENTRY = "--xla_cpu_multi_thread_eigen=false"
if _NO_REENTRY not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_REENTRY}".strip()

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

pytest_plugins = ["somax_plug.testing.plugin"]  # somax_registry, register_plugin, ...

settings.register_profile(
    "ci",
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
