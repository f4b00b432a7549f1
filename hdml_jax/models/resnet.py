"""ResNet backbones (He et al. 2016) in Flax Linen, laid out and padded exactly like torchvision.

torchvision's ResNet is "v1.5": a bottleneck block puts its stride in the 3×3 conv. Every conv and
the stem max-pool use symmetric explicit padding ``k // 2`` (Flax's ``'SAME'`` would pad stride-2
layers asymmetrically and shift the output by a pixel), so the same weights give the same outputs.
Module names mirror torchvision's state-dict keys (``layer3_1/bn2`` ↔ ``layer3.1.bn2``), which keeps
``hdml_jax.models.convert`` a table lookup.

Input: NHWC images. Output: the last feature map, ``(N, H/32, W/32, 8·width·expansion)``, or
``H/16`` with ``last_stride=1`` (CGD removes stage-4 downsampling).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

# depth -> (block type, blocks per stage)
STAGES: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch BatchNorm: momentum 0.1 on the new value = Flax momentum 0.9 on the old; eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def statistics_dtype(x: jax.Array) -> jnp.dtype:
    """The dtype BatchNorm normalises in: float32 for float32 and narrower (bfloat16) inputs, so that
    mixed precision keeps float32 statistics, and the input's own dtype when it is wider (a float64
    model under JAX's x64 mode, whose every layer would otherwise round to float32)."""
    return jnp.promote_types(x.dtype, jnp.float32)


class FrozenBatchNorm(nn.Module):
    """BatchNorm whose statistics never change: always normalises with the running mean/var.

    Same variables as ``nn.BatchNorm`` (``params: scale, bias``; ``batch_stats: mean, var``), so
    the same checkpoints load into either. This is Proxy-Anchor's ``bn_freeze``: every BatchNorm
    in ``eval()`` mode for the whole run. The affine ``scale``/``bias`` receive gradients as
    usual; whether they train is the optimizer's decision (``hdml_jax.optim.frozen_groups``:
    the official code freezes them during warm-up only).
    """

    epsilon: float = BN_EPSILON
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        multiplier = scale * jax.lax.rsqrt(var.value + self.epsilon)
        dtype = self.dtype or x.dtype
        y = (x.astype(statistics_dtype(x)) - mean.value) * multiplier + bias
        return y.astype(dtype)


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm{1,2}d`` exactly: normalisation over every axis but the last.

    Training normalises with the batch mean and the *biased* batch variance, and updates the
    running variance with the *unbiased* one (``n / (n - 1)``, ``n`` values per channel), as
    PyTorch does; Flax's ``nn.BatchNorm`` uses the biased one there, which for a 1-d BatchNorm on
    a batch of 32 is 3% off. The variance is computed in two passes (mean first), in float32
    (float64 for a float64 model: ``statistics_dtype``).
    Same variables as ``nn.BatchNorm``. ``momentum`` in Flax's convention (PyTorch 0.1 = 0.9).
    """

    use_running_average: bool = False
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Any = None
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        x32 = x.astype(statistics_dtype(x))
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            if not self.is_initializing():
                n = x.size // features
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                running_mean.value = m * running_mean.value + (1 - m) * mean
                running_var.value = m * running_var.value + (1 - m) * unbiased
        y = (x32 - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype or x.dtype)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    """A bias-free conv with torchvision's symmetric padding ``kernel // 2``."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def norm_layer(train: bool, frozen: bool, dtype: Any, name: str, zero_scale: bool = False) -> nn.Module:
    """The BatchNorm after a conv: ``FrozenBatchNorm`` when ``frozen``, else batch statistics in
    training and running ones in evaluation (scale initialised to 0 with ``zero_scale``)."""
    if frozen:
        return FrozenBatchNorm(dtype=dtype, name=name)
    return BatchNorm(
        use_running_average=not train,
        dtype=dtype,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        name=name,
    )


