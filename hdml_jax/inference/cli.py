"""What the ``embed``, ``search`` and ``export`` commands share: the ``main`` wrapper, argparse
with one-line errors, and reading an image file the way the custom data sets do."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

from hdml_jax.errors import UserError, exit_with_message
from hdml_jax.inference.errors import UnreadableImageError, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


def run_command(
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
    interrupted: str,
) -> int:
    """The ``main`` of ``embed``, ``search`` and ``export``: parse ``argv``, ``run``; a user mistake
    ends in one ``error:`` line (exit 2, via ``SystemExit``), Ctrl-C in ``interrupted`` (exit 130)."""
    try:
        return run(build_parser().parse_args(argv))
    except UserError as error:
        exit_with_message(error)
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
    return 1  # pragma: no cover (exit_with_message exits)


class CliParser(argparse.ArgumentParser):
    """argparse whose errors end in one ``error: ... (see --help)`` line and exit 2."""

    def error(self, message: str) -> NoReturn:
        exit_with_message(UsageError(f"{message} (see python -m {self.prog} --help)"))
        raise AssertionError("unreachable")  # exit_with_message exits


def _load_rgb(path: str | Path) -> np.ndarray:
    """The custom data sets' decoding (``data.custom.decode_rgb``: 16-bit, palette, RGBA → RGB)."""
    from hdml_jax.data.custom import decode_rgb

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UnreadableImageError(f"{path}: no such image file.") from None
    except OSError as error:
        raise UnreadableImageError(f"{path}: cannot read it ({error.strerror or error}).") from None
    try:
        return decode_rgb(data)
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnreadableImageError(
            f"{path}: not a readable image ({reason}). Remove it or replace it with a valid image file."
        ) from None


def load_image(path: str | Path) -> np.ndarray:
    """An image file as ``uint8 (H, W, 3)`` RGB (grayscale, palette and RGBA converted; alpha dropped).

    Raises:
      UnreadableImageError: the file is missing or cannot be decoded (the message names it).
    """
    return _load_rgb(path)
