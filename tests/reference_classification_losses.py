"""Slow, obviously-right NumPy float64 references for the classification-style losses.

``normalized_softmax_loss``, ``cosface_loss``, ``arcface_loss`` and ``soft_triple_loss`` follow
pytorch-metric-learning 2.x; every function here loops over samples, classes (and centers) one at
a time and follows the formulas of PML's code literally (ArcFace through ``acos`` and
``cos(θ + m)``, SoftTriple through an explicit per-class softmax over the centers). Nothing is a
vectorised copy of the library code.

Masks are implemented by deletion: a masked row is removed before anything is computed; a masked
class (``proxy_mask``) is removed from every softmax (the remaining labels must not name it), and
for SoftTriple a masked center is removed from its class's softmax over centers.
"""

from __future__ import annotations

import math

import numpy as np

NORM_EPS = 1e-12  # as torch.nn.functional.normalize: x / max(||x||, eps)


def _unit(v) -> list[float]:
    values = [float(t) for t in v]
    norm = math.sqrt(sum(t * t for t in values))
    return [t / max(norm, NORM_EPS) for t in values]


def _dot(a, b) -> float:
    return sum(s * t for s, t in zip(a, b, strict=True))


def _rows(x, labels, mask) -> list[tuple[list[float], int]]:
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    return [(_unit(x[i]), int(labels[i])) for i in range(len(labels)) if mask is None or bool(mask[i])]


def _cross_entropy(logits: dict[int, float], target: int) -> float:
    """-log softmax(logits)[target] over the classes present in ``logits``."""
    assert target in logits, "a label names a masked class"
    return math.log(sum(math.exp(z) for z in logits.values())) - logits[target]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _margin_softmax_ref(x, labels, weights, target_logit, other_logit, mask, proxy_mask) -> float:
    """Mean over rows of the cross-entropy with a special logit for each row's own class."""
    weights = np.asarray(weights, dtype=np.float64)
    classes = [c for c in range(len(weights)) if proxy_mask is None or bool(proxy_mask[c])]
    w_hat = {c: _unit(weights[c]) for c in classes}
    per_row = []
    for x_hat, y in _rows(x, labels, mask):
        logits = {}
        for c in classes:
            cosine = _dot(x_hat, w_hat[c])
            logits[c] = target_logit(cosine) if c == y else other_logit(cosine)
        per_row.append(_cross_entropy(logits, y))
    return _mean(per_row)


def normalized_softmax_ref(x, labels, weights, *, temperature=0.05, mask=None, proxy_mask=None) -> float:
    """PML NormalizedSoftmaxLoss: cross-entropy of cos(x, w_c) / T."""

    def logit(cosine: float) -> float:
        return cosine / temperature

    return _margin_softmax_ref(x, labels, weights, logit, logit, mask, proxy_mask)


def cosface_ref(x, labels, weights, *, margin=0.35, scale=64.0, mask=None, proxy_mask=None) -> float:
    """PML CosFaceLoss: s·(cos - m) for the own class, s·cos for the others."""
    return _margin_softmax_ref(
        x,
        labels,
        weights,
        lambda cosine: scale * (cosine - margin),
        lambda cosine: scale * cosine,
        mask,
        proxy_mask,
    )


def arcface_ref(x, labels, weights, *, margin=28.6, scale=64.0, mask=None, proxy_mask=None) -> float:
    """PML ArcFaceLoss: θ = acos(clamp(cos)); s·cos(θ + m) if θ ≤ π - m else s·(cos θ - m sin m)."""
    m = math.radians(margin)  # PML's margin is in degrees

    def target(cosine: float) -> float:
        angle = math.acos(min(1.0, max(-1.0, cosine)))
        if angle <= math.pi - m:
            return scale * math.cos(angle + m)
        return scale * (math.cos(angle) - m * math.sin(m))

    return _margin_softmax_ref(x, labels, weights, target, lambda cosine: scale * cosine, mask, proxy_mask)


def soft_triple_ref(
    x,
    labels,
    weights,
    *,
    centers_per_class=10,
    la=20.0,
    gamma=0.1,
    margin=0.01,
    mask=None,
    proxy_mask=None,
) -> float:
    """PML SoftTripleLoss with weights = fc.T: class c's centers are rows c·K ... c·K + K - 1.

    S_c = Σ_k softmax_k(cos_ck / γ) cos_ck (over the class's unmasked centers), then the
    cross-entropy of la·(S_c - margin·[c = y]). ``proxy_mask`` is per center (C·K,); a class
    without any unmasked center is removed.
    """
    weights = np.asarray(weights, dtype=np.float64)
    num_centers = len(weights)
    assert num_centers % centers_per_class == 0
    num_classes = num_centers // centers_per_class
    centers = {
        c: [
            _unit(weights[c * centers_per_class + k])
            for k in range(centers_per_class)
            if proxy_mask is None or bool(proxy_mask[c * centers_per_class + k])
        ]
        for c in range(num_classes)
    }
    centers = {c: rows for c, rows in centers.items() if rows}
    per_row = []
    for x_hat, y in _rows(x, labels, mask):
        logits = {}
        for c, rows in centers.items():
            cosines = [_dot(x_hat, center) for center in rows]
            exps = [math.exp(cosine / gamma) for cosine in cosines]
            relaxed = sum(e * cosine for e, cosine in zip(exps, cosines, strict=True)) / sum(exps)
            logits[c] = la * (relaxed - (margin if c == y else 0.0))
        per_row.append(_cross_entropy(logits, y))
    return _mean(per_row)
