"""``hdml_jax.losses.hyp.hyp_loss`` against Hyp's ``contrastive_loss`` loop and HIER's ``SupCon``,
written in PyTorch (float64) from their semantics: value and gradients, ball and sphere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from hdml_jax import hyperbolic
from hdml_jax.losses.hyp import hyp_loss
from tests import torch_hyperbolic
from tests.numerics import assert_close

P, K, D = 6, 3, 8


def _official(z: torch.Tensor, tau: float, c: float, reduction: str) -> torch.Tensor:
    """hyp_metric train.py:50-73 and 155-161 (HIER's SupCon: the same sum over IPC²)."""
    z = z.view(P, K, D)
    if c == 0:
        dist_f = lambda x, y: x @ y.t()  # noqa: E731
    else:
        dist_f = lambda x, y: -torch_hyperbolic.distance_matrix(x, y, c)  # noqa: E731
    total = 0
    for i in range(K):
        for j in range(K):
            if i != j:
                x0, x1 = z[:, i], z[:, j]
                logits00 = dist_f(x0, x0) / tau - torch.eye(P, dtype=z.dtype) * 1e9
                logits = torch.cat([dist_f(x0, x1) / tau, logits00], dim=1)
                logits = logits - logits.max(1, keepdim=True)[0].detach()
                total = total + F.cross_entropy(logits, torch.arange(P))
    return total / K**2 if reduction == "hier" else total


@pytest.mark.parametrize("c, reduction", [(0.1, "sum"), (0.1, "hier"), (0.0, "sum")])
def test_hyp_loss_equals_the_official_loop(c, reduction):
    raw = np.random.default_rng(0).normal(size=(P * K, D))

    def points(v):
        return (
            hyperbolic.to_poincare(v, c, clip_r=2.3, riemannian=False)
            if c
            else v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        )

    value, grad = jax.jit(jax.value_and_grad(lambda v: hyp_loss(points(v), K, tau=0.2, c=c, reduction=reduction)))(
        jnp.asarray(raw, jnp.float32)
    )
    t = torch.tensor(raw, requires_grad=True)
    z = torch_hyperbolic.to_poincare(t, c, clip_r=2.3, riemannian=False) if c else F.normalize(t, dim=-1)
    theirs = _official(z, 0.2, c, reduction)
    theirs.backward()
    # float32 distances over d = 8 (artanh's slope ≤ ~5 at these radii), /τ = 5, a log-sum-exp of
    # 2P − 1 = 11 terms, K(K − 1) = 6 of them summed.
    assert_close(value, theirs.item(), n_terms=2 * P * D, k=8 * 64, scale=abs(theirs.item()))
    assert_close(grad, t.grad.numpy(), n_terms=2 * P * D, k=8 * 64)


def test_hyp_loss_refuses_batches_that_are_not_classes_of_k():
    with pytest.raises(ValueError, match="samples_per_class=4"):
        hyp_loss(jnp.zeros((6, 4)), 4)
    with pytest.raises(ValueError, match="reduction"):
        hyp_loss(jnp.zeros((6, 4)), 2, reduction="mean")
