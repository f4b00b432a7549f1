"""Embeddings of an evaluation split → retrieval metrics, the way the papers report them.

* Self-retrieval (CUB, Cars, SOP, synthetic): every test image queries all the others.
* Query → gallery (In-Shop).
* Always: Recall@K for the data set's Ks, precision@1, R-Precision, MAP@R; NMI (k-means with
  k = number of test classes); and, where coarse labels exist, ``coarse_recall@1`` (is the
  nearest neighbour in the same coarse group?).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from hdml_jax.data.base import MetricDataset, Split
from hdml_jax.evaluation import metrics


def embed_batches(
    batches: Iterable[dict[str, np.ndarray]],
    embed: Callable[[jax.Array], jax.Array],
    batch_sharding: jax.sharding.Sharding,
    num_examples: int,
) -> np.ndarray:
    """Run ``embed`` over padded eval batches (process-local slices) → ``(num_examples, d)`` in order.

    Each process holds its contiguous slice of every global batch; the global array is assembled
    with ``make_array_from_process_local_data``, embedded sharded, gathered back to every host,
    and the padding rows (``mask`` False) are dropped.
    """
    outputs, masks = [], []
    for batch in batches:
        images = jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch["image"]))
        mask = jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch["mask"]))
        embeddings = embed(images)
        if jax.process_count() > 1:
            embeddings, mask = multihost_utils.process_allgather((embeddings, mask), tiled=True)
        outputs.append(np.asarray(embeddings))
        masks.append(np.asarray(mask))
    if not outputs:
        raise ValueError("the evaluation split is empty.")
    result = np.concatenate(outputs)[np.concatenate(masks).astype(bool)]
    if result.shape[0] != num_examples:
        raise RuntimeError(f"embedded {result.shape[0]} examples but the split has {num_examples}.")
    return result


def evaluate_embeddings(
    dataset: MetricDataset,
    test_embeddings: np.ndarray,
    *,
    query_embeddings: np.ndarray | None = None,
    gallery_embeddings: np.ndarray | None = None,
    nmi_key: jax.Array | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, float]:
    """All metrics of one evaluation from already computed embeddings.

    ``mesh``: a 1-D mesh of this process's devices over which the retrieval metrics split the
    reference set (``metrics.retrieval_metrics(..., mesh=...)``); None: the default device.

    Raises:
      metrics.NonFiniteEmbeddingsError: any of the given embeddings has a NaN or inf row; raised
        before anything is scored, so a diverged run never reports a metric.
    """
    for name, values in (
        ("test", test_embeddings),
        ("query", query_embeddings),
        ("gallery", gallery_embeddings),
    ):
        if values is not None:
            metrics.check_finite(values, f"{name} embedding")
    ks = tuple(dataset.recall_ks)
    if dataset.query is not None and dataset.gallery is not None:
        result = metrics.retrieval_metrics(
            query_embeddings, dataset.query.labels, gallery_embeddings, dataset.gallery.labels, ks=ks, mesh=mesh
        )
    else:
        result = metrics.retrieval_metrics(test_embeddings, dataset.test.labels, ks=ks, mesh=mesh)
    if nmi_key is not None:
        result["nmi"] = metrics.nmi(test_embeddings, dataset.test.labels, nmi_key)
    if dataset.test.coarse_labels is not None:
        coarse = metrics.retrieval_metrics(
            test_embeddings, dataset.test.coarse_labels, ks=(1,), mesh=mesh
        )
        result["coarse_recall@1"] = coarse["recall@1"]
    return result


def embed_dataset(
    dataset: MetricDataset, embed_split: Callable[[Split], np.ndarray]
) -> dict[str, np.ndarray]:
    """``{'test': ..., and for query/gallery data sets 'query', 'gallery'}`` embeddings.

    For query/gallery data sets the test set is their union, so it is not embedded a third time.
    """
    if dataset.query is not None and dataset.gallery is not None:
        query, gallery = embed_split(dataset.query), embed_split(dataset.gallery)
        return {"query": query, "gallery": gallery, "test": np.concatenate([query, gallery])}
    return {"test": embed_split(dataset.test)}


def main_metric(dataset: MetricDataset) -> str:
    """The number a run is judged by: Recall@1."""
    del dataset
    return "recall@1"


def summary_line(step: int, result: dict[str, Any]) -> str:
    keys = [k for k in result if k.startswith("recall@")] + [
        k for k in ("map@r", "r_precision", "nmi", "coarse_recall@1") if k in result
    ]
    return f"eval @ step {step}: " + "  ".join(f"{k} {100 * result[k]:.2f}" for k in keys)
