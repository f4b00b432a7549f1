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

How it is computed: queries go through in chunks (one loop in one program); for each chunk the
similarities to every reference are one matmul on device, and that ``(chunk, N)`` block is then
read exactly once more. Recall@K needs no top-K list at all: the rank of the first correct
reference is the number of wrong references at least as similar as the best correct one (a count
over the row; the best correct similarity is a small gather, since the references of each label
are listed on the host), so ``recall@K = [rank < K]`` for every K at once, whatever K is (1000 on
SOP costs nothing extra). MAP@R and R-Precision need the ``R_max`` nearest references (``R_max`` =
the largest class size, 11 on SOP): the maxima of groups of 64 references point to the few groups
that hold them, and a ``top_k`` over those groups finds them exactly. The count and the group
maxima are one variadic reduction, i.e. the same single pass over the block; the per-query
MAP@R / R-Precision / P@1 terms are computed on the host, in float64, from the ``R_max``
relevance flags of each query. Memory per chunk is one ``chunk_size × N`` float block; no
``(chunk, N)`` mask is built.

Sharded references (``retrieval_metrics(..., mesh=...)``), for reference sets larger than one
device's memory: the references are split by row over the devices of a 1-D mesh (each device
normalises and holds ``N / D`` of them, in order), query chunks are sent to every device, and each
device computes its block, its part of the count and its own top-``R_max`` list. The best correct
similarity is a ``pmax``, the counts a ``psum``, and the ``D`` lists are all-gathered and merged
by one ``top_k``: devices hold the references in index order and each list keeps ties in index
order, so the merge keeps the tie rule. The results equal the single-device ones exactly.

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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hdml_jax.evaluation import cluster
from hdml_jax.evaluation.finite import NonFiniteEmbeddingsError, _count_non_finite_rows, check_finite
from hdml_jax.evaluation.query_gallery import count_unmatched_queries, query_gallery_rows
from hdml_jax.losses._common import FULL_PRECISION, is_concrete, l2_normalize

__all__ = [
    "UNMATCHED_QUERIES",
    "NonFiniteEmbeddingsError",
    "check_finite",
    "count_unmatched_queries",
    "default_chunk_size",
    "nmi",
    "retrieval_metrics",
]

# Default chunk size: one chunk's similarity block near 32M floats (128 MiB), at most 1024 queries.
# Measured on XLA:CPU (d = 512): 512-1024 queries a chunk run 20-30% faster than 3,000-4,000
# (the block and the reference set then stream through the caches better).
_CHUNK_ELEMENTS = 1 << 25
_MAX_CHUNK = 1024
# References are handled in groups of this many columns (the reference set is padded with zero
# rows to a multiple of it): a group's maximum lets the top-k look only at the few groups that
# can hold the k nearest.
_GROUP = 64


