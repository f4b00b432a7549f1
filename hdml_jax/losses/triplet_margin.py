"""Triplet-based losses with pytorch-metric-learning's semantics: ``triplet_margin_loss``, ``margin_loss``.

PML 2.x's ``TripletMarginLoss`` and ``MarginLoss`` as pure JAX functions (the contract of
``hdml_jax.losses.pair``: fixed shapes, jit / grad / vmap-safe, float32 math, ``mask`` rows absent,
exactly 0 with no triplet, NaN for a NaN / inf unmasked row). Without mined tuples they use every
valid triplet ``(a, p, n)`` (``y_a = y_p``, ``a ≠ p``, ``y_n ≠ y_a``: PML's
``triplets_per_anchor="all"``); ``pos_mask`` / ``neg_mask`` restrict them to
``pos[a, p] & neg[a, n]`` (PML's ``convert_to_triplets`` of an ``(a1, p, a2, n)`` tuple) and
``triplet_mask`` names them explicitly: a ``(B, B, B)`` bool mask or the triplet miners'
``WindowedTriplets``. With references (``ref_embeddings``,
``ref_labels``, ``ref_mask``: PML's ``ref_emb`` / ``ref_labels``, see ``hdml_jax.losses.pair``)
the anchors are batch rows and the positives / negatives reference rows: ``(B, M)`` pair counts,
``(B, M, M)`` triplet masks.

How they avoid ``(B, B, B)`` float tensors. Both losses are sums of hinge terms. The margin loss
separates into pair terms weighted by how many triplets hold each pair (``O(B²)``). For the
triplet margin loss, a term ``relu(d_ap - d_an + margin)`` is non-zero iff
``d_an < d_ap + margin``; sorting each anchor's negative distances turns the number of such
negatives per ``(a, p)``, and per ``(a, n)`` the number of such positives, into binary searches.
With those counts ``c`` (constant almost everywhere, so they carry no gradient) the sum is the
linear ``Σ c_ap (d_ap + margin) - Σ c_an d_an``: ``O(B² log B)`` forward and backward. Mined
``WindowedTriplets`` (``lo < μ_apn ≤ hi``, ``μ = d_an - d_ap``) are counted the same way: the
violated ones are the window narrowed to ``μ < margin``, a range of each anchor's sorted negative
(positive) distances found by binary search on the rounded ``μ`` (the dense counts exactly),
``O(B² log B)`` too, as long as they were mined on the loss's own distance matrix (the usual
``loss(x, y, **miner(x, y))``; checked at run time, else counted anchor by anchor, ``O(B³)``).
Only dense triplet masks (and ``swap`` / ``smooth_loss``) need a pass over ``B³`` booleans (or
floats).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hdml_jax.losses import _common
from hdml_jax.losses import _pair_common as pc


def _check_triplets_per_anchor(triplets_per_anchor, owner: str) -> None:
    if triplets_per_anchor != "all":
        raise ValueError(
            f"{owner} supports triplets_per_anchor='all' only, got {triplets_per_anchor!r}: PML samples "
            "that many random triplets per anchor, which has no fixed-shape deterministic equivalent; "
            "select triplets with a miner (hdml_jax.losses.miners) and pass its output instead."
        )


_sort_rows = pc.sort_rows
_searchsorted_rows = pc.searchsorted_rows


def _hinge_counts_from_pairs(
    u: jax.Array, pos: jax.Array, neg: jax.Array, margin
) -> tuple[jax.Array, jax.Array]:
    """For the triplets ``pos[a,p] & neg[a,n]`` whose hinge ``u_ap - u_an + margin`` is > 0:
    ``c_ap`` = their number per ``(a, p)`` and ``c_an`` per ``(a, n)`` (int32, ``(B, B)``).

    Both count the same predicate ``u_an < t_ap`` with ``t_ap = u_ap + margin`` (so they sum to the
    same total), by binary search in each anchor's sorted negative distances / thresholds.
    """
    threshold = u + margin
    neg_sorted = _sort_rows(jnp.where(neg, u, jnp.inf))
    c_ap = _searchsorted_rows(neg_sorted, threshold, side="left")  # #{n ∈ N_a : u_an < t_ap}
    thr_sorted = _sort_rows(jnp.where(pos, threshold, jnp.inf))
    not_above = _searchsorted_rows(thr_sorted, u, side="right")  # #{p ∈ P_a : t_ap ≤ u_an}
    num_pos = jnp.sum(pos, axis=1, keepdims=True, dtype=jnp.int32)
    c_ap = jnp.where(pos, c_ap, 0).astype(jnp.int32)
    c_an = jnp.where(neg, num_pos - not_above, 0).astype(jnp.int32)
    return c_ap, c_an


def _hinge_counts_explicit(u: jax.Array, triplets: jax.Array, margin) -> tuple[jax.Array, jax.Array]:
    """The same counts for explicit triplets: one pass over ``B³`` booleans."""
    violated = triplets & ((u[:, :, None] - u[:, None, :]) + margin > 0)
    return jnp.sum(violated, axis=2, dtype=jnp.int32), jnp.sum(violated, axis=1, dtype=jnp.int32)


def _hinge_counts_windowed(
    u: jax.Array, triplets: pc.WindowedTriplets, margin
) -> tuple[jax.Array, jax.Array]:
    """The same counts for ``WindowedTriplets``, without a ``B³`` array when they were mined on
    this very distance matrix.

    The hinge ``(u_ap - u_an) + margin > 0`` holds iff ``μ < margin`` for the float32
    ``μ = u_an - u_ap`` (the rounded difference changes sign with the exact one, and
    ``fl(u_ap - u_an) = -μ``). Where the miner's distances equal ``u`` on the mined pairs (the usual
    ``loss(x, y, **miner(x, y))``: the same computation) the violated triplets are the window
    narrowed to ``μ < margin``, counted by ``WindowedTriplets.counts`` in ``O(B·M log M)``.
    Otherwise (mined on other embeddings or with another distance; checked at run time) the hinge
    and the window order the negatives differently, and the triplets are counted anchor by anchor
    as explicit masks (``O(B·M²)`` work, ``O(M²)`` memory at a time; about as slow as a dense
    ``triplet_mask``). Under ``vmap`` the check is per batch element, so the ``cond`` becomes a
    select that runs both.
    """
    u = jax.lax.stop_gradient(u)
    same = jnp.all(jnp.where(triplets.pos | triplets.neg, triplets.dist == u, True))
    fast = triplets.counts(below=margin)  # outside the cond: XLA optimises it with the rest

    def per_anchor(rows):
        u_a, dist_a, pos_a, neg_a = (row[None] for row in rows)
        dense = pc.WindowedTriplets(dist_a, pos_a, neg_a, triplets.lo, triplets.hi).dense()
        c_ap, c_an = _hinge_counts_explicit(u_a, dense, margin)
        return c_ap[0], c_an[0]

    def fallback():  # one anchor at a time: a cond branch's buffers are allocated even unused
        return jax.lax.map(per_anchor, (u, triplets.dist, triplets.pos, triplets.neg))

    return jax.lax.cond(same, lambda: fast, fallback)


def triplet_margin_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.05,
    swap: bool = False,
    smooth_loss: bool = False,
    triplets_per_anchor: str = "all",
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
    r"""Triplet margin loss over all (or the mined) triplets, PML's ``TripletMarginLoss``.

    With ``d`` the distance (default: Euclidean between L2-normalised rows), over the triplets
    ``(a, p, n)``::

        ℓ_apn = relu(d_ap - d_an + margin)        (softplus(·) with smooth_loss=True)
        L     = AvgNonZero(ℓ)                     (mean over the triplets with ℓ > 0; 0 if none)

    ``swap=True`` uses ``min(d_an, d_pn)`` in place of ``d_an`` (Balntas et al. 2016). For a
    similarity ``s`` (``"cosine"`` / ``"dot"``) the hinge is ``relu(s_an - s_ap + margin)`` and the
    swap takes ``max(s_an, s_pn)``. This is not ``batch_hard_triplet_loss`` (CGD's loss: one
    triplet per anchor, plain distances, mean over anchors); ``triplet_margin_loss(x, y,
    **batch_hard_miner(x, y))`` is PML's ``TripletMarginLoss`` with a ``BatchHardMiner``.

    Args:
      embeddings: ``(B, d)`` float (bf16 accepted, math in fp32).
      labels: ``(B,)`` int (only equality matters).
      margin: ``≥ 0`` (PML 0.05).
      swap, smooth_loss: as PML (both False by default; either one costs a pass over ``B³`` floats,
        and builds the dense mask of ``WindowedTriplets``).
      triplets_per_anchor: ``"all"`` only (PML's integer setting samples random triplets: use a
        miner instead); a ``ValueError`` otherwise.
      distance: ``"euclidean"`` (default), ``"cosine"`` or ``"dot"``; normalize_embeddings: as PML.
      mask: optional ``(B,)`` bool; a False row is in no triplet.
      pos_mask, neg_mask: optional mined pairs ``(B, B)`` bool: the triplets ``pos[a,p] & neg[a,n]``.
      triplet_mask: optional mined triplets: ``(B, B, B)`` bool or ``WindowedTriplets`` (what
        ``triplet_margin_miner`` / ``semi_hard_miner`` return; ``O(B² log B)``, see the module
        docstring).
      ref_embeddings, ref_labels, ref_mask: optional references ``(M, d)``, ``(M,)``, ``(M,)`` bool
        (PML's ``ref_emb`` / ``ref_labels``): the triplets are ``(anchor row a, reference p,
        reference n)`` with ``y_a = y'_p`` (``p = a`` not excluded) and ``y'_n ≠ y_a``; mined masks
        ``(B, M)`` / ``(B, M, M)``. Not with ``swap=True`` (a ``ValueError``).

    Returns:
      A float32 scalar; 0 with no triplet (or none violating the margin); NaN for a NaN / inf
      unmasked row.

    Raises:
      ValueError: wrong shapes / dtypes, an unknown distance, ``triplets_per_anchor`` not "all".
      LossHyperparameterError: a concrete ``margin < 0`` or non-finite.
    """
    owner = "triplet_margin_loss"
    pc.check_distance(distance, normalize_embeddings, owner)
    _check_triplets_per_anchor(triplets_per_anchor, owner)
    pc.check_finite(margin, f"{owner} margin", "the gap a negative must keep beyond the positive", low=0.0)
    x, labels, mask = pc.prepare(embeddings, labels, mask)
    refs = pc.prepare_refs(ref_embeddings, ref_labels, ref_mask, x.shape[1], owner)
    if swap:
        pc.refs_unsupported(
            refs,
            owner,
            "with swap=True: the swap needs d_pn between two reference rows, which the (B, M) "
            "matrix does not hold (PML reads mat[p, n] with p a reference index used as a batch "
            "index)",
        )
    mined = pc.resolve_mined(labels, mask, pos_mask, neg_mask, triplet_mask, owner, refs)
    mat, inverted = pc.distance_matrix(x, distance, normalize_embeddings, pc.ref_rows(refs))
    u = pc.as_distance(mat, inverted)  # larger = farther, for both kinds

    if swap or smooth_loss:
        triplets = mined.triplets
        if isinstance(triplets, pc.WindowedTriplets):
            triplets = triplets.dense()
        elif triplets is None:
            triplets = mined.pos[:, :, None] & mined.neg[:, None, :]
        an = u[:, None, :]
        if swap:
            an = jnp.minimum(an, u[None, :, :])  # PML's smallest_dist(d_an, d_pn)
        violation = (u[:, :, None] - an) + margin
        per_triplet = jax.nn.softplus(violation) if smooth_loss else jax.nn.relu(violation)
        loss = pc.avg_non_zero(per_triplet, triplets.astype(jnp.float32))
        return loss + pc.nan_unless_finite(x, refs)

    if isinstance(mined.triplets, pc.WindowedTriplets):
        c_ap, c_an = _hinge_counts_windowed(u, mined.triplets, margin)
    elif mined.triplets is not None:
        c_ap, c_an = _hinge_counts_explicit(u, mined.triplets, margin)
    else:
        c_ap, c_an = _hinge_counts_from_pairs(u, mined.pos, mined.neg, margin)
    c_ap = jax.lax.stop_gradient(c_ap.astype(jnp.float32))
    c_an = jax.lax.stop_gradient(c_an.astype(jnp.float32))
    # Σ over violated triplets of (u_ap - μ_a + margin) - (u_an - μ_a): μ_a (a per-anchor constant)
    # cancels exactly and keeps the two large sums from cancelling each other in float32.
    offset = pc.row_offsets(u, pc.pair_validity(mask, refs))
    total = jnp.sum(c_ap * (u - offset + margin)) - jnp.sum(c_an * (u - offset))
    loss = total / jnp.maximum(jnp.sum(c_ap), 1.0)
    return loss + pc.nan_unless_finite(x, refs)


def init_margin_beta(beta: float = 1.2, num_classes: int | None = None) -> jax.Array:
    """The initial ``beta`` of ``margin_loss`` as PML's ``MarginLoss`` creates it: a float32
    scalar, or ``(num_classes,)`` (one β per class) when ``num_classes`` is given."""
    value = jnp.asarray(beta, jnp.float32)
    if num_classes:
        return jnp.full((int(num_classes),), value)
    return value


def margin_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    beta: jax.Array | float = 1.2,
    *,
    margin: float = 0.2,
    nu: float = 0.0,
    triplets_per_anchor: str = "all",
    learn_beta: bool = False,
    num_classes: int | None = None,
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
    r"""Margin loss (Wu et al., ICCV 2017, "Sampling matters"), PML's ``MarginLoss``.

    Over the triplets ``(a, p, n)`` (all valid ones, or the mined ones), with ``β_a`` the boundary
    (a scalar, or one per class: ``β[y_a]``) and ``α = margin``::

        ℓ⁺_apn = relu(d_ap - β_a + α)         ℓ⁻_apn = relu(β_a - d_an + α)
        L = Σ_T (ℓ⁺ + ℓ⁻) / (#{ℓ⁺ > 0} + #{ℓ⁻ > 0})         (0 when the divisor is 0)
          + ν · β                       (learn_beta, scalar β; whenever there is a triplet)
          + ν · Σ_T β_a / divisor       (learn_beta, per-class β)

    PML's ``DivisorReducer`` for both parts, summed. Each triplet holds its positive and its
    negative term, so a pair is counted once per triplet that contains it (PML's lists). For a
    similarity the signs flip as in PML (``relu(β - s_ap + α)``, ``relu(s_an - β + α)``).

    ``beta`` is the learnable parameter (a pytree leaf): differentiate with
    ``jax.grad(margin_loss, argnums=(0, 2))``. ``learn_beta=False`` (PML's default) stops its
    gradient (it is a constant, as in PML) and drops the ``ν`` term; ``learn_beta=True`` lets
    gradients through and adds it. ``init_margin_beta`` makes the initial value.

    Args:
      embeddings: ``(B, d)`` float (bf16 accepted, math in fp32).
      labels: ``(B,)`` int; in ``[0, C)`` with a per-class β (checked when concrete; under jit an
        out-of-range label reads a clamped index).
      beta: a scalar (or shape ``(1,)``) or ``(C,)`` float (PML 1.2).
      margin: ``α ≥ 0`` (PML 0.2). nu: ``ν ≥ 0`` (PML 0), the β regulariser.
      triplets_per_anchor: ``"all"`` only (see ``triplet_margin_loss``).
      learn_beta: see above. num_classes: PML's: with a scalar ``beta``, one β per class
        (``(num_classes,)`` broadcast, so the regulariser is the per-class one); with a ``(C,)``
        beta it must equal ``C``.
      distance, normalize_embeddings, mask, pos_mask, neg_mask, triplet_mask, ref_embeddings,
        ref_labels, ref_mask: as ``triplet_margin_loss``.

    Returns:
      A float32 scalar; NaN for a NaN / inf unmasked row.

    Raises:
      ValueError: wrong shapes, ``beta`` not scalar / ``(C,)``, ``num_classes`` disagreeing with it.
      LossHyperparameterError: a concrete ``margin < 0`` or ``nu < 0`` (or non-finite).
    """
    owner = "margin_loss"
    pc.check_distance(distance, normalize_embeddings, owner)
    _check_triplets_per_anchor(triplets_per_anchor, owner)
    pc.check_finite(margin, f"{owner} margin", "α, the half-width of the band around β", low=0.0)
    pc.check_finite(nu, f"{owner} nu", "ν, the weight of the β regulariser", low=0.0)
    beta = jnp.asarray(beta)
    if not jnp.issubdtype(beta.dtype, jnp.floating):
        beta = beta.astype(jnp.float32)
    if beta.ndim > 1 or (beta.ndim == 1 and beta.shape[0] == 0):
        raise ValueError(f"{owner} beta must be a scalar or a (num_classes,) vector, got shape {beta.shape}.")
    if num_classes:
        if beta.ndim == 0 or beta.shape[0] == 1:
            beta = jnp.broadcast_to(jnp.reshape(beta, ()), (int(num_classes),))
        elif beta.shape[0] != num_classes:
            raise ValueError(f"{owner}: beta has {beta.shape[0]} entries but num_classes = {num_classes}.")
    per_class = beta.ndim == 1 and beta.shape[0] > 1
    x, labels, mask = pc.prepare(embeddings, labels, mask)
    refs = pc.prepare_refs(ref_embeddings, ref_labels, ref_mask, x.shape[1], owner)
    if per_class:
        _common.check_labels(labels, x.shape[0], beta.shape[0], mask=mask)
    beta = beta.astype(jnp.float32)
    if not learn_beta:
        beta = jax.lax.stop_gradient(beta)
    mined = pc.resolve_mined(labels, mask, pos_mask, neg_mask, triplet_mask, owner, refs)
    mat, inverted = pc.distance_matrix(x, distance, normalize_embeddings, pc.ref_rows(refs))

    # How many triplets hold each (a, p), each (a, n), and each anchor a.
    if mined.triplets is not None:
        w_pos, w_neg = pc.triplet_pair_counts(mined.triplets)
    else:
        pos, neg = mined.pos.astype(jnp.float32), mined.neg.astype(jnp.float32)
        w_pos = pos * jnp.sum(neg, axis=1, keepdims=True)
        w_neg = neg * jnp.sum(pos, axis=1, keepdims=True)
    per_anchor = jnp.sum(w_pos, axis=1)  # triplets per anchor
    num_triplets = jnp.sum(per_anchor)

    beta_a = beta[jnp.clip(labels, 0, beta.shape[0] - 1)] if per_class else jnp.reshape(beta, ())
    beta_col = beta_a[:, None] if per_class else beta_a
    pos_loss = jax.nn.relu(pc.margin(mat, beta_col, inverted) + margin)
    neg_loss = jax.nn.relu(pc.margin(beta_col, mat, inverted) + margin)
    divisor = jnp.sum(jnp.where(pos_loss > 0, w_pos, 0.0)) + jnp.sum(jnp.where(neg_loss > 0, w_neg, 0.0))
    total = jnp.sum(w_pos * pos_loss) + jnp.sum(w_neg * neg_loss)
    safe_divisor = jnp.maximum(divisor, 1.0)
    loss = jnp.where(divisor > 0, total / safe_divisor, 0.0)
    if learn_beta:
        if per_class:
            reg = nu * jnp.sum(per_anchor * beta_a) / safe_divisor
            loss = loss + jnp.where(divisor > 0, reg, 0.0)
        else:
            loss = loss + jnp.where(num_triplets > 0, nu * beta_a, 0.0)
    return loss + pc.nan_unless_finite(x, refs)
