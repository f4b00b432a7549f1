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

from hdml_jax import cluster
from hdml_jax.losses._common import FULL_PRECISION, is_concrete, l2_normalize

# Default chunk size keeps one chunk's similarity matrix near 64M floats (256 MiB).
_CHUNK_ELEMENTS = 1 << 26
# References are handled in groups of this many columns (the reference set is padded to a
# multiple of it): a group's count of "at least as similar" fits in int8, and a group's maximum
# lets the top-k look only at the few groups that can hold the k nearest.
_GROUP = 64


class NonFiniteEmbeddingsError(ValueError):
    """Embeddings with NaN or inf rows were given to a metric: there is no score to report.

    Attributes:
      num_non_finite: rows holding at least one NaN or inf.
      num_rows: rows in total.
      name: which rows, as in the message (``"embedding"``, ``"query embedding"`` ...).
    """

    def __init__(self, num_non_finite: int, num_rows: int, name: str = "embedding") -> None:
        self.num_non_finite, self.num_rows, self.name = int(num_non_finite), int(num_rows), name
        super().__init__(
            f"{self.num_non_finite} of {self.num_rows} {name} rows are not finite (NaN or inf), so no "
            "metric of them means anything; training likely diverged (lower the learning rate or "
            "clip gradients, and evaluate an earlier checkpoint)."
        )

    def __reduce__(self):
        return type(self), (self.num_non_finite, self.num_rows, self.name)


@jax.jit
def _count_non_finite_rows(x: jax.Array) -> jax.Array:
    """``Σ_i [row i holds a NaN or inf]`` of a ``(N, d)`` array, as int32."""
    return jnp.sum(~jnp.all(jnp.isfinite(x), axis=1), dtype=jnp.int32)


