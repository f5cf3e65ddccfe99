"""The faceid command line, end to end and offline: real photos, YuNet, a stand-in recognizer, tiny SD."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bad_files import huge_blank_png, truncated_jpeg
from PIL import Image

from faceid.cli import main
from faceid.outputs import read_settings

TINY = {"--steps": "3", "--width": "24", "--height": "16"}


@pytest.fixture
def sd15(tiny_models):
    return {"--base-model": str(tiny_models.sd15), "--adapter": str(tiny_models.adapter("faceid", "safetensors"))}


def _args(**options) -> list[str]:
    return [item for key, value in options.items() for item in (key, value)]


def _record(path) -> dict:
    """How a PNG names an input file: its name and sha256."""
    return {"name": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def _generate(face, out, model, face_models, *extra):
    argv = ["generate", "--face", str(face), "--prompt", "a photo of a person in a garden", "--out", str(out)]
    return main(argv + _args(**model, **TINY, **{"--face-models": str(face_models)}) + list(extra))


def test_generate_end_to_end(tmp_path, capsys, faces_dir, sd15, face_models_dir):
    out = tmp_path / "out"
    assert _generate(faces_dir / "obama.jpg", out, sd15, face_models_dir, "-n", "3", "--seed", "7") == 0
    images = sorted(out.glob("obama_s*.png"))
    assert [p.name for p in images] == ["obama_s7.png", "obama_s8.png", "obama_s9.png"]
    for path, seed in zip(images, (7, 8, 9), strict=True):
        with Image.open(path) as image:
            assert image.size == (24, 16)
            assert image.text["prompt"] == "a photo of a person in a garden"  # plain text chunks for viewers
        settings = read_settings(path)
        assert settings["seed"] == seed and settings["scale"] == 1.0 and settings["num_inference_steps"] == 3
        assert settings["guidance_scale"] == 7.5 and settings["face"] == [_record(faces_dir / "obama.jpg")]
        # The local model files by name (and sha256), not by path; a Hub id or released name would stay a setting.
        assert settings["model_files"] == {"base_model": {"name": "sd15-tiny"}, "adapter": _record(sd15["--adapter"])}
        assert "base_model" not in settings and "adapter" not in settings
    sheet = out / "contact_sheet_s7.png"
    with Image.open(sheet) as image:
        assert image.size == (512, 512)  # reference face + 3 images in a 2x2 grid of 256-px tiles
    printed = capsys.readouterr().out
    assert "obama_s7.png" in printed and "contact sheet" in printed


def test_scale_zero_and_one_differ_and_seed_reproduces(tmp_path, faces_dir, sd15, face_models_dir):
    def image(scale, name):
        out = tmp_path / name
        code = _generate(
            faces_dir / "obama.jpg", out, sd15, face_models_dir, "-n", "1", "--seed", "3", "--scale", scale
        )
        assert code == 0
        return np.asarray(Image.open(out / "obama_s3.png"), dtype=np.int16)

    one, zero, one_again = image("1", "a"), image("0", "b"), image("1", "c")
    assert np.abs(one - zero).max() > 0
    np.testing.assert_array_equal(one, one_again)
    assert read_settings(tmp_path / "b" / "obama_s3.png")["scale"] == 0.0


def test_every_generation_setting_has_a_flag_that_sets_it(tmp_path):
    from faceid.cli import build_parser
    from faceid.cli.flags import REFERENCE_FIELDS, settings_from_args
    from faceid.settings import GenerationSettings

    values = {
        "prompt": "a", "negative_prompt": "b", "num_images_per_prompt": 3, "seed": 9, "num_inference_steps": 7,
        "guidance_scale": 4.5, "width": 64, "height": 32, "scale": 0.7, "identitynet_scale": 0.6, "lora_scale": 0.6,
        "face_index": 1,
        "combine": "concat", "shortcut": False, "s_scale": 0.5, "identity_window": (0.1, 0.9),
        "base_model": "base", "vae": "vae", "adapter": "adapter.bin", "loras": {"style.safetensors": 0.7},
        "tiny_vae": "taesd", "decoder": "tiny", "fast": "tcd", "scheduler": "euler-trailing", "eta": 0.2, "method": "pulid", "true_cfg": 2.0,
        "true_cfg_start": 2, "pulid_num_zero": 8, "pulid_ortho": "v1",
        "identity_guidance": 1.5, "strength": 0.4, "regions": [(0.0, 0.0, 0.5, 1.0), (0.5, 0.25, 1.0, 1.0)],
        "style": [{"adapter": "plain", "scale": 0.4, "window": (0.1, 0.9)},
                  {"adapter": "plain", "scale": 0.5, "window": (0.1, 0.9)}],
    }  # fmt: skip
    assert set(values) == set(GenerationSettings.model_fields)  # a new field needs a value here, and a flag
    argv = ["generate", "--face", "x.jpg", "--out", str(tmp_path)]
    # Fields whose flags come with images (add_reference_arguments): the images are the call's, not settings.
    own_flags = {
        "regions": ["--regions", "0,0,0.5,1; 0.5,0.25,1,1"],
        "style": ["--style", "a.png:0.4", "--style-adapter", "plain", "--style-window", "0.1", "0.9", "--style",
                  "C:/b.png"],
    }  # fmt: skip
    assert set(own_flags) == set(REFERENCE_FIELDS)
    for name, value in values.items():
        if name in own_flags:
            argv += own_flags[name]
            continue
        flag = GenerationSettings.model_fields[name].json_schema_extra["cli"]["flags"][-1]
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, ",".join(f"{k}:{v}" for k, v in value.items())]
        else:
            argv += [flag, str(value)]
    assert settings_from_args(build_parser().parse_args(argv)) == GenerationSettings(**values)
    # Nothing given: every field stays open for the settings file and the family defaults (n: the CLI's 4).
    bare = settings_from_args(build_parser().parse_args(["generate", "--face", "x.jpg", "--out", "o"]))
    assert bare == GenerationSettings(num_images_per_prompt=4)
    # --tiny-vae alone: the family's released tiny VAE.
    alone = build_parser().parse_args(["generate", "--face", "x.jpg", "--out", "o", "--tiny-vae"])
    assert settings_from_args(alone).tiny_vae == "auto"


def test_png_metadata_reproduces_the_image(tmp_path, faces_dir, sd15, face_models_dir):
    from faceid.settings import GenerationSettings

    first = tmp_path / "first"
    extra = ["-n", "2", "--seed", "5", "--scale", "0.8", "--window", "0", "0.5", "--negative-prompt", "blurry"]
    assert _generate(faces_dir / "obama.jpg", first, sd15, face_models_dir, *extra) == 0
    image = first / "obama_s6.png"
    settings = GenerationSettings.from_png(image)
    assert (settings.seed, settings.num_images_per_prompt, settings.scale) == (6, 1, 0.8)
    assert settings.identity_window == (0.0, 0.5) and settings.negative_prompt == "blurry"
    assert settings == GenerationSettings.model_validate_json(settings.model_dump_json())  # JSON round trip
    # The prompt and every setting come from the PNG: the photo, the face models and the local model files (which
    # the PNG names without their paths) are given again.
    again = tmp_path / "again"
    argv = ["generate", "--settings", str(image), "--face", str(faces_dir / "obama.jpg"), "--out", str(again),
            *_args(**sd15)]  # fmt: skip
    assert main(argv + ["--face-models", str(face_models_dir)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again / "obama_s6.png")), np.asarray(Image.open(image)))
    assert GenerationSettings.from_png(again / "obama_s6.png") == settings
    # A flag given with the file wins over it.
    assert main(argv + ["--face-models", str(face_models_dir), "--scale", "0"]) == 0
    assert read_settings(again / "obama_s6-1.png")["scale"] == 0.0


def _text_chunks(path) -> dict[str, str]:
    """Every text chunk of a PNG: what anyone the image is shared with can read."""
    with Image.open(path) as image:
        image.load()
        return dict(image.text)


def test_png_names_its_input_files_without_their_paths(
    tmp_path, tmp_path_factory, capsys, faces_dir, tiny_models, face_models_dir
):
    """Every file an image is made from (the photo, init and mask images, control image and ControlNet, style
    image and adapter, LoRA, tiny VAE, base model and adapter) is recorded by its name and sha256 (a folder by
    its name), no text chunk holds a path, and the PNG reproduces the image with those files given again."""
    from test_modes import make_controlnet
    from tiny_models import make_tiny_autoencoder

    mine = tmp_path / "my files"
    mine.mkdir()
    face, init, mask, pose, style = (mine / n for n in ("me.jpg", "init.png", "mask.png", "pose.png", "style.jpg"))
    shutil.copyfile(faces_dir / "obama.jpg", face)
    shutil.copyfile(faces_dir / "obama2.jpg", style)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels[0]).save(init)
    Image.fromarray(pixels[1]).save(pose)
    Image.fromarray(np.repeat(np.array([[0] * 12 + [255] * 12], np.uint8), 16, axis=0)).save(mask)
    make_controlnet(tiny_models.sd15, 1).save_pretrained(mine / "controlnet")
    style_adapter = mine / "plain.bin"
    shutil.copyfile(tiny_models.reference("plain"), style_adapter)
    lora = _style_lora_file(mine / "style.safetensors", tiny_models.sd15)
    tiny_vae = make_tiny_autoencoder(mine / "taesd-mine")
    adapter = tiny_models.adapter("faceid", "safetensors")
    models = {"--base-model": str(tiny_models.sd15), "--adapter": str(adapter), "--tiny-vae": str(tiny_vae),
              "--lora": f"{lora}:0.5"}  # fmt: skip
    inputs = {"--init-image": str(init), "--mask-image": str(mask), "--controlnet": str(mine / "controlnet"),
              "--control": f"image:{pose}:0.7", "--style": f"{style}:0.6", "--style-adapter": str(style_adapter)}  # fmt: skip
    common = ["--face", str(face), "--face-models", str(face_models_dir), "--image-encoder",
              str(tiny_models.image_encoder), "--seed", "3", "-n", "1", "--steps", "3"]  # fmt: skip
    made = tmp_path / "made"
    assert main(["generate", "--prompt", "a photo", "--out", str(made), *common, *_args(**models, **inputs)]) == 0
    image = made / "me_s3.png"
    chunks = _text_chunks(image)
    for folder in (tmp_path_factory.getbasetemp(), faces_dir):
        assert not [key for key, text in chunks.items() if str(folder) in text], (folder, chunks)
    stored = read_settings(image)
    assert stored["face"] == [_record(face)]
    assert (stored["init_image"], stored["mask_image"]) == (_record(init), _record(mask))
    assert stored["controls"] == [
        {"kind": "image", "image": _record(pose), "scale": 0.7, "controlnet": {"name": "controlnet"}}
    ]
    assert stored["style_images"] == [_record(style)] and stored["style_adapter"] == _record(style_adapter)
    assert stored["model_files"] == {
        "base_model": {"name": "sd15-tiny"},
        "adapter": _record(adapter),
        "tiny_vae": {"name": "taesd-mine"},
        "loras": [{**_record(lora), "weight": 0.5}],
    }
    assert not {"base_model", "adapter", "tiny_vae", "loras"} & set(stored)
    # --settings IMAGE.png with the same files makes the same image.
    again = ["generate", "--settings", str(image), *common]
    assert main([*again, "--out", str(tmp_path / "again"), *_args(**models, **inputs)]) == 0
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "again" / "me_s3.png")), np.asarray(Image.open(image))
    )
    # Another file than the recorded one is a warning (by its sha256, whatever its name and folder).
    other = tmp_path / "other" / "mask.png"
    other.parent.mkdir()
    Image.fromarray(np.full((16, 24), 255, np.uint8)).save(other)
    capsys.readouterr()
    given = {**inputs, "--mask-image": str(other)}
    assert main([*again, "--out", str(tmp_path / "other-mask"), *_args(**models, **given)]) == 0
    assert f"faceid: warning: {other} is not the --mask-image file (mask.png) {image} was made with" in (
        capsys.readouterr().err
    )
    # A local model left out is one clear line, before anything loads.
    for flag, message in (
        ("--base-model", "made with the local base_model folder sd15-tiny, which images name without its path: give "
         "--base-model again"),
        ("--lora", f"made with the local LoRA file(s) {lora.name}:0.5, which images name without their path: give "
         "--lora FILE:WEIGHT again"),
    ):  # fmt: skip
        given = {key: value for key, value in models.items() if key != flag}
        assert main([*again, "--out", str(tmp_path / "left-out"), *_args(**given, **inputs)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("faceid: error: ") and message in err, err
    assert not (tmp_path / "left-out").exists()


def test_bad_settings_are_one_clear_error(tmp_path, faces_dir, sd15, face_models_dir, capsys):
    out = tmp_path / "out"
    assert _generate(faces_dir / "obama.jpg", out, sd15, face_models_dir, "--width", "30") == 2
    assert "width: must be a multiple of 8" in capsys.readouterr().err
    assert _generate(faces_dir / "obama.jpg", out, sd15, face_models_dir, "--window", "0.8", "0.2") == 2
    assert "identity_window" in capsys.readouterr().err
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)  # a PNG that faceid did not write
    assert _generate(faces_dir / "obama.jpg", out, sd15, face_models_dir, "--settings", str(plain)) == 2
    assert "holds no faceid settings" in capsys.readouterr().err
    assert not out.exists()


def test_second_run_never_overwrites(tmp_path, faces_dir, sd15, face_models_dir):
    for _ in range(2):
        assert _generate(faces_dir / "obama.jpg", tmp_path, sd15, face_models_dir, "-n", "1", "--seed", "1") == 0
    assert sorted(p.name for p in tmp_path.glob("obama_s1*.png")) == ["obama_s1-1.png", "obama_s1.png"]


def test_embed_prints_faces_and_saves(tmp_path, capsys, faces_dir, face_models_dir):
    code = main(["embed", str(faces_dir / "obama2.jpg"), "--face-models", str(face_models_dir), "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "face 0: box=(" in printed and "score=" in printed
    embedding = np.load(tmp_path / "obama2_face0.npy")
    assert embedding.shape == (512,) and abs(np.linalg.norm(embedding) - 1) < 1e-5
    with Image.open(tmp_path / "obama2_face0.png") as crop:
        assert crop.size == (112, 112)


# ---------------------------------------------------------------------- bad input
def _no_face_photo(path: Path) -> None:
    Image.new("RGB", (640, 480), (120, 160, 200)).save(path)


BAD_INPUTS = {
    # name: (make the face file, model override, words expected in the error)
    "missing_file": (None, {}, ["not found"]),
    "zero_byte": (lambda p: p.write_bytes(b""), {}, ["empty"]),
    "not_an_image": (lambda p: p.write_text("hello, I am not a photo"), {}, ["not an image"]),
    "truncated": (truncated_jpeg, {}, ["truncated"]),
    "decompression_bomb": (lambda p: p.write_bytes(huge_blank_png(30000, 30000)), {}, ["too large"]),
    "no_face": (_no_face_photo, {}, ["no face"]),
    "wrong_checkpoint": ("obama", {"--adapter": "tiny:faceid-sdxl"}, ["does not fit", "cross-attention dim"]),
    "missing_adapter": ("obama", {"--adapter": "nowhere/ip-adapter.bin"}, ["adapter file not found"]),
    "missing_base_model": ("obama", {"--base-model": "nobody/no-such-model"}, ["could not load model", "download"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_writes_nothing(
    case, tmp_path, capsys, monkeypatch, faces_dir, sd15, face_models_dir, tiny_models
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make, override, words = BAD_INPUTS[case]
    face = tmp_path / "input.jpg"
    if make == "obama":
        face = faces_dir / "obama.jpg"
    elif make is not None:
        make(face)
    model = dict(sd15)
    for key, value in override.items():
        model[key] = str(tiny_models.adapter(value.removeprefix("tiny:"))) if value.startswith("tiny:") else value
    out = tmp_path / "out"
    code = _generate(face, out, model, face_models_dir)
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # progress bars may come first; the error is the last line
    assert code == 2
    assert err.startswith("faceid: error:") and "Traceback" not in stderr
    for word in words:
        assert word.lower() in err.lower(), err
    assert not out.exists()  # nothing written, not even the folder


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = shutil.which("faceid", path=str(Path(sys.executable).parent))
    assert exe, "the faceid console script is not installed"
    done = subprocess.run(
        [exe, "embed", str(tmp_path / "nope.jpg"), "--face-models", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("faceid: error:") and "Traceback" not in done.stderr
    assert subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60).returncode == 0


def test_every_command_refuses_an_incomplete_face_models_folder(tmp_path, capsys, monkeypatch, faces_dir, sd15):
    """--face-models DIR means the same in every command: the models of that folder, and a clear error naming
    what is missing and where to get it when it lacks one; nothing is downloaded into a user's folder."""
    import faceid.faces.model_files as model_files
    from faceid.faces import default_yunet_path

    monkeypatch.setattr(model_files, "_download", lambda *a, **k: pytest.fail("must not download"))
    incomplete = tmp_path / "models"
    incomplete.mkdir()
    shutil.copyfile(default_yunet_path(), incomplete / "face_detection_yunet.onnx")  # a detector, no recognizer
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copyfile(faces_dir / "obama.jpg", photos / "obama.jpg")
    photo = str(faces_dir / "obama.jpg")
    commands = {
        "generate": ["generate", "--face", photo, "--prompt", "p", "--out", str(tmp_path / "g"), *_args(**sd15)],
        "embed": ["embed", photo, "--out", str(tmp_path / "e")],
        "prepare": ["prepare", str(photos), "--out", str(tmp_path / "p")],
        "eval": ["eval", "--faces", str(photos), "--out", str(tmp_path / "v"), "--no-clip", *_args(**sd15)],
        "score": ["score", str(photos), "--face", photo, "--no-clip"],
        "swap": [
            "swap",
            "--face",
            photo,
            "--target",
            str(faces_dir / "biden.jpg"),
            "--out",
            str(tmp_path / "s"),
            *_args(**sd15),
        ],  # fmt: skip
    }
    for name, argv in commands.items():
        assert main([*argv, "--face-models", str(incomplete)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"faceid: error: No unique face recognizer in {incomplete}"), (name, err)
        assert "w600k_r50.onnx" in err and model_files.BUFFALO_L_URL in err, (name, err)
    assert [p.name for p in incomplete.iterdir()] == ["face_detection_yunet.onnx"]
    assert not any((tmp_path / out).exists() for out in ("g", "e", "p", "v", "s"))


# A tqdm bar without a description: the denoising steps, the progress faceid shows on purpose.
_STEP_BAR = re.compile(r"^\s*\d+%\|[^|]*\| \d+/\d+ \[")


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    """A fresh ``python -m faceid.cli`` process: what a user sees on a first start, import-time notices included."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "faceid.cli", *argv], capture_output=True, text=True, timeout=600, env=env
    )


def test_quiet_start_shows_faceid_warnings_and_no_library_chatter(tmp_path, faces_dir, sd15, face_models_dir):
    done = _run_cli(
        "generate", "--face", str(faces_dir / "obama.jpg"), "--prompt", "a photo of a person", "-n", "1",
        "--out", str(tmp_path / "out"), "--face-models", str(face_models_dir), *_args(**sd15, **TINY),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Library notices (bitsandbytes' "Failed to load CPU gemm_4bit_forward ...", transformers' image
    # processor notices, diffusers' and transformers' model-loading bars) are gone; the steps bar stays.
    chatter = [part for part in re.split(r"[\r\n]+", done.stderr) if part.strip() and not _STEP_BAR.match(part)]
    assert chatter == []

    images = tmp_path / "images"
    images.mkdir()
    shutil.copyfile(faces_dir / "obama2.jpg", images / "obama2.jpg")
    truncated_jpeg(images / "broken.jpg")
    done = _run_cli("score", str(images), "--face", str(faces_dir / "obama.jpg"), "--recognizers", "sface", "--no-clip")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("faceid: warning: skipping ") and "broken.jpg" in lines[0]
    assert "1 of 2 image(s)" in done.stdout

    # --debug lets every library speak; faceid's warning is still there.
    debug = _run_cli(
        "--debug", "score", str(images), "--face", str(faces_dir / "obama.jpg"), "--recognizers", "sface", "--no-clip"
    )
    assert debug.returncode == 0 and "faceid: warning: skipping " in debug.stderr


# ---------------------------------------------------------------------- every model family
def test_models_lists_presets_and_describes_files(capsys, tiny_models):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    for name in ("faceid-sd15", "faceid-plusv2-sd15", "faceid-portrait-sd15", "faceid-sdxl", "faceid-plusv2-sdxl"):
        assert name in listing
    files = [str(tiny_models.adapter(n, "bin")) for n in ("faceid", "faceid-plusv2", "faceid-portrait")]
    assert main(["models", *files]) == 0
    described = capsys.readouterr().out.splitlines()
    assert "faceid adapter (4 tokens, LoRA rank 8)" in described[0]
    assert "Plus or PlusV2" in described[1] and "16 tokens, no LoRA" in described[2]


def test_generate_sdxl(tmp_path, tiny_models, faces_dir, face_models_dir):
    model = {"--base-model": str(tiny_models.sdxl), "--adapter": str(tiny_models.adapter("faceid-sdxl", "bin"))}
    assert _generate(faces_dir / "biden.jpg", tmp_path, model, face_models_dir, "--seed", "1", "-n", "2") == 0
    settings = read_settings(tmp_path / "biden_s1.png")
    assert settings["guidance_scale"] == 5.0  # SDXL's default
    assert Image.open(tmp_path / "biden_s2.png").size == (24, 16)


def test_generate_plusv2_with_window(tmp_path, tiny_models, faces_dir, face_models_dir):
    model = {
        "--base-model": str(tiny_models.sd15),
        "--adapter": str(tiny_models.adapter("faceid-plusv2", "safetensors")),
        "--image-encoder": str(tiny_models.image_encoder),
    }
    extra = ["--seed", "4", "--s-scale", "0.5", "--window", "0", "0.7"]
    assert _generate(faces_dir / "obama2.jpg", tmp_path / "a", model, face_models_dir, *extra) == 0
    settings = read_settings(tmp_path / "a" / "obama2_s4.png")
    assert settings["shortcut"] is True and settings["s_scale"] == 0.5  # "plusv2" in the file name
    assert settings["identity_window"] == [0.0, 0.7]
    assert _generate(faces_dir / "obama2.jpg", tmp_path / "b", model, face_models_dir, *extra, "--no-shortcut") == 0
    assert read_settings(tmp_path / "b" / "obama2_s4.png")["shortcut"] is False
    a = np.asarray(Image.open(tmp_path / "a" / "obama2_s4.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "b" / "obama2_s4.png"), dtype=np.int16)
    assert np.abs(a - b).max() > 0


def test_generate_portrait_from_several_photos(tmp_path, tiny_models, faces_dir, face_models_dir):
    model = {"--base-model": str(tiny_models.sd15), "--adapter": str(tiny_models.adapter("faceid-portrait", "bin"))}
    photos = ["--face", str(faces_dir / "obama2.jpg")]
    assert _generate(faces_dir / "obama.jpg", tmp_path, model, face_models_dir, *photos, "--seed", "2") == 0
    settings = read_settings(tmp_path / "obama_s2.png")
    assert settings["combine"] == "concat" and [f["name"] for f in settings["face"]] == ["obama.jpg", "obama2.jpg"]


def _style_lora_file(path, base_model, seed=0, text_encoder_only=False):
    """A kohya-layout LoRA on every attention to_q/to_v of the tiny SD1.5 UNet, as A1111/ComfyUI write it.

    ``text_encoder_only``: the UNet part does nothing (zero up weights) and the text encoder's attention
    projections carry the LoRA instead (``lora_te_text_model_...`` keys)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    models = Path(base_model)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    parts = [(UNet2DConditionModel.from_pretrained(models / "unet"), "lora_unet_", ("attn1.to_q", "attn2.to_v"))]
    if text_encoder_only:
        parts.append((CLIPTextModel.from_pretrained(models / "text_encoder"), "lora_te_text_model_", ("_proj",)))
    for model, prefix, suffixes in parts:
        for name, module in model.named_modules():
            if name.endswith(suffixes) and isinstance(module, torch.nn.Linear):
                key = prefix + name.replace(".", "_")
                up = torch.randn(module.out_features, 2, generator=generator)
                silent = text_encoder_only and prefix == "lora_unet_"
                state[f"{key}.lora_down.weight"] = torch.randn(2, module.in_features, generator=generator)
                state[f"{key}.lora_up.weight"] = torch.zeros_like(up) if silent else up
                state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path))
    return path


