"""The faceid command line, end to end and offline: real photos, YuNet, a stand-in recognizer, tiny SD."""

from __future__ import annotations

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
        assert settings["seed"] == seed and settings["scale"] == 1.0 and settings["steps"] == 3
        assert settings["guidance_scale"] == 7.5 and settings["face"].endswith("obama.jpg")
        assert settings["adapter"].endswith("faceid.safetensors")
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
    assert settings["combine"] == "concat" and "obama2.jpg" in settings["face"]


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
    assert read_settings(tmp_path / "styled" / "obama_s1.png")["loras"] == {"style": 0.8}
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
