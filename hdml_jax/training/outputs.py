"""A finished run's files: ``final_metrics.json``, the embeddings, the projector and the three pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hdml_jax import interrupts, storage
from hdml_jax.data.base import MetricDataset
from hdml_jax.evaluation import projector, visualize
from hdml_jax.training import checkpoints, optim
from hdml_jax.workdir import atomic_write, atomic_write_text


def write_outputs(
    workdir: storage.AnyPath,
    config,
    dataset: MetricDataset,
    final: dict[str, float],
    embeddings,
    step: int,
    evaluations: list[dict[str, Any]],
    stopped_early: bool = False,
) -> None:
    """final_metrics.json, embeddings, the projector's files and the three pictures; each atomic
    (in a remote ``workdir``: written locally, then uploaded whole; ``hdml_jax.storage``).

    ``final_metrics.json`` holds the last evaluation at the top level (``step``, ``epoch`` and the
    metrics) and, under ``best``, the evaluation with the highest ``config.best_metric`` among
    ``evaluations`` (the run's, the last included; ``best_by`` names the metric). The official
    Proxy-Anchor and CGD scripts evaluate on the test split after every epoch and report that
    best epoch; the last one is the number free of selection on the test set. It is written
    last: its presence marks the run complete (``stopped_early``: complete before ``num_steps``,
    by ``early_stopping_patience_epochs``).
    """
    steps_per_epoch = optim.steps_per_epoch(config, len(dataset.train))
    last = {"step": step, "epoch": step / steps_per_epoch, **final}
    best = checkpoints.best_evaluation(evaluations, config.best_metric) or last

    def save_array(name: str, values: np.ndarray) -> None:
        atomic_write(workdir / name, lambda tmp: np.save(tmp, values))

    save_array("test_embeddings.npy", embeddings["test"])
    save_array("test_labels.npy", dataset.test.labels)
    for name in ("query", "gallery"):
        if name in embeddings:
            save_array(f"{name}_embeddings.npy", embeddings[name])
            save_array(f"{name}_labels.npy", getattr(dataset, name).labels)
    interrupts.stop_point()
    test = dataset.test  # TensorBoard's PROJECTOR tab; the sprite of images only with pictures
    images = (lambda i: test.source[i]["image"]) if config.pictures else None
    projector.write_projector(
        workdir, embeddings["test"], test.labels, test.coarse_labels, images, seed=config.seed
    )
    if config.pictures:
        interrupts.stop_point()
        atomic_write(
            workdir / "tsne.png",
            lambda tmp: visualize.plot_tsne(
                tmp,
                embeddings["test"],
                dataset.test.labels,
                dataset.test.coarse_labels,
                jax.random.PRNGKey(config.seed),
                max_points=config.tsne_max_points,
            ),
        )
        interrupts.stop_point()
        atomic_write(
            workdir / "retrieval.png", lambda tmp: write_retrieval_picture(tmp, dataset, embeddings, config)
        )
        atomic_write(
            workdir / "curves.png", lambda tmp: visualize.plot_curves(tmp, workdir / "metrics.jsonl")
        )
    summary = {**last, "best": best, "best_by": config.best_metric}
    if stopped_early:
        summary["stopped_early"] = True
    atomic_write_text(workdir / "final_metrics.json", json.dumps(summary, indent=2) + "\n")


def write_retrieval_picture(path: Path, dataset: MetricDataset, embeddings, config) -> None:
    """``retrieval.png`` of a run: ``plot_retrieval_examples`` on its test rows."""
    is_query, is_gallery = dataset.roles()
    from hdml_jax.evaluation.ranking import curvature_of

    visualize.plot_retrieval_examples(
        path,
        dataset.test,
        embeddings["test"],
        is_query,
        is_gallery,
        seed=config.seed,
        curvature=curvature_of(config),
    )
