"""FLUX.1 as a generating base: a model set without a FaceID adapter (``FaceIDPipeline.from_pretrained(FLUX,
adapter=None, methods={"infiniteyou": FOLDER})``) on the tests' tiny FLUX (``tiny_models.build_flux``) with a tiny
InfiniteYou in the released layout (``tiny_models.build_infiniteyou``).

Checked: what loads (family, denoiser, defaults, the default method); a call equals the same call made by hand on a
stock diffusers ``FluxControlNetPipeline`` (the prompt through FLUX's own ``encode_prompt``, embedded guidance, the
per-call InfuseNet); img2img and inpainting run FLUX's own step count at a strength where Stable Diffusion's rule
would differ; seeds per image; previews decode FLUX's packed latents as its pipeline does (the last is the image);
the user's step callback; four threads equal each alone; the memory options (offload refused on the CPU,
optimum-quanto int8/fp8 weights run); the refusals (a FaceID call, negative prompt, samplers, ControlNets of
another family, a FaceID adapter on FLUX).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_infiniteyou

from faceid.errors import FaceIDError
from faceid.methods.infiniteyou import control_image
from faceid.pipeline import FaceIDPipeline

SIZE = {"width": 32, "height": 32}
RUN = {**SIZE, "num_inference_steps": 2, "output_type": "np"}
EMBEDDING = np.random.default_rng(3).standard_normal(512).astype(np.float32)


@pytest.fixture(scope="module")
def infiniteyou_dir(flux_dir, tmp_path_factory):
    return build_infiniteyou(flux_dir, tmp_path_factory.mktemp("infiniteyou") / "InfiniteYou", seed=2)


def load(flux_dir, infiniteyou_dir, face_models, **kwargs):
    return FaceIDPipeline.from_pretrained(
        flux_dir,
        None,
        methods={"infiniteyou": infiniteyou_dir},
        device="cpu",
        progress=False,
        face_models=face_models,
        **kwargs,
    )


@pytest.fixture(scope="module")
def pipe(flux_dir, infiniteyou_dir, both_packs):
    return load(flux_dir, infiniteyou_dir, both_packs)


def _picture(seed, size=(32, 32)):
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


# ---------------------------------------------------------------------- the model set
def test_a_flux_model_set_has_no_faceid_adapter_and_flux_defaults(pipe, flux_dir):
    assert pipe.adapter is None and pipe.family == "FLUX.1"
    assert pipe.denoiser is pipe.pipe.transformer and type(pipe.pipe).__name__ == "FluxPipeline"
    assert pipe.default_method == "infiniteyou" and list(pipe.methods) == ["infiniteyou"]
    assert type(pipe.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # its own, not DDIM
    run = pipe.resolve_settings({})
    assert (run.method, run.width, run.height, run.num_inference_steps, run.guidance_scale) == (
        "infiniteyou",
        1024,
        1024,
        28,
        3.5,
    )
    assert run.negative_prompt == "" and run.scale == 1.0 and run.adapter is None
    assert run.base_model == str(flux_dir)


def test_what_a_flux_model_set_refuses(pipe, flux_dir, tiny_models, both_packs):
    with pytest.raises(FaceIDError, match=r"no FaceID adapter .*its identity method is infiniteyou"):
        pipe("a photo", EMBEDDING, method="faceid", **RUN)
    with pytest.raises(FaceIDError, match="negative_prompt do.*not apply to FLUX.1"):
        pipe("a photo", EMBEDDING, negative_prompt="blurry", **RUN)
    with pytest.raises(FaceIDError, match="scheduler do.*not apply to FLUX.1"):
        pipe("a photo", EMBEDDING, scheduler="ddim", **RUN)
    with pytest.raises(FaceIDError, match="identitynet_scale is InstantID's"):
        pipe("a photo", EMBEDDING, identitynet_scale=0.5, **RUN)
    with pytest.raises(FaceIDError, match="ask for adapter .* has no FaceID adapter"):
        pipe("a photo", EMBEDDING, adapter="faceid-sd15", **RUN)
    with pytest.raises(FaceIDError, match="give methods="):
        FaceIDPipeline.from_pretrained(flux_dir, None, device="cpu")
    with pytest.raises(FaceIDError, match="without a FaceID adapter faceid loads FLUX.1"):
        FaceIDPipeline.from_pretrained(tiny_models.sd15, None, methods={"infiniteyou": "x"}, device="cpu")
    with pytest.raises(FaceIDError, match=r"FLUX\.1 model: .*adapter=None"):
        FaceIDPipeline.from_pretrained(flux_dir, tiny_models.adapter("faceid"), device="cpu")


def test_a_controlnet_of_another_family_is_refused(pipe, tiny_models):
    from tiny_models import make_controlnet

    from faceid.modes import ControlInput

    sd_controlnet = make_controlnet(tiny_models.sd15, 3)
    with pytest.raises(FaceIDError, match="not a diffusers FluxControlNetModel"):
        pipe("a photo", EMBEDDING, control=ControlInput(_picture(1), sd_controlnet), **RUN)


# ---------------------------------------------------------------------- text to image
@pytest.fixture(scope="module")
def t2i(pipe):
    return pipe("a photo of a person", EMBEDDING, seed=5, **RUN)


def test_a_call_is_the_stock_flux_controlnet_pipeline_with_the_calls_infusenet(pipe, t2i):
    """The wiring: FLUX's own prompt encoding, guidance 3.5 embedded, InfuseNet on a black control image with the
    embedding's tokens at scale 1 over every step, the same seed: the same image."""
    from diffusers import FluxControlNetPipeline

    assert t2i.images.shape == (1, 32, 32, 3) and np.isfinite(t2i.images).all()
    assert t2i.settings.method == "infiniteyou" and t2i.settings.scale == 1.0
    np.testing.assert_array_equal(np.asarray(t2i.kps_image), np.asarray(control_image((32, 32))))
    loaded = pipe.methods["infiniteyou"]
    prompt_embeds, pooled, _ = pipe.pipe.encode_prompt(
        ["a photo of a person"], prompt_2=None, device="cpu", max_sequence_length=pipe.pipe.tokenizer_2.model_max_length
    )
    assert prompt_embeds.shape[1] == 32  # the tiny T5 tokenizer's maximum
    scheduler = type(pipe.pipe.scheduler).from_config(pipe.pipe.scheduler.config)
    stock = FluxControlNetPipeline(
        **{
            **pipe.pipe.components,
            "scheduler": scheduler,
            "controlnet": loaded.controlnet(loaded.identity_tokens(EMBEDDING)),
        }
    )
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        control_image=[control_image((32, 32))],
        controlnet_conditioning_scale=[1.0],
        control_guidance_start=[0.0],
        control_guidance_end=[1.0],
        guidance_scale=3.5,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(5),
        **SIZE,
        output_type="np",
    ).images
    np.testing.assert_allclose(t2i.images, expected, atol=1e-6, rtol=0)


