"""The Poincaré ball of curvature ``c`` (Hyp, CVPR 2022; HIER, CVPR 2023) as pure JAX functions.

The formulas and the numerical guards are those of ``hyptorch/pmath.py`` and ``hyptorch/nn.py``
(identical in htdt/hyp_metric and tjddus9597/HIER-CVPR23), because the guards change values near
the boundary and the official numbers were trained with them. With ``‖·‖`` the Euclidean norm:

* ``project(x)``: ``x`` scaled onto the radius ``r = (1 − 1e-3) / √c`` where ``‖x‖ > r``
  (``‖x‖`` floored at 1e-5);
* ``expmap0(u) = tanh(√c‖u‖) · u / (√c‖u‖)``, the argument of ``tanh`` clamped to ±15 and
  ``‖u‖`` floored at 1e-5 (pmath ``_expmap0``; its docstring's ``√c/2`` is not what it computes);
* ``mobius_add(x, y) = ((1 + 2c⟨x,y⟩ + c‖y‖²) x + (1 − c‖x‖²) y) / (1 + 2c⟨x,y⟩ + c²‖x‖²‖y‖² + 1e-5)``;
* ``artanh(z) = ½ log((1 + z) / (1 − z))`` at ``z`` clamped to ``[−1 + 1e-5, 1 − 1e-5]``, with the
  official backward ``g / (1 − z²)`` at the clamped ``z`` (a gradient also beyond the clamp);
* ``distance(x, y) = 2/√c · artanh(√c ‖(−x) ⊕ y‖)``; ``distance_matrix`` is the same for every
  pair, through the ``(B, C, d)`` Möbius sums as the official ``dist_matrix`` (exact 0 for equal
  points, the losses' path); ``distance_from_gram`` gets it from ``‖x‖²``, ``‖y‖²`` and ``⟨x, y⟩``
  alone (one matrix product, the retrieval metrics' path): with ``a = 1 − 2c⟨x,y⟩ + c‖y‖²``,
  ``b = 1 − c‖x‖²``, ``‖(−x) ⊕ y‖² = (a²‖x‖² − 2ab⟨x,y⟩ + b²‖y‖²) / (1 − 2c⟨x,y⟩ + c²‖x‖²‖y‖² + 1e-5)²``,
  whose cancellation for nearly equal points leaves an absolute error of about
  ``√(ε (‖x‖² + ‖y‖²))`` in the distance (as Euclidean distances from a Gram matrix have), a
  monotone function of an error of ``ε`` in the squared terms, so rankings are as exact as the
  cosine's;
* ``to_poincare(x)`` (``ToPoincare``): ``x · min(1, clip_r / (‖x‖ + 1e-5))`` (feature clipping),
  then ``project(expmap0(·))``; with ``riemannian`` the forward value is unchanged and the
  gradient reaching it is scaled by ``(1 − c‖y‖²)² / 4`` at the output ``y`` (``RiemannianGradient``),
  in the backward pass only.

As ``c → 0`` the ball becomes Euclidean space: ``expmap0(u) → u``, ``distance(x, y) → 2‖x − y‖``.
Every function takes ``(..., d)`` arrays and is jit-, grad- and vmap-safe; the arithmetic is the
inputs' float dtype, at least float32. Tests: ``tests/test_hyperbolic.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ARTANH_CLAMP = 1e-5  # pmath.Artanh: x.clamp(-1 + 1e-5, 1 - 1e-5)
NORM_FLOOR = 1e-5  # clamp_min(..., 1e-5) of the norms in _project and _expmap0
BOUNDARY_MARGIN = 1e-3  # _project's maxnorm = (1 - 1e-3) / √c
MOBIUS_EPS = 1e-5  # the + 1e-5 of _mobius_add's denominator
TANH_CLAMP = 15.0  # pmath.tanh(x, clamp=15)
CLIP_EPS = 1e-5  # ToPoincare: torch.norm(x) + 1e-5


def _wide(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _norm(x: jax.Array, keepdims: bool = True) -> jax.Array:
    """‖x‖ along the last axis, with gradient 0 (not NaN) at x = 0, as torch.norm's backward."""
    squared = jnp.sum(x * x, axis=-1, keepdims=keepdims)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


@jax.custom_vjp
def artanh(z: jax.Array) -> jax.Array:
    """pmath's ``Artanh``: ``z`` clamped to ``±(1 − 1e-5)``, backward ``g / (1 − z_clamped²)``."""
    z = jnp.clip(z, -1 + ARTANH_CLAMP, 1 - ARTANH_CLAMP)
    return 0.5 * (jnp.log1p(z) - jnp.log1p(-z))


def _artanh_fwd(z):
    clamped = jnp.clip(z, -1 + ARTANH_CLAMP, 1 - ARTANH_CLAMP)
    return artanh(z), clamped


def _artanh_bwd(clamped, g):
    return (g / (1 - clamped * clamped),)


artanh.defvjp(_artanh_fwd, _artanh_bwd)


def project(x: jax.Array, c: float) -> jax.Array:
    """Points beyond the radius ``(1 − 1e-3)/√c`` moved onto it (pmath ``_project``)."""
    x = _wide(x)
    norm = jnp.maximum(_norm(x), NORM_FLOOR)
    radius = (1 - BOUNDARY_MARGIN) / c**0.5
    return jnp.where(norm > radius, x / norm * radius, x)


