"""img2img, inpainting and ControlNet: the same FaceID call on diffusers' other Stable Diffusion pipelines.

A call's inputs say which diffusers pipeline runs it: an ``init_image`` (img2img), with a ``mask_image``
(inpainting), and ``control`` (one or several ControlNets, each with its control image, conditioning scale and
step window), alone or together, SD1.5 or SDXL: ``StableDiffusion[XL][ControlNet][Img2Img|Inpaint]Pipeline``.
``FaceIDPipeline`` builds that pipeline from its own with diffusers' ``from_pipe`` (every module shared: no
memory, no copy of any pipeline code; each call runs on its own copy, ``ModelSet.call_pipeline``) and hands it
the same prompt embeddings and identity tokens as the text-to-image pipeline; the identity goes through
``cross_attention_kwargs`` to the UNet in every mode.

What is made here: ``ControlInput`` (one ControlNet of a call), ``ModeInputs`` (a call's images, loaded, sized
and turned into the diffusers arguments of the pipeline that runs it) and the checks that refuse a ControlNet
of the other family or on another device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import families
from .errors import FaceIDError
from .images import load_image

# diffusers' defaults: SD1.5's img2img redraws 80% of the steps; inpainting redraws everything under the mask.
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}


@dataclass(frozen=True)
class ControlInput:
    """One ControlNet of a call: its control image (already a pose, depth, canny... image: a path, PIL image
    or array; ``faceid.control`` makes them from photos), the diffusers ``ControlNetModel``, its conditioning
    scale (diffusers' ``controlnet_conditioning_scale``; 0 adds nothing) and the part of the denoising steps it
    acts in (``control_guidance_start/end``, fractions)."""

    image: Any
    controlnet: Any
    scale: float = 1.0
    window: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise FaceIDError(f"ControlInput scale must be a finite number, got {self.scale!r}")
        start, end = (float(v) for v in self.window)
        if not 0.0 <= start < end <= 1.0:
            raise FaceIDError(
                f"ControlInput window must be (start, end) with 0 <= start < end <= 1, got {tuple(self.window)}"
            )
        object.__setattr__(self, "window", (start, end))


def pipeline_class_name(family: str, img2img: bool, inpaint: bool, controlnet: bool) -> str | None:
    """The diffusers pipeline class for a call's inputs; None for plain text-to-image (the loaded pipeline)."""
    if not (img2img or inpaint or controlnet):
        return None
    return families.family(family).pipeline_class(img2img, inpaint, controlnet)


def check_controlnet(controlnet: Any, unet: Any, family: str, name: str | None = None) -> None:
    """Refuse what is no diffusers ControlNet, or one made for the other family (its cross-attention width; a
    FLUX.1 ControlNet: a ``FluxControlNetModel`` of the transformer's text width)."""
    config = getattr(controlnet, "config", None)
    if families.family(family).denoiser == "transformer":
        _check_flux_controlnet(controlnet, unet, family, name or type(controlnet).__name__)
        return
    width = getattr(config, "cross_attention_dim", None)
    label = name or type(controlnet).__name__
    if width is None or not hasattr(controlnet, "controlnet_cond_embedding"):
        raise FaceIDError(
            f"{label} is not a diffusers ControlNetModel: load one with pipe.load_controlnet(SOURCE) "
            "(a Hub id or a diffusers folder)"
        )
    wanted = unet.config.cross_attention_dim
    if width != wanted:
        other = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}.get(width, "another model")
        raise FaceIDError(
            f"ControlNet {label} has cross-attention width {width} (made for {other}) but this {family} model's "
            f"UNet has {wanted}: use a ControlNet made for {family}"
        )


def _check_flux_controlnet(controlnet: Any, transformer: Any, family: str, label: str) -> None:
    from diffusers import FluxControlNetModel

    if not isinstance(controlnet, FluxControlNetModel):
        raise FaceIDError(
            f"{label} is not a diffusers FluxControlNetModel: a {family} model set runs FLUX ControlNets, load one "
            "with pipe.load_controlnet(SOURCE) (a Hub id or a diffusers folder)"
        )
    width, wanted = controlnet.config.joint_attention_dim, transformer.config.joint_attention_dim
    if width != wanted:
        raise FaceIDError(
            f"ControlNet {label} reads text of width {width} but this {family} transformer's is {wanted}: use a "
            f"ControlNet made for this {family} model"
        )


def flux_controlnet_layout(config: Any) -> tuple[int, int, bool]:
    """A FLUX ControlNet's (double blocks, single blocks, XLabs-style) from its config: a loaded net's ``.config`` or
    its ``config.json`` read (``controlnet_family``), so that a server can check a request's nets before it loads
    anything. XLabs-style: an input hint block (``conditioning_embedding_channels``) that reads the raw image."""
    return (
        int(config.get("num_layers", 0)),
        int(config.get("num_single_layers", 0)),
        config.get("conditioning_embedding_channels") is not None,
    )