@functools.partial(jax.jit, static_argnames=("rows",))
def _normalize_rows(x: jax.Array, rows: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``(x̂ (N, d) float32 L2-normalised rows, number of rows holding a NaN or inf)``, one pass.

    With ``rows``, ``x̂`` comes zero-padded to that many rows, written in the same pass.
    """
    x = x.astype(jnp.float32)
    normalized = l2_normalize(x)
    if rows is not None and rows > x.shape[0]:
        normalized = jnp.pad(normalized, ((0, rows - x.shape[0]), (0, 0)))
    return normalized, _count_non_finite_rows(x)


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


def _group_max_and_count(similarity, threshold, num_valid, padded_groups):
    """One pass over a ``(chunk, W)`` block: per group of ``_GROUP`` columns, the largest entry,
    and per row the number of entries ``>= threshold``.

    Columns from ``num_valid`` on are padding (zero references: they hold exactly 0) and count in
    neither; they lie in the last ``padded_groups`` groups at most (a static bound). Returns
    ``(maxima (chunk, W / _GROUP) float32, counts (chunk,) int32)``.

    Both reductions are one variadic reduce over the unmasked block, so XLA reads the block once
    for the two (on XLA:CPU as fast as the maxima alone). The padding is taken out afterwards, at
    the cost of a ``(chunk, padded_groups × _GROUP)`` slice: its zeros are subtracted from the count
    and the maxima of its groups are taken again without it. (A padding mask inside the fused
    reduction stops its vectorisation: 10× slower on XLA:CPU.)
    """
    chunk, width = similarity.shape
    num_groups = width // _GROUP
    grouped = similarity.reshape(chunk, num_groups, _GROUP)
    maxima, counts = jax.lax.reduce(
        (grouped, (grouped >= threshold[:, None, None]).astype(jnp.int32)),
        (jnp.float32(-jnp.inf), jnp.int32(0)),
        lambda a, b: (jnp.maximum(a[0], b[0]), a[1] + b[1]),
        (2,),
    )
    num_padding = jnp.clip(width - num_valid, 0, width)
    counts = jnp.sum(counts, axis=1) - num_padding * (threshold <= 0).astype(jnp.int32)
    tail = min(padded_groups, num_groups)
    if tail:
        first = (num_groups - tail) * _GROUP
        column = first + jnp.arange(tail * _GROUP).reshape(tail, _GROUP)
        last = jnp.where(column < num_valid, grouped[:, num_groups - tail :], -jnp.inf)
        maxima = maxima.at[:, num_groups - tail :].set(jnp.max(last, axis=2))
    return maxima, counts


def _top_k(similarity, maxima, *, k, num_valid):
    """``(values, columns)`` of the ``k`` largest entries per row, ties to the lower column (exact).

    Two stages: the ``k`` groups of ``_GROUP`` columns with the largest ``maxima`` (from
    ``_group_max_and_count``) must hold the ``k`` largest entries (any entry outside them is beaten
    by those ``k`` maxima), so the final ``top_k`` looks at ``k × _GROUP`` candidates instead of the
    whole row. The chosen groups are taken in column order, so candidate order is column order and
    ties still go to the lower index (a group tied on its maximum with a chosen one is only skipped
    when it lies after it). Padding columns (``>= num_valid``) come out as ``-inf``.
    """
    chunk, width = similarity.shape
    num_groups = width // _GROUP
    if 4 * k > num_groups:  # small reference sets: one plain top_k is as cheap
        column = jnp.arange(width)
        return jax.lax.top_k(jnp.where(column < num_valid, similarity, -jnp.inf), k)
    grouped = similarity.reshape(chunk, num_groups, _GROUP)
    _, groups = jax.lax.top_k(maxima, k)
    groups = jnp.sort(groups, axis=1)
    candidate_column = (groups[:, :, None] * _GROUP + jnp.arange(_GROUP)).reshape(chunk, k * _GROUP)
    candidates = jnp.take_along_axis(grouped, groups[:, :, None], axis=1).reshape(chunk, k * _GROUP)
    candidates = jnp.where(candidate_column < num_valid, candidates, -jnp.inf)
    values, best = jax.lax.top_k(candidates, k)
    return values, jnp.take_along_axis(candidate_column, best, axis=1)


def _relevance(nearest, nearest_labels, query_labels, query_index, *, exclude_self, top_r):
    """``(chunk, top_r)`` bool: whether each of the ``top_r`` nearest references shares the label.

    ``nearest`` ``(chunk, top_r + exclude_self)``: in self-retrieval the list has one extra entry
    and the query's own index is dropped from it (the last entry when the query is not there).
    MAP@R, R-Precision and P@1 follow from these flags on the host (``_ranking_terms``), in
    float64: the same numbers whichever program (single device or sharded) produced the flags.
    """
    if exclude_self:
        is_self = nearest == query_index[:, None]
        self_at = jnp.where(jnp.any(is_self, axis=1), jnp.argmax(is_self, axis=1), top_r)
        before_self = jnp.arange(top_r)[None, :] < self_at[:, None]
        nearest_labels = jnp.where(before_self, nearest_labels[:, :top_r], nearest_labels[:, 1:])
    return nearest_labels == query_labels[:, None]


def _ranking_terms(relevant: np.ndarray, num_relevant: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(MAP@R, R-Precision, P@1)`` per query (float64) from ``_relevance``'s flags and R."""
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


def _chunk_statistics(
    similarity,
    positive_index,
    query_labels,
    query_index,
    reference_labels,
    *,
    num_references,
    padded_groups,
    column_start,
    exclude_self,
    top_r,
    axis_name=None,
):
    """Per query: the rank of the first correct reference and the relevance of the top-R list.

    Returns ``(rank (chunk,) int32, relevant (chunk, top_r) bool)`` (see ``_relevance``).
    ``similarity`` ``(chunk, W)`` holds the columns ``column_start ... column_start + W - 1`` of the
    chunk's similarities (``reference_labels`` their labels); columns from ``num_references`` on are
    padding (zero references, in the last ``padded_groups`` groups of ``_GROUP`` columns). With
    ``axis_name`` the other columns lie on the other devices of that mesh axis, in order: the best
    correct similarity is a ``pmax``, the counts a ``psum``, and the local top-k lists are
    all-gathered and merged by one more ``top_k``.

    The full passes over the block are the matmul that wrote it and one fused reduction
    (``_group_max_and_count``); the rest reads the ``(chunk, width)`` gathered entries and the
    ``k × _GROUP`` candidates of the top-k. (The two ``top_k`` calls, over the group maxima and
    over the candidates, run single-threaded on XLA:CPU: about 4 µs a query at N = 20,000,
    some 7% of the time there.)
    """
    width = similarity.shape[1]
    num_valid = num_references - column_start
    # Best correct similarity, gathered from the very block the count reads (bit for bit the same
    # values). ``positive_index`` lists the same-label references, padded with -1; in
    # self-retrieval it includes the query itself.
    local_index = positive_index - column_start
    listed = (positive_index >= 0) & (local_index >= 0) & (local_index < width)
    gathered = jnp.take_along_axis(similarity, jnp.clip(local_index, 0, width - 1), axis=1)
    correct = listed & (positive_index != query_index[:, None]) if exclude_self else listed
    best = jnp.max(jnp.where(correct, gathered, -jnp.inf), axis=1)
    if axis_name is not None:
        best = jax.lax.pmax(best, axis_name)
    maxima, at_least_best = _group_max_and_count(similarity, best, num_valid, padded_groups)
    # Wrong references at least as similar as the best correct one (ties counted against it): all
    # columns that reach it, less the listed ones (self included) that do.
    rank_first_correct = at_least_best - jnp.sum(listed & (gathered >= best[:, None]), axis=1)
    if axis_name is not None:
        rank_first_correct = jax.lax.psum(rank_first_correct, axis_name)
    if top_r == 0:
        return rank_first_correct, jnp.zeros((similarity.shape[0], 0), bool)
    k = top_r + int(exclude_self)
    values, nearest = _top_k(similarity, maxima, k=min(k, width), num_valid=num_valid)
    nearest_labels = reference_labels[nearest]
    nearest = nearest + column_start
    if axis_name is not None:
        # Device order is column order and each list is sorted with ties to the lower column, so
        # position order among equal values is column order: top_k keeps the tie rule.
        values, nearest, nearest_labels = (
            jax.lax.all_gather(a, axis_name, axis=1, tiled=True) for a in (values, nearest, nearest_labels)
        )
        values, pick = jax.lax.top_k(values, k)
        nearest = jnp.take_along_axis(nearest, pick, axis=1)
        nearest_labels = jnp.take_along_axis(nearest_labels, pick, axis=1)
    relevant = _relevance(
        nearest, nearest_labels, query_labels, query_index, exclude_self=exclude_self, top_r=top_r
    )
    return rank_first_correct, relevant


@functools.partial(jax.jit, static_argnames=("num_references", "chunk_size", "exclude_self", "top_r"))
def _all_chunks(
    queries,
    query_labels,
    positive_index,
    reference,
    reference_labels,
    self_column=None,
    *,
    num_references,
    chunk_size,
    exclude_self,
    top_r,
):
    """Single-device statistics of every query: one loop over the query chunks.

    One program rather than a jitted step per chunk: the ``(chunk, W)`` block is then one buffer
    reused by every chunk (a fresh block per step cost page faults worth ~20% of the matmul on
    XLA:CPU), and no step waits on the host. ``query_labels`` has one entry per query (``Q``);
    ``queries`` may have more rows (in self-retrieval it is the padded reference array). The last
    chunk starts at ``Q - chunk_size``, overlapping the one before (its rows are computed twice,
    identically), so no query array is padded or copied. ``self_column`` ``(Q,)``: the reference
    column that is each query itself (-1: none); None: query ``i`` is reference ``i``
    (self-retrieval, where it is not read from memory at all).
    """
    num_queries = query_labels.shape[0]
    padded_groups = reference.shape[0] // _GROUP - num_references // _GROUP

    def one_chunk(i, results):
        start = jnp.minimum(i * chunk_size, num_queries - chunk_size)

        def rows(a):
            return jax.lax.dynamic_slice_in_dim(a, start, chunk_size)

        similarity = jnp.matmul(rows(queries), reference.T, precision=FULL_PRECISION)
        chunk_results = _chunk_statistics(
            similarity,
            rows(positive_index),
            rows(query_labels),
            start + jnp.arange(chunk_size) if self_column is None else rows(self_column),
            reference_labels,
            num_references=num_references,
            padded_groups=padded_groups,
            column_start=0,
            exclude_self=exclude_self,
            top_r=top_r,
        )
        return tuple(
            jax.lax.dynamic_update_slice_in_dim(whole, part, start, 0)
            for whole, part in zip(results, chunk_results, strict=True)
        )

    results = (jnp.zeros(num_queries, jnp.int32), jnp.zeros((num_queries, top_r), bool))
    return jax.lax.fori_loop(0, -(-num_queries // chunk_size), one_chunk, results)


def default_chunk_size(num_queries: int, num_references: int) -> int:
    """Queries per step when ``chunk_size`` is None: ``chunk × N`` (per device) near 32M, ≤ 1024."""
    return max(1, min(num_queries, _CHUNK_ELEMENTS // max(num_references, 1), _MAX_CHUNK))


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


def _pad_rows(x: np.ndarray, rows: int, value=0) -> np.ndarray:
    return np.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1), constant_values=value)


def _single_device_statistics(
    query,
    reference,
    self_retrieval,
    query_labels,
    reference_labels,
    positive_index,
    self_column,
    *,
    chunk_size,
    top_r,
):
    """``(rank (Q,), relevant (Q, top_r) bool)`` on the default device.

    ``self_retrieval``: ``query`` is the reference set (normalised once, query ``i`` is reference
    ``i``). Otherwise ``self_column`` ``(Q,)`` is the reference column of each query itself (-1:
    none), or None when no query is a reference.
    """
    num_queries, num_references = query.shape[0], reference.shape[0]
    width = -(-num_references // _GROUP) * _GROUP
    if self_retrieval:
        reference_n, bad_queries = _normalize_rows(query, rows=width)
        queries_n, bad_references = reference_n, 0
    else:
        queries_n, bad_queries = _normalize_rows(query)
        reference_n, bad_references = _normalize_rows(reference, rows=width)
    if int(bad_queries):
        raise NonFiniteEmbeddingsError(
            int(bad_queries), num_queries, "embedding" if self_retrieval else "query embedding"
        )
    if int(bad_references):
        raise NonFiniteEmbeddingsError(int(bad_references), num_references, "reference embedding")
    if chunk_size is None:
        chunk_size = default_chunk_size(num_queries, num_references)
    rank, relevant = _all_chunks(
        queries_n,
        jnp.asarray(query_labels),
        jnp.asarray(positive_index),
        reference_n,
        jnp.asarray(_pad_rows(reference_labels, width)),
        None if self_column is None else jnp.asarray(self_column),
        num_references=num_references,
        chunk_size=int(min(chunk_size, num_queries)),
        exclude_self=self_retrieval or self_column is not None,
        top_r=top_r,
    )
    return np.asarray(rank), np.asarray(relevant)


def _host_float32(x) -> np.ndarray:
    """A concrete array as float32 on the host (one transfer for a JAX array)."""
    return np.asarray(jax.device_get(x) if isinstance(x, jax.Array) else x).astype(np.float32, copy=False)


def _sharded_rows(values: np.ndarray, rows: int, sharding) -> jax.Array:
    """``values`` zero-padded to ``rows`` rows and split over ``sharding``'s devices by row, each
    device receiving only its own rows (no padded copy of the whole array on the host)."""

    def piece(index):
        start, stop, _ = index[0].indices(rows)
        out = np.zeros((stop - start, *values.shape[1:]), values.dtype)
        present = values[start : min(stop, values.shape[0])]
        out[: present.shape[0]] = present
        return out

    return jax.make_array_from_callback((rows, *values.shape[1:]), sharding, piece)


@functools.partial(
    jax.jit, static_argnames=("mesh", "num_references", "padded_groups", "exclude_self", "top_r")
)
def _sharded_chunk(
    queries,
    query_labels,
    query_index,
    positive_index,
    reference,
    reference_labels,
    *,
    mesh,
    num_references,
    padded_groups,
    exclude_self,
    top_r,
):
    """One query chunk (replicated) against the references split by row over ``mesh``'s axis."""
    axis = mesh.axis_names[0]

    def local(q, labels, index, positives, reference, reference_labels):
        similarity = jnp.matmul(q, reference.T, precision=FULL_PRECISION)
        return _chunk_statistics(
            similarity,
            positives,
            labels,
            index,
            reference_labels,
            num_references=num_references,
            padded_groups=padded_groups,
            column_start=jax.lax.axis_index(axis) * reference.shape[0],
            exclude_self=exclude_self,
            top_r=top_r,
            axis_name=axis,
        )

    replicated, split = P(), P(axis)
    # The outputs are the same on every device (psum / pmax, or computed from all-gathered lists),
    # which the replication check cannot infer through all_gather: it is turned off.
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(replicated,) * 4 + (split, split),
        out_specs=(replicated, replicated),
        check_vma=False,
    )(queries, query_labels, query_index, positive_index, reference, reference_labels)


def _sharded_statistics(
    query,
    reference,
    self_retrieval,
    query_labels,
    reference_labels,
    positive_index,
    self_column,
    *,
    mesh,
    chunk_size,
    top_r,
):
    """``_single_device_statistics`` with the references split over the devices of ``mesh``.

    Each device holds ``W / D`` of the (padded) references, normalised where they lie; query chunks
    go from the host to every device. The per-query results equal the single-device ones exactly:
    the similarities are the same products, the best correct one is a ``pmax``, the counts a
    ``psum`` and the top-R an all-gather of the local top-R lists merged by ``top_k`` (see
    ``_chunk_statistics``).
    """
    num_devices = mesh.devices.size
    query_np = _host_float32(query)
    if self_retrieval:
        reference_np = query_np
    else:
        check_finite(query_np, "query embedding")
        reference_np = _host_float32(reference)
    num_queries, num_references = query_np.shape[0], reference_np.shape[0]
    width = -(-num_references // (_GROUP * num_devices)) * _GROUP * num_devices
    split = NamedSharding(mesh, P(mesh.axis_names[0]))
    replicated = NamedSharding(mesh, P())
    reference_n, bad_references = _normalize_rows(_sharded_rows(reference_np, width, split))
    if int(bad_references):
        raise NonFiniteEmbeddingsError(
            int(bad_references), num_references, "embedding" if self_retrieval else "reference embedding"
        )
    reference_labels_d = _sharded_rows(reference_labels.astype(np.int32), width, split)
    if chunk_size is None:
        chunk_size = default_chunk_size(num_queries, width // num_devices)
    chunk_size = int(min(chunk_size, num_queries))
    query_labels = query_labels.astype(np.int32)
    exclude_self = self_retrieval or self_column is not None
    if self_column is None:
        self_column = np.arange(num_queries, dtype=np.int32)  # read only when exclude_self

    def chunk_of(values, start, fill=0):
        rows = _pad_rows(values[start : start + chunk_size], chunk_size, fill)
        return jax.device_put(rows, replicated)

    outputs = []
    for start in range(0, num_queries, chunk_size):
        queries_n, _ = _normalize_rows(chunk_of(query_np, start))
        outputs.append(
            _sharded_chunk(
                queries_n,
                chunk_of(query_labels, start),
                chunk_of(self_column.astype(np.int32), start, -1),
                chunk_of(positive_index, start, -1),
                reference_n,
                reference_labels_d,
                mesh=mesh,
                num_references=num_references,
                padded_groups=width // _GROUP - num_references // _GROUP,
                exclude_self=exclude_self,
                top_r=top_r,
            )
        )
    rank = np.concatenate([np.asarray(r) for r, _ in outputs])
    return rank, np.concatenate([np.asarray(r) for _, r in outputs])


UNMATCHED_QUERIES = ("skip", "miss")


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
        _single_device_statistics if mesh is None else functools.partial(_sharded_statistics, mesh=mesh)
    )
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
    normalized, bad = _normalize_rows(embeddings)
    if int(bad):
        raise NonFiniteEmbeddingsError(int(bad), labels_np.shape[0], "embedding")
    num_clusters = int(np.unique(labels_np).size)
    _, assignments = cluster.kmeans(key, normalized, num_clusters, num_iters=num_iters)
    return cluster.normalized_mutual_info(labels_np, np.asarray(assignments))
