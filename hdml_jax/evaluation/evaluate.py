"""Embeddings of an evaluation split → retrieval metrics, the way the papers report them.

* Self-retrieval (CUB, Cars, SOP, synthetic): every test image queries all the others.
* Queries and gallery flagged per row (In-Shop; a CSV's ``is_query`` / ``is_gallery``, any mix):
  each query searches the gallery rows other than its own (``query_gallery``).
* Always: Recall@K for the data set's Ks, precision@1, R-Precision, MAP@R; NMI (k-means with
  k = number of test classes); and, where coarse labels exist, ``coarse_recall@1`` (is the
  nearest gallery neighbour in the same coarse group?), and for a deeper taxonomy one more per
  level (``coarse2_recall@1``: the group above that, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from hdml_jax.data.base import MetricDataset, Split
from hdml_jax.evaluation import metrics, ranking


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


def ranking_of(config: Any) -> dict[str, Any]:
    """How a run's embeddings are ranked, as ``metrics.retrieval_metrics`` keywords: ``{}`` (cosine)
    for the sphere, ``{"distance": "poincare", "curvature": c}`` for a head that ends in the
    Poincaré ball (``model.curvature`` c > 0; absent from configs written before it existed)."""
    curvature = ranking.curvature_of(config)
    return {"distance": "poincare", "curvature": curvature} if curvature > 0 else {}


def evaluate_embeddings(
    dataset: MetricDataset,
    test_embeddings: np.ndarray,
    *,
    nmi_key: jax.Array | None = None,
    mesh: jax.sharding.Mesh | None = None,
    ranking: dict[str, Any] | None = None,
) -> dict[str, float]:
    """All metrics of one evaluation from the embeddings of ``dataset.test`` (in its order).

    The queries and gallery are the test rows ``dataset.roles()`` flags. ``mesh``: a 1-D mesh of
    this process's devices over which the retrieval metrics split the reference set
    (``metrics.retrieval_metrics(..., mesh=...)``); None: the default device. ``ranking``: the
    run's geometry (``ranking_of``); None: cosine. NMI clusters the embeddings' directions either
    way (k-means on the sphere).

    Raises:
      metrics.NonFiniteEmbeddingsError: a NaN or inf row; raised before anything is scored, so a
        diverged run never reports a metric.
    """
    metrics.check_finite(test_embeddings, "test embedding")
    roles = {}
    if dataset.has_roles:
        roles["is_query"], roles["is_gallery"] = dataset.roles()
    ks = tuple(dataset.recall_ks)
    roles |= ranking or {}
    result = metrics.retrieval_metrics(test_embeddings, dataset.test.labels, ks=ks, mesh=mesh, **roles)
    if nmi_key is not None:
        result["nmi"] = metrics.nmi(test_embeddings, dataset.test.labels, nmi_key)
    for level, coarse_labels in enumerate(dataset.test.coarse_levels, start=1):
        coarse = metrics.retrieval_metrics(test_embeddings, coarse_labels, ks=(1,), mesh=mesh, **roles)
        result[coarse_recall_name(level)] = coarse["recall@1"]
    return result


def coarse_recall_name(level: int) -> str:
    """``coarse_recall@1`` for the taxonomy's first level above the classes, ``coarse2_recall@1``
    for the one above it, and so on (``level`` counted from the classes up)."""
    return "coarse_recall@1" if level == 1 else f"coarse{level}_recall@1"


def embed_dataset(
    dataset: MetricDataset, embed_split: Callable[[Split], np.ndarray]
) -> dict[str, np.ndarray]:
    """``{'test': ...}`` embeddings, and where queries and gallery are flagged their rows of it
    (``'query'``, ``'gallery'``): every test image is embedded once."""
    test = embed_split(dataset.test)
    if not dataset.has_roles:
        return {"test": test}
    is_query, is_gallery = dataset.roles()
    return {"test": test, "query": test[is_query], "gallery": test[is_gallery]}


def main_metric(dataset: MetricDataset) -> str:
    """The number a run is judged by: Recall@1."""
    del dataset
    return "recall@1"


def summary_line(step: int, result: dict[str, Any]) -> str:
    keys = (
        [k for k in result if k.startswith("recall@")]
        + [k for k in ("map@r", "r_precision", "nmi") if k in result]
        + [k for k in result if k.startswith("coarse") and k.endswith("_recall@1")]
    )
    return f"eval @ step {step}: " + "  ".join(f"{k} {100 * result[k]:.2f}" for k in keys)
