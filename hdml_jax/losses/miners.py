"""Tuple miners with pytorch-metric-learning's semantics, as pure fixed-shape JAX functions.

Each miner returns a dict of boolean masks (triplets: their structured form, below) that the losses
of ``hdml_jax.losses.pair`` and ``hdml_jax.losses.triplet_margin`` take as keyword arguments, so
that::

    loss(x, y, **miner(x, y))        ==    PMLLoss()(x, y, indices_tuple=PMLMiner()(x, y))

PML's index lists become masks over the batch: pairs ``(a1, p, a2, n)`` →
``{"pos_mask": (B, B), "neg_mask": (B, B)}``, triplets ``(a, p, n)`` →
``{"triplet_mask": WindowedTriplets}``. The masks have fixed shapes, so a miner runs inside
``jit`` and ``vmap``; they are booleans (no gradient flows through mining, as under PML's
``torch.no_grad``). A False ``mask`` row is in no mined tuple.

Triplets in structured form. Every triplet ``triplet_margin_miner`` (and ``semi_hard_miner``)
selects is ``pos[a, p] & neg[a, n] & (lo < μ_apn ≤ hi)`` with ``μ_apn = d_an - d_ap``
(``s_ap - s_an`` for a similarity) and a window ``(lo, hi]`` per type, either end possibly
unbounded. So the miner returns ``WindowedTriplets(dist, pos, neg, lo, hi)``
(``hdml_jax.losses.WindowedTriplets``, a pytree): its ``(B, B)`` distance matrix (``d``, or ``-s``),
pair masks and float32 bounds, ``O(B²)`` numbers, never the ``(B, B, B)`` boolean array. Every
loss that takes ``triplet_mask`` takes it (or a dense boolean mask, e.g. one of your own) and
counts the triplets per pair by sorting each anchor's distances and binary searches on ``μ``
itself, ``O(B² log B)``: exactly the counts of the dense mask, on the window's bounds too
(``triplet_margin_loss`` intersects the window with its hinge this way when the triplets were
mined on its own distance matrix, see there). ``triplet_mask.dense()`` is that ``(B, B, B)`` mask,
bit for bit the array this miner used to return; ``triplets_from_pairs`` builds one from pair
masks.

With references (``ref_embeddings (M, d)``, ``ref_labels (M,)``, optional ``ref_mask (M,)``: PML's
``miner(x, y, ref_emb, ref_labels)``) the anchors are the batch rows and the positives / negatives
the reference rows, nothing excluded as a self comparison (as in PML): pair masks ``(B, M)``,
triplets ``WindowedTriplets`` of ``(B, M)`` arrays (``dense()``: ``(B, M, M)``). This is how
``hdml_jax.losses.xbm.xbm_loss`` calls a miner.

``batch_hard_miner`` returns PML's triplets ``(a, hardest p, hardest n)`` as the pair masks
``pos_mask`` (one-hot: the hardest positive of each kept anchor) and ``neg_mask`` (its hardest
negative). With exactly one positive and one negative per anchor this is the same tuple set for
every loss: PML's ``convert_to_pairs`` of those triplets gives exactly these pairs (each once), and
``convert_to_triplets`` of these pairs gives back exactly those triplets. The pair form costs
``O(B²)`` in the losses where a ``(B, B, B)`` mask would cost a pass over ``B³`` elements;
``triplets_from_pairs`` builds the ``triplet_mask`` when it is wanted.

Distances by name as in the losses: ``"euclidean"`` (PML ``LpDistance``, L2-normalised rows by
default), ``"cosine"`` (``CosineSimilarity``), ``"dot"`` (``DotProductSimilarity``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hdml_jax.losses import _pair_common as pc

TRIPLET_TYPES = ("all", "hard", "semihard", "easy")


def _prepare(embeddings, labels, mask, distance, normalize_embeddings, owner, refs=(None, None, None)):
    pc.check_distance(distance, normalize_embeddings, owner)
    x, labels, mask = pc.prepare(embeddings, labels, mask)
    refs = pc.prepare_refs(*refs, x.shape[1], owner)
    pos, neg = pc.resolve_mined(labels, mask, None, None, None, owner, refs)[:2]
    mat, inverted = pc.distance_matrix(x, distance, normalize_embeddings, pc.ref_rows(refs))
    return jax.lax.stop_gradient(mat), inverted, pos, neg


def _in_range(mat: jax.Array, allowed) -> jax.Array:
    if allowed is None:
        return jnp.ones(mat.shape, dtype=bool)
    low, high = allowed
    return (mat >= low) & (mat <= high)


def triplets_from_pairs(pos_mask: jax.Array, neg_mask: jax.Array) -> jax.Array:
    """``(B, B, B)`` bool (``(B, M, M)`` with references): ``pos_mask[a, p] & neg_mask[a, n]``, PML's
    ``convert_to_triplets`` of pairs."""
    pos_mask, neg_mask = jnp.asarray(pos_mask, bool), jnp.asarray(neg_mask, bool)
    return pos_mask[:, :, None] & neg_mask[:, None, :]


def batch_hard_miner(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    distance: str = "euclidean",
    normalize_embeddings: bool = True,
    allowed_pos_range: tuple[float, float] | None = None,
    allowed_neg_range: tuple[float, float] | None = None,
    mask: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
    r"""PML's ``BatchHardMiner``: per anchor, its hardest positive and hardest negative.

    For each anchor ``a`` with at least one positive and one negative (within the allowed ranges)::

        p*_a = argmax_{p: y_p = y_a, p ≠ a} d_ap        n*_a = argmin_{n: y_n ≠ y_a} d_an

    (for a similarity: the least similar positive and the most similar negative). Ties go to the
    lowest index. ``allowed_pos_range`` / ``allowed_neg_range`` (``(low, high)`` on the raw
    distance / similarity, inclusive) are PML's ``BatchEasyHardMiner`` options: pairs outside
    are ignored.

    Returns:
      ``{"pos_mask": (B, B) bool, "neg_mask": (B, B) bool}``: row ``a`` holds ``p*_a`` / ``n*_a``
      (one True each) for every kept anchor and nothing otherwise. Exactly PML's triplets
      ``(a, p*_a, n*_a)`` for every loss (see the module docstring); ``triplets_from_pairs`` gives
      the ``(B, B, B)`` ``triplet_mask``.
    """
    owner = "batch_hard_miner"
    for name, allowed in (("allowed_pos_range", allowed_pos_range), ("allowed_neg_range", allowed_neg_range)):
        if allowed is not None and len(allowed) != 2:
            raise ValueError(f"{owner} {name} must be None or a (low, high) pair, got {allowed!r}.")
    mat, inverted, pos, neg = _prepare(
        embeddings,
        labels,
        mask,
        distance,
        normalize_embeddings,
        owner,
        (ref_embeddings, ref_labels, ref_mask),
    )
    pos = pos & _in_range(mat, allowed_pos_range)
    neg = neg & _in_range(mat, allowed_neg_range)
    u = pc.as_distance(mat, inverted)
    if mat.shape[1] == 0:  # argmax of an empty row is undefined; there is no pair anyway
        return {"pos_mask": pos, "neg_mask": neg}
    hardest_pos = jnp.argmax(jnp.where(pos, u, -jnp.inf), axis=1)
    hardest_neg = jnp.argmin(jnp.where(neg, u, jnp.inf), axis=1)
    keep = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
    columns = jnp.arange(mat.shape[1])[None, :]
    return {
        "pos_mask": keep[:, None] & (columns == hardest_pos[:, None]),
        "neg_mask": keep[:, None] & (columns == hardest_neg[:, None]),
    }


def triplet_margin_miner(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.2,
    type_of_triplets: str = "all",
    distance: str = "euclidean",
    normalize_embeddings: bool = True,
    mask: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_mask: jax.Array | None = None,
) -> dict[str, pc.WindowedTriplets]:
    r"""PML's ``TripletMarginMiner``: the valid triplets selected by their margin.

    With ``μ_apn = d_an - d_ap`` (``s_ap - s_an`` for a similarity), over all triplets with
    ``y_a = y_p``, ``a ≠ p``, ``y_n ≠ y_a``:

    * ``"all"``: ``μ ≤ margin`` (the triplets that violate the margin);
    * ``"hard"``: ``μ ≤ margin`` and ``μ ≤ 0``;
    * ``"semihard"``: ``0 < μ ≤ margin``;
    * ``"easy"``: ``μ > margin``.

    Returns:
      ``{"triplet_mask": WindowedTriplets}``: the triplets ``pos[a, p] & neg[a, n] & (lo < μ_apn ≤
      hi)`` with the window of the type (``"all"``: ``hi = margin``; ``"hard"``: ``hi =
      min(margin, 0)``; ``"semihard"``: ``lo = 0``, ``hi = margin``; ``"easy"``: ``lo = margin``;
      the missing bound unbounded), ``O(B²)`` numbers. Every loss taking ``triplet_mask`` takes it;
      its ``dense()`` is the ``(B, B, B)`` bool mask ``[a, p, n]`` of the same triplets (the
      comparisons above on the float32 ``μ``, bit for bit).
    """
    owner = "triplet_margin_miner"
    if type_of_triplets not in TRIPLET_TYPES:
        raise ValueError(
            f"{owner} type_of_triplets must be one of {TRIPLET_TYPES}, got {type_of_triplets!r}."
        )
    pc.check_finite(margin, f"{owner} margin", "the margin that selects the triplets")
    mat, inverted, pos, neg = _prepare(
        embeddings,
        labels,
        mask,
        distance,
        normalize_embeddings,
        owner,
        (ref_embeddings, ref_labels, ref_mask),
    )
    dist = pc.as_distance(mat, inverted)
    bound = jnp.asarray(margin, jnp.float32)
    # The window lo < μ ≤ hi of each type (None: unbounded), on μ = dist_an - dist_ap in float32.
    lo, hi = {
        "all": (None, bound),
        "hard": (None, jnp.minimum(bound, 0.0)),  # μ ≤ margin and μ ≤ 0
        "semihard": (jnp.zeros((), jnp.float32), bound),
        "easy": (bound, None),
    }[type_of_triplets]
    return {"triplet_mask": pc.WindowedTriplets(dist, pos, neg, lo, hi)}


def semi_hard_miner(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.2,
    distance: str = "euclidean",
    normalize_embeddings: bool = True,
    mask: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_mask: jax.Array | None = None,
) -> dict[str, pc.WindowedTriplets]:
    """PML's ``TripletMarginMiner(margin, type_of_triplets="semihard")``: ``0 < d_an - d_ap ≤ margin``.

    Returns ``{"triplet_mask": WindowedTriplets}`` (``.dense()``: ``(B, B, B)`` bool); see
    ``triplet_margin_miner``.
    """
    return triplet_margin_miner(
        embeddings,
        labels,
        margin=margin,
        type_of_triplets="semihard",
        distance=distance,
        normalize_embeddings=normalize_embeddings,
        mask=mask,
        ref_embeddings=ref_embeddings,
        ref_labels=ref_labels,
        ref_mask=ref_mask,
    )


def multi_similarity_miner(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    epsilon: float = 0.1,
    distance: str = "cosine",
    normalize_embeddings: bool = True,
    mask: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
    r"""PML's ``MultiSimilarityMiner`` (the pair mining of Wang et al. 2019), ``ε = epsilon``.

    With cosine similarities (the default)::

        hard positives: (a, p) with s_ap - ε < max_{n∈N_a} s_an
        hard negatives: (a, n) with s_an + ε > min_{p∈P_a} s_ap

    (an anchor without negatives has no hard positive, one without positives no hard negative).
    For a distance the inequalities flip: ``d_ap + ε > min_n d_an``, ``d_an - ε < max_p d_ap``.

    Returns:
      ``{"pos_mask": (B, B) bool, "neg_mask": (B, B) bool}``.
    """
    owner = "multi_similarity_miner"
    pc.check_finite(epsilon, f"{owner} epsilon", "the slack of the pair selection")
    mat, inverted, pos, neg = _prepare(
        embeddings,
        labels,
        mask,
        distance,
        normalize_embeddings,
        owner,
        (ref_embeddings, ref_labels, ref_mask),
    )
    neg_max = jnp.max(jnp.where(neg, mat, -jnp.inf), axis=1, keepdims=True, initial=-jnp.inf)
    neg_min = jnp.min(jnp.where(neg, mat, jnp.inf), axis=1, keepdims=True, initial=jnp.inf)
    pos_max = jnp.max(jnp.where(pos, mat, -jnp.inf), axis=1, keepdims=True, initial=-jnp.inf)
    pos_min = jnp.min(jnp.where(pos, mat, jnp.inf), axis=1, keepdims=True, initial=jnp.inf)
    if inverted:
        hard_pos = pos & (mat - epsilon < neg_max)
        hard_neg = neg & (mat + epsilon > pos_min)
    else:
        hard_pos = pos & (mat + epsilon > neg_min)
        hard_neg = neg & (mat - epsilon < pos_max)
    return {"pos_mask": hard_pos, "neg_mask": hard_neg}
