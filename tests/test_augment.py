"""``dataset.augment``: flips on or off, crop ranges, colour jitter, greyscale and rotation, each
against an independent reference (PIL's ``ImageEnhance``, ``colorsys``, ``Image.rotate``), and
the presets bit for bit as they were when nothing is overridden."""

from __future__ import annotations

import colorsys
import dataclasses
import json

import ml_collections
import numpy as np
import PIL
import pytest
from PIL import Image

from hdml_jax import config as config_lib
from hdml_jax.data import augment, transforms
from hdml_jax.data.augment import Augmentation
from hdml_jax.errors import ConfigError
from tests import transform_outputs


def _image(seed: int = 0, height: int = 40, width: int = 56) -> np.ndarray:
    """Asymmetric both ways (gradients plus noise), so that any flip or rotation shows."""
    return transform_outputs.images()[seed % 4][:height, :width]


def test_presets_are_bit_identical_to_the_record_when_nothing_is_overridden():
    record = json.loads(transform_outputs.FIXTURE.read_text())
    if record["pillow"].split(".")[:2] != PIL.__version__.split(".")[:2]:
        pytest.skip(
            f"recorded with Pillow {record['pillow']}, whose resize arithmetic this {PIL.__version__} may not share"
        )
    assert transform_outputs.hashes() == record["cases"]


@pytest.mark.parametrize("name", sorted(transforms.TRANSFORMS))
def test_the_default_augmentation_is_the_preset(name):
    default = transforms.TRANSFORMS[name](32)
    assert transforms.preset(name, 32, augment=Augmentation()) == default
    assert (
        transforms.preset(name, 32, augment=config_lib.base_config("cub200", "proxy_anchor").dataset.augment)
        == default
    )
    # Everything drawn after the crop changes the train transform only.
    jittered = transforms.preset(
        name, 32, augment=Augmentation(brightness=0.4, rotation=10, vertical_flip=True)
    )
    assert jittered.eval == default.eval


@pytest.mark.parametrize("name", sorted(transforms.TRANSFORMS))
@pytest.mark.parametrize("axis", ["horizontal", "vertical"])
def test_flips_on_and_off(name, axis):
    # The flip is drawn after the crop, so with the same seed the crop is the same, mirrored or not.
    image = _image(1)
    if axis == "horizontal":
        plain, flipping, mirror = Augmentation(horizontal_flip=False), Augmentation(), lambda x: x[:, ::-1]
    else:
        plain, flipping, mirror = Augmentation(), Augmentation(vertical_flip=True), lambda x: x[::-1]
    plain = transforms.preset(name, 24, augment=plain).train
    flipping = transforms.preset(name, 24, augment=flipping).train
    mirrored = 0
    for seed in range(24):
        a, b = plain(image, np.random.default_rng(seed)), flipping(image, np.random.default_rng(seed))
        assert np.array_equal(a, b) or np.array_equal(mirror(a), b), seed
        mirrored += not np.array_equal(a, b)
    assert 4 <= mirrored <= 20  # about half of 24


def test_horizontal_flip_off_never_mirrors():
    # Each seed's crop without its flip draw: the flip-off transform must be exactly that crop.
    image = _image(2)
    on = transforms.preset("proxy_anchor", 24).train
    off = transforms.preset("proxy_anchor", 24, augment=Augmentation(horizontal_flip=False)).train
    for seed in range(16):
        rng = np.random.default_rng(seed)
        box = on.crop_params(*image.shape[:2], rng)
        expected = transforms._resize_box(image, 24, (box[1], box[0], box[1] + box[3], box[0] + box[2]))
        assert np.array_equal(off(image, np.random.default_rng(seed)), expected)


def test_crop_ranges_reach_the_transform():
    augment = Augmentation(crop_scale=(0.5, 0.6), crop_ratio=(1.0, 1.0))
    train = transforms.preset("proxy_anchor", 32, augment=augment).train
    assert (train.scale, train.ratio) == ((0.5, 0.6), (1.0, 1.0))
    for seed in range(20):
        _, _, h, w = train.crop_params(100, 100, np.random.default_rng(seed))
        assert h == w and 0.5 * 10_000 - 200 <= h * w <= 0.6 * 10_000 + 200  # rounding of the side
    assert transforms.preset("synthetic", 32, augment=Augmentation(crop_padding=1)).train.padding == 1
    assert transforms.preset("mlrc", 32).train.scale == (0.16, 1.0)


