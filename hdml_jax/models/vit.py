"""The Vision Transformer of DINO, DeiT and timm's AugReg weights, as a Flax backbone.

``VisionTransformer(...).apply(variables, images, train=...)`` maps normalised ``(B, H, W, 3)``
images to pooled features ``(B, D)``, the architecture of DINO's ``vision_transformer.py``
(facebookresearch/dino) and timm's ``VisionTransformer``, which its weights were trained with:

* patch embedding: a ``p × p`` convolution with stride ``p`` (``patch_embed.proj``), the
  ``(H/p) × (W/p)`` patches as tokens in row-major order;
* a class token (and DeiT-distilled's distillation token) in front, plus learned position
  embeddings (``pos_embed``, one per token), resized for another grid than the weights' own as
  the weights' own code does it: DINO's and DeiT's ``interpolate_pos_encoding`` (bicubic by a
  scale factor, ``interpolate_position_embedding``) or timm's ``resample_abs_pos_embed``
  (bicubic by size with antialiasing, ``resample_position_embedding``);
* ``depth`` pre-norm blocks: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``, LayerNorm ε = 1e-6,
  multi-head self-attention with a fused ``qkv`` projection (bias) through
  ``jax.nn.dot_product_attention`` on accelerators (a GPU takes its fused kernel; CPUs run
  two batched products, faster there: ``Attention``), a GELU MLP of ``mlp_ratio · D``
  (exact erf GELU, as ``nn.GELU``), optional LayerScale (``layer_scale``: per-channel ``γ`` on
  each branch) and stochastic depth (``drop_path``, 0 by default as the recipes);
* the final LayerNorm (``final_norm``; HIER's ``use_lastnorm``), then the pooled output: the class
  token (``"cls"``, DINO and AugReg), the mean of the patch tokens (``"mean"``), DeiT-distilled's
  ``(class + distillation) / 2`` (``"cls+dist"``, timm ≥ 0.6 in training and evaluation), or
  ``"deit"``: the class token in training and ``(class + distillation) / 2`` in evaluation, what
  DeiT's own ``forward`` and timm ≤ 0.5 (HIER pins 0.4.12) give a metric-learning head, which
  keeps the first of the two training outputs.

``dtype=bfloat16`` computes in bf16 with float32 parameters, float32 LayerNorm statistics and
float32 softmax statistics (``dot_product_attention`` accumulates its softmax in float32).
Parity with an independent PyTorch forward of the same state dict: ``tests/test_vit.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.models.errors import WeightsMismatchError

POOLINGS = ("cls", "mean", "cls+dist", "deit")
# How each weights' own code resizes the position embeddings for another grid.
POSITION_INTERPOLATIONS = ("dino", "timm")
LAYER_NORM_EPS = 1e-6

# ViT-Ti, ViT-S and ViT-B (DeiT's names): (embed_dim, depth, num_heads).
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


def cubic_weights(position: np.ndarray, a: float = -0.75) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's bicubic convolution (``A = -0.75``) at fractional source positions.

    Returns ``(first, weights)``: for each output, the index of its first of four taps
    (``floor(position) - 1``) and the four weights, Keys' cubic with ``A`` at distances
    ``t + 1, t, 1 - t, 2 - t`` (``t`` the fractional part).
    """
    first = np.floor(position)
    t = position - first
    weights = np.stack(
        [_keys_far(t + 1, a), _keys_near(t, a), _keys_near(1 - t, a), _keys_far(2 - t, a)], axis=-1
    )
    return first.astype(np.int64) - 1, weights


def _keys_near(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel for ``|x| <= 1``."""
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _keys_far(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel for ``1 < |x| < 2``."""
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """``(out, in)`` float64: ``torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False, scale_factor=scale)`` along one axis.

    With a ``scale_factor`` (and ``recompute_scale_factor`` unset) PyTorch maps output ``i`` to
    source ``(i + 0.5) / scale - 0.5``, with ``scale`` as given, not ``out / in``; taps outside
    the input repeat its border.
    """
    first, weights = cubic_weights((np.arange(out_size) + 0.5) / scale - 0.5)
    matrix = np.zeros((out_size, in_size))
    for tap in range(4):
        index = np.clip(first + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), index), weights[:, tap])
    return matrix


def antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out, in)`` float64: ``torch.nn.functional.interpolate(mode="bicubic", antialias=True,
    size=out)`` along one axis (what timm's ``resample_abs_pos_embed`` calls).

    PyTorch's antialiased path is Pillow's resampling: Keys' cubic with ``A = -0.5`` (not the
    ``-0.75`` of the plain path), centred at source ``scale · (i + 0.5)`` with ``scale = in / out``,
    its support stretched by ``scale`` when shrinking (``2 · scale`` taps each side, distances
    divided by ``scale``), taps outside the input dropped and the rest renormalised to sum 1.
    """
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = scale * (i + 0.5)
        # int() truncates like PyTorch's static_cast<int64_t>.
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), in_size)
        taps = np.arange(first, last)
        distance = np.abs((taps - centre + 0.5) / stretch)
        weights = np.where(
            distance < 1.0,
            _keys_near(distance, -0.5),
            np.where(distance < 2.0, _keys_far(distance, -0.5), 0.0),
        )
        total = weights.sum()
        matrix[i, taps] = weights / total if total != 0 else weights
    return matrix


def resample_position_embedding(pos_embed: jax.Array, num_prefix: int, grid: tuple[int, int]) -> jax.Array:
    """timm's ``resample_abs_pos_embed`` (its defaults): the patch part of ``pos_embed`` resized to
    ``grid`` by ``size``, bicubic with antialiasing (``antialiased_bicubic_matrix``); prefix tokens
    kept, the same grid returns ``pos_embed`` itself. timm's ViTs (AugReg) resize this way."""
    side = _square_side(pos_embed.shape[1] - num_prefix)
    if grid == (side, side):
        return pos_embed
    return _resize_grid(
        pos_embed,
        num_prefix,
        side,
        antialiased_bicubic_matrix(side, grid[0]),
        antialiased_bicubic_matrix(side, grid[1]),
    )


def _square_side(patches: int) -> int:
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"pos_embed holds {patches} patch positions, not a square grid.")
    return side


def _resize_grid(
    pos_embed: jax.Array, num_prefix: int, side: int, rows: np.ndarray, cols: np.ndarray
) -> jax.Array:
    """``pos_embed``'s ``side × side`` patch table resized by the separable ``rows`` and ``cols``
    matrices (each ``(out, side)``), in float32."""
    table = pos_embed[0, num_prefix:].reshape(side, side, -1).astype(jnp.float32)
    resized = jnp.einsum(
        "ri,ijd,cj->rcd", jnp.asarray(rows, jnp.float32), table, jnp.asarray(cols, jnp.float32)
    )
    resized = resized.reshape(1, rows.shape[0] * cols.shape[0], -1).astype(pos_embed.dtype)
    return jnp.concatenate([pos_embed[:, :num_prefix], resized], axis=1)


def interpolate_position_embedding(pos_embed: jax.Array, num_prefix: int, grid: tuple[int, int]) -> jax.Array:
    """DINO's ``interpolate_pos_encoding``: the patch part of ``pos_embed`` ``(1, prefix + N, D)``
    (an ``√N × √N`` grid) resized to ``grid = (rows, cols)`` patches; prefix tokens kept.

    DINO resizes by ``scale_factor = (rows + 0.1) / √N`` (and the same for columns), bicubic, the
    ``0.1`` keeping the output size at ``rows`` despite float round-off; that scale, not
    ``rows / √N``, sets the sampling positions. The same grid returns ``pos_embed`` itself.
    """
    side = _square_side(pos_embed.shape[1] - num_prefix)
    if grid == (side, side):
        return pos_embed
    rows = bicubic_matrix(side, grid[0], (grid[0] + 0.1) / side)
    cols = bicubic_matrix(side, grid[1], (grid[1] + 0.1) / side)
    return _resize_grid(pos_embed, num_prefix, side, rows, cols)


class DropPath(nn.Module):
    """Stochastic depth: the whole residual branch of a sample dropped with probability ``rate``
    (and the kept ones scaled by ``1 / (1 - rate)``), in training only."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


def heads_first_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q kᵀ / √d) v`` on ``(B, heads, N, d)`` arrays as two batched matrix products.

    The logits and the softmax are float32 (float64 for float64 inputs), the weights are cast to
    ``v``'s dtype for the second product, as ``jax.nn.dot_product_attention`` does. On a CPU this
    layout runs the attention in about 0.6× the time of ``dot_product_attention``'s XLA
    implementation (forward and backward, ViT-S/16; ``benchmarks/backbone.py``).
    """
    wide = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=wide) * q.shape[-1] ** -0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.matmul(weights, v)


