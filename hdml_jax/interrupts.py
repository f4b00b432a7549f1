"""Ctrl-C and SIGTERM: stop at the next safe point, save, say how to resume.

``install()`` replaces Python's default SIGINT behaviour (a ``KeyboardInterrupt`` raised wherever
the main thread happens to be: inside grain's prefetch, an orbax write, a jit compile) with a
flag. The trainer polls it at safe points: after every step (it saves a checkpoint and stops),
between evaluation batches and between output files. A second SIGINT or SIGTERM exits at once
with ``os._exit``: nothing more is written, and orbax's checkpoints stay consistent because each
becomes visible only by an atomic rename when complete (a half-written one is ignored and
cleaned up by the next run).

Exit codes (``main``): 130 after SIGINT (the shell's convention for Ctrl-C, so ``train && next``
stops), 0 after SIGTERM (schedulers and ``launch/`` treat a preempted, checkpointed run as a
clean exit and requeue it).
"""

from __future__ import annotations

import os
import signal
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: int | None = None  # the first signal's number
_previous: dict[int, object] = {}


def _handle(signum: int, frame) -> None:
    del frame
    global _received
    name = signal.Signals(signum).name
    if _received is not None:  # the second one: leave now
        os.write(2, f"\n{name} again: exiting at once; the last complete checkpoint is intact.\n".encode())
        os._exit(128 + signum)
    _received = signum
    # os.write, not print: the handler may run while the main thread is inside a print.
    os.write(
        2,
        f"\n{name}: stopping at the next safe point and saving a checkpoint "
        f"(send it again to quit at once).\n".encode(),
    )


def install() -> bool:
    """Route SIGINT and SIGTERM to the flag. Returns False (and does nothing) off the main thread
    or when already installed, so the caller that installed them is the one to ``uninstall``."""
    if _previous or threading.current_thread() is not threading.main_thread():
        return False
    for signum in _SIGNALS:
        _previous[signum] = signal.signal(signum, _handle)
    return True


def uninstall() -> None:
    """Restore the handlers that ``install`` replaced and forget a received signal."""
    global _received
    for signum, handler in _previous.items():
        signal.signal(signum, handler)
    _previous.clear()
    _received = None


def received() -> int | None:
    """The number of the first SIGINT/SIGTERM received since ``install``, or None."""
    return _received


def exit_code(signum: int | None) -> int:
    """130 after SIGINT, 0 after SIGTERM or a requested stop (``stop_after_steps``)."""
    return 128 + signal.SIGINT if signum == signal.SIGINT else 0


class StopRequestedError(Exception):
    """Raised by ``stop_point`` when SIGINT/SIGTERM arrived (outside the step loop, one process)."""


def stop_point() -> None:
    """A safe place to stop outside the step loop: raise ``StopRequestedError`` if a signal came.

    With several processes a stop must be agreed by all (the save is collective), which only the
    step loop does; elsewhere the flag waits for it.
    """
    import jax

    if _received is not None and jax.process_count() == 1:
        raise StopRequestedError
