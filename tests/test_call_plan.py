"""One call, one plan: what a call decides is data, and what it changes belongs to it alone.

* windows (identity, ControlNet) act in the steps whose place in the full schedule is inside them, also in
  img2img and inpainting, where strength cuts the schedule;
* calls from several threads on one pipeline give exactly what each gives alone;
* identity guidance keeps no step's UNet inputs past that step;
* a fused identity LoRA with an identity window is refused before any work;
* a per-sample scale whose window opens and shuts asks the device nothing;
* the plan itself (``StepSchedule``) against diffusers' own cut of the schedule.
"""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from test_modes import _face, _mask, _picture
from tiny_models import make_controlnet, unet_inputs

from faceid.adapter import FaceIDAdapter
from faceid.attention import TokenGroup
from faceid.errors import FaceIDError
from faceid.modes import ControlInput
from faceid.peft_adapters import adapter_weights
from faceid.pipeline import FaceIDPipeline
from faceid.plan import StepSchedule

SIZE = {"width": 24, "height": 16}
STEPS = 10


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return FaceIDPipeline.from_pretrained(tiny_models.sd15, tiny_models.adapter("faceid"), device="cpu", progress=False)


@pytest.fixture(scope="module")
def controlnet(tiny_models):
    return make_controlnet(tiny_models.sd15, 3)


def _mode(mode: str) -> dict:
    inputs = {"init_image": _picture(1)}
    if mode == "inpaint":
        inputs["mask_image"] = _mask()
    return inputs


def _acting_steps(pipe, **call) -> tuple[list[int], np.ndarray]:
    """The steps (of those that run) in which the identity acts, read off the identity LoRA's weight on the UNet
    at each UNet call, and the call's images."""
    weights = []

    def look(module, args, kwargs):
        weights.append(adapter_weights(pipe.pipe.unet)[pipe.adapter.name])

    handle = pipe.pipe.unet.register_forward_pre_hook(look, with_kwargs=True)
    try:
        images = pipe("a portrait", _face(), seed=3, num_inference_steps=STEPS, output_type="np", **SIZE, **call).images
    finally:
        handle.remove()
    return [i for i, w in enumerate(weights) if w != 0], images


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
@pytest.mark.parametrize("strength", [1.0, 0.8, 0.5])
def test_windows_sit_on_the_full_schedule_in_img2img_and_inpainting(pipe, mode, strength):
    schedule = StepSchedule.cut(STEPS, strength)
    running = int(STEPS * strength)
    assert schedule.running == running and schedule.positions[0] == (STEPS - running) / STEPS
    for window in [(0.5, 1.0), (0.0, 0.5), (0.25, 0.75)]:
        acting, _ = _acting_steps(pipe, identity_window=window, strength=strength, **_mode(mode))
        expected = [i for i, p in enumerate(schedule.positions) if window[0] <= p < window[1]]
        assert acting == expected, (window, acting, expected)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_a_window_covering_the_run_is_no_window_and_one_outside_it_is_the_adapter_off(pipe, mode):
    call = {"strength": 0.5, **_mode(mode)}  # 10 steps at 0.5: the run is positions 0.5 ... 0.9
    whole, plain = _acting_steps(pipe, **call)
    covering, inside = _acting_steps(pipe, identity_window=(0.5, 1.0), **call)
    assert whole == covering == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(inside, plain)  # (0.5, 1) at strength 0.5: every step that runs
    pipe.adapter.set_active(False)
    try:
        _, off = _acting_steps(pipe, **call)
    finally:
        pipe.adapter.set_active(True)
    acting, outside = _acting_steps(pipe, identity_window=(0.0, 0.5), **call)
    assert acting == []
    np.testing.assert_array_equal(outside, off)  # (0, 0.5): no step that runs, bit for bit the adapter off
    assert not np.array_equal(off, plain)


