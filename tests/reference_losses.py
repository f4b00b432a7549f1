"""Slow, obviously-right NumPy float64 references for the losses in ``hdml_jax.losses``.

Every function loops over samples / proxies one at a time and follows the formula in the
library's docstring literally; nothing here is a vectorised copy of the library code. A ``mask``
is implemented by deleting the masked rows before anything is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

NORM_EPS = 1e-12  # the same guard as torch.nn.functional.normalize: x / max(||x||, eps)


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _keep_unmasked(x, labels, mask) -> tuple[np.ndarray, np.ndarray]:
    x = _f64(x)
    labels = np.asarray(labels).astype(np.int64)
    if mask is None:
        return x, labels
    keep = [i for i in range(len(labels)) if bool(mask[i])]
    return x[keep], labels[keep]


def _unit(v: np.ndarray) -> np.ndarray:
    norm = math.sqrt(sum(float(t) * float(t) for t in v))
    return v / max(norm, NORM_EPS)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return sum(float(s) * float(t) for s, t in zip(a, b, strict=True))


def proxy_anchor_ref(x, labels, proxies, *, margin: float = 0.1, alpha: float = 32.0, mask=None) -> float:
    """Proxy-Anchor: loop over proxies, then over batch rows; log(1 + Σ exp) summed naively."""
    x, labels = _keep_unmasked(x, labels, mask)
    proxies = _f64(proxies)
    num_classes = proxies.shape[0]
    x_hat = [_unit(row) for row in x]
    pos_terms: list[float] = []
    neg_total = 0.0
    for c in range(num_classes):
        p_hat = _unit(proxies[c])
        pos_sum, neg_sum, has_positive = 0.0, 0.0, False
        for i in range(len(x_hat)):
            s = _dot(x_hat[i], p_hat)
            if labels[i] == c:
                has_positive = True
                pos_sum += math.exp(-alpha * (s - margin))
            else:
                neg_sum += math.exp(alpha * (s + margin))
        if has_positive:
            pos_terms.append(math.log(1.0 + pos_sum))
        neg_total += math.log(1.0 + neg_sum)
    pos_loss = sum(pos_terms) / len(pos_terms) if pos_terms else 0.0
    return pos_loss + neg_total / num_classes


def proxy_nca_ref(
    x, labels, proxies, *, scale: float = 1.0, include_target_in_denominator: bool = True, mask=None
) -> float:
    """Proxy-NCA: per row, per class ||x̂ - p̂||² written out; softmax or classic (2017) form."""
    x, labels = _keep_unmasked(x, labels, mask)
    proxies = _f64(proxies)
    p_hat = [_unit(p) for p in proxies]
    per_row: list[float] = []
    for i in range(len(x)):
        x_hat = _unit(x[i])
        sq_dist = [sum((float(a) - float(b)) ** 2 for a, b in zip(x_hat, p, strict=True)) for p in p_hat]
        target = int(labels[i])
        if include_target_in_denominator:
            denominator = sum(math.exp(-scale * dc) for dc in sq_dist)
            per_row.append(-math.log(math.exp(-scale * sq_dist[target]) / denominator))
        else:
            denominator = sum(math.exp(-scale * dc) for c, dc in enumerate(sq_dist) if c != target)
            per_row.append(scale * sq_dist[target] + math.log(denominator))
    return sum(per_row) / len(per_row) if per_row else 0.0


def batch_hard_triplet_ref(x, labels, *, margin: float = 0.1, squared: bool = False, mask=None) -> float:
    """Batch-hard triplet: per anchor, explicit distances to every other row."""
    x, labels = _keep_unmasked(x, labels, mask)
    n = len(labels)

    def dist(a: int, b: int) -> float:
        sq = sum((float(s) - float(t)) ** 2 for s, t in zip(x[a], x[b], strict=True))
        return sq if squared else math.sqrt(sq)

    per_anchor: list[float] = []
    for a in range(n):
        positives = [dist(a, j) for j in range(n) if j != a and labels[j] == labels[a]]
        negatives = [dist(a, j) for j in range(n) if labels[j] != labels[a]]
        if not positives or not negatives:
            continue  # an anchor lacking a positive or a negative is dropped
        per_anchor.append(max(0.0, max(positives) - min(negatives) + margin))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def softmax_cross_entropy_ref(
    logits, labels, *, temperature: float = 1.0, label_smoothing: float = 0.0, mask=None
) -> float:
    """Cross-entropy of softmax(z/τ) against (1-ε)·one_hot + ε/M, one row at a time."""
    logits, labels = _keep_unmasked(logits, labels, mask)
    per_row: list[float] = []
    for i in range(len(labels)):
        z = [float(v) / temperature for v in logits[i]]
        num_classes = len(z)
        log_normaliser = math.log(sum(math.exp(v) for v in z))
        loss = 0.0
        for c in range(num_classes):
            target = (1.0 - label_smoothing) * (1.0 if c == labels[i] else 0.0) + label_smoothing / num_classes
            loss -= target * (z[c] - log_normaliser)
        per_row.append(loss)
    return sum(per_row) / len(per_row) if per_row else 0.0


def compose_level_labels(labels, assignments: Sequence) -> list[np.ndarray]:
    """[y^0, y^1, ...] with y^l_i = a^{l-1}[y^{l-1}_i], one sample at a time."""
    result = [np.asarray(labels).astype(np.int64)]
    for assignment in assignments:
        assignment = np.asarray(assignment)
        result.append(np.array([int(assignment[int(c)]) for c in result[-1]], dtype=np.int64))
    return result


def hierarchical_ref(
    x,
    labels,
    level_proxies: Sequence,
    level_assignments: Sequence,
    *,
    base_ref: Callable[..., float] = proxy_anchor_ref,
    level_weights: Sequence[float] = (1.0, 0.1),
    mask=None,
    **base_kwargs,
) -> float:
    """Σ_l w_l · base_ref(X, y^l, P^l)."""
    total = 0.0
    level_y = compose_level_labels(labels, level_assignments)
    for weight, proxies, y in zip(level_weights, level_proxies, level_y, strict=True):
        total += weight * base_ref(x, y, proxies, mask=mask, **base_kwargs)
    return total
