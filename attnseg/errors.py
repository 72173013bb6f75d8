"""Exception types with messages meant for users.

Every error a user can cause (a bad config, an unreadable file, a checkpoint of another model, an input
below a model's minimum size) is one of these; the command-line tools print the message alone, without a
traceback, and exit non-zero. Internal invariants stay ``assert``.
"""

from __future__ import annotations

__all__ = ["AttnsegError", "ConfigError", "DataError", "CheckpointError", "InputSizeError"]


class AttnsegError(Exception):
    """Base class of every user-facing error raised by attnseg."""


class ConfigError(AttnsegError, ValueError):
    """A config file or override is missing, malformed or invalid; the message lists every problem."""


class DataError(AttnsegError, ValueError):
    """A dataset or input file cannot be used; the message names the file (or case) and the problem."""


class CheckpointError(AttnsegError, RuntimeError):
    """A checkpoint is missing, unreadable, unsafe, or belongs to another model."""


class InputSizeError(AttnsegError, ValueError):
    """An input is smaller than the model's minimum, or has the wrong number of channels."""
