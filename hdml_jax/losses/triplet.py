"""Batch-hard triplet loss (Hermans et al., 2017), the ranking loss of CGD.

Similarity products run at HIGHEST precision: the Gram matrix of the distance expansion passes
``precision=_common.FULL_PRECISION`` (a bf16/TF32 matmul on TPU or recent GPUs would swamp the
small distances that the hardest positive / negative are chosen by).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hdml_jax.losses import _common


def pairwise_squared_distances(embeddings: jax.Array) -> jax.Array:
    """``D²_ij = ‖x_i‖² + ‖x_j‖² - 2 x_i·x_j`` as a ``(B, B)`` matrix, clipped at 0, zero diagonal."""
    sq_norm = jnp.sum(embeddings * embeddings, axis=1)
    gram = jnp.matmul(embeddings, embeddings.T, precision=_common.FULL_PRECISION)
    sq_dist = sq_norm[:, None] + sq_norm[None, :] - 2.0 * gram
    sq_dist = jnp.maximum(sq_dist, 0.0)
    # The expansion leaves rounding noise on the diagonal; a point is at distance 0 from itself.
    return jnp.where(jnp.eye(embeddings.shape[0], dtype=bool), 0.0, sq_dist)


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x ≥ 0`` with value 0 and gradient 0 (not inf/NaN) at ``x = 0``.

    Only an exact 0 is special-cased: NaN (and a negative x) go through ``sqrt`` and stay NaN, so
    a NaN embedding cannot turn into a distance of 0.
    """
    zero = x == 0.0
    return jnp.where(zero, 0.0, jnp.sqrt(jnp.where(zero, 1.0, x)))


def batch_hard_triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.1,
    squared: bool = False,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Batch-hard triplet loss over the Euclidean distances of the given embeddings.

    For each anchor ``a`` with at least one positive (same label, ``j ≠ a``) and one negative::

        d⁺_a = max_{p: y_p = y_a, p ≠ a} d(a, p)      (hardest positive)
        d⁻_a = min_{n: y_n ≠ y_a}        d(a, n)      (hardest negative)
        L    = mean_a relu(d⁺_a - d⁻_a + margin)

    over the anchors that have both; exactly 0 when none has. ``d`` is the plain Euclidean
    distance (``squared=False``, CGD) or its square. The embeddings are used as given (CGD feeds
    its L2-normalised output). The square root has value and gradient 0 at 0, so duplicate rows
    are safe.

    Args:
      embeddings: ``(B, d)`` float (bf16 accepted, math in fp32).
      labels: ``(B,)`` int, any values (only equality matters).
      margin: the triplet margin, ``≥ 0``.
      squared: use ``d²`` instead of ``d``.
      mask: optional ``(B,)`` bool; a False row is neither anchor, positive nor negative.

    Returns:
      A float32 scalar; NaN when an unmasked row holds a NaN or an inf (its distances are NaN
      and the max / min over them propagate NaN).

    Raises:
      ValueError: wrong shapes or non-integer labels.
      LossHyperparameterError: a concrete ``margin < 0`` (or a non-finite one).
    """
    _common.check_embeddings(embeddings)
    _common.check_labels(labels, embeddings.shape[0])
    _common.check_hyperparameter(
        margin,
        "batch_hard_triplet_loss margin",
        low=0.0,
        low_inclusive=True,
        meaning="the hardest negative must be farther than the hardest positive by this much; CGD uses 0.1",
        config_field="loss.triplet_margin",
    )
    mask = _common.resolve_mask(mask, embeddings.shape[0])

    x = _common.zero_masked_rows(embeddings.astype(_common.MATH_DTYPE), mask)
    sq_dist = pairwise_squared_distances(x)
    dist = sq_dist if squared else safe_sqrt(sq_dist)

    valid_pair = mask[:, None] & mask[None, :]
    same_label = labels[:, None] == labels[None, :]
    not_self = ~jnp.eye(embeddings.shape[0], dtype=bool)
    positive = same_label & not_self & valid_pair
    negative = ~same_label & valid_pair

    has_positive = jnp.any(positive, axis=1)
    has_negative = jnp.any(negative, axis=1)
    hardest_positive = jnp.max(jnp.where(positive, dist, -jnp.inf), axis=1, initial=-jnp.inf)
    hardest_negative = jnp.min(jnp.where(negative, dist, jnp.inf), axis=1, initial=jnp.inf)
    # Keep the per-anchor values finite for anchors that are dropped below.
    hardest_positive = jnp.where(has_positive, hardest_positive, 0.0)
    hardest_negative = jnp.where(has_negative, hardest_negative, 0.0)

    per_anchor = jax.nn.relu(hardest_positive - hardest_negative + margin)
    return _common.masked_mean(per_anchor, has_positive & has_negative)
