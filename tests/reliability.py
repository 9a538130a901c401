"""The reliability corpus: bad inputs run as cases, their outcomes counted.

Each ``test_reliability_*.py`` module lists :class:`Case` objects and runs them with
:func:`check_corpus`. A case is a callable that exercises one bad (or good) input and
what it must get:

* ``expect="error"``: it must raise a :class:`somax_plug.SomaxPlugError` subclass (or
  the one given as ``error``) whose message contains every string of ``says``;
* ``expect="warning"``: it must finish and emit a warning containing ``says``;
* ``expect="ok"``: it must finish without raising (``check`` may assert more).

Outcomes are counted as ``named`` (the expected clear error or warning), ``ok``,
``raw`` (any other exception: a raw traceback from deep inside), ``silent`` (an error
case that raised nothing) and ``lost`` (``check`` found a file lost or overwritten:
raise :class:`Lost` from it). ``check_corpus`` fails listing every case that was
``raw``, ``silent`` or ``lost``, and prints the table of counts.

Example:
    >>> from somax_plug import OptionError
    >>> def bad(): raise OptionError("option 'tol' of solver cg: got -1, expected >= 0")
    >>> counts = check_corpus("demo", [Case("negative tol", bad, says=("tol", ">= 0"))])
    <BLANKLINE>
    demo: named 1, ok 0, raw 0, silent 0, lost 0
    >>> counts["named"]
    1
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from somax_plug import SomaxPlugError

OUTCOMES = ("named", "ok", "raw", "silent", "lost")


class Lost(AssertionError):
    """Raised by a case's ``check`` when a file was lost or overwritten."""


@dataclass(frozen=True)
class Case:
    """One probe: ``run()`` and what it must get (see the module docstring)."""

    name: str
    run: Callable[[], Any]
    expect: str = "error"
    says: tuple[str, ...] = ()
    error: type[BaseException] = SomaxPlugError
    check: Callable[[Any], None] | None = None
    tags: tuple[str, ...] = field(default=())


def run_case(case: Case) -> tuple[str, str]:
    """The outcome of one case and a one-line account of it."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = case.run()
        if case.check is not None:
            case.check(result)
    except Lost as e:
        return "lost", str(e)
    except case.error as e:
        if case.expect != "error":
            return "raw", f"unexpected {type(e).__name__}: {e}"
        missing = [s for s in case.says if s not in str(e)]
        if missing:
            return "raw", f"{type(e).__name__} without {missing}: {e}"
        return "named", f"{type(e).__name__}: {str(e)[:120]}"
    except BaseException as e:  # noqa: BLE001 (SystemExit included: the host must survive)
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return "raw", tb[:300]
    if case.expect == "error":
        return "silent", "raised nothing"
    if case.expect == "warning":
        text = [str(w.message) for w in caught]
        if not any(all(s in t for s in case.says) for t in text):
            return "silent", f"no warning with {list(case.says)} (got {text})"
        return "named", text[0][:120]
    return "ok", "ok"


def check_corpus(title: str, cases: Iterable[Case]) -> Counter:
    """Run every case; print the counts; fail on any raw, silent or lost outcome."""
    counts: Counter = Counter({k: 0 for k in OUTCOMES})
    bad = []
    for case in cases:
        outcome, account = run_case(case)
        counts[outcome] += 1
        if outcome in ("raw", "silent", "lost"):
            bad.append(f"  [{outcome}] {case.name}: {account}")
    print(f"\n{title}: " + ", ".join(f"{k} {counts[k]}" for k in OUTCOMES))
    assert not bad, f"{title}: {len(bad)} case(s) not handled:\n" + "\n".join(bad)
    return counts
