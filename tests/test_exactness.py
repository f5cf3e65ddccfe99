"""Exact under every setting: nothing cached outlives what it was computed from, a call leaves the user's
adapter state as it found it, and a call refuses to run when the adapter was silently taken out.

The reference for every windowed call is the same call computed step by step without the per-call
key/value cache (``KeyValueCache.get`` computing every time), which is what the cache must reproduce.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet
from safetensors.torch import save_file

from faceid.adapter import FaceIDAdapter, initial_state_dict
from faceid.attention import CallTokens, KeyValueCache, TokenGroup
from faceid.errors import FaceIDError
from faceid.pipeline import FaceIDPipeline

# Windows that start late, end early and sit in the middle (6 steps: each switches the adapter mid-call).
WINDOWS = [(0.5, 1.0), (0.0, 0.5), (0.34, 0.67)]
STEPS = 6


@contextlib.contextmanager
def _no_cache(monkeypatch):
    """Every key/value computed at every step: the plain step-by-step computation."""
    with monkeypatch.context() as patch:
        patch.setattr(KeyValueCache, "get", lambda self, slot, source, modules, compute: compute(source))
        yield


def _embeddings(n, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _latents(pipe, face, window, size, **kwargs):
    return pipe(
        "a portrait", face, seed=5, identity_window=window, num_inference_steps=STEPS, output_type="latent",
        **size, **kwargs,
    ).images  # fmt: skip


@pytest.fixture(scope="module")
def sd15_pipe(tiny_models):
    return FaceIDPipeline.from_pretrained(tiny_models.sd15, tiny_models.adapter("faceid"), device="cpu", progress=False)


@pytest.fixture(scope="module")
def plusv2_pipe(tiny_models):
    return FaceIDPipeline.from_pretrained(
        tiny_models.sd15,
        tiny_models.adapter("faceid-plusv2"),
        image_encoder=tiny_models.image_encoder,
        device="cpu",
        progress=False,
    )


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_models):
    return FaceIDPipeline.from_pretrained(
        tiny_models.sdxl, tiny_models.adapter("faceid-sdxl"), device="cpu", progress=False
    )


def _crop(seed=0):
    return np.random.default_rng(seed).integers(0, 255, (224, 224, 3), dtype=np.uint8)


CASES = {
    "faceid": ("sd15_pipe", {}, {"width": 24, "height": 16}),
    "plusv2": ("plusv2_pipe", {"face_image": _crop()}, {"width": 24, "height": 16}),
    "sdxl": ("sdxl_pipe", {}, {"width": 32, "height": 32}),
}


@pytest.mark.parametrize("window", WINDOWS, ids=["late", "early", "middle"])
@pytest.mark.parametrize("variant", list(CASES))
def test_identity_window_equals_the_uncached_step_by_step_computation(variant, window, request, monkeypatch):
    fixture, extra, size = CASES[variant]
    pipe = request.getfixturevalue(fixture)
    assert pipe.adapter.spec.lora_rank, "the windows matter most where a LoRA sits on to_k/to_v"
    face = _embeddings(1)
    cached = _latents(pipe, face, window, size, **extra)
    with _no_cache(monkeypatch):
        reference = _latents(pipe, face, window, size, **extra)
        always = _latents(pipe, face, None, size, **extra)
    torch.testing.assert_close(cached, reference, atol=1e-6, rtol=0)
    assert (reference - always).abs().max() > 1e-4  # the window really changed the computation


def _user_lora(unet, path, seed=7, rank=4):
    """A kohya LoRA on every cross-attention to_k/to_v (what the cached text keys/values go through)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, base.in_features, generator=generator) * 0.3
            state[f"{key}.lora_up.weight"] = torch.randn(base.out_features, rank, generator=generator) * 0.3
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


def test_user_lora_weight_changed_between_calls_with_a_window(sd15_pipe, tmp_path, monkeypatch):
    pipe, size, window = sd15_pipe, {"width": 24, "height": 16}, (0.34, 0.67)
    name = pipe.load_lora(_user_lora(pipe.pipe.unet, tmp_path / "style.safetensors"), weight=1.0)
    try:
        face = _embeddings(1)
        results = []
        for weight in (1.0, 0.25):
            pipe.set_lora_weight(name, weight)
            cached = _latents(pipe, face, window, size)
            with _no_cache(monkeypatch):
                reference = _latents(pipe, face, window, size)
            torch.testing.assert_close(cached, reference, atol=1e-6, rtol=0)
            results.append(cached)
        assert (results[0] - results[1]).abs().max() > 1e-4  # the weight change reached the images
    finally:
        pipe.remove_lora(name)


# ---------------------------------------------------------------------- the cache on a bare UNet
def _adapter(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = initial_state_dict(unet, lora_rank=4, generator=generator)
    for key, tensor in state["ip_adapter"].items():
        if key.endswith("up.weight"):
            state["ip_adapter"][key] = torch.randn(tensor.shape, generator=generator) * 0.5
    return FaceIDAdapter.install(unet, state)


def _set_lora_scale(adapter, inputs):
    adapter.set_lora_scale(0.3)


def _switch_off(adapter, inputs):
    adapter.set_active(False)


def _fuse(adapter, inputs):
    adapter.fuse_lora()


def _edit_weight_in_place(adapter, inputs):
    layer = adapter.unet.get_submodule(next(iter(adapter.processors)) + ".to_k")
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(1.5)


def _replace_weight(adapter, inputs):
    layer = adapter.unet.get_submodule(next(iter(adapter.processors)) + ".to_v").get_base_layer()
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 0.5)


