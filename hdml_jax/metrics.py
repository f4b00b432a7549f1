"""Retrieval metrics: Recall@K, Precision@1, R-Precision, MAP@R, NMI.

Definitions (cosine similarity on L2-normalised embeddings; in self-retrieval each query is
removed from its own reference set, by index):

* ``recall@K``: fraction of queries with at least one reference of the same label among their K
  nearest references (the Recall@K of the retrieval papers; queries whose label has no other
  reference count as misses).
* For the rest, queries whose label has no reference (``R = 0``) are left out (MLRC,
  Musgrave et al. 2020). With ``R`` = number of references sharing the query's label and
  ``rel_i`` = whether the i-th nearest reference shares it:
  ``precision@1 = rel_1``, ``r_precision = (Σ_{i≤R} rel_i) / R``,
  ``map@r = 1/R Σ_{i≤R} P@i · rel_i`` with ``P@i = (Σ_{j≤i} rel_j) / i``.

How it is computed: queries go through in chunks; for each chunk the similarities to every
reference are one matmul on device. Recall@K needs no top-K list at all: the rank of the first
correct reference is the number of wrong references at least as similar as the best correct one
(one fused count over the row; the best correct similarity is a small gather, since the
references of each label are listed on the host), so ``recall@K = [rank < K]`` for every K at
once, whatever K is (1000 on SOP costs nothing extra). MAP@R and R-Precision need the ``R_max``
nearest references (``R_max`` = the largest class size, 11 on SOP), found by one small
``top_k``. Memory per chunk is ``chunk_size × N`` floats; no ``(chunk, N)`` mask is built.

Ties: a wrong reference exactly as similar as the best correct one is counted as ranked before it
(the pessimistic choice); in the top-``R_max`` list ties go to the lower reference index.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax import cluster
from hdml_jax.losses._common import l2_normalize

# Default chunk size keeps one chunk's similarity matrix near 64M floats (256 MiB).
_CHUNK_ELEMENTS = 1 << 26


@functools.partial(jax.jit, static_argnames=("exclude_self", "top_r"))
def _chunk_statistics(
    queries,
    query_labels,
    query_index,
    query_valid,
    positive_index,
    num_relevant,
    reference,
    reference_labels,
    *,
    exclude_self,
    top_r,
):
    """Per-query rank of the first correct reference and the MAP@R / R-Precision / P@1 terms.

    ``positive_index`` ``(chunk, R_max + 1)`` lists each query's same-label references (padded
    with -1; in self-retrieval it includes the query itself, masked here), so the best correct
    similarity is a small gather and no ``(chunk, N)`` label mask is ever built. The only full
    passes over the ``(chunk, N)`` similarities are the matmul, one fused count and one top-k.
    """
    similarity = queries @ reference.T  # (chunk, N)
    if exclude_self:  # in place: each query's own column (chunk scatters, not a (chunk, N) mask)
        similarity = similarity.at[jnp.arange(queries.shape[0]), query_index].set(-jnp.inf, mode="drop")
    positive_valid = positive_index >= 0
    if exclude_self:
        positive_valid &= positive_index != query_index[:, None]
    positive_similarity = jnp.take_along_axis(similarity, jnp.maximum(positive_index, 0), axis=1)
    positive_similarity = jnp.where(positive_valid, positive_similarity, -jnp.inf)
    best_correct = jnp.max(positive_similarity, axis=1)
    # Wrong references at least as similar as the best correct one (ties counted against it).
    at_least_best = jnp.sum(similarity >= best_correct[:, None], axis=1)
    correct_at_least_best = jnp.sum(positive_similarity >= best_correct[:, None], axis=1)
    rank_first_correct = at_least_best - correct_at_least_best
    rank_first_correct = jnp.where(num_relevant > 0, rank_first_correct, reference.shape[0])

    if top_r > 0:
        _, nearest = jax.lax.top_k(similarity, top_r)  # (chunk, R_max)
        relevant = (reference_labels[nearest] == query_labels[:, None]).astype(jnp.float32)
        if exclude_self:
            relevant *= nearest != query_index[:, None]
        position = jnp.arange(1, top_r + 1, dtype=jnp.float32)
        within_r = position[None, :] <= num_relevant[:, None]
        hits = relevant * within_r
        precision_at_i = jnp.cumsum(relevant, axis=1) / position
        safe_r = jnp.maximum(num_relevant, 1).astype(jnp.float32)
        average_precision = jnp.sum(precision_at_i * hits, axis=1) / safe_r
        r_precision = jnp.sum(hits, axis=1) / safe_r
        precision_at_1 = relevant[:, 0]
    else:
        average_precision = r_precision = precision_at_1 = jnp.zeros(queries.shape[0], jnp.float32)
    has_relevant = query_valid & (num_relevant > 0)
    return (
        jnp.where(query_valid, rank_first_correct, reference.shape[0]),
        has_relevant,
        jnp.where(has_relevant, average_precision, 0.0),
        jnp.where(has_relevant, r_precision, 0.0),
        jnp.where(has_relevant, precision_at_1, 0.0),
    )


def _positive_lists(
    query_labels: np.ndarray, reference_labels: np.ndarray, self_retrieval: bool
) -> tuple[np.ndarray, np.ndarray]:
    """For every query, the indices of the references sharing its label, and their count R.

    Returns ``(positive_index (Q, width) int32 padded with -1, num_relevant (Q,) int32)``; in
    self-retrieval the lists include the query itself (removed on device) and R excludes it.
    """
    order = np.argsort(reference_labels, kind="stable")
    sorted_labels = reference_labels[order]
    start = np.searchsorted(sorted_labels, query_labels, side="left")
    count = np.searchsorted(sorted_labels, query_labels, side="right") - start
    width = max(int(count.max()) if count.size else 0, 1)
    offsets = start[:, None] + np.arange(width)[None, :]
    valid = np.arange(width)[None, :] < count[:, None]
    positive_index = np.where(valid, order[np.minimum(offsets, len(order) - 1)], -1).astype(np.int32)
    num_relevant = (count - (1 if self_retrieval else 0)).clip(min=0).astype(np.int32)
    return positive_index, num_relevant


def retrieval_metrics(
    query: jax.Array,
    query_labels: jax.Array,
    reference: jax.Array | None = None,
    reference_labels: jax.Array | None = None,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@K, precision@1, R-Precision and MAP@R of a retrieval (see the module docstring).

    Args:
      query: ``(Q, d)`` float embeddings (normalised inside).
      query_labels: ``(Q,)`` int.
      reference: ``(N, d)`` or None for self-retrieval (query set = reference set, self excluded).
      reference_labels: ``(N,)`` int, given exactly when ``reference`` is.
      ks: the K of Recall@K, any positive ints.
      chunk_size: queries per device step; default keeps ``chunk_size × N`` near 64M.

    Returns:
      ``{"recall@K": ..., "precision@1": ..., "r_precision": ..., "map@r": ...}`` as Python floats.
    """
    self_retrieval = reference is None
    if self_retrieval != (reference_labels is None):
        raise ValueError("give reference and reference_labels together, or neither (self-retrieval).")
    if self_retrieval:
        reference, reference_labels = query, query_labels
    if jnp.ndim(query) != 2 or jnp.ndim(reference) != 2:
        raise ValueError(
            f"query and reference must be (num, dim); got {jnp.shape(query)} and {jnp.shape(reference)}."
        )
    if query.shape[1] != reference.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} differs from reference dim {reference.shape[1]}.")
    query_labels_np = np.asarray(query_labels).reshape(-1)
    reference_labels_np = np.asarray(reference_labels).reshape(-1)
    if query_labels_np.shape[0] != query.shape[0] or reference_labels_np.shape[0] != reference.shape[0]:
        raise ValueError(
            f"need one label per embedding: {query.shape[0]} queries with {query_labels_np.shape[0]} labels, "
            f"{reference.shape[0]} references with {reference_labels_np.shape[0]} labels."
        )
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be a positive integer, got {ks}.")
    num_queries, num_references = query.shape[0], reference.shape[0]
    if num_queries == 0 or num_references - (1 if self_retrieval else 0) < 1:
        raise ValueError("retrieval needs at least one query and one reference other than itself.")

    positive_index, num_relevant = _positive_lists(query_labels_np, reference_labels_np, self_retrieval)
    top_r = int(min(num_relevant.max(), num_references - (1 if self_retrieval else 0)))
    if chunk_size is None:
        chunk_size = max(1, min(num_queries, _CHUNK_ELEMENTS // num_references, 4096))
    chunk_size = int(min(chunk_size, num_queries))

    queries_n = l2_normalize(jnp.asarray(query, jnp.float32))
    reference_n = queries_n if self_retrieval else l2_normalize(jnp.asarray(reference, jnp.float32))
    reference_labels_d = jnp.asarray(reference_labels_np)
    num_chunks = -(-num_queries // chunk_size)
    padded = num_chunks * chunk_size
    queries_p = jnp.pad(queries_n, ((0, padded - num_queries), (0, 0)))
    labels_p = jnp.asarray(np.pad(query_labels_np, (0, padded - num_queries)))
    positives_p = jnp.asarray(np.pad(positive_index, ((0, padded - num_queries), (0, 0)), constant_values=-1))
    relevant_p = jnp.asarray(np.pad(num_relevant, (0, padded - num_queries)))

    outputs = []
    for start in range(0, padded, chunk_size):
        rows = slice(start, start + chunk_size)
        index = jnp.arange(start, start + chunk_size)
        outputs.append(
            _chunk_statistics(
                queries_p[rows],
                labels_p[rows],
                index,
                index < num_queries,
                positives_p[rows],
                relevant_p[rows],
                reference_n,
                reference_labels_d,
                exclude_self=self_retrieval,
                top_r=top_r,
            )
        )
    rank, has_relevant, average_precision, r_precision, precision_at_1 = (
        np.concatenate([np.asarray(o[i]) for o in outputs])[:num_queries] for i in range(5)
    )
    metrics = {f"recall@{k}": float(np.mean(rank < k)) for k in ks}
    num_scored = max(int(has_relevant.sum()), 1)
    metrics["precision@1"] = float(precision_at_1.astype(np.float64).sum() / num_scored)
    metrics["r_precision"] = float(r_precision.astype(np.float64).sum() / num_scored)
    metrics["map@r"] = float(average_precision.astype(np.float64).sum() / num_scored)
    return metrics


def nmi(embeddings: jax.Array, labels: jax.Array, key: jax.Array, *, num_iters: int = 100) -> float:
    """Normalised mutual information between the labels and a k-means clustering.

    k-means (k-means++ seeding, ``k`` = number of distinct labels) runs on the L2-normalised
    embeddings; NMI uses the arithmetic-mean normaliser.
    """
    labels_np = np.asarray(labels).reshape(-1)
    if jnp.ndim(embeddings) != 2 or embeddings.shape[0] != labels_np.shape[0]:
        raise ValueError(
            f"need (N, d) embeddings and N labels, got {jnp.shape(embeddings)} and {labels_np.shape}."
        )
    num_clusters = int(np.unique(labels_np).size)
    _, assignments = cluster.kmeans(
        key, l2_normalize(jnp.asarray(embeddings, jnp.float32)), num_clusters, num_iters=num_iters
    )
    return cluster.normalized_mutual_info(labels_np, np.asarray(assignments))
