"""Image files kept encoded until a transform knows what it needs of them (``EncodedImage``).

The input pipeline hands transforms the bytes of an image file when the source has them
(``source.encoded(i)``), because a JPEG then decodes at a reduced scale whenever the output allows
it (libjpeg's DCT scaling, PIL's ``Image.draft``). The transform draws its crop box first, in the
full image's coordinates and from the same random numbers as for an array, so the augmentation's
statistics do not depend on the input kind. Then the JPEG decodes at the largest scale ``1/s``
(``s`` in 1, 2, 4, 8) with ``crop width ≥ s · output width`` and ``crop height ≥ s · output
height`` (``draft_scale``), the box is divided by ``s``, and the usual resize follows. The reduced
crop thus still holds at least as many pixels as the output on each axis: the final resize only
ever shrinks (or keeps) it, with its antialiasing filter, and the reduction itself is libjpeg's
scaled inverse DCT (each 8×8 block reconstructed from its low frequencies, a low-pass with no
aliasing). Nothing is upsampled because of the reduction; a crop smaller than twice the output
decodes in full, exactly as an array would. The result stays within a few grey levels of a full
decode (``tests/test_transforms.py`` bounds the mean absolute difference per image by 2 levels;
about 0.5 measured on photo-like JPEGs). Rows below the last one the resize reads
(``rows_reached``) are not decoded at all when the file allows it (``jpeg.truncated``: bit-exact,
2–3% of a train transform on CUB-sized JPEGs). YCbCr and grey JPEGs decode with simplejpeg
(libjpeg-turbo into a NumPy array, the same pixels as Pillow's decode without its copies), others
with Pillow.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from hdml_jax.data import jpeg, resample

try:  # libjpeg-turbo straight into NumPy; the same pixels as Pillow's decode, without its copies
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover (a dependency; Pillow decodes everything without it)
    _simplejpeg = None


_DRAFT_SCALES = (8, 4, 2)  # libjpeg's DCT scaling as PIL's draft offers it: 1/8, 1/4, 1/2


_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I")


def draft_scale(box_width: float, box_height: float, out_width: int, out_height: int) -> int:
    """The JPEG reduction ``s`` for resizing a ``box_width × box_height`` region to the output.

    The largest ``s`` in 8, 4, 2 with ``box_width ≥ s · out_width`` and ``box_height ≥ s ·
    out_height`` (else 1): decoded at ``1/s``, the region still has at least as many pixels as
    the output on each axis, so the resize that follows never upsamples.
    """
    for s in _DRAFT_SCALES:
        if box_width >= s * out_width and box_height >= s * out_height:
            return s
    return 1


def rows_reached(box: tuple[float, float, float, float], out_height: int, reduction: int) -> int:
    """A bound on the rows (from the top) that ``resize(box=box)`` to ``out_height`` rows reads.

    PIL's bilinear filter reaches ``max(step, 1) + 1/2`` pixels past the box's bottom, ``step =
    box height / out_height``; ``2 · reduction + 1`` more covers the rounding of a decode at
    ``1/reduction``. Transforms resize only these rows, so that a JPEG needs only them decoded.
    """
    return math.ceil(box[3] + (box[3] - box[1]) / out_height) + 2 * reduction + 1


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → mode RGB: 16/32-bit grey scaled to 8 bits (by 65535, or the maximum when
    larger), everything else through ``convert("RGB")`` (alpha dropped, palettes expanded)."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY_MODES:
        pixels = np.asarray(image, np.float64)
        top = max(float(pixels.max()), 1.0)
        grey = np.round(pixels * (255.0 / (65535.0 if top <= 65535 else top)))
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


class EncodedImage:
    """The bytes of an image file (JPEG, PNG, ...), decoded only by the transform that takes it.

    ``box = (top, left, bottom, right)`` (pixels of the full image; None: all of it) restricts
    it to a region, so a bounding-box crop costs nothing before the decode. ``shape`` is read from
    the file's header; ``np.asarray(image)`` (or ``decode()``) decodes the region in full, as
    ``uint8 (H, W, 3)``, for code that wants pixels. Picklable.
    """

    __slots__ = ("_box", "_data", "_full", "_opened")

    def __init__(self, data: bytes, box: tuple[int, int, int, int] | None = None):
        self._data = data
        self._box = None if box is None else tuple(int(v) for v in box)
        self._full: tuple[int, int] | None = None
        self._opened: Image.Image | None = None  # opened for the header, not decoded: reused once

    def __getstate__(self):
        return (self._data, self._box)

    def __setstate__(self, state):
        self._data, self._box = state
        self._full = self._opened = None

    @property
    def data(self) -> bytes:
        return self._data

    def open(self) -> Image.Image:
        """The file opened with PIL: header parsed, no pixel decoded yet."""
        image, self._opened = self._opened, None
        return image if image is not None else Image.open(io.BytesIO(self._data))

    @property
    def full_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the whole encoded image."""
        if self._full is None:
            self._full = _jpeg_shape(self._data)
        if self._full is None:
            self._opened = self.open()
            self._full = (self._opened.height, self._opened.width)
        return self._full

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` of the region in the full image."""
        return self._box if self._box is not None else (0, 0, *self.full_shape)

    @property
    def shape(self) -> tuple[int, int, int]:
        top, left, bottom, right = self.box
        return (bottom - top, right - left, 3)

    def crop(self, top: int, left: int, bottom: int, right: int) -> EncodedImage:
        """The sub-region ``[top, bottom) × [left, right)`` of this one (its own pixel coordinates)."""
        y0, x0, _, _ = self.box
        cropped = EncodedImage(self._data, (y0 + top, x0 + left, y0 + bottom, x0 + right))
        cropped._full, cropped._opened, self._opened = self._full, self._opened, None
        return cropped

    def _open_rows(self, rows: int, shortened: bytes | None = None) -> Image.Image:
        """``open()``, but a single-scan sequential JPEG decodes only the MCU rows covering
        rows ``[0, rows)`` of the full image (``jpeg.truncated``, or ``shortened`` when the
        caller has it; those rows come out exactly as in a full decode)."""
        if shortened is None and rows < self.full_shape[0]:
            shortened = jpeg.truncated(self._data, rows)
        if shortened is None:
            return self.open()
        if self._opened is not None:
            self._opened.close()
            self._opened = None
        return Image.open(io.BytesIO(shortened))

    def decode(self) -> np.ndarray:
        """The region as ``uint8 (H, W, 3)``, every pixel decoded at full scale (simplejpeg or
        Pillow, as ``_decode_top``: the same pixels)."""
        pixels = _decode_jpeg_into_array(self._data, 1, whole=self._data)
        if pixels is None:
            with self.open() as image:
                pixels = np.asarray(pil_to_rgb(image), np.uint8)
        if self._box is None:
            return pixels
        top, left, bottom, right = self._box
        return np.ascontiguousarray(pixels[top:bottom, left:right])

    def __array__(self, dtype=None, copy=None):
        pixels = self.decode()
        return pixels if dtype is None else pixels.astype(dtype)

    def resized(
        self, size: tuple[int, int], box: tuple[float, float, float, float] | None = None, flip: bool = False
    ) -> np.ndarray:
        """``box = (left, top, right, bottom)`` of this region (its pixels, floats; None: all of
        it) resized to ``size = (width, height)`` (``resample.bilinear``), as
        ``resample.bilinear(np.asarray(self), size, box)`` but with JPEGs decoded at the reduction
        ``draft_scale`` allows and only down to the rows the filter reads (module docstring)."""
        top, left, bottom, right = self.box
        if box is None:
            box = (0.0, 0.0, right - left, bottom - top)
        wanted = draft_scale(box[2] - box[0], box[3] - box[1], *size)
        rows = rows_reached(box, size[1], wanted)
        decoded, scale = self._decode_top(top + rows, wanted)
        # The resize sees the region's first ``rows`` rows, as an array's resize does
        # (``_resize_box``), at a reduced scale the reduced pixels overlapping them: the region
        # bounds the filter, so the taps do not depend on how many rows were decoded.
        height, width = decoded.shape[:2] if isinstance(decoded, np.ndarray) else decoded.size[::-1]
        y0, x0 = top // scale, left // scale
        y1 = min(-(-min(bottom, top + rows) // scale), height)
        x1 = min(-(-right // scale), width)
        if isinstance(decoded, np.ndarray):
            region = decoded[y0:y1, x0:x1]
        else:
            region = decoded if (x0, y0, x1, y1) == (0, 0, width, height) else decoded.crop((x0, y0, x1, y1))
        left, top = left - x0 * scale, top - y0 * scale
        shifted = (box[0] + left, box[1] + top, box[2] + left, box[3] + top)
        return resample.bilinear(region, size, tuple(v / scale for v in shifted), flip=flip)

    def _decode_top(self, rows: int, reduction: int) -> tuple[np.ndarray | Image.Image, int]:
        """``(pixels, s)``: the whole image's rows ``[0, rows)`` (or more) decoded at ``1/s``
        (``s`` is ``reduction`` for a JPEG, else 1), as ``uint8 (h, w, 3)`` or an RGB PIL image.

        YCbCr and grey JPEGs that end in an EOI marker decode with simplejpeg when it is
        installed (libjpeg-turbo straight into a NumPy array; the same pixels as Pillow, whose
        decode adds an image object and a copy), everything else with Pillow.
        """
        shortened = jpeg.truncated(self._data, rows) if rows < self.full_shape[0] else None
        decoded = _decode_jpeg_into_array(shortened or self._data, reduction, whole=self._data)
        if decoded is not None:
            return decoded, reduction
        # Not ``with``: closing would discard the pixels on older Pillow, and the file is a BytesIO.
        image = self._open_rows(rows, shortened)
        try:
            scale = 1
            if image.format == "JPEG" and reduction > 1:
                width, height = image.size
                drafted = image.draft("RGB", (width // reduction, height // reduction))
                if drafted is not None:
                    scale = round(width / drafted[1][2])
            rgb = pil_to_rgb(image)
            rgb.load()
        except BaseException:
            image.close()
            raise
        return rgb, scale

    def __repr__(self) -> str:
        return f"EncodedImage({len(self._data)} bytes, box={self._box})"


def _jpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """A JPEG's ``(height, width, colorspace)`` from its frame header, read by simplejpeg (a tenth
    of the time Pillow's ``open`` takes, which parses every marker in Python); None for anything
    else, or without simplejpeg."""
    if _simplejpeg is None or not data.startswith(b"\xff\xd8"):
        return None
    try:
        height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (height, width, colorspace) if height > 0 and width > 0 else None


def _jpeg_shape(data: bytes) -> tuple[int, int] | None:
    """A JPEG's ``(height, width)`` (``_jpeg_header``); None for anything else."""
    header = _jpeg_header(data)
    return None if header is None else header[:2]


def _decode_jpeg_into_array(data: bytes, reduction: int, whole: bytes) -> np.ndarray | None:
    """``data`` (``whole``, or ``whole`` shortened by ``jpeg.truncated``) decoded at
    ``1/reduction`` with simplejpeg as ``uint8 (h, w, 3)``; None where Pillow must decode it.

    Pillow's semantics are kept: libjpeg's warnings are ignored (``strict=False``; a shortened
    file always has extraneous data after the rows kept), and a file cut short (no EOI marker at
    the end of ``whole``) goes to Pillow, which reports it. CMYK, YCCK and RGB JPEGs go to
    Pillow too: their colour conversion is Pillow's own.
    """
    header = _jpeg_header(data) if whole.endswith(b"\xff\xd9") else None
    if header is None or header[2] not in ("YCbCr", "Gray"):
        return None
    height, width, _ = header
    expected = (-(-height // reduction), -(-width // reduction))
    scaling = (
        {}
        if reduction == 1
        else {"min_factor": reduction, "min_height": expected[0], "min_width": expected[1]}
    )
    try:
        pixels = _simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False, **scaling)
    except ValueError:
        return None
    return pixels if pixels.shape[:2] == expected else None
