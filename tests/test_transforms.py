"""Transforms on encoded images: reduced-scale JPEG decoding keeps the crops, the flips and (within
a few grey levels) the pixels of the full decode; arrays keep working as before."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
from PIL import Image

from hdml_jax.data import encoded, jpeg, pipeline, sampling, transforms
from hdml_jax.data.base import Split
from hdml_jax.data.encoded import EncodedImage


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random colour field + horizontal gradient + pixel noise (σ 10), uint8."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    gradient = np.linspace(-40, 40, width, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 10, (height, width, 3)).astype(np.float32)
    return np.clip(field + gradient + noise, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """CUB-sized JPEGs, both orientations, quality 90."""
    return [encode(photo_like(*((375, 500) if i % 2 else (500, 375)), seed=i), quality=90) for i in range(6)]


class _Recorder:
    """Stands in for ``EncodedImage.resized``: records the box, decodes nothing, returns an image
    dark on the left and bright on the right, mirrored when asked (so a flip shows)."""

    def __init__(self):
        self.boxes = []

    def __call__(self, image, size, box=None, flip=False):
        self.boxes.append(tuple(box))
        pixels = np.zeros((size[1], size[0], 3), np.uint8)
        pixels[:, size[0] // 2 :] = 255
        return pixels[:, ::-1] if flip else pixels


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic ``max |F_a - F_b|``."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def _reference_crop(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop parameters, ``(top, left, h, w)``, written from its
    definition: area fraction uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``,
    10 tries, then the whole image with the ratio clamped, centred."""
    for _ in range(10):
        target = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


# ----------------------------------------------------------------------------- the draft rule


def test_draft_scale_never_leaves_fewer_pixels_than_the_output():
    assert encoded.draft_scale(447.9, 1000, 224, 224) == 1
    assert encoded.draft_scale(448, 448, 224, 224) == 2
    assert encoded.draft_scale(900, 1000, 224, 224) == 4
    assert encoded.draft_scale(1792, 5000, 224, 224) == 8
    assert encoded.draft_scale(5000, 5000, 224, 224) == 8  # libjpeg goes no lower than 1/8
    assert encoded.draft_scale(100, 100, 224, 224) == 1  # upsampling: full decode, as always
    rng = np.random.default_rng(0)
    for w, h in rng.uniform(1, 3000, (500, 2)):
        s = encoded.draft_scale(w, h, 224, 160)
        assert s == 1 or (w / s >= 224 and h / s >= 160)
        if s < 8:  # the largest such scale
            assert w / (2 * s) < 224 or h / (2 * s) < 160


# ----------------------------------------------------------------------------- statistics


def test_crops_and_flips_are_those_of_arrays_and_of_the_reference(jpegs, monkeypatch):
    """The encoded path draws the same crop boxes and flips as the array path, from the same
    random numbers (the crop is drawn in the full image's coordinates before any decode), and their
    distribution is RandomResizedCrop's: area fraction and log aspect ratio against an independent
    sample of the reference definition (KS), the flip rate against a binomial bound."""
    transform = transforms.proxy_anchor(224).train
    data = jpegs[1]  # 500 wide, 375 high
    pixels = np.asarray(EncodedImage(data))
    draws = 3000

    recorder = _Recorder()
    monkeypatch.setattr(
        EncodedImage, "resized", lambda self, size, box=None, flip=False: recorder(self, size, box, flip)
    )
    flips, after = [], []
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        out = transform(EncodedImage(data), rng)
        flips.append(out[0, 0, 0] == 255)
        after.append(rng.random())  # the generator's state after the crop and the flip
    encoded_boxes = np.array(recorder.boxes)

    array_boxes = []
    real_resize = transforms._resize_box

    def spy(image, size, box=None, flip=False):
        array_boxes.append(tuple(box))
        return real_resize(image, size, box, flip)

    monkeypatch.setattr(transforms, "_resize_box", spy)
    for seed in range(0, draws, 10):  # a tenth: the full resize is slower
        rng = np.random.default_rng(seed)
        transform(pixels, rng)
        assert rng.random() == after[seed]  # the same random numbers consumed, flip included
    np.testing.assert_array_equal(np.array(array_boxes), encoded_boxes[::10])  # the same boxes

    # The recorder's image shows the flip: binomial(3000, 1/2), ±4.5σ.
    assert abs(np.sum(flips) - draws / 2) <= 4.5 * math.sqrt(draws / 4)

    # Crop statistics against the reference definition (independent sample, other seeds).
    left, top, right, bottom = encoded_boxes.T
    w, h = right - left, bottom - top
    ref = np.array([_reference_crop(375, 500, np.random.default_rng(10**6 + s)) for s in range(draws)])
    ref_h, ref_w = ref[:, 2], ref[:, 3]
    critical = 1.95 * math.sqrt(2 / draws)  # KS two-sample, α = 0.001
    assert _ks_statistic(w * h / (375 * 500), ref_w * ref_h / (375 * 500)) < critical
    assert _ks_statistic(np.log(w / h), np.log(ref_w / ref_h)) < critical
    assert _ks_statistic(left, ref[:, 1].astype(float)) < critical
    assert _ks_statistic(top, ref[:, 0].astype(float)) < critical


