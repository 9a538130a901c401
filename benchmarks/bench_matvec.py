"""One GGN-vector product and one HVP relative to one gradient (MLP of ~200k parameters).

A thin script over :mod:`somax_plug._src.benchmarks.matvec` (where the protocol is
documented); `somax-plug bench` runs it together with the other parts.

Usage: ``python benchmarks/bench_matvec.py [--quick]`` (prints JSON).
"""

from __future__ import annotations

import json
import sys

from somax_plug._src.benchmarks.matvec import run

if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
