"""The device programs behind ``metrics.retrieval_metrics`` on one device.

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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax import hyperbolic
from hdml_jax.evaluation.finite import NonFiniteEmbeddingsError, _count_non_finite_rows
from hdml_jax.losses._common import FULL_PRECISION, l2_normalize

# Default chunk size: one chunk's similarity block near 32M floats (128 MiB), at most 1024 queries.
# Measured on XLA:CPU (d = 512): 512-1024 queries a chunk run 20-30% faster than 3,000-4,000
# (the block and the reference set then stream through the caches better).
_CHUNK_ELEMENTS = 1 << 25


_MAX_CHUNK = 1024


# References are handled in groups of this many columns (the reference set is padded with zero
# rows to a multiple of it): a group's maximum lets the top-k look only at the few groups that
# can hold the k nearest.
GROUP = 64


@functools.partial(jax.jit, static_argnames=("rows",))
def normalize_rows(x: jax.Array, rows: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``(x̂ (N, d) float32 L2-normalised rows, number of rows holding a NaN or inf)``, one pass.

    With ``rows``, ``x̂`` comes zero-padded to that many rows, written in the same pass.
    """
    x = x.astype(jnp.float32)
    normalized = l2_normalize(x)
    if rows is not None and rows > x.shape[0]:
        normalized = jnp.pad(normalized, ((0, rows - x.shape[0]), (0, 0)))
    return normalized, _count_non_finite_rows(x)


