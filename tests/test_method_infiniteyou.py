"""InfiniteYou (FLUX.1) against its authors' code: the golden folder ``infiniteyou/`` (FORMAT.md, "InfiniteYou").

Everything is read from the folder's manifest: the settings (prefix, InfuseNet scale, control image), the call
(steps, guidance, InfuseNet guidance, seed) and each array's atol. Checked: the identity tokens of every recorded
embedding; for every setting and step, InfuseNet's double/single-block residuals and the transformer's
noise prediction from the recorded step inputs (the recorded ``controlnet_cond``: the authors' VAE sample comes
from the global RNG); the final latents after the run's FlowMatchEuler steps, both by :func:`denoise_step` in a
loop over diffusers' scheduler and by a stock ``FluxControlNetPipeline`` with an :class:`InfuseNetCall`; the
control images; strict loading of the released layout.
"""

from __future__ import annotations

import json
import re
import shutil
import threading

import numpy as np
import pytest
import torch
from conftest import METHODS_GOLDEN_DIR

GOLDEN = METHODS_GOLDEN_DIR / "infiniteyou"
if not (GOLDEN / "manifest.json").is_file():
    pytest.skip(f"no InfiniteYou golden folder at {GOLDEN}", allow_module_level=True)

from faceid.errors import CheckpointError  # noqa: E402
from faceid.methods import infiniteyou  # noqa: E402
from faceid.methods.infiniteyou import InfiniteYou, InfuseNetCall, control_image, denoise_step, fit_photo  # noqa: E402

MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CALL = MANIFEST["call"]
SETTINGS = MANIFEST["settings"]
MODEL_SET = (GOLDEN / MANIFEST["checkpoints"]["image_proj"]).parent
BASE = (GOLDEN / MANIFEST["base_model"]).resolve()


def assert_close(name: str, actual: torch.Tensor | np.ndarray, expected: np.ndarray) -> None:
    actual = actual.detach().cpu().numpy() if torch.is_tensor(actual) else np.asarray(actual)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    atol = MANIFEST["arrays"][name]["atol"]
    diff = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())
    assert diff <= atol, f"{name}: max |diff| {diff:.3g} > atol {atol:.3g}"


def steps_of(prefix: str, expected) -> list[str]:
    return sorted(
        {m.group(0) for k in expected.files if (m := re.match(rf"{re.escape(prefix)}step\d+_", k))},
        key=lambda s: int(s[len(prefix) + 4 : -1]),
    )


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "inputs.npz"), np.load(GOLDEN / "expected.npz")


@pytest.fixture(scope="module")
def model():
    return InfiniteYou.from_pretrained(MODEL_SET)


@pytest.fixture(scope="module")
def base():
    from diffusers import FluxPipeline

    none = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    return FluxPipeline.from_pretrained(str(BASE), dtype=torch.float32, **none)


@pytest.fixture(scope="module")
def call_tokens(model, golden):
    inputs, _ = golden
    name = CALL["controlnet_prompt_embeds"]  # "id_tokens_a": the tokens of face_emb_a
    return model.identity_tokens(inputs[name.replace("id_tokens_", "face_emb_")])


def test_loaded_sizes_are_the_manifests(model):
    """The released layout: both files where the manifest says, the sizes read off the tensors are its sizes."""
    assert GOLDEN / MANIFEST["checkpoints"]["infusenet"] == MODEL_SET / infiniteyou.INFUSENET_FOLDER
    assert (GOLDEN / MANIFEST["checkpoints"]["image_proj"]).name == infiniteyou.IMAGE_PROJ_FILE
    sizes = MANIFEST["resampler_kwargs"]
    resampler = model.image_proj
    assert resampler.latents.shape[1:] == (sizes["num_queries"], sizes["dim"])
    assert len(resampler.layers) == sizes["depth"] and resampler.layers[0][0].heads == sizes["heads"]
    assert (
        resampler.proj_in.in_features == sizes["embedding_dim"]
        and resampler.proj_out.out_features == sizes["output_dim"]
    )
    infusenet = MANIFEST["infusenet_from_transformer_kwargs"]
    assert len(model.infusenet.transformer_blocks) == infusenet["num_layers"]
    assert len(model.infusenet.single_transformer_blocks) == infusenet["num_single_layers"]


