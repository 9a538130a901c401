"""Save and restore a method's parameters and state (public).

See the how-to page "Checkpoint and resume" for the guarantees: the plan and
registry fingerprints are stored, and a restore under a different plan or plugin
set raises :class:`~somax_plug.CheckpointError` naming both.
"""

from somax_plug._src.checkpoint import read_header, restore, save

__all__ = ["read_header", "restore", "save"]
