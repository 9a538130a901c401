"""Per-step time against python-somax's sgn_ce (same configuration) and optax.adam.

A thin script over :mod:`somax_plug._src.benchmarks.peers` (where the protocol is
documented); `somax-plug bench` runs it together with the other parts.

Usage: ``python benchmarks/bench_somax.py [--quick]`` (prints JSON).
"""

from __future__ import annotations

import json
import sys

from somax_plug._src.benchmarks.peers import run

if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