def _shortcut(x, out_features: int, stride: int, train: bool, frozen_bn: bool, dtype: Any):
    """Identity, or 1×1 conv + BN (torchvision's ``downsample``) when the shape changes."""
    if stride == 1 and x.shape[-1] == out_features:
        return x
    residual = _conv(out_features, 1, stride, dtype, "downsample_conv")(x)
    return norm_layer(train, frozen_bn, dtype, "downsample_bn")(residual)


class BasicBlock(nn.Module):
    """Two 3×3 convs (ResNet-18/34). ``features`` is the block's output width."""

    features: int = 64
    stride: int = 1
    zero_init_residual: bool = False
    frozen_bn: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        y = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(norm_layer(train, self.frozen_bn, self.dtype, "bn1")(y))
        y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
        y = norm_layer(train, self.frozen_bn, self.dtype, "bn2", self.zero_init_residual)(y)
        residual = _shortcut(x, self.features, self.stride, train, self.frozen_bn, self.dtype)
        return nn.relu(y + residual)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided, v1.5) → 1×1 ×4 (ResNet-50/101). ``features`` is the inner width."""

    features: int = 64
    stride: int = 1
    zero_init_residual: bool = False
    frozen_bn: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        out_features = self.features * EXPANSION["bottleneck"]
        y = _conv(self.features, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(norm_layer(train, self.frozen_bn, self.dtype, "bn1")(y))
        y = _conv(self.features, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(norm_layer(train, self.frozen_bn, self.dtype, "bn2")(y))
        y = _conv(out_features, 1, 1, self.dtype, "conv3")(y)
        y = norm_layer(train, self.frozen_bn, self.dtype, "bn3", self.zero_init_residual)(y)
        residual = _shortcut(x, out_features, self.stride, train, self.frozen_bn, self.dtype)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """ResNet-18/34/50/101 feature extractor (no pooling, no classifier).

    Attributes:
      depth: 18, 34, 50 or 101.
      last_stride: 2 (torchvision) or 1 (no stage-4 downsampling: 14×14 maps at 224, as in CGD).
      frozen_bn: BatchNorm always in inference mode (running statistics frozen).
      width: channels of the stem and of stage 1 (64 in the paper; e.g. 8 for fast tests).
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters stay float32.
      zero_init_residual: start each residual branch's last BN scale at 0 (off in torchvision).
    """

    depth: int = 50
    last_stride: int = 2
    frozen_bn: bool = False
    width: int = 64
    dtype: Any = jnp.float32
    zero_init_residual: bool = False

    # The key of ``hdml_jax.models.preprocessing.PREPROCESSING`` for this network's inputs.
    preprocessing: ClassVar[str] = "resnet"

    def __post_init__(self):
        if self.depth not in STAGES:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGES)}, got {self.depth}.")
        if self.last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}.")
        super().__post_init__()

    @property
    def num_features(self) -> int:
        """Channels of the output feature map (2048 for ResNet-50/101, 512 for 18/34)."""
        block, _ = STAGES[self.depth]
        return self.width * 8 * EXPANSION[block]

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if images.ndim != 4:
            raise ValueError(f"ResNet expects NHWC images of rank 4, got shape {images.shape}.")
        block_type, blocks_per_stage = STAGES[self.depth]
        block_cls = BasicBlock if block_type == "basic" else Bottleneck

        x = images.astype(self.dtype)
        x = _conv(self.width, 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(norm_layer(train, self.frozen_bn, self.dtype, "bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, num_blocks in enumerate(blocks_per_stage):
            for index in range(num_blocks):
                stride = 1
                if index == 0 and stage > 0:
                    stride = self.last_stride if stage == 3 else 2
                x = block_cls(
                    frozen_bn=self.frozen_bn,
                    dtype=self.dtype,
                    features=self.width * 2**stage,
                    stride=stride,
                    zero_init_residual=self.zero_init_residual,
                    name=f"layer{stage + 1}_{index}",
                )(x, train)
        return x
