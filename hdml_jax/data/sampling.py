"""Batch samplers as pure functions of ``(seed, step)``: random access, so resuming is exact.

A sampler maps a global step to the dataset indices of that step's global batch::

    sampler.batch_indices(step) -> (sampler.batch_size,) int64

with no hidden state: the same ``(seed, step)`` always gives the same batch, in any process
and in any data-loading worker, and step ``n`` can be computed without computing steps
``0..n-1``. The input pipeline (``pipeline.train_iterator``) only has to remember the step.

* ``PKSampler``: P classes × K images per batch (the usual metric-learning batch).
* ``ShuffleSampler``: a plain shuffled pass over the examples, one permutation per epoch.
* ``UniqueClassSampler``: HIER's batches, ``P`` classes drawn afresh for every batch and ``K``
  images of each drawn with replacement.

Random numbers come from ``numpy.random.default_rng(SeedSequence([seed, tag, ...]))``, keyed by
the epoch (permutations) or the step (within-batch draws), so every piece is reproducible on its
own.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

# Distinct streams of random numbers derived from the same seed.
_TAG_CLASS_PERMUTATION = 0
_TAG_CLASS_FILL = 1
_TAG_WITHIN_CLASS = 2
_TAG_SHUFFLE = 3
_TAG_UNIQUE_CLASS = 4


def _rng(seed: int, *key: int) -> np.random.Generator:
    """A generator keyed by ``(seed, *key)`` (non-negative ints; the seed is taken mod 2**64)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 64), *map(int, key)]))


def _epoch_permutation(
    cache: tuple[int, np.ndarray] | None, seed: int, tag: int, epoch: int, size: int
) -> tuple[int, np.ndarray]:
    """``(epoch, permutation of range(size))``, reusing ``cache`` when it is for ``epoch``.

    Callers read their cache attribute once and store the returned tuple whole, so threads that
    share a sampler never see a permutation paired with the wrong epoch.
    """
    if cache is not None and cache[0] == epoch:
        return cache
    return epoch, _rng(seed, tag, epoch).permutation(size)


def _check_step(step: int) -> int:
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    return step


