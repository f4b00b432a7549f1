"""The mistakes a weights file can hold, as ``hdml_jax.errors.UserError``s.

Each also derives from the built-in class a caller expects (``FileNotFoundError``, ``ValueError``,
``FileExistsError``), so ``except ValueError`` keeps working; the commands print them as one
``error: ...`` line (exit status 2).
"""

from __future__ import annotations

from hdml_jax.errors import UserError


class WeightsFileNotFoundError(UserError, FileNotFoundError):
    """No weights file, or no converted checkpoint directory, at the given path."""


class BadWeightsFileError(UserError, ValueError):
    """The weights file (or checkpoint directory) cannot be read: wrong format, damaged, not a state dict."""


class WeightsMismatchError(UserError, ValueError):
    """The weights do not fit the requested backbone: another architecture, depth or width, or keys missing."""


class OutputExistsError(UserError, FileExistsError):
    """The output directory of a conversion exists already."""
