"""Shared helpers of the loss functions: input validation, masks, safe normalisation, precision.

Validation runs on shapes always (they are static under ``jax.jit``) and on values only when the
values are concrete. Under ``jax.jit`` the labels are tracers, so a label outside ``[0, K)`` cannot
raise; it then simply matches no proxy (its one-hot row is all zeros). Validate labels once on the
host (``check_labels``) when they come from an untrusted source.

Similarity products run at HIGHEST precision: every similarity / distance matmul of the losses,
the retrieval metrics and k-means passes ``precision=FULL_PRECISION`` (see below).

Hyperparameters (margins, scales, temperatures, level weights) come from the config; a concrete
value outside the range in which the loss means anything raises ``LossHyperparameterError`` (a
``hdml_jax.errors.ConfigError``, hence also a ``ValueError``). Traced values are not checked.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.errors import ConfigError

# The same epsilon as ``torch.nn.functional.normalize``: a row with a smaller norm is left at
# (almost) zero instead of being blown up, and its gradient stays finite.
NORM_EPS = 1e-12

# The precision of every similarity / distance product (losses, their hand-written gradients,
# retrieval metrics, k-means). Under JAX's default precision, TPUs (and GPUs with TF32) may run a
# float32 matmul as bf16 or TF32 passes, i.e. with about 3 significant digits. The losses multiply
# cosines by α = 32 (Proxy-Anchor) or σ = 32 (Proxy-NCA) inside an ``exp``, which turns a 1e-3
# error in a cosine into a few percent in a term; nearest-neighbour ranks and k-means assignments
# flip on near ties. HIGHEST asks for true float32 everywhere; on CPU float32 matmuls are exact
# float32 anyway, so results and speed there do not change.
FULL_PRECISION = jax.lax.Precision.HIGHEST

# The dtype the losses compute in and return: float32 whatever the inputs' dtype (bfloat16 is
# widened, float64 rounded), so a loss's value does not depend on its caller's precision. A float64
# reference computation (JAX's x64 mode: the trainer's step-by-step parity with a float64 PyTorch
# loop, where float32 rounding of the loss would swamp the comparison) sets it to ``jnp.float64``
# for its whole process before anything is traced; it is read while tracing, so a loss traced
# before the change stays float32. Honoured by the losses of those parity runs
# (``proxy_anchor_loss``, ``proxy_nca_loss``, ``batch_hard_triplet_loss``,
# ``softmax_cross_entropy``); the others compute in float32 regardless.
MATH_DTYPE = jnp.float32


def is_concrete(x) -> bool:
    """True when ``x`` holds actual values (not a tracer inside jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


class LossHyperparameterError(ConfigError):
    """A loss hyperparameter (a config field such as ``loss.alpha``) outside its meaningful range."""


def check_hyperparameter(
    value,
    name: str,
    *,
    low: float,
    low_inclusive: bool,
    high: float = math.inf,
    meaning: str,
    config_field: str | None = None,
) -> None:
    """Raise ``LossHyperparameterError`` unless a concrete ``value`` is finite and in its range.

    The range is ``[low, high]`` or ``(low, high]`` (``low_inclusive``). A traced value (a
    hyperparameter passed through ``jax.jit``) cannot be checked and is let through.
    """
    if not is_concrete(value):
        return
    if math.isfinite(high):
        allowed = f"in {'[' if low_inclusive else '('}{low:g}, {high:g}]"
    else:
        allowed = f"{'>=' if low_inclusive else '>'} {low:g}"
    try:
        number = math.nan if isinstance(value, (str, bytes)) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    above_low = number >= low if low_inclusive else number > low
    if not (math.isfinite(number) and above_low and number <= high):
        where = f" (config field {config_field})" if config_field else ""
        raise LossHyperparameterError(
            f"{name}{where} must be a finite number {allowed} ({meaning}), got {value!r}."
        )


def overflow_safe_scale(x: jax.Array, axis: int = -1) -> jax.Array:
    """A power of two ``t`` per slice along ``axis`` such that ``x · t`` can be squared and summed.

    With ``m = max |x|`` over the slice: ``t = 1`` when ``m < 2``; otherwise ``t = 2^(1-e)`` for
    ``m = 1.f · 2^e``, so that ``max |x · t|`` lies in ``[2, 4)`` and ``Σ (x·t)²`` in ``[4, 16 d)``
    can neither overflow nor underflow; ``t = 0`` when ``m`` is inf or NaN (so the slice becomes
    NaN). ``t`` is a normal power of two, so ``x · t`` is exact and ``rsqrt`` of a sum scaled by
    ``t²`` is the unscaled one times ``1/t`` exactly. ``t`` carries no gradient (the callers are
    invariant to a constant scale). Shape: ``x``'s, with ``axis`` of size 1.
    """
    info = jnp.finfo(x.dtype)
    unsigned = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    largest = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True, initial=0.0))
    exponent_mask = (1 << (info.bits - info.nmant - 1)) - 1
    biased = (jax.lax.bitcast_convert_type(largest, unsigned) >> info.nmant) & exponent_mask
    bias = info.maxexp - 1
    # Biased exponent 2·bias + 1 - b is 2^(1 - (b - bias)): at least 1 (a normal number) for every
    # finite m, and 0 (the float 0.0) for inf / NaN.
    scale = jax.lax.bitcast_convert_type(((2 * bias + 1) - biased) << info.nmant, x.dtype)
    return jnp.where(biased > bias, scale, jnp.ones_like(scale))


