"""faceid.swap: a person put into a photo, tested on real photos with a stand-in inpainter (no diffusion): the
crop and masks land on the chosen face, the inpainter works at the model's resolution however large the photo,
only the feathered mask's pixels change, EXIF orientation is honoured, and bad input is one clear line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from faceid.cli import main
from faceid.errors import FaceIDError, FaceSelectionError, MaskError, NoFaceError
from faceid.images import load_image
from faceid.outputs import read_settings
from faceid.swap import load_target, plan_swap, swap_face


class Inverter:
    """A stand-in inpainter: returns the crop inverted, and records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, int], tuple[int, int], tuple[int, int], str]] = []

    def __call__(self, crop: Image.Image, mask: Image.Image, size: tuple[int, int]) -> Image.Image:
        self.calls.append((crop.size, mask.size, size, mask.mode))
        return ImageOps.invert(crop)


def _arrays(result, target: Image.Image):
    return np.asarray(result.image), np.asarray(target), np.asarray(result.mask)


def _gradient(path) -> None:
    """A photo with no face: a smooth colour gradient."""
    x = np.linspace(0, 255, 640, dtype=np.float32)
    y = np.linspace(0, 255, 480, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (480, 640)), np.broadcast_to(y, (480, 640)), (x + y) / 2], axis=2)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def _two_faces(faces_dir) -> Image.Image:
    """obama.jpg and biden.jpg side by side, at the same height: a photo with two faces."""
    left, right = load_image(faces_dir / "obama.jpg"), load_image(faces_dir / "biden.jpg")
    right = right.resize((round(right.width * left.height / right.height), left.height))
    both = Image.new("RGB", (left.width + right.width, left.height))
    both.paste(left, (0, 0))
    both.paste(right, (left.width, 0))
    return both


def _assert_no_seam(plan) -> None:
    """The mask is 0 outside the crop and along every edge of the crop that lies inside the photo."""
    mask = np.asarray(plan.mask)
    x1, y1, x2, y2 = plan.box
    outside_box = np.ones_like(mask, bool)
    outside_box[y1:y2, x1:x2] = False
    assert not mask[outside_box].any()
    crop = mask[y1:y2, x1:x2]
    edges = {"top": (y1 > 0, crop[0]), "bottom": (y2 < mask.shape[0], crop[-1])}
    edges |= {"left": (x1 > 0, crop[:, 0]), "right": (x2 < mask.shape[1], crop[:, -1])}
    inner = [name for name, (inside, _) in edges.items() if inside]
    assert inner, "the crop should lie inside the photo on some side"
    for name in inner:
        assert not edges[name][1].any(), f"the mask is not 0 at the crop's {name} edge"


def test_only_the_feathered_mask_changes_on_a_real_photo(faces_dir, analyzer):
    target = load_image(faces_dir / "obama.jpg")
    face = analyzer.get(target)
    inpaint = Inverter()
    result = swap_face(faces_dir / "obama.jpg", inpaint, analyzer=analyzer)
    out, original, mask = _arrays(result, target)

    assert result.image.size == target.size
    assert inpaint.calls == [(result.plan.size,) * 3 + ("L",)]
    outside = mask == 0
    assert outside.mean() > 0.8  # the face only, not the photo
    assert np.array_equal(out[outside], original[outside])  # untouched, bit for bit
    # Every landmark is fully repainted: there the output is the inverted photo (up to the two resamplings).
    for x, y in np.round(face.landmarks).astype(int):
        assert mask[y, x] == 255
    inside = mask == 255
    assert np.abs(out[inside].astype(int) - (255 - original[inside].astype(int))).mean() < 8
    assert np.abs(out[inside].astype(int) - original[inside].astype(int)).mean() > 60
    # The mask is soft: between "kept" and "repainted" lies a band of partial values.
    assert ((mask > 0) & (mask < 255)).sum() > 0.3 * inside.sum()


