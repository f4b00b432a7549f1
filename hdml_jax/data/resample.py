"""The input pipeline's resize: bilinear with antialiasing, Pillow's filter, one definition everywhere.

``bilinear(pixels, (out_w, out_h), box)`` resamples the ``box = (left, top, right, bottom)`` of
an RGB ``uint8 (H, W, 3)`` image (pixel edges, floats) to ``uint8 (out_h, out_w, 3)``. The
filter is Pillow's ``BILINEAR`` (a triangle stretched by the shrink factor, so a shrink
antialiases, as torchvision's ``Resize`` on PIL images), in Pillow's fixed-point arithmetic and in
Pillow's pass order up to version 12: a horizontal pass rounded to uint8, then a vertical pass.
(Pillow 13 may run the vertical pass first, which moves some outputs by one grey level; fixing
the order keeps the pixels the same on every Pillow.)

Two implementations give the same pixels (``tests/test_resample.py``):

* ``native``: the C kernel in ``_resample.c``, built by ``pip install`` when a C compiler is
  present (SSE4.1 on x86 CPUs that have it, checked at run time), called through ctypes;
* ``pillow``: two single-axis ``Image.resize`` calls, the fallback.

``BACKEND`` says which one runs; ``HDML_JAX_NATIVE_RESAMPLE=0`` forces the fallback.
``benchmarks/input.py`` times both.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import warnings

import numpy as np
from PIL import Image

_BILINEAR = Image.Resampling.BILINEAR
_ABI_VERSION = 1  # hdml_resample_abi_version() of the _resample.c this file calls


def _load_native() -> ctypes._CFuncPtr | None:
    if os.environ.get("HDML_JAX_NATIVE_RESAMPLE", "1") == "0":
        return None
    spec = importlib.util.find_spec("hdml_jax.data._resample")
    if spec is None or spec.origin is None:
        return None
    try:
        library = ctypes.CDLL(spec.origin)
        version = library.hdml_resample_abi_version()
        function = library.hdml_resize_bilinear_rgb
    except (OSError, AttributeError):
        version = None
    if version != _ABI_VERSION:
        warnings.warn(
            f"{spec.origin} was built from another version of _resample.c; resizing with Pillow "
            "instead (the same pixels, slower). Rebuild it: pip install -e . (or pip install .).",
            stacklevel=2,
        )
        return None
    function.restype = ctypes.c_int
    function.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_ssize_t,  # src, in_h, in_w, row stride
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int,  # dst, out_h, out_w
        ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float,  # left, top, right, bottom
        ctypes.c_int,  # flip
    ]  # fmt: skip
    return function


_NATIVE = _load_native()
BACKEND = "native" if _NATIVE is not None else "pillow"


def bilinear(
    pixels: np.ndarray | Image.Image,
    size: tuple[int, int],
    box: tuple[float, float, float, float] | None = None,
    *,
    flip: bool = False,
) -> np.ndarray:
    """``uint8 (H, W, 3)`` (or a PIL image in mode RGB) → ``uint8 (out_h, out_w, 3)`` for
    ``size = (out_w, out_h)``, mirrored left to right when ``flip`` (free in the native kernel).

    ``box`` (default: the whole image) must lie inside the image and have a positive extent on
    both axes. ``pixels`` may be a view (e.g. a region of a larger image) as long as each row's
    pixels are contiguous. Each implementation takes its own input kind without a copy (the
    native kernel an array, the fallback a PIL image) and converts the other.
    """
    if isinstance(pixels, Image.Image):
        if pixels.mode != "RGB":
            raise ValueError(f"expected a PIL image in mode RGB, got mode {pixels.mode}.")
        in_w, in_h = pixels.size
    elif pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) pixels, got {pixels.dtype} {pixels.shape}.")
    else:
        in_h, in_w = pixels.shape[:2]
    out_w, out_h = (int(v) for v in size)
    left, top, right, bottom = (0.0, 0.0, float(in_w), float(in_h)) if box is None else box
    if out_w < 1 or out_h < 1 or in_h < 1 or in_w < 1:
        raise ValueError(f"sizes must be >= 1: {in_w}×{in_h} → {out_w}×{out_h}.")
    if not (0 <= left < right <= in_w and 0 <= top < bottom <= in_h):
        raise ValueError(f"box {box} is empty or outside the {in_w}×{in_h} image.")
    if _NATIVE is None:
        out = _pillow(pixels, (out_w, out_h), (left, top, right, bottom))
        return np.ascontiguousarray(out[:, ::-1]) if flip else out
    pixels = np.asarray(pixels)
    if pixels.strides[1:] != (3, 1):
        pixels = np.ascontiguousarray(pixels)
    out = np.empty((out_h, out_w, 3), np.uint8)
    status = _NATIVE(
        pixels.ctypes.data, in_h, in_w, pixels.strides[0],
        out.ctypes.data, out_h, out_w,
        left, top, right, bottom, int(flip),
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"resampling {in_w}×{in_h} to {out_w}×{out_h} ran out of memory.")
    return out


def _pillow(
    pixels: np.ndarray | Image.Image, size: tuple[int, int], box: tuple[float, float, float, float]
) -> np.ndarray:
    """The same resize as two single-axis Pillow calls: horizontal, then vertical.

    Like Pillow's own two-pass resize, the horizontal pass covers only the rows the vertical
    taps reach (``_rows_read``, widened by one row each side against rounding). They are pasted
    at their place in an image whose height ends at the last row read (the rows above are never
    read): the vertical pass then has the taps it has on the whole image.
    """
    out_w, out_h = size
    left, top, right, bottom = box
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.ascontiguousarray(pixels))
    first, last = _rows_read(image.height, top, bottom, out_h)
    rows = image if (first, last) == (0, image.height) else image.crop((0, first, image.width, last))
    between = rows.resize((out_w, last - first), _BILINEAR, box=(left, 0, right, last - first))
    if first > 0:
        shifted = Image.new("RGB", (out_w, last))
        shifted.paste(between, (0, first))
        between = shifted
    return np.asarray(between.resize((out_w, out_h), _BILINEAR, box=(0, top, out_w, bottom)))


def _rows_read(height: int, top: float, bottom: float, out_h: int) -> tuple[int, int]:
    """``[first, last)``: the input rows the vertical taps of a Pillow resize reach, plus one
    row each side (Pillow takes the box as float32 and computes the taps in double)."""
    top32, bottom32 = np.float32(top), np.float32(bottom)
    scale = float(bottom32 - top32) / out_h
    support = max(scale, 1.0)
    first = int(float(top32) + 0.5 * scale - support + 0.5)
    last = int(float(top32) + (out_h - 0.5) * scale + support + 0.5)
    return max(first - 1, 0), min(last + 1, height)
