"""HIER's regulariser (Kim, Jeong, Kwak, CVPR 2023): learnable LCA proxies that the data and the
proxies arrange into a hierarchy, as a pure function with its random draws made explicit.

Following ``HIERLoss`` of tjddus9597/HIER-CVPR23 (``hier/losses.py:17-104``). With ``z`` the
batch's points ``(B, d)``, ``h`` the LCA proxies' points ``(M, d)`` (both in the Poincaré ball,
``hdml_jax.hyperbolic.to_poincare``) and ``D`` their distances (Poincaré for ``c > 0``, else
``2 − 2⟨·,·⟩``)::

    L = L_hc(z; triplets of the data) + L_hc(h; triplets of the proxies)

**Triplets** (``reciprocal_triplets``, losses.py:64-83): a similarity ``S`` (data:
``exp(−D(z, z)) + [y_i = y_j]``; proxies: ``exp(−D(h, h))``; no gradient), each row's top-``k``
(itself included), symmetrised ``(N + Nᵀ)/2`` with the diagonal set to −1: ``j`` is a positive of
``i`` where that is 1 (mutual neighbours), a negative where it is below 1 (one-way neighbours,
others, and ``i`` itself, as in the official code). Every anchor with at least two positives
draws ``t`` positives and ``t`` negatives uniformly with replacement; the others draw none.

**The LCA terms** (``compute_gHHC``, losses.py:37-62) of a triplet ``(i, j, k)`` over the
distances ``P (N, M)`` of the points to the LCA proxies: ``m_ij = max(P_i, P_j)``,
``m_ijk = max(P_k, m_ij)`` (per proxy); the LCAs are hard Gumbel-softmax choices
``a = onehot(argmax(−m_ij/τ + g))`` and ``b`` the same for ``m_ijk`` with noise ``g'``
(``F.gumbel_softmax(·, hard=True)`` at its own temperature 1: the straight-through estimator,
the gradient of ``softmax(−m/τ + g)``)::

    ℓ = [relu(P_i·a − P_i·b + δ) + relu(P_j·a − P_j·b + δ) + relu(P_k·b − P_k·a + δ)] · [a ≠ b]

and ``L_hc`` is the mean of ``ℓ`` over all drawn triplets (those whose two LCAs coincide count
as 0, as there). The official code draws the triplets with NumPy per anchor on the host; here
they are drawn on the device from a key with fixed shapes (``N·t`` slots, ``weights`` 0 for
anchors without positives), so the loss is one compiled program and deterministic given the key.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hdml_jax import hyperbolic
from hdml_jax.losses._common import check_hyperparameter

_NEG_INF = -jnp.inf


class Triplets(NamedTuple):
    """``(N·t,)`` anchor, positive and negative indices and a weight each (1, or 0 for a slot of an
    anchor without two positives)."""

    anchor: jax.Array
    positive: jax.Array
    negative: jax.Array
    weight: jax.Array


def pairwise_distances(x: jax.Array, y: jax.Array, c: float) -> jax.Array:
    """HIER's ``dist_f``: Poincaré distances for ``c > 0``, ``2 − 2⟨x, y⟩`` for ``c = 0``."""
    return hyperbolic.gram_distance_matrix(x, y, c) if c > 0 else 2 - 2 * x @ y.T


