"""A state dict (name → NumPy array) from any of the files ImageNet weights come in, without torch.

``read_state_dict`` picks the reader by suffix: ``.safetensors`` (8-byte header size, JSON header,
raw data), ``.npz``, and ``.pth``/``.pt`` in either of torch's formats (``torch_pickle``). A
missing, damaged or mislabelled file raises ``WeightsFileNotFoundError`` or ``BadWeightsFileError``
with the path and what to do.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from hdml_jax.errors import UserError, first_line
from hdml_jax.models.errors import BadWeightsFileError, WeightsFileNotFoundError
from hdml_jax.models.torch_pickle import read_pth

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
        ".pth": read_pth,
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
            f"{path} cannot be read as a {suffix} state dict ({first_line(error)}): a damaged or "
            "incomplete file, or another format under this name?"
        ) from error
