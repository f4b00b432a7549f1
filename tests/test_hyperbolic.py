"""``hdml_jax.hyperbolic`` against the official hyptorch semantics (``tests/torch_hyperbolic.py``,
PyTorch in float64) and a float64 NumPy loop over the textbook formulas: values and gradients,
inside the ball, near its boundary and as the curvature goes to 0.

Our side computes in float32: each value is held to ``k·ε₃₂·√n`` of its scale (``assert_close``)
with ``n`` the longest sum behind it (d = 16 coordinates) and ``k`` covering the chained stages
(norms, the Möbius quotient, artanh, whose slope 1/(1 − z²) amplifies the error of z near the
boundary: those points get their own, wider bound).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hdml_jax import hyperbolic as hyp
from tests import torch_hyperbolic as ref
from tests.numerics import assert_close

D = 16
EPS32 = float(np.finfo(np.float32).eps)


def _points(n: int, radius: float, seed: int) -> np.ndarray:
    """``n`` points of norm uniform in ``(0, radius)``, float64."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n, D))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions * rng.uniform(0.05, 1.0, (n, 1)) * radius


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def _numpy_distance(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """The textbook d_c(x, y) with the official guards, one pair at a time, float64."""
    out = np.empty((len(x), len(y)))
    for i, a in enumerate(x):
        for j, b in enumerate(y):
            a_, b_ = -a, b
            xy, x2, y2 = a_ @ b_, a_ @ a_, b_ @ b_
            m = ((1 + 2 * c * xy + c * y2) * a_ + (1 - c * x2) * b_) / (
                1 + 2 * c * xy + c**2 * x2 * y2 + 1e-5
            )
            z = np.clip(np.sqrt(c) * np.linalg.norm(m), -1 + 1e-5, 1 - 1e-5)
            out[i, j] = 2 / np.sqrt(c) * np.arctanh(z)
    return out


@pytest.mark.parametrize("c", [0.1, 1.0])
def test_maps_and_distances_equal_the_official_semantics(c):
    radius = 1 / np.sqrt(c)
    x, y = _points(12, 0.9 * radius, 0), _points(9, 0.9 * radius, 1)
    u = np.random.default_rng(2).normal(size=(12, D)) * 2
    assert_close(
        hyp.expmap0(jnp.asarray(u, jnp.float32), c), ref.expmap0(_t(u), c).detach().numpy(), n_terms=D, k=16
    )
    assert_close(
        hyp.project(jnp.asarray(u, jnp.float32), c), ref.project(_t(u), c).detach().numpy(), n_terms=D, k=16
    )
    assert_close(
        hyp.mobius_add(jnp.asarray(x, jnp.float32), jnp.asarray(y[:1], jnp.float32), c),
        ref.mobius_add(_t(x), _t(y[:1]), c).detach().numpy(),
        n_terms=D,
        k=32,
    )
    official = ref.distance_matrix(_t(x), _t(y), c).detach().numpy()
    np.testing.assert_allclose(official, _numpy_distance(x, y, c), rtol=1e-12)
    ours = hyp.distance_matrix(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), c)
    pairwise = hyp.distance(jnp.asarray(x, jnp.float32)[:, None], jnp.asarray(y, jnp.float32)[None], c)
    # Points up to 0.9 of the radius: artanh's slope 1/(1 − z²) ≤ 1/(1 − 0.99²) ≈ 50 on z's error.
    for value in (ours, pairwise):
        assert_close(value, official, n_terms=D, k=64 * 50)


def test_to_poincare_clips_projects_and_rescales_only_the_gradient():
    c, clip_r = 0.1, 2.3
    x = np.random.default_rng(3).normal(size=(10, D)) * np.array([0.1, 1, 3, 10, 30] * 2)[:, None]
    weights = np.random.default_rng(4).normal(size=(10, D))
    for riemannian in (True, False):

        def ours_fn(v, r=riemannian):
            return jnp.sum(jnp.asarray(weights, jnp.float32) * hyp.to_poincare(v, c, clip_r, r))

        value, grad = jax.jit(jax.value_and_grad(ours_fn))(jnp.asarray(x, jnp.float32))
        tx = _t(x)
        theirs = (torch.tensor(weights) * ref.to_poincare(tx, c, clip_r, riemannian)).sum()
        theirs.backward()
        assert_close(value, theirs.item(), n_terms=10 * D, k=32, scale=float(np.abs(weights).sum()))
        assert_close(grad, tx.grad.numpy(), n_terms=D, k=64)
    points = hyp.to_poincare(jnp.asarray(x, jnp.float32), c, clip_r)
    norms = np.linalg.norm(np.asarray(points), axis=1)
    assert (norms < 1 / np.sqrt(c)).all() and np.all(np.diff(norms[:5]) > 0)  # inside, order kept
    # Riemannian scaling: the same forward, the gradient × (1 − c‖y‖²)² / 4.
    plain = jax.jit(jax.grad(lambda v: jnp.sum(hyp.to_poincare(v, c, clip_r, False) * weights)))(
        jnp.asarray(x, jnp.float32)
    )
    scaled = jax.jit(jax.grad(lambda v: jnp.sum(hyp.to_poincare(v, c, clip_r, True) * weights)))(
        jnp.asarray(x, jnp.float32)
    )
    factor = (1 - c * norms**2) ** 2 / 4
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(plain) * factor[:, None], rtol=1e-5, atol=1e-7)