def _edit_text_in_place(adapter, inputs):
    inputs["encoder_hidden_states"].mul_(0.5)


def _edit_identity_in_place(adapter, inputs):
    inputs["cross_attention_kwargs"]["ip_hidden_states"].mul_(0.5)


def _edit_ip_projection(adapter, inputs):
    with torch.no_grad():
        next(iter(adapter.branches.values())).to_k_ip.weight.mul_(2.0)


MUTATIONS = [
    _set_lora_scale,
    _switch_off,
    _fuse,
    _edit_weight_in_place,
    _replace_weight,
    _edit_text_in_place,
    _edit_identity_in_place,
    _edit_ip_projection,
]


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda f: f.__name__.strip("_"))
@torch.no_grad()
def test_cached_keys_values_never_outlive_what_they_depend_on(mutate):
    unet = make_tiny_unet()
    adapter = _adapter(unet)
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, 8, 64, generator=generator),
        "cross_attention_kwargs": {"ip_hidden_states": torch.randn(2, 4, 64, generator=generator)},
    }

    def run(call):  # the identity as a call's group, with the call's key/value cache
        attention = {"ip_hidden_states": call}
        return unet(**{**inputs, "cross_attention_kwargs": attention}).sample

    def group():
        return TokenGroup(inputs["cross_attention_kwargs"]["ip_hidden_states"], adapter.name, adapter.scale)

    call = CallTokens([group()])  # one call: the same object at every step
    before = run(call)
    mutate(adapter, inputs)
    cached = run(call)
    uncached = run(CallTokens([group()]))  # the same state, computed afresh by a new call
    assert torch.equal(cached, uncached)
    assert not torch.equal(before, uncached)  # the mutation changed what the UNet computes


# ---------------------------------------------------------------------- the user's state survives a call
def test_a_call_leaves_the_users_adapter_state_as_it_was(sd15_pipe):
    pipe, size = sd15_pipe, {"width": 24, "height": 16, "num_inference_steps": 3, "output_type": "latent"}
    face = _embeddings(1)
    with_adapter = pipe("p", face, seed=1, **size).images
    pipe.adapter.set_active(False)
    try:
        off = pipe("p", face, seed=1, **size).images
        assert not pipe.adapter.active  # still off, as the user left it
        windowed = pipe("p", face, seed=1, identity_window=(0.0, 0.5), **size).images
        assert not pipe.adapter.active
        torch.testing.assert_close(windowed, off, atol=0, rtol=0)  # a window does not switch it back on
        pipe.adapter.set_scale(0.5)
        seen = []

        def look(pipeline, step, timestep, kwargs):  # what another thread would read during the call
            seen.append((pipe.adapter.scale, pipe.adapter.lora_scale, pipe.resolve_settings().scale))
            return kwargs

        pipe("p", face, seed=1, scale=0.9, lora_scale=0.2, callback_on_step_end=look, **size)
        assert seen == [(0.5, 1.0, 0.5)] * 3  # the user's values, never the call's
        assert pipe.adapter.scale == 0.5 and not pipe.adapter.active
    finally:
        pipe.adapter.set_active(True)
        pipe.adapter.set_scale(1.0)
    assert not torch.equal(with_adapter, off)
    torch.testing.assert_close(pipe("p", face, seed=1, **size).images, with_adapter, atol=0, rtol=0)


# ---------------------------------------------------------------------- replaced processors
@pytest.mark.parametrize("replace", ["processors", "lora"])
def test_a_call_refuses_when_other_code_took_the_adapter_out(sd15_pipe, replace):
    pipe, size = sd15_pipe, {"width": 24, "height": 16, "num_inference_steps": 2, "output_type": "latent"}
    face = _embeddings(1)
    expected = pipe("p", face, seed=1, **size).images
    unet = pipe.pipe.unet
    if replace == "processors":
        from diffusers.models.attention_processor import AttnProcessor2_0

        # What enable_xformers_memory_efficient_attention, load_ip_adapter and the like do to every layer.
        unet.set_attn_processor(AttnProcessor2_0())
        with pytest.raises(FaceIDError, match=r"no longer acts on .*reattach\(\)"):
            pipe("p", face, seed=1, **size)
        pipe.adapter.reattach()
        torch.testing.assert_close(pipe("p", face, seed=1, **size).images, expected, atol=0, rtol=0)
    else:
        # Taking the identity LoRA off its layers cannot be undone in place: the error says to reload.
        path = pipe.adapter._lora_layers[0]
        layer = unet.get_submodule(path)
        saved = layer.lora_A.pop(pipe.adapter.name)
        try:
            with pytest.raises(FaceIDError, match="load the pipeline again"):
                pipe("p", face, seed=1, **size)
        finally:
            layer.lora_A[pipe.adapter.name] = saved
        torch.testing.assert_close(pipe("p", face, seed=1, **size).images, expected, atol=0, rtol=0)
