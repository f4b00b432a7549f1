"""PyTorch's ``.pth`` files read with NumPy alone, executing nothing.

Two formats: the zip archive of ``torch.save`` since torch 1.6 (``read_torch_zip``: ``data.pkl``
plus one record per storage) and the older single-stream "legacy" format (``read_torch_legacy``:
magic number, protocol version, system info, the pickled object, then every storage's bytes in
turn), which Cadene's BN-Inception file uses. Both unpicklers resolve only the globals a plain
state dict of tensors consists of (the allow-list of ``torch.load(weights_only=True)``), so a
crafted file cannot run code; anything else is refused with ``BadWeightsFileError``.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hdml_jax.models.errors import BadWeightsFileError

# torch's legacy storage classes, as ``torch.save`` names them in the pickle, and the bytes they hold.
# bfloat16 has no NumPy dtype; it is read as uint16 and widened to float32 (exactly).
_TORCH_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "DoubleStorage": "f8",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
}


@dataclass(frozen=True)
class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. inside the pickle; only carries the element type."""

    name: str


@dataclass(frozen=True)
class _Storage:
    """One flat storage record of the archive, already in native byte order (bfloat16 as float32)."""

    data: np.ndarray


def _rebuild_tensor(
    storage: _Storage,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2`` for NumPy: a copy of the strided view into the storage.

    Views saved by ``torch.save`` (slices, transposes) keep their whole storage plus offset and
    strides, so all three must be honoured. The bounds are checked before ``as_strided``, which
    would otherwise read outside the buffer of a malformed file.
    """
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, _Storage):
        raise BadWeightsFileError("malformed tensor record: its storage is not a tensor storage.")
    numbers = (storage_offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(n, int) and n >= 0 for n in numbers):
        raise BadWeightsFileError(
            f"malformed tensor record: offset {storage_offset}, size {size}, stride {stride}."
        )
    data = storage.data
    if 0 in size:
        return np.empty(size, dtype=data.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= data.size:
        raise BadWeightsFileError(
            f"malformed tensor record: size {size}, stride {stride} and offset {storage_offset} "
            f"reach element {last} of a storage of {data.size}."
        )
    view = np.lib.stride_tricks.as_strided(
        data[storage_offset:],
        shape=size,
        strides=tuple(s * data.itemsize for s in stride),
        writeable=False,
    )
    return view.copy()


def _rebuild_parameter(
    data: np.ndarray, requires_grad: bool = False, backward_hooks: Any = None
) -> np.ndarray:
    """``torch._utils._rebuild_parameter``: a saved ``nn.Parameter`` is just its tensor here."""
    del requires_grad, backward_hooks
    return data


# Everything a pickled state dict of dense tensors refers to besides the storage classes.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


def _allowed_global(module: str, name: str, source: Path) -> Any:
    """The stand-in for a global a state-dict pickle may name; anything else is refused unloaded."""
    if (module, name) in _ALLOWED_GLOBALS:
        return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
        return _StorageType(name)
    raise BadWeightsFileError(
        f"{source} is not a plain state dict of tensors: its pickle references "
        f"{module}.{name}, which is not loaded (nothing in it was executed). Load it with "
        "torch, save `model.state_dict()` and convert that file."
    )


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a zip-format ``.pth`` into NumPy arrays, executing nothing.

    A pickle may name any importable callable and call it; ``torch.load(weights_only=True)``
    guards against that with an allow-list, and so does this class: only the few globals a plain
    state dict of tensors consists of resolve, each to a harmless local stand-in (``OrderedDict``
    excepted). Storages come from ``<prefix>/data/<key>`` via ``persistent_load``.
    """

    def __init__(self, file: BinaryIO, archive: zipfile.ZipFile, prefix: str, byteorder: str, source: Path):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = "<" if byteorder == "little" else ">"
        self._source = source
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        return _allowed_global(module, name, self._source)

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] in ("storage", b"storage")
            and isinstance(pid[1], _StorageType)
        ):
            raise BadWeightsFileError(
                f"{self._source} is not a plain state dict of tensors: storage record {pid!r}."
            )
        _, storage_type, key, _location, numel = pid
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self._storages:
            self._storages[key] = self._read_storage(storage_type, key, numel)
        return self._storages[key]

    def _read_storage(self, storage_type: _StorageType, key: str, numel: int) -> _Storage:
        dtype = np.dtype(self._byteorder + _TORCH_STORAGE_DTYPES[storage_type.name])
        try:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
        except KeyError:
            raise BadWeightsFileError(f"{self._source}: storage {key} is missing from the archive.") from None
        if not isinstance(numel, int) or numel < 0 or numel * dtype.itemsize > len(raw):
            raise BadWeightsFileError(
                f"{self._source}: storage {key} holds {len(raw)} bytes, not {numel} elements."
            )
        return _Storage(_decode_storage(raw, dtype, numel, storage_type.name))


