"""Hierarchical Proxy-based Loss (HPL; Yang et al., WACV 2022) and its hierarchy helpers.

The proxies form levels: level 0 has one proxy per class, level ``l ≥ 1`` has ``K_l`` coarse
proxies, each standing for a group of level ``l-1`` proxies. The class → group maps
(``level_assignments``) are integer, non-differentiable state: they are built by k-means over the
fine proxies (``build_hierarchy``), refreshed from time to time (``refresh_assignments``), or
taken from a known taxonomy (``hierarchy_from_labels``, e.g. SOP's ``super_class_id``).

Choices the paper leaves open, and the defaults here:
  * coarse proxies are learnable parameters initialised at the k-means centroids (or, with
    ``coarse_centroids``, recomputed as the means of their groups at every step);
  * k-means runs on the L2-normalised fine proxies (``normalize=True``);
  * a group is assigned to the coarser proxy of highest cosine similarity on refresh;
  * when to build and how often to refresh is the trainer's business (default there: build after
    warm-up, refresh every few epochs).

Similarity products run at HIGHEST precision: the base losses, k-means (``hdml_jax.evaluation.cluster``) and
the nearest-proxy search of ``refresh_assignments`` all use ``_common.FULL_PRECISION``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.evaluation import cluster
from hdml_jax.losses import _common
from hdml_jax.losses.proxy_anchor import proxy_anchor_loss


class ProxyHierarchy(NamedTuple):
    """Coarse levels built over a set of fine proxies.

    Attributes:
      coarse_proxies: ``(P^1, P^2, ...)``, ``P^l`` of shape ``(K_l, d)``.
      assignments: ``(a^0, a^1, ...)``, ``a^{l-1}`` of shape ``(K_{l-1},)`` int32, mapping each
        level ``l-1`` proxy to its level ``l`` group.
    """

    coarse_proxies: tuple[jax.Array, ...]
    assignments: tuple[jax.Array, ...]


def level_labels(labels: jax.Array, level_assignments: Sequence[jax.Array]) -> list[jax.Array]:
    """``[y^0, y^1, ...]`` with ``y^0 = labels`` and ``y^l = a^{l-1}[y^{l-1}]``."""
    result = [labels]
    for assignment in level_assignments:
        result.append(jnp.asarray(assignment)[result[-1]])
    return result


def _check_hierarchy(level_proxies, level_assignments, level_weights, embedding_dim) -> None:
    num_levels = len(level_proxies)
    if num_levels < 1:
        raise ValueError("level_proxies must hold at least the fine (per-class) proxies.")
    if len(level_assignments) != num_levels - 1:
        raise ValueError(
            f"{num_levels} proxy levels need {num_levels - 1} level_assignments (one map from each "
            f"level to the next coarser one), got {len(level_assignments)}."
        )
    if len(level_weights) != num_levels:
        raise ValueError(
            f"level_weights has {len(level_weights)} entries but there are {num_levels} proxy "
            "levels; give one weight per level, e.g. (1.0, 0.1)."
        )
    for level, weight in enumerate(level_weights):
        _common.check_hyperparameter(
            weight,
            f"hierarchical_proxy_loss level_weights[{level}]",
            low=0.0,
            low_inclusive=True,
            meaning="a level's loss is added with this weight; a negative one would maximise it (paper: 1.0, 0.1)",
            config_field="loss.level_weights",
        )
    if level_weights and all(_common.is_concrete(w) and float(w) == 0.0 for w in level_weights):
        raise _common.LossHyperparameterError(
            f"hierarchical_proxy_loss level_weights (config field loss.level_weights) are all 0, got "
            f"{tuple(level_weights)}; give at least one level a positive weight, e.g. (1.0, 0.1)."
        )
    for level, proxies in enumerate(level_proxies):
        _common.check_proxies(proxies, embedding_dim, name=f"level_proxies[{level}]")
    for level, assignment in enumerate(level_assignments):
        finer, coarser = level_proxies[level].shape[0], level_proxies[level + 1].shape[0]
        if jnp.shape(assignment) != (finer,):
            raise ValueError(
                f"level_assignments[{level}] must have shape ({finer},) (one group per level-{level} "
                f"proxy), got {jnp.shape(assignment)}."
            )
        if not jnp.issubdtype(jnp.result_type(assignment), jnp.integer):
            raise ValueError(
                f"level_assignments[{level}] must be integers, got {jnp.result_type(assignment)}."
            )
        if _common.is_concrete(assignment) and finer > 0:
            values = np.asarray(assignment)
            if values.min() < 0 or values.max() >= coarser:
                raise ValueError(
                    f"level_assignments[{level}] must lie in [0, {coarser}) (there are {coarser} "
                    f"level-{level + 1} proxies), got values in [{values.min()}, {values.max()}]."
                )


def hierarchical_proxy_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    level_proxies: Sequence[jax.Array],
    level_assignments: Sequence[jax.Array],
    *,
    base_loss: Callable[..., jax.Array] = proxy_anchor_loss,
    level_weights: Sequence[float] = (1.0, 0.1),
    mask: jax.Array | None = None,
    level_proxy_masks: Sequence[jax.Array | None] | None = None,
    return_levels: bool = False,
    **base_kwargs,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array | None, ...]]:
    r"""HPL: a weighted sum of a proxy loss over every level of a proxy hierarchy::

        L = Σ_l w_l · L_base(X, y^l, P^l),     y^0 = y,  y^l = a^{l-1}[y^{l-1}]

    ``base_loss=proxy_anchor_loss`` gives HPL-PA, ``proxy_nca_loss`` gives HPL-NCA; any function
    ``f(embeddings, labels, proxies, *, mask=..., **base_kwargs)`` works. The paper's best weights
    are ``w = (1.0, 0.1)``. A level whose weight is a Python zero is skipped (not computed), so
    weights ``(1, 0)`` give exactly the base loss.

    Args:
      embeddings: ``(B, d)`` float.
      labels: ``(B,)`` int in ``[0, K_0)``.
      level_proxies: ``(P^0, P^1, ...)``, ``P^l`` of shape ``(K_l, d)``, ``K_0`` = number of classes.
      level_assignments: ``(a^0, a^1, ...)``, ``a^{l-1}`` int of shape ``(K_{l-1},)`` in ``[0, K_l)``.
      base_loss: the proxy loss applied at every level.
      level_weights: ``(w_0, w_1, ...)``, one ``w_l ≥ 0`` per level, not all 0.
      mask: optional ``(B,)`` bool, passed to every level.
      level_proxy_masks: optional, one ``(K_l,)`` bool or None per level, passed to the base
        loss as ``proxy_mask`` (padding proxies, e.g. for sharding along the class axis).
      return_levels: also return the unweighted loss of every level (None for a skipped one),
        e.g. to log the fine loss without computing it a second time.
      **base_kwargs: passed to ``base_loss`` (``margin``, ``alpha``, ``scale`` ...).

    Returns:
      A float32 scalar; with ``return_levels``, ``(total, (L_base level 0, level 1, ...))``. NaN
      when an unmasked row or a proxy of a computed level holds a NaN or an inf.

    Raises:
      ValueError: inconsistent levels, shapes or (concrete) labels / assignments.
      LossHyperparameterError: a concrete level weight that is negative or non-finite, all
        weights 0, or a bad hyperparameter of the base loss.
    """
    _common.check_embeddings(embeddings)
    _check_hierarchy(level_proxies, level_assignments, level_weights, embeddings.shape[1])
    _common.check_labels(labels, embeddings.shape[0], level_proxies[0].shape[0], mask=mask)

    if level_proxy_masks is None:
        level_proxy_masks = (None,) * len(level_proxies)
    if len(level_proxy_masks) != len(level_proxies):
        raise ValueError(
            f"level_proxy_masks has {len(level_proxy_masks)} entries for {len(level_proxies)} proxy "
            "levels; give one mask (or None) per level."
        )
    total = jnp.zeros((), jnp.float32)
    per_level: list[jax.Array | None] = []
    for weight, proxies, labels_at_level, proxy_mask in zip(
        level_weights, level_proxies, level_labels(labels, level_assignments), level_proxy_masks, strict=True
    ):
        if isinstance(weight, (int, float)) and weight == 0:
            per_level.append(None)
            continue
        # Only masks that are given are passed on: base losses without padding support still work.
        extra = {} if proxy_mask is None else {"proxy_mask": proxy_mask}
        loss = base_loss(embeddings, labels_at_level, proxies, mask=mask, **extra, **base_kwargs)
        per_level.append(loss)
        total = total + weight * loss
    return (total, tuple(per_level)) if return_levels else total


def build_hierarchy(
    key: jax.Array,
    fine_proxies: jax.Array,
    num_groups: Sequence[int],
    *,
    normalize: bool = True,
    num_iters: int = 100,
) -> ProxyHierarchy:
    """Build coarse levels by k-means, level after level, starting from the fine proxies.

    Level ``l`` is k-means with ``num_groups[l-1]`` clusters over the level ``l-1`` proxies
    (L2-normalised first when ``normalize``, the default: the losses compare directions only).
    The centroids initialise the level-``l`` proxies; the cluster indices are the assignments.
    k-means never leaves a group empty.

    Args:
      key: PRNG key (the result is deterministic for it).
      fine_proxies: ``(C, d)``, the level-0 proxies.
      num_groups: ``(K_1, K_2, ...)``, strictly decreasing, ``K_1 ≤ C``.
      normalize: cluster directions (True) or raw vectors (False).
      num_iters: Lloyd iterations per level.

    Returns:
      A ``ProxyHierarchy``; pass ``(fine_proxies, *h.coarse_proxies)`` and ``h.assignments`` to
      ``hierarchical_proxy_loss``.
    """
    _common.check_proxies(fine_proxies, jnp.shape(fine_proxies)[-1], name="fine_proxies")
    previous = jnp.asarray(fine_proxies, jnp.float32)
    coarse, assignments = [], []
    for level, groups in enumerate(num_groups, start=1):
        if not 1 <= groups <= previous.shape[0]:
            raise ValueError(
                f"num_groups[{level - 1}] = {groups} but level {level - 1} has only "
                f"{previous.shape[0]} proxies; each coarse level needs between 1 and that many groups."
            )
        key, level_key = jax.random.split(key)
        points = _common.l2_normalize(previous) if normalize else previous
        centroids, assignment = cluster.kmeans(level_key, points, int(groups), num_iters=num_iters)
        coarse.append(centroids)
        assignments.append(assignment.astype(jnp.int32))
        previous = centroids
    return ProxyHierarchy(tuple(coarse), tuple(assignments))


def coarse_centroids(
    fine_proxies: jax.Array,
    assignments: Sequence[jax.Array],
    num_groups: Sequence[int],
    *,
    normalize: bool = True,
    proxy_mask: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Coarse proxies recomputed from the finer level instead of learned: group means.

    ``P^l_k = mean_{j : a^{l-1}_j = k} v_j`` with ``v_j`` the level ``l-1`` proxies
    (L2-normalised first when ``normalize``, as k-means clusters them). Differentiable: the
    coarse level's loss trains the fine proxies through the means. A group without members
    gets the zero vector (it compares equal to every embedding, a constant in the losses).

    Args:
      fine_proxies: ``(C, d)``, the level-0 proxies (padding rows allowed, see ``proxy_mask``).
      assignments: ``(a^0, a^1, ...)`` as for ``hierarchical_proxy_loss``.
      num_groups: ``(K_1, K_2, ...)``, the size of every coarse level.
      normalize: average directions (True) or raw vectors.
      proxy_mask: ``(C,)`` bool, False for padding proxies, which join no group.

    Returns:
      ``(P^1, P^2, ...)``, ``P^l`` of shape ``(K_l, d)`` float32.
    """
    if len(assignments) != len(num_groups):
        raise ValueError(
            f"{len(num_groups)} coarse levels need {len(num_groups)} assignments, got {len(assignments)}."
        )
    previous = jnp.asarray(fine_proxies, jnp.float32)
    weights = jnp.ones(previous.shape[:1], jnp.float32) if proxy_mask is None else proxy_mask.astype(jnp.float32)
    levels = []
    for assignment, groups in zip(assignments, num_groups, strict=True):
        points = _common.l2_normalize(previous) if normalize else previous
        sums = jax.ops.segment_sum(points * weights[:, None], assignment, num_segments=int(groups))
        counts = jax.ops.segment_sum(weights, assignment, num_segments=int(groups))
        previous = sums / jnp.maximum(counts, 1.0)[:, None]
        weights = (counts > 0).astype(jnp.float32)  # an empty group is no member one level up
        levels.append(previous)
    return tuple(levels)


