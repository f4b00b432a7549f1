"""Slow, obviously-right NumPy float64 references for the PML-style pair / triplet losses and miners.

Written from the formulas of pytorch-metric-learning 2.x (PML), one pair / triplet / anchor at a
time, in PML's own terms: tuples are *index lists* as PML's miners return them (``(a, p, n)``
triplets or ``(a1, p, a2, n)`` pairs, possibly with repeats), converted as PML's
``convert_to_pairs`` / ``convert_to_triplets`` do, and every loss reduces its list of terms with
PML's reducer. Nothing here is a vectorised copy of the library code, which works on masks.

A ``mask`` removes rows: a tuple that touches a masked row is dropped, and the per-row reductions
run over the unmasked rows only.

References (PML's ``ref_emb`` / ``ref_labels``): with ``ref`` / ``ref_labels`` (and ``ref_mask``)
the anchors are rows of ``x`` and the positives / negatives rows of ``ref``; index lists hold an
anchor index first and reference indices after it, and no pair is dropped as a self comparison.
"""

from __future__ import annotations

import math

import numpy as np

NORM_EPS = 1e-12
TINY_F32 = float(np.finfo(np.float32).tiny)  # PML's c_f.small_val(float32)


# --------------------------------------------------------------------------------------------
# Distances, one pair at a time
# --------------------------------------------------------------------------------------------


class Metric:
    """PML's LpDistance / CosineSimilarity / DotProductSimilarity between rows of ``x`` (and of
    ``ref`` when given: ``d(i, j)`` is then between ``x[i]`` and ``ref[j]``)."""

    def __init__(self, x, distance: str = "euclidean", normalize: bool = True, ref=None):
        def prepared(rows):
            rows = np.asarray(rows, dtype=np.float64)
            if distance == "cosine" or normalize:
                rows = np.array([row / max(math.sqrt(float(np.dot(row, row))), NORM_EPS) for row in rows])
            return rows

        self.x = prepared(x)
        self.ref = self.x if ref is None else prepared(ref)
        self.distance = distance
        self.inverted = distance != "euclidean"
        self._cache: dict[tuple[int, int], float] = {}

    def __call__(self, i: int, j: int) -> float:
        key = (i, j)
        if key not in self._cache:
            a, b = self.x[i], self.ref[j]
            if self.distance == "euclidean":
                self._cache[key] = math.sqrt(float(np.sum((a - b) ** 2)))
            else:
                self._cache[key] = float(np.dot(a, b))
        return self._cache[key]

    def margin(self, x: float, y: float) -> float:
        """PML's distance.margin(x, y)."""
        return y - x if self.inverted else x - y


def relu(v: float) -> float:
    return v if v > 0.0 else 0.0


def softplus(v: float) -> float:
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def logsumexp(values: list[float]) -> float:
    """PML's lmu.logsumexp without the appended zero: 0 for an empty list."""
    if not values:
        return 0.0
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def avg_non_zero(terms: list[float]) -> float:
    kept = [t for t in terms if t > 0.0]
    return sum(kept) / len(kept) if kept else 0.0


def mean(terms: list[float]) -> float:
    return sum(terms) / len(terms) if terms else 0.0


# --------------------------------------------------------------------------------------------
# Index lists (PML's loss_and_miner_utils)
# --------------------------------------------------------------------------------------------


def _rows(labels, mask) -> list[int]:
    return [i for i in range(len(labels)) if mask is None or bool(mask[i])]


def _other(labels, mask, ref_labels, ref_mask):
    """(labels, mask) of the rows that the pairs end in: the references, or the batch itself."""
    return (labels, mask) if ref_labels is None else (ref_labels, ref_mask)