@functools.partial(jax.jit, static_argnames=("rows",))
def ball_rows(x: jax.Array, rows: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The Poincaré form of ``normalize_rows``: ``(x (R, d) float32 as they are, ‖x‖² (R,),
    number of rows holding a NaN or inf)``; padding rows are zero with ``‖x‖² = −1``, the mark
    ``poincare_similarity`` gives exactly 0 (as zero references hold in the cosine form)."""
    x = x.astype(jnp.float32)
    squared = jnp.sum(x * x, axis=1)
    if rows is not None and rows > x.shape[0]:
        pad = rows - x.shape[0]
        x, squared = jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(squared, (0, pad), constant_values=-1.0)
    return x, squared, _count_non_finite_rows(x)


def poincare_similarity(products, query_squared, reference_squared, curvature):
    """A similarity that ranks as ``−d_c(q, r)`` does, from a block of products ``⟨q, r⟩ (chunk,
    W)`` and the squared norms; padding columns (``‖r‖² = −1``) hold exactly 0.

    ``d_c = 2/√c · artanh(min(√c ζ, 1 − 1e-5))`` (hyptorch's ``dist_matrix``, which HIER and Hyp
    rank by; ``hdml_jax.hyperbolic.distance_from_gram``) is strictly increasing in
    ``min(ζ², (1 − 1e-5)²/c)``, ``ζ = ‖(−q) ⊕ r‖``, so that quantity, negated, gives the same
    ranking and the same ties (the clamp's included) without the square root and the logarithms:
    a few multiplications per entry, fused by XLA into the pass the product wrote.
    """
    squared, denominator = hyperbolic.mobius_difference_parts(
        query_squared[:, None], jnp.maximum(reference_squared, 0.0)[None, :], products, curvature
    )
    limit = (1 - hyperbolic.ARTANH_CLAMP) ** 2 / curvature
    zeta_squared = jnp.minimum(squared / (denominator * denominator), limit)
    return jnp.where(reference_squared[None, :] < 0, 0.0, -zeta_squared)


def group_max_and_count(similarity, threshold, num_valid, padded_groups):
    """One pass over a ``(chunk, W)`` block: per group of ``GROUP`` columns, the largest entry,
    and per row the number of entries ``>= threshold``.

    Columns from ``num_valid`` on are padding (zero references: they hold exactly 0) and count in
    neither; they lie in the last ``padded_groups`` groups at most (a static bound). Returns
    ``(maxima (chunk, W / GROUP) float32, counts (chunk,) int32)``.

    Both reductions are one variadic reduce over the unmasked block, so XLA reads the block once
    for the two (on XLA:CPU as fast as the maxima alone). The padding is taken out afterwards, at
    the cost of a ``(chunk, padded_groups × GROUP)`` slice: its zeros are subtracted from the count
    and the maxima of its groups are taken again without it. (A padding mask inside the fused
    reduction stops its vectorisation: 10× slower on XLA:CPU.)
    """
    chunk, width = similarity.shape
    num_groups = width // GROUP
    grouped = similarity.reshape(chunk, num_groups, GROUP)
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
        first = (num_groups - tail) * GROUP
        column = first + jnp.arange(tail * GROUP).reshape(tail, GROUP)
        last = jnp.where(column < num_valid, grouped[:, num_groups - tail :], -jnp.inf)
        maxima = maxima.at[:, num_groups - tail :].set(jnp.max(last, axis=2))
    return maxima, counts


def top_k(similarity, maxima, *, k, num_valid):
    """``(values, columns)`` of the ``k`` largest entries per row, ties to the lower column (exact).

    Two stages: the ``k`` groups of ``GROUP`` columns with the largest ``maxima`` (from
    ``group_max_and_count``) must hold the ``k`` largest entries (any entry outside them is beaten
    by those ``k`` maxima), so the final ``top_k`` looks at ``k × GROUP`` candidates instead of the
    whole row. The chosen groups are taken in column order, so candidate order is column order and
    ties still go to the lower index (a group tied on its maximum with a chosen one is only skipped
    when it lies after it). Padding columns (``>= num_valid``) come out as ``-inf``.
    """
    chunk, width = similarity.shape
    num_groups = width // GROUP
    if 4 * k > num_groups:  # small reference sets: one plain top_k is as cheap
        column = jnp.arange(width)
        return jax.lax.top_k(jnp.where(column < num_valid, similarity, -jnp.inf), k)
    grouped = similarity.reshape(chunk, num_groups, GROUP)
    _, groups = jax.lax.top_k(maxima, k)
    groups = jnp.sort(groups, axis=1)
    candidate_column = (groups[:, :, None] * GROUP + jnp.arange(GROUP)).reshape(chunk, k * GROUP)
    candidates = jnp.take_along_axis(grouped, groups[:, :, None], axis=1).reshape(chunk, k * GROUP)
    candidates = jnp.where(candidate_column < num_valid, candidates, -jnp.inf)
    values, best = jax.lax.top_k(candidates, k)
    return values, jnp.take_along_axis(candidate_column, best, axis=1)


def relevance(nearest, nearest_labels, query_labels, query_index, *, exclude_self, top_r):
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


def chunk_statistics(
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

    Returns ``(rank (chunk,) int32, relevant (chunk, top_r) bool)`` (see ``relevance``).
    ``similarity`` ``(chunk, W)`` holds the columns ``column_start ... column_start + W - 1`` of the
    chunk's similarities (``reference_labels`` their labels); columns from ``num_references`` on are
    padding (zero references, in the last ``padded_groups`` groups of ``GROUP`` columns). With
    ``axis_name`` the other columns lie on the other devices of that mesh axis, in order: the best
    correct similarity is a ``pmax``, the counts a ``psum``, and the local top-k lists are
    all-gathered and merged by one more ``top_k``.

    The full passes over the block are the matmul that wrote it and one fused reduction
    (``group_max_and_count``); the rest reads the ``(chunk, width)`` gathered entries and the
    ``k × GROUP`` candidates of the top-k. (The two ``top_k`` calls, over the group maxima and
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
    maxima, at_least_best = group_max_and_count(similarity, best, num_valid, padded_groups)
    # Wrong references at least as similar as the best correct one (ties counted against it): all
    # columns that reach it, less the listed ones (self included) that do.
    rank_first_correct = at_least_best - jnp.sum(listed & (gathered >= best[:, None]), axis=1)
    if axis_name is not None:
        rank_first_correct = jax.lax.psum(rank_first_correct, axis_name)
    if top_r == 0:
        return rank_first_correct, jnp.zeros((similarity.shape[0], 0), bool)
    k = top_r + int(exclude_self)
    values, nearest = top_k(similarity, maxima, k=min(k, width), num_valid=num_valid)
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
    relevant = relevance(
        nearest, nearest_labels, query_labels, query_index, exclude_self=exclude_self, top_r=top_r
    )
    return rank_first_correct, relevant


@functools.partial(
    jax.jit, static_argnames=("num_references", "chunk_size", "exclude_self", "top_r", "curvature")
)
def all_chunks(
    queries,
    query_labels,
    positive_index,
    reference,
    reference_labels,
    self_column=None,
    query_squared=None,
    reference_squared=None,
    *,
    num_references,
    chunk_size,
    exclude_self,
    top_r,
    curvature=0.0,
):
    """Single-device statistics of every query: one loop over the query chunks.

    One program rather than a jitted step per chunk: the ``(chunk, W)`` block is then one buffer
    reused by every chunk (a fresh block per step cost page faults worth ~20% of the matmul on
    XLA:CPU), and no step waits on the host. ``query_labels`` has one entry per query (``Q``);
    ``queries`` may have more rows (in self-retrieval it is the padded reference array). The last
    chunk starts at ``Q - chunk_size``, overlapping the one before (its rows are computed twice,
    identically), so no query array is padded or copied. ``self_column`` ``(Q,)``: the reference
    column that is each query itself (-1: none); None: query ``i`` is reference ``i``
    (self-retrieval, where it is not read from memory at all). ``curvature > 0``: the rows are
    points of that Poincaré ball, ranked by ``poincare_similarity`` from their squared norms
    (``query_squared`` aligned with ``queries``, ``reference_squared`` with ``reference``).
    """
    num_queries = query_labels.shape[0]
    padded_groups = reference.shape[0] // GROUP - num_references // GROUP

    def one_chunk(i, results):
        start = jnp.minimum(i * chunk_size, num_queries - chunk_size)

        def rows(a):
            return jax.lax.dynamic_slice_in_dim(a, start, chunk_size)

        similarity = jnp.matmul(rows(queries), reference.T, precision=FULL_PRECISION)
        if curvature:
            similarity = poincare_similarity(similarity, rows(query_squared), reference_squared, curvature)
        chunk_results = chunk_statistics(
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


def pad_rows(x: np.ndarray, rows: int, value=0) -> np.ndarray:
    return np.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1), constant_values=value)


def single_device_statistics(
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
    curvature=0.0,
):
    """``(rank (Q,), relevant (Q, top_r) bool)`` on the default device.

    ``self_retrieval``: ``query`` is the reference set (normalised once, query ``i`` is reference
    ``i``). Otherwise ``self_column`` ``(Q,)`` is the reference column of each query itself (-1:
    none), or None when no query is a reference. ``curvature > 0``: Poincaré distances of the
    rows as they are (``ball_rows``), not cosines.
    """
    num_queries, num_references = query.shape[0], reference.shape[0]
    width = -(-num_references // GROUP) * GROUP
    query_squared = reference_squared = None
    if curvature:
        if self_retrieval:
            reference_n, reference_squared, bad_queries = ball_rows(query, rows=width)
            queries_n, query_squared, bad_references = reference_n, reference_squared, 0
        else:
            queries_n, query_squared, bad_queries = ball_rows(query)
            reference_n, reference_squared, bad_references = ball_rows(reference, rows=width)
    elif self_retrieval:
        reference_n, bad_queries = normalize_rows(query, rows=width)
        queries_n, bad_references = reference_n, 0
    else:
        queries_n, bad_queries = normalize_rows(query)
        reference_n, bad_references = normalize_rows(reference, rows=width)
    if int(bad_queries):
        raise NonFiniteEmbeddingsError(
            int(bad_queries), num_queries, "embedding" if self_retrieval else "query embedding"
        )
    if int(bad_references):
        raise NonFiniteEmbeddingsError(int(bad_references), num_references, "reference embedding")
    if chunk_size is None:
        chunk_size = default_chunk_size(num_queries, num_references)
    rank, relevant = all_chunks(
        queries_n,
        jnp.asarray(query_labels),
        jnp.asarray(positive_index),
        reference_n,
        jnp.asarray(pad_rows(reference_labels, width)),
        None if self_column is None else jnp.asarray(self_column),
        query_squared,
        reference_squared,
        num_references=num_references,
        chunk_size=int(min(chunk_size, num_queries)),
        exclude_self=self_retrieval or self_column is not None,
        top_r=top_r,
        curvature=float(curvature),
    )
    return np.asarray(rank), np.asarray(relevant)
