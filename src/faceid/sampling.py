"""Running a plan: one call's denoising on diffusers' own pipeline, on objects that belong to the call alone.

``run_plan`` makes everything the call changes as it runs: its own scheduler (diffusers' schedulers keep the
timesteps and step index of the run they are in), its token groups with their weights and window gates, its
key/value cache (``faceid.attention.CallTokens``), its view of the UNet when it is identity-guided, its
diffusers pipeline object (``ModelSet.call_pipeline``: diffusers keeps a call's state on the pipeline) with the
call's ControlNet and decoder on it, and the step callback that opens and shuts the windows and shows the
previews. The models themselves are only read, except their LoRA weights, which the call holds through the
UNet's ``WeightsGuard`` when it needs other ones than the user's. So calls on one pipeline from several threads
give exactly what each gives alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from . import families, previews
from .attention import CallTokens, TokenGroup
from .conditioning import Conditioning
from .errors import FaceIDError
from .fast import make_scheduler
from .groups import token_groups
from .identity_guidance import IdentityGuidedUNet
from .modes import ControlInput, ModeInputs
from .plan import CallPlan
from .settings import GenerationSettings

if TYPE_CHECKING:
    from .model_set import ModelSet


@dataclass
class FaceIDOutput:
    """What a call returns: the images, the face analysed for each prompt (None for raw embeddings), and the
    settings with every default resolved: ``settings.for_image(i)`` reproduces image i alone, with face
    ``i // num_images_per_prompt`` (with regions: with all the people)."""

    images: list | Any
    faces: list = field(default_factory=list)
    nsfw_content_detected: list[bool] | None = None
    settings: GenerationSettings | None = None
    control_images: list = field(default_factory=list)  # the control images as the ControlNets saw them
    kps_image: Any = None  # InstantID: the face keypoint image IdentityNet saw


def seeded_generators(seed: int | Sequence[int]) -> torch.Generator | list[torch.Generator]:
    """CPU generators, so that a seed gives the same starting noise on any device."""
    if isinstance(seed, int):
        return torch.Generator("cpu").manual_seed(seed)
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seed]


