"""InstantID through faceid's Python API and CLI (``method="instantid"``), on the tests' tiny SDXL with a tiny
InstantID in the released layout of ``InstantX/InstantID`` (``tiny_models.build_instantid``) and stand-in face
models of both insightface packs (buffalo_l for FaceID, antelopev2 for InstantID).

Checked: a call gives images and records its method and scales; it equals a call made by hand of the same pieces
(a stock diffusers ``StableDiffusionXLControlNetPipeline`` with ``InstantID.control`` and ``token_group``, the
tokens of the face's raw antelopev2 embedding, ``make_control_image("kps")``, the same seed), so the wiring passes
the right tokens, keypoint image and scales; each scale changes the image; FaceID calls are bit for bit those of
a pipeline without InstantID; a FaceID and an InstantID call from two threads equal each alone; img2img, a user
ControlNet beside IdentityNet, a keypoint photo of one's own; the CLI end to end; the refusals.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import load_tiny_sdxl
from face_helpers import face_photo, make_test_face_models_dir
from PIL import Image
from tiny_models import make_controlnet

from faceid.cli import main
from faceid.control import make_control_image
from faceid.errors import CheckpointError, FaceIDError, MissingWeightsError
from faceid.modes import ControlInput
from faceid.outputs import read_settings
from faceid.pipeline import FaceIDPipeline
from faceid.settings import DEFAULT_NEGATIVE_PROMPT

SIZE = {"width": 48, "height": 32}
RUN = {**SIZE, "num_inference_steps": 2, "output_type": "np"}


@pytest.fixture(scope="module")
def pipe(tiny_models, both_packs, instantid_dir):
    return load_tiny_sdxl(tiny_models, both_packs, methods={"instantid": instantid_dir})


@pytest.fixture(scope="module")
def plain(tiny_models, both_packs):
    return load_tiny_sdxl(tiny_models, both_packs)


@pytest.fixture(scope="module")
def photo():
    return face_photo("obama.jpg")


@pytest.fixture(scope="module")
def instantid_run(pipe, photo):
    """An InstantID call at the defaults, seed 1 (shared: the machine is slow)."""
    return pipe("a photo", photo, method="instantid", seed=1, **RUN)


def _picture(seed, size=(48, 32)):
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


# ---------------------------------------------------------------------- one call
def test_an_instantid_call_gives_images_and_records_its_method_and_scales(pipe, photo, instantid_run):
    result = instantid_run
    assert result.images.shape == (1, 32, 48, 3) and np.isfinite(result.images).all()
    run = result.settings
    assert (run.method, run.scale, run.identitynet_scale) == ("instantid", 0.8, 0.8)  # the authors' app
    assert run.combine is None and run.lora_scale is None  # FaceID's knobs are not this call's
    assert run.to_json()["identitynet_scale"] == 0.8
    kps = make_control_image("kps", photo, size=(48, 32), analyzer=pipe.face_analyzer)
    np.testing.assert_array_equal(np.asarray(result.kps_image), np.asarray(kps))
    assert np.asarray(kps).any()
    # The FaceID adapter's defaults stay FaceID's.
    assert pipe.resolve_settings({}).scale == pipe.adapter.scale and pipe.resolve_settings({}).combine == "mean"


def _by_hand(pipe, photo, ip_scale=0.8, identitynet_scale=0.8, seed=1, others=(), other_images=(), scales=()):
    """The same call made by hand with InstantID's pieces on a stock diffusers ControlNet pipeline."""
    from diffusers import StableDiffusionXLControlNetPipeline

    instantid = pipe.loaded_method("instantid")
    face = pipe.face_analyzer.get(photo)
    tokens = instantid.identity_tokens(face.raw_embeddings["antelopev2"])
    context = tokens.batch(1, classifier_free_guidance=True)
    text = pipe.encode_prompt(["a photo"], [DEFAULT_NEGATIVE_PROMPT], 1)
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    components = {
        **pipe.pipe.components,
        "scheduler": type(pipe.pipe.scheduler).from_config(pipe.pipe.scheduler.config),
    }
    call = StableDiffusionXLControlNetPipeline(**components, controlnet=instantid.control(context, others))
    call.set_progress_bar_config(disable=True)
    kps = make_control_image("kps", photo, size=(SIZE["width"], SIZE["height"]), analyzer=pipe.face_analyzer)
    with pipe.weights.exclusive():  # FaceID's identity LoRA is off in an InstantID call
        pipe.adapter.put_lora_weight(0.0)
        try:
            return call(
                **dict(zip(names, text, strict=True)),
                image=[kps, *other_images],
                controlnet_conditioning_scale=[identitynet_scale, *scales],
                cross_attention_kwargs={"ip_hidden_states": [instantid.token_group(context, ip_scale)]},
                generator=torch.Generator("cpu").manual_seed(seed),
                guidance_scale=5.0,  # SDXL's default in faceid
                **RUN,
            ).images
        finally:
            pipe.adapter.put_lora_weight(pipe.adapter.lora_weight())


