"""The workdir's bookkeeping: one run at a time, atomic files, a full disk told plainly.

* ``WorkdirLock``: an exclusive ``flock`` on ``<workdir>/.lock``, held for the whole run. A
  second run on the same workdir stops with a message naming the process that holds it (the
  kernel releases the lock when that process dies, even by SIGKILL, so a stale lock is
  impossible). Network file systems without ``flock`` support fall back to no lock, said once.
* ``atomic_write``: write to a temporary file in the same folder, then ``os.replace``: a reader
  (or a crash) sees the old file or the new one, never half of one.
* ``truncate_log``: on resume, drop the ``metrics.jsonl`` records past the restored step, the
  evaluations the restored checkpoint does not know, and a torn last line after a hard kill, so
  logs and curves never double back.
* ``storage_errors``: a full disk (``ENOSPC``, ``EDQUOT``) anywhere inside, however deeply the
  libraries wrap it, becomes one ``StorageFullError``.

A remote workdir (``gs://bucket/run``, see ``hdml_jax.storage``) has none of the file system
features the first three rely on. There: no lock (``WorkdirLock`` prints one note instead);
``atomic_write`` writes a local temporary file and uploads it in one piece (an upload is atomic
for readers); ``truncate_log`` rewrites the whole object; ``remove_stub`` walks the prefix.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from hdml_jax import storage
from hdml_jax.errors import UserError

LOCK_NAME = ".lock"
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXTS = ("no space left on device", "disk quota exceeded")


class WorkdirBusyError(UserError):
    """Another process holds the workdir's lock."""


class StorageFullError(UserError, OSError):
    """The disk filled up while writing; what was complete before is intact."""

    exit_code = 1


# ----------------------------------------------------------------------------- lock


class WorkdirLock:
    """``with WorkdirLock(workdir):`` — exclusive use of ``workdir`` by this process.

    A remote workdir (object storage) cannot be locked: entering prints one note and locks nothing.
    """

    def __init__(self, workdir: storage.AnyPath | str):
        self.remote = storage.is_remote(workdir)
        self.path = storage.as_path(workdir) / LOCK_NAME
        self._file: IO[str] | None = None

    def __enter__(self) -> WorkdirLock:
        if self.remote:
            print(
                f"note: {self.path.parent} is in object storage, which has no locks: nothing stops a "
                "second run on it, so do not start one while this one runs.",
                file=sys.stderr,
            )
            return self
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise WorkdirBusyError(
                f"{self.path.parent} is in use by {holder}. Two runs on one workdir would overwrite "
                "each other's checkpoints: wait for it to finish, stop it (kill -TERM <pid>: it saves "
                "and exits), or choose another --workdir."
            ) from None
        except OSError as error:  # e.g. a file system without flock
            print(
                f"note: cannot lock {self.path} ({error}); do not start a second run here.", file=sys.stderr
            )
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} (started {started})\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock; the file stays (see module docstring)
            self._file = None


# ----------------------------------------------------------------------------- files


def atomic_write(path: storage.AnyPath | str, write: Callable[[Path], Any]) -> None:
    """``write(tmp_path)`` then rename onto ``path``; on any error the temporary file is removed.

    The temporary name keeps ``path``'s suffix (``np.save`` and matplotlib pick the format by it).
    A remote ``path``: ``write`` gets a local temporary file, uploaded to ``path`` in one piece.
    """
    path = storage.as_path(path)
    if storage.is_remote(path):
        with storage_errors(f"writing {path.name}", path.parent):
            storage.write_via_local(path, write)
        return
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with storage_errors(f"writing {path.name}", path.parent):
            write(tmp)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: storage.AnyPath | str, text: str) -> None:
    """``atomic_write`` of ``text``."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_log(path: storage.AnyPath | str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn line (a hard kill mid-write) is skipped."""
    path = storage.as_path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def truncate_log(path: storage.AnyPath | str, step: int, evaluated_steps: set[int]) -> int:
    """Keep the records up to ``step``, and of the evaluation records only those at
    ``evaluated_steps`` (the others were written after the restored checkpoint by an attempt that
    died; the resumed run writes them again). Returns how many lines were dropped; the file is
    replaced atomically (a remote one: rewritten whole)."""
    path = storage.as_path(path)
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept = [
        json.dumps(r)
        for r in read_log(path)
        if r["step"] <= step and (r.get("kind") != "eval" or r["step"] in evaluated_steps)
    ]
    if len(kept) == len(lines):
        return 0
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


# ----------------------------------------------------------------------------- full disk


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or anything in its cause/context chain is a full disk or quota."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _FULL_TEXTS):
            return True
        stack += [current.__cause__, current.__context__]
        stack += [e for e in getattr(current, "exceptions", ()) if isinstance(e, BaseException)]
    return False


@contextlib.contextmanager
def storage_errors(what: str, where: storage.AnyPath | str, intact: str = "") -> Iterator[None]:
    """Turn a full disk while ``what`` into ``StorageFullError`` (other errors pass unchanged)."""
    try:
        yield
    except StorageFullError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        free = ""
        if not storage.is_remote(where):  # remote: the local temporary folder filled up
            free = shutil.disk_usage(where if Path(where).exists() else Path(where).parent).free
            free = f" ({free / 2**20:.0f} MiB free)"
        full = StorageFullError(
            f"no space left on the device while {what} in {where}{free}. "
            f"{intact}Free some space and rerun the same command to resume."
        )
        full.errno = errno.ENOSPC
        raise full from error


_KEEP = {"metrics.jsonl", "final_metrics.json"}


def remove_stub(workdir: storage.AnyPath | str, created: storage.AnyPath | None) -> None:
    """Remove ``created`` (the first folder this run made on the way to ``workdir``) if the run
    wrote nothing worth keeping into it: no checkpoint, no metrics, no results."""
    if created is None or not created.exists():
        return
    if storage.is_remote(workdir):
        workdir = storage.as_path(workdir)
        for path in storage.files_under(workdir):
            parts = storage.relative_parts(path, workdir)
            if path.name in _KEEP or any(
                a == "checkpoints" and b.isdigit() for a, b in itertools.pairwise(parts)
            ):
                return
        with contextlib.suppress(FileNotFoundError):
            created.rmtree()
        return
    for path in Path(workdir).rglob("*"):
        if path.name in _KEEP or (path.parent.name == "checkpoints" and path.name.isdigit()):
            return
    shutil.rmtree(created, ignore_errors=True)


def first_missing_ancestor(path: storage.AnyPath | str) -> storage.AnyPath | None:
    """The outermost folder of ``path`` that does not exist yet (``path`` itself, or a parent).

    A remote ``path`` is itself or nothing: a bucket's "folders" are only prefixes of its objects.
    """
    if storage.is_remote(path):
        path = storage.as_path(path)
        return None if path.exists() else path
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path