def test_plan_crop_holds_the_face_and_its_mask_and_fits_the_photo(faces_dir, analyzer):
    target = load_image(faces_dir / "obama2.jpg")
    face = analyzer.get(target)
    plan = plan_swap(target, face, resolution=512)
    x1, y1, x2, y2 = plan.box
    fx1, fy1, fx2, fy2 = face.box
    assert 0 <= x1 <= fx1 and 0 <= y1 <= fy1 and fx2 <= x2 <= target.width and fy2 <= y2 <= target.height
    face_side = max(fx2 - fx1, fy2 - fy1)
    assert 0.35 < face_side / max(x2 - x1, y2 - y1) < 0.6  # the face at a size the model draws well
    assert max(plan.size) == 512 and all(side % 8 == 0 for side in plan.size)
    assert abs(plan.size[0] / plan.size[1] - (x2 - x1) / (y2 - y1)) < 0.05  # the crop's shape, not stretched
    assert plan.mask.size == target.size and plan.crop_mask.size == plan.size
    _assert_no_seam(plan)


@pytest.mark.parametrize("feather", [0.05, 0.2, 0.5])
def test_the_crop_widens_to_hold_the_whole_feathered_mask(faces_dir, analyzer, feather):
    """With no margin the crop would be the face box; it grows to hold the feather, never cutting it."""
    target = load_image(faces_dir / "biden.jpg")
    plan = plan_swap(target, analyzer.get(target), margin=0.0, feather=feather)
    _assert_no_seam(plan)
    mask = np.asarray(plan.mask)
    assert ((mask > 0) & (mask < 255)).any() and (mask == 255).any()


def test_a_face_at_the_photo_edge_is_masked_up_to_it(faces_dir, analyzer):
    """The crop is clamped to the photo; the mask reaches the border where the face is cut by it."""
    full = load_image(faces_dir / "obama.jpg")
    face_box = analyzer.get(full).box
    cut = full.crop((int(face_box[0] + 60), 0, full.width, full.height))  # the face's left part cut off
    face = analyzer.get(cut)
    plan = plan_swap(cut, face)
    x1, y1, x2, y2 = plan.box
    assert x1 == 0 and 0 <= y1 and x2 <= cut.width and y2 <= cut.height
    row = int(face.landmarks[2][1])  # the nose's row crosses the border inside the face
    assert np.asarray(plan.mask)[row, 0] > 0.9 * 255  # no fade towards the border: the face goes on past it