def run_plan(
    models: ModelSet,
    plan: CallPlan,
    conditioning: Conditioning,
    inputs: ModeInputs,
    *,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    output_type: str = "pil",
    diffusers_kwargs: dict[str, Any] | None = None,
    preview_every: int | None = None,
    on_preview: Callable[[int, int, list], None] | None = None,
    sliced_decode: bool = False,
) -> FaceIDOutput:
    """Run ``plan`` on ``conditioning`` and the mode's ``inputs`` (sized to the output), with the diffusers
    arguments ``diffusers_kwargs``; ``sliced_decode``: decode the images one at a time (a batch run in parts)."""
    run = plan.settings
    kwargs = dict(diffusers_kwargs or {})
    # Refuse before any work if other code took the adapter's processors: the identity would vanish.
    if models.adapter is not None:
        models.adapter.check_attached()
    if generator is None and run.seed is not None:
        generator = seeded_generators(run.seed)

    family = families.family(models.family)
    if conditioning.method != plan.method:
        raise FaceIDError(
            f"this conditioning holds {conditioning.method} tokens but the call runs method {plan.method}: "
            "encode() with the call's method"
        )
    attention = dict(kwargs.pop(family.attention_kwargs, None) or {})
    gated: list = []
    if plan.method == "pulid":
        # PuLID's identity is not an added branch: one call object in place of the token groups, which FaceID's
        # processors hand each layer to (its window shuts it between steps like a group).
        pulid = models.loaded_method("pulid").call(
            conditioning.identity_states(plan.guidance), plan.identity_scale, run.pulid_num_zero, run.pulid_ortho
        )
        attention["ip_hidden_states"] = pulid
        gated = [] if all(plan.identity_open) else [(plan.identity_open, pulid)]
    elif plan.method not in ("infiniteyou", "pulid-flux"):
        # InfiniteYou's identity reaches the transformer through InfuseNet's residuals, PuLID-FLUX's through the
        # call's view of the transformer (below): not as attention tokens.
        identity, gated = _token_groups(models, plan, conditioning)
        attention["ip_hidden_states"] = CallTokens(identity)

    scheduler = _scheduler(models, run.scheduler)
    if on_preview is not None:
        scheduler = previews.recording_x0(scheduler)
    if run.eta is not None:
        kwargs["eta"] = run.eta
    denoiser = getattr(models.pipe, family.denoiser)
    if run.identity_guidance:
        null = conditioning.identity_states(False, unconditional=True)
        denoiser = IdentityGuidedUNet(
            denoiser, run.identity_guidance, run.guidance_scale, plan.guidance, null, family.attention_kwargs
        )
    vae = models.tiny_vae if run.decoder == "tiny" else call_vae(models)
    if sliced_decode and run.decoder != "tiny" and getattr(vae, "use_slicing", None) is False:
        vae = OneImageAtATime(vae)  # the decode of a part, one image at a time (VAEs work per image)
    parts: dict[str, Any] = {"scheduler": scheduler, family.denoiser: denoiser, "vae": vae}
    controls, kps_image = inputs, None
    if plan.method == "instantid":
        # IdentityNet first, reading the call's identity tokens; the user's ControlNets after it, reading the text.
        instantid = models.loaded_method("instantid")
        kps_image = call_kps_image(models, conditioning, inputs, run.width, run.height)
        parts["controlnet"] = instantid.control(
            conditioning.identity_states(plan.guidance), others=[c.controlnet for c in inputs.controls]
        )
        controls = replace(
            inputs,
            controls=[ControlInput(kps_image, instantid.identitynet, plan.identitynet_scale), *inputs.controls],
        )
    elif plan.method == "infiniteyou":
        # InfuseNet reading the call's identity tokens (one row per image), on its control image: the keypoints of
        # the kps photo's face, fitted to the frame as the authors fit it, or black.
        infiniteyou = models.loaded_method("infiniteyou")
        kps_image = call_infusenet_image(models, inputs, run.width, run.height)
        # The user's FLUX ControlNets after it, reading the prompt; summed block by block (nets of any depth).
        transformer = models.denoiser
        parts["controlnet"] = infiniteyou.controlnet(
            conditioning.identity_states(False),
            others=[c.controlnet for c in inputs.controls],
            blocks=(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)),
            guidance_scale=run.guidance_scale,
        )
        controls = replace(
            inputs,
            controls=[ControlInput(kps_image, infiniteyou.infusenet, plan.infusenet_scale), *inputs.controls],
        )
    elif inputs.controls:
        parts["controlnet"] = inputs.controlnet(models.family)
    pipe_kwargs = dict(conditioning.pipe_kwargs)
    if family.guidance_embedded and plan.true_cfg is None:  # negatives only for PuLID-FLUX's true CFG pass
        pipe_kwargs = {k: v for k, v in pipe_kwargs.items() if not k.startswith("negative_")}
    if plan.method == "pulid-flux":
        # the call's identity (cond, and uncond for true CFG's negative pass), shut before its start step
        call = models.loaded_method("pulid-flux").call(
            conditioning.identity_states(False),
            conditioning.identity_states(False, unconditional=True),
            plan.identity_scale,
        )
        parts[family.denoiser] = call.transformer(denoiser, pipe_kwargs.get("negative_prompt_embeds"))
        gated = [] if all(plan.identity_open) else [(plan.identity_open, call)]
        if plan.true_cfg is not None:
            kwargs["true_cfg_scale"] = plan.true_cfg
            if not all(plan.true_cfg_open):  # the steps before true CFG's start: the prompt's pass alone
                gated.append((plan.true_cfg_open, call.negative_pass))
    pipeline = models.call_pipeline(plan.pipeline, **parts)
    if plan.method == "infiniteyou":
        windows = (plan.infusenet_window, *plan.control_windows)
    else:
        windows = plan.control_windows if kps_image is None else (plan.identitynet_window, *plan.control_windows)

    on_step = _step_gates(models, plan, gated)
    kwargs.update(_step_callback(on_step, plan, kwargs))
    if on_preview is not None:
        shown_by = models.tiny_vae or vae
        packed = (run.width, run.height) if family.packed_latents else None
        kwargs.update(previews.live_previews(shown_by, preview_every, on_preview, kwargs, packed=packed))
    accepted = _parameters(pipeline)
    sizes = {"width": run.width, "height": run.height} if "width" in accepted else {}  # img2img: the image's
    with models.weights.hold(
        plan.weights,
        apply=lambda: _put_weights(models, plan, 0),
        restore=lambda: _restore_weights(models, plan),
        alone=plan.weights_change,
    ):
        on_step(0)
        result = pipeline(
            **pipe_kwargs,
            **controls.pipeline_kwargs(
                run.strength,
                plan.images,
                windows,
                as_lists=kps_image is not None,
                control_image_keyword=family.control_image_keyword,
            ),
            **sizes,
            **({"latents": latents} if latents is not None else {}),
            num_inference_steps=run.num_inference_steps,
            guidance_scale=run.guidance_scale,
            generator=generator,
            output_type=output_type,
            **{family.attention_kwargs: attention},
            **kwargs,
        )
    return FaceIDOutput(
        images=result.images,
        faces=conditioning.faces,
        nsfw_content_detected=getattr(result, "nsfw_content_detected", None),
        settings=run,
        control_images=[c.image for c in inputs.controls],
        kps_image=kps_image,
    )


