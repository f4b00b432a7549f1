"""Whether a data set is large enough for the configured batches and evaluation, checked before
anything is built or written.

A small data set of one's own (a CSV of 48 images) meets recipes written for CUB (batch 120,
P×K = 32×4). Found late, each mismatch is a traceback from a sampler inside the trainer, after
the model has been built; found here, it is one ``error:`` line that names the field to set and
a value that works, and the workdir is not touched.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from hdml_jax.data.base import MetricDataset, Split
from hdml_jax.errors import ConfigError


def _largest_multiple(limit: int, factor: int) -> int:
    """The largest multiple of ``factor`` that is at most ``limit`` (0 when there is none)."""
    return (limit // factor) * factor


def check_batches_fit(config: ml_collections.ConfigDict, train: Split, num_devices: int) -> None:
    """The training batches: a shuffled batch of ``batch_size`` images, or ``P×K`` with ``P``
    distinct classes, must exist in ``train``; the batch splits evenly over ``num_devices``.

    Raises ``ConfigError`` naming the field to set and the largest value that fits.
    """
    where = f"the {len(train)} training images ({train.num_classes} classes)"
    if config.batch_size % num_devices:
        raise ConfigError(
            f"batch_size {config.batch_size} must be a multiple of the {num_devices} devices: set "
            f"--config.batch_size={max(num_devices, _largest_multiple(config.batch_size, num_devices))}."
        )
    if config.eval_batch_size % num_devices:
        raise ConfigError(
            f"eval_batch_size {config.eval_batch_size} must be a multiple of the {num_devices} devices: "
            f"set --config.eval_batch_size={max(num_devices, _largest_multiple(config.eval_batch_size, num_devices))}."
        )
    if config.sampler == "pk":
        classes, per_class = int(config.classes_per_batch), int(config.samples_per_class)
        if classes <= train.num_classes:
            return
        # The largest P that exists and keeps P×K a multiple of the devices.
        fitting = [p for p in range(train.num_classes, 0, -1) if (p * per_class) % num_devices == 0]
        if not fitting:
            raise ConfigError(
                f"a P×K batch needs classes_per_batch (P) = {classes} distinct classes, but {where} "
                f"have {train.num_classes}, and no smaller P makes P×{per_class} a multiple of the "
                f"{num_devices} devices: train on fewer devices or on more classes."
            )
        p = fitting[0]
        raise ConfigError(
            f"a P×K batch needs classes_per_batch (P) = {classes} distinct classes, but {where} have "
            f"{train.num_classes}: set --config.classes_per_batch={p} --config.batch_size={p * per_class} "
            f"(P×K with K = samples_per_class = {per_class})."
        )
    if config.batch_size > len(train):
        fitting = _largest_multiple(len(train), num_devices)
        if fitting == 0:
            raise ConfigError(
                f"batch_size {config.batch_size} exceeds {where}, and the {num_devices} devices need "
                f"at least {num_devices} images per batch: train on fewer devices or on more images."
            )
        raise ConfigError(
            f"batch_size {config.batch_size} exceeds {where}: every step takes a full batch. Set "
            f"--config.batch_size={fitting} or lower"
            + (f" (a multiple of the {num_devices} devices)." if num_devices > 1 else ".")
        )


def _scorable_queries(query: Split, gallery: Split | None) -> int:
    """How many queries have a correct answer to retrieve: another image of their class (self-
    retrieval, ``gallery=None``) or a gallery image of their class."""
    query_labels = np.asarray(query.labels)
    if gallery is None:
        _, inverse, counts = np.unique(query_labels, return_inverse=True, return_counts=True)
        return int(np.sum(counts[inverse] >= 2))
    return int(np.isin(query_labels, np.asarray(gallery.labels)).sum())


def check_evaluation_fits(dataset: MetricDataset) -> None:
    """Evaluation must be able to score something: Recall@K and MAP@R need queries that have a
    correct answer among the other images. Raises ``ConfigError`` when none has one."""
    if dataset.query is not None and dataset.gallery is not None:
        query, gallery, what = dataset.query, dataset.gallery, "a gallery image of its class"
    else:
        query, gallery, what = dataset.test, None, "another image of its class"
    if len(query) == 0:
        raise ConfigError(
            f"{dataset.name}: the evaluation split is empty; give it images of classes that are not "
            "in the training split (CSV rows with split=validation)."
        )
    if _scorable_queries(query, gallery) == 0:
        raise ConfigError(
            f"{dataset.name}: none of the {len(query)} evaluation queries has {what}, so Recall@K and "
            "MAP@R cannot score any: give each evaluation class at least 2 images "
            + ("(or mark some of them is_gallery)." if gallery is not None else "(split=validation rows).")
        )


def check_dataset_fits(config: ml_collections.ConfigDict, dataset: MetricDataset, num_devices: int) -> None:
    """``check_batches_fit`` on the training split, then ``check_evaluation_fits``."""
    check_batches_fit(config, dataset.train, num_devices)
    check_evaluation_fits(dataset)
