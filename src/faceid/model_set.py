"""Loading a model set: a base model with everything a call can use on it, loaded once and shared by calls.

``ModelSet.from_pretrained`` loads a Stable Diffusion 1.5 or SDXL base pipeline (a diffusers folder, a Hub repo
id or a single file) and installs an identity adapter in its UNet; a model set then takes more on: LoRAs
stacked with the identity (``load_lora``), the few-step presets' LoRAs (``load_fast_lora``), standard
IP-Adapters for style references (``load_reference``), ControlNets (``load_controlnet``), a tiny VAE. Calls
read all of it and change none of it (``faceid.sampling``); what must stay shared and changes between calls,
the UNet's LoRA weights, is guarded (``faceid.weights``). ``FaceIDPipeline`` is a model set that can be called.

It also answers what a request may ask of it: the settings' defaults that come from what is loaded
(``resolve_settings``), and the refusal of settings that name other models (``check_models``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import families as families_table
from . import identity
from . import tiny_vae as tiny_vaes
from .adapter import FaceIDAdapter, refuse_other_family
from .attention import module_state
from .checkpoints import AdapterSpec, load_state_dict
from .errors import FaceIDError, MissingWeightsError
from .families import FAMILIES, family_of_pipeline, refuse_without_faceid
from .fast import preset
from .hub import fetch, model_not_found, offline
from .lora import LoraStack
from .modes import check_controlnet
from .peft_adapters import tensor_scalings
from .settings import GenerationSettings
from .variants import DEFAULT_ADAPTER, released, resolve_adapter
from .weights import weights_guard

logger = logging.getLogger(__name__)

# The DDIM settings of the authors' demos; other fields come from the base model's scheduler config.
DDIM_OVERRIDES = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


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
    *,
    faceid_adapter: bool = True,
    quantization_config: Any = None,
):
    """A Stable Diffusion 1.5 or SDXL pipeline from a diffusers folder, a Hub repo id or a single file; with
    ``faceid_adapter=False``, a pipeline of a family the FaceID adapters are not made for (FLUX.1) from a diffusers
    folder or repo id, its weights quantized as ``quantization_config`` says (diffusers'
    ``PipelineQuantizationConfig``).

    A single file holds weights only; diffusers fetches the matching model configuration from the Hub
    unless ``single_file_config`` names a diffusers folder (or repo id) of the same architecture.
    """
    if not faceid_adapter:
        return _load_other_base_pipeline(base_model, torch_dtype, vae, quantization_config)
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


def _load_other_base_pipeline(base_model, torch_dtype: torch.dtype, vae: str | None, quantization_config: Any):
    """A diffusers pipeline of a family without FaceID adapters (FLUX.1), from a diffusers folder or repo id."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    path = Path(base_model).expanduser()
    if path.is_file():
        raise FaceIDError(
            f"{base_model} is a single file: a base model without a FaceID adapter (FLUX.1) loads from a diffusers "
            "folder or Hub repo id (model_index.json and its component folders)"
        )
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": offline()}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        if vae is not None:
            kwargs["vae"] = AutoencoderKL.from_pretrained(str(vae), dtype=torch_dtype, local_files_only=offline())
        config = DiffusionPipeline.load_config(str(base_model), local_files_only=offline())
    except Exception as exc:
        raise model_not_found(str(base_model if vae is None or "vae" in kwargs else vae), exc) from exc
    name = config.get("_class_name", "")
    found = family_of_pipeline(name)
    if found is None or found.faceid_adapters:
        runs = [f.name for f in FAMILIES.values() if not f.faceid_adapters]
        raise FaceIDError(
            f"{base_model} is a {name or 'pipeline of unknown kind'}: without a FaceID adapter faceid loads "
            f"{', '.join(runs)} base models; for Stable Diffusion 1.5 and SDXL give the adapter (adapter=..., "
            "--adapter)"
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(str(base_model), **kwargs)
    except FaceIDError:
        raise
    except Exception as exc:
        raise model_not_found(str(base_model), exc) from exc
    if type(pipe).__name__ != found.pipeline_class():
        raise FaceIDError(f"{base_model} is a {type(pipe).__name__}; faceid loads {found.pipeline_class()} folders")
    return pipe


OFFLOADS = ("model", "sequential")  # diffusers' enable_model_cpu_offload / enable_sequential_cpu_offload
QUANTIZATIONS = {"int8": "int8", "fp8": "float8"}  # --quantize -> optimum-quanto's weights_dtype


def quantization_config(quantize: str | None, family: str):
    """diffusers' ``PipelineQuantizationConfig`` for ``quantize`` (``"int8"`` or ``"fp8"``): optimum-quanto weight
    quantization of the denoiser and of the large text encoder (T5 for FLUX.1), as InfiniteYou's authors quantize
    FLUX; None for None. Quanto runs on the CPU too (weights stored in 8 bits, computed dequantized)."""
    if quantize is None:
        return None
    if quantize not in QUANTIZATIONS:
        raise FaceIDError(f"unknown quantization {quantize!r}: {', '.join(QUANTIZATIONS)} (or none)")
    from diffusers.utils import is_optimum_quanto_available

    if not is_optimum_quanto_available():
        raise FaceIDError(
            "weight quantization needs optimum-quanto: pip install optimum-quanto (the version pinned in "
            "faceid's pyproject.toml, extra 'quantize')"
        )
    from diffusers import QuantoConfig
    from diffusers.quantizers import PipelineQuantizationConfig
    from transformers import QuantoConfig as TransformersQuantoConfig

    # diffusers' and transformers' Quanto configs name the dtype differently: one config per component.
    weights = QUANTIZATIONS[quantize]
    mapping: dict[str, Any] = {FAMILIES[family].denoiser: QuantoConfig(weights_dtype=weights)}
    if not FAMILIES[family].faceid_adapters:  # FLUX.1's T5 (4.7B parameters) is the other big one
        mapping["text_encoder_2"] = TransformersQuantoConfig(weights=weights)
    return PipelineQuantizationConfig(quant_mapping=mapping)


def place_pipeline(pipe, device: torch.device, offload: str | None) -> None:
    """``pipe`` on ``device``, or with its models offloaded to the CPU between uses (``offload``: ``"model"``,
    each model moved to the GPU while it runs; ``"sequential"``, each layer, slower and smallest), as diffusers'
    ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload`` do."""
    if offload is None:
        pipe.to(device)
        return
    if offload not in OFFLOADS:
        raise FaceIDError(f"unknown offload {offload!r}: {', '.join(OFFLOADS)} (or none)")
    if device.type == "cpu":
        raise FaceIDError(
            f"offload={offload!r} moves models between the CPU and a GPU while they run, and this model set runs on "
            "the CPU: leave offload out (or run on a CUDA device)"
        )
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


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
    found = family_of_pipeline(name)
    if found is not None:
        refuse_without_faceid(found, f"{base_model} ({name})")
        return found.name
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


class ModelSet:
    """A base pipeline with an identity adapter installed, and what is loaded next to it (see the module).

    >>> models = ModelSet.from_pretrained("SG161222/Realistic_Vision_V4.0_noVAE", adapter="faceid-sd15")
    """

    def __init__(
        self,
        pipe,
        adapter: FaceIDAdapter | None,
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
        # The FaceID adapter installed in the UNet; None for a model set of a family the FaceID adapters are not
        # made for (FLUX.1), which runs the identity methods loaded with load_method.
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
        self.lora_stack = LoraStack(self.denoiser, encoders)
        self._fast_loras: dict[str, str] = {}  # few-step LoRAs loaded (adapter name -> file), see load_fast_lora
        # The img2img / inpainting / ControlNet pipelines built from ``pipe`` (class name -> pipeline), see
        # ``pipeline_for``: they share every module of ``pipe``; calls run on copies of them (``call_pipeline``).
        self._siblings: dict[str, Any] = {}
        self._building = threading.Lock()  # a sibling is built once, whichever call asks first
        # The UNet's LoRA weights, shared by every call on it: see faceid.weights.
        self.weights = weights_guard(self.denoiser)
        # Hugging Face's fast tokenizers keep the padding and truncation of their last call on themselves: two
        # prompts encoded at once could pad each other's. Prompts are encoded one call at a time (milliseconds).
        self._encoding_prompts = threading.Lock()
        self._vae_float32: tuple | None = None  # (what it was made from, the copy): see vae_float32
        # Standard IP-Adapters loaded next to FaceID for style/composition references (load_reference), and the
        # CLIP image encoder that reads their images where the adapter itself needs none (FaceID, not Plus).
        self.references: dict[str, Any] = {}
        self._reference_encoder: identity.CLIPFaceEncoder | None = None
        self._reference_encoder_source: str | None = None  # the path it was loaded from, if given
        # Identity methods loaded next to FaceID (load_method): name -> its loaded pieces (e.g. InstantID), and
        # the folder each needed face pack is read from (None: faceid's or insightface's cache).
        self.methods: dict[str, Any] = {}
        self.method_sources: dict[str, str | None] = {}
        self._method_packs: dict[str, str | os.PathLike | None] = {}
        self.offload: str | None = None  # how the models are offloaded to the CPU (place_pipeline); None: not
        self.quantize: str | None = None  # the weight quantization it was loaded with (quantization_config)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        base_model: str | os.PathLike | None = None,
        adapter: str | os.PathLike | None = DEFAULT_ADAPTER,
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
        methods: Mapping[str, str | os.PathLike | None] | None = None,
        offload: str | None = None,
        quantize: str | None = None,
    ) -> ModelSet:
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
        ``methods``: identity methods to load next to the FaceID adapter, name -> source, as ``load_method``
        loads them (e.g. ``{"instantid": "checkpoints"}``, a folder laid out as ``InstantX/InstantID``).

        ``adapter=None``: a model set without a FaceID adapter, for a base model of a family the adapters are not
        made for (FLUX.1, a diffusers folder or repo id): its identity methods come from ``methods`` (e.g.
        ``{"infiniteyou": "infu_flux_v1.0/aes_stage2"}``), the first being its default method. It keeps its own
        scheduler (``scheduler`` is for the Stable Diffusion families), runs in bfloat16 on an accelerator, and
        takes the memory options: ``offload`` (``"model"`` or ``"sequential"``: diffusers' CPU offload, CUDA only)
        and ``quantize`` (``"int8"`` or ``"fp8"``: optimum-quanto weights of the transformer and T5).
        """
        if adapter is None:
            return cls._without_adapter(
                base_model,
                vae=vae,
                tiny_vae=tiny_vae,
                torch_dtype=torch_dtype,
                device=device,
                face_analyzer=face_analyzer,
                face_models=face_models,
                progress=progress,
                methods=methods,
                offload=offload,
                quantize=quantize,
                loras=loras,
                compile=compile,
            )
        if offload is not None or quantize is not None:
            raise FaceIDError(
                "offload and quantize are the memory options of a base model without a FaceID adapter (FLUX.1, "
                "adapter=None); the Stable Diffusion model sets run whole on their device"
            )
        release = released(adapter)
        base_model, vae = default_models(base_model, adapter, vae)
        index = Path(base_model).expanduser() / "model_index.json"
        if index.is_file():  # a local diffusers folder of a family without FaceID adapters: refused before loading
            found = family_of_pipeline(json.loads(index.read_text()).get("_class_name", ""))
            if found is not None:
                refuse_without_faceid(found, f"{base_model} ({found.pipeline_class()})")
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
        place_pipeline(pipe, device, None)
        tiny = tiny_source = None
        if tiny_vae is not None:
            tiny, tiny_source = tiny_vaes.load_tiny_vae(tiny_vae, _family(pipe), pipe.vae, torch_dtype, device)
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
        for name, source in (methods or {}).items():
            loaded.load_method(name, source)
        if compile:
            loaded.compile()
        return loaded

    @classmethod
    def _without_adapter(
        cls,
        base_model: str | os.PathLike | None,
        *,
        vae,
        tiny_vae,
        torch_dtype: torch.dtype | None,
        device,
        face_analyzer,
        face_models,
        progress: bool,
        methods: Mapping[str, str | os.PathLike | None] | None,
        offload: str | None,
        quantize: str | None,
        loras: Sequence,
        compile: bool,
    ) -> ModelSet:
        """``from_pretrained(adapter=None)``: a base model of a family without FaceID adapters and its methods."""
        if base_model is None:
            raise FaceIDError("give base_model: without a FaceID adapter there is no default base model")
        if not methods:
            raise FaceIDError(
                "a model set without a FaceID adapter generates with an identity method: give methods={'infiniteyou': "
                "FOLDER} (faceid generate: --method infiniteyou --method-weights infiniteyou=FOLDER)"
            )
        if loras:
            raise FaceIDError("LoRAs on a base model without a FaceID adapter (FLUX.1) are not supported yet")
        if compile:
            raise FaceIDError("compile on a base model without a FaceID adapter (FLUX.1) is not supported yet")
        if offload is not None and offload not in OFFLOADS:
            raise FaceIDError(f"unknown offload {offload!r}: {', '.join(OFFLOADS)} (or none)")
        device = torch.device(device) if device is not None else default_device()
        config = pipeline_index(base_model)
        found = family_of_pipeline(config.get("_class_name", ""))
        family_name = found.name if found is not None else None
        if offload is not None and device.type == "cpu":
            place_pipeline(None, device, offload)  # the refusal, before anything loads
        if torch_dtype is None:
            half = getattr(torch, found.half_dtype) if found is not None else torch.float16
            torch_dtype = half if device.type in ("cuda", "mps") else torch.float32
        quantization = quantization_config(quantize, family_name) if family_name is not None else None
        pipe = load_base_pipeline(base_model, torch_dtype, vae, faceid_adapter=False, quantization_config=quantization)
        pipe.set_progress_bar_config(disable=not progress)
        place_pipeline(pipe, device, offload)
        tiny = tiny_source = None
        if tiny_vae is not None:
            raise FaceIDError("a tiny VAE for FLUX.1 is not supported yet: leave tiny_vae out")
        loaded = cls(
            pipe,
            None,
            face_analyzer=face_analyzer,
            face_models=face_models,
            base_model=str(base_model),
            vae_source=None if vae is None else str(vae),
            tiny_vae=tiny,
            tiny_vae_source=tiny_source,
        )
        loaded.offload = offload
        loaded.quantize = quantize
        for name, source in methods.items():
            loaded.load_method(name, source)
        return loaded

    def compile(self, mode: str | None = None, backend: str | Callable | None = None) -> ModelSet:
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
        self._refuse_without_adapter("compile")
        unet = self.pipe.unet
        cuda = unet.device.type == "cuda"
        with self.weights.exclusive():  # it changes the UNet every call runs on: none runs meanwhile
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
        return getattr(self.denoiser, "_compiled_call_impl", None) is not None

    def _refuse_without_adapter(self, what: str) -> None:
        """What is built for the Stable Diffusion UNet (LoRA stacking, compile, reference adapters, few-step LoRAs)
        is refused on a model set without a FaceID adapter (FLUX.1), saying so."""
        if self.adapter is None:
            raise FaceIDError(f"{what} on a {self.family} model set (no FaceID adapter) is not supported yet")

    # ------------------------------------------------------------------ properties
    @property
    def family(self) -> str:
        return _family(self.pipe, self.adapter is not None)

    @property
    def denoiser(self):
        """The base model's denoiser: the UNet, or a DiT's transformer (the family row's ``denoiser``)."""
        found = family_of_pipeline(type(self.pipe).__name__)
        return getattr(self.pipe, found.denoiser if found is not None else "unet")

    @property
    def default_method(self) -> str:
        """The identity method of a call that names none: FaceID with a FaceID adapter, else the first method
        loaded."""
        if self.adapter is not None:
            from .methods import DEFAULT_METHOD

            return DEFAULT_METHOD
        return next(iter(self.methods), "faceid")

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def face_models(self) -> str | os.PathLike | None:
        """The face models folder the analyzer reads (None: insightface's pack from faceid's cache)."""
        return self._face_models

    def face_packs_at_hand(self) -> frozenset[str]:
        """The insightface packs whose recognizers the loaded face analyzer has (before it is loaded: those the
        loaded methods checked, which it will be loaded with)."""
        analyzer = self._face_analyzer
        if analyzer is None:  # the packs a loaded method checked are the ones it will be loaded with
            return frozenset(self._method_packs)
        packs = {getattr(analyzer, "pack", None), *getattr(analyzer, "extra_recognizers", {})}
        return frozenset(p for p in packs if p)

    @property
    def face_analyzer(self):
        if self._face_analyzer is None:
            from .faces import FaceAnalyzer

            analyzer = FaceAnalyzer.from_pretrained(self._face_models)
            for pack, folder in self._method_packs.items():
                analyzer = analyzer.with_pack(pack, folder)
            self._face_analyzer = analyzer
        return self._face_analyzer

    # ------------------------------------------------------------------ user LoRAs
    def load_lora(self, path: str | os.PathLike, weight: float = 1.0, name: str | None = None) -> str:
        """Stack an ecosystem LoRA (kohya or diffusers layout; a style, a character...) with its own weight,
        on the UNet and (its text-encoder part) on the text encoders.

        The identity LoRA and any other loaded LoRA stay active. Returns the name to use with
        ``set_lora_weight`` / ``remove_lora`` (default: the file name without suffix).
        """
        self._refuse_without_adapter("load_lora")
        return self._stack_lora(path, name or Path(path).stem, weight)

    def _stack_lora(self, path: str | os.PathLike, name: str, weight: float, label: str | None = None) -> str:
        with self.weights.exclusive():  # no call runs while the UNet's LoRA layers change
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
        for ``ControlInput(image, controlnet, scale, window)``; one made for the other family is refused.

        Loaded strictly, as InstantID's IdentityNet is: diffusers alone would fill a missing tensor with random
        values and skip an extra one, so a weights file that does not match its config (a missing, unexpected or
        mismatched key) is a :class:`~faceid.errors.CheckpointError` naming the key."""
        from diffusers import ControlNetModel, FluxControlNetModel

        from .checkpoints import check_loading_report, loading_error

        flux = families_table.family(self.family).denoiser == "transformer"
        kind = "FluxControlNetModel" if flux else "ControlNetModel"
        what = f"the ControlNet {source}"
        advice = f"is it a diffusers {kind} folder (config.json and its weights), complete and not corrupted?"
        try:
            controlnet, report = (FluxControlNetModel if flux else ControlNetModel).from_pretrained(
                str(source), dtype=self.denoiser.dtype, local_files_only=offline(), output_loading_info=True
            )
        except Exception as exc:
            if Path(str(source)).expanduser().exists():  # there, but its weights do not load
                raise loading_error(exc, what, advice) from exc
            raise model_not_found(str(source), exc) from exc
        check_loading_report(report, what, advice)
        check_controlnet(controlnet, self.denoiser, self.family, str(source))
        return controlnet.to("cpu" if self.offload else self.device).eval().requires_grad_(False)

    def pipeline_for(self, class_name: str | None):
        """The diffusers pipeline named ``class_name`` (``StableDiffusionXLControlNetInpaintPipeline``...) made
        from the loaded one with ``from_pipe``: every module shared, nothing copied; None is the loaded one.

        Built once and kept while it shares the loaded pipeline's components (replacing one of them, e.g.
        ``pipe.pipe.scheduler = ...``, builds it again). It is the template of ``call_pipeline``: no call runs
        on it, and a ControlNet pipeline is kept without a ControlNet, so none stays alive through it.
        """
        if class_name is None:
            return self.pipe
        import diffusers

        with self._building:
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
                if self.quantize is not None or self.offload is not None:
                    sibling = _sibling_as_is(getattr(diffusers, class_name), self.pipe, extra)
                else:
                    sibling = getattr(diffusers, class_name).from_pipe(self.pipe, dtype=self.denoiser.dtype, **extra)
            finally:
                diffusers_logging.set_verbosity(verbosity)
            sibling.set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {}))
            self._siblings[class_name] = sibling
            return sibling

    def call_pipeline(self, class_name: str | None, **parts: Any):
        """A diffusers pipeline object of its own for one call: a shallow copy of ``pipeline_for(class_name)``
        (every model shared, nothing copied) with ``parts`` in place of its components (the call's scheduler,
        ControlNet, VAE, a view of the UNet).

        diffusers' pipelines keep the state of the call they run on themselves (``_guidance_scale``,
        ``_num_timesteps``, the scheduler's timesteps...): each call running on its own object is what lets
        calls from several threads run at once without seeing each other's.
        """
        call = copy.copy(self.pipeline_for(class_name))
        # Straight into the instance: diffusers' __setattr__ would also rewrite the copy's configuration.
        call.__dict__.update(parts)
        return call

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
        self._refuse_without_adapter("load_reference")
        with self.weights.exclusive():  # it adds a branch to every processor: no call runs meanwhile
            return self._load_reference(source, name, image_encoder)

    def _load_reference(
        self,
        source: str | os.PathLike,
        name: str | None,
        image_encoder: str | os.PathLike | identity.CLIPFaceEncoder | None,
    ) -> str:
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
        with self.weights.exclusive():
            self.reference_adapter(name).remove()
        del self.references[name]

    @property
    def reference_encoder(self) -> identity.CLIPFaceEncoder | None:
        """The CLIP image encoder that reads reference images."""
        return self._reference_encoder or self.image_encoder

    def reference_adapter(self, name: str | None):
        """The reference adapter named ``name`` (None: the only one loaded)."""
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

    # ------------------------------------------------------------------ identity methods beside FaceID
    def load_method(
        self,
        name: str,
        source: str | os.PathLike | None = None,
        *,
        face_models: str | os.PathLike | None = None,
    ) -> str:
        """Load identity method ``name`` (``faceid.methods.METHODS``) next to the FaceID adapter, for calls with
        ``method=name``; returns the name.

        ``instantid``: ``source`` is a folder laid out as the Hub repository ``InstantX/InstantID`` (its
        ``ip-adapter.bin`` and ``ControlNetModel/``); None fetches the table's files, pinned by commit and sha256
        (the Hub cache first; offline, a file not there is refused saying where to get it). Its IdentityNet and its IP-Adapter branch go on
        this model set (no call runs meanwhile). ``pulid``: ``source`` is a folder with ``pulid_v1.1.safetensors``,
        ``EVA02_CLIP_L_336_psz14_s6B.pt`` and ``parsing_bisenet.pth`` (``faceid.methods.pulid.pulid_files``; None:
        the table's pinned files, fetched); its
        pieces sit beside FaceID's processors, nothing is put on the UNet. The method's base families are checked first, then its face
        pack: the face analysis gets that pack's recognizer (from ``face_models``, else the model set's face
        models folder, else faceid's or insightface's cache; a missing pack is refused with what to download).
        """
        from .methods import check_method, identity_method

        method = identity_method(name)
        if name == "faceid":
            raise FaceIDError(
                "faceid is the model set's own adapter: it is loaded by from_pretrained(adapter=...) (--adapter)"
            )
        if name not in ("instantid", "pulid", "infiniteyou", "pulid-flux"):
            raise FaceIDError(
                f"method {name} ({method.title}) cannot be loaded for generation yet: this faceid loads instantid "
                "and pulid beside faceid, and infiniteyou and pulid-flux on FLUX.1 (`faceid models`)"
            )
        folder = face_models if face_models is not None else self._face_models
        check_method(name, self.family, folder, self.face_packs_at_hand())
        if name in self.methods:
            raise FaceIDError(f"method {name} is loaded already; remove_method({name!r}) first to load another copy")
        if name == "infiniteyou":
            self._load_infiniteyou(method, source, folder)
            return name
        if name in ("pulid", "pulid-flux"):
            from .methods.pulid import PuLID, PuLIDFluxMethod, pulid_files, pulid_flux_files

            # source None: the table's pinned files, fetched and sha256-checked
            if name == "pulid":
                files = pulid_files(source)
                load = lambda: PuLID.load(self.pipe.unet, *files)  # noqa: E731
            else:
                # The CA modules are attached to the transformer's blocks (wrappers that pass a call without PuLID
                # through as the base model); the encoders run where the calls run (on the GPU with offload).
                files = pulid_flux_files(source)
                load = lambda: PuLIDFluxMethod.load(self.denoiser, *files, device=self.device)  # noqa: E731
        else:
            ip_adapter, identitynet = _instantid_files(method, source)

            def load():
                from .methods.instantid import InstantID

                return InstantID.load(self.pipe.unet, ip_adapter, identitynet)

        # InstantID adds a branch to every cross-attention processor, PuLID-FLUX wraps the transformer's blocks: no
        # call runs meanwhile
        with self.weights.exclusive():
            loaded = load()
            try:
                self._add_face_pack(method.face_pack, folder)
            except Exception:
                loaded.remove()
                raise
            self.methods[name] = loaded
            self.method_sources[name] = None if source is None else str(source)
        return name

    def _load_infiniteyou(self, method, source: str | os.PathLike | None, folder) -> None:
        """InfiniteYou's Resampler and InfuseNet from a released model set folder (``infu_flux_v1.0/aes_stage2``,
        or ``infu_flux_v1.0`` for its default set), in the transformer's dtype, where the transformer runs. Nothing
        is installed in the transformer: each call hands its own InfuseNet to its pipeline copy."""
        from .methods.infiniteyou import InfiniteYou, model_set_folder

        model_set = model_set_folder(source)
        transformer = self.denoiser
        # The pipeline's compute dtype (quantized weights keep it as their dtype too).
        dtype = transformer.dtype
        with self.weights.exclusive():
            # With CPU offload the models wait on the CPU, InfuseNet too: moved where it runs by its own hook.
            device = torch.device("cpu") if self.offload else self.device
            recognizer = find_recognizer(model_set, folder)
            loaded = InfiniteYou.from_pretrained(model_set, torch_dtype=dtype, device=device, recognizer=recognizer)
            if self.offload == "model":
                from accelerate import cpu_offload_with_hook

                cpu_offload_with_hook(loaded.infusenet, self.device)
            elif self.offload == "sequential":
                from accelerate import cpu_offload

                cpu_offload(loaded.infusenet, self.device)
            self._add_face_pack(method.face_pack, folder)
            self.methods["infiniteyou"] = loaded
            self.method_sources["infiniteyou"] = str(model_set)

    def remove_method(self, name: str) -> None:
        """Take a method ``load_method`` loaded off the model set again (no call runs meanwhile)."""
        loaded = self.loaded_method(name)
        with self.weights.exclusive():
            loaded.remove()
            del self.methods[name]
            self.method_sources.pop(name, None)

    def loaded_method(self, name: str):
        """The loaded pieces of identity method ``name`` (``load_method``), or the error that says how to load
        them."""
        if name in self.methods:
            return self.methods[name]
        from .methods import identity_method

        method = identity_method(name)
        files = ", ".join(f.path_in_repo.split("/")[0] for f in method.files_for())
        repo = method.files_for()[0].repo if method.files_for() else "its authors"
        raise FaceIDError(
            f"method {name} ({method.title}) is not loaded on this pipeline: load its weights once with "
            f"pipe.load_method({name!r}, FOLDER) or FaceIDPipeline.from_pretrained(..., methods={{{name!r}: FOLDER}}) "
            f"(faceid generate: --method-weights {name}=FOLDER), FOLDER holding {repo}'s {files} "
            f"(loaded: {', '.join(self.methods) or 'none'})"
        )

    def _add_face_pack(self, pack: str, folder: str | os.PathLike | None) -> None:
        """Face analysis with pack ``pack``'s recognizer too: the loaded analyzer gets a copy that has it (the
        analyzer given may be shared), and one loaded later is made with it."""
        if pack == "buffalo_l" or pack in self.face_packs_at_hand():
            return
        if self._face_analyzer is not None:
            self._face_analyzer = self._face_analyzer.with_pack(pack, folder)
        else:
            from .faces.model_files import pretrained_models

            pretrained_models(folder, pack, download=False)  # refused now, not at the first call
        self._method_packs[pack] = folder

    def vae_float32(self):
        """A float32 copy of a half-precision VAE, for the calls that decode in float32 (``force_upcast``), made
        on first use and kept while the VAE is the same (same object, same weights): each call then decodes with
        it instead of casting the VAE that calls share (``faceid.sampling.Float32Upcast``). Memory: the VAE's
        weights in float32 (~335 MB for SDXL's)."""
        vae = self.pipe.vae
        made_from = (vae, module_state(vae))
        with self._building:
            if self._vae_float32 is None or self._vae_float32[0] != made_from:
                copy_ = type(vae).from_config(vae.config)
                copy_.load_state_dict(vae.state_dict())  # the half-precision values, widened
                self._vae_float32 = (made_from, copy_.to(vae.device).eval().requires_grad_(False))
            return self._vae_float32[1]

    # ------------------------------------------------------------------ conditioning
    def encode_prompt(
        self, prompts: list[str], negatives: list[str], num_images_per_prompt: int, *, negatives_too: bool = False
    ) -> tuple:
        """The base pipeline's own ``encode_prompt`` (with classifier-free guidance's negatives), one call at a
        time: the tokenizers it uses are shared, and keep per-call settings on themselves. ``negatives_too``: a
        family whose guidance is embedded encodes the negatives too (PuLID-FLUX's true CFG)."""
        with self._encoding_prompts:
            if families_table.family(self.family).guidance_embedded:
                # FLUX: CLIP's pooled output and T5's tokens of the prompt, padded to 512 tokens (FLUX.1-dev's) or
                # the T5 tokenizer's own maximum where smaller; its guidance is embedded, no negatives (but for a
                # true CFG pass).
                def flux(texts):
                    embeds, pooled, _ = self.pipe.encode_prompt(
                        texts,
                        prompt_2=None,
                        device=self.device,
                        num_images_per_prompt=num_images_per_prompt,
                        max_sequence_length=min(512, self.pipe.tokenizer_2.model_max_length),
                    )
                    return embeds, pooled

                prompt_embeds, pooled = flux(prompts)
                negative, negative_pooled = flux(negatives) if negatives_too else (None, None)
                return prompt_embeds, negative, pooled, negative_pooled
            return self.pipe.encode_prompt(
                prompts,
                device=self.device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=True,
                negative_prompt=negatives,
            )

    @property
    def default_combine(self) -> str:
        """The variant table's: Portrait was trained on concatenated per-photo tokens, the others on one
        embedding."""
        if self.adapter is None:
            raise FaceIDError("this model set has no FaceID adapter")
        return self.adapter.spec.architecture().combine

    def resolve_settings(self, settings: GenerationSettings | Mapping[str, Any] | None = None) -> GenerationSettings:
        """``settings`` with every default this pipeline would use filled in (family, adapter, variant)."""
        requested = self.with_default_method(GenerationSettings.parse(settings))
        self.check_models(requested)
        # The tiny VAE as loaded ("auto" named): checked above, recorded as what this pipeline has.
        return requested.replace(tiny_vae=None).resolve(self.family, **self._known_defaults(requested.method))

    def with_default_method(self, requested: GenerationSettings) -> GenerationSettings:
        """``requested`` with this model set's default method where it names none (``default_method``)."""
        if "method" in requested.model_fields_set or requested.method == self.default_method:
            return requested
        return requested.replace(method=self.default_method)

    def _known_defaults(self, method: str = "faceid") -> dict[str, Any]:
        """Defaults that come from what is loaded rather than from the family; for another identity method than
        FaceID, the method's own (its table row's) instead of the FaceID adapter's knobs."""
        if method != "faceid" or self.adapter is None:
            from .methods import identity_method

            # A family whose guidance is embedded (FLUX.1-dev) has no negative prompt.
            embedded = families_table.family(self.family).guidance_embedded
            return {
                **({"negative_prompt": ""} if embedded else {}),
                "base_model": self.base_model,
                "adapter": self.adapter_source,
                "vae": self.vae_source,
                "tiny_vae": self.tiny_vae_source,
                "decoder": "full",
                "loras": self.lora_sources(),
                **identity_method(method).defaults,
            }
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

    def load_fast_lora(self, name: str, source: str | os.PathLike | None = None) -> str:
        """Load the distillation LoRA of few-step preset ``name`` (``faceid.fast.PRESETS``) for this base
        model's family: ``source`` (a local file), else the pinned Hub file (downloaded once, checked against
        its sha256). Calls with ``fast=name`` load it themselves; this does it ahead (a server at start, or a
        machine without internet from a copied file). It stays loaded, inactive (no cost) and at weight 0
        outside those calls."""
        self._refuse_without_adapter("load_fast_lora")
        adapter_name = f"fast-{name}"
        with self.weights.exclusive():  # one load, whichever call asks first; none runs meanwhile
            if adapter_name not in self._fast_loras:
                self._load_fast_lora(name, adapter_name, source)
        return adapter_name

    def _load_fast_lora(self, name: str, adapter_name: str, source: str | os.PathLike | None) -> None:
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

    def check_models(self, requested: GenerationSettings) -> None:
        """Settings that name models must name the ones loaded here (a request is never run on another)."""
        if self.adapter is None and requested.adapter not in (None, "none"):
            raise FaceIDError(
                f"these settings ask for adapter {requested.adapter!r} but this {self.family} model set has no FaceID "
                "adapter: leave adapter out"
            )
        loaded = {"base_model": self.base_model, "vae": self.vae_source, "adapter": self.adapter_source}
        if self.adapter is None:
            del loaded["adapter"]
        for key, value in loaded.items():
            wanted = getattr(requested, key)
            if wanted is not None and value is not None and not _same_source(wanted, value):
                raise FaceIDError(f"these settings ask for {key} {wanted!r} but this pipeline has {value!r} loaded")
        if requested.tiny_vae is not None and self.tiny_vae_source is not None:
            wanted = tiny_vaes.tiny_vae_name(requested.tiny_vae, self.family)
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


def _sibling_as_is(cls, pipe, extra: dict[str, Any]):
    """A pipeline of class ``cls`` on ``pipe``'s modules, none cast or moved: ``from_pipe`` casts every module to a
    dtype, which quantized weights refuse and offloaded ones need not."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    components = {key: value for key, value in pipe.components.items() if key in accepted}
    return cls(**components, **extra)


def find_recognizer(model_set: Path, face_models: str | os.PathLike | None) -> Path | None:
    """facexlib's ``recognition_arcface_ir_se50.pth`` for InfiniteYou: in the model set folder, the release's
    folders above it (``infu_flux_v1.0/``, the repository's root) or the face models folder; None where not."""
    from .faces.irse50 import IRSE50_FILE

    places = [model_set, model_set.parent, model_set.parent.parent]
    if face_models is not None:
        places.append(Path(face_models).expanduser())
    return next((place / IRSE50_FILE for place in places if (place / IRSE50_FILE).is_file()), None)


def _instantid_files(method, source: str | os.PathLike | None) -> tuple[Path, Path]:
    """InstantID's ``ip-adapter.bin`` and ``ControlNetModel/`` folder: in the folder ``source`` (the released
    layout), else the table's pinned files through ``fetch_method_file``."""
    from .errors import CheckpointError
    from .methods import fetch_method_file
    from .methods.instantid import IDENTITYNET_FOLDER, IP_ADAPTER_FILE

    if source is None:
        fetched = {file.path_in_repo: fetch_method_file(file) for file in method.files_for()}
        return fetched[IP_ADAPTER_FILE], fetched[f"{IDENTITYNET_FOLDER}/config.json"].parent
    folder = Path(source).expanduser()
    missing = [
        name
        for name, there in ((IP_ADAPTER_FILE, (folder / IP_ADAPTER_FILE).is_file()),
                            (f"{IDENTITYNET_FOLDER}/", (folder / IDENTITYNET_FOLDER).is_dir()))
        if not there
    ]  # fmt: skip
    if missing:
        raise CheckpointError(
            f"{folder} is not an InstantID folder: it has no {' and no '.join(missing)}. Download "
            f"{IP_ADAPTER_FILE} and {IDENTITYNET_FOLDER}/ (config.json, diffusion_pytorch_model.safetensors) from "
            "https://huggingface.co/InstantX/InstantID into one folder and give that folder"
        )
    return folder / IP_ADAPTER_FILE, folder / IDENTITYNET_FOLDER


def _source_key(source: str) -> str:
    """A model named as given, or its resolved path when it is a local file or folder."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _same_source(a: str, b: str) -> bool:
    return _source_key(a) == _source_key(b)


def _by_source(loras: Mapping[str, float]) -> dict[str, float]:
    return {_source_key(source): float(weight) for source, weight in loras.items()}


def _family(pipe, faceid_adapter: bool = True) -> str:
    found = family_of_pipeline(type(pipe).__name__)
    if found is None:
        raise FaceIDError(f"faceid does not run {type(pipe).__name__}: its families are {', '.join(FAMILIES)}")
    if faceid_adapter:
        refuse_without_faceid(found, type(pipe).__name__)
    return found.name


def family_without_adapter(base_model: str | os.PathLike | None, adapter: str | os.PathLike | None) -> str | None:
    """The family of a model set loaded without a FaceID adapter (``adapter`` ``"none"``, or a base model of a family
    the FaceID adapters are not made for, FLUX.1, read from its ``model_index.json``: nothing loaded), else None.
    ``"none"`` with a base model of another family is refused."""
    said_none = adapter is not None and str(adapter).lower() == "none"
    if adapter is not None and not said_none:
        return None
    if base_model is None:
        if said_none:
            raise FaceIDError("adapter 'none' needs a base model: a FLUX.1 diffusers folder or Hub repo id")
        return None
    try:
        found = family_of_pipeline(pipeline_index(base_model).get("_class_name", ""))
    except FaceIDError:
        if said_none:
            raise
        return None  # a single file or a missing model: the FaceID load says what is wrong
    if found is not None and not found.faceid_adapters:
        return found.name
    if said_none:
        runs = [f.name for f in FAMILIES.values() if not f.faceid_adapters]
        raise FaceIDError(
            f"adapter 'none': {base_model} is a {found.name if found else 'model of unknown kind'}, and without a "
            f"FaceID adapter faceid loads {', '.join(runs)} base models"
        )
    return None


def pipeline_index(base_model) -> dict:
    """A diffusers folder's or repo's ``model_index.json`` (nothing loaded)."""
    from diffusers import DiffusionPipeline

    if Path(base_model).expanduser().is_file():
        raise FaceIDError(
            f"{base_model} is a single file: a base model without a FaceID adapter (FLUX.1) loads from a diffusers "
            "folder or Hub repo id (model_index.json and its component folders)"
        )
    try:
        return dict(DiffusionPipeline.load_config(str(base_model), local_files_only=offline()))
    except Exception as exc:
        raise model_not_found(str(base_model), exc) from exc
