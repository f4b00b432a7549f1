"""SoftTriple loss (Qian et al., ICCV 2019) as in pytorch-metric-learning 2.x's ``SoftTripleLoss``.

``K`` centers per class, kept as one ``(C·K, d)`` proxy array: class ``c``'s centers are the
consecutive rows ``c·K, ..., c·K + K - 1``. That is PML's layout transposed: PML's ``loss.fc`` is
``(d, C·K)`` and its similarities ``(B, C·K)`` are viewed as ``(B, C, K)``, so column ``c·K + k``
is center ``k`` of class ``c``; ``weights = fc.T`` (and ``fc = weights.T`` back). Padding for
sharding along the class axis must add whole classes (a multiple of ``K`` rows).

As in PML there is no center regulariser: the paper's ``τ·Σ ‖w_ck - w_ck'‖`` term (which merges
redundant centers) is not part of PML's loss (its optional ``weight_regularizer`` is a generic
one, not offered here), so it is not part of this one either.

Similarity products run at HIGHEST precision (``_common.FULL_PRECISION``).
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.losses import _common
from hdml_jax.losses.normalized_softmax import (
    _FIXED_SHIFT_RANGE,
    _check_inputs,
    _inverse_norms,
    _or_float32,
    _prepare,
    _remove_radial,
    _row_logsumexp,
    _targets,
    _zero_padding,
)


def soft_triple_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    centers_per_class: int = 10,
    la: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    mask: jax.Array | None = None,
    proxy_mask: jax.Array | None = None,
) -> jax.Array:
    r"""SoftTriple loss: PML's ``SoftTripleLoss`` (no center regulariser, as in PML).

    With ``K = centers_per_class`` unit centers ``ŵ_ck`` per class and ``cos_ick = x̂_i·ŵ_ck``,
    each class's relaxed similarity is a softmax-weighted mean over its centers, and the loss is
    the cross-entropy of the scaled similarities with a margin on the own class::

        S_ic = Σ_k q_ick cos_ick,    q_ick = exp(cos_ick / γ) / Σ_k' exp(cos_ick' / γ)
        L = 1/N Σ_i -log( exp(λ (S_{i,y_i} - δ)) / (exp(λ (S_{i,y_i} - δ)) + Σ_{c≠y_i} exp(λ S_ic)) )

    the mean over the ``N`` unmasked rows (PML's ``MeanReducer``), with ``λ = la``, ``γ = gamma``
    (PML divides by it: its attribute ``gamma`` is ``1/γ``) and ``δ = margin``.

    How it is computed. With concrete hyperparameters the gradient is written out (a
    ``jax.custom_jvp``): ``∂S_ic/∂cos_ick = q_ick (1 + (cos_ick - S_ic)/γ)``, the three
    ``(B, d)×(d, C·K)`` products, and no normalised copy of the centers (as in
    ``normalized_softmax.py``). A traced hyperparameter takes a plain path differentiated
    automatically.

    Args:
      embeddings: ``(B, d)`` float, any scale (normalised inside; bf16 accepted, math in fp32).
      labels: ``(B,)`` int in ``[0, C)``.
      weights: ``(C·K, d)`` float, the centers (normalised inside), class-major: row ``c·K + k``
        is center ``k`` of class ``c`` (PML's ``fc.T``).
      centers_per_class: ``K ≥ 1``, a Python int (it fixes shapes). PML: 10.
      la: ``λ > 0``, the scale of the class similarities (PML: 20).
      gamma: ``γ > 0``, the temperature of the softmax over a class's centers (PML: 0.1).
      margin: ``δ ≥ 0``, subtracted from the own class's similarity (PML: 0.01).
      mask: optional ``(B,)`` bool; a False row counts in no mean and gets zero gradient.
      proxy_mask: optional bool, either ``(C·K,)`` (one flag per center row, what padding the
        proxy rows gives) or ``(C,)`` (one per class). A False center takes part in no softmax
        over centers and gets zero gradient; a class left without centers is left out of the
        softmax over classes.

    Returns:
      A float32 scalar: 0 when every row is masked; NaN when an unmasked row or an unmasked
      center holds a NaN or an inf.

    Raises:
      ValueError: wrong ranks, mismatched dims, a row count that is not a multiple of ``K``,
        masks of the wrong shape, or (when the labels are concrete) an unmasked label outside
        ``[0, C)``. Under ``jit`` a row whose label is out of range or names a class without
        centers is not detected: its target term is 0.
      LossHyperparameterError: ``centers_per_class`` not a positive int, or a concrete ``la ≤ 0``,
        ``gamma ≤ 0`` or ``margin < 0`` (or a non-finite one).
    """
    if isinstance(centers_per_class, bool) or not isinstance(centers_per_class, int | np.integer):
        raise _common.LossHyperparameterError(
            f"soft_triple_loss centers_per_class must be a Python int ≥ 1 (it fixes the shape of "
            f"the weights), got {centers_per_class!r}."
        )
    _common.check_hyperparameter(
        centers_per_class,
        "soft_triple_loss centers_per_class",
        low=1.0,
        low_inclusive=True,
        meaning="K, the number of centers (weight rows) per class; PML's default is 10",
    )
    _common.check_hyperparameter(
        la,
        "soft_triple_loss la",
        low=0.0,
        low_inclusive=False,
        meaning="λ scales the class similarities inside the softmax; PML's default is 20",
    )
    _common.check_hyperparameter(
        gamma,
        "soft_triple_loss gamma",
        low=0.0,
        low_inclusive=False,
        meaning="γ is the temperature of the softmax over a class's centers; PML's default is 0.1",
    )
    _common.check_hyperparameter(
        margin,
        "soft_triple_loss margin",
        low=0.0,
        low_inclusive=True,
        meaning="δ is subtracted from the similarity to the own class; PML's default is 0.01",
    )
    centers = operator.index(centers_per_class)
    num_classes = _check_inputs(embeddings, labels, weights, mask, centers)
    center_mask = _resolve_center_mask(proxy_mask, num_classes, centers)
    padded = center_mask is not None
    if center_mask is None:
        center_mask = jnp.ones((num_classes * centers,), bool)
    x, w, mask, row_weight = _prepare(embeddings, weights, mask)
    labels = jnp.asarray(labels)
    la, gamma, margin = _or_float32(la), _or_float32(gamma), _or_float32(margin)
    if all(isinstance(v, float) for v in (la, gamma, margin)):
        spec = _SoftTripleSpec(centers, la, gamma, margin, padded)
        return _soft_triple_direct(x, w, labels, mask, row_weight, center_mask, spec)
    if padded:
        w = _zero_padding(w, center_mask)
    return _soft_triple_autodiff(x, w, labels, mask, row_weight, center_mask, centers, la, gamma, margin)


def _resolve_center_mask(proxy_mask, num_classes: int, centers: int) -> jax.Array | None:
    """A ``(C·K,)`` bool mask from a per-center ``(C·K,)`` or a per-class ``(C,)`` one (None stays)."""
    if proxy_mask is None:
        return None
    shape = jnp.shape(proxy_mask)
    if shape == (num_classes * centers,):
        return jnp.asarray(proxy_mask).astype(bool)
    if shape == (num_classes,):
        return jnp.repeat(jnp.asarray(proxy_mask).astype(bool), centers)
    raise ValueError(
        f"proxy_mask must have shape ({num_classes * centers},) (one flag per center row) or "
        f"({num_classes},) (one per class), got {shape}."
    )


# Up to this many centers per class, a sum over them is written as a sum of K strided slices:
# XLA:CPU turns that into one vectorised loop, where a reduction over a minor axis of 10 runs
# ~2× slower (at SOP's size the forward pass's two such sums took 90 ms of 240).
_UNROLLED_CENTER_SUM = 32


def _sum_over_centers(a: jax.Array) -> jax.Array:
    """``Σ_k a[..., k]`` over the last (centers) axis."""
    centers = a.shape[-1]
    if centers > _UNROLLED_CENTER_SUM:
        return jnp.sum(a, axis=-1)
    return functools.reduce(operator.add, (a[..., k] for k in range(centers)))


class _SoftTripleSpec(NamedTuple):
    centers: int  # K
    la: float
    gamma: float
    margin: float
    padded: bool = False  # a proxy mask was given: masked center rows are zeroed inside

    def center_shift(self) -> float | None:
        """``1/γ`` when it bounds every ``cos/γ`` with all of them within range of it (else None).

        ``cos/γ`` lies in ``[-1/γ, 1/γ]``: a fixed shift of ``1/γ`` is exact when ``2/γ`` is within
        ``_FIXED_SHIFT_RANGE`` (γ ≥ 0.025; PML's 0.1 gives 20), which saves the row maxima.
        """
        return 1.0 / self.gamma if 2.0 / self.gamma <= _FIXED_SHIFT_RANGE else None

    def class_shift(self) -> float | None:
        """``λ`` when the class logits ``λ(S - δ[c = y])`` in ``[-λ(1 + δ), λ]`` allow it."""
        return self.la if self.la * (2.0 + self.margin) <= _FIXED_SHIFT_RANGE else None


def _soft_triple_autodiff(x, w, labels, mask, row_weight, center_mask, centers, la, gamma, margin):
    """The plain formulation, differentiated automatically (traced hyperparameters)."""
    batch = x.shape[0]
    num_classes = w.shape[0] // centers
    cos = jnp.matmul(x, _common.l2_normalize(w).T, precision=_common.FULL_PRECISION)
    cos = cos.reshape(batch, num_classes, centers)
    by_class = center_mask.reshape(num_classes, centers)
    class_mask = jnp.any(by_class, axis=1)
    # A class without centers gets a harmless softmax (all zeros) and is masked out below.
    scaled = jnp.where(by_class[None], cos / gamma, jnp.where(class_mask[:, None], -jnp.inf, 0.0)[None])
    relaxed = jnp.sum(jax.nn.softmax(scaled, axis=2) * cos, axis=2)  # (B, C)
    index, valid = _targets(labels, num_classes, class_mask)
    is_target = (index[:, None] == jnp.arange(num_classes)[None, :]) & valid[:, None]
    logits = la * (relaxed - jnp.where(is_target, margin, 0.0))
    logits = jnp.where(class_mask[None, :], logits, -jnp.inf)
    target = jnp.sum(jnp.where(is_target, logits, 0.0), axis=1)
    per_row = jax.nn.logsumexp(logits, axis=1) - target
    return jnp.sum(jnp.where(mask, per_row * row_weight, 0.0))


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _soft_triple_direct(x, w, labels, mask, row_weight, center_mask, spec: _SoftTripleSpec) -> jax.Array:
    """SoftTriple of unit rows ``x`` (B, d) and raw centers ``w`` (C·K, d), concrete hyperparameters."""
    return _SoftTripleTerms.compute(x, w, labels, mask, row_weight, center_mask, spec).value


@_soft_triple_direct.defjvp
def _soft_triple_direct_jvp(spec, primals, tangents):
    x, w, labels, mask, row_weight, center_mask = primals
    dx, dw = tangents[0], tangents[1]
    terms = _SoftTripleTerms.compute(x, w, labels, mask, row_weight, center_mask, spec)
    grad_x, grad_w = terms.gradients(spec)
    tangent = jnp.vdot(grad_x, dx, precision=_common.FULL_PRECISION) + jnp.vdot(
        grad_w, dw, precision=_common.FULL_PRECISION
    )
    return terms.value, tangent


class _SoftTripleTerms(NamedTuple):
    """What the value and the gradients share.

    ``center_sum`` is the sum of the (shifted) softmax terms over each class's centers (B, C); ``relaxed`` is ``S``.
    """

    value: jax.Array
    x: jax.Array
    w: jax.Array
    inv_norm: jax.Array
    has_radial: jax.Array
    center_mask: jax.Array
    center_sum: jax.Array
    relaxed: jax.Array
    logits: jax.Array
    is_target: jax.Array
    lse: jax.Array
    coef: jax.Array
    # Kept from the forward pass for the backward one: the raw products ``x̂·w`` (B, C·K) (the
    # cosines are ``sims · inv_norm``, recomputed inside each fused loop rather than written
    # out) and the exponentials (B, C, K) (recomputing the 29M of them at SOP's size instead
    # costs ~8% of the whole call).
    sims: jax.Array
    exps: jax.Array

    @staticmethod
    def cosines(sims, inv_norm, centers: int) -> jax.Array:
        """``cos_ick = (x̂·w_ck) / ‖w_ck‖`` as (B, C, K), from the raw products (B, C·K)."""
        return (sims * inv_norm[None, :]).reshape(sims.shape[0], sims.shape[1] // centers, centers)

    @classmethod
    def center_exp(cls, sims, inv_norm, center_mask, spec: _SoftTripleSpec):
        """``(cos, exp(cos/γ - shift))`` as (B, C, K); 0 for masked centers."""
        cos = cls.cosines(sims, inv_norm, spec.centers)
        shape = cos.shape
        scaled = jnp.where(center_mask.reshape(1, *shape[1:]), cos * (1.0 / spec.gamma), -jnp.inf)
        fixed = spec.center_shift()
        if fixed is not None:
            center_shift = jnp.full(shape[:2], fixed, cos.dtype)
        else:
            center_shift = jnp.max(scaled, axis=2)
            center_shift = jnp.where(jnp.isneginf(center_shift), 0.0, center_shift)
        return cos, jnp.exp(scaled - center_shift[:, :, None])

    @classmethod
    def compute(cls, x, w, labels, mask, row_weight, center_mask, spec: _SoftTripleSpec) -> _SoftTripleTerms:
        num_classes = w.shape[0] // spec.centers
        if spec.padded:
            w = _zero_padding(w, center_mask)
        inv_norm, has_radial = _inverse_norms(w)
        sims = jnp.matmul(x, w.T, precision=_common.FULL_PRECISION)  # (B, C·K)
        cos, exps = cls.center_exp(sims, inv_norm, center_mask, spec)
        center_sum = _sum_over_centers(exps)  # (B, C), ≥ 1 for a class with centers
        class_mask = jnp.any(center_mask.reshape(num_classes, spec.centers), axis=1)
        safe_sum = jnp.where(center_sum > 0, center_sum, 1.0)
        relaxed = _sum_over_centers(exps * cos) / safe_sum  # S (B, C)

        index, valid = _targets(labels, num_classes, class_mask)
        is_target = (index[:, None] == jnp.arange(num_classes)[None, :]) & valid[:, None]
        logits = spec.la * (relaxed - jnp.where(is_target, spec.margin, 0.0))
        logits = jnp.where(class_mask[None, :], logits, -jnp.inf)
        lse = _row_logsumexp(logits, spec.class_shift())
        target = jnp.where(valid, jnp.take_along_axis(logits, index[:, None], axis=1)[:, 0], 0.0)
        coef = jnp.where(mask, row_weight, 0.0)
        value = jnp.sum(jnp.where(mask, (lse - target) * coef, 0.0))
        return cls(
            value, x, w, inv_norm, has_radial, center_mask, safe_sum, relaxed,
            logits, is_target, lse, coef, sims, exps,
        )  # fmt: skip

    def gradients(self, spec: _SoftTripleSpec) -> tuple[jax.Array, jax.Array]:
        """``(∂L/∂x̂, ∂L/∂w)``: ``∂L/∂S_ic = λ coef_i (p_ic - [c = y_i])``, then through ``q``.

        The weight gradient's radial part ``r_j (ŵ_j·g_j)`` is taken as the column sum
        ``r_j Σ_i G_ij cos_ij`` over (B, C·K) (``G = ∂L/∂cos``), half the size of the (C·K, d) row
        products ``_project_weight_gradient`` would read (``d = 512 > B``) and next to the
        loop that writes ``G``.
        """
        p = jnp.exp(self.logits - self.lse[:, None])
        grad_relaxed = jnp.where(self.is_target, p - 1.0, p) * (spec.la * self.coef)[:, None]  # (B, C)
        cos = self.cosines(self.sims, self.inv_norm, spec.centers)
        q = self.exps / self.center_sum[:, :, None]
        # ∂S/∂cos_k = q_k (1 + (cos_k - S)/γ)
        grad_cos = (grad_relaxed[:, :, None] * q) * (
            1.0 + (cos - self.relaxed[:, :, None]) * (1.0 / spec.gamma)
        )
        grad_cos = jnp.where(self.coef[:, None, None] > 0, grad_cos, 0.0)  # masked rows: exact zeros
        grad_cos = grad_cos.reshape(grad_cos.shape[0], -1)  # (B, C·K)
        grad_sims = grad_cos * self.inv_norm[None, :]
        grad_x = jnp.matmul(grad_sims, self.w, precision=_common.FULL_PRECISION)
        grad_raw = jnp.matmul(grad_sims.T, self.x, precision=_common.FULL_PRECISION)
        ones = jnp.ones((grad_cos.shape[0],), grad_cos.dtype)  # a column sum XLA:CPU runs as a matvec
        radial = self.inv_norm * jnp.matmul(
            ones, grad_sims * self.sims, precision=_common.FULL_PRECISION
        )
        row_mask = self.center_mask if spec.padded else None
        return grad_x, _remove_radial(self.w, self.inv_norm, self.has_radial, grad_raw, radial, row_mask)