def all_pairs(
    labels, mask=None, ref_labels=None, ref_mask=None
) -> tuple[list[int], list[int], list[int], list[int]]:
    """get_all_pairs_indices: positive pairs (same label, not self) and negative pairs; with
    references every (anchor, reference) pair, self comparisons included."""
    other_labels, other_mask = _other(labels, mask, ref_labels, ref_mask)
    a1, p, a2, n = [], [], [], []
    for i in _rows(labels, mask):
        for j in _rows(other_labels, other_mask):
            if labels[i] == other_labels[j] and (ref_labels is not None or i != j):
                a1.append(i)
                p.append(j)
            elif labels[i] != other_labels[j]:
                a2.append(i)
                n.append(j)
    return a1, p, a2, n


def all_triplets(labels, mask=None, ref_labels=None, ref_mask=None) -> tuple[list[int], list[int], list[int]]:
    other_labels, other_mask = _other(labels, mask, ref_labels, ref_mask)
    others = _rows(other_labels, other_mask)
    a, p, n = [], [], []
    for i in _rows(labels, mask):
        for j in others:
            if (ref_labels is None and j == i) or other_labels[j] != labels[i]:
                continue
            for k in others:
                if other_labels[k] != labels[i]:
                    a.append(i)
                    p.append(j)
                    n.append(k)
    return a, p, n


def _keep(mask, *idx) -> bool:
    return mask is None or all(bool(mask[i]) for i in idx)


def _keep_tuple(mask, other_mask, anchor, *others) -> bool:
    return _keep(mask, anchor) and _keep(other_mask, *others)


def to_pairs(indices, labels, mask=None, ref_labels=None, ref_mask=None):
    """convert_to_pairs: None → all pairs; (a, p, n) → (a, p, a, n); pairs unchanged."""
    if indices is None:
        return all_pairs(labels, mask, ref_labels, ref_mask)
    other_mask = _other(labels, mask, ref_labels, ref_mask)[1]
    if len(indices) == 3:
        a, p, n = (list(v) for v in indices)
        keep = [k for k in range(len(a)) if _keep_tuple(mask, other_mask, a[k], p[k], n[k])]
        return [a[k] for k in keep], [p[k] for k in keep], [a[k] for k in keep], [n[k] for k in keep]
    a1, p, a2, n = (list(v) for v in indices)
    pos = [k for k in range(len(a1)) if _keep_tuple(mask, other_mask, a1[k], p[k])]
    neg = [k for k in range(len(a2)) if _keep_tuple(mask, other_mask, a2[k], n[k])]
    return [a1[k] for k in pos], [p[k] for k in pos], [a2[k] for k in neg], [n[k] for k in neg]


def to_triplets(indices, labels, mask=None, ref_labels=None, ref_mask=None):
    """convert_to_triplets: None → all triplets; pairs → every (a, p, n) sharing the anchor."""
    if indices is None:
        return all_triplets(labels, mask, ref_labels, ref_mask)
    if len(indices) == 3:
        other_mask = _other(labels, mask, ref_labels, ref_mask)[1]
        a, p, n = (list(v) for v in indices)
        keep = [k for k in range(len(a)) if _keep_tuple(mask, other_mask, a[k], p[k], n[k])]
        return [a[k] for k in keep], [p[k] for k in keep], [n[k] for k in keep]
    a1, p, a2, n = to_pairs(indices, labels, mask, ref_labels, ref_mask)
    ta, tp, tn = [], [], []
    for i in range(len(a1)):
        for j in range(len(a2)):
            if a1[i] == a2[j]:
                ta.append(a1[i])
                tp.append(p[i])
                tn.append(n[j])
    return ta, tp, tn


def _generic_pair_loss_skips(pairs) -> bool:
    """GenericPairLoss.compute_loss: 0 when every index list has at most one entry."""
    return all(len(v) <= 1 for v in pairs)


