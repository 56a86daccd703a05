"""Typed errors of the public API. Each message is one line a user can act on."""


class DPTLabError(Exception):
    """Base class of every error DPT Lab raises on purpose."""


class CheckpointError(DPTLabError, ValueError):
    """A file or folder that is not a checkpoint DPT Lab can load, and why."""