def test_exif_rotated_target_is_swapped_upright(tmp_path, faces_dir, analyzer):
    upright = load_image(faces_dir / "obama.jpg")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways stores
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "sideways.jpg"
    stored.save(path, quality=95, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (upright.height, upright.width)

    result = swap_face(path, Inverter(), analyzer=analyzer)
    assert result.image.size == upright.size  # upright, not the stored sideways size
    assert not result.image.getexif()  # no orientation tag left to rotate it again
    expected_face = analyzer.get(upright).box
    found = analyzer.get(load_image(path)).box
    assert np.abs(found - expected_face).max() < 15  # the face where it is in the upright photo
    target = load_image(path)
    out, original, mask = _arrays(result, target)
    assert np.array_equal(out[mask == 0], original[mask == 0])
    assert np.abs(original.astype(int) - np.asarray(upright, int)).mean() < 6  # same picture, same way up


def test_huge_target_is_generated_at_the_model_resolution(faces_dir, analyzer):
    small = load_image(faces_dir / "obama.jpg")
    huge = small.resize((round(small.width * 4000 / small.height), 4000), Image.Resampling.BICUBIC)
    inpaint = Inverter()
    result = swap_face(huge, inpaint, analyzer=analyzer, resolution=512)
    ((crop_size, mask_size, size, _),) = inpaint.calls
    assert crop_size == mask_size == size and max(size) == 512
    assert result.image.size == huge.size and max(result.image.size) == 4000
    x1, y1, x2, y2 = result.plan.box
    assert max(x2 - x1, y2 - y1) > 2000  # the crop itself is large: it was shrunk for generation
    _assert_no_seam(result.plan)
    out, original, mask = _arrays(result, huge)
    assert np.array_equal(out[mask == 0], original[mask == 0])
    assert np.abs(out[mask == 255].astype(int) - (255 - original[mask == 255].astype(int))).mean() < 8


def test_target_without_a_face_is_one_line_naming_it(tmp_path, analyzer):
    path = tmp_path / "gradient.png"
    _gradient(path)
    inpaint = Inverter()
    with pytest.raises(NoFaceError) as caught:
        swap_face(path, inpaint, analyzer=analyzer)
    message = str(caught.value)
    assert "No face found" in message and str(path) in message and "\n" not in message
    assert inpaint.calls == []


def test_face_index_chooses_among_several_and_out_of_range_says_so(faces_dir, analyzer):
    photo = _two_faces(faces_dir)
    faces = analyzer.analyze(photo)
    assert len(faces) == 2
    split = load_image(faces_dir / "obama.jpg").width  # where the two photos meet
    for index in (0, 1):
        mask = np.asarray(swap_face(photo, Inverter(), analyzer=analyzer, face_index=index).mask)
        centre = faces[index].box.reshape(2, 2).mean(axis=0).astype(int)
        assert mask[centre[1], centre[0]] == 255
        other = faces[1 - index].box.reshape(2, 2).mean(axis=0).astype(int)
        assert mask[other[1], other[0]] == 0
        on_left = centre[0] < split
        assert not (mask[:, split:] if on_left else mask[:, :split]).any()  # the other person is untouched
    inpaint = Inverter()
    with pytest.raises(FaceSelectionError) as caught:
        swap_face(photo, inpaint, analyzer=analyzer, face_index=2)
    message = str(caught.value)
    assert "face index 2" in message and "only 2 face(s)" in message and "0..1" in message
    assert "\n" not in message and inpaint.calls == []


def test_user_mask_is_used_and_checked(tmp_path, faces_dir, analyzer):
    target = load_image(faces_dir / "obama.jpg")
    face = analyzer.get(target)
    # A mask over the mouth only: the eyes stay as they were.
    mx, my = face.landmarks[3:].mean(axis=0).astype(int)
    user = Image.new("L", target.size, 0)
    user.paste(255, (mx - 50, my - 25, mx + 50, my + 25))
    result = swap_face(target, Inverter(), analyzer=analyzer, mask=user)
    out, original, mask = _arrays(result, target)
    assert np.array_equal(out[mask == 0], original[mask == 0])
    assert mask[my - 25 : my + 25, mx - 50 : mx + 50].min() > 0.9 * 255  # the feather grows outwards, corners too
    _assert_no_seam(result.plan)
    for x, y in np.round(face.landmarks[:2]).astype(int):  # the eyes
        assert mask[y, x] == 0 and np.array_equal(out[y, x], original[y, x])

    wrong = tmp_path / "mask.png"
    Image.new("L", (target.height, target.width), 255).save(wrong)  # the sideways size
    with pytest.raises(MaskError) as caught:
        swap_face(target, Inverter(), analyzer=analyzer, mask=wrong)
    message = str(caught.value)
    assert f"{target.height}x{target.width}" in message and f"{target.width}x{target.height}" in message
    assert str(wrong) in message and "\n" not in message
    with pytest.raises(MaskError, match="nothing to repaint"):
        swap_face(target, Inverter(), analyzer=analyzer, mask=Image.new("L", target.size, 100))


def test_found_once_swapped_many_times(faces_dir, analyzer):
    """A load_target result is reused: the same plan, no second face search, its own face and mask."""
    target = load_target(faces_dir / "obama.jpg", analyzer=analyzer)
    first = swap_face(target, Inverter())
    second = swap_face(target, Inverter())
    assert first.plan.box == second.plan.box and np.array_equal(np.asarray(first.image), np.asarray(second.image))
    with pytest.raises(ValueError, match="load_target"):
        swap_face(target, Inverter(), face_index=1)


@pytest.mark.parametrize("resolution", [500, 32, 512.0])
def test_resolution_must_be_a_model_size(faces_dir, analyzer, resolution):
    target = load_image(faces_dir / "obama.jpg")
    with pytest.raises(FaceIDError, match="multiple of 8"):
        plan_swap(target, analyzer.get(target), resolution=resolution)


def test_inpainter_returning_another_size_is_refused(faces_dir, analyzer):
    with pytest.raises(ValueError, match="inpaint returned a 64x64 image"):
        swap_face(faces_dir / "obama.jpg", lambda crop, mask, size: crop.resize((64, 64)), analyzer=analyzer)


# ---------------------------------------------------------------------- the command line, before models load
def _swap_cli(face, target, out, face_models_dir, *extra) -> int:
    # Models that do not exist: an error about the target must come before any model is loaded.
    return main([
        "swap", "--face", str(face), "--target", str(target), "--out", str(out), "--face-models", str(face_models_dir),
        "--base-model", "nobody/no-such-model", "--adapter", str(out.parent / "nowhere" / "ip-adapter.bin"), *extra,
    ])  # fmt: skip


def test_cli_target_without_a_face_fails_before_models_load(tmp_path, capsys, monkeypatch, faces_dir, face_models_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = tmp_path / "gradient.png"
    _gradient(target)
    out = tmp_path / "out"
    assert _swap_cli(faces_dir / "obama.jpg", target, out, face_models_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("faceid: error: No face found in") and str(target) in err[0]
    assert not out.exists()


def test_cli_wrong_mask_size_and_bad_index_fail_before_models_load(
    tmp_path, capsys, monkeypatch, faces_dir, face_models_dir
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mask = tmp_path / "mask.png"
    Image.new("L", (100, 80), 255).save(mask)
    out = tmp_path / "out"
    target = faces_dir / "obama.jpg"
    assert _swap_cli(faces_dir / "biden.jpg", target, out, face_models_dir, "--mask", str(mask)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"faceid: error: Mask {mask} is 100x80 but the target"), err
    assert _swap_cli(faces_dir / "biden.jpg", target, out, face_models_dir, "--target-face-index", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("faceid: error: Asked for face index 3 in") and "only 1 face(s)" in err[-1], err
    assert _swap_cli(faces_dir / "biden.jpg", target, out, face_models_dir, "--resolution", "500") == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert not out.exists()
    # The models come last: with a good target the missing base model is what stops it.
    assert _swap_cli(faces_dir / "biden.jpg", target, out, face_models_dir) == 2
    assert "adapter file not found" in capsys.readouterr().err.lower()


def test_cli_swap_end_to_end_on_the_tiny_model(tmp_path, tmp_path_factory, faces_dir, face_models_dir, tiny_models):
    """`faceid swap` through the pipeline's inpainting: the target's size, and nothing outside the mask changes."""
    out = tmp_path / "out"
    target = faces_dir / "biden.jpg"
    argv = ["swap", "--face", str(faces_dir / "obama.jpg"), "--target", str(target), "--out", str(out),
            "--face-models", str(face_models_dir), "--base-model", str(tiny_models.sd15),
            "--adapter", str(tiny_models.adapter("faceid")), "--resolution", "64", "--steps", "2", "-n", "1",
            "--seed", "5"]  # fmt: skip
    assert main(argv) == 0
    result = out / "biden_swap_s5.png"
    with Image.open(target) as original, Image.open(result) as swapped, Image.open(out / "biden_swap_mask.png") as m:
        before = np.asarray(ImageOps.exif_transpose(original).convert("RGB"))
        after = np.asarray(swapped.convert("RGB"))
        mask = np.asarray(m.convert("L"))
    assert after.shape == before.shape and mask.shape == before.shape[:2]
    outside = mask == 0
    assert outside.mean() > 0.5 and np.array_equal(after[outside], before[outside])
    assert np.abs(after[mask == 255].astype(int) - before[mask == 255]).mean() > 1  # the face was repainted
    # The PNG names the photos and the local models by name and sha256 (folders by name), never by their paths.
    with Image.open(result) as swapped:
        swapped.load()
        chunks = swapped.text
    assert not [
        key for key, text in chunks.items() if str(tmp_path_factory.getbasetemp()) in text or str(faces_dir) in text
    ]
    stored = read_settings(result)
    assert [stored["face"][0]["name"], stored["target"]["name"], stored["seed"]] == ["obama.jpg", "biden.jpg", 5]
    assert (
        stored["model_files"]["base_model"] == {"name": tiny_models.sd15.name} and len(stored["target"]["sha256"]) == 64
    )
