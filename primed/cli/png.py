"""A buffer's pixels as a PNG image, for people who would rather look than read bytes.

Pure Python (zlib and struct). RGB formats convert row by row with slices and
are quick; YUV formats convert pixel by pixel (BT.601, limited range), which
takes seconds for a full-HD frame: fine for a debugging dump.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator

from primed.formats import fourcc_str

_RowReader = Callable[[memoryview, int, int, tuple[tuple[int, int], ...]], bytes]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode(width: int, height: int, rows: Iterator[bytes], channels: int) -> bytes:
    """A PNG of 8-bit samples: ``channels`` 1 (grey), 3 (RGB) or 4 (RGBA)."""
    colour = {1: 0, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\0" + row for row in rows)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def _packed(order: tuple[int, ...], cpp: int) -> _RowReader:
    """Rows of a packed 8-bit-per-channel format; ``order`` picks R, G, B (and A) bytes."""

    def read(pixels: memoryview, width: int, y: int, planes: tuple[tuple[int, int], ...]) -> bytes:
        offset, pitch = planes[0]
        row = pixels[offset + y * pitch : offset + y * pitch + width * cpp]
        out = bytearray(width * len(order))
        for channel, byte in enumerate(order):
            out[channel :: len(order)] = row[byte::cpp]
        return bytes(out)

    return read


def _rgb565(bgr: bool) -> _RowReader:
    def read(pixels: memoryview, width: int, y: int, planes: tuple[tuple[int, int], ...]) -> bytes:
        offset, pitch = planes[0]
        row = pixels[offset + y * pitch : offset + y * pitch + width * 2]
        out = bytearray(width * 3)
        for x, (value,) in enumerate(struct.iter_unpack("<H", row)):
            high, mid, low = value >> 11, value >> 5 & 0x3F, value & 0x1F
            r, b = (low, high) if bgr else (high, low)
            out[3 * x : 3 * x + 3] = bytes((r << 3 | r >> 2, mid << 2 | mid >> 4, b << 3 | b >> 2))
        return bytes(out)

    return read


def _clamp(value: int) -> int:
    return 0 if value < 0 else 255 if value > 255 else value


def _yuv(chroma: str) -> _RowReader:
    """Rows of a 4:2:0 format: NV12/NV21 (interleaved UV, VU) or YU12/YV12 (planar U, V)."""

    def read(pixels: memoryview, width: int, y: int, planes: tuple[tuple[int, int], ...]) -> bytes:
        y_off, y_pitch = planes[0]
        luma = pixels[y_off + y * y_pitch : y_off + y * y_pitch + width]
        c_row = y // 2
        if chroma in ("NV12", "NV21"):
            c_off, c_pitch = planes[1]
            pairs = pixels[c_off + c_row * c_pitch : c_off + c_row * c_pitch + width]
            us, vs = (pairs[0::2], pairs[1::2]) if chroma == "NV12" else (pairs[1::2], pairs[0::2])
        else:
            u_plane, v_plane = (
                (planes[1], planes[2]) if chroma == "YU12" else (planes[2], planes[1])
            )
            us = pixels[u_plane[0] + c_row * u_plane[1] :][: width // 2]
            vs = pixels[v_plane[0] + c_row * v_plane[1] :][: width // 2]
        out = bytearray(width * 3)
        for x in range(width):
            c = 298 * (luma[x] - 16)
            d, e = us[x // 2] - 128, vs[x // 2] - 128
            out[3 * x] = _clamp((c + 409 * e + 128) >> 8)
            out[3 * x + 1] = _clamp((c - 100 * d - 208 * e + 128) >> 8)
            out[3 * x + 2] = _clamp((c + 516 * d + 128) >> 8)
        return bytes(out)

    return read


# fourcc -> (row reader, channels). Little-endian DRM formats: XR24's bytes are B, G, R, X.
_READERS: dict[str, tuple[_RowReader, int]] = {
    "XR24": (_packed((2, 1, 0), 4), 3),
    "AR24": (_packed((2, 1, 0, 3), 4), 4),
    "XB24": (_packed((0, 1, 2), 4), 3),
    "AB24": (_packed((0, 1, 2, 3), 4), 4),
    "RG24": (_packed((2, 1, 0), 3), 3),
    "BG24": (_packed((0, 1, 2), 3), 3),
    "R8": (_packed((0,), 1), 1),
    "RG16": (_rgb565(False), 3),
    "BG16": (_rgb565(True), 3),
    "NV12": (_yuv("NV12"), 3),
    "NV21": (_yuv("NV21"), 3),
    "YU12": (_yuv("YU12"), 3),
    "YV12": (_yuv("YV12"), 3),
}

#: The formats :func:`from_pixels` can draw.
SUPPORTED = tuple(_READERS)


def from_pixels(
    pixels: memoryview, width: int, height: int, fourcc: int, planes: tuple[tuple[int, int], ...]
) -> bytes:
    """A PNG of a mapped buffer. Raises ValueError for a format it can't draw."""
    code = fourcc_str(fourcc)
    if code not in _READERS:
        raise ValueError(f"can't draw {code} as PNG; can: {', '.join(SUPPORTED)}")
    read, channels = _READERS[code]
    rows = (read(pixels, width, y, planes) for y in range(height))
    return encode(width, height, rows, channels)