def test_gradients_of_distances_equal_the_official_backward():
    c = 0.1
    radius = 1 / np.sqrt(c)
    x, y = _points(8, 0.8 * radius, 5), _points(6, 0.8 * radius, 6)
    w = np.random.default_rng(7).normal(size=(8, 6))

    def ours(a, b):
        return jnp.sum(jnp.asarray(w, jnp.float32) * hyp.distance_matrix(a, b, c))

    gx, gy = jax.jit(jax.grad(ours, argnums=(0, 1)))(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    tx, ty = _t(x), _t(y)
    (torch.tensor(w) * ref.distance_matrix(tx, ty, c)).sum().backward()
    # artanh's slope up to 1/(1 − 0.96²) ≈ 12.8, twice (the value and its derivative).
    scale = float(np.abs(tx.grad.numpy()).max())
    assert_close(gx, tx.grad.numpy(), n_terms=6 * D, k=64 * 13, scale=scale)
    assert_close(gy, ty.grad.numpy(), n_terms=8 * D, k=64 * 13, scale=float(np.abs(ty.grad.numpy()).max()))


def test_near_the_boundary_and_beyond_the_clamp():
    c = 1.0
    edge = np.eye(D)[:4] * np.array([0.999, 0.99999, 1.5, 40.0])[:, None]  # the last two outside
    projected = np.asarray(hyp.project(jnp.asarray(edge, jnp.float32), c))
    assert np.allclose(np.linalg.norm(projected, axis=1), [0.999, 0.999, 0.999, 0.999], atol=1e-6)
    d = np.asarray(hyp.distance_matrix(jnp.asarray(projected, jnp.float32), jnp.zeros((1, D)), c))
    assert np.isfinite(d).all()
    # artanh clamps z at 1 − 1e-5 but, as the official backward, keeps a finite slope there.
    z = jnp.asarray([0.5, 1 - 1e-7, 2.0], jnp.float32)
    value, slope = jax.jit(jax.value_and_grad(lambda v: jnp.sum(hyp.artanh(v))))(z)
    tz = _t(np.asarray(z, np.float64))
    ref.artanh(tz).sum().backward()
    # 1 − z² at the clamp in float32: relative error ε / (1 − z²) ≈ 1.2e-7 / 2e-5 ≈ 6e-3.
    np.testing.assert_allclose(np.asarray(slope), tz.grad.numpy(), rtol=2 * EPS32 / 2e-5)
    assert np.isfinite(np.asarray(value))
    # The origin: expmap0 and to_poincare have finite gradients there (torch's norm backward is 0).
    grad = jax.jit(jax.grad(lambda v: jnp.sum(hyp.to_poincare(v, c, 2.3))))(jnp.zeros((2, D)))
    assert np.isfinite(np.asarray(grad)).all()


def test_small_curvature_is_euclidean():
    c = 1e-8
    x, y = _points(5, 1.0, 8), _points(4, 1.0, 9)
    d = np.asarray(hyp.distance_matrix(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), c))
    euclid = 2 * np.linalg.norm(x[:, None] - y[None], axis=-1)
    np.testing.assert_allclose(d, euclid, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(hyp.expmap0(jnp.asarray(x, jnp.float32), c)), x, rtol=1e-5)


def test_the_gram_form_ranks_like_the_official_distances():
    """``distance_from_gram`` (the retrieval path) against the official ``(B, C, d)`` distances:
    within its cancellation error √(ε(‖x‖² + ‖y‖²)) (module docstring), and no NaN gradient
    where two points coincide."""
    c = 0.1
    x, y = _points(20, 2.5, 11), _points(15, 2.5, 12)
    y[:3] = x[:3]  # duplicates
    x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    gram = hyp.distance_from_gram(jnp.sum(x32**2, -1), jnp.sum(y32**2, -1), x32 @ y32.T, c)
    official = ref.distance_matrix(_t(x), _t(y), c).detach().numpy()
    # d = 2/√c · artanh(z): an error δ of √c‖(−x) ⊕ y‖ moves d by 2/√c · δ / (1 − z²), z the
    # largest of these pairs; δ ≈ √c · √(ε (‖x‖² + ‖y‖²)) from the cancellation (×4 margin).
    z = np.tanh(np.sqrt(c) * official.max() / 2)
    atol = 4 * np.sqrt(EPS32 * 2 * 2.5**2) * 2 / (1 - z**2)
    np.testing.assert_allclose(np.asarray(gram), official, rtol=0, atol=atol)
    grad = jax.jit(
        jax.grad(lambda a: jnp.sum(hyp.distance_from_gram(jnp.sum(a**2, -1), jnp.sum(a**2, -1), a @ a.T, c)))
    )(x32)
    assert np.isfinite(np.asarray(grad)).all()


def test_functions_are_jit_and_vmap_safe():
    x = jnp.asarray(_points(6, 2.0, 10), jnp.float32)
    eager = hyp.distance_matrix(x, x, 0.1)
    # Equal points: 0 up to the rounding of the two Möbius coefficients (1 − c‖x‖² twice).
    assert np.abs(np.diag(np.asarray(eager))).max() < 8 * EPS32 * 2 / 0.1**0.5
    np.testing.assert_allclose(jax.jit(hyp.distance_matrix, static_argnums=2)(x, x, 0.1), eager, rtol=1e-6)
    rows = jax.vmap(lambda a: hyp.distance(a, x, 0.1))(x)
    np.testing.assert_allclose(np.asarray(rows), np.asarray(eager), rtol=1e-5, atol=1e-6)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(hyp.distance_matrix(a, a, 0.1))))(x)
    assert np.isfinite(np.asarray(grad)).all()  # d(x, x) = 0: torch.norm's backward gives 0 there
