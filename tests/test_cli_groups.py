"""`faceid generate` with several people in one picture, style references and the --combo preset: the tiny
models, the real photos, the PNG metadata; bad region strings are one clear line before anything loads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_cli import TINY, _args, _generate, _record, _text_chunks

from faceid.cli import build_parser, main
from faceid.cli.flags import settings_from_args
from faceid.combos import COMBOS
from faceid.outputs import read_settings
from faceid.settings import StyleSetting

COMBO = "plusv2+plus-face"


@pytest.fixture
def sd15(tiny_models):
    return {"--base-model": str(tiny_models.sd15), "--adapter": str(tiny_models.adapter("faceid", "safetensors"))}


def _png(folder):
    (path,) = [p for p in folder.glob("*_s*.png") if not p.name.startswith("contact_sheet")]
    return path, np.asarray(Image.open(path), dtype=np.int16)


def test_combo_resolves_to_plusv2_at_0_8_and_plus_face_at_0_4():
    from faceid.references import REFERENCE_ADAPTERS
    from faceid.variants import VARIANTS

    combo = COMBOS[COMBO]
    for family, name in combo.adapters.items():
        assert VARIANTS[name].family == family and VARIANTS[name].architecture.name == "plusv2"
    assert combo.reference in REFERENCE_ADAPTERS
    (reference,) = combo.style("me.jpg")
    assert (reference.image, reference.scale, reference.adapter, reference.face_crop) == (
        "me.jpg",
        0.4,
        "plus-face",
        True,
    )

    def resolve(*flags):
        args = build_parser().parse_args(["generate", "--face", "me.jpg", "--out", "o", "--combo", COMBO, *flags])
        return settings_from_args(args)

    settings = resolve()
    assert (settings.adapter, settings.scale) == ("faceid-plusv2-sd15", 0.8)
    assert settings.style == [StyleSetting(adapter="plus-face", scale=0.4)]
    # Flags given win; --style-adapter reads the combination's photo too; --style references come first.
    given = resolve("--adapter", "faceid-plusv2-sdxl", "--scale", "0.6", "--style", "art.png:0.3", "--style-adapter",
                    "plain")  # fmt: skip
    assert (given.adapter, given.scale) == ("faceid-plusv2-sdxl", 0.6)
    assert [(s.adapter, s.scale) for s in given.style] == [("plain", 0.3), ("plain", 0.4)]


def test_two_people_with_auto_regions_and_from_a_group_photo(tmp_path, faces_dir, sd15, face_models_dir):
    people = ["--face", str(faces_dir / "biden.jpg"), "--seed", "3", "-n", "1"]
    assert (
        _generate(faces_dir / "obama.jpg", tmp_path / "auto", sd15, face_models_dir, *people, "--regions", "auto") == 0
    )
    path, auto = _png(tmp_path / "auto")
    stored = read_settings(path)
    assert stored["regions"] == "auto" and stored["face"] == [
        _record(faces_dir / n) for n in ("obama.jpg", "biden.jpg")
    ]
    # The same two people from a photo of them side by side: its faces give the columns, recorded as boxes.
    obama, biden = (Image.open(faces_dir / name).convert("RGB") for name in ("obama.jpg", "biden.jpg"))
    pair = Image.new("RGB", (obama.width + biden.width, max(obama.height, biden.height)), "white")
    pair.paste(obama, (0, 0))
    pair.paste(biden, (obama.width, 0))
    pair.save(tmp_path / "pair.jpg")
    photo = ["--regions", str(tmp_path / "pair.jpg")]
    assert _generate(faces_dir / "obama.jpg", tmp_path / "photo", sd15, face_models_dir, *people, *photo) == 0
    path, from_photo = _png(tmp_path / "photo")
    stored = read_settings(path)
    (x0, y0, cut, y1), second = stored["regions"]
    assert (x0, y0, y1, second[2]) == (0, 0, 1, 1) and abs(cut - obama.width / pair.width) < 0.2
    assert stored["regions_photo"] == _record(tmp_path / "pair.jpg")
    assert not [key for key, text in _text_chunks(path).items() if str(tmp_path) in text]  # names, never paths
    # The PNG reproduces the image from the same two photos (and model files): the boxes are its settings.
    again = ["generate", "--settings", str(path), "--face", str(faces_dir / "obama.jpg"), "--face",
             str(faces_dir / "biden.jpg"), "--out", str(tmp_path / "again"), "--face-models", str(face_models_dir),
             *_args(**sd15)]  # fmt: skip
    assert main(again) == 0
    np.testing.assert_array_equal(_png(tmp_path / "again")[1], from_photo)
    # One identity from both photos (no regions) is another picture.
    assert _generate(faces_dir / "obama.jpg", tmp_path / "one", sd15, face_models_dir, *people) == 0
    assert "regions" not in read_settings(_png(tmp_path / "one")[0])
    assert np.abs(_png(tmp_path / "one")[1] - auto).max() > 0


def test_two_people_by_mask_images(tmp_path, capsys, faces_dir, sd15, face_models_dir):
    masks = []
    for k in range(2):  # the left and the right half, white where the person goes
        mask = Image.new("L", (24, 16), 0)
        mask.paste(255, (12 * k, 0, 12 * (k + 1), 16))
        mask.save(tmp_path / f"mask{k}.png")
        masks += ["--region-mask", str(tmp_path / f"mask{k}.png")]
    people = ["--face", str(faces_dir / "biden.jpg"), "--seed", "3", "-n", "1"]
    assert _generate(faces_dir / "obama.jpg", tmp_path / "a", sd15, face_models_dir, *people, *masks) == 0
    path, by_masks = _png(tmp_path / "a")
    stored = read_settings(path)
    assert stored["regions"] == "masks" and stored["region_masks"] == [_record(m) for m in masks[1::2]]
    # The same halves as boxes make the same picture.
    boxes = ["--regions", "0,0,0.5,1;0.5,0,1,1"]
    assert _generate(faces_dir / "obama.jpg", tmp_path / "b", sd15, face_models_dir, *people, *boxes) == 0
    np.testing.assert_array_equal(_png(tmp_path / "b")[1], by_masks)
    again = ["generate", "--settings", str(path), "--face", str(faces_dir / "obama.jpg"), "--face",
             str(faces_dir / "biden.jpg"), "--out", str(tmp_path / "c"), "--face-models", str(face_models_dir),
             *_args(**sd15)]  # fmt: skip
    capsys.readouterr()
    assert main(again) == 2
    assert "give one --region-mask per --face again" in capsys.readouterr().err
    assert main([*again, *masks]) == 0
    np.testing.assert_array_equal(_png(tmp_path / "c")[1], by_masks)


def test_style_reference_is_recorded_and_reproduced(tmp_path, capsys, tiny_models, faces_dir, sd15, face_models_dir):
    plain = tiny_models.reference("plain")
    reference = ["--style-adapter", str(plain), "--image-encoder", str(tiny_models.image_encoder), "--seed", "2",
                 "-n", "1"]  # fmt: skip
    style = f"{faces_dir / 'obama2.jpg'}:0.7"
    assert _generate(faces_dir / "obama.jpg", tmp_path / "off", sd15, face_models_dir, *reference[4:]) == 0
    assert _generate(faces_dir / "obama.jpg", tmp_path / "a", sd15, face_models_dir, "--style", style, *reference,
                     "--style-window", "0", "0.5") == 0  # fmt: skip
    path, styled = _png(tmp_path / "a")
    stored = read_settings(path)
    assert stored["style"] == [{"adapter": "ip-adapter-plain_sd15", "scale": 0.7, "window": [0.0, 0.5]}]
    assert stored["style_images"] == [_record(faces_dir / "obama2.jpg")] and stored["style_adapter"] == _record(plain)
    assert np.abs(styled - _png(tmp_path / "off")[1]).max() > 0  # the reference acts
    # --settings IMAGE.png: the reference image and the adapter file again; scale and window from the PNG.
    again = ["generate", "--settings", str(path), "--face", str(faces_dir / "obama.jpg"), "--face-models",
             str(face_models_dir), "--out", str(tmp_path / "b"), *_args(**sd15)]  # fmt: skip
    assert main([*again, "--style", str(faces_dir / "obama2.jpg"), *reference[:4]]) == 0
    np.testing.assert_array_equal(_png(tmp_path / "b")[1], styled)
    capsys.readouterr()
    assert main(again) == 2
    assert "give their images again with --style" in capsys.readouterr().err
    assert main([*again, "--style", str(faces_dir / "obama2.jpg")]) == 2
    assert "a file: give it again with --style-adapter FILE" in capsys.readouterr().err


def test_combo_on_the_tiny_models(tmp_path, tiny_models, faces_dir, face_models_dir):
    files = {
        "--base-model": str(tiny_models.sd15),
        "--adapter": str(tiny_models.adapter("faceid-plusv2", "safetensors")),
        "--image-encoder": str(tiny_models.image_encoder),
    }
    extra = ["--combo", COMBO, "--style-adapter", str(tiny_models.reference("plus")), "--seed", "1", "-n", "1"]
    assert _generate(faces_dir / "obama2.jpg", tmp_path, files, face_models_dir, *extra) == 0
    stored = read_settings(_png(tmp_path)[0])
    assert stored["scale"] == 0.8 and stored["shortcut"] is True and stored["combo"] == COMBO
    assert stored["style"] == [{"adapter": "ip-adapter-plus_sd15", "scale": 0.4, "face_crop": True}]
    assert stored["style_images"] == [_record(faces_dir / "obama2.jpg")]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--regions", "0,0,0.5"], "box 0 ('0,0,0.5') is not 4 numbers x0,y0,x1,y1"),
        (["--regions", "0,0,0.5,1;0.5,0,1,x"], "a photo with the people (no such file)"),
        (["--regions", "0,0,0.5,1;0.6,0,0.4,1"], "--regions box 1 (0.6, 0.0, 0.4, 1.0) is not a box"),
        (["--regions", "0,0,1,1"], "1 regions for 2 --face photos"),
        (["--regions", "auto", "--region-mask", "m.png"], "give --regions or --region-mask, not both"),
        (["--regions", "auto", "--best-of", "2"], "--best-of scores the likeness of one person"),
        (["--regions", "auto", "--combo", COMBO], "--combo reads one person's photo"),
        (["--style-adapter", "plain"], "--style-adapter goes with --style"),
        (["--style", "art.png", "--style-adapter", "nothing.bin"], "--style-adapter 'nothing.bin': give plain"),
    ],
)
def test_bad_regions_and_references_are_one_clear_line(tmp_path, capsys, faces_dir, flags, message):
    argv = ["generate", "--face", str(faces_dir / "obama.jpg"), "--face", str(faces_dir / "biden.jpg"), "--prompt",
            "two people", "--out", str(tmp_path / "out"), *[x for kv in TINY.items() for x in kv], *flags]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("faceid: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()
