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
      coarse_labels: ``(N,)`` int64 or None: the group of each example's class, the taxonomy's
        first level above the classes.
      coarser_labels: the levels above that, ``(N,)`` int64 each, finest first (a taxonomy of
        any depth: ``home/kitchen/kettles`` gives kettles' group, then ``home/kitchen``, then
        ``home``); empty for one level or none.
      name: for messages, e.g. ``"cub200/train"``.
    """

    source: RandomAccessSource
    labels: np.ndarray
    coarse_labels: np.ndarray | None = None
    name: str = ""
    coarser_labels: tuple[np.ndarray, ...] = ()

    def __post_init__(self):
        if len(self.labels) != len(self.source):
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {len(self.source)} examples.")
        if self.coarser_labels and self.coarse_labels is None:
            raise ValueError(f"{self.name}: coarser_labels without coarse_labels.")

    @property
    def coarse_levels(self) -> tuple[np.ndarray, ...]:
        """Every level above the classes, finest first (``()``: no taxonomy)."""
        return () if self.coarse_labels is None else (self.coarse_labels, *self.coarser_labels)

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

    ``test`` holds every evaluation row. ``is_query`` / ``is_gallery`` (``(len(test),)`` bool,
    both or neither) say which rows are queries and which gallery items, Open Metric Learning's
    way: a row may be either or both, and a query is searched among the gallery rows other than
    its own (``hdml_jax.evaluation.query_gallery``). None: every row both, i.e. self-retrieval
    (CUB, Cars, SOP). In-Shop's queries and gallery are disjoint rows of ``test``.
    """

    name: str
    train: Split
    test: Split
    recall_ks: Sequence[int] = (1, 2, 4, 8)
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None

    def __post_init__(self):
        if (self.is_query is None) != (self.is_gallery is None):
            raise ValueError(f"{self.name}: give is_query and is_gallery together, or neither.")
        for flags in (self.is_query, self.is_gallery):
            if flags is not None and (np.asarray(flags).dtype != np.bool_ or np.shape(flags) != (len(self.test),)):
                raise ValueError(
                    f"{self.name}: is_query and is_gallery need one bool per test row ({len(self.test)})."
                )

    @property
    def has_roles(self) -> bool:
        """Whether some test row is not both a query and a gallery item (not self-retrieval)."""
        return self.is_query is not None and not (np.all(self.is_query) and np.all(self.is_gallery))

    def roles(self) -> tuple[np.ndarray, np.ndarray]:
        """``(is_query, is_gallery)`` over the test rows, every row both when none were given."""
        if self.is_query is None:
            every = np.ones(len(self.test), bool)
            return every, every
        return np.asarray(self.is_query, bool), np.asarray(self.is_gallery, bool)

    @property
    def query(self) -> Split | None:
        """The query rows of ``test`` as a split of their own (None in self-retrieval)."""
        return self._rows(self.is_query, "query") if self.has_roles else None

    @property
    def gallery(self) -> Split | None:
        """The gallery rows of ``test`` as a split of their own (None in self-retrieval)."""
        return self._rows(self.is_gallery, "gallery") if self.has_roles else None

    def _rows(self, flags: np.ndarray, role: str) -> Split:
        rows = np.flatnonzero(flags)
        coarse = None if self.test.coarse_labels is None else self.test.coarse_labels[rows]
        labels = self.test.labels[rows]
        source = SubsetSource(self.test.source, rows, labels, coarse)
        coarser = tuple(level[rows] for level in self.test.coarser_labels)
        return Split(source, labels, coarse, name=f"{self.name}/{role}", coarser_labels=coarser)


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