@jax.jit
def _nearest_by_cosine(finer: jax.Array, coarser: jax.Array) -> jax.Array:
    similarity = jnp.matmul(
        _common.l2_normalize(finer.astype(jnp.float32)),
        _common.l2_normalize(coarser.astype(jnp.float32)).T,
        precision=_common.FULL_PRECISION,
    )
    return jnp.argmax(similarity, axis=1).astype(jnp.int32)


@jax.jit
def _nearest_by_distance(finer: jax.Array, coarser: jax.Array) -> jax.Array:
    return cluster._nearest(finer.astype(jnp.float32), coarser.astype(jnp.float32), finer.shape[0])[0].astype(
        jnp.int32
    )


def refresh_assignments(
    level_proxies: Sequence[jax.Array], *, normalize: bool = True
) -> tuple[jax.Array, ...]:
    """Re-assign every level ``l-1`` proxy to its nearest level ``l`` proxy.

    Nearest by cosine similarity (``normalize=True``, matching how the losses compare vectors) or
    by Euclidean distance. A coarse proxy may end up with no children; the loss then uses it only
    as a negative, which is harmless.

    Args:
      level_proxies: ``(P^0, P^1, ...)``.

    Returns:
      ``(a^0, a^1, ...)``, ``a^{l-1}`` of shape ``(K_{l-1},)`` int32.
    """
    nearest = _nearest_by_cosine if normalize else _nearest_by_distance
    return tuple(nearest(finer, coarser) for finer, coarser in itertools.pairwise(level_proxies))