def check_flux_controlnet_layouts(layouts: Sequence[tuple[int, int, bool]], beside_infusenet: bool) -> None:
    """Refuse FLUX ControlNets that would not run together (``flux_controlnet_layout`` each). Beside InfiniteYou's
    InfuseNet the call sums the nets per block (any depths), but the pipeline encodes every control image as its
    first net, InfuseNet, wants it (VAE-encoded): XLabs-style nets are refused there. Without it diffusers'
    ``FluxMultiControlNetModel`` adds the nets' residual lists entry by entry (``zip``) and prepares every image as
    the first net wants it: several nets must share depth and kind."""
    if beside_infusenet:
        for k, (_, _, xlabs) in enumerate(layouts):
            if xlabs:
                raise FaceIDError(
                    f"control[{k}] is an XLabs-style FLUX ControlNet (an input hint block, reading the raw image): "
                    "beside InfiniteYou's InfuseNet, which reads the VAE-encoded image, only ControlNets of that kind "
                    "run (InstantX-style, e.g. FLUX.1-dev-Controlnet-Canny); use one, or another method"
                )
    elif len(set(layouts)) > 1:
        raise FaceIDError(
            "these FLUX ControlNets differ in depth (double and single blocks) or kind (XLabs-style input hint block "
            "or not): diffusers' FluxMultiControlNetModel adds their residuals entry by entry, so they would not line "
            "up; give one, or several of the same architecture"
        )


def controlnet_config(source: str | Path) -> dict[str, Any]:
    """The ``config.json`` of the ControlNet at ``source`` (a Hub id or diffusers folder), its weights not loaded; one
    that does not read is an error naming it."""
    from diffusers import ControlNetModel

    from .hub import model_not_found, offline

    try:  # (``load_config`` reads the JSON only: the same for every ControlNet class)
        return dict(ControlNetModel.load_config(str(source), local_files_only=offline()))
    except Exception as exc:
        if Path(str(source)).expanduser().exists():
            raise FaceIDError(
                f"the ControlNet {source}: its config.json does not read ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); give a diffusers ControlNet folder (config.json and its weights)"
            ) from exc
        raise model_not_found(str(source), exc) from exc


def controlnet_family(source: str | Path) -> str:
    """The family of the ControlNet at ``source`` (a Hub id or diffusers folder), read from its ``config.json``
    without loading its weights (``families.family_of_controlnet``): what ``faceid serve --controlnet`` files each
    ControlNet under, so that each model set loads the ones of its family."""
    config = controlnet_config(source)
    found = families.family_of_controlnet(config)
    if found is None:
        runs = [
            f"{'' if f.denoiser == 'unet' else f.pipeline_prefix}ControlNetModel of {f.name}"
            + (f" (addition_embed_type {f.addition_embed_type})" if f.addition_embed_type else "")
            for f in families.FAMILIES.values()
        ]
        raise FaceIDError(
            f"the ControlNet {source} is a {config.get('_class_name') or 'model of unknown kind'} (addition_embed_type "
            f"{config.get('addition_embed_type')}): faceid runs diffusers' {', '.join(runs)}"
        )
    return found.name


def check_placement(controlnet: Any, unet: Any, name: str) -> None:
    """A ControlNet must be on the UNet's device, in its dtype (the pipeline does not move a caller's model)."""
    param = next(controlnet.parameters())
    target = next(unet.parameters())
    if param.device != target.device or param.dtype != target.dtype:
        raise FaceIDError(
            f"ControlNet {name} is on {param.device} in {param.dtype} but the pipeline runs on {target.device} in "
            f"{target.dtype}: controlnet.to({str(target.device)!r}, {target.dtype}) first, or load it with "
            "pipe.load_controlnet(SOURCE)"
        )


