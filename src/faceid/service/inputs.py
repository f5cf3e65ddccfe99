"""A generation's inputs beyond its settings, by upload and identity id: img2img, inpainting, ControlNet and swap
(``faceid.modes``, ``faceid.control``, ``faceid.swap``), several people in one picture and style references
(``faceid.groups``) over the HTTP API.

``JobInputs`` declares the request fields once: the API's request model inherits them, the service checks them
(``check``) and stores them as JSON with the job (``Job.inputs``), and the worker reads them back. Images are
named by the id ``POST /v1/uploads`` gives, never by a path; a ControlNet by its control kind and a style adapter by
its name, which the server maps to a model it was configured with (``faceid serve --controlnet KIND=SOURCE``,
``--style-adapter NAME=SOURCE``).

``regions`` and ``style`` are also ``GenerationSettings`` fields: there they record what the library used (the
columns a group photo gave, each reference's adapter and scale), here they are what was asked (with upload ids).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..control import KINDS
from ..errors import FaceIDError
from ..settings import Box, Window, describe_errors

ControlKind = Literal[KINDS]  # type: ignore[valid-type]
TEXT_TO_IMAGE = "text-to-image"
MAX_CONTROLS = 4  # ControlNets in one request: each is a model run at every step
# People in one picture and style references in one request: each is a token group every cross-attention layer
# attends to (with a mask per person), so each costs attention time at every step.
MAX_PEOPLE = 6
MAX_STYLES = 4


class ControlSpec(BaseModel):
    """One ControlNet of a request: what control image to make from which upload, and how much it steers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ControlKind = Field(
        description="the control image made from the upload: canny (edges), kps (face landmarks), pose (body "
        "skeleton), depth, or image (the upload already is a control image); the server's ControlNet for that kind "
        "and the model set's family reads it (GET /v1/models lists each model set's: catalog[].controlnets)"
    )
    image: str = Field(description="upload id (POST /v1/uploads): the reference photo, or the control image itself")
    scale: float = Field(1.0, ge=0, le=2, description="conditioning scale (0 adds nothing)")
    window: tuple[float, float] = Field(
        (0.0, 1.0), description="the part of the denoising steps it acts in: (start, end) fractions"
    )
    face_index: int = Field(0, ge=0, description="kps: which face of the photo (0 = largest)")

    @field_validator("window")
    @classmethod
    def _window(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] < value[1] <= 1.0:
            raise ValueError(f"must be (start, end) with 0 <= start < end <= 1, got {tuple(value)}")
        return value


class SwapSpec(BaseModel):
    """Put the request's person into a photo, in place of one of its faces (``faceid.swap``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="upload id of the photo to put the person into (the result has its size)")
    face_index: int = Field(0, ge=0, description="which face of the target to replace (0 = largest)")
    mask: str | None = Field(
        None,
        description="upload id of a mask of the target's size (white = repaint) instead of the face's own outline "
        "(faceid swap --mask: hair, a hat...)",
    )
    resolution: int | None = Field(
        None,
        ge=64,
        multiple_of=8,
        description="the size the crop around the face is generated at (default: the model's, 512 for SD1.5, 1024 "
        "for SDXL)",
    )


class RegionsPhoto(BaseModel):
    """A photo with one face per person: its faces, left to right, split the picture into one column each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    photo: str = Field(description="upload id of a photo with as many faces as people")