def test_identity_tokens(model, golden):
    inputs, expected = golden
    names = [k for k in expected.files if k.startswith("id_tokens_")]
    assert names
    for name in names:
        assert_close(name, model.identity_tokens(inputs[name.replace("id_tokens_", "face_emb_")]), expected[name])
    assert model.image_proj.num_tokens == MANIFEST["resampler_kwargs"]["num_queries"]


def test_several_embeddings_are_one_identity(model, golden):
    """(faces, 512) is one person: the Resampler reads all of them (``reshape([1, -1, 512])``), one token set."""
    inputs, _ = golden
    a, b = inputs["face_emb_a"], inputs["face_emb_b"]
    both = model.identity_tokens(np.stack([a, b]))
    with torch.no_grad():
        reference = model.image_proj(torch.from_numpy(np.stack([a, b])).reshape(1, -1, 512))
    assert both.shape == (1, MANIFEST["resampler_kwargs"]["num_queries"], MANIFEST["resampler_kwargs"]["output_dim"])
    torch.testing.assert_close(both, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(both, model.identity_tokens(a), atol=1e-3)
    # A raw (unnormalised) embedding gives the tokens of the normalised one.
    torch.testing.assert_close(model.identity_tokens(a * 7.5), model.identity_tokens(a), atol=1e-5, rtol=0)


@pytest.mark.parametrize("setting", SETTINGS, ids=[s["prefix"] for s in SETTINGS])
def test_step_residuals_and_noise_pred(setting, model, base, golden, call_tokens):
    inputs, expected = golden
    prefix = setting["prefix"]
    steps = steps_of(prefix, expected)
    assert len(steps) == CALL["num_inference_steps"]
    for step in steps:
        recorded = {k[len(step) :]: torch.from_numpy(expected[k]) for k in expected.files if k.startswith(step)}
        assert_close(
            f"{step}controlnet_encoder_hidden_states", call_tokens, expected[f"{step}controlnet_encoder_hidden_states"]
        )
        with torch.no_grad():
            out = denoise_step(
                base.transformer,
                model.infusenet,
                hidden_states=recorded["hidden_states"],
                timestep=recorded["timestep"],
                guidance=recorded["guidance"],
                pooled_projections=torch.from_numpy(inputs["pooled_prompt_embeds"]),
                prompt_embeds=torch.from_numpy(inputs["prompt_embeds"]),
                txt_ids=recorded["txt_ids"],
                img_ids=recorded["img_ids"],
                id_tokens=call_tokens,
                controlnet_cond=recorded["controlnet_cond"],
                conditioning_scale=setting["infusenet_conditioning_scale"],
                infusenet_guidance=CALL["controlnet_guidance_scale"],
            )
        blocks = sorted(k for k in recorded if re.fullmatch(r"controlnet_block_\d+", k))
        singles = sorted(k for k in recorded if re.fullmatch(r"controlnet_single_block_\d+", k))
        assert len(out.block_samples) == len(blocks) and len(out.single_block_samples) == len(singles)
        for i, sample in enumerate(out.block_samples):
            assert_close(f"{step}controlnet_block_{i}", sample, expected[f"{step}controlnet_block_{i}"])
        for i, sample in enumerate(out.single_block_samples):
            assert_close(f"{step}controlnet_single_block_{i}", sample, expected[f"{step}controlnet_single_block_{i}"])
        assert_close(f"{step}noise_pred", out.noise_pred, expected[f"{step}noise_pred"])
        assert float(recorded["controlnet_guidance"][0]) == CALL["controlnet_guidance_scale"]
        assert not recorded["controlnet_txt_ids"].any() and len(recorded["controlnet_txt_ids"]) == call_tokens.shape[1]


def _scheduler(base):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)