def test_controlnet_windows_sit_on_the_full_schedule(pipe, controlnet):
    """diffusers' rule for a ControlNet's window (step j of N acts when j/N >= start and (j+1)/N <= end), on the
    full schedule: at strength 0.5 of 10 steps, (0.5, 1) acts in all 5 steps that run and (0, 0.5) in none."""
    scales = []

    def look(module, args, kwargs):
        scales.append(float(kwargs["conditioning_scale"]))

    handle = controlnet.register_forward_pre_hook(look, with_kwargs=True)
    try:
        for window, expected in [((0.5, 1.0), [0, 1, 2, 3, 4]), ((0.0, 0.5), []), ((0.6, 0.8), [1, 2])]:
            scales.clear()
            control = ControlInput(_picture(2), controlnet, 0.7, window=window)
            pipe("a portrait", _face(), seed=3, num_inference_steps=STEPS, strength=0.5, init_image=_picture(1),
                 control=control, output_type="np", **SIZE)  # fmt: skip
            assert len(scales) == 5 and [i for i, s in enumerate(scales) if s != 0] == expected, (window, scales)
            assert all(s in (0.0, 0.7) for s in scales)
        # Text to image: the window's own steps, as diffusers reads it.
        scales.clear()
        control = ControlInput(_picture(2), controlnet, 0.7, window=(0.2, 0.65))
        pipe("a portrait", _face(), seed=3, num_inference_steps=STEPS, control=control, output_type="np", **SIZE)
        assert [i for i, s in enumerate(scales) if s != 0] == [2, 3, 4, 5]
    finally:
        handle.remove()


