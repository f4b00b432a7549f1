"""Shared pieces of the pair / triplet losses and miners (``pair.py``, ``triplet_margin.py``, ``miners.py``).

They reproduce pytorch-metric-learning 2.x (PML) conventions with fixed shapes:

* Distances: ``"euclidean"`` is PML's ``LpDistance(p=2)`` (embeddings L2-normalised first unless
  ``normalize_embeddings=False``), ``"cosine"`` its ``CosineSimilarity`` and ``"dot"`` its
  ``DotProductSimilarity`` (normalised by default too, i.e. the cosine). Euclidean distances are
  "non-inverted" (small = close), the two similarities "inverted" (large = close), and PML's
  ``distance.margin(x, y)`` is ``x - y`` or ``y - x`` accordingly (``margin`` below).
* Reference rows (PML's ``ref_emb`` / ``ref_labels``, what ``CrossBatchMemory`` passes): with
  ``Refs`` every anchor is a row of the embeddings ``(B, d)`` and every positive / negative a row
  of the references ``(M, d)``; the matrices become ``(B, M)`` (``(B, M, M)`` for triplets) and,
  as in PML, a pair ``(i, j)`` with the same label is positive even for ``i == j`` (the
  references are another set; the memory's own self comparisons are removed by ``xbm.py``).
* Mined tuples: PML passes index lists (``(a, p, n)`` triplets or ``(a1, p, a2, n)`` pairs); here
  they are boolean masks, ``pos_mask`` / ``neg_mask`` ``(B, B)``, or ``triplet_mask``: a dense
  ``(B, B, B)`` bool mask or ``WindowedTriplets``, the structured form the triplet miners return
  (``pos[a, p] & neg[a, n] & (lo < μ_apn ≤ hi)``, ``O(B²)`` numbers; ``.dense()`` gives the mask).
  A pair loss given triplets sees PML's ``convert_to_pairs`` lists ``(a, p, a, n)``, in which a pair
  appears once per triplet that holds it: ``PairWeights`` keeps those multiplicities (the
  pair-based losses weight by them, the matrix-based ones only test ``> 0``), counted in one pass
  over a dense mask or by sorted rows and binary searches (``O(B² log B)``) for
  ``WindowedTriplets``. A triplet loss given pairs sees PML's ``convert_to_triplets``: every
  ``(a, p, n)`` with ``(a, p)`` positive and ``(a, n)`` negative.
* Exact duplicates are at Euclidean distance exactly 0, as with ``torch.cdist``'s direct path (PML
  on ≤ 25 rows); above 25 rows ``cdist`` switches to a matrix-product expansion whose rounding
  can leave ~5e-4 there, which an ``AvgNonZeroReducer`` then counts as a positive term. Between
  the embeddings and reference rows such a residue can remain here too (``_cross_distance_matrix``).
* Reducers: ``avg_non_zero`` (``AvgNonZeroReducer``) and ``weighted_mean`` (``MeanReducer``) over
  such weighted lists; both are exactly 0 for an empty list.

All similarity / distance products run at ``_common.FULL_PRECISION``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.losses import _common
from hdml_jax.losses._common import LossHyperparameterError
from hdml_jax.losses.triplet import safe_sqrt

DISTANCES = ("euclidean", "cosine", "dot")

# log of float32's smallest normal number: PML's NTXentLoss adds ``finfo.tiny`` inside its log.
LOG_TINY_F32 = math.log(float(jnp.finfo(jnp.float32).tiny))


def check_distance(distance, normalize_embeddings, owner: str, allowed: tuple[str, ...] = DISTANCES) -> None:
    if distance not in allowed:
        raise ValueError(
            f"{owner} distance must be one of {', '.join(repr(d) for d in allowed)}, got {distance!r} "
            "(PML LpDistance → 'euclidean', CosineSimilarity → 'cosine', DotProductSimilarity → 'dot')."
        )
    if not isinstance(normalize_embeddings, (bool, np.bool_)):
        raise ValueError(f"{owner} normalize_embeddings must be a bool, got {normalize_embeddings!r}.")
    if distance == "cosine" and not normalize_embeddings:
        raise ValueError(
            f"{owner}: the cosine similarity always normalises (as PML's CosineSimilarity); "
            "use distance='dot' with normalize_embeddings=False for raw dot products."
        )


def check_finite(
    value, name: str, meaning: str, *, low: float = -math.inf, low_inclusive: bool = True
) -> None:
    """``LossHyperparameterError`` unless a concrete ``value`` is finite (and above ``low``)."""
    if math.isinf(low):
        if not _common.is_concrete(value):
            return
        try:
            number = math.nan if isinstance(value, (str, bytes)) else float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise LossHyperparameterError(f"{name} must be a finite number ({meaning}), got {value!r}.")
        return
    _common.check_hyperparameter(value, name, low=low, low_inclusive=low_inclusive, meaning=meaning)


def distance_matrix(
    x: jax.Array, distance: str, normalize_embeddings: bool, ref: jax.Array | None = None
) -> tuple[jax.Array, bool]:
    """``(mat, inverted)``: the float32 distance / similarity matrix of the rows of ``x`` against
    themselves ``(B, B)``, or against the rows of ``ref`` ``(B, M)``.

    ``inverted`` is True for similarities. The Euclidean distance has value and gradient 0 at 0
    (duplicate rows, the diagonal).
    """
    if ref is not None:
        return _cross_distance_matrix(x, ref, distance, normalize_embeddings)
    if distance == "cosine" or normalize_embeddings:
        x = _common.l2_normalize(x)
    gram = jnp.matmul(x, x.T, precision=_common.FULL_PRECISION)
    if distance != "euclidean":
        return gram, True
    # ‖x_i‖² + ‖x_j‖² - 2 x_i·x_j with the norms read off the Gram diagonal: for two identical rows
    # the three terms are the same products, so their distance is exactly 0 (as torch.cdist's),
    # not a rounding residue whose square root (~3e-4) would count as a positive term.
    sq_norm = jnp.diagonal(gram)
    sq_dist = jnp.maximum(sq_norm[:, None] + sq_norm[None, :] - 2.0 * gram, 0.0)
    sq_dist = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, sq_dist)
    return safe_sqrt(sq_dist), False


def _cross_distance_matrix(
    x: jax.Array, ref: jax.Array, distance: str, normalize_embeddings: bool
) -> tuple[jax.Array, bool]:
    """``distance_matrix`` of ``x (B, d)`` against ``ref (M, d)``: ``(B, M)``."""
    if distance == "cosine" or normalize_embeddings:
        x, ref = _common.l2_normalize(x), _common.l2_normalize(ref)
    cross = jnp.matmul(x, ref.T, precision=_common.FULL_PRECISION)
    if distance != "euclidean":
        return cross, True
    # ‖x_i‖² + ‖r_j‖² - 2 x_i·r_j, clamped at 0. Unlike the (B, B) case there is no Gram diagonal
    # to read the norms off: they are row sums, rounded differently from the matmul's dot
    # products, so a row of x that also is a row of ref (in XBM: an anchor and its own memory
    # slot) is often at a rounding residue (1e-7..1e-6 squared, 3e-4..1e-3 after the square root)
    # rather than at exactly 0 -- as with torch.cdist's matrix-product path, which PML takes above
    # 25 rows. Exact zeros would need the norms and the dot products from one summation order (a
    # Gram matrix of the stacked rows: (B + M)² instead of B·M products), not worth it here. The
    # clamp keeps the square root real where the residue is negative; safe_sqrt gives value and
    # gradient 0 where it is exactly 0. XBM removes the anchor-own-slot pairs (xbm.py), so the
    # residue matters only for genuine duplicates, as in PML.
    sq_x = jnp.sum(x * x, axis=1)
    sq_ref = jnp.sum(ref * ref, axis=1)
    sq_dist = jnp.maximum(sq_x[:, None] + sq_ref[None, :] - 2.0 * cross, 0.0)
    return safe_sqrt(sq_dist), False


def margin(x, y, inverted: bool):
    """PML's ``distance.margin(x, y)``: ``x - y`` for a distance, ``y - x`` for a similarity."""
    return y - x if inverted else x - y


