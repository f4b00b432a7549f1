"""Normalized-softmax, CosFace and ArcFace losses: softmax cross-entropy over cosine logits.

pytorch-metric-learning's (2.x) ``NormalizedSoftmaxLoss``, ``CosFaceLoss`` and ``ArcFaceLoss`` as
pure functions. Their class-weight matrix is a ``(C, d)`` proxy array like those of
``proxy_anchor_loss`` / ``proxy_nca_loss``: one row per class, normalised inside, ``proxy_mask``
for padding rows, so the trainer's proxy machinery (learning-rate multiplier, sharding along the
class axis, padding masks) applies unchanged. Every logit is a cosine ``x̂·ŵ_c`` times a scale
(``1/temperature`` for the normalized softmax); CosFace and ArcFace change only the logit of each
row's own class::

    plain (NormalizedSoftmax): z_ic = cos_ic / T
    CosFace:                   z_ic = s · (cos_ic - m [c = y_i])
    ArcFace:                   z_ic = s · cos_ic for c ≠ y_i,   z_{i,y_i} = s · ψ(cos_{i,y_i})
    L = 1/N Σ_i ( log Σ_c exp(z_ic) - z_{i,y_i} )            (cross-entropy, mean over rows)

Porting weights from PML: PML keeps ``loss.W`` as ``(d, C)`` (embedding_size, num_classes); ours
is its transpose, ``weights = W.T`` (and ``W = weights.T`` back). The hyperparameters keep PML's
names, defaults and units (ArcFace's ``margin`` is in degrees), so a ``pml_kwargs`` dict carries
over; PML's constructor arguments ``num_classes`` / ``embedding_size`` are the weight shape here,
and its ``weight_regularizer`` / ``embedding_regularizer`` / ``reducer`` / ``distance`` options
are not offered (the defaults — no regularizer, ``MeanReducer``, cosine similarity — are what
these functions compute).

How it is computed. With concrete hyperparameters (Python numbers, the usual case) the loss is a
``jax.custom_jvp`` whose gradient is written out: one ``(B, d)×(d, C)`` product forward, the two
products of the backward pass, and two or three passes over the ``(B, C)`` similarities (the row
maximum, only when the logits span more than 80 — CosFace / ArcFace at ``s = 64`` — since
otherwise the largest possible logit ``s`` is an exact shift; the row sum of ``exp``; the gradient
``∂L/∂(x̂·w)``). The weights are never normalised into a ``(C, d)`` copy (their inverse norms
scale the similarity columns), and the radial part that the normalisation removes from the weight
gradient is taken on the ``(C, d)`` product rather than with another ``(B, C)`` column sum. A
traced hyperparameter (passed through ``jax.jit`` as an argument) takes a plain path that is
differentiated automatically (also w.r.t. the hyperparameter); both give the same values and
gradients. Forward mode and higher derivatives work on both paths.

Labels: a row's label must name an unmasked class. Concrete labels are checked (unmasked rows
only); under ``jit`` a label outside ``[0, C)`` or naming a padding class cannot raise, and that
row's target term is 0 (its loss is the bare log-sum-exp), so padding still gets no gradient.

Similarity products run at HIGHEST precision (``_common.FULL_PRECISION``): at ``s = 64`` a
bf16/TF32 matmul would distort the softmax.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hdml_jax.losses import _common

# ψ'(t) of ArcFace has 1/sqrt(1 - t²), infinite at t = ±1. The largest float32 below 1 is
# 1 - 2⁻²⁴, where 1 - t² is 2⁻²³: flooring 1 - t² there changes the derivative of no cosine
# except exactly ±1 (a row on its own weight vector), where it stays finite.
_SIN_FLOOR = 2.0**-23


def normalized_softmax_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    temperature: float = 0.05,
    mask: jax.Array | None = None,
    proxy_mask: jax.Array | None = None,
) -> jax.Array:
    r"""Normalized-softmax loss (Zhai & Wu, BMVC 2019): PML's ``NormalizedSoftmaxLoss``.

    With ``cos_ic = x̂_i·ŵ_c`` (both L2-normalised) and temperature ``T``::

        L = 1/N Σ_i -log( exp(cos_{i,y_i}/T) / Σ_c exp(cos_ic/T) )

    the mean over the ``N`` unmasked rows. PML's default distance (``DotProductSimilarity`` with
    normalised embeddings) and its ``MeanReducer``; its weight ``W`` (``(d, C)``) is ``weights.T``.

    Args:
      embeddings: ``(B, d)`` float, any scale (normalised inside; bf16 accepted, math in fp32).
      labels: ``(B,)`` int in ``[0, C)``.
      weights: ``(C, d)`` float, one row per class (normalised inside): a proxy array.
      temperature: ``T > 0`` (PML's default 0.05, i.e. a scale of 20).
      mask: optional ``(B,)`` bool; a False row counts in no mean and gets zero gradient.
      proxy_mask: optional ``(C,)`` bool; a False class (padding) is left out of every softmax
        and gets zero gradient, so padded weights give exactly the loss of the unpadded ones.

    Returns:
      A float32 scalar. 0 when every row is masked; NaN when an unmasked row or an unmasked weight
      row holds a NaN or an inf.

    Raises:
      ValueError: wrong ranks, mismatched dims, masks of the wrong shape, no class, or (when the
        labels are concrete) an unmasked label outside ``[0, C)``. Under ``jit`` a row whose label
        is out of range or names a padding class is not detected: its target term is 0 (only the
        log-sum-exp remains).
      LossHyperparameterError: a concrete ``temperature ≤ 0`` (or a non-finite one).
    """
    _common.check_hyperparameter(
        temperature,
        "normalized_softmax_loss temperature",
        low=0.0,
        low_inclusive=False,
        meaning="the cosines are divided by T; PML's default is 0.05",
    )
    scale = _concrete(temperature)
    if scale is not None:
        scale = 1.0 / scale
    else:
        scale = 1.0 / jnp.asarray(temperature, jnp.float32)
    return _cosine_softmax_loss(
        embeddings, labels, weights, kind="plain", scale=scale, margin=0.0, mask=mask, proxy_mask=proxy_mask
    )


def cosface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    margin: float = 0.35,
    scale: float = 64.0,
    mask: jax.Array | None = None,
    proxy_mask: jax.Array | None = None,
) -> jax.Array:
    r"""CosFace / large-margin cosine loss (Wang et al., CVPR 2018): PML's ``CosFaceLoss``.

    With ``cos_ic = x̂_i·ŵ_c``, margin ``m`` and scale ``s``::

        L = 1/N Σ_i -log( exp(s (cos_{i,y_i} - m)) / (exp(s (cos_{i,y_i} - m)) + Σ_{c≠y_i} exp(s cos_ic)) )

    the mean over the ``N`` unmasked rows (PML's ``MeanReducer``). PML's ``W`` (``(d, C)``) is
    ``weights.T``.

    Args:
      embeddings: ``(B, d)`` float, any scale (normalised inside; bf16 accepted, math in fp32).
      labels: ``(B,)`` int in ``[0, C)``.
      weights: ``(C, d)`` float, one row per class (normalised inside): a proxy array.
      margin: ``m ≥ 0``, subtracted from the target cosine (PML: 0.35).
      scale: ``s > 0`` (PML: 64).
      mask: optional ``(B,)`` bool; a False row counts in no mean and gets zero gradient.
      proxy_mask: optional ``(C,)`` bool; a False class (padding) is left out of every softmax
        and gets zero gradient.

    Returns:
      A float32 scalar: 0 when every row is masked; NaN when an unmasked row or an unmasked weight
      row holds a NaN or an inf.

    Raises:
      ValueError: as ``normalized_softmax_loss``.
      LossHyperparameterError: a concrete ``margin < 0`` or ``scale ≤ 0`` (or a non-finite one).
    """
    _common.check_hyperparameter(
        margin,
        "cosface_loss margin",
        low=0.0,
        low_inclusive=True,
        meaning="m is subtracted from the cosine of each row's own class; PML's default is 0.35",
    )
    _check_scale(scale, "cosface_loss")
    margin = _or_float32(margin)
    return _cosine_softmax_loss(
        embeddings,
        labels,
        weights,
        kind="cosface",
        scale=_or_float32(scale),
        margin=margin,
        mask=mask,
        proxy_mask=proxy_mask,
    )


def arcface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    margin: float = 28.6,
    scale: float = 64.0,
    mask: jax.Array | None = None,
    proxy_mask: jax.Array | None = None,
) -> jax.Array:
    r"""ArcFace / additive angular margin loss (Deng et al., CVPR 2019): PML's ``ArcFaceLoss``.

    ``margin`` is in DEGREES, as in PML (28.6° ≈ 0.5 rad, the paper's m = 0.5); ``m`` below is
    it in radians. With ``cos_ic = x̂_i·ŵ_c``, ``t_i = clip(cos_{i,y_i}, -1, 1)`` and
    ``θ_i = arccos t_i``, the target logit is ``s ψ(t_i)`` with PML's monotone continuation::

        ψ(t) = cos(θ + m)        if θ ≤ π - m
               t - m sin m       otherwise
        L = 1/N Σ_i -log( exp(s ψ(t_i)) / (exp(s ψ(t_i)) + Σ_{c≠y_i} exp(s cos_ic)) )

    the mean over the ``N`` unmasked rows (PML's ``MeanReducer``). ``cos(θ + m)`` is evaluated as
    ``t cos m - sqrt(1 - t²) sin m`` (no ``arccos``). PML's ``W`` (``(d, C)``) is ``weights.T``.

    Unlike PML, the derivative stays finite when a target cosine reaches ±1 (an embedding on its
    own weight vector): ``dψ/dt = cos m + t sin m / sqrt(1 - t²)`` is taken with ``1 - t²`` floored
    at ``2⁻²³`` (which changes no float32 cosine strictly inside ``(-1, 1)``), where PML's
    ``arccos`` gives an infinite derivative (and NaN gradients); and a cosine that rounding puts
    just past ±1 gets the derivative at ±1, where PML's clamp gives 0.

    Args:
      embeddings: ``(B, d)`` float, any scale (normalised inside; bf16 accepted, math in fp32).
      labels: ``(B,)`` int in ``[0, C)``.
      weights: ``(C, d)`` float, one row per class (normalised inside): a proxy array.
      margin: additive angular margin in degrees, in ``[0, 180]`` (PML: 28.6).
      scale: ``s > 0`` (PML: 64).
      mask: optional ``(B,)`` bool; a False row counts in no mean and gets zero gradient.
      proxy_mask: optional ``(C,)`` bool; a False class (padding) is left out of every softmax
        and gets zero gradient.

    Returns:
      A float32 scalar: 0 when every row is masked; NaN when an unmasked row or an unmasked weight
      row holds a NaN or an inf.

    Raises:
      ValueError: as ``normalized_softmax_loss``.
      LossHyperparameterError: a concrete ``margin`` outside ``[0, 180]`` degrees or ``scale ≤ 0``
        (or a non-finite one).
    """
    _common.check_hyperparameter(
        margin,
        "arcface_loss margin",
        low=0.0,
        low_inclusive=True,
        high=180.0,
        meaning="the angular margin in degrees, as in PML (28.6° ≈ 0.5 rad); not radians",
    )
    _check_scale(scale, "arcface_loss")
    concrete_margin = _concrete(margin)
    if concrete_margin is not None:
        radians = math.radians(concrete_margin)
    else:
        radians = jnp.deg2rad(jnp.asarray(margin, jnp.float32))
    return _cosine_softmax_loss(
        embeddings,
        labels,
        weights,
        kind="arcface",
        scale=_or_float32(scale),
        margin=radians,
        mask=mask,
        proxy_mask=proxy_mask,
    )


# --------------------------------------------------------------------------------------------
# Shared pieces (soft_triple.py uses them too)


def _concrete(value) -> float | None:
    """``float(value)`` when it is a concrete number, None when it is traced."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _or_float32(value):
    """A concrete hyperparameter as a Python float, a traced one as a float32 array."""
    concrete = _concrete(value)
    return concrete if concrete is not None else jnp.asarray(value, jnp.float32)


def _check_scale(scale, name: str) -> None:
    _common.check_hyperparameter(
        scale,
        f"{name} scale",
        low=0.0,
        low_inclusive=False,
        meaning="s multiplies the cosines inside the softmax; PML's default is 64",
    )


def _check_inputs(embeddings, labels, weights, mask, rows_per_class: int = 1) -> int:
    """Validate the inputs (shapes always, labels when concrete); return the number of classes."""
    _common.check_embeddings(embeddings)
    _common.check_proxies(weights, embeddings.shape[1], name="weights")
    num_rows = weights.shape[0]
    if num_rows < 1 or num_rows % rows_per_class:
        per_class = "" if rows_per_class == 1 else f" ({rows_per_class} consecutive rows per class)"
        raise ValueError(
            f"weights must have a positive multiple of {rows_per_class} rows{per_class}, got shape "
            f"{weights.shape}; pad whole classes (and mask them with proxy_mask)."
        )
    num_classes = num_rows // rows_per_class
    _common.check_labels(labels, embeddings.shape[0], num_classes, mask=mask)
    return num_classes


def _prepare(embeddings, weights, mask):
    """fp32 unit rows (masked rows zeroed), fp32 weights, the row mask and row weights 1/N."""
    mask = _common.resolve_mask(mask, embeddings.shape[0])
    x = _common.l2_normalize(_common.zero_masked_rows(embeddings.astype(jnp.float32), mask))
    count = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    row_weight = jnp.where(mask, 1.0 / count, 0.0)
    return x, weights.astype(jnp.float32), mask, row_weight


def _inverse_norms(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(1/max(‖w_c‖, ε), ‖w_c‖ ≥ ε)`` per row, overflow-safe (as ``proxy_anchor``'s)."""
    sq_norm = jnp.einsum("cd,cd->c", w, w, precision=_common.FULL_PRECISION)
    scale, sq_norm = _common.overflow_safe_sq_norm(w, 1, sq_norm[:, None])
    scale, sq_norm = scale[:, 0], sq_norm[:, 0]
    inv_norm = jax.lax.rsqrt(jnp.maximum(sq_norm, _common.NORM_EPS**2)) * scale
    # ``sq_norm`` is that of t_c w_c, which is ≥ 4 whenever t_c ≠ 1.
    return inv_norm, sq_norm >= _common.NORM_EPS**2


def _project_weight_gradient(w, inv_norm, has_radial, grad_raw, row_mask=None):
    """``∂L/∂w_c = g_c - ŵ_c (ŵ_c·g_c)`` from ``g = (∂L/∂(x̂·w))ᵀ x̂`` (the normalisation's Jacobian).

    With ``cos_ic = r_c x̂_i·w_c``: ``∂cos_ic/∂w_c = r_c x̂_i - r_c² (x̂_i·w_c) w_c``, so with
    ``G_ic = ∂L/∂cos_ic`` and ``g_c = Σ_i G_ic r_c x̂_i`` the radial coefficient
    ``r_c² Σ_i G_ic (x̂_i·w_c) = r_c (ŵ_c·g_c)``: a ``(C, d)`` row product, not a column sum over
    ``(B, C)``. It is taken on ``w`` itself (``r_c (w_c·g_c)``) so that no normalised ``(C, d)``
    copy is written: one pass for the row products, one for the result. Below the normalisation
    epsilon ``ŵ = w/ε`` is linear in ``w``: nothing to remove. Rows outside ``row_mask`` get 0.
    """
    radial = inv_norm * jnp.einsum("cd,cd->c", w, grad_raw, precision=_common.FULL_PRECISION)
    return _remove_radial(w, inv_norm, has_radial, grad_raw, radial, row_mask)


def _remove_radial(w, inv_norm, has_radial, grad_raw, radial, row_mask=None):
    """``g_c - ŵ_c radial_c`` given ``radial_c = r_c (ŵ_c·g_c)`` however it was computed (0 where
    the row is below the normalisation epsilon; rows outside ``row_mask`` get 0)."""
    radial = jnp.where(has_radial, radial, 0.0)
    grad = grad_raw - (w * inv_norm[:, None]) * radial[:, None]
    if row_mask is not None:
        grad = jnp.where(row_mask[:, None], grad, 0.0)
    return grad


def _zero_padding(w, row_mask):
    """Padding rows replaced by zeros (``jnp.where``): whatever they hold (even NaN) reaches neither
    the value nor, through the products of the backward pass, any gradient."""
    return jnp.where(row_mask[:, None], w, jnp.zeros_like(w))


# ``exp`` of float32 underflows below about -87 (and loses precision in subnormals before that).
# When every logit of a row lies within this distance below a known upper bound, the bound can
# serve as the shift of the log-sum-exp, which saves a pass over (B, C) for the row maximum.
_FIXED_SHIFT_RANGE = 80.0


def _row_logsumexp(logits: jax.Array, fixed_shift: float | None = None) -> jax.Array:
    """``log Σ_c exp(logits_ic)`` per row; ``-inf`` entries count as absent.

    ``fixed_shift``: an upper bound of every logit with every finite logit at most
    ``_FIXED_SHIFT_RANGE`` below it (the caller knows the range); otherwise the row maximum.
    """
    if fixed_shift is None:
        shift = jnp.max(logits, axis=1)
        shift = jnp.where(jnp.isneginf(shift), 0.0, shift)  # a row with no class at all: log 0 = -inf
    else:
        shift = jnp.full(logits.shape[:1], fixed_shift, logits.dtype)
    total = jnp.sum(jnp.exp(logits - shift[:, None]), axis=1)
    return shift + jnp.log(total)


def _targets(labels, num_classes: int, class_mask):
    """``(index, valid)``: the label clipped into range, and whether it names an unmasked class."""
    labels = jnp.asarray(labels)
    index = jnp.clip(labels, 0, num_classes - 1)
    valid = (labels >= 0) & (labels < num_classes) & class_mask[index]
    return index, valid


def _is_target(index, valid, num_classes: int):
    return (index[:, None] == jnp.arange(num_classes)[None, :]) & valid[:, None]


# --------------------------------------------------------------------------------------------
# ψ, the target cosine after the margin


@jax.custom_jvp
def _sine_of_angle(t: jax.Array) -> jax.Array:
    """``sin(arccos t) = sqrt(1 - t²)`` for ``t`` in ``[-1, 1]``, with ``1 - t²`` floored in the derivative."""
    return jnp.sqrt(jnp.maximum(1.0 - t * t, 0.0))


@_sine_of_angle.defjvp
def _sine_of_angle_jvp(primals, tangents):
    (t,), (dt,) = primals, tangents
    return _sine_of_angle(t), -t * jax.lax.rsqrt(jnp.maximum(1.0 - t * t, _SIN_FLOOR)) * dt


def _target_cosine(kind: str, margin, t: jax.Array) -> jax.Array:
    """ψ(t): the target cosine after the margin (before the scale)."""
    if kind == "plain":
        return t
    if kind == "cosface":
        return t - margin
    # ArcFace. The value of t is clamped to [-1, 1] as PML does; its derivative passes unchanged.
    t = t + jax.lax.stop_gradient(jnp.clip(t, -1.0, 1.0) - t)
    if isinstance(margin, float):  # the same float32 constants as _target_cosine_derivative
        cos_m, sin_m = math.cos(margin), math.sin(margin)
    else:
        cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
    # θ ≤ π - m  ⇔  cos θ ≥ cos(π - m) = -cos m   (arccos is decreasing)
    return jnp.where(t >= -cos_m, t * cos_m - _sine_of_angle(t) * sin_m, t - margin * sin_m)


def _target_cosine_derivative(kind: str, margin: float, t: jax.Array) -> jax.Array:
    """dψ/dt (what autodiff of ``_target_cosine`` gives, written out)."""
    if kind != "arcface":
        return jnp.ones_like(t)
    t = jnp.clip(t, -1.0, 1.0)
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    inner = cos_m + t * sin_m * jax.lax.rsqrt(jnp.maximum(1.0 - t * t, _SIN_FLOOR))
    return jnp.where(t >= -cos_m, inner, 1.0)


# --------------------------------------------------------------------------------------------
# NormalizedSoftmax / CosFace / ArcFace


def _cosine_softmax_loss(embeddings, labels, weights, *, kind, scale, margin, mask, proxy_mask):
    num_classes = _check_inputs(embeddings, labels, weights, mask)
    padded = proxy_mask is not None
    class_mask = _common.resolve_proxy_mask(proxy_mask, num_classes)
    x, w, mask, row_weight = _prepare(embeddings, weights, mask)
    labels = jnp.asarray(labels)
    if isinstance(scale, float) and isinstance(margin, float):
        spec = _CosineSpec(kind, scale, margin, padded)
        return _cosine_direct(x, w, labels, mask, row_weight, class_mask, spec)
    if padded:
        w = _zero_padding(w, class_mask)
    return _cosine_autodiff(x, w, labels, mask, row_weight, class_mask, kind, scale, margin)


class _CosineSpec(NamedTuple):
    kind: str  # "plain", "cosface" or "arcface"
    scale: float
    margin: float  # cosine margin (CosFace) or angular margin in radians (ArcFace)
    padded: bool = False  # a proxy mask was given: padding rows are zeroed inside

    def fixed_shift(self) -> float | None:
        """``s`` when all logits lie in ``[s - _FIXED_SHIFT_RANGE, s]``, else None (row maxima).

        Cosines lie in ``[-1, 1]`` (up to rounding), so every logit is at most ``s``, and at least
        ``-s (1 + δ)`` with ``δ = m`` (CosFace's target), ``m sin m`` (ArcFace's, at θ = π) or 0.
        """
        extra = {"plain": 0.0, "cosface": self.margin, "arcface": self.margin * math.sin(self.margin)}
        if self.scale * (2.0 + extra[self.kind]) <= _FIXED_SHIFT_RANGE:
            return self.scale
        return None


def _cosine_autodiff(x, w, labels, mask, row_weight, class_mask, kind, scale, margin) -> jax.Array:
    """The plain formulation, differentiated automatically (traced hyperparameters)."""
    num_classes = w.shape[0]
    cos = jnp.matmul(x, _common.l2_normalize(w).T, precision=_common.FULL_PRECISION)
    index, valid = _targets(labels, num_classes, class_mask)
    is_target = _is_target(index, valid, num_classes)
    target_cos = jnp.take_along_axis(cos, index[:, None], axis=1)[:, 0]
    target_logit = scale * _target_cosine(kind, margin, target_cos)
    logits = jnp.where(is_target, target_logit[:, None], scale * cos)
    logits = jnp.where(class_mask[None, :], logits, -jnp.inf)
    per_row = jax.nn.logsumexp(logits, axis=1) - jnp.where(valid, target_logit, 0.0)
    return jnp.sum(jnp.where(mask, per_row * row_weight, 0.0))


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _cosine_direct(x, w, labels, mask, row_weight, class_mask, spec: _CosineSpec) -> jax.Array:
    """The loss of unit rows ``x`` (B, d) and raw weights ``w`` (C, d), concrete hyperparameters."""
    return _CosineTerms.compute(x, w, labels, mask, row_weight, class_mask, spec).value


@_cosine_direct.defjvp
def _cosine_direct_jvp(spec, primals, tangents):
    x, w, labels, mask, row_weight, class_mask = primals
    dx, dw = tangents[0], tangents[1]
    terms = _CosineTerms.compute(x, w, labels, mask, row_weight, class_mask, spec)
    grad_x, grad_w = terms.gradients(spec)
    tangent = jnp.vdot(grad_x, dx, precision=_common.FULL_PRECISION) + jnp.vdot(
        grad_w, dw, precision=_common.FULL_PRECISION
    )
    return terms.value, tangent


class _CosineTerms(NamedTuple):
    """What the value and the gradients share. ``sims`` is ``x̂·w`` (B, C), before the inverse norms."""

    value: jax.Array
    x: jax.Array
    w: jax.Array
    inv_norm: jax.Array
    has_radial: jax.Array
    sims: jax.Array
    is_target: jax.Array
    target_cos: jax.Array
    class_mask: jax.Array
    lse: jax.Array
    coef: jax.Array  # ∂L/∂(per-row loss): 1/N on unmasked rows, 0 elsewhere

    @staticmethod
    def logits(sims, inv_norm, is_target, target_logit, class_mask, scale):
        """``z`` (B, C): ``s·cos``, the target's ``s·ψ(t)``, ``-inf`` for padding classes."""
        z = jnp.where(is_target, target_logit[:, None], scale * (sims * inv_norm[None, :]))
        return jnp.where(class_mask[None, :], z, -jnp.inf)

    @classmethod
    def compute(cls, x, w, labels, mask, row_weight, class_mask, spec: _CosineSpec) -> _CosineTerms:
        num_classes = w.shape[0]
        if spec.padded:
            w = _zero_padding(w, class_mask)
        inv_norm, has_radial = _inverse_norms(w)
        sims = jnp.matmul(x, w.T, precision=_common.FULL_PRECISION)
        index, valid = _targets(labels, num_classes, class_mask)
        is_target = _is_target(index, valid, num_classes)
        # Each row's own cosine is gathered (B values), not masked out of (B, C).
        target_cos = jnp.take_along_axis(sims, index[:, None], axis=1)[:, 0] * inv_norm[index]
        target_logit = spec.scale * _target_cosine(spec.kind, spec.margin, target_cos)
        logits = cls.logits(sims, inv_norm, is_target, target_logit, class_mask, spec.scale)
        lse = _row_logsumexp(logits, spec.fixed_shift())
        per_row = lse - jnp.where(valid, target_logit, 0.0)
        coef = jnp.where(mask, row_weight, 0.0)
        value = jnp.sum(jnp.where(mask, per_row * coef, 0.0))
        return cls(
            value, x, w, inv_norm, has_radial, sims, is_target, target_cos, class_mask, lse, coef
        )  # fmt: skip

    def gradients(self, spec: _CosineSpec) -> tuple[jax.Array, jax.Array]:
        """``(∂L/∂x̂, ∂L/∂w)``, shapes ``(B, d)`` and ``(C, d)``.

        ``∂L/∂cos_ic = s·coef_i·(p_ic - [c = y_i])``, times ``ψ'(t_i)`` at ``c = y_i``, with ``p``
        the row softmax of ``z``; then ``∂L/∂x̂ = (G r) w`` and ``∂L/∂w`` from ``(G r)ᵀ x̂``
        (``_project_weight_gradient``).
        """
        target_logit = spec.scale * _target_cosine(spec.kind, spec.margin, self.target_cos)
        z = self.logits(self.sims, self.inv_norm, self.is_target, target_logit, self.class_mask, spec.scale)
        p = jnp.exp(z - self.lse[:, None])
        slope = _target_cosine_derivative(spec.kind, spec.margin, self.target_cos)
        grad_z = jnp.where(self.is_target, (p - 1.0) * slope[:, None], p)
        # Masked rows (coef 0) get exact zeros, whatever p holds.
        factor = (spec.scale * self.coef)[:, None] * self.inv_norm[None, :]
        grad_sims = jnp.where(self.coef[:, None] > 0, grad_z * factor, 0.0)
        grad_x = jnp.matmul(grad_sims, self.w, precision=_common.FULL_PRECISION)
        grad_raw = jnp.matmul(grad_sims.T, self.x, precision=_common.FULL_PRECISION)
        row_mask = self.class_mask if spec.padded else None
        return grad_x, _project_weight_gradient(self.w, self.inv_norm, self.has_radial, grad_raw, row_mask)
