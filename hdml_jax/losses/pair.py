"""Pair-based metric-learning losses with pytorch-metric-learning's semantics, as pure JAX functions.

``contrastive_loss``, ``multi_similarity_loss``, ``ntxent_loss``, ``lifted_structure_loss``,
``generalized_lifted_structure_loss`` and ``circle_loss`` reproduce PML 2.x's classes of the same
names (``pytorch_metric_learning.losses``) with their default distance, hyperparameters and
reducer: ``loss(x, y, **kw)`` equals ``PMLLoss(**kw)(x, y)`` and, with a miner of
``hdml_jax.losses.miners``, ``loss(x, y, **miner(x, y))`` equals
``PMLLoss()(x, y, indices_tuple=PMLMiner()(x, y))``.

The contract is the one of the other losses: ``(embeddings (B, d), labels (B,), *, ..., mask)`` →
float32 scalar, jit / grad / vmap-safe, fixed shapes, bf16 accepted (the math is float32), a False
``mask`` row takes part in no pair (value and every gradient as if the row were absent), exactly 0
(never NaN) when there is nothing to average, NaN when an unmasked row holds a NaN or an inf.

Mined tuples (see ``_pair_common``): ``pos_mask`` / ``neg_mask`` ``(B, B)`` bool, or
``triplet_mask`` (``(B, B, B)`` bool, or the triplet miners' ``WindowedTriplets``) which is turned
into pairs as PML's ``convert_to_pairs`` does (a pair listed once per triplet that holds it; the
pair-based losses weight by that count, the matrix-based ones only test whether the pair is
listed).

Reproduced on purpose although it surprises: PML's ``GenericPairLoss`` (the base of all six)
returns 0 when every index list has at most one entry, e.g. for exactly one mined triplet
(``generic_pair_loss.py``, ``compute_loss``: ``if all(len(x) <= 1 ...)``); so do these.

Deliberate differences from PML, for all of them: a NaN / inf unmasked row gives NaN (PML's
``AvgNonZeroReducer`` silently drops NaN terms); hyperparameters out of range raise
``LossHyperparameterError``; a pair in both ``pos_mask`` and ``neg_mask`` is used as given (PML's
matrix-based losses assert that none is); PML's reducer / distance objects are not taken
(distances by name, each loss's default reducer only).

References (PML's ``ref_emb`` / ``ref_labels``, what its ``CrossBatchMemory`` passes; see
``hdml_jax.losses.xbm``): ``ref_embeddings (M, d)``, ``ref_labels (M,)`` and optionally
``ref_mask (M,)`` bool make every anchor a row of ``embeddings`` and every positive / negative a
row of the references. The distance matrix is then ``(B, M)``, the label pairs
``labels[:, None] == ref_labels[None, :]`` with nothing excluded as a self comparison (as in PML),
mined masks ``(B, M)`` / ``(B, M, M)``; per-anchor means run over the ``B`` unmasked anchors.
``loss(x, y, ref_embeddings=r, ref_labels=s)`` equals ``PMLLoss()(x, y, ref_emb=r, ref_labels=s)``.
The gradient reaches both the embeddings and the references. ``lifted_structure_loss`` refuses
references (see there).

Cost: everything is ``O(B²)`` (one ``(B, B)`` Gram matrix and masked row reductions; ``O(B·M)``
with references) except that a ``triplet_mask`` is first reduced to pair counts: ``O(B² log B)``
for ``WindowedTriplets`` (sorted rows, binary searches), two passes over ``B³`` / ``B·M²``
booleans for a dense mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hdml_jax.losses import _common
from hdml_jax.losses import _pair_common as pc


def contrastive_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    distance: str = "euclidean",
    normalize_embeddings: bool = True,
    mask: jax.Array | None = None,
    pos_mask: jax.Array | None = None,
    neg_mask: jax.Array | None = None,
    triplet_mask: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_mask: jax.Array | None = None,
) -> jax.Array:
    r"""Contrastive loss (Hadsell et al., 2006), PML's ``ContrastiveLoss``.

    With ``d`` the distance (default: Euclidean between L2-normalised rows)::

        ℓ⁺_ap = relu(d_ap - m⁺)       over positive pairs (a, p), y_a = y_p, a ≠ p
        ℓ⁻_an = relu(m⁻ - d_an)       over negative pairs (a, n), y_a ≠ y_n
        L = AvgNonZero(ℓ⁺) + AvgNonZero(ℓ⁻)

    ``AvgNonZero`` is the mean over the terms ``> 0`` (0 if none). For a similarity
    (``distance="cosine"`` / ``"dot"``) the margins flip as in PML: ``ℓ⁺ = relu(m⁺ - s_ap)``,
    ``ℓ⁻ = relu(s_an - m⁻)`` (PML's defaults m⁺ = 0, m⁻ = 1 then make no sense: pass cosine
    margins such as ``pos_margin=1, neg_margin=0``). Every ordered pair counts (both (a, p) and (p, a)).

    Args:
      embeddings: ``(B, d)`` float (bf16 accepted, math in fp32).
      labels: ``(B,)`` int (only equality matters).
      pos_margin, neg_margin: ``m⁺``, ``m⁻`` (PML defaults 0 and 1), finite.
      distance: ``"euclidean"`` (PML ``LpDistance``, default), ``"cosine"`` or ``"dot"``.
      normalize_embeddings: L2-normalise first (PML's default True).
      mask: optional ``(B,)`` bool; a False row is in no pair.
      pos_mask, neg_mask: optional mined pairs ``(B, B)`` bool (a miner's output).
      triplet_mask: optional mined triplets, ``(B, B, B)`` bool or ``WindowedTriplets``; pairs
        listed with multiplicity.
      ref_embeddings, ref_labels, ref_mask: optional references ``(M, d)``, ``(M,)`` int and
        ``(M,)`` bool (PML's ``ref_emb`` / ``ref_labels``; see the module docstring): the pairs
        are ``(anchor row, reference row)`` (``a = p`` included), mined masks ``(B, M)`` /
        ``(B, M, M)``; a False ``ref_mask`` row is in no pair.

    Returns:
      A float32 scalar: 0 with no pair; NaN when an unmasked row (embedding or reference) holds a
      NaN or an inf.

    Raises:
      ValueError: wrong shapes / dtypes, an unknown distance, mined masks of the wrong shape.
      LossHyperparameterError: a concrete non-finite margin.
    """
    owner = "contrastive_loss"
    pc.check_distance(distance, normalize_embeddings, owner)
    pc.check_finite(pos_margin, f"{owner} pos_margin", "the distance below which positives stop pulling")
    pc.check_finite(neg_margin, f"{owner} neg_margin", "the distance beyond which negatives stop pushing")
    x, labels, mask = pc.prepare(embeddings, labels, mask)
    refs = pc.prepare_refs(ref_embeddings, ref_labels, ref_mask, x.shape[1], owner)
    weights = pc.pair_weights(pc.resolve_mined(labels, mask, pos_mask, neg_mask, triplet_mask, owner, refs))
    mat, inverted = pc.distance_matrix(x, distance, normalize_embeddings, pc.ref_rows(refs))

    pos_loss = jax.nn.relu(pc.margin(mat, pos_margin, inverted))
    neg_loss = jax.nn.relu(pc.margin(neg_margin, mat, inverted))
    loss = pc.avg_non_zero(pos_loss, weights.pos) + pc.avg_non_zero(neg_loss, weights.neg)
    loss = jnp.where(weights.generic_pair_loss_skips(), 0.0, loss)
    return loss + pc.nan_unless_finite(x, refs)


def multi_similarity_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    distance: str = "cosine",
    normalize_embeddings: bool = True,
    mask: jax.Array | None = None,
    pos_mask: jax.Array | None = None,
    neg_mask: jax.Array | None = None,
    triplet_mask: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_mask: jax.Array | None = None,
) -> jax.Array:
    r"""Multi-Similarity loss (Wang et al., CVPR 2019), PML's ``MultiSimilarityLoss``.

    With cosine similarities ``s`` (the default)::

        L = 1/B Σ_a [ 1/α log(1 + Σ_{p∈P_a} exp(-α (s_ap - λ)))
                    + 1/β log(1 + Σ_{n∈N_a} exp( β (s_an - λ))) ]

    ``λ = base``; ``P_a`` / ``N_a`` the anchor's positives (same label, not itself) and negatives
    (or the mined pairs). The mean runs over all ``B`` unmasked rows (PML's ``MeanReducer`` over
    the per-row terms): a row without pairs adds 0 but still counts. The pair selection of the
    paper is ``multi_similarity_miner``. For ``distance="euclidean"`` the signs flip as in PML
    (``exp(α (d_ap - λ))``, ``exp(β (λ - d_an))``).

    Args:
      embeddings, labels, mask, pos_mask, neg_mask, triplet_mask, ref_embeddings, ref_labels,
        ref_mask: as ``contrastive_loss`` (a pair listed at least once counts once).
      alpha: ``α > 0`` (PML 2). beta: ``β > 0`` (PML 50). base: ``λ``, finite (PML 0.5).
      distance, normalize_embeddings: as ``contrastive_loss``; default ``"cosine"``.

    Returns:
      A float32 scalar; 0 when every row is masked; NaN for a NaN / inf unmasked row.

    Raises:
      ValueError / LossHyperparameterError: as ``contrastive_loss``; ``alpha ≤ 0``, ``beta ≤ 0``.
    """
    owner = "multi_similarity_loss"
    pc.check_distance(distance, normalize_embeddings, owner)
    pc.check_finite(alpha, f"{owner} alpha", "the scale of the positive terms", low=0.0, low_inclusive=False)
    pc.check_finite(beta, f"{owner} beta", "the scale of the negative terms", low=0.0, low_inclusive=False)
    pc.check_finite(base, f"{owner} base", "the similarity that positives and negatives are pushed past")
    x, labels, mask = pc.prepare(embeddings, labels, mask)
    refs = pc.prepare_refs(ref_embeddings, ref_labels, ref_mask, x.shape[1], owner)
    weights = pc.pair_weights(pc.resolve_mined(labels, mask, pos_mask, neg_mask, triplet_mask, owner, refs))
    mat, inverted = pc.distance_matrix(x, distance, normalize_embeddings, pc.ref_rows(refs))

    pos_term = _common.masked_logsumexp_plus_one(alpha * pc.margin(mat, base, inverted), weights.pos > 0, 1)
    neg_term = _common.masked_logsumexp_plus_one(beta * pc.margin(base, mat, inverted), weights.neg > 0, 1)
    per_row = pos_term / alpha + neg_term / beta
    loss = pc.weighted_mean(per_row, mask.astype(jnp.float32))
    loss = jnp.where(weights.generic_pair_loss_skips(), 0.0, loss)
    return loss + pc.nan_unless_finite(x, refs)


def ntxent_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.07,
    distance: str = "cosine",
    normalize_embeddings: bool = True,
    mask: jax.Array | None = None,
    pos_mask: jax.Array | None = None,
    neg_mask: jax.Array | None = None,
    triplet_mask: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_mask: jax.Array | None = None,
) -> jax.Array:
    r"""Supervised NT-Xent / InfoNCE (the N-pair form over every positive), PML's ``NTXentLoss``.

    With cosine similarities ``s`` and temperature ``τ``, for every positive pair ``(a, p)``::

        ℓ_ap = -log( exp(s_ap/τ) / (exp(s_ap/τ) + Σ_{n∈N_a} exp(s_an/τ)) + tiny )
        L    = mean over the positive pairs of ℓ_ap

    (``tiny`` = float32's smallest normal number, as PML adds it: ``ℓ ≤ 87.3``.) The denominator
    holds the pair's own positive and the anchor's negatives only; a positive pair whose anchor
    has no negative contributes ``ℓ = 0`` but still counts in the mean, as in PML. 0 when there is
    no positive or no negative pair. With mined triplets, pairs count with multiplicity in the mean
    and the negatives with multiplicity in the denominator (PML's ``convert_to_pairs`` lists). For
    ``distance="euclidean"`` the logits are ``-d/τ``. This is PML's supervised NT-Xent; PML's
    ``NPairsLoss`` (one pair per class, dot products) is a different function.

    Args:
      embeddings, labels, mask, pos_mask, neg_mask, triplet_mask, distance, normalize_embeddings,
        ref_embeddings, ref_labels, ref_mask: as ``contrastive_loss``; default ``"cosine"``.
      temperature: ``τ > 0`` (PML 0.07).

    Returns:
      A float32 scalar (see above); NaN for a NaN / inf unmasked row.

    Raises:
      ValueError / LossHyperparameterError: as ``contrastive_loss``; ``temperature ≤ 0``.
    """
    owner = "ntxent_loss"
    pc.check_distance(distance, normalize_embeddings, owner)
    pc.check_finite(
        temperature, f"{owner} temperature", "the softmax temperature", low=0.0, low_inclusive=False
    )
    x, labels, mask = pc.prepare(embeddings, labels, mask)
    refs = pc.prepare_refs(ref_embeddings, ref_labels, ref_mask, x.shape[1], owner)
    weights = pc.pair_weights(pc.resolve_mined(labels, mask, pos_mask, neg_mask, triplet_mask, owner, refs))
    mat, inverted = pc.distance_matrix(x, distance, normalize_embeddings, pc.ref_rows(refs))

    logits = -pc.as_distance(mat, inverted) / temperature
    neg_lse, has_neg = pc.masked_logsumexp(logits, weights.neg > 0, axis=1, weights=weights.neg)  # (B,)
    # -log(e^z_ap / (e^z_ap + Σ_n e^z_an)) = softplus(log Σ_n e^z_an - z_ap); 0 without negatives.
    per_pair = jnp.where(has_neg[:, None], jax.nn.softplus(neg_lse[:, None] - logits), 0.0)
    # -log(r + tiny) with r = exp(-per_pair).
    per_pair = -jnp.logaddexp(-per_pair, pc.LOG_TINY_F32)
    loss = pc.weighted_mean(per_pair, weights.pos)
    empty = (weights.num_pos == 0) | (weights.num_neg == 0) | weights.generic_pair_loss_skips()
    return jnp.where(empty, 0.0, loss) + pc.nan_unless_finite(x, refs)


def lifted_structure_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    distance: str = "euclidean",
    normalize_embeddings: bool = True,
    mask: jax.Array | None = None,
    pos_mask: jax.Array | None = None,
    neg_mask: jax.Array | None = None,
    triplet_mask: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_mask: jax.Array | None = None,
) -> jax.Array:
    r"""Lifted structured loss of Song et al. (CVPR 2016), PML's ``LiftedStructureLoss``.

    PML has two classes: ``LiftedStructureLoss`` (this function, the original paper's form) and
    ``GeneralizedLiftedStructureLoss`` (Hermans et al. 2017, ``generalized_lifted_structure_loss``).
    For every positive pair ``(a, p)``, with ``N_a`` the negatives of ``a``::

        J_ap = log( Σ_{n∈N_a} exp(m⁻ - d_an) + Σ_{n∈N_p} exp(m⁻ - d_pn) ) + d_ap - m⁺
        L    = mean over the positive pairs of relu(J_ap)² / 2

    Every ordered pair counts, hence the ``/ 2`` (PML's comment: each pair is counted twice). The
    log term is 0 when neither ``a`` nor ``p`` has a negative. 0 when there is no positive or no
    negative pair. Mined triplets: multiplicities as in ``ntxent_loss``. For a similarity the
    margins flip as in PML (``exp(s_an - m⁻)``, ``m⁺ - s_ap``).

    Args:
      embeddings, labels, mask, pos_mask, neg_mask, triplet_mask, distance, normalize_embeddings:
        as ``contrastive_loss``; default ``"euclidean"`` (normalised).
      neg_margin: ``m⁻`` (PML 1), finite. pos_margin: ``m⁺`` (PML 0), finite.
      ref_embeddings, ref_labels, ref_mask: not supported (a ``ValueError``): ``N_p`` needs the
        positive to be an anchor too.

    Returns:
      A float32 scalar; NaN for a NaN / inf unmasked row.
    """
    owner = "lifted_structure_loss"
    pc.check_distance(distance, normalize_embeddings, owner)
    pc.check_finite(neg_margin, f"{owner} neg_margin", "the margin of the negatives")
    pc.check_finite(pos_margin, f"{owner} pos_margin", "the margin of the positives")
    x, labels, mask = pc.prepare(embeddings, labels, mask)
    refs = pc.prepare_refs(ref_embeddings, ref_labels, ref_mask, x.shape[1], owner)
    pc.refs_unsupported(
        refs,
        owner,
        "(nor a cross-batch memory): J_ap sums the negatives of the anchor a and of the positive p, "
        "but with references p is a reference row, which has no negatives; PML's "
        "LiftedStructureLoss then takes those of the batch row whose index equals p's reference "
        "index, which means nothing. Use generalized_lifted_structure_loss (per anchor) instead",
    )
    weights = pc.pair_weights(pc.resolve_mined(labels, mask, pos_mask, neg_mask, triplet_mask, owner, refs))
    mat, inverted = pc.distance_matrix(x, distance, normalize_embeddings, pc.ref_rows(refs))

    neg_lse, has_neg = pc.masked_logsumexp(
        pc.margin(neg_margin, mat, inverted), weights.neg > 0, axis=1, weights=weights.neg
    )  # (B,): log Σ_n exp(m⁻ - d_bn) per row b
    g_a, g_p = neg_lse[:, None], neg_lse[None, :]
    has_a, has_p = has_neg[:, None], has_neg[None, :]
    itself = jnp.eye(mat.shape[0], dtype=bool)  # a = p (possible only in a user's pos_mask): N_a once
    both = has_a & has_p & ~itself
    joint = jnp.where(both, jnp.logaddexp(g_a, g_p), jnp.where(has_a, g_a, jnp.where(has_p, g_p, 0.0)))
    per_pair = jnp.square(jax.nn.relu(joint + pc.margin(mat, pos_margin, inverted))) / 2.0
    loss = pc.weighted_mean(per_pair, weights.pos)
    empty = (weights.num_pos == 0) | (weights.num_neg == 0) | weights.generic_pair_loss_skips()
    return jnp.where(empty, 0.0, loss) + pc.nan_unless_finite(x, refs)


def generalized_lifted_structure_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    distance: str = "euclidean",
    normalize_embeddings: bool = True,
    mask: jax.Array | None = None,
    pos_mask: jax.Array | None = None,
    neg_mask: jax.Array | None = None,
    triplet_mask: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_mask: jax.Array | None = None,
) -> jax.Array:
    r"""Generalized lifted structure loss (Hermans et al. 2017, p. 4), PML's ``GeneralizedLiftedStructureLoss``.

    Per anchor, with ``P_a`` / ``N_a`` its positives / negatives::

        ℓ_a = relu( log Σ_{p∈P_a} exp(d_ap - m⁺) + log Σ_{n∈N_a} exp(m⁻ - d_an) )
        L   = 1/B Σ_a ℓ_a

    An empty sum's log counts as 0 (PML's ``lmu.logsumexp``); the mean runs over all ``B``
    unmasked rows (``MeanReducer``). For a similarity the margins flip as in PML.

    Args: as ``lifted_structure_loss`` (a mined pair listed at least once counts once), and
    ``ref_embeddings``, ``ref_labels``, ``ref_mask`` as ``contrastive_loss``.

    Returns:
      A float32 scalar; NaN for a NaN / inf unmasked row.
    """
    owner = "generalized_lifted_structure_loss"
    pc.check_distance(distance, normalize_embeddings, owner)
    pc.check_finite(neg_margin, f"{owner} neg_margin", "the margin of the negatives")
    pc.check_finite(pos_margin, f"{owner} pos_margin", "the margin of the positives")
    x, labels, mask = pc.prepare(embeddings, labels, mask)
    refs = pc.prepare_refs(ref_embeddings, ref_labels, ref_mask, x.shape[1], owner)
    weights = pc.pair_weights(pc.resolve_mined(labels, mask, pos_mask, neg_mask, triplet_mask, owner, refs))
    mat, inverted = pc.distance_matrix(x, distance, normalize_embeddings, pc.ref_rows(refs))

    pos_lse, _ = pc.masked_logsumexp(pc.margin(mat, pos_margin, inverted), weights.pos > 0, axis=1)
    neg_lse, _ = pc.masked_logsumexp(pc.margin(neg_margin, mat, inverted), weights.neg > 0, axis=1)
    loss = pc.weighted_mean(jax.nn.relu(pos_lse + neg_lse), mask.astype(jnp.float32))
    loss = jnp.where(weights.generic_pair_loss_skips(), 0.0, loss)
    return loss + pc.nan_unless_finite(x, refs)


def circle_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    distance: str = "cosine",
    mask: jax.Array | None = None,
    pos_mask: jax.Array | None = None,
    neg_mask: jax.Array | None = None,
    triplet_mask: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_mask: jax.Array | None = None,
) -> jax.Array:
    r"""Circle loss (Sun et al., CVPR 2020) with pair labels, PML's ``CircleLoss``.

    With cosine similarities ``s``, ``O_p = 1 + m``, ``O_n = -m``, ``Δ_p = 1 - m``, ``Δ_n = m``::

        w_ap = -γ · relu(O_p - sg(s_ap)) · (s_ap - Δ_p)          (positives)
        w_an =  γ · relu(sg(s_an) - O_n) · (s_an - Δ_n)          (negatives)
        ℓ_a  = softplus( log Σ_{p∈P_a} exp(w_ap) + log Σ_{n∈N_a} exp(w_an) )
        L    = AvgNonZero over the rows a that have a positive and a negative

    ``sg`` is stop-gradient (PML detaches the weights ``α_p``, ``α_n``). Rows without a positive
    or a negative are 0 and, like any term that is exactly 0, left out of the mean. Cosine only
    (PML asserts ``CosineSimilarity``).

    Args:
      embeddings, labels, mask, pos_mask, neg_mask, triplet_mask, ref_embeddings, ref_labels,
        ref_mask: as ``contrastive_loss`` (a pair listed at least once counts once).
      m: the relaxation margin (PML 0.4), finite. gamma: the scale ``γ > 0`` (PML 80).
      distance: only ``"cosine"``.

    Returns:
      A float32 scalar; NaN for a NaN / inf unmasked row.
    """
    owner = "circle_loss"
    pc.check_distance(distance, True, owner, allowed=("cosine",))
    pc.check_finite(m, f"{owner} m", "the relaxation margin")
    pc.check_finite(gamma, f"{owner} gamma", "the scale of the similarities", low=0.0, low_inclusive=False)
    x, labels, mask = pc.prepare(embeddings, labels, mask)
    refs = pc.prepare_refs(ref_embeddings, ref_labels, ref_mask, x.shape[1], owner)
    weights = pc.pair_weights(pc.resolve_mined(labels, mask, pos_mask, neg_mask, triplet_mask, owner, refs))
    sim, _ = pc.distance_matrix(x, "cosine", True, pc.ref_rows(refs))

    fixed = jax.lax.stop_gradient(sim)
    pos_logits = -gamma * jax.nn.relu(1.0 + m - fixed) * (sim - (1.0 - m))
    neg_logits = gamma * jax.nn.relu(fixed + m) * (sim - m)
    pos_lse, has_pos = pc.masked_logsumexp(pos_logits, weights.pos > 0, axis=1)
    neg_lse, has_neg = pc.masked_logsumexp(neg_logits, weights.neg > 0, axis=1)
    per_row = jnp.where(has_pos & has_neg, jax.nn.softplus(pos_lse + neg_lse), 0.0)
    loss = pc.avg_non_zero(per_row, jnp.ones_like(per_row))
    loss = jnp.where(weights.generic_pair_loss_skips(), 0.0, loss)
    return loss + pc.nan_unless_finite(x, refs)
