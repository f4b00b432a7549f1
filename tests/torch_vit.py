"""An independent PyTorch Vision Transformer, written here from DINO's ``vision_transformer.py``
semantics (patch conv, class and distillation tokens, bicubic position-embedding interpolation by
``scale_factor = (grid + 0.1) / √N``, pre-norm blocks, LayerScale, final norm), with the state-dict
names of DINO and timm, so the same state dict loads into it and into ``hdml_jax.models.vit``."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional


class _Gamma(nn.Module):
    def __init__(self, dim: int, value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), value))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(functional.gelu(self.fc1(x)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool = False):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, head_dim)
        if self.fused:  # what timm runs (its fused_attn): PyTorch's fused kernel, for the benchmarks
            out = functional.scaled_dot_product_attention(q, k, v)
            return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        weights = (q @ k.transpose(-2, -1)) * (dim // self.heads) ** -0.5
        out = weights.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class _Block(nn.Module):
    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, layer_scale: float | None, fused: bool = False
    ):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads, fused)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls1 = _Gamma(dim, layer_scale) if layer_scale is not None else None
        self.ls2 = _Gamma(dim, layer_scale) if layer_scale is not None else None

    def forward(self, x):
        a = self.attn(self.norm1(x))
        x = x + (a * self.ls1.gamma if self.ls1 is not None else a)
        m = self.mlp(self.norm2(x))
        return x + (m * self.ls2.gamma if self.ls2 is not None else m)


class TorchViT(nn.Module):
    def __init__(
        self,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        grid: int,
        *,
        mlp_ratio: float = 4.0,
        distilled: bool = False,
        layer_scale: float | None = None,
        pooling: str = "cls",
        final_norm: bool = True,
        position_interpolation: str = "dino",
        fused_attention: bool = False,
    ):
        super().__init__()
        self.patch, self.pooling, self.final_norm = patch, pooling, final_norm
        self.position_interpolation = position_interpolation
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if distilled else None
        self.num_prefix = 2 if distilled else 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + grid * grid, dim))
        self.blocks = nn.ModuleList(
            _Block(dim, heads, mlp_ratio, layer_scale, fused_attention) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """DINO's interpolate_pos_encoding: bicubic by scale factor (grid + 0.1) / √N; or timm's
        resample_abs_pos_embed: bicubic to the new size, antialiased."""
        patches = self.pos_embed.shape[1] - self.num_prefix
        rows, cols = height // self.patch, width // self.patch
        side = math.sqrt(patches)
        if rows * cols == patches and rows == cols:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        grid = self.pos_embed[:, self.num_prefix :].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
        if self.position_interpolation == "timm":
            grid = functional.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True)
        else:
            grid = functional.interpolate(
                grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic"
            )
        assert grid.shape[-2:] == (rows, cols)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([self.pos_embed[:, : self.num_prefix], grid], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        batch, _, height, width = images.shape
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(batch, -1, -1))
        x = torch.cat([*prefix, x], dim=1) + self.position_embedding(height, width)
        for block in self.blocks:
            x = block(x)
        if self.final_norm:
            x = self.norm(x)
        if self.pooling == "cls":
            return x[:, 0]
        if self.pooling == "cls+dist":
            return (x[:, 0] + x[:, 1]) / 2
        return x[:, self.num_prefix :].mean(dim=1)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn at random (N(0, 0.2), norms around 1), so that no term is trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in model.named_parameters():
            noise = torch.randn(value.shape, generator=generator) * 0.2
            value.copy_(
                noise + (1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0)
            )
    return model.eval()
