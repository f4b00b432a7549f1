"""Proxy-NCA loss (Movshovitz-Attias et al., ICCV 2017) and its ProxyNCA++ setting.

Similarity products run at HIGHEST precision: ``x̂·p̂`` passes ``precision=_common.FULL_PRECISION``,
since at ``σ = 32`` a bf16/TF32 matmul (TPU, recent GPUs) would distort the softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hdml_jax.losses import _common


def proxy_nca_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    scale: float = 1.0,
    include_target_in_denominator: bool = True,
    mask: jax.Array | None = None,
    proxy_mask: jax.Array | None = None,
) -> jax.Array:
    r"""Proxy-NCA loss over squared distances of L2-normalised vectors.

    With ``D_ic = ‖x̂_i - p̂_c‖²`` and ``σ = scale``, the default (softmax) form is::

        L = -1/N Σ_i log( exp(-σ D_{i,y_i}) / Σ_c exp(-σ D_ic) )

    i.e. the mean over rows of ``-log_softmax(-σ D_i)[y_i]``: pytorch-metric-learning's
    ``ProxyNCALoss`` (``softmax_scale = σ``). ProxyNCA++ is ``scale=9`` (vectors scaled by 3,
    temperature 1/9); the Proxy-Anchor repository's baseline uses ``scale=32``.

    ``include_target_in_denominator=False`` gives the classic 2017 form, whose denominator sums
    over ``c ≠ y_i`` only (it can go below zero)::

        L = 1/N Σ_i [ σ D_{i,y_i} + log Σ_{c≠y_i} exp(-σ D_ic) ]

    Args:
      embeddings: ``(B, d)`` float (normalised inside; bf16 accepted, math in fp32).
      labels: ``(B,)`` int in ``[0, C)``.
      proxies: ``(C, d)`` float (normalised inside).
      scale: ``σ > 0``, the softmax scale (inverse temperature).
      include_target_in_denominator: softmax form (True) or classic form (False).
      mask: optional ``(B,)`` bool; False rows count in no mean and get zero gradient.
      proxy_mask: optional ``(C,)`` bool; a False proxy (padding) is left out of every
        denominator and gets zero gradient. Labels must name unmasked proxies.

    Returns:
      A float32 scalar, the mean over unmasked rows (0 when all are masked; NaN when an unmasked
      row or a proxy holds a NaN or an inf).

    Raises:
      ValueError: as ``proxy_anchor_loss``; under ``jit`` an out-of-range label is not detected
        and its row's target term is 0.
      LossHyperparameterError: a concrete ``scale ≤ 0`` (or a non-finite one).
    """
    _common.check_embeddings(embeddings)
    _common.check_proxies(proxies, embeddings.shape[1])
    num_classes = proxies.shape[0]
    _common.check_labels(labels, embeddings.shape[0], num_classes, mask=mask)
    mask = _common.resolve_mask(mask, embeddings.shape[0])
    proxy_mask = _common.resolve_proxy_mask(proxy_mask, num_classes)
    _common.check_hyperparameter(
        scale,
        "proxy_nca_loss scale",
        low=0.0,
        low_inclusive=False,
        meaning="σ is the softmax scale (inverse temperature); σ ≤ 0 rewards distance to the own proxy",
        config_field="loss.scale",
    )
    if not include_target_in_denominator and num_classes < 2:
        raise ValueError("the classic Proxy-NCA form needs at least 2 proxies (its denominator is empty).")

    x = _common.l2_normalize(_common.zero_masked_rows(embeddings.astype(jnp.float32), mask))
    p = _common.l2_normalize(proxies.astype(jnp.float32))
    # -σ‖x̂ - p̂‖² = σ(2 x̂·p̂ - ‖p̂‖²) - σ‖x̂‖². The last term is the same for every class of a row,
    # so it cancels exactly in both forms (target logit minus normaliser): dropping it saves a
    # full (B, C) pass. ‖p̂‖² is kept (it is 1 except for a zero proxy), so the loss stays exact.
    similarity = jnp.matmul(x, p.T, precision=_common.FULL_PRECISION)  # (B, C)
    logits = scale * (2.0 * similarity - jnp.sum(p * p, axis=1)[None, :])
    logits = jnp.where(proxy_mask[None, :], logits, -jnp.inf)

    is_target = labels[:, None] == jnp.arange(num_classes)[None, :]
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=1)
    if include_target_in_denominator:
        normaliser = jax.nn.logsumexp(logits, axis=1)
    else:
        normaliser = jax.nn.logsumexp(jnp.where(is_target, -jnp.inf, logits), axis=1)
    return _common.masked_mean(normaliser - target_logit, mask)