def as_distance(mat: jax.Array, inverted: bool) -> jax.Array:
    """``mat`` for a distance, ``-mat`` for a similarity: larger always means farther."""
    return -mat if inverted else mat


def nan_unless_finite(x: jax.Array, refs: Refs | None = None) -> jax.Array:
    """0.0, or NaN when ``x`` (the masked embeddings) or the masked reference rows hold a NaN or
    an inf; carries no gradient.

    Added to every result so that a bad unmasked row gives NaN even where a reducer would skip
    the NaN terms (``NaN > 0`` is False in ``AvgNonZeroReducer``, which PML then silently drops).
    """
    finite = jnp.all(jnp.isfinite(x))
    if refs is not None:
        finite = finite & jnp.all(jnp.isfinite(refs.x))
    return jnp.where(finite, 0.0, jnp.nan).astype(jnp.float32)


def prepare(embeddings, labels, mask) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Validate; ``(x float32 with masked rows zeroed, labels, mask (B,) bool)``."""
    _common.check_embeddings(embeddings)
    batch = embeddings.shape[0]
    _common.check_labels(labels, batch)
    mask = _common.resolve_mask(mask, batch)
    x = _common.zero_masked_rows(jnp.asarray(embeddings).astype(jnp.float32), mask)
    return x, jnp.asarray(labels), mask


class Refs(NamedTuple):
    """Reference rows (PML's ``ref_emb`` / ``ref_labels``): the positives / negatives of every anchor."""

    x: jax.Array  # (M, d) float32, rows outside ``mask`` zeroed
    labels: jax.Array  # (M,) int
    mask: jax.Array  # (M,) bool: the rows that take part


def prepare_refs(ref_embeddings, ref_labels, ref_mask, dim: int, owner: str) -> Refs | None:
    """Validate the reference keywords of a loss / miner; ``None`` without references.

    ``ref_embeddings (M, d)`` needs ``ref_labels (M,)``; ``ref_mask (M,)`` bool is optional (all
    rows). ``d`` must be the embeddings' dimension. Masked rows are zeroed like masked anchors.
    """
    if ref_embeddings is None:
        if ref_labels is not None or ref_mask is not None:
            raise ValueError(f"{owner}: ref_labels / ref_mask were given without ref_embeddings.")
        return None
    if ref_labels is None:
        raise ValueError(f"{owner}: ref_embeddings need ref_labels (one label per reference row).")
    _common.check_embeddings(ref_embeddings, name="ref_embeddings")
    size = jnp.shape(ref_embeddings)[0]
    if jnp.shape(ref_embeddings)[1] != dim:
        raise ValueError(
            f"{owner}: ref_embeddings have dimension {jnp.shape(ref_embeddings)[1]} but embeddings "
            f"have dimension {dim}; both must live in the same space."
        )
    _common.check_labels(ref_labels, size, name="ref_labels")
    if ref_mask is None:
        mask = jnp.ones((size,), dtype=bool)
    elif jnp.shape(ref_mask) != (size,):
        raise ValueError(
            f"{owner}: ref_mask must have shape ({size},) (one flag per reference row), "
            f"got {jnp.shape(ref_mask)}."
        )
    else:
        mask = jnp.asarray(ref_mask).astype(bool)
    r = _common.zero_masked_rows(jnp.asarray(ref_embeddings).astype(jnp.float32), mask)
    return Refs(r, jnp.asarray(ref_labels), mask)


def refs_unsupported(refs: Refs | None, owner: str, why: str) -> None:
    if refs is not None:
        raise ValueError(f"{owner} does not take ref_embeddings {why}.")


def _check_mined(value, name: str, shape: tuple[int, ...]) -> jax.Array:
    if jnp.shape(value) != shape:
        sizes = (
            f"batch size {shape[0]}" if len(set(shape)) == 1 else f"batch size {shape[0]}, {shape[1]} refs"
        )
        raise ValueError(f"{name} must have shape {shape} ({sizes}), got {jnp.shape(value)}.")
    dtype = jnp.result_type(value)
    if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f"{name} must be boolean (as a miner returns it), got dtype {dtype}.")
    return jnp.asarray(value).astype(bool)


