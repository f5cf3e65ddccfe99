"""img2img, inpainting and ControlNet (``faceid.modes``): the same FaceID call on diffusers' other pipelines,
with tiny random models built here (ControlNets from the tiny UNets, their zero convolutions randomised so that
they act)."""

from __future__ import annotations

import gc
import hashlib
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import FEW_STEP_LAYOUTS, acting_loras, few_step_lora_state, make_controlnet, make_tiny_autoencoder

from faceid.cli import main
from faceid.errors import FaceIDError
from faceid.modes import ControlInput
from faceid.outputs import read_settings
from faceid.pipeline import FaceIDPipeline

SIZE = {"width": 24, "height": 16}
RUN = {**SIZE, "num_inference_steps": 3, "output_type": "np"}
ADAPTERS = {"sd15": "faceid", "sdxl": "faceid-sdxl"}
MODES = ["img2img", "inpaint", "controlnet", "controlnet-img2img", "controlnet-inpaint"]


def _face(n=1, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _picture(seed, size=(24, 16)):
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _mask(size=(24, 16)):
    """White (redraw) on the right half."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[:, size[0] // 2 :] = 255
    return Image.fromarray(mask)


def _load(tiny_models, analyzer, family, **kwargs):
    pipe = FaceIDPipeline.from_pretrained(
        getattr(tiny_models, family),
        tiny_models.adapter(ADAPTERS[family]),
        device="cpu",
        progress=False,
        face_analyzer=analyzer,
        **kwargs,
    )
    # A VAE sure of its encoding (posterior variance ~0): the init image's latents are its mean, so that what
    # img2img keeps of them can be measured against them.
    with torch.no_grad():
        pipe.pipe.vae.quant_conv.weight[4:] = 0
        pipe.pipe.vae.quant_conv.bias[4:] = -30
    return pipe


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    return make_tiny_autoencoder(tmp_path_factory.mktemp("tiny-vae"))


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family_pipe(request, tiny_models, analyzer):
    """A pipeline of each family, with two ControlNets of its own."""
    pipe = _load(tiny_models, analyzer, request.param)
    folder = getattr(tiny_models, request.param)
    pipe.test_controlnets = [make_controlnet(folder, 1), make_controlnet(folder, 2)]
    return pipe


@pytest.fixture(scope="module")
def sd15_pipe(tiny_models, analyzer, tiny_vae_dir):
    pipe = _load(tiny_models, analyzer, "sd15", tiny_vae=tiny_vae_dir)
    pipe.test_controlnets = [make_controlnet(tiny_models.sd15, 1), make_controlnet(tiny_models.sd15, 2)]
    return pipe


def _inputs(pipe, mode, scale=1.0):
    """The call arguments of ``mode``."""
    kwargs = {}
    if "img2img" in mode or "inpaint" in mode:
        kwargs["init_image"] = _picture(1)
        kwargs["strength"] = 0.7
    if "inpaint" in mode:
        kwargs["mask_image"] = _mask()
    if "controlnet" in mode:
        kwargs["control"] = ControlInput(_picture(2), pipe.test_controlnets[0], scale)
    return kwargs


# ---------------------------------------------------------------------- ControlNet
def test_controlnet_at_scale_zero_is_text_to_image_bit_for_bit(family_pipe):
    pipe, face = family_pipe, _face()
    plain = pipe("a photo", face, seed=3, **RUN).images
    control = ControlInput(_picture(2), pipe.test_controlnets[0], 0.0)
    zero = pipe("a photo", face, seed=3, control=control, **RUN)
    # diffusers scales the residuals by 0 and adds them to the UNet's skip features: x + 0 is x.
    np.testing.assert_array_equal(zero.images, plain)
    assert type(pipe.pipeline_for(f"{'StableDiffusionXL' if pipe.family == 'SDXL' else 'StableDiffusion'}"
                                  "ControlNetPipeline")).__name__.endswith("ControlNetPipeline")  # fmt: skip
    acting = pipe("a photo", face, seed=3, control=ControlInput(_picture(2), pipe.test_controlnets[0], 1.0), **RUN)
    assert np.abs(acting.images - plain).max() > 1e-3
    assert acting.control_images[0].size == (24, 16)


def test_several_controlnets_at_once(family_pipe):
    pipe, face = family_pipe, _face()
    a, b = pipe.test_controlnets
    pose, depth = _picture(2), _picture(3)

    def run(*controls):
        return pipe("a photo", face, seed=3, control=list(controls), **RUN).images

    both = run(ControlInput(pose, a, 0.5), ControlInput(depth, b, 1.0))
    first = run(ControlInput(pose, a, 0.5))
    second = run(ControlInput(depth, b, 1.0))
    assert np.abs(both - first).max() > 1e-3 and np.abs(both - second).max() > 1e-3
    np.testing.assert_array_equal(run(ControlInput(pose, a, 0.0), ControlInput(depth, b, 0.0)), run())
    # Each ControlNet's step window: outside it, it adds nothing.
    late = run(ControlInput(pose, a, 0.5, window=(0.0, 0.4)), ControlInput(depth, b, 1.0, window=(0.9, 1.0)))
    assert np.abs(late - both).max() > 1e-3


def test_a_controlnet_of_the_other_family_is_refused(sd15_pipe, tiny_models, tmp_path):
    sdxl_controlnet = make_controlnet(tiny_models.sdxl, 1)
    sdxl_controlnet.save_pretrained(tmp_path / "sdxl-controlnet")
    with pytest.raises(
        FaceIDError, match=r"cross-attention width 128 .* UNet has 64: use a ControlNet made for SD1\.5"
    ):
        sd15_pipe.load_controlnet(tmp_path / "sdxl-controlnet")
    with pytest.raises(FaceIDError, match="cross-attention width 128"):
        sd15_pipe("a photo", _face(), control=ControlInput(_picture(2), sdxl_controlnet), **RUN)
    with pytest.raises(FaceIDError, match="not a diffusers ControlNetModel"):
        sd15_pipe("a photo", _face(), control=ControlInput(_picture(2), sd15_pipe.pipe.unet), **RUN)
    # One of this family loads, in the pipeline's dtype and on its device, and acts.
    sd15_pipe.test_controlnets[0].save_pretrained(tmp_path / "sd15-controlnet")
    loaded = sd15_pipe.load_controlnet(tmp_path / "sd15-controlnet")
    assert loaded.dtype == sd15_pipe.pipe.unet.dtype and not loaded.training
    again = sd15_pipe("a photo", _face(), seed=1, control=ControlInput(_picture(2), loaded), **RUN).images
    given = sd15_pipe(
        "a photo", _face(), seed=1, control=ControlInput(_picture(2), sd15_pipe.test_controlnets[0]), **RUN
    )
    np.testing.assert_array_equal(again, given.images)


def test_a_controlnet_folder_loads_strictly(sd15_pipe, tmp_path):
    """diffusers alone fills a missing tensor with random values and skips an extra one (a log line only): a
    ControlNet folder whose weights miss a key, have one too many or one of another shape is refused, naming it."""
    from safetensors.torch import load_file, save_file

    from faceid.errors import CheckpointError

    whole = tmp_path / "whole"
    sd15_pipe.test_controlnets[0].save_pretrained(whole, safe_serialization=True)
    tensors = load_file(str(whole / "diffusion_pytorch_model.safetensors"))
    key = sorted(tensors)[len(tensors) // 2]

    def folder_with(name, changed):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((whole / "config.json").read_text())
        save_file(changed, str(folder / "diffusion_pytorch_model.safetensors"))
        return folder

    missing = folder_with("missing", {k: v for k, v in tensors.items() if k != key})
    with pytest.raises(
        CheckpointError, match=rf"ControlNet .*missing.* does not match its config: missing keys '{key}'"
    ):
        sd15_pipe.load_controlnet(missing)
    extra = folder_with("extra", {**tensors, "controlnet_extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected keys 'controlnet_extra.weight'"):
        sd15_pipe.load_controlnet(extra)
    other_shape = folder_with("shape", {**tensors, key: torch.zeros(*tensors[key].shape, 2)})
    with pytest.raises(CheckpointError, match=rf"cannot load the ControlNet .*shape .*{key}"):
        sd15_pipe.load_controlnet(other_shape)
    assert sd15_pipe.load_controlnet(folder_with("same", tensors)) is not None  # the same tensors load


def test_identity_window_and_identity_guidance_in_controlnet_mode(sd15_pipe):
    pipe, face = sd15_pipe, _face()
    control = ControlInput(_picture(2), pipe.test_controlnets[0], 1.0)
    full = pipe("a photo", face, seed=4, control=control, **RUN).images
    empty = pipe("a photo", face, seed=4, control=control, identity_window=(0.5, 0.5), **RUN).images
    pipe.adapter.set_active(False)
    try:
        off = pipe("a photo", face, seed=4, control=control, **RUN).images
    finally:
        pipe.adapter.set_active(True)
    np.testing.assert_array_equal(empty, off)  # an empty window is the adapter off, bit for bit
    early = pipe("a photo", face, seed=4, control=control, identity_window=(0.0, 0.5), **RUN).images
    assert np.abs(early - full).max() > 1e-5 and np.abs(early - off).max() > 1e-5
    # Identity guidance adds a batch entry per image: the ControlNet's residuals follow it.
    guided = pipe("a photo", face, seed=4, control=control, identity_guidance=2.0, **RUN).images
    assert np.abs(guided - full).max() > 1e-5


# ---------------------------------------------------------------------- img2img and inpainting
def test_img2img_starts_from_the_init_image(family_pipe):
    pipe, face = family_pipe, _face()
    init = _picture(1)
    vae = pipe.pipe.vae
    with torch.no_grad():
        pixels = pipe.pipe.image_processor.preprocess(init)
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    def distance(strength):
        out = pipe("a photo", face, seed=5, init_image=init, strength=strength, num_inference_steps=20,
                   output_type="latent").images  # fmt: skip
        return float((out - latents).abs().mean())

    near, half, whole = distance(0.05), distance(0.5), distance(1.0)
    # Strength near 0 (one step from the least noise) keeps the init image's latents; more strength redraws.
    assert near < 0.1 * half and half < whole
    # The size comes from the init image (none given), and the strength is recorded.
    result = pipe("a photo", face, seed=5, init_image=_picture(1, (40, 24)), strength=0.5, num_inference_steps=4)
    assert result.images[0].size == (40, 24) and (result.settings.width, result.settings.height) == (40, 24)
    assert result.settings.strength == 0.5
    resized = pipe("a photo", face, seed=5, init_image=_picture(1, (40, 24)), width=16, num_inference_steps=4)
    assert resized.images[0].size == (16, 8) and resized.settings.strength == 0.8  # aspect kept; img2img's default


def test_inpainting_redraws_under_the_mask_only(family_pipe):
    pipe, face = family_pipe, _face()
    kwargs = {"init_image": _picture(1), "mask_image": _mask(), "seed": 5, **RUN}
    without = pipe("a photo", face, scale=0.0, **kwargs).images[0]
    with_identity = pipe("a photo", face, scale=1.0, **kwargs).images[0]
    change = np.abs(with_identity - without).mean(-1)
    # diffusers keeps the init image's latents outside the mask (it blends latents, not pixels: the decoder
    # spreads a little across the border), and the identity redraws the inside.
    outside, inside = change[:, :10].mean(), change[:, 14:].mean()
    assert inside > 1e-3 and outside < 0.25 * inside
    assert pipe("a photo", face, **kwargs).settings.strength == 1.0  # inpainting's default


@pytest.mark.parametrize("mode", MODES)
def test_identity_reaches_the_unet_and_faces_pair_in_every_mode(sd15_pipe, mode):
    pipe = sd15_pipe
    inputs = _inputs(pipe, mode)
    faces = _face(2, seed=7)
    without = pipe("a photo", faces[0], seed=[1], scale=0.0, **inputs, **RUN).images
    with_identity = pipe("a photo", faces[0], seed=[1], **inputs, **RUN).images
    assert np.abs(with_identity - without).max() > 1e-4
    # Two prompts, two people, one call: each image is the one its prompt and face give alone.
    both = pipe(["a photo", "a painting"], faces, seed=[1, 2], **inputs, **RUN).images
    second = pipe("a painting", faces[1], seed=[2], **inputs, **RUN).images
    np.testing.assert_allclose(both[0], with_identity[0], atol=1e-5)
    np.testing.assert_allclose(both[1], second[0], atol=1e-5)


@pytest.mark.parametrize("mode", [None, *MODES])
def test_scheduler_vae_and_controlnet_are_the_calls_own_in_every_mode(sd15_pipe, mode):
    pipe = sd15_pipe
    inputs = _inputs(pipe, mode or "")
    scheduler, vae = pipe.pipe.scheduler, pipe.pipe.vae
    seen = {}

    def watch(pipeline, step, timestep, kwargs):
        seen.update(pipeline=pipeline, scheduler=type(pipeline.scheduler).__name__, vae=pipeline.vae)
        return kwargs

    result = pipe("a photo", _face(), seed=1, scheduler="euler", decoder="tiny", callback_on_step_end=watch,
                  **inputs, **RUN)  # fmt: skip
    assert seen["scheduler"] == "EulerDiscreteScheduler" and seen["vae"] is pipe.tiny_vae  # the call's own
    assert result.settings.decoder == "tiny"
    for pipeline in [pipe.pipe, *pipe._siblings.values()]:
        assert pipeline.scheduler is scheduler and pipeline.vae is vae
        assert getattr(pipeline, "controlnet", None) is None
    # The call ran on a pipeline object of its own, over the same models (shared, not copied).
    assert all(seen["pipeline"] is not pipeline for pipeline in [pipe.pipe, *pipe._siblings.values()])
    assert seen["pipeline"].unet is pipe.pipe.unet and seen["pipeline"].text_encoder is pipe.pipe.text_encoder


def test_fast_preset_with_img2img(sd15_pipe, tmp_path):
    pipe = sd15_pipe
    lora = tmp_path / "lcm.safetensors"
    from safetensors.torch import save_file

    save_file(few_step_lora_state(pipe.pipe.unet, FEW_STEP_LAYOUTS["lcm"], seed=0), str(lora))
    name = pipe.load_fast_lora("lcm", lora)
    batches, weights = [], []

    def count(module, args, kwargs):
        batches.append((args[0] if args else kwargs["sample"]).shape[0])

    def callback(pipeline, step, timestep, kwargs):
        weights.append(acting_loras(pipe.pipe.unet).get(name))  # the weight it acts at on the UNet now
        return kwargs

    handle = pipe.pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        result = pipe("a photo", _face(), seed=1, fast="lcm", init_image=_picture(1), strength=0.5,
                      callback_on_step_end=callback, output_type="np")  # fmt: skip
    finally:
        handle.remove()
    # The preset's 4 steps at strength 0.5 run 2, without text guidance (batch 1), with its LoRA acting.
    assert batches == [1, 1] and weights == [1.0, 1.0]
    assert result.settings.num_inference_steps == 4 and result.settings.scheduler == "lcm"
    assert pipe.loras[name] == 0.0  # and out of the UNet after the call


def test_the_pipelines_built_share_everything_and_keep_nothing_they_should_not(sd15_pipe, tiny_models):
    pipe = sd15_pipe
    name = "StableDiffusionControlNetInpaintPipeline"
    built = pipe.pipeline_for(name)
    assert pipe.pipeline_for(name) is built  # built once
    for key in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(built, key) is getattr(pipe.pipe, key)
    controlnet = ControlInput(_picture(2), make_controlnet(tiny_models.sd15, 9))
    pipe("a photo", _face(), seed=1, control=controlnet, init_image=_picture(1), mask_image=_mask(), **RUN)
    gone = weakref.ref(controlnet.controlnet)
    del controlnet
    gc.collect()
    assert gone() is None  # no ControlNet stays alive through the pipeline
    # A component replaced on the loaded pipeline: the next call builds the pipeline again, with it.
    original = pipe.pipe.scheduler
    pipe.pipe.scheduler = type(original).from_config(original.config)
    try:
        rebuilt = pipe.pipeline_for(name)
        assert rebuilt is not built and rebuilt.scheduler is pipe.pipe.scheduler
    finally:
        pipe.pipe.scheduler = original


def test_mode_arguments_are_checked(sd15_pipe):
    pipe = sd15_pipe
    with pytest.raises(FaceIDError, match="strength applies to img2img and inpainting"):
        pipe("a photo", _face(), strength=0.5, **RUN)
    with pytest.raises(FaceIDError, match="mask_image needs init_image"):
        pipe("a photo", _face(), mask_image=_mask(), **RUN)
    with pytest.raises(FaceIDError, match="strength: Input should be greater than 0"):
        pipe("a photo", _face(), init_image=_picture(1), strength=0.0, **RUN)
    with pytest.raises(FaceIDError, match="runs no step"):
        pipe("a photo", _face(), init_image=_picture(1), strength=0.1, **RUN)
    with pytest.raises(FaceIDError, match="unknown argument.*image.*init_image="):
        pipe("a photo", _face(), image=_picture(1), **RUN)
    with pytest.raises(FaceIDError, match="window must be"):
        ControlInput(_picture(2), pipe.test_controlnets[0], 1.0, window=(0.5, 0.5))
    with pytest.raises(FaceIDError, match="latents= does not apply"):
        pipe("a photo", _face(), init_image=_picture(1), latents=torch.zeros(1, 4, 8, 12), **RUN)


# ---------------------------------------------------------------------- command line
def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(tmp_path, tiny_models, face_models_dir, faces_dir, out, *extra):
    argv = ["generate", "--face", str(faces_dir / "obama.jpg"), "--prompt", "a photo of a person", "--out", str(out),
            "--base-model", str(tiny_models.sd15), "--adapter", str(tiny_models.adapter("faceid", "safetensors")),
            "--face-models", str(face_models_dir), "--steps", "4", "-n", "1", "--seed", "3"]  # fmt: skip
    return main(argv + list(extra))


def test_cli_img2img_writes_images_and_reproduces_from_the_png(tmp_path, tiny_models, face_models_dir, faces_dir):
    init = tmp_path / "photo.png"
    _picture(1, (32, 24)).save(init)
    out = tmp_path / "out"
    assert (
        _cli(tmp_path, tiny_models, face_models_dir, faces_dir, out, "--init-image", str(init), "--strength", "0.5")
        == 0
    )
    image = out / "obama_s3.png"
    with Image.open(image) as written:
        assert written.size == (32, 24)  # the init image's size
    stored = read_settings(image)
    assert stored["strength"] == 0.5 and stored["init_image"] == {"name": "photo.png", "sha256": _sha256(init)}
    # --settings IMAGE.png needs the init image again (as it needs the face), and then makes the same image.
    again = tmp_path / "again"
    reproduce = ["--settings", str(image)]
    assert _cli(tmp_path, tiny_models, face_models_dir, faces_dir, again, *reproduce) == 2
    assert _cli(tmp_path, tiny_models, face_models_dir, faces_dir, again, *reproduce, "--init-image", str(init)) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again / "obama_s3.png")), np.asarray(Image.open(image)))
    assert _cli(tmp_path, tiny_models, face_models_dir, faces_dir, again, "--strength", "1.5") == 2


def test_cli_controlnet_writes_the_control_image(tmp_path, tiny_models, face_models_dir, faces_dir, capsys):
    folder = tmp_path / "controlnet"
    make_controlnet(tiny_models.sd15, 1).save_pretrained(folder)
    control = tmp_path / "pose.png"
    _picture(2, (48, 32)).save(control)
    out = tmp_path / "out"
    extra = ["--controlnet", str(folder), "--control", f"image:{control}:0.7", "--width", "24", "--height", "16"]
    assert _cli(tmp_path, tiny_models, face_models_dir, faces_dir, out, *extra) == 0
    with Image.open(out / "obama_s3-control0.png") as used:
        assert used.size == (24, 16)  # as the ControlNet saw it: at the output's size
    stored = read_settings(out / "obama_s3.png")
    image = {"name": "pose.png", "sha256": _sha256(control)}  # files by name and sha256, a folder by name: no paths
    assert stored["controls"] == [{"kind": "image", "image": image, "scale": 0.7, "controlnet": {"name": "controlnet"}}]
    capsys.readouterr()
    assert _cli(tmp_path, tiny_models, face_models_dir, faces_dir, out, "--control", f"image:{control}") == 2
    assert "--control needs --controlnet" in capsys.readouterr().err
    assert _cli(tmp_path, tiny_models, face_models_dir, faces_dir, out, *extra[:2], "--control", "edges:x.png") == 2
    assert "KIND one of canny, kps, pose, depth, image" in capsys.readouterr().err


def test_cli_control_images_made_from_a_photo(tmp_path, tiny_models, face_models_dir, faces_dir):
    """--control kps:PHOTO and canny:PHOTO: faceid makes the control image (faceid.control) from the photo."""
    import numpy as np

    folder = tmp_path / "controlnet"
    make_controlnet(tiny_models.sd15, 1).save_pretrained(folder)
    photo = faces_dir / "biden.jpg"
    out = tmp_path / "out"
    extra = ["--controlnet", str(folder), "--control", f"kps:{photo}", "--control", f"canny:{photo}:0.5",
             "--width", "64", "--height", "64"]  # fmt: skip
    assert _cli(tmp_path, tiny_models, face_models_dir, faces_dir, out, *extra) == 0
    with Image.open(out / "obama_s3-control0.png") as kps, Image.open(out / "obama_s3-control1.png") as edges:
        kps, edges = np.asarray(kps.convert("RGB")), np.asarray(edges.convert("RGB"))
    assert kps.shape == edges.shape == (64, 64, 3)
    assert 0 < (kps.sum(axis=2) > 0).mean() < 0.5  # the keypoints drawn on black
    assert set(np.unique(edges)) <= {0, 255} and edges.max() == 255
    kinds = [c["kind"] for c in read_settings(out / "obama_s3.png")["controls"]]
    assert kinds == ["kps", "canny"]
