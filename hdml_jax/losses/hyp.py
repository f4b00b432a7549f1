"""Hyp's loss (Ermolov et al., CVPR 2022; htdt/hyp_metric ``train.py:50-73``, 155-161), also HIER's
``SupCon`` (HIER-CVPR23 ``hier/losses.py:296-331``): a cross-entropy over the distances between the
views of a class in a batch of ``P`` classes × ``K`` images (class-major rows)::

    for every ordered pair of slots (a, b), a ≠ b, with x = z[:, a], x' = z[:, b]  (P × d each):
        logits = [s(x_p, x'_q) / τ]_q  ++  [s(x_p, x_q) / τ]_{q ≠ p}       (2P − 1 columns per row)
        ℓ_ab   = mean_p CE(logits_p, target q = p)

with ``s = −d_c`` (the Poincaré distance, ``hdml_jax.hyperbolic``) for ``c > 0`` or ``s = ⟨·,·⟩``
for ``c = 0`` (the sphere: unit vectors). Hyp sums ``ℓ_ab`` over the ``K(K − 1)`` pairs
(``reduction="sum"``); HIER's ``SupCon`` divides that sum by ``K²`` (``"hier"``: its ``step``
counts the diagonal pairs too). The official ``−1e9`` on the diagonal of the second block is an
exact exclusion here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hdml_jax import hyperbolic
from hdml_jax.losses._common import check_hyperparameter

REDUCTIONS = ("sum", "hier")


def _similarity(x: jax.Array, y: jax.Array, c: float) -> jax.Array:
    return -hyperbolic.gram_distance_matrix(x, y, c) if c > 0 else x @ y.T


def hyp_loss(
    embeddings: jax.Array,
    samples_per_class: int,
    *,
    tau: float = 0.2,
    c: float = 0.1,
    reduction: str = "sum",
) -> jax.Array:
    """The loss of the module docstring for class-major ``embeddings (P·K, d)``, ``K =
    samples_per_class``: points of the ball (``c > 0``) or unit vectors (``c = 0``). Hyp's
    defaults: τ = 0.2 (``--t``; its sphere version 0.1), c = 0.1."""
    check_hyperparameter(tau, "tau", low=0.0, low_inclusive=False, meaning="the temperature")
    check_hyperparameter(c, "c", low=0.0, low_inclusive=True, meaning="the ball's curvature; 0: the sphere")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    k = int(samples_per_class)
    n, d = embeddings.shape
    if k < 2 or n % k:
        raise ValueError(f"{n} rows do not split into classes of samples_per_class={k} (≥ 2) images.")
    z = embeddings.astype(jnp.float32).reshape(n // k, k, d)
    p = n // k
    eye = jnp.eye(p, dtype=bool)
    total = jnp.zeros((), jnp.float32)
    for a in range(k):
        x = z[:, a]
        same_view = jnp.where(eye, -jnp.inf, _similarity(x, x, c) / tau)
        for b in range(k):
            if a == b:
                continue
            logits = jnp.concatenate([_similarity(x, z[:, b], c) / tau, same_view], axis=1)
            total = total + jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits[:, :p]))
    return total / (k * k) if reduction == "hier" else total


def hyp_pair_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
    *,
    samples_per_class: int,
    tau: float = 0.2,
    c: float = 0.1,
    reduction: str = "sum",
) -> jax.Array:
    """``hyp_loss`` in the trainer's pair-loss form ``loss(embeddings, labels, mask=, ...)``
    (``method=hyp``): the batch must be class-major ``P × K`` (the ``pk`` sampler's), which the
    labels are checked against where they are concrete; a ``mask`` must keep every row (the loss
    pairs a class's views by position, so a padding row cannot be left out)."""
    del mask  # P×K training batches are never padded (the sampler fills every slot)
    k = int(samples_per_class)
    if not isinstance(labels, jax.core.Tracer):
        grouped = jnp.asarray(labels).reshape(-1, k)
        if not bool(jnp.all(grouped == grouped[:, :1])):
            raise ValueError(f"hyp_loss needs class-major batches of {k} images per class (the pk sampler's).")
    return hyp_loss(embeddings, k, tau=tau, c=c, reduction=reduction)
