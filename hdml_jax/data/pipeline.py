"""The input pipeline on grain: process-local slices of deterministic global batches.

Design: a batch is a pure function of the global step. The sampler is random access
(``sampler.batch_indices(step)``) and the augmentation generator of every example is keyed by
``(seed, step, position in the global batch)``, so

    batch(step) = transform(source[sampler.batch_indices(step)], rng(seed, step, position))

needs no state but the step. The pipeline is ``grain.MapDataset.range(start, ...)`` mapped
with ``_TrainBatchLoader`` (one element = one process-local batch), turned into an
``IterDataset`` with a background prefetch thread, and with ``num_workers > 0`` spread over
grain's multiprocessing workers (``mp_prefetch``: worker ``w`` computes the steps ``≡ w`` mod
``num_workers``, batches come back in step order through shared memory). Consequences:

* The same batches for any ``num_workers`` and any thread count (one element is a whole batch,
  so grain's per-worker slicing never changes which examples form a batch).
* The iterator state is ``{"step": n, ...}`` (JSON). ``set_state`` rebuilds the grain pipeline
  from step ``n``; resuming mid-epoch is exact, and the worker count may differ on resume.
  (grain's own iterator state would also work but is tied to the worker count and to grain's
  internal layout; a step is enough here.)
* Multi-host: every process computes the same global indices and loads only its contiguous
  rows ``[p·B/n, (p+1)·B/n)``, exactly what ``jax.make_array_from_process_local_data`` expects
  for a batch sharded along its first axis. The process count may also change on resume.

Batches are ``uint8`` images (normalised on device, see ``transforms``)::

    {"image": uint8 (B_local, S, S, 3), "label": int32 (B_local,),
     "coarse_label": int32 (B_local,)  (when the split has coarse labels),
     "index": int64 (B_local,)  dataset index of every row (-1 for eval padding),
     "mask": bool (B_local,)  (eval only: False for padding)}

The source (and the transform) are pickled into each worker process (grain starts workers
with ``spawn``), so with ``num_workers > 0`` they must be picklable and cheap to copy (e.g. a
file- or tfds-backed source, not gigabytes of decoded images).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from hdml_jax.data.base import Split, read_example
from hdml_jax.data.sampling import Sampler
from hdml_jax.data.transforms import ImageTransform

_TAG_AUGMENT = 7  # key of the per-example augmentation stream (distinct from the samplers' tags)
_STATE_VERSION = 1

Transform = Callable[..., np.ndarray]
"""``transform(image uint8 (H, W, 3), rng: Generator | None, bbox=...) -> uint8 (S, S, 3)``.

An ``ImageTransform`` also takes encoded images: the loader then reads ``source.encoded(i)``
when the source has it (see ``base.py``), so JPEGs decode inside the transform, at a reduced
scale when the crop allows; any other callable gets ``source[i]`` (pixels).
"""


def augmentation_rng(seed: int, step: int, position: int) -> np.random.Generator:
    """The generator of global batch row ``position`` at ``step`` (independent of sharding/workers)."""
    return np.random.default_rng(
        np.random.SeedSequence([int(seed) % (1 << 64), _TAG_AUGMENT, step, position])
    )


def _ensure_absl_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags; outside ``absl.app.run`` mark them parsed (defaults)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
    """Grain workers share the terminal's process group, so Ctrl-C reaches them too: they ignore
    it (no ``KeyboardInterrupt`` traceback from each) and leave stopping to the trainer, which
    checkpoints and then shuts them down."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _multiprocess(dataset: grain.MapDataset, num_workers: int, prefetch: int) -> grain.IterDataset:
    """``dataset`` computed in ``num_workers`` grain processes (worker w: elements ≡ w mod n), in order."""
    _ensure_absl_flags_parsed()
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # each worker computes sequentially
    options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch)
    return dataset.to_iter_dataset(read).mp_prefetch(options, worker_init_fn=_ignore_ctrl_c)


