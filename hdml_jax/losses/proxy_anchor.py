"""Proxy-Anchor loss (Kim et al., CVPR 2020).

Similarity products run at HIGHEST precision: the similarities, the column sums and the matmuls
of the hand-written gradient all pass ``precision=_common.FULL_PRECISION``, since at ``α = 32`` a
bf16/TF32 matmul (TPU, recent GPUs) would put an error of several percent into the exponentials.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hdml_jax.losses import _common

# ``exp`` of float32 overflows above ~88.7. The direct (unshifted) sums below hold at most
# ``B · exp(α(1 + |δ|))``, so they are used only while this bound stays clear of the limit.
_DIRECT_EXP_LIMIT = 80.0


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
    ``X_p⁺``/``X_p⁻`` the batch rows whose label is/is not ``p``'s class. Matches
    pytorch-metric-learning's ``ProxyAnchorLoss`` (the authors' code).

    How it is computed. Cosines lie in ``[-1, 1]``, so every exponent is at most ``α(1 + |δ|)``;
    while ``α(1 + |δ|) + log B`` stays well below float32's ``exp`` limit (``α = 32, δ = 0.1``:
    41 against 88) the inner sums are plain sums of ``exp`` with ``log1p`` on top, which is exact
    (a term that underflows is below ``1e-38`` next to the ``1`` of ``log(1 + ·)``). The
    gradient is then written out by hand (a ``jax.custom_jvp``) so that the forward and backward
    passes cost the three ``(B, C, d)`` matrix products and a few passes over the ``(B, C)``
    similarities, not the many that automatic differentiation of masked logsumexps makes; the
    proxies are never normalised into a copy (their norms scale the similarity columns).
    Otherwise (a larger or traced ``α`` or ``δ``) both terms are max-shifted masked logsumexps
    with an appended zero, stable for any value.

    Args:
      embeddings: ``(B, d)`` float, any scale (normalised inside). bf16 is accepted; the math is
        fp32 and so is the result.
      labels: ``(B,)`` int in ``[0, C)``.
      proxies: ``(C, d)`` float, one per class (normalised inside).
      margin: ``δ ≥ 0``.
      alpha: ``α > 0``, the scale (inverse temperature).
      mask: optional ``(B,)`` bool; a False row takes part in no term and gets zero gradient.
      proxy_mask: optional ``(C,)`` bool; a False proxy (padding) is left out of ``P`` and ``P⁺``
        and gets zero gradient, so padded proxies give exactly the loss of the unpadded ones.

    Returns:
      A float32 scalar. 0 when every row is masked; NaN when an unmasked row or a proxy holds a
      NaN or an inf (never a finite number).

    Raises:
      ValueError: wrong ranks, mismatched dims, a mask of the wrong shape, or (when the labels are
        concrete, i.e. outside ``jit``) a label outside ``[0, C)``. Under ``jit`` an out-of-range
        label matches no proxy: its row only acts as a negative.
      LossHyperparameterError: a concrete ``alpha ≤ 0`` or ``margin < 0`` (or a non-finite one).
    """
    _common.check_embeddings(embeddings)
    _common.check_proxies(proxies, embeddings.shape[1])
    num_classes = proxies.shape[0]
    _common.check_labels(labels, embeddings.shape[0], num_classes, mask=mask)
    _common.check_hyperparameter(
        alpha,
        "proxy_anchor_loss alpha",
        low=0.0,
        low_inclusive=False,
        meaning="α scales the cosines inside exp; α ≤ 0 turns pulling into pushing (the paper uses 32)",
        config_field="loss.alpha",
    )
    _common.check_hyperparameter(
        margin,
        "proxy_anchor_loss margin",
        low=0.0,
        low_inclusive=True,
        meaning="δ is the cosine margin, positives are pushed above δ and negatives below -δ (paper: 0.1)",
        config_field="loss.margin",
    )
    mask = _common.resolve_mask(mask, embeddings.shape[0])
    proxy_mask = _common.resolve_proxy_mask(proxy_mask, num_classes)

    x = _common.l2_normalize(_common.zero_masked_rows(embeddings.astype(_common.MATH_DTYPE), mask))
    proxies = proxies.astype(_common.MATH_DTYPE)
    labels = jnp.asarray(labels)
    if _direct_sums_are_safe(alpha, margin, embeddings.shape[0]):
        return _proxy_anchor_direct(x, proxies, labels, mask, proxy_mask, float(alpha), float(margin))
    return _proxy_anchor_shifted(x, proxies, labels, mask, proxy_mask, alpha, margin)


