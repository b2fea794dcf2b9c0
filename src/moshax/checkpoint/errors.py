"""Checkpoint errors a user can cause (no heavy imports: the CLI catches them before Orbax loads)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message says why in one line."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint whose arrays do not fit this run's model (another config): never set
    aside, never overwritten; the user starts a new workdir or fixes the config."""
