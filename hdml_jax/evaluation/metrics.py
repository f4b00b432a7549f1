"""Retrieval metrics: Recall@K, Precision@1, R-Precision, MAP@R, NMI.

Who is searched where (Open Metric Learning's semantics, ``query_gallery``): a query is ranked
against the gallery rows other than its own row. Self-retrieval (every row both) removes each
query from its own reference set by index; a separate reference set is searched whole; flags
(``is_query`` / ``is_gallery``) may mix rows that are both with query-only and gallery-only ones.
Similarity: cosine, on L2-normalised embeddings.

Definitions, with ``R`` = the number of gallery rows other than the query that share its label
and ``rel_i`` = whether the i-th nearest of them does:

* ``recall@K``: whether one of the K nearest shares the label (the Recall@K of the retrieval
  papers, OML's ``cmc@K``);
* ``precision@1 = rel_1``, ``r_precision = (Σ_{i≤R} rel_i) / R``,
  ``map@r = 1/R Σ_{i≤R} P@i · rel_i`` with ``P@i = (Σ_{j≤i} rel_j) / i`` (MLRC, Musgrave et al.
  2020);
* a query with ``R = 0`` has nothing to find: by default it is left out of every mean
  (``unmatched_queries="skip"``; ``count_unmatched_queries`` says how many, and the trainer
  prints it); ``"miss"`` scores it 0 in every metric, as OML's ``EmbeddingMetrics`` does (it
  keeps such queries, with a warning). ``tests/test_query_gallery.py`` holds both to OML 4.0's
  own results.

How it is computed (``retrieval_kernels``): queries go through in chunks, one loop in one compiled
program; each chunk's similarity block is read once after the matmul that wrote it, Recall@K comes
from the rank of the first correct reference (no top-K list), MAP@R from an exact two-stage top-R.
With ``mesh=`` the references are split over devices instead (``retrieval_sharded``); the results
are the same, exactly.

Ties: a wrong reference exactly as similar as the best correct one is counted as ranked before it
(the pessimistic choice); in the top-``R_max`` list ties go to the lower reference index.

Flags: the query rows and gallery rows are taken out of the one embedding set; each query carries
the gallery column that is itself (or -1), which the device program excludes as it excludes the
diagonal in self-retrieval (where no such column list is even read: that path is unchanged).

Similarity products run at HIGHEST precision: the query × reference matmul passes
``precision=FULL_PRECISION`` (and k-means for NMI does the same), so that on TPUs and recent GPUs
bf16/TF32 rounding (about 1e-3 on a cosine) does not reorder near-tied neighbours.

Non-finite embeddings: a NaN similarity compares false with everything, so a row holding a NaN or
an inf would rank arbitrarily (all-NaN embeddings scored Recall@K = 1). Every scoring function here
counts such rows first (in the same jitted pass that normalises the embeddings) and raises
``NonFiniteEmbeddingsError`` instead of returning a score. The functions return Python floats, so
they only take concrete arrays; under ``jax.jit`` they raise ``TypeError``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hdml_jax.evaluation import cluster
from hdml_jax.evaluation.finite import NonFiniteEmbeddingsError, check_finite
from hdml_jax.evaluation.query_gallery import count_unmatched_queries, query_gallery_rows
from hdml_jax.evaluation.retrieval_kernels import default_chunk_size, normalize_rows, single_device_statistics
from hdml_jax.evaluation.retrieval_sharded import sharded_statistics
from hdml_jax.losses._common import is_concrete

__all__ = [
    "UNMATCHED_QUERIES",
    "NonFiniteEmbeddingsError",
    "check_finite",
    "count_unmatched_queries",
    "default_chunk_size",
    "nmi",
    "retrieval_metrics",
]


def _require_concrete(function: str, *arrays) -> None:
    if not all(is_concrete(a) for a in arrays):
        raise TypeError(
            f"{function} returns Python floats computed on the host, so it needs concrete arrays; "
            "call it outside jax.jit / grad / vmap."
        )


def _integer_labels(labels, name: str) -> np.ndarray:
    """``labels`` as a flat NumPy integer array; ``ValueError`` for any other dtype."""
    values = np.asarray(labels)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"{name} must be integer class ids, got dtype {values.dtype}; map other labels (strings, "
            "floats, bools) to integers first, e.g. np.unique(labels, return_inverse=True)[1]."
        )
    return values.reshape(-1)


def _ranking_terms(relevant: np.ndarray, num_relevant: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(MAP@R, R-Precision, P@1)`` per query (float64) from ``relevance``'s flags and R."""
    average_precision, r_precision, precision_at_1 = (np.zeros(relevant.shape[0]) for _ in range(3))
    if relevant.shape[1] == 0:
        return average_precision, r_precision, precision_at_1
    position = np.arange(1, relevant.shape[1] + 1, dtype=np.float64)
    block = max(1, (1 << 22) // relevant.shape[1])  # bounded host memory for long lists
    for start in range(0, relevant.shape[0], block):
        rows = slice(start, start + block)
        flags = relevant[rows].astype(np.float64)
        hits = flags * (position[None, :] <= num_relevant[rows, None])
        safe_r = np.maximum(num_relevant[rows], 1).astype(np.float64)
        average_precision[rows] = np.sum(np.cumsum(flags, axis=1) / position * hits, axis=1) / safe_r
        r_precision[rows] = np.sum(hits, axis=1) / safe_r
        precision_at_1[rows] = flags[:, 0]
    return average_precision, r_precision, precision_at_1


def _positive_lists(
    query_labels: np.ndarray, reference_labels: np.ndarray, query_is_reference: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For every query, the indices of the references sharing its label, and their count R.

    Returns ``(positive_index (Q, width) int32 padded with -1, num_relevant (Q,) int32)``. A query
    that is itself a reference (``query_is_reference``, ``(Q,)`` bool) is in its own list (removed
    on device), and its R excludes it.
    """
    order = np.argsort(reference_labels, kind="stable")
    sorted_labels = reference_labels[order]
    start = np.searchsorted(sorted_labels, query_labels, side="left")
    count = np.searchsorted(sorted_labels, query_labels, side="right") - start
    width = max(int(count.max()) if count.size else 0, 1)
    offsets = start[:, None] + np.arange(width)[None, :]
    valid = np.arange(width)[None, :] < count[:, None]
    positive_index = np.where(valid, order[np.minimum(offsets, len(order) - 1)], -1).astype(np.int32)
    num_relevant = (count - query_is_reference.astype(count.dtype)).clip(min=0).astype(np.int32)
    return positive_index, num_relevant


UNMATCHED_QUERIES = ("skip", "miss")


DISTANCES = ("cosine", "poincare")


def _checked_geometry(distance: str, curvature, query, reference) -> float:
    """The curvature to rank with (0.0: cosine); a one-line ``ValueError`` for a bad pair, or for
    Poincaré rows outside the ball (their distances would be meaningless)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}.")
    if distance == "cosine":
        if curvature not in (None, 0, 0.0):
            raise ValueError(f"curvature={curvature} applies to distance='poincare' only.")
        return 0.0
    if curvature is None or not float(curvature) > 0:
        raise ValueError(f"distance='poincare' needs a curvature c > 0, got {curvature!r}.")
    curvature = float(curvature)
    radius = 1 / curvature**0.5
    for rows, name in ((query, "query"), (reference, "reference")):
        if rows is None:
            continue
        norms = np.linalg.norm(np.asarray(rows, np.float32), axis=1)
        finite = norms[np.isfinite(norms)]
        if finite.size and finite.max() >= radius:
            raise ValueError(
                f"{name} rows are not points of the Poincaré ball of curvature {curvature}: the largest "
                f"norm is {finite.max():.4g}, the ball's radius 1/√c = {radius:.4g} (map features into it "
                "with hdml_jax.hyperbolic.to_poincare)."
            )
    return curvature


def retrieval_metrics(
    query: jax.Array,
    query_labels: jax.Array,
    reference: jax.Array | None = None,
    reference_labels: jax.Array | None = None,
    *,
    is_query: np.ndarray | None = None,
    is_gallery: np.ndarray | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    unmatched_queries: str = "skip",
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    distance: str = "cosine",
    curvature: float | None = None,
) -> dict[str, float]:
    """Recall@K, precision@1, R-Precision and MAP@R of a retrieval (see the module docstring).

    Two forms. ``retrieval_metrics(query, labels, reference, reference_labels)``: the queries are
    searched in a separate reference set. ``retrieval_metrics(embeddings, labels, is_query=...,
    is_gallery=...)``: one set of rows, each a query, a gallery item or both (Open Metric Learning's
    ``is_query``/``is_gallery``; both default to every row, i.e. self-retrieval); a query is
    searched among the gallery rows other than its own row.

    Args:
      query: ``(Q, d)`` float embeddings (normalised inside); in the second form every row.
      query_labels: ``(Q,)`` integer class ids.
      reference: ``(N, d)``, or None for the second form.
      reference_labels: ``(N,)`` integer class ids, given exactly when ``reference`` is.
      is_query, is_gallery: ``(Q,)`` bool flags of the second form (None: every row).
      ks: the K of Recall@K, any positive ints.
      unmatched_queries: what a query counts for when no other gallery row shares its class.
        ``"skip"`` (default): it is left out of every score (``count_unmatched_queries`` counts
        them). ``"miss"``: it is scored as a failure in every metric, as Open Metric Learning's
        ``EmbeddingMetrics`` does (it warns and keeps them).
      chunk_size: queries per device step, a positive integer; None: ``default_chunk_size``
        (``chunk_size × N``, or ``× N / D`` per device, near 32M; at most 1024).
      distance: ``"cosine"`` (default: rows normalised, ranked by cosine) or ``"poincare"``: the
        rows are points of the Poincaré ball of ``curvature`` c (HIER's and Hyp's embeddings,
        ``hdml_jax.hyperbolic``), ranked by their distance as those evaluate when ``c > 0``; the
        same single pass over each block of products (``poincare_similarity``).
      curvature: the ball's c, required with ``distance="poincare"``.
      mesh: None (default) computes on the default device. A 1-D ``jax.sharding.Mesh`` of this
        process's devices splits the references over its devices instead, for reference sets
        larger than one device's memory: each holds ``N / D`` of them and query chunks are sent to
        all (see "Sharded references" in the module docstring). The results are the same.

    Returns:
      ``{"recall@K": ..., "precision@1": ..., "r_precision": ..., "map@r": ...}`` as Python floats
      (0.0 when no query has a match).

    Raises:
      NonFiniteEmbeddingsError: a query or reference row holds a NaN or inf (checked before any
        similarity is computed).
      ValueError: inconsistent shapes, non-integer labels, flags that are not one bool per row, a
        K < 1, a bad ``chunk_size``, ``mesh`` or ``unmatched_queries``.
      TypeError: traced (jitted) arguments.
    """
    _require_concrete("retrieval_metrics", query, query_labels, reference, reference_labels)
    curvature = _checked_geometry(distance, curvature, query, reference)
    if unmatched_queries not in UNMATCHED_QUERIES:
        raise ValueError(f"unmatched_queries must be one of {UNMATCHED_QUERIES}, got {unmatched_queries!r}.")
    self_form = reference is None
    if self_form != (reference_labels is None):
        raise ValueError("give reference and reference_labels together, or neither (self-retrieval).")
    if not self_form and (is_query is not None or is_gallery is not None):
        raise ValueError(
            "is_query / is_gallery flag the rows of one embedding set; with a separate reference set "
            "leave them out (or pass every row once, with the flags, and no reference)."
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1
    ):
        raise ValueError(
            f"chunk_size must be a positive integer (queries per device step) or None for the "
            f"default, got {chunk_size!r}."
        )
    if mesh is not None:
        if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
            raise ValueError(f"mesh must be a 1-D jax.sharding.Mesh or None, got {mesh!r}.")
        if any(device.process_index != jax.process_index() for device in mesh.devices.flat):
            raise ValueError("mesh must hold only this process's devices (one host).")
    if jnp.ndim(query) != 2 or (not self_form and jnp.ndim(reference) != 2):
        shapes = f"{jnp.shape(query)}" + ("" if self_form else f" and {jnp.shape(reference)}")
        raise ValueError(f"query and reference must be (num, dim); got {shapes}.")
    query_labels_np = _integer_labels(query_labels, "query_labels")
    self_column = None
    self_retrieval = self_form and is_query is None and is_gallery is None
    if self_form and not self_retrieval:
        if query_labels_np.shape[0] != query.shape[0]:
            raise ValueError(
                f"need one label per embedding: {query.shape[0]} rows, {query_labels_np.shape[0]} labels."
            )
        query_rows, gallery_rows, self_column = query_gallery_rows(query.shape[0], is_query, is_gallery)
        if query_rows.size == query.shape[0] and gallery_rows.size == query.shape[0]:
            self_retrieval, self_column = True, None  # every row both: the self-retrieval path
        else:
            rows = query
            query, reference = _take_rows(rows, query_rows), _take_rows(rows, gallery_rows)
            query_labels_np, reference_labels = query_labels_np[query_rows], query_labels_np[gallery_rows]
            if not np.any(self_column >= 0):
                self_column = None  # query and gallery rows are disjoint: nothing to exclude
    if self_retrieval:
        reference, reference_labels = query, query_labels_np
    if query.shape[1] != reference.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} differs from reference dim {reference.shape[1]}.")
    reference_labels_np = _integer_labels(reference_labels, "reference_labels")
    if query_labels_np.shape[0] != query.shape[0] or reference_labels_np.shape[0] != reference.shape[0]:
        raise ValueError(
            f"need one label per embedding: {query.shape[0]} queries with {query_labels_np.shape[0]} labels, "
            f"{reference.shape[0]} references with {reference_labels_np.shape[0]} labels."
        )
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be a positive integer, got {ks}.")
    num_queries, num_references = query.shape[0], reference.shape[0]
    if self_retrieval:
        query_is_reference = np.ones(num_queries, bool)
    elif self_column is None:
        query_is_reference = np.zeros(num_queries, bool)
    else:
        query_is_reference = self_column >= 0
    if num_queries == 0 or num_references - int(query_is_reference.all()) < 1:
        raise ValueError("retrieval needs at least one query and one reference other than itself.")

    positive_index, num_relevant = _positive_lists(query_labels_np, reference_labels_np, query_is_reference)
    exclude_self = self_retrieval or self_column is not None
    top_r = int(min(num_relevant.max(), num_references - (1 if exclude_self else 0)))
    statistics = (
        single_device_statistics if mesh is None else functools.partial(sharded_statistics, mesh=mesh)
    )
    if curvature:
        statistics = functools.partial(statistics, curvature=curvature)
    rank, relevant = statistics(
        query,
        reference,
        self_retrieval,
        query_labels_np,
        reference_labels_np,
        positive_index,
        self_column,
        chunk_size=chunk_size,
        top_r=top_r,
    )
    rank = rank[:num_queries]
    average_precision, r_precision, precision_at_1 = _ranking_terms(relevant[:num_queries], num_relevant)
    # A query outside the gallery whose class fills it has R = N > top_r (bounded by N - 1 when
    # other queries are in the gallery): every ranking of the gallery is then perfect.
    everything_relevant = num_relevant == num_references
    for terms in (average_precision, r_precision, precision_at_1):
        terms[everything_relevant] = 1.0
    matched = num_relevant > 0
    rank = np.where(matched, rank, num_references)  # no correct reference: never recalled
    scored = matched if unmatched_queries == "skip" else np.ones(num_queries, bool)
    num_scored = max(int(scored.sum()), 1)
    metrics = {f"recall@{k}": float(np.sum((rank < k) & scored) / num_scored) for k in ks}
    # Unmatched queries have R = 0: all three terms are 0 for them (a miss under "miss").
    metrics["precision@1"] = float(precision_at_1[matched].sum() / num_scored)
    metrics["r_precision"] = float(r_precision[matched].sum() / num_scored)
    metrics["map@r"] = float(average_precision[matched].sum() / num_scored)
    return metrics