@jax.jit
def _normalize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x̂ (N, d) float32 L2-normalised rows, number of rows holding a NaN or inf)``, one pass."""
    x = x.astype(jnp.float32)
    return l2_normalize(x), _count_non_finite_rows(x)


def _require_concrete(function: str, *arrays) -> None:
    if not all(is_concrete(a) for a in arrays):
        raise TypeError(
            f"{function} returns Python floats computed on the host, so it needs concrete arrays; "
            "call it outside jax.jit / grad / vmap."
        )


def check_finite(embeddings, name: str = "embedding") -> None:
    """Raise ``NonFiniteEmbeddingsError`` if a concrete ``(N, d)`` array has a NaN or inf row.

    NumPy arrays are checked on the host, JAX arrays on their device (no transfer). A traced
    array cannot be checked here and passes (the losses and normalisation propagate NaN).
    """
    if not is_concrete(embeddings) or np.size(embeddings) == 0:
        return
    if isinstance(embeddings, jax.Array):
        bad = int(_count_non_finite_rows(embeddings.reshape(embeddings.shape[0], -1)))
    else:
        values = np.asarray(embeddings)
        if not np.issubdtype(values.dtype, np.floating):
            return  # integers cannot be NaN; other dtypes are the caller's error
        bad = int(np.sum(~np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)))
    if bad:
        raise NonFiniteEmbeddingsError(bad, np.shape(embeddings)[0], name)


def _integer_labels(labels, name: str) -> np.ndarray:
    """``labels`` as a flat NumPy integer array; ``ValueError`` for any other dtype."""
    values = np.asarray(labels)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"{name} must be integer class ids, got dtype {values.dtype}; map other labels (strings, "
            "floats, bools) to integers first, e.g. np.unique(labels, return_inverse=True)[1]."
        )
    return values.reshape(-1)


@functools.partial(jax.jit, static_argnames=("num_references",))
def _similarities(queries, reference_padded, *, num_references):
    """``(chunk, N_pad)`` cosine similarities; the padding columns are -inf."""
    similarity = jnp.matmul(queries, reference_padded.T, precision=FULL_PRECISION)
    column = jnp.arange(reference_padded.shape[0])
    return jnp.where(column[None, :] < num_references, similarity, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("exclude_self",))
def _best_correct(similarity, positive_index, query_index, *, exclude_self):
    """Best correct similarity per query, and how many listed references reach it.

    ``positive_index`` ``(chunk, width)`` lists the same-label references (padded with -1; in
    self-retrieval it includes the query itself). The similarities are gathered from the very
    matrix the count reads, so the two agree bit for bit. Returns ``(best (chunk,), listed (chunk,)
    int32)`` where ``listed`` counts the listed references (self included) at least as similar
    as ``best``: exactly the columns of the full count that are not wrong references.
    """
    listed = positive_index >= 0
    gathered = jnp.take_along_axis(similarity, jnp.maximum(positive_index, 0), axis=1)
    correct = listed & (positive_index != query_index[:, None]) if exclude_self else listed
    best = jnp.max(jnp.where(correct, gathered, -jnp.inf), axis=1)
    return best, jnp.sum(listed & (gathered >= best[:, None]), axis=1)


@jax.jit
def _count_at_least(similarity, threshold):
    """``Σ_n [similarity[q, n] >= threshold[q]]`` per row, as int32.

    Written as int8 sums over groups of ``_GROUP`` columns, then an int32 sum over the groups:
    on XLA:CPU this is several times faster than one fused compare-and-sum over the row.
    """
    chunk, width = similarity.shape
    hits = (similarity >= threshold[:, None]).astype(jnp.int8).reshape(chunk, width // _GROUP, _GROUP)
    return jnp.sum(jnp.sum(hits, axis=2, dtype=jnp.int8).astype(jnp.int32), axis=1)


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_indices(similarity, *, k):
    """Column indices of the ``k`` largest entries per row, ties to the lower index (exact).

    Two stages: the ``k`` groups of ``_GROUP`` columns with the largest maxima must contain the
    ``k`` largest entries (any entry outside them is beaten by those ``k`` maxima), so the final
    ``top_k`` looks at ``k × _GROUP`` candidates instead of the whole row. The chosen groups are
    taken in column order, so candidate order is column order and ties still go to the lower
    index (a group tied on its maximum with a chosen one is only skipped when it lies after it).
    """
    chunk, width = similarity.shape
    num_groups = width // _GROUP
    if 4 * k > num_groups:  # small reference sets: one plain top_k is as cheap
        return jax.lax.top_k(similarity, k)[1]
    grouped = similarity.reshape(chunk, num_groups, _GROUP)
    _, groups = jax.lax.top_k(jnp.max(grouped, axis=2), k)
    groups = jnp.sort(groups, axis=1)
    candidates = jnp.take_along_axis(grouped, groups[:, :, None], axis=1).reshape(chunk, k * _GROUP)
    candidate_column = (groups[:, :, None] * _GROUP + jnp.arange(_GROUP)).reshape(chunk, k * _GROUP)
    _, best = jax.lax.top_k(candidates, k)
    return jnp.take_along_axis(candidate_column, best, axis=1)


@functools.partial(jax.jit, static_argnames=("exclude_self", "top_r"))
def _ranking_terms(
    nearest, query_labels, query_index, num_relevant, reference_labels, *, exclude_self, top_r
):
    """MAP@R, R-Precision and P@1 per query from its nearest references.

    ``nearest`` ``(chunk, top_r + exclude_self)``: in self-retrieval the list has one extra entry
    and the query's own index is dropped from it (the last entry when the query is not there).
    """
    if exclude_self:
        is_self = nearest == query_index[:, None]
        self_at = jnp.where(jnp.any(is_self, axis=1), jnp.argmax(is_self, axis=1), top_r)
        before_self = jnp.arange(top_r)[None, :] < self_at[:, None]
        nearest = jnp.where(before_self, nearest[:, :top_r], nearest[:, 1:])
    relevant = (reference_labels[nearest] == query_labels[:, None]).astype(jnp.float32)
    position = jnp.arange(1, top_r + 1, dtype=jnp.float32)
    hits = relevant * (position[None, :] <= num_relevant[:, None])
    precision_at_i = jnp.cumsum(relevant, axis=1) / position
    safe_r = jnp.maximum(num_relevant, 1).astype(jnp.float32)
    return (
        jnp.sum(precision_at_i * hits, axis=1) / safe_r,
        jnp.sum(hits, axis=1) / safe_r,
        relevant[:, 0],
    )


def _chunk_statistics(
    queries,
    query_labels,
    query_index,
    positive_index,
    num_relevant,
    reference_padded,
    reference_labels,
    *,
    num_references,
    exclude_self,
    top_r,
):
    """Per-query rank of the first correct reference and the MAP@R / R-Precision / P@1 terms.

    Several small jitted steps rather than one: XLA:CPU otherwise fuses the broadcast of the
    per-row threshold into a full ``(chunk, N)`` buffer. The only full passes over the
    similarities are the matmul, the count and the group maxima of the top-k.
    """
    similarity = _similarities(queries, reference_padded, num_references=num_references)
    best, listed_at_least_best = _best_correct(
        similarity, positive_index, query_index, exclude_self=exclude_self
    )
    # Wrong references at least as similar as the best correct one (ties counted against it).
    rank_first_correct = _count_at_least(similarity, best) - listed_at_least_best
    if top_r > 0:
        nearest = _top_k_indices(similarity, k=top_r + int(exclude_self))
        terms = _ranking_terms(
            nearest,
            query_labels,
            query_index,
            num_relevant,
            reference_labels,
            exclude_self=exclude_self,
            top_r=top_r,
        )
    else:
        terms = (jnp.zeros(queries.shape[0], jnp.float32),) * 3
    return rank_first_correct, terms


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
      query_labels: ``(Q,)`` integer class ids.
      reference: ``(N, d)`` or None for self-retrieval (query set = reference set, self excluded).
      reference_labels: ``(N,)`` integer class ids, given exactly when ``reference`` is.
      ks: the K of Recall@K, any positive ints.
      chunk_size: queries per device step, a positive integer; None keeps ``chunk_size × N``
        near 64M.

    Returns:
      ``{"recall@K": ..., "precision@1": ..., "r_precision": ..., "map@r": ...}`` as Python floats.

    Raises:
      NonFiniteEmbeddingsError: a query or reference row holds a NaN or inf (checked before any
        similarity is computed).
      ValueError: inconsistent shapes, non-integer labels, a K < 1, a bad ``chunk_size``.
      TypeError: traced (jitted) arguments.
    """
    _require_concrete("retrieval_metrics", query, query_labels, reference, reference_labels)
    self_retrieval = reference is None
    if self_retrieval != (reference_labels is None):
        raise ValueError("give reference and reference_labels together, or neither (self-retrieval).")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1
    ):
        raise ValueError(
            f"chunk_size must be a positive integer (queries per device step) or None for the "
            f"default, got {chunk_size!r}."
        )
    if self_retrieval:
        reference, reference_labels = query, query_labels
    if jnp.ndim(query) != 2 or jnp.ndim(reference) != 2:
        raise ValueError(
            f"query and reference must be (num, dim); got {jnp.shape(query)} and {jnp.shape(reference)}."
        )
    if query.shape[1] != reference.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} differs from reference dim {reference.shape[1]}.")
    query_labels_np = _integer_labels(query_labels, "query_labels")
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
    if num_queries == 0 or num_references - (1 if self_retrieval else 0) < 1:
        raise ValueError("retrieval needs at least one query and one reference other than itself.")

    positive_index, num_relevant = _positive_lists(query_labels_np, reference_labels_np, self_retrieval)
    top_r = int(min(num_relevant.max(), num_references - (1 if self_retrieval else 0)))
    if chunk_size is None:
        chunk_size = max(1, min(num_queries, _CHUNK_ELEMENTS // num_references, 4096))
    chunk_size = int(min(chunk_size, num_queries))

    queries_n, bad_queries = _normalize_rows(query)
    if self_retrieval:
        reference_n, bad_references = queries_n, 0
    else:
        reference_n, bad_references = _normalize_rows(reference)
    if int(bad_queries):
        raise NonFiniteEmbeddingsError(
            int(bad_queries), num_queries, "embedding" if self_retrieval else "query embedding"
        )
    if int(bad_references):
        raise NonFiniteEmbeddingsError(int(bad_references), num_references, "reference embedding")
    width = -(-num_references // _GROUP) * _GROUP
    reference_p = jnp.pad(reference_n, ((0, width - num_references), (0, 0)))
    reference_labels_d = jnp.asarray(np.pad(reference_labels_np, (0, width - num_references)))
    num_chunks = -(-num_queries // chunk_size)
    padded = num_chunks * chunk_size
    queries_p = jnp.pad(queries_n, ((0, padded - num_queries), (0, 0)))
    labels_p = jnp.asarray(np.pad(query_labels_np, (0, padded - num_queries)))
    positives_p = jnp.asarray(np.pad(positive_index, ((0, padded - num_queries), (0, 0)), constant_values=-1))
    relevant_p = jnp.asarray(np.pad(num_relevant, (0, padded - num_queries)))

    outputs = []
    for start in range(0, padded, chunk_size):
        rows = slice(start, start + chunk_size)
        outputs.append(
            _chunk_statistics(
                queries_p[rows],
                labels_p[rows],
                jnp.arange(start, start + chunk_size),
                positives_p[rows],
                relevant_p[rows],
                reference_p,
                reference_labels_d,
                num_references=num_references,
                exclude_self=self_retrieval,
                top_r=top_r,
            )
        )
    rank = np.concatenate([np.asarray(r) for r, _ in outputs])[:num_queries]
    average_precision, r_precision, precision_at_1 = (
        np.concatenate([np.asarray(t[i]) for _, t in outputs])[:num_queries].astype(np.float64)
        for i in range(3)
    )
    has_relevant = num_relevant > 0
    rank = np.where(has_relevant, rank, num_references)  # no correct reference: never recalled
    metrics = {f"recall@{k}": float(np.mean(rank < k)) for k in ks}
    num_scored = max(int(has_relevant.sum()), 1)
    metrics["precision@1"] = float(precision_at_1[has_relevant].sum() / num_scored)
    metrics["r_precision"] = float(r_precision[has_relevant].sum() / num_scored)
    metrics["map@r"] = float(average_precision[has_relevant].sum() / num_scored)
    return metrics


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
    normalized, bad = _normalize_rows(embeddings)
    if int(bad):
        raise NonFiniteEmbeddingsError(int(bad), labels_np.shape[0], "embedding")
    num_clusters = int(np.unique(labels_np).size)
    _, assignments = cluster.kmeans(key, normalized, num_clusters, num_iters=num_iters)
    return cluster.normalized_mutual_info(labels_np, np.asarray(assignments))
