"""The data sets' user errors, shared by the loaders (``datasets``), the builders (``inshop``) and
``prepare``; ``hdml_jax.data.datasets`` re-exports them."""

from hdml_jax.errors import UserError


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The prepared TFDS data of a data set is not in ``data_dir``; the message says how to make it."""


class ManualFilesError(UserError, FileNotFoundError):
    """A file that preparing needs is missing: from ``manual_dir``, or from inside its archives."""


class BadManualFilesError(UserError, ValueError):
    """A file in ``manual_dir`` is there but unusable: not the expected archive, format or content."""
