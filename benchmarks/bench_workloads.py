"""Time and steps to target on the real workloads (CNN on digits, stdlib char-LM).

A thin script over :mod:`somax_plug._src.benchmarks.workloads` (where the ratios are
documented; the protocol is in :mod:`somax_plug._src.workloads.runner`);
``somax-plug bench --workloads cnn,lm`` runs the same from the command line.

Usage: ``python benchmarks/bench_workloads.py [--quick] [--workloads cnn,lm]`` (prints
JSON; writes ``bench_out/<workload>_results.json`` and ``<workload>_training.png``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from somax_plug._src.benchmarks.workloads import NAMES, run

if __name__ == "__main__":
    args = sys.argv[1:]
    names = NAMES
    if "--workloads" in args:
        names = tuple(args[args.index("--workloads") + 1].split(","))
    result = run(quick="--quick" in args, workloads=names, out=Path("bench_out"),
                 log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2, default=str))
