"""The documentation covers the contract: one plugin-guide section per hook, and a
navigation whose pages and API references exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from somax_plug._src import hookspecs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def hookspec_names() -> list[str]:
    """Every hook declared in :mod:`somax_plug._src.hookspecs` (pluggy marks them)."""
    marker = f"{hookspecs.PROJECT}_spec"
    return sorted(
        name for name, obj in vars(hookspecs).items() if callable(obj) and hasattr(obj, marker)
    )


def test_hookspecs_are_found():
    assert "somax_plug_register" in hookspec_names()
    assert len(hookspec_names()) >= 4


@pytest.mark.parametrize("hook", hookspec_names())
def test_every_hookspec_has_a_section_in_the_plugin_guide(hook):
    text = (DOCS / "plugins" / "index.md").read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if re.match(r"^#{2,4} ", line)]
    assert any(hook in h for h in headings), (
        f"docs/plugins/index.md has no section heading naming the hook {hook!r}; "
        "add one (## `" + hook + "(...)`) describing its contract"
    )


def _nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text[text.index("\nnav:"):]
    return re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE)


def test_navigation_pages_exist():
    pages = _nav_pages()
    assert "index.md" in pages and "plugins/index.md" in pages
    missing = [p for p in pages if not (DOCS / p).exists()]
    assert not missing, f"pages in mkdocs.yml's nav without a file: {missing}"


def test_api_reference_targets_import():
    targets = []
    for page in (DOCS / "reference").glob("*.md"):
        targets += re.findall(r"^::: ([\w.]+)\s*$", page.read_text(encoding="utf-8"),
                              flags=re.MULTILINE)
    assert "somax_plug._src.hookspecs" in targets
    for target in targets:
        importlib.import_module(target)
