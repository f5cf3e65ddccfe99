"""Base model families: what faceid needs to know of a kind of base model, one row each.

A family says which diffusers pipelines run it (text to image, img2img, inpainting, each with ControlNets),
the settings its authors use by default (size, steps, guidance), and how a call reaches its denoiser: the
pipeline attribute that holds it and the keyword under which the image tokens travel to its attention
layers. Everything that differs between Stable Diffusion 1.5 and SDXL is in these rows, so another base
model (a DiT such as FLUX.1, with ``transformer`` and ``joint_attention_kwargs``) is another row and the
pieces it needs, not a branch in the code that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import FaceIDError

__all__ = ["FAMILIES", "BaseFamily", "family", "family_of_pipeline"]


@dataclass(frozen=True)
class BaseFamily:
    name: str
    pipeline_prefix: str  # diffusers' pipeline class names: <prefix>[ControlNet][Img2Img|Inpaint]Pipeline
    defaults: dict[str, Any] = field(default_factory=dict)  # GenerationSettings defaults: size, steps, guidance
    denoiser: str = "unet"  # the pipeline attribute that holds the denoiser
    attention_kwargs: str = "cross_attention_kwargs"  # how a call's image tokens reach the attention layers

    def pipeline_class(self, img2img: bool = False, inpaint: bool = False, controlnet: bool = False) -> str:
        """The diffusers pipeline class that runs a call with these inputs."""
        task = "Inpaint" if inpaint else "Img2Img" if img2img else ""
        return f"{self.pipeline_prefix}{'ControlNet' if controlnet else ''}{task}Pipeline"


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
