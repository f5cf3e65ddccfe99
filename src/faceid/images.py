"""Loading user images safely into 8-bit RGB.

Everything that reads a photo goes through :func:`load_image`, so the rest of faceid can assume one
format: a fresh ``PIL.Image.Image`` in mode ``"RGB"``, upright (EXIF orientation applied).

Real-world input is messy: phone photos carry an EXIF rotation, PNGs have alpha or palettes, scans are
CMYK or 16-bit, downloads are truncated, and a tiny file can declare gigantic dimensions
(a decompression bomb). Each of these either loads correctly or raises :class:`~faceid.errors.ImageError`
with a one-line message that names the file and says what to do.

The input is never modified: files are only opened for reading, and PIL images / arrays passed in are
copied before conversion.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from faceid.errors import ImageError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "ImageSource", "load_image", "source_name"]

#: Default ceiling on width * height. 50 megapixels covers every consumer camera while refusing
#: decompression bombs (a few KB of PNG can declare 30000x30000 pixels = 2.7 GB of RGB).
DEFAULT_MAX_PIXELS = 50_000_000

ImageSource = str | os.PathLike | bytes | bytearray | Image.Image | np.ndarray

#: What counts as a photo when faceid lists a folder (``faceid prepare``, ``eval``, ``score``), matched
#: case-insensitively: the formats people keep photos in that :func:`load_image` reads. TIFF is one of
#: them (cameras and scanners write it; its 16-bit modes load like any other), so it is in; ``prepare``
#: used to leave it out while ``eval`` and ``score`` took it: one list for all of them now.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# Errors PIL raises while decoding broken data. PIL is not consistent: truncated JPEGs give OSError,
# broken PNG chunks SyntaxError or zlib.error, odd headers ValueError/struct.error/EOFError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)

# Modes whose alpha channel must be flattened (onto white, like a browser or document viewer shows it).
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def source_name(source: object) -> str:
    """A short human-readable name for an image source, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source))
    if isinstance(source, (bytes, bytearray)):
        return "<image bytes>"
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", None)
        return str(filename) if filename else "<PIL image>"
    if isinstance(source, np.ndarray):
        return "<image array>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``source`` as an upright 8-bit RGB ``PIL.Image.Image``.

    ``source`` may be a path (``str`` / ``os.PathLike``), the encoded bytes of an image file, a PIL image,
    or a numpy array (HxWx3 uint8 RGB; HxW grayscale and HxWx4 RGBA, uint16 and float in [0, 1] are
    accepted too). ``max_pixels`` refuses images whose width * height exceeds it, checked from the header
    before any pixel is decoded; ``None`` disables faceid's own check (PIL's built-in bomb guard stays).

    Raises :class:`ImageError` for a missing, empty, non-image, truncated, corrupt or too-large input.
    """
    name = source_name(source)
    if isinstance(source, np.ndarray):
        img = _image_from_array(source, name)
        _check_pixels(img.size, max_pixels, name)
        return _to_rgb(img, name)
    if isinstance(source, Image.Image):
        # A lazily opened image (Image.open) may still fail to decode; treat it like a file.
        _check_pixels(source.size, max_pixels, name)
        img = _decode(source, name)
        return _to_rgb(_apply_exif_orientation(img), name)
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageError(f"{name} is empty (0 bytes): pass the contents of an image file.")
        return _open_and_decode(io.BytesIO(bytes(source)), name, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"Image file not found: {name}. Check the path and spelling.")
        if path.is_dir():
            raise ImageError(f"{name} is a directory, not an image file.")
        if path.stat().st_size == 0:
            raise ImageError(f"Image file {name} is empty (0 bytes); it was probably not copied or saved fully.")
        # Read the bytes first (the file is only ever opened read-only) so PIL never keeps the
        # file handle open and decoding errors cannot leave anything behind.
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"Cannot read image file {name}: {exc.strerror or exc}.") from exc
        return _open_and_decode(io.BytesIO(data), name, max_pixels)
    raise ImageError(
        f"Unsupported image source {name}: pass a file path, image bytes, a PIL image or an HxWx3 uint8 RGB array."
    )


# --------------------------------------------------------------------------------------------------
# Decoding


def _open_and_decode(stream: io.BytesIO, name: str, max_pixels: int | None) -> Image.Image:
    with warnings.catch_warnings():
        # PIL warns (DecompressionBombWarning) above Image.MAX_IMAGE_PIXELS and raises above twice that.
        # Our own max_pixels check is the authority; the warning only becomes an error when the caller
        # has not explicitly allowed more pixels than PIL's default.
        allow_beyond_pil = max_pixels is not None and max_pixels > (Image.MAX_IMAGE_PIXELS or 0)
        warnings.simplefilter("ignore" if allow_beyond_pil else "error", Image.DecompressionBombWarning)
        try:
            img = Image.open(stream)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # PIL's hard limit (2x MAX_IMAGE_PIXELS) applies whatever max_pixels says.
            raise ImageError(
                f"Image {name} is too large to decode safely (possible decompression bomb: {exc}); downscale it first."
            ) from exc
        except UnidentifiedImageError as exc:
            raise ImageError(
                f"{name} is not an image file PIL can read (or its format is unsupported); "
                "use a JPEG, PNG or WebP photo."
            ) from exc
        except _DECODE_ERRORS as exc:
            raise ImageError(f"Image file {name} is corrupt ({exc}); re-export or re-download it.") from exc
        # img.size comes from the header: refuse oversized images before any pixel is decoded.
        _check_pixels(img.size, max_pixels, name)
        img = _decode(img, name)
    return _to_rgb(_apply_exif_orientation(img), name)


def _decode(img: Image.Image, name: str) -> Image.Image:
    """Force a full decode so truncated or corrupt data fails here, not later in the pipeline."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Another library switched PIL to silently pad truncated files with grey. We do not flip the
        # global back (that would race with other threads), but say so: truncation goes unnoticed.
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; truncated images will not be detected.",
            RuntimeWarning,
            stacklevel=3,
        )
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"Image {name} is too large to decode safely ({exc}).") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"Image file {name} is truncated or corrupt ({exc}); re-download or re-export it.") from exc
    return img


