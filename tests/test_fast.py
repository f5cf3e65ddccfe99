"""Few-step presets (``--fast``), samplers, guidance off, and identity guidance, on the tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import FEW_STEP_LAYOUTS, acting_loras, few_step_lora_state

from faceid.errors import FaceIDError
from faceid.fast import PRESETS
from faceid.identity_guidance import IdentityGuidedUNet
from faceid.peft_adapters import layers_with
from faceid.pipeline import FaceIDPipeline
from faceid.settings import GenerationSettings

SIZE = {"width": 24, "height": 16}


def _face(n=1, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def fast_pipe(tiny_models, analyzer):
    """Its own pipeline: the few-step LoRAs loaded here stay on it."""
    return FaceIDPipeline.from_pretrained(
        tiny_models.sd15, tiny_models.adapter("faceid"), device="cpu", progress=False, face_analyzer=analyzer
    )


@pytest.fixture(scope="module")
def sdxl_fast_pipe(tiny_models, analyzer):
    return FaceIDPipeline.from_pretrained(
        tiny_models.sdxl, tiny_models.adapter("faceid-sdxl"), device="cpu", progress=False, face_analyzer=analyzer
    )


def _lora_file(pipe, preset, folder, seed=0):
    path = folder / f"{preset}-{pipe.family}.safetensors"
    save_file(few_step_lora_state(pipe.pipe.unet, FEW_STEP_LAYOUTS[preset], seed=seed), str(path))
    return path


class _Watch:
    """Counts the UNet's calls and batch sizes, and what the pipeline uses at each step."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.batches: list[int] = []
        self.schedulers: list[str] = []
        self.lora_weights: list[dict[str, float]] = []
        self.timesteps: list[int] = []

    def __enter__(self):
        def count(module, args, kwargs):
            self.batches.append((args[0] if args else kwargs["sample"]).shape[0])

        self.handle = self.pipe.pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def callback(self, pipeline, step, timestep, kwargs):
        self.schedulers.append(type(pipeline.scheduler).__name__)
        self.timesteps.append(int(timestep))
        self.lora_weights.append(acting_loras(self.pipe.pipe.unet))  # the weights on the UNet at this step
        return kwargs


def _identity_lora_weights(pipe):
    adapter = pipe.adapter
    return {p: adapter.unet.get_submodule(p).lora_B[adapter.name].weight.clone() for p in adapter._lora_layers}


@pytest.mark.parametrize("preset", ["lcm", "tcd", "hyper"])
def test_sd15_presets(fast_pipe, preset, tmp_path):
    pipe, face = fast_pipe, _face()
    spec = PRESETS[preset]
    identity_before = _identity_lora_weights(pipe)
    identity_weight = pipe.loras[pipe.adapter.name]
    # The same sampler, steps and guidance without the LoRA: what the LoRA changes.
    plain = pipe("p", face, seed=1, scheduler=spec.scheduler, num_inference_steps=4, guidance_scale=1.0,
                 eta=spec.eta, output_type="np", **SIZE).images  # fmt: skip

    name = pipe.load_fast_lora(preset, _lora_file(pipe, preset, tmp_path))
    assert pipe.loras[name] == 0.0 and name not in str(pipe.lora_sources())
    watch = _Watch(pipe)
    with watch:
        result = pipe("p", face, seed=1, fast=preset, output_type="np", callback_on_step_end=watch.callback, **SIZE)
    run = result.settings
    assert (run.fast, run.scheduler, run.num_inference_steps, run.guidance_scale) == (
        preset, spec.scheduler, spec.steps, spec.guidance_scale)  # fmt: skip
    assert run.eta == spec.eta
    expected_class = {"lcm": "LCMScheduler", "tcd": "TCDScheduler", "hyper": "DDIMScheduler"}[preset]
    assert watch.schedulers == [expected_class] * spec.steps
    if preset == "hyper":  # trailing spacing: the first step is the last training timestep
        assert watch.timesteps == [999, 749, 499, 249]
    assert watch.batches == [1] * spec.steps  # guidance off: one image, no unconditional half
    assert all(w[name] == 1.0 for w in watch.lora_weights)  # the preset's LoRA acts during the call...
    assert pipe.loras[name] == 0.0  # ...and not after it: switched out of the forward pass, no cost
    assert all(name not in layer.active_adapters for layer in layers_with(pipe.pipe.unet, name).values())
    assert type(pipe.pipe.scheduler).__name__ == "DDIMScheduler"
    assert not np.allclose(result.images, plain, atol=1e-4)
    # A weight-0 LoRA changes nothing: the plain call is the same as before it was loaded, bit for bit.
    again = pipe("p", face, seed=1, scheduler=spec.scheduler, num_inference_steps=4, guidance_scale=1.0,
                 eta=spec.eta, output_type="np", **SIZE).images  # fmt: skip
    np.testing.assert_array_equal(again, plain)
    # The identity LoRA is untouched.
    assert pipe.loras[pipe.adapter.name] == identity_weight
    for path, weight in _identity_lora_weights(pipe).items():
        assert torch.equal(weight, identity_before[path])
    # Removed cleanly: the same call as before loading.
    pipe.remove_lora(name)
    pipe._fast_loras.pop(name)
    assert name not in pipe.loras
    np.testing.assert_array_equal(
        pipe("p", face, seed=1, scheduler=spec.scheduler, num_inference_steps=4, guidance_scale=1.0,
             eta=spec.eta, output_type="np", **SIZE).images, plain)  # fmt: skip


