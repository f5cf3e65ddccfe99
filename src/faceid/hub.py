"""Where the released weights live, and fetching them with progress and clear errors.

Adapter names resolve to files of the Hugging Face Hub repo ``h94/IP-Adapter-FaceID`` (SPEC.md
section 3). Anything that is a local file or folder is used as it is; nothing is downloaded then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingWeightsError

ADAPTER_REPO = "h94/IP-Adapter-FaceID"


@dataclass(frozen=True)
class Preset:
    """A released model by name: its adapter file, what it needs, and the settings it works best with."""

    name: str
    filename: str  # in ADAPTER_REPO
    family: str  # "SD1.5" or "SDXL"
    base_model: str  # the base model the authors show it with
    vae: str | None = None
    plus: bool = False  # needs the CLIP ViT-H image encoder
    shortcut: bool = False  # PlusV2: tokens + s_scale * perceiver
    portrait: bool = False  # several photos, tokens concatenated, no LoRA
    description: str = ""

    @property
    def image_encoder(self) -> tuple[str, str] | None:
        return CLIP_IMAGE_ENCODER if self.plus else None

    @property
    def lora_filename(self) -> str | None:
        """The separate ``*_lora.safetensors`` twin (Portrait has no LoRA)."""
        return None if self.portrait else self.filename.replace(".bin", "_lora.safetensors")

    @property
    def combine(self) -> str:
        return "concat" if self.portrait else "mean"


# The authors' demos use Realistic Vision 4.0 with the sd-vae-ft-mse VAE for SD1.5, RealVisXL for SDXL.
_SD15 = {"family": "SD1.5", "base_model": "SG161222/Realistic_Vision_V4.0_noVAE", "vae": "stabilityai/sd-vae-ft-mse"}
_SDXL = {"family": "SDXL", "base_model": "SG161222/RealVisXL_V3.0"}
CLIP_IMAGE_ENCODER = ("h94/IP-Adapter", "models/image_encoder")  # CLIP ViT-H/14 laion2B-s32B-b79K

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("faceid-sd15", "ip-adapter-faceid_sd15.bin", **_SD15, description="face embedding + LoRA"),
        Preset(
            "faceid-plus-sd15",
            "ip-adapter-faceid-plus_sd15.bin",
            **_SD15,
            plus=True,
            description="face embedding + CLIP face features (perceiver) + LoRA",
        ),
        Preset(
            "faceid-plusv2-sd15",
            "ip-adapter-faceid-plusv2_sd15.bin",
            **_SD15,
            plus=True,
            shortcut=True,
            description="Plus with the embedding shortcut; s_scale sets the face structure weight",
        ),
        Preset(
            "faceid-portrait-sd15",
            "ip-adapter-faceid-portrait_sd15.bin",
            **_SD15,
            portrait=True,
            description="several photos of one person, 16 tokens each, no LoRA",
        ),
        Preset(
            "faceid-portrait-v11-sd15",
            "ip-adapter-faceid-portrait-v11_sd15.bin",
            **_SD15,
            portrait=True,
            description="Portrait, version 1.1",
        ),
        Preset("faceid-sdxl", "ip-adapter-faceid_sdxl.bin", **_SDXL, description="face embedding + LoRA, SDXL"),
        Preset(
            "faceid-plusv2-sdxl",
            "ip-adapter-faceid-plusv2_sdxl.bin",
            **_SDXL,
            plus=True,
            shortcut=True,
            description="PlusV2 for SDXL",
        ),
        Preset(
            "faceid-portrait-sdxl",
            "ip-adapter-faceid-portrait_sdxl.bin",
            **_SDXL,
            portrait=True,
            description="Portrait for SDXL",
        ),
    )
}
DEFAULT_ADAPTER = "faceid-sd15"


def preset_for(adapter: str | os.PathLike) -> Preset | None:
    """The preset named ``adapter``, or the one whose released file name it has (a downloaded copy)."""
    name = str(adapter)
    if name in PRESETS:
        return PRESETS[name]
    filename = Path(name).name
    return next((p for p in PRESETS.values() if p.filename == filename or p.lora_filename == filename), None)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_adapter(adapter: str | os.PathLike) -> Path:
    """A local adapter file, or a released adapter's name (downloaded once into the Hub cache)."""
    path = Path(adapter).expanduser()
    if path.is_file():
        return path
    name = str(adapter)
    if name in PRESETS:
        return download(ADAPTER_REPO, PRESETS[name].filename)
    if path.suffix in (".bin", ".safetensors") or os.sep in name:
        raise MissingWeightsError(
            f"adapter file not found: {path}. Give the path of an IP-Adapter-FaceID .bin/.safetensors file "
            f"or one of the released names: {', '.join(PRESETS)}"
        )
    raise MissingWeightsError(
        f"unknown adapter {name!r}: give a file path or one of {', '.join(PRESETS)} (see `faceid models`)"
    )


def download(repo_id: str, filename: str, subfolder: str | None = None) -> Path:
    """Fetch one file from the Hub (with huggingface_hub's progress bar), or say how to get it by hand."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, local_files_only=offline()))
    except Exception as exc:  # offline, no such file, gated repo, network error: the remedy is the same
        where = f"{subfolder}/{filename}" if subfolder else filename
        raise MissingWeightsError(
            f"could not get {where} from the Hugging Face Hub repo {repo_id} ({type(exc).__name__}). "
            f"Download it on a machine with internet (https://huggingface.co/{repo_id}, file {where}) "
            "and pass the local file path instead of the name"
        ) from exc


def model_not_found(model: str, exc: Exception) -> MissingWeightsError:
    """The error for a base model (or image encoder) that is neither on disk nor downloadable."""
    return MissingWeightsError(
        f"could not load model {model!r}: it is not a local folder or file, and fetching it from the Hugging "
        f"Face Hub failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). On a machine with internet "
        f"run `huggingface-cli download {model} --local-dir DIR` (or save it with diffusers' save_pretrained) "
        "and pass DIR instead"
    )