def _label_pairs(labels: jax.Array, mask: jax.Array, refs: Refs | None = None) -> tuple[jax.Array, jax.Array]:
    """PML's ``get_all_pairs_indices`` as masks: same label (not self) / different label.

    With references ``(B, M)``: same / different label between anchor ``i`` and reference ``j``;
    ``i == j`` is not excluded (PML's ``get_matches_and_diffs`` clears the diagonal only when the
    references are the embeddings themselves).
    """
    if refs is not None:
        valid = mask[:, None] & refs.mask[None, :]
        same = labels[:, None] == refs.labels[None, :]
        return same & valid, ~same & valid
    batch = labels.shape[0]
    valid = mask[:, None] & mask[None, :]
    same = labels[:, None] == labels[None, :]
    pos = same & ~jnp.eye(batch, dtype=bool) & valid
    neg = ~same & valid
    return pos, neg


def pair_validity(mask: jax.Array, refs: Refs | None = None) -> jax.Array:
    """``(B, B)`` or ``(B, M)`` bool: both ends of the pair take part."""
    other = mask if refs is None else refs.mask
    return mask[:, None] & other[None, :]


def sort_rows(values: jax.Array) -> jax.Array:
    """Each row of a float32 ``(B, M)`` array sorted ascending, for counting only (no gradient).

    Sorted as int32 keys: a float's bits, with the non-sign bits flipped for negative numbers, order
    like the floats (±inf included; -0 just below +0). XLA's CPU sort of a single integer operand is
    several times faster than its float sort, whose comparator orders NaNs too. The values come back
    bit for bit.
    """
    bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(values).astype(jnp.float32), jnp.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    keys = jax.lax.sort(keys, dimension=1, is_stable=False)
    return jax.lax.bitcast_convert_type(keys ^ ((keys >> 31) & 0x7FFFFFFF), jnp.float32)