def test_the_crop_comes_before_the_decode(jpegs):
    """Pinned: the crops drawn for seed 0 (unchanged since before encoded inputs existed)."""
    rng = np.random.default_rng(0)
    params = [transforms.proxy_anchor().train.crop_params(375, 500, rng) for _ in range(4)]
    assert params == [(35, 302, 171, 129), (2, 113, 371, 380), (45, 7, 264, 253), (101, 194, 182, 200)]
    rng = np.random.default_rng(0)
    params = [transforms.mlrc().train.crop_params(256, 341, rng) for _ in range(2)]
    assert params == [(18, 186, 150, 113), (82, 7, 108, 132)]
    # An encoded image consumes the generator exactly as its pixels do.
    for name in sorted(transforms.TRANSFORMS):
        train = transforms.TRANSFORMS[name](32).train
        a, b = np.random.default_rng(7), np.random.default_rng(7)
        train(EncodedImage(jpegs[0]), a)
        train(np.asarray(EncodedImage(jpegs[0])), b)
        assert a.random() == b.random(), name


# ----------------------------------------------------------------------------- pixels


def test_reduced_decode_matches_full_decode(jpegs, monkeypatch):
    """Decoded at 1/2, 1/4 or 1/8 and resized, the output stays within a few grey levels of full
    decode + the same resize: per image mean |difference| ≤ 2 levels (measured ≈ 0.5), no bias."""
    drafts = []
    real_decode = EncodedImage._decode_top

    def counting_decode(self, rows, reduction):
        pixels, scale = real_decode(self, rows, reduction)
        if scale > 1:
            drafts.append(scale)
        return pixels, scale

    monkeypatch.setattr(EncodedImage, "_decode_top", counting_decode)
    differences = []
    for size in (64, 112):
        pair = transforms.proxy_anchor(size)
        for data in jpegs:
            full = np.asarray(EncodedImage(data))
            for seed in range(8):
                ours = pair.train(EncodedImage(data), np.random.default_rng(seed)).astype(np.int16)
                reference = pair.train(full, np.random.default_rng(seed)).astype(np.int16)
                differences.append(ours - reference)
            differences.append(pair.eval(EncodedImage(data)).astype(np.int16) - pair.eval(full))
        bbox = np.array([0.05, 0.1, 0.95, 0.8])
        cropped = transforms.proxy_anchor(size, crop_to_bbox=True).eval
        full = np.asarray(EncodedImage(jpegs[0]))
        differences.append(
            cropped(EncodedImage(jpegs[0]), bbox=bbox).astype(np.int16) - cropped(full, bbox=bbox)
        )
    assert len(drafts) > len(differences) // 2  # most of them did decode at a reduced scale
    per_image = np.array([np.abs(d).mean() for d in differences])
    assert per_image.max() <= 2.0, per_image.max()
    assert per_image.mean() <= 1.0, per_image.mean()
    assert abs(np.mean([d.mean() for d in differences])) <= 0.3


