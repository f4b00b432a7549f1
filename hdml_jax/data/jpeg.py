"""Decode only the top rows of a JPEG that a crop needs, bit for bit as a full decode would.

A sequential (baseline or extended, Huffman-coded) JPEG whose one scan holds every component
stores its MCU rows top to bottom. Rewriting the frame header's height to a multiple of the MCU
height makes libjpeg stop after that many rows: the rows below are neither entropy-decoded nor
transformed (the bytes left in the file are skipped as extraneous data before the end marker).
Entropy decoding is about three quarters of a decode here (``benchmarks/input.py``), so this is
the one saving a crop can buy beyond the DCT scaling of ``Image.draft``: the rows above the crop
must still be entropy-decoded (a block's variable-length codes are found only by decoding those
before it, and its DC coefficient is a difference from the previous block's).

The rows kept come out identical to a full decode as long as one more MCU row than the crop
needs is kept: libjpeg's smooth ("fancy") chroma upsampling looks one chroma row ahead, and only
the last MCU row of the shortened image sees the edge instead (``tests/test_transforms.py``
checks equality on 4:2:0, 4:2:2, 4:4:4, grey and restart-marker files, at every DCT scale).

Files this does not apply to (progressive or arithmetic-coded JPEGs, several scans, a height
given by a DNL marker, anything it cannot parse) are left alone: ``truncated`` returns None.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)  # SOF0 baseline, SOF1 extended sequential
_OTHER_FRAMES = frozenset(range(0xC2, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF2–SOF15 (DHT, JPG, DAC excluded)
_START_OF_SCAN = 0xDA
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0–RST7: no length field


class SequentialLayout(NamedTuple):
    """Where the frame header's height is and how tall one MCU row is (pixels)."""

    height_offset: int  # byte offset of the 16-bit big-endian height in the file
    height: int
    mcu_height: int  # 8 × the largest vertical sampling factor


def sequential_layout(data: bytes) -> SequentialLayout | None:
    """The layout of a single-scan sequential Huffman JPEG, or None for any other file."""
    if data[:2] != b"\xff\xd8":
        return None
    position, layout, frame_components = 2, None, 0
    try:
        while position + 4 <= len(data):
            if data[position] != 0xFF:
                return None
            marker = data[position + 1]
            if marker == 0xFF:  # fill byte
                position += 1
                continue
            if marker in _STANDALONE:
                position += 2
                continue
            (length,) = struct.unpack_from(">H", data, position + 2)
            segment = position + 4
            if marker in _OTHER_FRAMES:
                return None
            if marker in _SEQUENTIAL_HUFFMAN:
                height, _, components = struct.unpack_from(">HHB", data, segment + 1)
                factors = data[segment + 7 : segment + 6 + 3 * components : 3]  # (id, H/V, table) each
                if height == 0 or components == 0 or len(factors) != components:
                    return None  # height defined by a DNL marker after the first scan, or a bad header
                layout = SequentialLayout(segment + 1, height, 8 * max(f & 0x0F for f in factors))
                frame_components = components
            elif marker == _START_OF_SCAN:
                # Every component in this first scan: no later scan needs the rows cut away.
                if layout is None or data[segment] != frame_components:
                    return None
                return layout
            position = segment + length - 2
    except (struct.error, IndexError, ValueError):
        return None
    return None


def truncated(data: bytes, rows: int) -> bytes | None:
    """The file re-headed to decode only the MCU rows that cover rows ``[0, rows)`` exactly.

    ``rows`` is rounded up to whole MCU rows plus one (the chroma upsampling's look-ahead).
    None when that is the whole image or the file is not a single-scan sequential JPEG.
    """
    layout = sequential_layout(data)
    if layout is None:
        return None
    kept = (-(-max(rows, 1) // layout.mcu_height) + 1) * layout.mcu_height
    if kept >= layout.height:
        return None
    offset = layout.height_offset
    return data[:offset] + struct.pack(">H", kept) + data[offset + 2 :]
