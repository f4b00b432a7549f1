"""What each backbone expects of its input images: channel order, value range, mean and std.

The data pipeline ships ``uint8`` RGB images; the model normalises them on device
(``normalize``, called by ``hdml_jax.training.steps``) with its backbone's convention, so the same pipeline,
exported artifact and embedding tools serve every backbone and a config only names the backbone:

=============  =======  =========  ========================  ========================
backbone       order    range      mean                      std
=============  =======  =========  ========================  ========================
resnet         RGB      0–1        0.485, 0.456, 0.406       0.229, 0.224, 0.225
bn_inception   BGR      0–255      104, 117, 128             1, 1, 1
vit            RGB      0–1        0.485, 0.456, 0.406       0.229, 0.224, 0.225
vit_augreg     RGB      0–1        0.5, 0.5, 0.5             0.5, 0.5, 0.5
=============  =======  =========  ========================  ========================

``resnet`` is torchvision's ImageNet convention; ``bn_inception`` is Cadene's
``pretrained_settings['bninception']`` (a Caffe model: BGR, 0–255, per-channel mean only), also
what Proxy-Anchor feeds its BN-Inception. ``vit`` is the same ImageNet convention, which DINO's
and DeiT's weights were trained with; ``vit_augreg`` maps [0, 1] to [-1, 1], the inputs of the
Google-trained AugReg weights (timm's ``pretrained_cfg`` mean = std = 0.5). Means and stds are
listed in the model's channel order. A backbone module names its key in its ``preprocessing``
attribute (the ViT's depends on its weights: ``hdml_jax.models.vit_weights``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.errors import ConfigError
from hdml_jax.models.vit_weights import VIT_WEIGHTS


@dataclasses.dataclass(frozen=True)
class InputConvention:
    """One backbone's input convention.

    Attributes:
      channel_order: ``"RGB"`` or ``"BGR"``, the order of the channels the network takes.
      value_range: 1.0 (images scaled to [0, 1]) or 255.0 (pixel values as they are).
      mean, std: per channel, in ``channel_order`` and in units of ``value_range``.
    """

    channel_order: str
    value_range: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def mean_uint8(self) -> np.ndarray:
        """``mean`` on the 0–255 scale of the uint8 input, float32."""
        return np.array(self.mean, np.float32) * (255 / self.value_range)

    @property
    def std_uint8(self) -> np.ndarray:
        """``std`` on the 0–255 scale of the uint8 input, float32."""
        return np.array(self.std, np.float32) * (255 / self.value_range)

    def describe(self) -> dict[str, Any]:
        """The convention as ``normalize`` applies it, in words and numbers (``metadata.json`` of an
        exported model): ``value_range`` is that of the uint8 input ``x``, and ``mean`` and ``std``
        are on that same 0–255 scale, listed in ``channel_order``."""
        reorder = "reordered RGB → BGR, then " if self.channel_order == "BGR" else ""
        result: dict[str, Any] = {
            "where": "inside the exported function, on its uint8 RGB input x (0-255, not rescaled): "
            f"{reorder}(x - mean) / std per {self.channel_order} channel, x, mean and std all on the "
            "0-255 scale",
            "channel_order": self.channel_order,
            "value_range": [0, 255],
            "mean": [round(float(v), 6) for v in self.mean_uint8],
            "std": [round(float(v), 6) for v in self.std_uint8],
        }
        if self.value_range != 255.0:  # the recipe as usually written, on the backbone's own scale
            result["equivalent"] = (
                f"x / {255 / self.value_range:g} (a 0-{self.value_range:g} scale), then "
                f"(x - {list(self.mean)}) / {list(self.std)} on that scale"
            )
        return result


PREPROCESSING: dict[str, InputConvention] = {
    "resnet": InputConvention("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "bn_inception": InputConvention("BGR", 255.0, (104.0, 117.0, 128.0), (1.0, 1.0, 1.0)),
    "vit": InputConvention("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "vit_augreg": InputConvention("RGB", 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# ``config.model.backbone``'s values.
BACKBONES = ("resnet", "bn_inception", "vit")
# The ImageNet weights ``model.pretrained`` can name (downloaded and converted on first use), and
# the backbone each is for.
NAMED_WEIGHTS = {"torchvision": "resnet", "bninception": "bn_inception"} | dict.fromkeys(VIT_WEIGHTS, "vit")


def check_named_weights(pretrained: str, backbone: str) -> str | None:
    """The backbone the named weights ``pretrained`` are for (None: not a name, e.g. a directory).

    Raises:
      ConfigError: they are for another backbone than ``backbone`` (the message names the right ones).
    """
    owner = NAMED_WEIGHTS.get(pretrained)
    if owner is not None and owner != backbone:
        right = [name for name, weights_backbone in NAMED_WEIGHTS.items() if weights_backbone == backbone]
        named = f"model.pretrained={right[0]!r}, " if right else ""
        raise ConfigError(
            f"model.pretrained={pretrained!r} holds {owner} weights, but model.backbone={backbone!r}: "
            f"set {named}a converted directory, or 'none'."
        )
    return owner


def convention(backbone: str) -> InputConvention:
    """The ``InputConvention`` of ``backbone`` (a key of ``PREPROCESSING``)."""
    if backbone not in PREPROCESSING:
        raise ValueError(f"unknown input convention {backbone!r}; known: {', '.join(PREPROCESSING)}.")
    return PREPROCESSING[backbone]


def backbone_of(module: Any) -> str:
    """The ``PREPROCESSING`` key of a backbone module (its ``preprocessing`` class attribute);
    ``"resnet"`` for modules without one."""
    return getattr(module, "preprocessing", "resnet")


def normalize(images: jax.Array, backbone: str = "resnet", dtype: Any = jnp.float32) -> jax.Array:
    """uint8 ``(..., 3)`` RGB → float32 in ``backbone``'s convention (NumPy or JAX arrays).

    ``(x - mean) / std`` with the mean and std on the 0–255 scale: for ``resnet`` exactly the
    float32 arithmetic of ``hdml_jax.data.transforms.normalize``, bit for bit. ``dtype``: the
    arithmetic's (and the result's) dtype; float64 (with JAX's x64 mode) serves a float64 model,
    whose input would otherwise carry float32's rounding. The mean and std stay the float32
    constants above in every dtype, so the same images give the same numbers up to rounding.
    """
    spec = convention(backbone)
    x = images.astype(dtype)
    if spec.channel_order == "BGR":
        x = x[..., ::-1]
    return (x - spec.mean_uint8) / spec.std_uint8