def _direct_sums_are_safe(alpha, margin, batch_size: int) -> bool:
    """Whether ``B · exp(α(1 + |δ|))`` is far from float32 overflow (needs concrete α and δ)."""
    try:
        alpha, margin = float(alpha), float(margin)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False  # traced hyperparameters: take the path that is stable for any value
    return abs(alpha) * (1.0 + abs(margin)) + math.log(max(batch_size, 1)) < _DIRECT_EXP_LIMIT


def _proxy_anchor_shifted(x, proxies, labels, mask, proxy_mask, alpha, margin) -> jax.Array:
    """The general path: max-shifted masked logsumexps, differentiated automatically."""
    num_classes = proxies.shape[0]
    cos = jnp.matmul(x, _common.l2_normalize(proxies).T, precision=_common.FULL_PRECISION)  # (B, C)
    is_positive = labels[:, None] == jnp.arange(num_classes)[None, :]
    row_and_proxy = mask[:, None] & proxy_mask[None, :]
    positive = is_positive & row_and_proxy
    negative = ~is_positive & row_and_proxy

    pos_term = _common.masked_logsumexp_plus_one(-alpha * (cos - margin), positive, axis=0)  # (C,)
    neg_term = _common.masked_logsumexp_plus_one(alpha * (cos + margin), negative, axis=0)  # (C,)

    has_positive = jnp.any(positive, axis=0)
    num_with_positive = jnp.sum(has_positive.astype(x.dtype))
    pos_loss = jnp.sum(pos_term) / jnp.maximum(num_with_positive, 1.0)
    neg_loss = jnp.sum(neg_term) / jnp.maximum(jnp.sum(proxy_mask.astype(x.dtype)), 1.0)
    return pos_loss + neg_loss


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _proxy_anchor_direct(x, proxies, labels, mask, proxy_mask, alpha, margin) -> jax.Array:
    """Proxy-Anchor of unit rows ``x`` (B, d) and raw ``proxies`` (C, d), direct sums."""
    return _ProxyAnchorTerms.compute(x, proxies, labels, mask, proxy_mask, alpha, margin).value


@_proxy_anchor_direct.defjvp
def _proxy_anchor_direct_jvp(alpha, margin, primals, tangents):
    x, proxies, labels, mask, proxy_mask = primals
    dx, dproxies = tangents[0], tangents[1]
    terms = _ProxyAnchorTerms.compute(x, proxies, labels, mask, proxy_mask, alpha, margin)
    grad_x, grad_proxies = terms.gradients()
    tangent = jnp.vdot(grad_x, dx, precision=_common.FULL_PRECISION) + jnp.vdot(
        grad_proxies, dproxies, precision=_common.FULL_PRECISION
    )
    return terms.value, tangent


