"""Every preset, with its default options, on six small problems nobody tuned it on.

Full batch and minibatches of 256 with a fresh batch every step (the problems and
rules are in :mod:`somax_plug.testing.robustness`): every loss finite, no
step-to-step increase of more than 10x, and the final whole-data loss below the
initial one. The presets are read from the registry, so a new one is checked too.
"""

from __future__ import annotations

import pytest

from somax_plug import load_registry
from somax_plug.testing.robustness import PROBLEMS, run, verdict

STEPS = 20


def _presets() -> list[str]:
    return sorted(p.name for p in load_registry().presets() if p.plugin == "builtin")


def _cases() -> list[tuple[str, str]]:
    out = []
    for preset in _presets():
        composition = dict(load_registry().preset(preset).composition)
        for name, problem in PROBLEMS.items():
            needs = composition.get("loss")
            if needs is not None and needs != problem.loss:
                continue  # a preset made for one loss (sophia_g) runs on its problems only
            out.append((preset, name))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "problem"), _cases())
def test_preset_converges_with_its_defaults(somax_registry, preset, problem):
    broken = {}
    for batch_size in (None, 256):
        history = run(PROBLEMS[problem], {"preset": preset}, steps=STEPS, batch_size=batch_size)
        rules = verdict(history)
        if rules:
            broken["full batch" if batch_size is None else f"batch {batch_size}"] = rules
    assert not broken, f"{preset} on {problem}: {broken}"


def test_the_suite_catches_a_diverging_composition(somax_registry):
    # constant damping, CG: the old sgn default (lambda 1e-2), which diverged here when
    # the sequence loss summed over its T = 5 tokens; with the per-token mean (loss,
    # gradient and GGN all T times smaller) the same steps are lambda 1e-2 / T
    history = run(
        PROBLEMS["sequence"],
        {"curvature": "ggn", "solver": {"name": "cg", "maxiter": 10},
         "damping": {"name": "constant", "lam": 1e-2 / 5}},
        steps=STEPS,
    )
    assert verdict(history), history
