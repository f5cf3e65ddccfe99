"""Writers of broken and awkward image files, shared by the image-loading and CLI tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width x height zeros: megapixels that compress to a few KB.

    Built by hand (streaming zlib) because PIL would need the whole bitmap in memory to write it.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = []
    block = row * 1000
    for start in range(0, height, 1000):
        parts.append(comp.compress(block if height - start >= 1000 else row * (height - start)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")
    )


def jpeg_bytes(rgb: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def truncated_jpeg(path: Path) -> None:
    data = jpeg_bytes(skimage.data.astronaut())
    path.write_bytes(data[: len(data) * 6 // 10])


def truncated_png(path: Path) -> None:
    data = png_bytes(Image.fromarray(skimage.data.astronaut()))
    path.write_bytes(data[: len(data) // 2])


def corrupt_png(path: Path) -> None:
    # Valid header, garbage in the middle of the compressed pixel data (libjpeg, by contrast, decodes
    # garbage JPEG data into noise without complaint, so a corrupt JPEG cannot be detected reliably).
    data = bytearray(png_bytes(Image.fromarray(skimage.data.astronaut())))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(range(64))
    path.write_bytes(bytes(data))
