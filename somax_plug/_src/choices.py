"""Decisions a component makes while a step is traced, for ``Method.explain``.

A component that decides something from static shapes when the step is traced (solver
``auto``: which solve; ``shampoo``: which parameters get a diagonal; ``kfac``: which
layers are factored) records each decision once in a :class:`Choices` held outside its
options, and returns them from ``recorded_choices()``.

Example:
    >>> import attrs
    >>> from somax_plug import Choices, choices_field
    >>> @attrs.frozen
    ... class Thing:
    ...     _choices: Choices = choices_field()
    >>> t = Thing()
    >>> t._choices.add("w: diagonal"); t._choices.add("w: diagonal")
    >>> list(t._choices)
    ['w: diagonal']
    >>> Thing() == t  # not part of equality (nor of hashing or the plan's fingerprint)
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs


class Choices:
    """Distinct decisions in the order first recorded (a re-trace records nothing new)."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[str, None] = {}

    def add(self, text: str) -> None:
        """Record ``text`` once."""
        self.entries.setdefault(text, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)


def choices_field() -> Any:
    """An ``attrs`` field holding a fresh :class:`Choices`: no init argument, and no part
    in equality, hashing or ``repr`` (so a frozen component stays hashable)."""
    return attrs.field(factory=Choices, init=False, eq=False, hash=False, repr=False)