class Attention(nn.Module):
    """Multi-head self-attention: ``qkv`` (one Dense, bias), scaled dot products, ``proj``.

    The products run through ``jax.nn.dot_product_attention`` on accelerators (a GPU takes its
    fused kernel) and through ``heads_first_attention`` on CPUs and for float64 models
    (``dot_product_attention`` takes its softmax in float32 whatever its inputs), chosen per
    platform when the program is lowered (``jax.lax.platform_dependent``), so an exported
    artifact carries each platform's own.
    """

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        # The projections act on (B·N, C) rows: as 2-D products their backward passes need no
        # transposes of the activations on a CPU (about 10 % of a ViT-S/16 train step there).
        qkv = nn.Dense(3 * dim, dtype=self.dtype, name="qkv")(x.reshape(batch * tokens, dim))
        # DINO's reshape(B, N, 3, heads, head_dim).
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)

        def heads_first(qkv):
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
            return heads_first_attention(q, k, v).transpose(0, 2, 1, 3)

        def fused(qkv):
            q, k, v = jnp.moveaxis(qkv, 2, 0)  # each (B, N, heads, head_dim)
            return jax.nn.dot_product_attention(q, k, v, scale=head_dim**-0.5)

        if jnp.dtype(self.dtype) == jnp.float64:
            out = heads_first(qkv)
        else:
            out = jax.lax.platform_dependent(qkv, cpu=heads_first, default=fused)
        out = nn.Dense(dim, dtype=self.dtype, name="proj")(out.reshape(batch * tokens, dim))
        return out.reshape(batch, tokens, dim)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + γ₁·attn(LN(x))``, then ``x + γ₂·mlp(LN(x))``."""

    num_heads: int
    mlp_ratio: float = 4.0
    layer_scale: float | None = None
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dim = x.shape[-1]
        norm = {"epsilon": LAYER_NORM_EPS, "dtype": self.dtype}
        branch = Attention(self.num_heads, dtype=self.dtype, name="attn")(
            nn.LayerNorm(name="norm1", **norm)(x)
        )
        if self.layer_scale is not None:
            branch = branch * self.param("ls1", nn.initializers.constant(self.layer_scale), (dim,))
        x = x + DropPath(self.drop_path)(branch, train)
        rows = nn.LayerNorm(name="norm2", **norm)(x).reshape(-1, dim)  # (B·N, C): see Attention
        hidden = nn.Dense(int(dim * self.mlp_ratio), dtype=self.dtype, name="fc1")(rows)
        branch = nn.Dense(dim, dtype=self.dtype, name="fc2")(nn.gelu(hidden, approximate=False))
        branch = branch.reshape(x.shape)
        if self.layer_scale is not None:
            branch = branch * self.param("ls2", nn.initializers.constant(self.layer_scale), (dim,))
        return x + DropPath(self.drop_path)(branch, train)


class VisionTransformer(nn.Module):
    """ViT backbone; see the module docstring.

    Attributes:
      patch_size: ``p`` (16, or 8 for DINO's ViT-S/8 and ViT-B/8).
      embed_dim, depth, num_heads: the size (``SIZES``: ViT-S 384/12/6, ViT-B 768/12/12).
      mlp_ratio: the MLP's hidden width over ``embed_dim``.
      pretrain_grid: patches per side of the position embeddings (224 / p for the weights).
      distilled: DeiT's distillation token after the class token.
      layer_scale: LayerScale's initial ``γ`` (None: no LayerScale, as DINO, DeiT and AugReg ViT-S).
      pooling: ``"cls"``, ``"mean"`` (the patch tokens), ``"cls+dist"`` or ``"deit"`` (DeiT-distilled).
      final_norm: the last LayerNorm before pooling.
      drop_path: stochastic depth rate of the last block, rising linearly from 0 (timm's rule).
      position_interpolation: ``"dino"`` (DINO's and DeiT's ``interpolate_pos_encoding``) or
        ``"timm"`` (``resample_abs_pos_embed``, timm's AugReg ViTs); the two differ off the
        weights' own grid.
      preprocessing: the key of ``hdml_jax.models.preprocessing.PREPROCESSING`` for this
        network's inputs: ``"vit"`` (ImageNet mean/std: DINO, DeiT) or ``"vit_augreg"`` (0.5/0.5).
      dtype: computation dtype; parameters stay float32.
    """

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    pretrain_grid: int = 14
    distilled: bool = False
    layer_scale: float | None = None
    pooling: str = "cls"
    final_norm: bool = True
    drop_path: float = 0.0
    position_interpolation: str = "dino"
    preprocessing: str = "vit"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if self.position_interpolation not in POSITION_INTERPOLATIONS:
            raise ValueError(
                f"position_interpolation must be one of {POSITION_INTERPOLATIONS}, got {self.position_interpolation!r}."
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}.")
        if self.pooling in ("cls+dist", "deit") and not self.distilled:
            raise ValueError(f'pooling "{self.pooling}" needs the distillation token (distilled=True).')
        height, width = images.shape[1:3]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"images of {height}×{width} px do not split into {p}×{p} patches.")
        x = nn.Conv(
            self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch_embed"
        )(images.astype(self.dtype))
        batch, rows, cols, dim = x.shape
        x = x.reshape(batch, rows * cols, dim)
        prefix = [self.param("cls_token", nn.initializers.normal(0.02), (1, 1, dim))]
        if self.distilled:
            prefix.append(self.param("dist_token", nn.initializers.normal(0.02), (1, 1, dim)))
        pos_embed = self.param(
            "pos_embed", nn.initializers.normal(0.02), (1, len(prefix) + self.pretrain_grid**2, dim)
        )
        tokens = jnp.concatenate(
            [jnp.broadcast_to(t, (batch, 1, dim)).astype(x.dtype) for t in prefix] + [x], 1
        )
        resize = (
            interpolate_position_embedding
            if self.position_interpolation == "dino"
            else resample_position_embedding
        )
        x = tokens + resize(pos_embed, len(prefix), (rows, cols)).astype(x.dtype)
        for i in range(self.depth):
            rate = self.drop_path * i / max(self.depth - 1, 1)
            x = Block(
                self.num_heads, self.mlp_ratio, self.layer_scale, rate, dtype=self.dtype, name=f"blocks_{i}"
            )(x, train)
        if self.final_norm:
            x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm")(x)
        if self.pooling == "cls":
            return x[:, 0]
        if self.pooling == "cls+dist" or (self.pooling == "deit" and not train):
            return (x[:, 0] + x[:, 1]) / 2
        if self.pooling == "deit":
            return x[:, 0]
        return jnp.mean(x[:, len(prefix) :], axis=1)


def vit_from_torch(state_dict: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """A DINO / DeiT / timm ViT state dict → ``VisionTransformer`` params.

    Names: ``patch_embed.proj`` (OIHW → HWIO), ``cls_token``, ``dist_token``, ``pos_embed``,
    ``blocks.i.{norm1,norm2}`` (weight → scale), ``blocks.i.attn.{qkv,proj}`` and
    ``blocks.i.mlp.{fc1,fc2}`` (weight transposed), LayerScale ``blocks.i.ls1.gamma`` (timm) or
    ``blocks.i.gamma_1`` (DeiT III, DINO-style), and ``norm``. A classifier (``head``,
    ``head_dist``, ``fc_norm``) is dropped; anything else is an error naming it.
    """
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    params: dict[str, Any] = {}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in sd:
            raise WeightsMismatchError(
                f"the ViT state dict has no {name} (a {depth}-block ViT needs it): not a DINO, DeiT or "
                "timm ViT state dict, or fewer blocks?"
            )
        used.add(name)
        return sd[name]

    def dense(prefix: str) -> dict[str, np.ndarray]:
        return {"kernel": take(f"{prefix}.weight").T, "bias": take(f"{prefix}.bias")}

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {"scale": take(f"{prefix}.weight"), "bias": take(f"{prefix}.bias")}

    params["patch_embed"] = {
        "kernel": take("patch_embed.proj.weight").transpose(2, 3, 1, 0),
        "bias": take("patch_embed.proj.bias"),
    }
    for name in ("cls_token", "dist_token", "pos_embed"):
        if name in sd:
            params[name] = take(name)
    for i in range(depth):
        b = f"blocks.{i}"
        block = {
            "norm1": norm(f"{b}.norm1"),
            "norm2": norm(f"{b}.norm2"),
            "attn": {"qkv": dense(f"{b}.attn.qkv"), "proj": dense(f"{b}.attn.proj")},
            "fc1": dense(f"{b}.mlp.fc1"),
            "fc2": dense(f"{b}.mlp.fc2"),
        }
        for ours, names in (
            ("ls1", (f"{b}.ls1.gamma", f"{b}.gamma_1")),
            ("ls2", (f"{b}.ls2.gamma", f"{b}.gamma_2")),
        ):
            for name in names:
                if name in sd:
                    block[ours] = take(name)
        params[f"blocks_{i}"] = block
    if "norm.weight" in sd:
        params["norm"] = norm("norm")
    classifier = ("head.", "head_dist.", "fc_norm.")
    unused = sorted(k for k in sd if k not in used and not k.startswith(classifier))
    if unused:
        raise WeightsMismatchError(
            f"the ViT state dict has entries a {depth}-block VisionTransformer does not have: "
            f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''} (another depth or architecture?)."
        )
    return params