def _own(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Plain NumPy copies of a batch that may live in grain's shared memory (freed right away)."""
    return {key: np.array(value) for key, value in batch.items()}


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_index, process_count = int(process_index), int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must lie in [0, process_count={process_count}).")
    return process_index, process_count


def _local_rows(batch_size: int, process_index: int, process_count: int, what: str) -> tuple[int, int]:
    """``[lo, hi)``: this process's contiguous rows of a global batch of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"{what} must be >= 1, got {batch_size}.")
    if batch_size % process_count:
        raise ValueError(
            f"{what} {batch_size} is not divisible by the {process_count} processes: every process "
            "must load the same number of rows."
        )
    local = batch_size // process_count
    return process_index * local, (process_index + 1) * local


def _output_shape(transform: Transform, split: Split) -> tuple[int, int, int]:
    """``(S, S, 3)``: from ``transform.size`` or, failing that, by transforming example 0."""
    size = getattr(transform, "size", None)
    if size is not None:
        return (int(size), int(size), 3)
    if len(split) == 0:
        raise ValueError(f"{split.name or 'split'} is empty.")
    example = split.source[0]
    return tuple(np.shape(_apply(transform, example, augmentation_rng(0, 0, 0))))


def _apply(transform: Transform, example: dict[str, Any], rng: np.random.Generator | None) -> np.ndarray:
    bbox = example.get("bbox")
    if bbox is None:
        return transform(example["image"], rng)
    return transform(example["image"], rng, bbox=bbox)


@dataclasses.dataclass(frozen=True, eq=False)
class _BatchLoader:
    """Loads and transforms rows of a global batch (shared by train and eval)."""

    split: Split
    transform: Transform
    image_shape: tuple[int, int, int]

    def load(
        self, indices: np.ndarray, rngs: list[np.random.Generator | None], valid: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Rows for dataset ``indices (b,)``; rows with ``valid`` False stay zero (label -1)."""
        b = len(indices)
        valid = np.ones(b, bool) if valid is None else valid
        images = np.zeros((b, *self.image_shape), np.uint8)
        safe = np.where(valid, indices, 0)
        labels = np.where(valid, self.split.labels[safe], -1).astype(np.int32)
        encoded = isinstance(self.transform, ImageTransform)
        for row in np.flatnonzero(valid):
            index = int(indices[row])
            example = read_example(self.split.source, index, encoded=encoded)
            image = _apply(self.transform, example, rngs[row])
            if image.shape != self.image_shape or image.dtype != np.uint8:
                raise ValueError(
                    f"{self.split.name or 'split'}[{index}]: the transform returned {image.dtype} "
                    f"{image.shape}, expected uint8 {self.image_shape}."
                )
            images[row] = image
        batch = {"image": images, "label": labels, "index": np.where(valid, indices, -1).astype(np.int64)}
        if self.split.coarse_labels is not None:
            batch["coarse_label"] = np.where(valid, self.split.coarse_labels[safe], -1).astype(np.int32)
        return batch


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainBatchLoader:
    """``step -> (step, process-local batch)``; picklable, pure."""

    loader: _BatchLoader
    sampler: Sampler
    seed: int
    global_batch_size: int
    rows: tuple[int, int]

    def global_indices(self, step: int) -> np.ndarray:
        """``(global_batch_size,)``: the concatenated sampler batches of this step."""
        per_step = self.global_batch_size // self.sampler.batch_size
        parts = [self.sampler.batch_indices(step * per_step + r) for r in range(per_step)]
        return np.concatenate(parts) if per_step > 1 else parts[0]

    def __call__(self, step: int) -> tuple[int, dict[str, np.ndarray]]:
        step = int(step)
        lo, hi = self.rows
        indices = self.global_indices(step)[lo:hi]
        rngs = [augmentation_rng(self.seed, step, position) for position in range(lo, hi)]
        return step, self.loader.load(indices, rngs)


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Infinite iterator of process-local training batches with a JSON state ``{"step": n, ...}``.

    The grain pipeline (and its worker processes) starts on the first ``next`` and restarts
    after ``set_state``. Call ``close()`` (or use ``with``) to stop the workers early.
    """

    def __init__(self, loader: _TrainBatchLoader, *, num_workers: int, num_threads: int, prefetch: int):
        self._loader = loader
        self._num_workers = num_workers
        self._num_threads = num_threads
        self._prefetch = prefetch
        self._step = 0
        self._iterator = None

    @property
    def step(self) -> int:
        """The global step of the next batch."""
        return self._step

    def _start(self):
        dataset = grain.MapDataset.range(self._step, sys.maxsize // 2).map(self._loader)
        if self._num_workers > 0:
            return iter(_multiprocess(dataset, self._num_workers, self._prefetch))
        read = grain.ReadOptions(
            num_threads=self._num_threads, prefetch_buffer_size=self._prefetch * self._num_threads
        )
        return iter(dataset.to_iter_dataset(read))

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start()
        step, batch = next(self._iterator)
        if step != self._step:  # pragma: no cover (would be a grain ordering bug)
            raise RuntimeError(f"input pipeline out of order: got step {step}, expected {self._step}.")
        self._step += 1
        return _own(batch) if self._num_workers > 0 else batch

    def get_state(self) -> dict[str, int]:
        """JSON-serialisable position: the next step plus what must match on restore."""
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "seed": self._loader.seed,
            "global_batch_size": self._loader.global_batch_size,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state["step"]`` (from ``get_state``, possibly of another process count)."""
        for key in ("seed", "global_batch_size"):
            if key in state and int(state[key]) != getattr(self._loader, key):
                raise ValueError(
                    f"the saved data state has {key}={state[key]} but this pipeline has "
                    f"{getattr(self._loader, key)}: resuming would not reproduce the batches."
                )
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"invalid data state step {step}.")
        self.close()
        self._step = step

    def close(self) -> None:
        """Stop the prefetch thread / worker processes (restarted by the next ``next``)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def train_iterator(
    split: Split,
    *,
    sampler: Sampler,
    transform: Transform,
    global_batch_size: int,
    seed: int,
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 1,
    prefetch: int = 2,
) -> TrainIterator:
    """Process-local slices of the global training batches, forever.

    Global batch ``step`` is ``sampler.batch_indices(step)`` (or, when ``global_batch_size`` is
    ``m`` times the sampler's batch size, the sampler batches ``m·step .. m·step + m - 1``
    concatenated); process ``p`` of ``n`` receives rows ``[p·B/n, (p+1)·B/n)``.

    Args:
      split: the training split.
      sampler: a ``PKSampler`` / ``ShuffleSampler`` (anything with ``batch_size`` and
        ``batch_indices(step)``).
      transform: ``transform(image, rng, bbox=...) -> uint8 (S, S, 3)``, e.g.
        ``transforms.TRANSFORMS["proxy_anchor"](224).train``.
      global_batch_size: ``B``, a multiple of the sampler's batch size and of ``process_count``.
      seed: augmentation seed (the sampler has its own).
      num_workers: grain worker processes (0: in this process, on ``num_threads`` threads).
      process_index, process_count: this host among all; default ``jax.process_index()`` and
        ``jax.process_count()``.
      num_threads: with ``num_workers == 0``, threads loading batches in the background
        (0: synchronous, in ``next``).
      prefetch: batches kept ready per worker (per thread without workers).

    Returns:
      A ``TrainIterator``: ``next(it)`` → ``{"image": uint8 (B/n, S, S, 3), "label": int32 (B/n,),
      "index": int64 (B/n,), "coarse_label"?: int32 (B/n,)}``; ``get_state()`` / ``set_state()``.
    """
    process_index, process_count = _process_defaults(process_index, process_count)
    global_batch_size = int(global_batch_size)
    rows = _local_rows(global_batch_size, process_index, process_count, "global_batch_size")
    if global_batch_size % sampler.batch_size:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not a multiple of the sampler's batch size "
            f"{sampler.batch_size} ({sampler!r}); with a PKSampler the batch size must be a multiple of P×K."
        )
    if num_workers < 0 or num_threads < 0 or prefetch < 1:
        raise ValueError(
            f"need num_workers >= 0, num_threads >= 0, prefetch >= 1; got {num_workers}, {num_threads}, {prefetch}."
        )
    loader = _BatchLoader(split, transform, _output_shape(transform, split))
    train_loader = _TrainBatchLoader(loader, sampler, int(seed), global_batch_size, rows)
    return TrainIterator(
        train_loader, num_workers=int(num_workers), num_threads=int(num_threads), prefetch=int(prefetch)
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _EvalBatchLoader:
    """``batch number -> process-local eval batch`` (padded rows masked out)."""

    loader: _BatchLoader
    batch_size: int
    rows: tuple[int, int]

    def __call__(self, number: int) -> dict[str, np.ndarray]:
        lo, hi = self.rows
        indices = int(number) * self.batch_size + np.arange(lo, hi, dtype=np.int64)
        valid = indices < len(self.loader.split)
        batch = self.loader.load(indices, [None] * len(indices), valid)
        batch["mask"] = valid
        return batch


class EvalBatches:
    """Re-iterable, sized: every example once, in order, the last global batch padded.

    Every process yields ``len(self)`` batches of ``batch_size / process_count`` rows.
    """

    def __init__(self, loader: _EvalBatchLoader, *, num_workers: int, num_threads: int, prefetch: int):
        self._loader = loader
        self._num_workers = num_workers
        self._num_threads = num_threads
        self._prefetch = prefetch

    def __len__(self) -> int:
        return math.ceil(len(self._loader.loader.split) / self._loader.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if len(self) == 0:
            return
        dataset = grain.MapDataset.range(len(self)).map(self._loader)
        if self._num_workers > 0:
            dataset = _multiprocess(dataset, self._num_workers, self._prefetch)
        else:
            dataset = dataset.to_iter_dataset(
                grain.ReadOptions(
                    num_threads=self._num_threads, prefetch_buffer_size=self._prefetch * self._num_threads
                )
            )
        iterator = iter(dataset)
        try:
            for batch in iterator:
                yield _own(batch) if self._num_workers > 0 else batch
        finally:
            if hasattr(iterator, "close"):
                iterator.close()


def eval_batches(
    split: Split,
    *,
    transform: Transform,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    num_threads: int = 1,
    prefetch: int = 2,
) -> EvalBatches:
    """Every example of ``split`` exactly once, in order, in padded global batches.

    Global batch ``g`` holds examples ``[g·B, (g+1)·B)``; rows past the end are padding (zero
    image, label -1, index -1, ``mask`` False). Process ``p`` of ``n`` gets rows
    ``[p·B/n, (p+1)·B/n)`` of each global batch, and every process yields ``ceil(N / B)`` batches,
    so all of them run the same number of steps.

    Args:
      split: the evaluation split.
      transform: deterministic (``rng`` is None), e.g. ``TRANSFORMS["proxy_anchor"](224).eval``.
      batch_size: global ``B``, divisible by ``process_count``.
      process_index, process_count: default ``jax.process_index()``, ``jax.process_count()``.
      num_workers, num_threads, prefetch: as in ``train_iterator``.

    Returns:
      ``EvalBatches`` yielding ``{"image": uint8 (B/n, S, S, 3), "label": int32, "mask": bool,
      "index": int64, "coarse_label"?: int32}`` (all ``(B/n,)`` but the image).
    """
    process_index, process_count = _process_defaults(process_index, process_count)
    batch_size = int(batch_size)
    rows = _local_rows(batch_size, process_index, process_count, "batch_size")
    if num_workers < 0 or num_threads < 0 or prefetch < 1:
        raise ValueError(
            f"need num_workers >= 0, num_threads >= 0, prefetch >= 1; got {num_workers}, {num_threads}, {prefetch}."
        )
    loader = _BatchLoader(split, transform, _output_shape(transform, split))
    return EvalBatches(
        _EvalBatchLoader(loader, batch_size, rows),
        num_workers=int(num_workers),
        num_threads=int(num_threads),
        prefetch=int(prefetch),
    )