class StyleSpec(BaseModel):
    """A style or composition reference of a request: an uploaded image, read by one of the server's style adapters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(description="upload id of the reference image")
    adapter: str = Field(
        description="the name of one of the server's style adapters (GET /v1/models 'style_adapters'; faceid serve "
        "--style-adapter NAME=SOURCE)"
    )
    scale: float = Field(0.5, ge=0, le=2, description="how strongly it acts (0 adds nothing)")
    window: Window | None = Field(
        None, description="the part of the denoising steps it acts in: (start, end) fractions"
    )
    region: Box | str | None = Field(
        None,
        description="where it acts: a box [x0, y0, x1, y1] in fractions of the picture, or the upload id of a mask "
        "(white: there); default the whole picture",
    )


class JobInputs(BaseModel):
    """The input images of a generation (none: text-to-image), its people when several share a picture, and its
    style references."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    init_image: str | None = Field(
        None,
        description="img2img: upload id of the image to redraw (strength of the steps; width and height default to "
        "its size)",
    )
    mask_image: str | None = Field(
        None, description="inpainting: upload id of a mask, white where init_image is redrawn"
    )
    controls: list[ControlSpec] | None = Field(
        None, max_length=MAX_CONTROLS, description="ControlNets: a control image each, made from an upload"
    )
    swap: SwapSpec | None = Field(None, description="put the person into an uploaded photo, in place of a face there")
    people: list[str] | None = Field(
        None,
        min_length=1,
        max_length=MAX_PEOPLE,
        description="several people in every picture: their identity ids (instead of identity_id), person k in "
        "region k of regions",
    )
    regions: Literal["auto"] | list[Box | str] | RegionsPhoto | None = Field(
        None,
        description="where each of people goes: 'auto' (equal columns, left to right; the default), one box [x0, y0, "
        "x1, y1] in fractions per person, one mask upload id per person (white: the person), or {'photo': upload "
        "id} of a photo whose faces, left to right, give the columns",
    )
    style: list[StyleSpec] | None = Field(
        None, max_length=MAX_STYLES, description="style and composition references: uploaded images, each read by a "
        "style adapter of the server"
    )  # fmt: skip
    kps: str | None = Field(
        None,
        description="method instantid: upload id of a photo whose face (its largest) gives the keypoints IdentityNet "
        "follows, the pose and place of the face; default the person's own photo",
    )

    @classmethod
    def parse(cls, value: dict[str, Any] | None) -> JobInputs:
        """Inputs from JSON: a request's fields, or a job row's (None: a job from before inputs existed,
        text-to-image); a ``FaceIDError`` that names what is wrong."""
        try:
            return cls.model_validate(value or {})
        except ValidationError as exc:
            raise FaceIDError(describe_errors(exc)) from None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    @property
    def mode(self) -> str:
        """``text-to-image``, ``img2img``, ``inpaint``, ``controlnet``, ``controlnet+img2img``,
        ``controlnet+inpaint`` or ``swap``."""
        if self.swap is not None:
            return "swap"
        parts = ["controlnet"] if self.controls else []
        if self.init_image is not None:
            parts.append("inpaint" if self.mask_image is not None else "img2img")
        return "+".join(parts) or TEXT_TO_IMAGE

    @property
    def edits(self) -> bool:
        """Whether an image is redrawn (img2img, inpainting, swap): where ``strength`` applies."""
        return self.init_image is not None or self.swap is not None

    def uploads(self) -> list[tuple[str, str]]:
        """(field, upload id) of every image it names, in request order."""
        found = [(name, value) for name in ("init_image", "mask_image") if (value := getattr(self, name))]
        found += [(f"controls[{k}].image", c.image) for k, c in enumerate(self.controls or ())]
        if self.swap is not None:
            found.append(("swap.target", self.swap.target))
            if self.swap.mask is not None:
                found.append(("swap.mask", self.swap.mask))
        if self.kps is not None:
            found.append(("kps", self.kps))
        if isinstance(self.regions, RegionsPhoto):
            found.append(("regions.photo", self.regions.photo))
        elif isinstance(self.regions, list):
            found += [(f"regions[{k}]", mask) for k, mask in enumerate(self.regions) if isinstance(mask, str)]
        for k, reference in enumerate(self.style or ()):
            found.append((f"style[{k}].image", reference.image))
            if isinstance(reference.region, str):
                found.append((f"style[{k}].region", reference.region))
        return found

    def fields_given(self) -> list[str]:
        """The fields it sets: what a job asks for beyond text-to-image of one person per prompt."""
        return [name for name in type(self).model_fields if getattr(self, name) is not None]

    def metadata(self) -> dict[str, Any]:
        """What a generated PNG records of the inputs: the request's fields, except that ``regions`` and ``style`` go
        under ``regions_input`` and ``style_input``: the PNG's ``regions`` and ``style`` are the settings', what the
        library used (``GenerationSettings.from_png`` reads those)."""
        return {f"{key}_input" if key in ("regions", "style") else key: value for key, value in self.to_json().items()}

    def check(self, strength: float | None) -> None:
        """Refuse what does not go together, saying what to send instead. What the server has (its ControlNet
        kinds, its style adapters) is checked by ``capabilities.Capabilities.check``."""
        if self.swap is not None and (self.init_image or self.mask_image or self.controls):
            raise FaceIDError(
                "swap repaints a face of its target: leave out init_image, mask_image and controls (or leave out swap)"
            )
        if self.swap is not None and (self.people or self.style):
            raise FaceIDError("swap puts one person into its target: leave out people and style (or leave out swap)")
        if self.regions is not None and self.people is None:
            raise FaceIDError(
                "regions places the people of a picture: give people (their identity ids) instead of identity_id, or "
                "leave regions out"
            )
        if self.mask_image is not None and self.init_image is None:
            raise FaceIDError("mask_image needs init_image, the image to inpaint (an upload id)")
        if self.kps is not None and (self.people or self.swap is not None):
            raise FaceIDError("kps gives the face keypoints of one person's picture: leave it out with people or swap")
        if strength is not None and not self.edits:
            raise FaceIDError(
                "strength applies to img2img, inpainting and swap: give init_image (an upload id) or swap, or leave "
                "strength out"
            )
