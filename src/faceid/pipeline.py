"""Face photo(s) + prompt(s) -> images of that person, on a diffusers Stable Diffusion pipeline.

``FaceIDPipeline`` is the facade over the stages of a call, each in its own module:

* ``faceid.model_set``: the loaded models (base pipeline, identity adapter, LoRAs, few-step LoRAs, reference
  adapters, ControlNets, tiny VAE); ``FaceIDPipeline`` is a ``ModelSet`` that can be called;
* ``faceid.conditioning``: prompts and faces -> text embeddings and identity tokens (``encode``);
* ``faceid.plan``: the call's settings and inputs -> a ``CallPlan``, every decision as data;
* ``faceid.sampling``: the plan run on diffusers' own pipeline, on objects that belong to the call;
* ``faceid.batching``: a batch that does not fit at once, run in parts.

It wraps a stock ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (it does not fork them): prompts
are encoded with the pipeline's own ``encode_prompt``, faces into identity tokens by the installed
``FaceIDAdapter``, both batched the same way (prompt i pairs with face i; each repeated per image;
unconditional half first under classifier-free guidance), and the identity tokens reach the UNet through
``cross_attention_kwargs``. Calls share nothing but the models: several threads may call one pipeline at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import batching, conditioning, plan, previews, sampling
from .conditioning import Conditioning
from .errors import FaceIDError
from .model_set import (
    DDIM_OVERRIDES,
    ModelSet,
    default_device,
    default_dtype,
    default_models,
    load_base_pipeline,
    model_family,
)
from .modes import ControlInput, ModeInputs
from .sampling import FaceIDOutput, seeded_generators
from .settings import ENCODE_FIELDS, GenerationSettings

__all__ = [
    "DDIM_OVERRIDES",
    "Conditioning",
    "ControlInput",
    "FaceIDOutput",
    "FaceIDPipeline",
    "default_device",
    "default_dtype",
    "default_models",
    "load_base_pipeline",
    "model_family",
    "seeded_generators",
]


class FaceIDPipeline(ModelSet):
    """Identity-preserving text-to-image generation (and img2img, inpainting, ControlNet, several people, style
    references) on a loaded model set.

    >>> pipe = FaceIDPipeline.from_pretrained("SG161222/Realistic_Vision_V4.0_noVAE", adapter="faceid-sd15")
    >>> images = pipe("a photo of a person as an astronaut", face="me.jpg", seed=42).images
    """

    def encode(
        self,
        prompt: str | Sequence[str] | None = None,
        face: Any = None,
        settings: GenerationSettings | Mapping[str, Any] | None = None,
        *,
        face_image: Any = None,
        regions: Any = None,
        style: Sequence[Any] | None = None,
        **overrides: Any,
    ) -> Conditioning:
        """Text embeddings and identity tokens for a call (``faceid.conditioning.encode``); prompt i pairs with
        identity i. See ``__call__`` for the arguments (only the settings of ``faceid.settings.ENCODE_FIELDS``
        matter here); ``face_image`` gives the aligned 224x224 face crops that the Plus variants need when
        ``face`` holds embeddings rather than photos or ``Face`` objects. With ``regions`` (or the settings'
        ``regions``), ``face`` lists the people of every picture instead, person k in region k."""
        return conditioning.encode(
            self, prompt, face, settings, face_image=face_image, regions=regions, style=style, **overrides
        )

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        face: Any = None,
        settings: GenerationSettings | Mapping[str, Any] | None = None,
        *,
        face_image: Any = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        conditioning: Conditioning | None = None,
        max_batch: int | None = None,
        preview_every: int | None = None,
        on_preview: Callable[[int, int, list], None] | None = None,
        init_image: Any = None,
        mask_image: Any = None,
        control: ControlInput | Sequence[ControlInput] | None = None,
        regions: Any = None,
        style: Sequence[Any] | None = None,
        kps: Any = None,
        **kwargs: Any,
    ) -> FaceIDOutput:
        """Generate ``num_images_per_prompt`` images for every prompt, each of the paired face.

        The generation settings (``faceid.settings.GenerationSettings``: ``negative_prompt``,
        ``num_images_per_prompt``, ``seed``, ``num_inference_steps``, ``guidance_scale``, ``width``,
        ``height``, ``scale``, ``lora_scale``, ``face_index``, ``combine``, ``shortcut``, ``s_scale``,
        ``identity_window``) come as ``settings`` and/or keyword arguments (which win); the result's
        ``settings`` holds them with every default resolved.

        ``face``: a photo (path, PIL image, array), a ``Face``, an embedding, or a list of these with one
        per prompt; an entry that is itself a list/tuple is several photos of one person, combined as
        ``combine`` says (``"mean"`` of the normalised embeddings, or ``"concat"`` of their tokens;
        default: concat for Portrait, mean otherwise). ``scale`` (identity strength) and ``lora_scale``
        apply to this call only; None uses the adapter's. Plus variants: ``shortcut`` (PlusV2's
        ``tokens + s_scale * perceiver``; default on for PlusV2 adapters) and ``s_scale``.
        ``identity_window=(start, end)``: the adapter acts only in that part of the denoising steps
        (fractions of the full schedule, also where img2img and inpainting run only its end: ``faceid.plan``;
        ``(0, 1)`` is every step, a window without a step that runs switches it off, bit for bit).
        ``seed``: an int seeds one generator for the whole batch, as the reference does; a list gives
        every image its own seed (image i is then reproduced alone by ``seed=[seeds[i]]``); none (and no
        ``generator`` or ``latents``) draws a seed per image, recorded in the result's settings.
        Generators live on the CPU so that a seed gives the same starting noise on any device.
        ``output_type``: ``"pil"``, ``"np"`` (float arrays in [0, 1]) or ``"latent"``. Other keyword
        arguments go to the diffusers pipeline (``callback_on_step_end``, ``eta``, ...); an argument
        neither knows is an error. ``conditioning`` reuses an ``encode()`` result.
        ``decoder``: ``"full"`` (the VAE, default) or ``"tiny"`` (the tiny VAE loaded with ``tiny_vae=``)
        decodes the final images. ``on_preview(step, total, images)``: called after every ``preview_every``-th
        step (default 1) and after the last, in step order, with one PIL image per image of the batch, decoded
        by the tiny VAE where one is loaded, else by the VAE; the last preview is the final latents decoded
        (``faceid.previews.live_previews``). Previews change nothing the sampling computes.

        Other pipelines, with everything above: ``init_image`` (a photo) redraws it (img2img; ``strength`` of
        the steps, default 0.8), with ``mask_image`` (white: redraw, black: keep) only under the mask
        (inpainting; default strength 1); ``control``: ``ControlInput(image, controlnet, scale, window)`` or a
        list of them (several ControlNets at once). The call runs the matching diffusers pipeline,
        on a copy of its own (``call_pipeline``). Width and height default to the init image's (else the first control image's),
        and every image is resized to the output size; ``result.control_images`` are the control images used.

        Several people in one picture: ``face=[alice, bob]`` with ``regions`` (``"auto"``: left-to-right
        columns; one box ``(x0, y0, x1, y1)`` in fractions or one mask image per person; or a photo with that
        many people, whose faces give the columns): every prompt gets all of them, person k acting only in
        region k, the identity LoRA applied once. Style and composition references: ``style=[Reference(image,
        scale, adapter, window, region)]`` (or bare images, scale 0.5) read by the standard IP-Adapters loaded
        with ``load_reference``. Each person and each reference is a token group of the attention processor.

        Another identity method: ``method="instantid"`` (loaded once with ``load_method``) encodes the face's raw
        antelopev2 embedding(s) into InstantID's tokens (several photos of one person: one identity), draws the
        keypoints of the (first) face in the output frame, or those of ``kps`` (a photo or ``Face``: its largest
        face), for IdentityNet, and runs the SDXL ControlNet pipeline of the call's mode with IdentityNet first
        (any ``control`` after it) and InstantID's token group instead of FaceID's; ``scale`` is its IP-Adapter
        scale, ``identitynet_scale`` IdentityNet's (both 0.8 by default, as the authors' app);
        ``result.kps_image`` is the keypoint image used.
        """
        inputs = ModeInputs.load(init_image, mask_image, control, kps)
        if conditioning is not None and conditioning.settings is not None:
            # A conditioning's method is the call's unless the call names one (then they must agree, below).
            given = settings.model_fields_set if isinstance(settings, GenerationSettings) else set(settings or {})
            if "method" not in kwargs and "method" not in given:
                kwargs["method"] = conditioning.method
        previews.check_preview_arguments(preview_every, on_preview)
        requested, diffusers_kwargs = plan.request(self, prompt, settings, kwargs, inputs, latents is not None)
        if conditioning is None:
            conditioning = self.encode(
                face=face,
                face_image=face_image,
                regions=regions,
                style=style,
                # The recorded regions and references as settings: the arguments of the same names win.
                settings=requested.model_dump(include={"regions", "style"}, exclude_none=True),
                **requested.model_dump(include=set(ENCODE_FIELDS) - {"regions", "style"}, exclude_unset=True),
            )
        else:
            if regions is not None or style is not None:
                raise FaceIDError(
                    "regions= and style= are part of the encoding: give them to encode(), not with conditioning="
                )
            plan.check_same_encoding(requested, conditioning.settings)
        call = plan.plan_call(
            self,
            requested,
            conditioning,
            inputs,
            noise_given=generator is not None or latents is not None,
            max_batch=max_batch,
        )
        inputs = inputs.sized(call.settings.width, call.settings.height)
        if call.fast_lora is not None:
            self.load_fast_lora(call.settings.fast)  # on first use; loaded once, between calls
        arguments = {"diffusers_kwargs": diffusers_kwargs, "preview_every": preview_every}
        if call.batch_limit is not None:
            return batching.run_in_parts(
                self._run, call, conditioning, inputs, output_type, on_preview=on_preview, **arguments
            )
        return self._run(
            call,
            conditioning,
            inputs,
            output_type=output_type,
            on_preview=on_preview,
            generator=generator,
            latents=latents,
            **arguments,
        )

    def _run(self, call: plan.CallPlan, conditioning: Conditioning, inputs: ModeInputs, **arguments) -> FaceIDOutput:
        return sampling.run_plan(self, call, conditioning, inputs, **arguments)

    def max_batch_size(self, run: GenerationSettings, classifier_free_guidance: bool) -> int | None:
        """How many images of ``run``'s size fit in one UNet batch (``faceid.plan.max_batch_size``)."""
        return plan.max_batch_size(self, run, classifier_free_guidance)
