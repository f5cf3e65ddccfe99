"""InstantID (``faceid.methods.instantid``) against its authors' code, run on tiny random-weight models with the
released file layout (the ``instantid/`` folder of the methods' golden set, ``FORMAT.md`` there).

Everything is read from the folder's ``manifest.json``: the settings (prefix, IP scale, ControlNet scale), the
call, the checkpoints and every array's tolerance. Checked: the identity tokens (one embedding, another, both of
one person together); for every setting and step, IdentityNet's residuals and the UNet's noise prediction from
the recorded inputs, with CFG (the two-row batch) and without (the conditional row alone, which must give row 1
of the CFG expectations); the final latents of the recorded call run by a stock diffusers
``StableDiffusionXLControlNetPipeline`` with the per-call ``IdentityNetControl`` and token group; the keypoint
image faceid draws; strict loading; calls from two threads; ``remove``.
"""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from conftest import METHODS_GOLDEN_DIR
from PIL import Image

FOLDER = METHODS_GOLDEN_DIR / "instantid"
if not (FOLDER / "manifest.json").is_file():
    pytest.skip(f"no InstantID golden folder at {FOLDER}", allow_module_level=True)

from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402

from faceid.attention import FaceIDAttnProcessor  # noqa: E402
from faceid.control import make_control_image  # noqa: E402
from faceid.errors import CheckpointError, FaceIDError  # noqa: E402
from faceid.methods.instantid import IdentityNetControl, InstantID  # noqa: E402

MANIFEST = json.loads((FOLDER / "manifest.json").read_text())
SETTINGS = MANIFEST["settings"]
CALL = MANIFEST["call"]
STEPS = range(CALL["num_inference_steps"])
IP_ADAPTER = FOLDER / MANIFEST["checkpoints"]["ip_adapter"]
IDENTITYNET = FOLDER / MANIFEST["checkpoints"]["controlnet"]
BASE = (FOLDER / MANIFEST["base_model"]).resolve()
TOKEN_ARRAYS = sorted(name for name in MANIFEST["arrays"] if name.startswith("id_tokens_"))
SETTING_STEPS = [(s, n) for s in SETTINGS for n in STEPS]


def _ids(value):
    return f"{value[0]['prefix']}step{value[1]}" if isinstance(value, tuple) else value.get("prefix")


@pytest.fixture(scope="module")
def inputs():
    return dict(np.load(FOLDER / "inputs.npz"))


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FOLDER / "expected.npz"))


@pytest.fixture(scope="module")
def base():
    return StableDiffusionXLPipeline.from_pretrained(str(BASE), torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def instantid(base):
    return InstantID.load(base.unet, IP_ADAPTER, IDENTITYNET)


def assert_close(name: str, actual: torch.Tensor, expected: np.ndarray) -> float:
    """``max|actual - expected| <= atol`` of the manifest's entry for ``name``; returns the difference."""
    actual = actual.detach().float().cpu().numpy()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape}, expected {expected.shape}"
    diff = float(np.abs(actual - expected).max())
    atol = MANIFEST["arrays"][name]["atol"]
    assert diff <= atol, f"{name}: max |difference| {diff:.3g} > atol {atol:.3g}"
    return diff


def embeddings(inputs, suffix: str) -> np.ndarray:
    """The embeddings behind ``id_tokens_<suffix>``: ``a`` is ``face_emb_a``; ``ab_joint`` is a and b together,
    one person (FORMAT.md)."""
    letters = suffix.removesuffix("_joint")
    if letters == suffix:
        return inputs[f"face_emb_{suffix}"]
    return np.stack([inputs[f"face_emb_{letter}"] for letter in letters])


@pytest.mark.parametrize("name", TOKEN_ARRAYS)
def test_identity_tokens_are_the_authors_rows_uncond_then_cond(instantid, inputs, expected, name):
    tokens = instantid.identity_tokens(embeddings(inputs, name.removeprefix("id_tokens_")))
    assert_close(name, tokens.batch(1, classifier_free_guidance=True), expected[name])
    # without CFG the conditional row alone, the same numbers
    assert_close(name, tokens.batch(1, classifier_free_guidance=False), expected[name][1:])