def test_the_call_equals_the_pieces_by_hand(pipe, photo):
    ours = pipe("a photo", photo, method="instantid", seed=1, scale=0.6, identitynet_scale=0.9, **RUN).images
    np.testing.assert_allclose(ours, _by_hand(pipe, photo, 0.6, 0.9), atol=1e-6, rtol=0)
    # ... and not the pieces at other scales: the wiring passes these ones.
    assert np.abs(ours - _by_hand(pipe, photo, 0.6, 0.3)).max() > 1e-4
    assert np.abs(ours - _by_hand(pipe, photo, 0.1, 0.9)).max() > 1e-4


def test_each_scale_changes_the_image(pipe, photo, instantid_run):
    def run(**scales):
        return pipe("a photo", photo, method="instantid", seed=1, **scales, **RUN).images

    base = instantid_run.images
    assert np.abs(run(identitynet_scale=0.0) - base).max() > 1e-4
    assert np.abs(run(scale=0.0) - base).max() > 1e-4


def test_faceid_calls_are_unchanged_by_instantid_being_loaded(pipe, plain, photo, instantid_run):
    with_it = pipe("a photo", photo, seed=3, **RUN).images
    np.testing.assert_array_equal(with_it, plain("a photo", photo, seed=3, **RUN).images)
    # FaceID's branch adds nothing to an InstantID call: its tokens are not in it (another scale, same image).
    pipe.adapter.set_scale(0.3)
    try:
        again = pipe("a photo", photo, method="instantid", seed=1, **RUN).images
    finally:
        pipe.adapter.set_scale(1.0)
    np.testing.assert_array_equal(again, instantid_run.images)