class Sampler(Protocol):
    """What the pipeline needs from a sampler."""

    @property
    def batch_size(self) -> int:
        """Examples per sampled batch."""
        ...

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one sampler epoch (the unit the permutations are drawn for)."""
        ...

    def batch_indices(self, step: int) -> np.ndarray:
        """``(batch_size,)`` int64 dataset indices of batch ``step`` (a pure function of seed, step)."""
        ...


class _ClassBatches:
    """What the class-wise samplers share: the checked ``P``, ``K`` and seed, and an index of
    every class's members (``_order[_offsets[c]:_offsets[c + 1]]``, dataset indices ascending)."""

    def __init__(self, labels: np.ndarray, *, classes_per_batch: int, samples_per_class: int, seed: int = 0):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}.")
        classes_per_batch, samples_per_class = int(classes_per_batch), int(samples_per_class)
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class (K) must be >= 1, got {samples_per_class}.")
        if classes_per_batch < 1:
            raise ValueError(f"classes_per_batch (P) must be >= 1, got {classes_per_batch}.")
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.seed = int(seed)
        self.num_examples = len(labels)
        self.classes, counts = np.unique(labels, return_counts=True)  # (C,) the label values
        self._order = np.argsort(labels, kind="stable").astype(np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.samples_per_class


class PKSampler(_ClassBatches):
    """Batches of ``P`` distinct classes × ``K`` images each, as a pure function of ``(seed, step)``.

    Classes: an epoch is one pass over a random permutation of the ``C`` classes (drawn from
    ``(seed, epoch)``), ``P`` consecutive classes per batch, so ``steps_per_epoch = ceil(C / P)``
    and every class appears once per epoch. When ``P`` does not divide ``C``, the last batch of
    the epoch holds the ``C mod P`` remaining classes plus ``P - C mod P`` other classes drawn
    without replacement from the rest of the epoch, so that batch still has ``P`` distinct classes
    (each class then appears once or twice per epoch).

    Images: a class with at least ``K`` images contributes ``K`` distinct images (drawn without
    replacement). A class with ``n < K`` images is sampled with replacement, balanced: each of
    its images ``floor(K / n)`` or ``ceil(K / n)`` times. Image draws are keyed by ``(seed, step)``.

    Batch layout: ``(P·K,)`` indices, the ``K`` images of a class adjacent (class-major), the
    classes in permutation order.

    Args:
      labels: ``(N,)`` integer class of every example (any integer values).
      classes_per_batch: ``P``, at most the number of distinct classes.
      samples_per_class: ``K >= 1``.
      seed: any int.
    """

    def __init__(self, labels: np.ndarray, *, classes_per_batch: int, samples_per_class: int, seed: int = 0):
        super().__init__(
            labels, classes_per_batch=classes_per_batch, samples_per_class=samples_per_class, seed=seed
        )
        if self.classes_per_batch > self.num_classes:
            raise ValueError(
                f"classes_per_batch (P) = {self.classes_per_batch} exceeds the {self.num_classes} classes of "
                "the split: a P×K batch needs P distinct classes. Lower classes_per_batch."
            )
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_classes / self.classes_per_batch)

    def class_counts(self) -> np.ndarray:
        """``(C,)`` images per class, in the order of ``self.classes``."""
        return np.diff(self._offsets)

    def _class_permutation(self, epoch: int) -> np.ndarray:
        """``(C,)`` class positions (0..C-1) in the order of ``epoch``; the last one is cached."""
        cache = _epoch_permutation(self._cache, self.seed, _TAG_CLASS_PERMUTATION, epoch, self.num_classes)
        self._cache = cache
        return cache[1]

    def batch_classes(self, step: int) -> np.ndarray:
        """``(P,)`` distinct class positions (indices into ``self.classes``) of batch ``step``."""
        epoch, within = divmod(_check_step(step), self.steps_per_epoch)
        permutation = self._class_permutation(epoch)
        p = self.classes_per_batch
        chosen = permutation[within * p : (within + 1) * p]
        if len(chosen) < p:  # the last, short batch of the epoch: fill with other classes
            fill_rng = _rng(self.seed, _TAG_CLASS_FILL, epoch)
            fill = fill_rng.choice(permutation[: within * p], p - len(chosen), replace=False)
            chosen = np.concatenate([chosen, fill])
        return chosen

    def batch_indices(self, step: int) -> np.ndarray:
        """``(P·K,)`` int64 dataset indices of batch ``step``, class-major."""
        step = _check_step(step)
        k = self.samples_per_class
        rng = _rng(self.seed, _TAG_WITHIN_CLASS, step)
        out = np.empty(self.batch_size, np.int64)
        for slot, c in enumerate(self.batch_classes(step)):
            members = self._order[self._offsets[c] : self._offsets[c + 1]]
            n = len(members)
            if n >= k:
                picks = rng.choice(n, k, replace=False)
            else:  # every image floor(K/n) times, then K mod n distinct extra ones
                picks = np.concatenate(
                    [np.tile(rng.permutation(n), k // n), rng.choice(n, k % n, replace=False)]
                )
                picks = picks[rng.permutation(k)]
            out[slot * k : (slot + 1) * k] = members[picks]
        return out

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def __repr__(self) -> str:
        return (
            f"PKSampler(P={self.classes_per_batch}, K={self.samples_per_class}, classes={self.num_classes}, "
            f"seed={self.seed})"
        )


class ShuffleSampler:
    """Shuffled batches, one permutation of the examples per epoch, a pure function of ``(seed, step)``.

    With ``drop_remainder=True`` (training) an epoch is ``N // B`` full batches and the last
    ``N mod B`` examples of each permutation are skipped (different ones every epoch). With
    ``drop_remainder=False`` an epoch is ``ceil(N / B)`` batches and the last one is completed
    with the first examples of the same permutation, so every batch still has ``B`` indices and
    every example appears at least once per epoch.

    Args:
      num_examples: ``N``.
      batch_size: ``B``.
      seed: any int.
      drop_remainder: see above.
    """

    def __init__(self, num_examples: int, *, batch_size: int, seed: int = 0, drop_remainder: bool = True):
        num_examples, batch_size = int(num_examples), int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if num_examples < 1:
            raise ValueError("cannot sample from an empty split.")
        if drop_remainder and num_examples < batch_size:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {num_examples} examples: with drop_remainder=True "
                "there would be no batch at all. Lower batch_size or set drop_remainder=False."
            )
        self.num_examples = num_examples
        self._batch_size = batch_size
        self.seed = int(seed)
        self.drop_remainder = drop_remainder
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_remainder:
            return self.num_examples // self._batch_size
        return math.ceil(self.num_examples / self._batch_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        cache = _epoch_permutation(self._cache, self.seed, _TAG_SHUFFLE, epoch, self.num_examples)
        self._cache = cache
        return cache[1]

    def batch_indices(self, step: int) -> np.ndarray:
        """``(B,)`` int64 dataset indices of batch ``step``."""
        epoch, within = divmod(_check_step(step), self.steps_per_epoch)
        permutation = self._permutation(epoch)
        positions = np.arange(within * self._batch_size, (within + 1) * self._batch_size)
        return permutation[positions % self.num_examples].astype(np.int64)

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def __repr__(self) -> str:
        return (
            f"ShuffleSampler(N={self.num_examples}, B={self._batch_size}, seed={self.seed}, "
            f"drop_remainder={self.drop_remainder})"
        )


class UniqueClassSampler(_ClassBatches):
    """HIER's ``UniqueClassSampler`` (tjddus9597/HIER-CVPR23 hier/sampler.py:60-111) as a pure
    function of ``(seed, step)``.

    Every batch draws its ``P`` classes afresh, without replacement (with replacement only when
    ``P`` exceeds the number of classes ``C``, as there), then ``K`` images of each class *with*
    replacement (``np.random.choice(..., K, replace=True)``: a class's two images may be the same
    one). An epoch is ``N // (P·K)`` batches (``len(targets) // (world_size · batch_size)``);
    unlike ``PKSampler`` it does not cycle through the classes. Batches are class-major, as
    HIER's (its SupCon reshapes them to ``(P, K, d)``). The draws are ours (keyed by the step),
    not HIER's NumPy seeds, so the batches differ from its run's but follow the same law.
    """

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.num_examples // self.batch_size)

    def batch_classes(self, step: int) -> np.ndarray:
        """``(P,)`` class positions (indices into ``self.classes``) of batch ``step``."""
        rng = _rng(self.seed, _TAG_UNIQUE_CLASS, _check_step(step), 0)
        p = self.classes_per_batch
        return rng.choice(self.num_classes, p, replace=p > self.num_classes)

    def batch_indices(self, step: int) -> np.ndarray:
        """``(P·K,)`` int64 dataset indices of batch ``step``, class-major."""
        rng = _rng(self.seed, _TAG_UNIQUE_CLASS, _check_step(step), 1)
        classes = self.batch_classes(step)
        first, count = self._offsets[classes], np.diff(self._offsets)[classes]
        picks = rng.integers(0, count[:, None], (len(classes), self.samples_per_class))
        return self._order[first[:, None] + picks].reshape(-1)

    def __repr__(self) -> str:
        return (
            f"UniqueClassSampler(P={self.classes_per_batch}, K={self.samples_per_class}, "
            f"classes={self.num_classes}, seed={self.seed})"
        )