@dataclass
class ModeInputs:
    """A call's images, loaded (upright RGB; the mask as grayscale), and what it asks diffusers to do with them."""

    init_image: Any = None
    mask_image: Any = None
    controls: list[ControlInput] = field(default_factory=list)
    # InstantID: the photo (or analysed ``Face``) whose face keypoints IdentityNet follows, when not the face's own.
    kps: Any = None

    @classmethod
    def load(cls, init_image: Any = None, mask_image: Any = None, control: Any = None, kps: Any = None) -> ModeInputs:
        if mask_image is not None and init_image is None:
            raise FaceIDError("mask_image needs init_image, the photo to inpaint (--init-image with --mask-image)")
        controls = [] if control is None else [control] if isinstance(control, ControlInput) else list(control)
        for item in controls:
            if not isinstance(item, ControlInput):
                raise FaceIDError(
                    f"control takes faceid.modes.ControlInput(image, controlnet, scale, window) items, not "
                    f"{type(item).__name__}"
                )
        return cls(
            init_image=None if init_image is None else load_image(init_image),
            mask_image=None if mask_image is None else load_image(mask_image).convert("L"),
            controls=[replace(item, image=load_image(item.image)) for item in controls],
            kps=kps if kps is None or hasattr(kps, "landmarks") else load_image(kps),
        )

    @property
    def active(self) -> bool:
        return self.init_image is not None or bool(self.controls)

    @property
    def mode(self) -> str | None:
        """``"inpaint"``, ``"img2img"`` or None (text-to-image, with or without ControlNets)."""
        return "inpaint" if self.mask_image is not None else "img2img" if self.init_image is not None else None

    def class_name(self, family: str, identitynet: bool = False) -> str | None:
        """The diffusers pipeline class for these inputs; ``identitynet``: the call's method brings a ControlNet
        of its own (InstantID's IdentityNet), so a ControlNet pipeline runs it."""
        return pipeline_class_name(
            family, self.init_image is not None, self.mask_image is not None, bool(self.controls) or identitynet
        )

    def size(self) -> tuple[int, int] | None:
        """The size the images ask for (the init image's, else the first control image's); None without any."""
        source = self.init_image if self.init_image is not None else self.controls[0].image if self.controls else None
        return None if source is None else source.size

    def sized(self, width: int, height: int) -> ModeInputs:
        """Every image at ``width`` x ``height``, as the pipeline will use it (the mask too)."""

        def fit(image):
            if image is None or image.size == (width, height):
                return image
            from PIL import Image

            return image.resize((width, height), Image.Resampling.LANCZOS)

        return ModeInputs(
            init_image=fit(self.init_image),
            mask_image=fit(self.mask_image),
            controls=[replace(c, image=fit(c.image)) for c in self.controls],
            kps=self.kps,  # drawn in the output frame when the call runs
        )

    def controlnet(self, family: str = "SD1.5"):
        """The ControlNet the diffusers pipeline runs: the only one, or a ``MultiControlNetModel`` of them all
        (FLUX.1's ``FluxMultiControlNetModel``)."""
        if not self.controls:
            return None
        if len(self.controls) == 1:
            return self.controls[0].controlnet
        if families.family(family).denoiser == "transformer":
            from diffusers.models.controlnets.controlnet_flux import FluxMultiControlNetModel

            return FluxMultiControlNetModel([c.controlnet for c in self.controls])
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        return MultiControlNetModel([c.controlnet for c in self.controls])

    def pipeline_kwargs(
        self,
        strength: float | None,
        batch: int,
        windows: Sequence[tuple[float, float] | None] | None = None,
        as_lists: bool = False,
        control_image_keyword: str = "image",
    ) -> dict[str, Any]:
        """The diffusers arguments for these inputs (the pipeline chosen by ``class_name``), for ``batch`` images.

        ``windows``: each ControlNet's ``control_guidance_start/end`` over the steps that run
        (``faceid.plan.StepSchedule.controlnet_window``: its own window placed on the full schedule, which
        img2img and inpainting cut); None for one that acts in no step that runs (it then weighs 0, as diffusers
        weighs a ControlNet outside its window). Without ``windows``, each ControlNet's own window. ``as_lists``:
        one entry per ControlNet even for one (the pipeline's ControlNet is a ``MultiControlNetModel``).
        ``control_image_keyword``: the control image's keyword in text to image, the family's (Stable Diffusion's
        ``image``, FLUX.1's ``control_image``; with an init image both say ``control_image``).

        The init image goes once per image: diffusers' inpainting pipelines sample its latents with the first
        image's generator only when given it once, which shifts the noise of every other image (image i would
        not be the image that its seed gives alone); once per image, each image's generator draws its own.
        """
        kwargs: dict[str, Any] = {}
        if self.init_image is not None:
            kwargs["image"] = [self.init_image] * batch
            kwargs["strength"] = strength
        if self.mask_image is not None:
            kwargs["mask_image"] = self.mask_image
        if self.controls:
            if windows is None:
                windows = [c.window for c in self.controls]
            one = len(self.controls) == 1 and not as_lists
            images = [c.image for c in self.controls]
            keyword = "control_image" if self.init_image is not None else control_image_keyword
            kwargs[keyword] = images[0] if one else images
            scales = [float(c.scale) if w is not None else 0.0 for c, w in zip(self.controls, windows, strict=True)]
            starts = [w[0] if w is not None else 0.0 for w in windows]
            ends = [w[1] if w is not None else 1.0 for w in windows]
            kwargs["controlnet_conditioning_scale"] = scales[0] if one else scales
            kwargs["control_guidance_start"] = starts[0] if one else starts
            kwargs["control_guidance_end"] = ends[0] if one else ends
        return kwargs


def size_from_image(width: int | None, height: int | None, size: tuple[int, int]) -> tuple[int, int]:
    """The output size for an input image of ``size``: what is given, the rest from the image (multiples of 8,
    its aspect ratio kept when one side is given)."""

    def cells(value: float) -> int:
        return max(8, int(value) // 8 * 8)

    w0, h0 = size
    if width is None and height is None:
        return cells(w0), cells(h0)
    if width is None:
        return cells(round(height * w0 / h0 / 8) * 8), height
    if height is None:
        return width, cells(round(width * h0 / w0 / 8) * 8)
    return width, height
