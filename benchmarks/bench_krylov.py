"""Krylov loop forms, the automatic solver choice, and a conv net's CG step.

A thin script over :mod:`somax_plug._src.benchmarks.krylov` (where the models and
the protocol are documented).

Usage: ``python benchmarks/bench_krylov.py [--quick]`` (prints JSON).
"""

from __future__ import annotations

import json
import sys

from somax_plug._src.benchmarks.krylov import run

if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
