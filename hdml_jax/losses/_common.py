"""Shared helpers of the loss functions: input validation, masks, safe normalisation, precision.

Validation runs on shapes always (they are static under ``jax.jit``) and on values only when the
values are concrete. Under ``jax.jit`` the labels are tracers, so a label outside ``[0, K)`` cannot
raise; it then simply matches no proxy (its one-hot row is all zeros). Validate labels once on the
host (``check_labels``) when they come from an untrusted source.

Similarity products run at HIGHEST precision: every similarity / distance matmul of the losses,
the retrieval metrics and k-means passes ``precision=FULL_PRECISION`` (see below).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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


def is_concrete(x) -> bool:
    """True when ``x`` holds actual values (not a tracer inside jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
    """``x / max(‖x‖, eps)`` along ``axis``, with a finite gradient at ``x = 0``."""
    sq_norm = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


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
