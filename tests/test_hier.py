"""``hdml_jax.losses.hier`` against HIER's official semantics (``tests/torch_hier.py``, PyTorch
float64) fed the same triplets and Gumbel noise: the candidate sets, the loss and its gradients
through ``ToPoincare`` to the raw features and LCA parameters; and the on-device sampler's law."""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hdml_jax import hyperbolic
from hdml_jax.losses import hier
from tests import torch_hier, torch_hyperbolic
from tests.numerics import assert_close

B, M, DIM, TOPK, PER_ANCHOR = 12, 16, 8, 4, 5


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    z_raw = rng.normal(size=(B, DIM)) * 1.5
    lca_raw = rng.normal(size=(M, DIM)) / np.sqrt(DIM) * 2.3 * 0.9  # HIERLoss's init scale
    labels = np.repeat(np.arange(B // 2), 2)
    return z_raw, lca_raw, labels


def test_candidate_sets_are_the_official_ones():
    rng = np.random.default_rng(1)
    similarity = rng.uniform(size=(20, 20)).astype(np.float32)
    similarity = similarity + similarity.T  # symmetric like exp(−D), distinct values
    ours = hier.reciprocal_masks(jnp.asarray(similarity), TOPK)
    theirs = torch_hier.candidate_masks(torch.tensor(similarity), TOPK)
    np.testing.assert_array_equal(np.asarray(ours[0]), theirs[0].numpy())
    np.testing.assert_array_equal(np.asarray(ours[1]), theirs[1].numpy())
    np.testing.assert_array_equal(np.asarray(ours[2]), theirs[0].numpy().sum(1) > 1)


def test_drawn_triplets_follow_the_official_law():
    """Positives uniform over the mutual neighbours, negatives over the rest (self included),
    with replacement; anchors with fewer than two positives get weight 0."""
    rng = np.random.default_rng(2)
    similarity = jnp.asarray(rng.uniform(size=(10, 10)) + np.eye(10) * 5, jnp.float32)
    positive, negative, valid = (np.asarray(a) for a in hier.reciprocal_masks(similarity, 4))
    counts = Counter()
    draw = jax.jit(lambda key: hier.reciprocal_triplets(similarity, key, topk=4, per_anchor=5))
    for seed in range(200):
        t = draw(jax.random.key(seed))
        a, p, n, w = (np.asarray(x) for x in t)
        assert (w == valid[a]).all()
        assert positive[a[w > 0], p[w > 0]].all() and negative[a, n].all()
        counts.update(zip(a[w > 0].tolist(), p[w > 0].tolist(), strict=True))
    for anchor in np.flatnonzero(valid):  # 1000 draws per anchor over its positives
        choices = np.flatnonzero(positive[anchor])
        freq = np.array([counts[(anchor, j)] for j in choices]) / 1000
        assert np.abs(freq - 1 / len(choices)).max() < 5 * np.sqrt(0.25 / 1000)


@pytest.mark.parametrize("c", [0.1, 0.0])
def test_loss_and_gradients_equal_the_official_hier_loss(c):
    z_raw, lca_raw, labels = _inputs()

    def points(raw):
        if c > 0:
            return hyperbolic.to_poincare(raw, c, clip_r=2.3, riemannian=True)
        return raw / jnp.linalg.norm(raw, axis=-1, keepdims=True)

    z32, l32 = jnp.asarray(z_raw, jnp.float32), jnp.asarray(lca_raw, jnp.float32)

    @jax.jit  # one compilation, not one per operation (eager at -O0 takes 8x longer)
    def ours(z, lcas):
        draws = hier.hier_draws(
            points(z), jnp.asarray(labels), points(lcas), jax.random.key(3), c=c, topk=TOPK, per_anchor=PER_ANCHOR
        )
        value, grads = jax.value_and_grad(
            lambda z, lcas: hier.hier_loss_with(points(z), points(lcas), draws, c=c), argnums=(0, 1)
        )(z, lcas)
        return draws, value, grads

    draws, value, (gz, gl) = ours(z32, l32)
    assert float(draws.data.weight.sum()) > 0 and float(draws.proxies.weight.sum()) > 0

    def kept(triplets, noise):
        keep = np.asarray(triplets.weight) > 0
        index = [torch.tensor(np.asarray(x)[keep]) for x in triplets[:3]]
        return (*index, *(torch.tensor(np.asarray(g, np.float64)[keep]) for g in noise))

    tz, tl = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (z_raw, lca_raw))

    def torch_points(raw):
        if c > 0:
            return torch_hyperbolic.to_poincare(raw, c, clip_r=2.3, riemannian=True)
        return torch.nn.functional.normalize(raw, dim=-1)

    theirs = torch_hier.hier_loss(
        torch_points(tz),
        torch_points(tl),
        kept(draws.data, draws.data_noise),
        kept(draws.proxies, draws.proxy_noise),
        c=c,
    )
    theirs.backward()
    assert theirs.item() > 0 and tz.grad.abs().max() > 0 and tl.grad.abs().max() > 0  # not vacuous
    # Float32 distances (d = 8 terms, then the Möbius quotient and artanh, slope ≤ ~10 here) feed
    # sums of relu terms; the LCA choices are argmaxes of noisy logits, equal on both sides.
    assert_close(value, theirs.item(), n_terms=DIM, k=8 * 64, scale=abs(theirs.item()))
    assert_close(gz, tz.grad.numpy(), n_terms=DIM * M, k=8 * 64)
    assert_close(gl, tl.grad.numpy(), n_terms=DIM * (B + M), k=8 * 64)


def test_gumbel_noise_is_standard_gumbel_and_never_infinite():
    # A noise of −log E with E ~ Exp(1) rounded to float32 is +inf about once in 2²⁴ draws (E = 0),
    # which made whole training steps NaN; this one cannot be (−log(−log U), U ∈ [tiny, 1)).
    noise = np.asarray(jax.jit(lambda k: hier.gumbel_noise(k, (2048, 2048)))(jax.random.key(5)), np.float64)
    assert np.isfinite(noise).all()
    # Mean γ (Euler's constant), standard deviation π/√6: the mean within 5 standard errors.
    assert abs(noise.mean() - np.euler_gamma) < 5 * (np.pi / np.sqrt(6)) / np.sqrt(noise.size)
    assert abs(noise.std() - np.pi / np.sqrt(6)) < 0.01  # its standard error: about 0.001


def test_hier_loss_is_deterministic_given_its_key_and_jits():
    z_raw, lca_raw, labels = _inputs(4)
    z = hyperbolic.to_poincare(jnp.asarray(z_raw, jnp.float32), 0.1, 2.3)
    h = hyperbolic.to_poincare(jnp.asarray(lca_raw, jnp.float32), 0.1, 2.3)
    loss = jax.jit(lambda k: hier.hier_loss(z, jnp.asarray(labels), h, k, topk=TOPK, per_anchor=PER_ANCHOR))
    assert float(loss(jax.random.key(0))) == float(loss(jax.random.key(0)))
    assert float(loss(jax.random.key(0))) != float(loss(jax.random.key(1)))
    with pytest.raises(ValueError, match="tau"):
        hier.hier_loss(z, jnp.asarray(labels), h, jax.random.key(0), tau=0.0)
