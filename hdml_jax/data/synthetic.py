"""``synthetic``: a generated fine-grained image data set with a true two-level hierarchy.

The embedded default data set: no download, no TensorFlow, rendered deterministically with NumPy.

Hierarchy
---------
* **Coarse families** (``coarse_label``, ``0..num_families-1``) differ by *structure*: disc, ring,
  square, triangle, cross, star, stripes, checker, ellipse, L-shape, arrow, hexagon, crescent,
  frame, clover, wave (``FAMILY_NAMES``).
* **Fine classes** (up to 8 per family) differ by three subtle, binary cues, each visible in one
  image:

  - *hue*: every family has two hues ``hue_gap`` apart (default 0.06 turn ≈ 22°): one of the
    pairs red/red-orange, chartreuse/green-chartreuse, cyan/azure-cyan, violet/purple-magenta,
    each pair shared by a quarter of the families (dealt from ``seed``), so colour alone names
    neither a family nor a class;
  - *texture*: solid fill vs. faint dark diagonal hatching (which turns with the shape);
  - *proportion*: a family-specific structural detail, e.g. thin vs. thick ring, 5 vs. 6 star
    points, 3 vs. 4 stripes, 3×3 vs. 4×4 checker cells, sharp vs. rounded square corners.

  Fine class ``k`` of a family uses cue bits ``_CUE_ORDER[k]``; the order is chosen so that
  fewer than 8 classes per family still vary every cue (with 4, any two differ in two cues).

**SOP-shaped layout** (``fine_identity="continuous"``, ``SOP_SHAPED``): instead of the three binary
cues, every fine class draws its own identity from ``seed`` — a hue anywhere on the colour
circle, a texture bit, a continuous proportion ``p ∈ [0, 1]`` (interpolating the family's two
variants where the shape allows; a threshold at 0.5 where it is discrete, e.g. star points) and
an aspect ratio — so a family can hold thousands of classes, some of them near-duplicates, as
SOP's products are. With ``images_per_class_mean`` the number of images varies per class, as in
SOP (2–12 per product, mean about 5.3): ``2 + Poisson(mean - 2)``, clipped to ``images_per_class``.

Intra-class variation (independent per image): position, scale, rotation (any angle), mirror
image, hue/saturation/brightness jitter and a lighting gradient on the shape, background colour
and gradient, background clutter (soft ellipses of random colours behind the shape, thin lines
of random colours in front of it) and additive Gaussian pixel noise.

Splits
------
Class-disjoint, and every family has fine classes on both sides: per family,
``train_classes_per_family`` of the ``classes_per_family`` fine classes (drawn from ``seed``) go
to train, the rest to test. ``label`` is remapped to ``0..C-1`` within each split (in order of
the global fine class); ``coarse_label`` is the family id in both splits; ``fine_class`` is the
global fine-class id ``family * classes_per_family + k``. Examples are stored class by class.

Example dicts (``split.source[i]``)::

    {"image": uint8 (image_size, image_size, 3), "label": int, "coarse_label": int,
     "fine_class": int}

Entry points
------------
* ``SyntheticConfig``: every generator parameter (see its docstring); ``SyntheticConfig()`` is the
  default data set (16 families × 8 classes × 40 images, 48 px: 3200 train images of 80 classes,
  1920 test images of 48 classes; about 4–5 s to render on one core).
* ``SOP_SHAPED``: the ``synthetic_sop`` data set, Stanford Online Products' shape scaled down about
  ten times (12 families × 200 classes, 2–12 images per class, mean about 5.3, 32 px; half the
  classes of every family on each side). See its comment for the statistics it follows.
* ``generate(config)``: the raw arrays of both splits.
* ``synthetic_in_memory(config)``: a ``MetricDataset`` over in-memory arrays.
* ``synthetic_builder.load_synthetic(data_dir, config)``: the same examples through a TFDS
  ``array_record`` data set, built on first use (``hdml_jax.data.synthetic_builder``).
* ``synthetic_preview.save_preview(path, config)``: a PNG grid, one row per family, one column per
  fine class.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from hdml_jax.data.base import ArraySource, MetricDataset, Split
from hdml_jax.data.synthetic_shapes import FAMILY_NAMES, family_sdf, hsv_to_rgb, over

# Cue bits of fine class k: bit 0 hue, bit 1 texture, bit 2 proportion.
_CUE_ORDER = (0b000, 0b011, 0b101, 0b110, 0b111, 0b100, 0b010, 0b001)
MAX_CLASSES_PER_FAMILY = len(_CUE_ORDER)
_PAIR_STARTS = (0.0, 0.25, 0.5, 0.75)  # first hue of a family's pair: red, chartreuse, cyan, violet

# Distinct random streams derived from the seed.
_TAG_IMAGES = 0
_TAG_FAMILY_HUE = 1
_TAG_SPLIT = 2
_TAG_CLASS_IDENTITY = 3
_TAG_CLASS_SIZES = 4

RECALL_KS = (1, 2, 4, 8)
SOP_RECALL_KS = (1, 10, 100)  # SOP's 1, 10, 100, 1000 without 1000: ~6k test images, ~5 per class
FINE_IDENTITIES = ("cues", "continuous")
ASPECT_RANGE = (0.7, 1.0)  # "continuous" classes: width / height of the shape before rotation


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generated data set (all of them; two equal configs give equal bytes).

    Attributes:
      num_families: coarse classes, ``1..16`` (the first ``num_families`` of ``FAMILY_NAMES``).
      classes_per_family: fine classes per family, ``2..8``.
      train_classes_per_family: of those, how many go to the train split (``1..classes_per_family-1``);
        the others are the test split's classes.
      images_per_class: images rendered per fine class (``>= 2``).
      image_size: side of the square RGB images in pixels (``>= 16``; 32–64 is the intended range).
      noise: standard deviation of the additive Gaussian pixel noise, in units of the full
        intensity range (0.04 ≈ 10 grey levels); 0 for none.
      clutter: amount of background clutter; scales the number of slots for clutter ellipses
        (``ceil(6·clutter)``, each filled with probability 0.7) and lines (``ceil(2·clutter)``,
        each filled with probability 0.5); 0 for none.
      scale_range: ``(min, max)`` radius of the main shape as a fraction of ``image_size``.
      position_jitter: the shape's centre moves up to this fraction of ``image_size`` from the
        image centre, in x and y independently.
      hue_jitter: per-image hue jitter of the shape, in turns (``±``, uniform).
      hue_gap: hue difference (turns) between a family's two colours; the pairs start at red,
        chartreuse, cyan and violet (1/4 turn apart).
      texture_contrast: how much the hatching of textured classes darkens the fill (0..1).
      seed: seeds everything: images, the hue pair of every family and the train/test split.
      fine_identity: how fine classes of a family differ: ``"cues"`` (the three binary cues, at
        most 8 classes per family) or ``"continuous"`` (per-class hue, texture bit, proportion
        and aspect drawn from ``seed``; any number of classes per family).
      images_per_class_mean: ``None``: every class has ``images_per_class`` images. A number
        ``m`` (``2 < m <= images_per_class``): each class draws ``2 + Poisson(m - 2)`` images,
        clipped to ``images_per_class`` (which is then the maximum), as SOP's 2–12 per product.
    """

    num_families: int = 16
    classes_per_family: int = 8
    train_classes_per_family: int = 5
    images_per_class: int = 40
    image_size: int = 48
    noise: float = 0.04
    clutter: float = 1.0
    scale_range: tuple[float, float] = (0.24, 0.38)
    position_jitter: float = 0.13
    hue_jitter: float = 0.012
    hue_gap: float = 0.06
    texture_contrast: float = 0.35
    seed: int = 0
    fine_identity: str = "cues"
    images_per_class_mean: float | None = None

    def __post_init__(self):
        if not 1 <= self.num_families <= len(FAMILY_NAMES):
            raise ValueError(f"num_families must be in 1..{len(FAMILY_NAMES)}, got {self.num_families}.")
        if self.fine_identity not in FINE_IDENTITIES:
            raise ValueError(f"fine_identity must be one of {FINE_IDENTITIES}, got {self.fine_identity!r}.")
        most = MAX_CLASSES_PER_FAMILY if self.fine_identity == "cues" else 100_000
        if not 2 <= self.classes_per_family <= most:
            raise ValueError(
                f"classes_per_family must be in 2..{most} with fine_identity={self.fine_identity!r}, "
                f"got {self.classes_per_family}."
            )
        if not 1 <= self.train_classes_per_family < self.classes_per_family:
            raise ValueError(
                "train_classes_per_family must leave at least one class per family on each side: "
                f"got {self.train_classes_per_family} of {self.classes_per_family}."
            )
        if self.images_per_class < 2:
            raise ValueError(f"images_per_class must be >= 2, got {self.images_per_class}.")
        mean = self.images_per_class_mean
        if mean is not None and not 2 < mean <= self.images_per_class:
            raise ValueError(
                f"images_per_class_mean must lie in (2, images_per_class={self.images_per_class}], got {mean}."
            )
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}.")
        if min(self.noise, self.clutter, self.hue_jitter, self.position_jitter) < 0:
            raise ValueError("noise, clutter, hue_jitter and position_jitter must be >= 0.")
        if not 0 < self.hue_gap < 0.25:
            raise ValueError(f"hue_gap must be in (0, 0.25), got {self.hue_gap}.")
        if not 0 < self.texture_contrast <= 1:
            raise ValueError(f"texture_contrast must be in (0, 1], got {self.texture_contrast}.")
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 0.5:
            raise ValueError(f"scale_range must satisfy 0 < min <= max <= 0.5, got {self.scale_range}.")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}.")
        object.__setattr__(self, "scale_range", (float(lo), float(hi)))

    @property
    def num_classes(self) -> int:
        """Fine classes in both splits together."""
        return self.num_families * self.classes_per_family

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly field values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SyntheticConfig:
        """Inverse of ``to_dict``."""
        values = dict(values)
        if "scale_range" in values:
            values["scale_range"] = tuple(values["scale_range"])
        return cls(**values)


