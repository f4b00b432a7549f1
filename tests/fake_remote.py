"""A fake ``gs://`` for tests: an object store kept in a local folder, behind ``etils.epath``.

``install(monkeypatch, root)`` makes every ``epath.Path("gs://bucket/key")`` — ours, TFDS's —
reach ``root/bucket/key`` through ``ObjectStore``, which behaves like a bucket rather than a
disk, so that code relying on file-system features fails here as it would on GCS:

* an object is written whole: a writer uploads on ``close`` (readers see the old or the new
  object, never half of one), and ``uploads`` counts the uploads per object;
* no append (``open(..., "a")``), no rename or replace, no ``walk``: each raises;
* folders do not exist by themselves: ``mkdir`` does nothing, and a "folder" exists only while
  some object lies below it.

It never reaches the network: ``install`` turns off epath's route through TensorFlow and checks
that ``gs://`` paths reach the store before anything is read or written.
"""

from __future__ import annotations

import collections
import fnmatch
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from etils import epath
from etils.epath import backend, gpath, stat_utils

PREFIX = "gs://"


class _Upload(io.IOBase):
    """A writer that becomes the object only when closed (an upload)."""

    def __init__(self, store: ObjectStore, key: str, mode: str):
        super().__init__()
        self._store, self._key = store, key
        self._tmp = store.root / ".uploads" / uuid.uuid4().hex
        self._tmp.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, mode)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self._file.write(data)

    def flush(self) -> None:  # nothing reaches the object before close
        pass

    def close(self) -> None:
        if self.closed:
            return
        self._file.close()
        target = self._store.local(self._key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, target)
        self._store.uploads[self._key] += 1
        super().close()


class ObjectStore(backend.Backend):
    """epath's backend for ``gs://``, kept in ``root`` with object-store semantics (module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.uploads: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ keys and local files

    def local(self, path: Any) -> Path:
        text = os.fspath(path)
        assert text.startswith(PREFIX), f"not a gs:// path: {text!r} (mangled on the way?)"
        return self.root / text[len(PREFIX) :].rstrip("/")

    def _has_objects(self, local: Path) -> bool:
        if local.is_file():
            return True
        return local.is_dir() and any(p.is_file() for p in local.rglob("*"))

    # ------------------------------------------------------------------ the Backend interface

    def open(self, path, mode):
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"object storage cannot append or update in place ({mode!r}): {path}")
        if "r" in mode:
            local = self.local(path)
            if not local.is_file():
                raise FileNotFoundError(f"no object {path}")
            return open(local, mode)
        return _Upload(self, os.fspath(path).rstrip("/"), mode)

    def exists(self, path) -> bool:
        return self._has_objects(self.local(path))

    def isdir(self, path) -> bool:
        local = self.local(path)
        return local.is_dir() and self._has_objects(local)

    def listdir(self, path) -> list[str]:
        local = self.local(path)
        if not self.isdir(path):
            raise FileNotFoundError(f"no objects under {path}")
        return sorted(p.name for p in local.iterdir() if self._has_objects(p))

    def glob(self, path) -> list[str]:
        text = os.fspath(path)
        base, pattern = text.rsplit("/", 1)
        if any(c in base for c in "*?["):
            raise NotImplementedError(f"fake glob: only the last part may hold wildcards ({text})")
        if not self.isdir(base):
            return []
        return [f"{base}/{name}" for name in self.listdir(base) if fnmatch.fnmatchcase(name, pattern)]

    def walk(self, top, *, top_down=True, on_error=None):
        raise NotImplementedError("fake object store: no walk (epath's walk over fsspec loses gs://)")

    def makedirs(self, path, *, exist_ok=False, mode=None) -> None:
        self.local(path)  # checks the path; a bucket has no folders to make

    def mkdir(self, path, *, exist_ok=False, mode=None) -> None:
        self.local(path)

    def rmtree(self, path) -> None:
        local = self.local(path)
        if not self._has_objects(local):
            raise FileNotFoundError(f"no objects under {path}")
        shutil.rmtree(local)

    def remove(self, path) -> None:
        local = self.local(path)
        if not local.is_file():
            raise FileNotFoundError(f"no object {path}")
        local.unlink()

    def rename(self, path, dst) -> None:
        raise NotImplementedError(f"object storage has no rename: {path} -> {dst}")

    def replace(self, path, dst) -> None:
        raise NotImplementedError(f"object storage has no rename: {path} -> {dst}")

    def copy(self, path, dst, overwrite: bool) -> None:
        if not overwrite and self.exists(dst):
            raise FileExistsError(dst)
        with self.open(path, "rb") as reader, self.open(dst, "wb") as writer:
            shutil.copyfileobj(reader, writer)

    def stat(self, path) -> stat_utils.StatResult:
        local = self.local(path)
        if not self._has_objects(local):
            raise FileNotFoundError(f"no object {path}")
        info = local.stat()
        return stat_utils.StatResult(
            is_directory=local.is_dir(),
            length=0 if local.is_dir() else info.st_size,
            mtime=int(info.st_mtime),
            owner=None,
            group=None,
            mode=None,
        )


def install(monkeypatch, root: Path) -> ObjectStore:
    """Route ``gs://`` through an ``ObjectStore`` in ``root`` for the rest of the test.

    With TensorFlow installed epath sends ``gs://`` to ``tf.io.gfile`` whatever its backend table
    says, and caches that decision (``_is_tf_installed``): both are patched, and the routing is
    checked before any file operation, so a change in etils fails here instead of reaching GCS.
    """
    store = ObjectStore(root)
    monkeypatch.setenv("EPATH_USE_TF", "false")
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", store)
    assert epath.Path("gs://bucket/x")._backend is store, "epath would not reach the fake object store"
    return store
