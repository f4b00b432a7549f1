"""The resize kernel against its definition, and the two JPEG decoders against each other.

``resample.bilinear`` is defined as two single-axis Pillow resizes (horizontal, then vertical):
the native kernel (SSE4.1 and scalar) must give exactly those pixels, on random sizes, boxes and
strided views, mirrored or not. The transforms decode YCbCr and grey JPEGs with simplejpeg when
it is installed and everything else with Pillow: both must give identical outputs.
"""

from __future__ import annotations

import ctypes
import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

from hdml_jax.data import encoded, resample, transforms
from hdml_jax.data.encoded import EncodedImage
from tests.test_transforms import _JPEG_KINDS, encode, photo_like

NATIVE = importlib.util.find_spec("hdml_jax.data._resample")


def _random_cases(count: int, seed: int, largest: int = 260):
    """(pixels, (out_w, out_h), box): every size from 1 px, shrinks and stretches, whole-image,
    integer and fractional boxes, and strided views of larger arrays."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, largest, 2))
        out_w, out_h = (int(v) for v in rng.integers(1, largest, 2))
        x0, x1 = np.sort(rng.uniform(0, w, 2))
        y0, y1 = np.sort(rng.uniform(0, h, 2))
        kind = rng.integers(0, 4)
        if kind == 0:
            x0, y0, x1, y1 = 0.0, 0.0, float(w), float(h)
        elif kind == 1:
            x0, x1 = float(np.floor(x0)), float(max(np.ceil(x1), np.floor(x0) + 1))
            y0, y1 = float(np.floor(y0)), float(max(np.ceil(y1), np.floor(y0) + 1))
        if x1 - x0 < 1e-3 or y1 - y0 < 1e-3:
            continue
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if kind == 3:  # a region of a larger array: rows further apart than 3·w bytes
            larger = rng.integers(0, 256, (h + 4, w + 9, 3), dtype=np.uint8)
            larger[2 : 2 + h, 5 : 5 + w] = pixels
            pixels = larger[2 : 2 + h, 5 : 5 + w]
        yield pixels, (out_w, out_h), (x0, y0, x1, y1)


@pytest.mark.skipif(NATIVE is None, reason="the native resize kernel was not built (no C compiler)")
@pytest.mark.parametrize("kernel", ["sse4.1", "scalar"])
def test_native_kernel_gives_the_pixels_of_its_definition(kernel):
    library = ctypes.CDLL(NATIVE.origin)
    previous = library.hdml_resample_limit_kernel(1 if kernel == "sse4.1" else 0)
    try:
        assert resample.BACKEND == "native"
        count = 0
        for pixels, size, box in _random_cases(700, seed=0 if kernel == "sse4.1" else 1):
            expected = resample._pillow(pixels, size, box)
            flip = count % 2 == 1
            np.testing.assert_array_equal(
                resample.bilinear(pixels, size, box, flip=flip),
                expected[:, ::-1] if flip else expected,
                err_msg=f"{size} {box} flip={flip}",
            )
            count += 1
        assert count > 600
        # No resampling at all: a copy, or the mirror image (the identity taps run).
        pixels = np.random.default_rng(4).integers(0, 256, (7, 11, 3), dtype=np.uint8)
        np.testing.assert_array_equal(resample.bilinear(pixels, (11, 7)), pixels)
        np.testing.assert_array_equal(resample.bilinear(pixels, (11, 7), flip=True), pixels[:, ::-1])
        np.testing.assert_array_equal(resample.bilinear(pixels[:, 2:], (9, 7), flip=True), pixels[:, :1:-1])
    finally:
        library.hdml_resample_limit_kernel(previous)


def test_the_definition_is_pillows_two_pass_resize():
    """``_pillow`` (which skips rows no vertical tap reads) equals a plain horizontal resize of
    every row followed by the vertical one; on Pillow up to 12 that is also Pillow's one call."""
    for pixels, size, box in _random_cases(150, seed=2, largest=120):
        out_w, out_h = size
        left, top, right, bottom = box
        height = pixels.shape[0]
        across = Image.fromarray(np.ascontiguousarray(pixels)).resize(
            (out_w, height), Image.Resampling.BILINEAR, box=(left, 0, right, height)
        )
        plain = across.resize((out_w, out_h), Image.Resampling.BILINEAR, box=(0, top, out_w, bottom))
        np.testing.assert_array_equal(resample._pillow(pixels, size, box), np.asarray(plain))
    if int(Image.__version__.split(".")[0]) <= 12:
        pixels, size, box = next(_random_cases(1, seed=3))
        one_call = Image.fromarray(np.ascontiguousarray(pixels)).resize(
            size, Image.Resampling.BILINEAR, box=box
        )
        np.testing.assert_array_equal(resample.bilinear(pixels, size, box), np.asarray(one_call))


