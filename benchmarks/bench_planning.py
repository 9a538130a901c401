"""Planned vs unplanned per-step time (sgn, gauss_newton_lm).

A thin script over :mod:`somax_plug._src.benchmarks.planning` (where the protocol is
documented); `somax-plug bench` runs it together with the other parts.

Usage: ``python benchmarks/bench_planning.py [--quick]`` (prints JSON).
"""

from __future__ import annotations

import json
import sys

from somax_plug._src.benchmarks.planning import run

if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