def test_several_embeddings_are_one_identity_not_a_batch(instantid, inputs):
    joint = instantid.identity_tokens(np.stack([inputs["face_emb_a"], inputs["face_emb_b"]]))
    alone = instantid.identity_tokens(inputs["face_emb_a"])
    assert joint.cond.shape == alone.cond.shape  # one identity of num_tokens tokens
    assert not torch.equal(joint.cond, alone.cond)
    # the unconditional tokens are the Resampler's output for zeros of the same shape, so they differ too
    assert not torch.equal(joint.uncond, alone.uncond) and alone.uncond.abs().max() > 0.1


def recorded_step(expected, prefix: str, step: int, rows: slice):
    """The recorded inputs of one step of setting ``prefix``, rows ``rows`` of its CFG batch."""

    def get(key):
        return torch.from_numpy(expected[f"{prefix}step{step}_{key}"])

    identity = get("controlnet_encoder_hidden_states")[rows]
    context = get("encoder_hidden_states")[rows]
    # The authors' UNet context is [text ; identity tokens]; faceid passes them apart.
    text, tokens_in_context = context[:, : -identity.shape[1]], context[:, -identity.shape[1] :]
    torch.testing.assert_close(tokens_in_context, identity, rtol=0, atol=0)
    return {
        "sample": get("unet_sample")[rows],
        "timestep": get("timestep"),
        "text_context": text,
        "identity_context": identity,
        "control_image": get("controlnet_cond")[rows],
        "added_cond_kwargs": {"text_embeds": get("text_embeds")[rows], "time_ids": get("time_ids")[rows]},
    }


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "cond-only"])
@pytest.mark.parametrize("setting_step", SETTING_STEPS, ids=_ids)
def test_one_denoiser_step_equals_the_authors(instantid, expected, setting_step, cfg):
    setting, step = setting_step
    prefix = setting["prefix"]
    rows = slice(None) if cfg else slice(1, None)  # CFG order [uncond, cond]
    out = instantid.step(
        **recorded_step(expected, prefix, step, rows),
        ip_scale=setting["ip_adapter_scale"],
        conditioning_scale=setting["controlnet_conditioning_scale"],
    )
    names = sorted(n for n in MANIFEST["arrays"] if n.startswith(f"{prefix}step{step}_controlnet_down_"))
    assert len(out.down_residuals) == len(names)
    for index, residual in enumerate(out.down_residuals):
        name = f"{prefix}step{step}_controlnet_down_{index}"
        assert_close(name, residual, expected[name][rows])
    assert_close(
        f"{prefix}step{step}_controlnet_mid", out.mid_residual, expected[f"{prefix}step{step}_controlnet_mid"][rows]
    )
    assert_close(f"{prefix}step{step}_noise_pred", out.noise_pred, expected[f"{prefix}step{step}_noise_pred"][rows])


def test_the_recorded_call_identity_is_the_tokens_of_its_embedding(instantid, inputs, expected):
    tokens = instantid.identity_tokens(inputs[CALL["image_embeds"]]).batch(1, True)
    for setting, step in SETTING_STEPS:
        name = f"{setting['prefix']}step{step}_controlnet_encoder_hidden_states"
        assert_close(name, tokens, expected[name])


class _KpsFace:
    def __init__(self, landmarks):
        self.landmarks = landmarks


class _KpsAnalyzer:
    """Stands in for the face analysis: the recorded keypoints are the face's landmarks."""

    def __init__(self, kps):
        self.kps = kps

    def analyze(self, photo):
        return [_KpsFace(self.kps)]


def kps_image(inputs) -> Image.Image:
    """faceid's kps control image of the recorded keypoints, on a black photo of the recorded image's size."""
    height, width = inputs["kps_image"].shape[:2]
    return make_control_image("kps", Image.new("RGB", (width, height)), analyzer=_KpsAnalyzer(inputs["kps"]))


def test_faceid_draws_the_keypoints_as_the_authors_draw_kps(inputs):
    drawn = np.asarray(kps_image(inputs))
    assert drawn.any()
    np.testing.assert_array_equal(drawn, inputs["kps_image"])


