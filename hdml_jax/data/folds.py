"""The class splits of "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020; MLRC).

MLRC pools every image of a data set (train and test of its usual split), sorts the classes and
splits them in two halves: the first trains and validates, the second is the test set. The first
half is cut into ``k = 4`` contiguous class-disjoint folds; model ``f`` trains on the other three
and is validated (early stopping, model selection) on fold ``f``. As in powerful-benchmarker
(``metric-learning`` branch, ``split_managers/index_split_manager.py`` and
``class_disjoint_split_manager.py``, with ``configs/config_dataset/default.yaml``: ``test_size
0.5``, ``test_start_idx 0.5``, ``num_training_partitions 4``, no shuffling), which uses
scikit-learn's ``train_test_split(shuffle=False)`` and ``KFold(4)``:

* with ``C`` classes, the test half is the last ``⌈C/2⌉`` sorted classes, train+val the first
  ``⌊C/2⌋`` (CUB 100/100, Cars 98/98, SOP 11,317/11,317 — SOP's standard split is 11,318/11,316,
  so its class 11,318 moves to the test half);
* ``KFold``: contiguous folds of the train+val classes, the first ``n mod k`` of them one class
  larger (CUB 25 each, Cars 25/25/24/24, SOP 2,830/2,829/2,829/2,829).

Here the pool is a ``MetricDataset``'s train split followed by its test split (class ids of the
test split offset past the train split's): for the prepared data sets that is the original class
order (CUB/Cars classes 1–200/1–196, SOP's ``class_id``, train classes first), so the halves and
folds are MLRC's. Query/gallery data sets (In-Shop) are not part of MLRC and are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hdml_jax.data.base import MetricDataset, Split, SubsetSource, read_example, remap_labels
from hdml_jax.errors import UserError

NUM_FOLDS = 4  # num_training_partitions / num_training_sets (config_dataset/default.yaml)


class FoldError(UserError, ValueError):
    """A fold that does not exist, or a data set the MLRC split cannot be made of."""


@dataclasses.dataclass(frozen=True)
class ClassSplit:
    """Sorted class ids of MLRC's halves and folds (``folds[f]`` validates model ``f``)."""

    trainval: np.ndarray
    test: np.ndarray
    folds: tuple[np.ndarray, ...]

    def training_classes(self, fold: int) -> np.ndarray:
        """The classes model ``fold`` trains on: every train+val fold but its own."""
        return np.setdiff1d(self.trainval, self.folds[fold])


def class_split(classes: np.ndarray, num_folds: int = NUM_FOLDS) -> ClassSplit:
    """MLRC's halves and folds of the class ids ``classes`` (any order, duplicates allowed).

    ``train_test_split(shuffle=False, test_size=0.5)``: the first ``⌊C/2⌋`` sorted classes train
    and validate, the last ``⌈C/2⌉`` test. ``KFold(num_folds)``: fold ``f`` is the ``f``-th
    contiguous block of the train+val classes; the first ``n mod num_folds`` blocks have one
    class more.
    """
    unique = np.unique(np.asarray(classes))
    num_trainval = len(unique) // 2
    if num_folds < 2 or num_trainval < num_folds:
        raise FoldError(
            f"the MLRC split needs at least {2 * max(num_folds, 2)} classes for {num_folds} folds "
            f"of the first half, got {len(unique)} classes."
        )
    trainval, test = unique[:num_trainval], unique[num_trainval:]
    sizes = np.full(num_folds, num_trainval // num_folds)
    sizes[: num_trainval % num_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    folds = tuple(trainval[bounds[f] : bounds[f + 1]] for f in range(num_folds))
    return ClassSplit(trainval=trainval, test=test, folds=folds)


class ConcatSource:
    """Random access over several sources one after the other (picklable, for grain workers)."""

    def __init__(self, sources: list[Any]):
        self._sources = list(sources)
        self._offsets = np.cumsum([0, *(len(s) for s in self._sources)])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[Any, int]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples.")
        part = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self._sources[part], index - int(self._offsets[part])

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, position = self._locate(index)
        return source[position]

    def encoded(self, index: int) -> dict[str, Any]:
        """The example with its image still encoded when its source can (``base.py``)."""
        source, position = self._locate(index)
        return read_example(source, position, encoded=True)

    def __repr__(self) -> str:
        return f"ConcatSource({' + '.join(str(len(s)) for s in self._sources)})"


@dataclasses.dataclass(frozen=True)
class Pool:
    """Every example of a data set with a global class id (train classes first)."""

    name: str
    source: ConcatSource
    classes: np.ndarray  # (N,) int64
    coarse: np.ndarray | None  # (N,) int64 or None
    recall_ks: tuple[int, ...]

    @classmethod
    def of(cls, dataset: MetricDataset) -> Pool:
        if dataset.has_roles:
            raise FoldError(
                f"{dataset.name} is a query/gallery data set; the MLRC protocol is defined for "
                "self-retrieval data sets (CUB, Cars, SOP and their like)."
            )
        train, test = dataset.train, dataset.test
        classes = np.concatenate([train.labels, test.labels + train.num_classes]).astype(np.int64)
        coarse = None
        if train.coarse_labels is not None and test.coarse_labels is not None:
            coarse = np.concatenate([train.coarse_labels, test.coarse_labels]).astype(np.int64)
        source = ConcatSource([train.source, test.source])
        return cls(dataset.name, source, classes, coarse, tuple(dataset.recall_ks))

    def split_of(self, classes: np.ndarray, name: str) -> Split:
        """The examples of ``classes``, labels remapped to ``0..C-1`` in class order."""
        indices = np.flatnonzero(np.isin(self.classes, classes))
        labels = remap_labels(self.classes[indices])
        coarse = None if self.coarse is None else remap_labels(self.coarse[indices])
        return Split(
            source=SubsetSource(self.source, indices, labels, coarse),
            labels=labels,
            coarse_labels=coarse,
            name=f"{self.name}/{name}",
        )


def _check_fold(fold: int, num_folds: int) -> None:
    if isinstance(fold, bool) or not isinstance(fold, int | np.integer) or not 0 <= fold < num_folds:
        raise FoldError(f"fold must be an int in [0, {num_folds}), got {fold!r}.")


def fold_dataset(dataset: MetricDataset, fold: int, num_folds: int = NUM_FOLDS) -> MetricDataset:
    """Model ``fold``'s data: ``train`` = the other train+val folds, ``test`` = fold ``fold``
    (the validation split its training evaluates, early-stops and selects on)."""
    _check_fold(fold, num_folds)
    pool = Pool.of(dataset)
    split = class_split(pool.classes, num_folds)
    return MetricDataset(
        name=dataset.name,
        train=pool.split_of(split.training_classes(fold), f"mlrc_train{fold}"),
        test=pool.split_of(split.folds[fold], f"mlrc_val{fold}"),
        recall_ks=pool.recall_ks,
    )


def test_half(dataset: MetricDataset, num_folds: int = NUM_FOLDS) -> MetricDataset:
    """The MLRC test half as ``test`` (``train``: all train+val classes, for the record)."""
    pool = Pool.of(dataset)
    split = class_split(pool.classes, num_folds)
    return MetricDataset(
        name=dataset.name,
        train=pool.split_of(split.trainval, "mlrc_trainval"),
        test=pool.split_of(split.test, "mlrc_test"),
        recall_ks=pool.recall_ks,
    )