def test_generate_with_a_style_lora(tmp_path, tiny_models, faces_dir, sd15, face_models_dir):
    style = _style_lora_file(tmp_path / "style.safetensors", tiny_models.sd15)

    def run(name, *lora):
        assert _generate(faces_dir / "obama.jpg", tmp_path / name, sd15, face_models_dir, "--seed", "1", *lora) == 0
        return np.asarray(Image.open(tmp_path / name / "obama_s1.png"), dtype=np.int16)

    plain, zero, styled = run("plain"), run("zero", "--lora", f"{style}:0"), run("styled", "--lora", f"{style}:0.8")
    np.testing.assert_array_equal(plain, zero)  # weight 0: the LoRA changes nothing
    assert np.abs(styled - plain).max() > 0
    styled = read_settings(tmp_path / "styled" / "obama_s1.png")
    assert styled["model_files"]["loras"] == [{**_record(style), "weight": 0.8}] and "loras" not in styled
    # a LoRA that acts through the text encoder only: applied there, with the same weight
    prompt_style = _style_lora_file(tmp_path / "prompt_style.safetensors", tiny_models.sd15, text_encoder_only=True)
    np.testing.assert_array_equal(run("prompt_zero", "--lora", f"{prompt_style}:0"), plain)
    assert np.abs(run("prompt_styled", "--lora", f"{prompt_style}:1") - plain).max() > 0
    bad = tmp_path / "not-a-lora.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(bad))
    assert _generate(faces_dir / "obama.jpg", tmp_path / "bad", sd15, face_models_dir, "--lora", str(bad)) == 2
    assert not (tmp_path / "bad").exists()


def test_generate_best_of_keeps_n_and_records_scores(tmp_path, faces_dir, sd15, face_models_dir):
    assert _generate(faces_dir / "obama.jpg", tmp_path, sd15, face_models_dir, "-n", "2", "--best-of", "3",
                     "--seed", "10") == 0  # fmt: skip
    kept = sorted(tmp_path.glob("obama_s*.png"))
    assert len(kept) == 2
    settings = [read_settings(p) for p in kept]
    assert {s["seed"] for s in settings} <= set(range(10, 16))
    assert sorted(s["best_of_rank"] for s in settings) == [0, 1]
    for s in settings:
        assert s["best_of"] == 3 and "identity_similarity" in s and s["identity_recognizer"]
