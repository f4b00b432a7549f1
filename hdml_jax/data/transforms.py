"""Image augmentations in NumPy/PIL, deterministic given a ``numpy.random.Generator``.

Every transform maps one image to ``uint8 (size, size, 3)``::

    out = transform(image, rng, bbox=None)

``image`` is a ``uint8 (H, W, 3)`` array (or grey/RGBA) or an ``EncodedImage``: the bytes of an
image file, which the transform decodes itself, at a reduced scale and only down to the rows it
needs when the output allows (``hdml_jax.data.encoded``).

The resize is ``resample.bilinear`` in every preset: Pillow's bilinear filter with antialiasing,
in Pillow's arithmetic (a native SSE4.1 kernel when it was built, Pillow's own resize otherwise,
the same pixels either way), and it writes the horizontal flip at no cost. A ``reduce()``
pre-shrink (``reducing_gap``) is not used: after the reduced decode the factor left is below 2
(save past 1/8), where it would not apply, and elsewhere it would swap part of the bilinear
filter for a box.

``rng`` drives every random choice (the pipeline derives it from ``(seed, step, position)``, so
a batch is reproducible in any worker); eval transforms ignore it. With ``crop_to_bbox=True``
and a ``bbox`` (``[ymin, xmin, ymax, xmax]`` in ``[0, 1]``), the image is first cropped to the
box. Crop, resize and flip happen in one ``resample.bilinear(box=...)`` call from the original
image (bilinear with Pillow's antialiasing, as torchvision on PIL images), which resamples only
the pixels that are kept and interpolates once.

Normalisation: the pipeline ships ``uint8`` batches and the model normalises on device
(``steps.normalize_images``): 4× less host work and host→device traffic than float32, and the
subtraction/division fuse into the first convolution. ``normalize`` below is the same formula
for host-side use (tests, pictures).

Presets (``TRANSFORMS[name](size)`` → ``TransformPair(train, eval)``):

=============  ======================================================  ==============================
name           train                                                   eval
=============  ======================================================  ==============================
proxy_anchor   RandomResizedCrop(size, scale 0.08–1, ratio 3/4–4/3),   shorter side → 256/224·size,
               horizontal flip                                         centre crop size
proxynca_pp    the same (size 256)                                     shorter side → 288/256·size,
                                                                       centre crop size
cgd            resize to 252/224·size square, random crop size, flip   resize to size × size
mlrc           shorter side → 256/227·size, RandomResizedCrop(size,    shorter side → 256/227·size,
               scale 0.16–1, ratio 0.75–1.33), flip (size 227)         centre crop size (227)
synthetic      pad size/8 (zeros), random crop size, flip              resize to size (if needed)
=============  ======================================================  ==============================

``mlrc`` follows powerful-benchmarker's default transforms (``Resize(256)``,
``RandomResizedCrop(227, scale=(0.16, 1), ratio=(0.75, 1.33))``, flip; eval ``Resize(256)``,
``CenterCrop(227)``), scaled with ``size``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import numpy as np

from hdml_jax.data import resample
from hdml_jax.data.augment import Augmentation
from hdml_jax.data.encoded import EncodedImage, draft_scale, rows_reached

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def normalize(images):
    """``uint8 (..., 3)`` → float32 ``(x - mean) / std`` with ImageNet statistics (0–255 scale).

    Works on NumPy and JAX arrays alike; training does this on device instead.
    """
    return (images.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Any ``(H, W)``, ``(H, W, 1)``, ``(H, W, 2)`` (grey + alpha), ``(H, W, 3)`` or ``(H, W, 4)``
    uint8 image → ``(H, W, 3)`` uint8: grey repeated, alpha dropped."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}.")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}.")
    if image.shape[2] <= 2:
        return np.repeat(image[:, :, :1], 3, axis=2)
    if image.shape[2] == 4:
        return image[:, :, :3]
    return image


def crop_to_bbox(image: np.ndarray | EncodedImage, bbox: np.ndarray) -> np.ndarray | EncodedImage:
    """The pixels of ``image (H, W, C)`` inside ``bbox = [ymin, xmin, ymax, xmax]`` (fractions of H, W).

    The box is clipped to ``[0, 1]`` and rounded outwards to whole pixels, except that an edge
    within float32 noise of a pixel boundary (``0.2 · 10``) stays on it; at least one pixel is
    kept. Returns a view (an ``EncodedImage`` stays encoded, restricted to the box).
    """
    bbox = np.asarray(bbox, np.float64).reshape(-1)
    if bbox.shape != (4,):
        raise ValueError(f"bbox must be [ymin, xmin, ymax, xmax], got {bbox.shape[0]} values.")
    height, width = image.shape[:2]
    ymin, xmin, ymax, xmax = np.clip(bbox, 0.0, 1.0)
    y0 = min(_pixel_edge(ymin, height, upper=False), height - 1)
    x0 = min(_pixel_edge(xmin, width, upper=False), width - 1)
    y1 = max(_pixel_edge(ymax, height, upper=True), y0 + 1)
    x1 = max(_pixel_edge(xmax, width, upper=True), x0 + 1)
    if isinstance(image, EncodedImage):
        return image.crop(y0, x0, y1, x1)
    return image[y0:y1, x0:x1]


def _pixel_edge(fraction: float, size: int, upper: bool) -> int:
    """``fraction * size`` to a pixel edge: outward, except within float32 noise of an integer."""
    x = fraction * size
    nearest = round(x)
    if abs(x - nearest) < 1e-3:
        return int(nearest)
    return math.ceil(x) if upper else math.floor(x)


def resized_shorter_side(height: int, width: int, shorter: int) -> tuple[int, int]:
    """``(h, w)`` after torchvision's ``Resize(shorter)``: shorter side ``shorter``, aspect kept."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def _resize_box(
    image: np.ndarray | EncodedImage,
    size: int,
    box: tuple[float, float, float, float] | None = None,
    flip: bool = False,
) -> np.ndarray:
    """Crop ``box = (left, top, right, bottom)`` (pixels, floats; None: all) of ``image``,
    resize to size×size and mirror left to right if ``flip`` (an encoded JPEG decodes at a
    reduced scale when the box allows it)."""
    if isinstance(image, EncodedImage):
        return image.resized((size, size), box, flip)
    if box is not None:
        image = image[: rows_reached(box, size, draft_scale(box[2] - box[0], box[3] - box[1], size, size))]
    return resample.bilinear(image, (size, size), box, flip=flip)