@pytest.mark.parametrize("setting", SETTINGS, ids=[s["prefix"] for s in SETTINGS])
def test_final_latents_by_steps(setting, model, base, golden, call_tokens):
    """denoise_step over diffusers' FlowMatchEuler scheduler (FLUX-dev's shift settings, from the base model's
    scheduler config), timesteps and sigmas as FluxPipeline sets them, the recorded control latents."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    inputs, expected = golden
    prefix, steps = setting["prefix"], CALL["num_inference_steps"]
    latents = torch.from_numpy(inputs["latents"])
    scheduler, config = _scheduler(base), base.scheduler.config
    mu = calculate_shift(
        latents.shape[1], config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    vae_scale = 2 ** (len(base.vae.config.block_out_channels) - 1)
    img_ids = base._prepare_latent_image_ids(
        1, CALL["height"] // vae_scale // 2, CALL["width"] // vae_scale // 2, latents.device, latents.dtype
    )
    prompt_embeds = torch.from_numpy(inputs["prompt_embeds"])
    for i, t in enumerate(scheduler.timesteps):
        step = f"{prefix}step{i}_"
        timestep = (t / 1000).expand(1).to(latents.dtype)
        assert_close(f"{step}timestep", timestep, expected[f"{step}timestep"])
        assert_close(f"{step}img_ids", img_ids, expected[f"{step}img_ids"])
        with torch.no_grad():
            out = denoise_step(
                base.transformer,
                model.infusenet,
                hidden_states=latents,
                timestep=timestep,
                guidance=torch.full((1,), CALL["guidance_scale"]),
                pooled_projections=torch.from_numpy(inputs["pooled_prompt_embeds"]),
                prompt_embeds=prompt_embeds,
                txt_ids=torch.zeros(prompt_embeds.shape[1], 3),
                img_ids=img_ids,
                id_tokens=call_tokens,
                controlnet_cond=torch.from_numpy(expected[f"{step}controlnet_cond"]),
                conditioning_scale=setting["infusenet_conditioning_scale"],
            )
        latents = scheduler.step(out.noise_pred, t, latents, return_dict=False)[0]
    assert_close(f"{prefix}final_latents", latents, expected[f"{prefix}final_latents"])


@pytest.mark.parametrize("setting", SETTINGS, ids=[s["prefix"] for s in SETTINGS])
def test_stock_flux_controlnet_pipeline_with_infusenet_call(setting, model, base, golden, call_tokens):
    """diffusers' own FluxControlNetPipeline, unchanged, runs InfiniteYou with the call's InfuseNetCall. It encodes
    the control image itself: its VAE sample draws from torch's global generator after the seed, as the
    authors' does (on CPU)."""
    from diffusers import FluxControlNetPipeline
    from PIL import Image

    inputs, expected = golden
    call = model.controlnet(call_tokens, CALL["controlnet_guidance_scale"])
    pipe = FluxControlNetPipeline(**{**base.components, "controlnet": call, "scheduler": _scheduler(base)})
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(CALL["seed_everything"])
    latents = pipe(
        prompt_embeds=torch.from_numpy(inputs["prompt_embeds"]),
        pooled_prompt_embeds=torch.from_numpy(inputs["pooled_prompt_embeds"]),
        control_image=[Image.fromarray(inputs[f"control_image_{setting['control_image']}"])],
        controlnet_conditioning_scale=[setting["infusenet_conditioning_scale"]],
        guidance_scale=CALL["guidance_scale"],
        num_inference_steps=CALL["num_inference_steps"],
        control_guidance_start=CALL["control_guidance_start"],
        control_guidance_end=CALL["control_guidance_end"],
        height=CALL["height"],
        width=CALL["width"],
        latents=torch.from_numpy(inputs["latents"]),
        output_type="latent",
    ).images
    assert_close(f"{setting['prefix']}final_latents", latents, expected[f"{setting['prefix']}final_latents"])
    assert call.nets[0] is model.infusenet and not hasattr(model.infusenet, "id_tokens")