def _pos_neg_sets(pairs) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
    """The mat-based losses' masks: pos_mask[a1, p] = 1 (repeats collapse)."""
    a1, p, a2, n = pairs
    pos: dict[int, set[int]] = {}
    neg: dict[int, set[int]] = {}
    for i, j in zip(a1, p, strict=True):
        pos.setdefault(i, set()).add(j)
    for i, j in zip(a2, n, strict=True):
        neg.setdefault(i, set()).add(j)
    return pos, neg


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def contrastive_ref(
    x,
    labels,
    *,
    pos_margin=0.0,
    neg_margin=1.0,
    distance="euclidean",
    normalize=True,
    mask=None,
    indices=None,
    ref=None,
    ref_labels=None,
    ref_mask=None,
) -> float:
    d = Metric(x, distance, normalize, ref)
    pairs = to_pairs(indices, labels, mask, ref_labels, ref_mask)
    if _generic_pair_loss_skips(pairs):
        return 0.0
    a1, p, a2, n = pairs
    pos_terms = [relu(d.margin(d(i, j), pos_margin)) for i, j in zip(a1, p, strict=True)]
    neg_terms = [relu(d.margin(neg_margin, d(i, j))) for i, j in zip(a2, n, strict=True)]
    return avg_non_zero(pos_terms) + avg_non_zero(neg_terms)


def triplet_margin_ref(
    x,
    labels,
    *,
    margin=0.05,
    swap=False,
    smooth_loss=False,
    distance="euclidean",
    normalize=True,
    mask=None,
    indices=None,
    ref=None,
    ref_labels=None,
    ref_mask=None,
) -> float:
    d = Metric(x, distance, normalize, ref)
    terms = []
    for a, p, n in zip(*to_triplets(indices, labels, mask, ref_labels, ref_mask), strict=True):
        ap, an = d(a, p), d(a, n)
        if swap:
            assert ref is None, "swap needs d(p, n) between two batch rows"
            pn = d(p, n)
            an = max(an, pn) if d.inverted else min(an, pn)
        violation = d.margin(ap, an) + margin
        terms.append(softplus(violation) if smooth_loss else relu(violation))
    return avg_non_zero(terms)


def margin_ref(
    x,
    labels,
    beta=1.2,
    *,
    margin=0.2,
    nu=0.0,
    learn_beta=False,
    distance="euclidean",
    normalize=True,
    mask=None,
    indices=None,
    ref=None,
    ref_labels=None,
    ref_mask=None,
) -> float:
    d = Metric(x, distance, normalize, ref)
    beta = np.atleast_1d(np.asarray(beta, dtype=np.float64))
    per_class = len(beta) > 1
    triplets = list(zip(*to_triplets(indices, labels, mask, ref_labels, ref_mask), strict=True))
    if not triplets:
        return 0.0
    total, divisor, reg = 0.0, 0, 0.0
    for a, p, n in triplets:
        b = float(beta[labels[a]]) if per_class else float(beta[0])
        pos = relu(d.margin(d(a, p), b) + margin)
        neg = relu(d.margin(b, d(a, n)) + margin)
        total += pos + neg
        divisor += (pos > 0) + (neg > 0)
        reg += b * nu
    loss = total / divisor if divisor else 0.0
    if learn_beta:
        if per_class:
            loss += reg / divisor if divisor else 0.0
        else:
            loss += float(beta[0]) * nu
    return loss


def multi_similarity_ref(
    x,
    labels,
    *,
    alpha=2.0,
    beta=50.0,
    base=0.5,
    distance="cosine",
    normalize=True,
    mask=None,
    indices=None,
    ref=None,
    ref_labels=None,
    ref_mask=None,
) -> float:
    d = Metric(x, distance, normalize, ref)
    pairs = to_pairs(indices, labels, mask, ref_labels, ref_mask)
    if _generic_pair_loss_skips(pairs):
        return 0.0
    pos, neg = _pos_neg_sets(pairs)
    per_row = []
    for a in _rows(labels, mask):
        pos_sum = sum(math.exp(alpha * d.margin(d(a, p), base)) for p in pos.get(a, ()))
        neg_sum = sum(math.exp(beta * d.margin(base, d(a, n))) for n in neg.get(a, ()))
        per_row.append(math.log(1.0 + pos_sum) / alpha + math.log(1.0 + neg_sum) / beta)
    return mean(per_row)