def searchsorted_rows(sorted_rows: jax.Array, queries: jax.Array, side: str) -> jax.Array:
    """``searchsorted`` of each row of ``queries`` in the same row of ``sorted_rows``."""
    return jax.vmap(lambda row, q: jnp.searchsorted(row, q, side=side, method="scan"))(sorted_rows, queries)


def prefix_lengths(sorted_rows: jax.Array, queries: jax.Array, holds) -> jax.Array:
    """For every ``queries[a, j]``: the number of leading entries ``v`` of ``sorted_rows[a]`` with
    ``holds(v, queries[a, j])`` (int32, ``(B, Q)``).

    ``holds`` must be monotone along a row (true on a prefix, false after it), e.g. any comparison
    of the rounded ``v - q`` with a bound. A binary search that evaluates ``holds`` itself (so it
    rounds exactly as a dense evaluation would): ``⌈log₂(M + 1)⌉`` vectorised steps, each a flat
    gather and a compare.
    """
    rows, length = sorted_rows.shape
    flat = jnp.reshape(sorted_rows, (-1,))
    base = (jnp.arange(rows, dtype=jnp.int32) * length)[:, None]
    found = jnp.zeros(queries.shape, jnp.int32)
    step = 1 << max(int(length).bit_length() - 1, 0) if length else 0
    while step:  # found + step ≤ length and the entry found + step - 1 holds: advance
        candidate = found + step
        value = flat[base + jnp.minimum(candidate, length) - 1]
        found = jnp.where((candidate <= length) & holds(value, queries), candidate, found)
        step >>= 1
    return found