# ``synthetic_sop``: Stanford Online Products' shape (reference.md §3: 22,634 products of 12
# super-classes; train 11,318 classes / 59,551 images, test 11,316 / 60,502, i.e. 5.26 and 5.35
# images per class; 2–12 images per product), scaled down about ten times so that a run fits a
# few minutes on 2 CPU cores: 12 families × 200 classes, half of each family's classes on each
# side, 2–12 images per class with mean about 5.3 (2 + Poisson(3.3), clipped at 12), 32 px.
# Families are equally large (SOP's per-super-class sizes are not used: unconfirmed here).
# Designed from these statistics before any HPL run; not tuned afterwards.
SOP_SHAPED = SyntheticConfig(
    num_families=12,
    classes_per_family=200,
    train_classes_per_family=100,
    images_per_class=12,
    images_per_class_mean=5.3,
    image_size=32,
    fine_identity="continuous",
)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, key)]))


# ----------------------------------------------------------------------------------------------
# Rendering.


def family_hues(config: SyntheticConfig) -> np.ndarray:
    """``(num_families, 2)`` hues (turns) of every family's two colours.

    There are ``len(_PAIR_STARTS)`` hue pairs ``(start, start + hue_gap)``; the families are dealt to them in a random order
    drawn from ``seed``, as evenly as possible, so each pair is shared by several families and
    colour says little about the family.
    """
    order = _rng(config.seed, _TAG_FAMILY_HUE).permutation(config.num_families)
    base = np.asarray(_PAIR_STARTS, np.float64)[np.argsort(order) % len(_PAIR_STARTS)]
    return np.stack([base, np.mod(base + config.hue_gap, 1.0)], axis=1)


