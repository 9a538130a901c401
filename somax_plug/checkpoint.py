"""Save and restore a method's parameters and state (public), on Orbax.

See the how-to page "Checkpoint and resume" for the guarantees: a checkpoint is an
Orbax directory written atomically; the plan and registry fingerprints are stored,
and a restore under a different plan or plugin set raises
:class:`~somax_plug.CheckpointError` naming both; every array is checked against the
method's state spec before the first step. :func:`describe` and :func:`adopt` give
the same checks to a state kept in your own ``orbax.checkpoint.CheckpointManager``.
Needs ``pip install 'somax-plug[checkpoint]'``.
"""

from somax_plug._src.checkpoint import adopt, describe, read_header, restore, save

__all__ = ["adopt", "describe", "read_header", "restore", "save"]
