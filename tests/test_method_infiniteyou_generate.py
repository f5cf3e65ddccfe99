"""InfiniteYou through faceid's Python API and CLI (``method="infiniteyou"`` on a FLUX.1 model set without a FaceID
adapter), on the tests' tiny FLUX with a tiny InfiniteYou in the released layout (``tiny_models.build_infiniteyou``:
``infu_flux_v1.0/{aes_stage2,sim_stage1}/``) and a tiny facexlib IR-SE recognizer.

Checked: faceid's IR-SE50 (``faceid.faces.irse50``) against facexlib's own code on a tiny random network (the arrays
of ``tests/data/infiniteyou_face``, made by the script there) and its strict loading; a photo's identity is the
recognizer's embedding of its aligned crop (the call equals the call given that embedding), refused clearly without
the recognizer file; the keypoint control image of a kps photo as the authors make it; scale and window act (a
window without a step is scale 0, bit for bit); both model sets load and differ; the CLI end to end; and, where the
golden folder is present, the whole call (plan, pipeline, per-call InfuseNet) against the authors' final latents.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import METHODS_GOLDEN_DIR
from face_helpers import face_photo
from PIL import Image
from tiny_models import flux_with_text_encoders

from faceid.cli import main
from faceid.errors import CheckpointError, FaceIDError
from faceid.faces.irse50 import IRSE50, IRSE50_FILE, load_irse50
from faceid.methods.infiniteyou import control_image, fit_photo
from faceid.outputs import read_settings
from faceid.pipeline import FaceIDPipeline

FACE_DATA = Path(__file__).parent / "data" / "infiniteyou_face"
RUN = {"width": 32, "height": 32, "num_inference_steps": 2, "output_type": "np"}
EMBEDDING = np.random.default_rng(3).standard_normal(512).astype(np.float32)


def _recording_script():
    spec = importlib.util.spec_from_file_location("make_arrays", FACE_DATA / "make_arrays.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _recording_script()


def tiny_irse_state() -> dict[str, torch.Tensor]:
    """The tiny IR-SE's weights as the recording script filled facexlib's (from each key's name and shape)."""
    return SCRIPT.fill(IRSE50(SCRIPT.TINY_UNITS).state_dict())


def load(flux_dir, source, face_models):
    return FaceIDPipeline.from_pretrained(
        flux_dir, None, methods={"infiniteyou": source}, device="cpu", progress=False, face_models=face_models
    )


@pytest.fixture(scope="module")
def pipe(flux_dir, infiniteyou_dir, both_packs):
    return load(flux_dir, infiniteyou_dir, both_packs)


@pytest.fixture(scope="module")
def photo():
    return face_photo("obama.jpg")


# ---------------------------------------------------------------------- the recognizer
def test_irse50_is_facexlibs_on_a_tiny_random_network():
    recorded = np.load(FACE_DATA / "arrays.npz")
    net = IRSE50(SCRIPT.TINY_UNITS)
    net.load_state_dict(tiny_irse_state(), strict=True)
    embeddings = net.eval().embed(recorded["crops_rgb"])
    assert embeddings.shape == recorded["embeddings"].shape
    difference = float(np.abs(embeddings - recorded["embeddings"]).max())
    assert difference <= 1e-5, difference
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    # BGR as the authors feed it: the RGB crop as such gives other vectors.
    assert np.abs(net.embed(recorded["crops_rgb"][..., ::-1].copy()) - recorded["embeddings"]).max() > 1e-2


def test_the_released_layout_is_facexlibs_50_layer_network():
    state = IRSE50().state_dict()
    assert len([k for k in state if k.endswith("res_layer.1.weight")]) == 24  # 3 + 4 + 14 + 3 bottlenecks
    assert state["output_layer.3.weight"].shape == (512, 512 * 7 * 7)
    assert state["body.0.res_layer.5.fc1.weight"].shape == (4, 64, 1, 1)  # squeeze-excitation, reduction 16


@pytest.mark.parametrize("change", ["remove", "rename"])
def test_irse50_loads_strictly(tmp_path, change):
    state = tiny_irse_state()
    key = "body.2.res_layer.5.fc2.weight"
    tensor = state.pop(key)
    if change == "rename":
        state[key.replace("fc2", "fc3")] = tensor
    torch.save(state, tmp_path / IRSE50_FILE)
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load_irse50(tmp_path / IRSE50_FILE)
    torch.save({**tiny_irse_state(), "body.0.res_layer.1.weight": torch.zeros(64, 64, 1, 1)}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"'body.0.res_layer.1.weight' has shape \(64, 64, 1, 1\)"):
        load_irse50(tmp_path / "shape.pth")


# ---------------------------------------------------------------------- a call
def test_a_photo_is_the_recognizers_embedding_of_its_aligned_crop(pipe, photo):
    loaded = pipe.methods["infiniteyou"]
    assert loaded.recognizer is not None
    face = pipe.face_analyzer.get(photo)
    embedding = loaded.recognizer.embed(face.aligned)
    by_photo = pipe("a photo", photo, seed=1, **RUN)
    by_embedding = pipe("a photo", embedding, seed=1, **RUN)
    np.testing.assert_array_equal(by_photo.images, by_embedding.images)
    assert by_photo.settings.method == "infiniteyou" and by_photo.faces[0] is not None
    other = pipe("a photo", EMBEDDING, seed=1, **RUN)
    assert not np.allclose(by_photo.images, other.images, atol=1e-4)  # the identity counts


def test_without_the_recognizer_a_photo_is_refused_and_an_embedding_runs(
    flux_dir, infiniteyou_dir, both_packs, tmp_path, photo
):
    folder = tmp_path / "InfiniteYou"
    shutil.copytree(infiniteyou_dir / "infu_flux_v1.0", folder / "infu_flux_v1.0")
    bare = load(flux_dir, folder, both_packs)
    assert bare.methods["infiniteyou"].recognizer is None
    with pytest.raises(FaceIDError, match=f"facexlib's ArcFace IR-SE50 \\({IRSE50_FILE}\\), and none is loaded"):
        bare("a photo", photo, **RUN)
    assert bare("a photo", EMBEDDING, seed=1, **RUN).images.shape == (1, 32, 32, 3)


# A frame where the fitted portrait's face is large enough for the stand-in detector.
KPS_RUN = {**RUN, "width": 96, "height": 160}


def test_a_kps_photo_gives_the_authors_keypoint_control_image(pipe, photo):
    result = pipe("a photo", EMBEDDING, kps=face_photo("biden.jpg"), seed=1, **KPS_RUN)
    with Image.open(face_photo("biden.jpg")) as biden:
        fitted = fit_photo(biden.convert("RGB"), (96, 160))
    expected = control_image((96, 160), pipe.face_analyzer.get(fitted).landmarks)
    np.testing.assert_array_equal(np.asarray(result.kps_image), np.asarray(expected))
    assert np.asarray(expected).any()
    black = pipe("a photo", EMBEDDING, seed=1, **KPS_RUN)
    assert not np.asarray(black.kps_image).any()
    assert not np.allclose(result.images, black.images, atol=1e-4)


def test_scale_and_window_act_and_a_window_without_a_step_is_scale_zero(pipe):
    full = pipe("a photo", EMBEDDING, seed=1, **RUN)
    half = pipe("a photo", EMBEDDING, seed=1, scale=0.5, **RUN)
    off = pipe("a photo", EMBEDDING, seed=1, scale=0.0, **RUN)
    late = pipe("a photo", EMBEDDING, seed=1, identity_window=(0.5, 1.0), **RUN)
    none = pipe("a photo", EMBEDDING, seed=1, identity_window=(0.9, 1.0), **RUN)  # steps at 0 and 0.5
    for other in (half, off, late):
        assert not np.allclose(full.images, other.images, atol=1e-4)
    np.testing.assert_array_equal(none.images, off.images)
    assert half.settings.scale == 0.5 and late.settings.identity_window == (0.5, 1.0)


def test_both_model_sets_load_and_differ(pipe, flux_dir, infiniteyou_dir, both_packs):
    assert pipe.method_sources["infiniteyou"] == str(infiniteyou_dir / "infu_flux_v1.0" / "aes_stage2")
    sim = load(flux_dir, infiniteyou_dir / "infu_flux_v1.0" / "sim_stage1", both_packs)
    assert sim.method_sources["infiniteyou"].endswith("sim_stage1")
    assert sim.methods["infiniteyou"].recognizer is not None  # found two folders up, beside infu_flux_v1.0/
    a = pipe("a photo", EMBEDDING, seed=1, **RUN).images
    b = sim("a photo", EMBEDDING, seed=1, **RUN).images
    assert not np.allclose(a, b, atol=1e-4)
    with pytest.raises(CheckpointError, match="is not an InfiniteYou model set"):
        load(flux_dir, flux_dir, both_packs)


# ---------------------------------------------------------------------- the CLI
def test_cli_generates_with_infiniteyou_on_flux(tmp_path, flux_dir, infiniteyou_dir, both_packs, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--face", str(face_photo("obama.jpg")), "--prompt", "a photo", "--out", str(out),
            "--base-model", str(flux_dir), "--face-models", str(both_packs), "--steps", "2", "-n", "1", "--seed",
            "3", "--width", "96", "--height", "160", "--device", "cpu", "--method", "infiniteyou",
            "--method-weights", f"infiniteyou={infiniteyou_dir}", "--scale", "0.7",
            "--kps", str(face_photo("biden.jpg"))]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    stored = read_settings(out / "obama_s3.png")
    assert (stored["method"], stored["scale"], stored["guidance_scale"]) == ("infiniteyou", 0.7, 3.5)
    with Image.open(out / "obama_s3-kps.png") as kps:
        assert kps.size == (96, 160) and np.asarray(kps).any()
    capsys.readouterr()
    # --adapter none says the same; a FaceID adapter on FLUX is refused, saying how to load it.
    small = [a for a in argv[: argv.index("--kps")]]
    small[small.index("--width") + 1 : small.index("--height") + 2] = ["32", "--height", "32"]
    assert main([*small, "--adapter", "none", "--quantize", "int8"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*argv[: argv.index("--method")], "--adapter", "faceid-sd15"]) == 2
    assert "adapter=None" in capsys.readouterr().err
    assert main([*small, "--offload", "model"]) == 2
    assert "moves models between the CPU and a GPU" in capsys.readouterr().err


# ---------------------------------------------------------------------- the authors' whole call
GOLDEN = METHODS_GOLDEN_DIR / "infiniteyou"


@pytest.mark.skipif(not (GOLDEN / "manifest.json").is_file(), reason=f"no InfiniteYou golden folder at {GOLDEN}")
def test_the_whole_call_against_the_authors_final_latents(tmp_path, both_packs):
    """The golden's tiny FLUX (its transformer, VAE and scheduler, with tiny text encoders of its widths: the prompt
    embeddings are the recorded ones) and its InfiniteYou loaded as a model set; every recorded setting with a black
    control image run through FaceIDPipeline (plan, FluxControlNetPipeline, per-call InfuseNet), the recorded
    latents, the authors' global seed before the call (the control image's VAE sample draws from it)."""
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    call, inputs, expected = manifest["call"], np.load(GOLDEN / "inputs.npz"), np.load(GOLDEN / "expected.npz")
    base = (GOLDEN / manifest["base_model"]).resolve()
    folder = flux_with_text_encoders(base, tmp_path / "flux")
    model_set = (GOLDEN / manifest["checkpoints"]["image_proj"]).parent
    pipe = load(folder, model_set, both_packs)
    name = call["controlnet_prompt_embeds"].replace("id_tokens_", "face_emb_")
    encoded = pipe.encode("a photo", inputs[name], num_images_per_prompt=1)
    conditioning = dataclasses.replace(
        encoded,
        pipe_kwargs={
            "prompt_embeds": torch.from_numpy(inputs["prompt_embeds"]),
            "pooled_prompt_embeds": torch.from_numpy(inputs["pooled_prompt_embeds"]),
        },
    )
    black = [s for s in manifest["settings"] if s["control_image"] == "black"]
    assert black
    for setting in black:
        torch.manual_seed(call["seed_everything"])
        latents = pipe(
            conditioning=conditioning,
            latents=torch.from_numpy(inputs["latents"]),
            scale=setting["infusenet_conditioning_scale"],
            identity_window=(call["control_guidance_start"], call["control_guidance_end"]),
            guidance_scale=call["guidance_scale"],
            num_inference_steps=call["num_inference_steps"],
            width=call["width"],
            height=call["height"],
            output_type="latent",
        ).images
        key = f"{setting['prefix']}final_latents"
        difference = float(np.abs(latents.numpy().astype(np.float64) - expected[key]).max())
        assert difference <= manifest["arrays"][key]["atol"], (key, difference)
