"""k-means with k-means++ initialisation, jit-compiled, fixed shapes, no empty clusters.

Used to build HPL's coarse proxies from the fine ones and for the NMI metric. Distances are
squared Euclidean; all work is done in blocks of points so that ``N × k`` never has to fit in
memory at once (NMI on SOP clusters 60k points into 11k clusters).

Similarity products run at HIGHEST precision: the ``points · centroidsᵀ`` of the distance expansion
passes ``precision=FULL_PRECISION`` (``hdml_jax.losses._common``), so that assignments do not flip on
bf16/TF32 rounding on TPUs and recent GPUs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.evaluation.finite import check_finite
from hdml_jax.losses._common import FULL_PRECISION


def _sq_dists(points: jax.Array, centroids: jax.Array) -> jax.Array:
    """``(n, k)`` squared distances, clipped at 0."""
    d = (
        jnp.sum(points * points, axis=1, keepdims=True)
        - jnp.matmul(2.0 * points, centroids.T, precision=FULL_PRECISION)
        + jnp.sum(centroids * centroids, axis=1)[None, :]
    )
    return jnp.maximum(d, 0.0)


def _blocks(points: jax.Array, block_size: int) -> tuple[jax.Array, int]:
    """Pad ``points`` to a multiple of ``block_size`` rows and reshape to ``(blocks, size, d)``."""
    n = points.shape[0]
    num_blocks = -(-n // block_size)
    padded = jnp.pad(points, ((0, num_blocks * block_size - n), (0, 0)))
    return padded.reshape(num_blocks, block_size, points.shape[1]), n


def _nearest(points: jax.Array, centroids: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Index of and squared distance to the nearest centroid, for every point, block by block."""
    blocks, n = _blocks(points, block_size)

    def one_block(block):
        d = _sq_dists(block, centroids)
        return jnp.argmin(d, axis=1), jnp.min(d, axis=1)

    index, dist = jax.lax.map(one_block, blocks)
    return index.reshape(-1)[:n], dist.reshape(-1)[:n]