def test_bad_arguments_say_what_is_wrong():
    pixels = np.zeros((10, 20, 3), np.uint8)
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        resample.bilinear(pixels.astype(np.float32), (5, 5))
    with pytest.raises(ValueError, match="outside the 20×10 image"):
        resample.bilinear(pixels, (5, 5), (0, 0, 21, 10))
    with pytest.raises(ValueError, match="empty"):
        resample.bilinear(pixels, (5, 5), (3, 0, 3, 10))
    with pytest.raises(ValueError, match="must be >= 1"):
        resample.bilinear(pixels, (0, 5))


def _jpeg_files() -> dict[str, bytes]:
    files = {
        kind: encode(photo_like(90, 120, seed=11), quality=90, **options)
        for kind, options in _JPEG_KINDS.items()
    }
    files["grey"] = encode(photo_like(120, 90, seed=12)[..., 1], quality=85)
    cmyk = io.BytesIO()
    Image.fromarray(photo_like(90, 120, seed=13)).convert("CMYK").save(cmyk, format="JPEG", quality=90)
    files["CMYK"] = cmyk.getvalue()
    files["trailing bytes"] = files["4:2:0"] + b"\x00" * 7  # no EOI at the end: Pillow decodes it
    return files


def test_simplejpeg_and_pillow_decode_give_the_same_outputs(monkeypatch):
    """Every preset, at full and reduced DCT scales (crops of 32–120 px for 16 and 32 px outputs),
    with and without a bounding box: identical outputs whichever library decodes; simplejpeg
    takes the YCbCr and grey files, Pillow the others."""
    if encoded._simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    real = encoded._decode_jpeg_into_array
    taken = []

    def counting(data, reduction, whole):
        pixels = real(data, reduction, whole)
        taken.append((whole, reduction, pixels is not None))
        return pixels

    files = _jpeg_files()
    bbox = np.array([0.05, 0.1, 0.7, 0.95])
    outputs = {}
    for use_simplejpeg in (True, False):
        monkeypatch.setattr(
            encoded, "_decode_jpeg_into_array", counting if use_simplejpeg else lambda *a, **k: None
        )
        for name in sorted(transforms.TRANSFORMS):
            for size in (16, 32):
                for crop in (False, True):
                    pair = transforms.TRANSFORMS[name](size, crop_to_bbox=crop)
                    for kind, data in files.items():
                        for seed in range(3):
                            out = pair.train(EncodedImage(data), np.random.default_rng(seed), bbox=bbox)
                            outputs.setdefault((name, size, crop, kind, seed), []).append(out)
                        outputs.setdefault((name, size, crop, kind), []).append(
                            pair.eval(EncodedImage(data), bbox=bbox)
                        )
    for key, (fast, pillow) in outputs.items():
        np.testing.assert_array_equal(fast, pillow, err_msg=str(key))
    by_kind = {kind: {took for whole, _, took in taken if whole == data} for kind, data in files.items()}
    assert by_kind["CMYK"] == by_kind["trailing bytes"] == {False}
    for kind in ("4:2:0", "4:2:2", "4:4:4", "restart markers", "progressive", "grey"):
        assert by_kind[kind] == {True}, kind
    assert {reduction for _, reduction, took in taken if took} >= {1, 2}


def test_a_file_cut_short_is_reported_not_decoded():
    """A JPEG missing its tail fails as Pillow fails on it, with simplejpeg installed or not."""
    data = encode(photo_like(90, 120, seed=14), quality=90)
    with pytest.raises(OSError, match="truncated"):
        transforms.proxy_anchor(32).eval(EncodedImage(data[: len(data) // 2]))


@pytest.mark.skipif(NATIVE is None, reason="the native resize kernel was not built (no C compiler)")
def test_a_kernel_built_from_another_source_is_not_used(monkeypatch):
    """An editable install does not rebuild the kernel on a source change: a built file whose
    calling convention differs must not be called (Pillow resizes instead, with a warning)."""
    assert resample._load_native() is not None
    monkeypatch.setattr(resample, "_ABI_VERSION", resample._ABI_VERSION + 1)
    with pytest.warns(UserWarning, match="built from another version of _resample.c"):
        assert resample._load_native() is None
    monkeypatch.setenv("HDML_JAX_NATIVE_RESAMPLE", "0")
    assert resample._load_native() is None