class WindowedTriplets(NamedTuple):
    r"""Mined triplets in structured form: ``pos[a, p] & neg[a, n] & (lo < μ_apn ≤ hi)``.

    ``μ_apn = dist[a, n] - dist[a, p]`` in float32 (``d_an - d_ap`` for a distance, ``s_ap - s_an``
    for a similarity, with ``dist = -s``), as ``triplet_margin_miner`` computes it. Every triplet
    set that miner produces has this form (``"all"``: ``μ ≤ margin``; ``"hard"``:
    ``μ ≤ min(margin, 0)``; ``"semihard"``: ``0 < μ ≤ margin``; ``"easy"``: ``μ > margin``), and
    it holds ``O(B·M)`` numbers instead of the ``B·M²`` booleans of the dense mask: the losses count
    the triplets per pair by sorting rows and binary searches (``O(B·M log M)``), never building a
    ``(B, M, M)`` array. ``dense()`` gives that array when it is wanted.

    A pytree (``None`` bounds are empty subtrees, so a miner's output goes through ``jit`` /
    ``vmap``; the bounds become arrays there, with a leading axis out of a ``vmap``: take one
    element's fields before ``dense()``). Every loss taking ``triplet_mask`` accepts this or a
    dense boolean array. It is a tuple, not an array: ``np.asarray`` / ``jnp.any`` of it do not
    give the mask, ``dense()`` does.
    """

    dist: jax.Array  # (B, M) float32: the miner's distances (larger = farther), no gradient
    pos: jax.Array  # (B, M) bool: the positive pairs (a, p)
    neg: jax.Array  # (B, M) bool: the negative pairs (a, n)
    lo: jax.Array | None  # float32 scalar, the open lower bound of μ; None: unbounded
    hi: jax.Array | None  # float32 scalar, the closed upper bound of μ; None: unbounded

    def dense(self) -> jax.Array:
        """The ``(B, M, M)`` bool mask ``[a, p, n]`` of these triplets (what ``triplet_margin_miner``
        returned before it returned this form: the same bits)."""
        dist = jnp.asarray(self.dist)
        mu = dist[:, None, :] - dist[:, :, None]  # [a, p, n] = dist_an - dist_ap
        selected = jnp.asarray(self.pos, bool)[:, :, None] & jnp.asarray(self.neg, bool)[:, None, :]
        if self.lo is not None:
            selected = selected & (mu > self.lo)
        if self.hi is not None:
            selected = selected & (mu <= self.hi)
        return selected

    def counts(self, below=None) -> tuple[jax.Array, jax.Array]:
        """``(c_ap, c_an)`` int32 ``(B, M)``: for each positive pair ``(a, p)`` the number of its
        triplets ``(a, p, n)`` (0 elsewhere), and for each negative pair ``(a, n)`` the number of its
        triplets ``(a, p, n)``. ``below`` (optional): count only the triplets with ``μ < below`` too.

        Exactly the sums of ``dense()`` (``& (μ < below)``) over ``n`` / over ``p``: each anchor's
        negative (positive) distances are sorted once, and the window, a prefix of the sorted row
        for each bound, is found by binary search on the rounded ``μ`` itself. ``O(B·M log M)``.
        """
        dist = jax.lax.stop_gradient(jnp.asarray(self.dist, jnp.float32))
        pos, neg = jnp.asarray(self.pos, bool), jnp.asarray(self.neg, bool)
        lo, hi = self.lo, self.hi
        num_pos = jnp.sum(pos, axis=1, keepdims=True, dtype=jnp.int32)
        num_neg = jnp.sum(neg, axis=1, keepdims=True, dtype=jnp.int32)
        if lo is None and hi is None and below is None:
            return pos.astype(jnp.int32) * num_neg, neg.astype(jnp.int32) * num_pos

        def top(mu):  # μ ≤ hi and μ < below
            ok = jnp.ones(mu.shape, bool)
            if hi is not None:
                ok = ok & (mu <= hi)
            if below is not None:
                ok = ok & (mu < below)
            return ok

        # Per (a, p), over the negatives sorted by dist_an: μ = dist_an - dist_ap rises along the row
        # (rounding is monotone), so {μ ≤ hi, μ < below} and {μ ≤ lo} are prefixes. The +inf
        # padding (non-negatives) sits after the negatives; min(·, num_neg) keeps it out.
        neg_sorted = sort_rows(jnp.where(neg, dist, jnp.inf))
        c_ap = jnp.broadcast_to(num_neg, dist.shape)
        if hi is not None or below is not None:
            c_ap = jnp.minimum(prefix_lengths(neg_sorted, dist, lambda v, q: top(v - q)), num_neg)
        if lo is not None:
            c_ap = c_ap - jnp.minimum(prefix_lengths(neg_sorted, dist, lambda v, q: v - q <= lo), c_ap)
        # Per (a, n), over the positives sorted by dist_ap: μ = dist_an - dist_ap falls along the row,
        # so {μ > lo} and {not top} are prefixes (the +inf padding gives μ = -inf: in neither).
        pos_sorted = sort_rows(jnp.where(pos, dist, jnp.inf))
        c_an = jnp.broadcast_to(num_pos, dist.shape)
        if lo is not None:
            c_an = jnp.minimum(prefix_lengths(pos_sorted, dist, lambda v, q: q - v > lo), num_pos)
        if hi is not None or below is not None:
            c_an = c_an - jnp.minimum(prefix_lengths(pos_sorted, dist, lambda v, q: ~top(q - v)), c_an)
        return jnp.where(pos, c_ap, 0).astype(jnp.int32), jnp.where(neg, c_an, 0).astype(jnp.int32)


