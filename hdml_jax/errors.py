"""The user's mistakes, told in one line.

Every error a user can fix (a bad config field, a missing data set or weights file, no checkpoint
to evaluate, a workdir in use, a full disk) derives from ``UserError``. ``python -m
hdml_jax.main`` and the other command-line tools print ``error: <message>`` without a traceback
and exit with ``exit_code`` (2, as for a usage error); ``HDML_JAX_DEBUG=1`` shows the traceback
too. Library callers catch them like any exception: each also derives from the built-in class a
caller would expect (``ValueError``, ``FileNotFoundError``, ...).
"""

from __future__ import annotations

import os
import sys
import traceback


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config field has a value the chosen method or data set cannot use."""


def debug_enabled() -> bool:
    """``HDML_JAX_DEBUG=1``: show tracebacks of user errors too."""
    return os.environ.get("HDML_JAX_DEBUG", "") not in ("", "0")


def exit_with_message(error: BaseException, prefix: str = "error") -> None:
    """Print ``prefix: message`` (the traceback only under ``HDML_JAX_DEBUG=1``) and exit.

    The exit code is the error's ``exit_code`` (2 for ``UserError``), else 1.
    """
    if debug_enabled():
        traceback.print_exception(error, file=sys.stderr)
    message = str(error) or type(error).__name__
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    sys.exit(getattr(error, "exit_code", 1))


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when it has none), to quote in ours."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