def _draw_flip(rng: np.random.Generator) -> bool:
    """torchvision's ``RandomHorizontalFlip``: one uniform draw, flip below 1/2 (drawn after
    the crop, so the generator is consumed in torchvision's order)."""
    return rng.random() < 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageTransform:
    """Base: RGB conversion and the optional bbox crop, then ``apply``.

    Attributes:
      size: output side length (images come out ``(size, size, 3)`` uint8).
      crop_to_bbox: crop to the example's bbox (when it has one) before the transform.
      after_crop: the vertical flip, colour jitter, greyscale and rotation drawn after the crop
        (``Augmentation.apply_after_crop``); None: none (every eval transform).
    """

    size: int
    crop_to_bbox: bool = False
    after_crop: Augmentation | None = None
    is_random: ClassVar[bool] = False

    def __post_init__(self):
        if int(self.size) < 1:
            raise ValueError(f"size must be >= 1, got {self.size}.")

    def __call__(
        self,
        image: np.ndarray | EncodedImage,
        rng: np.random.Generator | None = None,
        *,
        bbox: np.ndarray | None = None,
    ) -> np.ndarray:
        """``uint8 (H, W, 3)`` (or grey/RGBA) or an ``EncodedImage`` → ``uint8 (size, size, 3)``."""
        if not isinstance(image, EncodedImage):
            image = as_rgb(image)
        if self.crop_to_bbox and bbox is not None:
            image = crop_to_bbox(image, bbox)
        if self.is_random and rng is None:
            raise ValueError(f"{type(self).__name__} is random: pass a numpy Generator.")
        out = self.apply(image, rng)
        if self.after_crop is not None and self.after_crop.after_crop:
            out = self.after_crop.apply_after_crop(np.asarray(out), rng)
        out = np.ascontiguousarray(out)
        if out.shape != (self.size, self.size, 3):  # pragma: no cover (a bug in a subclass)
            raise AssertionError(f"{self} produced {out.shape}.")
        return out

    def apply(self, image: np.ndarray | EncodedImage, rng: np.random.Generator | None) -> np.ndarray:
        """The transform proper: ``image`` is RGB (an array) or encoded; only ``image.shape`` and
        ``_resize_box`` may be used on it before the decode."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomResizedCrop(ImageTransform):
    """torchvision's ``RandomResizedCrop`` (+ horizontal flip), optionally after ``Resize(shorter)``.

    The crop (area fraction in ``scale``, log-uniform aspect ratio in ``ratio``, 10 tries, then
    the central crop with the ratio clamped) is drawn in the frame of the image resized to
    ``resize_shorter`` (when set) and applied to the original image in one resampling.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    resize_shorter: int | None = None
    is_random: ClassVar[bool] = True

    def crop_params(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop in an ``height × width`` frame."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            h, w = height, round(height * max(self.ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def apply(self, image, rng):
        height, width = image.shape[:2]
        frame_h, frame_w = (
            resized_shorter_side(height, width, self.resize_shorter)
            if self.resize_shorter
            else (height, width)
        )
        top, left, h, w = self.crop_params(frame_h, frame_w, rng)
        sy, sx = height / frame_h, width / frame_w
        flip = self.flip and _draw_flip(rng)
        return _resize_box(image, self.size, (left * sx, top * sy, (left + w) * sx, (top + h) * sy), flip)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CenterCrop(ImageTransform):
    """torchvision ``Resize(resize_shorter)`` then ``CenterCrop(size)``, in one resampling."""

    resize_shorter: int

    def apply(self, image, rng):
        del rng
        height, width = image.shape[:2]
        frame_h, frame_w = resized_shorter_side(height, width, self.resize_shorter)
        crop = min(self.size, frame_h, frame_w)
        top = round((frame_h - crop) / 2)
        left = round((frame_w - crop) / 2)
        sy, sx = height / frame_h, width / frame_w
        return _resize_box(image, self.size, (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SquareRandomCrop(ImageTransform):
    """CGD train: resize to ``resize_to × resize_to`` (aspect not kept), random ``size`` crop, flip."""

    resize_to: int
    flip: bool = True
    is_random: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.resize_to < self.size:
            raise ValueError(f"resize_to {self.resize_to} must be >= size {self.size}.")

    def apply(self, image, rng):
        height, width = image.shape[:2]
        top, left = (int(v) for v in rng.integers(0, self.resize_to - self.size + 1, size=2))
        sy, sx = height / self.resize_to, width / self.resize_to
        flip = self.flip and _draw_flip(rng)
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        return _resize_box(image, self.size, box, flip)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Resize(ImageTransform):
    """Resize to ``size × size`` (aspect not kept); a no-op for images already that size."""

    def apply(self, image, rng):
        del rng
        if image.shape[:2] == (self.size, self.size):
            return np.asarray(image)
        return _resize_box(image, self.size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PadRandomCrop(ImageTransform):
    """Small images: resize to ``size`` if needed, zero-pad ``padding`` px, random ``size`` crop, flip."""

    padding: int = 4
    flip: bool = True
    is_random: ClassVar[bool] = True

    def apply(self, image, rng):
        if image.shape[:2] != (self.size, self.size):
            image = _resize_box(image, self.size)
        image = np.asarray(image)
        p = self.padding
        padded = np.pad(image, ((p, p), (p, p), (0, 0)))
        top, left = (int(v) for v in rng.integers(0, 2 * p + 1, size=2))
        out = padded[top : top + self.size, left : left + self.size]
        if self.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)


class TransformPair(NamedTuple):
    """The train (random) and eval (deterministic) transforms of one preset."""

    train: ImageTransform
    eval: ImageTransform


def _train_options(augment: Augmentation | None, preset: str, **crop_fields) -> tuple[dict, Augmentation]:
    """The keyword arguments ``augment`` gives the preset's train transform, and ``augment``.

    ``crop_fields`` maps the crop fields this preset has to its own defaults; a crop field set
    for a preset that has no such crop is refused (it would silently do nothing).
    """
    augment = augment or Augmentation()
    options = {"flip": augment.horizontal_flip}
    for field in ("crop_scale", "crop_ratio", "crop_padding"):
        value = getattr(augment, field)
        if field in crop_fields:
            options[crop_fields[field][0]] = crop_fields[field][1] if value is None else value
        elif value is not None:
            applies = {
                "crop_scale": "proxy_anchor, proxynca_pp, mlrc",
                "crop_ratio": "proxy_anchor, proxynca_pp, mlrc",
                "crop_padding": "synthetic",
            }
            raise ValueError(
                f"dataset.augment.{field} applies to the {applies[field]} transforms, not {preset!r}; "
                f"leave it unset (None) for {preset}."
            )
    if "scale" in options:
        options["scale"], options["ratio"] = tuple(options["scale"]), tuple(options["ratio"])
    return options, augment


def proxy_anchor(
    size: int = 224, *, crop_to_bbox: bool = False, augment: Augmentation | None = None
) -> TransformPair:
    """Proxy-Anchor (Kim et al. 2020): RandomResizedCrop + flip; eval resize 256/224·size, centre crop."""
    options, augment = _train_options(
        augment, "proxy_anchor", crop_scale=("scale", (0.08, 1.0)), crop_ratio=("ratio", (3 / 4, 4 / 3))
    )
    return TransformPair(
        train=RandomResizedCrop(size=size, crop_to_bbox=crop_to_bbox, after_crop=augment, **options),
        eval=CenterCrop(size=size, resize_shorter=round(size * 256 / 224), crop_to_bbox=crop_to_bbox),
    )


def proxynca_pp(
    size: int = 256, *, crop_to_bbox: bool = False, augment: Augmentation | None = None
) -> TransformPair:
    """ProxyNCA++ (Teh et al. 2020): RandomResizedCrop(256) + flip; eval Resize(288) → CenterCrop(256).

    euwern/proxynca_pp dataset/config.json:85-92 (sz_crop 256, sz_resize 288), dataset/utils.py:57-74.
    """
    options, augment = _train_options(
        augment, "proxynca_pp", crop_scale=("scale", (0.08, 1.0)), crop_ratio=("ratio", (3 / 4, 4 / 3))
    )
    return TransformPair(
        train=RandomResizedCrop(size=size, crop_to_bbox=crop_to_bbox, after_crop=augment, **options),
        eval=CenterCrop(size=size, resize_shorter=round(size * 288 / 256), crop_to_bbox=crop_to_bbox),
    )


def cgd(size: int = 224, *, crop_to_bbox: bool = False, augment: Augmentation | None = None) -> TransformPair:
    """CGD (Jun et al. 2019): square resize 252/224·size, random crop, flip; eval square resize."""
    options, augment = _train_options(augment, "cgd")
    return TransformPair(
        train=SquareRandomCrop(
            size=size,
            resize_to=round(size * 252 / 224),
            crop_to_bbox=crop_to_bbox,
            after_crop=augment,
            **options,
        ),
        eval=Resize(size=size, crop_to_bbox=crop_to_bbox),
    )


def mlrc(
    size: int = 227, *, crop_to_bbox: bool = False, augment: Augmentation | None = None
) -> TransformPair:
    """A Metric Learning Reality Check (Musgrave et al. 2020), 227 px by default."""
    shorter = round(size * 256 / 227)
    options, augment = _train_options(
        augment, "mlrc", crop_scale=("scale", (0.16, 1.0)), crop_ratio=("ratio", (0.75, 1.33))
    )
    return TransformPair(
        train=RandomResizedCrop(
            size=size, resize_shorter=shorter, crop_to_bbox=crop_to_bbox, after_crop=augment, **options
        ),
        eval=CenterCrop(size=size, resize_shorter=shorter, crop_to_bbox=crop_to_bbox),
    )


def synthetic(
    size: int = 32, *, crop_to_bbox: bool = False, augment: Augmentation | None = None
) -> TransformPair:
    """Small synthetic images: pad-and-crop + flip at native size; eval unchanged."""
    options, augment = _train_options(augment, "synthetic", crop_padding=("padding", max(1, size // 8)))
    return TransformPair(
        train=PadRandomCrop(size=size, crop_to_bbox=crop_to_bbox, after_crop=augment, **options),
        eval=Resize(size=size, crop_to_bbox=crop_to_bbox),
    )


def augmentation(fields) -> Augmentation:
    """``config.dataset.augment`` (a mapping of ``Augmentation``'s fields) as an ``Augmentation``;
    ``ValueError`` names a field out of range."""
    values = dict(fields)
    for name in ("crop_scale", "crop_ratio"):
        if values.get(name) is not None:
            values[name] = tuple(float(v) for v in values[name])
    return Augmentation(**values)


def preset(name: str, size: int, *, crop_to_bbox: bool = False, augment=None) -> TransformPair:
    """``TRANSFORMS[name](size, ...)`` with ``augment`` (an ``Augmentation`` or the config's mapping)."""
    if augment is not None and not isinstance(augment, Augmentation):
        augment = augmentation(augment)
    return TRANSFORMS[name](size, crop_to_bbox=crop_to_bbox, augment=augment)


TRANSFORMS: dict[str, Callable[..., TransformPair]] = {
    "proxy_anchor": proxy_anchor,
    "proxynca_pp": proxynca_pp,
    "cgd": cgd,
    "mlrc": mlrc,
    "synthetic": synthetic,
}