def test_infusenet_calls_in_threads_are_their_own(model, golden):
    """Two calls' InfuseNetCalls on the one loaded InfuseNet, four threads at once: each gets what it gets alone."""
    inputs, expected = golden
    step = steps_of(SETTINGS[0]["prefix"], expected)[0]
    recorded = {k[len(step) :]: torch.from_numpy(expected[k]) for k in expected.files if k.startswith(step)}
    tokens = [model.identity_tokens(inputs[k]) for k in ("face_emb_a", "face_emb_b")]

    def run(i: int) -> torch.Tensor:
        with torch.no_grad():
            blocks, _ = InfuseNetCall(model.infusenet, tokens[i % 2])(
                hidden_states=recorded["hidden_states"],
                controlnet_cond=[recorded["controlnet_cond"]],
                conditioning_scale=[1.0],
                encoder_hidden_states=torch.from_numpy(inputs["prompt_embeds"]),  # the prompt: not read
                pooled_projections=torch.from_numpy(inputs["pooled_prompt_embeds"]),
                timestep=recorded["timestep"],
                img_ids=recorded["img_ids"],
                txt_ids=torch.zeros(inputs["prompt_embeds"].shape[1], 3),
                guidance=torch.full((1,), 3.5),  # the transformer's: InfuseNet takes its own 1.0
            )
        return blocks[0]

    alone = [run(i) for i in range(4)]
    together: list[torch.Tensor | None] = [None] * 4

    def worker(i: int) -> None:
        together[i] = run(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))
    assert not torch.allclose(alone[0], alone[1], atol=1e-4)  # the tokens matter


def test_control_images(golden):
    inputs, _ = golden
    size = (CALL["width"], CALL["height"])
    assert np.array_equal(np.asarray(control_image(size, inputs["kps"])), inputs["control_image_kps"])
    assert np.array_equal(np.asarray(control_image(size)), inputs["control_image_black"])


def test_fit_photo_scales_to_the_frames_shorter_side():
    from PIL import Image

    wide = fit_photo(Image.new("RGB", (100, 50), (10, 20, 30)), (32, 48))  # portrait frame: width 32, 16 high
    pixels = np.asarray(wide)
    assert wide.size == (32, 48)
    assert (pixels[16:32] == (10, 20, 30)).all() and (pixels[:16] == 255).all() and (pixels[32:] == 255).all()
    tall = np.asarray(fit_photo(Image.new("RGB", (50, 100), (10, 20, 30)), (32, 32)))  # 32x64: cut off
    assert (tall == (10, 20, 30)).all()


def _copy_model_set(tmp_path):
    folder = tmp_path / MODEL_SET.name
    shutil.copytree(MODEL_SET, folder)
    return folder


@pytest.mark.parametrize("change", ["remove", "rename"])
def test_image_proj_loads_strictly(tmp_path, change):
    folder = _copy_model_set(tmp_path)
    path = folder / infiniteyou.IMAGE_PROJ_FILE
    state = torch.load(path, weights_only=True)
    key = sorted(k for k in state["image_proj"] if k.startswith("layers."))[-1]
    tensor = state["image_proj"].pop(key)
    if change == "rename":
        state["image_proj"][key.replace("layers.", "blocks.")] = tensor
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=re.escape(key)):
        InfiniteYou.from_pretrained(folder)
    torch.save({"image_proj": {**state["image_proj"], key: tensor}, "extra": {}}, path)
    with pytest.raises(CheckpointError, match="expected the groups 'image_proj'"):
        InfiniteYou.from_pretrained(folder)


@pytest.mark.parametrize("change", ["remove", "rename"])
def test_infusenet_loads_strictly(tmp_path, change):
    from safetensors.torch import load_file, save_file

    folder = _copy_model_set(tmp_path)
    weights = next((folder / infiniteyou.INFUSENET_FOLDER).glob("*.safetensors"))
    state = load_file(weights)
    key = sorted(k for k in state if k.startswith("controlnet_single_blocks."))[0]
    tensor = state.pop(key)
    if change == "rename":
        state[key.replace("controlnet_single_blocks.", "controlnet_extra_blocks.")] = tensor
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=re.escape(repr(key))):
        InfiniteYou.from_pretrained(folder)