def _kmeans_plus_plus(key: jax.Array, points: jax.Array, num_clusters: int) -> jax.Array:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn ∝ D² to the nearest."""
    n = points.shape[0]
    key, first_key = jax.random.split(key)
    first = jax.random.randint(first_key, (), 0, n)
    centroids = jnp.zeros((num_clusters, points.shape[1]), points.dtype).at[0].set(points[first])
    min_sq_dist = _sq_dists(points, points[first][None, :])[:, 0]

    def add_centre(i, carry):
        centroids, min_sq_dist, key = carry
        key, draw_key = jax.random.split(key)
        total = jnp.sum(min_sq_dist)
        # When every point already coincides with a centre, fall back to a uniform draw.
        probs = jnp.where(total > 0, min_sq_dist / jnp.where(total > 0, total, 1.0), 1.0 / n)
        chosen = jax.random.choice(draw_key, n, p=probs)
        centroids = centroids.at[i].set(points[chosen])
        min_sq_dist = jnp.minimum(min_sq_dist, _sq_dists(points, points[chosen][None, :])[:, 0])
        return centroids, min_sq_dist, key

    centroids, _, _ = jax.lax.fori_loop(1, num_clusters, add_centre, (centroids, min_sq_dist, key))
    return centroids


def _update_centroids(points, assignments, old_centroids, num_clusters):
    sums = jax.ops.segment_sum(points, assignments, num_segments=num_clusters)
    counts = jax.ops.segment_sum(jnp.ones_like(assignments, points.dtype), assignments, num_clusters)
    centroids = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], old_centroids)
    return centroids, counts


def _fill_empty_clusters(points, assignments, sq_dist, counts, num_clusters):
    """Move points into empty clusters so that every cluster ends with at least one point.

    The points that are farthest from their centroid are moved, but never the last point of a
    cluster: within each cluster the points are ranked by distance (farthest first) and only the
    ``count - 1`` farthest may leave. With ``N ≥ k`` there are ``N - (#non-empty) ≥ #empty`` such
    points, so every empty cluster gets one.
    """
    n = points.shape[0]
    order = jnp.lexsort((-sq_dist, assignments))  # by cluster, farthest first within a cluster
    sorted_cluster = assignments[order]
    first_of_cluster = jnp.searchsorted(sorted_cluster, sorted_cluster, side="left")
    rank_in_cluster = jnp.arange(n) - first_of_cluster
    may_leave_sorted = rank_in_cluster < counts[sorted_cluster].astype(jnp.int32) - 1
    may_leave = jnp.zeros((n,), bool).at[order].set(may_leave_sorted)

    candidates = jnp.argsort(jnp.where(may_leave, -sq_dist, jnp.inf))  # movable, farthest first
    is_empty = counts == 0
    empty_rank = jnp.cumsum(is_empty) - 1  # j-th empty cluster takes the j-th candidate
    movers = candidates[jnp.clip(empty_rank, 0, n - 1)]
    # Non-empty clusters scatter to index n, which mode="drop" discards.
    movers = jnp.where(is_empty, movers, n)
    return assignments.at[movers].set(jnp.arange(num_clusters, dtype=assignments.dtype), mode="drop")


@functools.partial(jax.jit, static_argnames=("num_clusters", "num_iters", "block_size"))
def _kmeans(key, points, num_clusters, num_iters, tol, block_size):
    points = points.astype(jnp.float32)
    centroids = _kmeans_plus_plus(key, points, num_clusters)

    def lloyd_step(state):
        centroids, _, i = state
        assignments, sq_dist = _nearest(points, centroids, block_size)
        new_centroids, counts = _update_centroids(points, assignments, centroids, num_clusters)
        # Re-seed empty clusters at the points worst served by their centroid.
        assignments = _fill_empty_clusters(points, assignments, sq_dist, counts, num_clusters)
        new_centroids, _ = _update_centroids(points, assignments, new_centroids, num_clusters)
        shift = jnp.max(jnp.sum((new_centroids - centroids) ** 2, axis=1))
        return new_centroids, shift, i + 1

    def not_converged(state):
        _, shift, i = state
        return (i < num_iters) & (shift > tol)

    centroids, _, _ = jax.lax.while_loop(
        not_converged, lloyd_step, (centroids, jnp.array(jnp.inf, jnp.float32), 0)
    )
    assignments, sq_dist = _nearest(points, centroids, block_size)
    counts = jax.ops.segment_sum(jnp.ones_like(assignments, jnp.float32), assignments, num_clusters)
    assignments = _fill_empty_clusters(points, assignments, sq_dist, counts, num_clusters)
    centroids, _ = _update_centroids(points, assignments, centroids, num_clusters)
    return centroids, assignments


def kmeans(
    key: jax.Array,
    points: jax.Array,
    num_clusters: int,
    *,
    num_iters: int = 100,
    tol: float = 1e-6,
    block_size: int = 4096,
) -> tuple[jax.Array, jax.Array]:
    """Lloyd's k-means with k-means++ seeding.

    Minimises ``Σ_i ‖x_i - c_{a_i}‖²``. Runs until ``num_iters`` Lloyd steps or until no centroid
    moves by more than ``sqrt(tol)``. A cluster that empties during the iterations is re-seeded
    at the point farthest from its centroid; after the last step every empty cluster takes one
    such point (from a cluster that keeps at least one), so every cluster is non-empty.

    Args:
      key: a PRNG key; the result is a deterministic function of it.
      points: ``(N, d)`` float.
      num_clusters: ``k``, with ``1 ≤ k ≤ N``.
      num_iters: maximum number of Lloyd steps.
      tol: stop when the largest squared centroid shift is at most this.
      block_size: points per block in the distance computations (memory ``block_size × k``).

    Returns:
      ``(centroids, assignments)``: ``(k, d)`` float32 means of the clusters and ``(N,)`` int32
      cluster indices. Under ``jax.jit`` (traced points) a NaN or inf point makes centroids NaN.

    Raises:
      NonFiniteEmbeddingsError (``hdml_jax.evaluation.finite``): concrete points with a NaN or inf row
        (their assignments would be arbitrary).
      ValueError: a bad shape, ``num_clusters``, ``num_iters``, ``tol`` or ``block_size``.
    """
    if jnp.ndim(points) != 2:
        raise ValueError(f"points must have shape (num_points, dim), got shape {jnp.shape(points)}.")
    num_points = points.shape[0]
    if not 1 <= num_clusters <= num_points:
        raise ValueError(
            f"num_clusters must lie in [1, num_points={num_points}], got {num_clusters}; "
            "k-means cannot make more non-empty clusters than there are points."
        )
    for name, value, low in (("num_iters", num_iters, 0), ("block_size", block_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if isinstance(tol, (int, float)) and not tol >= 0:
        raise ValueError(
            f"tol must be a number >= 0 (the largest squared centroid shift to stop at), got {tol!r}."
        )

    check_finite(points, "k-means point")
    block_size = int(min(block_size, num_points))
    return _kmeans(key, jnp.asarray(points), int(num_clusters), int(num_iters), tol, block_size)


def normalized_mutual_info(labels_true, labels_pred) -> float:
    """NMI with the arithmetic-mean normaliser, ``MI / ((H(U) + H(V)) / 2)`` (scikit-learn's default).

    Computed on the host from the contingency table. 1.0 when both labelings are a single
    cluster (nothing to tell apart).
    """
    labels_true = np.asarray(labels_true).ravel()
    labels_pred = np.asarray(labels_pred).ravel()
    if labels_true.shape != labels_pred.shape:
        raise ValueError(f"label arrays differ in length: {labels_true.shape} vs {labels_pred.shape}.")
    _, true_ids = np.unique(labels_true, return_inverse=True)
    _, pred_ids = np.unique(labels_pred, return_inverse=True)
    n = labels_true.size
    # Sparse contingency table: counts of each (true, pred) pair that occurs.
    pair_ids = true_ids.astype(np.int64) * (pred_ids.max() + 1) + pred_ids
    pairs, n_ij = np.unique(pair_ids, return_counts=True)
    a = np.bincount(true_ids).astype(np.float64)
    b = np.bincount(pred_ids).astype(np.float64)
    i, j = pairs // (pred_ids.max() + 1), pairs % (pred_ids.max() + 1)
    mi = np.sum(n_ij / n * (np.log(n_ij * n) - np.log(a[i] * b[j])))
    h_true = -np.sum(a / n * np.log(a / n))
    h_pred = -np.sum(b / n * np.log(b / n))
    if h_true == 0.0 and h_pred == 0.0:
        return 1.0
    return float(max(mi, 0.0) / ((h_true + h_pred) / 2.0))