def overflow_safe_sq_norm(
    x: jax.Array, axis: int = -1, sq_norm: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(t, Σ (t x)²)`` along ``axis`` (kept, size 1): a squared norm that cannot overflow.

    ``t = 1`` and the plain ``Σ x²`` (``sq_norm`` if given, in the same shape) while every slice's
    ``Σ x²`` is finite; otherwise (some component beyond ``~1.8e19`` in float32, or a NaN / inf)
    ``t = overflow_safe_scale(x)`` for every slice and the sum is taken again, so that
    ``‖x‖ = ‖t x‖ / t`` exactly. The second pass sits in a ``lax.cond``: ordinary inputs pay one
    reduction and a scalar predicate (under ``vmap`` with a batched ``x`` both branches run). Not
    meant to be differentiated through (``t`` is piecewise constant; the callers write their
    derivatives out).
    """
    if sq_norm is None:
        sq_norm = jnp.sum(x * x, axis=axis, keepdims=True)

    def unscaled(x, sq_norm):
        return jnp.ones_like(sq_norm), sq_norm

    def rescaled(x, sq_norm):
        scale = overflow_safe_scale(x, axis)
        y = x * scale
        return scale, jnp.sum(y * y, axis=axis, keepdims=True).astype(sq_norm.dtype)

    return jax.lax.cond(jnp.all(jnp.isfinite(sq_norm)), unscaled, rescaled, x, sq_norm)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
    """``x / max(‖x‖, eps)`` along ``axis``, with a finite gradient at ``x = 0``.

    Overflow-safe (``overflow_safe_sq_norm``): components above ``~1.8e19`` (float32) overflow
    ``Σ x²``, which would turn the row into 0; such inputs are rescaled by exact powers of two
    before summing and normalise like any other. Ordinary inputs give the very bits of
    ``x · rsqrt(max(Σ x², eps²))`` at about the same cost. A slice holding a NaN or an inf comes
    out all NaN.

    The derivative is written out (``custom_jvp``): with ``y = t x``, ``x̂ = y / max(‖y‖, eps)``
    and ``r = 1 / max(‖y‖, eps)``, ``dx̂ = t dx · r - x̂ (x̂ · t dx) r`` when ``‖y‖ ≥ eps`` and
    ``dx̂ = dx · r`` below (where ``x̂ = x / eps`` is linear in ``x``).
    """
    return _l2_normalize(jnp.asarray(x), axis, eps)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _l2_normalize(x: jax.Array, axis: int, eps: float) -> jax.Array:
    return _normalize_parts(x, axis, eps)[0]


def _normalize_parts(x: jax.Array, axis: int, eps: float) -> tuple[jax.Array, ...]:
    """``(x̂, t, r, Σ y²)`` of ``l2_normalize``: see there; all but ``x̂`` have ``axis`` of size 1."""
    scale, sq_norm = overflow_safe_sq_norm(x, axis)
    # Either t = 1 or Σ y² ≥ 4 > eps², so the eps clamp keeps its meaning for the unscaled vector.
    inv_norm = jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))
    return (x * scale) * inv_norm, scale, inv_norm, sq_norm


@_l2_normalize.defjvp
def _l2_normalize_jvp(axis, eps, primals, tangents):
    (x,), (dx,) = primals, tangents
    normalized, scale, inv_norm, sq_norm = _normalize_parts(x, axis, eps)
    dy = dx * scale
    radial = jnp.sum(normalized * dy, axis=axis, keepdims=True)
    radial = jnp.where(sq_norm >= eps * eps, radial, jnp.zeros_like(radial))
    return normalized, dy * inv_norm - normalized * (radial * inv_norm)


def check_embeddings(embeddings, name: str = "embeddings") -> None:
    if jnp.ndim(embeddings) != 2:
        raise ValueError(
            f"{name} must have shape (batch, dim), got shape {jnp.shape(embeddings)}; "
            "flatten or stack your vectors first."
        )
    if not jnp.issubdtype(jnp.result_type(embeddings), jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(embeddings)}.")


def check_labels(
    labels, batch_size: int, num_classes: int | None = None, name: str = "labels", mask=None
) -> None:
    """Shape and dtype always; the range ``[0, num_classes)`` when the values are concrete.

    Rows whose ``mask`` is False are not range-checked: padding may carry any label (e.g. -1).
    """
    if jnp.ndim(labels) != 1:
        raise ValueError(f"{name} must have shape (batch,), got shape {jnp.shape(labels)}.")
    if jnp.shape(labels)[0] != batch_size:
        raise ValueError(
            f"{name} has {jnp.shape(labels)[0]} entries but there are {batch_size} embeddings; "
            "give one label per embedding row."
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"{name} must be integers, got dtype {jnp.result_type(labels)}.")
    if num_classes is not None and is_concrete(labels) and batch_size > 0:
        values = np.asarray(labels)
        if mask is not None and is_concrete(mask) and np.shape(mask) == (batch_size,):
            values = values[np.asarray(mask, bool)]
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            bad = values[(values < 0) | (values >= num_classes)]
            raise ValueError(
                f"{name} must lie in [0, {num_classes}) (one proxy per class), but found "
                f"{bad[:5].tolist()}{' ...' if bad.size > 5 else ''}; remap labels to 0..C-1 "
                "or create as many proxies as there are classes."
            )


def check_proxies(proxies, embedding_dim: int, name: str = "proxies") -> None:
    if jnp.ndim(proxies) != 2:
        raise ValueError(f"{name} must have shape (num_classes, dim), got shape {jnp.shape(proxies)}.")
    if jnp.shape(proxies)[1] != embedding_dim:
        raise ValueError(
            f"{name} have dimension {jnp.shape(proxies)[1]} but embeddings have dimension "
            f"{embedding_dim}; both must live in the same space."
        )
    if not jnp.issubdtype(jnp.result_type(proxies), jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(proxies)}.")


def resolve_proxy_mask(proxy_mask, num_proxies: int) -> jax.Array:
    """A boolean ``(num_proxies,)`` mask of the proxies that exist; all True when None.

    False marks padding (e.g. proxies padded to a multiple of the device count so that they can
    be sharded along the class axis): such a proxy takes part in no term and gets zero gradient.
    """
    if proxy_mask is None:
        return jnp.ones((num_proxies,), dtype=bool)
    if jnp.shape(proxy_mask) != (num_proxies,):
        raise ValueError(
            f"proxy_mask must have shape ({num_proxies},) (one flag per proxy), got {jnp.shape(proxy_mask)}."
        )
    return jnp.asarray(proxy_mask).astype(bool)


def resolve_mask(mask, batch_size: int) -> jax.Array:
    """A boolean ``(batch,)`` mask; all True when ``mask`` is None."""
    if mask is None:
        return jnp.ones((batch_size,), dtype=bool)
    if jnp.shape(mask) != (batch_size,):
        raise ValueError(
            f"mask must have shape ({batch_size},) (one flag per embedding row), got {jnp.shape(mask)}."
        )
    return jnp.asarray(mask).astype(bool)


def zero_masked_rows(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Replace masked-out rows by zeros.

    ``jnp.where`` (not a multiplication) so that whatever a padded row holds, it reaches neither
    the value nor, through the backward pass, any gradient.
    """
    return jnp.where(mask[:, None], x, jnp.zeros_like(x))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over ``mask``; exactly 0 when the mask is empty."""
    total = jnp.sum(jnp.where(mask, values, 0.0))
    count = jnp.sum(mask.astype(values.dtype))
    return total / jnp.maximum(count, 1.0)


def masked_logsumexp_plus_one(logits: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    """``log(1 + Σ_{mask} exp(logits))`` along ``axis``, i.e. a logsumexp with an appended zero.

    Stable for any magnitude, exactly 0 for an empty mask, and with zero gradient to masked
    entries (they are replaced by ``-inf`` before the exponent, so ``exp`` gives an exact 0).
    """
    logits = jnp.where(mask, logits, -jnp.inf)
    # ``initial=0`` is the appended zero; it also makes an empty batch well defined.
    shift = jnp.max(logits, axis=axis, keepdims=True, initial=0.0)
    shift = jax.lax.stop_gradient(shift)
    total = jnp.exp(-shift) + jnp.sum(jnp.exp(logits - shift), axis=axis, keepdims=True)
    return jnp.squeeze(jnp.log(total) + shift, axis=axis)