def hierarchy_from_labels(*fine_to_coarse) -> tuple[jax.Array, ...]:
    """Assignments from a known taxonomy, e.g. SOP's ``super_class_id`` of each class.

    Args:
      *fine_to_coarse: one 1-D int array per coarse level; the ``l``-th maps each level ``l``
        group (a class for the first) to its parent. Parent ids may be any integers; they are
        renumbered ``0..K-1`` in sorted order.

    Returns:
      ``(a^0, a^1, ...)`` as int32 arrays, ready for ``hierarchical_proxy_loss``.
    """
    result = []
    for level, mapping in enumerate(fine_to_coarse):
        mapping = np.asarray(mapping)
        if mapping.ndim != 1 or not np.issubdtype(mapping.dtype, np.integer):
            raise ValueError(
                f"fine_to_coarse[{level}] must be a 1-D integer array, got dtype {mapping.dtype} "
                f"and shape {mapping.shape}."
            )
        if result and mapping.shape[0] != int(result[-1].max()) + 1:
            raise ValueError(
                f"fine_to_coarse[{level}] has {mapping.shape[0]} entries but level {level} has "
                f"{int(result[-1].max()) + 1} groups; give one parent per group."
            )
        _, dense = np.unique(mapping, return_inverse=True)
        result.append(jnp.asarray(dense.astype(np.int32)))
    return tuple(result)