def test_given_values_win_over_the_preset(fast_pipe, tmp_path):
    pipe = fast_pipe
    pipe.load_fast_lora("lcm", _lora_file(pipe, "lcm", tmp_path))
    run = pipe("p", _face(), seed=1, fast="lcm", num_inference_steps=2, guidance_scale=1.5, output_type="np",
               **SIZE).settings  # fmt: skip
    assert (run.num_inference_steps, run.guidance_scale, run.scheduler) == (2, 1.5, "lcm")
    # A settings object names the preset, and a stored image's settings bring it back.
    again = GenerationSettings.parse(run.to_json())
    assert again.fast == "lcm" and again.resolve("SD1.5") == again


def test_lightning_is_sdxl_only_and_runs_on_sdxl(fast_pipe, sdxl_fast_pipe, tmp_path):
    with pytest.raises(FaceIDError, match="lightning .*SDXL only.*lcm or tcd or hyper"):
        fast_pipe("p", _face(), fast="lightning", **SIZE)
    pipe = sdxl_fast_pipe
    name = pipe.load_fast_lora("lightning", _lora_file(pipe, "lightning", tmp_path))
    watch = _Watch(pipe)
    with watch:
        result = pipe("p", _face(), seed=3, fast="lightning", output_type="np", width=32, height=32,
                      callback_on_step_end=watch.callback)  # fmt: skip
    assert watch.schedulers == ["EulerDiscreteScheduler"] * 4 and watch.batches == [1] * 4
    assert watch.timesteps == [999, 749, 499, 249]
    assert all(w[name] == 1.0 for w in watch.lora_weights) and pipe.loras[name] == 0.0
    assert result.settings.scheduler == "euler-trailing"


def test_presets_fetch_their_pinned_files(fast_pipe, tmp_path, monkeypatch):
    """Without a local copy, a call asks the Hub cache for the table's file (commit and sha256 checked there)."""
    import faceid.model_set as model_set_module

    asked = []
    path = _lora_file(fast_pipe, "tcd", tmp_path)

    def fake_fetch(file):
        asked.append(file)
        return path

    monkeypatch.setattr(model_set_module, "fetch", fake_fetch)
    fast_pipe("p", _face(), seed=1, fast="tcd", output_type="np", **SIZE)
    assert asked == [PRESETS["tcd"].loras["SD1.5"]]
    fast_pipe("p", _face(), seed=1, fast="tcd", output_type="np", **SIZE)
    assert len(asked) == 1  # loaded once


def test_every_preset_file_is_hash_pinned():
    for spec in PRESETS.values():
        for family, file in spec.loras.items():
            assert family in ("SD1.5", "SDXL")
            assert file.sha256 is not None and len(file.sha256) == 64, (spec.name, family)


