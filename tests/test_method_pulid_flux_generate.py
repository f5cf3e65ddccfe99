"""PuLID-FLUX v0.9.1 generating on a FLUX.1 model set (``methods={"pulid-flux": FOLDER}``, ``method="pulid-flux"``),
on the tests' tiny FLUX (``tiny_models.build_flux``) with a tiny PuLID-FLUX in the released layout
(``tiny_models.build_pulid_flux``: ``pulid_flux_v0.9.1.safetensors``, the EVA-CLIP file and BiSeNet's) and stand-in
face models of both packs.

Checked: the cross-attention modules sit after the transformer's blocks at the released intervals; a call equals
diffusers' stock ``FluxPipeline`` given the identity by hand (``joint_attention_kwargs={"pulid": PuLIDIdentity}``);
the set without PuLID in a call is the base model (a stock call, scale 0, a window that opens at no step) and an
InfiniteYou call on a set that also has PuLID-FLUX is the same as on one without it; the start step (identity
window) and the scale act; true CFG gives its negative pass the unconditional identity (as the authors' denoise) and
refuses a negative prompt without it; true CFG's start step (the authors' timestep_to_start_cfg) equals two calls,
the steps before it without true CFG and the rest with it; four threads equal each alone; img2img; the CLI end to end; and, where the
golden folder is present, the whole call against the authors' final latents for each recorded setting.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from conftest import METHODS_GOLDEN_DIR
from face_helpers import face_photo
from PIL import Image
from tiny_models import build_infiniteyou, flux_with_text_encoders

from faceid.cli import main
from faceid.errors import FaceIDError
from faceid.methods.pulid import PuLIDFluxBlock, PuLIDIdentity, flux_ca_positions
from faceid.pipeline import FaceIDPipeline
from faceid.settings import GenerationSettings

RUN = {"width": 32, "height": 32, "num_inference_steps": 2, "output_type": "np"}
PROMPT = "a photo of a person"
EMBEDDING = np.random.default_rng(3).standard_normal(512).astype(np.float32)


def load(flux_dir, methods, face_models):
    return FaceIDPipeline.from_pretrained(
        flux_dir, None, methods=methods, device="cpu", progress=False, face_models=face_models
    )


@pytest.fixture(scope="module")
def pipe(flux_dir, pulid_flux_dir, both_packs):
    return load(flux_dir, {"pulid-flux": pulid_flux_dir}, both_packs)


@pytest.fixture(scope="module")
def photo():
    return face_photo("obama.jpg")


def by_hand(pipe, photo, weight, **kwargs):
    """The stock diffusers FluxPipeline of the set, the identity given by hand in joint_attention_kwargs."""
    encoded = pipe.encode(PROMPT, photo)
    return pipe.pipe(
        prompt_embeds=encoded.pipe_kwargs["prompt_embeds"],
        pooled_prompt_embeds=encoded.pipe_kwargs["pooled_prompt_embeds"],
        joint_attention_kwargs={"pulid": PuLIDIdentity(encoded.identity, weight)},
        generator=torch.Generator().manual_seed(3),
        guidance_scale=3.5,
        **RUN,
        **kwargs,
    ).images


# ---------------------------------------------------------------------- the model set
def test_the_cross_attention_sits_after_the_blocks_at_the_released_intervals(pipe, flux_dir):
    transformer = pipe.denoiser
    loaded = pipe.loaded_method("pulid-flux")
    assert pipe.adapter is None and pipe.default_method == "pulid-flux"
    double, single = flux_ca_positions(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))
    for blocks, positions in (
        (transformer.transformer_blocks, double),
        (transformer.single_transformer_blocks, single),
    ):
        assert all(isinstance(block, PuLIDFluxBlock) for block in blocks)
        assert [None if b.ca is None else list(loaded.adapter.pulid_ca).index(b.ca) for b in blocks] == positions
    assert double[:3] == [0, None, 1] and single[0] == 2  # every 2nd double block, every 4th single one
    run = pipe.resolve_settings({})
    assert (run.method, run.scale, run.negative_prompt, run.true_cfg) == ("pulid-flux", 1.0, "", None)


def test_a_call_equals_the_stock_flux_pipeline_given_the_identity(pipe, photo):
    mine = pipe(PROMPT, photo, scale=0.7, seed=3, **RUN).images
    stock = by_hand(pipe, photo, 0.7)
    difference = float(np.abs(mine - stock).max())
    print(f"PuLID-FLUX call vs the stock FluxPipeline: max |difference| {difference:.3g}")  # (pytest -s)
    assert difference <= 1e-6, difference
    assert np.abs(mine - pipe(PROMPT, photo, seed=3, **RUN).images).max() > 1e-3  # the scale acts


def test_without_pulid_in_a_call_the_set_is_the_base_model(pipe, photo, flux_dir, pulid_flux_dir, both_packs):
    from diffusers import FluxPipeline

    encoded = pipe.encode(PROMPT, photo)
    text = {k: encoded.pipe_kwargs[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    base = FluxPipeline.from_pretrained(flux_dir)
    base.set_progress_bar_config(disable=True)
    plain = base(**text, generator=torch.Generator().manual_seed(3), **RUN).images
    wrapped = pipe.pipe(**text, generator=torch.Generator().manual_seed(3), **RUN).images
    np.testing.assert_array_equal(wrapped, plain)  # the wrapped blocks pass a call without PuLID through
    zero = pipe(PROMPT, photo, scale=0.0, seed=3, **RUN).images
    shut = pipe(PROMPT, photo, identity_window=(1.0, 1.0), seed=3, **RUN).images  # opens at no step
    np.testing.assert_array_equal(zero, plain)
    np.testing.assert_array_equal(shut, plain)

    # An InfiniteYou call on a set that also has PuLID-FLUX is the call on a set without it
    infiniteyou = build_infiniteyou(flux_dir, pulid_flux_dir.parent / "InfiniteYou", seed=2)
    both = load(flux_dir, {"infiniteyou": infiniteyou, "pulid-flux": pulid_flux_dir}, both_packs)
    alone = load(flux_dir, {"infiniteyou": infiniteyou}, both_packs)
    assert both.default_method == "infiniteyou" and set(both.methods) == {"infiniteyou", "pulid-flux"}
    np.testing.assert_array_equal(
        both(PROMPT, EMBEDDING, seed=5, **RUN).images, alone(PROMPT, EMBEDDING, seed=5, **RUN).images
    )
    assert np.abs(both(PROMPT, photo, method="pulid-flux", seed=5, **RUN).images - plain).max() > 1e-3
    with pytest.raises(FaceIDError, match="true_cfg is PuLID-FLUX's true CFG scale, not infiniteyou's"):
        both(PROMPT, EMBEDDING, true_cfg=2.0, **RUN)


def test_the_start_step_and_the_scale(pipe, photo):
    encoded = pipe.encode(PROMPT, photo)  # the face read once: these calls differ in what runs, not in the face
    full = pipe(conditioning=encoded, seed=3, **RUN).images
    late = pipe(conditioning=encoded, identity_window=(0.5, 1.0), seed=3, **RUN)  # the authors' start_step 1 of 2
    none = pipe(conditioning=encoded, scale=0.0, seed=3, **RUN).images
    assert np.abs(late.images - full).max() > 1e-4 and np.abs(late.images - none).max() > 1e-4
    assert late.settings.identity_window == (0.5, 1.0) and late.settings.method == "pulid-flux"


def test_true_cfg_gives_its_negative_pass_the_unconditional_identity(pipe, photo):
    loaded = pipe.loaded_method("pulid-flux")
    seen = []
    first = loaded.adapter.pulid_ca[0]
    real = first.forward
    first.forward = lambda embedding, hidden: (seen.append(embedding[0].clone()), real(embedding, hidden))[1]
    try:
        # from the first step (the authors' default starts at the second: test_true_cfg_starts_at_its_step)
        result = pipe(PROMPT, photo, true_cfg=3.0, true_cfg_start=0, negative_prompt="blurry", seed=3, **RUN)
    finally:
        del first.forward
    tokens = loaded.identity_tokens([pipe.face_analyzer.get(photo)])
    assert len(seen) == 4  # 2 steps, a prompt pass and a negative pass each
    for k, embedding in enumerate(seen):
        expected = tokens.uncond if k % 2 else tokens.cond  # the prompt's pass first
        assert torch.equal(embedding, expected[0].to(embedding.dtype)), k
    assert result.settings.true_cfg == 3.0 and result.settings.negative_prompt == "blurry"
    without = pipe(PROMPT, photo, seed=3, **RUN).images
    assert np.abs(result.images - without).max() > 1e-3
    with pytest.raises(FaceIDError, match="negative_prompt"):
        pipe(PROMPT, photo, negative_prompt="blurry", seed=3, **RUN)  # no true CFG: FLUX has no negative prompt


def test_true_cfg_starts_at_its_step(pipe, photo):
    """true_cfg_start k (the authors' timestep_to_start_cfg, default 1): the first k steps run the prompt's pass
    alone. Checked against two calls: k steps without true CFG (stopped there), then the rest of the same schedule
    (diffusers' ``sigmas``: the tail of the FLUX pipeline's own) from those latents with true CFG at every step."""
    plain, negative = pipe.encode(PROMPT, photo), pipe.encode(PROMPT, photo, negative_prompt="blurry")
    steps = 3
    run = {**RUN, "num_inference_steps": steps}

    def call(conditioning, **extra):
        return pipe(conditioning=conditioning, seed=3, **{**run, **extra})

    default = call(negative, true_cfg=3.0)
    assert default.settings.true_cfg_start == 1  # the authors' app
    np.testing.assert_array_equal(default.images, call(negative, true_cfg=3.0, true_cfg_start=1).images)
    from_the_first = call(negative, true_cfg=3.0, true_cfg_start=0).images
    assert np.abs(default.images - from_the_first).max() > 1e-4
    # past the last step: no negative pass at all, the call without true CFG bit for bit
    np.testing.assert_array_equal(call(negative, true_cfg=3.0, true_cfg_start=steps).images, call(plain).images)

    def stop_after(k):
        def callback(pipeline, step, timestep, kwargs):
            if step + 1 == k:
                pipeline._interrupt = True  # diffusers skips the steps left: the latents after k steps
            return kwargs

        return callback

    for k in (1, 2):
        first = call(plain, output_type="latent", callback_on_step_end=stop_after(k)).images
        tail = np.linspace(1.0, 1 / steps, steps)[k:].tolist()  # FluxPipeline's sigmas, the steps after k
        rest = pipe(conditioning=negative, latents=first, true_cfg=3.0, true_cfg_start=0, sigmas=tail,
                    **{**run, "num_inference_steps": steps - k}).images  # fmt: skip
        mine = call(negative, true_cfg=3.0, true_cfg_start=k).images
        difference = float(np.abs(mine - rest).max())
        print(f"true_cfg_start {k}: max |difference| from the two calls {difference:.3g}")  # (pytest -s)
        assert difference <= 1e-6, (k, difference)
    with pytest.raises(FaceIDError, match="true_cfg_start: Input should be greater than or equal to 0"):
        call(negative, true_cfg=3.0, true_cfg_start=-1)
    with pytest.raises(FaceIDError, match=r"pulid_ortho belong\(s\) to PuLID v1.1 \(SDXL\), not pulid-flux"):
        call(plain, pulid_ortho="v1")


def test_four_threads_equal_each_alone(pipe, photo):
    plain, negative = pipe.encode(PROMPT, photo), pipe.encode(PROMPT, photo, negative_prompt="blurry")
    calls = [
        {"conditioning": plain, "scale": 0.5},
        {"conditioning": plain, "scale": 1.2, "seed": 4},
        {"conditioning": plain, "identity_window": (0.5, 1.0)},
        {"conditioning": negative, "true_cfg": 2.0},
        {"conditioning": negative, "true_cfg": 2.0, "true_cfg_start": 0},
    ]

    def one(extra):
        return pipe(**{"seed": 3, **RUN, **extra}).images

    alone = [one(extra) for extra in calls]
    together: list = [None] * len(calls)

    def run(k):
        together[k] = one(calls[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, b)


def test_img2img(pipe, photo):
    picture = Image.fromarray((np.random.default_rng(1).random((48, 32, 3)) * 255).astype(np.uint8))
    run = {k: v for k, v in RUN.items() if k not in ("width", "height")}
    made = pipe(PROMPT, photo, init_image=picture, strength=0.6, seed=3, **run)
    assert made.images.shape == (1, 48, 32, 3) and made.settings.strength == 0.6
    zero = pipe(PROMPT, photo, init_image=picture, strength=0.6, scale=0.0, seed=3, **run).images
    assert np.abs(made.images - zero).max() > 1e-4


def test_the_cli(pipe, flux_dir, pulid_flux_dir, both_packs, photo, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--base-model", str(flux_dir), "--method", "pulid-flux", "--method-weights",
            f"pulid-flux={pulid_flux_dir}", "--face", str(photo), "--face-models", str(both_packs), "--prompt", PROMPT,
            "--width", "32", "--height", "32", "--steps", "2", "--seed", "3", "--true-cfg", "2",
            "--negative-prompt", "blurry", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    png = out / "obama_s3.png"  # (and seeds 4 to 6, the contact sheet)
    settings = GenerationSettings.from_png(png)
    assert (settings.method, settings.true_cfg, settings.negative_prompt) == ("pulid-flux", 2.0, "blurry")
    again = pipe(PROMPT, photo, true_cfg=2.0, negative_prompt="blurry", seed=3, **RUN).images[0]
    assert np.abs(np.asarray(Image.open(png).convert("RGB")).astype(float) - np.round(again * 255)).max() <= 1
    assert main([*argv[: argv.index("--true-cfg")], "--negative-prompt", "blurry", "--out", str(tmp_path / "o")]) == 2
    assert "negative_prompt" in capsys.readouterr().err


# ---------------------------------------------------------------------- the authors' whole call
GOLDEN = METHODS_GOLDEN_DIR / "pulid"


@pytest.mark.skipif(not (GOLDEN / "manifest.json").is_file(), reason=f"no PuLID golden folder at {GOLDEN}")
def test_the_whole_call_against_the_authors_final_latents(tmp_path, both_packs, photo):
    """The golden's tiny FLUX (its transformer, VAE and scheduler, with tiny text encoders of its widths: the prompt
    embeddings are the recorded ones) with its PuLID-FLUX file (and the tests' tiny EVA and BiSeNet: the identity
    tokens are the recorded ones) loaded as a model set; every recorded setting run through FaceIDPipeline (plan,
    FluxPipeline, the call's transformer view) from the recorded noise for the steps the authors ran, compared with
    their final latents."""
    from tiny_models import write_pulid_face_files

    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    flux, arrays = manifest["flux_v0_9_1"], manifest["arrays"]
    inputs, expected = np.load(GOLDEN / "inputs.npz"), np.load(GOLDEN / "expected.npz")
    base = (GOLDEN / flux["base_model"]).resolve()
    folder = flux_with_text_encoders(base, tmp_path / "flux")
    weights = tmp_path / "PuLID"
    weights.mkdir()
    shutil.copyfile(GOLDEN / flux["checkpoint"], weights / "pulid_flux_v0.9.1.safetensors")
    write_pulid_face_files(weights, 0)
    pipe = load(folder, {"pulid-flux": weights}, both_packs)

    encoded = pipe.encode("a photo", photo)
    conditioning = dataclasses.replace(
        encoded,
        pipe_kwargs={
            "prompt_embeds": torch.from_numpy(inputs["flux_txt"]),
            "pooled_prompt_embeds": torch.from_numpy(inputs["flux_vec"]),
            "negative_prompt_embeds": torch.from_numpy(inputs["flux_neg_txt"]),
            "negative_pooled_prompt_embeds": torch.from_numpy(inputs["flux_neg_vec"]),
        },
        identity=torch.from_numpy(expected["flux_id_embedding_a"]),
        uncond_identity=torch.from_numpy(expected["flux_uncond_id_embedding"]),
    )
    schedule = expected["flux_schedule"]
    steps = len(schedule) - 1  # get_schedule(N): N steps, N + 1 times
    run = flux["denoise"]["steps_run"]  # the authors ran the first of them
    # packed 2x2 patches of the VAE's latents: the side in pixels
    side = int(np.sqrt(inputs["flux_img"].shape[1])) * 2 * pipe.pipe.vae_scale_factor

    def stop_after(pipeline, step, timestep, kwargs):
        if step + 1 == run:
            pipeline._interrupt = True  # diffusers skips the steps left; the latents are the authors' last
        return kwargs

    assert flux["settings"]
    for setting in flux["settings"]:
        # the authors' start_step: the identity from that step on (an identity window on the full schedule)
        window = {"identity_window": (setting["start_step"] / steps, 1.0)} if setting["start_step"] else {}
        cfg = {"true_cfg": setting["true_cfg"], "true_cfg_start": setting["timestep_to_start_cfg"]}
        latents = pipe(
            conditioning=conditioning,
            latents=torch.from_numpy(inputs["flux_img"]),
            scale=setting["id_weight"],
            **(cfg if abs(setting["true_cfg"] - 1.0) > 1e-2 else {}),  # the authors' use_true_cfg
            **window,
            guidance_scale=flux["denoise"]["guidance"],
            num_inference_steps=steps,
            width=side,
            height=side,
            output_type="latent",
            callback_on_step_end=stop_after,
        ).images
        key = f"{setting['prefix']}final_img"
        difference = float(np.abs(latents.numpy().astype(np.float64) - expected[key]).max())
        print(f"{key}: max |difference| {difference:.3g}, atol {arrays[key]['atol']:.3g}")  # (pytest -s)
        assert difference <= arrays[key]["atol"], (key, difference, arrays[key]["atol"])