def class_cues(fine: int) -> tuple[int, int, int]:
    """``(hue, texture, proportion)`` bits of fine class ``fine`` within its family."""
    bits = _CUE_ORDER[fine]
    return bits & 1, (bits >> 1) & 1, (bits >> 2) & 1


class ClassIdentity(NamedTuple):
    """What every image of a fine class shares (before per-image jitter).

    Attributes:
      hue: the shape's hue, in turns.
      texture: 1 for diagonal hatching, 0 for a solid fill.
      proportion: the family's structural detail, 0/1 or in ``[0, 1]`` (see ``family_sdf``).
      aspect: width / height of the shape before rotation (1 for ``"cues"`` classes).
    """

    hue: float
    texture: int
    proportion: float
    aspect: float


def class_identity(config: SyntheticConfig, family: int, fine: int) -> ClassIdentity:
    """The identity of fine class ``fine`` of ``family`` (from its cue bits or drawn from ``seed``)."""
    if config.fine_identity == "cues":
        hue_bit, texture, proportion = class_cues(fine)
        return ClassIdentity(float(family_hues(config)[family][hue_bit]), texture, proportion, 1.0)
    rng = _rng(config.seed, _TAG_CLASS_IDENTITY, family, fine)
    hue, texture, proportion, aspect = rng.random(4)
    lo, hi = ASPECT_RANGE
    return ClassIdentity(float(hue), int(texture < 0.5), float(proportion), float(lo + (hi - lo) * aspect))


