"""PuLID v1.1 through faceid's Python API and CLI (``method="pulid"``), on the tests' tiny SDXL with a tiny PuLID
folder in the released layout (``tiny_models.build_pulid``: ``pulid_v1.1.safetensors``, the EVA-CLIP ``.pt``,
``parsing_bisenet.pth``) and stand-in face models of both insightface packs.

Checked: a call gives images and records its method and scale (the authors' 0.8); its identity tokens are those of
the pieces by hand (the face encoder on the photo and its analysed face, then the ID encoder), and its images equal
a stock diffusers SDXL pipeline whose UNet has PuLID's processors set directly (the golden-tested path) with
``PuLIDTokens`` at the authors' num_zero/ortho, so the wiring passes the right tokens, scale and flags; the scale
and the identity window change the image; FaceID calls are bit for bit those of a pipeline without PuLID; a FaceID
and a PuLID call from two threads equal each alone; img2img; a user ControlNet; several photos of one person; the
CLI end to end; the refusals.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from conftest import load_tiny_sdxl
from face_helpers import face_photo, make_test_face_models_dir
from PIL import Image
from tiny_models import make_controlnet

from faceid.cli import main
from faceid.errors import CheckpointError, FaceIDError, MissingWeightsError
from faceid.methods.pulid import V11_NUM_ZERO, V11_ORTHO, PuLIDTokens
from faceid.modes import ControlInput
from faceid.outputs import read_settings
from faceid.pipeline import FaceIDPipeline
from faceid.settings import DEFAULT_NEGATIVE_PROMPT

SIZE = {"width": 48, "height": 32}
RUN = {**SIZE, "num_inference_steps": 2, "output_type": "np"}


@pytest.fixture(scope="module")
def pipe(tiny_models, both_packs, pulid_dir):
    return load_tiny_sdxl(tiny_models, both_packs, methods={"pulid": pulid_dir})


@pytest.fixture(scope="module")
def plain(tiny_models, both_packs):
    return load_tiny_sdxl(tiny_models, both_packs)


@pytest.fixture(scope="module")
def photo():
    return face_photo("obama.jpg")


@pytest.fixture(scope="module")
def pulid_run(pipe, photo):
    """A PuLID call at the defaults, seed 1 (shared: the machine is slow)."""
    return pipe("a photo", photo, method="pulid", seed=1, **RUN)


def _picture(seed, size=(48, 32)):
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _tokens_by_hand(pipe, photos):
    pulid = pipe.loaded_method("pulid")
    faces = [pulid.face_encoder(pipe.face_analyzer.get(p)) for p in photos]
    return pulid.adapter.encode(faces)


@pytest.fixture(scope="module")
def by_hand(pipe, photo):
    """The same call as ``pipe("a photo", photo, method="pulid", seed=1, scale=...)`` on a stock diffusers SDXL
    pipeline whose UNet (a copy, FaceID's identity LoRA off as in a PuLID call) has PuLID's processors set
    directly, with ``PuLIDTokens`` at the authors' flags (or ``num_zero``/``ortho``); ``identity=False``: without
    them. Memoised."""
    from diffusers import StableDiffusionXLPipeline

    pulid = pipe.loaded_method("pulid")
    cond, uncond = _tokens_by_hand(pipe, [photo])
    with pipe.weights.exclusive():
        pipe.adapter.put_lora_weight(0.0)
        try:
            unet = copy.deepcopy(pipe.pipe.unet)
        finally:
            pipe.adapter.put_lora_weight(pipe.adapter.lora_weight())
    pulid.adapter.install(unet)
    text = pipe.encode_prompt(["a photo"], [DEFAULT_NEGATIVE_PROMPT], 1)
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    made: dict = {}

    def run(scale=0.8, identity=True, num_zero=V11_NUM_ZERO, ortho=V11_ORTHO):
        if (scale, identity, num_zero, ortho) not in made:
            components = {
                **pipe.pipe.components,
                "unet": unet,
                "scheduler": type(pipe.pipe.scheduler).from_config(pipe.pipe.scheduler.config),
            }
            call = StableDiffusionXLPipeline(**components)
            call.set_progress_bar_config(disable=True)
            tokens = PuLIDTokens(torch.cat([uncond, cond]), scale, num_zero, ortho)
            made[scale, identity, num_zero, ortho] = call(
                **dict(zip(names, text, strict=True)),
                cross_attention_kwargs={"ip_hidden_states": tokens} if identity else None,
                generator=torch.Generator("cpu").manual_seed(1),
                guidance_scale=5.0,  # SDXL's default in faceid
                **RUN,
            ).images
        return made[scale, identity, num_zero, ortho]

    return run


# ---------------------------------------------------------------------- one call
def test_a_pulid_call_gives_images_and_records_its_method_and_scale(pipe, pulid_run):
    result = pulid_run
    assert result.images.shape == (1, 32, 48, 3) and np.isfinite(result.images).all()
    run = result.settings
    assert (run.method, run.scale) == ("pulid", 0.8)  # the authors' app
    assert run.combine is None and run.lora_scale is None and run.identitynet_scale is None
    assert pipe.resolve_settings({}).scale == pipe.adapter.scale  # FaceID's defaults stay FaceID's


def test_the_tokens_and_the_call_equal_the_pieces_by_hand(pipe, photo, pulid_run, by_hand):
    cond = pipe.encode("a photo", photo, method="pulid")
    tokens, uncond = _tokens_by_hand(pipe, [photo])
    torch.testing.assert_close(cond.identity, tokens, rtol=0, atol=0)
    torch.testing.assert_close(cond.uncond_identity, uncond, rtol=0, atol=0)
    assert cond.method == "pulid" and cond.identity.shape == (1, 8, pipe.pipe.unet.config.cross_attention_dim)
    ours = pipe("a photo", photo, method="pulid", seed=1, scale=0.6, **RUN).images
    np.testing.assert_allclose(ours, by_hand(0.6), atol=1e-6, rtol=0)
    # ... and not the pieces at another scale, nor without the identity: the wiring passes these.
    assert np.abs(ours - by_hand(0.8)).max() > 1e-4
    np.testing.assert_allclose(pulid_run.images, by_hand(0.8), atol=1e-6, rtol=0)
    assert np.abs(pulid_run.images - by_hand(identity=False)).max() > 1e-4


def test_num_zero_and_ortho_travel_with_the_call(pipe, photo, pulid_run, by_hand):
    """pulid_num_zero / pulid_ortho: each changes the image, and a call equals the stock pipeline given
    ``PuLIDTokens`` with those values (num_zero 0 and ortho off: the plain additive branch, the module defaults;
    16 and v1: the authors' v1 "extremely style"); the defaults are the authors' app's (20, v2) and are recorded."""
    assert (
        (pulid_run.settings.pulid_num_zero, pulid_run.settings.pulid_ortho) == (V11_NUM_ZERO, V11_ORTHO) == (20, "v2")
    )
    for num_zero, ortho in ((0, "off"), (16, "v1"), (20, "off")):
        result = pipe("a photo", photo, method="pulid", seed=1, pulid_num_zero=num_zero, pulid_ortho=ortho, **RUN)
        assert (result.settings.pulid_num_zero, result.settings.pulid_ortho) == (num_zero, ortho)
        np.testing.assert_allclose(result.images, by_hand(num_zero=num_zero, ortho=ortho), atol=1e-6, rtol=0)
        assert np.abs(result.images - pulid_run.images).max() > 1e-4, (num_zero, ortho)
    fewer = pipe("a photo", photo, method="pulid", seed=1, pulid_num_zero=0, **RUN).images  # ortho: the default
    np.testing.assert_allclose(fewer, by_hand(num_zero=0), atol=1e-6, rtol=0)
    assert np.abs(fewer - pulid_run.images).max() > 1e-4


def test_pulid_options_are_refused_with_other_methods(pipe, photo):
    with pytest.raises(FaceIDError, match=r"pulid_num_zero belong\(s\) to PuLID v1.1 \(SDXL\), not faceid"):
        pipe("a photo", photo, pulid_num_zero=8, **RUN)
    with pytest.raises(FaceIDError, match=r"pulid_num_zero and pulid_ortho belong\(s\) to PuLID v1.1"):
        pipe("a photo", photo, pulid_num_zero=8, pulid_ortho="v1", **RUN)
    with pytest.raises(FaceIDError, match="true_cfg_start is PuLID-FLUX's true CFG start step, not pulid's"):
        pipe("a photo", photo, method="pulid", true_cfg_start=2, **RUN)
    with pytest.raises(FaceIDError, match=r"pulid_ortho: Input should be 'off', 'v1' or 'v2'"):
        pipe("a photo", photo, method="pulid", pulid_ortho="v3", **RUN)
    with pytest.raises(FaceIDError, match="pulid_num_zero: Input should be greater than or equal to 0"):
        pipe("a photo", photo, method="pulid", pulid_num_zero=-1, **RUN)


def test_the_identity_window_shuts_pulid_outside_it(pipe, photo, pulid_run, by_hand):
    late = pipe("a photo", photo, method="pulid", seed=1, identity_window=(0.5, 1.0), **RUN).images
    none = pipe("a photo", photo, method="pulid", seed=1, identity_window=(0.0, 0.0), **RUN).images
    assert np.abs(late - pulid_run.images).max() > 1e-4
    np.testing.assert_allclose(none, by_hand(identity=False), atol=1e-6, rtol=0)


def test_faceid_calls_are_unchanged_by_pulid_being_loaded(pipe, plain, photo, pulid_run):
    with_it = pipe("a photo", photo, seed=3, **RUN).images
    np.testing.assert_array_equal(with_it, plain("a photo", photo, seed=3, **RUN).images)
    # FaceID's branch adds nothing to a PuLID call (another FaceID scale, the same image).
    pipe.adapter.set_scale(0.3)
    try:
        again = pipe("a photo", photo, method="pulid", seed=1, **RUN).images
    finally:
        pipe.adapter.set_scale(1.0)
    np.testing.assert_array_equal(again, pulid_run.images)


def test_a_faceid_and_a_pulid_call_from_two_threads_equal_each_alone(pipe, photo):
    calls = {
        "faceid": lambda: pipe("a photo", photo, seed=4, **RUN).images,
        "pulid": lambda: pipe("a photo", photo, method="pulid", scale=0.5, seed=4, **RUN).images,
        "pulid-late": lambda: pipe("a photo", photo, method="pulid", identity_window=(0.5, 1), seed=4, **RUN).images,
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
    assert np.abs(alone["faceid"] - alone["pulid"]).max() > 1e-4


# ---------------------------------------------------------------------- with the other modes
def test_img2img_with_pulid(pipe, photo):
    init = _picture(1, (56, 40))
    run = {"num_inference_steps": 2, "output_type": "np"}  # the size: the init image's
    result = pipe("a photo", photo, method="pulid", init_image=init, strength=0.5, seed=1, **run)
    assert result.images.shape == (1, 40, 56, 3)
    weaker = pipe("a photo", photo, method="pulid", init_image=init, strength=0.5, seed=1, scale=0.1, **run)
    assert np.abs(result.images - weaker.images).max() > 1e-4  # the identity acts in img2img too


def test_a_user_controlnet_with_pulid(pipe, tiny_models, photo, pulid_run):
    canny = make_controlnet(tiny_models.sdxl, 7)
    control = ControlInput(_picture(3, (48, 32)), canny, 0.7)
    both = pipe("a photo", photo, method="pulid", seed=1, control=control, **RUN)
    assert np.abs(both.images - pulid_run.images).max() > 1e-4 and len(both.control_images) == 1
    weaker = pipe("a photo", photo, method="pulid", seed=1, scale=0.1, control=control, **RUN)
    assert np.abs(both.images - weaker.images).max() > 1e-4  # PuLID acts beside the ControlNet


def test_several_photos_of_one_person_are_one_identity(pipe, photo):
    second = face_photo("obama2.jpg")
    cond = pipe.encode("a photo", [[photo, second]], method="pulid")
    tokens, _ = _tokens_by_hand(pipe, [photo, second])
    torch.testing.assert_close(cond.identity, tokens, rtol=0, atol=0)
    assert cond.identity.shape[0] == 1
    assert np.abs(cond.identity - _tokens_by_hand(pipe, [photo])[0]).max() > 1e-6
    assert pipe(conditioning=cond, seed=1, **RUN).images.shape == (1, 32, 48, 3)


# ---------------------------------------------------------------------- refusals
def test_refusals_name_what_to_do(pipe, plain, tiny_models, pulid_dir, photo, tmp_path, monkeypatch):
    with pytest.raises(FaceIDError, match=r"method pulid \(PuLID v1.1\) is not loaded.*load_method\('pulid'"):
        plain("a photo", photo, method="pulid", **RUN)
    with pytest.raises(FaceIDError, match="PuLID reads the face photo itself"):
        pipe("a photo", np.ones(512, np.float32), method="pulid", **RUN)
    with pytest.raises(FaceIDError, match=r"PuLID reads the face aligned at 512 \(Face.crop_ffhq\).*give the photo"):
        pipe("a photo", plain.face_analyzer.get(photo), method="pulid", **RUN)  # analysed without antelopev2
    with pytest.raises(FaceIDError, match="style references run beside FaceID and InstantID, not PuLID"):
        pipe("a photo", photo, method="pulid", style=[photo], **RUN)
    with pytest.raises(FaceIDError, match=r"combine belong\(s\) to FaceID's adapter"):
        pipe("a photo", photo, method="pulid", combine="mean", **RUN)
    with pytest.raises(FaceIDError, match="method pulid is loaded already"):
        pipe.load_method("pulid", pulid_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # without a folder: the pinned files (offline and not cached: said)
    with pytest.raises(MissingWeightsError, match=r"could not get pulid_v1.1.safetensors at commit d58b3ba191be"):
        plain.load_method("pulid")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "pulid_v1.1.safetensors").write_bytes((pulid_dir / "pulid_v1.1.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"no EVA02_CLIP_L_336_psz14_s6B.pt and no parsing_bisenet.pth.*"
                       r"QuanSun/EVA-CLIP.*facexlib/releases"):  # fmt: skip
        plain.load_method("pulid", tmp_path / "half")
    sd15 = FaceIDPipeline.from_pretrained(tiny_models.sd15, tiny_models.adapter("faceid"), device="cpu", progress=False)
    with pytest.raises(FaceIDError, match=r"method pulid \(PuLID v1.1\) runs on SDXL base models.*is SD1.5"):
        sd15.load_method("pulid", pulid_dir)
    buffalo_only = make_test_face_models_dir(tmp_path / "buffalo", pack="buffalo_l")
    with pytest.raises(MissingWeightsError) as info:
        plain.load_method("pulid", pulid_dir, face_models=buffalo_only)
    assert "method pulid needs insightface's antelopev2 face models" in str(info.value)
    assert "pulid" not in plain.methods  # nothing half-loaded


def test_a_file_with_a_key_missing_is_refused_naming_it(plain, pulid_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("EVA02_CLIP_L_336_psz14_s6B.pt", "parsing_bisenet.pth"):
        (broken / name).symlink_to(pulid_dir / name)
    state = load_file(str(pulid_dir / "pulid_v1.1.safetensors"))
    state["id_adapter.renamed"] = state.pop("id_adapter.proj_out")
    save_file(state, str(broken / "pulid_v1.1.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks the key 'proj_out'|missing key\(s\) 'id_adapter.proj_out'"):
        plain.load_method("pulid", broken)
    assert "pulid" not in plain.methods


def test_remove_method_leaves_faceid_as_it_was(tiny_models, both_packs, pulid_dir, plain, photo):
    pipe = load_tiny_sdxl(tiny_models, both_packs)
    pipe.load_method("pulid", pulid_dir)
    pipe.remove_method("pulid")
    np.testing.assert_array_equal(
        pipe("a photo", photo, seed=5, **RUN).images, plain("a photo", photo, seed=5, **RUN).images
    )
    with pytest.raises(FaceIDError, match="is not loaded"):
        pipe("a photo", photo, method="pulid", **RUN)


# ---------------------------------------------------------------------- the CLI
def test_cli_img2img_and_a_canny_controlnet_with_pulid(tmp_path, tiny_models, both_packs, pulid_dir, capsys,
                                                       monkeypatch):  # fmt: skip
    canny = tmp_path / "canny"
    make_controlnet(tiny_models.sdxl, 7).save_pretrained(canny)
    init = tmp_path / "init.png"
    _picture(1, (48, 32)).save(init)
    out = tmp_path / "out"
    argv = ["generate", "--face", str(face_photo("obama.jpg")), "--prompt", "a photo", "--out", str(out),
            "--base-model", str(tiny_models.sdxl), "--adapter", str(tiny_models.adapter("faceid-sdxl")),
            "--face-models", str(both_packs), "--steps", "2", "-n", "1", "--seed", "3",
            "--method", "pulid", "--method-weights", f"pulid={pulid_dir}", "--scale", "0.7",
            "--init-image", str(init), "--strength", "0.5",
            "--controlnet", str(canny), "--control", f"canny:{face_photo('biden.jpg')}:0.5"]  # fmt: skip
    assert main(argv) == 0
    stored = read_settings(out / "obama_s3.png")
    assert (stored["method"], stored["scale"]) == ("pulid", 0.7)
    assert (out / "obama_s3-control0.png").is_file()
    capsys.readouterr()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # without a folder: the pinned files (offline and not cached: said)
    assert main(argv[: argv.index("--method-weights")] + ["--steps", "1"]) == 2
    assert "could not get pulid_v1.1.safetensors at commit d58b3ba191be" in capsys.readouterr().err


def test_the_method_table_says_pulid_generates():
    from faceid.methods import METHODS

    assert METHODS["pulid"].wired and METHODS["pulid"].defaults == {
        "scale": 0.8,
        "pulid_num_zero": 20,
        "pulid_ortho": "v2",
    }
    assert METHODS["pulid-flux"].wired and METHODS["pulid-flux"].defaults == {"scale": 1.0, "true_cfg_start": 1}


def test_the_options_flags_parse():
    """--pulid-num-zero, --pulid-ortho (its choices: the processor's modes) and --true-cfg-start."""
    import typing

    from faceid.cli.flags import settings_from_args
    from faceid.cli.main import build_parser
    from faceid.methods.pulid import ORTHO_MODES
    from faceid.settings import GenerationSettings

    assert typing.get_args(typing.get_args(GenerationSettings.model_fields["pulid_ortho"].annotation)[0]) == ORTHO_MODES
    argv = [
        "generate",
        "--face",
        "me.jpg",
        "--out",
        "o",
        "--pulid-num-zero",
        "8",
        "--pulid-ortho",
        "v1",
        "--true-cfg-start",
        "2",
    ]
    settings = settings_from_args(build_parser().parse_args(argv))
    assert (settings.pulid_num_zero, settings.pulid_ortho, settings.true_cfg_start) == (8, "v1", 2)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv[:5], "--pulid-ortho", "v3"])


def test_an_eval_over_several_methods_gives_the_pulid_options_to_pulid_alone():
    from faceid.evaluation.methods import EvalMethod, settings_for_method
    from faceid.settings import GenerationSettings

    shared = GenerationSettings.parse({"num_inference_steps": 3, "pulid_num_zero": 8, "pulid_ortho": "v1"})
    faceid = settings_for_method(shared, EvalMethod("faceid", "faceid"))
    pulid = settings_for_method(shared, EvalMethod("pulid", "pulid"))
    assert (faceid.pulid_num_zero, faceid.pulid_ortho, faceid.num_inference_steps) == (None, None, 3)
    assert (pulid.method, pulid.pulid_num_zero, pulid.pulid_ortho) == ("pulid", 8, "v1")