def expmap0(u: jax.Array, c: float) -> jax.Array:
    """The exponential map at the origin (pmath ``_expmap0``)."""
    u = _wide(u)
    sqrt_c = c**0.5
    norm = jnp.maximum(_norm(u), NORM_FLOOR)
    return jnp.tanh(jnp.clip(sqrt_c * norm, -TANH_CLAMP, TANH_CLAMP)) * u / (sqrt_c * norm)


def mobius_add(x: jax.Array, y: jax.Array, c: float) -> jax.Array:
    """Möbius addition ``x ⊕_c y`` (pmath ``_mobius_add``, its ``+ 1e-5`` included)."""
    x, y = _wide(x), _wide(y)
    x2 = jnp.sum(x * x, -1, keepdims=True)
    y2 = jnp.sum(y * y, -1, keepdims=True)
    xy = jnp.sum(x * y, -1, keepdims=True)
    numerator = (1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y
    return numerator / (1 + 2 * c * xy + c**2 * x2 * y2 + MOBIUS_EPS)


def distance(x: jax.Array, y: jax.Array, c: float) -> jax.Array:
    """``d_c(x, y) = 2/√c · artanh(√c ‖(−x) ⊕_c y‖)`` along the last axis (pmath ``_dist``)."""
    sqrt_c = c**0.5
    return 2 / sqrt_c * artanh(sqrt_c * _norm(mobius_add(-x, y, c), keepdims=False))


def gram_distance_matrix(x: jax.Array, y: jax.Array, c: float) -> jax.Array:
    """``(B, C)`` Poincaré distances through ``distance_from_gram`` (one matrix product; the losses
    over large sets and the retrieval metrics)."""
    x, y = _wide(x), _wide(y)
    return distance_from_gram(jnp.sum(x * x, -1), jnp.sum(y * y, -1), x @ y.T, c)


def distance_matrix(x: jax.Array, y: jax.Array, c: float) -> jax.Array:
    """``(B, C)`` Poincaré distances of ``x (B, d)`` to ``y (C, d)`` (pmath ``dist_matrix``:
    ``(B, C, d)`` memory; for large ``B·C`` see ``distance_from_gram``)."""
    return distance(x[:, None, :], y[None, :, :], c)


def mobius_difference_parts(
    x2: jax.Array, y2: jax.Array, xy: jax.Array, c: float
) -> tuple[jax.Array, jax.Array]:
    """``(‖n‖², m)`` with ``(−x) ⊕ y = n / m``, from broadcastable ``‖x‖²``, ``‖y‖²`` and ``⟨x, y⟩``
    (module docstring; ``m`` includes hyptorch's + 1e-5)."""
    a = 1 - 2 * c * xy + c * y2  # the (−x) ⊕ y coefficients of −x and y
    b = 1 - c * x2
    squared = a * a * x2 - 2 * a * b * xy + b * b * y2
    return squared, 1 - 2 * c * xy + c**2 * x2 * y2 + MOBIUS_EPS


def distance_from_gram(x2: jax.Array, y2: jax.Array, xy: jax.Array, c: float) -> jax.Array:
    """Poincaré distances from ``‖x‖² (B,)``, ``‖y‖² (C,)`` and ``⟨x, y⟩ (B, C)``: what a chunked
    matrix product gives (the retrieval metrics' path)."""
    squared, denominator = mobius_difference_parts(x2[:, None], y2[None, :], xy, c)
    positive = squared > 0  # the double where: gradient 0, not NaN, where it is 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    sqrt_c = c**0.5
    return 2 / sqrt_c * artanh(sqrt_c * norm / denominator)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def riemannian_gradient(y: jax.Array, c: float) -> jax.Array:
    """Identity forward; backward ``g · (1 − c‖y‖²)² / 4`` (pmath ``RiemannianGradient``)."""
    return y


def _riemannian_fwd(y, c):
    return y, y


def _riemannian_bwd(c, y, g):
    scale = (1 - c * jnp.sum(y * y, -1, keepdims=True)) ** 2 / 4
    return (g * scale,)


riemannian_gradient.defvjp(_riemannian_fwd, _riemannian_bwd)


def clip_features(x: jax.Array, clip_r: float) -> jax.Array:
    """Feature clipping (Guo et al. 2021, ToPoincare's ``clip_r``): ``x · min(1, r / (‖x‖ + 1e-5))``."""
    x = _wide(x)
    return x * jnp.minimum(1.0, clip_r / (_norm(x) + CLIP_EPS))


def to_poincare(x: jax.Array, c: float, clip_r: float | None = None, riemannian: bool = True) -> jax.Array:
    """``ToPoincare``: Euclidean features → points of the ball (module docstring).

    ``clip_r`` None skips the clipping (hyp_metric's ``--clip_r`` defaults to 2.3, HIER's too);
    ``riemannian``: HIER's heads and proxies use True, hyp_metric's head False.
    """
    if clip_r is not None:
        x = clip_features(x, clip_r)
    y = project(expmap0(x, c), c)
    return riemannian_gradient(y, c) if riemannian else y