def _decode_storage(raw: bytes, dtype: np.dtype, count: int, type_name: str) -> np.ndarray:
    """The first ``count`` elements of a storage's bytes in native byte order (bfloat16, which
    NumPy lacks, as the float32 of the same value)."""
    data = np.frombuffer(raw, dtype=dtype, count=count).astype(dtype.newbyteorder("="))
    if type_name == "BFloat16Storage":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data


def _archive_prefix(archive: zipfile.ZipFile, path: Path) -> str:
    """The folder every record sits in: ``archive`` nowadays, the file's stem in older torch versions."""
    names = archive.namelist()
    prefix = names[0].split("/", 1)[0] if names else ""
    if f"{prefix}/data.pkl" not in names:
        kind = (
            "a TorchScript archive" if f"{prefix}/constants.pkl" in names else "a zip file without data.pkl"
        )
        raise BadWeightsFileError(f"{path} is {kind}, not a plain state dict saved by torch.save.")
    return prefix


def read_torch_zip(path: str | Path) -> dict[str, np.ndarray]:
    """Read a state dict from PyTorch's zip format (``torch.save`` since 1.6) with NumPy alone.

    Same safety as ``torch.load(weights_only=True)``: nothing but tensors, ``OrderedDict`` and
    plain containers can be built, so a crafted file executes no code. Arrays keep their dtype
    (bfloat16 becomes float32); a ``{"state_dict": ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive, path)
        names = set(archive.namelist())
        byteorder = (
            archive.read(f"{prefix}/byteorder").decode() if f"{prefix}/byteorder" in names else "little"
        )
        with archive.open(f"{prefix}/data.pkl") as pickled:
            state = _StateDictUnpickler(pickled, archive, prefix, byteorder, path).load()
    return _tensor_dict(state, path)


def _tensor_dict(state: Any, path: Path) -> dict[str, np.ndarray]:
    """Unwrap ``{"state_dict": ...}`` (and DeiT's ``{"model": ...}``) and insist on a flat
    ``name → array`` mapping."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise BadWeightsFileError(f"{path} holds a {type(state).__name__}, not a state dict.")
    others = [str(key) for key, value in state.items() if not isinstance(value, np.ndarray)]
    if others:
        raise BadWeightsFileError(
            f"{path} is not a plain state dict: non-tensor entries {', '.join(others[:10])}."
        )
    return {str(key): value for key, value in state.items()}


# The legacy format's header (torch/serialization.py: MAGIC_NUMBER, PROTOCOL_VERSION).
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C


LEGACY_PROTOCOL_VERSION = 1001


@dataclass
class _LegacyStorage:
    """A storage record of a legacy file. Its bytes follow the pickle, so tensors built while
    unpickling refer to it and read ``data`` only once the bytes are in."""

    key: str
    type_name: str
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _LegacyView:
    """``view_metadata`` of a legacy storage record: ``numel`` elements of ``root`` from ``offset``."""

    root: _LegacyStorage
    offset: int
    numel: int


@dataclass(frozen=True)
class _PendingTensor:
    """A tensor of a legacy file, waiting for its storage's bytes."""

    storage: _LegacyStorage | _LegacyView
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _pending_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _PendingTensor:
    """``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`` and
    ``_rebuild_tensor(storage, offset, size, stride)`` (torch < 0.4) of a legacy file."""
    if not isinstance(storage, _LegacyStorage | _LegacyView):
        raise BadWeightsFileError("malformed tensor record: its storage is not a tensor storage.")
    return _PendingTensor(storage, storage_offset, tuple(size), tuple(stride))


class _NothingUnpickler(pickle.Unpickler):
    """For the legacy header and key list: plain ints, strings, lists and dicts, no globals at all."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"unexpected reference to {module}.{name} in a torch.save header")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("unexpected storage record in a torch.save header")


class _LegacyUnpickler(pickle.Unpickler):
    """Unpickles the object of a legacy ``torch.save`` stream with the zip reader's allow-list.

    Persistent ids are ``('storage', storage_type, key, location, numel, view_metadata)``
    (``view_metadata``: None or ``(view_key, offset, numel)``); ``location`` is ignored, every
    array lands on the host. Python 2 pickles (Cadene's file) decode their byte strings as UTF-8,
    as ``torch.load`` does.
    """

    def __init__(self, file: BinaryIO, source: Path):
        super().__init__(file, encoding="utf-8")
        self._source = source
        self.storages: dict[str, _LegacyStorage] = {}
        self._views: dict[str, _LegacyView] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _pending_tensor
        return _allowed_global(module, name, self._source)

    def persistent_load(self, pid: Any) -> _LegacyStorage | _LegacyView:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 6
            and pid[0] in ("storage", b"storage")
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[4], int)
            and pid[4] >= 0
        ):
            raise BadWeightsFileError(
                f"{self._source} is not a plain state dict of tensors: record {str(pid)[:80]}."
            )
        _, storage_type, key, _location, numel, view = pid
        key = key.decode() if isinstance(key, bytes) else str(key)
        storage = self.storages.setdefault(key, _LegacyStorage(key, storage_type.name, numel))
        if storage.type_name != storage_type.name or storage.numel != numel:
            raise BadWeightsFileError(f"{self._source}: storage {key} is recorded with two types or sizes.")
        if view is None:
            return storage
        if not (
            isinstance(view, tuple) and len(view) == 3 and all(isinstance(n, int | str | bytes) for n in view)
        ):
            raise BadWeightsFileError(f"{self._source}: malformed storage view {view!r}.")
        view_key, offset, view_numel = view
        if not (
            isinstance(offset, int)
            and isinstance(view_numel, int)
            and 0 <= offset <= offset + view_numel <= numel
        ):
            raise BadWeightsFileError(f"{self._source}: storage view {view!r} lies outside its storage.")
        view_key = view_key.decode() if isinstance(view_key, bytes) else str(view_key)
        return self._views.setdefault(view_key, _LegacyView(storage, offset, view_numel))


def _materialize(value: Any) -> Any:
    """Replace the ``_PendingTensor`` values of a (nested) mapping by NumPy arrays."""
    if isinstance(value, _PendingTensor):
        storage = value.storage
        if isinstance(storage, _LegacyView):
            data = storage.root.data[storage.offset : storage.offset + storage.numel]
        else:
            data = storage.data
        return _rebuild_tensor(_Storage(data), value.storage_offset, value.size, value.stride)
    if isinstance(value, Mapping):
        return {key: _materialize(item) for key, item in value.items()}
    return value


def read_torch_legacy(path: str | Path) -> dict[str, np.ndarray]:
    """Read a state dict from PyTorch's legacy (pre-1.6, non-zip) format with NumPy alone.

    The format (``torch.save(..., _use_new_zipfile_serialization=False)``, the default before
    torch 1.6) is one stream of five pickles and raw data: the magic number, the protocol version
    (1001), a ``sys_info`` dict (byte order, C type sizes), the object itself with storages as
    persistent ids, the sorted list of storage keys; then for each key an 8-byte element count
    and the storage's elements, little-endian. Same safety and result as ``read_torch_zip``.
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(1) != b"\x80":  # every torch.save stream starts with a pickle's PROTO opcode
            raise BadWeightsFileError(
                f"{path} is not a file saved by torch.save (neither zip nor pickle): an incomplete "
                "download, or another format under a .pth name?"
            )
        f.seek(0)
        header = _NothingUnpickler(f)
        if header.load() != LEGACY_MAGIC_NUMBER:
            raise BadWeightsFileError(
                f"{path} is a pickle, but not one written by torch.save (no magic number)."
            )
        protocol = _NothingUnpickler(f).load()
        if protocol != LEGACY_PROTOCOL_VERSION:
            raise BadWeightsFileError(f"{path}: unknown torch.save protocol version {protocol!r}.")
        sys_info = _NothingUnpickler(f).load()
        little_endian = not isinstance(sys_info, Mapping) or sys_info.get("little_endian", True)
        unpickler = _LegacyUnpickler(f, path)
        state = unpickler.load()
        keys = _NothingUnpickler(f).load()
        if not isinstance(keys, list) or set(map(str, keys)) != set(unpickler.storages):
            raise BadWeightsFileError(f"{path}: its list of storages does not match the tensors' records.")
        for key in keys:
            storage = unpickler.storages[str(key)]
            # The count is written in the saving machine's byte order (little-endian since torch
            # 1.x everywhere); the elements are little-endian in every version.
            (count,) = struct.unpack("<q" if little_endian else ">q", _read_exactly(f, 8, path))
            if count != storage.numel:
                raise BadWeightsFileError(
                    f"{path}: storage {key} holds {count} elements, its record says {storage.numel}."
                )
            dtype = np.dtype("<" + _TORCH_STORAGE_DTYPES[storage.type_name])
            raw = _read_exactly(f, count * dtype.itemsize, path)
            storage.data = _decode_storage(raw, dtype, count, storage.type_name)
    return _tensor_dict(_materialize(state), path)


def _read_exactly(f: BinaryIO, size: int, path: Path) -> bytes:
    """``size`` bytes, compared with what is left of the file first: a damaged count must not make
    ``read`` allocate gigabytes before finding the end."""
    left = os.fstat(f.fileno()).st_size - f.tell()
    data = f.read(size) if size <= left else b""
    if len(data) != size:
        raise BadWeightsFileError(
            f"{path} ends early (a storage is cut off): an incomplete download? Download it again."
        )
    return data


def read_pth(path: Path) -> dict[str, np.ndarray]:
    if zipfile.is_zipfile(path):
        return read_torch_zip(path)
    if tarfile.is_tarfile(path):
        raise BadWeightsFileError(
            f"{path} uses torch's first (tar) serialization format, which is not read here: load it "
            "with an old torch, save its state_dict() again and convert that file."
        )
    return read_torch_legacy(path)