@functools.lru_cache(maxsize=8)
def _class_sizes(config: SyntheticConfig) -> np.ndarray:
    shape = (config.num_families, config.classes_per_family)
    if config.images_per_class_mean is None:
        sizes = np.full(shape, config.images_per_class, np.int64)
    else:
        extra = _rng(config.seed, _TAG_CLASS_SIZES).poisson(config.images_per_class_mean - 2, shape)
        sizes = np.minimum(2 + extra, config.images_per_class).astype(np.int64)
    sizes.flags.writeable = False
    return sizes


def class_sizes(config: SyntheticConfig) -> np.ndarray:
    """``(num_families, classes_per_family)`` int64: the number of images of every fine class."""
    return _class_sizes(config).copy()


def render_class(config: SyntheticConfig, family: int, fine: int) -> np.ndarray:
    """All images of fine class ``fine`` (``0..classes_per_family-1``) of ``family``.

    Args:
      config: the generator parameters.
      family: coarse class, ``0..num_families-1``.
      fine: fine class within the family.

    Returns:
      ``(class_sizes(config)[family, fine], image_size, image_size, 3)`` uint8, a pure function
      of ``(config, family, fine)``.
    """
    if not (0 <= family < config.num_families and 0 <= fine < config.classes_per_family):
        raise ValueError(f"no class ({family}, {fine}) in {config}.")
    n, size = int(_class_sizes(config)[family, fine]), config.image_size
    rng = _rng(config.seed, _TAG_IMAGES, family, fine)
    identity = class_identity(config, family, fine)
    f32 = np.float32

    def uniform(lo, hi, shape=()):
        return rng.uniform(lo, hi, (n, *shape)).astype(f32)

    def col(a):  # (n, k) → (n, k, 1, 1) to broadcast over pixels
        return a[..., None, None]

    grid = (np.arange(size, dtype=f32) + 0.5) / size
    x, y = grid[None, None, :], grid[None, :, None]  # (1, 1, S), (1, S, 1) in [0, 1]
    pixel = f32(size)

    # Background: a dull colour with a linear gradient.
    bg = hsv_to_rgb(uniform(0, 1), uniform(0.0, 0.35), uniform(0.12, 0.6))  # (n, 3)
    angle, amp = uniform(0, 2 * math.pi)[:, None, None], uniform(0.0, 0.3)[:, None, None]
    ramp = amp * ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle))  # (n, S, S)
    image = bg[:, None, None, :] * (1.0 + ramp)[..., None]  # (n, S, S, 3)

    # Clutter behind the shape: soft ellipses of random colours.
    num_blobs = math.ceil(6 * config.clutter)
    if num_blobs:
        present = rng.random((n, num_blobs)) < 0.7
        cx, cy = uniform(0, 1, (num_blobs,)), uniform(0, 1, (num_blobs,))
        ra, rb = uniform(0.03, 0.13, (num_blobs,)), uniform(0.03, 0.13, (num_blobs,))
        rot = uniform(0, math.pi, (num_blobs,))
        colours = hsv_to_rgb(
            uniform(0, 1, (num_blobs,)), uniform(0.2, 0.9, (num_blobs,)), uniform(0.25, 0.9, (num_blobs,))
        )
        opacity = uniform(0.4, 0.9, (num_blobs,)) * present
        dx, dy = x - col(cx), y - col(cy)  # (n, K, S, S)
        c, s = col(np.cos(rot)), col(np.sin(rot))
        pu, pv = (c * dx + s * dy) / col(ra), (-s * dx + c * dy) / col(rb)
        dist = (np.hypot(pu, pv) - 1.0) * col(np.minimum(ra, rb)) * pixel
        alpha = np.clip(0.5 - dist, 0.0, 1.0) * col(opacity)
        for k in range(num_blobs):
            image = over(image, alpha[:, k], colours[:, k, None, None, :])

    # The shape.
    radius = uniform(*config.scale_range)
    jitter = config.position_jitter
    cx, cy = 0.5 + uniform(-jitter, jitter), 0.5 + uniform(-jitter, jitter)
    rot = uniform(0, 2 * math.pi)
    mirror = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(f32)
    c, s, r = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None], radius[:, None, None]
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    u = (c * dx + s * dy) / r * mirror[:, None, None]
    v = (-s * dx + c * dy) / r
    stretch = f32(1.0)
    if identity.aspect != 1.0:  # narrower along u; distances shrink by at most the aspect
        u, stretch = u / f32(identity.aspect), f32(identity.aspect)
    dist = family_sdf(family, u, v, identity.proportion) * r * pixel * stretch
    alpha = np.clip(0.5 - dist, 0.0, 1.0)

    # float64 like the family hue table (a weak Python float would round the sum to float32).
    hue = np.mod(np.float64(identity.hue) + uniform(-config.hue_jitter, config.hue_jitter), 1.0)
    fill = hsv_to_rgb(hue, uniform(0.6, 0.95), uniform(0.75, 1.0))[:, None, None, :]
    light, angle = uniform(0.0, 0.35)[:, None, None], uniform(0, 2 * math.pi)[:, None, None]
    gradient = (dx * np.cos(angle) + dy * np.sin(angle)) / r  # along the light, in shape radii
    shading = 0.9 * (1.0 + light * gradient)
    if identity.texture:
        period = f32(0.36)  # in shape radii: about 4–7 px at 48 px
        phase = uniform(0, 1)[:, None, None]
        wave = np.cos(2 * math.pi * ((u + v) / (period * math.sqrt(2)) + phase))
        hatch = np.clip(0.5 + wave * (period * r * pixel / (2 * math.pi)), 0.0, 1.0)
        shading = shading * (1.0 - config.texture_contrast * hatch)
    image = over(image, alpha, fill * shading[..., None])

    # Clutter in front: thin lines of random colours.
    num_lines = math.ceil(2 * config.clutter)
    if num_lines:
        present = rng.random((n, num_lines)) < 0.5
        ax_, ay_ = uniform(0, 1, (num_lines,)), uniform(0, 1, (num_lines,))
        direction = uniform(0, 2 * math.pi, (num_lines,))
        length = uniform(0.2, 0.6, (num_lines,))
        bx_, by_ = ax_ + length * np.cos(direction), ay_ + length * np.sin(direction)
        width = uniform(0.5, 1.2, (num_lines,)) / pixel
        colours = hsv_to_rgb(
            uniform(0, 1, (num_lines,)), uniform(0.0, 0.9, (num_lines,)), uniform(0.2, 1.0, (num_lines,))
        )
        opacity = uniform(0.5, 0.9, (num_lines,)) * present
        ex, ey = col(bx_ - ax_), col(by_ - ay_)
        px, py = x - col(ax_), y - col(ay_)
        t = np.clip((px * ex + py * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist = (np.hypot(px - t * ex, py - t * ey) - col(width)) * pixel
        alpha = np.clip(0.5 - dist, 0.0, 1.0) * col(opacity)
        for k in range(num_lines):
            image = over(image, alpha[:, k], colours[:, k, None, None, :])

    if config.noise:
        image = image + rng.standard_normal(image.shape, dtype=f32) * f32(config.noise)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Splits.


def train_classes(config: SyntheticConfig) -> np.ndarray:
    """``(num_families, classes_per_family)`` bool: which fine classes of each family are train classes."""
    mask = np.zeros((config.num_families, config.classes_per_family), bool)
    for family in range(config.num_families):
        order = _rng(config.seed, _TAG_SPLIT, family).permutation(config.classes_per_family)
        mask[family, order[: config.train_classes_per_family]] = True
    return mask


def split_labels(config: SyntheticConfig) -> dict[str, dict[str, np.ndarray]]:
    """The labels of both splits, in example order, without rendering any image.

    Returns:
      ``{"train": {...}, "test": {...}}``, each ``{"label", "coarse_label", "fine_class"}`` as
      ``(N,)`` int64.
    """
    mask = train_classes(config)
    sizes = _class_sizes(config)
    result = {}
    for split, wanted in (("train", True), ("test", False)):
        families, fines = np.nonzero(mask == wanted)  # row-major: in global fine-class order
        per_class = sizes[families, fines]
        fine_class = np.repeat(families * config.classes_per_family + fines, per_class).astype(np.int64)
        result[split] = {
            "label": np.repeat(np.arange(len(families)), per_class).astype(np.int64),
            "coarse_label": np.repeat(families, per_class).astype(np.int64),
            "fine_class": fine_class,
        }
    return result


def generate(config: SyntheticConfig | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Render the whole data set.

    Args:
      config: the generator parameters (default ``SyntheticConfig()``).

    Returns:
      ``{"train": {...}, "test": {...}}``, each with ``"image"`` ``(N, S, S, 3)`` uint8 and
      ``"label"``, ``"coarse_label"``, ``"fine_class"`` ``(N,)`` int64 (see ``split_labels``).
    """
    config = config or SyntheticConfig()
    result = split_labels(config)
    for arrays in result.values():
        classes = np.unique(arrays["fine_class"])  # sorted: the order of the examples
        images = [render_class(config, *divmod(int(g), config.classes_per_family)) for g in classes]
        arrays["image"] = np.concatenate(images) if images else np.zeros((0, *_image_shape(config)), np.uint8)
    return result


def _image_shape(config: SyntheticConfig) -> tuple[int, int, int]:
    return (config.image_size, config.image_size, 3)


def dataset_name(config: SyntheticConfig) -> str:
    """``"synthetic_sop"`` for ``SOP_SHAPED``, else ``"synthetic"``."""
    return "synthetic_sop" if config == SOP_SHAPED else "synthetic"


def recall_ks(config: SyntheticConfig) -> tuple[int, ...]:
    """SOP's Ks (1, 10, 100) for variable class sizes (few images per class), else CUB's 1, 2, 4, 8."""
    return SOP_RECALL_KS if config.images_per_class_mean is not None else RECALL_KS


def metric_dataset(
    config: SyntheticConfig, make_source: Callable[[str], Any], labels: dict[str, dict[str, np.ndarray]]
) -> MetricDataset:
    name = dataset_name(config)
    splits = {
        split: Split(
            source=make_source(split),
            labels=labels[split]["label"],
            coarse_labels=labels[split]["coarse_label"],
            name=f"{name}/{split}",
        )
        for split in ("train", "test")
    }
    return MetricDataset(name=name, train=splits["train"], test=splits["test"], recall_ks=recall_ks(config))


def synthetic_in_memory(config: SyntheticConfig | None = None) -> MetricDataset:
    """The data set rendered into memory (no TFDS): the same examples as ``synthetic_builder.load_synthetic``.

    Args:
      config: the generator parameters (default ``SyntheticConfig()``).
    """
    data = generate(config)
    name = dataset_name(config or SyntheticConfig())
    return metric_dataset(
        config or SyntheticConfig(), lambda split: ArraySource(data[split], f"{name}/{split}"), data
    )


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
