"""Griffe extension for the docs build: doctest examples and Sphinx roles.

The package's docstrings use the Google style with a singular ``Example:`` heading,
which Griffe reads as an admonition (Markdown, where ``>>>`` lines would become
block quotes). This extension renames the heading to ``Examples:`` so that Griffe
parses the doctest lines into code blocks, and renders Sphinx roles
(``:class:`~somax_plug._src.plan.Plan```) as inline code (``Plan``). It changes nothing in
the package.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([\w.]+)(\(\))?`")


def _role(match: re.Match[str]) -> str:
    tilde, target, call = match.groups()
    name = target.rsplit(".", 1)[-1] if tilde else target
    return f"`{name}{call or ''}`"


class ExampleSections(Extension):
    """Rewrite ``Example:`` headings and Sphinx roles in every docstring before parsing."""

    def _fix(self, obj: Any) -> None:
        doc = getattr(obj, "docstring", None)
        if doc is None:
            return
        value = _ROLE.sub(_role, _EXAMPLE.sub(r"\1Examples:", doc.value))
        if value != doc.value:
            doc.value = value
            doc.__dict__.pop("parsed", None)

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        self._fix(obj)

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        self._fix(obj)
