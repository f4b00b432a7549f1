"""The mistakes ``embed``, ``search`` and ``export`` meet, as ``hdml_jax.errors.UserError``s.

Each also derives from the built-in class a caller expects (``FileNotFoundError``, ``ValueError``,
``OSError``); the commands print them as one ``error: ...`` line (exit status 2).
"""

from __future__ import annotations

from hdml_jax.errors import UserError


class WorkdirNotFoundError(UserError, FileNotFoundError):
    """``--workdir`` does not exist."""


class ConfigNotFoundError(UserError, FileNotFoundError):
    """The workdir has no (readable) ``config.json``."""


class NoCheckpointError(UserError, FileNotFoundError):
    """The workdir has no checkpoint."""


class StepNotFoundError(UserError, ValueError):
    """``--step N`` names no checkpoint on disk."""


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint cannot be restored, fails its checksum, or does not fit ``config.json``."""


class UnreadableImageError(UserError, OSError):
    """An image file is missing, truncated or in a format PIL cannot decode."""


class UsageError(UserError, ValueError):
    """A bad command line (argparse's complaint, in one ``error:`` line)."""
