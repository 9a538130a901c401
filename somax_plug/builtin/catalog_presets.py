"""Built-in presets: each one a composition, as plain data (see ``compose``).

Name -> (summary, composition). The planner issue completes this table.
"""

from __future__ import annotations

PRESETS: dict[str, tuple[str, dict]] = {}
