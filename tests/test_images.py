"""load_image: real-world image files load as upright 8-bit RGB, broken ones fail with a clear ImageError."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from bad_files import corrupt_png, huge_blank_png, jpeg_bytes, png_bytes, truncated_jpeg, truncated_png
from face_helpers import face_photo
from PIL import Image

from faceid.errors import FaceIDError, ImageError
from faceid.images import load_image

# ----------------------------------------------------------------------------------------------
# Broken input: one table, each case must fail with ImageError whose message names the file.


BROKEN_CASES = {
    # name: (file name, writer or None for "do not create", expected words in the message, load kwargs)
    "missing": ("nope.jpg", None, ["not found"], {}),
    "zero_byte": ("empty.jpg", lambda p: p.write_bytes(b""), ["empty", "0 bytes"], {}),
    "text_file": ("notes.jpg", lambda p: p.write_text("these are my notes, not a photo\n"), ["not an image"], {}),
    "truncated_jpeg": ("cut.jpg", truncated_jpeg, ["truncated"], {}),
    "truncated_png": ("cut.png", truncated_png, ["truncated"], {}),
    "corrupt_png": ("garbage.png", corrupt_png, ["corrupt"], {}),
    # 30000 x 30000 = 900 MP: beyond PIL's own bomb guard (2 x 89 MP), refused at open.
    "bomb_900mp": ("bomb.png", lambda p: p.write_bytes(huge_blank_png(30000, 30000)), ["too large", "bomb"], {}),
    # 9000 x 9000 = 81 MP: PIL would decode it, faceid's 50 MP default limit refuses it.
    "over_default_limit": (
        "big.png",
        lambda p: p.write_bytes(huge_blank_png(9000, 9000)),
        ["too large", "81 megapixels", "50 megapixels"],
        {},
    ),
    "over_custom_limit": (
        "photo.png",
        lambda p: p.write_bytes(png_bytes(Image.new("RGB", (200, 100)))),
        ["too large", "200x100"],
        {"max_pixels": 10_000},
    ),
    "directory": ("folder.jpg", lambda p: p.mkdir(), ["directory"], {}),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CASES))
def test_broken_input_raises_image_error(tmp_path, case):
    filename, writer, words, kwargs = BROKEN_CASES[case]
    path = tmp_path / filename
    if writer is not None:
        writer(path)
    before = _snapshot(path)

    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)

    message = str(info.value)
    assert isinstance(info.value, FaceIDError)
    assert filename in message, message  # the message names the file
    assert "\n" not in message, "messages are one line for the CLI"
    for word in words:
        assert word in message.lower(), f"{word!r} not in {message!r}"
    assert _snapshot(path) == before, "load_image must never modify its input"


def _snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_dir():
        return ("dir", sorted(os.listdir(path)))
    stat = path.stat()
    return (path.read_bytes(), stat.st_mtime_ns, stat.st_size)


def test_bomb_is_refused_before_decoding(monkeypatch, tmp_path):
    # The size check must use the header only: decoding a bomb is exactly what we must avoid.
    path = tmp_path / "big.png"
    path.write_bytes(huge_blank_png(9000, 9000))

    def no_decode(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    with pytest.raises(ImageError, match="too large"):
        load_image(path)


def test_bytes_errors_and_success():
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"hello world")
    data = jpeg_bytes(skimage.data.astronaut())
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 2])
    img = load_image(data)
    assert img.mode == "RGB" and img.size == (512, 512)


def test_unsupported_source_type():
    with pytest.raises(ImageError, match="Unsupported image source"):
        load_image(12345)


# ----------------------------------------------------------------------------------------------
# Pixel modes: everything ends up 8-bit RGB with the values a viewer would show.


def _mode_cases():
    red_half_alpha = np.zeros((8, 8, 4), np.uint8)
    red_half_alpha[..., 0] = 255
    red_half_alpha[:, :4, 3] = 255  # left half opaque red, right half fully transparent
    red_half_alpha[:, 4:, 3] = 0

    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0] = 0  # black
    la[..., 1] = 128  # half transparent -> mid grey on white

    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)  # index 0 black, index 1 green
    pal.paste(0, (0, 0, 4, 8))  # left half index 0
    pal.info["transparency"] = 0  # index 0 transparent -> white

    i16 = np.zeros((8, 8), np.uint16)
    i16[:, :4] = 65535
    i16[:, 4:] = 32896  # 128 * 257

    i32 = np.zeros((8, 8), np.int32)
    i32[:, :4] = 65535
    i32[:, 4:] = 257 * 64

    flt = np.zeros((8, 8), np.float32)
    flt[:, :4] = 1.0
    flt[:, 4:] = 0.25

    return {
        # name: (PIL image, file format, expected RGB at left column, expected RGB at right column)
        "RGBA": (Image.fromarray(red_half_alpha, "RGBA"), "PNG", (255, 0, 0), (255, 255, 255)),
        "LA": (Image.fromarray(la, "LA"), "PNG", (127, 127, 127), (127, 127, 127)),
        "L": (Image.fromarray(np.full((8, 8), 77, np.uint8)), "PNG", (77, 77, 77), (77, 77, 77)),
        "P_transparency": (pal, "PNG", (255, 255, 255), (0, 255, 0)),
        "CMYK": (Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "TIFF", (0, 255, 255), (0, 255, 255)),
        "CMYK_jpeg": (Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", (255, 255, 255), (255, 255, 255)),
        "I;16": (Image.fromarray(i16), "PNG", (255, 255, 255), (128, 128, 128)),
        "I": (Image.fromarray(i32), "TIFF", (255, 255, 255), (64, 64, 64)),
        "F": (Image.fromarray(flt), "TIFF", (255, 255, 255), (64, 64, 64)),
    }


MODE_CASES = _mode_cases()


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_modes_load_as_8bit_rgb(tmp_path, case):
    img, fmt, left, right = MODE_CASES[case]
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, fmt)
    with Image.open(path) as check:  # the file really has the mode under test
        assert check.mode == img.mode or case == "CMYK_jpeg"

    for source in (path, path.read_bytes(), img):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (8, 8)
        arr = np.asarray(out)
        assert arr.dtype == np.uint8
        np.testing.assert_allclose(arr[4, 1], left, atol=2, err_msg=f"{case} left from {type(source).__name__}")
        np.testing.assert_allclose(arr[4, 6], right, atol=2, err_msg=f"{case} right from {type(source).__name__}")


def test_arrays_and_pil_inputs_are_not_modified():
    rgb = skimage.data.astronaut()
    original = rgb.copy()
    out = load_image(rgb)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), rgb)
    np.asarray(out.copy())  # a fresh image
    assert np.array_equal(rgb, original)

    pil = Image.fromarray(rgb)
    got = load_image(pil)
    assert got is not pil
    got.paste((0, 0, 0), (0, 0, 50, 50))
    assert np.array_equal(np.asarray(pil), original)

    gray = load_image(rgb[:, :, 0])
    assert gray.mode == "RGB" and np.array_equal(np.asarray(gray)[:, :, 2], rgb[:, :, 0])
    as_float = load_image(rgb.astype(np.float32) / 255.0)
    assert np.array_equal(np.asarray(as_float), rgb)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 7.0))


# ----------------------------------------------------------------------------------------------
# EXIF orientation


def test_exif_orientation_applied(tmp_path):
    # What the camera saw: 40 wide x 20 high, left half red, right half blue.
    seen = np.zeros((20, 40, 3), np.uint8)
    seen[:, :20] = (255, 0, 0)
    seen[:, 20:] = (0, 0, 255)
    # Orientation 6 = "rotate 90 degrees clockwise to display": the sensor stored it rotated 90 CCW.
    stored = np.ascontiguousarray(np.rot90(seen, k=1))
    assert stored.shape == (40, 20, 3)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif)
    before = path.read_bytes()

    out = np.asarray(load_image(path))
    assert out.shape == (20, 40, 3)
    np.testing.assert_allclose(out[10, 5], (255, 0, 0), atol=12)
    np.testing.assert_allclose(out[10, 35], (0, 0, 255), atol=12)
    assert path.read_bytes() == before


def test_real_photo_loads(tmp_path):
    path = face_photo("obama.jpg")
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (910, 1137)
    assert load_image(str(path)).size == img.size