def test_seeds_per_image_reproduce_each_image_alone(pipe):
    both = pipe("a photo", EMBEDDING, seed=[7, 8], num_images_per_prompt=2, **RUN)
    alone = pipe("a photo", EMBEDDING, seed=[8], **RUN)
    assert both.images.shape[0] == 2 and both.settings.seed == [7, 8]
    np.testing.assert_allclose(both.images[1], alone.images[0], atol=1e-5, rtol=0)
    assert not np.allclose(both.images[0], both.images[1], atol=1e-3)


def test_previews_unpack_flux_latents_and_the_last_is_the_image(pipe):
    shown = []
    steps = []

    def count(pipeline, step, timestep, kwargs):
        steps.append(step)
        return kwargs

    result = pipe(
        "a photo",
        EMBEDDING,
        seed=5,
        **{**RUN, "output_type": "pil", "num_inference_steps": 3},
        on_preview=lambda step, total, images: shown.append((step, total, images)),
        callback_on_step_end=count,
    )
    assert [(s, t) for s, t, _ in shown] == [(1, 3), (2, 3), (3, 3)] and steps == [0, 1, 2]
    assert all(images[0].size == (32, 32) for _, _, images in shown)
    np.testing.assert_array_equal(np.asarray(shown[-1][2][0]), np.asarray(result.images[0]))