class _ProxyAnchorTerms(NamedTuple):
    """The pieces of the direct path that the value and the gradients share.

    Shapes: ``B`` rows, ``C`` proxies. ``cos`` is ``x̂·p̂`` (B, C); ``neg_exp`` is
    ``exp(α(cos + δ))`` on the negative pairs and 0 elsewhere; ``neg_sum`` its column sums (C,);
    ``pos_exp`` is ``exp(-α(cos_{i,y_i} - δ))`` for each valid row (B,) and ``pos_sum`` (B,) the sum of
    ``pos_exp`` over the rows of the same class.
    """

    value: jax.Array
    x: jax.Array
    proxies: jax.Array
    labels: jax.Array
    proxy_sq_norm: jax.Array
    proxy_inv_norm: jax.Array
    cos: jax.Array
    neg_exp: jax.Array
    neg_sum: jax.Array
    pos_exp: jax.Array
    pos_sum: jax.Array
    num_proxies: jax.Array
    num_with_positive: jax.Array
    alpha: float

    @classmethod
    def compute(cls, x, proxies, labels, mask, proxy_mask, alpha: float, margin: float) -> _ProxyAnchorTerms:
        batch_size, num_classes = x.shape[0], proxies.shape[0]
        proxy_sq_norm = jnp.einsum("cd,cd->c", proxies, proxies, precision=_common.FULL_PRECISION)
        # If some ‖p_c‖² overflowed, all proxies are scaled by exact powers of two t_c and summed
        # again (1/‖p_c‖ = t_c / ‖t_c p_c‖); otherwise t_c = 1 and the bits are the usual ones.
        proxy_scale, proxy_sq_norm = _common.overflow_safe_sq_norm(proxies, 1, proxy_sq_norm[:, None])
        proxy_scale, proxy_sq_norm = proxy_scale[:, 0], proxy_sq_norm[:, 0]
        proxy_inv_norm = jax.lax.rsqrt(jnp.maximum(proxy_sq_norm, _common.NORM_EPS**2)) * proxy_scale
        # Scaling the columns of x·pᵀ normalises the proxies without writing a (C, d) copy.
        cos = jnp.matmul(x, proxies.T, precision=_common.FULL_PRECISION) * proxy_inv_norm[None, :]

        is_positive = labels[:, None] == jnp.arange(num_classes)[None, :]
        negative = mask[:, None] & proxy_mask[None, :] & ~is_positive
        neg_exp = jnp.where(negative, jnp.exp(alpha * (cos + margin)), 0.0)
        # Column sums as a matrix-vector product: on CPU a reduction fused with the exp above
        # runs many times slower than this.
        neg_sum = jnp.matmul(jnp.ones((batch_size,), neg_exp.dtype), neg_exp, precision=_common.FULL_PRECISION)

        # Each row has at most one positive pair, (i, y_i): gather it instead of masking (B, C).
        label_index = jnp.clip(labels, 0, num_classes - 1)
        valid_positive = mask & (labels >= 0) & (labels < num_classes) & proxy_mask[label_index]
        pos_cos = jnp.take_along_axis(cos, label_index[:, None], axis=1)[:, 0]
        pos_exp = jnp.where(valid_positive, jnp.exp(-alpha * (pos_cos - margin)), 0.0)
        # Per-class sums are taken per row over the (B, B) same-label pairs rather than scattered
        # into a (C,) array: with the proxies sharded over the classes a scatter would have to be
        # all-reduced over every class.
        same_class = (labels[:, None] == labels[None, :]) & valid_positive[None, :]
        # (B,): Σ over the row's class
        pos_sum = jnp.matmul(same_class.astype(pos_exp.dtype), pos_exp, precision=_common.FULL_PRECISION)
        earlier_same = jnp.any(same_class & jnp.tri(batch_size, k=-1, dtype=bool), axis=1)
        first_of_class = valid_positive & ~earlier_same  # one row per class in P⁺

        num_with_positive = jnp.maximum(jnp.sum(first_of_class.astype(x.dtype)), 1.0)
        num_proxies = jnp.maximum(jnp.sum(proxy_mask.astype(x.dtype)), 1.0)
        pos_loss = jnp.sum(jnp.where(first_of_class, jnp.log1p(pos_sum), 0.0)) / num_with_positive
        value = pos_loss + jnp.sum(jnp.log1p(neg_sum)) / num_proxies
        return cls(
            value, x, proxies, labels, proxy_sq_norm, proxy_inv_norm, cos, neg_exp, neg_sum,
            pos_exp, pos_sum, num_proxies, num_with_positive, alpha,
        )  # fmt: skip

    def gradients(self) -> tuple[jax.Array, jax.Array]:
        """``(∂L/∂x̂, ∂L/∂proxies)``, shapes ``(B, d)`` and ``(C, d)``.

        With ``G = ∂L/∂cos`` (B, C) and ``r_c = 1/‖p_c‖``: ``∂L/∂x̂ = G p̂ = (G r) p`` and
        ``∂L/∂p_c = r_c (Gᵀx̂)_c - r_c² t_c p_c`` where ``t_c = Σ_i G_ic cos_ic`` (the radial part
        that the normalisation removes), so both products use ``G r``.
        """
        num_classes = self.proxies.shape[0]
        # ∂L/∂cos: α·exp(-α(cos-δ))/(1+pos_sum) on the positive pair of each row (negative sign),
        # α·exp(α(cos+δ))/(1+neg_sum) on the negative pairs, each over its number of proxies.
        pos_grad = -self.alpha * self.pos_exp / (self.num_with_positive * (1.0 + self.pos_sum))
        neg_scale = self.alpha / (self.num_proxies * (1.0 + self.neg_sum))  # (C,)
        is_positive = self.labels[:, None] == jnp.arange(num_classes)[None, :]
        grad_cos = jnp.where(is_positive, pos_grad[:, None], neg_scale[None, :] * self.neg_exp)
        grad_sim = grad_cos * self.proxy_inv_norm[None, :]  # ∂L/∂(x̂·p) (B, C)

        grad_x = jnp.matmul(grad_sim, self.proxies, precision=_common.FULL_PRECISION)
        ones = jnp.ones((self.x.shape[0],), self.x.dtype)
        # t_c = Σ_i G_ic cos_ic, a column sum again
        radial = jnp.matmul(ones, grad_cos * self.cos, precision=_common.FULL_PRECISION)
        # Below the normalisation epsilon p̂ = p/ε is linear in p: no radial part to remove.
        # (``proxy_sq_norm`` is that of t_c p_c, which is ≥ 4 whenever t_c is not 1.)
        radial = jnp.where(self.proxy_sq_norm >= _common.NORM_EPS**2, radial * self.proxy_inv_norm**2, 0.0)
        grad_proxies = (
            jnp.matmul(grad_sim.T, self.x, precision=_common.FULL_PRECISION) - self.proxies * radial[:, None]
        )
        return grad_x, grad_proxies
