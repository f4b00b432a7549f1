"""Softmax cross-entropy with temperature and label smoothing (CGD's auxiliary loss)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hdml_jax.losses import _common


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Cross-entropy of ``softmax(logits / τ)`` against smoothed one-hot targets.

    With ``M`` classes and smoothing ``ε``, the target of row ``i`` is
    ``t_ic = (1 - ε)·[c = y_i] + ε/M`` (uniform over all classes, the target included, as
    ``torch.nn.CrossEntropyLoss(label_smoothing=ε)`` and the CGD code do), and::

        L = -1/N Σ_i Σ_c t_ic · log_softmax(logits_i / τ)_c

    CGD uses ``τ = 0.5`` and ``ε = 0.1``.

    Args:
      logits: ``(B, M)`` float (bf16 accepted, math in fp32).
      labels: ``(B,)`` int in ``[0, M)``.
      temperature: ``τ > 0``.
      label_smoothing: ``ε`` in ``[0, 1]``.
      mask: optional ``(B,)`` bool; False rows count in no mean and get zero gradient.

    Returns:
      A float32 scalar, the mean over unmasked rows (0 when all are masked; NaN when an unmasked
      row holds a NaN).

    Raises:
      ValueError: wrong shapes or (concrete) labels outside ``[0, M)``.
      LossHyperparameterError: a concrete ``temperature ≤ 0`` or ``label_smoothing`` outside
        ``[0, 1]`` (or a non-finite one).
    """
    if jnp.ndim(logits) != 2:
        raise ValueError(f"logits must have shape (batch, num_classes), got shape {jnp.shape(logits)}.")
    num_classes = logits.shape[1]
    _common.check_labels(labels, logits.shape[0], num_classes, mask=mask)
    _common.check_hyperparameter(
        temperature,
        "softmax_cross_entropy temperature",
        low=0.0,
        low_inclusive=False,
        meaning="τ divides the logits; CGD uses 0.5",
        config_field="loss.temperature",
    )
    _common.check_hyperparameter(
        label_smoothing,
        "softmax_cross_entropy label_smoothing",
        low=0.0,
        low_inclusive=True,
        high=1.0,
        meaning="ε is the target probability mass spread over all classes; CGD uses 0.1",
        config_field="loss.label_smoothing",
    )
    mask = _common.resolve_mask(mask, logits.shape[0])

    z = _common.zero_masked_rows(logits.astype(_common.MATH_DTYPE), mask) / temperature
    log_probs = jax.nn.log_softmax(z, axis=1)
    targets = (1.0 - label_smoothing) * jax.nn.one_hot(
        labels, num_classes, dtype=z.dtype
    ) + label_smoothing / num_classes
    per_row = -jnp.sum(targets * log_probs, axis=1)
    return _common.masked_mean(per_row, mask)
