"""Scores that rank gallery rows for a query, in the embedding's geometry: the few-query paths
(``search``, the ``retrieval.png`` pictures). The metrics' chunked kernels rank the same way
(``retrieval_metrics(distance=...)``).

* the sphere (``curvature`` 0): cosine similarity ``⟨q, g⟩`` of the unit rows, higher first;
* the Poincaré ball of curvature c > 0: the distance ``d_c(q, g)``
  (``hyperbolic.gram_distance_matrix``), lower first.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def curvature_of(config: Any) -> float:
    """A run's ``model.curvature``: 0 for the sphere (and for configs written before the field
    existed), c > 0 for a head that ends in the Poincaré ball of curvature c."""
    return float(config.model.get("curvature", 0.0) or 0.0)


def score_name(curvature: float = 0.0) -> str:
    """What ``scores`` gives: ``"cosine"`` (a similarity) or ``"distance"`` (Poincaré)."""
    return "distance" if curvature > 0 else "cosine"


def scores(queries: np.ndarray, gallery: np.ndarray, curvature: float = 0.0) -> np.ndarray:
    """``(Q, G)`` float32: cosine similarities of unit rows, or Poincaré distances (c > 0)."""
    q, g = np.asarray(queries, np.float32), np.asarray(gallery, np.float32)
    if curvature <= 0:
        return q @ g.T
    from hdml_jax import hyperbolic

    return np.array(hyperbolic.gram_distance_matrix(q, g, float(curvature)), np.float32)  # writable


def best_first(score: np.ndarray, curvature: float = 0.0) -> np.ndarray:
    """Column indices of each row of ``scores`` from best to worst (ties: the lower index
    first); ``score`` entries of −inf (cosine) or +inf (distance) come last."""
    key = score if curvature > 0 else -score
    return np.argsort(key, axis=1, kind="stable")


def excluded(curvature: float = 0.0) -> float:
    """The score that ranks a row last (a query's own row)."""
    return np.inf if curvature > 0 else -np.inf


def nearest(
    queries: np.ndarray, gallery: np.ndarray, k: int, curvature: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices (Q, k), scores (Q, k))`` of the ``k`` best gallery rows, best first."""
    score = scores(queries, gallery, curvature)
    order = best_first(score, curvature)[:, : min(k, score.shape[1])]
    return order, np.take_along_axis(score, order, axis=1)
