"""Whether a data set is large enough for the configured batches and evaluation, checked before
anything is built or written.

A small data set of one's own (a CSV of 48 images) meets recipes written for CUB (batch 120,
P×K = 32×4). Found late, each mismatch is a traceback from a sampler inside the trainer, after
the model has been built; found here, it is one ``error:`` line that names the field to set and
a value that works, and the workdir is not touched.
"""

from __future__ import annotations

import ml_collections

from hdml_jax.data.base import MetricDataset, Split
from hdml_jax.errors import ConfigError
from hdml_jax.evaluation.query_gallery import count_unmatched_queries, unmatched_note


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


def check_evaluation_fits(dataset: MetricDataset) -> str | None:
    """Evaluation must be able to score something: Recall@K and MAP@R need queries that have a
    correct answer among the other gallery images. Raises ``ConfigError`` when none has one;
    returns the one-line note about the queries left out of the scores (None: every query scores).
    """
    if len(dataset.test) == 0:
        raise ConfigError(
            f"{dataset.name}: the evaluation split is empty; give it images of classes that are not "
            "in the training split (CSV rows with split=validation)."
        )
    is_query, is_gallery = dataset.roles()
    unmatched, queries = count_unmatched_queries(dataset.test.labels, is_query, is_gallery)
    if queries == 0:
        raise ConfigError(f"{dataset.name}: no evaluation row is a query; mark some rows is_query=True.")
    if unmatched == queries:
        what = "a gallery image of its class" if dataset.has_roles else "another image of its class"
        raise ConfigError(
            f"{dataset.name}: none of the {queries} evaluation queries has {what}, so Recall@K and "
            "MAP@R cannot score any: give each evaluation class at least 2 images "
            + ("(or mark some of them is_gallery)." if dataset.has_roles else "(split=validation rows).")
        )
    return unmatched_note(unmatched, queries)


def check_dataset_fits(config: ml_collections.ConfigDict, dataset: MetricDataset, num_devices: int) -> str | None:
    """``check_batches_fit`` on the training split, then ``check_evaluation_fits`` (its note)."""
    check_batches_fit(config, dataset.train, num_devices)
    return check_evaluation_fits(dataset)