_JPEG_KINDS = {
    "4:2:0": {"subsampling": 2},
    "4:2:2": {"subsampling": 1},
    "4:4:4": {"subsampling": 0},
    "restart markers": {"restart_marker_rows": 1},
    "optimized tables": {"optimize": True},
    "progressive": {"progressive": True},
}


def test_sequential_layout_reads_the_frame_header():
    pixels = photo_like(90, 120, seed=5)
    expected_mcu = {"4:2:0": 16, "4:2:2": 8, "4:4:4": 8, "restart markers": 16, "optimized tables": 16}
    for kind, options in _JPEG_KINDS.items():
        layout = jpeg.sequential_layout(encode(pixels, quality=90, **options))
        if kind == "progressive":
            assert layout is None
            continue
        assert layout is not None and layout.height == 90 and layout.mcu_height == expected_mcu[kind], kind
    grey = jpeg.sequential_layout(encode(pixels[..., 0], quality=90))
    assert grey is not None and grey.mcu_height == 8
    data = encode(pixels, quality=90)
    assert jpeg.truncated(data, 20) is not None and jpeg.truncated(data, 80) is None  # 48 rows; all 90
    with Image.open(io.BytesIO(jpeg.truncated(data, 20))) as shortened:
        assert shortened.size == (120, 48)
    for other in (encode(pixels, "PNG"), data[:40], b"", b"\xff\xd8\xff\xc0\x00"):
        assert jpeg.truncated(other, 10) is None


def test_row_limited_decode_is_exact(monkeypatch):
    """Decoding only the rows a crop needs gives the very bytes of the full decode: every preset,
    every JPEG kind (and grey and CMYK), at full and reduced DCT scales (crops from 32 to 120 px
    for a 32 px output), with and without a bounding box; and most crops do decode fewer rows."""
    real = jpeg.truncated
    shortened = []

    def counting(data, rows):
        out = real(data, rows)
        shortened.append(out is not None)
        return out

    files = [encode(photo_like(90, 120, seed=6), quality=90, **options) for options in _JPEG_KINDS.values()]
    files.append(encode(photo_like(120, 90, seed=7)[..., 1], quality=85))
    cmyk = io.BytesIO()
    Image.fromarray(photo_like(90, 120, seed=8)).convert("CMYK").save(cmyk, format="JPEG", quality=90)
    files.append(cmyk.getvalue())
    bbox = np.array([0.05, 0.1, 0.7, 0.95])
    outputs = {}
    for patched in (False, True):
        monkeypatch.setattr(jpeg, "truncated", counting if patched else lambda data, rows: None)
        for name in sorted(transforms.TRANSFORMS):
            for crop in (False, True):
                pair = transforms.TRANSFORMS[name](32, crop_to_bbox=crop)
                for index, data in enumerate(files):
                    for seed in range(4):
                        key = (name, crop, index, seed)
                        outputs.setdefault(key, []).append(
                            pair.train(EncodedImage(data), np.random.default_rng(seed), bbox=bbox)
                        )
                    outputs.setdefault((name, crop, index, "eval"), []).append(
                        pair.eval(EncodedImage(data), bbox=bbox)
                    )
    for key, (full, limited) in outputs.items():
        np.testing.assert_array_equal(limited, full, err_msg=str(key))
    assert np.mean(shortened) > 0.4, np.mean(shortened)


@pytest.mark.parametrize("name", sorted(transforms.TRANSFORMS))
def test_encoded_input_equals_array_input_without_reduction(name):
    """Where no reduction applies (or for PNGs), an encoded image gives exactly its pixels' output."""
    pixels = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    bbox = np.array([0.1, 0.2, 0.9, 0.7])
    for data in (encode(pixels, quality=90), encode(pixels, "PNG")):
        decoded = np.asarray(EncodedImage(data))
        for crop in (False, True):
            pair = transforms.TRANSFORMS[name](24, crop_to_bbox=crop)
            for seed in range(3):
                np.testing.assert_array_equal(
                    pair.train(EncodedImage(data), np.random.default_rng(seed), bbox=bbox),
                    pair.train(decoded, np.random.default_rng(seed), bbox=bbox),
                )
            np.testing.assert_array_equal(
                pair.eval(EncodedImage(data), bbox=bbox), pair.eval(decoded, bbox=bbox)
            )