def test_a_faceid_and_an_instantid_call_from_two_threads_equal_each_alone(pipe, photo):
    calls = {
        "faceid": lambda: pipe("a photo", photo, seed=4, **RUN).images,
        "instantid": lambda: pipe("a photo", photo, method="instantid", scale=0.5, seed=4, **RUN).images,
    }
    alone = {name: call() for name, call in calls.items()}
    together: dict[str, np.ndarray] = {}
    threads = [threading.Thread(target=lambda n=n, c=c: together.__setitem__(n, c())) for n, c in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in calls:
        np.testing.assert_array_equal(together[name], alone[name])
    assert np.abs(alone["faceid"] - alone["instantid"]).max() > 1e-4


# ---------------------------------------------------------------------- with the other modes
def test_img2img_with_instantid(pipe, photo):
    init = _picture(1, (56, 40))
    run = {"num_inference_steps": 2, "output_type": "np"}  # the size: the init image's
    result = pipe("a photo", photo, method="instantid", init_image=init, strength=0.5, seed=1, **run)
    assert result.images.shape == (1, 40, 56, 3)  # the init image's size
    assert result.kps_image.size == (56, 40)
    assert "StableDiffusionXLControlNetImg2ImgPipeline" in pipe._siblings
    lower = pipe("a photo", photo, method="instantid", init_image=init, strength=0.5, seed=1, identitynet_scale=0.0,
                 **run)  # fmt: skip
    assert np.abs(result.images - lower.images).max() > 1e-4  # IdentityNet acts in img2img too


def test_a_user_controlnet_beside_identitynet(pipe, tiny_models, photo, instantid_run):
    canny = make_controlnet(tiny_models.sdxl, 7)
    edges = _picture(3, (48, 32))

    def run(scale):
        control = ControlInput(edges, canny, scale)
        return pipe("a photo", photo, method="instantid", seed=1, control=control, **RUN)

    alone = instantid_run.images
    both = run(0.7)
    assert np.abs(both.images - alone).max() > 1e-4
    assert len(both.control_images) == 1 and both.kps_image is not None
    by_hand = _by_hand(pipe, photo, others=[canny], other_images=[edges], scales=[0.7])
    np.testing.assert_allclose(both.images, by_hand, atol=1e-6, rtol=0)


def test_keypoints_from_a_photo_of_ones_own(pipe, photo, instantid_run):
    other = face_photo("biden.jpg")
    own = pipe("a photo", photo, method="instantid", seed=1, kps=other, **RUN)
    expected = make_control_image("kps", other, size=(48, 32), analyzer=pipe.face_analyzer)
    np.testing.assert_array_equal(np.asarray(own.kps_image), np.asarray(expected))
    assert np.abs(np.asarray(own.kps_image, float) - np.asarray(instantid_run.kps_image, float)).max() > 0
    assert np.abs(own.images - instantid_run.images).max() > 1e-4  # IdentityNet follows the keypoints


def test_several_photos_of_one_person_are_one_identity(pipe, photo):
    second = face_photo("obama2.jpg")
    cond = pipe.encode("a photo", [[photo, second]], method="instantid")
    instantid = pipe.loaded_method("instantid")
    faces = [pipe.face_analyzer.get(p).raw_embeddings["antelopev2"] for p in (photo, second)]
    torch.testing.assert_close(cond.identity, instantid.identity_tokens(np.stack(faces)).cond, rtol=0, atol=0)
    assert cond.method == "instantid" and cond.identity.shape[0] == 1
    images = pipe(conditioning=cond, seed=1, **RUN).images  # the conditioning's method is the call's
    assert images.shape == (1, 32, 48, 3)


# ---------------------------------------------------------------------- refusals
def test_refusals_name_what_to_do(pipe, plain, tiny_models, instantid_dir, photo, tmp_path, monkeypatch):
    with pytest.raises(FaceIDError, match=r"method instantid \(InstantID\) is not loaded.*load_method\('instantid'"):
        plain("a photo", photo, method="instantid", **RUN)
    with pytest.raises(FaceIDError, match="identitynet_scale is InstantID's"):
        pipe("a photo", photo, identitynet_scale=0.5, **RUN)
    with pytest.raises(FaceIDError, match="combine, lora_scale belong.*FaceID's adapter"):
        pipe("a photo", photo, method="instantid", combine="mean", lora_scale=0.5, **RUN)
    with pytest.raises(FaceIDError, match="several people in one picture"):
        pipe.encode("a photo", [photo, photo], method="instantid", regions="auto")
    with pytest.raises(FaceIDError, match="InstantID draws IdentityNet's keypoints from the face photo"):
        pipe("a photo", np.ones(512, np.float32), method="instantid", **RUN)
    with pytest.raises(FaceIDError, match="method instantid is loaded already"):
        pipe.load_method("instantid", instantid_dir)
    # Without a folder: the released files at their pinned commit (offline and not cached: said so).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match=r"could not get ip-adapter.bin at commit 57b32dfee076.*InstantID"):
        plain.load_method("instantid")
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="has no ip-adapter.bin and no ControlNetModel/.*InstantX/InstantID"):
        plain.load_method("instantid", tmp_path / "half")
    sd15 = FaceIDPipeline.from_pretrained(tiny_models.sd15, tiny_models.adapter("faceid"), device="cpu", progress=False)
    with pytest.raises(FaceIDError, match=r"method instantid \(InstantID\) runs on SDXL base models.*is SD1.5"):
        sd15.load_method("instantid", instantid_dir)
    buffalo_only = make_test_face_models_dir(tmp_path / "buffalo", pack="buffalo_l")
    with pytest.raises(MissingWeightsError) as info:
        plain.load_method("instantid", instantid_dir, face_models=buffalo_only)
    message = str(info.value)
    assert "method instantid needs insightface's antelopev2 face models" in message
    assert "glintr100.onnx" in message and "antelopev2.zip" in message
    assert "instantid" not in plain.methods  # nothing half-loaded
    assert not any("instantid" in getattr(p, "branches", {}) for p in plain.pipe.unet.attn_processors.values())


