"""The contract between data sets, samplers and the input pipeline.

A data set is a few ``Split``s. A split is a random-access source of examples plus its labels
held in memory, so samplers (P×K needs every label) never touch the images.

Example dict returned by ``split.source[i]``::

    {"image": uint8 (H, W, 3), "label": int (0..num_classes-1 within the split),
     "coarse_label": int (only when the data set has one),
     "bbox": float32 (4,) [ymin, xmin, ymax, xmax] in [0, 1] (only when known)}

A source of encoded images may also have ``source.encoded(i)``: the same example with its image
still encoded (a ``encoded.EncodedImage``), which the input pipeline prefers, since the
transform then decodes only what it needs (a JPEG at a reduced scale when the output allows).
``source[i]`` keeps returning pixels for everything else (pictures, tests, tools).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np


class RandomAccessSource(Protocol):
    """What grain's ``RandomAccessDataSource`` needs: ``len`` and integer indexing."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Split:
    """One class-disjoint part of a data set.

    Attributes:
      source: random-access examples (see the module docstring).
      labels: ``(N,)`` int64, ``labels[i] == source[i]["label"]``, remapped to ``0..C-1``.
      coarse_labels: ``(N,)`` int64 or None.
      name: for messages, e.g. ``"cub200/train"``.
    """

    source: RandomAccessSource
    labels: np.ndarray
    coarse_labels: np.ndarray | None = None
    name: str = ""

    def __post_init__(self):
        if len(self.labels) != len(self.source):
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {len(self.source)} examples.")

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def num_coarse_classes(self) -> int | None:
        return None if self.coarse_labels is None else int(self.coarse_labels.max()) + 1

    def __len__(self) -> int:
        return len(self.source)


@dataclasses.dataclass(frozen=True)
class MetricDataset:
    """Train and test splits with disjoint classes.

    ``test`` is the self-retrieval evaluation set. Query/gallery data sets (In-Shop) also set
    ``query`` and ``gallery`` (then ``test`` is their union, for NMI and pictures); evaluation
    then retrieves queries from the gallery.
    """

    name: str
    train: Split
    test: Split
    query: Split | None = None
    gallery: Split | None = None
    recall_ks: Sequence[int] = (1, 2, 4, 8)


class SubsetSource:
    """Examples ``indices`` of ``source``, with labels replaced by ``labels`` (and coarse labels).

    Used to re-split a classification data set by class and remap the labels to ``0..C-1``.
    """

    def __init__(
        self,
        source: RandomAccessSource,
        indices: np.ndarray,
        labels: np.ndarray,
        coarse_labels: np.ndarray | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        self._source = source
        self._indices = np.asarray(indices, np.int64)
        self._labels = np.asarray(labels, np.int64)
        self._coarse = None if coarse_labels is None else np.asarray(coarse_labels, np.int64)
        self._transform = transform

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._example(index, encoded=False)

    def encoded(self, index: int) -> dict[str, Any]:
        """``self[index]`` with the image still encoded where the source and transform allow."""
        return self._example(index, encoded=True)

    def _example(self, index: int, encoded: bool) -> dict[str, Any]:
        position = int(self._indices[index])
        example = dict(read_example(self._source, position, encoded=encoded))
        if self._transform is not None:
            convert = getattr(self._transform, "encoded", None) if encoded else None
            example = (convert or self._transform)(example)
        example["label"] = int(self._labels[index])
        if self._coarse is not None:
            example["coarse_label"] = int(self._coarse[index])
        return example

    def __repr__(self) -> str:
        return f"SubsetSource({len(self)} of {len(self._source)})"


def read_example(source: RandomAccessSource, index: int, *, encoded: bool) -> dict[str, Any]:
    """``source.encoded(index)`` when ``encoded`` is asked for and the source has it (see the
    module docstring), else ``source[index]``."""
    read = getattr(source, "encoded", None) if encoded else None
    return read(index) if read is not None else source[index]


def remap_labels(labels: np.ndarray) -> np.ndarray:
    """Map arbitrary label values to ``0..C-1`` in sorted order of the original values."""
    _, dense = np.unique(np.asarray(labels), return_inverse=True)
    return dense.astype(np.int64)


class ArraySource:
    """A random-access source over in-memory arrays; ``source[i]`` is the example dict of row ``i``."""

    def __init__(self, arrays: dict[str, np.ndarray], name: str = ""):
        self._arrays = {key: value.view() for key, value in arrays.items()}
        for value in self._arrays.values():
            value.flags.writeable = False  # examples are views: keep callers from editing the data set
        self._name = name
        self._len = len(arrays["label"])
        if any(len(a) != self._len for a in arrays.values()):
            raise ValueError(f"{name}: arrays of different lengths.")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -self._len <= index < self._len:
            raise IndexError(f"{self._name}: index {index} out of range for {self._len} examples.")
        return {
            key: value[index] if value.ndim > 1 else int(value[index])
            for key, value in sorted(self._arrays.items())
        }

    def __repr__(self) -> str:
        return f"ArraySource({self._name}, {self._len} examples)"
