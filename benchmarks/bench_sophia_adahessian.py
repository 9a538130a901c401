"""Per-step time of ``sophia_h`` vs ``optax.contrib.sophia`` and ``adahessian`` vs Adam.

A thin script over :mod:`somax_plug._src.benchmarks.paper_presets` (where the
contenders and the protocol are documented).

Usage: ``python benchmarks/bench_sophia_adahessian.py [--repeats 15] [--block 10]
[--scan] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import sys

from somax_plug._src.benchmarks.paper_presets import TARGETS, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = run(args.repeats, args.block, args.scan)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['model']}; {out['mode']}; median of {args.repeats} blocks of {args.block}")
    print(f"{'contender':<16}{'ms/step':>10}{'cpu ms/step':>13}")
    for name, ms in out["per_step_ms"].items():
        print(f"{name:<16}{ms:>10.3f}{out['per_step_cpu_ms'][name]:>13.3f}")
    for name, ratio in out["ratios"].items():
        target = TARGETS.get(name)
        goal = f"  (target <= {target})" if target else ""
        print(f"{name:<26}{ratio:>7.3f}x wall, {out['cpu_ratios'][name]:.3f}x cpu{goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
