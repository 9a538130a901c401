"""MkDocs hook: the docs tables of components, generated from their declarations.

A page writes ``<!-- components: solver -->`` (any kind, or ``all``) where a table
belongs; at build time the marker becomes a table read from the registry, so the
tables show exactly what each class declares with ``@declare`` (summary, provides,
requirements, cadence, options) and never drift. Only the built-in plugin's
components are listed (``<!-- components: solver plugin=* -->`` lists every
installed plugin's).
"""

from __future__ import annotations

import re
from typing import Any

_MARKER = re.compile(r"<!--\s*components:\s*(\w+)(?:\s+plugin=(\S+))?\s*-->")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _requires(req: dict[str, list[str]]) -> str:
    parts = [f"{k}: {', '.join(v)}" for k, v in req.items() if v]
    return "; ".join(parts) or "-"


def component_table(kind: str, plugin: str | None = "builtin") -> str:
    """A Markdown table of the registered components of ``kind`` (``all``: every kind)."""
    from somax_plug import load_registry

    registry = load_registry()
    specs = registry.list(None if kind == "all" else kind, plugin=None if plugin == "*" else plugin)
    rows = [
        "| kind | name | what it is | provides | requires | options |",
        "|---|---|---|---|---|---|",
    ]
    for spec in specs:
        row = spec.to_dict()
        options = "<br>".join(
            f"`{o['name']}`: {o['allowed']}"
            + (" (required)" if o["required"] else f" (default `{o['default']!r}`)")
            for o in row["options"]
        )
        extra = []
        if row["cadence"]:
            extra.append("honours `every_k`")
        if row["preconditioned"]:
            extra.append("applies the preconditioner")
        summary = row["summary"] + (f" ({'; '.join(extra)})" if extra else "")
        rows.append(
            "| "
            + " | ".join(
                _cell(c)
                for c in (
                    row["kind"],
                    f"`{row['name']}`",
                    summary,
                    ", ".join(row["provides"]) or "-",
                    _requires(row["requires"])
                    + (" (for the default options; depends on the options)"
                       if spec.requires_for is not None else ""),
                    options or "-",
                )
            )
            + " |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return _MARKER.sub(lambda m: component_table(m.group(1), m.group(2) or "builtin"), markdown)