def _check_pixels(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"Image {name} has no pixels ({width}x{height}).")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"Image {name} is too large: {width}x{height} = {width * height / 1e6:.3g} megapixels exceeds the "
            f"{_fmt_limit(max_pixels)} limit (possible decompression bomb); downscale it or raise max_pixels."
        )


def _fmt_limit(max_pixels: int) -> str:
    return f"{max_pixels / 1e6:.3g} megapixels"


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip to the orientation the camera recorded, as every photo viewer does."""
    try:
        return ImageOps.exif_transpose(img)
    except (*_DECODE_ERRORS, KeyError, TypeError, ZeroDivisionError):
        # A malformed EXIF block must not make an otherwise fine photo unreadable: keep the pixels as stored.
        return img


# --------------------------------------------------------------------------------------------------
# Conversion to 8-bit RGB


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        # Always return a new object so callers may modify it without touching their input.
        return img.copy()
    if mode == "P" and "transparency" in img.info:
        # Palette transparency would otherwise be dropped (transparent pixels showing the key colour).
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        return _high_depth_to_rgb(img, name)
    try:
        # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX...: PIL's own conversions are correct for 8-bit data.
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"Image {name} has pixel mode {mode!r}, which cannot be converted to RGB.") from exc


def _high_depth_to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Map 16-bit, 32-bit integer and float grayscale to 8 bits.

    PIL's ``convert("RGB")`` clips these at 255, turning most 16-bit photos white, so scale instead.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = arr.astype(np.float64) / 257.0  # 65535 -> 255 exactly
    elif img.mode == "I":
        # 32-bit ints hold 8-bit data (max <= 255), 16-bit data (e.g. old 16-bit PNG decodes) or anything.
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            out = arr.astype(np.float64)
        elif lo >= 0 and hi <= 65535:
            out = arr.astype(np.float64) / 257.0
        else:
            out = _stretch(arr)
    else:  # "F"
        finite = arr[np.isfinite(arr)]
        if finite.size == 0:
            raise ImageError(f"Image {name} contains no finite pixel values.")
        arr = np.nan_to_num(arr, nan=0.0, posinf=float(finite.max()), neginf=float(finite.min()))
        lo, hi = float(finite.min()), float(finite.max())
        if lo >= 0.0 and hi <= 1.0:
            out = arr * 255.0  # normalised float image
        elif lo >= 0.0 and hi <= 255.0:
            out = arr.astype(np.float64)
        else:
            out = _stretch(arr)
    gray = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _stretch(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr)
    return (arr - lo) * (255.0 / (hi - lo))


def _image_from_array(arr: np.ndarray, name: str) -> Image.Image:
    """Wrap a numpy array as a PIL image (a copy), interpreting it as RGB(A) or grayscale."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(f"Image array {name} has shape {arr.shape}; expected HxWx3 RGB (or HxW, HxWx4).")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"Image array {name} is empty (shape {arr.shape}).")
    if arr.dtype == np.uint8:
        data = arr
    elif arr.dtype == np.uint16:
        data = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    elif arr.dtype == np.bool_:
        data = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageError(
                f"Float image array {name} must hold finite values in [0, 1]; convert it to uint8 RGB first."
            )
        data = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"Image array {name} has dtype {arr.dtype}; expected uint8 RGB.")
    # For uint8 data PIL infers the mode from the shape: HxW -> L, HxWx3 -> RGB, HxWx4 -> RGBA.
    return Image.fromarray(np.ascontiguousarray(data).copy())