def ntxent_ref(
    x,
    labels,
    *,
    temperature=0.07,
    distance="cosine",
    normalize=True,
    mask=None,
    indices=None,
    ref=None,
    ref_labels=None,
    ref_mask=None,
) -> float:
    d = Metric(x, distance, normalize, ref)
    pairs = to_pairs(indices, labels, mask, ref_labels, ref_mask)
    if _generic_pair_loss_skips(pairs):
        return 0.0
    a1, p, a2, n = pairs
    if not a1 or not a2:
        return 0.0

    def logit(i: int, j: int) -> float:
        return (d(i, j) if d.inverted else -d(i, j)) / temperature

    terms = []
    for i, j in zip(a1, p, strict=True):
        z = logit(i, j)
        negatives = [logit(a2[k], n[k]) for k in range(len(a2)) if a2[k] == i]
        top = max([z, *negatives])
        numerator = math.exp(z - top)
        denominator = numerator + sum(math.exp(v - top) for v in negatives)
        terms.append(-math.log(numerator / denominator + TINY_F32))
    return mean(terms)


def lifted_structure_ref(
    x,
    labels,
    *,
    neg_margin=1.0,
    pos_margin=0.0,
    distance="euclidean",
    normalize=True,
    mask=None,
    indices=None,
) -> float:
    d = Metric(x, distance, normalize)
    pairs = to_pairs(indices, labels, mask)
    if _generic_pair_loss_skips(pairs):
        return 0.0
    a1, p, a2, n = pairs
    if not a1 or not a2:
        return 0.0
    terms = []
    for i, j in zip(a1, p, strict=True):
        negatives = [d.margin(neg_margin, d(a2[k], n[k])) for k in range(len(a2)) if a2[k] in (i, j)]
        joint = logsumexp(negatives)
        terms.append(relu(joint + d.margin(d(i, j), pos_margin)) ** 2 / 2.0)
    return mean(terms)


def generalized_lifted_structure_ref(
    x,
    labels,
    *,
    neg_margin=1.0,
    pos_margin=0.0,
    distance="euclidean",
    normalize=True,
    mask=None,
    indices=None,
    ref=None,
    ref_labels=None,
    ref_mask=None,
) -> float:
    d = Metric(x, distance, normalize, ref)
    pairs = to_pairs(indices, labels, mask, ref_labels, ref_mask)
    if _generic_pair_loss_skips(pairs):
        return 0.0
    pos, neg = _pos_neg_sets(pairs)
    per_row = []
    for a in _rows(labels, mask):
        pos_lse = logsumexp([d.margin(d(a, p), pos_margin) for p in pos.get(a, ())])
        neg_lse = logsumexp([d.margin(neg_margin, d(a, n)) for n in neg.get(a, ())])
        per_row.append(relu(pos_lse + neg_lse))
    return mean(per_row)


def circle_ref(
    x,
    labels,
    *,
    m=0.4,
    gamma=80.0,
    mask=None,
    indices=None,
    ref=None,
    ref_labels=None,
    ref_mask=None,
    detach_x=None,
) -> float:
    """``detach_x``: the embeddings at which the detached weights relu(O_p - s), relu(s - O_n) are
    evaluated (default ``x``); finite differences with it fixed give PML's detached gradient."""
    d = Metric(x, "cosine", True, ref)
    fixed = Metric(x if detach_x is None else detach_x, "cosine", True, ref)
    pairs = to_pairs(indices, labels, mask, ref_labels, ref_mask)
    if _generic_pair_loss_skips(pairs):
        return 0.0
    pos, neg = _pos_neg_sets(pairs)
    per_row = []
    for a in _rows(labels, mask):
        if not pos.get(a) or not neg.get(a):
            per_row.append(0.0)
            continue
        pos_logits = [-gamma * relu(1.0 + m - fixed(a, p)) * (d(a, p) - (1.0 - m)) for p in pos[a]]
        neg_logits = [gamma * relu(fixed(a, n) + m) * (d(a, n) - m) for n in neg[a]]
        per_row.append(softplus(logsumexp(pos_logits) + logsumexp(neg_logits)))
    return avg_non_zero(per_row)