def call_kps_image(models: ModelSet, conditioning: Conditioning, inputs: ModeInputs, width: int, height: int):
    """InstantID's keypoint image at the output size: the face of ``inputs.kps`` (a photo: its largest face),
    else the call's first face, its photo fitted to the output frame as ``make_control_image`` fits it."""
    from .control import face_kps_image
    from .identity import is_face

    face = inputs.kps
    if face is not None and not is_face(face):
        face = models.face_analyzer.get(face)
    if face is None:
        first = conditioning.faces[0] if conditioning.faces else None
        face = first[0] if isinstance(first, list) else first
    if face is None:
        raise FaceIDError(
            "InstantID draws IdentityNet's keypoints from the face photo, and this call's face is an embedding: "
            "give the photo (or a Face), or the keypoint photo with kps=PHOTO (--kps PHOTO)"
        )
    return face_kps_image(face, (width, height))


def call_infusenet_image(models: ModelSet, inputs: ModeInputs, width: int, height: int):
    """InfiniteYou's control image at the output size, as the authors make it: the kps photo fitted to the frame
    (``fit_photo``), its largest face's 5 keypoints drawn on black; all black without a kps photo."""
    from .identity import is_face
    from .methods.infiniteyou import control_image, fit_photo

    face = inputs.kps
    if face is None:
        return control_image((width, height))
    if is_face(face):
        raise FaceIDError(
            "InfiniteYou draws its keypoints on the kps photo fitted to the output frame: give kps as a photo, not "
            "an analysed Face"
        )
    fitted = fit_photo(face, (width, height))
    return control_image((width, height), models.face_analyzer.get(fitted).landmarks)


def _token_groups(
    models: ModelSet, plan: CallPlan, conditioning: Conditioning
) -> tuple[list[TokenGroup], list[tuple[tuple[bool, ...], TokenGroup]]]:
    """The call's token groups in the UNet's batch order, and the step gates of each (whether it acts at each
    step that runs): the identity's (one group per person), then each reference's."""
    run = plan.settings
    groups, references = token_groups(
        conditioning.identity_states(plan.guidance),
        conditioning.identity_states(False, unconditional=True),
        conditioning.regions,
        conditioning.references,
        plan.images,
        plan.guidance,
        run.width,
        run.height,
        models.adapter.name if plan.method == "faceid" else models.loaded_method(plan.method).name,
        plan.identity_scale,
    )
    people = len(groups) - len(references)
    gated = [(plan.identity_open, group) for group in groups[:people]]
    gated += [(open_, group) for open_, group in zip(plan.reference_open, references, strict=True)]
    return groups, [(open_, group) for open_, group in gated if not all(open_)]


def _step_gates(models: ModelSet, plan: CallPlan, gated: list) -> Callable[[int], None]:
    """``set(i)``: the state of step ``i`` of the run: each windowed group open or shut, the identity LoRA at its
    weight (when the call's weights change between steps; it then holds the UNet's weights alone)."""
    changing = plan.weights_change

    def set_step(i: int) -> None:
        if i >= plan.schedule.running:
            return
        for open_, group in gated:
            group.set_open(open_[i])
        if changing:
            models.adapter.put_lora_weight(plan.identity_lora[i])

    return set_step


