"""What a training transform may do besides its crop: ``config.dataset.augment`` as ``Augmentation``.

The flips, colour jitter (torchvision's ``ColorJitter`` by its PIL path), greyscale and rotation
act on the ``size × size`` crop that ``transforms`` produced, drawn from the same generator after
the crop; with the defaults nothing is drawn, so a preset's output stays bit for bit the same.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True, kw_only=True)
class Augmentation:
    """What a training transform may do besides its crop (``config.dataset.augment``).

    ``None`` in a crop field means the preset's own value (the table in the module docstring).
    Every other default is what every preset does: a horizontal flip, nothing else.

    Attributes:
      horizontal_flip: mirror left to right with probability 1/2 (torchvision's
        ``RandomHorizontalFlip``). Turn it off where a mirror image is another class: text,
        digits, logos, arrows (``go-next`` vs ``go-previous``).
      vertical_flip: mirror top to bottom with probability 1/2 (``RandomVerticalFlip``).
      crop_scale, crop_ratio: ``RandomResizedCrop``'s area fraction range (within (0, 1]) and
        aspect-ratio range; the random-resized-crop presets only (proxy_anchor, proxynca_pp, mlrc).
      crop_padding: pad-and-crop's zero padding in pixels; the ``synthetic`` preset only.
      brightness, contrast, saturation, hue: torchvision's ``ColorJitter``: a factor drawn
        uniformly from ``[max(0, 1 - b), 1 + b]`` for the first three, a hue shift from
        ``[-h, h]`` turns (``h ≤ 0.5``), applied in a random order; 0 turns each off.
      grayscale: probability of ``RandomGrayscale`` (ITU-R 601 luma, in all three channels).
      rotation: ``RandomRotation(rotation)``: an angle drawn uniformly from ``[-r, r]`` degrees,
        bilinear, the corners filled black.

    The flips, jitter, greyscale and rotation act on the cropped ``size × size`` output, drawn
    from the same generator after the crop, in that order; with their defaults nothing more is
    drawn, so a preset's output is bit for bit what it was without this record.
    """

    horizontal_flip: bool = True
    vertical_flip: bool = False
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] | None = None
    crop_padding: int | None = None
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale: float = 0.0
    rotation: float = 0.0

    def __post_init__(self):
        for name in ("crop_scale", "crop_ratio"):
            value = getattr(self, name)
            if value is None:
                continue
            if len(value) != 2 or not all(isinstance(v, (int, float)) for v in value) or value[0] > value[1]:
                raise ValueError(
                    f"dataset.augment.{name} must be (low, high) with low <= high, got {value!r}."
                )
        if self.crop_scale is not None and not (0 < self.crop_scale[0] and self.crop_scale[1] <= 1):
            raise ValueError(f"dataset.augment.crop_scale must lie in (0, 1], got {tuple(self.crop_scale)}.")
        if self.crop_ratio is not None and self.crop_ratio[0] <= 0:
            raise ValueError(f"dataset.augment.crop_ratio must be positive, got {tuple(self.crop_ratio)}.")
        if self.crop_padding is not None and (
            not isinstance(self.crop_padding, int) or self.crop_padding < 0
        ):
            raise ValueError(
                f"dataset.augment.crop_padding must be an integer >= 0, got {self.crop_padding!r}."
            )
        for name in ("brightness", "contrast", "saturation", "hue", "grayscale", "rotation"):
            if getattr(self, name) < 0:
                raise ValueError(f"dataset.augment.{name} must be >= 0, got {getattr(self, name)}.")
        if self.hue > 0.5:
            raise ValueError(f"dataset.augment.hue must be at most 0.5 (a turn's half), got {self.hue}.")
        if self.grayscale > 1:
            raise ValueError(f"dataset.augment.grayscale is a probability (0 to 1), got {self.grayscale}.")
        if self.rotation > 180:
            raise ValueError(f"dataset.augment.rotation must be at most 180 degrees, got {self.rotation}.")

    @property
    def after_crop(self) -> bool:
        """Whether anything is drawn after the crop and flip (else the output is the crop's)."""
        jitter = (self.brightness, self.contrast, self.saturation, self.hue)
        return self.vertical_flip or any(jitter) or self.grayscale > 0 or self.rotation > 0

    def apply_after_crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The vertical flip, colour jitter, greyscale and rotation of a ``uint8 (S, S, 3)`` crop."""
        if self.vertical_flip and rng.random() < 0.5:
            image = image[::-1]
        if any((self.brightness, self.contrast, self.saturation, self.hue)):
            image = color_jitter(image, rng, self.brightness, self.contrast, self.saturation, self.hue)
        if self.grayscale > 0 and rng.random() < self.grayscale:
            image = np.repeat(_luma(image)[:, :, None], 3, axis=2)
        if self.rotation > 0:
            angle = rng.uniform(-self.rotation, self.rotation)
            image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).rotate(angle, Image.BILINEAR))
        return image


def _luma(image: np.ndarray) -> np.ndarray:
    """PIL's ``convert("L")``: ``L = (R·299 + G·587 + B·114) / 1000``, rounded (uint8)."""
    rgb = image.astype(np.uint32)
    return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> np.ndarray:
    """torchvision's ``ColorJitter`` on a ``uint8 (H, W, 3)`` image, by its PIL path.

    The order of the four operations is a random permutation, drawn first as
    ``ColorJitter.get_params`` draws it; a factor is drawn only for an enabled operation.
    Brightness, contrast and saturation are PIL's ``ImageEnhance`` (blends with black, with the
    mean grey level, with the grey image), hue turns the hue channel of PIL's uint8 HSV image by
    ``round(shift · 255)`` with wrap-around: each what torchvision's ``functional_pil`` calls,
    with its rounding to uint8 after every step.
    """
    from PIL import ImageEnhance

    order = rng.permutation(4)
    pil = Image.fromarray(np.ascontiguousarray(image))
    for op in order:
        if op == 0 and brightness > 0:
            pil = ImageEnhance.Brightness(pil).enhance(rng.uniform(max(0.0, 1 - brightness), 1 + brightness))
        elif op == 1 and contrast > 0:
            pil = ImageEnhance.Contrast(pil).enhance(rng.uniform(max(0.0, 1 - contrast), 1 + contrast))
        elif op == 2 and saturation > 0:
            pil = ImageEnhance.Color(pil).enhance(rng.uniform(max(0.0, 1 - saturation), 1 + saturation))
        elif op == 3 and hue > 0:
            pil = _turn_hue(pil, rng.uniform(-hue, hue))
    return np.asarray(pil)


def _turn_hue(image: Image.Image, shift: float) -> Image.Image:
    """torchvision's ``adjust_hue`` (``functional_pil``): the uint8 hue channel plus
    ``shift · 255`` truncated to an integer, modulo 256 (torchvision casts the float to uint8 and
    lets the sum wrap; the modulo is that cast made explicit for negative shifts)."""
    h, s, v = image.convert("HSV").split()
    step = np.uint8(int(shift * 255) % 256)
    turned = np.asarray(h, np.uint8) + step  # uint8 arithmetic: wraps around
    return Image.merge("HSV", (Image.fromarray(turned, "L"), s, v)).convert("RGB")
