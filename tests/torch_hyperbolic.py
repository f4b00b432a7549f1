"""The Poincaré-ball operations as the official ``hyptorch`` code computes them (htdt/hyp_metric and
HIER-CVPR23 ``hyptorch/pmath.py``, ``nn.py``), written here in PyTorch from their semantics, with
their guards and their custom backward passes, for ``tests/test_hyperbolic.py``. Works in any
float dtype (the tests use float64)."""

from __future__ import annotations

import torch


class _Artanh(torch.autograd.Function):
    """artanh at z clamped to ±(1 − 1e-5); backward g / (1 − z²) at the clamped z."""

    @staticmethod
    def forward(ctx, z):
        z = z.clamp(-1 + 1e-5, 1 - 1e-5)
        ctx.save_for_backward(z)
        return 0.5 * (torch.log(1 + z) - torch.log(1 - z))

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g / (1 - z**2)


class _Riemannian(torch.autograd.Function):
    """Identity; backward scaled by (1 − c‖y‖²)² / 4."""

    @staticmethod
    def forward(ctx, y, c):
        ctx.save_for_backward(y)
        ctx.c = c
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - ctx.c * y.pow(2).sum(-1, keepdim=True)).pow(2) / 4, None


def artanh(z):
    return _Artanh.apply(z)


def project(x, c):
    norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    radius = (1 - 1e-3) / c**0.5
    return torch.where(norm > radius, x / norm * radius, x)


def expmap0(u, c):
    norm = u.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    return (c**0.5 * norm).clamp(-15, 15).tanh() * u / (c**0.5 * norm)


def mobius_add(x, y, c):
    x2, y2 = x.pow(2).sum(-1, keepdim=True), y.pow(2).sum(-1, keepdim=True)
    xy = (x * y).sum(-1, keepdim=True)
    return ((1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y) / (1 + 2 * c * xy + c**2 * x2 * y2 + 1e-5)


def distance(x, y, c):
    return 2 / c**0.5 * artanh(c**0.5 * mobius_add(-x, y, c).norm(dim=-1))


def distance_matrix(x, y, c):
    """The official (B, C, d) way: Möbius addition of every pair, then its norm."""
    return distance(x[:, None, :], y[None, :, :], c)


def to_poincare(x, c, clip_r=None, riemannian=True):
    if clip_r is not None:
        x = x * torch.minimum(torch.ones(()), clip_r / (x.norm(dim=-1, keepdim=True) + 1e-5))
    y = project(expmap0(x, c), c)
    return _Riemannian.apply(y, c) if riemannian else y
