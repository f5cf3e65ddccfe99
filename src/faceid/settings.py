"""One description of a generation request: ``GenerationSettings``.

Everything that decides what a call draws, declared once, with its validation, its per-family default
and its command-line flag. The pipeline resolves a call's arguments into it; the CLI builds its
``generate`` flags from it; ``faceid eval`` and the HTTP API take it; every PNG stores it, and
``GenerationSettings.from_png`` reads it back, so an image's metadata reproduces the image.

Fields left ``None`` take the base model family's default when a pipeline resolves them
(``resolve``): the reference implementation's defaults (SPEC.md section 4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import FaceIDError
from .families import FAMILIES
from .fast import PRESETS, SCHEDULERS
from .methods import DEFAULT_METHOD, METHODS

DEFAULT_PROMPT = "best quality, high quality"
DEFAULT_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
# Each base model family's defaults (``faceid.families``): size, steps, guidance.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {name: family.defaults for name, family in FAMILIES.items()}
# Fields used to encode the prompts and faces (``FaceIDPipeline.encode``); the rest steer the sampling.
ENCODE_FIELDS = (
    "method", "prompt", "negative_prompt", "num_images_per_prompt", "face_index", "combine", "shortcut", "s_scale", "regions",
    "style",
)  # fmt: skip
# Fields naming the models, recorded so that an image says what made it; a pipeline checks them.
MODEL_FIELDS = ("base_model", "vae", "tiny_vae", "adapter", "loras")


def _flag(*names: str, **extra: Any) -> dict[str, Any]:
    """The command-line flag(s) of a field, kept next to its declaration."""
    return {"cli": {"flags": list(names), **extra}}


FastName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
Box = tuple[float, float, float, float]


def _check_window(value: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 <= value[0] <= value[1] <= 1.0:
        raise ValueError(f"must be (start, end) with 0 <= start <= end <= 1, got {tuple(value)}")
    return value


# A step window: (start, end) fractions of the denoising steps.
Window = Annotated[tuple[float, float], AfterValidator(_check_window)]


class StyleSetting(BaseModel):
    """A style or composition reference as a request records it (its image is given to the call)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: str = Field(description="the reference adapter it was read by (a name given to load_reference)")
    scale: float = Field(0.5, description="its strength")
    window: Window | None = Field(None, description="the part of the steps it acts in (default all)")
    region: Box | Literal["mask"] | None = Field(None, description="where it acts: a box in fractions, or a mask")
    face_crop: bool | None = Field(None, description="true: it read the aligned crop of the image's face")


SchedulerName = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]