class Mined(NamedTuple):
    """Which tuples a loss sees: either explicit triplets or positive / negative pair masks."""

    pos: jax.Array | None  # (B, B) bool, (B, M) with references
    neg: jax.Array | None  # (B, B) bool, (B, M) with references
    # (B, B, B) bool ((B, M, M) with references) or WindowedTriplets
    triplets: jax.Array | WindowedTriplets | None


def resolve_mined(
    labels, mask, pos_mask, neg_mask, triplet_mask, owner: str, refs: Refs | None = None
) -> Mined:
    """The tuples of a loss call, restricted to unmasked rows.

    No mined argument: all label pairs (PML's default). ``pos_mask`` and ``neg_mask`` (both): those
    pairs. ``triplet_mask``: those triplets, a dense boolean mask or ``WindowedTriplets`` (whose
    pairs are restricted, which restricts its triplets alike). Mixing the two kinds is an error.
    With references, the anchors index the batch and the positives / negatives the references:
    pairs ``(B, M)``, triplets ``(B, M, M)``.
    """
    batch = labels.shape[0]
    other = batch if refs is None else refs.labels.shape[0]
    other_mask = mask if refs is None else refs.mask
    valid = mask[:, None] & other_mask[None, :]
    if triplet_mask is not None:
        if pos_mask is not None or neg_mask is not None:
            raise ValueError(
                f"{owner}: pass either triplet_mask or pos_mask/neg_mask (one miner's output), not both."
            )
        if isinstance(triplet_mask, WindowedTriplets):
            t = triplet_mask
            if jnp.shape(t.dist) != (batch, other):
                raise ValueError(
                    f"triplet_mask (WindowedTriplets) must have dist / pos / neg of shape "
                    f"{(batch, other)}, got {jnp.shape(t.dist)}."
                )
            for name, bound in (("lo", t.lo), ("hi", t.hi)):
                if bound is not None and jnp.shape(bound) != ():
                    raise ValueError(
                        f"triplet_mask (WindowedTriplets) {name} must be a scalar (call dense() per "
                        f"batch after a vmap), got shape {jnp.shape(bound)}."
                    )
            pos = _check_mined(t.pos, "triplet_mask.pos", (batch, other)) & valid
            neg = _check_mined(t.neg, "triplet_mask.neg", (batch, other)) & valid
            dist = jax.lax.stop_gradient(jnp.asarray(t.dist, jnp.float32))
            return Mined(None, None, WindowedTriplets(dist, pos, neg, t.lo, t.hi))
        t = _check_mined(triplet_mask, "triplet_mask", (batch, other, other))
        t = t & mask[:, None, None] & other_mask[None, :, None] & other_mask[None, None, :]
        return Mined(None, None, t)
    if (pos_mask is None) != (neg_mask is None):
        raise ValueError(
            f"{owner}: pos_mask and neg_mask come together (PML's (a1, p, a2, n) tuple); "
            "pass both or neither."
        )
    if pos_mask is None:
        pos, neg = _label_pairs(labels, mask, refs)
        return Mined(pos, neg, None)
    pos = _check_mined(pos_mask, "pos_mask", (batch, other)) & valid
    neg = _check_mined(neg_mask, "neg_mask", (batch, other)) & valid
    return Mined(pos, neg, None)