def reciprocal_masks(similarity: jax.Array, topk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(positive, negative, valid)``: each row's candidates (module docstring), ``(n, n)`` bool
    each, and whether the row has at least two positives (``(n,)``)."""
    n = similarity.shape[0]
    _, nearest = jax.lax.top_k(similarity, min(topk, n))
    neighbours = jnp.zeros((n, n), jnp.float32).at[jnp.arange(n)[:, None], nearest].set(1.0)
    mutual = (neighbours + neighbours.T) / 2
    mutual = jnp.where(jnp.eye(n, dtype=bool), -1.0, mutual)
    positive, negative = mutual == 1, mutual < 1
    return positive, negative, positive.sum(1) > 1


def reciprocal_triplets(
    similarity: jax.Array, key: jax.Array, *, topk: int, per_anchor: int, rows: jax.Array | None = None
) -> Triplets:
    """Triplets of mutual top-``topk`` neighbours (module docstring), ``per_anchor`` per anchor.

    ``rows``: ``(n,)`` bool, False for padding rows of a batch: they are nobody's neighbour,
    positive or negative, and anchor nothing; the others' triplets are those of the batch
    without them.
    """
    n = similarity.shape[0]
    if rows is not None:
        similarity = jnp.where(rows[None, :], similarity, _NEG_INF)
    positive_mask, negative_mask, valid = reciprocal_masks(similarity, topk)
    if rows is not None:
        positive_mask = positive_mask & rows[None, :]
        negative_mask = negative_mask & rows[None, :]
        valid = valid & (positive_mask.sum(1) > 1) & rows
    key_positive, key_negative = jax.random.split(key)

    def draw(key, mask):  # uniform over each row's candidates, with replacement: (n, per_anchor)
        # The k-th candidate of the row, k uniform in [0, count): n · t uniforms, where a
        # categorical draw would spend n · t · n Gumbel variates (most of the loss's time on a CPU).
        counts = jnp.sum(mask, axis=1, keepdims=True)
        candidates_first = jnp.argsort(~mask, axis=1, stable=True)  # ascending column order
        u = jax.random.uniform(key, (n, per_anchor))
        k = jnp.clip((u * counts).astype(jnp.int32), 0, jnp.maximum(counts - 1, 0))
        return jnp.take_along_axis(candidates_first, k, axis=1)

    # A row without candidates draws from all columns instead; its zero weight discards the draw
    # (no two positives: not an anchor). Every row has a negative (itself, at least).
    positives = draw(key_positive, jnp.where(valid[:, None], positive_mask, True))
    negatives = draw(key_negative, negative_mask)
    anchors = jnp.repeat(jnp.arange(n), per_anchor)
    weight = jnp.repeat(valid.astype(jnp.float32), per_anchor)
    return Triplets(anchors, positives.reshape(-1), negatives.reshape(-1), weight)


def gumbel_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard Gumbel noise, the law of ``F.gumbel_softmax``'s ``−log E``, ``E ~ Exp(1)``, drawn as
    ``−log(−log U)`` with ``U`` uniform in ``[tiny, 1)`` (``jax.random.gumbel``): always finite.
    (``−log E`` from ``jax.random.exponential`` is +inf where ``E`` rounds to 0; among the
    proxies' 512 · 50 × 512 draws a step that happens about once, and one inf turns the loss NaN.)"""
    return jax.random.gumbel(key, shape, jnp.float32)


def _hard_gumbel_softmax(logits: jax.Array, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(straight-through one-hot, index)``: the one-hot of ``argmax(logits + noise)`` forward,
    the gradient of ``softmax(logits + noise)`` backward (``F.gumbel_softmax(hard=True)``, τ 1)."""
    soft = jax.nn.softmax(logits + noise, axis=-1)
    index = jnp.argmax(soft, axis=-1)
    hard = jax.nn.one_hot(index, logits.shape[-1], dtype=soft.dtype)
    return hard - jax.lax.stop_gradient(soft) + soft, index


def lca_triplet_loss(
    distances: jax.Array,
    triplets: Triplets,
    noise_ij: jax.Array,
    noise_ijk: jax.Array,
    *,
    margin: float = 0.1,
    tau: float = 0.1,
) -> jax.Array:
    """``L_hc``: the mean of the LCA terms ``ℓ`` over the weighted triplets (module docstring).

    ``distances``: ``(N, M)`` of the points to the LCA proxies; ``noise_ij``, ``noise_ijk``: the
    Gumbel noise of the two choices, ``(T, M)`` for ``T`` triplets.
    """
    pi, pj, pk = distances[triplets.anchor], distances[triplets.positive], distances[triplets.negative]
    max_ij = jnp.maximum(pi, pj)
    max_ijk = jnp.maximum(pk, max_ij)
    lca_ij, index_ij = _hard_gumbel_softmax(-max_ij / tau, noise_ij)
    lca_ijk, index_ijk = _hard_gumbel_softmax(-max_ijk / tau, noise_ijk)

    def at(p, choice):
        return jnp.sum(p * choice, axis=-1)

    terms = (
        jax.nn.relu(at(pi, lca_ij) - at(pi, lca_ijk) + margin)
        + jax.nn.relu(at(pj, lca_ij) - at(pj, lca_ijk) + margin)
        + jax.nn.relu(at(pk, lca_ijk) - at(pk, lca_ij) + margin)
    )
    terms = terms * (index_ij != index_ijk) * triplets.weight
    return jnp.sum(terms) / jnp.maximum(jnp.sum(triplets.weight), 1.0)


class HierDraws(NamedTuple):
    """The random draws of one ``hier_loss``: the data's and the proxies' triplets and the Gumbel
    noise of their two LCA choices (``(T, M)`` each)."""

    data: Triplets
    proxies: Triplets
    data_noise: tuple[jax.Array, jax.Array]
    proxy_noise: tuple[jax.Array, jax.Array]


def hier_draws(
    embeddings: jax.Array,
    labels: jax.Array,
    lca_points: jax.Array,
    key: jax.Array,
    *,
    c: float = 0.1,
    topk: int = 20,
    per_anchor: int = 50,
    mask: jax.Array | None = None,
) -> HierDraws:
    """The triplets (from the points' similarities, no gradient) and the Gumbel noise that
    ``hier_loss`` draws from ``key``; ``mask`` ``(B,)``: False for padding rows (no triplet
    touches them)."""
    z, h = (
        jax.lax.stop_gradient(embeddings.astype(jnp.float32)),
        jax.lax.stop_gradient(lca_points.astype(jnp.float32)),
    )
    b, m = z.shape[0], h.shape[0]
    same = labels[:, None] == labels[None, :]
    keys = jax.random.split(key, 6)
    data = reciprocal_triplets(
        jnp.exp(-pairwise_distances(z, z, c)) + same, keys[0], topk=topk, per_anchor=per_anchor, rows=mask
    )
    proxies = reciprocal_triplets(
        jnp.exp(-pairwise_distances(h, h, c)), keys[1], topk=topk, per_anchor=per_anchor
    )
    t_data, t_proxies = b * per_anchor, m * per_anchor
    return HierDraws(
        data,
        proxies,
        (gumbel_noise(keys[2], (t_data, m)), gumbel_noise(keys[3], (t_data, m))),
        (gumbel_noise(keys[4], (t_proxies, m)), gumbel_noise(keys[5], (t_proxies, m))),
    )


def hier_loss_with(
    embeddings: jax.Array,
    lca_points: jax.Array,
    draws: HierDraws,
    *,
    c: float = 0.1,
    margin: float = 0.1,
    tau: float = 0.1,
) -> jax.Array:
    """``hier_loss`` given its draws (``hier_draws``): deterministic, differentiable in the points."""
    check_hyperparameter(tau, "tau", low=0.0, low_inclusive=False, meaning="the LCA softmax's temperature")
    check_hyperparameter(margin, "margin", low=0.0, low_inclusive=True, meaning="the LCA triplet margin δ")
    check_hyperparameter(c, "c", low=0.0, low_inclusive=True, meaning="the ball's curvature; 0: the sphere")
    z, h = embeddings.astype(jnp.float32), lca_points.astype(jnp.float32)
    b = z.shape[0]
    nodes = jnp.concatenate([z, h])
    distances = pairwise_distances(nodes, nodes, c)
    loss = lca_triplet_loss(distances[:b, b:], draws.data, *draws.data_noise, margin=margin, tau=tau)
    return loss + lca_triplet_loss(
        distances[b:, b:], draws.proxies, *draws.proxy_noise, margin=margin, tau=tau
    )


def hier_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    lca_points: jax.Array,
    key: jax.Array,
    *,
    c: float = 0.1,
    margin: float = 0.1,
    tau: float = 0.1,
    topk: int = 20,
    per_anchor: int = 50,
    mask: jax.Array | None = None,
) -> jax.Array:
    """HIER's loss of a batch (module docstring): ``embeddings (B, d)`` and ``lca_points (M, d)``
    are points of the ball of curvature ``c`` (``c = 0``: unit vectors); ``key`` draws the
    triplets and the Gumbel noise (``hier_draws``); ``mask`` ``(B,)`` leaves padding rows out.
    HIER's values: ``margin`` 0.1 (``--mrg``), ``tau`` 0.1 (``HIERLoss``'s default), ``topk`` 20
    (its scripts' ``--topk``), 50 triplets per anchor (``t_per_anchor``, losses.py:99, 102).
    """
    draws = hier_draws(embeddings, labels, lca_points, key, c=c, topk=topk, per_anchor=per_anchor, mask=mask)
    return hier_loss_with(embeddings, lca_points, draws, c=c, margin=margin, tau=tau)