def test_step_schedule_is_diffusers_cut(pipe):
    """The plan's positions are those of the timesteps diffusers' img2img pipeline runs."""
    img2img = pipe.pipeline_for("StableDiffusionImg2ImgPipeline")
    for steps, strength in [(10, 1.0), (10, 0.8), (10, 0.5), (7, 0.3), (30, 0.75)]:
        scheduler = type(pipe.pipe.scheduler).from_config(pipe.pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        full = list(scheduler.timesteps)
        call = pipe.call_pipeline("StableDiffusionImg2ImgPipeline", scheduler=scheduler)
        assert call is not img2img and img2img.scheduler is pipe.pipe.scheduler
        run, _ = call.get_timesteps(steps, strength, "cpu")
        schedule = StepSchedule.cut(steps, strength)
        assert [full.index(t) / steps for t in run] == list(schedule.positions)


# ---------------------------------------------------------------------- several threads, one pipeline
CALLS = [
    {"seed": 11, "num_inference_steps": 4},
    {"seed": 12, "num_inference_steps": 5, "scale": 0.5, "identity_window": (0.0, 0.5)},
    {"seed": 13, "num_inference_steps": 3, "scale": 0.8, "lora_scale": 0.4},
    {"seed": 14, "num_inference_steps": 6, "identity_window": (0.3, 1.0), "identity_guidance": 1.0},
]


def _together(call, arguments: list) -> list:
    """``call(a)`` for every ``a`` of ``arguments``, each on its own thread, all let go at once."""
    start = threading.Barrier(len(arguments))

    def one(argument):
        start.wait()
        return call(argument)

    with ThreadPoolExecutor(len(arguments)) as pool:
        return list(pool.map(one, arguments, timeout=300))


def test_calls_from_four_threads_give_what_each_gives_alone(pipe):
    def call(settings):
        return pipe("a portrait", _face(seed=settings["seed"]), output_type="np", **SIZE, **settings).images

    alone = [call(settings) for settings in CALLS]
    assert len({a.tobytes() for a in alone}) == len(CALLS)
    for _ in range(3):
        for k, (got, want) in enumerate(zip(_together(call, CALLS), alone, strict=True)):
            np.testing.assert_array_equal(got, want, err_msg=f"call {k}: {CALLS[k]}")
    # Between calls the UNet holds the user's settings again.
    assert adapter_weights(pipe.pipe.unet)[pipe.adapter.name] == pipe.adapter.lora_scale == 1.0


# ---------------------------------------------------------------------- identity guidance keeps nothing
def test_identity_guidance_keeps_no_step_inputs_alive(pipe, controlnet):
    seen_samples: list = []
    seen_residuals: list = []
    alive_earlier: list = []

    def look(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        seen_samples.append(weakref.ref(sample))
        residual = kwargs.get("mid_block_additional_residual")
        if residual is not None:
            seen_residuals.append(weakref.ref(residual))

    def at_step_end(pipeline, step, timestep, callback_kwargs):
        gc.collect()
        earlier = seen_samples[:-1] + seen_residuals[:-1]
        alive_earlier.append(sum(ref() is not None for ref in earlier))
        return callback_kwargs

    handle = pipe.pipe.unet.register_forward_pre_hook(look, with_kwargs=True)
    try:
        control = ControlInput(_picture(2), controlnet, 0.5)
        pipe("a portrait", _face(), seed=1, num_inference_steps=8, identity_guidance=1.5, control=control,
             callback_on_step_end=at_step_end, output_type="np", **SIZE)  # fmt: skip
    finally:
        handle.remove()
    assert len(seen_samples) == len(seen_residuals) == 8
    assert alive_earlier == [0] * 8  # no step's UNet inputs outlive it


# ---------------------------------------------------------------------- refused before any work
def test_a_fused_identity_lora_with_a_window_is_refused_before_any_step(pipe):
    calls = []
    handle = pipe.pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    pipe.adapter.fuse_lora()
    try:
        with pytest.raises(FaceIDError, match="fused into the UNet.*unfuse_lora"):
            pipe("a portrait", _face(), seed=1, num_inference_steps=10, identity_window=(0.0, 0.5), **SIZE)
        with pytest.raises(FaceIDError, match="fused into the UNet.*unfuse_lora"):
            pipe("a portrait", _face(), seed=1, num_inference_steps=10, lora_scale=0.5, **SIZE)
        assert calls == []
        pipe("a portrait", _face(), seed=1, num_inference_steps=2, identity_window=(0.0, 1.0), **SIZE)  # every step
        assert len(calls) == 2
    finally:
        handle.remove()
        pipe.adapter.unfuse_lora()


# ---------------------------------------------------------------------- no device sync for a window
class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts what makes the host wait for the device: reading a tensor's value into Python."""

    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
             torch.Tensor.__float__}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_a_per_sample_scale_through_a_window_reads_nothing_from_the_device(tiny_models):
    """What a call does when its window opens and shuts between steps, with one identity scale per sample: the
    same host reads as the plain UNet (none of ours), every step."""
    from tiny_models import adapter_state, make_tiny_unet

    unet = make_tiny_unet()
    FaceIDAdapter.install(unet, adapter_state(unet, "faceid"), lora_scale=0.0)
    inputs, tokens = unet_inputs(unet)
    plain, windowed = _HostReads(), _HostReads()
    with plain:
        for _ in range(6):
            unet(**inputs)
    group = TokenGroup(tokens, "faceid", [0.8, 0.0])
    with windowed:
        for step in range(6):
            group.set_open(step % 2 == 0)
            unet(**inputs, cross_attention_kwargs={"ip_hidden_states": [group]})
    assert windowed.count == plain.count


# ---------------------------------------------------------------------- a half-precision VAE that decodes in float32
@pytest.mark.parametrize("mode", ["text", "img2img"])
def test_a_half_precision_vae_is_never_cast_by_a_call(tiny_models, mode, monkeypatch):
    """SDXL's VAE decodes (and encodes) in float32 (``force_upcast``). diffusers casts the VAE object to float32
    and back around each use; a call casts its own view instead, the shared VAE stays in float16, and the
    images are diffusers' own, bit for bit."""
    from faceid import sampling

    pipe = FaceIDPipeline.from_pretrained(
        tiny_models.sdxl, tiny_models.adapter("faceid-sdxl"), device="cpu", torch_dtype=torch.float16, progress=False
    )
    vae = pipe.pipe.vae
    assert vae.dtype == torch.float16 and vae.config.force_upcast
    casts = []
    cast = vae.to

    def watched(*args, **kwargs):  # a cast that changes the weights every call shares
        dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
        if dtype not in (None, torch.float16):
            casts.append(dtype)
        return cast(*args, **kwargs)

    monkeypatch.setattr(vae, "to", watched)
    call = {"seed": 2, "num_inference_steps": 2, "width": 32, "height": 32, "output_type": "np"}
    if mode == "img2img":
        call |= {"init_image": _picture(1, (32, 32)), "strength": 1.0}
    images = pipe("a portrait", _face(), **call).images
    assert casts == [] and vae.dtype == torch.float16
    monkeypatch.setattr(sampling, "call_vae", lambda models: models.pipe.vae)  # diffusers' own cast, on the VAE
    expected = pipe("a portrait", _face(), **call).images
    assert casts and vae.dtype == torch.float16  # diffusers did cast it, and back
    np.testing.assert_array_equal(images, expected)