class PairWeights(NamedTuple):
    """PML's ``convert_to_pairs`` lists as counts: how often each ``(a, p)`` / ``(a, n)`` is listed."""

    pos: jax.Array  # (B, B) float32, (B, M) with references
    neg: jax.Array  # (B, B) float32, (B, M) with references

    @property
    def num_pos(self) -> jax.Array:
        return jnp.sum(self.pos)

    @property
    def num_neg(self) -> jax.Array:
        return jnp.sum(self.neg)

    def generic_pair_loss_skips(self) -> jax.Array:
        """PML's ``GenericPairLoss.compute_loss`` returns 0 when every index list has ≤ 1 entry."""
        return (self.num_pos <= 1.0) & (self.num_neg <= 1.0)


def triplet_pair_counts(triplets: jax.Array | WindowedTriplets) -> tuple[jax.Array, jax.Array]:
    """How many triplets hold each ``(a, p)`` and each ``(a, n)``: float32 ``(B, M)`` each.

    Counted in int32 (exact), then float32 (exact up to 2^24 triplets per pair: M ≤ 16M).
    """
    if isinstance(triplets, WindowedTriplets):
        c_ap, c_an = triplets.counts()
    else:
        c_ap = jnp.sum(triplets, axis=2, dtype=jnp.int32)
        c_an = jnp.sum(triplets, axis=1, dtype=jnp.int32)
    return c_ap.astype(jnp.float32), c_an.astype(jnp.float32)


def pair_weights(mined: Mined) -> PairWeights:
    if mined.triplets is not None:
        return PairWeights(*triplet_pair_counts(mined.triplets))
    return PairWeights(mined.pos.astype(jnp.float32), mined.neg.astype(jnp.float32))


def avg_non_zero(losses: jax.Array, weights: jax.Array) -> jax.Array:
    """PML ``AvgNonZeroReducer``: the mean of the listed terms that are ``> 0``; 0 if there is none.

    ``weights`` are how many times each term is listed (0: not listed).
    """
    counted = (weights > 0) & (losses > 0)
    total = jnp.sum(jnp.where(counted, losses * weights, 0.0))
    count = jnp.sum(jnp.where(counted, weights, 0.0))
    return total / jnp.maximum(count, 1.0)


def weighted_mean(losses: jax.Array, weights: jax.Array) -> jax.Array:
    """PML ``MeanReducer`` over a list in which each term appears ``weights`` times; 0 if empty."""
    listed = weights > 0
    total = jnp.sum(jnp.where(listed, losses * weights, 0.0))
    return total / jnp.maximum(jnp.sum(jnp.where(listed, weights, 0.0)), 1.0)


def masked_logsumexp(logits: jax.Array, keep: jax.Array, axis: int, weights: jax.Array | None = None):
    """``(log Σ_keep w·exp(logits), any(keep))`` along ``axis``; 0 (not -inf) where nothing is kept.

    PML's ``lmu.logsumexp(x, keep_mask, add_one=False)``. Max-shifted, so stable for any
    magnitude; masked entries get exactly zero gradient and may hold anything.
    """
    z = jnp.where(keep, logits, -jnp.inf)
    shift = jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True, initial=-jnp.inf))
    shift = jnp.where(jnp.isneginf(shift), 0.0, shift)
    terms = jnp.exp(z - shift)
    if weights is not None:
        terms = terms * jnp.where(keep, weights, 0.0)
    total = jnp.sum(terms, axis=axis)
    nonempty = jnp.any(keep, axis=axis)
    lse = jnp.log(jnp.where(nonempty, total, 1.0)) + jnp.squeeze(shift, axis=axis)
    return jnp.where(nonempty, lse, 0.0), nonempty


def row_offsets(dist: jax.Array, rows: jax.Array) -> jax.Array:
    """A per-row constant (no gradient) near the row's values: subtracted before long sums so
    that ``Σ c·(t - μ) - Σ (v - μ)`` does not cancel catastrophically. ``(B, 1)``."""
    count = jnp.sum(rows, axis=1, keepdims=True)
    total = jnp.sum(jnp.where(rows, dist, 0.0), axis=1, keepdims=True)
    offset = jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)
    return jax.lax.stop_gradient(offset)


def ref_rows(refs: Refs | None) -> jax.Array | None:
    """The reference rows for ``distance_matrix`` (None without references)."""
    return None if refs is None else refs.x