def _luma(x: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of float RGB, ``0.299 R + 0.587 G + 0.114 B``."""
    return x @ np.array([0.299, 0.587, 0.114])


def _reference_jitter(image, rng, brightness, contrast, saturation, hue):
    """torchvision's ColorJitter from its formulas, in float64, with the same draws: brightness
    ``f · x``, contrast ``m + f · (x - m)`` (``m``: the mean luma, rounded as PIL's
    ``ImageEnhance.Contrast`` rounds it), saturation ``g + f · (x - g)`` (``g``: the luma), hue
    through ``colorsys`` by ``trunc(255 · shift) / 255`` of a turn (torchvision's uint8 step);
    each step clipped to 0..255 and rounded to an integer, as PIL stores every step."""
    order = rng.permutation(4)
    x = image.astype(np.float64)
    for op in order:
        if op == 0 and brightness:
            x = rng.uniform(max(0, 1 - brightness), 1 + brightness) * x
        elif op == 1 and contrast:
            mean = int(np.mean(np.round(_luma(x))) + 0.5)
            x = mean + rng.uniform(max(0, 1 - contrast), 1 + contrast) * (x - mean)
        elif op == 2 and saturation:
            grey = np.round(_luma(x))[..., None]
            x = grey + rng.uniform(max(0, 1 - saturation), 1 + saturation) * (x - grey)
        elif op == 3 and hue:
            step = int(rng.uniform(-hue, hue) * 255) / 255
            pixels = x / 255.0
            out = np.empty_like(pixels)
            for index in np.ndindex(pixels.shape[:2]):
                h, s, v = colorsys.rgb_to_hsv(*pixels[index])
                out[index] = colorsys.hsv_to_rgb((h + step) % 1.0, s, v)
            x = out * 255.0
        else:
            continue
        x = np.round(np.clip(x, 0, 255))
    return x


@pytest.mark.parametrize(
    "jitter, levels",
    [
        # PIL's fixed-point blend against float64: within one grey level.
        ({"brightness": 0.5}, 1),
        ({"contrast": 0.5}, 1),
        ({"saturation": 0.8}, 1),
        # PIL's uint8 HSV round trip: H truncated to 1/255 of a turn (up to 6 levels of a
        # channel), S and V to 1/255 (a level each), the output rounded: within 9 levels
        # (measured: at most 8, about 0.5 on average).
        ({"hue": 0.3}, 9),
    ],
)
def test_each_colour_jitter_matches_its_formula(jitter, levels):
    image = _image(0, 20, 24)
    values = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, **jitter}
    for seed in range(6):
        ours = augment.color_jitter(image, np.random.default_rng(seed), **values)
        reference = _reference_jitter(image, np.random.default_rng(seed), **values)
        difference = np.abs(ours.astype(int) - reference)
        assert difference.max() <= levels and difference.mean() <= 1.0, seed


def test_all_four_jitters_in_torchvisions_random_order():
    # The order matters (contrast after brightness is not contrast before it): it is drawn first.
    image = _image(3, 20, 24)
    values = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
    orders = set()
    for seed in range(8):
        orders.add(tuple(np.random.default_rng(seed).permutation(4)))
        ours = augment.color_jitter(image, np.random.default_rng(seed), **values)
        reference = _reference_jitter(image, np.random.default_rng(seed), **values)
        # The steps' differences (≤ 1, 1, 1 and 9 levels) carried through factors ≤ 1.4.
        difference = np.abs(ours.astype(int) - reference)
        assert difference.max() <= 1.4**3 * 12 and difference.mean() <= 2.0, seed
    assert len(orders) > 1


def test_greyscale_is_pils_luma_and_rotation_is_pils_rotate():
    image = _image(1, 24, 24)
    grey = Augmentation(horizontal_flip=False, grayscale=1.0)
    out = transforms.preset("synthetic", 24, augment=dataclasses.replace(grey, crop_padding=0)).train(
        image, np.random.default_rng(0)
    )
    expected = np.asarray(Image.fromarray(image).convert("L"))
    assert np.array_equal(out, np.repeat(expected[:, :, None], 3, axis=2))
    turn = Augmentation(horizontal_flip=False, rotation=15.0, crop_padding=0)
    train = transforms.preset("synthetic", 24, augment=turn).train
    for seed in range(3):
        rng = np.random.default_rng(seed)
        rng.integers(0, 1, size=2)  # the pad-and-crop's offsets (padding 0: always 0)
        angle = rng.uniform(-15.0, 15.0)
        expected = np.asarray(Image.fromarray(image).rotate(angle, Image.BILINEAR))
        assert np.array_equal(train(image, np.random.default_rng(seed)), expected)
        assert -15.0 <= angle <= 15.0


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"crop_scale": (0.0, 1.0)}, r"crop_scale must lie in \(0, 1\]"),
        ({"crop_scale": (0.5, 1.5)}, r"crop_scale must lie in \(0, 1\]"),
        ({"crop_scale": (0.9, 0.5)}, "low <= high"),
        ({"crop_ratio": (-1.0, 1.0)}, "crop_ratio must be positive"),
        ({"brightness": -0.1}, "brightness must be >= 0"),
        ({"hue": 0.7}, "hue must be at most 0.5"),
        ({"grayscale": 1.5}, "grayscale is a probability"),
        ({"rotation": -5.0}, "rotation must be >= 0"),
        ({"crop_padding": 4}, "crop_padding applies to the synthetic transforms, not 'proxy_anchor'"),
    ],
)
def test_bad_augment_fields_are_one_line_config_errors(fields, message):
    c = config_lib.base_config("cub200", "proxy_anchor")
    for name, value in fields.items():
        setattr(c.dataset.augment, name, value)
    with pytest.raises(ConfigError, match=message) as caught:
        config_lib.validate(c)
    assert "\n" not in str(caught.value)


def test_crop_fields_of_another_preset_are_refused():
    c = config_lib.base_config("cub200", "cgd")
    c.dataset.augment.crop_scale = (0.2, 1.0)
    with pytest.raises(
        ConfigError, match="crop_scale applies to the proxy_anchor, proxynca_pp, mlrc transforms, not 'cgd'"
    ):
        config_lib.validate(c)


def test_the_trainers_transform_reads_the_config():
    from hdml_jax.training import setup

    c = config_lib.base_config("cub200", "proxy_anchor")
    c.dataset.image_size = 32
    c.dataset.augment.horizontal_flip = False
    c.dataset.augment.brightness = 0.2
    pair = setup._transform_pair(c)
    assert pair.train.flip is False and pair.train.after_crop.brightness == 0.2
    # A config.json written before dataset.augment existed still builds the preset.
    old = ml_collections.ConfigDict(c.to_dict())
    del old.dataset["augment"]
    assert setup._transform_pair(old) == transforms.TRANSFORMS["proxy_anchor"](32)
