"""Wall-clock to 97% test accuracy on digits: best preset vs Adam and python-somax.

A thin script over :mod:`somax_plug._src.benchmarks.time_to_accuracy` (where the protocol is
documented); `somax-plug bench` runs it together with the other parts.

Usage: ``python benchmarks/bench_time_to_accuracy.py [--quick]`` (prints JSON).
"""

from __future__ import annotations

import json
import sys

from somax_plug._src.benchmarks.time_to_accuracy import run

if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
