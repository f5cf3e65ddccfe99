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
class AdapterFile:
    """One released adapter and the base model the authors show it with."""

    filename: str
    family: str  # "SD1.5" or "SDXL"
    base_model: str
    vae: str | None = None


# The authors' demos use Realistic Vision 4.0 with the sd-vae-ft-mse VAE for SD1.5, RealVisXL for SDXL.
_SD15_BASE = "SG161222/Realistic_Vision_V4.0_noVAE"
_SD15_VAE = "stabilityai/sd-vae-ft-mse"
_SDXL_BASE = "SG161222/RealVisXL_V3.0"

ADAPTERS: dict[str, AdapterFile] = {
    "faceid-sd15": AdapterFile("ip-adapter-faceid_sd15.bin", "SD1.5", _SD15_BASE, _SD15_VAE),
    "faceid-plus-sd15": AdapterFile("ip-adapter-faceid-plus_sd15.bin", "SD1.5", _SD15_BASE, _SD15_VAE),
    "faceid-plusv2-sd15": AdapterFile("ip-adapter-faceid-plusv2_sd15.bin", "SD1.5", _SD15_BASE, _SD15_VAE),
    "faceid-portrait-sd15": AdapterFile("ip-adapter-faceid-portrait_sd15.bin", "SD1.5", _SD15_BASE, _SD15_VAE),
    "faceid-portrait-v11-sd15": AdapterFile("ip-adapter-faceid-portrait-v11_sd15.bin", "SD1.5", _SD15_BASE, _SD15_VAE),
    "faceid-sdxl": AdapterFile("ip-adapter-faceid_sdxl.bin", "SDXL", _SDXL_BASE),
    "faceid-plusv2-sdxl": AdapterFile("ip-adapter-faceid-plusv2_sdxl.bin", "SDXL", _SDXL_BASE),
    "faceid-portrait-sdxl": AdapterFile("ip-adapter-faceid-portrait_sdxl.bin", "SDXL", _SDXL_BASE),
}
DEFAULT_ADAPTER = "faceid-sd15"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_adapter(adapter: str | os.PathLike) -> Path:
    """A local adapter file, or a released adapter's name (downloaded once into the Hub cache)."""
    path = Path(adapter).expanduser()
    if path.is_file():
        return path
    name = str(adapter)
    if name in ADAPTERS:
        return download(ADAPTER_REPO, ADAPTERS[name].filename)
    if path.suffix in (".bin", ".safetensors") or os.sep in name:
        raise MissingWeightsError(
            f"adapter file not found: {path}. Give the path of an IP-Adapter-FaceID .bin/.safetensors file "
            f"or one of the released names: {', '.join(ADAPTERS)}"
        )
    raise MissingWeightsError(f"unknown adapter {name!r}: give a file path or one of {', '.join(ADAPTERS)}")


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
