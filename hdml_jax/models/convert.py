"""ImageNet weights → Flax variables: torchvision's ResNet for ``hdml_jax.models.ResNet``, Cadene's
BN-Inception for ``hdml_jax.models.BNInception``.

Mapping (reference.md §5): conv kernels OIHW → HWIO; BatchNorm ``weight/bias`` → ``scale/bias``
(params) and ``running_mean/running_var`` → ``mean/var`` (batch_stats); ``layerS.B.name`` →
``layerS_B/name``; ``downsample.0/1`` → ``downsample_conv/downsample_bn``. ``fc.*`` and
``num_batches_tracked`` are ignored. ``last_stride`` does not change any shape, so the same
weights serve both strides.

One-time conversion to a checkpoint that ``config.model.pretrained`` points to::

    python -m hdml_jax.models.convert resnet50-0676ba61.pth --depth 50 --output ~/weights/resnet50

``--config.model.pretrained=torchvision`` does the download and this conversion by itself
(``hdml_jax.models.weights``).

BN-Inception (``bn_inception_to_flax``): Cadene's module names are ours, so the mapping is the
same rename without the ``layerS.B`` step; its BatchNorm tensors, stored ``(1, C)`` by the Caffe
port, are squeezed to ``(C,)`` (as Proxy-Anchor does before ``load_state_dict``) and
``last_linear.*`` (the ImageNet classifier) is dropped::

    python -m hdml_jax.models.convert bn_inception-52deb4733.pth --arch bn_inception --output DIR

``.pth`` files are read without torch, in either of torch's formats: the zip archive of torch
≥ 1.6 (``read_torch_zip``) and the older single-stream "legacy" format that Cadene's file uses
(``read_torch_legacy``).

A missing or unreadable weights file, weights of another depth or width and an existing output
are the user's to fix: each raises a ``hdml_jax.errors.UserError`` (that also derives from the
built-in class a caller expects), which the command prints as one ``error: ...`` message, exit
status 2 (``HDML_JAX_DEBUG=1`` adds the traceback).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.errors import UserError, exit_with_message
from hdml_jax.models.bn_inception import BNInception
from hdml_jax.models.resnet import STAGES, ResNet

ARCHITECTURES = ("resnet", "bn_inception")


class WeightsFileNotFoundError(UserError, FileNotFoundError):
    """No weights file, or no converted checkpoint directory, at the given path."""


class BadWeightsFileError(UserError, ValueError):
    """The weights file (or checkpoint directory) cannot be read: wrong format, damaged, not a state dict."""


class WeightsMismatchError(UserError, ValueError):
    """The weights do not fit the requested backbone: another architecture, depth or width, or keys missing."""


class OutputExistsError(UserError, FileExistsError):
    """The output directory of a conversion exists already."""


IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_PREFIXES = ("fc.",)


def _flax_name(torch_module: str) -> str:
    """``layer3.1.downsample.0`` → ``layer3_1/downsample_conv``; stem names are unchanged."""
    parts = torch_module.split(".")
    if parts[0].startswith("layer"):
        block = f"{parts[0]}_{parts[1]}"
        rest = parts[2:]
        if rest[:1] == ["downsample"]:
            rest = ["downsample_conv" if rest[1] == "0" else "downsample_bn"]
        return "/".join([block, *rest])
    return "/".join(parts)


@functools.lru_cache(maxsize=8)
def _expected_variables(depth: int, width: int) -> dict[str, Any]:
    """The variable shapes of ``ResNet(depth, width=width)`` (traced once per depth and width; read only)."""
    model = ResNet(depth, width=width)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def resnet_layout(state_dict: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """``(depth, stem width)`` of a torchvision ResNet state dict; None for what is not recognised.

    The depth comes from the number of blocks per stage and the block type (a ``conv3`` means
    bottleneck blocks), the width from ``conv1.weight``'s output channels.
    """
    blocks = dict.fromkeys(("layer1", "layer2", "layer3", "layer4"), 0)
    bottleneck = False
    for key in state_dict:
        parts = str(key).split(".")
        if len(parts) > 2 and parts[0] in blocks and parts[1].isdigit():
            blocks[parts[0]] = max(blocks[parts[0]], int(parts[1]) + 1)
            bottleneck = bottleneck or parts[2] == "conv3"
    layout = ("bottleneck" if bottleneck else "basic", tuple(blocks.values()))
    depth = next((d for d, stages in STAGES.items() if stages == layout), None)
    stem = state_dict.get("conv1.weight")
    width = int(np.shape(stem)[0]) if stem is not None and np.ndim(stem) == 4 else None
    return depth, width


def torchvision_resnet_to_flax(
    state_dict: Mapping[str, Any], depth: int, *, width: int = 64
) -> dict[str, Any]:
    """Convert a torchvision ResNet state dict (name → array) to ``{'params', 'batch_stats'}``.

    Args:
      state_dict: torchvision keys (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) mapped
        to NumPy arrays (or anything ``np.asarray`` accepts, torch tensors included).
      depth: 18, 34, 50 or 101.
      width: the stem width of the target ``ResNet`` (64 for torchvision's models).

    Raises:
      WeightsMismatchError: (a ``ValueError``) in one line when the weights are a ResNet of
        another depth or width; else listing every missing, unexpected and mis-shaped key at once.
    """
    expected = {collection: _flatten(tree) for collection, tree in _expected_variables(depth, width).items()}
    converted: dict[str, dict[str, np.ndarray]] = {"params": {}, "batch_stats": {}}
    unexpected, misshaped = [], []
    seen_with_wrong_shape: set[str] = set()
    for key, value in state_dict.items():
        if key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES):
            continue
        module, _, kind = key.rpartition(".")
        array = np.asarray(value, dtype=np.float32)
        name = _flax_name(module)
        if kind == "weight" and array.ndim == 4:
            collection, path, array = "params", f"{name}/kernel", array.transpose(2, 3, 1, 0)
        elif kind in ("weight", "bias") and array.ndim == 1:
            collection, path = "params", f"{name}/{'scale' if kind == 'weight' else 'bias'}"
        elif kind in ("running_mean", "running_var"):
            collection, path = "batch_stats", f"{name}/{'mean' if kind == 'running_mean' else 'var'}"
        else:
            unexpected.append(key)
            continue
        target = expected[collection].get(path)
        if target is None:
            unexpected.append(key)
        elif target.shape != array.shape:
            seen_with_wrong_shape.add(f"{collection}/{path}")
            misshaped.append(
                f"{key}: got {tuple(np.shape(value))}, ResNet-{depth} needs {_torch_shape(target.shape)}"
            )
        else:
            converted[collection][path] = array
    missing = [
        f"{collection}/{path}"
        for collection, paths in expected.items()
        for path in paths
        if path not in converted[collection] and f"{collection}/{path}" not in seen_with_wrong_shape
    ]
    if missing or unexpected or misshaped:
        if _is_bn_inception(state_dict):
            raise WeightsMismatchError(
                f"the weights are a BN-Inception (Cadene's layout), not a ResNet-{depth}: convert them with "
                "--arch bn_inception (no --depth) and train with model.backbone='bn_inception'."
            )
        found_depth, found_width = resnet_layout(state_dict)
        if (
            found_depth is not None
            and found_width is not None
            and (found_depth, found_width) != (depth, width)
        ):
            raise WeightsMismatchError(
                f"the weights are a ResNet-{found_depth} of width {found_width}, but ResNet-{depth} of "
                f"width {width} was asked for: the depth/width differ. Use weights of ResNet-{depth}, "
                f"or convert these with --depth {found_depth} and train with model.depth={found_depth}"
                + ("" if found_width == width else f", model.width={found_width}")
                + "."
            )
        lines = [f"the weights do not fit ResNet-{depth}:"]
        if missing:
            lines.append(
                f"  missing ({len(missing)}): "
                + ", ".join(missing[:20])
                + (" ..." if len(missing) > 20 else "")
            )
        if unexpected:
            lines.append(
                f"  unexpected ({len(unexpected)}): "
                + ", ".join(unexpected[:20])
                + (" ..." if len(unexpected) > 20 else "")
            )
        if misshaped:
            lines.append(f"  wrong shape ({len(misshaped)}): " + "; ".join(misshaped[:20]))
        lines.append("  Check the depth argument and that the file holds a torchvision ResNet state dict.")
        raise WeightsMismatchError("\n".join(lines))
    return {collection: _unflatten(flat) for collection, flat in converted.items()}


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(flax_shape[i] for i in (3, 2, 0, 1)) if len(flax_shape) == 4 else tuple(flax_shape)


# ----------------------------------------------------------------------------- BN-Inception

BN_INCEPTION_IGNORED_PREFIXES = ("last_linear.",)  # the 1000-way ImageNet classifier
# Flax leaf → the torch state-dict suffix it comes from (same module name on both sides).
_BN_INCEPTION_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


@functools.lru_cache(maxsize=1)
def bn_inception_torch_keys() -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Every key of Cadene's BN-Inception state dict (classifier excluded) → ``(collection, Flax
    path, torch shape)``, derived from ``BNInception``'s own variables (traced once)."""
    shapes = jax.eval_shape(lambda: BNInception().init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    table = {}
    for collection, tree in shapes.items():
        for path, leaf in _flatten(tree).items():
            module, _, name = path.rpartition("/")
            key = f"{module}.{_BN_INCEPTION_LEAVES[(collection, name)]}"
            table[key] = (collection, path, _torch_shape(leaf.shape))
    return table


def _is_bn_inception(state_dict: Mapping[str, Any]) -> bool:
    return "conv1_7x7_s2.weight" in state_dict or "inception_3a_1x1.weight" in state_dict


def _listed(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def bn_inception_to_flax(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Convert Cadene's BN-Inception state dict (name → array) to ``{'params', 'batch_stats'}``.

    Conv weights OIHW → HWIO; BatchNorm ``weight/bias/running_mean/running_var`` → ``scale/bias``
    (params) and ``mean/var`` (batch_stats), each squeezed from the file's ``(1, C)`` to ``(C,)``
    (a ``(C,)`` tensor, as a re-saved ``state_dict()`` has, is taken as it is). ``last_linear.*``
    and ``num_batches_tracked`` are ignored.

    Raises:
      WeightsMismatchError: (a ``ValueError``) in one line: ResNet weights, or the missing,
        unexpected and mis-shaped keys (the first few of each) and how to fix it.
    """
    if not _is_bn_inception(state_dict):
        depth, width = resnet_layout(state_dict)
        if depth is not None:
            raise WeightsMismatchError(
                f"the weights are a torchvision ResNet-{depth} (width {width}), not BN-Inception: convert "
                f"them with --depth {depth} (no --arch) and train with model.backbone='resnet', or give "
                "Cadene's bn_inception-52deb4733.pth for --arch bn_inception."
            )
    table = bn_inception_torch_keys()
    converted: dict[str, dict[str, np.ndarray]] = {"params": {}, "batch_stats": {}}
    unexpected, misshaped, seen = [], [], set()
    for key, value in state_dict.items():
        if key.startswith(BN_INCEPTION_IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES):
            continue
        if key not in table:
            unexpected.append(key)
            continue
        seen.add(key)
        collection, path, torch_shape = table[key]
        array = np.asarray(value, dtype=np.float32)
        if len(torch_shape) == 1 and array.shape == (1, *torch_shape):
            array = array[0]  # the Caffe port's (1, C) BatchNorm tensors
        if array.shape != torch_shape:
            misshaped.append(f"{key} is {tuple(np.shape(value))}, needs {torch_shape}")
            continue
        converted[collection][path] = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    missing = [key for key in table if key not in seen]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_listed(unexpected)})")
        if misshaped:
            parts.append(f"{len(misshaped)} of the wrong shape ({_listed(misshaped, 3)})")
        raise WeightsMismatchError(
            f"the weights do not fit BN-Inception: {'; '.join(parts)}. Give Cadene's BN-Inception state "
            "dict (pretrainedmodels' bn_inception-52deb4733.pth, or a state_dict() of that network)."
        )
    return {collection: _unflatten(flat) for collection, flat in converted.items()}


_SAFETENSORS_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file with NumPy alone (8-byte header size, JSON header, raw data)."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] == "BF16":
            start, end = info["data_offsets"]
            raw = np.frombuffer(data[start:end], dtype=np.uint16).astype(np.uint32) << 16
            tensors[name] = raw.view(np.float32).reshape(info["shape"])
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise BadWeightsFileError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[start:end], dtype=_SAFETENSORS_DTYPES[info["dtype"]]).reshape(
            info["shape"]
        )
    return tensors


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
    """Unwrap ``{"state_dict": ...}`` and insist on a flat ``name → array`` mapping."""
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
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


def _read_pth(path: Path) -> dict[str, np.ndarray]:
    if zipfile.is_zipfile(path):
        return read_torch_zip(path)
    if tarfile.is_tarfile(path):
        raise BadWeightsFileError(
            f"{path} uses torch's first (tar) serialization format, which is not read here: load it "
            "with an old torch, save its state_dict() again and convert that file."
        )
    return read_torch_legacy(path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise BadWeightsFileError(
            f"{path} is not a .npz archive (not a zip file): a damaged or incomplete file, or another "
            "format under this name?"
        )
    with np.load(path, allow_pickle=False) as archive:
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise BadWeightsFileError(f"{path} holds a single array, not a .npz archive of named arrays.")
        return {key: archive[key] for key in archive.files}


# What a damaged or mislabelled file makes the readers raise.
_READ_ERRORS = (
    ValueError,
    TypeError,  # a malformed pickle calling an allowed constructor with the wrong arguments
    KeyError,
    EOFError,
    OSError,
    struct.error,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A state dict (name → array) from ``.safetensors``, ``.npz`` or ``.pth``/``.pt``.

    None of them needs torch: ``.pth`` files in torch's zip format and in its legacy one alike.

    Raises:
      WeightsFileNotFoundError: no file at ``path`` (a ``FileNotFoundError``).
      BadWeightsFileError: an unknown suffix, or a file that cannot be read as a state dict of
        tensors in its format (a ``ValueError``).
    """
    path = Path(path)
    if not path.exists():
        raise WeightsFileNotFoundError(
            f"no weights at {path}. Download the ImageNet weights (torchvision's ResNet file, e.g. "
            "resnet50-0676ba61.pth or a .safetensors export, or Cadene's bn_inception-52deb4733.pth) "
            "on a machine with network access and copy the file here."
        )
    if path.is_dir():
        raise BadWeightsFileError(
            f"{path} is a folder, not a weights file. A folder written by this converter is used as it "
            f"is: --config.model.pretrained={path}"
        )
    suffix = path.suffix.lower()
    readers = {
        ".safetensors": read_safetensors,
        ".npz": _read_npz,
        ".pth": _read_pth,
    }
    reader = readers.get(".pth" if suffix == ".pt" else suffix)
    if reader is None:
        raise BadWeightsFileError(
            f"{path}: unknown weight format {suffix!r}; use .safetensors, .npz or .pth."
        )
    try:
        return reader(path)
    except BadWeightsFileError as error:
        if str(path) in str(error):
            raise
        raise BadWeightsFileError(f"{path}: {error}") from error
    except UserError:
        raise
    except _READ_ERRORS as error:
        raise BadWeightsFileError(
            f"{path} cannot be read as a {suffix} state dict ({_first_line(error)}): a damaged or "
            "incomplete file, or another format under this name?"
        ) from error


def load_torchvision_resnet(path: str | Path, depth: int) -> dict[str, Any]:
    """Read a torchvision ResNet file and convert it (see ``torchvision_resnet_to_flax``)."""
    return torchvision_resnet_to_flax(read_state_dict(path), depth)


def load_bn_inception(path: str | Path) -> dict[str, Any]:
    """Read Cadene's BN-Inception file (or any format of its state dict) and convert it
    (see ``bn_inception_to_flax``)."""
    return bn_inception_to_flax(read_state_dict(path))


def save_pretrained(variables: Mapping[str, Any], output: str | Path) -> Path:
    """Write converted variables as an orbax checkpoint directory (atomic)."""
    import orbax.checkpoint as ocp

    output = Path(output).expanduser().resolve()
    if output.exists():
        raise OutputExistsError(f"{output} exists; choose a new directory or remove it first.")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(output, jax.tree.map(np.asarray, dict(variables)))
    checkpointer.wait_until_finished()
    return output


def load_pretrained(path: str | Path) -> dict[str, Any]:
    """Read variables written by ``save_pretrained`` (the ``config.model.pretrained`` directory)."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise WeightsFileNotFoundError(
            f"no converted weights at {path}; create them once with "
            "`python -m hdml_jax.models.convert WEIGHTS --depth N --output DIR` (BN-Inception: "
            "--arch bn_inception instead of --depth N)."
        )
    try:
        return ocp.StandardCheckpointer().restore(path)
    except (OSError, ValueError, KeyError) as error:
        raise BadWeightsFileError(
            f"{path} is not a checkpoint written by `python -m hdml_jax.models.convert` "
            f"({_first_line(error)}); convert the weights again into a new directory."
        ) from error


def main(argv: list[str] | None = None) -> int:
    """Convert; 0 when done. A user's mistake exits with one ``error: ...`` message (status 2)."""
    parser = argparse.ArgumentParser(
        prog="python -m hdml_jax.models.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "weights",
        help="torchvision ResNet or Cadene BN-Inception weights: .pth, .safetensors or .npz",
    )
    parser.add_argument(
        "--arch", choices=ARCHITECTURES, default="resnet", help="the backbone (default resnet)"
    )
    parser.add_argument(
        "--depth", type=int, choices=sorted(STAGES), help="the ResNet's depth (--arch resnet only, required)"
    )
    parser.add_argument("--output", required=True, help="new checkpoint directory")
    args = parser.parse_args(argv)
    if args.arch == "resnet" and args.depth is None:
        parser.error("the following arguments are required: --depth (or give --arch bn_inception)")
    if args.arch != "resnet" and args.depth is not None:
        parser.error(f"--depth applies to --arch resnet only, not --arch {args.arch}")
    try:
        return _convert(args)
    except UserError as error:
        exit_with_message(error)
    return 2  # not reached: exit_with_message exits


def _convert(args: argparse.Namespace) -> int:
    output = Path(args.output).expanduser().resolve()
    if output.exists():  # before the conversion, not after it
        raise OutputExistsError(f"{output} exists; choose a new directory or remove it first.")
    if args.arch == "bn_inception":
        variables, name = load_bn_inception(args.weights), "BN-Inception"
    else:
        variables, name = load_torchvision_resnet(args.weights, args.depth), f"ResNet-{args.depth}"
    output = save_pretrained(variables, args.output)
    count = sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
    print(f"wrote {name} ({count:,} parameters) to {output}")
    print(f"use it with --config.model.pretrained={output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