def test_a_stock_diffusers_controlnet_pipeline_runs_the_recorded_calls(base, instantid, inputs, expected):
    """The call through diffusers' own ``StableDiffusionXLControlNetPipeline`` (no fork): IdentityNet per call as
    its ``controlnet``, the identity through ``cross_attention_kwargs``; every step's IdentityNet inputs and noise
    prediction, and the final latents."""
    tokens = instantid.identity_tokens(inputs[CALL["image_embeds"]])
    context = tokens.batch(CALL["num_images_per_prompt"], classifier_free_guidance=CALL["guidance_scale"] > 1)
    seen: dict[str, list] = {"controlnet": [], "unet": []}

    def on_identitynet(module, args, kwargs):
        seen["controlnet"].append({k: kwargs[k] for k in ("sample", "encoder_hidden_states", "controlnet_cond")})

    def on_unet(module, args, kwargs, output):
        seen["unet"].append(output[0])

    hooks = [
        instantid.identitynet.register_forward_pre_hook(on_identitynet, with_kwargs=True),
        base.unet.register_forward_hook(on_unet, with_kwargs=True),
    ]
    try:
        for setting in SETTINGS:
            seen["controlnet"].clear()
            seen["unet"].clear()
            pipe = StableDiffusionXLControlNetPipeline(**base.components, controlnet=instantid.control(context))
            pipe.set_progress_bar_config(disable=True)
            result = pipe(
                prompt_embeds=torch.from_numpy(inputs["prompt_embeds"]),
                negative_prompt_embeds=torch.from_numpy(inputs["negative_prompt_embeds"]),
                pooled_prompt_embeds=torch.from_numpy(inputs["pooled_prompt_embeds"]),
                negative_pooled_prompt_embeds=torch.from_numpy(inputs["negative_pooled_prompt_embeds"]),
                image=[kps_image(inputs)],
                height=CALL["height"],
                width=CALL["width"],
                num_inference_steps=CALL["num_inference_steps"],
                guidance_scale=CALL["guidance_scale"],
                latents=torch.from_numpy(inputs["latents"]),
                controlnet_conditioning_scale=setting["controlnet_conditioning_scale"],
                control_guidance_start=CALL["control_guidance_start"],
                control_guidance_end=CALL["control_guidance_end"],
                guess_mode=CALL["guess_mode"],
                cross_attention_kwargs={
                    "ip_hidden_states": [instantid.token_group(context, setting["ip_adapter_scale"])]
                },
                output_type="latent",
            )
            prefix = setting["prefix"]
            assert len(seen["controlnet"]) == len(seen["unet"]) == len(STEPS)
            for step in STEPS:
                recorded = seen["controlnet"][step]
                for key in ("sample", "encoder_hidden_states", "controlnet_cond"):
                    name = f"{prefix}step{step}_controlnet_{key.removeprefix('controlnet_')}"
                    assert_close(name, recorded[key], expected[name])
                assert_close(
                    f"{prefix}step{step}_noise_pred", seen["unet"][step], expected[f"{prefix}step{step}_noise_pred"]
                )
            assert_close(f"{prefix}final_latents", result.images, expected[f"{prefix}final_latents"])
    finally:
        for hook in hooks:
            hook.remove()