def test_remove_method_puts_faceid_back_as_it_was(tiny_models, both_packs, instantid_dir, plain, photo):
    pipe = load_tiny_sdxl(tiny_models, both_packs)
    pipe.load_method("instantid", instantid_dir)
    pipe.remove_method("instantid")
    np.testing.assert_array_equal(
        pipe("a photo", photo, seed=5, **RUN).images, plain("a photo", photo, seed=5, **RUN).images
    )
    with pytest.raises(FaceIDError, match="is not loaded"):
        pipe("a photo", photo, method="instantid", **RUN)


# ---------------------------------------------------------------------- the CLI
def test_cli_img2img_and_a_canny_controlnet_with_instantid(tmp_path, tiny_models, both_packs, instantid_dir, capsys,
                                                          monkeypatch):  # fmt: skip
    canny = tmp_path / "canny"
    make_controlnet(tiny_models.sdxl, 7).save_pretrained(canny)
    init = tmp_path / "init.png"
    _picture(1, (48, 32)).save(init)
    out = tmp_path / "out"
    argv = ["generate", "--face", str(face_photo("obama.jpg")), "--prompt", "a photo", "--out", str(out),
            "--base-model", str(tiny_models.sdxl), "--adapter", str(tiny_models.adapter("faceid-sdxl")),
            "--face-models", str(both_packs), "--steps", "2", "-n", "1", "--seed", "3",
            "--method", "instantid", "--method-weights", f"instantid={instantid_dir}", "--identitynet-scale", "0.6",
            "--init-image", str(init), "--strength", "0.5",
            "--controlnet", str(canny), "--control", f"canny:{face_photo('biden.jpg')}:0.5"]  # fmt: skip
    assert main(argv) == 0
    stored = read_settings(out / "obama_s3.png")
    assert (stored["method"], stored["identitynet_scale"], stored["scale"]) == ("instantid", 0.6, 0.8)
    with Image.open(out / "obama_s3-kps.png") as kps:
        assert kps.size == (48, 32) and np.asarray(kps).any()
    assert (out / "obama_s3-control0.png").is_file()
    capsys.readouterr()
    # --method instantid without a folder: its released files at their pins (offline and not cached: said so).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv[: argv.index("--method-weights")] + ["--steps", "1"]) == 2
    assert "could not get ip-adapter.bin at commit 57b32dfee076" in capsys.readouterr().err
    bad = [a if a != f"instantid={instantid_dir}" else "instantid=" for a in argv]
    assert main(bad) == 2
    assert "--method-weights NAME=FOLDER" in capsys.readouterr().err


def test_the_method_table_says_instantid_generates():
    from faceid.methods import METHODS

    assert METHODS["instantid"].wired and METHODS["instantid"].defaults == {"scale": 0.8, "identitynet_scale": 0.8}
