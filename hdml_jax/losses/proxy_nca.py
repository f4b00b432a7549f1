"""Proxy-NCA loss (Movshovitz-Attias et al., ICCV 2017) and its ProxyNCA++ setting.

Similarity products run at HIGHEST precision: ``x̂·p̂`` passes ``precision=_common.FULL_PRECISION``,
since at ``σ = 32`` a bf16/TF32 matmul (TPU, recent GPUs) would distort the softmax.

With a concrete ``scale`` the softmax form runs with a hand-written gradient (``jax.custom_jvp``,
as ``normalized_softmax.py``): ``-σ‖x̂ - p̂_c‖² = 2σ x̂·p̂_c - σ‖p̂_c‖² - σ`` is a cosine softmax of
scale ``2σ`` plus a per-class term that is constant (``-σ``) for every proxy above the
normalisation epsilon, so the three ``(B, d)×(d, C)`` products, one pass over the logits and no
normalised copy of the proxies make the whole forward and backward pass. A traced ``scale`` or
the classic form take the plain formulation, differentiated automatically.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hdml_jax.losses import _common
from hdml_jax.losses.normalized_softmax import (
    _FIXED_SHIFT_RANGE,
    _concrete,
    _inverse_norms,
    _is_target,
    _remove_radial,
    _row_logsumexp,
    _targets,
    _zero_padding,
)


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
    padded = proxy_mask is not None
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

    x = _common.l2_normalize(_common.zero_masked_rows(embeddings.astype(_common.MATH_DTYPE), mask))
    concrete_scale = _concrete(scale)
    if include_target_in_denominator and concrete_scale is not None:
        count = jnp.maximum(jnp.sum(mask.astype(x.dtype)), 1.0)
        row_weight = jnp.where(mask, 1.0 / count, 0.0)
        spec = _NcaSpec(concrete_scale, padded)
        p = proxies.astype(_common.MATH_DTYPE)
        return _nca_direct(x, p, jnp.asarray(labels), mask, row_weight, proxy_mask, spec)
    p = _common.l2_normalize(proxies.astype(_common.MATH_DTYPE))
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


class _NcaSpec(NamedTuple):
    scale: float  # σ
    padded: bool = False  # some proxies are masked: they are zeroed inside

    def fixed_shift(self) -> float | None:
        """``2σ`` when it bounds every logit with all of them within range of it, else None.

        The logits ``2σ cos + σ(1 - ‖p̂‖²)`` lie in ``[-2σ, 2σ]`` (the second term is 0 above the
        normalisation epsilon and at most ``σ`` below it, where ``cos`` is 0).
        """
        return 2.0 * self.scale if 4.0 * self.scale <= _FIXED_SHIFT_RANGE else None


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _nca_direct(x, p, labels, mask, row_weight, class_mask, spec: _NcaSpec) -> jax.Array:
    """Softmax-form Proxy-NCA of unit rows ``x`` (B, d) and raw proxies ``p`` (C, d)."""
    return _NcaTerms.compute(x, p, labels, mask, row_weight, class_mask, spec).value


@_nca_direct.defjvp
def _nca_direct_jvp(spec, primals, tangents):
    x, p, labels, mask, row_weight, class_mask = primals
    dx, dp = tangents[0], tangents[1]
    terms = _NcaTerms.compute(x, p, labels, mask, row_weight, class_mask, spec)
    grad_x, grad_p = terms.gradients(spec)
    tangent = jnp.vdot(grad_x, dx, precision=_common.FULL_PRECISION) + jnp.vdot(
        grad_p, dp, precision=_common.FULL_PRECISION
    )
    return terms.value, tangent


class _NcaTerms(NamedTuple):
    """What the value and the gradients share; ``sims = x̂·p`` (B, C) before the inverse norms.

    Logits (the row constant ``-σ`` dropped): ``z_ic = 2σ r_c s_ic + σ(1 - q_c)`` with
    ``r_c = 1/max(‖p_c‖, ε)`` and ``q_c = ‖p̂_c‖² = (r_c ‖p_c‖)²``, which is 1 above ε.
    """

    value: jax.Array
    x: jax.Array
    p: jax.Array
    inv_norm: jax.Array
    has_radial: jax.Array
    offset: jax.Array  # σ(1 - q_c), (C,): 0 above ε
    sims: jax.Array
    is_target: jax.Array
    class_mask: jax.Array
    lse: jax.Array
    coef: jax.Array  # ∂L/∂(per-row loss): 1/N on unmasked rows, 0 elsewhere

    @staticmethod
    def logits(sims, inv_norm, offset, class_mask, scale):
        z = (2.0 * scale) * (sims * inv_norm[None, :]) + offset[None, :]
        return jnp.where(class_mask[None, :], z, -jnp.inf)

    @classmethod
    def compute(cls, x, p, labels, mask, row_weight, class_mask, spec: _NcaSpec) -> _NcaTerms:
        num_classes = p.shape[0]
        if spec.padded:
            p = _zero_padding(p, class_mask)
        inv_norm, has_radial = _inverse_norms(p)
        sq_norm = jnp.einsum("cd,cd->c", p, p, precision=_common.FULL_PRECISION)
        offset = jnp.where(has_radial, 0.0, spec.scale * (1.0 - sq_norm * inv_norm * inv_norm))
        sims = jnp.matmul(x, p.T, precision=_common.FULL_PRECISION)  # (B, C)
        index, valid = _targets(labels, num_classes, class_mask)
        is_target = _is_target(index, valid, num_classes)
        logits = cls.logits(sims, inv_norm, offset, class_mask, spec.scale)
        lse = _row_logsumexp(logits, spec.fixed_shift())
        # The row's own logit is gathered (B values), not masked out of (B, C).
        target = jnp.take_along_axis(sims, index[:, None], axis=1)[:, 0] * inv_norm[index]
        target_logit = (2.0 * spec.scale) * target + offset[index]
        per_row = lse - jnp.where(valid, target_logit, 0.0)
        coef = jnp.where(mask, row_weight, 0.0)
        value = jnp.sum(jnp.where(mask, per_row * coef, 0.0))
        return cls(value, x, p, inv_norm, has_radial, offset, sims, is_target, class_mask, lse, coef)

    def gradients(self, spec: _NcaSpec) -> tuple[jax.Array, jax.Array]:
        """``(∂L/∂x̂, ∂L/∂p)``: with ``G = coef (softmax(z) - onehot)``, ``∂L/∂cos = 2σ G``, the
        normalisation's Jacobian as in ``normalized_softmax._project_weight_gradient``, and below
        ε the offset's
        ``∂q_c/∂p_c = 2 r_c² p_c`` (``-σ Σ_i G_ic`` times it)."""
        z = self.logits(self.sims, self.inv_norm, self.offset, self.class_mask, spec.scale)
        prob = jnp.exp(z - self.lse[:, None])
        grad_z = jnp.where(self.is_target, prob - 1.0, prob)
        grad_z = jnp.where(self.coef[:, None] > 0, grad_z * self.coef[:, None], 0.0)  # masked rows: exact 0
        grad_sims = grad_z * ((2.0 * spec.scale) * self.inv_norm[None, :])
        # Written once and read by every consumer below (XLA would otherwise write the softmax
        # out and recompute the rest inside each consumer: one more (B, C) pass).
        grad_sims = jax.lax.optimization_barrier(grad_sims)
        grad_x = jnp.matmul(grad_sims, self.p, precision=_common.FULL_PRECISION)
        grad_raw = jnp.matmul(grad_sims.T, self.x, precision=_common.FULL_PRECISION)
        # The radial part r_c (p_c·g_c) as a column sum over (B, C), Σ_i G'_ic s_ic (G' = grad_sims):
        # half the data of the (C, d) row products at d = 512 > B (a matvec: XLA:CPU's fastest
        # column sum). Below ε (a zero or vanishing proxy, r_c = 1/ε) the offset depends on p_c
        # too, ∂q_c/∂p_c = 2 r_c² p_c, and its term -σ Σ_i G_ic · 2 r_c² p_c = -p_c r_c Σ_i G'_ic
        # has the same form: the same column sum with s_ic replaced by 1/r_c removes it.
        ones = jnp.ones((grad_sims.shape[0],), grad_sims.dtype)
        column_weight = jnp.where(self.has_radial[None, :], self.sims, 1.0 / self.inv_norm[None, :])
        radial = self.inv_norm * jnp.matmul(ones, grad_sims * column_weight, precision=_common.FULL_PRECISION)
        row_mask = self.class_mask if spec.padded else None
        grad_p = _remove_radial(self.p, self.inv_norm, True, grad_raw, radial, row_mask)
        return grad_x, grad_p
