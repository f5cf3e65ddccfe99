"""Face photo(s) + prompt(s) -> images of that person, on a diffusers Stable Diffusion pipeline.

``FaceIDPipeline`` wraps a stock ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (it does
not fork them): it encodes the prompts with the pipeline's own ``encode_prompt``, turns the faces into
identity tokens with the installed ``FaceIDAdapter``, batches both the same way (prompt i pairs with
face i; each repeated per image; unconditional half first under classifier-free guidance), and hands
the identity tokens to the UNet through ``cross_attention_kwargs``. Everything that does not change
across denoising steps (identity tokens, their keys/values, the text keys/values) is computed once
per call.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import identity, previews
from .adapter import FaceIDAdapter, refuse_other_family
from .checkpoints import AdapterSpec, load_state_dict
from .errors import FaceIDError, MissingWeightsError
from .fast import ETA_SCHEDULERS, make_scheduler, preset
from .groups import EncodedReference, Reference, resolve_regions, token_groups
from .hub import fetch, model_not_found, offline
from .identity_guidance import identity_guidance
from .lora import LoraStack
from .modes import DEFAULT_STRENGTH, ControlInput, ModeInputs, check_controlnet, check_placement, size_from_image
from .peft_adapters import tensor_scalings
from .settings import ENCODE_FIELDS, GenerationSettings
from .variants import DEFAULT_ADAPTER, released, resolve_adapter

logger = logging.getLogger(__name__)

# The DDIM settings of the authors' demos; other fields come from the base model's scheduler config.
DDIM_OVERRIDES = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


@dataclass
class FaceIDOutput:
    """What a call returns: the images, the face analysed for each prompt (None for raw embeddings), and
    the settings with every default resolved (``settings.for_image(i)`` reproduces image i alone)."""

    images: list | np.ndarray
    faces: list = field(default_factory=list)
    nsfw_content_detected: list[bool] | None = None
    settings: GenerationSettings | None = None
    control_images: list = field(default_factory=list)  # the control images as the ControlNets saw them


@dataclass
class Conditioning:
    """Everything a call feeds the UNet, before the per-image repetition done by the pipeline."""

    pipe_kwargs: dict[str, torch.Tensor]  # prompt_embeds etc., already repeated per image
    identity: torch.Tensor  # (prompts, tokens, dim) conditional identity tokens
    uncond_identity: torch.Tensor  # (prompts, tokens, dim) unconditional identity tokens
    num_images_per_prompt: int
    faces: list = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    clip: dict[str, torch.Tensor] = field(default_factory=dict)  # Plus: CLIP pixels and features of the faces
    settings: GenerationSettings | None = None  # the encode-time settings (prompts, faces, combine...), resolved
    # Several people in one picture: ``identity`` is (prompts, people, tokens, dim), one region per person.
    regions: list = field(default_factory=list)
    references: list[EncodedReference] = field(default_factory=list)  # style/composition references

    def images(self, indices: Sequence[int]) -> Conditioning:
        """The conditioning of images ``indices`` alone, one image per prompt: a batch run in parts."""
        n = self.num_images_per_prompt
        owners = [i // n for i in indices]
        rows = torch.tensor(list(indices))
        prompts = [self.prompts[o] for o in owners]
        negatives = [self.negative_prompts[o] for o in owners]
        return Conditioning(
            pipe_kwargs={k: v[rows.to(v.device)] for k, v in self.pipe_kwargs.items() if v is not None},
            identity=self.identity[owners],
            uncond_identity=self.uncond_identity[owners],
            num_images_per_prompt=1,
            faces=[self.faces[o] for o in owners] if self.faces else [],
            prompts=prompts,
            negative_prompts=negatives,
            clip=self.clip,
            regions=self.regions,
            references=self.references,
            settings=None
            if self.settings is None
            else self.settings.replace(prompt=prompts, negative_prompt=negatives, num_images_per_prompt=1),
        )

    def identity_states(self, classifier_free_guidance: bool, unconditional: bool = False) -> torch.Tensor:
        """Identity tokens in the UNet's batch order: [uncond p0 p0 p1 p1 ; cond p0 p0 p1 p1]
        (``unconditional``: the unconditional tokens of the conditional half alone)."""
        n = self.num_images_per_prompt
        if unconditional:
            return self.uncond_identity.repeat_interleave(n, dim=0)
        cond = self.identity.repeat_interleave(n, dim=0)
        if not classifier_free_guidance:
            return cond
        return torch.cat([self.uncond_identity.repeat_interleave(n, dim=0), cond])


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # Half precision on accelerators (the released weights are fp16); float32 on the CPU, where fp16
    # matmuls are slow or unsupported.
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def load_base_pipeline(
    base_model: str | os.PathLike,
    torch_dtype: torch.dtype,
    vae: str | None = None,
    single_file_config: str | os.PathLike | None = None,
):
    """A Stable Diffusion 1.5 or SDXL pipeline from a diffusers folder, a Hub repo id or a single file.

    A single file holds weights only; diffusers fetches the matching model configuration from the Hub
    unless ``single_file_config`` names a diffusers folder (or repo id) of the same architecture.
    """
    from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    # HF_HUB_OFFLINE is read by huggingface_hub at import; passing it on makes a later setting count too.
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": offline()}
    if vae is not None:
        try:
            kwargs["vae"] = AutoencoderKL.from_pretrained(str(vae), dtype=torch_dtype, local_files_only=offline())
        except Exception as exc:
            raise model_not_found(str(vae), exc) from exc
    path = Path(base_model).expanduser()
    try:
        if path.is_file():
            # Single-file checkpoints (.safetensors/.ckpt, original layout): SDXL ones have a "conditioner".
            cls = StableDiffusionXLPipeline if _is_sdxl_single_file(path) else StableDiffusionPipeline
            if single_file_config is not None:
                kwargs["config"] = str(single_file_config)
            pipe = cls.from_single_file(str(path), **kwargs)
        else:
            pipe = DiffusionPipeline.from_pretrained(str(base_model), **kwargs)
    except FaceIDError:
        raise
    except Exception as exc:
        raise model_not_found(str(base_model), exc) from exc
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise FaceIDError(
            f"{base_model} is a {type(pipe).__name__}; faceid works with Stable Diffusion 1.5 and SDXL "
            "text-to-image pipelines"
        )
    return pipe


def default_models(
    base_model: str | os.PathLike | None, adapter: str | os.PathLike, vae: str | os.PathLike | None = None
) -> tuple[str, str | None]:
    """The base model and VAE that ``FaceIDPipeline.from_pretrained`` loads for these arguments: by default a
    released adapter's base model, with the VAE the authors pair with it (whether that base model is named or
    defaulted)."""
    release = released(adapter)
    if base_model is None:
        if release is None:
            raise FaceIDError("give base_model: the Stable Diffusion model to generate with")
        base_model = release.base_model
    if vae is None and release is not None and str(base_model) == release.base_model:
        vae = release.vae
    return str(base_model), None if vae is None else str(vae)


def model_family(base_model: str | os.PathLike, adapter: str | os.PathLike = DEFAULT_ADAPTER) -> str:
    """``"SD1.5"`` or ``"SDXL"``: the family of a base model, read from its configuration (a released adapter's
    table, a single file's keys, the pipeline's ``model_index.json``) without loading its weights."""
    from diffusers import DiffusionPipeline

    release = released(adapter)
    if release is not None and str(base_model) == release.base_model:
        return release.family
    path = Path(base_model).expanduser()
    if path.is_file():
        return "SDXL" if _is_sdxl_single_file(path) else "SD1.5"
    try:
        config = DiffusionPipeline.load_config(str(base_model), local_files_only=offline())
    except Exception as exc:
        raise model_not_found(str(base_model), exc) from exc
    name = config.get("_class_name", "")
    if name.startswith("StableDiffusionXL"):
        return "SDXL"
    if name.startswith("StableDiffusion"):
        return "SD1.5"
    raise FaceIDError(f"{base_model} is a {name or 'pipeline of unknown kind'}; faceid works with Stable "
                      "Diffusion 1.5 and SDXL text-to-image pipelines")  # fmt: skip


def _unet_cross_attention_dim(base_model: str | os.PathLike) -> int | None:
    """The UNet's cross-attention width from a local diffusers folder's config; None when not at hand."""
    config = Path(base_model).expanduser() / "unet" / "config.json"
    if not config.is_file():
        return None
    try:
        return int(json.loads(config.read_text())["cross_attention_dim"])
    except (ValueError, KeyError, TypeError):
        return None


def _is_sdxl_single_file(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return any(key.startswith("conditioner.") for key in handle.keys())


class FaceIDPipeline:
    """Identity-preserving text-to-image generation.

    >>> pipe = FaceIDPipeline.from_pretrained("SG161222/Realistic_Vision_V4.0_noVAE", adapter="faceid-sd15")
    >>> images = pipe("a photo of a person as an astronaut", face="me.jpg", seed=42).images
    """

    def __init__(
        self,
        pipe,
        adapter: FaceIDAdapter,
        face_analyzer=None,
        face_models: str | os.PathLike | None = None,
        base_model: str | None = None,
        image_encoder: identity.CLIPFaceEncoder | None = None,
        shortcut: bool = False,
        adapter_source: str | None = None,
        vae_source: str | None = None,
        tiny_vae=None,
        tiny_vae_source: str | None = None,
    ):
        self.pipe = pipe
        self.adapter = adapter
        self.adapter_source = adapter_source  # the adapter as the user named it (a released name or a file)
        self.vae_source = vae_source  # the VAE loaded instead of the base model's own (None: its own)
        # The tiny VAE (TAESD/TAESDXL ``AutoencoderTiny``): previews, and the final decode where a call asks.
        self.tiny_vae = tiny_vae
        self.tiny_vae_source = tiny_vae_source
        self.image_encoder = image_encoder
        self.shortcut = shortcut  # Plus: the default of the per-call ``shortcut`` (True for PlusV2)
        self.base_model = base_model or getattr(pipe, "name_or_path", None)
        self._face_analyzer = face_analyzer
        self._face_models = face_models
        # The user LoRAs (load_lora); their text-encoder parts go onto the pipeline's text encoder(s).
        encoders = {key: getattr(pipe, key, None) for key in ("text_encoder", "text_encoder_2")}
        self.lora_stack = LoraStack(pipe.unet, encoders)
        self._fast_loras: dict[str, str] = {}  # few-step LoRAs loaded (adapter name -> file), see load_fast_lora
        # The img2img / inpainting / ControlNet pipelines built from ``pipe`` (class name -> pipeline), see
        # ``pipeline_for``: they share every module of ``pipe`` and hold no ControlNet between calls.
        self._siblings: dict[str, Any] = {}
        # Standard IP-Adapters loaded next to FaceID for style/composition references (load_reference), and the
        # CLIP image encoder that reads their images where the adapter itself needs none (FaceID, not Plus).
        self.references: dict[str, Any] = {}
        self._reference_encoder: identity.CLIPFaceEncoder | None = None
        self._reference_encoder_source: str | None = None  # the path it was loaded from, if given

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        base_model: str | os.PathLike | None = None,
        adapter: str | os.PathLike = DEFAULT_ADAPTER,
        *,
        vae: str | os.PathLike | None = None,
        tiny_vae: str | os.PathLike | None = None,
        single_file_config: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        scheduler: str | None = "ddim",
        scale: float = 1.0,
        lora_scale: float = 1.0,
        fuse_lora: bool = False,
        face_analyzer=None,
        face_models: str | os.PathLike | None = None,
        image_encoder: str | os.PathLike | None = None,
        shortcut: bool | None = None,
        loras: Sequence[str | os.PathLike | tuple[str | os.PathLike, float]] = (),
        progress: bool = True,
        compile: bool = False,
    ) -> FaceIDPipeline:
        """Load a base model and install an adapter in it.

        ``base_model``: a diffusers folder, a Hub repo id or a single ``.safetensors`` file; by default
        the base model the adapter's authors show (with its VAE). ``single_file_config``: for a single
        file offline, a diffusers folder of the same architecture to take the configuration from. ``adapter``: a released adapter's name
        (``faceid-sd15`` ...) or a ``.bin``/``.safetensors`` file. ``scheduler="ddim"`` uses the authors'
        DDIM settings; ``None`` keeps the base model's scheduler. ``fuse_lora`` merges the identity LoRA
        into the UNet weights (faster; ``lora_scale`` is then fixed until ``adapter.unfuse_lora()``).
        ``face_analyzer`` / ``face_models``: a ready ``FaceAnalyzer``, or the folder of the buffalo_l
        models (fetched into the cache on first use when neither is given). ``image_encoder`` (Plus
        only): the CLIP ViT-H image encoder, by default ``h94/IP-Adapter`` ``models/image_encoder`` at the
        table's pinned commit.
        ``shortcut`` (Plus only): the default of PlusV2's shortcut; None takes the variant table's (on for
        PlusV2, as the authors use it), the variant told by the released name or, for other files, by
        whether the file name says ``plusv2`` (Plus and PlusV2 files have the same tensors). ``loras``:
        LoRA files (or ``(file, weight)``) to stack with the identity LoRA, as ``load_lora`` does.
        ``tiny_vae``: a tiny VAE for previews and for calls with ``decoder="tiny"``: ``"taesd"`` (SD1.5),
        ``"taesdxl"`` (SDXL) or ``"auto"`` (the family's; pinned downloads), a diffusers ``AutoencoderTiny``
        folder or its ``.safetensors`` file.
        ``compile``: ``compile()`` the UNet once everything is loaded (see there; the first call is slow).
        """
        release = released(adapter)
        base_model, vae = default_models(base_model, adapter, vae)
        adapter_path = resolve_adapter(adapter)
        state = load_state_dict(adapter_path)
        spec = AdapterSpec.from_state_dict(state, adapter_path.name)
        # Refuse an adapter made for another family before loading gigabytes of base model, when the
        # base model's UNet config can be read cheaply.
        base_cad = _unet_cross_attention_dim(base_model)
        if base_cad is not None and base_cad != spec.cross_attention_dim:
            refuse_other_family(spec, base_cad, adapter_path.name)
        device = torch.device(device) if device is not None else default_device()
        torch_dtype = torch_dtype or default_dtype(device)

        pipe = load_base_pipeline(base_model, torch_dtype, vae, single_file_config)
        if scheduler == "ddim":
            from diffusers import DDIMScheduler

            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **DDIM_OVERRIDES)
        elif scheduler is not None:
            raise FaceIDError(f"unknown scheduler {scheduler!r}: use 'ddim' or None (keep the base model's)")
        pipe.set_progress_bar_config(disable=not progress)
        pipe.to(device)
        tiny = tiny_source = None
        if tiny_vae is not None:
            tiny, tiny_source = previews.load_tiny_vae(tiny_vae, _family(pipe), pipe.vae, torch_dtype, device)
        installed = FaceIDAdapter.install(pipe.unet, state, scale=scale, lora_scale=lora_scale, label=adapter_path.name)
        if fuse_lora:
            installed.fuse_lora()
        encoder = None
        if spec.perceiver is not None:
            source = image_encoder or (release.image_encoder if release else None)
            encoder = identity.CLIPFaceEncoder.from_pretrained(source, dtype=torch_dtype, device=device)
            if encoder.hidden_size != spec.perceiver.clip_dim:
                raise FaceIDError(
                    f"the image encoder gives {encoder.hidden_size}-d features but {adapter_path.name} takes "
                    f"{spec.perceiver.clip_dim}-d ones (the Plus adapters use CLIP ViT-H/14, 1280-d)"
                )
        if shortcut is None:
            # Plus and PlusV2 checkpoints have the same tensors; the released name says which one it is.
            shortcut = release.shortcut if release else spec.architecture(Path(str(adapter)).name).shortcut
        loaded = cls(
            pipe,
            installed,
            face_analyzer=face_analyzer,
            face_models=face_models,
            base_model=str(base_model),
            image_encoder=encoder,
            shortcut=shortcut,
            adapter_source=str(adapter),
            vae_source=None if vae is None else str(vae),
            tiny_vae=tiny,
            tiny_vae_source=tiny_source,
        )
        for item in loras:
            path, weight = item if isinstance(item, tuple) else (item, 1.0)
            loaded.load_lora(path, weight)
        if compile:
            loaded.compile()
        return loaded

    def compile(self, mode: str | None = None, backend: str | Callable | None = None) -> FaceIDPipeline:
        """``torch.compile`` the UNet in place (its Python object stays the same); returns the pipeline.

        On CUDA the UNet goes to the channels_last memory format and compiles with ``mode="max-autotune"``
        (inductor: Triton kernels tuned per shape, CUDA graphs); elsewhere with inductor's default mode.
        ``mode`` / ``backend`` override that (``backend="eager"`` or ``"aot_eager"`` trace without
        generating code). The compilation happens at the first call and takes long (tens of seconds on a
        CPU for a small model, minutes on CUDA with max-autotune for SDXL); so does the first call at a
        new image size, batch size or dtype, which compile a graph of their own. The identity scale, the
        LoRA weights (of the identity LoRA and of stacked ones), the identity window, the face, the
        prompt, the seed and the number of steps are tensors or live outside the UNet: changing them
        recompiles nothing. Loading or removing a LoRA, fusing or unfusing one, or replacing attention
        processors recompiles once. Keep the pipeline on its device after compiling.
        """
        unet = self.pipe.unet
        cuda = unet.device.type == "cuda"
        if cuda:
            unet.to(memory_format=torch.channels_last)
        tensor_scalings(unet)  # LoRA weights in tensors, on the UNet's device: a new weight is no new graph
        if mode is None and cuda and backend in (None, "inductor"):
            mode = "max-autotune"
        unet.compile(mode=mode, backend=backend or "inductor")
        return self

    @property
    def compiled(self) -> bool:
        """Whether ``compile()`` (or ``unet.compile()``) compiled the UNet."""
        return getattr(self.pipe.unet, "_compiled_call_impl", None) is not None

    # ------------------------------------------------------------------ properties
    @property
    def family(self) -> str:
        return _family(self.pipe)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def face_analyzer(self):
        if self._face_analyzer is None:
            from .faces import FaceAnalyzer

            self._face_analyzer = FaceAnalyzer.from_pretrained(self._face_models)
        return self._face_analyzer

    # ------------------------------------------------------------------ user LoRAs
    def load_lora(self, path: str | os.PathLike, weight: float = 1.0, name: str | None = None) -> str:
        """Stack an ecosystem LoRA (kohya or diffusers layout; a style, a character...) with its own weight,
        on the UNet and (its text-encoder part) on the text encoders.

        The identity LoRA and any other loaded LoRA stay active. Returns the name to use with
        ``set_lora_weight`` / ``remove_lora`` (default: the file name without suffix).
        """
        return self._stack_lora(path, name or Path(path).stem, weight)

    def _stack_lora(self, path: str | os.PathLike, name: str, weight: float, label: str | None = None) -> str:
        name = self.lora_stack.load(path, name=name, weight=weight, label=label).name
        if self.compiled:  # its weight in a tensor too: changing it later recompiles nothing
            tensor_scalings(self.pipe.unet)
        return name

    def set_lora_weight(self, name: str, weight: float) -> None:
        self.lora_stack.set_weight(name, weight)

    def remove_lora(self, name: str) -> None:
        self.lora_stack.remove(name)

    def lora_sources(self) -> dict[str, float]:
        """The stacked LoRAs (not the identity LoRA, nor a few-step preset's) by the file they came from, with
        their weights."""
        fast = set(self._fast_loras.values())
        return {source: weight for source, weight in self.lora_stack.sources().items() if source not in fast}

    @property
    def loras(self) -> dict[str, float]:
        """Every LoRA on the UNet and its weight, the identity LoRA included."""
        return self.lora_stack.list()

    # ------------------------------------------------------------------ img2img, inpainting, ControlNet
    def load_controlnet(self, source: str | os.PathLike):
        """A diffusers ``ControlNetModel`` (Hub id or diffusers folder) in this pipeline's dtype, on its device,
        for ``ControlInput(image, controlnet, scale, window)``; one made for the other family is refused."""
        from diffusers import ControlNetModel

        try:
            controlnet = ControlNetModel.from_pretrained(
                str(source), dtype=self.pipe.unet.dtype, local_files_only=offline()
            )
        except Exception as exc:
            raise model_not_found(str(source), exc) from exc
        check_controlnet(controlnet, self.pipe.unet, self.family, str(source))
        return controlnet.to(self.device).eval().requires_grad_(False)

    def pipeline_for(self, class_name: str | None):
        """The diffusers pipeline named ``class_name`` (``StableDiffusionXLControlNetInpaintPipeline``...) made
        from the loaded one with ``from_pipe``: every module shared, nothing copied; None is the loaded one.

        Built once and kept while it shares the loaded pipeline's components (replacing one of them, e.g.
        ``pipe.pipe.scheduler = ...``, builds it again). A ControlNet pipeline is kept without a ControlNet:
        each call sets its own for the call only, so no ControlNet stays alive through this cache.
        """
        if class_name is None:
            return self.pipe
        import diffusers

        base = self.pipe.components
        cached = self._siblings.get(class_name)
        if cached is not None:
            mine = cached.components
            if all(mine.get(key) is value or mine.get(key) == value for key, value in base.items() if key in mine):
                return cached
        extra = {"controlnet": None} if "ControlNet" in class_name else {}
        from diffusers.utils import logging as diffusers_logging

        # from_pipe casts every module to ``dtype`` (float32 unless told): the loaded one's, a no-op (and no
        # occasion for diffusers' warning about casting with ``to()``).
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            sibling = getattr(diffusers, class_name).from_pipe(self.pipe, dtype=self.pipe.unet.dtype, **extra)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        sibling.set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {}))
        self._siblings[class_name] = sibling
        return sibling

    # ------------------------------------------------------------------ style and composition references
    def load_reference(
        self,
        source: str | os.PathLike = "plus-face",
        name: str | None = None,
        image_encoder: str | os.PathLike | identity.CLIPFaceEncoder | None = None,
    ) -> str:
        """Load a standard IP-Adapter next to FaceID for ``style=[Reference(image, scale)]``; returns its name.

        ``source``: ``"plain"``, ``"plus"`` or ``"plus-face"`` (``h94/IP-Adapter``'s ViT-H adapters for this
        family, fetched on first use) or a checkpoint file in either official layout. ``name`` (default: the
        kind or the file name) is what a ``Reference`` names. Its images are read by the pipeline's CLIP
        image encoder (Plus), else by ``image_encoder`` (default: ``h94/IP-Adapter``'s ViT-H, loaded once).
        """
        from .references import REFERENCE_ADAPTERS, ReferenceAdapter, reference_name

        if str(source) in REFERENCE_ADAPTERS:
            path, label = fetch(REFERENCE_ADAPTERS[str(source)][self.family]), str(source)
        else:
            path, label = Path(source), Path(source).name
        name = name or reference_name(source)
        if name in self.references:
            raise FaceIDError(f"a reference adapter named {name!r} is loaded already; remove_reference it first")
        adapter = ReferenceAdapter.install(self.adapter, path, name=name, label=label)
        try:
            if isinstance(image_encoder, identity.CLIPFaceEncoder):
                self._reference_encoder = image_encoder
            elif image_encoder is not None and str(image_encoder) == self._reference_encoder_source:
                pass  # that encoder is loaded already
            elif image_encoder is not None or (self.image_encoder is None and self._reference_encoder is None):
                param = next(self.pipe.unet.parameters())
                self._reference_encoder = identity.CLIPFaceEncoder.from_pretrained(
                    image_encoder, dtype=param.dtype, device=param.device
                )
                self._reference_encoder_source = None if image_encoder is None else str(image_encoder)
            for loaded in (*self.references.values(), adapter):  # a new encoder must suit those loaded too
                loaded.check_encoder(self.reference_encoder)
        except Exception:
            adapter.remove()
            raise
        self.references[name] = adapter
        return name

    def remove_reference(self, name: str) -> None:
        self._reference(name).remove()
        del self.references[name]

    @property
    def reference_encoder(self) -> identity.CLIPFaceEncoder | None:
        """The CLIP image encoder that reads reference images."""
        return self._reference_encoder or self.image_encoder

    def _reference(self, name: str | None):
        if name is None and len(self.references) == 1:
            return next(iter(self.references.values()))
        if name in self.references:
            return self.references[name]
        loaded = ", ".join(self.references) or "none"
        if name is None:
            raise FaceIDError(
                f"style references need a reference adapter: load one with pipe.load_reference('plus-face') "
                f"(CLI --style-adapter), and name it in Reference(adapter=...) when several are loaded (loaded: {loaded})"
            )
        raise FaceIDError(f"no reference adapter named {name!r} is loaded (loaded: {loaded}); see load_reference")

    def _encode_references(self, style: Sequence[Any]) -> list[EncodedReference]:
        from .groups import check_box, is_box
        from .images import load_image

        encoded = []
        for k, item in enumerate(style):
            ref = item if isinstance(item, Reference) else Reference(item)
            adapter = self._reference(ref.adapter)
            if ref.face_crop:  # the aligned face, as FaceID-Plus reads it (a Face, or the face of a photo)
                crop = ref.image.crop_224 if identity.is_face(ref.image) else self.face_analyzer.get(ref.image).crop_224
                image = load_image(crop)
            else:
                image = load_image(ref.image)
            _, features, uncond = self.reference_encoder.features([image], penultimate=adapter.spec.penultimate)
            cond, uncond_tokens = adapter.tokens(features, uncond)
            region = ref.region
            if is_box(region):
                region = check_box(region, f"reference {k}'s region")
            encoded.append(
                EncodedReference(adapter.name, cond, uncond_tokens, float(ref.scale), ref.window, region, ref.face_crop)
            )
        return encoded

    # ------------------------------------------------------------------ conditioning
    @property
    def default_combine(self) -> str:
        """The variant table's: Portrait was trained on concatenated per-photo tokens, the others on one
        embedding."""
        return self.adapter.spec.architecture().combine

    @torch.no_grad()
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
        """Text embeddings and identity tokens for a call; prompt i pairs with identity i.

        See ``__call__`` for the arguments (only the settings of ``faceid.settings.ENCODE_FIELDS`` matter
        here); ``face_image`` gives the aligned 224x224 face crops that the Plus variants need when
        ``face`` holds embeddings rather than photos or ``Face`` objects. With ``regions`` (or the settings'
        ``regions``), ``face`` lists the people of every picture instead, person k in region k.
        """
        unknown = sorted(set(overrides) - set(ENCODE_FIELDS))
        if unknown:
            raise FaceIDError(f"encode() takes the settings {', '.join(ENCODE_FIELDS)}; not {', '.join(unknown)}")
        if prompt is not None:
            overrides["prompt"] = list(prompt) if isinstance(prompt, tuple) else prompt
        encoded = self.resolve_settings(GenerationSettings.parse(settings, **overrides))
        combine = encoded.combine
        found = identity.collect(
            face, lambda photo: self.face_analyzer.get(photo, index=encoded.face_index), face_image
        )
        prompts = _as_list(encoded.prompt)
        if regions is None:
            regions = encoded.regions
        if regions == "masks":
            raise FaceIDError("these settings place the people by mask images: give the masks with regions=[...]")
        placed: list = []
        if regions is not None:  # several people in each picture, not one person per prompt
            recorded, placed = resolve_regions(regions, len(found), lambda image: self.face_analyzer.analyze(image))
            encoded = encoded.replace(regions=recorded)
        if style is None and encoded.style:
            raise FaceIDError(
                f"these settings name {len(encoded.style)} style reference(s): give their images with "
                "style=[Reference(image, ...)] (CLI --style)"
            )
        references = self._encode_references(style or [])
        if references:
            encoded = encoded.replace(style=[self._style_setting(r) for r in references])
        if not placed:  # pair faces with prompts (placed people are in every picture instead)
            if len(prompts) == 1 and len(found) > 1:
                prompts = prompts * len(found)
            if len(found) == 1 and len(prompts) > 1:
                found = found.repeat(len(prompts))
            if len(found) != len(prompts):
                raise FaceIDError(
                    f"{len(prompts)} prompts but {len(found)} faces: give one face for all prompts, "
                    "one prompt for all faces, or one face per prompt"
                )
        negatives = _as_list(encoded.negative_prompt)
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise FaceIDError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        num_images_per_prompt = encoded.num_images_per_prompt
        embeds = identity.stack(found, combine)
        self._check_embedding_dim(embeds)

        clip = {}
        if self.adapter.projection.needs_clip:
            if self.image_encoder is None:
                raise FaceIDError("this FaceID-Plus adapter needs a CLIP image encoder (image_encoder=...)")
            pixels, features, uncond = self.image_encoder([c for row in found.crops for c in row])
            counts = found.photos_per_identity
            clip = {
                "clip_pixel_values": pixels,
                "clip_embeds": identity.combine_features(features, counts, combine),
                "uncond_clip_embeds": identity.combine_features(uncond, counts, combine),
            }
        cond, uncond = self.adapter.identity_tokens(
            embeds,
            clip.get("clip_embeds"),
            clip.get("uncond_clip_embeds"),
            shortcut=bool(encoded.shortcut),
            s_scale=encoded.s_scale,
        )
        faces = [row[0] if len(row) == 1 else row for row in found.faces]
        if placed:  # every prompt gets all the people: (prompts, people, tokens, dim)
            cond = cond[None].expand(len(prompts), *cond.shape).contiguous()
            uncond = uncond[None].expand(len(prompts), *uncond.shape).contiguous()
            faces = [faces] * len(prompts)

        text = self.pipe.encode_prompt(
            prompts,
            device=self.device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=True,
            negative_prompt=negatives,
        )
        names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        return Conditioning(
            pipe_kwargs=dict(zip(names, text, strict=False)),
            identity=cond,
            uncond_identity=uncond,
            num_images_per_prompt=num_images_per_prompt,
            faces=faces,
            prompts=prompts,
            negative_prompts=negatives,
            clip=clip,
            regions=placed,
            references=references,
            settings=encoded.replace(
                prompt=prompts[0] if isinstance(encoded.prompt, str) else prompts,
                negative_prompt=negatives[0] if isinstance(encoded.negative_prompt, str) else negatives,
            ),
        )

    @staticmethod
    def _style_setting(reference: EncodedReference) -> dict[str, Any]:
        region = reference.region if reference.region is None or isinstance(reference.region, tuple) else "mask"
        return {
            "adapter": reference.adapter,
            "scale": reference.scale,
            "window": reference.window,
            "region": region,
            "face_crop": reference.face_crop or None,
        }

    def resolve_settings(self, settings: GenerationSettings | Mapping[str, Any] | None = None) -> GenerationSettings:
        """``settings`` with every default this pipeline would use filled in (family, adapter, variant)."""
        requested = GenerationSettings.parse(settings)
        self._check_models(requested)
        # The tiny VAE as loaded ("auto" named): checked above, recorded as what this pipeline has.
        return requested.replace(tiny_vae=None).resolve(self.family, **self._known_defaults())

    def _known_defaults(self) -> dict[str, Any]:
        """Defaults that come from what is loaded rather than from the family."""
        known: dict[str, Any] = {
            "combine": self.default_combine,
            "scale": self.adapter.scale,
            "base_model": self.base_model,
            "adapter": self.adapter_source,
            "vae": self.vae_source,
            "tiny_vae": self.tiny_vae_source,
            "decoder": "full",
            "loras": self.lora_sources(),
        }
        if self.adapter.spec.lora_rank:
            known["lora_scale"] = self.adapter.lora_scale
        if self.image_encoder is not None:  # the shortcut means something for Plus only
            known["shortcut"] = self.shortcut
        return known

    @staticmethod
    def _window_callback(
        windows: Sequence[tuple[tuple[float, float], Callable[[bool], None]]], steps: int, pipeline_kwargs: dict
    ) -> dict:
        """A step-end callback that lets each gated part (the identity adapter, a token group) act inside its
        window (fractions of the steps) only: ``windows`` pairs each window with its gate.

        Step i is inside when start <= i / steps < end; the gate for step i+1 is set at the end of step i,
        and step 0's here, before the loop. A user's own callback still runs. The gate only narrows: an
        adapter the user switched off stays off, and the user's settings are never touched.
        """
        user_callback = pipeline_kwargs.get("callback_on_step_end")

        def set_gates(step: int) -> None:
            for (start, end), gate in windows:  # already checked by GenerationSettings
                gate(start <= step / steps < end)

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            set_gates(step + 1)
            return user_callback(pipeline, step, timestep, callback_kwargs) if user_callback else callback_kwargs

        set_gates(0)
        extra = {"callback_on_step_end": on_step_end}
        if hasattr(user_callback, "tensor_inputs") and "callback_on_step_end_tensor_inputs" not in pipeline_kwargs:
            extra["callback_on_step_end_tensor_inputs"] = user_callback.tensor_inputs
        return extra

    def _check_embedding_dim(self, embeds: torch.Tensor) -> None:
        expected = self.adapter.spec.id_dim
        if embeds.shape[-1] != expected:
            raise FaceIDError(
                f"face embeddings are {embeds.shape[-1]}-d but the adapter takes {expected}-d embeddings "
                "(insightface buffalo_l ArcFace)"
            )
        norms = embeds.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-2):
            logger.warning(
                "face embeddings are not L2-normalised (norms %s); the released adapters were trained on "
                "insightface's normed_embedding",
                [round(float(n), 3) for n in norms.flatten()[:4]],
            )

    # ------------------------------------------------------------------ generation
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
        (fractions; ``(0, 1)`` is every step, an empty window switches it off, bit for bit).
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
        list of them (several ControlNets at once). The call runs the matching diffusers pipeline
        (``pipeline_for``). Width and height default to the init image's (else the first control image's),
        and every image is resized to the output size; ``result.control_images`` are the control images used.

        Several people in one picture: ``face=[alice, bob]`` with ``regions`` (``"auto"``: left-to-right
        columns; one box ``(x0, y0, x1, y1)`` in fractions or one mask image per person; or a photo with that
        many people, whose faces give the columns): every prompt gets all of them, person k acting only in
        region k, the identity LoRA applied once. Style and composition references: ``style=[Reference(image,
        scale, adapter, window, region)]`` (or bare images, scale 0.5) read by the standard IP-Adapters loaded
        with ``load_reference``. Each person and each reference is a token group of the attention processor.
        """
        fields = GenerationSettings.model_fields
        diffusers_kwargs = {k: v for k, v in kwargs.items() if k not in fields}
        inputs = ModeInputs.load(init_image, mask_image, control)
        for k, item in enumerate(inputs.controls):
            check_controlnet(item.controlnet, self.pipe.unet, self.family, f"control[{k}]")
            check_placement(item.controlnet, self.pipe.unet, f"control[{k}]")
        target = self.pipeline_for(inputs.class_name(self.family))
        self._check_diffusers_kwargs(diffusers_kwargs, target)
        previews.check_preview_arguments(preview_every, on_preview)
        overrides = {k: v for k, v in kwargs.items() if k in fields}
        if prompt is not None:
            overrides["prompt"] = list(prompt) if isinstance(prompt, tuple) else prompt
        requested = GenerationSettings.parse(settings, **overrides)
        self._check_models(requested)  # before encoding: a request for other models fails at once
        if inputs.mode is None and requested.strength is not None:
            raise FaceIDError(
                "strength applies to img2img and inpainting: give init_image (--init-image) or leave it out"
            )
        if inputs.mode is not None and requested.strength is None:
            requested = requested.replace(strength=DEFAULT_STRENGTH[inputs.mode])
        if inputs.size() is not None:  # the output size: what is given, the rest from the image
            width, height = size_from_image(requested.width, requested.height, inputs.size())
            requested = requested.replace(width=width, height=height)
        if latents is not None and "latents" not in inspect.signature(target.__call__).parameters:
            raise FaceIDError(
                f"latents= does not apply to {type(target).__name__}: the init image gives them; leave it out"
            )
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
            self._check_same_encoding(requested, conditioning.settings)
        run = self.resolve_settings(requested.replace(**conditioning.settings.model_dump(include=set(ENCODE_FIELDS))))
        total = len(conditioning.prompts) * conditioning.num_images_per_prompt
        if run.seed is None and generator is None and latents is None:
            run = run.replace(seed=[random.randrange(2**31) for _ in range(total)])  # every image reproducible
        if isinstance(run.seed, list) and len(run.seed) != total:
            raise FaceIDError(f"{len(run.seed)} seeds for {total} images: give one seed per image, or one int")
        # As diffusers decides it: guidance above 1 on a UNet without a distilled guidance embedding.
        cfg = run.guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        # Per-image seeds make a batch separable: run it in parts of at most ``limit`` images, each image as
        # it would be in the whole batch. (One seed for the batch, or given latents, draw the noise of every
        # image from one stream: those run whole.)
        separable = isinstance(run.seed, list) and generator is None and latents is None
        limit = max_batch if max_batch is not None else self.max_batch_size(run, cfg)
        if max_batch is not None and max_batch < 1:
            raise FaceIDError(f"max_batch must be at least 1, got {max_batch}")
        inputs = inputs.sized(run.width, run.height)
        if run.strength is not None and int(run.num_inference_steps * run.strength) < 1:
            raise FaceIDError(
                f"strength {run.strength} of {run.num_inference_steps} steps runs no step: raise strength or steps"
            )
        if separable and limit is not None and total > limit:
            previewing = {"preview_every": preview_every, "on_preview": on_preview} if on_preview else {}
            images = {"init_image": inputs.init_image, "mask_image": inputs.mask_image, "control": inputs.controls}
            return self._in_parts(conditioning, run, limit, output_type, {**diffusers_kwargs, **previewing, **images})
        if generator is None and run.seed is not None:
            generator = seeded_generators(run.seed)
        cross_attention_kwargs = dict(diffusers_kwargs.pop("cross_attention_kwargs", None) or {})
        group_windows: list = []
        if conditioning.identity.ndim == 3 and not conditioning.references:  # one person: the FaceID tensor path
            cross_attention_kwargs["ip_hidden_states"] = conditioning.identity_states(cfg)
        else:
            groups, group_windows = token_groups(
                conditioning.identity_states(cfg),
                conditioning.identity_states(False, unconditional=True),
                conditioning.regions,
                conditioning.references,
                total,
                cfg,
                run.width,
                run.height,
                self.adapter.name,
            )
            cross_attention_kwargs["ip_hidden_states"] = groups
        scheduler = self._scheduler_for(run)
        if run.eta is not None:
            diffusers_kwargs["eta"] = run.eta
        fast_lora = self.load_fast_lora(run.fast) if run.fast else None
        # Refuse before any work if other code took the adapter's processors: the identity would vanish.
        self.adapter.check_attached()
        accepted = inspect.signature(target.__call__).parameters
        sizes = {"width": run.width, "height": run.height} if "width" in accepted else {}  # img2img: the image's
        with contextlib.ExitStack() as stack:
            gate = stack.enter_context(self.adapter.scaled(run.scale, run.lora_scale))
            stack.enter_context(self.adapter.caching())
            # Everything below is set on ``target``, the pipeline this call runs, and put back after it.
            if inputs.controls:
                stack.enter_context(_swapped(target, "controlnet", inputs.controlnet()))
            if scheduler is not None:
                stack.enter_context(_swapped(target, "scheduler", scheduler))
            if fast_lora is not None:
                stack.enter_context(self.lora_stack.acting(fast_lora, 1.0))
            stack.enter_context(
                identity_guidance(
                    self.pipe.unet,
                    run.identity_guidance,
                    run.guidance_scale,
                    cfg,
                    conditioning.identity_states(False, unconditional=True),
                )
            )
            windows = [(window, group.set_open) for window, group in group_windows]
            if run.identity_window is not None:
                windows.append((run.identity_window, gate))
            if windows:
                diffusers_kwargs.update(self._window_callback(windows, run.num_inference_steps, diffusers_kwargs))
            # Previews and the tiny decode last for this call only: nothing of them stays on the pipeline.
            if on_preview is not None:
                shown_by = self.tiny_vae or self.pipe.vae
                diffusers_kwargs.update(
                    stack.enter_context(
                        previews.live_previews(target, shown_by, preview_every, on_preview, diffusers_kwargs)
                    )
                )
            if run.decoder == "tiny":  # (img2img and inpainting: it encodes the init image too)
                stack.enter_context(_swapped(target, "vae", self.tiny_vae))
            result = target(
                **conditioning.pipe_kwargs,
                **inputs.pipeline_kwargs(run.strength, total),
                **sizes,
                **({"latents": latents} if latents is not None else {}),
                num_inference_steps=run.num_inference_steps,
                guidance_scale=run.guidance_scale,
                generator=generator,
                output_type=output_type,
                cross_attention_kwargs=cross_attention_kwargs,
                **diffusers_kwargs,
            )
        return FaceIDOutput(
            images=result.images,
            faces=conditioning.faces,
            nsfw_content_detected=getattr(result, "nsfw_content_detected", None),
            settings=run,
            control_images=[c.image for c in inputs.controls],
        )

    # ------------------------------------------------------------------ batches that do not fit at once
    def max_batch_size(self, run: GenerationSettings, classifier_free_guidance: bool) -> int | None:
        """How many images of ``run``'s size fit in one UNet batch in the device's free memory; None when no
        limit is known (CPU, MPS: the batch runs whole).

        A rough estimate (what a UNet pass keeps alive per image, about 60 activations of its first block's
        width at the latent size, twice under guidance; the VAE decodes one image at a time then), capped
        at 64. A batch that still runs out of memory is retried in halves (``_in_parts``).
        """
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        unet = self.pipe.unet
        latent_pixels = (run.width // self.pipe.vae_scale_factor) * (run.height // self.pipe.vae_scale_factor)
        per_image = 60 * unet.config.block_out_channels[0] * latent_pixels * unet.dtype.itemsize
        per_image *= 2 if classifier_free_guidance else 1
        return max(1, min(64, int(0.7 * free // per_image)))

    def _in_parts(
        self, conditioning: Conditioning, run: GenerationSettings, limit: int, output_type: str, kwargs: dict
    ) -> FaceIDOutput:
        """Run the images of ``run`` in batches of at most ``limit``; halve it on a CUDA out-of-memory error.

        Every image keeps its seed, prompt and face, so each is the image the whole batch would give. A step
        callback runs once per part and step. ``kwargs``: the call's other arguments (diffusers', previews);
        its settings are all in ``run``.
        """
        total = len(run.seed)
        images: list = []
        start = 0
        vae = self.pipe.vae
        slicing = getattr(vae, "use_slicing", None)
        if hasattr(vae, "enable_slicing") and slicing is False:
            vae.enable_slicing()  # the decode of a part, one image at a time (VAEs work per image)
        try:
            while start < total:
                indices = list(range(start, min(total, start + limit)))
                part = conditioning.images(indices)
                try:
                    settings = run.replace(
                        prompt=part.prompts,
                        negative_prompt=part.negative_prompts,
                        num_images_per_prompt=1,
                        seed=[run.seed[i] for i in indices],
                    )
                    result = self(
                        conditioning=part,
                        settings=settings,
                        output_type=output_type,
                        max_batch=len(indices),
                        **_previews_of_part(kwargs, indices, total),
                    )
                except torch.cuda.OutOfMemoryError:
                    if limit == 1:
                        raise
                    torch.cuda.empty_cache()
                    limit //= 2
                    logger.warning("out of device memory: running %d images at a time", limit)
                    continue
                images.extend(list(result.images))
                start += len(indices)
        finally:
            if slicing is False:
                vae.disable_slicing()
        if output_type != "pil":
            images = np.stack(images) if output_type == "np" else torch.stack(images)
        return FaceIDOutput(images=images, faces=conditioning.faces, settings=run, control_images=result.control_images)

    # ------------------------------------------------------------------ samplers and few-step presets
    def _scheduler_for(self, run: GenerationSettings):
        """The call's own scheduler (a fresh one on the base model's noise schedule), or None to keep the
        pipeline's; refuses ``eta`` for a sampler that would silently ignore it."""
        scheduler = None if run.scheduler is None else make_scheduler(run.scheduler, self.pipe.scheduler.config)
        used = type(scheduler or self.pipe.scheduler).__name__
        if run.eta is not None and used not in ETA_SCHEDULERS:
            raise FaceIDError(f"eta applies to the DDIM and TCD samplers only, not {used}: leave it out")
        return scheduler

    def load_fast_lora(self, name: str, source: str | os.PathLike | None = None) -> str:
        """Load the distillation LoRA of few-step preset ``name`` (``faceid.fast.PRESETS``) for this base
        model's family: ``source`` (a local file), else the pinned Hub file (downloaded once, checked against
        its sha256). Calls with ``fast=name`` load it themselves; this does it ahead (a server at start, or a
        machine without internet from a copied file). It stays loaded, inactive (no cost) and at weight 0
        outside those calls."""
        adapter_name = f"fast-{name}"
        if adapter_name in self._fast_loras:
            return adapter_name
        file = preset(name).lora(self.family)
        if source is not None:
            path = Path(source)
        else:
            try:
                path = fetch(file)
            except MissingWeightsError as exc:
                raise MissingWeightsError(
                    f"{exc}. Or load a copy of the file: pipe.load_fast_lora({name!r}, PATH) in Python, "
                    f"--fast-lora PATH on the command line"
                ) from exc
        self._stack_lora(path, adapter_name, 0.0, label=f"the {name} few-step LoRA ({path.name})")
        self.lora_stack.set_active(adapter_name, False)  # it acts in the calls that name the preset only
        self._fast_loras[adapter_name] = str(path)
        return adapter_name

    def _check_diffusers_kwargs(self, kwargs: Mapping[str, Any], target) -> None:
        """Refuse an argument that is neither a generation setting nor one the diffusers pipeline ``target``
        takes (diffusers would swallow it into ``**kwargs`` and ignore it)."""
        accepted = set(inspect.signature(target.__call__).parameters)
        # Given by faceid itself, from the settings, the conditioning or the mode's inputs.
        ours = {"prompt", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                "negative_pooled_prompt_embeds", "num_images_per_prompt", "generator", "latents", "output_type",
                "image", "mask_image", "control_image", "controlnet_conditioning_scale", "control_guidance_start",
                "control_guidance_end"}  # fmt: skip
        unknown = sorted(k for k in kwargs if k not in accepted or k in ours)
        if unknown:
            raise FaceIDError(
                f"unknown argument(s) {', '.join(unknown)}: not a generation setting "
                f"({', '.join(GenerationSettings.model_fields)}) nor an argument of {type(target).__name__} "
                "(images: init_image=, mask_image=, control=ControlInput(...))"
            )

    def _check_models(self, requested: GenerationSettings) -> None:
        """Settings that name models must name the ones loaded here (a request is never run on another)."""
        loaded = {"base_model": self.base_model, "vae": self.vae_source, "adapter": self.adapter_source}
        for key, value in loaded.items():
            wanted = getattr(requested, key)
            if wanted is not None and value is not None and not _same_source(wanted, value):
                raise FaceIDError(f"these settings ask for {key} {wanted!r} but this pipeline has {value!r} loaded")
        if requested.tiny_vae is not None and self.tiny_vae_source is not None:
            wanted = previews.tiny_vae_name(requested.tiny_vae, self.family)
            if not _same_source(wanted, self.tiny_vae_source):
                raise FaceIDError(
                    f"these settings ask for tiny_vae {wanted!r} but this pipeline has {self.tiny_vae_source!r} loaded"
                )
        if requested.decoder == "tiny" and self.tiny_vae is None:
            raise FaceIDError(
                "decoder 'tiny' needs a tiny VAE, and this pipeline has none loaded: "
                "FaceIDPipeline.from_pretrained(..., tiny_vae='auto') (faceid: --tiny-vae), or decoder 'full'"
            )
        if requested.loras is not None:
            have = self.lora_sources()
            if _by_source(requested.loras) != _by_source(have):
                raise FaceIDError(
                    f"these settings ask for the LoRAs {requested.loras} but this pipeline has {have or 'none'} "
                    "loaded: load_lora / set_lora_weight / remove_lora first"
                )

    @staticmethod
    def _check_same_encoding(requested: GenerationSettings, encoded: GenerationSettings) -> None:
        """With ``conditioning=``, an encode-time setting given again must be the one it was encoded with."""
        for key in requested.model_fields_set & set(ENCODE_FIELDS):
            if getattr(requested, key) != getattr(encoded, key):
                raise FaceIDError(
                    f"{key}={getattr(requested, key)!r} differs from the conditioning's {getattr(encoded, key)!r}: "
                    "encode() again with the new value"
                )


def _previews_of_part(kwargs: dict, indices: list[int], total: int) -> dict:
    """A part's call arguments: its previews go to the call's ``on_preview`` at their places in the whole
    batch (the other parts' places hold None)."""
    on_preview = kwargs.get("on_preview")
    if on_preview is None:
        return kwargs

    def placed(step: int, steps: int, images: list) -> None:
        whole: list = [None] * total
        for index, image in zip(indices, images, strict=True):
            whole[index] = image
        on_preview(step, steps, whole)

    return {**kwargs, "on_preview": placed}


@contextlib.contextmanager
def _swapped(owner: Any, attribute: str, value: Any):
    """``owner.attribute = value`` inside the block only."""
    original = getattr(owner, attribute)
    setattr(owner, attribute, value)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def _source_key(source: str) -> str:
    """A model named as given, or its resolved path when it is a local file or folder."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _same_source(a: str, b: str) -> bool:
    return _source_key(a) == _source_key(b)


def _by_source(loras: Mapping[str, float]) -> dict[str, float]:
    return {_source_key(source): float(weight) for source, weight in loras.items()}


def _family(pipe) -> str:
    from diffusers import StableDiffusionXLPipeline

    return "SDXL" if isinstance(pipe, StableDiffusionXLPipeline) else "SD1.5"


def seeded_generators(seed: int | Sequence[int]) -> torch.Generator | list[torch.Generator]:
    if isinstance(seed, int):
        return torch.Generator("cpu").manual_seed(seed)
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seed]


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)
