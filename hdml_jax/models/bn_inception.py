"""BN-Inception (Ioffe & Szegedy 2015, "Inception-v2") in Flax Linen, laid out like Cadene's port.

The network of ``pretrainedmodels.bninception`` (a Caffe model translated to PyTorch), which
Proxy-Anchor, Proxy-NCA and the MLRC benchmark use as their BN-Inception backbone::

    conv1_7x7_s2 (7×7/2, 64) → BN → ReLU → max-pool 3×3/2 (ceil)
    conv2_3x3_reduce (1×1, 64) → BN → ReLU → conv2_3x3 (3×3, 192) → BN → ReLU → max-pool 3×3/2 (ceil)
    inception 3a, 3b, 3c (↓2), 4a, 4b, 4c, 4d, 4e (↓2), 5a, 5b         → (N, H/32, W/32, 1024)

Each inception block concatenates, in this order, a 1×1 branch, a 1×1 → 3×3 branch, a
1×1 → 3×3 → 3×3 branch and a pooling branch (``INCEPTION_BLOCKS`` gives the widths). In a
pooling branch with a projection, the pool is a 3×3/1 average (padding 1, zeros counted) or, in
5b, a 3×3/1 max; 3c and 4e halve the resolution instead: no 1×1 branch, stride 2 in the last
conv of both 3×3 branches, and a 3×3/2 max-pool passed through without projection. Every conv
has a bias and is followed by BatchNorm (eps 1e-5) and ReLU.

Pooling reproduces PyTorch's ``ceil_mode=True`` (``max_pool``, ``avg_pool``): the output size
rounds up, a window that would start beyond the input (and its left padding) is dropped, and an
average divides by the window's extent clipped to the padded input. Module names mirror
Cadene's attributes (``inception_3a_double_3x3_1_bn`` ↔ ``inception_3a_double_3x3_1_bn.*``), so
``hdml_jax.models.convert.bn_inception_to_flax`` is a rename plus OIHW → HWIO.

Input: NHWC images already normalised the BN-Inception way (``hdml_jax.models.preprocessing``:
BGR channel order, 0–255 range, mean (104, 117, 128) subtracted, no division). Output: the last
feature map before the global pool, ``(N, 7, 7, 1024)`` at 224 or 227 px. Only sides where both
reductions see an even map are possible, 32k − 1 to 32k + 6 px (k ≥ 1: ..., 191–198, 223–230,
255–262, ...; ``is_valid_image_size``); PyTorch's network fails on the others too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.models.resnet import norm_layer

# (block, 1×1, 3×3 reduce, 3×3, double 3×3 reduce, double 3×3 (both convs), pool branch, pool proj).
# Pool branch: "avg" (3×3/1, padding 1), "max" (3×3/1, padding 1) or "reduce" (3×3/2 max-pool,
# no projection; the block then has no 1×1 branch and its 3×3 branches end with stride 2).
INCEPTION_BLOCKS: tuple[tuple[str, int, int, int, int, int, str, int], ...] = (
    ("3a", 64, 64, 64, 64, 96, "avg", 32),
    ("3b", 64, 64, 96, 64, 96, "avg", 64),
    ("3c", 0, 128, 160, 64, 96, "reduce", 0),
    ("4a", 224, 64, 96, 96, 128, "avg", 128),
    ("4b", 192, 96, 128, 96, 128, "avg", 128),
    ("4c", 160, 128, 160, 128, 160, "avg", 128),
    ("4d", 96, 128, 192, 160, 192, "avg", 128),
    ("4e", 0, 128, 192, 192, 256, "reduce", 0),
    ("5a", 352, 192, 320, 160, 224, "avg", 128),
    ("5b", 352, 192, 320, 192, 224, "max", 128),
)
NUM_FEATURES = 1024

# Cadene's convs keep PyTorch's default initialisation (kaiming_uniform_(a=√5): U(±1/√fan_in)
# for the kernel and the bias alike); used when training from scratch.
conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _uniform_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# ----------------------------------------------------------------------------- PyTorch pooling


def pool_geometry(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> tuple[int, int]:
    """``(output size, right padding)`` of a PyTorch ``MaxPool``/``AvgPool`` along one axis.

    PyTorch: ``out = ⌊(size + 2·padding − kernel [+ stride − 1 with ceil_mode]) / stride⌋ + 1``,
    minus one if ceil mode made the last window start at or beyond ``size + padding`` (in the
    right padding only). The right padding returned makes a ``reduce_window`` produce at least
    ``out`` windows (never negative; the caller slices off any extra ones).
    """
    span = size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)
    if span < 0:
        raise ValueError(f"a {kernel}-wide pooling window does not fit {size} pixels (padding {padding}).")
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    right = max((out - 1) * stride + kernel - size - padding, 0)
    return out, right


def _pool_divisor(
    size: int, kernel: int, stride: int, padding: int, out: int, count_include_pad: bool
) -> np.ndarray:
    """PyTorch ``avg_pool2d``'s divisor along one axis: ``(out,)`` window extents.

    A window ``[o·stride − padding, +kernel)`` is clipped to the padded input ``[−padding, size +
    padding)`` (ceil mode's last window may reach beyond it); without ``count_include_pad`` it is
    clipped to the input itself.
    """
    start = np.arange(out) * stride - padding
    end = np.minimum(start + kernel, size + padding)
    if not count_include_pad:
        start, end = np.maximum(start, 0), np.minimum(end, size)
    return (end - start).astype(np.float32)


def _reduce_window(
    x: jax.Array, init: float, op: Callable, kernel: int, stride: int, padding: int, ceil_mode: bool
) -> jax.Array:
    """``op``-reduce ``kernel×kernel`` windows of an NHWC map with PyTorch's output geometry.

    ``init`` stays a Python scalar: JAX recognises ``(lax.max, -inf)`` and ``(lax.add, 0)`` as
    the max/sum window reductions (differentiable) only for a concrete identity element.
    """
    (out_h, right_h), (out_w, right_w) = (
        pool_geometry(n, kernel, stride, padding, ceil_mode) for n in x.shape[1:3]
    )
    y = jax.lax.reduce_window(
        x,
        init,
        op,
        (1, kernel, kernel, 1),
        (1, stride, stride, 1),
        ((0, 0), (padding, right_h), (padding, right_w), (0, 0)),
    )
    return y[:, :out_h, :out_w, :]


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = True) -> jax.Array:
    """``torch.nn.MaxPool2d(kernel, stride, padding, ceil_mode=...)`` on NHWC (padding is −∞)."""
    return _reduce_window(x, -jnp.inf, jax.lax.max, kernel, stride, padding, ceil_mode)


def avg_pool(
    x: jax.Array,
    kernel: int,
    stride: int,
    padding: int = 0,
    ceil_mode: bool = True,
    count_include_pad: bool = True,
) -> jax.Array:
    """``torch.nn.AvgPool2d(kernel, stride, padding, ceil_mode, count_include_pad)`` on NHWC.

    Sums in float32 (a bfloat16 sum of 9 values would lose 2–3 bits) and divides by PyTorch's
    per-position divisor (``_pool_divisor``).
    """
    total = _reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, kernel, stride, padding, ceil_mode)
    divisor_h, divisor_w = (
        _pool_divisor(n, kernel, stride, padding, out, count_include_pad)
        for n, out in zip(x.shape[1:3], total.shape[1:3], strict=True)
    )
    divisor = divisor_h[:, None, None] * divisor_w[None, :, None]
    return (total / divisor).astype(x.dtype)


# ----------------------------------------------------------------------------- sizes


def feature_sizes(size: int) -> dict[str, int]:
    """The side of the feature map entering each stage (``pool2``, ``3c``, ``4e``) and leaving 4e."""
    conv1 = (size + 2 * 3 - 7) // 2 + 1
    pool1 = pool_geometry(conv1, 3, 2, 0, True)[0]
    pool2 = pool_geometry(pool1, 3, 2, 0, True)[0]
    after_3c = (pool2 + 2 - 3) // 2 + 1
    after_4e = (after_3c + 2 - 3) // 2 + 1
    return {"pool2": pool2, "inception_3c": pool2, "inception_4e": after_3c, "output": after_4e}


def _reduction_fits(size: int) -> bool:
    """Whether a reduction block's 3×3/2 convs (padding 1) and its 3×3/2 ceil-mode max-pool give
    maps of one size, which their concatenation needs (true for even sides only)."""
    return size >= 2 and (size + 2 - 3) // 2 + 1 == pool_geometry(size, 3, 2, 0, True)[0]


def is_valid_image_size(size: int) -> bool:
    """Whether BN-Inception (ours and PyTorch's) can take ``size``-pixel sides: both reductions
    (3c, 4e) must see an even map."""
    if size < 8:
        return False
    sides = feature_sizes(size)
    return _reduction_fits(sides["inception_3c"]) and _reduction_fits(sides["inception_4e"])


def _check_size(size: int, axis: str) -> None:
    if is_valid_image_size(size):
        return
    nearby = [s for s in range(max(size - 40, 32), size + 41) if is_valid_image_size(s)]
    below = [s for s in nearby if s < size]
    above = [s for s in nearby if s > size]
    suggestion = ", ".join(str(s) for s in (below[-1:] + above[:1]))
    raise ValueError(
        f"BN-Inception cannot take images {size} px {axis}: its inception_3c/4e blocks concatenate a "
        "stride-2 conv with a ceil-mode pool, which agree only on even feature maps (PyTorch's "
        f"network fails there too); use e.g. {suggestion or '224'} (224 and 227 work)."
    )


# ----------------------------------------------------------------------------- the network


class BNInception(nn.Module):
    """BN-Inception feature extractor (no global pool, no classifier).

    Attributes:
      frozen_bn: BatchNorm always in inference mode (running statistics frozen), Proxy-Anchor's
        ``bn_freeze``.
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters stay float32.

    BatchNorm momentum is Cadene's (PyTorch's default 0.1, Flax 0.9, as our ResNet). Proxy-Anchor
    passes ``momentum=0.9`` (PyTorch's convention), which only matters when the statistics
    update, i.e. never under its default ``bn_freeze``.
    """

    frozen_bn: bool = False
    dtype: Any = jnp.float32

    # The key of ``hdml_jax.models.preprocessing.PREPROCESSING`` for this network's inputs.
    preprocessing: ClassVar[str] = "bn_inception"
    num_features: ClassVar[int] = NUM_FEATURES

    def _conv_bn_relu(
        self, x: jax.Array, name: str, features: int, kernel: int, stride: int, train: bool
    ) -> jax.Array:
        pad = kernel // 2  # Cadene: padding 3 for 7×7, 1 for 3×3, 0 for 1×1 (symmetric)
        x = nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=True,
            kernel_init=conv_kernel_init,
            bias_init=_uniform_bias_init(x.shape[-1] * kernel * kernel),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name=name,
        )(x)
        x = norm_layer(train, self.frozen_bn, self.dtype, f"{name}_bn")(x)
        return nn.relu(x)

    def _inception(self, x: jax.Array, spec: tuple, train: bool) -> jax.Array:
        block, n1x1, n3x3_reduce, n3x3, ndouble_reduce, ndouble, pool, nproj = spec
        prefix = f"inception_{block}"
        stride = 2 if pool == "reduce" else 1
        branches = []
        if n1x1:
            branches.append(self._conv_bn_relu(x, f"{prefix}_1x1", n1x1, 1, 1, train))
        y = self._conv_bn_relu(x, f"{prefix}_3x3_reduce", n3x3_reduce, 1, 1, train)
        branches.append(self._conv_bn_relu(y, f"{prefix}_3x3", n3x3, 3, stride, train))
        y = self._conv_bn_relu(x, f"{prefix}_double_3x3_reduce", ndouble_reduce, 1, 1, train)
        y = self._conv_bn_relu(y, f"{prefix}_double_3x3_1", ndouble, 3, 1, train)
        branches.append(self._conv_bn_relu(y, f"{prefix}_double_3x3_2", ndouble, 3, stride, train))
        if pool == "reduce":
            branches.append(max_pool(x, 3, 2, 0, ceil_mode=True))
        else:
            pooled = avg_pool(x, 3, 1, 1) if pool == "avg" else max_pool(x, 3, 1, 1)
            branches.append(self._conv_bn_relu(pooled, f"{prefix}_pool_proj", nproj, 1, 1, train))
        return jnp.concatenate(branches, axis=-1)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """``(N, H, W, 3)`` normalised BGR images → ``(N, H', W', 1024)`` (7×7 at 224 px).

        Raises:
          ValueError: not NHWC with 3 channels, or a side the network cannot take
            (``is_valid_image_size``).
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"BNInception expects NHWC images with 3 channels, got shape {images.shape}.")
        _check_size(images.shape[1], "high")
        _check_size(images.shape[2], "wide")
        x = images.astype(self.dtype)
        x = self._conv_bn_relu(x, "conv1_7x7_s2", 64, 7, 2, train)
        x = max_pool(x, 3, 2, 0, ceil_mode=True)  # pool1_3x3_s2
        x = self._conv_bn_relu(x, "conv2_3x3_reduce", 64, 1, 1, train)
        x = self._conv_bn_relu(x, "conv2_3x3", 192, 3, 1, train)
        x = max_pool(x, 3, 2, 0, ceil_mode=True)  # pool2_3x3_s2
        for spec in INCEPTION_BLOCKS:
            x = self._inception(x, spec, train)
        return x