def test_encoded_image_modes_regions_and_pickling():
    rgba = np.random.default_rng(2).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(EncodedImage(encode(rgba, "PNG"))), rgba[:, :, :3])
    grey = np.random.default_rng(3).integers(0, 256, (20, 30), dtype=np.uint8)
    for data in (encode(grey, "PNG"), encode(grey, quality=95)):
        image = EncodedImage(data)
        assert image.shape == (20, 30, 3)
        out = np.asarray(image)
        assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
        np.testing.assert_array_equal(out[..., 0], out[..., 2])
    wide = Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16))
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    assert np.asarray(EncodedImage(buffer.getvalue())).max() == round(59900 * 255 / 65535)

    pixels = photo_like(40, 60, seed=4)
    image = EncodedImage(encode(pixels, "PNG"))
    region = image.crop(5, 10, 35, 50).crop(1, 2, 21, 32)
    assert region.box == (6, 12, 26, 42) and region.shape == (20, 30, 3)
    np.testing.assert_array_equal(np.asarray(region), pixels[6:26, 12:42])
    np.testing.assert_array_equal(
        np.asarray(transforms.crop_to_bbox(image, [0.25, 0.5, 0.75, 1.0])), pixels[10:30, 30:60]
    )
    clone = pickle.loads(pickle.dumps(region))
    assert clone.box == region.box
    np.testing.assert_array_equal(np.asarray(clone), pixels[6:26, 12:42])


# ----------------------------------------------------------------------------- pipeline


class _JpegSource:
    """Encoded JPEGs: ``source[i]`` decodes, ``source.encoded(i)`` does not."""

    def __init__(self, files, labels):
        self.files, self.labels = files, labels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return {"image": np.asarray(EncodedImage(self.files[index])), "label": int(self.labels[index])}

    def encoded(self, index):
        return {"image": EncodedImage(self.files[index]), "label": int(self.labels[index])}


def test_pipeline_reads_encoded_examples(jpegs):
    labels = np.arange(len(jpegs)) % 3
    split = Split(_JpegSource(jpegs, labels), labels, name="jpegs")
    sampler = sampling.PKSampler(labels, classes_per_batch=2, samples_per_class=2, seed=0)
    transform = transforms.proxy_anchor(64).train
    kwargs = dict(
        sampler=sampler, global_batch_size=4, seed=3, num_threads=0, process_index=0, process_count=1
    )
    batch = next(pipeline.train_iterator(split, transform=transform, **kwargs))
    for row, index in enumerate(batch["index"]):
        rng = pipeline.augmentation_rng(3, 0, row)
        np.testing.assert_array_equal(batch["image"][row], transform(EncodedImage(jpegs[index]), rng))
    # On 3 loader threads (decode and resize run outside the GIL, side by side): the same batches.
    with (
        pipeline.train_iterator(split, transform=transform, **{**kwargs, "num_threads": 3}) as threaded,
        pipeline.train_iterator(split, transform=transform, **kwargs) as synchronous,
    ):
        for step in range(6):
            np.testing.assert_array_equal(
                next(threaded)["image"], next(synchronous)["image"], err_msg=f"step {step}"
            )
    # Any other callable gets pixels (source[i]).
    seen = []

    def plain(image, rng):
        seen.append(type(image))
        return np.zeros((8, 8, 3), np.uint8)

    next(pipeline.train_iterator(split, transform=plain, **kwargs))
    assert seen and set(seen) == {np.ndarray}


def test_as_rgb_takes_every_channel_layout_and_names_the_bad_ones():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    alpha = np.full_like(grey, 200)
    for image in (grey, grey[:, :, None], np.stack([grey, alpha], axis=2)):
        np.testing.assert_array_equal(transforms.as_rgb(image), rgb)
    np.testing.assert_array_equal(transforms.as_rgb(np.dstack([rgb, alpha])), rgb)
    with pytest.raises(ValueError, match="must be uint8"):
        transforms.as_rgb(grey.astype(np.float32))
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) image, got shape \(3, 4, 5\)"):
        transforms.as_rgb(np.zeros((3, 4, 5), np.uint8))