def test_calls_from_four_threads_equal_each_alone(pipe):
    def one(seed):
        return pipe("a photo", EMBEDDING, seed=seed, scale=0.5 + seed / 10, **RUN).images

    alone = [one(seed) for seed in range(4)]
    together: list = [None] * 4

    def worker(i):
        together[i] = one(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))


# ---------------------------------------------------------------------- img2img, inpainting
def test_img2img_runs_flux_step_count(pipe):
    """Strength 0.55 of 4 steps: FLUX's pipelines run 3 (4 - int(4 - 2.2)); Stable Diffusion's rule says 2. The
    plan places FLUX's (a mismatch is an internal error)."""
    steps = []

    def count(pipeline, step, timestep, kwargs):
        steps.append(step)
        return kwargs

    init = _picture(4)
    result = pipe(
        "a photo",
        EMBEDDING,
        init_image=init,
        strength=0.55,
        seed=2,
        callback_on_step_end=count,
        **{**RUN, "num_inference_steps": 4},
    )
    assert steps == [0, 1, 2] and result.settings.strength == 0.55
    assert result.images.shape == (1, 32, 32, 3)
    other = pipe(
        "a photo", EMBEDDING, init_image=_picture(5), strength=0.55, seed=2, **{**RUN, "num_inference_steps": 4}
    )
    assert not np.allclose(result.images, other.images, atol=1e-3)  # the init image counts


def test_inpainting_runs(pipe):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    result = pipe("a photo", EMBEDDING, init_image=_picture(4), mask_image=mask, seed=2, **RUN)
    assert result.images.shape == (1, 32, 32, 3) and result.settings.strength == 1.0


# ---------------------------------------------------------------------- memory options
def test_offload_is_refused_on_the_cpu(flux_dir, infiniteyou_dir, both_packs):
    for offload in ("model", "sequential"):
        with pytest.raises(FaceIDError, match=f"offload='{offload}' moves models between the CPU and a GPU"):
            load(flux_dir, infiniteyou_dir, both_packs, offload=offload)
    with pytest.raises(FaceIDError, match="unknown offload"):
        load(flux_dir, infiniteyou_dir, both_packs, offload="disk")
    with pytest.raises(FaceIDError, match="unknown quantization"):
        load(flux_dir, infiniteyou_dir, both_packs, quantize="int4")


@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_quantized_weights_run_on_the_cpu(flux_dir, infiniteyou_dir, both_packs, t2i, quantize):
    """optimum-quanto 8-bit weights of the transformer and T5: the layers hold quantized weights, and the image is
    the full-precision one's within quantization error."""
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QModuleMixin

    quantized = load(flux_dir, infiniteyou_dir, both_packs, quantize=quantize)
    transformer = quantized.pipe.transformer
    assert any(isinstance(m, QModuleMixin) for m in transformer.modules())
    assert any(isinstance(m, QModuleMixin) for m in quantized.pipe.text_encoder_2.modules())
    result = quantized("a photo of a person", EMBEDDING, seed=5, **RUN)
    assert np.isfinite(result.images).all()
    difference = float(np.abs(result.images - t2i.images).max())
    assert 0 < difference < 0.25, difference


def test_faceid_models_lists_flux_with_its_licence(capsys):
    from faceid.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    families = out[out.index("Base model families") : out.index("Identity methods")]
    flux = families[families.index("FLUX.1 ") :]
    assert "FluxPipeline: 1024x1024, 28 steps, embedded guidance 3.5" in flux
    assert "no FaceID adapter (--adapter none); methods that generate: pulid-flux, infiniteyou" in flux
    assert "FLUX.1 [dev] Non-Commercial License" in flux and "NOT for commercial use" in flux


def test_what_is_built_for_the_unet_is_refused_on_flux(pipe, tmp_path):
    for call in (
        lambda: pipe.load_lora(tmp_path / "style.safetensors"),
        lambda: pipe.compile(),
        lambda: pipe.load_reference("plus-face"),
        lambda: pipe.load_fast_lora("lcm"),
    ):
        with pytest.raises(FaceIDError, match=r"on a FLUX\.1 model set \(no FaceID adapter\) is not supported yet"):
            call()
    assert not pipe.compiled