def test_sampler_and_eta_checks(fast_pipe):
    with pytest.raises(FaceIDError, match="eta applies to the DDIM and TCD samplers only"):
        fast_pipe("p", _face(), scheduler="euler", eta=0.5, **SIZE)
    with pytest.raises(FaceIDError, match="scheduler"):
        GenerationSettings.parse({"scheduler": "no-such-sampler"})
    watch = _Watch(fast_pipe)
    with watch:
        fast_pipe("p", _face(), seed=0, scheduler="euler-trailing", num_inference_steps=2,
                  callback_on_step_end=watch.callback, **SIZE)  # fmt: skip
    assert watch.schedulers == ["EulerDiscreteScheduler"] * 2
    assert type(fast_pipe.pipe.scheduler).__name__ == "DDIMScheduler"


# ---------------------------------------------------------------------- guidance off, identity guidance
def test_guidance_off_runs_the_conditional_half_only(fast_pipe):
    watch = _Watch(fast_pipe)
    with watch:
        fast_pipe(["a", "b"], _face(2), seed=0, num_images_per_prompt=2, num_inference_steps=2,
                  guidance_scale=1.0, **SIZE)  # fmt: skip
    assert watch.batches == [4, 4]
    watch = _Watch(fast_pipe)
    with watch:
        fast_pipe(["a", "b"], _face(2), seed=0, num_images_per_prompt=2, num_inference_steps=2,
                  guidance_scale=3.0, **SIZE)  # fmt: skip
    assert watch.batches == [8, 8]


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_identity_guidance_zero_adds_nothing(fast_pipe, guidance):
    face, common = _face(), {"seed": 5, "num_inference_steps": 3, "guidance_scale": guidance, "output_type": "np"}
    watch = _Watch(fast_pipe)
    with watch:
        plain = fast_pipe("p", face, **common, **SIZE).images
    zero = _Watch(fast_pipe)
    with zero:
        off = fast_pipe("p", face, identity_guidance=0.0, **common, **SIZE).images
    np.testing.assert_array_equal(off, plain)
    assert zero.batches == watch.batches
    on = _Watch(fast_pipe)
    with on:
        guided = fast_pipe("p", face, identity_guidance=2.0, **common, **SIZE).images
    assert len(on.batches) == len(watch.batches)  # one UNet pass per step, still
    assert not np.allclose(guided, plain, atol=1e-4)


