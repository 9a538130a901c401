"""Real workloads for the benchmarks and the demo: a CNN and a character-level LM.

=========  =====================================================  =====================
name       problem                                                target
=========  =====================================================  =====================
``cnn``    a small CNN on scikit-learn's digits as 8x8 images     97% test accuracy
           (:mod:`~somax_plug._src.workloads.cnn`)
``lm``     a 2-layer character-level transformer on the Python    validation loss 2.0
           standard library's sources                             nats per character
           (:mod:`~somax_plug._src.workloads.lm`)
=========  =====================================================  =====================

Both are plain JAX (no Flax) and have a ``tiny`` size for the tests. The contenders
are in :mod:`~somax_plug._src.workloads.contenders`, the protocol (interleaved seeds,
same minibatches, compilation excluded, time and steps to target) in
:mod:`~somax_plug._src.workloads.runner`; docs/workloads.md has the measured numbers.

Example:
    >>> from somax_plug._src.workloads import NAMES
    >>> NAMES
    ('cnn', 'lm')
"""

from __future__ import annotations

from typing import Any

NAMES = ("cnn", "lm")
"""The workloads, by name."""


def make(name: str, size: str = "full") -> Any:
    """The :class:`~somax_plug._src.workloads.base.Workload` called ``name``."""
    if name == "cnn":
        from somax_plug._src.workloads import cnn

        return cnn.make(size)
    if name == "lm":
        from somax_plug._src.workloads import lm

        return lm.make(size)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(NAMES)}")