def _step_callback(set_step: Callable[[int], None], plan: CallPlan, kwargs: dict) -> dict:
    """A step-end callback that puts the next step's gates in place (step 0's are set before the loop) and runs
    the user's own callback, if any. It also checks that diffusers runs the steps the plan placed."""
    user_callback = kwargs.get("callback_on_step_end")

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        if pipeline.num_timesteps != plan.schedule.running:
            raise FaceIDError(
                f"internal error: the plan placed {plan.schedule.running} steps but diffusers runs "
                f"{pipeline.num_timesteps}; please report it"
            )
        set_step(step + 1)
        return user_callback(pipeline, step, timestep, callback_kwargs) if user_callback else callback_kwargs

    extra = {"callback_on_step_end": on_step_end}
    if hasattr(user_callback, "tensor_inputs") and "callback_on_step_end_tensor_inputs" not in kwargs:
        extra["callback_on_step_end_tensor_inputs"] = user_callback.tensor_inputs
    return extra


def _put_weights(models: ModelSet, plan: CallPlan, step: int) -> None:
    """The LoRA weights of ``plan`` at step ``step`` of the run, on the UNet (the call holds its guard)."""
    if plan.identity_lora:
        models.adapter.put_lora_weight(plan.identity_lora[step])
    if plan.fast_lora is not None:
        models.lora_stack.put_in_force(plan.fast_lora, 1.0, active=True)


def _restore_weights(models: ModelSet, plan: CallPlan) -> None:
    """The user's settings back on the UNet after the last call that needed other weights."""
    if plan.identity_lora:
        models.adapter.put_lora_weight(models.adapter.lora_weight())
    if plan.fast_lora is not None:
        weight, active = models.lora_stack.setting(plan.fast_lora)
        models.lora_stack.put_in_force(plan.fast_lora, weight, active=active)


def _scheduler(models: ModelSet, name: str | None):
    """The call's own scheduler: ``name`` (``faceid.fast.SCHEDULERS``) on the base model's noise schedule, or a
    fresh copy of the loaded pipeline's."""
    base = models.pipe.scheduler
    if name is not None:
        return make_scheduler(name, base.config)
    return type(base).from_config(base.config)


def _parameters(pipeline) -> set[str]:
    import inspect

    return set(inspect.signature(pipeline.__call__).parameters)


class OneImageAtATime:
    """A call's view of a VAE that decodes a batch one image at a time (what the VAE's ``enable_slicing`` does,
    without switching it on the VAE every call shares); everything else is the VAE's."""

    def __init__(self, vae) -> None:
        self.vae = vae

    def __getattr__(self, name: str) -> Any:
        return getattr(self.vae, name)

    def decode(self, z: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any):
        from diffusers.models.autoencoders.vae import DecoderOutput

        images = torch.cat([self.vae.decode(one, *args, return_dict=True, **kwargs).sample for one in z.split(1)])
        return DecoderOutput(sample=images) if return_dict else (images,)


def call_vae(models: ModelSet):
    """The VAE as one call uses it: the model set's own, or, for a half-precision VAE that must run in float32
    (its ``force_upcast``: SDXL's overflows in float16), a ``Float32Upcast`` view of it for this call."""
    vae = models.pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return Float32Upcast(vae, models.vae_float32())
    return vae


class Float32Upcast:
    """One call's view of a half-precision VAE that runs in float32.

    diffusers' SDXL pipelines cast the VAE to float32 before they encode or decode with it and back to float16
    after, on the VAE object itself; on a VAE that calls share, one call's cast back would pull the weights out
    from under another call's decode. The view takes those casts on itself: it stands for the half-precision
    VAE until the pipeline casts it to float32, then for ``float32``, a float32 copy of the same weights that
    the model set makes once (``ModelSet.vae_float32``). The numbers are those of diffusers' own cast: the same
    float32 weights, the same latents. Everything but ``to`` is the VAE it stands for now.
    """

    def __init__(self, half, float32) -> None:
        self._half, self._float32 = half, float32
        self._current = half

    def to(self, *args: Any, **kwargs: Any) -> Float32Upcast:
        dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
        if dtype is not None:
            self._current = self._float32 if dtype == torch.float32 else self._half
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._current, name)
