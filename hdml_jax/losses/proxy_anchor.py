"""Proxy-Anchor loss (Kim et al., CVPR 2020)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hdml_jax.losses import _common


def proxy_anchor_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
    mask: jax.Array | None = None,
    proxy_mask: jax.Array | None = None,
) -> jax.Array:
    r"""Proxy-Anchor loss.

    With cosine similarity ``s(x, p) = x̂·p̂`` (``x̂ = x/‖x‖``)::

        L = 1/|P⁺| Σ_{p∈P⁺} log(1 + Σ_{x∈X_p⁺} exp(-α (s(x,p) - δ)))
          + 1/|P|  Σ_{p∈P}  log(1 + Σ_{x∈X_p⁻} exp( α (s(x,p) + δ)))

    ``P⁺`` is the set of proxies with at least one positive in the batch, ``P`` all ``C`` proxies,
    ``X_p⁺``/``X_p⁻`` the batch rows whose label is/is not ``p``'s class. Both inner sums are
    computed as a masked logsumexp with an appended zero, so they are stable for any ``α``.
    Matches pytorch-metric-learning's ``ProxyAnchorLoss`` (the authors' code).

    Args:
      embeddings: ``(B, d)`` float, any scale (normalised inside). bf16 is accepted; the math is
        fp32 and so is the result.
      labels: ``(B,)`` int in ``[0, C)``.
      proxies: ``(C, d)`` float, one per class (normalised inside).
      margin: ``δ``.
      alpha: ``α``, the scale (inverse temperature).
      mask: optional ``(B,)`` bool; a False row takes part in no term and gets zero gradient.
      proxy_mask: optional ``(C,)`` bool; a False proxy (padding) is left out of ``P`` and ``P⁺``
        and gets zero gradient, so padded proxies give exactly the loss of the unpadded ones.

    Returns:
      A float32 scalar. 0 when every row is masked.

    Raises:
      ValueError: wrong ranks, mismatched dims, a mask of the wrong shape, or (when the labels are
        concrete, i.e. outside ``jit``) a label outside ``[0, C)``. Under ``jit`` an out-of-range
        label matches no proxy: its row only acts as a negative.
    """
    _common.check_embeddings(embeddings)
    _common.check_proxies(proxies, embeddings.shape[1])
    num_classes = proxies.shape[0]
    _common.check_labels(labels, embeddings.shape[0], num_classes, mask=mask)
    mask = _common.resolve_mask(mask, embeddings.shape[0])
    proxy_mask = _common.resolve_proxy_mask(proxy_mask, num_classes)

    x = _common.l2_normalize(_common.zero_masked_rows(embeddings.astype(jnp.float32), mask))
    p = _common.l2_normalize(proxies.astype(jnp.float32))
    cos = x @ p.T  # (B, C): the one big matmul.

    is_positive = labels[:, None] == jnp.arange(num_classes)[None, :]
    row_and_proxy = mask[:, None] & proxy_mask[None, :]
    positive = is_positive & row_and_proxy
    negative = ~is_positive & row_and_proxy

    pos_term = _common.masked_logsumexp_plus_one(-alpha * (cos - margin), positive, axis=0)  # (C,)
    neg_term = _common.masked_logsumexp_plus_one(alpha * (cos + margin), negative, axis=0)  # (C,)

    has_positive = jnp.any(positive, axis=0)
    num_with_positive = jnp.sum(has_positive.astype(jnp.float32))
    pos_loss = jnp.sum(pos_term) / jnp.maximum(num_with_positive, 1.0)
    neg_loss = jnp.sum(neg_term) / jnp.maximum(jnp.sum(proxy_mask.astype(jnp.float32)), 1.0)
    return pos_loss + neg_loss