def _take_rows(x, rows: np.ndarray):
    """``x[rows]`` on the host for NumPy input, on its device for a JAX array."""
    return x[jnp.asarray(rows)] if isinstance(x, jax.Array) else np.asarray(x)[rows]


def nmi(embeddings: jax.Array, labels: jax.Array, key: jax.Array, *, num_iters: int = 100) -> float:
    """Normalised mutual information between the labels and a k-means clustering.

    k-means (k-means++ seeding, ``k`` = number of distinct labels) runs on the L2-normalised
    ``(N, d)`` embeddings; NMI uses the arithmetic-mean normaliser,
    ``MI(U, V) / ((H(U) + H(V)) / 2)`` (see ``cluster.normalized_mutual_info``).

    Raises:
      NonFiniteEmbeddingsError: an embedding row holds a NaN or inf (before any clustering).
      ValueError: shapes that do not match.
      TypeError: traced (jitted) arguments.
    """
    _require_concrete("nmi", embeddings, labels)
    labels_np = np.asarray(labels).reshape(-1)
    if jnp.ndim(embeddings) != 2 or jnp.shape(embeddings)[0] != labels_np.shape[0]:
        raise ValueError(
            f"need (N, d) embeddings and N labels, got {jnp.shape(embeddings)} and {labels_np.shape}."
        )
    normalized, bad = normalize_rows(embeddings)
    if int(bad):
        raise NonFiniteEmbeddingsError(int(bad), labels_np.shape[0], "embedding")
    num_clusters = int(np.unique(labels_np).size)
    _, assignments = cluster.kmeans(key, normalized, num_clusters, num_iters=num_iters)
    return cluster.normalized_mutual_info(labels_np, np.asarray(assignments))