def test_calls_from_two_threads_get_what_each_gets_alone(instantid, expected):
    step = STEPS[-1]

    def run(setting):
        return instantid.step(
            **recorded_step(expected, setting["prefix"], step, slice(None)),
            ip_scale=setting["ip_adapter_scale"],
            conditioning_scale=setting["controlnet_conditioning_scale"],
        ).noise_pred

    alone = [run(s) for s in SETTINGS]
    together: list = [None] * len(SETTINGS)
    barrier = threading.Barrier(len(SETTINGS))

    def worker(i):
        barrier.wait()
        together[i] = run(SETTINGS[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(SETTINGS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(alone[0], alone[-1])  # the settings do differ


def test_identitynet_control_refuses_tokens_for_another_batch(instantid, inputs, expected):
    context = instantid.identity_tokens(inputs["face_emb_a"]).batch(1, True)
    control = instantid.control(context)
    assert isinstance(control, IdentityNetControl)
    args = recorded_step(expected, SETTINGS[0]["prefix"], 0, slice(None))
    three = torch.cat([args["sample"], args["sample"][:1]])
    with pytest.raises(FaceIDError, match="IdentityTokens.batch"):
        control(three, args["timestep"], None, [args["control_image"]], [1.0], added_cond_kwargs={})


def test_embeddings_of_another_width_are_refused(instantid):
    with pytest.raises(FaceIDError, match=f"{instantid.embedding_dim}-d face embeddings"):
        instantid.identity_tokens(np.zeros(instantid.embedding_dim + 1, np.float32))


# ---------------------------------------------------------------------------------------------- strict loading


def _edited_ip_adapter(tmp_path, group: str, edit: str) -> tuple:
    state = torch.load(IP_ADAPTER, map_location="cpu", weights_only=True)
    keys = sorted(state[group])
    key = keys[-1]
    if edit == "remove":
        del state[group][key]
    else:
        state[group][key.replace("weight", "weigth")] = state[group].pop(key)
    path = tmp_path / IP_ADAPTER.name
    torch.save(state, path)
    return path, key


@pytest.mark.parametrize("edit", ["remove", "rename"])
@pytest.mark.parametrize("group", ["image_proj", "ip_adapter"])
def test_ip_adapter_loads_strictly_and_names_the_key(tmp_path, group, edit):
    path, key = _edited_ip_adapter(tmp_path, group, edit)
    unet = UNet2DConditionModel.from_pretrained(str(BASE), subfolder="unet")
    before = dict(unet.attn_processors)
    with pytest.raises(CheckpointError) as caught:
        InstantID.load(unet, path, IDENTITYNET)
    # the key that is missing, or the one that is not expected
    assert key in str(caught.value) or key.replace("weight", "weigth") in str(caught.value)
    assert "standard IP-Adapter" not in str(caught.value)  # it says what was expected: InstantID's file
    assert unet.attn_processors == before  # nothing installed


def test_a_file_that_is_not_instantids_says_so(tmp_path):
    state = torch.load(IP_ADAPTER, map_location="cpu", weights_only=True)
    state["image_proj"] = {"proj.0.weight": torch.zeros(4, 4)}  # an IP-Adapter-FaceID projection
    torch.save(state, tmp_path / "other.bin")
    unet = UNet2DConditionModel.from_pretrained(str(BASE), subfolder="unet")
    with pytest.raises(CheckpointError, match=r"other.bin is not InstantID's ip-adapter.bin \(InstantX/InstantID\)"):
        InstantID.load(unet, tmp_path / "other.bin", IDENTITYNET)


def test_identitynet_loads_strictly_and_names_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / IDENTITYNET.name
    shutil.copytree(IDENTITYNET, folder)
    weights = next(folder.glob("*.safetensors"))
    tensors = load_file(str(weights))
    key = sorted(tensors)[len(tensors) // 2]
    del tensors[key]
    weights.chmod(0o644)
    save_file(tensors, str(weights))
    unet = UNet2DConditionModel.from_pretrained(str(BASE), subfolder="unet")
    with pytest.raises(CheckpointError, match=f"missing keys '{key}'"):
        InstantID.load(unet, IP_ADAPTER, folder)
    with pytest.raises(CheckpointError, match="IdentityNet not found"):
        InstantID.load(unet, IP_ADAPTER, tmp_path / "nowhere")


def test_remove_puts_the_unet_back():
    unet = UNet2DConditionModel.from_pretrained(str(BASE), subfolder="unet")
    before = dict(unet.attn_processors)
    loaded = InstantID.load(unet, IP_ADAPTER, IDENTITYNET)
    cross = [k for k, p in unet.attn_processors.items() if isinstance(p, FaceIDAttnProcessor)]
    assert len(cross) == len(loaded.branches) == len(MANIFEST["attn_processor_names_in_ip_adapter_key_order"]) // 2
    assert all(k.endswith("attn2.processor") for k in cross)
    # a second adapter next to it joins the same processors, and goes again alone
    second = InstantID.load(unet, IP_ADAPTER, loaded.identitynet, name="instantid-2")
    assert all(set(unet.attn_processors[k].branches) == {"instantid", "instantid-2"} for k in cross)
    second.remove()
    assert all(set(unet.attn_processors[k].branches) == {"instantid"} for k in cross)
    loaded.remove()
    assert unet.attn_processors == before
