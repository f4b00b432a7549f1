"""Where a run's files live: a local folder, or object storage (``gs://``, ``s3://``, ...).

A path is *remote* when it starts with a URL scheme (``gs://bucket/run``); everything else is a
local path. The two are handled apart, because they promise different things:

* **Local** paths stay ``pathlib.Path`` and keep the trainer's local guarantees exactly
  (``hdml_jax.workdir``): an ``flock`` against a second run, files replaced atomically by
  ``os.replace``, ``metrics.jsonl`` appended line by line.
* **Remote** paths are ``etils.epath.Path`` (what orbax and TFDS use too). Object stores have
  no lock, no rename that is atomic, no append; what they have is an *upload*, which is atomic:
  a reader sees the old object or the new one, never half of one. So every small file is written
  whole to a local temporary file and uploaded in one piece (``write_via_local``), and what grows
  during a run (``metrics.jsonl``, TensorBoard's event files) is kept in a local staging folder
  and mirrored to the bucket (``hdml_jax.training.reporting``).

Never pass a remote path through ``pathlib.Path``: it collapses ``gs://b/x`` into the *local*
path ``gs:/b/x``. ``as_path`` keeps each kind in its own type; ``resolve`` and ``display`` are the
remote-safe ``Path(p).resolve()`` and ``str(...)``.

epath reaches ``gs://`` through TensorFlow when it is installed, else through fsspec, which needs
``gcsfs`` (``pip install -e '.[gcs]'``); ``check_remote`` says so in one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from etils import epath

from hdml_jax.errors import UserError

AnyPath = Path | epath.Path

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# What epath needs per scheme when TensorFlow is not installed (fsspec's file systems).
FSSPEC_PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_COPY_CHUNK = 16 * 2**20


class UnsupportedPathError(UserError, ValueError):
    """A URL whose scheme etils.epath cannot open, or a remote path whose file system is missing."""


def url_scheme(path: str | os.PathLike) -> str | None:
    """``"gs"`` for ``gs://bucket/x``; None for a local path."""
    match = _URL.match(os.fspath(path))
    return match.group(1).lower() if match else None


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names object storage (it starts with a URL scheme such as ``gs://``)."""
    return url_scheme(path) is not None


def as_path(path: str | os.PathLike) -> AnyPath:
    """``path`` as ``pathlib.Path`` (local) or ``epath.Path`` (remote), never mangled.

    A remote path that already is an ``epath.Path`` is returned as it is. Raises
    ``UnsupportedPathError`` for a scheme epath does not know (``memory://``, ``http://``).
    """
    text = os.fspath(path)
    if not is_remote(text):
        return Path(text)
    if isinstance(path, epath.Path):
        return path
    try:
        remote = epath.Path(text)
    except KeyError:  # a scheme epath has no path class for
        remote = None
    if remote is None or str(remote) != text.rstrip("/"):  # or one it took for a local path
        raise UnsupportedPathError(
            f"{text}: unsupported URL scheme; use a local path or {', '.join(f'{s}://' for s in FSSPEC_PACKAGES)}."
        )
    return remote


def resolve(path: str | os.PathLike) -> AnyPath:
    """``Path(path).resolve()`` for a local path; a remote one is absolute already."""
    path = as_path(path)
    return path if is_remote(path) else path.resolve()


def display(path: str | os.PathLike) -> str:
    """The absolute path or the URL, for messages."""
    return str(resolve(path))


def makedirs(path: AnyPath) -> None:
    """``mkdir -p`` for a local folder. Remote: nothing, since objects need no folders (and
    gcsfs would create a missing *bucket*, a mistyped name included)."""
    if not is_remote(path):
        path.mkdir(parents=True, exist_ok=True)


def size(path: AnyPath) -> int:
    """The size in bytes of the file ``path`` (``stat`` differs between pathlib and epath)."""
    info = path.stat()
    return int(info.st_size if hasattr(info, "st_size") else info.length)


def check_remote(path: AnyPath, what: str) -> None:
    """Touch ``path`` once, so that a missing file system package is one clear error up front.

    epath opens ``gs://`` through TensorFlow when installed, else through fsspec and ``gcsfs``;
    without either it fails deep inside the first file operation.
    """
    if not is_remote(path):
        return
    try:
        path.exists()
    except ImportError as error:
        package = FSSPEC_PACKAGES.get(url_scheme(path) or "", "the fsspec file system for it")
        raise UnsupportedPathError(
            f"{what} {path} needs {package} to reach {url_scheme(path)}:// ({error}): "
            f"pip install {package} (for gs://: pip install -e '.[gcs]')."
        ) from None


# ----------------------------------------------------------------------------- whole-file transfers


def upload(local: Path, remote: AnyPath) -> None:
    """Copy the local file ``local`` to ``remote`` in one object write (atomic for a reader)."""
    with open(local, "rb") as source, remote.open("wb") as target:
        shutil.copyfileobj(source, target, _COPY_CHUNK)


def download(remote: AnyPath, local: Path) -> bool:
    """Copy ``remote`` to the local file ``local``; False (and nothing written) if it does not exist.

    (Asked first: TensorFlow's file objects report a missing object only at the first read.)
    """
    if not remote.exists():
        return False
    with remote.open("rb") as source, open(local, "wb") as target:
        shutil.copyfileobj(source, target, _COPY_CHUNK)
    return True


def relative_parts(path: AnyPath, top: AnyPath) -> list[str]:
    """The names leading from ``top`` down to ``path`` (``path`` lies under ``top``)."""
    return str(path)[len(str(top)) :].strip("/").split("/")


def files_under(top: AnyPath) -> Iterator[AnyPath]:
    """Every file below the folder ``top``, at any depth.

    Built on ``iterdir`` alone: epath's ``walk`` over fsspec yields folders without their
    ``gs://`` (local-looking paths), and ``glob`` refuses ``**``.
    """
    for child in top.iterdir():
        if child.is_dir():
            yield from files_under(child)
        else:
            yield child


def move_tree(source: AnyPath, target: AnyPath) -> None:
    """Move the remote folder ``source`` to ``target``: copy every object, then delete the
    source. Object stores cannot rename; nothing is lost if this stops half-way."""
    for path in files_under(source):
        destination = target.joinpath(*relative_parts(path, source))
        with path.open("rb") as reader, destination.open("wb") as writer:
            shutil.copyfileobj(reader, writer, _COPY_CHUNK)
    source.rmtree()


@contextlib.contextmanager
def local_folder(prefix: str = "hdml_jax-") -> Iterator[Path]:
    """A temporary local folder, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_via_local(path: AnyPath, write: Callable[[Path], Any]) -> None:
    """``write(local_file)`` into a temporary folder, then upload the file to the remote ``path``.

    The local file has ``path``'s name (``np.save`` and matplotlib pick the format by its suffix).
    Readers of ``path`` see the old object until the upload completes.
    """
    with local_folder() as folder:
        local = folder / path.name
        write(local)
        upload(local, path)
