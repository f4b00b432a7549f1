"""Global descriptors of an NHWC feature map ``x`` of shape ``(N, H, W, C)`` → ``(N, C)``.

With ``x`` clipped at ``eps`` first (GeM only, so the power is defined)::

    SPoC  f_c = mean_{h,w} x_hwc                        (p = 1)
    MAC   f_c = max_{h,w}  x_hwc                        (p = ∞)
    GeM   f_c = (mean_{h,w} x_hwc^p)^{1/p}              (p = 3 in CGD; fixed or learnable)
    GAP+GMP   mean + max (Proxy-Anchor's pooling)
    MAC+LN    (f - mean_c f) / sqrt(var_c f + 1e-5), f = MAC   (ProxyNCA++: max pooling, then
              LayerNorm without affine parameters, euwern/proxynca_pp networks.py:15-22, 38-39)

All reductions run in float32 whatever the feature map's dtype, or in float64 for a float64 map
(a float64 model under JAX's x64 mode): ``at_least_float32``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

GEM_EPS = 1e-6


def at_least_float32(x: jax.Array) -> jax.Array:
    """``x`` in float32 if it is narrower (bfloat16 maps are pooled in float32), else as it is."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def spoc(x: jax.Array) -> jax.Array:
    """Sum-pooled (average) convolutional features."""
    return jnp.mean(at_least_float32(x), axis=(1, 2))


def mac(x: jax.Array) -> jax.Array:
    """Maximum activations of convolutions.

    Taken as a gather at each channel's argmax (the first on ties), so the gradient flows to that
    one position, as PyTorch's max pooling routes it. ``jnp.max``'s own gradient instead finds the
    maximum again by comparing the operand with the result, and a compiler that evaluates the
    operand twice with different rounding (XLA:CPU without optimisation does, on ResNet features)
    finds no position equal: 0/0, a NaN gradient for the whole backbone.
    """
    x = at_least_float32(x)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    index = jax.lax.stop_gradient(jnp.argmax(flat, axis=1))
    return jnp.take_along_axis(flat, index[:, None, :], axis=1)[:, 0, :]


def gem(x: jax.Array, p: float | jax.Array = 3.0, eps: float = GEM_EPS) -> jax.Array:
    """Generalised mean pooling, ``(mean clip(x, eps)^p)^{1/p}``.

    Evaluated as ``m · (mean (x/m)^p)^{1/p}`` with ``m`` the per-channel maximum, which is the
    same number but cannot overflow for large activations or a large (learned) ``p``.
    """
    x = jnp.maximum(at_least_float32(x), eps)
    peak = jax.lax.stop_gradient(jnp.max(x, axis=(1, 2), keepdims=True))
    return peak[:, 0, 0, :] * jnp.mean((x / peak) ** p, axis=(1, 2)) ** (1.0 / p)


def gap_gmp(x: jax.Array) -> jax.Array:
    """Global average plus global max pooling."""
    return spoc(x) + mac(x)


def mac_layernorm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """MAC followed by a LayerNorm over channels without scale or bias (ProxyNCA++'s head)."""
    f = mac(x)
    mean = jnp.mean(f, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(f - mean), axis=-1, keepdims=True)
    return (f - mean) * jax.lax.rsqrt(var + eps)


class GeM(nn.Module):
    """GeM with ``p`` fixed (default) or a learnable scalar parameter ``p`` initialised at ``p``."""

    p: float = 3.0
    learnable: bool = False
    eps: float = GEM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.param("p", nn.initializers.constant(self.p), ()) if self.learnable else self.p
        return gem(x, p, self.eps)


def already_pooled(x: jax.Array) -> jax.Array:
    """``"none"``: the backbone's output is already one vector per image (a ViT's class token)."""
    if x.ndim != 2:
        raise ValueError(
            f"model.pooling='none' takes pooled (B, D) features, got shape {x.shape}: a feature map "
            "needs a pooling (gap_gmp, spoc, mac, gem)."
        )
    return x


POOLINGS = {
    "spoc": spoc,
    "mac": mac,
    "gem": gem,
    "gap_gmp": gap_gmp,
    "mac_layernorm": mac_layernorm,
    "none": already_pooled,
}
