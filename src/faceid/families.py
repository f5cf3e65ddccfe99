"""Base model families: what faceid needs to know of a kind of base model, one row each.

A family says which diffusers pipelines run it (text to image, img2img, inpainting, each with ControlNets),
the settings its authors use by default (size, steps, guidance), and how a call reaches its denoiser: the
pipeline attribute that holds it and the keyword under which the image tokens travel to its attention
layers. Everything that differs between Stable Diffusion 1.5 and SDXL is in these rows, so another base
model (a DiT such as FLUX.1, with ``transformer`` and ``joint_attention_kwargs``) is another row and the
pieces it needs, not a branch in the code that reads them.

FLUX.1 is such a row (FLUX.1-dev's defaults: 1024x1024, 28 steps, guidance 3.5 embedded in the transformer, the
defaults of diffusers' ``FluxPipeline``), for the identity methods that run on it (``faceid.methods.infiniteyou``).
The FaceID adapters are made for SD1.5 and SDXL only, so ``faceid_adapters`` is False there: a FLUX.1 model set
is loaded without one (``FaceIDPipeline.from_pretrained(FLUX, adapter=None, methods={...})``), and asking for a
FaceID adapter on it is refused with :func:`refuse_without_faceid`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import FaceIDError

__all__ = ["FAMILIES", "BaseFamily", "family", "family_of_controlnet", "family_of_pipeline", "refuse_without_faceid"]


@dataclass(frozen=True)
class BaseFamily:
    name: str
    pipeline_prefix: str  # diffusers' pipeline class names: <prefix>[ControlNet][Img2Img|Inpaint]Pipeline
    defaults: dict[str, Any] = field(default_factory=dict)  # GenerationSettings defaults: size, steps, guidance
    denoiser: str = "unet"  # the pipeline attribute that holds the denoiser
    attention_kwargs: str = "cross_attention_kwargs"  # how a call's image tokens reach the attention layers
    faceid_adapters: bool = True  # whether IP-Adapter-FaceID (so FaceIDPipeline) runs on it; False: other methods
    # A DiT's guidance is an input of the denoiser (FLUX.1-dev's distilled guidance): no unconditional half in its
    # batch, no negative prompt.
    guidance_embedded: bool = False
    # Its latents are packed into a sequence of 2x2 patches (FLUX): previews unpack them as its pipeline does.
    packed_latents: bool = False
    # img2img and inpainting at strength s of N steps run int(N*s) steps (Stable Diffusion's get_timesteps), or
    # N - int(N - N*s) (FLUX's: the float is cut from the skipped steps, so 0.55 of 10 runs 6, not 5).
    strength_rounds_run_down: bool = True
    half_dtype: str = "float16"  # the precision on an accelerator (FLUX.1 is trained and released in bfloat16)
    # The keyword of a ControlNet's image in text to image (Stable Diffusion's ``image``; with an init image
    # every family's is ``control_image``).
    control_image_keyword: str = "image"
    # Its UNet's added conditioning (SDXL's size and crop ids: "text_time"), which its ControlNets (diffusers'
    # ``ControlNetModel``, one class for SD1.5 and SDXL) share: how a ControlNet's config tells SDXL from SD1.5
    # (whatever its width: a fine-tune's or a test's tiny model's). A DiT's ControlNets have a class of their own.
    addition_embed_type: str | None = None

    def pipeline_class(self, img2img: bool = False, inpaint: bool = False, controlnet: bool = False) -> str:
        """The diffusers pipeline class that runs a call with these inputs."""
        task = "Inpaint" if inpaint else "Img2Img" if img2img else ""
        return f"{self.pipeline_prefix}{'ControlNet' if controlnet else ''}{task}Pipeline"

    def steps_run(self, steps: int, strength: float) -> int:
        """How many of ``steps`` an img2img or inpainting call at ``strength`` runs, as this family's diffusers
        pipelines count them (``get_timesteps``)."""
        if self.strength_rounds_run_down:
            return min(int(steps * strength), steps)
        return steps - int(max(steps - min(steps * strength, steps), 0))


FAMILIES: dict[str, BaseFamily] = {
    f.name: f
    for f in (
        BaseFamily(
            "SD1.5",
            "StableDiffusion",
            {"width": 512, "height": 768, "guidance_scale": 7.5, "num_inference_steps": 30},
        ),
        BaseFamily(
            "SDXL",
            "StableDiffusionXL",
            {"width": 1024, "height": 1024, "guidance_scale": 5.0, "num_inference_steps": 30},
            addition_embed_type="text_time",
        ),
        BaseFamily(
            "FLUX.1",
            "Flux",  # FluxPipeline, FluxControlNetImg2ImgPipeline, ...
            # guidance_scale: FLUX.1-dev's embedded (distilled) guidance, not classifier-free guidance
            {"width": 1024, "height": 1024, "guidance_scale": 3.5, "num_inference_steps": 28},
            denoiser="transformer",
            attention_kwargs="joint_attention_kwargs",
            faceid_adapters=False,
            guidance_embedded=True,
            packed_latents=True,
            strength_rounds_run_down=False,
            half_dtype="bfloat16",
            control_image_keyword="control_image",
        ),
    )
}


def family(name: str) -> BaseFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise FaceIDError(f"unknown base model family {name!r}: {', '.join(FAMILIES)}") from None


def family_of_pipeline(class_name: str) -> BaseFamily | None:
    """The family of a diffusers pipeline class (by name, so nothing is imported), or None for one faceid does
    not run. The longest matching prefix wins: ``StableDiffusionXL...`` is SDXL, not SD1.5."""
    matching = [f for f in FAMILIES.values() if class_name.startswith(f.pipeline_prefix)]
    return max(matching, key=lambda f: len(f.pipeline_prefix)) if matching else None


def family_of_controlnet(config: dict[str, Any]) -> BaseFamily | None:
    """The family a diffusers ControlNet is made for, from its ``config.json`` (so nothing is loaded), or None for
    one faceid does not run. A DiT's ControlNet class bears its pipelines' prefix (``FluxControlNetModel``);
    Stable Diffusion's ``ControlNetModel`` is one class for SD1.5 and SDXL, told apart as their UNets are, by
    SDXL's added size conditioning (``addition_embed_type``; its width, 768 or 2048, is checked when it loads)."""
    name = str(config.get("_class_name", ""))
    prefix = name.removesuffix("ControlNetModel")
    if prefix == name:  # not a ControlNet
        return None
    if prefix:
        return next((f for f in FAMILIES.values() if f.denoiser != "unet" and f.pipeline_prefix == prefix), None)
    added = config.get("addition_embed_type")
    return next((f for f in FAMILIES.values() if f.denoiser == "unet" and f.addition_embed_type == added), None)


def refuse_without_faceid(found: BaseFamily, what: str) -> None:
    """Raise the error for a base model of a family the FaceID adapters are not made for (``what`` names it)."""
    if not found.faceid_adapters:
        runs = [f.name for f in FAMILIES.values() if f.faceid_adapters]
        raise FaceIDError(
            f"{what} is a {found.name} model: faceid's FaceID adapters are made for {' and '.join(runs)} only, give "
            f"one of those base models. On {found.name} faceid runs identity methods of their own: load it without "
            "a FaceID adapter, FaceIDPipeline.from_pretrained(BASE, adapter=None, methods={'infiniteyou': FOLDER}) "
            "(faceid generate: --adapter none --method infiniteyou --method-weights infiniteyou=FOLDER)"
        )