class GenerationSettings(BaseModel):
    """What a generation draws. ``None`` means "the family's default" (see ``resolve``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: MethodName = Field(
        DEFAULT_METHOD,
        description="the identity method (faceid.methods, `faceid models`): faceid (IP-Adapter-FaceID, its variant "
        "from --adapter), instantid and pulid (SDXL; their weights loaded with --method-weights), pulid-flux, "
        "infiniteyou (FLUX.1); faceid, instantid and pulid generate yet",
        json_schema_extra=_flag("--method"),
    )
    prompt: str | list[str] | None = Field(
        None, description="what to generate; a list pairs prompt i with face i", json_schema_extra=_flag("--prompt")
    )
    negative_prompt: str | list[str] | None = Field(
        None, description="what to avoid (default: the reference's)", json_schema_extra=_flag("--negative-prompt")
    )
    num_images_per_prompt: int = Field(
        1, ge=1, description="images per prompt", json_schema_extra=_flag("-n", "--num-images", default=4)
    )
    seed: int | list[int] | None = Field(
        None,
        description="an int seeds the whole batch; a list gives each image its own seed (image i: seed+i in the CLI)",
        json_schema_extra=_flag("--seed"),
    )
    num_inference_steps: int | None = Field(
        None, ge=1, le=1000, description="denoising steps (default 30)", json_schema_extra=_flag("--steps")
    )
    guidance_scale: float | None = Field(
        None, ge=0, description="classifier-free guidance (SD1.5: 7.5, SDXL: 5)", json_schema_extra=_flag("--guidance")
    )
    width: int | None = Field(
        None, ge=8, description="image width (SD1.5: 512, SDXL: 1024)", json_schema_extra=_flag("--width")
    )
    height: int | None = Field(
        None, ge=8, description="image height (SD1.5: 768, SDXL: 1024)", json_schema_extra=_flag("--height")
    )
    scale: float | None = Field(
        None,
        description="identity strength (1.0; instantid: the IP-Adapter's scale, 0.8; pulid: the ID scale, 0.8)",
        json_schema_extra=_flag("--scale"),
    )
    identitynet_scale: float | None = Field(
        None,
        ge=0,
        description="instantid: IdentityNet's conditioning scale, how closely the face keypoints are followed (0.8)",
        json_schema_extra=_flag("--identitynet-scale"),
    )
    true_cfg: float | None = Field(
        None,
        ge=1,
        description="pulid-flux: the authors' true classifier-free guidance scale; above 1 every step runs a second "
        "pass with the negative prompt and the unconditional identity (1, the default: off, FLUX's embedded "
        "guidance only)",
        json_schema_extra=_flag("--true-cfg"),
    )
    true_cfg_start: int | None = Field(
        None,
        ge=0,
        description="pulid-flux: the step true CFG starts at (steps of the full schedule, from 0); the steps before "
        "it run without the negative pass, as the authors' timestep_to_start_cfg (their default 1: the first step "
        "unguided). Acts only with true_cfg above 1",
        json_schema_extra=_flag("--true-cfg-start"),
    )
    # PuLID v1.1's two knobs, as the authors' app_v1_1.py offers them (a num_zero slider and an ortho choice, not
    # the v1 app's named modes): the v1 modes are these values ("fidelity": 8 and v2, "extremely style": 16 and v1).
    pulid_num_zero: int | None = Field(
        None,
        ge=0,
        le=80,
        description="pulid: zero tokens appended to the identity tokens, taking attention away from the identity: "
        "more is more editable, less like the face (the authors' app_v1_1: 20, its slider 0-80)",
        json_schema_extra=_flag("--pulid-num-zero"),
    )
    pulid_ortho: Literal["off", "v1", "v2"] | None = Field(
        None,
        description="pulid: how the identity attention joins the text attention: off adds it, v1 adds its part "
        "orthogonal to the text attention, v2 adds that plus the parallel part weighed by the attention on the "
        "identity (the authors' app_v1_1: v2)",
        json_schema_extra=_flag("--pulid-ortho"),
    )
    lora_scale: float | None = Field(
        None, description="weight of the identity LoRA (1.0)", json_schema_extra=_flag("--lora-scale")
    )
    face_index: int = Field(
        0,
        ge=0,
        description="which face when a photo has several (0 = largest)",
        json_schema_extra=_flag("--face-index"),
    )
    combine: Literal["mean", "concat"] | None = Field(
        None,
        description="how several photos of one person combine: mean of embeddings or concatenated tokens "
        "(default: concat for Portrait, mean otherwise)",
        json_schema_extra=_flag("--combine"),
    )
    shortcut: bool | None = Field(
        None,
        description="Plus: PlusV2's embedding shortcut (default: on for PlusV2 adapters)",
        json_schema_extra=_flag("--shortcut"),
    )
    s_scale: float = Field(
        1.0, description="PlusV2: weight of the CLIP face structure", json_schema_extra=_flag("--s-scale")
    )
    fast: FastName | None = Field(
        None,
        description="few-step preset: its distillation LoRA, scheduler, 4 steps and no guidance (faceid.fast)",
        json_schema_extra=_flag("--fast"),
    )
    scheduler: SchedulerName | None = Field(
        None,
        description="sampler (default: the pipeline's, DDIM as the authors use it; a --fast preset's own); "
        "name one for a distilled UNet, e.g. euler-trailing for an SDXL-Lightning UNet",
        json_schema_extra=_flag("--scheduler"),
    )
    eta: float | None = Field(
        None, ge=0, le=1, description="DDIM/TCD stochasticity (TCD preset: 0.3)", json_schema_extra=_flag("--eta")
    )
    identity_guidance: float = Field(
        0.0,
        ge=0,
        description="identity guidance: push further from the same prompt without the identity (0 = off, no "
        "extra UNet pass); helps few-step modes keep the likeness",
        json_schema_extra=_flag("--identity-guidance"),
    )
    identity_window: Window | None = Field(
        None,
        description="apply the identity only in this part of the denoising steps (fractions, e.g. 0 0.8)",
        json_schema_extra=_flag("--window", metavar=("START", "END")),
    )
    regions: Literal["auto", "masks"] | list[Box] | None = Field(
        None,
        description="several people in one picture: where each person of face=[...] goes, 'auto' (left-to-right "
        "columns), a box (x0, y0, x1, y1) in fractions per person, or 'masks' (mask images given to the call)",
    )
    style: list[StyleSetting] | None = Field(
        None, description="style and composition references (standard IP-Adapters); their images are given to the call"
    )
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="img2img and inpainting: how much of the init image is redrawn, in (0, 1] (default: 0.8 for "
        "img2img, 1 for inpainting; steps run: steps x strength)",
        json_schema_extra=_flag("--strength"),
    )
    base_model: str | None = Field(
        None, description="SD1.5/SDXL model: diffusers folder, Hub repo id or .safetensors file",
        json_schema_extra=_flag("--base-model"),
    )  # fmt: skip
    vae: str | None = Field(
        None,
        description="VAE to use instead of the base model's (folder or Hub repo id; the released adapters' "
        "default base model comes with sd-vae-ft-mse)",
        json_schema_extra=_flag("--vae"),
    )
    tiny_vae: str | None = Field(
        None,
        description="tiny VAE (AutoencoderTiny) for previews and --decoder tiny: taesd (SD1.5), taesdxl (SDXL), "
        "a folder or .safetensors file; the flag alone takes the base model family's (pinned download)",
        json_schema_extra=_flag("--tiny-vae", nargs="?", const="auto", metavar="SOURCE"),
    )
    decoder: Literal["full", "tiny"] | None = Field(
        None,
        description="what decodes the final image: the VAE, or the tiny VAE (faster, a little softer) "
        "(default full; tiny when --tiny-vae is given)",
        json_schema_extra=_flag("--decoder"),
    )
    adapter: str | None = Field(
        None, description="adapter file (.bin/.safetensors) or released name", json_schema_extra=_flag("--adapter")
    )
    loras: dict[str, float] | None = Field(
        None,
        description="LoRA files stacked with the identity, and their weights (e.g. style.safetensors:0.7)",
        json_schema_extra=_flag("--lora", metavar="FILE[:WEIGHT]"),
    )

    # ------------------------------------------------------------------ validation
    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in METHODS:
            raise ValueError(f"unknown identity method {value!r}: choose one of {', '.join(METHODS)} (`faceid models`)")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (Stable Diffusion's VAE works in 8-pixel cells), got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _seeds(cls, value: int | list[int] | None) -> int | list[int] | None:
        seeds = value if isinstance(value, list) else [] if value is None else [value]
        if any(not 0 <= s < 2**63 for s in seeds):
            raise ValueError("seeds must be integers from 0 to 2**63 - 1")
        if isinstance(value, list) and not value:
            raise ValueError("give at least one seed, or none for random seeds")
        return value

    @field_validator(
        "scale",
        "identitynet_scale",
        "true_cfg",
        "lora_scale",
        "s_scale",
        "guidance_scale",
        "eta",
        "identity_guidance",
        "strength",
    )
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(
        cls, values: Mapping[str, Any] | GenerationSettings | None = None, **overrides: Any
    ) -> GenerationSettings:
        """Settings from a mapping (or settings) plus overrides; bad values give one FaceIDError that names them."""
        base = values.model_dump(exclude_unset=True) if isinstance(values, GenerationSettings) else dict(values or {})
        base.update(overrides)
        try:
            return cls.model_validate(base)
        except ValidationError as exc:
            raise FaceIDError(describe_errors(exc)) from None

    @classmethod
    def from_png(cls, path: str | Path) -> GenerationSettings:
        """The settings an image was made with, from the metadata ``faceid.outputs.save_png`` wrote. The models
        that were local files or folders are not among them (``faceid.results`` records those by name and sha256
        under ``model_files``, never by path): the pipeline that runs these settings uses its own."""
        from .outputs import read_settings

        stored = read_settings(path)
        return cls.parse({key: value for key, value in stored.items() if key in cls.model_fields})

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with ``changes``, validated again."""
        return self.parse(self, **changes)

    # ------------------------------------------------------------------ defaults
    def resolve(self, family: str, **known: Any) -> GenerationSettings:
        """Every ``None`` that has a default filled in: the family's size, steps and guidance, the reference's
        prompts; ``known`` fills the rest (the adapter's scale, the variant's combine mode...)."""
        if family not in FAMILY_DEFAULTS:
            raise FaceIDError(f"unknown base model family {family!r}: {', '.join(FAMILY_DEFAULTS)}")
        defaults = {
            "prompt": DEFAULT_PROMPT,
            "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
            **FAMILY_DEFAULTS[family],
            **known,
            # A few-step preset's steps, guidance and sampler win over the family's (not over given values).
            **(PRESETS[self.fast].settings_defaults(family) if self.fast else {}),
        }
        missing = {key: value for key, value in defaults.items() if getattr(self, key) is None}
        return self.replace(**missing) if missing else self

    def for_image(self, index: int) -> GenerationSettings:
        """The settings that reproduce image ``index`` of this request alone: one image, its own seed, and its
        prompt (and negative prompt, when those are a list) alone.

        Images are ordered prompt-major: image ``index`` belongs to prompt ``index // num_images_per_prompt``,
        which was paired with face ``index // num_images_per_prompt`` of the call; give that face again.
        With ``regions`` (several people in one picture) prompts are not paired with faces: every picture
        holds all the people, so give all their faces again.
        """
        if not isinstance(self.seed, list):
            raise FaceIDError("only settings with one seed per image describe a single image")
        if not 0 <= index < len(self.seed):
            raise FaceIDError(f"no image {index}: these settings describe {len(self.seed)} image(s)")
        prompt = index // self.num_images_per_prompt
        one = {"seed": self.seed[index], "num_images_per_prompt": 1}  # an int seed: the same noise as [seed]
        for key in ("prompt", "negative_prompt"):
            value = getattr(self, key)
            if isinstance(value, list):
                one[key] = value[prompt] if len(value) > 1 else value[0]
        return self.replace(**one)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (tuples as lists), without the fields left at ``None``."""
        return self.model_dump(mode="json", exclude_none=True)


def describe_errors(exc: ValidationError) -> str:
    """pydantic's errors as one line a person can act on: ``field: what is wrong; ...``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown setting (known: {', '.join(GenerationSettings.model_fields)})"
        parts.append(f"{where}: {message}")
    return "invalid generation settings: " + "; ".join(parts)