@pytest.mark.parametrize("cfg", [False, True])
def test_identity_guidance_formula(fast_pipe, cfg):
    """Through the call's guided view of the UNet, one batched UNet call gives what three separate calls combine to."""
    pipe, weight, g = fast_pipe, 1.5, 4.0
    unet = pipe.pipe.unet
    conditioning = pipe.encode(["a", "b"], _face(2))
    text = conditioning.pipe_kwargs
    b = 2
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(b, 4, 2, 3, generator=generator)
    t = torch.tensor(500)
    cond_ids = conditioning.identity_states(False)
    null_ids = conditioning.identity_states(False, unconditional=True)

    def unet_out(x, embeds, ids, model=unet):
        return model(x, t, encoder_hidden_states=embeds, cross_attention_kwargs={"ip_hidden_states": ids},
                     return_dict=False)[0]  # fmt: skip

    with torch.no_grad():
        c = unet_out(latents, text["prompt_embeds"], cond_ids)
        c_noid = unet_out(latents, text["prompt_embeds"], null_ids)
        if cfg:
            u = unet_out(latents, text["negative_prompt_embeds"], null_ids)
            x = torch.cat([latents, latents])
            embeds = torch.cat([text["negative_prompt_embeds"], text["prompt_embeds"]])
            ids = conditioning.identity_states(True)
        else:
            x, embeds, ids = latents, text["prompt_embeds"], cond_ids
        out = unet_out(x, embeds, ids, IdentityGuidedUNet(unet, weight, g, cfg, null_ids))
    if cfg:
        assert out.shape[0] == 2 * b
        torch.testing.assert_close(out[:b], u, atol=1e-5, rtol=1e-5)
        # what diffusers then does: u + g (c' - u) = u + g (c - u) + w (c - c_noid)
        combined = out[:b] + g * (out[b:] - out[:b])
        torch.testing.assert_close(combined, u + g * (c - u) + weight * (c - c_noid), atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(out, c + weight * (c - c_noid), atol=1e-5, rtol=1e-5)
    # the shared UNet itself is untouched
    with torch.no_grad():
        torch.testing.assert_close(unet_out(latents, text["prompt_embeds"], cond_ids), c)


def test_identity_guidance_on_sdxl(sdxl_fast_pipe):
    watch = _Watch(sdxl_fast_pipe)
    with watch:
        result = sdxl_fast_pipe("p", _face(), seed=1, num_inference_steps=2, guidance_scale=3.0,
                                identity_guidance=1.0, width=32, height=32, output_type="np")  # fmt: skip
    # One UNet batch of 3 per step: the unconditional entry, the image, and the image without its identity.
    assert watch.batches == [3, 3] and np.isfinite(result.images).all()
    assert result.settings.identity_guidance == 1.0


def test_cli_fast_preset_with_a_local_lora_file_reproduces_from_its_png(
    tmp_path, capsys, tiny_models, faces_dir, face_models_dir
):
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from faceid.cli import main
    from faceid.outputs import read_settings

    lora = tmp_path / "lcm.safetensors"
    unet = UNet2DConditionModel.from_pretrained(tiny_models.sd15 / "unet")
    save_file(few_step_lora_state(unet, FEW_STEP_LAYOUTS["lcm"]), str(lora))
    common = ["--face", str(faces_dir / "obama.jpg"), "--face-models", str(face_models_dir), "--base-model",
              str(tiny_models.sd15), "--adapter", str(tiny_models.adapter("faceid")), "--fast-lora", str(lora)]  # fmt: skip
    argv = ["generate", *common, "--prompt", "p", "--fast", "lcm", "--identity-guidance", "1.5", "-n", "1",
            "--seed", "3", "--width", "24", "--height", "16", "--out", str(tmp_path / "a")]  # fmt: skip
    assert main(argv) == 0
    first = tmp_path / "a" / "obama_s3.png"
    stored = read_settings(first)
    assert (stored["fast"], stored["scheduler"], stored["num_inference_steps"], stored["guidance_scale"]) == (
        "lcm", "lcm", 4, 1.0)  # fmt: skip
    assert stored["identity_guidance"] == 1.5
    assert main(["generate", *common, "--settings", str(first), "--out", str(tmp_path / "b")]) == 0
    again = tmp_path / "b" / "obama_s3.png"
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert main(["generate", *common, "--prompt", "p", "--out", str(tmp_path / "c")]) != 0
    assert "--fast-lora goes with --fast" in capsys.readouterr().err


# ---------------------------------------------------------------------- batches in parts
def test_a_batch_run_in_parts_gives_the_same_images(fast_pipe):
    faces, common = _face(2), {"num_images_per_prompt": 3, "num_inference_steps": 2, "output_type": "np", **SIZE}
    seeds = [11, 12, 13, 14, 15, 16]
    whole = fast_pipe(["a", "b"], faces, seed=seeds, **common)
    watch = _Watch(fast_pipe)
    with watch:
        parts = fast_pipe(["a", "b"], faces, seed=seeds, max_batch=4, **common)
    assert watch.batches == [8, 8, 4, 4]  # 4 images then 2, each with its unconditional half
    np.testing.assert_allclose(parts.images, whole.images, atol=1e-5)
    assert parts.settings == whole.settings and parts.images.shape == (6, 16, 24, 3)
    # One seed for the whole batch draws every image's noise from one stream: it runs whole.
    watch = _Watch(fast_pipe)
    with watch:
        fast_pipe(["a", "b"], faces, seed=7, max_batch=4, **common)
    assert watch.batches == [12, 12]
    with pytest.raises(FaceIDError, match="max_batch must be at least 1"):
        fast_pipe("a", faces[:1], seed=[1], max_batch=0, **SIZE)


def test_previews_of_a_batch_run_in_parts_keep_their_places(fast_pipe):
    seen = []
    fast_pipe(["a", "b"], _face(2), seed=[1, 2], num_inference_steps=2, max_batch=1, preview_every=1,
              on_preview=lambda step, total, images: seen.append((step, [im is not None for im in images])),
              **SIZE)  # fmt: skip
    assert seen == [(1, [True, False]), (2, [True, False]), (1, [False, True]), (2, [False, True])]