# --------------------------------------------------------------------------------------------
# Miners (PML index lists)
# --------------------------------------------------------------------------------------------


def batch_hard_miner_ref(
    x,
    labels,
    *,
    distance="euclidean",
    normalize=True,
    mask=None,
    allowed_pos_range=None,
    allowed_neg_range=None,
) -> tuple[list[int], list[int], list[int]]:
    d = Metric(x, distance, normalize)
    rows = _rows(labels, mask)

    def allowed(value, bounds) -> bool:
        return bounds is None or bounds[0] <= value <= bounds[1]

    a_out, p_out, n_out = [], [], []
    for a in rows:
        positives = [
            p for p in rows if p != a and labels[p] == labels[a] and allowed(d(a, p), allowed_pos_range)
        ]
        negatives = [n for n in rows if labels[n] != labels[a] and allowed(d(a, n), allowed_neg_range)]
        if not positives or not negatives:
            continue
        # Hardest: the farthest positive and the closest negative (for a similarity: the least /
        # most similar one).
        if d.inverted:
            p_star = min(positives, key=lambda p: d(a, p))
            n_star = max(negatives, key=lambda n: d(a, n))
        else:
            p_star = max(positives, key=lambda p: d(a, p))
            n_star = min(negatives, key=lambda n: d(a, n))
        a_out.append(a)
        p_out.append(p_star)
        n_out.append(n_star)
    return a_out, p_out, n_out


def triplet_margin_miner_ref(
    x, labels, *, margin=0.2, type_of_triplets="all", distance="euclidean", normalize=True, mask=None
) -> tuple[list[int], list[int], list[int]]:
    d = Metric(x, distance, normalize)
    out: tuple[list[int], list[int], list[int]] = ([], [], [])
    for a, p, n in zip(*all_triplets(labels, mask), strict=True):
        ap, an = d(a, p), d(a, n)
        triplet_margin = ap - an if d.inverted else an - ap
        if type_of_triplets == "easy":
            take = triplet_margin > margin
        else:
            take = triplet_margin <= margin
            if type_of_triplets == "hard":
                take = take and triplet_margin <= 0
            elif type_of_triplets == "semihard":
                take = take and triplet_margin > 0
        if take:
            out[0].append(a)
            out[1].append(p)
            out[2].append(n)
    return out


def multi_similarity_miner_ref(
    x, labels, *, epsilon=0.1, distance="cosine", normalize=True, mask=None
) -> tuple[list[int], list[int], list[int], list[int]]:
    d = Metric(x, distance, normalize)
    rows = _rows(labels, mask)
    a1, p_out, a2, n_out = [], [], [], []
    for a in rows:
        positives = [p for p in rows if p != a and labels[p] == labels[a]]
        negatives = [n for n in rows if labels[n] != labels[a]]
        for p in positives:
            if d.inverted:
                hard = bool(negatives) and d(a, p) - epsilon < max(d(a, n) for n in negatives)
            else:
                hard = bool(negatives) and d(a, p) + epsilon > min(d(a, n) for n in negatives)
            if hard:
                a1.append(a)
                p_out.append(p)
        for n in negatives:
            if d.inverted:
                hard = bool(positives) and d(a, n) + epsilon > min(d(a, p) for p in positives)
            else:
                hard = bool(positives) and d(a, n) - epsilon < max(d(a, p) for p in positives)
            if hard:
                a2.append(a)
                n_out.append(n)
    return a1, p_out, a2, n_out
